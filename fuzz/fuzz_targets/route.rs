//! `RouteTable` on arbitrary methods and request targets: no panic, and the outcome is the one a
//! reference matcher written from the `RouteTable` documentation gives:
//!
//! - matching is per segment; a literal matches the raw segment byte for byte (as axum's router,
//!   matchit, compares it), a parameter takes the percent-decoded segment (as axum's `Path`);
//! - a path with an empty segment (`//`, a trailing `/`), a `.` or `..` segment (also encoded), an
//!   encoded `/` or `\`, a control character, invalid UTF-8 or a bad escape, more than 2 KiB or
//!   more than 32 segments matches nothing (`Unmapped`, not even a public route);
//! - a parameter value never contains `:` or `*`, so a resource name always has the shape of its
//!   template (it cannot reach into another resource);
//! - literals earliest win, then the route added first; `GET` routes cover `HEAD`.
//!
//! Plus metamorphic checks: changing the case of an escape's hex digits never changes the
//! outcome; percent-encoding one more byte of the path keeps the outcome when the winning route
//! reads that segment as a parameter, never lets the winning route match when it reads it as a
//! literal, and never makes an unmatched path match.

#![no_main]

use std::sync::LazyLock;

use http::request::Parts;
use http::{Method, Request, Uri};
use libfuzzer_sys::fuzz_target;
use tower_authz_cache::{Access, MapPermission, Permission, RouteTable};

/// (method, or `None` for public on every method; path template; resource template; action;
/// `None` action for a public route).
type Spec = (Option<Method>, &'static str, &'static str, Option<&'static str>);

static SPECS: LazyLock<Vec<Spec>> = LazyLock::new(|| {
    vec![
        (None, "/", "", None),
        (None, "/health", "", None),
        (None, "/static/{file}", "", None),
        (Some(Method::OPTIONS), "/documents/{id}", "", None),
        (Some(Method::GET), "/documents/{id}", "documents:{id}", Some("read")),
        (Some(Method::GET), "/documents/new", "documents", Some("create")),
        (Some(Method::PUT), "/documents/{id}", "documents:{id}", Some("write")),
        (Some(Method::DELETE), "/documents/{id}", "documents:{id}", Some("delete")),
        (Some(Method::POST), "/documents", "documents", Some("create")),
        (Some(Method::PUT), "/admin/users/{user}/role", "admin:users:{user}", Some("manage")),
        (Some(Method::GET), "/orgs/{org}/docs/{doc}", "orgs:{org}:docs:{doc}", Some("read")),
        (Some(Method::GET), "/orgs/{org}/{kind}/{id}", "orgs:{org}:{kind}:{id}", Some("list")),
        (Some(Method::GET), "/orgs/{org}/docs/shared", "orgs:{org}:shared", Some("read")),
        (Some(Method::GET), "/{tenant}/files/{name}", "tenants:{tenant}:files:{name}", Some("read")),
        (Some(Method::PATCH), "/a/{p1}/{p2}/{p3}/{p4}/{p5}", "a{p1}-{p2}-{p3}-{p4}-{p5}", Some("patch")),
    ]
});

static TABLE: LazyLock<RouteTable> = LazyLock::new(|| {
    SPECS.iter().fold(RouteTable::new(), |t, (method, path, resource, action)| match (method, action) {
        (None, _) => t.public(path),
        (Some(m), None) => t.public_route(m.clone(), path),
        (Some(m), Some(a)) => t.route(m.clone(), path, resource, a),
    })
});

const METHODS: [Method; 9] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::PATCH,
    Method::OPTIONS,
    Method::TRACE,
    Method::CONNECT,
];

fn unhex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// The (raw, decoded) segments, or `None` when the path must match nothing.
fn segments(path: &str) -> Option<Vec<(&str, String)>> {
    if path.len() > 2048 {
        return None;
    }
    let rest = path.strip_prefix('/')?;
    if rest.is_empty() {
        return Some(Vec::new());
    }
    let mut out = Vec::new();
    for raw in rest.split('/') {
        let rb = raw.as_bytes();
        let mut bytes = Vec::new();
        let mut i = 0;
        while i < rb.len() {
            if rb[i] == b'%' {
                let (h, l) = (unhex(*rb.get(i + 1)?)?, unhex(*rb.get(i + 2)?)?);
                bytes.push(h << 4 | l);
                i += 3;
            } else {
                bytes.push(rb[i]);
                i += 1;
            }
        }
        let seg = String::from_utf8(bytes).ok()?;
        if seg.is_empty() || seg == "." || seg == ".." || seg.chars().any(|c| c == '/' || c == '\\' || c.is_control()) {
            return None;
        }
        out.push((raw, seg));
    }
    (out.len() <= 32).then_some(out)
}

fn template(path: &str) -> Vec<Option<&str>> {
    path.split('/').skip(1).filter(|s| !s.is_empty()).map(|s| (!s.starts_with('{')).then_some(s)).collect()
}

/// The index in `SPECS` of the route that wins, or `None` when none matches.
fn winner(method: &Method, segs: &[(&str, String)]) -> Option<usize> {
    let mut best: Option<(usize, Vec<bool>)> = None;
    for (idx, spec) in SPECS.iter().enumerate() {
        let (m, p, _, _) = spec;
        let method_ok = match m {
            None => true,
            Some(m) => m == method || (*m == Method::GET && *method == Method::HEAD),
        };
        let tpl = template(p);
        if !method_ok || tpl.len() != segs.len() {
            continue;
        }
        let ok = tpl.iter().zip(segs).all(|(t, (raw, decoded))| match t {
            Some(lit) => lit == raw,
            None => !decoded.contains([':', '*']),
        });
        let literals: Vec<bool> = tpl.iter().map(Option::is_some).collect();
        // Literals earliest win (lexicographic on the literal positions), then the first added.
        if ok && best.as_ref().is_none_or(|(_, l)| literals > *l) {
            best = Some((idx, literals));
        }
    }
    best.map(|(idx, _)| idx)
}

fn reference(method: &Method, path: &str) -> Access {
    let Some(segs) = segments(path) else {
        return Access::Unmapped;
    };
    let Some(idx) = winner(method, &segs) else {
        return Access::Unmapped;
    };
    let (_, p, resource, action) = &SPECS[idx];
    let Some(action) = action else {
        return Access::Public;
    };
    // Parameter names in the path template, in order, with their segment index.
    let names: Vec<(&str, usize)> = p
        .split('/')
        .skip(1)
        .enumerate()
        .filter_map(|(i, s)| Some((s.strip_prefix('{')?.strip_suffix('}')?, i)))
        .collect();
    let mut out = String::new();
    let mut rest = *resource;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..].find('}').unwrap() + open;
        let name = &rest[open + 1..close];
        let (_, i) = names.iter().find(|(n, _)| *n == name).unwrap();
        out.push_str(&segs[*i].1);
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    Access::Requires(Permission::new(out, *action))
}

fn parts(method: &Method, uri: Uri) -> Parts {
    let mut req = Request::new(());
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri;
    req.into_parts().0
}

fn check(method: &Method, uri: Uri) -> Access {
    let path = uri.path().to_owned();
    let got = TABLE.map(&parts(method, uri));
    assert_eq!(got, reference(method, &path), "{method} {path:?}");

    // Spelled-out invariants (implied by the reference, stated for the reader).
    let lower = path.to_ascii_lowercase();
    let dot_segment = path.split('/').any(|s| {
        let s = s.to_ascii_lowercase();
        s == "." || s == ".." || s == "%2e" || s == "%2e%2e" || s == ".%2e" || s == "%2e."
    });
    if dot_segment || lower.contains("%2f") || lower.contains("%5c") || path.contains("//") {
        assert_eq!(got, Access::Unmapped, "{method} {path:?}");
    }
    if let Access::Requires(p) = &got {
        let colons = p.resource().matches(':').count();
        let allowed = SPECS
            .iter()
            .filter(|(_, _, _, a)| *a == Some(p.action()))
            .any(|(_, _, r, _)| r.matches(':').count() == colons);
        assert!(allowed, "{method} {path:?} -> {p:?}: a parameter reached into the resource name");
        assert!(!p.resource().contains('*'));
    }
    got
}

/// Percent-encodes the byte at `at` of the path (when it is not `/` nor part of an escape); also
/// gives the index of the segment it is in.
fn encode_one(path: &str, at: usize, upper: bool) -> Option<(String, usize)> {
    let bytes = path.as_bytes();
    let at = at % bytes.len().max(1);
    let b = *bytes.get(at)?;
    let in_escape = (at >= 1 && bytes[at - 1] == b'%') || (at >= 2 && bytes[at - 2] == b'%');
    if b == b'/' || b == b'%' || in_escape {
        return None;
    }
    let esc = if upper { format!("%{b:02X}") } else { format!("%{b:02x}") };
    let mut out = bytes[..at].to_vec();
    out.extend_from_slice(esc.as_bytes());
    out.extend_from_slice(&bytes[at + 1..]);
    // The path starts with `/`: the segment index is the number of `/` before `at`, minus one.
    let segment = bytes[..at].iter().filter(|&&c| c == b'/').count().checked_sub(1)?;
    Some((String::from_utf8(out).ok()?, segment))
}

/// Flips the case of every escape's hex digits.
fn flip_escape_case(path: &str) -> String {
    let mut out = path.as_bytes().to_vec();
    let mut i = 0;
    while i < out.len() {
        if out[i] == b'%' && i + 2 < out.len() {
            for j in [i + 1, i + 2] {
                let c = out[j];
                out[j] = if c.is_ascii_lowercase() { c.to_ascii_uppercase() } else { c.to_ascii_lowercase() };
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    String::from_utf8(out).unwrap_or_default()
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let (method, rest) = match sel as usize % 12 {
        i if i < METHODS.len() => (METHODS[i].clone(), rest),
        _ => {
            // An extension method spelled by the input, up to the first space.
            let (m, r) = rest.split_at(rest.iter().position(|&b| b == b' ').unwrap_or(0));
            (Method::from_bytes(m).unwrap_or(Method::GET), r.get(1..).unwrap_or(r))
        }
    };
    // Half the time the bytes are a path (so that most inputs parse), else a whole target.
    let target: Vec<u8> = if sel & 0x80 == 0 { [b"/".as_slice(), rest].concat() } else { rest.to_vec() };
    let Ok(uri) = Uri::try_from(target.as_slice()) else {
        return;
    };
    let path = uri.path().to_owned();
    let got = check(&method, uri);

    if !path.starts_with('/') {
        return;
    }
    let at = usize::from(rest.first().copied().unwrap_or(0)) | usize::from(rest.last().copied().unwrap_or(0)) << 8;
    let flipped = flip_escape_case(&path);
    if let Ok(uri) = Uri::try_from(flipped.as_str()) {
        assert_eq!(check(&method, uri), got, "{path:?} vs {flipped:?}");
    }
    let Some((variant, segment)) = encode_one(&path, at, sel & 0x40 != 0) else {
        return;
    };
    if variant.len() > 2048 && path.len() <= 2048 {
        return;
    }
    let Ok(uri) = Uri::try_from(variant.as_str()) else {
        return;
    };
    let after = check(&method, uri);
    // The decoded segments are the same, so the tricks are too; only literals can stop matching.
    let Some(segs) = segments(&path) else {
        assert_eq!(after, Access::Unmapped, "{path:?} vs {variant:?}");
        return;
    };
    match winner(&method, &segs) {
        None => assert_eq!(after, Access::Unmapped, "{path:?} vs {variant:?}"),
        Some(w) => match template(SPECS[w].1).get(segment) {
            // A parameter: the same decoded value, the same winner.
            Some(None) => assert_eq!(after, got, "{path:?} vs {variant:?}"),
            // A literal: an escaped spelling of it is not it.
            _ => {
                let variant_segs = segments(&variant).expect("the same decoded segments");
                assert_ne!(winner(&method, &variant_segs), Some(w), "{path:?} vs {variant:?}");
            }
        },
    }
});
