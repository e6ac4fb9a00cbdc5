//! The smallest useful axum app behind `CachedAuthorizationLayer`: an in-memory authorizer, bearer
//! tokens, a route table, the layer around the whole router (L1 only: repeats are cache hits).
//!
//! ```text
//! cargo run --example axum                   # serves on 127.0.0.1:3000 (PORT to change)
//! curl -i http://127.0.0.1:3000/health                                                       # 200, public
//! curl -i http://127.0.0.1:3000/documents/1                                                  # 401, no token
//! curl -i -H 'Authorization: Bearer bob-token' http://127.0.0.1:3000/documents/1              # 200
//! curl -i -X DELETE -H 'Authorization: Bearer bob-token' http://127.0.0.1:3000/documents/1    # 403
//! curl -i -X DELETE -H 'Authorization: Bearer alice-token' http://127.0.0.1:3000/documents/1  # 204
//! ```

use std::convert::Infallible;

use axum::extract::{Extension, Path, Request};
use axum::{Router, ServiceExt, http::Method, http::StatusCode, routing::get};
use tower::ServiceBuilder;
use tower_authz_cache::{
    Authorized, AuthzCache, BearerToken, CachedAuthorizationLayer, Decision, Permission, Principal, RouteTable,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The source of truth (your policy engine, database, ...): alice may do anything, others read.
    let cache = AuthzCache::builder(|principal: Principal, permission: Permission| async move {
        Ok::<_, Infallible>(Decision::from_bool(principal.id() == "alice" || permission.action() == "read"))
    })
    .build();

    // Who is calling: `Authorization: Bearer <token>`, looked up in your session store.
    let tokens = BearerToken::new(|token: String| async move {
        let user = ["alice", "bob"].into_iter().find(|user| token == format!("{user}-token"));
        Ok::<_, Infallible>(user.map(Principal::new))
    });

    // What each request needs. A path no rule covers is denied.
    let routes = RouteTable::new()
        .public("/health")
        .route(Method::GET, "/documents/{id}", "documents:{id}", "read")
        .route(Method::DELETE, "/documents/{id}", "documents:{id}", "delete");

    let router = Router::new().route("/health", get(|| async { "ok" })).route(
        "/documents/{id}",
        get(|Path(id): Path<String>, Extension(caller): Extension<Authorized>| async move {
            format!("document {id}, read by {}\n", caller.principal().id())
        })
        .delete(|| async { StatusCode::NO_CONTENT }),
    );
    // The layer wraps the whole router: each request is authorized once, before routing.
    let app = ServiceBuilder::new().layer(CachedAuthorizationLayer::new(cache, tokens, routes)).service(router);

    let port = std::env::var("PORT").map_or(Ok(3000), |p| p.parse::<u16>())?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on http://127.0.0.1:{port}");
    let app = ServiceExt::<Request>::into_make_service(app);
    axum::serve(listener, app).with_graceful_shutdown(async { tokio::signal::ctrl_c().await.unwrap_or(()) }).await?;
    Ok(())
}
