//! One authorizer call per key at a time, per process.
//!
//! The first request to miss on a key becomes the leader: it registers the key and spawns the
//! computation as its own task, so dropping the leading request strands nobody. Everyone,
//! leader included, waits on a watch channel. If the task dies without an answer (a panic), the
//! channel closes and every waiter gets an error.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::cache::key::CacheKey;

type Map<V> = Arc<Mutex<HashMap<CacheKey, watch::Receiver<Option<V>>>>>;

pub(crate) struct SingleFlight<V> {
    inflight: Map<V>,
}

pub(crate) enum Join<V> {
    Leader(Leader<V>, watch::Receiver<Option<V>>),
    Follower(watch::Receiver<Option<V>>),
}

/// The right to compute one key. Removes the key when finished or dropped.
pub(crate) struct Leader<V> {
    inflight: Map<V>,
    key: CacheKey,
    tx: watch::Sender<Option<V>>,
}

impl<V: Clone> SingleFlight<V> {
    pub(crate) fn new() -> Self {
        Self { inflight: Arc::new(Mutex::new(HashMap::new())) }
    }

    pub(crate) fn join(&self, key: &CacheKey) -> Join<V> {
        let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rx) = map.get(key) {
            return Join::Follower(rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        map.insert(key.clone(), rx.clone());
        Join::Leader(Leader { inflight: self.inflight.clone(), key: key.clone(), tx }, rx)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl<V> Leader<V> {
    /// Publishes the outcome to every waiter.
    pub(crate) fn finish(self, value: V) {
        self.remove();
        // Waiters may all have gone; that is fine.
        let _ = self.tx.send(Some(value));
    }

    /// Removes the key if it is still ours.
    fn remove(&self) {
        let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(&self.key).is_some_and(|rx| rx.same_channel(&self.tx.subscribe())) {
            map.remove(&self.key);
        }
    }
}

impl<V> Drop for Leader<V> {
    fn drop(&mut self) {
        self.remove();
    }
}
