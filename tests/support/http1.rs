//! A minimal HTTP/1.1 client over one keep-alive TCP connection: it sends the request target
//! byte for byte (no normalisation, no re-encoding), and tells a response apart from a dropped
//! connection.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response as read off the wire.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    /// Header lines, names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// One client connection.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    pub async fn connect(addr: SocketAddr) -> Conn {
        Conn { stream: TcpStream::connect(addr).await.expect("connect to the test server"), buf: Vec::new() }
    }

    /// Sends `method target` with the given extra header lines and reads the response; `Err`
    /// when the server closed the connection (or sent garbage) instead of answering.
    pub async fn send(&mut self, method: &str, target: &str, headers: &[(&str, &str)]) -> Result<Reply, String> {
        let mut req = format!("{method} {target} HTTP/1.1\r\nhost: test\r\n");
        for (n, v) in headers {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        req.push_str("\r\n");
        self.stream.write_all(req.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
        tokio::time::timeout(Duration::from_secs(10), self.read_reply())
            .await
            .map_err(|_| "no response within 10 s".to_owned())?
    }

    async fn read_reply(&mut self) -> Result<Reply, String> {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            self.fill().await?;
        };
        let head = String::from_utf8(self.buf[..head_end].to_vec()).map_err(|e| e.to_string())?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .ok_or_else(|| format!("no content-length in {head:?}"))?;
        let body_start = head_end + 4;
        while self.buf.len() < body_start + len {
            self.fill().await?;
        }
        let body = String::from_utf8_lossy(&self.buf[body_start..body_start + len]).into_owned();
        self.buf.drain(..body_start + len);
        Ok(Reply { status, headers, body })
    }

    async fn fill(&mut self) -> Result<(), String> {
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk).await {
            Ok(0) => Err("connection closed by the server".to_owned()),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e) => Err(format!("read: {e}")),
        }
    }
}
