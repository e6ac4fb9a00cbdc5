//! Property tests: key derivation is injective on the tuple, envelopes round-trip, and a stamp
//! taken before an invalidation never validates after it.

use std::sync::Arc;

use proptest::prelude::*;

use crate::Decision;
use crate::cache::entry::{Entry, MAX_REASON};
use crate::cache::epoch::{EpochStamp, Epochs};
use crate::cache::key::{CacheKey, Keys, Scope};

/// Short strings over an alphabet full of separators, so that a non-injective encoding (a
/// plain join) would collide often.
fn part() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[ab:\\x00|*]{0,6}").expect("valid regex")
}

fn key(p: &str, r: &str, a: &str) -> CacheKey {
    CacheKey::of(Arc::from(p), Arc::from(r), Arc::from(a))
}

proptest! {
    #[test]
    fn key_ids_and_entry_scopes_are_injective_on_the_tuple(
        a in (part(), part(), part()),
        b in (part(), part(), part()),
    ) {
        let keys = Keys::derive(b"property test secret............");
        let (ka, kb) = (key(&a.0, &a.1, &a.2), key(&b.0, &b.1, &b.2));
        if a == b {
            prop_assert_eq!(keys.key_id(&ka), keys.key_id(&kb));
        } else {
            prop_assert_ne!(keys.key_id(&ka), keys.key_id(&kb));
            prop_assert_ne!(keys.entry_hash(&ka), keys.entry_hash(&kb));
        }
    }

    #[test]
    fn envelopes_round_trip(
        allowed in any::<bool>(),
        reason in proptest::option::of(".{0,300}"),
        valid_until in any::<u64>(),
        stamp in any::<[u64; 4]>(),
        key_id in any::<[u8; 32]>(),
    ) {
        let keys = Keys::derive(b"property test secret............");
        let mut d = Decision::from_bool(allowed);
        if let Some(r) = &reason {
            d = d.with_reason(r.as_str());
        }
        let entry = Entry::new(&d, valid_until, EpochStamp::from_shared(stamp));
        prop_assert!(entry.reason.as_ref().is_none_or(|r| r.len() <= MAX_REASON));
        let decoded = Entry::decode(&entry.encode(&keys, &key_id), &keys, &key_id);
        prop_assert_eq!(decoded, Ok(entry));
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics_and_never_verifies(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let keys = Keys::derive(b"property test secret............");
        prop_assert!(Entry::decode(&bytes, &keys, &[0u8; 32]).is_err());
    }

    /// Random bumps, merges (including older values), local bumps and the passage of time. For
    /// every stamp of the watched key taken before a bump that covers it, no stamp taken later,
    /// while an entry stamped then could still be valid (within `forget_after` of the stamp),
    /// equals it.
    #[test]
    fn a_stamp_taken_before_a_covering_bump_never_validates_after_it(
        ops in proptest::collection::vec((0u8..10, 0u8..3, 0u64..40), 1..120),
    ) {
        const FORGET_AFTER: u64 = 100;
        let clock = crate::cache::clock::Clock::manual();
        let e = Epochs::new(Keys::derive(b"property test secret............"), FORGET_AFTER, clock.clone());
        let watched = key("bob", "doc", "read");
        let hashes = e.hashes(&watched);
        let mut now = 0u64;
        // (stamp, taken at) of stamps that a later covering bump made stale.
        let mut dead: Vec<(EpochStamp, u64)> = Vec::new();
        let mut live: Vec<(EpochStamp, u64)> = Vec::new();
        for (op, target, arg) in ops {
            let covering = target == 0;
            match op {
                0 => {
                    let h = if covering { hashes.principal } else { e.scope_hash(Scope::Principal, &format!("u{arg}")) };
                    e.bump(Scope::Principal, h);
                }
                1 => {
                    let h = if covering { hashes.resource } else { e.scope_hash(Scope::Resource, &format!("r{arg}")) };
                    e.bump(Scope::Resource, h);
                }
                2 => {
                    let h = if covering { hashes.entry } else { arg };
                    e.bump(Scope::Entry, h);
                }
                3 => {
                    e.bump_all();
                }
                4 => {
                    e.bump_local();
                }
                5 => {
                    // A value from elsewhere, possibly older than what we have: never lowers.
                    let before = e.stamp(&watched);
                    e.merge(Scope::Principal, hashes.principal, arg);
                    let after = e.stamp(&watched);
                    prop_assert!(after.principal >= before.principal || after.principal == 0);
                    continue;
                }
                6 => {
                    now += arg;
                    clock.advance(std::time::Duration::from_millis(arg));
                    continue;
                }
                7 => {
                    // A bump a store could not record: local only.
                    let h = if covering { hashes.principal } else { e.scope_hash(Scope::Principal, &format!("u{arg}")) };
                    e.bump_local_only(Some((Scope::Principal, h)));
                }
                8 => {
                    // A store answering a bump with an old value (it lost its state).
                    let h = if covering { hashes.resource } else { e.scope_hash(Scope::Resource, &format!("r{arg}")) };
                    let t = Some((Scope::Resource, h));
                    e.settle_from(t, e.current_of(t), arg);
                }
                _ => {
                    live.push((e.stamp(&watched), now));
                    continue;
                }
            }
            // ops 0..=4: covering when aimed at the watched key (or global/local).
            if covering || op == 3 || op == 4 {
                dead.append(&mut live);
            }
            let current = e.stamp(&watched);
            for (stamp, taken_at) in &dead {
                if now < taken_at + FORGET_AFTER {
                    prop_assert_ne!(*stamp, current, "stamp from {} revived at {}", taken_at, now);
                }
            }
        }
    }
}
