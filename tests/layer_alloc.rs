//! What an L1 hit through the layer allocates, beyond what the app allocates without it (issue
//! 14): the app is the one of `examples/instructions.rs` (an axum router, the layer around it as
//! the quickstart wires it), driven in-process with `oneshot`; a global allocator counts this
//! thread's allocations. Allocation counts are exact where timings are not, so this guards the
//! hot path in the ordinary test run (`scripts/instructions.sh` gives the instruction counts).
//!
//! The layer's share is three: the bearer token handed to the lookup (a `String`), the resource
//! name (`Arc<str>`), and the one `Authorized` extension. The previous hot path (the
//! authorization in a boxed future, three extensions, a wrapped response body that axum boxed
//! again) added eight: this test, adapted to its API, measured 11 bare and 19 layered.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::Body;
use axum::response::Response;
use axum::routing::get;
use http::{Method, Request, StatusCode};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_authz_cache::{
    Authorized, AuthzCache, BearerToken, CachedAuthorizationLayer, Decision, Permission, Principal, RouteTable,
};

struct Counting;

// Only the requesting thread's allocations count (the harness may allocate at any moment).
thread_local!(static COUNTING: Cell<bool> = const { Cell::new(false) });
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.try_with(Cell::get).unwrap_or(false) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn router() -> Router {
    Router::new().route(
        "/documents/{id}",
        get(|req: Request<Body>| async move {
            // The handler sees what the layer authorized (nothing when bare).
            match req.extensions().get::<Authorized>() {
                Some(a) if a.permission().resource() != "documents:1" => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::OK,
            }
        }),
    )
}

fn layered() -> impl Service<Request<Body>, Response = Response, Error = Infallible> + Clone {
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
    Request::get("/documents/1").header("authorization", "Bearer bob-token").body(Body::empty()).unwrap()
}

/// Allocations per request over 200 requests, after a warm-up (the first one is the L1 miss).
fn allocations_per_request<S>(app: S) -> f64
where
    S: Service<Request<Body>, Response = Response, Error = Infallible> + Clone,
{
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        for _ in 0..20 {
            let res = app.clone().oneshot(request()).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
        }
        const N: u64 = 200;
        ALLOCATIONS.store(0, Ordering::SeqCst);
        for _ in 0..N {
            // Built outside the count: the request is the client's, not the app's.
            let req = request();
            COUNTING.with(|c| c.set(true));
            let res = app.clone().oneshot(req).await;
            COUNTING.with(|c| c.set(false));
            assert_eq!(res.unwrap().status(), StatusCode::OK);
        }
        ALLOCATIONS.load(Ordering::SeqCst) as f64 / N as f64
    })
}

#[test]
fn an_l1_hit_through_the_layer_allocates_three_times_beyond_the_bare_app() {
    let bare = allocations_per_request(router());
    let layer = allocations_per_request(layered());
    println!("allocations per request: bare {bare}, with the layer {layer}");
    assert_eq!(layer - bare, 3.0, "allocations the layer adds per L1 hit (bare {bare}, layered {layer})");
}
