//! Three `replog serve` processes on loopback (fsync durability): 10,000 appends from
//! four concurrent clients while the leader is SIGKILLed twice and restarted. Every
//! acknowledged append must be present exactly once, at its position, in one order on
//! every replica after healing; appends must continue after each failover.

mod support;

use replog::config::DurabilityKind;
use std::collections::HashSet;
use std::time::{Duration, Instant};
use support::{Appenders, Cluster};

const CLIENTS: usize = 4;
const PER_CLIENT: u64 = 2500;

#[test]
fn ten_thousand_appends_survive_two_leader_kills() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(dir.path(), 3, DurabilityKind::Fsync);
    cluster.wait_leader(Duration::from_secs(20));
    let load = Appenders::start(&cluster, CLIENTS, PER_CLIENT);

    // Kill the leader after 2,000 and after 6,000 acknowledgements; restart it 1 s later.
    let mut failovers = Vec::new();
    for threshold in [2000, 6000] {
        load.wait_total(threshold, Duration::from_secs(120));
        let leader = cluster.wait_leader(Duration::from_secs(20));
        let killed_at = Instant::now();
        cluster.kill(leader);
        let failover = load.failover_after(killed_at, Duration::from_secs(30));
        println!("failover after killing replica {} (leader): {:.1} ms", leader + 1, failover.as_secs_f64() * 1e3);
        failovers.push(failover);
        std::thread::sleep(Duration::from_secs(1));
        cluster.restart(leader);
    }
    let out = load.join();
    assert!(out.acked.len() as u64 >= CLIENTS as u64 * PER_CLIENT - out.unknown.len() as u64);

    // Heal: every replica converges on the same log, which holds every acknowledged
    // append once, at its position, and nothing that was not appended.
    let log = cluster.check_acked_once(&out.acked, out.acked.len() as u64, Duration::from_secs(60));
    let unknown: HashSet<&[u8]> = out.unknown.iter().map(|u| u.as_slice()).collect();
    let unknown_present = log.iter().filter(|(_, d)| unknown.contains(d.as_slice())).count();
    assert_eq!(log.len(), out.acked.len() + unknown_present, "the log holds only appended entries");
    for (i, f) in failovers.iter().enumerate() {
        println!("failover {}: {:.1} ms", i + 1, f.as_secs_f64() * 1e3);
    }
}
