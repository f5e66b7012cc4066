//! Test support: real `replog serve` processes on loopback, stopped when dropped.
#![allow(dead_code)]

use replog::client::{Client, ClientConfig, Status};
use replog::config::{DurabilityKind, ServeConfig};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The number `name=N` in a log line (a tracing field), 0 if absent or not a number.
pub fn log_field(line: &str, name: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The state letter of process `pid` (`T`: stopped) from /proc.
pub fn proc_state(pid: i32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next().map(str::to_owned))
}

/// A free run of `n` consecutive loopback ports (probed, below the ephemeral range:
/// [`replog::config::free_loopback_ports`]).
pub fn free_ports(n: u16) -> u16 {
    match replog::config::free_loopback_ports(n) {
        Ok(base) => base,
        Err(e) => panic!("{e}"),
    }
}

/// A cluster of `replog serve` processes.
pub struct Cluster {
    pub dir: PathBuf,
    pub cfgs: Vec<ServeConfig>,
    pub procs: Vec<Option<Child>>,
    /// The client secret the replicas require (from their `client_secret_file`), which
    /// this harness's clients present.
    pub client_secret: Option<Vec<u8>>,
    /// TLS for this harness's clients (trusting the replicas' `tls_cert_file` as a CA,
    /// for the name `localhost`) when the replicas speak TLS.
    pub client_tls: Option<replog::client::TlsClientConfig>,
}

impl Cluster {
    /// Writes configs for `n` replicas under `dir` and starts them.
    pub fn start(dir: &Path, n: usize, durability: DurabilityKind) -> Cluster {
        let base = free_ports(3 * n as u16 + 3);
        let cfgs = ServeConfig::local_cluster(n, base, dir, durability);
        let mut c = Cluster { dir: dir.to_path_buf(), cfgs, procs: Vec::new(), client_secret: None, client_tls: None };
        for i in 0..n {
            let p = c.spawn(i);
            c.procs.push(Some(p));
        }
        c
    }

    fn spawn(&self, i: usize) -> Child {
        let cfg = &self.cfgs[i];
        serve_command(&self.dir, &format!("node-{}", cfg.id), cfg, &[]).spawn().expect("start replog serve")
    }

    pub fn cluster_id(&self) -> u64 {
        self.cfgs[0].cluster_id
    }

    pub fn client_addrs(&self) -> Vec<SocketAddr> {
        self.cfgs.iter().map(|c| c.me().client_addr).collect()
    }

    pub fn client(&self) -> Client {
        let mut cfg = ClientConfig::new(self.cluster_id(), self.client_addrs());
        cfg.timeout = Duration::from_secs(2);
        cfg.retries = 60;
        cfg.secret = self.client_secret.clone();
        cfg.tls = self.client_tls.clone();
        Client::connect(cfg).expect("connect to the cluster")
    }

    /// A client talking to replica `i` only (reads are served by any replica).
    pub fn client_of(&self, i: usize) -> Client {
        let mut cfg = ClientConfig::new(self.cluster_id(), vec![self.cfgs[i].me().client_addr]);
        cfg.timeout = Duration::from_secs(2);
        cfg.secret = self.client_secret.clone();
        cfg.tls = self.client_tls.clone();
        Client::connect(cfg).expect("connect to a replica")
    }

    pub fn status(&self, i: usize) -> Option<Status> {
        let addr = self.cfgs[i].me().client_addr;
        let mut cfg = ClientConfig::new(self.cluster_id(), vec![addr]);
        cfg.timeout = Duration::from_millis(500);
        cfg.secret = self.client_secret.clone();
        cfg.tls = self.client_tls.clone();
        Client::status_at(addr, &cfg).ok()
    }

    /// The index of the replica that says it leads, waiting up to `timeout`.
    pub fn wait_leader(&self, timeout: Duration) -> usize {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            for i in 0..self.cfgs.len() {
                if self.procs[i].is_some() {
                    if let Some(s) = self.status(i) {
                        if s.role == "leader" {
                            return i;
                        }
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("no leader within {timeout:?}; logs in {}", self.dir.display());
    }

    /// SIGKILLs replica `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.procs[i].take() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }

    /// Restarts replica `i` on its data directory.
    pub fn restart(&mut self, i: usize) {
        assert!(self.procs[i].is_none());
        let p = self.spawn(i);
        self.procs[i] = Some(p);
    }

    /// Waits until every running replica applied the same number of entries, at least
    /// `min`; returns that number.
    pub fn wait_converged(&self, min: u64, timeout: Duration) -> u64 {
        let t0 = Instant::now();
        let mut last = Vec::new();
        while t0.elapsed() < timeout {
            last = (0..self.cfgs.len()).map(|i| self.status(i).map(|s| (s.last_position, s.applied_slot))).collect();
            if let Some(Some((p, _))) = last.first() {
                if *p >= min && last.iter().all(|s| s.map(|x| x.0) == Some(*p)) {
                    return *p;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("replicas did not converge: {last:?}; logs in {}", self.dir.display());
    }

    /// The whole log as replica `i` serves it.
    pub fn read_all(&self, i: usize) -> Vec<(u64, Vec<u8>)> {
        read_log(&mut self.client_of(i))
    }

    /// After healing: every replica serves the same log of at least `min` entries
    /// (within `timeout`), no entry twice, and every acknowledged append at its
    /// position. Returns that log.
    pub fn check_acked_once(&self, acked: &[Acked], min: u64, timeout: Duration) -> Vec<(u64, Vec<u8>)> {
        let total = self.wait_converged(min, timeout);
        let logs: Vec<Vec<(u64, Vec<u8>)>> = (0..self.cfgs.len()).map(|i| self.read_all(i)).collect();
        for (i, l) in logs.iter().enumerate() {
            assert_eq!(l.len() as u64, total, "replica {} serves {} entries", i + 1, l.len());
            assert!(l == &logs[0], "replica {} holds a different log from replica 1", i + 1);
        }
        let mut seen: std::collections::HashMap<&[u8], u64> = std::collections::HashMap::new();
        for (p, d) in &logs[0] {
            assert!(seen.insert(d.as_slice(), *p).is_none(), "entry {:?} appears twice", String::from_utf8_lossy(d));
        }
        for a in acked {
            assert_eq!(
                seen.get(a.payload.as_slice()),
                Some(&a.pos),
                "acknowledged entry {:?} at position {} is not there",
                String::from_utf8_lossy(&a.payload),
                a.pos
            );
        }
        logs.into_iter().next().unwrap_or_default()
    }

    pub fn log_of(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("node-{}.log", self.cfgs[i].id))).unwrap_or_default()
    }
}

/// The whole log as `c`'s replica serves it, from position 1, checking that positions
/// are consecutive.
pub fn read_log(c: &mut Client) -> Vec<(u64, Vec<u8>)> {
    read_log_from(c, 1)
}

/// The log as `c`'s replica serves it from position `from` on, checking that positions
/// are consecutive.
pub fn read_log_from(c: &mut Client, from: u64) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut from = from;
    for _ in 0..100_000 {
        let batch = c.read(from, 4096).expect("read");
        if batch.is_empty() {
            break;
        }
        for (p, d) in batch {
            assert_eq!(p, from, "positions are consecutive");
            from += 1;
            out.push((p, d.to_vec()));
        }
    }
    out
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for p in self.procs.iter_mut().flatten() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Raw sockets, log lines and processes (for bad-input and CLI tests).

/// What a raw connection saw: the bytes received before the close, whether the
/// replica closed it within the bound, how long that took, and the local address
/// (which the replica's log lines name).
pub struct RawOutcome {
    pub received: Vec<u8>,
    pub closed: bool,
    pub elapsed: Duration,
    pub local: String,
}

/// Opens a plain TCP connection to `addr`, sends `bytes` (then shuts down the write
/// side if `half_close`), and reads until the other side closes it (`Ok(0)` or an
/// error such as a reset) or `within` passes.
pub fn raw_send(addr: SocketAddr, bytes: &[u8], half_close: bool, within: Duration) -> RawOutcome {
    use std::io::{ErrorKind, Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect raw");
    let local = s.local_addr().unwrap().to_string();
    let t0 = Instant::now();
    // A write error means the replica already closed (and reset) the connection.
    let _ = s.write_all(bytes);
    if half_close {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let mut closed = false;
    for _ in 0..100_000 {
        if t0.elapsed() >= within {
            break;
        }
        match s.read(&mut buf) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    RawOutcome { received, closed, elapsed: t0.elapsed(), local }
}

/// Every whole envelope frame in `bytes` (stops at the first undecodable one).
pub fn frames_in(bytes: &[u8]) -> Vec<transport::envelope::Frame> {
    let d = transport::envelope::Decoder::new(replog::client::MAX_FRAME);
    let mut b = bytes::BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Ok(Some(f)) = d.decode(&mut b) {
        out.push(f);
    }
    out
}

/// `text` without ANSI escape sequences (`ESC [ ... letter`).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Cluster {
    /// The first line of replica `i`'s log (ANSI colours removed) that contains every
    /// one of `needles`, waiting up to `timeout` for it to appear.
    pub fn wait_log_line(&self, i: usize, needles: &[&str], timeout: Duration) -> Option<String> {
        let t0 = Instant::now();
        loop {
            let text = strip_ansi(&self.log_of(i));
            if let Some(l) = text.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return Some(l.to_string());
            }
            if t0.elapsed() >= timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Like [`start`](Self::start), with each replica's configuration adjusted by
    /// `tweak` before it is written and started.
    pub fn start_with(dir: &Path, n: usize, durability: DurabilityKind, tweak: impl Fn(&mut ServeConfig)) -> Cluster {
        let base = free_ports(3 * n as u16 + 3);
        let mut cfgs = ServeConfig::local_cluster(n, base, dir, durability);
        cfgs.iter_mut().for_each(&tweak);
        let client_secret = cfgs[0].read_client_secret().expect("the client secret file");
        let client_tls = cfgs[0].security.tls_cert_file.as_ref().map(|cert| {
            replog::client::TlsClientConfig::from_ca_file(cert, "localhost").expect("the TLS certificate as a CA")
        });
        let mut c = Cluster { dir: dir.to_path_buf(), cfgs, procs: Vec::new(), client_secret, client_tls };
        for i in 0..n {
            let p = c.spawn(i);
            c.procs.push(Some(p));
        }
        c
    }

    /// The operating-system process ids of the running replicas.
    pub fn pids(&self) -> Vec<Option<u32>> {
        self.procs.iter().map(|p| p.as_ref().map(|c| c.id())).collect()
    }
}

/// Process ids (other than this one) whose command line contains every one of `needles`
/// (read from /proc; empty where /proc is missing).
pub fn pids_matching(needles: &[&str]) -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        if needles.iter().all(|n| cmd.contains(n)) {
            out.push(pid);
        }
    }
    out
}

impl Cluster {
    /// Like [`start`](Self::start), with every replica holding `secret` in
    /// `dir/secret` (`[security] secret_file`).
    pub fn start_with_secret(dir: &Path, n: usize, durability: DurabilityKind, secret: &[u8]) -> Cluster {
        std::fs::create_dir_all(dir).expect("test dir");
        let path = dir.join("secret");
        std::fs::write(&path, secret).expect("write the secret");
        Cluster::start_with(dir, n, durability, |c| c.security.secret_file = Some(path.clone()))
    }
}

/// Starts `replog serve` on `cfg`, written to `dir/<name>.toml`, logging to
/// `dir/<name>.log`.
pub fn spawn_serve(dir: &Path, name: &str, cfg: &ServeConfig) -> Child {
    serve_command(dir, name, cfg, &[]).spawn().expect("start replog serve")
}

/// The command that runs `replog serve` on `cfg` (written to `dir/<name>.toml` first),
/// logging to `dir/<name>.log` (appended, so a restart keeps the earlier lines), run
/// through `wrapper` when it is not empty (e.g. `ip netns exec NS`, which execs the
/// binary: the child's pid is the replica's).
pub fn serve_command(dir: &Path, name: &str, cfg: &ServeConfig, wrapper: &[&str]) -> Command {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, cfg.to_toml()).expect("write config");
    let log =
        std::fs::OpenOptions::new().create(true).append(true).open(dir.join(format!("{name}.log"))).expect("log file");
    let replog = env!("CARGO_BIN_EXE_replog");
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(replog);
            c
        }
        None => Command::new(replog),
    };
    cmd.args(["serve", "--config"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file handle"))
        .stderr(log);
    cmd
}

// ---------------------------------------------------------------------------------------
// A continuous append load (for tests that change the cluster under load).

/// One acknowledged append: payload, position, when it was called and when it returned.
#[derive(Clone, Debug)]
pub struct Acked {
    pub payload: Vec<u8>,
    pub pos: u64,
    pub called: Instant,
    pub returned: Instant,
}

/// What the appenders saw: acknowledged appends, and appends whose outcome is unknown.
#[derive(Clone, Debug, Default)]
pub struct Outcomes {
    pub acked: Vec<Acked>,
    pub unknown: Vec<Vec<u8>>,
}

/// Clients appending `client<c>-entry<i>` one at a time, each on a thread of its own,
/// until stopped (or `max_each` appends each).
pub struct Appenders {
    pub acked: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub results: std::sync::Arc<std::sync::Mutex<Outcomes>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Appenders {
    /// Clients appending `client<c>-entry<i>`.
    pub fn start(cluster: &Cluster, clients: usize, max_each: u64) -> Appenders {
        Appenders::start_named(cluster, "client", clients, max_each)
    }

    /// Clients appending `<prefix><c>-entry<i>`.
    pub fn start_named(cluster: &Cluster, prefix: &str, clients: usize, max_each: u64) -> Appenders {
        use std::sync::atomic::Ordering;
        let a = Appenders {
            acked: Default::default(),
            stop: Default::default(),
            results: Default::default(),
            threads: Vec::new(),
        };
        let mut threads = Vec::new();
        for c in 0..clients {
            let mut client = cluster.client();
            let (acked, stop, results) = (a.acked.clone(), a.stop.clone(), a.results.clone());
            let prefix = prefix.to_string();
            threads.push(std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) && i < max_each {
                    let payload = format!("{prefix}{c}-entry{i}").into_bytes();
                    i += 1;
                    let called = Instant::now();
                    match client.append(payload.clone()) {
                        Ok(pos) => {
                            let returned = Instant::now();
                            results.lock().unwrap().acked.push(Acked { payload, pos, called, returned });
                            acked.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => {
                            eprintln!("client {c}: append outcome unknown: {e}");
                            results.lock().unwrap().unknown.push(payload);
                        }
                    }
                }
            }));
        }
        Appenders { threads, ..a }
    }

    /// Waits until `more` appends beyond those acknowledged so far are acknowledged.
    pub fn wait_more(&self, more: u64) {
        use std::sync::atomic::Ordering;
        let n = self.acked.load(Ordering::SeqCst) + more;
        let t0 = Instant::now();
        while self.acked.load(Ordering::SeqCst) < n {
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "appends stalled at {}",
                self.acked.load(Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until `n` appends in all are acknowledged (at most `limit`).
    pub fn wait_total(&self, n: u64, limit: Duration) {
        use std::sync::atomic::Ordering;
        let t0 = Instant::now();
        while self.acked.load(Ordering::SeqCst) < n {
            assert!(t0.elapsed() < limit, "appends stalled at {}", self.acked.load(Ordering::SeqCst));
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The failover after a leader was killed at `killed_at`: the time from then to the
    /// first acknowledgement of an append called after it (so the killed leader cannot
    /// have served it). Fails the test if none comes within `limit`.
    pub fn failover_after(&self, killed_at: Instant, limit: Duration) -> Duration {
        let t0 = Instant::now();
        loop {
            assert!(t0.elapsed() < limit, "no append succeeded within {limit:?} after killing the leader");
            let r = self.results.lock().unwrap();
            if let Some(first) = r.acked.iter().filter(|a| a.called > killed_at).map(|a| a.returned).min() {
                return first.duration_since(killed_at);
            }
            drop(r);
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits until every client made its `max_each` appends and returns what they saw.
    pub fn join(self) -> Outcomes {
        self.collect()
    }

    /// Stops the clients and returns what they saw.
    pub fn finish(self) -> Outcomes {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.collect()
    }

    fn collect(self) -> Outcomes {
        for t in self.threads {
            t.join().expect("client thread");
        }
        let r = self.results.lock().unwrap().clone();
        println!("{} appends acknowledged, {} with unknown outcome", r.acked.len(), r.unknown.len());
        r
    }
}
