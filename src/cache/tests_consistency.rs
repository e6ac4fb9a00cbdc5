//! Consistency tokens between instances on one in-process shared tier (`MemoryShared`): the
//! backplane cut, hostile tokens, a secret rotation.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use super::tests_shared::{OTHER, Truth, bob, read, ready, until};
use crate::consistency::{ConsistencyToken, TokenErrorKind};
use crate::tier::testing::MemoryShared;
use crate::{AuthzCache, CheckErrorKind, DecisionSource, Invalidation};

async fn allowed(cache: &AuthzCache) -> bool {
    cache.check(&bob(), &read(1)).await.expect("decided").is_allowed()
}

/// Two instances, B with bob's allow in L1, the backplane cut: with A's token, B's next check
/// of bob is a deny; without it, B serves the old allow until its staleness bound, no longer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_makes_another_instance_as_fresh_as_the_invalidation_whatever_the_backplane() {
    let truth = Truth::default();
    let store = MemoryShared::new();
    let a = truth.builder().l2(store.clone()).build();
    let b = truth.builder().l2(store.clone()).build();
    let c = truth.builder().l2(store.clone()).build();
    for cache in [&a, &b, &c] {
        ready(cache).await;
        assert!(allowed(cache).await);
    }
    assert_eq!(b.check(&bob(), &read(1)).await.unwrap().source(), DecisionSource::L1);

    store.drop_messages(true);
    truth.deny.store(true, Ordering::SeqCst);
    let invalidated = Instant::now();
    let token = a.invalidate(&Invalidation::principal("bob")).await.expect("the shared tier has it");
    let token: ConsistencyToken = token.to_string().parse().expect("the text form parses");

    // Without the token, B and C have heard nothing: the old allow, from L1.
    let stale = b.check(&bob(), &read(1)).await.unwrap();
    assert!(stale.is_allowed() && stale.source() == DecisionSource::L1, "{stale:?}");
    // With it, B asks again (the shared entry is older than the token too).
    let calls = truth.calls();
    let fresh = b.check_at_least_as_fresh(&bob(), &read(1), &token).await.unwrap();
    assert!(!fresh.is_allowed(), "the token's check must not be served the revoked allow");
    assert_eq!(fresh.source(), DecisionSource::Authorizer);
    assert_eq!(truth.calls(), calls + 1);
    assert!(!allowed(&b).await, "B's later checks, token or not, see the change");
    assert_eq!(b.stats().tokens_applied, 1);
    // Applying it again changes nothing (cheap, idempotent).
    b.require_fresh(&token).unwrap();
    assert_eq!(b.check(&bob(), &read(1)).await.unwrap().source(), DecisionSource::L1);

    // C, without a token: the documented bound. Its L1 is distrusted once its backplane is
    // silent for max_staleness (500 ms here); from then on it reads the shared epochs.
    assert!(allowed(&c).await, "C has heard nothing yet");
    until("C stops serving the revoked allow", || check_from_a_thread(&c) == Some(false)).await;
    assert!(invalidated.elapsed() >= Duration::from_millis(400), "C was not cut off: the test proves nothing");
    assert!(invalidated.elapsed() < Duration::from_millis(500 + 1500), "bound: max_staleness (+ slack)");
}

/// One check of C from inside `until`'s synchronous condition.
fn check_from_a_thread(cache: &AuthzCache) -> Option<bool> {
    let cache = cache.clone();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?
            .block_on(async move { cache.check(&bob(), &read(1)).await.ok().map(|d| d.is_allowed()) })
    })
    .join()
    .ok()
    .flatten()
}

/// Forged, altered, truncated, from another secret, from the future: refused with the right
/// kind, counted, and nothing changes (B keeps serving its entries).
#[tokio::test]
async fn hostile_tokens_are_refused_and_change_nothing() {
    let truth = Truth::default();
    let store = MemoryShared::new();
    let a = truth.builder().l2(store.clone()).build();
    let b = truth.builder().l2(store.clone()).build();
    ready(&a).await;
    ready(&b).await;
    assert!(allowed(&b).await);
    let good = a.invalidate(&Invalidation::principal("alice")).await.unwrap().to_string();

    // Altered: another scope, another epoch, another hash, a flipped MAC digit.
    let flipped = {
        let mut t = good.clone();
        let last = t.pop().unwrap();
        t.push(if last == 'a' { 'b' } else { 'a' });
        t
    };
    let altered = [
        good.replacen(".p.", ".g.", 1).replacen(&good[5..21], "0000000000000000", 1),
        good.replacen(".p.", ".r.", 1),
        good.replace(&format!(".{}.", good.split('.').nth(3).unwrap()), ".1."),
        flipped,
    ];
    for t in altered {
        let token: ConsistencyToken = t.parse().expect("well-formed");
        assert_eq!(b.require_fresh(&token).unwrap_err().kind(), TokenErrorKind::Unauthentic, "{t}");
        let e = b.check_at_least_as_fresh(&bob(), &read(1), &token).await.unwrap_err();
        assert_eq!(e.kind(), CheckErrorKind::Token);
    }
    // Truncated or garbage: the parser refuses it.
    for t in [&good[..good.len() - 2], &good[..10], "", "v1.p.zz", &good.replace('.', "-")] {
        assert_eq!(t.parse::<ConsistencyToken>().unwrap_err().kind(), TokenErrorKind::Malformed, "{t}");
    }
    // Made by a cache with another secret.
    let foreign = truth.builder().secret(OTHER).build();
    let theirs = foreign.invalidate(&Invalidation::principal("bob")).await.unwrap();
    assert_eq!(b.require_fresh(&theirs).unwrap_err().kind(), TokenErrorKind::Unauthentic);
    // From an instance whose clock is 2 hours ahead: refused. 10 minutes ahead: accepted.
    let ahead = truth.builder().l2(MemoryShared::new()).__wall_clock_offset(2 * 3600 * 1000).build();
    let future = ahead.invalidate(&Invalidation::principal("bob")).await.unwrap();
    assert_eq!(b.require_fresh(&future).unwrap_err().kind(), TokenErrorKind::FromTheFuture);
    let skewed = truth.builder().l2(MemoryShared::new()).__wall_clock_offset(10 * 60 * 1000).build();
    let minutes = skewed.invalidate(&Invalidation::principal("carol")).await.unwrap();
    b.require_fresh(&minutes).expect("a clock minutes ahead is within MAX_AHEAD");

    let stats = b.stats();
    assert_eq!(stats.tokens_refused, 10, "4 altered twice, foreign, future: {stats:?}");
    assert_eq!(stats.tokens_applied, 1);
    // Nothing changed for bob: still an L1 hit.
    assert_eq!(b.check(&bob(), &read(1)).await.unwrap().source(), DecisionSource::L1);
}

/// During a secret rotation, a token made under the other secret is accepted; its scope hash
/// cannot be mapped to this instance's, so L1 is dropped, once per newer token.
#[tokio::test]
async fn a_token_under_the_rotations_other_secret_drops_l1_once() {
    let truth = Truth::default();
    let store = MemoryShared::new();
    let end = SystemTime::now() + Duration::from_secs(600);
    let old = truth.builder().secret(OTHER).l2(store.clone()).build();
    let new = truth.builder().rotation_secret(OTHER, end).l2(store.clone()).build();
    ready(&old).await;
    ready(&new).await;
    assert!(allowed(&new).await);
    let token = old.invalidate(&Invalidation::principal("bob")).await.unwrap();
    new.require_fresh(&token).expect("the rotation's other secret is honoured");
    let after = new.check(&bob(), &read(1)).await.unwrap();
    assert_ne!(after.source(), DecisionSource::L1, "L1 was dropped");
    assert_eq!(new.check(&bob(), &read(1)).await.unwrap().source(), DecisionSource::L1);
    new.require_fresh(&token).unwrap();
    assert_eq!(new.check(&bob(), &read(1)).await.unwrap().source(), DecisionSource::L1, "once per token");
}
