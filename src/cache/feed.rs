//! The durable change feed, over the authority's [`ChangeFeed`] (Postgres: changes to the
//! permission tables, recorded in `authz_cache_changes` by the changing transaction, see
//! `migrations/0003_durable_changes.sql`), applied to the shared epochs by whichever instance
//! gets to them first.
//!
//! A NOTIFY on the changes channel is only a hint: it wakes [`run`] at once. Without it, `run`
//! polls every `max_staleness / 4`, and it catches up whenever the Postgres listener
//! (re)subscribes. One round:
//!
//! 1. poll: are changes, or Redis mirror debts, waiting? (one cheap statement);
//! 2. drain the changes in batches (Postgres: transactions with `FOR UPDATE SKIP LOCKED`, so
//!    instances never apply one change twice), each bumping the principals' epochs (or the
//!    global one) durably and deleting what it applied; with shallower tiers, recording the
//!    values as mirror debts in the same transaction;
//! 3. with shallower tiers, pay the mirror debts (any instance's): raise them, then delete the
//!    debts;
//! 4. poll again; only a poll that finds nothing waiting confirms the feed caught up, as of the
//!    moment that poll started.
//!
//! What the confirmation guards: every read of the authority checks for waiting changes itself
//! (nothing is accepted while a change waits), but L1 and the shallower tiers cannot. So with a
//! change feed, L1 and the shallower tiers are trusted only
//! while the last confirmation is younger than `max_staleness` ([`watchdog`] withdraws the trust
//! when it is not). A change committed at `t` therefore stops being served everywhere by
//! `t + max_staleness` at the latest, whatever NOTIFYs were lost, whatever listener was away,
//! and whichever instance applied it; within milliseconds when the hint arrives. Nothing here
//! queues in memory: there is no queue to overflow, and a round that fails leaves the rows where
//! the next round (of any instance) finds them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::Inner;
use super::key::Scope;
use crate::stats::{ChangeFeedSnapshot, Stats};
use crate::tier::shared::{ChangeFeed, EpochTarget};

/// Rounds of drain-and-poll in one catch-up before it gives up until the next tick.
const MAX_ROUNDS: usize = 64;

pub(crate) struct FeedState {
    start: Instant,
    hint: tokio::sync::Notify,
    trusted: AtomicBool,
    /// Monotonic ms (since `start`) when the last poll that found nothing waiting started.
    confirmed_at_ms: AtomicU64,
    /// The same, for requests waiting for the feed to catch up (see [`FeedState::caught_up_since`]).
    confirmed: tokio::sync::watch::Sender<u64>,
    confirmed_once: AtomicBool,
    max_staleness_ms: u64,
    applied: AtomicU64,
    drains: AtomicU64,
    mirrored: AtomicU64,
    distrusts: AtomicU64,
    failures: AtomicU64,
}

impl FeedState {
    pub(crate) fn new(max_staleness: Duration) -> Self {
        Self {
            start: Instant::now(),
            hint: tokio::sync::Notify::new(),
            trusted: AtomicBool::new(false),
            confirmed_at_ms: AtomicU64::new(0),
            confirmed: tokio::sync::watch::Sender::new(0),
            confirmed_once: AtomicBool::new(false),
            max_staleness_ms: u64::try_from(max_staleness.as_millis()).unwrap_or(u64::MAX).max(10),
            applied: AtomicU64::new(0),
            drains: AtomicU64::new(0),
            mirrored: AtomicU64::new(0),
            distrusts: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    pub(crate) fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The watchdog's step; trust ends `step` before `max_staleness` so it never outlives it.
    fn step_ms(&self) -> u64 {
        (self.max_staleness_ms / 10).max(1)
    }

    /// Wakes the feed now (a NOTIFY, a new subscription, an L3 read that found a change).
    pub(crate) fn hint(&self) {
        self.hint.notify_one();
    }

    /// Resolves once a poll that started at or after `since_ms` (this state's clock, see
    /// [`now_ms`](Self::now_ms)) found nothing waiting: every change recorded before `since_ms`
    /// is applied. Hint the feed first. Dropping the future leaves nothing behind.
    pub(crate) async fn caught_up_since(&self, since_ms: u64) {
        let mut rx = self.confirmed.subscribe();
        let _ = rx.wait_for(|at| *at >= since_ms).await;
    }

    /// Whether the feed was seen caught up recently enough for L1 and L2 to be trusted.
    pub(crate) fn trusted(&self) -> bool {
        self.trusted.load(Ordering::Acquire)
    }

    /// A poll that started at `started_ms` found nothing waiting.
    fn confirm(&self, started_ms: u64) {
        self.confirmed_at_ms.fetch_max(started_ms, Ordering::AcqRel);
        self.confirmed.send_if_modified(|at| {
            let newer = started_ms > *at;
            *at = (*at).max(started_ms);
            newer
        });
        self.confirmed_once.store(true, Ordering::Release);
        let fresh = self.now_ms().saturating_sub(started_ms) < self.max_staleness_ms.saturating_sub(self.step_ms());
        if fresh && !self.trusted.swap(true, Ordering::AcqRel) {
            tracing::info!(target: "authz_cache::audit", "change feed caught up: L1 and L2 trusted");
        }
    }

    pub(crate) fn snapshot(&self) -> ChangeFeedSnapshot {
        ChangeFeedSnapshot {
            caught_up: self.trusted(),
            behind_ms: if self.confirmed_once.load(Ordering::Acquire) {
                self.now_ms().saturating_sub(self.confirmed_at_ms.load(Ordering::Acquire))
            } else {
                self.now_ms()
            },
            applied: self.applied.load(Ordering::Relaxed),
            drains: self.drains.load(Ordering::Relaxed),
            mirrored: self.mirrored.load(Ordering::Relaxed),
            distrusts: self.distrusts.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
        }
    }
}

/// Catches up at every hint, and every `max_staleness / 4` without one.
pub(super) async fn run(inner: Weak<Inner>, state: Arc<FeedState>) {
    let every = Duration::from_millis((state.max_staleness_ms / 4).max(5));
    loop {
        let Some(cache) = inner.upgrade() else { return };
        if !catch_up(&cache, &state).await {
            state.failures.fetch_add(1, Ordering::Relaxed);
        }
        drop(cache);
        tokio::select! {
            () = state.hint.notified() => {}
            () = tokio::time::sleep(every) => {}
        }
    }
}

/// Withdraws trust once the last confirmation is about to be `max_staleness` old.
pub(crate) async fn watchdog(state: Arc<FeedState>) {
    let step = state.step_ms();
    let mut tick = tokio::time::interval(Duration::from_millis(step));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let behind = state.now_ms().saturating_sub(state.confirmed_at_ms.load(Ordering::Acquire));
        if behind > state.max_staleness_ms.saturating_sub(step) && state.trusted.swap(false, Ordering::AcqRel) {
            state.distrusts.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                target: "authz_cache::audit",
                behind_ms = behind,
                "change feed not confirmed within max_staleness: L1 and L2 distrusted"
            );
        }
    }
}

/// One catch-up (see the module docs); whether it confirmed the feed caught up.
async fn catch_up(inner: &Inner, state: &FeedState) -> bool {
    let Some(authority) = inner.authority() else { return false };
    let Some(feed) = authority.tier.change_feed() else { return false };
    let mirror = inner.tiers.len() > 1;
    for _ in 0..MAX_ROUNDS {
        let started = state.now_ms();
        let Ok(backlog) = authority.background(feed.backlog()).await else { return false };
        let waiting = backlog.changes || (mirror && backlog.mirror);
        if !waiting {
            state.confirm(started);
            return true;
        }
        if backlog.changes {
            let Some(drained) = drain(inner, feed, state, mirror).await else { return false };
            if drained == 0 {
                // Every waiting change is being applied by another instance: look again soon.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        if mirror && !pay_mirror(inner, feed, state).await {
            return false;
        }
    }
    false
}

/// Applies one batch of changes; how many it applied (`None`: it failed, nothing applied).
async fn drain(inner: &Inner, feed: &dyn ChangeFeed, state: &FeedState, mirror: bool) -> Option<usize> {
    let authority = inner.authority()?;
    let now = inner.clock.now_ms();
    let rotation = inner.rotation.as_ref().filter(|r| now < r.until_ms);
    let targets = |principal: Option<&str>| -> Vec<EpochTarget> {
        let Some(id) = principal else { return vec![EpochTarget::GLOBAL] };
        // During a rotation, the principal's scope under the other secret too.
        std::iter::once(&inner.keys)
            .chain(rotation.map(|r| &r.keys))
            .map(|keys| EpochTarget(Some((Scope::Principal, keys.scope_hash(Scope::Principal, id)))))
            .collect()
    };
    let retention = Duration::from_millis(inner.shared_retention_ms);
    let drained = match authority.background(feed.drain(&targets, inner.epochs.floor(), retention, mirror)).await {
        Ok(done) => done,
        Err(e) => {
            tracing::debug!(target: "authz_cache", error = %e, "change feed drain failed");
            return None;
        }
    };
    if drained.changes == 0 {
        return Some(0);
    }
    for (target, value) in &drained.values {
        inner.epochs.merge_target(target.0, *value);
        Stats::incr(&inner.stats.change_feed);
    }
    state.drains.fetch_add(1, Ordering::Relaxed);
    state.applied.fetch_add(drained.changes as u64, Ordering::Relaxed);
    tracing::info!(
        target: "authz_cache::audit",
        changes = drained.changes,
        scopes = drained.values.len(),
        everything = drained.values.iter().any(|(t, _)| t.is_global()),
        "change feed: source-of-truth changes applied to the shared epochs"
    );
    Some(drained.changes)
}

/// Raises the shallower tiers to the values recorded as mirror debts (any instance's), then
/// clears them; whether every debt read was paid.
async fn pay_mirror(inner: &Inner, feed: &dyn ChangeFeed, state: &FeedState) -> bool {
    let Some(authority) = inner.authority() else { return true };
    let Ok(debts) = authority.background(feed.mirror_debts()).await else { return false };
    let retention = Duration::from_millis(inner.shared_retention_ms);
    let mut paid = Vec::with_capacity(debts.len());
    'debts: for (target, value) in &debts {
        for mirror in inner.mirrors() {
            if mirror.tier.raise(*target, *value, retention).await.is_err() {
                break 'debts;
            }
        }
        inner.epochs.merge_target(target.0, *value);
        paid.push((*target, *value));
    }
    let all = paid.len() == debts.len();
    if paid.is_empty() {
        return all;
    }
    state.mirrored.fetch_add(paid.len() as u64, Ordering::Relaxed);
    authority.background(feed.paid_mirror(&paid)).await.is_ok() && all
}
