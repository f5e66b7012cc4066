//! The embedding API in-process: three replicas, each with a state machine that
//! records what replog tells it. Checks that `apply` sees every entry once in position
//! order with the proposer's token only on the proposing replica, that the handle
//! returns the state machine's answer, that queries are linearizable at the leader,
//! that a follower refuses proposals naming the leader, that leadership callbacks and
//! the initial configuration arrive, that a state machine's veto keeps a replica from
//! leading, and that a leadership transfer through the handle takes effect.

mod support;

use bytes::Bytes;
use replog::app::{KvMachine, StateMachine};
use replog::config::{DurabilityKind, ServeConfig};
use replog::embed::{self, HandleError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Seen {
    applied: Vec<(u64, Option<u64>)>,
    leading: Vec<bool>,
    voters: Vec<u64>,
}

struct Recording {
    kv: KvMachine,
    seen: Arc<Mutex<Seen>>,
    may_lead: bool,
}

impl StateMachine for Recording {
    fn apply(&mut self, position: u64, payload: &[u8], token: Option<u64>) -> Bytes {
        self.seen.lock().unwrap().applied.push((position, token));
        self.kv.apply(position, payload, token)
    }
    fn save_snapshot(&mut self, out: &mut Vec<u8>) -> std::io::Result<()> {
        self.kv.save_snapshot(out)
    }
    fn load_snapshot(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.kv.load_snapshot(data)
    }
    fn query(&mut self, q: &[u8]) -> Bytes {
        self.kv.query(q)
    }
    fn leadership_changed(&mut self, leading: bool, _leader: Option<u64>) {
        self.seen.lock().unwrap().leading.push(leading);
    }
    fn configuration_changed(&mut self, voters: &[u64], _learners: &[u64]) {
        self.seen.lock().unwrap().voters = voters.to_vec();
    }
    fn may_lead(&mut self) -> bool {
        self.may_lead
    }
}

#[test]
fn embedded_replicas_apply_with_tokens_answer_queries_and_honour_vetoes() {
    let dir = tempfile::tempdir().unwrap();
    let base = support::free_ports(12);
    let cfgs = ServeConfig::local_cluster(3, base, dir.path(), DurabilityKind::Memory);
    let seen: Vec<Arc<Mutex<Seen>>> = (0..3).map(|_| Arc::default()).collect();
    // Replica 3 vetoes leadership.
    let replicas: Vec<_> = cfgs
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let sm = Recording { kv: KvMachine::default(), seen: seen[i].clone(), may_lead: i != 2 };
            embed::start(c, Box::new(sm)).expect("start an embedded replica")
        })
        .collect();
    let h: Vec<_> = replicas.iter().map(|r| r.handle()).collect();
    let t0 = Instant::now();
    let leader = loop {
        if let Some(l) = h.iter().filter_map(|x| x.status().ok()).find_map(|s| s.leader) {
            break l as usize - 1;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "no leader");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_ne!(leader, 2, "the vetoing replica leads");
    for i in 0..200u64 {
        let (pos, answer) = h[leader].replicate(format!("set k{i} v{i}").into_bytes(), 1000 + i).unwrap();
        assert_eq!(pos, i + 1);
        assert_eq!(&answer[..], b"ok");
    }
    let (_, answer) = h[leader].replicate(b"set k7 again".to_vec(), 5000).unwrap();
    assert_eq!(&answer[..], b"v7", "the state machine's answer reaches the proposer");
    assert_eq!(&h[leader].query(b"get k7", true).unwrap()[..], b"again");
    let follower = (leader + 1) % 3;
    match h[follower].replicate(b"set x y".to_vec(), 1) {
        Err(HandleError::NotLeader { leader: l }) => assert_eq!(l, Some(leader as u64 + 1)),
        other => panic!("a follower accepted a proposal: {other:?}"),
    }
    match h[follower].query(b"get k1", true) {
        Err(HandleError::NotLeader { .. }) => {}
        other => panic!("a follower answered a linearizable query: {other:?}"),
    }
    // Every replica applies all 201 entries in order; tokens only where proposed.
    let t0 = Instant::now();
    while seen.iter().any(|s| s.lock().unwrap().applied.len() < 201) {
        assert!(t0.elapsed() < Duration::from_secs(10), "replicas did not apply everything");
        std::thread::sleep(Duration::from_millis(10));
    }
    for (i, s) in seen.iter().enumerate() {
        let s = s.lock().unwrap();
        let positions: Vec<u64> = s.applied.iter().map(|a| a.0).collect();
        assert_eq!(positions, (1..=201).collect::<Vec<_>>(), "replica {i}");
        let tokens: Vec<Option<u64>> = s.applied.iter().map(|a| a.1).collect();
        if i == leader {
            let want: Vec<Option<u64>> = (0..200).map(|k| Some(1000 + k)).chain([Some(5000)]).collect();
            assert_eq!(tokens, want);
        } else {
            assert!(tokens.iter().all(|t| t.is_none()), "replica {i} saw a token it did not issue");
        }
        assert_eq!(s.voters, vec![1, 2, 3]);
    }
    assert!(seen[leader].lock().unwrap().leading.contains(&true), "the leader was not told it leads");
    // A transfer hands leadership to the other replica that may lead.
    let other = if leader == 0 { 1 } else { 0 };
    h[leader].transfer_leadership(other as u64 + 1).unwrap();
    let t0 = Instant::now();
    let new_leader = loop {
        let l = h.iter().filter_map(|x| x.status().ok()).find_map(|s| s.leader.filter(|&l| l != leader as u64 + 1));
        if let Some(l) = l {
            break l as usize - 1;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "nobody took over");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(new_leader, other, "leadership went elsewhere");
    assert!(seen[leader].lock().unwrap().leading.contains(&false), "the old leader was not told it stopped");
    for r in replicas {
        r.stop().unwrap();
    }
}
