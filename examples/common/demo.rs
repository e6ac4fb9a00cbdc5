//! Demo-only code shared by the examples that serve the demo contract (`quickstart.rs`,
//! `hyper.rs` and `custom_tier.rs`): the users, their roles and tokens, the route table, the JSON
//! bodies. One implementation, so every example gives the same answers.
//!
//! Not an example of its own: cargo builds `examples/*.rs` and `examples/*/main.rs`, and this
//! folder has no `main.rs`. Each example includes it with `#[path = "common/demo.rs"] mod demo;`.

// Each example uses part of it.
#![allow(dead_code)]

use std::collections::HashMap;

use http::{HeaderValue, Method, Response, StatusCode, header};
use serde_json::{Value, json};
use tower_authz_cache::{Decision, Invalidation, Permission, Principal, RouteTable};

/// The demo's roles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    None,
    Viewer,
    Editor,
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "none" => Role::None,
            "viewer" => Role::Viewer,
            "editor" => Role::Editor,
            "admin" => Role::Admin,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::None => "none",
            Role::Viewer => "viewer",
            Role::Editor => "editor",
            Role::Admin => "admin",
        }
    }

    pub fn allows(self, permission: &Permission) -> bool {
        let documents = permission.resource().starts_with("documents:");
        match (self, permission.action()) {
            (Role::None, _) => false,
            (Role::Admin, _) => true,
            (Role::Viewer, "read") => documents,
            (Role::Editor, "read" | "write") => documents,
            _ => false,
        }
    }

    /// The authorizer's answer for this role, with a reason on a deny.
    pub fn decide(self, permission: &Permission) -> Decision {
        if self.allows(permission) {
            Decision::allow()
        } else {
            Decision::deny().with_reason(format!("role {} may not {} this document", self.name(), permission.action()))
        }
    }
}

/// The demo users and their roles at start.
pub const DEMO_USERS: [(&str, Role); 3] = [("alice", Role::Admin), ("bob", Role::Viewer), ("carol", Role::Editor)];

/// The demo users, as a role map.
pub fn demo_roles() -> HashMap<String, Role> {
    DEMO_USERS.into_iter().map(|(u, r)| (u.to_owned(), r)).collect()
}

/// The demo's session store: bearer token -> principal. A real app asks its own store; this one
/// is built once, and its principals are cheap to clone. (Owned keys: a map keyed by
/// `&'static str` inside the resolver trips rustc's "`Send` is not general enough" when the
/// server's connection future is spawned.)
pub fn sessions() -> HashMap<String, Principal> {
    [("alice-token", "alice"), ("bob-token", "bob"), ("carol-token", "carol")]
        .into_iter()
        .map(|(token, user)| (token.to_owned(), Principal::new(user)))
        .collect()
}

/// What each route needs: the layer answers 401/403/503 before the handlers run.
pub fn routes() -> RouteTable {
    RouteTable::new()
        .public("/health")
        .public_route(Method::GET, "/metrics")
        .public_route(Method::GET, "/ready")
        .route(Method::GET, "/documents/{id}", "documents:{id}", "read")
        .route(Method::PUT, "/documents/{id}", "documents:{id}", "write")
        .route(Method::DELETE, "/documents/{id}", "documents:{id}", "delete")
        .route(Method::PUT, "/admin/users/{user}/role", "admin", "manage")
        .route(Method::POST, "/admin/invalidate", "admin", "manage")
        .route(Method::GET, "/admin/stats", "admin", "manage")
}

/// The body of `GET /documents/{id}`.
pub fn document(id: &str) -> Value {
    json!({ "id": id, "title": format!("Document {id}") })
}

/// An `application/problem+json` error response.
pub fn problem(status: StatusCode, detail: &str) -> Response<String> {
    let body = json!({ "type": "about:blank", "title": status.canonical_reason(), "status": status.as_u16(), "detail": detail });
    let mut res = Response::new(body.to_string());
    *res.status_mut() = status;
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
    res
}

/// The content type of `GET /metrics`.
pub const PROMETHEUS_TEXT: HeaderValue = HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8");

/// The body of `PUT /admin/users/{user}/role`: `{"role":"viewer"}`. `Err` is a 400's detail.
pub fn parse_role(body: &[u8]) -> Result<Role, &'static str> {
    let body: Value = serde_json::from_slice(body).map_err(|_| "body must be JSON")?;
    body.get("role")
        .and_then(Value::as_str)
        .and_then(Role::parse)
        .ok_or("role must be one of viewer, editor, admin, none")
}

/// The body of `POST /admin/invalidate`: `{"principal":"bob"}`, `{"resource":"documents:1"}` or
/// `{"all":true}`. `Err` is a 400's detail.
pub fn parse_invalidation(body: &[u8]) -> Result<Invalidation, &'static str> {
    let body: Value = serde_json::from_slice(body).map_err(|_| "body must be JSON")?;
    if let Some(p) = body.get("principal").and_then(Value::as_str) {
        Ok(Invalidation::principal(p))
    } else if let Some(r) = body.get("resource").and_then(Value::as_str) {
        Ok(Invalidation::resource(r))
    } else if body.get("all") == Some(&Value::Bool(true)) {
        Ok(Invalidation::All)
    } else {
        Err(r#"expected {"principal":..}, {"resource":..} or {"all":true}"#)
    }
}

/// The `PORT` to serve on, 3000 when unset.
pub fn port() -> Result<u16, String> {
    match std::env::var("PORT") {
        Ok(p) => p.parse().map_err(|_| format!("PORT={p:?}: expected a port number from 1 to 65535")),
        Err(_) => Ok(3000),
    }
}

/// Prints the address and a few curl lines to try.
pub fn print_try(base: &str) {
    println!("listening on {base}");
    println!("try:");
    println!("  curl -i {base}/health");
    println!("  curl -i -H 'Authorization: Bearer bob-token' {base}/documents/1");
    println!("  curl -i -X DELETE -H 'Authorization: Bearer bob-token' {base}/documents/1      # 403");
    println!("  curl -i -X DELETE -H 'Authorization: Bearer alice-token' {base}/documents/1    # 204");
    println!(
        "  curl -i -X PUT -H 'Authorization: Bearer alice-token' -H 'content-type: application/json' -d '{{\"role\":\"none\"}}' {base}/admin/users/bob/role"
    );
    println!("  curl -s -H 'Authorization: Bearer alice-token' {base}/admin/stats");
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    println!("shutting down");
}
