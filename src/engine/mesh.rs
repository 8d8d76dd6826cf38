//! Mesh: the bounded lock-free channels between cores, plus the wake-up
//! protocol.
//!
//! Each core has one inbound channel of *batches*: a sender collects what it
//! has for a destination during one loop iteration and sends it as one batch,
//! so the channel's atomics are paid per iteration, not per message.
//!
//! Wake only if parked: a core about to block in epoll sets `parked`, issues a
//! SeqCst fence, then checks its channel once more; a sender pushes, fences,
//! and swaps `parked` to false, writing the eventfd only if it was true. One
//! of the two always sees the other (Dekker), so no wake-up is lost, and an
//! awake core costs its senders no syscall. (glommio's SleepNotifier.)
//!
//! A full channel never blocks: the sender keeps the batch in its local
//! overflow queue and retries next iteration; while the overflow toward any
//! core is long, the sender stops reading its sockets (backpressure), but it
//! keeps draining its own inbound channel, so two cores full toward each
//! other still make progress.

use std::collections::VecDeque;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TrySendError};

use super::outbox::Chunk;
use super::ConnId;

/// Something one core asks another to do.
#[derive(Debug)]
pub enum Envelope {
    /// Queue bytes on a connection (checked against its generation).
    Deliver {
        /// Destination connection.
        to: ConnId,
        /// The bytes, forwarded as they are.
        data: Chunk,
    },
    /// Close a connection replaced by a newer login.
    Kick {
        /// The connection to close.
        conn: ConnId,
    },
}

/// One cross-core batch.
pub type Batch = Vec<Envelope>;

/// Overflow batches toward one core above which the sender stops reading.
pub const BACKPRESSURE_BATCHES: usize = 64;

/// The shared half of a core's inbox: anyone may send and wake.
#[derive(Debug)]
pub struct Inbox {
    tx: Sender<Batch>,
    waker: mio::Waker,
    parked: AtomicBool,
}

impl Inbox {
    /// Makes an inbox and its receiving end.
    pub fn new(capacity: usize, waker: mio::Waker) -> (Inbox, Receiver<Batch>) {
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        (
            Inbox {
                tx,
                waker,
                parked: AtomicBool::new(false),
            },
            rx,
        )
    }

    /// Wakes the owner if (and only if) it is parked.
    #[inline]
    pub fn wake_if_parked(&self) {
        fence(Ordering::SeqCst);
        if self.parked.swap(false, Ordering::SeqCst) {
            if let Err(e) = self.waker.wake() {
                log::warn!("waking a core failed: {e}");
            }
        }
    }

    /// Unconditional wake (shutdown).
    pub fn wake(&self) {
        self.parked.store(false, Ordering::SeqCst);
        if let Err(e) = self.waker.wake() {
            log::warn!("waking a core failed: {e}");
        }
    }

    /// The owner announces it is about to block; it must then check its
    /// channel before blocking.
    #[inline]
    pub fn park(&self) {
        self.parked.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    /// The owner is awake again.
    #[inline]
    pub fn unpark(&self) {
        self.parked.store(false, Ordering::Relaxed);
    }
}

/// A core's outgoing side: the batch being built per destination and the
/// batches that did not fit.
#[derive(Debug)]
pub struct Outgoing {
    building: Vec<Batch>,
    overflow: Vec<VecDeque<Batch>>,
    inboxes: Arc<[Inbox]>,
}

impl Outgoing {
    /// Outgoing side for a mesh of `inboxes`.
    pub fn new(inboxes: Arc<[Inbox]>) -> Self {
        let n = inboxes.len();
        Outgoing {
            building: (0..n).map(|_| Vec::new()).collect(),
            overflow: (0..n).map(|_| VecDeque::new()).collect(),
            inboxes,
        }
    }

    /// Adds an envelope for core `dst` to this iteration's batch.
    #[inline]
    pub fn push(&mut self, dst: usize, e: Envelope) {
        self.building[dst].push(e);
    }

    /// Sends this iteration's batches, oldest first, and wakes parked
    /// destinations. Never blocks.
    pub fn flush(&mut self) {
        for dst in 0..self.building.len() {
            if !self.building[dst].is_empty() {
                let b = std::mem::take(&mut self.building[dst]);
                self.overflow[dst].push_back(b);
            }
            let q = &mut self.overflow[dst];
            if q.is_empty() {
                continue;
            }
            let inbox = &self.inboxes[dst];
            let mut sent = false;
            while let Some(b) = q.pop_front() {
                match inbox.tx.try_send(b) {
                    Ok(()) => sent = true,
                    Err(TrySendError::Full(b)) => {
                        q.push_front(b);
                        break;
                    }
                    Err(TrySendError::Disconnected(_)) => {
                        // The destination core has exited (shutdown).
                        q.clear();
                        break;
                    }
                }
            }
            if sent {
                inbox.wake_if_parked();
            }
        }
    }

    /// True while any destination's overflow is long: stop reading.
    pub fn backpressured(&self) -> bool {
        self.overflow
            .iter()
            .any(|q| q.len() >= BACKPRESSURE_BATCHES)
    }

    /// True if anything waits to be sent.
    pub fn has_pending(&self) -> bool {
        self.overflow.iter().any(|q| !q.is_empty()) || self.building.iter().any(|b| !b.is_empty())
    }
}
