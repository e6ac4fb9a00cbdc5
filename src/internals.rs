//! Unstable hooks into the crate's building blocks, for its own criterion benches and fuzz
//! targets (feature `internals`). Not part of the public API: no documentation promises, no
//! semver; do not use them from applications.
//!
//! ```
//! use tower_authz_cache::__internals::{Envelope, SecretKeys};
//!
//! let keys = SecretKeys::derive(b"0123456789abcdef0123456789abcdef");
//! let id = keys.key_id("bob", "documents:1", "read");
//! let env = Envelope { allowed: true, reason: None, valid_until_ms: 1, computed_at_ms: 0, epochs: [1, 2, 3, 4] };
//! let bytes = env.encode(&keys, &id);
//! assert!(Envelope::decode(&bytes, &keys, &id).is_ok());
//! ```

use std::time::Duration;

use http::request::Parts;

use crate::cache::entry::Entry;
use crate::cache::epoch::EpochStamp;
use crate::cache::key::{CacheKey, Keys};
use crate::tier::memory::MemoryTier;
use crate::{Decision, Permission, Principal, ResolveError};

/// The keys derived from a shared secret (key ids, envelope MACs, scope hashes).
#[derive(Clone)]
pub struct SecretKeys(Keys);

impl std::fmt::Debug for SecretKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKeys(<redacted>)")
    }
}

impl SecretKeys {
    /// Derives the keys from `secret` (HMAC-SHA256 per label, as the cache does).
    pub fn derive(secret: &[u8]) -> Self {
        Self(Keys::derive(secret))
    }

    /// The shared-tier key id of a (principal, resource, action) tuple.
    pub fn key_id(&self, principal: &str, resource: &str, action: &str) -> [u8; 32] {
        self.0.key_id(&key(principal, resource, action))
    }
}

fn key(principal: &str, resource: &str, action: &str) -> CacheKey {
    CacheKey::new(&Principal::new(principal), &Permission::new(resource, action))
}

/// The fields of a shared-tier envelope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// The decision.
    pub allowed: bool,
    /// The decision's reason, if any.
    pub reason: Option<String>,
    /// Deadline, ms since the Unix epoch.
    pub valid_until_ms: u64,
    /// When the authorizer answered, ms since the Unix epoch (0: unknown, a version 1 envelope).
    pub computed_at_ms: u64,
    /// Shared epochs: global, principal, resource, entry.
    pub epochs: [u64; 4],
}

impl Envelope {
    /// The MAC'd bytes stored in Redis and Postgres under `key_id`.
    pub fn encode(&self, keys: &SecretKeys, key_id: &[u8]) -> Vec<u8> {
        let mut decision =
            Decision::from_bool(self.allowed).served_from(crate::DecisionSource::Authorizer, self.computed_at_ms);
        if let Some(r) = &self.reason {
            decision = decision.with_reason(r.clone());
        }
        Entry::new(&decision, self.valid_until_ms, EpochStamp::from_shared(self.epochs)).encode(&keys.0, key_id)
    }

    /// Authenticates and decodes `bytes` read under `key_id`; the error says why it was refused.
    pub fn decode(bytes: &[u8], keys: &SecretKeys, key_id: &[u8]) -> Result<Envelope, String> {
        let entry = Entry::decode(bytes, &keys.0, key_id).map_err(|e| e.to_string())?;
        Ok(Envelope {
            allowed: entry.allowed,
            reason: entry.reason.as_deref().map(str::to_owned),
            valid_until_ms: entry.valid_until_ms,
            computed_at_ms: entry.computed_at_ms,
            epochs: entry.stamp.shared(),
        })
    }
}

/// A (principal, resource, action) tuple, built once (as the layer does per request).
#[derive(Clone, Debug)]
pub struct Tuple(CacheKey);

impl Tuple {
    /// The tuple.
    pub fn new(principal: &str, resource: &str, action: &str) -> Self {
        Self(key(principal, resource, action))
    }
}

/// The in-process tier (L1) on its own, bounded in bytes.
pub struct L1(MemoryTier);

impl std::fmt::Debug for L1 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("L1")
    }
}

impl L1 {
    /// An L1 of at most `max_bytes`.
    pub fn new(max_bytes: u64) -> Self {
        Self(MemoryTier::new(max_bytes, Duration::from_secs(3600)))
    }

    /// Stores an allow for the tuple, valid until `valid_until_ms`.
    pub fn insert(&self, tuple: &Tuple, valid_until_ms: u64) {
        let entry = Entry::new(&Decision::allow(), valid_until_ms, EpochStamp::default());
        self.0.insert(tuple.0.clone(), entry);
    }

    /// The held entry's decision for the tuple, if any (deadline and epochs not checked).
    pub fn get(&self, tuple: &Tuple) -> Option<bool> {
        self.0.get(&tuple.0).map(|e| e.allowed)
    }
}

/// The `Authorization: Bearer` parser used by [`BearerToken`](crate::BearerToken): the token,
/// or why the header was refused.
pub fn parse_bearer(parts: &Parts) -> Result<&str, ResolveError> {
    crate::core::principal::parse_bearer(parts)
}
