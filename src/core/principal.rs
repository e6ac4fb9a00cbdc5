//! Who is calling: [`Principal`], the [`ResolvePrincipal`] plug-in point and its built-ins
//! [`BearerToken`] and [`TrustedHeader`].
//!
//! ```
//! use http::Request;
//! use tower_authz_cache::{BearerToken, Principal, ResolvePrincipal};
//!
//! # tokio_test();
//! # fn tokio_test() { tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let resolver = BearerToken::new(|token: String| async move {
//!     Ok::<_, tower_authz_cache::BoxError>((token == "bob-token").then(|| Principal::new("bob")))
//! });
//! let (parts, _) = Request::get("/").header("authorization", "Bearer bob-token").body(()).unwrap().into_parts();
//! assert_eq!(resolver.resolve(&parts).await.unwrap().id(), "bob");
//!
//! let (parts, _) = Request::get("/").body(()).unwrap().into_parts();
//! assert!(resolver.resolve(&parts).await.unwrap_err().is_missing());
//! # }) }
//! ```

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;

use http::request::Parts;
use http::{HeaderName, HeaderValue, header};

use crate::BoxError;

/// Who is calling: an opaque id, plus an optional tenant and attributes.
///
/// Cached decisions are keyed by [`Principal::id`] only: if the tenant or an attribute changes
/// what the authorizer answers, make it part of the id (`"acme/bob"`) or invalidate the principal
/// when it changes.
///
/// `Debug` shows a short hash of the id, never the id itself, so principals can be logged.
///
/// ```
/// use tower_authz_cache::Principal;
///
/// let bob = Principal::new("bob").with_tenant("acme").with_attribute("plan", "pro");
/// assert_eq!(bob.id(), "bob");
/// assert_eq!(bob.tenant(), Some("acme"));
/// assert_eq!(bob.attribute("plan"), Some("pro"));
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Principal {
    id: Arc<str>,
    tenant: Option<Arc<str>>,
    attributes: Option<Arc<BTreeMap<String, String>>>,
}

impl Principal {
    /// A principal with this id.
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        Self { id: id.into(), tenant: None, attributes: None }
    }

    /// Sets the tenant.
    #[must_use]
    pub fn with_tenant(mut self, tenant: impl Into<Arc<str>>) -> Self {
        self.tenant = Some(tenant.into());
        self
    }

    /// Adds an attribute.
    #[must_use]
    pub fn with_attribute(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        let map = self.attributes.get_or_insert_with(Default::default);
        Arc::make_mut(map).insert(key.into(), value.into());
        self
    }

    /// The principal's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub(crate) fn id_arc(&self) -> &Arc<str> {
        &self.id
    }

    /// The tenant, if any.
    pub fn tenant(&self) -> Option<&str> {
        self.tenant.as_deref()
    }

    /// One attribute, if set.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.as_ref()?.get(key).map(String::as_str)
    }
}

impl fmt::Debug for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Principal")
            .field("id", &crate::cache::key::ShortHash::of(&self.id))
            .field("tenant", &self.tenant)
            .finish_non_exhaustive()
    }
}

/// Why a request has no principal.
///
/// [`missing`](ResolveError::missing) and [`invalid`](ResolveError::invalid) become
/// `401 Unauthorized`; [`unavailable`](ResolveError::unavailable) (the credential store could not
/// be asked) becomes `503 Service Unavailable`, because nothing can be decided.
pub struct ResolveError {
    kind: ResolveErrorKind,
    reason: Cow<'static, str>,
    source: Option<BoxError>,
    challenge: Option<HeaderValue>,
}

/// What kind of [`ResolveError`] this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResolveErrorKind {
    /// No credentials in the request.
    Missing,
    /// Credentials present but malformed or unknown.
    Invalid,
    /// The credential store could not be asked.
    Unavailable,
}

impl ResolveError {
    /// No credentials were sent.
    pub fn missing() -> Self {
        Self::new(ResolveErrorKind::Missing, "missing credentials")
    }

    /// Credentials were sent but are malformed or unknown. `reason` is shown to the client, so
    /// keep secrets out of it.
    pub fn invalid(reason: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ResolveErrorKind::Invalid, reason)
    }

    /// The credential store failed: nothing can be decided (503).
    pub fn unavailable(err: impl Into<BoxError>) -> Self {
        let mut e = Self::new(ResolveErrorKind::Unavailable, "credential store unavailable");
        e.source = Some(err.into());
        e
    }

    fn new(kind: ResolveErrorKind, reason: impl Into<Cow<'static, str>>) -> Self {
        Self { kind, reason: reason.into(), source: None, challenge: None }
    }

    /// Sets the `WWW-Authenticate` challenge sent with the 401.
    #[must_use]
    pub fn with_challenge(mut self, challenge: HeaderValue) -> Self {
        self.challenge = Some(challenge);
        self
    }

    /// The kind of failure.
    pub fn kind(&self) -> ResolveErrorKind {
        self.kind
    }

    /// No credentials were sent.
    pub fn is_missing(&self) -> bool {
        self.kind == ResolveErrorKind::Missing
    }

    /// Credentials were malformed or unknown.
    pub fn is_invalid(&self) -> bool {
        self.kind == ResolveErrorKind::Invalid
    }

    /// The credential store could not be asked.
    pub fn is_unavailable(&self) -> bool {
        self.kind == ResolveErrorKind::Unavailable
    }

    /// The `WWW-Authenticate` challenge, if any.
    pub fn challenge(&self) -> Option<&HeaderValue> {
        self.challenge.as_ref()
    }

    /// The short, client-safe reason.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Debug for ResolveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResolveError")
            .field("kind", &self.kind)
            .field("reason", &self.reason)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for ResolveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for ResolveError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}

/// Finds the principal of a request.
///
/// Implemented for closures `Fn(&Parts) -> impl Future<Output = Result<Principal, ResolveError>>`;
/// the built-ins are [`BearerToken`] and [`TrustedHeader`].
///
/// Under [`CachedAuthorizationLayer`](crate::CachedAuthorizationLayer), a panic in `resolve` or
/// in its future is caught: the request gets 503 and an audit event, and the service keeps
/// serving.
///
/// ```
/// use http::request::Parts;
/// use tower_authz_cache::{Principal, ResolveError, ResolvePrincipal};
///
/// fn assert_resolver(_: impl ResolvePrincipal) {}
/// assert_resolver(|parts: &Parts| {
///     let user = parts.uri.query().map(str::to_owned);
///     async move { user.map(Principal::new).ok_or_else(ResolveError::missing) }
/// });
/// ```
pub trait ResolvePrincipal: Send + Sync + 'static {
    /// The future [`resolve`](Self::resolve) returns. It owns what it needs (it borrows neither
    /// the request nor the resolver), so the layer keeps it inline in its own response future:
    /// take what you need from the head before returning it.
    type Future: Future<Output = Result<Principal, ResolveError>> + Send + 'static;

    /// Resolves the principal from the request head.
    fn resolve(&self, parts: &Parts) -> Self::Future;
}

impl<F, Fut> ResolvePrincipal for F
where
    F: Fn(&Parts) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Principal, ResolveError>> + Send + 'static,
{
    type Future = Fut;

    fn resolve(&self, parts: &Parts) -> Fut {
        self(parts)
    }
}

/// Longest bearer token accepted; longer ones are rejected before any lookup.
const MAX_TOKEN_LEN: usize = 4096;

/// Resolves `Authorization: Bearer <token>` through a token lookup you supply.
///
/// The lookup is an async closure `Fn(String) -> Future<Output = Result<Option<Principal>, E>>`:
/// `Ok(None)` means "unknown token" (401), `Err` means the store could not be asked (503).
/// Missing, duplicated, malformed (not RFC 6750 `token68`, longer than 4 KiB, non-ASCII) or
/// wrong-scheme headers are rejected with 401 and `WWW-Authenticate: Bearer` without calling
/// the lookup.
#[derive(Clone)]
pub struct BearerToken<L> {
    lookup: L,
    realm: Option<HeaderValue>,
}

impl<L> BearerToken<L> {
    /// A bearer resolver over this lookup.
    pub fn new(lookup: L) -> Self {
        Self { lookup, realm: None }
    }

    /// Adds `realm="..."` to the challenge. Characters that cannot appear in a quoted header
    /// string (quotes, backslashes, control and non-ASCII characters) are dropped.
    #[must_use]
    pub fn with_realm(mut self, realm: &str) -> Self {
        let clean: String = realm.chars().filter(|c| (' '..='~').contains(c) && !matches!(c, '"' | '\\')).collect();
        self.realm = HeaderValue::from_str(&format!("Bearer realm=\"{clean}\"")).ok();
        self
    }
}

/// The `WWW-Authenticate` challenge: `Bearer`, the realm when set, and the error when given.
fn challenge(realm: Option<&HeaderValue>, error: Option<&str>) -> HeaderValue {
    let base = realm.map(|v| v.to_str().unwrap_or("Bearer")).unwrap_or("Bearer");
    match error {
        None => HeaderValue::from_str(base).unwrap_or(HeaderValue::from_static("Bearer")),
        Some(e) => {
            let sep = if base == "Bearer" { " " } else { ", " };
            HeaderValue::from_str(&format!("{base}{sep}error=\"{e}\"")).unwrap_or(HeaderValue::from_static("Bearer"))
        }
    }
}

impl<L> fmt::Debug for BearerToken<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BearerToken").field("realm", &self.realm).finish_non_exhaustive()
    }
}

/// Extracts the token from the request's single `Authorization` header.
pub(crate) fn parse_bearer(parts: &Parts) -> Result<&str, ResolveError> {
    let mut values = parts.headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next().ok_or_else(ResolveError::missing)?;
    if values.next().is_some() {
        return Err(ResolveError::invalid("more than one authorization header"));
    }
    if value.len() > MAX_TOKEN_LEN + 7 {
        return Err(ResolveError::invalid("authorization header too long"));
    }
    let value = value.to_str().map_err(|_| ResolveError::invalid("authorization header is not ascii"))?;
    // `Bearer <token68>`: the scheme in any case, spaces around the token.
    if let (Some(scheme), Some(b' ')) = (value.as_bytes().get(..6), value.as_bytes().get(6)) {
        if scheme.eq_ignore_ascii_case(b"bearer") {
            let token = trim_spaces(value.get(7..).unwrap_or_default());
            return if is_token68(token.as_bytes()) {
                Ok(token)
            } else {
                Err(ResolveError::invalid("malformed bearer token"))
            };
        }
    }
    match value.split_once(' ') {
        None => Err(ResolveError::invalid("malformed authorization header")),
        Some(_) => Err(ResolveError::invalid("authorization scheme is not bearer")),
    }
}

/// `text` without leading and trailing spaces (spaces only: a tab is not trimmed).
fn trim_spaces(text: &str) -> &str {
    text.trim_start_matches(' ').trim_end_matches(' ')
}

/// The bytes of RFC 7235 `token68` before its `=` padding.
static TOKEN68: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = matches!(b as u8, b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'+' | b'/');
        b += 1;
    }
    table
};

/// RFC 7235 `token68`: `1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`.
fn is_token68(token: &[u8]) -> bool {
    let mut body = token;
    while let [rest @ .., b'='] = body {
        body = rest;
    }
    !body.is_empty() && body.iter().all(|b| TOKEN68[usize::from(*b)])
}

impl<L, Fut, E> ResolvePrincipal for BearerToken<L>
where
    L: Fn(String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Option<Principal>, E>> + Send + 'static,
    E: Into<BoxError>,
{
    type Future = BearerFuture<Fut>;

    fn resolve(&self, parts: &Parts) -> BearerFuture<Fut> {
        let state = match parse_bearer(parts) {
            Ok(token) => BearerState::Lookup { lookup: (self.lookup)(token.to_owned()), realm: self.realm.clone() },
            Err(e) => {
                let error = if e.is_missing() { None } else { Some("invalid_request") };
                BearerState::Refused { error: Some(e.with_challenge(challenge(self.realm.as_ref(), error))) }
            }
        };
        BearerFuture { state }
    }
}

/// The future of [`BearerToken`]'s [`resolve`](ResolvePrincipal::resolve): the token lookup, or
/// the refusal of a malformed header.
#[pin_project::pin_project]
pub struct BearerFuture<Fut> {
    #[pin]
    state: BearerState<Fut>,
}

#[pin_project::pin_project(project = BearerStateProj)]
enum BearerState<Fut> {
    Lookup {
        #[pin]
        lookup: Fut,
        realm: Option<HeaderValue>,
    },
    Refused {
        error: Option<ResolveError>,
    },
}

impl<Fut> fmt::Debug for BearerFuture<Fut> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BearerFuture").finish_non_exhaustive()
    }
}

impl<Fut, E> Future for BearerFuture<Fut>
where
    Fut: Future<Output = Result<Option<Principal>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Principal, ResolveError>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        match self.project().state.project() {
            BearerStateProj::Lookup { lookup, realm } => Poll::Ready(match std::task::ready!(lookup.poll(cx)) {
                Ok(Some(principal)) => Ok(principal),
                Ok(None) => Err(ResolveError::invalid("unknown bearer token")
                    .with_challenge(challenge(realm.as_ref(), Some("invalid_token")))),
                Err(e) => Err(ResolveError::unavailable(e)),
            }),
            BearerStateProj::Refused { error } => {
                Poll::Ready(Err(error.take().unwrap_or_else(|| ResolveError::invalid("malformed bearer token"))))
            }
        }
    }
}

/// Longest principal id [`TrustedHeader`] accepts.
const MAX_HEADER_ID_LEN: usize = 256;

/// Takes the principal id from a header set by a trusted hop, such as `x-user-id` from an API
/// gateway that authenticated the caller.
///
/// **Only use this behind a hop that strips the header from incoming requests**: anyone who can
/// reach the service directly can claim any identity. The header must appear exactly once, be
/// visible ASCII and at most 256 bytes.
#[derive(Debug, Clone)]
pub struct TrustedHeader {
    name: HeaderName,
}

impl TrustedHeader {
    /// Reads the principal id from `name`.
    pub fn new(name: HeaderName) -> Self {
        Self { name }
    }
}

impl ResolvePrincipal for TrustedHeader {
    type Future = std::future::Ready<Result<Principal, ResolveError>>;

    fn resolve(&self, parts: &Parts) -> Self::Future {
        let mut values = parts.headers.get_all(&self.name).iter();
        let result = match (values.next(), values.next()) {
            (None, _) => Err(ResolveError::missing()),
            (Some(_), Some(_)) => Err(ResolveError::invalid("principal header repeated")),
            (Some(v), None) => match v.to_str() {
                Ok(id)
                    if !id.is_empty() && id.len() <= MAX_HEADER_ID_LEN && id.bytes().all(|b| b.is_ascii_graphic()) =>
                {
                    Ok(Principal::new(id))
                }
                _ => Err(ResolveError::invalid("malformed principal header")),
            },
        };
        std::future::ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn parts(headers: &[(&str, &[u8])]) -> Parts {
        let mut b = Request::get("/");
        for (k, v) in headers {
            b = b.header(*k, HeaderValue::from_bytes(v).unwrap());
        }
        b.body(()).unwrap().into_parts().0
    }

    fn bearer() -> impl ResolvePrincipal {
        BearerToken::new(|t: String| async move {
            match t.as_str() {
                "good" => Ok(Some(Principal::new("bob"))),
                "down" => Err("store down"),
                _ => Ok(None),
            }
        })
    }

    #[tokio::test]
    async fn bearer_accepts_only_wellformed_single_headers() {
        let r = bearer();
        assert_eq!(r.resolve(&parts(&[("authorization", b"Bearer good")])).await.unwrap().id(), "bob");
        assert_eq!(r.resolve(&parts(&[("authorization", b"bearer  good")])).await.unwrap().id(), "bob");
        assert_eq!(r.resolve(&parts(&[("authorization", b"BEARER good  ")])).await.unwrap().id(), "bob");
        type Headers<'a> = &'a [(&'a str, &'a [u8])];
        let cases: &[(Headers<'_>, ResolveErrorKind)] = &[
            (&[], ResolveErrorKind::Missing),
            (&[("authorization", b"Bearer nope")], ResolveErrorKind::Invalid),
            (&[("authorization", b"Basic Ym9iOmI=")], ResolveErrorKind::Invalid),
            (&[("authorization", b"Bearer")], ResolveErrorKind::Invalid),
            (&[("authorization", b"Bearer ")], ResolveErrorKind::Invalid),
            (&[("authorization", b"Bearer a b")], ResolveErrorKind::Invalid),
            (&[("authorization", b"Bearer \tgood")], ResolveErrorKind::Invalid),
            (&[("authorization", b"Bearer good=x")], ResolveErrorKind::Invalid),
            (&[("authorization", b"Bearer ===")], ResolveErrorKind::Invalid),
            (&[("authorization", b"Bearerx good")], ResolveErrorKind::Invalid),
            (&[("authorization", b"Bearer g\xffod")], ResolveErrorKind::Invalid),
            (&[("authorization", b"Bearer good"), ("authorization", b"Bearer good")], ResolveErrorKind::Invalid),
            (&[("authorization", b"Bearer down")], ResolveErrorKind::Unavailable),
        ];
        for (headers, kind) in cases {
            let err = r.resolve(&parts(headers)).await.unwrap_err();
            assert_eq!(err.kind(), *kind, "{headers:?}");
            if *kind != ResolveErrorKind::Unavailable {
                let challenge = err.challenge().expect("401 carries a challenge").to_str().unwrap();
                assert!(challenge.starts_with("Bearer"), "{challenge}");
            }
        }
        let huge = format!("Bearer {}", "a".repeat(64 * 1024));
        let err = r.resolve(&parts(&[("authorization", huge.as_bytes())])).await.unwrap_err();
        assert!(err.is_invalid());
    }

    #[tokio::test]
    async fn trusted_header_requires_exactly_one_clean_value() {
        let r = TrustedHeader::new(HeaderName::from_static("x-user-id"));
        assert_eq!(r.resolve(&parts(&[("x-user-id", b"alice")])).await.unwrap().id(), "alice");
        assert!(r.resolve(&parts(&[])).await.unwrap_err().is_missing());
        assert!(r.resolve(&parts(&[("x-user-id", b"a"), ("x-user-id", b"b")])).await.unwrap_err().is_invalid());
        assert!(r.resolve(&parts(&[("x-user-id", b"")])).await.unwrap_err().is_invalid());
        assert!(r.resolve(&parts(&[("x-user-id", b"a b")])).await.unwrap_err().is_invalid());
    }

    #[test]
    fn debug_never_shows_the_id() {
        let s = format!("{:?}", Principal::new("very-secret-user"));
        assert!(!s.contains("very-secret-user"), "{s}");
    }
}
