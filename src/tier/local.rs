//! The in-process tier (L1) behind a small public trait, [`LocalTier`] (docs and an example
//! on the trait).

use crate::cache::entry::Entry;
use crate::cache::key::CacheKey;
use crate::tier::memory::MemoryTier;

pub use crate::cache::entry::Entry as LocalEntry;
pub use crate::cache::key::CacheKey as LocalKey;

impl CacheKey {
    /// The principal's id.
    pub fn principal(&self) -> &str {
        &self.principal
    }

    /// The resource.
    pub fn resource(&self) -> &str {
        &self.resource
    }

    /// The action.
    pub fn action(&self) -> &str {
        &self.action
    }

    /// Approximate heap bytes the key holds, for weighing.
    pub fn weight(&self) -> usize {
        self.heap_bytes()
    }
}

impl Entry {
    /// Approximate heap bytes the entry holds, for weighing.
    pub fn weight(&self) -> usize {
        self.heap_bytes()
    }
}

/// What an L1 holds, for stats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LocalUsage {
    /// Entries held.
    pub entries: u64,
    /// Bytes held (approximate).
    pub bytes: u64,
    /// The bound in bytes (0: none known).
    pub max_bytes: u64,
}

impl LocalUsage {
    /// A usage report.
    pub fn new(entries: u64, bytes: u64, max_bytes: u64) -> Self {
        Self { entries, bytes, max_bytes }
    }
}

/// The in-process tier (L1) behind a small public trait, [`LocalTier`]. The default is the
/// mini-moka tier with its per-thread front (`memory.rs`), bounded by
/// [`AuthzCacheBuilder::l1_max_bytes`](crate::AuthzCacheBuilder::l1_max_bytes); give your own
/// with [`AuthzCacheBuilder::l1`](crate::AuthzCacheBuilder::l1).
///
/// An L1 stores [`LocalEntry`]s under [`LocalKey`]s and decides nothing: every entry it returns
/// is checked by the cache against its deadline and the current epochs, so an L1 that keeps an
/// entry too long, or returns a stale copy, costs a miss, never a wrong answer. `get` is on the
/// hit path of every request: it must not block, and should not allocate (the default does
/// neither: a copy of an entry is a few reference counts).
///
/// ```
/// use std::collections::HashMap;
/// use std::sync::Mutex;
/// use tower_authz_cache::tier::{LocalEntry, LocalKey, LocalTier, LocalUsage};
/// use tower_authz_cache::{AuthzCache, Decision, Permission, Principal};
///
/// /// An unbounded L1 in a HashMap (for tests; a real one bounds its size).
/// #[derive(Default)]
/// struct MapL1(Mutex<HashMap<LocalKey, LocalEntry>>);
///
/// impl LocalTier for MapL1 {
///     fn get(&self, key: &LocalKey) -> Option<LocalEntry> {
///         self.0.lock().unwrap().get(key).cloned()
///     }
///     fn insert(&self, key: LocalKey, entry: LocalEntry) {
///         self.0.lock().unwrap().insert(key, entry);
///     }
///     fn remove(&self, key: &LocalKey) {
///         self.0.lock().unwrap().remove(key);
///     }
///     fn clear(&self) {
///         self.0.lock().unwrap().clear();
///     }
///     fn usage(&self) -> LocalUsage {
///         LocalUsage::new(self.0.lock().unwrap().len() as u64, 0, 0)
///     }
/// }
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let cache = AuthzCache::builder(|_: Principal, _: Permission| async {
///     Ok::<_, std::convert::Infallible>(Decision::allow())
/// })
/// .l1(MapL1::default())
/// .build();
/// let (bob, read) = (Principal::new("bob"), Permission::new("documents:1", "read"));
/// cache.check(&bob, &read).await.unwrap();
/// cache.check(&bob, &read).await.unwrap();
/// assert_eq!((cache.stats().tiers.l1.hits, cache.stats().authorizer_calls), (1, 1));
/// # });
/// ```
pub trait LocalTier: Send + Sync + 'static {
    /// The entry under `key`, if held (the cache checks it).
    fn get(&self, key: &LocalKey) -> Option<LocalEntry>;

    /// Stores an entry (it may be evicted at any time).
    fn insert(&self, key: LocalKey, entry: LocalEntry);

    /// Removes an entry (only called for entries already dead: expired, or invalidated).
    fn remove(&self, key: &LocalKey);

    /// Removes every entry (after a global invalidation, for space: the entries are already dead).
    fn clear(&self);

    /// What it holds.
    fn usage(&self) -> LocalUsage;

    /// Runs pending housekeeping now (tests and stats; default: nothing).
    fn sync(&self) {}
}

/// The cache's L1: the default one, dispatched without a virtual call (the hit path is a branch
/// on a discriminant away from the pre-trait code), or the user's.
pub(crate) enum L1 {
    Moka(MemoryTier),
    Custom(Box<dyn LocalTier>),
}

impl L1 {
    #[inline]
    pub(crate) fn get(&self, key: &CacheKey) -> Option<Entry> {
        match self {
            L1::Moka(m) => m.get(key),
            L1::Custom(c) => c.get(key),
        }
    }

    /// The entry as the shared map has it now, past any per-thread copy: for a copy that turned
    /// out expired or stale (another thread may have put a newer entry since).
    pub(crate) fn reload(&self, key: &CacheKey) -> Option<Entry> {
        match self {
            L1::Moka(m) => m.reload(key),
            // A user's L1 has no per-thread copies: what `get` returned is the latest.
            L1::Custom(_) => None,
        }
    }

    pub(crate) fn insert(&self, key: CacheKey, entry: Entry) {
        match self {
            L1::Moka(m) => m.insert(key, entry),
            L1::Custom(c) => c.insert(key, entry),
        }
    }

    pub(crate) fn remove(&self, key: &CacheKey) {
        match self {
            L1::Moka(m) => m.remove(key),
            L1::Custom(c) => c.remove(key),
        }
    }

    pub(crate) fn clear(&self) {
        match self {
            L1::Moka(m) => m.clear(),
            L1::Custom(c) => c.clear(),
        }
    }

    #[cfg(test)]
    pub(crate) fn sync(&self) {
        match self {
            L1::Moka(m) => m.sync(),
            L1::Custom(c) => c.sync(),
        }
    }

    /// (entries, weighted bytes, bound in bytes), after pending maintenance.
    pub(crate) fn usage(&self) -> (u64, u64, u64) {
        match self {
            L1::Moka(m) => m.usage(),
            L1::Custom(c) => {
                let u = c.usage();
                (u.entries, u.bytes, u.max_bytes)
            }
        }
    }
}
