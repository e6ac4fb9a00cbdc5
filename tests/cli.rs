//! The `authz-cache` command line against the real Redis and Postgres (`REDIS_URL`, default
//! redis://127.0.0.1:6379; `DATABASE_URL`, default postgres://postgres@127.0.0.1:5432/test). Every
//! test that migrates uses a schema of its own (`t_cli_...`), dropped afterwards.
#![cfg(feature = "cli")]

mod support;

use std::process::{Command, Output};
use std::time::Duration;

use support::pg::Schema;
use support::redis::{Namespace, SECRET};
use tower_authz_cache::{AuthzCache, BoxError, Decision, Permission, PostgresTier, Principal, RedisTier};

/// Every variable `CacheConfig::from_env` reads: the tests set the ones they mean.
const CONFIG_VARS: [&str; 24] = [
    "AUTHZ_CACHE_MODE",
    "L1_CACHE_SIZE_MB",
    "REDIS_URL",
    "REDIS_MAX_CONNECTIONS",
    "DATABASE_URL",
    "DATABASE_SCHEMA",
    "DATABASE_MAX_CONNECTIONS",
    "CACHE_HIT_RATE_TARGET",
    "AUTHORIZATION_RESPONSE_TIME_TARGET",
    "CACHE_MONITORING_INTERVAL",
    "PERFORMANCE_ALERTS_ENABLED",
    "AUTHZ_CACHE_ALLOW_TTL_S",
    "AUTHZ_CACHE_DENY_TTL_S",
    "AUTHZ_CACHE_MAX_STALENESS_MS",
    "AUTHZ_CACHE_AUTHORIZER_TIMEOUT_MS",
    "AUTHZ_CACHE_GRACE_S",
    "AUTHZ_CACHE_REFRESH_AHEAD_PERCENT",
    "AUTHZ_CACHE_AUDIT_ONE_IN",
    "AUTHZ_CACHE_AUDIT_MAX_PER_S",
    "AUTHZ_CACHE_AUDIT_INVALIDATE",
    "AUTHZ_CACHE_NAMESPACE",
    "REDIS_CLUSTER_NODES",
    "REDIS_CLUSTER_WAIT_REPLICAS",
    "AUTHZ_CACHE_SECRET",
];

fn cli(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_authz-cache"));
    cmd.args(args);
    for var in CONFIG_VARS {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("the authz-cache binary runs")
}

/// `cli` off the runtime's threads.
async fn cli_async(args: &[&str], env: &[(&str, &str)]) -> Output {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let env: Vec<(String, String)> = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        cli(&args, &env)
    })
    .await
    .unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// The error of a failed command: exactly one line on stderr, starting with `error: `.
fn one_line_error(o: &Output) -> String {
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(stderr.lines().count(), 1, "expected a one-line error, got:\n{}", text(o));
    assert!(stderr.starts_with("error: "), "{}", text(o));
    stderr.trim_end().to_owned()
}

/// A schema of this test's own, after checking that PostgreSQL answers (the test fails, saying
/// how to start it, when it does not). Dropped with everything in it when the test ends.
async fn schema() -> Schema {
    drop(support::pg::client().await);
    Schema::new("cli")
}

/// The secret the tests' instances use, as the CLI reads it (`AUTHZ_CACHE_SECRET`).
fn secret() -> &'static str {
    std::str::from_utf8(SECRET).unwrap()
}

/// The init report with what varies between runs and machines replaced: URLs, schema,
/// server versions, timings.
fn redact(report: &str, redis: &str, pg: &str, schema: &str) -> String {
    report
        .lines()
        .map(|line| {
            let mut line = line.replace(redis, "[redis-url]").replace(pg, "[database-url]").replace(schema, "[schema]");
            for (from, to) in [("(redis ", "), namespace"), ("(postgres ", "), schema")] {
                if let Some(start) = line.find(from).map(|i| i + from.len()) {
                    if let Some(end) = line[start..].rfind(to).map(|i| start + i) {
                        line.replace_range(start..end, "[version]");
                    }
                }
            }
            if let Some(start) = line.find(" applied in ").map(|i| i + " applied in ".len()) {
                if let Some(end) = line[start..].find(" ms").map(|i| start + i) {
                    line.replace_range(start..end, "[elapsed]");
                }
            }
            line
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_reports_each_component_and_migrates_against_the_running_services() {
    support::redis::addr();
    let schema = schema().await;
    let (redis, pg) = (support::redis::url(), support::pg::url());
    let env = [("REDIS_URL", redis.as_str()), ("DATABASE_URL", pg.as_str()), ("DATABASE_SCHEMA", schema.0.as_str())];
    let out = cli_async(&["init", "--mode", "development"], &env).await;
    let report = text(&out);
    assert!(out.status.success(), "init failed:\n{report}");
    for line in [
        "config     ok    mode development",
        "redis      ok",
        "postgres   ok",
        &format!("migrations ok    schema {}: 4 applied in ", schema.0),
        "    0001_authz_cache         applied\n",
        "    0002_reference_rbac      applied\n",
        "    0003_durable_changes     applied\n",
        "    0004_rbac_change_feed    applied\n",
        "result: ok",
    ] {
        assert!(report.contains(line), "missing {line:?} in:\n{report}");
    }
    // The cache's own migrations first, then the reference RBAC schema (applied separately by
    // `migrate` and `migrate_with_reference_rbac`; `init` applies both unless --cache-only).
    let names: Vec<&str> = PostgresTier::migrations().collect();
    assert_eq!(names, ["0001_authz_cache", "0003_durable_changes", "0002_reference_rbac", "0004_rbac_change_feed"]);
    assert_eq!(PostgresTier::cache_migrations().collect::<Vec<_>>(), ["0001_authz_cache", "0003_durable_changes"]);
    let mut names = names;
    names.sort_unstable();
    insta::assert_snapshot!("init_report", redact(&report, &redis, &pg, &schema.0));

    // The migrations are in the schema, recorded.
    let db = support::pg::client().await;
    let recorded: Vec<String> = db
        .query(&format!("SELECT name FROM {}.authz_cache_migrations ORDER BY name", schema.0), &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(recorded, names);

    // Again: nothing breaks, each migration says it had been applied before.
    let out = cli_async(&["init", "--mode", "development"], &env).await;
    let report = text(&out);
    assert!(out.status.success(), "init (second run) failed:\n{report}");
    for name in &names {
        assert!(report.contains(&format!("    {name:<24} already applied")), "{report}");
    }
    assert!(report.contains("result: ok"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_fails_and_says_why_when_a_migration_fails() {
    let schema = schema().await;
    // A table in the way: the migrations cannot record themselves in it.
    let db = support::pg::client().await;
    db.batch_execute(&format!("CREATE SCHEMA {0}; CREATE TABLE {0}.authz_cache_migrations (id int)", schema.0))
        .await
        .unwrap();
    let pg = support::pg::url();
    let out = cli_async(&["init"], &[("DATABASE_URL", pg.as_str()), ("DATABASE_SCHEMA", schema.0.as_str())]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&format!("migrations FAIL  schema {}: migrations failed: ", schema.0)), "{stdout}");
    assert!(stdout.contains("result: failed (migrations)"), "{stdout}");
    let error = one_line_error(&out);
    assert!(error.contains(&format!("migrations in schema {}", schema.0)) && error.contains("\"name\""), "{error}");
}

#[test]
fn init_without_a_database_skips_the_migrations() {
    let out = cli(&["init"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let report = text(&out);
    assert!(report.contains("postgres   skip  DATABASE_URL not set"), "{report}");
    assert!(report.contains("migrations skip  DATABASE_URL not set"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_checks_an_empty_migrated_schema() {
    let schema = schema().await;
    let pg = support::pg::url();
    let env = [("DATABASE_URL", pg.as_str()), ("DATABASE_SCHEMA", schema.0.as_str()), ("AUTHZ_CACHE_SECRET", secret())];
    let out = cli_async(&["init"], &env[..2]).await;
    assert!(out.status.success(), "{}", text(&out));

    let out = cli_async(&["warm"], &env).await;
    let report = text(&out);
    assert!(out.status.success(), "{report}");
    assert!(report.contains(&format!("authz-cache warm --limit 1000: schema {} at ", schema.0)), "{report}");
    assert!(report.contains("(0 unexpired rows in L3)"), "{report}");
    assert!(report.contains("checked 0 rows: 0 valid (0 loaded into L1, 0 already there), 0 skipped"), "{report}");
    assert!(report.contains("only checks that the rows are valid and readable"), "{report}");

    let out = cli_async(&["warm", "--json", "--limit", "5"], &env).await;
    assert!(out.status.success(), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(json["schema"], schema.0.as_str());
    assert_eq!((json["limit"].as_u64(), json["checked"].as_u64(), json["valid"].as_u64()), (Some(5), Some(0), Some(0)));
    assert_eq!(json["report"]["keys"], 0);
    assert_eq!(json["l1_kept"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_checks_the_rows_an_instance_wrote() {
    let schema = schema().await;
    let pg = support::pg::url();
    let tier = PostgresTier::builder(pg.as_str()).schema(&schema.0).warm_on_start(0).build().unwrap();
    tier.migrate_with_reference_rbac().await.unwrap();
    let cache = AuthzCache::builder(|_: Principal, _: Permission| async { Ok::<_, BoxError>(Decision::allow()) })
        .secret(SECRET)
        .l3(tier)
        .build();
    for d in 1..=3 {
        cache.check(&Principal::new("bob"), &Permission::new(format!("documents:{d}"), "read")).await.unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while cache.stats().tiers.l3.unwrap().writes < 3 {
        assert!(std::time::Instant::now() < deadline, "the rows never reached Postgres: {:?}", cache.stats().tiers.l3);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let env = [("DATABASE_URL", pg.as_str()), ("DATABASE_SCHEMA", schema.0.as_str()), ("AUTHZ_CACHE_SECRET", secret())];
    let out = cli_async(&["warm"], &env).await;
    let report = text(&out);
    assert!(out.status.success(), "{report}");
    assert!(report.contains("(3 unexpired rows in L3)"), "{report}");
    assert!(report.contains("checked 3 rows: 3 valid (3 loaded into L1, 0 already there), 0 skipped"), "{report}");
    let out = cli_async(&["warm", "--limit", "2", "--json"], &env).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!((json["checked"].as_u64(), json["valid"].as_u64()), (Some(2), Some(2)), "{json}");

    // Another secret cannot open the rows: said, and exit 1.
    let env = [env[0], env[1], ("AUTHZ_CACHE_SECRET", "another secret, 32 bytes long...")];
    let out = cli_async(&["warm"], &env).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("checked 3 rows: 0 valid"), "{}", text(&out));
    let error = one_line_error(&out);
    assert!(error.contains("3 L3 rows failed verification: is AUTHZ_CACHE_SECRET the instances' secret?"), "{error}");
}

#[test]
fn warm_without_database_url_is_one_line_and_exit_1() {
    let out = cli(&["warm"], &[("AUTHZ_CACHE_SECRET", secret())]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(one_line_error(&out), "error: DATABASE_URL is not set: warm reads the L3 rows in Postgres");
    assert!(out.stdout.is_empty(), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_fails_and_says_why_without_a_secret_or_a_migrated_schema() {
    let schema = schema().await;
    let pg = support::pg::url();
    let out = cli_async(&["warm"], &[("DATABASE_URL", pg.as_str()), ("DATABASE_SCHEMA", schema.0.as_str())]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(one_line_error(&out).contains("AUTHZ_CACHE_SECRET is not set"), "{}", text(&out));

    // Never migrated: an error, not "0 rows".
    let env = [("DATABASE_URL", pg.as_str()), ("DATABASE_SCHEMA", schema.0.as_str()), ("AUTHZ_CACHE_SECRET", secret())];
    let out = cli_async(&["warm"], &env).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let error = one_line_error(&out);
    assert!(error.contains(&format!("no table {}.authz_cache_entries: run `authz-cache init`", schema.0)), "{error}");

    // Nothing listens on port 1.
    let env = [("DATABASE_URL", "postgres://postgres@127.0.0.1:1/test"), env[1], env[2]];
    let out = cli_async(&["warm"], &env).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(one_line_error(&out).contains("postgres at postgres://postgres@127.0.0.1:1/test"), "{}", text(&out));
}

#[test]
fn init_fails_and_says_so_when_redis_is_unreachable() {
    let out = cli(&["init", "--mode", "development"], &[("REDIS_URL", "redis://127.0.0.1:1")]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("redis      FAIL"), "{}", text(&out));
}

#[test]
fn bad_configuration_is_one_line_and_exit_2() {
    for (args, env, var) in [
        (vec!["init", "--mode", "staging"], vec![], "AUTHZ_CACHE_MODE"),
        (vec!["init"], vec![("L1_CACHE_SIZE_MB", "abc")], "L1_CACHE_SIZE_MB"),
        (vec!["init"], vec![("REDIS_URL", "foo")], "REDIS_URL"),
        (vec!["init"], vec![("DATABASE_SCHEMA", "Authz-Cache")], "DATABASE_SCHEMA"),
        (vec!["init"], vec![("DATABASE_MAX_CONNECTIONS", "0")], "DATABASE_MAX_CONNECTIONS"),
        (vec!["warm"], vec![("DATABASE_SCHEMA", "1st")], "DATABASE_SCHEMA"),
        (vec!["warm", "--limit", "0"], vec![], "--limit"),
    ] {
        let out = cli(&args, &env);
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {}", text(&out));
        let first = String::from_utf8_lossy(&out.stderr).lines().next().unwrap_or_default().to_owned();
        assert!(first.starts_with("error: ") && first.contains(var), "{first}");
    }
    assert_eq!(cli(&["bogus"], &[]).status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_reaches_a_running_instance_through_redis() {
    support::redis::addr();
    let ns = Namespace::new("cli");
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = calls.clone();
    let cache = AuthzCache::builder(move |_: Principal, _: Permission| {
        c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async { Ok::<_, BoxError>(Decision::allow()) }
    })
    .secret(SECRET)
    .l2(RedisTier::builder(support::redis::url()).namespace(&ns.0).build().unwrap())
    .build();
    support::redis::wait_trusted(&cache).await;
    let (bob, read) = (Principal::new("bob"), Permission::new("documents:1", "read"));
    cache.check(&bob, &read).await.unwrap();
    cache.check(&bob, &read).await.unwrap();
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);

    let secret = std::str::from_utf8(SECRET).unwrap();
    let redis = support::redis::url();
    let namespace = ns.0.clone();
    let out = tokio::task::spawn_blocking(move || {
        cli(
            &["invalidate", "--principal", "bob"],
            &[
                ("REDIS_URL", redis.as_str()),
                ("AUTHZ_CACHE_SECRET", secret),
                ("AUTHZ_CACHE_NAMESPACE", namespace.as_str()),
            ],
        )
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while calls.load(std::sync::atomic::Ordering::SeqCst) == 1 {
        assert!(std::time::Instant::now() < deadline, "the running cache never saw the CLI's invalidation");
        cache.check(&bob, &read).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_reaches_a_running_instance_through_postgres() {
    let schema = schema().await;
    let pg = support::pg::url();
    let tier = PostgresTier::builder(pg.as_str()).schema(&schema.0).warm_on_start(0).build().unwrap();
    tier.migrate_with_reference_rbac().await.unwrap();
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = calls.clone();
    let cache = AuthzCache::builder(move |_: Principal, _: Permission| {
        c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async { Ok::<_, BoxError>(Decision::allow()) }
    })
    .secret(SECRET)
    .l3(tier)
    .build();
    support::redis::wait_trusted(&cache).await;
    let (bob, read) = (Principal::new("bob"), Permission::new("documents:1", "read"));
    cache.check(&bob, &read).await.unwrap();
    cache.check(&bob, &read).await.unwrap();
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);

    let env = [("DATABASE_URL", pg.as_str()), ("DATABASE_SCHEMA", schema.0.as_str()), ("AUTHZ_CACHE_SECRET", secret())];
    let out = cli_async(&["invalidate", "--principal", "bob"], &env).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&format!("through Postgres at {pg}, schema {}", schema.0)), "{}", text(&out));
    // The printed consistency token makes the running instance's very next check fresh.
    let token = text(&out)
        .lines()
        .find_map(|l| l.strip_prefix("consistency token: "))
        .map(|t| t.trim().parse::<tower_authz_cache::ConsistencyToken>().expect("a well-formed token"))
        .expect("the CLI prints the token");
    cache.require_fresh(&token).expect("the running instance shares the secret");
    cache.check(&bob, &read).await.unwrap();
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2, "asked again at once, with the token");
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while calls.load(std::sync::atomic::Ordering::SeqCst) == 1 {
        assert!(std::time::Instant::now() < deadline, "the running cache never saw the CLI's invalidation");
        cache.check(&bob, &read).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
