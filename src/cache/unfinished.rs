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
//! | start | the authority's bump | owed to the authority, bumped here |
//! | authority owed | the fallback bump in a shallower tier | bumped here |
//! | assigned | the raise of mirror `i` (and the ones after it) | raises owed to mirrors `i..` (the value is already settled here) |
//! | done | recording a mirror debt durably | nothing more (owed in this process) |
//!
//! "Bumped here" is a local-only bump (see `epoch.rs`): the shared value stays what the stores
//! say, so the debt, paid with a floor above everything seen here, still raises it everywhere.
//!
//! A store that did record the dropped bump is bumped once more when the debt is paid: epochs only
//! rise, so the extra bump can only turn entries into misses.

use super::debts::Owed;
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
    AuthorityOwed,
    /// The authority assigned the value; mirrors from this index on are not raised yet.
    Assigned(u64, usize),
    Done,
}

impl<'a> Unfinished<'a> {
    /// Armed: dropped from now on, `target` is bumped here and owed to the authority.
    pub(super) fn new(inner: &'a Inner, target: Target) -> Self {
        Self { inner, target, stage: Stage::Start }
    }

    /// The authority failed and was owed the bump; a fallback in a shallower tier is next.
    pub(super) fn authority_owed(&mut self) {
        self.stage = Stage::AuthorityOwed;
    }

    /// The authority assigned `value`, settled here; mirror `next` is raised next.
    pub(super) fn assigned(&mut self, value: u64, next: usize) {
        self.stage = Stage::Assigned(value, next);
    }

    /// The bump completed (or failed) the ordinary way: nothing left to do on drop.
    pub(super) fn finish(mut self) {
        self.stage = Stage::Done;
    }
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        let inner = self.inner;
        let mut owed = false;
        match self.stage {
            Stage::Done => return,
            Stage::Assigned(value, next) => {
                for mirror in next..inner.tiers.len().saturating_sub(1) {
                    inner.owe(mirror, self.target, Owed::Raise(value));
                    owed = true;
                }
            }
            Stage::AuthorityOwed => inner.epochs.bump_local_only(self.target),
            Stage::Start => {
                if let Some(authority) = inner.tiers.len().checked_sub(1) {
                    inner.owe(authority, self.target, Owed::Bump);
                    owed = true;
                    inner.epochs.bump_local_only(self.target);
                } else {
                    inner.epochs.bump_target(self.target);
                }
            }
        }
        tracing::warn!(target: "authz_cache::audit", owed, "invalidation dropped before it completed: applied here");
    }
}
