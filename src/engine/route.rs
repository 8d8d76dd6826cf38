//! What protocol adapters may touch besides the connection they are
//! reading ([`Ctx`]), and the local actions they leave for the core to apply
//! after the reads ([`Actions`]): adapters never touch another connection's
//! state, so a delivery to a connection on the same core waits in a list.

use super::conn::Timing;
use super::directory::{Directory, LookupCache};
use super::mesh::Outgoing;
use super::metrics::CoreMetrics;
use super::ConnId;
use crate::config::Config;

/// Local actions, applied by the core after the reads, in order.
#[derive(Debug, Default)]
pub struct Actions {
    /// Bytes of local deliveries, back to back (one buffer per iteration).
    pub data: Vec<u8>,
    /// Deliveries to connections on this core: (to, start, len).
    pub local: Vec<(ConnId, u32, u32)>,
    /// Local connections replaced by a newer login.
    pub kicks: Vec<ConnId>,
}

impl Actions {
    /// Adds a local delivery of `parts` (concatenated).
    #[inline]
    pub fn deliver(&mut self, to: ConnId, parts: &[&[u8]]) {
        let start = self.data.len() as u32;
        for p in parts {
            self.data.extend_from_slice(p);
        }
        self.local.push((to, start, self.data.len() as u32 - start));
    }
}

/// Everything an adapter may touch besides the connection.
pub struct Ctx<'a> {
    /// This core's index.
    pub core: u16,
    /// The configuration.
    pub cfg: &'a Config,
    /// The directory.
    pub dir: &'a Directory,
    /// This core's lookup cache.
    pub cache: &'a mut LookupCache,
    /// This core's counters.
    pub metrics: &'a CoreMetrics,
    /// Cross-core batches.
    pub mesh: &'a mut Outgoing,
    /// Local actions.
    pub actions: &'a mut Actions,
    /// Current tick.
    pub now: u64,
    /// Deadlines in ticks.
    pub timing: Timing,
}

impl Ctx<'_> {
    /// Registers `id` for `me` (last login wins) and arranges the kick of the
    /// connection it replaces. Returns the login epoch.
    pub fn login(&mut self, id: &[u8], me: ConnId) -> u64 {
        let (epoch, replaced) = self.dir.login(id, me);
        if let Some(old) = replaced {
            if old.core == self.core {
                self.actions.kicks.push(old);
            } else {
                self.mesh.kick(old.core as usize, old);
            }
        }
        epoch
    }

    /// Sends `parts` (one frame, concatenated) to the connection holding
    /// `to`, wherever it lives. Returns false if nobody holds it.
    pub fn send_to_id(&mut self, to: &[u8], parts: &[&[u8]]) -> bool {
        match self.cache.lookup(self.dir, to) {
            None => false,
            Some(dst) if dst.core == self.core => {
                self.actions.deliver(dst, parts);
                true
            }
            Some(dst) => {
                self.metrics.cross_core.inc();
                self.mesh.deliver(dst.core as usize, dst, parts);
                true
            }
        }
    }
}
