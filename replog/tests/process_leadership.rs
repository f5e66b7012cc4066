//! Leadership transfer and linearizable reads through the client port, on three
//! `replog serve` processes: leadership is handed to each replica in turn; appends go on
//! at every new leader; a linearizable read from another client, issued after each
//! append is acknowledged, always sees it.

mod support;

use replog::config::DurabilityKind;
use std::time::{Duration, Instant};
use support::Cluster;

#[test]
fn leadership_moves_on_request_and_linearizable_reads_see_every_acknowledged_append() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), 3, DurabilityKind::Fsync);
    cluster.wait_leader(Duration::from_secs(20));
    let mut writer = cluster.client();
    let mut reader = cluster.client();
    let mut acked = 0u64;
    for round in 0..3 {
        for target in 1..=3u64 {
            let t0 = Instant::now();
            let st = writer.transfer_leadership(target).expect("transfer");
            // Wait until the named replica leads.
            let mut led = false;
            for _ in 0..500 {
                let i = (target - 1) as usize;
                if cluster.status(i).is_some_and(|s| s.role == "leader") {
                    led = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            assert!(led, "replica {target} did not take over (asked of replica {})", st.node);
            println!(
                "round {round}: leadership moved to replica {target} in {:.1} ms",
                t0.elapsed().as_secs_f64() * 1e3
            );
            for i in 0..20 {
                let p = writer.append(format!("r{round}-t{target}-{i}")).expect("append after the transfer");
                acked += 1;
                assert_eq!(p, acked, "positions are consecutive");
                let seen = reader.read_linearizable(p, 10).expect("linearizable read");
                assert!(
                    seen.first().is_some_and(|(pos, d)| *pos == p && d.as_ref() == format!("r{round}-t{target}-{i}").as_bytes()),
                    "a linearizable read after the append's acknowledgement did not see it: {seen:?}"
                );
            }
        }
    }
    let total = cluster.wait_converged(acked, Duration::from_secs(20));
    assert_eq!(total, acked);
    let logs: Vec<_> = (0..3).map(|i| cluster.read_all(i)).collect();
    assert!(logs.iter().all(|l| l == &logs[0]));
}
