//! A connection's output queue: chunks written with `writev`, bounded in
//! bytes by its owner (see `Conn::queue`). Chunks are either owned by this
//! queue or shared by reference with other queues (fan-out encodes once).

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::ops::Deref;
use std::sync::Arc;

/// iovecs per `writev`; Linux's IOV_MAX is 1024. No cap on how many queued
/// messages one flush takes beyond this (uWebSockets' cap of 32 costs 10x).
const IOV_BATCH: usize = 512;
/// Queues up to this many chunks are written from a stack iovec.
const SMALL_IOV: usize = 16;
/// Smallest tail buffer allocated for own writes.
const TAIL_MIN: usize = 4096;
/// Tail buffers stop growing here; a new one starts.
const TAIL_MAX: usize = 256 * 1024;
/// Chunks at least this large are left as they are when a queue settles
/// (shared ones are not copied; their bookkeeping is small beside them).
const SETTLE_KEEP: usize = 64 * 1024;

thread_local! {
    /// The chunks a queue is settling (one per core thread, reused).
    static SETTLING: std::cell::RefCell<Vec<Chunk>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Bytes to send, owned or shared.
#[derive(Debug, Clone)]
pub enum Chunk {
    /// Bytes for this connection only.
    Owned(Box<[u8]>),
    /// A growable buffer for the connection's own small writes (echo, pong,
    /// close), coalesced while it is the last chunk.
    Buf(Vec<u8>),
    /// Bytes shared with other connections (encoded once).
    Shared(Arc<[u8]>),
    /// A region of a buffer that carries many deliveries of one loop
    /// iteration (a batch's transfers, a run of fan-out frames), so
    /// relaying costs no allocation per message. A slice must
    /// not outlive the iteration's flush (see [`Outbox::settle`]), or
    /// one slow receiver could pin whole batches.
    Slice {
        /// The batch buffer.
        buf: Arc<Vec<u8>>,
        /// Offset of this delivery.
        start: u32,
        /// Its length.
        len: u32,
    },
}

impl Deref for Chunk {
    type Target = [u8];
    #[inline]
    fn deref(&self) -> &[u8] {
        match self {
            Chunk::Owned(b) => b,
            Chunk::Buf(v) => v,
            Chunk::Shared(a) => a,
            Chunk::Slice { buf, start, len } => &buf[*start as usize..(*start + *len) as usize],
        }
    }
}

impl From<&[u8]> for Chunk {
    fn from(b: &[u8]) -> Self {
        Chunk::Owned(b.into())
    }
}

/// Outcome of a flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// Everything was written.
    Done,
    /// The socket is full; wait for a writable event.
    WouldBlock,
}

/// The queue: empty (no allocation) or a [`Queue`]. An idle connection
/// holds 8 bytes here, not the 48 of the queue's state; the state of a
/// queue that drains goes back to its core's pool (`POOL`), so a busy
/// connection takes it again without allocating.
#[derive(Debug, Default)]
pub struct Outbox(Option<Box<Queue>>);

/// A non-empty queue's state.
#[derive(Debug, Default)]
struct Queue {
    q: VecDeque<Chunk>,
    /// Bytes of the front chunk already written.
    head: u32,
    /// Unwritten bytes in the queue.
    bytes: usize,
    /// Chunks pushed since the queue last settled.
    fresh: u32,
}

/// Drained queues kept per core thread, with their index's capacity: at
/// most about 600 KB a core, 200 KB after a fan-out (4 slots a queue). A
/// fan-out to more subscribers than this allocates the rest, as every
/// queue did before the pool; at 256, a 1,000-subscriber fan-out cost
/// about 4% more CPU per delivery.
const POOL_MAX: usize = 1024;
/// A pooled index keeps at most this many slots (a deep queue's is freed).
const POOL_KEEP_SLOTS: usize = 16;

thread_local! {
    // Boxes, not queues: a queue taken from the pool is the allocation an
    // `Outbox` points to, so taking and giving back never allocate.
    #[allow(clippy::vec_box)]
    static POOL: std::cell::RefCell<Vec<Box<Queue>>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Queue {
    /// A queue from this thread's pool, or a new one.
    fn take() -> Box<Queue> {
        POOL.try_with(|p| p.try_borrow_mut().ok().and_then(|mut p| p.pop()))
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    /// Back to the pool, emptied (kept only while the pool is small).
    fn give_back(mut q: Box<Queue>) {
        q.q.clear();
        if q.q.capacity() > POOL_KEEP_SLOTS {
            q.q = VecDeque::new();
        }
        q.head = 0;
        q.bytes = 0;
        q.fresh = 0;
        let _ = POOL.try_with(|p| {
            if let Ok(mut p) = p.try_borrow_mut() {
                if p.len() < POOL_MAX {
                    p.push(q);
                }
            }
        });
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        if let Some(q) = self.0.take() {
            Queue::give_back(q);
        }
    }
}

impl Outbox {
    /// Unwritten bytes.
    #[inline]
    pub fn bytes(&self) -> usize {
        self.0.as_ref().map_or(0, |q| q.bytes)
    }

    /// True when nothing is waiting.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.bytes() == 0
    }

    /// Queued chunks.
    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |q| q.q.len())
    }

    /// The queue's state, taken from the pool if there is none.
    #[inline]
    fn queue(&mut self) -> &mut Queue {
        self.0.get_or_insert_with(Queue::take)
    }

    /// Appends a chunk (empty chunks are ignored).
    #[inline]
    pub fn push(&mut self, c: Chunk) {
        if c.is_empty() {
            return;
        }
        self.queue().push(c);
    }

    /// Writes as much as the socket takes, `IOV_BATCH` chunks per `writev`,
    /// until empty or `WouldBlock`. Returns the bytes written and the outcome.
    pub fn flush_to<W: Write>(&mut self, w: &mut W) -> io::Result<(usize, Flush)> {
        let Some(q) = self.0.as_mut() else {
            return Ok((0, Flush::Done));
        };
        let r = q.flush_to(w)?;
        if r.1 == Flush::Done {
            // Drained: an idle connection holds no queue; its state goes
            // back to the pool for the next busy one.
            if let Some(q) = self.0.take() {
                Queue::give_back(q);
            }
        }
        Ok(r)
    }

    /// Appends `parts` as one contiguous write, coalesced into the tail
    /// buffer when the last chunk is one.
    pub fn push_bytes(&mut self, parts: &[&[u8]]) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > 0 {
            self.queue().push_bytes(parts, len);
        }
    }

    /// Drops everything not yet started on the wire, keeping a partly
    /// written front chunk whole, so a close frame can follow cleanly.
    pub fn truncate_unstarted(&mut self) {
        if let Some(q) = self.0.as_mut() {
            q.truncate_unstarted();
        }
    }

    /// See [`Queue::settle`].
    pub fn settle(&mut self, counted: bool) {
        if let Some(q) = self.0.as_mut() {
            q.settle(counted);
        }
    }

    /// Everything queued, as the peer will read it.
    #[cfg(test)]
    pub(crate) fn contents(&self) -> Vec<u8> {
        self.0.as_ref().map_or_else(Vec::new, |q| q.contents())
    }
}

impl Queue {
    #[inline]
    fn push(&mut self, c: Chunk) {
        self.bytes += c.len();
        self.fresh += 1;
        self.q.push_back(c);
    }

    fn flush_to<W: Write>(&mut self, w: &mut W) -> io::Result<(usize, Flush)> {
        let mut written = 0;
        while !self.q.is_empty() {
            match self.write_some(w) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(k) => {
                    written += k;
                    self.consume(k);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok((written, Flush::WouldBlock))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok((written, Flush::Done))
    }

    /// One write of as many queued chunks as fit an iovec. The iovec is
    /// sized to what is queued: building a full IOV_BATCH array for every
    /// flush of one small frame cost more than the frame (fan-out flushes
    /// thousands of connections per iteration).
    fn write_some<W: Write>(&self, w: &mut W) -> io::Result<usize> {
        let n = self.q.len().min(IOV_BATCH);
        // The front chunk may be partly written already.
        let start = |i: usize| if i == 0 { self.head as usize } else { 0 };
        if n == 1 {
            let c = &self.q[0];
            return w.write(&c[self.head as usize..]);
        }
        if n <= SMALL_IOV {
            let mut iov: [IoSlice<'_>; SMALL_IOV] = [IoSlice::new(&[]); SMALL_IOV];
            for (i, c) in self.q.iter().take(n).enumerate() {
                iov[i] = IoSlice::new(&c[start(i)..]);
            }
            return w.write_vectored(&iov[..n]);
        }
        let iov: Vec<IoSlice<'_>> = self
            .q
            .iter()
            .take(n)
            .enumerate()
            .map(|(i, c)| IoSlice::new(&c[start(i)..]))
            .collect();
        w.write_vectored(&iov)
    }

    fn consume(&mut self, mut k: usize) {
        self.bytes -= k;
        while k > 0 {
            let front = self.q.front().map_or(0, |c| c.len() - self.head as usize);
            if k >= front {
                k -= front;
                self.q.pop_front();
                self.head = 0;
            } else {
                // Less than the front chunk, which a u32 holds (messages
                // are capped far below 4 GiB).
                self.head += k as u32;
                k = 0;
            }
        }
    }

    /// Appends `parts` as one contiguous write, coalesced into the tail
    /// buffer when the last chunk is one (one allocation for many small
    /// frames, not one each).
    fn push_bytes(&mut self, parts: &[&[u8]], len: usize) {
        self.bytes += len;
        if let Some(Chunk::Buf(v)) = self.q.back_mut() {
            if v.len() + len <= TAIL_MAX {
                for p in parts {
                    v.extend_from_slice(p);
                }
                return;
            }
        }
        let mut v = Vec::with_capacity(len.max(TAIL_MIN));
        for p in parts {
            v.extend_from_slice(p);
        }
        self.fresh += 1;
        self.q.push_back(Chunk::Buf(v));
    }

    fn truncate_unstarted(&mut self) {
        let keep = usize::from(self.head > 0);
        while self.q.len() > keep {
            if let Some(c) = self.q.pop_back() {
                self.bytes -= c.len();
            }
        }
    }

    /// Called when a flush leaves bytes queued: what was pushed since the
    /// last call is copied into tail buffers of up to 256 KiB, so that
    /// - no slice of an iteration's buffer outlives its flush (a receiver
    ///   that cannot keep up pins only its own, bounded, bytes), and
    /// - a queue that grows costs its bytes plus one chunk per 256 KiB, not
    ///   one chunk and one shared allocation per small message (which
    ///   cost twice the bytes counted against `max_output_bytes`), and
    ///   frees in few large pieces when it drains or is cut.
    ///
    /// Large chunks are kept as they are (slices copied whole). A front
    /// chunk already partly written is left in place. A queue whose limit
    /// counts messages (`counted`: Veylor's `max_queue_size` counts chunks)
    /// keeps one chunk per message; only its slices are copied.
    fn settle(&mut self, counted: bool) {
        let fresh = std::mem::take(&mut self.fresh) as usize;
        if counted {
            let n = self.q.len();
            for c in self.q.range_mut(n.saturating_sub(fresh)..) {
                if let Chunk::Slice { .. } = c {
                    *c = Chunk::Owned(Box::from(&c[..]));
                }
            }
            return;
        }
        let mut from = self.q.len().saturating_sub(fresh);
        if from == 0 && self.head > 0 {
            if let Some(c) = self.q.front_mut() {
                if let Chunk::Slice { .. } = c {
                    *c = Chunk::Owned(Box::from(&c[..]));
                }
            }
            from = 1;
        }
        if from >= self.q.len() {
            return;
        }
        SETTLING.with(|cell| {
            let Ok(mut moved) = cell.try_borrow_mut() else {
                return;
            };
            moved.extend(self.q.drain(from..));
            for c in moved.drain(..) {
                if c.len() >= SETTLE_KEEP {
                    let c = match c {
                        Chunk::Slice { .. } => Chunk::Owned(Box::from(&c[..])),
                        c => c,
                    };
                    self.q.push_back(c);
                    continue;
                }
                let big = self.bytes >= SETTLE_KEEP;
                match self.q.back_mut() {
                    // Growing reallocates: only while the buffer is small.
                    Some(Chunk::Buf(v))
                        if v.len() + c.len() <= v.capacity()
                            || v.len() + c.len() <= SETTLE_KEEP =>
                    {
                        v.extend_from_slice(&c)
                    }
                    _ => {
                        // A queue that is past small takes whole tail
                        // buffers at once: each is its own mapping (see
                        // `sys::tune_allocator`), never a step of growth
                        // left behind in the worker's heap.
                        let cap = if big { TAIL_MAX } else { c.len().max(TAIL_MIN) };
                        let mut v = Vec::with_capacity(cap);
                        v.extend_from_slice(&c);
                        self.q.push_back(Chunk::Buf(v));
                    }
                }
            }
        });
    }

    #[cfg(test)]
    fn contents(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.bytes);
        for (i, c) in self.q.iter().enumerate() {
            v.extend_from_slice(&c[if i == 0 { self.head as usize } else { 0 }..]);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that accepts at most `cap` bytes per call, then blocks.
    struct Trickle {
        out: Vec<u8>,
        cap: usize,
        budget: usize,
    }
    impl Write for Trickle {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(b)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            if self.budget == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.cap - n).min(self.budget);
                self.out.extend_from_slice(&b[..take]);
                n += take;
                self.budget -= take;
                if n == self.cap || self.budget == 0 {
                    break;
                }
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn partial_writes_keep_order() {
        let mut o = Outbox::default();
        let shared: Arc<[u8]> = Arc::from(&b"shared"[..]);
        o.push(Chunk::from(&b"hello "[..]));
        o.push(Chunk::Shared(shared));
        o.push(Chunk::from(&b" world"[..]));
        let mut w = Trickle {
            out: vec![],
            cap: 4,
            budget: 7,
        };
        assert_eq!(o.flush_to(&mut w).unwrap(), (7, Flush::WouldBlock));
        assert_eq!(o.bytes(), 11);
        let batch = Arc::new(b"xx and more".to_vec());
        o.push(Chunk::Slice {
            buf: batch.clone(),
            start: 2,
            len: 9,
        });
        o.settle(false);
        assert_eq!(Arc::strong_count(&batch), 1, "no slice pins the batch");
        w.budget = 100;
        o.push_bytes(&[b"!", b"?"]);
        o.push_bytes(&[b"!"]);
        assert_eq!(
            o.len(),
            2,
            "settled and own writes coalesce into one tail buffer"
        );
        assert_eq!(o.flush_to(&mut w).unwrap(), (23, Flush::Done));
        assert_eq!(w.out, b"hello shared world and more!?!");
        assert!(o.is_empty());
    }

    #[test]
    fn a_settled_queue_holds_few_large_chunks_in_order() {
        let mut o = Outbox::default();
        let mut want = Vec::new();
        let batch = Arc::new((0..=255u8).cycle().take(70_000).collect::<Vec<u8>>());
        for i in 0..20_000u32 {
            let m: Arc<[u8]> = Arc::from(&i.to_be_bytes()[..]);
            want.extend_from_slice(&m);
            o.push(Chunk::Shared(m));
            if i % 5000 == 0 {
                // A large slice is copied whole, not coalesced.
                o.push(Chunk::Slice {
                    buf: batch.clone(),
                    start: 1,
                    len: 69_999,
                });
                want.extend_from_slice(&batch[1..]);
            }
            if i % 1000 == 999 {
                o.settle(false);
            }
        }
        // Partly written, then more pushed: the front stays where it is.
        let mut w = Trickle {
            out: vec![],
            cap: 3,
            budget: 3,
        };
        assert_eq!(o.flush_to(&mut w).unwrap(), (3, Flush::WouldBlock));
        o.push(Chunk::from(&b"end"[..]));
        want.extend_from_slice(b"end");
        o.settle(false);
        assert_eq!(Arc::strong_count(&batch), 1, "no slice pins the batch");
        assert!(o.len() <= 12, "{} chunks", o.len());
        w.budget = usize::MAX;
        w.cap = usize::MAX;
        assert_eq!(o.flush_to(&mut w).unwrap().1, Flush::Done);
        assert_eq!(w.out, want);
    }
}
