//! Membership changes under load, with real `replog serve` processes (fsync): five
//! configured members of which 4 and 5 start as learners. Three clients append
//! continuously while the voters grow from 3 to 5 (`replog members`'s request), the
//! leader is SIGKILLed and restarted, and the voters shrink to 3 again, removing the
//! leader of the moment (it hands over). Afterwards every replica holds the same log,
//! every acknowledged append is in it exactly once at its position, and the positions
//! respect real time (an append called after another returned got a later position:
//! the history of appends is linearizable), and linearizable reads issued throughout
//! always see the newest acknowledged append.

mod support;

use replog::client::ErrorCode;
use replog::config::DurabilityKind;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{Acked, Appenders, Cluster};

/// Asks for a membership change until the leader takes it (it refuses while another
/// change is in flight, or while a promoted learner still lags).
fn change(cluster: &Cluster, voters: &[u64], learners: &[u64]) {
    let t0 = Instant::now();
    let mut c = cluster.client();
    loop {
        match c.change_membership(voters.to_vec(), learners.to_vec()) {
            Ok(s) => {
                println!("replica {} proposed voters {voters:?} learners {learners:?}", s.node);
                return;
            }
            Err(e) => {
                let retry = matches!(
                    &e,
                    replog::client::ClientError::Server { code: ErrorCode::Busy | ErrorCode::BadRequest, .. }
                ) || e.is_retryable();
                assert!(retry && t0.elapsed() < Duration::from_secs(30), "membership change failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

#[test]
fn three_to_five_to_three_voters_under_load_with_a_leader_kill() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start_with(dir.path(), 5, DurabilityKind::Fsync, |c| {
        c.members[3].learner = true;
        c.members[4].learner = true;
    });
    let first = cluster.wait_leader(Duration::from_secs(20));
    assert!(first < 3, "a learner leads");

    let load = Appenders::start(&cluster, 3, 20_000);

    // A reader: a linearizable read of the newest acknowledged append's position, called
    // after that append returned, must see exactly that entry.
    let reads_checked = Arc::new(AtomicU64::new(0));
    let reader = {
        let mut client = cluster.client();
        let (stop, results, reads_checked) = (load.stop.clone(), load.results.clone(), reads_checked.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let last = results.lock().unwrap().acked.last().map(|a| (a.payload.clone(), a.pos));
                let Some((payload, pos)) = last else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                match client.read_linearizable(pos, 1) {
                    Ok(got) => {
                        assert_eq!(got.first().map(|(p, d)| (*p, d.to_vec())), Some((pos, payload)), "stale read");
                        reads_checked.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => eprintln!("reader: {e}"),
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };

    load.wait_more(500);
    change(&cluster, &[1, 2, 3, 4, 5], &[]);
    let leader = cluster.wait_leader(Duration::from_secs(20));
    assert!(
        cluster
            .wait_log_line(leader, &["membership changed", "voters=[1, 2, 3, 4, 5]"], Duration::from_secs(20))
            .is_some(),
        "the growth to 5 voters was not applied; logs in {}",
        dir.path().display()
    );
    load.wait_more(500);

    // Kill the leader of five in the middle; four voters go on.
    let leader = cluster.wait_leader(Duration::from_secs(20));
    cluster.kill(leader);
    load.wait_more(300);
    cluster.restart(leader);
    load.wait_more(300);

    // Shrink to three voters, removing the current leader and one other.
    let leader = cluster.wait_leader(Duration::from_secs(20)) as u64 + 1;
    let other = if leader == 1 { 2 } else { 1 };
    let keep: Vec<u64> = (1..=5).filter(|&x| x != leader && x != other).collect();
    change(&cluster, &keep, &[leader, other]);
    let t0 = Instant::now();
    let new_leader = loop {
        let l = cluster.wait_leader(Duration::from_secs(20)) as u64 + 1;
        if keep.contains(&l) {
            break l;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "leadership stayed with a removed replica");
        std::thread::sleep(Duration::from_millis(50));
    };
    println!("after shrinking to {keep:?}: replica {new_leader} leads");
    load.wait_more(300);
    let acks = load.finish().acked;
    reader.join().expect("reader thread");
    let reads = reads_checked.load(Ordering::SeqCst);
    println!("{reads} linearizable reads saw the newest acknowledged append");
    assert!(reads > 50, "too few reads checked: {reads}");

    // Every replica (voter or learner) converges on one log holding every
    // acknowledged append once, at its position.
    let total = cluster.wait_converged(acks.len() as u64, Duration::from_secs(60));
    let logs: Vec<Vec<(u64, Vec<u8>)>> = (0..5).map(|i| cluster.read_all(i)).collect();
    for (i, l) in logs.iter().enumerate() {
        assert_eq!(l.len() as u64, total, "replica {} serves {} entries", i + 1, l.len());
        assert!(l == &logs[0], "replica {} holds a different log from replica 1", i + 1);
    }
    let mut seen: HashMap<&[u8], u64> = HashMap::new();
    for (p, d) in &logs[0] {
        assert!(seen.insert(d.as_slice(), *p).is_none(), "entry {:?} appears twice", String::from_utf8_lossy(d));
    }
    for Acked { payload, pos, .. } in &acks {
        assert_eq!(seen.get(payload.as_slice()), Some(pos), "acknowledged {:?} lost", String::from_utf8_lossy(payload));
    }
    // Real-time order: sweeping calls in time order, every append returned before a
    // call has a lower position than the called one.
    let mut by_return: Vec<&Acked> = acks.iter().collect();
    by_return.sort_by_key(|a| a.returned);
    let mut by_call: Vec<&Acked> = acks.iter().collect();
    by_call.sort_by_key(|a| a.called);
    let (mut j, mut max_done) = (0, 0u64);
    for a in by_call {
        while j < by_return.len() && by_return[j].returned < a.called {
            max_done = max_done.max(by_return[j].pos);
            j += 1;
        }
        assert!(a.pos > max_done, "append at {} was called after one at {max_done} returned", a.pos);
    }
    // The final membership is in force everywhere that applied it.
    let want = format!("voters={keep:?}");
    for i in 0..5 {
        assert!(
            cluster.wait_log_line(i, &["membership changed", &want], Duration::from_secs(10)).is_some(),
            "replica {} did not apply the final membership",
            i + 1
        );
    }
}
