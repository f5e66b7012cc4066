//! Three `replog serve` processes with `transport = "rdma"` on one RDMA device (the
//! soft-RoCE VM's `rxe0`: rxe passes traffic between local queue pairs): 10,000 appends
//! from four concurrent clients while the leader is SIGKILLed once and restarted, then
//! leaders frozen under load. Every acknowledged append must be present exactly once,
//! at its position, in one order on every replica after healing. Twice: `fsync`
//! durability, where a leader counts a follower's acceptance by its acknowledgement
//! (after the follower's sync), and `memory`, where it counts it when its RDMA WRITE
//! completed (acceptance by landing: the followers fence the old leader before their
//! promise rises).
//!
//! Needs an RDMA device with an active port (`hw-setup/rxe-vm.sh run -- <this test
//! binary>`); without one it prints why and passes, unless `REPLOG_REQUIRE_ALL=1`.
#![cfg(feature = "rdma")]

mod support;

use replog::config::{DurabilityKind, TransportKind};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use support::Cluster;

const CLIENTS: usize = 4;
const PER_CLIENT: u64 = 2500;
/// Sequential appends of one client whose latencies are printed.
const LATENCY_SAMPLES: usize = 300;
/// How long both followers stay stopped: below the election timeout ([`ELECTION_MS`]),
/// so that the leader keeps leading (it hears from no follower meanwhile), and long
/// enough for a few commits at the emulated RDMA's latency under load (p50 up to 60 ms).
const STOPPED: Duration = Duration::from_millis(300);
/// The replicas' election timeout (the default, 150 ms, would depose a leader whose
/// followers are stopped for [`STOPPED`]).
const ELECTION_MS: f64 = 400.0;

/// Stops both followers (SIGSTOP, then waits until the kernel shows them stopped), lets
/// one client append to the leader for [`STOPPED`], resumes them, and returns the appends
/// that started after both were stopped and were acknowledged before they resumed.
fn appends_with_followers_stopped(cluster: &Cluster) -> Vec<support::Acked> {
    let leader = cluster.wait_leader(Duration::from_secs(60));
    let pids: Vec<libc::pid_t> =
        (0..3).filter(|&i| i != leader).map(|i| cluster.pids()[i].expect("a follower runs") as libc::pid_t).collect();
    let mut client = cluster.client_of(leader);
    client.append(b"rdma-before-stop".to_vec()).expect("append before the stop");
    let signal = |sig: libc::c_int| {
        for &pid in &pids {
            // SAFETY: signalling a child process of this test by its pid.
            assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "signal {sig} to follower {pid}");
        }
    };
    let state = support::proc_state;
    signal(libc::SIGSTOP);
    let t0 = Instant::now();
    while !pids.iter().all(|&p| state(p).as_deref() == Some("T")) {
        assert!(t0.elapsed() < Duration::from_secs(10), "the followers did not stop");
        std::thread::sleep(Duration::from_millis(1));
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let appender = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut done = Vec::new();
            for i in 0.. {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let payload = format!("rdma-stopped-{i}").into_bytes();
                let called = Instant::now();
                match client.append(payload.clone()) {
                    Ok(pos) => done.push(support::Acked { payload, pos, called, returned: Instant::now() }),
                    Err(_) => break,
                }
            }
            done
        })
    };
    let stopped_at = Instant::now();
    std::thread::sleep(STOPPED);
    let resumed_at = Instant::now();
    signal(libc::SIGCONT);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let done = appender.join().expect("appender thread");
    done.into_iter().filter(|a| a.called >= stopped_at && a.returned < resumed_at).collect()
}

#[test]
fn ten_thousand_appends_over_rdma_survive_a_leader_kill() {
    if !transport::rdma::testing::device_or_skip("process_rdma") {
        return;
    }
    run(DurabilityKind::Fsync);
}

#[test]
fn memory_mode_accepts_on_landing_and_survives_a_leader_kill() {
    if !transport::rdma::testing::device_or_skip("process_rdma") {
        return;
    }
    run(DurabilityKind::Memory);
}

fn run(durability: DurabilityKind) {
    let landing = durability == DurabilityKind::Memory;
    let mode = durability.as_str();
    let dir = tempfile::tempdir().unwrap();
    let side_ip: Option<IpAddr> = std::env::var("RXE_IP").ok().and_then(|s| s.parse().ok());
    let mut cluster = Cluster::start_with(dir.path(), 3, durability, |c| {
        c.transport = TransportKind::Rdma;
        c.rdma.device = std::env::var("RXE_DEV").unwrap_or_default();
        c.rdma.gid_index = std::env::var("RXE_GID_INDEX").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
        c.rdma.region_bytes = 16 << 20;
        c.rdma.cell_bytes = 256 << 10;
        c.limits.max_batch_bytes = 64 << 10;
        c.limits.max_batch_entries = 256;
        c.timing.election_timeout_ms = ELECTION_MS;
        // The side channels on the RDMA interface's address (10.77.0.1 in the VM).
        if let Some(ip) = side_ip {
            for m in &mut c.members {
                m.peer_addr = SocketAddr::new(ip, m.peer_addr.port());
            }
        }
    });
    let leader = cluster.wait_leader(Duration::from_secs(60));
    let log = cluster.log_of(leader);
    assert!(log.contains("rdma transport open"), "replica {} did not start the RDMA transport:\n{log}", leader + 1);

    // Commit latency: one client, sequential appends (before the concurrent load).
    let mut lat = Vec::with_capacity(LATENCY_SAMPLES);
    let mut client = cluster.client();
    for i in 0..LATENCY_SAMPLES {
        let t = Instant::now();
        client.append(format!("rdma-latency-{i}").into_bytes()).expect("sequential append");
        lat.push(t.elapsed());
    }
    lat.sort();
    let pct = |p: usize| lat[(lat.len() * p / 100).min(lat.len() - 1)].as_secs_f64() * 1e6;
    println!(
        "rdma ({mode}): 1 client, {LATENCY_SAMPLES} sequential appends: commit latency p50 {:.0} us, p90 {:.0} us, \
         p99 {:.0} us",
        pct(50),
        pct(90),
        pct(99)
    );
    drop(client);

    // The followers' CPUs off the commit path: stop both followers (SIGSTOP) for
    // STOPPED; a client's appends to the leader started meanwhile still commit under
    // acceptance by landing (their cells land in the stopped followers' memory, carried
    // by the NIC: here the kernel's rxe), and none can under fsync (each waits for a
    // follower's acknowledgement, sent after its sync).
    let stopped = appends_with_followers_stopped(&cluster);
    println!(
        "rdma ({mode}): {} appends started and committed while both followers were stopped for {} ms",
        stopped.len(),
        STOPPED.as_millis()
    );
    if landing {
        assert!(!stopped.is_empty(), "no append committed while the followers' CPUs were stopped");
    } else {
        assert!(stopped.is_empty(), "{} appends committed without a follower's acknowledgement", stopped.len());
    }

    let started = Instant::now();
    let load = support::Appenders::start_named(&cluster, "rdma-client", CLIENTS, PER_CLIENT);

    // SIGKILL the leader after 3,000 acknowledgements; restart it 1 s later.
    load.wait_total(3000, Duration::from_secs(300));
    let leader = cluster.wait_leader(Duration::from_secs(60));
    let killed_at = Instant::now();
    cluster.kill(leader);
    let failover = load.failover_after(killed_at, Duration::from_secs(60));
    println!("rdma: failover after killing replica {} (leader): {:.1} ms", leader + 1, failover.as_secs_f64() * 1e3);
    std::thread::sleep(Duration::from_secs(1));
    cluster.restart(leader);
    let out = load.join();
    let elapsed = started.elapsed();
    println!(
        "rdma: {} appends acknowledged, {} with unknown outcome, in {:.1} s",
        out.acked.len(),
        out.unknown.len(),
        elapsed.as_secs_f64()
    );
    assert!(out.acked.len() >= 10_000 - out.unknown.len());
    assert!(out.acked.len() >= 9_000, "most appends must be acknowledged ({} of 10000)", out.acked.len());

    let mut acked = stopped;
    acked.extend(out.acked.iter().cloned());
    let total = cluster.check_acked_once(&acked, acked.len() as u64, Duration::from_secs(120)).len() as u64;
    println!("rdma: {total} entries on every replica, no acknowledged entry lost");

    // Elections that must read log tails: under load, freeze the leader (SIGSTOP). The
    // writes it posted still land (the NIC and the kernel's rxe carry them) and the
    // followers accept them, but it commits nothing more: the followers hold an
    // uncommitted tail, the next candidate reads it from its promiser by RDMA READ of
    // the promiser's accepted-entries mirror. Then thaw it (it steps down). At most 8
    // rounds, until a tail was read by RDMA READ.
    let mut phase2 = Vec::new();
    for round in 0..8 {
        let load = support::Appenders::start(&cluster, 2, u64::MAX);
        load.wait_more(200);
        let frozen = cluster.wait_leader(Duration::from_secs(60));
        let pid = cluster.pids()[frozen].expect("the leader runs") as libc::pid_t;
        // SAFETY: signalling a child process of this test by its pid.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0, "SIGSTOP the leader");
        let t0 = Instant::now();
        let next = loop {
            assert!(t0.elapsed() < Duration::from_secs(60), "no new leader within 60 s of freezing {}", frozen + 1);
            let others: Vec<usize> = (0..3).filter(|&i| i != frozen).collect();
            if let Some(&l) = others.iter().find(|&&i| cluster.status(i).is_some_and(|s| s.role == "leader")) {
                break l;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        load.wait_more(100);
        // SAFETY: as above.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0, "SIGCONT the old leader");
        let out = load.finish();
        phase2.extend(out.acked);
        // The agents log their counts at most every second.
        std::thread::sleep(Duration::from_millis(1500));
        let r: u64 = (0..3).map(|i| read_counts(&support::strip_ansi(&cluster.log_of(i))).rdma_read).sum();
        println!(
            "rdma: freeze round {}: replica {} frozen, replica {} leads; log-tail reads by RDMA READ so far: {r}",
            round + 1,
            frozen + 1,
            next + 1
        );
        if r > 0 {
            break;
        }
    }
    let total = cluster.wait_converged(total + phase2.len() as u64, Duration::from_secs(120));
    let log = cluster.read_all(0);
    // By position: every round's appenders reuse the payloads `client<c>-entry<i>`.
    let at: HashMap<u64, &[u8]> = log.iter().map(|(p, d)| (*p, d.as_slice())).collect();
    for a in &phase2 {
        assert_eq!(at.get(&a.pos), Some(&a.payload.as_slice()), "acknowledged entry lost across the freezes");
    }
    for i in 1..3 {
        assert!(cluster.read_all(i) == log, "replica {} differs from replica 1 after the freezes", i + 1);
    }
    println!("rdma: {} more appends across the freezes, {total} entries on every replica", phase2.len());

    // How the followers' acknowledgements travelled: RDMA WRITE into the leader's
    // acknowledgement area (the fast path) or side-channel message (the fallback). The
    // agents log their counts at most every second: give them time for the last line.
    std::thread::sleep(Duration::from_millis(2500));
    let mut sum = AckCounts::default();
    for i in 0..3 {
        let c = ack_counts(&support::strip_ansi(&cluster.log_of(i)));
        println!(
            "rdma: replica {}: acknowledgements sent {} by RDMA WRITE, {} by side channel; writes completed {} by a \
             record in its acknowledgement area, {} by messages, {} at landing ({} denied after landing); {} fences \
             drained {} cells; {} cells written again after a stream restart",
            i + 1,
            c.sent_rdma,
            c.sent_side,
            c.taken_rdma,
            c.taken_side,
            c.landed,
            c.denied_after_landing,
            c.fences,
            c.drained,
            c.replayed
        );
        sum.add(&c);
    }
    let stalls: usize = (0..3)
        .map(|i| support::strip_ansi(&cluster.log_of(i)).lines().filter(|l| l.contains("heartbeat counter")).count())
        .sum();
    println!("rdma: links taken down by a stalled heartbeat counter: {stalls}");
    let taken = sum.taken_rdma + sum.taken_side;
    let completed = taken + sum.landed;
    println!(
        "rdma ({mode}): writes completed by leaders: {} at landing, {} by acknowledgement ({} by RDMA WRITE, {} by \
         side channel); followers fenced {} times, draining {} cells",
        sum.landed, taken, sum.taken_rdma, sum.taken_side, sum.fences, sum.drained
    );
    // How log-tail reads travelled (the candidates of the elections after the kill read
    // their promisers' tails): by RDMA READ of the promiser's accepted-entries mirror,
    // or over the side channel (the peer's CPU), and how many fell back.
    let mut reads = ReadCounts::default();
    for i in 0..3 {
        let r = read_counts(&support::strip_ansi(&cluster.log_of(i)));
        println!(
            "rdma: replica {}: log-tail reads {} by RDMA READ, {} by side channel ({} fell back to it)",
            i + 1,
            r.rdma_read,
            r.side_channel,
            r.fallback
        );
        reads.add(&r);
    }
    println!(
        "rdma: log-tail reads: {} by RDMA READ, {} by side channel, {} fallbacks",
        reads.rdma_read, reads.side_channel, reads.fallback
    );
    assert!(reads.rdma_read > 0, "the elections after the kill read no log tail by RDMA READ: {reads:?}");
    assert!(completed >= 10_000, "the leaders completed {completed} writes for 10,300 entries (two followers each)");
    let sent = sum.sent_rdma + sum.sent_side;
    assert!(sent >= 10_000, "the followers acknowledged {sent} writes for 10,300 entries: {sum:?}");
    assert!(sum.sent_rdma * 10 >= sent * 9, "at least 90% of the acknowledgements must go by RDMA WRITE: {sum:?}");
    assert_eq!(sum.denied_after_landing, 0, "a write completed at landing was denied by its follower: {sum:?}");
    if landing {
        // Memory mode: the leader counts acceptance when its WRITE completed. A write
        // whose acknowledgement record was seen before the WRITE's completion was
        // polled completes by the record (a race the NIC's completion mostly wins).
        assert!(sum.landed * 10 >= completed * 9, "at least 90% of the writes must complete at landing: {sum:?}");
        assert!(sum.fences > 0, "the elections after the kill and the freezes fenced no old leader: {sum:?}");
    } else {
        // fsync: acceptance is the follower's acknowledgement, sent after its sync.
        assert_eq!(sum.landed, 0, "fsync mode must complete writes by acknowledgement only: {sum:?}");
        assert_eq!(sum.fences, 0, "fsync mode must not fence: {sum:?}");
        assert!(
            sum.taken_rdma * 10 >= taken * 9,
            "at least 90% of the acknowledgements must go by RDMA WRITE: {sum:?}"
        );
        assert!(sum.sent_rdma >= sum.taken_rdma * 9 / 10, "followers' and leaders' counts disagree: {sum:?}");
    }
}

/// Acknowledgement counts of one replica (summed over its process lives).
#[derive(Debug, Default, Clone, Copy)]
struct AckCounts {
    sent_rdma: u64,
    sent_side: u64,
    taken_rdma: u64,
    taken_side: u64,
    landed: u64,
    denied_after_landing: u64,
    fences: u64,
    drained: u64,
    replayed: u64,
}

impl AckCounts {
    fn add(&mut self, o: &AckCounts) {
        self.sent_rdma += o.sent_rdma;
        self.sent_side += o.sent_side;
        self.taken_rdma += o.taken_rdma;
        self.taken_side += o.taken_side;
        self.landed += o.landed;
        self.denied_after_landing += o.denied_after_landing;
        self.fences += o.fences;
        self.drained += o.drained;
        self.replayed += o.replayed;
    }

    fn le(&self, o: &AckCounts) -> bool {
        self.sent_rdma <= o.sent_rdma
            && self.sent_side <= o.sent_side
            && self.taken_rdma <= o.taken_rdma
            && self.taken_side <= o.taken_side
            && self.landed <= o.landed
            && self.fences <= o.fences
    }
}

/// The counts of the agent's "rdma acknowledgements" log lines: cumulative within one
/// process life, so a line whose counts went down starts a new life (a restart appends
/// to the same log).
fn ack_counts(log: &str) -> AckCounts {
    let field = support::log_field;
    let (mut total, mut last) = (AckCounts::default(), AckCounts::default());
    for line in log.lines().filter(|l| l.contains("rdma acknowledgements")) {
        let c = AckCounts {
            sent_rdma: field(line, "sent_rdma"),
            sent_side: field(line, "sent_side"),
            taken_rdma: field(line, "taken_rdma"),
            taken_side: field(line, "taken_side"),
            landed: field(line, "landed"),
            denied_after_landing: field(line, "denied_after_landing"),
            fences: field(line, "fences"),
            drained: field(line, "drained"),
            replayed: field(line, "replayed"),
        };
        if !last.le(&c) {
            total.add(&last);
        }
        last = c;
    }
    total.add(&last);
    total
}

/// Log-tail read counts of one replica (summed over its process lives).
#[derive(Debug, Default, Clone, Copy)]
struct ReadCounts {
    rdma_read: u64,
    side_channel: u64,
    fallback: u64,
}

impl ReadCounts {
    fn add(&mut self, o: &ReadCounts) {
        self.rdma_read += o.rdma_read;
        self.side_channel += o.side_channel;
        self.fallback += o.fallback;
    }

    fn le(&self, o: &ReadCounts) -> bool {
        self.rdma_read <= o.rdma_read && self.side_channel <= o.side_channel && self.fallback <= o.fallback
    }
}

/// The counts of the agent's "rdma reads" log lines (cumulative within one process life).
fn read_counts(log: &str) -> ReadCounts {
    let field = support::log_field;
    let (mut total, mut last) = (ReadCounts::default(), ReadCounts::default());
    for line in log.lines().filter(|l| l.contains("rdma reads")) {
        let c = ReadCounts {
            rdma_read: field(line, "rdma_read"),
            side_channel: field(line, "side_channel"),
            fallback: field(line, "fallback"),
        };
        if !last.le(&c) {
            total.add(&last);
        }
        last = c;
    }
    total.add(&last);
    total
}
