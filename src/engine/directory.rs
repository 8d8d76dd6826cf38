//! Directory: client id -> the connection logged in with it, server-wide.
//!
//! Last login wins across cores. Each login takes a global epoch *under the
//! shard's write lock*, so the order of epochs is the order in which logins
//! took the id, and the entry always holds the newest. The connection it
//! replaced is returned to the caller, which kicks it (directly if local,
//! through the mesh otherwise). A connection's cleanup removes the entry only
//! if it still holds that connection's epoch, so a kicked connection can never
//! unregister its successor.
//!
//! Locks are sharded (many more shards than cores) and held only for one hash
//! map operation, never across I/O; the wait is bounded by that.

use std::collections::hash_map::{Entry as MapEntry, HashMap};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use foldhash::fast::RandomState;

use super::ConnId;

/// Who holds an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder {
    /// The connection.
    pub conn: ConnId,
    /// The login's epoch (global order of logins).
    pub epoch: u64,
}

// Ids come from the network: the hasher is seeded per process (foldhash).
type Shard = RwLock<HashMap<Box<[u8]>, Holder, RandomState>>;

/// The directory.
#[derive(Debug)]
pub struct Directory {
    shards: Box<[Shard]>,
    hasher: RandomState,
    epoch: AtomicU64,
}

impl Directory {
    /// A directory sized for `workers` cores.
    pub fn new(workers: usize) -> Self {
        let n = (workers * 16).next_power_of_two().max(64);
        Directory {
            shards: (0..n)
                .map(|_| RwLock::new(HashMap::with_hasher(RandomState::default())))
                .collect(),
            hasher: RandomState::default(),
            epoch: AtomicU64::new(1),
        }
    }

    #[inline]
    fn shard(&self, id: &[u8]) -> &Shard {
        let h = self.hasher.hash_one(id) as usize;
        &self.shards[h & (self.shards.len() - 1)]
    }

    /// Registers `conn` as the holder of `id`. Returns the new epoch and the
    /// connection it replaced, if any (never `conn` itself).
    pub fn login(&self, id: &[u8], conn: ConnId) -> (u64, Option<ConnId>) {
        let mut map = self.shard(id).write().unwrap_or_else(|p| p.into_inner());
        let epoch = self.epoch.fetch_add(1, Ordering::Relaxed);
        let new = Holder { conn, epoch };
        match map.entry(id.into()) {
            MapEntry::Occupied(mut e) => {
                let old = e.insert(new);
                (epoch, (old.conn != conn).then_some(old.conn))
            }
            MapEntry::Vacant(e) => {
                e.insert(new);
                (epoch, None)
            }
        }
    }

    /// Removes `id` if it is still held by the login with `epoch`.
    /// Returns whether it was removed.
    pub fn logout(&self, id: &[u8], epoch: u64) -> bool {
        let mut map = self.shard(id).write().unwrap_or_else(|p| p.into_inner());
        if map.get(id).is_some_and(|h| h.epoch == epoch) {
            map.remove(id);
            true
        } else {
            false
        }
    }

    /// The connection currently holding `id`.
    #[inline]
    pub fn lookup(&self, id: &[u8]) -> Option<ConnId> {
        let map = self.shard(id).read().unwrap_or_else(|p| p.into_inner());
        map.get(id).map(|h| h.conn)
    }

    /// The holder with its epoch.
    pub fn holder(&self, id: &[u8]) -> Option<Holder> {
        let map = self.shard(id).read().unwrap_or_else(|p| p.into_inner());
        map.get(id).copied()
    }

    /// Number of ids registered (walks every shard; for reports).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    /// True if no id is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(core: u16, gen: u64) -> ConnId {
        ConnId { core, slot: 0, gen }
    }

    #[test]
    fn last_login_wins_and_old_cleanup_is_harmless() {
        let d = Directory::new(2);
        let (e1, k) = d.login(b"a", c(0, 1));
        assert_eq!(k, None);
        let (e2, k) = d.login(b"a", c(1, 1));
        assert_eq!(k, Some(c(0, 1)));
        assert!(e2 > e1);
        assert!(!d.logout(b"a", e1), "old login must not remove the new one");
        assert_eq!(d.lookup(b"a"), Some(c(1, 1)));
        assert!(d.logout(b"a", e2));
        assert_eq!(d.lookup(b"a"), None);
    }
}
