//! L2 on a Redis Cluster (feature `redis`): [`RedisClusterTier`], a second Redis implementation
//! of [`SharedTier`], with a backplane over the cluster as its [`Transport`].
//!
//! - **Connection.** One `redis` cluster connection (`cluster-async`), cloned per call: it keeps
//!   one multiplexed connection per node, follows `MOVED`/`ASK` and refreshes the slot map on
//!   errors. A bb8 pool would add nothing but a second layer of reconnects (commands are
//!   pipelined on each node's connection already). Made lazily, at the first call.
//! - **Keys** (`keys.rs`): entries spread over the masters with their principal; what is read
//!   together is colocated; why reads that see nodes at different moments are safe.
//! - **Failover** (`WAIT`): every bump and raise is confirmed by `wait_replicas` replicas
//!   (default 1) before it counts as done. Replication is asynchronous: a bump acknowledged by a
//!   master alone could be lost when its replica takes over, and the entries it ended (older,
//!   so already replicated) would validate again. Unconfirmed, the bump is a failure: the cache
//!   owes it (`cache/debts.rs`), reads no L2 until it is paid, and pays it again on the new
//!   master (a bump only ever raises). An entry write lost in a failover is only a miss. During
//!   a failover, commands to the failed master's slots fail or time out until the replica is
//!   promoted and the client has the new slot map: the cache goes to the next tier or the
//!   authorizer (latency, never a stale allow).
//! - **Loss of epochs.** The high water (`{ns}:g` slot) is raised after every bump and read with
//!   every entry; a high water lower than one seen before (the cluster flushed, or the high
//!   water's master lost without its replica) makes the cache forget every shared epoch and drop
//!   L1. A high water lost on its own only costs that.
//! - **Backplane** (`transport.rs`): cluster-wide `PUBLISH`, heartbeats through every master.
//! - **Upkeep** (`topology.rs`): every 2 s, `CLUSTER NODES`, a `PING` per node and the masters'
//!   `maxmemory-policy`: health per node, and a warning when a slot has no master, a node does
//!   not answer, a master has fewer replicas than `wait_replicas`, or eviction is possible.
//!
//! ```no_run
//! use std::time::Duration;
//! use tower_authz_cache::{AuthzCache, Decision, Permission, Principal, RedisClusterTier};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let l2 = RedisClusterTier::builder(["redis://10.0.0.1:7000", "redis://10.0.0.2:7000"])
//!     .namespace("myapp")
//!     .timeout(Duration::from_millis(50))
//!     .wait_replicas(1)
//!     .build()?;
//! let cache = AuthzCache::builder(|_: Principal, _: Permission| async {
//!     Ok::<_, std::convert::Infallible>(Decision::allow())
//! })
//! .secret(std::env::var("AUTHZ_CACHE_SECRET")?)
//! .l2(l2)
//! .build();
//! # Ok(()) }
//! ```

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

mod keys;
mod scripts;
pub(crate) mod topology;
mod transport;

use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};

use self::keys::Keys;
use self::topology::Topology;
use super::eviction::{EVICTION_UNKNOWN, EVICTION_WARNING, Eviction};
use super::scripts::LUA_EPOCHS;
use super::{RedisTierError, failed, parse_epoch};
use crate::cache::epoch::EPOCH_MAX;
use crate::cache::key::Scope;
use crate::health::{HealthStatus, NodeHealth};
use crate::tier::shared::{
    EpochTarget, KeyId, ScopeHashes, SharedTier, TierError, TierFuture, TierRead, TierSettings, TierWrite, Transport,
};

/// How often the upkeep reads the topology, pings the nodes and checks their eviction policy.
const CHECK_EVERY: Duration = Duration::from_secs(2);

/// Builds a [`RedisClusterTier`]. Defaults: namespace `authz`, connect timeout 1 s, call
/// timeout 50 ms, breaker opens after 5 consecutive failures for 30 s, write queue 10,000,
/// bumps confirmed by 1 replica.
#[must_use]
pub struct RedisClusterTierBuilder {
    nodes: Vec<String>,
    namespace: String,
    connect_timeout: Duration,
    wait_replicas: u8,
    settings: TierSettings,
}

impl fmt::Debug for RedisClusterTierBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisClusterTierBuilder")
            .field("nodes", &self.nodes.len())
            .field("namespace", &self.namespace)
            .field("wait_replicas", &self.wait_replicas)
            .finish_non_exhaustive()
    }
}

impl RedisClusterTierBuilder {
    /// The key prefix; every instance that shares decisions uses the same one. Letters, digits,
    /// `-`, `_`, `.` and `/`, at most 64 characters. Default `authz`.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// How long to wait for a connection to a node.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How many replicas must confirm a bump (`WAIT`) before it counts as done (default 1; 0
    /// for a cluster without replicas, whose failover cannot keep anything anyway).
    pub fn wait_replicas(mut self, replicas: u8) -> Self {
        self.wait_replicas = replicas;
        self
    }

    crate::tier::shared::guard_setters!("Redis Cluster");

    /// Validates the configuration and builds the tier. Connections are made lazily.
    pub fn build(self) -> Result<RedisClusterTier, RedisTierError> {
        if !crate::tier::names::namespace_ok(&self.namespace) {
            return Err(RedisTierError::config("namespace must be 1-64 of [A-Za-z0-9-_./]"));
        }
        if self.nodes.is_empty() {
            return Err(RedisTierError::config("at least one seed node is needed"));
        }
        let mut seeds = Vec::with_capacity(self.nodes.len());
        for node in &self.nodes {
            seeds.push(
                redis::Client::open(node.as_str())
                    .map_err(|e| RedisTierError::config(format!("invalid redis cluster node url: {e}")))?,
            );
        }
        let client = redis::cluster::ClusterClientBuilder::new(self.nodes.clone())
            .connection_timeout(self.connect_timeout)
            .response_timeout(self.settings.timeout.max(Duration::from_millis(1)))
            // The guard bounds every call; a few quick retries let a call follow a MOVED.
            .retries(3)
            .min_retry_wait(5)
            .max_retry_wait(50)
            .build()
            .map_err(|e| RedisTierError::config(format!("invalid redis cluster nodes: {e}")))?;
        Ok(RedisClusterTier {
            shared: Arc::new(ClusterShared {
                client,
                conn: Arc::new(tokio::sync::OnceCell::new()),
                connecting: Mutex::new(None),
                seeds,
                next_seed: std::sync::atomic::AtomicUsize::new(0),
                keys: Keys::new(&self.namespace),
                settings: self.settings,
                wait_replicas: self.wait_replicas,
                bump: format!("{LUA_EPOCHS}{}", scripts::BUMP),
                raise: format!("{LUA_EPOCHS}{}", scripts::RAISE),
                raise_high_water: format!("{LUA_EPOCHS}{}", scripts::RAISE_HIGH_WATER),
                topology: RwLock::new(Arc::new(Topology::default())),
                nodes: Mutex::new(Vec::new()),
                problem: AtomicU8::new(Problem::Unchecked as u8),
                eviction: AtomicU8::new(Eviction::Unknown as u8),
                checked: Mutex::new(None),
            }),
        })
    }
}

/// L2 on a Redis Cluster. Cheap to clone. Give it to
/// [`AuthzCacheBuilder::l2`](crate::AuthzCacheBuilder::l2).
#[derive(Clone)]
pub struct RedisClusterTier {
    shared: Arc<ClusterShared>,
}

impl fmt::Debug for RedisClusterTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisClusterTier").field("namespace", &self.shared.keys.prefix()).finish_non_exhaustive()
    }
}

impl RedisClusterTier {
    /// Starts building a tier on these seed nodes (`redis://host:port` each; any of the
    /// cluster's nodes will do, the rest are discovered). The backplane subscribes through the
    /// seeds, the first one first.
    pub fn builder<I, S>(nodes: I) -> RedisClusterTierBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        RedisClusterTierBuilder {
            nodes: nodes.into_iter().map(Into::into).collect(),
            namespace: "authz".into(),
            connect_timeout: Duration::from_secs(1),
            wait_replicas: 1,
            settings: TierSettings::default(),
        }
    }

    /// The key prefix this tier uses (`{namespace}:v1`).
    pub fn prefix(&self) -> &str {
        self.shared.keys.prefix()
    }

    /// Checks the cluster now: `CLUSTER INFO` says `cluster_state:ok` and every slot has a
    /// master. Returns the masters and replicas found (for `authz-cache init`).
    pub async fn check_cluster(&self) -> Result<ClusterReport, TierError> {
        let s = &self.shared;
        let mut conn = s.conn().await?;
        let info = conn.route_command(redis::cmd("CLUSTER").arg("INFO").clone(), random()).await.map_err(failed)?;
        let info: String = redis::from_redis_value(info).map_err(TierError::new)?;
        let topology = s.read_topology().await?;
        let report = ClusterReport {
            masters: topology.masters().count(),
            replicas: topology.nodes.iter().filter(|n| !n.is_master()).count(),
            slots_covered: topology.covered,
            state_ok: topology::state_ok(&info),
        };
        if !report.state_ok {
            return Err(TierError::new("redis cluster: CLUSTER INFO does not say cluster_state:ok"));
        }
        if !topology.complete() {
            return Err(TierError::new(format!(
                "redis cluster: {} of {} slots have a master",
                topology.covered,
                topology::SLOTS
            )));
        }
        Ok(report)
    }
}

/// What [`RedisClusterTier::check_cluster`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterReport {
    /// Masters serving slots.
    pub masters: usize,
    /// Their replicas.
    pub replicas: usize,
    /// Slots with a master (16,384 when all are).
    pub slots_covered: u32,
    /// `CLUSTER INFO` said `cluster_state:ok`.
    pub state_ok: bool,
}

/// What the last upkeep found wrong with the cluster (the health warning).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Problem {
    Unchecked = 0,
    None = 1,
    Uncovered = 2,
    NodeDown = 3,
    FewReplicas = 4,
}

const UNCOVERED: &str = "redis cluster: some slots have no master (their keys cannot be read)";
const NODE_DOWN: &str = "redis cluster: a node does not answer";
const FEW_REPLICAS: &str =
    "redis cluster: a master has fewer replicas than wait_replicas (its invalidations cannot be confirmed)";

struct ClusterShared {
    client: redis::cluster::ClusterClient,
    conn: Arc<tokio::sync::OnceCell<ClusterConnection>>,
    /// The attempt to connect, in a task of its own (see [`ClusterShared::conn`]).
    connecting: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The seed nodes, for the backplane's subscriptions (through the next one after a failure).
    seeds: Vec<redis::Client>,
    next_seed: std::sync::atomic::AtomicUsize,
    keys: Keys,
    settings: TierSettings,
    wait_replicas: u8,
    bump: String,
    raise: String,
    raise_high_water: String,
    /// The last topology read (the masters heartbeats go through).
    topology: RwLock<Arc<Topology>>,
    nodes: Mutex<Vec<NodeHealth>>,
    problem: AtomicU8,
    eviction: AtomicU8,
    checked: Mutex<Option<Instant>>,
}

fn random() -> RoutingInfo {
    RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random)
}

fn at(node: &topology::Node) -> RoutingInfo {
    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host: node.host.clone(), port: node.port })
}

/// The value of an `EVAL` of a bump: a decimal string; beyond `i64::MAX`, `EPOCH_MAX`.
fn epoch_value(raw: &str) -> u64 {
    raw.parse::<u64>().map_or(EPOCH_MAX, |v| v.min(EPOCH_MAX))
}

impl ClusterShared {
    /// The cluster connection. The first call starts connecting in a task of its own (bounded
    /// by the connect timeout, not by the caller's): a call timeout shorter than connecting to
    /// every node would otherwise drop every attempt, and the tier would never connect. A failed
    /// attempt is made again by the next call.
    async fn conn(&self) -> Result<ClusterConnection, TierError> {
        if let Some(conn) = self.conn.get() {
            return Ok(conn.clone());
        }
        {
            let mut connecting = self.connecting.lock().unwrap_or_else(|e| e.into_inner());
            if connecting.as_ref().is_none_or(|task| task.is_finished()) {
                let (cell, client) = (self.conn.clone(), self.client.clone());
                *connecting = Some(tokio::spawn(async move {
                    if let Err(e) = cell.get_or_try_init(|| client.get_async_connection()).await {
                        tracing::debug!(target: "authz_cache", error = %e, "redis cluster: could not connect");
                    }
                }));
            }
        }
        let conn = self.conn.get_or_try_init(|| self.client.get_async_connection()).await.map_err(failed)?;
        Ok(conn.clone())
    }

    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Vec<u8>>>, TierError> {
        let mut conn = self.conn().await?;
        let mut cmd = redis::cmd("MGET");
        for key in keys {
            cmd.arg(*key);
        }
        let values: Vec<Option<Vec<u8>>> = cmd.query_async(&mut conn).await.map_err(failed)?;
        if values.len() != keys.len() {
            return Err(TierError::new("redis cluster: MGET answered the wrong number of values"));
        }
        Ok(values)
    }

    /// Runs an epoch script on `key`'s slot and, when replicas must confirm, `WAIT`s on the same
    /// node in the same pipeline. Unconfirmed is a failure (the cache then owes the bump).
    async fn epoch_script(&self, script: &str, key: &str, args: &[String]) -> Result<String, TierError> {
        let mut conn = self.conn().await?;
        let mut pipe = redis::pipe();
        let eval = pipe.cmd("EVAL").arg(script).arg(1).arg(key);
        for a in args {
            eval.arg(a);
        }
        if self.wait_replicas > 0 {
            // A quarter of the call's timeout: the script, the high water and their round trips
            // share the rest.
            let wait_ms = u64::try_from((self.settings.timeout / 4).as_millis()).unwrap_or(u64::MAX).max(1);
            pipe.cmd("WAIT").arg(self.wait_replicas).arg(wait_ms);
        }
        let values: Vec<redis::Value> = pipe.query_async(&mut conn).await.map_err(failed)?;
        let stored = match values.first() {
            Some(v) => redis::from_redis_value::<String>(v.clone()).map_err(TierError::new)?,
            None => return Err(TierError::new("redis cluster: the epoch script answered nothing")),
        };
        if self.wait_replicas > 0 {
            let confirmed = match values.get(1) {
                Some(v) => redis::from_redis_value::<i64>(v.clone()).map_err(TierError::new)?,
                None => 0,
            };
            if confirmed < i64::from(self.wait_replicas) {
                return Err(TierError::new(format!(
                    "redis cluster: epoch confirmed by {confirmed} of {} replicas (could be lost in a failover)",
                    self.wait_replicas
                )));
            }
        }
        Ok(stored)
    }

    /// Raises the high water to `value` (no `WAIT`: a high water lost in a failover reads low,
    /// which only makes the cache forget its shared epochs).
    async fn raise_high_water(&self, value: u64) -> Result<(), TierError> {
        let mut conn = self.conn().await?;
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(&self.raise_high_water).arg(1).arg(&self.keys.high_water).arg(value);
        cmd.query_async::<i64>(&mut conn).await.map(|_| ()).map_err(failed)
    }

    /// `CLUSTER NODES`, parsed and kept as the current topology.
    async fn read_topology(&self) -> Result<Arc<Topology>, TierError> {
        let mut conn = self.conn().await?;
        let reply = conn.route_command(redis::cmd("CLUSTER").arg("NODES").clone(), random()).await.map_err(failed)?;
        let reply: String = redis::from_redis_value(reply).map_err(TierError::new)?;
        let topology =
            Arc::new(Topology::parse(&reply).ok_or_else(|| TierError::new("redis cluster: CLUSTER NODES unreadable"))?);
        *self.topology.write().unwrap_or_else(|e| e.into_inner()) = topology.clone();
        Ok(topology)
    }

    pub(super) fn current_topology(&self) -> Arc<Topology> {
        self.topology.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The upkeep: topology, a `PING` per node, the masters' eviction policy.
    async fn check(&self) {
        let Ok(topology) = self.read_topology().await else {
            self.problem.store(Problem::NodeDown as u8, Ordering::Release);
            return;
        };
        let Ok(conn) = self.conn().await else { return };
        let probes = topology.nodes.iter().map(|node| {
            let mut conn = conn.clone();
            async move {
                let started = Instant::now();
                let ping =
                    tokio::time::timeout(self.settings.timeout * 4, conn.route_command(redis::cmd("PING"), at(node)))
                        .await;
                let up = matches!(ping, Ok(Ok(_)));
                let latency = started.elapsed();
                let policy = if up && node.is_master() {
                    let mut cmd = redis::cmd("CONFIG");
                    cmd.arg("GET").arg("maxmemory-policy");
                    match tokio::time::timeout(self.settings.timeout * 4, conn.route_command(cmd, at(node))).await {
                        Ok(Ok(v)) => Eviction::of(
                            redis::from_redis_value::<Vec<String>>(v)
                                .ok()
                                .as_ref()
                                .and_then(|r| r.get(1))
                                .map(String::as_str),
                        ),
                        Ok(Err(e)) if e.kind() != redis::ErrorKind::Io && !e.is_connection_dropped() => {
                            Eviction::Unreadable
                        }
                        _ => Eviction::Unknown,
                    }
                } else {
                    Eviction::Unknown
                };
                let health = NodeHealth {
                    address: node.address(),
                    id: node.id.clone(),
                    master: node.is_master(),
                    slots: node.slots,
                    status: if up { HealthStatus::Up } else { HealthStatus::Down },
                    latency_us: up.then(|| u64::try_from(latency.as_micros()).unwrap_or(u64::MAX)),
                };
                (health, policy)
            }
        });
        let found = futures_util::future::join_all(probes).await;
        let eviction = found.iter().map(|(_, e)| *e as u8).filter(|e| *e != Eviction::Unknown as u8).max();
        if let Some(eviction) = eviction {
            let before = self.eviction.swap(eviction, Ordering::AcqRel);
            if before != eviction && eviction == Eviction::Unsafe as u8 {
                tracing::warn!(target: "authz_cache::audit", "security: {EVICTION_WARNING} (a redis cluster master)");
            }
        }
        let problem = if !topology.complete() {
            Problem::Uncovered
        } else if topology.fewest_replicas() < usize::from(self.wait_replicas) {
            Problem::FewReplicas
        } else if found.iter().any(|(n, _)| n.status != HealthStatus::Up) {
            Problem::NodeDown
        } else {
            Problem::None
        };
        let before = self.problem.swap(problem as u8, Ordering::AcqRel);
        if before != problem as u8 && problem != Problem::None {
            tracing::warn!(target: "authz_cache", problem = ?problem, "redis cluster degraded");
        }
        *self.nodes.lock().unwrap_or_else(|e| e.into_inner()) = found.into_iter().map(|(n, _)| n).collect();
    }
}

impl SharedTier for RedisClusterTier {
    fn settings(&self) -> TierSettings {
        self.shared.settings
    }

    /// Four single-slot commands at once: the entry with its principal epoch, the resource
    /// epoch, the entry epoch, the global epoch with the high water (`keys.rs`).
    fn read<'a>(&'a self, key_id: &'a KeyId, scopes: &'a ScopeHashes, _max_age: Duration) -> TierFuture<'a, TierRead> {
        Box::pin(async move {
            let s = &self.shared;
            let k = &s.keys;
            let (entry, principal) = (k.entry(scopes.principal, key_id), k.epoch(Scope::Principal, scopes.principal));
            let resource = k.epoch(Scope::Resource, scopes.resource);
            let entry_epoch = k.epoch(Scope::Entry, scopes.entry);
            let (mut with_principal, resource, entry_epoch, global) = futures_util::future::try_join4(
                s.get_many(&[&entry, &principal]),
                s.get_many(&[&resource]),
                s.get_many(&[&entry_epoch]),
                s.get_many(&[&k.global, &k.high_water]),
            )
            .await?;
            // An epoch that does not parse cannot vouch for anything: no epochs, no L2 hit.
            let epochs = match (
                parse_epoch(&global[0]),
                parse_epoch(&with_principal[1]),
                parse_epoch(&resource[0]),
                parse_epoch(&entry_epoch[0]),
            ) {
                (Some(g), Some(p), Some(r), Some(e)) => Some([g, p, r, e]),
                _ => None,
            };
            let high_water = parse_epoch(&global[1]).unwrap_or(0);
            Ok(TierRead::new(with_principal.swap_remove(0), epochs).with_high_water(high_water))
        })
    }

    /// One `SET ... PX` per entry (each on its principal's slot), sent at once.
    fn write<'a>(&'a self, batch: &'a [TierWrite]) -> TierFuture<'a, ()> {
        Box::pin(async move {
            let conn = self.shared.conn().await?;
            let sets = batch.iter().map(|w| {
                let mut conn = conn.clone();
                let px = u64::try_from(w.remaining().as_millis()).unwrap_or(u64::MAX).max(1);
                let mut cmd = redis::cmd("SET");
                cmd.arg(self.shared.keys.entry(w.principal_hash(), w.key_id())).arg(w.value()).arg("PX").arg(px);
                async move { cmd.query_async::<()>(&mut conn).await.map_err(failed) }
            });
            futures_util::future::try_join_all(sets).await.map(|_| ())
        })
    }

    /// `max(stored + 1, floor)` on the target's own key, confirmed by `wait_replicas`
    /// replicas, then the high water raised to it.
    fn bump(&self, target: EpochTarget, floor: u64, retention: Duration) -> TierFuture<'_, u64> {
        Box::pin(async move {
            let s = &self.shared;
            let (key, px, prefix) = s.keys.epoch_of(target, retention_ms(retention));
            let args = [floor.to_string(), px.to_string(), s.keys.channel.clone(), prefix];
            let value = epoch_value(&s.epoch_script(&s.bump, &key, &args).await?);
            s.raise_high_water(value).await?;
            Ok(value)
        })
    }

    fn raise(&self, target: EpochTarget, value: u64, retention: Duration) -> TierFuture<'_, ()> {
        Box::pin(async move {
            let s = &self.shared;
            let (key, px, prefix) = s.keys.epoch_of(target, retention_ms(retention));
            let args = [value.to_string(), px.to_string(), s.keys.channel.clone(), prefix];
            s.epoch_script(&s.raise, &key, &args).await?;
            s.raise_high_water(value).await
        })
    }

    fn high_water(&self) -> TierFuture<'_, Option<u64>> {
        Box::pin(async move {
            let values = self.shared.get_many(&[&self.shared.keys.high_water]).await?;
            Ok(Some(parse_epoch(&values[0]).unwrap_or(0)))
        })
    }

    fn transport(&self) -> Option<&dyn Transport> {
        Some(self)
    }

    /// Every 2 s: the topology, each node's `PING`, the masters' eviction policy.
    fn maintain(&self) -> TierFuture<'_, u64> {
        Box::pin(async move {
            let due = {
                let mut checked = self.shared.checked.lock().unwrap_or_else(|e| e.into_inner());
                let due = checked.is_none_or(|at| at.elapsed() >= CHECK_EVERY);
                if due {
                    *checked = Some(Instant::now());
                }
                due
            };
            if due {
                self.shared.check().await;
            }
            Ok(0)
        })
    }

    fn warning(&self) -> Option<&'static str> {
        let s = &self.shared;
        match s.problem.load(Ordering::Acquire) {
            2 => return Some(UNCOVERED),
            3 => return Some(NODE_DOWN),
            4 => return Some(FEW_REPLICAS),
            _ => {}
        }
        match s.eviction.load(Ordering::Acquire) {
            2 => Some(EVICTION_WARNING),
            3 => Some(EVICTION_UNKNOWN),
            _ => None,
        }
    }

    fn nodes(&self) -> Vec<NodeHealth> {
        self.shared.nodes.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn retention_ms(retention: Duration) -> u64 {
    u64::try_from(retention.as_millis()).unwrap_or(u64::MAX)
}
