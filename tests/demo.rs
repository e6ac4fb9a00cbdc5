//! The demo app's contract (../shared/DEMO.md), driven through the real router.

mod support;

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/quickstart.rs"]
mod quickstart;

use http::StatusCode;
use support::{get, request, send};

#[tokio::test]
async fn the_demo_walkthrough_holds() {
    let (mut app, _cache) = quickstart::app(quickstart::Roles::demo());

    let (res, _) = send(&mut app, get("/health", None)).await;
    assert_eq!(res.status(), StatusCode::OK);

    let (res, body) = send(&mut app, get("/documents/1", None)).await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert!(res.headers()["www-authenticate"].to_str().unwrap().starts_with("Bearer"));
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    assert!(body.contains("\"status\":401"), "{body}");

    let (res, body) = send(&mut app, get("/documents/1", Some("bob-token"))).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"], "1");

    let (res, _) = send(&mut app, request("DELETE", "/documents/1", Some("bob-token"), "")).await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let (res, _) = send(&mut app, request("DELETE", "/documents/1", Some("alice-token"), "")).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let (res, _) = send(&mut app, request("PUT", "/documents/1", Some("carol-token"), "")).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let (res, _) = send(&mut app, request("PUT", "/documents/1", Some("bob-token"), "")).await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);

    // bob's GET is cached; revoking his role shows on the very next request.
    let (res, _) = send(&mut app, get("/documents/1", Some("bob-token"))).await;
    assert_eq!(res.status(), StatusCode::OK);
    let (res, _) =
        send(&mut app, request("PUT", "/admin/users/bob/role", Some("alice-token"), r#"{"role":"none"}"#)).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let (res, _) = send(&mut app, get("/documents/1", Some("bob-token"))).await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    // ... and granting shows as quickly.
    let (res, _) =
        send(&mut app, request("PUT", "/admin/users/bob/role", Some("alice-token"), r#"{"role":"editor"}"#)).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let (res, _) = send(&mut app, request("PUT", "/documents/1", Some("bob-token"), "")).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);

    // Only admins manage.
    let (res, _) =
        send(&mut app, request("PUT", "/admin/users/bob/role", Some("carol-token"), r#"{"role":"admin"}"#)).await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let (res, _) = send(&mut app, get("/admin/stats", Some("bob-token"))).await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn stats_show_l1_hits_growing_and_authorizer_calls_flat() {
    let (mut app, _cache) = quickstart::app(quickstart::Roles::demo());
    let stats = |body: String| serde_json::from_str::<serde_json::Value>(&body).unwrap();
    send(&mut app, get("/documents/1", Some("bob-token"))).await;
    let (_, first) = send(&mut app, get("/admin/stats", Some("alice-token"))).await;
    for _ in 0..5 {
        let (res, _) = send(&mut app, get("/documents/1", Some("bob-token"))).await;
        assert_eq!(res.status(), StatusCode::OK);
    }
    let (res, second) = send(&mut app, get("/admin/stats", Some("alice-token"))).await;
    assert_eq!(res.status(), StatusCode::OK);
    let (a, b) = (stats(first), stats(second));
    // 5 bob hits + 1 hit for alice's own cached stats permission.
    assert_eq!(b["tiers"]["l1"]["hits"].as_u64().unwrap(), a["tiers"]["l1"]["hits"].as_u64().unwrap() + 6);
    assert_eq!(b["authorizer_calls"], a["authorizer_calls"]);
    assert!(b["tiers"]["l1"]["misses"].is_u64());
}

#[tokio::test]
async fn admin_endpoints_reject_bad_input_clearly() {
    let (mut app, _cache) = quickstart::app(quickstart::Roles::demo());
    let admin = Some("alice-token");
    for (method, path, body, status) in [
        ("PUT", "/admin/users/bob/role", "not json", StatusCode::BAD_REQUEST),
        ("PUT", "/admin/users/bob/role", r#"{"role":"root"}"#, StatusCode::BAD_REQUEST),
        ("PUT", "/admin/users/mallory/role", r#"{"role":"admin"}"#, StatusCode::NOT_FOUND),
        ("POST", "/admin/invalidate", r#"{"nothing":1}"#, StatusCode::BAD_REQUEST),
        ("POST", "/admin/invalidate", r#"{"principal":"bob"}"#, StatusCode::NO_CONTENT),
        ("POST", "/admin/invalidate", r#"{"resource":"documents:1"}"#, StatusCode::NO_CONTENT),
        ("POST", "/admin/invalidate", r#"{"all":true}"#, StatusCode::NO_CONTENT),
    ] {
        let (res, text) = send(&mut app, request(method, path, admin, body)).await;
        assert_eq!(res.status(), status, "{method} {path} {body}: {text}");
        if status.is_client_error() {
            assert_eq!(res.headers()["content-type"], "application/problem+json");
        }
    }
}

#[tokio::test]
async fn metrics_are_public_prometheus_text() {
    let (mut app, _cache) = quickstart::app(quickstart::Roles::demo());
    send(&mut app, get("/documents/1", Some("bob-token"))).await;
    let (res, body) = send(&mut app, get("/metrics", None)).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.headers()["content-type"].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
    assert!(body.contains("authz_cache_misses_total{tier=\"l1\"} 1"), "{body}");
    // Only GET is public.
    let (res, _) = send(&mut app, request("POST", "/metrics", None, "")).await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn ready_reports_health_as_json() {
    let (mut app, _cache) = quickstart::app(quickstart::Roles::demo());
    let (res, body) = send(&mut app, get("/ready", None)).await;
    assert_eq!(res.status(), StatusCode::OK);
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "up");
    assert_eq!(health["tiers"]["l1"]["status"], "up");
}
