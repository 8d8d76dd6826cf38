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

use std::collections::{HashMap, HashSet};
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

/// Bytes of an id kept inside its login's allocation; longer ids take one
/// more allocation of their own.
const INLINE_ID: usize = 22;

/// An id's bytes: short ones inline (most ids: names, numbers), so a login
/// is one allocation.
#[derive(Debug)]
enum IdBytes {
    Inline { len: u8, bytes: [u8; INLINE_ID] },
    Heap(Box<[u8]>),
}

impl IdBytes {
    fn new(id: &[u8]) -> Self {
        if id.len() <= INLINE_ID {
            let mut bytes = [0u8; INLINE_ID];
            bytes[..id.len()].copy_from_slice(id);
            IdBytes::Inline {
                len: id.len() as u8,
                bytes,
            }
        } else {
            IdBytes::Heap(id.into())
        }
    }

    #[inline]
    fn as_slice(&self) -> &[u8] {
        match self {
            IdBytes::Inline { len, bytes } => &bytes[..*len as usize],
            IdBytes::Heap(b) => b,
        }
    }
}

#[derive(Debug)]
struct Entry {
    holder: Holder,
    id: IdBytes,
}

/// A login: an id and the connection holding it with its epoch, in one
/// allocation that the directory's map and the holding connection share
/// (the map holds a thin pointer per id, the connection another). A newer
/// login of the id is a new `Login`; this one never changes.
#[derive(Debug, Clone)]
pub struct Login(triomphe::Arc<Entry>);

impl Login {
    /// The id.
    #[inline]
    pub fn id(&self) -> &[u8] {
        self.0.id.as_slice()
    }

    /// This login's epoch (see [`Directory::login`]).
    #[inline]
    pub fn epoch(&self) -> u64 {
        self.0.holder.epoch
    }

    /// The connection and epoch.
    #[inline]
    pub fn holder(&self) -> Holder {
        self.0.holder
    }
}

/// The map's element: a login, hashed and compared by its id, so the map
/// is looked up with the id's bytes.
#[derive(Debug, Clone)]
struct Key(Login);

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.0.id().hash(h);
    }
}

impl PartialEq for Key {
    fn eq(&self, o: &Self) -> bool {
        self.0.id() == o.0.id()
    }
}

impl Eq for Key {}

impl std::borrow::Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        self.0.id()
    }
}

// Ids come from the network: the hasher is seeded per process (foldhash).
type Map = HashSet<Key, RandomState>;

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
                    map: RwLock::new(HashSet::with_hasher(RandomState::default())),
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

    /// Registers `conn` as the holder of `id`. Returns the login and the
    /// one it replaced, if any (never `conn`'s own): the kick names that
    /// login's epoch, so it reaches only a connection still holding it.
    pub fn login(&self, id: &[u8], conn: ConnId) -> (Login, Option<Holder>) {
        let shard = self.shard(id);
        let mut map = shard.write();
        let epoch = self.next_epoch();
        let new = Login(triomphe::Arc::new(Entry {
            holder: Holder { conn, epoch },
            id: IdBytes::new(id),
        }));
        let replaced = map
            .replace(Key(new.clone()))
            .map(|Key(old)| old.holder())
            .filter(|old| old.conn != conn);
        shard.bump();
        (new, replaced)
    }

    /// Removes `id` if it is still held by the login with `epoch`.
    /// Returns whether it was removed.
    pub fn logout(&self, id: &[u8], epoch: u64) -> bool {
        let shard = self.shard(id);
        let mut map = shard.write();
        if map.get(id).is_some_and(|k| k.0.epoch() == epoch) {
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
        self.shard(id).read().get(id).map(|k| k.0.holder().conn)
    }

    /// The holder with its epoch.
    pub fn holder(&self, id: &[u8]) -> Option<Holder> {
        self.shard(id).read().get(id).map(|k| k.0.holder())
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
                map.get(id).map(|k| k.0.holder().conn),
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
        let (l1, k) = d.login(b"a", c(0, 1));
        assert_eq!(k, None);
        let e1 = l1.epoch();
        let (l2, k) = d.login(b"a", c(1, 1));
        let e2 = l2.epoch();
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
    fn short_and_long_ids_are_kept_whole() {
        let d = Directory::new(1);
        let long = [b'x'; 300];
        for id in [&b""[..], b"a", &[b'y'; 22], &[b'y'; 23], &long] {
            let (l, _) = d.login(id, c(0, 1));
            assert_eq!(l.id(), id);
            assert_eq!(d.lookup(id), Some(c(0, 1)));
        }
        assert_eq!(d.len(), 5, "ids differing only in length are distinct");
        assert_eq!(d.lookup(&[b'y'; 21]), None);
    }

    #[test]
    fn cache_follows_every_change() {
        let d = Directory::new(2);
        let mut cache = LookupCache::default();
        assert_eq!(cache.lookup(&d, b"a"), None);
        let e1 = d.login(b"a", c(0, 1)).0.epoch();
        assert_eq!(cache.lookup(&d, b"a"), Some(c(0, 1)));
        assert_eq!(cache.lookup(&d, b"a"), Some(c(0, 1)), "hit");
        d.login(b"a", c(1, 2));
        assert_eq!(cache.lookup(&d, b"a"), Some(c(1, 2)), "newer login seen");
        let e3 = d.login(b"a", c(1, 3)).0.epoch();
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
