//! What runs in the background for a cache with shared tiers, aborted when the cache is dropped:
//! the janitor (pays owed bumps, runs each tier's maintenance, brings the mirrors to the
//! authority's global epoch), the change feed and its watchdog, and warming at start-up.

use std::sync::{Arc, Weak};
use std::time::Duration;

use super::{Inner, feed, warm};
use crate::tier::shared::{EpochTarget, ScopeHashes};

/// How long one tier's maintenance may run before it is abandoned until the next tick.
const MAINTENANCE_TIMEOUT: Duration = Duration::from_secs(30);

/// Background tasks of a cache, aborted when it is dropped.
#[derive(Default)]
pub(super) struct Tasks(std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>);

impl Tasks {
    /// Adds one more task to abort with the cache.
    pub(super) fn push(&self, task: tokio::task::JoinHandle<()>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(task);
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in self.0.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            t.abort();
        }
    }
}

/// Starts the background tasks (none without a shared tier).
pub(super) fn start(inner: &Arc<Inner>) {
    if !inner.has_shared_tier() {
        return;
    }
    let mut tasks = vec![tokio::spawn(janitor(Arc::downgrade(inner)))];
    if let Some(state) = &inner.feed {
        tasks.push(tokio::spawn(feed::run(Arc::downgrade(inner), state.clone())));
        tasks.push(tokio::spawn(feed::watchdog(state.clone())));
    }
    if let Some(limit) = inner.warm_source().map(|(_, source)| source.warm_on_start()).filter(|n| *n > 0) {
        tasks.push(tokio::spawn(warm::on_start(Arc::downgrade(inner), limit)));
    }
    inner.tasks.0.lock().unwrap_or_else(|e| e.into_inner()).extend(tasks);
}

/// Every 250 ms: pays owed bumps, then runs each tier's maintenance. Once, as soon as it can:
/// raises the mirrors' global epoch to the authority's (a mirror that was flushed has none, and
/// entries stamped with the authority's would not validate in it).
async fn janitor(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut global_mirrored = false;
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        inner.retry_pending().await;
        if !global_mirrored {
            global_mirrored = mirror_global(&inner).await;
        }
        for slot in &inner.tiers {
            match tokio::time::timeout(MAINTENANCE_TIMEOUT, slot.tier.tier.maintain()).await {
                Ok(Ok(swept)) => {
                    slot.tier.counters.swept.fetch_add(swept, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(Err(e)) => {
                    tracing::debug!(target: "authz_cache", tier = slot.tier.level, error = %e, "maintenance failed")
                }
                Err(_) => tracing::debug!(target: "authz_cache", tier = slot.tier.level, "maintenance timed out"),
            }
        }
    }
}

/// Reads the authority's global epoch (with a read of an unused key: every read returns it) and
/// raises every mirror to it; whether it was done.
async fn mirror_global(inner: &Inner) -> bool {
    let Some(authority) = inner.authority() else { return true };
    if inner.tiers.len() < 2 {
        return true;
    }
    let hashes = ScopeHashes::new(0, 0, 0);
    let Ok(read) = authority.call(authority.tier.read(&[0; 32], &hashes, Duration::ZERO)).await else { return false };
    let Some([global, ..]) = read.epochs else { return false };
    inner.epochs.merge_global(global.min(super::epoch::EPOCH_MAX));
    let mut all = true;
    for mirror in inner.mirrors() {
        all &= mirror.tier.raise(EpochTarget::GLOBAL, global, Duration::ZERO).await.is_ok();
    }
    all
}
