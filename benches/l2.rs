//! L2-hit latency through the cache (in process, loopback Redis) next to a raw `GET` round trip
//! on the same Redis, measured interleaved in the same run.
//!
//! ```text
//! cargo bench --bench l2            # REDIS_URL, default redis://127.0.0.1:6379
//! ```
//!
//! Each L2 sample is one `AuthzCache::check` whose L1 cannot hold anything (a zero-byte L1), so
//! every check reads Redis: one `MGET` of the entry and its four epochs, MAC verification,
//! deadline and epoch checks. The raw sample is one `GET` of a key of the same size on a
//! pooled connection of the same kind. Percentiles are over 20,000 samples each.

use std::time::{Duration, Instant};

use tower_authz_cache::{AuthzCache, BoxError, Decision, Permission, Principal, RedisTier};

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
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let ns = format!("bench-l2-{}", std::process::id());
        let secret = b"bench secret, 32 bytes long.....";
        let authorizer = |_: Principal, _: Permission| async { Ok::<_, BoxError>(Decision::allow()) };
        let writer = AuthzCache::builder(authorizer)
            .secret(secret)
            .l2(RedisTier::builder(url.as_str()).namespace(ns.as_str()).build().unwrap())
            .build();
        let reader = AuthzCache::builder(authorizer)
            .secret(secret)
            .l1_max_bytes(0)
            .l2(RedisTier::builder(url.as_str()).namespace(ns.as_str()).build().unwrap())
            .build();
        let (bob, read) = (Principal::new("bob"), Permission::new("documents:1", "read"));
        writer.check(&bob, &read).await.unwrap();
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut raw = client.get_multiplexed_async_connection().await.unwrap();
        let raw_key = format!("{ns}:raw");
        let _: () = redis::cmd("SET").arg(&raw_key).arg(vec![0u8; 78]).query_async(&mut raw).await.unwrap();
        // Wait for the backplane and the write-behind, then warm up.
        tokio::time::sleep(Duration::from_millis(500)).await;
        for _ in 0..2000 {
            reader.check(&bob, &read).await.unwrap();
            let _: Vec<u8> = redis::cmd("GET").arg(&raw_key).query_async(&mut raw).await.unwrap();
        }
        let hits_before = reader.stats().tiers.l2.unwrap().hits;
        let (mut l2, mut get) = (Vec::with_capacity(SAMPLES), Vec::with_capacity(SAMPLES));
        for _ in 0..SAMPLES {
            let t = Instant::now();
            let d = reader.check(&bob, &read).await.unwrap();
            l2.push(t.elapsed());
            assert!(d.is_allowed());
            let t = Instant::now();
            let _: Vec<u8> = redis::cmd("GET").arg(&raw_key).query_async(&mut raw).await.unwrap();
            get.push(t.elapsed());
        }
        let hits = reader.stats().tiers.l2.unwrap().hits - hits_before;
        assert_eq!(hits as usize, SAMPLES, "every sample was an l2 hit");
        let (l2_50, l2_99, get_50, get_99) =
            (pct(&mut l2, 0.5), pct(&mut l2, 0.99), pct(&mut get, 0.5), pct(&mut get, 0.99));
        println!("{SAMPLES} samples each, interleaved");
        println!("raw GET round trip : p50 {get_50:8.1} us   p99 {get_99:8.1} us");
        println!("L2 hit via check() : p50 {l2_50:8.1} us   p99 {l2_99:8.1} us");
        println!(
            "ratio (L2 / GET)   : p50 {:8.2}x      p99 {:8.2}x   (target p99 < 3x)",
            l2_50 / get_50,
            l2_99 / get_99
        );
        let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{ns}*")).query_async(&mut raw).await.unwrap();
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL").arg(keys).query_async(&mut raw).await.unwrap();
        }
    });
}
