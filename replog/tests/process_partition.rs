//! A network partition between real `replog serve` processes: three replicas, each in
//! its own network namespace, joined by veth pairs into a bridge (hw-setup/netns.sh).
//! The test cuts the leader off the bridge: the majority side elects a new leader with a
//! higher ballot and keeps acknowledging appends, while the old leader acknowledges
//! nothing; after healing, the old leader follows the new one and catches up, and every
//! replica serves the same log holding each acknowledged entry once.
//!
//! Needs root and iproute2; without them it skips (and says why), unless
//! `REPLOG_REQUIRE_ALL` is set, when it fails.

mod netns;
mod support;

use netns::{in_netns, parse_ballot, poll, Net, NetCluster};
use replog::config::DurabilityKind;
use std::collections::HashMap;
use std::time::{Duration, Instant};

const REPLICAS: usize = 3;
const BATCH: usize = 200;
/// Bound on electing the first leader.
const FIRST_LEADER: Duration = Duration::from_secs(20);
/// Bound on electing a new leader after the cut.
const ELECTION: Duration = Duration::from_secs(10);
/// Bound on the old leader following the new one and catching up after the heal.
const CATCH_UP: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(10);

/// Appends `BATCH` entries named `<tag>-<k>` one by one; every one must be acknowledged.
fn append_batch(cluster: &NetCluster, tag: &str, acked: &mut Vec<(Vec<u8>, u64)>) {
    let mut client = cluster.client_of(cluster.client_addrs(), Duration::from_secs(2), 30);
    for k in 0..BATCH {
        let payload = format!("{tag}-{k}").into_bytes();
        match client.append(payload.clone()) {
            Ok(pos) => acked.push((payload, pos)),
            Err(e) => panic!("append {tag}-{k} was not acknowledged: {e}"),
        }
    }
}

/// One attempt to append through replica `i` alone (from its own namespace): the
/// outcome as text, and whether it was acknowledged.
fn append_direct(cluster: &NetCluster, i: usize, payload: &[u8]) -> (bool, String) {
    let addr = cluster.client_addr(i);
    let payload = payload.to_vec();
    in_netns(&cluster.ns(i), || {
        let mut cfg = replog::client::ClientConfig::new(cluster.cluster_id(), vec![addr]);
        cfg.timeout = Duration::from_secs(1);
        cfg.retries = 2;
        let t0 = Instant::now();
        let r = replog::client::Client::connect(cfg).and_then(|mut c| c.append(payload));
        let took = t0.elapsed();
        match r {
            Ok(pos) => (true, format!("acknowledged at position {pos} after {took:?}")),
            Err(e) => (false, format!("not acknowledged after {:.1} s: {e}", took.as_secs_f64())),
        }
    })
}

#[test]
fn partitioned_leader_is_replaced_and_catches_up_after_healing() {
    const NAME: &str = "partitioned_leader_is_replaced_and_catches_up_after_healing";
    if netns::skip_unless_possible(NAME) {
        return;
    }
    let Some(net) = Net::create(NAME, REPLICAS) else { return };
    let dir = tempfile::tempdir().unwrap();
    println!("run {}: namespaces {}-{{1..{REPLICAS}}} and {}", net.run, format_args!("rl{}", net.run), net.bridge_ns());
    let mut cluster = NetCluster::start(net, dir.path(), DurabilityKind::Fsync);
    let br = cluster.bridge_ns();

    // A leader that both others follow.
    let (old, old_ballot) = in_netns(&br, || {
        poll(FIRST_LEADER, POLL, 10_000, || {
            let st: Vec<_> = (0..REPLICAS).map(|i| cluster.status(i)).collect();
            let l = st.iter().position(|s| s.as_ref().is_some_and(|s| s.role == "leader"))?;
            let all_follow = st.iter().all(|s| s.as_ref().is_some_and(|s| s.leader == Some(l as u64 + 1)));
            all_follow.then(|| (l, parse_ballot(&st[l].as_ref().unwrap().ballot)))
        })
    })
    .unwrap_or_else(|| {
        cluster.assert_running();
        panic!("no leader followed by every replica within {FIRST_LEADER:?}; see the replica logs below")
    });
    println!("leader: replica {} with ballot {old_ballot:?}", old + 1);

    let mut acked: Vec<(Vec<u8>, u64)> = Vec::new();
    in_netns(&br, || append_batch(&cluster, "before", &mut acked));
    println!("{} appends acknowledged before the cut", acked.len());

    // Cut the leader off. While the majority elects, try to append through the old
    // leader directly (from inside its namespace: nothing else reaches it now).
    cluster.net.cut(old + 1);
    let cut_at = Instant::now();
    let others: Vec<usize> = (0..REPLICAS).filter(|&i| i != old).collect();
    let old_ns = cluster.ns(old);
    let (elected, direct, stepped_down) = std::thread::scope(|s| {
        let direct = s.spawn(|| append_direct(&cluster, old, b"through-the-cut-off-leader-1"));
        // The old leader, alone, stops leading (check-quorum).
        let stepped_down = s.spawn(|| {
            in_netns(&old_ns, || {
                poll(ELECTION, POLL, 100_000, || {
                    cluster.status(old).filter(|s| s.role != "leader").map(|s| (s.role, cut_at.elapsed()))
                })
            })
        });
        let elected = in_netns(&br, || {
            poll(ELECTION, POLL, 100_000, || {
                let st: Vec<_> = others.iter().map(|&i| cluster.status(i)).collect::<Option<Vec<_>>>()?;
                let new = st.iter().find(|s| s.role == "leader")?;
                let ballot = parse_ballot(&new.ballot);
                let agreed = st.iter().all(|s| s.leader == Some(new.node));
                (agreed && new.node != old as u64 + 1 && ballot > old_ballot)
                    .then(|| (new.node, ballot, cut_at.elapsed()))
            })
        });
        (elected, direct.join().expect("direct append thread"), stepped_down.join().expect("status thread"))
    });
    let (new_id, new_ballot, election) = elected.unwrap_or_else(|| {
        cluster.assert_running();
        panic!("no new leader on the majority side within {ELECTION:?} of the cut; see the replica logs below")
    });
    let new = new_id as usize - 1;
    println!(
        "new leader: replica {new_id} with ballot {new_ballot:?}, {:.1} ms after cutting replica {} off",
        election.as_secs_f64() * 1e3,
        old + 1
    );
    let (role, step_down) =
        stepped_down.unwrap_or_else(|| panic!("the cut-off old leader still says it leads {ELECTION:?} after the cut"));
    println!("old leader (replica {}) is {role} {:.1} ms after the cut", old + 1, step_down.as_secs_f64() * 1e3);
    println!("append through the cut-off old leader during the election: {}", direct.1);
    assert!(!direct.0, "the cut-off old leader acknowledged an append: {}", direct.1);

    let direct2 = append_direct(&cluster, old, b"through-the-cut-off-leader-2");
    println!("append through the cut-off old leader after the election: {}", direct2.1);
    assert!(!direct2.0, "the cut-off old leader acknowledged an append: {}", direct2.1);

    // Appends continue through the new leader.
    let before = acked.len();
    in_netns(&br, || append_batch(&cluster, "during", &mut acked));
    println!("{} appends acknowledged while replica {} was cut off", acked.len() - before, old + 1);
    cluster.assert_running();

    // Heal: the old leader follows the new one and catches up.
    cluster.net.heal(old + 1);
    let healed_at = Instant::now();
    let caught_up = in_netns(&br, || {
        poll(CATCH_UP, POLL, 100_000, || {
            let st: Vec<_> = (0..REPLICAS).map(|i| cluster.status(i)).collect::<Option<Vec<_>>>()?;
            let o = &st[old];
            let last = st[new].last_position;
            let done = o.role == "follower"
                && o.leader == Some(new_id)
                && st[new].role == "leader"
                && last >= acked.len() as u64
                && st.iter().all(|s| s.last_position == last);
            done.then(|| (healed_at.elapsed(), last))
        })
    });
    let (catch_up, total) = caught_up.unwrap_or_else(|| {
        let st: Vec<_> = in_netns(&br, || (0..REPLICAS).map(|i| cluster.status(i)).collect());
        panic!(
            "replica {} did not follow replica {new_id} and catch up within {CATCH_UP:?} of the heal: {st:#?}; \
             see the replica logs below",
            old + 1
        )
    });
    println!(
        "replica {} follows replica {new_id} with all {total} entries {:.1} ms after the heal",
        old + 1,
        catch_up.as_secs_f64() * 1e3
    );

    // Every replica serves the same log: each acknowledged entry once, at its position.
    let logs: Vec<Vec<(u64, Vec<u8>)>> = in_netns(&br, || (0..REPLICAS).map(|i| cluster.read_all(i)).collect());
    for (i, l) in logs.iter().enumerate() {
        assert_eq!(l.len() as u64, total, "replica {} serves {} entries, not {total}", i + 1, l.len());
        assert!(l == &logs[new], "replica {} serves a different log from the leader (replica {new_id})", i + 1);
    }
    let mut seen: HashMap<&[u8], u64> = HashMap::new();
    for (p, d) in &logs[new] {
        assert!(seen.insert(d.as_slice(), *p).is_none(), "entry {:?} appears twice", String::from_utf8_lossy(d));
    }
    for (payload, pos) in &acked {
        assert_eq!(
            seen.get(payload.as_slice()),
            Some(pos),
            "acknowledged entry {:?} at position {pos} is not there",
            String::from_utf8_lossy(payload)
        );
    }
    assert_eq!(total, acked.len() as u64, "the log holds exactly the acknowledged entries");
    for p in [&b"through-the-cut-off-leader-1"[..], b"through-the-cut-off-leader-2"] {
        assert!(
            !seen.contains_key(p),
            "the unacknowledged append {:?} made it into the log",
            String::from_utf8_lossy(p)
        );
    }
    cluster.assert_running();
    println!(
        "election after the cut: {:.1} ms; catch-up after the heal: {:.1} ms; {} entries on every replica",
        election.as_secs_f64() * 1e3,
        catch_up.as_secs_f64() * 1e3,
        total
    );
}
