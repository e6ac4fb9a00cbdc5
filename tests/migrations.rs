//! The SQL in migrations/ against the real PostgreSQL (DATABASE_URL, default
//! postgres://postgres@127.0.0.1:5432/test), in a schema of this test's own that is dropped
//! afterwards: it applies twice, the materialized views hold the grants and the team-mates, the
//! change feed records the affected principals durably (with the bulk rule) and hints, draining
//! applies and deletes them, the epoch bump only rises whatever the floors and notifies, and the
//! sweep removes expired rows only.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls};

fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A client, and the notifications its connection receives.
async fn connect() -> (Client, mpsc::UnboundedReceiver<(String, String)>) {
    let url = database_url();
    let (client, mut connection) = tokio_postgres::connect(&url, NoTls).await.unwrap_or_else(|e| {
        panic!(
            "PostgreSQL is not reachable at {url} ({e}). Start it with `pg_ctlcluster --skip-systemctl-redirect \
             $(ls /etc/postgresql) main start` (or run `bash .ci/run`), or point DATABASE_URL at one."
        )
    });
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    let _ = tx.send((n.channel().to_owned(), n.payload().to_owned()));
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    (client, rx)
}

/// The next notification on `channel` whose payload satisfies `want`, within 2 s.
async fn expect(
    rx: &mut mpsc::UnboundedReceiver<(String, String)>,
    channel: &str,
    want: impl Fn(&str) -> bool,
) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let next = tokio::time::timeout_at(deadline, rx.recv()).await;
        match next {
            Ok(Some((c, payload))) if c == channel && want(&payload) => return payload,
            Ok(Some(_)) => continue,
            _ => panic!("no notification on {channel} within 2 s"),
        }
    }
}

fn migrations() -> Vec<(String, String)> {
    let dir = format!("{}/migrations", env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort();
    files.iter().map(|p| (p.display().to_string(), std::fs::read_to_string(p).unwrap())).collect()
}

#[tokio::test]
async fn the_migrations_apply_twice_and_do_what_they_say() {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    let schema = format!("t_migrations_{}_{nanos}", std::process::id());
    let u = move |name: &str| format!("{name}-{nanos}");
    let (cleanup, _) = connect().await;
    let (db, _) = connect().await;
    let (listener, mut notes) = connect().await;
    db.batch_execute(&format!("CREATE SCHEMA {schema}; SET search_path TO {schema}")).await.unwrap();
    let ns = schema.clone();
    let result = async move {
        assert!(migrations().len() >= 2, "{:?}", migrations().iter().map(|m| &m.0).collect::<Vec<_>>());
        for round in 0..2 {
            for (file, sql) in migrations() {
                db.batch_execute(&sql).await.unwrap_or_else(|e| panic!("{file} (round {round}): {e}"));
            }
        }
        let (alice, bob, carol) = (u("alice"), u("bob"), u("carol"));
        db.execute("INSERT INTO roles VALUES ('viewer'), ('editor'), ('admin')", &[]).await.unwrap();
        db.execute(
            "INSERT INTO role_permissions VALUES ('viewer', 'documents:*', 'read'), ('editor', 'documents:*', 'read'), \
             ('editor', 'documents:*', 'write'), ('admin', '*', 'manage')",
            &[],
        )
        .await
        .unwrap();
        for who in [&alice, &bob, &carol] {
            db.execute("INSERT INTO users VALUES ($1)", &[who]).await.unwrap();
        }
        db.execute(
            "INSERT INTO user_roles VALUES ($1, 'admin'), ($2, 'viewer'), ($3, 'editor')",
            &[&alice, &bob, &carol],
        )
        .await
        .unwrap();
        db.execute("INSERT INTO teams VALUES ('t1')", &[]).await.unwrap();
        db.execute("INSERT INTO team_members VALUES ('t1', $1), ('t1', $2)", &[&bob, &carol]).await.unwrap();

        // The statement triggers refreshed the views already; refreshing again is harmless.
        let grants: Vec<(String, String)> = db
            .query(
                "SELECT resource_pattern, action FROM mv_user_authorization_context WHERE user_id = $1 ORDER BY 1, 2",
                &[&carol],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        assert_eq!(
            grants,
            [("documents:*".to_owned(), "read".to_owned()), ("documents:*".to_owned(), "write".to_owned())]
        );
        let mates: i64 = db
            .query_one(
                "SELECT shared_teams FROM mv_team_collaboration_patterns WHERE principal = $1 AND teammate = $2",
                &[&bob, &carol],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(mates, 1);

        // The change feed: a change is recorded durably in the changing transaction (the NOTIFY
        // is only a hint); a role change names the principal, a permission change its holders.
        // Channels carry the schema's name: other schemas in the database never hear them.
        let (changes, epochs) = (format!("{ns}.authz_cache_changes"), format!("{ns}.authz_cache_epochs"));
        listener.batch_execute(&format!("LISTEN \"{changes}\"; LISTEN \"{epochs}\"")).await.unwrap();
        let recorded = async || -> Vec<Option<String>> {
            let rows = db
                .query("DELETE FROM authz_cache_changes RETURNING principal", &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect::<Vec<Option<String>>>();
            let mut rows = rows;
            rows.sort();
            rows
        };
        recorded().await; // the seeding above
        db.execute("UPDATE user_roles SET role_id = 'editor' WHERE user_id = $1", &[&bob]).await.unwrap();
        expect(&mut notes, &changes, |p| p == "changed").await;
        assert_eq!(recorded().await, [Some(bob.clone())]);
        // ... and the view already agrees when the notification arrives.
        let can_write: bool = db
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM mv_user_authorization_context WHERE user_id = $1 AND action = 'write')",
                &[&bob],
            )
            .await
            .unwrap()
            .get(0);
        assert!(can_write, "the statement trigger refreshed the view in the change's transaction");
        db.execute("INSERT INTO role_permissions VALUES ('editor', 'documents:*', 'delete')", &[]).await.unwrap();
        let mut holders = vec![Some(bob.clone()), Some(carol.clone())];
        holders.sort();
        assert_eq!(recorded().await, holders);
        // A statement that touches no row records nothing (seeding again is harmless).
        db.execute("INSERT INTO user_roles VALUES ($1, 'editor') ON CONFLICT DO NOTHING", &[&bob]).await.unwrap();
        db.execute("UPDATE user_roles SET role_id = 'viewer' WHERE user_id = 'nobody'", &[]).await.unwrap();
        assert!(recorded().await.is_empty(), "no row touched, nothing recorded");
        // Nothing is recorded unless the transaction commits.
        db.batch_execute(&format!("BEGIN; DELETE FROM user_roles WHERE user_id = '{alice}'; ROLLBACK")).await.unwrap();
        assert!(recorded().await.is_empty());
        // The bulk rule: more than authz_cache_bulk_limit() principals in one statement, a role with
        // more holders than that, and TRUNCATE record one change covering everything.
        db.execute("INSERT INTO roles VALUES ('crowd')", &[]).await.unwrap();
        db.execute(&format!("INSERT INTO users SELECT 'crowd-{nanos}-' || g FROM generate_series(1, 1001) g"), &[])
            .await
            .unwrap();
        recorded().await;
        db.execute(
            &format!("INSERT INTO user_roles SELECT 'crowd-{nanos}-' || g, 'crowd' FROM generate_series(1, 1001) g"),
            &[],
        )
        .await
        .unwrap();
        assert_eq!(recorded().await, [None], "1,001 principals in one statement: everything");
        db.execute("INSERT INTO role_permissions VALUES ('crowd', 'documents:*', 'read')", &[]).await.unwrap();
        assert_eq!(recorded().await, [None], "a role with 1,001 holders: everything");
        db.execute(&format!("DELETE FROM user_roles WHERE user_id = 'crowd-{nanos}-1'"), &[]).await.unwrap();
        assert_eq!(recorded().await.len(), 1, "one holder leaving is one principal");
        db.batch_execute("TRUNCATE role_permissions").await.unwrap();
        assert_eq!(recorded().await, [None], "TRUNCATE: everything");
        db.batch_execute("TRUNCATE user_roles").await.unwrap();
        assert_eq!(recorded().await, [None], "TRUNCATE: everything");

        // Draining: the changes a transaction took are applied (epochs bumped, values recorded for
        // Redis) and deleted together.
        db.execute("SELECT authz_cache_record_changes(ARRAY['x', 'y'])", &[]).await.unwrap();
        let applied = db
            .query(
                "SELECT out_scope::text, out_hash, out_value FROM authz_cache_apply_changes(\
                 ARRAY(SELECT seq FROM authz_cache_changes), ARRAY['p', 'g']::\"char\"[], ARRAY[7, 0]::bigint[], 5, 60000, true)",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(applied.len(), 2);
        let left: i64 = db.query_one("SELECT count(*) FROM authz_cache_changes", &[]).await.unwrap().get(0);
        let mirrored: i64 = db.query_one("SELECT count(*) FROM authz_cache_mirror", &[]).await.unwrap().get(0);
        assert_eq!((left, mirrored), (0, 2));

        // The epoch bump: floored at the caller's clock, increasing, notified in the backplane format.
        let floor = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as i64;
        let hash = (nanos as i64) & 0x7fff_ffff_ffff;
        let v1: i64 =
            db.query_one("SELECT authz_cache_bump('p', $1, $2, 60000)", &[&hash, &floor]).await.unwrap().get(0);
        let v2: i64 = db.query_one("SELECT authz_cache_bump('p', $1, 0, 60000)", &[&hash]).await.unwrap().get(0);
        assert!(v1 >= floor && v2 > v1, "{floor} {v1} {v2}");
        let want = format!("i p {hash:016x} {v2}");
        expect(&mut notes, &epochs, |p| p == want).await;
        let stored: i64 = db
            .query_one("SELECT value FROM authz_cache_epochs WHERE scope = 'p' AND hash = $1", &[&hash])
            .await
            .unwrap()
            .get(0);
        assert_eq!(stored, v2);
        // A bump never returns a value at or below the stored one, whatever the floors (clocks
        // minutes apart, a floor far in the past), from two connections at once.
        let (other, _) = connect().await;
        other.batch_execute(&format!("SET search_path TO {ns}")).await.unwrap();
        let skewed = [floor + 300_000_000, floor - 300_000_000, 0, floor, floor + 300_000_001];
        let bump = async |c: &Client, f: i64| -> i64 {
            c.query_one("SELECT authz_cache_bump('r', 42, $1, 60000)", &[&f]).await.unwrap().get(0)
        };
        let stored_r = async || -> i64 {
            db.query_one(
                "SELECT COALESCE((SELECT value FROM authz_cache_epochs WHERE scope = 'r' AND hash = 42), 0)",
                &[],
            )
            .await
            .unwrap()
            .get(0)
        };
        for round in 0..40 {
            let before = stored_r().await;
            let (a, b) = tokio::join!(bump(&db, skewed[round % 5]), bump(&other, skewed[(round + 2) % 5]));
            assert!(a > before && b > before && a != b, "round {round}: {before} -> {a}, {b}");
            assert_eq!(stored_r().await, a.max(b), "round {round}: the stored value is the highest answered");
        }
        // Saturation: the largest bigint stays the largest, with no error.
        db.execute("UPDATE authz_cache_epochs SET value = 9223372036854775807 WHERE scope = 'r' AND hash = 42", &[])
            .await
            .unwrap();
        assert_eq!(bump(&db, 0).await, i64::MAX);
        assert_eq!(bump(&db, i64::MAX).await, i64::MAX);

        // The sweep removes expired entries, in batches, and nothing else.
        db.execute(
            "INSERT INTO authz_cache_entries (key, value, subject, principal_hash, expires_at) \
             SELECT sha256(i::text::bytea), decode(repeat('00', 80), 'hex'), '', 0, now() - interval '1 second' \
             FROM generate_series(1, 250) i",
            &[],
        )
        .await
        .unwrap();
        db.execute(
            "INSERT INTO authz_cache_entries (key, value, subject, principal_hash, expires_at) \
             SELECT sha256(('live' || i)::bytea), decode(repeat('00', 80), 'hex'), '', 0, now() + interval '1 hour' \
             FROM generate_series(1, 10) i",
            &[],
        )
        .await
        .unwrap();
        let mut swept = 0;
        loop {
            let n: i32 = db.query_one("SELECT authz_cache_sweep(100)", &[]).await.unwrap().get(0);
            swept += n;
            if n < 100 {
                break;
            }
        }
        assert_eq!(swept, 250);
        let left: i64 = db.query_one("SELECT count(*) FROM authz_cache_entries", &[]).await.unwrap().get(0);
        assert_eq!(left, 10);
        // The table refuses keys that are not 32-byte key ids.
        assert!(
            db.execute(
                "INSERT INTO authz_cache_entries (key, value, subject, principal_hash, expires_at) \
                 VALUES ('bob', decode(repeat('00', 80), 'hex'), '', 0, now())",
                &[]
            )
            .await
            .is_err()
        );
    };
    // Drop the schema whatever happened, then report.
    let outcome = tokio::spawn(result).await;
    let _ = cleanup.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic.into_panic());
    }
}
