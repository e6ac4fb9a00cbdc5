//! The `authz-cache` command line against the real Redis and Postgres.
#![cfg(feature = "cli")]

mod support;

use std::process::{Command, Output};
use std::time::Duration;

use support::redis::{Namespace, SECRET};
use tower_authz_cache::{AuthzCache, BoxError, Decision, Permission, Principal, RedisTier};

fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn cli(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_authz-cache"));
    cmd.args(args);
    for var in ["AUTHZ_CACHE_MODE", "REDIS_URL", "DATABASE_URL", "AUTHZ_CACHE_SECRET", "AUTHZ_CACHE_NAMESPACE"] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("the authz-cache binary runs")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn init_reports_each_component_against_the_running_services() {
    let redis = support::redis::url();
    let pg = database_url();
    let out = cli(&["init", "--mode", "development"], &[("REDIS_URL", &redis), ("DATABASE_URL", &pg)]);
    let report = text(&out);
    assert!(
        out.status.success(),
        "init failed; is PostgreSQL running at {pg}? (`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) \
         main start`, or run `bash .ci/run`)\n{report}"
    );
    for line in ["config     ok    mode development", "redis      ok", "postgres   ok", "result: ok"] {
        assert!(report.contains(line), "missing {line:?} in:\n{report}");
    }
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
    .l2(RedisTier::builder(support::redis::url(), SECRET).namespace(&ns.0).build().unwrap())
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
