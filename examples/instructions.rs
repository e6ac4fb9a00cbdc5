//! The layer's own cost in instructions, for `scripts/instructions.sh` (valgrind's callgrind counts
//! instructions, which repeat exactly whatever else the machine does).
//!
//! One minimal app, served bare or behind `CachedAuthorizationLayer` (L1 only, a bearer token, a
//! one-route table, as the quickstart wires it: the layer around the whole router), so that the
//! difference is the layer and nothing else:
//!
//! - `instructions serve bare|layer` serves it on `PORT` (default 3900) on a current-thread
//!   runtime, until killed: the script drives it over loopback HTTP with keep-alive;
//! - `instructions oneshot bare|layer|bare-miss|layer-miss N` sends it `N` requests in-process through
//!   `tower::ServiceExt::oneshot` (after a warm-up of 100, so that every layered request is an L1
//!   hit) and exits: the script runs two `N`s and divides the difference. The `-miss` modes name a
//!   new document in every request: each is an L1 miss (the authorizer, an L1 insert).
//!
//! ```text
//! bash scripts/instructions.sh     # builds this in release and prints the table
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;

use axum::Router;
use axum::body::Body;
use axum::response::Response;
use axum::routing::get;
use http::{Method, Request};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_authz_cache::{
    AuthzCache, BearerToken, CachedAuthorizationLayer, Decision, Permission, Principal, RouteTable,
};

fn router() -> Router {
    Router::new().route("/documents/{id}", get(|| async { "doc" }))
}

/// The router behind the layer, as the quickstart wires it.
fn layered()
-> impl Service<Request<Body>, Response = Response, Error = Infallible, Future: Send> + Clone + Send + 'static {
    let cache = AuthzCache::builder(|p: Principal, perm: Permission| async move {
        Ok::<_, Infallible>(Decision::from_bool(p.id() == "bob" && perm.action() == "read"))
    })
    .build();
    let bob = Principal::new("bob");
    let tokens = BearerToken::new(move |token: String| {
        let who = (token == "bob-token").then(|| bob.clone());
        async move { Ok::<_, Infallible>(who) }
    });
    let routes = RouteTable::new().route(Method::GET, "/documents/{id}", "documents:{id}", "read");
    ServiceBuilder::new().layer(CachedAuthorizationLayer::new(cache, tokens, routes)).service(router())
}

fn request() -> Request<Body> {
    Request::get("/documents/1").header("authorization", "Bearer bob-token").body(Body::empty()).expect("request")
}

fn document(id: usize) -> Request<Body> {
    Request::get(format!("/documents/{id}"))
        .header("authorization", "Bearer bob-token")
        .body(Body::empty())
        .expect("request")
}

type Error = Box<dyn std::error::Error>;

async fn serve<S>(app: S, layered: bool) -> Result<(), Error>
where
    S: Service<Request<Body>, Response = Response, Error = Infallible, Future: Send> + Clone + Send + Sync + 'static,
{
    let port: u16 = std::env::var("PORT").map_or(Ok(3900), |p| p.parse())?;
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    println!("{} on http://127.0.0.1:{port}", if layered { "layer" } else { "bare" });
    axum::serve(listener, axum::ServiceExt::<Request<Body>>::into_make_service(app)).await?;
    Ok(())
}

async fn oneshot<S>(app: S, n: usize, misses: bool) -> Result<(), Error>
where
    S: Service<Request<Body>, Response = Response, Error = Infallible> + Clone,
{
    for i in 0..100 + n {
        // With `misses`, every request names a document no earlier one did: an L1 miss each.
        let res = app.clone().oneshot(if misses { document(i) } else { request() }).await?;
        if i == 0 && !res.status().is_success() {
            return Err(format!("the app answered {}", res.status()).into());
        }
    }
    Ok(())
}

fn main() -> Result<(), Error> {
    const USAGE: &str =
        "usage: instructions serve bare|layer, or instructions oneshot bare|layer|bare-miss|layer-miss N";
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, which) = (args.first().map(String::as_str), args.get(1).map(String::as_str));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let n = || -> Result<usize, Error> { Ok(args.get(2).ok_or(USAGE)?.parse()?) };
    rt.block_on(async {
        match (mode, which) {
            (Some("serve"), Some("bare")) => serve(router(), false).await,
            (Some("serve"), Some("layer")) => serve(layered(), true).await,
            (Some("oneshot"), Some("bare")) => oneshot(router(), n()?, false).await,
            (Some("oneshot"), Some("layer")) => oneshot(layered(), n()?, false).await,
            (Some("oneshot"), Some("bare-miss")) => oneshot(router(), n()?, true).await,
            (Some("oneshot"), Some("layer-miss")) => oneshot(layered(), n()?, true).await,
            _ => Err(USAGE.into()),
        }
    })
}
