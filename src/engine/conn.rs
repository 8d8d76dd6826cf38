//! One connection's state, owned by value in its core's slab.
//!
//! LIFECYCLE
//! 1. accept (`Core::accept`): TCP_NODELAY, registered edge-triggered for
//!    read and write, idle timer armed, `connections` gauge up.
//! 2. read (`Core::read_ready`): read into the core's scratch buffer until a
//!    short read or `WouldBlock` (or the per-iteration budget), feed the
//!    protocol adapter, which decodes frames in place and turns them into
//!    routing actions (`engine::rely`). A partial frame is the only input
//!    state kept here.
//! 3. deliver: bytes for this connection arrive from its own core (local
//!    action list) or another (mesh `Deliver`, generation checked), and go
//!    through [`Conn::queue`], which applies the byte limit and the
//!    slow-consumer policy. Queuing marks the connection dirty.
//! 4. flush (`Core::flush_dirty`): once per loop iteration, one `writev`
//!    run per dirty connection until empty or `WouldBlock`; a writable event
//!    re-arms it.
//! 5. close (`Core::close`): for a reason (peer closed, protocol error, kick,
//!    idle, slow consumer, shutdown): unregistered from the directory only if
//!    it still holds the id's epoch, removed from the slab, socket dropped,
//!    counted and logged at debug level.

use std::net::SocketAddr;

use mio::net::TcpStream;

use super::outbox::{Chunk, Outbox};
use crate::config::SlowConsumer;
use crate::protocol::rely::Decoder;

/// A RELY login held by a connection.
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
    /// A malformed frame.
    Protocol,
    /// A transfer before login.
    NotLoggedIn,
    /// FromClientID differs from the login id.
    Spoofed,
    /// A newer login took the id.
    Kicked,
    /// No frame within the idle timeout.
    Idle,
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

/// A connection.
#[derive(Debug)]
pub struct Conn {
    /// Generation (see `ConnId`).
    pub gen: u64,
    /// The socket.
    pub stream: TcpStream,
    /// Peer address, for logs.
    pub peer: SocketAddr,
    /// Partial-frame state.
    pub decoder: Decoder,
    /// Login, once logged in.
    pub login: Option<Login>,
    /// Output queue.
    pub out: Outbox,
    /// Edge-triggered readiness remembered until drained.
    pub readable: bool,
    /// The socket can take bytes.
    pub writable: bool,
    /// Listed in the core's ready list.
    pub in_ready: bool,
    /// Listed in the core's dirty (to flush) list.
    pub in_dirty: bool,
    /// Tick of the last complete frame.
    pub last_active: u64,
    /// Wheel slot of this connection's idle timer, if armed.
    pub timer_slot: Option<u32>,
}

impl Conn {
    /// A freshly accepted connection.
    pub fn new(gen: u64, stream: TcpStream, peer: SocketAddr, now: u64) -> Self {
        Conn {
            gen,
            stream,
            peer,
            decoder: Decoder::new(),
            login: None,
            out: Outbox::default(),
            readable: false,
            writable: true,
            in_ready: false,
            in_dirty: false,
            last_active: now,
            timer_slot: None,
        }
    }

    /// Offers bytes to the output queue under a byte limit. A message is
    /// always accepted into an empty queue, so one maximal frame fits.
    #[inline]
    pub fn queue(&mut self, data: Chunk, limit: usize, policy: SlowConsumer) -> Queued {
        if !self.out.is_empty() && self.out.bytes() + data.len() > limit {
            return match policy {
                SlowConsumer::Drop => Queued::Dropped,
                SlowConsumer::Disconnect => Queued::Disconnect,
            };
        }
        self.out.push(data);
        Queued::Yes
    }
}
