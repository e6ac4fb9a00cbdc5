//! L1: the in-process tier on mini-moka, bounded in bytes.

use std::time::Duration;

use mini_moka::sync::Cache;

use crate::cache::entry::Entry;
use crate::cache::key::CacheKey;

/// Bytes charged per entry on top of its strings: mini-moka's node, deque links, hash slot and
/// frequency sketch share, and the entry itself. Measured: 300k entries into an unbounded L1
/// grew resident memory by 413 bytes per entry with the key strings allocated outside the cache
/// (release build, glibc malloc); rounded up.
pub(crate) const ENTRY_OVERHEAD: usize = 448;

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
        if self.max_bytes > 0 {
            self.cache.insert(key, entry);
        }
    }

    pub(crate) fn remove(&self, key: &CacheKey) {
        self.cache.invalidate(key);
    }

    pub(crate) fn clear(&self) {
        self.cache.invalidate_all();
    }

    /// Runs pending maintenance (eviction, counts) now; reads and writes otherwise do it in
    /// batches.
    pub(crate) fn sync(&self) {
        mini_moka::sync::ConcurrentCacheExt::sync(&self.cache);
    }

    /// (entries, weighted bytes, bound in bytes), after pending maintenance.
    pub(crate) fn usage(&self) -> (u64, u64, u64) {
        self.sync();
        (self.cache.entry_count(), self.cache.weighted_size(), self.max_bytes)
    }
}
