//! The code paths of the fuzz targets (`fuzz/`) on fixed inputs, so that they run under
//! `cargo test --all-features`: shared-tier envelopes, the route table, and principal headers,
//! each on a corpus of tricky inputs with the outcome asserted. Inputs minimised from fuzzer
//! crashes go here too, with the target and date they came from.
//!
//! Needs the unstable `internals` feature (`--all-features`); compiles to nothing without it.

#![cfg(feature = "internals")]

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use hmac::{Hmac, Mac};
use http::request::Parts;
use http::{HeaderName, HeaderValue, Method, Request, Uri};
use sha2::Sha256;
use tower_authz_cache::__internals::{Envelope, SecretKeys, parse_bearer};
use tower_authz_cache::{
    Access, BearerToken, BoxError, MapPermission, Permission, Principal, ResolvePrincipal, RouteTable, TrustedHeader,
};

// ---------------------------------------------------------------------------------------------
// Envelopes (fuzz target `envelope`).

const SECRET: &[u8] = b"fuzz secret, 32 bytes long......";
const TAG: usize = 32;

struct Fixture {
    keys: SecretKeys,
    id: [u8; 32],
    other_id: [u8; 32],
    other_keys: SecretKeys,
}

/// The `computed_at` of the hand-built version 2 headers.
const COMPUTED_AT: u64 = 1_700_000_000_000;

fn fixture() -> Fixture {
    let keys = SecretKeys::derive(SECRET);
    Fixture {
        id: keys.key_id("bob", "documents:1", "read"),
        other_id: keys.key_id("bob", "documents:2", "read"),
        other_keys: SecretKeys::derive(b"another secret, 32 bytes long..."),
        keys,
    }
}

/// Seals an arbitrary body as the crate does (HMAC-SHA256 under the derived MAC key over key id
/// and body), to reach the parser behind the MAC. Checked against a genuine encoding below.
fn seal(id: &[u8], body: &[u8]) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(SECRET).unwrap();
    m.update(b"tower-authz-cache mac v1");
    let mac_key: [u8; 32] = m.finalize().into_bytes().into();
    let mut m = Hmac::<Sha256>::new_from_slice(&mac_key).unwrap();
    m.update(id);
    m.update(body);
    let mut out = body.to_vec();
    out.extend_from_slice(&m.finalize().into_bytes());
    out
}

/// Decodes under the fixture; whatever is accepted must re-encode to exactly the same bytes (a
/// version 1 envelope, still read, to the version 1 encoding of what it decoded to) and be
/// refused under another key id and another secret.
fn decode(f: &Fixture, bytes: &[u8]) -> Result<Envelope, String> {
    let got = Envelope::decode(bytes, &f.keys, &f.id);
    if let Ok(env) = &got {
        let genuine = if bytes[0] == 1 { v1_encoding(f, env) } else { env.encode(&f.keys, &f.id) };
        assert_eq!(genuine, bytes, "accepted bytes are not a genuine encoding");
        assert!(Envelope::decode(bytes, &f.keys, &f.other_id).is_err());
        assert!(Envelope::decode(bytes, &f.other_keys, &f.id).is_err());
    }
    got
}

/// The version 1 encoding (as 0.1 wrote it: no `computed_at`) of an envelope.
fn v1_encoding(f: &Fixture, env: &Envelope) -> Vec<u8> {
    let reason = env.reason.as_deref().unwrap_or("");
    let mut body = vec![1, u8::from(env.allowed)];
    body.extend_from_slice(&env.valid_until_ms.to_be_bytes());
    for e in env.epochs {
        body.extend_from_slice(&e.to_be_bytes());
    }
    body.extend_from_slice(&(reason.len() as u16).to_be_bytes());
    body.extend_from_slice(reason.as_bytes());
    seal(&f.id, &body)
}

/// An envelope header: version 2's layout (with `computed_at`) for any version but 1.
fn header(version: u8, flags: u8, declared_len: u16) -> Vec<u8> {
    let mut body = vec![version, flags];
    body.extend_from_slice(&1_700_000_060_000u64.to_be_bytes());
    if version != 1 {
        body.extend_from_slice(&COMPUTED_AT.to_be_bytes());
    }
    for e in [1u64, 2, 3, 4] {
        body.extend_from_slice(&e.to_be_bytes());
    }
    body.extend_from_slice(&declared_len.to_be_bytes());
    body
}

#[test]
fn envelope_seal_replica_matches_the_crate() {
    let f = fixture();
    let env = Envelope {
        allowed: true,
        reason: Some("ok".into()),
        valid_until_ms: 5,
        computed_at_ms: 3,
        epochs: [1, 2, 3, 4],
    };
    let genuine = env.encode(&f.keys, &f.id);
    assert_eq!(seal(&f.id, &genuine[..genuine.len() - TAG]), genuine);
}

#[test]
fn envelopes_round_trip_to_their_normal_form() {
    let f = fixture();
    let long_ascii = "r".repeat(1500);
    // 'é' is 2 bytes: 1024 is a boundary; '€' is 3 bytes: 1024 is not (cut to 1023).
    let long_e = "é".repeat(700);
    let long_euro = "€".repeat(400);
    let cases: Vec<(Option<&str>, Option<&str>)> = vec![
        (None, None),
        (Some(""), None),
        (Some("x"), Some("x")),
        (Some("\0"), Some("\0")),
        (Some("\u{202e}evil\r\n"), Some("\u{202e}evil\r\n")),
        (Some(&long_ascii), Some(&long_ascii[..1024])),
        (Some(&long_e), Some(&long_e[..1024])),
        (Some(&long_euro), Some(&long_euro[..1023])),
    ];
    for (allowed, until, epochs) in [(true, 0, [0; 4]), (false, u64::MAX, [u64::MAX; 4]), (true, 1 << 56, [1, 0, 0, 1])]
    {
        for (reason, want) in &cases {
            let env = Envelope {
                allowed,
                reason: reason.map(str::to_owned),
                valid_until_ms: until,
                computed_at_ms: until / 2,
                epochs,
            };
            let bytes = env.encode(&f.keys, &f.id);
            let got = decode(&f, &bytes).unwrap();
            assert_eq!(got, Envelope { reason: want.map(str::to_owned), ..env });
        }
    }
}

#[test]
fn only_genuine_envelopes_verify() {
    let f = fixture();
    let env = Envelope {
        allowed: false,
        reason: Some("no".into()),
        valid_until_ms: 9,
        computed_at_ms: 8,
        epochs: [1, 2, 3, 4],
    };
    let genuine = env.encode(&f.keys, &f.id);
    assert!(decode(&f, &genuine).is_ok());
    let mut edited: Vec<Vec<u8>> = Vec::new();
    for i in 0..genuine.len() {
        for bit in 0..8 {
            let mut b = genuine.clone();
            b[i] ^= 1 << bit;
            edited.push(b);
        }
        let mut removed = genuine.clone();
        removed.remove(i);
        edited.push(removed);
        let mut inserted = genuine.clone();
        inserted.insert(i, 0);
        edited.push(inserted);
    }
    edited.extend((0..genuine.len()).map(|n| genuine[..n].to_vec()));
    edited.push([genuine.as_slice(), &[0]].concat());
    edited.push([genuine.as_slice(), genuine.as_slice()].concat());
    // Allow forged from the deny: flip the flag (MAC no longer matches).
    let mut forged = genuine.clone();
    forged[1] = 1;
    edited.push(forged);
    // Garbage of every interesting length.
    for n in [0, 1, 43, 44, 51, 52, 75, 76, 77, 83, 84, 85, 1100, 70_000] {
        edited.push(vec![1; n]);
        edited.push(vec![0; n]);
        edited.push(vec![0xff; n]);
    }
    for bytes in edited {
        assert!(decode(&f, &bytes).is_err(), "{} bytes verified", bytes.len());
    }
    // A genuine envelope under another tuple's key id.
    let other = env.encode(&f.keys, &f.other_id);
    assert_eq!(decode(&f, &other).unwrap_err(), "envelope mac mismatch");
}

#[test]
fn authentic_but_malformed_bodies_are_refused() {
    let f = fixture();
    let with = |mut body: Vec<u8>, tail: &[u8]| {
        body.extend_from_slice(tail);
        body
    };
    let refused: Vec<(&str, Vec<u8>)> = vec![
        ("version 0", with(header(0, 1, 0), b"")),
        ("version 3", with(header(3, 1, 0), b"")),
        ("a v1 header labelled 2", {
            let mut v1 = header(1, 1, 0);
            v1[0] = 2;
            v1
        }),
        ("a v2 header labelled 1", {
            let mut v2 = header(2, 1, 0);
            v2[0] = 1;
            v2
        }),
        ("header cut short", header(2, 1, 0)[..51].to_vec()),
        ("v1 header cut short", header(1, 1, 0)[..43].to_vec()),
        ("empty body", Vec::new()),
    ];
    let mut refused = refused;
    for version in [1, 2] {
        refused.extend([
            ("flags 2", with(header(version, 2, 0), b"")),
            ("flags 3", with(header(version, 3, 0), b"")),
            ("flags 0x81", with(header(version, 0x81, 0), b"")),
            ("declared 5, has 4", with(header(version, 1, 5), b"abcd")),
            ("declared 3, has 4", with(header(version, 1, 3), b"abcd")),
            ("declared 0, has 1", with(header(version, 1, 0), b"a")),
            ("declared 65535, has 0", with(header(version, 1, u16::MAX), b"")),
            ("reason over 1024", with(header(version, 0, 1025), &[b'a'; 1025])),
            ("reason not utf-8", with(header(version, 0, 2), b"\xc3\x28")),
            ("reason overlong utf-8", with(header(version, 0, 2), b"\xc0\xae")),
            ("reason lone surrogate", with(header(version, 0, 3), b"\xed\xa0\x80")),
        ]);
    }
    for (what, body) in refused {
        assert!(decode(&f, &seal(&f.id, &body)).is_err(), "{what}");
    }
    let envelope = |allowed: bool, reason: Option<String>, computed_at_ms: u64| Envelope {
        allowed,
        reason,
        valid_until_ms: 1_700_000_060_000,
        computed_at_ms,
        epochs: [1, 2, 3, 4],
    };
    let accepted: Vec<(Vec<u8>, Envelope)> = vec![
        (header(2, 0, 0), envelope(false, None, COMPUTED_AT)),
        (with(header(2, 1, 1024), &[b'z'; 1024]), envelope(true, Some("z".repeat(1024)), COMPUTED_AT)),
        // Version 1, as 0.1 wrote it: still read, its age unknown.
        (header(1, 0, 0), envelope(false, None, 0)),
        (with(header(1, 1, 1024), &[b'z'; 1024]), envelope(true, Some("z".repeat(1024)), 0)),
    ];
    for (body, want) in accepted {
        assert_eq!(decode(&f, &seal(&f.id, &body)), Ok(want));
    }
}

// ---------------------------------------------------------------------------------------------
// The route table (fuzz target `route`).

fn table() -> RouteTable {
    RouteTable::new()
        .public("/")
        .public("/health")
        .public("/static/{file}")
        .public_route(Method::OPTIONS, "/documents/{id}")
        .route(Method::GET, "/documents/{id}", "documents:{id}", "read")
        .route(Method::GET, "/documents/new", "documents", "create")
        .route(Method::PUT, "/documents/{id}", "documents:{id}", "write")
        .route(Method::DELETE, "/documents/{id}", "documents:{id}", "delete")
        .route(Method::POST, "/documents", "documents", "create")
        .route(Method::PUT, "/admin/users/{user}/role", "admin:users:{user}", "manage")
        .route(Method::GET, "/orgs/{org}/docs/{doc}", "orgs:{org}:docs:{doc}", "read")
        .route(Method::GET, "/orgs/{org}/{kind}/{id}", "orgs:{org}:{kind}:{id}", "list")
        .route(Method::GET, "/orgs/{org}/docs/shared", "orgs:{org}:shared", "read")
        .route(Method::GET, "/{tenant}/files/{name}", "tenants:{tenant}:files:{name}", "read")
        .route(Method::PATCH, "/a/{p1}/{p2}/{p3}/{p4}/{p5}", "a{p1}-{p2}-{p3}-{p4}-{p5}", "patch")
}

fn map(t: &RouteTable, method: Method, uri: &str) -> Access {
    let uri: Uri = uri.parse().unwrap_or_else(|e| panic!("{uri:?}: {e}"));
    let mut req = Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    t.map(&req.into_parts().0)
}

fn requires(resource: &str, action: &str) -> Access {
    Access::Requires(Permission::new(resource, action))
}

#[test]
fn route_table_maps_the_intended_routes() {
    let t = table();
    let cases: Vec<(Method, &str, Access)> = vec![
        (Method::GET, "/", Access::Public),
        (Method::DELETE, "/health", Access::Public),
        (Method::GET, "/static/app.js", Access::Public),
        (Method::OPTIONS, "/documents/7", Access::Public),
        (Method::GET, "/documents/7", requires("documents:7", "read")),
        (Method::HEAD, "/documents/7", requires("documents:7", "read")),
        (Method::DELETE, "/documents/7", requires("documents:7", "delete")),
        (Method::POST, "/documents/7", Access::Unmapped),
        (Method::GET, "/documents/new", requires("documents", "create")),
        (Method::HEAD, "/documents/new", requires("documents", "create")),
        (Method::PUT, "/documents/new", requires("documents:new", "write")),
        (Method::POST, "/documents", requires("documents", "create")),
        (Method::GET, "/documents", Access::Unmapped),
        // Literals earliest win, whatever the order of addition.
        (Method::GET, "/orgs/acme/docs/shared", requires("orgs:acme:shared", "read")),
        (Method::GET, "/orgs/acme/docs/42", requires("orgs:acme:docs:42", "read")),
        (Method::GET, "/orgs/acme/files/42", requires("orgs:acme:files:42", "list")),
        (Method::GET, "/orgs/files/x", requires("tenants:orgs:files:x", "read")),
        (Method::PUT, "/admin/users/bob/role", requires("admin:users:bob", "manage")),
        // Literals match the raw segment (as axum's router does), parameters are decoded (as
        // axum's `Path` is): an escaped literal is not that literal, and may be a parameter.
        (Method::GET, "/docum%65nts/7", Access::Unmapped),
        (Method::GET, "/h%65alth", Access::Unmapped),
        (Method::GET, "/documents/ne%77", requires("documents:new", "read")),
        (Method::PUT, "/admin/%75sers/bob/role", Access::Unmapped),
        (Method::GET, "/orgs/acme/docs/sh%61red", requires("orgs:acme:docs:shared", "read")),
        (Method::GET, "/orgs/acme/d%6fcs/42", requires("orgs:acme:docs:42", "list")),
        (Method::GET, "/docum%65nts/files/x", requires("tenants:documents:files:x", "read")),
        (Method::GET, "/static/%2E%2Fapp.js", Access::Unmapped),
        // Absolute-form targets and queries do not matter.
        (Method::GET, "/documents/%37", requires("documents:7", "read")),
        (Method::GET, "/documents/caf%C3%A9", requires("documents:café", "read")),
        (Method::GET, "http://evil.example/documents/7?x=/../admin#f", requires("documents:7", "read")),
        (Method::GET, "/documents/7?/../../admin/users/bob/role", requires("documents:7", "read")),
        // Not a control character (Cf), so it may be part of a name.
        (Method::GET, "/documents/%E2%80%AE7", requires("documents:\u{202e}7", "read")),
        // Extension methods match nothing but public-for-every-method routes.
        (Method::from_bytes(b"PURGE").unwrap(), "/documents/7", Access::Unmapped),
        (Method::from_bytes(b"PURGE").unwrap(), "/health", Access::Public),
        (Method::OPTIONS, "*", Access::Unmapped),
    ];
    for (method, uri, want) in cases {
        assert_eq!(map(&t, method.clone(), uri), want, "{method} {uri}");
    }
}

#[test]
fn route_table_path_tricks_match_nothing() {
    let t = table();
    let long_ok = format!("/documents/{}", "a".repeat(2048 - "/documents/".len()));
    let long = format!("/documents/{}", "a".repeat(2049 - "/documents/".len()));
    let deep = format!("/orgs{}", "/x".repeat(32));
    assert_eq!(map(&t, Method::GET, &long_ok), requires(&format!("documents:{}", &long_ok[11..]), "read"));
    let paths = [
        long.as_str(),
        deep.as_str(),
        "//documents/7",
        "/documents//7",
        "/documents/7/",
        "/health/",
        "/documents/.",
        "/documents/..",
        "/documents/%2e",
        "/documents/%2E%2e",
        "/documents/.%2e",
        "/documents/%2e.",
        "/health/../documents/7",
        "/health/%2e%2e/documents/7",
        "/documents/7/..",
        "/static/..%2fdocuments",
        "/documents/7%2fdelete",
        "/documents/7%2Fdelete",
        "/documents/a%5cb",
        "/documents/a%5Cb",
        "/documents/a\\b",
        // Percent tricks: bad escapes, a sign where a hex digit goes (u8::from_str_radix takes
        // "+a"), overlong and invalid UTF-8, C0/C1 controls and DEL.
        "/documents/%",
        "/documents/%2",
        "/documents/%zz",
        "/documents/%+a",
        "/documents/%+2f",
        "/documents/%-1",
        "/documents/%c0%ae%c0%ae",
        "/documents/%c0%af",
        "/documents/%ed%a0%80",
        "/documents/%c3",
        "/documents/%ff",
        "/documents/%00",
        "/documents/%0a",
        "/documents/%09",
        "/documents/%7f",
        "/documents/%c2%85",
        // A parameter cannot reach into another resource's name.
        "/documents/7:delete",
        "/documents/7%3adelete",
        "/documents/%2a",
        "/documents/*",
        "/orgs/a:docs:b/docs/c",
        "/orgs/a/docs/b%3Ashared",
        "/admin/users/bob:admin/role",
    ];
    for path in paths {
        for method in [Method::GET, Method::HEAD, Method::PUT, Method::DELETE, Method::OPTIONS] {
            assert_eq!(map(&t, method.clone(), path), Access::Unmapped, "{method} {path:?}");
        }
    }
}

#[test]
fn resource_templates_with_other_separators_are_ambiguous() {
    // Documented behaviour worth knowing: only `:` (and `*`) are kept out of parameters, so a
    // template separating parameters with anything else maps distinct paths to one resource.
    let t = table();
    let a = map(&t, Method::PATCH, "/a/x-y/z/1/2/3");
    let b = map(&t, Method::PATCH, "/a/x/y-z/1/2/3");
    assert_eq!(a, requires("ax-y-z-1-2-3", "patch"));
    assert_eq!(a, b);
}

// ---------------------------------------------------------------------------------------------
// Principal headers (fuzz target `headers`).

fn parts(name: &str, values: &[&[u8]]) -> Parts {
    let mut req = Request::get("/");
    for v in values {
        req = req.header(name, HeaderValue::from_bytes(v).unwrap());
    }
    req.body(()).unwrap().into_parts().0
}

fn ready<T>(f: impl Future<Output = T>) -> T {
    match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("pending"),
    }
}

#[test]
fn parse_bearer_accepts_exactly_one_token68() {
    let max = format!("Bearer {}", "a".repeat(4096));
    let over = format!("Bearer {}", "a".repeat(4097));
    let padded_max = format!("Bearer {}==", "a".repeat(4094));
    // The bound is on the whole value: spaces count.
    let spaced = format!("Bearer {}a", " ".repeat(4096));
    let ok: Vec<(&[u8], &str)> = vec![
        (b"Bearer abc", "abc"),
        (b"bearer abc", "abc"),
        (b"BeArEr abc", "abc"),
        (b"Bearer    abc   ", "abc"),
        (b"Bearer a-._~+/Z9", "a-._~+/Z9"),
        (b"Bearer abc==", "abc=="),
        (b"Bearer /", "/"),
        (max.as_bytes(), &max[7..]),
        (padded_max.as_bytes(), &padded_max[7..]),
    ];
    for (value, token) in ok {
        let p = parts("authorization", &[value]);
        let got = parse_bearer(&p).unwrap_or_else(|e| panic!("{value:?}: {}", e.reason()));
        assert_eq!(got, token);
        assert!(std::str::from_utf8(value).unwrap().contains(got));
    }
    let invalid: Vec<&[u8]> = vec![
        b"",
        b"Bearer",
        b"Bearer ",
        b"Bearer      ",
        b"Bearerabc",
        b" Bearer abc",
        b"Bearer\tabc",
        b"Bearer abc\t",
        b"Bearer a b",
        b"Bearer =",
        b"Bearer ==",
        b"Bearer a=b",
        b"Bearer a,b",
        b"Bearer \"abc\"",
        b"Bearer abc;",
        b"Basic YWxhZGRpbjpvcGVuc2VzYW1l",
        b"Bearer2 abc",
        b"Bearer caf\xc3\xa9",
        b"Bearer \xff",
        over.as_bytes(),
        spaced.as_bytes(),
    ];
    for value in invalid {
        let e = parse_bearer(&parts("authorization", &[value])).unwrap_err();
        assert!(e.is_invalid(), "{value:?}");
    }
    assert!(parse_bearer(&parts("authorization", &[])).unwrap_err().is_missing());
    let repeated: [&[&[u8]]; 3] = [&[b"Bearer a", b"Bearer a"], &[b"Bearer a", b""], &[b"", b"Bearer a", b"x"]];
    for values in repeated {
        assert!(parse_bearer(&parts("authorization", values)).unwrap_err().is_invalid(), "{values:?}");
    }
}

#[test]
fn bearer_challenges_stay_valid_whatever_the_realm() {
    let realms = ["", "api", "a\"b\\c", "line\r\nInjected: yes", "caf\u{e9} \u{202e}", "\0\x7f", &"r".repeat(10_000)];
    for realm in realms {
        let bearer =
            BearerToken::new(
                |t: String| async move { Ok::<_, BoxError>((t == "good").then(|| Principal::new("bob"))) },
            )
            .with_realm(realm);
        let refused: [&[&[u8]]; 4] = [&[], &[b"Bearer a b"], &[b"Bearer nope"], &[b"Bearer good", b"Bearer good"]];
        for values in refused {
            let e = ready(bearer.resolve(&parts("authorization", values))).unwrap_err();
            let challenge = e.challenge().expect("a 401 carries a challenge").to_str().expect("visible ascii");
            assert!(challenge.starts_with("Bearer"), "{challenge:?}");
            assert!(!challenge.contains(['\r', '\n']), "{challenge:?}");
        }
        assert_eq!(ready(bearer.resolve(&parts("authorization", &[b"Bearer good"]))).unwrap().id(), "bob");
    }
}

#[test]
fn trusted_header_takes_one_clean_value_as_is() {
    let r = TrustedHeader::new(HeaderName::from_static("x-user-id"));
    let resolve = |values: &[&[u8]]| ready(r.resolve(&parts("x-user-id", values)));
    let max = "u".repeat(256);
    for id in ["alice", "a:b*c", "~!@#$%^&*()_+{}|<>?", max.as_str()] {
        assert_eq!(resolve(&[id.as_bytes()]).unwrap().id(), id);
    }
    let over = "u".repeat(257);
    for bad in [&b""[..], b"a b", b"\ta", b"a\t", b"caf\xc3\xa9", b"\xff", over.as_bytes()] {
        assert!(resolve(&[bad]).unwrap_err().is_invalid(), "{bad:?}");
    }
    assert!(resolve(&[]).unwrap_err().is_missing());
    assert!(resolve(&[b"alice", b"alice"]).unwrap_err().is_invalid());
    assert!(resolve(&[b"alice", b""]).unwrap_err().is_invalid());
}
