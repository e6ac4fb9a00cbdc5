//! axum extractors (feature `axum`): [`Authorized`] and, taken from it, [`Principal`].
//!
//! ```
//! use tower_authz_cache::{Authorized, Principal};
//!
//! async fn hello(principal: Principal) -> String {
//!     format!("hello {}", principal.id())
//! }
//! async fn why(authorized: Authorized) -> String {
//!     format!("{} ({})", authorized.permission(), authorized.decision().source())
//! }
//! let _: axum::Router = axum::Router::new()
//!     .route("/me", axum::routing::get(hello))
//!     .route("/why", axum::routing::get(why));
//! ```

use axum_core::extract::FromRequestParts;
use http::StatusCode;
use http::request::Parts;

use crate::{Authorized, Principal};

/// 500: the handler asked for the authorization on a route the layer does not cover (or a public
/// one). That is a wiring bug, not the client's fault.
const NOT_AUTHORIZED: (StatusCode, &str) =
    (StatusCode::INTERNAL_SERVER_ERROR, "no authorized principal on this request");

impl<S: Send + Sync> FromRequestParts<S> for Authorized {
    /// 500: see the module docs.
    type Rejection = (StatusCode, &'static str);

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Authorized>().cloned().ok_or(NOT_AUTHORIZED)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Principal {
    /// 500: the handler asked for a principal on a route the layer does not cover (or a public
    /// one). That is a wiring bug, not the client's fault.
    type Rejection = (StatusCode, &'static str);

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Authorized>().map(|a| a.principal().clone()).ok_or(NOT_AUTHORIZED)
    }
}
