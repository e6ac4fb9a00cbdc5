//! A Redis Cluster of the test's own: 3 masters and 3 replicas, `redis-server` processes on free
//! loopback ports, joined with `redis-cli --cluster create`; killed (by their handles) and their
//! node files removed on drop.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::faults::OwnedRedis;

pub struct OwnedCluster {
    pub nodes: Vec<OwnedRedis>,
    files: Vec<std::path::PathBuf>,
    /// One cluster at a time per test binary (ports are chosen free, then bound: two clusters
    /// starting at once could pick the same one), and 2 cores.
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A port `p` with `p` and its cluster bus port `p + 10000` free.
fn free_port_pair(taken: &[u16]) -> u16 {
    let seed = std::process::id() as u64
        ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    for i in 0..10_000u64 {
        let port = 20_000 + ((seed.wrapping_mul(2654435761).wrapping_add(i * 7919)) % 10_000) as u16;
        if taken.contains(&port) {
            continue;
        }
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
    panic!("no free pair of loopback ports for a cluster node");
}

impl OwnedCluster {
    /// Starts six nodes and makes them a cluster of 3 masters with a replica each; waits until
    /// every node says `cluster_state:ok`.
    pub fn start() -> OwnedCluster {
        let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let mut nodes = Vec::new();
        let mut files = Vec::new();
        let mut ports = Vec::new();
        for _ in 0..6 {
            let port = free_port_pair(&ports);
            ports.push(port);
            // A directory of its own: a full resync writes an RDB file there, which no other
            // server may load.
            let dir = std::env::temp_dir().join(format!("authz-cluster-{}-{port}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("a node directory");
            let file = dir.join("nodes.conf");
            let file_arg = file.to_string_lossy().into_owned();
            let dir_arg = dir.to_string_lossy().into_owned();
            nodes.push(OwnedRedis::start_on(
                port,
                &[
                    "--dir",
                    &dir_arg,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &file_arg,
                    "--cluster-node-timeout",
                    "1000",
                    "--cluster-replica-validity-factor",
                    "0",
                ],
            ));
            files.push(dir);
        }
        let cluster = OwnedCluster { nodes, files, _one_at_a_time: guard };
        let addrs: Vec<String> = cluster.nodes.iter().map(|n| n.addr().to_string()).collect();
        // `timeout`: redis-cli waits for the nodes to join without a limit of its own.
        let out = Command::new("timeout")
            .args(["60", "redis-cli", "--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli ({e}): install redis-tools for this test"));
        assert!(out.status.success(), "redis-cli --cluster create failed: {}", String::from_utf8_lossy(&out.stdout));
        cluster.wait_ok(Duration::from_secs(30));
        cluster
    }

    /// The seed URLs, starting with node `first`.
    pub fn urls_from(&self, first: usize) -> Vec<String> {
        let n = self.nodes.len();
        (0..n).map(|i| self.nodes[(first + i) % n].url()).filter(|_| true).collect::<Vec<_>>()
    }

    pub fn urls(&self) -> Vec<String> {
        self.urls_from(0)
    }

    fn conn(&self, i: usize) -> Option<redis::Connection> {
        if !self.nodes[i].is_running() {
            return None;
        }
        let client = redis::Client::open(self.nodes[i].url()).ok()?;
        let conn = client.get_connection_with_timeout(Duration::from_millis(500)).ok()?;
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        Some(conn)
    }

    /// Whether every running node says `cluster_state:ok` and sees 3 masters serving slots.
    fn all_ok(&self) -> bool {
        (0..self.nodes.len()).filter(|i| self.nodes[*i].is_running()).all(|i| {
            let Some(mut c) = self.conn(i) else { return false };
            let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut c).unwrap_or_default();
            let replication: String = redis::cmd("INFO").arg("replication").query(&mut c).unwrap_or_default();
            // A replica is in sync with its master (bumps wait for one).
            let synced = replication.contains("role:master") || replication.contains("master_link_status:up");
            let running = self.nodes.iter().filter(|n| n.is_running()).count();
            info.contains("cluster_state:ok")
                && synced
                && self.masters_seen_by(i).len() == 3
                && self.known_by(i) == running
        })
    }

    /// Waits until every running node says `cluster_state:ok`.
    pub fn wait_ok(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.all_ok() {
            assert!(Instant::now() < deadline, "the cluster did not reach cluster_state:ok in {within:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The indexes (into `nodes`) of the masters serving slots, as node `i` sees them.
    fn masters_seen_by(&self, i: usize) -> Vec<usize> {
        let Some(mut c) = self.conn(i) else { return Vec::new() };
        let nodes: String = redis::cmd("CLUSTER").arg("NODES").query(&mut c).unwrap_or_default();
        let mut masters = Vec::new();
        for line in nodes.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            let port: u16 =
                f[1].split('@').next().and_then(|a| a.rsplit(':').next()).and_then(|p| p.parse().ok()).unwrap_or(0);
            if let Some(idx) = self.nodes.iter().position(|n| n.port() == port) {
                masters.push(idx);
            }
        }
        masters.sort();
        masters
    }

    /// How many nodes, not failed, node `i` knows (itself included).
    fn known_by(&self, i: usize) -> usize {
        let Some(mut c) = self.conn(i) else { return 0 };
        let nodes: String = redis::cmd("CLUSTER").arg("NODES").query(&mut c).unwrap_or_default();
        nodes.lines().filter(|l| !l.contains("fail") && l.contains("connected")).count()
    }

    /// The indexes of the masters serving slots.
    pub fn masters(&self) -> Vec<usize> {
        let live = (0..self.nodes.len()).find(|i| self.nodes[*i].is_running()).expect("a live node");
        self.masters_seen_by(live)
    }

    /// Kills node `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Starts killed node `i` again: it rejoins (as a replica of the master that replaced it).
    pub fn start_again(&mut self, i: usize) {
        self.nodes[i].start_again();
    }

    /// Counts the keys matching `pattern` on node `i`.
    pub fn count_keys(&self, i: usize, pattern: &str) -> usize {
        let mut c = self.conn(i).expect("node is up");
        let mut cursor = 0u64;
        let mut n = 0;
        loop {
            let (next, keys): (u64, Vec<String>) =
                redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(1000).query(&mut c).unwrap();
            n += keys.len();
            if next == 0 {
                return n;
            }
            cursor = next;
        }
    }
}

impl Drop for OwnedCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        for dir in &self.files {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
