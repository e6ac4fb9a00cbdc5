//! The L1-hit path allocates nothing, through the default L1 and through a user's `LocalTier`:
//! a global allocator counts allocations made while `check` answers from L1.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};

use tower_authz_cache::tier::{LocalEntry, LocalKey, LocalTier, LocalUsage};
use tower_authz_cache::{AuthzCache, Decision, Permission, Principal};

struct Counting;

// Only the checking thread's allocations count: the test harness's own thread (printing, its
// timers) may allocate at any moment on a loaded machine, and once made this test fail.
thread_local!(static COUNTING: Cell<bool> = const { Cell::new(false) });
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// An L1 in a HashMap behind a mutex: what a user might write.
#[derive(Default)]
struct MapL1(Mutex<HashMap<LocalKey, LocalEntry>>);

impl LocalTier for MapL1 {
    fn get(&self, key: &LocalKey) -> Option<LocalEntry> {
        self.0.lock().unwrap().get(key).cloned()
    }
    fn insert(&self, key: LocalKey, entry: LocalEntry) {
        self.0.lock().unwrap().insert(key, entry);
    }
    fn remove(&self, key: &LocalKey) {
        self.0.lock().unwrap().remove(key);
    }
    fn clear(&self) {
        self.0.lock().unwrap().clear();
    }
    fn usage(&self) -> LocalUsage {
        LocalUsage::new(self.0.lock().unwrap().len() as u64, 0, 0)
    }
}

/// Polls `check` once: an L1 hit answers on the first poll, without a runtime.
fn check_now(cache: &AuthzCache, who: &Principal, what: &Permission) -> bool {
    let mut fut = std::pin::pin!(cache.check(who, what));
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(d) => d.expect("decided").is_allowed(),
        Poll::Pending => panic!("an L1 hit answers at once"),
    }
}

fn allocations_of_hits(cache: &AuthzCache) -> u64 {
    let (bob, read) = (Principal::new("bob"), Permission::new("documents:1", "read"));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    // The miss (authorizer, single flight) allocates; then the entry is in L1.
    assert!(rt.block_on(cache.check(&bob, &read)).unwrap().is_allowed());
    assert!(check_now(cache, &bob, &read));
    ALLOCATIONS.store(0, Ordering::SeqCst);
    COUNTING.with(|c| c.set(true));
    for _ in 0..1000 {
        check_now(cache, &bob, &read);
    }
    COUNTING.with(|c| c.set(false));
    assert_eq!(cache.stats().authorizer_calls, 1, "every check after the first was an L1 hit");
    ALLOCATIONS.load(Ordering::SeqCst)
}

fn allow_all() -> tower_authz_cache::AuthzCacheBuilder {
    AuthzCache::builder(|_: Principal, _: Permission| async { Ok::<_, std::convert::Infallible>(Decision::allow()) })
}

#[test]
fn l1_hits_allocate_nothing_through_the_default_and_a_custom_l1() {
    let default = allow_all().build();
    assert_eq!(allocations_of_hits(&default), 0, "default L1: allocations on 1000 hits");
    let custom = allow_all().l1(MapL1::default()).build();
    assert_eq!(allocations_of_hits(&custom), 0, "custom L1: allocations on 1000 hits");
    assert_eq!(custom.stats().tiers.l1.entries, 1, "the custom L1 held the entry");
}
