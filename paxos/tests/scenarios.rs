//! Scenario tests of the core: elections with partitions, stickiness, check-quorum,
//! learners, catch-up, de-duplication, permission and storage failure. A tiny
//! zero-latency network (test support, not a transport) delivers every action in order
//! and jumps time to the next timer.

use paxos::{
    Action, Applied, Ballot, Command, Config, Entry, MemStorage, Message, Nanos, NodeId, ProposeError, Replica, Role,
    Storage, StorageError, Value, WriteRequest, WriteResult,
};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

const MS: Nanos = 1_000_000;

#[test]
#[allow(clippy::assertions_on_constants)]
fn contracts_are_checked_in_tests() {
    assert!(paxos::contracts::ENABLED, "tests must run with the `contracts` feature");
}

enum Payload {
    Msg(Message),
    Write(WriteRequest),
    WriteDone(WriteResult),
    Read(paxos::ReadRequest),
    ReadDone(paxos::ReadResult),
}

struct Net {
    now: Nanos,
    nodes: BTreeMap<NodeId, Replica<MemStorage>>,
    down: BTreeSet<NodeId>,
    cut: BTreeSet<(NodeId, NodeId)>,
    queue: VecDeque<(NodeId, NodeId, Payload)>,
    applied: BTreeMap<NodeId, Vec<Applied>>,
    roles: Vec<(NodeId, Role)>,
}

impl Net {
    fn new(voters: &[NodeId], learners: &[NodeId]) -> Net {
        let mut nodes = BTreeMap::new();
        for &id in voters.iter().chain(learners) {
            let mut c = Config::new(id, voters.to_vec());
            c.learners = learners.to_vec();
            nodes.insert(id, Replica::new(c, MemStorage::new(), 0).expect("config"));
        }
        Net {
            now: 0,
            nodes,
            down: BTreeSet::new(),
            cut: BTreeSet::new(),
            queue: VecDeque::new(),
            applied: BTreeMap::new(),
            roles: Vec::new(),
        }
    }

    fn isolate(&mut self, x: NodeId) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for y in ids {
            if y != x {
                self.cut.insert((x, y));
                self.cut.insert((y, x));
            }
        }
    }

    fn heal(&mut self) {
        self.cut.clear();
    }

    fn drain(&mut self, id: NodeId) {
        let r = self.nodes.get_mut(&id).expect("node");
        r.flush().expect("flush");
        while let Some(a) = r.poll_action() {
            let (to, p) = match a {
                Action::Send { to, msg } => (to, Payload::Msg(msg)),
                Action::RemoteWrite { to, req } => (to, Payload::Write(req)),
                Action::RemoteRead { to, req } => (to, Payload::Read(req)),
                Action::WriteCompletion { to, result } => (to, Payload::WriteDone(result)),
                Action::ReadCompletion { to, result } => (to, Payload::ReadDone(result)),
                Action::Apply(a) => {
                    self.applied.entry(id).or_default().push(a);
                    continue;
                }
                Action::RoleChanged { role, .. } => {
                    self.roles.push((id, role));
                    continue;
                }
                Action::GrantWrite { .. }
                | Action::RevokeWrite { .. }
                | Action::Fence { .. }
                | Action::Aborted(_)
                | Action::ReadReady { .. }
                | Action::ReadsAborted(_)
                | Action::SendSnapshot { .. } => continue,
            };
            if !self.cut.contains(&(id, to)) {
                self.queue.push_back((id, to, p));
            }
        }
    }

    /// Delivers messages and fires timers until `until`.
    fn run_until(&mut self, until: Nanos) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for &id in &ids {
            self.drain(id);
        }
        for _ in 0..1_000_000 {
            while let Some((from, to, p)) = self.queue.pop_front() {
                if self.down.contains(&to) {
                    continue;
                }
                let now = self.now;
                let r = self.nodes.get_mut(&to).expect("node");
                match p {
                    Payload::Msg(m) => r.handle_message(now, from, m),
                    Payload::Write(w) => r.handle_remote_write(now, from, w),
                    Payload::WriteDone(d) => r.handle_write_completion(now, from, d),
                    Payload::Read(q) => r.handle_remote_read(now, from, q),
                    Payload::ReadDone(d) => r.handle_read_completion(now, from, d),
                }
                .expect("handler");
                self.drain(to);
            }
            let next = self
                .nodes
                .iter()
                .filter(|(id, _)| !self.down.contains(id))
                .filter_map(|(id, r)| r.poll_timeout().map(|t| (t, *id)))
                .min();
            match next {
                Some((t, id)) if t <= until => {
                    self.now = self.now.max(t);
                    let now = self.now;
                    self.nodes.get_mut(&id).expect("node").handle_timeout(now).expect("timeout");
                    self.drain(id);
                }
                _ => {
                    self.now = self.now.max(until);
                    return;
                }
            }
        }
        panic!("run_until did not settle");
    }

    fn leaders(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(id, r)| !self.down.contains(id) && r.role() == Role::Leader)
            .map(|(id, _)| *id)
            .collect()
    }

    fn leader(&self) -> NodeId {
        let l = self.leaders();
        assert_eq!(l.len(), 1, "expected one leader, got {l:?}");
        l[0]
    }

    fn propose(&mut self, client: u64, seq: u64, data: &'static [u8]) -> Result<(), ProposeError> {
        let l = self.leader();
        let now = self.now;
        let cmd = Command { client, seq, payload: bytes::Bytes::from_static(data) };
        let r = self.nodes.get_mut(&l).expect("leader").propose(now, vec![cmd]);
        self.drain(l);
        r
    }

    /// The client entries `id` applied, as (position, client, seq, duplicate).
    fn log(&self, id: NodeId) -> Vec<(u64, u64, u64, bool)> {
        self.applied
            .get(&id)
            .map(|v| {
                v.iter()
                    .flat_map(|a| a.entries.iter())
                    .map(|e| (e.position, e.command.client, e.command.seq, e.duplicate))
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[test]
fn a_single_voter_elects_itself_and_commits() {
    let mut net = Net::new(&[1], &[]);
    net.run_until(100 * MS);
    assert_eq!(net.leader(), 1);
    net.propose(9, 1, b"x").unwrap();
    net.run_until(101 * MS);
    assert_eq!(net.log(1), vec![(1, 9, 1, false)]);
}

#[test]
fn three_replicas_elect_one_leader_and_apply_the_same_log() {
    let mut net = Net::new(&[1, 2, 3], &[]);
    net.run_until(100 * MS);
    let l = net.leader();
    for seq in 1..=100 {
        net.propose(7, seq, b"entry").unwrap();
    }
    net.run_until(150 * MS);
    let expect: Vec<_> = (1..=100).map(|s| (s, 7, s, false)).collect();
    for id in [1, 2, 3] {
        assert_eq!(net.log(id), expect, "replica {id}");
    }
    assert_eq!(net.leader(), l, "leadership is stable without faults");
    assert!(net.nodes[&l].chosen() >= 1);
}

#[test]
fn a_retried_entry_is_applied_once_with_its_first_position() {
    let mut net = Net::new(&[1, 2, 3], &[]);
    net.run_until(100 * MS);
    net.propose(5, 1, b"a").unwrap();
    net.propose(5, 2, b"b").unwrap();
    net.propose(5, 1, b"a").unwrap(); // a retry
    net.run_until(120 * MS);
    assert_eq!(net.log(2), vec![(1, 5, 1, false), (2, 5, 2, false), (1, 5, 1, true)]);
}

#[test]
fn a_partitioned_follower_cannot_depose_a_healthy_leader() {
    let mut net = Net::new(&[1, 2, 3], &[]);
    net.run_until(100 * MS);
    let l = net.leader();
    let x = [1, 2, 3].into_iter().find(|&n| n != l).unwrap();
    let ballot = net.nodes[&l].promised();
    net.isolate(x);
    net.run_until(600 * MS); // many election timeouts
    assert_eq!(net.nodes[&x].promised(), ballot, "pre-vote: the isolated replica never raised its ballot");
    assert!(matches!(net.nodes[&x].role(), Role::PreCandidate | Role::Follower));
    net.heal();
    net.run_until(700 * MS);
    assert_eq!(net.leader(), l, "the leader stays after the partition heals");
    assert_eq!(net.nodes[&l].promised(), ballot, "no new ballot");
    net.propose(1, 1, b"after").unwrap();
    net.run_until(710 * MS);
    assert_eq!(net.log(x).len(), 1, "the rejoined replica follows again");
}

#[test]
fn an_isolated_leader_steps_down_and_the_majority_elects_another() {
    let mut net = Net::new(&[1, 2, 3], &[]);
    net.run_until(100 * MS);
    let old = net.leader();
    net.propose(1, 1, b"one").unwrap();
    net.run_until(110 * MS);
    net.isolate(old);
    net.run_until(200 * MS);
    assert_ne!(net.nodes[&old].role(), Role::Leader, "check-quorum: the cut-off leader stepped down");
    let new = net.leader();
    assert_ne!(new, old);
    net.nodes.get_mut(&new).unwrap();
    let now = net.now;
    let cmd = Command { client: 1, seq: 2, payload: bytes::Bytes::from_static(b"two") };
    net.nodes.get_mut(&new).unwrap().propose(now, vec![cmd]).unwrap();
    net.drain(new);
    net.run_until(220 * MS);
    net.heal();
    net.run_until(300 * MS);
    assert_eq!(net.leader(), new);
    for id in [1, 2, 3] {
        assert_eq!(net.log(id), vec![(1, 1, 1, false), (2, 1, 2, false)], "replica {id}");
    }
}

#[test]
fn a_lagging_replica_catches_up_from_the_leaders_log() {
    let mut net = Net::new(&[1, 2, 3], &[]);
    net.run_until(100 * MS);
    let l = net.leader();
    let x = [1, 2, 3].into_iter().find(|&n| n != l).unwrap();
    net.down.insert(x);
    for seq in 1..=500 {
        net.propose(3, seq, b"while down").unwrap();
    }
    net.run_until(150 * MS);
    assert!(net.log(x).is_empty());
    net.down.remove(&x);
    net.run_until(300 * MS);
    assert_eq!(net.log(x).len(), 500);
    assert_eq!(net.log(x), net.log(l));
}

#[test]
fn a_learner_receives_the_log_but_never_votes_or_leads() {
    let mut net = Net::new(&[1, 2, 3], &[4]);
    net.run_until(100 * MS);
    let l = net.leader();
    net.propose(1, 1, b"a").unwrap();
    net.run_until(110 * MS);
    assert_eq!(net.log(4), vec![(1, 1, 1, false)]);
    // With the other two voters down, the leader and the learner are no quorum.
    for id in [1, 2, 3] {
        if id != l {
            net.down.insert(id);
        }
    }
    let before = net.nodes[&l].chosen();
    let _ = net.propose(1, 2, b"b");
    net.run_until(400 * MS);
    assert!(net.nodes[&l].chosen() == before, "a learner's acknowledgement is not a vote");
    assert_eq!(net.nodes[&4].role(), Role::Learner);
    assert!(net.roles.iter().all(|&(id, r)| id != 4 || r == Role::Learner));
}

/// Acceptance by landing: a follower whose promise is owned by a writer (replica 1)
/// defers a higher Prepare until its driver fenced the writer; the writes that landed
/// meanwhile are accepted under the old promise, and only then is the promise made.
#[test]
fn with_acceptance_by_landing_a_promise_waits_for_the_fence() {
    let mut c = Config::new(2, vec![1, 2, 3]);
    c.accept_on_landing = true;
    let mut s = MemStorage::new();
    s.set_promise(Ballot::new(4, 1)).unwrap();
    let mut r = Replica::new(c, s, 0).unwrap();
    r.flush().unwrap();
    assert_eq!(r.poll_action(), Some(Action::GrantWrite { to: 1, ballot: Ballot::new(4, 1) }));
    let prepare = |r: &mut Replica<MemStorage>, round| {
        r.handle_message(MS, 3, Message::Prepare { ballot: Ballot::new(round, 3), transfer: true }).unwrap();
        r.flush().unwrap();
    };
    prepare(&mut r, 5);
    assert_eq!(r.poll_action(), Some(Action::Fence { holder: 1 }), "the holder is fenced first");
    assert_eq!(r.poll_action(), None, "no promise before the fence");
    assert_eq!(r.storage().promise(), Ballot::new(4, 1));
    // A second Prepare waits too (one fence is asked).
    prepare(&mut r, 6);
    assert_eq!(r.poll_action(), None);
    // The driver hands over what landed before the revocation: accepted under ballot 4.
    let req = WriteRequest { ballot: Ballot::new(4, 1), first: 1, values: vec![Value::Noop], commit: 0 };
    r.handle_remote_write(MS, 1, req).unwrap();
    r.flush().unwrap();
    let acts: Vec<Action> = std::iter::from_fn(|| r.poll_action()).collect();
    assert!(
        acts.iter().any(|a| matches!(a, Action::WriteCompletion { to: 1, result: WriteResult::Ok { .. } })),
        "{acts:?}"
    );
    assert_eq!(r.storage().entry(1).unwrap().map(|e| e.ballot), Some(Ballot::new(4, 1)));
    r.fence_done(2 * MS).unwrap();
    r.flush().unwrap();
    let actions: Vec<Action> = std::iter::from_fn(|| r.poll_action()).collect();
    let promised: Vec<Ballot> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Send { to: 3, msg: Message::Promise { ballot, last, .. } } => {
                assert_eq!(*last, 1, "the promise reports the landed write");
                Some(*ballot)
            }
            _ => None,
        })
        .collect();
    assert_eq!(promised, vec![Ballot::new(5, 3)], "{actions:?}");
    assert!(actions.contains(&Action::GrantWrite { to: 3, ballot: Ballot::new(5, 3) }), "{actions:?}");
    // The second Prepare would raise the promise over the new holder (even though it is
    // the same replica, its writes under ballot 5 may have landed): another fence.
    assert_eq!(actions.last(), Some(&Action::Fence { holder: 3 }), "{actions:?}");
    assert_eq!(r.storage().promise(), Ballot::new(5, 3));
    r.fence_done(2 * MS).unwrap();
    r.flush().unwrap();
    let actions: Vec<Action> = std::iter::from_fn(|| r.poll_action()).collect();
    assert!(actions.contains(&Action::GrantWrite { to: 3, ballot: Ballot::new(6, 3) }), "{actions:?}");
    assert_eq!(r.storage().promise(), Ballot::new(6, 3));
    // A write of the fenced holder that lands late is denied now.
    let req = WriteRequest { ballot: Ballot::new(4, 1), first: 2, values: vec![Value::Noop], commit: 0 };
    r.handle_remote_write(3 * MS, 1, req).unwrap();
    r.flush().unwrap();
    let acts: Vec<Action> = std::iter::from_fn(|| r.poll_action()).collect();
    assert!(
        acts.iter().any(|a| matches!(a, Action::WriteCompletion { result: WriteResult::Denied { .. }, .. })),
        "{acts:?}"
    );
    // The new owner's own higher ballot: its earlier writes are fenced too.
    prepare(&mut r, 7);
    assert_eq!(r.poll_action(), Some(Action::Fence { holder: 3 }));
}

#[test]
fn a_write_without_permission_is_denied() {
    let c = Config::new(2, vec![1, 2, 3]);
    let mut s = MemStorage::new();
    s.set_promise(Ballot::new(4, 1)).unwrap();
    let mut r = Replica::new(c, s, 0).unwrap();
    r.flush().unwrap();
    assert_eq!(r.poll_action(), Some(Action::GrantWrite { to: 1, ballot: Ballot::new(4, 1) }), "restart re-grants");
    // Replica 3 writes under its own (unpromised) ballot; replica 1 under an old one.
    for (from, b) in [(3, Ballot::new(5, 3)), (1, Ballot::new(3, 1)), (3, Ballot::new(4, 1))] {
        let req = WriteRequest { ballot: b, first: 1, values: vec![Value::Noop], commit: 0 };
        r.handle_remote_write(MS, from, req).unwrap();
        r.flush().unwrap();
        let a = r.poll_action().expect("a completion");
        assert!(
            matches!(a, Action::WriteCompletion { to, result: WriteResult::Denied { promised: Some(p), .. } } if to == from && p == Ballot::new(4, 1)),
            "{a:?}"
        );
    }
    assert_eq!(r.storage().last_slot(), 0, "nothing was written");
    // The permission holder may write.
    let req = WriteRequest { ballot: Ballot::new(4, 1), first: 1, values: vec![Value::Noop], commit: 0 };
    r.handle_remote_write(MS, 1, req).unwrap();
    r.flush().unwrap();
    let acts: Vec<_> = std::iter::from_fn(|| r.poll_action()).collect();
    assert!(acts.iter().any(|a| matches!(a, Action::WriteCompletion { result: WriteResult::Ok { .. }, .. })));
    assert_eq!(r.storage().last_slot(), 1);
}

/// Storage whose sync fails after `ok_syncs` successes.
struct FailingStorage {
    inner: MemStorage,
    ok_syncs: u32,
}

impl Storage for FailingStorage {
    fn promise(&self) -> Ballot {
        self.inner.promise()
    }
    fn set_promise(&mut self, b: Ballot) -> Result<(), StorageError> {
        self.inner.set_promise(b)
    }
    fn accept(&mut self, e: Entry) -> Result<(), StorageError> {
        self.inner.accept(e)
    }
    fn entry(&self, s: u64) -> Result<Option<Entry>, StorageError> {
        self.inner.entry(s)
    }
    fn last_slot(&self) -> u64 {
        self.inner.last_slot()
    }
    fn sync(&mut self) -> Result<(), StorageError> {
        if self.ok_syncs == 0 {
            return Err(StorageError::msg("fdatasync: EIO"));
        }
        self.ok_syncs -= 1;
        Ok(())
    }
}

#[test]
fn a_failed_sync_stops_the_replica_and_releases_no_acknowledgement() {
    let c = Config::new(2, vec![1, 2, 3]);
    let mut s = FailingStorage { inner: MemStorage::new(), ok_syncs: 0 };
    s.set_promise(Ballot::new(1, 1)).unwrap();
    let mut r = Replica::new(c, s, 0).unwrap();
    r.flush().unwrap(); // nothing dirty yet
    while r.poll_action().is_some() {}
    let req = WriteRequest { ballot: Ballot::new(1, 1), first: 1, values: vec![Value::Noop], commit: 0 };
    r.handle_remote_write(MS, 1, req).unwrap();
    let released: Vec<_> = std::iter::from_fn(|| r.poll_action()).collect();
    assert!(
        !released.iter().any(|a| matches!(a, Action::WriteCompletion { .. })),
        "the acknowledgement waits for the sync: {released:?}"
    );
    let err = r.flush().expect_err("sync fails");
    assert!(err.to_string().contains("EIO"), "{err}");
    assert!(r.poll_action().is_none(), "no acknowledgement after a failed sync");
    assert!(r.stopped().is_some());
    assert!(r.handle_timeout(100 * MS).is_err(), "a stopped replica refuses inputs");
    assert!(matches!(
        r.propose(100 * MS, vec![Command { client: 1, seq: 1, payload: bytes::Bytes::new() }]),
        Err(ProposeError::Stopped)
    ));
}

#[test]
fn configurations_are_validated() {
    use paxos::ConfigError;
    assert_eq!(Config::new(0, vec![1]).validate(), Err(ConfigError::ZeroId));
    assert_eq!(Config::new(1, vec![]).validate(), Err(ConfigError::NoVoters));
    // A replica outside the membership starts passive, waiting to be added.
    let spare = Replica::new(Config::new(4, vec![1, 2, 3]), MemStorage::new(), 0).unwrap();
    assert_eq!(spare.role(), Role::Learner);
    assert_eq!(Config::new(1, vec![1, 2, 2]).validate(), Err(ConfigError::Duplicate(2)));
    let mut c = Config::new(1, vec![1, 2, 3]);
    c.election_timeout = c.heartbeat_interval;
    assert!(matches!(c.validate(), Err(ConfigError::Invalid(_))));
    assert!(Config::new(1, vec![1, 2, 3]).validate().is_ok());
    assert!(Replica::new(Config::new(0, vec![1]), MemStorage::new(), 0).is_err());
}

#[test]
fn a_follower_refuses_proposals_and_names_the_leader() {
    let mut net = Net::new(&[1, 2, 3], &[]);
    net.run_until(100 * MS);
    let l = net.leader();
    let f = [1, 2, 3].into_iter().find(|&n| n != l).unwrap();
    let cmd = Command { client: 1, seq: 1, payload: bytes::Bytes::new() };
    let now = net.now;
    assert_eq!(
        net.nodes.get_mut(&f).unwrap().propose(now, vec![cmd]),
        Err(ProposeError::NotLeader { leader: Some(l) })
    );
}

#[test]
fn a_restarted_replica_reapplies_its_chosen_prefix_from_the_hint() {
    let mut s = MemStorage::new();
    s.set_promise(Ballot::new(1, 1)).unwrap();
    for slot in 1..=3 {
        let cmd = Command { client: 1, seq: slot, payload: bytes::Bytes::from_static(b"x") };
        s.accept(Entry { slot, ballot: Ballot::new(1, 1), value: Value::Batch(vec![cmd]) }).unwrap();
    }
    s.set_chosen_hint(2).unwrap();
    let mut r = Replica::new(Config::new(2, vec![1, 2, 3]), s, 0).unwrap();
    r.flush().unwrap();
    let applied: Vec<u64> = std::iter::from_fn(|| r.poll_action())
        .filter_map(|a| match a {
            Action::Apply(a) => Some(a.slot),
            _ => None,
        })
        .collect();
    assert_eq!(applied, vec![1, 2], "slots up to the hint are applied at once; slot 3 waits for a leader");
    assert_eq!(r.chosen(), 2);
}

#[test]
fn leadership_moves_to_the_named_replica_at_once() {
    let mut net = Net::new(&[1, 2, 3], &[]);
    net.run_until(100 * MS);
    let old = net.leader();
    let to = [1, 2, 3].into_iter().find(|&n| n != old).unwrap();
    net.propose(1, 1, b"before").unwrap();
    let now = net.now;
    net.nodes.get_mut(&old).unwrap().transfer_leadership(now, to).unwrap();
    assert_eq!(net.nodes[&old].transferring_to(), Some(to));
    let cmd = Command { client: 1, seq: 2, payload: bytes::Bytes::from_static(b"during") };
    assert_eq!(net.nodes.get_mut(&old).unwrap().propose(now, vec![cmd]), Err(ProposeError::Transferring { to }));
    net.drain(old);
    // Well within one election timeout (10 ms by default): no waiting for a timeout.
    net.run_until(now + MS);
    assert_eq!(net.leader(), to, "the named replica leads");
    assert_eq!(net.nodes[&old].role(), Role::Follower);
    net.propose(1, 2, b"after").unwrap();
    net.run_until(now + 5 * MS);
    for id in [1, 2, 3] {
        assert_eq!(net.log(id), vec![(1, 1, 1, false), (2, 1, 2, false)], "replica {id}");
    }
}

#[test]
fn a_transfer_to_a_replica_that_may_not_lead_times_out_and_the_leader_leads_on() {
    let mut net = Net::new(&[1, 2, 3], &[]);
    net.run_until(100 * MS);
    let old = net.leader();
    let to = [1, 2, 3].into_iter().find(|&n| n != old).unwrap();
    let now = net.now;
    net.nodes.get_mut(&to).unwrap().set_can_lead(now, false);
    net.nodes.get_mut(&old).unwrap().transfer_leadership(now, to).unwrap();
    net.drain(old);
    net.run_until(now + 50 * MS);
    assert_eq!(net.leader(), old, "the transfer was abandoned");
    assert_eq!(net.nodes[&old].transferring_to(), None);
    net.propose(1, 1, b"x").unwrap();
    net.run_until(now + 60 * MS);
    assert_eq!(net.log(to).len(), 1);
    assert!(matches!(
        net.nodes.get_mut(&old).unwrap().transfer_leadership(now, 9),
        Err(paxos::TransferError::NotVoter(9))
    ));
    assert!(matches!(
        net.nodes.get_mut(&to).unwrap().transfer_leadership(now, old),
        Err(paxos::TransferError::NotLeader { .. })
    ));
}

#[test]
fn a_replica_that_may_not_lead_never_leads() {
    let mut net = Net::new(&[1, 2, 3], &[]);
    let now = net.now;
    net.nodes.get_mut(&1).unwrap().set_can_lead(now, false);
    for round in 0..5u64 {
        net.run_until((round + 1) * 200 * MS);
        let l = net.leader();
        assert_ne!(l, 1);
        net.down.insert(l); // kill each leader in turn; replica 1 still never leads
        net.run_until((round + 1) * 200 * MS + 100 * MS);
        net.down.remove(&l);
    }
    assert!(net.roles.iter().all(|&(id, r)| id != 1 || r != Role::Leader));
}

#[test]
fn step_down_hands_over_to_a_caught_up_voter() {
    let mut net = Net::new(&[1, 2, 3], &[]);
    net.run_until(100 * MS);
    let old = net.leader();
    let now = net.now;
    net.nodes.get_mut(&old).unwrap().step_down(now).unwrap();
    net.drain(old);
    net.run_until(now + 2 * MS);
    let new = net.leader();
    assert_ne!(new, old);
}

#[test]
fn a_leader_serves_linearizable_reads_under_its_lease_and_by_a_quorum_round() {
    let mut net = Net::new(&[1, 2, 3], &[]);
    net.run_until(100 * MS);
    let l = net.leader();
    net.propose(1, 1, b"x").unwrap();
    net.run_until(105 * MS);
    // Under the lease (heartbeats acknowledged within the election timeout): at once.
    let now = net.now;
    let r = net.nodes.get_mut(&l).unwrap();
    r.read(now, 7).unwrap();
    r.flush().unwrap();
    let acts: Vec<_> = std::iter::from_fn(|| r.poll_action()).collect();
    assert!(acts.iter().any(|a| matches!(a, Action::ReadReady { id: 7, index } if *index >= 1)), "{acts:?}");
    // Cut the leader off: the lease runs out, and a read needs a quorum round that
    // cannot complete; the leader steps down and aborts it.
    net.isolate(l);
    net.run_until(now + 20 * MS);
    let now = net.now;
    if net.nodes[&l].role() == Role::Leader {
        let r = net.nodes.get_mut(&l).unwrap();
        r.read(now, 8).unwrap();
        r.flush().unwrap();
        let acts: Vec<_> = std::iter::from_fn(|| r.poll_action()).collect();
        assert!(!acts.iter().any(|a| matches!(a, Action::ReadReady { id: 8, .. })), "no lease, no quorum: {acts:?}");
        let mut aborted = false;
        for t in 1..=100 {
            net.nodes.get_mut(&l).unwrap().handle_timeout(now + t * MS).unwrap();
            let r = net.nodes.get_mut(&l).unwrap();
            r.flush().unwrap();
            while let Some(a) = r.poll_action() {
                assert!(!matches!(a, Action::ReadReady { id: 8, .. }), "a cut-off leader confirmed a read");
                if matches!(&a, Action::ReadsAborted(ids) if ids.contains(&8)) {
                    aborted = true;
                }
            }
            if aborted {
                break;
            }
        }
        assert!(aborted, "the read is aborted when the leader steps down");
    }
    // A follower may serve a bounded-staleness read only while it hears its leader.
    net.heal();
    net.run_until(net.now + 100 * MS);
    let now = net.now;
    let f = [1, 2, 3].into_iter().find(|&n| net.nodes[&n].role() == Role::Follower).unwrap();
    assert!(net.nodes[&f].can_serve_stale_read(now, 10 * MS));
    assert!(!net.nodes[&f].can_serve_stale_read(now + 100 * MS, 10 * MS));
}

#[test]
fn membership_grows_from_three_to_five_and_shrinks_to_three_without_the_old_leader() {
    use paxos::{Membership, MembershipError};
    // 4 and 5 start outside the membership (passive) and join as learners first.
    let mut net = Net::new(&[1, 2, 3], &[]);
    for id in [4u64, 5] {
        net.nodes.insert(id, Replica::new(Config::new(id, vec![1, 2, 3]), MemStorage::new(), 0).unwrap());
    }
    net.run_until(100 * MS);
    let l = net.leader();
    assert!(l <= 3);
    for seq in 1..=20 {
        net.propose(1, seq, b"before").unwrap();
    }
    net.run_until(120 * MS);
    let now = net.now;
    // A stranger cannot be made a voter directly.
    let r = net.nodes.get_mut(&l).unwrap().change_membership(now, Membership::new(vec![1, 2, 3, 4], vec![]));
    assert!(matches!(r, Err(MembershipError::Refused(_))), "{r:?}");
    net.nodes.get_mut(&l).unwrap().change_membership(now, Membership::new(vec![1, 2, 3], vec![4, 5])).unwrap();
    // A second change waits for the first.
    let r = net.nodes.get_mut(&l).unwrap().change_membership(now, Membership::new(vec![1, 2, 3], vec![]));
    assert_eq!(r, Err(MembershipError::Busy));
    net.drain(l);
    net.run_until(200 * MS);
    for id in 1..=5 {
        assert_eq!(net.nodes[&id].membership(), Membership::new(vec![1, 2, 3], vec![4, 5]), "replica {id}");
        assert_eq!(net.log(id).len(), 20, "learner {id} caught up");
    }
    // Grow to five voters in one step (both learners are caught up).
    let now = net.now;
    net.nodes.get_mut(&l).unwrap().change_membership(now, Membership::new(vec![1, 2, 3, 4, 5], vec![])).unwrap();
    net.drain(l);
    net.run_until(300 * MS);
    assert_eq!(net.nodes[&4].role(), Role::Follower, "a promoted learner votes");
    for seq in 21..=40 {
        net.propose(1, seq, b"five").unwrap();
    }
    net.run_until(350 * MS);
    // Shrink to three, removing the leader and one other: the leader commits its own
    // removal, hands over to a remaining voter, and the log goes on.
    let other = if l == 1 { 2 } else { 1 };
    let keep: Vec<NodeId> = (1..=5).filter(|&x| x != l && x != other).collect();
    let now = net.now;
    net.nodes.get_mut(&l).unwrap().change_membership(now, Membership::new(keep.clone(), vec![])).unwrap();
    net.drain(l);
    net.run_until(600 * MS);
    let l2 = net.leader();
    assert!(keep.contains(&l2), "the new leader {l2} is in the new membership {keep:?}");
    for seq in 41..=60 {
        net.propose(1, seq, b"three").unwrap();
    }
    net.run_until(700 * MS);
    let expect: Vec<_> = (1..=60).map(|s| (s, 1, s, false)).collect();
    for &id in &keep {
        assert_eq!(net.log(id), expect, "replica {id}");
        assert_eq!(net.nodes[&id].membership(), Membership::new(keep.clone(), vec![]));
    }
    assert_ne!(net.nodes[&l].role(), Role::Leader);
    assert_eq!(net.nodes[&l].role(), Role::Learner, "a removed replica goes quiet");
}
