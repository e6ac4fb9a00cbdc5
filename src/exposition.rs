//! The metric families, in one table shared by [`StatsSnapshot::to_prometheus`] and the `metrics`
//! facade export (feature `metrics`): names and labels follow Prometheus conventions, so a
//! dashboard or an alert rule works on either.
//!
//! | name | type | labels |
//! |---|---|---|
//! | `authz_cache_hits_total`, `authz_cache_misses_total` | counter | `tier` |
//! | `authz_cache_expired_total`, `authz_cache_stale_total` | counter | `tier` |
//! | `authz_cache_rejected_entries_total`, `authz_cache_tier_errors_total`, `authz_cache_write_drops_total` | counter | `tier="l2"` |
//! | `authz_cache_breaker_opens_total` | counter | `tier` |
//! | `authz_cache_breaker_state` | gauge, 0 closed / 1 half-open / 2 open | `tier` |
//! | `authz_cache_authorizer_calls_total`, `authz_cache_authorizer_errors_total` | counter | |
//! | `authz_cache_single_flight_joins_total`, `authz_cache_undecided_total` | counter | |
//! | `authz_cache_invalidations_total` | counter | `scope` |
//! | `authz_cache_entries`, `authz_cache_size_bytes`, `authz_cache_max_size_bytes` | gauge | `tier="l1"` |
//! | `authz_cache_backplane_connected`, `authz_cache_backplane_l1_trusted` | gauge | |
//! | `authz_cache_backplane_silence_seconds` | gauge | |
//! | `authz_cache_check_duration_seconds` | summary | `path` (`l1_hit`, `miss`) |
//! | `authz_cache_tier_read_duration_seconds` | summary | `tier="l2"` |
//! | `authz_cache_authorizer_duration_seconds` | summary | |
//!
//! [`StatsSnapshot::to_prometheus`]: crate::StatsSnapshot::to_prometheus

use std::fmt::Write as _;

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
const NONE: &[(&str, &str)] = &[];

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

/// Every counter and gauge of a snapshot.
pub(crate) fn rows(s: &StatsSnapshot) -> Vec<Row> {
    let row = |name, help, kind, labels, value: u64| Row { name, help, kind, labels, value: value as f64 };
    use Kind::{Counter, Gauge};
    let l1 = &s.tiers.l1;
    let mut rows = vec![
        row("authz_cache_hits_total", "Reads answered by a tier.", Counter, L1, l1.hits),
        row("authz_cache_misses_total", "Reads a tier could not answer.", Counter, L1, l1.misses),
        row("authz_cache_expired_total", "Entries found past their deadline.", Counter, L1, l1.expired),
        row("authz_cache_stale_total", "Entries found invalidated.", Counter, L1, l1.stale),
    ];
    if let Some(t) = s.tiers.l2 {
        rows.extend([
            row("authz_cache_hits_total", "", Counter, L2, t.hits),
            row("authz_cache_misses_total", "", Counter, L2, t.misses),
            row("authz_cache_expired_total", "", Counter, L2, t.expired),
            row("authz_cache_stale_total", "", Counter, L2, t.stale),
            row(
                "authz_cache_rejected_entries_total",
                "Shared entries that failed verification (security events).",
                Counter,
                L2,
                t.rejected,
            ),
            row("authz_cache_tier_errors_total", "Remote reads that failed or were skipped.", Counter, L2, t.errors),
            row(
                "authz_cache_write_drops_total",
                "Background writes dropped on a full queue.",
                Counter,
                L2,
                t.write_drops,
            ),
            row(
                "authz_cache_breaker_opens_total",
                "Times a tier's circuit breaker opened.",
                Counter,
                L2,
                t.breaker_opens,
            ),
            Row {
                name: "authz_cache_breaker_state",
                help: "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
                kind: Gauge,
                labels: L2,
                value: breaker_value(t.breaker),
            },
        ]);
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
            "authz_cache_invalidations_total",
            "Invalidations applied, by scope.",
            Counter,
            &[("scope", "principal")],
            inv.principal,
        ),
        row("authz_cache_invalidations_total", "", Counter, &[("scope", "resource")], inv.resource),
        row("authz_cache_invalidations_total", "", Counter, &[("scope", "entry")], inv.entry),
        row("authz_cache_invalidations_total", "", Counter, &[("scope", "all")], inv.all),
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
    if s.tiers.l2.is_some() {
        summaries.push((TIER_READ_DURATION, "Latency of one remote tier read.", vec![("tier=\"l2\"", &lat.l2_read)]));
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
        for r in rows.iter().filter(|r| !r.help.is_empty()) {
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

/// Records one latency sample through the `metrics` facade.
#[cfg(feature = "metrics")]
pub(crate) fn record(name: &'static str, labels: &[(&'static str, &'static str)], d: std::time::Duration) {
    let labels: Vec<::metrics::Label> = labels.iter().map(|(k, v)| ::metrics::Label::new(*k, *v)).collect();
    ::metrics::histogram!(name, labels).record(d.as_secs_f64());
}

#[cfg(test)]
mod tests {
    use crate::stats::{LatencySnapshot, RemoteTierSnapshot};
    use crate::{BreakerState, StatsSnapshot};

    fn snapshot() -> StatsSnapshot {
        let mut s = StatsSnapshot::default();
        s.tiers.l1.hits = 90;
        s.tiers.l1.misses = 10;
        s.tiers.l1.entries = 7;
        s.tiers.l1.bytes = 3584;
        s.tiers.l1.max_bytes = 1 << 20;
        s.tiers.l2 = Some(RemoteTierSnapshot {
            hits: 4,
            misses: 6,
            expired: 0,
            stale: 1,
            rejected: 0,
            errors: 0,
            writes: 6,
            write_errors: 0,
            write_drops: 0,
            swept: 0,
            breaker: BreakerState::Closed,
            breaker_opens: 0,
            call_errors: 0,
            call_timeouts: 0,
            calls_skipped: 0,
        });
        s.authorizer_calls = 6;
        s.invalidations.principal = 2;
        s.latency.l1_hit =
            LatencySnapshot { count: 11, p50_us: 0.3, p95_us: 0.5, p99_us: 0.9, max_us: 1.2, sum_us: 4.0 };
        s
    }

    #[test]
    fn metrics_text() {
        insta::assert_snapshot!(super::render(&snapshot()));
    }

    #[test]
    fn stats_json() {
        insta::assert_json_snapshot!(snapshot());
    }
}
