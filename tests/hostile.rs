//! Hostile input through the whole layer: bad Authorization headers, principal ids and resources
//! built to collide, glob-looking ids, path tricks against the route table, and a flood of
//! distinct principals (L1 bound, Redis expiries). Forged and corrupt shared entries are in
//! tests/redis.rs and tests/postgres.rs; the parsers are fuzzed in fuzz/.

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

/// Path tricks through the whole layer: every request that would need a normalisation to reach
/// a protected route is refused before the authorizer, and what does map names exactly the
/// resource the path spells (no case folding, no Unicode normalisation).
#[tokio::test]
async fn path_tricks_through_the_layer_never_reach_another_resource() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let s = seen.clone();
    let cache = AuthzCache::builder(move |_: Principal, perm: Permission| {
        s.lock().unwrap().push(perm.resource().to_owned());
        // Only document 1 is readable; everything else (and the admin route) is denied.
        let allowed = perm.resource() == "documents:1";
        async move { Ok::<_, BoxError>(Decision::from_bool(allowed)) }
    })
    .build();
    let tokens = BearerToken::new(|_: String| async { Ok::<_, BoxError>(Some(Principal::new("bob"))) });
    let routes = RouteTable::new()
        .route(Method::GET, "/documents/{id}", "documents:{id}", "read")
        .route(Method::GET, "/admin/stats", "admin", "read")
        .public("/health");
    let inner_calls = Arc::new(AtomicUsize::new(0));
    let i = inner_calls.clone();
    let mut svc = ServiceBuilder::new().layer(CachedAuthorizationLayer::new(cache, tokens, routes)).service(
        service_fn(move |_: Request<Body>| {
            i.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, Infallible>(Response::new(Body::empty())) }
        }),
    );
    let long = format!("/documents/{}", "a".repeat(60_000)); // near http::Uri's own limit (64 KiB)
    let deep = "/documents".repeat(64);
    for path in [
        "/documents/1/../../admin/stats",
        "/documents/..%2f..%2fadmin%2fstats",
        "/documents/%2e%2e/admin",
        "/documents/%2E%2E",
        "/documents/.",
        "//documents/1",
        "/documents//1",
        "/documents/1/",
        "/health/../admin/stats",
        "/documents/1%2fadmin",
        "/documents/1%5cadmin",
        "/documents/1%00",
        "/documents/1:write",
        "/documents/*",
        "/Documents/1",
        long.as_str(),
        deep.as_str(),
    ] {
        let req = Request::get(path).header("authorization", "Bearer t").body(Body::empty()).unwrap();
        let (res, body) = send(&mut svc, req).await;
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "{path:.80}: {body}");
        assert!(body.len() < 512, "{path:.80}: the rejection does not echo the path");
    }
    assert!(seen.lock().unwrap().is_empty(), "no trick reached the authorizer: {:?}", seen.lock().unwrap());
    assert_eq!(inner_calls.load(Ordering::SeqCst), 0);

    // Unicode maps literally: a look-alike of "1" is another resource, denied on its own.
    for (path, resource) in [
        ("/documents/%EF%BC%91", "documents:\u{ff11}"),
        ("/documents/1%CC%81", "documents:1\u{301}"),
        ("/documents/caf%C3%A9", "documents:café"),
    ] {
        let req = Request::get(path).header("authorization", "Bearer t").body(Body::empty()).unwrap();
        assert_eq!(send(&mut svc, req).await.0.status(), StatusCode::FORBIDDEN, "{path}");
        assert_eq!(seen.lock().unwrap().last().map(String::as_str), Some(resource), "{path}");
    }
    let req = Request::get("/documents/1").header("authorization", "Bearer t").body(Body::empty()).unwrap();
    assert_eq!(send(&mut svc, req).await.0.status(), StatusCode::OK);
    assert_eq!(inner_calls.load(Ordering::SeqCst), 1);
}

/// A flood of distinct principals (an attacker minting ids): L1 stays within its byte bound and
/// every key written to Redis carries an expiry no longer than the allow ttl, so nothing
/// accumulates in the shared store.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_distinct_principals_is_bounded_in_l1_and_every_redis_key_expires() {
    const BOUND: u64 = 1 << 20;
    const FLOOD: usize = 20_000;
    let ns = support::redis::Namespace::new("flood");
    support::redis::addr();
    let tier =
        tower_authz_cache::RedisTier::builder(support::redis::url()).namespace(&ns.0).build().expect("valid tier");
    let cache = AuthzCache::builder(|_: Principal, _: Permission| async { Ok::<_, BoxError>(Decision::allow()) })
        .l1_max_bytes(BOUND)
        .allow_ttl(std::time::Duration::from_secs(30))
        .secret(support::redis::SECRET)
        .l2(tier)
        .build();
    support::redis::wait_trusted(&cache).await;
    let perm = Permission::new("documents:1", "read");
    for i in 0..FLOOD {
        let p = Principal::new(format!("attacker-{i}\0:*\n{}", "x".repeat(i % 200)));
        assert!(cache.check(&p, &perm).await.unwrap().is_allowed());
    }
    let l1 = cache.stats().tiers.l1;
    assert!(l1.bytes <= BOUND && l1.entries < FLOOD as u64, "{l1:?}");
    let start = std::time::Instant::now();
    while cache.stats().tiers.l2.unwrap().writes + cache.stats().tiers.l2.unwrap().write_drops < FLOOD as u64 {
        assert!(start.elapsed() < std::time::Duration::from_secs(20), "{:?}", cache.stats().tiers.l2);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let keys = ns.keys();
    assert!(keys.len() >= FLOOD / 2, "the flood reached Redis: {} keys", keys.len());
    let client = redis::Client::open(support::redis::url().as_str()).unwrap();
    let mut conn = client.get_connection().unwrap();
    for chunk in keys.chunks(1000) {
        let mut pipe = redis::pipe();
        for key in chunk {
            pipe.cmd("PTTL").arg(key);
        }
        let ttls: Vec<i64> = pipe.query(&mut conn).unwrap();
        for (key, ttl) in chunk.iter().zip(ttls) {
            assert!(ttl > 0 && ttl <= 30_000, "{key} has PTTL {ttl}: every key must expire within the allow ttl");
            assert!(!key.contains("attacker"), "no principal id in a Redis key: {key}");
        }
    }
}
