//! Cache tiers. L1 lives in-process (`memory.rs`: mini-moka with a per-thread front); the shared
//! tiers behind it plug in through one public trait, [`SharedTier`], which the built-in Redis
//! (`redis.rs`) and Postgres (`postgres.rs`) tiers implement like any user's tier would.
//!
//! Where things are handled, whatever the tier:
//! - timeouts, the circuit breaker, latency and error counts: `guard.rs` and `guarded.rs`;
//! - connection health of the built-in pools: `pool.rs`;
//! - write-behind, owed bumps, the change feed, the backplane: the cache core (`cache/`,
//!   `invalidation/backplane.rs`), once for every tier.
//!
//! The trait and its types are re-exported here; see [`SharedTier`] for a complete example.

pub(crate) mod guard;
pub(crate) mod guarded;
pub(crate) mod local;
pub(crate) mod memory;
pub(crate) mod names;
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) mod pool;
#[cfg(feature = "postgres")]
pub(crate) mod postgres;
#[cfg(feature = "redis")]
pub(crate) mod redis;
pub(crate) mod shared;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use guard::BreakerState;
pub use local::{LocalEntry, LocalKey, LocalTier, LocalUsage};
pub use shared::{
    Backlog, ChangeFeed, Drained, EpochTarget, KeyId, Notice, NoticeFuture, ScopeHashes, SharedTier, Subscription,
    TierError, TierFuture, TierRead, TierSettings, TierWrite, Transport, WarmSource,
};
