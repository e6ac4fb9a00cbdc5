//! L1: the in-process tier on mini-moka, bounded in bytes, with a small per-thread front.
//!
//! A mini-moka read costs about 0.25 µs (a clock read, hashing, a read-log entry). Each thread
//! keeps a direct-mapped front of the last entries it read or wrote ([`FRONT_SLOTS`] slots), so a
//! hot key costs a short hash and a string compare. The front holds copies of L1 entries; every
//! read of either is checked by the caller against the entry's deadline and epochs, so a copy is
//! exactly as safe as the original: L1 entries are only removed when they expired or an epoch
//! bump already made them stale. The front adds at most `FRONT_SLOTS` entries per thread to
//! the L1 bound.

use std::time::Duration;

use mini_moka::sync::Cache;

use crate::cache::entry::Entry;
use crate::cache::key::CacheKey;

/// Bytes charged per entry on top of its strings: mini-moka's node, deque links, hash slot and
/// frequency sketch share, and the entry itself. Measured: 300k entries into an unbounded L1
/// grew resident memory by 413 bytes per entry with the key strings allocated outside the cache
/// (release build, glibc malloc); rounded up.
pub(crate) const ENTRY_OVERHEAD: usize = 448;

/// Slots in each thread's front.
pub(crate) const FRONT_SLOTS: usize = 256;

pub(crate) struct MemoryTier {
    cache: Cache<CacheKey, Entry>,
    max_bytes: u64,
    id: u64,
}

struct FrontSlot {
    tier: u64,
    key: CacheKey,
    entry: Entry,
}

thread_local! {
    static FRONT: std::cell::RefCell<Vec<Option<FrontSlot>>> =
        std::cell::RefCell::new((0..FRONT_SLOTS).map(|_| None).collect());
}

/// A multiply-xor hash over the tuple, eight bytes at a time: cheap, and a collision only costs
/// a trip to mini-moka (nor can a caller choose collisions to any effect beyond that).
fn front_index(key: &CacheKey) -> usize {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [&key.principal, &key.resource, &key.action] {
        let bytes = part.as_bytes();
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            h = (h ^ u64::from_le_bytes(word)).wrapping_mul(K);
        }
        let mut tail = [0u8; 8];
        tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
        // The length ends each part, so ("ab", "c") and ("a", "bc") differ.
        h = (h ^ u64::from_le_bytes(tail)).wrapping_mul(K) ^ bytes.len() as u64;
        h = h.rotate_left(29).wrapping_mul(K);
    }
    (h ^ (h >> 32)) as usize % FRONT_SLOTS
}

fn same_key(a: &CacheKey, b: &CacheKey) -> bool {
    let eq = |x: &std::sync::Arc<str>, y: &std::sync::Arc<str>| std::sync::Arc::ptr_eq(x, y) || x == y;
    eq(&a.principal, &b.principal) && eq(&a.resource, &b.resource) && eq(&a.action, &b.action)
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
        static IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Self { cache, max_bytes, id: IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) }
    }

    pub(crate) fn get(&self, key: &CacheKey) -> Option<Entry> {
        if self.max_bytes == 0 {
            return None;
        }
        let idx = front_index(key);
        let front = FRONT.with_borrow(|f| match &f[idx] {
            Some(slot) if slot.tier == self.id && same_key(&slot.key, key) => Some(slot.entry.clone()),
            _ => None,
        });
        if front.is_some() {
            return front;
        }
        let entry = self.cache.get(key)?;
        self.remember(idx, key.clone(), entry.clone());
        Some(entry)
    }

    /// The entry in mini-moka, past this thread's front (which then holds it). `None` when it
    /// is not there, or is the very copy the front held.
    pub(crate) fn reload(&self, key: &CacheKey) -> Option<Entry> {
        if self.max_bytes == 0 {
            return None;
        }
        let entry = self.cache.get(key)?;
        let idx = front_index(key);
        let same = FRONT.with_borrow(|f| {
            f[idx].as_ref().is_some_and(|s| s.tier == self.id && same_key(&s.key, key) && s.entry == entry)
        });
        if same {
            return None;
        }
        self.remember(idx, key.clone(), entry.clone());
        Some(entry)
    }

    fn remember(&self, idx: usize, key: CacheKey, entry: Entry) {
        FRONT.with_borrow_mut(|f| f[idx] = Some(FrontSlot { tier: self.id, key, entry }));
    }

    pub(crate) fn insert(&self, key: CacheKey, entry: Entry) {
        if self.max_bytes > 0 {
            self.remember(front_index(&key), key.clone(), entry.clone());
            self.cache.insert(key, entry);
        }
    }

    /// Removes an entry. Only ever called for entries that expired or that an epoch bump
    /// already made stale, so copies in other threads' fronts are already unusable.
    pub(crate) fn remove(&self, key: &CacheKey) {
        let idx = front_index(key);
        FRONT.with_borrow_mut(|f| {
            if f[idx].as_ref().is_some_and(|s| s.tier == self.id && same_key(&s.key, key)) {
                f[idx] = None;
            }
        });
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
