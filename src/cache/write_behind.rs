//! The write-behind queue of a shared tier: fresh entries are copied to the tier in the
//! background, off the request path, through one bounded queue per tier drained by the tier's
//! writers ([`TierSettings`](crate::tier::TierSettings): how many, how many entries per call,
//! how long to linger for more). A full queue drops the copy (counted); a request never waits
//! for a shared write.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crate::cache::clock::Clock;
use crate::stats::Stats;
use crate::tier::guarded::Guarded;
use crate::tier::shared::TierWrite;

/// How long a copy may wait in the queue. Readers accept a stored entry for at most the longest
/// ttl after it was stored; a copy queued for longer would outlive what its stamp was checked
/// against by more than the retention margin allows, so it is dropped (counted as a drop). Local
/// epoch retention covers this delay (see `builder.rs`).
pub(crate) const MAX_WRITE_DELAY: Duration = Duration::from_secs(2);

/// Starts the tier's writers; they stop when the returned sender is dropped.
pub(crate) fn spawn(tier: Arc<Guarded>, clock: Clock) -> tokio::sync::mpsc::Sender<TierWrite> {
    let settings = tier.settings;
    let (tx, rx) = tokio::sync::mpsc::channel::<TierWrite>(settings.write_queue.max(1));
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    for _ in 0..settings.writers.max(1) {
        let (tier, rx, clock) = (tier.clone(), rx.clone(), clock.clone());
        tokio::spawn(async move {
            let batch_size = tier.settings.write_batch.max(1);
            let mut batch = Vec::with_capacity(batch_size);
            loop {
                {
                    let mut rx = rx.lock().await;
                    if rx.recv_many(&mut batch, batch_size).await == 0 {
                        return;
                    }
                    // Linger a little for more: a batch costs a store about as much as one entry.
                    if !tier.settings.write_linger.is_zero() {
                        let linger = tokio::time::Instant::now() + tier.settings.write_linger;
                        while batch.len() < batch_size {
                            let room = batch_size - batch.len();
                            match tokio::time::timeout_at(linger, rx.recv_many(&mut batch, room)).await {
                                Ok(n) if n > 0 => {}
                                _ => break,
                            }
                        }
                    }
                }
                write(&tier, &clock, &mut batch).await;
            }
        });
    }
    tx
}

/// Writes one batch: expired copies skipped, late ones dropped, one copy per key (the last).
async fn write(tier: &Guarded, clock: &Clock, batch: &mut Vec<TierWrite>) {
    let now = clock.now_ms();
    batch.retain(|w| w.valid_until_ms > now);
    for w in batch.iter_mut() {
        w.remaining_ms = w.valid_until_ms - now;
    }
    let queued = batch.len();
    batch.retain(|w| w.queued_at.elapsed() < MAX_WRITE_DELAY);
    let late = queued - batch.len();
    if late > 0 {
        tier.counters.write_drops.fetch_add(late as u64, Relaxed);
    }
    if batch.len() > 1 {
        let mut seen = std::collections::HashSet::with_capacity(batch.len());
        let mut rows: Vec<TierWrite> = batch.drain(..).rev().filter(|w| seen.insert(w.key_id)).collect();
        rows.reverse();
        *batch = rows;
    }
    if batch.is_empty() {
        return;
    }
    let n = batch.len() as u64;
    match tier.call(tier.tier.write(batch)).await {
        Ok(()) => {
            tier.counters.writes.fetch_add(n, Relaxed);
        }
        Err(e) => {
            tier.counters.write_errors.fetch_add(n, Relaxed);
            tracing::debug!(target: "authz_cache", tier = tier.level, error = %e, rows = n, "shared write failed");
        }
    }
    batch.clear();
}

/// Queues one copy; a full queue drops it (counted).
pub(crate) fn queue(tx: &tokio::sync::mpsc::Sender<TierWrite>, tier: &Guarded, write: TierWrite) {
    if tx.try_send(write).is_err() {
        Stats::incr(&tier.counters.write_drops);
    }
}

/// A copy to queue, stamped now.
pub(crate) fn copy(
    key_id: [u8; 32],
    value: Vec<u8>,
    valid_until_ms: u64,
    principal_hash: u64,
    subject: Option<Vec<u8>>,
) -> TierWrite {
    TierWrite { key_id, value, valid_until_ms, principal_hash, subject, queued_at: Instant::now(), remaining_ms: 0 }
}
