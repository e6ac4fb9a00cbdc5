//! The Redis section: `REDIS_URL`, `REDIS_MAX_CONNECTIONS`, `AUTHZ_CACHE_NAMESPACE`, and L2 as
//! they describe it.

use super::parse::{Var, check_url, url_ok, whole};
use super::{CacheConfig, ConfigError};
use crate::tier::names::namespace_ok;

pub(super) const REDIS_URL: &str = "REDIS_URL";
pub(super) const REDIS_MAX_CONNECTIONS: &str = "REDIS_MAX_CONNECTIONS";
pub(super) const NAMESPACE: &str = "AUTHZ_CACHE_NAMESPACE";

const REDIS_URL_ALLOWED: &str = "expected a redis:// or rediss:// URL with a host, e.g. redis://127.0.0.1:6379";
const POOL_ALLOWED: &str = "expected a whole number of connections from 1 to 10000";
const NAMESPACE_ALLOWED: &str = "expected 1 to 64 characters of A-Z a-z 0-9 - _ . /";

impl CacheConfig {
    /// `REDIS_URL` and `REDIS_MAX_CONNECTIONS`.
    pub(super) fn read_redis_url_and_pool(&mut self, var: Var<'_>) -> Result<(), ConfigError> {
        if let Some((name, raw)) = var(REDIS_URL) {
            if !url_ok(raw.trim(), &["redis", "rediss"]) {
                return Err(ConfigError::invalid(name, &raw, REDIS_URL_ALLOWED));
            }
            self.redis_url = Some(raw.trim().to_owned());
        }
        if let Some((name, raw)) = var(REDIS_MAX_CONNECTIONS) {
            let pool = whole(name, &raw, 1, 10_000, POOL_ALLOWED)?;
            self.redis_max_connections = u32::try_from(pool).expect("at most 10000");
        }
        Ok(())
    }

    /// `AUTHZ_CACHE_NAMESPACE`.
    pub(super) fn read_namespace(&mut self, var: Var<'_>) -> Result<(), ConfigError> {
        if let Some((name, raw)) = var(NAMESPACE) {
            let namespace = raw.trim();
            if !namespace_ok(namespace) {
                return Err(ConfigError::invalid(name, &raw, NAMESPACE_ALLOWED));
            }
            self.redis_namespace = namespace.to_owned();
        }
        Ok(())
    }

    pub(super) fn check_redis_url(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.redis_url {
            check_url(REDIS_URL, url, &["redis", "rediss"], REDIS_URL_ALLOWED)?;
        }
        Ok(())
    }

    pub(super) fn check_namespace_and_redis_pool(&self) -> Result<(), ConfigError> {
        if !namespace_ok(&self.redis_namespace) {
            return Err(ConfigError::invalid(NAMESPACE, &self.redis_namespace, NAMESPACE_ALLOWED));
        }
        if self.redis_max_connections == 0 {
            return Err(ConfigError::invalid(REDIS_MAX_CONNECTIONS, "0", POOL_ALLOWED));
        }
        Ok(())
    }

    /// L2 on `url` with the namespace and pool size; what the client rejects is blamed on the URL.
    #[cfg(feature = "redis")]
    pub(super) fn redis_tier(&self, url: &str) -> Result<crate::tier::redis::RedisTier, ConfigError> {
        crate::tier::redis::RedisTier::builder(url)
            .namespace(self.redis_namespace.as_str())
            .pool_size(self.redis_max_connections)
            .build()
            .map_err(|e| ConfigError::invalid(REDIS_URL, url, format!("expected a URL the redis client accepts ({e})")))
    }
}

#[cfg(all(test, feature = "redis"))]
mod tests {
    use crate::config::secrets::process_secret;
    use crate::config::tests::{SECRET_VALUE, allow_all};
    use crate::config::{CacheConfig, Mode, Secret};

    #[cfg(feature = "redis")]
    #[tokio::test]
    async fn apply_adds_l2_for_a_redis_url() {
        // Nothing listens on port 1: connections are lazy, so building needs no Redis.
        let config = CacheConfig::preset(Mode::Testing).with_redis_url(Some("redis://127.0.0.1:1/0".into()));
        let cache = config.apply(allow_all()).unwrap().build();
        assert!(cache.stats().tiers.l2.is_some());
        assert_eq!(process_secret(), process_secret());
        assert_ne!(process_secret(), [0; 32]);

        let config = CacheConfig::preset(Mode::Production)
            .with_redis_url(Some("redis://127.0.0.1:1/0".into()))
            .with_secret(Some(Secret::new(SECRET_VALUE)))
            .with_redis_namespace("tests/config");
        let cache = config.apply(allow_all()).unwrap().build();
        assert!(cache.stats().tiers.l2.is_some());

        let err = CacheConfig::default().with_redis_namespace("bad namespace").apply(allow_all()).unwrap_err();
        assert_eq!(err.variable(), "AUTHZ_CACHE_NAMESPACE");
    }
}
