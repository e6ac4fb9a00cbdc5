//! Refresh-ahead on a hot key, measured in the same run: the latency of a key read every
//! 0.5 ms for 4 s, across 20 ttl boundaries, with and without refresh-ahead, and what it costs
//! the authorizer.
//!
//! ```text
//! cargo bench --bench refresh
//! ```
//!
//! L1 only; the authorizer answers after 2 ms (a remote policy engine). ttl 200 ms; refresh-ahead
//! 0.2 (the last 40 ms). Without refresh-ahead, the first check after each ttl waits for the
//! authorizer; with it, a hit in the last 40 ms recomputes the entry in the background.

use std::time::{Duration, Instant};

use tower_authz_cache::{AuthzCache, BoxError, Decision, Permission, Principal};

const TTL: Duration = Duration::from_millis(200);
const RUN: Duration = Duration::from_secs(4);
const EVERY: Duration = Duration::from_micros(500);

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        println!(
            "| refresh-ahead | checks | p50 µs | p99 µs | p99.9 µs | max µs | checks over 1 ms | authorizer calls |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
        for fraction in [0.0, 0.2] {
            let cache = AuthzCache::builder(|_: Principal, _: Permission| async {
                tokio::time::sleep(Duration::from_millis(2)).await;
                Ok::<_, BoxError>(Decision::allow())
            })
            .allow_ttl(TTL)
            .refresh_ahead(fraction)
            .build();
            let (bob, read) = (Principal::new("bob"), Permission::new("documents:1", "read"));
            cache.check(&bob, &read).await.unwrap();
            let mut samples = Vec::new();
            let start = Instant::now();
            let mut next = start;
            while start.elapsed() < RUN {
                let t = Instant::now();
                assert!(cache.check(&bob, &read).await.unwrap().is_allowed());
                samples.push(t.elapsed());
                next += EVERY;
                tokio::time::sleep_until(next.into()).await;
            }
            samples.sort();
            let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)].as_secs_f64() * 1e6;
            let slow = samples.iter().filter(|d| **d > Duration::from_millis(1)).count();
            let label = if fraction == 0.0 { "off".to_owned() } else { format!("{fraction}") };
            println!(
                "| {label} | {} | {:.1} | {:.1} | {:.0} | {:.0} | {slow} | {} |",
                samples.len(),
                at(0.5),
                at(0.99),
                at(0.999),
                samples.last().unwrap().as_secs_f64() * 1e6,
                cache.stats().authorizer_calls
            );
        }
    });
}
