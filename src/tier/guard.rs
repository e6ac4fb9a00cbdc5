//! The guard every remote tier sits behind: a per-call timeout, then a circuit breaker.
//!
//! Closed: calls go through; `failure_threshold` consecutive failures (errors or timeouts) open
//! it. Open: calls are refused at once (an atomic load, no I/O) for `open_for`. Then half-open:
//! one probe goes through; success closes the breaker, failure opens it again.
//!
//! Cancellation-safe (a dropped future leaves nothing half-taken): the right to call is a [`Permit`] that settles
//! itself when the call's future is dropped before it finished (a client gone, a caller's
//! timeout). An abandoned probe counts as a failed probe (the breaker opens for another period
//! and the probe slot is free again); an abandoned normal call counts for nothing, because a
//! caller going away says nothing about the tier.

use std::fmt;
use std::future::Future;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Circuit breaker settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BreakerConfig {
    pub(crate) timeout: Duration,
    pub(crate) failure_threshold: u32,
    pub(crate) open_for: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self { timeout: Duration::from_millis(50), failure_threshold: 5, open_for: Duration::from_secs(30) }
    }
}

/// Where a breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls are refused until the open period ends.
    Open,
    /// One probe call is allowed through.
    HalfOpen,
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        })
    }
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// Why a guarded call did not produce a value.
#[derive(Debug)]
pub(crate) enum GuardError<E> {
    /// The breaker is open: nothing was sent.
    Open,
    /// The call took longer than the timeout.
    Timeout,
    /// The call failed.
    Failed(E),
}

impl<E: fmt::Display> fmt::Display for GuardError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuardError::Open => f.write_str("circuit open"),
            GuardError::Timeout => f.write_str("timed out"),
            GuardError::Failed(e) => write!(f, "{e}"),
        }
    }
}

pub(crate) struct Guard {
    name: &'static str,
    config: BreakerConfig,
    state: AtomicU8,
    failures: AtomicU32,
    opened_at_ms: AtomicU64,
    probing: AtomicBool,
    opens: AtomicU64,
    errors: AtomicU64,
    timeouts: AtomicU64,
    rejected: AtomicU64,
}

/// Milliseconds on a monotonic clock private to this process.
fn mono_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// The right to make one call, taken before the call's first await. Settled by
/// [`success`](Guard::success) or [`failure`](Guard::failure); a permit dropped unsettled (the
/// call's future went away) is settled by [`Drop`] as an abandoned call.
struct Permit<'a> {
    guard: &'a Guard,
    probe: bool,
    settled: bool,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.guard.abandoned(self.probe);
        }
    }
}

impl Guard {
    pub(crate) fn new(name: &'static str, config: BreakerConfig) -> Self {
        Self {
            name,
            config,
            state: AtomicU8::new(CLOSED),
            failures: AtomicU32::new(0),
            opened_at_ms: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            opens: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        }
    }

    pub(crate) fn state(&self) -> BreakerState {
        match self.state.load(Ordering::Acquire) {
            CLOSED => BreakerState::Closed,
            OPEN => BreakerState::Open,
            _ => BreakerState::HalfOpen,
        }
    }

    /// (opens, errors, timeouts, rejected while open)
    pub(crate) fn counters(&self) -> (u64, u64, u64, u64) {
        (
            self.opens.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
            self.timeouts.load(Ordering::Relaxed),
            self.rejected.load(Ordering::Relaxed),
        )
    }

    fn permit(&self) -> Option<Permit<'_>> {
        match self.state.load(Ordering::Acquire) {
            CLOSED => Some(Permit { guard: self, probe: false, settled: false }),
            OPEN => {
                let open_for = self.config.open_for.as_millis() as u64;
                if mono_ms().saturating_sub(self.opened_at_ms.load(Ordering::Acquire)) < open_for {
                    return None;
                }
                if self.state.compare_exchange(OPEN, HALF_OPEN, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                    tracing::info!(target: "authz_cache::audit", tier = self.name, state = "half_open", "circuit breaker");
                }
                self.take_probe()
            }
            _ => self.take_probe(),
        }
    }

    fn take_probe(&self) -> Option<Permit<'_>> {
        // Built only once the slot is ours: a probe permit dropped unsettled re-opens the breaker.
        let taken = self.probing.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_ok();
        taken.then(|| Permit { guard: self, probe: true, settled: false })
    }

    fn success(&self, mut permit: Permit<'_>) {
        permit.settled = true;
        self.failures.store(0, Ordering::Release);
        if permit.probe {
            self.state.store(CLOSED, Ordering::Release);
            self.probing.store(false, Ordering::Release);
            tracing::info!(target: "authz_cache::audit", tier = self.name, state = "closed", "circuit breaker");
        }
    }

    /// The probe failed, or went away: open again for another period (not a new opening), and
    /// free the probe slot for the next one.
    fn reopen(&self) {
        self.opened_at_ms.store(mono_ms(), Ordering::Release);
        self.state.store(OPEN, Ordering::Release);
        self.probing.store(false, Ordering::Release);
    }

    /// A call whose future was dropped before it finished. A probe counts as failed (without
    /// adding to the consecutive failures); a normal call counts for nothing, and holds nothing.
    fn abandoned(&self, probe: bool) {
        if probe {
            self.reopen();
            tracing::debug!(target: "authz_cache::audit", tier = self.name, "circuit breaker probe abandoned: counted as failed");
        }
    }

    fn failure(&self, mut permit: Permit<'_>) {
        permit.settled = true;
        let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if permit.probe {
            self.reopen();
            tracing::debug!(target: "authz_cache::audit", tier = self.name, "circuit breaker probe failed");
        } else if failures >= self.config.failure_threshold
            && self.state.compare_exchange(CLOSED, OPEN, Ordering::AcqRel, Ordering::Acquire).is_ok()
        {
            self.opened_at_ms.store(mono_ms(), Ordering::Release);
            self.opens.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                target: "authz_cache::audit",
                tier = self.name,
                state = "open",
                failures,
                open_for_ms = self.config.open_for.as_millis() as u64,
                "circuit breaker"
            );
        }
    }

    /// Runs `call` under the timeout and the breaker. Dropping the returned future before it
    /// resolves settles its permit as abandoned (see the module docs).
    pub(crate) async fn call<T, E>(&self, call: impl Future<Output = Result<T, E>>) -> Result<T, GuardError<E>> {
        let Some(permit) = self.permit() else {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(GuardError::Open);
        };
        match tokio::time::timeout(self.config.timeout, call).await {
            Ok(Ok(v)) => {
                self.success(permit);
                Ok(v)
            }
            Ok(Err(e)) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                self.failure(permit);
                Err(GuardError::Failed(e))
            }
            Err(_) => {
                self.timeouts.fetch_add(1, Ordering::Relaxed);
                self.failure(permit);
                Err(GuardError::Timeout)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(open_for: Duration) -> Guard {
        Guard::new("test", BreakerConfig { timeout: Duration::from_millis(20), failure_threshold: 5, open_for })
    }

    #[tokio::test]
    async fn opens_after_five_consecutive_failures_and_costs_nothing_while_open() {
        let g = guard(Duration::from_secs(3600));
        for i in 0..4 {
            assert!(matches!(g.call(async { Err::<(), _>("boom") }).await, Err(GuardError::Failed(_))), "{i}");
            assert_eq!(g.state(), BreakerState::Closed);
        }
        // A success in between resets the count.
        g.call(async { Ok::<_, ()>(()) }).await.unwrap();
        for _ in 0..4 {
            let _ = g.call(async { Err::<(), _>("boom") }).await;
        }
        assert_eq!(g.state(), BreakerState::Closed);
        // The fifth consecutive failure is a timeout.
        assert!(matches!(g.call(std::future::pending::<Result<(), ()>>()).await, Err(GuardError::Timeout)));
        assert_eq!(g.state(), BreakerState::Open);
        let polled = AtomicBool::new(false);
        let r = g
            .call(async {
                polled.store(true, Ordering::SeqCst);
                Ok::<_, ()>(())
            })
            .await;
        assert!(matches!(r, Err(GuardError::Open)));
        assert!(!polled.load(Ordering::SeqCst), "an open breaker never runs the call");
        assert_eq!(g.counters(), (1, 8, 1, 1));
    }

    #[tokio::test]
    async fn half_open_lets_one_probe_through() {
        let g = guard(Duration::from_millis(30));
        for _ in 0..5 {
            let _ = g.call(async { Err::<(), _>("boom") }).await;
        }
        assert_eq!(g.state(), BreakerState::Open);
        tokio::time::sleep(Duration::from_millis(40)).await;
        // A failing probe opens it again.
        let _ = g.call(async { Err::<(), _>("still down") }).await;
        assert_eq!(g.state(), BreakerState::Open);
        tokio::time::sleep(Duration::from_millis(40)).await;
        // While one probe is in flight, others are refused.
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let probe = g.call(async move { rx.await.map_err(|_| "dropped") });
        tokio::pin!(probe);
        assert!(futures_poll(&mut probe).is_none());
        assert_eq!(g.state(), BreakerState::HalfOpen);
        assert!(matches!(g.call(async { Ok::<_, &str>(()) }).await, Err(GuardError::Open)));
        tx.send(()).unwrap();
        probe.await.unwrap();
        assert_eq!(g.state(), BreakerState::Closed);
    }

    /// Cancellation safety: a probe whose future is dropped (a client gone, a caller's timeout) counts
    /// as a failed probe. It used to keep the probe slot forever: every later call was refused.
    #[tokio::test]
    async fn a_dropped_probe_counts_as_failed_and_the_next_probe_closes_the_breaker() {
        let open_for = Duration::from_millis(30);
        let g = guard(open_for);
        for _ in 0..5 {
            let _ = g.call(async { Err::<(), _>("boom") }).await;
        }
        assert_eq!(g.state(), BreakerState::Open);
        tokio::time::sleep(open_for + Duration::from_millis(10)).await;
        let mut probe = Box::pin(g.call(std::future::pending::<Result<(), ()>>()));
        assert!(futures_poll(&mut probe).is_none());
        assert_eq!(g.state(), BreakerState::HalfOpen, "the dropped call was the probe");
        drop(probe);
        assert_eq!(g.state(), BreakerState::Open, "an abandoned probe opens the breaker again");
        assert!(matches!(g.call(async { Ok::<_, ()>(()) }).await, Err(GuardError::Open)), "for another period");
        tokio::time::sleep(open_for + Duration::from_millis(10)).await;
        g.call(async { Ok::<_, ()>(()) }).await.expect("a new probe goes through");
        assert_eq!(g.state(), BreakerState::Closed);
        assert_eq!(g.counters().0, 1, "re-opening after a probe is not a new opening");
    }

    /// A caller going away says nothing about the tier: dropped normal calls never open the
    /// breaker, and leave the count of consecutive failures where it was.
    #[tokio::test]
    async fn dropped_normal_calls_do_not_count_as_failures() {
        let g = guard(Duration::from_secs(3600));
        for _ in 0..4 {
            let _ = g.call(async { Err::<(), _>("boom") }).await;
        }
        for _ in 0..10 {
            let mut call = Box::pin(g.call(std::future::pending::<Result<(), ()>>()));
            assert!(futures_poll(&mut call).is_none());
        }
        assert_eq!(g.state(), BreakerState::Closed);
        assert_eq!(g.counters(), (0, 4, 0, 0));
        let _ = g.call(async { Err::<(), _>("boom") }).await;
        assert_eq!(g.state(), BreakerState::Open, "the fifth real failure opens it");
    }

    fn futures_poll<F: Future + Unpin>(f: &mut F) -> Option<F::Output> {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        match std::pin::Pin::new(f).poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }
}
