//! `--fleet N`: a fleet of N instances of one configuration behind a round-robin balancer, with
//! a rolling restart and, with `--flush-redis-at`, Redis losing everything mid-run.
//!
//! Each instance is the quickstart app with a cache of its own (its own L1), and the instances
//! share what the configuration shares: the L2 namespace on Redis, the L3 schema on Postgres,
//! the secret. The balancer is the driver itself: connection `c` goes to instance `c % N`, and
//! request `i` to connection `i % C` (C a multiple of N), so request `i` reaches instance `i % N`.
//!
//! Every `--restart-every` seconds the next instance is replaced, the way a deployment rolls: a
//! new incarnation (an empty L1) starts on a port of its own and is warmed up (subscriptions up),
//! the balancer sends new requests to it (each connection to the old one finishes its request,
//! then reconnects: a drain, so a restart loses no request), and the old one stops accepting. The
//! first `--restart-window-s` after each restart is a restart window: latency, success and
//! authorizer calls are also reported for the requests whose send time falls inside one.
//!
//! The counters are the caches' own (`AuthzCache::stats`, read in process), summed over every
//! incarnation from the end of its warm-up.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::net::TcpListener;
use tower_authz_cache::AuthzCache;

use crate::BoxError;
use crate::backends::Backends;
#[cfg(any(feature = "redis", feature = "postgres"))]
use crate::configs::secret;
use crate::configs::{bare_app, cache_builder, memory_authorizer, population_app, warm_up};
use crate::runner::{CacheDelta, cache_delta};

/// How long a replaced incarnation keeps serving its connections before it stops: longer than
/// any connection goes without a request at the rates the fleet runs at.
const DRAIN: Duration = Duration::from_secs(1);

/// When the restart windows are: from each restart (`t0 + k * every`, k >= 1) for `width`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Windows {
    pub(crate) t0: Instant,
    pub(crate) every: Duration,
    pub(crate) width: Duration,
}

impl Windows {
    pub(crate) fn contains(&self, at: Instant) -> bool {
        let since = at.saturating_duration_since(self.t0);
        since >= self.every && (since.as_nanos() % self.every.as_nanos().max(1)) < self.width.as_nanos()
    }
}

/// One instance slot behind the balancer: where its current incarnation listens, and which
/// incarnation that is (a connection to an older one reconnects).
struct Slot {
    addr: Mutex<SocketAddr>,
    generation: AtomicU64,
}

/// One incarnation: its cache (for the counters), its counters when it was ready, its accept
/// loop.
struct Incarnation {
    addr: SocketAddr,
    cache: Option<AuthzCache>,
    baseline: Value,
    server: tokio::task::JoinHandle<()>,
    /// A retired incarnation's counters, kept when its cache is let go (with its pools: a
    /// fleet that kept every old cache alive ran Postgres out of connections).
    retired: Option<CacheDelta>,
}

/// What the restart windows and the flush saw.
#[derive(Default)]
pub(crate) struct Events {
    pub(crate) restarts: u64,
    /// The caches' counters over the restart windows.
    pub(crate) windows: CacheDelta,
    /// Keys deleted from Redis by the flush, if one ran.
    pub(crate) flushed: Option<u64>,
}

pub(crate) struct Fleet {
    pub(crate) name: String,
    n: usize,
    config: usize,
    schema: Option<String>,
    backends: Backends,
    server: tokio::runtime::Handle,
    slots: Vec<Slot>,
    incarnations: Mutex<Vec<Incarnation>>,
    pub(crate) every: Duration,
    pub(crate) width: Duration,
    pub(crate) flush_at: Option<Duration>,
    pub(crate) events: Mutex<Events>,
}

impl Fleet {
    /// Starts `n` instances of configuration `name` (the `config`th of the run) on the server
    /// runtime `server`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn start(
        name: &str,
        config: usize,
        n: usize,
        backends: &Backends,
        server: tokio::runtime::Handle,
        every: Duration,
        width: Duration,
        flush_at: Option<Duration>,
    ) -> Result<Arc<Fleet>, BoxError> {
        let schema = match name {
            #[cfg(feature = "postgres")]
            "l1+l2+l3" => {
                let b = backends.clone();
                Some(server.spawn(async move { crate::configs::pg_schema(&b, config).await }).await??.0)
            }
            _ => None,
        };
        let unbound = SocketAddr::from(([127, 0, 0, 1], 0));
        let fleet = Arc::new(Fleet {
            name: name.to_owned(),
            n,
            config,
            schema,
            backends: backends.clone(),
            server,
            slots: (0..n).map(|_| Slot { addr: Mutex::new(unbound), generation: AtomicU64::new(0) }).collect(),
            incarnations: Mutex::new(Vec::new()),
            every,
            width,
            flush_at,
            events: Mutex::new(Events::default()),
        });
        for slot in 0..n {
            fleet.clone().replace(slot).await?;
        }
        Ok(fleet)
    }

    /// Where connection `conn` goes, and the incarnation there.
    pub(crate) fn route(&self, conn: usize) -> (SocketAddr, u64) {
        let slot = &self.slots[conn % self.n];
        let addr = *slot.addr.lock().unwrap_or_else(|e| e.into_inner());
        (addr, slot.generation.load(Relaxed))
    }

    /// The cache of a new incarnation of this configuration (none for bare).
    fn cache(&self) -> Result<Option<AuthzCache>, BoxError> {
        let b = &self.backends;
        Ok(match self.name.as_str() {
            "bare" => None,
            "no-cache" => Some(cache_builder(memory_authorizer(), b).l1_max_bytes(0).build()),
            "l1" => Some(cache_builder(memory_authorizer(), b).build()),
            #[cfg(feature = "redis")]
            "l1+l2" => {
                let l2 = crate::configs::redis_tier(b)?;
                Some(cache_builder(memory_authorizer(), b).secret(secret(self.config)).l2(l2).build())
            }
            #[cfg(all(feature = "redis", feature = "postgres"))]
            "l1+l2+l3" => {
                let (Some(url), Some(schema)) = (&b.database_url, &self.schema) else {
                    return Err("l1+l2+l3 needs --database-url".into());
                };
                let l2 = crate::configs::redis_tier(b)?;
                // A small L3 pool: every instance, and each restart's new one while the old one
                // drains, holds its pools (and the authorizer's) on the shared Postgres.
                let l3 = tower_authz_cache::PostgresTier::builder(url).schema(schema).pool_size(4).build()?;
                let rbac = tower_authz_cache::PostgresRbacAuthorizer::new(url, schema)?;
                Some(cache_builder(rbac, b).secret(secret(self.config)).l2(l2).l3(l3).build())
            }
            other => {
                return Err(format!(
                    "--fleet: configuration {other:?} is not available (bare, no-cache, l1, l1+l2, l1+l2+l3)"
                )
                .into());
            }
        })
    }

    /// Starts a new incarnation for `slot`, sends the slot's traffic to it, and stops the old
    /// one accepting (its connections drain: each finishes its request, then reconnects).
    async fn replace(self: Arc<Self>, slot: usize) -> Result<(), BoxError> {
        let me = self.clone();
        let started = self
            .server
            .spawn(async move {
                // Built on the server runtime: the cache's background tasks run there too.
                let cache = me.cache()?;
                let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
                let addr = listener.local_addr()?;
                let server = match &cache {
                    None => {
                        let app = bare_app();
                        tokio::spawn(async move {
                            let _ = axum::serve(listener, app).await;
                        })
                    }
                    Some(cache) => {
                        warm_up(cache).await;
                        let app = population_app(cache.clone(), me.backends.population);
                        tokio::spawn(async move {
                            let _ = axum::serve(listener, axum::ServiceExt::into_make_service(app)).await;
                        })
                    }
                };
                let baseline = cache.as_ref().map_or(Value::Null, stats_json);
                Ok::<_, BoxError>((addr, Incarnation { addr, cache, baseline, server, retired: None }))
            })
            .await??;
        let (addr, incarnation) = started;
        self.incarnations.lock().unwrap_or_else(|e| e.into_inner()).push(incarnation);
        let s = &self.slots[slot];
        let previous = std::mem::replace(&mut *s.addr.lock().unwrap_or_else(|e| e.into_inner()), addr);
        s.generation.fetch_add(1, Relaxed);
        // The old incarnation drains: each of its connections finishes the request it carries
        // and the driver sends the next one to the new incarnation. Only then does it stop (its
        // accept loop ends, and axum closes its idle connections): stopping it at once closed a
        // connection just as a request went out on it, now and then.
        if previous.port() != 0 {
            let me = self.clone();
            self.server.spawn(async move {
                tokio::time::sleep(DRAIN).await;
                let mut all = me.incarnations.lock().unwrap_or_else(|e| e.into_inner());
                for old in all.iter_mut().filter(|i| i.addr == previous) {
                    old.server.abort();
                    if let Some(cache) = old.cache.take() {
                        old.retired = Some(cache_delta(&old.baseline, &stats_json(&cache)));
                    }
                }
            });
        }
        Ok(())
    }

    /// The counters of every incarnation, from its warm-up's end to now, summed.
    pub(crate) fn totals(&self) -> CacheDelta {
        let all = self.incarnations.lock().unwrap_or_else(|e| e.into_inner());
        let mut sum = CacheDelta::default();
        for i in all.iter() {
            match (&i.cache, &i.retired) {
                (Some(cache), _) => sum.add(&cache_delta(&i.baseline, &stats_json(cache))),
                (None, Some(retired)) => sum.add(retired),
                (None, None) => {}
            }
        }
        sum
    }

    /// The restarts (one every `every`, slot after slot) and the flush, until `end`.
    pub(crate) async fn run(self: Arc<Self>, t0: Instant, end: Instant) {
        let mut next_restart = t0 + self.every;
        let mut flush = self.flush_at.map(|at| t0 + at);
        let mut k = 0usize;
        loop {
            let due = flush.map_or(next_restart, |f| f.min(next_restart));
            if due >= end {
                return;
            }
            tokio::time::sleep_until(due.into()).await;
            if flush.is_some_and(|f| f <= due) {
                flush = None;
                let deleted = self.flush_redis().await;
                eprintln!(
                    "[{}] redis: the namespace flushed ({} keys)",
                    self.name,
                    deleted.map_or("?".into(), |d| d.to_string())
                );
                self.events.lock().unwrap_or_else(|e| e.into_inner()).flushed = deleted;
                continue;
            }
            let before = self.totals();
            match self.clone().replace(k % self.n).await {
                Ok(()) => self.events.lock().unwrap_or_else(|e| e.into_inner()).restarts += 1,
                Err(e) => eprintln!("[{}] restart of instance {}: {e}", self.name, k % self.n),
            }
            k += 1;
            next_restart += self.every;
            let width_end = (Instant::now().max(due) + self.width).min(end);
            tokio::time::sleep_until(width_end.into()).await;
            let mut window = self.totals();
            window.sub(&before);
            self.events.lock().unwrap_or_else(|e| e.into_inner()).windows.add(&window);
        }
    }

    #[cfg(feature = "redis")]
    async fn flush_redis(&self) -> Option<u64> {
        let (Some(url), Some((_, namespace))) = (&self.backends.redis_url, &self.backends.leftovers.redis) else {
            return None;
        };
        crate::backends::delete_namespace(url, namespace).await.ok()
    }

    #[cfg(not(feature = "redis"))]
    async fn flush_redis(&self) -> Option<u64> {
        None
    }

    /// Stops everything (the server runtime's shutdown ends the connections).
    pub(crate) fn stop(&self) {
        for i in self.incarnations.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            i.server.abort();
        }
    }
}

fn stats_json(cache: &AuthzCache) -> Value {
    serde_json::to_value(cache.stats()).unwrap_or(Value::Null)
}

/// One configuration's fleet run, for the report.
pub(crate) struct FleetRun {
    pub(crate) summary: crate::summary::Summary,
    pub(crate) instances: usize,
    pub(crate) restarts: u64,
    pub(crate) windows: CacheDelta,
    pub(crate) flushed: Option<u64>,
}

impl FleetRun {
    /// Authorizer calls per request sent (every request of a configuration without a cache).
    pub(crate) fn calls_per_request(&self) -> Option<f64> {
        let c = self.summary.cache.as_ref()?;
        (self.summary.sent > 0).then(|| c.authorizer_calls as f64 / self.summary.sent as f64)
    }

    /// The fewest authorizer calls per request any cache could make: distinct keys / requests.
    pub(crate) fn compulsory(&self) -> Option<f64> {
        self.summary.bound().map(|b| 1.0 - b)
    }

    pub(crate) fn window_calls_per_request(&self) -> Option<f64> {
        self.summary.cache.as_ref()?;
        (self.summary.window_sent > 0).then(|| self.windows.authorizer_calls as f64 / self.summary.window_sent as f64)
    }

    fn tier_share(&self, tier: usize) -> Option<f64> {
        let c = self.summary.cache.as_ref()?;
        let checks = c.checks();
        let hits = match tier {
            1 => c.l1_hits,
            2 => c.l2.map_or(0, |t| t.0),
            _ => c.l3.map_or(0, |t| t.0),
        };
        (checks > 0).then(|| hits as f64 / checks as f64)
    }

    fn window_success(&self) -> Option<f64> {
        let s = &self.summary;
        (s.window_sent > 0).then(|| s.window_expected as f64 / s.window_sent as f64)
    }
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".to_owned(), |v| format!("{:.2}%", v * 100.0))
}

fn times(a: f64, b: f64) -> String {
    if b > 0.0 { format!("{:.2}x", a / b) } else { "-".to_owned() }
}

/// The fleet table and its targets.
pub(crate) fn print_fleet(runs: &[FleetRun], every: Duration, width: Duration, flush: bool) {
    let Some(bare) = runs.iter().find(|r| r.summary.name == "bare") else {
        println!("fleet: no bare run to compare with");
        return;
    };
    let (b, bw) = (&bare.summary.latency, &bare.summary.window_latency);
    println!(
        "\nfleet: {} instances, round robin, one restarted every {:.1} s ({} restarts per configuration){}",
        bare.instances,
        every.as_secs_f64(),
        bare.restarts,
        if flush { ", Redis flushed mid-run" } else { "" }
    );
    println!(
        "| configuration | authorizer calls / request | compulsory | gap (points) | L1 hits | L2 hits | L3 hits | p50 vs bare | p99 vs bare | success | restart windows: calls / request | p50 vs bare | p99 vs bare | success |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in runs {
        let s = &r.summary;
        let gap = r.calls_per_request().zip(r.compulsory()).map(|(c, b)| (c - b) * 100.0);
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            s.name,
            r.calls_per_request().map_or("-".to_owned(), |c| format!("{c:.4}")),
            r.compulsory().map_or("-".to_owned(), |c| format!("{c:.4}")),
            gap.map_or("-".to_owned(), |g| format!("{g:+.2}")),
            pct(r.tier_share(1)),
            pct(r.tier_share(2)),
            pct(r.tier_share(3)),
            times(s.latency.p50, b.p50),
            times(s.latency.p99, b.p99),
            pct(Some(s.success())),
            r.window_calls_per_request().map_or("-".to_owned(), |c| format!("{c:.4}")),
            times(s.window_latency.p50, bw.p50),
            times(s.window_latency.p99, bw.p99),
            pct(r.window_success()),
        );
    }
    println!(
        "authorizer calls / request: the authorizer calls of every incarnation (from its warm-up's end) / requests sent; compulsory: distinct (principal, resource, action) keys / requests, the fewest calls any cache without prefetching makes; restart windows: the first {:.1} s after each restart.",
        width.as_secs_f64()
    );
    println!("\ntargets:");
    for r in runs {
        let name = r.summary.name.as_str();
        let wanted = name == "l1+l2+l3" || (name == "l1+l2" && !flush);
        if let (true, Some(c), Some(b)) = (wanted, r.calls_per_request(), r.compulsory()) {
            let gap = (c - b) * 100.0;
            println!(
                "  [{}] {name}: authorizer calls {:.2} points above the compulsory misses (target within 1){}",
                if gap <= 1.0 { "met" } else { "MISSED" },
                gap,
                if flush { " through restarts and the Redis flush" } else { " through restarts" }
            );
        }
        if r.summary.success() < 1.0 {
            println!(
                "  [MISSED] {name}: success {:.3}% (every request answered as the roles say)",
                r.summary.success() * 100.0
            );
        }
    }
}

/// Bars: authorizer calls per request per configuration, overall and in the restart windows,
/// beside the compulsory-miss line.
pub(crate) fn fleet_svg(runs: &[FleetRun], subtitle: &[String]) -> String {
    use std::fmt::Write as _;
    let rows: Vec<(&str, f64, f64, f64)> = runs
        .iter()
        .filter_map(|r| {
            Some((
                r.summary.name.as_str(),
                r.calls_per_request()?,
                r.window_calls_per_request().unwrap_or(0.0),
                r.compulsory()?,
            ))
        })
        .collect();
    let (w, h, ml, mt, mb) =
        (900.0, 420.0 + 16.0 * subtitle.len() as f64, 70.0, 60.0 + 16.0 * subtitle.len() as f64, 60.0);
    let max = rows.iter().map(|r| r.1.max(r.2)).fold(0.05f64, f64::max) * 1.1;
    let plot_h = h - mt - mb;
    let y = |v: f64| mt + plot_h - v / max * plot_h;
    let group = (w - ml - 40.0) / rows.len().max(1) as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{ml}" y="22" font-size="15" font-weight="bold">Authorizer calls per request, a fleet with rolling restarts</text>"#
    );
    for (i, line) in subtitle.iter().enumerate() {
        let _ = writeln!(
            s,
            r##"<text x="{ml}" y="{}" fill="#555">{}</text>"##,
            40 + 16 * i,
            crate::report::xml_escape(line)
        );
    }
    for t in 0..=4 {
        let v = max * f64::from(t) / 4.0;
        let _ = writeln!(
            s,
            r##"<line x1="{ml}" x2="{0}" y1="{1:.1}" y2="{1:.1}" stroke="#ddd"/><text x="{2}" y="{3:.1}" text-anchor="end">{v:.2}</text>"##,
            w - 40.0,
            y(v),
            ml - 6.0,
            y(v) + 4.0
        );
    }
    for (i, (name, all, window, bound)) in rows.iter().enumerate() {
        let x0 = ml + group * i as f64 + group * 0.15;
        let bw = group * 0.3;
        let _ = writeln!(
            s,
            r##"<rect x="{x0:.1}" y="{:.1}" width="{bw:.1}" height="{:.1}" fill="#1f77b4"/>"##,
            y(*all),
            mt + plot_h - y(*all)
        );
        let _ = writeln!(
            s,
            r##"<rect x="{:.1}" y="{:.1}" width="{bw:.1}" height="{:.1}" fill="#ff7f0e"/>"##,
            x0 + bw,
            y(*window),
            mt + plot_h - y(*window)
        );
        let _ = writeln!(
            s,
            r##"<line x1="{0:.1}" x2="{1:.1}" y1="{2:.1}" y2="{2:.1}" stroke="#d62728" stroke-width="2" stroke-dasharray="4 2"/>"##,
            x0 - 4.0,
            x0 + 2.0 * bw + 4.0,
            y(*bound)
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            x0 + bw,
            mt + plot_h + 16.0,
            crate::report::xml_escape(name)
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{all:.3}</text>"#,
            x0 + bw / 2.0,
            y(*all) - 3.0
        );
    }
    let ly = h - 18.0;
    let _ = writeln!(
        s,
        r##"<rect x="{ml}" y="{}" width="12" height="12" fill="#1f77b4"/><text x="{}" y="{}">whole run</text>"##,
        ly - 10.0,
        ml + 16.0,
        ly
    );
    let _ = writeln!(
        s,
        r##"<rect x="{}" y="{}" width="12" height="12" fill="#ff7f0e"/><text x="{}" y="{}">restart windows</text>"##,
        ml + 110.0,
        ly - 10.0,
        ml + 126.0,
        ly
    );
    let _ = writeln!(
        s,
        r##"<line x1="{0}" x2="{1}" y1="{2}" y2="{2}" stroke="#d62728" stroke-width="2" stroke-dasharray="4 2"/><text x="{3}" y="{4}">compulsory misses (distinct keys / requests)</text>"##,
        ml + 250.0,
        ml + 275.0,
        ly - 4.0,
        ml + 280.0,
        ly
    );
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::Opts;
    use crate::backends::Leftovers;
    use crate::driver::Target;
    use crate::runner::run_target;
    use crate::summary::Summary;
    use crate::workload::{Tokens, Workload};

    #[test]
    fn restart_windows_open_at_each_restart_for_their_width() {
        let t0 = Instant::now();
        let w = Windows { t0, every: Duration::from_secs(5), width: Duration::from_secs(1) };
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert!(!w.contains(at(500)), "no restart before the first period");
        assert!(w.contains(at(5_000)) && w.contains(at(5_999)));
        assert!(!w.contains(at(6_000)) && !w.contains(at(9_999)));
        assert!(w.contains(at(10_200)));
    }

    #[test]
    fn counters_add_and_subtract_field_by_field() {
        let a = CacheDelta { l1_hits: 5, authorizer_calls: 2, l2: Some((1, 2, 0)), ..CacheDelta::default() };
        let mut sum = a;
        sum.add(&CacheDelta {
            l1_hits: 3,
            authorizer_calls: 1,
            l2: None,
            l3: Some((4, 0, 0)),
            ..CacheDelta::default()
        });
        assert_eq!((sum.l1_hits, sum.authorizer_calls, sum.l2, sum.l3), (8, 3, Some((1, 2, 0)), Some((4, 0, 0))));
        sum.sub(&a);
        assert_eq!((sum.l1_hits, sum.authorizer_calls, sum.l2, sum.l3), (3, 1, Some((0, 0, 0)), Some((4, 0, 0))));
    }

    /// A fleet of two `l1` instances with a restart every 400 ms: the balancer spreads the
    /// requests over the instances, every restart replaces one, the drain loses no request, and
    /// a restarted instance (an empty L1) asks the authorizer again for what it sees.
    #[test]
    fn a_rolling_restart_loses_no_request_and_costs_l1_its_entries() {
        let o = Opts {
            rate: 400.0,
            duration: Duration::from_millis(1_700),
            users: 20,
            connections: 4,
            restart_every: Duration::from_millis(400),
            restart_window: Duration::from_millis(200),
            fleet: Some(2),
            ..Opts::default()
        };
        let client = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let server = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let leftovers = Arc::new(Leftovers {
            redis: None,
            redis_used: Default::default(),
            redis_cluster: None,
            redis_cluster_used: Default::default(),
            database_url: None,
            schemas: Default::default(),
        });
        let backends = Backends {
            redis_url: None,
            redis_cluster_nodes: None,
            database_url: None,
            population: o.population as u32,
            allow_ttl: o.allow_ttl,
            deny_ttl: o.deny_ttl,
            leftovers,
        };
        let workload = Arc::new(Workload::new(&o));
        let (summary, fleet) = client.block_on(async {
            let fleet =
                Fleet::start("l1", 1, 2, &backends, server.handle().clone(), o.restart_every, o.restart_window, None)
                    .await
                    .unwrap();
            let (a, b) = (fleet.route(0), fleet.route(1));
            assert_ne!(a.0, b.0, "two instances, two addresses");
            assert_eq!(fleet.route(2), a, "connection 2 goes where connection 0 goes: round robin");
            let target = Arc::new(Target {
                name: "l1".into(),
                addr: a.0,
                host: "fleet".into(),
                stats: false,
                local: true,
                tokens: Tokens::Population,
                authorizes: true,
                cached: true,
                fleet: Some(fleet.clone()),
            });
            let run = run_target(&o, target, workload, String::new()).await.unwrap();
            (Summary::new(run), fleet)
        });
        let events = fleet.events.lock().unwrap();
        assert!(events.restarts >= 3, "restarts: {}", events.restarts);
        assert_eq!(fleet.incarnations.lock().unwrap().len() as u64, 2 + events.restarts, "one incarnation per restart");
        assert!(summary.sent > 500, "sent {}", summary.sent);
        assert_eq!(summary.expected, summary.issued, "every request answered as the roles say, restarts included");
        assert!(summary.window_sent > 0, "requests fell in the restart windows");
        let cache = summary.cache.expect("the fleet's counters");
        let keys = summary.keys;
        // Each key is missed at least once per instance that sees it; restarts make it more.
        assert!(cache.authorizer_calls > keys, "calls {} vs keys {keys}", cache.authorizer_calls);
        assert_eq!(cache.checks(), cache.l1_hits + cache.l1_misses);
        fleet.stop();
        drop(events);
        server.shutdown_timeout(Duration::from_secs(1));
    }
}
