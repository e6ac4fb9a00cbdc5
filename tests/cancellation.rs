//! Cancellation sweeps (DESIGN.md invariant 4b): a request future is dropped whenever a client
//! disconnects or a caller wraps `check()` in a timeout. Each sweep drives one operation of
//! instance A (through fault proxies of the test's own) by hand, polling it exactly k times (each
//! poll after the future asked to be woken), then drops it, for k = 1, 2, ... until the operation
//! completes within k polls: every await point of the remote path is a drop point once. After
//! each drop the proxies are restored and the test asserts that every tier of A recovers: its
//! breakers close within `open_for` plus a margin, L2/L3 reads hit again (a tier that is owed an
//! invalidation is not read, so a hit also shows that nothing is left owed), and an invalidation
//! through A is published and seen by instance B (direct, no proxy).
//!
//! Operations: `check()` of a fresh key (so it goes past L1 to L2 or L3), `check()` as the
//! half-open probe of an open breaker, `invalidate()` (Redis alone, Postgres alone, both: every
//! stage of the shared bump and its mirror), and warming (`warm_from_l3`, `warm`).
#![cfg(all(feature = "redis", feature = "postgres"))]

mod support;

use std::collections::HashSet;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use support::pg::{self, Schema};
use support::proxy::{FaultProxy, Mode};
use support::redis::{Namespace, SECRET};
use tower_authz_cache::{
    AuthzCache, BoxError, BreakerState, Decision, Invalidation, Permission, PostgresTier, Principal, RedisTier,
    StatsSnapshot,
};

/// Per-call timeout of both remote tiers.
const TIMEOUT: Duration = Duration::from_millis(300);
const OPEN_FOR: Duration = Duration::from_millis(300);
/// Every chunk through a proxy, either way, while an operation is swept: each remote await is
/// Pending for a while, and everything still completes well within `TIMEOUT`.
const SLOW: Mode = Mode::Slow(Duration::from_millis(3));
/// Recovery deadlines are `OPEN_FOR` plus this (generous: two cores shared with other builds).
const MARGIN: Duration = Duration::from_secs(3);
/// No operation here takes that many polls; a sweep that gets there fails.
const MAX_POLLS: usize = 60;
/// Heartbeats go through the guarded data path and could take a half-open probe: one every
/// `MAX_STALENESS / 5`, so rarely.
const MAX_STALENESS: Duration = Duration::from_secs(60);

// ---- polling by hand ----

struct Flag(tokio::sync::Notify);

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.notify_one();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.notify_one();
    }
}

/// Polls `fut` at most `k` times, each poll after `fut` asked to be woken (or after 2 s, so a
/// future that never wakes does not hang the test); calls `pending(i)` after the i-th poll
/// returned `Pending`. Returns the output if it completed; otherwise drops it (that is the point).
async fn poll_k<F: Future>(fut: F, k: usize, mut pending: impl FnMut(usize)) -> Option<F::Output> {
    let flag = Arc::new(Flag(tokio::sync::Notify::new()));
    let waker = Waker::from(flag.clone());
    let mut cx = Context::from_waker(&waker);
    let mut fut = pin!(fut);
    for i in 1..=k {
        if i > 1 {
            let _ = tokio::time::timeout(Duration::from_secs(2), flag.0.notified()).await;
        }
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return Some(v);
        }
        pending(i);
    }
    None
}

/// Runs `step(k)` for k = 1, 2, ... until it reports that the operation completed within k polls;
/// returns that k.
async fn sweep(what: &str, mut step: impl AsyncFnMut(usize) -> bool) -> usize {
    let started = Instant::now();
    for k in 1..=MAX_POLLS {
        if step(k).await {
            println!(
                "{what}: completes in {k} polls, dropped after 1..{} ({:.1} s)",
                k - 1,
                started.elapsed().as_secs_f64()
            );
            assert!(k > 1, "{what}: completed at the first poll: nothing was swept");
            return k;
        }
    }
    panic!("{what}: not complete after {MAX_POLLS} polls");
}

// ---- the two instances ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Topo {
    L2,
    L3,
    Full,
}

/// The source of truth: revoked principals; every instance counts its own calls.
#[derive(Clone, Default)]
struct Policy {
    revoked: Arc<Mutex<HashSet<String>>>,
    calls: Arc<AtomicUsize>,
}

impl Policy {
    fn instance(&self) -> Self {
        Self { revoked: self.revoked.clone(), calls: Arc::default() }
    }
    fn authorizer(&self) -> impl tower_authz_cache::Authorizer {
        let p = self.clone();
        move |principal: Principal, _: Permission| {
            p.calls.fetch_add(1, Ordering::SeqCst);
            let revoked = p.revoked.lock().unwrap().contains(principal.id());
            async move { Ok::<_, BoxError>(Decision::from_bool(!revoked)) }
        }
    }
}

/// A fresh key: principal and resource never seen before (no epoch of an earlier step covers it).
fn fresh() -> (Principal, Permission) {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    (Principal::new(format!("p{n}")), Permission::new(format!("documents:{n}"), "read"))
}

/// Field order is drop order: caches, then proxies, then namespace and schema.
struct Rig {
    topo: Topo,
    a: AuthzCache,
    b: AuthzCache,
    policy: Policy,
    redis: Option<FaultProxy>,
    pg: Option<FaultProxy>,
    _ns: Namespace,
    _schema: Option<Schema>,
}

fn redis_tier(ns: &Namespace, url: &str) -> RedisTier {
    RedisTier::builder(url)
        .namespace(&ns.0)
        .pool_size(4)
        .connect_timeout(TIMEOUT)
        .timeout(TIMEOUT)
        .failure_threshold(1)
        .open_for(OPEN_FOR)
        // The backplane direct: only the data path goes through the proxy.
        .backplane_url(support::redis::url())
        .build()
        .expect("valid redis tier")
}

fn pg_tier(schema: &Schema, url: &str) -> PostgresTier {
    PostgresTier::builder(url)
        .schema(&schema.0)
        .pool_size(4)
        .connect_timeout(TIMEOUT * 2)
        .timeout(TIMEOUT)
        .failure_threshold(1)
        .open_for(OPEN_FOR)
        .warm_on_start(0)
        .build()
        .expect("valid postgres tier")
}

impl Rig {
    async fn new(topo: Topo, test: &str) -> Rig {
        support::redis::addr(); // fails with instructions when Redis is down
        let ns = Namespace::new(&format!("cancel-{test}"));
        let uses_redis = topo != Topo::L3;
        let uses_pg = topo != Topo::L2;
        let schema = if uses_pg {
            let _ = pg::client().await; // fails with instructions when Postgres is down
            let schema = Schema::new(&format!("cancel_{test}"));
            pg_tier(&schema, &pg::url()).migrate_with_reference_rbac().await.expect("migrations apply");
            Some(schema)
        } else {
            None
        };
        let redis = match uses_redis {
            true => Some(FaultProxy::start(support::redis::addr()).await),
            false => None,
        };
        let pg = match uses_pg {
            true => Some(FaultProxy::start(pg::addr()).await),
            false => None,
        };
        let policy = Policy::default();
        let build = |proxied: bool| {
            let mut builder = AuthzCache::builder(policy.instance().authorizer()).max_staleness(MAX_STALENESS);
            if let Some(proxy) = &redis {
                let url = if proxied { proxy.url("redis") } else { support::redis::url() };
                builder = builder.secret(SECRET).l2(redis_tier(&ns, &url));
            }
            if let (Some(proxy), Some(schema)) = (&pg, &schema) {
                let url = if proxied { pg::url_via(proxy.addr()) } else { pg::url() };
                builder = builder.secret(SECRET).l3(pg_tier(schema, &url));
            }
            builder.build()
        };
        let (a, b) = (build(true), build(false));
        let rig = Rig { topo, a, b, policy, redis, pg, _ns: ns, _schema: schema };
        // Heard on the backplane: B's invalidations reach A (heartbeats are rare here).
        let deadline = Instant::now() + Duration::from_secs(5);
        while !rig.a.stats().backplane.is_some_and(|b| b.l1_trusted) {
            assert!(Instant::now() < deadline, "A never heard the backplane");
            let _ = rig.b.invalidate(&Invalidation::principal("nobody")).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        rig
    }

    fn set(&self, mode: Mode) {
        self.redis.iter().chain(&self.pg).for_each(|p| p.set_mode(mode));
    }

    /// A's breakers, L2 then L3 (those configured).
    fn breakers(&self) -> Vec<BreakerState> {
        let s = self.a.stats();
        s.tiers.l2.iter().chain(&s.tiers.l3).map(|t| t.breaker).collect()
    }

    /// The tier a check of A reads first, by its hit and B's write counters.
    fn first_tier(&self, s: &StatsSnapshot) -> (u64, u64) {
        let t = if self.topo == Topo::L3 { s.tiers.l3 } else { s.tiers.l2 };
        t.map_or((0, 0), |t| (t.hits, t.writes))
    }

    /// B decides a fresh key (written behind to the shared tiers), then A checks it: whether A
    /// read it from its first shared tier.
    async fn shared_hit(&self) -> bool {
        let (principal, permission) = fresh();
        let (_, written) = self.first_tier(&self.b.stats());
        self.b.check(&principal, &permission).await.expect("B decides");
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.first_tier(&self.b.stats()).1 == written {
            assert!(Instant::now() < deadline, "B's write-behind never landed");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let (hits, _) = self.first_tier(&self.a.stats());
        let _ = self.a.check(&principal, &permission).await;
        self.first_tier(&self.a.stats()).0 > hits
    }

    /// Every tier of A recovers within `OPEN_FOR + MARGIN`: breakers closed, shared reads hit, an
    /// invalidation through A acknowledged; then it is seen by B.
    async fn recovered(&self, what: &str) {
        let started = Instant::now();
        loop {
            let published = self.a.invalidate(&Invalidation::principal("nobody")).await.is_ok();
            let hit = self.shared_hit().await;
            let breakers = self.breakers();
            if published && hit && breakers.iter().all(|b| *b == BreakerState::Closed) {
                break;
            }
            assert!(
                started.elapsed() < OPEN_FOR + MARGIN,
                "{what}: A did not recover within {:?}: breakers {breakers:?}, last invalidation acknowledged: \
                 {published}, last shared read hit: {hit}\n{:?}",
                OPEN_FOR + MARGIN,
                self.a.stats().tiers,
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seen = || self.b.stats().backplane.map_or(0, |b| b.invalidations);
        let before = seen();
        self.a.invalidate(&Invalidation::principal("somebody")).await.expect("published once recovered");
        let deadline = Instant::now() + Duration::from_secs(2);
        while seen() == before {
            assert!(Instant::now() < deadline, "{what}: B never saw A's invalidation");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Opens A's breakers: one check times out on each tier (the threshold is one failure).
    async fn open_breakers(&self) {
        self.set(Mode::BlackHole);
        let (principal, permission) = fresh();
        let _ = self.a.check(&principal, &permission).await;
        assert!(self.breakers().iter().all(|b| *b == BreakerState::Open), "{:?}", self.breakers());
    }
}

// ---- check() past L1 ----

async fn check_sweep(topo: Topo, test: &str) {
    let rig = Rig::new(topo, test).await;
    sweep(&format!("{topo:?} check"), async |k| {
        rig.set(SLOW);
        let (principal, permission) = fresh();
        let done = poll_k(rig.a.check(&principal, &permission), k, |_| {}).await;
        rig.set(Mode::Pass);
        if let Some(decision) = &done {
            assert!(decision.as_ref().expect("decided").is_allowed());
        }
        rig.recovered(&format!("{topo:?} check dropped after {k} polls")).await;
        done.is_some()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l2_check_dropped_at_every_await() {
    check_sweep(Topo::L2, "l2_check").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l3_check_dropped_at_every_await() {
    check_sweep(Topo::L3, "l3_check").await;
}

// ---- check() as the half-open probe ----

/// The breaker is open, `open_for` has passed and the tier is back: the next check is the probe.
/// Dropped after k polls, it must count as a failed probe (it used to keep the probe slot: every
/// later call refused until the process restarted).
async fn probe_sweep(topo: Topo, test: &str) {
    let rig = Rig::new(topo, test).await;
    sweep(&format!("{topo:?} half-open probe"), async |k| {
        for _attempt in 0..3 {
            rig.open_breakers().await;
            tokio::time::sleep(OPEN_FOR + Duration::from_millis(30)).await;
            rig.set(SLOW);
            let (principal, permission) = fresh();
            // The check is the probe if, pending after its first poll, the breaker is half-open
            // (refused, it would have gone straight to the authorizer and completed).
            let mut probe = false;
            let done = poll_k(rig.a.check(&principal, &permission), k, |i| {
                if i == 1 {
                    probe = rig.breakers()[0] == BreakerState::HalfOpen;
                }
            })
            .await;
            rig.set(Mode::Pass);
            if !probe {
                // A background call (a heartbeat, a hit-counter flush) took the probe: again.
                rig.recovered("a probe taken by a background call").await;
                continue;
            }
            rig.recovered(&format!("{topo:?} half-open probe dropped after {k} polls")).await;
            return done.is_some();
        }
        panic!("{topo:?}: the check never was the probe in 3 attempts");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l2_half_open_probe_dropped_at_every_await() {
    probe_sweep(Topo::L2, "l2_probe").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l3_half_open_probe_dropped_at_every_await() {
    probe_sweep(Topo::L3, "l3_probe").await;
}

// ---- invalidate() ----

/// A revocation whose invalidation is dropped after k polls, with the proxies slow (every await
/// of the shared bump and of its mirror is a drop point) or black-holed (the bump never reaches
/// the store; later polls come from the tier timeouts: the fallbacks are drop points too).
/// Completed or not, A never serves the revoked entry afterwards; with L3 (whose ledger of owed
/// bumps survives the drop) B stops serving it too, without any further call.
async fn invalidate_sweep(topo: Topo, test: &str) {
    let rig = Rig::new(topo, test).await;
    for mode in [SLOW, Mode::BlackHole] {
        sweep(&format!("{topo:?} invalidate, proxies {mode:?}"), async |k| {
            let what = format!("{topo:?} invalidate dropped after {k} polls, proxies {mode:?}");
            let (principal, permission) = fresh();
            assert!(rig.a.check(&principal, &permission).await.unwrap().is_allowed());
            assert!(rig.b.check(&principal, &permission).await.unwrap().is_allowed());
            let l1_hits = rig.a.stats().tiers.l1.hits;
            assert!(rig.a.check(&principal, &permission).await.unwrap().is_allowed());
            assert_eq!(rig.a.stats().tiers.l1.hits, l1_hits + 1, "{what}: A serves the key from L1");

            rig.policy.revoked.lock().unwrap().insert(principal.id().to_owned());
            rig.set(mode);
            let done = poll_k(rig.a.invalidate(&Invalidation::principal(principal.id())), k, |_| {}).await;
            assert!(
                !rig.a.check(&principal, &permission).await.expect("decided").is_allowed(),
                "{what}: A served the revoked entry"
            );
            rig.set(Mode::Pass);
            if topo != Topo::L2 {
                let deadline = Instant::now() + OPEN_FOR + MARGIN;
                while rig.b.check(&principal, &permission).await.expect("decided").is_allowed() {
                    assert!(Instant::now() < deadline, "{what}: B never saw the invalidation");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            rig.recovered(&what).await;
            done.is_some()
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l2_invalidate_dropped_at_every_await() {
    invalidate_sweep(Topo::L2, "l2_inv").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l3_invalidate_dropped_at_every_await() {
    invalidate_sweep(Topo::L3, "l3_inv").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l2_l3_invalidate_dropped_at_every_await() {
    invalidate_sweep(Topo::Full, "full_inv").await;
}

// ---- warming ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warming_dropped_at_every_await() {
    let rig = Rig::new(Topo::L3, "warm").await;
    // Rows for warm_from_l3 to read (each read like an L3 hit), written by B. Every recovery
    // writes more: a fixed number is warmed, so that the sweep ends.
    const ROWS: usize = 5;
    for _ in 0..ROWS {
        assert!(rig.shared_hit().await, "A reads B's rows");
    }
    sweep("L3 warm_from_l3", async |k| {
        // Whatever A promoted last time is stale again (once A heard it): rows are read again.
        rig.b.invalidate(&Invalidation::All).await.expect("published");
        rig.set(SLOW);
        let done = poll_k(rig.a.warm_from_l3(ROWS), k, |_| {}).await;
        rig.set(Mode::Pass);
        rig.recovered(&format!("warm_from_l3 dropped after {k} polls")).await;
        done.is_some()
    })
    .await;

    let rig = Rig::new(Topo::L2, "warm_keys").await;
    sweep("L2 warm (explicit keys)", async |k| {
        rig.set(SLOW);
        let done = poll_k(rig.a.warm((0..12).map(|_| fresh())), k, |_| {}).await;
        rig.set(Mode::Pass);
        rig.recovered(&format!("warm dropped after {k} polls")).await;
        done.is_some()
    })
    .await;
}
