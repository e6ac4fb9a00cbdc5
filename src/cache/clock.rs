//! The cache's two clocks, replaceable in tests.
//!
//! - **Wall clock** ([`Clock::now_ms`], [`Clock::now_us`]): milliseconds since the Unix epoch.
//!   Only what must mean the same in every process uses it: the deadline inside a shared entry
//!   (the writer's clock) and the floor of a new epoch value. Nothing read from another process
//!   is trusted to agree with it: shared deadlines are capped at the reader's `now + longest ttl`
//!   and epochs only ever rise, whatever the clocks say (see `epoch.rs`).
//! - **Monotonic clock** ([`Clock::mono_ms`]): milliseconds since an arbitrary start, never
//!   jumping. Everything local uses it: L1 deadlines (the per-thread front included) and the
//!   retention of local epoch bookkeeping, so a wall clock stepped back by an hour (NTP, a VM
//!   resumed) neither keeps an L1 entry alive nor brings a forgotten epoch back.
//!
//! [`Clock::offset`] shifts the wall clock of one cache (the seam for the clock-skew tests: two
//! instances minutes apart); a manual clock drives both in unit tests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Clone, Debug, Default)]
pub(crate) enum Clock {
    #[default]
    System,
    /// The system clocks, with the wall clock shifted by this many milliseconds.
    #[cfg_attr(not(feature = "internals"), allow(dead_code))]
    Offset(i64),
    #[cfg_attr(not(test), allow(dead_code))]
    Manual(Arc<Manual>),
}

/// A clock the test moves: `wall` in ms since the Unix epoch, `mono` in ms since its start.
#[derive(Debug)]
pub(crate) struct Manual {
    wall: AtomicU64,
    mono: AtomicU64,
}

/// Milliseconds on this process's monotonic clock.
fn system_mono_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    u64::try_from(START.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn system_wall_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

impl Clock {
    #[cfg(test)]
    pub(crate) fn manual() -> Self {
        Clock::Manual(Arc::new(Manual { wall: AtomicU64::new(1_700_000_000_000), mono: AtomicU64::new(1_000_000) }))
    }

    /// The system clocks, with the wall clock `offset_ms` ahead (negative: behind).
    #[cfg_attr(not(feature = "internals"), allow(dead_code))]
    pub(crate) fn offset(offset_ms: i64) -> Self {
        Clock::Offset(offset_ms)
    }

    /// Moves a manual clock forward: both the wall and the monotonic clock.
    #[cfg(test)]
    pub(crate) fn advance(&self, by: Duration) {
        if let Clock::Manual(m) = self {
            m.wall.fetch_add(ms(by), Ordering::SeqCst);
            m.mono.fetch_add(ms(by), Ordering::SeqCst);
        }
    }

    /// Steps a manual wall clock by `by_ms` (either way), leaving the monotonic clock alone: what
    /// NTP or a resumed VM does.
    #[cfg(test)]
    pub(crate) fn step_wall(&self, by_ms: i64) {
        if let Clock::Manual(m) = self {
            let now = m.wall.load(Ordering::SeqCst);
            m.wall.store(now.saturating_add_signed(by_ms), Ordering::SeqCst);
        }
    }

    /// Wall-clock milliseconds since the Unix epoch.
    pub(crate) fn now_ms(&self) -> u64 {
        match self {
            Clock::Manual(m) => m.wall.load(Ordering::SeqCst),
            _ => self.now_us() / 1000,
        }
    }

    /// Wall-clock microseconds since the Unix epoch (the floor of new epoch values).
    pub(crate) fn now_us(&self) -> u64 {
        match self {
            Clock::System => system_wall_us(),
            Clock::Offset(offset_ms) => system_wall_us().saturating_add_signed(offset_ms.saturating_mul(1000)),
            Clock::Manual(m) => m.wall.load(Ordering::SeqCst).saturating_mul(1000),
        }
    }

    /// Monotonic milliseconds: local deadlines and retention only, never shared.
    pub(crate) fn mono_ms(&self) -> u64 {
        match self {
            Clock::Manual(m) => m.mono.load(Ordering::SeqCst),
            _ => system_mono_ms(),
        }
    }
}

pub(crate) fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offset_shifts_the_wall_clock_only() {
        let ahead = Clock::offset(300_000);
        let behind = Clock::offset(-300_000);
        let system = Clock::System;
        let (a, s, b) = (ahead.now_ms(), system.now_ms(), behind.now_ms());
        assert!(a >= s + 299_000 && a <= s + 301_000, "{a} vs {s}");
        assert!(b + 299_000 <= s && b + 301_000 >= s, "{b} vs {s}");
        assert!(ahead.mono_ms().abs_diff(behind.mono_ms()) < 1000, "one monotonic clock");
    }

    #[test]
    fn a_wall_step_leaves_the_monotonic_clock_alone() {
        let c = Clock::manual();
        let (w, m) = (c.now_ms(), c.mono_ms());
        c.step_wall(-3_600_000);
        assert_eq!((c.now_ms(), c.mono_ms()), (w - 3_600_000, m));
        c.advance(Duration::from_millis(5));
        assert_eq!((c.now_ms(), c.mono_ms()), (w - 3_600_000 + 5, m + 5));
    }
}
