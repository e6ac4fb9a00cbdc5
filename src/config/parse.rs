//! What the sections share: whole numbers, flags, URLs (checked and masked), durations in
//! messages.

use std::borrow::Cow;
use std::time::Duration;

use super::ConfigError;

/// How a section reads the environment: a variable's name and raw value, when it is set.
pub(super) type Var<'a> = &'a dyn Fn(&'static str) -> Option<(&'static str, String)>;

/// A whole number in `min..=max`, surrounding whitespace ignored.
pub(super) fn whole(
    variable: &'static str,
    raw: &str,
    min: u64,
    max: u64,
    allowed: &'static str,
) -> Result<u64, ConfigError> {
    raw.trim()
        .parse::<u64>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| ConfigError::invalid(variable, raw, allowed))
}

pub(super) fn flag(variable: &'static str, raw: &str) -> Result<bool, ConfigError> {
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

/// A duration in seconds, as `AUTHZ_CACHE_*_TTL_S` writes it.
pub(super) fn secs(duration: Duration) -> String {
    if duration.subsec_nanos() == 0 { format!("{} s", duration.as_secs()) } else { format!("{duration:?}") }
}

/// A light check of `scheme://[user[:password]@]host[:port][,host[:port]...][/path][?query]`:
/// one of `schemes`, at least one host, numeric ports. No connection is made.
pub(super) fn check_url(
    variable: &'static str,
    raw: &str,
    schemes: &[&str],
    allowed: &'static str,
) -> Result<(), ConfigError> {
    if url_ok(raw, schemes) { Ok(()) } else { Err(ConfigError::invalid(variable, raw, allowed)) }
}

pub(super) fn url_ok(url: &str, schemes: &[&str]) -> bool {
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
pub(super) fn mask_url(url: &str) -> Cow<'_, str> {
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

#[cfg(test)]
mod tests {
    use super::mask_url;
    use crate::config::tests::{PASSWORD, assert_names, error};
    use crate::config::{CacheConfig, Mode};

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
}
