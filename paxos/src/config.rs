//! A replica's protocol configuration.

use crate::types::{Nanos, NodeId};

/// Deliberately wrong variants of the core, for proving that the simulator catches
/// bugs. They can only be switched on through `Config::planted_bug`, which exists only
/// in builds with the `sim` feature (test support).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PlantedBug {
    /// Phase 1 ignores the values read from acceptors and fills open slots with no-ops
    /// or new proposals (breaks the Paxos value-adoption rule).
    SkipValueAdoption,
    /// The acceptor honours a lower ballot than the one it promised: it answers its
    /// Prepare with a promise, its heartbeats, and takes its remote writes.
    AcceptLowerBallot,
    /// Promises and read completions are counted per message, not per replica, so a
    /// duplicated message counts twice.
    DoubleCountVote,
    /// Acknowledgements and messages leave before the storage sync that covers them.
    AckBeforeSync,
    /// The leader commits a slot once it is written locally, without a quorum.
    CommitWithoutQuorum,
    /// The leader counts its own vote for a slot before its storage synced it (while
    /// its remote writes already left).
    LeaderVotesBeforeSync,
    /// A candidate takes a promise from an acceptor that trimmed slots the candidate
    /// has not learned, and fills them as if they were empty.
    IgnoreTrimmedPromiser,
    /// A leader counts the new membership's quorum from the membership change's own
    /// slot on, and keeps opening slots before the change is chosen.
    EarlyNewQuorum,
    /// A log-service trim snapshots the state after the slot before the trim (the
    /// current de-duplication table and position counter) but labels it with the
    /// earlier slot it trims to, so a replica that installs it replays entries it
    /// already counts.
    TrimAtApplied,
    /// With acceptance by landing, the acceptor raises its promise without first
    /// fencing the permission holder (revoking it and draining the writes that landed):
    /// a write the old leader counted as accepted can then be missing from the tail the
    /// new candidate reads.
    PromiseBeforeDrain,
}

/// Configuration of one replica. Every member of a cluster must agree on `voters`
/// and `learners`; timing may differ per replica.
#[derive(Clone, Debug)]
pub struct Config {
    /// This replica's id (non-zero).
    pub id: NodeId,
    /// The voting members (acceptors), this replica included if it votes.
    pub voters: Vec<NodeId>,
    /// Non-voting members that receive the log (never counted in a quorum, never lead).
    /// A replica that is neither voter nor learner starts passive (as a learner) and
    /// waits to be added by a membership change.
    pub learners: Vec<NodeId>,
    /// Opaque per-member bytes of the membership in force ([`crate::Membership::addrs`]):
    /// replicated with every membership change, never interpreted by the core. Empty at
    /// the start of a cluster whose members are all configured.
    pub addrs: std::collections::BTreeMap<NodeId, Vec<u8>>,
    /// How often a leader sends heartbeats (carrying the commit index).
    pub heartbeat_interval: Nanos,
    /// The minimum election timeout; each wait is drawn from `[t, 2t)`. Also the
    /// leader lease a follower honours (it rejects elections while it heard a leader
    /// more recently than this) and the check-quorum period of a leader.
    pub election_timeout: Nanos,
    /// How long a leader waits for progress on a follower's outstanding writes before
    /// it re-sends from the follower's last contiguous acknowledgement.
    pub retransmit_timeout: Nanos,
    /// How long after the commit index advanced a leader tells the followers that no
    /// remote write has told meanwhile (a heartbeat, answered by each). Under load the
    /// next write carries the commit index and nothing extra is sent; an idle
    /// cluster's followers learn it within this delay, not a heartbeat interval.
    pub commit_notify_delay: Nanos,
    /// Maximum slots a leader keeps open (proposed, not yet committed): the pipeline.
    pub window: u64,
    /// Maximum client entries batched into one slot.
    pub max_batch_entries: usize,
    /// Maximum payload bytes batched into one slot (a single larger entry still goes
    /// alone).
    pub max_batch_bytes: usize,
    /// Maximum slots carried by one remote write.
    pub max_write_slots: usize,
    /// Maximum slots one remote read answers (a candidate reading a longer tail reads
    /// it in parts).
    pub max_read_slots: u64,
    /// Maximum client entries waiting at the leader for a slot; beyond it proposals
    /// are refused as busy (backpressure).
    pub max_pending_entries: usize,
    /// Seed for the election-timeout jitter.
    pub seed: u64,
    /// The bound on clock-rate difference between any two replicas, in percent: a
    /// leader's read lease lasts `election_timeout / (1 + drift)` from the send time of
    /// the heartbeat round a quorum acknowledged, so it ends before any follower's
    /// clock lets it help elect another leader. Default 10.
    pub max_clock_drift_percent: u64,
    /// Whether this replica may ever lead. A replica that may not still votes and
    /// accepts, but never starts an election nor accepts a leadership transfer.
    pub can_lead: bool,
    /// Election priority, 0..=255 (default 255): a lower priority waits longer before
    /// starting an election (up to one more election timeout at 0), so that replicas
    /// of higher priority usually win when a leader fails.
    pub priority: u8,
    /// Acceptance by landing (Mu's model, for one-sided transports whose completion says
    /// the bytes are in the follower's region under the durability mode: RDMA WRITE
    /// completion for `memory`, read-after-write or FLUSH for `pmem`): the writer counts
    /// a follower's acceptance when its write lands, before the follower's CPU looked at
    /// it. The acceptor must then never raise its promise while writes of the permission
    /// holder may sit in its region unseen: it first asks its driver to fence the holder
    /// ([`crate::Action::Fence`]: revoke, then hand over every write that landed) and
    /// raises the promise only after [`crate::Replica::fence_done`]. Default false
    /// (acceptance is the follower's acknowledgement after its sync).
    pub accept_on_landing: bool,
    /// A deliberately wrong variant of the core (simulator tests only).
    #[cfg(feature = "sim")]
    pub planted_bug: Option<PlantedBug>,
}

/// Why a configuration is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The replica id is 0.
    #[error("replica id must be non-zero")]
    ZeroId,
    /// There are no voters.
    #[error("the cluster needs at least one voter")]
    NoVoters,
    /// A node is listed twice.
    #[error("node {0} is listed more than once among voters and learners")]
    Duplicate(NodeId),
    /// A timing or size value is out of range.
    #[error("{0}")]
    Invalid(&'static str),
}

impl Config {
    /// A configuration with defaults for a datacenter network (1 ms heartbeats,
    /// 10 ms election timeout).
    pub fn new(id: NodeId, voters: Vec<NodeId>) -> Self {
        Config {
            id,
            voters,
            learners: Vec::new(),
            addrs: std::collections::BTreeMap::new(),
            heartbeat_interval: 1_000_000,
            election_timeout: 10_000_000,
            retransmit_timeout: 4_000_000,
            commit_notify_delay: 200_000,
            window: 256,
            max_batch_entries: 1024,
            max_batch_bytes: 1 << 20,
            max_write_slots: 64,
            max_read_slots: 1024,
            max_pending_entries: 1 << 16,
            seed: id,
            can_lead: true,
            max_clock_drift_percent: 10,
            priority: 255,
            accept_on_landing: false,
            #[cfg(feature = "sim")]
            planted_bug: None,
        }
    }

    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.id == 0 {
            return Err(ConfigError::ZeroId);
        }
        if self.voters.is_empty() {
            return Err(ConfigError::NoVoters);
        }
        let mut all: Vec<NodeId> = self.voters.iter().chain(&self.learners).copied().collect();
        all.sort_unstable();
        for w in all.windows(2) {
            if w[0] == w[1] {
                return Err(ConfigError::Duplicate(w[0]));
            }
        }
        if all.first() == Some(&0) {
            return Err(ConfigError::ZeroId);
        }
        if self.heartbeat_interval == 0 || self.election_timeout == 0 || self.retransmit_timeout == 0 {
            return Err(ConfigError::Invalid("timeouts must be non-zero"));
        }
        if self.heartbeat_interval * 2 > self.election_timeout {
            return Err(ConfigError::Invalid("election_timeout must be at least twice heartbeat_interval"));
        }
        if self.window == 0 || self.max_batch_entries == 0 || self.max_write_slots == 0 || self.max_read_slots == 0 {
            return Err(ConfigError::Invalid("window, max_batch_entries and max_write_slots must be non-zero"));
        }
        if self.max_batch_bytes == 0 || self.max_pending_entries == 0 {
            return Err(ConfigError::Invalid("max_batch_bytes and max_pending_entries must be non-zero"));
        }
        if self.addrs.keys().any(|id| !self.voters.contains(id) && !self.learners.contains(id)) {
            return Err(ConfigError::Invalid("addrs names a node that is neither voter nor learner"));
        }
        Ok(())
    }

    /// Votes needed for a quorum: a strict majority of the voters.
    pub fn quorum(&self) -> usize {
        self.voters.len() / 2 + 1
    }

    /// Whether this replica votes.
    pub fn is_voter(&self) -> bool {
        self.voters.contains(&self.id)
    }

    /// The membership in force.
    pub fn membership(&self) -> crate::types::Membership {
        crate::types::Membership::new(self.voters.clone(), self.learners.clone()).with_addrs(self.addrs.clone())
    }

    /// Every member but this replica: voters, then learners.
    pub fn peers(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.voters.iter().chain(&self.learners).copied().filter(move |&n| n != self.id)
    }
}
