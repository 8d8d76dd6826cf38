//! One connection, owned by value in its core's slab: its socket side
//! ([`Io`]) and its protocol stage ([`Stage`]).
//!
//! LIFECYCLE
//! 1. accept (`Core::accept`): TCP_NODELAY, registered edge-triggered for
//!    read and write, its first deadline armed, `connections` gauge up. The
//!    listener's kind picks the first stage (`Stage::accepted`); the stage
//!    joins what it belongs to (`Stage::on_open`).
//! 2. read (`Core::read_ready`): read into the core's scratch buffer until
//!    the stream says it is drained (or the per-iteration budget), and hand
//!    the bytes to the stage (`Stage::on_bytes`), which decodes in place and
//!    leaves routing work in the core's batches through `Ctx`. A partial
//!    frame is the only input state kept. The stage answers with an
//!    `Outcome`: continue, close, upgrade to another stage (the handshake is
//!    consumed by value), or wait for an answer from elsewhere.
//! 3. deliver: bytes for this connection arrive from its own core's batch
//!    or another's (`Core::apply`, generation checked), framed for its wire
//!    by its stage, and are admitted under the byte limit and the
//!    slow-consumer policy (`Io::admit`). Queuing marks it dirty.
//! 4. flush (`Core::flush_dirty`): once per loop iteration, one `writev`
//!    run per dirty connection until empty or `WouldBlock`; a writable event
//!    re-arms it.
//! 5. closing (`Io::closing`): a connection that must say goodbye (an HTTP
//!    error, a WebSocket close frame) stops reading, and closes once its
//!    output is flushed or at its closing deadline.
//! 6. close (`Core::close`): the stage leaves every index it joined
//!    (`Stage::on_close`), the id is released only if it still holds the
//!    id's epoch, the timer is cancelled, the slot freed, the socket
//!    dropped; counted and logged at debug level.

use super::adapter::Stage;
use super::io::Io;
use super::timer::{tick32, Timing};

/// A connection.
#[derive(Debug)]
pub(crate) struct Conn {
    /// Generation (see `ConnId`).
    pub gen: u64,
    /// Wheel slot and due tick of this connection's timer (`u32::MAX`
    /// slot: none armed); see [`Conn::timer`].
    timer: (u32, u32),
    pub io: Io,
    pub stage: Stage,
}

impl Conn {
    /// A connection with no timer armed.
    pub(crate) fn new(gen: u64, io: Io, stage: Stage) -> Conn {
        Conn {
            gen,
            timer: (u32::MAX, 0),
            io,
            stage,
        }
    }

    /// Wheel slot and due tick of this connection's timer, if armed.
    #[inline]
    pub(crate) fn timer(&self) -> Option<(u32, u64)> {
        (self.timer.0 != u32::MAX).then_some((self.timer.0, u64::from(self.timer.1)))
    }

    /// Records the armed timer (None: it left the wheel).
    #[inline]
    pub(crate) fn set_timer(&mut self, t: Option<(u32, u64)>) {
        self.timer = t.map_or((u32::MAX, 0), |(slot, due)| (slot, tick32(due)));
    }

    /// The tick at which this connection's timer must next fire.
    pub(crate) fn due(&self, t: &Timing) -> Option<u64> {
        if let Some(c) = self.io.closing {
            return Some(u64::from(c.by));
        }
        let stage = self.stage.due(&self.io, t);
        match (self.write_deadline(t), stage) {
            (Some(w), Some(s)) => Some(w.min(s)),
            (w, s) => w.or(s),
        }
    }

    /// When a socket that takes nothing of the queued output is given up
    /// on (nginx's send_timeout).
    pub(crate) fn write_deadline(&self, t: &Timing) -> Option<u64> {
        Some(self.io.stalled_since()? + t.send?)
    }
}

#[cfg(test)]
mod tests {
    /// Every connection's slab entry is a `Conn`: its size is the floor of
    /// what an idle connection costs. Growing it needs a reason (and the
    /// README's idle figures measured again).
    #[test]
    fn a_connection_entry_stays_small() {
        use std::mem::size_of;
        // mio keeps a selector id in each socket in debug builds.
        let limit = if cfg!(debug_assertions) { 168 } else { 160 };
        assert!(
            size_of::<super::Conn>() <= limit,
            "{}",
            size_of::<super::Conn>()
        );
        assert!(size_of::<crate::engine::adapter::Stage>() <= 64);
    }
}
