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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    allowed: bool,
    reason: Option<Arc<str>>,
    ttl: Option<Duration>,
}

impl Decision {
    /// The caller may proceed.
    pub fn allow() -> Self {
        Self { allowed: true, reason: None, ttl: None }
    }

    /// The caller may not proceed (403).
    pub fn deny() -> Self {
        Self { allowed: false, reason: None, ttl: None }
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
}
