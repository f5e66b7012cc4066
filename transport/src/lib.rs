//! # transport: how replog replicas reach each other
//!
//! One trait, [`Transport`], for every fabric (TCP, DPDK, RDMA, and an in-memory one for
//! tests). It knows nothing of ballots or slots: it moves bytes. It offers two planes:
//!
//! - **messages**: [`Transport::send`] a payload to a peer; received payloads come out
//!   of [`Transport::poll`] as [`Event::Message`];
//! - **remote log access** (one-sided): [`Transport::write`] bytes at an offset of a
//!   peer's log region and [`Transport::read`] a range of it, each completing later with
//!   [`Event::WriteDone`] / [`Event::ReadDone`] carrying the [`Token`] returned at issue.
//!   Only the peer holding write permission on a replica's region may write it:
//!   permission is given and taken with [`Transport::grant`] / [`Transport::revoke`]
//!   on the *target* replica. A write from any other peer completes with
//!   [`AccessError::Denied`].
//!
//! With RDMA a remote write lands in the target's registered memory without its CPU,
//! and permission is the queue pair's access flags. TCP and DPDK have no such NIC, so a
//! **receiver-side agent** stands in: the target's transport hands the write to its
//! owner as [`Event::WriteArrived`] (only if the writer holds permission; otherwise it
//! answers `Denied` itself), and the owner answers with [`Transport::complete_write`]
//! once the write is applied *and persisted per its durability mode*. The same goes for
//! reads ([`Event::ReadArrived`], [`Transport::complete_read`]). An RDMA transport never
//! produces `WriteArrived`/`ReadArrived`.
//!
//! ## Offsets
//! An offset names a place in the target's log region as the writer's protocol layer
//! chose it. Over TCP and DPDK the agent interprets it; over RDMA it is a byte offset in
//! the registered region. This crate never interprets offsets.
//!
//! ## Completions and failures
//! Every write and read issued completes exactly once: with the target's answer, or with
//! [`AccessError::LinkFailed`] when the link to the target fails first (connection lost,
//! queue pair in error). Messages are best effort: a message may be lost when a link
//! fails, never duplicated or reordered by a transport on one link (the fault-injection
//! wrapper does both on purpose).
//!
//! ## Threads
//! A transport is driven by one thread (the replica's polling thread). [`Transport::waker`]
//! gives a handle another thread can use to interrupt a blocked [`Transport::poll`].

#![deny(missing_docs)]

pub mod conformance;
#[cfg(feature = "dpdk")]
pub mod dpdk;
pub mod envelope;
pub mod faults;
pub mod mem;
#[cfg(feature = "rdma")]
pub mod rdma;

use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;

/// A replica's id on the wire (the same number as the protocol's node id). Never 0.
pub type PeerId = u64;

/// Identifies a remote write or read issued by this replica, unique per transport.
pub type Token = u64;

/// Why a remote access failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    /// The target refused: the writer does not hold write permission (an RDMA remote
    /// access error). `detail` is whatever the target's agent attached (TCP and DPDK
    /// agents attach the protocol's reason, e.g. the ballot it promised; RDMA attaches
    /// nothing).
    #[error("remote access denied")]
    Denied {
        /// The agent's explanation, opaque to the transport (may be empty).
        detail: Bytes,
    },
    /// The link failed before the target answered; the access may or may not have
    /// taken effect.
    #[error("link failed: {0}")]
    LinkFailed(String),
}

/// Something that happened, returned by [`Transport::poll`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A control-plane message from `from`.
    Message {
        /// The sender.
        from: PeerId,
        /// The payload as sent.
        payload: Bytes,
    },
    /// Agent side: `from`, which holds write permission, wrote `data` at `offset` of our
    /// log region. Answer exactly once with [`Transport::complete_write`] and `token`.
    WriteArrived {
        /// The writer.
        from: PeerId,
        /// To pass back to `complete_write`.
        token: Token,
        /// Where in our region.
        offset: u64,
        /// What.
        data: Bytes,
    },
    /// Agent side: `from` reads `len` bytes at `offset` of our log region. Answer
    /// exactly once with [`Transport::complete_read`] and `token`.
    ReadArrived {
        /// The reader.
        from: PeerId,
        /// To pass back to `complete_read`.
        token: Token,
        /// Where in our region.
        offset: u64,
        /// How many bytes (an upper bound the agent may answer short of).
        len: u32,
    },
    /// A remote write we issued to `to` completed. `Ok` carries the agent's
    /// acknowledgement bytes (empty over RDMA).
    WriteDone {
        /// The target.
        to: PeerId,
        /// As returned by [`Transport::write`].
        token: Token,
        /// The outcome.
        result: Result<Bytes, AccessError>,
    },
    /// A remote read we issued to `from` completed with the bytes read.
    ReadDone {
        /// The target.
        from: PeerId,
        /// As returned by [`Transport::read`].
        token: Token,
        /// The outcome.
        result: Result<Bytes, AccessError>,
    },
    /// A link to `peer` is up (after the handshake).
    PeerUp {
        /// The peer.
        peer: PeerId,
    },
    /// The link to `peer` went down; the transport reconnects by itself.
    PeerDown {
        /// The peer.
        peer: PeerId,
        /// Why, for the log.
        reason: String,
    },
}

/// Why an operation could not even be queued.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The send queue to that peer is full: slow down and retry after a poll.
    #[error("send queue to peer {0} is full")]
    Backpressure(PeerId),
    /// No such peer in the configuration.
    #[error("unknown peer {0}")]
    UnknownPeer(PeerId),
    /// The payload is larger than the transport's limit.
    #[error("payload of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// The payload's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The link to that peer is down; the message was not queued.
    #[error("link to peer {0} is down")]
    LinkDown(PeerId),
    /// The transport is shut down.
    #[error("transport closed")]
    Closed,
}

/// A peer as the cluster's (replicated) membership describes it, for
/// [`Transport::update_peers`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSpec {
    /// Where to reach it, in the transport's address syntax (TCP: `host:port`).
    pub addr: String,
    /// The configuration digest it must present in its handshake (transports that
    /// check one; see `fallback_tcp::TcpConfig::peer_digests`).
    pub digest: u64,
}

/// Why [`Transport::update_peers`] refused a new peer set (the old one stays).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeersError {
    /// The transport cannot add or remove peers while running.
    #[error(
        "changing the peer set while running is not supported on the {transport} transport: \
         restart the replicas with the member configured"
    )]
    Unsupported {
        /// The transport's name.
        transport: &'static str,
    },
    /// A peer's id or address is not usable.
    #[error("invalid peer set: {0}")]
    Invalid(String),
}

/// Interrupts a [`Transport::poll`] blocked in another thread.
pub trait Wake: Send + Sync {
    /// Makes the current or next `poll` return promptly.
    fn wake(&self);
}

/// A replica's endpoint on some fabric. See the crate docs for the rules.
pub trait Transport {
    /// This replica's id.
    fn local(&self) -> PeerId;

    /// The peers this transport connects to.
    fn peers(&self) -> Vec<PeerId>;

    /// The largest payload `send`, `write` or a completion may carry.
    fn max_payload(&self) -> usize;

    /// Queues a control-plane message to `to`.
    fn send(&mut self, to: PeerId, payload: &[u8]) -> Result<(), SendError>;

    /// Issues a one-sided write of `data` at `offset` of `to`'s log region.
    fn write(&mut self, to: PeerId, offset: u64, data: &[u8]) -> Result<Token, SendError>;

    /// Issues a one-sided read of `len` bytes at `offset` of `from`'s log region.
    fn read(&mut self, from: PeerId, offset: u64, len: u32) -> Result<Token, SendError>;

    /// Agent side: answers the [`Event::WriteArrived`] `token` from `from`: `Ok(ack)`
    /// once the write is applied and persisted, `Err(detail)` to deny it.
    fn complete_write(&mut self, from: PeerId, token: Token, result: Result<&[u8], &[u8]>) -> Result<(), SendError>;

    /// Agent side: answers the [`Event::ReadArrived`] `token` from `from` with the bytes
    /// read (`Ok`) or a denial (`Err(detail)`).
    fn complete_read(&mut self, from: PeerId, token: Token, result: Result<&[u8], &[u8]>) -> Result<(), SendError>;

    /// Gives `peer` write permission on this replica's log region, taking it from any
    /// other holder (one holder at a time).
    fn grant(&mut self, peer: PeerId);

    /// Takes write permission from `peer` (no effect if it does not hold it). Writes from
    /// it that arrive afterwards are denied.
    fn revoke(&mut self, peer: PeerId);

    /// The current holder of write permission on this replica's region.
    fn permission_holder(&self) -> Option<PeerId>;

    /// Takes write permission from `holder` (as [`Transport::revoke`]) and appends to
    /// `events`, in the order they were written, an [`Event::WriteArrived`] for every
    /// write of `holder` that landed before the revocation took effect and was not
    /// reported yet: after it returns, no write of `holder` is accepted that the caller
    /// was not handed. For transports that report writes as they land without the
    /// receiver's CPU deciding (RDMA with [`Transport::completes_on_landing`]); the
    /// default only revokes (agent transports check permission when a write arrives, so
    /// nothing landed that was not reported).
    fn fence(&mut self, holder: PeerId, events: &mut Vec<Event>) -> std::io::Result<()> {
        let _ = events;
        self.revoke(holder);
        Ok(())
    }

    /// Whether this transport completes our writes ([`Event::WriteDone`] `Ok`) once they
    /// landed in the target's memory under the configured durability, before the
    /// target's CPU saw them (one-sided RDMA), rather than when the target answered. The
    /// caller then must fence ([`Transport::fence`]) a writer before its promise rises.
    /// The default: false (completions are the target's answers).
    fn completes_on_landing(&self) -> bool {
        false
    }

    /// At start, once the caller's state is restored: appends to `events` an
    /// [`Event::WriteArrived`] for every write still held in this replica's region from
    /// before a restart (a persistent region, such as RDMA's on device-dax), in the order
    /// each writer wrote them; answering them ([`Transport::complete_write`]) sends
    /// nothing, their writers are gone or have moved on. The caller hands them to its
    /// core, which takes those of its promise's owner under that promise: a write that
    /// completed at landing ([`Transport::completes_on_landing`]) reaches the core even if
    /// this replica stopped before its CPU took it. `fresh`: the caller's state is new
    /// (it never promised anything), so whatever the region holds is from an earlier
    /// life: it is discarded instead. The default: nothing (no persistent region).
    fn recover_landed(&mut self, fresh: bool, events: &mut Vec<Event>) -> std::io::Result<()> {
        let _ = (fresh, events);
        Ok(())
    }

    /// Does I/O: sends what is queued, receives, and appends what happened to `events`.
    /// Blocks up to `timeout` (`None`: until something happens or a wake-up) when there
    /// is nothing to report.
    fn poll(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> std::io::Result<()>;

    /// A handle to interrupt `poll` from another thread.
    fn waker(&self) -> Arc<dyn Wake>;

    /// Hands what is queued for sending to the network now, without waiting for
    /// anything (as [`Transport::poll`] does first). A caller about to block outside
    /// `poll`, on a storage sync say, calls it so that its peers get what it just sent
    /// meanwhile (a leader's remote writes: the followers sync while it does). What
    /// fails is reported by the next `poll`. The default does nothing, for transports
    /// that send at once.
    fn send_queued(&mut self) {}

    /// Also return from [`Transport::poll`] when the descriptor `fd` (an epoll instance
    /// of the caller's own sockets, say) becomes readable, so that one thread waits on
    /// both. Returns whether this transport does so; the default does not (the caller
    /// then serves `fd` from a thread of its own).
    fn watch_fd(&mut self, fd: std::os::fd::RawFd) -> std::io::Result<bool> {
        let _ = fd;
        Ok(false)
    }

    /// Replaces the peer set while running (a membership change added or removed
    /// replicas): new peers are connected, removed ones disconnected (their in-flight
    /// accesses complete with [`AccessError::LinkFailed`]), and each peer's handshake
    /// digest is the one given. Must not contain [`Transport::local`] or 0.
    ///
    /// The default accepts only the current peer ids (addresses and digests are not
    /// changed) and answers [`PeersError::Unsupported`] for any other set: fabrics that
    /// set up their peers at start (RDMA queue pairs, DPDK MAC tables) use it.
    fn update_peers(&mut self, peers: &std::collections::BTreeMap<PeerId, PeerSpec>) -> Result<(), PeersError> {
        let mut now = self.peers();
        now.sort_unstable();
        if peers.keys().copied().eq(now) {
            Ok(())
        } else {
            Err(PeersError::Unsupported { transport: self.name() })
        }
    }

    /// Whether [`Transport::update_peers`] can add and remove peers (default false).
    fn dynamic_peers(&self) -> bool {
        false
    }

    /// The transport's name for messages (`tcp`, `rdma`, `dpdk`, `memory`...).
    fn name(&self) -> &'static str {
        "this"
    }

    /// The one-sided **read mirror**: memory of this replica that peers read without its
    /// CPU (RDMA READ), into which the caller publishes what it would answer to a
    /// [`Transport::read`] (its layout is the caller's). `Some((bytes, record_bytes))`
    /// when there is one; the default has none, and reads go as messages.
    fn mirror_geometry(&self) -> Option<(usize, usize)> {
        None
    }

    /// Copies `data` into the read mirror at `offset`. The bytes of one call become
    /// visible to remote readers no earlier than those of earlier calls. The default has
    /// no mirror and refuses.
    fn put_mirror(&mut self, offset: usize, data: &[u8]) -> Result<(), String> {
        let _ = (offset, data);
        Err(format!("the {} transport has no read mirror", self.name()))
    }

    /// How this transport's reads ([`Transport::read`]) travelled so far. The default:
    /// all counts 0.
    fn read_paths(&self) -> ReadPaths {
        ReadPaths::default()
    }
}

/// How reads travelled (see [`Transport::read_paths`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadPaths {
    /// Reads answered by one-sided reads of the peer's read mirror (no peer CPU).
    pub one_sided: u64,
    /// Reads answered by the peer's CPU over messages (the side channel).
    pub side_channel: u64,
    /// Of those, reads that first tried the mirror and fell back (range not in the
    /// mirror, a concurrent rewrite, a failed check or link).
    pub fallbacks: u64,
    /// Total nanoseconds from issue to answer of the one-sided reads.
    pub one_sided_ns: u64,
    /// Total nanoseconds from issue to answer of the side-channel reads.
    pub side_channel_ns: u64,
}
