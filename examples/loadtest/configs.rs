//! The configurations: the in-process apps (bare, l1, no-cache, l1+l2, l1+l2-cluster, no-cache-pg, l1+l2+l3), the
//! self-test server, and the targets the driver is pointed at.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tower_authz_cache::{AuthzCache, Decision, Permission, Principal};

use crate::backends::Backends;
#[cfg(feature = "postgres")]
use crate::backends::pg_client;
use crate::client::find;
use crate::driver::Target;
use crate::workload::{Tokens, is_editor};
use crate::{BoxError, quickstart};

pub(crate) fn local_target(name: &str, addr: SocketAddr, authorizes: bool, cached: bool) -> Arc<Target> {
    Arc::new(Target {
        name: name.to_owned(),
        addr,
        host: addr.to_string(),
        stats: authorizes,
        local: true,
        tokens: Tokens::Population,
        authorizes,
        cached,
        fleet: None,
    })
}
/// The quickstart's route table (the demo's, in `examples/common/demo.rs`).
pub(crate) fn routes() -> tower_authz_cache::RouteTable {
    crate::quickstart::demo::routes()
}
/// The quickstart's handlers, with `GET /admin/stats` answering `cache`'s counters.
pub(crate) fn handlers(cache: AuthzCache) -> axum::Router {
    axum::Router::new()
        .route(
            "/admin/stats",
            axum::routing::get(move || {
                let stats = cache.stats();
                async move { axum::Json(stats) }
            }),
        )
        .fallback_service(quickstart::unprotected_app(quickstart::Roles::demo()))
}
/// The handlers alone: the same router as every other configuration, without the layer.
pub(crate) fn bare_app() -> axum::Router {
    let idle = AuthzCache::builder(|_: Principal, _: Permission| async {
        Ok::<_, std::convert::Infallible>(Decision::deny())
    })
    .build();
    handlers(idle)
}
/// The population's bearer tokens: `user-<n>` (n in 1..=population, canonical) is principal
/// `user-<n>`; `alice-token` is alice.
pub(crate) fn principal_of(token: &str, population: u32) -> Option<Principal> {
    if token == "alice-token" {
        return Some(Principal::new("alice"));
    }
    let digits = token.strip_prefix("user-")?;
    if digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u32 = digits.parse().ok()?;
    (1..=population).contains(&n).then(|| Principal::new(token))
}
/// The handlers behind the layer, as the quickstart wires them, resolving the population's tokens.
pub(crate) fn population_app(cache: AuthzCache, population: u32) -> impl quickstart::App {
    let tokens = tower_authz_cache::BearerToken::new(move |token: String| {
        let principal = principal_of(&token, population);
        async move { Ok::<_, std::convert::Infallible>(principal) }
    })
    .with_realm("loadtest");
    tower::ServiceBuilder::new()
        .layer(tower_authz_cache::CachedAuthorizationLayer::new(cache.clone(), tokens, routes()))
        .service(handlers(cache))
}
/// The roles in memory (what the Postgres configurations seed into the RBAC tables): alice is
/// an admin, `user-<n>` an editor when n % 10 == 0 and a viewer otherwise.
pub(crate) fn memory_authorizer() -> impl tower_authz_cache::Authorizer {
    |principal: Principal, permission: Permission| async move {
        let (resource, action) = (permission.resource(), permission.action());
        let documents = resource.starts_with("documents:");
        let allowed = match principal.id() {
            "alice" => {
                (documents && matches!(action, "read" | "write" | "delete"))
                    || (resource, action) == ("admin", "manage")
            }
            id => match id.strip_prefix("user-").and_then(|n| n.parse::<u32>().ok()) {
                Some(n) => documents && (action == "read" || (action == "write" && is_editor(n))),
                None => false,
            },
        };
        Ok::<_, std::convert::Infallible>(if allowed {
            Decision::allow()
        } else {
            Decision::deny().with_reason(format!("no role grants {action} on {resource}"))
        })
    }
}
/// Before the clock starts: waits (at most 5 s) until every subscription is up
/// (`AuthzCache::ready`): each new subscription drops whatever L1 holds, so one landing mid-run
/// would turn hits into misses. Then checks a few keys no request uses, so that the pools
/// (authorizer, Redis, Postgres) are connected.
pub(crate) async fn warm_up(cache: &AuthzCache) {
    let _ = tokio::time::timeout(Duration::from_secs(5), cache.ready()).await;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..16 {
        let cache = cache.clone();
        set.spawn(async move {
            let principal = Principal::new(format!("warm-up-{i}"));
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                cache.check(&principal, &Permission::new("documents:0", "read")),
            )
            .await;
        });
    }
    while set.join_next().await.is_some() {}
}
/// The configuration's secret for L2/L3: one per configuration, so that no configuration can
/// read another's entries.
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) fn secret(n: usize) -> String {
    format!("loadtest {} configuration {n}: not a production secret", std::process::id())
}
pub(crate) fn cache_builder<A: tower_authz_cache::Authorizer>(
    authorizer: A,
    b: &Backends,
) -> tower_authz_cache::AuthzCacheBuilder {
    AuthzCache::builder(authorizer).allow_ttl(b.allow_ttl).deny_ttl(b.deny_ttl)
}
/// Starts configuration `name` (the `n`th of the run) on 127.0.0.1, on the current runtime
/// (the configuration's own server runtime). Returns its target and what it is.
pub(crate) async fn start_app(name: &str, n: usize, b: &Backends) -> Result<(Arc<Target>, String), BoxError> {
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let addr = listener.local_addr()?;
    let memory = "in-memory roles";
    let (cache, about) = match name {
        "bare" => (None, "the handlers alone, no authorization".to_owned()),
        "l1" => (Some(cache_builder(memory_authorizer(), b).build()), format!("L1; {memory}")),
        "no-cache" => (
            Some(cache_builder(memory_authorizer(), b).l1_max_bytes(0).build()),
            format!("no cache (L1 disabled); {memory}"),
        ),
        #[cfg(feature = "redis")]
        "l1+l2" => {
            let tier = redis_tier(b)?;
            (
                Some(cache_builder(memory_authorizer(), b).secret(secret(n)).l2(tier).build()),
                format!("L1 + L2 (redis); {memory}"),
            )
        }
        #[cfg(feature = "redis")]
        "l1+l2-cluster" => {
            let tier = redis_cluster_tier(b)?;
            (
                Some(cache_builder(memory_authorizer(), b).secret(secret(n)).l2(tier).build()),
                format!("L1 + L2 (redis cluster); {memory}"),
            )
        }
        #[cfg(feature = "postgres")]
        "no-cache-pg" => {
            let (schema, _) = pg_schema(b, n).await?;
            let url = b.database_url.as_deref().unwrap_or_default();
            let rbac = tower_authz_cache::PostgresRbacAuthorizer::new(url, &schema)?;
            let cache = cache_builder(rbac, b).l1_max_bytes(0).build();
            (Some(cache), format!("no cache (L1 disabled); PostgresRbacAuthorizer, schema {schema}"))
        }
        #[cfg(all(feature = "redis", feature = "postgres"))]
        "l1+l2+l3" => {
            let l2 = redis_tier(b)?;
            let (schema, l3) = pg_schema(b, n).await?;
            let url = b.database_url.as_deref().unwrap_or_default();
            let rbac = tower_authz_cache::PostgresRbacAuthorizer::new(url, &schema)?;
            let cache = cache_builder(rbac, b).secret(secret(n)).l2(l2).l3(l3).build();
            (Some(cache), format!("L1 + L2 (redis) + L3 (postgres, schema {schema}); PostgresRbacAuthorizer"))
        }
        other => {
            return Err(
                format!("configuration {other:?} is not available in this build (features redis, postgres)").into()
            );
        }
    };
    let target = match cache {
        None => {
            let app = bare_app();
            tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
            local_target(name, addr, false, false)
        }
        Some(cache) => {
            warm_up(&cache).await;
            let app = population_app(cache, b.population);
            tokio::spawn(async move {
                let _ = axum::serve(listener, axum::ServiceExt::into_make_service(app)).await;
            });
            local_target(name, addr, true, !name.starts_with("no-cache"))
        }
    };
    Ok((target, about))
}
#[cfg(feature = "redis")]
pub(crate) fn redis_tier(b: &Backends) -> Result<tower_authz_cache::RedisTier, BoxError> {
    let (Some(url), Some((_, namespace))) = (&b.redis_url, &b.leftovers.redis) else {
        return Err("this configuration needs --redis-url".into());
    };
    b.leftovers.redis_used.store(true, Relaxed);
    Ok(tower_authz_cache::RedisTier::builder(url)
        .namespace(namespace)
        .build()
        .map_err(|e| format!("--redis-url: {e}"))?)
}
#[cfg(feature = "redis")]
pub(crate) fn redis_cluster_tier(b: &Backends) -> Result<tower_authz_cache::RedisClusterTier, BoxError> {
    let (Some(nodes), Some((_, namespace))) = (&b.redis_cluster_nodes, &b.leftovers.redis_cluster) else {
        return Err("this configuration needs --redis-cluster-nodes".into());
    };
    b.leftovers.redis_cluster_used.store(true, Relaxed);
    Ok(tower_authz_cache::RedisClusterTier::builder(nodes.iter().cloned())
        .namespace(namespace)
        .build()
        .map_err(|e| format!("--redis-cluster-nodes: {e}"))?)
}
/// Creates, migrates and seeds this configuration's schema, `loadtest_<pid>_<n>`; returns it
/// and an L3 tier on it.
#[cfg(feature = "postgres")]
pub(crate) async fn pg_schema(b: &Backends, n: usize) -> Result<(String, tower_authz_cache::PostgresTier), BoxError> {
    let Some(url) = &b.database_url else { return Err("this configuration needs --database-url".into()) };
    let schema = format!("loadtest_{}_{n}", std::process::id());
    // Registered before it exists: whatever happens next, it is dropped at the end.
    b.leftovers.add_schema(&schema);
    let started = Instant::now();
    let tier = tower_authz_cache::PostgresTier::builder(url)
        .schema(&schema)
        .build()
        .map_err(|e| format!("--database-url: {e}"))?;
    tokio::time::timeout(Duration::from_secs(60), tier.migrate_with_reference_rbac())
        .await
        .map_err(|_| "--database-url: migrating timed out")?
        .map_err(|e| format!("--database-url: {e}"))?;
    let client = pg_client(url).await?;
    let p = b.population;
    // In bulk: one statement per table. The row triggers (one notification per user) and the
    // per-statement view refresh are off while the users go in; the views are refreshed once.
    let seed = format!(
        "BEGIN;
         SET LOCAL search_path TO {schema};
         INSERT INTO roles VALUES ('viewer'), ('editor'), ('admin');
         INSERT INTO role_permissions VALUES
            ('viewer', 'documents:*', 'read'),
            ('editor', 'documents:*', 'read'), ('editor', 'documents:*', 'write'),
            ('admin', 'documents:*', 'read'), ('admin', 'documents:*', 'write'), ('admin', 'documents:*', 'delete'),
            ('admin', 'admin', 'manage');
         ALTER TABLE user_roles DISABLE TRIGGER USER;
         INSERT INTO users SELECT 'user-' || g FROM generate_series(1, {p}) g;
         INSERT INTO users VALUES ('alice');
         INSERT INTO user_roles
            SELECT 'user-' || g, CASE WHEN g % 10 = 0 THEN 'editor' ELSE 'viewer' END FROM generate_series(1, {p}) g;
         INSERT INTO user_roles VALUES ('alice', 'admin');
         ALTER TABLE user_roles ENABLE TRIGGER USER;
         REFRESH MATERIALIZED VIEW mv_user_authorization_context;
         REFRESH MATERIALIZED VIEW mv_team_collaboration_patterns;
         COMMIT;
         ANALYZE {schema}.users, {schema}.user_roles, {schema}.role_permissions, {schema}.mv_user_authorization_context;"
    );
    tokio::time::timeout(Duration::from_secs(120), client.batch_execute(&seed))
        .await
        .map_err(|_| "--database-url: seeding timed out")?
        .map_err(|e| format!("--database-url: seeding {schema}: {e}"))?;
    eprintln!(
        "[postgres] schema {schema}: migrated and seeded with {p} users in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok((schema, tier))
}
/// The self-test's server: answers every request with a fixed 200 "ok".
pub(crate) async fn trivial_server(listener: TcpListener) {
    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(4096);
            let mut out = Vec::with_capacity(256);
            loop {
                buf.reserve(4096);
                match s.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                // The generator's requests have no body (PUT says Content-Length: 0).
                let mut start = 0;
                out.clear();
                while let Some(p) = find(&buf[start..], b"\r\n\r\n") {
                    start += p + 4;
                    out.extend_from_slice(OK);
                }
                buf.drain(..start);
                if !out.is_empty() && s.write_all(&out).await.is_err() {
                    return;
                }
            }
        });
    }
}
pub(crate) fn parse_target(url: &str) -> Result<Arc<Target>, BoxError> {
    let rest = url.strip_prefix("http://").ok_or_else(|| format!("--target {url:?}: expected http://host:port"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let with_port = if authority.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let addr =
        with_port.to_socket_addrs()?.next().ok_or_else(|| format!("--target {url:?}: {authority} does not resolve"))?;
    Ok(Arc::new(Target {
        name: "target".into(),
        addr,
        host: authority.to_owned(),
        stats: true,
        local: false,
        tokens: Tokens::Demo,
        authorizes: true,
        cached: true,
        fleet: None,
    }))
}
