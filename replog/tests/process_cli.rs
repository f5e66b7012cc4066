//! The `replog` command as a user types it, run as subprocesses of the real binary:
//! `replog up` in the background, then `replog append`, `replog read 0`, `replog tail 0`
//! and `replog status` against it, with explicit `--servers`/`--cluster-id`, and with
//! no flags at all against `replog up`'s default ports exactly as the README shows
//! (`append hello world` prints 1 and 2, `read 0` shows `1<TAB>hello` and
//! `2<TAB>world`, the metrics answer on 127.0.0.1:7402) when those ports are free; and
//! the error paths of a cluster that is not running and of a configuration file that
//! does not exist. `replog up` is stopped with SIGINT (as Ctrl-C does) and must exit
//! cleanly and take its replica processes with it.

mod support;

use replog::config::{DurabilityKind, ServeConfig, LOCAL_CLUSTER_ID};
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_replog");

thread_local! {
    /// Where this test's short commands run (`None`: the current directory), as a user
    /// who runs `replog up` in a directory then types the commands there.
    static CWD: std::cell::RefCell<Option<PathBuf>> = const { std::cell::RefCell::new(None) };
}

fn cli_cwd() -> PathBuf {
    CWD.with(|c| c.borrow().clone()).unwrap_or_else(|| std::env::current_dir().unwrap())
}
/// `replog up`'s default first port and the ports its 3 replicas take from there.
const DEFAULT_PORTS: std::ops::RangeInclusive<u16> = 7400..=7408;
/// How long `replog up` may take to print its leader line.
const UP_WITHIN: Duration = Duration::from_secs(40);
/// How long one short command (`append`, `read`, `status`, a failing one) may take.
const CMD_WITHIN: Duration = Duration::from_secs(30);
/// How long `replog up` may take to stop after SIGINT (it gives its replicas 5 s).
const STOP_WITHIN: Duration = Duration::from_secs(15);

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a process id this test started (or found running its own
    // configuration files); no memory is involved.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Reads `r` line by line into `all` and `tx` until it ends.
fn pump(r: impl Read + Send + 'static, all: Arc<Mutex<Vec<String>>>, tx: Option<mpsc::Sender<String>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            all.lock().unwrap().push(line.clone());
            if let Some(tx) = &tx {
                let _ = tx.send(line);
            }
        }
    });
}

/// A long-running `replog` command (`up`, `tail`) in the background; stopped (SIGINT,
/// then SIGKILL after a bound), with the replicas of an `up`, when dropped.
struct Background {
    child: Child,
    /// Its data directory: every replica's command line names a config file in it.
    dir: PathBuf,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    lines: Receiver<String>,
    exited: Option<ExitStatus>,
}

impl Background {
    /// Starts `replog <args>` in `cwd`; `dir` is the data directory it will use.
    fn start(args: &[&str], cwd: &Path, dir: &Path) -> Background {
        println!("$ replog {}", args.join(" "));
        let mut child = Command::new(BIN)
            .args(args)
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start replog up");
        let (stdout, stderr) = (Arc::default(), Arc::default());
        let (tx, lines) = mpsc::channel();
        pump(child.stdout.take().unwrap(), Arc::clone(&stdout), Some(tx));
        pump(child.stderr.take().unwrap(), Arc::clone(&stderr), None);
        Background { child, dir: dir.to_path_buf(), stdout, stderr, lines, exited: None }
    }

    /// Starts a long-running `replog <args>` (such as `tail`) in the current directory.
    fn start_plain(args: &[&str]) -> Background {
        let cwd = cli_cwd();
        let none = std::env::temp_dir().join("replog-cli-test-no-replicas");
        Background::start(args, &cwd, &none)
    }

    /// Waits for the stdout line `want` exactly; panics after `within`.
    fn wait_exact(&mut self, want: &str, within: Duration) {
        let t0 = Instant::now();
        if self.stdout.lock().unwrap().iter().any(|l| l == want) {
            return;
        }
        for _ in 0..10_000 {
            let left = within.saturating_sub(t0.elapsed());
            match self.lines.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(l) if l == want => {
                    println!("  {l}");
                    return;
                }
                Ok(l) => println!("  {l}"),
                Err(RecvTimeoutError::Timeout) if !left.is_zero() => {}
                Err(_) => break,
            }
        }
        panic!("no line {want:?} within {within:?}: {}", self.output());
    }

    /// Waits for a stdout line starting with `prefix`; panics after `within`.
    fn wait_line(&mut self, prefix: &str, within: Duration) -> String {
        let t0 = Instant::now();
        for _ in 0..10_000 {
            let left = within.saturating_sub(t0.elapsed());
            match self.lines.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(l) => {
                    println!("  up: {l}");
                    if l.starts_with(prefix) {
                        return l;
                    }
                }
                Err(RecvTimeoutError::Timeout) if !left.is_zero() => {
                    if let Ok(Some(st)) = self.child.try_wait() {
                        self.exited = Some(st);
                        panic!("replog up exited ({st}) before printing {prefix:?}: {}", self.output());
                    }
                }
                Err(_) => break,
            }
        }
        panic!("replog up printed no {prefix:?} line within {within:?}: {}", self.output());
    }

    fn output(&self) -> String {
        let logs: Vec<String> = (1..=3)
            .map(|i| {
                let p = self.dir.join(format!("node-{i}.log"));
                let text = support::strip_ansi(&std::fs::read_to_string(&p).unwrap_or_default());
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                format!("--- {} (last lines)\n{}", p.display(), tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
            })
            .collect();
        format!(
            "\n--- stdout\n{}\n--- stderr\n{}\n{}",
            self.stdout.lock().unwrap().join("\n"),
            self.stderr.lock().unwrap().join("\n"),
            logs.join("\n")
        )
    }

    /// The replica processes of this `replog up` still running (found by their config
    /// path, which is inside this test's data directory).
    fn replicas(&self) -> Vec<u32> {
        // `replog up` names the configs by the canonical path of its directory.
        let dir = self.dir.canonicalize().unwrap_or_else(|_| self.dir.clone()).to_string_lossy().into_owned();
        support::pids_matching(&["serve", "--config", &dir])
    }

    /// SIGINT, as Ctrl-C does; waits for `replog up` to exit (SIGKILL after `within`).
    /// Returns its exit status and whether it exited by itself.
    fn interrupt(&mut self, within: Duration) -> (ExitStatus, bool) {
        if let Some(st) = self.exited {
            return (st, true);
        }
        if let Ok(Some(st)) = self.child.try_wait() {
            self.exited = Some(st);
            return (st, true);
        }
        signal(self.child.id(), libc::SIGINT);
        let t0 = Instant::now();
        while t0.elapsed() < within {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.exited = Some(st);
                return (st, true);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let st = self.child.wait().expect("wait for replog up");
        self.exited = Some(st);
        (st, false)
    }

    /// SIGKILLs replicas left behind (bounded); returns the ones it found.
    fn kill_leftovers(&self) -> Vec<u32> {
        let mut found = Vec::new();
        for _ in 0..50 {
            let left = self.replicas();
            if left.is_empty() {
                break;
            }
            for &p in &left {
                signal(p, libc::SIGKILL);
                if !found.contains(&p) {
                    found.push(p);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        found
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.interrupt(STOP_WITHIN);
        let left = self.kill_leftovers();
        if !left.is_empty() {
            eprintln!("killed replica processes left behind by replog up: {left:?}");
        }
    }
}

/// The result of one short command.
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `replog <args>` to completion (killed after [`CMD_WITHIN`]).
fn replog(args: &[&str]) -> Run {
    println!("$ replog {}", args.join(" "));
    let mut child = Command::new(BIN)
        .args(args)
        .current_dir(cli_cwd())
        .env_remove("REPLOG_CLIENT_SECRET_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start replog");
    let (out, err) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
    pump(child.stdout.take().unwrap(), Arc::clone(&out), None);
    pump(child.stderr.take().unwrap(), Arc::clone(&err), None);
    let t0 = Instant::now();
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break st;
        }
        if t0.elapsed() > CMD_WITHIN {
            let _ = child.kill();
            let _ = child.wait();
            panic!("replog {} did not finish within {CMD_WITHIN:?}", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // The pipes close with the process; give the reader threads a bounded moment.
    std::thread::sleep(Duration::from_millis(50));
    let stdout = out.lock().unwrap().join("\n");
    let stderr = err.lock().unwrap().join("\n");
    for l in stdout.lines() {
        println!("  {l}");
    }
    for l in stderr.lines() {
        println!("  (stderr) {l}");
    }
    Run { status, stdout, stderr }
}

/// `replog read 0` must show every line of `want`. Reads go to the leader first (the
/// CLI asks for it), but a read served by a follower that has not yet learned the
/// newest commit (a round trip behind) would miss an acknowledged entry: a miss is
/// printed and retried a few times, and the number of misses is returned so the caller
/// reports it.
fn read_shows(args: &[&str], want: &[String]) -> usize {
    for misses in 0..10 {
        let r = replog(args);
        assert!(r.status.success(), "replog {} failed: {}", args.join(" "), r.stderr);
        let got: Vec<&str> = r.stdout.lines().collect();
        if want.iter().all(|w| got.contains(&w.as_str())) {
            return misses;
        }
        println!(
            "NOTE: `replog {}` (attempt {}) showed {got:?}, not all of {want:?}, right after the appends were \
             acknowledged; retrying",
            args.join(" "),
            misses + 1
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("replog {} never showed {want:?}", args.join(" "));
}

/// On a fresh cluster: `append <entries>` prints positions 1, 2, ...; `read 0` shows
/// `pos<TAB>entry` for each; `tail 0` shows them too and then a later append; `status`
/// shows one leader among three replicas; `trim` to the last entry makes `read 0` fail
/// as trimmed. `target` holds the flags (none: defaults).
fn use_the_cluster(entries: &[&str], target: &[&str]) {
    let with = |cmd: &[&str]| -> Vec<String> { cmd.iter().chain(target).map(|s| s.to_string()).collect() };
    let args = with(&[&["append"], entries].concat());
    let r = replog(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(r.status.success(), "replog append failed ({}): {}", r.status, r.stderr);
    let positions: Vec<u64> = r
        .stdout
        .lines()
        .map(|l| l.trim().parse().unwrap_or_else(|_| panic!("append printed {l:?}, not a position")))
        .collect();
    let want: Vec<u64> = (1..=entries.len() as u64).collect();
    assert_eq!(positions, want, "a fresh cluster's first appends get positions 1, 2, ...");
    let lines: Vec<String> = entries.iter().zip(&positions).map(|(e, p)| format!("{p}\t{e}")).collect();

    let args = with(&["read", "0"]);
    let misses = read_shows(&args.iter().map(String::as_str).collect::<Vec<_>>(), &lines);
    if misses > 0 {
        println!("NOTE: `replog read 0` missed acknowledged entries {misses} time(s) before showing them");
    }

    // `tail 0` shows what is there, then follows: one more append shows up.
    let args = with(&["tail", "0"]);
    let mut tail = Background::start_plain(&args.iter().map(String::as_str).collect::<Vec<_>>());
    for l in &lines {
        tail.wait_exact(l, CMD_WITHIN);
    }
    let args = with(&["append", "later"]);
    let r = replog(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(r.status.success(), "{}", r.stderr);
    let p: u64 = r.stdout.trim().parse().expect("a position");
    tail.wait_exact(&format!("{p}\tlater"), CMD_WITHIN);
    drop(tail);

    let args = with(&["status"]);
    let r = replog(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(r.status.success(), "replog status failed: {}", r.stderr);
    let leaders: Vec<&str> = r.stdout.lines().filter(|l| l.contains(": leader leader=")).collect();
    assert_eq!(leaders.len(), 1, "status shows one leader: {}", r.stdout);
    assert_eq!(r.stdout.lines().filter(|l| l.starts_with("replica ")).count(), 3, "every replica answers");

    // `trim` up to the last entry: reading from the start is then refused as trimmed.
    let args = with(&["trim", &p.to_string()]);
    let r = replog(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(r.status.success(), "replog trim failed: {}", r.stderr);
    assert_eq!(r.stdout.trim(), format!("trimmed: the first readable position is {}", p + 1));
    let args = with(&["read", "0"]);
    let r = replog(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!r.status.success() && r.stderr.contains("trimmed"), "read after trim: {} / {}", r.stdout, r.stderr);
}

/// `GET /metrics` over plain HTTP/1.0; returns the whole response.
fn http_get_metrics(addr: &str) -> String {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(CMD_WITHIN)).unwrap();
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.take(16 << 20).read_to_string(&mut out);
    out
}

/// Stops `up` with SIGINT and checks that it and its replicas are gone.
fn stop(mut up: Background) {
    let before = up.replicas();
    assert_eq!(before.len(), 3, "three replica processes run: {before:?}");
    let t0 = Instant::now();
    let (st, by_itself) = up.interrupt(STOP_WITHIN);
    assert!(by_itself, "replog up did not stop within {STOP_WITHIN:?} of SIGINT: {}", up.output());
    println!("replog up stopped in {:.0} ms ({st})", t0.elapsed().as_secs_f64() * 1e3);
    assert!(st.success(), "replog up exited with {st} after SIGINT: {}", up.output());
    assert!(up.stdout.lock().unwrap().iter().any(|l| l == "stopping the cluster"), "{}", up.output());
    let left = up.replicas();
    assert!(left.is_empty(), "replica processes survive replog up: {left:?}");
}

#[test]
fn up_append_read_status_with_explicit_servers() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let base = support::free_ports(9);
    let (base_s, data_s) = (base.to_string(), data.to_string_lossy().into_owned());
    let mut up = Background::start(&["up", "--dir", &data_s, "--base-port", &base_s], dir.path(), &data);
    let leader_line = up.wait_line("leader:", UP_WITHIN);

    // The servers as `replog up` prints them, which must be the ones it configured.
    let servers = leader_line
        .split("(servers ")
        .nth(1)
        .and_then(|s| s.strip_suffix(')'))
        .unwrap_or_else(|| panic!("no server list in {leader_line:?}"))
        .to_string();
    let cfgs = ServeConfig::local_cluster(3, base, &data, DurabilityKind::Fsync);
    let want: Vec<String> = cfgs.iter().map(|c| c.me().client_addr.to_string()).collect();
    assert_eq!(servers, want.join(","));
    let cid = LOCAL_CLUSTER_ID.to_string();
    // `replog up` made a client secret its replicas require.
    let secret = data.join("client-secret").to_string_lossy().into_owned();

    use_the_cluster(&["hello"], &["--servers", &servers, "--cluster-id", &cid, "--secret-file", &secret]);
    // The cluster id defaults to `replog up`'s.
    let r = replog(&["append", "world", "--servers", &servers, "--secret-file", &secret]);
    assert!(r.status.success(), "{}", r.stderr);
    // Without the secret the cluster refuses, saying why.
    let r = replog(&["append", "nope", "--servers", &servers, "--timeout-ms", "2000"]);
    assert!(!r.status.success(), "an append without the client secret succeeded");
    assert!(r.stderr.contains("requires a client credential"), "{}", r.stderr);
    // The data directory holds what `replog up` says it does.
    for i in 1..=3 {
        assert!(data.join(format!("node-{i}.toml")).is_file());
        assert!(data.join(format!("node-{i}.log")).is_file());
        assert!(data.join(format!("node-{i}")).is_dir());
    }
    stop(up);
}

#[test]
fn up_append_read_status_with_the_defaults_as_the_readme_shows() {
    // Only if nothing else holds the default ports (another cluster there would answer
    // the commands instead of ours).
    let busy: Vec<u16> = DEFAULT_PORTS.filter(|p| TcpListener::bind(("127.0.0.1", *p)).is_err()).collect();
    if !busy.is_empty() {
        println!("SKIPPED: the default ports {DEFAULT_PORTS:?} are not all free (in use: {busy:?})");
        return;
    }
    // `replog up` with no arguments, in a fresh directory: it creates ./replog-data.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("replog-data");
    let mut up = Background::start(&["up"], dir.path(), &data);
    up.wait_line("leader:", UP_WITHIN);
    assert!(data.is_dir(), "replog up did not create ./replog-data");
    // Our replicas are the ones listening (not someone else's that grabbed the ports).
    assert_eq!(up.replicas().len(), 3, "{}", up.output());
    // The commands, typed in the directory `replog up` runs in, find its client secret
    // in ./replog-data.
    CWD.with(|c| *c.borrow_mut() = Some(dir.path().to_path_buf()));
    use_the_cluster(&["hello", "world"], &[]);
    // The README's metrics endpoint.
    let m = http_get_metrics("127.0.0.1:7402");
    assert!(m.starts_with("HTTP/1.") && m.contains(" 200 "), "metrics answered: {m:.200}");
    assert!(m.contains("replog_commit_latency_seconds_bucket"), "Prometheus text with the commit latency: {m:.400}");
    stop(up);
}

#[test]
fn commands_fail_clearly_when_nothing_runs_or_the_config_is_missing() {
    // A port nobody listens on (bound, then released).
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let addr = closed.to_string();
    for cmd in [&["append", "x"][..], &["read", "0"][..]] {
        let args: Vec<&str> = cmd.iter().copied().chain(["--servers", &addr, "--timeout-ms", "1000"]).collect();
        let t0 = Instant::now();
        let r = replog(&args);
        assert!(!r.status.success(), "replog {} succeeded against a closed port", args.join(" "));
        assert!(r.stdout.is_empty(), "nothing on stdout: {:?}", r.stdout);
        assert!(r.stderr.contains(&addr), "the error names the server {addr}: {}", r.stderr);
        assert!(r.stderr.contains("replog up"), "the error suggests replog up: {}", r.stderr);
        println!("  failed in {:.0} ms", t0.elapsed().as_secs_f64() * 1e3);
    }
    let r = replog(&["status", "--servers", &addr, "--timeout-ms", "1000"]);
    assert!(!r.status.success(), "status succeeded against a closed port");
    assert!(r.stdout.contains(&addr) || r.stderr.contains(&addr), "status names {addr}");

    let r = replog(&["serve", "--config", "/nonexistent.toml"]);
    assert!(!r.status.success(), "serve with a missing config succeeded");
    assert!(r.stderr.contains("/nonexistent.toml"), "the error names the file: {}", r.stderr);

    // Ports past 65535: a clear error before anything starts, not a panic.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let r = replog(&["up", "--dir", &data.to_string_lossy(), "--base-port", "65530", "--nodes", "3"]);
    assert!(!r.status.success(), "up with ports past 65535 succeeded");
    assert!(r.stderr.contains("--base-port 65530 with --nodes 3 needs ports 65530..=65538"), "{}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "no panic: {}", r.stderr);
    assert!(!data.exists(), "nothing created");
}
