//! [`CheckError`]: no decision could be obtained.

use std::fmt;
use std::sync::Arc;

use crate::BoxError;

/// No decision could be obtained. The layer answers 503; callers of
/// [`AuthzCache::check`](crate::AuthzCache::check) must treat it as "not allowed".
#[derive(Clone)]
pub struct CheckError {
    kind: CheckErrorKind,
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

/// What kind of [`CheckError`] this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CheckErrorKind {
    /// The authorizer returned an error.
    Authorizer,
    /// The authorizer did not answer within its timeout.
    Timeout,
    /// The authorizer panicked.
    Panicked,
    /// Invalidations kept landing while the decision was computed: at least three times, and
    /// for longer than the authorizer timeout (or sixteen times).
    Unstable,
    /// The check required a [`ConsistencyToken`](crate::consistency::ConsistencyToken) that was
    /// refused (see [`TokenError`](crate::consistency::TokenError), its source).
    Token,
}

impl CheckError {
    pub(crate) fn new(kind: CheckErrorKind, source: Option<BoxError>) -> Self {
        Self { kind, source: source.map(Arc::from) }
    }

    pub(crate) fn token(e: crate::consistency::TokenError) -> Self {
        Self::new(CheckErrorKind::Token, Some(Box::new(e)))
    }

    /// The kind of failure.
    pub fn kind(&self) -> CheckErrorKind {
        self.kind
    }

    /// The authorizer did not answer in time.
    pub fn is_timeout(&self) -> bool {
        self.kind == CheckErrorKind::Timeout
    }
}

impl fmt::Debug for CheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckError").field("kind", &self.kind).field("source", &self.source).finish()
    }
}

impl fmt::Display for CheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.kind {
            CheckErrorKind::Authorizer => "authorizer failed",
            CheckErrorKind::Timeout => "authorizer timed out",
            CheckErrorKind::Panicked => "authorizer panicked",
            CheckErrorKind::Unstable => "decision invalidated while computed, repeatedly",
            CheckErrorKind::Token => "consistency token refused",
        })
    }
}

impl std::error::Error for CheckError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}
