//! A minimal HTTP/1.1 keep-alive client: connect, write a request, read a response.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::workload::{DEMO_USERS, Kind, Req, Tokens};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ErrKind {
    Connect,
    Timeout,
    Closed,
    Io,
    Protocol,
    Unsent,
}
pub(crate) const ERR_KINDS: [ErrKind; 6] =
    [ErrKind::Connect, ErrKind::Timeout, ErrKind::Closed, ErrKind::Io, ErrKind::Protocol, ErrKind::Unsent];

impl ErrKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            ErrKind::Connect => "connect",
            ErrKind::Timeout => "timeout",
            ErrKind::Closed => "closed by peer",
            ErrKind::Io => "i/o",
            ErrKind::Protocol => "bad response",
            ErrKind::Unsent => "unsent at stop",
        }
    }
}
pub(crate) const MAX_HEAD: usize = 64 << 10;
pub(crate) const MAX_BODY: usize = 16 << 20;
pub(crate) async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ErrKind> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        _ => Err(ErrKind::Connect),
    }
}
pub(crate) fn write_request(buf: &mut String, host: &str, req: Req, tokens: Tokens) {
    buf.clear();
    struct Token(Tokens, u32);
    impl std::fmt::Display for Token {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match *self {
                Token(_, 0) => f.write_str("alice-token"),
                Token(Tokens::Population, n) => write!(f, "user-{n}"),
                Token(Tokens::Demo, n) => write!(f, "{}-token", DEMO_USERS[(n as usize - 1) % 3]),
            }
        }
    }
    let token = Token(tokens, req.who(tokens));
    let _ = match req.kind {
        Kind::Read => write!(
            buf,
            "GET /documents/{} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\r\n",
            req.resource
        ),
        Kind::Write => write!(
            buf,
            "PUT /documents/{} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n",
            req.resource
        ),
        Kind::Admin => {
            write!(buf, "GET /admin/stats HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\r\n")
        }
    };
}
pub(crate) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) keep_alive: bool,
    pub(crate) body: std::ops::Range<usize>,
}
/// Writes one request and reads one response into `rbuf`: a status line, headers and a
/// `Content-Length` body (none for 204 and 304). Anything else (chunked, no length, extra bytes,
/// 1xx) is an error, after which the caller drops the connection.
pub(crate) async fn exchange(stream: &mut TcpStream, req: &[u8], rbuf: &mut Vec<u8>) -> Result<Response, ErrKind> {
    stream.write_all(req).await.map_err(|_| ErrKind::Io)?;
    rbuf.clear();
    let mut scanned: usize = 0;
    let head_end = loop {
        if rbuf.len() >= MAX_HEAD {
            return Err(ErrKind::Protocol);
        }
        rbuf.reserve(4096);
        if stream.read_buf(rbuf).await.map_err(|_| ErrKind::Io)? == 0 {
            return Err(ErrKind::Closed);
        }
        let from = scanned.saturating_sub(3);
        if let Some(p) = find(&rbuf[from..], b"\r\n\r\n") {
            break from + p + 4;
        }
        scanned = rbuf.len();
    };
    let head = std::str::from_utf8(&rbuf[..head_end]).map_err(|_| ErrKind::Protocol)?;
    let mut lines = head.split("\r\n");
    let (version, rest) = lines.next().and_then(|l| l.split_once(' ')).ok_or(ErrKind::Protocol)?;
    let mut keep_alive = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Err(ErrKind::Protocol),
    };
    let code = rest.get(..3).filter(|c| c.bytes().all(|b| b.is_ascii_digit())).ok_or(ErrKind::Protocol)?;
    let status: u16 = code.parse().map_err(|_| ErrKind::Protocol)?;
    let mut length = None;
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').ok_or(ErrKind::Protocol)?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            if length.is_some() {
                return Err(ErrKind::Protocol);
            }
            length = Some(value.parse::<usize>().map_err(|_| ErrKind::Protocol)?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ErrKind::Protocol);
        } else if name.eq_ignore_ascii_case("connection") {
            let v = value.to_ascii_lowercase();
            if v.contains("close") {
                keep_alive = false;
            } else if v.contains("keep-alive") {
                keep_alive = true;
            }
        }
    }
    let length = match (status, length) {
        (100..=199, _) => return Err(ErrKind::Protocol),
        (204 | 304, _) => 0,
        (_, Some(n)) if n <= MAX_BODY => n,
        _ => return Err(ErrKind::Protocol),
    };
    let end = head_end + length;
    while rbuf.len() < end {
        rbuf.reserve(end - rbuf.len());
        if stream.read_buf(rbuf).await.map_err(|_| ErrKind::Io)? == 0 {
            return Err(ErrKind::Closed);
        }
    }
    if rbuf.len() > end {
        return Err(ErrKind::Protocol);
    }
    Ok(Response { status, keep_alive, body: head_end..end })
}
