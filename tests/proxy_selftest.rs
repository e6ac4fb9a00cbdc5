//! Self-tests for the loopback fault-injection proxy in `tests/support/proxy.rs`.

#[path = "support/proxy.rs"]
mod proxy;

use std::net::SocketAddr;
use std::time::Duration;

use proxy::{FaultProxy, Mode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, timeout};

/// Generous bound for things that must happen "promptly".
const PROMPT: Duration = Duration::from_secs(1);

/// A tiny echo server on 127.0.0.1:0; it lives as long as the test's runtime.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = sock.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

async fn connect(proxy: &FaultProxy) -> TcpStream {
    timeout(PROMPT, TcpStream::connect(proxy.addr())).await.expect("connect timed out").expect("connect")
}

/// Writes `msg` and reads the same number of bytes back.
async fn round_trip(stream: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(msg).await?;
    let mut buf = vec![0u8; msg.len()];
    stream.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn assert_echoes(stream: &mut TcpStream, msg: &[u8]) {
    let got = timeout(PROMPT, round_trip(stream, msg)).await.expect("echo timed out").expect("echo failed");
    assert_eq!(got, msg);
}

/// Asserts the peer closed or reset the connection promptly (read gives EOF or an error).
async fn assert_closed(stream: &mut TcpStream) {
    let mut buf = [0u8; 64];
    match timeout(PROMPT, stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("expected a closed connection, read {n} bytes"),
        Err(_) => panic!("expected a closed connection, read hung"),
    }
}

/// Polls (bounded) until the proxy reports `n` open connections.
async fn wait_connections(proxy: &FaultProxy, n: usize) {
    let deadline = Instant::now() + PROMPT;
    while proxy.connections() != n {
        assert!(Instant::now() < deadline, "expected {n} connections, have {}", proxy.connections());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn pass_mode_echoes() {
    let proxy = FaultProxy::start(echo_server().await).await;
    assert!(proxy.addr().ip().is_loopback());
    assert_eq!(proxy.url("redis"), format!("redis://127.0.0.1:{}", proxy.addr().port()));

    let mut c = connect(&proxy).await;
    assert_echoes(&mut c, b"hello").await;
    wait_connections(&proxy, 1).await;

    // A payload larger than the socket buffers and the proxy buffer, written and read concurrently.
    let payload: Vec<u8> = (0..512 * 1024).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = c.split();
    let (written, read) = timeout(Duration::from_secs(2), async {
        tokio::join!(w.write_all(&payload), async {
            let mut got = vec![0u8; payload.len()];
            r.read_exact(&mut got).await.map(|_| got)
        })
    })
    .await
    .expect("large echo timed out");
    written.unwrap();
    assert!(read.unwrap() == payload);

    drop(c);
    wait_connections(&proxy, 0).await;
}

#[tokio::test]
async fn down_closes_existing_and_refuses_new() {
    let proxy = FaultProxy::start(echo_server().await).await;
    let mut existing = connect(&proxy).await;
    assert_echoes(&mut existing, b"before").await;

    proxy.set_mode(Mode::Down);
    assert_closed(&mut existing).await;
    wait_connections(&proxy, 0).await;

    // A new connection may be accepted, but it is closed at once: the echo never comes back.
    let attempt = timeout(PROMPT, async {
        let mut c = TcpStream::connect(proxy.addr()).await?;
        round_trip(&mut c, b"ping").await
    })
    .await
    .expect("a connection to a down proxy must fail quickly, not hang");
    assert!(attempt.is_err(), "down proxy echoed: {attempt:?}");
    assert_eq!(proxy.connections(), 0);

    proxy.set_mode(Mode::Pass);
    let mut c = connect(&proxy).await;
    assert_echoes(&mut c, b"after").await;
}

#[tokio::test]
async fn slow_mode_delays_existing_and_new_connections() {
    let delay = Duration::from_millis(50);
    let proxy = FaultProxy::start(echo_server().await).await;
    let mut existing = connect(&proxy).await;
    assert_echoes(&mut existing, b"warm-up").await;

    proxy.set_mode(Mode::Slow(delay));
    let started = Instant::now();
    assert_echoes(&mut existing, b"slow existing").await;
    assert!(started.elapsed() >= delay, "existing round trip took {:?}", started.elapsed());

    let mut c = connect(&proxy).await;
    let started = Instant::now();
    assert_echoes(&mut c, b"slow new").await;
    assert!(started.elapsed() >= delay, "new round trip took {:?}", started.elapsed());

    proxy.set_mode(Mode::Pass);
    assert_echoes(&mut c, b"fast again").await;
}

#[tokio::test]
async fn black_hole_hangs_then_pass_works_for_new_connections() {
    let proxy = FaultProxy::start(echo_server().await).await;
    let mut existing = connect(&proxy).await;
    assert_echoes(&mut existing, b"before").await;

    proxy.set_mode(Mode::BlackHole);
    let hung = timeout(Duration::from_millis(200), round_trip(&mut existing, b"into the hole")).await;
    assert!(hung.is_err(), "existing connection was not black-holed: {hung:?}");

    let mut new = connect(&proxy).await;
    let hung = timeout(Duration::from_millis(200), round_trip(&mut new, b"new into the hole")).await;
    assert!(hung.is_err(), "new connection was not black-holed: {hung:?}");
    wait_connections(&proxy, 2).await;

    // Leaving the black hole resets the black-holed connections; new ones work.
    proxy.set_mode(Mode::Pass);
    assert_closed(&mut existing).await;
    assert_closed(&mut new).await;
    let mut c = connect(&proxy).await;
    assert_echoes(&mut c, b"out of the hole").await;
    wait_connections(&proxy, 1).await;
}

#[tokio::test]
async fn restart_closes_existing_connections() {
    let proxy = FaultProxy::start(echo_server().await).await;
    let mut existing = connect(&proxy).await;
    assert_echoes(&mut existing, b"before").await;
    wait_connections(&proxy, 1).await;

    proxy.restart();
    assert_closed(&mut existing).await;
    wait_connections(&proxy, 0).await;

    let mut c = connect(&proxy).await;
    assert_echoes(&mut c, b"after restart").await;
    wait_connections(&proxy, 1).await;
}

#[tokio::test]
async fn drop_closes_connections_and_listener() {
    let proxy = FaultProxy::start(echo_server().await).await;
    let addr = proxy.addr();
    let mut c = connect(&proxy).await;
    assert_echoes(&mut c, b"before").await;

    drop(proxy);
    assert_closed(&mut c).await;

    // The listener goes away too (bounded poll: the abort is processed asynchronously).
    let deadline = Instant::now() + PROMPT;
    loop {
        match timeout(PROMPT, TcpStream::connect(addr)).await {
            Ok(Err(_)) => break,
            Ok(Ok(_)) | Err(_) => {
                assert!(Instant::now() < deadline, "listener still accepting after drop");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}
