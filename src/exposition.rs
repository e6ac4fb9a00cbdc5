//! The metric families, in one table shared by [`StatsSnapshot::to_prometheus`] and the `metrics`
//! facade export (feature `metrics`): names and labels follow Prometheus conventions, so a
//! dashboard or an alert rule works on either.
//!
//! | name | type | labels |
//! |---|---|---|
//! | `authz_cache_hits_total`, `authz_cache_misses_total` | counter | `tier` (`l1`, `l2`, `l3`) |
//! | `authz_cache_expired_total`, `authz_cache_stale_total` | counter | `tier` (`l1`, `l2`, `l3`) |
//! | `authz_cache_rejected_entries_total`, `authz_cache_tier_errors_total`, `authz_cache_write_drops_total` | counter | `tier` (`l2`, `l3`) |
//! | `authz_cache_swept_rows_total` | counter | `tier="l3"` |
//! | `authz_cache_breaker_opens_total` | counter | `tier` (`l2`, `l3`) |
//! | `authz_cache_breaker_state` | gauge, 0 closed / 1 half-open / 2 open | `tier` (`l2`, `l3`) |
//! | `authz_cache_owed_invalidations` | gauge | `tier` (`l2`, `l3`) |
//! | `authz_cache_authorizer_calls_total`, `authz_cache_authorizer_errors_total` | counter | |
//! | `authz_cache_single_flight_joins_total`, `authz_cache_undecided_total` | counter | |
//! | `authz_cache_plugin_panics_total` | counter | |
//! | `authz_cache_invalidations_total` | counter | `scope` |
//! | `authz_cache_consistency_tokens_total` | counter | `outcome` (`applied`, `refused`) |
//! | `authz_cache_consistency_audits_total` | counter | `outcome` (`checked`, `dropped`) |
//! | `authz_cache_consistency_mismatches_total` | counter | `tier` (`l1`, and `l2`, `l3` when configured) |
//! | `authz_cache_consistency_audit_invalidations_total` | counter | |
//! | `authz_cache_grace_answers_total` | counter | |
//! | `authz_cache_refreshes_total` | counter | `outcome` (`kept`, `discarded`) |
//! | `authz_cache_change_feed_invalidations_total` | counter | |
//! | `authz_cache_change_feed_caught_up`, `authz_cache_change_feed_behind_seconds` | gauge | |
//! | `authz_cache_warmed_entries_total` | counter | |
//! | `authz_cache_entries`, `authz_cache_size_bytes`, `authz_cache_max_size_bytes` | gauge | `tier="l1"` |
//! | `authz_cache_backplane_connected`, `authz_cache_backplane_l1_trusted` | gauge | |
//! | `authz_cache_backplane_silence_seconds` | gauge | |
//! | `authz_cache_check_duration_seconds` | summary | `path` (`l1_hit`, `miss`) |
//! | `authz_cache_tier_read_duration_seconds` | summary | `tier` (`l2`, `l3`) |
//! | `authz_cache_authorizer_duration_seconds` | summary | |
//!
//! A remote tier's series (`tier="l2"`, `tier="l3"`) are there only when that tier is configured,
//! the backplane's only with a backplane, `authz_cache_change_feed_*` (the scopes the durable
//! change feed applied, whether it is caught up, how long since it was last seen caught up) only
//! with L3.
//! `authz_cache_swept_rows_total` counts the expired L3 rows the sweeper removed,
//! `authz_cache_warmed_entries_total` the entries loaded into L1 by warming.
//!
//! [`StatsSnapshot::to_prometheus`]: crate::StatsSnapshot::to_prometheus

use std::fmt::Write as _;

use crate::stats::RemoteTierSnapshot;
use crate::{BreakerState, StatsSnapshot};

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Counter,
    Gauge,
}

pub(crate) struct Row {
    pub(crate) name: &'static str,
    pub(crate) help: &'static str,
    pub(crate) kind: Kind,
    pub(crate) labels: &'static [(&'static str, &'static str)],
    pub(crate) value: f64,
}

const L1: &[(&str, &str)] = &[("tier", "l1")];
const L2: &[(&str, &str)] = &[("tier", "l2")];
const L3: &[(&str, &str)] = &[("tier", "l3")];
const NONE: &[(&str, &str)] = &[];

/// The help of the families every tier has.
const HITS: &str = "Reads answered by a tier.";
const MISSES: &str = "Reads a tier could not answer.";
const EXPIRED: &str = "Entries found past their deadline.";
const STALE: &str = "Entries found invalidated.";

/// The latency summaries' names.
pub(crate) const CHECK_DURATION: &str = "authz_cache_check_duration_seconds";
pub(crate) const TIER_READ_DURATION: &str = "authz_cache_tier_read_duration_seconds";
pub(crate) const AUTHORIZER_DURATION: &str = "authz_cache_authorizer_duration_seconds";

fn breaker_value(state: BreakerState) -> f64 {
    match state {
        BreakerState::Closed => 0.0,
        BreakerState::HalfOpen => 1.0,
        _ => 2.0,
    }
}

/// The counters and gauges of one remote tier, with `authz_cache_swept_rows_total` when it
/// `sweeps`. Every row carries its family's help: a family's first row may come from either tier.
fn remote_rows(labels: &'static [(&'static str, &'static str)], t: &RemoteTierSnapshot, sweeps: bool) -> Vec<Row> {
    let row = |name, help, kind, value: u64| Row { name, help, kind, labels, value: value as f64 };
    use Kind::{Counter, Gauge};
    let mut rows = vec![
        row("authz_cache_hits_total", HITS, Counter, t.hits),
        row("authz_cache_misses_total", MISSES, Counter, t.misses),
        row("authz_cache_expired_total", EXPIRED, Counter, t.expired),
        row("authz_cache_stale_total", STALE, Counter, t.stale),
        row(
            "authz_cache_rejected_entries_total",
            "Shared entries that failed verification (security events).",
            Counter,
            t.rejected,
        ),
        row("authz_cache_tier_errors_total", "Remote reads that failed or were skipped.", Counter, t.errors),
        row("authz_cache_write_drops_total", "Background writes dropped on a full queue.", Counter, t.write_drops),
        row("authz_cache_breaker_opens_total", "Times a tier's circuit breaker opened.", Counter, t.breaker_opens),
        Row {
            name: "authz_cache_owed_invalidations",
            help: "Invalidations this instance owes a tier (not recorded there yet; the tier is not read meanwhile).",
            kind: Gauge,
            labels,
            value: t.owed as f64,
        },
        Row {
            name: "authz_cache_breaker_state",
            help: "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            kind: Gauge,
            labels,
            value: breaker_value(t.breaker),
        },
    ];
    if sweeps {
        rows.push(row("authz_cache_swept_rows_total", "Expired rows removed by a tier's sweeper.", Counter, t.swept));
    }
    rows
}

/// Every counter and gauge of a snapshot.
pub(crate) fn rows(s: &StatsSnapshot) -> Vec<Row> {
    let row = |name, help, kind, labels, value: u64| Row { name, help, kind, labels, value: value as f64 };
    use Kind::{Counter, Gauge};
    let l1 = &s.tiers.l1;
    let mut rows = vec![
        row("authz_cache_hits_total", HITS, Counter, L1, l1.hits),
        row("authz_cache_misses_total", MISSES, Counter, L1, l1.misses),
        row("authz_cache_expired_total", EXPIRED, Counter, L1, l1.expired),
        row("authz_cache_stale_total", STALE, Counter, L1, l1.stale),
    ];
    // Redis expires its keys by itself: only L3 has a sweeper.
    for (labels, t, sweeps) in [(L2, s.tiers.l2, false), (L3, s.tiers.l3, true)] {
        if let Some(t) = t {
            rows.extend(remote_rows(labels, &t, sweeps));
        }
    }
    let inv = &s.invalidations;
    rows.extend([
        row("authz_cache_authorizer_calls_total", "Calls made to the authorizer.", Counter, NONE, s.authorizer_calls),
        row(
            "authz_cache_authorizer_errors_total",
            "Authorizer calls that failed, timed out or panicked.",
            Counter,
            NONE,
            s.authorizer_errors,
        ),
        row(
            "authz_cache_single_flight_joins_total",
            "Requests that waited for another request's authorizer call.",
            Counter,
            NONE,
            s.single_flight_joins,
        ),
        row("authz_cache_undecided_total", "Checks that could not be decided (503).", Counter, NONE, s.undecided),
        row(
            "authz_cache_plugin_panics_total",
            "Requests answered 503 because the principal resolver or permission mapper panicked.",
            Counter,
            NONE,
            s.plugin_panics,
        ),
        row(
            "authz_cache_invalidations_total",
            "Invalidations applied, by scope.",
            Counter,
            &[("scope", "principal")],
            inv.principal,
        ),
        row("authz_cache_invalidations_total", "", Counter, &[("scope", "resource")], inv.resource),
        row("authz_cache_invalidations_total", "", Counter, &[("scope", "entry")], inv.entry),
        row("authz_cache_invalidations_total", "", Counter, &[("scope", "all")], inv.all),
        row(
            "authz_cache_consistency_tokens_total",
            "Consistency tokens checks required, by outcome (refused: unauthentic or from the future).",
            Counter,
            &[("outcome", "applied")],
            s.tokens_applied,
        ),
        row("authz_cache_consistency_tokens_total", "", Counter, &[("outcome", "refused")], s.tokens_refused),
        row(
            "authz_cache_consistency_audits_total",
            "Served decisions the consistency auditor asked the authorizer again (dropped: over its load cap).",
            Counter,
            &[("outcome", "checked")],
            s.audit.audits,
        ),
        row("authz_cache_consistency_audits_total", "", Counter, &[("outcome", "dropped")], s.audit.dropped),
        row(
            "authz_cache_consistency_mismatches_total",
            "Audited decisions the authorizer disagreed with and no invalidation explained, by the tier that served them.",
            Counter,
            L1,
            s.audit.mismatches_l1,
        ),
        row(
            "authz_cache_consistency_audit_invalidations_total",
            "Entries the consistency auditor ended after a mismatch.",
            Counter,
            NONE,
            s.audit.invalidated,
        ),
        row(
            "authz_cache_grace_answers_total",
            "Decisions answered past their ttl, within grace, because the authorizer failed.",
            Counter,
            NONE,
            s.grace_answers,
        ),
        row(
            "authz_cache_refreshes_total",
            "Refresh-ahead recomputations, by outcome (discarded: raced by an invalidation, or the authorizer failed).",
            Counter,
            &[("outcome", "kept")],
            s.refreshes,
        ),
        row("authz_cache_refreshes_total", "", Counter, &[("outcome", "discarded")], s.refreshes_discarded),
    ]);
    // Mismatches by tier: a series for each configured tier (grouped with the l1 one).
    if s.tiers.l2.is_some() {
        rows.push(row("authz_cache_consistency_mismatches_total", "", Counter, L2, s.audit.mismatches_l2));
    }
    if s.tiers.l3.is_some() {
        rows.push(row("authz_cache_consistency_mismatches_total", "", Counter, L3, s.audit.mismatches_l3));
    }
    if s.tiers.l3.is_some() {
        rows.push(row(
            "authz_cache_change_feed_invalidations_total",
            "Principals invalidated by the Postgres change feed.",
            Counter,
            NONE,
            s.change_feed_invalidations,
        ));
    }
    if let Some(feed) = s.change_feed {
        rows.extend([
            row(
                "authz_cache_change_feed_caught_up",
                "Whether the change feed was seen caught up within max_staleness (else L1 and L2 are not read).",
                Gauge,
                NONE,
                u64::from(feed.caught_up),
            ),
            Row {
                name: "authz_cache_change_feed_behind_seconds",
                help: "Time since the change feed was last seen caught up.",
                kind: Gauge,
                labels: NONE,
                value: feed.behind_ms as f64 / 1000.0,
            },
        ]);
    }
    rows.extend([
        row("authz_cache_warmed_entries_total", "Entries loaded into L1 by warming.", Counter, NONE, s.warmed),
        row("authz_cache_entries", "Entries held by a tier.", Gauge, L1, l1.entries),
        row("authz_cache_size_bytes", "Weighted size held by a tier, in bytes.", Gauge, L1, l1.bytes),
        row("authz_cache_max_size_bytes", "The configured bound of a tier, in bytes.", Gauge, L1, l1.max_bytes),
    ]);
    #[cfg(any(feature = "redis", feature = "postgres"))]
    if let Some(b) = s.backplane {
        rows.extend([
            row(
                "authz_cache_backplane_connected",
                "Whether the backplane is subscribed.",
                Gauge,
                NONE,
                u64::from(b.connected),
            ),
            row(
                "authz_cache_backplane_l1_trusted",
                "Whether L1 is trusted (the backplane was heard within max_staleness).",
                Gauge,
                NONE,
                u64::from(b.l1_trusted),
            ),
            Row {
                name: "authz_cache_backplane_silence_seconds",
                help: "Time since the backplane was last heard.",
                kind: Gauge,
                labels: NONE,
                value: b.silent_for_ms as f64 / 1000.0,
            },
        ]);
    }
    rows
}

/// A summary family: name, help, and (labels, latency) per series.
type Summary<'a> = (&'static str, &'static str, Vec<(&'static str, &'a crate::LatencySnapshot)>);

/// Renders a snapshot in the Prometheus text exposition format (version 0.0.4).
pub(crate) fn render(s: &StatsSnapshot) -> String {
    let mut out = String::new();
    // A family's samples must be contiguous: group rows by name, in first-seen order.
    let mut families: Vec<(&'static str, Vec<Row>)> = Vec::new();
    for r in rows(s) {
        match families.iter_mut().find(|(name, _)| *name == r.name) {
            Some((_, members)) => members.push(r),
            None => families.push((r.name, vec![r])),
        }
    }
    for (name, members) in &families {
        let first = &members[0];
        let kind = if first.kind == Kind::Counter { "counter" } else { "gauge" };
        let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} {kind}", first.help);
        for r in members {
            let labels: Vec<String> = r.labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            let labels = if labels.is_empty() { String::new() } else { format!("{{{}}}", labels.join(",")) };
            let _ = writeln!(out, "{name}{labels} {}", r.value);
        }
    }
    let lat = &s.latency;
    let mut summaries: Vec<Summary<'_>> = vec![
        (
            CHECK_DURATION,
            "Latency of a cache check, by path (L1 hits sampled 1 in 8).",
            vec![("path=\"l1_hit\"", &lat.l1_hit), ("path=\"miss\"", &lat.miss)],
        ),
        (AUTHORIZER_DURATION, "Latency of one authorizer call.", vec![("", &lat.authorizer)]),
    ];
    let reads: Vec<_> =
        [("tier=\"l2\"", s.tiers.l2.is_some(), &lat.l2_read), ("tier=\"l3\"", s.tiers.l3.is_some(), &lat.l3_read)]
            .into_iter()
            .filter_map(|(labels, configured, l)| configured.then_some((labels, l)))
            .collect();
    if !reads.is_empty() {
        summaries.push((TIER_READ_DURATION, "Latency of one remote tier read.", reads));
    }
    for (name, help, series) in summaries {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} summary");
        for (labels, l) in series {
            let sep = if labels.is_empty() { "" } else { "," };
            for (q, v) in [("0.5", l.p50_us), ("0.95", l.p95_us), ("0.99", l.p99_us)] {
                let _ = writeln!(out, "{name}{{{labels}{sep}quantile=\"{q}\"}} {}", v / 1e6);
            }
            let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
            let _ = writeln!(out, "{name}_sum{braces} {}", l.sum_us / 1e6);
            let _ = writeln!(out, "{name}_count{braces} {}", l.count);
        }
    }
    out
}

/// Publishes a snapshot through the `metrics` facade: counters as absolute values, gauges set.
#[cfg(feature = "metrics")]
pub(crate) fn export(s: &StatsSnapshot) {
    static DESCRIBED: std::sync::Once = std::sync::Once::new();
    let rows = rows(s);
    DESCRIBED.call_once(|| {
        // Each family once, with the help of its first row.
        for (i, r) in rows.iter().enumerate() {
            if r.help.is_empty() || rows[..i].iter().any(|o| o.name == r.name) {
                continue;
            }
            match r.kind {
                Kind::Counter => ::metrics::describe_counter!(r.name, r.help),
                Kind::Gauge => ::metrics::describe_gauge!(r.name, r.help),
            }
        }
        ::metrics::describe_histogram!(CHECK_DURATION, ::metrics::Unit::Seconds, "Latency of a cache check, by path.");
        ::metrics::describe_histogram!(
            TIER_READ_DURATION,
            ::metrics::Unit::Seconds,
            "Latency of one remote tier read."
        );
        ::metrics::describe_histogram!(
            AUTHORIZER_DURATION,
            ::metrics::Unit::Seconds,
            "Latency of one authorizer call."
        );
    });
    for r in rows {
        let labels: Vec<::metrics::Label> = r.labels.iter().map(|(k, v)| ::metrics::Label::new(*k, *v)).collect();
        match r.kind {
            Kind::Counter => ::metrics::counter!(r.name, labels).absolute(r.value as u64),
            Kind::Gauge => ::metrics::gauge!(r.name, labels).set(r.value),
        }
    }
}

/// Records one L1 hit's latency under a key built at compile time: the hit path allocates
/// nothing (`record` builds its labels per call).
#[cfg(feature = "metrics")]
pub(crate) fn record_l1_hit(d: std::time::Duration) {
    static LABELS: [::metrics::Label; 1] = [::metrics::Label::from_static_parts("path", "l1_hit")];
    static KEY: ::metrics::Key = ::metrics::Key::from_static_parts(CHECK_DURATION, &LABELS);
    static METADATA: ::metrics::Metadata<'static> =
        ::metrics::Metadata::new(module_path!(), ::metrics::Level::INFO, Some(module_path!()));
    ::metrics::with_recorder(|r| r.register_histogram(&KEY, &METADATA)).record(d.as_secs_f64());
}

/// Records one latency sample through the `metrics` facade.
#[cfg(feature = "metrics")]
pub(crate) fn record(name: &'static str, labels: &[(&'static str, &'static str)], d: std::time::Duration) {
    let labels: Vec<::metrics::Label> = labels.iter().map(|(k, v)| ::metrics::Label::new(*k, *v)).collect();
    ::metrics::histogram!(name, labels).record(d.as_secs_f64());
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use crate::stats::{LatencySnapshot, RemoteTierSnapshot};
    use crate::{BreakerState, StatsSnapshot};

    fn remote(hits: u64, misses: u64, stale: u64, writes: u64, breaker: BreakerState) -> RemoteTierSnapshot {
        RemoteTierSnapshot {
            hits,
            misses,
            expired: 0,
            stale,
            rejected: 0,
            errors: 0,
            writes,
            write_errors: 0,
            write_drops: 0,
            swept: 0,
            breaker,
            breaker_opens: 0,
            call_errors: 0,
            call_timeouts: 0,
            calls_skipped: 0,
            warning: None,
            owed: 0,
        }
    }

    /// L1 and L2.
    fn snapshot() -> StatsSnapshot {
        let mut s = StatsSnapshot::default();
        s.tiers.l1.hits = 90;
        s.tiers.l1.misses = 10;
        s.tiers.l1.entries = 7;
        s.tiers.l1.bytes = 3584;
        s.tiers.l1.max_bytes = 1 << 20;
        s.tiers.l2 = Some(remote(4, 6, 1, 6, BreakerState::Closed));
        s.authorizer_calls = 6;
        s.invalidations.principal = 2;
        s.latency.l1_hit =
            LatencySnapshot { count: 11, p50_us: 0.3, p95_us: 0.5, p99_us: 0.9, max_us: 1.2, sum_us: 4.0 };
        s
    }

    /// L1, L2 and L3: every L3 counter distinct from the others, its breaker half-open.
    fn snapshot_with_l3() -> StatsSnapshot {
        let mut s = snapshot();
        s.tiers.l3 = Some(RemoteTierSnapshot {
            expired: 2,
            rejected: 1,
            errors: 3,
            write_errors: 1,
            write_drops: 5,
            swept: 12,
            breaker_opens: 1,
            call_errors: 2,
            call_timeouts: 1,
            calls_skipped: 0,
            warning: None,
            owed: 2,
            ..remote(3, 3, 0, 4, BreakerState::HalfOpen)
        });
        s.change_feed_invalidations = 8;
        s.warmed = 9;
        s.latency.l3_read =
            LatencySnapshot { count: 6, p50_us: 800.0, p95_us: 1500.0, p99_us: 2000.0, max_us: 2100.0, sum_us: 6000.0 };
        s
    }

    /// L1 and L3, no L2.
    fn snapshot_l3_only() -> StatsSnapshot {
        StatsSnapshot {
            tiers: crate::stats::TiersSnapshot { l2: None, ..snapshot_with_l3().tiers },
            ..snapshot_with_l3()
        }
    }

    /// Family name -> its samples (`name{labels}` -> value), checking the text's structure on
    /// the way: one HELP (not empty) and one TYPE per family, before its samples, which are
    /// contiguous.
    fn parse(text: &str) -> BTreeMap<String, BTreeMap<String, String>> {
        let mut families: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        let mut current = String::new();
        let mut closed = BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap();
                assert!(!help.is_empty(), "{name} has no help");
                assert!(!families.contains_key(name), "{name} declared twice");
                closed.insert(std::mem::replace(&mut current, name.to_owned()));
                families.insert(name.to_owned(), BTreeMap::new());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                assert_eq!(rest.split(' ').next(), Some(current.as_str()), "TYPE right after HELP");
            } else {
                let (series, value) = line.rsplit_once(' ').unwrap();
                let name = series.split('{').next().unwrap();
                let family = ["_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
                let family = if family == current { family } else { name };
                assert_eq!(family, current, "{line}: samples of a family are contiguous, after its HELP");
                assert!(!closed.contains(family));
                let previous = families.get_mut(family).unwrap().insert(series.to_owned(), value.to_owned());
                assert!(previous.is_none(), "{series} twice");
            }
        }
        families
    }

    #[test]
    fn metrics_text() {
        insta::assert_snapshot!(super::render(&snapshot()));
    }

    #[test]
    fn metrics_text_with_l3() {
        insta::assert_snapshot!(super::render(&snapshot_with_l3()));
    }

    #[test]
    fn stats_json() {
        insta::assert_json_snapshot!(snapshot());
    }

    #[test]
    fn stats_json_with_l3() {
        insta::assert_json_snapshot!(snapshot_with_l3());
    }

    #[test]
    fn every_family_with_an_l2_series_has_an_l3_series_when_l3_is_configured() {
        let families = parse(&super::render(&snapshot_with_l3()));
        let mut per_tier = 0;
        for (name, samples) in &families {
            if name == "authz_cache_swept_rows_total" {
                continue; // L3 only: Redis expires its keys by itself.
            }
            let l2: Vec<_> = samples.keys().filter(|s| s.contains("tier=\"l2\"")).collect();
            let l3: Vec<_> = samples.keys().filter(|s| s.contains("tier=\"l3\"")).collect();
            assert_eq!(l2.len(), l3.len(), "{name}: {l2:?} vs {l3:?}");
            per_tier += usize::from(!l3.is_empty());
        }
        assert_eq!(per_tier, 12, "11 counter and gauge families and the read-duration summary");
        let l3 = |name: &str, labels: &str| families[name][&format!("{name}{{{labels}}}")].clone();
        let sample = |name: &str| families[name][name].clone();
        assert_eq!(l3("authz_cache_hits_total", "tier=\"l3\""), "3");
        assert_eq!(l3("authz_cache_rejected_entries_total", "tier=\"l3\""), "1");
        assert_eq!(l3("authz_cache_tier_errors_total", "tier=\"l3\""), "3");
        assert_eq!(l3("authz_cache_write_drops_total", "tier=\"l3\""), "5");
        assert_eq!(l3("authz_cache_breaker_state", "tier=\"l3\""), "1");
        assert_eq!(l3("authz_cache_breaker_opens_total", "tier=\"l3\""), "1");
        assert_eq!(l3("authz_cache_owed_invalidations", "tier=\"l3\""), "2");
        assert_eq!(l3("authz_cache_swept_rows_total", "tier=\"l3\""), "12");
        assert_eq!(families["authz_cache_swept_rows_total"].len(), 1, "Redis has no sweeper");
        assert_eq!(l3("authz_cache_tier_read_duration_seconds", "tier=\"l3\",quantile=\"0.95\""), "0.0015");
        assert_eq!(
            families["authz_cache_tier_read_duration_seconds"]["authz_cache_tier_read_duration_seconds_count{tier=\"l3\"}"],
            "6"
        );
        assert_eq!(sample("authz_cache_change_feed_invalidations_total"), "8");
        assert_eq!(sample("authz_cache_warmed_entries_total"), "9");
    }

    #[test]
    fn l3_without_l2_is_complete_and_tiers_that_are_not_configured_have_no_series() {
        let with_l3 = parse(&super::render(&snapshot_with_l3()));
        let l3_only = parse(&super::render(&snapshot_l3_only()));
        assert_eq!(with_l3.keys().collect::<Vec<_>>(), l3_only.keys().collect::<Vec<_>>(), "the same families");
        for (name, samples) in &l3_only {
            assert!(samples.keys().all(|s| !s.contains("tier=\"l2\"")), "{name}");
            let expected: BTreeMap<_, _> = with_l3[name]
                .iter()
                .filter(|(s, _)| !s.contains("tier=\"l2\""))
                .map(|(s, v)| (s.clone(), v.clone()))
                .collect();
            assert_eq!(samples, &expected, "{name}");
        }
        // Without L3: no l3 series, no sweeper, no change feed; warming is there (explicit keys).
        let l2_only = parse(&super::render(&snapshot()));
        assert!(l2_only.values().flat_map(|s| s.keys()).all(|s| !s.contains("tier=\"l3\"")));
        assert!(!l2_only.contains_key("authz_cache_swept_rows_total"));
        assert!(!l2_only.contains_key("authz_cache_change_feed_invalidations_total"));
        assert!(l2_only.contains_key("authz_cache_warmed_entries_total"));
        // L1 only: no read-duration family at all.
        assert!(
            !parse(&super::render(&StatsSnapshot::default())).contains_key("authz_cache_tier_read_duration_seconds")
        );
    }
}
