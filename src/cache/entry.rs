//! A cached decision with its deadline and the epochs it was computed under.

use std::sync::Arc;

use crate::Decision;
use crate::cache::epoch::EpochStamp;

/// A cached decision. `valid_until_ms` is fixed when the authorizer answered and is copied,
/// never extended, when an entry moves between tiers.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub(crate) allowed: bool,
    pub(crate) reason: Option<Arc<str>>,
    pub(crate) valid_until_ms: u64,
    pub(crate) stamp: EpochStamp,
}

impl Entry {
    pub(crate) fn new(decision: &Decision, valid_until_ms: u64, stamp: EpochStamp) -> Self {
        Self { allowed: decision.is_allowed(), reason: decision.reason().map(Arc::from), valid_until_ms, stamp }
    }

    pub(crate) fn decision(&self) -> Decision {
        let d = Decision::from_bool(self.allowed);
        match &self.reason {
            Some(r) => d.with_reason(r.clone()),
            None => d,
        }
    }

    /// Approximate heap bytes owned by the entry.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.reason.as_ref().map_or(0, |r| r.len() + 16)
    }
}
