//! The layer end to end: responses (snapshots), extensions, unmapped routes, fail-closed paths.

mod support;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Body;
use http::{Method, Request, Response, StatusCode};
use support::{get, render, send};
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
use tower_authz_cache::{
    Authorized, AuthzCache, BearerToken, BoxError, CachedAuthorizationLayer, Decision, Permission, Principal,
    Rejection, RejectionKind, ResolveError, RouteTable,
};

fn tokens() -> BearerToken<impl Fn(String) -> std::future::Ready<Result<Option<Principal>, BoxError>> + Clone> {
    BearerToken::new(|token: String| {
        std::future::ready(match token.as_str() {
            "bob-token" => Ok(Some(Principal::new("bob"))),
            "alice-token" => Ok(Some(Principal::new("alice"))),
            "down-token" => Err("token store down".into()),
            _ => Ok(None),
        })
    })
}

fn routes() -> RouteTable {
    RouteTable::new()
        .public("/health")
        .route(Method::GET, "/documents/{id}", "documents:{id}", "read")
        .route(Method::DELETE, "/documents/{id}", "documents:{id}", "delete")
        .route(Method::GET, "/broken/{id}", "broken:{id}", "read")
}

/// The inner service echoes what the layer put in the request extensions.
async fn inner(req: Request<Body>) -> Result<Response<Body>, Infallible> {
    let authorized = req.extensions().get::<Authorized>();
    let p = authorized.map(|a| a.principal().id().to_owned());
    let perm = authorized.map(|a| a.permission().to_string());
    let allowed = authorized.map(|a| a.decision().is_allowed());
    Ok(Response::new(Body::from(format!("{p:?} {perm:?} {allowed:?}"))))
}

fn authorizer(calls: Arc<AtomicUsize>) -> impl tower_authz_cache::Authorizer {
    move |p: Principal, perm: Permission| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move {
            if perm.resource().starts_with("broken:") {
                return Err::<Decision, BoxError>("policy engine unreachable".into());
            }
            Ok(match (p.id(), perm.action()) {
                ("alice", _) | (_, "read") => Decision::allow(),
                _ => Decision::deny().with_reason("viewers cannot delete"),
            })
        }
    }
}

fn app(
    calls: Arc<AtomicUsize>,
) -> impl Service<Request<Body>, Response = Response<impl http_body::Body<Error = impl std::fmt::Debug>>, Error = Infallible>
+ Clone {
    let cache = AuthzCache::builder(authorizer(calls)).build();
    ServiceBuilder::new().layer(CachedAuthorizationLayer::new(cache, tokens(), routes())).service(service_fn(inner))
}

#[tokio::test]
async fn rejections_are_problem_json_with_the_right_headers() {
    let mut svc = app(Arc::default());
    let cases = [
        ("401_missing", get("/documents/1", None)),
        ("401_unknown_token", get("/documents/1", Some("who-token"))),
        ("401_wrong_scheme", {
            let mut r = get("/documents/1", None);
            r.headers_mut().insert("authorization", "Basic Ym9iOmJvYg==".parse().unwrap());
            r
        }),
        ("403_denied", support::request("DELETE", "/documents/1", Some("bob-token"), "")),
        ("403_unmapped", get("/nowhere", Some("alice-token"))),
        ("503_authorizer_down", get("/broken/1", Some("alice-token"))),
        ("503_token_store_down", get("/documents/1", Some("down-token"))),
    ];
    for (name, req) in cases {
        let (res, body) = send(&mut svc, req).await;
        insta::assert_snapshot!(name, render(&res, &body));
    }
}

#[tokio::test]
async fn allow_reaches_the_inner_service_with_principal_permission_and_decision() {
    let mut svc = app(Arc::default());
    let (res, body) = send(&mut svc, get("/documents/7", Some("bob-token"))).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(body, r#"Some("bob") Some("read documents:7") Some(true)"#);
    // Public routes pass without credentials and without a principal.
    let (res, body) = send(&mut svc, get("/health", None)).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(body, "None None None");
}

#[tokio::test]
async fn rejections_carry_the_reason_in_response_extensions() {
    let svc = ServiceBuilder::new()
        .layer(CachedAuthorizationLayer::new(
            AuthzCache::builder(authorizer(Arc::default())).build(),
            tokens(),
            routes(),
        ))
        .service(service_fn(inner));
    let res = svc.clone().oneshot(get("/broken/1", Some("alice-token"))).await.unwrap();
    let rejection = res.extensions().get::<Rejection>().expect("rejection in extensions");
    assert_eq!(rejection.kind(), RejectionKind::Unavailable);
    assert_eq!(rejection.reason(), "authorization temporarily unavailable: authorizer failed");
    let res = svc.oneshot(support::request("DELETE", "/documents/1", Some("bob-token"), "")).await.unwrap();
    assert_eq!(res.extensions().get::<Rejection>().unwrap().reason(), "viewers cannot delete");
}

#[tokio::test]
async fn unmapped_routes_never_reach_the_authorizer_or_the_inner_service() {
    let calls = Arc::new(AtomicUsize::new(0));
    let mut svc = app(calls.clone());
    for path in
        ["/nowhere", "/documents", "/documents/1/", "/documents/%2e%2e", "/documents//1", "/health/../documents/1"]
    {
        let (res, body) = send(&mut svc, get(path, Some("alice-token"))).await;
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "{path}");
        assert!(body.contains("no authorization rule"), "{path}: {body}");
    }
    // Unauthenticated requests to unmapped routes are 401 first.
    let (res, _) = send(&mut svc, get("/nowhere", None)).await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn repeated_requests_are_answered_from_l1() {
    let calls = Arc::new(AtomicUsize::new(0));
    let cache = AuthzCache::builder(authorizer(calls.clone())).build();
    let mut svc = ServiceBuilder::new()
        .layer(CachedAuthorizationLayer::new(cache.clone(), tokens(), routes()))
        .service(service_fn(inner));
    for _ in 0..10 {
        let (res, _) = send(&mut svc, get("/documents/1", Some("bob-token"))).await;
        assert_eq!(res.status(), StatusCode::OK);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let s = cache.stats();
    assert_eq!((s.tiers.l1.hits, s.tiers.l1.misses), (9, 1));
}

#[tokio::test]
async fn custom_rejection_bodies_keep_the_protocol_headers() {
    let cache = AuthzCache::builder(authorizer(Arc::default())).build();
    let mut svc = ServiceBuilder::new()
        .layer(CachedAuthorizationLayer::new(cache, tokens(), routes()).with_rejection_response(|r: &Rejection| {
            Response::new(bytes::Bytes::from(format!("nope: {}", r.reason())))
        }))
        .service(service_fn(inner));
    let (res, body) = send(&mut svc, get("/documents/1", None)).await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(res.headers()["www-authenticate"], "Bearer");
    assert_eq!(body, "nope: missing credentials");
}

#[tokio::test]
async fn closure_resolvers_and_mappers_plug_in() {
    let cache = AuthzCache::builder(authorizer(Arc::default())).build();
    let resolver = |parts: &http::request::Parts| {
        let user = parts.headers.get("x-user").and_then(|v| v.to_str().ok()).map(str::to_owned);
        async move { user.map(Principal::new).ok_or_else(ResolveError::missing) }
    };
    let mapper =
        |parts: &http::request::Parts| (parts.method == Method::DELETE).then(|| Permission::new("things", "delete"));
    let svc =
        ServiceBuilder::new().layer(CachedAuthorizationLayer::new(cache, resolver, mapper)).service(service_fn(inner));
    let req = |m: Method, user: &str| {
        Request::builder().method(m).uri("/x").header("x-user", user).body(Body::empty()).unwrap()
    };
    assert_eq!(svc.clone().oneshot(req(Method::GET, "bob")).await.unwrap().status(), StatusCode::OK);
    assert_eq!(svc.clone().oneshot(req(Method::DELETE, "bob")).await.unwrap().status(), StatusCode::FORBIDDEN);
    assert_eq!(svc.oneshot(req(Method::DELETE, "alice")).await.unwrap().status(), StatusCode::OK);
}

#[test]
fn futures_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    let cache = AuthzCache::builder(authorizer(Arc::default())).build();
    let mut svc = ServiceBuilder::new()
        .layer(CachedAuthorizationLayer::new(cache.clone(), tokens(), routes()))
        .service(service_fn(inner));
    let fut = svc.call(get("/documents/1", Some("bob-token")));
    assert_send(&fut);
    let p = Principal::new("bob");
    let perm = Permission::new("documents:1", "read");
    assert_send(&cache.check(&p, &perm));
    let inv = tower_authz_cache::Invalidation::All;
    assert_send(&cache.invalidate(&inv));
    assert_send(&cache.invalidation_service().call(tower_authz_cache::Invalidation::All));
}
