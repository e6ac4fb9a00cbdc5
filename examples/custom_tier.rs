//! A shared tier of your own, through the public trait `tower_authz_cache::tier::SharedTier`:
//! [`FileTier`] keeps entries and epochs in a directory of files that every process on one
//! machine shares, and polls it as its invalidation backplane ([`Transport`]). Two processes of
//! this example share their decisions: what one computed is an L2 hit in the other, and an
//! invalidation on one reaches the other within about 50 ms (one poll).
//!
//! It uses the crate's public API only (no feature), like any application. The app around it
//! is `hyper.rs`'s (`common/hyper_app.rs`), with the same demo contract.
//!
//! ```text
//! cargo run --example custom_tier                  # 127.0.0.1:3000, tier in /tmp/authz-custom-tier
//! PORT=3001 cargo run --example custom_tier        # a second process, same tier (AUTHZ_TIER_DIR)
//! curl -i -H 'Authorization: Bearer bob-token' http://127.0.0.1:3000/documents/1
//! curl -i -H 'Authorization: Bearer bob-token' http://127.0.0.1:3001/documents/1   # an L2 hit
//! curl -s -H 'Authorization: Bearer alice-token' http://127.0.0.1:3001/admin/stats  # tiers.l2.hits
//! curl -i -X POST -H 'Authorization: Bearer alice-token' -d '{"all":true}' \
//!     http://127.0.0.1:3000/admin/invalidate                                         # both forget
//! ```
//!
//! The demo's roles stay in each process's memory, as in `hyper.rs`: a role change invalidates
//! the user's decisions in both processes (the epochs are shared), but only the process that
//! got it knows the new role. A real app's authorizer reads one source of truth.
//!
//! What the cache does around any tier (timeouts, the circuit breaker, write-behind, MACs and
//! seals on every entry, deadline and epoch checks on every read) is not the tier's job: a tier
//! that returns garbage costs a miss, never a wrong answer. The tier only stores bytes.

#[path = "common/demo.rs"]
mod demo;
#[path = "common/hyper_app.rs"]
mod hyper_app;

use std::collections::{HashMap, VecDeque};
use std::fs::{self, OpenOptions};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tower_authz_cache::tier::{
    EpochTarget, KeyId, Notice, NoticeFuture, ScopeHashes, SharedTier, Subscription, TierError, TierFuture, TierRead,
    TierSettings, TierWrite, Transport,
};

/// DEMO ONLY. Every process sharing a tier needs the same secret (it keys the hashes, MACs and
/// seals of what the tier stores); a real deployment reads 32 random bytes from its secret store.
const DEMO_SECRET: &str = "demo-only secret: never use this one in production";

/// How often the backplane polls the epoch files: the bound on how late another process's
/// invalidation reaches this one.
const POLL: Duration = Duration::from_millis(50);

const HIGH_WATER: &str = "high-water";

/// A shared tier in a directory. Files:
/// - `e-<key id, 64 hex>`: an entry: its deadline (wall ms, 8 bytes big-endian), then its bytes;
/// - `epoch-<tag>-<hash, 16 hex>`: an epoch, in decimal (`tag`: `g`, `p`, `r` or `k`);
/// - `high-water`: the highest epoch ever stored, in decimal (never below any epoch file);
/// - `lock`: exists while a process updates an epoch; `.tmp-*`: files being written.
///
/// Every file is replaced whole with a rename, so a reader sees the old file or the new one.
/// Nothing is fsynced: after a crash of the machine the cache notices lost epochs by the high
/// water going down, and forgets what it held.
pub struct FileTier {
    dir: Arc<Path>,
    next_sweep_ms: AtomicU64,
}

impl FileTier {
    /// The tier in `dir`, created if missing.
    pub fn open(dir: impl Into<PathBuf>) -> std::io::Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir)?;
        Ok(Self { dir: dir.into(), next_sweep_ms: AtomicU64::new(0) })
    }

    /// Runs file work on tokio's blocking pool, off the async workers (plain `std::fs` inside
    /// the future would do for files this small, but would stall a worker on a slow disk). When
    /// the cache's timeout drops the future, the work still runs to its end: a lock taken is
    /// always released, a file is always renamed or not at all.
    fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Path) -> Result<T, TierError> + Send + 'static,
    ) -> TierFuture<'static, T> {
        let dir = self.dir.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || work(&dir))
                .await
                .map_err(|e| TierError::new(format!("file tier: {e}")))?
        })
    }
}

impl SharedTier for FileTier {
    fn settings(&self) -> TierSettings {
        TierSettings::default().timeout(Duration::from_millis(200))
    }

    fn read<'a>(&'a self, key_id: &'a KeyId, scopes: &'a ScopeHashes, _max_age: Duration) -> TierFuture<'a, TierRead> {
        // `max_age` is ignored: every entry carries its own deadline.
        let (key_id, scopes) = (*key_id, *scopes);
        self.blocking(move |dir| {
            let value = read_entry(&dir.join(entry_name(&key_id)));
            let epoch = |tag: &str, hash: u64| read_u64(&dir.join(epoch_name(tag, hash)));
            let read = match (
                epoch("g", 0),
                epoch("p", scopes.principal),
                epoch("r", scopes.resource),
                epoch("k", scopes.entry),
                read_u64(&dir.join(HIGH_WATER)),
            ) {
                (Some(g), Some(p), Some(r), Some(k), Some(high)) => {
                    TierRead::new(value, Some([g, p, r, k])).with_high_water(high)
                }
                // A corrupt epoch file: the cache trusts nothing from this read.
                _ => TierRead::new(value, None),
            };
            Ok(read)
        })
    }

    fn write<'a>(&'a self, batch: &'a [TierWrite]) -> TierFuture<'a, ()> {
        let batch: Vec<_> = batch.iter().map(|w| (entry_name(w.key_id()), w.remaining(), w.value().to_vec())).collect();
        self.blocking(move |dir| {
            // Every process sharing the directory shares this machine's wall clock.
            let now = now_ms();
            for (name, remaining, value) in batch {
                let deadline = now.saturating_add(u64::try_from(remaining.as_millis()).unwrap_or(u64::MAX));
                let mut bytes = deadline.to_be_bytes().to_vec();
                bytes.extend_from_slice(&value);
                write_atomic(dir, &name, &bytes).map_err(|e| io_error("entry write", e))?;
            }
            Ok(())
        })
    }

    fn bump(&self, target: EpochTarget, floor: u64, _retention: Duration) -> TierFuture<'_, u64> {
        // Above every value this store ever assigned (the high water), not only above this
        // epoch's. Epochs are kept forever, which satisfies any `retention`.
        self.blocking(move |dir| {
            update_epoch(dir, target, |stored, high| stored.saturating_add(1).max(floor).max(high.saturating_add(1)))
        })
    }

    fn raise(&self, target: EpochTarget, value: u64, _retention: Duration) -> TierFuture<'_, ()> {
        self.blocking(move |dir| update_epoch(dir, target, |stored, _| stored.max(value)).map(drop))
    }

    fn high_water(&self) -> TierFuture<'_, Option<u64>> {
        self.blocking(|dir| {
            read_u64(&dir.join(HIGH_WATER)).map(Some).ok_or_else(|| TierError::new("file tier: high water unreadable"))
        })
    }

    fn transport(&self) -> Option<&dyn Transport> {
        Some(self)
    }

    fn maintain(&self) -> TierFuture<'_, u64> {
        // Called about every 250 ms; a sweep of expired (or corrupt) entries every 10 s will do.
        // A sweep racing a fresh write of the same key may remove it: that costs one miss.
        let now = now_ms();
        if now < self.next_sweep_ms.load(Ordering::Relaxed) {
            return Box::pin(async { Ok(0) });
        }
        self.next_sweep_ms.store(now.saturating_add(10_000), Ordering::Relaxed);
        self.blocking(|dir| {
            let mut removed = 0;
            for file in fs::read_dir(dir).map_err(|e| io_error("sweep", e))?.flatten() {
                let is_entry = file.file_name().to_str().is_some_and(|name| name.starts_with("e-"));
                if is_entry && read_entry(&file.path()).is_none() && fs::remove_file(file.path()).is_ok() {
                    removed += 1;
                }
            }
            Ok(removed)
        })
    }
}

/// The backplane: polling. There is nothing to publish (a bump is its epoch file); each
/// subscriber reads the epoch files every [`POLL`] and reports the ones that rose.
impl Transport for FileTier {
    fn subscribe(&self) -> TierFuture<'_, Box<dyn Subscription>> {
        let dir = self.dir.clone();
        self.blocking(move |_| {
            // The baseline is read here, before the cache starts trusting L1 again, so that a
            // bump landing between this subscription and its first poll still shows as a rise.
            let seen = scan_epochs(&dir)?;
            Ok(Box::new(Poller { dir, seen, pending: VecDeque::new() }) as Box<dyn Subscription>)
        })
    }

    fn heartbeat<'a>(&'a self, _instance: &'a str) -> TierFuture<'a, ()> {
        // Nothing to send: every successful poll is the proof that the store is heard.
        Box::pin(async { Ok(()) })
    }
}

struct Poller {
    dir: Arc<Path>,
    /// The last value seen of each epoch file.
    seen: HashMap<String, u64>,
    /// Rises found by the last poll, not yet returned.
    pending: VecDeque<Notice>,
}

impl Subscription for Poller {
    fn next(&mut self) -> NoticeFuture<'_> {
        Box::pin(async move {
            if let Some(notice) = self.pending.pop_front() {
                return Some(Ok(notice));
            }
            tokio::time::sleep(POLL).await;
            let dir = self.dir.clone();
            let now = match tokio::task::spawn_blocking(move || scan_epochs(&dir)).await {
                Ok(Ok(now)) => now,
                Ok(Err(e)) => return Some(Err(e)),
                Err(e) => return Some(Err(TierError::new(format!("file tier: poll: {e}")))),
            };
            for (name, value) in now {
                if self.seen.get(&name).is_none_or(|&old| value > old) {
                    if let Some(target) = parse_epoch_name(&name) {
                        self.pending.push_back(Notice::Epoch { target, value });
                    }
                    self.seen.insert(name, value);
                }
            }
            // Nothing rose: the poll worked, which is what a heartbeat says.
            Some(Ok(self.pending.pop_front().unwrap_or(Notice::Heartbeat)))
        })
    }
}

/// Every epoch file's value, by file name (a corrupt one is skipped until it reads again).
fn scan_epochs(dir: &Path) -> Result<HashMap<String, u64>, TierError> {
    let mut values = HashMap::new();
    for file in fs::read_dir(dir).map_err(|e| io_error("poll", e))?.flatten() {
        let Ok(name) = file.file_name().into_string() else { continue };
        if !name.starts_with("epoch-") {
            continue;
        }
        if let Some(value) = read_u64(&file.path()) {
            values.insert(name, value);
        }
    }
    Ok(values)
}

/// Read-modify-write of one epoch under the cross-process lock: `next(stored, high_water)` is
/// its new value. The high water is raised first, so it is never below an epoch file.
fn update_epoch(dir: &Path, target: EpochTarget, next: impl FnOnce(u64, u64) -> u64) -> Result<u64, TierError> {
    let _lock = Lock::take(dir)?;
    let high = read_u64(&dir.join(HIGH_WATER)).ok_or_else(|| TierError::new("file tier: high water unreadable"))?;
    let name = epoch_name(target.tag(), target.hash());
    // A corrupt epoch counts as the high water: no epoch was ever stored above it.
    let stored = read_u64(&dir.join(&name)).unwrap_or(high);
    let value = next(stored, high).min(i64::MAX as u64);
    if value > high {
        write_atomic(dir, HIGH_WATER, value.to_string().as_bytes()).map_err(|e| io_error("high water", e))?;
    }
    write_atomic(dir, &name, value.to_string().as_bytes()).map_err(|e| io_error("epoch write", e))?;
    Ok(value)
}

/// The cross-process lock: a file only one process can create (`create_new`), removed on drop.
/// It is held for microseconds, so one older than 2 s was left by a process that died holding
/// it, and is broken. (Two processes breaking the same stale lock at once could both proceed:
/// the price of a lock made of a file.)
struct Lock(PathBuf);

impl Lock {
    fn take(dir: &Path) -> Result<Lock, TierError> {
        let path = dir.join("lock");
        for _ in 0..2_000 {
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(_) => return Ok(Lock(path)),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    let age = fs::metadata(&path).and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
                    if age.is_some_and(|age| age > Duration::from_secs(2)) {
                        let _ = fs::remove_file(&path);
                    } else {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
                Err(e) => return Err(io_error("lock", e)),
            }
        }
        Err(TierError::new("file tier: lock still held after 4 s"))
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Writes a whole file atomically: a temporary file in the same directory, then a rename.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(".tmp-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, dir.join(name)).inspect_err(|_| drop(fs::remove_file(&tmp)))
}

/// An entry's bytes, if the file is there, well formed and not past its deadline.
fn read_entry(path: &Path) -> Option<Vec<u8>> {
    let bytes = fs::read(path).ok()?;
    let (deadline, value) = bytes.split_first_chunk::<8>()?;
    (u64::from_be_bytes(*deadline) > now_ms()).then(|| value.to_vec())
}

/// A decimal file: 0 when absent, `None` when unreadable or corrupt.
fn read_u64(path: &Path) -> Option<u64> {
    match fs::read_to_string(path) {
        Ok(text) => text.trim().parse().ok(),
        Err(e) if e.kind() == ErrorKind::NotFound => Some(0),
        Err(_) => None,
    }
}

fn entry_name(key_id: &KeyId) -> String {
    format!("e-{}", key_id.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

fn epoch_name(tag: &str, hash: u64) -> String {
    format!("epoch-{tag}-{hash:016x}")
}

fn parse_epoch_name(name: &str) -> Option<EpochTarget> {
    let (tag, hash) = name.strip_prefix("epoch-")?.split_once('-')?;
    EpochTarget::from_tag(tag, u64::from_str_radix(hash, 16).ok()?)
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn io_error(what: &str, e: std::io::Error) -> TierError {
    TierError::new(format!("file tier: {what}: {e}"))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let port = demo::port().unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(2)
    });
    let dir = std::env::var("AUTHZ_TIER_DIR").unwrap_or_else(|_| "/tmp/authz-custom-tier".to_owned());
    let tier = FileTier::open(&dir).unwrap_or_else(|e| {
        eprintln!("error: AUTHZ_TIER_DIR={dir:?}: {e}");
        std::process::exit(2)
    });

    let roles = hyper_app::demo_roles();
    let cache = hyper_app::builder(&roles).secret(DEMO_SECRET).l2(tier).build();
    let tiers = format!("L1 (in-process memory), L2 (custom: files in {dir}, polled every {} ms)", POLL.as_millis());
    hyper_app::serve(port, roles, cache, "custom-tier", &tiers).await
}
