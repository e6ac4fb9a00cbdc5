//! Hostile input through the whole layer: bad Authorization headers, principal ids and resources
//! built to collide, glob-looking ids.

mod support;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Body;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use support::send;
use tower::{ServiceBuilder, service_fn};
use tower_authz_cache::{
    AuthzCache, BearerToken, BoxError, CachedAuthorizationLayer, Decision, Invalidation, Permission, Principal,
    RouteTable,
};

#[tokio::test]
async fn malformed_authorization_headers_are_401_and_never_reach_the_token_store() {
    let lookups = Arc::new(AtomicUsize::new(0));
    let l = lookups.clone();
    let tokens = BearerToken::new(move |t: String| {
        l.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, BoxError>((t == "good").then(|| Principal::new("bob"))) }
    });
    let cache =
        AuthzCache::builder(|_: Principal, _: Permission| async { Ok::<_, BoxError>(Decision::allow()) }).build();
    let routes = RouteTable::new().route(Method::GET, "/x", "x", "read");
    let mut svc = ServiceBuilder::new()
        .layer(CachedAuthorizationLayer::new(cache, tokens, routes))
        .service(service_fn(|_: Request<Body>| async { Ok::<_, Infallible>(Response::new(Body::empty())) }));
    let huge = format!("Bearer {}", "a".repeat(64 * 1024));
    let cases: Vec<(&str, Vec<HeaderValue>)> = vec![
        ("missing", vec![]),
        ("duplicated", vec![HeaderValue::from_static("Bearer good"), HeaderValue::from_static("Bearer good")]),
        ("64 KiB", vec![HeaderValue::from_str(&huge).unwrap()]),
        ("non-UTF-8", vec![HeaderValue::from_bytes(b"Bearer \xff\xfe").unwrap()]),
        ("wrong scheme", vec![HeaderValue::from_static("Basic Z29vZDpnb29k")]),
        ("no token", vec![HeaderValue::from_static("Bearer ")]),
        ("token with spaces", vec![HeaderValue::from_static("Bearer go od")]),
        ("token with a quote", vec![HeaderValue::from_static("Bearer go\"od")]),
    ];
    for (what, values) in cases {
        let mut req = Request::get("/x").body(Body::empty()).unwrap();
        for v in values {
            req.headers_mut().append("authorization", v);
        }
        let (res, body) = send(&mut svc, req).await;
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{what}: {body}");
        assert!(res.headers()["www-authenticate"].to_str().unwrap().starts_with("Bearer"), "{what}");
        assert!(body.len() < 512, "{what}: the rejection does not echo the input");
    }
    assert_eq!(lookups.load(Ordering::SeqCst), 0, "no malformed token reached the store");
    let mut req = Request::get("/x").body(Body::empty()).unwrap();
    req.headers_mut().insert("authorization", HeaderValue::from_static("Bearer good"));
    assert_eq!(send(&mut svc, req).await.0.status(), StatusCode::OK);
}

/// Principal ids and resources that a naive `principal:resource:action` key would confuse.
#[tokio::test]
async fn ids_with_separators_and_globs_never_share_a_decision() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let cache = AuthzCache::builder(move |p: Principal, perm: Permission| {
        c.fetch_add(1, Ordering::SeqCst);
        // Only this exact tuple is allowed.
        let allowed = p.id() == "a" && perm.resource() == "b:c" && perm.action() == "read";
        async move { Ok::<_, BoxError>(Decision::from_bool(allowed)) }
    })
    .build();
    let check = |p: &str, r: &str, a: &str| {
        let cache = cache.clone();
        let (p, perm) = (Principal::new(p), Permission::new(r, a));
        async move { cache.check(&p, &perm).await.unwrap().is_allowed() }
    };
    assert!(check("a", "b:c", "read").await);
    for (p, r, a) in [
        ("a:b", "c", "read"),
        ("a", "b", "c:read"),
        ("a:b:c", "", "read"),
        ("a\0", "b:c", "read"),
        ("a\n", "b:c", "read"),
        ("*", "b:c", "read"),
        ("a*", "b:c", "read"),
        ("a", "b:*", "read"),
        ("a", "*", "read"),
    ] {
        assert!(!check(p, r, a).await, "{p:?} {r:?} {a:?} got a's allow");
    }
    // Invalidating a glob-looking id is literal: it does not touch "a".
    let before = calls.load(Ordering::SeqCst);
    cache.invalidate(&Invalidation::principal("*")).await.unwrap();
    cache.invalidate(&Invalidation::resource("b:*")).await.unwrap();
    assert!(check("a", "b:c", "read").await);
    assert_eq!(calls.load(Ordering::SeqCst), before, "a's entry survived the literal invalidations");
}
