//! Configuration: [`CacheConfig`], its presets ([`Mode`]) and [`CacheConfig::from_env`].
//!
//! A configuration starts from the preset of a mode (development, testing, production), then
//! each environment variable that is set overrides one value. Every invalid value fails at
//! start-up with a [`ConfigError`] that names the variable, the value and what is allowed; the
//! secret and URL passwords are never printed.
//!
//! The variables are listed on [`CacheConfig::from_env`].
//!
//! ```
//! use std::collections::HashMap;
//! use tower_authz_cache::{AuthzCache, CacheConfig, Decision, Mode, Permission, Principal};
//!
//! let env = HashMap::from([("AUTHZ_CACHE_MODE", "production"), ("L1_CACHE_SIZE_MB", "256")]);
//! let config = CacheConfig::from_lookup(|name| env.get(name).map(|v| v.to_string()))?;
//! assert_eq!(config.mode(), Mode::Production);
//! assert_eq!(config.l1_max_bytes(), 256 << 20);
//! assert_eq!(config.redis_max_connections(), 50);
//!
//! let cache = config
//!     .apply(AuthzCache::builder(|_: Principal, _: Permission| async {
//!         Ok::<_, std::convert::Infallible>(Decision::allow())
//!     }))?
//!     .build();
//! assert_eq!(cache.stats().tiers.l1.max_bytes, 256 << 20);
//!
//! // Invalid values name the variable, the value and what is allowed.
//! let bad = HashMap::from([("L1_CACHE_SIZE_MB", "abc")]);
//! let err = CacheConfig::from_lookup(|name| bad.get(name).map(|v| v.to_string())).unwrap_err();
//! assert_eq!(err.to_string(), r#"L1_CACHE_SIZE_MB="abc": expected a whole number of megabytes from 1 to 1048576"#);
//! # Ok::<(), tower_authz_cache::ConfigError>(())
//! ```

mod cache;
mod error;
mod monitor;
mod parse;
mod postgres;
mod redis;
mod resilience;
mod secrets;

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

pub use self::error::ConfigError;
use self::parse::mask_url;
#[cfg(not(feature = "postgres"))]
use self::postgres::DATABASE_URL;
#[cfg(feature = "postgres")]
use self::postgres::build_postgres;
#[cfg(not(feature = "redis"))]
use self::redis::REDIS_URL;
pub use self::secrets::Secret;
use self::secrets::{ROTATION_SECRET, SECRET};
use crate::AuthzCacheBuilder;

const MODE: &str = "AUTHZ_CACHE_MODE";
const MODE_ALLOWED: &str = "expected development, testing or production";
const MIB: u64 = 1 << 20;

/// A preset: the values a [`CacheConfig`] starts from before environment variables override
/// them. Read from `AUTHZ_CACHE_MODE`; development when unset.
///
/// | | development | testing | production |
/// |---|---|---|---|
/// | Redis pool | 5 | 5 | 50 |
/// | Postgres pool | 10 | 10 | 20 |
/// | L1 | 50 MiB | 16 MiB | 500 MiB |
/// | allow / deny ttl | 60 s / 10 s | 5 s / 1 s | 60 s / 10 s |
/// | max staleness | 1 s | 1 s | 1 s |
/// | authorizer timeout | 5 s | 5 s | 5 s |
/// | hit-rate / response-time target | 95 % / 5 ms | 95 % / 5 ms | 95 % / 5 ms |
/// | monitoring interval | 60 s | 60 s | 30 s |
/// | performance alerts | off | off | on |
/// | secret required with a shared tier | no | no | yes |
///
/// Parsing is case-insensitive and ignores surrounding whitespace:
///
/// ```
/// use tower_authz_cache::Mode;
///
/// assert_eq!(" Production ".parse::<Mode>().unwrap(), Mode::Production);
/// assert_eq!(Mode::Testing.to_string(), "testing");
/// assert!("staging".parse::<Mode>().is_err());
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Mode {
    /// Small pool and L1; a missing secret is allowed (a random one is used); no alerts.
    #[default]
    Development,
    /// Like development with a smaller L1 and short ttls, so tests see expiry quickly.
    Testing,
    /// Pools of 50 (Redis) and 20 (Postgres), 500 MiB L1, alerts on; a shared tier needs
    /// `AUTHZ_CACHE_SECRET`.
    Production,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Development => "development",
            Mode::Testing => "testing",
            Mode::Production => "production",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = ConfigError;

    /// Parses `development`, `testing` or `production`, in any case, surrounding whitespace
    /// ignored. The error names `AUTHZ_CACHE_MODE`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let trimmed = s.trim();
        [Mode::Development, Mode::Testing, Mode::Production]
            .into_iter()
            .find(|mode| trimmed.eq_ignore_ascii_case(mode.as_str()))
            .ok_or_else(|| ConfigError::invalid(MODE, s, MODE_ALLOWED))
    }
}

/// The configuration of an [`AuthzCache`](crate::AuthzCache) and of its tiers: from a preset
/// ([`CacheConfig::preset`]), from the environment ([`CacheConfig::from_env`]), adjusted with
/// the `with_*` setters, and given to an [`AuthzCacheBuilder`] with [`CacheConfig::apply`].
///
/// `Debug` prints URLs with their password replaced by `***` and the secret as `<redacted>`.
///
/// The hit-rate and response-time targets, the monitoring interval and the alerts flag drive
/// the [`Monitor`](crate::Monitor) (`Monitor::builder(cache).from_config(&config)`); the cache
/// itself does not act on them.
#[derive(Clone)]
pub struct CacheConfig {
    mode: Mode,
    l1_max_bytes: u64,
    allow_ttl: Duration,
    deny_ttl: Duration,
    authorizer_timeout: Duration,
    max_staleness: Duration,
    redis_url: Option<String>,
    redis_cluster_nodes: Option<Vec<String>>,
    redis_cluster_wait_replicas: u8,
    redis_max_connections: u32,
    redis_namespace: String,
    database_url: Option<String>,
    database_schema: String,
    database_max_connections: u32,
    hit_rate_target_percent: f64,
    response_time_target: Duration,
    monitoring_interval: Duration,
    performance_alerts_enabled: bool,
    secret: Option<Secret>,
    rotation: Option<(Secret, SystemTime)>,
    grace: Duration,
    refresh_ahead_percent: u32,
    audit: Option<crate::consistency::AuditConfig>,
}

impl fmt::Debug for CacheConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheConfig")
            .field("mode", &self.mode)
            .field("l1_max_bytes", &self.l1_max_bytes)
            .field("allow_ttl", &self.allow_ttl)
            .field("deny_ttl", &self.deny_ttl)
            .field("authorizer_timeout", &self.authorizer_timeout)
            .field("max_staleness", &self.max_staleness)
            .field("redis_url", &self.redis_url.as_deref().map(mask_url))
            .field("redis_cluster_nodes", &self.redis_cluster_nodes_redacted())
            .field("redis_max_connections", &self.redis_max_connections)
            .field("redis_namespace", &self.redis_namespace)
            .field("database_url", &self.database_url.as_deref().map(mask_url))
            .field("database_schema", &self.database_schema)
            .field("database_max_connections", &self.database_max_connections)
            .field("hit_rate_target_percent", &self.hit_rate_target_percent)
            .field("response_time_target", &self.response_time_target)
            .field("monitoring_interval", &self.monitoring_interval)
            .field("performance_alerts_enabled", &self.performance_alerts_enabled)
            .field("secret", &self.secret)
            .field("rotation", &self.rotation)
            .field("grace", &self.grace)
            .field("refresh_ahead_percent", &self.refresh_ahead_percent)
            .field("audit", &self.audit)
            .finish()
    }
}

impl Default for CacheConfig {
    /// The development preset.
    fn default() -> Self {
        Self::preset(Mode::default())
    }
}

impl CacheConfig {
    /// The preset of `mode` (see [`Mode`]): no Redis, no database, no secret, namespace `authz`,
    /// schema `authz_cache`.
    pub fn preset(mode: Mode) -> Self {
        let development = Self {
            mode,
            l1_max_bytes: 50 * MIB,
            allow_ttl: Duration::from_secs(60),
            deny_ttl: Duration::from_secs(10),
            authorizer_timeout: Duration::from_secs(5),
            max_staleness: Duration::from_secs(1),
            redis_url: None,
            redis_cluster_nodes: None,
            redis_cluster_wait_replicas: 1,
            redis_max_connections: 5,
            redis_namespace: "authz".to_owned(),
            database_url: None,
            database_schema: "authz_cache".to_owned(),
            database_max_connections: 10,
            hit_rate_target_percent: 95.0,
            response_time_target: Duration::from_millis(5),
            monitoring_interval: Duration::from_secs(60),
            performance_alerts_enabled: false,
            secret: None,
            rotation: None,
            grace: Duration::ZERO,
            refresh_ahead_percent: 0,
            audit: None,
        };
        match mode {
            Mode::Development => development,
            Mode::Testing => Self {
                l1_max_bytes: 16 * MIB,
                allow_ttl: Duration::from_secs(5),
                deny_ttl: Duration::from_secs(1),
                ..development
            },
            Mode::Production => Self {
                l1_max_bytes: 500 * MIB,
                redis_max_connections: 50,
                database_max_connections: 20,
                monitoring_interval: Duration::from_secs(30),
                performance_alerts_enabled: true,
                ..development
            },
        }
    }

    /// Reads the process environment: the preset of `AUTHZ_CACHE_MODE`, then every variable
    /// that is set overrides one value.
    ///
    /// | variable | meaning | allowed |
    /// |---|---|---|
    /// | `AUTHZ_CACHE_MODE` | preset, read first | `development` (default), `testing`, `production` |
    /// | `L1_CACHE_SIZE_MB` | L1 bound, in MiB | 1 to 1048576 |
    /// | `REDIS_URL` | L2 on Redis | `redis://` or `rediss://` URL with a host |
    /// | `REDIS_CLUSTER_NODES` | L2 on a Redis Cluster, these seed nodes (not with `REDIS_URL`) | comma-separated `redis://` or `rediss://` URLs with a host |
    /// | `REDIS_CLUSTER_WAIT_REPLICAS` | replicas that confirm each invalidation (`WAIT`), default 1 | 0 to 5 |
    /// | `REDIS_MAX_CONNECTIONS` | Redis pool size | 1 to 10000 |
    /// | `DATABASE_URL` | L3 on Postgres (feature `postgres`) | `postgres://` or `postgresql://` URL with a host |
    /// | `DATABASE_SCHEMA` | schema of the L3 tables | 1 to 40 of `a-z 0-9 _`, not starting with a digit |
    /// | `DATABASE_MAX_CONNECTIONS` | Postgres pool size | 1 to 1000 |
    /// | `CACHE_HIT_RATE_TARGET` | percent | 0 to 100, decimals allowed |
    /// | `AUTHORIZATION_RESPONSE_TIME_TARGET` | milliseconds | 1 to 60000 |
    /// | `CACHE_MONITORING_INTERVAL` | seconds | 1 to 86400 |
    /// | `PERFORMANCE_ALERTS_ENABLED` | flag | `true`, `false`, `1`, `0`, `yes`, `no` |
    /// | `AUTHZ_CACHE_ALLOW_TTL_S` | seconds an allow is cached | 1 to 86400 |
    /// | `AUTHZ_CACHE_DENY_TTL_S` | seconds a deny is cached | 0 to 86400, at most the allow ttl |
    /// | `AUTHZ_CACHE_MAX_STALENESS_MS` | see [`AuthzCacheBuilder::max_staleness`] | 10 to 60000 |
    /// | `AUTHZ_CACHE_AUTHORIZER_TIMEOUT_MS` | milliseconds | 1 to 60000 |
    /// | `AUTHZ_CACHE_GRACE_S` | see [`AuthzCacheBuilder::grace`] (default 0: off) | 0 to 86400 |
    /// | `AUTHZ_CACHE_REFRESH_AHEAD_PERCENT` | see [`AuthzCacheBuilder::refresh_ahead`] (default 0: off) | 0 to 90 |
    /// | `AUTHZ_CACHE_AUDIT_ONE_IN` | consistency auditor, see [`AuditConfig`](crate::consistency::AuditConfig) (default 0: off) | 0 to 1000000 |
    /// | `AUTHZ_CACHE_AUDIT_MAX_PER_S` | the auditor's cap on extra authorizer calls (default 10), with `AUTHZ_CACHE_AUDIT_ONE_IN` | 1 to 10000 |
    /// | `AUTHZ_CACHE_AUDIT_INVALIDATE` | a mismatch ends the entry (default false), with `AUTHZ_CACHE_AUDIT_ONE_IN` | flag |
    /// | `AUTHZ_CACHE_NAMESPACE` | Redis key prefix | 1 to 64 of `A-Z a-z 0-9 - _ . /` |
    /// | `AUTHZ_CACHE_SECRET` | keys the hashes and MACs of shared entries | at least 16 bytes |
    /// | `AUTHZ_CACHE_ROTATION_SECRET` | the other secret of a rotation, see [`AuthzCacheBuilder::rotation_secret`] | at least 16 bytes, with `AUTHZ_CACHE_ROTATION_UNTIL` |
    /// | `AUTHZ_CACHE_ROTATION_UNTIL` | end of the rotation, seconds since the Unix epoch | 1 to 253402300799, with `AUTHZ_CACHE_ROTATION_SECRET` |
    ///
    /// An empty value is invalid, not unset. `AUTHZ_CACHE_SECRET` is required in production when
    /// `REDIS_URL`, `REDIS_CLUSTER_NODES` or `DATABASE_URL` is set.
    ///
    /// # Errors
    ///
    /// The first invalid value, naming the variable, the value (secrets and passwords
    /// redacted) and what is allowed. A secret that is not valid UTF-8 is rejected; other
    /// values are read lossily (invalid bytes become U+FFFD), which their checks reject.
    pub fn from_env() -> Result<Self, ConfigError> {
        if std::env::var_os(SECRET).is_some_and(|secret| secret.to_str().is_none()) {
            return Err(ConfigError::redacted(SECRET, "expected valid UTF-8 of at least 16 bytes"));
        }
        if std::env::var_os(ROTATION_SECRET).is_some_and(|secret| secret.to_str().is_none()) {
            return Err(ConfigError::redacted(ROTATION_SECRET, "expected valid UTF-8 of at least 16 bytes"));
        }
        Self::from_lookup(|name| std::env::var_os(name).map(|value| value.to_string_lossy().into_owned()))
    }

    /// Like [`from_env`](Self::from_env), reading variables through `lookup` (`None` = unset).
    ///
    /// # Errors
    ///
    /// As [`from_env`](Self::from_env).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mode = match lookup(MODE) {
            Some(raw) => raw.parse()?,
            None => Mode::default(),
        };
        let mut config = Self::preset(mode);
        let var = |name: &'static str| lookup(name).map(|raw| (name, raw));

        // Section by section, in this order: the first invalid value is the one reported.
        config.read_l1_size(&var)?;
        config.read_redis_url_and_pool(&var)?;
        config.read_postgres(&var)?;
        config.read_monitor(&var)?;
        config.read_ttls_and_timeouts(&var)?;
        config.read_resilience(&var)?;
        config.read_namespace(&var)?;
        config.read_secrets(&lookup, &var)?;
        config.check()?;
        Ok(config)
    }

    /// Checks what cannot work or would be unsafe, whoever set it: URLs, namespace, schema, pool
    /// sizes, secret, deny ttl at most the allow ttl.
    fn check(&self) -> Result<(), ConfigError> {
        // In this order: the first failed check is the one reported.
        self.check_redis_url()?;
        self.check_database_url()?;
        self.check_namespace_and_redis_pool()?;
        self.check_schema_and_database_pool()?;
        self.check_ttls()?;
        self.check_secrets()
    }

    /// Configures `builder` with this configuration: L1 bound, ttls, authorizer timeout, max
    /// staleness, (feature `redis`) L2 on `redis_url` with the namespace, pool size and secret,
    /// and (feature `postgres`) L3 on `database_url`, as [`postgres_tier`](Self::postgres_tier)
    /// builds it. Call it inside a Tokio runtime when a URL is set (the pools start tasks).
    ///
    /// Without a secret (development and testing only), a random per-process secret keys L2 and
    /// L3 (the same one for both): instances then do not share entries, and a warning says so.
    ///
    /// The L3 schema is not migrated here: run [`PostgresTier::migrate`](crate::PostgresTier::migrate)
    /// (or `authz-cache init`) once per deployment.
    ///
    /// # Errors
    ///
    /// What cannot work or would be unsafe (the checks of [`from_env`](Self::from_env) on
    /// URLs, namespace, schema, pool sizes, secret and ttls), a URL its client rejects, or a
    /// Redis (Postgres) URL without the `redis` (`postgres`) feature.
    pub fn apply(&self, builder: AuthzCacheBuilder) -> Result<AuthzCacheBuilder, ConfigError> {
        self.check()?;
        #[cfg(not(feature = "redis"))]
        if let Some(url) = &self.redis_url {
            return Err(ConfigError::invalid(REDIS_URL, url, "unset: this build lacks the `redis` feature"));
        }
        #[cfg(not(feature = "redis"))]
        if let Some(nodes) = &self.redis_cluster_nodes {
            return Err(ConfigError::invalid(
                self::redis::REDIS_CLUSTER_NODES,
                &nodes.join(","),
                "unset: this build lacks the `redis` feature",
            ));
        }
        #[cfg(not(feature = "postgres"))]
        if let Some(url) = &self.database_url {
            return Err(ConfigError::invalid(DATABASE_URL, url, "unset: this build lacks the `postgres` feature"));
        }
        #[cfg_attr(not(any(feature = "redis", feature = "postgres")), allow(unused_mut))]
        let mut builder = builder
            .l1_max_bytes(self.l1_max_bytes)
            .allow_ttl(self.allow_ttl)
            .deny_ttl(self.deny_ttl)
            .authorizer_timeout(self.authorizer_timeout)
            .max_staleness(self.max_staleness)
            .grace(self.grace)
            .refresh_ahead(f64::from(self.refresh_ahead_percent) / 100.0);
        if let Some(audit) = self.audit {
            builder = builder.audit(audit);
        }
        if let Some((secret, until)) = &self.rotation {
            builder = builder.rotation_secret(secret.expose(), *until);
        }
        #[cfg(any(feature = "redis", feature = "postgres"))]
        if self.uses_redis() || self.database_url.is_some() {
            // The cache's secret keys every tier; one warning when it is random.
            builder = builder.secret(self.shared_secret());
            #[cfg(feature = "redis")]
            if let Some(url) = &self.redis_url {
                builder = builder.l2(self.redis_tier(url)?);
            }
            #[cfg(feature = "redis")]
            if let Some(nodes) = &self.redis_cluster_nodes {
                builder = builder.l2(self.redis_cluster_tier(nodes)?);
            }
            #[cfg(feature = "postgres")]
            if let Some(url) = &self.database_url {
                builder = builder.l3(build_postgres(url, self.postgres_builder(url))?);
            }
        }
        Ok(builder)
    }

    /// [`redis_url`](Self::redis_url) with any password replaced by `***`, for logs and reports.
    pub fn redis_url_redacted(&self) -> Option<String> {
        self.redis_url.as_deref().map(|u| mask_url(u).into_owned())
    }

    /// [`database_url`](Self::database_url) with any password replaced by `***`, for logs and
    /// reports.
    pub fn database_url_redacted(&self) -> Option<String> {
        self.database_url.as_deref().map(|u| mask_url(u).into_owned())
    }

    /// The mode whose preset this configuration started from.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Bound of L1 in bytes (`L1_CACHE_SIZE_MB` × 2^20).
    pub fn l1_max_bytes(&self) -> u64 {
        self.l1_max_bytes
    }

    /// How long an allow is cached (`AUTHZ_CACHE_ALLOW_TTL_S`).
    pub fn allow_ttl(&self) -> Duration {
        self.allow_ttl
    }

    /// How long a deny is cached (`AUTHZ_CACHE_DENY_TTL_S`).
    pub fn deny_ttl(&self) -> Duration {
        self.deny_ttl
    }

    /// How long one authorizer call may take (`AUTHZ_CACHE_AUTHORIZER_TIMEOUT_MS`).
    pub fn authorizer_timeout(&self) -> Duration {
        self.authorizer_timeout
    }

    /// How long the backplane may go unheard before L1 is distrusted (`AUTHZ_CACHE_MAX_STALENESS_MS`).
    pub fn max_staleness(&self) -> Duration {
        self.max_staleness
    }

    /// The Redis URL (`REDIS_URL`), password included: do not log it (`Debug` of the config masks it).
    pub fn redis_url(&self) -> Option<&str> {
        self.redis_url.as_deref()
    }

    /// The seed nodes of the Redis Cluster (`REDIS_CLUSTER_NODES`), passwords included: do not
    /// log them.
    pub fn redis_cluster_nodes(&self) -> Option<&[String]> {
        self.redis_cluster_nodes.as_deref()
    }

    /// [`redis_cluster_nodes`](Self::redis_cluster_nodes) with passwords replaced by `***`,
    /// comma-separated.
    pub fn redis_cluster_nodes_redacted(&self) -> Option<String> {
        self.redis_cluster_nodes.as_ref().map(|nodes| nodes.iter().map(|n| mask_url(n)).collect::<Vec<_>>().join(","))
    }

    /// How many replicas confirm each invalidation on a Redis Cluster
    /// (`REDIS_CLUSTER_WAIT_REPLICAS`, default 1).
    pub fn redis_cluster_wait_replicas(&self) -> u8 {
        self.redis_cluster_wait_replicas
    }

    /// Whether L2 is on Redis: `REDIS_URL` or `REDIS_CLUSTER_NODES`.
    pub fn uses_redis(&self) -> bool {
        self.redis_url.is_some() || self.redis_cluster_nodes.is_some()
    }

    /// Sets the Redis Cluster's seed nodes (`None`: no cluster).
    #[must_use]
    pub fn with_redis_cluster_nodes(mut self, nodes: Option<Vec<String>>) -> Self {
        self.redis_cluster_nodes = nodes;
        self
    }

    /// Largest number of pooled Redis connections (`REDIS_MAX_CONNECTIONS`).
    pub fn redis_max_connections(&self) -> u32 {
        self.redis_max_connections
    }

    /// Prefix of the Redis keys (`AUTHZ_CACHE_NAMESPACE`, default `authz`).
    pub fn redis_namespace(&self) -> &str {
        &self.redis_namespace
    }

    /// The Postgres URL of L3 (`DATABASE_URL`), password included: do not log it (`Debug` of the
    /// config masks it).
    pub fn database_url(&self) -> Option<&str> {
        self.database_url.as_deref()
    }

    /// The schema of the L3 tables (`DATABASE_SCHEMA`, default `authz_cache`).
    pub fn database_schema(&self) -> &str {
        &self.database_schema
    }

    /// Largest number of pooled Postgres connections (`DATABASE_MAX_CONNECTIONS`).
    pub fn database_max_connections(&self) -> u32 {
        self.database_max_connections
    }

    /// Target hit rate, in percent (`CACHE_HIT_RATE_TARGET`).
    pub fn hit_rate_target_percent(&self) -> f64 {
        self.hit_rate_target_percent
    }

    /// Target authorization response time (`AUTHORIZATION_RESPONSE_TIME_TARGET`, in ms).
    pub fn response_time_target(&self) -> Duration {
        self.response_time_target
    }

    /// How often monitoring should sample the stats (`CACHE_MONITORING_INTERVAL`, in s).
    pub fn monitoring_interval(&self) -> Duration {
        self.monitoring_interval
    }

    /// Whether missed targets should raise alerts (`PERFORMANCE_ALERTS_ENABLED`).
    pub fn performance_alerts_enabled(&self) -> bool {
        self.performance_alerts_enabled
    }

    /// The secret of the shared tiers (`AUTHZ_CACHE_SECRET`).
    pub fn secret(&self) -> Option<&Secret> {
        self.secret.as_ref()
    }

    /// The other secret of a rotation and the end of the rotation
    /// (`AUTHZ_CACHE_ROTATION_SECRET`, `AUTHZ_CACHE_ROTATION_UNTIL`).
    pub fn rotation(&self) -> Option<(&Secret, SystemTime)> {
        self.rotation.as_ref().map(|(secret, until)| (secret, *until))
    }

    /// Sets the mode, which decides whether a shared tier needs a secret. The other values
    /// stay as they are: use [`preset`](Self::preset) to start from a mode's values.
    #[must_use]
    pub fn with_mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Sets the bound of L1 in bytes; zero disables L1.
    #[must_use]
    pub fn with_l1_max_bytes(mut self, bytes: u64) -> Self {
        self.l1_max_bytes = bytes;
        self
    }

    /// Sets how long an allow is cached.
    #[must_use]
    pub fn with_allow_ttl(mut self, ttl: Duration) -> Self {
        self.allow_ttl = ttl;
        self
    }

    /// Sets how long a deny is cached (at most the allow ttl).
    #[must_use]
    pub fn with_deny_ttl(mut self, ttl: Duration) -> Self {
        self.deny_ttl = ttl;
        self
    }

    /// Sets how long one authorizer call may take.
    #[must_use]
    pub fn with_authorizer_timeout(mut self, timeout: Duration) -> Self {
        self.authorizer_timeout = timeout;
        self
    }

    /// Sets how long the backplane may go unheard before L1 is distrusted.
    #[must_use]
    pub fn with_max_staleness(mut self, max_staleness: Duration) -> Self {
        self.max_staleness = max_staleness;
        self
    }

    /// Sets or clears the Redis URL (checked by [`apply`](Self::apply)).
    #[must_use]
    pub fn with_redis_url(mut self, url: Option<String>) -> Self {
        self.redis_url = url;
        self
    }

    /// Sets the Redis pool size.
    #[must_use]
    pub fn with_redis_max_connections(mut self, connections: u32) -> Self {
        self.redis_max_connections = connections;
        self
    }

    /// Sets the prefix of the Redis keys (1 to 64 of `A-Z a-z 0-9 - _ . /`).
    #[must_use]
    pub fn with_redis_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.redis_namespace = namespace.into();
        self
    }

    /// Sets or clears the Postgres URL (checked by [`apply`](Self::apply)).
    #[must_use]
    pub fn with_database_url(mut self, url: Option<String>) -> Self {
        self.database_url = url;
        self
    }

    /// Sets the schema of the L3 tables (1 to 40 of `a-z 0-9 _`, not starting with a digit;
    /// checked by [`apply`](Self::apply)).
    #[must_use]
    pub fn with_database_schema(mut self, schema: impl Into<String>) -> Self {
        self.database_schema = schema.into();
        self
    }

    /// Sets the Postgres pool size (1 to 1000; checked by [`apply`](Self::apply)).
    #[must_use]
    pub fn with_database_max_connections(mut self, connections: u32) -> Self {
        self.database_max_connections = connections;
        self
    }

    /// Sets the target hit rate, in percent.
    #[must_use]
    pub fn with_hit_rate_target_percent(mut self, percent: f64) -> Self {
        self.hit_rate_target_percent = percent;
        self
    }

    /// Sets the target authorization response time.
    #[must_use]
    pub fn with_response_time_target(mut self, target: Duration) -> Self {
        self.response_time_target = target;
        self
    }

    /// Sets how often monitoring should sample the stats.
    #[must_use]
    pub fn with_monitoring_interval(mut self, interval: Duration) -> Self {
        self.monitoring_interval = interval;
        self
    }

    /// Sets whether missed targets should raise alerts.
    #[must_use]
    pub fn with_performance_alerts_enabled(mut self, enabled: bool) -> Self {
        self.performance_alerts_enabled = enabled;
        self
    }

    /// Sets or clears the secret of the shared tiers (at least 16 bytes).
    #[must_use]
    pub fn with_secret(mut self, secret: Option<Secret>) -> Self {
        self.secret = secret;
        self
    }

    /// Sets the other secret of a rotation and its end (see
    /// [`AuthzCacheBuilder::rotation_secret`]).
    #[must_use]
    pub fn with_rotation(mut self, rotation: Option<(Secret, SystemTime)>) -> Self {
        self.rotation = rotation;
        self
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::cache::{ALLOW_TTL, AUTHORIZER_TIMEOUT, DENY_TTL, L1_CACHE_SIZE_MB, MAX_STALENESS};
    use super::monitor::{ALERTS_ENABLED, HIT_RATE_TARGET, MONITORING_INTERVAL, RESPONSE_TIME_TARGET};
    use super::postgres::{DATABASE_MAX_CONNECTIONS, DATABASE_SCHEMA, DATABASE_URL};
    use super::redis::{NAMESPACE, REDIS_MAX_CONNECTIONS, REDIS_URL};
    use super::*;
    use crate::{AuthzCache, Decision, Permission, Principal};

    pub(super) const SECRET_VALUE: &str = "Zq7-DISTINCTIVE-secret-value-9xK";
    pub(super) const PASSWORD: &str = "pw-DISTINCTIVE-hunter2";

    pub(super) fn from(vars: &[(&str, &str)]) -> Result<CacheConfig, ConfigError> {
        let env: HashMap<String, String> = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        CacheConfig::from_lookup(|name| env.get(name).cloned())
    }

    pub(super) fn error(vars: &[(&str, &str)]) -> ConfigError {
        from(vars).expect_err("configuration should be rejected")
    }

    /// The error names `variable` and `value`, on one line.
    pub(super) fn assert_names(err: &ConfigError, variable: &str, value: &str) {
        let message = err.to_string();
        assert_eq!(err.variable(), variable, "{message}");
        assert_eq!(err.value(), value, "{message}");
        assert!(message.starts_with(variable), "{message}");
        assert!(message.contains(&format!("{value:?}")), "{message}");
        assert!(!err.allowed().is_empty(), "{message}");
        assert!(!message.contains('\n'), "{message}");
    }

    pub(super) fn allow_all() -> AuthzCacheBuilder {
        AuthzCache::builder(|_: Principal, _: Permission| async {
            Ok::<_, std::convert::Infallible>(Decision::allow())
        })
    }

    #[test]
    fn presets() {
        let production = CacheConfig::preset(Mode::Production);
        assert_eq!(production.redis_max_connections(), 50);
        assert_eq!(production.l1_max_bytes(), 500 << 20);
        assert_eq!(production.allow_ttl(), Duration::from_secs(60));
        assert_eq!(production.deny_ttl(), Duration::from_secs(10));
        assert_eq!(production.max_staleness(), Duration::from_secs(1));
        assert_eq!(production.authorizer_timeout(), Duration::from_secs(5));
        assert_eq!(production.hit_rate_target_percent(), 95.0);
        assert_eq!(production.response_time_target(), Duration::from_millis(5));
        assert_eq!(production.monitoring_interval(), Duration::from_secs(30));
        assert!(production.performance_alerts_enabled());

        let development = CacheConfig::preset(Mode::Development);
        assert_eq!(development.redis_max_connections(), 5);
        assert_eq!(development.l1_max_bytes(), 50 << 20);
        assert_eq!(development.allow_ttl(), Duration::from_secs(60));
        assert_eq!(development.deny_ttl(), Duration::from_secs(10));
        assert_eq!(development.monitoring_interval(), Duration::from_secs(60));
        assert!(!development.performance_alerts_enabled());

        let testing = CacheConfig::preset(Mode::Testing);
        assert_eq!((testing.redis_max_connections(), testing.l1_max_bytes()), (5, 16 << 20));
        assert_eq!((testing.allow_ttl(), testing.deny_ttl()), (Duration::from_secs(5), Duration::from_secs(1)));
        assert!(!testing.performance_alerts_enabled());

        for (config, pool) in [(&production, 20), (&development, 10), (&testing, 10)] {
            assert_eq!(config.database_max_connections(), pool, "{config:?}");
            assert_eq!(config.database_schema(), "authz_cache");
            assert_eq!(config.redis_namespace(), "authz");
            assert!(config.redis_url().is_none() && config.database_url().is_none() && config.secret().is_none());
            config.check().unwrap();
        }
    }

    #[test]
    fn mode_is_read_first_and_defaults_to_development() {
        assert_eq!(from(&[]).unwrap().mode(), Mode::Development);
        assert_eq!(from(&[]).unwrap().l1_max_bytes(), 50 << 20);
        let production = from(&[("AUTHZ_CACHE_MODE", " PRODUCTION\n")]).unwrap();
        assert_eq!((production.mode(), production.redis_max_connections()), (Mode::Production, 50));
        assert_eq!(from(&[("AUTHZ_CACHE_MODE", "Testing")]).unwrap().mode(), Mode::Testing);
        for mode in [Mode::Development, Mode::Testing, Mode::Production] {
            assert_eq!(mode.to_string().parse::<Mode>().unwrap(), mode);
        }
        assert_eq!(Mode::Production.to_string(), "production");
    }

    #[test]
    fn every_variable_overrides_the_preset() {
        let config = from(&[
            ("AUTHZ_CACHE_MODE", "production"),
            ("L1_CACHE_SIZE_MB", "64"),
            ("REDIS_URL", "rediss://cache.internal:6380/2"),
            ("REDIS_MAX_CONNECTIONS", "20"),
            ("DATABASE_URL", "postgresql://app@[::1]:5432,db2:5433/app"),
            ("DATABASE_SCHEMA", " tenant_7_cache "),
            ("DATABASE_MAX_CONNECTIONS", "1000"),
            ("CACHE_HIT_RATE_TARGET", "97.5"),
            ("AUTHORIZATION_RESPONSE_TIME_TARGET", "3"),
            ("CACHE_MONITORING_INTERVAL", "15"),
            ("PERFORMANCE_ALERTS_ENABLED", "No"),
            ("AUTHZ_CACHE_ALLOW_TTL_S", "120"),
            ("AUTHZ_CACHE_DENY_TTL_S", "0"),
            ("AUTHZ_CACHE_MAX_STALENESS_MS", "250"),
            ("AUTHZ_CACHE_AUTHORIZER_TIMEOUT_MS", "800"),
            ("AUTHZ_CACHE_NAMESPACE", "my-app/v2"),
            ("AUTHZ_CACHE_SECRET", SECRET_VALUE),
        ])
        .unwrap();
        assert_eq!(config.l1_max_bytes(), 64 << 20);
        assert_eq!(config.redis_url(), Some("rediss://cache.internal:6380/2"));
        assert_eq!(config.redis_max_connections(), 20);
        assert_eq!(config.database_url(), Some("postgresql://app@[::1]:5432,db2:5433/app"));
        assert_eq!(config.database_schema(), "tenant_7_cache");
        assert_eq!(config.database_max_connections(), 1000);
        assert_eq!(config.hit_rate_target_percent(), 97.5);
        assert_eq!(config.response_time_target(), Duration::from_millis(3));
        assert_eq!(config.monitoring_interval(), Duration::from_secs(15));
        assert!(!config.performance_alerts_enabled());
        assert_eq!(config.allow_ttl(), Duration::from_secs(120));
        assert_eq!(config.deny_ttl(), Duration::ZERO);
        assert_eq!(config.max_staleness(), Duration::from_millis(250));
        assert_eq!(config.authorizer_timeout(), Duration::from_millis(800));
        assert_eq!(config.redis_namespace(), "my-app/v2");
        assert_eq!(config.secret().unwrap().expose(), SECRET_VALUE.as_bytes());
        for (text, expected) in [("TRUE", true), ("1", true), ("yes", true), ("false", false), ("0", false)] {
            let config = from(&[("PERFORMANCE_ALERTS_ENABLED", text)]).unwrap();
            assert_eq!(config.performance_alerts_enabled(), expected, "{text}");
        }
    }

    #[test]
    fn bad_values_name_the_variable_and_the_value() {
        let cases: &[(&str, &str)] = &[
            ("L1_CACHE_SIZE_MB", "abc"),
            ("L1_CACHE_SIZE_MB", "-5"),
            ("L1_CACHE_SIZE_MB", "0"),
            ("L1_CACHE_SIZE_MB", "1048577"),
            ("L1_CACHE_SIZE_MB", "1.5"),
            ("REDIS_URL", "foo"),
            ("REDIS_URL", "http://127.0.0.1:6379"),
            ("REDIS_URL", "redis://"),
            ("REDIS_URL", "redis://:6379"),
            ("REDIS_URL", "redis://host:port"),
            ("REDIS_URL", "redis://host:70000"),
            ("REDIS_URL", "redis://[::1"),
            ("REDIS_URL", "redis://ho\u{FFFD}st"),
            ("REDIS_MAX_CONNECTIONS", "0"),
            ("REDIS_MAX_CONNECTIONS", "10001"),
            ("DATABASE_URL", "mysql://db/app"),
            ("DATABASE_URL", "postgres:///app?host=/run/postgresql"),
            ("DATABASE_SCHEMA", "Authz"),
            ("DATABASE_SCHEMA", "1cache"),
            ("DATABASE_SCHEMA", "authz-cache"),
            ("DATABASE_SCHEMA", "authz.cache"),
            ("DATABASE_SCHEMA", "a b"),
            ("DATABASE_SCHEMA", "x; DROP TABLE users"),
            ("DATABASE_SCHEMA", "caché"),
            ("DATABASE_SCHEMA", "\"authz\""),
            ("DATABASE_MAX_CONNECTIONS", "0"),
            ("DATABASE_MAX_CONNECTIONS", "1001"),
            ("DATABASE_MAX_CONNECTIONS", "ten"),
            ("AUTHZ_CACHE_MODE", "staging"),
            ("CACHE_HIT_RATE_TARGET", "101"),
            ("CACHE_HIT_RATE_TARGET", "-0.5"),
            ("CACHE_HIT_RATE_TARGET", "NaN"),
            ("CACHE_HIT_RATE_TARGET", "95%"),
            ("AUTHORIZATION_RESPONSE_TIME_TARGET", "0"),
            ("AUTHORIZATION_RESPONSE_TIME_TARGET", "60001"),
            ("CACHE_MONITORING_INTERVAL", "86401"),
            ("PERFORMANCE_ALERTS_ENABLED", "maybe"),
            ("AUTHZ_CACHE_ALLOW_TTL_S", "0"),
            ("AUTHZ_CACHE_DENY_TTL_S", "86401"),
            ("AUTHZ_CACHE_MAX_STALENESS_MS", "9"),
            ("AUTHZ_CACHE_AUTHORIZER_TIMEOUT_MS", "60001"),
            ("AUTHZ_CACHE_NAMESPACE", "has space"),
            ("AUTHZ_CACHE_NAMESPACE", "a:b"),
        ];
        for &(variable, value) in cases {
            assert_names(&error(&[(variable, value)]), variable, value);
        }
        let err = error(&[("L1_CACHE_SIZE_MB", "abc")]);
        assert_eq!(
            err.to_string(),
            r#"L1_CACHE_SIZE_MB="abc": expected a whole number of megabytes from 1 to 1048576"#
        );
        assert_names(
            &error(&[("AUTHZ_CACHE_NAMESPACE", "n".repeat(65).as_str())]),
            "AUTHZ_CACHE_NAMESPACE",
            &"n".repeat(65),
        );
        let err = error(&[("DATABASE_SCHEMA", "s".repeat(41).as_str())]);
        assert_names(&err, "DATABASE_SCHEMA", &"s".repeat(41));
        assert_eq!(
            error(&[("DATABASE_SCHEMA", "1cache")]).to_string(),
            r#"DATABASE_SCHEMA="1cache": expected 1 to 40 characters of a-z 0-9 _, not starting with a digit"#
        );
        // The longest and the odd-but-valid ones pass.
        for schema in ["s".repeat(40), "_".to_owned(), "a1".to_owned(), "_9".to_owned()] {
            assert_eq!(from(&[("DATABASE_SCHEMA", schema.as_str())]).unwrap().database_schema(), schema);
        }
        assert_eq!(
            error(&[("DATABASE_MAX_CONNECTIONS", "1001")]).to_string(),
            r#"DATABASE_MAX_CONNECTIONS="1001": expected a whole number of connections from 1 to 1000"#
        );
        // Set through the builder: caught by `apply`.
        let err = CacheConfig::default().with_database_schema("Bad-Schema").apply(allow_all()).unwrap_err();
        assert_names(&err, "DATABASE_SCHEMA", "Bad-Schema");
        let err = CacheConfig::default().with_database_max_connections(0).apply(allow_all()).unwrap_err();
        assert_names(&err, "DATABASE_MAX_CONNECTIONS", "0");
        let err = CacheConfig::default().with_database_max_connections(5000).apply(allow_all()).unwrap_err();
        assert_names(&err, "DATABASE_MAX_CONNECTIONS", "5000");
        // Control characters are escaped: still one line.
        assert_names(&error(&[("CACHE_MONITORING_INTERVAL", "1\n2")]), "CACHE_MONITORING_INTERVAL", "1\n2");
    }

    #[test]
    fn an_empty_value_is_invalid_not_unset() {
        for variable in [
            MODE,
            L1_CACHE_SIZE_MB,
            REDIS_URL,
            REDIS_MAX_CONNECTIONS,
            DATABASE_URL,
            DATABASE_SCHEMA,
            DATABASE_MAX_CONNECTIONS,
            HIT_RATE_TARGET,
            RESPONSE_TIME_TARGET,
            MONITORING_INTERVAL,
            ALERTS_ENABLED,
            ALLOW_TTL,
            DENY_TTL,
            MAX_STALENESS,
            AUTHORIZER_TIMEOUT,
            NAMESPACE,
        ] {
            assert_names(&error(&[(variable, "")]), variable, "");
            assert_names(&error(&[(variable, "  ")]), variable, "  ");
        }
        let err = error(&[(SECRET, "")]);
        assert_eq!((err.variable(), err.value(), err.is_missing()), (SECRET, "<redacted>", false));
    }

    #[tokio::test]
    async fn apply_configures_the_cache() {
        let config = from(&[("L1_CACHE_SIZE_MB", "3"), ("AUTHZ_CACHE_ALLOW_TTL_S", "30")]).unwrap();
        let cache = config.apply(allow_all()).unwrap().build();
        assert_eq!(cache.stats().tiers.l1.max_bytes, 3 << 20);
        assert_eq!(cache.stats().tiers.l1.max_bytes, config.l1_max_bytes());
        let debug = format!("{cache:?}");
        assert!(debug.contains("allow_ttl_ms: 30000") && debug.contains("deny_ttl_ms: 10000"), "{debug}");

        let (bob, read) = (Principal::new("bob"), Permission::new("documents:1", "read"));
        assert!(cache.check(&bob, &read).await.unwrap().is_allowed());
    }

    #[test]
    fn redacted_urls_hide_passwords_for_reports() {
        let c = CacheConfig::preset(Mode::Development)
            .with_redis_url(Some("redis://user:hunter2@127.0.0.1:6379/0".to_owned()))
            .with_database_url(Some("postgres://app:hunter2@db:5432/x".to_owned()));
        assert_eq!(c.redis_url_redacted().as_deref(), Some("redis://user:***@127.0.0.1:6379/0"));
        assert_eq!(c.database_url_redacted().as_deref(), Some("postgres://app:***@db:5432/x"));
        assert_eq!(CacheConfig::preset(Mode::Development).redis_url_redacted(), None);
    }
}
