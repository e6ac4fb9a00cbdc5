//! Batch checks against single checks, measured interleaved in the same run: 100 permissions of
//! one principal as one `check_many` and as 100 `check` calls one after the other, with 0, 10
//! and 100 of them misses.
//!
//! ```text
//! cargo bench --bench batch    # REDIS_URL, DATABASE_URL (defaults: 127.0.0.1, as in CI)
//! ```
//!
//! - `l1`: L1 only, an in-process authorizer (a closure: the default `authorize_many`, its
//!   single calls run concurrently). Misses are made by invalidating that many entries before
//!   each (untimed) sample.
//! - `l2+l3`: an L1 that holds nothing (every check reads the shared tiers), L2 on Redis, L3 on
//!   Postgres, `PostgresRbacAuthorizer` (one statement per batch). 0 misses: every entry is an L2
//!   hit; a miss is an entry whose epoch an invalidation moved (stale in L2 and L3, then asked).
//!
//! Each row: the median and p90 of a whole sample (100 decisions), and singles / batch. The bench
//! uses its own Redis namespace and Postgres schema and removes them at the end.

use std::time::{Duration, Instant};

use tokio_postgres::NoTls;
use tower_authz_cache::{
    AuthzCache, BoxError, Decision, Invalidation, Permission, PostgresRbacAuthorizer, PostgresTier, Principal,
    RedisTier,
};

const SECRET: &[u8] = b"bench secret, 32 bytes long.....";
const N: usize = 100;

fn main() {
    // `cargo test --benches` runs this with `--bench` absent: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let pg = std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let redis = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let schema = format!("bench_batch_{}", std::process::id());
    let ns = format!("bench-batch-{}", std::process::id());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let outcome = tokio::spawn(bench(pg.clone(), redis.clone(), schema.clone(), ns.clone())).await;
        let client = connect(&pg).await;
        client.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).await.unwrap();
        if let Ok(client) = redis::Client::open(redis.as_str()) {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                let keys: Vec<String> =
                    redis::cmd("KEYS").arg(format!("{ns}*")).query_async(&mut conn).await.unwrap_or_default();
                if !keys.is_empty() {
                    let _: Result<(), _> = redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
                }
            }
        }
        if let Err(e) = outcome {
            std::panic::resume_unwind(e.into_panic());
        }
    });
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("postgres connection: {e}");
        }
    });
    client
}

fn permissions() -> Vec<Permission> {
    (0..N).map(|i| Permission::new(format!("documents:{i}"), "read")).collect()
}

/// `rounds` interleaved samples of 100 singles and one batch, each after `misses` entries were
/// invalidated (untimed); (median, p90) of each, in µs.
async fn measure(cache: &AuthzCache, misses: usize, rounds: usize) -> ((f64, f64), (f64, f64)) {
    let bob = Principal::new("bob");
    let perms = permissions();
    let invalidate = async || {
        for p in &perms[..misses] {
            cache.invalidate(&Invalidation::entry("bob", p.clone())).await.unwrap();
        }
    };
    let (mut singles, mut batches) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
    for _ in 0..rounds {
        invalidate().await;
        let start = Instant::now();
        for p in &perms {
            assert!(cache.check(&bob, p).await.unwrap().is_allowed());
        }
        singles.push(start.elapsed());
        invalidate().await;
        let start = Instant::now();
        let out = cache.check_many(&bob, &perms).await;
        batches.push(start.elapsed());
        assert!(out.iter().all(|d| d.as_ref().unwrap().is_allowed()));
    }
    (percentiles(&mut singles), percentiles(&mut batches))
}

fn percentiles(samples: &mut [Duration]) -> (f64, f64) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)].as_secs_f64() * 1e6;
    (at(0.5), at(0.9))
}

fn row(tiers: &str, misses: usize, ((s50, s90), (b50, b90)): ((f64, f64), (f64, f64))) {
    println!("| {tiers} | {misses} | {s50:.0} / {s90:.0} | {b50:.0} / {b90:.0} | {:.1}x |", s50 / b50);
}

async fn bench(pg: String, redis: String, schema: String, ns: String) {
    println!("| tiers | misses of 100 | 100 checks, µs p50 / p90 | check_many, µs p50 / p90 | singles / batch (p50) |");
    println!("|---|---|---|---|---|");

    let l1 = AuthzCache::builder(|_: Principal, _: Permission| async { Ok::<_, BoxError>(Decision::allow()) })
        .secret(SECRET)
        .build();
    let bob = Principal::new("bob");
    l1.check_many(&bob, &permissions()).await;
    for misses in [0, 10, 100] {
        measure(&l1, misses, 20).await; // warm-up
        row("L1", misses, measure(&l1, misses, 300).await);
    }

    let tier =
        || PostgresTier::builder(pg.as_str()).schema(schema.as_str()).pool_size(4).warm_on_start(0).build().unwrap();
    tier().migrate_with_reference_rbac().await.unwrap();
    let db = connect(&pg).await;
    db.batch_execute(&format!(
        "SET search_path TO {schema};
         INSERT INTO roles VALUES ('viewer');
         INSERT INTO role_permissions VALUES ('viewer', 'documents:*', 'read');
         INSERT INTO users VALUES ('bob');
         INSERT INTO user_roles VALUES ('bob', 'viewer');
         SET search_path TO public;"
    ))
    .await
    .unwrap();
    let cache = AuthzCache::builder(PostgresRbacAuthorizer::new(&pg, &schema).unwrap())
        .secret(SECRET)
        .l1_max_bytes(0)
        .l2(RedisTier::builder(redis.as_str()).namespace(&ns).pool_size(4).build().unwrap())
        .l3(tier())
        .build();
    tokio::time::timeout(Duration::from_secs(10), cache.ready()).await.expect("tiers up");
    cache.check_many(&bob, &permissions()).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while cache.stats().tiers.l2.unwrap().writes < N as u64 || cache.stats().tiers.l3.unwrap().writes < N as u64 {
        assert!(Instant::now() < deadline, "the write-behind did not land");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for misses in [0, 10, 100] {
        measure(&cache, misses, 5).await; // warm-up
        row("L2 + L3 (L1 holds nothing)", misses, measure(&cache, misses, 40).await);
    }
    let s = cache.stats();
    println!(
        "\n(L2+L3 cache: {} L2 hits, {} L3 hits, {} decisions asked of the authorizer, {} undecided)",
        s.tiers.l2.unwrap().hits,
        s.tiers.l3.unwrap().hits,
        s.authorizer_calls,
        s.undecided
    );
}
