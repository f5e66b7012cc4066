//! One replica's metrics and the Prometheus text endpoint that exposes them.
//!
//! [`Metrics`] is written by the node thread and read by the [`MetricsServer`]
//! thread. Gauges and counters are atomics (no lock on the hot path); the commit
//! latency histogram, the per-peer table and the per-code error counters sit behind
//! short uncontended locks that [`Metrics::render`] holds only while copying.
//!
//! Every series carries the label `node="<id>"`. The exposition format is the
//! Prometheus text format 0.0.4:
//!
//! | metric | type | labels | meaning |
//! | --- | --- | --- | --- |
//! | `replog_commit_latency_seconds` | histogram | | append received to commit known at the leader |
//! | `replog_role` | gauge | `role` | 1 for the current role, 0 for the others |
//! | `replog_ballot_round`, `replog_ballot_node` | gauge | | the highest ballot seen |
//! | `replog_commit_index` | gauge | | slots committed (first uncommitted slot) |
//! | `replog_applied_slot`, `replog_applied_position` | gauge | | apply progress |
//! | `replog_log_bytes` | gauge | | bytes held by the local log |
//! | `replog_peer_lag_slots` | gauge | `peer` | how far a peer trails the commit index |
//! | `replog_peer_connected` | gauge | `peer` | 1 while the peer's link is up |
//! | `replog_appends_total` | counter | | client entries committed |
//! | `replog_client_errors_total` | counter | `code` | errors answered to clients |
//! | `replog_elections_total` | counter | | elections this replica started |
//! | `replog_remote_reads_total` | counter | `path` | log-tail reads this replica issued, by how they were answered: `rdma_read` (one-sided, no peer CPU) or `side_channel` (the peer's CPU) |
//! | `replog_remote_read_fallbacks_total` | counter | | reads that tried the peer's RDMA mirror and fell back to the side channel |

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use parking_lot::Mutex;

/// The roles [`Metrics::set_role`] knows, in rendering order.
pub const ROLES: [&str; 5] = ["follower", "precandidate", "candidate", "leader", "learner"];

/// Upper bounds (seconds) of the commit latency histogram's buckets; `+Inf` follows.
pub const LATENCY_BUCKETS: [f64; 20] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The largest latency the histogram resolves (longer ones are counted as this).
const MAX_LATENCY_NS: u64 = 3_600_000_000_000;

/// Commit latencies: an HDR histogram in nanoseconds (3 significant digits) and the
/// exact sum.
struct Latency {
    hist: Histogram<u64>,
    sum_ns: u128,
}

/// A peer as last reported.
#[derive(Clone, Copy)]
struct Peer {
    lag: u64,
    connected: bool,
}

/// The metrics of one replica. Updated by the node thread, read by the HTTP thread.
pub struct Metrics {
    node: u64,
    latency: Mutex<Latency>,
    /// Index into [`ROLES`]; `u8::MAX` while unset (a role not in `ROLES` also shows
    /// every known role as 0).
    role: AtomicU8,
    ballot_round: AtomicU64,
    ballot_node: AtomicU64,
    commit_index: AtomicU64,
    applied_slot: AtomicU64,
    applied_position: AtomicU64,
    log_bytes: AtomicU64,
    appends: AtomicU64,
    elections: AtomicU64,
    /// Remote reads answered by RDMA READ, by the side channel, and fallbacks.
    remote_reads: [AtomicU64; 3],
    peers: Mutex<BTreeMap<u64, Peer>>,
    client_errors: Mutex<BTreeMap<String, u64>>,
}

impl Metrics {
    /// Empty metrics for replica `node`.
    pub fn new(node: u64) -> Arc<Metrics> {
        let hist = Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).expect("valid histogram bounds");
        Arc::new(Metrics {
            node,
            latency: Mutex::new(Latency { hist, sum_ns: 0 }),
            role: AtomicU8::new(u8::MAX),
            ballot_round: AtomicU64::new(0),
            ballot_node: AtomicU64::new(0),
            commit_index: AtomicU64::new(0),
            applied_slot: AtomicU64::new(0),
            applied_position: AtomicU64::new(0),
            log_bytes: AtomicU64::new(0),
            appends: AtomicU64::new(0),
            elections: AtomicU64::new(0),
            remote_reads: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
            peers: Mutex::new(BTreeMap::new()),
            client_errors: Mutex::new(BTreeMap::new()),
        })
    }

    /// The replica these metrics describe.
    pub fn node(&self) -> u64 {
        self.node
    }

    /// Records one commit latency.
    pub fn observe_commit_latency(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let mut l = self.latency.lock();
        l.hist.saturating_record(ns.clamp(1, MAX_LATENCY_NS));
        l.sum_ns += u128::from(ns);
    }

    /// Sets the current role: one of [`ROLES`] (another name shows every role as 0).
    pub fn set_role(&self, role: &str) {
        let i = ROLES.iter().position(|r| *r == role).map_or(u8::MAX, |i| i as u8);
        self.role.store(i, Relaxed);
    }

    /// Sets the highest ballot seen.
    pub fn set_ballot(&self, round: u64, node: u64) {
        self.ballot_round.store(round, Relaxed);
        self.ballot_node.store(node, Relaxed);
    }

    /// Sets the commit index.
    pub fn set_commit_index(&self, slot: u64) {
        self.commit_index.store(slot, Relaxed);
    }

    /// Sets apply progress: the slot applied up to and the log position reached.
    pub fn set_applied(&self, slot: u64, position: u64) {
        self.applied_slot.store(slot, Relaxed);
        self.applied_position.store(position, Relaxed);
    }

    /// Sets the bytes the local log holds.
    pub fn set_log_bytes(&self, bytes: u64) {
        self.log_bytes.store(bytes, Relaxed);
    }

    /// Sets a peer's lag (slots behind the commit index) and link state.
    pub fn set_peer_lag(&self, peer: u64, lag_slots: u64, connected: bool) {
        self.peers.lock().insert(peer, Peer { lag: lag_slots, connected });
    }

    /// Forgets a peer (after a membership change).
    pub fn remove_peer(&self, peer: u64) {
        self.peers.lock().remove(&peer);
    }

    /// Counts `n` committed client entries.
    pub fn inc_appends(&self, n: u64) {
        self.appends.fetch_add(n, Relaxed);
    }

    /// Counts one error answered to a client, by error code (`"not_leader"`, ...).
    pub fn inc_client_errors(&self, code: &str) {
        let mut m = self.client_errors.lock();
        match m.get_mut(code) {
            Some(n) => *n += 1,
            None => {
                m.insert(code.to_string(), 1);
            }
        }
    }

    /// Sets the counts of remote reads by path (from the transport's own counts).
    pub fn set_remote_reads(&self, rdma_read: u64, side_channel: u64, fallbacks: u64) {
        self.remote_reads[0].store(rdma_read, Relaxed);
        self.remote_reads[1].store(side_channel, Relaxed);
        self.remote_reads[2].store(fallbacks, Relaxed);
    }

    /// Remote reads answered by RDMA READ, by the side channel, and the fallbacks among them.
    pub fn remote_reads(&self) -> (u64, u64, u64) {
        let r = &self.remote_reads;
        (r[0].load(Relaxed), r[1].load(Relaxed), r[2].load(Relaxed))
    }

    /// Counts one election started by this replica.
    pub fn inc_elections(&self) {
        self.elections.fetch_add(1, Relaxed);
    }

    /// The Prometheus text exposition (format 0.0.4) of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let node = self.node;
        let nl = format!("node=\"{node}\"");

        // The histogram: cumulative buckets, +Inf equal to the count.
        {
            let l = self.latency.lock();
            header(
                &mut out,
                "replog_commit_latency_seconds",
                "histogram",
                "Time from an append's arrival at the leader to its commit.",
            );
            for le in LATENCY_BUCKETS {
                let le_ns = (le * 1e9).round() as u64;
                let n = if l.hist.is_empty() { 0 } else { l.hist.count_between(0, le_ns) };
                let _ = writeln!(out, "replog_commit_latency_seconds_bucket{{{nl},le=\"{le}\"}} {n}");
            }
            let count = l.hist.len();
            let _ = writeln!(out, "replog_commit_latency_seconds_bucket{{{nl},le=\"+Inf\"}} {count}");
            let sum = l.sum_ns as f64 / 1e9;
            let _ = writeln!(out, "replog_commit_latency_seconds_sum{{{nl}}} {sum}");
            let _ = writeln!(out, "replog_commit_latency_seconds_count{{{nl}}} {count}");
        }

        header(&mut out, "replog_role", "gauge", "The replica's role: 1 for the current one, 0 for the others.");
        let role = self.role.load(Relaxed) as usize;
        for (i, r) in ROLES.iter().enumerate() {
            let v = u8::from(i == role);
            let _ = writeln!(out, "replog_role{{{nl},role=\"{r}\"}} {v}");
        }

        let gauges: [(&str, &str, &AtomicU64); 7] = [
            ("replog_ballot_round", "Round of the highest ballot seen.", &self.ballot_round),
            ("replog_ballot_node", "Node of the highest ballot seen.", &self.ballot_node),
            ("replog_commit_index", "The commit index: every slot below it is chosen.", &self.commit_index),
            ("replog_applied_slot", "Slots applied to the client-visible log.", &self.applied_slot),
            ("replog_applied_position", "Client-visible log position reached by apply.", &self.applied_position),
            ("replog_log_bytes", "Bytes held by the local log.", &self.log_bytes),
            ("replog_appends_total", "Client entries committed.", &self.appends),
        ];
        for (name, help, v) in gauges {
            let kind = if name.ends_with("_total") { "counter" } else { "gauge" };
            header(&mut out, name, kind, help);
            let _ = writeln!(out, "{name}{{{nl}}} {}", v.load(Relaxed));
        }
        header(&mut out, "replog_elections_total", "counter", "Elections this replica started.");
        let _ = writeln!(out, "replog_elections_total{{{nl}}} {}", self.elections.load(Relaxed));
        let (rdma, side, fallbacks) = self.remote_reads();
        header(&mut out, "replog_remote_reads_total", "counter", "Log-tail reads issued, by how they were answered.");
        let _ = writeln!(out, "replog_remote_reads_total{{{nl},path=\"rdma_read\"}} {rdma}");
        let _ = writeln!(out, "replog_remote_reads_total{{{nl},path=\"side_channel\"}} {side}");
        header(
            &mut out,
            "replog_remote_read_fallbacks_total",
            "counter",
            "Reads that tried the peer's RDMA mirror and fell back to the side channel.",
        );
        let _ = writeln!(out, "replog_remote_read_fallbacks_total{{{nl}}} {fallbacks}");

        let peers: Vec<(u64, Peer)> = self.peers.lock().iter().map(|(k, v)| (*k, *v)).collect();
        header(&mut out, "replog_peer_lag_slots", "gauge", "Slots a peer trails the commit index by.");
        for (p, s) in &peers {
            let _ = writeln!(out, "replog_peer_lag_slots{{{nl},peer=\"{p}\"}} {}", s.lag);
        }
        header(&mut out, "replog_peer_connected", "gauge", "1 while the link to a peer is up.");
        for (p, s) in &peers {
            let v = u8::from(s.connected);
            let _ = writeln!(out, "replog_peer_connected{{{nl},peer=\"{p}\"}} {v}");
        }

        let errors: Vec<(String, u64)> = self.client_errors.lock().iter().map(|(k, v)| (k.clone(), *v)).collect();
        header(&mut out, "replog_client_errors_total", "counter", "Errors answered to clients, by code.");
        for (code, n) in errors {
            let code = escape_label(&code);
            let _ = writeln!(out, "replog_client_errors_total{{{nl},code=\"{code}\"}} {n}");
        }
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Escapes a label value: backslash, double quote and newline.
fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// How long one connection may take, from accept to the end of its response.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 64;
/// The largest request head (request line and headers) read.
const MAX_REQUEST_BYTES: usize = 8192;

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_CONN: usize = 2;

/// The Prometheus endpoint: one thread serving `GET /metrics` with minimal
/// HTTP/1.1 (`Connection: close` after each response).
///
/// All connections are multiplexed on the one thread with non-blocking sockets, so a
/// client that connects and sends nothing delays nobody; it is closed after
/// [`CONNECTION_TIMEOUT`]. Answers: `GET` or `HEAD /metrics` → 200
/// `text/plain; version=0.0.4`; another path → 404; another method on `/metrics` →
/// 405; a malformed or oversized request → 400.
pub struct MetricsServer {
    addr: SocketAddr,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Serves `metrics` on `listener` (already bound) from a new thread.
    pub fn start(listener: std::net::TcpListener, metrics: Arc<Metrics>) -> io::Result<MetricsServer> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let mut listener = TcpListener::from_std(listener);
        let poll = Poll::new()?;
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let thread = std::thread::Builder::new().name(format!("metrics-{}", metrics.node())).spawn(move || {
            let mut s =
                Server { poll, listener, metrics, conns: BTreeMap::new(), next_token: FIRST_CONN, saturated: false };
            if let Err(e) = s.run() {
                tracing::error!(error = %e, "metrics endpoint stopped");
            }
        })?;
        Ok(MetricsServer { addr, waker, thread: Some(thread) })
    }

    /// The address the endpoint listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the thread and closes the listener and every connection.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.waker.wake();
            let _ = t.join();
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Conn {
    stream: TcpStream,
    deadline: Instant,
    input: Vec<u8>,
    /// The response, once the request is read; `sent` bytes of it are written.
    output: Option<Vec<u8>>,
    sent: usize,
    /// The response is sent and our side shut: input is read and dropped until the
    /// client closes (closing with unread input would reset the connection and could
    /// destroy the response before the client reads it).
    draining: bool,
}

struct Server {
    poll: Poll,
    listener: TcpListener,
    metrics: Arc<Metrics>,
    conns: BTreeMap<usize, Conn>,
    next_token: usize,
    /// Accepting stopped at [`MAX_CONNECTIONS`] with connections maybe waiting.
    saturated: bool,
}

impl Server {
    fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(128);
        loop {
            let now = Instant::now();
            self.conns.retain(|_, c| c.deadline > now);
            let timeout = self.conns.values().map(|c| c.deadline.saturating_duration_since(now)).min();
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for ev in events.iter() {
                match ev.token() {
                    WAKER => return Ok(()),
                    LISTENER => self.accept(),
                    Token(t) => {
                        let done = match self.conns.get_mut(&t) {
                            Some(c) => serve(c, &self.metrics),
                            None => continue,
                        };
                        if done {
                            if let Some(mut c) = self.conns.remove(&t) {
                                let _ = self.poll.registry().deregister(&mut c.stream);
                            }
                        }
                    }
                }
            }
            if self.saturated && self.conns.len() < MAX_CONNECTIONS {
                self.accept();
            }
        }
    }

    fn accept(&mut self) {
        self.saturated = false;
        while self.conns.len() < MAX_CONNECTIONS {
            let (mut stream, _) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if is_transient_accept_error(&e) => continue,
                Err(e) => {
                    // Out of descriptors or memory: keep serving the connections we
                    // have; the next connection attempt retries.
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    return;
                }
            };
            let t = self.next_token;
            self.next_token += 1;
            if let Err(e) =
                self.poll.registry().register(&mut stream, Token(t), Interest::READABLE | Interest::WRITABLE)
            {
                tracing::warn!(error = %e, "metrics endpoint: cannot watch a connection");
                continue;
            }
            self.conns.insert(
                t,
                Conn {
                    stream,
                    deadline: Instant::now() + CONNECTION_TIMEOUT,
                    input: Vec::new(),
                    output: None,
                    sent: 0,
                    draining: false,
                },
            );
        }
        // At the limit: the rest wait in the backlog. The listener is edge
        // triggered, so `run` looks again when a connection ends.
        self.saturated = true;
    }
}

fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::Interrupted)
}

/// Advances one connection; true when it is finished (answered or failed).
fn serve(c: &mut Conn, metrics: &Metrics) -> bool {
    if c.draining {
        return drain(c);
    }
    if c.output.is_none() {
        let mut buf = [0u8; 2048];
        loop {
            match c.stream.read(&mut buf) {
                Ok(0) => {
                    if c.input.is_empty() {
                        return true;
                    }
                    c.output = Some(respond(&c.input, metrics, true));
                    break;
                }
                Ok(n) => {
                    c.input.extend_from_slice(&buf[..n]);
                    if let Some(end) = find_head_end(&c.input) {
                        c.input.truncate(end);
                        c.output = Some(respond(&c.input, metrics, false));
                        break;
                    }
                    if c.input.len() > MAX_REQUEST_BYTES {
                        c.output = Some(response(400, "Bad Request", "request too large\n", false));
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return true,
            }
        }
    }
    let out = c.output.as_ref().expect("a response");
    while c.sent < out.len() {
        match c.stream.write(&out[c.sent..]) {
            Ok(0) => return true,
            Ok(n) => c.sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
    }
    let _ = c.stream.flush();
    if c.stream.shutdown(std::net::Shutdown::Write).is_err() {
        return true;
    }
    c.draining = true;
    drain(c)
}

/// Reads and drops input; true once the client closed (or failed).
fn drain(c: &mut Conn) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match c.stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
    }
}

fn find_head_end(b: &[u8]) -> Option<usize> {
    if let Some(i) = b.windows(4).position(|w| w == b"\r\n\r\n") {
        return Some(i + 4);
    }
    b.windows(2).position(|w| w == b"\n\n").map(|i| i + 2)
}

/// The response to a request head (`truncated`: the peer closed before its end).
fn respond(head: &[u8], metrics: &Metrics, truncated: bool) -> Vec<u8> {
    let bad = |why: &str| response(400, "Bad Request", &format!("{why}\n"), false);
    if truncated {
        return bad("incomplete request");
    }
    let Ok(head) = std::str::from_utf8(head) else {
        return bad("request is not UTF-8");
    };
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return bad("malformed request line");
    };
    if !matches!(version, "HTTP/1.0" | "HTTP/1.1")
        || method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_uppercase())
        || !target.starts_with('/')
    {
        return bad("malformed request line");
    }
    let path = target.split('?').next().unwrap_or(target);
    if path != "/metrics" {
        return response(404, "Not Found", "not found: try /metrics\n", false);
    }
    match method {
        "GET" => response(200, "OK", &metrics.render(), false),
        "HEAD" => response(200, "OK", &metrics.render(), true),
        _ => {
            let mut r = response(405, "Method Not Allowed", "use GET\n", false);
            // Insert the Allow header after the status line.
            let at = r.iter().position(|&b| b == b'\n').map_or(0, |i| i + 1);
            r.splice(at..at, b"Allow: GET, HEAD\r\n".iter().copied());
            r
        }
    }
}

fn response(code: u16, reason: &str, body: &str, head_only: bool) -> Vec<u8> {
    let ctype = if code == 200 { "text/plain; version=0.0.4; charset=utf-8" } else { "text/plain; charset=utf-8" };
    let mut r = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        r.extend_from_slice(body.as_bytes());
    }
    r
}
