//! Epochs: O(1) invalidation at every scope, race-free against in-flight computations.
//!
//! The cache keeps a counter for the global scope and one per principal, resource and entry
//! that has been invalidated. An entry stores the counters read *before* its authorizer call;
//! an entry whose counters differ from the current ones is a miss. Invalidating is bumping a
//! counter.
//!
//! Counter values are strictly increasing and never reused: each new value is
//! `max(last value + 1, now in µs)`, in this process and in the shared store (where a Lua script
//! does the same), so values from different processes, and from before a restart of the shared
//! store, still order correctly. Values received from other processes are merged with `max`.
//!
//! A scope that has never been bumped (or was forgotten) reads as 0. A scope whose last bump is
//! older than `forget_after` (longest ttl + authorizer timeout + margin) is forgotten: every
//! entry stamped before that bump has expired by then, so reading 0 again can only turn entries
//! into misses. Scope maps are keyed by a keyed 64-bit hash shared by every process (see
//! `key.rs`): a collision makes two scopes share a counter, which can only cause extra misses.
//!
//! A fifth, process-local counter, `local`, covers everything in this process's L1: it is
//! bumped when this process may have missed invalidations (its backplane was silent for too
//! long), which drops every L1 entry and every computation in flight at once.

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::cache::key::{CacheKey, Keys, Scope};

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
    /// Process-local; never leaves the process.
    pub(crate) local: u64,
}

impl EpochStamp {
    /// The part shared with other processes.
    pub(crate) fn shared(&self) -> [u64; 4] {
        [self.global, self.principal, self.resource, self.entry]
    }

    pub(crate) fn from_shared(v: [u64; 4]) -> Self {
        Self { global: v[0], principal: v[1], resource: v[2], entry: v[3], local: 0 }
    }
}

/// The scope hashes of one key.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ScopeHashes {
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

    /// Raises `h` to at least `value`; returns the map's size afterwards.
    fn raise(&self, h: u64, value: u64, now_ms: u64, forget_after_ms: u64) -> usize {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        let slot = map.entry(h).or_insert(Slot { value: 0, bumped_at_ms: now_ms });
        if value > slot.value {
            *slot = Slot { value, bumped_at_ms: now_ms };
        }
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
    local: AtomicU64,
    principals: ScopeMap,
    resources: ScopeMap,
    entries: ScopeMap,
    keys: Keys,
    forget_after_ms: u64,
}

/// Microseconds since the Unix epoch: the floor of every new epoch value.
pub(crate) fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

impl Epochs {
    pub(crate) fn new(keys: Keys, forget_after_ms: u64) -> Self {
        Self {
            source: AtomicU64::new(0),
            global: AtomicU64::new(0),
            local: AtomicU64::new(0),
            principals: ScopeMap::new(),
            resources: ScopeMap::new(),
            entries: ScopeMap::new(),
            keys,
            forget_after_ms,
        }
    }

    pub(crate) fn forget_after_ms(&self) -> u64 {
        self.forget_after_ms
    }

    /// A new value, larger than every value seen so far.
    fn next(&self) -> u64 {
        let floor = now_us();
        let mut cur = self.source.load(Ordering::SeqCst);
        loop {
            let v = (cur + 1).max(floor);
            match self.source.compare_exchange_weak(cur, v, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => return v,
                Err(actual) => cur = actual,
            }
        }
    }

    fn map(&self, scope: Scope) -> &ScopeMap {
        match scope {
            Scope::Principal => &self.principals,
            Scope::Resource => &self.resources,
            Scope::Entry => &self.entries,
        }
    }

    pub(crate) fn hashes(&self, key: &CacheKey) -> ScopeHashes {
        Self::hashes_under(&self.keys, key)
    }

    /// The scope hashes of `key` under other keys (the other secret of a rotation).
    pub(crate) fn hashes_under(keys: &Keys, key: &CacheKey) -> ScopeHashes {
        ScopeHashes {
            principal: keys.scope_hash(Scope::Principal, &key.principal),
            resource: keys.scope_hash(Scope::Resource, &key.resource),
            entry: keys.entry_hash(key),
        }
    }

    pub(crate) fn scope_hash(&self, scope: Scope, value: &str) -> u64 {
        self.keys.scope_hash(scope, value)
    }

    /// The epochs that currently cover `key`.
    pub(crate) fn stamp(&self, key: &CacheKey) -> EpochStamp {
        self.stamp_under(&self.keys, key)
    }

    /// The epochs that cover `key` under other keys (the other secret of a rotation).
    pub(crate) fn stamp_under(&self, keys: &Keys, key: &CacheKey) -> EpochStamp {
        let global = self.global.load(Ordering::Acquire);
        let local = self.local.load(Ordering::Acquire);
        let principal = self.principals.get(|| keys.scope_hash(Scope::Principal, &key.principal));
        let resource = self.resources.get(|| keys.scope_hash(Scope::Resource, &key.resource));
        let entry = self.entries.get(|| keys.entry_hash(key));
        EpochStamp { global, principal, resource, entry, local }
    }

    /// Bumps the global epoch; returns the new value.
    pub(crate) fn bump_all(&self) -> u64 {
        let v = self.next();
        self.global.fetch_max(v, Ordering::AcqRel);
        v
    }

    /// Bumps one scope; returns the new value.
    pub(crate) fn bump(&self, scope: Scope, hash: u64, now_ms: u64) -> u64 {
        let v = self.next();
        self.merge(scope, hash, v, now_ms);
        v
    }

    /// Raises a scope to a value from elsewhere (another process, the shared store).
    pub(crate) fn merge(&self, scope: Scope, hash: u64, value: u64, now_ms: u64) {
        if value == 0 {
            return;
        }
        self.source.fetch_max(value, Ordering::SeqCst);
        let n = self.map(scope).raise(hash, value, now_ms, self.forget_after_ms);
        self.cap(n);
    }

    pub(crate) fn merge_global(&self, value: u64) {
        self.source.fetch_max(value, Ordering::SeqCst);
        self.global.fetch_max(value, Ordering::AcqRel);
    }

    /// Drops trust in everything this process cached or is computing.
    pub(crate) fn bump_local(&self) {
        self.local.fetch_add(1, Ordering::AcqRel);
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

    fn epochs(forget_after_ms: u64) -> Epochs {
        Epochs::new(Keys::random(), forget_after_ms)
    }

    fn bump_principal(e: &Epochs, id: &str, now: u64) {
        e.bump(Scope::Principal, e.scope_hash(Scope::Principal, id), now);
    }

    #[test]
    fn a_stamp_taken_before_a_bump_never_matches_after_it() {
        let e = epochs(1000);
        let k = key("bob", "doc:1");
        let other = key("alice", "doc:2");
        let before = e.stamp(&k);
        bump_principal(&e, "bob", 0);
        assert_ne!(e.stamp(&k), before);
        assert_eq!(e.stamp(&other), EpochStamp::default(), "other scopes untouched");
        let s = e.stamp(&k);
        e.bump(Scope::Resource, e.scope_hash(Scope::Resource, "doc:1"), 0);
        assert_ne!(e.stamp(&k), s);
        let s = e.stamp(&k);
        e.bump(Scope::Entry, e.hashes(&k).entry, 0);
        assert_ne!(e.stamp(&k), s);
        let s = e.stamp(&k);
        e.bump_local();
        assert_ne!(e.stamp(&k), s, "the local generation covers everything");
        let s = e.stamp(&k);
        let o = e.stamp(&other);
        e.bump_all();
        assert_ne!(e.stamp(&k), s);
        assert_ne!(e.stamp(&other), o);
    }

    #[test]
    fn forgotten_scopes_never_bring_an_old_stamp_back() {
        // forget_after = 10 ms; sweeps start at 1024 scopes.
        let e = epochs(10);
        let k = key("bob", "doc:1");
        bump_principal(&e, "bob", 0);
        let stamped_after_first_bump = e.stamp(&k);
        // Age every slot out, then force a sweep with many other bumps.
        for i in 0..2048 {
            bump_principal(&e, &format!("user{i}"), 100);
        }
        assert_eq!(e.tracked_scopes(), 2048, "bob, bumped long ago, was forgotten");
        assert_eq!(e.stamp(&k).principal, 0, "bob was forgotten");
        bump_principal(&e, "bob", 200);
        assert_ne!(e.stamp(&k), stamped_after_first_bump, "a new bump never reuses a value");
    }

    #[test]
    fn the_hard_cap_turns_into_a_global_bump() {
        let e = epochs(u64::MAX);
        let k = key("bob", "doc:1");
        let s = e.stamp(&k);
        for i in 0..=HARD_CAP {
            e.bump(Scope::Resource, e.scope_hash(Scope::Resource, &i.to_string()), 0);
        }
        assert_eq!(e.tracked_scopes(), 0);
        assert_ne!(e.stamp(&k).global, s.global);
    }

    #[test]
    fn merged_values_only_ever_raise_and_new_values_exceed_them() {
        let e = epochs(u64::MAX);
        let k = key("bob", "doc:1");
        let h = e.hashes(&k).principal;
        let far_future = now_us() + 10_000_000_000;
        e.merge(Scope::Principal, h, far_future, 0);
        assert_eq!(e.stamp(&k).principal, far_future);
        e.merge(Scope::Principal, h, 5, 0);
        assert_eq!(e.stamp(&k).principal, far_future, "an older value never lowers a scope");
        assert!(e.bump(Scope::Resource, 1, 0) > far_future, "local values go past merged ones");
    }
}
