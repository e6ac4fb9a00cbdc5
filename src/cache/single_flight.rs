//! One authorizer call per key at a time, per process.
//!
//! The first request to miss on a key becomes the leader: it registers the key and computes.
//! Followers wait on a watch channel. If the leader is dropped before it answers, the channel
//! closes without a value and the followers race to lead a new flight.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project::pin_project;
use tokio::sync::watch;

use crate::cache::key::CacheKey;

type Map<V> = Arc<Mutex<HashMap<CacheKey, watch::Receiver<Option<V>>>>>;

pub(crate) struct SingleFlight<V> {
    inflight: Map<V>,
}

pub(crate) enum Join<V> {
    Leader(Leader<V>),
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
        map.insert(key.clone(), rx);
        Join::Leader(Leader { inflight: self.inflight.clone(), key: key.clone(), tx })
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

/// Resolves to `Err(())` if polling the inner future panicked. The inner future is never polled
/// again after a panic; the cache's own state stays consistent because nothing of it is held
/// across the authorizer's await.
#[pin_project]
pub(crate) struct CatchUnwind<F> {
    #[pin]
    inner: F,
}

impl<F> CatchUnwind<F> {
    pub(crate) fn new(inner: F) -> Self {
        Self { inner }
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, ()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.project().inner;
        match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(_) => Poll::Ready(Err(())),
        }
    }
}
