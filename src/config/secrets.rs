//! The secrets: [`Secret`], `AUTHZ_CACHE_SECRET`, the rotation (`AUTHZ_CACHE_ROTATION_SECRET`,
//! `AUTHZ_CACHE_ROTATION_UNTIL`) and the per-process secret of the shared tiers.

use std::fmt;
use std::time::{Duration, UNIX_EPOCH};

use super::parse::{Var, whole};
use super::{CacheConfig, ConfigError, Mode};

pub(super) const SECRET: &str = "AUTHZ_CACHE_SECRET";
pub(super) const ROTATION_SECRET: &str = "AUTHZ_CACHE_ROTATION_SECRET";
const ROTATION_UNTIL: &str = "AUTHZ_CACHE_ROTATION_UNTIL";
const ROTATION_UNTIL_ALLOWED: &str =
    "expected the end of the rotation in whole seconds since the Unix epoch (e.g. date -d '+2 hours' +%s)";

const SECRET_ALLOWED: &str = "expected at least 16 bytes (32 random bytes recommended)";
const SECRET_MIN_LEN: usize = 16;

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

impl CacheConfig {
    /// `AUTHZ_CACHE_SECRET`, and `AUTHZ_CACHE_ROTATION_SECRET` with `AUTHZ_CACHE_ROTATION_UNTIL`.
    pub(super) fn read_secrets(
        &mut self,
        lookup: &dyn Fn(&str) -> Option<String>,
        var: Var<'_>,
    ) -> Result<(), ConfigError> {
        if let Some(raw) = lookup(SECRET) {
            // Taken as is: surrounding whitespace is part of a secret.
            if raw.len() < SECRET_MIN_LEN {
                return Err(ConfigError::redacted(SECRET, SECRET_ALLOWED));
            }
            self.secret = Some(Secret::new(raw));
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
                self.rotation = Some((Secret::new(secret), UNIX_EPOCH + Duration::from_secs(secs)));
            }
        }
        Ok(())
    }

    /// Secret and rotation secret long enough; a secret in production with a shared tier.
    pub(super) fn check_secrets(&self) -> Result<(), ConfigError> {
        if self.rotation.as_ref().is_some_and(|(secret, _)| secret.expose().len() < SECRET_MIN_LEN) {
            return Err(ConfigError::redacted(ROTATION_SECRET, SECRET_ALLOWED));
        }
        match &self.secret {
            Some(secret) if secret.expose().len() < SECRET_MIN_LEN => {
                Err(ConfigError::redacted(SECRET, SECRET_ALLOWED))
            }
            None if self.mode == Mode::Production && (self.uses_redis() || self.database_url.is_some()) => {
                Err(ConfigError::missing(
                    SECRET,
                    "required in production mode when REDIS_URL or DATABASE_URL is set: at least 16 bytes \
                     (32 random bytes recommended), the same in every instance",
                ))
            }
            _ => Ok(()),
        }
    }

    /// The secret that keys the shared tiers, for a cache built without [`apply`](Self::apply):
    /// the configured one, else (development and testing; `check` refuses production) a random
    /// per-process one (the same for every cache of the process), with a warning.
    pub fn secret_bytes(&self) -> &[u8] {
        self.shared_secret()
    }

    /// See [`secret_bytes`](Self::secret_bytes).
    pub(super) fn shared_secret(&self) -> &[u8] {
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
}

/// 32 random bytes, the same for the whole process: the secret of L2 and L3 when none is
/// configured (development and testing), from the OS-seeded keys of
/// [`RandomState`](std::hash::RandomState).
pub(super) fn process_secret() -> &'static [u8] {
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
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use super::Secret;
    use crate::config::tests::{PASSWORD, SECRET_VALUE, allow_all, assert_names, error, from};
    use crate::config::{CacheConfig, Mode};

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

    /// Both tiers in one cache, keyed by the cache's one secret, configured or per-process.
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
}
