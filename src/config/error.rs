//! [`ConfigError`]: which variable, which value, what is allowed.

use std::borrow::Cow;
use std::fmt;

use super::parse::mask_url;

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
    pub(super) fn invalid(variable: &'static str, raw: &str, allowed: impl Into<Cow<'static, str>>) -> Self {
        Self { variable, value: Value::Shown(mask_url(raw).into_owned()), allowed: allowed.into() }
    }

    pub(super) fn redacted(variable: &'static str, allowed: &'static str) -> Self {
        Self { variable, value: Value::Redacted, allowed: allowed.into() }
    }

    pub(super) fn missing(variable: &'static str, allowed: &'static str) -> Self {
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
