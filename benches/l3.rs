//! L3-hit latency through the cache (in process, loopback Postgres) next to a raw indexed
//! `SELECT` round trip on the same Postgres, measured interleaved in the same run.
//!
//! ```text
//! cargo bench --bench l3            # DATABASE_URL, default postgres://postgres@127.0.0.1:5432/test
//! ```
//!
//! Each L3 sample is one `AuthzCache::check` on a cache with no L2 and an L1 that cannot hold
//! anything (a zero-byte L1), so every check reads Postgres: one statement returning the entry and
//! its four durable epochs, MAC verification, deadline and epoch checks. The raw sample is one
//! prepared `SELECT value ... WHERE key = $1` of the same row on a tokio-postgres connection.
//! Percentiles are over 20,000 samples each. The bench uses a schema of its own
//! (`bench_l3_<pid>`) and drops it at the end.

use std::time::{Duration, Instant};

use tokio_postgres::NoTls;
use tower_authz_cache::{AuthzCache, BoxError, Decision, Permission, PostgresTier, Principal};

const SAMPLES: usize = 20_000;

fn pct(samples: &mut [Duration], q: f64) -> f64 {
    samples.sort();
    samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)].as_secs_f64() * 1e6
}

fn main() {
    // `cargo test --benches` runs this with `--bench` absent: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let schema = format!("bench_l3_{}", std::process::id());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        // Run as a task so that the schema is dropped whether the bench finishes or panics.
        let outcome = tokio::spawn(bench(url.clone(), schema.clone())).await;
        let client = connect(&url).await;
        client.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).await.unwrap();
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

async fn bench(url: String, schema: String) {
    let secret = b"bench secret, 32 bytes long.....";
    let tier =
        || PostgresTier::builder(url.as_str()).schema(schema.as_str()).pool_size(2).warm_on_start(0).build().unwrap();
    tier().migrate().await.unwrap();
    let authorizer = |_: Principal, _: Permission| async { Ok::<_, BoxError>(Decision::allow()) };
    let writer = AuthzCache::builder(authorizer).secret(secret).l3(tier()).build();
    let reader = AuthzCache::builder(authorizer).secret(secret).l1_max_bytes(0).l3(tier()).build();
    let (bob, read) = (Principal::new("bob"), Permission::new("documents:1", "read"));
    writer.check(&bob, &read).await.unwrap();
    // Wait for the write-behind to land the row.
    let deadline = Instant::now() + Duration::from_secs(10);
    while writer.stats().tiers.l3.unwrap().writes < 1 {
        assert!(Instant::now() < deadline, "the write-behind did not write the row");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let client = connect(&url).await;
    let key: Vec<u8> =
        client.query_one(&format!("SELECT key FROM {schema}.authz_cache_entries"), &[]).await.unwrap().get(0);
    let stmt = client.prepare(&format!("SELECT value FROM {schema}.authz_cache_entries WHERE key = $1")).await.unwrap();
    // Warm up.
    for _ in 0..2000 {
        assert!(reader.check(&bob, &read).await.unwrap().is_allowed());
        let _: Vec<u8> = client.query_one(&stmt, &[&key]).await.unwrap().get(0);
    }
    let hits_before = reader.stats().tiers.l3.unwrap().hits;
    let (mut l3, mut select) = (Vec::with_capacity(SAMPLES), Vec::with_capacity(SAMPLES));
    for _ in 0..SAMPLES {
        let t = Instant::now();
        let d = reader.check(&bob, &read).await.unwrap();
        l3.push(t.elapsed());
        assert!(d.is_allowed());
        let t = Instant::now();
        let _: Vec<u8> = client.query_one(&stmt, &[&key]).await.unwrap().get(0);
        select.push(t.elapsed());
    }
    let hits = reader.stats().tiers.l3.unwrap().hits - hits_before;
    assert_eq!(hits as usize, SAMPLES, "every sample was an l3 hit");
    let (l3_50, l3_99, sel_50, sel_99) =
        (pct(&mut l3, 0.5), pct(&mut l3, 0.99), pct(&mut select, 0.5), pct(&mut select, 0.99));
    println!("{SAMPLES} samples each, interleaved");
    println!("raw SELECT round trip : p50 {sel_50:8.1} us   p99 {sel_99:8.1} us");
    println!("L3 hit via check()    : p50 {l3_50:8.1} us   p99 {l3_99:8.1} us");
    println!("ratio (L3 / SELECT)   : p50 {:8.2}x      p99 {:8.2}x", l3_50 / sel_50, l3_99 / sel_99);
}
