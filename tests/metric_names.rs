//! Every metric the Grafana dashboard and the alert rules use exists in the exposition, from the
//! crate's own renderer and (feature `metrics`) from the `metrics` facade; so does every `tier`
//! they select (`tier="l3"` must have a series, not only the family). The cache has L2 on Redis
//! and, with the `postgres` feature, L3 on Postgres. The expositions are also written to
//! `target/metrics-*.txt` for `promtool check metrics` (CI runs it).
#![cfg(feature = "redis")]

mod support;

use std::collections::BTreeSet;

#[cfg(feature = "postgres")]
use tower_authz_cache::PostgresTier;

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

/// `(name, tier)` for every `authz_cache_*{...tier="..."...}` selector in a text (quotes may be
/// escaped, as in JSON): the name as written, the tier an equality matcher selects.
fn tiers_in(text: &str) -> BTreeSet<(String, String)> {
    let text = text.replace("\\\"", "\"");
    let mut out = BTreeSet::new();
    for name in names_in(&text) {
        let mut rest = text.as_str();
        while let Some(pos) = rest.find(&format!("{name}{{")) {
            let after = &rest[pos + name.len() + 1..];
            let Some(end) = after.find('}') else { break };
            for matcher in after[..end].split(',') {
                if let Some(tier) = matcher.trim().strip_prefix("tier=\"").and_then(|t| t.strip_suffix('"')) {
                    out.insert((name.clone(), tier.to_owned()));
                }
            }
            rest = &after[end..];
        }
    }
    out
}

fn dashboard_and_rules() -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let dashboard = std::fs::read_to_string(format!("{root}/examples/monitoring/grafana-dashboard.json")).unwrap();
    let rules = std::fs::read_to_string(format!("{root}/examples/monitoring/prometheus-alerts.yml")).unwrap();
    format!("{dashboard}\n{rules}")
}

/// Families that exist only with L3 (feature `postgres`).
const L3_ONLY: &[&str] = &[
    "authz_cache_swept_rows_total",
    "authz_cache_change_feed_invalidations_total",
    "authz_cache_change_feed_caught_up",
    "authz_cache_change_feed_behind_seconds",
];

/// The names and `(name, tier)` selectors the dashboard and rules use; without the `postgres`
/// feature the cache has no L3, so L3's series are not required.
fn used_by_dashboards_and_rules() -> (BTreeSet<String>, BTreeSet<(String, String)>) {
    let text = dashboard_and_rules();
    let (mut names, mut tiers) = (names_in(&text), tiers_in(&text));
    if cfg!(not(feature = "postgres")) {
        names.retain(|n| !L3_ONLY.contains(&n.as_str()));
        tiers.retain(|(_, tier)| tier != "l3");
    }
    (names, tiers)
}

/// The `(name, labels)` of every sample of an exposition.
fn series(exposition: &str) -> Vec<(String, String)> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, _value) = l.rsplit_once(' ')?;
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            Some((name.to_owned(), labels.trim_end_matches('}').to_owned()))
        })
        .collect()
}

/// What the dashboard and rules use that the exposition lacks: names, then `name{tier="..."}`.
fn missing(exposition: &str, names: &BTreeSet<String>, tiers: &BTreeSet<(String, String)>) -> Vec<String> {
    let exposed = families(exposition);
    let series = series(exposition);
    let mut missing: Vec<String> = names.iter().filter(|n| !exposed.contains(*n)).cloned().collect();
    for (name, tier) in tiers {
        let matcher = format!("tier=\"{tier}\"");
        if !series.iter().any(|(n, labels)| n == name && labels.split(',').any(|l| l == matcher)) {
            missing.push(format!("{name}{{{matcher}}}"));
        }
    }
    missing
}

fn families(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// Where the cache keeps its shared entries: a Redis namespace and, with `postgres`, a schema;
/// both removed on drop.
struct Shared {
    ns: Namespace,
    #[cfg(feature = "postgres")]
    schema: support::pg::Schema,
}

impl Shared {
    fn new() -> Self {
        Self {
            ns: Namespace::new("metric-names"),
            #[cfg(feature = "postgres")]
            schema: support::pg::Schema::new("metric_names"),
        }
    }
}

async fn busy_cache(shared: &Shared) -> AuthzCache {
    #[cfg_attr(not(feature = "postgres"), allow(unused_mut))]
    let mut builder = AuthzCache::builder(|p: Principal, _: Permission| async move {
        Ok::<_, BoxError>(Decision::from_bool(p.id() != "mallory"))
    })
    .secret(SECRET)
    .l2(RedisTier::builder(support::redis::url()).namespace(&shared.ns.0).build().unwrap());
    #[cfg(feature = "postgres")]
    {
        let _ = support::pg::client().await; // fails with instructions when Postgres is down
        let l3 = PostgresTier::builder(support::pg::url()).schema(&shared.schema.0).build().unwrap();
        l3.migrate_with_reference_rbac().await.expect("migrations apply");
        builder = builder.secret(SECRET).l3(l3);
    }
    let cache = builder.build();
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
    let (used, tiers) = used_by_dashboards_and_rules();
    assert!(used.len() >= 15, "the dashboard and rules use the metric families: {used:?}");
    #[cfg(feature = "postgres")]
    {
        assert!(L3_ONLY.iter().all(|n| used.contains(*n)), "the dashboard shows the L3-only families: {used:?}");
        for name in ["authz_cache_hits_total", "authz_cache_breaker_state", "authz_cache_tier_read_duration_seconds"] {
            assert!(tiers.contains(&(name.to_owned(), "l3".to_owned())), "{name}{{tier=\"l3\"}} is used: {tiers:?}");
        }
    }
    let shared = Shared::new();
    let cache = busy_cache(&shared).await;
    #[cfg(feature = "postgres")]
    assert!(cache.stats().tiers.l3.is_some(), "the cache has L3");
    let own = cache.stats().to_prometheus();
    std::fs::write(format!("{}/metrics-own.txt", target_dir()), &own).unwrap();
    let missing_own = missing(&own, &used, &tiers);
    assert!(missing_own.is_empty(), "used but not exposed: {missing_own:?}\n{own}");

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
        let missing_facade = missing(&facade, &used, &tiers);
        assert!(missing_facade.is_empty(), "used but not exported through the facade: {missing_facade:?}\n{facade}");
    }
}

fn target_dir() -> String {
    std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| format!("{}/target", env!("CARGO_MANIFEST_DIR")))
}
