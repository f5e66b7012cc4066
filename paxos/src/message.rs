//! What replicas exchange: messages on the control plane, and one-sided remote log
//! accesses (writes and reads with their completions) on the replication plane.
//!
//! A transport carries messages as messages. It carries a [`WriteRequest`] as a remote
//! write into the target's log region and a [`ReadRequest`] as a remote read of it:
//! with RDMA, the target's CPU is not involved and its NIC enforces write permission
//! (granted and revoked through [`crate::Action::GrantWrite`] and
//! [`crate::Action::RevokeWrite`]); over TCP and DPDK, a receiver-side agent calls
//! [`crate::Replica::handle_remote_write`] / [`crate::Replica::handle_remote_read`],
//! which check the same permission.

use crate::types::{Ballot, Entry, Slot, Value};

/// Control-plane messages: election and failure detection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// "Would you accept a Prepare for ballot (round, sender)?" Changes nothing at the
    /// receiver (pre-vote: a replica cut off from the majority cannot disturb it).
    PreVote {
        /// The round the sender would use.
        round: u64,
        /// The sender's chosen prefix (a voter that trimmed beyond it refuses: such a
        /// candidate could not learn the trimmed slots in phase 1).
        chosen: Slot,
    },
    /// Answer to [`Message::PreVote`].
    PreVoteReply {
        /// The round asked about.
        round: u64,
        /// Whether the receiver would promise.
        granted: bool,
    },
    /// Phase 1a: "promise `ballot` and let me write your log".
    Prepare {
        /// The candidate's ballot (owned by the sender).
        ballot: Ballot,
        /// The election was asked for by the leader (a leadership transfer): acceptors
        /// answer even though they heard that leader recently.
        transfer: bool,
    },
    /// From the leader to the replica it hands leadership to: "start an election now"
    /// (no pre-vote; the leader has stopped proposing and the target is caught up).
    TimeoutNow {
        /// The leader's ballot.
        ballot: Ballot,
    },
    /// Phase 1b: the acceptor promised `ballot` and granted its owner write permission.
    /// The candidate then reads the acceptor's log tail with a remote read.
    Promise {
        /// The promised ballot.
        ballot: Ballot,
        /// The acceptor's chosen prefix: every slot up to it is known chosen there.
        chosen: Slot,
        /// The acceptor's highest slot holding an accepted entry.
        last: Slot,
        /// The acceptor's log is trimmed up to here (covered by a snapshot): a
        /// candidate whose chosen prefix is below it cannot lead.
        trimmed: Slot,
    },
    /// A refusal: the receiver has promised a higher ballot than the one in the request.
    Reject {
        /// The ballot that was refused.
        ballot: Ballot,
        /// The receiver's promise.
        promised: Ballot,
    },
    /// Leader liveness and the commit index. A replica that receives a heartbeat of a
    /// ballot above its promise promises it (the leader completed phase 1 with a quorum)
    /// and grants its owner write permission.
    Heartbeat {
        /// The leader's ballot.
        ballot: Ballot,
        /// The leader's commit index.
        commit: Slot,
        /// The heartbeat round (echoed in the reply; confirms leadership for reads).
        seq: u64,
    },
    /// Answer to a heartbeat: the follower's progress, for catch-up.
    HeartbeatReply {
        /// The heartbeat's ballot.
        ballot: Ballot,
        /// The follower's chosen prefix.
        chosen: Slot,
        /// The follower's highest accepted slot.
        last: Slot,
        /// The heartbeat's round.
        seq: u64,
    },
}

/// A one-sided write of consecutive slots into a follower's log, under a ballot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteRequest {
    /// The writer's ballot; the writer must hold the target's write permission for it.
    pub ballot: Ballot,
    /// The slot of `values[0]`.
    pub first: Slot,
    /// The values of slots `first, first + 1, ...`.
    pub values: Vec<Value>,
    /// The writer's commit index (rides on the write).
    pub commit: Slot,
}

/// How a remote write ended, as seen by the writer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteResult {
    /// The values are accepted (durable per the target's durability mode).
    Ok {
        /// The request's ballot.
        ballot: Ballot,
        /// The request's first slot.
        first: Slot,
        /// How many slots were written.
        count: u64,
    },
    /// The writer does not hold write permission (a remote access error).
    Denied {
        /// The request's ballot.
        ballot: Ballot,
        /// The target's promise, when the transport can tell it (the TCP and DPDK
        /// agents can; an RDMA remote access error cannot).
        promised: Option<Ballot>,
    },
}

/// A one-sided read of a replica's log tail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadRequest {
    /// The reader's ballot (identifies the phase 1 it belongs to).
    pub ballot: Ballot,
    /// First slot to read.
    pub from: Slot,
    /// Last slot to read (inclusive).
    pub to: Slot,
}

/// The result of a remote read, as seen by the reader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadResult {
    /// The request's ballot.
    pub ballot: Ballot,
    /// The request's range start.
    pub from: Slot,
    /// The request's range end (inclusive).
    pub to: Slot,
    /// The entries found in the range, in slot order.
    pub entries: Vec<Entry>,
}
