//! Consistency tokens on the cache: checking one and raising this process's epoch to it (see
//! [`crate::consistency`]).

use std::sync::atomic::Ordering;

use super::AuthzCache;
use crate::consistency::{ConsistencyToken, MAX_AHEAD, TokenError, TokenErrorKind};
use crate::stats::Stats;
use crate::{Decision, Permission, Principal};

impl AuthzCache {
    /// Makes this process at least as fresh as `token`: every decision cached or being computed
    /// before the invalidation that issued it is a miss here from now on, whether or not the
    /// backplane has delivered that invalidation. Cheap when already as fresh (one read lock).
    ///
    /// Refused, with nothing changed: a token that does not verify under this cache's secret
    /// (or, during a secret rotation, under the other one), and one whose epoch lies more than
    /// [`MAX_AHEAD`] ahead of this process's clock and of every epoch it has seen.
    ///
    /// A token made under the other secret of a rotation names its scope by a hash this process
    /// cannot map to its own: the first such token of a higher epoch drops trust in all of L1
    /// (a local bump), once.
    pub fn require_fresh(&self, token: &ConsistencyToken) -> Result<(), TokenError> {
        let inner = &self.inner;
        let now_ms = inner.clock.now_ms();
        let current = token.verifies(&inner.keys);
        let other = !current && inner.rotation.as_ref().is_some_and(|r| now_ms < r.until_ms && token.verifies(&r.keys));
        if !current && !other {
            Stats::incr(&inner.stats.tokens_refused);
            tracing::warn!(target: "authz_cache::audit", "security: consistency token failed verification: refused");
            return Err(TokenError::new(TokenErrorKind::Unauthentic));
        }
        let ahead = u64::try_from(MAX_AHEAD.as_micros()).unwrap_or(u64::MAX);
        let limit = inner.clock.now_us().max(inner.epochs.highest_seen()).saturating_add(ahead);
        if token.epoch() > limit {
            Stats::incr(&inner.stats.tokens_refused);
            tracing::warn!(
                target: "authz_cache::audit",
                epoch = token.epoch(),
                limit,
                "consistency token from the future (a clock far ahead, or not from this fleet): refused"
            );
            return Err(TokenError::new(TokenErrorKind::FromTheFuture));
        }
        Stats::incr(&inner.stats.tokens_applied);
        if current {
            if inner.epochs.current_of(token.target()) < token.epoch() {
                inner.epochs.merge_target(token.target(), token.epoch());
            }
        } else {
            inner.epochs.merge_target(token.target(), token.epoch());
            if inner.foreign_token.fetch_max(token.epoch(), Ordering::AcqRel) < token.epoch() {
                inner.epochs.bump_local();
            }
        }
        Ok(())
    }

    /// [`check`](AuthzCache::check), after [`require_fresh`](AuthzCache::require_fresh): nothing
    /// computed before the invalidation that issued `token` is the answer. A refused token is
    /// an error of kind [`CheckErrorKind::Token`](crate::CheckErrorKind::Token) (the layer
    /// answers 400), never ignored.
    pub async fn check_at_least_as_fresh(
        &self,
        principal: &Principal,
        permission: &Permission,
        token: &ConsistencyToken,
    ) -> Result<Decision, super::CheckError> {
        self.require_fresh(token).map_err(super::CheckError::token)?;
        self.check(principal, permission).await
    }
}
