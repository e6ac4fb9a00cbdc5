//! Criterion benches of the building blocks (through the unstable `__internals` hooks), and of an
//! L2 / L3 hit through `AuthzCache::check` next to a raw round trip on the same server, measured
//! in the same group so that ratios can be quoted from one run.
//!
//! ```text
//! cargo bench --bench blocks --all-features
//! REDIS_URL=redis://127.0.0.1:6379 DATABASE_URL=postgres://root@127.0.0.1:5432/test \
//!     cargo bench --bench blocks --all-features -- l2
//! ```
//!
//! - `keys`: deriving the secret keys (once per tier at start-up) and one key id (per shared-tier
//!   read or write).
//! - `envelope`: encoding, decoding with MAC verification, and rejecting a wrong MAC.
//! - `l1`: a get on an L1 holding 10,000 entries: a hit on one hot key (the per-thread front), hits
//!   spread over all keys (mini-moka), and a miss.
//! - `request`: `parse_bearer` and `RouteTable` mapping of a request's parts.
//! - `l2` (feature `redis`): `check()` with a zero-byte L1 and L2 on Redis (one `MGET` of the
//!   entry and its epochs, MAC, deadline and epoch checks) next to a raw `GET` of a value of the
//!   envelope's size. Own namespace `bench-blocks-<pid>`, deleted at the end.
//! - `l3` (feature `postgres`): `check()` with a zero-byte L1 and L3 only, next to a raw prepared
//!   `SELECT value ... WHERE key = $1` of the same row. Own schema `bench_blocks_<pid>`, dropped at
//!   the end.
//!
//! The whole layer on an L1 hit and on a miss is in `benches/layer.rs` (`layer_l1_hit`,
//! `layer_miss`, next to `bare`).
//!
//! Without `--bench` (`cargo test --benches`), the `l2` and `l3` groups are skipped; the others
//! run once as a smoke test.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{Method, Request};
use tower_authz_cache::__internals::{Envelope, L1, SecretKeys, Tuple, parse_bearer};
use tower_authz_cache::{Access, MapPermission, RouteTable};

const SECRET: &[u8] = b"bench secret, 32 bytes long.....";

fn envelope() -> Envelope {
    Envelope {
        allowed: true,
        reason: None,
        valid_until_ms: 1_700_000_060_000,
        computed_at_ms: 1_700_000_000_000,
        epochs: [1, 2, 3, 4],
    }
}

fn keys(c: &mut Criterion) {
    let mut g = c.benchmark_group("keys");
    g.bench_function("derive", |b| b.iter(|| SecretKeys::derive(black_box(SECRET))));
    let keys = SecretKeys::derive(SECRET);
    g.bench_function("key_id", |b| {
        b.iter(|| keys.key_id(black_box("bob"), black_box("documents:12345"), black_box("read")))
    });
    g.finish();
}

fn envelopes(c: &mut Criterion) {
    let mut g = c.benchmark_group("envelope");
    let keys = SecretKeys::derive(SECRET);
    let id = keys.key_id("bob", "documents:12345", "read");
    let env = envelope();
    g.bench_function("encode", |b| b.iter(|| black_box(&env).encode(&keys, &id)));
    let bytes = env.encode(&keys, &id);
    assert_eq!(Envelope::decode(&bytes, &keys, &id).as_ref(), Ok(&env));
    g.bench_function("decode_valid", |b| b.iter(|| Envelope::decode(black_box(&bytes), &keys, &id).unwrap()));
    let mut forged = bytes.clone();
    *forged.last_mut().unwrap() ^= 1;
    assert!(Envelope::decode(&forged, &keys, &id).is_err());
    g.bench_function("decode_bad_mac", |b| b.iter(|| Envelope::decode(black_box(&forged), &keys, &id).unwrap_err()));
    g.finish();
}

fn l1(c: &mut Criterion) {
    let mut g = c.benchmark_group("l1");
    let l1 = L1::new(64 << 20);
    let tuples: Vec<Tuple> = (0..10_000).map(|i| Tuple::new(&format!("user-{i}"), "documents:1", "read")).collect();
    for t in &tuples {
        l1.insert(t, u64::MAX);
    }
    let hit = &tuples[4_321];
    assert_eq!(l1.get(hit), Some(true));
    let miss = Tuple::new("user-absent", "documents:1", "read");
    assert_eq!(l1.get(&miss), None);
    // One hot key: served by the per-thread front.
    g.bench_function("get_hit", |b| b.iter(|| l1.get(black_box(hit))));
    // 10,000 keys in turn: the 256-slot front mostly misses, mini-moka answers.
    let mut i = 0;
    g.bench_function("get_hit_spread", |b| {
        b.iter(|| {
            i = (i + 7919) % tuples.len();
            l1.get(black_box(&tuples[i]))
        })
    });
    g.bench_function("get_miss", |b| b.iter(|| l1.get(black_box(&miss))));
    g.finish();
}

fn requests(c: &mut Criterion) {
    let mut g = c.benchmark_group("request");
    let (parts, _) = Request::get("/orgs/acme/docs/12345")
        .header("authorization", "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJib2IifQ.c2lnbmF0dXJl")
        .header("accept", "application/json")
        .body(())
        .unwrap()
        .into_parts();
    assert!(parse_bearer(&parts).is_ok());
    g.bench_function("parse_bearer", |b| b.iter(|| parse_bearer(black_box(&parts)).unwrap().len()));

    let table = RouteTable::new()
        .public("/health")
        .public("/static/{file}")
        .route(Method::GET, "/documents/new", "documents", "create")
        .route(Method::GET, "/documents/{id}", "documents:{id}", "read")
        .route(Method::PUT, "/documents/{id}", "documents:{id}", "write")
        .route(Method::DELETE, "/documents/{id}", "documents:{id}", "delete")
        .route(Method::PUT, "/admin/users/{user}/role", "admin:users:{user}", "manage")
        .route(Method::GET, "/orgs/{org}/members", "orgs:{org}", "list")
        .route(Method::GET, "/orgs/{org}/docs/{doc}", "orgs:{org}:docs:{doc}", "read");
    assert!(matches!(table.map(&parts), Access::Requires(_)));
    g.bench_function("route_map", |b| b.iter(|| table.map(black_box(&parts))));
    let (encoded, _) = Request::get("/orgs/ac%6De/docs/12%3345").body(()).unwrap().into_parts();
    assert_eq!(table.map(&parts), table.map(&encoded));
    g.bench_function("route_map_percent_encoded", |b| b.iter(|| table.map(black_box(&encoded))));
    g.finish();
}

/// The shared tiers are only benched under `cargo bench` (`--bench`), not `cargo test --benches`.
#[cfg(any(feature = "redis", feature = "postgres"))]
fn benching() -> bool {
    std::env::args().any(|a| a == "--bench")
}

#[cfg(feature = "redis")]
mod l2 {
    use std::hint::black_box;
    use std::time::{Duration, Instant};

    use criterion::Criterion;
    use tower_authz_cache::__internals::SecretKeys;
    use tower_authz_cache::{AuthzCache, BoxError, Decision, Permission, Principal, RedisTier};

    /// Deletes the namespace's keys, also when a bench panics.
    struct Cleanup {
        url: String,
        ns: String,
    }

    impl Drop for Cleanup {
        fn drop(&mut self) {
            let Ok(mut conn) = redis::Client::open(self.url.as_str()).and_then(|c| c.get_connection()) else {
                return;
            };
            let keys: Vec<String> =
                redis::cmd("KEYS").arg(format!("{}:*", self.ns)).query(&mut conn).unwrap_or_default();
            if !keys.is_empty() {
                let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query(&mut conn);
            }
        }
    }

    pub fn bench(c: &mut Criterion) {
        if !super::benching() {
            return;
        }
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
        let ns = format!("bench-blocks-{}", std::process::id());
        let _cleanup = Cleanup { url: url.clone(), ns: ns.clone() };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let authorizer = |_: Principal, _: Permission| async { Ok::<_, BoxError>(Decision::allow()) };
        let tier = || RedisTier::builder(url.as_str()).namespace(ns.as_str()).build().unwrap();
        let (bob, read) = (Principal::new("bob"), Permission::new("documents:1", "read"));
        let (reader, mut raw, raw_key) = rt.block_on(async {
            let writer = AuthzCache::builder(authorizer).secret(super::SECRET).l2(tier()).build();
            let reader = AuthzCache::builder(authorizer).l1_max_bytes(0).secret(super::SECRET).l2(tier()).build();
            writer.check(&bob, &read).await.unwrap();
            let client = redis::Client::open(url.as_str()).unwrap();
            let mut raw = client.get_multiplexed_async_connection().await.unwrap();
            // A value of the size of the stored envelope (no reason).
            let keys = SecretKeys::derive(super::SECRET);
            let value = super::envelope().encode(&keys, &keys.key_id("bob", "documents:1", "read"));
            let raw_key = format!("{ns}:raw");
            let _: () = redis::cmd("SET").arg(&raw_key).arg(value).query_async(&mut raw).await.unwrap();
            // Let the write-behind land the entry.
            let deadline = Instant::now() + Duration::from_secs(10);
            while writer.stats().tiers.l2.unwrap().writes < 1 {
                assert!(Instant::now() < deadline, "the write-behind did not write the entry");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(reader.check(&bob, &read).await.unwrap().is_allowed());
            drop(writer);
            (reader, raw, raw_key)
        });
        let hits_before = reader.stats().tiers.l2.unwrap().hits;
        let mut checks = 0;

        let mut g = c.benchmark_group("l2");
        g.bench_function("raw_get", |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let t = Instant::now();
                    for _ in 0..iters {
                        let v: Vec<u8> = redis::cmd("GET").arg(&raw_key).query_async(&mut raw).await.unwrap();
                        black_box(v);
                    }
                    t.elapsed()
                })
            })
        });
        g.bench_function("check_l2_hit", |b| {
            b.iter_custom(|iters| {
                checks += iters;
                rt.block_on(async {
                    let t = Instant::now();
                    for _ in 0..iters {
                        black_box(reader.check(black_box(&bob), black_box(&read)).await.unwrap());
                    }
                    t.elapsed()
                })
            })
        });
        g.finish();
        let hits = reader.stats().tiers.l2.unwrap().hits - hits_before;
        assert_eq!(hits, checks, "every timed check was an L2 hit");
    }
}

#[cfg(feature = "postgres")]
mod l3 {
    use std::hint::black_box;
    use std::time::{Duration, Instant};

    use criterion::Criterion;
    use tokio_postgres::NoTls;
    use tower_authz_cache::{AuthzCache, BoxError, Decision, Permission, PostgresTier, Principal};

    async fn connect(url: &str) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(url, NoTls).await.unwrap();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                eprintln!("postgres connection: {e}");
            }
        });
        client
    }

    /// Drops the schema, also when a bench panics.
    struct Cleanup {
        url: String,
        schema: String,
    }

    impl Drop for Cleanup {
        fn drop(&mut self) {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            rt.block_on(async {
                if let Ok((client, connection)) = tokio_postgres::connect(&self.url, NoTls).await {
                    tokio::spawn(connection);
                    let drop = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema);
                    if let Err(e) = client.batch_execute(&drop).await {
                        eprintln!("could not drop schema {}: {e}", self.schema);
                    }
                }
            });
        }
    }

    pub fn bench(c: &mut Criterion) {
        if !super::benching() {
            return;
        }
        let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".to_owned());
        let schema = format!("bench_blocks_{}", std::process::id());
        let _cleanup = Cleanup { url: url.clone(), schema: schema.clone() };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let authorizer = |_: Principal, _: Permission| async { Ok::<_, BoxError>(Decision::allow()) };
        let tier = || {
            PostgresTier::builder(url.as_str()).schema(schema.as_str()).pool_size(2).warm_on_start(0).build().unwrap()
        };
        let (bob, read) = (Principal::new("bob"), Permission::new("documents:1", "read"));
        let (reader, client, stmt, key) = rt.block_on(async {
            tier().migrate().await.unwrap();
            let writer = AuthzCache::builder(authorizer).secret(super::SECRET).l3(tier()).build();
            let reader = AuthzCache::builder(authorizer).l1_max_bytes(0).secret(super::SECRET).l3(tier()).build();
            writer.check(&bob, &read).await.unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while writer.stats().tiers.l3.unwrap().writes < 1 {
                assert!(Instant::now() < deadline, "the write-behind did not write the row");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            drop(writer);
            let client = connect(&url).await;
            let key: Vec<u8> =
                client.query_one(&format!("SELECT key FROM {schema}.authz_cache_entries"), &[]).await.unwrap().get(0);
            let stmt = client
                .prepare(&format!("SELECT value FROM {schema}.authz_cache_entries WHERE key = $1"))
                .await
                .unwrap();
            assert!(reader.check(&bob, &read).await.unwrap().is_allowed());
            (reader, client, stmt, key)
        });
        let hits_before = reader.stats().tiers.l3.unwrap().hits;
        let mut checks = 0;

        let mut g = c.benchmark_group("l3");
        g.bench_function("raw_select", |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let t = Instant::now();
                    for _ in 0..iters {
                        let v: Vec<u8> = client.query_one(&stmt, &[&key]).await.unwrap().get(0);
                        black_box(v);
                    }
                    t.elapsed()
                })
            })
        });
        g.bench_function("check_l3_hit", |b| {
            b.iter_custom(|iters| {
                checks += iters;
                rt.block_on(async {
                    let t = Instant::now();
                    for _ in 0..iters {
                        black_box(reader.check(black_box(&bob), black_box(&read)).await.unwrap());
                    }
                    t.elapsed()
                })
            })
        });
        g.finish();
        let hits = reader.stats().tiers.l3.unwrap().hits - hits_before;
        assert_eq!(hits, checks, "every timed check was an L3 hit");
        drop((reader, client));
        drop(rt);
    }
}

#[cfg(not(feature = "redis"))]
mod l2 {
    pub fn bench(_: &mut criterion::Criterion) {}
}

#[cfg(not(feature = "postgres"))]
mod l3 {
    pub fn bench(_: &mut criterion::Criterion) {}
}

fn config() -> Criterion {
    Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3)).sample_size(50)
}

criterion_group! {
    name = blocks;
    config = config();
    targets = keys, envelopes, l1, requests, l2::bench, l3::bench
}
criterion_main!(blocks);
