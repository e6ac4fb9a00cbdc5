//! The shared PostgreSQL for tests: its URL and address, and a schema per test, migrated by the
//! library and dropped afterwards.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio_postgres::{Client, NoTls};

pub fn url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// `url()` with its host and port replaced by `addr` (e.g. a fault proxy's).
pub fn url_via(addr: SocketAddr) -> String {
    let url = url();
    let (scheme, rest) = url.split_once("://").expect("DATABASE_URL has a scheme");
    let (userinfo, hostpart) = match rest.split_once('@') {
        Some((u, h)) => (format!("{u}@"), h),
        None => (String::new(), rest),
    };
    let path = hostpart.split_once('/').map(|(_, p)| format!("/{p}")).unwrap_or_default();
    format!("{scheme}://{userinfo}{addr}{path}")
}

/// The server's address (`host:port` of DATABASE_URL, which must be an IP).
pub fn addr() -> SocketAddr {
    let url = url();
    let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
    let hostpart = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let hostport = hostpart.split('/').next().unwrap_or("127.0.0.1:5432");
    let hostport = if hostport.contains(':') { hostport.to_owned() } else { format!("{hostport}:5432") };
    hostport.parse().unwrap_or_else(|_| panic!("DATABASE_URL={url}: expected postgres://user@IP:PORT/db"))
}

/// A client; fails the test, saying how to start PostgreSQL, when unreachable.
pub async fn client() -> Client {
    let url = url();
    let (client, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap_or_else(|e| {
        panic!(
            "PostgreSQL is not reachable at {url} ({e}). Start it with `pg_ctlcluster --skip-systemctl-redirect \
             $(ls /etc/postgresql) main start` (or run `bash .ci/run`, which starts it), or point DATABASE_URL at one."
        )
    });
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A schema of this test's own; dropped (with everything in it) on drop.
pub struct Schema(pub String);

impl Schema {
    pub fn new(test: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() % 1_000_000_000;
        Self(format!("t_{test}_{}_{nanos}_{}", std::process::id() % 100_000, N.fetch_add(1, Ordering::Relaxed)))
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let (url, schema) = (url(), self.0.clone());
        // Drop may run inside a runtime: do it on a thread of its own, with its own runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                // Background writers of caches dropped just before may still be finishing.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                if let Ok((client, connection)) = tokio_postgres::connect(&url, NoTls).await {
                    tokio::spawn(connection);
                    let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).await;
                }
            })
        })
        .join();
    }
}

/// The demo's roles and users in the reference RBAC schema: viewer, editor, admin, none; alice
/// admin, bob viewer, carol editor; bob and carol share team `docs`.
pub async fn seed_rbac(db: &Client, schema: &str) {
    db.batch_execute(&format!(
        "SET search_path TO {schema};
         INSERT INTO roles VALUES ('viewer'), ('editor'), ('admin'), ('none');
         INSERT INTO role_permissions VALUES
            ('viewer', 'documents:*', 'read'),
            ('editor', 'documents:*', 'read'), ('editor', 'documents:*', 'write'),
            ('admin', 'documents:*', 'read'), ('admin', 'documents:*', 'write'), ('admin', 'documents:*', 'delete'),
            ('admin', 'admin', 'manage');
         INSERT INTO users VALUES ('alice'), ('bob'), ('carol');
         INSERT INTO user_roles VALUES ('alice', 'admin'), ('bob', 'viewer'), ('carol', 'editor');
         INSERT INTO teams VALUES ('docs');
         INSERT INTO team_members VALUES ('docs', 'bob'), ('docs', 'carol');
         SET search_path TO public;"
    ))
    .await
    .unwrap();
}
