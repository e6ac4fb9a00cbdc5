//! The fault matrix: a steady stream of authorization requests through the real layer, on two
//! cache instances (two "processes" sharing Redis and/or Postgres), with role changes (a
//! revocation or a grant in the source of truth, then an invalidation through the invalidation
//! service) mixed in, while one fault at a time is injected: Redis down / slow / black hole /
//! restarted empty, Postgres down / slow / restarted, a backplane partition either way, and an
//! authorizer that errors, hangs past its timeout or panics.
//!
//! Every cell measures requests, statuses, p99 latency and stale allows, and asserts what
//! DESIGN.md promises: no stale allow; failures only as 503 and only where nothing valid is cached
//! and the authorizer cannot decide; an authorizer panic costs its requests, not the service.
//! The table goes to stdout (`--nocapture`) and to `target/fault-matrix.md`.
//!
//! A *stale allow* is a 200 for (principal, action) returned later than `revocation_time +
//! max_staleness` where `revocation_time` is when the role change and its invalidation call
//! returned, and no later grant covers it. The model keeps every principal's role history with
//! timestamps, so each allow is judged after the fact against the exact history. Two clocks are
//! checked: from the *first* invalidation call's return (even when it returned
//! `InvalidationError`), and from the call that was *acknowledged* (the app retries a failed
//! invalidation through the next instance every 50 ms, as it is told to). A last cell, the
//! negative control, changes roles without invalidating: there the detector must fire.
#![cfg(all(feature = "redis", feature = "postgres"))]

mod support;

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use http::{Method, Request, Response, StatusCode};
use support::faults::{Cut, OwnedRedis, SplitProxy};
use support::pg::{self, Schema};
use support::proxy::{FaultProxy, Mode};
use support::redis::{Namespace, SECRET};
use tokio::task::JoinSet;
use tower::util::BoxCloneService;
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
use tower_authz_cache::{
    AuthzCache, BoxError, CachedAuthorizationLayer, Decision, Invalidation, Permission, PostgresTier, Principal,
    RedisTier, Rejection, RouteTable, TrustedHeader,
};

// ---- configuration (short, so that every fault shows within a cell of a few seconds) ----

/// The staleness bound under test.
const MAX_STALENESS: Duration = Duration::from_millis(300);
const REDIS_TIMEOUT: Duration = Duration::from_millis(50);
const PG_TIMEOUT: Duration = Duration::from_millis(100);
const AUTHZ_TIMEOUT: Duration = Duration::from_millis(150);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(250);
const FAILURE_THRESHOLD: u32 = 5;
const OPEN_FOR: Duration = Duration::from_millis(500);
/// Longer than a cell: entries only go away through invalidations (and faults).
const ALLOW_TTL: Duration = Duration::from_secs(20);
const DENY_TTL: Duration = Duration::from_secs(10);
/// The grace cells' ttls (allow and deny): shorter than the fault, so that entries expire in it.
const GRACE_TTL: Duration = Duration::from_millis(1000);
/// The grace cells' grace: longer than a cell.
const GRACE: Duration = Duration::from_secs(10);

/// A cell: the stream runs WARM before the fault, FAULT with it, RECOVER after it is cleared.
const WARM: Duration = Duration::from_millis(500);
const FAULT: Duration = Duration::from_millis(1500);
const RECOVER: Duration = Duration::from_millis(1000);
/// Restart faults: how long the server (or the proxy) stays away before it comes back.
const RESTART_GAP: Duration = Duration::from_millis(500);

const INSTANCES: usize = 2;
const WORKERS_PER_INSTANCE: usize = 3;
/// Pause of a worker between two requests: a steady stream, not a flood.
const PACE: Duration = Duration::from_millis(1);
const REVOKE_EVERY: Duration = Duration::from_millis(80);
const RETRY_EVERY: Duration = Duration::from_millis(50);

/// Principals `u00`..`u39`: the first `STABLE` never change role, the others churn.
const PRINCIPALS: usize = 40;
const STABLE: usize = 20;
const DOCS: usize = 10;
const ACTIONS: [&str; 3] = ["read", "write", "delete"];
/// The roles, by index: what each one may do.
const ROLES: [(&str, &[&str]); 4] =
    [("none", &[]), ("viewer", &["read"]), ("editor", &["read", "write"]), ("admin", &["read", "write", "delete"])];

fn principal_name(p: usize) -> String {
    format!("u{p:02}")
}

fn initial_role(p: usize) -> usize {
    match p % 10 {
        0..=2 => 3,
        3..=5 => 2,
        6..=8 => 1,
        _ => 0,
    }
}

// ---- the source of truth and its history ----

/// One role assignment of one principal.
#[derive(Debug, Clone)]
struct Change {
    role: usize,
    /// When the source of truth changed.
    set_at: Instant,
    /// When the first invalidation call for it returned (Ok or Err).
    first_return: Option<Instant>,
    /// When an invalidation call for it returned Ok.
    ack: Option<Instant>,
}

struct Truth {
    history: Mutex<Vec<Vec<Change>>>,
}

impl Truth {
    fn new() -> Arc<Self> {
        let long_ago = Instant::now() - Duration::from_secs(3600);
        let history = (0..PRINCIPALS)
            .map(|p| {
                vec![Change {
                    role: initial_role(p),
                    set_at: long_ago,
                    first_return: Some(long_ago),
                    ack: Some(long_ago),
                }]
            })
            .collect();
        Arc::new(Truth { history: Mutex::new(history) })
    }

    fn role(&self, p: usize) -> usize {
        self.history.lock().unwrap()[p].last().unwrap().role
    }

    /// Changes the role; returns the index of the change.
    fn set_role(&self, p: usize, role: usize) -> usize {
        let mut h = self.history.lock().unwrap();
        h[p].push(Change { role, set_at: Instant::now(), first_return: None, ack: None });
        h[p].len() - 1
    }

    fn returned(&self, p: usize, i: usize, at: Instant, ok: bool) {
        let mut h = self.history.lock().unwrap();
        let c = &mut h[p][i];
        c.first_return.get_or_insert(at);
        if ok {
            c.ack.get_or_insert(at);
        }
    }
}

/// Judges one allow of `action` for principal `p` returned at `t`: `Err(())` when stale, else the
/// lag past the revocation it was served under (`None` when the current role allows it).
fn judge(
    h: &[Change],
    action: &str,
    t: Instant,
    clock: fn(&Change) -> Option<Instant>,
) -> Result<Option<Duration>, ()> {
    let mut best: Result<Option<Duration>, ()> = Err(());
    for (i, c) in h.iter().enumerate() {
        if c.set_at > t || !ROLES[c.role].1.contains(&action) {
            continue;
        }
        match h.get(i + 1).map(clock) {
            None => return Ok(None),
            // The change that ended this role has not returned yet: still in its grace.
            Some(None) => best = Ok(Some(Duration::ZERO)),
            Some(Some(revoked)) if t <= revoked + MAX_STALENESS => {
                let lag = t.saturating_duration_since(revoked);
                best = Ok(Some(match best {
                    Ok(Some(b)) => b.min(lag),
                    _ => lag,
                }));
            }
            Some(Some(_)) => {}
        }
    }
    best
}

// ---- the authorizer, with its faults ----

const AUTHZ_OK: u8 = 0;
const AUTHZ_ERROR: u8 = 1;
const AUTHZ_HANG: u8 = 2;
const AUTHZ_PANIC: u8 = 3;

const INJECTED_PANIC: &str = "fault-matrix: injected authorizer panic";

#[derive(Clone)]
struct AuthzControl {
    mode: Arc<AtomicU8>,
    panics: Arc<AtomicU64>,
}

fn authorizer(truth: Arc<Truth>, control: AuthzControl) -> impl tower_authz_cache::Authorizer {
    move |principal: Principal, permission: Permission| {
        let (truth, control) = (truth.clone(), control.clone());
        async move {
            match control.mode.load(Ordering::SeqCst) {
                AUTHZ_ERROR => return Err::<Decision, BoxError>("fault-matrix: policy store unreachable".into()),
                AUTHZ_HANG => tokio::time::sleep(AUTHZ_TIMEOUT * 3).await,
                AUTHZ_PANIC => {
                    control.panics.fetch_add(1, Ordering::SeqCst);
                    panic!("{INJECTED_PANIC}");
                }
                _ => {}
            }
            // A policy lookup takes a little while; the truth is read at its end.
            tokio::time::sleep(Duration::from_millis(1)).await;
            let p: usize = principal.id()[1..].parse().map_err(|_| BoxError::from("unknown principal"))?;
            Ok(Decision::from_bool(ROLES[truth.role(p)].1.contains(&permission.action())))
        }
    }
}

/// Injected panics are expected: keep them out of the output (everything else still prints).
fn quiet_injected_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let msg = payload
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("");
            if !msg.contains(INJECTED_PANIC) {
                previous(info);
            }
        }));
    });
}

// ---- the cells ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Topo {
    /// L1 + L2 (Redis, the backplane), each instance through its own data and backplane proxies.
    Redis,
    /// L1 + L2 on a redis-server of the test's own, without proxies.
    OwnedRedis,
    /// L1 + L3 (Postgres, also the backplane), each instance through its own proxy.
    Pg,
    /// L1 + L2 + L3; Redis direct, Postgres through a proxy per instance.
    Full,
}

impl Topo {
    fn label(self) -> &'static str {
        match self {
            Topo::Redis => "L1+L2",
            Topo::OwnedRedis => "L1+L2 (own redis-server)",
            Topo::Pg => "L1+L3",
            Topo::Full => "L1+L2+L3",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    RedisDown,
    RedisSlow,
    RedisBlackHole,
    RedisRestartEmpty,
    RedisPubSubCut,
    RedisDataCut,
    PgDown,
    PgSlow,
    PgRestart,
    PgListenCut,
    PgDataCut,
    AuthzError,
    AuthzTimeout,
    AuthzPanic,
    /// Negative control: role changes without any invalidation. The detector must fire.
    Control,
    /// No outage, but A's wall clock runs five minutes ahead and B's five behind (through the
    /// unstable `internals` hook): deadlines written by A claim ten more minutes to B.
    ClockSkew,
}

impl Fault {
    fn is_authorizer(self) -> bool {
        matches!(self, Fault::AuthzError | Fault::AuthzTimeout | Fault::AuthzPanic)
    }
}

#[derive(Debug, Clone, Copy)]
struct Cell {
    name: &'static str,
    topo: Topo,
    fault: Fault,
    /// Grace on, with ttls shorter than the fault (`GRACE_TTL`): every stable entry expires
    /// during the authorizer outage and must be answered within grace, never an invalidated one.
    grace: bool,
}

const CELLS: &[Cell] = &[
    Cell { name: "baseline (no fault)", topo: Topo::Redis, fault: Fault::None, grace: false },
    Cell { name: "redis down (connection refused/reset)", topo: Topo::Redis, fault: Fault::RedisDown, grace: false },
    Cell { name: "redis slow (100 ms/chunk = 2x timeout)", topo: Topo::Redis, fault: Fault::RedisSlow, grace: false },
    Cell { name: "redis black hole", topo: Topo::Redis, fault: Fault::RedisBlackHole, grace: false },
    Cell {
        name: "redis killed, restarted empty",
        topo: Topo::OwnedRedis,
        fault: Fault::RedisRestartEmpty,
        grace: false,
    },
    Cell {
        name: "backplane: A's pub/sub cut, data path up",
        topo: Topo::Redis,
        fault: Fault::RedisPubSubCut,
        grace: false,
    },
    Cell {
        name: "backplane: A's redis data path cut, pub/sub up",
        topo: Topo::Redis,
        fault: Fault::RedisDataCut,
        grace: false,
    },
    Cell { name: "baseline (no fault)", topo: Topo::Pg, fault: Fault::None, grace: false },
    Cell { name: "postgres down", topo: Topo::Pg, fault: Fault::PgDown, grace: false },
    Cell { name: "postgres slow (200 ms/chunk = 2x timeout)", topo: Topo::Pg, fault: Fault::PgSlow, grace: false },
    Cell { name: "postgres restart (all connections dropped)", topo: Topo::Pg, fault: Fault::PgRestart, grace: false },
    Cell { name: "backplane: A's LISTEN cut, data path up", topo: Topo::Pg, fault: Fault::PgListenCut, grace: false },
    Cell {
        name: "backplane: A's postgres data path cut, LISTEN up",
        topo: Topo::Pg,
        fault: Fault::PgDataCut,
        grace: false,
    },
    Cell { name: "postgres down", topo: Topo::Full, fault: Fault::PgDown, grace: false },
    Cell { name: "authorizer errors", topo: Topo::Redis, fault: Fault::AuthzError, grace: false },
    Cell {
        name: "authorizer hangs (3x its 150 ms timeout)",
        topo: Topo::Redis,
        fault: Fault::AuthzTimeout,
        grace: false,
    },
    Cell { name: "authorizer panics", topo: Topo::Redis, fault: Fault::AuthzPanic, grace: false },
    Cell { name: "authorizer errors, grace on (ttl 1 s)", topo: Topo::Redis, fault: Fault::AuthzError, grace: true },
    Cell { name: "authorizer hangs, grace on (ttl 1 s)", topo: Topo::Redis, fault: Fault::AuthzTimeout, grace: true },
    Cell { name: "control: role changes never invalidated", topo: Topo::Redis, fault: Fault::Control, grace: false },
    Cell {
        name: "clocks 10 minutes apart (A +5 min, B -5 min)",
        topo: Topo::Full,
        fault: Fault::ClockSkew,
        grace: false,
    },
];

/// How the revoker makes a role change known.
enum Revoke {
    /// Through the invalidation service of a random instance (retried through the next on error).
    Service,
    /// Recorded in the change feed of this schema, straight to Postgres.
    Sql(String),
    /// Never (the negative control).
    Never,
}

// ---- one cell's rig: instances, proxies, namespaces ----

/// The status, and the rejection's reason for a 503.
type Svc = BoxCloneService<Request<()>, (StatusCode, Option<String>), Infallible>;

/// Field order is drop order: caches before the proxies and servers they talk to, and those
/// before the namespace and schema are deleted.
struct Rig {
    caches: Vec<AuthzCache>,
    services: Vec<Svc>,
    control: AuthzControl,
    redis_data: Vec<FaultProxy>,
    redis_bp: Vec<FaultProxy>,
    pg: Vec<FaultProxy>,
    split: Option<SplitProxy>,
    owned: Option<OwnedRedis>,
    _ns: Option<Namespace>,
    _schema: Option<Schema>,
}

fn routes() -> RouteTable {
    RouteTable::new()
        .route(Method::GET, "/documents/{id}", "documents:{id}", "read")
        .route(Method::PUT, "/documents/{id}", "documents:{id}", "write")
        .route(Method::DELETE, "/documents/{id}", "documents:{id}", "delete")
}

fn service(cache: &AuthzCache) -> Svc {
    let layer = CachedAuthorizationLayer::new(cache.clone(), TrustedHeader::new("x-user".parse().unwrap()), routes());
    let svc = ServiceBuilder::new()
        .map_response(|res: Response<_>| {
            let reason = (res.status() == StatusCode::SERVICE_UNAVAILABLE)
                .then(|| res.extensions().get::<Rejection>().map(|r| r.reason().to_owned()))
                .flatten();
            (res.status(), reason)
        })
        .layer(layer)
        .service(service_fn(|_: Request<()>| async {
            Ok::<_, Infallible>(Response::new(bytes::Bytes::from_static(b"ok")))
        }));
    BoxCloneService::new(svc)
}

fn redis_tier(ns: &str, url: &str, backplane: &str) -> RedisTier {
    RedisTier::builder(url)
        .namespace(ns)
        .pool_size(8)
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REDIS_TIMEOUT)
        .failure_threshold(FAILURE_THRESHOLD)
        .open_for(OPEN_FOR)
        .backplane_url(backplane)
        .build()
        .expect("valid redis tier")
}

fn pg_tier(schema: &Schema, url: &str) -> PostgresTier {
    PostgresTier::builder(url)
        .schema(&schema.0)
        .pool_size(6)
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(PG_TIMEOUT)
        .failure_threshold(FAILURE_THRESHOLD)
        .open_for(OPEN_FOR)
        .warm_on_start(0)
        .build()
        .expect("valid postgres tier")
}

impl Rig {
    async fn new(cell: &Cell, truth: &Arc<Truth>) -> Rig {
        let control = AuthzControl { mode: Arc::new(AtomicU8::new(AUTHZ_OK)), panics: Arc::default() };
        let tag: String = cell.name.chars().filter(char::is_ascii_alphanumeric).take(12).collect();
        let mut rig = Rig {
            caches: Vec::new(),
            services: Vec::new(),
            control: control.clone(),
            redis_data: Vec::new(),
            redis_bp: Vec::new(),
            pg: Vec::new(),
            split: None,
            owned: None,
            _ns: None,
            _schema: None,
        };
        let uses_redis = matches!(cell.topo, Topo::Redis | Topo::Full);
        let uses_pg = matches!(cell.topo, Topo::Pg | Topo::Full);
        let ns = uses_redis.then(|| {
            support::redis::addr(); // fails with instructions when Redis is down
            Namespace::new(&format!("fm-{tag}"))
        });
        let schema = if uses_pg {
            let _ = pg::client().await; // fails with instructions when Postgres is down
            let schema = Schema::new(&format!("fm_{}", tag.to_ascii_lowercase()));
            pg_tier(&schema, &pg::url()).migrate_with_reference_rbac().await.expect("migrations apply");
            Some(schema)
        } else {
            None
        };
        if cell.topo == Topo::OwnedRedis {
            rig.owned = Some(tokio::task::block_in_place(OwnedRedis::start));
        }
        if cell.topo == Topo::Redis {
            for _ in 0..INSTANCES {
                rig.redis_data.push(FaultProxy::start(support::redis::addr()).await);
                rig.redis_bp.push(FaultProxy::start(support::redis::addr()).await);
            }
        }
        if uses_pg {
            for _ in 0..INSTANCES {
                rig.pg.push(FaultProxy::start(pg::addr()).await);
            }
            if matches!(cell.fault, Fault::PgListenCut | Fault::PgDataCut) {
                rig.split = Some(SplitProxy::start(pg::addr()).await);
            }
        }
        for i in 0..INSTANCES {
            let mut builder = AuthzCache::builder(authorizer(truth.clone(), control.clone()))
                .allow_ttl(ALLOW_TTL)
                .deny_ttl(DENY_TTL)
                .authorizer_timeout(AUTHZ_TIMEOUT)
                .max_staleness(MAX_STALENESS);
            if cell.grace {
                builder = builder.allow_ttl(GRACE_TTL).deny_ttl(GRACE_TTL).grace(GRACE);
            }
            if cell.fault == Fault::ClockSkew {
                #[cfg(feature = "internals")]
                {
                    builder = builder.__wall_clock_offset(if i == 0 { 300_000 } else { -300_000 });
                }
                #[cfg(not(feature = "internals"))]
                panic!("the clock-skew cell needs the `internals` feature (run with --all-features)");
            }
            match cell.topo {
                Topo::Redis => {
                    let ns = &ns.as_ref().unwrap().0;
                    builder = builder.secret(SECRET).l2(redis_tier(
                        ns,
                        &rig.redis_data[i].url("redis"),
                        &rig.redis_bp[i].url("redis"),
                    ));
                }
                Topo::OwnedRedis => {
                    let url = rig.owned.as_ref().unwrap().url();
                    builder = builder.secret(SECRET).l2(redis_tier(&format!("fm-{tag}"), &url, &url));
                }
                Topo::Full => {
                    let url = support::redis::url();
                    builder = builder.secret(SECRET).l2(redis_tier(&ns.as_ref().unwrap().0, &url, &url));
                }
                Topo::Pg => {}
            }
            if let Some(schema) = &schema {
                let addr = match (&rig.split, i) {
                    (Some(split), 0) => split.addr(),
                    _ => rig.pg[i].addr(),
                };
                builder = builder.secret(SECRET).l3(pg_tier(schema, &pg::url_via(addr)));
            }
            let cache = builder.build();
            rig.services.push(service(&cache));
            rig.caches.push(cache);
        }
        for cache in &rig.caches {
            support::redis::wait_trusted(cache).await;
        }
        rig._ns = ns;
        rig._schema = schema;
        rig
    }

    fn redis_proxies(&self) -> impl Iterator<Item = &FaultProxy> {
        self.redis_data.iter().chain(&self.redis_bp)
    }

    async fn inject(&mut self, fault: Fault) {
        let slow_redis = Mode::Slow(REDIS_TIMEOUT * 2);
        let slow_pg = Mode::Slow(PG_TIMEOUT * 2);
        match fault {
            Fault::None | Fault::Control | Fault::ClockSkew => {}
            Fault::RedisDown => self.redis_proxies().for_each(|p| p.set_mode(Mode::Down)),
            Fault::RedisSlow => self.redis_proxies().for_each(|p| p.set_mode(slow_redis)),
            Fault::RedisBlackHole => self.redis_proxies().for_each(|p| p.set_mode(Mode::BlackHole)),
            Fault::RedisRestartEmpty => {
                let owned = self.owned.as_mut().unwrap();
                tokio::task::block_in_place(|| owned.kill());
                tokio::time::sleep(RESTART_GAP).await;
                tokio::task::block_in_place(|| owned.restart_empty());
            }
            Fault::RedisPubSubCut => self.redis_bp[0].set_mode(Mode::BlackHole),
            Fault::RedisDataCut => self.redis_data[0].set_mode(Mode::BlackHole),
            Fault::PgDown => self.pg.iter().for_each(|p| p.set_mode(Mode::Down)),
            Fault::PgSlow => self.pg.iter().for_each(|p| p.set_mode(slow_pg)),
            Fault::PgRestart => {
                for p in &self.pg {
                    p.restart();
                    p.set_mode(Mode::Down);
                }
                tokio::time::sleep(RESTART_GAP).await;
                self.pg.iter().for_each(|p| p.set_mode(Mode::Pass));
            }
            Fault::PgListenCut => self.split.as_ref().unwrap().set_listen(Cut::BlackHole),
            Fault::PgDataCut => self.split.as_ref().unwrap().set_data(Cut::BlackHole),
            Fault::AuthzError => self.control.mode.store(AUTHZ_ERROR, Ordering::SeqCst),
            Fault::AuthzTimeout => self.control.mode.store(AUTHZ_HANG, Ordering::SeqCst),
            Fault::AuthzPanic => self.control.mode.store(AUTHZ_PANIC, Ordering::SeqCst),
        }
    }

    fn clear(&self) {
        self.redis_proxies().chain(&self.pg).for_each(|p| p.set_mode(Mode::Pass));
        if let Some(split) = &self.split {
            split.set_listen(Cut::Pass);
            split.set_data(Cut::Pass);
        }
        self.control.mode.store(AUTHZ_OK, Ordering::SeqCst);
    }
}

// ---- traffic ----

/// xorshift64*: deterministic per seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[derive(Debug, Clone, Copy)]
struct Rec {
    p: u8,
    action: u8,
    /// 0 when the request task panicked (the panic escaped the layer).
    status: u16,
    /// For a 503: why (an index into `WHY`).
    why: u8,
    start: Instant,
    end: Instant,
}

/// The 503 reasons, as `CheckError`'s Display words them (in the rejection's reason).
const WHY: [(&str, &str); 5] = [
    ("", "other"),
    ("authorizer failed", "authorizer error"),
    ("authorizer timed out", "authorizer timeout"),
    ("authorizer panicked", "authorizer panic"),
    ("invalidated while computed", "unstable (invalidated while computed, 3x)"),
];

fn why_code(reason: &str) -> u8 {
    WHY.iter().skip(1).position(|(needle, _)| reason.contains(needle)).map_or(0, |i| i as u8 + 1)
}

/// "N kind, M kind" for the 503s among `recs`.
fn kinds_503<'a>(recs: impl Iterator<Item = &'a Rec>) -> String {
    let mut n = [0usize; WHY.len()];
    recs.filter(|r| r.status == 503).for_each(|r| n[r.why as usize] += 1);
    n.iter()
        .zip(WHY)
        .filter(|(k, _)| **k > 0)
        .map(|(k, (_, name))| format!("{k} {name}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One worker: requests through one instance's layer until `stop`, each in a task of its own so
/// that a panic escaping the layer is recorded (status 0) instead of ending the stream. With
/// `gone`, the worker is a client that goes away: each request is dropped after a random 1-40 ms
/// (less than every tier timeout) unless answered by then, and counted in `gone`, not recorded.
async fn worker(svc: Svc, seed: u64, stop: Instant, gone: Option<Arc<AtomicU64>>) -> Vec<Rec> {
    let mut rng = Rng(seed | 1);
    let mut recs = Vec::with_capacity(4096);
    while Instant::now() < stop {
        let p = rng.below(PRINCIPALS);
        let doc = rng.below(DOCS).min(rng.below(DOCS)) + 1;
        let action = match rng.below(100) {
            0..70 => 0,
            70..95 => 1,
            _ => 2,
        };
        let method = [Method::GET, Method::PUT, Method::DELETE][action].clone();
        let req = Request::builder()
            .method(method)
            .uri(format!("/documents/{doc}"))
            .header("x-user", principal_name(p))
            .body(())
            .unwrap();
        let start = Instant::now();
        let call = svc.clone().oneshot(req);
        let cut = Duration::from_millis(1 + rng.below(40) as u64);
        let answered = match gone {
            None => tokio::spawn(async move { Some(call.await) }).await,
            Some(_) => tokio::spawn(async move { tokio::time::timeout(cut, call).await.ok() }).await,
        };
        let status = match answered {
            Ok(Some(Ok((status, reason)))) => (status.as_u16(), reason.as_deref().map_or(0, why_code)),
            Ok(Some(Err(never))) => match never {},
            Ok(None) => {
                gone.iter().for_each(|g| _ = g.fetch_add(1, Ordering::Relaxed));
                tokio::time::sleep(PACE).await;
                continue;
            }
            Err(_) => (0, 0),
        };
        let (status, why) = status;
        recs.push(Rec { p: p as u8, action: action as u8, status, why, start, end: Instant::now() });
        tokio::time::sleep(PACE).await;
    }
    recs
}

/// Role changes on the churning principals, each followed by an invalidation through a random
/// instance's invalidation service; a failed one is retried through the next instances until
/// acknowledged. Returns (role changes, revoking ones, first calls that failed). Without
/// `invalidate` (the negative control), the change is recorded as if invalidated at once.
/// With [`Revoke::Sql`], each change is recorded in Postgres the way the permission tables'
/// triggers record it, and nothing else: only the durable change feed carries it.
async fn revoker(
    caches: Vec<AuthzCache>,
    truth: Arc<Truth>,
    seed: u64,
    stop: Instant,
    how: Revoke,
) -> (usize, usize, usize) {
    let invalidate = !matches!(how, Revoke::Never);
    let sql = match &how {
        Revoke::Sql(schema) => {
            Some((pg::client().await, format!("SELECT {schema}.authz_cache_record_changes(ARRAY[$1::text])")))
        }
        _ => None,
    };
    let mut rng = Rng(seed | 1);
    let (mut changes, mut revoking, mut failed) = (0, 0, 0);
    let mut retries = JoinSet::new();
    loop {
        tokio::time::sleep(REVOKE_EVERY).await;
        if Instant::now() >= stop {
            break;
        }
        let p = STABLE + rng.below(PRINCIPALS - STABLE);
        let old = truth.role(p);
        let new = (old + 1 + rng.below(ROLES.len() - 1)) % ROLES.len();
        changes += 1;
        if ROLES[old].1.iter().any(|a| !ROLES[new].1.contains(a)) {
            revoking += 1;
        }
        let i = truth.set_role(p, new);
        if !invalidate {
            truth.returned(p, i, Instant::now(), true);
            continue;
        }
        if let Some((db, record)) = &sql {
            // The change's commit is the revocation: the bound runs from its return.
            let name = principal_name(p);
            let ok = db.execute(record.as_str(), &[&name]).await.is_ok();
            truth.returned(p, i, Instant::now(), ok);
            if !ok {
                failed += 1;
            }
            continue;
        }
        let first = rng.below(caches.len());
        let invalidation = Invalidation::principal(principal_name(p));
        let mut svc = caches[first].invalidation_service();
        let ok = svc.ready().await.unwrap().call(invalidation.clone()).await.is_ok();
        truth.returned(p, i, Instant::now(), ok);
        if !ok {
            failed += 1;
            let (caches, truth) = (caches.clone(), truth.clone());
            retries.spawn(async move {
                let give_up = Instant::now() + FAULT + RECOVER + Duration::from_secs(5);
                for attempt in 1.. {
                    tokio::time::sleep(RETRY_EVERY).await;
                    let cache = &caches[(first + attempt) % caches.len()];
                    if cache.invalidate(&invalidation).await.is_ok() {
                        truth.returned(p, i, Instant::now(), true);
                        return;
                    }
                    if Instant::now() > give_up {
                        return;
                    }
                }
            });
        }
    }
    while retries.join_next().await.is_some() {}
    (changes, revoking, failed)
}

/// Every stable principal's keys, decided on every instance before the stream starts (so that
/// the authorizer cells know exactly what is validly cached: those keys, never invalidated).
async fn warm_stable_keys(caches: &[AuthzCache]) {
    let mut tasks = JoinSet::new();
    for cache in caches {
        for chunk in 0..8 {
            let cache = cache.clone();
            tasks.spawn(async move {
                for p in (0..STABLE).filter(|p| p % 8 == chunk) {
                    for doc in 1..=DOCS {
                        for action in ACTIONS {
                            let who = Principal::new(principal_name(p));
                            let what = Permission::new(format!("documents:{doc}"), action);
                            cache.check(&who, &what).await.expect("warm-up decides");
                        }
                    }
                }
            });
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
}

// ---- one cell ----

#[derive(Debug, Default)]
struct Report {
    cell: String,
    setup: &'static str,
    requests: usize,
    ok: usize,
    forbidden: usize,
    unavailable: usize,
    other: usize,
    p99_ms: f64,
    changes: usize,
    revoking: usize,
    inv_failed: usize,
    stale_first: usize,
    stale_ack: usize,
    max_lag_ms: f64,
    notes: String,
    /// Where the cell's wall time went (progress output only).
    phases: String,
    violations: Vec<String>,
}

/// How a matrix runs: clients staying or going away mid-request (DESIGN.md invariant 4b), and
/// revocations through the invalidation service or through the durable change feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// Clients wait for their answers; role changes go through the invalidation service.
    Plain,
    /// The first worker of each instance drops its requests after 1-40 ms (see `worker`).
    ClientsGoAway,
    /// Role changes are recorded in Postgres, as the permission tables' triggers do
    /// (`authz_cache_record_changes`, committed straight to the server, never through a proxy),
    /// and reach the instances only through the durable change feed.
    SqlChanges,
}

async fn run_cell(cell: &Cell, variant: Variant) -> Report {
    let truth = Truth::new();
    let began = Instant::now();
    let mut rig = Rig::new(cell, &truth).await;
    warm_stable_keys(&rig.caches).await;
    let setup = began.elapsed();
    let base: Vec<_> = rig.caches.iter().map(AuthzCache::stats).collect();

    let t0 = Instant::now();
    // With clients going away, the recovery window must hold two breaker periods: a probe
    // abandoned by its client, or failed on a pooled connection the outage killed, opens the
    // breaker for another `OPEN_FOR` (by design), and the faulted tier must then still get to
    // serve hits within the window (one period was too short now and then on a loaded machine).
    let recover = match variant {
        Variant::ClientsGoAway => RECOVER.max(OPEN_FOR * 4),
        _ => RECOVER,
    };
    let stop = t0 + WARM + FAULT + recover;
    let mut workers = JoinSet::new();
    let gone = Arc::new(AtomicU64::new(0));
    for (i, svc) in rig.services.iter().enumerate() {
        for w in 0..WORKERS_PER_INSTANCE {
            let gone = (variant == Variant::ClientsGoAway && w == 0).then(|| gone.clone());
            workers.spawn(worker(svc.clone(), 0x9e37_79b9 * (i * 16 + w + 1) as u64, stop, gone));
        }
    }
    let how = match (cell.fault, variant, &rig._schema) {
        (Fault::Control, _, _) => Revoke::Never,
        (_, Variant::SqlChanges, Some(schema)) => Revoke::Sql(schema.0.clone()),
        (_, Variant::SqlChanges, None) => panic!("{}: SQL changes need Postgres", cell.name),
        _ => Revoke::Service,
    };
    let revoker = tokio::spawn(revoker(rig.caches.clone(), truth.clone(), 0x5eed_f00d, stop, how));

    tokio::time::sleep_until((t0 + WARM).into()).await;
    let fault_start = Instant::now();
    rig.inject(cell.fault).await;
    tokio::time::sleep_until((fault_start + FAULT).into()).await;
    rig.clear();
    let fault_end = Instant::now();
    let at_clear: Vec<_> = rig.caches.iter().map(AuthzCache::stats).collect();

    let mut recs = Vec::new();
    while let Some(r) = workers.join_next().await {
        recs.extend(r.expect("a worker never panics"));
    }
    let (changes, revoking, inv_failed) = revoker.await.expect("the revoker never panics");
    let retries_done = Instant::now();
    let stats: Vec<_> = rig.caches.iter().map(AuthzCache::stats).collect();
    let panics = rig.control.panics.load(Ordering::SeqCst);
    let recovery = match variant {
        Variant::Plain => Vec::new(),
        Variant::ClientsGoAway => recovery_after_disconnects(&rig.caches, cell, &at_clear, &stats).await,
        Variant::SqlChanges => Vec::new(),
    };
    drop(rig);
    let phases = format!(
        "setup {:.1} s, retries {:.1} s after the stream, teardown {:.1} s",
        setup.as_secs_f64(),
        retries_done.saturating_duration_since(stop).as_secs_f64(),
        retries_done.elapsed().as_secs_f64()
    );

    // Stale allows, against both clocks.
    let history = truth.history.lock().unwrap().clone();
    let unacked = history.iter().flatten().filter(|c| c.ack.is_none()).count();
    let (mut stale_first, mut stale_ack, mut max_lag) = (0, 0, Duration::ZERO);
    let mut first_examples = Vec::new();
    for r in recs.iter().filter(|r| r.status == 200) {
        let (h, action) = (&history[r.p as usize], ACTIONS[r.action as usize]);
        match judge(h, action, r.end, |c| c.first_return) {
            Ok(lag) => max_lag = max_lag.max(lag.unwrap_or_default()),
            Err(()) => {
                stale_first += 1;
                if first_examples.len() < 3 {
                    first_examples.push(describe_stale(h, r, t0));
                }
            }
        }
        if judge(h, action, r.end, |c| c.ack).is_err() {
            stale_ack += 1;
        }
    }

    // Counts over the fault and recovery windows.
    let window: Vec<&Rec> = recs.iter().filter(|r| r.start >= fault_start).collect();
    let mut latencies: Vec<Duration> = window.iter().map(|r| r.end - r.start).collect();
    let count = |s: u16| window.iter().filter(|r| r.status == s).count();
    let (_, p99_us) = support::percentiles(&mut latencies);
    let mut report = Report {
        cell: cell.name.to_owned(),
        setup: cell.topo.label(),
        requests: window.len(),
        ok: count(200),
        forbidden: count(403),
        unavailable: count(503),
        other: window.iter().filter(|r| !matches!(r.status, 200 | 403 | 503)).count(),
        p99_ms: p99_us / 1000.0,
        changes,
        revoking,
        inv_failed,
        stale_first,
        stale_ack,
        max_lag_ms: max_lag.as_secs_f64() * 1000.0,
        phases,
        ..Report::default()
    };

    // What the fault did inside the instances (deltas over the stream).
    let sum = |f: &dyn Fn(&tower_authz_cache::StatsSnapshot) -> u64| -> u64 {
        stats.iter().zip(&base).map(|(s, b)| f(s).saturating_sub(f(b))).sum()
    };
    let l2_opens = sum(&|s| s.tiers.l2.map_or(0, |t| t.breaker_opens));
    let l3_opens = sum(&|s| s.tiers.l3.map_or(0, |t| t.breaker_opens));
    let distrusts: Vec<u64> = stats
        .iter()
        .zip(&base)
        .map(|(s, b)| s.backplane.map_or(0, |x| x.distrusts) - b.backplane.map_or(0, |x| x.distrusts))
        .collect();
    let resubscribed = sum(&|s| s.backplane.map_or(0, |b| b.subscriptions));
    let authz_errors = sum(&|s| s.authorizer_errors);
    let mut notes = Vec::new();
    if l2_opens > 0 {
        notes.push(format!("L2 breaker opened {l2_opens}x"));
    }
    if l3_opens > 0 {
        notes.push(format!("L3 breaker opened {l3_opens}x"));
    }
    if distrusts.iter().any(|d| *d > 0) {
        notes.push(format!("L1 distrusted A {}x, B {}x", distrusts[0], distrusts[1]));
    }
    if resubscribed > 0 {
        notes.push(format!("{resubscribed} re-subscriptions"));
    }
    if authz_errors > 0 {
        notes.push(format!("{authz_errors} authorizer failures"));
    }
    if panics > 0 {
        notes.push(format!("{panics} panics caught"));
    }
    let grace_answers = sum(&|s| s.grace_answers);
    if grace_answers > 0 {
        notes.push(format!("{grace_answers} grace answers"));
    }
    if recs.iter().any(|r| r.status == 503) {
        notes.push(format!("503s: {}", kinds_503(recs.iter())));
    }
    report.notes = notes.join("; ");

    // ---- expectations ----
    let v = &mut report.violations;
    if cell.fault == Fault::Control {
        if stale_first == 0 || stale_ack == 0 {
            v.push("the stale-allow detector never fired without invalidations".to_owned());
        }
    } else if stale_ack > 0 {
        v.push(format!("{stale_ack} stale allows after acknowledged invalidations"));
    }
    if stale_first > 0 && cell.fault != Fault::Control {
        v.push(format!(
            "{stale_first} stale allows counted from the first invalidation call (e.g. {})",
            first_examples.join(" | ")
        ));
    }
    if unacked > 0 {
        // Such a change would excuse every later allow: the verdict would be vacuous.
        v.push(format!("{unacked} role changes whose invalidation was never acknowledged"));
    }
    let bad: Vec<_> = recs.iter().filter(|r| !matches!(r.status, 200 | 403 | 503)).collect();
    if !bad.is_empty() {
        let escaped = bad.iter().filter(|r| r.status == 0).count();
        v.push(format!("{} responses neither 200, 403 nor 503 ({escaped} panics escaped the layer)", bad.len()));
    }
    let early_503 = recs.iter().filter(|r| r.status == 503 && r.end < fault_start).count();
    if early_503 > 0 {
        v.push(format!("{early_503} 503s before the fault"));
    }
    if cell.fault.is_authorizer() {
        // Only what nothing valid covers may fail: the stable keys were decided before the fault
        // and never invalidated, so they are served throughout.
        let stable_503 = recs.iter().filter(|r| r.status == 503 && (r.p as usize) < STABLE).count();
        // With grace, the stable keys' entries expire during the outage and only L1 can answer
        // them; grace refuses an L1 that is not trusted (by design), and a new subscription
        // makes every older L1 entry stale (it may have missed invalidations), so a backplane
        // silence or a re-subscription on a loaded machine excuses those 503s (noted, not
        // hidden).
        let distrusted = distrusts.iter().any(|d| *d > 0) || resubscribed > 0;
        if stable_503 > 0 && cell.grace && distrusted {
            report.notes.push_str(&format!(
                "; {stable_503} 503s on stable keys while L1 was distrusted or re-subscribed (grace needs a trusted, current L1)"
            ));
        } else if stable_503 > 0 {
            v.push(format!("{stable_503} 503s on validly cached keys"));
        }
        // Once the authorizer is back (and a flight started before that has timed out), every
        // request is decided again: the service is up.
        let back = fault_end + AUTHZ_TIMEOUT + Duration::from_millis(100);
        let after = recs.iter().filter(|r| r.start >= back).count();
        let after_503 = recs.iter().filter(|r| r.start >= back && r.status == 503).count();
        if after_503 > 0 || after < 100 {
            v.push(format!("after recovery: {after_503} 503s out of {after} requests"));
        }
        if report.unavailable == 0 {
            v.push("the fault was never observed (no 503 at all)".to_owned());
        }
        // With grace: the stable keys' entries expired during the outage (ttl < fault) and were
        // answered within grace (no 503 on them, checked above); invalidated ones never were
        // (the stale-allow verdict); the others got 503 (nothing within grace).
        let grace = sum(&|s| s.grace_answers);
        if cell.grace && grace == 0 {
            v.push("grace on, but no expired entry was answered within grace".to_owned());
        }
        if !cell.grace && grace > 0 {
            v.push(format!("{grace} grace answers without grace"));
        }
    } else {
        // The authorizer was up: every request must be decided.
        let unexpected: Vec<&Rec> = recs.iter().filter(|r| r.status == 503).collect();
        if !unexpected.is_empty() {
            let when: Vec<String> = unexpected
                .iter()
                .take(3)
                .map(|r| {
                    let rel = |t: Instant, at: Instant| {
                        if t >= at { (t - at).as_secs_f64() * 1e3 } else { -((at - t).as_secs_f64() * 1e3) }
                    };
                    format!(
                        "{} {} at {:+.0} ms from the fault's end",
                        principal_name(r.p as usize),
                        ACTIONS[r.action as usize],
                        rel(r.end, fault_end)
                    )
                })
                .collect();
            v.push(format!(
                "{} 503s although the authorizer was up ({}; {})",
                unexpected.len(),
                kinds_503(unexpected.iter().copied()),
                when.join(", ")
            ));
        }
    }
    // The fault really happened (a matrix of faults that never bit proves nothing).
    let bit = match cell.fault {
        Fault::None | Fault::Control | Fault::AuthzError | Fault::AuthzTimeout | Fault::AuthzPanic => true,
        Fault::ClockSkew => true,
        Fault::RedisDown | Fault::RedisSlow | Fault::RedisBlackHole => l2_opens > 0 && distrusts.iter().all(|d| *d > 0),
        Fault::RedisRestartEmpty => resubscribed >= INSTANCES as u64,
        Fault::RedisPubSubCut | Fault::PgListenCut => distrusts[0] > 0,
        Fault::RedisDataCut => l2_opens > 0,
        Fault::PgDown | Fault::PgSlow => l3_opens > 0,
        Fault::PgRestart => resubscribed >= INSTANCES as u64,
        Fault::PgDataCut => l3_opens > 0,
    };
    if !bit {
        v.push(format!("the fault left no trace in the stats ({})", report.notes));
    }
    if cell.fault == Fault::AuthzPanic && panics == 0 {
        v.push("no panic was injected".to_owned());
    }
    if variant == Variant::ClientsGoAway {
        let gone = gone.load(Ordering::Relaxed);
        report.notes = format!("{gone} requests abandoned by their clients; {}", report.notes);
        if gone == 0 {
            report.violations.push("no client went away".to_owned());
        }
        report.violations.extend(recovery);
    }
    report
}

fn describe_stale(h: &[Change], r: &Rec, t0: Instant) -> String {
    let at = |t: Instant| format!("{:+.0}ms", (t.saturating_duration_since(t0).as_secs_f64() * 1000.0));
    let changes: Vec<String> = h
        .iter()
        .skip(1)
        .map(|c| {
            format!(
                "{}@{} inv {} ack {}",
                ROLES[c.role].0,
                at(c.set_at),
                c.first_return.map_or("-".into(), at),
                c.ack.map_or("-".into(), at)
            )
        })
        .collect();
    format!(
        "{} {} allowed at {} (took {:.1}ms); history: {}",
        principal_name(r.p as usize),
        ACTIONS[r.action as usize],
        at(r.end),
        (r.end - r.start).as_secs_f64() * 1000.0,
        changes.join(", ")
    )
}

// ---- the table ----

fn table(reports: &[Report], total: Duration) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Fault matrix: 2 instances x {WORKERS_PER_INSTANCE} workers through `CachedAuthorizationLayer`, {PRINCIPALS} \
         principals ({STABLE} with fixed roles, {} churning), {DOCS} documents, read/write/delete 70/25/5; a role change \
         every {} ms with an invalidation through a random instance. max_staleness {} ms; timeouts: redis {} ms, postgres \
         {} ms, authorizer {} ms; breaker after {FAILURE_THRESHOLD} failures, open {} ms. Each cell: {} ms of traffic, \
         then the fault for {} ms, then {} ms of recovery; counts and p99 cover the fault and recovery windows, stale \
         allows the whole cell. Total {:.1} s.\n",
        PRINCIPALS - STABLE,
        REVOKE_EVERY.as_millis(),
        MAX_STALENESS.as_millis(),
        REDIS_TIMEOUT.as_millis(),
        PG_TIMEOUT.as_millis(),
        AUTHZ_TIMEOUT.as_millis(),
        OPEN_FOR.as_millis(),
        WARM.as_millis(),
        FAULT.as_millis(),
        RECOVER.as_millis(),
        total.as_secs_f64(),
    );
    let _ = writeln!(
        out,
        "| cell | tiers | requests | 200 | 403 | 503 | other | decided | p99 ms | role changes (revoking / inv. failed 1st try) \
         | stale allows (from 1st call / from ack) | max allow lag ms | what the instances saw | result |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---|---|");
    for r in reports {
        let decided = if r.requests == 0 { 0.0 } else { 100.0 * (r.ok + r.forbidden) as f64 / r.requests as f64 };
        let result = match r.violations.is_empty() {
            true if r.cell.starts_with("control") => {
                format!("pass: the detector fired ({} stale allows, as it must)", r.stale_first)
            }
            true => "pass".to_owned(),
            false => format!("**FAIL**: {}", r.violations.join("; ")),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {decided:.2}% | {:.1} | {} ({} / {}) | {} / {} | {:.0} | {} | {} |",
            r.cell,
            r.setup,
            r.requests,
            r.ok,
            r.forbidden,
            r.unavailable,
            r.other,
            r.p99_ms,
            r.changes,
            r.revoking,
            r.inv_failed,
            r.stale_first,
            r.stale_ack,
            r.max_lag_ms,
            r.notes,
            result.replace('|', "/"),
        );
    }
    let _ = writeln!(
        out,
        "\n*decided* = 200 + 403. *max allow lag* = the latest allow served under a role after the invalidation that \
         ended it returned (bound: {} ms). Expected: no stale allow anywhere; 503 only in the authorizer cells, only on \
         keys nothing valid covers (the {STABLE} fixed-role principals' keys, decided before the fault, always served), \
         and none once the authorizer is back.",
        MAX_STALENESS.as_millis()
    );
    out
}

fn write_table(text: &str, variant: Variant) {
    let dir =
        std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target").into());
    let name = match variant {
        Variant::Plain => "fault-matrix.md",
        Variant::ClientsGoAway => "fault-matrix-disconnects.md",
        Variant::SqlChanges => "fault-matrix-sql.md",
    };
    let path = std::path::Path::new(&dir).join(name);
    std::fs::create_dir_all(&dir).expect("target dir");
    std::fs::write(&path, text).expect("write the fault matrix");
    println!("(written to {})", path.display());
}

async fn run_matrix(cells: &[Cell], variant: Variant) {
    quiet_injected_panics();
    let started = Instant::now();
    let mut reports = Vec::new();
    for cell in cells {
        let t = Instant::now();
        let report = run_cell(cell, variant).await;
        println!(
            "cell {:<50} {:>5} req, 503 {:>4}, p99 {:>6.1} ms, stale {}/{}, {:.1} s ({}){}",
            format!("{} [{}]", cell.name, cell.topo.label()),
            report.requests,
            report.unavailable,
            report.p99_ms,
            report.stale_first,
            report.stale_ack,
            t.elapsed().as_secs_f64(),
            report.phases,
            if report.violations.is_empty() { String::new() } else { format!(": {}", report.violations.join("; ")) }
        );
        reports.push(report);
    }
    let mut text = table(&reports, started.elapsed());
    if variant == Variant::SqlChanges {
        text = format!(
            "Changes made in SQL: in every cell below, each role change is recorded in Postgres the way the \
             permission tables' triggers record it (`authz_cache_record_changes`, committed straight to the server), \
             and no instance is told: only the durable change feed (the table, polled and drained; NOTIFY as a hint) \
             carries it. Stale allows are counted from the commit.\n\n{text}"
        );
    }
    if variant == Variant::ClientsGoAway {
        text = format!(
            "Clients going away: in every cell below, one worker in {WORKERS_PER_INSTANCE} per instance drops each \
             request after a random 1-40 ms (shorter than every tier timeout) unless it was answered, the other \
             workers wait for their answers. Recovery lasts four breaker periods here (2000 ms), not 1000 ms. \
             Besides the usual expectations, every breaker closes again after the fault and the faulted tier \
             serves hits again on every instance.\n\n{text}"
        );
    }
    println!("\n{text}");
    write_table(&text, variant);
    let failed: Vec<String> = reports
        .iter()
        .filter(|r| !r.violations.is_empty())
        .map(|r| format!("{} [{}]: {}", r.cell, r.setup, r.violations.join("; ")))
        .collect();
    assert!(failed.is_empty(), "fault matrix cells failed:\n{}", failed.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix() {
    // FAULT_MATRIX_ONLY=<text> runs only the cells whose "name [tiers]" contains it (debugging).
    let only = std::env::var("FAULT_MATRIX_ONLY").unwrap_or_default();
    let cells: Vec<Cell> =
        CELLS.iter().filter(|c| format!("{} [{}]", c.name, c.topo.label()).contains(&only)).copied().collect();
    assert!(!cells.is_empty(), "FAULT_MATRIX_ONLY={only} matches no cell");
    run_matrix(&cells, Variant::Plain).await;
}

/// The outages of the matrix that make requests wait on a remote tier, with clients going away
/// mid-request (DESIGN.md invariant 4b: an abandoned breaker probe used to leave its tier refused
/// until the process restarted).
const DISCONNECT_CELLS: &[Cell] = &[
    Cell {
        name: "redis black hole, clients going away",
        topo: Topo::Redis,
        fault: Fault::RedisBlackHole,
        grace: false,
    },
    Cell { name: "redis slow, clients going away", topo: Topo::Redis, fault: Fault::RedisSlow, grace: false },
    Cell { name: "postgres down, clients going away", topo: Topo::Pg, fault: Fault::PgDown, grace: false },
    Cell { name: "postgres slow, clients going away", topo: Topo::Pg, fault: Fault::PgSlow, grace: false },
];

/// Postgres outages and partitions while role changes are made in the permission tables (the
/// changes are recorded durably by the changing transaction; the NOTIFY only hints): the change
/// feed must bring every one of them to both instances within the bound, whichever connection is
/// cut, with L1 and with Redis in front.
const SQL_CELLS: &[Cell] = &[
    Cell { name: "baseline, changes in SQL", topo: Topo::Pg, fault: Fault::None, grace: false },
    Cell { name: "A's LISTEN cut, changes in SQL", topo: Topo::Pg, fault: Fault::PgListenCut, grace: false },
    Cell { name: "postgres restart, changes in SQL", topo: Topo::Pg, fault: Fault::PgRestart, grace: false },
    Cell { name: "postgres down, changes in SQL", topo: Topo::Pg, fault: Fault::PgDown, grace: false },
    Cell { name: "baseline, changes in SQL", topo: Topo::Full, fault: Fault::None, grace: false },
    Cell { name: "postgres down, changes in SQL", topo: Topo::Full, fault: Fault::PgDown, grace: false },
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_with_changes_made_in_sql() {
    run_matrix(SQL_CELLS, Variant::SqlChanges).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_with_clients_going_away() {
    run_matrix(DISCONNECT_CELLS, Variant::ClientsGoAway).await;
}

/// After a cell with clients going away: the faulted tier served hits again on every instance
/// after the fault was cleared, and every breaker closes (heartbeats call through the breakers,
/// so probes happen without traffic) within `OPEN_FOR` and a margin. Returns the violations.
async fn recovery_after_disconnects(
    caches: &[AuthzCache],
    cell: &Cell,
    at_clear: &[tower_authz_cache::StatsSnapshot],
    at_stop: &[tower_authz_cache::StatsSnapshot],
) -> Vec<String> {
    let mut violations = Vec::new();
    let hits = |s: &tower_authz_cache::StatsSnapshot| match cell.fault {
        Fault::PgDown | Fault::PgSlow | Fault::PgRestart | Fault::PgListenCut | Fault::PgDataCut => {
            s.tiers.l3.map_or(0, |t| t.hits)
        }
        _ => s.tiers.l2.map_or(0, |t| t.hits),
    };
    for (i, (clear, stop)) in at_clear.iter().zip(at_stop).enumerate() {
        if hits(stop) <= hits(clear) {
            violations.push(format!("instance {i}: no hit on the faulted tier after the fault"));
        }
    }
    let breakers = || -> Vec<tower_authz_cache::BreakerState> {
        caches
            .iter()
            .flat_map(|c| c.stats().tiers.l2.into_iter().chain(c.stats().tiers.l3))
            .map(|t| t.breaker)
            .collect()
    };
    let deadline = Instant::now() + OPEN_FOR + Duration::from_secs(2);
    while breakers().iter().any(|b| *b != tower_authz_cache::BreakerState::Closed) {
        if Instant::now() > deadline {
            violations.push(format!(
                "breakers not closed {:?} after the stream stopped: {:?}",
                OPEN_FOR + Duration::from_secs(2),
                breakers()
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    violations
}

/// Regression (found by the matrix): every failed invalidation of a principal during a Postgres
/// outage used to owe Postgres one more bump of the same scope; once Postgres was back the
/// janitor paid them back to back, the principal's epoch changed every round trip, and checks
/// whose authorizer call spanned three changes failed as `Unstable` (503) although the authorizer
/// answered every time. Owed bumps are now one per scope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owed_bumps_paid_in_a_burst_do_not_fail_checks() {
    let _ = pg::client().await;
    let schema = Schema::new("fm_owed");
    pg_tier(&schema, &pg::url()).migrate_with_reference_rbac().await.expect("migrations apply");
    let proxy = FaultProxy::start(pg::addr()).await;
    let cache = AuthzCache::builder(|_: Principal, _: Permission| async {
        tokio::time::sleep(Duration::from_millis(3)).await;
        Ok::<_, BoxError>(Decision::allow())
    })
    .authorizer_timeout(AUTHZ_TIMEOUT)
    .max_staleness(MAX_STALENESS)
    .secret(SECRET)
    .l3(pg_tier(&schema, &pg::url_via(proxy.addr())))
    .build();
    support::redis::wait_trusted(&cache).await;
    let bob = Principal::new("bob");
    cache.check(&bob, &Permission::new("documents:0", "read")).await.unwrap();

    // An outage during which the app retries bob's invalidation (as InvalidationError asks) 40 times.
    proxy.set_mode(Mode::Down);
    for _ in 0..40 {
        assert!(cache.invalidate(&Invalidation::principal("bob")).await.is_err());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    proxy.set_mode(Mode::Pass);

    // Checks of bob (each a miss: a new document every time) while the debt is paid.
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for t in 0..4u32 {
        let cache = cache.clone();
        tasks.spawn(async move {
            let (mut n, mut unstable) = (0u32, 0u32);
            while start.elapsed() < Duration::from_secs(2) {
                n += 1;
                let what = Permission::new(format!("documents:{t}-{n}"), "read");
                match cache.check(&Principal::new("bob"), &what).await {
                    Ok(d) => assert!(d.is_allowed()),
                    Err(e) if e.kind() == tower_authz_cache::CheckErrorKind::Unstable => unstable += 1,
                    Err(e) => panic!("unexpected {e:?}"),
                }
            }
            (n, unstable)
        });
    }
    let (mut checks, mut unstable) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        let (n, u) = r.unwrap();
        checks += n;
        unstable += u;
    }
    println!("{checks} checks of bob after the outage, {unstable} failed as Unstable (503)");
    assert_eq!(unstable, 0, "{unstable} of {checks} checks failed (503) although the authorizer answered each time");
}

/// The judge of stale allows, on a synthetic history: it must see what the matrix relies on it
/// to see (a matrix whose detector cannot fire proves nothing).
#[test]
fn the_stale_allow_judge_counts_from_the_revocation() {
    let t = Instant::now();
    let at = |ms: u64| t + Duration::from_millis(ms);
    let change = |role, set: u64, first: u64, ack: u64| Change {
        role,
        set_at: at(set),
        first_return: Some(at(first)),
        ack: Some(at(ack)),
    };
    let h = vec![
        Change { role: 2, set_at: t, first_return: Some(t), ack: Some(t) }, // editor
        change(1, 100, 110, 200),                                           // viewer: write revoked
        change(3, 1000, 1010, 1010),                                        // admin: everything granted
    ];
    let first = |c: &Change| c.first_return;
    let ack = |c: &Change| c.ack;
    let staleness = MAX_STALENESS.as_millis() as u64;
    assert!(judge(&h, "write", at(50), first).is_ok(), "before the revocation");
    assert!(judge(&h, "write", at(110 + staleness), first).is_ok(), "within the bound");
    assert!(judge(&h, "write", at(110 + staleness + 1), first).is_err(), "past the bound from the first call");
    assert!(judge(&h, "write", at(110 + staleness + 1), ack).is_ok(), "within the bound from the ack");
    assert!(judge(&h, "write", at(200 + staleness + 1), ack).is_err(), "past the bound from the ack");
    assert_eq!(judge(&h, "write", at(1001), first), Ok(None), "granted again");
    assert!(judge(&h, "delete", at(500), first).is_err(), "never granted then: not stale but phantom, still caught");
    assert!(judge(&h, "read", at(600), first).is_ok(), "read was never revoked");
}
