//! The resilience section: grace during authorizer outages, refresh-ahead, the consistency
//! auditor. All off unless set.

use std::time::Duration;

use super::parse::{Var, flag, whole};
use super::{CacheConfig, ConfigError};
use crate::consistency::AuditConfig;

pub(super) const GRACE: &str = "AUTHZ_CACHE_GRACE_S";
pub(super) const REFRESH_AHEAD: &str = "AUTHZ_CACHE_REFRESH_AHEAD_PERCENT";
pub(super) const AUDIT_ONE_IN: &str = "AUTHZ_CACHE_AUDIT_ONE_IN";
pub(super) const AUDIT_MAX_PER_S: &str = "AUTHZ_CACHE_AUDIT_MAX_PER_S";
pub(super) const AUDIT_INVALIDATE: &str = "AUTHZ_CACHE_AUDIT_INVALIDATE";

impl CacheConfig {
    /// `AUTHZ_CACHE_GRACE_S`, `AUTHZ_CACHE_REFRESH_AHEAD_PERCENT` and the `AUTHZ_CACHE_AUDIT_*`
    /// variables (the auditor's rate and flag only mean something with `AUTHZ_CACHE_AUDIT_ONE_IN`).
    pub(super) fn read_resilience(&mut self, var: Var<'_>) -> Result<(), ConfigError> {
        if let Some((name, raw)) = var(GRACE) {
            self.grace = Duration::from_secs(whole(
                name,
                &raw,
                0,
                86_400,
                "expected a whole number of seconds from 0 to 86400",
            )?);
        }
        if let Some((name, raw)) = var(REFRESH_AHEAD) {
            self.refresh_ahead_percent = whole(name, &raw, 0, 90, "expected a whole percentage from 0 to 90")? as u32;
        }
        let one_in = match var(AUDIT_ONE_IN) {
            Some((name, raw)) => whole(name, &raw, 0, 1_000_000, "expected a whole number from 0 (off) to 1000000")?,
            None => 0,
        };
        let mut audit = (one_in > 0).then(|| AuditConfig::one_in(one_in as u32));
        for (variable, set) in [(AUDIT_MAX_PER_S, true), (AUDIT_INVALIDATE, false)] {
            let Some((name, raw)) = var(variable) else { continue };
            let Some(config) = audit.as_mut() else {
                return Err(ConfigError::invalid(name, &raw, "unset, or set AUTHZ_CACHE_AUDIT_ONE_IN too"));
            };
            *config = if set {
                config.max_per_second(whole(name, &raw, 1, 10_000, "expected a whole number from 1 to 10000")? as u32)
            } else {
                config.invalidate_on_mismatch(flag(name, &raw)?)
            };
        }
        if audit.is_some() {
            self.audit = audit;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::tests::{assert_names, error, from};
    use crate::consistency::AuditConfig;

    #[test]
    fn off_unless_set_and_each_value_checked() {
        let plain = from(&[]).unwrap();
        assert_eq!((plain.grace, plain.refresh_ahead_percent, plain.audit), (Duration::ZERO, 0, None));
        let set = from(&[
            ("AUTHZ_CACHE_GRACE_S", "300"),
            ("AUTHZ_CACHE_REFRESH_AHEAD_PERCENT", "20"),
            ("AUTHZ_CACHE_AUDIT_ONE_IN", "1000"),
            ("AUTHZ_CACHE_AUDIT_MAX_PER_S", "5"),
            ("AUTHZ_CACHE_AUDIT_INVALIDATE", "true"),
        ])
        .unwrap();
        assert_eq!(set.grace, Duration::from_secs(300));
        assert_eq!(set.refresh_ahead_percent, 20);
        assert_eq!(set.audit, Some(AuditConfig::one_in(1000).max_per_second(5).invalidate_on_mismatch(true)));
        assert_eq!(from(&[("AUTHZ_CACHE_AUDIT_ONE_IN", "0")]).unwrap().audit, None, "0 is off");
        for (name, value) in [
            ("AUTHZ_CACHE_GRACE_S", "-1"),
            ("AUTHZ_CACHE_GRACE_S", "1h"),
            ("AUTHZ_CACHE_REFRESH_AHEAD_PERCENT", "95"),
            ("AUTHZ_CACHE_AUDIT_ONE_IN", "x"),
        ] {
            assert_names(&error(&[(name, value)]), name, value);
        }
        // The auditor's other settings without the auditor: an error, not silently ignored.
        assert_names(&error(&[("AUTHZ_CACHE_AUDIT_MAX_PER_S", "5")]), "AUTHZ_CACHE_AUDIT_MAX_PER_S", "5");
        let err = error(&[("AUTHZ_CACHE_AUDIT_ONE_IN", "10"), ("AUTHZ_CACHE_AUDIT_INVALIDATE", "maybe")]);
        assert_names(&err, "AUTHZ_CACHE_AUDIT_INVALIDATE", "maybe");
    }
}
