//! [`AuthzCacheBuilder`]: settings, the secret, the tiers in order, and the wiring of what runs
//! for them (backplanes, write-behind queues, the change feed, the janitor).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::clock::{Clock, ms};
use super::epoch::Epochs;
use super::key::Keys;
use super::single_flight::SingleFlight;
use super::{AuthzCache, Inner, Rotation, Slot, debts, feed, tasks, warm, write_behind};
use crate::core::authorizer::DynAuthorizer;
use crate::stats::Stats;
use crate::tier::guarded::Guarded;
use crate::tier::local::{L1, LocalTier};
use crate::tier::memory::MemoryTier;
use crate::tier::shared::{SharedTier, Teammates};

/// Builds an [`AuthzCache`]. Defaults: L1 64 MiB, allow ttl 60 s, deny ttl 10 s, authorizer
/// timeout 5 s, max staleness 1 s, no shared tier.
#[must_use]
pub struct AuthzCacheBuilder {
    authorizer: Box<dyn DynAuthorizer>,
    l1_max_bytes: u64,
    allow_ttl: Duration,
    deny_ttl: Duration,
    authorizer_timeout: Duration,
    grace: Duration,
    refresh_ahead: f64,
    audit: Option<crate::consistency::AuditConfig>,
    clock: Clock,
    max_staleness: Duration,
    secret: Option<Vec<u8>>,
    rotation: Option<(Vec<u8>, std::time::SystemTime)>,
    /// Team-mate warming: rows per team-mate, and who the team-mates are.
    teammates: Option<(usize, Box<dyn Teammates>)>,
    /// A user's L1 instead of the default one.
    l1: Option<Box<dyn LocalTier>>,
    /// Shared tiers by level (2: L2, 3: L3, ...).
    tiers: Vec<(u8, Arc<dyn SharedTier>)>,
}

impl fmt::Debug for AuthzCacheBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthzCacheBuilder")
            .field("l1_max_bytes", &self.l1_max_bytes)
            .field("allow_ttl", &self.allow_ttl)
            .field("deny_ttl", &self.deny_ttl)
            .field("authorizer_timeout", &self.authorizer_timeout)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("tiers", &self.tiers.iter().map(|(level, _)| *level).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl AuthzCacheBuilder {
    pub(super) fn new(authorizer: Box<dyn DynAuthorizer>) -> Self {
        Self {
            authorizer,
            l1_max_bytes: 64 << 20,
            allow_ttl: Duration::from_secs(60),
            deny_ttl: Duration::from_secs(10),
            authorizer_timeout: Duration::from_secs(5),
            grace: Duration::ZERO,
            refresh_ahead: 0.0,
            audit: None,
            clock: Clock::System,
            max_staleness: Duration::from_secs(1),
            secret: None,
            rotation: None,
            l1: None,
            teammates: None,
            tiers: Vec::new(),
        }
    }

    /// The secret that keys the hashes, MACs and seals of everything the shared tiers store:
    /// every instance sharing a tier needs the same one (at least 16 bytes; 32 random bytes
    /// recommended). Without one, a random per-process secret is used: correct, but instances
    /// then share nothing. Given once, here, for every tier.
    pub fn secret(mut self, secret: impl AsRef<[u8]>) -> Self {
        self.secret = Some(secret.as_ref().to_vec());
        self
    }

    /// Bound of L1 in bytes (keys, entries and the cache's own per-entry overhead). Zero
    /// disables L1: every check goes to L2 or the authorizer.
    pub fn l1_max_bytes(mut self, bytes: u64) -> Self {
        self.l1_max_bytes = bytes;
        self
    }

    /// How long an allow is cached. The authorizer's hint can only shorten it.
    pub fn allow_ttl(mut self, ttl: Duration) -> Self {
        self.allow_ttl = ttl;
        self
    }

    /// How long a deny is cached (usually shorter than allows, so grants show up quickly).
    pub fn deny_ttl(mut self, ttl: Duration) -> Self {
        self.deny_ttl = ttl;
        self
    }

    /// How long one authorizer call may take before the check fails closed (503).
    pub fn authorizer_timeout(mut self, timeout: Duration) -> Self {
        self.authorizer_timeout = timeout;
        self
    }

    /// Opt-in grace during authorizer outages (default: none). When the authorizer errors or
    /// times out, an L1 entry whose ttl ended less than `grace` ago may still be answered
    /// (counted in `grace_answers`, audit-logged, shown by `health()`). Epochs still apply: an
    /// entry an invalidation ended is never answered, nor is any while L1 is not trusted (the
    /// backplane silent, the change feed behind); with nothing within grace the answer stays
    /// an error (503). The trade: during an outage, a permission revoked *without* an
    /// invalidation (a missed hook) can be served up to `ttl + grace` after it was computed,
    /// instead of `ttl`. Entries are kept in L1 (and epochs remembered) `grace` longer.
    ///
    /// ```
    /// use std::time::Duration;
    /// # use tower_authz_cache::{AuthzCache, Decision, Permission, Principal};
    /// # let authorizer = |_: Principal, _: Permission| async { Ok::<_, std::convert::Infallible>(Decision::allow()) };
    /// let cache = AuthzCache::builder(authorizer).allow_ttl(Duration::from_secs(60)).grace(Duration::from_secs(300)).build();
    /// # let _ = cache;
    /// ```
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Refresh-ahead for hot decisions (default: off). An L1 hit on an entry in the last
    /// `fraction` of its ttl (0.2: the last fifth) recomputes it in the background: one
    /// authorizer call per key (single flight), at most [`REFRESH_CONCURRENCY`] at once (more
    /// are skipped, not queued), under the same epoch rules as a miss (a refresh raced by an
    /// invalidation is thrown away). A key read at least once per `fraction × ttl` then never
    /// misses at its ttl boundary; the cost is at most one extra authorizer call per such key
    /// and ttl. The refreshed entry goes to L1 only (the shared tiers' epochs were not read).
    /// After a refresh's authorizer call fails, no refresh starts for a second. `fraction` is
    /// clamped to `0.0..=0.9`; 0 turns it off.
    ///
    /// [`REFRESH_CONCURRENCY`]: crate::REFRESH_CONCURRENCY
    pub fn refresh_ahead(mut self, fraction: f64) -> Self {
        self.refresh_ahead = if fraction.is_finite() { fraction.clamp(0.0, 0.9) } else { 0.0 };
        self
    }

    /// Turns on the consistency auditor (default: off): see
    /// [`AuditConfig`](crate::consistency::AuditConfig) for what it samples, its load cap and
    /// how long it takes to find a stale decision.
    pub fn audit(mut self, config: crate::consistency::AuditConfig) -> Self {
        self.audit = Some(config);
        self
    }

    /// With a backplane: how long this process may go without hearing it before it stops
    /// trusting L1 (default 1 s). Also the bound on how long another instance's invalidation
    /// can go unseen here when the backplane is cut.
    pub fn max_staleness(mut self, max_staleness: Duration) -> Self {
        self.max_staleness = max_staleness;
        self
    }

    /// The other secret of a secret rotation, honoured until `until` (a wall-clock instant,
    /// the same in every instance). Until then, a shared entry written under `secret` is still
    /// served after a miss under the tiers' own secret (its in-process copy is kept no later
    /// than `until`), and every invalidation is applied under both secrets; from `until` on,
    /// entries under `secret` are never read again, whatever the configuration still says.
    ///
    /// A rotation from OLD to NEW, with `T` at least one allow ttl after the last step starts:
    /// 1. every instance: tiers on OLD, `rotation_secret(NEW, T)` (invalidations now reach
    ///    entries under NEW before any is written);
    /// 2. every instance: tiers on NEW, `rotation_secret(OLD, T)` (writes under NEW; entries
    ///    under OLD are served until `T`);
    /// 3. after `T`: drop the rotation secret.
    ///
    /// An instance that knows only one of the two secrets must not run beside instances
    /// writing under the other one: its invalidations would not reach their entries.
    /// Has no effect without a shared tier. Configured from the environment by
    /// `AUTHZ_CACHE_ROTATION_SECRET` and `AUTHZ_CACHE_ROTATION_UNTIL` (see
    /// [`CacheConfig`](crate::CacheConfig)).
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use tower_authz_cache::{AuthzCache, Decision, Permission, Principal};
    ///
    /// let until = SystemTime::now() + Duration::from_secs(3600);
    /// let cache = AuthzCache::builder(|_: Principal, _: Permission| async {
    ///     Ok::<_, std::convert::Infallible>(Decision::allow())
    /// })
    /// .rotation_secret("the previous 32-byte secret......", until)
    /// .build();
    /// # drop(cache);
    /// ```
    pub fn rotation_secret(mut self, secret: impl AsRef<[u8]>, until: std::time::SystemTime) -> Self {
        self.rotation = Some((secret.as_ref().to_vec(), until));
        self
    }

    /// Your own in-process tier instead of the default (mini-moka with a per-thread front,
    /// bounded by [`l1_max_bytes`](Self::l1_max_bytes), which then has no effect); see
    /// [`LocalTier`].
    pub fn l1(mut self, tier: impl LocalTier) -> Self {
        self.l1 = Some(Box::new(tier));
        self
    }

    /// Team-mate warming: when a principal becomes active (its first check in this process within
    /// the allow ttl), load into L1, in the background, the `per_teammate` most-hit valid rows of
    /// each of its closest team-mates, as `source` names them (e.g. `PostgresRbacAuthorizer`,
    /// from the reference schema; or a closure). Needs a tier that warms (L3 on Postgres); 0 (the
    /// default) turns it off.
    pub fn warm_teammates(mut self, per_teammate: usize, source: impl Teammates) -> Self {
        self.teammates = Some((per_teammate, Box::new(source)));
        self
    }

    /// Adds L2: the first shared tier behind L1 (Redis, or any [`SharedTier`]).
    pub fn l2(self, tier: impl SharedTier) -> Self {
        self.at_level(2, Arc::new(tier))
    }

    /// Adds L3: the shared tier behind L2 (Postgres, or any [`SharedTier`]). With a change feed
    /// (Postgres's), it is the authority over the epochs and L2 mirrors it.
    pub fn l3(self, tier: impl SharedTier) -> Self {
        self.at_level(3, Arc::new(tier))
    }

    /// Adds a shared tier one level deeper than the deepest so far (L2 first). Tiers are read in
    /// order of level; the deepest is the authority over the epochs (it assigns their values;
    /// the others mirror them). Stats and health name the first two `l2` and `l3`.
    pub fn tier(self, tier: impl SharedTier) -> Self {
        let level = self.tiers.iter().map(|(l, _)| *l).max().map_or(2, |l| l.saturating_add(1));
        self.at_level(level, Arc::new(tier))
    }

    /// Adds a tier already shared with something else (e.g. the same in-process test tier in two
    /// caches), one level deeper than the deepest so far.
    pub fn tier_arc(self, tier: Arc<dyn SharedTier>) -> Self {
        let level = self.tiers.iter().map(|(l, _)| *l).max().map_or(2, |l| l.saturating_add(1));
        self.at_level(level, tier)
    }

    fn at_level(mut self, level: u8, tier: Arc<dyn SharedTier>) -> Self {
        self.tiers.retain(|(l, _)| *l != level);
        self.tiers.push((level, tier));
        self.tiers.sort_by_key(|(l, _)| *l);
        self
    }

    #[cfg(test)]
    pub(crate) fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Unstable, for the crate's own clock-skew tests (feature `internals`): this cache's wall
    /// clock runs `offset_ms` ahead of the system's (negative: behind).
    #[cfg(feature = "internals")]
    #[doc(hidden)]
    pub fn __wall_clock_offset(mut self, offset_ms: i64) -> Self {
        self.clock = Clock::offset(offset_ms);
        self
    }

    /// Builds the cache.
    ///
    /// # Panics
    ///
    /// With a shared tier, outside a Tokio runtime (its backplane and write-behind queue are
    /// tasks); and when [`try_build`](Self::try_build) fails (a secret shorter than 16 bytes).
    pub fn build(self) -> AuthzCache {
        match self.try_build() {
            Ok(cache) => cache,
            Err(e) => panic!("tower-authz-cache: {e}"),
        }
    }

    /// Builds the cache, or says why the configuration cannot work.
    ///
    /// # Errors
    ///
    /// A [`secret`](Self::secret) or rotation secret shorter than 16 bytes.
    pub fn try_build(self) -> Result<AuthzCache, BuildError> {
        for (what, secret) in
            [("secret", self.secret.as_ref()), ("rotation secret", self.rotation.as_ref().map(|r| &r.0))]
        {
            if secret.is_some_and(|s| s.len() < MIN_SECRET) {
                return Err(BuildError(format!("the {what} must be at least {MIN_SECRET} bytes")));
            }
        }
        let longest_ttl = self.allow_ttl.max(self.deny_ttl);
        // An L1 entry stamped before a bump expires at most `longest_ttl` after it entered L1
        // (monotonic, capped), which is at most `authorizer_timeout` after the stamp: past that,
        // the bump's scope can be forgotten here (see epoch.rs). A shared copy lands at most
        // `MAX_WRITE_DELAY` after it was computed. Shared stores keep epochs longer by
        // `SHARED_RETENTION_MARGIN`, on their own clocks: rows and keys they hold are judged by
        // the same clocks (Redis expiries, Postgres `written_at`), so writers' clocks only need
        // to agree within that margin for the write-behind delay, never for correctness of a read.
        // Grace keeps expired L1 entries answerable (on authorizer failure) `grace` longer: their
        // scopes' bumps are remembered as much longer.
        let forget_after_ms = ms(longest_ttl)
            .saturating_add(ms(self.grace))
            .saturating_add(ms(self.authorizer_timeout))
            .saturating_add(ms(write_behind::MAX_WRITE_DELAY))
            .saturating_add(1000);
        let shared_retention_ms = forget_after_ms.saturating_add(ms(SHARED_RETENTION_MARGIN));
        let keys = match (&self.secret, self.tiers.is_empty()) {
            (Some(secret), _) => {
                let keys = Keys::derive(secret);
                keys.use_for_logs();
                keys
            }
            (None, true) => Keys::random(),
            (None, false) => {
                tracing::warn!(
                    target: "authz_cache::audit",
                    "shared tiers without a secret: a random per-process secret keys them, so instances share nothing"
                );
                Keys::random()
            }
        };
        let rotation = self.rotation.map(|(secret, until)| Rotation {
            keys: Keys::derive(&secret),
            until_ms: until.duration_since(std::time::UNIX_EPOCH).map_or(0, ms),
        });
        let epochs = Arc::new(Epochs::new(keys.clone(), forget_after_ms, self.clock.clone()));
        let stats = Arc::new(Stats::new());
        let authority = self.tiers.len().checked_sub(1);
        let feed = authority
            .filter(|&a| self.tiers[a].1.change_feed().is_some())
            .map(|_| Arc::new(feed::FeedState::new(self.max_staleness)));
        let mut tiers = Vec::with_capacity(self.tiers.len());
        for (i, (level, tier)) in self.tiers.into_iter().enumerate() {
            let (name, counters) = match level {
                2 => ("l2", stats.l2.clone()),
                3 => ("l3", stats.l3.clone()),
                n => (level_name(n), Arc::default()),
            };
            let guarded = Arc::new(Guarded::new(name, tier, counters));
            let backplane = guarded.tier.transport().is_some().then(|| {
                crate::invalidation::backplane::start(
                    crate::invalidation::backplane::Source {
                        tier: guarded.clone(),
                        authority: Some(i) == authority,
                        feed: feed.clone(),
                    },
                    epochs.clone(),
                    self.max_staleness,
                )
            });
            tiers.push(Slot {
                writes: write_behind::spawn(guarded.clone(), self.clock.clone()),
                tier: guarded,
                backplane,
            });
        }
        let primary = tiers.iter().position(|slot| slot.backplane.is_some());
        if primary.is_none() && !tiers.is_empty() {
            tracing::warn!(
                target: "authz_cache::audit",
                "no shared tier has a transport: other instances' invalidations reach this L1 only at ttl"
            );
        }
        let warming = warm::Teammates::new(&tiers, self.teammates, longest_ttl);
        let (sampler, samples) = match &self.audit {
            Some(config) => {
                let (sampler, rx) = super::auditor::Sampler::new(config);
                (Some(sampler), Some(rx))
            }
            None => (None, None),
        };
        let inner = Arc::new(Inner {
            l1: match self.l1 {
                Some(custom) => L1::Custom(custom),
                None => L1::Moka(MemoryTier::new(
                    self.l1_max_bytes,
                    longest_ttl.saturating_add(self.grace).max(Duration::from_millis(1)),
                )),
            },
            epochs,
            keys,
            rotation,
            flights: SingleFlight::new(),
            authorizer: self.authorizer,
            stats,
            clock: self.clock,
            allow_ttl_ms: ms(self.allow_ttl),
            deny_ttl_ms: ms(self.deny_ttl),
            longest_ttl_ms: ms(longest_ttl),
            shared_retention_ms,
            authorizer_timeout: self.authorizer_timeout,
            grace_ms: ms(self.grace),
            refresh_ahead: self.refresh_ahead,
            refreshes: Arc::new(tokio::sync::Semaphore::new(super::REFRESH_CONCURRENCY)),
            refresh_paused_until_ms: std::sync::atomic::AtomicU64::new(0),
            auditor: sampler,
            pending: std::sync::Mutex::new(debts::Pending::new(tiers.len())),
            tiers,
            primary,
            feed,
            warming,
            foreign_token: std::sync::atomic::AtomicU64::new(0),
            tasks: tasks::Tasks::default(),
        });
        tasks::start(&inner);
        if let (Some(config), Some(rx)) = (self.audit, samples) {
            let task = tokio::spawn(super::auditor::run(Arc::downgrade(&inner), rx, config));
            inner.tasks.push(task);
        }
        Ok(AuthzCache { inner })
    }
}

/// The name of a level past L3 in logs (stats and health show L2 and L3).
fn level_name(level: u8) -> &'static str {
    match level {
        0..=2 => "l2",
        3 => "l3",
        4 => "l4",
        5 => "l5",
        _ => "l6+",
    }
}

/// The shortest secret the cache accepts.
const MIN_SECRET: usize = 16;

/// How much longer than this process's own retention shared stores keep an epoch (see
/// [`AuthzCacheBuilder::try_build`]).
const SHARED_RETENTION_MARGIN: Duration = Duration::from_secs(5);

/// The configuration cannot work (see [`AuthzCacheBuilder::try_build`]).
#[derive(Debug, Clone)]
pub struct BuildError(String);

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BuildError {}
