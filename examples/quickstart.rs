//! The demo app: a tiny document service behind `CachedAuthorizationLayer`.
//!
//! ```text
//! cargo run --example quickstart            # serves on 127.0.0.1:3000 (PORT to change)
//! ```
//!
//! Users are alice (admin), bob (viewer) and carol (editor); their tokens are `<name>-token`.
//! Changing a role through `PUT /admin/users/{user}/role` invalidates that user's cached
//! decisions, so the change shows on the very next request.
//!
//! Without services, roles live in memory and the cache is L1 only. With `REDIS_URL` set, the
//! cache adds L2 on Redis and the Redis backplane, and the roles live in Redis too (hash
//! `{namespace}-demo-roles`, seeded once), so several instances share them: a role change on
//! one instance shows on the very next request on every instance. `AUTHZ_CACHE_NAMESPACE`
//! (default `quickstart`) and `AUTHZ_CACHE_SECRET` (at least 16 bytes; a fixed demo secret
//! otherwise) configure the shared tier.
//!
//! With `DATABASE_URL` set, the demo applies the migrations (schema `DATABASE_SCHEMA`, default
//! `authz_cache`), keeps its users and roles in the reference RBAC tables there (seeded where
//! absent), answers from `mv_user_authorization_context` through `PostgresRbacAuthorizer`, and
//! adds L3. A role change through `PUT /admin/users/{user}/role` is an `UPDATE user_roles`: the
//! table's trigger notifies every instance (the change feed), and the handler also invalidates
//! directly so the change shows on the very next request. The same UPDATE made in psql reaches
//! every running instance through the trigger alone.

#[path = "common/demo.rs"]
pub(crate) mod demo;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use axum::body::Bytes;
use axum::extract::Request;
use axum::extract::{Extension, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router, ServiceExt as _};
use std::convert::Infallible;
use tower::{Service, ServiceBuilder};
#[cfg(any(feature = "redis", feature = "postgres"))]
use tower_authz_cache::Secret;
use tower_authz_cache::{
    Authorized, AuthzCache, BearerToken, CacheConfig, CachedAuthorizationLayer, Decision, Invalidation, Monitor,
    Permission, Principal,
};

use demo::{DEMO_USERS, Role, routes};

/// The role store: the authorizer's source of truth.
#[derive(Clone)]
pub enum Roles {
    /// In this process only.
    Memory(Arc<RwLock<HashMap<String, Role>>>),
    /// In a Redis hash, shared by every instance.
    #[cfg(feature = "redis")]
    Redis { conn: redis::aio::MultiplexedConnection, key: String },
    /// In a Redis hash on the cluster, shared by every instance.
    #[cfg(feature = "redis")]
    RedisCluster { conn: redis::cluster_async::ClusterConnection, key: String },
    /// In the reference RBAC tables (`user_roles`), shared by every instance.
    #[cfg(feature = "postgres")]
    Postgres { client: Arc<tokio_postgres::Client>, schema: String },
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[cfg(any(feature = "redis", feature = "postgres"))]
const STORE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

impl Roles {
    /// The demo users, in memory.
    pub fn demo() -> Self {
        Roles::Memory(Arc::new(RwLock::new(demo::demo_roles())))
    }

    /// The demo users in the Redis hash `key`, seeded where absent.
    #[cfg(feature = "redis")]
    pub async fn redis(url: &str, key: String) -> Result<Self, BoxError> {
        let client = redis::Client::open(url)?;
        let mut conn = tokio::time::timeout(STORE_TIMEOUT * 4, client.get_multiplexed_async_connection())
            .await
            .map_err(|_| format!("cannot reach redis at {url}"))??;
        for (user, role) in DEMO_USERS {
            let _: i64 = redis::cmd("HSETNX").arg(&key).arg(user).arg(role.name()).query_async(&mut conn).await?;
        }
        Ok(Roles::Redis { conn, key })
    }

    /// The demo users in the hash `key` on the Redis Cluster of `nodes`, seeded where absent.
    #[cfg(feature = "redis")]
    pub async fn redis_cluster(nodes: &[String], key: String) -> Result<Self, BoxError> {
        let client = redis::cluster::ClusterClient::new(nodes.to_vec())?;
        let mut conn = tokio::time::timeout(STORE_TIMEOUT * 4, client.get_async_connection())
            .await
            .map_err(|_| "cannot reach the redis cluster")??;
        for (user, role) in DEMO_USERS {
            let _: i64 = redis::cmd("HSETNX").arg(&key).arg(user).arg(role.name()).query_async(&mut conn).await?;
        }
        Ok(Roles::RedisCluster { conn, key })
    }

    /// The demo users in the reference RBAC tables of `schema` (already migrated), seeded where
    /// absent: the four roles and their permissions, and each user's starting role.
    #[cfg(feature = "postgres")]
    pub async fn postgres(url: &str, schema: &str) -> Result<Self, BoxError> {
        let (client, connection) = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            tokio_postgres::connect(url, tokio_postgres::NoTls),
        )
        .await
        .map_err(|_| format!("cannot reach postgres at {url}"))??;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                eprintln!("role store connection lost: {e}");
            }
        });
        let mut seed = format!(
            "BEGIN; SELECT pg_advisory_xact_lock(7305916249810745345); SET LOCAL search_path TO {schema};
             INSERT INTO roles VALUES ('viewer'), ('editor'), ('admin'), ('none') ON CONFLICT DO NOTHING;"
        );
        for role in [Role::Viewer, Role::Editor, Role::Admin] {
            for action in ["read", "write", "delete"] {
                if role.allows(&Permission::new("documents:1", action)) {
                    seed.push_str(&format!(
                        "INSERT INTO role_permissions VALUES ('{}', 'documents:*', '{action}') ON CONFLICT DO NOTHING;",
                        role.name()
                    ));
                }
            }
        }
        seed.push_str("INSERT INTO role_permissions VALUES ('admin', 'admin', 'manage') ON CONFLICT DO NOTHING;");
        for (user, role) in DEMO_USERS {
            seed.push_str(&format!(
                "INSERT INTO users VALUES ('{user}') ON CONFLICT DO NOTHING;
                 INSERT INTO user_roles SELECT '{user}', '{}' WHERE NOT EXISTS
                    (SELECT 1 FROM user_roles WHERE user_id = '{user}');",
                role.name()
            ));
        }
        seed.push_str("COMMIT;");
        client.batch_execute(&seed).await?;
        Ok(Roles::Postgres { client: Arc::new(client), schema: schema.to_owned() })
    }

    async fn get(&self, user: &str) -> Result<Option<Role>, BoxError> {
        match self {
            Roles::Memory(map) => Ok(map.read().unwrap_or_else(|e| e.into_inner()).get(user).copied()),
            #[cfg(feature = "redis")]
            Roles::Redis { conn, key } => redis_get(&mut conn.clone(), key, user).await,
            #[cfg(feature = "redis")]
            Roles::RedisCluster { conn, key } => redis_get(&mut conn.clone(), key, user).await,
            #[cfg(feature = "postgres")]
            Roles::Postgres { client, schema } => {
                let sql =
                    format!("SELECT role_id FROM {schema}.user_roles WHERE user_id = $1 ORDER BY role_id LIMIT 1");
                let row = tokio::time::timeout(STORE_TIMEOUT, client.query_opt(&sql, &[&user]))
                    .await
                    .map_err(|_| "role store timed out")??;
                Ok(row.and_then(|r| Role::parse(r.get::<_, &str>(0))))
            }
        }
    }

    async fn set(&self, user: &str, role: Role) -> Result<bool, BoxError> {
        match self {
            Roles::Memory(map) => {
                let mut map = map.write().unwrap_or_else(|e| e.into_inner());
                Ok(map.get_mut(user).map(|r| *r = role).is_some())
            }
            #[cfg(feature = "redis")]
            Roles::Redis { conn, key } => redis_set(&mut conn.clone(), key, user, role).await,
            #[cfg(feature = "redis")]
            Roles::RedisCluster { conn, key } => redis_set(&mut conn.clone(), key, user, role).await,
            #[cfg(feature = "postgres")]
            Roles::Postgres { client, schema } => {
                // Through the table, as an administrator would in psql: its trigger refreshes the
                // grants view and notifies every instance.
                let sql = format!("UPDATE {schema}.user_roles SET role_id = $2 WHERE user_id = $1");
                let name = role.name();
                let n = tokio::time::timeout(STORE_TIMEOUT, client.execute(&sql, &[&user, &name]))
                    .await
                    .map_err(|_| "role store timed out")??;
                Ok(n > 0)
            }
        }
    }
}

#[derive(Clone)]
struct AppState {
    roles: Roles,
    cache: AuthzCache,
}

/// The demo app: the router behind the authorization layer.
pub trait App:
    Service<Request, Response = Response, Error = Infallible, Future: Send> + Clone + Send + Sync + 'static
{
}

impl<S> App for S where
    S: Service<Request, Response = Response, Error = Infallible, Future: Send> + Clone + Send + Sync + 'static
{
}

/// Builds the demo app over `roles`, L1 only. Returns the app and its cache.
pub fn app(roles: Roles) -> (impl App, AuthzCache) {
    let cache = AuthzCache::builder(authorizer(roles.clone())).build();
    (app_from(roles, cache.clone()), cache)
}

/// The demo's authorizer: the role store is the source of truth.
pub fn authorizer(roles: Roles) -> impl tower_authz_cache::Authorizer {
    move |principal: Principal, permission: Permission| {
        let store = roles.clone();
        async move {
            // A store that cannot be read is an error: the request gets 503, never a guess.
            let role = store.get(principal.id()).await?.unwrap_or(Role::None);
            Ok::<_, BoxError>(role.decide(&permission))
        }
    }
}

/// Builds the demo app over `roles` and a cache built on [`authorizer`].
pub fn app_from(roles: Roles, cache: AuthzCache) -> impl App {
    // A real app resolves tokens against its session store; the demo's is a fixed map.
    let sessions = Arc::new(demo::sessions());
    let tokens = BearerToken::new(move |token: String| {
        let principal = sessions.get(token.as_str()).cloned();
        async move { Ok::<_, Infallible>(principal) }
    })
    .with_realm("quickstart");

    // The layer wraps the whole router, so every request is authorized once, before routing:
    // a path no rule covers gets 403 from the route table (which says nothing about which paths
    // exist), and no per-route copy of the middleware is cloned for each request.
    // `Router::layer(...)` works too.
    ServiceBuilder::new()
        .layer(CachedAuthorizationLayer::new(cache.clone(), tokens, routes()))
        .service(handlers(AppState { roles, cache }))
}

/// The same handlers with no authorization at all: only for measuring what the layer costs
/// (`examples/overhead.rs`). Never serve this.
pub fn unprotected_app(roles: Roles) -> Router {
    let cache = AuthzCache::builder(|_: Principal, _: Permission| async {
        Ok::<_, std::convert::Infallible>(Decision::deny())
    })
    .build();
    handlers(AppState { roles, cache })
}

fn handlers(state: AppState) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/ready", get(ready))
        .route("/documents/{id}", get(read_document).put(write_document).delete(delete_document))
        .route("/admin/users/{user}/role", put(set_role))
        .route("/admin/invalidate", post(invalidate))
        .route("/admin/stats", get(stats))
        .with_state(state)
}

async fn read_document(Path(id): Path<String>) -> Json<serde_json::Value> {
    Json(demo::document(&id))
}

async fn write_document(Path(_id): Path<String>) -> StatusCode {
    StatusCode::NO_CONTENT
}

async fn delete_document(Path(_id): Path<String>) -> StatusCode {
    StatusCode::NO_CONTENT
}

fn problem(status: StatusCode, detail: &str) -> Response {
    demo::problem(status, detail).into_response()
}

async fn set_role(
    State(state): State<AppState>,
    Extension(admin): Extension<Authorized>,
    Path(user): Path<String>,
    body: Bytes,
) -> Response {
    let role = match demo::parse_role(&body) {
        Ok(role) => role,
        Err(detail) => return problem(StatusCode::BAD_REQUEST, detail),
    };
    match state.roles.set(&user, role).await {
        Ok(true) => {}
        Ok(false) => return problem(StatusCode::NOT_FOUND, "unknown user"),
        Err(_) => return problem(StatusCode::SERVICE_UNAVAILABLE, "role store unavailable"),
    }
    // The store changed first, then the cache forgets: the next request asks the store again.
    // The answer carries the invalidation's consistency token: a request that sends it back
    // (header `authz-consistency`), to any instance, sees the change.
    match state.cache.invalidate_as(&Invalidation::principal(user), admin.principal()).await {
        Ok(token) => with_token(token),
        Err(_) => problem(StatusCode::SERVICE_UNAVAILABLE, "role changed, but the invalidation was not delivered"),
    }
}

/// 204 with the invalidation's consistency token in the `authz-consistency` header.
fn with_token(token: tower_authz_cache::ConsistencyToken) -> Response {
    ([(tower_authz_cache::consistency::DEFAULT_HEADER, token.to_string())], StatusCode::NO_CONTENT).into_response()
}

async fn invalidate(State(state): State<AppState>, Extension(admin): Extension<Authorized>, body: Bytes) -> Response {
    let invalidation = match demo::parse_invalidation(&body) {
        Ok(invalidation) => invalidation,
        Err(detail) => return problem(StatusCode::BAD_REQUEST, detail),
    };
    match state.cache.invalidate_as(&invalidation, admin.principal()).await {
        Ok(token) => with_token(token),
        Err(_) => problem(StatusCode::SERVICE_UNAVAILABLE, "invalidation not delivered"),
    }
}

async fn stats(State(state): State<AppState>) -> Json<tower_authz_cache::StatsSnapshot> {
    Json(state.cache.stats())
}

/// Readiness: 503 when the cache can decide nothing (its authorizer is down).
async fn ready(State(state): State<AppState>) -> Response {
    let health = state.cache.health();
    let status = if health.is_ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(health)).into_response()
}

/// With the `metrics` feature, the Prometheus recorder `run` installed; without it, the crate's
/// own rendering of the same families.
#[cfg(feature = "metrics")]
static PROMETHEUS: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> = std::sync::OnceLock::new();

async fn metrics(State(state): State<AppState>) -> Response {
    #[cfg(feature = "metrics")]
    let text = match PROMETHEUS.get() {
        Some(handle) => {
            state.cache.export_metrics();
            handle.render()
        }
        None => state.cache.stats().to_prometheus(),
    };
    #[cfg(not(feature = "metrics"))]
    let text = state.cache.stats().to_prometheus();
    let mut res = text.into_response();
    res.headers_mut().insert(header::CONTENT_TYPE, demo::PROMETHEUS_TEXT);
    res
}

/// The demo's fixed secret, used only when AUTHZ_CACHE_SECRET is unset outside production, so that
/// several demo instances share L2.
#[cfg_attr(not(any(feature = "redis", feature = "postgres")), allow(dead_code))]
const DEMO_SECRET: &str = "quickstart demo secret, not for production";

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

/// A user's role in the Redis hash `key` (one Redis or a cluster).
#[cfg(feature = "redis")]
async fn redis_get(
    conn: &mut impl redis::aio::ConnectionLike,
    key: &str,
    user: &str,
) -> Result<Option<Role>, BoxError> {
    let mut cmd = redis::cmd("HGET");
    let q = cmd.arg(key).arg(user).query_async::<Option<String>>(conn);
    let name = tokio::time::timeout(STORE_TIMEOUT, q).await.map_err(|_| "role store timed out")??;
    Ok(name.as_deref().and_then(Role::parse))
}

/// Sets an existing user's role in the Redis hash `key`; whether the user exists.
#[cfg(feature = "redis")]
async fn redis_set(
    conn: &mut impl redis::aio::ConnectionLike,
    key: &str,
    user: &str,
    role: Role,
) -> Result<bool, BoxError> {
    let mut cmd = redis::cmd("HEXISTS");
    let exists = cmd.arg(key).arg(user).query_async::<bool>(&mut *conn);
    if !tokio::time::timeout(STORE_TIMEOUT, exists).await.map_err(|_| "role store timed out")?? {
        return Ok(false);
    }
    let mut cmd = redis::cmd("HSET");
    let set = cmd.arg(key).arg(user).arg(role.name()).query_async::<i64>(conn);
    tokio::time::timeout(STORE_TIMEOUT, set).await.map_err(|_| "role store timed out")??;
    Ok(true)
}

async fn run() -> Result<(), String> {
    let port = demo::port()?;
    // Every setting comes from the environment (AUTHZ_CACHE_MODE, L1_CACHE_SIZE_MB, REDIS_URL, ...);
    // a bad value stops the demo here with one line naming the variable.
    let mut config = CacheConfig::from_env().map_err(|e| e.to_string())?;
    if std::env::var_os("AUTHZ_CACHE_NAMESPACE").is_none() {
        config = config.with_redis_namespace("quickstart");
    }
    let roles = match config.redis_url().map(str::to_owned) {
        #[cfg(feature = "redis")]
        Some(url) => {
            if config.secret().is_none() {
                println!("note: AUTHZ_CACHE_SECRET is not set; using the demo's fixed secret (never in production)");
                config = config.with_secret(Some(Secret::new(DEMO_SECRET)));
            }
            let key = format!("{}-demo-roles", config.redis_namespace());
            let roles = Roles::redis(&url, key.clone()).await.map_err(|e| format!("REDIS_URL: {e}"))?;
            println!(
                "tiers: L1 (in-process memory, {} MiB), L2 (redis {}, namespace {}), redis backplane",
                config.l1_max_bytes() >> 20,
                url,
                config.redis_namespace()
            );
            println!("roles: in redis hash {key} (shared by every instance)");
            roles
        }
        #[cfg(feature = "redis")]
        None if config.redis_cluster_nodes().is_some() => {
            if config.secret().is_none() {
                println!("note: AUTHZ_CACHE_SECRET is not set; using the demo's fixed secret (never in production)");
                config = config.with_secret(Some(Secret::new(DEMO_SECRET)));
            }
            let nodes = config.redis_cluster_nodes().unwrap_or_default().to_vec();
            let key = format!("{}-demo-roles", config.redis_namespace());
            let roles =
                Roles::redis_cluster(&nodes, key.clone()).await.map_err(|e| format!("REDIS_CLUSTER_NODES: {e}"))?;
            println!(
                "tiers: L1 (in-process memory, {} MiB), L2 (redis cluster {}, namespace {}), redis cluster backplane",
                config.l1_max_bytes() >> 20,
                config.redis_cluster_nodes_redacted().unwrap_or_default(),
                config.redis_namespace()
            );
            println!("roles: in redis hash {key} on the cluster (shared by every instance)");
            roles
        }
        _ => {
            println!("tiers: L1 (in-process memory, {} MiB)", config.l1_max_bytes() >> 20);
            Roles::demo()
        }
    };
    #[cfg(feature = "postgres")]
    let (roles, rbac) = match config.database_url().map(str::to_owned) {
        Some(url) => {
            if config.secret().is_none() {
                println!("note: AUTHZ_CACHE_SECRET is not set; using the demo's fixed secret (never in production)");
                config = config.with_secret(Some(Secret::new(DEMO_SECRET)));
            }
            let tier = config.postgres_tier().map_err(|e| e.to_string())?.ok_or("DATABASE_URL: no tier")?;
            tier.migrate_with_reference_rbac().await.map_err(|e| format!("DATABASE_URL: {e}"))?;
            let schema = config.database_schema().to_owned();
            let roles = Roles::postgres(&url, &schema).await.map_err(|e| format!("DATABASE_URL: {e}"))?;
            let rbac = tower_authz_cache::PostgresRbacAuthorizer::new(&url, &schema).map_err(|e| e.to_string())?;
            println!(
                "tiers: + L3 (postgres {}, schema {schema}, migrations applied), postgres change feed{}",
                config.database_url_redacted().unwrap_or_default(),
                if config.uses_redis() { "" } else { " and backplane" }
            );
            println!(
                "roles: in postgres tables {schema}.user_roles (shared by every instance), answered from the view"
            );
            (roles, Some(rbac))
        }
        None => (roles, None),
    };
    #[cfg(not(feature = "postgres"))]
    if config.database_url().is_some() {
        return Err("DATABASE_URL is set, but this build lacks the `postgres` feature".to_owned());
    }
    println!("mode: {}", config.mode());
    #[cfg(feature = "metrics")]
    match metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder() {
        Ok(handle) => {
            let _ = PROMETHEUS.set(handle);
            println!("metrics: through the `metrics` facade (Prometheus exporter) at /metrics");
        }
        Err(e) => println!("note: no metrics recorder ({e}); /metrics renders the cache's own counters"),
    }
    #[cfg(feature = "postgres")]
    let builder = match rbac {
        Some(rbac) => AuthzCache::builder(rbac),
        None => AuthzCache::builder(authorizer(roles.clone())),
    };
    #[cfg(not(feature = "postgres"))]
    let builder = AuthzCache::builder(authorizer(roles.clone()));
    let cache = config.apply(builder).map_err(|e| e.to_string())?.build();
    // Serve once the backplane and the Postgres listener are up (their first subscription drops
    // L1); if a store is down, serve anyway: L1 is not read until the backplane is heard.
    if tokio::time::timeout(std::time::Duration::from_secs(5), cache.ready()).await.is_err() {
        println!("note: the invalidation backplane is not up yet; serving, L1 unused until it is");
    }
    // Hit rate and latency against CACHE_HIT_RATE_TARGET / AUTHORIZATION_RESPONSE_TIME_TARGET every
    // CACHE_MONITORING_INTERVAL; alerts are `warn!` events on target authz_cache::monitor.
    let _monitor = Monitor::builder(cache.clone()).from_config(&config).build().spawn();
    let app = app_from(roles, cache);

    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let base = format!("http://{addr}");
    demo::print_try(&base);
    axum::serve(listener, app.into_make_service())
        .with_graceful_shutdown(demo::shutdown_signal())
        .await
        .map_err(|e| format!("server error: {e}"))
}
