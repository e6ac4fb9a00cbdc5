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

mod auditor;
mod batch;
mod builder;
pub(crate) mod clock;
mod debts;
pub(crate) mod entry;
pub(crate) mod epoch;
mod error;
pub(crate) mod feed;
mod fresh;
mod invalidate;
pub(crate) mod key;
mod miss;
#[cfg(test)]
mod properties;
mod read;
mod refresh;
pub(crate) mod single_flight;
mod tasks;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_audit;
#[cfg(test)]
mod tests_batch;
#[cfg(test)]
mod tests_consistency;
#[cfg(test)]
mod tests_grace;
#[cfg(test)]
mod tests_shared;
mod unfinished;
pub(crate) mod warm;
pub(crate) mod write_behind;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::core::authorizer::DynAuthorizer;
use crate::invalidation::Invalidation;
use crate::invalidation::backplane::Backplane;
use crate::stats::{Stats, StatsSnapshot};
use crate::tier::guarded::Guarded;
use crate::tier::local::L1;
use crate::tier::shared::TierWrite;
use crate::{Decision, Permission, Principal};

pub use builder::{AuthzCacheBuilder, BuildError};
pub use error::{CheckError, CheckErrorKind};

use clock::Clock;
use epoch::{Epochs, Target};
use key::{CacheKey, Keys, ShortHash};
use single_flight::SingleFlight;

/// At most this many refresh-ahead computations run at once (see
/// [`AuthzCacheBuilder::refresh_ahead`]); a hit that finds none free does not refresh.
pub const REFRESH_CONCURRENCY: usize = 4;

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

type Outcome = Result<Decision, CheckError>;

/// The `authz_check` span around a check (disabled, and nearly free, without a subscriber for it).
fn check_span() -> tracing::Span {
    use tracing::field::Empty;
    tracing::debug_span!(target: "authz_cache", "authz_check", source = Empty, age_ms = Empty, allowed = Empty)
}

/// The decision's provenance as fields of the check's span (nothing when the span is off).
fn record_provenance(span: &tracing::Span, decision: &Decision) {
    if span.is_disabled() {
        return;
    }
    span.record("source", decision.source().as_str());
    span.record("allowed", decision.is_allowed());
    if let Some(age) = decision.age() {
        span.record("age_ms", u64::try_from(age.as_millis()).unwrap_or(u64::MAX));
    }
}

/// The tiered authorization cache: tiers, single flight, epochs and stats around your
/// [`Authorizer`](crate::Authorizer).
#[derive(Clone)]
pub struct AuthzCache {
    inner: Arc<Inner>,
}

/// The cache's state. Its jobs live in files of their own: `read.rs` (L1 and the shared tiers),
/// `miss.rs` (single flight and the authorizer), `invalidate.rs` (epoch bumps), `debts.rs` (bumps
/// owed to tiers), `write_behind.rs` (shared copies), `feed.rs` (the change feed), `tasks.rs`
/// (the janitor) and `builder.rs` (wiring).
pub(crate) struct Inner {
    l1: L1,
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
    shared_retention_ms: u64,
    authorizer_timeout: Duration,
    /// How long past its ttl an L1 entry may answer when the authorizer fails (0: off).
    grace_ms: u64,
    /// Refresh-ahead: the last fraction of an entry's ttl in which a hit recomputes it (0: off).
    refresh_ahead: f64,
    /// Permits for background refreshes.
    refreshes: Arc<tokio::sync::Semaphore>,
    /// The consistency auditor's sampler, when on.
    auditor: Option<auditor::Sampler>,
    /// Monotonic ms before which no refresh starts (after one failed).
    refresh_paused_until_ms: std::sync::atomic::AtomicU64,
    /// The shared tiers, shallowest first; the last one is the authority over the epochs.
    tiers: Vec<Slot>,
    /// The tier whose backplane decides whether L1 is trusted: the shallowest with a transport.
    primary: Option<usize>,
    /// The authority's durable change feed, if it has one.
    feed: Option<Arc<feed::FeedState>>,
    /// Shared-epoch bumps that could not be written where they belong yet (paid in the
    /// background); while any is pending, the tier that missed it is not read.
    pending: std::sync::Mutex<debts::Pending>,
    /// Team-mate warming, when on.
    warming: Option<warm::Teammates>,
    /// The highest epoch of a consistency token made under the other secret of a rotation that
    /// has dropped L1 (see `fresh.rs`).
    foreign_token: std::sync::atomic::AtomicU64,
    /// The background tasks (janitor, change feed, warming).
    tasks: tasks::Tasks,
}

/// One shared tier and what runs for it.
pub(crate) struct Slot {
    tier: Arc<Guarded>,
    writes: tokio::sync::mpsc::Sender<TierWrite>,
    backplane: Option<Backplane>,
}

/// The other secret of a rotation: shared entries under it are read (their copies kept no later
/// than `until_ms`), and every invalidation is applied under it too, until `until_ms`.
struct Rotation {
    keys: Keys,
    until_ms: u64,
}

impl fmt::Debug for AuthzCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthzCache")
            .field("allow_ttl_ms", &self.inner.allow_ttl_ms)
            .field("deny_ttl_ms", &self.inner.deny_ttl_ms)
            .field("authorizer_timeout", &self.inner.authorizer_timeout)
            .field("tiers", &self.inner.tiers.iter().map(|t| t.tier.level).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl AuthzCache {
    /// Starts building a cache in front of `authorizer`.
    pub fn builder<A: crate::Authorizer>(authorizer: A) -> AuthzCacheBuilder {
        AuthzCacheBuilder::new(Box::new(crate::core::authorizer::ErasedAuthorizer(Arc::new(authorizer))))
    }

    /// Decides whether `principal` holds `permission`: from L1 when a valid entry is there,
    /// otherwise from the authorizer (one call per key however many requests wait for it).
    ///
    /// An error means no decision could be obtained (authorizer failed, timed out or panicked,
    /// and nothing valid was cached): callers must treat it as "not allowed".
    ///
    /// The decision says where it came from and how old it is ([`Decision::source`],
    /// [`Decision::age`]); so does the `authz_check` tracing span (target `authz_cache`, level
    /// debug) around the check, as its fields `source`, `age_ms` and `allowed`.
    pub async fn check(&self, principal: &Principal, permission: &Permission) -> Result<Decision, CheckError> {
        match self.check_l1(principal, permission) {
            Some(decision) => {
                let span = check_span();
                record_provenance(&span, &decision);
                Ok(decision)
            }
            None => self.check_past_l1(principal, permission).await,
        }
    }

    /// The hit half of [`check`](Self::check), synchronously: the decision when L1 holds a valid
    /// entry (counted, sampled for latency and audit, refreshed ahead when due), `None` after
    /// an L1 miss (counted), which [`check_past_l1`](Self::check_past_l1) takes on from. The
    /// layer answers L1 hits through this without a future of its own.
    pub(crate) fn check_l1(&self, principal: &Principal, permission: &Permission) -> Option<Decision> {
        // Reading the clock is a good share of an L1 hit's cost on some VMs: hits are timed one
        // in `HIT_SAMPLE`; misses always, from the L1 miss on.
        let start = sample_hit().then(Instant::now);
        let key = CacheKey::new(principal, permission);
        let (decision, due) = self.inner.lookup_l1_due(&key, true, true)?;
        if self.inner.auditor.as_ref().is_some_and(auditor::Sampler::due) {
            self.inner.offer_audit(&key, principal, permission, &decision);
        }
        if due {
            self.refresh_ahead(key, principal, permission);
        }
        if let Some(start) = start {
            let elapsed = start.elapsed();
            self.inner.stats.l1_hit_latency.record(elapsed);
            #[cfg(feature = "metrics")]
            crate::exposition::record_l1_hit(elapsed);
        }
        Some(decision)
    }

    /// The rest of [`check`](Self::check) after [`check_l1`](Self::check_l1) missed: the
    /// shared tiers and the authorizer, behind single flight.
    pub(crate) async fn check_past_l1(&self, principal: &Principal, permission: &Permission) -> Outcome {
        let span = check_span();
        let key = CacheKey::new(principal, permission);
        let start = Instant::now();
        self.note_active(principal);
        // Boxed: the miss path's state (flight, timeout, authorizer future) is large, and
        // keeping it out of this future keeps the hit path free of big moves.
        let outcome =
            Box::pin(tracing::Instrument::instrument(self.inner.miss(key, principal, permission), span.clone())).await;
        if let Ok(decision) = &outcome {
            record_provenance(&span, decision);
            if decision.source().is_hit() && self.inner.auditor.as_ref().is_some_and(auditor::Sampler::due) {
                self.inner.offer_audit(&CacheKey::new(principal, permission), principal, permission, decision);
            }
        }
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

    /// Resolves once every subscription the cache keeps is up: every shared tier's backplane
    /// subscribed (Redis's pub/sub, Postgres's LISTEN), and the one that decides whether L1 is
    /// trusted heard. At once without a shared tier. A first subscription drops L1 (invalidations sent before it
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
        let mut health = crate::health::Health::assess(&stats, self.inner.stats.authorizer_failing());
        for slot in &self.inner.tiers {
            let part = match slot.tier.level {
                "l2" => health.tiers.l2.as_mut(),
                "l3" => health.tiers.l3.as_mut(),
                _ => None,
            };
            if let Some(part) = part {
                part.nodes = slot.tier.tier.nodes();
            }
        }
        health
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
        let mut snapshot = self.inner.stats.snapshot(self.inner.l1.usage());
        let pending = self.inner.pending.lock().unwrap_or_else(|e| e.into_inner());
        for (i, slot) in self.inner.tiers.iter().enumerate() {
            let mut tier = slot.tier.snapshot();
            tier.owed = pending.owed(i);
            match slot.tier.level {
                "l2" => snapshot.tiers.l2 = Some(tier),
                "l3" => snapshot.tiers.l3 = Some(tier),
                _ => {}
            }
        }
        drop(pending);
        snapshot.backplane = self.inner.backplane().map(|b| b.snapshot());
        snapshot.change_feed = self.inner.feed.as_ref().map(|f| f.snapshot());
        snapshot
    }

    /// Applies an invalidation: first to the shared tier (which publishes it to every other
    /// instance), then to this process. Every cached decision it covers, including any being
    /// computed right now, is a miss in this process from the moment this returns; in other
    /// instances, as soon as the backplane delivers it (or their L2 reads see the shared epoch).
    pub(crate) async fn apply_invalidation(
        &self,
        invalidation: &Invalidation,
        by: Option<&str>,
    ) -> Result<crate::consistency::ConsistencyToken, ()> {
        self.inner.apply_invalidation(invalidation, by).await
    }

    #[cfg(test)]
    pub(crate) fn sync_l1(&self) {
        self.inner.l1.sync();
    }
}

impl Inner {
    /// The authority over the epochs: the deepest shared tier.
    pub(crate) fn authority(&self) -> Option<&Guarded> {
        self.tiers.last().map(|slot| &*slot.tier)
    }

    /// The shared tiers that mirror the authority's epochs (all but the deepest).
    pub(crate) fn mirrors(&self) -> impl Iterator<Item = &Slot> {
        self.tiers.iter().take(self.tiers.len().saturating_sub(1))
    }

    /// The backplane whose heartbeat decides whether L1 is trusted.
    fn backplane(&self) -> Option<&crate::invalidation::backplane::BackplaneState> {
        let slot = &self.tiers[self.primary?];
        slot.backplane.as_ref().map(|b| &*b.state)
    }

    /// Whether every subscription is up (see [`AuthzCache::ready`]).
    fn subscribed(&self) -> bool {
        self.tiers.iter().filter_map(|s| s.backplane.as_ref()).all(|b| b.state.connected()) && self.l1_trusted()
    }

    /// Whether L1 may be read: with a backplane, only while it is heard, and with a change feed
    /// only while the feed is known to be caught up (see `feed.rs`).
    fn l1_trusted(&self) -> bool {
        self.backplane().is_none_or(|b| b.trusted()) && self.feed_trusted()
    }

    /// With a change feed: whether this process saw it caught up within `max_staleness` (every
    /// change to the source of truth applied to the epochs, and mirrored to the shallower
    /// tiers). Until then neither L1 nor the mirrors can vouch for anything.
    fn feed_trusted(&self) -> bool {
        self.feed.as_ref().is_none_or(|f| f.trusted())
    }

    /// Whether there is a shared tier (and so a key id to compute).
    fn has_shared_tier(&self) -> bool {
        !self.tiers.is_empty()
    }
}
