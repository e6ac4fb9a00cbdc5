//! An in-process shared tier for tests (feature `testing`): [`MemoryShared`], with fault
//! switches, so that what depends on shared tiers (owed bumps, mirroring, rotation, clock skew,
//! the backplane) can be tested without servers, in the crate and in applications.
//!
//! Clones share one store: give a clone to each of two caches and they behave like two
//! instances sharing Redis. Every call counts; the switches act on the next call.
//!
//! ```
//! use tower_authz_cache::tier::testing::MemoryShared;
//! use tower_authz_cache::{AuthzCache, Decision, Invalidation, Permission, Principal};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let store = MemoryShared::new();
//! let build = |store: MemoryShared| {
//!     AuthzCache::builder(|_: Principal, _: Permission| async { Ok::<_, std::convert::Infallible>(Decision::allow()) })
//!         .secret("0123456789abcdef0123456789abcdef")
//!         .l2(store)
//!         .build()
//! };
//! let (a, b) = (build(store.clone()), build(store.clone()));
//! a.ready().await;
//! b.ready().await;
//! let (bob, read) = (Principal::new("bob"), Permission::new("documents:1", "read"));
//! a.check(&bob, &read).await.unwrap();
//! store.fail(true); // the store goes away: the invalidation is owed to it
//! assert!(a.invalidate(&Invalidation::principal("bob")).await.is_err());
//! store.fail(false);
//! # });
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::shared::{
    EpochTarget, KeyId, Notice, NoticeFuture, ScopeHashes, SharedTier, Subscription, TierError, TierFuture, TierRead,
    TierSettings, TierWrite, Transport,
};

/// An in-process shared tier with fault switches (see the [module docs](self)).
#[derive(Clone, Default)]
pub struct MemoryShared {
    state: Arc<State>,
}

#[derive(Default)]
struct State {
    store: Mutex<Store>,
    subscribers: Mutex<Vec<tokio::sync::mpsc::UnboundedSender<Notice>>>,
    fail: AtomicBool,
    hang: AtomicBool,
    lose_writes: AtomicBool,
    refuse_epochs: AtomicBool,
    drop_messages: AtomicBool,
    reads: AtomicU64,
    writes: AtomicU64,
    bumps: AtomicU64,
    raises: AtomicU64,
    settings: Mutex<Option<TierSettings>>,
}

#[derive(Default)]
struct Store {
    entries: HashMap<KeyId, (Vec<u8>, Instant)>,
    epochs: HashMap<(&'static str, u64), u64>,
    high_water: u64,
}

impl std::fmt::Debug for MemoryShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryShared")
            .field("entries", &self.entries())
            .field("failing", &self.state.fail.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl MemoryShared {
    /// An empty store, every switch off.
    pub fn new() -> Self {
        Self::default()
    }

    /// The settings the cache applies around this tier (default: [`TierSettings::default`]
    /// with a 100 ms timeout, so a hanging store fails calls quickly).
    pub fn with_settings(self, settings: TierSettings) -> Self {
        *self.state.settings.lock().unwrap_or_else(|e| e.into_inner()) = Some(settings);
        self
    }

    /// Every call fails at once, and every subscription ends (on), or calls work again (off).
    pub fn fail(&self, on: bool) {
        self.state.fail.store(on, Ordering::SeqCst);
        if on {
            self.state.subscribers.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }

    /// Every call hangs until the cache's timeout drops it (on).
    pub fn hang(&self, on: bool) {
        self.state.hang.store(on, Ordering::SeqCst);
    }

    /// Writes succeed and store nothing (on).
    pub fn lose_writes(&self, on: bool) {
        self.state.lose_writes.store(on, Ordering::SeqCst);
    }

    /// Bumps and raises fail, everything else works (on): a store that keeps serving entries
    /// but cannot record an invalidation.
    pub fn refuse_epochs(&self, on: bool) {
        self.state.refuse_epochs.store(on, Ordering::SeqCst);
    }

    /// Bumps, raises and heartbeats reach no subscriber (on); the epochs are still stored.
    pub fn drop_messages(&self, on: bool) {
        self.state.drop_messages.store(on, Ordering::SeqCst);
    }

    /// Loses everything, as a store restarted without persistence: entries, epochs, high water.
    pub fn forget_everything(&self) {
        *self.state.store.lock().unwrap_or_else(|e| e.into_inner()) = Store::default();
    }

    /// The stored value of an epoch (0 when absent).
    pub fn epoch(&self, target: EpochTarget) -> u64 {
        let store = self.state.store.lock().unwrap_or_else(|e| e.into_inner());
        store.epochs.get(&(target.tag(), target.hash())).copied().unwrap_or(0)
    }

    /// The highest global or scoped epoch stored (0 when none).
    pub fn highest_epoch(&self) -> u64 {
        let store = self.state.store.lock().unwrap_or_else(|e| e.into_inner());
        store.epochs.values().copied().max().unwrap_or(0)
    }

    /// Entries held (expired ones included until read).
    pub fn entries(&self) -> usize {
        self.state.store.lock().unwrap_or_else(|e| e.into_inner()).entries.len()
    }

    /// Calls so far: (reads, write batches, bumps, raises). A `read_many` is one read.
    pub fn calls(&self) -> (u64, u64, u64, u64) {
        let s = &self.state;
        (
            s.reads.load(Ordering::SeqCst),
            s.writes.load(Ordering::SeqCst),
            s.bumps.load(Ordering::SeqCst),
            s.raises.load(Ordering::SeqCst),
        )
    }

    /// The fault switches, before any call.
    async fn enter(&self) -> Result<(), TierError> {
        if self.state.hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if self.state.fail.load(Ordering::SeqCst) {
            return Err(TierError::new("memory tier: failing (switch on)"));
        }
        Ok(())
    }

    /// One entry and its epochs, as stored now.
    fn read_now(&self, store: &mut Store, key_id: &KeyId, scopes: &ScopeHashes) -> TierRead {
        let now = Instant::now();
        store.entries.retain(|_, (_, until)| *until > now);
        let value = store.entries.get(key_id).map(|(v, _)| v.clone());
        let epoch = |tag: &'static str, hash: u64| store.epochs.get(&(tag, hash)).copied().unwrap_or(0);
        let epochs =
            [epoch("g", 0), epoch("p", scopes.principal), epoch("r", scopes.resource), epoch("k", scopes.entry)];
        TierRead::new(value, Some(epochs)).with_high_water(store.high_water)
    }

    fn epochs_refused(&self) -> Result<(), TierError> {
        if self.state.refuse_epochs.load(Ordering::SeqCst) {
            return Err(TierError::new("memory tier: refusing epochs (switch on)"));
        }
        Ok(())
    }

    fn publish(&self, notice: Notice) {
        if self.state.drop_messages.load(Ordering::SeqCst) {
            return;
        }
        self.state.subscribers.lock().unwrap_or_else(|e| e.into_inner()).retain(|tx| tx.send(notice).is_ok());
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.state.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn tag_of(target: EpochTarget) -> (&'static str, u64) {
    (target.tag(), target.hash())
}

impl SharedTier for MemoryShared {
    fn settings(&self) -> TierSettings {
        self.state.settings.lock().unwrap_or_else(|e| e.into_inner()).unwrap_or_else(|| {
            TierSettings::default().timeout(Duration::from_millis(100)).open_for(Duration::from_millis(200))
        })
    }

    fn read<'a>(&'a self, key_id: &'a KeyId, scopes: &'a ScopeHashes, _max_age: Duration) -> TierFuture<'a, TierRead> {
        Box::pin(async move {
            self.enter().await?;
            self.state.reads.fetch_add(1, Ordering::SeqCst);
            Ok(self.read_now(&mut self.store(), key_id, scopes))
        })
    }

    /// The whole batch in one call (counted as one read).
    fn read_many<'a>(&'a self, reads: &'a [(KeyId, ScopeHashes)], _max_age: Duration) -> TierFuture<'a, Vec<TierRead>> {
        Box::pin(async move {
            self.enter().await?;
            self.state.reads.fetch_add(1, Ordering::SeqCst);
            let mut store = self.store();
            Ok(reads.iter().map(|(key_id, scopes)| self.read_now(&mut store, key_id, scopes)).collect())
        })
    }

    fn write<'a>(&'a self, batch: &'a [TierWrite]) -> TierFuture<'a, ()> {
        Box::pin(async move {
            self.enter().await?;
            self.state.writes.fetch_add(1, Ordering::SeqCst);
            if self.state.lose_writes.load(Ordering::SeqCst) {
                return Ok(());
            }
            let mut store = self.store();
            for w in batch {
                store.entries.insert(*w.key_id(), (w.value().to_vec(), Instant::now() + w.remaining()));
            }
            Ok(())
        })
    }

    fn bump(&self, target: EpochTarget, floor: u64, _retention: Duration) -> TierFuture<'_, u64> {
        Box::pin(async move {
            self.enter().await?;
            self.epochs_refused()?;
            self.state.bumps.fetch_add(1, Ordering::SeqCst);
            let value = {
                let mut store = self.store();
                let high = store.high_water;
                let slot = store.epochs.entry(tag_of(target)).or_insert(0);
                *slot = slot.saturating_add(1).max(floor).max(high.saturating_add(1)).min(i64::MAX as u64);
                let value = *slot;
                store.high_water = store.high_water.max(value);
                value
            };
            self.publish(Notice::Epoch { target, value });
            Ok(value)
        })
    }

    fn raise(&self, target: EpochTarget, value: u64, _retention: Duration) -> TierFuture<'_, ()> {
        Box::pin(async move {
            self.enter().await?;
            self.epochs_refused()?;
            self.state.raises.fetch_add(1, Ordering::SeqCst);
            {
                let mut store = self.store();
                let slot = store.epochs.entry(tag_of(target)).or_insert(0);
                *slot = (*slot).max(value);
                store.high_water = store.high_water.max(value);
            }
            self.publish(Notice::Epoch { target, value });
            Ok(())
        })
    }

    fn high_water(&self) -> TierFuture<'_, Option<u64>> {
        Box::pin(async move {
            self.enter().await?;
            Ok(Some(self.store().high_water))
        })
    }

    fn transport(&self) -> Option<&dyn Transport> {
        Some(self)
    }
}

impl Transport for MemoryShared {
    fn subscribe(&self) -> TierFuture<'_, Box<dyn Subscription>> {
        Box::pin(async move {
            self.enter().await?;
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            self.state.subscribers.lock().unwrap_or_else(|e| e.into_inner()).push(tx);
            Ok(Box::new(MemorySubscription(rx)) as Box<dyn Subscription>)
        })
    }

    fn heartbeat<'a>(&'a self, _instance: &'a str) -> TierFuture<'a, ()> {
        Box::pin(async move {
            self.enter().await?;
            self.publish(Notice::Heartbeat);
            Ok(())
        })
    }
}

struct MemorySubscription(tokio::sync::mpsc::UnboundedReceiver<Notice>);

impl Subscription for MemorySubscription {
    fn next(&mut self) -> NoticeFuture<'_> {
        Box::pin(async move { self.0.recv().await.map(Ok) })
    }
}
