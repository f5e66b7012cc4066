//! The transport conformance suite over [`DpdkTransport`] on real DPDK ports.
//!
//! EAL starts once per process, and the suite drives all its endpoints from one thread,
//! so the suite runs in one child process (this test binary run again under
//! `ip netns exec`, `child` below) that starts EAL once and opens one `net_af_packet`
//! port per endpoint: endpoint `i` on interface `c<i>`, one end of a veth pair whose
//! other end is a port of a bridge, all inside one network namespace the test creates
//! (`rdpc<pid>`) and deletes afterwards, also on failure. The suite opens fresh
//! endpoints for every check, so every endpoint gets a fresh vdev (hot-plugged with
//! `rte_dev_probe`) on its interface; the previous one was stopped and closed when its
//! transport was dropped.
//!
//! Also, in their own child processes and namespaces: the handshake refuses a peer
//! with a wrong or missing cluster secret or another member list (no link, nothing
//! accepted), and EAL refusing its arguments is a typed error ([`DpdkError::Eal`])
//! with `rte_strerror`'s text.
//!
//! Needs root, iproute2 and the af_packet PMD: without them the tests say why and
//! skip, unless `REPLOG_REQUIRE_ALL` is set, when they fail.
#![cfg(feature = "dpdk")]

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use transport::dpdk::{DpdkConfig, DpdkError, DpdkTransport, Eal, EalConfig};
use transport::{PeerId, Transport};

const ROLE_ENV: &str = "REPLOG_DPDK_CONFORMANCE_ROLE";
const ENDPOINTS: usize = 3;
const CHILD_DEADLINE: Duration = Duration::from_secs(600);

fn mac(i: usize) -> [u8; 6] {
    [0x02, 0, 0, 0x77, 0xc0, i as u8]
}

fn mac_text(i: usize) -> String {
    transport::dpdk::mac_str(&mac(i))
}

fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn cannot_run(test: &str, why: &str) {
    if std::env::var_os("REPLOG_REQUIRE_ALL").is_some() {
        panic!("{test}: cannot run: {why} (REPLOG_REQUIRE_ALL is set, so this fails instead of skipping)");
    }
    say(&format!("SKIPPED {test}: {why} (set REPLOG_REQUIRE_ALL=1 to make this a failure)"));
}

fn missing_prerequisite() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|l| l.split_whitespace().nth(1));
    if euid != Some("0") {
        return Some("needs root (network namespaces, veth, AF_PACKET)".into());
    }
    if Command::new("ip").arg("-V").output().map_or(true, |o| !o.status.success()) {
        return Some("iproute2's `ip` is not installed".into());
    }
    let has = |prefix: &str| {
        std::fs::read_dir(dpdk_sys::PMD_DIR)
            .map(|d| d.filter_map(Result::ok).any(|e| e.file_name().to_string_lossy().starts_with(prefix)))
            .unwrap_or(false)
    };
    if !has("librte_net_af_packet.so") || !has("librte_bus_vdev.so") {
        return Some(format!(
            "the af_packet PMD or vdev bus is missing from {} (apt-get install dpdk)",
            dpdk_sys::PMD_DIR
        ));
    }
    None
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// One namespace with a bridge and ENDPOINTS veth pairs; deleted on drop.
struct Ns {
    name: String,
    prefix: String,
}

impl Ns {
    fn create(tag: &str) -> Result<Ns, String> {
        let ns = Ns { name: format!("rdpc{tag}"), prefix: format!("rdpc{tag}") };
        ip(&["netns", "add", &ns.name])?;
        let n = ns.name.as_str();
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        ip(&["-n", n, "link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0"])?;
        ip(&["-n", n, "link", "set", "br0", "up"])?;
        for i in 1..=ENDPOINTS {
            let (c, p) = (format!("c{i}"), format!("p{i}"));
            #[rustfmt::skip]
            ip(&["-n", n, "link", "add", &c, "address", &mac_text(i), "mtu", "1500", "type", "veth", "peer", "name", &p,
                 "mtu", "1500"])?;
            ip(&["-n", n, "link", "set", &p, "master", "br0"])?;
            ip(&["-n", n, "link", "set", &p, "up"])?;
            ip(&["-n", n, "link", "set", &c, "up"])?;
        }
        Ok(ns)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
        for base in ["/var/run/dpdk", "/tmp/dpdk"] {
            let _ = std::fs::remove_dir_all(format!("{base}/{}", self.prefix));
        }
    }
}

/// Kills the child on drop.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn run_child(role: &str, ns: Option<&str>, prefix: &str) -> (bool, String) {
    let exe = std::env::current_exe().expect("test binary path");
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    cmd.args(["child", "--exact", "--include-ignored", "--nocapture", "--test-threads=1"])
        .env(ROLE_ENV, role)
        .env("REPLOG_DPDK_PREFIX", prefix)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut g = Guard(cmd.spawn().expect("spawn the child"));
    let deadline = Instant::now() + CHILD_DEADLINE;
    // Read both streams on threads so a full pipe cannot block the child.
    let out = g.0.stdout.take().expect("stdout");
    let err = g.0.stderr.take().expect("stderr");
    let t1 = std::thread::spawn(move || std::io::read_to_string(out).unwrap_or_default());
    let t2 = std::thread::spawn(move || std::io::read_to_string(err).unwrap_or_default());
    let status = loop {
        if let Some(st) = g.0.try_wait().expect("try_wait") {
            break Some(st);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(g); // kills it if still running, closing the pipes
    let text = format!("{}{}", t1.join().unwrap_or_default(), t2.join().unwrap_or_default());
    match status {
        Some(st) => (st.success(), text),
        None => (false, format!("child did not finish within {CHILD_DEADLINE:?}\n{text}")),
    }
}

#[test]
fn dpdk_transport_conformance_suite() {
    const TEST: &str = "dpdk_transport_conformance_suite";
    if let Some(why) = missing_prerequisite() {
        return cannot_run(TEST, &why);
    }
    let tag = std::process::id().to_string();
    let ns = match Ns::create(&tag) {
        Ok(ns) => ns,
        Err(why) => return cannot_run(TEST, &format!("cannot create the namespace and veth pairs: {why}")),
    };
    let t0 = Instant::now();
    let (ok, out) = run_child("suite", Some(&ns.name), &ns.prefix);
    println!("{out}");
    assert!(ok, "the conformance suite failed in the child; its output:\n{out}");
    let checks = out.lines().filter(|l| l.starts_with("transport conformance:") && l.ends_with(')')).count();
    assert!(out.contains("CONFORMANCE-DONE"), "the child did not finish the suite:\n{out}");
    say(&format!(
        "dpdk conformance: {checks} checks passed over af_packet ports in {:.1} s",
        t0.elapsed().as_secs_f64()
    ));
    assert_eq!(checks, 10, "every check of the suite ran");
    drop(ns);
}

#[test]
fn handshake_refuses_a_wrong_secret_and_a_stale_member_list() {
    const TEST: &str = "handshake_refuses_a_wrong_secret_and_a_stale_member_list";
    if let Some(why) = missing_prerequisite() {
        return cannot_run(TEST, &why);
    }
    let ns = match Ns::create(&format!("{}h", std::process::id())) {
        Ok(ns) => ns,
        Err(why) => return cannot_run(TEST, &format!("cannot create the namespace and veth pairs: {why}")),
    };
    let (ok, out) = run_child("auth", Some(&ns.name), &ns.prefix);
    println!("{out}");
    assert!(ok, "the handshake checks failed in the child; its output:\n{out}");
    assert!(out.contains("AUTH-DONE"), "the child did not finish:\n{out}");
    say("dpdk handshake: a wrong secret, a missing secret and a stale member list are refused; a match links up");
}

#[test]
fn eal_refusing_its_arguments_is_a_typed_error() {
    let prefix = format!("rdpc{}-bad", std::process::id());
    let (ok, out) = run_child("bad-args", None, &prefix);
    for base in ["/var/run/dpdk", "/tmp/dpdk"] {
        let _ = std::fs::remove_dir_all(format!("{base}/{prefix}"));
    }
    assert!(ok, "child failed:\n{out}");
    // EAL's own usage text (C stdio) may share a line with ours.
    let line = out.lines().find(|l| l.contains("EAL-ERROR ")).unwrap_or_else(|| panic!("no EAL-ERROR line:\n{out}"));
    assert!(line.contains("EAL did not start: Invalid argument (rte_errno 22)"), "{line}");
    assert!(line.contains("--no-huge") && line.contains("--in-memory"), "the error names the arguments: {line}");
}

// ------------------------------------------------------------------------------------
// Child side.
// ------------------------------------------------------------------------------------

#[test]
#[ignore = "child process of the other tests in this file (they run it with the role set)"]
fn child() {
    let role = std::env::var(ROLE_ENV).expect("run by the other tests with the role set");
    let prefix = std::env::var("REPLOG_DPDK_PREFIX").expect("prefix");
    match role.as_str() {
        "bad-args" => {
            let cfg = EalConfig {
                no_huge: true,
                in_memory: true,
                memory_mb: Some(64),
                file_prefix: Some(prefix),
                ..EalConfig::default()
            };
            match Eal::init(&cfg) {
                Err(e @ DpdkError::Eal { .. }) => println!("EAL-ERROR {e}"),
                Err(e) => panic!("another error: {e}"),
                Ok(_) => panic!("EAL accepted --no-huge with --in-memory"),
            }
        }
        "suite" => suite(&prefix),
        "auth" => auth(&prefix),
        other => panic!("unknown role {other}"),
    }
}

fn test_eal(prefix: &str) -> std::sync::Arc<Eal> {
    let cfg = EalConfig {
        no_huge: true,
        memory_mb: Some(512),
        no_shconf: true,
        file_prefix: Some(prefix.into()),
        extra: vec!["--log-level=lib.eal:notice".into()],
        ..EalConfig::default()
    };
    Eal::init(&cfg).unwrap_or_else(|e| panic!("{e}"))
}

static NEXT_VDEV: AtomicU32 = AtomicU32::new(0);

/// Endpoint `id` of a cluster of `ids` on a fresh vdev over interface `c<id>`.
fn endpoint(
    eal: &std::sync::Arc<Eal>,
    id: PeerId,
    ids: &[PeerId],
    secret: Option<&[u8]>,
    digest: u64,
) -> DpdkTransport {
    let k = NEXT_VDEV.fetch_add(1, Ordering::Relaxed);
    let name = format!("net_af_packet{k}");
    eal.probe(&format!("{name},iface=c{id}")).unwrap_or_else(|e| panic!("probe {name}: {e}"));
    let peers: BTreeMap<PeerId, [u8; 6]> = ids.iter().filter(|&&p| p != id).map(|&p| (p, mac(p as usize))).collect();
    let mut c = DpdkConfig::new(0xd9d4, id, &name, peers);
    c.local_mac = Some(mac(id as usize));
    c.mbufs = 4095;
    c.ring = 512;
    c.secret = secret.map(<[u8]>::to_vec);
    c.config_digest = digest;
    DpdkTransport::new(eal.clone(), c).unwrap_or_else(|e| panic!("endpoint {id}: {e}"))
}

/// Polls both endpoints for `d` (or until both report the link up); whether both did.
fn link_up_within(a: &mut DpdkTransport, b: &mut DpdkTransport, d: Duration) -> bool {
    let (mut up_a, mut up_b) = (false, false);
    let t0 = Instant::now();
    let mut events = Vec::new();
    while t0.elapsed() < d && !(up_a && up_b) {
        for (t, up) in [(&mut *a, &mut up_a), (&mut *b, &mut up_b)] {
            events.clear();
            t.poll(&mut events, Some(Duration::from_millis(2))).expect("poll");
            *up |= events.iter().any(|e| matches!(e, transport::Event::PeerUp { .. }));
        }
    }
    up_a && up_b
}

fn auth(prefix: &str) {
    let eal = test_eal(prefix);
    let ids = [1, 2];
    let quiet = Duration::from_millis(1500);
    let refused = [
        ("a wrong secret", Some(&b"secret one"[..]), Some(&b"secret two"[..]), 42, 42),
        ("a missing secret", Some(&b"secret one"[..]), None, 42, 42),
        ("a stale member list", Some(&b"secret one"[..]), Some(&b"secret one"[..]), 42, 43),
    ];
    for (what, s1, s2, d1, d2) in refused {
        let mut a = endpoint(&eal, 1, &ids, s1, d1);
        let mut b = endpoint(&eal, 2, &ids, s2, d2);
        assert!(!link_up_within(&mut a, &mut b, quiet), "{what}: the link must not come up");
        assert!(!a.is_up(2) && !b.is_up(1), "{what}: neither side is up");
        assert_eq!(a.send(2, b"x"), Err(transport::SendError::LinkDown(2)), "{what}: nothing is accepted");
        assert!(a.stats().rejected + b.stats().rejected > 0, "{what}: HELLOs were refused");
        println!("refused {what}");
    }
    let mut a = endpoint(&eal, 1, &ids, Some(b"secret one"), 42);
    let mut b = endpoint(&eal, 2, &ids, Some(b"secret one"), 42);
    assert!(link_up_within(&mut a, &mut b, Duration::from_secs(10)), "matching secret and digest link up");
    drop((a, b));
    drop(eal);
    println!("AUTH-DONE");
}

fn suite(prefix: &str) {
    let eal = test_eal(prefix);
    transport::conformance::run_all(|ids: &[PeerId]| {
        ids.iter()
            .map(|&id| Box::new(endpoint(&eal, id, ids, Some(b"conformance secret"), 42)) as Box<dyn Transport>)
            .collect()
    });
    drop(eal);
    println!("CONFORMANCE-DONE");
}
