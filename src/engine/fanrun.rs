//! Runs of fan-outs: consecutive sends to one selector within one batch
//! (a publisher's burst read in one iteration), framed back to back into
//! one per-core buffer per wire. Each subscriber then gets one queued
//! reference to the whole run, written with one iovec, instead of one
//! queued piece, reference count and admission check per message; a
//! subscriber that must skip its own messages gets one reference per
//! stretch between them. The buffers are handed back for reuse once the
//! iteration's flush has copied out what slow receivers still hold.

use std::sync::Arc;

use super::message::{append_frame, FanOp, Fanout, Wire, SHARE_ACROSS_CORES};
use super::ConnId;
use crate::protocol::deflate::CoreCodec;

/// Most messages in one run.
const RUN_MSGS: usize = 4096;
/// A run ends once its messages hold this many bytes, which bounds one
/// wire's buffer (and keeps offsets far inside u32).
const RUN_BYTES: usize = 1 << 20;
/// Run buffers kept for reuse, and the largest one kept: a core retains at
/// most 1 MiB for them whatever its bursts were (a larger run's buffer is
/// its own mapping, returned when freed; see `sys::tune_allocator`).
const POOL: usize = 4;
const POOL_MAX_CAPACITY: usize = 256 << 10;

/// Distinct wires a run may be framed for.
const WIRES: usize = 6;

fn wire_index(w: Wire) -> usize {
    match w {
        Wire::WsServer | Wire::WsOwn => 0,
        Wire::WsDeflate => 1,
        Wire::LenPrefix => 2,
        Wire::VeltixV3 => 3,
        Wire::VeltixV1 => 4,
    }
}

/// Can `f` be part of a run? Plain sends only: closes, tag changes and
/// status requests touch each connection, a reply needs its own count, and
/// a large message is shared by reference rather than copied per core.
pub(crate) fn joinable(f: &Fanout) -> bool {
    matches!(f.op, FanOp::Send)
        && f.reply.is_none()
        && f.msg
            .as_ref()
            .is_some_and(|m| m.bytes.len() < SHARE_ACROSS_CORES)
}

/// One wire's frames of a run's messages, back to back.
#[derive(Debug)]
pub(crate) struct RunFrames {
    /// The frames (shared by the queues they go to until the flush).
    pub buf: Arc<Vec<u8>>,
    /// Frame i is `buf[off[i]..off[i + 1]]`.
    pub off: Vec<u32>,
    /// Running totals of (plain, compressed) bytes of the frames that went
    /// out compressed (shared permessage-deflate only); else empty.
    pub zsum: Vec<(u64, u64)>,
}

impl RunFrames {
    /// The bytes of frames `a..b` as (start, len).
    #[inline]
    pub(crate) fn span(&self, a: usize, b: usize) -> (u32, u32) {
        (self.off[a], self.off[b] - self.off[a])
    }

    /// The (plain, compressed) bytes of the compressed frames in `a..b`.
    pub(crate) fn compressed(&self, a: usize, b: usize) -> Option<(u64, u64)> {
        let (za, zb) = (self.zsum.get(a)?, self.zsum.get(b)?);
        (zb.0 > za.0).then(|| (zb.0 - za.0, zb.1 - za.1))
    }
}

/// The run being gathered, then queued.
#[derive(Debug, Default)]
pub(crate) struct Run {
    /// Its fan-outs, in order.
    pub msgs: Vec<Fanout>,
    /// Bytes of their messages.
    bytes: usize,
    wires: [Option<RunFrames>; WIRES],
    /// (connection, message index) pairs a message must skip, sorted.
    skips: Vec<(ConnId, u32)>,
    /// Buffers framed this iteration, returned after the flush.
    spent: Vec<Arc<Vec<u8>>>,
    /// Buffers for reuse.
    pool: Vec<Vec<u8>>,
}

fn key(id: &ConnId) -> (u16, u32, u64) {
    (id.core, id.slot, id.gen)
}

impl Run {
    /// Adds `f` if it continues the run (same selector and framing, under
    /// the bounds); else hands it back.
    pub(crate) fn add(&mut self, f: Fanout) -> Result<(), Fanout> {
        let len = f.msg.as_ref().map_or(0, |m| m.bytes.len());
        if let Some(first) = self.msgs.first() {
            let same = (Arc::ptr_eq(&first.selector, &f.selector) || first.selector == f.selector)
                && first.force_binary == f.force_binary;
            if !same || self.msgs.len() >= RUN_MSGS || self.bytes + len > RUN_BYTES {
                return Err(f);
            }
        }
        self.bytes += len;
        self.msgs.push(f);
        Ok(())
    }

    /// Readies the run for queuing on core `me`: lists the senders to skip.
    pub(crate) fn prepare(&mut self, me: usize) {
        self.skips.clear();
        for (i, f) in self.msgs.iter().enumerate() {
            if let Some(x) = f.exclude.filter(|x| x.core as usize == me) {
                self.skips.push((x, i as u32));
            }
        }
        // Stable: each connection's skips stay in message order.
        self.skips.sort_by_key(|(x, _)| key(x));
    }

    /// The message indexes `id` must skip, in order.
    #[inline]
    pub(crate) fn skips_of(&self, id: ConnId) -> &[(ConnId, u32)] {
        if self.skips.is_empty() {
            return &[];
        }
        let k = key(&id);
        let a = self.skips.partition_point(|(x, _)| key(x) < k);
        let b = a + self.skips[a..].partition_point(|(x, _)| key(x) == k);
        &self.skips[a..b]
    }

    /// Frames the run for `wire` unless it is already (see [`Run::framed`]).
    pub(crate) fn frame(
        &mut self,
        wire: Wire,
        min_deflate: usize,
        codec: &mut CoreCodec,
        metrics: &super::metrics::CoreMetrics,
    ) {
        let w = wire_index(wire);
        if self.wires[w].is_some() {
            return;
        }
        let mut buf = self.pool.pop().unwrap_or_default();
        let mut off = Vec::with_capacity(self.msgs.len() + 1);
        let mut zsum = Vec::new();
        let (mut plain, mut z) = (0u64, 0u64);
        off.push(0);
        if wire == Wire::WsDeflate {
            zsum.push((0, 0));
        }
        for f in &self.msgs {
            if let Some(m) = &f.msg {
                let work = append_frame(m, f.force_binary, wire, min_deflate, codec, &mut buf);
                if let Some((p, c)) = work {
                    // Once per core per message, however many take it.
                    metrics.ws_compressor_input_bytes.add(p as u64);
                    metrics.ws_compressor_output_bytes.add(c as u64);
                    plain += p as u64;
                    z += c as u64;
                }
            }
            if wire == Wire::WsDeflate {
                zsum.push((plain, z));
            }
            off.push(buf.len() as u32);
        }
        self.wires[w] = Some(RunFrames {
            buf: Arc::new(buf),
            off,
            zsum,
        });
    }

    /// The run's frames for `wire`, once [`Run::frame`] made them.
    #[inline]
    pub(crate) fn framed(&self, wire: Wire) -> Option<&RunFrames> {
        self.wires[wire_index(wire)].as_ref()
    }

    /// Ends the run: its buffers wait for the flush, its fan-outs go.
    pub(crate) fn finish(&mut self) {
        for w in self.wires.iter_mut() {
            if let Some(f) = w.take() {
                self.spent.push(f.buf);
            }
        }
        self.msgs.clear();
        self.bytes = 0;
    }

    /// After the flush: buffers no queue holds any more are kept for reuse.
    pub(crate) fn recycle(&mut self) {
        for b in self.spent.drain(..) {
            if let Ok(mut v) = Arc::try_unwrap(b) {
                if self.pool.len() < POOL && v.capacity() <= POOL_MAX_CAPACITY {
                    v.clear();
                    self.pool.push(v);
                }
            }
        }
    }
}

/// The stretches `a..b` of `0..k` between the indexes in `skips` (sorted).
pub(crate) fn stretches(k: usize, skips: &[(ConnId, u32)], mut each: impl FnMut(usize, usize)) {
    let mut a = 0;
    for &(_, s) in skips {
        let s = s as usize;
        if s > a {
            each(a, s);
        }
        a = a.max(s + 1);
    }
    if a < k {
        each(a, k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(slot: u32) -> ConnId {
        ConnId {
            core: 0,
            slot,
            gen: 1,
        }
    }

    #[test]
    fn stretches_leave_out_the_skipped_messages() {
        let mut got = Vec::new();
        stretches(5, &[(id(1), 0), (id(1), 2), (id(1), 3)], |a, b| {
            got.push((a, b))
        });
        assert_eq!(got, [(1, 2), (4, 5)]);
        got.clear();
        stretches(3, &[], |a, b| got.push((a, b)));
        assert_eq!(got, [(0, 3)]);
        got.clear();
        stretches(2, &[(id(1), 1)], |a, b| got.push((a, b)));
        assert_eq!(got, [(0, 1)]);
    }
}
