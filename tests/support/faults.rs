//! Fault helpers of the fault matrix (`tests/fault_matrix.rs`) that the plain [`FaultProxy`]
//! cannot express:
//!
//! - [`SplitProxy`]: a loopback TCP proxy in front of Postgres that tells a `LISTEN` connection
//!   (the backplane / change feed) from the pool's connections, so that either side can be cut
//!   while the other keeps working (a partition of the backplane, or of the data path).
//! - [`OwnedRedis`]: a `redis-server` process of the test's own, on a free loopback port, that can
//!   be killed and restarted empty on the same port. The shared Redis is never touched.
//!
//! [`FaultProxy`]: super::proxy::FaultProxy
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// What one class of connections of a [`SplitProxy`] currently suffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Forward bytes both ways.
    Pass,
    /// Hold the connection, forward nothing; leaving this mode resets the held connections.
    BlackHole,
    /// Reset the connections of this class (new ones are reset once classified).
    Down,
}

#[derive(Debug, Clone, Copy)]
struct SplitState {
    listen: Cut,
    data: Cut,
    shutdown: bool,
}

/// A loopback proxy that applies one [`Cut`] to connections that sent a `LISTEN` (the Postgres
/// backplane) and another to every other connection (the data path). A connection is a data
/// connection until its client sends `LISTEN`; the chunk that carries it already obeys the
/// listener's cut.
pub struct SplitProxy {
    addr: SocketAddr,
    state: watch::Sender<SplitState>,
    listeners: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl std::fmt::Debug for SplitProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = *self.state.borrow();
        f.debug_struct("SplitProxy")
            .field("addr", &self.addr)
            .field("listen", &s.listen)
            .field("data", &s.data)
            .finish()
    }
}

impl SplitProxy {
    /// Binds `127.0.0.1:0` and proxies to `upstream` (a loopback address), everything passing.
    pub async fn start(upstream: SocketAddr) -> SplitProxy {
        assert!(upstream.ip().is_loopback(), "SplitProxy only proxies to loopback upstreams, got {upstream}");
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind split proxy on 127.0.0.1:0");
        let addr = listener.local_addr().expect("split proxy local addr");
        let (state, rx) = watch::channel(SplitState { listen: Cut::Pass, data: Cut::Pass, shutdown: false });
        let listeners = Arc::new(AtomicUsize::new(0));
        let accept = tokio::spawn(accept_loop(listener, upstream, rx, listeners.clone()));
        SplitProxy { addr, state, listeners, accept }
    }

    /// The address clients should connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The cut applied to `LISTEN` connections.
    pub fn set_listen(&self, cut: Cut) {
        self.state.send_modify(|s| s.listen = cut);
    }

    /// The cut applied to every other connection.
    pub fn set_data(&self, cut: Cut) {
        self.state.send_modify(|s| s.data = cut);
    }

    /// How many connections have been classified as listeners so far.
    pub fn listeners_seen(&self) -> usize {
        self.listeners.load(Ordering::SeqCst)
    }
}

impl Drop for SplitProxy {
    fn drop(&mut self) {
        self.state.send_modify(|s| s.shutdown = true);
        self.accept.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    rx: watch::Receiver<SplitState>,
    listeners: Arc<AtomicUsize>,
) {
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                if rx.borrow().shutdown {
                    return;
                }
                tasks.spawn(serve(client, upstream, rx.clone(), listeners.clone()));
            }
        }
    }
}

fn reset(stream: &TcpStream) {
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Eof,
    Reset,
}

/// Waits until this connection may forward (held while black-holed); `Err` when it must be reset.
async fn gate(rx: &mut watch::Receiver<SplitState>, is_listen: &AtomicBool) -> Result<(), End> {
    let mut holed = false;
    loop {
        let s = *rx.borrow_and_update();
        if s.shutdown {
            return Err(End::Reset);
        }
        match if is_listen.load(Ordering::SeqCst) { s.listen } else { s.data } {
            Cut::Down => return Err(End::Reset),
            Cut::BlackHole => holed = true,
            Cut::Pass if holed => return Err(End::Reset),
            Cut::Pass => return Ok(()),
        }
        if rx.changed().await.is_err() {
            return Err(End::Reset);
        }
    }
}

async fn serve(
    mut client: TcpStream,
    upstream: SocketAddr,
    rx: watch::Receiver<SplitState>,
    listeners: Arc<AtomicUsize>,
) {
    let _ = client.set_nodelay(true);
    let is_listen = Arc::new(AtomicBool::new(false));
    if gate(&mut rx.clone(), &is_listen).await.is_err() {
        reset(&client);
        return;
    }
    let mut server = match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(upstream)).await {
        Ok(Ok(server)) => server,
        _ => {
            reset(&client);
            return;
        }
    };
    let _ = server.set_nodelay(true);
    let end = {
        let (mut client_r, mut client_w) = client.split();
        let (mut server_r, mut server_w) = server.split();
        let up = pump(&mut client_r, &mut server_w, rx.clone(), &is_listen, Some(&listeners));
        let down = pump(&mut server_r, &mut client_w, rx.clone(), &is_listen, None);
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                end = &mut up, if !up_done => {
                    if end == End::Reset { break End::Reset; }
                    up_done = true;
                }
                end = &mut down, if !down_done => {
                    if end == End::Reset { break End::Reset; }
                    down_done = true;
                }
            }
            if up_done && down_done {
                break End::Eof;
            }
        }
    };
    if end == End::Reset {
        reset(&client);
    }
}

/// Forwards one direction. The client-to-server direction (`classify` set) marks the connection
/// as a listener when a chunk carries `LISTEN` (the tail of the previous chunk is kept, so a word
/// split across two reads is still seen).
async fn pump<R, W>(
    from: &mut R,
    to: &mut W,
    mut rx: watch::Receiver<SplitState>,
    is_listen: &AtomicBool,
    classify: Option<&AtomicUsize>,
) -> End
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    const WORD: &[u8] = b"LISTEN";
    let mut buf = vec![0u8; 16 * 1024];
    let mut tail: Vec<u8> = Vec::new();
    loop {
        if let Err(end) = gate(&mut rx, is_listen).await {
            return end;
        }
        let n = tokio::select! {
            biased;
            changed = rx.changed() => {
                if changed.is_err() {
                    return End::Reset;
                }
                continue;
            }
            read = from.read(&mut buf) => match read {
                Ok(0) => {
                    let _ = to.shutdown().await;
                    return End::Eof;
                }
                Ok(n) => n,
                Err(_) => return End::Reset,
            },
        };
        if let Some(count) = classify {
            if !is_listen.load(Ordering::SeqCst) {
                tail.extend_from_slice(&buf[..n]);
                if tail.windows(WORD.len()).any(|w| w.eq_ignore_ascii_case(WORD)) {
                    is_listen.store(true, Ordering::SeqCst);
                    count.fetch_add(1, Ordering::SeqCst);
                }
                let keep = tail.len().saturating_sub(WORD.len() - 1);
                tail.drain(..keep);
            }
        }
        let mut pos = 0;
        while pos < n {
            if let Err(end) = gate(&mut rx, is_listen).await {
                return end;
            }
            tokio::select! {
                biased;
                changed = rx.changed() => {
                    if changed.is_err() {
                        return End::Reset;
                    }
                }
                written = to.write(&buf[pos..n]) => match written {
                    Ok(0) | Err(_) => return End::Reset,
                    Ok(k) => pos += k,
                },
            }
        }
    }
}

/// A `redis-server` of the test's own on a free loopback port, without persistence; killed on
/// drop. [`restart_empty`](OwnedRedis::restart_empty) kills it and starts a new, empty one on the
/// same port.
pub struct OwnedRedis {
    port: u16,
    child: Option<Child>,
    extra: Vec<String>,
}

impl std::fmt::Debug for OwnedRedis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedRedis").field("port", &self.port).field("running", &self.child.is_some()).finish()
    }
}

impl OwnedRedis {
    /// Starts `redis-server` on a free port of 127.0.0.1 and waits until it answers PING; fails the
    /// test, saying what to install, when `redis-server` is not on the PATH.
    pub fn start() -> OwnedRedis {
        Self::start_with(&[])
    }

    /// Like [`start`](Self::start), with more `redis-server` arguments (e.g. `--maxmemory 1mb`).
    pub fn start_with(extra: &[&str]) -> OwnedRedis {
        let port = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let mut redis = OwnedRedis { port, child: None, extra: extra.iter().map(|s| (*s).to_owned()).collect() };
        redis.spawn();
        redis
    }

    /// Like [`start_with`](Self::start_with), on a given port.
    pub fn start_on(port: u16, extra: &[&str]) -> OwnedRedis {
        let mut redis = OwnedRedis { port, child: None, extra: extra.iter().map(|s| (*s).to_owned()).collect() };
        redis.spawn();
        redis
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr())
    }

    /// Kills the server (SIGKILL: nothing is saved, and it has no persistence anyway).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a killed server again on the same port and arguments (a cluster node comes back
    /// with its node file).
    pub fn start_again(&mut self) {
        if self.child.is_none() {
            self.spawn();
        }
    }

    /// Kills the server and starts an empty one on the same port.
    pub fn restart_empty(&mut self) {
        self.kill();
        self.spawn();
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none());
        let dir = std::env::temp_dir();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}): install it (e.g. `apt-get install redis-server`) for this test"
                )
            });
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !self.pings() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("redis-server on port {} exited at start: {status}", self.port);
            }
            assert!(std::time::Instant::now() < deadline, "redis-server on port {} never answered PING", self.port);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn pings(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&self.addr(), Duration::from_millis(200)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }
}

impl Drop for OwnedRedis {
    fn drop(&mut self) {
        self.kill();
    }
}
