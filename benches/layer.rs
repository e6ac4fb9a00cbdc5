//! One request through the layer on an L1 hit, next to the same inner service without the
//! layer, and the miss path with a trivial authorizer.
//!
//! ```text
//! cargo bench --bench layer
//! ```
//!
//! Compare `bare` with `layer_l1_hit` from the same run: the difference is what the layer adds
//! per request (resolve a bearer token, match the route table, L1 lookup, extensions).

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{Criterion, criterion_group, criterion_main};
use http::{Method, Request, Response};
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
use tower_authz_cache::{
    AuthzCache, BearerToken, BoxError, CachedAuthorizationLayer, Decision, Permission, Principal, RouteTable,
};

async fn handler(req: Request<()>) -> Result<Response<bytes::Bytes>, Infallible> {
    Ok(Response::new(bytes::Bytes::copy_from_slice(req.uri().path().as_bytes())))
}

fn request() -> Request<()> {
    Request::get("/documents/1").header("authorization", "Bearer bob-token").body(()).unwrap()
}

fn cache() -> AuthzCache {
    AuthzCache::builder(|_: Principal, _: Permission| async { Ok::<_, BoxError>(Decision::allow()) }).build()
}

fn layered(
    cache: AuthzCache,
) -> impl Service<Request<()>, Response = Response<impl Sized>, Error = Infallible, Future = impl Send> + Clone {
    let tokens = BearerToken::new(|token: String| async move {
        Ok::<_, BoxError>(match token.as_str() {
            "bob-token" => Some(Principal::new("bob")),
            t => t.strip_prefix("user-").map(|_| Principal::new(t)),
        })
    });
    let routes = RouteTable::new().route(Method::GET, "/documents/{id}", "documents:{id}", "read");
    ServiceBuilder::new().layer(CachedAuthorizationLayer::new(cache, tokens, routes)).service(service_fn(handler))
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut g = c.benchmark_group("request");

    let bare = service_fn(handler);
    g.bench_function("bare", |b| b.iter(|| rt.block_on(bare.oneshot(black_box(request()))).unwrap()));

    let svc = layered(cache());
    rt.block_on(svc.clone().oneshot(request())).unwrap();
    g.bench_function("layer_l1_hit", |b| b.iter(|| rt.block_on(svc.clone().oneshot(black_box(request()))).unwrap()));

    // Every iteration is a new principal: resolve, miss, authorizer, L1 insert.
    let svc = layered(cache());
    let n = AtomicU64::new(0);
    g.bench_function("layer_miss", |b| {
        b.iter(|| {
            let i = n.fetch_add(1, Ordering::Relaxed);
            let req =
                Request::get("/documents/1").header("authorization", format!("Bearer user-{i}")).body(()).unwrap();
            rt.block_on(svc.clone().oneshot(req)).unwrap()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("cache");
    let cache = cache();
    let (bob, read) = (Principal::new("bob"), Permission::new("documents:1", "read"));
    rt.block_on(cache.check(&bob, &read)).unwrap();
    g.bench_function("check_l1_hit", |b| {
        b.iter(|| rt.block_on(cache.check(black_box(&bob), black_box(&read))).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
