//! Cache keys, and the short hashes that stand for principals in logs.

use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, OnceLock};

use crate::{Permission, Principal};

/// The L1 key: the full tuple, compared exactly (no hash collisions can mix two principals).
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct CacheKey {
    pub(crate) principal: Arc<str>,
    pub(crate) resource: Arc<str>,
    pub(crate) action: Arc<str>,
}

impl CacheKey {
    pub(crate) fn new(principal: &Principal, permission: &Permission) -> Self {
        Self {
            principal: principal.id_arc().clone(),
            resource: permission.resource_arc().clone(),
            action: permission.action_arc().clone(),
        }
    }

    /// Approximate heap bytes owned by the key's strings: the principal and resource strings
    /// with their `Arc` header and allocator rounding; the action is usually shared with the
    /// route table, so only its length is charged.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.principal.len() + self.resource.len() + self.action.len() + 2 * 32
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({} {} {})", ShortHash::of(&self.principal), self.action, self.resource)
    }
}

/// A short, per-process keyed hash shown in logs instead of a principal id.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct ShortHash(u32);

impl ShortHash {
    pub(crate) fn of(s: &str) -> Self {
        static KEY: OnceLock<RandomState> = OnceLock::new();
        Self(KEY.get_or_init(RandomState::new).hash_one(s) as u32)
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
