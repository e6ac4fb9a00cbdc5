//! Counters and latency histograms: [`StatsSnapshot`], from [`AuthzCache::stats`](crate::AuthzCache::stats).
//!
//! Counters are cumulative since the cache was built. A snapshot serialises to JSON (the demo's
//! `/admin/stats`) and renders as Prometheus text.
//!
//! ```
//! use tower_authz_cache::{AuthzCache, Decision, Permission, Principal};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let cache = AuthzCache::builder(|_: Principal, _: Permission| async {
//!     Ok::<_, std::convert::Infallible>(Decision::allow())
//! })
//! .build();
//! let (bob, read) = (Principal::new("bob"), Permission::new("documents:1", "read"));
//! cache.check(&bob, &read).await.unwrap();
//! cache.check(&bob, &read).await.unwrap();
//!
//! let stats = cache.stats();
//! assert_eq!((stats.tiers.l1.hits, stats.tiers.l1.misses, stats.authorizer_calls), (1, 1, 1));
//! let json = serde_json::to_value(&stats).unwrap();
//! assert_eq!(json["tiers"]["l1"]["hits"], 1);
//! # });
//! ```

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::Serialize;

/// Sub-buckets per power of two: values are recorded with at most 1/16 (6.25%) relative error.
const SUB_BITS: u32 = 4;
const SUB: usize = 1 << SUB_BITS;
const BUCKETS: usize = (64 - SUB_BITS as usize + 1) * SUB;

/// A lock-free log-linear histogram of nanoseconds.
pub(crate) struct Histogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_ns: AtomicU64,
    max: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    pub(crate) fn new() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
            max: AtomicU64::new(0),
        }
    }

    fn index(v: u64) -> usize {
        if v < SUB as u64 {
            return v as usize;
        }
        let msb = 63 - v.leading_zeros();
        let shift = msb - SUB_BITS;
        let sub = ((v >> shift) as usize) & (SUB - 1);
        ((shift as usize + 1) << SUB_BITS) + sub
    }

    /// The upper bound of a bucket's values.
    fn upper(index: usize) -> u64 {
        if index < SUB {
            return index as u64;
        }
        let shift = (index >> SUB_BITS) - 1;
        let sub = (index & (SUB - 1)) as u64;
        let base = (SUB as u64 + sub) << shift;
        base + ((1u64 << shift) - 1)
    }

    pub(crate) fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.buckets[Self::index(ns)].fetch_add(1, Relaxed);
        self.count.fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
        self.max.fetch_max(ns, Relaxed);
    }

    pub(crate) fn snapshot(&self) -> LatencySnapshot {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        let max = self.max.load(Relaxed);
        let quantile = |q: f64| -> f64 {
            if total == 0 {
                return 0.0;
            }
            let rank = ((q * total as f64).ceil() as u64).max(1);
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return Self::upper(i).min(max) as f64 / 1000.0;
                }
            }
            max as f64 / 1000.0
        };
        LatencySnapshot {
            count: total,
            p50_us: quantile(0.50),
            p95_us: quantile(0.95),
            p99_us: quantile(0.99),
            max_us: max as f64 / 1000.0,
            sum_us: self.sum_ns.load(Relaxed) as f64 / 1000.0,
        }
    }
}

/// Latency percentiles of one path, in microseconds (at most 6.25% above the true value).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct LatencySnapshot {
    /// Samples recorded.
    pub count: u64,
    /// Median.
    pub p50_us: f64,
    /// 95th percentile.
    pub p95_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Largest sample.
    pub max_us: f64,
    /// Sum of the samples.
    pub sum_us: f64,
}

/// Counters of one tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct TierSnapshot {
    /// Reads answered with a valid entry.
    pub hits: u64,
    /// Reads that found nothing valid (absent, expired or invalidated).
    pub misses: u64,
    /// Misses where an entry was present but expired.
    pub expired: u64,
    /// Misses where an entry was present but invalidated by an epoch bump.
    pub stale: u64,
    /// Misses because L1 was not trusted (the backplane was silent past `max_staleness`).
    pub untrusted: u64,
    /// Entries currently held (approximate).
    pub entries: u64,
    /// Weighted size currently held, in bytes (approximate).
    pub bytes: u64,
    /// The configured bound, in bytes.
    pub max_bytes: u64,
}

/// Counters of a remote tier and its guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RemoteTierSnapshot {
    /// Reads answered with a valid, authentic entry.
    pub hits: u64,
    /// Reads that found nothing valid.
    pub misses: u64,
    /// Misses where the entry had expired.
    pub expired: u64,
    /// Misses where the entry predates an invalidation.
    pub stale: u64,
    /// Entries (or epochs) that failed verification: forged, corrupted, truncated, from an
    /// unknown envelope version or another secret. Each one is also an audit event.
    pub rejected: u64,
    /// Reads that failed (error, timeout, or skipped while the breaker was open).
    pub errors: u64,
    /// Background writes done.
    pub writes: u64,
    /// Background writes that failed.
    pub write_errors: u64,
    /// Background writes dropped because the queue was full.
    pub write_drops: u64,
    /// Expired rows removed by the sweeper (L3; Redis expires its keys by itself).
    pub swept: u64,
    /// The circuit breaker's state.
    pub breaker: crate::BreakerState,
    /// Times the breaker opened.
    pub breaker_opens: u64,
    /// Calls that failed with an error.
    pub call_errors: u64,
    /// Calls that timed out.
    pub call_timeouts: u64,
    /// Calls refused at no cost because the breaker was open.
    pub calls_skipped: u64,
    /// A configuration of the store that breaks a guarantee (e.g. a Redis `maxmemory-policy`
    /// that can evict epoch keys); the tier then reports degraded health.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<&'static str>,
    /// Invalidations this process owes the tier (it could not record them yet; paid in the
    /// background). While any is owed to it or to a deeper tier, the tier is not read.
    pub owed: u64,
}

/// Per-tier counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct TiersSnapshot {
    /// The in-process tier.
    pub l1: TierSnapshot,
    /// Redis, when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l2: Option<RemoteTierSnapshot>,
    /// Postgres, when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l3: Option<RemoteTierSnapshot>,
}

/// Invalidations applied, by scope.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct InvalidationsSnapshot {
    /// `Invalidation::Principal`.
    pub principal: u64,
    /// `Invalidation::Resource`.
    pub resource: u64,
    /// `Invalidation::Entry`.
    pub entry: u64,
    /// `Invalidation::All`.
    pub all: u64,
}

/// Latency of [`AuthzCache::check`](crate::AuthzCache::check), by path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct LatenciesSnapshot {
    /// Answered from L1.
    pub l1_hit: LatencySnapshot,
    /// Went past L1 (single flight, authorizer).
    pub miss: LatencySnapshot,
    /// One L2 read (a Redis round trip), when L2 is configured and its breaker let it through.
    pub l2_read: LatencySnapshot,
    /// One L3 read (a Postgres round trip), when L3 is configured and its breaker let it through.
    pub l3_read: LatencySnapshot,
    /// One authorizer call (timeouts included).
    pub authorizer: LatencySnapshot,
}

/// The consistency auditor's counters ([`AuditConfig`](crate::consistency::AuditConfig)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct AuditSnapshot {
    /// Served decisions asked of the authorizer again.
    pub audits: u64,
    /// Samples dropped (the auditor was at its load cap).
    pub dropped: u64,
    /// Audits that disagreed with a decision served from L1 (no invalidation explained it).
    pub mismatches_l1: u64,
    /// The same, for decisions served from L2.
    pub mismatches_l2: u64,
    /// The same, for decisions served from L3 (and deeper tiers).
    pub mismatches_l3: u64,
    /// Entries ended by the auditor (with `invalidate_on_mismatch`).
    pub invalidated: u64,
}

impl AuditSnapshot {
    /// Mismatches from every tier.
    pub fn mismatches(&self) -> u64 {
        self.mismatches_l1 + self.mismatches_l2 + self.mismatches_l3
    }
}

/// A point-in-time copy of the cache's counters. Counters are cumulative.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct StatsSnapshot {
    /// Per-tier counters.
    pub tiers: TiersSnapshot,
    /// Calls made to the authorizer.
    pub authorizer_calls: u64,
    /// Authorizer calls that failed, timed out or panicked.
    pub authorizer_errors: u64,
    /// Requests that waited for another request's authorizer call instead of making their own.
    pub single_flight_joins: u64,
    /// Authorizer answers thrown away because an invalidation happened while they were computed.
    pub invalidation_races: u64,
    /// Checks that could not be decided (the 503s).
    pub undecided: u64,
    /// Requests answered 503 because the principal resolver or the permission mapper panicked
    /// (each one is also an audit event).
    pub plugin_panics: u64,
    /// Principals invalidated by the Postgres change feed (permission-table triggers).
    pub change_feed_invalidations: u64,
    /// Entries loaded into L1 by warming.
    pub warmed: u64,
    /// Invalidations applied, by scope.
    pub invalidations: InvalidationsSnapshot,
    /// Consistency tokens that checks required, accepted (this process raised to them).
    pub tokens_applied: u64,
    /// Consistency tokens refused (unauthentic or from the future; each an audit event).
    pub tokens_refused: u64,
    /// Decisions answered past their ttl, within grace, because the authorizer failed (each an
    /// audit event).
    pub grace_answers: u64,
    /// The consistency auditor's counters (all 0 when it is off).
    pub audit: AuditSnapshot,
    /// Decisions recomputed ahead of their ttl (refresh-ahead), kept.
    pub refreshes: u64,
    /// Refresh-ahead answers thrown away (an invalidation raced them, or the authorizer failed).
    pub refreshes_discarded: u64,
    /// Latency by path.
    pub latency: LatenciesSnapshot,
    /// The invalidation backplane, when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backplane: Option<crate::BackplaneSnapshot>,
    /// The durable change feed of the permission tables, with L3.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub change_feed: Option<ChangeFeedSnapshot>,
}

/// The durable change feed (with L3): changes to the permission tables are recorded in Postgres
/// by the changing transaction and applied to the shared epochs by whichever instance drains
/// them first. While it is not `caught_up`, L1 and L2 are not read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ChangeFeedSnapshot {
    /// This instance saw the feed caught up (nothing waiting) within `max_staleness`.
    pub caught_up: bool,
    /// Milliseconds since the last poll that found nothing waiting started.
    pub behind_ms: u64,
    /// Changes this instance applied.
    pub applied: u64,
    /// Drain transactions this instance committed.
    pub drains: u64,
    /// Redis mirror debts (of any instance) this instance paid.
    pub mirrored: u64,
    /// Times L1 and L2 were distrusted because the feed could not be confirmed in time.
    pub distrusts: u64,
    /// Catch-up rounds that failed (Postgres or Redis unreachable).
    pub failures: u64,
}

impl StatsSnapshot {
    /// Renders the snapshot in the Prometheus text exposition format (version 0.0.4). The
    /// families are listed in the crate's metrics table; the `metrics` feature exports the same
    /// families through the `metrics` facade.
    pub fn to_prometheus(&self) -> String {
        crate::exposition::render(self)
    }
}

/// The live counters behind [`StatsSnapshot`].
pub(crate) struct Stats {
    pub(crate) l1_hits: AtomicU64,
    pub(crate) l1_misses: AtomicU64,
    pub(crate) l1_expired: AtomicU64,
    pub(crate) l1_stale: AtomicU64,
    pub(crate) l1_untrusted: AtomicU64,
    pub(crate) l2: std::sync::Arc<RemoteCounters>,
    pub(crate) l3: std::sync::Arc<RemoteCounters>,
    pub(crate) authorizer_calls: AtomicU64,
    pub(crate) authorizer_errors: AtomicU64,
    /// Authorizer failures since its last success.
    pub(crate) authorizer_failing: AtomicU64,
    pub(crate) single_flight_joins: AtomicU64,
    pub(crate) invalidation_races: AtomicU64,
    pub(crate) undecided: AtomicU64,
    pub(crate) plugin_panics: AtomicU64,
    pub(crate) change_feed: AtomicU64,
    pub(crate) warmed: AtomicU64,
    pub(crate) inv_principal: AtomicU64,
    pub(crate) inv_resource: AtomicU64,
    pub(crate) inv_entry: AtomicU64,
    pub(crate) inv_all: AtomicU64,
    pub(crate) tokens_applied: AtomicU64,
    pub(crate) tokens_refused: AtomicU64,
    pub(crate) grace_answers: AtomicU64,
    pub(crate) audits: AtomicU64,
    pub(crate) audits_dropped: AtomicU64,
    pub(crate) audit_mismatches_l1: AtomicU64,
    pub(crate) audit_mismatches_l2: AtomicU64,
    pub(crate) audit_mismatches_l3: AtomicU64,
    pub(crate) audit_invalidations: AtomicU64,
    pub(crate) refreshes: AtomicU64,
    pub(crate) refreshes_discarded: AtomicU64,
    pub(crate) l1_hit_latency: Histogram,
    pub(crate) miss_latency: Histogram,
    pub(crate) authorizer_latency: Histogram,
}

impl Stats {
    pub(crate) fn new() -> Self {
        Self {
            l1_hits: AtomicU64::new(0),
            l1_misses: AtomicU64::new(0),
            l1_expired: AtomicU64::new(0),
            l1_stale: AtomicU64::new(0),
            l1_untrusted: AtomicU64::new(0),
            l2: std::sync::Arc::default(),
            l3: std::sync::Arc::default(),
            authorizer_calls: AtomicU64::new(0),
            authorizer_errors: AtomicU64::new(0),
            authorizer_failing: AtomicU64::new(0),
            single_flight_joins: AtomicU64::new(0),
            invalidation_races: AtomicU64::new(0),
            undecided: AtomicU64::new(0),
            plugin_panics: AtomicU64::new(0),
            change_feed: AtomicU64::new(0),
            warmed: AtomicU64::new(0),
            inv_principal: AtomicU64::new(0),
            inv_resource: AtomicU64::new(0),
            inv_entry: AtomicU64::new(0),
            inv_all: AtomicU64::new(0),
            tokens_applied: AtomicU64::new(0),
            tokens_refused: AtomicU64::new(0),
            grace_answers: AtomicU64::new(0),
            audits: AtomicU64::new(0),
            audits_dropped: AtomicU64::new(0),
            audit_mismatches_l1: AtomicU64::new(0),
            audit_mismatches_l2: AtomicU64::new(0),
            audit_mismatches_l3: AtomicU64::new(0),
            audit_invalidations: AtomicU64::new(0),
            refreshes: AtomicU64::new(0),
            refreshes_discarded: AtomicU64::new(0),
            l1_hit_latency: Histogram::new(),
            miss_latency: Histogram::new(),
            authorizer_latency: Histogram::new(),
        }
    }

    pub(crate) fn incr(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    pub(crate) fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Relaxed);
    }

    pub(crate) fn authorizer_failed(&self) {
        self.authorizer_errors.fetch_add(1, Relaxed);
        self.authorizer_failing.fetch_add(1, Relaxed);
    }

    pub(crate) fn authorizer_succeeded(&self) {
        if self.authorizer_failing.load(Relaxed) != 0 {
            self.authorizer_failing.store(0, Relaxed);
        }
    }

    pub(crate) fn authorizer_failing(&self) -> u64 {
        self.authorizer_failing.load(Relaxed)
    }

    pub(crate) fn snapshot(&self, l1: (u64, u64, u64)) -> StatsSnapshot {
        let (entries, bytes, max_bytes) = l1;
        StatsSnapshot {
            tiers: TiersSnapshot {
                l1: TierSnapshot {
                    hits: self.l1_hits.load(Relaxed),
                    misses: self.l1_misses.load(Relaxed),
                    expired: self.l1_expired.load(Relaxed),
                    stale: self.l1_stale.load(Relaxed),
                    untrusted: self.l1_untrusted.load(Relaxed),
                    entries,
                    bytes,
                    max_bytes,
                },
                l2: None,
                l3: None,
            },
            authorizer_calls: self.authorizer_calls.load(Relaxed),
            authorizer_errors: self.authorizer_errors.load(Relaxed),
            single_flight_joins: self.single_flight_joins.load(Relaxed),
            invalidation_races: self.invalidation_races.load(Relaxed),
            undecided: self.undecided.load(Relaxed),
            plugin_panics: self.plugin_panics.load(Relaxed),
            change_feed_invalidations: self.change_feed.load(Relaxed),
            warmed: self.warmed.load(Relaxed),
            invalidations: InvalidationsSnapshot {
                principal: self.inv_principal.load(Relaxed),
                resource: self.inv_resource.load(Relaxed),
                entry: self.inv_entry.load(Relaxed),
                all: self.inv_all.load(Relaxed),
            },
            tokens_applied: self.tokens_applied.load(Relaxed),
            tokens_refused: self.tokens_refused.load(Relaxed),
            grace_answers: self.grace_answers.load(Relaxed),
            audit: AuditSnapshot {
                audits: self.audits.load(Relaxed),
                dropped: self.audits_dropped.load(Relaxed),
                mismatches_l1: self.audit_mismatches_l1.load(Relaxed),
                mismatches_l2: self.audit_mismatches_l2.load(Relaxed),
                mismatches_l3: self.audit_mismatches_l3.load(Relaxed),
                invalidated: self.audit_invalidations.load(Relaxed),
            },
            refreshes: self.refreshes.load(Relaxed),
            refreshes_discarded: self.refreshes_discarded.load(Relaxed),
            latency: LatenciesSnapshot {
                l1_hit: self.l1_hit_latency.snapshot(),
                miss: self.miss_latency.snapshot(),
                l2_read: self.l2.read_latency.snapshot(),
                l3_read: self.l3.read_latency.snapshot(),
                authorizer: self.authorizer_latency.snapshot(),
            },
            backplane: None,
            change_feed: None,
        }
    }
}

/// The live counters of one remote tier.
#[derive(Default)]
pub(crate) struct RemoteCounters {
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) expired: AtomicU64,
    pub(crate) stale: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) writes: AtomicU64,
    pub(crate) write_errors: AtomicU64,
    pub(crate) write_drops: AtomicU64,
    pub(crate) swept: AtomicU64,
    pub(crate) read_latency: Histogram,
}

impl RemoteCounters {
    pub(crate) fn snapshot(&self, guard: &crate::tier::guard::Guard) -> RemoteTierSnapshot {
        let (opens, errors, timeouts, skipped) = guard.counters();
        RemoteTierSnapshot {
            hits: self.hits.load(Relaxed),
            misses: self.misses.load(Relaxed),
            expired: self.expired.load(Relaxed),
            stale: self.stale.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
            errors: self.errors.load(Relaxed),
            writes: self.writes.load(Relaxed),
            write_errors: self.write_errors.load(Relaxed),
            write_drops: self.write_drops.load(Relaxed),
            swept: self.swept.load(Relaxed),
            breaker: guard.state(),
            breaker_opens: opens,
            call_errors: errors,
            call_timeouts: timeouts,
            calls_skipped: skipped,
            warning: None,
            owed: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_bound_every_value_within_one_sixteenth() {
        for v in (0..5000u64).chain([65_535, 1 << 20, 123_456_789, u64::MAX / 3]) {
            let i = Histogram::index(v);
            let upper = Histogram::upper(i);
            assert!(upper >= v, "{v} -> {i} -> {upper}");
            assert!((upper - v) as f64 <= v as f64 / 16.0 + 1.0, "{v} -> {upper}");
            assert!(i < BUCKETS);
        }
    }

    #[test]
    fn percentiles_follow_the_samples() {
        let h = Histogram::new();
        for us in 1..=100u64 {
            h.record(Duration::from_micros(us));
        }
        let s = h.snapshot();
        assert_eq!(s.count, 100);
        assert!((50.0..=53.2).contains(&s.p50_us), "{s:?}");
        assert!((99.0..=100.0).contains(&s.p99_us), "{s:?}");
        assert_eq!(s.max_us, 100.0);
    }
}
