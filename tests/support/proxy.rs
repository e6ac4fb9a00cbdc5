//! A loopback TCP fault-injection proxy for integration tests.
//!
//! Tests that talk to the shared Redis / Postgres servers must never stop those servers to
//! simulate an outage. Instead they point the client at a [`FaultProxy`] they own and switch its
//! [`Mode`]:
//!
//! | mode          | new connections                         | existing connections                     |
//! |---------------|-----------------------------------------|------------------------------------------|
//! | `Pass`        | proxied to the upstream                 | keep forwarding                          |
//! | `Down`        | accepted and reset at once (RST)        | reset at the moment the mode is set      |
//! | `Slow(d)`     | proxied, every chunk delayed by `d`     | every further chunk delayed by `d`       |
//! | `BlackHole`   | accepted and held, nothing forwarded    | stop forwarding (nothing more is read)   |
//!
//! Leaving `BlackHole` (to any other mode) resets every connection that was black-holed: a
//! connection that lost bytes in the hole cannot be resumed meaningfully. Connections opened after
//! the switch work normally.
//!
//! [`FaultProxy::restart`] resets every current connection (the proxy keeps listening and the mode
//! is unchanged). Dropping the [`FaultProxy`] stops the listener and closes every connection.
//!
//! Everything is bounded: the proxy binds `127.0.0.1:0` only, refuses a non-loopback upstream,
//! connects upstream with a timeout, never busy-loops, and all its tasks end when it is dropped.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// How long the proxy waits for the upstream to accept a connection before resetting the client.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Size of the per-direction forwarding buffer.
const BUF_SIZE: usize = 16 * 1024;
/// Back-off after a failed `accept` (e.g. out of file descriptors), so the loop never spins.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);

/// The fault the proxy currently simulates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward bytes both ways.
    Pass,
    /// Behave like a server that is down: accept and reset new connections, reset existing ones.
    Down,
    /// Forward bytes, delaying every chunk (in either direction) by the given duration.
    Slow(Duration),
    /// Accept and hold connections but forward nothing; the client hangs until its own timeout.
    BlackHole,
}

/// What every connection task watches.
#[derive(Debug, Clone, Copy)]
struct State {
    mode: Mode,
    /// Bumped by [`FaultProxy::restart`]; a connection from an older generation resets itself.
    generation: u64,
    /// Set when the proxy is dropped.
    shutdown: bool,
}

/// A loopback TCP proxy in front of one upstream address, with switchable faults.
///
/// Dropping it stops the listener task and closes every proxied connection.
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    state: watch::Sender<State>,
    open: Arc<AtomicUsize>,
    listener: JoinHandle<()>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.upstream)
            .field("mode", &self.state.borrow().mode)
            .field("connections", &self.connections())
            .finish()
    }
}

impl FaultProxy {
    /// Binds `127.0.0.1:0` and starts proxying to `upstream` (which must be a loopback address)
    /// in [`Mode::Pass`].
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        assert!(upstream.ip().is_loopback(), "FaultProxy only proxies to loopback upstreams, got {upstream}");
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind fault proxy on 127.0.0.1:0");
        let addr = listener.local_addr().expect("fault proxy local addr");
        let (state, rx) = watch::channel(State { mode: Mode::Pass, generation: 0, shutdown: false });
        let open = Arc::new(AtomicUsize::new(0));
        let listener = tokio::spawn(accept_loop(listener, upstream, rx, open.clone()));
        FaultProxy { addr, upstream, state, open, listener }
    }

    /// The address clients should connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A URL for the proxy, e.g. `url("redis")` gives `redis://127.0.0.1:PORT`.
    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.addr)
    }

    /// Switches the simulated fault; existing connections react promptly (see the module docs).
    pub fn set_mode(&self, mode: Mode) {
        self.state.send_modify(|s| s.mode = mode);
    }

    /// Resets every current connection immediately. New connections behave per the current mode.
    pub fn restart(&self) {
        self.state.send_modify(|s| s.generation = s.generation.wrapping_add(1));
    }

    /// The number of currently open proxied connections (connections accepted in `Down` mode are
    /// reset at once and never counted).
    pub fn connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Tell every connection task to reset its connection, then abort the listener: aborting
        // it drops its `JoinSet`, which aborts any connection task that has not ended yet (such a
        // connection is then closed by dropping its sockets). Dropping `state` afterwards also
        // wakes every task still waiting on the channel.
        self.state.send_modify(|s| s.shutdown = true);
        self.listener.abort();
    }
}

/// Decrements the open-connection counter when a connection task ends (or is aborted).
struct OpenGuard(Arc<AtomicUsize>);

impl OpenGuard {
    fn new(open: Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::SeqCst);
        OpenGuard(open)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, rx: watch::Receiver<State>, open: Arc<AtomicUsize>) {
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            // Reap finished connection tasks so the set does not grow without bound.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else {
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                };
                let state = *rx.borrow();
                if state.shutdown {
                    return;
                }
                if state.mode == Mode::Down {
                    reset(&client);
                    continue;
                }
                let guard = OpenGuard::new(open.clone());
                tasks.spawn(serve(client, upstream, rx.clone(), state.generation, guard));
            }
        }
    }
}

/// Closes the socket with an RST instead of a FIN once it is dropped.
fn reset(stream: &TcpStream) {
    // A zero linger never blocks; the deprecation is about non-zero lingers.
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
}

/// How a connection (or one direction of it) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The source sent EOF; it was passed on as a half-close.
    Eof,
    /// Mode change, restart, shutdown or I/O error: reset the connection.
    Reset,
}

/// Waits until forwarding is allowed and returns the current delay (`None` in `Pass`).
///
/// Returns `Err(End::Reset)` when the connection must be reset: mode `Down`, a restart, proxy
/// shutdown, or leaving `BlackHole` after having been black-holed. In `BlackHole` it simply waits
/// (reading nothing) until the mode changes.
async fn gate(rx: &mut watch::Receiver<State>, generation: u64) -> Result<Option<Duration>, End> {
    let mut holed = false;
    loop {
        let state = *rx.borrow_and_update();
        if state.shutdown || state.generation != generation {
            return Err(End::Reset);
        }
        match state.mode {
            Mode::Down => return Err(End::Reset),
            Mode::BlackHole => holed = true,
            _ if holed => return Err(End::Reset),
            Mode::Pass => return Ok(None),
            Mode::Slow(d) => return Ok(Some(d)),
        }
        if rx.changed().await.is_err() {
            return Err(End::Reset);
        }
    }
}

async fn serve(
    mut client: TcpStream,
    upstream: SocketAddr,
    mut rx: watch::Receiver<State>,
    generation: u64,
    _guard: OpenGuard,
) {
    let _ = client.set_nodelay(true);
    // A connection accepted in `BlackHole` is held here without touching the upstream.
    if gate(&mut rx, generation).await.is_err() {
        reset(&client);
        return;
    }
    let mut server = match tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(upstream)).await {
        Ok(Ok(server)) => server,
        _ => {
            // Upstream unreachable: look like a server that is down.
            reset(&client);
            return;
        }
    };
    let _ = server.set_nodelay(true);

    let end = {
        let (mut client_r, mut client_w) = client.split();
        let (mut server_r, mut server_w) = server.split();
        let up = pump(&mut client_r, &mut server_w, rx.clone(), generation);
        let down = pump(&mut server_r, &mut client_w, rx.clone(), generation);
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                end = &mut up, if !up_done => {
                    if end == End::Reset {
                        break End::Reset;
                    }
                    up_done = true;
                }
                end = &mut down, if !down_done => {
                    if end == End::Reset {
                        break End::Reset;
                    }
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
    // Dropping both sockets closes them (with RST for the client when reset).
}

/// Forwards one direction until EOF, an error or a mode change that resets the connection.
async fn pump<R, W>(from: &mut R, to: &mut W, mut rx: watch::Receiver<State>, generation: u64) -> End
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        // 1. Read a chunk, but only while forwarding is allowed (nothing is read in a black hole).
        if let Err(end) = gate(&mut rx, generation).await {
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
        let read_at = Instant::now();

        // 2. Delay it in `Slow` mode (re-evaluated if the mode changes meanwhile).
        loop {
            let delay = match gate(&mut rx, generation).await {
                Ok(delay) => delay,
                Err(end) => return end,
            };
            let Some(deadline) = delay.map(|d| read_at + d) else { break };
            if Instant::now() >= deadline {
                break;
            }
            tokio::select! {
                biased;
                changed = rx.changed() => {
                    if changed.is_err() {
                        return End::Reset;
                    }
                }
                () = tokio::time::sleep_until(deadline) => break,
            }
        }

        // 3. Write it; `write` is cancel-safe, so a mode change can interrupt a stalled write.
        let mut pos = 0;
        while pos < n {
            if let Err(end) = gate(&mut rx, generation).await {
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
