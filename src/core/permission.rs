//! What a request needs: [`Permission`], the [`MapPermission`] plug-in point and the built-in
//! [`RouteTable`].
//!
//! ```
//! use http::{Method, Request};
//! use tower_authz_cache::{Access, MapPermission, Permission, RouteTable};
//!
//! let table = RouteTable::new()
//!     .public("/health")
//!     .route(Method::GET, "/documents/{id}", "documents:{id}", "read")
//!     .route(Method::DELETE, "/documents/{id}", "documents:{id}", "delete");
//!
//! let (parts, _) = Request::delete("/documents/7").body(()).unwrap().into_parts();
//! assert_eq!(table.map(&parts), Access::Requires(Permission::new("documents:7", "delete")));
//!
//! let (parts, _) = Request::get("/health").body(()).unwrap().into_parts();
//! assert_eq!(table.map(&parts), Access::Public);
//!
//! // Anything the table does not know is denied, and path tricks never widen a match.
//! for path in ["/documents", "/documents/7/", "/documents//7", "/documents/%2e%2e", "/health/../documents/7"] {
//!     let (parts, _) = Request::get(path).body(()).unwrap().into_parts();
//!     assert_eq!(table.map(&parts), Access::Unmapped, "{path}");
//! }
//! ```

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use http::Method;
use http::request::Parts;

/// What a request needs: an action on a resource, e.g. `read` on `documents:7`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Permission {
    resource: Arc<str>,
    action: Arc<str>,
}

impl Permission {
    /// `action` on `resource`.
    pub fn new(resource: impl Into<Arc<str>>, action: impl Into<Arc<str>>) -> Self {
        Self { resource: resource.into(), action: action.into() }
    }

    /// The resource, e.g. `documents:7`.
    pub fn resource(&self) -> &str {
        &self.resource
    }

    /// The action, e.g. `read`.
    pub fn action(&self) -> &str {
        &self.action
    }

    pub(crate) fn resource_arc(&self) -> &Arc<str> {
        &self.resource
    }

    pub(crate) fn action_arc(&self) -> &Arc<str> {
        &self.action
    }
}

impl fmt::Debug for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Permission({} {})", self.action, self.resource)
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.action, self.resource)
    }
}

/// What a request needs before it may reach the inner service.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Access {
    /// No authorization: the request goes straight through.
    Public,
    /// The caller must hold this permission.
    Requires(Permission),
    /// No rule covers this request: it is denied (403).
    Unmapped,
}

impl From<Option<Permission>> for Access {
    /// `None` means public, as in [`MapPermission`] closures.
    fn from(p: Option<Permission>) -> Self {
        match p {
            Some(p) => Access::Requires(p),
            None => Access::Public,
        }
    }
}

impl From<Permission> for Access {
    fn from(p: Permission) -> Self {
        Access::Requires(p)
    }
}

/// Maps a request to the [`Access`] it needs.
///
/// Implemented for closures `Fn(&Parts) -> impl Into<Access>`, so `Option<Permission>` works
/// (`None` = public); the built-in is [`RouteTable`].
///
/// Under [`CachedAuthorizationLayer`](crate::CachedAuthorizationLayer), a panic in `map` is
/// caught: the request gets 503 (never public) and an audit event, and the service keeps serving.
///
/// ```
/// use http::request::Parts;
/// use tower_authz_cache::{MapPermission, Permission};
///
/// fn assert_mapper(_: impl MapPermission) {}
/// assert_mapper(|parts: &Parts| {
///     (parts.uri.path() != "/health").then(|| Permission::new("app", "use"))
/// });
/// ```
pub trait MapPermission: Send + Sync + 'static {
    /// The access this request needs.
    fn map(&self, parts: &Parts) -> Access;
}

impl<F, R> MapPermission for F
where
    F: Fn(&Parts) -> R + Send + Sync + 'static,
    R: Into<Access>,
{
    fn map(&self, parts: &Parts) -> Access {
        self(parts).into()
    }
}

/// Longest path the route table looks at; longer paths are unmapped.
const MAX_PATH_LEN: usize = 2048;
/// Most segments the route table looks at; deeper paths are unmapped.
const MAX_SEGMENTS: usize = 32;

#[derive(Clone, Debug)]
enum Seg {
    Literal(Box<str>),
    Param,
}

#[derive(Clone, Debug)]
enum Part {
    Literal(Box<str>),
    /// The value of the path segment at this index.
    Segment(usize),
}

#[derive(Clone, Debug)]
enum Target {
    Public,
    Permission { resource: Box<[Part]>, action: Arc<str> },
}

#[derive(Clone, Debug)]
struct Route {
    method: Option<Method>,
    segments: Box<[Seg]>,
    target: Target,
}

/// Method + path template -> resource template + action.
///
/// - Templates are `/documents/{id}`: literal segments and `{name}` parameters, one per segment.
/// - A resource template uses the parameters: `documents:{id}`.
/// - A `GET` route also covers `HEAD`.
/// - When several routes match, the one with literals earliest wins (`/documents/new` beats
///   `/documents/{id}`), then the one added first.
/// - Unmapped requests get [`Access::Unmapped`] (403); [`RouteTable::public`] lists the open ones.
///
/// # Paths and percent-escapes
///
/// The table reads the path the way axum's router (matchit) and `Path` extractor do, so that it
/// always judges the route that will run:
///
/// - A literal segment matches exactly the raw bytes of the request's path segment, as
///   matchit compares them: no decoding, no case folding. `/docum%65nts/7` and `/documents/ne%77`
///   do not match the literals `documents` and `new` (axum would not dispatch them there either);
///   `/documents/ne%77` matches `/documents/{id}` with `id = "new"`, as axum does.
/// - A parameter takes the whole segment, percent-decoded (UTF-8), as `axum::extract::Path`
///   hands it to the handler: `/documents/%37` names `documents:7`. So the resource checked is the
///   one the handler sees.
///
/// Every segment is still decoded to be checked, and a path with an empty segment (`//`, a
/// trailing `/`), a `.` or `..` segment (also encoded as `%2e`), an encoded `/` or `\`, a control
/// character (raw or encoded), a bad escape (`%zz`, `%+a`, a lone `%`), invalid UTF-8, or more
/// than 2 KiB or 32 segments matches nothing, not even a public route. These are stricter than
/// axum, never looser: where the two differ the table says [`Access::Unmapped`] (403).
///
/// A parameter value may not contain `:` or `*`, so it cannot reach into another resource's name;
/// keep parameters apart with `:` in resource templates (`orgs:{org}:docs:{doc}`, not
/// `{org}-{doc}`), or two paths can name one resource.
///
/// Behind a router that decodes the path before dispatching, or rewrites it (nesting that strips a
/// prefix, a normalising proxy in the same process), give the table the path that router
/// dispatches on: put the layer where it sees the same `uri().path()` as the router.
///
/// Builder methods panic on a malformed template, as `axum::Router::route` does: templates are
/// code, not input.
#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    /// An empty table: everything is unmapped.
    pub fn new() -> Self {
        Self::default()
    }

    /// `method path` needs `action` on `resource`.
    ///
    /// # Panics
    ///
    /// If `path` is not a valid template, or `resource` uses a parameter `path` does not have.
    #[must_use]
    pub fn route(mut self, method: Method, path: &str, resource: &str, action: &str) -> Self {
        let (segments, names) = parse_path_template(path);
        let positions: Vec<usize> =
            segments.iter().enumerate().filter(|(_, s)| matches!(s, Seg::Param)).map(|(i, _)| i).collect();
        let resource = parse_resource_template(resource, &names)
            .into_iter()
            .map(|p| match p {
                Part::Segment(param) => Part::Segment(positions[param]),
                lit => lit,
            })
            .collect();
        self.routes.push(Route {
            method: Some(method),
            segments,
            target: Target::Permission { resource, action: action.into() },
        });
        self
    }

    /// `path` is public for every method.
    ///
    /// # Panics
    ///
    /// If `path` is not a valid template.
    #[must_use]
    pub fn public(mut self, path: &str) -> Self {
        let (segments, _) = parse_path_template(path);
        self.routes.push(Route { method: None, segments, target: Target::Public });
        self
    }

    /// `method path` is public.
    ///
    /// # Panics
    ///
    /// If `path` is not a valid template.
    #[must_use]
    pub fn public_route(mut self, method: Method, path: &str) -> Self {
        let (segments, _) = parse_path_template(path);
        self.routes.push(Route { method: Some(method), segments, target: Target::Public });
        self
    }

    fn lookup(&self, method: &Method, path: &str) -> Access {
        // `Copy` segments of 6 bytes: no drop glue for the 32 slots; decoded spellings (a `%` in
        // the path, rare) live beside them.
        let mut buf = [Segment::EMPTY; MAX_SEGMENTS];
        let mut decoded = Vec::new();
        let Some(n) = split_path(path, &mut buf, &mut decoded) else {
            return Access::Unmapped;
        };
        let segments = &buf[..n];
        let mut best: Option<(&Route, u64)> = None;
        for route in &self.routes {
            if !method_matches(route.method.as_ref(), method) || route.segments.len() != n {
                continue;
            }
            let mut score = 0u64;
            let mut ok = true;
            for (i, (seg, value)) in route.segments.iter().zip(segments).enumerate() {
                match seg {
                    Seg::Literal(lit) => {
                        // The raw bytes, as the router compares them: a template literal has no
                        // `%`, so an escaped spelling of it never matches.
                        if **lit != *value.raw(path) {
                            ok = false;
                            break;
                        }
                        score |= 1 << (63 - i);
                    }
                    Seg::Param => {
                        if value.reserved {
                            ok = false;
                            break;
                        }
                    }
                }
            }
            if ok && best.is_none_or(|(_, s)| score > s) {
                best = Some((route, score));
            }
        }
        let Some((route, _)) = best else {
            return Access::Unmapped;
        };
        match &route.target {
            Target::Public => Access::Public,
            Target::Permission { resource, action } => {
                let resource = concat(resource.iter().map(|part| match part {
                    Part::Literal(l) => &**l,
                    Part::Segment(i) => segments[*i].text(path, &decoded),
                }));
                Access::Requires(Permission { resource, action: action.clone() })
            }
        }
    }
}

/// The pieces of a resource name, joined into the one allocation the `Arc<str>` needs (through a
/// stack buffer when it is short, as resource names are).
fn concat<'a>(pieces: impl Iterator<Item = &'a str> + Clone) -> Arc<str> {
    let len: usize = pieces.clone().map(str::len).sum();
    let mut buf = [0u8; 128];
    if len > buf.len() {
        return Arc::from(pieces.collect::<String>());
    }
    let mut at = 0;
    for piece in pieces {
        buf[at..at + piece.len()].copy_from_slice(piece.as_bytes());
        at += piece.len();
    }
    // Whole `str`s end to end are UTF-8; the check is a formality on a short ASCII run.
    match std::str::from_utf8(&buf[..at]) {
        Ok(text) => Arc::from(text),
        Err(_) => Arc::from(String::from_utf8_lossy(&buf[..at]).as_ref()),
    }
}

impl MapPermission for RouteTable {
    fn map(&self, parts: &Parts) -> Access {
        self.lookup(&parts.method, parts.uri.path())
    }
}

fn method_matches(route: Option<&Method>, method: &Method) -> bool {
    match route {
        None => true,
        Some(m) => m == method || (*m == Method::GET && *method == Method::HEAD),
    }
}

/// One path segment: where it sits in the path (what literals match) and, when it had a `%`, the
/// index of its percent-decoded spelling (what parameters take) in the decoded list.
#[derive(Clone, Copy)]
struct Segment {
    start: u16,
    end: u16,
    decoded: u8,
    /// The decoded spelling holds a `:` or a `*` (no parameter may take it).
    reserved: bool,
}

impl Segment {
    /// `decoded` when the segment had no `%` (so that an empty slot is all zeros); otherwise
    /// `decoded` is the index in the list plus one.
    const SAME: u8 = 0;
    const EMPTY: Segment = Segment { start: 0, end: 0, decoded: Self::SAME, reserved: false };

    /// The spelling as sent.
    fn raw<'p>(&self, path: &'p str) -> &'p str {
        path.get(usize::from(self.start)..usize::from(self.end)).unwrap_or_default()
    }

    /// The decoded spelling.
    fn text<'s>(&self, path: &'s str, decoded: &'s [String]) -> &'s str {
        match self.decoded {
            Self::SAME => self.raw(path),
            i => decoded.get(usize::from(i - 1)).map_or("", String::as_str),
        }
    }
}

/// Byte classes for the one pass over a path (bits, or'ed over a segment).
const RESERVED: u8 = 1;
/// `%`, `\`, a control character or a non-ASCII byte: the segment takes the slow path.
const SLOW: u8 = 2;
const SLASH: u8 = 4;
static CLASS: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = match b as u8 {
            b'/' => SLASH,
            b':' | b'*' => RESERVED,
            b'%' | b'\\' | 0..0x20 | 0x7f.. => SLOW,
            _ => 0,
        };
        b += 1;
    }
    table
};

/// Splits and decodes a request path into `out` (decoded spellings into `decoded`); `None` when
/// it must match nothing. One pass classifies every byte; only a segment with a `%`, a `\`, a
/// control character or a non-ASCII byte is looked at again (and decoded).
fn split_path(path: &str, out: &mut [Segment; MAX_SEGMENTS], decoded: &mut Vec<String>) -> Option<usize> {
    let bytes = path.as_bytes();
    if bytes.len() > MAX_PATH_LEN || bytes.first() != Some(&b'/') {
        return None;
    }
    if bytes.len() == 1 {
        return Some(0);
    }
    let mut n = 0;
    let mut start = 1;
    let mut flags = 0u8;
    for i in 1..=bytes.len() {
        let class = bytes.get(i).map_or(SLASH, |b| CLASS[usize::from(*b)]);
        if class != SLASH {
            flags |= class;
            continue;
        }
        let slot = out.get_mut(n)?;
        *slot = segment(path, start, i, flags, decoded)?;
        n += 1;
        start = i + 1;
        flags = 0;
    }
    Some(n)
}

/// The segment `path[start..end]`, whose bytes' classes or'ed are `flags`; `None` when it must
/// match nothing.
fn segment(path: &str, start: usize, end: usize, flags: u8, decoded: &mut Vec<String>) -> Option<Segment> {
    let raw = path.get(start..end)?;
    // `MAX_PATH_LEN` keeps offsets within u16.
    let (start, end) = (u16::try_from(start).ok()?, u16::try_from(end).ok()?);
    if flags & SLOW == 0 {
        if raw.is_empty() || raw == "." || raw == ".." {
            return None;
        }
        return Some(Segment { start, end, decoded: Segment::SAME, reserved: flags & RESERVED != 0 });
    }
    let seg = percent_decode(raw)?;
    let forbidden = if seg.is_ascii() {
        seg.bytes().any(|b| b == b'/' || b == b'\\' || b.is_ascii_control())
    } else {
        seg.chars().any(|c| c == '/' || c == '\\' || c.is_control())
    };
    if seg.is_empty() || seg == "." || seg == ".." || forbidden {
        return None;
    }
    let reserved = seg.bytes().any(|b| b == b':' || b == b'*');
    Some(match seg {
        Cow::Borrowed(_) => Segment { start, end, decoded: Segment::SAME, reserved },
        Cow::Owned(text) => {
            decoded.push(text);
            Segment { start, end, decoded: u8::try_from(decoded.len()).ok()?, reserved }
        }
    })
}

fn percent_decode(raw: &str) -> Option<Cow<'_, str>> {
    if !raw.contains('%') {
        return Some(raw.into());
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            // Two hex digits, nothing else (`from_str_radix` would also take a sign: `%+a`).
            let digit = |j: usize| bytes.get(j).and_then(|b| (*b as char).to_digit(16));
            let (hi, lo) = (digit(i + 1)?, digit(i + 2)?);
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().map(Into::into)
}

fn parse_path_template(path: &str) -> (Box<[Seg]>, Vec<String>) {
    let rest = path.strip_prefix('/').unwrap_or_else(|| panic!("route template {path:?} must start with '/'"));
    let mut names = Vec::new();
    let mut segments = Vec::new();
    if !rest.is_empty() {
        for raw in rest.split('/') {
            assert!(!raw.is_empty(), "route template {path:?} has an empty segment");
            if let Some(name) = raw.strip_prefix('{').and_then(|r| r.strip_suffix('}')) {
                assert!(
                    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "route template {path:?}: bad parameter name {name:?}"
                );
                assert!(!names.iter().any(|n| n == name), "route template {path:?} repeats {{{name}}}");
                names.push(name.to_owned());
                segments.push(Seg::Param);
            } else {
                assert!(
                    !raw.contains(['{', '}', '%']) && raw != "." && raw != "..",
                    "route template {path:?}: bad segment {raw:?}"
                );
                segments.push(Seg::Literal(raw.into()));
            }
        }
    }
    (segments.into(), names)
}

fn parse_resource_template(template: &str, names: &[String]) -> Vec<Part> {
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            parts.push(Part::Literal(rest[..open].into()));
        }
        let close =
            rest[open..].find('}').unwrap_or_else(|| panic!("resource template {template:?} has an unclosed '{{'"))
                + open;
        let name = &rest[open + 1..close];
        let idx = names
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("resource template {template:?} uses {{{name}}}, which the path does not have"));
        parts.push(Part::Segment(idx));
        rest = &rest[close + 1..];
    }
    assert!(!rest.contains('}'), "resource template {template:?} has a stray '}}'");
    if !rest.is_empty() {
        parts.push(Part::Literal(rest.into()));
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable {
        RouteTable::new()
            .public("/health")
            .route(Method::GET, "/documents/{id}", "documents:{id}", "read")
            .route(Method::GET, "/documents/new", "documents", "create")
            .route(Method::PUT, "/admin/users/{user}/role", "admin", "manage")
            .route(Method::GET, "/orgs/{org}/docs/{doc}", "orgs:{org}:docs:{doc}", "read")
    }

    fn req(t: &RouteTable, method: Method, path: &str) -> Access {
        t.lookup(&method, path)
    }

    #[test]
    fn maps_templates_per_segment() {
        let t = table();
        assert_eq!(req(&t, Method::GET, "/documents/7"), Access::Requires(Permission::new("documents:7", "read")));
        assert_eq!(req(&t, Method::HEAD, "/documents/7"), Access::Requires(Permission::new("documents:7", "read")));
        assert_eq!(req(&t, Method::GET, "/documents/new"), Access::Requires(Permission::new("documents", "create")));
        assert_eq!(req(&t, Method::GET, "/orgs/a/docs/b"), Access::Requires(Permission::new("orgs:a:docs:b", "read")));
        assert_eq!(req(&t, Method::GET, "/documents/%31"), Access::Requires(Permission::new("documents:1", "read")));
        assert_eq!(
            req(&t, Method::GET, "/documents/caf%C3%A9"),
            Access::Requires(Permission::new("documents:café", "read"))
        );
        assert_eq!(req(&t, Method::POST, "/health"), Access::Public);
        assert_eq!(req(&t, Method::DELETE, "/documents/7"), Access::Unmapped);
    }

    /// Literals match the raw segment, as axum's router does; only parameters are decoded.
    #[test]
    fn literals_match_raw_bytes_and_parameters_are_decoded() {
        let t = table();
        // An escaped spelling of a literal is not that literal: the parameter route beside it
        // takes the segment, decoded, as the router and `Path` would.
        for path in ["/documents/ne%77", "/documents/%6Eew", "/documents/%6e%65%77"] {
            assert_eq!(
                req(&t, Method::GET, path),
                Access::Requires(Permission::new("documents:new", "read")),
                "{path}"
            );
        }
        for path in ["/h%65alth", "/%68ealth", "/docum%65nts/7", "/admin/%75sers/bob/role", "/orgs/a/d%6fcs/b"] {
            for method in [Method::GET, Method::PUT, Method::POST] {
                assert_eq!(req(&t, method.clone(), path), Access::Unmapped, "{method} {path}");
            }
        }
    }

    #[test]
    fn path_tricks_never_widen_a_match() {
        let t = table();
        let long = format!("/documents/{}", "a".repeat(4096));
        let deep = "/x".repeat(40);
        for path in [
            "",
            "/",
            "//documents/7",
            "/documents//7",
            "/documents/7/",
            "/documents/..",
            "/documents/.",
            "/documents/%2e%2e",
            "/documents/%2E",
            "/documents/a%2Fb",
            "/documents/a%5cb",
            "/documents/%00",
            "/documents/%zz",
            "/documents/%+a",
            "/documents/a%+1b",
            "/documents/%-0",
            "/documents/%c3",
            "/documents/%ff",
            "/health/../documents/7",
            "/health/",
            "/documents/7:delete",
            "/documents/*",
            "/orgs/a:docs:b/docs/c",
            long.as_str(),
            deep.as_str(),
            "/documents/a\nb",
        ] {
            assert_eq!(req(&t, Method::GET, path), Access::Unmapped, "{path:?}");
        }
    }

    #[test]
    #[should_panic(expected = "does not have")]
    fn resource_template_must_use_known_params() {
        let _ = RouteTable::new().route(Method::GET, "/a/{id}", "a:{other}", "read");
    }
}
