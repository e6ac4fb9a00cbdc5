//! The public trait behind every shared tier, [`SharedTier`], and its capabilities; the
//! overview and an example are the [`tier`](crate::tier) module's docs.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::cache::epoch::Target;
use crate::cache::key::Scope;

/// The 32-byte key id an entry is stored under (a keyed hash of principal, resource, action).
pub type KeyId = [u8; 32];

/// What every [`SharedTier`] call returns: a boxed, `Send` future (the trait is object-safe, so
/// the cache holds tiers as `dyn SharedTier`; one allocation per remote call is noise next to a
/// network round trip, and the L1 hit path never calls a shared tier).
pub type TierFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, TierError>> + Send + 'a>>;

/// A shared tier: see the [`tier`](crate::tier) module docs for the model and an example.
///
/// Every method may be cancelled at any await (the guard's timeout drops the future): an
/// implementation must leave its store consistent when that happens (a connection in the middle
/// of a command is discarded, not reused). Epoch values only ever rise: `bump` and `raise` must
/// never store a value below the one stored, and values are at most `i64::MAX`.
pub trait SharedTier: Send + Sync + 'static {
    /// Timeouts, breaker and write-behind settings the cache applies to this tier.
    fn settings(&self) -> TierSettings {
        TierSettings::default()
    }

    /// The entry under `key_id` (if any) and the four epochs covering it: global, principal
    /// (`scopes.principal`), resource, entry; 0 for an epoch the store does not hold. Pass
    /// `None` as the epochs when one of them cannot be read (the cache then trusts nothing from
    /// this read). An entry the store has held for longer than `max_age` (by its own clock) may
    /// be returned as absent; a tier that keeps deadlines of its own (Redis `PX`) can ignore it.
    fn read<'a>(&'a self, key_id: &'a KeyId, scopes: &'a ScopeHashes, max_age: Duration) -> TierFuture<'a, TierRead>;

    /// Several [`read`](Self::read)s, answered in order, one [`TierRead`] per request (the
    /// cache's batch checks use it: [`AuthzCache::check_many`](crate::AuthzCache::check_many)).
    /// The default runs the reads concurrently, which costs one round trip of latency on a
    /// multiplexed client; a store that can should answer the whole batch in one round trip
    /// (Redis: one `MGET`; Postgres: one statement). An answer of another length is a failed
    /// call.
    fn read_many<'a>(&'a self, reads: &'a [(KeyId, ScopeHashes)], max_age: Duration) -> TierFuture<'a, Vec<TierRead>> {
        Box::pin(async move {
            let all = futures_util::future::join_all(reads.iter().map(|(id, scopes)| self.read(id, scopes, max_age)));
            all.await.into_iter().collect()
        })
    }

    /// Stores a batch of entries, each until its deadline (at most
    /// [`TierSettings::write_batch`] of them; later ones of a key replace earlier ones).
    fn write<'a>(&'a self, batch: &'a [TierWrite]) -> TierFuture<'a, ()>;

    /// Bumps an epoch where it is stored, to `max(stored + 1, floor)` (and above every value
    /// this store ever assigned, if it can), publishes it on the [`Transport`] if the tier has
    /// one, and returns the value stored. `retention`: how long the store must keep the epoch
    /// after its last bump (the global one forever).
    fn bump(&self, target: EpochTarget, floor: u64, retention: Duration) -> TierFuture<'_, u64>;

    /// Raises an epoch to `value` (assigned by a deeper tier), never lowering it, and
    /// publishes it like [`bump`](Self::bump).
    fn raise(&self, target: EpochTarget, value: u64, retention: Duration) -> TierFuture<'_, ()>;

    /// The highest epoch value this store ever assigned, if it tracks one. When this tier is the
    /// authority, the cache compares it with the highest it saw before: a lower one means the
    /// store lost its epochs (a restart without persistence, a flush), and the cache then
    /// forgets every shared value it holds. Also returned with reads ([`TierRead::with_high_water`]).
    fn high_water(&self) -> TierFuture<'_, Option<u64>> {
        Box::pin(async { Ok(None) })
    }

    /// The invalidation backplane, if the store has one.
    fn transport(&self) -> Option<&dyn Transport> {
        None
    }

    /// A durable record of changes to the source of truth, if the store keeps one.
    fn change_feed(&self) -> Option<&dyn ChangeFeed> {
        None
    }

    /// The most-hit rows, for warming, if the store counts them.
    fn warm_source(&self) -> Option<&dyn WarmSource> {
        None
    }

    /// A read of this tier was a valid hit on `key_id` (for hit counters; must not block).
    fn count_hit(&self, key_id: &KeyId) {
        let _ = key_id;
    }

    /// Background upkeep, called about every 250 ms off the request path (sweeps, flushing
    /// counters, configuration checks: the tier decides what is due). Returns how many expired
    /// items it removed.
    fn maintain(&self) -> TierFuture<'_, u64> {
        Box::pin(async { Ok(0) })
    }

    /// A warning for `health()`, if the store is configured in a way that weakens a guarantee.
    fn warning(&self) -> Option<&'static str> {
        None
    }

    /// The store's nodes as its last upkeep found them, for `health()` (a clustered store;
    /// empty, the default, for one that is a single server).
    fn nodes(&self) -> Vec<crate::health::NodeHealth> {
        Vec::new()
    }
}

/// Why a tier call failed. Its text reaches logs: never put a key, a value or a password in it.
#[derive(Debug, Clone)]
pub struct TierError {
    message: String,
}

impl TierError {
    /// An error with this text.
    pub fn new(message: impl fmt::Display) -> Self {
        Self { message: message.to_string() }
    }
}

impl fmt::Display for TierError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for TierError {}

/// What one [`SharedTier::read`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierRead {
    pub(crate) value: Option<Vec<u8>>,
    pub(crate) epochs: Option<[u64; 4]>,
    pub(crate) high_water: Option<u64>,
    pub(crate) pending_changes: bool,
}

impl TierRead {
    /// The entry's bytes, if stored, and the epochs covering it (global, principal, resource,
    /// entry; `None` when one could not be read).
    pub fn new(value: Option<Vec<u8>>, epochs: Option<[u64; 4]>) -> Self {
        Self { value, epochs, high_water: None, pending_changes: false }
    }

    /// The store's epoch high water, read in the same round trip (see
    /// [`SharedTier::high_water`]).
    pub fn with_high_water(mut self, high_water: u64) -> Self {
        self.high_water = Some(high_water);
        self
    }

    /// A change to the source of truth is recorded and not applied to the epochs yet (see
    /// [`ChangeFeed`]): nothing read now can be vouched for. The cache has the feed catch up,
    /// then reads again.
    pub fn with_pending_changes(mut self) -> Self {
        self.pending_changes = true;
        self
    }
}

/// One entry to store (see [`SharedTier::write`]).
#[derive(Debug, Clone)]
pub struct TierWrite {
    pub(crate) key_id: KeyId,
    pub(crate) value: Vec<u8>,
    pub(crate) valid_until_ms: u64,
    pub(crate) principal_hash: u64,
    pub(crate) subject: Option<Vec<u8>>,
    pub(crate) queued_at: std::time::Instant,
    /// Set by the writer just before the write, on the cache's clock.
    pub(crate) remaining_ms: u64,
}

impl TierWrite {
    /// The key id.
    pub fn key_id(&self) -> &KeyId {
        &self.key_id
    }

    /// The sealed, authenticated entry.
    pub fn value(&self) -> &[u8] {
        &self.value
    }

    /// The entry's deadline, in milliseconds since the Unix epoch (the writer's clock): the
    /// store may drop it from then on.
    pub fn valid_until_ms(&self) -> u64 {
        self.valid_until_ms
    }

    /// How long the entry stays valid from the moment of the write, on the cache's clock (a
    /// store that expires keys itself, like Redis's `PX`, uses this rather than the deadline).
    pub fn remaining(&self) -> Duration {
        Duration::from_millis(self.remaining_ms)
    }

    /// The keyed hash of the principal (the same as [`ScopeHashes::principal`]), for stores that
    /// index entries by principal.
    pub fn principal_hash(&self) -> u64 {
        self.principal_hash
    }

    /// The (principal, resource, action) tuple sealed under the secret, for stores that warm
    /// (`Some` only when [`TierSettings::stores_subjects`] is set).
    pub fn subject(&self) -> Option<&[u8]> {
        self.subject.as_deref()
    }
}

/// The keyed scope hashes of one key: what its principal, resource and entry epochs are stored
/// under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ScopeHashes {
    /// The principal's.
    pub principal: u64,
    /// The resource's.
    pub resource: u64,
    /// The (principal, resource, action) entry's.
    pub entry: u64,
}

impl ScopeHashes {
    pub(crate) fn new(principal: u64, resource: u64, entry: u64) -> Self {
        Self { principal, resource, entry }
    }
}

/// The epoch a bump or raise names: the global one, or one scope's (by keyed hash).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct EpochTarget(pub(crate) Target);

impl EpochTarget {
    /// The global epoch.
    pub const GLOBAL: EpochTarget = EpochTarget(None);

    /// The scope's tag: `g` (global), `p` (principal), `r` (resource), `k` (entry).
    pub fn tag(&self) -> &'static str {
        self.0.map_or("g", |(scope, _)| scope.tag())
    }

    /// The scope's hash (0 for the global epoch).
    pub fn hash(&self) -> u64 {
        self.0.map_or(0, |(_, hash)| hash)
    }

    /// Whether this is the global epoch.
    pub fn is_global(&self) -> bool {
        self.0.is_none()
    }

    /// The target a tag and a hash name (as stored), if the tag is one of [`tag`](Self::tag)'s.
    pub fn from_tag(tag: &str, hash: u64) -> Option<Self> {
        match tag {
            "g" => Some(Self::GLOBAL),
            tag => Some(Self(Some((Scope::from_tag(tag)?, hash)))),
        }
    }
}

impl fmt::Debug for EpochTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EpochTarget({} {:016x})", self.tag(), self.hash())
    }
}

/// Settings the cache applies around a tier. Defaults: timeout 50 ms, breaker opens after 5
/// consecutive failures for 30 s, write queue 10,000 drained by 4 writers one entry at a time,
/// no subjects.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct TierSettings {
    /// How long one call may take before it counts as a failure.
    pub timeout: Duration,
    /// Consecutive failures that open the circuit breaker.
    pub failure_threshold: u32,
    /// How long the breaker stays open before one probe is let through.
    pub open_for: Duration,
    /// Capacity of the write-behind queue; when it is full, writes are dropped and counted.
    pub write_queue: usize,
    /// Concurrent writers draining the queue.
    pub writers: usize,
    /// Most entries per [`SharedTier::write`] call.
    pub write_batch: usize,
    /// How long a writer waits for more entries after the first of a batch.
    pub write_linger: Duration,
    /// Whether writes carry the sealed subject ([`TierWrite::subject`]), for warming.
    pub stores_subjects: bool,
}

impl Default for TierSettings {
    fn default() -> Self {
        Self {
            timeout: Duration::from_millis(50),
            failure_threshold: 5,
            open_for: Duration::from_secs(30),
            write_queue: 10_000,
            writers: 4,
            write_batch: 1,
            write_linger: Duration::ZERO,
            stores_subjects: false,
        }
    }
}

impl TierSettings {
    /// See [`TierSettings::timeout`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// See [`TierSettings::failure_threshold`] (at least 1).
    pub fn failure_threshold(mut self, failures: u32) -> Self {
        self.failure_threshold = failures.max(1);
        self
    }

    /// See [`TierSettings::open_for`].
    pub fn open_for(mut self, open_for: Duration) -> Self {
        self.open_for = open_for;
        self
    }

    /// See [`TierSettings::write_queue`] (at least 1).
    pub fn write_queue(mut self, capacity: usize) -> Self {
        self.write_queue = capacity.max(1);
        self
    }

    /// Writers, entries per write call and linger (writers and batch at least 1).
    pub fn writes(mut self, writers: usize, batch: usize, linger: Duration) -> Self {
        self.writers = writers.max(1);
        self.write_batch = batch.max(1);
        self.write_linger = linger;
        self
    }

    /// See [`TierSettings::stores_subjects`].
    pub fn stores_subjects(mut self, stores: bool) -> Self {
        self.stores_subjects = stores;
        self
    }
}

/// The guard setters every built-in tier's builder offers (`timeout`, `failure_threshold`,
/// `open_for`, `write_queue`), onto its `settings: TierSettings` field: one definition for the
/// Redis and Postgres builders. `$store` names the store in the docs.
#[cfg(any(feature = "redis", feature = "postgres"))]
macro_rules! guard_setters {
    ($store:literal) => {
        #[doc = concat!("How long one ", $store, " call may take (pool checkout included) before it counts as a failure.")]
        pub fn timeout(mut self, timeout: Duration) -> Self {
            self.settings = self.settings.timeout(timeout);
            self
        }

        /// Consecutive failures that open the circuit breaker.
        pub fn failure_threshold(mut self, failures: u32) -> Self {
            self.settings = self.settings.failure_threshold(failures);
            self
        }

        /// How long the breaker stays open before one probe is let through.
        pub fn open_for(mut self, duration: Duration) -> Self {
            self.settings = self.settings.open_for(duration);
            self
        }

        /// Capacity of the background write queue; when it is full, writes are dropped and counted.
        pub fn write_queue(mut self, capacity: usize) -> Self {
            self.settings = self.settings.write_queue(capacity);
            self
        }
    };
}
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) use guard_setters;

/// An invalidation backplane (see [`SharedTier::transport`]): what a store's bumps publish
/// reaches every subscribed instance.
///
/// The `max_staleness` bound rests on one property: **a subscription that delivers heartbeats
/// delivers every epoch notice published while it lived.** The cache trusts L1 only while it
/// hears something within `max_staleness`, and treats every new subscription as having missed
/// everything before it (L1 is dropped); so a transport may lose messages only by losing the
/// whole subscription (end it, or go silent). Heartbeats and notices must therefore travel the
/// same ordered path (one pub/sub connection, one LISTEN session, one poll of the store).
pub trait Transport: Send + Sync {
    /// A new subscription. The cache bounds the call with a timeout, holds the subscription until
    /// it fails or stays silent for longer than `max_staleness`, and subscribes again (with
    /// backoff). Messages published while no subscription existed are assumed lost.
    fn subscribe(&self) -> TierFuture<'_, Box<dyn Subscription>>;

    /// Publishes a heartbeat from `instance` to every subscriber (every `max_staleness / 5`).
    fn heartbeat<'a>(&'a self, instance: &'a str) -> TierFuture<'a, ()>;
}

/// What [`Subscription::next`] returns: the next notice, or `None` when the subscription ended.
pub type NoticeFuture<'a> = Pin<Box<dyn Future<Output = Option<Result<Notice, TierError>>> + Send + 'a>>;

/// A live subscription (see [`Transport::subscribe`]).
pub trait Subscription: Send {
    /// The next notice; `None` when the subscription ended (the cache subscribes again).
    fn next(&mut self) -> NoticeFuture<'_>;
}

/// One message on a backplane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Notice {
    /// An epoch now has (at least) this value.
    Epoch {
        /// Which epoch.
        target: EpochTarget,
        /// Its value.
        value: u64,
    },
    /// A heartbeat: the subscription works.
    Heartbeat,
    /// The source of truth changed: the [`ChangeFeed`] has something to apply.
    Changed,
    /// A message that did not parse (counted, ignored).
    Malformed,
}

impl Notice {
    /// Parses the wire format the built-in tiers publish: `i <tag> <hash, 16 hex> <value>` for
    /// an epoch, `h <instance>` for a heartbeat.
    pub fn parse(payload: &str) -> Notice {
        let mut parts = payload.split(' ');
        match (parts.next(), parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("h"), Some(_), None, None, None) => Notice::Heartbeat,
            (Some("i"), Some(tag), Some(hash), Some(value), None) => {
                match (u64::from_str_radix(hash, 16), value.parse::<u64>()) {
                    (Ok(hash), Ok(value)) => match EpochTarget::from_tag(tag, hash) {
                        Some(target) => Notice::Epoch { target, value },
                        None => Notice::Malformed,
                    },
                    _ => Notice::Malformed,
                }
            }
            _ => Notice::Malformed,
        }
    }

    /// The wire format of an epoch notice (see [`parse`](Self::parse)).
    pub fn epoch_payload(target: EpochTarget, value: u64) -> String {
        format!("i {} {:016x} {value}", target.tag(), target.hash())
    }

    /// The wire format of a heartbeat (see [`parse`](Self::parse)).
    pub fn heartbeat_payload(instance: &str) -> String {
        format!("h {instance}")
    }
}

/// A durable record of changes to the source of truth (see [`SharedTier::change_feed`]), applied
/// to the epochs by whichever instance gets to them first. The cache drives it (`cache/feed.rs`):
/// it polls [`backlog`](Self::backlog) every `max_staleness / 4` and at every [`Notice::Changed`],
/// drains, and trusts L1 and the shallower tiers only while a poll found nothing waiting within
/// `max_staleness`. Its calls run off the request path, under a longer timeout and no breaker.
pub trait ChangeFeed: Send + Sync {
    /// Whether changes, or mirror debts, wait.
    fn backlog(&self) -> TierFuture<'_, Backlog>;

    /// Applies a batch of waiting changes in one transaction: each change names a principal id
    /// (or nothing: everything changed); `targets` turns it into the epochs to bump (the cache
    /// holds the keys), each bumped once to at least `floor`, kept for `retention`; with
    /// `mirror`, the values are also recorded as mirror debts. Returns how many changes were
    /// applied and the values stored. Failed or dropped, nothing was applied.
    fn drain<'a>(
        &'a self,
        targets: &'a (dyn Fn(Option<&str>) -> Vec<EpochTarget> + Send + Sync),
        floor: u64,
        retention: Duration,
        mirror: bool,
    ) -> TierFuture<'a, Drained>;

    /// Epoch values the shallower tiers have not been raised to yet (any instance's).
    fn mirror_debts(&self) -> TierFuture<'_, Vec<(EpochTarget, u64)>>;

    /// Records that the shallower tiers must be raised to `value` for `target`.
    fn owe_mirror(&self, target: EpochTarget, value: u64) -> TierFuture<'_, ()>;

    /// Removes mirror debts now paid (at or below these values).
    fn paid_mirror<'a>(&'a self, paid: &'a [(EpochTarget, u64)]) -> TierFuture<'a, ()>;
}

/// What a [`ChangeFeed::backlog`] poll found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Backlog {
    /// Changes wait to be applied.
    pub changes: bool,
    /// Mirror debts wait to be paid.
    pub mirror: bool,
}

impl Backlog {
    /// A backlog.
    pub fn new(changes: bool, mirror: bool) -> Self {
        Self { changes, mirror }
    }
}

/// What one [`ChangeFeed::drain`] applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Drained {
    /// Changes applied (0: none waited, or others were applying them).
    pub changes: usize,
    /// The epoch values stored.
    pub values: Vec<(EpochTarget, u64)>,
}

impl Drained {
    /// A drain result.
    pub fn new(changes: usize, values: Vec<(EpochTarget, u64)>) -> Self {
        Self { changes, values }
    }
}

/// The most-hit rows of a tier that counts hits (see [`SharedTier::warm_source`]).
pub trait WarmSource: Send + Sync {
    /// The `limit` most-hit valid rows, of one principal (by [`ScopeHashes::principal`]) or of
    /// all; each with its key id and sealed subject ([`TierWrite::subject`]).
    fn most_hit(&self, principal_hash: Option<u64>, limit: usize) -> TierFuture<'_, Vec<(KeyId, Vec<u8>)>>;

    /// How many of the most-hit rows to load into L1 when a cache starts (0: none, the default).
    fn warm_on_start(&self) -> usize {
        0
    }
}

/// Who a principal works with, for team-mate warming (see
/// [`AuthzCacheBuilder::warm_teammates`](crate::AuthzCacheBuilder::warm_teammates)): when a
/// principal becomes active, the most-hit rows of its closest team-mates are loaded into L1.
/// `PostgresRbacAuthorizer` answers from the reference schema's `mv_team_collaboration_patterns`;
/// a closure `Fn(String, usize) -> impl Future<Output = Result<Vec<String>, E>>` works too.
///
/// ```
/// use tower_authz_cache::{AuthzCache, Decision, Permission, Principal};
///
/// let cache = AuthzCache::builder(|_: Principal, _: Permission| async {
///     Ok::<_, std::convert::Infallible>(Decision::allow())
/// })
/// .warm_teammates(10, |principal: String, limit: usize| async move {
///     let team = if principal == "bob" { vec!["carol".to_owned()] } else { Vec::new() };
///     Ok::<_, std::convert::Infallible>(team.into_iter().take(limit).collect::<Vec<_>>())
/// });
/// # drop(cache);
/// ```
pub trait Teammates: Send + Sync + 'static {
    /// At most `limit` principals closest to `principal`, closest first.
    fn teammates<'a>(&'a self, principal: &'a str, limit: usize) -> TierFuture<'a, Vec<String>>;
}

impl<F, Fut, E> Teammates for F
where
    F: Fn(String, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<String>, E>> + Send + 'static,
    E: fmt::Display,
{
    fn teammates<'a>(&'a self, principal: &'a str, limit: usize) -> TierFuture<'a, Vec<String>> {
        let answer = self(principal.to_owned(), limit);
        Box::pin(async move { answer.await.map_err(TierError::new) })
    }
}
