//! A WebSocket connection's permessage-deflate: what its upgrade agreed
//! and, for `dedicated`, its own compression contexts, made on first use.
//! A `shared` connection holds no context: it inflates with its core's
//! ([`CoreCodec`], reset per message) and takes each broadcast as the one
//! frame its core compressed for every such subscriber (`message::Frames`).

use crate::protocol::deflate::{Agreed, CoreCodec, Deflater, InflateError, Inflater, Mode};
use crate::protocol::ws::{self, WsError};

/// One connection's agreement and contexts.
#[derive(Debug)]
pub(crate) struct ConnDeflate {
    agreed: Agreed,
    mode: Mode,
    /// `dedicated`: its compressor (its window is the client's history).
    deflater: Option<Deflater>,
    /// `dedicated` with the client's context kept: its inflater.
    inflater: Option<Inflater>,
}

/// Appends a data frame with RSV1 set (a compressed message).
pub(crate) fn push_compressed_frame(out: &mut Vec<u8>, op: u8, payload: &[u8]) {
    let at = out.len();
    ws::encode_header(out, op, true, payload.len());
    out[at] |= 0x40;
    out.extend_from_slice(payload);
}

impl ConnDeflate {
    /// What `mode` agreed for this connection.
    pub(crate) fn new(mode: Mode, agreed: Agreed) -> Box<ConnDeflate> {
        Box::new(ConnDeflate {
            agreed,
            mode,
            deflater: None,
            inflater: None,
        })
    }

    /// Takes its core's compressed frame of a broadcast (else each
    /// message is compressed for it alone, through its own context).
    pub(crate) fn shares_frames(&self) -> bool {
        self.mode == Mode::Shared
    }

    /// Inflates a compressed message into `out`, at most `max` bytes.
    pub(crate) fn inflate(
        &mut self,
        data: &[u8],
        out: &mut Vec<u8>,
        max: usize,
        codec: &mut CoreCodec,
    ) -> Result<(), WsError> {
        let r = if self.agreed.client_no_context {
            codec.inflater().message(data, out, max, true)
        } else {
            let bits = self.agreed.client_bits;
            self.inflater
                .get_or_insert_with(|| Inflater::new(bits))
                .message(data, out, max, false)
        };
        r.map_err(|e| match e {
            InflateError::TooBig => WsError::TooBig,
            InflateError::Corrupt => WsError::BadDeflate,
        })
    }

    /// Appends the data frame for one message to `out`: compressed when it
    /// is at least `min` bytes and comes out smaller. Returns the
    /// compressor's (input, output) bytes when it compressed.
    pub(crate) fn frame(
        &mut self,
        op: u8,
        data: &[u8],
        min: usize,
        codec: &mut CoreCodec,
        out: &mut Vec<u8>,
    ) -> Option<(usize, usize)> {
        if data.len() >= min {
            let mut z = codec.take_buf();
            let level = codec.level;
            let (ok, fresh) = match self.mode {
                Mode::Dedicated => {
                    let (bits, fresh) = (self.agreed.server_bits, self.agreed.server_no_context);
                    let d = self
                        .deflater
                        .get_or_insert_with(|| Deflater::new(level, bits));
                    (d.message(data, &mut z, fresh), fresh)
                }
                _ => (codec.deflater().message(data, &mut z, true), true),
            };
            let sent = (ok && z.len() < data.len()).then(|| {
                push_compressed_frame(out, op, &z);
                (data.len(), z.len())
            });
            if sent.is_none() && !fresh {
                // The client never inflates a message sent plain, so our
                // window must forget it too: start a new context (a fresh
                // one only refers to what both sides saw since).
                self.deflater = None;
            }
            codec.put_buf(z);
            if sent.is_some() {
                return sent;
            }
        }
        ws::encode_frame(out, op, data);
        None
    }
}
