//! The 401 / 403 / 503 / 400 responses: [`Rejection`]. The layer answers in the inner service's
//! own body type (any body that is `From<Bytes>`, as axum's `Body` and `Full<Bytes>` are), so a
//! response needs no boxing on its way out.
//!
//! By default a rejection is an RFC 9457 `application/problem+json` body; the [`Rejection`] is
//! also put in the response's extensions, so outer layers can see why. Replace the body with
//! [`CachedAuthorizationLayer::with_rejection_response`](crate::CachedAuthorizationLayer::with_rejection_response):
//!
//! ```
//! use bytes::Bytes;
//! use http::{Response, StatusCode};
//! use tower_authz_cache::{Rejection, RejectionKind};
//!
//! fn plain(rejection: &Rejection) -> Response<Bytes> {
//!     let mut res = Response::new(Bytes::from(rejection.reason().to_owned()));
//!     *res.status_mut() = rejection.status();
//!     res
//! }
//! # let _ = plain;
//! ```

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

/// Why a request was turned away. Found in the rejection response's extensions.
#[derive(Debug, Clone)]
pub struct Rejection {
    kind: RejectionKind,
    reason: Cow<'static, str>,
    challenge: Option<HeaderValue>,
}

/// What kind of [`Rejection`] this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RejectionKind {
    /// No valid principal: 401.
    Unauthenticated,
    /// The principal lacks the permission, or the route is unmapped: 403.
    Forbidden,
    /// No decision could be obtained: 503.
    Unavailable,
    /// The request itself is unusable (a refused consistency token): 400.
    BadRequest,
}

impl Rejection {
    pub(crate) fn new(kind: RejectionKind, reason: impl Into<Cow<'static, str>>) -> Self {
        Self { kind, reason: reason.into(), challenge: None }
    }

    pub(crate) fn with_challenge(mut self, challenge: Option<HeaderValue>) -> Self {
        self.challenge = challenge;
        self
    }

    /// The kind of rejection.
    pub fn kind(&self) -> RejectionKind {
        self.kind
    }

    /// A short, client-safe reason.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// The `WWW-Authenticate` challenge of a 401, if any.
    pub fn challenge(&self) -> Option<&HeaderValue> {
        self.challenge.as_ref()
    }

    /// The status code: 401, 403, 503 or 400.
    pub fn status(&self) -> StatusCode {
        match self.kind {
            RejectionKind::Unauthenticated => StatusCode::UNAUTHORIZED,
            RejectionKind::Forbidden => StatusCode::FORBIDDEN,
            RejectionKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            RejectionKind::BadRequest => StatusCode::BAD_REQUEST,
        }
    }

    /// The default response: `application/problem+json`, with `WWW-Authenticate` on 401 and
    /// `Retry-After: 1` on 503.
    pub fn problem_json(&self) -> Response<Bytes> {
        let status = self.status();
        let body = serde_json::json!({
            "type": "about:blank",
            "title": status.canonical_reason().unwrap_or("Error"),
            "status": status.as_u16(),
            "detail": self.reason,
        });
        let mut res = Response::new(Bytes::from(body.to_string()));
        *res.status_mut() = status;
        res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        res
    }

    /// Builds the response with `respond`, then adds what the protocol requires whatever the
    /// body: the status, the challenge, `Retry-After`, `Cache-Control: no-store`, and `self` in
    /// the extensions.
    pub(crate) fn into_response(self, respond: &Responder) -> Response<Bytes> {
        let mut res = respond(&self);
        *res.status_mut() = self.status();
        let headers = res.headers_mut();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        match self.kind {
            RejectionKind::Unauthenticated => {
                let challenge = self.challenge.clone().unwrap_or(HeaderValue::from_static("Bearer"));
                headers.insert(header::WWW_AUTHENTICATE, challenge);
            }
            RejectionKind::Unavailable => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            RejectionKind::Forbidden | RejectionKind::BadRequest => {}
        }
        res.extensions_mut().insert(self);
        res
    }
}

/// Turns a rejection into a response body and headers.
pub(crate) type Responder = Arc<dyn Fn(&Rejection) -> Response<Bytes> + Send + Sync>;

pub(crate) fn default_responder() -> Responder {
    Arc::new(Rejection::problem_json)
}
