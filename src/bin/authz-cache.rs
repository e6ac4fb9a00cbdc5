//! `authz-cache`: initialise and check the system, and operate a running cache.
//!
//! ```text
//! authz-cache init [--mode development|testing|production]   check config, Redis, Postgres;
//!                                                             apply the L3 migrations; report
//! authz-cache health [--url http://127.0.0.1:3000]            GET /ready of a running app
//! authz-cache stats  [--url ...] [--token TOKEN]              GET /admin/stats of a running app
//! authz-cache invalidate --principal ID | --resource ID | --all   through Redis and/or Postgres
//! authz-cache warm [--limit N] [--json]                       check the N most-hit L3 rows
//! ```
//!
//! Configuration comes from the environment, as for the library (`CacheConfig::from_env`):
//! `REDIS_URL`, `DATABASE_URL`, `DATABASE_SCHEMA`, `AUTHZ_CACHE_SECRET`, `AUTHZ_CACHE_NAMESPACE`, ...
//! Exit codes: 0 success, 1 a check or an operation failed, 2 usage or configuration error.
//!
//! `warm` loads the most-hit valid L3 rows into the L1 of this process, exactly as an instance
//! warms at start-up; the process then exits and its L1 with it, so what `warm` shows is that
//! the rows are valid and readable with this secret (running instances warm themselves:
//! `PostgresTierBuilder::warm_on_start`).

use std::collections::HashSet;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower_authz_cache::{
    AuthzCache, AuthzCacheBuilder, BoxError, CacheConfig, Decision, Invalidation, Mode, Permission, PostgresTier,
    Principal, WarmReport,
};

const USAGE: &str = "usage: authz-cache <init|health|stats|invalidate|warm> [options]
  init [--mode development|testing|production] [--cache-only]
      check the configuration, Redis and Postgres; apply the L3 migrations (DATABASE_SCHEMA):
      the cache's own and the reference RBAC schema, or with --cache-only the cache's alone
  health [--url URL]
  stats [--url URL] [--token TOKEN]
  invalidate (--principal ID | --resource ID | --all)
  warm [--limit N] [--json]
      load the N (default 1000) most-hit valid L3 rows into this process's L1, as an instance
      does at start-up; this process then exits, so it only checks that the rows are valid and
      readable (needs DATABASE_URL and AUTHZ_CACHE_SECRET)";

const CHECK_TIMEOUT: Duration = Duration::from_secs(3);
/// Migrations wait for the advisory lock of other instances migrating the same schema.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(30);
/// One Postgres call of this tool (not latency-sensitive: the library's default is 100 ms).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const WARM_LIMIT: usize = 1000;
const WARM_NOTE: &str = "this process exits now and its L1 with it: warming here only checks that the rows are \
                         valid and readable; running instances warm their own L1 at start-up";

/// A usage or configuration error (exit 2), or a failed check/operation (exit 1).
enum Failure {
    Usage(String),
    Failed(String),
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(e)) => {
            eprintln!("error: {e}\n{USAGE}");
            ExitCode::from(2)
        }
        Err(Failure::Failed(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// `--name value` options after the subcommand; flags (no value) map to "".
fn options(args: &[String], allowed: &[&str], flags: &[&str]) -> Result<Vec<(String, String)>, Failure> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let name = a.strip_prefix("--").ok_or_else(|| Failure::Usage(format!("unexpected argument {a:?}")))?;
        if flags.contains(&name) {
            out.push((name.to_owned(), String::new()));
        } else if allowed.contains(&name) {
            let v = it.next().ok_or_else(|| Failure::Usage(format!("--{name} needs a value")))?;
            out.push((name.to_owned(), v.clone()));
        } else {
            return Err(Failure::Usage(format!("unknown option --{name}")));
        }
    }
    Ok(out)
}

fn option<'a>(opts: &'a [(String, String)], name: &str) -> Option<&'a str> {
    opts.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

async fn run(args: &[String]) -> Result<(), Failure> {
    let Some((command, rest)) = args.split_first() else {
        return Err(Failure::Usage("no command".into()));
    };
    match command.as_str() {
        "init" => init(&options(rest, &["mode"], &["cache-only"])?).await,
        "health" => {
            let opts = options(rest, &["url"], &[])?;
            let (status, body) =
                http_get(option(&opts, "url").unwrap_or("http://127.0.0.1:3000"), "/ready", None).await?;
            println!("{body}");
            if status == 200 { Ok(()) } else { Err(Failure::Failed(format!("not ready (HTTP {status})"))) }
        }
        "stats" => {
            let opts = options(rest, &["url", "token"], &[])?;
            let url = option(&opts, "url").unwrap_or("http://127.0.0.1:3000");
            let (status, body) = http_get(url, "/admin/stats", option(&opts, "token")).await?;
            println!("{body}");
            if status == 200 { Ok(()) } else { Err(Failure::Failed(format!("HTTP {status} from {url}/admin/stats"))) }
        }
        "invalidate" => invalidate(&options(rest, &["principal", "resource"], &["all"])?).await,
        "warm" => warm(&options(rest, &["limit"], &["json"])?).await,
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(Failure::Usage(format!("unknown command {other:?}"))),
    }
}

async fn init(opts: &[(String, String)]) -> Result<(), Failure> {
    let mode = match option(opts, "mode") {
        Some(m) => Some(m.parse::<Mode>().map_err(|e| Failure::Usage(e.to_string()))?),
        None => None,
    };
    let config = CacheConfig::from_lookup(|var| match (var, mode) {
        ("AUTHZ_CACHE_MODE", Some(m)) => Some(m.to_string()),
        _ => std::env::var(var).ok(),
    })
    .map_err(|e| Failure::Usage(e.to_string()))?;
    println!("authz-cache init --mode {}", config.mode());
    println!(
        "  config     ok    mode {}, L1 {} MiB, allow ttl {:?}, deny ttl {:?}, max staleness {:?}",
        config.mode(),
        config.l1_max_bytes() >> 20,
        config.allow_ttl(),
        config.deny_ttl(),
        config.max_staleness()
    );
    // (what failed, why) for the result line and the error.
    let mut failed: Vec<(&str, String)> = Vec::new();
    let shown = config.redis_url_redacted().unwrap_or_default();
    if let Some(nodes) = config.redis_cluster_nodes() {
        let shown = config.redis_cluster_nodes_redacted().unwrap_or_default();
        match redis_cluster_check(&config, nodes).await {
            Ok(report) => println!(
                "  redis      ok    cluster {shown}: cluster_state:ok, {} masters, {} replicas, all {} slots covered, namespace {}",
                report.masters,
                report.replicas,
                report.slots_covered,
                config.redis_namespace()
            ),
            Err(e) => {
                let e = one_line(&e.to_string());
                println!("  redis      FAIL  cluster {shown}: {e}");
                failed.push(("redis", format!("redis cluster at {shown}: {e}")));
            }
        }
    }
    match config.redis_url() {
        None if config.redis_cluster_nodes().is_some() => {}
        None => println!("  redis      skip  REDIS_URL and REDIS_CLUSTER_NODES not set: no L2, no backplane"),
        Some(url) => match redis_version(url).await {
            Ok(version) => {
                println!("  redis      ok    {} (redis {version}), namespace {}", shown, config.redis_namespace())
            }
            Err(e) => {
                let e = one_line(&e.to_string());
                println!("  redis      FAIL  {shown}: {e}");
                failed.push(("redis", format!("redis at {shown} unreachable: {e}")));
            }
        },
    }
    let shown = config.database_url_redacted().unwrap_or_default();
    let schema = config.database_schema();
    let reachable = match config.database_url() {
        None => {
            println!("  postgres   skip  DATABASE_URL not set: no L3");
            false
        }
        Some(url) => match postgres_version(url).await {
            Ok(version) => {
                println!(
                    "  postgres   ok    {shown} (postgres {version}), schema {schema}, pool {}",
                    config.database_max_connections()
                );
                true
            }
            Err(e) => {
                let e = one_line(&e.to_string());
                println!("  postgres   FAIL  {shown}: {e}");
                failed.push(("postgres", format!("postgres at {shown} unreachable: {e}")));
                false
            }
        },
    };
    match config.database_url() {
        None => println!("  migrations skip  DATABASE_URL not set"),
        Some(_) if !reachable => println!("  migrations skip  postgres unreachable"),
        Some(url) => match migrate(&config, url, option(opts, "cache-only").is_none()).await {
            Ok((applied, elapsed)) => {
                println!("  migrations ok    schema {schema}: {} applied in {} ms", applied.len(), elapsed.as_millis());
                for (name, before) in applied {
                    println!("    {name:<24} {}", if before { "already applied" } else { "applied" });
                }
            }
            Err(e) => {
                println!("  migrations FAIL  schema {schema}: {e}");
                failed.push(("migrations", format!("migrations in schema {schema} of {shown}: {e}")));
            }
        },
    }
    if failed.is_empty() {
        println!("result: ok");
        Ok(())
    } else {
        let names: Vec<&str> = failed.iter().map(|(name, _)| *name).collect();
        println!("result: failed ({})", names.join(", "));
        let reasons: Vec<String> = failed.into_iter().map(|(_, why)| why).collect();
        Err(Failure::Failed(reasons.join("; ")))
    }
}

/// Applies the embedded migrations (with the reference RBAC schema, or the cache's own only) with
/// the tier the configuration describes: each migration with whether it had been recorded
/// before, and how long it took.
async fn migrate(
    config: &CacheConfig,
    url: &str,
    reference_rbac: bool,
) -> Result<(Vec<(&'static str, bool)>, Duration), String> {
    let tier = config.postgres_tier().map_err(|e| e.to_string())?.ok_or("DATABASE_URL is not set")?;
    let before = recorded_migrations(url, tier.schema()).await;
    let started = Instant::now();
    let applied =
        async { if reference_rbac { tier.migrate_with_reference_rbac().await } else { tier.migrate().await } };
    tokio::time::timeout(MIGRATE_TIMEOUT, applied)
        .await
        .map_err(|_| format!("no answer within {} s", MIGRATE_TIMEOUT.as_secs()))?
        .map_err(|e| one_line(&e.to_string()))?;
    let elapsed = started.elapsed();
    let names: Vec<&'static str> =
        if reference_rbac { PostgresTier::migrations().collect() } else { PostgresTier::cache_migrations().collect() };
    Ok((names.into_iter().map(|name| (name, before.contains(name))).collect(), elapsed))
}

/// The migrations recorded in `schema` (none when the table is missing or unreadable: the
/// migration that follows says what is wrong, if anything).
async fn recorded_migrations(url: &str, schema: &str) -> HashSet<String> {
    let read = async {
        let client = postgres_client(url).await?;
        let table = format!("{schema}.authz_cache_migrations");
        let exists = client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&table]).await?;
        if !exists.try_get::<_, bool>(0)? {
            return Ok(HashSet::new());
        }
        let rows = client.query(&format!("SELECT name FROM {table}"), &[]).await?;
        rows.iter().map(|row| row.try_get::<_, String>(0)).collect::<Result<_, _>>().map_err(BoxError::from)
    };
    tokio::time::timeout(CHECK_TIMEOUT, read).await.ok().and_then(Result::ok).unwrap_or_default()
}

/// `warm`: the `--limit` most-hit valid L3 rows, loaded into this process's L1 like an
/// instance's start-up warming, then reported.
async fn warm(opts: &[(String, String)]) -> Result<(), Failure> {
    let limit = match option(opts, "limit") {
        None => WARM_LIMIT,
        Some(raw) => raw.trim().parse::<usize>().ok().filter(|n| (1..=1_000_000).contains(n)).ok_or_else(|| {
            Failure::Usage(format!("--limit {raw:?}: expected a whole number of rows from 1 to 1000000"))
        })?,
    };
    let json = option(opts, "json").is_some();
    let config = CacheConfig::from_env().map_err(|e| Failure::Usage(e.to_string()))?;
    let Some(url) = config.database_url() else {
        return Err(Failure::Failed("DATABASE_URL is not set: warm reads the L3 rows in Postgres".into()));
    };
    if config.secret().is_none() {
        return Err(Failure::Failed(
            "AUTHZ_CACHE_SECRET is not set: L3 rows are sealed under the instances' secret, which warm needs to read \
             them"
                .into(),
        ));
    }
    let shown = config.database_url_redacted().unwrap_or_default();
    let schema = config.database_schema().to_owned();
    // Reachability and schema first: the cache would count an unreadable table as no rows.
    let in_l3 = tokio::time::timeout(CHECK_TIMEOUT, valid_rows(url, &schema))
        .await
        .map_err(|_| "no answer within 3 s".into())
        .and_then(|r| r)
        .map_err(|e| Failure::Failed(format!("postgres at {shown}, schema {schema}: {}", one_line(&e.to_string()))))?;
    // The authorizer is never asked (rows are checked against Postgres, not re-decided): it
    // fails closed all the same.
    let never = |_: Principal, _: Permission| async {
        Err::<Decision, BoxError>("authz-cache warm has no authorizer: rows are checked, never decided".into())
    };
    let cache = cli_cache(&config, AuthzCache::builder(never))?;
    let report = cache.warm_from_l3(limit).await;
    let l3 = cache.stats().tiers.l3.ok_or_else(|| Failure::Failed("no L3 tier".into()))?;
    let valid = report.loaded + report.already_cached;
    let (rejected, errors) = (l3.rejected, l3.errors + l3.call_errors + l3.call_timeouts);
    if json {
        let out = serde_json::json!({
            "schema": schema,
            "limit": limit,
            "unexpired_rows_in_l3": in_l3,
            "checked": report.keys,
            "valid": valid,
            "rejected": rejected,
            "read_errors": errors,
            "report": report,
            "l1_kept": false,
            "note": WARM_NOTE,
        });
        println!("{out}");
    } else {
        print_warm(&report, &schema, &shown, limit, in_l3, (rejected, errors));
    }
    if rejected > 0 {
        return Err(Failure::Failed(format!(
            "{rejected} L3 rows failed verification: is AUTHZ_CACHE_SECRET the instances' secret? (otherwise, \
             tampering: see the authz_cache::audit log of the instances)"
        )));
    }
    if errors > 0 || (report.keys == 0 && in_l3 > 0) {
        return Err(Failure::Failed(format!(
            "reading the L3 rows of schema {schema} at {shown} failed ({errors} errors); {} of {in_l3} unexpired \
             rows checked",
            report.keys
        )));
    }
    Ok(())
}

fn print_warm(
    report: &WarmReport,
    schema: &str,
    shown: &str,
    limit: usize,
    in_l3: u64,
    (rejected, errors): (u64, u64),
) {
    println!("authz-cache warm --limit {limit}: schema {schema} at {shown} ({in_l3} unexpired rows in L3)");
    println!(
        "checked {} rows: {} valid ({} loaded into L1, {} already there), {} skipped, in {} ms",
        report.keys,
        report.loaded + report.already_cached,
        report.loaded,
        report.already_cached,
        report.skipped,
        report.elapsed_ms
    );
    if report.skipped > 0 {
        println!(
            "  skipped: {rejected} failed verification, {errors} read errors, the others expired or were invalidated \
             meanwhile"
        );
    }
    println!("note: {WARM_NOTE}");
}

/// How many unexpired rows the L3 table of `schema` holds; an error when there is no such table.
async fn valid_rows(url: &str, schema: &str) -> Result<u64, BoxError> {
    let client = postgres_client(url).await?;
    let table = format!("{schema}.authz_cache_entries");
    let exists = client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&table]).await?;
    if !exists.try_get::<_, bool>(0)? {
        return Err(format!("no table {table}: run `authz-cache init` with this DATABASE_SCHEMA first").into());
    }
    let row = client.query_one(&format!("SELECT count(*) FROM {table} WHERE expires_at > now()"), &[]).await?;
    Ok(u64::try_from(row.try_get::<_, i64>(0)?).unwrap_or(0))
}

/// A cache for this short-lived process: the configured tiers, with L3 neither warming at
/// start-up (`warm` does it explicitly) nor held to a request-time call timeout.
fn cli_cache(config: &CacheConfig, builder: AuthzCacheBuilder) -> Result<AuthzCache, Failure> {
    let usage = |e: tower_authz_cache::ConfigError| Failure::Usage(e.to_string());
    let l3 = match config.postgres_tier_builder().map_err(usage)? {
        None => None,
        Some(tier) => Some(tier.warm_on_start(0).timeout(CALL_TIMEOUT).build().map_err(|e| {
            Failure::Usage(format!("DATABASE_URL={:?}: {e}", config.database_url_redacted().unwrap_or_default()))
        })?),
    };
    // A one-shot process connects at its first call: the cluster tier gets the long timeout too.
    let l2 = match config.redis_cluster_nodes() {
        None => None,
        Some(nodes) => Some(
            tower_authz_cache::RedisClusterTier::builder(nodes.iter().cloned())
                .namespace(config.redis_namespace())
                .wait_replicas(config.redis_cluster_wait_replicas())
                .connect_timeout(CALL_TIMEOUT)
                .timeout(CALL_TIMEOUT)
                .build()
                .map_err(|e| Failure::Usage(format!("REDIS_CLUSTER_NODES: {e}")))?,
        ),
    };
    let mut builder = config
        .clone()
        .with_database_url(None)
        .with_redis_cluster_nodes(None)
        .apply(builder.secret(config.secret_bytes()))
        .map_err(usage)?;
    if let Some(tier) = l2 {
        builder = builder.l2(tier);
    }
    Ok(match l3 {
        Some(tier) => builder.l3(tier),
        None => builder,
    }
    .build())
}

/// Errors of drivers can span lines; reports keep one line per item.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `CLUSTER INFO` says ok and every slot has a master (see `RedisClusterTier::check_cluster`).
async fn redis_cluster_check(
    config: &CacheConfig,
    nodes: &[String],
) -> Result<tower_authz_cache::ClusterReport, BoxError> {
    let tier = tower_authz_cache::RedisClusterTier::builder(nodes.iter().cloned())
        .namespace(config.redis_namespace())
        .connect_timeout(CHECK_TIMEOUT)
        .timeout(CHECK_TIMEOUT)
        .build()?;
    match tokio::time::timeout(CHECK_TIMEOUT * 2, tier.check_cluster()).await {
        Ok(report) => Ok(report?),
        Err(_) => Err(format!("no answer within {:?}", CHECK_TIMEOUT * 2).into()),
    }
}

async fn redis_version(url: &str) -> Result<String, BoxError> {
    let client = redis::Client::open(url)?;
    let mut conn = tokio::time::timeout(CHECK_TIMEOUT, client.get_multiplexed_async_connection())
        .await
        .map_err(|_| "no answer within 3 s")??;
    let info: String = tokio::time::timeout(CHECK_TIMEOUT, redis::cmd("INFO").arg("server").query_async(&mut conn))
        .await
        .map_err(|_| "no answer within 3 s")??;
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| "unknown version".into()))
}

async fn postgres_version(url: &str) -> Result<String, BoxError> {
    let client = postgres_client(url).await?;
    let row = tokio::time::timeout(CHECK_TIMEOUT, client.query_one("SHOW server_version", &[]))
        .await
        .map_err(|_| "no answer within 3 s")??;
    Ok(row.try_get(0)?)
}

/// A client on `url`, within the check timeout; its connection ends when it is dropped.
async fn postgres_client(url: &str) -> Result<tokio_postgres::Client, BoxError> {
    let connect = tokio_postgres::connect(url, tokio_postgres::NoTls);
    let (client, connection) =
        tokio::time::timeout(CHECK_TIMEOUT, connect).await.map_err(|_| "no answer within 3 s")??;
    tokio::spawn(connection);
    Ok(client)
}

async fn invalidate(opts: &[(String, String)]) -> Result<(), Failure> {
    let invalidation = match (option(opts, "principal"), option(opts, "resource"), option(opts, "all")) {
        (Some(p), None, None) => Invalidation::principal(p),
        (None, Some(r), None) => Invalidation::resource(r),
        (None, None, Some(_)) => Invalidation::All,
        _ => return Err(Failure::Usage("give exactly one of --principal, --resource, --all".into())),
    };
    let config = CacheConfig::from_env().map_err(|e| Failure::Usage(e.to_string()))?;
    if !config.uses_redis() && config.database_url().is_none() {
        return Err(Failure::Usage(
            "neither REDIS_URL, REDIS_CLUSTER_NODES nor DATABASE_URL is set: invalidations reach other instances through Redis or Postgres"
                .into(),
        ));
    }
    if config.secret().is_none() {
        return Err(Failure::Usage(
            "AUTHZ_CACHE_SECRET is not set: it must be the instances' secret to reach their epochs".into(),
        ));
    }
    let never = |_: Principal, _: Permission| async { Ok::<_, BoxError>(Decision::deny()) };
    let cache = cli_cache(&config, AuthzCache::builder(never))?;
    let mut stores = Vec::new();
    if let Some(url) = config.database_url_redacted() {
        stores.push(format!("Postgres at {url}, schema {}", config.database_schema()));
    }
    if let Some(url) = config.redis_url_redacted() {
        stores.push(format!("Redis at {url}, namespace {}", config.redis_namespace()));
    }
    if let Some(nodes) = config.redis_cluster_nodes_redacted() {
        stores.push(format!("the Redis Cluster at {nodes}, namespace {}", config.redis_namespace()));
    }
    let token = cache
        .invalidate(&invalidation)
        .await
        .map_err(|e| Failure::Failed(format!("{e}: not taken by {}", stores.join(" and "))))?;
    println!("invalidated {invalidation:?} through {}", stores.join(" and "));
    // A request that carries it (header `authz-consistency`) sees the invalidation on any
    // instance that shares the secret, whatever its backplane has delivered.
    println!("consistency token: {token}");
    Ok(())
}

/// A minimal HTTP/1.1 GET over plain TCP: status and body.
async fn http_get(base: &str, path: &str, token: Option<&str>) -> Result<(u16, String), Failure> {
    let rest = base
        .strip_prefix("http://")
        .ok_or_else(|| Failure::Usage(format!("--url {base:?}: expected http://host:port")))?;
    let hostport = rest.trim_end_matches('/');
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\nAccept: application/json\r\n{}\r\n",
        token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default()
    );
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(hostport).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.take(16 << 20).read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(CHECK_TIMEOUT, exchange)
        .await
        .map_err(|_| Failure::Failed(format!("{base}: no answer within 3 s")))?
        .map_err(|e| Failure::Failed(format!("{base}: {e}")))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| Failure::Failed("malformed HTTP response".into()))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Failure::Failed("malformed HTTP status line".into()))?;
    let chunked =
        head.lines().any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.contains("chunked"));
    let body = if chunked { dechunk(body) } else { body.to_owned() };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}
