//! One guard around any shared tier: every call under the tier's timeout and circuit breaker
//! (`guard.rs`), with its latency and failures counted. The only place a remote timeout is
//! handled; background calls (the change feed, maintenance) get a longer timeout and no breaker.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::stats::{RemoteCounters, RemoteTierSnapshot, Stats};
use crate::tier::guard::{BreakerConfig, Guard, GuardError};
use crate::tier::shared::{EpochTarget, KeyId, ScopeHashes, SharedTier, TierError, TierFuture, TierRead, TierSettings};

pub(crate) type CallError = GuardError<TierError>;

/// A shared tier with its guard, counters and settings.
pub(crate) struct Guarded {
    /// `l2`, `l3`, ...: the name in stats, metrics and logs.
    pub(crate) level: &'static str,
    pub(crate) tier: Arc<dyn SharedTier>,
    pub(crate) guard: Guard,
    pub(crate) counters: Arc<RemoteCounters>,
    pub(crate) settings: TierSettings,
    /// The change feed's and maintenance's call timeout: ten times the tier's, at least 1 s.
    pub(crate) background_timeout: Duration,
    /// The highest epoch high water this tier reported (reads, bumps, subscriptions): with the
    /// tier as the authority, a lower one means it lost its epochs.
    high_water_seen: AtomicU64,
}

impl Guarded {
    pub(crate) fn new(level: &'static str, tier: Arc<dyn SharedTier>, counters: Arc<RemoteCounters>) -> Self {
        let settings = tier.settings();
        let breaker = BreakerConfig {
            timeout: settings.timeout,
            failure_threshold: settings.failure_threshold.max(1),
            open_for: settings.open_for,
        };
        Self {
            level,
            tier,
            guard: Guard::new(level, breaker),
            counters,
            settings,
            background_timeout: (settings.timeout * 10).max(Duration::from_secs(1)),
            high_water_seen: AtomicU64::new(0),
        }
    }

    /// Runs one call under the timeout and the breaker.
    pub(crate) async fn call<T>(&self, call: TierFuture<'_, T>) -> Result<T, CallError> {
        self.guard.call(call).await
    }

    /// Runs one background call under the background timeout only.
    pub(crate) async fn background<T>(&self, call: TierFuture<'_, T>) -> Result<T, CallError> {
        match tokio::time::timeout(self.background_timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(GuardError::Failed(e)),
            Err(_) => Err(GuardError::Timeout),
        }
    }

    /// Bumps an epoch (guarded); the value it assigned raises the tier's known high water.
    pub(crate) async fn bump(&self, target: EpochTarget, floor: u64, retention: Duration) -> Result<u64, CallError> {
        let value = self.call(self.tier.bump(target, floor, retention)).await?;
        let value = value.min(crate::cache::epoch::EPOCH_MAX);
        self.saw_high_water(value);
        Ok(value)
    }

    /// Raises an epoch to a value a deeper tier assigned (guarded).
    pub(crate) async fn raise(&self, target: EpochTarget, value: u64, retention: Duration) -> Result<(), CallError> {
        self.call(self.tier.raise(target, value, retention)).await
    }

    /// One read, guarded: its latency recorded (unless the breaker answered), a failure counted
    /// and logged, and `None`.
    pub(crate) async fn read(&self, key_id: &KeyId, hashes: &ScopeHashes, max_age: Duration) -> Option<TierRead> {
        let started = Instant::now();
        let read = self.call(self.tier.read(key_id, hashes, max_age)).await;
        self.observe_read(started, read)
    }

    /// A batch of reads in one guarded call (see [`SharedTier::read_many`]): `None` when it
    /// failed, or answered the wrong number of reads.
    pub(crate) async fn read_many(&self, reads: &[(KeyId, ScopeHashes)], max_age: Duration) -> Option<Vec<TierRead>> {
        let started = Instant::now();
        let read = self.call(self.tier.read_many(reads, max_age)).await.and_then(|answer| {
            if answer.len() == reads.len() {
                Ok(answer)
            } else {
                Err(GuardError::Failed(TierError::new(format!(
                    "read_many answered {} reads for {}",
                    answer.len(),
                    reads.len()
                ))))
            }
        });
        self.observe_read(started, read)
    }

    /// A read's latency (unless the breaker answered) and failure, counted and logged.
    fn observe_read<T>(&self, started: Instant, read: Result<T, CallError>) -> Option<T> {
        if !matches!(read, Err(GuardError::Open)) {
            let elapsed = started.elapsed();
            self.counters.read_latency.record(elapsed);
            #[cfg(feature = "metrics")]
            crate::exposition::record(crate::exposition::TIER_READ_DURATION, &[("tier", self.level)], elapsed);
        }
        match read {
            Ok(read) => Some(read),
            Err(e) => {
                Stats::incr(&self.counters.errors);
                tracing::debug!(target: "authz_cache", tier = self.level, error = %e, "remote read failed: miss");
                None
            }
        }
    }

    /// The highest epoch high water seen so far: take it before a read, and give it to
    /// [`kept_its_epochs`](Self::kept_its_epochs) with what the read returned (a bump that
    /// completes while the read is in flight raises it, but cannot be in the read's answer).
    pub(crate) fn high_water_mark(&self) -> u64 {
        self.high_water_seen.load(Ordering::Acquire)
    }

    /// Records a value this tier assigned (a bump): its high water is at least that.
    pub(crate) fn saw_high_water(&self, value: u64) {
        self.high_water_seen.fetch_max(value, Ordering::AcqRel);
    }

    /// With this tier as the authority: whether the high water it reported is still at least
    /// `mark`, the highest seen before the call was sent. A lower one means the store lost its
    /// epochs (restarted empty, flushed): then `epochs` forgets every shared value it holds
    /// ([`Epochs::reset_shared`]), since a value the store forgot would otherwise mask a lower
    /// one it assigns from now on, and an invalidation would go unnoticed here.
    ///
    /// [`Epochs::reset_shared`]: crate::cache::epoch::Epochs::reset_shared
    pub(crate) fn kept_its_epochs(&self, mark: u64, now: u64, epochs: &crate::cache::epoch::Epochs) -> bool {
        if now >= mark {
            self.high_water_seen.fetch_max(now, Ordering::AcqRel);
            return true;
        }
        // Start again from what the store has now (a mark below its real high water can only
        // delay the next detection, never raise a false one).
        self.high_water_seen.store(now, Ordering::Release);
        tracing::warn!(
            target: "authz_cache::audit",
            tier = self.level,
            seen = mark,
            now,
            "shared tier lost its epochs (restarted empty or flushed): shared epochs forgotten, L1 dropped"
        );
        epochs.reset_shared();
        false
    }

    pub(crate) fn snapshot(&self) -> RemoteTierSnapshot {
        let mut snapshot = self.counters.snapshot(&self.guard);
        snapshot.warning = self.tier.warning();
        snapshot
    }
}
