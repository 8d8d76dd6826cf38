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

use super::adapter::deflate::push_compressed_frame;
use super::outbox::{Chunk, Outbox};
use super::tags::Selector;
use super::ConnId;
use crate::protocol::deflate::CoreCodec;
use crate::protocol::{lenprefix, veltix, ws};

/// Frames at least this large are queued as a small per-core header plus
/// the message bytes shared by reference across cores, rather than copied
/// into one frame per core (the copy would cost more than the contended
/// reference count).
pub(crate) const SHARE_ACROSS_CORES: usize = 64 * 1024;

/// What a message is, besides its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// UTF-8 text.
    Text,
    /// Bytes.
    Binary,
    /// A Veltix v3 message: its type code and flags, and the request id it
    /// goes out with.
    Veltix {
        /// Type code.
        ty: u16,
        /// Flags.
        flags: u8,
        /// Request id.
        request_id: u16,
    },
    /// A whole Veltix v1 frame, forwarded byte for byte.
    VeltixV1Frame,
}

/// A message: bytes plus kind, in no wire format.
#[derive(Debug, Clone)]
pub struct Message {
    /// What it is.
    pub kind: Kind,
    /// The payload, shared by every core that frames it.
    pub bytes: Arc<[u8]>,
}

impl Message {
    /// A text or binary message holding a copy of `bytes`.
    pub fn new(text: bool, bytes: &[u8]) -> Message {
        let kind = if text { Kind::Text } else { Kind::Binary };
        Message::with_kind(kind, bytes)
    }

    /// A message of `kind` holding a copy of `bytes`.
    pub fn with_kind(kind: Kind, bytes: &[u8]) -> Message {
        Message {
            kind,
            bytes: Arc::from(bytes),
        }
    }

    /// Text (else some kind of binary).
    pub fn is_text(&self) -> bool {
        self.kind == Kind::Text
    }
}

/// The wire formats a message can be framed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wire {
    /// One unmasked WebSocket data frame (server to client).
    WsServer,
    /// The same, compressed without context (RSV1) when that is smaller:
    /// permessage-deflate `shared`, compressed once per core.
    WsDeflate,
    /// Framed by the connection itself through its own compression
    /// context (permessage-deflate `dedicated`); never cached.
    WsOwn,
    /// A 4-byte big-endian length, then the payload (Unix clients).
    LenPrefix,
    /// A Veltix v3 frame.
    VeltixV3,
    /// A Veltix v1 frame.
    VeltixV1,
}

impl Wire {
    /// The header that wraps `len` bytes as one binary message on this wire
    /// (on the stack: it runs per relayed message).
    #[inline]
    pub(crate) fn binary_header(self, len: usize) -> ([u8; 10], usize) {
        match self {
            // A RELY transfer goes out uncompressed, whatever was agreed.
            Wire::WsServer | Wire::WsDeflate | Wire::WsOwn => ws::header_array(ws::OP_BINARY, len),
            Wire::LenPrefix => {
                let mut h = [0u8; 10];
                h[..4].copy_from_slice(&(len as u32).to_be_bytes());
                (h, 4)
            }
            // No Veltix client holds an id, so no transfer is wrapped for
            // one; its frames carry checksums of the content anyway.
            Wire::VeltixV3 | Wire::VeltixV1 => ([0; 10], 0),
        }
    }
}

/// One message framed for one wire on one core: one buffer, or (large
/// messages) a header and the message's own shared bytes.
#[derive(Debug, Clone)]
pub(crate) struct Framed {
    head: Arc<[u8]>,
    tail: Option<Arc<[u8]>>,
}

impl Framed {
    fn one(v: Vec<u8>) -> Framed {
        Framed {
            head: Arc::from(v),
            tail: None,
        }
    }

    /// Bytes on the wire.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.head.len() + self.tail.as_ref().map_or(0, |t| t.len())
    }

    /// Queues it by reference (a reference count on this core's copy).
    #[inline]
    pub(crate) fn push_to(&self, out: &mut Outbox) {
        out.push(Chunk::Shared(self.head.clone()));
        if let Some(t) = &self.tail {
            out.push(Chunk::Shared(t.clone()));
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
    ws: Option<Framed>,
    /// The compressed frame, or the plain one when compressing does not pay.
    deflated: Option<Framed>,
    /// Shorter messages are not compressed.
    min_deflate: usize,
    /// The compressor's (input, output) bytes, if it ran and paid.
    work: Option<(usize, usize)>,
    lenprefix: Option<Framed>,
    veltix_v3: Option<Framed>,
    veltix_v1: Option<Framed>,
}

impl<'m> Frames<'m> {
    pub(crate) fn new(msg: &'m Message, force_binary: bool, min_deflate: usize) -> Self {
        Frames {
            msg,
            force_binary,
            ws: None,
            deflated: None,
            min_deflate,
            work: None,
            lenprefix: None,
            veltix_v3: None,
            veltix_v1: None,
        }
    }

    /// The compressor's (input, output) bytes for this message on this core,
    /// if its compressed frame is in use.
    pub(crate) fn work(&self) -> Option<(usize, usize)> {
        self.work
    }

    /// The frame for `wire` (`codec` compresses for [`Wire::WsDeflate`]).
    #[inline]
    pub(crate) fn get(&mut self, wire: Wire, codec: &mut CoreCodec) -> &Framed {
        let (msg, fb, min) = (self.msg, self.force_binary, self.min_deflate);
        let big = msg.bytes.len() >= SHARE_ACROSS_CORES;
        let one = |codec: &mut CoreCodec, work: &mut Option<(usize, usize)>| {
            let mut f = Vec::with_capacity(msg.bytes.len() + 16);
            *work = append_frame(msg, fb, wire, min, codec, &mut f);
            Framed::one(f)
        };
        let mut work = None;
        let slot = match wire {
            Wire::WsDeflate => &mut self.deflated,
            Wire::WsServer | Wire::WsOwn => &mut self.ws,
            Wire::LenPrefix => &mut self.lenprefix,
            Wire::VeltixV3 => &mut self.veltix_v3,
            Wire::VeltixV1 => &mut self.veltix_v1,
        };
        let f = slot.get_or_insert_with(|| match wire {
            // A large message's bytes are shared, not copied, behind a
            // header of its own.
            Wire::WsServer | Wire::WsOwn if big => {
                let op = ws_opcode(msg, fb);
                framed_tail(msg, |out| ws::encode_header(out, op, true, msg.bytes.len()))
            }
            Wire::VeltixV3 if big => {
                let (flags, ty, id) = veltix_fields(msg);
                framed_tail(msg, |out| {
                    out.extend_from_slice(&veltix::v3::header(flags, ty, id, &msg.bytes))
                })
            }
            _ => one(codec, &mut work),
        });
        if work.is_some() {
            self.work = work;
        }
        f
    }
}

/// The WebSocket opcode `msg` goes out with.
#[inline]
fn ws_opcode(msg: &Message, force_binary: bool) -> u8 {
    if force_binary || !msg.is_text() {
        ws::OP_BINARY
    } else {
        ws::OP_TEXT
    }
}

/// A Veltix v3 frame's (flags, type, request id) for `msg`.
fn veltix_fields(msg: &Message) -> (u8, u16, u16) {
    match msg.kind {
        Kind::Veltix {
            ty,
            flags,
            request_id,
        } => (flags, ty, request_id),
        _ => (0, veltix::USER_TYPES, veltix::v3::SERVER_IDS),
    }
}

/// Appends `msg` framed whole for `wire` to `out`. [`Wire::WsDeflate`]
/// compresses messages of at least `min_deflate` bytes and keeps the
/// compressed frame when it is smaller; it then returns the compressor's
/// (input, output) bytes. [`Wire::WsOwn`] is framed plain here (its
/// connections compress through their own context).
pub(crate) fn append_frame(
    msg: &Message,
    force_binary: bool,
    wire: Wire,
    min_deflate: usize,
    codec: &mut CoreCodec,
    out: &mut Vec<u8>,
) -> Option<(usize, usize)> {
    let b = &msg.bytes;
    match wire {
        Wire::WsDeflate if b.len() >= min_deflate => {
            let mut z = codec.take_buf();
            let ok = codec.deflater().message(b, &mut z, true) && z.len() < b.len();
            let work = ok.then(|| {
                push_compressed_frame(out, ws_opcode(msg, force_binary), &z);
                (b.len(), z.len())
            });
            codec.put_buf(z);
            if work.is_some() {
                return work;
            }
            ws::encode_header(out, ws_opcode(msg, force_binary), true, b.len());
            out.extend_from_slice(b);
        }
        Wire::WsServer | Wire::WsOwn | Wire::WsDeflate => {
            ws::encode_header(out, ws_opcode(msg, force_binary), true, b.len());
            out.extend_from_slice(b);
        }
        Wire::LenPrefix => lenprefix::encode(out, b),
        Wire::VeltixV3 => {
            let (flags, ty, id) = veltix_fields(msg);
            out.extend_from_slice(&veltix::v3::header(flags, ty, id, b));
            out.extend_from_slice(b);
        }
        Wire::VeltixV1 => match msg.kind {
            Kind::VeltixV1Frame => out.extend_from_slice(b),
            _ => veltix::v1::encode(out, veltix::USER_TYPES, b, unix_ms()),
        },
    }
    None
}

/// Unix time in milliseconds (Veltix v1 timestamps).
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A header of its own, then the message's shared bytes (large messages:
/// no copy per core).
fn framed_tail(msg: &Message, header: impl Fn(&mut Vec<u8>)) -> Framed {
    let mut f = Vec::with_capacity(16);
    header(&mut f);
    Framed {
        head: Arc::from(f),
        tail: Some(msg.bytes.clone()),
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
    /// Ask every node of the cluster too (if there is one).
    pub all_nodes: bool,
}
