//! The audit log (`authz_cache::audit`): denies, invalidations with who asked, failures; and no
//! principal id ever appears in it, only short keyed hashes. Also the check span's provenance
//! fields.

use std::io::Write;
use std::sync::{Arc, Mutex};

use tower_authz_cache::{AuthzCache, BoxError, Decision, Invalidation, Permission, Principal};

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
async fn audit_events_name_scopes_and_requesters_but_never_principal_ids() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_env_filter("authz_cache::audit=info")
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let cache = AuthzCache::builder(|p: Principal, _: Permission| async move {
        match p.id() {
            "broken-user-77" => Err::<Decision, BoxError>("policy store down".into()),
            id => Ok(Decision::from_bool(id != "mallory-secret-id")),
        }
    })
    .build();
    let read = Permission::new("documents:1", "read");
    cache.check(&Principal::new("mallory-secret-id"), &read).await.unwrap();
    let _ = cache.check(&Principal::new("broken-user-77"), &read).await;
    let admin = Principal::new("admin-alice-id");
    cache.invalidate_as(&Invalidation::principal("bob-secret-id"), &admin).await.unwrap();
    cache.invalidate(&Invalidation::All).await.unwrap();

    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(log.contains("authz_cache::audit"), "{log}");
    assert!(log.contains("no decision obtainable: failing closed"), "{log}");
    assert!(log.contains("scope=\"principal\"") || log.contains("scope=principal"), "{log}");
    assert!(log.contains("scope=\"all\"") || log.contains("scope=all"), "{log}");
    let by_line = log.lines().find(|l| l.contains("scope=\"principal\"") || l.contains("scope=principal")).unwrap();
    assert!(by_line.contains("by="), "who asked is recorded: {by_line}");
    assert!(!by_line.contains("by=-"), "an invalidation with a requester names it (hashed): {by_line}");
    for id in ["mallory-secret-id", "broken-user-77", "admin-alice-id", "bob-secret-id"] {
        assert!(!log.contains(id), "{id} appears in the audit log:\n{log}");
    }
}

/// Where a decision came from, as a tracing subscriber sees it: the `authz_check` span's fields
/// (the `Decision` side is covered by the unit tests).
#[tokio::test]
async fn the_check_span_carries_source_age_and_allowed() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_env_filter("authz_cache=debug")
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
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
