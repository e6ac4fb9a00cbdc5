//! Cache tiers. L1 lives in-process ([`LocalTier`]; the default is mini-moka with a per-thread
//! front, `memory.rs`); the shared tiers behind it plug in through one public trait,
//! [`SharedTier`], which the built-in Redis (`redis/`) and Postgres (`postgres/`) tiers
//! implement like any user's tier would.
//!
//! Where things are handled, whatever the tier:
//! - timeouts, the circuit breaker, latency and error counts: `guard.rs` and `guarded.rs`;
//! - connection health of the built-in pools: `pool.rs`;
//! - write-behind, owed bumps, the change feed, the backplane: the cache core (`cache/`,
//!   `invalidation/backplane.rs`), once for every tier.
//!
//! A shared tier stores two things for the cache, and understands neither:
//! - **entries**: opaque bytes under a 32-byte key id. The cache derives the key id with a keyed
//!   hash of (principal, resource, action), seals and authenticates the bytes itself, and checks
//!   every entry it reads (MAC, deadline, epochs), so a tier never sees a principal and a tier
//!   that returns garbage, or someone else's bytes, costs a miss, never a wrong answer;
//! - **epochs**: counters under a scope ([`EpochTarget`]: global, or a keyed hash of a principal,
//!   a resource or an entry). An invalidation bumps one; every entry stamped with an older value
//!   is dead. A read returns an entry *together with* the four epochs that cover it, in one
//!   round trip, so a hit is always checked against the tier's own epochs.
//!
//! The cache puts every call behind one guard (`tier/guard.rs`: timeout, circuit breaker,
//! latency and error counts), one write-behind queue per tier, and one ledger of bumps owed to
//! a tier that could not be reached; an implementation only talks to its store. Of the tiers a
//! cache has, the deepest is the **authority**: it assigns epoch values ([`bump`]); the
//! shallower ones mirror them ([`raise`]). Optional capabilities:
//! - [`Transport`]: the backplane (invalidations published by the store reach every instance
//!   at once; heartbeats tell an instance it still hears them);
//! - [`ChangeFeed`]: a durable record of changes made to the source of truth, which the cache
//!   applies to the epochs (Postgres's `authz_cache_changes`);
//! - [`WarmSource`]: the most-hit rows, for warming L1;
//! - [`maintain`](SharedTier::maintain) (sweeps, hit counters) and a health
//!   [`warning`](SharedTier::warning).
//!
//! The crate's own tiers (`RedisTier`, `PostgresTier`, the in-process `testing::MemoryShared`)
//! implement this trait with no privileged path; `examples/custom_tier.rs` implements it on
//! a directory of files shared by processes on one machine.
//!
//! [`bump`]: SharedTier::bump
//! [`raise`]: SharedTier::raise
//!
//! ```
//! use std::collections::HashMap;
//! use std::sync::Mutex;
//! use std::time::Duration;
//! use tower_authz_cache::tier::{EpochTarget, KeyId, ScopeHashes, SharedTier, TierFuture, TierRead, TierWrite};
//!
//! /// A tier in a HashMap: entries and epochs in one process (no expiry, no transport).
//! #[derive(Default)]
//! struct MapTier {
//!     entries: Mutex<HashMap<KeyId, Vec<u8>>>,
//!     epochs: Mutex<HashMap<(&'static str, u64), u64>>,
//! }
//!
//! impl MapTier {
//!     fn epoch(&self, tag: &'static str, hash: u64) -> u64 {
//!         *self.epochs.lock().unwrap().get(&(tag, hash)).unwrap_or(&0)
//!     }
//! }
//!
//! impl SharedTier for MapTier {
//!     fn read<'a>(&'a self, key_id: &'a KeyId, scopes: &'a ScopeHashes, _max_age: Duration) -> TierFuture<'a, TierRead> {
//!         Box::pin(async move {
//!             let value = self.entries.lock().unwrap().get(key_id).cloned();
//!             let epochs = [
//!                 self.epoch("g", 0),
//!                 self.epoch("p", scopes.principal),
//!                 self.epoch("r", scopes.resource),
//!                 self.epoch("k", scopes.entry),
//!             ];
//!             Ok(TierRead::new(value, Some(epochs)))
//!         })
//!     }
//!     fn write<'a>(&'a self, batch: &'a [TierWrite]) -> TierFuture<'a, ()> {
//!         Box::pin(async move {
//!             let mut entries = self.entries.lock().unwrap();
//!             for w in batch {
//!                 entries.insert(*w.key_id(), w.value().to_vec());
//!             }
//!             Ok(())
//!         })
//!     }
//!     fn bump(&self, target: EpochTarget, floor: u64, _retention: Duration) -> TierFuture<'_, u64> {
//!         Box::pin(async move {
//!             let mut epochs = self.epochs.lock().unwrap();
//!             let slot = epochs.entry((target.tag(), target.hash())).or_insert(0);
//!             *slot = (*slot + 1).max(floor);
//!             Ok(*slot)
//!         })
//!     }
//!     fn raise(&self, target: EpochTarget, value: u64, _retention: Duration) -> TierFuture<'_, ()> {
//!         Box::pin(async move {
//!             let mut epochs = self.epochs.lock().unwrap();
//!             let slot = epochs.entry((target.tag(), target.hash())).or_insert(0);
//!             *slot = (*slot).max(value);
//!             Ok(())
//!         })
//!     }
//! }
//!
//! let cache = tower_authz_cache::AuthzCache::builder(|_: tower_authz_cache::Principal, _: tower_authz_cache::Permission| async {
//!     Ok::<_, std::convert::Infallible>(tower_authz_cache::Decision::allow())
//! })
//! .secret("0123456789abcdef0123456789abcdef")
//! .tier(MapTier::default());
//! # drop(cache);
//! ```

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
    Teammates, TierError, TierFuture, TierRead, TierSettings, TierWrite, Transport, WarmSource,
};
