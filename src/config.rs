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

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::AuthzCacheBuilder;
use crate::tier::names::{namespace_ok, schema_ok};

const MODE: &str = "AUTHZ_CACHE_MODE";
const L1_CACHE_SIZE_MB: &str = "L1_CACHE_SIZE_MB";
const REDIS_URL: &str = "REDIS_URL";
const REDIS_MAX_CONNECTIONS: &str = "REDIS_MAX_CONNECTIONS";
const DATABASE_URL: &str = "DATABASE_URL";
const DATABASE_SCHEMA: &str = "DATABASE_SCHEMA";
const DATABASE_MAX_CONNECTIONS: &str = "DATABASE_MAX_CONNECTIONS";
const HIT_RATE_TARGET: &str = "CACHE_HIT_RATE_TARGET";
const RESPONSE_TIME_TARGET: &str = "AUTHORIZATION_RESPONSE_TIME_TARGET";
const MONITORING_INTERVAL: &str = "CACHE_MONITORING_INTERVAL";
const ALERTS_ENABLED: &str = "PERFORMANCE_ALERTS_ENABLED";
const ALLOW_TTL: &str = "AUTHZ_CACHE_ALLOW_TTL_S";
const DENY_TTL: &str = "AUTHZ_CACHE_DENY_TTL_S";
const MAX_STALENESS: &str = "AUTHZ_CACHE_MAX_STALENESS_MS";
const AUTHORIZER_TIMEOUT: &str = "AUTHZ_CACHE_AUTHORIZER_TIMEOUT_MS";
const NAMESPACE: &str = "AUTHZ_CACHE_NAMESPACE";
const SECRET: &str = "AUTHZ_CACHE_SECRET";
const ROTATION_SECRET: &str = "AUTHZ_CACHE_ROTATION_SECRET";
const ROTATION_UNTIL: &str = "AUTHZ_CACHE_ROTATION_UNTIL";
const ROTATION_UNTIL_ALLOWED: &str =
    "expected the end of the rotation in whole seconds since the Unix epoch (e.g. date -d '+2 hours' +%s)";

const MODE_ALLOWED: &str = "expected development, testing or production";
const REDIS_URL_ALLOWED: &str = "expected a redis:// or rediss:// URL with a host, e.g. redis://127.0.0.1:6379";
const DATABASE_URL_ALLOWED: &str =
    "expected a postgres:// or postgresql:// URL with a host, e.g. postgres://app@127.0.0.1:5432/app";
const POOL_ALLOWED: &str = "expected a whole number of connections from 1 to 10000";
const DATABASE_POOL_ALLOWED: &str = "expected a whole number of connections from 1 to 1000";
const SCHEMA_ALLOWED: &str = "expected 1 to 40 characters of a-z 0-9 _, not starting with a digit";
const NAMESPACE_ALLOWED: &str = "expected 1 to 64 characters of A-Z a-z 0-9 - _ . /";
const SECRET_ALLOWED: &str = "expected at least 16 bytes (32 random bytes recommended)";
const SECRET_MIN_LEN: usize = 16;
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

/// Secret bytes, e.g. the key of the hashes and MACs of shared entries (`AUTHZ_CACHE_SECRET`).
///
/// `Debug` and `Display` print `<redacted>`; nothing public gives the bytes back.
///
/// ```
/// use tower_authz_cache::Secret;
///
/// let secret = Secret::new("0123456789abcdef0123456789abcdef");
/// assert_eq!(format!("{secret} {secret:?}"), "<redacted> <redacted>");
/// ```
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps `bytes`. Shared tiers need at least 16 bytes; 32 random bytes are recommended.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into())
    }

    /// The bytes, for the tiers that key their hashes and MACs with them.
    pub(crate) fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
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
    /// | `AUTHZ_CACHE_NAMESPACE` | Redis key prefix | 1 to 64 of `A-Z a-z 0-9 - _ . /` |
    /// | `AUTHZ_CACHE_SECRET` | keys the hashes and MACs of shared entries | at least 16 bytes |
    /// | `AUTHZ_CACHE_ROTATION_SECRET` | the other secret of a rotation, see [`AuthzCacheBuilder::rotation_secret`] | at least 16 bytes, with `AUTHZ_CACHE_ROTATION_UNTIL` |
    /// | `AUTHZ_CACHE_ROTATION_UNTIL` | end of the rotation, seconds since the Unix epoch | 1 to 253402300799, with `AUTHZ_CACHE_ROTATION_SECRET` |
    ///
    /// An empty value is invalid, not unset. `AUTHZ_CACHE_SECRET` is required in production when
    /// `REDIS_URL` or `DATABASE_URL` is set.
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

        if let Some((name, raw)) = var(L1_CACHE_SIZE_MB) {
            let mb = whole(name, &raw, 1, 1_048_576, "expected a whole number of megabytes from 1 to 1048576")?;
            config.l1_max_bytes = mb * MIB;
        }
        if let Some((name, raw)) = var(REDIS_URL) {
            if !url_ok(raw.trim(), &["redis", "rediss"]) {
                return Err(ConfigError::invalid(name, &raw, REDIS_URL_ALLOWED));
            }
            config.redis_url = Some(raw.trim().to_owned());
        }
        if let Some((name, raw)) = var(REDIS_MAX_CONNECTIONS) {
            let pool = whole(name, &raw, 1, 10_000, POOL_ALLOWED)?;
            config.redis_max_connections = u32::try_from(pool).expect("at most 10000");
        }
        if let Some((name, raw)) = var(DATABASE_URL) {
            if !url_ok(raw.trim(), &["postgres", "postgresql"]) {
                return Err(ConfigError::invalid(name, &raw, DATABASE_URL_ALLOWED));
            }
            config.database_url = Some(raw.trim().to_owned());
        }
        if let Some((name, raw)) = var(DATABASE_SCHEMA) {
            let schema = raw.trim();
            if !schema_ok(schema) {
                return Err(ConfigError::invalid(name, &raw, SCHEMA_ALLOWED));
            }
            config.database_schema = schema.to_owned();
        }
        if let Some((name, raw)) = var(DATABASE_MAX_CONNECTIONS) {
            let pool = whole(name, &raw, 1, 1000, DATABASE_POOL_ALLOWED)?;
            config.database_max_connections = u32::try_from(pool).expect("at most 1000");
        }
        if let Some((name, raw)) = var(HIT_RATE_TARGET) {
            let percent = raw.trim().parse::<f64>().ok().filter(|p| (0.0..=100.0).contains(p));
            config.hit_rate_target_percent = percent.ok_or_else(|| {
                ConfigError::invalid(name, &raw, "expected a percentage from 0 to 100 (decimals allowed)")
            })?;
        }
        if let Some((name, raw)) = var(RESPONSE_TIME_TARGET) {
            let ms = whole(name, &raw, 1, 60_000, "expected a whole number of milliseconds from 1 to 60000")?;
            config.response_time_target = Duration::from_millis(ms);
        }
        if let Some((name, raw)) = var(MONITORING_INTERVAL) {
            let s = whole(name, &raw, 1, 86_400, "expected a whole number of seconds from 1 to 86400")?;
            config.monitoring_interval = Duration::from_secs(s);
        }
        if let Some((name, raw)) = var(ALERTS_ENABLED) {
            config.performance_alerts_enabled = flag(name, &raw)?;
        }
        let allow_set = var(ALLOW_TTL);
        if let Some((name, raw)) = &allow_set {
            let s = whole(name, raw, 1, 86_400, "expected a whole number of seconds from 1 to 86400")?;
            config.allow_ttl = Duration::from_secs(s);
        }
        let deny_set = var(DENY_TTL);
        if let Some((name, raw)) = &deny_set {
            let s = whole(name, raw, 0, 86_400, "expected a whole number of seconds from 0 to 86400")?;
            config.deny_ttl = Duration::from_secs(s);
        }
        if config.deny_ttl > config.allow_ttl {
            // Blame the variable that was set: the deny ttl if it was, else the allow ttl that
            // went below the preset's deny ttl.
            return Err(match (deny_set, allow_set) {
                (None, Some((name, raw))) => ConfigError::invalid(
                    name,
                    &raw,
                    format!("expected at least the deny ttl ({}, {DENY_TTL})", secs(config.deny_ttl)),
                ),
                (Some((name, raw)), _) => ConfigError::invalid(
                    name,
                    &raw,
                    format!("expected at most the allow ttl ({}, {ALLOW_TTL})", secs(config.allow_ttl)),
                ),
                (None, None) => unreachable!("every preset caches denies at most as long as allows"),
            });
        }
        if let Some((name, raw)) = var(MAX_STALENESS) {
            let ms = whole(name, &raw, 10, 60_000, "expected a whole number of milliseconds from 10 to 60000")?;
            config.max_staleness = Duration::from_millis(ms);
        }
        if let Some((name, raw)) = var(AUTHORIZER_TIMEOUT) {
            let ms = whole(name, &raw, 1, 60_000, "expected a whole number of milliseconds from 1 to 60000")?;
            config.authorizer_timeout = Duration::from_millis(ms);
        }
        if let Some((name, raw)) = var(NAMESPACE) {
            let namespace = raw.trim();
            if !namespace_ok(namespace) {
                return Err(ConfigError::invalid(name, &raw, NAMESPACE_ALLOWED));
            }
            config.redis_namespace = namespace.to_owned();
        }
        if let Some(raw) = lookup(SECRET) {
            // Taken as is: surrounding whitespace is part of a secret.
            if raw.len() < SECRET_MIN_LEN {
                return Err(ConfigError::redacted(SECRET, SECRET_ALLOWED));
            }
            config.secret = Some(Secret::new(raw));
        }
        match (lookup(ROTATION_SECRET), var(ROTATION_UNTIL)) {
            (None, None) => {}
            (Some(_), None) => {
                return Err(ConfigError::missing(ROTATION_UNTIL, "required with AUTHZ_CACHE_ROTATION_SECRET"));
            }
            (None, Some(_)) => {
                return Err(ConfigError::missing(ROTATION_SECRET, "required with AUTHZ_CACHE_ROTATION_UNTIL"));
            }
            (Some(secret), Some((name, raw))) => {
                if secret.len() < SECRET_MIN_LEN {
                    return Err(ConfigError::redacted(ROTATION_SECRET, SECRET_ALLOWED));
                }
                let secs = whole(name, &raw, 1, 253_402_300_799, ROTATION_UNTIL_ALLOWED)?;
                config.rotation = Some((Secret::new(secret), UNIX_EPOCH + Duration::from_secs(secs)));
            }
        }
        config.check()?;
        Ok(config)
    }

    /// Checks what cannot work or would be unsafe, whoever set it: URLs, namespace, schema, pool
    /// sizes, secret, deny ttl at most the allow ttl.
    fn check(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.redis_url {
            check_url(REDIS_URL, url, &["redis", "rediss"], REDIS_URL_ALLOWED)?;
        }
        if let Some(url) = &self.database_url {
            check_url(DATABASE_URL, url, &["postgres", "postgresql"], DATABASE_URL_ALLOWED)?;
        }
        if !namespace_ok(&self.redis_namespace) {
            return Err(ConfigError::invalid(NAMESPACE, &self.redis_namespace, NAMESPACE_ALLOWED));
        }
        if self.redis_max_connections == 0 {
            return Err(ConfigError::invalid(REDIS_MAX_CONNECTIONS, "0", POOL_ALLOWED));
        }
        if !schema_ok(&self.database_schema) {
            return Err(ConfigError::invalid(DATABASE_SCHEMA, &self.database_schema, SCHEMA_ALLOWED));
        }
        if !(1..=1000).contains(&self.database_max_connections) {
            let pool = self.database_max_connections.to_string();
            return Err(ConfigError::invalid(DATABASE_MAX_CONNECTIONS, &pool, DATABASE_POOL_ALLOWED));
        }
        if self.deny_ttl > self.allow_ttl {
            return Err(ConfigError::invalid(
                DENY_TTL,
                &secs(self.deny_ttl),
                format!("expected at most the allow ttl ({}, {ALLOW_TTL})", secs(self.allow_ttl)),
            ));
        }
        if self.rotation.as_ref().is_some_and(|(secret, _)| secret.expose().len() < SECRET_MIN_LEN) {
            return Err(ConfigError::redacted(ROTATION_SECRET, SECRET_ALLOWED));
        }
        match &self.secret {
            Some(secret) if secret.expose().len() < SECRET_MIN_LEN => {
                Err(ConfigError::redacted(SECRET, SECRET_ALLOWED))
            }
            None if self.mode == Mode::Production && (self.redis_url.is_some() || self.database_url.is_some()) => {
                Err(ConfigError::missing(
                    SECRET,
                    "required in production mode when REDIS_URL or DATABASE_URL is set: at least 16 bytes \
                     (32 random bytes recommended), the same in every instance",
                ))
            }
            _ => Ok(()),
        }
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
            .max_staleness(self.max_staleness);
        if let Some((secret, until)) = &self.rotation {
            builder = builder.rotation_secret(secret.expose(), *until);
        }
        #[cfg(any(feature = "redis", feature = "postgres"))]
        if self.redis_url.is_some() || self.database_url.is_some() {
            // One secret for both tiers (the cache refuses two), and one warning when it is random.
            let secret = self.shared_secret();
            #[cfg(feature = "redis")]
            if let Some(url) = &self.redis_url {
                let tier = crate::tier::redis::RedisTier::builder(url.as_str(), secret)
                    .namespace(self.redis_namespace.as_str())
                    .pool_size(self.redis_max_connections)
                    .build()
                    .map_err(|e| {
                        ConfigError::invalid(REDIS_URL, url, format!("expected a URL the redis client accepts ({e})"))
                    })?;
                builder = builder.l2(tier);
            }
            #[cfg(feature = "postgres")]
            if let Some(url) = &self.database_url {
                builder = builder.l3(build_postgres(url, self.postgres_builder(url, secret))?);
            }
        }
        Ok(builder)
    }

    /// L3 as this configuration describes it (feature `postgres`): `None` without a
    /// `database_url`, otherwise a [`PostgresTier`](crate::PostgresTier) on it with
    /// [`database_schema`](Self::database_schema), [`database_max_connections`](Self::database_max_connections)
    /// and the secret, with the tier's defaults for everything else. Without a secret
    /// (development and testing only), the random per-process secret that
    /// [`apply`](Self::apply) gives L2 keys it too, and a warning says so. Connections are made
    /// lazily; call it inside a Tokio runtime. The schema is not migrated here.
    ///
    /// # Errors
    ///
    /// As [`apply`](Self::apply): what cannot work or would be unsafe, or a URL the tier rejects.
    #[cfg(feature = "postgres")]
    pub fn postgres_tier(&self) -> Result<Option<crate::PostgresTier>, ConfigError> {
        self.postgres_tier_builder()?
            .map(|builder| build_postgres(self.database_url.as_deref().unwrap_or_default(), builder))
            .transpose()
    }

    /// Like [`postgres_tier`](Self::postgres_tier), before `build`: for the settings the
    /// environment does not cover (timeouts, breaker, warming). `build` may still reject a URL
    /// whose scheme is not lowercase.
    ///
    /// # Errors
    ///
    /// What cannot work or would be unsafe (the checks of [`from_env`](Self::from_env)).
    #[cfg(feature = "postgres")]
    pub fn postgres_tier_builder(&self) -> Result<Option<crate::PostgresTierBuilder>, ConfigError> {
        self.check()?;
        Ok(self.database_url.as_deref().map(|url| self.postgres_builder(url, self.shared_secret())))
    }

    #[cfg(feature = "postgres")]
    fn postgres_builder(&self, url: &str, secret: &[u8]) -> crate::PostgresTierBuilder {
        crate::PostgresTier::builder(url, secret)
            .schema(self.database_schema.as_str())
            .pool_size(self.database_max_connections)
    }

    /// The secret of the shared tiers: the configured one, else (development and testing; `check`
    /// refuses production) the per-process one, with a warning.
    #[cfg(any(feature = "redis", feature = "postgres"))]
    fn shared_secret(&self) -> &[u8] {
        match &self.secret {
            Some(secret) => secret.expose(),
            None => {
                tracing::warn!(
                    target: "authz_cache",
                    mode = %self.mode,
                    "AUTHZ_CACHE_SECRET is not set: the shared tiers (L2, L3) are keyed with a random \
                     per-process secret, so instances will not share their entries"
                );
                process_secret()
            }
        }
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

/// A configuration value is invalid: which variable, which value, what is allowed.
///
/// `Display` is one line, e.g.
/// `L1_CACHE_SIZE_MB="abc": expected a whole number of megabytes from 1 to 1048576`.
/// The secret is shown as `<redacted>` and URL passwords as `***`.
#[derive(Clone, Debug)]
pub struct ConfigError {
    variable: &'static str,
    value: Value,
    allowed: Cow<'static, str>,
}

/// The offending value, already safe to print.
#[derive(Clone, Debug)]
enum Value {
    Missing,
    Redacted,
    Shown(String),
}

impl ConfigError {
    /// `raw` shown, with any URL password masked.
    fn invalid(variable: &'static str, raw: &str, allowed: impl Into<Cow<'static, str>>) -> Self {
        Self { variable, value: Value::Shown(mask_url(raw).into_owned()), allowed: allowed.into() }
    }

    fn redacted(variable: &'static str, allowed: &'static str) -> Self {
        Self { variable, value: Value::Redacted, allowed: allowed.into() }
    }

    fn missing(variable: &'static str, allowed: &'static str) -> Self {
        Self { variable, value: Value::Missing, allowed: allowed.into() }
    }

    /// The environment variable, e.g. `L1_CACHE_SIZE_MB`.
    pub fn variable(&self) -> &str {
        self.variable
    }

    /// The offending value; `<redacted>` for the secret, URLs with their password replaced by
    /// `***`; empty when the variable is required but not set (see [`is_missing`](Self::is_missing)).
    pub fn value(&self) -> &str {
        match &self.value {
            Value::Missing => "",
            Value::Redacted => "<redacted>",
            Value::Shown(value) => value,
        }
    }

    /// What the variable accepts.
    pub fn allowed(&self) -> &str {
        &self.allowed
    }

    /// Whether the variable is required but not set.
    pub fn is_missing(&self) -> bool {
        matches!(self.value, Value::Missing)
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Value::Missing => write!(f, "{} is not set: {}", self.variable, self.allowed),
            Value::Redacted => write!(f, "{}=<redacted>: {}", self.variable, self.allowed),
            // `{:?}` quotes and escapes, so the message stays on one line.
            Value::Shown(value) => write!(f, "{}={:?}: {}", self.variable, value, self.allowed),
        }
    }
}

impl std::error::Error for ConfigError {}

/// A whole number in `min..=max`, surrounding whitespace ignored.
fn whole(variable: &'static str, raw: &str, min: u64, max: u64, allowed: &'static str) -> Result<u64, ConfigError> {
    raw.trim()
        .parse::<u64>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| ConfigError::invalid(variable, raw, allowed))
}

fn flag(variable: &'static str, raw: &str) -> Result<bool, ConfigError> {
    let value = raw.trim();
    let is = |words: &[&str]| words.iter().any(|w| value.eq_ignore_ascii_case(w));
    if is(&["true", "1", "yes"]) {
        Ok(true)
    } else if is(&["false", "0", "no"]) {
        Ok(false)
    } else {
        Err(ConfigError::invalid(variable, raw, "expected true, false, 1, 0, yes or no"))
    }
}

/// Builds a tier from [`CacheConfig::postgres_builder`]; what it rejects is blamed on the URL
/// (the config checked the rest).
#[cfg(feature = "postgres")]
fn build_postgres(url: &str, builder: crate::PostgresTierBuilder) -> Result<crate::PostgresTier, ConfigError> {
    builder
        .build()
        .map_err(|e| ConfigError::invalid(DATABASE_URL, url, format!("expected a URL the postgres tier accepts ({e})")))
}

/// A duration in seconds, as `AUTHZ_CACHE_*_TTL_S` writes it.
fn secs(duration: Duration) -> String {
    if duration.subsec_nanos() == 0 { format!("{} s", duration.as_secs()) } else { format!("{duration:?}") }
}

/// A light check of `scheme://[user[:password]@]host[:port][,host[:port]...][/path][?query]`:
/// one of `schemes`, at least one host, numeric ports. No connection is made.
fn check_url(variable: &'static str, raw: &str, schemes: &[&str], allowed: &'static str) -> Result<(), ConfigError> {
    if url_ok(raw, schemes) { Ok(()) } else { Err(ConfigError::invalid(variable, raw, allowed)) }
}

fn url_ok(url: &str, schemes: &[&str]) -> bool {
    // U+FFFD: `from_env` read bytes that were not UTF-8.
    if url.chars().any(|c| c.is_whitespace() || c.is_control() || c == char::REPLACEMENT_CHARACTER) {
        return false;
    }
    let Some((scheme, rest)) = url.split_once("://") else { return false };
    if !schemes.iter().any(|s| scheme.eq_ignore_ascii_case(s)) {
        return false;
    }
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let hosts = authority.rsplit_once('@').map_or(authority, |(_, hosts)| hosts);
    hosts.split(',').all(host_port_ok)
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`, with a non-empty host and a port in 1..=65535.
fn host_port_ok(host_port: &str) -> bool {
    let (host, port) = match host_port.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((host, "")) => (host, None),
            Some((host, after)) => match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return false,
            },
            None => return false,
        },
        None => match host_port.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        },
    };
    let host_ok = !host.is_empty() && !host.contains(['[', ']', '@']);
    let port_ok = port.is_none_or(|p| p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok_and(|p| p > 0));
    host_ok && port_ok
}

/// `url` with the password of its user info and any `password=` query parameter replaced by
/// `***`. Errs on the side of masking: the user info ends at the last `@`, wherever it is, so a
/// password with unescaped `/`, `?` or `#` is masked too.
fn mask_url(url: &str) -> Cow<'_, str> {
    let start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[start..];
    let (head, tail) = match rest.rfind('@') {
        Some(at) => match rest[..at].find(':') {
            Some(colon) => (Cow::Owned(format!("{}:***", &url[..start + colon])), &rest[at..]),
            None => (Cow::Borrowed(&url[..start + at]), &rest[at..]),
        },
        None => (Cow::Borrowed(&url[..start]), rest),
    };
    let tail = match tail.split_once('?') {
        Some((before, query)) if query.split('&').any(is_password_param) => {
            let params: Vec<&str> =
                query.split('&').map(|param| if is_password_param(param) { "password=***" } else { param }).collect();
            Cow::Owned(format!("{before}?{}", params.join("&")))
        }
        _ => Cow::Borrowed(tail),
    };
    match (head, tail) {
        (Cow::Borrowed(_), Cow::Borrowed(_)) => Cow::Borrowed(url),
        (head, tail) => Cow::Owned(format!("{head}{tail}")),
    }
}

fn is_password_param(param: &str) -> bool {
    param.split_once('=').is_some_and(|(key, _)| key.eq_ignore_ascii_case("password"))
}

/// 32 random bytes, the same for the whole process: the secret of L2 and L3 when none is
/// configured (development and testing), from the OS-seeded keys of
/// [`RandomState`](std::hash::RandomState).
#[cfg(any(feature = "redis", feature = "postgres"))]
fn process_secret() -> &'static [u8] {
    use std::hash::BuildHasher;

    static SECRET: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    SECRET.get_or_init(|| {
        let mut secret = [0; 32];
        for (i, chunk) in secret.chunks_exact_mut(8).enumerate() {
            let hash = std::hash::RandomState::new().hash_one((i, std::process::id(), std::time::SystemTime::now()));
            chunk.copy_from_slice(&hash.to_le_bytes());
        }
        secret
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::{AuthzCache, Decision, Permission, Principal};

    const SECRET_VALUE: &str = "Zq7-DISTINCTIVE-secret-value-9xK";
    const PASSWORD: &str = "pw-DISTINCTIVE-hunter2";

    fn from(vars: &[(&str, &str)]) -> Result<CacheConfig, ConfigError> {
        let env: HashMap<String, String> = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        CacheConfig::from_lookup(|name| env.get(name).cloned())
    }

    fn error(vars: &[(&str, &str)]) -> ConfigError {
        from(vars).expect_err("configuration should be rejected")
    }

    /// The error names `variable` and `value`, on one line.
    fn assert_names(err: &ConfigError, variable: &str, value: &str) {
        let message = err.to_string();
        assert_eq!(err.variable(), variable, "{message}");
        assert_eq!(err.value(), value, "{message}");
        assert!(message.starts_with(variable), "{message}");
        assert!(message.contains(&format!("{value:?}")), "{message}");
        assert!(!err.allowed().is_empty(), "{message}");
        assert!(!message.contains('\n'), "{message}");
    }

    fn allow_all() -> AuthzCacheBuilder {
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

    #[test]
    fn the_secret_is_never_printed() {
        let url = format!("redis://default:{PASSWORD}@127.0.0.1:6379/0");
        let base = [("AUTHZ_CACHE_MODE", "production"), ("AUTHZ_CACHE_SECRET", SECRET_VALUE)];
        let config = from(&[base[0], base[1], ("REDIS_URL", url.as_str())]).unwrap();
        let debug = format!("{config:?} {config:#?}");
        assert!(!debug.contains(SECRET_VALUE) && !debug.contains(PASSWORD), "{debug}");
        assert!(debug.contains("redis://default:***@127.0.0.1:6379/0"), "{debug}");
        assert!(debug.contains("<redacted>"), "{debug}");
        let secret = config.secret().unwrap();
        assert_eq!(format!("{secret} {secret:?}"), "<redacted> <redacted>");

        let mut errors = vec![
            error(&[base[0], base[1], ("L1_CACHE_SIZE_MB", "abc")]),
            error(&[base[0], base[1], ("REDIS_URL", url.as_str()), ("REDIS_MAX_CONNECTIONS", "0")]),
            error(&[base[0], ("AUTHZ_CACHE_SECRET", "DISTINCTIVE")]),
            error(&[base[0], ("AUTHZ_CACHE_SECRET", &SECRET_VALUE[..15])]),
        ];
        errors.push(
            CacheConfig::preset(Mode::Production).with_secret(Some(Secret::new("DISTINCTIVE"))).check().unwrap_err(),
        );
        for err in &errors {
            let shown = format!("{err} {err:?} {}", err.value());
            assert!(!shown.contains(SECRET_VALUE) && !shown.contains(&SECRET_VALUE[..15]), "{shown}");
            assert!(!shown.contains("DISTINCTIVE"), "{shown}");
        }
        let err = &errors[2];
        assert_eq!((err.variable(), err.value()), ("AUTHZ_CACHE_SECRET", "<redacted>"));
        assert!(err.to_string().starts_with("AUTHZ_CACHE_SECRET=<redacted>: expected at least 16 bytes"), "{err}");
    }

    #[test]
    fn a_rotation_needs_both_variables_and_hides_its_secret() {
        const OTHER: &str = "Rt5-DISTINCTIVE-rotation-secret-";
        let base = [("AUTHZ_CACHE_MODE", "production"), ("AUTHZ_CACHE_SECRET", SECRET_VALUE)];
        let config = from(&[
            base[0],
            base[1],
            ("AUTHZ_CACHE_ROTATION_SECRET", OTHER),
            ("AUTHZ_CACHE_ROTATION_UNTIL", "2000000000"),
        ])
        .unwrap();
        let (secret, until) = config.rotation().expect("a rotation");
        assert_eq!(secret.expose(), OTHER.as_bytes());
        assert_eq!(until, UNIX_EPOCH + Duration::from_secs(2_000_000_000));
        let debug = format!("{config:?} {config:#?}");
        assert!(!debug.contains(OTHER) && debug.contains("rotation"), "{debug}");
        assert_eq!(from(&base).unwrap().rotation().map(|(_, t)| t), None);

        let err = error(&[base[0], base[1], ("AUTHZ_CACHE_ROTATION_SECRET", OTHER)]);
        assert_eq!(err.variable(), "AUTHZ_CACHE_ROTATION_UNTIL", "{err}");
        let err = error(&[base[0], base[1], ("AUTHZ_CACHE_ROTATION_UNTIL", "2000000000")]);
        assert_eq!(err.variable(), "AUTHZ_CACHE_ROTATION_SECRET", "{err}");
        let err = error(&[
            base[0],
            base[1],
            ("AUTHZ_CACHE_ROTATION_SECRET", &OTHER[..15]),
            ("AUTHZ_CACHE_ROTATION_UNTIL", "2000000000"),
        ]);
        assert_eq!((err.variable(), err.value()), ("AUTHZ_CACHE_ROTATION_SECRET", "<redacted>"));
        assert!(!format!("{err} {err:?}").contains(&OTHER[..15]), "{err}");
        for bad in ["soon", "0", "-5", "1.5", "99999999999999"] {
            let err =
                error(&[base[0], base[1], ("AUTHZ_CACHE_ROTATION_SECRET", OTHER), ("AUTHZ_CACHE_ROTATION_UNTIL", bad)]);
            assert_names(&err, "AUTHZ_CACHE_ROTATION_UNTIL", bad);
        }
        let short = CacheConfig::preset(Mode::Development)
            .with_rotation(Some((Secret::new("short"), SystemTime::now())))
            .check()
            .unwrap_err();
        assert_eq!(short.variable(), "AUTHZ_CACHE_ROTATION_SECRET");
    }

    #[test]
    fn url_passwords_are_masked() {
        for (variable, url, masked) in [
            ("REDIS_URL", format!("redis://:{PASSWORD}@"), "redis://:***@".to_owned()),
            ("REDIS_URL", format!("redis://user:{PASSWORD}@host:port"), "redis://user:***@host:port".to_owned()),
            // An unescaped `/` in the password: the URL is invalid, and still masked.
            ("REDIS_URL", format!("redis://user:a/{PASSWORD}@host"), "redis://user:***@host".to_owned()),
            ("REDIS_URL", format!("redis:/user:{PASSWORD}@host"), "redis:***@host".to_owned()),
            (
                "DATABASE_URL",
                format!("mysql://app:{PASSWORD}@db:3306/app?sslmode=require"),
                "mysql://app:***@db:3306/app?sslmode=require".to_owned(),
            ),
            (
                "DATABASE_URL",
                format!("postgres:///app?user=app&Password={PASSWORD}"),
                "postgres:///app?user=app&password=***".to_owned(),
            ),
        ] {
            let err = error(&[(variable, url.as_str())]);
            assert_names(&err, variable, &masked);
            assert!(!format!("{err} {err:?}").contains(PASSWORD), "{err}");
        }
        assert_eq!(mask_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(mask_url("redis://user@host"), "redis://user@host");
        assert_eq!(mask_url("abc"), "abc");
        // A password as long as its mask is masked all the same.
        assert_eq!(mask_url("redis://u:abc@h"), "redis://u:***@h");

        let config = CacheConfig::preset(Mode::Development)
            .with_redis_url(Some(format!("redis://:{PASSWORD}@127.0.0.1:6379")))
            .with_database_url(Some(format!("postgres://app:{PASSWORD}@db/app?password={PASSWORD}")));
        let debug = format!("{config:?}");
        assert!(!debug.contains(PASSWORD), "{debug}");
        assert!(debug.contains("postgres://app:***@db/app?password=***"), "{debug}");
    }

    #[test]
    fn production_with_a_shared_tier_needs_a_secret() {
        for (variable, url) in [("REDIS_URL", "redis://127.0.0.1:6379"), ("DATABASE_URL", "postgres://db/app")] {
            let err = error(&[("AUTHZ_CACHE_MODE", "production"), (variable, url)]);
            assert_eq!(err.variable(), "AUTHZ_CACHE_SECRET", "{err}");
            assert!(err.is_missing(), "{err}");
            assert!(err.to_string().starts_with("AUTHZ_CACHE_SECRET is not set: required in production"), "{err}");
            // Development and testing do without.
            for mode in ["development", "testing"] {
                from(&[("AUTHZ_CACHE_MODE", mode), (variable, url)]).unwrap();
            }
        }
        // Production without a shared tier does without too.
        from(&[("AUTHZ_CACHE_MODE", "production")]).unwrap();
        // Through the builder, `apply` catches it.
        let config = CacheConfig::preset(Mode::Production).with_redis_url(Some("redis://127.0.0.1:6379".into()));
        assert_eq!(config.apply(allow_all()).unwrap_err().variable(), "AUTHZ_CACHE_SECRET");
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

    #[cfg(feature = "postgres")]
    #[tokio::test]
    async fn postgres_tier_follows_the_config() {
        assert!(CacheConfig::default().postgres_tier().unwrap().is_none());
        assert!(CacheConfig::default().postgres_tier_builder().unwrap().is_none());

        // Nothing listens on port 1: connections are lazy, so building needs no Postgres.
        let config = from(&[
            ("DATABASE_URL", "postgres://app@127.0.0.1:1/app"),
            ("DATABASE_SCHEMA", "tenant_7"),
            ("DATABASE_MAX_CONNECTIONS", "3"),
        ])
        .unwrap();
        let tier = config.postgres_tier().unwrap().expect("DATABASE_URL is set");
        assert_eq!(tier.schema(), "tenant_7");
        assert!(config.postgres_tier_builder().unwrap().is_some());
        // Without a secret (development), the per-process one keys it, as it keys L2.
        assert_eq!(tier.shared.secret, process_secret());
        let config = config.with_secret(Some(Secret::new(SECRET_VALUE)));
        assert_eq!(config.postgres_tier().unwrap().unwrap().shared.secret, SECRET_VALUE.as_bytes());

        // The config's checks apply; what only the tier rejects is blamed on the URL.
        let err = config.clone().with_database_schema("9lives").postgres_tier().unwrap_err();
        assert_eq!(err.variable(), "DATABASE_SCHEMA");
        let err = config.clone().with_database_url(Some("POSTGRES://db/app".into())).postgres_tier().unwrap_err();
        assert_names(&err, "DATABASE_URL", "POSTGRES://db/app");
        let err = CacheConfig::preset(Mode::Production)
            .with_database_url(Some("postgres://db/app".into()))
            .postgres_tier()
            .unwrap_err();
        assert!(err.is_missing() && err.variable() == "AUTHZ_CACHE_SECRET", "{err}");
    }

    #[cfg(feature = "postgres")]
    #[tokio::test]
    async fn apply_adds_l3_for_a_database_url() {
        let config =
            CacheConfig::preset(Mode::Testing).with_database_url(Some("postgres://app@127.0.0.1:1/app".into()));
        let cache = config.apply(allow_all()).unwrap().build();
        assert!(cache.stats().tiers.l3.is_some());
        assert!(cache.stats().tiers.l2.is_none());
        let err = config.with_database_url(Some("POSTGRES://db/app".into())).apply(allow_all()).unwrap_err();
        assert_eq!(err.variable(), "DATABASE_URL");
    }

    /// Both tiers in one cache: the cache refuses (panics) when their secrets differ, so this
    /// proves they get the same one, configured or per-process.
    #[cfg(all(feature = "redis", feature = "postgres"))]
    #[tokio::test]
    async fn apply_with_both_urls_gives_both_tiers_the_same_secret() {
        let urls = [("REDIS_URL", "redis://127.0.0.1:1/0"), ("DATABASE_URL", "postgres://app@127.0.0.1:1/app")];
        for mode in ["development", "testing"] {
            let config = from(&[("AUTHZ_CACHE_MODE", mode), urls[0], urls[1]]).unwrap();
            let cache = config.apply(allow_all()).unwrap().build();
            let tiers = cache.stats().tiers;
            assert!(tiers.l2.is_some() && tiers.l3.is_some(), "{mode}");
        }
        let config =
            from(&[("AUTHZ_CACHE_MODE", "production"), ("AUTHZ_CACHE_SECRET", SECRET_VALUE), urls[0], urls[1]])
                .unwrap();
        let cache = config.apply(allow_all()).unwrap().build();
        let tiers = cache.stats().tiers;
        assert!(tiers.l2.is_some() && tiers.l3.is_some());
        // A bad second tier fails the whole `apply`.
        let err = config.with_database_url(Some("POSTGRES://db/app".into())).apply(allow_all()).unwrap_err();
        assert_eq!(err.variable(), "DATABASE_URL");
    }

    #[cfg(not(feature = "postgres"))]
    #[test]
    fn a_database_url_needs_the_postgres_feature() {
        let config = CacheConfig::default().with_database_url(Some("postgres://app@127.0.0.1/app".into()));
        let err = config.apply(allow_all()).unwrap_err();
        assert_names(&err, "DATABASE_URL", "postgres://app@127.0.0.1/app");
        assert!(err.allowed().contains("`postgres` feature"), "{err}");
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
