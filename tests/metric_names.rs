//! Every metric the Grafana dashboard and the alert rules use exists in the exposition, from the
//! crate's own renderer and (feature `metrics`) from the `metrics` facade. The expositions are
//! also written to `target/metrics-*.txt` for `promtool check metrics` (CI runs it).
#![cfg(feature = "redis")]

mod support;

use std::collections::BTreeSet;

use support::redis::{Namespace, SECRET};
use tower_authz_cache::{AuthzCache, BoxError, Decision, Invalidation, Permission, Principal, RedisTier};

/// `authz_cache_*` names in a text, with `_bucket`/`_sum`/`_count` suffixes kept as written.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("authz_cache_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase() || bytes[end].is_ascii_digit() || bytes[end] == b'_')
        {
            end += 1;
        }
        out.insert(text[start..end].to_owned());
        i = end;
    }
    out
}

fn used_by_dashboards_and_rules() -> BTreeSet<String> {
    let root = env!("CARGO_MANIFEST_DIR");
    let dashboard = std::fs::read_to_string(format!("{root}/examples/monitoring/grafana-dashboard.json")).unwrap();
    let rules = std::fs::read_to_string(format!("{root}/examples/monitoring/prometheus-alerts.yml")).unwrap();
    let mut names = names_in(&dashboard);
    names.extend(names_in(&rules));
    names
}

fn families(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

async fn busy_cache(ns: &Namespace) -> AuthzCache {
    let cache = AuthzCache::builder(|p: Principal, _: Permission| async move {
        Ok::<_, BoxError>(Decision::from_bool(p.id() != "mallory"))
    })
    .l2(RedisTier::builder(support::redis::url(), SECRET).namespace(&ns.0).build().unwrap())
    .build();
    support::redis::wait_trusted(&cache).await;
    for who in ["alice", "bob", "mallory", "alice", "bob"] {
        cache.check(&Principal::new(who), &Permission::new("documents:1", "read")).await.unwrap();
    }
    cache.invalidate(&Invalidation::principal("bob")).await.unwrap();
    cache
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_rules_use_is_exposed() {
    support::redis::addr();
    let used = used_by_dashboards_and_rules();
    assert!(used.len() >= 15, "the dashboard and rules use the metric families: {used:?}");
    let ns = Namespace::new("metric-names");
    let cache = busy_cache(&ns).await;
    let own = cache.stats().to_prometheus();
    std::fs::write(format!("{}/metrics-own.txt", target_dir()), &own).unwrap();
    let exposed = families(&own);
    let missing: Vec<_> = used.iter().filter(|n| !exposed.contains(*n)).collect();
    assert!(missing.is_empty(), "used but not exposed: {missing:?}\n{own}");

    #[cfg(feature = "metrics")]
    {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder).expect("the only recorder in this test binary");
        cache.check(&Principal::new("carol"), &Permission::new("documents:2", "read")).await.unwrap();
        for _ in 0..8 {
            cache.check(&Principal::new("carol"), &Permission::new("documents:2", "read")).await.unwrap();
        }
        cache.export_metrics();
        let facade = handle.render();
        std::fs::write(format!("{}/metrics-facade.txt", target_dir()), &facade).unwrap();
        let exposed = families(&facade);
        let missing: Vec<_> = used.iter().filter(|n| !exposed.contains(*n)).collect();
        assert!(missing.is_empty(), "used but not exported through the facade: {missing:?}\n{facade}");
    }
}

fn target_dir() -> String {
    std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| format!("{}/target", env!("CARGO_MANIFEST_DIR")))
}
