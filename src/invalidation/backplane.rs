//! The backplane, on Redis pub/sub or Postgres LISTEN/NOTIFY: invalidations published by any
//! instance reach every other instance's epochs within milliseconds, and a heartbeat tells each
//! instance whether it is still hearing them. On Postgres the same connection also carries the
//! change feed's hints (the permission tables' triggers record each change durably first; see
//! `cache/feed.rs`).
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
use crate::cache::key::Scope;

/// Where a backplane listens and publishes.
pub(crate) enum Source {
    #[cfg(feature = "redis")]
    Redis(Arc<crate::tier::redis::RedisShared>),
    /// Postgres; a message on the changes channel (or a new subscription) hints `feed`.
    #[cfg(feature = "postgres")]
    Postgres { pg: Arc<crate::tier::postgres::PostgresShared>, feed: Arc<crate::cache::feed::FeedState> },
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
    #[cfg(feature = "postgres")]
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

/// Parses and applies one message; returns false when it did not parse.
fn apply(payload: &str, epochs: &Epochs, state: &BackplaneState) -> bool {
    let mut parts = payload.split(' ');
    match (parts.next(), parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("h"), Some(_), None, None, None) => true,
        (Some("i"), Some(tag), Some(hash), Some(value), None) => {
            let (Ok(hash), Ok(value)) = (u64::from_str_radix(hash, 16), value.parse::<u64>()) else {
                return false;
            };
            if tag == "g" {
                epochs.merge_global(value);
            } else if let Some(scope) = Scope::from_tag(tag) {
                epochs.merge(scope, hash, value);
            } else {
                return false;
            }
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
                let heard_any = match &*source {
                    #[cfg(feature = "redis")]
                    Source::Redis(redis) => redis_session(redis, &epochs, &state, silence).await,
                    #[cfg(feature = "postgres")]
                    Source::Postgres { pg, feed } => pg_session(pg, feed, &epochs, &state, silence).await,
                };
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
                let sent = match &*source {
                    #[cfg(feature = "redis")]
                    Source::Redis(redis) => redis.heartbeat(&instance).await.map_err(|e| e.to_string()),
                    #[cfg(feature = "postgres")]
                    Source::Postgres { pg, .. } => pg.heartbeat(&instance).await.map_err(|e| e.to_string()),
                };
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

/// Applies one message and records that something was heard.
fn received(payload: Option<&str>, epochs: &Epochs, state: &BackplaneState) {
    state.messages.fetch_add(1, Ordering::Relaxed);
    if payload.is_some_and(|p| apply(p, epochs, state)) {
        state.heard(epochs);
    } else {
        state.malformed.fetch_add(1, Ordering::Relaxed);
    }
}

/// One Redis subscription, until it breaks or stays silent past `silence`. Returns whether it
/// was established.
#[cfg(feature = "redis")]
async fn redis_session(
    redis: &crate::tier::redis::RedisShared,
    epochs: &Epochs,
    state: &BackplaneState,
    silence: Duration,
) -> bool {
    use futures_util::StreamExt;
    let connect = async {
        let mut pubsub = redis.backplane.get_async_pubsub().await?;
        pubsub.subscribe(&redis.channel).await?;
        Ok::<_, redis::RedisError>(pubsub)
    };
    let mut pubsub = match tokio::time::timeout(silence.max(Duration::from_secs(1)), connect).await {
        Ok(Ok(pubsub)) => pubsub,
        Ok(Err(e)) => {
            tracing::debug!(target: "authz_cache", error = %e, "backplane connect failed");
            return false;
        }
        Err(_) => {
            tracing::debug!(target: "authz_cache", "backplane connect timed out");
            return false;
        }
    };
    subscribed(epochs, state);
    // Messages sent while unsubscribed are lost; if Redis keeps the epochs, it may also have lost
    // them (a restart is the usual reason to re-subscribe): check before trusting anything.
    if redis.keeps_epochs() {
        let mark = redis.high_water_mark();
        let high_water = redis.high_water().await.ok();
        redis.kept_its_epochs(mark, high_water, epochs);
    }
    let mut stream = pubsub.on_message();
    loop {
        match tokio::time::timeout(silence, stream.next()).await {
            Ok(Some(msg)) => received(msg.get_payload::<String>().ok().as_deref(), epochs, state),
            Ok(None) => break,
            Err(_) => {
                tracing::warn!(target: "authz_cache::audit", "backplane silent: reconnecting");
                break;
            }
        }
    }
    state.connected.store(false, Ordering::Release);
    tracing::warn!(target: "authz_cache::audit", "backplane lost");
    true
}

/// One Postgres LISTEN session on the epochs and changes channels, until the connection breaks
/// or stays silent past `silence`. Returns whether it was established. Anything on the changes
/// channel, and the subscription itself (NOTIFYs sent while nobody listened are gone), wakes the
/// durable change feed, which does the actual work (see `cache/feed.rs`).
#[cfg(feature = "postgres")]
async fn pg_session(
    pg: &crate::tier::postgres::PostgresShared,
    feed: &crate::cache::feed::FeedState,
    epochs: &Epochs,
    state: &BackplaneState,
    silence: Duration,
) -> bool {
    use diesel_async::SimpleAsyncConnection;
    use futures_util::StreamExt;
    let connect = async {
        let mut conn = pg.connect().await.map_err(|e| e.to_string())?;
        let listen = format!("LISTEN \"{}\"; LISTEN \"{}\"", pg.epochs_channel, pg.changes_channel);
        conn.batch_execute(&listen).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(conn)
    };
    let mut conn = match tokio::time::timeout(silence.max(Duration::from_secs(2)), connect).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::debug!(target: "authz_cache", error = %e, "postgres listener connect failed");
            return false;
        }
        Err(_) => {
            tracing::debug!(target: "authz_cache", "postgres listener connect timed out");
            return false;
        }
    };
    subscribed(epochs, state);
    feed.hint();
    {
        let mut stream = std::pin::pin!(conn.notifications_stream());
        loop {
            match tokio::time::timeout(silence, stream.next()).await {
                Ok(Some(Ok(n))) if n.channel == pg.changes_channel => {
                    state.messages.fetch_add(1, Ordering::Relaxed);
                    feed.hint();
                    state.heard(epochs);
                }
                Ok(Some(Ok(n))) => received(Some(&n.payload), epochs, state),
                Ok(Some(Err(e))) => {
                    tracing::debug!(target: "authz_cache", error = %e, "postgres listener error");
                    break;
                }
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(target: "authz_cache::audit", "postgres backplane silent: reconnecting");
                    break;
                }
            }
        }
    }
    state.connected.store(false, Ordering::Release);
    tracing::warn!(target: "authz_cache::audit", "postgres backplane lost");
    true
}
