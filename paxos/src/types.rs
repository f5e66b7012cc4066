//! Identifiers and values the protocol agrees on.

use bytes::Bytes;
use std::collections::BTreeMap;
use std::fmt;

/// A replica's identity in the cluster. Never 0 (0 marks "no node" in ballots).
pub type NodeId = u64;

/// A position in the Paxos log: one consensus instance. Slots start at 1; slot 0 means
/// "nothing" (for example "no slot committed yet").
pub type Slot = u64;

/// Monotonic time in nanoseconds, handed in by the driver (virtual in the simulator).
/// The core never reads a clock.
pub type Nanos = u64;

/// A client-visible position: the index of a client entry in the committed,
/// de-duplicated sequence of client entries. Positions start at 1.
pub type Position = u64;

/// A Paxos ballot (proposal number): a round, then the proposer's id to break ties.
///
/// Ordered lexicographically by `(round, node)`. The replica that owns ballot `b` is
/// `b.node`, and it is the only replica that may write a log under `b`: this is how
/// write permission follows the promise.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Ballot {
    /// The round; grows with each election attempt.
    pub round: u64,
    /// The proposer that owns this ballot (0 only in [`Ballot::ZERO`]).
    pub node: NodeId,
}

impl Ballot {
    /// The ballot below every real ballot: "promised nothing yet".
    pub const ZERO: Ballot = Ballot { round: 0, node: 0 };

    /// A ballot of `round` owned by `node`.
    pub fn new(round: u64, node: NodeId) -> Self {
        Ballot { round, node }
    }

    /// Whether this is [`Ballot::ZERO`].
    pub fn is_zero(&self) -> bool {
        *self == Ballot::ZERO
    }
}

impl fmt::Debug for Ballot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b{}.{}", self.round, self.node)
    }
}

impl fmt::Display for Ballot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// One client entry: an opaque payload tagged with the client's id and sequence
/// number, so that a retry (for example across a leader change) is applied once.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Command {
    /// The client's id (chosen by the client; unique per client session).
    pub client: u64,
    /// The client's sequence number for this entry; a retry reuses it.
    pub seq: u64,
    /// The entry's bytes, opaque to the protocol.
    pub payload: Bytes,
}

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "c{}#{}({}B)", self.client, self.seq, self.payload.len())
    }
}

/// A cluster membership: who votes and who only receives the log.
#[derive(Clone, PartialEq, Eq, Hash, Debug, Default)]
pub struct Membership {
    /// The voting members (acceptors), sorted, no duplicates.
    pub voters: Vec<NodeId>,
    /// Members that receive the log without voting (new members catch up as learners
    /// before they vote), sorted, no duplicates, disjoint from `voters`.
    pub learners: Vec<NodeId>,
    /// Opaque per-member bytes replicated with the membership (the service keeps each
    /// member's addresses here, so that every replica learns a new member's addresses
    /// from the log or a snapshot). The core never interprets them; keys are members.
    pub addrs: BTreeMap<NodeId, Vec<u8>>,
}

impl Membership {
    /// A membership of `voters` and `learners` (sorted and de-duplicated here).
    pub fn new(mut voters: Vec<NodeId>, mut learners: Vec<NodeId>) -> Self {
        voters.sort_unstable();
        voters.dedup();
        learners.sort_unstable();
        learners.dedup();
        learners.retain(|l| !voters.contains(l));
        Membership { voters, learners, addrs: BTreeMap::new() }
    }

    /// The same membership carrying `addrs` (entries of non-members are dropped).
    pub fn with_addrs(mut self, mut addrs: BTreeMap<NodeId, Vec<u8>>) -> Self {
        addrs.retain(|id, _| self.contains(*id));
        self.addrs = addrs;
        self
    }

    /// Whether it is usable: at least one voter, no node 0.
    pub fn is_valid(&self) -> bool {
        !self.voters.is_empty()
            && !self.voters.contains(&0)
            && !self.learners.contains(&0)
            && self.addrs.keys().all(|&id| self.contains(id))
    }

    /// Votes needed for a quorum: a strict majority of the voters.
    pub fn quorum(&self) -> usize {
        self.voters.len() / 2 + 1
    }

    /// Whether `n` votes.
    pub fn is_voter(&self, n: NodeId) -> bool {
        self.voters.contains(&n)
    }

    /// Whether `n` is a voter or a learner.
    pub fn contains(&self, n: NodeId) -> bool {
        self.voters.contains(&n) || self.learners.contains(&n)
    }
}

/// The value agreed on in one slot.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Value {
    /// Fills a slot that a new leader found open and empty (no client entry).
    Noop,
    /// A batch of client entries, applied in order.
    Batch(Vec<Command>),
    /// A membership change: slots after this one (once it is chosen) belong to the new
    /// membership. A leader opens no slot after a membership change until it is chosen.
    Config(Membership),
    /// Trims the log service's prefix: once applied, every replica may drop the slots
    /// whose client entries all lie at positions up to this one (rounded down to a slot
    /// boundary) behind a snapshot of the core's state there. See
    /// [`crate::Replica::propose_trim`].
    Trim(Position),
}

impl Value {
    /// Payload bytes carried (for batching limits and statistics).
    pub fn payload_bytes(&self) -> usize {
        match self {
            Value::Noop | Value::Config(_) | Value::Trim(_) => 0,
            Value::Batch(cmds) => cmds.iter().map(|c| c.payload.len()).sum(),
        }
    }

    /// Number of client entries carried.
    pub fn len(&self) -> usize {
        match self {
            Value::Noop | Value::Config(_) | Value::Trim(_) => 0,
            Value::Batch(cmds) => cmds.len(),
        }
    }

    /// Whether the value carries no client entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An accepted log entry: the value an acceptor accepted at a slot, under a ballot.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Entry {
    /// The slot.
    pub slot: Slot,
    /// The ballot under which the value was accepted.
    pub ballot: Ballot,
    /// The value.
    pub value: Value,
}
