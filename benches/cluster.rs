//! L2 on a Redis Cluster, on a cluster of the bench's own (3 masters + 3 replicas from
//! `redis-server` binaries on loopback ports, torn down afterwards):
//! - an L2 hit through the cache next to a raw `GET` on the same cluster (same kind of cluster
//!   connection), interleaved in the same run, p50/p99 and their ratio;
//! - the invalidation delay across instances: from the start of `invalidate` on one instance to
//!   the other instance, subscribed through another node, hearing it; p50/p99 over 1,000 trials.
//!
//! ```text
//! cargo bench --bench cluster
//! ```

#[path = "../tests/support/faults.rs"]
mod faults;

#[allow(dead_code)]
#[path = "../tests/support/cluster.rs"]
mod cluster;

use std::time::{Duration, Instant};

use tower_authz_cache::{AuthzCache, BoxError, Decision, Invalidation, Permission, Principal, RedisClusterTier};

const SAMPLES: usize = 20_000;
const TRIALS: usize = 1_000;

fn pct(samples: &mut [Duration], q: f64) -> f64 {
    samples.sort();
    samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)].as_secs_f64() * 1e6
}

fn tier(nodes: Vec<String>, ns: &str) -> RedisClusterTier {
    RedisClusterTier::builder(nodes).namespace(ns).build().expect("valid tier")
}

fn heard(cache: &AuthzCache) -> u64 {
    cache.stats().backplane.map_or(0, |b| b.invalidations)
}

fn main() {
    // `cargo test --benches` runs this with `--bench` absent: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let cluster = cluster::OwnedCluster::start();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let secret = b"bench secret, 32 bytes long.....";
        let authorizer = |_: Principal, _: Permission| async { Ok::<_, BoxError>(Decision::allow()) };
        let writer = AuthzCache::builder(authorizer).secret(secret).l2(tier(cluster.urls_from(0), "bench")).build();
        let reader = AuthzCache::builder(authorizer)
            .secret(secret)
            .l1_max_bytes(0)
            .l2(tier(cluster.urls_from(3), "bench"))
            .build();
        let (bob, read) = (Principal::new("bob"), Permission::new("documents:1", "read"));
        writer.check(&bob, &read).await.unwrap();
        let client = redis::cluster::ClusterClient::new(cluster.urls()).unwrap();
        let mut raw = client.get_async_connection().await.unwrap();
        let _: () = redis::cmd("SET").arg("bench:raw").arg(vec![0u8; 78]).query_async(&mut raw).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        for _ in 0..2000 {
            reader.check(&bob, &read).await.unwrap();
            let _: Vec<u8> = redis::cmd("GET").arg("bench:raw").query_async(&mut raw).await.unwrap();
        }
        let hits_before = reader.stats().tiers.l2.unwrap().hits;
        let (mut l2, mut get) = (Vec::with_capacity(SAMPLES), Vec::with_capacity(SAMPLES));
        for _ in 0..SAMPLES {
            let t = Instant::now();
            let d = reader.check(&bob, &read).await.unwrap();
            l2.push(t.elapsed());
            assert!(d.is_allowed());
            let t = Instant::now();
            let _: Vec<u8> = redis::cmd("GET").arg("bench:raw").query_async(&mut raw).await.unwrap();
            get.push(t.elapsed());
        }
        let hits = reader.stats().tiers.l2.unwrap().hits - hits_before;
        assert_eq!(hits as usize, SAMPLES, "every sample was an l2 hit");
        let (l2_50, l2_99, get_50, get_99) =
            (pct(&mut l2, 0.5), pct(&mut l2, 0.99), pct(&mut get, 0.5), pct(&mut get, 0.99));
        println!("{SAMPLES} samples each, interleaved, on a 3 + 3 cluster");
        println!("raw GET round trip : p50 {get_50:8.1} us   p99 {get_99:8.1} us");
        println!("L2 hit via check() : p50 {l2_50:8.1} us   p99 {l2_99:8.1} us");
        println!("ratio (L2 / GET)   : p50 {:8.2}x      p99 {:8.2}x", l2_50 / get_50, l2_99 / get_99);

        // Invalidation delay: A invalidates, B (subscribed through another node) hears it.
        let a = AuthzCache::builder(authorizer).secret(secret).l2(tier(cluster.urls_from(0), "delay")).build();
        let b = AuthzCache::builder(authorizer).secret(secret).l2(tier(cluster.urls_from(4), "delay")).build();
        for c in [&a, &b] {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !c.stats().backplane.is_some_and(|bp| bp.l1_trusted) {
                assert!(Instant::now() < deadline, "backplane never trusted");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let mut delays = Vec::with_capacity(TRIALS);
        let mut acks = Vec::with_capacity(TRIALS);
        for i in 0..TRIALS {
            let before = heard(&b);
            let who = format!("user-{i}");
            let t = Instant::now();
            a.invalidate(&Invalidation::Principal(who)).await.expect("confirmed");
            acks.push(t.elapsed());
            while heard(&b) == before {
                assert!(t.elapsed() < Duration::from_secs(5), "b never heard trial {i}");
                tokio::task::yield_now().await;
            }
            delays.push(t.elapsed());
        }
        let (d50, d99) = (pct(&mut delays, 0.5), pct(&mut delays, 0.99));
        let (a50, a99) = (pct(&mut acks, 0.5), pct(&mut acks, 0.99));
        println!("invalidate() confirmed (bump, WAIT, high water) ({TRIALS} trials): p50 {a50:8.1} us   p99 {a99:8.1} us");
        println!(
            "invalidation heard by the other instance ({TRIALS} trials): p50 {d50:8.1} us   p99 {d99:8.1} us (includes WAIT for a replica)"
        );
    });
}
