//! A load generator for the quickstart app: real HTTP/1.1 keep-alive connections over loopback,
//! open loop (a fixed request rate, latency measured from each request's *intended* send time, so
//! a stall is not hidden by coordinated omission) or closed loop (virtual users with think time).
//! Every run is bounded by `--duration` (plus at most `--drain-s` to finish the backlog) and by
//! `--max-requests`: it always stops by itself.
//!
//! ```text
//! # Start the apps in-process on 127.0.0.1 ephemeral ports, one after the other (each on a
//! # server runtime of its own, shut down before the next starts), and compare them:
//! #   bare         the quickstart handlers, no authorization at all
//! #   l1           the quickstart handlers behind the layer, L1 only, in-memory roles
//! #   no-cache     the same with L1 disabled: every request asks the in-memory authorizer
//! #   l1+l2        with --redis-url: L1 and L2 on Redis (namespace loadtest-<pid>), in-memory roles
//! #   no-cache-pg  with --database-url: no cache at all, every request asks PostgresRbacAuthorizer
//! #   l1+l2+l3     with both: L1, L2 on Redis, L3 on Postgres, PostgresRbacAuthorizer
//! # Each Postgres configuration migrates and seeds a schema of its own (loadtest_<pid>_<n>), and
//! # every schema and Redis key the run created is dropped at the end, on error or Ctrl-C too.
//! cargo run --release --example loadtest -- --mode open --rate 2000 --users 1000 --duration 5
//! cargo run --release --example loadtest -- --mode open --rate 2000 --users 1000 --duration 3 \
//!     --configs bare,l1,no-cache --json /tmp/lt.json --svg /tmp/lt.svg
//!
//! # The comparison: bare, no-cache-pg, l1, l1+l2, l1+l2+l3 on the same open-loop workload, each
//! # as a ratio to bare (REDIS_URL / DATABASE_URL, or the local defaults):
//! # (README "Performance": at 1,000 and 15,000 users, about 3 minutes each)
//! cargo run --release --example loadtest -- --compare --users 15000 --rate 2000 --duration 30 \
//!     --json docs/perf/loadtest-15k.json --svg docs/perf/loadtest-15k.svg
//!
//! # A fleet: 4 instances per configuration (own L1 each, shared Redis and Postgres) behind a
//! # round-robin balancer, one restarted every 5 s; then the same with Redis flushed at 15 s
//! # (README "Fleet": what L2 and L3 are for):
//! cargo run --release --example loadtest -- --fleet 4 --restart-every 5 --rate 1000 --duration 30 \
//!     --redis-url redis://127.0.0.1:6379 --database-url postgres://postgres@127.0.0.1:5432/test
//! cargo run --release --example loadtest -- --fleet 4 --restart-every 5 --flush-redis-at 15 ...
//!
//! # Each configuration's highest throughput with p99 under 5 ms (closed loop, 1, 2, 4, ... loops):
//! cargo run --release --example loadtest -- --saturate 5 --configs bare,l1 --duration 3
//!
//! # Is the generator the bottleneck at this rate? Drive a trivial in-process server:
//! cargo run --release --example loadtest -- --self-test --rate 5000 --duration 3
//!
//! # Drive an app that is already running (its /admin/stats is read with alice-token):
//! cargo run --release --example quickstart &
//! cargo run --release --example loadtest -- --target http://127.0.0.1:3000 --rate 1000 --duration 5
//! ```
//!
//! The workload: `--users` virtual users, each holding a principal drawn once from a Zipf
//! distribution over `--population` principals (`user-1` .. `user-<population>`, rank 1 the most
//! active), and requests whose resource is drawn from a Zipf distribution over `--resources`
//! documents. The mix (`--mix read=90,write=9,admin=1`): read = `GET /documents/{id}` and write =
//! `PUT /documents/{id}` as the user (bearer token `user-<n>`, principal `user-<n>`), admin =
//! `GET /admin/stats` as alice. Roles: every tenth user (`user-10`, `user-20`, ...) is an editor
//! and may write, the others are viewers whose writes get 403, alice is an admin. The in-memory
//! authorizer and the RBAC tables seeded in Postgres (in bulk, `generate_series`) encode the same
//! roles, so every configuration answers the same requests with the same statuses; "success" is
//! the share of requests answered as the roles say (2xx, or 403 for a viewer's write; bare has no
//! authorization and answers 2xx to everything).
//!
//! Against `--target` (the quickstart, which knows only alice, bob and carol) a sampled principal
//! is mapped to one of their tokens (principal % 3), writes go as carol (editor) and admin requests
//! as alice: everything is allowed.
//!
//! The compulsory-miss bound: the generator counts the distinct (principal, resource, action)
//! keys among the requests it sent; a cache without prefetching misses at least once per key, so
//! no cache can hit more than 1 - keys / requests. Each cached configuration's hit rate (hits in
//! any tier / checks, from `GET /admin/stats` before and after) is reported next to it. The cache
//! ttls (`--allow-ttl-s`, `--deny-ttl-s`, 60 s both by default) outlast a run, so no entry expires
//! while it is measured and the bound is reachable.
//!
//! The generator runs on its own runtime (threads `lt-client`, `--client-threads`) plus one pacer
//! thread (`lt-pacer`, open loop); in-process apps run on another (`lt-server`,
//! `--server-threads`). Each thread's CPU time is read from `/proc/self/task/*/schedstat`
//! (nanoseconds), so the report separates the generator's CPU from the server's; the whole
//! machine's busy time (`/proc/stat`, Postgres and Redis included) and the load average are
//! reported beside them.

// Without the `redis` or `postgres` feature, the configurations on those servers are compiled out
// and some of what they share (and imports) is unused.
#![cfg_attr(not(all(feature = "redis", feature = "postgres")), allow(dead_code, unused_variables, unused_imports))]

#[allow(dead_code)]
#[path = "../quickstart.rs"]
mod quickstart;

mod args;
mod backends;
mod client;
mod configs;
mod cpu;
mod driver;
mod fleet;
mod report;
mod runner;
mod saturate;
mod summary;
mod workload;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::net::TcpListener;

use crate::args::{Mode, Opts, USAGE, parse_args};
#[cfg(feature = "postgres")]
use crate::backends::pg_client;
#[cfg(feature = "redis")]
use crate::backends::redis_connection;
use crate::backends::{Backends, CleanOnDrop, Leftovers, redact};
use crate::configs::{local_target, parse_target, start_app, trivial_server};
use crate::cpu::{cpus, loadavg, stat_ticks};
use crate::report::{fmt_us, print_table, svg_chart};
use crate::runner::run_target;
use crate::saturate::{print_saturation, saturate};
use crate::summary::{Summary, per_request_us, ratio};
use crate::workload::Workload;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> ExitCode {
    let opts = match parse_args(std::env::args().skip(1)) {
        Ok(Some(o)) => o,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e} (--help lists the options)");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    match run(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
fn run(o: Opts) -> Result<(), BoxError> {
    let process_start = stat_ticks(std::path::Path::new("/proc/self/stat"));
    let started = Instant::now();
    let load_at_start = loadavg();
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(o.client_threads)
        .thread_name("lt-client")
        .enable_all()
        .build()?;
    let server_rt = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(o.server_threads)
            .thread_name("lt-server")
            .enable_all()
            .build()
    };
    let workload = Arc::new(Workload::new(&o));
    let pid = std::process::id();
    let leftovers = Arc::new(Leftovers {
        redis: o.redis_url.clone().map(|url| (url, format!("loadtest-{pid}"))),
        redis_cluster: o.redis_cluster_nodes.clone().map(|nodes| (nodes, format!("loadtest-{pid}-cluster"))),
        redis_cluster_used: std::sync::atomic::AtomicBool::new(false),
        redis_used: std::sync::atomic::AtomicBool::new(false),
        database_url: o.database_url.clone(),
        schemas: std::sync::Mutex::new(Vec::new()),
    });
    // Whatever way this function ends (error, panic), the schemas and keys go; on Ctrl-C too.
    let _clean = CleanOnDrop(leftovers.clone());
    {
        let leftovers = leftovers.clone();
        client_rt.spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("interrupted: cleaning up");
                leftovers.clean().await;
                std::process::exit(130);
            }
        });
    }

    let mix_total: u64 = o.mix.iter().sum();
    println!(
        "loadtest: mode {} | {} | {} users, {} connections, {} s{} | seed {}",
        if o.mode == Mode::Open { "open" } else { "closed" },
        if o.mode == Mode::Open { format!("{} req/s", o.rate) } else { format!("think {} ms", o.think.as_millis()) },
        o.users,
        o.connections,
        o.duration.as_secs_f64(),
        if o.max_requests == u64::MAX { String::new() } else { format!(", at most {} requests", o.max_requests) },
        o.seed
    );
    println!(
        "machine: {} cpus, load average {} (1 min) at start",
        cpus(),
        load_at_start.map_or("?".to_owned(), |l| format!("{l:.2}"))
    );
    println!(
        "workload: principals Zipf(s={}) over {} ({} distinct among the users), resources Zipf(s={}) over {}, mix read {:.1}% / write {:.1}% / admin {:.1}%",
        o.zipf_s,
        o.population,
        workload.distinct_principals(),
        o.zipf_s,
        o.resources,
        o.mix[0] as f64 * 100.0 / mix_total as f64,
        o.mix[1] as f64 * 100.0 / mix_total as f64,
        o.mix[2] as f64 * 100.0 / mix_total as f64,
    );
    if let Some(url) = &o.target {
        let [alice, bob, carol] = workload.token_share();
        println!(
            "note: the demo has 3 principals: a sampled principal maps to alice/bob/carol (principal % 3) (users: alice {alice}, bob {bob}, carol {carol}), writes go as carol, admin requests as alice"
        );
        println!("target: {url}");
    } else if !o.self_test {
        println!(
            "roles: token user-<n> is principal user-<n>; every tenth user is an editor ({} of the {} users), the others viewers (their writes get 403); admin requests as alice (admin); ttl allow {} s, deny {} s",
            workload.editors(),
            workload.users(),
            o.allow_ttl.as_secs_f64(),
            o.deny_ttl.as_secs_f64()
        );
    }

    let mut runs = Vec::new();
    let mut saturations = Vec::new();
    let mut fleets = Vec::new();
    if o.self_test {
        let rt = server_rt()?;
        let target = rt.block_on(async {
            let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
            let addr = listener.local_addr()?;
            tokio::spawn(trivial_server(listener));
            Ok::<_, BoxError>(local_target("self-test", addr, false, false))
        })?;
        let about = "a trivial server answering 200 \"ok\"".to_owned();
        let run = client_rt.block_on(run_target(&o, target, workload.clone(), about));
        rt.shutdown_timeout(Duration::from_secs(1));
        runs.push(run?);
    } else if let Some(url) = &o.target {
        let about = "an app already running".to_owned();
        runs.push(client_rt.block_on(run_target(&o, parse_target(url)?, workload.clone(), about))?);
    } else {
        let names = o.configs.clone().unwrap_or_else(|| {
            if o.fleet.is_some() {
                let mut all: Vec<String> = ["bare", "no-cache", "l1"].map(str::to_owned).into();
                if o.redis_url.is_some() {
                    all.push("l1+l2".into());
                    if o.database_url.is_some() {
                        all.push("l1+l2+l3".into());
                    }
                }
                return all;
            }
            let mut all: Vec<String> = ["bare", "l1", "no-cache"].map(str::to_owned).into();
            if o.redis_url.is_some() {
                all.push("l1+l2".into());
            }
            if o.redis_cluster_nodes.is_some() {
                all.push("l1+l2-cluster".into());
            }
            if o.database_url.is_some() {
                all.push("no-cache-pg".into());
                if o.redis_url.is_some() {
                    all.push("l1+l2+l3".into());
                }
            }
            all
        });
        // Reachable before anything starts, with a message saying which one is not.
        #[cfg(feature = "redis")]
        if let Some(url) = &o.redis_url {
            client_rt.block_on(redis_connection(url)).map_err(|e| format!("--redis-url: {e}"))?;
        }
        #[cfg(feature = "postgres")]
        if let Some(url) = &o.database_url {
            client_rt
                .block_on(async { pg_client(url).await?.batch_execute("SELECT 1").await.map_err(BoxError::from) })
                .map_err(|e| format!("--database-url {}: {e}", redact(url)))?;
        }
        let backends = Backends {
            redis_url: o.redis_url.clone(),
            redis_cluster_nodes: o.redis_cluster_nodes.clone(),
            database_url: o.database_url.clone(),
            population: o.population as u32,
            allow_ttl: o.allow_ttl,
            deny_ttl: o.deny_ttl,
            leftovers: leftovers.clone(),
        };
        // One configuration at a time, each on a server runtime of its own: when it is shut
        // down, the app, its cache and the cache's background tasks are gone before the next
        // configuration starts, and what it created is deleted.
        for (n, name) in names.iter().enumerate() {
            let rt = server_rt()?;
            if let Some(instances) = o.fleet {
                let run = client_rt.block_on(run_fleet(
                    &o,
                    name,
                    n + 1,
                    instances,
                    &backends,
                    rt.handle().clone(),
                    workload.clone(),
                ));
                rt.shutdown_timeout(Duration::from_secs(1));
                client_rt.block_on(leftovers.clean());
                fleets.push(run?);
                continue;
            }
            let started = rt.block_on(start_app(name, n + 1, &backends));
            let done = started.and_then(|(target, about)| {
                println!("{name}: http://{} ({about})", target.addr);
                if o.saturate.is_some() {
                    saturations.push(client_rt.block_on(saturate(&o, target, workload.clone(), about))?);
                } else {
                    runs.push(client_rt.block_on(run_target(&o, target, workload.clone(), about))?);
                }
                Ok(())
            });
            rt.shutdown_timeout(Duration::from_secs(1));
            client_rt.block_on(leftovers.clean());
            done?;
        }
    }
    client_rt.block_on(leftovers.clean());
    if o.saturate.is_some() {
        print_saturation(&saturations);
        return Ok(());
    }
    if o.fleet.is_some() {
        return report_fleet(&o, &fleets, &workload);
    }

    let sums: Vec<Summary> = runs.into_iter().map(Summary::new).collect();
    println!();
    print_table(&sums);
    println!(
        "\nlatency: from the intended send time ({}); service time: from the actual write; send lag: intended to actual write (queueing plus the generator's own scheduling delay).",
        if o.mode == Mode::Open {
            "t0 + i/rate, so a stall counts for every request scheduled during it: no coordinated omission"
        } else {
            "closed loop: when the user issued the request; a closed loop slows down with the server, so it cannot avoid coordinated omission"
        }
    );
    println!(
        "errors (timeouts, requests still queued at the hard stop) are not in the latency percentiles: read those with the success rate."
    );
    println!(
        "success: answered as the roles say (2xx, or 403 for a viewer's write where the app authorizes) / requests issued."
    );
    println!(
        "compulsory-miss bound: 1 - distinct (principal, resource, action) keys / requests sent: the best hit rate a cache without prefetching can reach on this request stream."
    );
    if sums.iter().any(|s| s.cache.is_some()) {
        println!(
            "cache counters: GET /admin/stats (alice-token) before and after the run; the second read counts its own check. hit rate = hits in any tier / checks (L1 hits + L1 misses)."
        );
    }
    println!(
        "CPU: per thread from /proc/self/task/*/schedstat (ns): generator = lt-client + lt-pacer threads, app = lt-server threads; % of one core over the run. postgres / redis CPU: every postgres and redis-server process (/proc/<pid>/stat, 10 ms ticks), whoever their clients: a configuration that uses neither shows the other clients' share."
    );
    if let Some(b) = sums.iter().find(|s| s.name == "bare") {
        let mut checks = Vec::new();
        for s in sums.iter().filter(|s| s.cached) {
            checks.push((
                format!("{}: success {:.2}% (target 100%)", s.name, s.success() * 100.0),
                s.expected == s.issued,
            ));
            if let (Some(h), Some(bound)) = (s.hit_rate(), s.bound()) {
                checks.push((
                    format!(
                        "{}: hit rate {:.2}% vs compulsory-miss bound {:.2}%: {:+.2} points (target within 1)",
                        s.name,
                        h * 100.0,
                        bound * 100.0,
                        (h - bound) * 100.0
                    ),
                    (h - bound).abs() <= 0.01,
                ));
            }
        }
        if let Some(l1) = sums.iter().find(|s| s.name == "l1") {
            let r = ratio(l1.latency.p99, b.latency.p99).unwrap_or(f64::INFINITY);
            checks.push((format!("l1: p99 {r:.2}x bare (target at most 1.5x)"), r <= 1.5));
        }
        if b.latency.p99 > 0.0 {
            checks.push((
                format!("bare: p99 {} (target under 5 ms at this rate)", fmt_us(b.latency.p99)),
                b.latency.p99 < 5000.0,
            ));
        }
        if !checks.is_empty() {
            println!(
                "
targets:"
            );
            for (what, met) in checks {
                println!("  [{}] {what}", if met { "met" } else { "MISSED" });
            }
        }
        if let Some(pg) = sums.iter().find(|s| s.name == "no-cache-pg") {
            for s in sums.iter().filter(|s| s.cached) {
                println!(
                    "  {} vs no-cache-pg: p50 {:.2}x, p99 {:.2}x, authorizer calls {} vs {}",
                    s.name,
                    ratio(s.latency.p50, pg.latency.p50).unwrap_or(f64::NAN),
                    ratio(s.latency.p99, pg.latency.p99).unwrap_or(f64::NAN),
                    s.cache.map_or(0, |c| c.authorizer_calls),
                    pg.cache.map_or(0, |c| c.authorizer_calls),
                );
            }
        }
    }

    for s in &sums {
        let busy = s.cpu_share(s.cpu.generator_ns);
        if busy > 0.85 * o.client_threads as f64 {
            println!(
                "warning: {}: the generator was busy {:.0}% of the run on {} client thread(s): it may be a bottleneck, so this run measures the tool as well as the app (try --client-threads, or less load)",
                s.name,
                busy * 100.0,
                o.client_threads
            );
        }
    }

    let process_cpu_s = match (process_start, stat_ticks(std::path::Path::new("/proc/self/stat"))) {
        (Some(a), Some(b)) => Some((b - a) as f64 / 100.0),
        _ => None,
    };
    if let Some(s) = process_cpu_s {
        println!(
            "process CPU (all threads, apps included, /proc/self/stat utime+stime assuming CLK_TCK = 100 Hz): {s:.2} s over {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }

    if o.self_test {
        if let Some(s) = sums.first() {
            let errors: u64 = s.errors.iter().map(|e| e.1).sum();
            let achieved = s.throughput;
            let keeps_up = achieved >= o.rate * 0.99 && errors == 0 && s.lag.p99 < 1000.0;
            println!(
                "\nself-test: requested {} req/s, achieved {achieved:.0} req/s ({:.1}%), p99 {}, send lag p99 {}, errors {errors}, generator CPU {:.0}% of one core ({:.1} µs/request)",
                o.rate,
                achieved * 100.0 / o.rate,
                fmt_us(s.latency.p99),
                fmt_us(s.lag.p99),
                s.cpu_share(s.cpu.generator_ns) * 100.0,
                per_request_us(s.cpu.generator_ns, s.issued)
            );
            println!(
                "self-test: {}",
                if keeps_up {
                    "the generator keeps up at this rate (achieved >= 99%, no errors, send lag p99 < 1 ms): it is not the bottleneck"
                } else {
                    "the generator does NOT keep up at this rate on this machine: results at this rate measure the tool, not the app"
                }
            );
        }
    }

    let load = [load_at_start, loadavg()];
    let subtitle = vec![
        format!(
            "{} loop, {}, {} users (principals Zipf over {}), {} connections, {} s per configuration, seed {}",
            if o.mode == Mode::Open { "open" } else { "closed" },
            if o.mode == Mode::Open {
                format!("{} req/s", o.rate)
            } else {
                format!("think {} ms", o.think.as_millis())
            },
            o.users,
            o.population,
            o.connections,
            o.duration.as_secs_f64(),
            o.seed,
        ),
        format!(
            "{} cpus, load average {}{}",
            cpus(),
            load.map(|l| l.map_or("?".to_owned(), |l| format!("{l:.2}"))).join(" -> "),
            sums.first().and_then(Summary::bound).map_or(String::new(), |b| format!(
                "; compulsory-miss bound (best possible hit rate) {:.2}%",
                b * 100.0
            )),
        ),
    ];
    if let Some(path) = &o.json {
        let base = sums.iter().find(|s| s.name == "bare");
        let doc = json!({
            "options": {
                "mode": if o.mode == Mode::Open { "open" } else { "closed" },
                "rate": (o.mode == Mode::Open).then_some(o.rate),
                "think_ms": (o.mode == Mode::Closed).then_some(o.think.as_millis() as u64),
                "users": o.users,
                "population": o.population,
                "resources": o.resources,
                "zipf_s": o.zipf_s,
                "mix": { "read": o.mix[0], "write": o.mix[1], "admin": o.mix[2] },
                "seed": o.seed,
                "connections": o.connections,
                "duration_s": o.duration.as_secs_f64(),
                "max_requests": (o.max_requests != u64::MAX).then_some(o.max_requests),
                "self_test": o.self_test,
                "compare": o.compare,
            },
            "workload": if o.target.is_some() {
                let [alice, bob, carol] = workload.token_share();
                json!({
                    "tokens": "demo",
                    "note": "the demo has 3 principals: a sampled principal maps to alice/bob/carol (principal % 3); writes as carol, admin requests as alice",
                    "distinct_principals": workload.distinct_principals(),
                    "users_by_token": { "alice": alice, "bob": bob, "carol": carol },
                })
            } else {
                json!({
                    "tokens": "population",
                    "note": "token user-<n> is principal user-<n>; every tenth user is an editor, the others viewers (writes denied); admin requests as alice",
                    "distinct_principals": workload.distinct_principals(),
                    "editors_among_users": workload.editors(),
                    "allow_ttl_s": o.allow_ttl.as_secs_f64(),
                    "deny_ttl_s": o.deny_ttl.as_secs_f64(),
                })
            },
            "machine": {
                "cpus": cpus(),
                "load_average_1m": { "start": load[0], "end": load[1] },
            },
            "latency_note": "latency_us from the intended send time; service_time_us from the actual write; send_lag_us between the two",
            "configs": sums.iter().map(|s| s.json(base, o.client_threads)).collect::<Vec<_>>(),
            "process_cpu_s": process_cpu_s,
            "process_cpu_clk_tck_assumed": 100,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n").map_err(|e| format!("--json {path}: {e}"))?;
        println!("wrote {path}");
    }
    if let Some(path) = &o.svg {
        std::fs::write(path, svg_chart(&sums, &subtitle)).map_err(|e| format!("--svg {path}: {e}"))?;
        println!("wrote {path}");
    }
    Ok(())
}

/// One configuration as a fleet: starts it, drives it, stops it.
async fn run_fleet(
    o: &Opts,
    name: &str,
    config: usize,
    instances: usize,
    backends: &backends::Backends,
    server: tokio::runtime::Handle,
    workload: Arc<Workload>,
) -> Result<fleet::FleetRun, BoxError> {
    let f = fleet::Fleet::start(
        name,
        config,
        instances,
        backends,
        server,
        o.restart_every,
        o.restart_window,
        o.flush_redis_at,
    )
    .await?;
    let authorizes = name != "bare";
    let target = Arc::new(driver::Target {
        name: name.to_owned(),
        addr: f.route(0).0,
        host: "fleet".to_owned(),
        stats: false,
        local: true,
        tokens: workload::Tokens::Population,
        authorizes,
        cached: authorizes && name != "no-cache",
        fleet: Some(f.clone()),
    });
    println!("{name}: a fleet of {instances} instances");
    let run = run_target(o, target, workload, format!("{name}, {instances} instances")).await;
    f.stop();
    let run = run?;
    let events = std::mem::take(&mut *f.events.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(fleet::FleetRun {
        summary: Summary::new(run),
        instances,
        restarts: events.restarts,
        windows: events.windows,
        flushed: events.flushed,
    })
}

/// The fleet table, its targets, and the JSON and chart when asked for.
fn report_fleet(o: &Opts, runs: &[fleet::FleetRun], workload: &Workload) -> Result<(), BoxError> {
    fleet::print_fleet(runs, o.restart_every, o.restart_window, o.flush_redis_at.is_some());
    let subtitle = vec![format!(
        "{} instances, round robin, a restart every {:.0} s{}; open loop {} req/s, {} s; {} users (Zipf s={} over {} principals), {} documents",
        o.fleet.unwrap_or(1),
        o.restart_every.as_secs_f64(),
        o.flush_redis_at.map_or(String::new(), |at| format!(", Redis flushed at {:.0} s", at.as_secs_f64())),
        o.rate,
        o.duration.as_secs_f64(),
        workload.users(),
        o.zipf_s,
        o.population,
        o.resources,
    )];
    if let Some(path) = &o.json {
        let base = runs.iter().find(|r| r.summary.name == "bare").map(|r| &r.summary);
        let doc = json!({
            "fleet": {
                "instances": o.fleet,
                "restart_every_s": o.restart_every.as_secs_f64(),
                "restart_window_s": o.restart_window.as_secs_f64(),
                "flush_redis_at_s": o.flush_redis_at.map(|d| d.as_secs_f64()),
            },
            "options": { "rate": o.rate, "duration_s": o.duration.as_secs_f64(), "users": o.users, "population": o.population, "resources": o.resources, "zipf_s": o.zipf_s, "seed": o.seed, "connections": o.connections },
            "configs": runs.iter().map(|r| {
                let mut v = r.summary.json(base, o.client_threads);
                v["fleet"] = json!({
                    "restarts": r.restarts,
                    "authorizer_calls_per_request": r.calls_per_request(),
                    "compulsory_calls_per_request": r.compulsory(),
                    "redis_keys_flushed": r.flushed,
                    "restart_windows": {
                        "requests": r.summary.window_sent,
                        "answered_as_expected": r.summary.window_expected,
                        "latency_us": summary::pcts_json(&r.summary.window_latency),
                        "authorizer_calls": r.windows.authorizer_calls,
                        "authorizer_calls_per_request": r.window_calls_per_request(),
                    },
                });
                v
            }).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n").map_err(|e| format!("--json {path}: {e}"))?;
        println!("wrote {path}");
    }
    if let Some(path) = &o.svg {
        std::fs::write(path, fleet::fleet_svg(runs, &subtitle)).map_err(|e| format!("--svg {path}: {e}"))?;
        println!("wrote {path}");
    }
    Ok(())
}
