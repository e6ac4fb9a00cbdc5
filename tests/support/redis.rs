//! The shared Redis for tests: its address, a namespace per test that is deleted afterwards.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

pub const SECRET: &[u8] = b"test secret: 32 bytes, not prod!";

pub fn url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// The Redis server's address; fails the test, saying how to start Redis, when unreachable.
pub fn addr() -> SocketAddr {
    let url = url();
    let hostport = url.trim_start_matches("redis://").split('/').next().unwrap_or("127.0.0.1:6379").to_owned();
    let addr: SocketAddr = hostport.parse().unwrap_or_else(|_| panic!("REDIS_URL={url}: expected redis://IP:PORT"));
    let client = redis::Client::open(url.as_str()).expect("valid REDIS_URL");
    let reachable = client.get_connection().and_then(|mut c| redis::cmd("PING").query::<String>(&mut c)).is_ok();
    assert!(
        reachable,
        "Redis is not reachable at {url}. Start it with `redis-server --daemonize yes --bind 127.0.0.1 --port 6379 \
         --save '' --appendonly no` (or run `bash .ci/run`, which starts it), or point REDIS_URL at one."
    );
    addr
}

/// A key prefix of this test's own; every key under it is deleted on drop.
pub struct Namespace(pub String);

impl Namespace {
    pub fn new(test: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        Self(format!("t-{test}-{}-{nanos}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)))
    }

    /// Every key under this namespace.
    pub fn keys(&self) -> Vec<String> {
        let client = redis::Client::open(url().as_str()).unwrap();
        let mut conn = client.get_connection().unwrap();
        let mut keys: Vec<String> = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}:*", self.0))
                .arg("COUNT")
                .arg(1000)
                .query(&mut conn)
                .unwrap();
            keys.extend(batch);
            if next == 0 {
                return keys;
            }
            cursor = next;
        }
    }

    pub fn set(&self, key: &str, value: &[u8]) {
        let client = redis::Client::open(url().as_str()).unwrap();
        let mut conn = client.get_connection().unwrap();
        let _: () = redis::cmd("SET").arg(key).arg(value).query(&mut conn).unwrap();
    }

    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        let client = redis::Client::open(url().as_str()).unwrap();
        let mut conn = client.get_connection().unwrap();
        redis::cmd("GET").arg(key).query(&mut conn).unwrap()
    }
}

impl Namespace {
    fn delete_all(&self) {
        let keys = self.keys();
        if keys.is_empty() {
            return;
        }
        if let Ok(mut conn) = redis::Client::open(url().as_str()).and_then(|c| c.get_connection()) {
            for chunk in keys.chunks(500) {
                let _: Result<(), _> = redis::cmd("DEL").arg(chunk).query(&mut conn);
            }
        }
    }
}

impl Drop for Namespace {
    /// Deletes every key of the namespace, twice: background writers of caches dropped just
    /// before may still land a write in between.
    fn drop(&mut self) {
        self.delete_all();
        std::thread::sleep(std::time::Duration::from_millis(150));
        self.delete_all();
    }
}

/// Waits until the cache's backplane has been heard (L1 trusted); fails after 5 s.
pub async fn wait_trusted(cache: &tower_authz_cache::AuthzCache) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !cache.stats().backplane.is_some_and(|b| b.l1_trusted) {
        assert!(std::time::Instant::now() < deadline, "the backplane was never heard within 5 s");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}
