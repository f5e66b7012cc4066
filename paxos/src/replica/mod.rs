//! The replica: one member's protocol state machine.
//!
//! Inputs are the `handle_*` methods and [`Replica::propose`]; outputs are drained
//! with [`Replica::poll_action`] after [`Replica::flush`]; [`Replica::poll_timeout`]
//! says when the replica next wants [`Replica::handle_timeout`]. Time is always an
//! argument. See the crate docs for the driver loop.
//!
//! The code is split by concern: `election.rs` (pre-vote, phase 1, value adoption,
//! check-quorum), `replication.rs` (phase 2, acknowledgements, commit, catch-up,
//! heartbeats), `apply.rs` (in-order apply exactly once with client de-duplication).

mod apply;
mod election;
mod membership;
mod reads;
mod replication;
mod snapshot;

use crate::config::{Config, ConfigError};
use crate::contracts::{ensure, invariant, require};
use crate::message::{Message, ReadRequest, ReadResult, WriteRequest, WriteResult};
use crate::rng::Rng;
use crate::storage::{Storage, StorageError};
use crate::types::{Ballot, Command, Entry, Membership, Nanos, NodeId, Position, Slot};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

pub use apply::{Applied, AppliedEntry};
pub use membership::MembershipError;
pub use snapshot::SnapshotMeta;

/// A replica's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Accepts writes from the permission holder; waits for heartbeats.
    Follower,
    /// Asking voters whether an election could succeed (changes nothing at them).
    PreCandidate,
    /// Running phase 1 (promises, then remote reads of the promisers' log tails).
    Candidate,
    /// Proposing and replicating.
    Leader,
    /// A non-voting member: receives the log, never votes or leads.
    Learner,
}

/// An output of the core, to be executed by the driver in the order given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send a control-plane message.
    Send {
        /// Destination.
        to: NodeId,
        /// The message.
        msg: Message,
    },
    /// Write into `to`'s log region (one-sided). Completes with
    /// [`Replica::handle_write_completion`]; may never complete if the link fails, in
    /// which case the core re-sends after `retransmit_timeout`.
    RemoteWrite {
        /// Target replica.
        to: NodeId,
        /// What to write.
        req: WriteRequest,
    },
    /// Read `to`'s log tail (one-sided). Completes with
    /// [`Replica::handle_read_completion`].
    RemoteRead {
        /// Target replica.
        to: NodeId,
        /// What to read.
        req: ReadRequest,
    },
    /// Agent side: report to `to` how its remote write into this replica ended.
    WriteCompletion {
        /// The writer.
        to: NodeId,
        /// The outcome.
        result: WriteResult,
    },
    /// Agent side: return the data of `to`'s remote read of this replica's log.
    ReadCompletion {
        /// The reader.
        to: NodeId,
        /// The data.
        result: ReadResult,
    },
    /// Let `to` write this replica's log region under `ballot` (RDMA: open the queue
    /// pair's remote-write access). Exactly one writer holds permission at a time.
    GrantWrite {
        /// The new permission holder.
        to: NodeId,
        /// Its ballot.
        ballot: Ballot,
    },
    /// Take write permission away from `from` (RDMA: close remote-write access, cycling
    /// the queue pair through reset if modifying fails). Later writes fail.
    RevokeWrite {
        /// The former holder.
        from: NodeId,
    },
    /// Only with [`Config::accept_on_landing`]: the promise is about to rise while
    /// `holder` may have writes in this replica's region that the writer already counts
    /// as accepted. The driver takes write permission away from `holder` (as for
    /// [`Action::RevokeWrite`]), hands every write that landed before that to
    /// [`Replica::handle_remote_write`] in the order they landed, then calls
    /// [`Replica::fence_done`]. The replica defers whatever would raise its promise
    /// (a Prepare, a newer leader's heartbeat, its own candidacy) until then; after it,
    /// permission goes to the new promise's owner, or back to `holder` if the promise
    /// did not rise.
    Fence {
        /// The permission holder to fence.
        holder: NodeId,
    },
    /// A chosen slot, delivered exactly once and in slot order.
    Apply(Applied),
    /// Proposals that will not be committed by this replica (it stopped leading before
    /// they got a slot). Their clients should retry at the new leader.
    Aborted(Vec<Command>),
    /// The linearizable read `id` may be served now: this replica has applied every
    /// slot up to `index`, and was the leader when the read arrived (confirmed by its
    /// lease or by a quorum round).
    ReadReady {
        /// The read's id, as passed to [`Replica::read`].
        id: u64,
        /// The read index: the state after applying slot `index` is linearizable.
        index: Slot,
    },
    /// Linearizable reads that will not complete here (this replica stopped leading).
    ReadsAborted(Vec<u64>),
    /// Replica `to` needs log slots this replica has trimmed (a leader's follower, or a
    /// pre-candidate behind our trim point): send it the latest snapshot (in chunks);
    /// it then calls [`Replica::install_snapshot`]. A leader repeats it at most once per
    /// election timeout while the follower stays behind.
    SendSnapshot {
        /// The follower.
        to: NodeId,
    },
    /// The role, ballot or known leader changed.
    RoleChanged {
        /// The new role.
        role: Role,
        /// The current promise.
        ballot: Ballot,
        /// The leader, if known.
        leader: Option<NodeId>,
    },
}

/// A leader's view of one follower, for status and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerProgress {
    /// The follower.
    pub id: NodeId,
    /// Whether it votes.
    pub voter: bool,
    /// Highest slot it acknowledged contiguously.
    pub matched: Slot,
    /// Next slot to send it.
    pub next: Slot,
    /// When it was last heard from (the replica's clock).
    pub last_heard: Option<Nanos>,
}

/// A fatal error: the replica stops (it never acknowledges what may not be durable).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The storage failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// The replica stopped earlier after a fatal error.
    #[error("replica stopped after an earlier fatal error: {0}")]
    Stopped(String),
}

/// Why a leadership transfer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    /// This replica is not the leader.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The known leader, if any.
        leader: Option<NodeId>,
    },
    /// The target is not a voting member.
    #[error("replica {0} is not a voter")]
    NotVoter(NodeId),
    /// There is no other voter to hand leadership to.
    #[error("no other voter to hand leadership to")]
    NoCandidate,
    /// The replica stopped after a fatal error.
    #[error("replica stopped")]
    Stopped,
}

/// Why a proposal was refused (nothing was done with it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// This replica is not the leader; `leader` is the one it knows of.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The known leader, if any.
        leader: Option<NodeId>,
    },
    /// Too many proposals are waiting; retry later.
    #[error("busy: too many pending entries")]
    Busy,
    /// Leadership is being handed to `to`; retry shortly (at the new leader).
    #[error("leadership transfer to {to} in progress")]
    Transferring {
        /// The transfer's target.
        to: NodeId,
    },
    /// The replica stopped after a fatal error.
    #[error("replica stopped")]
    Stopped,
}

/// A fence asked of the driver ([`Action::Fence`]) and what waits for it.
#[derive(Debug)]
struct FenceState {
    /// The promise when the fence was asked.
    at: Ballot,
    /// Messages that would raise the promise, in arrival order.
    stash: Vec<(NodeId, Message)>,
    /// An election to start afterwards (`Some(transfer)`).
    election: Option<bool>,
}

/// Phase-1 state of a pre-candidate.
#[derive(Debug)]
struct PreVoteState {
    round: u64,
    granted: BTreeSet<NodeId>,
    /// Per-message count (only used by the planted `DoubleCountVote` bug).
    #[allow(dead_code)]
    granted_msgs: usize,
}

/// Phase-1 state of a candidate.
#[derive(Debug)]
struct CandidateState {
    ballot: Ballot,
    /// First slot whose value is to be adopted (our chosen prefix + 1).
    from: Slot,
    /// Promisers and the log tails they reported: id -> (chosen, last).
    promised: BTreeMap<NodeId, (Slot, Slot)>,
    /// Promisers whose tail has been read (self included), with the entries read.
    read: BTreeMap<NodeId, Vec<Entry>>,
    /// Promisers whose tail is being read in parts: the next slot to read, and the
    /// entries so far.
    partial: BTreeMap<NodeId, (Slot, Vec<Entry>)>,
    /// The membership in force at `from` (as of this replica's applied prefix).
    stage: Membership,
    /// Memberships by the first slot they govern, as the adopted values change them
    /// (slots past a chosen change belong to the new membership, so their values must
    /// be read from a quorum of it too).
    configs: BTreeMap<Slot, Membership>,
    /// Voters of later memberships asked to promise.
    asked: BTreeSet<NodeId>,
    /// Message counters for the planted `DoubleCountVote` bug.
    #[allow(dead_code)]
    promise_msgs: usize,
    #[allow(dead_code)]
    read_msgs: usize,
}

/// A leader's view of one follower's log.
#[derive(Debug, Clone)]
struct Progress {
    voter: bool,
    /// Next slot to write to this follower.
    next: Slot,
    /// Every slot up to `base` is chosen at the follower with the right value (as it
    /// reported), and every slot in `base+1..=matched` acknowledged under our ballot.
    base: Slot,
    /// Highest slot acknowledged contiguously (see `base`).
    matched: Slot,
    /// Acknowledged slot ranges above `matched` (start -> end), not yet contiguous.
    acked: BTreeMap<Slot, Slot>,
    /// When we last heard anything from this follower.
    last_heard: Option<Nanos>,
    /// When `matched` last advanced (or writes were last (re)started).
    last_progress: Nanos,
    /// The highest commit index sent to this follower (on a write or heartbeat).
    commit_sent: Slot,
    /// The highest heartbeat round it acknowledged, and when we sent that round.
    acked_seq: u64,
    acked_sent_at: Option<Nanos>,
    /// When a snapshot was last asked for on this follower's behalf.
    snapshot_sent: Option<Nanos>,
}

/// A leader's state.
#[derive(Debug)]
struct LeaderState {
    ballot: Ballot,
    /// The next free slot.
    next_slot: Slot,
    /// Everything up to `commit` is chosen.
    commit: Slot,
    pending: VecDeque<Command>,
    peers: BTreeMap<NodeId, Progress>,
    heartbeat_due: Nanos,
    quorum_check_due: Nanos,
    /// The commit index advanced since followers were last told: at this time, tell
    /// those that no write carried it meanwhile (see `Config::commit_notify_delay`).
    commit_notify_at: Option<Nanos>,
    /// A leadership transfer in progress: the target, when to give up, and whether
    /// `TimeoutNow` was sent. No new slot is opened meanwhile.
    transfer: Option<Transfer>,
    /// A transfer was attempted under this ballot: its target's Prepare bypasses the
    /// voters' leases, so lease reads are off for the rest of the ballot.
    transfer_attempted: bool,
    /// The last heartbeat round sent, and when recent rounds were sent.
    hb_seq: u64,
    hb_sent: VecDeque<(u64, Nanos)>,
    /// Linearizable reads waiting for confirmation and apply.
    reads: VecDeque<reads::PendingRead>,
    /// The last slot adopted in phase 1: reads wait until it is committed.
    term_start: Slot,
    /// Every slot up to here is durable in this leader's own storage: its own vote
    /// counts for these only.
    synced: Slot,
    /// Memberships by the first slot they govern (the one in force at the commit index,
    /// and the one after a membership change not yet committed).
    configs: BTreeMap<Slot, Membership>,
    /// The slot of a membership change not yet committed: no slot is opened after it
    /// until it is.
    config_slot: Option<Slot>,
    /// A membership change asked for, waiting for its slot.
    pending_config: Option<Membership>,
    /// The voter last asked to take over from this leader after its removal.
    last_handover: Option<NodeId>,
    /// A log-service trim asked for, waiting for its slot.
    pending_trim: Option<Position>,
}

/// A leadership transfer in progress.
#[derive(Debug, Clone, Copy)]
struct Transfer {
    to: NodeId,
    deadline: Nanos,
    sent: bool,
}

/// One member's Multi-Paxos state machine. Generic over its [`Storage`].
pub struct Replica<S: Storage> {
    cfg: Config,
    storage: S,
    rng: Rng,
    role: Role,
    /// Cached `storage.promise()`.
    promised: Ballot,
    /// Highest round seen in any ballot (to pick the next one).
    max_round: u64,
    /// The leader we follow (the owner of `promised` once it has shown liveness).
    leader: Option<NodeId>,
    /// When we last heard from `leader` (leader lease for stickiness).
    leader_contact: Option<Nanos>,
    /// When the candidate we promised last showed progress (it prepared or read our
    /// tail): while recent, we do not help start another election.
    candidate_contact: Option<Nanos>,
    /// After a restart, the replica helps no election before this time: it may have
    /// acknowledged a leader's heartbeat just before crashing, and that leader's read
    /// lease counts on it.
    boot_lease_until: Nanos,
    /// When to start (or restart) an election.
    election_deadline: Nanos,
    /// Latest commit index heard, and the ballot of the leader that sent it.
    known_commit: (Ballot, Slot),
    /// Every slot up to `chosen` is chosen and present in storage with its chosen value.
    chosen: Slot,
    /// Every slot up to `applied` has been delivered by [`Action::Apply`].
    applied: Slot,
    /// Client de-duplication and positions.
    apply_state: apply::ApplyState,
    /// The core's state at the last snapshot this replica restored, installed or
    /// trimmed to ([`Replica::compact_to`]): log-service trims replay from it.
    base: SnapshotMeta,
    pre: Option<PreVoteState>,
    cand: Option<CandidateState>,
    lead: Option<LeaderState>,
    /// A fence in progress (acceptance by landing).
    fence: Option<FenceState>,
    /// The promise under which the last fence completed: its owner can no longer
    /// write, and what it wrote was handed over, so the promise may rise.
    fenced: Option<Ballot>,
    /// Actions released to the driver.
    out: VecDeque<Action>,
    /// Actions waiting for the next storage sync (everything emitted after a write).
    staged: Vec<Action>,
    /// Storage has writes not yet covered by a sync.
    dirty: bool,
    stopped: Option<String>,
    now: Nanos,
}

impl<S: Storage> Replica<S> {
    /// Starts (or restarts) a replica on `storage`, as a follower (or learner), with no
    /// snapshot.
    pub fn new(cfg: Config, storage: S, now: Nanos) -> Result<Self, Error> {
        Self::restore(cfg, storage, now, SnapshotMeta::default())
    }

    /// Restarts a replica from the application's latest snapshot (`snap`, whose state
    /// the application has loaded) and `storage`. Slots up to `snap.slot` are applied;
    /// later ones the storage knows chosen are applied again.
    pub fn restore(mut cfg: Config, mut storage: S, now: Nanos, snap: SnapshotMeta) -> Result<Self, Error> {
        if snap.membership.is_valid() {
            // The membership the snapshot's prefix ended with is the one in force.
            cfg.voters = snap.membership.voters.clone();
            cfg.learners = snap.membership.learners.clone();
            cfg.addrs = snap.membership.addrs.clone();
        }
        cfg.validate()?;
        if snap.slot > 0 {
            // The snapshot is durable: entries it covers are not needed.
            storage.trim(snap.slot)?;
        }
        let promised = storage.promise();
        let role = if cfg.is_voter() { Role::Follower } else { Role::Learner };
        let mut r = Replica {
            rng: Rng::new(cfg.seed ^ 0x005e_ed0f_4e91_1ca5),
            cfg,
            storage,
            role,
            promised,
            max_round: promised.round,
            leader: None,
            leader_contact: None,
            candidate_contact: None,
            boot_lease_until: 0,
            election_deadline: 0,
            known_commit: (Ballot::ZERO, 0),
            chosen: snap.slot,
            applied: snap.slot,
            apply_state: apply::ApplyState::restore(&snap),
            base: snap,
            pre: None,
            cand: None,
            lead: None,
            fence: None,
            fenced: None,
            out: VecDeque::new(),
            staged: Vec::new(),
            dirty: false,
            stopped: None,
            now,
        };
        // Slots a previous life knew chosen are chosen (the hint never outlives the
        // entries it covers): apply them again without waiting for a leader.
        // (Unless entries above the snapshot were trimmed: a newer snapshot was lost;
        // the leader will send one.)
        if r.storage.trimmed() <= r.base.slot {
            r.chosen = r.chosen.max(r.storage.chosen_hint().min(r.storage.last_slot()));
        }
        if !r.base.membership.is_valid() {
            // Spelled out, so that trims replaying from here agree with the others.
            r.base.membership = r.cfg.membership();
        }
        r.apply_ready()?;
        if !promised.is_zero() {
            r.boot_lease_until = now + r.cfg.election_timeout;
        }
        // After a restart the permission holder is the owner of the persisted promise.
        if !promised.is_zero() && promised.node != r.cfg.id {
            r.emit(Action::GrantWrite { to: promised.node, ballot: promised });
        }
        r.reset_election_timer(now);
        r.check_invariants();
        Ok(r)
    }

    // ---- getters -------------------------------------------------------------------

    /// This replica's id.
    pub fn id(&self) -> NodeId {
        self.cfg.id
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The current role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The highest ballot promised.
    pub fn promised(&self) -> Ballot {
        self.promised
    }

    /// The leader this replica knows of (itself when leading).
    pub fn leader(&self) -> Option<NodeId> {
        if self.role == Role::Leader {
            Some(self.cfg.id)
        } else {
            self.leader
        }
    }

    /// Every slot up to this one is known chosen here.
    pub fn chosen(&self) -> Slot {
        self.chosen
    }

    /// Every slot up to this one has been applied (delivered as [`Action::Apply`]).
    pub fn applied(&self) -> Slot {
        self.applied
    }

    /// The number of client entries applied (the last position handed out).
    pub fn applied_position(&self) -> Position {
        self.apply_state.last_position()
    }

    /// Read access to the storage.
    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// The fatal error that stopped this replica, if any.
    pub fn stopped(&self) -> Option<&str> {
        self.stopped.as_deref()
    }

    /// Client entries waiting at the leader for a slot.
    pub fn pending_len(&self) -> usize {
        self.lead.as_ref().map_or(0, |l| l.pending.len())
    }

    /// On a leader, each follower's replication progress (empty otherwise).
    pub fn peer_progress(&self) -> Vec<PeerProgress> {
        let Some(l) = &self.lead else {
            return Vec::new();
        };
        l.peers
            .iter()
            .map(|(&id, p)| PeerProgress {
                id,
                voter: p.voter,
                matched: p.matched,
                next: p.next,
                last_heard: p.last_heard,
            })
            .collect()
    }

    /// The leader's commit index, or this replica's chosen prefix when not leading.
    pub fn commit_index(&self) -> Slot {
        self.lead.as_ref().map_or(self.chosen, |l| l.commit)
    }

    /// A one-line dump of the protocol state, for debugging and failure reports.
    pub fn debug_state(&self) -> String {
        let mut s = format!(
            "id={} role={:?} promised={:?} leader={:?} chosen={} applied={} last={} known_commit={:?}",
            self.cfg.id,
            self.role,
            self.promised,
            self.leader,
            self.chosen,
            self.applied,
            self.storage.last_slot(),
            self.known_commit
        );
        if let Some(l) = &self.lead {
            s += &format!(" commit={} next_slot={} pending={}", l.commit, l.next_slot, l.pending.len());
            for (id, p) in &l.peers {
                s += &format!(
                    " [{id}: next={} base={} matched={} acked={:?} heard={:?}]",
                    p.next, p.base, p.matched, p.acked, p.last_heard
                );
            }
        }
        s
    }

    // ---- inputs --------------------------------------------------------------------

    /// A control-plane message arrived from `from`.
    pub fn handle_message(&mut self, now: Nanos, from: NodeId, msg: Message) -> Result<(), Error> {
        self.enter(now)?;
        if !self.is_member(from) || from == self.cfg.id {
            return Ok(()); // unknown peers are ignored (the transport should have refused them)
        }
        let r = self.dispatch(from, msg);
        self.leave(r)
    }

    fn dispatch(&mut self, from: NodeId, msg: Message) -> Result<(), Error> {
        match msg {
            Message::PreVote { round, chosen } => self.on_pre_vote(from, round, chosen),
            Message::PreVoteReply { round, granted } => self.on_pre_vote_reply(from, round, granted),
            Message::Prepare { ballot, transfer } => self.on_prepare(from, ballot, transfer),
            Message::TimeoutNow { ballot } => self.on_timeout_now(from, ballot),
            Message::Promise { ballot, chosen, last, trimmed } => self.on_promise(from, ballot, chosen, last, trimmed),
            Message::Reject { ballot, promised } => self.on_reject(from, ballot, promised),
            Message::Heartbeat { ballot, commit, seq } => self.on_heartbeat(from, ballot, commit, seq),
            Message::HeartbeatReply { ballot, chosen, last, seq } => {
                self.on_heartbeat_reply(from, ballot, chosen, last, seq)
            }
        }
    }

    /// The driver finished the fence asked by [`Action::Fence`]: the holder can no
    /// longer write here, and every write of it that landed was handed to
    /// [`Replica::handle_remote_write`]. What waited for the fence runs now.
    pub fn fence_done(&mut self, now: Nanos) -> Result<(), Error> {
        self.enter(now)?;
        let r = self.on_fence_done();
        self.leave(r)
    }

    /// Agent side: `from` wrote into this replica's log (one-sided write). Checks write
    /// permission, accepts the values, and emits a [`Action::WriteCompletion`] that is
    /// released only after the storage sync covering the write.
    pub fn handle_remote_write(&mut self, now: Nanos, from: NodeId, req: WriteRequest) -> Result<(), Error> {
        self.enter(now)?;
        if !self.is_member(from) || from == self.cfg.id {
            // Still answer (every access completes), but never accept.
            let result = WriteResult::Denied { ballot: req.ballot, promised: Some(self.promised) };
            self.emit(Action::WriteCompletion { to: from, result });
            return Ok(());
        }
        let r = self.on_remote_write(from, req);
        self.leave(r)
    }

    /// Agent side: `from` reads this replica's log tail (one-sided read).
    pub fn handle_remote_read(&mut self, now: Nanos, from: NodeId, req: ReadRequest) -> Result<(), Error> {
        self.enter(now)?;
        if !self.is_member(from) || from == self.cfg.id {
            // Still answer (every access completes), with nothing.
            let result =
                ReadResult { ballot: req.ballot, from: req.from, to: req.from.saturating_sub(1), entries: Vec::new() };
            self.emit(Action::ReadCompletion { to: from, result });
            return Ok(());
        }
        let r = self.on_remote_read(from, req);
        self.leave(r)
    }

    /// A remote write this replica issued to `from` completed.
    pub fn handle_write_completion(&mut self, now: Nanos, from: NodeId, result: WriteResult) -> Result<(), Error> {
        self.enter(now)?;
        if !self.is_member(from) {
            return Ok(());
        }
        let r = self.on_write_completion(from, result);
        self.leave(r)
    }

    /// A remote read this replica issued to `from` completed.
    pub fn handle_read_completion(&mut self, now: Nanos, from: NodeId, result: ReadResult) -> Result<(), Error> {
        self.enter(now)?;
        if !self.is_member(from) {
            return Ok(());
        }
        let r = self.on_read_completion(from, result);
        self.leave(r)
    }

    /// Time passed: run whatever timers are due (call at [`Replica::poll_timeout`]).
    pub fn handle_timeout(&mut self, now: Nanos) -> Result<(), Error> {
        self.enter(now)?;
        let r = self.on_timeout();
        self.leave(r)
    }

    /// Proposes client entries. On a leader they are queued, batched into slots and
    /// replicated; each is delivered in an [`Action::Apply`] once chosen.
    pub fn propose(&mut self, now: Nanos, cmds: Vec<Command>) -> Result<(), ProposeError> {
        if self.stopped.is_some() {
            return Err(ProposeError::Stopped);
        }
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader { leader: self.leader });
        }
        let max = self.cfg.max_pending_entries;
        let lead = self.lead.as_mut().expect("leader state");
        if let Some(t) = lead.transfer {
            return Err(ProposeError::Transferring { to: t.to });
        }
        if lead.pending.len() + cmds.len() > max && !lead.pending.is_empty() {
            return Err(ProposeError::Busy);
        }
        lead.pending.extend(cmds);
        if self.enter(now).is_err() {
            return Err(ProposeError::Stopped);
        }
        let r = self.fill_slots().and_then(|_| self.send_writes_all()).and_then(|_| self.try_advance_commit());
        self.leave(r).map_err(|_| ProposeError::Stopped)
    }

    /// Proposes a trim of the log service's prefix: every replica drops the slots whose
    /// client entries all lie at positions up to `position` (rounded down to a slot
    /// boundary), behind a snapshot of the core's state there (see
    /// [`Applied::trim`](crate::Applied)). Only for a log whose application keeps no
    /// state of its own beyond the log: an application with a state machine snapshots
    /// it instead ([`Replica::compact`]). A trim already waiting is raised to the
    /// larger position.
    pub fn propose_trim(&mut self, now: Nanos, position: Position) -> Result<(), ProposeError> {
        if self.stopped.is_some() {
            return Err(ProposeError::Stopped);
        }
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader { leader: self.leader });
        }
        let lead = self.lead.as_mut().expect("leader state");
        if let Some(t) = lead.transfer {
            return Err(ProposeError::Transferring { to: t.to });
        }
        lead.pending_trim = Some(lead.pending_trim.map_or(position, |p| p.max(position)));
        if self.enter(now).is_err() {
            return Err(ProposeError::Stopped);
        }
        let r = self.fill_slots().and_then(|_| self.send_writes_all()).and_then(|_| self.try_advance_commit());
        self.leave(r).map_err(|_| ProposeError::Stopped)
    }

    /// Asks for a linearizable read with this `id`. On a leader it completes with
    /// [`Action::ReadReady`] once leadership is confirmed (at once under the read lease,
    /// else by a heartbeat round a quorum acknowledges) and every slot up to the read
    /// index is applied; with [`Action::ReadsAborted`] if it stops leading first.
    pub fn read(&mut self, now: Nanos, id: u64) -> Result<(), ProposeError> {
        if self.stopped.is_some() {
            return Err(ProposeError::Stopped);
        }
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader { leader: self.leader });
        }
        if self.enter(now).is_err() {
            return Err(ProposeError::Stopped);
        }
        let r = self.start_read(id);
        self.leave(r).map_err(|_| ProposeError::Stopped)
    }

    /// Whether a follower may serve a read of its applied prefix that is at most
    /// `max_staleness` behind: it heard its leader within that time. Reads served this
    /// way are not linearizable; they reflect the log as of at most `max_staleness` ago
    /// (plus clock drift).
    pub fn can_serve_stale_read(&self, now: Nanos, max_staleness: Nanos) -> bool {
        match self.role {
            Role::Leader => true,
            Role::Follower | Role::Learner => {
                self.leader.is_some() && self.leader_contact.is_some_and(|t| now <= t + max_staleness)
            }
            _ => false,
        }
    }

    /// Hands leadership to the voter `to`: stops opening slots, waits until `to` holds
    /// every slot, then tells it to start an election at once (`TimeoutNow`); its
    /// Prepare carries the transfer flag, so replicas (this one included) answer it
    /// despite their leader lease. Gives up after an election timeout if `to` does not
    /// take over (it may be down, or may not be allowed to lead), and leads on.
    pub fn transfer_leadership(&mut self, now: Nanos, to: NodeId) -> Result<(), TransferError> {
        if self.stopped.is_some() {
            return Err(TransferError::Stopped);
        }
        if self.role != Role::Leader {
            return Err(TransferError::NotLeader { leader: self.leader });
        }
        if to == self.cfg.id {
            return Ok(());
        }
        if !self.cfg.voters.contains(&to) {
            return Err(TransferError::NotVoter(to));
        }
        if self.enter(now).is_err() {
            return Err(TransferError::Stopped);
        }
        let deadline = self.now + self.cfg.election_timeout;
        let l = self.lead.as_mut().expect("leader state");
        l.transfer = Some(Transfer { to, deadline, sent: false });
        l.transfer_attempted = true;
        let r = self.send_writes(to).and_then(|_| self.check_transfer());
        self.leave(r).map_err(|_| TransferError::Stopped)
    }

    /// Steps down in favour of the most caught-up other voter (a leadership transfer).
    pub fn step_down(&mut self, now: Nanos) -> Result<(), TransferError> {
        if self.role != Role::Leader {
            return Err(TransferError::NotLeader { leader: self.leader });
        }
        let l = self.lead.as_ref().expect("leader state");
        let best = l.peers.iter().filter(|(_, p)| p.voter).max_by_key(|(id, p)| (p.matched, p.last_heard, **id));
        match best {
            Some((&to, _)) => self.transfer_leadership(now, to),
            None => Err(TransferError::NoCandidate),
        }
    }

    /// Allows or forbids this replica to lead from now on (an application may veto
    /// leadership). A leader that may no longer lead steps down.
    pub fn set_can_lead(&mut self, now: Nanos, can_lead: bool) {
        self.cfg.can_lead = can_lead;
        if !can_lead && self.role == Role::Leader {
            let _ = self.step_down(now);
        }
        if !can_lead && matches!(self.role, Role::PreCandidate | Role::Candidate) && self.enter(now).is_ok() {
            self.become_follower(None);
        }
    }

    /// The target of the leadership transfer in progress, if any.
    pub fn transferring_to(&self) -> Option<NodeId> {
        self.lead.as_ref().and_then(|l| l.transfer.map(|t| t.to))
    }

    // ---- outputs -------------------------------------------------------------------

    /// Makes every storage write so far durable, then releases the actions that waited
    /// for it. Call after feeding a batch of inputs (one sync covers them all: group
    /// commit), before draining [`Replica::poll_action`].
    pub fn flush(&mut self) -> Result<(), Error> {
        if let Some(why) = &self.stopped {
            return Err(Error::Stopped(why.clone()));
        }
        if self.dirty {
            if let Err(e) = self.storage.sync() {
                return self.leave(Err(e.into()));
            }
            self.dirty = false;
        }
        self.out.extend(self.staged.drain(..));
        // A leader's own acceptances are durable now: its vote counts for them.
        if let Some(l) = self.lead.as_mut() {
            if l.synced + 1 < l.next_slot {
                l.synced = l.next_slot - 1;
                let r = self.try_advance_commit();
                return self.leave(r);
            }
        }
        Ok(())
    }

    /// Whether [`Replica::flush`] has work: unsynced writes or actions waiting for them.
    pub fn needs_flush(&self) -> bool {
        self.dirty || !self.staged.is_empty()
    }

    /// The next released action, in order. Actions emitted after a storage write are
    /// released by [`Replica::flush`].
    pub fn poll_action(&mut self) -> Option<Action> {
        self.out.pop_front()
    }

    /// When the replica next needs [`Replica::handle_timeout`] (absolute time).
    pub fn poll_timeout(&self) -> Option<Nanos> {
        if self.stopped.is_some() {
            return None;
        }
        match self.role {
            Role::Learner => None,
            Role::Leader => {
                let l = self.lead.as_ref().expect("leader state");
                let due = l.heartbeat_due.min(l.quorum_check_due);
                Some(l.commit_notify_at.map_or(due, |t| t.min(due)))
            }
            Role::Follower if !self.cfg.can_lead => None,
            _ => Some(self.election_deadline),
        }
    }

    // ---- plumbing ------------------------------------------------------------------

    fn enter(&mut self, now: Nanos) -> Result<(), Error> {
        if let Some(why) = &self.stopped {
            return Err(Error::Stopped(why.clone()));
        }
        // Time is monotonic per replica; tolerate a driver that repeats a timestamp.
        self.now = self.now.max(now);
        Ok(())
    }

    fn leave(&mut self, r: Result<(), Error>) -> Result<(), Error> {
        match r {
            Ok(()) => {
                self.check_invariants();
                Ok(())
            }
            Err(e) => {
                self.stopped = Some(e.to_string());
                self.staged.clear();
                Err(e)
            }
        }
    }

    /// Whether messages from `n` are taken. Any real node's are: which processes may
    /// talk to a replica at all is the transport's business (it authenticates peers
    /// with the cluster secret), and memberships change, so a replica cannot tell
    /// from its own, possibly stale, view who belongs (a member added while it was
    /// down, or a removed leader that must finish its last change). Safety never
    /// depends on who proposes: a proposer that follows the protocol is safe.
    pub(crate) fn is_member(&self, n: NodeId) -> bool {
        n != 0
    }

    /// Queues an action: released at once if nothing is waiting for a sync, else after
    /// the next sync (order is kept).
    pub(crate) fn emit(&mut self, a: Action) {
        #[cfg(feature = "sim")]
        if self.cfg.planted_bug == Some(crate::config::PlantedBug::AckBeforeSync) {
            self.out.push_back(a);
            return;
        }
        // A leader's remote writes and heartbeats claim nothing about its own storage
        // (its vote counts only for slots it synced, so the commit index they carry is
        // safe): they leave at once, and the followers' syncs run in parallel with the
        // leader's instead of after it.
        let independent = self.role == Role::Leader
            && matches!(&a, Action::RemoteWrite { .. } | Action::Send { msg: Message::Heartbeat { .. }, .. });
        if (self.dirty || !self.staged.is_empty()) && !independent {
            self.staged.push(a);
        } else {
            self.out.push_back(a);
        }
    }

    pub(crate) fn send(&mut self, to: NodeId, msg: Message) {
        self.emit(Action::Send { to, msg });
    }

    pub(crate) fn note_role(&mut self) {
        let a = Action::RoleChanged { role: self.role, ballot: self.promised, leader: self.leader() };
        self.emit(a);
    }

    pub(crate) fn reset_election_timer(&mut self, now: Nanos) {
        let t = self.cfg.election_timeout;
        // Lower priority waits longer: up to one more election timeout at priority 0.
        let penalty = t / 255 * (255 - self.cfg.priority as u64);
        self.election_deadline = now + t + penalty + self.rng.below(t);
    }

    pub(crate) fn bug(&self, _b: crate::config::PlantedBug) -> bool {
        #[cfg(feature = "sim")]
        {
            self.cfg.planted_bug == Some(_b)
        }
        #[cfg(not(feature = "sim"))]
        {
            false
        }
    }

    /// Raises the promise (persisted; the reply waits for the sync).
    pub(crate) fn raise_promise(&mut self, b: Ballot) -> Result<(), Error> {
        require!(b > self.promised, "promise must rise: {:?} -> {:?}", self.promised, b);
        let old = self.promised;
        require!(
            !self.cfg.accept_on_landing
                || old.is_zero()
                || old.node == self.cfg.id
                || self.fenced == Some(old)
                || self.bug(crate::config::PlantedBug::PromiseBeforeDrain),
            "promise {:?} -> {:?} over a holder whose landed writes were not taken (no fence)",
            old,
            b
        );
        self.storage.set_promise(b)?;
        self.dirty = true;
        self.promised = b;
        self.max_round = self.max_round.max(b.round);
        if !old.is_zero() && old.node != self.cfg.id && old.node != b.node {
            self.emit(Action::RevokeWrite { from: old.node });
        }
        if b.node != self.cfg.id {
            self.emit(Action::GrantWrite { to: b.node, ballot: b });
        }
        ensure!(self.storage.promise() == b);
        Ok(())
    }

    /// Accepts `value` at `slot` under `ballot` in local storage.
    pub(crate) fn accept_local(&mut self, entry: Entry) -> Result<(), Error> {
        require!(entry.slot >= 1);
        require!(
            entry.ballot <= self.promised || self.bug(crate::config::PlantedBug::AcceptLowerBallot),
            "accept above promise"
        );
        if let Some(old) = self.storage.entry(entry.slot)? {
            // An accepted value at (slot, ballot) is never replaced by a different one.
            invariant!(
                old.ballot != entry.ballot || old.value == entry.value,
                "slot {} ballot {:?}: accepted value changed",
                entry.slot,
                entry.ballot
            );
            if old.ballot > entry.ballot {
                // A stale write (e.g. a duplicate from an older leader): keep the newer.
                return Ok(());
            }
            if old == entry {
                return Ok(());
            }
            // A chosen slot never changes value.
            invariant!(
                entry.slot > self.chosen || old.value == entry.value,
                "chosen slot {} would change value",
                entry.slot
            );
        }
        self.storage.accept(entry)?;
        self.dirty = true;
        Ok(())
    }

    /// Steps down to follower (or stays learner), aborting leader/candidate state.
    pub(crate) fn become_follower(&mut self, leader: Option<NodeId>) {
        let was = self.role;
        self.pre = None;
        self.cand = None;
        if let Some(l) = self.lead.take() {
            if !l.pending.is_empty() {
                let cmds: Vec<Command> = l.pending.into_iter().collect();
                self.emit(Action::Aborted(cmds));
            }
            if !l.reads.is_empty() {
                let ids: Vec<u64> = l.reads.iter().map(|r| r.id).collect();
                self.emit(Action::ReadsAborted(ids));
            }
        }
        self.role = if self.cfg.is_voter() { Role::Follower } else { Role::Learner };
        let changed_leader = self.leader != leader;
        self.leader = leader;
        let now = self.now;
        self.reset_election_timer(now);
        if was != self.role || changed_leader {
            self.note_role();
        }
    }

    /// Checks the invariants that hold between handler calls.
    pub(crate) fn check_invariants(&self) {
        if !crate::contracts::ENABLED {
            return;
        }
        invariant!(self.applied <= self.chosen, "applied {} > chosen {}", self.applied, self.chosen);
        invariant!(self.storage.promise() == self.promised, "cached promise out of date");
        invariant!(
            self.chosen <= self.storage.last_slot(),
            "chosen {} beyond last slot {}",
            self.chosen,
            self.storage.last_slot()
        );
        match self.role {
            Role::Leader => {
                let l = self.lead.as_ref().expect("leader without state");
                invariant!(l.ballot == self.promised, "leader ballot {:?} != promise {:?}", l.ballot, self.promised);
                invariant!(l.ballot.node == self.cfg.id);
                invariant!(l.commit == self.chosen, "leader commit {} != chosen {}", l.commit, self.chosen);
                invariant!(l.commit < l.next_slot, "commit {} >= next slot {}", l.commit, l.next_slot);
                invariant!(l.synced < l.next_slot, "synced {} >= next slot {}", l.synced, l.next_slot);
                invariant!(self.storage.trimmed() <= l.commit, "leader trimmed beyond its commit");
                invariant!(
                    l.configs.range(..=l.commit + 1).next().is_some(),
                    "no membership in force after the commit index"
                );
                if let Some(k) = l.config_slot.filter(|&k| k > l.commit) {
                    // Slots after it are only those adopted in phase 1, never new ones.
                    invariant!(
                        l.next_slot <= k.max(l.term_start) + 1 || self.bug(crate::config::PlantedBug::EarlyNewQuorum),
                        "slot {} opened after the uncommitted membership change at {k}",
                        l.next_slot - 1
                    );
                }
                for (id, p) in &l.peers {
                    invariant!(p.matched < p.next, "peer {id}: matched {} >= next {}", p.matched, p.next);
                    invariant!(p.base <= p.matched, "peer {id}: base > matched");
                }
                invariant!(self.cand.is_none() && self.pre.is_none());
                if let Some(t) = l.transfer {
                    invariant!(self.cfg.voters.contains(&t.to) && t.to != self.cfg.id, "transfer target {}", t.to);
                }
            }
            Role::Candidate => {
                let c = self.cand.as_ref().expect("candidate without state");
                invariant!(c.ballot == self.promised && c.ballot.node == self.cfg.id);
                invariant!(self.lead.is_none());
            }
            Role::PreCandidate => invariant!(self.pre.is_some() && self.lead.is_none()),
            Role::Follower | Role::Learner => {
                invariant!(self.lead.is_none() && self.cand.is_none() && self.pre.is_none())
            }
        }
    }
}
