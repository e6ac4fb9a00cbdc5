//! The route table judges the route the router runs (issue 12, item 4).
//!
//! One set of routes is given to the `RouteTable`, to an axum `Router` (matchit: literals compared
//! on the raw path, parameters percent-decoded by `Path`), and to a plain hyper 1 service that
//! dispatches the same way. Public and permission routes sit beside parameter routes, and a
//! literal needs a stronger (or another) permission than the parameter route beside it. Every
//! literal is then sent in escaped spellings, through axum (`oneshot` and served over TCP) and
//! through hyper (over TCP, the request target sent byte for byte). Each handler checks that the
//! layer authorized exactly the permission its own route needs, with the parameters it was given;
//! a handler that runs under another permission, or none, is a violation.

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::Path;
use axum::routing::{MethodFilter, on};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use support::http1::Conn;
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_authz_cache::{
    Access, Authorized, AuthzCache, BearerToken, BoxError, CachedAuthorizationLayer, Decision, MapPermission,
    Permission, Principal, RouteTable,
};

/// A route: method, path template, and the permission it needs (resource template, action), or
/// `None` when it is public.
type Spec = (Method, &'static str, Option<(&'static str, &'static str)>);

const SPECS: &[Spec] = &[
    (Method::GET, "/health", None),
    // A public literal beside a parameter route: `/documents/ne%77` must not be judged public
    // while axum runs `{id}`.
    (Method::GET, "/documents/new", None),
    (Method::GET, "/documents/{id}", Some(("documents:{id}", "read"))),
    // A literal needing another permission than the parameter route beside it.
    (Method::GET, "/files/index", Some(("files", "list"))),
    (Method::GET, "/files/{name}", Some(("files:{name}", "read"))),
    // A literal needing a stronger permission than the parameter route beside it.
    (Method::GET, "/vault/master", Some(("vault", "admin"))),
    (Method::GET, "/vault/{item}", Some(("vault:{item}", "read"))),
    (Method::PUT, "/admin/users/{user}/role", Some(("admin:users:{user}", "manage"))),
];

fn table() -> RouteTable {
    SPECS.iter().fold(RouteTable::new(), |t, (method, path, need)| match need {
        None => t.public_route(method.clone(), path),
        Some((resource, action)) => t.route(method.clone(), path, resource, action),
    })
}

/// The permission a route needs with these (decoded) parameters.
fn need(spec: &Spec, params: &HashMap<String, String>) -> Option<Permission> {
    let (resource, action) = spec.2?;
    let mut out = resource.to_owned();
    for (name, value) in params {
        out = out.replace(&format!("{{{name}}}"), value);
    }
    Some(Permission::new(out, action))
}

/// What the handlers saw: a line per violation.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<String>>>);

/// The handler of every route: it records a violation unless the layer authorized (and allowed)
/// exactly what this route needs. The body names the route that ran.
fn handle(log: &Log, spec: &Spec, params: &HashMap<String, String>, parts: &http::request::Parts) -> String {
    let want = need(spec, params);
    let authorized = parts.extensions.get::<Authorized>();
    let got = authorized.map(Authorized::permission);
    let allowed = authorized.is_some_and(|a| a.decision().is_allowed());
    let ok = match &want {
        None => true,
        Some(want) => got == Some(want) && allowed,
    };
    if !ok {
        log.0.lock().unwrap().push(format!(
            "{} {} ran route {} {params:?} needing {want:?} under {got:?} (allowed: {allowed})",
            parts.method, parts.uri, spec.1
        ));
    }
    format!("{} {}", spec.0, spec.1)
}

fn cache() -> AuthzCache {
    // "allow" may do anything, "deny" nothing.
    AuthzCache::builder(|p: Principal, _: Permission| async move {
        Ok::<_, BoxError>(Decision::from_bool(p.id() == "allow"))
    })
    .build()
}

fn layer() -> CachedAuthorizationLayer<impl tower_authz_cache::ResolvePrincipal, RouteTable> {
    let tokens = BearerToken::new(|t: String| async move { Ok::<_, BoxError>(Some(Principal::new(t))) });
    CachedAuthorizationLayer::new(cache(), tokens, table())
}

fn axum_app(log: &Log) -> Router {
    let mut router = Router::new();
    for spec in SPECS {
        let filter = MethodFilter::try_from(spec.0.clone()).unwrap();
        let log = log.clone();
        router = if spec.1.contains('{') {
            router.route(
                spec.1,
                on(filter, move |Path(params): Path<HashMap<String, String>>, req: axum::extract::Request| {
                    let body = handle(&log, spec, &params, &req.into_parts().0);
                    async move { body }
                }),
            )
        } else {
            router.route(
                spec.1,
                on(filter, move |req: axum::extract::Request| {
                    let body = handle(&log, spec, &HashMap::new(), &req.into_parts().0);
                    async move { body }
                }),
            )
        };
    }
    router.layer(layer())
}

fn unhex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Percent-decodes a parameter as axum's `Path` does (bad escapes kept as they are; invalid
/// UTF-8 is `None`, a 400).
fn decode(raw: &str) -> Option<String> {
    let b = raw.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match (b[i], b.get(i + 1).copied().and_then(unhex), b.get(i + 2).copied().and_then(unhex)) {
            (b'%', Some(h), Some(l)) => {
                out.push(h << 4 | l);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The plain-hyper router: literal segments compared with the raw path, a parameter takes a
/// non-empty segment; static before parameter at the earliest segment (as matchit); parameters
/// decoded.
fn dispatch(method: &Method, path: &str) -> Option<(&'static Spec, Option<HashMap<String, String>>)> {
    let segs: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
    // (route, its literal positions, its raw parameters)
    type Candidate<'a> = (&'static Spec, Vec<bool>, Vec<(String, &'a str)>);
    let mut best: Option<Candidate<'_>> = None;
    for spec in SPECS {
        let method_ok = spec.0 == *method || (spec.0 == Method::GET && *method == Method::HEAD);
        let tpl: Vec<&str> = spec.1[1..].split('/').collect();
        if !method_ok || tpl.len() != segs.len() {
            continue;
        }
        let mut params = Vec::new();
        let ok = tpl.iter().zip(&segs).all(|(t, s)| match t.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
            Some(name) => {
                params.push((name.to_owned(), *s));
                !s.is_empty()
            }
            None => t == s,
        });
        let literals: Vec<bool> = tpl.iter().map(|t| !t.starts_with('{')).collect();
        if ok && best.as_ref().is_none_or(|(_, l, _)| literals > *l) {
            best = Some((spec, literals, params));
        }
    }
    let (spec, _, params) = best?;
    let decoded = params.into_iter().map(|(n, v)| Some((n, decode(v)?))).collect::<Option<HashMap<_, _>>>();
    Some((spec, decoded))
}

async fn serve_axum(log: &Log) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum_app(log);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

async fn serve_hyper(log: &Log) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = log.clone();
    let inner = service_fn(move |req: Request<hyper::body::Incoming>| {
        let (parts, _) = req.into_parts();
        let res = match dispatch(&parts.method, parts.uri.path()) {
            None => Response::builder().status(StatusCode::NOT_FOUND).body(Full::new(Bytes::new())).unwrap(),
            Some((_, None)) => {
                Response::builder().status(StatusCode::BAD_REQUEST).body(Full::new(Bytes::new())).unwrap()
            }
            Some((spec, Some(params))) => Response::new(Full::new(Bytes::from(handle(&log, spec, &params, &parts)))),
        };
        async move { Ok::<_, Infallible>(res) }
    });
    let svc = ServiceBuilder::new().layer(layer()).service(inner);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let svc = hyper_util::service::TowerToHyperService::new(svc.clone());
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
            });
        }
    });
    addr
}

/// `%XX` for one byte, in lower or upper case hex.
fn esc(b: u8, upper: bool) -> String {
    if upper { format!("%{b:02X}") } else { format!("%{b:02x}") }
}

/// Sample paths of every route (parameters given plain values and the neighbouring literals),
/// and escaped spellings of each: every byte of a segment alone, a whole segment, the whole path.
fn variants() -> Vec<(Method, String)> {
    let mut samples: Vec<(Method, String)> = Vec::new();
    for (method, path, _) in SPECS {
        for value in ["7", "new", "index", "master", "x"] {
            let p = path.split('/').map(|s| if s.starts_with('{') { value } else { s }).collect::<Vec<_>>().join("/");
            samples.push((method.clone(), p));
        }
    }
    samples.sort_by(|a, b| (a.0.as_str(), &a.1).cmp(&(b.0.as_str(), &b.1)));
    samples.dedup();
    let mut out = Vec::new();
    for (method, path) in samples {
        let segs: Vec<&str> = path[1..].split('/').collect();
        let join = |segs: &[String]| format!("/{}", segs.join("/"));
        out.push((method.clone(), path.clone()));
        for upper in [false, true] {
            let whole: Vec<String> = segs.iter().map(|s| s.bytes().map(|b| esc(b, upper)).collect()).collect();
            out.push((method.clone(), join(&whole)));
            for (i, seg) in segs.iter().enumerate() {
                let mut v: Vec<String> = segs.iter().map(|s| s.to_string()).collect();
                v[i] = seg.bytes().map(|b| esc(b, upper)).collect();
                out.push((method.clone(), join(&v)));
                for j in 0..seg.len() {
                    let mut one = seg[..j].to_owned();
                    one.push_str(&esc(seg.as_bytes()[j], upper));
                    one.push_str(&seg[j + 1..]);
                    let mut v: Vec<String> = segs.iter().map(|s| s.to_string()).collect();
                    v[i] = one;
                    out.push((method.clone(), join(&v)));
                }
            }
        }
    }
    out.sort_by(|a, b| (a.0.as_str(), &a.1).cmp(&(b.0.as_str(), &b.1)));
    out.dedup();
    out
}

fn table_access(method: &Method, target: &str) -> Access {
    let (parts, _) = Request::builder().method(method.clone()).uri(target).body(()).unwrap().into_parts();
    table().map(&parts)
}

/// The route that ran, from the body, as a spec.
fn ran(body: &str) -> Option<&'static Spec> {
    SPECS.iter().find(|s| format!("{} {}", s.0, s.1) == body)
}

/// Checks one response against the table: a handler ran only if the table asked for exactly
/// what its route needs (with the router's parameters), and never for "deny" unless public.
fn agree(how: &str, method: &Method, target: &str, token: &str, status: u16, body: &str) {
    let access = table_access(method, target);
    let path = target.split('?').next().unwrap_or_default();
    let routed = dispatch(method, path);
    let Some(spec) = ran(body) else {
        assert_ne!(status, 200, "{how}: {method} {target} as {token}: 200 from no handler: {body}");
        return;
    };
    assert_eq!(status, 200, "{how}: {method} {target} as {token}");
    let (routed_spec, params) = routed.expect("the reference router finds the route axum/hyper ran");
    assert_eq!(routed_spec.1, spec.1, "{how}: {method} {target}: the reference router agrees with the real one");
    let want = match need(spec, &params.unwrap_or_default()) {
        None => Access::Public,
        Some(p) => Access::Requires(p),
    };
    assert_eq!(access, want, "{how}: {method} {target} ran {} but the table says {access:?}", spec.1);
    assert!(token == "allow" || want == Access::Public, "{how}: {method} {target} ran {} for {token}", spec.1);
}

const TOKENS: [&str; 2] = ["allow", "deny"];

#[tokio::test]
async fn the_table_judges_the_route_axum_runs() {
    let log = Log::default();
    let app = axum_app(&log);
    let variants = variants();
    assert!(variants.len() > 200, "{}", variants.len());
    for (method, target) in &variants {
        for token in TOKENS {
            let req = Request::builder()
                .method(method.clone())
                .uri(target.as_str())
                .header("authorization", format!("Bearer {token}"))
                .body(axum::body::Body::empty())
                .unwrap();
            let res = app.clone().oneshot(req).await.unwrap();
            let status = res.status().as_u16();
            let body = axum::body::to_bytes(res.into_body(), 1 << 16).await.unwrap();
            agree("axum", method, target, token, status, &String::from_utf8_lossy(&body));
        }
    }
    let violations = log.0.lock().unwrap().clone();
    assert!(violations.is_empty(), "handlers ran without their permission:\n{}", violations.join("\n"));
}

/// Every variant, as "allow" and "deny", on one keep-alive connection to a served app.
async fn over_tcp(how: &str, log: &Log, addr: SocketAddr) {
    let mut conn = Conn::connect(addr).await;
    for (method, target) in &variants() {
        for token in TOKENS {
            let auth = format!("Bearer {token}");
            let reply = conn
                .send(method.as_str(), target, &[("authorization", &auth)])
                .await
                .unwrap_or_else(|e| panic!("{how}: {method} {target}: {e}"));
            agree(how, method, target, token, reply.status, &reply.body);
        }
    }
    let violations = log.0.lock().unwrap().clone();
    assert!(violations.is_empty(), "{how}: handlers ran without their permission:\n{}", violations.join("\n"));
}

#[tokio::test]
async fn the_table_judges_the_route_axum_runs_over_tcp() {
    let log = Log::default();
    over_tcp("axum over tcp", &log, serve_axum(&log).await).await;
}

#[tokio::test]
async fn the_table_judges_the_route_a_plain_hyper_service_runs_over_tcp() {
    let log = Log::default();
    over_tcp("hyper over tcp", &log, serve_hyper(&log).await).await;
}

/// The hole as reported, spelled out.
#[tokio::test]
async fn an_escaped_public_literal_is_the_parameter_route_it_reaches() {
    let log = Log::default();
    let app = axum_app(&log);
    let send = |target: &'static str, token: &'static str| {
        let app = app.clone();
        async move {
            let req = Request::get(target)
                .header("authorization", format!("Bearer {token}"))
                .body(axum::body::Body::empty())
                .unwrap();
            let res = app.oneshot(req).await.unwrap();
            let status = res.status();
            let body = axum::body::to_bytes(res.into_body(), 1 << 16).await.unwrap();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
    };
    assert_eq!(send("/documents/new", "deny").await, (StatusCode::OK, "GET /documents/new".to_owned()));
    assert_eq!(send("/documents/ne%77", "deny").await.0, StatusCode::FORBIDDEN);
    assert_eq!(send("/documents/ne%77", "allow").await, (StatusCode::OK, "GET /documents/{id}".to_owned()));
    assert_eq!(
        table_access(&Method::GET, "/documents/ne%77"),
        Access::Requires(Permission::new("documents:new", "read"))
    );
    // The stronger literal, escaped, is the weaker parameter route, checked as such.
    assert_eq!(
        table_access(&Method::GET, "/vault/m%61ster"),
        Access::Requires(Permission::new("vault:master", "read"))
    );
    assert_eq!(send("/vault/m%61ster", "allow").await, (StatusCode::OK, "GET /vault/{item}".to_owned()));
    // An escaped literal with no parameter route beside it reaches nothing, in either.
    assert_eq!(table_access(&Method::GET, "/h%65alth"), Access::Unmapped);
    assert_eq!(send("/h%65alth", "allow").await.0, StatusCode::FORBIDDEN);
    // Path tricks still match nothing.
    for target in
        ["/documents/%2e%2e", "/documents/a%2fb", "/documents/%00", "/documents/%zz", "/files/..", "/vault//x"]
    {
        assert_eq!(table_access(&Method::GET, target), Access::Unmapped, "{target}");
        assert_eq!(send(target, "allow").await.0, StatusCode::FORBIDDEN, "{target}");
    }
    let violations = log.0.lock().unwrap().clone();
    assert!(violations.is_empty(), "handlers ran without their permission:\n{}", violations.join("\n"));
}
