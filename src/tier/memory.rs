//! L1: the in-process tier on mini-moka, bounded in bytes.

use std::time::Duration;

use mini_moka::sync::{Cache, ConcurrentCacheExt};

use crate::cache::entry::Entry;
use crate::cache::key::CacheKey;

/// Bytes charged per entry on top of its strings: mini-moka's node, deque links and hash slot,
/// the key's three `Arc<str>` headers and the entry itself. Measured with
/// `cargo test --release --test l1_bound -- --nocapture` (resident memory per entry at 1M entries).
pub(crate) const ENTRY_OVERHEAD: usize = 320;

pub(crate) struct MemoryTier {
    cache: Cache<CacheKey, Entry>,
    max_bytes: u64,
}

impl MemoryTier {
    /// `ttl` is only for space reclamation: reads check each entry's own deadline.
    pub(crate) fn new(max_bytes: u64, ttl: Duration) -> Self {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|k: &CacheKey, v: &Entry| {
                u32::try_from(ENTRY_OVERHEAD + k.heap_bytes() + v.heap_bytes()).unwrap_or(u32::MAX)
            })
            .time_to_live(ttl)
            .build();
        Self { cache, max_bytes }
    }

    pub(crate) fn get(&self, key: &CacheKey) -> Option<Entry> {
        self.cache.get(key)
    }

    pub(crate) fn insert(&self, key: CacheKey, entry: Entry) {
        self.cache.insert(key, entry);
    }

    pub(crate) fn remove(&self, key: &CacheKey) {
        self.cache.invalidate(key);
    }

    pub(crate) fn clear(&self) {
        self.cache.invalidate_all();
    }

    /// Runs pending maintenance (eviction) now; reads and writes otherwise do it in batches.
    #[cfg(test)]
    pub(crate) fn sync(&self) {
        self.cache.sync();
    }

    /// (entries, weighted bytes, bound in bytes), approximate.
    pub(crate) fn usage(&self) -> (u64, u64, u64) {
        (self.cache.entry_count(), self.cache.weighted_size(), self.max_bytes)
    }
}
