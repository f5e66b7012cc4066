//! Trimming the plain log service end to end, with three `replog serve` processes
//! (fsync durability, `state_machine = "log"`):
//!
//! - two clients append while a follower is down; `trim` cuts the log on every replica
//!   at one point (rounded down to a slot boundary, reported to the client); reads below
//!   it get a clear "trimmed" error everywhere, reads above it are unchanged;
//! - the follower that was down needs slots the others dropped: it catches up by the
//!   trim's snapshot, then from the log; a follower wiped clean rejoins the same way;
//! - a trim beyond the last committed position is refused; a trim below the cut is a
//!   no-op that reports the cut; the cut survives a restart of the whole cluster;
//! - every acknowledged append at or above the cut is present exactly once at its
//!   position, with identical logs on all replicas.

mod support;

use replog::client::{Client, ClientError, ErrorCode};
use replog::config::DurabilityKind;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use support::Cluster;

/// Appends `n` entries named `{tag}-{i}` in batches of 10; returns entry -> position.
fn append_n(c: &mut Client, tag: &str, n: usize) -> BTreeMap<Vec<u8>, u64> {
    let mut acked = BTreeMap::new();
    for start in (0..n).step_by(10) {
        let batch: Vec<bytes::Bytes> =
            (start..(start + 10).min(n)).map(|i| bytes::Bytes::from(format!("{tag}-{i}"))).collect();
        let positions = c.append_batch(batch.clone()).expect("append");
        for (e, p) in batch.into_iter().zip(positions) {
            acked.insert(e.to_vec(), p);
        }
    }
    acked
}

/// Appends from two clients at once.
fn append_concurrently(cluster: &Cluster, tag: &str, per_client: usize) -> BTreeMap<Vec<u8>, u64> {
    let mut all = BTreeMap::new();
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|k| {
                let mut c = cluster.client();
                let tag = format!("{tag}{k}");
                s.spawn(move || append_n(&mut c, &tag, per_client))
            })
            .collect();
        for h in hs {
            all.extend(h.join().expect("appender"));
        }
    });
    all
}

/// The log replica `i` serves from position `from` on.
fn read_from(cluster: &Cluster, i: usize, from: u64) -> Vec<(u64, Vec<u8>)> {
    support::read_log_from(&mut cluster.client_of(i), from)
}

/// Replica `i` refuses to read `position` as trimmed.
fn assert_trimmed(cluster: &Cluster, i: usize, position: u64) {
    match cluster.client_of(i).read(position, 10) {
        Err(ClientError::Server { code: ErrorCode::BadRequest, message, .. }) => {
            assert!(message.contains("trimmed"), "replica {i}: unexpected refusal {message:?}")
        }
        other => panic!("replica {i}: read of trimmed position {position} gave {other:?}"),
    }
}

/// Waits until replica `i` refuses `position` as trimmed.
fn wait_trimmed(cluster: &Cluster, i: usize, position: u64, timeout: Duration) {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if let Err(ClientError::Server { message, .. }) = cluster.client_of(i).read(position, 1) {
            if message.contains("trimmed") {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("replica {i} still serves position {position}; logs in {}", cluster.dir.display());
}

/// Every acknowledged append at or above `first` is at its position in `log`, once.
fn check_acked(log: &[(u64, Vec<u8>)], acked: &BTreeMap<Vec<u8>, u64>, first: u64) {
    let by_pos: BTreeMap<u64, &Vec<u8>> = log.iter().map(|(p, d)| (*p, d)).collect();
    let mut checked = 0;
    for (e, &p) in acked {
        if p >= first {
            assert_eq!(by_pos.get(&p).map(|d| d.as_slice()), Some(e.as_slice()), "acknowledged entry at {p}");
            checked += 1;
        }
    }
    let distinct: std::collections::BTreeSet<&Vec<u8>> = log.iter().map(|(_, d)| d).collect();
    assert_eq!(distinct.len(), log.len(), "an entry appears twice");
    assert!(checked > 0);
}

#[test]
fn trim_cuts_every_replica_and_lagging_or_wiped_replicas_catch_up_by_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(dir.path(), 3, DurabilityKind::Fsync);
    let leader = cluster.wait_leader(Duration::from_secs(20));
    let (f, g) = ((leader + 1) % 3, (leader + 2) % 3);
    let mut acked = append_concurrently(&cluster, "a", 1000);
    cluster.wait_converged(2000, Duration::from_secs(30));

    // Follower f misses the next 1,000 entries and the trim.
    cluster.kill(f);
    acked.extend(append_concurrently(&cluster, "b", 500));
    let mut client = cluster.client();
    let refused = client.trim(1_000_000);
    assert!(
        matches!(&refused, Err(ClientError::Server { code: ErrorCode::BadRequest, message, .. })
            if message.contains("last committed")),
        "a trim beyond the log: {refused:?}"
    );
    let t0 = Instant::now();
    let first = client.trim(2500).expect("trim");
    println!("trim to 2500 answered in {:?}: first readable position {first}", t0.elapsed());
    assert!(first > 2400 && first <= 2501, "the cut {first} is not at a slot boundary near 2500");
    for i in [leader, g] {
        wait_trimmed(&cluster, i, first - 1, Duration::from_secs(10));
        assert_trimmed(&cluster, i, 1);
    }
    assert_eq!(client.trim(100).expect("trim below the cut"), first, "a trim below the cut reports the cut");

    // f restarts behind the cut: the others no longer hold the slots it needs.
    cluster.restart(f);
    acked.extend(append_concurrently(&cluster, "c", 250));
    let last = cluster.wait_converged(3500, Duration::from_secs(30));
    assert!(
        cluster.wait_log_line(f, &["snapshot installed"], Duration::from_secs(5)).is_some(),
        "replica {f} did not catch up by snapshot; logs in {}",
        cluster.dir.display()
    );
    assert_trimmed(&cluster, f, first - 1);
    let reference = read_from(&cluster, leader, first);
    assert_eq!(reference.len() as u64, last - first + 1);
    for i in [f, g] {
        assert_eq!(read_from(&cluster, i, first), reference, "replica {i}'s log after the cut");
    }
    check_acked(&reference, &acked, first);

    // g wiped clean rejoins through the same snapshot.
    cluster.kill(g);
    std::fs::remove_dir_all(&cluster.cfgs[g].data_dir).expect("wipe");
    cluster.restart(g);
    cluster.wait_converged(last, Duration::from_secs(30));
    assert_trimmed(&cluster, g, first - 1);
    assert_eq!(read_from(&cluster, g, first), reference, "the wiped replica's log");

    // The cut survives a restart of the whole cluster.
    for i in 0..3 {
        cluster.kill(i);
    }
    for i in 0..3 {
        cluster.restart(i);
    }
    cluster.wait_leader(Duration::from_secs(20));
    acked.extend(append_n(&mut cluster.client(), "d", 100));
    let last = cluster.wait_converged(last + 100, Duration::from_secs(30));
    let reference = read_from(&cluster, 0, first);
    assert_eq!(reference.len() as u64, last - first + 1);
    for i in 0..3 {
        assert_trimmed(&cluster, i, first - 1);
        assert_eq!(read_from(&cluster, i, first), reference, "replica {i}'s log after the restart");
    }
    check_acked(&reference, &acked, first);
}
