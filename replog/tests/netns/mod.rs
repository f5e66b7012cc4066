//! Test support: replicas in network namespaces joined by a bridge (made and removed
//! by `hw-setup/netns.sh`), with `replog serve` processes started inside them through
//! `ip netns exec`. Everything is torn down when dropped, also on panic.
//!
//! Layout (see the script): replica `i` (1-based) lives in namespace `rl<run>-<i>` with
//! address `10.77.<run>.<i>`; the bridge lives in `rl<run>-br`, which also holds the
//! address `10.77.<run>.254`, so code run there (see [`in_netns`]) reaches every
//! replica. The host's own interfaces and routes are never touched.
#![allow(dead_code)]

use replog::client::{Client, ClientConfig, Status};
use replog::config::{DurabilityKind, Member, ServeConfig};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Why this machine cannot run namespace tests, if it cannot.
pub fn missing_prerequisite() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("network namespaces need root (run as root)".into());
    }
    match Command::new("ip").arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status() {
        Ok(s) if s.success() => {}
        _ => return Some("the `ip` command (iproute2) is missing: apt-get install iproute2".into()),
    }
    match Command::new("bash").arg("--version").stdout(Stdio::null()).status() {
        Ok(s) if s.success() => {}
        _ => return Some("bash is missing (hw-setup/netns.sh needs it)".into()),
    }
    None
}

/// Skips (returns true after saying why) when something is missing, unless
/// `REPLOG_REQUIRE_ALL` is set, in which case it panics with the reason.
pub fn skip_unless_possible(test: &str) -> bool {
    match missing_prerequisite() {
        None => false,
        Some(why) => skip_or_fail(test, &why),
    }
}

fn skip_or_fail(test: &str, why: &str) -> bool {
    if std::env::var_os("REPLOG_REQUIRE_ALL").is_some() {
        panic!("{test}: cannot run: {why} (REPLOG_REQUIRE_ALL is set, so this fails instead of skipping)");
    }
    eprintln!("SKIPPED {test}: {why} (set REPLOG_REQUIRE_ALL=1 to make this a failure)");
    true
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../hw-setup/netns.sh")
}

fn run_script(args: &[String]) -> Output {
    Command::new("bash").arg(script()).args(args).stdin(Stdio::null()).output().expect("run hw-setup/netns.sh")
}

/// The namespaces of one test run; deleted (with whatever runs in them) when dropped.
pub struct Net {
    pub run: u8,
    pub n: usize,
}

impl Net {
    /// Creates namespaces for `n` replicas under a run id derived from the process id
    /// (the next free one if taken). `None` if this machine cannot (after printing why,
    /// or panicking when `REPLOG_REQUIRE_ALL` is set).
    pub fn create(test: &str, n: usize) -> Option<Net> {
        let start = std::process::id() as usize % 253;
        for k in 0..253 {
            let run = ((start + k) % 253 + 1) as u8;
            let out = run_script(&["create".into(), run.to_string(), n.to_string()]);
            match out.status.code() {
                Some(0) => return Some(Net { run, n }),
                Some(3) => continue, // another run uses this id
                _ => {
                    // The script removed what it made; make sure anyway.
                    let _ = run_script(&["destroy".into(), run.to_string()]);
                    let why = format!(
                        "cannot create network namespaces (hw-setup/netns.sh create {run} {n}: {}): {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                    skip_or_fail(test, &why);
                    return None;
                }
            }
        }
        skip_or_fail(test, "every run id 1..253 is in use");
        None
    }

    /// Replica `i`'s namespace (1-based).
    pub fn ns(&self, i: usize) -> String {
        format!("rl{}-{}", self.run, i)
    }

    /// The bridge's namespace, from which every replica is reachable.
    pub fn bridge_ns(&self) -> String {
        format!("rl{}-br", self.run)
    }

    /// Replica `i`'s address (1-based).
    pub fn addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.run, i as u8)
    }

    fn script(&self, cmd: &str, i: usize) {
        let out = run_script(&[cmd.into(), self.run.to_string(), i.to_string()]);
        assert!(
            out.status.success(),
            "hw-setup/netns.sh {cmd} {} {i}: {}: {}",
            self.run,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Cuts replica `i` off: its port on the bridge goes down.
    pub fn cut(&self, i: usize) {
        self.script("cut", i);
    }

    /// Reconnects replica `i`.
    pub fn heal(&self, i: usize) {
        self.script("heal", i);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let out = run_script(&["destroy".into(), self.run.to_string()]);
        if !out.status.success() {
            eprintln!("netns.sh destroy {}: {}", self.run, String::from_utf8_lossy(&out.stderr));
            // Try once more directly.
            let mut names = vec![self.bridge_ns()];
            names.extend((1..=self.n).map(|i| self.ns(i)));
            for ns in names {
                let _ = Command::new("ip").args(["netns", "del", &ns]).stderr(Stdio::null()).status();
            }
        }
    }
}

/// Runs `f` on a thread that entered network namespace `ns` (sockets it opens live
/// there) and returns its result; a panic in `f` is propagated.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            let file =
                std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap_or_else(|e| panic!("open netns {ns}: {e}"));
            // SAFETY: setns on a valid namespace fd; it changes only this thread's
            // network namespace (a thread of our own that runs nothing else).
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns into {ns}: {}", std::io::Error::last_os_error());
            f()
        });
        match h.join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    })
}

/// Port numbers each replica uses on its own address.
pub const PEER_PORT: u16 = 7100;
pub const CLIENT_PORT: u16 = 7101;
pub const METRICS_PORT: u16 = 7102;

/// `replog serve` processes, one per namespace. Dropping it kills the processes, then
/// deletes the namespaces.
pub struct NetCluster {
    pub dir: PathBuf,
    pub cfgs: Vec<ServeConfig>,
    pub procs: Vec<Option<Child>>,
    // Declared last: dropped after the processes are killed.
    pub net: Net,
}

impl NetCluster {
    /// Configures `net.n` replicas (fsync durability, data under `dir`) on the
    /// namespaces' addresses and starts each inside its namespace.
    pub fn start(net: Net, dir: &Path, durability: DurabilityKind) -> NetCluster {
        let n = net.n;
        let members: Vec<Member> = (1..=n)
            .map(|i| {
                let ip = net.addr(i);
                Member {
                    id: i as u64,
                    peer_addr: SocketAddr::from((ip, PEER_PORT)),
                    client_addr: SocketAddr::from((ip, CLIENT_PORT)),
                    metrics_addr: Some(SocketAddr::from((ip, METRICS_PORT))),
                    learner: false,
                }
            })
            .collect();
        let mut cfgs = ServeConfig::local_cluster(n, PEER_PORT, dir, durability);
        for c in &mut cfgs {
            c.members = members.clone();
            c.validate().expect("valid configuration");
        }
        let mut c = NetCluster { dir: dir.to_path_buf(), cfgs, procs: Vec::new(), net };
        for i in 0..n {
            let p = c.spawn(i);
            c.procs.push(Some(p));
        }
        c
    }

    fn spawn(&self, i: usize) -> Child {
        let cfg = &self.cfgs[i];
        let ns = self.net.ns(i + 1);
        crate::support::serve_command(&self.dir, &format!("node-{}", cfg.id), cfg, &["ip", "netns", "exec", &ns])
            .spawn()
            .expect("start replog serve in its namespace")
    }

    pub fn cluster_id(&self) -> u64 {
        self.cfgs[0].cluster_id
    }

    /// Replica `i`'s client address (0-based index).
    pub fn client_addr(&self, i: usize) -> SocketAddr {
        self.cfgs[i].me().client_addr
    }

    pub fn client_addrs(&self) -> Vec<SocketAddr> {
        self.cfgs.iter().map(|c| c.me().client_addr).collect()
    }

    /// Replica `i`'s namespace (0-based index).
    pub fn ns(&self, i: usize) -> String {
        self.net.ns(i + 1)
    }

    pub fn bridge_ns(&self) -> String {
        self.net.bridge_ns()
    }

    /// Replica `i`'s status; call from a thread in a namespace that reaches it.
    pub fn status(&self, i: usize) -> Option<Status> {
        Client::status_of(self.client_addr(i), self.cluster_id(), Duration::from_millis(300)).ok()
    }

    /// A client of `servers` (call from a thread in a namespace that reaches them).
    pub fn client_of(&self, servers: Vec<SocketAddr>, timeout: Duration, retries: u32) -> Client {
        let mut cfg = ClientConfig::new(self.cluster_id(), servers);
        cfg.timeout = timeout;
        cfg.retries = retries;
        Client::connect(cfg).expect("connect to the cluster")
    }

    /// The whole log as replica `i` serves it (call from a namespace that reaches it).
    pub fn read_all(&self, i: usize) -> Vec<(u64, Vec<u8>)> {
        crate::support::read_log(&mut self.client_of(vec![self.client_addr(i)], Duration::from_secs(2), 5))
    }

    /// Whether every replica process still runs; panics naming the one that exited.
    pub fn assert_running(&mut self) {
        for (i, p) in self.procs.iter_mut().enumerate() {
            if let Some(p) = p {
                if let Ok(Some(st)) = p.try_wait() {
                    panic!("replica {} exited ({st}); log:\n{}", i + 1, self.log_of(i));
                }
            }
        }
    }

    pub fn log_of(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("node-{}.log", self.cfgs[i].id))).unwrap_or_default()
    }
}

impl Drop for NetCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The data directory goes with the test: show the end of each replica's log.
            for i in 0..self.cfgs.len() {
                let log = self.log_of(i);
                let lines: Vec<&str> = log.lines().collect();
                let tail = &lines[lines.len().saturating_sub(40)..];
                eprintln!(
                    "---- replica {} ({}), last {} log lines:\n{}",
                    i + 1,
                    self.ns(i),
                    tail.len(),
                    tail.join("\n")
                );
            }
        }
        for p in self.procs.iter_mut().flatten() {
            let _ = p.kill();
            let _ = p.wait();
        }
        // `self.net` is dropped next: it deletes the namespaces (and kills anything
        // still inside them).
    }
}

/// Polls `f` every `every` until it returns `Some`, for at most `timeout` and
/// `max_polls` polls.
pub fn poll<T>(timeout: Duration, every: Duration, max_polls: u32, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let t0 = Instant::now();
    for _ in 0..max_polls {
        if let Some(v) = f() {
            return Some(v);
        }
        if t0.elapsed() >= timeout {
            break;
        }
        std::thread::sleep(every);
    }
    None
}

/// A status ballot (`b<round>.<node>`) as a comparable pair.
pub fn parse_ballot(s: &str) -> (u64, u64) {
    let parsed = s.strip_prefix('b').and_then(|rest| rest.split_once('.')).and_then(|(r, n)| {
        let r: u64 = r.parse().ok()?;
        let n: u64 = n.parse().ok()?;
        Some((r, n))
    });
    parsed.unwrap_or_else(|| panic!("unexpected ballot format {s:?}"))
}
