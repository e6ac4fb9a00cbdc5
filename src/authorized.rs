//! [`Authorized`]: what the layer puts in an allowed request's extensions, for the handler.
//!
//! One value holds the principal, the permission checked and the decision, so an allowed
//! request costs one extension insert, not three.
//!
//! ```
//! use http::{Request, Response, StatusCode};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_authz_cache::{
//!     Authorized, AuthzCache, CachedAuthorizationLayer, Decision, Permission, Principal, TrustedHeader,
//! };
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let cache = AuthzCache::builder(|_: Principal, _: Permission| async {
//!     Ok::<_, std::convert::Infallible>(Decision::allow())
//! })
//! .build();
//! let mapper = |_: &http::request::Parts| Some(Permission::new("reports", "read"));
//! let svc = ServiceBuilder::new()
//!     .layer(CachedAuthorizationLayer::new(cache, TrustedHeader::new("x-user-id".parse().unwrap()), mapper))
//!     .service(service_fn(|req: Request<String>| async move {
//!         let authorized = req.extensions().get::<Authorized>().expect("the layer authorized it");
//!         let text = format!("{} may {}", authorized.principal().id(), authorized.permission());
//!         Ok::<_, std::convert::Infallible>(Response::new(bytes::Bytes::from(text)))
//!     }));
//! let req = Request::get("/").header("x-user-id", "alice").body(String::new()).unwrap();
//! let res = svc.oneshot(req).await.unwrap();
//! assert_eq!(res.status(), StatusCode::OK);
//! assert_eq!(res.into_body(), "alice may read reports");
//! # });
//! ```

use crate::{Decision, Permission, Principal};

/// An allowed request's authorization: who asked, for what, and the decision (with where it
/// came from). Found in the request's extensions behind
/// [`CachedAuthorizationLayer`](crate::CachedAuthorizationLayer); with the `axum` feature it is an
/// extractor, and so is [`Principal`] (taken from it).
#[derive(Debug, Clone)]
pub struct Authorized {
    principal: Principal,
    permission: Permission,
    decision: Decision,
}

impl Authorized {
    pub(crate) fn new(principal: Principal, permission: Permission, decision: Decision) -> Self {
        Self { principal, permission, decision }
    }

    /// The caller.
    pub fn principal(&self) -> &Principal {
        &self.principal
    }

    /// The permission the request was checked for.
    pub fn permission(&self) -> &Permission {
        &self.permission
    }

    /// The allow, with its source and age.
    pub fn decision(&self) -> &Decision {
        &self.decision
    }

    /// The caller, by value.
    pub fn into_principal(self) -> Principal {
        self.principal
    }
}
