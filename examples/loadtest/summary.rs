//! Summaries of a run: percentiles, rates, ratios to bare, each configuration's JSON.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::client::{ERR_KINDS, ErrKind};
use crate::cpu::Cpu;
use crate::driver::Driven;
use crate::runner::{CacheDelta, Run};

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Pcts {
    pub(crate) p50: f64,
    pub(crate) p90: f64,
    pub(crate) p95: f64,
    pub(crate) p99: f64,
    pub(crate) p999: f64,
    pub(crate) max: f64,
}
/// Nearest-rank percentiles (sorts `v`).
pub(crate) fn pcts(v: &mut [u32]) -> Pcts {
    if v.is_empty() {
        return Pcts::default();
    }
    v.sort_unstable();
    let n = v.len();
    let q = |q: f64| f64::from(v[((q * n as f64).ceil() as usize).clamp(1, n) - 1]);
    Pcts { p50: q(0.50), p90: q(0.90), p95: q(0.95), p99: q(0.99), p999: q(0.999), max: f64::from(v[n - 1]) }
}
pub(crate) fn pcts_json(p: &Pcts) -> Value {
    json!({ "p50": p.p50, "p90": p.p90, "p95": p.p95, "p99": p.p99, "p99.9": p.p999, "max": p.max })
}
pub(crate) struct Summary {
    pub(crate) name: String,
    pub(crate) about: String,
    pub(crate) issued: u64,
    pub(crate) responses: u64,
    pub(crate) ok: u64,
    /// Answered as the roles say (2xx, or 403 where they deny).
    pub(crate) expected: u64,
    /// Requests sent and the distinct cache keys among them.
    pub(crate) sent: u64,
    pub(crate) keys: u64,
    pub(crate) status: BTreeMap<u16, u64>,
    pub(crate) errors: Vec<(ErrKind, u64)>,
    pub(crate) latency: Pcts,
    pub(crate) service: Pcts,
    pub(crate) lag: Pcts,
    /// Responses per second, from t0 to the last response.
    pub(crate) throughput: f64,
    pub(crate) wall_s: f64,
    pub(crate) cache: Option<CacheDelta>,
    pub(crate) cpu: Cpu,
    pub(crate) servers: [f64; 2],
    pub(crate) load: [Option<f64>; 2],
    /// The app ran in this process (its CPU is known).
    pub(crate) local: bool,
    pub(crate) cached: bool,
    /// A fleet's restart windows: the latency, the requests sent and those answered as the
    /// roles say, of the requests sent during one.
    pub(crate) window_latency: Pcts,
    pub(crate) window_sent: u64,
    pub(crate) window_expected: u64,
}
impl Summary {
    pub(crate) fn new(run: Run) -> Self {
        let Run { name, driven, cache, cpu, servers, load, local, cached, about } = run;
        let Driven { mut stats, issued, t0, finished } = driven;
        let responses: u64 = stats.status.values().sum();
        let ok = stats.status.iter().filter(|(s, _)| (200..300).contains(*s)).map(|(_, n)| n).sum();
        let span = stats.last_done.unwrap_or(finished).saturating_duration_since(t0).as_secs_f64();
        let window_latency = pcts(&mut stats.window.latency);
        Summary {
            name,
            about,
            issued,
            responses,
            ok,
            expected: stats.expected,
            sent: stats.sent,
            keys: stats.keys.len() as u64,
            errors: ERR_KINDS.iter().copied().zip(stats.errors).collect(),
            status: std::mem::take(&mut stats.status),
            latency: pcts(&mut stats.latency),
            service: pcts(&mut stats.service),
            lag: pcts(&mut stats.lag),
            throughput: if span > 0.0 { responses as f64 / span } else { 0.0 },
            wall_s: finished.saturating_duration_since(t0).as_secs_f64(),
            cache,
            cpu,
            servers,
            load,
            local,
            cached,
            window_latency,
            window_sent: stats.window.sent,
            window_expected: stats.window.expected,
        }
    }

    /// Answered as the roles say, out of every request issued (errors and unsent included).
    pub(crate) fn success(&self) -> f64 {
        if self.issued == 0 { 0.0 } else { self.expected as f64 / self.issued as f64 }
    }

    /// The best hit rate any cache without prefetching could reach on the requests sent.
    pub(crate) fn bound(&self) -> Option<f64> {
        (self.sent > 0).then(|| 1.0 - self.keys as f64 / self.sent as f64)
    }

    /// The hit rate of a cached configuration (any tier).
    pub(crate) fn hit_rate(&self) -> Option<f64> {
        self.cache.as_ref().filter(|_| self.cached).and_then(CacheDelta::hit_rate)
    }

    pub(crate) fn cpu_share(&self, ns: u64) -> f64 {
        if self.wall_s > 0.0 { ns as f64 / 1e9 / self.wall_s } else { 0.0 }
    }

    pub(crate) fn json(&self, base: Option<&Summary>, client_threads: usize) -> Value {
        let mut v = json!({
            "name": self.name,
            "what": self.about,
            "requests": self.issued,
            "responses": self.responses,
            "success_2xx": self.ok,
            "answered_as_expected": self.expected,
            "success_rate": self.success(),
            "status": self.status.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "errors": self.errors.iter().filter(|e| e.1 > 0).map(|(k, v)| (k.name().to_owned(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "latency_us": pcts_json(&self.latency),
            "service_time_us": pcts_json(&self.service),
            "send_lag_us": pcts_json(&self.lag),
            "throughput_rps": self.throughput,
            "wall_s": self.wall_s,
            "cpu": {
                "generator_s": self.cpu.generator_ns as f64 / 1e9,
                "generator_core_share": self.cpu_share(self.cpu.generator_ns),
                "generator_us_per_request": per_request_us(self.cpu.generator_ns, self.issued),
                "client_threads": client_threads,
                "server_s": self.local.then(|| self.cpu.server_ns as f64 / 1e9),
                "server_core_share": self.local.then(|| self.cpu_share(self.cpu.server_ns)),
                "other_s": self.cpu.other_ns as f64 / 1e9,
                "source": "/proc/self/task/*/schedstat (ns)",
                "postgres_s": self.servers[0],
                "redis_s": self.servers[1],
                "servers_source": "/proc/<pid>/stat of every postgres and redis-server process (every client's, not only this run's), 100 Hz",
            },
            "load_average_1m": { "before": self.load[0], "after": self.load[1] },
            "workload": {
                "requests_sent": self.sent,
                "distinct_keys": self.keys,
                "compulsory_miss_bound_hit_rate": self.bound(),
            },
        });
        if let Some(c) = &self.cache {
            v["cache"] = json!({
                "l1_hits": c.l1_hits,
                "l1_misses": c.l1_misses,
                "l1_untrusted": c.l1_untrusted,
                "l1_stale": c.l1_stale,
                "l1_expired": c.l1_expired,
                "remote_call_timeouts": c.remote_timeouts,
                "write_drops": c.write_drops,
                "l2": c.l2.map(|(h, m, e)| json!({ "hits": h, "misses": m, "errors": e })),
                "l3": c.l3.map(|(h, m, e)| json!({ "hits": h, "misses": m, "errors": e })),
                "checks": c.checks(),
                "authorizer_calls": c.authorizer_calls,
                "authorizer_errors": c.authorizer_errors,
                "single_flight_joins": c.single_flight_joins,
                "undecided": c.undecided,
                "hit_rate": self.hit_rate(),
                "hit_rate_minus_bound_points": self.hit_rate().zip(self.bound()).map(|(h, b)| (h - b) * 100.0),
            });
        }
        if let Some(b) = base {
            v["vs_bare"] = json!({
                "p50": ratio(self.latency.p50, b.latency.p50),
                "p99": ratio(self.latency.p99, b.latency.p99),
                "throughput": ratio(self.throughput, b.throughput),
            });
        }
        v
    }
}
pub(crate) fn per_request_us(ns: u64, requests: u64) -> f64 {
    if requests == 0 { 0.0 } else { ns as f64 / 1000.0 / requests as f64 }
}
pub(crate) fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}
