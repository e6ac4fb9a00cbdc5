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
// and some of what they share is unused.
#![cfg_attr(not(all(feature = "redis", feature = "postgres")), allow(dead_code, unused_variables))]

#[allow(dead_code)]
#[path = "quickstart.rs"]
mod quickstart;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tower_authz_cache::{AuthzCache, Decision, Permission, Principal};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const USAGE: &str = "\
usage: cargo run --release --example loadtest -- [options]

what to drive (default: every in-process configuration available):
  --configs LIST        in-process apps to run, one after the other:
                        bare,l1,no-cache[,l1+l2][,no-cache-pg][,l1+l2+l3]
  --compare             bare,no-cache-pg,l1,l1+l2,l1+l2+l3 in open loop, as ratios to bare; the URLs
                        default to $REDIS_URL / $DATABASE_URL, else the local servers below
  --redis-url URL       also run l1+l2 (L2 on Redis, namespace loadtest-<pid>, deleted at the end)
                        (--compare default: redis://127.0.0.1:6379)
  --database-url URL    also run no-cache-pg and, with --redis-url, l1+l2+l3 (each in a schema of
                        its own, loadtest_<pid>_<n>, seeded with --population users, dropped at the
                        end) (--compare default: postgres://postgres@127.0.0.1:5432/test)
  --target URL          drive one running app instead (http://host:port)
  --self-test           drive a trivial in-process server (fixed 200 \"ok\") in open loop at --rate
                        and report whether the generator keeps up

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

// ---------------------------------------------------------------------------------------------
// Options

/// Every in-process configuration.
const CONFIGS: [&str; 6] = ["bare", "l1", "no-cache", "l1+l2", "no-cache-pg", "l1+l2+l3"];
/// The configurations `--compare` runs, in order.
const COMPARE: [&str; 5] = ["bare", "no-cache-pg", "l1", "l1+l2", "l1+l2+l3"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Open,
    Closed,
}

#[derive(Clone, Debug)]
struct Opts {
    mode: Mode,
    rate: f64,
    think: Duration,
    users: usize,
    population: usize,
    resources: usize,
    zipf_s: f64,
    mix: [u64; 3],
    seed: u64,
    connections: usize,
    duration: Duration,
    max_requests: u64,
    timeout: Duration,
    drain: Duration,
    configs: Option<Vec<String>>,
    compare: bool,
    redis_url: Option<String>,
    database_url: Option<String>,
    allow_ttl: Duration,
    deny_ttl: Duration,
    target: Option<String>,
    self_test: bool,
    json: Option<String>,
    svg: Option<String>,
    client_threads: usize,
    server_threads: usize,
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
            database_url: None,
            allow_ttl: Duration::from_secs(60),
            deny_ttl: Duration::from_secs(60),
            target: None,
            self_test: false,
            json: None,
            svg: None,
            client_threads: 1,
            server_threads: 1,
        }
    }
}

fn num<T: std::str::FromStr>(name: &str, v: &str) -> Result<T, String> {
    v.parse().map_err(|_| format!("{name} {v:?}: not a valid number"))
}

fn seconds(name: &str, v: &str) -> Result<Duration, String> {
    let s: f64 = num(name, v)?;
    if !(s.is_finite() && (0.0..=3600.0).contains(&s)) {
        return Err(format!("{name} {v:?}: expected seconds from 0 to 3600"));
    }
    Ok(Duration::from_secs_f64(s))
}

fn parse_mix(v: &str) -> Result<[u64; 3], String> {
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
fn parse_args(args: impl Iterator<Item = String>) -> Result<Option<Opts>, String> {
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
            "--database-url" => o.database_url = Some(value()?),
            "--allow-ttl-s" => o.allow_ttl = seconds(&name, &value()?)?,
            "--deny-ttl-s" => o.deny_ttl = seconds(&name, &value()?)?,
            "--target" => o.target = Some(value()?),
            "--json" => o.json = Some(value()?),
            "--svg" => o.svg = Some(value()?),
            "--client-threads" => o.client_threads = num(&name, &value()?)?,
            "--server-threads" => o.server_threads = num(&name, &value()?)?,
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
    let in_process = o.configs.is_some() || o.compare || o.redis_url.is_some() || o.database_url.is_some();
    if o.target.is_some() && in_process {
        return Err(
            "--target drives a running app: --configs, --compare, --redis-url and --database-url start in-process apps"
                .into(),
        );
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
            if c.contains("l2") && o.redis_url.is_none() {
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

// ---------------------------------------------------------------------------------------------
// Workload: a splitmix64 PRNG, a Zipf sampler, the request mix

/// splitmix64: small, fast, and good enough for workload generation.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        let mut r = Rng(seed);
        r.next_u64();
        r
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [0, n).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// Zipf over ranks 1..=n with exponent s: inverse CDF over precomputed cumulative weights.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n)
            .map(|k| {
                acc += (k as f64).powf(-s);
                acc
            })
            .collect();
        for c in &mut cdf {
            *c /= acc;
        }
        if let Some(last) = cdf.last_mut() {
            *last = 1.0;
        }
        Zipf { cdf }
    }

    /// A rank in 1..=n.
    fn sample(&self, rng: &mut Rng) -> u32 {
        let u = rng.f64();
        let i = self.cdf.partition_point(|&c| c <= u).min(self.cdf.len() - 1);
        i as u32 + 1
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Admin,
}

const DEMO_USERS: [&str; 3] = ["alice", "bob", "carol"];

/// Who the requests are made as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tokens {
    /// The quickstart's three demo users (`--target`).
    Demo,
    /// The population itself: token and principal `user-<n>` (in-process apps).
    Population,
}

#[derive(Clone, Copy, Debug)]
struct Req {
    kind: Kind,
    /// The user's principal, a rank in 1..=population (admin requests are made as alice).
    principal: u32,
    resource: u32,
}

/// The roles every in-process configuration encodes (in memory, or seeded into Postgres): alice
/// is an admin, every tenth user an editor, the others viewers.
fn is_editor(principal: u32) -> bool {
    principal % 10 == 0
}

impl Req {
    /// Whose token the request carries: 0 for alice, else `user-<n>` (population) or the demo
    /// user's index + 1 (demo).
    fn who(&self, tokens: Tokens) -> u32 {
        match (tokens, self.kind) {
            (_, Kind::Admin) => 0,
            (Tokens::Population, _) => self.principal,
            (Tokens::Demo, Kind::Read) => (self.principal - 1) % 3 + 1,
            (Tokens::Demo, Kind::Write) => 3,
        }
    }

    /// The decision cache's key for this request, packed: who, action, resource.
    fn key(&self, tokens: Tokens) -> u64 {
        let (action, resource) = match self.kind {
            Kind::Read => (0, self.resource),
            Kind::Write => (1, self.resource),
            Kind::Admin => (2, 0),
        };
        (u64::from(self.who(tokens)) << 34) | (action << 32) | u64::from(resource)
    }

    /// Whether the roles deny it (a viewer's write; only in-process apps know the population).
    fn denied(&self, tokens: Tokens) -> bool {
        tokens == Tokens::Population && self.kind == Kind::Write && !is_editor(self.principal)
    }
}

struct Workload {
    /// Each virtual user's principal (a rank in 1..=population).
    principals: Vec<u32>,
    resources: Zipf,
    mix: [u64; 3],
}

impl Workload {
    fn new(o: &Opts) -> Self {
        let population = Zipf::new(o.population, o.zipf_s);
        let mut rng = Rng::new(o.seed ^ 0x7573_6572_7300_0001);
        let principals: Vec<u32> = (0..o.users).map(|_| population.sample(&mut rng)).collect();
        Workload { principals, resources: Zipf::new(o.resources, o.zipf_s), mix: o.mix }
    }

    fn users(&self) -> usize {
        self.principals.len()
    }

    fn request(&self, user: usize, rng: &mut Rng) -> Req {
        let total: u64 = self.mix.iter().sum();
        let pick = rng.below(total);
        let resource = self.resources.sample(rng);
        let principal = self.principals[user];
        let kind = if pick < self.mix[0] {
            Kind::Read
        } else if pick < self.mix[0] + self.mix[1] {
            Kind::Write
        } else {
            Kind::Admin
        };
        Req { kind, principal, resource }
    }

    /// Against the demo: how many users map to alice, bob and carol.
    fn token_share(&self) -> [usize; 3] {
        let mut share = [0; 3];
        for &p in &self.principals {
            share[((p - 1) % 3) as usize] += 1;
        }
        share
    }

    fn distinct_principals(&self) -> usize {
        self.principals.iter().collect::<BTreeSet<_>>().len()
    }

    fn editors(&self) -> usize {
        self.principals.iter().filter(|p| is_editor(**p)).count()
    }
}

// ---------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 keep-alive client

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ErrKind {
    Connect,
    Timeout,
    Closed,
    Io,
    Protocol,
    Unsent,
}

const ERR_KINDS: [ErrKind; 6] =
    [ErrKind::Connect, ErrKind::Timeout, ErrKind::Closed, ErrKind::Io, ErrKind::Protocol, ErrKind::Unsent];

impl ErrKind {
    fn name(self) -> &'static str {
        match self {
            ErrKind::Connect => "connect",
            ErrKind::Timeout => "timeout",
            ErrKind::Closed => "closed by peer",
            ErrKind::Io => "i/o",
            ErrKind::Protocol => "bad response",
            ErrKind::Unsent => "unsent at stop",
        }
    }
}

const MAX_HEAD: usize = 64 << 10;
const MAX_BODY: usize = 16 << 20;

async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ErrKind> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        _ => Err(ErrKind::Connect),
    }
}

fn write_request(buf: &mut String, host: &str, req: Req, tokens: Tokens) {
    buf.clear();
    struct Token(Tokens, u32);
    impl std::fmt::Display for Token {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match *self {
                Token(_, 0) => f.write_str("alice-token"),
                Token(Tokens::Population, n) => write!(f, "user-{n}"),
                Token(Tokens::Demo, n) => write!(f, "{}-token", DEMO_USERS[(n as usize - 1) % 3]),
            }
        }
    }
    let token = Token(tokens, req.who(tokens));
    let _ = match req.kind {
        Kind::Read => write!(
            buf,
            "GET /documents/{} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\r\n",
            req.resource
        ),
        Kind::Write => write!(
            buf,
            "PUT /documents/{} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n",
            req.resource
        ),
        Kind::Admin => {
            write!(buf, "GET /admin/stats HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\r\n")
        }
    };
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

struct Response {
    status: u16,
    keep_alive: bool,
    body: std::ops::Range<usize>,
}

/// Writes one request and reads one response into `rbuf`: a status line, headers and a
/// `Content-Length` body (none for 204 and 304). Anything else (chunked, no length, extra bytes,
/// 1xx) is an error, after which the caller drops the connection.
async fn exchange(stream: &mut TcpStream, req: &[u8], rbuf: &mut Vec<u8>) -> Result<Response, ErrKind> {
    stream.write_all(req).await.map_err(|_| ErrKind::Io)?;
    rbuf.clear();
    let mut scanned: usize = 0;
    let head_end = loop {
        if rbuf.len() >= MAX_HEAD {
            return Err(ErrKind::Protocol);
        }
        rbuf.reserve(4096);
        if stream.read_buf(rbuf).await.map_err(|_| ErrKind::Io)? == 0 {
            return Err(ErrKind::Closed);
        }
        let from = scanned.saturating_sub(3);
        if let Some(p) = find(&rbuf[from..], b"\r\n\r\n") {
            break from + p + 4;
        }
        scanned = rbuf.len();
    };
    let head = std::str::from_utf8(&rbuf[..head_end]).map_err(|_| ErrKind::Protocol)?;
    let mut lines = head.split("\r\n");
    let (version, rest) = lines.next().and_then(|l| l.split_once(' ')).ok_or(ErrKind::Protocol)?;
    let mut keep_alive = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Err(ErrKind::Protocol),
    };
    let code = rest.get(..3).filter(|c| c.bytes().all(|b| b.is_ascii_digit())).ok_or(ErrKind::Protocol)?;
    let status: u16 = code.parse().map_err(|_| ErrKind::Protocol)?;
    let mut length = None;
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').ok_or(ErrKind::Protocol)?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            if length.is_some() {
                return Err(ErrKind::Protocol);
            }
            length = Some(value.parse::<usize>().map_err(|_| ErrKind::Protocol)?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ErrKind::Protocol);
        } else if name.eq_ignore_ascii_case("connection") {
            let v = value.to_ascii_lowercase();
            if v.contains("close") {
                keep_alive = false;
            } else if v.contains("keep-alive") {
                keep_alive = true;
            }
        }
    }
    let length = match (status, length) {
        (100..=199, _) => return Err(ErrKind::Protocol),
        (204 | 304, _) => 0,
        (_, Some(n)) if n <= MAX_BODY => n,
        _ => return Err(ErrKind::Protocol),
    };
    let end = head_end + length;
    while rbuf.len() < end {
        rbuf.reserve(end - rbuf.len());
        if stream.read_buf(rbuf).await.map_err(|_| ErrKind::Io)? == 0 {
            return Err(ErrKind::Closed);
        }
    }
    if rbuf.len() > end {
        return Err(ErrKind::Protocol);
    }
    Ok(Response { status, keep_alive, body: head_end..end })
}

// ---------------------------------------------------------------------------------------------
// The driver

/// What one configuration is driven at.
struct Target {
    name: String,
    addr: SocketAddr,
    host: String,
    /// Read `/admin/stats` before and after.
    stats: bool,
    /// Served by this process (its CPU shows as the app's).
    local: bool,
    /// Who the requests are made as.
    tokens: Tokens,
    /// Authorizes (a denied request is expected to get 403; bare answers 2xx to everything).
    authorizes: bool,
    /// Has a decision cache (its hit rate is compared with the compulsory-miss bound).
    cached: bool,
}

/// One request handed to a connection: its intended send time and, in closed loop, who waits.
struct Job {
    req: Req,
    intended: Instant,
    done: Option<oneshot::Sender<()>>,
}

#[derive(Default)]
struct Progress {
    done: AtomicU64,
    errors: AtomicU64,
    /// The largest latency (µs) since the last progress line.
    max_us: AtomicU64,
}

/// One connection's observations, merged at the end. Latencies in microseconds.
#[derive(Default)]
struct Stats {
    /// From the intended send time to the end of the response.
    latency: Vec<u32>,
    /// From the actual write to the end of the response.
    service: Vec<u32>,
    /// From the intended send time to the actual write.
    lag: Vec<u32>,
    status: BTreeMap<u16, u64>,
    /// Responses with the status the roles call for.
    expected: u64,
    errors: [u64; ERR_KINDS.len()],
    last_done: Option<Instant>,
    /// Distinct cache keys among the requests sent, and how many were sent.
    keys: HashSet<u64>,
    sent: u64,
}

fn us(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

impl Stats {
    fn error(&mut self, kind: ErrKind, progress: &Progress) {
        self.errors[ERR_KINDS.iter().position(|k| *k == kind).unwrap_or(0)] += 1;
        progress.done.fetch_add(1, Relaxed);
        progress.errors.fetch_add(1, Relaxed);
    }

    fn merge(&mut self, mut other: Stats) {
        self.latency.extend(other.latency);
        self.service.extend(other.service);
        self.lag.extend(other.lag);
        for (k, v) in other.status {
            *self.status.entry(k).or_default() += v;
        }
        self.expected += other.expected;
        self.sent += other.sent;
        if self.keys.len() < other.keys.len() {
            std::mem::swap(&mut self.keys, &mut other.keys);
        }
        self.keys.extend(other.keys);
        for (a, b) in self.errors.iter_mut().zip(other.errors) {
            *a += b;
        }
        self.last_done = self.last_done.max(other.last_done);
    }
}

#[derive(Clone)]
struct ConnCtx {
    target: Arc<Target>,
    hard_stop: Instant,
    timeout: Duration,
    progress: Arc<Progress>,
}

/// One keep-alive connection: sends its jobs in order, reconnecting after any error.
async fn connection_task(ctx: ConnCtx, mut stream: Option<TcpStream>, mut rx: mpsc::UnboundedReceiver<Job>) -> Stats {
    let mut st = Stats::default();
    let mut wbuf = String::with_capacity(256);
    let mut rbuf = Vec::with_capacity(8192);
    let stop = tokio::time::sleep_until(ctx.hard_stop.into());
    tokio::pin!(stop);
    loop {
        let job = tokio::select! {
            biased;
            job = rx.recv() => match job {
                Some(job) => job,
                None => break,
            },
            _ = &mut stop => break,
        };
        if Instant::now() >= ctx.hard_stop {
            st.error(ErrKind::Unsent, &ctx.progress);
            continue;
        }
        let tokens = ctx.target.tokens;
        write_request(&mut wbuf, &ctx.target.host, job.req, tokens);
        st.keys.insert(job.req.key(tokens));
        st.sent += 1;
        let deadline = (Instant::now() + ctx.timeout).min(ctx.hard_stop);
        let result = tokio::time::timeout_at(deadline.into(), async {
            if stream.is_none() {
                stream = Some(connect(ctx.target.addr, ctx.timeout).await?);
            }
            let s = stream.as_mut().ok_or(ErrKind::Connect)?;
            let sent = Instant::now();
            let r = exchange(s, wbuf.as_bytes(), &mut rbuf).await?;
            Ok::<_, ErrKind>((sent, r))
        })
        .await;
        match result {
            Ok(Ok((sent, r))) => {
                let done = Instant::now();
                let latency = us(done.saturating_duration_since(job.intended));
                st.latency.push(latency);
                ctx.progress.max_us.fetch_max(u64::from(latency), Relaxed);
                st.service.push(us(done - sent));
                st.lag.push(us(sent.saturating_duration_since(job.intended)));
                *st.status.entry(r.status).or_default() += 1;
                let denied = ctx.target.authorizes && job.req.denied(tokens);
                if (denied && r.status == 403) || (!denied && (200..300).contains(&r.status)) {
                    st.expected += 1;
                }
                st.last_done = Some(done);
                ctx.progress.done.fetch_add(1, Relaxed);
                if !r.keep_alive {
                    stream = None;
                }
            }
            Ok(Err(kind)) => {
                st.error(kind, &ctx.progress);
                stream = None;
            }
            Err(_) => {
                st.error(ErrKind::Timeout, &ctx.progress);
                stream = None;
            }
        }
        if let Some(done) = job.done {
            let _ = done.send(());
        }
    }
    // Whatever is still queued at the hard stop was never sent: it counts, as an error.
    rx.close();
    while rx.try_recv().is_ok() {
        st.error(ErrKind::Unsent, &ctx.progress);
    }
    st
}

async fn print_progress(name: String, t0: Instant, progress: Arc<Progress>) {
    let mut tick = tokio::time::interval_at((t0 + Duration::from_secs(1)).into(), Duration::from_secs(1));
    let mut last = 0;
    loop {
        tick.tick().await;
        let done = progress.done.load(Relaxed);
        eprintln!(
            "[{name}] {:>5.1}s  requests {done:>8}  rate {:>7}/s  errors {}  max latency {}",
            t0.elapsed().as_secs_f64(),
            done - last,
            progress.errors.load(Relaxed),
            fmt_us(progress.max_us.swap(0, Relaxed) as f64)
        );
        last = done;
    }
}

/// Asks the kernel to wake this thread from `sleep` within 1 ns of the deadline instead of the
/// default 50 µs (`/proc/<tid>/timerslack_ns`, Linux 4.6+; may need CAP_SYS_NICE).
fn lower_timer_slack() -> std::io::Result<()> {
    let me = std::fs::read_link("/proc/thread-self")?;
    let tid = me.file_name().and_then(|t| t.to_str()).unwrap_or_default().to_owned();
    std::fs::write(format!("/proc/{tid}/timerslack_ns"), "1")
}

struct Driven {
    stats: Stats,
    issued: u64,
    t0: Instant,
    finished: Instant,
}

/// Connects `--connections` connections, then runs the open or closed loop until the duration,
/// `--max-requests` or the hard stop (duration + drain), whichever comes first.
async fn drive(o: &Opts, target: Arc<Target>, wl: Arc<Workload>) -> Result<Driven, BoxError> {
    let c = o.connections;
    // The clock starts once the connections are up: connecting is not part of the measurement.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..c {
        let (addr, timeout) = (target.addr, o.timeout);
        set.spawn(async move { (i, connect(addr, timeout).await.ok()) });
    }
    let mut streams: Vec<Option<TcpStream>> = (0..c).map(|_| None).collect();
    while let Some(joined) = set.join_next().await {
        let (i, s) = joined?;
        streams[i] = s;
    }
    let up = streams.iter().filter(|s| s.is_some()).count();
    if up == 0 {
        return Err(format!("{}: cannot connect to {}", target.name, target.addr).into());
    }
    if up < c {
        eprintln!("[{}] warning: only {up} of {c} connections are up; the others retry per request", target.name);
    }

    let progress = Arc::new(Progress::default());
    let t0 = Instant::now() + Duration::from_millis(20);
    let end = t0 + o.duration;
    let hard_stop = end + o.drain;
    let ctx = ConnCtx { target: target.clone(), hard_stop, timeout: o.timeout, progress: progress.clone() };
    let mut senders = Vec::with_capacity(c);
    let mut conns = Vec::with_capacity(c);
    for s in streams {
        let (tx, rx) = mpsc::unbounded_channel();
        senders.push(tx);
        conns.push(tokio::spawn(connection_task(ctx.clone(), s, rx)));
    }
    let printer = tokio::spawn(print_progress(target.name.clone(), t0, progress.clone()));

    enum Issuer {
        Pacer(std::thread::JoinHandle<u64>),
        Users(tokio::task::JoinSet<()>, Arc<AtomicU64>),
    }
    let issuer = match o.mode {
        Mode::Open => {
            // Request i is due at t0 + i/rate on connection i % C. A dedicated thread paces them
            // (std::thread::sleep, not the runtime's millisecond timer); a connection that is
            // still busy sends late, and the latency still counts from the intended time.
            let (rate, max, seed, wl) = (o.rate, o.max_requests, o.seed, wl.clone());
            let name = target.name.clone();
            let pacer = std::thread::Builder::new().name("lt-pacer".into()).spawn(move || {
                if let Err(e) = lower_timer_slack() {
                    eprintln!(
                        "[{name}] note: could not lower the pacer's timer slack ({e}): send lag includes the default ~50 µs"
                    );
                }
                let mut rng = Rng::new(seed ^ 0x6f70_656e_0000_0001);
                let mut i: u64 = 0;
                while i < max {
                    let intended = t0 + Duration::from_secs_f64(i as f64 / rate);
                    let now = Instant::now();
                    if intended >= end || now >= hard_stop {
                        break;
                    }
                    if intended > now {
                        std::thread::sleep(intended - now);
                    }
                    let user = rng.below(wl.users() as u64) as usize;
                    let job = Job { req: wl.request(user, &mut rng), intended, done: None };
                    if senders[(i % senders.len() as u64) as usize].send(job).is_err() {
                        break;
                    }
                    i += 1;
                }
                i
            })?;
            Issuer::Pacer(pacer)
        }
        Mode::Closed => {
            // Each user: request, wait for the response, think, repeat. User u uses connection
            // u % C; latency counts from when the user issued the request (queueing included).
            let senders = Arc::new(senders);
            let issued = Arc::new(AtomicU64::new(0));
            let budget = Arc::new(AtomicU64::new(0));
            let mut users = tokio::task::JoinSet::new();
            for u in 0..wl.users() {
                let (senders, wl, issued, budget) = (senders.clone(), wl.clone(), issued.clone(), budget.clone());
                let (think, max) = (o.think, o.max_requests);
                let mut rng = Rng::new(o.seed ^ (u as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                // Users start spread over one think time rather than all at t0.
                let offset = Duration::from_micros(rng.below(think.as_micros() as u64));
                users.spawn(async move {
                    tokio::time::sleep_until((t0 + offset).into()).await;
                    let conn = &senders[u % senders.len()];
                    while Instant::now() < end && budget.fetch_add(1, Relaxed) < max {
                        let (tx, rx) = oneshot::channel();
                        let job = Job { req: wl.request(u, &mut rng), intended: Instant::now(), done: Some(tx) };
                        if conn.send(job).is_err() {
                            break;
                        }
                        issued.fetch_add(1, Relaxed);
                        if rx.await.is_err() {
                            break;
                        }
                        if !think.is_zero() {
                            tokio::time::sleep_until((Instant::now() + think).min(end).into()).await;
                        }
                    }
                });
            }
            Issuer::Users(users, issued)
        }
    };

    let mut stats = Stats::default();
    for conn in conns {
        stats.merge(conn.await?);
    }
    let finished = Instant::now();
    printer.abort();
    eprintln!(
        "[{}] done  {:>5.1}s  requests {:>8}  errors {}",
        target.name,
        finished.saturating_duration_since(t0).as_secs_f64(),
        progress.done.load(Relaxed),
        progress.errors.load(Relaxed)
    );
    let issued = match issuer {
        Issuer::Pacer(pacer) => pacer.join().map_err(|_| "the pacer thread panicked")?,
        Issuer::Users(mut users, issued) => {
            users.abort_all();
            while users.join_next().await.is_some() {}
            issued.load(Relaxed)
        }
    };
    Ok(Driven { stats, issued, t0, finished })
}

// ---------------------------------------------------------------------------------------------
// The cache's counters, from GET /admin/stats

async fn fetch_stats(t: &Target, timeout: Duration) -> Option<Value> {
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
struct CacheDelta {
    l1_hits: u64,
    l1_misses: u64,
    /// L1 misses because L1 was not trusted (the backplane silent past `max_staleness`), and
    /// because an entry was stale (epochs) or expired.
    l1_untrusted: u64,
    l1_stale: u64,
    l1_expired: u64,
    /// Remote calls that timed out, and background writes dropped (L2 + L3).
    remote_timeouts: u64,
    write_drops: u64,
    /// Hits, misses, errors.
    l2: Option<(u64, u64, u64)>,
    /// Hits, misses, errors.
    l3: Option<(u64, u64, u64)>,
    authorizer_calls: u64,
    authorizer_errors: u64,
    single_flight_joins: u64,
    undecided: u64,
}

impl CacheDelta {
    /// Checks made: every check reads L1 first (a hit or a miss there).
    fn checks(&self) -> u64 {
        self.l1_hits + self.l1_misses
    }

    /// Checks answered by a cache tier, any tier, without the authorizer.
    fn hits(&self) -> u64 {
        self.l1_hits + self.l2.map_or(0, |l| l.0) + self.l3.map_or(0, |l| l.0)
    }

    fn hit_rate(&self) -> Option<f64> {
        (self.checks() > 0).then(|| self.hits() as f64 / self.checks() as f64)
    }
}

fn cache_delta(before: &Value, after: &Value) -> CacheDelta {
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

// ---------------------------------------------------------------------------------------------
// CPU time

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Group {
    Generator,
    Server,
    Other,
}

/// CPU nanoseconds of each thread of this process, by thread id, with its group (by name).
/// `/proc/self/task/<tid>/schedstat` is in nanoseconds; without it, `stat`'s utime + stime in
/// clock ticks, assuming 100 Hz.
fn thread_cpu() -> HashMap<u64, (Group, u64)> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else { return out };
    for entry in dir.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse::<u64>().ok()) else { continue };
        let path = entry.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let group = if comm.starts_with("lt-client") || comm.starts_with("lt-pacer") {
            Group::Generator
        } else if comm.starts_with("lt-server") {
            Group::Server
        } else {
            Group::Other
        };
        let ns = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()))
            .or_else(|| stat_ticks(&path.join("stat")).map(|t| t * 10_000_000));
        if let Some(ns) = ns {
            out.insert(tid, (group, ns));
        }
    }
    out
}

/// utime + stime, in clock ticks, from a `stat` file.
fn stat_ticks(path: &std::path::Path) -> Option<u64> {
    let stat = std::fs::read_to_string(path).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

#[derive(Clone, Copy, Debug, Default)]
struct Cpu {
    generator_ns: u64,
    server_ns: u64,
    other_ns: u64,
}

fn cpu_between(before: &HashMap<u64, (Group, u64)>, after: &HashMap<u64, (Group, u64)>) -> Cpu {
    let mut cpu = Cpu::default();
    for (tid, (group, ns)) in after {
        let d = ns.saturating_sub(before.get(tid).map_or(0, |b| b.1));
        match group {
            Group::Generator => cpu.generator_ns += d,
            Group::Server => cpu.server_ns += d,
            Group::Other => cpu.other_ns += d,
        }
    }
    cpu
}

// ---------------------------------------------------------------------------------------------
// The machine: the servers' CPU time and the load average

/// CPU clock ticks (utime + stime) of every visible `postgres` (index 0) and `redis-server`
/// (index 1) process, by pid. Postgres serves each connection from a process of its own: the
/// pools' backends are up before a run starts (warm-up) and still up when it ends.
fn server_ticks() -> HashMap<u32, (usize, u64)> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return out };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else { continue };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        let which = match comm.trim_end() {
            "postgres" => 0,
            "redis-server" => 1,
            _ => continue,
        };
        if let Some(ticks) = stat_ticks(&entry.path().join("stat")) {
            out.insert(pid, (which, ticks));
        }
    }
    out
}

/// Seconds of CPU the Postgres and Redis processes used between two `server_ticks` (100 Hz).
fn server_cpu_between(before: &HashMap<u32, (usize, u64)>, after: &HashMap<u32, (usize, u64)>) -> [f64; 2] {
    let mut s = [0.0; 2];
    for (pid, (which, ticks)) in after {
        s[*which] += ticks.saturating_sub(before.get(pid).map_or(0, |b| b.1)) as f64 / 100.0;
    }
    s
}

/// The 1-minute load average.
fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

// ---------------------------------------------------------------------------------------------
// Running configurations

struct Run {
    name: String,
    driven: Driven,
    cache: Option<CacheDelta>,
    cpu: Cpu,
    /// CPU seconds of the Postgres and Redis server processes over the run (every client's).
    servers: [f64; 2],
    /// The 1-minute load average before and after.
    load: [Option<f64>; 2],
    local: bool,
    cached: bool,
    about: String,
}

async fn run_target(o: &Opts, target: Arc<Target>, wl: Arc<Workload>, about: String) -> Result<Run, BoxError> {
    let before = if target.stats { fetch_stats(&target, o.timeout).await } else { None };
    let load0 = loadavg();
    let cpu0 = thread_cpu();
    let servers0 = server_ticks();
    let driven = drive(o, target.clone(), wl).await?;
    let cpu = cpu_between(&cpu0, &thread_cpu());
    let servers = server_cpu_between(&servers0, &server_ticks());
    let load1 = loadavg();
    let after = if target.stats { fetch_stats(&target, o.timeout).await } else { None };
    let cache = match (&before, &after) {
        (Some(b), Some(a)) => Some(cache_delta(b, a)),
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

fn local_target(name: &str, addr: SocketAddr, authorizes: bool, cached: bool) -> Arc<Target> {
    Arc::new(Target {
        name: name.to_owned(),
        addr,
        host: addr.to_string(),
        stats: authorizes,
        local: true,
        tokens: Tokens::Population,
        authorizes,
        cached,
    })
}

/// What the in-process configurations share: the servers, and what to clean up.
struct Backends {
    redis_url: Option<String>,
    database_url: Option<String>,
    population: u32,
    allow_ttl: Duration,
    deny_ttl: Duration,
    leftovers: Arc<Leftovers>,
}

/// Everything this run created on the shared servers: its Redis namespace and its Postgres
/// schemas. Cleaned after each configuration, at the end, on error (drop) and on Ctrl-C; never
/// anything else (no FLUSHALL, no other schema).
struct Leftovers {
    redis: Option<(String, String)>,
    redis_used: std::sync::atomic::AtomicBool,
    database_url: Option<String>,
    schemas: std::sync::Mutex<Vec<String>>,
}

impl Leftovers {
    fn add_schema(&self, schema: &str) {
        self.schemas.lock().unwrap_or_else(|e| e.into_inner()).push(schema.to_owned());
    }

    fn is_empty(&self) -> bool {
        !self.redis_used.load(Relaxed) && self.schemas.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
    }

    /// Deletes what is left; says what it did.
    async fn clean(&self) {
        let schemas = std::mem::take(&mut *self.schemas.lock().unwrap_or_else(|e| e.into_inner()));
        if let (Some(url), false) = (&self.database_url, schemas.is_empty()) {
            match tokio::time::timeout(Duration::from_secs(30), drop_schemas(url, &schemas)).await {
                Ok(Ok(())) => println!("postgres: dropped schema {}", schemas.join(", ")),
                Ok(Err(e)) => eprintln!("postgres: could not drop schema {}: {e}", schemas.join(", ")),
                Err(_) => eprintln!("postgres: dropping schema {} timed out", schemas.join(", ")),
            }
        }
        #[cfg(feature = "redis")]
        if let (Some((url, namespace)), true) = (&self.redis, self.redis_used.swap(false, Relaxed)) {
            match tokio::time::timeout(Duration::from_secs(10), delete_namespace(url, namespace)).await {
                Ok(Ok(n)) => println!("redis: deleted {n} keys of namespace {namespace}"),
                Ok(Err(e)) => eprintln!("redis: could not delete namespace {namespace}: {e}"),
                Err(_) => eprintln!("redis: deleting namespace {namespace} timed out"),
            }
        }
    }

    /// `clean` from outside any runtime (on a thread of its own, with its own runtime).
    fn clean_blocking(self: &Arc<Self>) {
        if self.is_empty() {
            return;
        }
        let me = self.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                rt.block_on(me.clean());
            }
        })
        .join();
    }
}

/// Cleans up when dropped: whatever way `run` ends, nothing it created stays behind.
struct CleanOnDrop(Arc<Leftovers>);

impl Drop for CleanOnDrop {
    fn drop(&mut self) {
        self.0.clean_blocking();
    }
}

#[cfg_attr(not(feature = "postgres"), allow(unused_variables))]
async fn drop_schemas(url: &str, schemas: &[String]) -> Result<(), BoxError> {
    #[cfg(feature = "postgres")]
    {
        let client = pg_client(url).await?;
        for schema in schemas {
            // Only names this run made (loadtest_<pid>_<n>), never anything else.
            if !schema.starts_with("loadtest_") || !schema.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                continue;
            }
            client.batch_execute(&format!("SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS {schema} CASCADE")).await?;
        }
    }
    Ok(())
}

#[cfg(feature = "postgres")]
async fn pg_client(url: &str) -> Result<tokio_postgres::Client, BoxError> {
    let (client, connection) =
        tokio::time::timeout(Duration::from_secs(5), tokio_postgres::connect(url, tokio_postgres::NoTls))
            .await
            .map_err(|_| format!("cannot reach postgres at {}", redact(url)))??;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// `url` without its password.
fn redact(url: &str) -> String {
    match url.split_once("://").and_then(|(scheme, rest)| Some((scheme, rest.rsplit_once('@')?))) {
        Some((scheme, (userinfo, host))) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// The quickstart's route table.
fn routes() -> tower_authz_cache::RouteTable {
    use axum::http::Method;
    tower_authz_cache::RouteTable::new()
        .public("/health")
        .public_route(Method::GET, "/metrics")
        .public_route(Method::GET, "/ready")
        .route(Method::GET, "/documents/{id}", "documents:{id}", "read")
        .route(Method::PUT, "/documents/{id}", "documents:{id}", "write")
        .route(Method::DELETE, "/documents/{id}", "documents:{id}", "delete")
        .route(Method::PUT, "/admin/users/{user}/role", "admin", "manage")
        .route(Method::POST, "/admin/invalidate", "admin", "manage")
        .route(Method::GET, "/admin/stats", "admin", "manage")
}

/// The quickstart's handlers, with `GET /admin/stats` answering `cache`'s counters.
fn handlers(cache: AuthzCache) -> axum::Router {
    axum::Router::new()
        .route(
            "/admin/stats",
            axum::routing::get(move || {
                let stats = cache.stats();
                async move { axum::Json(stats) }
            }),
        )
        .fallback_service(quickstart::unprotected_app(quickstart::Roles::demo()))
}

/// The handlers alone: the same router as every other configuration, without the layer.
fn bare_app() -> axum::Router {
    let idle = AuthzCache::builder(|_: Principal, _: Permission| async {
        Ok::<_, std::convert::Infallible>(Decision::deny())
    })
    .build();
    handlers(idle)
}

/// The population's bearer tokens: `user-<n>` (n in 1..=population, canonical) is principal
/// `user-<n>`; `alice-token` is alice.
fn principal_of(token: &str, population: u32) -> Option<Principal> {
    if token == "alice-token" {
        return Some(Principal::new("alice"));
    }
    let digits = token.strip_prefix("user-")?;
    if digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u32 = digits.parse().ok()?;
    (1..=population).contains(&n).then(|| Principal::new(token))
}

/// The handlers behind the layer, as the quickstart wires them, resolving the population's tokens.
fn population_app(cache: AuthzCache, population: u32) -> impl quickstart::App {
    use axum::response::IntoResponse;
    let tokens = tower_authz_cache::BearerToken::new(move |token: String| {
        let principal = principal_of(&token, population);
        async move { Ok::<_, std::convert::Infallible>(principal) }
    })
    .with_realm("loadtest");
    tower::ServiceBuilder::new()
        .map_response(IntoResponse::into_response)
        .layer(tower_authz_cache::CachedAuthorizationLayer::new(cache.clone(), tokens, routes()))
        .service(handlers(cache))
}

/// The roles in memory (what the Postgres configurations seed into the RBAC tables): alice is
/// an admin, `user-<n>` an editor when n % 10 == 0 and a viewer otherwise.
fn memory_authorizer() -> impl tower_authz_cache::Authorizer {
    |principal: Principal, permission: Permission| async move {
        let (resource, action) = (permission.resource(), permission.action());
        let documents = resource.starts_with("documents:");
        let allowed = match principal.id() {
            "alice" => {
                (documents && matches!(action, "read" | "write" | "delete"))
                    || (resource, action) == ("admin", "manage")
            }
            id => match id.strip_prefix("user-").and_then(|n| n.parse::<u32>().ok()) {
                Some(n) => documents && (action == "read" || (action == "write" && is_editor(n))),
                None => false,
            },
        };
        Ok::<_, std::convert::Infallible>(if allowed {
            Decision::allow()
        } else {
            Decision::deny().with_reason(format!("no role grants {action} on {resource}"))
        })
    }
}

/// Before the clock starts: waits (at most 5 s) until every subscription is up
/// (`AuthzCache::ready`): each new subscription drops whatever L1 holds, so one landing mid-run
/// would turn hits into misses. Then checks a few keys no request uses, so that the pools
/// (authorizer, Redis, Postgres) are connected.
async fn warm_up(cache: &AuthzCache) {
    let _ = tokio::time::timeout(Duration::from_secs(5), cache.ready()).await;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..16 {
        let cache = cache.clone();
        set.spawn(async move {
            let principal = Principal::new(format!("warm-up-{i}"));
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                cache.check(&principal, &Permission::new("documents:0", "read")),
            )
            .await;
        });
    }
    while set.join_next().await.is_some() {}
}

/// The configuration's secret for L2/L3: one per configuration, so that no configuration can
/// read another's entries.
#[cfg(any(feature = "redis", feature = "postgres"))]
fn secret(n: usize) -> String {
    format!("loadtest {} configuration {n}: not a production secret", std::process::id())
}

fn cache_builder<A: tower_authz_cache::Authorizer>(
    authorizer: A,
    b: &Backends,
) -> tower_authz_cache::AuthzCacheBuilder {
    AuthzCache::builder(authorizer).allow_ttl(b.allow_ttl).deny_ttl(b.deny_ttl)
}

/// Starts configuration `name` (the `n`th of the run) on 127.0.0.1, on the current runtime
/// (the configuration's own server runtime). Returns its target and what it is.
async fn start_app(name: &str, n: usize, b: &Backends) -> Result<(Arc<Target>, String), BoxError> {
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let addr = listener.local_addr()?;
    let memory = "in-memory roles";
    let (cache, about) = match name {
        "bare" => (None, "the handlers alone, no authorization".to_owned()),
        "l1" => (Some(cache_builder(memory_authorizer(), b).build()), format!("L1; {memory}")),
        "no-cache" => (
            Some(cache_builder(memory_authorizer(), b).l1_max_bytes(0).build()),
            format!("no cache (L1 disabled); {memory}"),
        ),
        #[cfg(feature = "redis")]
        "l1+l2" => {
            let tier = redis_tier(b, n)?;
            (Some(cache_builder(memory_authorizer(), b).l2(tier).build()), format!("L1 + L2 (redis); {memory}"))
        }
        #[cfg(feature = "postgres")]
        "no-cache-pg" => {
            let (schema, _) = pg_schema(b, n).await?;
            let url = b.database_url.as_deref().unwrap_or_default();
            let rbac = tower_authz_cache::PostgresRbacAuthorizer::new(url, &schema)?;
            let cache = cache_builder(rbac, b).l1_max_bytes(0).build();
            (Some(cache), format!("no cache (L1 disabled); PostgresRbacAuthorizer, schema {schema}"))
        }
        #[cfg(all(feature = "redis", feature = "postgres"))]
        "l1+l2+l3" => {
            let l2 = redis_tier(b, n)?;
            let (schema, l3) = pg_schema(b, n).await?;
            let url = b.database_url.as_deref().unwrap_or_default();
            let rbac = tower_authz_cache::PostgresRbacAuthorizer::new(url, &schema)?;
            let cache = cache_builder(rbac, b).l2(l2).l3(l3).build();
            (Some(cache), format!("L1 + L2 (redis) + L3 (postgres, schema {schema}); PostgresRbacAuthorizer"))
        }
        other => {
            return Err(
                format!("configuration {other:?} is not available in this build (features redis, postgres)").into()
            );
        }
    };
    let target = match cache {
        None => {
            let app = bare_app();
            tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
            local_target(name, addr, false, false)
        }
        Some(cache) => {
            warm_up(&cache).await;
            let app = population_app(cache, b.population);
            tokio::spawn(async move {
                let _ = axum::serve(listener, axum::ServiceExt::into_make_service(app)).await;
            });
            local_target(name, addr, true, !name.starts_with("no-cache"))
        }
    };
    Ok((target, about))
}

#[cfg(feature = "redis")]
fn redis_tier(b: &Backends, n: usize) -> Result<tower_authz_cache::RedisTier, BoxError> {
    let (Some(url), Some((_, namespace))) = (&b.redis_url, &b.leftovers.redis) else {
        return Err("this configuration needs --redis-url".into());
    };
    b.leftovers.redis_used.store(true, Relaxed);
    Ok(tower_authz_cache::RedisTier::builder(url, secret(n))
        .namespace(namespace)
        .build()
        .map_err(|e| format!("--redis-url: {e}"))?)
}

/// Creates, migrates and seeds this configuration's schema, `loadtest_<pid>_<n>`; returns it
/// and an L3 tier on it.
#[cfg(feature = "postgres")]
async fn pg_schema(b: &Backends, n: usize) -> Result<(String, tower_authz_cache::PostgresTier), BoxError> {
    let Some(url) = &b.database_url else { return Err("this configuration needs --database-url".into()) };
    let schema = format!("loadtest_{}_{n}", std::process::id());
    // Registered before it exists: whatever happens next, it is dropped at the end.
    b.leftovers.add_schema(&schema);
    let started = Instant::now();
    let tier = tower_authz_cache::PostgresTier::builder(url, secret(n))
        .schema(&schema)
        .build()
        .map_err(|e| format!("--database-url: {e}"))?;
    tokio::time::timeout(Duration::from_secs(60), tier.migrate())
        .await
        .map_err(|_| "--database-url: migrating timed out")?
        .map_err(|e| format!("--database-url: {e}"))?;
    let client = pg_client(url).await?;
    let p = b.population;
    // In bulk: one statement per table. The row triggers (one notification per user) and the
    // per-statement view refresh are off while the users go in; the views are refreshed once.
    let seed = format!(
        "BEGIN;
         SET LOCAL search_path TO {schema};
         INSERT INTO roles VALUES ('viewer'), ('editor'), ('admin');
         INSERT INTO role_permissions VALUES
            ('viewer', 'documents:*', 'read'),
            ('editor', 'documents:*', 'read'), ('editor', 'documents:*', 'write'),
            ('admin', 'documents:*', 'read'), ('admin', 'documents:*', 'write'), ('admin', 'documents:*', 'delete'),
            ('admin', 'admin', 'manage');
         ALTER TABLE user_roles DISABLE TRIGGER USER;
         INSERT INTO users SELECT 'user-' || g FROM generate_series(1, {p}) g;
         INSERT INTO users VALUES ('alice');
         INSERT INTO user_roles
            SELECT 'user-' || g, CASE WHEN g % 10 = 0 THEN 'editor' ELSE 'viewer' END FROM generate_series(1, {p}) g;
         INSERT INTO user_roles VALUES ('alice', 'admin');
         ALTER TABLE user_roles ENABLE TRIGGER USER;
         REFRESH MATERIALIZED VIEW mv_user_authorization_context;
         REFRESH MATERIALIZED VIEW mv_team_collaboration_patterns;
         COMMIT;
         ANALYZE {schema}.users, {schema}.user_roles, {schema}.role_permissions, {schema}.mv_user_authorization_context;"
    );
    tokio::time::timeout(Duration::from_secs(120), client.batch_execute(&seed))
        .await
        .map_err(|_| "--database-url: seeding timed out")?
        .map_err(|e| format!("--database-url: seeding {schema}: {e}"))?;
    eprintln!(
        "[postgres] schema {schema}: migrated and seeded with {p} users in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok((schema, tier))
}

#[cfg(feature = "redis")]
async fn redis_connection(url: &str) -> Result<redis::aio::MultiplexedConnection, BoxError> {
    let client = redis::Client::open(url)?;
    let mut conn = tokio::time::timeout(Duration::from_secs(2), client.get_multiplexed_async_connection())
        .await
        .map_err(|_| format!("cannot reach redis at {url}"))??;
    let _: String = redis::cmd("PING").query_async(&mut conn).await?;
    Ok(conn)
}

/// Deletes every key of the namespace (SCAN MATCH + DEL); returns how many.
#[cfg(feature = "redis")]
async fn delete_namespace(url: &str, namespace: &str) -> Result<u64, BoxError> {
    let mut conn = redis_connection(url).await?;
    let pattern = format!("{namespace}:*");
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            let n: u64 = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await?;
            deleted += n;
        }
        cursor = next;
        if cursor == 0 {
            return Ok(deleted);
        }
    }
}

/// The self-test's server: answers every request with a fixed 200 "ok".
async fn trivial_server(listener: TcpListener) {
    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(4096);
            let mut out = Vec::with_capacity(256);
            loop {
                buf.reserve(4096);
                match s.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                // The generator's requests have no body (PUT says Content-Length: 0).
                let mut start = 0;
                out.clear();
                while let Some(p) = find(&buf[start..], b"\r\n\r\n") {
                    start += p + 4;
                    out.extend_from_slice(OK);
                }
                buf.drain(..start);
                if !out.is_empty() && s.write_all(&out).await.is_err() {
                    return;
                }
            }
        });
    }
}

fn parse_target(url: &str) -> Result<Arc<Target>, BoxError> {
    let rest = url.strip_prefix("http://").ok_or_else(|| format!("--target {url:?}: expected http://host:port"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let with_port = if authority.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let addr =
        with_port.to_socket_addrs()?.next().ok_or_else(|| format!("--target {url:?}: {authority} does not resolve"))?;
    Ok(Arc::new(Target {
        name: "target".into(),
        addr,
        host: authority.to_owned(),
        stats: true,
        local: false,
        tokens: Tokens::Demo,
        authorizes: true,
        cached: true,
    }))
}

// ---------------------------------------------------------------------------------------------
// Summaries and reports

#[derive(Clone, Copy, Debug, Default)]
struct Pcts {
    p50: f64,
    p90: f64,
    p95: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

/// Nearest-rank percentiles (sorts `v`).
fn pcts(v: &mut [u32]) -> Pcts {
    if v.is_empty() {
        return Pcts::default();
    }
    v.sort_unstable();
    let n = v.len();
    let q = |q: f64| f64::from(v[((q * n as f64).ceil() as usize).clamp(1, n) - 1]);
    Pcts { p50: q(0.50), p90: q(0.90), p95: q(0.95), p99: q(0.99), p999: q(0.999), max: f64::from(v[n - 1]) }
}

fn pcts_json(p: &Pcts) -> Value {
    json!({ "p50": p.p50, "p90": p.p90, "p95": p.p95, "p99": p.p99, "p99.9": p.p999, "max": p.max })
}

struct Summary {
    name: String,
    about: String,
    issued: u64,
    responses: u64,
    ok: u64,
    /// Answered as the roles say (2xx, or 403 where they deny).
    expected: u64,
    /// Requests sent and the distinct cache keys among them.
    sent: u64,
    keys: u64,
    status: BTreeMap<u16, u64>,
    errors: Vec<(ErrKind, u64)>,
    latency: Pcts,
    service: Pcts,
    lag: Pcts,
    /// Responses per second, from t0 to the last response.
    throughput: f64,
    wall_s: f64,
    cache: Option<CacheDelta>,
    cpu: Cpu,
    servers: [f64; 2],
    load: [Option<f64>; 2],
    /// The app ran in this process (its CPU is known).
    local: bool,
    cached: bool,
}

impl Summary {
    fn new(run: Run) -> Self {
        let Run { name, driven, cache, cpu, servers, load, local, cached, about } = run;
        let Driven { mut stats, issued, t0, finished } = driven;
        let responses: u64 = stats.status.values().sum();
        let ok = stats.status.iter().filter(|(s, _)| (200..300).contains(*s)).map(|(_, n)| n).sum();
        let span = stats.last_done.unwrap_or(finished).saturating_duration_since(t0).as_secs_f64();
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
        }
    }

    /// Answered as the roles say, out of every request issued (errors and unsent included).
    fn success(&self) -> f64 {
        if self.issued == 0 { 0.0 } else { self.expected as f64 / self.issued as f64 }
    }

    /// The best hit rate any cache without prefetching could reach on the requests sent.
    fn bound(&self) -> Option<f64> {
        (self.sent > 0).then(|| 1.0 - self.keys as f64 / self.sent as f64)
    }

    /// The hit rate of a cached configuration (any tier).
    fn hit_rate(&self) -> Option<f64> {
        self.cache.as_ref().filter(|_| self.cached).and_then(CacheDelta::hit_rate)
    }

    fn cpu_share(&self, ns: u64) -> f64 {
        if self.wall_s > 0.0 { ns as f64 / 1e9 / self.wall_s } else { 0.0 }
    }

    fn json(&self, base: Option<&Summary>, client_threads: usize) -> Value {
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

fn per_request_us(ns: u64, requests: u64) -> f64 {
    if requests == 0 { 0.0 } else { ns as f64 / 1000.0 / requests as f64 }
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

fn fmt_us(v: f64) -> String {
    if v < 1000.0 {
        format!("{v:.0} µs")
    } else if v < 1_000_000.0 {
        format!("{:.2} ms", v / 1000.0)
    } else {
        format!("{:.2} s", v / 1e6)
    }
}

/// An axis label for 1, 2 or 5 times a power of ten microseconds: "100 µs", "1 ms", "2 s".
fn fmt_axis(v: f64) -> String {
    if v < 1000.0 {
        format!("{} µs", v.round())
    } else if v < 1_000_000.0 {
        format!("{} ms", (v / 1000.0).round())
    } else {
        format!("{} s", (v / 1e6).round())
    }
}

fn print_table(sums: &[Summary]) {
    let base = sums.iter().find(|s| s.name == "bare");
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let mut row =
        |label: &str, f: &dyn Fn(&Summary) -> String| rows.push((label.to_owned(), sums.iter().map(f).collect()));
    row("requests", &|s| s.issued.to_string());
    row("responses", &|s| s.responses.to_string());
    row("success (as the roles say)", &|s| format!("{:.2}%", s.success() * 100.0));
    let codes: BTreeSet<u16> = sums.iter().flat_map(|s| s.status.keys().copied()).collect();
    for code in codes {
        row(&format!("  status {code}"), &|s| s.status.get(&code).copied().unwrap_or(0).to_string());
    }
    for (i, kind) in ERR_KINDS.iter().enumerate() {
        if sums.iter().any(|s| s.errors[i].1 > 0) {
            row(&format!("  error: {}", kind.name()), &|s| s.errors[i].1.to_string());
        }
    }
    row("latency p50", &|s| fmt_us(s.latency.p50));
    row("latency p95", &|s| fmt_us(s.latency.p95));
    row("latency p99", &|s| fmt_us(s.latency.p99));
    row("latency p99.9", &|s| fmt_us(s.latency.p999));
    row("latency max", &|s| fmt_us(s.latency.max));
    row("service time p50 / p99", &|s| format!("{} / {}", fmt_us(s.service.p50), fmt_us(s.service.p99)));
    row("send lag p50 / p99", &|s| format!("{} / {}", fmt_us(s.lag.p50), fmt_us(s.lag.p99)));
    row("throughput", &|s| format!("{:.0} /s", s.throughput));
    if let Some(b) = base {
        let fmt_ratio = |r: Option<f64>| r.map_or("-".to_owned(), |r| format!("{r:.2}x"));
        row("p50 / bare p50", &|s| fmt_ratio(ratio(s.latency.p50, b.latency.p50)));
        row("p99 / bare p99", &|s| fmt_ratio(ratio(s.latency.p99, b.latency.p99)));
        row("throughput / bare", &|s| fmt_ratio(ratio(s.throughput, b.throughput)));
    }
    let cache = |f: fn(&CacheDelta) -> String| move |s: &Summary| s.cache.as_ref().map_or("-".to_owned(), f);
    let pct = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{:.2}%", v * 100.0));
    row("distinct keys / sent", &|s| format!("{} / {}", s.keys, s.sent));
    row("compulsory-miss bound", &|s| pct(s.bound()));
    if sums.iter().any(|s| s.cache.is_some()) {
        row("hit rate (any tier)", &|s| pct(s.hit_rate()));
        row("hit rate - bound", &|s| {
            s.hit_rate().zip(s.bound()).map_or("-".to_owned(), |(h, b)| format!("{:+.2} pt", (h - b) * 100.0))
        });
        row("L1 hits", &cache(|c| c.l1_hits.to_string()));
        row("L1 misses", &cache(|c| c.l1_misses.to_string()));
        row(
            "  untrusted / stale / expired",
            &cache(|c| format!("{} / {} / {}", c.l1_untrusted, c.l1_stale, c.l1_expired)),
        );
        if sums.iter().any(|s| s.cache.is_some_and(|c| c.l2.is_some() || c.l3.is_some())) {
            row("remote timeouts / write drops", &cache(|c| format!("{} / {}", c.remote_timeouts, c.write_drops)));
        }
        if sums.iter().any(|s| s.cache.is_some_and(|c| c.l2.is_some())) {
            row(
                "L2 hits / misses / errors",
                &cache(|c| c.l2.map_or("-".to_owned(), |l| format!("{} / {} / {}", l.0, l.1, l.2))),
            );
        }
        if sums.iter().any(|s| s.cache.is_some_and(|c| c.l3.is_some())) {
            row(
                "L3 hits / misses / errors",
                &cache(|c| c.l3.map_or("-".to_owned(), |l| format!("{} / {} / {}", l.0, l.1, l.2))),
            );
        }
        row("authorizer calls", &cache(|c| c.authorizer_calls.to_string()));
        row(
            "authorizer calls / check",
            &cache(|c| {
                if c.checks() == 0 {
                    "-".to_owned()
                } else {
                    format!("{:.3}", c.authorizer_calls as f64 / c.checks() as f64)
                }
            }),
        );
        row("single-flight joins", &cache(|c| c.single_flight_joins.to_string()));
        row("undecided (503)", &cache(|c| c.undecided.to_string()));
    }
    row("loadtest CPU (gen+pacer)", &|s| {
        format!("{:.2} s {:.0}%", s.cpu.generator_ns as f64 / 1e9, s.cpu_share(s.cpu.generator_ns) * 100.0)
    });
    row("loadtest CPU / request", &|s| format!("{:.1} µs", per_request_us(s.cpu.generator_ns, s.issued)));
    row("app CPU (in-process)", &|s| {
        if !s.local {
            return "-".to_owned();
        }
        format!("{:.2} s {:.0}%", s.cpu.server_ns as f64 / 1e9, s.cpu_share(s.cpu.server_ns) * 100.0)
    });
    row("app CPU / request", &|s| {
        if s.local { format!("{:.1} µs", per_request_us(s.cpu.server_ns, s.issued)) } else { "-".to_owned() }
    });
    row("postgres CPU / request", &|s| format!("{:.1} µs", s.servers[0] * 1e6 / s.issued.max(1) as f64));
    row("redis CPU / request", &|s| format!("{:.1} µs", s.servers[1] * 1e6 / s.issued.max(1) as f64));
    row("load average (1 min)", &|s| {
        let f = |l: Option<f64>| l.map_or("?".to_owned(), |l| format!("{l:.2}"));
        format!("{} -> {}", f(s.load[0]), f(s.load[1]))
    });

    let label_w = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0).max("configuration".len());
    let widths: Vec<usize> = sums
        .iter()
        .enumerate()
        .map(|(i, s)| rows.iter().map(|r| r.1[i].chars().count()).max().unwrap_or(0).max(s.name.chars().count()))
        .collect();
    let mut out = format!("{:<label_w$}", "configuration");
    for (s, w) in sums.iter().zip(&widths) {
        let _ = write!(out, "  {:>w$}", s.name);
    }
    println!("{out}");
    println!("{}", "-".repeat(label_w + widths.iter().map(|w| w + 2).sum::<usize>()));
    for (label, cells) in rows {
        let mut out = format!("{label:<label_w$}");
        for (c, w) in cells.iter().zip(&widths) {
            let _ = write!(out, "  {c:>w$}");
        }
        println!("{out}");
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A line chart of p50..p99.9 per configuration, log-scale y axis, by hand.
/// Below it, with a `bare` configuration, each configuration's p50, p99 and throughput as
/// ratios to bare (log scale, bars from 1x).
fn svg_chart(sums: &[Summary], subtitle: &[String]) -> String {
    const COLORS: [&str; 6] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"];
    let labels = ["p50", "p90", "p95", "p99", "p99.9"];
    let values = |s: &Summary| [s.latency.p50, s.latency.p90, s.latency.p95, s.latency.p99, s.latency.p999];
    let (w, h, ml, mr, mt, mb) = (940.0, 440.0, 80.0, 330.0, 40.0 + 16.0 * subtitle.len() as f64, 50.0);
    let base = sums.iter().find(|s| s.name == "bare");
    let panel2 = if base.is_some() && sums.len() > 1 { 300.0 } else { 0.0 };
    let total_h = h + panel2;
    let all: Vec<f64> = sums.iter().flat_map(values).filter(|v| *v > 0.0).collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min).max(1.0);
    let hi = all.iter().copied().fold(0.0, f64::max).max(lo);
    let dlo = if lo.is_finite() { lo.log10().floor() } else { 0.0 };
    let dhi = hi.log10().ceil().max(dlo + 1.0);
    let y = |v: f64| mt + (dhi - v.max(1.0).log10()) / (dhi - dlo) * (h - mt - mb);
    let x = |i: usize| ml + (i as f64 + 0.5) * (w - ml - mr) / labels.len() as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{total_h}" viewBox="0 0 {w} {total_h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{total_h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{ml}" y="22" font-size="15" font-weight="bold">Latency percentiles from the intended send time (log scale)</text>"#
    );
    for (i, line) in subtitle.iter().enumerate() {
        let _ = writeln!(s, r##"<text x="{ml}" y="{}" fill="#555">{}</text>"##, 40 + 16 * i, xml_escape(line));
    }
    let mut d = dlo;
    while d <= dhi {
        for (m, major) in [(1.0, true), (2.0, false), (5.0, false)] {
            let v = m * 10f64.powf(d);
            if v.log10() > dhi + 1e-9 {
                continue;
            }
            let yy = y(v);
            let (stroke, width) = if major { ("#bbb", 1.0) } else { ("#eee", 1.0) };
            let _ = writeln!(
                s,
                r#"<line x1="{ml}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="{stroke}" stroke-width="{width}"/>"#,
                w - mr
            );
            if major {
                let _ = writeln!(
                    s,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                    ml - 8.0,
                    yy + 4.0,
                    xml_escape(&fmt_axis(v))
                );
            }
        }
        d += 1.0;
    }
    for (i, l) in labels.iter().enumerate() {
        let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{l}</text>"#, x(i), h - mb + 20.0);
    }
    let _ = writeln!(
        s,
        r##"<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{:.1}" stroke="#333"/><line x1="{ml}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#333"/>"##,
        h - mb,
        h - mb,
        w - mr,
        h - mb
    );
    for (k, sum) in sums.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let pts: Vec<(f64, f64)> =
            values(sum).iter().enumerate().filter(|(_, v)| **v > 0.0).map(|(i, v)| (x(i), y(*v))).collect();
        let path: Vec<String> = pts.iter().map(|(a, b)| format!("{a:.1},{b:.1}")).collect();
        let _ = writeln!(s, r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#, path.join(" "));
        for (a, b) in &pts {
            let _ = writeln!(s, r#"<circle cx="{a:.1}" cy="{b:.1}" r="3.5" fill="{color}"/>"#);
        }
        let ly = mt + 10.0 + k as f64 * 36.0;
        let lx = w - mr + 16.0;
        let vs_bare = match base.filter(|b| b.name != sum.name) {
            Some(b) => format!(", {:.2}x bare", ratio(sum.latency.p99, b.latency.p99).unwrap_or(f64::NAN)),
            None => String::new(),
        };
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{:.1}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{} (p99 {}{})</text>"#,
            lx + 18.0,
            lx + 24.0,
            ly + 4.0,
            xml_escape(&sum.name),
            xml_escape(&fmt_us(sum.latency.p99)),
            xml_escape(&vs_bare)
        );
        let detail = match (sum.hit_rate(), sum.bound()) {
            (Some(hr), Some(b)) => {
                format!("success {:.2}%, hit rate {:.2}% (bound {:.2}%)", sum.success() * 100.0, hr * 100.0, b * 100.0)
            }
            _ => format!("success {:.2}%", sum.success() * 100.0),
        };
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" font-size="11" fill="#555">{}</text>"##,
            lx + 24.0,
            ly + 18.0,
            xml_escape(&detail)
        );
    }
    if let (Some(b), true) = (base, panel2 > 0.0) {
        ratio_panel(&mut s, sums, b, h, w, panel2);
    }
    s.push_str("</svg>\n");
    s
}

/// The ratio panel of `svg_chart`, from `top`, `height` high.
fn ratio_panel(s: &mut String, sums: &[Summary], base: &Summary, top: f64, w: f64, height: f64) {
    const SERIES: [(&str, &str); 3] = [("p50", "#4c78a8"), ("p99", "#e45756"), ("throughput", "#72b7b2")];
    let ratios: Vec<[f64; 3]> = sums
        .iter()
        .map(|x| {
            [
                ratio(x.latency.p50, base.latency.p50).unwrap_or(1.0),
                ratio(x.latency.p99, base.latency.p99).unwrap_or(1.0),
                ratio(x.throughput, base.throughput).unwrap_or(1.0),
            ]
        })
        .collect();
    let (ml, mr, mt, mb) = (80.0, 330.0, 44.0, 40.0);
    let all = ratios.iter().flatten().copied().filter(|r| *r > 0.0 && r.is_finite());
    let (lo, hi) = all.fold((1.0f64, 1.0f64), |(lo, hi), r| (lo.min(r), hi.max(r)));
    let (dlo, dhi) = ((lo.log10() - 0.05).floor().min(-1.0), (hi.log10() + 0.05).ceil().max(1.0));
    let y = |r: f64| top + mt + (dhi - r.max(1e-3).log10()) / (dhi - dlo) * (height - mt - mb);
    let _ = writeln!(
        s,
        r#"<text x="{ml}" y="{:.1}" font-size="15" font-weight="bold">Ratio to bare (log scale; bars start at 1x)</text>"#,
        top + 22.0
    );
    let mut d = dlo;
    while d <= dhi {
        let v = 10f64.powf(d);
        let yy = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{ml}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="{}"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}x</text>"##,
            w - mr,
            if d == 0.0 { "#333" } else { "#ddd" },
            ml - 8.0,
            yy + 4.0,
            v
        );
        d += 1.0;
    }
    let group = (w - ml - mr) / sums.len() as f64;
    let bar = (group * 0.8 / SERIES.len() as f64).min(28.0);
    for (k, (sum, r)) in sums.iter().zip(&ratios).enumerate() {
        let gx = ml + k as f64 * group + (group - bar * SERIES.len() as f64) / 2.0;
        for (j, ((_, color), v)) in SERIES.iter().zip(r).enumerate() {
            let (y0, y1) = (y(1.0), y(*v));
            let (top_y, bottom_y) = (y0.min(y1), y0.max(y1));
            let x = gx + j as f64 * bar;
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{top_y:.1}" width="{:.1}" height="{:.1}" fill="{color}"/>"#,
                bar - 2.0,
                (bottom_y - top_y).max(1.0)
            );
            let ly = if y1 <= y0 { top_y - 4.0 } else { bottom_y + 12.0 };
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{ly:.1}" text-anchor="middle" font-size="10">{v:.2}</text>"#,
                x + bar / 2.0 - 1.0
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            ml + (k as f64 + 0.5) * group,
            top + height - mb + 22.0,
            xml_escape(&sum.name)
        );
    }
    for (j, (label, color)) in SERIES.iter().enumerate() {
        let ly = top + mt + 10.0 + j as f64 * 20.0;
        let lx = w - mr + 16.0;
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="{:.1}" width="14" height="10" fill="{color}"/><text x="{:.1}" y="{:.1}">{label} / bare {label}</text>"#,
            ly - 5.0,
            lx + 20.0,
            ly + 4.0
        );
    }
}

// ---------------------------------------------------------------------------------------------
// main

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
            let mut all: Vec<String> = ["bare", "l1", "no-cache"].map(str::to_owned).into();
            if o.redis_url.is_some() {
                all.push("l1+l2".into());
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
            let run = rt.block_on(start_app(name, n + 1, &backends)).and_then(|(target, about)| {
                println!("{name}: http://{} ({about})", target.addr);
                client_rt.block_on(run_target(&o, target, workload.clone(), about))
            });
            rt.shutdown_timeout(Duration::from_secs(1));
            client_rt.block_on(leftovers.clean());
            runs.push(run?);
        }
    }
    client_rt.block_on(leftovers.clean());

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
