//! Health: [`Health`], from [`AuthzCache::health`](crate::AuthzCache::health), for liveness and
//! readiness probes.
//!
//! - L1 is always up.
//! - A remote tier is up with its breaker closed, degraded while half-open, down while open.
//! - The backplane is up when subscribed and heard, degraded when subscribed but silent (L1 is
//!   not trusted), down when not subscribed.
//! - The authorizer is down after [`AUTHORIZER_DOWN_AFTER`] consecutive failures and up again
//!   at its first success.
//!
//! Overall: down when the authorizer is down (the cache can then decide nothing it has not
//! cached: a readiness probe should fail), degraded when any other part is not up, else up.
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

use crate::{BreakerState, StatsSnapshot};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PartHealth {
    /// Its status.
    pub status: HealthStatus,
    /// Its circuit breaker, for remote tiers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breaker: Option<BreakerState>,
}

/// Per-part health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct TiersHealth {
    /// L1.
    pub l1: PartHealth,
    /// L2, when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l2: Option<PartHealth>,
}

/// The health of the cache and its parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Health {
    /// Overall.
    pub status: HealthStatus,
    /// The tiers.
    pub tiers: TiersHealth,
    /// The invalidation backplane, when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backplane: Option<PartHealth>,
    /// The authorizer.
    pub authorizer: PartHealth,
    /// Authorizer failures since its last success.
    pub authorizer_consecutive_failures: u64,
}

impl Health {
    /// Whether a readiness probe should pass: the cache can decide.
    pub fn is_ready(&self) -> bool {
        self.status != HealthStatus::Down
    }

    pub(crate) fn assess(stats: &StatsSnapshot, authorizer_failing: u64) -> Self {
        let part = |status| PartHealth { status, breaker: None };
        let l2 = stats.tiers.l2.map(|t| PartHealth {
            status: match t.breaker {
                BreakerState::Closed => HealthStatus::Up,
                BreakerState::HalfOpen => HealthStatus::Degraded,
                _ => HealthStatus::Down,
            },
            breaker: Some(t.breaker),
        });
        #[cfg(any(feature = "redis", feature = "postgres"))]
        let backplane = stats.backplane.map(|b| {
            part(match (b.connected, b.l1_trusted) {
                (true, true) => HealthStatus::Up,
                (true, false) => HealthStatus::Degraded,
                (false, _) => HealthStatus::Down,
            })
        });
        #[cfg(not(any(feature = "redis", feature = "postgres")))]
        let backplane = None;
        let authorizer =
            part(if authorizer_failing >= AUTHORIZER_DOWN_AFTER { HealthStatus::Down } else { HealthStatus::Up });
        let others = l2.iter().chain(backplane.iter()).map(|p| p.status).max().unwrap_or(HealthStatus::Up);
        let status = if authorizer.status == HealthStatus::Down {
            HealthStatus::Down
        } else if others != HealthStatus::Up {
            HealthStatus::Degraded
        } else {
            HealthStatus::Up
        };
        Health {
            status,
            tiers: TiersHealth { l1: part(HealthStatus::Up), l2 },
            backplane,
            authorizer,
            authorizer_consecutive_failures: authorizer_failing,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use crate::{AuthzCache, BoxError, Decision, HealthStatus, Permission, Principal};

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
