//! Reading the tiers: L1 (checked against the local epochs), then each shared tier in order
//! (its entry checked against the epochs read with it), then, during a secret rotation, the
//! entries under the other secret.

use std::time::Duration;

use super::entry::Entry;
use super::epoch::Epochs;
use super::key::{CacheKey, Keys, Scope, ShortHash};
use super::{Inner, write_behind};
use crate::Decision;
use crate::core::decision::DecisionSource;
use crate::stats::Stats;
use crate::tier::shared::ScopeHashes;

/// How long a read that found a recorded change not applied yet waits for the change feed to
/// apply it, before the request goes on without that tier (and writes no copy to it).
const FEED_CATCH_UP_WAIT: Duration = Duration::from_millis(250);

/// What one shared-tier read found.
pub(super) enum SharedRead {
    /// A valid entry (its local stamp and capped deadline set, ready for L1).
    Hit(Entry),
    /// No valid entry, but the tier's epochs for the key were read and merged.
    Miss,
    /// The tier was not read (failed, gated, or its epochs were unreadable).
    Unread,
}

impl SharedRead {
    fn hit(self) -> Option<Entry> {
        match self {
            SharedRead::Hit(entry) => Some(entry),
            _ => None,
        }
    }
}

impl Inner {
    /// Puts an entry into L1 with its local deadline: the shared deadline turned into this
    /// process's monotonic clock, and never more than the longest ttl away, whatever clock wrote
    /// the shared one.
    pub(super) fn insert_l1(&self, key: CacheKey, mut entry: Entry) {
        let now = self.clock.now_ms();
        let left = entry.valid_until_ms.saturating_sub(now).min(self.longest_ttl_ms);
        entry.local_until_ms = self.clock.mono_ms().saturating_add(left);
        if self.refresh_ahead > 0.0 {
            // The last `refresh_ahead` of the entry's whole ttl (when it was computed is known),
            // else of what is left of it.
            let ttl = match entry.computed_at_ms {
                0 => left,
                at => entry.valid_until_ms.saturating_sub(at).min(self.longest_ttl_ms).max(left),
            };
            let window = (ttl as f64 * self.refresh_ahead) as u64;
            entry.refresh_at_ms = entry.local_until_ms.saturating_sub(window);
        }
        self.l1.insert(key, entry);
    }

    /// A valid L1 entry's decision. `count` says whether to update hit/miss counters.
    pub(super) fn lookup_l1(&self, key: &CacheKey, count: bool, check_trust: bool) -> Option<Decision> {
        self.lookup_l1_due(key, count, check_trust).map(|(decision, _)| decision)
    }

    /// [`lookup_l1`](Self::lookup_l1), and whether the entry is due a refresh-ahead.
    pub(super) fn lookup_l1_due(&self, key: &CacheKey, count: bool, check_trust: bool) -> Option<(Decision, bool)> {
        if check_trust && !self.l1_trusted() {
            if count {
                Stats::incr(&self.stats.l1_untrusted);
                Stats::incr(&self.stats.l1_misses);
            }
            return None;
        }
        let mut found = self.l1.get(key);
        let now = self.clock.mono_ms();
        // The epochs covering the key, read once (they do not depend on which copy is looked at).
        let current = found.as_ref().map(|_| self.epochs.stamp(key));
        if found.as_ref().is_some_and(|e| now >= e.refresh_at_ms || now >= e.local_until_ms || Some(e.stamp) != current)
        {
            // This thread's copy may be older than the entry another thread (a refresh, a miss)
            // put since: look past it before missing, or refreshing.
            if let Some(newer) = self.l1.reload(key) {
                found = Some(newer);
            }
        }
        let result = match &found {
            None => None,
            Some(e) if now >= e.local_until_ms => {
                if count {
                    Stats::incr(&self.stats.l1_expired);
                }
                // With grace, an expired entry stays (it may answer while the authorizer fails).
                if now >= e.local_until_ms.saturating_add(self.grace_ms) {
                    self.l1.remove(key);
                }
                None
            }
            Some(e) if Some(e.stamp) != current => {
                if count {
                    Stats::incr(&self.stats.l1_stale);
                }
                None
            }
            Some(e) => Some((e.decision(DecisionSource::L1), now >= e.refresh_at_ms)),
        };
        if count {
            Stats::incr(if result.is_some() { &self.stats.l1_hits } else { &self.stats.l1_misses });
        }
        result
    }

    /// With grace, after the authorizer failed: the L1 entry for `key` if its ttl ended less
    /// than the grace ago and its epochs are current (never one an invalidation ended, nor any
    /// while L1 is not trusted). Counted and audit-logged.
    pub(super) fn within_grace(&self, key: &CacheKey) -> Option<Decision> {
        if self.grace_ms == 0 || !self.l1_trusted() {
            return None;
        }
        let entry = self.l1.get(key)?;
        let now = self.clock.mono_ms();
        if now >= entry.local_until_ms.saturating_add(self.grace_ms) || entry.stamp != self.epochs.stamp(key) {
            return None;
        }
        Stats::incr(&self.stats.grace_answers);
        tracing::warn!(
            target: "authz_cache::audit",
            principal = %ShortHash::of(&key.principal),
            resource = &*key.resource,
            action = &*key.action,
            expired_ms_ago = now.saturating_sub(entry.local_until_ms),
            "authorizer failed: answered an expired decision within grace"
        );
        Some(entry.decision(DecisionSource::Grace))
    }

    /// Shared tier `i`: its entry and epochs in one round trip. A valid entry is promoted to L1
    /// (deadline unchanged) and copied to the shallower tiers.
    pub(super) async fn lookup_shared(&self, i: usize, key: &CacheKey, key_id: &[u8; 32]) -> SharedRead {
        let hashes = self.epochs.hashes(key);
        let read = self.read_tier(i, &self.keys, key, key_id, &hashes).await;
        if let SharedRead::Hit(entry) = &read {
            self.promote(i, key, key_id, entry);
        }
        read
    }

    /// A valid entry of tier `i`: copied to the shallower tiers, and into L1 (deadline
    /// unchanged).
    pub(super) fn promote(&self, i: usize, key: &CacheKey, key_id: &[u8; 32], entry: &Entry) {
        if i > 0 {
            self.write_behind(key, key_id, entry, i - 1);
        }
        self.insert_l1(key.clone(), entry.clone());
    }

    /// Reads and checks one entry of tier `i` under `keys` (counted), without promoting it.
    ///
    /// The tier is not read while it (or a deeper tier it mirrors) is owed a bump, nor, for a
    /// mirror, while the change feed is not known to be caught up: its epochs cannot vouch for
    /// anything then. The authority's read says itself whether a change waits; then the feed is
    /// hinted and the read waits (at most [`FEED_CATCH_UP_WAIT`]; one drain serves every request
    /// waiting) and reads again, so that what this request computes is stamped after the change.
    pub(super) async fn read_tier(
        &self,
        i: usize,
        keys: &Keys,
        key: &CacheKey,
        key_id: &[u8; 32],
        hashes: &ScopeHashes,
    ) -> SharedRead {
        let mut read = self.read_tier_batch(i, keys, &[(key, *key_id, *hashes)]).await;
        read.pop().unwrap_or(SharedRead::Unread)
    }

    /// [`read_tier`](Self::read_tier) for several keys at once, in order: one tier call (the
    /// single read for one key, [`read_many`](crate::tier::SharedTier::read_many) for more),
    /// the same rules for each key.
    pub(super) async fn read_tier_batch(
        &self,
        i: usize,
        keys: &Keys,
        items: &[(&CacheKey, [u8; 32], ScopeHashes)],
    ) -> Vec<SharedRead> {
        let unread = || items.iter().map(|_| SharedRead::Unread).collect();
        let Some(slot) = self.tiers.get(i) else { return unread() };
        let tier = &*slot.tier;
        let authority = i + 1 == self.tiers.len();
        if !self.owes_nothing_from(i) || (!authority && !self.feed_trusted()) {
            Stats::add(&tier.counters.misses, items.len());
            return unread();
        }
        let max_age = Duration::from_millis(self.longest_ttl_ms);
        let requests: Vec<_> = items.iter().map(|(_, id, hashes)| (*id, *hashes)).collect();
        let read_all = async || match &requests[..] {
            [(id, hashes)] => tier.read(id, hashes, max_age).await.map(|read| vec![read]),
            _ => tier.read_many(&requests, max_age).await,
        };
        let mark = tier.high_water_mark();
        let Some(mut reads) = read_all().await else { return unread() };
        if reads.iter().any(|r| r.pending_changes) {
            Stats::incr(&tier.counters.stale);
            let Some(feed) = &self.feed else { return unread() };
            let since = feed.now_ms();
            feed.hint();
            if tokio::time::timeout(FEED_CATCH_UP_WAIT, feed.caught_up_since(since)).await.is_err() {
                return unread();
            }
            let Some(again) = read_all().await else { return unread() };
            if again.iter().any(|r| r.pending_changes) {
                return unread();
            }
            reads = again;
        }
        if authority {
            if let Some(now) = reads.iter().filter_map(|r| r.high_water).min() {
                if !tier.kept_its_epochs(mark, now, &self.epochs) {
                    Stats::add(&tier.counters.rejected, items.len());
                    return unread();
                }
            }
        }
        let mut out = Vec::with_capacity(items.len());
        for (read, (key, key_id, hashes)) in reads.into_iter().zip(items) {
            let read =
                self.accept_shared(tier.level, &tier.counters, keys, key, key_id, hashes, read.value, read.epochs);
            if matches!(read, SharedRead::Hit(_)) {
                tier.tier.count_hit(key_id);
            }
            out.push(read);
        }
        out
    }

    /// Checks what a shared tier returned for `key`: merges the shared epochs read with it into
    /// this process's, authenticates the envelope, checks deadline and epochs. Counts on
    /// `counters`; failed verification is an audit event. The entry, when valid, has its local
    /// stamp set to the current one (ready for L1) and its deadline capped at this process's
    /// `now + longest ttl` (another process's clock may be far ahead).
    #[allow(clippy::too_many_arguments)]
    fn accept_shared(
        &self,
        tier: &'static str,
        counters: &crate::stats::RemoteCounters,
        keys: &Keys,
        key: &CacheKey,
        key_id: &[u8; 32],
        hashes: &ScopeHashes,
        value: Option<Vec<u8>>,
        epochs: Option<[u64; 4]>,
    ) -> SharedRead {
        let Some([g, p, r, k]) = epochs else {
            Stats::incr(&counters.rejected);
            tracing::warn!(target: "authz_cache::audit", tier, "shared epoch value unreadable: not trusting the tier for this key");
            return SharedRead::Unread;
        };
        let max = super::epoch::EPOCH_MAX;
        self.epochs.merge_global(g.min(max));
        self.epochs.merge(Scope::Principal, hashes.principal, p.min(max));
        self.epochs.merge(Scope::Resource, hashes.resource, r.min(max));
        self.epochs.merge(Scope::Entry, hashes.entry, k.min(max));
        let Some(bytes) = value else {
            Stats::incr(&counters.misses);
            return SharedRead::Miss;
        };
        let mut entry = match Entry::decode(&bytes, keys, key_id) {
            Ok(entry) => entry,
            Err(e) => {
                Stats::incr(&counters.rejected);
                Stats::incr(&counters.misses);
                tracing::warn!(
                    target: "authz_cache::audit",
                    tier,
                    principal = %ShortHash::of(&key.principal),
                    error = %e,
                    "security: shared entry failed verification, treated as a miss"
                );
                return SharedRead::Miss;
            }
        };
        let current = self.epochs.stamp_under(keys, key);
        let now = self.clock.now_ms();
        if now >= entry.valid_until_ms {
            Stats::incr(&counters.expired);
            Stats::incr(&counters.misses);
            return SharedRead::Miss;
        }
        if entry.stamp.shared() != current.shared() || self.epochs.tainted_under(keys, key) {
            // Stale, or covered by a bump only this process knows of (the stores missed it).
            Stats::incr(&counters.stale);
            Stats::incr(&counters.misses);
            return SharedRead::Miss;
        }
        Stats::incr(&counters.hits);
        entry.stamp.local = current.local;
        entry.valid_until_ms = entry.valid_until_ms.min(now.saturating_add(self.longest_ttl_ms));
        SharedRead::Hit(entry)
    }

    /// During a secret rotation, after a miss under the current secret: the entry under the other
    /// secret (each shared tier in order), checked against the epochs under that secret, kept in
    /// L1 until the end of the rotation at the latest. Its L1 copy is stamped with the current
    /// epochs read *before* the shared read, so an invalidation from then on (applied under both
    /// secrets by every instance of the rotation) makes it stale. It is not copied to the shared
    /// tiers.
    pub(super) async fn lookup_rotation(&self, key: &CacheKey) -> Option<Decision> {
        let rotation = self.rotation.as_ref().filter(|r| self.clock.now_ms() < r.until_ms)?;
        let current = self.epochs.stamp(key);
        let key_id = rotation.keys.key_id(key);
        let hashes = Epochs::hashes_under(&rotation.keys, key);
        let mut found = None;
        for i in 0..self.tiers.len() {
            found = self.read_tier(i, &rotation.keys, key, &key_id, &hashes).await.hit().map(|e| (i, e));
            if found.is_some() {
                break;
            }
        }
        let (i, mut entry) = found?;
        entry.valid_until_ms = entry.valid_until_ms.min(rotation.until_ms);
        entry.stamp = current;
        tracing::debug!(target: "authz_cache", principal = %ShortHash::of(&key.principal), "hit under the rotation's other secret");
        let decision = entry.decision(DecisionSource::Tier(self.tiers[i].tier.level));
        self.insert_l1(key.clone(), entry);
        Some(decision)
    }

    /// Queues the shared copies of an entry to tiers `0..=deepest` (see `miss.rs` for which
    /// tiers a fresh entry may go to); a full queue drops a copy (counted).
    pub(super) fn write_behind(&self, key: &CacheKey, key_id: &[u8; 32], entry: &Entry, deepest: usize) {
        let mut value = None;
        let mut subject = None;
        let principal_hash = self.epochs.scope_hash(Scope::Principal, &key.principal);
        for slot in self.tiers.iter().take(deepest + 1) {
            let value = value.get_or_insert_with(|| entry.encode(&self.keys, key_id)).clone();
            let subject = if slot.tier.settings.stores_subjects {
                subject.get_or_insert_with(|| self.keys.seal_subject(key_id, key)).clone()
            } else {
                None
            };
            if slot.tier.settings.stores_subjects && subject.is_none() {
                continue;
            }
            let copy = write_behind::copy(*key_id, value, entry.valid_until_ms, principal_hash, subject);
            write_behind::queue(&slot.writes, &slot.tier, copy);
        }
    }
}
