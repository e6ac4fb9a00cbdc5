//! Redis's `maxmemory-policy`: any policy but `noeviction` can drop an epoch before the entries it
//! ended, so it is read at start and every few seconds, and reported as a health warning.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::RedisShared;

/// Whether Redis may evict keys the cache needs. Entries and epochs both carry expiries, so any
/// policy but `noeviction` (`volatile-*` as much as `allkeys-*`) can drop an epoch before the
/// entries it invalidated, and an entry whose epoch was dropped validates again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Eviction {
    /// Not checked yet.
    Unknown = 0,
    /// `noeviction`.
    Safe = 1,
    /// A policy that can evict epoch keys.
    Unsafe = 2,
    /// `CONFIG GET` is not allowed (a managed Redis): the policy cannot be verified.
    Unreadable = 3,
}

impl Eviction {
    /// What a `maxmemory-policy` (the second item of `CONFIG GET`'s reply) means for the cache;
    /// no policy in the reply: unreadable.
    pub(crate) fn of(policy: Option<&str>) -> Eviction {
        match policy {
            Some("noeviction") => Eviction::Safe,
            Some(_) => Eviction::Unsafe,
            None => Eviction::Unreadable,
        }
    }
}

/// The health warning of a Redis whose policy can evict epoch keys.
pub(crate) const EVICTION_WARNING: &str =
    "redis maxmemory-policy can evict epoch keys (revoked entries could validate again): set noeviction";

/// The health warning of a Redis whose policy could not be read.
pub(crate) const EVICTION_UNKNOWN: &str =
    "redis maxmemory-policy could not be read (CONFIG GET refused): make sure it is noeviction";

/// How often Redis's `maxmemory-policy` is read again.
pub(super) const EVICTION_CHECK_EVERY: Duration = Duration::from_secs(5);

impl RedisShared {
    /// Reads `maxmemory-policy` and records it; logs on `authz_cache::audit` when it changes to
    /// one that breaks the staleness bound. A failed call leaves the last finding.
    pub(super) async fn check_eviction(&self) {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("GET").arg("maxmemory-policy");
        let reply = match tokio::time::timeout(self.settings.timeout, self.run::<Vec<String>>(&cmd)).await {
            Ok(reply) => reply,
            Err(_) => return,
        };
        let found = match reply {
            Ok(reply) => (Eviction::of(reply.get(1).map(String::as_str)), reply.get(1).cloned()),
            Err(e) if e.kind() != redis::ErrorKind::Io && !e.is_connection_dropped() => (Eviction::Unreadable, None),
            Err(_) => return,
        };
        let before = self.eviction.swap(found.0 as u8, Ordering::AcqRel);
        if before != found.0 as u8 {
            match found {
                (Eviction::Unsafe, policy) => tracing::warn!(
                    target: "authz_cache::audit",
                    policy = policy.as_deref().unwrap_or("?"),
                    "security: {EVICTION_WARNING}"
                ),
                (Eviction::Unreadable, _) => tracing::warn!(target: "authz_cache::audit", "{EVICTION_UNKNOWN}"),
                _ => tracing::info!(target: "authz_cache::audit", "redis maxmemory-policy is noeviction"),
            }
        }
    }
}
