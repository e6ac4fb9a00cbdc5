//! What an invalidation dropped midway still applies (cancellation safety: a future dropped at any
//! await leaves no state half-taken).
//!
//! An invalidation awaits the shared stores before this process's epochs move: the value a store
//! assigns is the one every instance agrees on. A caller's timeout or a client going away can drop
//! it at one of those awaits; the store may or may not have recorded the bump, and without more,
//! this process would go on serving what the invalidation covers, and the store be owed nothing.
//!
//! [`Unfinished`] is armed before the first await of a bump and moved along at each stage. Dropped
//! before [`finish`](Unfinished::finish), it applies what a failure at that stage applies, all of
//! it synchronous (an epoch bump, an entry in the ledger of owed bumps):
//!
//! | stage | in flight | on drop |
//! |---|---|---|
//! | start | the first store's bump | owed to the store that keeps the epochs, bumped here |
//! | Postgres owed | the fallback bump in Redis | bumped here |
//! | assigned | the mirror to Redis | owed to Redis (the value is already settled here) |
//! | mirror owed | recording the mirror debt in Postgres | nothing more (owed in this process) |
//!
//! "Bumped here" is a local-only bump (see `epoch.rs`): the shared value stays what the stores
//! say, so the debt, paid with a floor above everything seen here, still raises it everywhere.
//!
//! A store that did record the dropped bump is bumped once more when the debt is paid: epochs only
//! rise, so the extra bump can only turn entries into misses.

use super::{Inner, Target};

/// See the module docs.
pub(super) struct Unfinished<'a> {
    inner: &'a Inner,
    target: Target,
    stage: Stage,
}

#[derive(Clone, Copy)]
enum Stage {
    Start,
    #[cfg(feature = "postgres")]
    PgOwed,
    #[cfg(feature = "postgres")]
    Assigned(u64),
    Done,
}

impl<'a> Unfinished<'a> {
    /// Armed: dropped from now on, `target` is bumped here and owed to the store keeping epochs.
    pub(super) fn new(inner: &'a Inner, target: Target) -> Self {
        Self { inner, target, stage: Stage::Start }
    }

    /// Postgres failed and was owed the bump; the Redis fallback is next.
    #[cfg(feature = "postgres")]
    pub(super) fn pg_owed(&mut self) {
        self.stage = Stage::PgOwed;
    }

    /// Postgres assigned `value`, settled here; the mirror to Redis is next.
    #[cfg(feature = "postgres")]
    pub(super) fn assigned(&mut self, value: u64) {
        self.stage = Stage::Assigned(value);
    }

    /// The mirror failed and is owed in this process; recording it in Postgres is next.
    #[cfg(all(feature = "postgres", feature = "redis"))]
    pub(super) fn mirror_owed(&mut self) {
        self.stage = Stage::Done;
    }

    /// The bump completed (or failed) the ordinary way: nothing left to do on drop.
    pub(super) fn finish(mut self) {
        self.stage = Stage::Done;
    }
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        let inner = self.inner;
        #[cfg_attr(not(any(feature = "redis", feature = "postgres")), allow(unused_mut))]
        let mut owed = false;
        match self.stage {
            Stage::Done => return,
            #[cfg(feature = "postgres")]
            Stage::Assigned(value) => {
                #[cfg(feature = "redis")]
                if inner.l2.is_some() {
                    inner.owe_redis(self.target, super::Owed::Raise(value));
                    owed = true;
                }
                let _ = value;
            }
            #[cfg(feature = "postgres")]
            Stage::PgOwed => inner.epochs.bump_local_only(self.target),
            Stage::Start => {
                #[cfg(feature = "postgres")]
                if inner.l3.is_some() {
                    inner.owe_pg(self.target);
                    owed = true;
                }
                #[cfg(feature = "redis")]
                if inner.epochs_authority_is_redis() {
                    inner.owe_redis(self.target, super::Owed::Bump);
                    owed = true;
                }
                if inner.has_shared_tier() {
                    inner.epochs.bump_local_only(self.target);
                } else {
                    inner.epochs.bump_target(self.target);
                }
            }
        }
        tracing::warn!(target: "authz_cache::audit", owed, "invalidation dropped before it completed: applied here");
    }
}
