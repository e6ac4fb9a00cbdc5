//! Command-line options: the usage text, `Opts` and its parser.

use std::time::Duration;

pub(crate) const USAGE: &str = "\
usage: cargo run --release --example loadtest -- [options]

what to drive (default: every in-process configuration available):
  --configs LIST        in-process apps to run, one after the other:
                        bare,l1,no-cache[,l1+l2][,l1+l2-cluster][,no-cache-pg][,l1+l2+l3]
  --compare             bare,no-cache-pg,l1,l1+l2,l1+l2+l3 in open loop, as ratios to bare; the URLs
                        default to $REDIS_URL / $DATABASE_URL, else the local servers below
  --redis-url URL       also run l1+l2 (L2 on Redis, namespace loadtest-<pid>, deleted at the end)
                        (--compare default: redis://127.0.0.1:6379)
  --redis-cluster-nodes URLS
                        also run l1+l2-cluster (L2 on a Redis Cluster, comma-separated seed
                        URLs; namespace loadtest-<pid>, deleted at the end)
  --database-url URL    also run no-cache-pg and, with --redis-url, l1+l2+l3 (each in a schema of
                        its own, loadtest_<pid>_<n>, seeded with --population users, dropped at the
                        end) (--compare default: postgres://postgres@127.0.0.1:5432/test)
  --target URL          drive one running app instead (http://host:port)
  --self-test           drive a trivial in-process server (fixed 200 \"ok\") in open loop at --rate
                        and report whether the generator keeps up
  --fleet N             run each configuration as N instances (own L1 each, shared Redis and
                        Postgres) behind a round-robin balancer, one restarted every
                        --restart-every seconds: configurations bare,no-cache,l1[,l1+l2][,l1+l2+l3]
  --restart-every S     fleet: seconds between rolling restarts (default 5)
  --restart-window-s S  fleet: how long after each restart counts as its window (default 1)
  --flush-redis-at S    fleet: delete the run's Redis namespace S seconds in (Redis losing all)
  --saturate P99_MS     each configuration's highest throughput with p99 at most P99_MS: closed
                        loop, no think time, 1, 2, 4, ... concurrent request loops (up to
                        --connections), --duration each; reported as a ratio to bare's

workload:
  --mode open|closed    open: a fixed rate, latency from the intended send time (default open)
  --rate R              open loop: requests per second in total (default 1000)
  --think-ms T          closed loop: each user waits T ms after each response (default 100)
  --users N             virtual users (default 1000)
  --population N        principals the users' principals are drawn from, Zipf (default 100000)
  --resources N         documents the requests' resources are drawn from, Zipf (default 1000)
  --zipf-s S            Zipf exponent of both distributions (default 1.1)
  --mix SPEC            read=90,write=9,admin=1 (the default)
  --seed N              PRNG seed (default 1); every configuration gets the same workload
  --connections C       keep-alive connections (default 64)
  --allow-ttl-s S       how long the in-process caches keep an allow (default 60)
  --deny-ttl-s S        ... and a deny (default 60, the library's default is 10: runs of up to a
                        minute then see no expiry, and the compulsory-miss bound is reachable)

bounds:
  --duration S          seconds of load per configuration (default 5)
  --max-requests N      stop after N requests per configuration
  --timeout-ms T        per-request timeout (default 2000)
  --drain-s S           after --duration, time allowed to finish the backlog (default 2)

output:
  --json FILE           the results as JSON
  --svg FILE            a latency-percentile chart (log scale)
  --client-threads N    generator runtime threads (default 1)
  --server-threads N    in-process apps' runtime threads (default 1)
";

/// Every in-process configuration.
pub(crate) const CONFIGS: [&str; 7] = ["bare", "l1", "no-cache", "l1+l2", "l1+l2-cluster", "no-cache-pg", "l1+l2+l3"];
/// The configurations `--compare` runs, in order.
pub(crate) const COMPARE: [&str; 5] = ["bare", "no-cache-pg", "l1", "l1+l2", "l1+l2+l3"];
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Open,
    Closed,
}
#[derive(Clone, Debug)]
pub(crate) struct Opts {
    pub(crate) mode: Mode,
    pub(crate) rate: f64,
    pub(crate) think: Duration,
    pub(crate) users: usize,
    pub(crate) population: usize,
    pub(crate) resources: usize,
    pub(crate) zipf_s: f64,
    pub(crate) mix: [u64; 3],
    pub(crate) seed: u64,
    pub(crate) connections: usize,
    pub(crate) duration: Duration,
    pub(crate) max_requests: u64,
    pub(crate) timeout: Duration,
    pub(crate) drain: Duration,
    pub(crate) configs: Option<Vec<String>>,
    pub(crate) compare: bool,
    pub(crate) redis_url: Option<String>,
    pub(crate) redis_cluster_nodes: Option<Vec<String>>,
    pub(crate) database_url: Option<String>,
    pub(crate) allow_ttl: Duration,
    pub(crate) deny_ttl: Duration,
    pub(crate) target: Option<String>,
    pub(crate) self_test: bool,
    pub(crate) json: Option<String>,
    pub(crate) svg: Option<String>,
    pub(crate) client_threads: usize,
    pub(crate) server_threads: usize,
    /// `--fleet`: instances per configuration; the restarts, their windows, the flush.
    pub(crate) fleet: Option<usize>,
    pub(crate) restart_every: Duration,
    pub(crate) restart_window: Duration,
    pub(crate) flush_redis_at: Option<Duration>,
    /// `--saturate`: the p99 limit.
    pub(crate) saturate: Option<Duration>,
    /// Closed loop: this many request loops, each drawing a user per request (`None`: one loop
    /// per user, with think time).
    pub(crate) loops: Option<usize>,
}
impl Default for Opts {
    fn default() -> Self {
        Opts {
            mode: Mode::Open,
            rate: 1000.0,
            think: Duration::from_millis(100),
            users: 1000,
            population: 100_000,
            resources: 1000,
            zipf_s: 1.1,
            mix: [90, 9, 1],
            seed: 1,
            connections: 64,
            duration: Duration::from_secs(5),
            max_requests: u64::MAX,
            timeout: Duration::from_secs(2),
            drain: Duration::from_secs(2),
            configs: None,
            compare: false,
            redis_url: None,
            redis_cluster_nodes: None,
            database_url: None,
            allow_ttl: Duration::from_secs(60),
            deny_ttl: Duration::from_secs(60),
            target: None,
            self_test: false,
            json: None,
            svg: None,
            client_threads: 1,
            server_threads: 1,
            fleet: None,
            restart_every: Duration::from_secs(5),
            restart_window: Duration::from_secs(1),
            flush_redis_at: None,
            saturate: None,
            loops: None,
        }
    }
}
pub(crate) fn num<T: std::str::FromStr>(name: &str, v: &str) -> Result<T, String> {
    v.parse().map_err(|_| format!("{name} {v:?}: not a valid number"))
}
pub(crate) fn seconds(name: &str, v: &str) -> Result<Duration, String> {
    let s: f64 = num(name, v)?;
    if !(s.is_finite() && (0.0..=3600.0).contains(&s)) {
        return Err(format!("{name} {v:?}: expected seconds from 0 to 3600"));
    }
    Ok(Duration::from_secs_f64(s))
}
pub(crate) fn parse_mix(v: &str) -> Result<[u64; 3], String> {
    let mut mix = [0u64; 3];
    for part in v.split(',').filter(|p| !p.is_empty()) {
        let (k, w) = part.split_once('=').ok_or_else(|| format!("--mix {v:?}: expected read=90,write=9,admin=1"))?;
        let i = match k.trim() {
            "read" => 0,
            "write" => 1,
            "admin" => 2,
            other => return Err(format!("--mix: unknown kind {other:?} (read, write, admin)")),
        };
        mix[i] = num("--mix", w.trim())?;
    }
    if mix.iter().sum::<u64>() == 0 {
        return Err(format!("--mix {v:?}: the weights add up to zero"));
    }
    Ok(mix)
}
/// `Ok(None)` for `--help`.
pub(crate) fn parse_args(args: impl Iterator<Item = String>) -> Result<Option<Opts>, String> {
    let mut o = Opts::default();
    let mut it = args;
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = || inline.clone().or_else(|| it.next()).ok_or_else(|| format!("{name} needs a value"));
        match name.as_str() {
            "-h" | "--help" => return Ok(None),
            "--self-test" => o.self_test = true,
            "--mode" => {
                o.mode = match value()?.as_str() {
                    "open" => Mode::Open,
                    "closed" => Mode::Closed,
                    m => return Err(format!("--mode {m:?}: expected open or closed")),
                }
            }
            "--rate" => o.rate = num(&name, &value()?)?,
            "--think-ms" => o.think = Duration::from_millis(num(&name, &value()?)?),
            "--users" => o.users = num(&name, &value()?)?,
            "--population" => o.population = num(&name, &value()?)?,
            "--resources" => o.resources = num(&name, &value()?)?,
            "--zipf-s" => o.zipf_s = num(&name, &value()?)?,
            "--mix" => o.mix = parse_mix(&value()?)?,
            "--seed" => o.seed = num(&name, &value()?)?,
            "--connections" => o.connections = num(&name, &value()?)?,
            "--duration" => o.duration = seconds(&name, &value()?)?,
            "--max-requests" => o.max_requests = num(&name, &value()?)?,
            "--timeout-ms" => o.timeout = Duration::from_millis(num(&name, &value()?)?),
            "--drain-s" => o.drain = seconds(&name, &value()?)?,
            "--configs" => o.configs = Some(value()?.split(',').filter(|c| !c.is_empty()).map(str::to_owned).collect()),
            "--compare" => o.compare = true,
            "--redis-url" => o.redis_url = Some(value()?),
            "--redis-cluster-nodes" => {
                o.redis_cluster_nodes = Some(value()?.split(',').map(|n| n.trim().to_owned()).collect())
            }
            "--database-url" => o.database_url = Some(value()?),
            "--allow-ttl-s" => o.allow_ttl = seconds(&name, &value()?)?,
            "--deny-ttl-s" => o.deny_ttl = seconds(&name, &value()?)?,
            "--target" => o.target = Some(value()?),
            "--json" => o.json = Some(value()?),
            "--svg" => o.svg = Some(value()?),
            "--client-threads" => o.client_threads = num(&name, &value()?)?,
            "--server-threads" => o.server_threads = num(&name, &value()?)?,
            "--fleet" => o.fleet = Some(num(&name, &value()?)?),
            "--restart-every" => o.restart_every = seconds(&name, &value()?)?,
            "--restart-window-s" => o.restart_window = seconds(&name, &value()?)?,
            "--flush-redis-at" => o.flush_redis_at = Some(seconds(&name, &value()?)?),
            "--saturate" => {
                let ms: f64 = num(&name, &value()?)?;
                if !(ms.is_finite() && ms > 0.0 && ms <= 60_000.0) {
                    return Err(format!("--saturate {ms}: expected a p99 limit in ms, above 0"));
                }
                o.saturate = Some(Duration::from_secs_f64(ms / 1000.0));
            }
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    if !(o.rate.is_finite() && o.rate > 0.0) {
        return Err("--rate must be above 0".into());
    }
    if !(o.zipf_s.is_finite() && o.zipf_s >= 0.0) {
        return Err("--zipf-s must be 0 or more".into());
    }
    if o.users == 0 || o.population == 0 || o.resources == 0 || o.connections == 0 || o.max_requests == 0 {
        return Err("--users, --population, --resources, --connections and --max-requests must be at least 1".into());
    }
    if o.duration.is_zero() {
        return Err("--duration must be above 0".into());
    }
    if o.client_threads == 0 || o.server_threads == 0 {
        return Err("--client-threads and --server-threads must be at least 1".into());
    }
    let in_process = o.configs.is_some()
        || o.compare
        || o.redis_url.is_some()
        || o.redis_cluster_nodes.is_some()
        || o.database_url.is_some();
    if o.target.is_some() && in_process {
        return Err(
            "--target drives a running app: --configs, --compare, --redis-url and --database-url start in-process apps"
                .into(),
        );
    }
    if let Some(n) = o.fleet {
        if !(1..=64).contains(&n) || o.self_test || o.target.is_some() || o.compare || o.saturate.is_some() {
            return Err("--fleet N (1 to 64) runs in-process configurations in open loop: no --self-test, --target, --compare or --saturate".into());
        }
        if o.mode == Mode::Closed || o.restart_every.is_zero() || o.restart_window > o.restart_every {
            return Err("--fleet runs in open loop, with --restart-every above 0 and --restart-window-s at most --restart-every".into());
        }
        if o.flush_redis_at.is_some() && o.redis_url.is_none() {
            return Err("--flush-redis-at needs --redis-url".into());
        }
        if let Some(c) =
            o.configs.iter().flatten().find(|c| !["bare", "no-cache", "l1", "l1+l2", "l1+l2+l3"].contains(&c.as_str()))
        {
            return Err(format!("--fleet: configuration {c:?} is not available (bare, no-cache, l1, l1+l2, l1+l2+l3)"));
        }
        // Round robin over the instances: every instance gets the same number of connections.
        o.connections = o.connections.div_ceil(n) * n;
    } else if o.flush_redis_at.is_some() {
        return Err("--flush-redis-at is for --fleet".into());
    }
    if o.saturate.is_some() && (o.self_test || o.target.is_some() || o.compare) {
        return Err("--saturate steps in-process configurations (--configs, or the default set)".into());
    }
    if o.self_test && (o.target.is_some() || in_process || o.mode == Mode::Closed) {
        return Err("--self-test runs the open-loop driver against its own trivial server only".into());
    }
    if o.compare {
        if o.configs.is_some() || o.mode == Mode::Closed {
            return Err("--compare runs its own configurations in open loop: drop --configs and --mode closed".into());
        }
        o.configs = Some(COMPARE.iter().map(|c| (*c).to_owned()).collect());
        if o.redis_url.is_none() {
            o.redis_url = Some(std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()));
        }
        if o.database_url.is_none() {
            o.database_url = Some(
                std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
            );
        }
    }
    if o.population > u32::MAX as usize / 2 || o.resources > u32::MAX as usize / 2 {
        return Err("--population and --resources must be below 2^31".into());
    }
    if let Some(configs) = &o.configs {
        for c in configs {
            if !CONFIGS.contains(&c.as_str()) {
                return Err(format!("--configs: unknown configuration {c:?} ({})", CONFIGS.join(", ")));
            }
            if c == "l1+l2-cluster" {
                if o.redis_cluster_nodes.is_none() {
                    return Err(format!("--configs {c} needs --redis-cluster-nodes"));
                }
            } else if c.contains("l2") && o.redis_url.is_none() {
                return Err(format!("--configs {c} needs --redis-url"));
            }
            if (c.contains("l3") || c.ends_with("-pg")) && o.database_url.is_none() {
                return Err(format!("--configs {c} needs --database-url"));
            }
        }
        if configs.is_empty() {
            return Err("--configs: no configuration given".into());
        }
    }
    Ok(Some(o))
}
