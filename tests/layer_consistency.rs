//! The layer's consistency tokens (`authz-consistency` header or request extension) and its
//! optional `Cache-Status` member.

mod support;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use axum::body::Body;
use http::{Method, Request, Response, StatusCode};
use support::{get, send};
use tower::{ServiceBuilder, service_fn};
use tower_authz_cache::{
    Authorized, AuthzCache, BearerToken, BoxError, CachedAuthorizationLayer, ConsistencyToken, Decision, Invalidation,
    Permission, Principal, RouteTable,
};

const SECRET: &str = "layer-consistency secret, 32 b!!";

/// bob may read while `allowed` is set; counts authorizer calls.
#[derive(Clone, Default)]
struct Truth {
    revoked: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
}

impl Truth {
    fn cache(&self, secret: &str) -> AuthzCache {
        let t = self.clone();
        AuthzCache::builder(move |_: Principal, perm: Permission| {
            t.calls.fetch_add(1, Ordering::SeqCst);
            let allowed = perm.action() == "read" && !t.revoked.load(Ordering::SeqCst);
            async move { Ok::<_, Infallible>(Decision::from_bool(allowed)) }
        })
        .secret(secret)
        .build()
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

fn layer(cache: AuthzCache) -> CachedAuthorizationLayer<impl tower_authz_cache::ResolvePrincipal, RouteTable> {
    let tokens = BearerToken::new(|token: String| {
        std::future::ready(Ok::<_, BoxError>((token == "bob-token").then(|| Principal::new("bob"))))
    });
    let routes = RouteTable::new().route(Method::GET, "/documents/{id}", "documents:{id}", "read");
    CachedAuthorizationLayer::new(cache, tokens, routes)
}

/// Echoes where the decision came from; answers with its own `Cache-Status` member.
async fn inner(req: Request<Body>) -> Result<Response<Body>, Infallible> {
    let source = req.extensions().get::<Authorized>().map(|a| a.decision().source().to_string()).unwrap_or_default();
    let mut res = Response::new(Body::from(source));
    res.headers_mut().insert("cache-status", "origin-cache; hit".parse().unwrap());
    Ok(res)
}

fn with_token(token: &str) -> Request<Body> {
    let mut req = get("/documents/1", Some("bob-token"));
    req.headers_mut().insert("authz-consistency", token.parse().unwrap());
    req
}

/// Two instances sharing the secret (no shared tier, so no backplane at all): B serves bob's
/// old allow from L1 until a request carries A's token; that request, and B's later ones, see
/// the revocation.
#[tokio::test]
async fn a_token_from_another_instance_is_read_from_the_header_and_makes_the_check_fresh() {
    let truth = Truth::default();
    let a = truth.cache(SECRET);
    let mut b = ServiceBuilder::new().layer(layer(truth.cache(SECRET))).service(service_fn(inner));
    assert_eq!(send(&mut b, get("/documents/1", Some("bob-token"))).await.0.status(), StatusCode::OK);

    truth.revoked.store(true, Ordering::SeqCst);
    let token = a.invalidate(&Invalidation::principal("bob")).await.unwrap().to_string();
    let (res, body) = send(&mut b, get("/documents/1", Some("bob-token"))).await;
    assert_eq!((res.status(), body.as_str()), (StatusCode::OK, "l1"), "without the token: B has heard nothing");
    let calls = truth.calls();
    let (res, body) = send(&mut b, with_token(&token)).await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN, "{body}");
    assert_eq!(truth.calls(), calls + 1, "the authorizer was asked again");
    assert_eq!(send(&mut b, get("/documents/1", Some("bob-token"))).await.0.status(), StatusCode::FORBIDDEN);
}

/// An outer layer may put the token in the request extensions instead.
#[tokio::test]
async fn a_token_in_the_request_extensions_counts_too() {
    let truth = Truth::default();
    let a = truth.cache(SECRET);
    let mut b =
        ServiceBuilder::new().layer(layer(truth.cache(SECRET)).without_consistency_header()).service(service_fn(inner));
    assert_eq!(send(&mut b, get("/documents/1", Some("bob-token"))).await.0.status(), StatusCode::OK);
    truth.revoked.store(true, Ordering::SeqCst);
    let token: ConsistencyToken = a.invalidate(&Invalidation::principal("bob")).await.unwrap();
    // With the header switched off, the header is not read at all (not even a malformed one).
    assert_eq!(send(&mut b, with_token("garbage")).await.0.status(), StatusCode::OK);
    let mut req = get("/documents/1", Some("bob-token"));
    req.extensions_mut().insert(token);
    assert_eq!(send(&mut b, req).await.0.status(), StatusCode::FORBIDDEN);
}

/// Malformed, forged, non-ASCII, from another secret: 400 problem+json, the inner service and
/// the authorizer untouched.
#[tokio::test]
async fn refused_tokens_are_400_problem_json() {
    let truth = Truth::default();
    let other = truth.cache("another deployment's secret, 32b").invalidate(&Invalidation::All).await.unwrap();
    let good = truth.cache(SECRET).invalidate(&Invalidation::principal("bob")).await.unwrap().to_string();
    let forged = good.replacen(".p.", ".r.", 1);
    let mut b = ServiceBuilder::new().layer(layer(truth.cache(SECRET))).service(service_fn(inner));
    let calls = truth.calls();
    for (token, detail) in [
        ("v1.p.nonsense", "consistency token malformed"),
        (&good[..good.len() - 4], "consistency token malformed"),
        (forged.as_str(), "consistency token not issued by this cache (bad MAC)"),
        (&other.to_string(), "consistency token not issued by this cache (bad MAC)"),
    ] {
        let (res, body) = send(&mut b, with_token(token)).await;
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{token}");
        assert_eq!(res.headers()["content-type"], "application/problem+json");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["detail"], detail, "{token}");
    }
    let mut req = get("/documents/1", Some("bob-token"));
    req.headers_mut().insert("authz-consistency", http::HeaderValue::from_bytes(b"v1.\xff").unwrap());
    assert_eq!(send(&mut b, req).await.0.status(), StatusCode::BAD_REQUEST);
    assert_eq!(truth.calls(), calls, "no check was made for a refused token");
    // A good token is accepted.
    assert_eq!(send(&mut b, with_token(&good)).await.0.status(), StatusCode::OK);
}

/// `Cache-Status`: absent by default; when on, the authorizer's answer is `fwd=miss`, the next
/// one an L1 hit, a deny carries it too, and the inner service's own member is kept first.
#[tokio::test]
async fn cache_status_is_off_by_default_and_says_where_the_decision_came_from() {
    let truth = Truth::default();
    let mut off = ServiceBuilder::new().layer(layer(truth.cache(SECRET))).service(service_fn(inner));
    let (res, _) = send(&mut off, get("/documents/1", Some("bob-token"))).await;
    assert_eq!(values(&res), ["origin-cache; hit"]);

    let mut on =
        ServiceBuilder::new().layer(layer(truth.cache(SECRET)).with_cache_status(true)).service(service_fn(inner));
    let (res, body) = send(&mut on, get("/documents/1", Some("bob-token"))).await;
    assert_eq!(body, "authorizer");
    assert_eq!(values(&res), ["origin-cache; hit", "tower-authz-cache; fwd=miss"]);
    let (res, body) = send(&mut on, get("/documents/1", Some("bob-token"))).await;
    assert_eq!(body, "l1");
    assert_eq!(values(&res), ["origin-cache; hit", "tower-authz-cache; hit; detail=l1"]);
    truth.revoked.store(true, Ordering::SeqCst);
    let mut on_fresh =
        ServiceBuilder::new().layer(layer(truth.cache(SECRET)).with_cache_status(true)).service(service_fn(inner));
    let (res, _) = send(&mut on_fresh, get("/documents/1", Some("bob-token"))).await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(values(&res), ["tower-authz-cache; fwd=miss"]);
    let (res, _) = send(&mut on_fresh, get("/documents/1", Some("bob-token"))).await;
    assert_eq!(values(&res), ["tower-authz-cache; hit; detail=l1"]);
}

fn values(res: &Response<()>) -> Vec<String> {
    res.headers().get_all("cache-status").iter().map(|v| v.to_str().unwrap().to_owned()).collect()
}
