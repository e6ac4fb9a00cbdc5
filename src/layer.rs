//! [`CachedAuthorizationLayer`]: configuration only; it builds a
//! [`CachedAuthorization`](crate::CachedAuthorization) around each inner service.
//!
//! ```
//! use axum::{Router, routing::get};
//! use http::Method;
//! use tower_authz_cache::{
//!     AuthzCache, BearerToken, CachedAuthorizationLayer, Decision, Permission, Principal, RouteTable,
//! };
//!
//! let cache = AuthzCache::builder(|p: Principal, perm: Permission| async move {
//!     Ok::<_, std::convert::Infallible>(Decision::from_bool(p.id() == "bob" && perm.action() == "read"))
//! })
//! .build();
//! let tokens = BearerToken::new(|token: String| async move {
//!     Ok::<_, std::convert::Infallible>((token == "bob-token").then(|| Principal::new("bob")))
//! });
//! let routes = RouteTable::new().route(Method::GET, "/documents/{id}", "documents:{id}", "read");
//!
//! let app: Router = Router::new()
//!     .route("/documents/{id}", get(|| async { "a document" }))
//!     .layer(CachedAuthorizationLayer::new(cache, tokens, routes));
//! # let _ = app;
//! ```

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::Response;
use tower::Layer;

use crate::response::{Responder, default_responder};
use crate::service::{CachedAuthorization, Shared};
use crate::{AuthzCache, MapPermission, Rejection, ResolvePrincipal};

/// A tower layer that authorizes every request through an [`AuthzCache`].
///
/// For each request: map it to the [`Access`](crate::Access) it needs (public requests go
/// straight through), resolve the principal (401 without one), then ask the cache (403 on deny,
/// 503 when no decision can be obtained). On allow, the [`Principal`](crate::Principal),
/// [`Permission`](crate::Permission) and [`Decision`](crate::Decision) are put in the request's
/// extensions for the handler.
pub struct CachedAuthorizationLayer<R, M> {
    cache: AuthzCache,
    resolver: Arc<R>,
    mapper: Arc<M>,
    respond: Responder,
}

impl<R, M> CachedAuthorizationLayer<R, M>
where
    R: ResolvePrincipal,
    M: MapPermission,
{
    /// Authorizes requests with `cache`, finding principals with `resolver` and permissions with
    /// `mapper`.
    pub fn new(cache: AuthzCache, resolver: R, mapper: M) -> Self {
        Self { cache, resolver: Arc::new(resolver), mapper: Arc::new(mapper), respond: default_responder() }
    }
}

impl<R, M> CachedAuthorizationLayer<R, M> {
    /// Replaces how rejections are rendered (the default is `application/problem+json`). The
    /// status, `WWW-Authenticate`, `Retry-After` and `Cache-Control: no-store` headers are set
    /// after `respond` runs, whatever it returns.
    #[must_use]
    pub fn with_rejection_response<F>(mut self, respond: F) -> Self
    where
        F: Fn(&Rejection) -> Response<Bytes> + Send + Sync + 'static,
    {
        self.respond = Arc::new(respond);
        self
    }

    /// The cache behind this layer.
    pub fn cache(&self) -> &AuthzCache {
        &self.cache
    }
}

impl<R, M> Clone for CachedAuthorizationLayer<R, M> {
    fn clone(&self) -> Self {
        Self {
            cache: self.cache.clone(),
            resolver: self.resolver.clone(),
            mapper: self.mapper.clone(),
            respond: self.respond.clone(),
        }
    }
}

impl<R, M> fmt::Debug for CachedAuthorizationLayer<R, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedAuthorizationLayer").field("cache", &self.cache).finish_non_exhaustive()
    }
}

impl<S, R, M> Layer<S> for CachedAuthorizationLayer<R, M> {
    type Service = CachedAuthorization<S, R, M>;

    fn layer(&self, inner: S) -> Self::Service {
        CachedAuthorization::new(
            inner,
            Arc::new(Shared {
                cache: self.cache.clone(),
                resolver: self.resolver.clone(),
                mapper: self.mapper.clone(),
                respond: self.respond.clone(),
            }),
        )
    }
}
