//! Serves the quickstart app twice, to measure what the layer costs under load:
//! `PORT` (default 3001) without authorization, `PORT + 1` with it.
//!
//! ```text
//! cargo run --release --example overhead &
//! wrk -t1 -c32 -d10s -H 'Authorization: Bearer bob-token' http://127.0.0.1:3001/documents/1   # bare
//! wrk -t1 -c32 -d10s -H 'Authorization: Bearer bob-token' http://127.0.0.1:3002/documents/1   # layer, L1 hits
//! ```

#[allow(dead_code)]
#[path = "quickstart.rs"]
mod quickstart;

use std::net::SocketAddr;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let port: u16 = match std::env::var("PORT") {
        Ok(p) => p.parse().map_err(|_| format!("PORT={p:?} is not a port number"))?,
        Err(_) => 3001,
    };
    let bare = quickstart::unprotected_app(quickstart::Roles::demo());
    let (layered, _cache) = quickstart::app(quickstart::Roles::demo());
    let a = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    let b = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port + 1))).await?;
    println!("bare on http://127.0.0.1:{port}, with the layer on http://127.0.0.1:{}", port + 1);
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    tokio::select! {
        r = axum::serve(a, bare) => r?,
        r = axum::serve(b, axum::ServiceExt::into_make_service(layered)) => r?,
        _ = ctrl_c => {}
    }
    Ok(())
}
