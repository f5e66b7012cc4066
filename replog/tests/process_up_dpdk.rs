//! `replog up --transport dpdk`: the local cluster over the DPDK transport, each replica
//! in its own namespace `replog-up-<i>` (af_packet vdev on its veth, bridge
//! `replog-up-br` with 10.77.255.254/24 on the host). The test waits for a leader from
//! the host through the client library, appends and reads back entries (and runs the
//! client command `up` prints), then sends SIGINT and checks that the replicas stopped
//! and the namespaces and bridge are gone.
//!
//! Needs root, iproute2 and DPDK's af_packet PMD; without them the test says why and
//! skips, unless `REPLOG_REQUIRE_ALL` is set, when it fails.
#![cfg(feature = "dpdk")]

use bytes::Bytes;
use replog::client::{Client, ClientConfig};
use replog::config::LOCAL_CLUSTER_ID;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NAME: &str = "up_dpdk_serves_clients_from_the_host_and_deletes_its_namespaces_on_sigint";

fn missing_prerequisite() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("network namespaces need root (run as root)".into());
    }
    match Command::new("ip").arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status() {
        Ok(s) if s.success() => {}
        _ => return Some("the `ip` command (iproute2) is missing: apt-get install iproute2".into()),
    }
    let dir = transport::dpdk::pmd_dir();
    let has = |prefix: &str| {
        std::fs::read_dir(dir)
            .map(|d| d.filter_map(Result::ok).any(|e| e.file_name().to_string_lossy().starts_with(prefix)))
            .unwrap_or(false)
    };
    if has("librte_net_af_packet.so") && has("librte_bus_vdev.so") {
        None
    } else {
        Some(format!("DPDK's af_packet PMD or vdev bus is missing from {dir} (apt-get install dpdk)"))
    }
}

/// The `replog-up-*` namespaces that exist.
fn up_namespaces() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("replog-up-"))
        .map(String::from)
        .collect()
}

fn bridge_exists() -> bool {
    Command::new("ip")
        .args(["link", "show", "replog-up-br"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `replog up`; on drop (a failed test) stopped with SIGTERM so that it deletes its
/// namespaces, killed if it does not.
struct Up {
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Up {
    fn out(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("up.out")).unwrap_or_default()
    }

    fn logs(&self) -> String {
        (1..=3)
            .map(|i| {
                let log = std::fs::read_to_string(self.dir.path().join(format!("node-{i}.log"))).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                format!("---- replica {i}:\n{}", lines[lines.len().saturating_sub(30)..].join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn signal(&self, sig: libc::c_int) {
        if let Some(c) = &self.child {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe {
                libc::kill(c.id() as libc::pid_t, sig);
            }
        }
    }

    /// Waits for `replog up` to exit; its status, or `None` after `timeout`.
    fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if self.child.is_none() {
            return;
        }
        if std::thread::panicking() {
            eprintln!("---- replog up output:\n{}\n{}", self.out(), self.logs());
        }
        self.signal(libc::SIGTERM);
        if self.wait(Duration::from_secs(20)).is_none() {
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            for ns in up_namespaces() {
                let _ = Command::new("ip").args(["netns", "del", &ns]).status();
            }
            let _ = Command::new("ip").args(["link", "del", "replog-up-br"]).stderr(Stdio::null()).status();
        }
    }
}

fn start() -> Up {
    let dir = tempfile::tempdir().unwrap();
    let out = std::fs::File::create(dir.path().join("up.out")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_replog"))
        .args(["up", "--transport", "dpdk", "--dir"])
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("start replog up");
    Up { child: Some(child), dir }
}

fn replog_cli(args: &[String]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_replog")).args(args).output().expect("run replog");
    assert!(
        out.status.success(),
        "replog {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn up_dpdk_serves_clients_from_the_host_and_deletes_its_namespaces_on_sigint() {
    if let Some(why) = missing_prerequisite() {
        if std::env::var_os("REPLOG_REQUIRE_ALL").is_some() {
            panic!("{NAME}: cannot run: {why} (REPLOG_REQUIRE_ALL is set, so this fails instead of skipping)");
        }
        eprintln!("SKIPPED {NAME}: {why} (set REPLOG_REQUIRE_ALL=1 to make this a failure)");
        return;
    }
    let mut up = start();
    // The default layout (base port 7400): replica i's client port is 7400 + 3(i-1) + 1,
    // on its namespace's address.
    let servers: Vec<SocketAddr> =
        (1..=3u8).map(|i| SocketAddr::from(([10, 77, 255, i], 7400 + 3 * (i as u16 - 1) + 1))).collect();
    let secret_file = up.dir.path().join("client-secret");

    // `up` prints the client command once a leader is there (or it gave up waiting).
    let t0 = Instant::now();
    let line = loop {
        if let Some(l) = up.out().lines().find(|l| l.starts_with("clients: replog append ")) {
            break l.to_string();
        }
        if let Some(st) = up.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            panic!("replog up exited ({st}):\n{}", up.out());
        }
        assert!(t0.elapsed() < Duration::from_secs(90), "replog up printed no client command in 90 s");
        std::thread::sleep(Duration::from_millis(100));
    };
    let list: Vec<String> = servers.iter().map(|s| s.to_string()).collect();
    let expect = format!("--servers {} --secret-file {}", list.join(","), secret_file.display());
    assert!(line.contains(&expect), "the printed client command {line:?} names {expect:?}");
    assert!(up.out().contains("leader: replica"), "a leader was found:\n{}", up.out());
    assert!(!up_namespaces().is_empty() && bridge_exists(), "the namespaces and bridge exist while it runs");

    // A leader that every replica follows, seen from the host through the client library.
    let secret = replog::client::read_secret_file(&secret_file).expect("client secret");
    let mut cfg = ClientConfig::new(LOCAL_CLUSTER_ID, servers.clone());
    cfg.timeout = Duration::from_secs(3);
    cfg.retries = 30;
    cfg.secret = Some(secret);
    let t0 = Instant::now();
    let leader = loop {
        let st: Vec<_> = servers.iter().filter_map(|&s| Client::status_at(s, &cfg).ok()).collect();
        if st.len() == 3 {
            if let Some(l) = st.iter().find(|s| s.role == "leader") {
                if st.iter().all(|s| s.leader == Some(l.node)) {
                    break l.node;
                }
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "no leader followed by all three replicas in 60 s");
        std::thread::sleep(Duration::from_millis(100));
    };

    let mut client = Client::connect(cfg.clone()).expect("connect from the host");
    let entries: Vec<Bytes> = (0..200).map(|k| Bytes::from(format!("up-dpdk-{k}"))).collect();
    let mut positions = Vec::new();
    for chunk in entries.chunks(20) {
        positions.extend(client.append_batch(chunk.to_vec()).expect("append acknowledged"));
    }
    assert_eq!(positions.len(), entries.len());
    let first = positions[0];
    let got = client.read_linearizable(first, 1000).expect("read back");
    let got: Vec<(u64, Bytes)> = got.into_iter().filter(|(p, _)| positions.contains(p)).collect();
    assert_eq!(got.len(), entries.len(), "every appended entry is read back");
    for ((p, d), (want_p, want)) in got.iter().zip(positions.iter().zip(&entries)) {
        assert_eq!((p, d), (want_p, want));
    }

    // The printed client command works from the host.
    let target: Vec<String> = expect.split_whitespace().map(String::from).collect();
    let mut append = vec!["append".to_string()];
    append.extend(target.iter().cloned());
    append.push("from-the-cli".into());
    let pos: u64 = replog_cli(&append).trim().parse().expect("a position");
    let mut read = vec!["read".to_string()];
    read.extend(target.iter().cloned());
    read.push(pos.to_string());
    assert!(replog_cli(&read).contains(&format!("{pos}\tfrom-the-cli")), "the CLI reads its entry back");
    eprintln!("up dpdk: replica {leader} leads; {} entries appended and read back from the host", entries.len() + 1);

    up.signal(libc::SIGINT);
    let st = up.wait(Duration::from_secs(30)).unwrap_or_else(|| panic!("replog up still runs 30 s after SIGINT"));
    assert!(st.success(), "replog up exits cleanly on SIGINT ({st}):\n{}", up.out());
    assert!(up.out().contains("deleted the namespaces"), "{}", up.out());
    assert_eq!(up_namespaces(), Vec::<String>::new(), "the namespaces are gone");
    assert!(!bridge_exists(), "the bridge is gone");
    for i in 1..=3 {
        let log = std::fs::read_to_string(up.dir.path().join(format!("node-{i}.log"))).unwrap_or_default();
        assert!(log.contains("EAL cleaned up"), "replica {i} stopped cleanly (EAL cleaned up):\n{}", up.logs());
    }
}
