//! Where a decision came from: the `authz_check` span's fields, as a tracing subscriber sees
//! them (the `Decision` side is covered by the unit tests).

use std::io::Write;
use std::sync::{Arc, Mutex};

use tower_authz_cache::{AuthzCache, BoxError, Decision, Permission, Principal};
use tracing_subscriber::fmt::format::FmtSpan;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn the_check_span_carries_source_age_and_allowed() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_env_filter("authz_cache=debug")
        .with_span_events(FmtSpan::CLOSE)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let cache =
        AuthzCache::builder(|_: Principal, _: Permission| async { Ok::<_, BoxError>(Decision::deny()) }).build();
    let (bob, read) = (Principal::new("bob"), Permission::new("documents:1", "read"));
    cache.check(&bob, &read).await.unwrap();
    cache.check(&bob, &read).await.unwrap();

    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let closes: Vec<&str> = log.lines().filter(|l| l.contains("authz_check") && l.contains("close")).collect();
    assert_eq!(closes.len(), 2, "{log}");
    assert!(closes[0].contains("source=\"authorizer\"") || closes[0].contains("source=authorizer"), "{}", closes[0]);
    assert!(closes[1].contains("source=\"l1\"") || closes[1].contains("source=l1"), "{}", closes[1]);
    for line in &closes {
        assert!(line.contains("allowed=false"), "{line}");
        assert!(line.contains("age_ms="), "{line}");
    }
}
