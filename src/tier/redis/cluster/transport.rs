//! The backplane over a Redis Cluster: the [`Transport`] of [`RedisClusterTier`].
//!
//! Classic `PUBLISH` reaches every node of a cluster (the cluster bus forwards it), so one
//! subscription on any node hears the notices the bump scripts publish, whichever master ran
//! them. The subscription is a plain pub/sub connection through a seed node (the next seed
//! after a failure).
//!
//! The staleness bound rests on "a subscription that delivers heartbeats delivers every notice
//! published while it lived" ([`Transport`]). Notices start on the master of their epoch's slot
//! and reach the subscriber's node over the bus, so a heartbeat published through one node
//! would prove one path only. Heartbeats are therefore published through **every master** of
//! the current topology (`h <instance>@<node id>`), and the subscription reports a heartbeat
//! only once it heard one through every master it knows since the last one it reported. A
//! master that cannot be reached (failed, partitioned from the subscriber) stops the
//! heartbeats: the cache stops trusting L1 within `max_staleness`, subscribes again, and goes on
//! once the new topology's masters are all heard.
//!
//! A master that fails may have published a notice the bus never forwarded. So a subscription
//! also ends as soon as a master it started with is no longer one (a failover, a node removed):
//! the cache then treats everything before the new subscription as possibly missed, and L1
//! entries older than it are not trusted.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{ClusterShared, RedisClusterTier, at, failed};
use crate::tier::shared::{Notice, NoticeFuture, Subscription, TierError, TierFuture, Transport};

impl Transport for RedisClusterTier {
    fn subscribe(&self) -> TierFuture<'_, Box<dyn Subscription>> {
        Box::pin(async move {
            let s = &self.shared;
            let seed = s.next_seed.load(Ordering::Relaxed) % s.seeds.len();
            let subscribed = async {
                let mut pubsub = s.seeds[seed].get_async_pubsub().await?;
                pubsub.subscribe(&s.keys.channel).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            // The masters it starts with: losing one of them ends it.
            let masters = match s.read_topology().await {
                Ok(t) => t,
                Err(_) => s.current_topology(),
            };
            let masters: Vec<String> = masters.masters().map(|m| m.id.clone()).collect();
            match subscribed.await {
                Ok(pubsub) => Ok(Box::new(ClusterSubscription {
                    stream: pubsub.into_on_message(),
                    shared: self.shared.clone(),
                    heard: HashSet::new(),
                    masters,
                }) as Box<dyn Subscription>),
                Err(e) => {
                    // The next attempt goes through the next seed.
                    s.next_seed.store(seed + 1, Ordering::Relaxed);
                    Err(failed(e))
                }
            }
        })
    }

    /// One `PUBLISH` through each master of the topology (read again first).
    fn heartbeat<'a>(&'a self, instance: &'a str) -> TierFuture<'a, ()> {
        Box::pin(async move {
            let s = &self.shared;
            let topology = match s.read_topology().await {
                Ok(t) => t,
                Err(_) => s.current_topology(),
            };
            let conn = s.conn().await?;
            let publishes = topology.masters().map(|node| {
                let mut conn = conn.clone();
                let mut cmd = redis::cmd("PUBLISH");
                cmd.arg(&s.keys.channel).arg(Notice::heartbeat_payload(&format!("{instance}@{}", node.id)));
                async move { conn.route_command(cmd, at(node)).await.map(|_| ()).map_err(failed) }
            });
            let results = futures_util::future::join_all(publishes).await;
            if topology.masters().next().is_none() {
                return Err(TierError::new("redis cluster: no master known"));
            }
            results.into_iter().collect()
        })
    }
}

struct ClusterSubscription {
    stream: redis::aio::PubSubStream,
    shared: Arc<ClusterShared>,
    /// Masters heard through since the last heartbeat reported.
    heard: HashSet<String>,
    /// The masters when it started.
    masters: Vec<String>,
}

impl ClusterSubscription {
    /// Records a heartbeat through `node`; whether every known master has now been heard.
    fn heard_through(&mut self, node: &str) -> bool {
        self.heard.insert(node.to_owned());
        let topology = self.shared.current_topology();
        if self.masters.is_empty() {
            self.masters = topology.masters().map(|m| m.id.clone()).collect();
        }
        let mut masters = topology.masters().peekable();
        if masters.peek().is_none() {
            return false;
        }
        let complete = masters.all(|m| self.heard.contains(&m.id));
        if complete {
            self.heard.clear();
        }
        complete
    }
}

impl ClusterSubscription {
    /// Whether a master this subscription started with is no longer one.
    fn lost_a_master(&self) -> bool {
        let topology = self.shared.current_topology();
        topology.masters().next().is_some() && self.masters.iter().any(|id| !topology.masters().any(|m| &m.id == id))
    }
}

impl Subscription for ClusterSubscription {
    fn next(&mut self) -> NoticeFuture<'_> {
        Box::pin(async move {
            use futures_util::StreamExt;
            loop {
                let msg = self.stream.next().await?;
                if self.lost_a_master() {
                    tracing::info!(target: "authz_cache", "redis cluster: a master changed; subscribing again");
                    return None;
                }
                let Ok(payload) = msg.get_payload::<String>() else { return Some(Ok(Notice::Malformed)) };
                match Notice::parse(&payload) {
                    Notice::Heartbeat => {
                        let node = payload.rsplit_once('@').map_or("", |(_, node)| node);
                        if self.heard_through(node) {
                            return Some(Ok(Notice::Heartbeat));
                        }
                    }
                    notice => return Some(Ok(notice)),
                }
            }
        })
    }
}
