//! The Redis section: `REDIS_URL` or `REDIS_CLUSTER_NODES` (not both),
//! `REDIS_CLUSTER_WAIT_REPLICAS`, `REDIS_MAX_CONNECTIONS`, `AUTHZ_CACHE_NAMESPACE`, and L2 as
//! they describe it.

use super::parse::{Var, check_url, url_ok, whole};
use super::{CacheConfig, ConfigError};
use crate::tier::names::namespace_ok;

pub(super) const REDIS_URL: &str = "REDIS_URL";
pub(super) const REDIS_MAX_CONNECTIONS: &str = "REDIS_MAX_CONNECTIONS";
pub(super) const REDIS_CLUSTER_NODES: &str = "REDIS_CLUSTER_NODES";
pub(super) const REDIS_CLUSTER_WAIT_REPLICAS: &str = "REDIS_CLUSTER_WAIT_REPLICAS";
pub(super) const NAMESPACE: &str = "AUTHZ_CACHE_NAMESPACE";

const REDIS_URL_ALLOWED: &str = "expected a redis:// or rediss:// URL with a host, e.g. redis://127.0.0.1:6379";
const CLUSTER_NODES_ALLOWED: &str = "expected comma-separated redis:// or rediss:// URLs with a host, e.g. redis://127.0.0.1:7000,redis://127.0.0.1:7001";
const BOTH_ALLOWED: &str = "unset one of REDIS_URL and REDIS_CLUSTER_NODES: L2 is one Redis or one Redis Cluster";
const WAIT_ALLOWED: &str = "expected a whole number of replicas from 0 to 5";
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
        if let Some((name, raw)) = var(REDIS_CLUSTER_NODES) {
            let nodes: Vec<String> = raw.split(',').map(|n| n.trim().to_owned()).collect();
            if nodes.iter().any(|n| !url_ok(n, &["redis", "rediss"])) {
                return Err(ConfigError::invalid(name, &raw, CLUSTER_NODES_ALLOWED));
            }
            self.redis_cluster_nodes = Some(nodes);
        }
        if let Some((name, raw)) = var(REDIS_CLUSTER_WAIT_REPLICAS) {
            let replicas = whole(name, &raw, 0, 5, WAIT_ALLOWED)?;
            self.redis_cluster_wait_replicas = u8::try_from(replicas).expect("at most 5");
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
        if let Some(nodes) = &self.redis_cluster_nodes {
            if self.redis_url.is_some() {
                return Err(ConfigError::invalid(REDIS_CLUSTER_NODES, &nodes.join(","), BOTH_ALLOWED));
            }
            if nodes.is_empty() {
                return Err(ConfigError::invalid(REDIS_CLUSTER_NODES, "", CLUSTER_NODES_ALLOWED));
            }
            for node in nodes {
                check_url(REDIS_CLUSTER_NODES, node, &["redis", "rediss"], CLUSTER_NODES_ALLOWED)?;
            }
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

    /// L2 on the cluster of `nodes` with the namespace and `WAIT` replicas.
    #[cfg(feature = "redis")]
    pub(super) fn redis_cluster_tier(
        &self,
        nodes: &[String],
    ) -> Result<crate::tier::redis::cluster::RedisClusterTier, ConfigError> {
        crate::tier::redis::cluster::RedisClusterTier::builder(nodes.iter().cloned())
            .namespace(self.redis_namespace.as_str())
            .wait_replicas(self.redis_cluster_wait_replicas)
            .build()
            .map_err(|e| {
                ConfigError::invalid(
                    REDIS_CLUSTER_NODES,
                    &nodes.join(","),
                    format!("expected URLs the redis client accepts ({e})"),
                )
            })
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

    #[tokio::test]
    async fn redis_cluster_nodes_give_l2_on_the_cluster_and_exclude_redis_url() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            CacheConfig::from_lookup(move |name| vars.iter().find(|(n, _)| *n == name).map(|(_, v)| (*v).to_owned()))
        };
        let config = env(&[("REDIS_CLUSTER_NODES", "redis://127.0.0.1:1, redis://127.0.0.1:2")]).unwrap();
        assert_eq!(config.redis_cluster_nodes().unwrap(), ["redis://127.0.0.1:1", "redis://127.0.0.1:2"]);
        assert!(config.uses_redis());
        let cache = config.apply(allow_all()).unwrap().build();
        assert!(cache.stats().tiers.l2.is_some(), "connections are lazy: no cluster needed to build");

        let both = env(&[("REDIS_CLUSTER_NODES", "redis://127.0.0.1:1"), ("REDIS_URL", "redis://127.0.0.1:6379")]);
        let err = both.unwrap_err();
        assert_eq!(err.variable(), "REDIS_CLUSTER_NODES");
        assert!(err.to_string().contains("unset one of REDIS_URL and REDIS_CLUSTER_NODES"), "{err}");
        for bad in ["", "redis://127.0.0.1:1,", "http://127.0.0.1:1", "redis://127.0.0.1:1,nonsense"] {
            let lookup = move |name: &str| (name == "REDIS_CLUSTER_NODES").then(|| bad.to_owned());
            assert_eq!(CacheConfig::from_lookup(lookup).unwrap_err().variable(), "REDIS_CLUSTER_NODES", "{bad:?}");
        }
        let wait = env(&[("REDIS_CLUSTER_NODES", "redis://127.0.0.1:1"), ("REDIS_CLUSTER_WAIT_REPLICAS", "9")]);
        assert_eq!(wait.unwrap_err().variable(), "REDIS_CLUSTER_WAIT_REPLICAS");
    }
}
