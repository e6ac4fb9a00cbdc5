//! Shared-tier envelopes: `Envelope::decode` must never panic, genuine envelopes round-trip, and
//! nothing but a genuine envelope verifies: whatever decodes under a key and key id is exactly
//! the encoding of what it decoded to.
//!
//! The first input byte picks a mode, so that the fuzzer gets past the MAC:
//!
//! - raw: the bytes as read from a shared tier;
//! - valid: an envelope built from the input, encoded, decoded (round trip), and refused under
//!   another key id and another secret;
//! - mutated: a genuine encoding edited by the input (flip, set, insert, delete, truncate,
//!   extend): anything other than the genuine bytes must be refused;
//! - remac: an arbitrary body sealed with the right MAC, to reach the parser behind the MAC: it
//!   must accept exactly the well-formed bodies (checked against a reference parser written from
//!   the format in `src/cache/entry.rs`, versions 1 and 2).

#![no_main]

use std::sync::LazyLock;

use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;
use tower_authz_cache::__internals::{Envelope, SecretKeys};

const SECRET: &[u8] = b"fuzz secret, 32 bytes long......";
const HEADER: usize = 52;
/// The header of a version 1 envelope (no `computed_at`), still read.
const HEADER_V1: usize = 44;
const TAG: usize = 32;
const MAX_REASON: usize = 1024;

struct Fixture {
    keys: SecretKeys,
    other_keys: SecretKeys,
    id: [u8; 32],
    other_id: [u8; 32],
    /// HMAC-SHA256(secret, "tower-authz-cache mac v1"), as `Keys::derive` does.
    mac_key: [u8; 32],
}

static FIX: LazyLock<Fixture> = LazyLock::new(|| {
    let keys = SecretKeys::derive(SECRET);
    let mut m = Hmac::<Sha256>::new_from_slice(SECRET).unwrap();
    m.update(b"tower-authz-cache mac v1");
    let fix = Fixture {
        id: keys.key_id("bob", "documents:1", "read"),
        other_id: keys.key_id("bob", "documents:2", "read"),
        other_keys: SecretKeys::derive(b"another secret, 32 bytes long..."),
        keys,
        mac_key: m.finalize().into_bytes().into(),
    };
    // The re-MAC replica must agree with the crate, or the remac mode tests nothing.
    let genuine = sample().encode(&fix.keys, &fix.id);
    let (body, tag) = genuine.split_at(genuine.len() - TAG);
    assert_eq!(tag, seal(&fix.mac_key, &fix.id, body), "MAC replica out of date with src/cache/key.rs");
    fix
});

fn sample() -> Envelope {
    Envelope {
        allowed: true,
        reason: Some("ok".into()),
        valid_until_ms: 1_700_000_060_000,
        computed_at_ms: 1_700_000_000_000,
        epochs: [1, 2, 3, 4],
    }
}

fn seal(mac_key: &[u8], id: &[u8], body: &[u8]) -> [u8; 32] {
    let mut m = Hmac::<Sha256>::new_from_slice(mac_key).unwrap();
    m.update(id);
    m.update(body);
    m.finalize().into_bytes().into()
}

/// Decodes under the fixture's key and key id; whatever is accepted must be the exact
/// re-encoding of what it decoded to.
fn decode(bytes: &[u8]) -> Option<Envelope> {
    let fix = &*FIX;
    let env = Envelope::decode(bytes, &fix.keys, &fix.id).ok()?;
    let genuine = if bytes[0] == 1 { v1_encoding(&env) } else { env.encode(&fix.keys, &fix.id) };
    assert_eq!(genuine, bytes, "accepted bytes are not a genuine encoding: {env:?}");
    assert!(env.reason.as_ref().is_none_or(|r| !r.is_empty() && r.len() <= MAX_REASON));
    // Bound to its key id and secret.
    assert!(Envelope::decode(bytes, &fix.keys, &fix.other_id).is_err());
    assert!(Envelope::decode(bytes, &fix.other_keys, &fix.id).is_err());
    Some(env)
}

/// The version 1 encoding (as 0.1 wrote it) of what a version 1 envelope decoded to.
fn v1_encoding(env: &Envelope) -> Vec<u8> {
    let reason = env.reason.as_deref().unwrap_or("");
    let mut body = vec![1, u8::from(env.allowed)];
    body.extend_from_slice(&env.valid_until_ms.to_be_bytes());
    for e in env.epochs {
        body.extend_from_slice(&e.to_be_bytes());
    }
    body.extend_from_slice(&(reason.len() as u16).to_be_bytes());
    body.extend_from_slice(reason.as_bytes());
    let tag = seal(&FIX.mac_key, &FIX.id, &body);
    body.extend_from_slice(&tag);
    body
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.byte(), self.byte()])
    }

    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(std::array::from_fn(|_| self.byte()))
    }

    fn take(&mut self, n: usize) -> &[u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
}

fn envelope_from(input: &mut Input<'_>) -> Envelope {
    let allowed = input.byte() & 1 == 1;
    let valid_until_ms = input.u64();
    let computed_at_ms = input.u64();
    let epochs = [input.u64(), input.u64(), input.u64(), input.u64()];
    let len = input.u16() as usize % 1400;
    let reason = match input.byte() % 4 {
        0 => None,
        1 => Some(String::new()),
        _ => Some(String::from_utf8_lossy(input.take(len)).into_owned()),
    };
    Envelope { allowed, reason, valid_until_ms, computed_at_ms, epochs }
}

/// What an envelope decodes to after encoding: an empty reason is none, a long one is cut at
/// 1024 bytes on a char boundary.
fn normalised(env: &Envelope) -> Envelope {
    let reason = env.reason.as_deref().filter(|r| !r.is_empty()).map(|r| {
        let mut end = r.len().min(MAX_REASON);
        while !r.is_char_boundary(end) {
            end -= 1;
        }
        r[..end].to_owned()
    });
    Envelope { reason, ..env.clone() }
}

/// The format, independently: what a well-formed authentic body decodes to.
fn reference(body: &[u8]) -> Option<Envelope> {
    let header = match body.first() {
        Some(2) => HEADER,
        Some(1) => HEADER_V1,
        _ => return None,
    };
    if body.len() < header || body[1] > 1 {
        return None;
    }
    let n = u16::from_be_bytes([body[header - 2], body[header - 1]]) as usize;
    if n > MAX_REASON || body.len() != header + n {
        return None;
    }
    let reason = std::str::from_utf8(&body[header..]).ok()?;
    let u64_at = |i: usize| u64::from_be_bytes(body[i..i + 8].try_into().unwrap());
    // Version 2 has computed_at at 10; both have the epochs just before the reason length.
    let (computed_at_ms, e) = if header == HEADER { (u64_at(10), 18) } else { (0, 10) };
    Some(Envelope {
        allowed: body[1] == 1,
        reason: (!reason.is_empty()).then(|| reason.to_owned()),
        valid_until_ms: u64_at(2),
        computed_at_ms,
        epochs: [u64_at(e), u64_at(e + 8), u64_at(e + 16), u64_at(e + 24)],
    })
}

fuzz_target!(|data: &[u8]| {
    let fix = &*FIX;
    let Some((&mode, rest)) = data.split_first() else {
        assert!(decode(data).is_none());
        return;
    };
    let mut input = Input(rest);
    match mode % 4 {
        0 => {
            decode(data);
            decode(rest);
        }
        1 => {
            let env = envelope_from(&mut input);
            let bytes = env.encode(&fix.keys, &fix.id);
            assert_eq!(decode(&bytes), Some(normalised(&env)), "round trip");
        }
        2 => {
            let env = envelope_from(&mut input);
            let genuine = env.encode(&fix.keys, &fix.id);
            let mut bytes = genuine.clone();
            for _ in 0..(input.byte() % 8) + 1 {
                let at = input.u16() as usize;
                let value = input.byte();
                match input.byte() % 6 {
                    0 if !bytes.is_empty() => {
                        let i = at % bytes.len();
                        bytes[i] ^= value.max(1);
                    }
                    1 if !bytes.is_empty() => {
                        let i = at % bytes.len();
                        bytes[i] = value;
                    }
                    2 => bytes.insert(at % (bytes.len() + 1), value),
                    3 if !bytes.is_empty() => {
                        bytes.remove(at % bytes.len());
                    }
                    4 => bytes.truncate(at % (bytes.len() + 1)),
                    _ => bytes.extend_from_slice(input.take(value as usize)),
                }
            }
            match decode(&bytes) {
                Some(got) => {
                    assert_eq!(bytes, genuine, "an edited envelope verified");
                    assert_eq!(got, normalised(&env));
                }
                None => assert_ne!(bytes, genuine, "a genuine envelope was refused"),
            }
        }
        _ => {
            // Mostly well-formed headers with a fuzzed tail, sometimes a fully arbitrary body.
            let body: Vec<u8> = if input.byte() & 1 == 0 {
                input.0.to_vec()
            } else {
                let version = 1 + input.byte() % 2;
                let mut body = vec![version, input.byte() % 3];
                body.extend_from_slice(&input.u64().to_be_bytes());
                if version == 2 {
                    body.extend_from_slice(&input.u64().to_be_bytes());
                }
                for _ in 0..4 {
                    body.extend_from_slice(&input.u64().to_be_bytes());
                }
                let declared = input.u16() % 1100;
                body.extend_from_slice(&declared.to_be_bytes());
                body.extend_from_slice(input.0);
                body
            };
            let mut bytes = body.clone();
            bytes.extend_from_slice(&seal(&fix.mac_key, &fix.id, &body));
            let want = reference(&body);
            let got = decode(&bytes);
            assert_eq!(got, want, "authentic body {body:?}");
        }
    }
});
