//! A panicking `ResolvePrincipal` or `MapPermission` is treated like a panicking authorizer
//! (issue 12, item 5a): a problem+json 503, an audit event, a counter, and the server keeps
//! serving; never a dropped connection. Checked on a real axum server over TCP, with a client
//! that keeps its connection open across the panic.

mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::routing::get;
use http::Method;
use http::request::Parts;
use support::http1::{Conn, Reply};
use tower_authz_cache::{
    AuthzCache, BoxError, CachedAuthorizationLayer, Decision, MapPermission, Permission, Principal, ResolveError,
    RouteTable,
};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `x-user` names the principal; "boom" panics while resolving (before any future exists),
/// "boom-later" panics inside the resolver's future, after it was first polled.
fn resolver(parts: &Parts) -> impl Future<Output = Result<Principal, ResolveError>> + Send + use<> {
    let user = parts.headers.get("x-user").and_then(|v| v.to_str().ok()).map(str::to_owned);
    if user.as_deref() == Some("boom") {
        panic!("resolver bug");
    }
    async move {
        tokio::task::yield_now().await;
        match user.as_deref() {
            Some("boom-later") => panic!("resolver bug, later"),
            Some(u) => Ok(Principal::new(u)),
            None => Err(ResolveError::missing()),
        }
    }
}

/// A route table, except `/bug/...`, where the mapper panics.
fn mapper() -> impl MapPermission {
    let table = RouteTable::new().public("/health").route(Method::GET, "/documents/{id}", "documents:{id}", "read");
    move |parts: &Parts| {
        if parts.uri.path().starts_with("/bug/") {
            panic!("mapper bug");
        }
        table.map(parts)
    }
}

async fn serve(cache: AuthzCache) -> SocketAddr {
    let app = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/documents/{id}", get(|| async { "a document" }))
        .route("/bug/{id}", get(|| async { "must not run" }))
        .layer(CachedAuthorizationLayer::new(cache, resolver, mapper()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn assert_503(what: &str, reply: &Reply, detail: &str) {
    assert_eq!(reply.status, 503, "{what}: {reply:?}");
    assert_eq!(reply.header("content-type"), Some("application/problem+json"), "{what}");
    assert_eq!(reply.header("retry-after"), Some("1"), "{what}");
    assert_eq!(reply.header("cache-control"), Some("no-store"), "{what}");
    let body: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(body["status"], 503, "{what}");
    assert_eq!(body["detail"], detail, "{what}");
}

#[tokio::test]
async fn panicking_resolvers_and_mappers_get_a_503_and_the_connection_keeps_serving() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_env_filter("authz_cache::audit=info")
        .finish();
    // Current-thread runtime: the server's tasks run on this thread, under this subscriber.
    let _guard = tracing::subscriber::set_default(subscriber);

    let cache =
        AuthzCache::builder(|_: Principal, _: Permission| async { Ok::<_, BoxError>(Decision::allow()) }).build();
    let addr = serve(cache.clone()).await;
    let mut conn = Conn::connect(addr).await;
    let ok = [("x-user", "bob")];
    // (what, path, headers, the plug-in that panics)
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case<'_>; 4] = [
        ("resolver panics", "/documents/1", &[("x-user", "boom")], "principal resolver"),
        ("resolver's future panics", "/documents/1", &[("x-user", "boom-later")], "principal resolver"),
        ("mapper panics", "/bug/1", &ok, "permission mapper"),
        ("mapper panics, no credentials", "/bug/2", &[], "permission mapper"),
    ];
    for (what, path, headers, plugin) in cases {
        let reply = conn.send("GET", path, headers).await.unwrap_or_else(|e| panic!("{what}: dropped: {e}"));
        assert_503(what, &reply, &format!("authorization temporarily unavailable: {plugin} panicked"));
        // The same connection, then a new one, still serve.
        let reply = conn.send("GET", "/documents/7", &ok).await.unwrap_or_else(|e| panic!("after {what}: {e}"));
        assert_eq!((reply.status, reply.body.as_str()), (200, "a document"), "after {what}");
        let reply = Conn::connect(addr).await.send("GET", "/health", &[]).await.unwrap();
        assert_eq!(reply.status, 200, "after {what}");
    }
    assert_eq!(cache.stats().plugin_panics, 4);
    // A panic is not a check: the authorizer was asked once, for the good request.
    assert_eq!(cache.stats().authorizer_calls, 1);

    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert_eq!(log.matches("principal resolver panicked: failing closed").count(), 2, "{log}");
    assert_eq!(log.matches("permission mapper panicked: failing closed").count(), 2, "{log}");
    assert!(log.lines().all(|l| !l.contains("panicked") || l.contains("authz_cache::audit")), "{log}");
    assert!(!log.contains("bob"), "no principal id in the audit log: {log}");
}
