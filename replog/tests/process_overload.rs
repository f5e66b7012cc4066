//! Overload: 500 client connections append as fast as they can (each keeps up to
//! `PIPELINE` appends in flight, above the replicas' per-connection limit, so the
//! client port must answer `Busy`) against a 3-replica cluster of `replog serve`
//! processes for `LOAD_FOR`. Checked: no replica crashes; the leader's resident memory
//! (VmRSS from /proc, sampled every 100 ms) stays under `RSS_BOUND`; the latency of
//! every admitted append (sent until `Appended`) stays under `LATENCY_BOUND`, with its
//! p99 under `P99_BOUND`; and nothing acknowledged is lost: read back, every
//! acknowledged entry is in the log exactly once, at the position it was acknowledged
//! with, and no entry appears twice.

mod support;

use bytes::BytesMut;
use replog::client::proto::{self, Request, Response};
use replog::client::ErrorCode;
use replog::config::DurabilityKind;
use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;
use transport::envelope::Decoder;

/// Client connections.
const CONNS: usize = 500;
/// Appends each connection keeps in flight (the replicas admit `PER_CONN_LIMIT`).
const PIPELINE: usize = 6;
/// The replicas' `limits.max_inflight_per_client` in this test.
const PER_CONN_LIMIT: u64 = 4;
/// How long the load runs.
const LOAD_FOR: Duration = Duration::from_secs(10);
/// The leader's resident memory must stay under this (it starts around 10 MiB; 500
/// connections with their buffers, the pending entries and the in-memory index of
/// ~10^5 entries need a few tens).
const RSS_BOUND: u64 = 256 << 20;
/// Every admitted append is answered within this (generous: 2 shared cores, 500
/// client threads and 3 replicas compete for them).
const LATENCY_BOUND: Duration = Duration::from_secs(5);
/// And 99% of them within this.
const P99_BOUND: Duration = Duration::from_secs(2);

#[derive(Default)]
struct ConnResult {
    /// (seq, position) of every acknowledged append.
    acked: Vec<(u64, u64)>,
    /// Latency of each admitted append (sent until `Appended`).
    latencies: Vec<Duration>,
    busy: u64,
    redirects: u64,
    reconnects: u64,
    errors: Vec<String>,
}

fn payload(client: u64, seq: u64) -> Vec<u8> {
    format!("c{client}-s{seq}-overload-entry").into_bytes()
}

struct Link {
    s: TcpStream,
    rbuf: BytesMut,
    dec: Decoder,
    buf: Vec<u8>,
}

impl Link {
    fn open(addr: SocketAddr, cluster_id: u64) -> std::io::Result<Link> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        s.set_write_timeout(Some(Duration::from_secs(5)))?;
        let mut l = Link { s, rbuf: BytesMut::new(), dec: Decoder::new(proto::MAX_FRAME), buf: vec![0; 16 << 10] };
        l.send(0, &Request::Hello { cluster_id })?;
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            match l.recv()? {
                Some((_, Response::HelloOk { .. })) => return Ok(l),
                Some((_, other)) => return Err(std::io::Error::other(format!("Hello answered {other:?}"))),
                None => {}
            }
        }
        Err(std::io::Error::other("no HelloOk within 5 s"))
    }

    fn send(&mut self, id: u64, req: &Request) -> std::io::Result<()> {
        let mut out = Vec::new();
        proto::encode_request(id, req, &mut out).map_err(std::io::Error::other)?;
        self.s.write_all(&out)
    }

    /// One response, or `None` after the read timeout.
    fn recv(&mut self) -> std::io::Result<Option<(u64, Response)>> {
        loop {
            if let Some(f) = self.dec.decode(&mut self.rbuf).map_err(std::io::Error::other)? {
                return proto::decode_response(&f).map(Some).map_err(std::io::Error::other);
            }
            match self.s.read(&mut self.buf) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.rbuf.extend_from_slice(&self.buf[..n]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Ok(None)
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// One client connection's loop: keep `PIPELINE` appends in flight until `stop`, retry
/// (same client id and sequence number) what was refused as busy or lost with a
/// connection, follow redirects; then wait (bounded) for the answers still due.
fn run_conn(
    client: u64,
    cluster_id: u64,
    servers: Vec<SocketAddr>,
    first: SocketAddr,
    stop: Arc<AtomicBool>,
) -> ConnResult {
    let mut r = ConnResult::default();
    let mut target = first;
    let mut link: Option<Link> = None;
    let mut next_seq = 1u64;
    let mut next_id = 1u64;
    let mut retry: VecDeque<u64> = VecDeque::new();
    // req id -> (seq, sent at)
    let mut inflight: HashMap<u64, (u64, Instant)> = HashMap::new();
    let mut drain_until: Option<Instant> = None;
    let mut next_server = 0usize;
    for _ in 0..1_000_000 {
        let stopping = stop.load(Ordering::Relaxed);
        if stopping && drain_until.is_none() {
            drain_until = Some(Instant::now() + Duration::from_secs(15));
        }
        if let Some(d) = drain_until {
            if inflight.is_empty() || Instant::now() >= d {
                break;
            }
        }
        if link.is_none() {
            match Link::open(target, cluster_id) {
                Ok(l) => link = Some(l),
                Err(_) => {
                    if stopping {
                        break; // nothing in flight can be answered on a new connection
                    }
                    r.reconnects += 1;
                    next_server = (next_server + 1) % servers.len();
                    target = servers[next_server];
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            }
        }
        let l = link.as_mut().expect("connected");
        let mut broken = false;
        while !stopping && inflight.len() < PIPELINE {
            let seq = retry.pop_front().unwrap_or_else(|| {
                next_seq += 1;
                next_seq - 1
            });
            let id = next_id;
            next_id += 1;
            let req = Request::Append { client, seq, entries: vec![payload(client, seq).into()] };
            if l.send(id, &req).is_err() {
                retry.push_front(seq);
                broken = true;
                break;
            }
            inflight.insert(id, (seq, Instant::now()));
        }
        if !broken {
            match l.recv() {
                Ok(None) => {}
                Ok(Some((id, resp))) => {
                    let Some((seq, sent)) = inflight.remove(&id) else {
                        r.errors.push(format!("answer to unknown request {id}: {resp:?}"));
                        continue;
                    };
                    match resp {
                        Response::Appended { positions } if positions.len() == 1 => {
                            r.latencies.push(sent.elapsed());
                            r.acked.push((seq, positions[0]));
                        }
                        Response::Error { code: ErrorCode::Busy, .. } => {
                            r.busy += 1;
                            retry.push_back(seq);
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        Response::Redirect { addr, .. } => {
                            r.redirects += 1;
                            retry.push_back(seq);
                            if let Some(a) = addr.and_then(|a| a.parse().ok()) {
                                target = a;
                            }
                            broken = true;
                        }
                        Response::Error { code: ErrorCode::Unavailable, .. } => {
                            retry.push_back(seq);
                            broken = true;
                        }
                        other => r.errors.push(format!("append c{client}#{seq} answered {other:?}")),
                    }
                }
                Err(_) => broken = true,
            }
        }
        if broken {
            // What was in flight may or may not be applied: retry it (same seq) elsewhere.
            let mut lost: Vec<(u64, (u64, Instant))> = inflight.drain().collect();
            lost.sort_by_key(|(id, _)| *id);
            retry.extend(lost.into_iter().map(|(_, (seq, _))| seq));
            link = None;
            r.reconnects += 1;
            if stopping {
                break;
            }
        }
    }
    r
}

fn rss_of(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn raise_nofile() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < 4096 {
            lim.rlim_cur = lim.rlim_max.min(4096);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    assert!(
        lim.rlim_cur >= (CONNS as u64) + 200,
        "RLIMIT_NOFILE is {} and cannot be raised above it: {CONNS} connections need more",
        lim.rlim_cur
    );
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[test]
fn five_hundred_connections_appending_flat_out_stay_bounded_and_lose_nothing() {
    // Raised before the replicas start: they inherit it.
    raise_nofile();
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start_with(dir.path(), 3, DurabilityKind::Fsync, |cfg| {
        cfg.limits.max_inflight_per_client = PER_CONN_LIMIT;
    });
    let leader = c.wait_leader(Duration::from_secs(30));
    let pids = c.pids();
    let leader_pid = pids[leader].expect("the leader runs");
    let rss_start = rss_of(leader_pid).expect("the leader's VmRSS in /proc");
    let servers = c.client_addrs();
    let first = servers[leader];
    let cluster_id = c.cluster_id();

    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for i in 0..CONNS {
        let (servers, stop) = (servers.clone(), stop.clone());
        let client = 1_000_000 + i as u64;
        threads.push(
            std::thread::Builder::new()
                .stack_size(256 << 10)
                .spawn(move || run_conn(client, cluster_id, servers, first, stop))
                .expect("spawn a client thread"),
        );
    }
    let t0 = Instant::now();
    let mut rss_max = rss_start;
    let mut samples = 0;
    while t0.elapsed() < LOAD_FOR {
        std::thread::sleep(Duration::from_millis(100));
        for (i, p) in c.pids().iter().enumerate() {
            let pid = p.expect("replica process");
            assert!(rss_of(pid).is_some(), "replica {} (pid {pid}) is gone during the load", i + 1);
        }
        if let Some(r) = rss_of(leader_pid) {
            rss_max = rss_max.max(r);
            samples += 1;
        }
    }
    stop.store(true, Ordering::SeqCst);
    let results: Vec<ConnResult> = threads.into_iter().map(|t| t.join().expect("client thread")).collect();
    let load_time = t0.elapsed();

    // No crash: every replica still runs and answers.
    for (i, p) in c.procs.iter().enumerate() {
        assert!(p.is_some() && rss_of(c.pids()[i].unwrap()).is_some(), "replica {} exited", i + 1);
        assert!(c.status(i).is_some(), "replica {} does not answer after the load", i + 1);
    }

    let leader_after = c.wait_leader(Duration::from_secs(10));
    println!("leader: replica {} before the load, replica {} after", leader + 1, leader_after + 1);
    let acked: usize = results.iter().map(|r| r.acked.len()).sum();
    let busy: u64 = results.iter().map(|r| r.busy).sum();
    let redirects: u64 = results.iter().map(|r| r.redirects).sum();
    let reconnects: u64 = results.iter().map(|r| r.reconnects).sum();
    let errors: Vec<&String> = results.iter().flat_map(|r| &r.errors).collect();
    let mut lat: Vec<Duration> = results.iter().flat_map(|r| r.latencies.iter().copied()).collect();
    lat.sort();
    let (p50, p99, max) = (percentile(&lat, 0.5), percentile(&lat, 0.99), lat.last().copied().unwrap_or_default());
    println!(
        "{CONNS} connections for {:.1} s: {acked} appends acknowledged ({:.0}/s), {busy} answered Busy, \
         {redirects} redirects, {reconnects} reconnects; admitted latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; \
         leader VmRSS {:.1} MiB at start, max {:.1} MiB over {samples} samples",
        load_time.as_secs_f64(),
        acked as f64 / LOAD_FOR.as_secs_f64(),
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3,
        rss_start as f64 / 1048576.0,
        rss_max as f64 / 1048576.0,
    );
    assert!(errors.is_empty(), "unexpected answers: {:?}", &errors[..errors.len().min(10)]);
    assert!(acked >= CONNS, "only {acked} appends acknowledged: the cluster made no real progress");
    assert!(busy > 0, "no append was answered Busy: the per-connection limit was never reached");
    assert!(rss_max < RSS_BOUND, "the leader's VmRSS reached {rss_max} bytes (bound {RSS_BOUND})");
    assert!(max < LATENCY_BOUND, "an admitted append took {max:?} (bound {LATENCY_BOUND:?})");
    assert!(p99 < P99_BOUND, "admitted append p99 {p99:?} (bound {P99_BOUND:?})");

    // Nothing acknowledged lost: read the log back from the leader once all converged.
    let total = c.wait_converged(acked as u64, Duration::from_secs(60));
    let log = c.read_all(leader);
    assert_eq!(log.len() as u64, total, "the log read back has every applied entry");
    let mut at: HashMap<Vec<u8>, u64> = HashMap::with_capacity(log.len());
    for (p, d) in &log {
        if let Some(first) = at.insert(d.clone(), *p) {
            panic!("entry {:?} is in the log twice, at {first} and {p}", String::from_utf8_lossy(d));
        }
    }
    for (i, r) in results.iter().enumerate() {
        let client = 1_000_000 + i as u64;
        for &(seq, pos) in &r.acked {
            let want = payload(client, seq);
            match at.get(&want) {
                Some(&p) => assert_eq!(p, pos, "c{client}#{seq} acknowledged at {pos}, found at {p}"),
                None => panic!("c{client}#{seq}, acknowledged at position {pos}, is not in the log"),
            }
        }
    }
    println!("read back {} entries: every one of the {acked} acknowledged appends is there exactly once", log.len());
}
