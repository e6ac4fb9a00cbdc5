//! The authorizer's answer: [`Decision`].
//!
//! ```
//! use std::time::Duration;
//! use tower_authz_cache::Decision;
//!
//! let d = Decision::deny().with_reason("not a member").with_ttl(Duration::from_secs(5));
//! assert!(!d.is_allowed());
//! assert_eq!(d.reason(), Some("not a member"));
//! assert_eq!(d.ttl_hint(), Some(Duration::from_secs(5)));
//! ```

use std::sync::Arc;
use std::time::Duration;

/// Allow or deny, with an optional reason and an optional ttl hint.
///
/// The hint can only shorten how long the decision is cached: the cache keeps it for
/// `min(configured ttl, hint)`.
///
/// A decision the cache returns also says where it came from ([`source`](Decision::source)) and
/// how old it is ([`age`](Decision::age)). Equality compares the answer (allow, reason, hint),
/// not where it came from.
#[derive(Debug, Clone)]
pub struct Decision {
    allowed: bool,
    reason: Option<Arc<str>>,
    ttl: Option<Duration>,
    source: DecisionSource,
    /// Wall-clock ms since the Unix epoch when the authorizer answered (0: unknown).
    computed_at_ms: u64,
}

impl PartialEq for Decision {
    fn eq(&self, other: &Self) -> bool {
        self.allowed == other.allowed && self.reason == other.reason && self.ttl == other.ttl
    }
}

impl Eq for Decision {}

/// Where a [`Decision`] came from.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use tower_authz_cache::{AuthzCache, Decision, DecisionSource, Permission, Principal};
///
/// let cache = AuthzCache::builder(|_: Principal, _: Permission| async {
///     Ok::<_, std::convert::Infallible>(Decision::allow())
/// })
/// .build();
/// let (bob, read) = (Principal::new("bob"), Permission::new("documents:1", "read"));
/// assert_eq!(cache.check(&bob, &read).await.unwrap().source(), DecisionSource::Authorizer);
/// let again = cache.check(&bob, &read).await.unwrap();
/// assert_eq!(again.source(), DecisionSource::L1);
/// assert!(again.age().unwrap() < std::time::Duration::from_secs(60));
/// # });
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DecisionSource {
    /// The authorizer answered this request's check (also what a decision built by hand says).
    Authorizer,
    /// Another request's authorizer call for the same key answered it (single flight).
    Joined,
    /// The in-process tier.
    L1,
    /// A shared tier, by its level name (`"l2"`, `"l3"`, ...).
    Tier(&'static str),
    /// An L1 entry past its ttl, answered because the authorizer failed and the cache has a
    /// grace period ([`AuthzCacheBuilder::grace`](crate::AuthzCacheBuilder::grace)).
    Grace,
}

impl DecisionSource {
    /// A short name: `authorizer`, `joined`, `l1`, or the tier's level.
    pub fn as_str(&self) -> &'static str {
        match self {
            DecisionSource::Authorizer => "authorizer",
            DecisionSource::Joined => "joined",
            DecisionSource::L1 => "l1",
            DecisionSource::Tier(level) => level,
            DecisionSource::Grace => "grace",
        }
    }

    /// Whether a cache tier answered (no authorizer call was waited for).
    pub fn is_hit(&self) -> bool {
        matches!(self, DecisionSource::L1 | DecisionSource::Tier(_))
    }
}

impl std::fmt::Display for DecisionSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Decision {
    /// The caller may proceed.
    pub fn allow() -> Self {
        Self { allowed: true, reason: None, ttl: None, source: DecisionSource::Authorizer, computed_at_ms: 0 }
    }

    /// The caller may not proceed (403).
    pub fn deny() -> Self {
        Self { allowed: false, reason: None, ttl: None, source: DecisionSource::Authorizer, computed_at_ms: 0 }
    }

    /// Allow when `allowed` is true, deny otherwise.
    pub fn from_bool(allowed: bool) -> Self {
        if allowed { Self::allow() } else { Self::deny() }
    }

    /// Attaches a short reason. A deny's reason is sent to the client in the 403 body, so keep
    /// it free of secrets.
    #[must_use]
    pub fn with_reason(mut self, reason: impl Into<Arc<str>>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// Caps how long this decision may be cached.
    #[must_use]
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Whether this is an allow.
    pub fn is_allowed(&self) -> bool {
        self.allowed
    }

    /// The reason, if any.
    pub fn reason(&self) -> Option<&str> {
        self.reason.as_deref()
    }

    /// The authorizer's ttl hint, if any.
    pub fn ttl_hint(&self) -> Option<Duration> {
        self.ttl
    }

    /// Where this decision came from (see [`DecisionSource`]).
    pub fn source(&self) -> DecisionSource {
        self.source
    }

    /// How long ago the authorizer made this decision, by this machine's wall clock: `None` for
    /// a decision that did not come through a cache, or from a shared entry written by a
    /// version that did not record it. Computed by another instance, it is subject to the
    /// difference between the two clocks (a negative age reads as zero).
    pub fn age(&self) -> Option<Duration> {
        (self.computed_at_ms != 0).then(|| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            Duration::from_millis(now.saturating_sub(self.computed_at_ms))
        })
    }

    /// When the authorizer made it, in wall-clock ms since the Unix epoch (0: unknown).
    pub(crate) fn computed_at_ms(&self) -> u64 {
        self.computed_at_ms
    }

    /// The same decision, as coming from `source`, made at `computed_at_ms`.
    pub(crate) fn served_from(mut self, source: DecisionSource, computed_at_ms: u64) -> Self {
        self.source = source;
        self.computed_at_ms = computed_at_ms;
        self
    }
}
