//! L1 stays within its byte bound with 1M distinct keys, and the bound is honest: resident
//! memory grows by about what the weigher charges. Runs alone in its own process so resident
//! memory is meaningful.

use std::time::Duration;

use tower_authz_cache::{AuthzCache, BoxError, Decision, Permission, Principal};

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("linux /proc");
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("statm field");
    pages * 4096
}

#[tokio::test]
async fn one_million_distinct_keys_stay_within_the_l1_bound() {
    const BOUND: u64 = 32 << 20;
    let cache = AuthzCache::builder(|_: Principal, _: Permission| async { Ok::<_, BoxError>(Decision::allow()) })
        .l1_max_bytes(BOUND)
        .allow_ttl(Duration::from_secs(3600))
        .build();
    let before = resident_bytes();
    let mut peak_bytes = 0;
    for i in 0..1_000_000u32 {
        let p = Principal::new(format!("user-{i}"));
        let perm = Permission::new(format!("documents:{}", i % 5000), "read");
        assert!(cache.check(&p, &perm).await.unwrap().is_allowed());
        if i % 100_000 == 99_999 {
            let l1 = cache.stats().tiers.l1;
            assert!(l1.bytes <= BOUND, "after {i} inserts: {l1:?}");
            peak_bytes = peak_bytes.max(l1.bytes);
        }
    }
    let l1 = cache.stats().tiers.l1;
    let grown = resident_bytes().saturating_sub(before);
    println!("l1: {l1:?}; resident growth {} MiB for a {} MiB bound", grown >> 20, BOUND >> 20);
    assert!(l1.bytes <= BOUND);
    assert!(l1.entries > 10_000 && l1.entries < 1_000_000, "{l1:?}");
    assert!(peak_bytes > BOUND / 2, "the cache was actually filled: {peak_bytes}");
    // Resident growth includes allocator slack, the runtime and epoch/stat tables; it must stay
    // within a small multiple of the bound, never grow with the number of keys inserted.
    assert!(grown < 2 * BOUND, "resident memory grew {grown} bytes for a {BOUND} byte bound");
}
