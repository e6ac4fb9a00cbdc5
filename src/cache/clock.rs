//! Wall-clock time in milliseconds, replaceable in tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch. Deadlines are wall-clock so that they mean the same in
/// every process sharing L2/L3.
#[derive(Clone, Debug, Default)]
pub(crate) enum Clock {
    #[default]
    System,
    #[cfg_attr(not(test), allow(dead_code))]
    Manual(Arc<AtomicU64>),
}

impl Clock {
    #[cfg(test)]
    pub(crate) fn manual() -> Self {
        Clock::Manual(Arc::new(AtomicU64::new(1_700_000_000_000)))
    }

    #[cfg(test)]
    pub(crate) fn advance(&self, by: Duration) {
        if let Clock::Manual(t) = self {
            t.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
        }
    }

    pub(crate) fn now_ms(&self) -> u64 {
        match self {
            Clock::System => SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
            Clock::Manual(t) => t.load(Ordering::SeqCst),
        }
    }
}

pub(crate) fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
