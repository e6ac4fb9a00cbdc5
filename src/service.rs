//! [`CachedAuthorization`]: the service built by
//! [`CachedAuthorizationLayer`](crate::CachedAuthorizationLayer).
//!
//! ```
//! use http::{Request, Response, StatusCode};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_authz_cache::{
//!     Authorized, AuthzCache, CachedAuthorizationLayer, Decision, Permission, Principal, TrustedHeader,
//! };
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let cache = AuthzCache::builder(|p: Principal, _: Permission| async move {
//!     Ok::<_, std::convert::Infallible>(Decision::from_bool(p.id() == "alice"))
//! })
//! .build();
//! let mapper = |_: &http::request::Parts| Some(Permission::new("app", "use"));
//! let svc = ServiceBuilder::new()
//!     .layer(CachedAuthorizationLayer::new(cache, TrustedHeader::new("x-user-id".parse().unwrap()), mapper))
//!     .service(service_fn(|req: Request<String>| async move {
//!         let who = req.extensions().get::<Authorized>().map(|a| a.principal().id().to_owned());
//!         let text = format!("hello {}", who.unwrap_or_default());
//!         Ok::<_, std::convert::Infallible>(Response::new(bytes::Bytes::from(text)))
//!     }));
//!
//! let res = svc.clone().oneshot(Request::get("/").header("x-user-id", "alice").body(String::new()).unwrap()).await.unwrap();
//! assert_eq!(res.status(), StatusCode::OK);
//! let res = svc.oneshot(Request::get("/").header("x-user-id", "bob").body(String::new()).unwrap()).await.unwrap();
//! assert_eq!(res.status(), StatusCode::FORBIDDEN);
//! # });
//! ```

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderName, HeaderValue, Request, Response};
use tower::Service;

use crate::cache::CheckError;
use crate::cache::key::ShortHash;
use crate::consistency::ConsistencyToken;
use crate::future::ResponseFuture;
use crate::layer::Options;
use crate::response::Responder;
use crate::{
    Access, Authorized, AuthzCache, Decision, DecisionSource, MapPermission, Permission, Principal, Rejection,
    RejectionKind, ResolveError, ResolvePrincipal,
};

/// The `Cache-Status` header (RFC 9211).
pub(crate) static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// This layer's `Cache-Status` member for a decision.
fn cache_status(decision: &Decision) -> HeaderValue {
    HeaderValue::from_static(match decision.source() {
        DecisionSource::L1 => "tower-authz-cache; hit; detail=l1",
        DecisionSource::Tier("l2") => "tower-authz-cache; hit; detail=l2",
        DecisionSource::Tier("l3") => "tower-authz-cache; hit; detail=l3",
        DecisionSource::Tier(_) => "tower-authz-cache; hit; detail=shared",
        DecisionSource::Joined => "tower-authz-cache; fwd=miss; collapsed",
        DecisionSource::Grace => "tower-authz-cache; hit; detail=grace",
        _ => "tower-authz-cache; fwd=miss",
    })
}

/// Authorizes each request through an [`AuthzCache`] before the inner service sees it.
pub struct CachedAuthorization<S, R, M> {
    inner: S,
    shared: Arc<Shared<R, M>>,
}

pub(crate) struct Shared<R, M> {
    pub(crate) cache: AuthzCache,
    pub(crate) resolver: Arc<R>,
    pub(crate) mapper: Arc<M>,
    pub(crate) respond: Responder,
    pub(crate) options: Options,
}

impl<S, R, M> CachedAuthorization<S, R, M> {
    pub(crate) fn new(inner: S, shared: Arc<Shared<R, M>>) -> Self {
        Self { inner, shared }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: Clone, R, M> Clone for CachedAuthorization<S, R, M> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone(), shared: self.shared.clone() }
    }
}

impl<S: fmt::Debug, R, M> fmt::Debug for CachedAuthorization<S, R, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedAuthorization").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl<R, M> Shared<R, M> {
    /// The answer to a request whose resolver or mapper panicked: it fails closed like a
    /// panicking authorizer (503, an audit event, counted), and the service keeps serving.
    pub(crate) fn plugin_panicked(&self, plugin: &'static str, reason: &'static str, parts: &Parts) -> Response<Bytes> {
        self.cache.plugin_panicked();
        tracing::error!(
            target: "authz_cache::audit",
            plugin,
            method = %parts.method,
            "{plugin} panicked: failing closed"
        );
        Rejection::new(RejectionKind::Unavailable, reason).into_response(&self.respond)
    }

    fn resolver_panicked(&self, parts: &Parts) -> Response<Bytes> {
        self.plugin_panicked(
            "principal resolver",
            "authorization temporarily unavailable: principal resolver panicked",
            parts,
        )
    }

    /// The consistency token the request carries (extension first, then the header), if any;
    /// `Err` for a header that does not parse.
    fn token(&self, parts: &Parts) -> Result<Option<ConsistencyToken>, ()> {
        if let Some(token) = parts.extensions.get::<ConsistencyToken>() {
            return Ok(Some(token.clone()));
        }
        let Some(value) = self.options.consistency_header.as_ref().and_then(|h| parts.headers.get(h)) else {
            return Ok(None);
        };
        let text = value.to_str().map_err(|_| ())?;
        text.parse::<ConsistencyToken>().map(Some).map_err(|_| ())
    }

    /// After the resolver: the principal and the permission to check, or the rejection (the
    /// resolver panicked or refused, no rule covers the request, a consistency token is refused).
    /// `resolved` is `None` when the resolver panicked.
    // The rejection is a response: boxing it would cost the allow path an allocation for a
    // rare outcome.
    #[allow(clippy::result_large_err)]
    pub(crate) fn resolved(
        &self,
        resolved: Option<Result<Principal, ResolveError>>,
        access: Access,
        parts: &Parts,
    ) -> Result<(Principal, Permission), Response<Bytes>> {
        let principal = match resolved {
            Some(Ok(p)) => p,
            None => return Err(self.resolver_panicked(parts)),
            Some(Err(e)) => {
                let kind = if e.is_unavailable() { RejectionKind::Unavailable } else { RejectionKind::Unauthenticated };
                if e.is_unavailable() {
                    tracing::warn!(target: "authz_cache::audit", error = ?e, "principal store unavailable: failing closed");
                }
                let challenge = e.challenge().cloned();
                let reason = if e.is_unavailable() {
                    "authorization temporarily unavailable".into()
                } else {
                    e.reason().to_owned()
                };
                return Err(Rejection::new(kind, reason).with_challenge(challenge).into_response(&self.respond));
            }
        };
        let permission = match access {
            Access::Requires(p) => p,
            _ => {
                tracing::info!(
                    target: "authz_cache::audit",
                    principal = %ShortHash::of(principal.id()),
                    method = %parts.method,
                    "denied: no route rule covers this request"
                );
                return Err(Rejection::new(RejectionKind::Forbidden, "no authorization rule covers this request")
                    .into_response(&self.respond));
            }
        };
        let Ok(token) = self.token(parts) else {
            return Err(
                Rejection::new(RejectionKind::BadRequest, "consistency token malformed").into_response(&self.respond)
            );
        };
        if let Some(token) = &token {
            if let Err(e) = self.cache.require_fresh(token) {
                return Err(Rejection::new(RejectionKind::BadRequest, e.to_string()).into_response(&self.respond));
            }
        }
        Ok((principal, permission))
    }

    /// After the check: on allow, [`Authorized`] goes into the request's extensions and the
    /// `Cache-Status` member (when on) comes back; otherwise the rejection.
    #[allow(clippy::result_large_err)]
    pub(crate) fn concluded(
        &self,
        checked: Result<Decision, CheckError>,
        principal: Principal,
        permission: Permission,
        parts: &mut Parts,
    ) -> Result<Option<HeaderValue>, Response<Bytes>> {
        let status = match &checked {
            Ok(decision) if self.options.cache_status => Some(cache_status(decision)),
            _ => None,
        };
        match checked {
            Ok(decision) if decision.is_allowed() => {
                parts.extensions.insert(Authorized::new(principal, permission, decision));
                Ok(status)
            }
            Ok(decision) => {
                tracing::info!(
                    target: "authz_cache::audit",
                    principal = %ShortHash::of(principal.id()),
                    permission = %permission,
                    "denied"
                );
                let reason = match decision.reason() {
                    Some(r) => r.to_owned(),
                    None => format!("{} on {} is not allowed", permission.action(), permission.resource()),
                };
                let mut res = Rejection::new(RejectionKind::Forbidden, reason).into_response(&self.respond);
                if let Some(status) = status {
                    res.headers_mut().append(&CACHE_STATUS, status);
                }
                Err(res)
            }
            Err(e) => {
                Err(Rejection::new(RejectionKind::Unavailable, format!("authorization temporarily unavailable: {e}"))
                    .into_response(&self.respond))
            }
        }
    }
}

impl<S, R, M, ReqB, ResB> Service<Request<ReqB>> for CachedAuthorization<S, R, M>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone,
    R: ResolvePrincipal,
    M: MapPermission,
    ResB: From<Bytes>,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqB, R, M>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        // The ready service goes with the request; the clone waits for the next poll_ready.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (parts, body) = req.into_parts();
        // A panicking mapper or resolver must not unwind through the server (a dropped
        // connection): it is answered like a panicking authorizer. Not panicking costs nothing
        // measurable.
        let access = match catch_unwind(AssertUnwindSafe(|| self.shared.mapper.map(&parts))) {
            Ok(Access::Public) => return ResponseFuture::calling(inner.call(Request::from_parts(parts, body))),
            Ok(access) => access,
            Err(_) => {
                return ResponseFuture::rejected(self.shared.plugin_panicked(
                    "permission mapper",
                    "authorization temporarily unavailable: permission mapper panicked",
                    &parts,
                ));
            }
        };
        match catch_unwind(AssertUnwindSafe(|| self.shared.resolver.resolve(&parts))) {
            Ok(resolve) => ResponseFuture::resolving(resolve, self.shared.clone(), access, inner, parts, body),
            Err(_) => ResponseFuture::rejected(self.shared.resolver_panicked(&parts)),
        }
    }
}
