//! Mesh: the one vocabulary for work between connections ([`Item`]), the
//! bounded lock-free channels between cores, and the wake-up protocol.
//!
//! Work for a connection on another core and work for one on this core are
//! the same [`Item`]s in the same [`Batch`] shape: [`Outgoing`] builds one
//! batch per core per loop iteration, its own included. Other cores' batches
//! go through their channels; this core's own batch is applied by the core
//! after its reads (`Core::apply`), in the order the items were made, so a
//! connection sees one sender's deliveries, fan-outs and kicks in order
//! whichever core it lives on. "Here or through the mesh" is decided in one
//! place: the destination core index.
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

use super::message::Fanout;
use super::ConnId;

/// Something to do for connections of one core (possibly the sender's).
#[derive(Debug, Clone, Copy)]
pub enum Item {
    /// Queue `data[start..start + len]` of the batch (a RELY transfer frame)
    /// on a connection, checked against its generation.
    Deliver {
        /// Destination connection.
        to: ConnId,
        /// Offset in the batch's data.
        start: u32,
        /// Length in the batch's data.
        len: u32,
    },
    /// Close a connection replaced by a newer login, if it still holds
    /// the login that was replaced (it may have logged in again since).
    Kick {
        /// The connection to close.
        conn: ConnId,
        /// The epoch of the replaced login.
        epoch: u64,
    },
    /// Run the next of `Batch::fanouts` (they are taken in order).
    Fanout,
    /// A client message for upstream source `source` (the receiving core
    /// owns it): `data[start..start + len]`.
    ToSource {
        /// The source.
        source: u16,
        /// Text (else binary).
        text: bool,
        /// Offset in the batch's data.
        start: u32,
        /// Length in the batch's data.
        len: u32,
    },
    /// A core's answer to a fan-out with a reply address: how many of its
    /// connections it touched, and `data[start..start + len]` of status text.
    Reply {
        /// Request number on the receiving core.
        req: u64,
        /// Connections touched.
        count: u64,
        /// Offset of the status text.
        start: u32,
        /// Length of the status text.
        len: u32,
    },
    /// Redis work between a connection's core and the core holding the
    /// Redis connections (`redis.per_core: false`): `data[start..start +
    /// len]` is an op byte, a tag byte, the server's index and the op's
    /// bytes
    /// (`engine::redis::remote`).
    Redis {
        /// The connection it is for (or from).
        conn: ConnId,
        /// Offset in the batch's data.
        start: u32,
        /// Length in the batch's data.
        len: u32,
    },
}

/// One cross-core batch: the bytes of every delivery in one buffer (one
/// allocation per batch, not per message), and what to do with them.
#[derive(Debug, Default)]
pub struct Batch {
    /// Delivery bytes, back to back.
    pub data: Vec<u8>,
    /// Items in order.
    pub items: Vec<Item>,
    /// Fan-outs referred to by `Item::Fanout`.
    pub fanouts: Vec<Fanout>,
    /// A new configuration for the receiving core (sent alone, by the
    /// reloading thread, never by a core).
    pub reload: Option<Box<Reload>>,
}

/// What a core takes on a reload (`ServerHandle::reload`).
#[derive(Debug)]
pub struct Reload {
    /// The merged configuration (restart-only settings as running).
    pub cfg: Arc<crate::config::Config>,
    /// Every source slot's status, the added ones last.
    pub sources: super::metrics::SourceTable,
    /// This core's sockets for the added sources.
    pub listeners: Vec<(super::listener::ListenerKind, super::listener::ListenSock)>,
    /// Sources whose feed is dialled again (`config::SourceSlots::redial`).
    pub redial: Vec<u16>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// A batch whose data passes this is sent on (and a new one started) even
/// within an iteration, which bounds what one batch can pin.
pub const MAX_BATCH_BYTES: usize = 1 << 20;

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

    /// Sends a batch from a thread that is not a core (a reload), waiting
    /// up to `timeout` for room, then wakes the owner. Errors: the channel
    /// stayed full, or the core has exited.
    pub fn send_from_outside(
        &self,
        batch: Batch,
        timeout: std::time::Duration,
    ) -> Result<(), &'static str> {
        self.tx.send_timeout(batch, timeout).map_err(|e| match e {
            crossbeam_channel::SendTimeoutError::Timeout(_) => "its channel stayed full",
            crossbeam_channel::SendTimeoutError::Disconnected(_) => "it has exited",
        })?;
        self.wake();
        Ok(())
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

/// A core's outgoing side: the batch being built per destination (its own
/// core included) and the batches that did not fit in a channel.
#[derive(Debug)]
pub struct Outgoing {
    building: Vec<Batch>,
    overflow: Vec<VecDeque<Batch>>,
    inboxes: Arc<[Inbox]>,
    /// This core: its batch is applied locally, never sent.
    me: usize,
}

impl Outgoing {
    /// Outgoing side of core `me` in a mesh of `inboxes`.
    pub fn new(inboxes: Arc<[Inbox]>, me: usize) -> Self {
        let n = inboxes.len();
        Outgoing {
            building: (0..n).map(|_| Batch::default()).collect(),
            overflow: (0..n).map(|_| VecDeque::new()).collect(),
            inboxes,
            me,
        }
    }

    /// This core's index.
    #[inline]
    pub fn me(&self) -> usize {
        self.me
    }

    /// Number of cores.
    #[inline]
    pub fn cores(&self) -> usize {
        self.building.len()
    }

    /// Takes this iteration's batch for the own core (applied after the
    /// reads, like a batch from another core).
    pub fn take_local(&mut self) -> Batch {
        std::mem::take(&mut self.building[self.me])
    }

    /// Gives a local batch's buffers back for reuse once nothing refers to
    /// them (the data after the flush), so the own batch costs no
    /// allocation per iteration. Empty vectors are ignored.
    pub fn recycle_local(&mut self, mut data: Vec<u8>, mut items: Vec<Item>) {
        let own = &mut self.building[self.me];
        if own.data.capacity() == 0 && data.capacity() <= 4 * MAX_BATCH_BYTES {
            data.clear();
            own.data = data;
        }
        if own.items.capacity() == 0 && items.capacity() <= 1 << 16 {
            items.clear();
            own.items = items;
        }
    }

    /// Adds a delivery of `parts` (concatenated) to `to` (on core `dst`) to
    /// this iteration's batch.
    #[inline]
    pub fn deliver(&mut self, dst: usize, to: ConnId, parts: &[&[u8]]) {
        let (start, len) = self.append(dst, parts);
        self.building[dst]
            .items
            .push(Item::Deliver { to, start, len });
    }

    /// Appends bytes to the batch for `dst` (sending the batch on first if
    /// they would take it past [`MAX_BATCH_BYTES`]); returns their offset
    /// and length in it.
    fn append(&mut self, dst: usize, parts: &[&[u8]]) -> (u32, u32) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        // The own batch is applied this iteration and pins nothing past the
        // flush; it is never cut.
        if dst != self.me
            && !self.building[dst].data.is_empty()
            && self.building[dst].data.len() + len > MAX_BATCH_BYTES
        {
            let full = std::mem::take(&mut self.building[dst]);
            self.overflow[dst].push_back(full);
        }
        let b = &mut self.building[dst];
        let start = b.data.len() as u32;
        for p in parts {
            b.data.extend_from_slice(p);
        }
        (start, len as u32)
    }

    /// Asks core `dst` to run a fan-out on its connections.
    pub fn fanout(&mut self, dst: usize, f: Fanout) {
        let b = &mut self.building[dst];
        b.items.push(Item::Fanout);
        b.fanouts.push(f);
    }

    /// Hands a client message to the owner core `dst` of `source`.
    pub fn to_source(&mut self, dst: usize, source: u16, text: bool, data: &[u8]) {
        let (start, len) = self.append(dst, &[data]);
        self.building[dst].items.push(Item::ToSource {
            source,
            text,
            start,
            len,
        });
    }

    /// Answers core `dst`'s request `req`.
    pub fn reply(&mut self, dst: usize, req: u64, count: u64, text: &[u8]) {
        let (start, len) = self.append(dst, &[text]);
        self.building[dst].items.push(Item::Reply {
            req,
            count,
            start,
            len,
        });
    }

    /// Redis work for core `dst` about `conn`: `op`, `tag`, then what
    /// `body` appends (an encoded command, a channel name, an answer).
    pub fn redis(
        &mut self,
        dst: usize,
        conn: ConnId,
        op: u8,
        tag: u8,
        server: u8,
        body: impl FnOnce(&mut Vec<u8>),
    ) {
        let (start, _) = self.append(dst, &[&[op, tag, server]]);
        let b = &mut self.building[dst];
        body(&mut b.data);
        let len = (b.data.len() as u32).saturating_sub(start);
        b.items.push(Item::Redis { conn, start, len });
    }

    /// Asks core `dst` to close `conn` (last login wins).
    pub fn kick(&mut self, dst: usize, conn: ConnId, epoch: u64) {
        self.building[dst].items.push(Item::Kick { conn, epoch });
    }

    /// Sends this iteration's batches, oldest first, and wakes parked
    /// destinations. Never blocks. Returns how many batches had to wait
    /// (channel full).
    pub fn flush(&mut self) -> u64 {
        let mut waited = 0;
        for dst in 0..self.building.len() {
            if dst == self.me {
                continue;
            }
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
                        waited += q.len() as u64;
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
        waited
    }

    /// True while any destination's overflow is long: stop reading.
    pub fn backpressured(&self) -> bool {
        self.overflow
            .iter()
            .any(|q| q.len() >= BACKPRESSURE_BATCHES)
    }

    /// True if anything waits to be sent (or applied locally).
    pub fn has_pending(&self) -> bool {
        self.overflow.iter().any(|q| !q.is_empty()) || self.building.iter().any(|b| !b.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh(cores: usize, capacity: usize) -> (Vec<mio::Poll>, Outgoing, Vec<Receiver<Batch>>) {
        let (mut polls, mut inboxes, mut rxs) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..cores {
            let poll = mio::Poll::new().expect("poll");
            let waker = mio::Waker::new(poll.registry(), mio::Token(0)).expect("waker");
            let (i, rx) = Inbox::new(capacity, waker);
            polls.push(poll);
            inboxes.push(i);
            rxs.push(rx);
        }
        (polls, Outgoing::new(inboxes.into(), 0), rxs)
    }

    fn id(core: u16, slot: u32) -> ConnId {
        ConnId { core, slot, gen: 1 }
    }

    #[test]
    fn the_own_batch_is_applied_locally_never_sent() {
        let (_p, mut out, rxs) = mesh(2, 4);
        out.deliver(0, id(0, 1), &[b"a"]);
        out.kick(0, id(0, 2), 1);
        out.deliver(1, id(1, 3), &[b"b", b"c"]);
        out.flush();
        assert!(
            rxs[0].try_recv().is_err(),
            "nothing through the own channel"
        );
        let other = rxs[1].try_recv().expect("the other core's batch");
        assert_eq!(other.data, b"bc");
        let local = out.take_local();
        assert!(matches!(
            local.items[..],
            [
                Item::Deliver {
                    start: 0,
                    len: 1,
                    ..
                },
                Item::Kick { .. }
            ]
        ));
        assert!(!out.has_pending());
    }

    #[test]
    fn a_full_channel_keeps_batches_in_order_and_pushes_back() {
        let (_p, mut out, rxs) = mesh(2, 1);
        for i in 0..(BACKPRESSURE_BATCHES as u8 + 2) {
            out.deliver(1, id(1, 1), &[&[i]]);
            out.flush();
        }
        assert!(out.backpressured());
        let mut got = Vec::new();
        for _ in 0..1000 {
            got.extend(rxs[1].try_iter().flat_map(|b| b.data));
            if !out.has_pending() {
                break;
            }
            out.flush();
        }
        assert_eq!(
            got,
            (0..(BACKPRESSURE_BATCHES as u8 + 2)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_batch_is_cut_at_the_byte_cap_for_other_cores_only() {
        let (_p, mut out, rxs) = mesh(2, 8);
        let big = vec![0u8; MAX_BATCH_BYTES];
        out.deliver(1, id(1, 1), &[&big]);
        out.deliver(1, id(1, 1), &[b"x"]);
        out.deliver(0, id(0, 1), &[&big]);
        out.deliver(0, id(0, 1), &[b"x"]);
        out.flush();
        assert_eq!(rxs[1].try_iter().count(), 2, "cut in two");
        assert_eq!(out.take_local().items.len(), 2, "one local batch");
    }
}
