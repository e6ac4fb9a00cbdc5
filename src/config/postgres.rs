//! The Postgres section: `DATABASE_URL`, `DATABASE_SCHEMA`, `DATABASE_MAX_CONNECTIONS`, and L3 as
//! they describe it.

use super::parse::{Var, check_url, url_ok, whole};
use super::{CacheConfig, ConfigError};
use crate::tier::names::schema_ok;

pub(super) const DATABASE_URL: &str = "DATABASE_URL";
pub(super) const DATABASE_SCHEMA: &str = "DATABASE_SCHEMA";
pub(super) const DATABASE_MAX_CONNECTIONS: &str = "DATABASE_MAX_CONNECTIONS";

const DATABASE_URL_ALLOWED: &str =
    "expected a postgres:// or postgresql:// URL with a host, e.g. postgres://app@127.0.0.1:5432/app";
const DATABASE_POOL_ALLOWED: &str = "expected a whole number of connections from 1 to 1000";
const SCHEMA_ALLOWED: &str = "expected 1 to 40 characters of a-z 0-9 _, not starting with a digit";

impl CacheConfig {
    /// `DATABASE_URL`, `DATABASE_SCHEMA` and `DATABASE_MAX_CONNECTIONS`.
    pub(super) fn read_postgres(&mut self, var: Var<'_>) -> Result<(), ConfigError> {
        if let Some((name, raw)) = var(DATABASE_URL) {
            if !url_ok(raw.trim(), &["postgres", "postgresql"]) {
                return Err(ConfigError::invalid(name, &raw, DATABASE_URL_ALLOWED));
            }
            self.database_url = Some(raw.trim().to_owned());
        }
        if let Some((name, raw)) = var(DATABASE_SCHEMA) {
            let schema = raw.trim();
            if !schema_ok(schema) {
                return Err(ConfigError::invalid(name, &raw, SCHEMA_ALLOWED));
            }
            self.database_schema = schema.to_owned();
        }
        if let Some((name, raw)) = var(DATABASE_MAX_CONNECTIONS) {
            let pool = whole(name, &raw, 1, 1000, DATABASE_POOL_ALLOWED)?;
            self.database_max_connections = u32::try_from(pool).expect("at most 1000");
        }
        Ok(())
    }

    pub(super) fn check_database_url(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.database_url {
            check_url(DATABASE_URL, url, &["postgres", "postgresql"], DATABASE_URL_ALLOWED)?;
        }
        Ok(())
    }

    pub(super) fn check_schema_and_database_pool(&self) -> Result<(), ConfigError> {
        if !schema_ok(&self.database_schema) {
            return Err(ConfigError::invalid(DATABASE_SCHEMA, &self.database_schema, SCHEMA_ALLOWED));
        }
        if !(1..=1000).contains(&self.database_max_connections) {
            let pool = self.database_max_connections.to_string();
            return Err(ConfigError::invalid(DATABASE_MAX_CONNECTIONS, &pool, DATABASE_POOL_ALLOWED));
        }
        Ok(())
    }

    /// L3 as this configuration describes it (feature `postgres`): `None` without a
    /// `database_url`, otherwise a [`PostgresTier`](crate::PostgresTier) on it with
    /// [`database_schema`](Self::database_schema), [`database_max_connections`](Self::database_max_connections)
    /// with the tier's defaults for everything else (the secret is the cache's: see
    /// [`apply`](Self::apply) and [`secret_bytes`](Self::secret_bytes)). Connections are made
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
        Ok(self.database_url.as_deref().map(|url| self.postgres_builder(url)))
    }

    #[cfg(feature = "postgres")]
    pub(super) fn postgres_builder(&self, url: &str) -> crate::PostgresTierBuilder {
        crate::PostgresTier::builder(url).schema(self.database_schema.as_str()).pool_size(self.database_max_connections)
    }
}

/// Builds a tier from [`CacheConfig::postgres_builder`]; what it rejects is blamed on the URL
/// (the config checked the rest).
#[cfg(feature = "postgres")]
pub(super) fn build_postgres(
    url: &str,
    builder: crate::PostgresTierBuilder,
) -> Result<crate::PostgresTier, ConfigError> {
    builder
        .build()
        .map_err(|e| ConfigError::invalid(DATABASE_URL, url, format!("expected a URL the postgres tier accepts ({e})")))
}

#[cfg(test)]
mod tests {
    use crate::config::CacheConfig;
    #[cfg(feature = "postgres")]
    use crate::config::secrets::process_secret;
    #[cfg(feature = "postgres")]
    use crate::config::tests::{SECRET_VALUE, from};
    use crate::config::tests::{allow_all, assert_names};
    #[cfg(feature = "postgres")]
    use crate::config::{Mode, Secret};

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
        // Without a secret (development), the per-process one keys the cache's tiers.
        assert_eq!(config.secret_bytes(), process_secret());
        let config = config.with_secret(Some(Secret::new(SECRET_VALUE)));
        assert_eq!(config.secret_bytes(), SECRET_VALUE.as_bytes());

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

    #[cfg(not(feature = "postgres"))]
    #[test]
    fn a_database_url_needs_the_postgres_feature() {
        let config = CacheConfig::default().with_database_url(Some("postgres://app@127.0.0.1/app".into()));
        let err = config.apply(allow_all()).unwrap_err();
        assert_names(&err, "DATABASE_URL", "postgres://app@127.0.0.1/app");
        assert!(err.allowed().contains("`postgres` feature"), "{err}");
    }
}
