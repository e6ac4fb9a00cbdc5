//! Cache keys, keyed hashes, and the short hashes that stand for principals in logs.
//!
//! Three derived keys come from the shared secret (HMAC-SHA256(secret, label)):
//! - `key`: the shared-tier key id, HMAC-SHA256 of the length-prefixed (principal, resource,
//!   action) tuple, so no principal id, token or resource id appears in Redis or Postgres keys;
//! - `mac`: the MAC of shared-tier values (see `entry.rs`);
//! - `scope`: SipHash-2-4 keys for epoch scopes, shared by every process so that backplane
//!   messages and epoch keys name the same scope everywhere, without naming the principal.

use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use siphasher::sip::SipHasher24;

use crate::{Permission, Principal};

pub(crate) type HmacSha256 = Hmac<Sha256>;

/// The key of an L1 entry: the (principal, resource, action) tuple, compared exactly (no hash
/// collision can mix two principals). Cheap to clone (three reference counts).
///
/// Its [`Hash`] is one `u64`: the tuple's SipHash under this process's random key, computed once
/// per key, at the first hash. The maps a miss goes through hash a key several times (mini-moka
/// three times per read and per insert, single flight twice); each now hashes eight bytes, not
/// three strings. A key answered from L1's per-thread front is never hashed this way.
pub struct CacheKey {
    pub(crate) principal: Arc<str>,
    pub(crate) resource: Arc<str>,
    pub(crate) action: Arc<str>,
    /// 0 until first hashed (a hash of 0 is stored as 1). Threads that race to compute it store
    /// the same value.
    hash: AtomicU64,
}

impl Clone for CacheKey {
    fn clone(&self) -> Self {
        Self {
            principal: self.principal.clone(),
            resource: self.resource.clone(),
            action: self.action.clone(),
            hash: AtomicU64::new(self.hash.load(Relaxed)),
        }
    }
}

impl PartialEq for CacheKey {
    fn eq(&self, other: &Self) -> bool {
        self.principal == other.principal && self.resource == other.resource && self.action == other.action
    }
}

impl Eq for CacheKey {}

impl Hash for CacheKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        static PROCESS: OnceLock<RandomState> = OnceLock::new();
        let mut hash = self.hash.load(Relaxed);
        if hash == 0 {
            let tuple = (&*self.principal, &*self.resource, &*self.action);
            hash = PROCESS.get_or_init(RandomState::new).hash_one(tuple).max(1);
            self.hash.store(hash, Relaxed);
        }
        state.write_u64(hash);
    }
}

impl CacheKey {
    pub(crate) fn new(principal: &Principal, permission: &Permission) -> Self {
        Self::of(principal.id_arc().clone(), permission.resource_arc().clone(), permission.action_arc().clone())
    }

    /// The key of this tuple.
    pub(crate) fn of(principal: Arc<str>, resource: Arc<str>, action: Arc<str>) -> Self {
        Self { principal, resource, action, hash: AtomicU64::new(0) }
    }

    /// Approximate heap bytes owned by the key's strings: the principal and resource strings
    /// with their `Arc` header and allocator rounding; the action is usually shared with the
    /// route table, so only its length is charged.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.principal.len() + self.resource.len() + self.action.len() + 2 * 32
    }

    /// The tuple, length-prefixed so that the encoding is injective.
    fn encode_into(&self, mut write: impl FnMut(&[u8])) {
        for part in [&self.principal, &self.resource, &self.action] {
            write(&(part.len() as u64).to_be_bytes());
            write(part.as_bytes());
        }
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({} {} {})", ShortHash::of(&self.principal), self.action, self.resource)
    }
}

/// Which epoch scope a hash names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Scope {
    Principal,
    Resource,
    Entry,
}

impl Scope {
    pub(crate) fn tag(self) -> &'static str {
        match self {
            Scope::Principal => "p",
            Scope::Resource => "r",
            Scope::Entry => "k",
        }
    }

    pub(crate) fn from_tag(tag: &str) -> Option<Self> {
        Some(match tag {
            "p" => Scope::Principal,
            "r" => Scope::Resource,
            "k" => Scope::Entry,
            _ => return None,
        })
    }
}

/// The keys derived from the shared secret.
#[derive(Clone)]
pub(crate) struct Keys {
    key: HmacSha256,
    mac: HmacSha256,
    scope: (u64, u64),
    subject: [u8; 32],
}

impl Keys {
    /// Derives the keys from a shared secret.
    pub(crate) fn derive(secret: &[u8]) -> Self {
        let derive = |label: &[u8]| -> [u8; 32] {
            let mut m = HmacSha256::new_from_slice(secret).expect("hmac accepts any key length");
            m.update(label);
            m.finalize().into_bytes().into()
        };
        let scope = derive(b"tower-authz-cache scope v1");
        let k = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
        Self {
            key: HmacSha256::new_from_slice(&derive(b"tower-authz-cache key v1")).expect("any length"),
            mac: HmacSha256::new_from_slice(&derive(b"tower-authz-cache mac v1")).expect("any length"),
            scope: (k(&scope[..8]), k(&scope[8..16])),
            subject: derive(b"tower-authz-cache subject v1"),
        }
    }

    /// Keys for a process that shares nothing: a random secret.
    pub(crate) fn random() -> Self {
        let mut secret = [0u8; 32];
        for chunk in secret.chunks_mut(8) {
            chunk.copy_from_slice(&RandomState::new().hash_one(0u8).to_le_bytes());
        }
        Self::derive(&secret)
    }

    /// The shared-tier id of a key: 32 bytes of HMAC-SHA256.
    pub(crate) fn key_id(&self, key: &CacheKey) -> [u8; 32] {
        let mut m = self.key.clone();
        key.encode_into(|b| m.update(b));
        m.finalize().into_bytes().into()
    }

    /// A MAC over `parts`, under the value key.
    pub(crate) fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut m = self.mac.clone();
        for p in parts {
            m.update(p);
        }
        m.finalize().into_bytes().into()
    }

    /// Checks a MAC in constant time.
    pub(crate) fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        let mut m = self.mac.clone();
        for p in parts {
            m.update(p);
        }
        m.verify_slice(tag).is_ok()
    }

    fn sip(&self) -> SipHasher24 {
        SipHasher24::new_with_keys(self.scope.0, self.scope.1)
    }

    /// The scope hash of a principal id or a resource.
    pub(crate) fn scope_hash(&self, scope: Scope, value: &str) -> u64 {
        let mut h = self.sip();
        h.write(scope.tag().as_bytes());
        value.hash(&mut h);
        h.finish()
    }

    /// The scope hash of one entry.
    pub(crate) fn entry_hash(&self, key: &CacheKey) -> u64 {
        let mut h = self.sip();
        h.write(Scope::Entry.tag().as_bytes());
        key.encode_into(|b| h.write(b));
        h.finish()
    }
}

/// The largest tuple a sealed subject may hold; longer ones are not stored.
pub(crate) const MAX_SUBJECT: usize = 8192 - 16;

impl Keys {
    /// The tuple of `key`, sealed (ChaCha20-Poly1305) under the subject key and bound to its key
    /// id, for the L3 row: Postgres never holds the ids in clear, warming can still rebuild the
    /// in-process key. The nonce is the key id's first 12 bytes: one tuple, one key id, one
    /// plaintext, so a nonce never seals two different messages (deterministic, SIV-style).
    /// `None` when the tuple is too long to store.
    pub(crate) fn seal_subject(&self, key_id: &[u8; 32], key: &CacheKey) -> Option<Vec<u8>> {
        use chacha20poly1305::aead::{Aead, KeyInit, Payload};
        let mut plain = Vec::with_capacity(24 + key.heap_bytes());
        key.encode_into(|b| plain.extend_from_slice(b));
        if plain.len() > MAX_SUBJECT {
            return None;
        }
        let cipher = chacha20poly1305::ChaCha20Poly1305::new((&self.subject).into());
        cipher.encrypt(key_id[..12].into(), Payload { msg: &plain, aad: key_id }).ok()
    }

    /// Opens a sealed subject read beside `key_id`: the key, if the seal is authentic and the
    /// tuple hashes to that very key id.
    pub(crate) fn open_subject(&self, key_id: &[u8; 32], sealed: &[u8]) -> Option<CacheKey> {
        use chacha20poly1305::aead::{Aead, KeyInit, Payload};
        let cipher = chacha20poly1305::ChaCha20Poly1305::new((&self.subject).into());
        let plain = cipher.decrypt(key_id[..12].into(), Payload { msg: sealed, aad: key_id }).ok()?;
        let mut parts = Vec::with_capacity(3);
        let mut rest = plain.as_slice();
        for _ in 0..3 {
            let (len, tail) = rest.split_at_checked(8)?;
            let len = usize::try_from(u64::from_be_bytes(len.try_into().ok()?)).ok()?;
            let (part, tail) = tail.split_at_checked(len)?;
            parts.push(Arc::<str>::from(std::str::from_utf8(part).ok()?));
            rest = tail;
        }
        if !rest.is_empty() {
            return None;
        }
        let action = parts.pop()?;
        let resource = parts.pop()?;
        let principal = parts.pop()?;
        let key = CacheKey::of(principal, resource, action);
        (self.key_id(&key) == *key_id).then_some(key)
    }
}

/// A short keyed hash shown in logs instead of a principal id. Keyed per process, unless a
/// cache with a shared secret was built first: then every instance sharing the secret shows the
/// same hash for the same principal, so their logs can be correlated.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct ShortHash(u32);

static LOG_KEY: OnceLock<(u64, u64)> = OnceLock::new();

impl ShortHash {
    pub(crate) fn of(s: &str) -> Self {
        let (k0, k1) = *LOG_KEY.get_or_init(|| {
            let r = RandomState::new();
            (r.hash_one(0u8), r.hash_one(1u8))
        });
        let mut h = SipHasher24::new_with_keys(k0, k1);
        h.write(b"log");
        s.hash(&mut h);
        Self(h.finish() as u32)
    }
}

impl Keys {
    /// Keys the log hashes with this secret, if nothing was logged yet.
    pub(crate) fn use_for_logs(&self) {
        let _ = LOG_KEY.set((self.scope.0 ^ 0x6c6f_6773, self.scope.1));
    }
}

impl fmt::Debug for ShortHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

impl fmt::Display for ShortHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(p: &str, r: &str, a: &str) -> CacheKey {
        CacheKey::of(p.into(), r.into(), a.into())
    }

    /// The cached hash agrees with equality: equal keys built apart, hashed or not yet, and
    /// their clones hash alike; the tuple's parts are not run together.
    #[test]
    fn the_cached_hash_agrees_with_equality() {
        let h = |k: &CacheKey| RandomState::new().hash_one(k);
        let hash_of = |k: &CacheKey| {
            let mut s = siphasher::sip::SipHasher13::new_with_keys(1, 2);
            k.hash(&mut s);
            s.finish()
        };
        let (a, b) = (key("bob", "documents:1", "read"), key("bob", "documents:1", "read"));
        let _ = h(&a); // a's hash is now cached, b's not
        assert_eq!(a, b);
        assert_eq!(hash_of(&a), hash_of(&b));
        assert_eq!(hash_of(&a.clone()), hash_of(&a));
        assert_eq!(hash_of(&b.clone()), hash_of(&b));
        assert_ne!(hash_of(&key("bo", "bdocuments:1", "read")), hash_of(&a));
        assert_ne!(hash_of(&key("bob", "documents:1", "write")), hash_of(&a));
        let mut map = std::collections::HashMap::new();
        map.insert(a.clone(), 1);
        assert_eq!(map.get(&key("bob", "documents:1", "read")), Some(&1));
    }

    #[test]
    fn key_ids_are_injective_on_the_tuple_and_depend_on_the_secret() {
        let k = Keys::derive(b"0123456789abcdef0123456789abcdef");
        assert_ne!(k.key_id(&key("ab", "c", "d")), k.key_id(&key("a", "bc", "d")));
        assert_ne!(k.key_id(&key("a:b", "c", "d")), k.key_id(&key("a", "b:c", "d")));
        assert_eq!(k.key_id(&key("a", "b", "c")), k.key_id(&key("a", "b", "c")));
        let other = Keys::derive(b"another secret, another keyspace");
        assert_ne!(k.key_id(&key("a", "b", "c")), other.key_id(&key("a", "b", "c")));
        assert_ne!(k.scope_hash(Scope::Principal, "bob"), k.scope_hash(Scope::Resource, "bob"));
        assert_eq!(
            k.scope_hash(Scope::Principal, "bob"),
            Keys::derive(b"0123456789abcdef0123456789abcdef").scope_hash(Scope::Principal, "bob")
        );
    }

    #[test]
    fn sealed_subjects_open_only_under_their_key_id_and_secret() {
        let k = Keys::derive(b"0123456789abcdef0123456789abcdef");
        let bob = key("bob:1\n", "documents:7", "read");
        let id = k.key_id(&bob);
        let sealed = k.seal_subject(&id, &bob).unwrap();
        assert!(!sealed.windows(3).any(|w| w == b"bob"), "the principal id is not in clear");
        assert!(k.open_subject(&id, &sealed) == Some(bob.clone()));
        // Another row's key id, another secret, a flipped bit, a truncation: nothing opens.
        let carol = key("carol", "documents:7", "read");
        assert!(k.open_subject(&k.key_id(&carol), &sealed).is_none());
        assert!(Keys::derive(b"another secret, another keyspace").open_subject(&id, &sealed).is_none());
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert!(k.open_subject(&id, &bad).is_none(), "bit flip at {i}");
        }
        assert!(k.open_subject(&id, &sealed[..sealed.len() - 1]).is_none());
        assert!(k.open_subject(&id, &[]).is_none());
        // A sealed copy of another tuple moved under this key id does not open either.
        let other = k.seal_subject(&k.key_id(&carol), &carol).unwrap();
        assert!(k.open_subject(&id, &other).is_none());
        let huge = key(&"x".repeat(MAX_SUBJECT), "r", "a");
        assert!(k.seal_subject(&k.key_id(&huge), &huge).is_none());
    }
}
