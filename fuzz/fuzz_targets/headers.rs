//! Principal headers: 0 to 3 arbitrary `Authorization` values into `parse_bearer` and
//! `BearerToken`, the same values as a `TrustedHeader` (`x-user-id`). No panic, and:
//!
//! - `parse_bearer` accepts exactly one header of the form `<bearer, any case> SP+ token68 SP*`
//!   (RFC 7235 token68) of at most 4103 bytes (4096 + "Bearer "); the token is then a substring
//!   of the header;
//! - `BearerToken` resolves to the principal its lookup gives for that token, and every refusal
//!   carries a `Bearer` challenge, whatever the realm;
//! - `TrustedHeader` accepts exactly one non-empty visible-ASCII value of at most 256 bytes, as is.
//!
//! Input: byte 0 gives the number of headers (mod 4); the rest is split on NUL (which a header
//! value cannot hold) into the values, then a realm.

#![no_main]

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use http::{HeaderName, HeaderValue, Request};
use libfuzzer_sys::fuzz_target;
use tower_authz_cache::__internals::parse_bearer;
use tower_authz_cache::{BearerToken, BoxError, Principal, ResolveError, ResolvePrincipal, TrustedHeader};

fn ready<T>(f: impl Future<Output = T>) -> T {
    match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("resolution is synchronous here"),
    }
}

fn is_token68(t: &str) -> bool {
    let body = t.trim_end_matches('=');
    !body.is_empty()
        && body.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/'))
}

/// The token the grammar gives for one header value, independently of the crate.
fn expected_token(value: &[u8]) -> Option<&str> {
    // The bound is on the whole value: a token of at most 4096 bytes after "Bearer ".
    if value.len() > 4096 + 7 {
        return None;
    }
    let s = std::str::from_utf8(value).ok().filter(|s| s.is_ascii())?;
    if s.len() < 7 || !s[..7].eq_ignore_ascii_case("bearer ") {
        return None;
    }
    let token = s[7..].trim_matches(' ');
    is_token68(token).then_some(token)
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let mut pieces = rest.split(|&b| b == 0);
    let values: Vec<&[u8]> = pieces.by_ref().take(usize::from(n % 4)).collect();
    let realm = pieces.next().map(String::from_utf8_lossy);
    let Ok(values) = values.iter().map(|v| HeaderValue::from_bytes(v)).collect::<Result<Vec<_>, _>>() else {
        return;
    };

    let mut req = Request::get("/");
    for v in &values {
        req = req.header(http::header::AUTHORIZATION, v.clone()).header("x-user-id", v.clone());
    }
    let (parts, ()) = req.body(()).unwrap().into_parts();

    // parse_bearer.
    let parsed = parse_bearer(&parts);
    let want = match values.as_slice() {
        [v] => expected_token(v.as_bytes()),
        _ => None,
    };
    match &parsed {
        Ok(token) => {
            assert_eq!(values.len(), 1);
            let header = values[0].to_str().unwrap();
            assert!(is_token68(token) && token.len() <= 4096, "{token:?}");
            assert!(header.contains(token), "{token:?} not in {header:?}");
            assert!(header.ends_with(token) || header.trim_end_matches(' ').ends_with(token));
            assert_eq!(Some(*token), want, "{header:?}");
        }
        Err(e) => {
            assert_eq!(want, None, "refused a valid header {values:?}: {}", e.reason());
            assert_eq!(e.is_missing(), values.is_empty());
            assert!(e.is_missing() || e.is_invalid());
        }
    }

    // BearerToken: the lookup knows every token but "unknown", fails on "down".
    let bearer = BearerToken::new(|token: String| async move {
        match token.as_str() {
            "down" => Err::<Option<Principal>, BoxError>("store down".into()),
            "unknown" => Ok(None),
            t => Ok(Some(Principal::new(format!("user:{t}")))),
        }
    });
    let bearer = match &realm {
        Some(r) => bearer.with_realm(r),
        None => bearer,
    };
    let check_challenge = |e: &ResolveError| {
        let c = e.challenge().expect("a 401 carries a challenge").to_str().expect("visible ASCII");
        assert!(c.starts_with("Bearer"), "{c:?}");
    };
    match (ready(bearer.resolve(&parts)), &parsed) {
        (Ok(p), Ok(token)) => assert_eq!(p.id(), format!("user:{token}")),
        (Err(e), Ok("down")) => assert!(e.is_unavailable()),
        (Err(e), Ok("unknown")) => {
            assert!(e.is_invalid());
            check_challenge(&e);
        }
        (Err(e), Err(_)) => {
            assert!(e.is_missing() || e.is_invalid());
            check_challenge(&e);
        }
        (got, parsed) => panic!("BearerToken gave {:?} for {parsed:?}", got.map(|p| p.id().to_owned())),
    }

    // TrustedHeader.
    let trusted = ready(TrustedHeader::new(HeaderName::from_static("x-user-id")).resolve(&parts));
    match values.as_slice() {
        [] => assert!(trusted.unwrap_err().is_missing()),
        [v] => {
            let b = v.as_bytes();
            if !b.is_empty() && b.len() <= 256 && b.iter().all(u8::is_ascii_graphic) {
                assert_eq!(trusted.unwrap().id().as_bytes(), b);
            } else {
                assert!(trusted.unwrap_err().is_invalid());
            }
        }
        _ => assert!(trusted.unwrap_err().is_invalid()),
    }
});
