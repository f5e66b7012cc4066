//! Three `replog serve` processes with `transport = "rdma"` and `durability = "pmem"`,
//! each replica's cell ring on a device-dax device of its own (`[rdma] region_path`),
//! its data directory on a DAX filesystem. With the ring on persistent memory the leader
//! counts a follower's acceptance at a read-after-write (an RDMA READ of the cell's last
//! word after its WRITE), not at the follower's acknowledgement: so appends commit while
//! both followers are stopped (SIGSTOP). Then both stopped followers and the leader are
//! SIGKILLed and only the two followers restarted: what was committed while they were
//! stopped exists only as landed cells in their rings, so they must replay those into
//! their cores at restart. They must elect a leader and serve every acknowledged append
//! (before and during the stop) once, at its position, in order.
//!
//! Needs an RDMA device with an active port, `REPLOG_TEST_PMEM_DIR` (a directory on a
//! DAX filesystem) and `REPLOG_TEST_DEVDAX_ALL` (at least three device-dax devices,
//! space-separated; the last three are used): `RXE_PMEM=256M RXE_DEVDAX=128M
//! RXE_DEVDAX_COUNT=4 hw-setup/rxe-vm.sh run -- <this test binary>`. Without them it
//! prints why and passes, unless `REPLOG_REQUIRE_ALL=1`.
#![cfg(feature = "rdma")]

mod support;

use replog::config::{DurabilityKind, TransportKind};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{Acked, Cluster};

/// Sequential appends before the followers are stopped: enough to wrap the ring
/// ([`CELLS`]) more than once, so that cell 0 no longer holds the stream's first cell
/// (a restarted follower cannot find the stream from its start: only a replay of the
/// ring's landed cells brings back what committed while it was stopped).
const BEFORE: usize = 3 * CELLS as usize;
/// How long both followers stay stopped: below the election timeout ([`ELECTION_MS`]),
/// so that the leader keeps leading, and long enough for a few commits at the emulated
/// RDMA's latency.
const STOPPED: Duration = Duration::from_millis(300);
/// The replicas' election timeout (the default, 150 ms, would depose a leader whose
/// followers are stopped for [`STOPPED`]).
const ELECTION_MS: f64 = 400.0;
/// Each replica's log region (the cell ring) and cell: the ring must fit in a device of
/// the VM's `RXE_DEVDAX=128M` (about 124 MiB usable).
const REGION_BYTES: u64 = 32 << 20;
const CELL_BYTES: u64 = 1 << 20;
/// Cells in the ring.
const CELLS: u64 = REGION_BYTES / CELL_BYTES;

/// Says why the test cannot run: a pass with a `SKIP` line, or a failure under
/// `REPLOG_REQUIRE_ALL=1`.
fn cannot_run(why: &str) {
    if std::env::var("REPLOG_REQUIRE_ALL").as_deref() == Ok("1") {
        panic!("process_rdma_pmem: {why} (REPLOG_REQUIRE_ALL=1)");
    }
    eprintln!("SKIP process_rdma_pmem: {why}");
}

/// The size of device-dax device `dev` (`/dev/daxN.M`) as its sysfs entry gives it.
fn devdax_size(dev: &str) -> Option<u64> {
    let name = dev.rsplit('/').next()?;
    std::fs::read_to_string(format!("/sys/bus/dax/devices/{name}/size")).ok()?.trim().parse().ok()
}

/// What the test runs on: the DAX directory and three device-dax devices, or why not.
fn environment() -> Result<(PathBuf, Vec<String>), String> {
    let vm = "run it in the soft-RoCE VM: RXE_PMEM=256M RXE_DEVDAX=128M RXE_DEVDAX_COUNT=4 hw-setup/rxe-vm.sh run \
              -- <test binary>";
    let Some(pmem) = std::env::var_os("REPLOG_TEST_PMEM_DIR") else {
        return Err(format!("REPLOG_TEST_PMEM_DIR is not set (a directory on a DAX filesystem); {vm}"));
    };
    let all = std::env::var("REPLOG_TEST_DEVDAX_ALL").unwrap_or_default();
    let devs: Vec<String> = all.split_whitespace().map(str::to_owned).collect();
    if devs.len() < 3 {
        return Err(format!(
            "REPLOG_TEST_DEVDAX_ALL names {} device-dax devices ({all:?}), the test needs 3; {vm}",
            devs.len()
        ));
    }
    let devs = devs[devs.len() - 3..].to_vec();
    for d in &devs {
        match devdax_size(d) {
            Some(size) if size >= REGION_BYTES => {}
            Some(size) => return Err(format!("{d} has {size} bytes, the test's ring needs {REGION_BYTES}")),
            None => return Err(format!("{d}: no size in /sys/bus/dax/devices (not a device-dax device?)")),
        }
    }
    Ok((PathBuf::from(pmem), devs))
}

/// The replicas other than `leader`.
fn cluster_followers(leader: usize) -> Vec<usize> {
    (0..3).filter(|&i| i != leader).collect()
}

/// The acknowledgements a follower sent (the cells it took) by its last "rdma
/// acknowledgements" log line.
fn acks_sent(log: &str) -> u64 {
    let field = support::log_field;
    log.lines()
        .rfind(|l| l.contains("rdma acknowledgements"))
        .map_or(0, |l| field(l, "sent_rdma") + field(l, "sent_side"))
}

/// The cells a replica's agent handed its core from its region at start, over its lives
/// (the "landed cells handed to the core at start" lines' `cells`).
fn recovered_cells(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("landed cells handed to the core at start"))
        .map(|l| support::log_field(l, "cells"))
        .sum()
}

#[test]
fn pmem_ring_commits_with_followers_stopped_and_survives_killing_everyone() {
    if !transport::rdma::testing::device_or_skip("process_rdma_pmem") {
        return;
    }
    let (pmem_root, devs) = match environment() {
        Ok(e) => e,
        Err(why) => return cannot_run(&why),
    };
    // A directory per run on the DAX filesystem: configurations, logs, data directories.
    let dir = tempfile::Builder::new().prefix("process-rdma-pmem-").tempdir_in(&pmem_root).expect("a run directory");
    let side_ip = transport::rdma::testing::side_channel_ip();
    let mut cluster = Cluster::start_with(dir.path(), 3, DurabilityKind::Pmem, |c| {
        c.transport = TransportKind::Rdma;
        c.rdma.device = std::env::var("RXE_DEV").unwrap_or_default();
        c.rdma.gid_index = std::env::var("RXE_GID_INDEX").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
        c.rdma.region_bytes = REGION_BYTES;
        c.rdma.cell_bytes = CELL_BYTES;
        // Replica ids are 1..=3: one device each.
        c.rdma.region_path = PathBuf::from(&devs[(c.id - 1) as usize]);
        c.limits.max_batch_bytes = 64 << 10;
        c.limits.max_batch_entries = 256;
        c.timing.election_timeout_ms = ELECTION_MS;
        for m in &mut c.members {
            m.peer_addr = SocketAddr::new(side_ip, m.peer_addr.port());
        }
    });
    let leader = cluster.wait_leader(Duration::from_secs(60));
    for i in 0..3 {
        let line = cluster
            .wait_log_line(i, &["rdma writes complete"], Duration::from_secs(10))
            .unwrap_or_else(|| panic!("replica {} logged no landing:\n{}", i + 1, cluster.log_of(i)));
        assert!(line.contains("ReadAfterWrite"), "replica {}: pmem with a device-dax ring: {line}", i + 1);
        let s = cluster.status(i).unwrap_or_else(|| panic!("replica {} answers no status", i + 1));
        assert_eq!(s.durability, "pmem", "replica {}", i + 1);
    }
    println!("pmem-rdma: replica {} leads; rings on {}", leader + 1, devs.join(" "));

    let mut acked: Vec<Acked> = Vec::new();
    let mut client = cluster.client_of(leader);
    for i in 0..BEFORE {
        let payload = format!("pmem-before-{i}").into_bytes();
        let called = Instant::now();
        let pos = client.append(payload.clone()).expect("append before the stop");
        acked.push(Acked { payload, pos, called, returned: Instant::now() });
    }

    // The ring wrapped on both followers: each took (and acknowledged) more cells than
    // the ring has. The agents log their counts when they changed, at most every second.
    std::thread::sleep(Duration::from_millis(1500));
    for &f in &cluster_followers(leader) {
        let taken = acks_sent(&support::strip_ansi(&cluster.log_of(f)));
        assert!(taken > CELLS, "replica {} took {taken} cells before the stop, the ring has {CELLS}", f + 1);
        println!("pmem-rdma: replica {} took {taken} cells of a {CELLS}-cell ring before the stop", f + 1);
    }

    // Both followers stopped: their CPUs cannot take cells nor acknowledge.
    let followers = cluster_followers(leader);
    let pids: Vec<libc::pid_t> =
        followers.iter().map(|&i| cluster.pids()[i].expect("a follower runs") as libc::pid_t).collect();
    for &pid in &pids {
        // SAFETY: signalling a child process of this test by its pid.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0, "SIGSTOP follower {pid}");
    }
    let t0 = Instant::now();
    while !pids.iter().all(|&p| support::proc_state(p).as_deref() == Some("T")) {
        assert!(t0.elapsed() < Duration::from_secs(10), "the followers did not stop");
        std::thread::sleep(Duration::from_millis(1));
    }
    let stopped_at = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let appender = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut done = Vec::new();
            let mut unknown = 0;
            for i in 0.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let payload = format!("pmem-stopped-{i}").into_bytes();
                let called = Instant::now();
                match client.append(payload.clone()) {
                    Ok(pos) => done.push(Acked { payload, pos, called, returned: Instant::now() }),
                    Err(_) => {
                        unknown += 1;
                        break;
                    }
                }
            }
            (done, unknown)
        })
    };
    std::thread::sleep(STOPPED);
    stop.store(true, Ordering::Relaxed);
    // Everyone dies: the followers still stopped (SIGKILL ends a stopped process), then
    // the leader. Whatever the followers took by then is in their stores; the rest of
    // what committed is only in their rings.
    let killed_at = Instant::now();
    for &f in &followers {
        cluster.kill(f);
    }
    cluster.kill(leader);
    let (during, unknown) = appender.join().expect("the appender thread");
    let committed_stopped = during.iter().filter(|a| a.called >= stopped_at && a.returned < killed_at).count();
    println!(
        "pmem-rdma: {} appends acknowledged while both followers were stopped for {} ms ({} with unknown outcome at \
         the kill)",
        committed_stopped,
        STOPPED.as_millis(),
        unknown
    );
    assert!(
        committed_stopped > 0,
        "no append committed while the followers' CPUs were stopped: read-after-write landing did not complete writes"
    );
    acked.extend(during);

    // Only the two followers come back, on their data directories and rings.
    let restarted_at = Instant::now();
    for &f in &followers {
        cluster.restart(f);
    }
    let new_leader = cluster.wait_leader(Duration::from_secs(60));
    assert!(followers.contains(&new_leader));
    let elected = restarted_at.elapsed();
    // The cluster takes appends again.
    let mut client = cluster.client();
    let payload = b"pmem-after-restart".to_vec();
    let called = Instant::now();
    let pos = client.append(payload.clone()).expect("append after the restart");
    acked.push(Acked { payload, pos, called, returned: Instant::now() });

    // Both restarted replicas serve the same log, through the append after the restart:
    // every acknowledged append once, at its position (positions are consecutive from 1:
    // `read_all` checks).
    let want = pos;
    let t0 = Instant::now();
    loop {
        let last = followers.iter().map(|&i| cluster.status(i).map(|s| s.last_position)).collect::<Vec<_>>();
        if last.iter().all(|p| p.is_some_and(|p| p >= want)) && last.windows(2).all(|w| w[0] == w[1]) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the restarted replicas did not both reach position {want} (the append after the restart): {last:?}; \
             logs in {}",
            dir.path().display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let logs: Vec<Vec<(u64, Vec<u8>)>> = followers.iter().map(|&i| cluster.read_all(i)).collect();
    assert!(logs[0] == logs[1], "replicas {} and {} serve different logs", followers[0] + 1, followers[1] + 1);
    let mut at: HashMap<&[u8], u64> = HashMap::new();
    for (p, d) in &logs[0] {
        assert!(at.insert(d.as_slice(), *p).is_none(), "entry {:?} appears twice", String::from_utf8_lossy(d));
    }
    let mut lost = Vec::new();
    for a in &acked {
        if at.get(a.payload.as_slice()) != Some(&a.pos) {
            let there = logs[0].iter().find(|(p, _)| *p == a.pos).map(|(_, d)| String::from_utf8_lossy(d));
            lost.push(format!("{:?} at {} (there: {there:?})", String::from_utf8_lossy(&a.payload), a.pos));
        }
    }
    let lost_stopped = lost.iter().filter(|l| l.starts_with("\"pmem-stopped-")).count();
    assert!(
        lost.is_empty(),
        "acknowledged append lost after restarting the followers: {} of {} ({} of the {} acknowledged while the \
         followers were stopped); the restarted replicas serve {} entries; first: {:?}",
        lost.len(),
        acked.len(),
        lost_stopped,
        committed_stopped,
        logs[0].len(),
        lost.first()
    );
    // In order: the acknowledged appends of one client (one after the other) have
    // increasing positions.
    assert!(acked.windows(2).all(|w| w[0].pos < w[1].pos), "acknowledged positions out of order");
    // What each restarted follower handed its core from its ring at start (the
    // agent's "landed cells handed to the core at start" line, one per life).
    let recovered: Vec<u64> =
        followers.iter().map(|&i| recovered_cells(&support::strip_ansi(&cluster.log_of(i)))).collect();
    assert!(
        recovered.iter().sum::<u64>() > 0,
        "no restarted follower handed landed cells of its ring to its core, yet nothing was lost: {recovered:?}"
    );
    println!(
        "pmem-rdma: committed {committed_stopped} while followers stopped, replayed {} and {} landed cells from the \
         rings of replicas {} and {} at restart: all {} acknowledged appends ({} before the stop, {} during, 1 after) \
         read back once, in order, from both ({} entries); new leader replica {} elected {:.1} s after the restart",
        recovered[0],
        recovered[1],
        followers[0] + 1,
        followers[1] + 1,
        acked.len(),
        BEFORE,
        acked.len() - BEFORE - 1,
        logs[0].len(),
        new_leader + 1,
        elected.as_secs_f64()
    );
}
