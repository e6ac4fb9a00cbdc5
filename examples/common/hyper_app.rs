//! The demo app on plain hyper 1, shared by `hyper.rs` (L1 only) and `custom_tier.rs` (L1 + a
//! user's own shared tier): the routes and handlers, the bearer-token resolver, the
//! `CachedAuthorizationLayer` around them, and the serving loop (one task per connection, stopped
//! gracefully on Ctrl-C or SIGTERM). Each example builds its own cache and calls [`serve`].
//!
//! Not an example of its own (see `demo.rs`). Include it after `demo.rs`:
//! `#[path = "common/demo.rs"] mod demo;` then `#[path = "common/hyper_app.rs"] mod hyper_app;`.

// Each example uses part of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tower::ServiceBuilder;
use tower_authz_cache::{
    Authorized, AuthzCache, AuthzCacheBuilder, BearerToken, CachedAuthorizationLayer, Invalidation, Permission,
    Principal,
};

use crate::demo::{self, Role};

/// The demo's role store (the authorizer's source of truth), in this process's memory.
pub type Roles = Arc<RwLock<HashMap<String, Role>>>;

/// What the handlers share: the role store (the authorizer's source of truth) and the cache.
#[derive(Clone)]
struct App {
    roles: Roles,
    cache: AuthzCache,
}

/// The demo's routes, matched on method and raw path (the path the route table saw).
enum Route {
    Health,
    Metrics,
    Ready,
    ReadDocument(String),
    WriteDocument,
    SetRole(String),
    Invalidate,
    Stats,
    NotFound,
}

fn route(method: &Method, path: &str) -> Route {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (&Method::GET, ["health"]) => Route::Health,
        (&Method::GET, ["metrics"]) => Route::Metrics,
        (&Method::GET, ["ready"]) => Route::Ready,
        (&Method::GET, ["documents", id]) => Route::ReadDocument((*id).to_owned()),
        (&Method::PUT | &Method::DELETE, ["documents", _]) => Route::WriteDocument,
        (&Method::PUT, ["admin", "users", user, "role"]) => Route::SetRole((*user).to_owned()),
        (&Method::POST, ["admin", "invalidate"]) => Route::Invalidate,
        (&Method::GET, ["admin", "stats"]) => Route::Stats,
        _ => Route::NotFound,
    }
}

/// The handlers. They run only once the layer has allowed the request, and then find the caller
/// in the request's extensions.
async fn handle(app: App, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let caller = parts.extensions.get::<Authorized>().map(|a| a.principal().clone());
    match (route(&parts.method, parts.uri.path()), caller) {
        (Route::Health, _) => text(StatusCode::OK, "ok"),
        (Route::Metrics, _) => {
            let mut res = text(StatusCode::OK, app.cache.stats().to_prometheus());
            res.headers_mut().insert(header::CONTENT_TYPE, demo::PROMETHEUS_TEXT);
            res
        }
        (Route::Ready, _) => {
            let health = app.cache.health();
            let status = if health.is_ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            json(status, &health)
        }
        (Route::ReadDocument(id), _) => json(StatusCode::OK, &demo::document(&id)),
        (Route::WriteDocument, _) => empty(StatusCode::NO_CONTENT),
        (Route::SetRole(user), Some(admin)) => {
            let role = match demo::parse_role(&read(body).await) {
                Ok(role) => role,
                Err(detail) => return problem(StatusCode::BAD_REQUEST, detail),
            };
            let known = app.roles.write().unwrap_or_else(|e| e.into_inner()).get_mut(&user).map(|r| *r = role);
            if known.is_none() {
                return problem(StatusCode::NOT_FOUND, "unknown user");
            }
            // The store changed first, then the cache forgets: the next request asks the store again.
            match app.cache.invalidate_as(&Invalidation::principal(user), &admin).await {
                Ok(token) => with_token(token),
                Err(_) => {
                    problem(StatusCode::SERVICE_UNAVAILABLE, "role changed, but the invalidation was not delivered")
                }
            }
        }
        (Route::Invalidate, Some(admin)) => {
            let invalidation = match demo::parse_invalidation(&read(body).await) {
                Ok(invalidation) => invalidation,
                Err(detail) => return problem(StatusCode::BAD_REQUEST, detail),
            };
            match app.cache.invalidate_as(&invalidation, &admin).await {
                Ok(token) => with_token(token),
                Err(_) => problem(StatusCode::SERVICE_UNAVAILABLE, "invalidation not delivered"),
            }
        }
        (Route::Stats, _) => json(StatusCode::OK, &app.cache.stats()),
        _ => problem(StatusCode::NOT_FOUND, "no such route"),
    }
}

/// 204 with the invalidation's consistency token in the `authz-consistency` header: a request
/// that sends it back, to any instance, sees the change.
fn with_token(token: tower_authz_cache::ConsistencyToken) -> Response<Full<Bytes>> {
    let mut res = empty(StatusCode::NO_CONTENT);
    if let Ok(value) = http::HeaderValue::from_str(&token.to_string()) {
        res.headers_mut().insert(tower_authz_cache::consistency::DEFAULT_HEADER, value);
    }
    res
}

/// The request body, at most 64 KiB (an admin body is a few bytes); empty when unreadable.
async fn read(body: Incoming) -> Bytes {
    http_body_util::Limited::new(body, 64 * 1024).collect().await.map(|b| b.to_bytes()).unwrap_or_default()
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(body.into()));
    *res.status_mut() = status;
    res
}

fn empty(status: StatusCode) -> Response<Full<Bytes>> {
    text(status, Bytes::new())
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let mut res = text(status, serde_json::to_vec(value).unwrap_or_default());
    res.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    res
}

fn problem(status: StatusCode, detail: &str) -> Response<Full<Bytes>> {
    demo::problem(status, detail).map(|body| Full::new(Bytes::from(body)))
}

/// The demo roles at start.
pub fn demo_roles() -> Roles {
    Arc::new(RwLock::new(demo::demo_roles()))
}

/// A cache builder whose authorizer is the role store; the example adds tiers and builds it.
pub fn builder(roles: &Roles) -> AuthzCacheBuilder {
    let store = roles.clone();
    AuthzCache::builder(move |principal: Principal, permission: Permission| {
        let role = store.read().unwrap_or_else(|e| e.into_inner()).get(principal.id()).copied();
        async move { Ok::<_, Infallible>(role.unwrap_or(Role::None).decide(&permission)) }
    })
}

/// Serves the demo on 127.0.0.1:`port` until Ctrl-C or SIGTERM. `tiers` is printed at start
/// (the demo contract: each tier in use is named); `realm` goes into `WWW-Authenticate`.
pub async fn serve(
    port: u16,
    roles: Roles,
    cache: AuthzCache,
    realm: &'static str,
    tiers: &str,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // Bearer tokens: a real app asks its session store; the demo's is a fixed map.
    let sessions = Arc::new(demo::sessions());
    let tokens = BearerToken::new(move |token: String| {
        let principal = sessions.get(token.as_str()).cloned();
        async move { Ok::<_, Infallible>(principal) }
    })
    .with_realm(realm);

    // The handlers as a tower service; the layer wraps all of it, so every request is authorized
    // once, before routing.
    let app = App { roles, cache: cache.clone() };
    let handlers = tower::service_fn(move |req: Request<Incoming>| {
        let app = app.clone();
        async move { Ok::<_, Infallible>(handle(app, req).await) }
    });
    let service =
        ServiceBuilder::new().layer(CachedAuthorizationLayer::new(cache, tokens, demo::routes())).service(handlers);

    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    println!("tiers: {tiers}");
    demo::print_try(&format!("http://{addr}"));

    // One task per connection. On Ctrl-C/SIGTERM: stop accepting, let each connection finish its
    // request in flight, then return.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    let shutdown = demo::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    eprintln!("accept: {e}");
                    continue;
                }
            },
            Some(_) = connections.join_next() => continue,
            () = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(service.clone());
        let mut stop = stop_rx.clone();
        connections.spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = stop.wait_for(|stop| *stop) => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}
