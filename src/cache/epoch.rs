//! Epochs: O(1) invalidation at every scope, race-free against in-flight computations.
//!
//! The cache keeps a counter for the global scope and one per principal, resource and entry
//! that has been invalidated. An entry stores the counters read *before* its authorizer call;
//! an entry whose counters differ from the current ones is a miss. Invalidating is bumping a
//! counter.
//!
//! Counter values only rise and are never reused, whatever the clocks say. A new value is
//! computed where it is stored: `max(stored + 1, floor, high water + 1)` atomically, in this
//! process and in each shared store (a Lua script in Redis, a function in Postgres), and the
//! store returns the value it stored. The floor is `max(wall clock in µs, highest value this
//! process has seen + 1)`: a Lamport clock, so that values keep ordering correctly across
//! processes whose wall clocks are minutes apart, and across a shared store that lost its state.
//! Values received from other processes are merged with `max`. When a store answers a bump with
//! a value this process already had (a store that lost its state, a saturated value), this
//! process bumps the scope locally as well, so the invalidating process always misses afterwards.
//! A local bump (also the one made when a store cannot be reached, owed and paid later) counts in
//! the scope's local part, never in its shared value: a later bump from any other process, whatever
//! its clock, still raises the shared value here.
//! Values saturate at [`EPOCH_MAX`] (the largest a Postgres `bigint` and a Redis integer hold);
//! a bump of a saturated scope is a local bump instead.
//!
//! A scope that has never been bumped (or was forgotten) reads as 0. A scope whose last bump is
//! older than `forget_after` (longest ttl + authorizer timeout + margin, on the monotonic clock)
//! is forgotten: every L1 entry stamped before that bump has expired by then (L1 deadlines are
//! monotonic and capped at the longest ttl), so reading 0 again can only turn entries into
//! misses. Scope maps are keyed by a keyed 64-bit hash shared by every process (see `key.rs`): a
//! collision makes two scopes share a counter, which can only cause extra misses.
//!
//! A fifth, process-local counter, `local`, covers everything in this process's L1: it is
//! bumped when this process may have missed invalidations (its backplane was silent for too
//! long), which drops every L1 entry and every computation in flight at once.

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::cache::clock::Clock;
use crate::cache::key::{CacheKey, Keys, Scope};

/// The largest epoch value: `i64::MAX`, what a Postgres `bigint` and a Redis integer hold.
/// Larger values (a Redis writer can store any string) are read as this one.
pub(crate) const EPOCH_MAX: u64 = i64::MAX as u64;

/// A shared-epoch target: `None` is the global epoch.
pub(crate) type Target = Option<(Scope, u64)>;

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

/// The scope hashes of one key (public: shared tiers store epochs under them).
pub(crate) use crate::tier::shared::ScopeHashes;

#[derive(Clone, Copy)]
struct Slot {
    /// The shared value (from a store, another process, or this process's own bump).
    value: u64,
    /// Bumps of this scope that only this process knows of (the store could not record them,
    /// or answered a value already seen): part of the local stamp, never shared.
    local: u64,
    /// Monotonic ms of the last raise.
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

    /// (shared value, local bumps) of the scope hashed by `hash`; the hash is only computed
    /// when the map is not empty (the common case on a quiet system is no lock and no hashing).
    fn get(&self, hash: impl FnOnce() -> u64) -> (u64, u64) {
        if self.len.load(Ordering::Acquire) == 0 {
            return (0, 0);
        }
        let h = hash();
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        map.get(&h).map_or((0, 0), |s| (s.value, s.local))
    }

    /// Raises `h` to at least `value` (or, with `local`, counts one local bump); returns the
    /// map's size afterwards.
    fn raise(&self, h: u64, value: u64, local: bool, now_ms: u64, forget_after_ms: u64) -> usize {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        let slot = map.entry(h).or_insert(Slot { value: 0, local: 0, bumped_at_ms: now_ms });
        if local {
            slot.local = slot.local.wrapping_add(1);
            slot.bumped_at_ms = now_ms;
        } else if value > slot.value {
            slot.value = value;
            slot.bumped_at_ms = now_ms;
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
    /// The highest value seen or made here: the Lamport clock under every new value.
    source: AtomicU64,
    global: AtomicU64,
    local: AtomicU64,
    principals: ScopeMap,
    resources: ScopeMap,
    entries: ScopeMap,
    keys: Keys,
    forget_after_ms: u64,
    clock: Clock,
    /// Bumps that a store answered with a value this process already had.
    regressions: AtomicU64,
    /// Monotonic ms of the last local-only bump of the global epoch (0: none).
    global_local_at_ms: AtomicU64,
}

impl Epochs {
    pub(crate) fn new(keys: Keys, forget_after_ms: u64, clock: Clock) -> Self {
        Self {
            source: AtomicU64::new(0),
            global: AtomicU64::new(0),
            local: AtomicU64::new(0),
            principals: ScopeMap::new(),
            resources: ScopeMap::new(),
            entries: ScopeMap::new(),
            keys,
            forget_after_ms,
            clock,
            regressions: AtomicU64::new(0),
            global_local_at_ms: AtomicU64::new(0),
        }
    }

    /// The floor to send with a bump to a shared store: above every value this process has seen
    /// and at least its wall clock, saturating at [`EPOCH_MAX`].
    pub(crate) fn floor(&self) -> u64 {
        self.source.load(Ordering::SeqCst).saturating_add(1).max(self.clock.now_us()).min(EPOCH_MAX)
    }

    /// The highest value seen or made here.
    pub(crate) fn highest_seen(&self) -> u64 {
        self.source.load(Ordering::SeqCst)
    }

    /// Bumps that a store answered with a value this process already had.
    #[cfg(test)]
    pub(crate) fn regressions(&self) -> u64 {
        self.regressions.load(Ordering::Relaxed)
    }

    /// A new value, larger than every value seen so far (saturating at [`EPOCH_MAX`]).
    fn next(&self) -> u64 {
        let mut cur = self.source.load(Ordering::SeqCst);
        loop {
            let v = cur.saturating_add(1).max(self.clock.now_us()).min(EPOCH_MAX);
            match self.source.compare_exchange_weak(cur, v, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => return v,
                Err(actual) => cur = actual,
            }
        }
    }

    /// The current shared value of a target.
    pub(crate) fn current_of(&self, target: Target) -> u64 {
        match target {
            None => self.global.load(Ordering::Acquire),
            Some((scope, hash)) => self.map(scope).get(|| hash).0,
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
        let (principal, lp) = self.principals.get(|| keys.scope_hash(Scope::Principal, &key.principal));
        let (resource, lr) = self.resources.get(|| keys.scope_hash(Scope::Resource, &key.resource));
        let (entry, lk) = self.entries.get(|| keys.entry_hash(key));
        // Every local count only grows, so their sum changes with any one of them.
        let local = self.local.load(Ordering::Acquire).wrapping_add(lp).wrapping_add(lr).wrapping_add(lk);
        EpochStamp { global, principal, resource, entry, local }
    }

    /// Whether a local-only bump covers `key` (under `keys`): a bump the shared stores do not
    /// have (yet), so their epochs cannot vouch for a shared entry of this key here. Lasts as long
    /// as the local bump is remembered (`forget_after`, by which time every shared entry stamped
    /// before it has expired).
    pub(crate) fn tainted_under(&self, keys: &Keys, key: &CacheKey) -> bool {
        let global = self.global_local_at_ms.load(Ordering::Acquire);
        if global != 0 && self.clock.mono_ms().saturating_sub(global) < self.forget_after_ms {
            return true;
        }
        self.principals.get(|| keys.scope_hash(Scope::Principal, &key.principal)).1 != 0
            || self.resources.get(|| keys.scope_hash(Scope::Resource, &key.resource)).1 != 0
            || self.entries.get(|| keys.entry_hash(key)).1 != 0
    }

    /// Bumps the global epoch; returns the new value.
    pub(crate) fn bump_all(&self) -> u64 {
        self.bump_target(None)
    }

    /// Bumps one scope; returns the new value.
    #[cfg(test)]
    pub(crate) fn bump(&self, scope: Scope, hash: u64) -> u64 {
        self.bump_target(Some((scope, hash)))
    }

    /// Bumps a target with a new value made here (no shared store keeps epochs): afterwards it
    /// is strictly higher than before, or, saturated, bumped locally.
    pub(crate) fn bump_target(&self, target: Target) -> u64 {
        let before = self.current_of(target);
        let v = self.next();
        self.merge_target(target, v);
        if v <= before {
            self.bump_local_only(target);
        }
        v
    }

    /// Makes every entry `target` covers a miss in this process, without touching its shared
    /// value: for a bump a shared store could not record (it is owed and paid later, with a
    /// floor above everything seen here) or answered with a value already seen. Keeping the
    /// shared value as the store has it means a later bump from another process, whatever its
    /// clock, still raises it here.
    pub(crate) fn bump_local_only(&self, target: Target) {
        match target {
            None => {
                self.global_local_at_ms.store(self.clock.mono_ms().max(1), Ordering::Release);
                self.bump_local();
            }
            Some((scope, hash)) => {
                let n = self.map(scope).raise(hash, 0, true, self.clock.mono_ms(), self.forget_after_ms);
                self.cap(n);
            }
        }
    }

    /// Applies the value a shared store answered a bump of `target` with; `before` is the
    /// target's value here when the bump was sent (the store's own message may have been merged
    /// since). A value at or below `before` is a store that lost its state or saturated: the
    /// target is then bumped locally too, so that this process misses afterwards whatever the
    /// store said. Returns whether the store's value was new.
    pub(crate) fn settle_from(&self, target: Target, before: u64, value: u64) -> bool {
        let value = value.min(EPOCH_MAX);
        if value > before {
            self.merge_target(target, value);
            return true;
        }
        self.regressions.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            target: "authz_cache::audit",
            stored = value,
            known = before,
            "shared store answered a bump with a value already seen (lost or saturated epochs): bumped locally too"
        );
        self.bump_local_only(target);
        false
    }

    /// Raises a target to a value from elsewhere (another process, a shared store).
    pub(crate) fn merge_target(&self, target: Target, value: u64) {
        match target {
            None => self.merge_global(value),
            Some((scope, hash)) => self.merge(scope, hash, value),
        }
    }

    /// Raises a scope to a value from elsewhere (another process, the shared store).
    pub(crate) fn merge(&self, scope: Scope, hash: u64, value: u64) {
        if value == 0 {
            return;
        }
        let value = value.min(EPOCH_MAX);
        self.source.fetch_max(value, Ordering::SeqCst);
        let n = self.map(scope).raise(hash, value, false, self.clock.mono_ms(), self.forget_after_ms);
        self.cap(n);
    }

    pub(crate) fn merge_global(&self, value: u64) {
        let value = value.min(EPOCH_MAX);
        self.source.fetch_max(value, Ordering::SeqCst);
        self.global.fetch_max(value, Ordering::AcqRel);
    }

    /// Forgets every shared value (the scopes and the global epoch read 0 again) and drops trust
    /// in everything this process cached or is computing: for when the store that keeps the
    /// epochs lost them (a Redis restarted empty or flushed). What the store assigns from then on
    /// starts again from the floors, which stay above everything seen here (the Lamport clock is
    /// kept), and a lower value from another process is no longer masked by one the store forgot.
    pub(crate) fn reset_shared(&self) {
        self.principals.clear();
        self.resources.clear();
        self.entries.clear();
        self.global.store(0, Ordering::Release);
        self.bump_local();
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
        CacheKey::of(Arc::from(p), Arc::from(r), Arc::from("read"))
    }

    fn epochs(forget_after_ms: u64) -> (Epochs, Clock) {
        let clock = Clock::manual();
        (Epochs::new(Keys::random(), forget_after_ms, clock.clone()), clock)
    }

    fn bump_principal(e: &Epochs, id: &str) {
        e.bump(Scope::Principal, e.scope_hash(Scope::Principal, id));
    }

    #[test]
    fn a_stamp_taken_before_a_bump_never_matches_after_it() {
        let (e, _) = epochs(1000);
        let k = key("bob", "doc:1");
        let other = key("alice", "doc:2");
        let before = e.stamp(&k);
        bump_principal(&e, "bob");
        assert_ne!(e.stamp(&k), before);
        assert_eq!(e.stamp(&other), EpochStamp::default(), "other scopes untouched");
        let s = e.stamp(&k);
        e.bump(Scope::Resource, e.scope_hash(Scope::Resource, "doc:1"));
        assert_ne!(e.stamp(&k), s);
        let s = e.stamp(&k);
        e.bump(Scope::Entry, e.hashes(&k).entry);
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
        // forget_after = 10 ms (monotonic); sweeps start at 1024 scopes.
        let (e, clock) = epochs(10);
        let k = key("bob", "doc:1");
        bump_principal(&e, "bob");
        let stamped_after_first_bump = e.stamp(&k);
        // Age every slot out, then force a sweep with many other bumps.
        clock.advance(std::time::Duration::from_millis(100));
        for i in 0..2048 {
            bump_principal(&e, &format!("user{i}"));
        }
        assert_eq!(e.tracked_scopes(), 2048, "bob, bumped long ago, was forgotten");
        assert_eq!(e.stamp(&k).principal, 0, "bob was forgotten");
        bump_principal(&e, "bob");
        assert_ne!(e.stamp(&k), stamped_after_first_bump, "a new bump never reuses a value");
    }

    #[test]
    fn a_wall_clock_stepped_back_or_forward_forgets_nothing_early() {
        let (e, clock) = epochs(1_000);
        let k = key("bob", "doc:1");
        bump_principal(&e, "bob");
        let bumped = e.stamp(&k).principal;
        // The wall clock jumps a day ahead: retention runs on the monotonic clock.
        clock.step_wall(86_400_000);
        for i in 0..2048 {
            bump_principal(&e, &format!("user{i}"));
        }
        assert_eq!(e.stamp(&k).principal, bumped, "bob's bump is still remembered");
        // And a day back: new values still rise above everything seen.
        clock.step_wall(-2 * 86_400_000);
        bump_principal(&e, "bob");
        assert!(e.stamp(&k).principal > bumped);
    }

    #[test]
    fn the_hard_cap_turns_into_a_global_bump() {
        let (e, _) = epochs(u64::MAX);
        let k = key("bob", "doc:1");
        let s = e.stamp(&k);
        for i in 0..=HARD_CAP {
            e.bump(Scope::Resource, e.scope_hash(Scope::Resource, &i.to_string()));
        }
        assert_eq!(e.tracked_scopes(), 0);
        assert_ne!(e.stamp(&k).global, s.global);
    }

    #[test]
    fn merged_values_only_ever_raise_and_new_values_exceed_them() {
        let (e, clock) = epochs(u64::MAX);
        let k = key("bob", "doc:1");
        let h = e.hashes(&k).principal;
        let far_future = clock.now_us() + 10_000_000_000;
        e.merge(Scope::Principal, h, far_future);
        assert_eq!(e.stamp(&k).principal, far_future);
        e.merge(Scope::Principal, h, 5);
        assert_eq!(e.stamp(&k).principal, far_future, "an older value never lowers a scope");
        assert!(e.bump(Scope::Resource, 1) > far_future, "local values go past merged ones");
        assert!(e.floor() > far_future, "so does the floor sent to a shared store");
    }

    #[test]
    fn a_store_answering_an_old_value_still_leaves_this_process_missing() {
        let (e, _) = epochs(u64::MAX);
        let k = key("bob", "doc:1");
        let h = e.hashes(&k).principal;
        e.merge(Scope::Principal, h, 1_000);
        let stamped = e.stamp(&k);
        // The store lost its state and answers the bump with a value below what we had.
        let p = Some((Scope::Principal, h));
        assert!(!e.settle_from(p, e.current_of(p), 400));
        assert_ne!(e.stamp(&k), stamped);
        assert_eq!(e.stamp(&k).principal, 1_000, "the shared value stays what the store said");
        // The same value again: still a miss afterwards.
        let stamped = e.stamp(&k);
        assert!(!e.settle_from(p, e.current_of(p), e.stamp(&k).principal));
        assert_ne!(e.stamp(&k), stamped);
        let stamped = e.stamp(&k);
        assert!(!e.settle_from(None, e.current_of(None), 0), "the global epoch too");
        assert_ne!(e.stamp(&k), stamped);
        let stamped = e.stamp(&k);
        // The store's own message merged the value before its answer came: still new.
        let before = e.current_of(p);
        e.merge(Scope::Principal, h, before + 10);
        assert!(e.settle_from(p, before, before + 10));
        assert_ne!(e.stamp(&k), stamped);
        assert_ne!(e.stamp(&k), stamped);
        assert_eq!(e.regressions(), 3);
    }

    #[test]
    fn a_local_only_bump_taints_shared_entries_until_it_is_forgotten() {
        let (e, clock) = epochs(1_000);
        let (k, other) = (key("bob", "doc:1"), key("alice", "doc:2"));
        let keys = e.keys.clone();
        let h = e.hashes(&k).principal;
        assert!(!e.tainted_under(&keys, &k));
        e.bump_local_only(Some((Scope::Principal, h)));
        assert!(e.tainted_under(&keys, &k) && !e.tainted_under(&keys, &other));
        e.bump_local_only(None);
        assert!(e.tainted_under(&keys, &other), "a local-only global bump taints everything");
        clock.advance(std::time::Duration::from_millis(1_001));
        assert!(!e.tainted_under(&keys, &other), "until it is as old as the retention");
    }

    #[test]
    fn values_near_u64_max_saturate_and_bumps_still_invalidate() {
        let (e, _) = epochs(u64::MAX);
        let k = key("bob", "doc:1");
        let h = e.hashes(&k).principal;
        e.merge(Scope::Principal, h, u64::MAX);
        e.merge_global(u64::MAX - 1);
        assert_eq!(e.stamp(&k).principal, EPOCH_MAX, "clamped to what the stores can hold");
        assert_eq!(e.floor(), EPOCH_MAX, "saturated, not wrapped");
        let stamped = e.stamp(&k);
        // No value above the saturated one exists: the bump drops everything local instead.
        e.bump(Scope::Principal, h);
        assert_ne!(e.stamp(&k), stamped);
        let stamped = e.stamp(&k);
        e.bump_all();
        assert_ne!(e.stamp(&k), stamped);
        let stamped = e.stamp(&k);
        let p = Some((Scope::Principal, h));
        assert!(!e.settle_from(p, e.current_of(p), u64::MAX));
        assert_ne!(e.stamp(&k), stamped);
    }
}
