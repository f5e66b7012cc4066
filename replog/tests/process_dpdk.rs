//! Three `replog serve` processes over the DPDK transport (`transport = "dpdk"`), each
//! in its own network namespace with an `af_packet` vdev on its veth end; the veth
//! pairs join a bridge (MTU 1500, within the mbuf data room). The test creates the
//! namespaces (`rdp<pid>-1..3`, `rdp<pid>-br`, addresses 10.77.254.x for the client
//! port) and deletes them at the end, also on failure; every replica is killed on drop.
//!
//! - with 5% of every replica's transmitted frames lost (the transport's fault switch),
//!   10,000 entries are committed and every acknowledged entry is on every replica
//!   exactly once, at its position; then a 64 KiB entry crosses (about 45 fragments);
//!   the replicas' own counters show frames were lost and retransmitted;
//! - a SIGKILL of the leader leads to a new leader with a higher ballot, and no
//!   acknowledged entry is lost.
//!
//! Needs root, iproute2 and DPDK's af_packet PMD; without them the tests say why and
//! skip, unless `REPLOG_REQUIRE_ALL` is set, when they fail.
#![cfg(feature = "dpdk")]

mod netns;
mod support;

use netns::{in_netns, parse_ballot, poll};
use replog::client::{Client, ClientConfig, Status};
use replog::config::{DpdkMember, DpdkSection, DurabilityKind, Member, ServeConfig, TransportKind};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const REPLICAS: usize = 3;
const FIRST_LEADER: Duration = Duration::from_secs(30);
const ELECTION: Duration = Duration::from_secs(15);
const CONVERGE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(20);
const SUBNET: u8 = 254;
/// Entries per append request (small, so that many frames cross).
const BATCH: usize = 20;

/// The tests run one at a time: each runs three busy-polling replicas.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Skips (returns true after saying why), or panics under `REPLOG_REQUIRE_ALL`.
fn cannot_run(test: &str) -> bool {
    let why = if let Some(why) = netns::missing_prerequisite() {
        why
    } else {
        let dir = transport::dpdk::pmd_dir();
        let has = |prefix: &str| {
            std::fs::read_dir(dir)
                .map(|d| d.filter_map(Result::ok).any(|e| e.file_name().to_string_lossy().starts_with(prefix)))
                .unwrap_or(false)
        };
        if has("librte_net_af_packet.so") && has("librte_bus_vdev.so") {
            return false;
        }
        format!("DPDK's af_packet PMD or vdev bus is missing from {dir} (apt-get install dpdk)")
    };
    if std::env::var_os("REPLOG_REQUIRE_ALL").is_some() {
        panic!("{test}: cannot run: {why} (REPLOG_REQUIRE_ALL is set, so this fails instead of skipping)");
    }
    say(&format!("SKIPPED {test}: {why} (set REPLOG_REQUIRE_ALL=1 to make this a failure)"));
    true
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn mac(i: usize) -> String {
    format!("02:00:00:77:fe:{i:02x}")
}

/// The namespaces; deleted (with whatever runs inside) on drop.
struct DpdkNet {
    tag: String,
}

impl DpdkNet {
    fn ns(&self, i: usize) -> String {
        format!("rdp{}-{i}", self.tag)
    }

    fn bridge_ns(&self) -> String {
        format!("rdp{}-br", self.tag)
    }

    fn addr(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, SUBNET, i as u8)
    }

    fn create() -> Result<DpdkNet, String> {
        let net = DpdkNet { tag: std::process::id().to_string() };
        let br = net.bridge_ns();
        ip(&["netns", "add", &br])?;
        ip(&["-n", &br, "link", "set", "lo", "up"])?;
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0"])?;
        ip(&["-n", &br, "addr", "add", &format!("10.77.{SUBNET}.254/24"), "dev", "br0"])?;
        ip(&["-n", &br, "link", "set", "br0", "up"])?;
        for i in 1..=REPLICAS {
            let ns = net.ns(i);
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            let v = format!("v{i}");
            #[rustfmt::skip]
            ip(&["link", "add", "eth0", "netns", &ns, "address", &mac(i), "mtu", "1500", "type", "veth", "peer",
                 "name", &v, "netns", &br, "mtu", "1500"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", Self::addr(i)), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &br, "link", "set", &v, "master", "br0"])?;
            ip(&["-n", &br, "link", "set", &v, "up"])?;
        }
        Ok(net)
    }
}

impl Drop for DpdkNet {
    fn drop(&mut self) {
        let mut names = vec![self.bridge_ns()];
        names.extend((1..=REPLICAS).map(|i| self.ns(i)));
        for ns in &names {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-KILL", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
        }
        for i in 1..=REPLICAS {
            for base in ["/var/run/dpdk", "/tmp/dpdk"] {
                let _ = std::fs::remove_dir_all(format!("{base}/{}", self.ns(i)));
            }
        }
    }
}

struct DpdkCluster {
    dir: PathBuf,
    cfgs: Vec<ServeConfig>,
    procs: Vec<Option<Child>>,
    // Declared last: dropped after the processes are killed.
    net: DpdkNet,
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl DpdkCluster {
    fn start(net: DpdkNet, dir: &Path, drop_probability: f64) -> DpdkCluster {
        let members: Vec<Member> = (1..=REPLICAS)
            .map(|i| {
                let ip = DpdkNet::addr(i);
                Member {
                    id: i as u64,
                    peer_addr: SocketAddr::from((ip, 7100)),
                    client_addr: SocketAddr::from((ip, 7101)),
                    metrics_addr: Some(SocketAddr::from((ip, 7102))),
                    learner: false,
                }
            })
            .collect();
        let mut cfgs = ServeConfig::local_cluster(REPLICAS, 7100, dir, DurabilityKind::Fsync);
        for (k, c) in cfgs.iter_mut().enumerate() {
            c.members = members.clone();
            c.transport = TransportKind::Dpdk;
            c.dpdk = Some(DpdkSection {
                port: "net_af_packet0".into(),
                lcores: Some(format!("0@{}", k % cpus())),
                memory_mb: Some(256),
                no_huge: true,
                in_memory: false,
                no_shconf: true,
                file_prefix: Some(net.ns(k + 1)),
                vdevs: vec!["net_af_packet0,iface=eth0".into()],
                pci: vec![],
                eal_args: vec!["--log-level=lib.eal:notice".into()],
                mtu: 1500,
                mbufs: 8191,
                drop_probability,
                members: (1..=REPLICAS).map(|i| DpdkMember { id: i as u64, mac: mac(i) }).collect(),
            });
            c.validate().expect("valid configuration");
        }
        let mut c = DpdkCluster { dir: dir.to_path_buf(), cfgs, procs: Vec::new(), net };
        for i in 0..REPLICAS {
            let p = c.spawn(i);
            c.procs.push(Some(p));
        }
        c
    }

    fn spawn(&self, i: usize) -> Child {
        let cfg = &self.cfgs[i];
        let ns = self.net.ns(i + 1);
        support::serve_command(&self.dir, &format!("node-{}", cfg.id), cfg, &["ip", "netns", "exec", &ns])
            .spawn()
            .expect("start replog serve in its namespace")
    }

    fn cluster_id(&self) -> u64 {
        self.cfgs[0].cluster_id
    }

    fn client_addr(&self, i: usize) -> SocketAddr {
        self.cfgs[i].me().client_addr
    }

    fn status(&self, i: usize) -> Option<Status> {
        Client::status_of(self.client_addr(i), self.cluster_id(), Duration::from_millis(500)).ok()
    }

    fn client_of(&self, idx: &[usize]) -> Client {
        let mut cfg = ClientConfig::new(self.cluster_id(), idx.iter().map(|&i| self.client_addr(i)).collect());
        cfg.timeout = Duration::from_secs(3);
        cfg.retries = 30;
        Client::connect(cfg).expect("connect to the cluster")
    }

    fn read_all(&self, i: usize) -> Vec<(u64, Vec<u8>)> {
        support::read_log(&mut self.client_of(&[i]))
    }

    fn log_of(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("node-{}.log", self.cfgs[i].id))).unwrap_or_default()
    }

    fn assert_running(&mut self) {
        for i in 0..REPLICAS {
            if let Some(p) = &mut self.procs[i] {
                if let Ok(Some(st)) = p.try_wait() {
                    panic!("replica {} exited ({st}); log:\n{}", i + 1, self.log_of(i));
                }
            }
        }
    }

    /// Waits for a leader among `among` that all of them follow: (index, ballot).
    fn wait_leader(&self, among: &[usize], timeout: Duration) -> Option<(usize, (u64, u64))> {
        in_netns(&self.net.bridge_ns(), || {
            poll(timeout, POLL, 100_000, || {
                let st: Vec<Status> = among.iter().map(|&i| self.status(i)).collect::<Option<Vec<_>>>()?;
                let l = st.iter().find(|s| s.role == "leader")?;
                st.iter().all(|s| s.leader == Some(l.node)).then(|| (l.node as usize - 1, parse_ballot(&l.ballot)))
            })
        })
    }

    /// Waits until every replica of `among` applied position `pos`.
    fn wait_applied(&self, among: &[usize], pos: u64) -> bool {
        in_netns(&self.net.bridge_ns(), || {
            poll(CONVERGE, POLL, 100_000, || {
                among.iter().all(|&i| self.status(i).is_some_and(|s| s.last_position >= pos)).then_some(())
            })
        })
        .is_some()
    }

    /// Stops replica `i` with SIGTERM and waits for it (its transport logs its counters
    /// and closes the port and EAL on the way out).
    fn stop(&mut self, i: usize) {
        if let Some(mut p) = self.procs[i].take() {
            let _ = Command::new("kill").args(["-TERM", &p.id().to_string()]).status();
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(15) {
                if let Ok(Some(_)) = p.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = p.kill();
            let _ = p.wait();
            panic!("replica {} did not stop within 15 s of SIGTERM", i + 1);
        }
    }
}

impl Drop for DpdkCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for i in 0..self.cfgs.len() {
                let log = self.log_of(i);
                let lines: Vec<&str> = log.lines().collect();
                let tail = &lines[lines.len().saturating_sub(40)..];
                eprintln!("---- replica {}, last {} log lines:\n{}", i + 1, tail.len(), tail.join("\n"));
            }
        }
        for p in self.procs.iter_mut().flatten() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

fn setup(test: &str, drop_probability: f64) -> Option<(DpdkCluster, tempfile::TempDir)> {
    if cannot_run(test) {
        return None;
    }
    let net = match DpdkNet::create() {
        Ok(n) => n,
        Err(why) => {
            let why = format!("cannot create the namespaces: {why}");
            if std::env::var_os("REPLOG_REQUIRE_ALL").is_some() {
                panic!("{test}: {why}");
            }
            say(&format!("SKIPPED {test}: {why}"));
            return None;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    Some((DpdkCluster::start(net, dir.path(), drop_probability), dir))
}

/// Appends `n` entries `<tag>-<k>` in batches; every one must be acknowledged.
fn append_all(c: &DpdkCluster, among: &[usize], tag: &str, n: usize, acked: &mut Vec<(Vec<u8>, u64)>) {
    in_netns(&c.net.bridge_ns(), || {
        let mut client = c.client_of(among);
        let mut k = 0;
        while k < n {
            let batch: Vec<Vec<u8>> = (k..(k + BATCH).min(n)).map(|j| format!("{tag}-{j}").into_bytes()).collect();
            let pos = client
                .append_batch(batch.iter().map(|b| bytes::Bytes::from(b.clone())).collect())
                .unwrap_or_else(|e| panic!("append of {tag}-{k}.. was not acknowledged: {e}"));
            assert_eq!(pos.len(), batch.len());
            acked.extend(batch.into_iter().zip(pos));
            k += BATCH;
        }
    });
}

/// Every acknowledged entry is in `log` exactly once, at its position.
fn check_exactly_once(log: &[(u64, Vec<u8>)], acked: &[(Vec<u8>, u64)], who: &str) {
    let mut count: HashMap<&[u8], usize> = HashMap::new();
    for (_, d) in log {
        *count.entry(d.as_slice()).or_default() += 1;
    }
    let by_pos: HashMap<u64, &[u8]> = log.iter().map(|(p, d)| (*p, d.as_slice())).collect();
    for (payload, pos) in acked {
        assert_eq!(by_pos.get(pos).copied(), Some(payload.as_slice()), "{who}: entry at acknowledged position {pos}");
        assert_eq!(count.get(payload.as_slice()), Some(&1), "{who}: entry at {pos} appears exactly once");
    }
}

/// `key=value` from the last "dpdk transport closing" line of a log.
fn counter(log: &str, key: &str) -> Option<u64> {
    let line = log.lines().rev().find(|l| l.contains("dpdk transport closing"))?;
    let line = support::strip_ansi(line);
    line.split_whitespace().find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

#[test]
fn dpdk_commit_10000_entries_with_5pct_frame_loss_exactly_once_and_a_64k_entry_fragmented() {
    const NAME: &str = "dpdk_commit_10000_entries_with_5pct_frame_loss_exactly_once_and_a_64k_entry_fragmented";
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some((mut c, _dir)) = setup(NAME, 0.05) else { return };
    let all = [0, 1, 2];
    let t0 = Instant::now();
    let Some((leader, ballot)) = c.wait_leader(&all, FIRST_LEADER) else {
        c.assert_running();
        panic!("no leader followed by every replica within {FIRST_LEADER:?}");
    };
    say(&format!("dpdk: replica {} leads with ballot {ballot:?} after {:?}", leader + 1, t0.elapsed()));

    let mut acked = Vec::new();
    let t1 = Instant::now();
    append_all(&c, &all, "loss", 10_000, &mut acked);
    let commit_time = t1.elapsed();
    let big: Vec<u8> = (0..64 * 1024).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let big_pos = in_netns(&c.net.bridge_ns(), || c.client_of(&all).append(big.clone()).expect("64 KiB append"));
    acked.push((big.clone(), big_pos));
    assert!(c.wait_applied(&all, big_pos), "every replica applied up to position {big_pos}");

    for i in 0..REPLICAS {
        let log = in_netns(&c.net.bridge_ns(), || c.read_all(i));
        check_exactly_once(&log, &acked, &format!("replica {}", i + 1));
        assert_eq!(log.len(), acked.len(), "replica {} holds only acknowledged entries", i + 1);
        let got = &log.iter().find(|(p, _)| *p == big_pos).expect("64 KiB entry").1;
        assert!(got == &big, "replica {}: the 64 KiB entry is intact", i + 1);
    }

    // Stop them cleanly: each transport logs its counters, closes its port and EAL.
    for i in 0..REPLICAS {
        c.stop(i);
    }
    let (mut dropped, mut retx) = (0, 0);
    for i in 0..REPLICAS {
        let log = c.log_of(i);
        let d = counter(&log, "dropped_injected").unwrap_or_else(|| panic!("replica {}: no counters logged", i + 1));
        let r = counter(&log, "retransmits").expect("retransmits");
        dropped += d;
        retx += r;
        assert!(d > 0, "replica {}: frames were lost on purpose", i + 1);
        assert!(log.contains("EAL cleaned up"), "replica {}: EAL cleaned up at exit", i + 1);
        assert!(log.contains("DPDK port stopped and closed"), "replica {}: port closed at exit", i + 1);
    }
    assert!(retx > 0, "lost frames were retransmitted");
    say(&format!(
        "dpdk: 10,000 entries committed in {:.2} s with 5% frame loss ({dropped} frames lost, {retx} retransmitted); \
         a 64 KiB entry at position {big_pos}; every acknowledged entry exactly once on all {REPLICAS} replicas",
        commit_time.as_secs_f64()
    ));
}

#[test]
fn dpdk_sigkill_of_the_leader_elects_a_new_one_and_loses_no_acknowledged_entry() {
    const NAME: &str = "dpdk_sigkill_of_the_leader_elects_a_new_one_and_loses_no_acknowledged_entry";
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some((mut c, _dir)) = setup(NAME, 0.05) else { return };
    let all = [0, 1, 2];
    let Some((old, old_ballot)) = c.wait_leader(&all, FIRST_LEADER) else {
        c.assert_running();
        panic!("no leader followed by every replica within {FIRST_LEADER:?}");
    };
    let mut acked = Vec::new();
    append_all(&c, &all, "before", 1_000, &mut acked);

    let mut p = c.procs[old].take().expect("leader runs");
    p.kill().expect("SIGKILL the leader");
    let _ = p.wait();
    let killed_at = Instant::now();
    let others: Vec<usize> = all.iter().copied().filter(|&i| i != old).collect();
    let Some((new, new_ballot)) = c.wait_leader(&others, ELECTION) else {
        c.assert_running();
        panic!("no new leader among {others:?} within {ELECTION:?} of killing replica {}", old + 1);
    };
    let election = killed_at.elapsed();
    assert_ne!(new, old);
    assert!(new_ballot > old_ballot, "the new leader's ballot {new_ballot:?} is above {old_ballot:?}");
    append_all(&c, &others, "after", 1_000, &mut acked);
    let last = acked.last().expect("acked").1;
    assert!(c.wait_applied(&others, last), "the survivors applied up to {last}");
    for &i in &others {
        let log = in_netns(&c.net.bridge_ns(), || c.read_all(i));
        check_exactly_once(&log, &acked, &format!("replica {}", i + 1));
    }
    say(&format!(
        "dpdk: leader {} SIGKILLed; replica {} leads with ballot {new_ballot:?} after {:.2} s; all {} acknowledged \
         entries on both survivors exactly once",
        old + 1,
        new + 1,
        election.as_secs_f64(),
        acked.len()
    ));
}
