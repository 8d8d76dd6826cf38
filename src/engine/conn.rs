//! One connection's state, owned by value in its core's slab.
//!
//! LIFECYCLE
//! 1. accept (`Core::accept`): TCP_NODELAY, registered edge-triggered for
//!    read and write, its first deadline armed, `connections` gauge up. A
//!    RELY listener starts it as [`Proto::Rely`]; a WebSocket listener as
//!    [`Proto::Handshake`].
//! 2. read (`Core::read_ready`): read into the core's scratch buffer until a
//!    short read or `WouldBlock` (or the per-iteration budget), and hand the
//!    bytes to the protocol adapter of its stage (`engine::rely`,
//!    `engine::ws`). Adapters decode in place and turn frames into routing
//!    actions; a partial frame is the only input state kept here. The
//!    handshake stage is consumed by value into the WebSocket stage.
//! 3. deliver: bytes for this connection arrive from its own core (local
//!    action list, or its own replies such as pongs) or another (mesh
//!    `Deliver`, generation checked), and are admitted by [`admit`] under the
//!    byte limit and the slow-consumer policy. Queuing marks the connection
//!    dirty.
//! 4. flush (`Core::flush_dirty`): once per loop iteration, one `writev`
//!    run per dirty connection until empty or `WouldBlock`; a writable event
//!    re-arms it.
//! 5. closing (`Conn::closing`): a connection that must say goodbye (an HTTP
//!    error, a WebSocket close frame) stops reading, and closes once its
//!    output is flushed or at its closing deadline.
//! 6. close (`Core::close`): for a reason: unregistered from the directory
//!    only if it still holds the id's epoch, timer cancelled, removed from
//!    the slab, socket dropped, counted and logged at debug level.

use std::net::SocketAddr;

use super::outbox::Outbox;
use super::stream::Stream;
use crate::config::SlowConsumer;
use crate::protocol::{rely, ws};

/// A client id held by a connection.
#[derive(Debug)]
pub struct Login {
    /// The client id.
    pub id: Box<[u8]>,
    /// The directory epoch of this login.
    pub epoch: u64,
}

/// Why a connection closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer closed or reset.
    PeerClosed,
    /// A socket error.
    IoError,
    /// A malformed frame or request.
    Protocol,
    /// A transfer before login.
    NotLoggedIn,
    /// FromClientID differs from the login id.
    Spoofed,
    /// A newer login took the id.
    Kicked,
    /// No frame within the idle timeout.
    Idle,
    /// The WebSocket upgrade did not complete in time.
    HandshakeTimeout,
    /// A ping went unanswered.
    PingTimeout,
    /// The closing handshake completed (or its deadline passed).
    Closed,
    /// Output queue over its limit with the `disconnect` policy.
    SlowConsumer,
    /// Server shutdown.
    Shutdown,
}

/// Result of offering bytes to a connection's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    /// Queued; flush it this iteration.
    Yes,
    /// Dropped by the `drop` policy.
    Dropped,
    /// Over the limit with the `disconnect` policy: close the connection.
    Disconnect,
}

/// May `len` more bytes enter `out` under `limit`? A message is always
/// accepted into an empty queue, so one maximal frame fits whatever the
/// limit.
#[inline]
pub fn admit(
    out: &Outbox,
    len: usize,
    limit: usize,
    max_msgs: usize,
    policy: SlowConsumer,
) -> Queued {
    if !out.is_empty() && (out.bytes() + len > limit || out.len() >= max_msgs) {
        match policy {
            SlowConsumer::Drop => Queued::Dropped,
            SlowConsumer::Disconnect => Queued::Disconnect,
        }
    } else {
        Queued::Yes
    }
}

/// RELY stage.
#[derive(Debug, Default)]
pub struct RelyState {
    /// Partial-frame state.
    pub decoder: rely::Decoder,
}

/// HTTP upgrade stage of a WebSocket listener's connection.
#[derive(Debug)]
pub struct Handshake {
    /// The request head so far (capped).
    pub buf: Vec<u8>,
    /// Tick by which the upgrade must complete.
    pub deadline: u64,
    /// Set on a source's WebSocket listener: any path, clients of it.
    pub source: Option<u16>,
}

/// A Unix-socket client of an upstream source (4-byte length framing).
#[derive(Debug)]
pub struct UnixState {
    /// Partial-message state.
    pub decoder: crate::protocol::lenprefix::Decoder,
    /// The source.
    pub source: u16,
}

/// WebSocket stage.
#[derive(Debug)]
pub struct WsState {
    /// Frame and message reassembly.
    pub decoder: ws::Decoder,
    /// Index of its endpoint in the config.
    pub endpoint: usize,
    /// Its tags (key, value), sorted by key.
    pub tags: Vec<(Box<str>, Box<str>)>,
    /// Tick of the next server ping (u64::MAX: none).
    pub next_ping: u64,
    /// Tick of the unanswered ping, if any.
    pub ping_sent: Option<u64>,
    /// Set for clients of an upstream source: their messages go upstream.
    pub source: Option<u16>,
    /// For `on_message: broadcast`: the connections sharing this one's
    /// `broadcast_tag` value (None: it has no such tag).
    pub broadcast: Option<std::sync::Arc<super::tags::Selector>>,
}

/// The protocol stage.
#[derive(Debug)]
pub enum Proto {
    /// A RELY client.
    Rely(RelyState),
    /// A WebSocket listener's connection before the upgrade.
    Handshake(Handshake),
    /// A WebSocket client.
    Ws(WsState),
    /// An admin API client.
    Admin(super::admin::AdminState),
    /// A Unix-socket client of an upstream source.
    Unix(UnixState),
    /// The connection to an upstream source.
    Upstream(super::source::UpstreamState),
}

/// A connection on its way out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closing {
    /// Why.
    pub reason: CloseReason,
    /// Tick by which it closes even if output is still queued.
    pub by: u64,
    /// After the goodbye is flushed, half-close and read (discarding) until
    /// the peer closes or `by`: closing with unread input would send a reset
    /// that can destroy an HTTP error response before the client reads it.
    pub linger: bool,
    /// The write side has been shut down (lingering).
    pub shut: bool,
}

/// Deadlines in ticks, from the config.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timing {
    /// RELY idle timeout.
    pub rely_idle: Option<u64>,
    /// WebSocket ping interval.
    pub ws_ping: Option<u64>,
    /// WebSocket pong deadline.
    pub ws_pong: u64,
    /// WebSocket idle timeout.
    pub ws_idle: Option<u64>,
    /// WebSocket handshake deadline.
    pub ws_handshake: u64,
    /// Admin connection idle timeout.
    pub admin_idle: u64,
}

/// Ticks a closing connection may spend flushing its goodbye.
pub const CLOSE_GRACE_TICKS: u64 = 20;

/// A connection.
#[derive(Debug)]
pub struct Conn {
    /// Generation (see `ConnId`).
    pub gen: u64,
    /// The socket.
    pub stream: Stream,
    /// Peer address, for logs.
    pub peer: SocketAddr,
    /// Protocol stage.
    pub proto: Proto,
    /// Client id, once it has one (RELY login, WebSocket id).
    pub login: Option<Login>,
    /// Output queue.
    pub out: Outbox,
    /// Output queue byte limit.
    pub out_limit: usize,
    /// What happens over the limit.
    pub policy: SlowConsumer,
    /// Queued messages allowed (Veylor's max_queue_size; usize::MAX: none).
    pub out_max_msgs: usize,
    /// Edge-triggered readiness remembered until drained.
    pub readable: bool,
    /// The peer's FIN (or an error) was seen: read until the end even after
    /// a short read, because no further edge will come.
    pub read_closed: bool,
    /// The socket can take bytes.
    pub writable: bool,
    /// Listed in the core's ready list.
    pub in_ready: bool,
    /// Listed in the core's dirty (to flush) list.
    pub in_dirty: bool,
    /// Tick of the last complete frame.
    pub last_active: u64,
    /// Wheel slot and due tick of this connection's timer, if armed.
    pub timer: Option<(u32, u64)>,
    /// Set once the connection is on its way out.
    pub closing: Option<Closing>,
}

impl Conn {
    /// A freshly accepted connection.
    pub fn new(gen: u64, stream: Stream, peer: SocketAddr, proto: Proto, now: u64) -> Self {
        Conn {
            gen,
            stream,
            peer,
            proto,
            login: None,
            out: Outbox::default(),
            out_limit: usize::MAX,
            policy: SlowConsumer::Disconnect,
            out_max_msgs: usize::MAX,
            readable: false,
            read_closed: false,
            writable: true,
            in_ready: false,
            in_dirty: false,
            last_active: now,
            timer: None,
            closing: None,
        }
    }

    /// Starts closing: stop reading; close once flushed or by `now + grace`.
    pub fn begin_closing(&mut self, reason: CloseReason, now: u64) {
        if self.closing.is_none() {
            self.closing = Some(Closing {
                reason,
                by: now + CLOSE_GRACE_TICKS,
                linger: matches!(self.proto, Proto::Handshake(_) | Proto::Admin(_)),
                shut: false,
            });
        }
    }

    /// Sends a WebSocket close frame (bypassing the byte limit: it is tiny
    /// and final) and starts closing. Anything not yet on the wire is
    /// dropped first if `discard_queued` (a slow consumer).
    pub fn ws_close(
        &mut self,
        code: u16,
        reason: &str,
        why: CloseReason,
        now: u64,
        discard_queued: bool,
    ) {
        if self.closing.is_some() {
            return;
        }
        if discard_queued {
            self.out.truncate_unstarted();
        }
        let mut f = Vec::with_capacity(4 + reason.len());
        ws::encode_close(&mut f, code, reason);
        self.out.push_bytes(&[&f]);
        self.begin_closing(why, now);
    }

    /// The tick at which this connection's timer must next fire.
    pub fn due(&self, t: &Timing) -> Option<u64> {
        if let Some(c) = self.closing {
            return Some(c.by);
        }
        match &self.proto {
            Proto::Rely(_) => t.rely_idle.map(|i| self.last_active + i),
            Proto::Handshake(h) => Some(h.deadline),
            Proto::Admin(_) => Some(self.last_active + t.admin_idle),
            Proto::Unix(_) => None,
            Proto::Upstream(u) => match &u.stage {
                super::source::UpStage::Open {
                    next_ping,
                    ping_sent,
                    ..
                } => match ping_sent {
                    Some(sent) => Some(sent + t.ws_pong),
                    None => (*next_ping != u64::MAX).then_some(*next_ping),
                },
                _ => Some(u.deadline),
            },
            Proto::Ws(w) => {
                let mut due = match w.ping_sent {
                    Some(sent) => sent + t.ws_pong,
                    None => w.next_ping,
                };
                if let Some(i) = t.ws_idle {
                    due = due.min(self.last_active + i);
                }
                (due != u64::MAX).then_some(due)
            }
        }
    }
}
