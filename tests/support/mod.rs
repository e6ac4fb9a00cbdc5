//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::convert::Infallible;

use http::{Request, Response};
use http_body_util::BodyExt;
use tower::{Service, ServiceExt};

/// Sends one request through a service and returns status, the named headers and the body.
pub async fn send<S, B>(svc: &mut S, req: Request<axum::body::Body>) -> (Response<()>, String)
where
    S: Service<Request<axum::body::Body>, Response = Response<B>, Error = Infallible>,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let res = svc.ready().await.unwrap().call(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    (Response::from_parts(parts, ()), String::from_utf8_lossy(&bytes).into_owned())
}

/// A stable text rendering of a response for snapshots: status, chosen headers, pretty body.
pub fn render(res: &Response<()>, body: &str) -> String {
    let mut out = format!("{}\n", res.status());
    for name in ["content-type", "www-authenticate", "retry-after", "cache-control"] {
        if let Some(v) = res.headers().get(name) {
            out.push_str(&format!("{name}: {}\n", v.to_str().unwrap()));
        }
    }
    let pretty = serde_json::from_str::<serde_json::Value>(body)
        .map(|v| serde_json::to_string_pretty(&v).unwrap())
        .unwrap_or_else(|_| body.to_owned());
    out.push('\n');
    out.push_str(&pretty);
    out
}

pub fn get(path: &str, token: Option<&str>) -> Request<axum::body::Body> {
    request("GET", path, token, "")
}

pub fn request(method: &str, path: &str, token: Option<&str>, body: &str) -> Request<axum::body::Body> {
    let mut b = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    if !body.is_empty() {
        b = b.header("content-type", "application/json");
    }
    b.body(axum::body::Body::from(body.to_owned())).unwrap()
}

#[cfg(feature = "redis")]
pub mod cluster;
pub mod faults;
pub mod http1;
#[cfg(feature = "postgres")]
pub mod pg;
pub mod proxy;
#[cfg(feature = "redis")]
pub mod redis;

/// p50 and p99 of a sample, in microseconds.
pub fn percentiles(samples: &mut [std::time::Duration]) -> (f64, f64) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1];
    (at(0.50).as_secs_f64() * 1e6, at(0.99).as_secs_f64() * 1e6)
}
