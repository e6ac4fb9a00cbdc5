//! One configuration's run: the cache's counters (`GET /admin/stats`) and the CPU time around
//! the driver.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::BoxError;
use crate::args::Opts;
use crate::client::{connect, exchange, write_request};
use crate::cpu::{Cpu, cpu_between, loadavg, server_cpu_between, server_ticks, thread_cpu};
use crate::driver::{Driven, Target, drive};
use crate::workload::{Kind, Req, Workload};

pub(crate) async fn fetch_stats(t: &Target, timeout: Duration) -> Option<Value> {
    let mut s = connect(t.addr, timeout).await.ok()?;
    let mut wbuf = String::new();
    write_request(&mut wbuf, &t.host, Req { kind: Kind::Admin, principal: 1, resource: 0 }, t.tokens);
    let mut rbuf = Vec::new();
    let r = tokio::time::timeout(timeout, exchange(&mut s, wbuf.as_bytes(), &mut rbuf)).await.ok()?.ok()?;
    if r.status != 200 {
        return None;
    }
    serde_json::from_slice(&rbuf[r.body]).ok()
}
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CacheDelta {
    pub(crate) l1_hits: u64,
    pub(crate) l1_misses: u64,
    /// L1 misses because L1 was not trusted (the backplane silent past `max_staleness`), and
    /// because an entry was stale (epochs) or expired.
    pub(crate) l1_untrusted: u64,
    pub(crate) l1_stale: u64,
    pub(crate) l1_expired: u64,
    /// Remote calls that timed out, and background writes dropped (L2 + L3).
    pub(crate) remote_timeouts: u64,
    pub(crate) write_drops: u64,
    /// Hits, misses, errors.
    pub(crate) l2: Option<(u64, u64, u64)>,
    /// Hits, misses, errors.
    pub(crate) l3: Option<(u64, u64, u64)>,
    pub(crate) authorizer_calls: u64,
    pub(crate) authorizer_errors: u64,
    pub(crate) single_flight_joins: u64,
    pub(crate) undecided: u64,
}
impl CacheDelta {
    /// Checks made: every check reads L1 first (a hit or a miss there).
    pub(crate) fn checks(&self) -> u64 {
        self.l1_hits + self.l1_misses
    }

    /// Checks answered by a cache tier, any tier, without the authorizer.
    pub(crate) fn hits(&self) -> u64 {
        self.l1_hits + self.l2.map_or(0, |l| l.0) + self.l3.map_or(0, |l| l.0)
    }

    pub(crate) fn hit_rate(&self) -> Option<f64> {
        (self.checks() > 0).then(|| self.hits() as f64 / self.checks() as f64)
    }

    /// Field by field: `self = f(self, other)` (a fleet sums its instances' counters).
    fn combine(&mut self, o: &CacheDelta, f: impl Fn(u64, u64) -> u64) {
        let tier = |a: Option<(u64, u64, u64)>, b: Option<(u64, u64, u64)>| match (a, b) {
            (None, None) => None,
            (a, b) => {
                let ((a0, a1, a2), (b0, b1, b2)) = (a.unwrap_or_default(), b.unwrap_or_default());
                Some((f(a0, b0), f(a1, b1), f(a2, b2)))
            }
        };
        *self = CacheDelta {
            l1_hits: f(self.l1_hits, o.l1_hits),
            l1_misses: f(self.l1_misses, o.l1_misses),
            l1_untrusted: f(self.l1_untrusted, o.l1_untrusted),
            l1_stale: f(self.l1_stale, o.l1_stale),
            l1_expired: f(self.l1_expired, o.l1_expired),
            remote_timeouts: f(self.remote_timeouts, o.remote_timeouts),
            write_drops: f(self.write_drops, o.write_drops),
            l2: tier(self.l2, o.l2),
            l3: tier(self.l3, o.l3),
            authorizer_calls: f(self.authorizer_calls, o.authorizer_calls),
            authorizer_errors: f(self.authorizer_errors, o.authorizer_errors),
            single_flight_joins: f(self.single_flight_joins, o.single_flight_joins),
            undecided: f(self.undecided, o.undecided),
        };
    }

    pub(crate) fn add(&mut self, o: &CacheDelta) {
        self.combine(o, u64::saturating_add);
    }

    pub(crate) fn sub(&mut self, o: &CacheDelta) {
        self.combine(o, u64::saturating_sub);
    }
}
pub(crate) fn cache_delta(before: &Value, after: &Value) -> CacheDelta {
    let get = |v: &Value, p: &str| v.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    let d = |p: &str| get(after, p).saturating_sub(get(before, p));
    CacheDelta {
        l1_hits: d("/tiers/l1/hits"),
        l1_misses: d("/tiers/l1/misses"),
        l1_untrusted: d("/tiers/l1/untrusted"),
        l1_stale: d("/tiers/l1/stale"),
        l1_expired: d("/tiers/l1/expired"),
        remote_timeouts: d("/tiers/l2/call_timeouts") + d("/tiers/l3/call_timeouts"),
        write_drops: d("/tiers/l2/write_drops") + d("/tiers/l3/write_drops"),
        l2: after.pointer("/tiers/l2").map(|_| (d("/tiers/l2/hits"), d("/tiers/l2/misses"), d("/tiers/l2/errors"))),
        l3: after.pointer("/tiers/l3").map(|_| (d("/tiers/l3/hits"), d("/tiers/l3/misses"), d("/tiers/l3/errors"))),
        authorizer_calls: d("/authorizer_calls"),
        authorizer_errors: d("/authorizer_errors"),
        single_flight_joins: d("/single_flight_joins"),
        undecided: d("/undecided"),
    }
}
pub(crate) struct Run {
    pub(crate) name: String,
    pub(crate) driven: Driven,
    pub(crate) cache: Option<CacheDelta>,
    pub(crate) cpu: Cpu,
    /// CPU seconds of the Postgres and Redis server processes over the run (every client's).
    pub(crate) servers: [f64; 2],
    /// The 1-minute load average before and after.
    pub(crate) load: [Option<f64>; 2],
    pub(crate) local: bool,
    pub(crate) cached: bool,
    pub(crate) about: String,
}
pub(crate) async fn run_target(
    o: &Opts,
    target: Arc<Target>,
    wl: Arc<Workload>,
    about: String,
) -> Result<Run, BoxError> {
    let before = if target.stats { fetch_stats(&target, o.timeout).await } else { None };
    let fleet_before = target.fleet.as_ref().map(|f| f.totals());
    let load0 = loadavg();
    let cpu0 = thread_cpu();
    let servers0 = server_ticks();
    let driven = drive(o, target.clone(), wl).await?;
    let cpu = cpu_between(&cpu0, &thread_cpu());
    let servers = server_cpu_between(&servers0, &server_ticks());
    let load1 = loadavg();
    let after = if target.stats { fetch_stats(&target, o.timeout).await } else { None };
    let cache = match (&before, &after, &target.fleet, fleet_before) {
        (_, _, Some(fleet), Some(before)) => target.authorizes.then(|| {
            let mut delta = fleet.totals();
            delta.sub(&before);
            delta
        }),
        (Some(b), Some(a), _, _) => Some(cache_delta(b, a)),
        _ => {
            if target.stats {
                eprintln!("[{}] note: GET /admin/stats did not answer 200 JSON; no cache counters", target.name);
            }
            None
        }
    };
    Ok(Run {
        name: target.name.clone(),
        driven,
        cache,
        cpu,
        servers,
        load: [load0, load1],
        local: target.local,
        cached: target.cached,
        about,
    })
}
