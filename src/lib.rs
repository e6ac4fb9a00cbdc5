//! Authorization checks that cost microseconds: a tower middleware in front of a tiered,
//! revocable decision cache.
//!
//! [`CachedAuthorizationLayer`] resolves who is calling ([`ResolvePrincipal`]), maps the request
//! to what it needs ([`MapPermission`], e.g. a [`RouteTable`]), and asks an [`AuthzCache`] for
//! the decision. The cache answers from memory (L1, bounded in bytes) when it can, and asks your
//! [`Authorizer`] (the source of truth) when it must: once per key however many requests wait.
//! [`Invalidation`]s take effect at once, including against answers still being computed.
//!
//! Guarantees:
//! - **Fail closed**: only the authorizer produces an allow. When no decision can be obtained the
//!   request gets 503, never a guess.
//! - **Deadlines never grow**: a decision is cached for `min(ttl, authorizer hint)` from when the
//!   authorizer answered. The one exception is opt-in and named: with a grace period
//!   (`AuthzCacheBuilder::grace`), an expired L1 entry may answer while the authorizer fails, but
//!   never one an invalidation ended.
//! - **No fill after invalidate**: a decision whose computation started before an invalidation
//!   that covers it is never served after that invalidation.
//! - **Bounded memory**: L1 is bounded in bytes; epoch bookkeeping is bounded.
//!
//! ```
//! use axum::{Router, routing::get};
//! use http::Method;
//! use tower_authz_cache::{
//!     AuthzCache, BearerToken, CachedAuthorizationLayer, Decision, Permission, Principal, RouteTable,
//! };
//!
//! // The source of truth.
//! let authorizer = |principal: Principal, permission: Permission| async move {
//!     let allowed = principal.id() == "alice" || permission.action() == "read";
//!     Ok::<_, std::convert::Infallible>(Decision::from_bool(allowed))
//! };
//! // Who is calling.
//! let tokens = BearerToken::new(|token: String| async move {
//!     let user = match token.as_str() { "alice-token" => Some("alice"), "bob-token" => Some("bob"), _ => None };
//!     Ok::<_, std::convert::Infallible>(user.map(Principal::new))
//! });
//! // What each route needs; anything else is denied.
//! let routes = RouteTable::new()
//!     .public("/health")
//!     .route(Method::GET, "/documents/{id}", "documents:{id}", "read")
//!     .route(Method::DELETE, "/documents/{id}", "documents:{id}", "delete");
//!
//! let cache = AuthzCache::builder(authorizer).build();
//! let app: Router = Router::new()
//!     .route("/health", get(|| async { "ok" }))
//!     .route("/documents/{id}", get(|| async { "doc" }).delete(|| async { "deleted" }))
//!     .layer(CachedAuthorizationLayer::new(cache.clone(), tokens, routes));
//! # let _ = app;
//! ```
//!
//! With shared tiers (Redis, Postgres), invalidations reach every instance within
//! `max_staleness` whatever fails: changes to the permission tables are recorded durably and
//! caught up on (the NOTIFY only speeds delivery), epochs only rise whatever the clocks, and a
//! future dropped at any await leaves nothing half-done. The README's "Security model" states
//! every guarantee and what it costs.
//!
//! Beyond one check: [`AuthzCache::check_many`] decides a list of permissions with one round
//! trip per tier and one authorizer call; an invalidation answers with a
//! [`ConsistencyToken`] that makes any instance's next check at least as fresh
//! ([`consistency`]); a [`Decision`] says where it came from and how old it is.
//!
//! # Layout
//!
//! The headline types are at the crate root ([`AuthzCache`], [`CachedAuthorizationLayer`],
//! [`Principal`], [`Permission`], [`Decision`], [`Authorizer`], [`Invalidation`],
//! [`CacheConfig`], ...). Each area is also a public module with its own docs and example:
//! [`tier`] (the `SharedTier` and `LocalTier` traits, the in-process test tier),
//! [`invalidation`], [`consistency`], [`stats`], [`health`], [`monitor`], [`config`].
//!
//! # Features
//!
//! - `redis` (default): L2 on Redis (`RedisTier`) and the Redis invalidation backplane.
//! - `postgres` (default): L3 on Postgres (`PostgresTier`), its migrations, the durable change
//!   feed and the LISTEN/NOTIFY backplane, warming, and `PostgresRbacAuthorizer`.
//!
//! Tiers are pluggable: any [`tier::SharedTier`] can be L2 or L3 (the built-in ones implement
//! it like any other), and any [`tier::LocalTier`] can be L1.
//! - `axum`: [`Principal`] is an axum extractor.
//! - `metrics`: `AuthzCache::export_metrics` publishes the metric families through the
//!   `metrics` facade.
//! - `cli`: the `authz-cache` binary (`init`, `health`, `stats`, `invalidate`, `warm`).
//! - `full`: all of the above.
//! - `testing`: `tier::testing::MemoryShared`, an in-process shared tier with fault switches, for
//!   tests that need shared tiers without servers.
//! - `internals`: hidden, unstable hooks for the crate's own benches, fuzz targets and tests; no
//!   semver, not for applications.

#![deny(unreachable_pub, missing_docs)]
#![warn(missing_debug_implementations, rust_2018_idioms)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod authorized;
mod cache;
pub mod config;
pub mod consistency;
mod core;
mod exposition;
mod future;
pub mod health;
pub mod invalidation;
mod layer;
pub mod monitor;
#[cfg(feature = "postgres")]
mod rbac;
mod response;
mod service;
pub mod stats;
pub mod tier;

#[cfg(feature = "axum")]
mod extract;

#[cfg(feature = "internals")]
#[doc(hidden)]
#[path = "internals.rs"]
pub mod __internals;

pub use crate::authorized::Authorized;
pub use crate::cache::warm::WarmReport;
pub use crate::cache::{AuthzCache, AuthzCacheBuilder, BuildError, CheckError, CheckErrorKind, REFRESH_CONCURRENCY};
pub use crate::config::{CacheConfig, ConfigError, Mode, Secret};
pub use crate::consistency::{ConsistencyToken, TokenError};
pub use crate::core::authorizer::Authorizer;
pub use crate::core::decision::{Decision, DecisionSource};
pub use crate::core::permission::{Access, MapPermission, Permission, RouteTable};
pub use crate::core::principal::{
    BearerFuture, BearerToken, Principal, ResolveError, ResolveErrorKind, ResolvePrincipal, TrustedHeader,
};
pub use crate::future::ResponseFuture;
pub use crate::health::{AUTHORIZER_DOWN_AFTER, Health, HealthStatus, NodeHealth, PartHealth, TiersHealth};
pub use crate::invalidation::backplane::BackplaneSnapshot;
pub use crate::invalidation::{Invalidation, InvalidationError, InvalidationFuture, InvalidationService};
pub use crate::layer::CachedAuthorizationLayer;
pub use crate::monitor::{Alert, AlertKind, Monitor, MonitorBuilder, MonitorHandle, Report, TierWindow, Trend};
#[cfg(feature = "postgres")]
pub use crate::rbac::PostgresRbacAuthorizer;
pub use crate::response::{Rejection, RejectionKind};
pub use crate::service::CachedAuthorization;
pub use crate::stats::{
    AuditSnapshot, ChangeFeedSnapshot, InvalidationsSnapshot, LatenciesSnapshot, LatencySnapshot, RemoteTierSnapshot,
    StatsSnapshot, TierSnapshot, TiersSnapshot,
};
pub use crate::tier::BreakerState;
#[cfg(feature = "postgres")]
pub use crate::tier::postgres::{PostgresTier, PostgresTierBuilder, PostgresTierError};
#[cfg(feature = "redis")]
pub use crate::tier::redis::cluster::{ClusterReport, RedisClusterTier, RedisClusterTierBuilder};
#[cfg(feature = "redis")]
pub use crate::tier::redis::{RedisTier, RedisTierBuilder, RedisTierError};

/// A boxed error, as tower uses.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The README's code blocks, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
