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
use http::{HeaderName, Response};
use tower::Layer;

use crate::consistency::DEFAULT_HEADER;
use crate::response::{Responder, default_responder};
use crate::service::{CachedAuthorization, Shared};
use crate::{AuthzCache, MapPermission, Rejection, ResolvePrincipal};

/// A tower layer that authorizes every request through an [`AuthzCache`].
///
/// For each request: map it to the [`Access`](crate::Access) it needs (public requests go
/// straight through), resolve the principal (401 without one), then ask the cache (403 on deny,
/// 503 when no decision can be obtained). On allow, one [`Authorized`](crate::Authorized) (the
/// principal, the permission checked and the decision) is put in the request's extensions for
/// the handler. Responses are in the inner service's body type (any `From<Bytes>` body).
///
/// A request may carry a [`ConsistencyToken`](crate::ConsistencyToken) (from an invalidation's
/// answer) in the `authz-consistency` header, or as a request extension put there by an outer
/// layer: the check is then at least as fresh as that invalidation, on any instance (see
/// [`consistency`](crate::consistency)); a refused token is a 400.
pub struct CachedAuthorizationLayer<R, M> {
    cache: AuthzCache,
    resolver: Arc<R>,
    mapper: Arc<M>,
    respond: Responder,
    options: Options,
}

/// What the layer reads and adds besides the check itself.
#[derive(Clone, Debug)]
pub(crate) struct Options {
    /// The request header a consistency token is read from (`None`: the extension only).
    pub(crate) consistency_header: Option<HeaderName>,
    /// Whether responses carry a `Cache-Status` member for the check.
    pub(crate) cache_status: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self { consistency_header: Some(HeaderName::from_static(DEFAULT_HEADER)), cache_status: false }
    }
}

impl<R, M> CachedAuthorizationLayer<R, M>
where
    R: ResolvePrincipal,
    M: MapPermission,
{
    /// Authorizes requests with `cache`, finding principals with `resolver` and permissions with
    /// `mapper`.
    pub fn new(cache: AuthzCache, resolver: R, mapper: M) -> Self {
        Self {
            cache,
            resolver: Arc::new(resolver),
            mapper: Arc::new(mapper),
            respond: default_responder(),
            options: Options::default(),
        }
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

    /// Reads consistency tokens from `header` instead of `authz-consistency`.
    #[must_use]
    pub fn with_consistency_header(mut self, header: HeaderName) -> Self {
        self.options.consistency_header = Some(header);
        self
    }

    /// Reads consistency tokens from the request extensions only (an outer layer puts them
    /// there), never from a header.
    #[must_use]
    pub fn without_consistency_header(mut self) -> Self {
        self.options.consistency_header = None;
        self
    }

    /// Adds a `Cache-Status` member (RFC 9211) to every response the layer authorized or
    /// denied, for debugging: `tower-authz-cache; hit; detail=l1` (or `l2`, `l3`),
    /// `tower-authz-cache; fwd=miss` (the authorizer answered), `...; fwd=miss; collapsed` (a
    /// single-flight join), `...; hit; detail=grace` (an expired entry, the authorizer down). Off by default; it tells clients what is cached about them, so keep
    /// it off in production.
    ///
    /// ```
    /// # use tower_authz_cache::{AuthzCache, CachedAuthorizationLayer, Decision, Permission, Principal, TrustedHeader};
    /// # let cache = AuthzCache::builder(|_: Principal, _: Permission| async { Ok::<_, std::convert::Infallible>(Decision::allow()) }).build();
    /// let mapper = |_: &http::request::Parts| Some(Permission::new("app", "use"));
    /// let layer = CachedAuthorizationLayer::new(cache, TrustedHeader::new("x-user-id".parse().unwrap()), mapper)
    ///     .with_cache_status(true);
    /// # let _ = layer;
    /// ```
    #[must_use]
    pub fn with_cache_status(mut self, on: bool) -> Self {
        self.options.cache_status = on;
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
            options: self.options.clone(),
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
                options: self.options.clone(),
            }),
        )
    }
}
