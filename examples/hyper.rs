//! The demo app of `quickstart.rs` on plain hyper 1 (no axum): a `tower::Service` that routes by
//! method and path, wrapped in `CachedAuthorizationLayer` with `tower::ServiceBuilder`, served
//! one task per connection with hyper's HTTP/1 builder and hyper-util's tokio glue, and stopped
//! gracefully on Ctrl-C or SIGTERM. L1 only, roles in memory. The app itself lives in
//! `common/hyper_app.rs`, shared with `custom_tier.rs`.
//!
//! ```text
//! cargo run --example hyper            # serves on 127.0.0.1:3000 (PORT to change)
//! curl -i http://127.0.0.1:3000/health
//! curl -i -H 'Authorization: Bearer bob-token' http://127.0.0.1:3000/documents/1
//! curl -i -X DELETE -H 'Authorization: Bearer bob-token' http://127.0.0.1:3000/documents/1    # 403
//! curl -i -X PUT -H 'Authorization: Bearer alice-token' -d '{"role":"none"}' \
//!     http://127.0.0.1:3000/admin/users/bob/role                                              # 204
//! curl -s -H 'Authorization: Bearer alice-token' http://127.0.0.1:3000/admin/stats
//! ```
//!
//! Users, tokens, routes and answers are those of the quickstart (alice admin, bob viewer, carol
//! editor; tokens `<name>-token`): the curl walkthrough of the README works against either.

#[path = "common/demo.rs"]
mod demo;
#[path = "common/hyper_app.rs"]
mod hyper_app;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let port = demo::port().unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(2)
    });
    // The authorizer is the source of truth: here, the in-memory role map.
    let roles = hyper_app::demo_roles();
    let cache = hyper_app::builder(&roles).build();
    hyper_app::serve(port, roles, cache, "hyper", "L1 (in-process memory)").await
}
