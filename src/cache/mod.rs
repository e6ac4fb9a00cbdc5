//! The tiered cache: [`AuthzCache`], its builder and [`CheckError`].
//!
//! `AuthzCache` is cheap to clone (an `Arc` inside) and usable on its own, without the layer,
//! e.g. from a gRPC handler or a job worker. It needs a Tokio runtime.
//!
//! ```
//! use std::time::Duration;
//! use tower_authz_cache::{AuthzCache, Decision, Invalidation, Permission, Principal};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let cache = AuthzCache::builder(|p: Principal, perm: Permission| async move {
//!     Ok::<_, std::convert::Infallible>(Decision::from_bool(p.id() == "bob" && perm.action() == "read"))
//! })
//! .l1_max_bytes(16 << 20)
//! .allow_ttl(Duration::from_secs(30))
//! .deny_ttl(Duration::from_secs(5))
//! .build();
//!
//! let bob = Principal::new("bob");
//! assert!(cache.check(&bob, &Permission::new("documents:1", "read")).await.unwrap().is_allowed());
//! assert!(!cache.check(&bob, &Permission::new("documents:1", "delete")).await.unwrap().is_allowed());
//! cache.invalidate(&Invalidation::principal("bob")).await.unwrap();
//! # });
//! ```

pub(crate) mod clock;
pub(crate) mod entry;
pub(crate) mod epoch;
#[cfg(feature = "postgres")]
pub(crate) mod feed;
pub(crate) mod guard;
pub(crate) mod key;
#[cfg(test)]
mod properties;
pub(crate) mod single_flight;
mod unfinished;
pub(crate) mod warm;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::core::authorizer::{DynAuthorizer, ErasedAuthorizer};
use crate::invalidation::Invalidation;
use crate::stats::{Stats, StatsSnapshot};
use crate::tier::memory::MemoryTier;
use crate::{Authorizer, BoxError, Decision, Permission, Principal};

use clock::{Clock, ms};
use entry::Entry;
use epoch::Epochs;
use key::{CacheKey, Keys, Scope, ShortHash};
use single_flight::{CatchUnwind, Join, SingleFlight};

/// One L1 hit in this many has its latency recorded.
const HIT_SAMPLE: u32 = 8;

fn sample_hit() -> bool {
    thread_local!(static TICK: std::cell::Cell<u32> = const { std::cell::Cell::new(0) });
    TICK.with(|t| {
        let n = t.get().wrapping_add(1);
        t.set(n);
        n % HIT_SAMPLE == 0
    })
}

/// How many times an answer is computed when invalidations keep landing while it is computed:
/// at least `MIN_ATTEMPTS`, then more (up to `MAX_ATTEMPTS`) while the first attempt started less
/// than the authorizer timeout ago. A burst of invalidations (owed bumps repaid after an outage,
/// on every instance at once) is ridden out; a scope invalidated faster than the authorizer
/// answers, for longer than its timeout, fails as `Unstable`.
const MIN_ATTEMPTS: usize = 3;
const MAX_ATTEMPTS: usize = 16;

type Outcome = Result<Decision, CheckError>;

/// The tiered authorization cache: tiers, single flight, epochs and stats around your
/// [`Authorizer`].
#[derive(Clone)]
pub struct AuthzCache {
    inner: Arc<Inner>,
}

struct Inner {
    l1: MemoryTier,
    epochs: Arc<Epochs>,
    keys: Keys,
    /// The other secret of a secret rotation, honoured until its deadline.
    rotation: Option<Rotation>,
    flights: SingleFlight<Outcome>,
    authorizer: Box<dyn DynAuthorizer>,
    stats: Arc<Stats>,
    clock: Clock,
    allow_ttl_ms: u64,
    deny_ttl_ms: u64,
    /// The longer of the two ttls: no L1 deadline and no accepted shared deadline lies further
    /// ahead than this.
    longest_ttl_ms: u64,
    /// How long shared stores keep an epoch after its last bump (their own clocks).
    #[cfg_attr(not(any(feature = "redis", feature = "postgres")), allow(dead_code))]
    shared_retention_ms: u64,
    authorizer_timeout: Duration,
    #[cfg(feature = "redis")]
    l2: Option<L2>,
    #[cfg(feature = "postgres")]
    l3: Option<L3>,
    /// Shared-epoch bumps that could not be written where they belong yet (retried in the
    /// background); while any is pending, the tier that missed it is not read.
    #[cfg(any(feature = "redis", feature = "postgres"))]
    pending: std::sync::Mutex<Pending>,
    /// Principals seen recently, for team-mate warming.
    #[cfg(feature = "postgres")]
    active: Option<mini_moka::sync::Cache<Arc<str>, ()>>,
    /// The background tasks (debts, change feed, L3 upkeep, warming).
    #[cfg_attr(not(any(feature = "redis", feature = "postgres")), allow(dead_code))]
    tasks: Tasks,
}

use epoch::Target;

/// The other secret of a rotation: shared entries under it are read (their copies kept no later
/// than `until_ms`), and every invalidation is applied under it too, until `until_ms`.
struct Rotation {
    keys: Keys,
    until_ms: u64,
}

/// Bumps owed to a shared store.
#[cfg(any(feature = "redis", feature = "postgres"))]
#[derive(Default)]
struct Pending {
    /// Bumps Postgres (the durable epochs) has not recorded.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pg: Vec<Target>,
    /// What Redis has not recorded: values to raise to, or (Redis alone) bumps.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    redis: Vec<(Target, Owed)>,
}

/// More pending bumps than this collapse into one global bump.
#[cfg(any(feature = "redis", feature = "postgres"))]
const MAX_PENDING: usize = 10_000;

/// L3 and what runs for it.
#[cfg(feature = "postgres")]
struct L3 {
    pg: Arc<crate::tier::postgres::PostgresShared>,
    writes: tokio::sync::mpsc::Sender<crate::tier::postgres::Write>,
    /// LISTEN on the epochs and changes channels (the backplane when there is no Redis).
    listener: crate::invalidation::backplane::Backplane,
    /// The durable change feed: whether it is known to be caught up, and its hint.
    feed: Arc<feed::FeedState>,
    /// Team-mates warmed per active principal (0: off).
    teammates: usize,
    warmers: Arc<tokio::sync::Semaphore>,
}

/// L2 and what runs for it.
#[cfg(feature = "redis")]
struct L2 {
    redis: Arc<crate::tier::redis::RedisShared>,
    writes: tokio::sync::mpsc::Sender<crate::tier::redis::Write>,
    backplane: crate::invalidation::backplane::Backplane,
}

impl fmt::Debug for AuthzCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthzCache")
            .field("allow_ttl_ms", &self.inner.allow_ttl_ms)
            .field("deny_ttl_ms", &self.inner.deny_ttl_ms)
            .field("authorizer_timeout", &self.inner.authorizer_timeout)
            .finish_non_exhaustive()
    }
}

impl AuthzCache {
    /// Starts building a cache in front of `authorizer`.
    pub fn builder<A: Authorizer>(authorizer: A) -> AuthzCacheBuilder {
        AuthzCacheBuilder {
            authorizer: Box::new(ErasedAuthorizer(Arc::new(authorizer))),
            l1_max_bytes: 64 << 20,
            allow_ttl: Duration::from_secs(60),
            deny_ttl: Duration::from_secs(10),
            authorizer_timeout: Duration::from_secs(5),
            clock: Clock::System,
            max_staleness: Duration::from_secs(1),
            rotation: None,
            #[cfg(feature = "redis")]
            l2: None,
            #[cfg(feature = "postgres")]
            l3: None,
        }
    }

    /// Decides whether `principal` holds `permission`: from L1 when a valid entry is there,
    /// otherwise from the authorizer (one call per key however many requests wait for it).
    ///
    /// An error means no decision could be obtained (authorizer failed, timed out or panicked,
    /// and nothing valid was cached): callers must treat it as "not allowed".
    pub async fn check(&self, principal: &Principal, permission: &Permission) -> Result<Decision, CheckError> {
        // Reading the clock is a good share of an L1 hit's cost on some VMs: hits are timed one
        // in `HIT_SAMPLE`; misses always, from the L1 miss on.
        let start = sample_hit().then(Instant::now);
        let key = CacheKey::new(principal, permission);
        if let Some(decision) = self.inner.lookup_l1(&key, true, true) {
            if let Some(start) = start {
                let elapsed = start.elapsed();
                self.inner.stats.l1_hit_latency.record(elapsed);
                #[cfg(feature = "metrics")]
                crate::exposition::record(crate::exposition::CHECK_DURATION, &[("path", "l1_hit")], elapsed);
            }
            return Ok(decision);
        }
        let start = start.unwrap_or_else(Instant::now);
        #[cfg(feature = "postgres")]
        self.note_active(principal);
        // Boxed: the miss path's state (flight, timeout, authorizer future) is large, and
        // keeping it out of this future keeps the hit path free of big moves.
        let outcome = Box::pin(self.inner.miss(key, principal, permission)).await;
        let elapsed = start.elapsed();
        self.inner.stats.miss_latency.record(elapsed);
        #[cfg(feature = "metrics")]
        crate::exposition::record(crate::exposition::CHECK_DURATION, &[("path", "miss")], elapsed);
        if let Err(e) = &outcome {
            Stats::incr(&self.inner.stats.undecided);
            tracing::warn!(
                target: "authz_cache::audit",
                principal = %ShortHash::of(principal.id()),
                action = permission.action(),
                resource = permission.resource(),
                error = %e,
                "no decision obtainable: failing closed"
            );
        }
        outcome
    }

    /// Resolves once every subscription the cache keeps is up: the Redis backplane (L2) heard,
    /// and the Postgres listener (L3: change feed, and backplane without L2) subscribed. At
    /// once without a shared tier. A first subscription drops L1 (invalidations sent before it
    /// were not heard), so an app that warms up or serves before this may lose those entries;
    /// await it before serving. Never resolves while a store stays unreachable: bound it.
    ///
    /// ```
    /// # async fn run(cache: tower_authz_cache::AuthzCache) {
    /// use std::time::Duration;
    /// if tokio::time::timeout(Duration::from_secs(5), cache.ready()).await.is_err() {
    ///     eprintln!("backplane not up yet: serving anyway, L1 is not read until it is");
    /// }
    /// # }
    /// ```
    pub async fn ready(&self) {
        while !self.inner.subscribed() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The health of each part of the cache; see [`Health`](crate::Health).
    pub fn health(&self) -> crate::Health {
        let stats = self.stats();
        crate::health::Health::assess(&stats, self.inner.stats.authorizer_failing())
    }

    /// Publishes the current counters and gauges through the `metrics` facade (feature
    /// `metrics`): counters as absolute values, gauges set. Call it before each scrape, or let
    /// the monitor call it every interval. Check latencies are recorded as they happen.
    #[cfg(feature = "metrics")]
    pub fn export_metrics(&self) {
        crate::exposition::export(&self.stats());
    }

    /// Counts a request turned away because a plug-in (resolver or mapper) panicked.
    pub(crate) fn plugin_panicked(&self) {
        Stats::incr(&self.inner.stats.plugin_panics);
    }

    /// A copy of the counters.
    pub fn stats(&self) -> StatsSnapshot {
        #[cfg_attr(not(feature = "redis"), allow(unused_mut))]
        let mut snapshot = self.inner.stats.snapshot(self.inner.l1.usage());
        #[cfg(feature = "redis")]
        if let Some(l2) = &self.inner.l2 {
            let mut l2_snapshot = self.inner.stats.l2.snapshot(&l2.redis.guard);
            l2_snapshot.warning = l2.redis.warning();
            snapshot.tiers.l2 = Some(l2_snapshot);
        }
        #[cfg(feature = "postgres")]
        if let Some(l3) = &self.inner.l3 {
            snapshot.tiers.l3 = Some(self.inner.stats.l3.snapshot(&l3.pg.guard));
        }
        #[cfg(any(feature = "redis", feature = "postgres"))]
        {
            snapshot.backplane = self.inner.backplane().map(|b| b.snapshot());
        }
        #[cfg(feature = "postgres")]
        {
            snapshot.change_feed = self.inner.l3.as_ref().map(|l3| l3.feed.snapshot());
        }
        snapshot
    }

    /// Applies an invalidation: first to the shared tier (which publishes it to every other
    /// instance), then to this process. Every cached decision it covers, including any being
    /// computed right now, is a miss in this process from the moment this returns; in other
    /// instances, as soon as the backplane delivers it (or their L2 reads see the shared epoch).
    pub(crate) async fn apply_invalidation(&self, invalidation: &Invalidation, by: Option<&str>) -> Result<(), ()> {
        self.inner.apply_invalidation(invalidation, by).await
    }

    #[cfg(test)]
    pub(crate) fn sync_l1(&self) {
        self.inner.l1.sync();
    }
}

impl Inner {
    /// The backplane whose heartbeat decides whether L1 is trusted: Redis's when there is an L2,
    /// otherwise Postgres's.
    #[cfg(any(feature = "redis", feature = "postgres"))]
    fn backplane(&self) -> Option<&crate::invalidation::backplane::BackplaneState> {
        #[cfg(feature = "redis")]
        if let Some(l2) = &self.l2 {
            return Some(&l2.backplane.state);
        }
        #[cfg(feature = "postgres")]
        if let Some(l3) = &self.l3 {
            return Some(&l3.listener.state);
        }
        None
    }

    /// Whether every subscription is up (see [`AuthzCache::ready`]).
    fn subscribed(&self) -> bool {
        #[cfg(feature = "postgres")]
        if self.l3.as_ref().is_some_and(|l3| !l3.listener.state.connected()) {
            return false;
        }
        self.l1_trusted()
    }

    /// Whether L1 may be read: always without a backplane; with one, only while it is heard,
    /// and with L3 only while the change feed is known to be caught up (see `feed.rs`).
    fn l1_trusted(&self) -> bool {
        #[cfg(any(feature = "redis", feature = "postgres"))]
        if let Some(b) = self.backplane() {
            return b.trusted() && self.feed_trusted();
        }
        true
    }

    /// With L3: whether this process saw the change feed caught up within `max_staleness`
    /// (every change in the permission tables applied to the epochs, and, with L2, mirrored to
    /// Redis). Until then neither L1 nor L2 can vouch for anything. Always true without L3.
    fn feed_trusted(&self) -> bool {
        #[cfg(feature = "postgres")]
        if let Some(l3) = &self.l3 {
            return l3.feed.trusted();
        }
        true
    }

    /// Whether there is a shared tier (and so a key id to compute).
    fn has_shared_tier(&self) -> bool {
        #[cfg(feature = "redis")]
        if self.l2.is_some() {
            return true;
        }
        #[cfg(feature = "postgres")]
        if self.l3.is_some() {
            return true;
        }
        false
    }

    /// Puts an entry into L1 with its local deadline: the shared deadline turned into this
    /// process's monotonic clock, and never more than the longest ttl away, whatever clock wrote
    /// the shared one.
    fn insert_l1(&self, key: CacheKey, mut entry: Entry) {
        let left = entry.valid_until_ms.saturating_sub(self.clock.now_ms()).min(self.longest_ttl_ms);
        entry.local_until_ms = self.clock.mono_ms().saturating_add(left);
        self.l1.insert(key, entry);
    }

    /// Checks what a shared tier returned for `key`: merges the shared epochs read with it into
    /// this process's, authenticates the envelope, checks deadline and epochs. Counts on
    /// `counters`; failed verification is an audit event. The entry, when valid, has its local
    /// stamp set to the current one (ready for L1) and its deadline capped at this process's
    /// `now + longest ttl` (another process's clock may be far ahead).
    #[cfg(any(feature = "redis", feature = "postgres"))]
    #[allow(clippy::too_many_arguments)]
    fn accept_shared(
        &self,
        tier: &'static str,
        counters: &crate::stats::RemoteCounters,
        keys: &Keys,
        key: &CacheKey,
        key_id: &[u8; 32],
        hashes: &epoch::ScopeHashes,
        value: Option<Vec<u8>>,
        epochs: Option<[u64; 4]>,
    ) -> SharedRead {
        let Some([g, p, r, k]) = epochs else {
            Stats::incr(&counters.rejected);
            tracing::warn!(target: "authz_cache::audit", tier, "shared epoch value unreadable: not trusting the tier for this key");
            return SharedRead::Unread;
        };
        self.epochs.merge_global(g);
        self.epochs.merge(Scope::Principal, hashes.principal, p);
        self.epochs.merge(Scope::Resource, hashes.resource, r);
        self.epochs.merge(Scope::Entry, hashes.entry, k);
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

    /// A valid L1 entry's decision. `count` says whether to update hit/miss counters.
    fn lookup_l1(&self, key: &CacheKey, count: bool, check_trust: bool) -> Option<Decision> {
        if check_trust && !self.l1_trusted() {
            if count {
                Stats::incr(&self.stats.l1_untrusted);
                Stats::incr(&self.stats.l1_misses);
            }
            return None;
        }
        let found = self.l1.get(key);
        let result = match &found {
            None => None,
            Some(e) if self.clock.mono_ms() >= e.local_until_ms => {
                if count {
                    Stats::incr(&self.stats.l1_expired);
                }
                self.l1.remove(key);
                None
            }
            Some(e) if e.stamp != self.epochs.stamp(key) => {
                if count {
                    Stats::incr(&self.stats.l1_stale);
                }
                None
            }
            Some(e) => Some(e.decision()),
        };
        if count {
            Stats::incr(if result.is_some() { &self.stats.l1_hits } else { &self.stats.l1_misses });
        }
        result
    }

    /// L2: the entry and the shared epochs in one round trip. The shared epochs are merged
    /// into this process's first, so the stamp of a fill that follows includes them. A valid
    /// entry is promoted to L1 with its deadline unchanged.
    #[cfg(feature = "redis")]
    async fn lookup_l2(&self, key: &CacheKey, key_id: &[u8; 32]) -> SharedRead {
        let hashes = self.epochs.hashes(key);
        let read = self.read_l2(&self.keys, key, key_id, &hashes).await;
        if let SharedRead::Hit(entry) = &read {
            self.insert_l1(key.clone(), entry.clone());
        }
        read
    }

    /// Reads and checks one L2 entry under `keys` (counted), without promoting it.
    #[cfg(feature = "redis")]
    async fn read_l2(&self, keys: &Keys, key: &CacheKey, key_id: &[u8; 32], hashes: &epoch::ScopeHashes) -> SharedRead {
        let Some(l2) = self.l2.as_ref() else { return SharedRead::Unread };
        let owed = {
            let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            !pending.redis.is_empty() || !pending.pg.is_empty()
        };
        if owed || !self.feed_trusted() {
            // Redis missed an invalidation (this process owes it, or Postgres, whose epochs Redis
            // mirrors, one; or the change feed is not known to be caught up): its epochs cannot
            // vouch for anything until then.
            Stats::incr(&self.stats.l2.misses);
            return SharedRead::Unread;
        }
        let mark = l2.redis.high_water_mark();
        let Some(read) = self.timed_read("l2", &self.stats.l2, l2.redis.read(key_id, hashes)).await else {
            return SharedRead::Unread;
        };
        if l2.redis.keeps_epochs() && !l2.redis.kept_its_epochs(mark, read.high_water, &self.epochs) {
            Stats::incr(&self.stats.l2.rejected);
            return SharedRead::Unread;
        }
        self.accept_shared("l2", &self.stats.l2, keys, key, key_id, hashes, read.value, read.epochs)
    }

    /// Awaits one remote read: its latency recorded (unless the breaker answered), a failure
    /// counted and logged, and a miss.
    #[cfg(any(feature = "redis", feature = "postgres"))]
    async fn timed_read<T, E: fmt::Display>(
        &self,
        tier: &'static str,
        counters: &crate::stats::RemoteCounters,
        read: impl Future<Output = Result<T, crate::cache::guard::GuardError<E>>>,
    ) -> Option<T> {
        let started = Instant::now();
        let read = read.await;
        if !matches!(read, Err(crate::cache::guard::GuardError::Open)) {
            let elapsed = started.elapsed();
            counters.read_latency.record(elapsed);
            #[cfg(feature = "metrics")]
            crate::exposition::record(crate::exposition::TIER_READ_DURATION, &[("tier", tier)], elapsed);
        }
        match read {
            Ok(read) => Some(read),
            Err(e) => {
                Stats::incr(&counters.errors);
                tracing::debug!(target: "authz_cache", tier, error = %e, "remote read failed: miss");
                None
            }
        }
    }

    /// L3: the entry and the durable epochs in one statement; a valid entry is promoted to L1
    /// (and to L2), its deadline unchanged.
    #[cfg(feature = "postgres")]
    async fn lookup_l3(&self, key: &CacheKey, key_id: &[u8; 32]) -> SharedRead {
        let read = self.read_l3(&self.keys, key, key_id, &self.epochs.hashes(key)).await;
        if let SharedRead::Hit(entry) = &read {
            #[cfg(feature = "redis")]
            self.write_l2(key_id, entry);
            self.insert_l1(key.clone(), entry.clone());
        }
        read
    }

    /// Reads and checks one L3 entry (counted), without promoting it.
    #[cfg(feature = "postgres")]
    async fn read_l3(&self, keys: &Keys, key: &CacheKey, key_id: &[u8; 32], hashes: &epoch::ScopeHashes) -> SharedRead {
        let Some(l3) = self.l3.as_ref() else { return SharedRead::Unread };
        if !self.pending.lock().unwrap_or_else(|e| e.into_inner()).pg.is_empty() {
            // The durable epochs missed an invalidation: L3 cannot be checked until they have it.
            Stats::incr(&self.stats.l3.misses);
            return SharedRead::Unread;
        }
        let read = l3.pg.read(key_id, hashes, self.longest_ttl_ms);
        let Some(mut read) = self.timed_read("l3", &self.stats.l3, read).await else { return SharedRead::Unread };
        if read.changes_pending {
            // A change in the permission tables is recorded but not applied to the epochs yet:
            // no entry can be vouched for until it is. Have the feed apply it (it is usually a
            // matter of milliseconds; one drain serves every request waiting here) and read again,
            // so that what this request computes is stamped after the change.
            Stats::incr(&self.stats.l3.stale);
            let since = l3.feed.now_ms();
            l3.feed.hint();
            if tokio::time::timeout(FEED_CATCH_UP_WAIT, l3.feed.caught_up_since(since)).await.is_err() {
                return SharedRead::Unread;
            }
            let again = l3.pg.read(key_id, hashes, self.longest_ttl_ms);
            let Some(again) = self.timed_read("l3", &self.stats.l3, again).await else { return SharedRead::Unread };
            if again.changes_pending {
                return SharedRead::Unread;
            }
            read = again;
        }
        let value = read.value;
        let read = self.accept_shared("l3", &self.stats.l3, keys, key, key_id, hashes, value, read.epochs);
        if matches!(read, SharedRead::Hit(_)) {
            l3.pg.count_hit(key_id);
        }
        read
    }

    /// During a secret rotation, after a miss under the current secret: the entry under the other
    /// secret (L2, then L3), checked against the epochs under that secret, kept in L1 until the
    /// end of the rotation at the latest. Its L1 copy is stamped with the current epochs read
    /// *before* the shared read, so an invalidation from then on (applied under both secrets by
    /// every instance of the rotation) makes it stale. It is not copied to the shared tiers.
    #[cfg(any(feature = "redis", feature = "postgres"))]
    async fn lookup_rotation(&self, key: &CacheKey) -> Option<Decision> {
        let rotation = self.rotation.as_ref().filter(|r| self.clock.now_ms() < r.until_ms)?;
        let current = self.epochs.stamp(key);
        let key_id = rotation.keys.key_id(key);
        let hashes = Epochs::hashes_under(&rotation.keys, key);
        #[cfg_attr(not(all(feature = "redis", feature = "postgres")), allow(unused_mut))]
        let mut found = None;
        #[cfg(feature = "redis")]
        if found.is_none() {
            found = self.read_l2(&rotation.keys, key, &key_id, &hashes).await.hit();
        }
        #[cfg(feature = "postgres")]
        if found.is_none() {
            found = self.read_l3(&rotation.keys, key, &key_id, &hashes).await.hit();
        }
        let mut entry = found?;
        entry.valid_until_ms = entry.valid_until_ms.min(rotation.until_ms);
        entry.stamp = current;
        tracing::debug!(target: "authz_cache", principal = %ShortHash::of(&key.principal), "hit under the rotation's other secret");
        let decision = entry.decision();
        self.insert_l1(key.clone(), entry);
        Some(decision)
    }

    /// Queues the shared copies of a fresh entry, to the tiers whose epochs `fresh` says its
    /// stamp was checked against (see [`Fresh`]); a full queue drops them (counted).
    fn write_behind(&self, key: &CacheKey, key_id: &[u8; 32], entry: &Entry, fresh: Fresh) {
        #[cfg(feature = "redis")]
        if fresh.l2 || fresh.l3 {
            self.write_l2(key_id, entry);
        }
        #[cfg(feature = "postgres")]
        if fresh.l3 {
            self.write_l3(key, key_id, entry);
        }
        let _ = (key, key_id, entry, fresh);
    }

    #[cfg(feature = "postgres")]
    fn write_l3(&self, key: &CacheKey, key_id: &[u8; 32], entry: &Entry) {
        let Some(l3) = &self.l3 else { return };
        let Some(subject) = self.keys.seal_subject(key_id, key) else { return };
        let write = crate::tier::postgres::Write {
            key_id: *key_id,
            value: entry.encode(&self.keys, key_id),
            subject,
            principal_hash: self.epochs.scope_hash(Scope::Principal, &key.principal),
            valid_until_ms: entry.valid_until_ms,
            queued_at: Instant::now(),
        };
        if l3.writes.try_send(write).is_err() {
            Stats::incr(&self.stats.l3.write_drops);
        }
    }

    #[cfg(feature = "redis")]
    fn write_l2(&self, key_id: &[u8; 32], entry: &Entry) {
        let Some(l2) = &self.l2 else { return };
        let write = crate::tier::redis::Write {
            key: l2.redis.data_key(key_id),
            value: entry.encode(&self.keys, key_id),
            valid_until_ms: entry.valid_until_ms,
        };
        if l2.writes.try_send(write).is_err() {
            Stats::incr(&self.stats.l2.write_drops);
        }
    }

    /// Past L1: join the flight for this key, or lead it.
    ///
    /// The leader computes inline, on its own task: no spawn, no cross-thread hop. If the
    /// leading request is dropped mid-computation, its flight closes without an answer and
    /// the followers race to lead a new one, so nobody is stranded. A panicking authorizer is
    /// caught and becomes an error for every waiter.
    async fn miss(&self, key: CacheKey, principal: &Principal, permission: &Permission) -> Outcome {
        loop {
            match self.flights.join(&key) {
                Join::Leader(leader) => {
                    let computation = self.compute(&key, principal.clone(), permission.clone());
                    let outcome = CatchUnwind::new(computation).await.unwrap_or_else(|()| {
                        self.stats.authorizer_failed();
                        tracing::error!(target: "authz_cache::audit", "authorizer panicked: failing closed");
                        Err(CheckError::new(CheckErrorKind::Panicked, None))
                    });
                    leader.finish(outcome.clone());
                    return outcome;
                }
                Join::Follower(mut rx) => {
                    Stats::incr(&self.stats.single_flight_joins);
                    if let Ok(value) = rx.wait_for(Option::is_some).await {
                        if let Some(outcome) = value.clone() {
                            return outcome;
                        }
                    }
                    // The leader went away without an answer: take over.
                }
            }
        }
    }

    async fn compute(&self, key: &CacheKey, principal: Principal, permission: Permission) -> Outcome {
        // Another flight may have filled L1 between our miss and our registration.
        if let Some(decision) = self.lookup_l1(key, false, true) {
            return Ok(decision);
        }
        // The shared-tier key id (an HMAC), computed once for the reads and the write-behind.
        let key_id = self.has_shared_tier().then(|| self.keys.key_id(key));
        #[cfg_attr(not(any(feature = "redis", feature = "postgres")), allow(unused_mut))]
        let mut fresh = Fresh::default();
        if let Some(key_id) = &key_id {
            let _ = key_id;
            #[cfg(feature = "redis")]
            match self.lookup_l2(key, key_id).await {
                SharedRead::Hit(entry) => return Ok(entry.decision()),
                SharedRead::Miss => fresh.l2 = true,
                SharedRead::Unread => {}
            }
            #[cfg(feature = "postgres")]
            match self.lookup_l3(key, key_id).await {
                SharedRead::Hit(entry) => return Ok(entry.decision()),
                SharedRead::Miss => fresh.l3 = true,
                SharedRead::Unread => {}
            }
            #[cfg(any(feature = "redis", feature = "postgres"))]
            if let Some(decision) = self.lookup_rotation(key).await {
                return Ok(decision);
            }
        }
        let first = Instant::now();
        for attempt in 1..=MAX_ATTEMPTS {
            // Epochs are read before the authorizer is asked (no fill after invalidate).
            let stamp = self.epochs.stamp(key);
            Stats::incr(&self.stats.authorizer_calls);
            let call = self.authorizer.authorize_owned(principal.clone(), permission.clone());
            let started = Instant::now();
            let answer = tokio::time::timeout(self.authorizer_timeout, call).await;
            let elapsed = started.elapsed();
            self.stats.authorizer_latency.record(elapsed);
            #[cfg(feature = "metrics")]
            crate::exposition::record(crate::exposition::AUTHORIZER_DURATION, &[], elapsed);
            let decision = match answer {
                Ok(Ok(decision)) => {
                    self.stats.authorizer_succeeded();
                    decision
                }
                Ok(Err(e)) => {
                    self.stats.authorizer_failed();
                    return Err(CheckError::new(CheckErrorKind::Authorizer, Some(e)));
                }
                Err(_) => {
                    self.stats.authorizer_failed();
                    return Err(CheckError::new(CheckErrorKind::Timeout, None));
                }
            };
            if self.epochs.stamp(key) != stamp {
                // An invalidation landed while the authorizer was thinking: its answer may
                // predate the change. Ask again.
                Stats::incr(&self.stats.invalidation_races);
                if attempt >= MIN_ATTEMPTS && first.elapsed() >= self.authorizer_timeout {
                    break;
                }
                continue;
            }
            let configured = if decision.is_allowed() { self.allow_ttl_ms } else { self.deny_ttl_ms };
            let ttl = decision.ttl_hint().map_or(configured, |hint| ms(hint).min(configured));
            if ttl > 0 {
                let valid_until_ms = self.clock.now_ms().saturating_add(ttl);
                let entry = Entry::new(&decision, valid_until_ms, stamp);
                if let Some(key_id) = &key_id {
                    self.write_behind(key, key_id, &entry, fresh);
                }
                self.insert_l1(key.clone(), entry);
            }
            return Ok(decision);
        }
        Err(CheckError::new(CheckErrorKind::Unstable, None))
    }

    async fn apply_invalidation(&self, invalidation: &Invalidation, by: Option<&str>) -> Result<(), ()> {
        let now = self.clock.now_ms();
        Stats::incr(match invalidation {
            Invalidation::Principal(_) => &self.stats.inv_principal,
            Invalidation::Resource(_) => &self.stats.inv_resource,
            Invalidation::Entry { .. } => &self.stats.inv_entry,
            Invalidation::All => &self.stats.inv_all,
        });
        let target = epoch_target(&self.keys, invalidation);
        // During a rotation, the same scope under the other secret too: entries under either
        // secret may be served until the rotation ends. (The global epoch has no hash.)
        let other = self
            .rotation
            .as_ref()
            .filter(|r| now < r.until_ms && target.is_some())
            .map(|r| epoch_target(&r.keys, invalidation));
        // Cancellation safety: the other secret's scope is covered from the start, so a
        // drop during the first bump still applies it; its own bump takes the cover over.
        let other_unfinished = other.map(|o| unfinished::Unfinished::new(self, o));
        let mut outcome = self.bump_epochs(target).await;
        if let Some(other) = other {
            if let Some(cover) = other_unfinished {
                cover.finish();
            }
            outcome &= self.bump_epochs(other).await;
        }
        audit_invalidation(invalidation, outcome, by);
        let outcome = if outcome { Ok(()) } else { Err(()) };
        // Space reclamation, after the epochs made the entries stale (see MemoryTier::remove).
        match invalidation {
            Invalidation::Entry { principal, permission } => {
                self.l1.remove(&CacheKey::new(&Principal::new(principal.as_str()), permission));
            }
            Invalidation::All => self.l1.clear(),
            _ => {}
        }
        outcome
    }

    /// Bumps one target's epoch (shared, then local); whether every shared store got it.
    ///
    /// Shared first: the value the shared store assigns is the one every instance (and every
    /// shared entry stamped from now on) agrees on. With L3, Postgres holds the durable epochs and
    /// assigns the value, mirrored to Redis; otherwise Redis assigns it. The floor sent is above
    /// every value this process has seen. A store that cannot be reached is owed the bump (paid
    /// in the background; its tier is not read until then, and a Redis mirror debt is also
    /// recorded in Postgres for every instance to pay); this process is covered either way (a
    /// local bump), and the caller learns that the others may not be.
    async fn bump_epochs(&self, target: Target) -> bool {
        #[cfg_attr(not(any(feature = "redis", feature = "postgres")), allow(unused_variables))]
        let before = self.epochs.current_of(target);
        let retention = self.shared_retention_ms;
        #[cfg_attr(not(any(feature = "redis", feature = "postgres")), allow(unused_mut))]
        let mut delivered = true;
        #[cfg_attr(not(any(feature = "redis", feature = "postgres")), allow(unused_mut))]
        let mut settled = false;
        // Cancellation safety: dropped at an await below, what a failure there applies.
        #[cfg_attr(not(feature = "postgres"), allow(unused_mut))]
        let mut unfinished = unfinished::Unfinished::new(self, target);
        #[cfg(feature = "postgres")]
        if let Some(l3) = &self.l3 {
            match l3.pg.bump(target, self.epochs.floor(), retention).await {
                Ok(value) => {
                    self.epochs.settle_from(target, before, value);
                    settled = true;
                    unfinished.assigned(value);
                    #[cfg(feature = "redis")]
                    if let Some(l2) = &self.l2 {
                        if let Err(e) = l2.redis.raise(target, value, retention).await {
                            self.owe_redis(target, Owed::Raise(value));
                            unfinished.mirror_owed();
                            if l3.pg.owe_mirror(target, value).await.is_err() {
                                tracing::debug!(target: "authz_cache", "redis mirror debt not recorded in postgres");
                            }
                            delivered = false;
                            tracing::warn!(target: "authz_cache::audit", error = %e, "invalidation not mirrored to redis: l2 skipped until it is");
                        }
                    }
                }
                Err(e) => {
                    self.owe_pg(target);
                    unfinished.pg_owed();
                    delivered = false;
                    tracing::warn!(target: "authz_cache::audit", error = %e, "invalidation not recorded in postgres: l3 skipped until it is");
                }
            }
        }
        #[cfg(feature = "redis")]
        if let (false, Some(l2)) = (settled, &self.l2) {
            match l2.redis.bump(target, self.epochs.floor(), retention).await {
                Ok(value) => {
                    self.epochs.settle_from(target, before, value);
                    settled = true;
                }
                Err(e) => {
                    if self.epochs_authority_is_redis() {
                        // Redis keeps the epochs: it is owed the bump, as Postgres would be.
                        self.owe_redis(target, Owed::Bump);
                    }
                    delivered = false;
                    tracing::warn!(target: "authz_cache::audit", error = %e, "invalidation not delivered to other instances; applied locally, owed to redis");
                }
            }
        }
        if !settled {
            if self.has_shared_tier() {
                self.epochs.bump_local_only(target);
            } else {
                self.epochs.bump_target(target);
            }
        }
        unfinished.finish();
        let _ = retention;
        delivered
    }

    /// Whether Redis keeps the epochs (L2 without L3), and so is owed the bumps it missed.
    #[cfg(feature = "redis")]
    fn epochs_authority_is_redis(&self) -> bool {
        self.l2.as_ref().is_some_and(|l2| l2.redis.keeps_epochs())
    }

    /// Records a bump owed to Postgres; past `MAX_PENDING`, the debt collapses to a global bump.
    ///
    /// One owed bump per target: it is paid with a value assigned at payment time, which covers
    /// every failed attempt before it. (Owing one per attempt made a burst of bumps on the same
    /// scope when the store came back, each restarting the computations in flight for it, and
    /// checks failed as `Unstable`.) A pending global bump covers every other target.
    #[cfg(feature = "postgres")]
    fn owe_pg(&self, target: Target) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.pg.contains(&target) || pending.pg.contains(&None) {
            return;
        }
        if pending.pg.len() + pending.redis.len() >= MAX_PENDING {
            pending.pg = vec![None];
        } else {
            pending.pg.push(target);
        }
    }

    /// Records what Redis is owed for `target`: one debt per target (a bump covers any raise; of
    /// two raises the higher), collapsing like [`owe_pg`](Self::owe_pg).
    #[cfg(feature = "redis")]
    fn owe_redis(&self, target: Target, owed: Owed) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(debt) = pending.redis.iter_mut().find(|(t, _)| *t == target) {
            debt.1 = debt.1.max(owed);
            return;
        }
        if pending.pg.len() + pending.redis.len() >= MAX_PENDING {
            let top = pending.redis.iter().map(|(_, o)| *o).fold(owed, Owed::max);
            pending.redis = vec![(None, top)];
        } else {
            pending.redis.push((target, owed));
        }
    }

    /// Pays what is owed to the shared stores, oldest first; stops at the first failure.
    #[cfg(any(feature = "redis", feature = "postgres"))]
    async fn retry_pending(&self) {
        let (pg, redis) = {
            let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            (p.pg.clone(), p.redis.clone())
        };
        let retention = self.shared_retention_ms;
        #[cfg(feature = "postgres")]
        if let (Some(l3), false) = (&self.l3, pg.is_empty()) {
            let mut done = 0;
            for target in &pg {
                let before = self.epochs.current_of(*target);
                match l3.pg.bump(*target, self.epochs.floor(), retention).await {
                    Ok(value) => {
                        self.epochs.settle_from(*target, before, value);
                        #[cfg(feature = "redis")]
                        if self.l2.is_some() {
                            self.owe_redis(*target, Owed::Raise(value));
                        }
                        done += 1;
                    }
                    Err(_) => break,
                }
            }
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            // Remove what was paid, unless the debt collapsed meanwhile.
            let done = pg[..done].iter().zip(&p.pg).take_while(|(a, b)| a == b).count();
            p.pg.drain(..done);
            if done > 0 && p.pg.is_empty() {
                tracing::info!(target: "authz_cache::audit", "owed invalidations recorded in postgres: l3 read again");
            }
        }
        // Paying Postgres may have added raises.
        #[cfg(feature = "postgres")]
        let redis =
            if pg.is_empty() { redis } else { self.pending.lock().unwrap_or_else(|e| e.into_inner()).redis.clone() };
        #[cfg(feature = "redis")]
        if let (Some(l2), false) = (&self.l2, redis.is_empty()) {
            let mut done = 0;
            for (target, owed) in &redis {
                let paid = match owed {
                    Owed::Raise(value) => l2.redis.raise(*target, *value, retention).await.is_ok(),
                    Owed::Bump => {
                        let before = self.epochs.current_of(*target);
                        match l2.redis.bump(*target, self.epochs.floor(), retention).await {
                            Ok(value) => {
                                self.epochs.settle_from(*target, before, value);
                                true
                            }
                            Err(_) => false,
                        }
                    }
                };
                if !paid {
                    break;
                }
                done += 1;
            }
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let done = redis[..done].iter().zip(&p.redis).take_while(|(a, b)| a == b).count();
            p.redis.drain(..done);
            if done > 0 && p.redis.is_empty() {
                tracing::info!(target: "authz_cache::audit", "owed invalidations paid to redis: l2 read again");
            }
        }
        let _ = (pg, redis, retention);
    }
}

/// What one shared-tier read found.
#[cfg_attr(not(any(feature = "redis", feature = "postgres")), allow(dead_code))]
enum SharedRead {
    /// A valid entry (its local stamp and capped deadline set, ready for L1).
    Hit(Entry),
    /// No valid entry, but the tier's epochs for the key were read and merged.
    Miss,
    /// The tier was not read (failed, gated, or its epochs were unreadable).
    Unread,
}

impl SharedRead {
    #[cfg_attr(not(any(feature = "redis", feature = "postgres")), allow(dead_code))]
    fn hit(self) -> Option<Entry> {
        match self {
            SharedRead::Hit(entry) => Some(entry),
            _ => None,
        }
    }
}

/// Which shared tiers' epochs a computation's stamp was checked against. A fresh entry is
/// written only to those tiers (L2 also when L3, the authority Redis mirrors, was read): an
/// entry whose stamp missed an invalidation a tier already had would otherwise sit in that tier
/// for a whole ttl, and outlive the epoch that ended it once that epoch is forgotten.
#[derive(Debug, Clone, Copy, Default)]
struct Fresh {
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    l2: bool,
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    l3: bool,
}

/// A debt to Redis: raise an epoch to a value Postgres assigned, or (Redis keeping the epochs)
/// bump it. A bump covers any raise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
enum Owed {
    Raise(u64),
    Bump,
}

/// The epoch an invalidation bumps, named under `keys`: `None` is the global epoch.
fn epoch_target(keys: &Keys, invalidation: &Invalidation) -> Target {
    Some(match invalidation {
        Invalidation::Principal(id) => (Scope::Principal, keys.scope_hash(Scope::Principal, id)),
        Invalidation::Resource(resource) => (Scope::Resource, keys.scope_hash(Scope::Resource, resource)),
        Invalidation::Entry { principal, permission } => {
            (Scope::Entry, keys.entry_hash(&CacheKey::new(&Principal::new(principal.as_str()), permission)))
        }
        Invalidation::All => return None,
    })
}

/// The audit event of an invalidation: its scope and target, whether it reached the shared tier,
/// and who asked (a short keyed hash, like every principal in logs).
fn audit_invalidation(invalidation: &Invalidation, shared: bool, by: Option<&str>) {
    let by = by.map(|p| ShortHash::of(p).to_string()).unwrap_or_else(|| "-".to_owned());
    match invalidation {
        Invalidation::Principal(id) => {
            tracing::info!(target: "authz_cache::audit", scope = "principal", principal = %ShortHash::of(id), shared, by = %by, "invalidated");
        }
        Invalidation::Resource(resource) => {
            tracing::info!(target: "authz_cache::audit", scope = "resource", resource = %resource, shared, by = %by, "invalidated");
        }
        Invalidation::Entry { principal, permission } => {
            tracing::info!(target: "authz_cache::audit", scope = "entry", principal = %ShortHash::of(principal), permission = %permission, shared, by = %by, "invalidated");
        }
        Invalidation::All => {
            tracing::info!(target: "authz_cache::audit", scope = "all", shared, by = %by, "invalidated")
        }
    }
}

/// Builds an [`AuthzCache`]. Defaults: L1 64 MiB, allow ttl 60 s, deny ttl 10 s, authorizer
/// timeout 5 s.
#[must_use]
pub struct AuthzCacheBuilder {
    authorizer: Box<dyn DynAuthorizer>,
    l1_max_bytes: u64,
    allow_ttl: Duration,
    deny_ttl: Duration,
    authorizer_timeout: Duration,
    clock: Clock,
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    max_staleness: Duration,
    rotation: Option<(Vec<u8>, std::time::SystemTime)>,
    #[cfg(feature = "redis")]
    l2: Option<crate::tier::redis::RedisTier>,
    #[cfg(feature = "postgres")]
    l3: Option<crate::tier::postgres::PostgresTier>,
}

impl fmt::Debug for AuthzCacheBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthzCacheBuilder")
            .field("l1_max_bytes", &self.l1_max_bytes)
            .field("allow_ttl", &self.allow_ttl)
            .field("deny_ttl", &self.deny_ttl)
            .field("authorizer_timeout", &self.authorizer_timeout)
            .finish_non_exhaustive()
    }
}

impl AuthzCacheBuilder {
    /// Bound of L1 in bytes (keys, entries and the cache's own per-entry overhead). Zero
    /// disables L1: every check goes to L2 or the authorizer.
    pub fn l1_max_bytes(mut self, bytes: u64) -> Self {
        self.l1_max_bytes = bytes;
        self
    }

    /// How long an allow is cached. The authorizer's hint can only shorten it.
    pub fn allow_ttl(mut self, ttl: Duration) -> Self {
        self.allow_ttl = ttl;
        self
    }

    /// How long a deny is cached (usually shorter than allows, so grants show up quickly).
    pub fn deny_ttl(mut self, ttl: Duration) -> Self {
        self.deny_ttl = ttl;
        self
    }

    /// How long one authorizer call may take before the check fails closed (503).
    pub fn authorizer_timeout(mut self, timeout: Duration) -> Self {
        self.authorizer_timeout = timeout;
        self
    }

    /// With a backplane: how long this process may go without hearing it before it stops
    /// trusting L1 (default 1 s). Also the bound on how long another instance's invalidation
    /// can go unseen here when the backplane is cut.
    pub fn max_staleness(mut self, max_staleness: Duration) -> Self {
        self.max_staleness = max_staleness;
        self
    }

    /// The other secret of a secret rotation, honoured until `until` (a wall-clock instant,
    /// the same in every instance). Until then, a shared entry written under `secret` is still
    /// served after a miss under the tiers' own secret (its in-process copy is kept no later
    /// than `until`), and every invalidation is applied under both secrets; from `until` on,
    /// entries under `secret` are never read again, whatever the configuration still says.
    ///
    /// A rotation from OLD to NEW, with `T` at least one allow ttl after the last step starts:
    /// 1. every instance: tiers on OLD, `rotation_secret(NEW, T)` (invalidations now reach
    ///    entries under NEW before any is written);
    /// 2. every instance: tiers on NEW, `rotation_secret(OLD, T)` (writes under NEW; entries
    ///    under OLD are served until `T`);
    /// 3. after `T`: drop the rotation secret.
    ///
    /// An instance that knows only one of the two secrets must not run beside instances
    /// writing under the other one: its invalidations would not reach their entries.
    /// Has no effect without a shared tier. Configured from the environment by
    /// `AUTHZ_CACHE_ROTATION_SECRET` and `AUTHZ_CACHE_ROTATION_UNTIL` (see
    /// [`CacheConfig`](crate::CacheConfig)).
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use tower_authz_cache::{AuthzCache, Decision, Permission, Principal};
    ///
    /// let until = SystemTime::now() + Duration::from_secs(3600);
    /// let cache = AuthzCache::builder(|_: Principal, _: Permission| async {
    ///     Ok::<_, std::convert::Infallible>(Decision::allow())
    /// })
    /// .rotation_secret("the previous 32-byte secret......", until)
    /// .build();
    /// # drop(cache);
    /// ```
    pub fn rotation_secret(mut self, secret: impl AsRef<[u8]>, until: std::time::SystemTime) -> Self {
        self.rotation = Some((secret.as_ref().to_vec(), until));
        self
    }

    /// Adds L2 on Redis and the Redis backplane (feature `redis`).
    #[cfg(feature = "redis")]
    pub fn l2(mut self, tier: crate::tier::redis::RedisTier) -> Self {
        self.l2 = Some(tier);
        self
    }

    /// Adds L3 on Postgres, its LISTEN/NOTIFY listener (change feed, and backplane when there is
    /// no L2), the sweeper and warming (feature `postgres`). With L2 too, both tiers must be
    /// built with the same secret.
    #[cfg(feature = "postgres")]
    pub fn l3(mut self, tier: crate::tier::postgres::PostgresTier) -> Self {
        self.l3 = Some(tier);
        self
    }

    #[cfg(test)]
    pub(crate) fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Unstable, for the crate's own clock-skew tests (feature `internals`): this cache's wall
    /// clock runs `offset_ms` ahead of the system's (negative: behind).
    #[cfg(feature = "internals")]
    #[doc(hidden)]
    pub fn __wall_clock_offset(mut self, offset_ms: i64) -> Self {
        self.clock = Clock::offset(offset_ms);
        self
    }

    /// Builds the cache.
    ///
    /// # Panics
    ///
    /// With an L2, outside a Tokio runtime: the backplane and the write-behind queue are tasks.
    pub fn build(self) -> AuthzCache {
        let longest_ttl = self.allow_ttl.max(self.deny_ttl);
        // An L1 entry stamped before a bump expires at most `longest_ttl` after it entered L1
        // (monotonic, capped), which is at most `authorizer_timeout` after the stamp: past that,
        // the bump's scope can be forgotten here (see epoch.rs). Shared stores keep epochs longer
        // by `SHARED_RETENTION_MARGIN`, on their own clocks: rows and keys they hold are judged by
        // the same clocks (Redis expiries, Postgres `written_at`), so writers' clocks only need
        // to agree within that margin for the write-behind delay, never for correctness of a read.
        let forget_after_ms = ms(longest_ttl)
            .saturating_add(ms(self.authorizer_timeout))
            .saturating_add(ms(LATE_WRITE_MARGIN))
            .saturating_add(1000);
        let shared_retention_ms = forget_after_ms.saturating_add(ms(SHARED_RETENTION_MARGIN));
        #[cfg_attr(not(any(feature = "redis", feature = "postgres")), allow(unused_mut))]
        let mut secrets: Vec<&[u8]> = Vec::new();
        #[cfg(feature = "redis")]
        secrets.extend(self.l2.as_ref().map(|t| t.shared.secret.as_slice()));
        #[cfg(feature = "postgres")]
        secrets.extend(self.l3.as_ref().map(|t| t.shared.secret.as_slice()));
        assert!(secrets.windows(2).all(|w| w[0] == w[1]), "L2 and L3 must be built with the same secret");
        let keys = match secrets.first() {
            Some(secret) => {
                let keys = Keys::derive(secret);
                keys.use_for_logs();
                keys
            }
            None => Keys::random(),
        };
        let rotation = self.rotation.map(|(secret, until)| Rotation {
            keys: Keys::derive(&secret),
            until_ms: until.duration_since(std::time::UNIX_EPOCH).map_or(0, ms),
        });
        let epochs = Arc::new(Epochs::new(keys.clone(), forget_after_ms, self.clock.clone()));
        let stats = Arc::new(Stats::new());
        #[cfg(feature = "redis")]
        {
            #[cfg(feature = "postgres")]
            let authority = self.l3.is_none();
            #[cfg(not(feature = "postgres"))]
            let authority = true;
            if let Some(tier) = &self.l2 {
                tier.shared.set_keeps_epochs(authority);
            }
        }
        #[cfg(feature = "redis")]
        let l2 = self.l2.map(|tier| L2 {
            writes: crate::tier::redis::spawn_writers(tier.shared.clone(), stats.clone(), self.clock.clone()),
            backplane: crate::invalidation::backplane::start(
                crate::invalidation::backplane::Source::Redis(tier.shared.clone()),
                epochs.clone(),
                self.max_staleness,
            ),
            redis: tier.shared,
        });
        #[cfg(feature = "postgres")]
        let l3 = self.l3.map(|tier| {
            let feed = Arc::new(feed::FeedState::new(self.max_staleness));
            L3 {
                writes: crate::tier::postgres::spawn_writer(tier.shared.clone(), stats.clone(), self.clock.clone()),
                listener: crate::invalidation::backplane::start(
                    crate::invalidation::backplane::Source::Postgres { pg: tier.shared.clone(), feed: feed.clone() },
                    epochs.clone(),
                    self.max_staleness,
                ),
                feed,
                teammates: tier.shared.warm_teammates,
                warmers: Arc::new(tokio::sync::Semaphore::new(2)),
                pg: tier.shared,
            }
        });
        #[cfg(feature = "postgres")]
        let active = l3.as_ref().filter(|l3| l3.teammates > 0).map(|_| {
            mini_moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(longest_ttl.max(Duration::from_secs(1)))
                .build()
        });
        let inner = Arc::new(Inner {
            l1: MemoryTier::new(self.l1_max_bytes, longest_ttl.max(Duration::from_millis(1))),
            epochs,
            keys,
            rotation,
            flights: SingleFlight::new(),
            authorizer: self.authorizer,
            stats,
            clock: self.clock,
            allow_ttl_ms: ms(self.allow_ttl),
            deny_ttl_ms: ms(self.deny_ttl),
            longest_ttl_ms: ms(longest_ttl),
            shared_retention_ms,
            authorizer_timeout: self.authorizer_timeout,
            #[cfg(feature = "redis")]
            l2,
            #[cfg(feature = "postgres")]
            l3,
            #[cfg(any(feature = "redis", feature = "postgres"))]
            pending: std::sync::Mutex::new(Pending::default()),
            #[cfg(feature = "postgres")]
            active,
            tasks: Tasks::default(),
        });
        #[cfg(any(feature = "redis", feature = "postgres"))]
        if inner.has_shared_tier() {
            #[cfg_attr(not(feature = "postgres"), allow(unused_mut))]
            let mut tasks = vec![tokio::spawn(janitor(Arc::downgrade(&inner)))];
            #[cfg(feature = "postgres")]
            if let Some(l3) = &inner.l3 {
                tasks.push(tokio::spawn(feed::run(Arc::downgrade(&inner), l3.feed.clone())));
                tasks.push(tokio::spawn(feed::watchdog(l3.feed.clone())));
                tasks.push(tokio::spawn(warm::on_start(Arc::downgrade(&inner), l3.pg.warm_on_start)));
            }
            *inner.tasks.0.lock().unwrap_or_else(|e| e.into_inner()) = tasks;
        }
        AuthzCache { inner }
    }
}

/// How late a shared copy may land after its entry was computed (the L3 write queue drops rows
/// older than this): local retention covers it, so a local-only bump outlives every shared entry
/// stamped before it.
#[cfg(feature = "postgres")]
const LATE_WRITE_MARGIN: Duration = crate::tier::postgres::MAX_WRITE_DELAY;
#[cfg(not(feature = "postgres"))]
const LATE_WRITE_MARGIN: Duration = Duration::ZERO;

/// How long an L3 read that found a recorded change not applied yet waits for the change feed to
/// apply it, before the request goes on without L3 (and writes no L3 copy).
#[cfg(feature = "postgres")]
const FEED_CATCH_UP_WAIT: Duration = Duration::from_millis(250);

/// How often Redis's `maxmemory-policy` is read again.
#[cfg(feature = "redis")]
const EVICTION_CHECK_EVERY: Duration = Duration::from_secs(5);

/// How much longer than this process's own retention shared stores keep an epoch (see
/// [`AuthzCacheBuilder::build`]).
const SHARED_RETENTION_MARGIN: Duration = Duration::from_secs(5);

/// Background tasks of a cache, aborted when it is dropped.
#[derive(Default)]
struct Tasks(std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in self.0.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            t.abort();
        }
    }
}

/// Background upkeep of the shared tiers: pays owed invalidations; with L3, also flushes hit
/// counters and sweeps expired rows.
#[cfg(any(feature = "redis", feature = "postgres"))]
async fn janitor(inner: std::sync::Weak<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    #[cfg(feature = "postgres")]
    let mut upkeep = L3Upkeep { last_flush: Instant::now(), last_sweep: Instant::now(), global_mirrored: false };
    #[cfg(feature = "redis")]
    let mut eviction_checked: Option<Instant> = None;
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        inner.retry_pending().await;
        // Redis's eviction policy, at start and every few seconds (an operator may change it).
        #[cfg(feature = "redis")]
        if let Some(l2) = &inner.l2 {
            if eviction_checked.is_none_or(|at| at.elapsed() >= EVICTION_CHECK_EVERY) {
                eviction_checked = Some(Instant::now());
                l2.redis.check_eviction().await;
            }
        }
        #[cfg(feature = "postgres")]
        upkeep.run(&inner).await;
    }
}

#[cfg(feature = "postgres")]
struct L3Upkeep {
    last_flush: Instant,
    last_sweep: Instant,
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    global_mirrored: bool,
}

#[cfg(feature = "postgres")]
impl L3Upkeep {
    async fn run(&mut self, inner: &Inner) {
        let Some(l3) = &inner.l3 else { return };
        // With L2 too: Redis starts from the durable global epoch (after a flush it has none), so
        // that entries stamped with it validate in L2 as well as in L3.
        #[cfg(feature = "redis")]
        if let (false, Some(l2)) = (self.global_mirrored, &inner.l2) {
            if let Ok(g) = l3.pg.global_epoch().await {
                inner.epochs.merge_global(g);
                self.global_mirrored = l2.redis.raise(None, g, 0).await.is_ok();
            }
        }
        if self.last_flush.elapsed() >= Duration::from_secs(1) {
            self.last_flush = Instant::now();
            if let Err(e) = l3.pg.flush_hits().await {
                tracing::debug!(target: "authz_cache", error = %e, "l3 hit counters not flushed");
            }
        }
        if self.last_sweep.elapsed() >= l3.pg.sweep_every {
            self.last_sweep = Instant::now();
            // Batches until one comes back short; bounded, so one sweep cannot run forever.
            for _ in 0..1000 {
                match l3.pg.sweep_once().await {
                    Ok(n) => {
                        inner.stats.l3.swept.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                        if n < u64::from(l3.pg.sweep_batch) {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(target: "authz_cache", error = %e, "l3 sweep failed");
                        break;
                    }
                }
            }
        }
    }
}

/// No decision could be obtained. The layer answers 503; callers of
/// [`AuthzCache::check`] must treat it as "not allowed".
#[derive(Clone)]
pub struct CheckError {
    kind: CheckErrorKind,
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

/// What kind of [`CheckError`] this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CheckErrorKind {
    /// The authorizer returned an error.
    Authorizer,
    /// The authorizer did not answer within its timeout.
    Timeout,
    /// The authorizer panicked.
    Panicked,
    /// Invalidations kept landing while the decision was computed: at least three times, and
    /// for longer than the authorizer timeout (or sixteen times).
    Unstable,
}

impl CheckError {
    fn new(kind: CheckErrorKind, source: Option<BoxError>) -> Self {
        Self { kind, source: source.map(Arc::from) }
    }

    /// The kind of failure.
    pub fn kind(&self) -> CheckErrorKind {
        self.kind
    }

    /// The authorizer did not answer in time.
    pub fn is_timeout(&self) -> bool {
        self.kind == CheckErrorKind::Timeout
    }
}

impl fmt::Debug for CheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckError").field("kind", &self.kind).field("source", &self.source).finish()
    }
}

impl fmt::Display for CheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.kind {
            CheckErrorKind::Authorizer => "authorizer failed",
            CheckErrorKind::Timeout => "authorizer timed out",
            CheckErrorKind::Panicked => "authorizer panicked",
            CheckErrorKind::Unstable => "decision invalidated while computed, repeatedly",
        })
    }
}

impl std::error::Error for CheckError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use tokio::sync::{Notify, Semaphore};

    fn bob() -> Principal {
        Principal::new("bob")
    }

    fn read(doc: u32) -> Permission {
        Permission::new(format!("documents:{doc}"), "read")
    }

    /// An authorizer whose answer the test controls, counting its calls.
    #[derive(Clone, Default)]
    struct Switch {
        allow: Arc<AtomicBool>,
        calls: Arc<AtomicUsize>,
    }

    impl Switch {
        fn cache(&self, clock: Clock) -> AuthzCache {
            let s = self.clone();
            AuthzCache::builder(move |_: Principal, _: Permission| {
                let s = s.clone();
                async move {
                    s.calls.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, BoxError>(Decision::from_bool(s.allow.load(Ordering::SeqCst)))
                }
            })
            .allow_ttl(Duration::from_secs(60))
            .deny_ttl(Duration::from_secs(5))
            .clock(clock)
            .build()
        }
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    /// L1 (and its per-thread front) keeps time on the monotonic clock: a wall clock stepped back
    /// an hour does not keep an entry alive past its ttl, nor one stepped ahead end it early.
    #[test]
    fn l1_deadlines_ignore_wall_clock_steps() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let clock = Clock::manual();
            let sw = Switch::default();
            sw.allow.store(true, Ordering::SeqCst);
            let cache = sw.cache(clock.clone());
            cache.check(&bob(), &read(1)).await.unwrap();
            clock.step_wall(3_600_000);
            cache.check(&bob(), &read(1)).await.unwrap();
            assert_eq!(sw.calls(), 1, "a wall clock an hour ahead ends nothing early");
            clock.step_wall(-7_200_000);
            clock.advance(Duration::from_secs(60));
            cache.check(&bob(), &read(1)).await.unwrap();
            assert_eq!(sw.calls(), 2, "a wall clock an hour behind keeps nothing past its ttl");
        });
    }

    #[tokio::test]
    async fn allow_and_deny_expire_on_their_own_ttls() {
        let clock = Clock::manual();
        let sw = Switch::default();
        sw.allow.store(true, Ordering::SeqCst);
        let cache = sw.cache(clock.clone());
        assert!(cache.check(&bob(), &read(1)).await.unwrap().is_allowed());
        clock.advance(Duration::from_millis(59_999));
        assert!(cache.check(&bob(), &read(1)).await.unwrap().is_allowed());
        assert_eq!(sw.calls(), 1, "still valid one ms before the deadline");
        clock.advance(Duration::from_millis(1));
        sw.allow.store(false, Ordering::SeqCst);
        assert!(!cache.check(&bob(), &read(1)).await.unwrap().is_allowed(), "expired allow is a miss");
        assert_eq!(sw.calls(), 2);
        assert_eq!(cache.stats().tiers.l1.expired, 1);
        // The deny lives 5 s.
        clock.advance(Duration::from_millis(4_999));
        assert!(!cache.check(&bob(), &read(1)).await.unwrap().is_allowed());
        assert_eq!(sw.calls(), 2);
        clock.advance(Duration::from_millis(1));
        sw.allow.store(true, Ordering::SeqCst);
        assert!(cache.check(&bob(), &read(1)).await.unwrap().is_allowed());
        assert_eq!(sw.calls(), 3);
    }

    #[tokio::test]
    async fn the_authorizer_hint_only_shortens() {
        let clock = Clock::manual();
        let calls = Arc::new(AtomicUsize::new(0));
        let hint = Arc::new(Mutex::new(Duration::from_secs(2)));
        let (c, h) = (calls.clone(), hint.clone());
        let cache = AuthzCache::builder(move |_: Principal, _: Permission| {
            c.fetch_add(1, Ordering::SeqCst);
            let ttl = *h.lock().unwrap();
            async move { Ok::<_, BoxError>(Decision::allow().with_ttl(ttl)) }
        })
        .allow_ttl(Duration::from_secs(10))
        .clock(clock.clone())
        .build();
        cache.check(&bob(), &read(1)).await.unwrap();
        clock.advance(Duration::from_millis(2_000));
        cache.check(&bob(), &read(1)).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2, "hint of 2 s wins over ttl of 10 s");

        *hint.lock().unwrap() = Duration::from_secs(3600);
        cache.check(&bob(), &read(2)).await.unwrap();
        clock.advance(Duration::from_millis(10_000));
        cache.check(&bob(), &read(2)).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 4, "a long hint never extends the ttl of 10 s");

        *hint.lock().unwrap() = Duration::ZERO;
        cache.check(&bob(), &read(3)).await.unwrap();
        cache.check(&bob(), &read(3)).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 6, "a zero hint is not cached");
    }

    #[tokio::test]
    async fn invalidation_at_every_scope_makes_the_next_check_miss() {
        let sw = Switch::default();
        sw.allow.store(true, Ordering::SeqCst);
        let cache = sw.cache(Clock::manual());
        let alice = Principal::new("alice");
        for inv in [
            Invalidation::principal("bob"),
            Invalidation::resource("documents:1"),
            Invalidation::entry("bob", read(1)),
            Invalidation::All,
        ] {
            cache.check(&bob(), &read(1)).await.unwrap();
            cache.check(&alice, &read(2)).await.unwrap();
            let before = sw.calls();
            cache.check(&bob(), &read(1)).await.unwrap();
            assert_eq!(sw.calls(), before, "cached before {inv:?}");
            cache.invalidate(&inv).await.unwrap();
            cache.check(&bob(), &read(1)).await.unwrap();
            assert_eq!(sw.calls(), before + 1, "{inv:?} covers bob/documents:1");
            cache.check(&alice, &read(2)).await.unwrap();
            let alice_recomputed = sw.calls() - before - 1;
            assert_eq!(alice_recomputed, usize::from(inv == Invalidation::All), "{inv:?} and alice/documents:2");
        }
    }

    /// An authorizer that invalidates bob while answering, for its first `burst` calls.
    fn churning(burst: usize, pause: Duration, timeout: Duration) -> (AuthzCache, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let handle: Arc<std::sync::OnceLock<AuthzCache>> = Arc::default();
        let (c, h) = (calls.clone(), handle.clone());
        let cache = AuthzCache::builder(move |_: Principal, _: Permission| {
            let (c, h) = (c.clone(), h.clone());
            async move {
                tokio::time::sleep(pause).await;
                if c.fetch_add(1, Ordering::SeqCst) < burst {
                    let cache = h.get().expect("set").clone();
                    cache.invalidate(&Invalidation::principal("bob")).await.unwrap();
                }
                Ok::<_, BoxError>(Decision::allow())
            }
        })
        .authorizer_timeout(timeout)
        .build();
        let _ = handle.set(cache.clone());
        (cache, calls)
    }

    #[tokio::test]
    async fn a_burst_of_invalidations_longer_than_three_attempts_is_ridden_out() {
        let (cache, calls) = churning(5, Duration::ZERO, Duration::from_secs(5));
        assert!(cache.check(&bob(), &read(1)).await.expect("decided after the burst").is_allowed());
        assert_eq!(calls.load(Ordering::SeqCst), 6);
        assert_eq!(cache.stats().invalidation_races, 5);
    }

    #[tokio::test]
    async fn invalidations_landing_for_longer_than_the_authorizer_timeout_fail_as_unstable() {
        // Slow churn: at least three attempts, then stops once the timeout (30 ms) has passed.
        let (cache, calls) = churning(usize::MAX, Duration::from_millis(10), Duration::from_millis(30));
        let err = cache.check(&bob(), &read(1)).await.expect_err("never stable");
        assert_eq!(err.kind(), CheckErrorKind::Unstable);
        let n = calls.load(Ordering::SeqCst);
        assert!((MIN_ATTEMPTS..MAX_ATTEMPTS).contains(&n), "{n} attempts");
        // Fast churn: the attempt cap ends it well inside the timeout.
        let (cache, calls) = churning(usize::MAX, Duration::ZERO, Duration::from_secs(5));
        assert_eq!(cache.check(&bob(), &read(1)).await.unwrap_err().kind(), CheckErrorKind::Unstable);
        assert_eq!(calls.load(Ordering::SeqCst), MAX_ATTEMPTS);
    }

    /// An authorizer that answers `allow` from the state it read *before* blocking, the way a
    /// real authorizer answers from a snapshot: it blocks until the test releases it.
    #[tokio::test]
    async fn a_decision_computed_across_an_invalidation_is_never_served_after_it() {
        let allowed = Arc::new(AtomicBool::new(true));
        let calls = Arc::new(AtomicUsize::new(0));
        let entered = Arc::new(Notify::new());
        let release = Arc::new(Semaphore::new(0));
        let (a, c, e, r) = (allowed.clone(), calls.clone(), entered.clone(), release.clone());
        let cache = AuthzCache::builder(move |_: Principal, _: Permission| {
            let (a, c, e, r) = (a.clone(), c.clone(), e.clone(), r.clone());
            async move {
                let snapshot = a.load(Ordering::SeqCst);
                let n = c.fetch_add(1, Ordering::SeqCst);
                if n == 0 {
                    e.notify_one();
                    r.acquire().await.unwrap().forget();
                }
                Ok::<_, BoxError>(Decision::from_bool(snapshot))
            }
        })
        .build();

        let c2 = cache.clone();
        let first = tokio::spawn(async move { c2.check(&bob(), &read(1)).await });
        entered.notified().await;
        // The first call has read "allowed" and is blocked. Revoke, invalidate, then release it.
        let c3 = cache.clone();
        let follower = tokio::spawn(async move { c3.check(&bob(), &read(1)).await });
        tokio::task::yield_now().await;
        allowed.store(false, Ordering::SeqCst);
        cache.invalidate(&Invalidation::principal("bob")).await.unwrap();
        release.add_permits(1);

        assert!(!first.await.unwrap().unwrap().is_allowed(), "the stale allow was recomputed");
        assert!(!follower.await.unwrap().unwrap().is_allowed());
        assert!(!cache.check(&bob(), &read(1)).await.unwrap().is_allowed());
        assert_eq!(calls.load(Ordering::SeqCst), 2, "one stale answer thrown away, one fresh");
        assert_eq!(cache.stats().invalidation_races, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_thousand_concurrent_misses_make_one_call() {
        let calls = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Semaphore::new(0));
        let (c, g) = (calls.clone(), gate.clone());
        let cache = AuthzCache::builder(move |_: Principal, _: Permission| {
            let (c, g) = (c.clone(), g.clone());
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                g.acquire().await.unwrap().forget();
                Ok::<_, BoxError>(Decision::allow())
            }
        })
        .build();
        let tasks: Vec<_> = (0..1000)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.check(&bob(), &read(1)).await })
            })
            .collect();
        // Let every task reach the flight before the answer comes: the leader holds it (the
        // gate is closed), so every other task joins as a follower.
        while cache.stats().single_flight_joins < 999 {
            tokio::task::yield_now().await;
        }
        gate.add_permits(1);
        for t in tasks {
            assert!(t.await.unwrap().unwrap().is_allowed());
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(cache.stats().single_flight_joins, 999);
        assert_eq!(cache.inner.flights.len(), 0);
    }

    #[tokio::test]
    async fn dropping_the_leading_request_strands_nobody() {
        let gate = Arc::new(Semaphore::new(0));
        let calls = Arc::new(AtomicUsize::new(0));
        let (g, c) = (gate.clone(), calls.clone());
        let cache = AuthzCache::builder(move |_: Principal, _: Permission| {
            let (g, c) = (g.clone(), c.clone());
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                g.acquire().await.unwrap().forget();
                Ok::<_, BoxError>(Decision::allow())
            }
        })
        .build();
        let leader = tokio::spawn({
            let cache = cache.clone();
            async move { cache.check(&bob(), &read(1)).await }
        });
        while calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let follower = tokio::spawn({
            let cache = cache.clone();
            async move { cache.check(&bob(), &read(1)).await }
        });
        while cache.stats().single_flight_joins == 0 {
            tokio::task::yield_now().await;
        }
        leader.abort();
        assert!(leader.await.unwrap_err().is_cancelled());
        // The follower takes over the flight and asks again.
        gate.add_permits(1);
        assert!(follower.await.unwrap().unwrap().is_allowed());
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(cache.inner.flights.len(), 0);
    }

    #[tokio::test]
    async fn errors_timeouts_and_panics_reach_every_waiter_and_are_not_cached() {
        let mode = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Semaphore::new(0));
        let (m, g) = (mode.clone(), gate.clone());
        let cache = AuthzCache::builder(move |_: Principal, _: Permission| {
            let (m, g) = (m.clone(), g.clone());
            async move {
                g.acquire().await.unwrap().forget();
                match m.load(Ordering::SeqCst) {
                    0 => Err::<Decision, BoxError>("backend down".into()),
                    1 => std::future::pending().await,
                    2 => panic!("authorizer bug"),
                    _ => Ok(Decision::allow()),
                }
            }
        })
        .authorizer_timeout(Duration::from_millis(50))
        .build();
        for (m, kind) in [(0, CheckErrorKind::Authorizer), (1, CheckErrorKind::Timeout), (2, CheckErrorKind::Panicked)]
        {
            mode.store(m, Ordering::SeqCst);
            let waiters: Vec<_> = (0..3)
                .map(|_| {
                    let cache = cache.clone();
                    tokio::spawn(async move { cache.check(&bob(), &read(1)).await })
                })
                .collect();
            while cache.inner.flights.len() == 0 || cache.stats().single_flight_joins < 2 * (m as u64 + 1) {
                tokio::task::yield_now().await;
            }
            gate.add_permits(1);
            for w in waiters {
                assert_eq!(w.await.unwrap().unwrap_err().kind(), kind);
            }
        }
        mode.store(3, Ordering::SeqCst);
        gate.add_permits(1);
        assert!(cache.check(&bob(), &read(1)).await.unwrap().is_allowed(), "no error was cached");
        let stats = cache.stats();
        assert_eq!((stats.authorizer_calls, stats.authorizer_errors, stats.undecided), (4, 3, 9));
    }

    #[tokio::test]
    async fn l1_stays_within_its_byte_bound() {
        let cache = AuthzCache::builder(|_: Principal, _: Permission| async { Ok::<_, BoxError>(Decision::allow()) })
            .l1_max_bytes(1 << 20)
            .build();
        for i in 0..20_000u32 {
            cache.check(&Principal::new(format!("user-{i}")), &read(i)).await.unwrap();
        }
        cache.sync_l1();
        let l1 = cache.stats().tiers.l1;
        assert!(l1.bytes <= 1 << 20, "{l1:?}");
        assert!(l1.entries < 20_000 && l1.entries > 1000, "{l1:?}");
    }

    #[tokio::test]
    async fn a_zero_byte_l1_caches_nothing() {
        let sw = Switch::default();
        sw.allow.store(true, Ordering::SeqCst);
        let s = sw.clone();
        let cache = AuthzCache::builder(move |_: Principal, _: Permission| {
            s.calls.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, BoxError>(Decision::allow()) }
        })
        .l1_max_bytes(0)
        .build();
        for _ in 0..3 {
            cache.check(&bob(), &read(1)).await.unwrap();
        }
        assert_eq!(sw.calls(), 3);
        assert_eq!(cache.stats().tiers.l1.entries, 0);
    }

    /// Another thread's front holds a copy of the entry: it must be as dead as the original
    /// after every kind of invalidation and after expiry.
    #[test]
    fn copies_in_another_threads_front_die_with_the_entry() {
        let clock = Clock::manual();
        let sw = Switch::default();
        sw.allow.store(true, Ordering::SeqCst);
        let cache = sw.cache(clock.clone());
        let rt = || tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (to_worker, worker_rx) = std::sync::mpsc::channel::<()>();
        let (to_main, main_rx) = std::sync::mpsc::channel::<usize>();
        let worker_cache = cache.clone();
        let worker_sw = sw.clone();
        let worker = std::thread::spawn(move || {
            let rt = rt();
            // Each round: check twice (the second is a front hit), report calls, wait.
            while worker_rx.recv().is_ok() {
                rt.block_on(async {
                    worker_cache.check(&bob(), &read(1)).await.unwrap();
                    worker_cache.check(&bob(), &read(1)).await.unwrap();
                });
                to_main.send(worker_sw.calls()).unwrap();
            }
        });
        let main_rt = rt();
        let round = |change: &dyn Fn()| {
            to_worker.send(()).unwrap();
            let before = main_rx.recv().unwrap();
            change();
            to_worker.send(()).unwrap();
            let after = main_rx.recv().unwrap();
            after - before
        };
        assert_eq!(round(&|| {}), 0, "nothing changed: front hits, no call");
        for inv in [
            Invalidation::principal("bob"),
            Invalidation::resource("documents:1"),
            Invalidation::entry("bob", read(1)),
            Invalidation::All,
        ] {
            assert_eq!(round(&|| main_rt.block_on(cache.invalidate(&inv)).unwrap()), 1, "{inv:?}");
        }
        assert_eq!(round(&|| clock.advance(Duration::from_secs(60))), 1, "expiry");
        drop(to_worker);
        worker.join().unwrap();
    }
}
