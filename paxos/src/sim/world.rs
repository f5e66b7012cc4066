//! The simulated world: replicas, network, clients, faults and checkers.

use super::disk::{Durable, SimDisk};
use super::linearizability::{self as lin, LogInput, LogModel, LogOutput, Operation};
use super::{SimConfig, SimReport, Violation, ViolationKind, MS};
use crate::config::Config;
use crate::message::{Message, ReadRequest, ReadResult, WriteRequest, WriteResult};
use crate::replica::{Action, Applied, ProposeError, Replica, Role, SnapshotMeta};
use crate::rng::Rng;
use crate::storage::MemStorage;
use crate::types::{Ballot, Command, Membership, Nanos, NodeId, Slot, Value};
use bytes::Bytes;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;

/// What travels between replicas.
#[derive(Clone, Debug)]
enum Payload {
    Msg(Message),
    Write(WriteRequest),
    WriteDone(WriteResult),
    Read(ReadRequest),
    ReadDone(ReadResult),
    /// A whole snapshot (the driver of a real replica streams it in chunks).
    Snapshot(Box<(SnapshotMeta, StateMachine)>),
}

/// A client's answer from a replica.
#[derive(Clone, Debug)]
enum Reply {
    Done(LogOutput),
    Redirect(Option<NodeId>),
    Retry,
}

#[derive(Debug)]
enum Event {
    Net {
        from: NodeId,
        to: NodeId,
        payload: Payload,
    },
    Timer {
        node: NodeId,
    },
    Flush {
        node: NodeId,
        incarnation: u64,
    },
    /// Acceptance by landing: the node's CPU takes what landed in its region.
    Drain {
        node: NodeId,
        incarnation: u64,
    },
    /// Acceptance by landing: the node's driver finishes the fence its core asked for
    /// (takes what landed, then tells the core).
    Fenced {
        node: NodeId,
        incarnation: u64,
    },
    ClientStart {
        client: usize,
    },
    ClientArrive {
        client: usize,
        node: NodeId,
        cmd: Command,
    },
    ClientReadArrive {
        client: usize,
        node: NodeId,
        session: u64,
        seq: u64,
    },
    ClientReply {
        client: usize,
        session: u64,
        seq: u64,
        attempt: u32,
        reply: Reply,
    },
    ClientTimeout {
        client: usize,
        seq: u64,
        attempt: u32,
    },
    ClientResend {
        client: usize,
        seq: u64,
        attempt: u32,
    },
    Crash {
        node: NodeId,
    },
    Transfer {
        to: NodeId,
    },
    Reconfigure {
        pick: u64,
    },
    Restart {
        node: NodeId,
    },
    Cut {
        id: u64,
        links: Vec<(NodeId, NodeId)>,
    },
    Uncut {
        id: u64,
    },
    Heal,
    Settle,
}

/// A replica's application: the sequence of appended values and each entry's result.
#[derive(Default, Clone, Debug)]
struct StateMachine {
    values: Vec<u64>,
    digest: u64,
    /// (client, seq) -> its result, and the slot that applied it.
    results: HashMap<(u64, u64), (LogOutput, Slot)>,
    positions: u64,
    last_slot: Slot,
    /// After each applied slot: (slot, positions, values, digest), so that the state at
    /// an earlier slot can be rebuilt for a log-service trim's snapshot.
    journal: Vec<(Slot, u64, usize, u64)>,
}

impl StateMachine {
    fn empty() -> Self {
        StateMachine { digest: lin::DIGEST_EMPTY, ..Default::default() }
    }

    /// The state right after applying `slot` (`None`: not in the journal).
    fn at(&self, slot: Slot) -> Option<StateMachine> {
        if slot == self.last_slot {
            return Some(self.clone());
        }
        let i = self.journal.binary_search_by_key(&slot, |j| j.0).ok()?;
        let (_, positions, values, digest) = self.journal[i];
        let results = self.results.iter().filter(|(_, (_, s))| *s <= slot).map(|(k, v)| (*k, *v)).collect();
        Some(StateMachine {
            values: self.values[..values].to_vec(),
            digest,
            results,
            positions,
            last_slot: slot,
            journal: self.journal[..=i].to_vec(),
        })
    }
}

struct Node {
    id: NodeId,
    replica: Option<Replica<SimDisk>>,
    durable: Durable,
    /// Clock rate in parts per million of the global clock, and offset.
    rate_ppm: u64,
    offset: Nanos,
    timer_at: Option<Nanos>,
    /// A storage sync is in progress and completes then.
    flush_at: Option<Nanos>,
    incarnation: u64,
    sm: StateMachine,
    /// Clients waiting for (client id, seq) to be applied here.
    waiters: BTreeMap<(u64, u64), usize>,
    /// The write permission this replica's agent granted (as a NIC would hold it).
    permission: Option<(NodeId, Ballot)>,
    /// Acceptance by landing: the writes that landed in this node's region (persistent:
    /// it survives crashes), oldest first, as (writer, write), and how many of them
    /// the core was handed. Those it was handed leave at the next storage sync.
    ring: Vec<(NodeId, WriteRequest)>,
    drained: usize,
    /// Direct (lease or quorum-round) reads waiting here: id -> (client, session, seq).
    read_waiters: BTreeMap<u64, (usize, u64, u64)>,
    /// The latest snapshot, saved durably (it survives crashes).
    snapshot: Option<(SnapshotMeta, StateMachine)>,
    /// A log-service trim applied here, to save and compact to once the actions that
    /// released it are executed.
    pending_trim: Option<SnapshotMeta>,
    /// The applied slot at which this replica, leading, last proposed a trim.
    trim_proposed_at: Slot,
}

struct ClientOp {
    hist: usize,
    seq: u64,
    input: LogInput,
    attempt: u32,
    /// A read served by the leader's read path (lease or quorum round), not the log.
    direct: bool,
}

struct Client {
    session: u64,
    seq: u64,
    op: Option<ClientOp>,
    leader_hint: Option<NodeId>,
}

/// The simulated world. Build with [`World::new`], run with [`World::run`].
pub struct World {
    cfg: SimConfig,
    rng: Rng,
    now: Nanos,
    seq: u64,
    queue: BTreeMap<(Nanos, u64), Event>,
    nodes: BTreeMap<NodeId, Node>,
    voters: Vec<NodeId>,
    learners: Vec<NodeId>,
    clients: Vec<Client>,
    next_session: u64,
    next_value: u64,
    next_read_id: u64,
    cuts: BTreeMap<u64, Vec<(NodeId, NodeId)>>,
    healed: bool,
    settling: bool,
    history: Vec<Operation<LogInput, LogOutput>>,
    /// slot -> value applied there (agreement).
    chosen: HashMap<Slot, Value>,
    /// trim slot -> the trim snapshot applied there (agreement on trims).
    trims: HashMap<Slot, SnapshotMeta>,
    /// (client, seq) -> result (state-machine agreement).
    results: HashMap<(u64, u64), LogOutput>,
    report: SimReport,
    heal_commit_mark: Option<usize>,
    violation: Option<Box<Violation>>,
}

const CLIENT_TIMEOUT: Nanos = 60 * MS;

impl World {
    /// A world for `cfg`, with its fault schedule drawn from the seed.
    pub fn new(cfg: SimConfig) -> Self {
        let mut rng = Rng::new(cfg.seed);
        let voters: Vec<NodeId> = (1..=cfg.voters as u64).collect();
        let learners: Vec<NodeId> = (0..cfg.learners as u64).map(|i| cfg.voters as u64 + 1 + i).collect();
        let spares: Vec<NodeId> =
            (0..cfg.spares as u64).map(|i| cfg.voters as u64 + cfg.learners as u64 + 1 + i).collect();
        let mut nodes = BTreeMap::new();
        for &id in voters.iter().chain(&learners).chain(&spares) {
            let spread = cfg.clock_spread;
            let rate = if spread > 0.0 {
                let lo = 1e6 / (1.0 + spread);
                let hi = 1e6 * (1.0 + spread);
                lo + (hi - lo) * (rng.below(1_000_000) as f64 / 1e6)
            } else {
                1e6
            };
            nodes.insert(
                id,
                Node {
                    id,
                    replica: None,
                    durable: Rc::new(RefCell::new(MemStorage::new())),
                    rate_ppm: rate as u64,
                    offset: rng.below(1_000 * MS),
                    timer_at: None,
                    flush_at: None,
                    incarnation: 0,
                    sm: StateMachine::empty(),
                    waiters: BTreeMap::new(),
                    permission: None,
                    ring: Vec::new(),
                    drained: 0,
                    read_waiters: BTreeMap::new(),
                    snapshot: None,
                    pending_trim: None,
                    trim_proposed_at: 0,
                },
            );
        }
        let clients =
            (0..cfg.clients).map(|i| Client { session: i as u64 + 1, seq: 0, op: None, leader_hint: None }).collect();
        let next_session = cfg.clients as u64 + 1;
        let report = SimReport { seed: cfg.seed, ..Default::default() };
        let mut w = World {
            cfg,
            rng,
            now: 0,
            seq: 0,
            queue: BTreeMap::new(),
            nodes,
            voters,
            learners,
            clients,
            next_session,
            next_value: 1,
            next_read_id: 0,
            cuts: BTreeMap::new(),
            healed: false,
            settling: false,
            history: Vec::new(),
            chosen: HashMap::new(),
            trims: HashMap::new(),
            results: HashMap::new(),
            report,
            heal_commit_mark: None,
            violation: None,
        };
        w.schedule_faults();
        w
    }

    fn schedule(&mut self, at: Nanos, e: Event) {
        self.seq += 1;
        self.queue.insert((at.max(self.now), self.seq), e);
    }

    fn all_nodes(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    fn schedule_faults(&mut self) {
        let ft = self.cfg.fault_time;
        let ids = self.all_nodes();
        for _ in 0..self.cfg.crashes {
            let node = ids[self.rng.below(ids.len() as u64) as usize];
            let at = self.rng.below(ft);
            let down = self.rng.range(5, 300) * MS;
            self.schedule(at, Event::Crash { node });
            if at + down < ft {
                self.schedule(at + down, Event::Restart { node });
            }
        }
        for id in 0..self.cfg.partitions as u64 {
            let at = self.rng.below(ft);
            let len = self.rng.range(20, 400) * MS;
            let links = self.draw_partition(&ids);
            self.schedule(at, Event::Cut { id, links });
            if at + len < ft {
                self.schedule(at + len, Event::Uncut { id });
            }
        }
        for _ in 0..self.cfg.reconfigs {
            let at = self.rng.below(ft);
            let pick = self.rng.next_u64();
            self.schedule(at, Event::Reconfigure { pick });
        }
        for _ in 0..self.cfg.transfers {
            let at = self.rng.below(ft);
            let to = self.voters[self.rng.below(self.voters.len() as u64) as usize];
            self.schedule(at, Event::Transfer { to });
        }
        self.schedule(ft, Event::Heal);
        for c in 0..self.clients.len() {
            let at = self.rng.range(1, 50) * MS;
            self.schedule(at, Event::ClientStart { client: c });
        }
        for id in ids {
            self.schedule(0, Event::Restart { node: id });
        }
    }

    /// A random set of blocked links: isolate one replica, split in two, or one-way cuts.
    fn draw_partition(&mut self, ids: &[NodeId]) -> Vec<(NodeId, NodeId)> {
        let mut links = Vec::new();
        match self.rng.below(3) {
            0 => {
                let x = ids[self.rng.below(ids.len() as u64) as usize];
                for &y in ids {
                    if y != x {
                        links.push((x, y));
                        links.push((y, x));
                    }
                }
            }
            1 => {
                let side: Vec<bool> = ids.iter().map(|_| self.rng.chance(0.5)).collect();
                for (i, &a) in ids.iter().enumerate() {
                    for (j, &b) in ids.iter().enumerate() {
                        if side[i] != side[j] {
                            links.push((a, b));
                        }
                    }
                }
            }
            _ => {
                let n = self.rng.range(1, ids.len() as u64);
                for _ in 0..n {
                    let a = ids[self.rng.below(ids.len() as u64) as usize];
                    let b = ids[self.rng.below(ids.len() as u64) as usize];
                    if a != b {
                        links.push((a, b)); // one way only
                    }
                }
            }
        }
        links
    }

    fn blocked(&self, from: NodeId, to: NodeId) -> bool {
        self.cuts.values().any(|l| l.contains(&(from, to)))
    }

    fn violate(&mut self, kind: ViolationKind, detail: String) {
        if self.violation.is_none() {
            self.violation = Some(Box::new(Violation {
                seed: self.cfg.seed,
                bug: self.cfg.planted_bug,
                kind,
                detail,
                time: self.now,
            }));
        }
    }

    // ---- clocks --------------------------------------------------------------------

    fn local_time(&self, node: NodeId) -> Nanos {
        let n = &self.nodes[&node];
        n.offset + ((self.now as u128 * n.rate_ppm as u128) / 1_000_000) as Nanos
    }

    fn global_time(&self, node: NodeId, local: Nanos) -> Nanos {
        let n = &self.nodes[&node];
        let rel = local.saturating_sub(n.offset) as u128;
        let g = (rel * 1_000_000).div_ceil(n.rate_ppm as u128) as Nanos + 1;
        g.max(self.now + 1)
    }

    // ---- the network ---------------------------------------------------------------

    fn net_send(&mut self, from: NodeId, to: NodeId, payload: Payload) {
        if self.blocked(from, to) {
            return;
        }
        let faulty = !self.healed;
        if faulty && self.rng.chance(self.cfg.drop) {
            return;
        }
        let copies = if faulty && self.rng.chance(self.cfg.dup) { 2 } else { 1 };
        for _ in 0..copies {
            let mut d = self.rng.range(self.cfg.delay.0, self.cfg.delay.1);
            if faulty && self.rng.chance(self.cfg.slow) {
                d += self.rng.below(self.cfg.slow_max);
            }
            let at = self.now + d;
            self.schedule(at, Event::Net { from, to, payload: payload.clone() });
        }
    }

    fn client_delay(&mut self) -> Nanos {
        self.rng.range(self.cfg.delay.0, self.cfg.delay.1)
    }

    // ---- running -------------------------------------------------------------------

    /// Runs to the end and checks everything.
    pub fn run(mut self) -> Result<SimReport, Box<Violation>> {
        let deadline = self.cfg.fault_time + self.cfg.liveness_bound;
        while let Some(((t, _), ev)) = self.queue.pop_first() {
            if let Some(v) = self.violation.take() {
                return Err(v);
            }
            if t > deadline {
                let mut why = self.unsettled();
                for n in self.nodes.values() {
                    if let Some(r) = &n.replica {
                        why += &format!("\n    {}", r.debug_state());
                    }
                }
                self.now = deadline;
                self.violate(
                    ViolationKind::Liveness,
                    format!("not settled {}ms after healing: {why}", self.cfg.liveness_bound / MS),
                );
                break;
            }
            self.now = t;
            self.report.events += 1;
            if self.report.events > self.cfg.max_events {
                self.violate(ViolationKind::Liveness, "event budget exhausted".into());
                break;
            }
            self.step(ev);
            if self.settling && self.unsettled().is_empty() {
                break;
            }
        }
        if let Some(v) = self.violation.take() {
            return Err(v);
        }
        if !self.settling || !self.unsettled().is_empty() {
            let why = self.unsettled();
            self.violate(ViolationKind::Liveness, format!("run ended unsettled: {why}"));
            return Err(self.violation.take().expect("violation"));
        }
        self.final_checks();
        if let Some(v) = self.violation.take() {
            return Err(v);
        }
        self.report.sim_time = self.now;
        self.report.slots_chosen = self.chosen.len() as u64;
        self.report.client_ops = self.history.len() as u64;
        Ok(self.report)
    }

    /// Why the run has not settled yet (empty when it has).
    fn unsettled(&self) -> String {
        let busy: Vec<usize> = (0..self.clients.len()).filter(|&c| self.clients[c].op.is_some()).collect();
        if !busy.is_empty() {
            return format!("clients {busy:?} have operations in flight");
        }
        let leader = self.nodes.values().filter_map(|n| n.replica.as_ref()).find(|r| r.role() == Role::Leader);
        let Some(leader) = leader else {
            return "no leader".into();
        };
        let target = leader.chosen();
        let members = leader.membership();
        let lagging: Vec<NodeId> = self
            .nodes
            .values()
            .filter(|n| members.contains(n.id))
            .filter(|n| n.replica.as_ref().is_none_or(|r| r.applied() != target || r.needs_flush()))
            .map(|n| n.id)
            .collect();
        if !lagging.is_empty() {
            return format!("replicas {lagging:?} have not applied up to the leader's commit {target}");
        }
        String::new()
    }

    fn step(&mut self, ev: Event) {
        match ev {
            Event::Net { from, to, payload } => self.deliver(from, to, payload),
            Event::Timer { node } => {
                let due = self.nodes[&node].timer_at;
                if due != Some(self.now) {
                    return; // superseded
                }
                self.nodes.get_mut(&node).expect("node").timer_at = None;
                let local = self.local_time(node);
                self.with_replica(node, |r| r.handle_timeout(local).map_err(|e| e.to_string()));
            }
            Event::Flush { node, incarnation } => {
                let n = self.nodes.get_mut(&node).expect("node");
                if n.incarnation != incarnation || n.replica.is_none() {
                    return;
                }
                n.flush_at = None;
                let r = n.replica.as_mut().expect("replica");
                if let Err(e) = r.flush() {
                    let msg = format!("replica {node} flush failed: {e}");
                    self.violate(ViolationKind::Contract, msg);
                    return;
                }
                // What the core was handed from the region is in its storage now.
                n.ring.drain(..n.drained);
                n.drained = 0;
                self.after(node);
            }
            Event::Drain { node, incarnation } => {
                if self.nodes[&node].incarnation == incarnation {
                    self.drain(node);
                }
            }
            Event::Fenced { node, incarnation } => {
                if self.nodes[&node].incarnation == incarnation {
                    self.report.fences += 1;
                    self.drain(node);
                    let local = self.local_time(node);
                    self.with_replica(node, |r| r.fence_done(local).map_err(|e| e.to_string()));
                }
            }
            Event::ClientStart { client } => self.client_start(client),
            Event::ClientArrive { client, node, cmd } => self.client_arrive(client, node, cmd),
            Event::ClientReadArrive { client, node, session, seq } => {
                self.client_read_arrive(client, node, session, seq)
            }
            Event::ClientReply { client, session, seq, attempt, reply } => {
                self.client_reply(client, session, seq, attempt, reply)
            }
            Event::ClientTimeout { client, seq, attempt } => self.client_timeout(client, seq, attempt),
            Event::ClientResend { client, seq, attempt } => self.client_resend(client, seq, attempt),
            Event::Crash { node } => self.crash(node),
            Event::Transfer { to } => {
                let leader = self
                    .nodes
                    .values()
                    .find(|n| n.replica.as_ref().is_some_and(|r| r.role() == Role::Leader))
                    .map(|n| n.id);
                if let Some(l) = leader {
                    let local = self.local_time(l);
                    self.with_replica(l, |r| {
                        let _ = r.transfer_leadership(local, to);
                        Ok(())
                    });
                    self.report.transfers += 1;
                }
            }
            Event::Restart { node } => self.restart(node),
            Event::Reconfigure { pick } => self.reconfigure(pick),
            Event::Cut { id, links } => {
                if !self.healed {
                    self.cuts.insert(id, links);
                }
            }
            Event::Uncut { id } => {
                self.cuts.remove(&id);
            }
            Event::Heal => {
                self.healed = true;
                self.cuts.clear();
                for id in self.all_nodes() {
                    if self.nodes[&id].replica.is_none() {
                        self.restart(id);
                    }
                }
                self.heal_commit_mark = Some(self.chosen.len());
                let at = self.now + self.cfg.client_time;
                self.schedule(at, Event::Settle);
            }
            Event::Settle => self.settling = true,
        }
    }

    fn crash(&mut self, node: NodeId) {
        if self.healed {
            return;
        }
        let n = self.nodes.get_mut(&node).expect("node");
        if n.replica.take().is_some() {
            self.report.crashes += 1;
        }
        n.timer_at = None;
        n.flush_at = None;
        n.waiters.clear();
        n.read_waiters.clear();
        n.permission = None;
        n.pending_trim = None;
        n.sm = StateMachine::empty();
    }

    fn restart(&mut self, node: NodeId) {
        if self.nodes[&node].replica.is_some() {
            return;
        }
        let local = self.local_time(node);
        let voters = self.voters.clone();
        let learners = self.learners.clone();
        let n = self.nodes.get_mut(&node).expect("node");
        n.incarnation += 1;
        let mut c = Config::new(node, voters);
        c.learners = learners;
        c.heartbeat_interval = 5 * MS;
        c.election_timeout = 40 * MS;
        c.retransmit_timeout = 20 * MS;
        c.window = 16;
        c.max_batch_entries = 4;
        c.max_write_slots = 3;
        c.max_pending_entries = 64;
        c.max_read_slots = self.cfg.read_slots;
        c.seed = self.cfg.seed.wrapping_mul(31).wrapping_add(node * 1000 + n.incarnation);
        c.planted_bug = self.cfg.planted_bug;
        // The clock-drift bound the read lease assumes: the largest ratio between two
        // replicas' clock rates, in percent over 1.
        let spread = self.cfg.clock_spread;
        c.max_clock_drift_percent = (((1.0 + spread) * (1.0 + spread) - 1.0) * 100.0).ceil() as u64 + 1;
        c.can_lead = !(self.cfg.one_cannot_lead && Some(&node) == self.voters.last());
        c.priority = if self.cfg.priorities { (node * 97 % 256) as u8 } else { 255 };
        c.accept_on_landing = self.cfg.landing;
        let disk = SimDisk::open(n.durable.clone());
        let meta = match &n.snapshot {
            Some((meta, sm)) => {
                n.sm = sm.clone();
                meta.clone()
            }
            None => SnapshotMeta::default(),
        };
        match Replica::restore(c, disk, local, meta) {
            Ok(r) => n.replica = Some(r),
            Err(e) => {
                let msg = format!("replica {node} failed to start: {e}");
                self.violate(ViolationKind::Contract, msg);
                return;
            }
        }
        // The persistent region's writes go to the restarted core, which takes those of
        // its promise's owner under that promise.
        n.drained = 0;
        self.report.replayed += n.ring.len() as u64;
        self.after(node);
        self.drain(node);
    }

    /// A remote write reaches `to` under acceptance by landing: it lands if `from`
    /// holds `to`'s write permission (the NIC's check), and the landing is acknowledged
    /// to the writer as its acceptance; `to`'s CPU takes it later.
    fn land(&mut self, from: NodeId, to: NodeId, w: WriteRequest) {
        let n = self.nodes.get_mut(&to).expect("node");
        let result = if n.permission.is_some_and(|(h, _)| h == from) {
            let result = WriteResult::Ok { ballot: w.ballot, first: w.first, count: w.values.len() as u64 };
            n.ring.push((from, w));
            self.report.writes_landed += 1;
            let incarnation = n.incarnation;
            let at = self.now + self.rng.range(0, self.cfg.drain_max);
            self.schedule(at, Event::Drain { node: to, incarnation });
            result
        } else {
            WriteResult::Denied { ballot: w.ballot, promised: None }
        };
        self.net_send(to, from, Payload::WriteDone(result));
    }

    /// `node`'s CPU hands the writes that landed in its region to its core, in order.
    fn drain(&mut self, node: NodeId) {
        loop {
            let local = self.local_time(node);
            let n = self.nodes.get_mut(&node).expect("node");
            if n.replica.is_none() || n.drained >= n.ring.len() {
                return;
            }
            let (from, w) = n.ring[n.drained].clone();
            n.drained += 1;
            self.with_replica(node, |r| r.handle_remote_write(local, from, w).map_err(|e| e.to_string()));
        }
    }

    /// Runs `f` on `node`'s replica (if it is up), then executes its actions.
    fn with_replica(&mut self, node: NodeId, f: impl FnOnce(&mut Replica<SimDisk>) -> Result<(), String>) {
        let Some(r) = self.nodes.get_mut(&node).and_then(|n| n.replica.as_mut()) else {
            return;
        };
        if let Err(e) = f(r) {
            self.violate(ViolationKind::Contract, format!("replica {node} stopped: {e}"));
            return;
        }
        self.after(node);
    }

    /// Executes the actions `node`'s replica released, starts a storage sync if it has
    /// unsynced writes (completing after the disk latency, see [`Event::Flush`]), and
    /// re-arms its timer.
    fn after(&mut self, node: NodeId) {
        let mut actions = Vec::new();
        let (timeout, needs_flush) = {
            let Some(r) = self.nodes.get_mut(&node).and_then(|n| n.replica.as_mut()) else {
                return;
            };
            while let Some(a) = r.poll_action() {
                actions.push(a);
            }
            (r.poll_timeout(), r.needs_flush())
        };
        for a in actions {
            self.execute(node, a);
        }
        self.maybe_snapshot(node);
        self.maybe_trim(node);
        if needs_flush && self.nodes[&node].flush_at.is_none() {
            let (lo, hi) = self.cfg.disk_latency;
            let at = self.now + self.rng.range(lo, hi);
            let n = self.nodes.get_mut(&node).expect("node");
            n.flush_at = Some(at);
            let incarnation = n.incarnation;
            self.schedule(at, Event::Flush { node, incarnation });
        }
        if let Some(local) = timeout {
            let g = self.global_time(node, local);
            let n = self.nodes.get_mut(&node).expect("node");
            if n.timer_at != Some(g) {
                n.timer_at = Some(g);
                self.schedule(g, Event::Timer { node });
            }
        }
    }

    /// Asks the leader for a membership change drawn from `pick`: add a spare as a
    /// learner, promote one or two learners, demote or remove a voter, or replace a
    /// voter by a learner (all in one step). Voters stay between 2 and 5.
    fn reconfigure(&mut self, pick: u64) {
        if self.healed {
            return;
        }
        let Some(leader) =
            self.nodes.values().find(|n| n.replica.as_ref().is_some_and(|r| r.role() == Role::Leader)).map(|n| n.id)
        else {
            return;
        };
        let cur = self.nodes[&leader].replica.as_ref().expect("leader").membership();
        let all = self.all_nodes();
        let outside: Vec<NodeId> = all.iter().copied().filter(|n| !cur.contains(*n)).collect();
        let (mut v, mut l) = (cur.voters.clone(), cur.learners.clone());
        let choose = |xs: &[NodeId], k: u64| xs[(k % xs.len() as u64) as usize];
        let k = pick >> 8;
        // Under the nemesis, half of the changes are the ones whose old and new quorums
        // need not intersect (two voters added, or one replaced).
        let op = match () {
            _ if !self.cfg.reconfig_split || pick & 0x80 == 0 => pick % 6,
            _ if l.is_empty() => 0,
            _ if v.len() > 3 => 3,
            _ if l.len() >= 2 && pick & 0x40 != 0 => 2,
            _ => 4,
        };
        match op {
            0 if !outside.is_empty() => l.push(choose(&outside, k)),
            1 if !l.is_empty() && v.len() < 5 => {
                let n = choose(&l, k);
                l.retain(|&x| x != n);
                v.push(n);
            }
            2 if l.len() >= 2 && v.len() <= 3 => {
                v.extend(l.drain(..2));
            }
            3 if v.len() > 2 => {
                let n = choose(&v, k);
                v.retain(|&x| x != n);
                if k & 1 == 0 {
                    l.push(n);
                }
            }
            4 if !l.is_empty() && v.len() > 2 => {
                let out = choose(&v, k);
                let inn = choose(&l, k >> 8);
                v.retain(|&x| x != out);
                l.retain(|&x| x != inn);
                v.push(inn);
                l.push(out);
            }
            5 if !l.is_empty() => {
                let n = choose(&l, k);
                l.retain(|&x| x != n);
            }
            _ => return,
        }
        // Every change carries per-member bytes (the service's addresses) that differ
        // from one change to the next: the final checks compare them across replicas.
        let addrs = v.iter().chain(&l).map(|&n| (n, format!("node {n} as of change {pick}").into_bytes())).collect();
        let m = Membership::new(v, l).with_addrs(addrs);
        // Keep a voter that may lead (the simulator's may-never-lead replica alone
        // could never elect anyone).
        let cannot = self.cfg.one_cannot_lead.then(|| *self.voters.last().expect("voters"));
        if m.voters.iter().all(|&x| Some(x) == cannot) {
            return;
        }
        // The nemesis: {leader and new voters} | {other old voters}, when each side
        // could form a quorum (of the new and of the old membership respectively), cut
        // before the change is proposed so the old voters never see it.
        let a: Vec<NodeId> = m.voters.iter().copied().filter(|&x| x == leader || !cur.is_voter(x)).collect();
        let b: Vec<NodeId> = cur.voters.iter().copied().filter(|&x| x != leader).collect();
        let id = 1_000_000 + pick;
        let split = self.cfg.reconfig_split && a.len() >= m.quorum() && b.len() >= cur.quorum();
        if split {
            let links: Vec<(NodeId, NodeId)> =
                a.iter().flat_map(|&x| b.iter().flat_map(move |&y| [(x, y), (y, x)])).collect();
            self.cuts.insert(id, links);
        }
        let local = self.local_time(leader);
        let mut accepted = false;
        self.with_replica(leader, |r| {
            let res = r.change_membership(local, m.clone());
            if std::env::var("SIMTRACE").is_ok() {
                eprintln!("{:>9.3} n{leader} change to {m:?}: {res:?}", local as f64 / 1e6);
            }
            accepted = res.is_ok();
            Ok(())
        });
        if split && accepted {
            let at = self.now + self.rng.range(50, 400) * MS;
            self.schedule(at, Event::Uncut { id });
        } else if split {
            self.cuts.remove(&id);
        }
    }

    /// Every `snapshot_every` slots, once the application has consumed every slot the
    /// replica applied, save a snapshot durably and let the replica trim its log.
    fn maybe_snapshot(&mut self, node: NodeId) {
        let every = self.cfg.snapshot_every;
        if every == 0 {
            return;
        }
        let local = self.local_time(node);
        let keep = self.cfg.snapshot_keep;
        let n = self.nodes.get_mut(&node).expect("node");
        let Some(r) = n.replica.as_mut() else { return };
        let last = n.snapshot.as_ref().map_or(0, |(m, _)| m.slot);
        if r.applied() != n.sm.last_slot || r.applied() < last + every {
            return;
        }
        let meta = r.snapshot_meta();
        let upto = meta.slot.saturating_sub(keep);
        n.snapshot = Some((meta, n.sm.clone()));
        self.report.snapshots_taken += 1;
        if let Err(e) = r.compact(local, upto) {
            self.violate(ViolationKind::Contract, format!("replica {node} stopped: {e}"));
        }
    }

    /// Saves a pending log-service trim's snapshot (the core's meta with the state
    /// machine as it was after that slot) and lets the replica drop the prefix; on a
    /// leader, proposes a trim every `trim_every` applied slots.
    fn maybe_trim(&mut self, node: NodeId) {
        let local = self.local_time(node);
        let n = self.nodes.get_mut(&node).expect("node");
        let Some(r) = n.replica.as_mut() else { return };
        if let Some(meta) = n.pending_trim.take() {
            // (Not behind a newer application snapshot: the two kinds mix only here.)
            let newer = n.snapshot.as_ref().is_some_and(|(m, _)| m.slot >= meta.slot);
            if meta.slot > r.base().slot && !newer {
                let Some(sm) = n.sm.at(meta.slot) else {
                    let msg = format!("replica {node}: no state for trim slot {} (at {})", meta.slot, n.sm.last_slot);
                    self.violate(ViolationKind::StateMachine, msg);
                    return;
                };
                n.snapshot = Some((meta.clone(), sm));
                self.report.trims += 1;
                if let Err(e) = r.compact_to(local, meta) {
                    self.violate(ViolationKind::Contract, format!("replica {node} stopped: {e}"));
                    return;
                }
            }
        }
        let every = self.cfg.trim_every;
        if every == 0 || r.role() != Role::Leader || r.applied() < n.trim_proposed_at + every {
            return;
        }
        n.trim_proposed_at = r.applied();
        // Drawn apart from the world's generator, so that trims perturb the schedule
        // of a seed as little as they can.
        let behind = (self.cfg.seed ^ r.applied()).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60;
        let position = r.applied_position().saturating_sub(behind);
        self.with_replica(node, |r| {
            let _ = r.propose_trim(local, position); // refused while not leading: fine
            Ok(())
        });
    }

    fn execute(&mut self, node: NodeId, a: Action) {
        match a {
            Action::Send { to, msg } => self.net_send(node, to, Payload::Msg(msg)),
            Action::RemoteWrite { to, req } => self.net_send(node, to, Payload::Write(req)),
            Action::RemoteRead { to, req } => self.net_send(node, to, Payload::Read(req)),
            Action::WriteCompletion { .. } if self.cfg.landing => {
                // A credit for the writer's transport (it may reuse the region's
                // space): its core counted the write when it landed.
            }
            Action::Fence { holder } => {
                let n = self.nodes.get_mut(&node).expect("node");
                if n.permission.is_some_and(|(h, _)| h == holder) {
                    n.permission = None;
                }
                let incarnation = n.incarnation;
                let at = self.now + self.rng.range(0, self.cfg.drain_max / 4 + 1);
                self.schedule(at, Event::Fenced { node, incarnation });
            }
            Action::WriteCompletion { to, result } => {
                if let WriteResult::Ok { ballot, .. } = &result {
                    let perm = self.nodes[&node].permission;
                    if perm != Some((to, *ballot)) && self.cfg.check_permission {
                        self.violate(
                            ViolationKind::Permission,
                            format!("replica {node} accepted a write from {to} under {ballot:?}, but granted {perm:?}"),
                        );
                    }
                }
                self.net_send(node, to, Payload::WriteDone(result))
            }
            Action::ReadCompletion { to, result } => self.net_send(node, to, Payload::ReadDone(result)),
            Action::GrantWrite { to, ballot } => {
                self.nodes.get_mut(&node).expect("node").permission = Some((to, ballot));
            }
            Action::RevokeWrite { from } => {
                let n = self.nodes.get_mut(&node).expect("node");
                if n.permission.is_some_and(|(h, _)| h == from) {
                    n.permission = None;
                }
            }
            Action::Apply(applied) => {
                if applied.membership.is_some() && std::env::var("SIMTRACE").is_ok() {
                    eprintln!(
                        "{:>9.3} n{node} applied slot {} {:?}",
                        self.now as f64 / 1e6,
                        applied.slot,
                        applied.membership
                    );
                }
                if applied.membership.is_some()
                    && self.nodes[&node].replica.as_ref().is_some_and(|r| r.role() == Role::Leader)
                {
                    self.report.reconfigs += 1;
                }
                self.apply(node, applied)
            }
            Action::ReadReady { id, index } => {
                let n = self.nodes.get_mut(&node).expect("node");
                if let Some((client, session, seq)) = n.read_waiters.remove(&id) {
                    if n.sm.last_slot < index {
                        let msg = format!("replica {node} released read {id} at index {index} before applying it");
                        self.violate(ViolationKind::StateMachine, msg);
                        return;
                    }
                    let out = LogOutput::Read { len: n.sm.values.len() as u64, digest: n.sm.digest };
                    self.reply_later(client, session, seq, Reply::Done(out));
                }
            }
            Action::ReadsAborted(ids) => {
                for id in ids {
                    let n = self.nodes.get_mut(&node).expect("node");
                    if let Some((client, session, seq)) = n.read_waiters.remove(&id) {
                        self.reply_later(client, session, seq, Reply::Retry);
                    }
                }
            }
            Action::Aborted(cmds) => {
                for c in cmds {
                    if let Some(client) = self.nodes.get_mut(&node).expect("node").waiters.remove(&(c.client, c.seq)) {
                        self.reply_later(client, c.client, c.seq, Reply::Retry);
                    }
                }
            }
            Action::SendSnapshot { to } => {
                if let Some(snap) = self.nodes[&node].snapshot.clone() {
                    self.net_send(node, to, Payload::Snapshot(Box::new(snap)));
                } else {
                    let msg = format!("replica {node} asked to send a snapshot it never took");
                    self.violate(ViolationKind::Contract, msg);
                }
            }
            Action::RoleChanged { role, ballot, leader } if std::env::var("SIMTRACE").is_ok() => {
                let r = self.nodes[&node]
                    .replica
                    .as_ref()
                    .map(|r| (r.membership(), r.chosen(), crate::storage::Storage::last_slot(r.storage())));
                eprintln!("{:>9.3} n{node} {role:?} {ballot:?} leader={leader:?} {r:?}", self.now as f64 / 1e6);
                if role == Role::Leader {
                    self.report.elections += 1;
                }
            }
            Action::RoleChanged { role, .. } => {
                if role == Role::Leader {
                    self.report.elections += 1;
                }
            }
        }
    }

    fn deliver(&mut self, from: NodeId, to: NodeId, payload: Payload) {
        let local = {
            if self.nodes[&to].replica.is_none() {
                return; // a crashed replica: lost (a one-sided access fails too)
            }
            self.local_time(to)
        };
        if let Payload::Snapshot(snap) = payload {
            let (meta, sm) = *snap;
            let n = self.nodes.get_mut(&to).expect("node");
            let r = n.replica.as_mut().expect("replica");
            if !r.snapshot_useful(meta.slot) {
                return;
            }
            // Save it durably, load it into the application, then tell the replica.
            n.snapshot = Some((meta.clone(), sm.clone()));
            n.sm = sm;
            self.report.snapshots_installed += 1;
            self.with_replica(to, |r| r.install_snapshot(local, meta).map(|_| ()).map_err(|e| e.to_string()));
            return;
        }
        if let (true, Payload::Write(w)) = (self.cfg.landing, &payload) {
            self.land(from, to, w.clone());
            return;
        }
        self.with_replica(to, |r| {
            let res = match payload {
                Payload::Msg(m) => r.handle_message(local, from, m),
                Payload::Write(w) => r.handle_remote_write(local, from, w),
                Payload::WriteDone(d) => r.handle_write_completion(local, from, d),
                Payload::Read(q) => r.handle_remote_read(local, from, q),
                Payload::ReadDone(d) => r.handle_read_completion(local, from, d),
                Payload::Snapshot(_) => unreachable!("handled above"),
            };
            res.map_err(|e| e.to_string())
        });
    }

    // ---- the application and its checks -------------------------------------------

    fn apply(&mut self, node: NodeId, applied: Applied) {
        // Agreement.
        let value = Value::Batch(applied.entries.iter().map(|e| e.command.clone()).collect());
        let value = match &applied.membership {
            Some(m) => Value::Config(m.clone()),
            None if applied.entries.is_empty() => Value::Noop,
            None => value,
        };
        let slot = applied.slot;
        match self.chosen.get(&slot) {
            Some(v) if *v != value => {
                let msg = format!("slot {slot}: replica {node} applied {value:?}, another applied {v:?}");
                self.violate(ViolationKind::Agreement, msg);
                return;
            }
            Some(_) => {}
            None => {
                self.chosen.insert(slot, value);
            }
        }
        let n = self.nodes.get_mut(&node).expect("node");
        if slot != n.sm.last_slot + 1 {
            let msg = format!("replica {node} applied slot {slot} after {}", n.sm.last_slot);
            self.violate(ViolationKind::StateMachine, msg);
            return;
        }
        n.sm.last_slot = slot;
        let mut replies = Vec::new();
        let mut problems = Vec::new();
        for e in applied.entries {
            let key = (e.command.client, e.command.seq);
            let out = if e.duplicate {
                match n.sm.results.get(&key) {
                    Some((o, _)) => *o,
                    None => {
                        problems.push(format!("replica {node}: duplicate {key:?} of an entry never applied"));
                        continue;
                    }
                }
            } else {
                n.sm.positions += 1;
                if e.position != n.sm.positions {
                    problems.push(format!("replica {node}: position {} for entry #{}", e.position, n.sm.positions));
                }
                if n.sm.results.contains_key(&key) {
                    problems.push(format!("replica {node}: {key:?} applied twice"));
                }
                let out = match decode(&e.command.payload) {
                    Some(Op::Append(v)) => {
                        n.sm.values.push(v);
                        n.sm.digest = lin::digest_extend(n.sm.digest, v);
                        LogOutput::Appended { position: n.sm.values.len() as u64 }
                    }
                    Some(Op::Read) => LogOutput::Read { len: n.sm.values.len() as u64, digest: n.sm.digest },
                    None => {
                        problems.push(format!("replica {node}: undecodable entry {key:?}"));
                        continue;
                    }
                };
                n.sm.results.insert(key, (out, slot));
                out
            };
            if let Some(client) = n.waiters.remove(&key) {
                replies.push((client, key, out));
            }
            match self.results.get(&key) {
                Some(o) if *o != out => {
                    problems.push(format!("{key:?}: replica {node} got {out:?}, another {o:?}"));
                }
                Some(_) => {}
                None => {
                    self.results.insert(key, out);
                }
            }
            self.report.entries_applied += 1;
        }
        n.sm.journal.push((slot, n.sm.positions, n.sm.values.len(), n.sm.digest));
        if let Some(meta) = applied.trim {
            // Every replica computes the same trim snapshot at the same slot.
            match self.trims.get(&slot) {
                Some(m) if *m != meta => {
                    problems.push(format!("slot {slot}: replica {node} trims to {meta:?}, another to {m:?}"));
                }
                Some(_) => {}
                None => {
                    self.trims.insert(slot, meta.clone());
                }
            }
            self.nodes.get_mut(&node).expect("node").pending_trim = Some(meta);
        }
        if let Some(p) = problems.into_iter().next() {
            self.violate(ViolationKind::StateMachine, p);
        }
        if let (Some(mark), None) = (self.heal_commit_mark, self.report.recovery_after_heal) {
            if self.chosen.len() > mark {
                self.report.recovery_after_heal = Some(self.now - self.cfg.fault_time);
            }
        }
        for (client, (session, seq), out) in replies {
            self.reply_later(client, session, seq, Reply::Done(out));
        }
    }

    fn final_checks(&mut self) {
        // Every member holds the same log (they all applied up to the leader's commit).
        let members = self
            .nodes
            .values()
            .filter_map(|n| n.replica.as_ref())
            .find(|r| r.role() == Role::Leader)
            .map(|r| r.membership());
        let leader_applied = self
            .nodes
            .values()
            .filter_map(|n| n.replica.as_ref())
            .find(|r| r.role() == Role::Leader)
            .map(|r| r.applied());
        let logs: Vec<(NodeId, Vec<u64>)> = self
            .nodes
            .values()
            .filter(|n| members.as_ref().is_none_or(|m| m.contains(n.id)))
            .map(|n| (n.id, n.sm.values.clone()))
            .collect();
        if let Some(m) = &members {
            for r in self.nodes.values().filter_map(|n| n.replica.as_ref()) {
                if m.contains(r.id()) && Some(r.applied()) == leader_applied && r.membership() != *m {
                    let msg =
                        format!("replica {}'s membership {:?} differs from the leader's {m:?}", r.id(), r.membership());
                    self.violate(ViolationKind::StateMachine, msg);
                    return;
                }
            }
        }
        let reference = logs[0].1.clone();
        for (id, l) in &logs {
            if *l != reference {
                let at = l.iter().zip(&reference).position(|(a, b)| a != b).unwrap_or(l.len().min(reference.len()));
                let msg = format!(
                    "replica {id}'s final log ({} entries) differs from replica {}'s ({} entries) at index {at}",
                    l.len(),
                    logs[0].0,
                    reference.len()
                );
                self.violate(ViolationKind::StateMachine, msg);
                return;
            }
        }
        // Exactly once.
        let mut seen = BTreeSet::new();
        for v in &reference {
            if !seen.insert(*v) {
                self.violate(ViolationKind::LostAck, format!("value {v} appears twice in the log"));
                return;
            }
        }
        // No acknowledged append lost.
        for op in &self.history {
            if let (LogInput::Append { value }, Some(LogOutput::Appended { position })) = (op.input, op.output) {
                self.report.acked_appends += 1;
                let at = reference.get(position as usize - 1).copied();
                if at != Some(value) {
                    let msg =
                        format!("acknowledged append of {value} at position {position}: the log has {at:?} there");
                    self.violate(ViolationKind::LostAck, msg);
                    return;
                }
            }
        }
        // Linearizability. An operation that never returned has an unknown outcome;
        // the final log resolves it: an append found there took effect at the position
        // it holds (its client just never heard), and one not found never took effect
        // (no completed read can have observed it, as every read saw a prefix of the
        // final log); a read that never returned had no effect. Resolving them keeps the
        // search from guessing which lost append filled which gap.
        let index: HashMap<u64, u64> = reference.iter().enumerate().map(|(i, v)| (*v, i as u64 + 1)).collect();
        let end = self.now;
        let history: Vec<Operation<LogInput, LogOutput>> = self
            .history
            .iter()
            .filter_map(|op| match (op.ret, op.input) {
                (Some(_), _) => Some(op.clone()),
                (None, LogInput::Append { value }) => index.get(&value).map(|&position| Operation {
                    ret: Some(end),
                    output: Some(LogOutput::Appended { position }),
                    ..op.clone()
                }),
                (None, LogInput::Read) => None,
            })
            .collect();
        match lin::check::<LogModel>(&history, 50_000_000) {
            lin::CheckResult::Linearizable => {}
            lin::CheckResult::Unknown => {
                self.violate(ViolationKind::Linearizability, "checker ran out of budget".into());
            }
            r @ lin::CheckResult::NotLinearizable { .. } => {
                self.violate(ViolationKind::Linearizability, r.to_string());
            }
        }
    }

    // ---- clients -------------------------------------------------------------------

    fn client_start(&mut self, client: usize) {
        if self.clients[client].op.is_some() {
            return;
        }
        if self.now >= self.cfg.fault_time + self.cfg.client_time {
            return; // done
        }
        let read = self.rng.chance(self.cfg.read_ratio);
        let c = &mut self.clients[client];
        c.seq += 1;
        let seq = c.seq;
        let input = if read {
            LogInput::Read
        } else {
            let v = self.next_value;
            self.next_value += 1;
            LogInput::Append { value: v }
        };
        let session = c.session;
        self.history.push(Operation { client: session, call: self.now, ret: None, input, output: None });
        let hist = self.history.len() - 1;
        let direct = read && self.rng.chance(0.5);
        self.clients[client].op = Some(ClientOp { hist, seq, input, attempt: 0, direct });
        self.client_send(client);
    }

    fn pick_target(&mut self, client: usize) -> NodeId {
        match self.clients[client].leader_hint {
            Some(l) => l,
            None => self.voters[self.rng.below(self.voters.len() as u64) as usize],
        }
    }

    fn client_send(&mut self, client: usize) {
        let mut node = self.pick_target(client);
        // A direct read sometimes goes to a replica picked at random (a client with
        // stale leader information): a replica that wrongly believes it still leads
        // must not answer it with stale data.
        if self.clients[client].op.as_ref().is_some_and(|o| o.direct) && self.rng.chance(0.5) {
            node = self.voters[self.rng.below(self.voters.len() as u64) as usize];
        }
        let c = &mut self.clients[client];
        let op = c.op.as_mut().expect("op");
        op.attempt += 1;
        let payload = encode(op.input);
        let cmd = Command { client: c.session, seq: op.seq, payload };
        let (seq, attempt, direct, session) = (op.seq, op.attempt, op.direct, c.session);
        let d = self.client_delay();
        if direct {
            self.schedule(self.now + d, Event::ClientReadArrive { client, node, session, seq });
        } else {
            self.schedule(self.now + d, Event::ClientArrive { client, node, cmd });
        }
        self.schedule(self.now + CLIENT_TIMEOUT, Event::ClientTimeout { client, seq, attempt });
    }

    fn client_read_arrive(&mut self, client: usize, node: NodeId, session: u64, seq: u64) {
        let attempt = self.clients[client].op.as_ref().map_or(0, |o| o.attempt);
        let local = self.local_time(node);
        self.next_read_id += 1;
        let id = self.next_read_id;
        let n = self.nodes.get_mut(&node).expect("node");
        let Some(r) = n.replica.as_mut() else { return };
        match r.read(local, id) {
            Ok(()) => {
                n.read_waiters.insert(id, (client, session, seq));
                self.after(node);
            }
            Err(ProposeError::NotLeader { leader }) => {
                self.reply_at(client, session, seq, attempt, Reply::Redirect(leader))
            }
            Err(_) => self.reply_at(client, session, seq, attempt, Reply::Retry),
        }
    }

    fn client_arrive(&mut self, client: usize, node: NodeId, cmd: Command) {
        let attempt = self.clients[client].op.as_ref().map_or(0, |o| o.attempt);
        let key = (cmd.client, cmd.seq);
        let local = self.local_time(node);
        let n = self.nodes.get_mut(&node).expect("node");
        let Some(r) = n.replica.as_mut() else { return };
        let reply = if let Some((out, _)) = n.sm.results.get(&key).copied() {
            Some(Reply::Done(out))
        } else {
            match r.propose(local, vec![cmd]) {
                Ok(()) => {
                    n.waiters.insert(key, client);
                    None
                }
                Err(ProposeError::NotLeader { leader }) => Some(Reply::Redirect(leader)),
                Err(ProposeError::Busy) | Err(ProposeError::Transferring { .. }) => Some(Reply::Retry),
                Err(ProposeError::Stopped) => return,
            }
        };
        match reply {
            Some(reply) => self.reply_at(client, key.0, key.1, attempt, reply),
            None => self.after(node),
        }
    }

    fn reply_later(&mut self, client: usize, session: u64, seq: u64, reply: Reply) {
        let attempt = self.clients[client].op.as_ref().map_or(0, |o| o.attempt);
        self.reply_at(client, session, seq, attempt, reply);
    }

    fn reply_at(&mut self, client: usize, session: u64, seq: u64, attempt: u32, reply: Reply) {
        let d = self.client_delay();
        self.schedule(self.now + d, Event::ClientReply { client, session, seq, attempt, reply });
    }

    fn client_reply(&mut self, client: usize, session: u64, seq: u64, attempt: u32, reply: Reply) {
        let c = &mut self.clients[client];
        let Some(op) = c.op.as_ref() else { return };
        if op.seq != seq || c.session != session {
            return;
        }
        match reply {
            Reply::Done(out) => {
                let h = &mut self.history[op.hist];
                h.ret = Some(self.now);
                h.output = Some(out);
                c.op = None;
                let think = self.rng.range(0, 3) * MS;
                self.schedule(self.now + think, Event::ClientStart { client });
            }
            Reply::Redirect(hint) if attempt == op.attempt => {
                c.leader_hint = hint;
                let backoff = if hint.is_some() { 0 } else { 5 * MS };
                let at = self.now + backoff;
                self.resend_at(client, at);
            }
            Reply::Retry if attempt == op.attempt => {
                c.leader_hint = None;
                let at = self.now + 5 * MS;
                self.resend_at(client, at);
            }
            _ => {}
        }
    }

    fn resend_at(&mut self, client: usize, at: Nanos) {
        if at == self.now {
            self.client_send(client);
        } else {
            let op = self.clients[client].op.as_mut().expect("op");
            op.attempt += 1;
            let (seq, attempt) = (op.seq, op.attempt);
            self.schedule(at, Event::ClientResend { client, seq, attempt });
        }
    }

    fn client_resend(&mut self, client: usize, seq: u64, attempt: u32) {
        let Some(op) = self.clients[client].op.as_ref() else {
            return;
        };
        if op.seq == seq && op.attempt == attempt {
            self.client_send(client);
        }
    }

    fn client_timeout(&mut self, client: usize, seq: u64, attempt: u32) {
        let give_up = self.cfg.give_up;
        let roll = self.rng.chance(give_up);
        let c = &mut self.clients[client];
        let Some(op) = c.op.as_ref() else { return };
        if op.seq != seq || op.attempt != attempt {
            return;
        }
        if roll && !self.healed {
            // The client gives up: the outcome stays unknown; it continues as a new session.
            c.op = None;
            c.session = self.next_session;
            c.seq = 0;
            self.next_session += 1;
            self.schedule(self.now + MS, Event::ClientStart { client });
            return;
        }
        c.leader_hint = None;
        self.client_send(client);
    }
}

enum Op {
    Append(u64),
    Read,
}

fn encode(input: LogInput) -> Bytes {
    match input {
        LogInput::Append { value } => {
            let mut b = vec![b'A'];
            b.extend_from_slice(&value.to_le_bytes());
            Bytes::from(b)
        }
        LogInput::Read => Bytes::from_static(b"R"),
    }
}

fn decode(b: &[u8]) -> Option<Op> {
    match b.first()? {
        b'A' if b.len() == 9 => Some(Op::Append(u64::from_le_bytes(b[1..9].try_into().ok()?))),
        b'R' if b.len() == 1 => Some(Op::Read),
        _ => None,
    }
}
