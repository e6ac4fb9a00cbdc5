//! Where the cluster tier keeps things: hash tags that spread entries over every master and put
//! together what is read together.
//!
//! | what | key | slot chosen by |
//! |---|---|---|
//! | an entry | `{ns}:v1:{p:<principal hash>}:d:<key id>` | the principal |
//! | a principal's epoch | `{ns}:v1:{p:<principal hash>}:e` | the principal |
//! | a resource's epoch | `{ns}:v1:{r:<resource hash>}:e` | the resource |
//! | an entry's epoch | `{ns}:v1:{k:<entry hash>}:e` | the entry |
//! | the global epoch | `{ns}:v1:{<ns>:g}:e` | the namespace |
//! | the high water | `{ns}:v1:{<ns>:g}:hw` | the namespace |
//!
//! Entries spread with the principals (10,000 principals put about a third of them on each of
//! three masters); a principal's entries sit with the principal's epoch, and the global epoch
//! with the high water, so an L2 read is four single-slot commands sent at once (one round trip
//! of latency): the entry with its principal epoch, the resource epoch, the entry epoch, the
//! global epoch with the high water. No command spans slots, and no script touches two slots:
//! a bump is `max(stored + 1, floor)` on its own key (the floor is the caller's hybrid clock,
//! above every value it has seen), and the high water is raised by a second, single-slot script.
//!
//! # Why reads from different nodes cannot validate a revoked entry
//!
//! The four commands of a read reach their nodes at slightly different moments, so the entry
//! and its epochs may come from different instants. That can only cost a miss:
//! - an invalidation that was acknowledged before the read began had its epoch stored (and,
//!   with `wait_replicas`, copied to a replica) before the read's commands were sent, and every
//!   later read of that key on its master sees that value or a higher one: the four epochs a
//!   read returns are each at least what they were when the read began;
//! - an entry is stamped with the epochs read *before* its decision was computed; an entry
//!   computed before the invalidation carries the older value, so whichever version of the entry
//!   the read sees, its stamp differs from the epoch read and it is a miss;
//! - an entry read *newer* than an epoch read (written in between) carries a higher stamp than
//!   that epoch: a miss as well (stamps must equal the current epochs, not merely exceed them);
//! - what a read returns is merged into this process's epochs, which only rise, so a value an
//!   instance heard on the backplane is never masked by an older one read from a lagging node.
//!
//! Reads always go to masters (the client's default; never `read_from_replicas`): a replica can
//! lag behind an acknowledged bump.

use crate::cache::key::Scope;
use crate::tier::shared::{EpochTarget, KeyId};

/// The key names of one namespace.
pub(super) struct Keys {
    ns: String,
    pub(super) global: String,
    pub(super) high_water: String,
    pub(super) channel: String,
}

impl Keys {
    pub(super) fn new(namespace: &str) -> Self {
        let ns = format!("{namespace}:v1");
        Self {
            global: format!("{ns}:{{{namespace}:g}}:e"),
            high_water: format!("{ns}:{{{namespace}:g}}:hw"),
            channel: format!("{ns}:inv"),
            ns,
        }
    }

    /// `{ns}:v1`, the prefix of every key.
    pub(super) fn prefix(&self) -> &str {
        &self.ns
    }

    pub(super) fn entry(&self, principal: u64, key_id: &KeyId) -> String {
        format!("{}:{{p:{principal:016x}}}:d:{}", self.ns, super::super::hex(&key_id[..16]))
    }

    pub(super) fn epoch(&self, scope: Scope, hash: u64) -> String {
        format!("{}:{{{}:{hash:016x}}}:e", self.ns, scope.tag())
    }

    /// The key, expiry (ms, 0 = none) and message prefix of an epoch target.
    pub(super) fn epoch_of(&self, target: EpochTarget, retention_ms: u64) -> (String, u64, String) {
        match target.0 {
            None => (self.global.clone(), 0, "i g 0 ".to_owned()),
            Some((scope, hash)) => {
                (self.epoch(scope, hash), retention_ms.max(1), format!("i {} {hash:016x} ", scope.tag()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hash tag Redis Cluster hashes: what is between the first `{` and the next `}`.
    fn tag(key: &str) -> &str {
        let open = key.find('{').expect("every key has a tag");
        let close = key[open..].find('}').expect("closed") + open;
        &key[open + 1..close]
    }

    #[test]
    fn entries_share_a_slot_with_their_principal_epoch_and_the_global_epoch_with_the_high_water() {
        let keys = Keys::new("app");
        let entry = keys.entry(0xabc, &[7; 32]);
        assert_eq!(tag(&entry), tag(&keys.epoch(Scope::Principal, 0xabc)));
        assert_ne!(tag(&entry), tag(&keys.entry(0xabd, &[7; 32])), "entries spread with principals");
        assert_ne!(tag(&keys.epoch(Scope::Resource, 0xabc)), tag(&keys.epoch(Scope::Principal, 0xabc)));
        assert_eq!(tag(&keys.global), tag(&keys.high_water));
        assert_ne!(tag(&keys.global), tag(&Keys::new("other").global), "namespaces spread too");
        assert!(entry.starts_with("app:v1:") && keys.global.starts_with(keys.prefix()));
    }
}
