//! Unit tests of the cache core (L1, single flight, epochs, ttls), without shared tiers.

use super::miss::{MAX_ATTEMPTS, MIN_ATTEMPTS};
use super::*;
use crate::BoxError;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use tokio::sync::{Notify, Semaphore};

fn bob() -> Principal {
    Principal::new("bob")
}

fn read(doc: u32) -> Permission {
    Permission::new(format!("documents:{doc}"), "read")
}

/// An authorizer whose answer the test controls, counting its calls.
#[derive(Clone, Default)]
struct Switch {
    allow: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
}

impl Switch {
    fn cache(&self, clock: Clock) -> AuthzCache {
        let s = self.clone();
        AuthzCache::builder(move |_: Principal, _: Permission| {
            let s = s.clone();
            async move {
                s.calls.fetch_add(1, Ordering::SeqCst);
                Ok::<_, BoxError>(Decision::from_bool(s.allow.load(Ordering::SeqCst)))
            }
        })
        .allow_ttl(Duration::from_secs(60))
        .deny_ttl(Duration::from_secs(5))
        .clock(clock)
        .build()
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

/// L1 (and its per-thread front) keeps time on the monotonic clock: a wall clock stepped back
/// an hour does not keep an entry alive past its ttl, nor one stepped ahead end it early.
#[test]
fn l1_deadlines_ignore_wall_clock_steps() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let clock = Clock::manual();
        let sw = Switch::default();
        sw.allow.store(true, Ordering::SeqCst);
        let cache = sw.cache(clock.clone());
        cache.check(&bob(), &read(1)).await.unwrap();
        clock.step_wall(3_600_000);
        cache.check(&bob(), &read(1)).await.unwrap();
        assert_eq!(sw.calls(), 1, "a wall clock an hour ahead ends nothing early");
        clock.step_wall(-7_200_000);
        clock.advance(Duration::from_secs(60));
        cache.check(&bob(), &read(1)).await.unwrap();
        assert_eq!(sw.calls(), 2, "a wall clock an hour behind keeps nothing past its ttl");
    });
}

#[tokio::test]
async fn allow_and_deny_expire_on_their_own_ttls() {
    let clock = Clock::manual();
    let sw = Switch::default();
    sw.allow.store(true, Ordering::SeqCst);
    let cache = sw.cache(clock.clone());
    assert!(cache.check(&bob(), &read(1)).await.unwrap().is_allowed());
    clock.advance(Duration::from_millis(59_999));
    assert!(cache.check(&bob(), &read(1)).await.unwrap().is_allowed());
    assert_eq!(sw.calls(), 1, "still valid one ms before the deadline");
    clock.advance(Duration::from_millis(1));
    sw.allow.store(false, Ordering::SeqCst);
    assert!(!cache.check(&bob(), &read(1)).await.unwrap().is_allowed(), "expired allow is a miss");
    assert_eq!(sw.calls(), 2);
    assert_eq!(cache.stats().tiers.l1.expired, 1);
    // The deny lives 5 s.
    clock.advance(Duration::from_millis(4_999));
    assert!(!cache.check(&bob(), &read(1)).await.unwrap().is_allowed());
    assert_eq!(sw.calls(), 2);
    clock.advance(Duration::from_millis(1));
    sw.allow.store(true, Ordering::SeqCst);
    assert!(cache.check(&bob(), &read(1)).await.unwrap().is_allowed());
    assert_eq!(sw.calls(), 3);
}

#[tokio::test]
async fn the_authorizer_hint_only_shortens() {
    let clock = Clock::manual();
    let calls = Arc::new(AtomicUsize::new(0));
    let hint = Arc::new(Mutex::new(Duration::from_secs(2)));
    let (c, h) = (calls.clone(), hint.clone());
    let cache = AuthzCache::builder(move |_: Principal, _: Permission| {
        c.fetch_add(1, Ordering::SeqCst);
        let ttl = *h.lock().unwrap();
        async move { Ok::<_, BoxError>(Decision::allow().with_ttl(ttl)) }
    })
    .allow_ttl(Duration::from_secs(10))
    .clock(clock.clone())
    .build();
    cache.check(&bob(), &read(1)).await.unwrap();
    clock.advance(Duration::from_millis(2_000));
    cache.check(&bob(), &read(1)).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2, "hint of 2 s wins over ttl of 10 s");

    *hint.lock().unwrap() = Duration::from_secs(3600);
    cache.check(&bob(), &read(2)).await.unwrap();
    clock.advance(Duration::from_millis(10_000));
    cache.check(&bob(), &read(2)).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 4, "a long hint never extends the ttl of 10 s");

    *hint.lock().unwrap() = Duration::ZERO;
    cache.check(&bob(), &read(3)).await.unwrap();
    cache.check(&bob(), &read(3)).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 6, "a zero hint is not cached");
}

#[tokio::test]
async fn invalidation_at_every_scope_makes_the_next_check_miss() {
    let sw = Switch::default();
    sw.allow.store(true, Ordering::SeqCst);
    let cache = sw.cache(Clock::manual());
    let alice = Principal::new("alice");
    for inv in [
        Invalidation::principal("bob"),
        Invalidation::resource("documents:1"),
        Invalidation::entry("bob", read(1)),
        Invalidation::All,
    ] {
        cache.check(&bob(), &read(1)).await.unwrap();
        cache.check(&alice, &read(2)).await.unwrap();
        let before = sw.calls();
        cache.check(&bob(), &read(1)).await.unwrap();
        assert_eq!(sw.calls(), before, "cached before {inv:?}");
        cache.invalidate(&inv).await.unwrap();
        cache.check(&bob(), &read(1)).await.unwrap();
        assert_eq!(sw.calls(), before + 1, "{inv:?} covers bob/documents:1");
        cache.check(&alice, &read(2)).await.unwrap();
        let alice_recomputed = sw.calls() - before - 1;
        assert_eq!(alice_recomputed, usize::from(inv == Invalidation::All), "{inv:?} and alice/documents:2");
    }
}

/// An authorizer that invalidates bob while answering, for its first `burst` calls.
fn churning(burst: usize, pause: Duration, timeout: Duration) -> (AuthzCache, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let handle: Arc<std::sync::OnceLock<AuthzCache>> = Arc::default();
    let (c, h) = (calls.clone(), handle.clone());
    let cache = AuthzCache::builder(move |_: Principal, _: Permission| {
        let (c, h) = (c.clone(), h.clone());
        async move {
            tokio::time::sleep(pause).await;
            if c.fetch_add(1, Ordering::SeqCst) < burst {
                let cache = h.get().expect("set").clone();
                cache.invalidate(&Invalidation::principal("bob")).await.unwrap();
            }
            Ok::<_, BoxError>(Decision::allow())
        }
    })
    .authorizer_timeout(timeout)
    .build();
    let _ = handle.set(cache.clone());
    (cache, calls)
}

#[tokio::test]
async fn a_burst_of_invalidations_longer_than_three_attempts_is_ridden_out() {
    let (cache, calls) = churning(5, Duration::ZERO, Duration::from_secs(5));
    assert!(cache.check(&bob(), &read(1)).await.expect("decided after the burst").is_allowed());
    assert_eq!(calls.load(Ordering::SeqCst), 6);
    assert_eq!(cache.stats().invalidation_races, 5);
}

#[tokio::test]
async fn invalidations_landing_for_longer_than_the_authorizer_timeout_fail_as_unstable() {
    // Slow churn: at least three attempts, then stops once the timeout (30 ms) has passed.
    let (cache, calls) = churning(usize::MAX, Duration::from_millis(10), Duration::from_millis(30));
    let err = cache.check(&bob(), &read(1)).await.expect_err("never stable");
    assert_eq!(err.kind(), CheckErrorKind::Unstable);
    let n = calls.load(Ordering::SeqCst);
    assert!((MIN_ATTEMPTS..MAX_ATTEMPTS).contains(&n), "{n} attempts");
    // Fast churn: the attempt cap ends it well inside the timeout.
    let (cache, calls) = churning(usize::MAX, Duration::ZERO, Duration::from_secs(5));
    assert_eq!(cache.check(&bob(), &read(1)).await.unwrap_err().kind(), CheckErrorKind::Unstable);
    assert_eq!(calls.load(Ordering::SeqCst), MAX_ATTEMPTS);
}

/// An authorizer that answers `allow` from the state it read *before* blocking, the way a
/// real authorizer answers from a snapshot: it blocks until the test releases it.
#[tokio::test]
async fn a_decision_computed_across_an_invalidation_is_never_served_after_it() {
    let allowed = Arc::new(AtomicBool::new(true));
    let calls = Arc::new(AtomicUsize::new(0));
    let entered = Arc::new(Notify::new());
    let release = Arc::new(Semaphore::new(0));
    let (a, c, e, r) = (allowed.clone(), calls.clone(), entered.clone(), release.clone());
    let cache = AuthzCache::builder(move |_: Principal, _: Permission| {
        let (a, c, e, r) = (a.clone(), c.clone(), e.clone(), r.clone());
        async move {
            let snapshot = a.load(Ordering::SeqCst);
            let n = c.fetch_add(1, Ordering::SeqCst);
            if n == 0 {
                e.notify_one();
                r.acquire().await.unwrap().forget();
            }
            Ok::<_, BoxError>(Decision::from_bool(snapshot))
        }
    })
    .build();

    let c2 = cache.clone();
    let first = tokio::spawn(async move { c2.check(&bob(), &read(1)).await });
    entered.notified().await;
    // The first call has read "allowed" and is blocked. Revoke, invalidate, then release it.
    let c3 = cache.clone();
    let follower = tokio::spawn(async move { c3.check(&bob(), &read(1)).await });
    tokio::task::yield_now().await;
    allowed.store(false, Ordering::SeqCst);
    cache.invalidate(&Invalidation::principal("bob")).await.unwrap();
    release.add_permits(1);

    assert!(!first.await.unwrap().unwrap().is_allowed(), "the stale allow was recomputed");
    assert!(!follower.await.unwrap().unwrap().is_allowed());
    assert!(!cache.check(&bob(), &read(1)).await.unwrap().is_allowed());
    assert_eq!(calls.load(Ordering::SeqCst), 2, "one stale answer thrown away, one fresh");
    assert_eq!(cache.stats().invalidation_races, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_thousand_concurrent_misses_make_one_call() {
    let calls = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let (c, g) = (calls.clone(), gate.clone());
    let cache = AuthzCache::builder(move |_: Principal, _: Permission| {
        let (c, g) = (c.clone(), g.clone());
        async move {
            c.fetch_add(1, Ordering::SeqCst);
            g.acquire().await.unwrap().forget();
            Ok::<_, BoxError>(Decision::allow())
        }
    })
    .build();
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.check(&bob(), &read(1)).await })
        })
        .collect();
    // Let every task reach the flight before the answer comes: the leader holds it (the
    // gate is closed), so every other task joins as a follower.
    while cache.stats().single_flight_joins < 999 {
        tokio::task::yield_now().await;
    }
    gate.add_permits(1);
    for t in tasks {
        assert!(t.await.unwrap().unwrap().is_allowed());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(cache.stats().single_flight_joins, 999);
    assert_eq!(cache.inner.flights.len(), 0);
}

#[tokio::test]
async fn dropping_the_leading_request_strands_nobody() {
    let gate = Arc::new(Semaphore::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let (g, c) = (gate.clone(), calls.clone());
    let cache = AuthzCache::builder(move |_: Principal, _: Permission| {
        let (g, c) = (g.clone(), c.clone());
        async move {
            c.fetch_add(1, Ordering::SeqCst);
            g.acquire().await.unwrap().forget();
            Ok::<_, BoxError>(Decision::allow())
        }
    })
    .build();
    let leader = tokio::spawn({
        let cache = cache.clone();
        async move { cache.check(&bob(), &read(1)).await }
    });
    while calls.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    let follower = tokio::spawn({
        let cache = cache.clone();
        async move { cache.check(&bob(), &read(1)).await }
    });
    while cache.stats().single_flight_joins == 0 {
        tokio::task::yield_now().await;
    }
    leader.abort();
    assert!(leader.await.unwrap_err().is_cancelled());
    // The follower takes over the flight and asks again.
    gate.add_permits(1);
    assert!(follower.await.unwrap().unwrap().is_allowed());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(cache.inner.flights.len(), 0);
}

#[tokio::test]
async fn errors_timeouts_and_panics_reach_every_waiter_and_are_not_cached() {
    let mode = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let (m, g) = (mode.clone(), gate.clone());
    let cache = AuthzCache::builder(move |_: Principal, _: Permission| {
        let (m, g) = (m.clone(), g.clone());
        async move {
            g.acquire().await.unwrap().forget();
            match m.load(Ordering::SeqCst) {
                0 => Err::<Decision, BoxError>("backend down".into()),
                1 => std::future::pending().await,
                2 => panic!("authorizer bug"),
                _ => Ok(Decision::allow()),
            }
        }
    })
    .authorizer_timeout(Duration::from_millis(50))
    .build();
    for (m, kind) in [(0, CheckErrorKind::Authorizer), (1, CheckErrorKind::Timeout), (2, CheckErrorKind::Panicked)] {
        mode.store(m, Ordering::SeqCst);
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.check(&bob(), &read(1)).await })
            })
            .collect();
        while cache.inner.flights.len() == 0 || cache.stats().single_flight_joins < 2 * (m as u64 + 1) {
            tokio::task::yield_now().await;
        }
        gate.add_permits(1);
        for w in waiters {
            assert_eq!(w.await.unwrap().unwrap_err().kind(), kind);
        }
    }
    mode.store(3, Ordering::SeqCst);
    gate.add_permits(1);
    assert!(cache.check(&bob(), &read(1)).await.unwrap().is_allowed(), "no error was cached");
    let stats = cache.stats();
    assert_eq!((stats.authorizer_calls, stats.authorizer_errors, stats.undecided), (4, 3, 9));
}

#[tokio::test]
async fn l1_stays_within_its_byte_bound() {
    let cache = AuthzCache::builder(|_: Principal, _: Permission| async { Ok::<_, BoxError>(Decision::allow()) })
        .l1_max_bytes(1 << 20)
        .build();
    for i in 0..20_000u32 {
        cache.check(&Principal::new(format!("user-{i}")), &read(i)).await.unwrap();
    }
    cache.sync_l1();
    let l1 = cache.stats().tiers.l1;
    assert!(l1.bytes <= 1 << 20, "{l1:?}");
    assert!(l1.entries < 20_000 && l1.entries > 1000, "{l1:?}");
}

#[tokio::test]
async fn a_zero_byte_l1_caches_nothing() {
    let sw = Switch::default();
    sw.allow.store(true, Ordering::SeqCst);
    let s = sw.clone();
    let cache = AuthzCache::builder(move |_: Principal, _: Permission| {
        s.calls.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, BoxError>(Decision::allow()) }
    })
    .l1_max_bytes(0)
    .build();
    for _ in 0..3 {
        cache.check(&bob(), &read(1)).await.unwrap();
    }
    assert_eq!(sw.calls(), 3);
    assert_eq!(cache.stats().tiers.l1.entries, 0);
}

/// Another thread's front holds a copy of the entry: it must be as dead as the original
/// after every kind of invalidation and after expiry.
#[test]
fn copies_in_another_threads_front_die_with_the_entry() {
    let clock = Clock::manual();
    let sw = Switch::default();
    sw.allow.store(true, Ordering::SeqCst);
    let cache = sw.cache(clock.clone());
    let rt = || tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (to_worker, worker_rx) = std::sync::mpsc::channel::<()>();
    let (to_main, main_rx) = std::sync::mpsc::channel::<usize>();
    let worker_cache = cache.clone();
    let worker_sw = sw.clone();
    let worker = std::thread::spawn(move || {
        let rt = rt();
        // Each round: check twice (the second is a front hit), report calls, wait.
        while worker_rx.recv().is_ok() {
            rt.block_on(async {
                worker_cache.check(&bob(), &read(1)).await.unwrap();
                worker_cache.check(&bob(), &read(1)).await.unwrap();
            });
            to_main.send(worker_sw.calls()).unwrap();
        }
    });
    let main_rt = rt();
    let round = |change: &dyn Fn()| {
        to_worker.send(()).unwrap();
        let before = main_rx.recv().unwrap();
        change();
        to_worker.send(()).unwrap();
        let after = main_rx.recv().unwrap();
        after - before
    };
    assert_eq!(round(&|| {}), 0, "nothing changed: front hits, no call");
    for inv in [
        Invalidation::principal("bob"),
        Invalidation::resource("documents:1"),
        Invalidation::entry("bob", read(1)),
        Invalidation::All,
    ] {
        assert_eq!(
            round(&|| {
                main_rt.block_on(cache.invalidate(&inv)).unwrap();
            }),
            1,
            "{inv:?}"
        );
    }
    assert_eq!(round(&|| clock.advance(Duration::from_secs(60))), 1, "expiry");
    drop(to_worker);
    worker.join().unwrap();
}
