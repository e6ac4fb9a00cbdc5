//! A load generator for the quickstart app: real HTTP/1.1 keep-alive connections over loopback,
//! open loop (a fixed request rate, latency measured from each request's *intended* send time, so
//! a stall is not hidden by coordinated omission) or closed loop (virtual users with think time).
//! Every run is bounded by `--duration` (plus at most `--drain-s` to finish the backlog) and by
//! `--max-requests`: it always stops by itself.
//!
//! ```text
//! # Start the apps in-process on 127.0.0.1 ephemeral ports and compare them in one run:
//! #   bare      the quickstart handlers, no authorization at all
//! #   l1        the quickstart app, L1 only (as `cargo run --example quickstart`)
//! #   no-cache  the quickstart app with L1 disabled: every request asks the authorizer
//! #   l1+l2     with --redis-url: L1 and L2 on Redis (namespace loadtest-<pid>, deleted at the end)
//! cargo run --release --example loadtest -- --mode open --rate 2000 --users 1000 --duration 5
//! cargo run --release --example loadtest -- --mode open --rate 2000 --users 1000 --duration 3 \
//!     --configs bare,l1,no-cache --json /tmp/lt.json --svg /tmp/lt.svg
//! cargo run --release --example loadtest -- --redis-url redis://127.0.0.1:6379 \
//!     --users 15000 --mode closed --think-ms 50 --duration 3
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
//! distribution over `--population` principals, and requests whose resource is drawn from a Zipf
//! distribution over `--resources` documents. The demo knows only three principals (alice, bob,
//! carol): a sampled principal is mapped to one of their tokens (principal % 3), so the population
//! only shapes the token mix; cache keys still differ per request through the resource id in
//! `/documents/{id}`. The mix (`--mix read=90,write=9,admin=1`): read = `GET /documents/{id}` as
//! the user, write = `PUT /documents/{id}` as carol (editor), admin = `GET /admin/stats` as alice.
//!
//! The generator runs on its own runtime (threads `lt-client`, `--client-threads`) plus one pacer
//! thread (`lt-pacer`, open loop); in-process apps run on another (`lt-server`,
//! `--server-threads`). Each thread's CPU time is read from `/proc/self/task/*/schedstat`
//! (nanoseconds), so the report separates the generator's CPU from the server's.

#[allow(dead_code)]
#[path = "quickstart.rs"]
mod quickstart;

use std::collections::{BTreeMap, BTreeSet, HashMap};
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
use tower_authz_cache::AuthzCache;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const USAGE: &str = "\
usage: cargo run --release --example loadtest -- [options]

what to drive (default: every in-process configuration available):
  --configs LIST        in-process apps to run, one after the other: bare,l1,no-cache[,l1+l2]
  --redis-url URL       also run l1+l2 (L2 on Redis, namespace loadtest-<pid>, deleted at the end)
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
    redis_url: Option<String>,
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
            redis_url: None,
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
            "--redis-url" => o.redis_url = Some(value()?),
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
    if o.target.is_some() && (o.configs.is_some() || o.redis_url.is_some()) {
        return Err("--target drives a running app: --configs and --redis-url start in-process apps".into());
    }
    if o.self_test && (o.target.is_some() || o.configs.is_some() || o.mode == Mode::Closed) {
        return Err("--self-test runs the open-loop driver against its own trivial server only".into());
    }
    if let Some(configs) = &o.configs {
        for c in configs {
            if !["bare", "l1", "no-cache", "l1+l2"].contains(&c.as_str()) {
                return Err(format!("--configs: unknown configuration {c:?} (bare, l1, no-cache, l1+l2)"));
            }
            if c == "l1+l2" && o.redis_url.is_none() {
                return Err("--configs l1+l2 needs --redis-url".into());
            }
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

#[derive(Clone, Copy, Debug)]
struct Req {
    kind: Kind,
    /// Index into `DEMO_USERS`.
    user: u8,
    resource: u32,
}

struct Workload {
    /// Each virtual user's principal (a rank in 1..=population) ...
    principals: Vec<u32>,
    /// ... and the demo user it maps to.
    tokens: Vec<u8>,
    resources: Zipf,
    mix: [u64; 3],
}

impl Workload {
    fn new(o: &Opts) -> Self {
        let population = Zipf::new(o.population, o.zipf_s);
        let mut rng = Rng::new(o.seed ^ 0x7573_6572_7300_0001);
        let principals: Vec<u32> = (0..o.users).map(|_| population.sample(&mut rng)).collect();
        let tokens = principals.iter().map(|p| ((p - 1) % 3) as u8).collect();
        Workload { principals, tokens, resources: Zipf::new(o.resources, o.zipf_s), mix: o.mix }
    }

    fn users(&self) -> usize {
        self.principals.len()
    }

    fn request(&self, user: usize, rng: &mut Rng) -> Req {
        let total: u64 = self.mix.iter().sum();
        let pick = rng.below(total);
        let resource = self.resources.sample(rng);
        if pick < self.mix[0] {
            Req { kind: Kind::Read, user: self.tokens[user], resource }
        } else if pick < self.mix[0] + self.mix[1] {
            Req { kind: Kind::Write, user: 2, resource }
        } else {
            Req { kind: Kind::Admin, user: 0, resource }
        }
    }

    fn token_share(&self) -> [usize; 3] {
        let mut share = [0; 3];
        for &t in &self.tokens {
            share[t as usize] += 1;
        }
        share
    }

    fn distinct_principals(&self) -> usize {
        self.principals.iter().collect::<BTreeSet<_>>().len()
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

fn write_request(buf: &mut String, host: &str, req: Req) {
    buf.clear();
    let token = DEMO_USERS[req.user as usize];
    let _ = match req.kind {
        Kind::Read => write!(
            buf,
            "GET /documents/{} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}-token\r\n\r\n",
            req.resource
        ),
        Kind::Write => write!(
            buf,
            "PUT /documents/{} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}-token\r\nContent-Length: 0\r\n\r\n",
            req.resource
        ),
        Kind::Admin => {
            write!(buf, "GET /admin/stats HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}-token\r\n\r\n")
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
    errors: [u64; ERR_KINDS.len()],
    last_done: Option<Instant>,
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

    fn merge(&mut self, other: Stats) {
        self.latency.extend(other.latency);
        self.service.extend(other.service);
        self.lag.extend(other.lag);
        for (k, v) in other.status {
            *self.status.entry(k).or_default() += v;
        }
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
        write_request(&mut wbuf, &ctx.target.host, job.req);
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
                st.latency.push(us(done.saturating_duration_since(job.intended)));
                st.service.push(us(done - sent));
                st.lag.push(us(sent.saturating_duration_since(job.intended)));
                *st.status.entry(r.status).or_default() += 1;
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
            "[{name}] {:>5.1}s  requests {done:>8}  rate {:>7}/s  errors {}",
            t0.elapsed().as_secs_f64(),
            done - last,
            progress.errors.load(Relaxed)
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
    write_request(&mut wbuf, &t.host, Req { kind: Kind::Admin, user: 0, resource: 0 });
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
    /// Hits, misses, errors.
    l2: Option<(u64, u64, u64)>,
    authorizer_calls: u64,
    single_flight_joins: u64,
    undecided: u64,
}

fn cache_delta(before: &Value, after: &Value) -> CacheDelta {
    let get = |v: &Value, p: &str| v.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    let d = |p: &str| get(after, p).saturating_sub(get(before, p));
    CacheDelta {
        l1_hits: d("/tiers/l1/hits"),
        l1_misses: d("/tiers/l1/misses"),
        l2: after.pointer("/tiers/l2").map(|_| (d("/tiers/l2/hits"), d("/tiers/l2/misses"), d("/tiers/l2/errors"))),
        authorizer_calls: d("/authorizer_calls"),
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
// Running configurations

struct Run {
    name: String,
    driven: Driven,
    cache: Option<CacheDelta>,
    cpu: Cpu,
    local: bool,
}

async fn run_target(o: &Opts, target: Arc<Target>, wl: Arc<Workload>) -> Result<Run, BoxError> {
    let before = if target.stats { fetch_stats(&target, o.timeout).await } else { None };
    let cpu0 = thread_cpu();
    let driven = drive(o, target.clone(), wl).await?;
    let cpu = cpu_between(&cpu0, &thread_cpu());
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
    Ok(Run { name: target.name.clone(), driven, cache, cpu, local: target.local })
}

fn local_target(name: &str, addr: SocketAddr, stats: bool) -> Arc<Target> {
    Arc::new(Target { name: name.to_owned(), addr, host: addr.to_string(), stats, local: true })
}

/// Starts the selected quickstart configurations on 127.0.0.1 ephemeral ports (on the current
/// runtime, which must be the server runtime).
async fn start_apps(names: &[String], redis: Option<(&str, &str)>) -> Result<Vec<Arc<Target>>, BoxError> {
    use quickstart::Roles;
    #[cfg(not(feature = "redis"))]
    if redis.is_some() {
        return Err("--redis-url needs the `redis` feature".into());
    }
    let mut targets = Vec::new();
    for name in names {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = listener.local_addr()?;
        match name.as_str() {
            "bare" => {
                let app = quickstart::unprotected_app(Roles::demo());
                tokio::spawn(async move {
                    let _ = axum::serve(listener, app).await;
                });
            }
            "l1" => {
                let (app, _cache) = quickstart::app(Roles::demo());
                tokio::spawn(async move {
                    let _ = axum::serve(listener, axum::ServiceExt::into_make_service(app)).await;
                });
            }
            "no-cache" => {
                let roles = Roles::demo();
                let cache = AuthzCache::builder(quickstart::authorizer(roles.clone())).l1_max_bytes(0).build();
                let app = quickstart::app_from(roles, cache);
                tokio::spawn(async move {
                    let _ = axum::serve(listener, axum::ServiceExt::into_make_service(app)).await;
                });
            }
            #[cfg(feature = "redis")]
            "l1+l2" => {
                let Some((url, namespace)) = redis else { return Err("l1+l2 needs --redis-url".into()) };
                let app = l1_l2_app(url, namespace)?;
                tokio::spawn(async move {
                    let _ = axum::serve(listener, axum::ServiceExt::into_make_service(app)).await;
                });
            }
            other => return Err(format!("unknown configuration {other:?}").into()),
        }
        targets.push(local_target(name, addr, name != "bare"));
    }
    Ok(targets)
}

#[cfg(feature = "redis")]
fn l1_l2_app(url: &str, namespace: &str) -> Result<impl quickstart::App, BoxError> {
    let roles = quickstart::Roles::demo();
    let tier = tower_authz_cache::RedisTier::builder(url, b"loadtest secret, 32 bytes long..")
        .namespace(namespace)
        .build()
        .map_err(|e| format!("--redis-url: {e}"))?;
    let cache = AuthzCache::builder(quickstart::authorizer(roles.clone())).l2(tier).build();
    Ok(quickstart::app_from(roles, cache))
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
    Ok(Arc::new(Target { name: "target".into(), addr, host: authority.to_owned(), stats: true, local: false }))
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
    issued: u64,
    responses: u64,
    ok: u64,
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
    /// The app ran in this process (its CPU is known).
    local: bool,
}

impl Summary {
    fn new(run: Run) -> Self {
        let Run { name, driven, cache, cpu, local } = run;
        let Driven { mut stats, issued, t0, finished } = driven;
        let responses: u64 = stats.status.values().sum();
        let ok = stats.status.iter().filter(|(s, _)| (200..300).contains(*s)).map(|(_, n)| n).sum();
        let span = stats.last_done.unwrap_or(finished).saturating_duration_since(t0).as_secs_f64();
        Summary {
            name,
            issued,
            responses,
            ok,
            errors: ERR_KINDS.iter().copied().zip(stats.errors).collect(),
            status: std::mem::take(&mut stats.status),
            latency: pcts(&mut stats.latency),
            service: pcts(&mut stats.service),
            lag: pcts(&mut stats.lag),
            throughput: if span > 0.0 { responses as f64 / span } else { 0.0 },
            wall_s: finished.saturating_duration_since(t0).as_secs_f64(),
            cache,
            cpu,
            local,
        }
    }

    fn success(&self) -> f64 {
        if self.issued == 0 { 0.0 } else { self.ok as f64 / self.issued as f64 }
    }

    fn cpu_share(&self, ns: u64) -> f64 {
        if self.wall_s > 0.0 { ns as f64 / 1e9 / self.wall_s } else { 0.0 }
    }

    fn json(&self, base: Option<&Summary>, client_threads: usize) -> Value {
        let mut v = json!({
            "name": self.name,
            "requests": self.issued,
            "responses": self.responses,
            "success_2xx": self.ok,
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
            },
        });
        if let Some(c) = &self.cache {
            v["cache"] = json!({
                "l1_hits": c.l1_hits,
                "l1_misses": c.l1_misses,
                "l2": c.l2.map(|(h, m, e)| json!({ "hits": h, "misses": m, "errors": e })),
                "authorizer_calls": c.authorizer_calls,
                "single_flight_joins": c.single_flight_joins,
                "undecided": c.undecided,
            });
        }
        if let Some(b) = base {
            v["vs_bare"] = json!({
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
    row("success (2xx / requests)", &|s| format!("{:.2}%", s.success() * 100.0));
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
        row("p99 / bare p99", &|s| fmt_ratio(ratio(s.latency.p99, b.latency.p99)));
        row("throughput / bare", &|s| fmt_ratio(ratio(s.throughput, b.throughput)));
    }
    let cache = |f: fn(&CacheDelta) -> String| move |s: &Summary| s.cache.as_ref().map_or("-".to_owned(), f);
    if sums.iter().any(|s| s.cache.is_some()) {
        row("L1 hits", &cache(|c| c.l1_hits.to_string()));
        row("L1 misses", &cache(|c| c.l1_misses.to_string()));
        if sums.iter().any(|s| s.cache.is_some_and(|c| c.l2.is_some())) {
            row("L2 hits", &cache(|c| c.l2.map_or("-".to_owned(), |l| l.0.to_string())));
            row("L2 misses", &cache(|c| c.l2.map_or("-".to_owned(), |l| l.1.to_string())));
            row("L2 errors", &cache(|c| c.l2.map_or("-".to_owned(), |l| l.2.to_string())));
        }
        row("authorizer calls", &cache(|c| c.authorizer_calls.to_string()));
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
fn svg_chart(sums: &[Summary], subtitle: &str) -> String {
    const COLORS: [&str; 6] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"];
    let labels = ["p50", "p90", "p95", "p99", "p99.9"];
    let values = |s: &Summary| [s.latency.p50, s.latency.p90, s.latency.p95, s.latency.p99, s.latency.p999];
    let (w, h, ml, mr, mt, mb) = (840.0, 440.0, 80.0, 230.0, 56.0, 50.0);
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
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{ml}" y="22" font-size="15" font-weight="bold">Latency percentiles from the intended send time (log scale)</text>"#
    );
    let _ = writeln!(s, r##"<text x="{ml}" y="40" fill="#555">{}</text>"##, xml_escape(subtitle));
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
        let ly = mt + 10.0 + k as f64 * 20.0;
        let lx = w - mr + 16.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{:.1}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{} (p99 {})</text>"#,
            lx + 18.0,
            lx + 24.0,
            ly + 4.0,
            xml_escape(&sum.name),
            xml_escape(&fmt_us(sum.latency.p99))
        );
    }
    s.push_str("</svg>\n");
    s
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
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(o.client_threads)
        .thread_name("lt-client")
        .enable_all()
        .build()?;
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(o.server_threads)
        .thread_name("lt-server")
        .enable_all()
        .build()?;
    let workload = Arc::new(Workload::new(&o));
    let redis_namespace = format!("loadtest-{}", std::process::id());

    let targets: Vec<Arc<Target>> = if o.self_test {
        server_rt.block_on(async {
            let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
            let addr = listener.local_addr()?;
            tokio::spawn(trivial_server(listener));
            Ok::<_, BoxError>(vec![local_target("self-test", addr, false)])
        })?
    } else if let Some(url) = &o.target {
        vec![parse_target(url)?]
    } else {
        let names = o.configs.clone().unwrap_or_else(|| {
            let mut all: Vec<String> = ["bare", "l1", "no-cache"].map(str::to_owned).into();
            if o.redis_url.is_some() {
                all.push("l1+l2".into());
            }
            all
        });
        #[cfg(feature = "redis")]
        if let Some(url) = &o.redis_url {
            client_rt.block_on(redis_connection(url)).map_err(|e| format!("--redis-url: {e}"))?;
        }
        let redis = o.redis_url.as_deref().map(|u| (u, redis_namespace.as_str()));
        server_rt.block_on(start_apps(&names, redis))?
    };

    let [alice, bob, carol] = workload.token_share();
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
    println!(
        "note: the demo has 3 principals: a sampled principal maps to alice/bob/carol (principal % 3), so the population only shapes the token mix (users: alice {alice}, bob {bob}, carol {carol}); cache keys differ by the resource id in /documents/{{id}}"
    );
    for t in &targets {
        println!("{}: http://{}", t.name, t.addr);
    }

    let mut runs = Vec::new();
    let mut failure: Option<BoxError> = None;
    for t in targets {
        match client_rt.block_on(run_target(&o, t.clone(), workload.clone())) {
            Ok(r) => runs.push(r),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    server_rt.shutdown_timeout(Duration::from_secs(1));
    #[cfg(feature = "redis")]
    if let Some(url) = &o.redis_url {
        std::thread::sleep(Duration::from_millis(100));
        match client_rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), delete_namespace(url, &redis_namespace)).await
        }) {
            Ok(Ok(n)) => println!("redis: deleted {n} keys of namespace {redis_namespace}"),
            Ok(Err(e)) => eprintln!("redis: could not delete namespace {redis_namespace}: {e}"),
            Err(_) => eprintln!("redis: deleting namespace {redis_namespace} timed out"),
        }
    }
    if let Some(e) = failure {
        return Err(e);
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
    if sums.iter().any(|s| s.cache.is_some()) {
        println!(
            "cache counters: GET /admin/stats (alice-token) before and after the run; the second read counts its own check."
        );
    }
    println!(
        "CPU: per thread from /proc/self/task/*/schedstat (ns): generator = lt-client + lt-pacer threads, app = lt-server threads; % of one core over the run."
    );

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

    let subtitle = format!(
        "{} loop, {}, {} users, {} connections, {} s, seed {}",
        if o.mode == Mode::Open { "open" } else { "closed" },
        if o.mode == Mode::Open { format!("{} req/s", o.rate) } else { format!("think {} ms", o.think.as_millis()) },
        o.users,
        o.connections,
        o.duration.as_secs_f64(),
        o.seed
    );
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
            },
            "workload": {
                "demo_principals": 3,
                "note": "the demo has 3 principals: a sampled principal maps to alice/bob/carol (principal % 3), so the population only shapes the token mix; cache keys differ by the resource id in /documents/{id}",
                "distinct_principals": workload.distinct_principals(),
                "users_by_token": { "alice": alice, "bob": bob, "carol": carol },
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
