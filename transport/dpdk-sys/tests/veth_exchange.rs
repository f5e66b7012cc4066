//! Proof that the bindings drive a real DPDK port: two processes, each running EAL with
//! an `af_packet` vdev on one end of a veth pair (each end in its own network namespace,
//! made by the test and deleted afterwards, also on panic), exchange frames of our own
//! ethertype through `rte_eth_tx_burst` / `rte_eth_rx_burst`.
//!
//! - `echo` (namespace B) verifies every frame of our ethertype and sends it back;
//! - `send` (namespace A) sends [`PINGPONG`] frames one at a time (round-trip times),
//!   then [`STREAMED`] frames with up to [`WINDOW`] in flight, verifies every echo and
//!   counts duplicates; a frame not echoed within [`RETRANSMIT_AFTER`] is sent again
//!   (counted: veth should lose none). Kernel traffic (IPv6 neighbour discovery) is
//!   counted apart, by ethertype.
//!
//! `rte_eal_init` works once per process, so each side is this test binary run again
//! (`child`, ignored in normal runs) under `ip netns exec` with `DPDK_SYS_TEST_ROLE` set.
//! Needs root, iproute2 and the af_packet PMD: without them the test says why and skips,
//! unless `REPLOG_REQUIRE_ALL` is set, when it fails.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dpdk_sys as sys;

/// IEEE 802 "local experimental ethertype 1": ours, never a kernel protocol.
const ETHERTYPE: u16 = 0x88B5;
/// veth MTU. af_packet (22.11) copies a frame into an mbuf without a bounds check, so
/// MTU + Ethernet header must fit the mbuf data room (checked below at compile time).
const MTU: usize = 1500;
const _: () = assert!(MTU + 14 + 4 <= sys::RTE_MBUF_DEFAULT_DATAROOM as usize);
/// Frames sent one at a time (round-trip times).
const PINGPONG: u32 = 1_000;
/// Frames sent with up to WINDOW in flight (throughput).
const STREAMED: u32 = 10_000;
const WINDOW: usize = 32;
const RETRANSMIT_AFTER: Duration = Duration::from_millis(200);
/// Neither side runs longer than this.
const CHILD_DEADLINE: Duration = Duration::from_secs(60);
const POOL_MBUFS: u32 = 4095;
const POOL_CACHE: u32 = 128;
const RING: u16 = 512;
const BURST: usize = 32;

const ROLE_ENV: &str = "DPDK_SYS_TEST_ROLE";
const KIND_REQUEST: u8 = 1;
const KIND_REPLY: u8 = 2;
const KIND_DONE: u8 = 3;
/// Our header after Ethernet: kind u8, reserved u8, seq u32 (BE), payload length u16 (BE).
const HDR: usize = 8;
const ETH: usize = 14;
const MIN_PAYLOAD: usize = 46;
const MAX_PAYLOAD: usize = MTU - HDR;

fn payload_len(seq: u32) -> usize {
    MIN_PAYLOAD + (seq as usize * 97) % (MAX_PAYLOAD - MIN_PAYLOAD + 1)
}

fn pattern(seq: u32, i: usize) -> u8 {
    (seq as u8).wrapping_mul(31).wrapping_add(i as u8) ^ 0x5A
}

// ---------------------------------------------------------------------------------
// Parent side: prerequisites, namespaces, children.
// ---------------------------------------------------------------------------------

/// Skips (returns) or, with `REPLOG_REQUIRE_ALL` set, fails.
fn cannot_run(test: &str, why: &str) {
    if std::env::var_os("REPLOG_REQUIRE_ALL").is_some() {
        panic!("{test}: cannot run: {why} (REPLOG_REQUIRE_ALL is set, so this fails instead of skipping)");
    }
    say(&format!("SKIPPED {test}: {why} (set REPLOG_REQUIRE_ALL=1 to make this a failure)"));
}

/// Writes a line to the real stderr, past the test harness's output capture, so counts
/// and skips show in the log of a passing run.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
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
        std::fs::read_dir(sys::PMD_DIR)
            .map(|d| d.filter_map(Result::ok).any(|e| e.file_name().to_string_lossy().starts_with(prefix)))
            .unwrap_or(false)
    };
    if !has("librte_net_af_packet.so") || !has("librte_bus_vdev.so") {
        return Some(format!("the af_packet PMD or vdev bus is missing from {} (apt-get install dpdk)", sys::PMD_DIR));
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

/// Two namespaces joined by a veth pair; deleted on drop (which also deletes the veth).
struct VethNet {
    ns: [String; 2],
    ifname: [String; 2],
    mac: [String; 2],
    prefixes: Vec<String>,
}

impl VethNet {
    fn create(tag: &str) -> Result<VethNet, String> {
        let net = VethNet {
            ns: [format!("dpdksys-{tag}-a"), format!("dpdksys-{tag}-b")],
            ifname: [format!("dsa{tag}"), format!("dsb{tag}")],
            mac: ["02:00:00:88:b5:0a".into(), "02:00:00:88:b5:0b".into()],
            prefixes: Vec::new(),
        };
        let mtu = MTU.to_string();
        ip(&["netns", "add", &net.ns[0]])?;
        ip(&["netns", "add", &net.ns[1]])?; // net is dropped (and cleans up) on error from here on
        #[rustfmt::skip]
        ip(&["link", "add", &net.ifname[0], "netns", &net.ns[0], "address", &net.mac[0], "mtu", &mtu,
             "type", "veth", "peer", "name", &net.ifname[1], "netns", &net.ns[1], "address", &net.mac[1],
             "mtu", &mtu])?;
        for i in 0..2 {
            ip(&["-n", &net.ns[i], "link", "set", &net.ifname[i], "up"])?;
        }
        Ok(net)
    }
}

impl Drop for VethNet {
    fn drop(&mut self) {
        for ns in &self.ns {
            let _ = ip(&["netns", "del", ns]);
        }
        for prefix in &self.prefixes {
            remove_eal_runtime_dir(prefix);
        }
    }
}

/// Removes what EAL may leave for `--file-prefix=prefix`: `/var/run/dpdk/<prefix>` as root,
/// `$XDG_RUNTIME_DIR/dpdk/<prefix>` or `/tmp/dpdk/<prefix>` otherwise.
fn remove_eal_runtime_dir(prefix: &str) {
    let xdg = std::env::var("XDG_RUNTIME_DIR").unwrap_or_else(|_| "/tmp".into());
    for base in ["/var/run".to_owned(), xdg, "/tmp".to_owned()] {
        let _ = std::fs::remove_dir_all(format!("{base}/dpdk/{prefix}"));
    }
}

/// A child process killed on drop; its stdout lines arrive on a channel.
struct ChildProc {
    name: &'static str,
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl ChildProc {
    fn spawn(name: &'static str, ns: &str, env: &[(&str, String)]) -> ChildProc {
        let exe = std::env::current_exe().expect("test binary path");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(exe);
        cmd.args(["child", "--exact", "--include-ignored", "--nocapture", "--test-threads=1"]);
        cmd.env(ROLE_ENV, name).envs(env.iter().map(|(k, v)| (k, v)));
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn child");
        let (tx, lines) = mpsc::channel();
        // Both streams go to the (captured) test output and the channel; EAL logs to stderr.
        let stdout = BufReader::new(child.stdout.take().expect("child stdout"));
        let stderr = BufReader::new(child.stderr.take().expect("child stderr"));
        for (stream, tx) in [(Box::new(stdout) as Box<dyn BufRead + Send>, tx.clone()), (Box::new(stderr), tx)] {
            std::thread::spawn(move || {
                for line in stream.lines().map_while(Result::ok) {
                    println!("[{name}] {line}");
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        ChildProc { name, child, lines, seen: Vec::new() }
    }

    /// Waits for a line starting with `prefix`; None if the child ended or time ran out.
    fn wait_line(&mut self, prefix: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let line = self.lines.recv_timeout(left).ok()?;
            self.seen.push(line.clone());
            if line.starts_with(prefix) {
                return Some(line);
            }
        }
    }

    fn finish(mut self, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // Drain what the reader thread still has.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(500)) {
                    self.seen.push(line);
                }
                assert!(
                    status.success(),
                    "{} child failed ({status}); its output:\n{}",
                    self.name,
                    self.seen.join("\n")
                );
                return std::mem::take(&mut self.seen);
            }
            assert!(Instant::now() < deadline, "{} child did not finish in {timeout:?}", self.name);
            while let Ok(line) = self.lines.try_recv() {
                self.seen.push(line);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `key=value` fields of the child's `RESULT` line.
fn result_field(lines: &[String], key: &str) -> u64 {
    let line = lines.iter().find(|l| l.starts_with("RESULT ")).expect("child printed no RESULT line");
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        .parse()
        .unwrap_or_else(|e| panic!("{key} in {line}: {e}"))
}

/// CPUs this process may run on (from `Cpus_allowed_list`, e.g. `0-1,4`).
fn allowed_cpus() -> Vec<usize> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let list = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap_or("0").trim();
    let mut cpus = Vec::new();
    for part in list.split(',') {
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(a.parse::<usize>().unwrap_or(0)..=b.parse::<usize>().unwrap_or(0)),
            None => cpus.extend(part.parse::<usize>().ok()),
        }
    }
    if cpus.is_empty() {
        cpus.push(0);
    }
    cpus
}

#[test]
fn two_processes_exchange_frames_over_veth() {
    const TEST: &str = "two_processes_exchange_frames_over_veth";
    if let Some(why) = missing_prerequisite() {
        return cannot_run(TEST, &why);
    }
    let tag = std::process::id().to_string();
    let mut net = match VethNet::create(&tag) {
        Ok(net) => net,
        Err(why) => return cannot_run(TEST, &format!("cannot create the namespaces and veth pair: {why}")),
    };
    let cpus = allowed_cpus();
    let env = |i: usize, prefix: &str| {
        vec![
            ("DPDK_SYS_TEST_IFACE", net.ifname[i].clone()),
            ("DPDK_SYS_TEST_PREFIX", prefix.to_owned()),
            ("DPDK_SYS_TEST_CPU", cpus[i.min(cpus.len() - 1)].to_string()),
            ("DPDK_SYS_TEST_OWN_MAC", net.mac[i].clone()),
            ("DPDK_SYS_TEST_PEER_MAC", net.mac[1 - i].clone()),
        ]
    };
    let prefixes = [format!("dpdksys-{tag}-send"), format!("dpdksys-{tag}-echo")];
    net.prefixes.extend(prefixes.iter().cloned());
    println!(
        "namespaces {:?}, veth {:?} (MTU {MTU}), EAL on CPUs {:?}",
        net.ns,
        net.ifname,
        &cpus[..cpus.len().min(2)]
    );

    let started = Instant::now();
    let mut echo = ChildProc::spawn("echo", &net.ns[1], &env(1, &prefixes[1]));
    if echo.wait_line("READY", Duration::from_secs(30)).is_none() {
        // Unwinding kills the children, then deletes the namespaces (drop order).
        panic!("echo side never became ready; its output so far:\n{}", echo.seen.join("\n"));
    }
    let sender = ChildProc::spawn("send", &net.ns[0], &env(0, &prefixes[0]));
    let sent = sender.finish(CHILD_DEADLINE + Duration::from_secs(30));
    let echoed = echo.finish(Duration::from_secs(30));
    let wall = started.elapsed();

    let total = u64::from(PINGPONG + STREAMED);
    let (verified, dup, bad, retx) = (
        result_field(&sent, "verified"),
        result_field(&sent, "duplicates"),
        result_field(&sent, "bad"),
        result_field(&sent, "retransmits"),
    );
    let (echo_ok, echo_bad, echo_dup) =
        (result_field(&echoed, "verified"), result_field(&echoed, "bad"), result_field(&echoed, "duplicates"));
    say(&format!(
        "DPDK af_packet over veth: {total} frames of ethertype {ETHERTYPE:#06x} sent, {verified} echoed and verified \
         ({dup} duplicates, {bad} bad, {retx} retransmits); echo side verified {echo_ok} ({echo_bad} bad, {echo_dup} \
         duplicates), ignored {} + {} other frames; ping-pong RTT p50 {} us p99 {} us; streamed {} frames in {} ms; \
         EAL init {} ms / {} ms; wall {:.2} s",
        result_field(&sent, "other"),
        result_field(&echoed, "other"),
        result_field(&sent, "rtt_p50_us"),
        result_field(&sent, "rtt_p99_us"),
        STREAMED,
        result_field(&sent, "stream_ms"),
        result_field(&sent, "eal_init_ms"),
        result_field(&echoed, "eal_init_ms"),
        wall.as_secs_f64()
    ));
    assert_eq!(verified, total, "every frame echoed back and verified");
    assert_eq!(bad, 0, "no corrupt echo");
    assert_eq!(echo_bad, 0, "no corrupt frame at the echo side");
    assert!(echo_ok >= total, "echo side saw every frame (retransmits may add)");
    for lines in [&sent, &echoed] {
        assert!(lines.iter().any(|l| l.starts_with("EALREADY")), "a second rte_eal_init was refused");
        assert!(lines.iter().any(|l| l.starts_with("CLEANUP ok")), "EAL shut down cleanly");
    }
}

#[test]
fn eal_init_failure_is_a_clear_error() {
    // Runs EAL in a child: even a failed init may leave state behind in this process.
    let exe = std::env::current_exe().expect("test binary path");
    let prefix = format!("dpdksys-{}-bad", std::process::id());
    let out = Command::new(exe)
        .args(["child", "--exact", "--include-ignored", "--nocapture", "--test-threads=1"])
        .env(ROLE_ENV, "bad-args")
        .env("DPDK_SYS_TEST_PREFIX", &prefix)
        .output()
        .expect("spawn child");
    remove_eal_runtime_dir(&prefix);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    // EAL also prints its usage text; show only our line.
    let line = stdout.lines().find(|l| l.contains("EAL-ERROR")).unwrap_or_else(|| panic!("no EAL-ERROR in {stdout}"));
    println!("{line}");
    assert!(line.contains("EAL-ERROR rte_eal_init failed: Invalid argument (rte_errno 22)"), "{line}");
}

// ---------------------------------------------------------------------------------
// Child side: one EAL, one port.
// ---------------------------------------------------------------------------------

#[test]
#[ignore = "child process of the other tests in this file (they run it with DPDK_SYS_TEST_ROLE set)"]
fn child() {
    let role = std::env::var(ROLE_ENV).expect("run by the other tests with DPDK_SYS_TEST_ROLE set");
    match role.as_str() {
        "bad-args" => {
            // `--no-huge` with `--in-memory` is rejected by EAL's argument checks.
            let prefix = format!("--file-prefix={}", var("DPDK_SYS_TEST_PREFIX"));
            let err = sys::eal_init(&["dpdk-sys-test", "--no-huge", "--in-memory", "--no-pci", &prefix]).unwrap_err();
            println!("EAL-ERROR {err}");
        }
        "send" | "echo" => run_port(&role),
        other => panic!("unknown role {other}"),
    }
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} not set"))
}

fn parse_mac(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s.split(':').map(|b| u8::from_str_radix(b, 16).expect("MAC byte")).collect();
    v.try_into().expect("6-byte MAC")
}

/// A started port with its pool; stopped, closed and EAL cleaned up by `shutdown`.
struct Port {
    id: u16,
    pool: *mut sys::rte_mempool,
    own: [u8; 6],
    peer: [u8; 6],
}

fn check(rc: i32, what: &str) {
    assert!(rc >= 0, "{what} failed: {} ({rc})", sys::strerror(-rc));
}

fn run_port(role: &str) {
    let iface = var("DPDK_SYS_TEST_IFACE");
    let prefix = var("DPDK_SYS_TEST_PREFIX");
    let cpu = var("DPDK_SYS_TEST_CPU");
    #[rustfmt::skip]
    let args = [
        "dpdk-sys-test".to_owned(), "--no-huge".into(), "-m".into(), "256".into(), "--no-pci".into(),
        "--no-shconf".into(), format!("--file-prefix={prefix}"), format!("--lcores=0@{cpu}"),
        format!("--vdev=net_af_packet0,iface={iface}"), "-d".into(), sys::PMD_DIR.into(),
        "--log-level=lib.eal:notice".into(),
    ];
    println!("EAL args: {}", args.join(" "));
    let t0 = Instant::now();
    if let Err(e) = sys::eal_init(&args) {
        panic!("{role}: {e}");
    }
    let eal_init_ms = t0.elapsed().as_millis();
    let again = sys::eal_init(&args).expect_err("a second rte_eal_init must fail");
    println!("EALREADY second init refused as expected: {again}");
    assert_eq!(again.errno, 114, "EALREADY");

    let port = open_port(parse_mac(&var("DPDK_SYS_TEST_OWN_MAC")), parse_mac(&var("DPDK_SYS_TEST_PEER_MAC")));
    println!("READY port {} on {iface}", port.id);
    std::io::stdout().flush().unwrap();

    let summary = match role {
        "send" => send(&port),
        _ => echo(&port),
    };
    // SAFETY: zeroed rte_eth_stats is a valid value (integers only); the port is valid.
    let stats = unsafe {
        let mut stats: sys::rte_eth_stats = std::mem::zeroed();
        check(sys::rte_eth_stats_get(port.id, &mut stats), "rte_eth_stats_get");
        stats
    };
    shutdown(port);
    println!(
        "RESULT {summary} eal_init_ms={eal_init_ms} ipackets={} opackets={} imissed={} oerrors={}",
        stats.ipackets, stats.opackets, stats.imissed, stats.oerrors
    );
}

fn open_port(own: [u8; 6], peer: [u8; 6]) -> Port {
    let mut id = 0u16;
    // SAFETY: EAL is initialised; the name is a NUL-terminated literal, `id` a valid out pointer.
    check(unsafe { sys::rte_eth_dev_get_port_by_name(c"net_af_packet0".as_ptr(), &mut id) }, "port lookup");
    // SAFETY: EAL is initialised; the pool name is NUL-terminated and unique in this process.
    let pool = unsafe {
        sys::rte_pktmbuf_pool_create(
            c"dpdk_sys_test".as_ptr(),
            POOL_MBUFS,
            POOL_CACHE,
            0,
            sys::RTE_MBUF_DEFAULT_BUF_SIZE as u16,
            sys::rte_socket_id() as i32,
        )
    };
    assert!(!pool.is_null(), "rte_pktmbuf_pool_create: {}", sys::strerror(sys::rte_errno()));
    let conf = sys::rte_eth_conf::default();
    // SAFETY: `id` names a port of this process; conf is a valid zeroed (default) config;
    // the queue set-up gets a live pool; null queue configs mean the driver's defaults.
    unsafe {
        let socket = sys::rte_eth_dev_socket_id(id) as u32; // SOCKET_ID_ANY (-1) is meant to wrap
        check(sys::rte_eth_dev_configure(id, 1, 1, &conf), "rte_eth_dev_configure");
        check(sys::rte_eth_rx_queue_setup(id, 0, RING, socket, std::ptr::null(), pool), "rx queue setup");
        check(sys::rte_eth_tx_queue_setup(id, 0, RING, socket, std::ptr::null()), "tx queue setup");
        check(sys::rte_eth_dev_start(id), "rte_eth_dev_start");
    }
    let mut mac = sys::rte_ether_addr::default();
    // SAFETY: the port is started; `mac` is a valid out pointer.
    check(unsafe { sys::rte_eth_macaddr_get(id, &mut mac) }, "rte_eth_macaddr_get");
    assert_eq!(mac.addr_bytes, own, "the af_packet port has the veth end's MAC");
    Port { id, pool, own, peer }
}

fn shutdown(port: Port) {
    // SAFETY: the port was started by this process and is not used after this; the pool
    // is freed only after the port (which holds its mbufs) is closed.
    unsafe {
        check(sys::rte_eth_dev_stop(port.id), "rte_eth_dev_stop");
        check(sys::rte_eth_dev_close(port.id), "rte_eth_dev_close");
        sys::rte_mempool_free(port.pool);
        check(sys::rte_eal_cleanup(), "rte_eal_cleanup");
    }
    println!("CLEANUP ok (port stopped and closed, pool freed, EAL cleaned up)");
}

/// A received frame of ours, parsed.
struct Frame {
    kind: u8,
    seq: u32,
    ok: bool,
}

/// Parses an mbuf as one of our frames; None if it is someone else's (other ethertype).
///
/// # Safety
/// `m` is a valid single-segment mbuf received from the port.
unsafe fn parse(m: *mut sys::rte_mbuf) -> Option<Frame> {
    // SAFETY: by the contract, `m` is valid and its first segment holds data_len bytes at mtod.
    let data = unsafe { std::slice::from_raw_parts(sys::mtod(m), usize::from((*m).data_len)) };
    if data.len() < ETH + HDR || u16::from_be_bytes([data[12], data[13]]) != ETHERTYPE {
        return None;
    }
    let kind = data[ETH];
    // The length was checked above (ETH + HDR bytes at least).
    let seq = u32::from_be_bytes([data[ETH + 2], data[ETH + 3], data[ETH + 4], data[ETH + 5]]);
    let len = usize::from(u16::from_be_bytes([data[ETH + 6], data[ETH + 7]]));
    let body = &data[ETH + HDR..];
    // SAFETY: as above.
    let single = unsafe { (*m).nb_segs == 1 && (*m).pkt_len as usize == data.len() };
    let ok = single
        && (kind == KIND_DONE || (len == payload_len(seq) && body.len() == len))
        && body.iter().enumerate().all(|(i, &b)| b == pattern(seq, i));
    Some(Frame { kind, seq, ok })
}

/// Allocates and fills one frame of ours.
fn build(port: &Port, kind: u8, seq: u32) -> *mut sys::rte_mbuf {
    let len = if kind == KIND_DONE { 0 } else { payload_len(seq) };
    let total = ETH + HDR + len;
    // SAFETY: the pool is live; append on a fresh mbuf of DEFAULT_BUF_SIZE has room for
    // `total` <= MTU + 14 bytes (checked at compile time against the data room), and
    // returns a pointer to exactly that many writable bytes.
    unsafe {
        let m = sys::rte_pktmbuf_alloc(port.pool);
        assert!(!m.is_null(), "mbuf pool exhausted");
        let p = sys::rte_pktmbuf_append(m, total as u16) as *mut u8;
        assert!(!p.is_null(), "rte_pktmbuf_append({total})");
        let d = std::slice::from_raw_parts_mut(p, total);
        d[0..6].copy_from_slice(&port.peer);
        d[6..12].copy_from_slice(&port.own);
        d[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
        d[ETH] = kind;
        d[ETH + 1] = 0;
        d[ETH + 2..ETH + 6].copy_from_slice(&seq.to_be_bytes());
        d[ETH + 6..ETH + 8].copy_from_slice(&(len as u16).to_be_bytes());
        for (i, b) in d[ETH + HDR..].iter_mut().enumerate() {
            *b = pattern(seq, i);
        }
        m
    }
}

/// Transmits all of `pkts` (retrying what the queue did not take yet).
fn tx_all(port: &Port, pkts: &mut [*mut sys::rte_mbuf]) {
    let mut done = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while done < pkts.len() {
        let n = pkts.len() - done;
        // SAFETY: pkts[done..] are valid mbufs we own; tx_burst takes ownership of the
        // first `sent` of them.
        let sent = unsafe { sys::rte_eth_tx_burst(port.id, 0, pkts[done..].as_mut_ptr(), n as u16) };
        done += usize::from(sent);
        assert!(Instant::now() < deadline, "tx queue stuck");
    }
}

/// Receives up to BURST mbufs (owned by the caller).
fn rx(port: &Port, buf: &mut [*mut sys::rte_mbuf; BURST]) -> usize {
    // SAFETY: `buf` has room for BURST mbuf pointers; the port and queue 0 are started.
    usize::from(unsafe { sys::rte_eth_rx_burst(port.id, 0, buf.as_mut_ptr(), BURST as u16) })
}

fn free(m: *mut sys::rte_mbuf) {
    // SAFETY: `m` is an mbuf we own and do not use again.
    unsafe { sys::rte_pktmbuf_free(m) }
}

fn echo(port: &Port) -> String {
    let total = (PINGPONG + STREAMED) as usize;
    let mut seen = vec![false; total];
    let (mut verified, mut bad, mut dups, mut other) = (0u64, 0u64, 0u64, 0u64);
    let deadline = Instant::now() + CHILD_DEADLINE;
    let mut buf = [std::ptr::null_mut(); BURST];
    let mut done = false;
    while !done {
        assert!(Instant::now() < deadline, "echo: no DONE frame within {CHILD_DEADLINE:?}");
        let n = rx(port, &mut buf);
        if n == 0 {
            std::thread::yield_now();
            continue;
        }
        let mut out = Vec::with_capacity(n);
        for &m in &buf[..n] {
            // SAFETY: `m` came from rx_burst on this port.
            let Some(f) = (unsafe { parse(m) }) else {
                other += 1;
                free(m);
                continue;
            };
            if f.kind == KIND_DONE {
                done = true;
            } else if !f.ok || f.kind != KIND_REQUEST || f.seq as usize >= total {
                bad += 1;
                free(m);
                continue;
            } else {
                verified += 1;
                if std::mem::replace(&mut seen[f.seq as usize], true) {
                    dups += 1;
                }
            }
            // Echo in place: swap the MACs, mark it a reply.
            // SAFETY: `m` holds at least ETH + HDR bytes (parse checked) and is ours.
            unsafe {
                let d = std::slice::from_raw_parts_mut(sys::mtod(m), ETH + HDR);
                d[0..6].copy_from_slice(&port.peer);
                d[6..12].copy_from_slice(&port.own);
                if f.kind == KIND_REQUEST {
                    d[ETH] = KIND_REPLY;
                }
            }
            out.push(m);
        }
        tx_all(port, &mut out);
    }
    let missing = seen.iter().filter(|&&s| !s).count();
    format!("verified={verified} bad={bad} duplicates={dups} missing={missing} other={other}")
}

fn send(port: &Port) -> String {
    let total = PINGPONG + STREAMED;
    let mut acked = vec![false; total as usize];
    let mut in_flight: VecDeque<(u32, Instant)> = VecDeque::new();
    let (mut verified, mut bad, mut dups, mut other, mut retx) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut rtts: Vec<Duration> = Vec::with_capacity(PINGPONG as usize);
    let mut next = 0u32;
    let mut stream_start = None;
    let deadline = Instant::now() + CHILD_DEADLINE;
    let mut buf = [std::ptr::null_mut(); BURST];
    while verified < u64::from(total) {
        assert!(Instant::now() < deadline, "send: only {verified} of {total} echoed within {CHILD_DEADLINE:?}");
        let window = if next < PINGPONG { 1 } else { WINDOW };
        if next == PINGPONG && in_flight.is_empty() && stream_start.is_none() {
            stream_start = Some(Instant::now());
        }
        let mut out = Vec::new();
        while next < total && in_flight.len() < window && (next < PINGPONG || stream_start.is_some()) {
            out.push(build(port, KIND_REQUEST, next));
            in_flight.push_back((next, Instant::now()));
            next += 1;
        }
        // Retransmit what waited too long (veth should lose nothing; counted if it does).
        let now = Instant::now();
        for entry in in_flight.iter_mut() {
            if now.duration_since(entry.1) > RETRANSMIT_AFTER {
                out.push(build(port, KIND_REQUEST, entry.0));
                entry.1 = now;
                retx += 1;
            }
        }
        tx_all(port, &mut out);

        let n = rx(port, &mut buf);
        if n == 0 {
            std::thread::yield_now();
        }
        for &m in &buf[..n] {
            // SAFETY: `m` came from rx_burst on this port.
            let frame = unsafe { parse(m) };
            free(m);
            let Some(f) = frame else {
                other += 1;
                continue;
            };
            if !f.ok || f.kind != KIND_REPLY || f.seq >= total {
                bad += 1;
            } else if std::mem::replace(&mut acked[f.seq as usize], true) {
                dups += 1;
            } else {
                verified += 1;
                if let Some(pos) = in_flight.iter().position(|&(s, _)| s == f.seq) {
                    let (_, at) = in_flight.remove(pos).unwrap();
                    if f.seq < PINGPONG {
                        rtts.push(at.elapsed());
                    }
                }
            }
        }
    }
    let stream_ms = stream_start.map_or(0, |s| s.elapsed().as_millis());
    // Tell the echo side to stop; wait for its echo of DONE (resend now and then).
    let mut done_echoed = false;
    let until = Instant::now() + Duration::from_secs(5);
    let mut last_sent = None::<Instant>;
    while !done_echoed && Instant::now() < until {
        if last_sent.is_none_or(|t| t.elapsed() > Duration::from_millis(100)) {
            tx_all(port, &mut [build(port, KIND_DONE, total)]);
            last_sent = Some(Instant::now());
        }
        let n = rx(port, &mut buf);
        for &m in &buf[..n] {
            // SAFETY: `m` came from rx_burst on this port.
            let frame = unsafe { parse(m) };
            free(m);
            match frame {
                Some(f) if f.kind == KIND_DONE => done_echoed = true,
                Some(_) => dups += 1,
                None => other += 1,
            }
        }
    }
    assert!(done_echoed, "echo side never acknowledged DONE");
    rtts.sort();
    let pct =
        |p: usize| rtts.get((rtts.len() * p / 100).min(rtts.len().saturating_sub(1))).map_or(0, |d| d.as_micros());
    format!(
        "verified={verified} bad={bad} duplicates={dups} other={other} retransmits={retx} rtt_p50_us={} \
         rtt_p99_us={} stream_ms={stream_ms}",
        pct(50),
        pct(99)
    )
}
