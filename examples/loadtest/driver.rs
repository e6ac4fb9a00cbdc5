//! The driver: one task per keep-alive connection, the open-loop pacer or the closed-loop users,
//! per-connection latency samples, progress lines.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::BoxError;
use crate::args::{Mode, Opts};
use crate::client::{ERR_KINDS, ErrKind, connect, exchange, write_request};
use crate::fleet::{Fleet, Windows};
use crate::report::fmt_us;
use crate::workload::{Req, Rng, Tokens, Workload};

/// What one configuration is driven at.
pub(crate) struct Target {
    pub(crate) name: String,
    pub(crate) addr: SocketAddr,
    pub(crate) host: String,
    /// Read `/admin/stats` before and after.
    pub(crate) stats: bool,
    /// Served by this process (its CPU shows as the app's).
    pub(crate) local: bool,
    /// Who the requests are made as.
    pub(crate) tokens: Tokens,
    /// Authorizes (a denied request is expected to get 403; bare answers 2xx to everything).
    pub(crate) authorizes: bool,
    /// Has a decision cache (its hit rate is compared with the compulsory-miss bound).
    pub(crate) cached: bool,
    /// A fleet of instances behind the driver's round robin (`addr` is then unused).
    pub(crate) fleet: Option<Arc<Fleet>>,
}

impl Target {
    /// Where connection `conn` goes, and which incarnation of its instance that is.
    fn route(&self, conn: usize) -> (SocketAddr, u64) {
        self.fleet.as_ref().map_or((self.addr, 0), |f| f.route(conn))
    }
}
/// One request handed to a connection: its intended send time and, in closed loop, who waits.
pub(crate) struct Job {
    pub(crate) req: Req,
    pub(crate) intended: Instant,
    pub(crate) done: Option<oneshot::Sender<()>>,
}
#[derive(Default)]
pub(crate) struct Progress {
    pub(crate) done: AtomicU64,
    pub(crate) errors: AtomicU64,
    /// The largest latency (µs) since the last progress line.
    pub(crate) max_us: AtomicU64,
}
/// One connection's observations, merged at the end. Latencies in microseconds.
#[derive(Default)]
pub(crate) struct Stats {
    /// From the intended send time to the end of the response.
    pub(crate) latency: Vec<u32>,
    /// From the actual write to the end of the response.
    pub(crate) service: Vec<u32>,
    /// From the intended send time to the actual write.
    pub(crate) lag: Vec<u32>,
    pub(crate) status: BTreeMap<u16, u64>,
    /// Responses with the status the roles call for.
    pub(crate) expected: u64,
    pub(crate) errors: [u64; ERR_KINDS.len()],
    pub(crate) last_done: Option<Instant>,
    /// Distinct cache keys among the requests sent, and how many were sent.
    pub(crate) keys: HashSet<u64>,
    pub(crate) sent: u64,
    /// The requests sent during a fleet's restart windows.
    pub(crate) window: WindowStats,
}
/// What the requests whose intended send time fell in a restart window got.
#[derive(Default)]
pub(crate) struct WindowStats {
    pub(crate) latency: Vec<u32>,
    pub(crate) sent: u64,
    pub(crate) expected: u64,
}
pub(crate) fn us(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}
impl Stats {
    pub(crate) fn error(&mut self, kind: ErrKind, progress: &Progress) {
        self.errors[ERR_KINDS.iter().position(|k| *k == kind).unwrap_or(0)] += 1;
        progress.done.fetch_add(1, Relaxed);
        progress.errors.fetch_add(1, Relaxed);
    }

    pub(crate) fn merge(&mut self, mut other: Stats) {
        self.latency.extend(other.latency);
        self.service.extend(other.service);
        self.lag.extend(other.lag);
        for (k, v) in other.status {
            *self.status.entry(k).or_default() += v;
        }
        self.expected += other.expected;
        self.sent += other.sent;
        self.window.latency.extend(other.window.latency);
        self.window.sent += other.window.sent;
        self.window.expected += other.window.expected;
        if self.keys.len() < other.keys.len() {
            std::mem::swap(&mut self.keys, &mut other.keys);
        }
        self.keys.extend(other.keys);
        for (a, b) in self.errors.iter_mut().zip(other.errors) {
            *a += b;
        }
        self.last_done = self.last_done.max(other.last_done);
    }
}
#[derive(Clone)]
pub(crate) struct ConnCtx {
    pub(crate) target: Arc<Target>,
    pub(crate) hard_stop: Instant,
    pub(crate) timeout: Duration,
    pub(crate) progress: Arc<Progress>,
    /// A fleet's restart windows.
    pub(crate) windows: Option<Windows>,
}
/// One keep-alive connection (number `conn`): sends its jobs in order, reconnecting after any
/// error, and (behind a fleet) before the next request once its instance was replaced.
pub(crate) async fn connection_task(
    ctx: ConnCtx,
    conn: usize,
    mut stream: Option<TcpStream>,
    mut rx: mpsc::UnboundedReceiver<Job>,
) -> Stats {
    let mut incarnation = ctx.target.route(conn).1;
    let mut st = Stats::default();
    let mut wbuf = String::with_capacity(256);
    let mut rbuf = Vec::with_capacity(8192);
    let stop = tokio::time::sleep_until(ctx.hard_stop.into());
    tokio::pin!(stop);
    loop {
        let job = tokio::select! {
            biased;
            job = rx.recv() => match job {
                Some(job) => job,
                None => break,
            },
            _ = &mut stop => break,
        };
        if Instant::now() >= ctx.hard_stop {
            st.error(ErrKind::Unsent, &ctx.progress);
            continue;
        }
        let tokens = ctx.target.tokens;
        write_request(&mut wbuf, &ctx.target.host, job.req, tokens);
        st.keys.insert(job.req.key(tokens));
        st.sent += 1;
        let in_window = ctx.windows.is_some_and(|w| w.contains(job.intended));
        st.window.sent += u64::from(in_window);
        let (addr, now_there) = ctx.target.route(conn);
        if now_there != incarnation {
            // The balancer drains the old instance: the next request goes to the new one.
            stream = None;
            incarnation = now_there;
        }
        let deadline = (Instant::now() + ctx.timeout).min(ctx.hard_stop);
        let result = tokio::time::timeout_at(deadline.into(), async {
            if stream.is_none() {
                stream = Some(connect(addr, ctx.timeout).await?);
            }
            let s = stream.as_mut().ok_or(ErrKind::Connect)?;
            let sent = Instant::now();
            let r = exchange(s, wbuf.as_bytes(), &mut rbuf).await?;
            Ok::<_, ErrKind>((sent, r))
        })
        .await;
        match result {
            Ok(Ok((sent, r))) => {
                let done = Instant::now();
                let latency = us(done.saturating_duration_since(job.intended));
                st.latency.push(latency);
                ctx.progress.max_us.fetch_max(u64::from(latency), Relaxed);
                st.service.push(us(done - sent));
                st.lag.push(us(sent.saturating_duration_since(job.intended)));
                *st.status.entry(r.status).or_default() += 1;
                let denied = ctx.target.authorizes && job.req.denied(tokens);
                let expected = (denied && r.status == 403) || (!denied && (200..300).contains(&r.status));
                st.expected += u64::from(expected);
                if in_window {
                    st.window.latency.push(latency);
                    st.window.expected += u64::from(expected);
                }
                st.last_done = Some(done);
                ctx.progress.done.fetch_add(1, Relaxed);
                if !r.keep_alive {
                    stream = None;
                }
            }
            Ok(Err(kind)) => {
                st.error(kind, &ctx.progress);
                stream = None;
            }
            Err(_) => {
                st.error(ErrKind::Timeout, &ctx.progress);
                stream = None;
            }
        }
        if let Some(done) = job.done {
            let _ = done.send(());
        }
    }
    // Whatever is still queued at the hard stop was never sent: it counts, as an error.
    rx.close();
    while rx.try_recv().is_ok() {
        st.error(ErrKind::Unsent, &ctx.progress);
    }
    st
}
pub(crate) async fn print_progress(name: String, t0: Instant, progress: Arc<Progress>) {
    let mut tick = tokio::time::interval_at((t0 + Duration::from_secs(1)).into(), Duration::from_secs(1));
    let mut last = 0;
    loop {
        tick.tick().await;
        let done = progress.done.load(Relaxed);
        eprintln!(
            "[{name}] {:>5.1}s  requests {done:>8}  rate {:>7}/s  errors {}  max latency {}",
            t0.elapsed().as_secs_f64(),
            done - last,
            progress.errors.load(Relaxed),
            fmt_us(progress.max_us.swap(0, Relaxed) as f64)
        );
        last = done;
    }
}
/// Asks the kernel to wake this thread from `sleep` within 1 ns of the deadline instead of the
/// default 50 µs (`/proc/<tid>/timerslack_ns`, Linux 4.6+; may need CAP_SYS_NICE).
pub(crate) fn lower_timer_slack() -> std::io::Result<()> {
    let me = std::fs::read_link("/proc/thread-self")?;
    let tid = me.file_name().and_then(|t| t.to_str()).unwrap_or_default().to_owned();
    std::fs::write(format!("/proc/{tid}/timerslack_ns"), "1")
}
pub(crate) struct Driven {
    pub(crate) stats: Stats,
    pub(crate) issued: u64,
    pub(crate) t0: Instant,
    pub(crate) finished: Instant,
}
/// Connects `--connections` connections, then runs the open or closed loop until the duration,
/// `--max-requests` or the hard stop (duration + drain), whichever comes first.
pub(crate) async fn drive(o: &Opts, target: Arc<Target>, wl: Arc<Workload>) -> Result<Driven, BoxError> {
    let c = o.connections;
    // The clock starts once the connections are up: connecting is not part of the measurement.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..c {
        let (addr, timeout) = (target.route(i).0, o.timeout);
        set.spawn(async move { (i, connect(addr, timeout).await.ok()) });
    }
    let mut streams: Vec<Option<TcpStream>> = (0..c).map(|_| None).collect();
    while let Some(joined) = set.join_next().await {
        let (i, s) = joined?;
        streams[i] = s;
    }
    let up = streams.iter().filter(|s| s.is_some()).count();
    if up == 0 {
        return Err(format!("{}: cannot connect to {}", target.name, target.addr).into());
    }
    if up < c {
        eprintln!("[{}] warning: only {up} of {c} connections are up; the others retry per request", target.name);
    }

    let progress = Arc::new(Progress::default());
    let t0 = Instant::now() + Duration::from_millis(20);
    let end = t0 + o.duration;
    let hard_stop = end + o.drain;
    let windows = target.fleet.as_ref().map(|f| Windows { t0, every: f.every, width: f.width });
    let ctx = ConnCtx { target: target.clone(), hard_stop, timeout: o.timeout, progress: progress.clone(), windows };
    let mut senders = Vec::with_capacity(c);
    let mut conns = Vec::with_capacity(c);
    for (i, s) in streams.into_iter().enumerate() {
        let (tx, rx) = mpsc::unbounded_channel();
        senders.push(tx);
        conns.push(tokio::spawn(connection_task(ctx.clone(), i, s, rx)));
    }
    // A fleet's restarts and flush run beside the load, from t0.
    let controller = target.fleet.clone().map(|f| tokio::spawn(f.run(t0, end)));
    let printer = tokio::spawn(print_progress(target.name.clone(), t0, progress.clone()));

    enum Issuer {
        Pacer(std::thread::JoinHandle<u64>),
        Users(tokio::task::JoinSet<()>, Arc<AtomicU64>),
    }
    let issuer = match o.mode {
        Mode::Open => {
            // Request i is due at t0 + i/rate on connection i % C. A dedicated thread paces them
            // (std::thread::sleep, not the runtime's millisecond timer); a connection that is
            // still busy sends late, and the latency still counts from the intended time.
            let (rate, max, seed, wl) = (o.rate, o.max_requests, o.seed, wl.clone());
            let name = target.name.clone();
            let pacer = std::thread::Builder::new().name("lt-pacer".into()).spawn(move || {
                if let Err(e) = lower_timer_slack() {
                    eprintln!(
                        "[{name}] note: could not lower the pacer's timer slack ({e}): send lag includes the default ~50 µs"
                    );
                }
                let mut rng = Rng::new(seed ^ 0x6f70_656e_0000_0001);
                let mut i: u64 = 0;
                while i < max {
                    let intended = t0 + Duration::from_secs_f64(i as f64 / rate);
                    let now = Instant::now();
                    if intended >= end || now >= hard_stop {
                        break;
                    }
                    if intended > now {
                        std::thread::sleep(intended - now);
                    }
                    let user = rng.below(wl.users() as u64) as usize;
                    let job = Job { req: wl.request(user, &mut rng), intended, done: None };
                    if senders[(i % senders.len() as u64) as usize].send(job).is_err() {
                        break;
                    }
                    i += 1;
                }
                i
            })?;
            Issuer::Pacer(pacer)
        }
        Mode::Closed => {
            // Each user: request, wait for the response, think, repeat. User u uses connection
            // u % C; latency counts from when the user issued the request (queueing included).
            let senders = Arc::new(senders);
            let issued = Arc::new(AtomicU64::new(0));
            let budget = Arc::new(AtomicU64::new(0));
            let mut users = tokio::task::JoinSet::new();
            // With `loops`, that many loops each draw a user per request (saturation: the same
            // request stream whatever the concurrency); otherwise one loop per user.
            let loops = o.loops.unwrap_or(wl.users());
            for u in 0..loops {
                let (senders, wl, issued, budget) = (senders.clone(), wl.clone(), issued.clone(), budget.clone());
                let (think, max, draw) = (o.think, o.max_requests, o.loops.is_some());
                let mut rng = Rng::new(o.seed ^ (u as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                // Users start spread over one think time rather than all at t0.
                let offset = Duration::from_micros(rng.below(think.as_micros() as u64));
                users.spawn(async move {
                    tokio::time::sleep_until((t0 + offset).into()).await;
                    let conn = &senders[u % senders.len()];
                    while Instant::now() < end && budget.fetch_add(1, Relaxed) < max {
                        let (tx, rx) = oneshot::channel();
                        let user = if draw { rng.below(wl.users() as u64) as usize } else { u };
                        let job = Job { req: wl.request(user, &mut rng), intended: Instant::now(), done: Some(tx) };
                        if conn.send(job).is_err() {
                            break;
                        }
                        issued.fetch_add(1, Relaxed);
                        if rx.await.is_err() {
                            break;
                        }
                        if !think.is_zero() {
                            tokio::time::sleep_until((Instant::now() + think).min(end).into()).await;
                        }
                    }
                });
            }
            Issuer::Users(users, issued)
        }
    };

    let mut stats = Stats::default();
    for conn in conns {
        stats.merge(conn.await?);
    }
    let finished = Instant::now();
    printer.abort();
    if let Some(controller) = controller {
        controller.abort();
    }
    eprintln!(
        "[{}] done  {:>5.1}s  requests {:>8}  errors {}",
        target.name,
        finished.saturating_duration_since(t0).as_secs_f64(),
        progress.done.load(Relaxed),
        progress.errors.load(Relaxed)
    );
    let issued = match issuer {
        Issuer::Pacer(pacer) => pacer.join().map_err(|_| "the pacer thread panicked")?,
        Issuer::Users(mut users, issued) => {
            users.abort_all();
            while users.join_next().await.is_some() {}
            issued.load(Relaxed)
        }
    };
    Ok(Driven { stats, issued, t0, finished })
}
