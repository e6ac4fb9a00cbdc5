//! `authz-cache`: initialise and check the system, and operate a running cache.
//!
//! ```text
//! authz-cache init [--mode development|testing|production]   check config, Redis, Postgres; report
//! authz-cache health [--url http://127.0.0.1:3000]            GET /ready of a running app
//! authz-cache stats  [--url ...] [--token TOKEN]              GET /admin/stats of a running app
//! authz-cache invalidate --principal ID | --resource ID | --all   through Redis (every instance)
//! authz-cache warm                                            needs the L3 tier (not built yet)
//! ```
//!
//! Configuration comes from the environment, as for the library (`CacheConfig::from_env`):
//! `REDIS_URL`, `DATABASE_URL`, `AUTHZ_CACHE_SECRET`, `AUTHZ_CACHE_NAMESPACE`, ...
//! Exit codes: 0 success, 1 a check or an operation failed, 2 usage or configuration error.

use std::process::ExitCode;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower_authz_cache::{AuthzCache, BoxError, CacheConfig, Decision, Invalidation, Mode, Permission, Principal};

const USAGE: &str = "usage: authz-cache <init|health|stats|invalidate|warm> [options]
  init [--mode development|testing|production]
  health [--url URL]
  stats [--url URL] [--token TOKEN]
  invalidate (--principal ID | --resource ID | --all)
  warm";

const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

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
        "init" => init(&options(rest, &["mode"], &[])?).await,
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
        "warm" => Err(Failure::Failed("warming needs the L3 (Postgres) tier, which is not built yet".into())),
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
    let mut failed = Vec::new();
    let shown = config.redis_url_redacted().unwrap_or_default();
    match config.redis_url() {
        None => println!("  redis      skip  REDIS_URL not set: no L2, no backplane"),
        Some(url) => match redis_version(url).await {
            Ok(version) => {
                println!("  redis      ok    {} (redis {version}), namespace {}", shown, config.redis_namespace())
            }
            Err(e) => {
                println!("  redis      FAIL  {shown}: {e}");
                failed.push("redis");
            }
        },
    }
    let shown = config.database_url_redacted().unwrap_or_default();
    match config.database_url() {
        None => println!("  postgres   skip  DATABASE_URL not set"),
        Some(url) => match postgres_version(url).await {
            Ok(version) => println!("  postgres   ok    {shown} (postgres {version})"),
            Err(e) => {
                println!("  postgres   FAIL  {shown}: {e}");
                failed.push("postgres");
            }
        },
    }
    println!("  migrations skip  no L3 schema yet (the Postgres tier is not built)");
    if failed.is_empty() {
        println!("result: ok");
        Ok(())
    } else {
        println!("result: failed ({})", failed.join(", "));
        Err(Failure::Failed(format!("{} unreachable", failed.join(" and "))))
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
    let connect = tokio_postgres::connect(url, tokio_postgres::NoTls);
    let (client, connection) =
        tokio::time::timeout(CHECK_TIMEOUT, connect).await.map_err(|_| "no answer within 3 s")??;
    let driver = tokio::spawn(connection);
    let row = tokio::time::timeout(CHECK_TIMEOUT, client.query_one("SHOW server_version", &[]))
        .await
        .map_err(|_| "no answer within 3 s")??;
    let version: String = row.try_get(0)?;
    drop(client);
    driver.abort();
    Ok(version)
}

async fn invalidate(opts: &[(String, String)]) -> Result<(), Failure> {
    let invalidation = match (option(opts, "principal"), option(opts, "resource"), option(opts, "all")) {
        (Some(p), None, None) => Invalidation::principal(p),
        (None, Some(r), None) => Invalidation::resource(r),
        (None, None, Some(_)) => Invalidation::All,
        _ => return Err(Failure::Usage("give exactly one of --principal, --resource, --all".into())),
    };
    let config = CacheConfig::from_env().map_err(|e| Failure::Usage(e.to_string()))?;
    if config.redis_url().is_none() {
        return Err(Failure::Usage("REDIS_URL is not set: invalidations reach other instances through Redis".into()));
    }
    if config.secret().is_none() {
        return Err(Failure::Usage(
            "AUTHZ_CACHE_SECRET is not set: it must be the instances' secret to reach their epochs".into(),
        ));
    }
    let never = |_: Principal, _: Permission| async { Ok::<_, BoxError>(Decision::deny()) };
    let cache = config.apply(AuthzCache::builder(never)).map_err(|e| Failure::Usage(e.to_string()))?.build();
    cache.invalidate(&invalidation).await.map_err(|e| {
        Failure::Failed(format!("{e}: Redis at {} did not take it", config.redis_url_redacted().unwrap_or_default()))
    })?;
    println!("invalidated {invalidation:?} in namespace {}", config.redis_namespace());
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
