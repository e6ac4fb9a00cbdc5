//! The monitoring section: hit-rate and response-time targets, monitoring interval, alerts flag
//! (read by [`Monitor`](crate::Monitor), not by the cache).

use std::time::Duration;

use super::parse::{Var, flag, whole};
use super::{CacheConfig, ConfigError};

pub(super) const HIT_RATE_TARGET: &str = "CACHE_HIT_RATE_TARGET";
pub(super) const RESPONSE_TIME_TARGET: &str = "AUTHORIZATION_RESPONSE_TIME_TARGET";
pub(super) const MONITORING_INTERVAL: &str = "CACHE_MONITORING_INTERVAL";
pub(super) const ALERTS_ENABLED: &str = "PERFORMANCE_ALERTS_ENABLED";

impl CacheConfig {
    /// `CACHE_HIT_RATE_TARGET`, `AUTHORIZATION_RESPONSE_TIME_TARGET`, `CACHE_MONITORING_INTERVAL`
    /// and `PERFORMANCE_ALERTS_ENABLED`.
    pub(super) fn read_monitor(&mut self, var: Var<'_>) -> Result<(), ConfigError> {
        if let Some((name, raw)) = var(HIT_RATE_TARGET) {
            let percent = raw.trim().parse::<f64>().ok().filter(|p| (0.0..=100.0).contains(p));
            self.hit_rate_target_percent = percent.ok_or_else(|| {
                ConfigError::invalid(name, &raw, "expected a percentage from 0 to 100 (decimals allowed)")
            })?;
        }
        if let Some((name, raw)) = var(RESPONSE_TIME_TARGET) {
            let ms = whole(name, &raw, 1, 60_000, "expected a whole number of milliseconds from 1 to 60000")?;
            self.response_time_target = Duration::from_millis(ms);
        }
        if let Some((name, raw)) = var(MONITORING_INTERVAL) {
            let s = whole(name, &raw, 1, 86_400, "expected a whole number of seconds from 1 to 86400")?;
            self.monitoring_interval = Duration::from_secs(s);
        }
        if let Some((name, raw)) = var(ALERTS_ENABLED) {
            self.performance_alerts_enabled = flag(name, &raw)?;
        }
        Ok(())
    }
}
