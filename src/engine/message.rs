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

    /// The compressed frame, if compressing pays.
    fn deflate(&mut self, codec: &mut CoreCodec) -> Option<Framed> {
        let msg = self.msg;
        if msg.bytes.len() < self.min_deflate {
            return None;
        }
        let mut z = codec.take_buf();
        let ok = codec.deflater().message(&msg.bytes, &mut z, true) && z.len() < msg.bytes.len();
        let framed = ok.then(|| {
            let op = if self.force_binary || !msg.is_text() {
                ws::OP_BINARY
            } else {
                ws::OP_TEXT
            };
            let mut f = Vec::with_capacity(z.len() + 10);
            push_compressed_frame(&mut f, op, &z);
            self.work = Some((msg.bytes.len(), z.len()));
            Framed::one(f)
        });
        codec.put_buf(z);
        framed
    }

    /// The frame for `wire` (`codec` compresses for [`Wire::WsDeflate`]).
    #[inline]
    pub(crate) fn get(&mut self, wire: Wire, codec: &mut CoreCodec) -> &Framed {
        let msg = self.msg;
        match wire {
            Wire::WsDeflate => {
                let f = match self.deflated.take() {
                    Some(f) => f,
                    None => match self.deflate(codec) {
                        Some(f) => f,
                        None => self.get(Wire::WsServer, codec).clone(),
                    },
                };
                self.deflated.insert(f)
            }
            Wire::WsServer | Wire::WsOwn => {
                let binary = self.force_binary || !msg.is_text();
                self.ws.get_or_insert_with(|| {
                    let op = if binary { ws::OP_BINARY } else { ws::OP_TEXT };
                    framed(msg, |out, len| ws::encode_header(out, op, true, len))
                })
            }
            Wire::LenPrefix => self.lenprefix.get_or_insert_with(|| {
                let mut f = Vec::with_capacity(msg.bytes.len() + 4);
                lenprefix::encode(&mut f, &msg.bytes);
                Framed::one(f)
            }),
            Wire::VeltixV3 => {
                let (flags, ty, id) = match msg.kind {
                    Kind::Veltix {
                        ty,
                        flags,
                        request_id,
                    } => (flags, ty, request_id),
                    _ => (0, veltix::USER_TYPES, veltix::v3::SERVER_IDS),
                };
                self.veltix_v3.get_or_insert_with(|| {
                    let h = veltix::v3::header(flags, ty, id, &msg.bytes);
                    framed(msg, |out, _| out.extend_from_slice(&h))
                })
            }
            Wire::VeltixV1 => self.veltix_v1.get_or_insert_with(|| {
                let mut f = Vec::with_capacity(msg.bytes.len() + veltix::v1::HEADER);
                match msg.kind {
                    Kind::VeltixV1Frame => f.extend_from_slice(&msg.bytes),
                    _ => veltix::v1::encode(&mut f, veltix::USER_TYPES, &msg.bytes, unix_ms()),
                }
                Framed::one(f)
            }),
        }
    }
}

/// Unix time in milliseconds (Veltix v1 timestamps).
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Header plus payload: one core-local frame for small messages, else a
/// header and the message's own shared bytes.
fn framed(msg: &Message, header: impl Fn(&mut Vec<u8>, usize)) -> Framed {
    let len = msg.bytes.len();
    let small = len < SHARE_ACROSS_CORES;
    let mut f = Vec::with_capacity(if small { len + 16 } else { 16 });
    header(&mut f, len);
    if small {
        f.extend_from_slice(&msg.bytes);
        return Framed::one(f);
    }
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
