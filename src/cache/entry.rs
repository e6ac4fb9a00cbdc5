//! A cached decision with its deadline and the epochs it was computed under, and the versioned,
//! MAC-protected envelope that carries it in shared tiers.
//!
//! Envelope v2, big-endian:
//!
//! ```text
//! 0      version (2)
//! 1      flags (bit 0: allow)
//! 2..10  valid_until, ms since the Unix epoch
//! 10..18 computed_at, ms since the Unix epoch (when the authorizer answered)
//! 18..50 epochs: global, principal, resource, entry
//! 50..52 reason length n (at most 1024)
//! 52..   reason, UTF-8
//! +32    HMAC-SHA256(mac key, key id || bytes 0..52+n)
//! ```
//!
//! Version 1 (written by 0.1) is still read: the same without `computed_at` (its entries' age is
//! unknown). A 0.1 instance reads a v2 envelope as an unknown version: a miss, never an allow.
//!
//! The MAC binds the value to its key id, so an entry cannot be copied from one key to another,
//! and whoever can write to the shared store without the secret cannot forge an allow.

use std::fmt;
use std::sync::Arc;

use crate::Decision;
use crate::cache::epoch::EpochStamp;
use crate::cache::key::Keys;
use crate::core::decision::DecisionSource;

const VERSION: u8 = 2;
const HEADER: usize = 52;
/// The header of a version 1 envelope (no `computed_at`).
const HEADER_V1: usize = 44;
const TAG: usize = 32;
pub(crate) const MAX_REASON: usize = 1024;

/// A cached decision. `valid_until_ms` (wall clock) is fixed when the authorizer answered and is
/// copied, never extended, when an entry moves between tiers. `local_until_ms` is the L1 copy's
/// deadline on this process's monotonic clock, set when the entry enters L1 (never shared).
///
/// As an L1 entry ([`LocalEntry`](crate::tier::LocalEntry)) it is opaque: cheap to clone (no
/// allocation), checked by the cache on every read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub(crate) allowed: bool,
    pub(crate) reason: Option<Arc<str>>,
    pub(crate) valid_until_ms: u64,
    /// When the authorizer answered (wall ms; 0: unknown, a version 1 envelope).
    pub(crate) computed_at_ms: u64,
    pub(crate) local_until_ms: u64,
    /// With refresh-ahead: from when (this process's monotonic clock) a hit recomputes the L1
    /// copy in the background (`u64::MAX`: never). Never shared.
    pub(crate) refresh_at_ms: u64,
    pub(crate) stamp: EpochStamp,
}

impl Entry {
    pub(crate) fn new(decision: &Decision, valid_until_ms: u64, stamp: EpochStamp) -> Self {
        Self {
            allowed: decision.is_allowed(),
            // An empty reason is no reason: the envelope cannot tell them apart.
            reason: decision.reason().filter(|r| !r.is_empty()).map(|r| Arc::from(truncate(r, MAX_REASON))),
            valid_until_ms,
            computed_at_ms: decision.computed_at_ms(),
            local_until_ms: 0,
            refresh_at_ms: u64::MAX,
            stamp,
        }
    }

    /// The decision, as served from `source`.
    pub(crate) fn decision(&self, source: DecisionSource) -> Decision {
        let d = Decision::from_bool(self.allowed).served_from(source, self.computed_at_ms);
        match &self.reason {
            Some(r) => d.with_reason(r.clone()),
            None => d,
        }
    }

    /// Approximate heap bytes owned by the entry.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.reason.as_ref().map_or(0, |r| r.len() + 16)
    }

    /// The shared-tier envelope of this entry under `key_id`. The process-local part of the
    /// stamp is not shared.
    pub(crate) fn encode(&self, keys: &Keys, key_id: &[u8]) -> Vec<u8> {
        let reason = self.reason.as_deref().unwrap_or("");
        let mut out = Vec::with_capacity(HEADER + reason.len() + TAG);
        out.push(VERSION);
        out.push(u8::from(self.allowed));
        out.extend_from_slice(&self.valid_until_ms.to_be_bytes());
        out.extend_from_slice(&self.computed_at_ms.to_be_bytes());
        for e in self.stamp.shared() {
            out.extend_from_slice(&e.to_be_bytes());
        }
        out.extend_from_slice(&(reason.len() as u16).to_be_bytes());
        out.extend_from_slice(reason.as_bytes());
        let tag = keys.mac(&[key_id, &out]);
        out.extend_from_slice(&tag);
        out
    }

    /// Decodes and authenticates an envelope read under `key_id`.
    pub(crate) fn decode(bytes: &[u8], keys: &Keys, key_id: &[u8]) -> Result<Entry, EnvelopeError> {
        if bytes.is_empty() {
            return Err(EnvelopeError::Truncated);
        }
        let header = match bytes[0] {
            VERSION => HEADER,
            1 => HEADER_V1,
            v => return Err(EnvelopeError::Version(v)),
        };
        if bytes.len() < header + TAG {
            return Err(EnvelopeError::Truncated);
        }
        let (body, tag) = bytes.split_at(bytes.len() - TAG);
        if !keys.verify(&[key_id, body], tag) {
            return Err(EnvelopeError::Mac);
        }
        // Authentic from here on; still checked, never trusted blindly.
        let u64_at = |i: usize| u64::from_be_bytes(body[i..i + 8].try_into().unwrap_or([0; 8]));
        let flags = body[1];
        if flags & !1 != 0 {
            return Err(EnvelopeError::Malformed);
        }
        let len = u16::from_be_bytes([body[header - 2], body[header - 1]]) as usize;
        if len > MAX_REASON || body.len() != header + len {
            return Err(EnvelopeError::Malformed);
        }
        let reason = std::str::from_utf8(&body[header..]).map_err(|_| EnvelopeError::Malformed)?;
        // v2 has computed_at at 10; both have the four epochs just before the reason length.
        let (computed_at_ms, epochs) = if header == HEADER { (u64_at(10), 18) } else { (0, 10) };
        Ok(Entry {
            allowed: flags & 1 == 1,
            reason: (!reason.is_empty()).then(|| Arc::from(reason)),
            valid_until_ms: u64_at(2),
            computed_at_ms,
            local_until_ms: 0,
            refresh_at_ms: u64::MAX,
            stamp: EpochStamp::from_shared([
                u64_at(epochs),
                u64_at(epochs + 8),
                u64_at(epochs + 16),
                u64_at(epochs + 24),
            ]),
        })
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Why a shared-tier value was rejected. Every kind is a miss, never an allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EnvelopeError {
    Truncated,
    Version(u8),
    Mac,
    Malformed,
}

impl fmt::Display for EnvelopeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EnvelopeError::Truncated => f.write_str("truncated envelope"),
            EnvelopeError::Version(v) => write!(f, "unknown envelope version {v}"),
            EnvelopeError::Mac => f.write_str("envelope mac mismatch"),
            EnvelopeError::Malformed => f.write_str("malformed envelope"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            allowed: true,
            reason: Some("ok".into()),
            valid_until_ms: 1_700_000_060_000,
            computed_at_ms: 1_700_000_000_000,
            local_until_ms: 0,
            refresh_at_ms: u64::MAX,
            stamp: EpochStamp::from_shared([1, 2, 3, 4]),
        }
    }

    #[test]
    fn round_trips_and_rejects_every_tampering() {
        let keys = Keys::derive(b"0123456789abcdef0123456789abcdef");
        let id = [7u8; 32];
        let bytes = entry().encode(&keys, &id);
        assert_eq!(Entry::decode(&bytes, &keys, &id).unwrap(), entry());

        // Another key id (an entry copied to another key), another secret.
        assert_eq!(Entry::decode(&bytes, &keys, &[8u8; 32]), Err(EnvelopeError::Mac));
        let other = Keys::derive(b"attacker's secret...............");
        assert_eq!(Entry::decode(&bytes, &other, &id), Err(EnvelopeError::Mac));
        // Every single-bit flip is rejected.
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(Entry::decode(&b, &keys, &id).is_err(), "flip at byte {i} bit {bit}");
            }
        }
        // Truncations, a future version, garbage.
        for n in 0..bytes.len() {
            assert!(Entry::decode(&bytes[..n], &keys, &id).is_err(), "truncated to {n}");
        }
        let mut future = bytes.clone();
        future[0] = 3;
        assert_eq!(Entry::decode(&future, &keys, &id), Err(EnvelopeError::Version(3)));
        assert!(Entry::decode(b"allow", &keys, &id).is_err());
    }

    #[test]
    fn version_1_envelopes_still_read_with_an_unknown_age() {
        let keys = Keys::derive(b"0123456789abcdef0123456789abcdef");
        let id = [7u8; 32];
        // A v1 envelope as 0.1 wrote it.
        let mut v1 = vec![1u8, 1];
        v1.extend_from_slice(&1_700_000_060_000u64.to_be_bytes());
        for e in [1u64, 2, 3, 4] {
            v1.extend_from_slice(&e.to_be_bytes());
        }
        v1.extend_from_slice(&2u16.to_be_bytes());
        v1.extend_from_slice(b"ok");
        let tag = keys.mac(&[&id, &v1]);
        v1.extend_from_slice(&tag);
        let read = Entry::decode(&v1, &keys, &id).unwrap();
        assert_eq!(read, Entry { computed_at_ms: 0, ..entry() });
        assert_eq!(read.decision(DecisionSource::L1).age(), None);
        // A v1 header under a v2 version byte fails (the MAC covers the version).
        let mut relabelled = v1.clone();
        relabelled[0] = 2;
        assert!(Entry::decode(&relabelled, &keys, &id).is_err());
    }

    #[test]
    fn long_reasons_are_truncated_on_a_char_boundary() {
        let d = Decision::deny().with_reason("é".repeat(1000));
        let e = Entry::new(&d, 0, EpochStamp::default());
        assert!(e.reason.as_ref().unwrap().len() <= MAX_REASON);
        let keys = Keys::derive(b"k");
        assert_eq!(Entry::decode(&e.encode(&keys, b"id"), &keys, b"id").unwrap(), e.clone());
    }
}
