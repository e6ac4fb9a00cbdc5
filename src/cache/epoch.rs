//! Epochs: O(1) invalidation at every scope, race-free against in-flight computations.
//!
//! The cache keeps a counter for the global scope and one per principal, resource and entry
//! that has been invalidated. An entry stores the counters read *before* its authorizer call;
//! an entry whose counters differ from the current ones is a miss. Invalidating is bumping a
//! counter.
//!
//! Counter values come from one strictly increasing source, so a value, once replaced, never
//! comes back. A scope that has never been bumped (or was forgotten) reads as 0. A scope whose
//! last bump is older than `forget_after` (longest ttl + authorizer timeout + margin) is
//! forgotten: every entry stamped before that bump has expired by then, so reading 0 again can
//! only turn entries into misses. Scope maps are keyed by a keyed 64-bit hash: a collision makes
//! two scopes share a counter, which again can only cause extra misses.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::cache::key::CacheKey;

/// Scope maps larger than this are dropped wholesale after a global bump, which keeps memory
/// bounded even under an invalidation flood (at the price of one global miss wave).
const HARD_CAP: usize = 1 << 20;

/// The epochs an entry was computed under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(crate) struct EpochStamp {
    pub(crate) global: u64,
    pub(crate) principal: u64,
    pub(crate) resource: u64,
    pub(crate) entry: u64,
}

#[derive(Clone, Copy)]
struct Slot {
    value: u64,
    bumped_at_ms: u64,
}

struct ScopeMap {
    len: AtomicUsize,
    map: RwLock<HashMap<u64, Slot>>,
    sweep_at: AtomicUsize,
}

impl ScopeMap {
    fn new() -> Self {
        Self { len: AtomicUsize::new(0), map: RwLock::new(HashMap::new()), sweep_at: AtomicUsize::new(1024) }
    }

    /// The counter of the scope hashed by `hash`; the hash is only computed when the map is
    /// not empty (the common case on a quiet system is no lock and no hashing at all).
    fn get(&self, hash: impl FnOnce() -> u64) -> u64 {
        if self.len.load(Ordering::Acquire) == 0 {
            return 0;
        }
        let h = hash();
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        map.get(&h).map_or(0, |s| s.value)
    }

    /// Sets `h` to `value`; returns the map's size afterwards.
    fn set(&self, h: u64, value: u64, now_ms: u64, forget_after_ms: u64) -> usize {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        map.insert(h, Slot { value, bumped_at_ms: now_ms });
        if map.len() >= self.sweep_at.load(Ordering::Relaxed) {
            map.retain(|_, s| now_ms.saturating_sub(s.bumped_at_ms) < forget_after_ms);
            self.sweep_at.store((map.len() * 2).max(1024), Ordering::Relaxed);
        }
        self.len.store(map.len(), Ordering::Release);
        map.len()
    }

    fn clear(&self) {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        map.clear();
        self.len.store(0, Ordering::Release);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }
}

pub(crate) struct Epochs {
    source: AtomicU64,
    global: AtomicU64,
    principals: ScopeMap,
    resources: ScopeMap,
    entries: ScopeMap,
    hasher: RandomState,
    forget_after_ms: u64,
}

impl Epochs {
    pub(crate) fn new(forget_after_ms: u64) -> Self {
        Self {
            source: AtomicU64::new(0),
            global: AtomicU64::new(0),
            principals: ScopeMap::new(),
            resources: ScopeMap::new(),
            entries: ScopeMap::new(),
            hasher: RandomState::new(),
            forget_after_ms,
        }
    }

    fn next(&self) -> u64 {
        self.source.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The epochs that currently cover `key`.
    pub(crate) fn stamp(&self, key: &CacheKey) -> EpochStamp {
        let global = self.global.load(Ordering::Acquire);
        let principal = self.principals.get(|| self.hasher.hash_one(&*key.principal));
        let resource = self.resources.get(|| self.hasher.hash_one(&*key.resource));
        let entry = self.entries.get(|| self.hasher.hash_one(key));
        EpochStamp { global, principal, resource, entry }
    }

    pub(crate) fn bump_all(&self) {
        let v = self.next();
        self.global.store(v, Ordering::Release);
    }

    pub(crate) fn bump_principal(&self, id: &str, now_ms: u64) {
        let v = self.next();
        let n = self.principals.set(self.hasher.hash_one(id), v, now_ms, self.forget_after_ms);
        self.cap(n);
    }

    pub(crate) fn bump_resource(&self, resource: &str, now_ms: u64) {
        let v = self.next();
        let n = self.resources.set(self.hasher.hash_one(resource), v, now_ms, self.forget_after_ms);
        self.cap(n);
    }

    pub(crate) fn bump_entry(&self, key: &CacheKey, now_ms: u64) {
        let v = self.next();
        let n = self.entries.set(self.hasher.hash_one(key), v, now_ms, self.forget_after_ms);
        self.cap(n);
    }

    /// Past the hard cap, a global bump invalidates everything, after which no per-scope counter
    /// is needed any more.
    fn cap(&self, len: usize) {
        if len > HARD_CAP {
            self.bump_all();
            self.principals.clear();
            self.resources.clear();
            self.entries.clear();
            tracing::warn!(target: "authz_cache::audit", scopes = len, "epoch map over its cap: invalidated everything");
        }
    }

    #[cfg(test)]
    pub(crate) fn tracked_scopes(&self) -> usize {
        self.principals.len() + self.resources.len() + self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn key(p: &str, r: &str) -> CacheKey {
        CacheKey { principal: Arc::from(p), resource: Arc::from(r), action: Arc::from("read") }
    }

    #[test]
    fn a_stamp_taken_before_a_bump_never_matches_after_it() {
        let e = Epochs::new(1000);
        let k = key("bob", "doc:1");
        let other = key("alice", "doc:2");
        let before = e.stamp(&k);
        e.bump_principal("bob", 0);
        assert_ne!(e.stamp(&k), before);
        assert_eq!(e.stamp(&other), EpochStamp::default(), "other scopes untouched");
        let s = e.stamp(&k);
        e.bump_resource("doc:1", 0);
        assert_ne!(e.stamp(&k), s);
        let s = e.stamp(&k);
        e.bump_entry(&k, 0);
        assert_ne!(e.stamp(&k), s);
        let s = e.stamp(&k);
        let o = e.stamp(&other);
        e.bump_all();
        assert_ne!(e.stamp(&k), s);
        assert_ne!(e.stamp(&other), o);
    }

    #[test]
    fn forgotten_scopes_never_bring_an_old_stamp_back() {
        // forget_after = 10 ms; sweeps start at 1024 scopes.
        let e = Epochs::new(10);
        let k = key("bob", "doc:1");
        e.bump_principal("bob", 0);
        let stamped_after_first_bump = e.stamp(&k);
        // Age every slot out, then force a sweep with many other bumps.
        for i in 0..2048 {
            e.bump_principal(&format!("user{i}"), 100);
        }
        assert_eq!(e.tracked_scopes(), 2048, "bob, bumped long ago, was forgotten");
        assert_eq!(e.stamp(&k).principal, 0, "bob was forgotten");
        e.bump_principal("bob", 200);
        assert_ne!(e.stamp(&k), stamped_after_first_bump, "a new bump never reuses a value");
    }

    #[test]
    fn the_hard_cap_turns_into_a_global_bump() {
        let e = Epochs::new(u64::MAX);
        let k = key("bob", "doc:1");
        let s = e.stamp(&k);
        for i in 0..=HARD_CAP {
            e.bump_resource(&i.to_string(), 0);
        }
        assert_eq!(e.tracked_scopes(), 0);
        assert_ne!(e.stamp(&k).global, s.global);
    }
}
