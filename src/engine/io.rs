//! [`Io`]: everything of a connection except its protocol stage. The
//! socket and what the engine remembers about it (readiness, read-closed,
//! listed for reading or flushing), the bounded output queue with its
//! slow-consumer policy, the closing state, the client id it holds and when
//! it last did something. Stages get `&mut Io` next to `&mut self`, so they
//! never destructure a connection to reach both.

use std::net::SocketAddr;

use super::metrics::Counter;
use super::outbox::{Flush, Outbox};
use super::stream::{Drain, Stream};
use super::timer::tick32;
use crate::config::SlowConsumer;

/// A client id held by a connection (shared with the directory).
pub(crate) use super::directory::Login;

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
    /// The socket took none of the queued output for `send_timeout`.
    WriteTimeout,
    /// Server shutdown.
    Shutdown,
    /// Its upstream source was removed by a reload.
    SourceRemoved,
    /// A reload changed its source's feed settings: dialled again.
    Reconfigured,
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CloseReason::PeerClosed => "peer closed",
            CloseReason::IoError => "socket error",
            CloseReason::Protocol => "protocol error",
            CloseReason::NotLoggedIn => "not logged in",
            CloseReason::Spoofed => "spoofed sender",
            CloseReason::Kicked => "replaced by a newer login",
            CloseReason::Idle => "idle",
            CloseReason::HandshakeTimeout => "handshake timeout",
            CloseReason::PingTimeout => "ping unanswered",
            CloseReason::Closed => "closed",
            CloseReason::SlowConsumer => "slow consumer",
            CloseReason::WriteTimeout => "write timeout",
            CloseReason::Shutdown => "shutdown",
            CloseReason::SourceRemoved => "source removed",
            CloseReason::Reconfigured => "reconfigured",
        })
    }
}

/// Result of offering bytes to a connection's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Queued {
    /// Queued; flush it this iteration.
    Yes,
    /// Dropped by the `drop` policy.
    Dropped,
    /// Over the limit with the `disconnect` policy: say goodbye.
    Disconnect,
}

/// A connection on its way out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Closing {
    pub reason: CloseReason,
    /// Tick by which it closes even if output is still queued.
    pub by: u32,
    /// After the goodbye is flushed, half-close and read (discarding) until
    /// the peer closes or `by`: closing with unread input would send a reset
    /// that can destroy an HTTP error response before the client reads it.
    pub linger: bool,
    /// The write side has been shut down (lingering).
    pub shut: bool,
}

/// Ticks a closing connection may spend flushing its goodbye.
pub(crate) const CLOSE_GRACE_TICKS: u64 = 20;

/// What a connection's output queue may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Queued bytes.
    pub bytes: usize,
    /// Queued messages (Veylor's max_queue_size; usize::MAX: none).
    pub msgs: u32,
    /// What happens over the limit.
    pub policy: SlowConsumer,
}

impl Limits {
    /// No limit: the server's own connections (admin answers, upstream).
    pub(crate) const NONE: Limits = Limits {
        bytes: usize::MAX,
        msgs: u32::MAX,
        policy: SlowConsumer::Disconnect,
    };
}

/// A connection's socket side.
#[derive(Debug)]
pub(crate) struct Io {
    pub stream: Stream,
    /// Peer address, for logs and the admin allow-list (see [`Io::peer`]).
    peer: Peer,
    pub out: Outbox,
    /// The output limits, packed (see [`Io::limits`]).
    limit_bytes: u32,
    limit_msgs: u32,
    policy: SlowConsumer,
    /// Client id, once it has one (RELY login, WebSocket id).
    pub login: Option<Login>,
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
    /// Tick of the last complete frame (see [`Io::last_active`]).
    last_active: u32,
    /// Set once the connection is on its way out.
    pub closing: Option<Closing>,
    /// Tick since which the socket has taken none of the queued output
    /// (NOT_STALLED: it takes what it is given); see [`Io::stalled_since`].
    stalled_since: u32,
}

const NOT_STALLED: u32 = u32::MAX;

/// A peer address in 16 bytes, not `SocketAddr`'s 32: IPv4 inline, IPv6
/// boxed (one allocation for such a client, 16 bytes less in every slab
/// entry).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Peer {
    V4([u8; 4], u16),
    V6(Box<std::net::SocketAddrV6>),
}

impl From<SocketAddr> for Peer {
    fn from(a: SocketAddr) -> Self {
        match a {
            SocketAddr::V4(a) => Peer::V4(a.ip().octets(), a.port()),
            SocketAddr::V6(a) => Peer::V6(Box::new(a)),
        }
    }
}

impl Io {
    pub(crate) fn new(stream: Stream, peer: SocketAddr, now: u64) -> Io {
        Io {
            stream,
            peer: peer.into(),
            out: Outbox::default(),
            limit_bytes: u32::MAX,
            limit_msgs: u32::MAX,
            policy: Limits::NONE.policy,
            login: None,
            readable: false,
            read_closed: false,
            writable: true,
            in_ready: false,
            in_dirty: false,
            last_active: tick32(now),
            closing: None,
            stalled_since: NOT_STALLED,
        }
    }

    /// The output queue's limits. Bytes are kept as a u32 (8 bytes less in
    /// every slab entry): a limit over 4 GiB is 4 GiB.
    #[inline]
    pub(crate) fn limits(&self) -> Limits {
        Limits {
            bytes: self.limit_bytes as usize,
            msgs: self.limit_msgs,
            policy: self.policy,
        }
    }

    /// Sets the output queue's limits.
    pub(crate) fn set_limits(&mut self, l: Limits) {
        self.limit_bytes = u32::try_from(l.bytes).unwrap_or(u32::MAX);
        self.limit_msgs = l.msgs;
        self.policy = l.policy;
    }

    /// The peer's address.
    pub(crate) fn peer(&self) -> SocketAddr {
        match &self.peer {
            Peer::V4(ip, port) => SocketAddr::from((*ip, *port)),
            Peer::V6(a) => SocketAddr::V6(**a),
        }
    }

    /// Tick since which the socket has taken none of the queued output.
    #[inline]
    pub(crate) fn stalled_since(&self) -> Option<u64> {
        (self.stalled_since != NOT_STALLED).then_some(u64::from(self.stalled_since))
    }

    /// Records whether the socket took nothing of the queued output (from
    /// `now`, unless it was already stalled) or made progress.
    #[inline]
    pub(crate) fn set_stalled(&mut self, stalled: bool, now: u64) {
        if !stalled {
            self.stalled_since = NOT_STALLED;
        } else if self.stalled_since == NOT_STALLED {
            self.stalled_since = tick32(now);
        }
    }

    /// Tick of the last complete frame.
    #[inline]
    pub(crate) fn last_active(&self) -> u64 {
        u64::from(self.last_active)
    }

    /// Marks a complete frame at `now`.
    #[inline]
    pub(crate) fn touch(&mut self, now: u64) {
        self.last_active = tick32(now);
    }

    /// May `len` more bytes enter the queue? A message is always accepted
    /// into an empty queue, so one maximal frame fits whatever the limit.
    #[inline]
    pub(crate) fn admit(&self, len: usize) -> Queued {
        admit(&self.out, len, &self.limits())
    }

    /// Queues one of the connection's own writes (an echo, a pong) under
    /// the same limits as deliveries; a write the `drop` policy refuses is
    /// counted in `dropped`. `Queued::Disconnect` asks the caller to say
    /// goodbye (a slow consumer).
    pub(crate) fn push_own(&mut self, parts: &[&[u8]], dropped: &Counter) -> Queued {
        let q = self.admit(parts.iter().map(|p| p.len()).sum());
        match q {
            Queued::Yes => self.out.push_bytes(parts),
            Queued::Dropped => dropped.inc(),
            Queued::Disconnect => {}
        }
        q
    }

    /// Starts closing: stop reading; close once flushed or by `now + grace`.
    pub(crate) fn close_after_flush(&mut self, reason: CloseReason, now: u64) {
        self.begin_closing(reason, now, false);
    }

    /// Like [`Io::close_after_flush`] for HTTP answers: linger after the
    /// flush so the peer reads the answer before the connection goes.
    pub(crate) fn close_after_answer(&mut self, reason: CloseReason, now: u64) {
        self.begin_closing(reason, now, true);
    }

    fn begin_closing(&mut self, reason: CloseReason, now: u64, linger: bool) {
        if self.closing.is_none() {
            self.closing = Some(Closing {
                reason,
                by: tick32(now + CLOSE_GRACE_TICKS),
                linger,
                shut: false,
            });
        }
    }
}

/// What a flush left to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flushed {
    /// Everything written (or a lingering goodbye half-closed).
    Done,
    /// The socket is full: a writable event re-lists the connection.
    Blocked,
    /// The goodbye is on the wire and the write side shut: read (and drop)
    /// until the peer closes.
    Lingering,
    /// Close now (the goodbye is out, or the socket failed).
    Close(CloseReason),
}

impl Io {
    /// Writes the queue (one writev run) and any TLS records still held,
    /// and says what is left to do. Returns the bytes written too.
    pub(crate) fn flush(&mut self) -> (usize, Flushed) {
        let (n, status) = match self.out.flush_to(&mut self.stream) {
            Ok(r) => r,
            Err(e) => {
                log::debug!("{}: write error: {e}", self.peer());
                return (0, Flushed::Close(CloseReason::IoError));
            }
        };
        // TLS streams may still hold encrypted bytes.
        let held = match std::io::Write::flush(&mut self.stream) {
            Ok(()) => false,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
            Err(e) => {
                log::debug!("{}: write error: {e}", self.peer());
                return (n, Flushed::Close(CloseReason::IoError));
            }
        };
        if status == Flush::WouldBlock || held {
            self.writable = false;
            self.out.settle(self.limit_msgs != u32::MAX);
            return (n, Flushed::Blocked);
        }
        let Some(closing) = self.closing.as_mut() else {
            return (n, Flushed::Done);
        };
        if !closing.linger {
            return (n, Flushed::Close(closing.reason));
        }
        if closing.shut {
            return (n, Flushed::Done);
        }
        closing.shut = true;
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        (n, Flushed::Lingering)
    }

    /// Reads and drops a lingering connection's input; a reason once the
    /// peer has closed (or the socket failed).
    pub(crate) fn discard_input(
        &mut self,
        scratch: &mut [u8],
        reads: usize,
    ) -> Option<CloseReason> {
        for _ in 0..reads {
            match self.stream.read_some(scratch) {
                Ok((_, Drain::Closed)) => return self.closing.map(|c| c.reason),
                Ok((_, Drain::More)) => {}
                Ok((n, Drain::Drained)) if n > 0 && self.read_closed => {}
                Ok((_, Drain::Drained)) => {
                    self.readable = false;
                    return None;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Some(CloseReason::IoError),
            }
        }
        None
    }
}

/// The admission rule, for callers that hold the queue apart from its
/// connection.
#[inline]
pub(crate) fn admit(out: &Outbox, len: usize, limits: &Limits) -> Queued {
    if !out.is_empty() && (out.bytes() + len > limits.bytes || out.len() >= limits.msgs as usize) {
        match limits.policy {
            SlowConsumer::Drop => Queued::Dropped,
            SlowConsumer::Disconnect => Queued::Disconnect,
        }
    } else {
        Queued::Yes
    }
}

/// An `Io` over one end of a Unix socket pair, for stage unit tests (the
/// stages never touch the socket; the core reads and writes it).
#[cfg(test)]
pub(crate) fn test_io(peer: &str) -> Io {
    let (a, b) = std::os::unix::net::UnixStream::pair().expect("socket pair");
    a.set_nonblocking(true).expect("nonblocking");
    std::mem::forget(b);
    let s = Stream::Unix(mio::net::UnixStream::from_std(a));
    Io::new(s, peer.parse().expect("peer address"), 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(bytes: usize, msgs: u32, policy: SlowConsumer) -> Limits {
        Limits {
            bytes,
            msgs,
            policy,
        }
    }

    #[test]
    fn an_empty_queue_takes_any_message_then_the_limit_holds() {
        let mut out = Outbox::default();
        let l = limits(10, u32::MAX, SlowConsumer::Drop);
        assert_eq!(admit(&out, 100, &l), Queued::Yes);
        out.push_bytes(&[&[0u8; 100]]);
        assert_eq!(admit(&out, 1, &l), Queued::Dropped);
        let l = limits(1000, 1, SlowConsumer::Disconnect);
        assert_eq!(admit(&out, 1, &l), Queued::Disconnect, "message count");
    }
}
