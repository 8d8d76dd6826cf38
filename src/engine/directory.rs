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
//!
//! Lookups (one per relayed message) must not write shared memory, or the
//! lock's reader count bounces between cores on every message. Each core
//! keeps a [`LookupCache`]; an entry is valid while its shard's `version`
//! (bumped under the write lock on every change, on its own cache line) is
//! the one read when the entry was filled under the read lock. In steady
//! state a lookup is a local hash probe plus one shared, unwritten load.

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
// The key is the same allocation as the holding connection's `Login::id`
// (one copy of each id per login, not two).
type Map = HashMap<std::sync::Arc<[u8]>, Holder, RandomState>;

/// One shard: the map and its change counter, each on its own cache line so
/// readers of `version` are not disturbed by lock traffic.
#[derive(Debug)]
#[repr(align(128))]
struct Shard {
    map: RwLock<Map>,
    version: Padded,
}

#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded(AtomicU64);

impl Shard {
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Map> {
        self.map.write().unwrap_or_else(|p| p.into_inner())
    }
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Map> {
        self.map.read().unwrap_or_else(|p| p.into_inner())
    }
    /// Marks a change; call with the write lock held.
    fn bump(&self) {
        self.version.0.fetch_add(1, Ordering::Release);
    }
}

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
                .map(|_| Shard {
                    map: RwLock::new(HashMap::with_hasher(RandomState::default())),
                    version: Padded::default(),
                })
                .collect(),
            hasher: RandomState::default(),
            epoch: AtomicU64::new(1),
        }
    }

    /// The next login's epoch: microseconds since the Unix epoch, or one
    /// more than the last if the clock has not moved on (or went back). So
    /// epochs order one node's logins exactly, and different nodes' logins
    /// by their clocks (used only to settle an id held on two nodes after a
    /// Redis outage).
    fn next_epoch(&self) -> u64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let mut cur = self.epoch.load(Ordering::Relaxed);
        loop {
            let next = cur.saturating_add(1).max(now);
            match self
                .epoch
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(c) => cur = c,
            }
        }
    }

    #[inline]
    fn shard_index(&self, id: &[u8]) -> usize {
        self.hasher.hash_one(id) as usize & (self.shards.len() - 1)
    }

    #[inline]
    fn shard(&self, id: &[u8]) -> &Shard {
        &self.shards[self.shard_index(id)]
    }

    /// Registers `conn` as the holder of `id`. Returns the new epoch and the
    /// login it replaced, if any (never `conn`'s own): the kick names that
    /// login's epoch, so it reaches only a connection still holding it.
    pub fn login(&self, id: &[u8], conn: ConnId) -> (u64, Option<Holder>) {
        self.login_shared(&id.into(), conn)
    }

    /// As [`Directory::login`], keeping `id` itself as the key (the
    /// connection's `Login::id` shares it).
    pub fn login_shared(&self, id: &std::sync::Arc<[u8]>, conn: ConnId) -> (u64, Option<Holder>) {
        let shard = self.shard(id);
        let mut map = shard.write();
        let epoch = self.next_epoch();
        let new = Holder { conn, epoch };
        let replaced = match map.entry(id.clone()) {
            MapEntry::Occupied(mut e) => {
                let old = e.insert(new);
                (old.conn != conn).then_some(old)
            }
            MapEntry::Vacant(e) => {
                e.insert(new);
                None
            }
        };
        shard.bump();
        (epoch, replaced)
    }

    /// Removes `id` if it is still held by the login with `epoch`.
    /// Returns whether it was removed.
    pub fn logout(&self, id: &[u8], epoch: u64) -> bool {
        let shard = self.shard(id);
        let mut map = shard.write();
        if map.get(id).is_some_and(|h| h.epoch == epoch) {
            map.remove(id);
            shard.bump();
            true
        } else {
            false
        }
    }

    /// The connection currently holding `id` (takes the shard's read lock;
    /// cores use [`LookupCache::lookup`] on the hot path).
    pub fn lookup(&self, id: &[u8]) -> Option<ConnId> {
        self.shard(id).read().get(id).map(|h| h.conn)
    }

    /// The holder with its epoch.
    pub fn holder(&self, id: &[u8]) -> Option<Holder> {
        self.shard(id).read().get(id).copied()
    }

    /// Number of ids registered (walks every shard; for reports).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }

    /// True if no id is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Entries a core's cache holds before it starts over (bounds its memory
/// whatever the id churn).
pub const CACHE_MAX_ENTRIES: usize = 1 << 16;

/// One core's cache of directory lookups (see the module doc).
#[derive(Debug, Default)]
pub struct LookupCache {
    /// Misses too (None): with a cluster, a transfer to an id held on
    /// another node looks it up here first, once per message.
    map: HashMap<Box<[u8]>, (Option<ConnId>, u64), RandomState>,
}

impl LookupCache {
    /// The connection holding `id`, as the directory says now.
    #[inline]
    pub fn lookup(&mut self, dir: &Directory, id: &[u8]) -> Option<ConnId> {
        let shard = &dir.shards[dir.shard_index(id)];
        let version = shard.version.0.load(Ordering::Acquire);
        if let Some(&(conn, v)) = self.map.get(id) {
            if v == version {
                return conn;
            }
        }
        // Slow path: read the map and the version together under the lock,
        // so the pair is consistent (versions change only under the write lock).
        let (found, version) = {
            let map = shard.read();
            (
                map.get(id).map(|h| h.conn),
                shard.version.0.load(Ordering::Relaxed),
            )
        };
        if let Some(e) = self.map.get_mut(id) {
            *e = (found, version);
        } else {
            if self.map.len() >= CACHE_MAX_ENTRIES {
                self.map.clear();
            }
            self.map.insert(id.into(), (found, version));
        }
        found
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True if empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
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
        assert_eq!(
            k,
            Some(Holder {
                conn: c(0, 1),
                epoch: e1
            })
        );
        assert!(e2 > e1);
        assert!(!d.logout(b"a", e1), "old login must not remove the new one");
        assert_eq!(d.lookup(b"a"), Some(c(1, 1)));
        assert!(d.logout(b"a", e2));
        assert_eq!(d.lookup(b"a"), None);
    }

    #[test]
    fn cache_follows_every_change() {
        let d = Directory::new(2);
        let mut cache = LookupCache::default();
        assert_eq!(cache.lookup(&d, b"a"), None);
        let (e1, _) = d.login(b"a", c(0, 1));
        assert_eq!(cache.lookup(&d, b"a"), Some(c(0, 1)));
        assert_eq!(cache.lookup(&d, b"a"), Some(c(0, 1)), "hit");
        d.login(b"a", c(1, 2));
        assert_eq!(cache.lookup(&d, b"a"), Some(c(1, 2)), "newer login seen");
        let (e3, _) = d.login(b"a", c(1, 3));
        assert!(!d.logout(b"a", e1));
        assert_eq!(cache.lookup(&d, b"a"), Some(c(1, 3)));
        assert!(d.logout(b"a", e3));
        assert_eq!(cache.lookup(&d, b"a"), None, "logout seen");
        // The miss is cached too (a transfer to an id on another node
        // looks it up per message), and a later login still shows.
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.lookup(&d, b"a"), None, "cached miss");
        d.login(b"a", c(0, 4));
        assert_eq!(cache.lookup(&d, b"a"), Some(c(0, 4)), "login after a miss");
    }
}
