//! The cache section: L1 size, allow and deny ttls, max staleness, authorizer timeout.

use std::time::Duration;

use super::parse::{Var, secs, whole};
use super::{CacheConfig, ConfigError, MIB};

pub(super) const L1_CACHE_SIZE_MB: &str = "L1_CACHE_SIZE_MB";
pub(super) const ALLOW_TTL: &str = "AUTHZ_CACHE_ALLOW_TTL_S";
pub(super) const DENY_TTL: &str = "AUTHZ_CACHE_DENY_TTL_S";
pub(super) const MAX_STALENESS: &str = "AUTHZ_CACHE_MAX_STALENESS_MS";
pub(super) const AUTHORIZER_TIMEOUT: &str = "AUTHZ_CACHE_AUTHORIZER_TIMEOUT_MS";

impl CacheConfig {
    /// `L1_CACHE_SIZE_MB`.
    pub(super) fn read_l1_size(&mut self, var: Var<'_>) -> Result<(), ConfigError> {
        if let Some((name, raw)) = var(L1_CACHE_SIZE_MB) {
            let mb = whole(name, &raw, 1, 1_048_576, "expected a whole number of megabytes from 1 to 1048576")?;
            self.l1_max_bytes = mb * MIB;
        }
        Ok(())
    }

    /// The ttls (the deny ttl at most the allow ttl), max staleness and authorizer timeout.
    pub(super) fn read_ttls_and_timeouts(&mut self, var: Var<'_>) -> Result<(), ConfigError> {
        let allow_set = var(ALLOW_TTL);
        if let Some((name, raw)) = &allow_set {
            let s = whole(name, raw, 1, 86_400, "expected a whole number of seconds from 1 to 86400")?;
            self.allow_ttl = Duration::from_secs(s);
        }
        let deny_set = var(DENY_TTL);
        if let Some((name, raw)) = &deny_set {
            let s = whole(name, raw, 0, 86_400, "expected a whole number of seconds from 0 to 86400")?;
            self.deny_ttl = Duration::from_secs(s);
        }
        if self.deny_ttl > self.allow_ttl {
            // Blame the variable that was set: the deny ttl if it was, else the allow ttl that
            // went below the preset's deny ttl.
            return Err(match (deny_set, allow_set) {
                (None, Some((name, raw))) => ConfigError::invalid(
                    name,
                    &raw,
                    format!("expected at least the deny ttl ({}, {DENY_TTL})", secs(self.deny_ttl)),
                ),
                (Some((name, raw)), _) => ConfigError::invalid(
                    name,
                    &raw,
                    format!("expected at most the allow ttl ({}, {ALLOW_TTL})", secs(self.allow_ttl)),
                ),
                (None, None) => unreachable!("every preset caches denies at most as long as allows"),
            });
        }
        if let Some((name, raw)) = var(MAX_STALENESS) {
            let ms = whole(name, &raw, 10, 60_000, "expected a whole number of milliseconds from 10 to 60000")?;
            self.max_staleness = Duration::from_millis(ms);
        }
        if let Some((name, raw)) = var(AUTHORIZER_TIMEOUT) {
            let ms = whole(name, &raw, 1, 60_000, "expected a whole number of milliseconds from 1 to 60000")?;
            self.authorizer_timeout = Duration::from_millis(ms);
        }
        Ok(())
    }

    /// The deny ttl at most the allow ttl, whoever set them.
    pub(super) fn check_ttls(&self) -> Result<(), ConfigError> {
        if self.deny_ttl > self.allow_ttl {
            return Err(ConfigError::invalid(
                DENY_TTL,
                &secs(self.deny_ttl),
                format!("expected at most the allow ttl ({}, {ALLOW_TTL})", secs(self.allow_ttl)),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::tests::{allow_all, assert_names, error, from};
    use crate::config::{CacheConfig, Mode};

    #[test]
    fn deny_ttl_must_not_exceed_allow_ttl() {
        let err = error(&[("AUTHZ_CACHE_ALLOW_TTL_S", "30"), ("AUTHZ_CACHE_DENY_TTL_S", "31")]);
        assert_names(&err, "AUTHZ_CACHE_DENY_TTL_S", "31");
        assert!(err.allowed().contains("30 s"), "{err}");
        // Above the preset's allow ttl (60 s).
        assert_names(&error(&[("AUTHZ_CACHE_DENY_TTL_S", "61")]), "AUTHZ_CACHE_DENY_TTL_S", "61");
        // An allow ttl below the preset's deny ttl (10 s) is the one to blame.
        let err = error(&[("AUTHZ_CACHE_ALLOW_TTL_S", "5")]);
        assert_names(&err, "AUTHZ_CACHE_ALLOW_TTL_S", "5");
        assert!(err.allowed().contains("10 s"), "{err}");
        // Equal is fine.
        from(&[("AUTHZ_CACHE_ALLOW_TTL_S", "7"), ("AUTHZ_CACHE_DENY_TTL_S", "7")]).unwrap();
        // Set through the builder: caught by `apply`.
        let config = CacheConfig::preset(Mode::Development).with_deny_ttl(Duration::from_millis(60_500));
        let err = config.apply(allow_all()).unwrap_err();
        assert_eq!((err.variable(), err.value()), ("AUTHZ_CACHE_DENY_TTL_S", "60.5s"));
    }
}
