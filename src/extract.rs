//! axum extractors (feature `axum`).
//!
//! ```
//! use tower_authz_cache::Principal;
//!
//! async fn handler(principal: Principal) -> String {
//!     format!("hello {}", principal.id())
//! }
//! let _: axum::Router = axum::Router::new().route("/me", axum::routing::get(handler));
//! ```

use axum_core::extract::FromRequestParts;
use http::StatusCode;
use http::request::Parts;

use crate::Principal;

impl<S: Send + Sync> FromRequestParts<S> for Principal {
    /// 500: the handler asked for a principal on a route the layer does not cover (or a public
    /// one). That is a wiring bug, not the client's fault.
    type Rejection = (StatusCode, &'static str);

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .ok_or((StatusCode::INTERNAL_SERVER_ERROR, "no authorized principal on this request"))
    }
}
