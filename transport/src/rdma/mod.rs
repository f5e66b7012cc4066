//! The RDMA backend of [`Transport`] (feature `rdma`): reliable-connected queue pairs,
//! a registered log region, one-sided RDMA WRITE and READ.
//!
//! ## Shape
//! - One **log region** per replica: page-aligned memory of [`RdmaConfig::region_len`]
//!   bytes registered for local write and remote read/write (anonymous memory, or with
//!   [`RdmaConfig::region_path`] a shared mapping of a device-dax device, persistent
//!   memory whose contents survive a restart). Its owner reads and writes
//!   it locally ([`RdmaTransport::read_region`], [`RdmaTransport::write_region`],
//!   [`RdmaTransport::load_u64`]); peers reach it with one-sided operations, the offset of
//!   [`Transport::write`]/[`Transport::read`] being a byte offset into it. The owner's
//!   CPU takes no part in a remote write.
//! - One **RC queue pair per peer**, on one completion queue. The memory region allows
//!   remote write; whether a peer may write is the *queue pair's* access flags
//!   (`IBV_ACCESS_REMOTE_WRITE` only on the queue pair of the permission holder), so
//!   [`Transport::grant`]/[`Transport::revoke`] are one `ibv_modify_qp` on the target.
//!   If that modify fails (or [`RdmaConfig::permission_by_reset`] is set), the queue
//!   pair is cycled instead: destroyed and re-created through RESET -> INIT (with the new
//!   flags) -> RTR -> RTS over the side channel, which also cuts any write in flight.
//!   A write from a peer whose queue pair lacks the flag fails at the NIC with a remote
//!   access error: the writer's `WriteDone` is [`AccessError::Denied`] (detail empty).
//!   An access error moves both queue pairs to the error state; they are renewed like a
//!   failed link (below).
//! - A **TCP side channel** per pair of replicas (dialed by the lower id; its frames are
//!   listed in `side.rs`): it authenticates the peer (cluster id, member-list
//!   digest and the cluster secret's HMAC challenge-response, the scheme of
//!   `fallback-tcp`), exchanges the queue-pair bootstrap (QPN, PSN, GID/LID, region
//!   address, rkey and length) and its renewals, and carries the **control-plane
//!   messages**. Messages go over the side channel rather than SEND/RECV on the queue
//!   pair: they are the slow path (elections, phase 1, catch-up), TCP already gives them
//!   ordering, flow control and arbitrary sizes, and the queue pair then needs no posted
//!   receive buffers, no credit scheme and no RNR handling; a queue-pair renewal (after
//!   a permission change or an error) does not lose messages either. The replication
//!   fast path (writes and reads) never touches the side channel.
//! - An **acknowledgement path** beside the log (unless [`RdmaConfig::ack_area_len`] is
//!   0): per peer an **acknowledgement area** of `ack_area_len` bytes in this replica's
//!   memory, which that peer (and only it: it alone learns the area's address and rkey)
//!   writes with one-sided RDMA WRITE ([`RdmaTransport::write_ack`]) over a second RC
//!   queue pair, the **acknowledgement queue pair**. The owner finds what landed by
//!   reading its own memory ([`RdmaTransport::read_ack_area`],
//!   [`RdmaTransport::load_ack_u64`]); what the bytes mean (records, canary, CRC) is the
//!   caller's (the replog agent's) business, as with the log region.
//! - A **heartbeat counter**: the first 8 bytes of each acknowledgement area are the
//!   owner's counter, bumped on every pass of its `poll` loop (the caller's acknowledgement
//!   layout must leave them alone). With [`RdmaConfig::heartbeat_timeout`] set, each
//!   side reads its peers' counters with a one-sided **RDMA READ** on the acknowledgement
//!   queue pair every quarter of the timeout, and a peer whose counter has not moved for
//!   the timeout is a failed link (see Failures). This catches what neither the NIC nor
//!   the side channel see: a peer process that hangs or is stopped while its NIC keeps
//!   accepting one-sided writes and its kernel keeps the TCP side channel open, so that
//!   a leader's cells would land and never be acknowledged. The peer can write its own
//!   view of our counter (it has write access to that area), which only fools itself.
//! - A **read mirror** (unless [`RdmaConfig::mirror_len`] is 0): one region of the
//!   acknowledgement protection domain registered with `IBV_ACCESS_REMOTE_READ` only,
//!   which every peer learns (bootstrap extension version 2) and may read with a one-sided
//!   **RDMA READ** on the acknowledgement queue pair ([`RdmaTransport::read_mirror`]) but
//!   never write: the NIC refuses a write to a region without remote-write access. The
//!   owner fills it with its CPU ([`RdmaTransport::write_mirror`]); what the bytes mean
//!   (the replog agent's accepted-entries mirror: seqlock header, records with CRC and
//!   canary) is the caller's business. The owner's CPU takes no part in a read.
//!
//! ## Why a second protection domain for acknowledgements
//! Write permission on the log region is the log queue pair's access flags, granted to
//! one peer at a time. Acknowledgements must flow from every follower to the leader
//! whoever holds that permission, so their queue pair always allows remote write. Were
//! it in the log region's protection domain, that flag together with the log region's
//! rkey (which every peer learns in the bootstrap) would let any peer write the log
//! region on its acknowledgement queue pair, bypassing the permission scheme. So the
//! acknowledgement areas, their staging memory and the acknowledgement queue pairs live
//! in a **second protection domain** that holds nothing else: the NIC refuses any access
//! from a queue pair to a memory region of another protection domain, so an
//! acknowledgement queue pair can reach the acknowledgement areas and never the log
//! region, and revoking log permission never touches the acknowledgement path. One area
//! (and memory region) per peer, rather than one shared area, means a peer learns the
//! rkey of its own area only. The price is one more queue pair per peer; both queue
//! pairs are bootstrapped by the same QP_OFFER/QP_ACCEPT exchange (the frames'
//! versioned acknowledgement extension, `side.rs`), live and die together (a failure of
//! either is a failed link: both are torn down and renewed), and share the completion
//! queue.
//!
//! ## Writes and reads
//! `write`/`read` copy into (or reserve) a per-peer registered staging ring and queue a
//! work request; the next [`Transport::poll`] posts all queued requests of a peer as one
//! chain (one doorbell), inline when the payload fits the queue pair's inline limit,
//! *signalled* only every [`RdmaConfig::signal_every`] requests and at the end of each
//! chain. A queue pair completes in order, so a signalled completion also completes
//! every unsignalled request before it; an error completion is always generated and marks
//! the first request that did not complete (those before it did).
//!
//! ## Failures
//! A queue pair in the error state (an error completion, a failed post, or the periodic
//! state check) is a failed link: it is destroyed, every access in flight to that peer
//! completes with `LinkFailed` (or `Denied`, for writes after a remote access error: the
//! target's queue pair refused them all; acknowledgement writes fail as `LinkFailed`),
//! [`Event::PeerDown`] is reported, and a new
//! queue pair is negotiated over the side channel; [`Event::PeerUp`] follows when it is
//! ready. A side channel that fails takes its queue pair down the same way and is
//! redialed with backoff. A stalled heartbeat counter fails the link the same way
//! (reason `heartbeat counter ... has not moved`); its renewal completes when the peer
//! polls again. Every access completes exactly once.
//!
//! ## Polling
//! Completions are taken by polling the completion queue from `poll` (no interrupts).
//! While accesses are in flight `poll` busy-polls for up to [`RdmaConfig::busy_poll`],
//! then sleeps in short slices (`ppoll` on the side channels and the waker, at most
//! 200 us) between looks at the completion queue; with nothing in flight it blocks on
//! the side channels and the waker until the timeout.

mod side;
mod verbs;

pub use side::SideError;

use crate::{AccessError, Event, PeerId, SendError, Token, Transport, Wake};
use bytes::Bytes;
use rdma_sys::{
    ibv_access_flags, ibv_qp_state, ibv_send_flags, ibv_send_wr, ibv_sge, ibv_wc, ibv_wc_status, ibv_wr_opcode,
};
use side::{kind, Conn};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use verbs::{AckEndpoint, Device, Endpoint, MirrorEndpoint, Pd, Qp, Region};

/// Why the RDMA transport could not start (or a region access was refused).
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    /// No RDMA device (or not the one configured), or its port is not active.
    #[error("no usable RDMA device: {0}")]
    NoDevice(String),
    /// A verbs call failed.
    #[error("{call} failed: {source}")]
    Verbs {
        /// The call.
        call: &'static str,
        /// The errno.
        source: io::Error,
    },
    /// The configuration is not usable.
    #[error("invalid RDMA transport configuration: {0}")]
    Config(String),
    /// A local region access outside the region.
    #[error("{len} bytes at offset {offset} are outside the {region}-byte log region")]
    OutOfRange {
        /// Offset asked.
        offset: u64,
        /// Length asked.
        len: usize,
        /// The region's length.
        region: usize,
    },
    /// The log region's file or device ([`RdmaConfig::region_path`]) is not usable.
    #[error("log region on {}: {what}", path.display())]
    RegionPath {
        /// The configured path.
        path: PathBuf,
        /// What went wrong.
        what: String,
    },
    /// The side-channel listener could not be set up.
    #[error("side channel: {0}")]
    Io(#[from] io::Error),
}

/// Everything an [`RdmaTransport`] needs. Build it with [`RdmaConfig::new`] and adjust
/// the public fields.
#[derive(Clone)]
pub struct RdmaConfig {
    /// The cluster this replica belongs to; a peer presenting another id is refused.
    pub cluster_id: u64,
    /// This replica's id (never 0).
    pub local: PeerId,
    /// Where the side channel listens (port 0 picks one; see [`RdmaTransport::local_addr`]).
    pub listen: SocketAddr,
    /// The other replicas' side-channel addresses. Must not contain `local` or 0.
    pub peers: BTreeMap<PeerId, SocketAddr>,
    /// The RDMA device by name (e.g. `rxe0`, `mlx5_0`); `None`: the first one. Default `None`.
    pub device: Option<String>,
    /// The device port. Default 1.
    pub port: u8,
    /// The GID index (RoCE v2: the index of the IPv4-mapped GID of the interface, e.g. 1
    /// on soft-RoCE; see `show_gids`). Default 1.
    pub gid_index: u8,
    /// Size of this replica's log region in bytes. Default 64 MiB.
    pub region_len: usize,
    /// Where the log region lives: `None`, anonymous memory (zeroed at open); a path, a
    /// shared mapping of it, keeping what it holds across restarts: a device-dax
    /// character device (`/dev/daxN.M`, persistent memory; `region_len` rounded up to
    /// the device's alignment must fit in it), or a regular file (for tests). fsdax
    /// files cannot be registered (the kernel refuses long-term pins of fsdax pages).
    /// Default `None`.
    pub region_path: Option<PathBuf>,
    /// The largest payload of `send`, `write` or `read`. Default 1 MiB.
    pub max_payload: usize,
    /// Registered staging memory per peer for outgoing writes and incoming reads; must
    /// be at least `max_payload`. Default 8 MiB.
    pub staging_per_peer: usize,
    /// Work requests in flight (queued or posted) per peer before `Backpressure`; also
    /// the send queue depth. Default 256.
    pub depth: u32,
    /// Signal one work request in this many (and the last of each posted chain). Default 32.
    pub signal_every: u32,
    /// Requested inline limit in bytes (writes up to the limit the device grants are
    /// posted inline). Default 220.
    pub max_inline: u32,
    /// Busy-polling budget of `poll` while accesses are in flight. Default 50 us.
    pub busy_poll: Duration,
    /// Bytes of messages queued on a side channel before `send` answers `Backpressure`.
    /// Default 64 MiB.
    pub max_queued_bytes_per_peer: usize,
    /// Side-channel handshake bound. Default 5 s.
    pub handshake_timeout: Duration,
    /// First redial delay; doubles up to `reconnect_max`. Default 10 ms.
    pub reconnect_min: Duration,
    /// Longest redial delay. Default 1 s.
    pub reconnect_max: Duration,
    /// How often the queue pairs' states are checked (catches a queue pair in error with
    /// nothing in flight, e.g. the target side of a denied write). Default 50 ms.
    pub health_interval: Duration,
    /// Change permissions by cycling the queue pair through reset rather than modifying
    /// its access flags in place (the fallback path, forced; for tests and devices whose
    /// modify is unreliable). Default false.
    pub permission_by_reset: bool,
    /// Bytes of the acknowledgement area this replica keeps for each peer (written by
    /// that peer with [`RdmaTransport::write_ack`]); a multiple of 8. 0: no
    /// acknowledgement queue pairs at all. Default 64 KiB.
    pub ack_area_len: usize,
    /// Take a peer whose heartbeat counter has not moved for this long as a failed link
    /// (checked by RDMA READ every quarter of it; needs the acknowledgement path on both
    /// sides). `None`: not checked (the counter still moves). Default `None`.
    pub heartbeat_timeout: Option<Duration>,
    /// Bytes of this replica's read mirror (registered remote-read-only; peers read it
    /// with [`RdmaTransport::read_mirror`]); a multiple of 8. 0: none. Needs the
    /// acknowledgement path (`ack_area_len` > 0). Default 0.
    pub mirror_len: usize,
    /// The largest single [`RdmaTransport::read_mirror`] (registered staging per peer).
    /// Default 64 KiB.
    pub mirror_read_max: usize,
    /// The cluster secret (the side channel's HMAC challenge-response). Default `None`.
    pub secret: Option<Vec<u8>>,
    /// Digest of the member list and of whatever else every replica must agree on (a
    /// peer with another one is refused as stale; `replog` folds in durability and
    /// when writes count as landed). Default 0.
    pub config_digest: u64,
}

impl std::fmt::Debug for RdmaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaConfig")
            .field("cluster_id", &self.cluster_id)
            .field("local", &self.local)
            .field("listen", &self.listen)
            .field("peers", &self.peers)
            .field("device", &self.device)
            .field("port", &self.port)
            .field("gid_index", &self.gid_index)
            .field("region_len", &self.region_len)
            .field("region_path", &self.region_path)
            .field("max_payload", &self.max_payload)
            .field("depth", &self.depth)
            .field("ack_area_len", &self.ack_area_len)
            .field("heartbeat_timeout", &self.heartbeat_timeout)
            .field("mirror_len", &self.mirror_len)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("config_digest", &format_args!("{:016x}", self.config_digest))
            .finish_non_exhaustive()
    }
}

impl RdmaConfig {
    /// A configuration with the defaults documented on each field.
    pub fn new(cluster_id: u64, local: PeerId, listen: SocketAddr, peers: BTreeMap<PeerId, SocketAddr>) -> Self {
        RdmaConfig {
            cluster_id,
            local,
            listen,
            peers,
            device: None,
            port: 1,
            gid_index: 1,
            region_len: 64 << 20,
            region_path: None,
            max_payload: 1 << 20,
            staging_per_peer: 8 << 20,
            depth: 256,
            signal_every: 32,
            max_inline: 220,
            busy_poll: Duration::from_micros(50),
            max_queued_bytes_per_peer: 64 << 20,
            handshake_timeout: Duration::from_secs(5),
            reconnect_min: Duration::from_millis(10),
            reconnect_max: Duration::from_secs(1),
            health_interval: Duration::from_millis(50),
            permission_by_reset: false,
            ack_area_len: 64 << 10,
            heartbeat_timeout: None,
            mirror_len: 0,
            mirror_read_max: 64 << 10,
            secret: None,
            config_digest: 0,
        }
    }
}

/// The name of the first RDMA device whose port 1 is active, or why there is none.
/// Tests use it to decide whether they can run.
pub fn probe_device() -> Result<String, RdmaError> {
    Device::open(None, 1, 0, 1).map(|d| d.name.clone())
}

/// What the RDMA tests of every crate share: whether they can run here, and the
/// addresses the soft-RoCE VM gives them (`hw-setup/rxe-vm.sh run` sets `RXE_*`).
pub mod testing {
    use std::collections::BTreeMap;
    use std::net::{IpAddr, SocketAddr, TcpListener};

    /// Whether an RDMA device is up. Without one a test is skipped with a line saying
    /// why, or fails when `REPLOG_REQUIRE_ALL=1` (the full test command).
    pub fn device_or_skip(test: &str) -> bool {
        match super::probe_device() {
            Ok(_) => true,
            Err(e) => {
                let why = format!(
                    "{test}: no RDMA device ({e}); run it in the soft-RoCE VM: hw-setup/rxe-vm.sh run -- <test binary>"
                );
                if std::env::var("REPLOG_REQUIRE_ALL").as_deref() == Ok("1") {
                    panic!("{why} (REPLOG_REQUIRE_ALL=1)");
                }
                eprintln!("SKIP {why}");
                false
            }
        }
    }

    /// The address of the RDMA interface (`RXE_IP` in the VM), else loopback.
    pub fn side_channel_ip() -> IpAddr {
        std::env::var("RXE_IP").ok().and_then(|s| s.parse().ok()).unwrap_or([127, 0, 0, 1].into())
    }

    /// A test endpoint's configuration: the VM's device and GID index (`RXE_DEV`,
    /// `RXE_GID_INDEX`, default 1), a 1 MiB log region and staging, 256 KiB payloads.
    pub fn config(
        cluster_id: u64,
        id: super::PeerId,
        listen: SocketAddr,
        peers: BTreeMap<super::PeerId, SocketAddr>,
    ) -> super::RdmaConfig {
        let mut c = super::RdmaConfig::new(cluster_id, id, listen, peers);
        c.device = std::env::var("RXE_DEV").ok();
        c.gid_index = std::env::var("RXE_GID_INDEX").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
        c.region_len = 1 << 20;
        c.max_payload = 256 << 10;
        c.staging_per_peer = 1 << 20;
        c
    }

    /// Opens a transport for each of `ids` (side channels on [`side_channel_ip`], each
    /// knowing the others), configured by [`config`] then `tweak`; and their addresses.
    /// Panics if one cannot be opened (test support).
    pub fn open_cluster(
        cluster_id: u64,
        ids: &[super::PeerId],
        tweak: impl Fn(&mut super::RdmaConfig),
    ) -> (Vec<super::RdmaTransport>, BTreeMap<super::PeerId, SocketAddr>) {
        let ls: Vec<TcpListener> =
            ids.iter().map(|_| TcpListener::bind((side_channel_ip(), 0)).expect("bind side channel")).collect();
        let addrs: BTreeMap<super::PeerId, SocketAddr> =
            ids.iter().zip(&ls).map(|(&id, l)| (id, l.local_addr().expect("addr"))).collect();
        let eps = ids
            .iter()
            .zip(ls)
            .map(|(&id, l)| {
                let peers = addrs.iter().filter(|(&p, _)| p != id).map(|(&p, &a)| (p, a)).collect();
                let mut c = config(cluster_id, id, addrs[&id], peers);
                tweak(&mut c);
                super::RdmaTransport::with_listener(c, l).expect("open RDMA transport")
            })
            .collect();
        (eps, addrs)
    }
}

/// One access, queued or posted.
#[derive(Debug)]
struct Op {
    token: Token,
    read: bool,
    remote_off: u64,
    len: u32,
    /// Offset of its bytes in the peer's staging ring.
    stage_off: usize,
    /// Bytes of the ring it holds (with any wasted tail).
    charged: usize,
}

/// A FIFO allocator over one peer's staging memory (frees come in allocation order,
/// because a queue pair completes in order).
#[derive(Debug)]
struct Ring {
    cap: usize,
    head: usize,
    used: usize,
}

impl Ring {
    fn alloc(&mut self, len: usize) -> Option<(usize, usize)> {
        let len = len.div_ceil(8) * 8;
        if self.used == 0 {
            self.head = 0;
        }
        if self.head + len <= self.cap {
            if self.used + len > self.cap {
                return None;
            }
            let off = self.head;
            self.head += len;
            self.used += len;
            Some((off, len))
        } else {
            let waste = self.cap - self.head;
            if self.used + waste + len > self.cap {
                return None;
            }
            self.head = len;
            self.used += waste + len;
            Some((0, waste + len))
        }
    }

    fn free(&mut self, charged: usize) {
        debug_assert!(charged <= self.used);
        self.used -= charged;
    }

    fn reset(&mut self) {
        self.head = 0;
        self.used = 0;
    }
}

/// Handshake progress of a dialer's side channel.
#[derive(Debug)]
enum DialAuth {
    /// HELLO sent.
    Hello { nonce_d: [u8; side::NONCE_LEN] },
    /// AUTH sent.
    Auth { nonce_d: [u8; side::NONCE_LEN], nonce_a: [u8; side::NONCE_LEN] },
}

/// Everything about one peer.
struct Link {
    id: PeerId,
    addr: SocketAddr,
    /// We dial (our id is the lower).
    dialer: bool,
    conn: Option<Conn>,
    /// The side channel is authenticated.
    established: bool,
    dial_auth: Option<DialAuth>,
    handshake_deadline: Option<Instant>,
    next_dial: Instant,
    backoff: Duration,
    qp: Option<Qp>,
    /// Generation of the current queue pair (chosen by the dialer).
    gen: u64,
    /// Our first PSN for the current queue pair.
    psn: u32,
    /// The queue pair is in RTS and the peer's is connected: accesses may be posted.
    ready: bool,
    remote: Option<Endpoint>,
    /// PeerUp was reported (and PeerDown not since).
    up: bool,
    pending: VecDeque<Op>,
    posted: VecDeque<Op>,
    unsignaled: u32,
    ring: Ring,
    /// Base of this peer's ring in the staging region.
    stage_base: usize,
    /// The acknowledgement queue pair (acknowledgement protection domain); `None` when
    /// this side or the peer has no acknowledgement path. Created, connected and torn
    /// down with `qp`.
    ack_qp: Option<Qp>,
    /// Our first PSN on `ack_qp`.
    ack_psn: u32,
    /// The peer's acknowledgement area for us, once `ack_qp` is connected.
    ack_remote: Option<AckEndpoint>,
    /// Operations posted on `ack_qp` (each signalled), in order.
    ack_posted: VecDeque<AckOp>,
    /// The heartbeat read in flight.
    hb_read: Option<Token>,
    /// The peer's heartbeat counter as last read, and when it last moved.
    hb_seen: Option<(u64, Instant)>,
    /// Acknowledgement writes posted so far (picks the staging slot).
    ack_count: u64,
    /// Our acknowledgement area that this peer writes (acknowledgement protection domain).
    ack_in: Option<Region>,
    /// Staging of outgoing acknowledgement writes: `depth` slots of [`ACK_MAX_WRITE`] bytes.
    ack_stage: Option<Region>,
    /// The peer's read mirror, once `ack_qp` is connected and the peer offered one.
    mirror_remote: Option<MirrorEndpoint>,
    /// Where a read of the peer's mirror lands ([`RdmaConfig::mirror_read_max`] bytes,
    /// acknowledgement protection domain); one read at a time.
    mirror_stage: Option<Region>,
    /// The mirror read in flight and the work requests it posted.
    mirror_read: Option<(Token, usize)>,
}

impl Link {
    fn in_flight(&self) -> usize {
        self.pending.len() + self.posted.len()
    }

    /// Send-queue entries in use on the acknowledgement queue pair: one per operation,
    /// and a mirror read's extra fenced reads (they complete with its last).
    fn ack_queue_used(&self) -> usize {
        self.ack_posted.len() + self.mirror_read.map_or(0, |(_, wrs)| wrs.saturating_sub(1))
    }
}

/// What an operation on an acknowledgement queue pair is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckKind {
    /// An acknowledgement write (completes with `WriteDone`).
    Write,
    /// A heartbeat read (internal; its result lands in the staging slot).
    Heartbeat,
    /// A read of `len` bytes of the peer's mirror into the mirror staging (completes
    /// with `ReadDone`).
    MirrorRead { len: u32 },
}

/// Where an operation on an acknowledgement queue pair is aimed.
#[derive(Debug, Clone, Copy)]
enum AckTarget {
    /// This offset of the peer's acknowledgement area for us.
    Area(u64),
    /// The start of the peer's log region (isolation tests: the NIC refuses it).
    LogRegion,
    /// The start of the peer's read mirror (isolation tests: the NIC refuses a write).
    Mirror,
}

/// An operation on an acknowledgement queue pair.
#[derive(Debug, Clone, Copy)]
struct AckOp {
    token: Token,
    kind: AckKind,
    /// Offset of its staging slot (heartbeats and writes).
    slot: usize,
}

/// An incoming side channel whose dialer is not identified yet.
struct Incoming {
    conn: Conn,
    deadline: Instant,
    hello: Option<(side::Hello, [u8; side::NONCE_LEN])>,
}

/// Wakes a blocked `poll` through an eventfd.
struct EventFdWaker(OwnedFd);

impl Wake for EventFdWaker {
    fn wake(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writing 8 bytes from a valid buffer to an eventfd we own.
        unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr().cast(), 8) };
    }
}

impl EventFdWaker {
    /// Clears the counter; true if a wake was pending.
    fn drain(&self) -> bool {
        let mut b = [0u8; 8];
        // SAFETY: reading 8 bytes into a valid buffer from a non-blocking eventfd.
        let n = unsafe { libc::read(self.0.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
        n == 8
    }
}

/// The RDMA transport. See the module docs.
pub struct RdmaTransport {
    cfg: RdmaConfig,
    links: BTreeMap<PeerId, Link>,
    incoming: Vec<Incoming>,
    listener: TcpListener,
    holder: Option<PeerId>,
    next_token: Token,
    /// Current queue pair numbers to their peer, and whether it is the acknowledgement
    /// queue pair.
    qpns: HashMap<u32, (PeerId, bool)>,
    pending_events: Vec<Event>,
    next_health: Instant,
    /// Permission changes that had to cycle a queue pair (modify failed or forced).
    permission_resets: u64,
    /// This replica's heartbeat counter.
    heartbeat: u64,
    /// When the peers' heartbeat counters are read next.
    next_heartbeat_read: Instant,
    /// Links failed because a peer's heartbeat counter stalled.
    heartbeat_failures: u64,
    waker: Arc<EventFdWaker>,
    wcs: Vec<ibv_wc>,
    // Drop order: links (queue pairs) above, then the regions, then the device.
    /// This replica's read mirror (remote read only), if configured.
    mirror: Option<Region>,
    staging: Region,
    region: Region,
    dev: Arc<Device>,
}

impl std::fmt::Debug for RdmaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaTransport")
            .field("local", &self.cfg.local)
            .field("device", &self.dev.name)
            .field("holder", &self.holder)
            .finish_non_exhaustive()
    }
}

/// The most bytes one [`RdmaTransport::write_ack`] carries.
pub const ACK_MAX_WRITE: usize = 256;
/// The most reads one [`RdmaTransport::read_mirror_chain`] posts (header, records,
/// header: a seqlocked read of the mirror in one post list).
pub const MIRROR_CHAIN_MAX: usize = 3;

const REMOTE_READ: u32 = ibv_access_flags::IBV_ACCESS_REMOTE_READ.0;
const REMOTE_WRITE: u32 = ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
const LOCAL_WRITE: u32 = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;

fn random_psn() -> u32 {
    let mut b = [0u8; 4];
    let _ = getrandom::fill(&mut b);
    u32::from_le_bytes(b) & 0x00ff_ffff
}

/// Starts a non-blocking connect.
fn dial(addr: SocketAddr) -> io::Result<TcpStream> {
    let (family, storage, len) = sockaddr(addr);
    // SAFETY: plain socket creation.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket we own from here on.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    // SAFETY: `storage` holds a valid sockaddr of `len` bytes.
    let rc = unsafe { libc::connect(fd, (&raw const storage).cast(), len) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
    }
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn sockaddr(addr: SocketAddr) -> (libc::c_int, libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            (libc::AF_INET, storage, std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            (libc::AF_INET6, storage, std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t)
        }
    }
}

fn check_range(r: &Region, offset: u64, len: usize) -> Result<usize, RdmaError> {
    let region = r.len();
    match usize::try_from(offset) {
        Ok(o) if o.checked_add(len).is_some_and(|end| end <= region) => Ok(o),
        _ => Err(RdmaError::OutOfRange { offset, len, region }),
    }
}

fn local_read(r: &Region, offset: u64, buf: &mut [u8]) -> Result<(), RdmaError> {
    let o = check_range(r, offset, buf.len())?;
    std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
    // SAFETY: the range is inside the mapping; a byte copy of memory the NIC may be
    // writing yields some bytes, which the caller validates (CRC, canary).
    unsafe { std::ptr::copy_nonoverlapping(r.ptr().add(o), buf.as_mut_ptr(), buf.len()) };
    Ok(())
}

fn local_write(r: &Region, offset: u64, data: &[u8]) -> Result<(), RdmaError> {
    let o = check_range(r, offset, data.len())?;
    // SAFETY: the range is inside the mapping.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), r.ptr().add(o), data.len()) };
    std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
    Ok(())
}

fn local_load_u64(r: &Region, offset: u64) -> Result<u64, RdmaError> {
    let o = check_range(r, offset, 8)?;
    if o % 8 != 0 {
        return Err(RdmaError::OutOfRange { offset, len: 8, region: r.len() });
    }
    // SAFETY: in range and aligned (the mapping is page-aligned).
    let v = unsafe { std::ptr::read_volatile(r.ptr().add(o).cast::<u64>()) };
    std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
    Ok(u64::from_le(v))
}

impl RdmaTransport {
    /// Opens the device, registers the log region and the staging memory, and listens
    /// for the side channel. Peers are dialed from the first [`Transport::poll`].
    pub fn open(cfg: RdmaConfig) -> Result<Self, RdmaError> {
        let listener = TcpListener::bind(cfg.listen)?;
        Self::with_listener(cfg, listener)
    }

    /// Like [`RdmaTransport::open`] with a listener bound by the caller.
    pub fn with_listener(cfg: RdmaConfig, listener: TcpListener) -> Result<Self, RdmaError> {
        let bad = |m: String| Err(RdmaError::Config(m));
        if cfg.local == 0 || cfg.peers.contains_key(&0) {
            return bad("node id 0 is not allowed".into());
        }
        if cfg.peers.contains_key(&cfg.local) {
            return bad(format!("the peer list contains the local node id {}", cfg.local));
        }
        if cfg.region_len == 0 {
            return bad("region_len must not be 0".into());
        }
        if cfg.max_payload > cfg.staging_per_peer || cfg.max_payload > u32::MAX as usize {
            return bad(format!(
                "max_payload {} must be at most staging_per_peer {} (and below 4 GiB)",
                cfg.max_payload, cfg.staging_per_peer
            ));
        }
        if cfg.depth == 0 || cfg.signal_every == 0 {
            return bad("depth and signal_every must be at least 1".into());
        }
        if !cfg.ack_area_len.is_multiple_of(8) {
            return bad(format!("ack_area_len {} must be a multiple of 8", cfg.ack_area_len));
        }
        if !cfg.mirror_len.is_multiple_of(8) || (cfg.mirror_len > 0 && cfg.ack_area_len == 0) {
            return bad(format!(
                "mirror_len {} must be a multiple of 8 and needs the acknowledgement path (ack_area_len {})",
                cfg.mirror_len, cfg.ack_area_len
            ));
        }
        if cfg.mirror_read_max == 0 || cfg.mirror_read_max > u32::MAX as usize {
            return bad(format!("mirror_read_max {} must be from 1 byte to 4 GiB", cfg.mirror_read_max));
        }
        listener.set_nonblocking(true)?;
        let npeers = cfg.peers.len().max(1);
        // Log and acknowledgement queue pairs share the completion queue.
        let cq_depth = (2 * cfg.depth as usize * npeers + 64).min(i32::MAX as usize) as i32;
        let dev = Device::open(cfg.device.as_deref(), cfg.port, cfg.gid_index, cq_depth)?;
        let region_access = LOCAL_WRITE | REMOTE_WRITE | REMOTE_READ;
        let region = match &cfg.region_path {
            Some(path) => Region::from_path(&dev, Pd::Log, path, cfg.region_len, region_access)?,
            None => Region::new(&dev, Pd::Log, cfg.region_len, region_access)?,
        };
        let per_peer = cfg.staging_per_peer.div_ceil(8) * 8;
        let staging = Region::new(&dev, Pd::Log, per_peer * npeers, LOCAL_WRITE)?;
        let now = Instant::now();
        // Remote READ only: no peer can write it, on any queue pair.
        let mirror =
            if cfg.mirror_len > 0 { Some(Region::new(&dev, Pd::Ack, cfg.mirror_len, REMOTE_READ)?) } else { None };
        let mut ack_regions = Vec::new();
        for _ in 0..cfg.peers.len() {
            ack_regions.push(if cfg.ack_area_len > 0 {
                let area = Region::new(&dev, Pd::Ack, cfg.ack_area_len, LOCAL_WRITE | REMOTE_WRITE | REMOTE_READ)?;
                let stage = Region::new(&dev, Pd::Ack, cfg.depth as usize * ACK_MAX_WRITE, LOCAL_WRITE)?;
                let mstage = Region::new(&dev, Pd::Ack, cfg.mirror_read_max.div_ceil(8) * 8, LOCAL_WRITE)?;
                (Some(area), Some(stage), Some(mstage))
            } else {
                (None, None, None)
            });
        }
        let links = cfg
            .peers
            .iter()
            .zip(ack_regions)
            .enumerate()
            .map(|(i, ((&id, &addr), (ack_in, ack_stage, mirror_stage)))| {
                let link = Link {
                    id,
                    addr,
                    dialer: cfg.local < id,
                    conn: None,
                    established: false,
                    dial_auth: None,
                    handshake_deadline: None,
                    next_dial: now,
                    backoff: cfg.reconnect_min,
                    qp: None,
                    gen: 0,
                    psn: 0,
                    ready: false,
                    remote: None,
                    up: false,
                    pending: VecDeque::new(),
                    posted: VecDeque::new(),
                    unsignaled: 0,
                    ring: Ring { cap: per_peer, head: 0, used: 0 },
                    stage_base: i * per_peer,
                    ack_qp: None,
                    ack_psn: 0,
                    ack_remote: None,
                    ack_posted: VecDeque::new(),
                    hb_read: None,
                    hb_seen: None,
                    ack_count: 0,
                    ack_in,
                    ack_stage,
                    mirror_remote: None,
                    mirror_stage,
                    mirror_read: None,
                };
                (id, link)
            })
            .collect();
        // SAFETY: creating an eventfd; the fd is owned below.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: `efd` is a fresh descriptor.
        let waker = Arc::new(EventFdWaker(unsafe { OwnedFd::from_raw_fd(efd) }));
        let first_token = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            .max(1);
        Ok(RdmaTransport {
            cfg,
            links,
            incoming: Vec::new(),
            listener,
            holder: None,
            next_token: first_token,
            qpns: HashMap::new(),
            pending_events: Vec::new(),
            next_health: now,
            permission_resets: 0,
            heartbeat: 0,
            next_heartbeat_read: now,
            heartbeat_failures: 0,
            waker,
            // SAFETY: an all-zero work completion is valid.
            wcs: (0..32).map(|_| unsafe { std::mem::zeroed() }).collect(),
            mirror,
            staging,
            region,
            dev,
        })
    }

    /// The side channel's listening address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The RDMA device in use.
    pub fn device_name(&self) -> &str {
        &self.dev.name
    }

    /// Length of this replica's log region.
    pub fn region_len(&self) -> usize {
        self.region.len()
    }

    /// Base address of the log region. Remote writes land there at any time: access it
    /// only with volatile or atomic operations, never through a `&[u8]` held across them.
    pub fn region_ptr(&self) -> *mut u8 {
        self.region.ptr()
    }

    /// Copies `buf.len()` bytes at `offset` of the log region into `buf` (after an
    /// acquire fence: a canary read before with [`RdmaTransport::load_u64`] orders it).
    pub fn read_region(&self, offset: u64, buf: &mut [u8]) -> Result<(), RdmaError> {
        local_read(&self.region, offset, buf)
    }

    /// Copies `data` into the log region at `offset` (the owner's own writes).
    pub fn write_region(&mut self, offset: u64, data: &[u8]) -> Result<(), RdmaError> {
        local_write(&self.region, offset, data)
    }

    /// A volatile load of the little-endian u64 at `offset` (8-byte aligned), followed
    /// by an acquire fence: poll a canary with it, then read what it guards.
    pub fn load_u64(&self, offset: u64) -> Result<u64, RdmaError> {
        local_load_u64(&self.region, offset)
    }

    /// Bytes of the acknowledgement area this replica keeps for each peer (0: none).
    pub fn ack_area_len(&self) -> usize {
        self.cfg.ack_area_len
    }

    /// Length of `peer`'s acknowledgement area for this replica, once the
    /// acknowledgement queue pair to it is connected: [`RdmaTransport::write_ack`]
    /// works while this is `Some`.
    pub fn peer_ack_area_len(&self, peer: PeerId) -> Option<u64> {
        let link = self.links.get(&peer)?;
        if !link.ready || link.ack_qp.is_none() {
            return None;
        }
        link.ack_remote.map(|a| a.len)
    }

    fn ack_in(&self, peer: PeerId) -> Result<&Region, RdmaError> {
        self.links
            .get(&peer)
            .and_then(|l| l.ack_in.as_ref())
            .ok_or_else(|| RdmaError::Config(format!("no acknowledgement area for peer {peer}")))
    }

    /// Copies `buf.len()` bytes at `offset` of the acknowledgement area that `peer`
    /// writes into `buf` (after an acquire fence, as [`RdmaTransport::read_region`]).
    pub fn read_ack_area(&self, peer: PeerId, offset: u64, buf: &mut [u8]) -> Result<(), RdmaError> {
        local_read(self.ack_in(peer)?, offset, buf)
    }

    /// A volatile load of the little-endian u64 at `offset` (8-byte aligned) of the
    /// acknowledgement area that `peer` writes, followed by an acquire fence.
    pub fn load_ack_u64(&self, peer: PeerId, offset: u64) -> Result<u64, RdmaError> {
        local_load_u64(self.ack_in(peer)?, offset)
    }

    /// Copies `data` into the acknowledgement area that `peer` writes, at `offset` (the
    /// owner's own writes, e.g. clearing it).
    pub fn write_ack_area(&mut self, peer: PeerId, offset: u64, data: &[u8]) -> Result<(), RdmaError> {
        local_write(self.ack_in(peer)?, offset, data)
    }

    /// Writes `data` (at most [`ACK_MAX_WRITE`] bytes) at `offset` of `to`'s
    /// acknowledgement area for this replica with a one-sided RDMA WRITE on the
    /// acknowledgement queue pair, posted at once and signalled. It completes exactly
    /// once with [`Event::WriteDone`] under the returned token: `Ok` when the bytes are
    /// in `to`'s memory, `LinkFailed` when the link failed first (the bytes may or may
    /// not have landed). Refused at issue: `LinkDown` when there is no connected
    /// acknowledgement queue pair (see [`RdmaTransport::peer_ack_area_len`]), `TooLarge`
    /// past [`ACK_MAX_WRITE`] or past the end of the area, `Backpressure` with `depth`
    /// operations in flight. `Denied` is never the answer: the acknowledgement path has
    /// no permission to lose. The first 8 bytes of the area are `to`'s heartbeat counter.
    pub fn write_ack(&mut self, to: PeerId, offset: u64, data: &[u8]) -> Result<Token, SendError> {
        self.post_ack(to, AckTarget::Area(offset), data, false)
    }

    /// `peer`'s heartbeat counter as last read by RDMA READ (with
    /// [`RdmaConfig::heartbeat_timeout`] set), since its link last came up.
    pub fn peer_heartbeat(&self, peer: PeerId) -> Option<u64> {
        self.links.get(&peer)?.hb_seen.map(|(v, _)| v)
    }

    /// How many links were failed because the peer's heartbeat counter stalled.
    pub fn heartbeat_failures(&self) -> u64 {
        self.heartbeat_failures
    }

    /// The largest single [`RdmaTransport::read_mirror`] ([`RdmaConfig::mirror_read_max`]).
    pub fn mirror_read_max(&self) -> usize {
        self.cfg.mirror_read_max
    }

    /// Length of this replica's read mirror (0: none).
    pub fn mirror_len(&self) -> usize {
        self.mirror.as_ref().map_or(0, Region::len)
    }

    /// Copies `data` into this replica's read mirror at `offset`, then a release fence:
    /// stores issued by one call are visible to a later RDMA READ no earlier than those
    /// of an earlier call (x86 stores are seen in program order, by the NIC's DMA too).
    pub fn write_mirror(&mut self, offset: u64, data: &[u8]) -> Result<(), RdmaError> {
        let m = self.mirror.as_ref().ok_or_else(|| RdmaError::Config("no read mirror configured".into()))?;
        local_write(m, offset, data)
    }

    /// Copies bytes of this replica's own read mirror into `buf` (tests, checks).
    pub fn read_own_mirror(&self, offset: u64, buf: &mut [u8]) -> Result<(), RdmaError> {
        let m = self.mirror.as_ref().ok_or_else(|| RdmaError::Config("no read mirror configured".into()))?;
        local_read(m, offset, buf)
    }

    /// Length of `peer`'s read mirror, while [`RdmaTransport::read_mirror`] to it can be
    /// issued (the acknowledgement queue pair is connected and the peer offered one).
    pub fn peer_mirror_len(&self, peer: PeerId) -> Option<u64> {
        let link = self.links.get(&peer)?;
        if !link.ready || link.ack_qp.is_none() {
            return None;
        }
        link.mirror_remote.map(|m| m.len)
    }

    /// Reads `len` bytes at `offset` of `from`'s read mirror with a one-sided RDMA READ:
    /// [`RdmaTransport::read_mirror_chain`] of one part.
    pub fn read_mirror(&mut self, from: PeerId, offset: u64, len: u32) -> Result<Token, SendError> {
        self.read_mirror_chain(from, &[(offset, len)])
    }

    /// Reads the `parts` (`(offset, len)` each, 1 to [`MIRROR_CHAIN_MAX`] of them) of
    /// `from`'s read mirror with one-sided RDMA READs on the acknowledgement queue pair,
    /// posted at once as one list: each read after the first is fenced
    /// (`IBV_SEND_FENCE`: the NIC starts it only once the reads before it completed, so
    /// it samples the peer's memory after they did), and only the last is signalled.
    /// The bytes land one part after the other in the mirror staging. It completes
    /// exactly once with [`Event::ReadDone`] under the returned token: the parts' bytes
    /// concatenated, or `LinkFailed` (a failed link; the link is renewed). Refused at
    /// issue: `LinkDown` without a connected acknowledgement queue pair or a peer
    /// mirror; `TooLarge` when the parts together pass
    /// [`RdmaConfig::mirror_read_max`], one passes the mirror's end, or there are none
    /// or more than [`MIRROR_CHAIN_MAX`]; `Backpressure` while a mirror read to `from` is
    /// in flight (one at a time) or the send queue has no room for the parts.
    pub fn read_mirror_chain(&mut self, from: PeerId, parts: &[(u64, u32)]) -> Result<Token, SendError> {
        let depth = self.cfg.depth as usize;
        let max = self.cfg.mirror_read_max;
        if parts.is_empty() || parts.len() > MIRROR_CHAIN_MAX {
            return Err(SendError::TooLarge { size: parts.len(), limit: MIRROR_CHAIN_MAX });
        }
        let token = self.token();
        let link = self.links.get_mut(&from).ok_or(SendError::UnknownPeer(from))?;
        let (Some(qp), Some(m), Some(stage), true) =
            (link.ack_qp.as_ref(), link.mirror_remote, link.mirror_stage.as_ref(), link.ready)
        else {
            return Err(SendError::LinkDown(from));
        };
        let total: usize = parts.iter().map(|&(_, len)| len as usize).sum();
        if total > max {
            return Err(SendError::TooLarge { size: total, limit: max });
        }
        for &(offset, len) in parts {
            if offset.checked_add(u64::from(len)).is_none_or(|end| end > m.len) {
                let limit = (m.len.saturating_sub(offset) as usize).min(max);
                return Err(SendError::TooLarge { size: len as usize, limit });
            }
        }
        if link.mirror_read.is_some() || link.ack_posted.len() + parts.len() > depth {
            return Err(SendError::Backpressure(from));
        }
        let mut sges = [ibv_sge { addr: 0, length: 0, lkey: 0 }; MIRROR_CHAIN_MAX];
        // SAFETY: an all-zero work request is valid; fields set below.
        let mut wrs: [ibv_send_wr; MIRROR_CHAIN_MAX] = unsafe { std::mem::zeroed() };
        let mut at = 0u64;
        for (i, &(offset, len)) in parts.iter().enumerate() {
            sges[i] = ibv_sge { addr: stage.ptr() as u64 + at, length: len, lkey: stage.lkey() };
            at += u64::from(len);
            let wr = &mut wrs[i];
            // An error on any of them completes with this id: the read fails as a whole.
            wr.wr_id = token;
            wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_READ;
            wr.num_sge = if len == 0 { 0 } else { 1 };
            let mut flags = 0;
            if i > 0 {
                flags |= ibv_send_flags::IBV_SEND_FENCE.0;
            }
            if i + 1 == parts.len() {
                flags |= ibv_send_flags::IBV_SEND_SIGNALED.0;
            }
            wr.send_flags = flags;
            wr.wr.rdma = rdma_sys::rdma_t { remote_addr: m.addr + offset, rkey: m.rkey };
        }
        // Tie the list together now that neither array moves any more.
        let (head, sge): (*mut ibv_send_wr, *mut ibv_sge) = (wrs.as_mut_ptr(), sges.as_mut_ptr());
        for i in 0..parts.len() {
            // SAFETY: indexes within the arrays (parts.len() <= MIRROR_CHAIN_MAX).
            unsafe {
                (*head.add(i)).sg_list = sge.add(i);
                (*head.add(i)).next = if i + 1 < parts.len() { head.add(i + 1) } else { std::ptr::null_mut() };
            }
        }
        // SAFETY: a list of work requests whose SGEs point one after the other into this
        // link's registered mirror staging (acknowledgement protection domain, `total`
        // <= its size), which outlives the queue pair; one mirror read at a time, so
        // nothing else lands there; the arrays live until post returns.
        let r = unsafe { qp.post(head) };
        match r {
            Ok(()) => {
                link.mirror_read = Some((token, parts.len()));
                let len = total as u32;
                link.ack_posted.push_back(AckOp { token, kind: AckKind::MirrorRead { len }, slot: 0 });
                Ok(token)
            }
            Err((rc, _)) => {
                let why = format!("ibv_post_send (mirror read) failed: {}", io::Error::from_raw_os_error(rc.abs()));
                let mut events = std::mem::take(&mut self.pending_events);
                self.fail_qp(from, &why, None, &mut events);
                self.pending_events = events;
                Err(SendError::LinkDown(from))
            }
        }
    }

    /// Isolation check (tests): posts `data` on the acknowledgement queue pair to `to`
    /// aimed at `to`'s **log region** (its address and rkey from the bootstrap), as a
    /// faulty or malicious peer would. The acknowledgement queue pair is in another
    /// protection domain, so the NIC must refuse it: the write completes with an error
    /// (and the link is renewed), and `to`'s log region is unchanged.
    pub fn write_log_region_through_ack_qp(&mut self, to: PeerId, data: &[u8]) -> Result<Token, SendError> {
        self.post_ack(to, AckTarget::LogRegion, data, false)
    }

    /// Isolation check (tests): posts an RDMA WRITE of `data` on the acknowledgement
    /// queue pair to `to` aimed at `to`'s **read mirror** (its address and rkey from the
    /// bootstrap). The mirror is registered for remote READ only, so the NIC must refuse
    /// it: the write completes with an error (and the link is renewed), and the mirror is
    /// unchanged.
    pub fn write_mirror_through_ack_qp(&mut self, to: PeerId, data: &[u8]) -> Result<Token, SendError> {
        self.post_ack(to, AckTarget::Mirror, data, false)
    }

    /// Posts one signalled operation on the acknowledgement queue pair to `to`: a write
    /// of `data` at `offset` of its acknowledgement area, or (`None`) at the start of its
    /// log region; or (`heartbeat`) an RDMA READ of the 8-byte heartbeat counter at
    /// `offset` (0) of its acknowledgement area into the staging slot (`data` unused).
    fn post_ack(&mut self, to: PeerId, target: AckTarget, data: &[u8], heartbeat: bool) -> Result<Token, SendError> {
        let data = if heartbeat { &[0u8; 8][..] } else { data };
        if data.len() > ACK_MAX_WRITE {
            return Err(SendError::TooLarge { size: data.len(), limit: ACK_MAX_WRITE });
        }
        let depth = self.cfg.depth as usize;
        let token = self.token();
        let link = self.links.get_mut(&to).ok_or(SendError::UnknownPeer(to))?;
        let (Some(qp), Some(area), Some(log), Some(stage), true) =
            (link.ack_qp.as_ref(), link.ack_remote, link.remote, link.ack_stage.as_ref(), link.ready)
        else {
            return Err(SendError::LinkDown(to));
        };
        let mirror = link.mirror_remote;
        let (remote_addr, rkey) = match target {
            AckTarget::Area(offset) => {
                if offset.checked_add(data.len() as u64).is_none_or(|end| end > area.len) {
                    let limit = area.len.saturating_sub(offset) as usize;
                    return Err(SendError::TooLarge { size: data.len(), limit });
                }
                (area.addr + offset, area.rkey)
            }
            AckTarget::LogRegion => (log.addr, log.rkey),
            AckTarget::Mirror => match mirror {
                Some(m) => (m.addr, m.rkey),
                None => return Err(SendError::LinkDown(to)),
            },
        };
        if link.ack_queue_used() >= depth {
            return Err(SendError::Backpressure(to));
        }
        // At most `depth` writes are posted and they complete in order, so the slot of
        // the write `depth` back is free again.
        let slot = (link.ack_count % depth as u64) as usize * ACK_MAX_WRITE;
        if !heartbeat {
            // SAFETY: the slot lies inside the staging region (depth slots of ACK_MAX_WRITE).
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), stage.ptr().add(slot), data.len()) };
        }
        let mut sge = ibv_sge { addr: stage.ptr() as u64 + slot as u64, length: data.len() as u32, lkey: stage.lkey() };
        // SAFETY: an all-zero work request is valid; fields set below.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = token;
        wr.opcode = if heartbeat { ibv_wr_opcode::IBV_WR_RDMA_READ } else { ibv_wr_opcode::IBV_WR_RDMA_WRITE };
        wr.num_sge = if data.is_empty() { 0 } else { 1 };
        wr.sg_list = &raw mut sge;
        let mut flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
        if !heartbeat && data.len() as u32 <= qp.max_inline {
            flags |= ibv_send_flags::IBV_SEND_INLINE.0;
        }
        wr.send_flags = flags;
        wr.wr.rdma = rdma_sys::rdma_t { remote_addr, rkey };
        // SAFETY: one work request whose SGE points into registered staging memory of the
        // acknowledgement protection domain, which outlives the queue pair.
        let r = unsafe { qp.post(&raw mut wr) };
        match r {
            Ok(()) => {
                link.ack_count += 1;
                let kind = if heartbeat { AckKind::Heartbeat } else { AckKind::Write };
                link.ack_posted.push_back(AckOp { token, kind, slot });
                Ok(token)
            }
            Err((rc, _)) => {
                let why = format!("ibv_post_send (ack) failed: {}", io::Error::from_raw_os_error(rc.abs()));
                let mut events = std::mem::take(&mut self.pending_events);
                self.fail_qp(to, &why, None, &mut events);
                self.pending_events = events;
                Err(SendError::LinkDown(to))
            }
        }
    }

    /// How many permission changes cycled a queue pair through reset instead of
    /// modifying its access flags in place (the fallback path).
    pub fn permission_resets(&self) -> u64 {
        self.permission_resets
    }

    /// Fault injection: moves the queue pairs to `peer` (log and acknowledgement) to the
    /// error state, as a failing NIC or cable would. The transport notices (error
    /// completions or its periodic check) and handles it as a failed link.
    pub fn break_link(&mut self, peer: PeerId) -> Result<(), RdmaError> {
        let link = self.links.get(&peer);
        match link.and_then(|l| l.qp.as_ref()) {
            Some(qp) => {
                if let Some(ack) = link.and_then(|l| l.ack_qp.as_ref()) {
                    ack.to_error()?;
                }
                qp.to_error()
            }
            None => Err(RdmaError::Config(format!("no queue pair to peer {peer}"))),
        }
    }

    /// What the bootstrap offers of our read mirror.
    fn mirror_endpoint(&self) -> Option<MirrorEndpoint> {
        self.mirror.as_ref().map(|m| MirrorEndpoint { addr: m.ptr() as u64, rkey: m.rkey(), len: m.len() as u64 })
    }

    fn access_for(holder: Option<PeerId>, peer: PeerId) -> u32 {
        if holder == Some(peer) {
            REMOTE_READ | REMOTE_WRITE
        } else {
            REMOTE_READ
        }
    }

    fn token(&mut self) -> Token {
        let t = self.next_token;
        self.next_token = self.next_token.wrapping_add(1).max(1);
        t
    }

    /// Applies the permission of `peer` to its queue pair (modify, else cycle).
    fn apply_access(&mut self, peer: PeerId) {
        let access = Self::access_for(self.holder, peer);
        let by_reset = self.cfg.permission_by_reset;
        let Some(link) = self.links.get_mut(&peer) else { return };
        let Some(qp) = link.qp.as_ref() else { return };
        let modified = if by_reset { Err(None) } else { qp.set_access(access).map_err(Some) };
        if let Err(e) = modified {
            self.permission_resets += 1;
            let why = match e {
                Some(e) => format!("permission change by queue-pair reset ({e})"),
                None => "permission change by queue-pair reset".to_string(),
            };
            let mut events = std::mem::take(&mut self.pending_events);
            self.fail_qp(peer, &why, None, &mut events);
            self.pending_events = events;
        }
    }

    /// Completes `op` with `result` and frees its staging.
    fn complete(link: &mut Link, staging: &Region, op: Op, result: Result<(), AccessError>, events: &mut Vec<Event>) {
        link.ring.free(op.charged);
        let peer = link.id;
        if op.read {
            let result = result.map(|()| {
                // SAFETY: the READ completed into this range of the staging region.
                let src = unsafe { staging.ptr().add(link.stage_base + op.stage_off) };
                Bytes::copy_from_slice(unsafe { std::slice::from_raw_parts(src, op.len as usize) })
            });
            events.push(Event::ReadDone { from: peer, token: op.token, result });
        } else {
            events.push(Event::WriteDone { to: peer, token: op.token, result: result.map(|()| Bytes::new()) });
        }
    }

    /// Tears down the queue pair to `peer`: fails what is in flight (`denied`: writes
    /// are refused by the target rather than lost), reports PeerDown, and starts a
    /// renewal if the side channel is up.
    fn fail_qp(&mut self, peer: PeerId, why: &str, denied: Option<()>, events: &mut Vec<Event>) {
        let staging = &self.staging;
        let Some(link) = self.links.get_mut(&peer) else { return };
        if let Some(qp) = link.qp.take() {
            let _ = qp.to_error();
            self.qpns.remove(&qp.qpn);
            drop(qp);
        }
        if let Some(qp) = link.ack_qp.take() {
            let _ = qp.to_error();
            self.qpns.remove(&qp.qpn);
            drop(qp);
        }
        link.ack_remote = None;
        link.mirror_remote = None;
        link.mirror_read = None;
        link.hb_read = None;
        link.hb_seen = None;
        for op in link.ack_posted.drain(..) {
            let failed = AccessError::LinkFailed(why.to_string());
            match op.kind {
                AckKind::Write => events.push(Event::WriteDone { to: peer, token: op.token, result: Err(failed) }),
                AckKind::MirrorRead { .. } => {
                    events.push(Event::ReadDone { from: peer, token: op.token, result: Err(failed) })
                }
                AckKind::Heartbeat => {}
            }
        }
        let ops: Vec<Op> = link.posted.drain(..).chain(link.pending.drain(..)).collect();
        for op in ops {
            let r = if denied.is_some() && !op.read {
                Err(AccessError::Denied { detail: Bytes::new() })
            } else {
                Err(AccessError::LinkFailed(why.to_string()))
            };
            Self::complete(link, staging, op, r, events);
        }
        link.ring.reset();
        link.unsignaled = 0;
        link.ready = false;
        link.remote = None;
        if link.up {
            link.up = false;
            events.push(Event::PeerDown { peer, reason: why.to_string() });
        }
        if link.established {
            let r = if link.dialer {
                self.offer(peer)
            } else {
                let gen = link.gen;
                link.conn.as_mut().map_or(Ok(()), |c| c.push(kind::QP_RENEW, &[&gen.to_le_bytes()]))
            };
            if let Err(e) = r {
                self.fail_conn(peer, &e.to_string(), events);
            }
        }
    }

    /// Closes the side channel to `peer` (and its queue pair); the dialer redials later.
    fn fail_conn(&mut self, peer: PeerId, why: &str, events: &mut Vec<Event>) {
        if let Some(link) = self.links.get_mut(&peer) {
            link.established = false;
            link.conn = None;
            link.dial_auth = None;
            link.handshake_deadline = None;
            link.gen = if link.dialer { link.gen } else { 0 };
            link.next_dial = Instant::now() + link.backoff;
            link.backoff = (link.backoff * 2).min(self.cfg.reconnect_max);
        }
        self.fail_qp(peer, why, None, events);
    }

    /// Dialer: creates a queue pair of a new generation and offers it.
    fn offer(&mut self, peer: PeerId) -> Result<(), SideError> {
        let access = Self::access_for(self.holder, peer);
        let mirror_ep = self.mirror_endpoint();
        let ep_base = (self.region.ptr() as u64, self.region.rkey(), self.region.len() as u64);
        let dev = self.dev.clone();
        let (depth, inline) = (self.cfg.depth, self.cfg.max_inline);
        let link = self.links.get_mut(&peer).expect("offer to a known peer");
        let qp = Qp::new(&dev, Pd::Log, depth, inline)
            .and_then(|qp| qp.init(access).map(|()| qp))
            .map_err(|e| SideError::Io(io::Error::other(e.to_string())))?;
        let ack_qp = match &link.ack_in {
            Some(area) => {
                let q = Qp::new(&dev, Pd::Ack, depth, inline)
                    .and_then(|q| q.init(REMOTE_WRITE | REMOTE_READ).map(|()| q))
                    .map_err(|e| SideError::Io(io::Error::other(e.to_string())))?;
                link.ack_psn = random_psn();
                let a = AckEndpoint {
                    qpn: q.qpn,
                    psn: link.ack_psn,
                    addr: area.ptr() as u64,
                    rkey: area.rkey(),
                    len: area.len() as u64,
                };
                Some((q, a))
            }
            None => None,
        };
        link.gen += 1;
        link.psn = random_psn();
        let ep = Endpoint {
            qpn: qp.qpn,
            psn: link.psn,
            lid: dev.lid,
            gid: dev.gid,
            addr: ep_base.0,
            rkey: ep_base.1,
            len: ep_base.2,
        };
        self.qpns.insert(qp.qpn, (peer, false));
        link.qp = Some(qp);
        let ack_ep = ack_qp.map(|(q, a)| {
            self.qpns.insert(q.qpn, (peer, true));
            link.ack_qp = Some(q);
            a
        });
        let p = side::encode_bootstrap(link.gen, &ep, ack_ep.as_ref(), mirror_ep.as_ref());
        link.conn.as_mut().map_or(Ok(()), |c| c.push(kind::QP_OFFER, &[&p]))
    }

    /// Acceptor: answers an offer with a connected queue pair of its own.
    fn accept_offer(
        &mut self,
        peer: PeerId,
        gen: u64,
        remote: Endpoint,
        ack_remote: Option<AckEndpoint>,
        mirror_remote: Option<MirrorEndpoint>,
        events: &mut Vec<Event>,
    ) -> Result<(), SideError> {
        let mirror_ep = self.mirror_endpoint();
        if self.links[&peer].qp.is_some() {
            self.fail_qp_quiet(peer, "queue pair renewed by the peer", events);
        }
        let access = Self::access_for(self.holder, peer);
        let dev = self.dev.clone();
        let (depth, inline) = (self.cfg.depth, self.cfg.max_inline);
        let ep_base = (self.region.ptr() as u64, self.region.rkey(), self.region.len() as u64);
        let link = self.links.get_mut(&peer).expect("known peer");
        let psn = random_psn();
        let io_err = |e: RdmaError| SideError::Io(io::Error::other(e.to_string()));
        let qp = Qp::new(&dev, Pd::Log, depth, inline)
            .and_then(|qp| qp.init(access).map(|()| qp))
            .and_then(|qp| qp.connect(&remote, psn).map(|()| qp))
            .map_err(io_err)?;
        // The acknowledgement queue pair, when both sides have an acknowledgement area.
        let ack = match (&link.ack_in, ack_remote) {
            (Some(area), Some(theirs)) => {
                let ack_psn = random_psn();
                let q = Qp::new(&dev, Pd::Ack, depth, inline)
                    .and_then(|q| q.init(REMOTE_WRITE | REMOTE_READ).map(|()| q))
                    .and_then(|q| q.connect(&theirs.endpoint(&remote), ack_psn).map(|()| q))
                    .map_err(io_err)?;
                let ours = AckEndpoint {
                    qpn: q.qpn,
                    psn: ack_psn,
                    addr: area.ptr() as u64,
                    rkey: area.rkey(),
                    len: area.len() as u64,
                };
                Some((q, ours, theirs))
            }
            _ => None,
        };
        let ep =
            Endpoint { qpn: qp.qpn, psn, lid: dev.lid, gid: dev.gid, addr: ep_base.0, rkey: ep_base.1, len: ep_base.2 };
        self.qpns.insert(qp.qpn, (peer, false));
        link.qp = Some(qp);
        link.gen = gen;
        link.psn = psn;
        link.remote = Some(remote);
        link.ready = false;
        let ack_ep = ack.map(|(q, ours, theirs)| {
            self.qpns.insert(q.qpn, (peer, true));
            link.ack_qp = Some(q);
            link.ack_psn = ours.psn;
            link.ack_remote = Some(theirs);
            link.mirror_remote = mirror_remote;
            ours
        });
        let p = side::encode_bootstrap(gen, &ep, ack_ep.as_ref(), mirror_ep.as_ref());
        link.conn.as_mut().map_or(Ok(()), |c| c.push(kind::QP_ACCEPT, &[&p]))
    }

    /// Like `fail_qp` but without starting a renewal (the peer is renewing).
    fn fail_qp_quiet(&mut self, peer: PeerId, why: &str, events: &mut Vec<Event>) {
        let est = self.links.get_mut(&peer).map(|l| std::mem::replace(&mut l.established, false));
        self.fail_qp(peer, why, None, events);
        if let (Some(e), Some(l)) = (est, self.links.get_mut(&peer)) {
            l.established = e;
        }
    }

    fn handle_frame(
        &mut self,
        peer: PeerId,
        f: crate::envelope::Frame,
        events: &mut Vec<Event>,
    ) -> Result<(), SideError> {
        let link = self.links.get_mut(&peer).expect("known peer");
        if !link.established {
            // Only a dialer gets here: the acceptor's side is identified in `Incoming`.
            let auth = link.dial_auth.take();
            match (f.kind, auth) {
                (kind::CHALLENGE, Some(DialAuth::Hello { nonce_d })) => {
                    let nonce_a = side::decode32("CHALLENGE", &f.payload)?;
                    let p = side::proof(
                        self.cfg.secret.as_deref(),
                        1,
                        self.cfg.cluster_id,
                        self.cfg.local,
                        peer,
                        self.cfg.config_digest,
                        &nonce_a,
                        &nonce_d,
                    );
                    link.dial_auth = Some(DialAuth::Auth { nonce_d, nonce_a });
                    link.conn.as_mut().expect("conn").push(kind::AUTH, &[&p])?;
                    return Ok(());
                }
                (kind::WELCOME, Some(DialAuth::Auth { nonce_d, nonce_a })) => {
                    let want = side::proof(
                        self.cfg.secret.as_deref(),
                        2,
                        self.cfg.cluster_id,
                        self.cfg.local,
                        peer,
                        self.cfg.config_digest,
                        &nonce_a,
                        &nonce_d,
                    );
                    if !side::verify(self.cfg.secret.as_deref(), &want, &f.payload) {
                        return Err(SideError::PeerNotAuthenticated);
                    }
                    link.established = true;
                    link.handshake_deadline = None;
                    link.backoff = self.cfg.reconnect_min;
                    return self.offer(peer);
                }
                (kind::REJECT, _) => {
                    return Err(SideError::Rejected(String::from_utf8_lossy(&f.payload).into_owned()));
                }
                (k, _) => return Err(SideError::Unexpected { kind: k, when: "during the handshake" }),
            }
        }
        match f.kind {
            kind::MSG => events.push(Event::Message { from: peer, payload: f.payload }),
            kind::QP_OFFER if !link.dialer => {
                let (gen, ep, ack, mirror) = side::decode_bootstrap("QP_OFFER", &f.payload)?;
                if gen > link.gen || link.qp.is_none() {
                    self.accept_offer(peer, gen, ep, ack, mirror, events)?;
                }
            }
            kind::QP_ACCEPT if link.dialer => {
                let (gen, ep, ack, mirror) = side::decode_bootstrap("QP_ACCEPT", &f.payload)?;
                if gen == link.gen && !link.ready {
                    if let Some(qp) = link.qp.as_ref() {
                        let mut r = qp.connect(&ep, link.psn);
                        let ack_ep = match (link.ack_qp.as_ref(), ack) {
                            (Some(q), Some(a)) => {
                                if r.is_ok() {
                                    r = q.connect(&a.endpoint(&ep), link.ack_psn);
                                }
                                Some(a)
                            }
                            _ => None,
                        };
                        if let Err(e) = r {
                            let why = format!("queue pair connect failed: {e}");
                            self.fail_qp(peer, &why, None, events);
                            return Ok(());
                        }
                        if ack_ep.is_none() {
                            // The peer has no acknowledgement path: ours goes unused.
                            if let Some(q) = link.ack_qp.take() {
                                self.qpns.remove(&q.qpn);
                            }
                        }
                        link.mirror_remote = if ack_ep.is_some() { mirror } else { None };
                        link.ack_remote = ack_ep;
                        link.remote = Some(ep);
                        link.ready = true;
                        link.up = true;
                        link.conn.as_mut().expect("conn").push(kind::QP_READY, &[&gen.to_le_bytes()])?;
                        events.push(Event::PeerUp { peer });
                    }
                }
            }
            kind::QP_READY if !link.dialer => {
                let (gen, _) = side::decode_gen("QP_READY", &f.payload, 0)?;
                if gen == link.gen && link.qp.is_some() && !link.ready {
                    link.ready = true;
                    link.up = true;
                    events.push(Event::PeerUp { peer });
                }
            }
            kind::QP_RENEW if link.dialer => {
                let (gen, _) = side::decode_gen("QP_RENEW", &f.payload, 0)?;
                if gen == link.gen {
                    // Take the completions that explain the failure first (a denied
                    // write reports Denied rather than LinkFailed).
                    self.poll_cq(events);
                    if self.links[&peer].gen == gen && self.links[&peer].qp.is_some() {
                        self.fail_qp(peer, "the peer's queue pair failed", None, events);
                    }
                }
            }
            k => return Err(SideError::Unexpected { kind: k, when: "on an established side channel" }),
        }
        Ok(())
    }

    /// Acceptor side of the handshake for one incoming connection. `Ok(Some(peer))`
    /// when it authenticated.
    fn handle_incoming(&mut self, inc: &mut Incoming, f: crate::envelope::Frame) -> Result<Option<PeerId>, SideError> {
        let secret = self.cfg.secret.as_deref();
        match (f.kind, inc.hello.take()) {
            (kind::HELLO, None) => {
                let h = side::decode_hello(&f.payload)?;
                if h.cluster != self.cfg.cluster_id {
                    return Err(SideError::WrongCluster { got: h.cluster, expected: self.cfg.cluster_id });
                }
                if h.acceptor != self.cfg.local {
                    return Err(SideError::WrongTarget { target: h.acceptor, local: self.cfg.local });
                }
                if !self.links.contains_key(&h.dialer) || h.dialer >= self.cfg.local {
                    return Err(SideError::UnknownNode(h.dialer));
                }
                let nonce_a = side::nonce()?;
                inc.conn.push(kind::CHALLENGE, &[&nonce_a])?;
                inc.hello = Some((h, nonce_a));
                Ok(None)
            }
            (kind::AUTH, Some((h, nonce_a))) => {
                let want = side::proof(secret, 1, h.cluster, h.dialer, self.cfg.local, h.digest, &nonce_a, &h.nonce_d);
                if !side::verify(secret, &want, &f.payload) {
                    return Err(SideError::AuthFailed(h.dialer));
                }
                if h.digest != self.cfg.config_digest {
                    return Err(SideError::StaleConfig {
                        node: h.dialer,
                        got: h.digest,
                        expected: self.cfg.config_digest,
                    });
                }
                let p = side::proof(secret, 2, h.cluster, h.dialer, self.cfg.local, h.digest, &nonce_a, &h.nonce_d);
                inc.conn.push(kind::WELCOME, &[&p])?;
                Ok(Some(h.dialer))
            }
            (k, _) => Err(SideError::Unexpected { kind: k, when: "during the handshake" }),
        }
    }

    /// Accepts, dials, reads and writes side channels, posts queued accesses, polls the
    /// completion queue and checks queue-pair health, once.
    fn io_once(&mut self, events: &mut Vec<Event>) {
        let now = Instant::now();
        // New side channels.
        for _ in 0..64 {
            match self.listener.accept() {
                Ok((s, _)) => {
                    if s.set_nonblocking(true).is_ok() && s.set_nodelay(true).is_ok() {
                        let max = (self.cfg.max_payload + 64) as u32;
                        self.incoming.push(Incoming {
                            conn: Conn::new(s, false, max),
                            deadline: now + self.cfg.handshake_timeout,
                            hello: None,
                        });
                    }
                }
                Err(_) => break,
            }
        }
        // Dial.
        let ids: Vec<PeerId> = self.links.keys().copied().collect();
        for &id in &ids {
            let link = self.links.get_mut(&id).expect("id");
            if link.dialer && link.conn.is_none() && now >= link.next_dial {
                let nonce_d = match side::nonce() {
                    Ok(n) => n,
                    Err(_) => continue,
                };
                match dial(link.addr) {
                    Ok(s) => {
                        let mut c = Conn::new(s, true, (self.cfg.max_payload + 64) as u32);
                        let h = side::hello(self.cfg.cluster_id, self.cfg.local, id, self.cfg.config_digest, &nonce_d);
                        let _ = c.push(kind::HELLO, &[&h]);
                        link.conn = Some(c);
                        link.dial_auth = Some(DialAuth::Hello { nonce_d });
                        link.handshake_deadline = Some(now + self.cfg.handshake_timeout);
                    }
                    Err(_) => {
                        link.next_dial = now + link.backoff;
                        link.backoff = (link.backoff * 2).min(self.cfg.reconnect_max);
                    }
                }
            }
        }
        // Incoming handshakes.
        let mut incoming = std::mem::take(&mut self.incoming);
        let mut keep = Vec::with_capacity(incoming.len());
        for mut inc in incoming.drain(..) {
            let mut frames = Vec::new();
            let r = inc.conn.flush().and_then(|()| inc.conn.read_frames(&mut frames));
            let mut outcome: Result<Option<PeerId>, SideError> = match r {
                Ok(true) => Ok(None),
                Ok(false) => Err(SideError::Io(io::ErrorKind::UnexpectedEof.into())),
                Err(e) => Err(e),
            };
            let mut rest = frames.into_iter();
            if outcome.is_ok() {
                for f in rest.by_ref() {
                    outcome = self.handle_incoming(&mut inc, f);
                    if !matches!(outcome, Ok(None)) {
                        break;
                    }
                }
            }
            if matches!(outcome, Ok(None)) && now >= inc.deadline {
                outcome = Err(SideError::Timeout);
            }
            match outcome {
                Ok(None) => keep.push(inc),
                Ok(Some(peer)) => {
                    // A new authenticated side channel replaces any old one (the peer
                    // restarted or lost its link).
                    self.fail_conn(peer, "the peer reconnected", events);
                    let link = self.links.get_mut(&peer).expect("known peer");
                    link.conn = Some(inc.conn);
                    link.established = true;
                    link.gen = 0;
                    // Frames the dialer sent right behind AUTH.
                    for f in rest {
                        if let Err(e) = self.handle_frame(peer, f, events) {
                            self.fail_conn(peer, &e.to_string(), events);
                            break;
                        }
                    }
                }
                Err(e) => {
                    let why = e.to_string();
                    if !matches!(e, SideError::Io(_)) {
                        let _ = inc.conn.push(kind::REJECT, &[&side::reject(&why)]);
                    }
                }
            }
        }
        self.incoming = keep;
        // Completions before side-channel news, so that a failure is reported with
        // its own status where the completion queue already has it.
        self.poll_cq(events);
        // Established and dialing side channels.
        for &id in &ids {
            let link = self.links.get_mut(&id).expect("id");
            let Some(conn) = link.conn.as_mut() else { continue };
            if conn.connecting {
                if let Ok(Some(e)) | Err(e) = conn.stream.take_error() {
                    let why = format!("connect to {}: {e}", link.addr);
                    self.fail_conn(id, &why, events);
                    continue;
                }
                if conn.stream.peer_addr().is_err() {
                    if link.handshake_deadline.is_some_and(|d| now >= d) {
                        self.fail_conn(id, "connect timed out", events);
                    }
                    continue;
                }
                conn.connecting = false;
            }
            let mut frames = Vec::new();
            let r = conn.flush().and_then(|()| conn.read_frames(&mut frames));
            let mut err = match r {
                Ok(true) => None,
                Ok(false) => Some("the peer closed the side channel".to_string()),
                Err(e) => Some(e.to_string()),
            };
            for f in frames {
                if let Err(e) = self.handle_frame(id, f, events) {
                    err = Some(e.to_string());
                    break;
                }
            }
            let link = self.links.get_mut(&id).expect("id");
            if err.is_none() && !link.established && link.handshake_deadline.is_some_and(|d| now >= d) {
                err = Some(SideError::Timeout.to_string());
            }
            if let Some(why) = err {
                self.fail_conn(id, &why, events);
            }
        }
        // Post queued accesses.
        for &id in &ids {
            if let Err(why) = self.post_pending(id) {
                self.fail_qp(id, &why, None, events);
            }
        }
        self.heartbeat(now, events);
        self.poll_cq(events);
        // Queue pairs that went to error with nothing in flight.
        if now >= self.next_health {
            self.next_health = now + self.cfg.health_interval;
            for &id in &ids {
                let link = &self.links[&id];
                let bad = [link.qp.as_ref(), link.ack_qp.as_ref()]
                    .into_iter()
                    .flatten()
                    .any(|qp| matches!(qp.state(), Ok(ibv_qp_state::IBV_QPS_ERR) | Err(_)));
                if bad {
                    self.fail_qp(id, "queue pair in error state", None, events);
                }
            }
        }
    }

    /// Posts a peer's queued accesses as one chain.
    fn post_pending(&mut self, peer: PeerId) -> Result<(), String> {
        let link = self.links.get_mut(&peer).expect("known peer");
        if !link.ready || link.pending.is_empty() {
            return Ok(());
        }
        let (Some(qp), Some(remote)) = (link.qp.as_ref(), link.remote) else { return Ok(()) };
        let room = (self.cfg.depth as usize).saturating_sub(link.posted.len());
        let n = room.min(link.pending.len());
        if n == 0 {
            return Ok(());
        }
        let mut sges: Vec<ibv_sge> = Vec::with_capacity(n);
        // SAFETY: an all-zero work request is valid (null pointers, opcode 0).
        let mut wrs: Vec<ibv_send_wr> = (0..n).map(|_| unsafe { std::mem::zeroed() }).collect();
        let lkey = self.staging.lkey();
        let base = self.staging.ptr() as u64 + link.stage_base as u64;
        for (i, op) in link.pending.iter().take(n).enumerate() {
            sges.push(ibv_sge { addr: base + op.stage_off as u64, length: op.len, lkey });
            let wr = &mut wrs[i];
            wr.wr_id = op.token;
            wr.opcode = if op.read { ibv_wr_opcode::IBV_WR_RDMA_READ } else { ibv_wr_opcode::IBV_WR_RDMA_WRITE };
            wr.num_sge = if op.len == 0 { 0 } else { 1 };
            let mut flags = 0;
            if !op.read && op.len <= qp.max_inline {
                flags |= ibv_send_flags::IBV_SEND_INLINE.0;
            }
            link.unsignaled += 1;
            if link.unsignaled >= self.cfg.signal_every || i + 1 == n {
                flags |= ibv_send_flags::IBV_SEND_SIGNALED.0;
                link.unsignaled = 0;
            }
            wr.send_flags = flags;
            wr.wr.rdma = rdma_sys::rdma_t { remote_addr: remote.addr + op.remote_off, rkey: remote.rkey };
        }
        // Tie the chain together now that neither vector moves any more.
        let head: *mut ibv_send_wr = wrs.as_mut_ptr();
        for i in 0..n {
            // SAFETY: indexes within the vector.
            unsafe {
                (*head.add(i)).sg_list = sges.as_mut_ptr().add(i);
                (*head.add(i)).next = if i + 1 < n { head.add(i + 1) } else { std::ptr::null_mut() };
            }
        }
        // SAFETY: the chain and its SGEs live until post returns; SGEs point into the
        // registered staging region, which outlives the queue pair.
        let r = unsafe { qp.post(head) };
        match r {
            Ok(()) => {
                for _ in 0..n {
                    let op = link.pending.pop_front().expect("n pending");
                    link.posted.push_back(op);
                }
                Ok(())
            }
            Err((rc, _bad)) => Err(format!("ibv_post_send failed: {}", io::Error::from_raw_os_error(rc.abs()))),
        }
    }

    fn poll_cq(&mut self, events: &mut Vec<Event>) {
        for _ in 0..64 {
            // A failing poll (it does not on any provider seen) reads as "nothing yet";
            // the periodic state check still catches a broken queue pair.
            let n = self.dev.poll_cq(&mut self.wcs).unwrap_or_default();
            for i in 0..n {
                let (token, status, qpn) = (self.wcs[i].wr_id, self.wcs[i].status, self.wcs[i].qp_num);
                let Some(&(peer, is_ack)) = self.qpns.get(&qpn) else { continue };
                if is_ack {
                    self.ack_completion(peer, token, status, events);
                    continue;
                }
                let staging = &self.staging;
                let link = self.links.get_mut(&peer).expect("mapped peer");
                let Some(pos) = link.posted.iter().position(|op| op.token == token) else { continue };
                for _ in 0..pos {
                    let op = link.posted.pop_front().expect("pos < len");
                    Self::complete(link, staging, op, Ok(()), events);
                }
                let op = link.posted.pop_front().expect("found");
                if status == ibv_wc_status::IBV_WC_SUCCESS {
                    Self::complete(link, staging, op, Ok(()), events);
                    continue;
                }
                // A write on a queue pair without IBV_ACCESS_REMOTE_WRITE: InfiniBand
                // names it a remote access error; soft-RoCE answers "invalid request"
                // (it checks the access flags with the opcode). Accesses are checked
                // against the region's bounds before they are posted, so neither
                // status has another cause here.
                let access = status == ibv_wc_status::IBV_WC_REM_ACCESS_ERR
                    || (status == ibv_wc_status::IBV_WC_REM_INV_REQ_ERR && !op.read);
                let why = format!("queue pair error: {}", verbs::status_str(status));
                let r = if access {
                    Err(AccessError::Denied { detail: Bytes::new() })
                } else {
                    Err(AccessError::LinkFailed(why.clone()))
                };
                Self::complete(link, staging, op, r, events);
                self.fail_qp(peer, &why, access.then_some(()), events);
            }
            if n < self.wcs.len() {
                break;
            }
        }
    }

    /// A completion on `peer`'s acknowledgement queue pair (every operation is signalled:
    /// a mirror read's list by its last read, and an error on an earlier one completes
    /// with the same id).
    fn ack_completion(&mut self, peer: PeerId, token: Token, status: ibv_wc_status::Type, events: &mut Vec<Event>) {
        let Some(link) = self.links.get_mut(&peer) else { return };
        let Some(pos) = link.ack_posted.iter().position(|op| op.token == token) else { return };
        // Every operation is signalled, so `pos` is 0 but for a lost completion; those
        // before it completed (a queue pair completes in order).
        let mut done: Vec<AckOp> = link.ack_posted.drain(..=pos).collect();
        let last = done.pop().expect("drained through pos");
        let timeout = self.cfg.heartbeat_timeout;
        let mut stalled = None;
        for op in done.into_iter().chain((status == ibv_wc_status::IBV_WC_SUCCESS).then_some(last)) {
            match op.kind {
                AckKind::Write => {
                    events.push(Event::WriteDone { to: peer, token: op.token, result: Ok(Bytes::new()) });
                    continue;
                }
                AckKind::MirrorRead { len } => {
                    link.mirror_read = None;
                    let Some(stage) = link.mirror_stage.as_ref() else { continue };
                    let mut b = vec![0u8; len as usize];
                    let result = local_read(stage, 0, &mut b)
                        .map(|()| Bytes::from(b))
                        .map_err(|e| AccessError::LinkFailed(e.to_string()));
                    events.push(Event::ReadDone { from: peer, token: op.token, result });
                    continue;
                }
                AckKind::Heartbeat => {}
            }
            link.hb_read = None;
            let Some(stage) = link.ack_stage.as_ref() else { continue };
            let Ok(v) = local_load_u64(stage, op.slot as u64) else { continue };
            let now = Instant::now();
            match link.hb_seen {
                Some((old, since)) if old == v => {
                    if timeout.is_some_and(|t| now.duration_since(since) >= t) {
                        stalled = Some(now.duration_since(since));
                    }
                }
                _ => link.hb_seen = Some((v, now)),
            }
        }
        if status != ibv_wc_status::IBV_WC_SUCCESS {
            let why = format!("acknowledgement queue pair error: {}", verbs::status_str(status));
            let failed = AccessError::LinkFailed(why.clone());
            match last.kind {
                AckKind::Write => events.push(Event::WriteDone { to: peer, token, result: Err(failed) }),
                AckKind::MirrorRead { .. } => {
                    link.mirror_read = None;
                    events.push(Event::ReadDone { from: peer, token, result: Err(failed) });
                }
                AckKind::Heartbeat => {}
            }
            self.fail_qp(peer, &why, None, events);
        } else if let Some(for_) = stalled {
            self.heartbeat_failures += 1;
            let why = format!("heartbeat counter of peer {peer} has not moved for {} ms", for_.as_millis());
            self.fail_qp(peer, &why, None, events);
        }
    }

    /// Bumps our heartbeat counter in every acknowledgement area and, when due, reads the
    /// peers' counters.
    fn heartbeat(&mut self, now: Instant, events: &mut Vec<Event>) {
        self.heartbeat += 1;
        let word = self.heartbeat.to_le_bytes();
        for link in self.links.values() {
            if let Some(area) = &link.ack_in {
                let _ = local_write(area, 0, &word);
            }
        }
        let Some(timeout) = self.cfg.heartbeat_timeout else { return };
        if now < self.next_heartbeat_read {
            return;
        }
        self.next_heartbeat_read = now + timeout / 4;
        let due: Vec<PeerId> = self
            .links
            .values()
            .filter(|l| l.ready && l.ack_qp.is_some() && l.ack_remote.is_some() && l.hb_read.is_none())
            .map(|l| l.id)
            .collect();
        for peer in due {
            match self.post_ack(peer, AckTarget::Area(0), &[], true) {
                Ok(t) => {
                    if let Some(l) = self.links.get_mut(&peer) {
                        l.hb_read = Some(t);
                    }
                }
                Err(_) => events.append(&mut self.pending_events),
            }
        }
    }

    fn in_flight(&self) -> bool {
        self.links.values().any(|l| l.ready && (l.in_flight() > 0 || !l.ack_posted.is_empty()))
    }

    /// Waits for side-channel readiness or a wake-up for at most `wait`.
    fn wait(&self, wait: Duration) -> io::Result<()> {
        let mut fds = vec![
            libc::pollfd { fd: self.waker.0.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: self.listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        for l in self.links.values() {
            if let Some(c) = &l.conn {
                let mut ev = libc::POLLIN;
                if c.connecting || c.queued() > 0 {
                    ev |= libc::POLLOUT;
                }
                fds.push(libc::pollfd { fd: c.stream.as_raw_fd(), events: ev, revents: 0 });
            }
        }
        for inc in &self.incoming {
            let mut ev = libc::POLLIN;
            if inc.conn.queued() > 0 {
                ev |= libc::POLLOUT;
            }
            fds.push(libc::pollfd { fd: inc.conn.stream.as_raw_fd(), events: ev, revents: 0 });
        }
        let ts = libc::timespec {
            tv_sec: wait.as_secs().min(i32::MAX as u64) as libc::time_t,
            tv_nsec: wait.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `fds` is a valid array of its length; `ts` is valid; no signal mask.
        let rc = unsafe { libc::ppoll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, &ts, std::ptr::null()) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        Ok(())
    }

    /// The next time a timer (dial, handshake deadline, health check) is due.
    fn next_timer(&self, now: Instant) -> Duration {
        let mut next = now + Duration::from_secs(1);
        if self.links.values().any(|l| l.qp.is_some()) {
            next = next.min(self.next_health);
        }
        if self.cfg.heartbeat_timeout.is_some() && self.links.values().any(|l| l.ack_remote.is_some()) {
            next = next.min(self.next_heartbeat_read);
        }
        for l in self.links.values() {
            if l.dialer && l.conn.is_none() {
                next = next.min(l.next_dial);
            }
            if let Some(d) = l.handshake_deadline {
                next = next.min(d);
            }
            if l.conn.as_ref().is_some_and(|c| c.connecting) {
                next = next.min(now + Duration::from_millis(1));
            }
        }
        for i in &self.incoming {
            next = next.min(i.deadline);
        }
        next.saturating_duration_since(now)
    }

    fn check_access(&mut self, peer: PeerId, len: usize) -> Result<(), SendError> {
        let link = self.links.get(&peer).ok_or(SendError::UnknownPeer(peer))?;
        if len > self.cfg.max_payload {
            return Err(SendError::TooLarge { size: len, limit: self.cfg.max_payload });
        }
        if !link.ready {
            return Err(SendError::LinkDown(peer));
        }
        if link.in_flight() >= self.cfg.depth as usize {
            return Err(SendError::Backpressure(peer));
        }
        Ok(())
    }

    /// Queues an access whose staging is reserved; completes it at once (Denied) when
    /// it falls outside the target's region.
    fn queue(&mut self, peer: PeerId, read: bool, offset: u64, data: &[u8], len: u32) -> Result<Token, SendError> {
        self.check_access(peer, len as usize)?;
        let token = self.token();
        let link = self.links.get_mut(&peer).expect("checked");
        let region = link.remote.map_or(0, |r| r.len);
        if offset.checked_add(len as u64).is_none_or(|end| end > region) {
            let detail =
                Bytes::from(format!("{len} bytes at offset {offset} are outside the peer's {region}-byte region"));
            let result = Err(AccessError::Denied { detail });
            self.pending_events.push(if read {
                Event::ReadDone { from: peer, token, result }
            } else {
                Event::WriteDone { to: peer, token, result }
            });
            return Ok(token);
        }
        let (stage_off, charged) = link.ring.alloc(len as usize).ok_or(SendError::Backpressure(peer))?;
        if !read && !data.is_empty() {
            // SAFETY: the ring hands out ranges inside this peer's part of the staging region.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    data.as_ptr(),
                    self.staging.ptr().add(link.stage_base + stage_off),
                    data.len(),
                )
            };
        }
        link.pending.push_back(Op { token, read, remote_off: offset, len, stage_off, charged });
        Ok(token)
    }
}

impl Transport for RdmaTransport {
    fn local(&self) -> PeerId {
        self.cfg.local
    }

    fn peers(&self) -> Vec<PeerId> {
        self.links.keys().copied().collect()
    }

    fn max_payload(&self) -> usize {
        self.cfg.max_payload
    }

    fn send(&mut self, to: PeerId, payload: &[u8]) -> Result<(), SendError> {
        let max = self.cfg.max_payload;
        let limit = self.cfg.max_queued_bytes_per_peer;
        let link = self.links.get_mut(&to).ok_or(SendError::UnknownPeer(to))?;
        if payload.len() > max {
            return Err(SendError::TooLarge { size: payload.len(), limit: max });
        }
        if !link.established {
            return Err(SendError::LinkDown(to));
        }
        let conn = link.conn.as_mut().ok_or(SendError::LinkDown(to))?;
        if conn.queued() > 0 && conn.queued() + payload.len() > limit {
            return Err(SendError::Backpressure(to));
        }
        if let Err(e) = conn.push(kind::MSG, &[payload]) {
            let mut events = std::mem::take(&mut self.pending_events);
            self.fail_conn(to, &e.to_string(), &mut events);
            self.pending_events = events;
            return Err(SendError::LinkDown(to));
        }
        Ok(())
    }

    fn write(&mut self, to: PeerId, offset: u64, data: &[u8]) -> Result<Token, SendError> {
        let len = u32::try_from(data.len())
            .map_err(|_| SendError::TooLarge { size: data.len(), limit: self.cfg.max_payload })?;
        self.queue(to, false, offset, data, len)
    }

    fn read(&mut self, from: PeerId, offset: u64, len: u32) -> Result<Token, SendError> {
        self.queue(from, true, offset, &[], len)
    }

    fn complete_write(&mut self, _from: PeerId, _token: Token, _result: Result<&[u8], &[u8]>) -> Result<(), SendError> {
        // An RDMA transport never produces WriteArrived: there is nothing to answer.
        Err(SendError::Closed)
    }

    fn complete_read(&mut self, _from: PeerId, _token: Token, _result: Result<&[u8], &[u8]>) -> Result<(), SendError> {
        // An RDMA transport never produces ReadArrived: there is nothing to answer.
        Err(SendError::Closed)
    }

    fn grant(&mut self, peer: PeerId) {
        if !self.links.contains_key(&peer) || self.holder == Some(peer) {
            return;
        }
        let old = self.holder.replace(peer);
        if let Some(old) = old {
            self.apply_access(old);
        }
        self.apply_access(peer);
    }

    fn revoke(&mut self, peer: PeerId) {
        if self.holder == Some(peer) {
            self.holder = None;
            self.apply_access(peer);
        }
    }

    fn permission_holder(&self) -> Option<PeerId> {
        self.holder
    }

    fn send_queued(&mut self) {
        // Queued accesses are posted (a link that fails is reported by the next poll);
        // side-channel messages leave at the next poll.
        let mut events = std::mem::take(&mut self.pending_events);
        let ids: Vec<PeerId> = self.links.keys().copied().collect();
        for id in ids {
            if let Err(why) = self.post_pending(id) {
                self.fail_qp(id, &why, None, &mut events);
            }
        }
        self.pending_events = events;
    }

    fn poll(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        let start = events.len();
        let begun = Instant::now();
        let deadline = timeout.map(|t| begun + t);
        let mut busy_since: Option<Instant> = None;
        loop {
            let woken = self.waker.drain();
            events.append(&mut self.pending_events);
            self.io_once(events);
            events.append(&mut self.pending_events);
            if events.len() > start || woken {
                return Ok(());
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Ok(());
            }
            let remaining = deadline.map_or(Duration::from_secs(3600), |d| d - now);
            if self.in_flight() {
                let since = *busy_since.get_or_insert(now);
                if now - since < self.cfg.busy_poll {
                    std::hint::spin_loop();
                    continue;
                }
                self.wait(remaining.min(self.next_timer(now)).min(Duration::from_micros(200)))?;
            } else {
                busy_since = None;
                self.wait(remaining.min(self.next_timer(now)))?;
            }
        }
    }

    fn waker(&self) -> Arc<dyn Wake> {
        self.waker.clone()
    }
    fn name(&self) -> &'static str {
        "rdma"
    }
}

#[cfg(test)]
mod tests {
    use super::Ring;

    #[test]
    fn ring_is_fifo_and_wraps() {
        let mut r = Ring { cap: 64, head: 0, used: 0 };
        let a = r.alloc(24).expect("a");
        let b = r.alloc(24).expect("b");
        assert_eq!((a.0, b.0), (0, 24));
        assert!(r.alloc(24).is_none(), "only 16 bytes left");
        r.free(a.1);
        // 16 bytes at the end are wasted; the next 24 go at 0.
        let c = r.alloc(24).expect("c wraps");
        assert_eq!((c.0, c.1), (0, 16 + 24));
        r.free(b.1);
        r.free(c.1);
        assert_eq!(r.used, 0);
        let d = r.alloc(64).expect("all of it once empty");
        assert_eq!(d, (0, 64));
        assert!(r.alloc(0).is_some(), "empty allocations always fit");
    }
}
