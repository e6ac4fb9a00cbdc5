//! The backplane, over any shared tier's [`Transport`] (Redis pub/sub, Postgres LISTEN/NOTIFY,
//! a custom tier's): invalidations published by any instance reach every other instance's
//! epochs within milliseconds, and a heartbeat tells each instance whether it is still hearing
//! them. A transport may also carry the change feed's hints ([`Notice::Changed`]: the source of
//! truth recorded a change durably first; see `cache/feed.rs`).
//!
//! Three tasks per backplane:
//! - the subscriber holds one dedicated connection (pub/sub, or LISTEN); it applies invalidation messages
//!   (`i <scope> <hash> <value>`) to the local epochs with `max`, so a message can only ever
//!   turn entries into misses. It reconnects with backoff (100 ms doubling to 2 s) and treats
//!   a connection that stays silent past `max_staleness` as dead. Each new subscription drops
//!   trust in everything already in L1 (messages may have been lost while it was down);
//! - the heartbeat publishes `h <instance>` every `max_staleness / 5`;
//! - the watchdog, every `max_staleness / 10`, stops trusting L1 once nothing has been heard for
//!   `max_staleness - max_staleness / 10`, so L1 is never trusted more than `max_staleness`
//!   after the last message. Untrusted, reads skip L1 and go to L2 (whose reads are checked
//!   against the shared epochs) or the authorizer. The first message heard after that drops
//!   every L1 entry and in-flight computation (a local epoch bump), then trusts L1 again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::task::JoinHandle;

use crate::cache::epoch::Epochs;
use crate::cache::feed::FeedState;
use crate::tier::guarded::Guarded;
use crate::tier::shared::{Notice, Transport};

/// What a backplane listens on, and what it tells.
pub(crate) struct Source {
    pub(crate) tier: Arc<Guarded>,
    /// Whether the tier is the authority (its epoch high water is checked at every subscription).
    pub(crate) authority: bool,
    /// The change feed to hint at every subscription and [`Notice::Changed`].
    pub(crate) feed: Option<Arc<FeedState>>,
}

impl Source {
    fn transport(&self) -> Option<&dyn Transport> {
        self.tier.tier.transport()
    }
}

/// What the backplane is doing, for stats and health.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct BackplaneSnapshot {
    /// A subscription is established.
    pub connected: bool,
    /// L1 is trusted: something was heard within `max_staleness`.
    pub l1_trusted: bool,
    /// Milliseconds since the last message (heartbeat or invalidation).
    pub silent_for_ms: u64,
    /// Messages received.
    pub messages: u64,
    /// Invalidations received and applied.
    pub invalidations: u64,
    /// Subscriptions established (the first one included).
    pub subscriptions: u64,
    /// Times L1 was distrusted after a silence.
    pub distrusts: u64,
    /// Messages that did not parse (ignored).
    pub malformed: u64,
}

pub(crate) struct BackplaneState {
    start: Instant,
    trusted: AtomicBool,
    connected: AtomicBool,
    last_heard_ms: AtomicU64,
    messages: AtomicU64,
    invalidations: AtomicU64,
    subscriptions: AtomicU64,
    distrusts: AtomicU64,
    malformed: AtomicU64,
    max_staleness_ms: u64,
}

impl BackplaneState {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Whether the subscription is up.
    pub(crate) fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Whether L1 may be read.
    pub(crate) fn trusted(&self) -> bool {
        self.trusted.load(Ordering::Acquire)
    }

    pub(crate) fn snapshot(&self) -> BackplaneSnapshot {
        BackplaneSnapshot {
            connected: self.connected.load(Ordering::Relaxed),
            l1_trusted: self.trusted(),
            silent_for_ms: self.now_ms().saturating_sub(self.last_heard_ms.load(Ordering::Relaxed)),
            messages: self.messages.load(Ordering::Relaxed),
            invalidations: self.invalidations.load(Ordering::Relaxed),
            subscriptions: self.subscriptions.load(Ordering::Relaxed),
            distrusts: self.distrusts.load(Ordering::Relaxed),
            malformed: self.malformed.load(Ordering::Relaxed),
        }
    }

    fn heard(&self, epochs: &Epochs) {
        self.last_heard_ms.store(self.now_ms(), Ordering::Release);
        if !self.trusted.load(Ordering::Acquire) {
            // Whatever L1 holds may predate invalidations we never heard: drop it all (and
            // every computation in flight) before trusting L1 again.
            epochs.bump_local();
            self.trusted.store(true, Ordering::Release);
            tracing::info!(target: "authz_cache::audit", "backplane heard again: L1 trusted");
        }
    }
}

/// The backplane's tasks; aborted when the cache is dropped.
pub(crate) struct Backplane {
    pub(crate) state: Arc<BackplaneState>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Backplane {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Applies one notice; returns false when it did not parse.
fn apply(notice: Notice, source: &Source, epochs: &Epochs, state: &BackplaneState) -> bool {
    match notice {
        Notice::Heartbeat => true,
        Notice::Changed => {
            if let Some(feed) = &source.feed {
                feed.hint();
            }
            true
        }
        Notice::Epoch { target, value } => {
            epochs.merge_target(target.0, value);
            state.invalidations.fetch_add(1, Ordering::Relaxed);
            true
        }
        _ => false,
    }
}

pub(crate) fn start(source: Source, epochs: Arc<Epochs>, max_staleness: Duration) -> Backplane {
    let max_staleness_ms = (max_staleness.as_millis() as u64).max(10);
    let state = Arc::new(BackplaneState {
        start: Instant::now(),
        trusted: AtomicBool::new(false),
        connected: AtomicBool::new(false),
        last_heard_ms: AtomicU64::new(0),
        messages: AtomicU64::new(0),
        invalidations: AtomicU64::new(0),
        subscriptions: AtomicU64::new(0),
        distrusts: AtomicU64::new(0),
        malformed: AtomicU64::new(0),
        max_staleness_ms,
    });
    let instance = format!("{:016x}", std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), 0u8));
    let source = Arc::new(source);
    let mut tasks = Vec::new();

    // Subscriber.
    tasks.push(tokio::spawn({
        let (source, epochs, state) = (source.clone(), epochs.clone(), state.clone());
        async move {
            let silence = Duration::from_millis(max_staleness_ms);
            let mut backoff = Duration::from_millis(100);
            loop {
                let heard_any = session(&source, &epochs, &state, silence).await;
                if heard_any {
                    backoff = Duration::from_millis(100);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }));

    // Heartbeat.
    tasks.push(tokio::spawn({
        let source = source.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis((max_staleness_ms / 5).max(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(transport) = source.transport() else { return };
                let sent = source.tier.call(transport.heartbeat(&instance)).await;
                if let Err(e) = sent {
                    tracing::debug!(target: "authz_cache", error = %e, "backplane heartbeat failed");
                }
            }
        }
    }));

    // Watchdog.
    tasks.push(tokio::spawn({
        let state = state.clone();
        async move {
            let step = (max_staleness_ms / 10).max(1);
            let mut tick = tokio::time::interval(Duration::from_millis(step));
            loop {
                tick.tick().await;
                let silent = state.now_ms().saturating_sub(state.last_heard_ms.load(Ordering::Acquire));
                if silent > state.max_staleness_ms - step && state.trusted.swap(false, Ordering::AcqRel) {
                    state.distrusts.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(target: "authz_cache::audit", silent_ms = silent, "backplane silent: L1 distrusted");
                }
            }
        }
    }));

    Backplane { state, tasks }
}

/// Marks a new subscription: messages may have been lost before it existed.
fn subscribed(epochs: &Epochs, state: &BackplaneState) {
    state.connected.store(true, Ordering::Release);
    state.subscriptions.fetch_add(1, Ordering::Relaxed);
    epochs.bump_local();
    tracing::info!(target: "authz_cache::audit", "backplane subscribed");
}

/// Applies one notice and records that something was heard.
fn received(notice: Notice, source: &Source, epochs: &Epochs, state: &BackplaneState) {
    state.messages.fetch_add(1, Ordering::Relaxed);
    if apply(notice, source, epochs, state) {
        state.heard(epochs);
    } else {
        state.malformed.fetch_add(1, Ordering::Relaxed);
    }
}

/// One subscription, until it breaks or stays silent past `silence`. Returns whether it was
/// established. The subscription itself hints the change feed (notices sent while nobody
/// listened are gone) and, with the tier as the authority, checks that the tier kept its epochs
/// (a restart is the usual reason to re-subscribe).
async fn session(source: &Source, epochs: &Epochs, state: &BackplaneState, silence: Duration) -> bool {
    let Some(transport) = source.transport() else { return false };
    let mut subscription = match tokio::time::timeout(silence.max(Duration::from_secs(2)), transport.subscribe()).await
    {
        Ok(Ok(subscription)) => subscription,
        Ok(Err(e)) => {
            tracing::debug!(target: "authz_cache", tier = source.tier.level, error = %e, "backplane connect failed");
            return false;
        }
        Err(_) => {
            tracing::debug!(target: "authz_cache", tier = source.tier.level, "backplane connect timed out");
            return false;
        }
    };
    subscribed(epochs, state);
    if let Some(feed) = &source.feed {
        feed.hint();
    }
    if source.authority {
        let mark = source.tier.high_water_mark();
        match source.tier.call(source.tier.tier.high_water()).await {
            Ok(Some(now)) => {
                source.tier.kept_its_epochs(mark, now, epochs);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(target: "authz_cache::audit", tier = source.tier.level, error = %e, "epoch high water unreadable: shared epochs forgotten");
                epochs.reset_shared();
            }
        }
    }
    loop {
        match tokio::time::timeout(silence, subscription.next()).await {
            Ok(Some(Ok(notice))) => received(notice, source, epochs, state),
            Ok(Some(Err(e))) => {
                tracing::debug!(target: "authz_cache", tier = source.tier.level, error = %e, "backplane error");
                break;
            }
            Ok(None) => break,
            Err(_) => {
                tracing::warn!(target: "authz_cache::audit", tier = source.tier.level, "backplane silent: reconnecting");
                break;
            }
        }
    }
    state.connected.store(false, Ordering::Release);
    tracing::warn!(target: "authz_cache::audit", tier = source.tier.level, "backplane lost");
    true
}
