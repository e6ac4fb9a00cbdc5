//! Health: [`Health`], from [`AuthzCache::health`](crate::AuthzCache::health), for liveness and
//! readiness probes.
//!
//! - L1 is always up.
//! - A remote tier (L2 on Redis, L3 on Postgres) is up with its breaker closed, degraded while
//!   half-open, down while open.
//! - The backplane is up when subscribed and heard, degraded when subscribed but silent (L1 is
//!   not trusted), down when not subscribed.
//! - With L2, Redis is also degraded while its `maxmemory-policy` can evict epoch keys (or cannot
//!   be read): `reason` says so. On a Redis Cluster, `nodes` lists every node (role, slots,
//!   whether it answered, its latency), and the tier is degraded while a slot has no master, a
//!   node does not answer, or a master has fewer replicas than invalidations wait for.
//! - The change feed (with L3) is up while it is known to be caught up, degraded while not.
//! - The authorizer is down after [`AUTHORIZER_DOWN_AFTER`] consecutive failures and up again
//!   at its first success.
//!
//! Overall: down when the authorizer is down (the cache can then decide nothing it has not
//! cached: a readiness probe should fail), degraded when any other part is not up (a remote tier
//! down only makes the cache slower or less cached), else up.
//!
//! ```
//! use tower_authz_cache::{AuthzCache, Decision, HealthStatus, Permission, Principal};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let cache = AuthzCache::builder(|_: Principal, _: Permission| async {
//!     Ok::<_, std::convert::Infallible>(Decision::allow())
//! })
//! .build();
//! let health = cache.health();
//! assert_eq!(health.status, HealthStatus::Up);
//! assert!(health.is_ready());
//! let json = serde_json::to_value(&health).unwrap();
//! assert_eq!(json["status"], "up");
//! # });
//! ```

use serde::Serialize;

use crate::{BreakerState, RemoteTierSnapshot, StatsSnapshot};

/// Consecutive authorizer failures after which it counts as down.
pub const AUTHORIZER_DOWN_AFTER: u64 = 5;

/// Up, degraded or down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum HealthStatus {
    /// Working.
    Up,
    /// Working with less than all of its parts (slower, or less cached).
    Degraded,
    /// Not working.
    Down,
}

/// The health of one part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PartHealth {
    /// Its status.
    pub status: HealthStatus,
    /// Its circuit breaker, for remote tiers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breaker: Option<BreakerState>,
    /// Why it is not up, when a reason is known beyond the status (e.g. a Redis whose
    /// `maxmemory-policy` can evict epoch keys).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// A clustered store's nodes (Redis Cluster), as the tier's last check found them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeHealth>,
}

/// One node of a clustered store, as the tier's last check (every 2 s) found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct NodeHealth {
    /// `host:port`.
    pub address: String,
    /// The store's id for it.
    pub id: String,
    /// Whether it is a master (else a replica).
    pub master: bool,
    /// The hash slots it serves (masters).
    pub slots: u32,
    /// Up when it answered the check, down when not.
    pub status: HealthStatus,
    /// The check's round trip, when it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<u64>,
}

/// Per-part health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct TiersHealth {
    /// L1.
    pub l1: PartHealth,
    /// L2, when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l2: Option<PartHealth>,
    /// L3, when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l3: Option<PartHealth>,
}

/// The health of the cache and its parts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Health {
    /// Overall.
    pub status: HealthStatus,
    /// The tiers.
    pub tiers: TiersHealth,
    /// The invalidation backplane, when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backplane: Option<PartHealth>,
    /// The durable change feed, with L3: up while it is known to be caught up, degraded while
    /// it is not (L1 and L2 are then not read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub change_feed: Option<PartHealth>,
    /// The authorizer.
    pub authorizer: PartHealth,
    /// Authorizer failures since its last success.
    pub authorizer_consecutive_failures: u64,
    /// Decisions answered past their ttl within grace because the authorizer failed (0 without
    /// [`grace`](crate::AuthzCacheBuilder::grace)).
    pub grace_answers: u64,
}

impl Health {
    /// Whether a readiness probe should pass: the cache can decide.
    pub fn is_ready(&self) -> bool {
        self.status != HealthStatus::Down
    }

    pub(crate) fn assess(stats: &StatsSnapshot, authorizer_failing: u64) -> Self {
        let part = |status| PartHealth { status, breaker: None, reason: None, nodes: Vec::new() };
        let remote = |t: RemoteTierSnapshot| PartHealth {
            status: match (t.breaker, t.warning) {
                (BreakerState::Closed, None) => HealthStatus::Up,
                (BreakerState::Closed | BreakerState::HalfOpen, _) => HealthStatus::Degraded,
                _ => HealthStatus::Down,
            },
            breaker: Some(t.breaker),
            reason: t.warning,
            nodes: Vec::new(),
        };
        let (l2, l3) = (stats.tiers.l2.map(remote), stats.tiers.l3.map(remote));
        let backplane = stats.backplane.map(|b| {
            part(match (b.connected, b.l1_trusted) {
                (true, true) => HealthStatus::Up,
                (true, false) => HealthStatus::Degraded,
                (false, _) => HealthStatus::Down,
            })
        });
        let change_feed = stats.change_feed.map(|f| PartHealth {
            status: if f.caught_up { HealthStatus::Up } else { HealthStatus::Degraded },
            breaker: None,
            reason: (!f.caught_up).then_some("change feed not confirmed within max_staleness: L1 and L2 not read"),
            nodes: Vec::new(),
        });
        let mut authorizer =
            part(if authorizer_failing >= AUTHORIZER_DOWN_AFTER { HealthStatus::Down } else { HealthStatus::Up });
        if authorizer.status == HealthStatus::Down && stats.grace_answers > 0 {
            authorizer.reason = Some("authorizer down: expired decisions answered within grace");
        }
        let others = l2
            .iter()
            .chain(l3.iter())
            .chain(backplane.iter())
            .chain(change_feed.iter())
            .map(|p| p.status)
            .max()
            .unwrap_or(HealthStatus::Up);
        let status = if authorizer.status == HealthStatus::Down {
            HealthStatus::Down
        } else if others != HealthStatus::Up {
            HealthStatus::Degraded
        } else {
            HealthStatus::Up
        };
        Health {
            status,
            tiers: TiersHealth { l1: part(HealthStatus::Up), l2, l3 },
            backplane,
            change_feed,
            authorizer,
            authorizer_consecutive_failures: authorizer_failing,
            grace_answers: stats.grace_answers,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::Health;
    use crate::{
        AuthzCache, BoxError, BreakerState, Decision, HealthStatus, Permission, Principal, RemoteTierSnapshot,
        StatsSnapshot,
    };

    fn remote(breaker: BreakerState) -> RemoteTierSnapshot {
        RemoteTierSnapshot {
            hits: 0,
            misses: 0,
            expired: 0,
            stale: 0,
            rejected: 0,
            errors: 0,
            writes: 0,
            write_errors: 0,
            write_drops: 0,
            swept: 0,
            breaker,
            breaker_opens: 0,
            call_errors: 0,
            call_timeouts: 0,
            calls_skipped: 0,
            warning: None,
            owed: 0,
        }
    }

    /// A snapshot with L2 and L3, their breakers as given.
    fn tiers(l2: BreakerState, l3: BreakerState) -> StatsSnapshot {
        let mut stats = StatsSnapshot::default();
        stats.tiers.l2 = Some(remote(l2));
        stats.tiers.l3 = Some(remote(l3));
        stats
    }

    #[test]
    fn l3_follows_its_breaker_and_counts_in_the_overall_status_like_l2() {
        use BreakerState::{Closed, HalfOpen, Open};
        for (l3, part) in [(Closed, HealthStatus::Up), (HalfOpen, HealthStatus::Degraded), (Open, HealthStatus::Down)] {
            let health = Health::assess(&tiers(Closed, l3), 0);
            let l3_health = health.tiers.l3.clone().expect("l3 is configured");
            assert_eq!((l3_health.status, l3_health.breaker), (part, Some(l3)));
            assert_eq!(health.tiers.l2.as_ref().unwrap().status, HealthStatus::Up);
            let overall = if part == HealthStatus::Up { HealthStatus::Up } else { HealthStatus::Degraded };
            assert_eq!(health.status, overall, "l3 {l3}");
            assert!(health.is_ready(), "a remote tier down still leaves the cache able to decide");
            // The same state on L2 instead gives the same overall status.
            assert_eq!(Health::assess(&tiers(l3, Closed), 0).status, overall, "l2 {l3}");
        }
        // The authorizer being down wins over everything.
        assert_eq!(Health::assess(&tiers(Closed, Closed), super::AUTHORIZER_DOWN_AFTER).status, HealthStatus::Down);
        // Without L3, no l3 part.
        assert_eq!(Health::assess(&StatsSnapshot::default(), 0).tiers.l3, None);
    }

    #[test]
    fn health_json_with_l3() {
        insta::assert_json_snapshot!(Health::assess(&tiers(BreakerState::Closed, BreakerState::Open), 2));
    }

    #[tokio::test]
    async fn the_authorizer_is_down_after_five_consecutive_failures_and_up_at_its_first_success() {
        let failing = Arc::new(AtomicBool::new(true));
        let f = failing.clone();
        let cache = AuthzCache::builder(move |_: Principal, _: Permission| {
            let fail = f.load(Ordering::SeqCst);
            async move { if fail { Err::<Decision, BoxError>("down".into()) } else { Ok(Decision::allow()) } }
        })
        .build();
        let perm = Permission::new("documents:1", "read");
        for i in 0..4 {
            let _ = cache.check(&Principal::new(format!("u{i}")), &perm).await;
            assert_eq!(cache.health().status, HealthStatus::Up, "{i} failures");
        }
        let _ = cache.check(&Principal::new("u4"), &perm).await;
        let health = cache.health();
        assert_eq!(health.status, HealthStatus::Down);
        assert!(!health.is_ready());
        failing.store(false, Ordering::SeqCst);
        cache.check(&Principal::new("u5"), &perm).await.unwrap();
        assert!(cache.health().is_ready());
        assert_eq!(cache.health().authorizer_consecutive_failures, 0);
    }
}
