//! The shared servers: what a run creates on Redis and Postgres, and its clean-up.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use crate::BoxError;

/// What the in-process configurations share: the servers, and what to clean up.
#[derive(Clone)]
pub(crate) struct Backends {
    pub(crate) redis_url: Option<String>,
    pub(crate) redis_cluster_nodes: Option<Vec<String>>,
    pub(crate) database_url: Option<String>,
    pub(crate) population: u32,
    pub(crate) allow_ttl: Duration,
    pub(crate) deny_ttl: Duration,
    pub(crate) leftovers: Arc<Leftovers>,
}
/// Everything this run created on the shared servers: its Redis namespace and its Postgres
/// schemas. Cleaned after each configuration, at the end, on error (drop) and on Ctrl-C; never
/// anything else (no FLUSHALL, no other schema).
pub(crate) struct Leftovers {
    pub(crate) redis: Option<(String, String)>,
    pub(crate) redis_used: std::sync::atomic::AtomicBool,
    /// The cluster's seed nodes and this run's namespace on it.
    pub(crate) redis_cluster: Option<(Vec<String>, String)>,
    pub(crate) redis_cluster_used: std::sync::atomic::AtomicBool,
    pub(crate) database_url: Option<String>,
    pub(crate) schemas: std::sync::Mutex<Vec<String>>,
}
impl Leftovers {
    pub(crate) fn add_schema(&self, schema: &str) {
        self.schemas.lock().unwrap_or_else(|e| e.into_inner()).push(schema.to_owned());
    }

    pub(crate) fn is_empty(&self) -> bool {
        !self.redis_used.load(Relaxed)
            && !self.redis_cluster_used.load(Relaxed)
            && self.schemas.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
    }

    /// Deletes what is left; says what it did.
    pub(crate) async fn clean(&self) {
        let schemas = std::mem::take(&mut *self.schemas.lock().unwrap_or_else(|e| e.into_inner()));
        if let (Some(url), false) = (&self.database_url, schemas.is_empty()) {
            match tokio::time::timeout(Duration::from_secs(30), drop_schemas(url, &schemas)).await {
                Ok(Ok(())) => println!("postgres: dropped schema {}", schemas.join(", ")),
                Ok(Err(e)) => eprintln!("postgres: could not drop schema {}: {e}", schemas.join(", ")),
                Err(_) => eprintln!("postgres: dropping schema {} timed out", schemas.join(", ")),
            }
        }
        #[cfg(feature = "redis")]
        if let (Some((url, namespace)), true) = (&self.redis, self.redis_used.swap(false, Relaxed)) {
            match tokio::time::timeout(Duration::from_secs(10), delete_namespace(url, namespace)).await {
                Ok(Ok(n)) => println!("redis: deleted {n} keys of namespace {namespace}"),
                Ok(Err(e)) => eprintln!("redis: could not delete namespace {namespace}: {e}"),
                Err(_) => eprintln!("redis: deleting namespace {namespace} timed out"),
            }
        }
        #[cfg(feature = "redis")]
        if let (Some((nodes, namespace)), true) = (&self.redis_cluster, self.redis_cluster_used.swap(false, Relaxed)) {
            let mut deleted = 0;
            let mut nodes = nodes.clone();
            // Every master, not only the seeds given.
            if let Ok(Ok(found)) = tokio::time::timeout(Duration::from_secs(5), cluster_masters(&nodes[0])).await {
                nodes.extend(found.into_iter().filter(|n| !nodes.contains(n)).collect::<Vec<_>>());
            }
            for node in &nodes {
                // Each master deletes its own share, one key at a time (no cross-slot DEL);
                // replicas answer with a redirection, which deletes nothing.
                match tokio::time::timeout(Duration::from_secs(10), delete_namespace_by_key(node, namespace)).await {
                    Ok(Ok(n)) => deleted += n,
                    Ok(Err(e)) => eprintln!("redis cluster: could not delete namespace {namespace} on a node: {e}"),
                    Err(_) => eprintln!("redis cluster: deleting namespace {namespace} timed out on a node"),
                }
            }
            println!("redis cluster: deleted {deleted} keys of namespace {namespace}");
        }
    }

    /// `clean` from outside any runtime (on a thread of its own, with its own runtime).
    pub(crate) fn clean_blocking(self: &Arc<Self>) {
        if self.is_empty() {
            return;
        }
        let me = self.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                rt.block_on(me.clean());
            }
        })
        .join();
    }
}
/// Cleans up when dropped: whatever way `run` ends, nothing it created stays behind.
pub(crate) struct CleanOnDrop(pub(crate) Arc<Leftovers>);
impl Drop for CleanOnDrop {
    fn drop(&mut self) {
        self.0.clean_blocking();
    }
}
#[cfg_attr(not(feature = "postgres"), allow(unused_variables))]
pub(crate) async fn drop_schemas(url: &str, schemas: &[String]) -> Result<(), BoxError> {
    #[cfg(feature = "postgres")]
    {
        let client = pg_client(url).await?;
        for schema in schemas {
            // Only names this run made (loadtest_<pid>_<n>), never anything else.
            if !schema.starts_with("loadtest_") || !schema.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                continue;
            }
            client.batch_execute(&format!("SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS {schema} CASCADE")).await?;
        }
    }
    Ok(())
}
#[cfg(feature = "postgres")]
pub(crate) async fn pg_client(url: &str) -> Result<tokio_postgres::Client, BoxError> {
    let (client, connection) =
        tokio::time::timeout(Duration::from_secs(5), tokio_postgres::connect(url, tokio_postgres::NoTls))
            .await
            .map_err(|_| format!("cannot reach postgres at {}", redact(url)))??;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}
/// `url` without its password.
pub(crate) fn redact(url: &str) -> String {
    match url.split_once("://").and_then(|(scheme, rest)| Some((scheme, rest.rsplit_once('@')?))) {
        Some((scheme, (userinfo, host))) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}
#[cfg(feature = "redis")]
pub(crate) async fn redis_connection(url: &str) -> Result<redis::aio::MultiplexedConnection, BoxError> {
    let client = redis::Client::open(url)?;
    let mut conn = tokio::time::timeout(Duration::from_secs(2), client.get_multiplexed_async_connection())
        .await
        .map_err(|_| format!("cannot reach redis at {url}"))??;
    let _: String = redis::cmd("PING").query_async(&mut conn).await?;
    Ok(conn)
}
/// The masters' URLs, as `CLUSTER NODES` on the node at `url` lists them.
#[cfg(feature = "redis")]
async fn cluster_masters(url: &str) -> Result<Vec<String>, BoxError> {
    let mut conn = redis_connection(url).await?;
    let nodes: String = redis::cmd("CLUSTER").arg("NODES").query_async(&mut conn).await?;
    Ok(nodes
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let master = f.get(2).is_some_and(|flags| flags.contains("master") && !flags.contains("fail"));
            master.then(|| f.get(1).and_then(|a| a.split('@').next()).map(|a| format!("redis://{a}"))).flatten()
        })
        .collect())
}
/// Deletes every key of the namespace held by the node at `url`, if it is a master (a replica's
/// keys are its master's), one DEL per key (a cluster node refuses a DEL across slots); returns
/// how many.
#[cfg(feature = "redis")]
pub(crate) async fn delete_namespace_by_key(url: &str, namespace: &str) -> Result<u64, BoxError> {
    let mut conn = redis_connection(url).await?;
    let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut conn).await?;
    if !matches!(role.first(), Some(redis::Value::BulkString(r)) if r.as_slice() == b"master") {
        return Ok(0);
    }
    delete_matching(&mut conn, namespace, true).await
}
/// Deletes every key of the namespace (SCAN MATCH + DEL); returns how many.
#[cfg(feature = "redis")]
pub(crate) async fn delete_namespace(url: &str, namespace: &str) -> Result<u64, BoxError> {
    let mut conn = redis_connection(url).await?;
    delete_matching(&mut conn, namespace, false).await
}
/// SCAN MATCH `{namespace}:*` and DEL what it finds, a batch at a time or `one_by_one`.
#[cfg(feature = "redis")]
async fn delete_matching(
    conn: &mut redis::aio::MultiplexedConnection,
    namespace: &str,
    one_by_one: bool,
) -> Result<u64, BoxError> {
    let pattern = format!("{namespace}:*");
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    loop {
        let (next, keys): (u64, Vec<String>) =
            redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(1000).query_async(conn).await?;
        if one_by_one {
            for key in &keys {
                let n: u64 = redis::cmd("DEL").arg(key).query_async(conn).await?;
                deleted += n;
            }
        } else if !keys.is_empty() {
            let n: u64 = redis::cmd("DEL").arg(&keys).query_async(conn).await?;
            deleted += n;
        }
        cursor = next;
        if cursor == 0 {
            return Ok(deleted);
        }
    }
}
