//! What crosses cores besides RELY transfer bytes: a [`Message`] (bytes plus
//! kind, no wire format), the [`Fanout`] that carries one to many
//! connections, and the admin request that asks every core ([`AdminCall`]).
//!
//! Routing never sees wire bytes: each core frames a fan-out's message once
//! per wire format its selected connections need ([`Frames`]), and queues
//! that frame by reference on each of them. A RELY transfer is the one
//! exception, by design: relayd forwards it byte for byte, so it travels as
//! its frame (mesh `Item::Deliver`) with a single copy.

use std::sync::Arc;

use super::outbox::Chunk;
use super::tags::Selector;
use super::ConnId;
use crate::protocol::{lenprefix, ws};

/// Frames at least this large are queued as a small per-core header plus
/// the message bytes shared by reference across cores, rather than copied
/// into one frame per core (the copy would cost more than the contended
/// reference count).
pub(crate) const SHARE_ACROSS_CORES: usize = 64 * 1024;

/// A message: bytes plus kind, in no wire format.
#[derive(Debug, Clone)]
pub struct Message {
    /// Text (valid UTF-8) or binary.
    pub text: bool,
    /// The payload, shared by every core that frames it.
    pub bytes: Arc<[u8]>,
}

impl Message {
    /// A message holding a copy of `bytes`.
    pub fn new(text: bool, bytes: &[u8]) -> Message {
        Message {
            text,
            bytes: Arc::from(bytes),
        }
    }
}

/// The wire formats a message can be framed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wire {
    /// One unmasked WebSocket data frame (server to client).
    WsServer,
    /// A 4-byte big-endian length, then the payload (Unix clients).
    LenPrefix,
}

impl Wire {
    /// The header that wraps `len` bytes as one binary message on this wire
    /// (on the stack: it runs per relayed message).
    #[inline]
    pub(crate) fn binary_header(self, len: usize) -> ([u8; 10], usize) {
        match self {
            Wire::WsServer => ws::header_array(ws::OP_BINARY, len),
            Wire::LenPrefix => {
                let mut h = [0u8; 10];
                h[..4].copy_from_slice(&(len as u32).to_be_bytes());
                (h, 4)
            }
        }
    }
}

/// One core's frames of one message, made on first use: a message fanned
/// out to 10 000 clients is framed once per wire format on each core.
#[derive(Debug)]
pub(crate) struct Frames<'m> {
    msg: &'m Message,
    /// Force binary for WebSocket framing (a source's `force_binary`).
    force_binary: bool,
    ws: Option<(Chunk, Option<Chunk>)>,
    lenprefix: Option<Chunk>,
}

impl<'m> Frames<'m> {
    pub(crate) fn new(msg: &'m Message, force_binary: bool) -> Self {
        Frames {
            msg,
            force_binary,
            ws: None,
            lenprefix: None,
        }
    }

    /// The frame for `wire`: one chunk, or a header and the shared payload
    /// for large messages. Clones are reference counts on this core's copy.
    pub(crate) fn get(&mut self, wire: Wire) -> (Chunk, Option<Chunk>) {
        let msg = self.msg;
        match wire {
            Wire::WsServer => {
                let binary = self.force_binary || !msg.text;
                self.ws
                    .get_or_insert_with(|| {
                        let op = if binary { ws::OP_BINARY } else { ws::OP_TEXT };
                        framed(msg, |out, len| ws::encode_header(out, op, true, len))
                    })
                    .clone()
            }
            Wire::LenPrefix => {
                let c = self.lenprefix.get_or_insert_with(|| {
                    let mut f = Vec::with_capacity(msg.bytes.len() + 4);
                    lenprefix::encode(&mut f, &msg.bytes);
                    Chunk::Shared(Arc::from(f))
                });
                (c.clone(), None)
            }
        }
    }
}

/// Header plus payload: one core-local frame for small messages, else a
/// header chunk and the message's own shared bytes.
fn framed(msg: &Message, header: impl Fn(&mut Vec<u8>, usize)) -> (Chunk, Option<Chunk>) {
    let len = msg.bytes.len();
    let mut f = Vec::with_capacity(if len < SHARE_ACROSS_CORES {
        len + 10
    } else {
        10
    });
    header(&mut f, len);
    if len < SHARE_ACROSS_CORES {
        f.extend_from_slice(&msg.bytes);
        (Chunk::Shared(Arc::from(f)), None)
    } else {
        (
            Chunk::Shared(Arc::from(f)),
            Some(Chunk::Shared(msg.bytes.clone())),
        )
    }
}

/// What a fan-out does to each selected connection.
#[derive(Debug, Clone)]
pub enum FanOp {
    /// Queue the message.
    Send,
    /// Queue the message (if any), then say goodbye (WebSocket: 1000
    /// "Closed by server").
    Close,
    /// Apply tag changes (an empty value deletes).
    SetTags(Arc<Vec<(String, String)>>),
    /// Report the connection's id and tags (JSON objects if `json`).
    Status {
        /// JSON objects instead of `id=.. k=v` lines.
        json: bool,
    },
}

/// Where a core reports how many connections a fan-out touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTo {
    /// The core holding the admin request.
    pub core: u16,
    /// Its request number on that core.
    pub req: u64,
}

/// One operation for many connections, evaluated by each core on its own
/// indexes.
#[derive(Debug, Clone)]
pub struct Fanout {
    /// Who it applies to.
    pub selector: Arc<Selector>,
    /// The message (None: nothing to send).
    pub msg: Option<Message>,
    /// WebSocket clients get it as binary whatever its kind.
    pub force_binary: bool,
    /// A connection that must not receive it (the sender).
    pub exclude: Option<ConnId>,
    /// What to do.
    pub op: FanOp,
    /// Report the count (and status text) here.
    pub reply: Option<ReplyTo>,
}

/// An admin request that needs every core: the admin connection's core
/// fans it out once per core and answers `conn` once all have replied.
#[derive(Debug)]
pub(crate) struct AdminCall {
    /// The admin connection.
    pub conn: ConnId,
    /// Target connections.
    pub selector: Arc<Selector>,
    /// The message to send, if any.
    pub msg: Option<Message>,
    pub op: FanOp,
    /// Keep the HTTP connection open after answering.
    pub keep_alive: bool,
}
