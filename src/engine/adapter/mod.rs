//! The stage contract: what every protocol stage of a connection does, and
//! the [`Stage`] enum that dispatches to them (no `Box<dyn>`: stages live by
//! value in the slab and the match is a jump). The core calls only these
//! methods; it has no per-protocol code.
//!
//! Every stage:
//! - takes bytes (`on_bytes`) and answers with an [`Outcome`];
//! - says when its timer is due (`due`) and what a passed deadline means
//!   (`on_deadline`);
//! - says goodbye in its own way (`goodbye`: a kick, a slow consumer, an
//!   admin close) and at shutdown (`on_drain`);
//! - leaves every index it joined when the connection closes (`on_close`);
//! - names the wire a fanned-out message is framed in for it (`wire`).
//!
//! Adding a protocol: a codec in `protocol/`, a stage file here, a variant
//! in [`Stage`] with one line per method below, a config section, and a row
//! in the server's listener table.

pub(crate) mod admin;
pub(crate) mod deflate;
pub(crate) mod handshake;
pub(crate) mod rely;
pub(crate) mod session;
pub(crate) mod unix;
pub(crate) mod upstream;
pub(crate) mod veltix;
pub(crate) mod ws;

use super::admin_calls::Answer as AdminAnswer;
use super::io::{CloseReason, Io, Limits};
use super::listener::ListenerKind;
use super::message::{FanOp, Wire};
use super::redis::{Answer, JoinState};
use super::route::Ctx;
use super::timer::Timing;
use super::ConnId;
use crate::config::Config;

/// What a stage asks of the core after an event.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Go on (it may have queued output or started closing itself).
    Continue,
    /// Close now, for this reason.
    Close(CloseReason),
    /// Replace the stage with this one, then feed it these bytes (what
    /// followed the old stage's last message in the same read).
    Upgrade(Stage, Vec<u8>),
    /// Waiting for an answer from elsewhere: read nothing more until it
    /// comes (an admin request in flight).
    Await,
}

/// A connection's protocol stage.
#[derive(Debug)]
pub(crate) enum Stage {
    Rely(rely::RelyStage),
    Handshake(handshake::HandshakeStage),
    Ws(ws::WsStage),
    Admin(admin::AdminStage),
    Unix(unix::UnixStage),
    /// Boxed: a handful per server, and the largest stage after the
    /// WebSocket one (every connection's slab entry is the largest stage's size).
    Upstream(Box<upstream::UpstreamStage>),
    /// Boxed: its decoders and keepalive make it the largest stage, and a
    /// Veltix client pays for that rather than every connection.
    Veltix(Box<veltix::VeltixStage>),
    /// A wsproxy session between its request head and its 101.
    Session(Box<session::SessionOpen>),
}

/// Calls `$method` on whichever stage this is.
macro_rules! each {
    ($self:expr, $s:ident => $e:expr) => {
        match $self {
            Stage::Rely($s) => $e,
            Stage::Handshake($s) => $e,
            Stage::Ws($s) => $e,
            Stage::Admin($s) => $e,
            Stage::Unix($s) => $e,
            Stage::Upstream($s) => $e,
            Stage::Veltix($s) => $e,
            Stage::Session($s) => $e,
        }
    };
}

impl Stage {
    /// The first stage of a connection accepted on a `kind` listener, and
    /// its output limits.
    pub(crate) fn accepted(
        kind: ListenerKind,
        cfg: &Config,
        t: &Timing,
        now: u64,
    ) -> (Stage, Limits) {
        match kind {
            ListenerKind::Rely => rely::RelyStage::accepted(cfg),
            ListenerKind::WebSocket => handshake::HandshakeStage::accepted(t, now, None),
            ListenerKind::SourceWs(src) => handshake::HandshakeStage::accepted(t, now, Some(src)),
            ListenerKind::SourceUnix(src) => unix::UnixStage::accepted(cfg, src),
            ListenerKind::Admin => admin::AdminStage::accepted(),
            ListenerKind::Veltix(l) => veltix::VeltixStage::accepted(cfg, l, now),
        }
    }

    /// The output limits this stage's connection takes under `cfg` after a
    /// reload (None: keep `now`, e.g. the server's own connections and
    /// those still in a handshake, which take theirs when they open).
    pub(crate) fn limits(&self, cfg: &Config, now: Limits) -> Option<Limits> {
        if now.bytes == usize::MAX {
            return None;
        }
        let ws = cfg.ws();
        let queue = u32::try_from(cfg.performance.max_queue_size).unwrap_or(u32::MAX);
        match self {
            Stage::Rely(_) => Some(Limits {
                bytes: cfg.rely.max_output_bytes,
                msgs: u32::MAX,
                policy: cfg.rely.slow_consumer,
            }),
            // Veylor's message count applies to sources' clients only.
            Stage::Ws(_) | Stage::Unix(_) | Stage::Veltix(_) => Some(Limits {
                bytes: ws.max_output_bytes,
                msgs: if now.msgs == u32::MAX {
                    u32::MAX
                } else {
                    queue
                },
                policy: ws.slow_consumer,
            }),
            // Client messages waiting for the source: dropped over the
            // limit, whatever the policy for clients.
            Stage::Upstream(_) => Some(Limits {
                bytes: ws.max_output_bytes,
                ..now
            }),
            Stage::Handshake(_) | Stage::Admin(_) | Stage::Session(_) => None,
        }
    }

    /// The upstream source this connection belongs to: its feed, its
    /// clients, and upgrades on its listener.
    pub(crate) fn source(&self) -> Option<u16> {
        match self {
            Stage::Ws(s) => s.source(),
            Stage::Handshake(s) => s.source(),
            Stage::Unix(s) => Some(s.source()),
            Stage::Upstream(s) => Some(s.source()),
            _ => None,
        }
    }

    /// The protocol, for log lines.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Stage::Rely(_) => "rely",
            Stage::Handshake(_) => "websocket-upgrade",
            Stage::Ws(_) => "websocket",
            Stage::Admin(_) => "admin",
            Stage::Unix(_) => "unix",
            Stage::Upstream(_) => "upstream",
            Stage::Veltix(_) => "veltix",
            Stage::Session(_) => "wsproxy-upgrade",
        }
    }

    /// The connection is in the slab as `me`: join what it belongs to, and
    /// speak first where the protocol does (a Veltix v3 server's hello).
    pub(crate) fn on_open(&mut self, io: &mut Io, me: ConnId, cx: &mut Ctx<'_>) -> Outcome {
        match self {
            Stage::Unix(s) => {
                s.on_open(me, cx);
                Outcome::Continue
            }
            Stage::Veltix(s) => s.on_open(io, me, cx),
            _ => Outcome::Continue,
        }
    }

    /// Bytes read from the socket (decoded in place).
    #[inline]
    pub(crate) fn on_bytes(
        &mut self,
        io: &mut Io,
        me: ConnId,
        input: &mut [u8],
        cx: &mut Ctx<'_>,
    ) -> Outcome {
        each!(self, s => s.on_bytes(io, me, input, cx))
    }

    /// Has the stage work left from an earlier read, or must it not read
    /// yet? Then the core calls [`Stage::resume`] before reading.
    #[inline]
    pub(crate) fn wants_resume(&self) -> bool {
        match self {
            Stage::Admin(s) => s.wants_resume(),
            Stage::Session(_) => true,
            _ => false,
        }
    }

    /// Before reading: work left from an earlier read (pipelined admin
    /// requests), or `Await` if the stage must not read yet.
    #[inline]
    pub(crate) fn resume(&mut self, io: &mut Io, me: ConnId, cx: &mut Ctx<'_>) -> Outcome {
        match self {
            Stage::Admin(s) => s.resume(io, me, cx),
            // Nothing is read until Redis has answered.
            Stage::Session(_) => Outcome::Await,
            _ => Outcome::Continue,
        }
    }

    /// Is this connection still read while the server drains? (Only the
    /// admin API is, for /ready.)
    pub(crate) fn reads_while_draining(&self) -> bool {
        matches!(self, Stage::Admin(_))
    }

    /// The tick at which `on_deadline` has something to do.
    pub(crate) fn due(&self, io: &Io, t: &Timing) -> Option<u64> {
        each!(self, s => s.due(io, t))
    }

    /// A deadline passed.
    pub(crate) fn on_deadline(&mut self, io: &mut Io, me: ConnId, cx: &mut Ctx<'_>) -> Outcome {
        each!(self, s => s.on_deadline(io, me, cx))
    }

    /// The server begins to drain: say goodbye where the protocol has a way.
    pub(crate) fn on_drain(&mut self, io: &mut Io, now: u64) -> Outcome {
        match self {
            Stage::Ws(s) => s.goodbye(io, CloseReason::Shutdown, now),
            Stage::Handshake(_) | Stage::Session(_) => Outcome::Close(CloseReason::Shutdown),
            Stage::Upstream(s) => s.on_drain(io, now),
            Stage::Rely(_) | Stage::Admin(_) | Stage::Unix(_) | Stage::Veltix(_) => {
                Outcome::Continue
            }
        }
    }

    /// The connection must go for `why` (a newer login, a slow consumer, an
    /// admin close): with a goodbye on the wire where the protocol has one.
    pub(crate) fn goodbye(&mut self, io: &mut Io, why: CloseReason, now: u64) -> Outcome {
        match self {
            Stage::Ws(s) => s.goodbye(io, why, now),
            _ => Outcome::Close(why),
        }
    }

    /// The connection closes: leave every index the stage joined.
    pub(crate) fn on_close(&mut self, io: &Io, me: ConnId, cx: &mut Ctx<'_>) {
        match self {
            Stage::Ws(s) => s.on_close(io, me, cx),
            Stage::Unix(s) => s.on_close(me, cx),
            Stage::Veltix(s) => s.on_close(me, cx),
            Stage::Session(s) => s.on_close(me, cx),
            _ => {}
        }
    }

    /// The wire a fanned-out message is framed in for this stage (None: it
    /// takes no messages).
    #[inline]
    pub(crate) fn wire(&self) -> Option<Wire> {
        match self {
            Stage::Ws(s) => Some(s.wire()),
            Stage::Unix(_) => Some(Wire::LenPrefix),
            Stage::Veltix(s) => s.wire(),
            _ => None,
        }
    }

    /// A fanned-out message framed by the stage itself ([`Wire::WsOwn`]:
    /// through its own compression context); empty for other stages.
    pub(crate) fn own_frame(
        &mut self,
        msg: &crate::engine::message::Message,
        force_binary: bool,
        cx: &mut Ctx<'_>,
    ) -> Vec<u8> {
        match self {
            Stage::Ws(s) => s.own_frame(msg, force_binary, cx),
            _ => Vec::new(),
        }
    }

    /// The wire a RELY transfer frame is wrapped in for this stage (None:
    /// as it is, byte for byte).
    #[inline]
    pub(crate) fn transfer_wire(&self) -> Option<Wire> {
        match self {
            Stage::Ws(_) => Some(Wire::WsServer),
            _ => None,
        }
    }

    /// An admin fan-out operation other than sending: tag changes and
    /// status lines. Returns whether the connection was touched.
    pub(crate) fn admin_op(
        &mut self,
        io: &mut Io,
        me: ConnId,
        op: &FanOp,
        cx: &mut Ctx<'_>,
        out: &mut Vec<u8>,
    ) -> bool {
        match (self, op) {
            (Stage::Ws(s), FanOp::SetTags(changes)) => s.set_tags(io, me, changes, cx),
            (Stage::Ws(s), FanOp::Status { json }) => s.status(io, me, *json, out, cx),
            _ => false,
        }
    }

    /// An answer for a request this stage waits on.
    pub(crate) fn on_answer(&mut self, io: &mut Io, a: AdminAnswer, now: u64) -> Outcome {
        match self {
            Stage::Admin(s) => s.on_answer(io, a, now),
            _ => Outcome::Continue,
        }
    }

    /// A Redis reply for a request this stage made (`Ctx::redis_call`).
    pub(crate) fn on_redis(
        &mut self,
        io: &mut Io,
        me: ConnId,
        tag: u8,
        a: Answer,
        cx: &mut Ctx<'_>,
    ) -> Outcome {
        match self {
            Stage::Session(s) => s.on_redis(io, me, tag, a, cx),
            _ => Outcome::Continue,
        }
    }

    /// News of a Redis channel this stage joined: subscribed, on its way
    /// (with its id), or impossible.
    pub(crate) fn on_joined(
        &mut self,
        io: &mut Io,
        me: ConnId,
        state: JoinState,
        id: u32,
        cx: &mut Ctx<'_>,
    ) -> Outcome {
        match self {
            Stage::Session(s) => s.on_joined(io, me, state, id, cx),
            _ => Outcome::Continue,
        }
    }

    /// An outbound connection waiting for its connect to complete.
    pub(crate) fn awaits_connect(&self) -> bool {
        matches!(self, Stage::Upstream(s) if s.awaits_connect())
    }

    /// The outbound connect completed (the socket became writable).
    pub(crate) fn on_connected(&mut self, io: &mut Io, cx: &mut Ctx<'_>) -> Outcome {
        match self {
            Stage::Upstream(s) => s.on_connected(io, cx),
            _ => Outcome::Continue,
        }
    }

    /// A client message for the upstream this stage talks to. False if it
    /// cannot take it now (not an open upstream).
    pub(crate) fn send_upstream(&mut self, io: &mut Io, text: bool, msg: &[u8]) -> bool {
        match self {
            Stage::Upstream(s) => s.send_message(io, text, msg),
            _ => false,
        }
    }
}
