//! Snapshots end to end, with three `replog serve` processes running the example
//! key-value state machine (fsync durability, snapshots every 300 entries, 20 slots
//! kept behind each):
//!
//! - a follower SIGKILLed and wiped clean (its data directory deleted) rejoins: the
//!   leader has trimmed the slots it needs, so it catches up by a chunked snapshot
//!   transfer, then replays the rest of the log, and answers with every key;
//! - a replica restarted on its own directory starts from its newest snapshot; when
//!   that file is corrupt, it is passed over (renamed aside) and an older one is used;
//! - a snapshot can be asked for (`Request::Snapshot`) and is on disk when answered;
//! - reads of trimmed log positions get a clear error; the key-value state agrees on
//!   every replica, and linearizable queries at the leader see every acknowledged set.

mod support;

use replog::client::Client;
use replog::config::{DurabilityKind, StateMachineKind};
use std::time::{Duration, Instant};
use support::Cluster;

fn set_keys(c: &mut Client, range: std::ops::Range<u32>) {
    let keys: Vec<u32> = range.collect();
    for chunk in keys.chunks(25) {
        let batch = chunk.iter().map(|i| bytes::Bytes::from(format!("set k{i} v{i}"))).collect();
        c.append_batch(batch).expect("append");
    }
}

/// Replica `i`'s answer to `q`, waiting until it equals `want`.
fn wait_answer(cluster: &Cluster, i: usize, q: &str, want: &str, timeout: Duration) {
    let addr = cluster.cfgs[i].me().client_addr;
    let t0 = Instant::now();
    let mut last = String::new();
    while t0.elapsed() < timeout {
        if let Ok((_, a)) = Client::query_of(addr, cluster.cluster_id(), Duration::from_millis(500), q.as_bytes()) {
            last = String::from_utf8_lossy(&a).into_owned();
            if last == want {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("replica {i}: {q:?} answered {last:?}, not {want:?}; logs in {}", cluster.dir.display());
}

#[test]
fn wiped_replica_rejoins_by_snapshot_and_restarts_skip_corrupt_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start_with(dir.path(), 3, DurabilityKind::Fsync, |c| {
        c.app.state_machine = StateMachineKind::Kv;
        c.app.snapshot_every_entries = 300;
        c.app.snapshot_keep_slots = 20;
        // Small chunks: the transfer takes many of them.
        c.app.snapshot_chunk_bytes = 4096;
    });
    let leader = cluster.wait_leader(Duration::from_secs(20));
    let mut client = cluster.client();
    // On request: a snapshot of a follower's state, well before the policy's 300.
    set_keys(&mut client, 0..100);
    let f = (leader + 1) % 3;
    wait_answer(&cluster, f, "len", "100", Duration::from_secs(10));
    let cfg = replog::client::ClientConfig::new(cluster.cluster_id(), vec![cluster.cfgs[f].me().client_addr]);
    let st = Client::snapshot_at(cluster.cfgs[f].me().client_addr, &cfg).expect("snapshot on request");
    assert!(st.applied_slot > 0);
    let snaps = std::fs::read_dir(cluster.cfgs[f].data_dir.join("snapshots")).expect("snapshot directory");
    assert_eq!(snaps.flatten().filter(|e| e.path().extension().is_some_and(|x| x == "rsnap")).count(), 1);
    set_keys(&mut client, 100..1000);
    assert!(
        cluster.wait_log_line(leader, &["snapshot taken"], Duration::from_secs(10)).is_some(),
        "the leader took no snapshot"
    );

    // Wipe a follower clean while the cluster moves on.
    let victim = (leader + 1) % 3;
    cluster.kill(victim);
    std::fs::remove_dir_all(&cluster.cfgs[victim].data_dir).expect("wipe the follower");
    set_keys(&mut client, 1000..2000);
    cluster.restart(victim);
    assert!(
        cluster.wait_log_line(victim, &["snapshot installed"], Duration::from_secs(30)).is_some(),
        "the wiped replica installed no snapshot; logs in {}",
        dir.path().display()
    );
    let leader_now = cluster.wait_leader(Duration::from_secs(20));
    assert!(cluster.wait_log_line(leader_now, &["sending a snapshot"], Duration::from_secs(5)).is_some());
    set_keys(&mut client, 2000..2100);
    for i in 0..3 {
        wait_answer(&cluster, i, "len", "2100", Duration::from_secs(30));
        wait_answer(&cluster, i, "get k1234", "v1234", Duration::from_secs(5));
    }
    // Linearizable at the leader: includes the last acknowledged set.
    let (_, v) = client.query(b"get k2099", true).expect("linearizable query");
    assert_eq!(&v[..], b"v2099");
    // The log behind the snapshots is trimmed: reading position 1 is refused clearly.
    let err = cluster.client_of(victim).read(1, 10).expect_err("trimmed positions are not served");
    assert!(err.to_string().contains("trimmed"), "{err}");

    // Restart a replica on its own directory with its newest snapshot corrupted: it is
    // passed over, an older snapshot (or the leader's) is used, and nothing is lost.
    let other = (leader_now + 2) % 3;
    set_keys(&mut client, 2100..2700); // at least two snapshots on every replica
    wait_answer(&cluster, other, "len", "2700", Duration::from_secs(30));
    cluster.kill(other);
    let snaps = cluster.cfgs[other].data_dir.join("snapshots");
    let mut files: Vec<_> = std::fs::read_dir(&snaps)
        .expect("snapshot directory")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "rsnap"))
        .collect();
    files.sort();
    let newest = files.last().expect("a snapshot file").clone();
    let mut bytes = std::fs::read(&newest).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(&newest, bytes).unwrap();
    cluster.restart(other);
    assert!(
        cluster.wait_log_line(other, &["snapshot passed over"], Duration::from_secs(20)).is_some(),
        "the corrupt snapshot was not reported; logs in {}",
        dir.path().display()
    );
    assert!(newest.with_extension("corrupt").exists(), "the corrupt snapshot was not set aside");
    set_keys(&mut client, 2700..2800);
    for i in 0..3 {
        wait_answer(&cluster, i, "len", "2800", Duration::from_secs(30));
        wait_answer(&cluster, i, "get k2750", "v2750", Duration::from_secs(5));
        wait_answer(&cluster, i, "get k5", "v5", Duration::from_secs(5));
    }
}
