//! Read-your-writes across instances: [`ConsistencyToken`].
//!
//! [`AuthzCache::invalidate`](crate::AuthzCache::invalidate) returns a token: the epoch value the invalidation produced for its
//! scope, MAC'd with the cache's secret. A check that carries it
//! ([`AuthzCache::check_at_least_as_fresh`](crate::AuthzCache::check_at_least_as_fresh), or the layer's `authz-consistency` request header)
//! first raises this process's epoch for that scope to the token's value, so that nothing
//! computed before the invalidation is served here, whatever the backplane has delivered yet.
//! Raising an epoch can only turn entries into misses.
//!
//! A token is checked before it is used: one that does not parse, was not made with this
//! cache's secret (forged, altered, from another deployment), or claims an epoch far ahead of
//! every clock this process knows of is refused with a [`TokenError`] (the layer answers 400),
//! never ignored. Tokens carry no principal id in clear (the scope is a keyed hash) and do not
//! expire: an old one is already satisfied and costs nothing.
//!
//! ```
//! use tower_authz_cache::{AuthzCache, Decision, Invalidation, Permission, Principal};
//! use tower_authz_cache::consistency::ConsistencyToken;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let cache = AuthzCache::builder(|_: Principal, _: Permission| async {
//!     Ok::<_, std::convert::Infallible>(Decision::allow())
//! })
//! .secret(b"the secret every instance shares".to_vec())
//! .build();
//! let token = cache.invalidate(&Invalidation::principal("bob")).await.unwrap();
//! // Sent to the client (a response header), and back with its next request, maybe to another
//! // instance:
//! let sent = token.to_string();
//! let received: ConsistencyToken = sent.parse().unwrap();
//! let bob = Principal::new("bob");
//! let read = Permission::new("documents:1", "read");
//! assert!(cache.check_at_least_as_fresh(&bob, &read, &received).await.unwrap().is_allowed());
//! // A token made with another secret is refused, not ignored.
//! let forged: ConsistencyToken = sent.replacen(".p.", ".r.", 1).parse().unwrap();
//! assert!(cache.require_fresh(&forged).is_err());
//! # });
//! ```

use std::fmt;
use std::str::FromStr;

use crate::cache::epoch::Target;
use crate::cache::key::Keys;
use crate::tier::shared::EpochTarget;

/// The request header the layer reads a token from, by default.
pub const DEFAULT_HEADER: &str = "authz-consistency";

/// How far ahead of this process's clocks (its wall clock, and the highest epoch it has seen) a
/// token's epoch may be. Epoch values are microseconds of a wall clock (a Lamport clock, see the
/// cache's docs), so a token from an instance whose clock runs minutes ahead is accepted; one
/// claiming a value further ahead than this was not made by an instance of this fleet (or its
/// clock is broken) and is refused: raising an epoch past what the shared store will assign
/// next would mask that scope's later invalidations here.
pub const MAX_AHEAD: std::time::Duration = std::time::Duration::from_secs(3600);

const PREFIX: &str = "v1";
const MAC_LABEL: &[u8] = b"tower-authz-cache consistency token v1";

/// Proof of an invalidation: its scope (a keyed hash), the epoch value it produced, and a MAC
/// under the cache's secret. Its text form (`Display`/`FromStr`) is what travels in a header:
/// `v1.<scope>.<hash>.<epoch>.<mac>`, ASCII, about 100 bytes.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ConsistencyToken {
    target: EpochTarget,
    value: u64,
    mac: [u8; 32],
}

/// Why a [`ConsistencyToken`] was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenErrorKind {
    /// Not a token: wrong shape, truncated, bad characters.
    Malformed,
    /// Its MAC does not verify under this cache's secret: forged, altered, or made by a cache
    /// with another secret.
    Unauthentic,
    /// Its epoch lies further ahead than [`MAX_AHEAD`] of everything this process knows of.
    FromTheFuture,
}

/// A refused [`ConsistencyToken`]. The layer answers it with 400.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenError {
    kind: TokenErrorKind,
}

impl TokenError {
    pub(crate) fn new(kind: TokenErrorKind) -> Self {
        Self { kind }
    }

    /// Why the token was refused.
    pub fn kind(&self) -> TokenErrorKind {
        self.kind
    }
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.kind {
            TokenErrorKind::Malformed => "consistency token malformed",
            TokenErrorKind::Unauthentic => "consistency token not issued by this cache (bad MAC)",
            TokenErrorKind::FromTheFuture => "consistency token claims an epoch from the future",
        })
    }
}

impl std::error::Error for TokenError {}

impl ConsistencyToken {
    /// The token of `target` at `value`, MAC'd under `keys`.
    pub(crate) fn issue(keys: &Keys, target: Target, value: u64) -> Self {
        let target = EpochTarget(target);
        let mac = keys.mac(&[&mac_input(&target, value)]);
        Self { target, value, mac }
    }

    /// Whether the MAC verifies under `keys` (constant time).
    pub(crate) fn verifies(&self, keys: &Keys) -> bool {
        keys.verify(&[&mac_input(&self.target, self.value)], &self.mac)
    }

    pub(crate) fn target(&self) -> Target {
        self.target.0
    }

    /// The epoch value the invalidation produced.
    pub fn epoch(&self) -> u64 {
        self.value
    }
}

/// What the MAC covers: label, tag (one byte), hash and value (8 bytes each).
fn mac_input(target: &EpochTarget, value: u64) -> Vec<u8> {
    let mut input = Vec::with_capacity(MAC_LABEL.len() + 17);
    input.extend_from_slice(MAC_LABEL);
    input.extend_from_slice(target.tag().as_bytes());
    input.extend_from_slice(&target.hash().to_be_bytes());
    input.extend_from_slice(&value.to_be_bytes());
    input
}

impl fmt::Display for ConsistencyToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}.{}.{:016x}.{}.", self.target.tag(), self.target.hash(), self.value)?;
        for b in self.mac {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ConsistencyToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsistencyToken")
            .field("target", &self.target)
            .field("epoch", &self.value)
            .finish_non_exhaustive()
    }
}

impl FromStr for ConsistencyToken {
    type Err = TokenError;

    /// Parses the text form. Only the shape is checked here; the MAC is checked by the cache
    /// that uses the token.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let malformed = || TokenError::new(TokenErrorKind::Malformed);
        if s.len() > 200 {
            return Err(malformed());
        }
        let mut parts = s.trim().split('.');
        let (Some(PREFIX), Some(tag), Some(hash), Some(value), Some(mac), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed());
        };
        let strict_hex = |h: &str| h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if hash.len() != 16 || !strict_hex(hash) || mac.len() != 64 || !strict_hex(mac) {
            return Err(malformed());
        }
        if value.is_empty() || value.len() > 20 || !value.bytes().all(|b| b.is_ascii_digit()) {
            return Err(malformed());
        }
        let hash = u64::from_str_radix(hash, 16).map_err(|_| malformed())?;
        let value: u64 = value.parse().map_err(|_| malformed())?;
        let target = EpochTarget::from_tag(tag, hash).ok_or_else(malformed)?;
        if target.is_global() && hash != 0 {
            return Err(malformed());
        }
        let mut bytes = [0u8; 32];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(&mac[2 * i..2 * i + 2], 16).map_err(|_| malformed())?;
        }
        Ok(Self { target, value, mac: bytes })
    }
}

/// The consistency auditor's settings ([`AuthzCacheBuilder::audit`](crate::AuthzCacheBuilder::audit)):
/// it samples one in `one_in` decisions the cache served (from L1 or a shared tier: to
/// [`check`](crate::AuthzCache::check), the layer and batch checks), asks the
/// authorizer again off the request path, at most `max_per_second` times a second and
/// `concurrency` at once, and compares. A disagreement that no invalidation explains (the
/// key's epochs did not move meanwhile) means a change reached the source of truth without an
/// invalidation: it is counted by tier (`authz_cache_consistency_mismatches_total{tier}`),
/// audit-logged, raised by the monitor, and with `invalidate_on_mismatch` ends the entry.
///
/// A stale key served `r` times a second is sampled `r / one_in` times a second (while all
/// samples together stay under `max_per_second`): found, on average, within `one_in / r`
/// seconds plus one authorizer call, and at the latest after `one_in` of its checks on one
/// thread (the sampler counts checks per thread).
///
/// ```
/// use tower_authz_cache::consistency::AuditConfig;
/// # use tower_authz_cache::{AuthzCache, Decision, Permission, Principal};
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// # let authorizer = |_: Principal, _: Permission| async { Ok::<_, std::convert::Infallible>(Decision::allow()) };
/// let cache = AuthzCache::builder(authorizer)
///     .audit(AuditConfig::one_in(1000).max_per_second(5).invalidate_on_mismatch(true))
///     .build();
/// # let _ = cache;
/// # });
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditConfig {
    pub(crate) one_in: u32,
    pub(crate) max_per_second: u32,
    pub(crate) concurrency: usize,
    pub(crate) invalidate: bool,
}

impl AuditConfig {
    /// Samples one in `n` served decisions (at least 1); at most 10 audits a second, 2 at once,
    /// no invalidation on a mismatch.
    pub fn one_in(n: u32) -> Self {
        Self { one_in: n.max(1), max_per_second: 10, concurrency: 2, invalidate: false }
    }

    /// The hard cap on the extra authorizer calls (at least 1 a second). Samples past it are
    /// dropped, not queued.
    #[must_use]
    pub fn max_per_second(mut self, n: u32) -> Self {
        self.max_per_second = n.max(1);
        self
    }

    /// How many audits may wait for the authorizer at once (at least 1).
    #[must_use]
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Whether a mismatch also ends the entry (an entry invalidation, to every instance).
    #[must_use]
    pub fn invalidate_on_mismatch(mut self, on: bool) -> Self {
        self.invalidate = on;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::key::Scope;

    #[test]
    fn the_text_form_round_trips_and_verifies_only_under_its_secret() {
        let keys = Keys::derive(b"one secret");
        let token = ConsistencyToken::issue(&keys, Some((Scope::Principal, 0xdead_beef)), 1_700_000_000_000_000);
        let text = token.to_string();
        assert!(text.starts_with("v1.p.00000000deadbeef.1700000000000000."), "{text}");
        let back: ConsistencyToken = text.parse().unwrap();
        assert_eq!(back, token);
        assert!(back.verifies(&keys));
        assert!(!back.verifies(&Keys::derive(b"another secret")));
        let global = ConsistencyToken::issue(&keys, None, 7);
        assert_eq!(global.to_string().parse::<ConsistencyToken>().unwrap().target(), None);
    }

    #[test]
    fn any_altered_field_fails_the_mac() {
        let keys = Keys::derive(b"one secret");
        let text = ConsistencyToken::issue(&keys, Some((Scope::Principal, 42)), 1000).to_string();
        let altered = [
            text.replacen(".p.", ".r.", 1),
            text.replacen(".1000.", ".1001.", 1),
            text.replacen("000000000000002a", "000000000000002b", 1),
        ];
        for t in altered {
            let token: ConsistencyToken = t.parse().unwrap();
            assert!(!token.verifies(&keys), "{t}");
        }
        let mut flipped = text.clone();
        let last = flipped.pop().unwrap();
        flipped.push(if last == '0' { '1' } else { '0' });
        assert!(!flipped.parse::<ConsistencyToken>().unwrap().verifies(&keys));
    }

    #[test]
    fn malformed_text_is_refused_by_the_parser() {
        let keys = Keys::derive(b"one secret");
        let text = ConsistencyToken::issue(&keys, Some((Scope::Resource, 1)), 1000).to_string();
        let bad = [
            String::new(),
            "v1".to_owned(),
            text[..text.len() - 1].to_owned(),
            text[..20].to_owned(),
            format!("{text}.extra"),
            text.replacen("v1.", "v2.", 1),
            text.replacen(".r.", ".x.", 1),
            text.replacen(".1000.", ".-1.", 1),
            text.replacen(".1000.", "..", 1),
            text.replacen(".1000.", ".99999999999999999999999.", 1),
            text.to_uppercase(),
            format!("v1.g.0000000000000001.5.{}", &text[text.len() - 64..]),
            "é".repeat(300),
        ];
        for t in bad {
            assert_eq!(t.parse::<ConsistencyToken>().unwrap_err().kind(), TokenErrorKind::Malformed, "{t}");
        }
    }
}
