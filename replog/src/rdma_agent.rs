//! The service over RDMA (`transport = "rdma"`): [`RdmaAgent`] puts the node's remote
//! writes into followers' registered log regions with one-sided RDMA WRITEs, laid out as
//! the cell ring of [`crate::rdma_region`], and presents them to the node exactly as the
//! agent transports do, so that `node.rs` and the core run unchanged:
//!
//! - **leader side**: `write(to, first, bytes)` encodes one cell and issues it with
//!   [`RdmaTransport`]'s one-sided write at the cell's offset. When the write completes
//!   for the core (its `WriteDone`) is the agent's [`Landing`], chosen by durability
//!   ([`landing_for`]):
//!   - [`Landing::Write`] (`memory`: **acceptance by landing**, Mu's model): when the
//!     RDMA WRITE completed at our NIC, i.e. the follower's NIC placed the cell in its
//!     memory. No follower CPU is on the path; the node sets the core's
//!     `accept_on_landing` ([`Transport::completes_on_landing`]) and the followers fence
//!     (below).
//!   - [`Landing::ReadAfterWrite`] (`pmem` with the ring on a device-dax device,
//!     `rdma.region_path`; or `landing = "read_after_write"`): when an 8-byte RDMA
//!     READ of the cell's canary, posted right after the WRITE on the same queue pair,
//!     completed: the responder executes it after the WRITE, so the WRITE was placed
//!     (the way to a persistent ring without RDMA FLUSH, which needs rdma-core 45 and
//!     is not used). If the READ cannot be issued (no room), the acknowledgement
//!     completes the write.
//!   - [`Landing::Ack`] (`fsync`, and `pmem` without a `region_path`, whose ring is
//!     then ordinary memory): when the follower's acknowledgement arrives (below),
//!     written after its sync.
//!
//!   The NIC's error completes it in every mode (a revoked writer is `Denied`, a broken
//!   link `LinkFailed`). Under landing the follower's acknowledgement, when it comes,
//!   only frees the cell: a cell (and its acknowledgement slot) is reused only after the
//!   follower took it, so the window below is unchanged. One more duty under landing:
//!   a stream that restarts (a failed write, a failed link) opens a new epoch at the
//!   next position of the ring, named by the stream pointer (layout in
//!   [`crate::rdma_region`]). A cell of the old epoch that completed at landing but
//!   that the follower had not acknowledged yet must still reach the follower's core,
//!   so: (1) the new epoch keeps off every cell not known taken (its window counts from
//!   the oldest, `resume` in the pointer) until the follower acknowledges a cell of the
//!   new epoch, and the follower takes those old cells before it switches; (2) the
//!   writer keeps each such write's bytes until its acknowledgement and writes them
//!   again, in order, first in the new epoch (a **replay**: nothing completes for the
//!   node; a follower that took it already accepts the same value at the same ballot
//!   again), for a follower that fenced or restarted in between. Replays are not made
//!   in a new term: the follower fenced the writer before promising the term's ballot,
//!   and the new term's leader rewrites what is unfinished from its own log.
//!   [`AckStats`] counts writes completed at landing, by acknowledgement, and replays.
//! - **follower side**: `poll` reads the region (the follower's CPU polls memory, as in
//!   Mu), takes each newly landed, checksummed cell of the permission holder in order and
//!   reports it as [`Event::WriteArrived`]; the node hands it to the core, which checks
//!   the ballot, persists it per the durability mode and, after the covering sync,
//!   answers through [`Transport::complete_write`].
//! - **fence** ([`Transport::fence`], the node's `Action::Fence` under acceptance by
//!   landing): revokes the holder's write access on its queue pair, then takes every
//!   cell of the holder's stream that landed and was not taken yet (the whole ring if
//!   need be), in order, as `WriteArrived` events for the node to hand to the core
//!   before the core's promise rises. A WRITE the holder saw complete landed before the
//!   revocation, so it is among them; one still in flight is refused at the NIC
//!   (`Denied` at the writer), or cut with the queue pair when the revocation cycles it
//!   through reset (`LinkFailed`): none lands after `revoke` returned (checked on
//!   soft-RoCE with thousands of writes in flight, both ways:
//!   `transport/tests/rdma.rs`, `revoke_by_*_fences_*writes_in_flight`). A WRITE of
//!   several packets can be refused after its first packets landed (before `revoke`
//!   returned): a torn cell, which its canary and CRC reject. The stream
//!   being taken is kept across the revocation: a re-grant of the same holder goes on
//!   where it was.
//! - **acknowledgements** go back by a **one-sided RDMA WRITE** of an acknowledgement
//!   record (layout and checks in [`crate::rdma_region`]) into the writer's
//!   acknowledgement area for this follower, on the transport's acknowledgement queue
//!   pair (a second protection domain that cannot reach any log region: see
//!   `transport::rdma`). The follower's CPU writes it after the covering sync, so under
//!   `fsync` the record means "durable here". The writer's `poll` finds acknowledgements
//!   by reading its own memory, as the follower finds cells: for each write outstanding in
//!   the stream's current epoch it looks at that write's slot and completes the write when
//!   the record there is whole (canary, CRC) and names that epoch, position and token. The
//!   **fallback** is the side-channel message (tag 1 below), used when the reply does not
//!   fit a record ([`cells::ACK_REPLY_MAX`]), when there is no connected acknowledgement
//!   queue pair (the peer has no acknowledgement area, or the link is being renewed), or
//!   when the RDMA WRITE of the record failed (the record may or may not have landed:
//!   the message repeats it).
//! - **exactly once**: a write completes once, by whichever comes first of its landing
//!   (under [`Landing::Write`] or [`Landing::ReadAfterWrite`]), its record, its message,
//!   its NIC error, or the restart of its stream (a failed or renewed link,
//!   a new term: the writer opens a new epoch and fails what was outstanding with
//!   `LinkFailed`); later arrivals for it find no pending write and are dropped. A record
//!   or message of an older epoch never completes a write of the new one: records name
//!   the epoch, and tokens are never reused. The writer keeps the positions it has
//!   outstanding (and those an earlier epoch left untaken) within one window of both rings (`min(cells, acknowledgement slots)`), so a slot is
//!   never rewritten before its record was taken.
//! - **liveness**: [`open`] sets the transport's heartbeat timeout to four election
//!   timeouts (0.5 s to 5 s): each replica reads its peers' heartbeat counters (bumped by
//!   their poll loops) with one-sided RDMA READs, and a peer whose counter stalled is a
//!   failed link (`PeerDown`, streams restarted, queue pairs renewed once it polls
//!   again). Without it a hung follower whose NIC still lands cells would hold the
//!   leader's writes unacknowledged until the core gives up on them. `poll` gives the
//!   transport a pass at least every 200 us while it is called, so the counter moves
//!   while the node's loop runs.
//! - **polling cadence**: the writer looks at its acknowledgement areas as the follower
//!   looks at its region: on every `poll`, sleeping at most 200 us between looks while
//!   something is outstanding. With `[timing] spin_us` the node polls without sleeping
//!   after activity, and the looks are continuous (the low-latency setting on dedicated
//!   cores; on a shared, loaded machine blocking is kinder).
//! - **reads** (a candidate reading a promiser's log tail) go by **one-sided RDMA READ**
//!   of the peer's accepted-entries mirror (layout and checks in [`crate::rdma_mirror`];
//!   the node publishes into its own mirror after each sync, through
//!   [`Transport::put_mirror`]): the header, the records of the slots asked, the header
//!   again (seqlock), each record checked whole (canary, CRC, slot). The three reads go
//!   as one post list, each after the first fenced (it starts once the one before
//!   completed), placed by the geometry and last slot seen at the previous read of that
//!   peer's mirror ([`mirror::plan_chain`]); the first read on a link reads the header
//!   alone, then the records and the header again as one list. The answer is the
//!   bytes the peer's CPU would have sent (`wire::encode_read_result`), so the node
//!   cannot tell the paths apart. The **fallback** is the side channel (a request and an
//!   answer that the peer's core serves from its store): used when the peer has no
//!   mirror, the range is not in it (older than the ring, or not published yet), a check
//!   fails (a read raced a rewrite or a wrap), a value is larger than a record, or a
//!   mirror read fails. [`Transport::read_paths`] counts reads by path, logged as
//!   `rdma reads` lines.
//!   One thing the side channel did that the mirror cannot: a promiser whose tail its
//!   candidate reads takes the read as contact and holds off its own election; it does
//!   not see an RDMA READ. Tail reads by RDMA READ finish in a few round trips, well
//!   within an election timeout, and the candidate then writes or sends heartbeats.
//!
//! Messages are tagged with one byte: 0 the core's message, 1 a write acknowledgement
//! (the fallback: `token u64, status u8, detail`), 2 a read request (`token u64, offset u64, len u32`),
//! 3 a read answer (`token u64, status u8, bytes`). Decoding never panics; malformed
//! frames are dropped.

use crate::rdma_mirror::{self as mirror, Fallback};
use crate::rdma_region::{self as cells, AckRecord, CellHeader, StreamPointer};
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};
use transport::rdma::RdmaTransport;
use transport::{AccessError, Event, PeerId, ReadPaths, SendError, Token, Transport, Wake};

const TAG_MSG: u8 = 0;
const TAG_ACK: u8 = 1;
const TAG_READ: u8 = 2;
const TAG_READ_RESP: u8 = 3;
const STATUS_OK: u8 = 0;
const STATUS_DENIED: u8 = 1;
/// Bytes a tag and its fixed fields add to a message.
const OVERHEAD: usize = 1 + 8 + 8 + 4;
/// How long `poll` sleeps between looks at the region while a writer holds permission,
/// and between looks at the acknowledgement areas while writes wait for their
/// acknowledgements (a node that spins, `[timing] spin_us`, looks continuously). Also the
/// longest the transport goes without a pass while `poll` is called. (`bench`'s RDMA
/// ping-pong waits the same way between its looks at memory.)
pub const SCAN_SLICE: Duration = Duration::from_micros(200);
/// Cells taken per look.
const MAX_CELLS_PER_SCAN: usize = 256;
/// How often the acknowledgement counts are logged (when they changed).
const ACK_LOG_EVERY: Duration = Duration::from_secs(1);

/// How acknowledgements travelled, counted by this agent since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AckStats {
    /// Follower: acknowledgements written into the writer's memory (RDMA WRITE completed).
    pub sent_rdma: u64,
    /// Follower: acknowledgements sent as side-channel messages (fallback).
    pub sent_side: u64,
    /// Writer: writes completed by a record found in its acknowledgement area.
    pub taken_rdma: u64,
    /// Writer: writes completed by a side-channel acknowledgement message.
    pub taken_side: u64,
    /// Writer: writes completed when their cell landed ([`Landing`]); their
    /// acknowledgement, when it comes, only frees the cell.
    pub landed: u64,
    /// Writer: writes completed at landing whose acknowledgement later said the
    /// follower's core denied the cell (logged; the write's completion stands).
    pub denied_after_landing: u64,
    /// Writer: cells written again because their stream restarted before the follower
    /// acknowledged taking them (they had completed at landing).
    pub replayed: u64,
    /// Follower: fences ([`Transport::fence`]) of the permission holder.
    pub fences: u64,
    /// Follower: cells taken by those fences' drains (landed, not taken by polling yet).
    pub drained: u64,
    /// Follower: cells found whole in the region at start and handed to the core
    /// ([`Transport::recover_landed`]; a persistent region keeps them across a restart).
    pub recovered: u64,
    /// Follower: cells of an earlier life discarded at start (a fresh data directory).
    pub discarded: u64,
}

/// When the writer completes a write (its `WriteDone`), by durability mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Landing {
    /// When the follower's acknowledgement arrives (written after its core took the
    /// cell and, under `fsync`, after its sync): `fsync` mode, and the default.
    #[default]
    Ack,
    /// When the RDMA WRITE of the cell completed at our NIC (the follower's NIC placed
    /// it in its memory): `memory` mode.
    Write,
    /// When an 8-byte RDMA READ of the cell's canary, posted on the same queue pair right
    /// after the WRITE, completed (read-after-write: the responder executes it after
    /// the WRITE, so its completion means the WRITE was placed, flushed past the
    /// follower's PCIe/NIC buffers). The way to persistence for a persistent ring
    /// without RDMA FLUSH (`ibv_wr_flush` needs rdma-core 45 or later).
    ReadAfterWrite,
}

/// Where a read of a peer's mirror is.
#[derive(Debug)]
enum MirrorStep {
    /// The header read is in flight (the peer's mirror was not seen yet on this link).
    Header,
    /// The records' read (this many bytes) and the header's re-read are in flight, as one
    /// list, under this header.
    Records(mirror::Header, u32),
    /// The header, the records (this many bytes, placed by what was `seen` of the
    /// peer's mirror) and the header again are in flight, as one list.
    Chain(mirror::Seen, u32),
}

/// A read going by RDMA READ of the peer's mirror.
#[derive(Debug)]
struct MirrorRead {
    peer: PeerId,
    /// Our token (the node's read).
    ours: Token,
    /// First slot asked.
    from: u64,
    /// The reader's byte budget.
    budget: u32,
    step: MirrorStep,
}

/// A read of ours not answered yet.
#[derive(Debug, Clone, Copy)]
struct PendingRead {
    peer: PeerId,
    since: Instant,
    /// Asked over the side channel (from the start or after a fallback).
    side: bool,
}

/// One writer-to-follower cell stream (leader side).
#[derive(Debug, Default)]
struct Stream {
    epoch: (u64, u64),
    /// The next cell's position (see [`crate::rdma_region`]); never reset.
    next_pos: u64,
    /// Position of the epoch's first cell.
    start: u64,
    /// The stream pointer naming this epoch was issued (before its first cell).
    pointed: bool,
    /// Cells of earlier epochs in this term that completed at landing and that the
    /// follower has not acknowledged taking: position -> (epoch, our token). The new
    /// epoch must not overwrite them (fewer than a ring of positions from the oldest):
    /// should this writer die before their replays land, the follower still finds them
    /// (the pointer's `resume`). The follower takes cells in position order, so an
    /// acknowledgement of position `p` (of any epoch) frees every one up to `p`; one of
    /// the current epoch frees them all; a new term drops them (the follower fenced this
    /// writer, taking what landed, before promising the term's ballot).
    behind: BTreeMap<u64, ((u64, u64), Token)>,
    /// Writes issued in this epoch and not yet acknowledged: position -> our token.
    unacked: BTreeMap<u64, Token>,
    /// Under landing: writes that completed at landing but whose cells the follower had
    /// not acknowledged taking when the stream restarted, `(first, bytes)` in order:
    /// written again, first in the new epoch, before any new write, for a follower
    /// that may have lost track of the old epoch (accepting it twice is harmless: same
    /// ballot, same value; a follower whose promise rose since denies it).
    replay: std::collections::VecDeque<(u64, Bytes)>,
}

/// A cell taken by the follower and not answered yet.
#[derive(Debug, Clone, Copy)]
struct Arrived {
    writer: PeerId,
    epoch: (u64, u64),
    /// Its position (and so its acknowledgement's slot).
    pos: u64,
    /// The writer's token.
    theirs: Token,
}

struct AgentWaker {
    woken: AtomicBool,
    inner: Arc<dyn Wake>,
}

impl Wake for AgentWaker {
    fn wake(&self) {
        self.woken.store(true, Ordering::Release);
        self.inner.wake();
    }
}

/// The RDMA transport with the cell ring and the acknowledgement protocol on top. See
/// the module docs.
pub struct RdmaAgent {
    inner: RdmaTransport,
    cell_size: usize,
    /// Bytes per record of this replica's mirror (0: no mirror).
    mirror_stride: usize,
    /// Reads try the peer's mirror first (default true).
    mirror_reads_on: bool,
    cells: usize,
    next_token: Token,
    streams: HashMap<PeerId, Stream>,
    /// The inner transport's write tokens to (target, our token).
    inner_writes: HashMap<Token, (PeerId, Token)>,
    /// Stream pointers being written: the inner transport's token -> (target, the
    /// epoch it names).
    pointer_writes: HashMap<Token, (PeerId, (u64, u64))>,
    /// When our writes complete.
    landing: Landing,
    /// Read-after-write reads ([`Landing::ReadAfterWrite`]): the inner transport's read
    /// token -> (target, our write's token).
    landing_reads: HashMap<Token, (PeerId, Token)>,
    /// Under landing: the bytes of each write not acknowledged yet (our token ->
    /// `(first, bytes)`), to replay it if its stream restarts (see `Stream::replay`).
    sent: HashMap<Token, (u64, Bytes)>,
    /// Replays in flight (they complete nothing for the node).
    replays: std::collections::HashSet<Token>,
    /// Our writes not completed yet, to their target.
    pending_writes: HashMap<Token, PeerId>,
    /// Our reads not completed yet.
    pending_reads: HashMap<Token, PendingRead>,
    /// Reads going by RDMA READ of a peer's mirror: the transport's token -> the read.
    mirror_reads: HashMap<Token, MirrorRead>,
    /// What the last read of each peer's mirror saw of it, while its link stays up.
    mirrors_seen: HashMap<PeerId, mirror::Seen>,
    /// How reads travelled.
    read_paths: ReadPaths,
    /// Fallbacks by reason.
    fallbacks: BTreeMap<&'static str, u64>,
    read_logged: (ReadPaths, Instant),
    // Follower side.
    /// The holder's stream being taken: (writer, epoch), and the next position expected.
    current: Option<(PeerId, (u64, u64))>,
    next_pos: u64,
    /// The last epoch taken from each writer.
    seen: HashMap<PeerId, (u64, u64)>,
    /// Arrived writes: our token -> the cell it came in.
    arrived_writes: HashMap<Token, Arrived>,
    /// Arrived reads: our token -> (reader, its token).
    arrived_reads: HashMap<Token, (PeerId, Token)>,
    /// Acknowledgement records being written: the transport's token -> the message to
    /// send instead if the write fails.
    ack_writes: HashMap<Token, (PeerId, Token, bool, Vec<u8>)>,
    stats: AckStats,
    logged: (AckStats, Instant),
    /// When the transport last had a pass (`poll` of the inner transport).
    last_inner: Instant,
    waker: Arc<AgentWaker>,
    buf: Vec<u8>,
    scratch: Vec<Event>,
}

impl std::fmt::Debug for RdmaAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaAgent").field("inner", &self.inner).field("cells", &self.cells).finish_non_exhaustive()
    }
}

fn u64_at(b: &[u8], i: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?))
}

fn u32_at(b: &[u8], i: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?))
}

impl RdmaAgent {
    /// Wraps `inner`, whose log region is divided into cells of `cell_size` bytes (a
    /// multiple of 8, at least 128, at most the region).
    pub fn new(inner: RdmaTransport, cell_size: usize) -> Result<Self, String> {
        let region = inner.region_len();
        if cell_size < 128 || !cell_size.is_multiple_of(8) || cells::ring_cells(region, cell_size) == 0 {
            return Err(format!(
                "cell size {cell_size} must be a multiple of 8 from 128 bytes to the region's {region} bytes \
                 less its {}-byte stream pointer",
                cells::RING_BASE
            ));
        }
        let first =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
        let waker = Arc::new(AgentWaker { woken: AtomicBool::new(false), inner: inner.waker() });
        Ok(RdmaAgent {
            cells: cells::ring_cells(region, cell_size),
            cell_size,
            mirror_stride: 0,
            mirror_reads_on: true,
            inner,
            next_token: first.max(1),
            streams: HashMap::new(),
            inner_writes: HashMap::new(),
            pointer_writes: HashMap::new(),
            landing: Landing::Ack,
            landing_reads: HashMap::new(),
            sent: HashMap::new(),
            replays: std::collections::HashSet::new(),
            pending_writes: HashMap::new(),
            pending_reads: HashMap::new(),
            mirror_reads: HashMap::new(),
            mirrors_seen: HashMap::new(),
            read_paths: ReadPaths::default(),
            fallbacks: BTreeMap::new(),
            read_logged: (ReadPaths::default(), Instant::now()),
            current: None,
            next_pos: 0,
            seen: HashMap::new(),
            arrived_writes: HashMap::new(),
            arrived_reads: HashMap::new(),
            ack_writes: HashMap::new(),
            stats: AckStats::default(),
            logged: (AckStats::default(), Instant::now()),
            last_inner: Instant::now(),
            waker,
            buf: Vec::new(),
            scratch: Vec::new(),
        })
    }

    /// Publishes into this replica's read mirror with `stride`-byte records (see
    /// [`crate::rdma_mirror`]); the transport must have been opened with a mirror.
    pub fn with_mirror(mut self, stride: usize) -> Result<Self, String> {
        mirror::geometry(self.inner.mirror_len(), stride).map_err(|e| e.to_string())?;
        self.mirror_stride = stride;
        Ok(self)
    }

    /// Whether reads try the peer's mirror by RDMA READ first (default) or go over the
    /// side channel only (to measure one path against the other).
    pub fn set_mirror_reads(&mut self, on: bool) {
        self.mirror_reads_on = on;
    }

    /// Completes our writes as `landing` says (default [`Landing::Ack`]). With
    /// anything but `Ack` the node must fence writers ([`Transport::fence`]) before its
    /// core's promise rises: see [`Transport::completes_on_landing`].
    pub fn with_landing(mut self, landing: Landing) -> Self {
        self.landing = landing;
        self
    }

    /// When our writes complete.
    pub fn landing(&self) -> Landing {
        self.landing
    }

    /// The payload capacity of one cell: the largest remote write.
    pub fn cell_capacity(&self) -> usize {
        cells::capacity(self.cell_size)
    }

    /// The RDMA transport underneath.
    pub fn inner(&self) -> &RdmaTransport {
        &self.inner
    }

    /// How acknowledgements travelled so far.
    pub fn ack_stats(&self) -> AckStats {
        self.stats
    }

    /// The most writes to one follower outstanding at once: one window of the cell ring
    /// and of this node's acknowledgement area for that follower (all are as large).
    fn window(&self) -> u64 {
        let slots = cells::ack_slots(self.inner.ack_area_len() as u64);
        if slots == 0 {
            self.cells as u64
        } else {
            slots.min(self.cells as u64)
        }
    }

    /// The follower took our write `token` to `to` (its acknowledgement arrived), or it
    /// failed: its cell may be reused, and the write completes if it has not yet (at
    /// landing). Completes once: later calls find nothing.
    fn finish_write(&mut self, to: PeerId, token: Token, result: Result<(), AccessError>, events: &mut Vec<Event>) {
        if let Some(s) = self.streams.get_mut(&to) {
            s.unacked.retain(|_, t| *t != token);
        }
        self.sent.remove(&token);
        self.replays.remove(&token);
        if self.pending_writes.remove(&token).is_none() {
            return;
        }
        events.push(Event::WriteDone { to, token, result: result.map(|()| Bytes::new()) });
    }

    /// Our write `token` to `to` landed under the durability of [`Landing`]: it
    /// completes now (once), and its cell stays held until the follower's
    /// acknowledgement says the follower took it.
    fn landed(&mut self, to: PeerId, token: Token, events: &mut Vec<Event>) {
        if self.pending_writes.remove(&token).is_some() {
            self.stats.landed += 1;
            events.push(Event::WriteDone { to, token, result: Ok(Bytes::new()) });
        }
    }

    /// Writer: takes the acknowledgement records that landed in our memory.
    fn scan_acks(&mut self, events: &mut Vec<Event>) {
        let slots = cells::ack_slots(self.inner.ack_area_len() as u64);
        if slots == 0 {
            return;
        }
        let mut done = Vec::new();
        let mut freed = Vec::new();
        let mut rec = [0u8; cells::ACK_SLOT];
        for (&peer, s) in &self.streams {
            for (&pos, &token) in &s.unacked {
                if let Some(r) = self.ack_record(peer, slots, s.epoch, pos, token, &mut rec) {
                    done.push((peer, token, r));
                }
            }
            for (&pos, &(epoch, token)) in &s.behind {
                if self.ack_record(peer, slots, epoch, pos, token, &mut rec).is_some() {
                    freed.push((peer, pos));
                }
            }
        }
        for (peer, pos) in freed {
            self.taken_up_to(peer, pos);
        }
        for (peer, token, r) in done {
            if let Some(s) = self.streams.get_mut(&peer) {
                // The follower took a cell of this epoch: it finished the earlier ones.
                s.behind.clear();
            }
            let result = if r.ok { Ok(()) } else { Err(AccessError::Denied { detail: Bytes::from(r.reply) }) };
            if self.pending_writes.contains_key(&token) {
                self.stats.taken_rdma += 1;
            } else if !r.ok && !self.replays.contains(&token) {
                self.denied_after_landing(peer, r.pos);
            }
            self.finish_write(peer, token, result, events);
        }
    }

    /// The acknowledgement record of our cell (`epoch`, `pos`, `token`) in `peer`'s slot
    /// of our acknowledgement area, if it is there whole; `None` while it is still
    /// landing, torn, or another cell's (looked at again next time).
    fn ack_record(
        &self,
        peer: PeerId,
        slots: u64,
        epoch: (u64, u64),
        pos: u64,
        token: Token,
        rec: &mut [u8; cells::ACK_SLOT],
    ) -> Option<AckRecord> {
        let off = cells::ack_offset(pos, slots);
        if self.inner.load_ack_u64(peer, off + cells::ack_canary_offset()).ok()? != cells::ack_canary(pos, token) {
            return None;
        }
        self.inner.read_ack_area(peer, off, rec).ok()?;
        cells::decode_ack(rec).filter(|r| r.epoch == epoch && r.pos == pos && r.token == token)
    }

    /// The follower acknowledged taking the cell of position `pos` of an earlier epoch:
    /// it took every one before it too (it takes cells in position order).
    fn taken_up_to(&mut self, peer: PeerId, pos: u64) {
        if let Some(s) = self.streams.get_mut(&peer) {
            s.behind.retain(|&p, _| p > pos);
        }
    }

    /// A write completed at landing was denied by the follower's core: with fencing
    /// that does not happen (the follower accepts every cell that landed while the
    /// writer held permission), so it is counted and logged, and the completion stands.
    fn denied_after_landing(&mut self, peer: PeerId, pos: u64) {
        self.stats.denied_after_landing += 1;
        warn!(peer, pos, "a write completed at landing was denied by the follower's core");
    }

    fn awaiting_acks(&self) -> bool {
        self.streams.values().any(|s| !s.unacked.is_empty())
    }

    /// Logs the acknowledgement counts when they changed (at most every [`ACK_LOG_EVERY`]).
    fn log_stats(&mut self) {
        let now = Instant::now();
        if self.stats != self.logged.0 && now.duration_since(self.logged.1) >= ACK_LOG_EVERY {
            let s = self.stats;
            info!(
                sent_rdma = s.sent_rdma,
                sent_side = s.sent_side,
                taken_rdma = s.taken_rdma,
                taken_side = s.taken_side,
                landed = s.landed,
                denied_after_landing = s.denied_after_landing,
                replayed = s.replayed,
                fences = s.fences,
                drained = s.drained,
                recovered = s.recovered,
                discarded = s.discarded,
                "rdma acknowledgements"
            );
            self.logged = (s, now);
        }
        let r = self.read_paths;
        if r != self.read_logged.0 && now.duration_since(self.read_logged.1) >= ACK_LOG_EVERY {
            let fallbacks = format!("{:?}", self.fallbacks);
            info!(
                rdma_read = r.one_sided,
                side_channel = r.side_channel,
                fallback = r.fallbacks,
                rdma_read_mean_us = r.one_sided_ns / r.one_sided.max(1) / 1000,
                side_channel_mean_us = r.side_channel_ns / r.side_channel.max(1) / 1000,
                fallbacks = %fallbacks,
                "rdma reads"
            );
            self.read_logged = (r, now);
        }
    }

    /// Asks `peer` for the read `ours` over the side channel (the peer's CPU answers).
    fn read_by_message(&mut self, peer: PeerId, ours: Token, offset: u64, len: u32) -> Result<(), SendError> {
        self.send_tagged(peer, TAG_READ, &[&ours.to_le_bytes(), &offset.to_le_bytes(), &len.to_le_bytes()])
    }

    /// A mirror read cannot answer `m`: count why and ask over the side channel.
    fn fall_back(&mut self, m: MirrorRead, why: Fallback, detail: &str, events: &mut Vec<Event>) {
        let Some(p) = self.pending_reads.get_mut(&m.ours) else { return };
        debug_assert!(!p.side, "a read falls back once");
        p.side = true;
        self.read_paths.fallbacks += 1;
        *self.fallbacks.entry(why.name()).or_default() += 1;
        debug!(peer = m.peer, from = m.from, why = why.name(), detail, "mirror read falls back to the side channel");
        if let Err(e) = self.read_by_message(m.peer, m.ours, m.from, m.budget) {
            self.pending_reads.remove(&m.ours);
            events.push(Event::ReadDone {
                from: m.peer,
                token: m.ours,
                result: Err(AccessError::LinkFailed(e.to_string())),
            });
        }
    }

    /// Issues the next RDMA READs of `m` (`(offset, len)` parts, posted as one list) or
    /// falls back.
    fn mirror_next(&mut self, m: MirrorRead, parts: &[(u64, u32)], events: &mut Vec<Event>) {
        match self.inner.read_mirror_chain(m.peer, parts) {
            Ok(t) => {
                self.mirror_reads.insert(t, m);
            }
            Err(e) => self.fall_back(m, Fallback::Header, &e.to_string(), events),
        }
    }

    /// A read of a peer's mirror completed: the next step, the answer, or the fallback.
    fn on_mirror_read(&mut self, mut m: MirrorRead, result: Result<Bytes, AccessError>, events: &mut Vec<Event>) {
        let Some(p) = self.pending_reads.get(&m.ours) else {
            return; // already failed (the peer went down)
        };
        debug_assert!(p.peer == m.peer && !p.side, "a mirror read belongs to a pending read of that peer");
        let data = match result {
            Ok(d) => d,
            Err(e) => return self.fall_back(m, Fallback::Header, &e.to_string(), events),
        };
        let Some(mlen) = self.inner.peer_mirror_len(m.peer) else {
            return self.fall_back(m, Fallback::Header, "the peer's mirror went away", events);
        };
        let max = self.inner.mirror_read_max();
        let header = (0, mirror::HEADER_LEN as u32);
        let mut answer = Vec::new();
        let budget = m.budget as usize;
        match std::mem::replace(&mut m.step, MirrorStep::Header) {
            MirrorStep::Header => match mirror::decode_header(&data, mlen) {
                Err(f) => self.fall_back(m, f, "header", events),
                Ok(h) => {
                    self.mirrors_seen.insert(m.peer, mirror::Seen::from(&h));
                    match mirror::plan_read(&h, m.from, max.saturating_sub(mirror::HEADER_LEN)) {
                        Err(f) => self.fall_back(m, f, "range", events),
                        Ok((off, len, _)) => {
                            m.step = MirrorStep::Records(h, len);
                            self.mirror_next(m, &[(off, len), header], events);
                        }
                    }
                }
            },
            MirrorStep::Records(h, len) => {
                let (recs, again) = data.split_at(data.len().min(len as usize));
                match mirror::assemble(&h, m.from, recs, budget, &mut answer) {
                    Err(f) => self.fall_back(m, f, "records", events),
                    Ok(_) => match mirror::recheck(&h, again, mlen) {
                        Err(f) => self.fall_back(m, f, "recheck", events),
                        Ok(()) => self.mirror_answer(m, answer, events),
                    },
                }
            }
            MirrorStep::Chain(seen, len) => {
                match mirror::answer_chain(&seen, m.from, &data, len, mlen, budget, &mut answer) {
                    Ok((h, _)) => {
                        self.mirrors_seen.insert(m.peer, mirror::Seen::from(&h));
                        self.mirror_answer(m, answer, events);
                    }
                    Err(f) => {
                        if f == Fallback::Header {
                            // Torn, being rewritten, or another geometry: look again first.
                            self.mirrors_seen.remove(&m.peer);
                        }
                        self.fall_back(m, f, "chain", events);
                    }
                }
            }
        }
    }

    /// A mirror read assembled `answer` (the seqlock held): the read's result.
    fn mirror_answer(&mut self, m: MirrorRead, answer: Vec<u8>, events: &mut Vec<Event>) {
        // The values are whole (CRC) but their encoding was never looked at: an answer
        // the node could not decode would leave the read unanswered, so it is checked
        // here (walked, not built: the node decodes it once) and a bad one asked for
        // over the side channel.
        if let Err(e) = crate::wire::check_read_result(m.from, &answer) {
            return self.fall_back(m, Fallback::Record, &e.to_string(), events);
        }
        let Some(p) = self.pending_reads.remove(&m.ours) else { return };
        self.read_paths.one_sided += 1;
        self.read_paths.one_sided_ns += p.since.elapsed().as_nanos() as u64;
        events.push(Event::ReadDone { from: m.peer, token: m.ours, result: Ok(Bytes::from(answer)) });
    }

    /// Follower: the side-channel acknowledgement (the fallback).
    fn ack_by_message(&mut self, writer: PeerId, theirs: Token, ok: bool, body: &[u8]) -> Result<(), SendError> {
        self.stats.sent_side += 1;
        let result = if ok { Ok(body) } else { Err(body) };
        self.answer(writer, TAG_ACK, theirs, result)
    }

    fn token(&mut self) -> Token {
        let t = self.next_token;
        self.next_token = self.next_token.wrapping_add(1).max(1);
        t
    }

    /// Starts a new epoch of the stream to `peer`, failing what it had unacknowledged.
    fn restart(&mut self, peer: PeerId, round: u64, why: &str, events: &mut Vec<Event>) {
        let s = self.streams.entry(peer).or_default();
        let epoch = if round > s.epoch.0 { (round, 0) } else { (s.epoch.0, s.epoch.1 + 1) };
        let new_term = epoch.1 == 0;
        // The new epoch goes on at the position after the old one's last; the old one's
        // cells counted at landing and not known taken stay out of its way (`behind`).
        let old = s.epoch;
        s.start = s.next_pos;
        s.epoch = epoch;
        s.pointed = false;
        if new_term {
            // The writer leads a new term: it rewrites what is unfinished from its log.
            s.replay.clear();
            s.behind.clear();
        }
        for (pos, token) in std::mem::take(&mut s.unacked) {
            let sent = self.sent.remove(&token);
            self.replays.remove(&token);
            if self.pending_writes.remove(&token).is_some() {
                let result = Err(AccessError::LinkFailed(format!("cell stream restarted: {why}")));
                events.push(Event::WriteDone { to: peer, token, result });
            } else if let (Some(w), false) = (sent, new_term) {
                // Completed at landing (or a replay), not known taken: write it again. Not
                // in a new term: the follower fenced this writer, taking what landed,
                // before promising the term's ballot.
                s.replay.push_back(w);
                s.behind.insert(pos, (old, token));
            }
        }
    }

    /// Writes one cell of `data` (first slot `offset`) to `to` in the current epoch of
    /// its stream, within the window; our token for it. Nothing completes it for the
    /// node unless the caller records it as pending.
    fn issue(&mut self, to: PeerId, offset: u64, data: &[u8]) -> Result<Token, SendError> {
        let window = self.window();
        let Some(s) = self.streams.get(&to) else { return Err(SendError::UnknownPeer(to)) };
        let (epoch, pos, start) = (s.epoch, s.next_pos, s.start);
        // The cell (and acknowledgement slot) of this position must not hold one of this
        // epoch not answered yet; the cell must not hold one of an earlier epoch counted
        // at landing and not known taken. (The first cell of an epoch always passes the
        // second check after one restart: the old epoch kept within one window.)
        let span = s.unacked.first_key_value().map_or(0, |(&first, _)| pos - first);
        let behind = s.behind.first_key_value().map(|(&p, _)| p);
        if span + 1 >= window || behind.is_some_and(|b| pos - b >= self.cells as u64) {
            return Err(SendError::Backpressure(to));
        }
        if !s.pointed {
            // The epoch's first write: the pointer that tells the follower where it starts.
            let local = self.inner.local();
            let resume = behind.unwrap_or(start);
            let p = cells::encode_pointer(&StreamPointer { writer: local, epoch, start, resume });
            let t = self.inner.write(to, 0, &p)?;
            self.pointer_writes.insert(t, (to, epoch));
            if let Some(s) = self.streams.get_mut(&to) {
                s.pointed = true;
            }
        }
        let token = self.token();
        let h = CellHeader { len: 0, writer: self.inner.local(), epoch, pos, first: offset, token, crc: 0 };
        let mut cell = std::mem::take(&mut self.buf);
        cells::encode(&h, data, &mut cell);
        let at = cells::cell_offset((pos % self.cells as u64) as usize, self.cell_size);
        let r = self.inner.write(to, at as u64, &cell);
        self.buf = cell;
        let inner_token = r?;
        let s = self.streams.get_mut(&to).expect("stream exists");
        s.next_pos += 1;
        s.unacked.insert(pos, token);
        self.inner_writes.insert(inner_token, (to, token));
        if self.landing == Landing::ReadAfterWrite {
            // The cell's last word (its canary), read right after the WRITE on the same
            // queue pair. Not issued (no room): the acknowledgement completes the write.
            let canary = (at + self.buf.len()).saturating_sub(8) as u64;
            match self.inner.read(to, canary, 8) {
                Ok(t) => {
                    self.landing_reads.insert(t, (to, token));
                }
                Err(e) => debug!(peer = to, error = %e, "read-after-write not issued; the acknowledgement completes"),
            }
        }
        Ok(token)
    }

    /// Writes what waits for a replay to `peer` (see `Stream::replay`), in order, as far
    /// as the link takes it. Whether nothing waits any more.
    fn flush_replays(&mut self, peer: PeerId) -> bool {
        loop {
            let Some((first, data)) = self.streams.get_mut(&peer).and_then(|s| s.replay.pop_front()) else {
                return true;
            };
            match self.issue(peer, first, &data) {
                Ok(token) => {
                    self.stats.replayed += 1;
                    self.replays.insert(token);
                    self.sent.insert(token, (first, data));
                }
                Err(_) => {
                    if let Some(s) = self.streams.get_mut(&peer) {
                        s.replay.push_front((first, data));
                    }
                    return false;
                }
            }
        }
    }

    fn send_tagged(&mut self, to: PeerId, tag: u8, parts: &[&[u8]]) -> Result<(), SendError> {
        self.buf.clear();
        self.buf.push(tag);
        for p in parts {
            self.buf.extend_from_slice(p);
        }
        self.inner.send(to, &self.buf)
    }

    fn answer(&mut self, to: PeerId, tag: u8, token: Token, result: Result<&[u8], &[u8]>) -> Result<(), SendError> {
        let (status, body) = match result {
            Ok(b) => (STATUS_OK, b),
            Err(d) => (STATUS_DENIED, d),
        };
        self.send_tagged(to, tag, &[&token.to_le_bytes(), &[status], body])
    }

    /// Translates one event of the RDMA transport.
    fn on_inner(&mut self, ev: Event, events: &mut Vec<Event>) {
        match ev {
            Event::Message { from, payload } => self.on_message(from, payload, events),
            Event::WriteDone { to, token, result } => {
                if let Some((writer, theirs, ok, body)) = self.ack_writes.remove(&token) {
                    match result {
                        Ok(_) => self.stats.sent_rdma += 1,
                        Err(e) => {
                            debug!(peer = writer, error = %e, "acknowledgement write failed; sent as a message");
                            if let Err(e) = self.ack_by_message(writer, theirs, ok, &body) {
                                debug!(peer = writer, error = %e, "acknowledgement not delivered");
                            }
                        }
                    }
                    return;
                }
                if let Some((peer, epoch)) = self.pointer_writes.remove(&token) {
                    // A stream pointer that did not land: the follower cannot find the
                    // epoch it names, so that epoch is over.
                    if let Err(e) = result {
                        if self.streams.get(&peer).is_some_and(|s| s.epoch == epoch) {
                            self.restart(peer, 0, &format!("stream pointer: {e}"), events);
                        }
                    }
                    return;
                }
                let Some((_, ours)) = self.inner_writes.remove(&token) else { return };
                match result {
                    Err(e) => {
                        // The cell did not land (or may not have): the stream has a hole.
                        self.finish_write(to, ours, Err(e.clone()), events);
                        self.restart(to, 0, &e.to_string(), events);
                    }
                    // The cell is in the follower's memory: that completes it in memory mode.
                    Ok(_) if self.landing == Landing::Write => self.landed(to, ours, events),
                    // Else its read-after-write, or its acknowledgement, completes it.
                    Ok(_) => {}
                }
            }
            Event::PeerDown { peer, reason } => {
                self.restart(peer, 0, &reason, events);
                // A renewed link may reach a restarted peer with another mirror.
                self.mirrors_seen.remove(&peer);
                let lost: Vec<Token> =
                    self.pending_reads.iter().filter(|(_, p)| p.peer == peer).map(|(&t, _)| t).collect();
                for token in lost {
                    self.pending_reads.remove(&token);
                    let result = Err(AccessError::LinkFailed(reason.clone()));
                    events.push(Event::ReadDone { from: peer, token, result });
                }
                events.push(Event::PeerDown { peer, reason });
            }
            Event::ReadDone { token, result, .. } => {
                if let Some(m) = self.mirror_reads.remove(&token) {
                    self.on_mirror_read(m, result, events);
                } else if let Some((to, ours)) = self.landing_reads.remove(&token) {
                    match result {
                        // Read after the WRITE on the same queue pair: the WRITE was placed.
                        Ok(_) => self.landed(to, ours, events),
                        // The WRITE failed first and said so (the stream restarted).
                        Err(_) if !self.pending_writes.contains_key(&ours) => {}
                        Err(e) => {
                            // The link failed after the WRITE completed: placed or not.
                            let why = format!("read-after-write failed: {e}");
                            self.finish_write(to, ours, Err(AccessError::LinkFailed(why.clone())), events);
                            self.restart(to, 0, &why, events);
                        }
                    }
                }
            }
            Event::WriteArrived { .. } | Event::ReadArrived { .. } => {
                // The RDMA transport never produces arrivals: the agent finds them in memory.
            }
            other => events.push(other),
        }
    }

    fn on_message(&mut self, from: PeerId, payload: Bytes, events: &mut Vec<Event>) {
        let Some(&tag) = payload.first() else {
            warn!(peer = from, "empty RDMA side-channel message dropped");
            return;
        };
        let body = payload.slice(1..);
        match tag {
            TAG_MSG => events.push(Event::Message { from, payload: body }),
            TAG_ACK | TAG_READ_RESP if body.len() >= 9 => {
                let (Some(token), Some(&status)) = (u64_at(&body, 0), body.get(8)) else { return };
                let result = match status {
                    STATUS_OK => Ok(body.slice(9..)),
                    STATUS_DENIED => Err(AccessError::Denied { detail: body.slice(9..) }),
                    s => {
                        warn!(peer = from, status = s, "answer with a bad status dropped");
                        return;
                    }
                };
                if tag == TAG_ACK {
                    if self.pending_writes.contains_key(&token) {
                        self.stats.taken_side += 1;
                    }
                    if let Some(s) = self.streams.get_mut(&from) {
                        if s.unacked.values().any(|&t| t == token) {
                            // The follower took a cell of this epoch: it finished the earlier ones.
                            s.behind.clear();
                        } else if let Some(pos) = s.behind.iter().find(|(_, &(_, t))| t == token).map(|(&p, _)| p) {
                            self.taken_up_to(from, pos);
                        }
                    }
                    self.finish_write(from, token, result.map(|_| ()), events);
                } else if let Some(p) = self.pending_reads.get(&token).copied() {
                    if p.side && p.peer == from {
                        self.pending_reads.remove(&token);
                        self.read_paths.side_channel += 1;
                        self.read_paths.side_channel_ns += p.since.elapsed().as_nanos() as u64;
                        events.push(Event::ReadDone { from, token, result });
                    }
                }
            }
            TAG_READ if body.len() == 20 => {
                let (Some(their), Some(offset), Some(len)) = (u64_at(&body, 0), u64_at(&body, 8), u32_at(&body, 16))
                else {
                    return;
                };
                let ours = self.token();
                self.arrived_reads.insert(ours, (from, their));
                events.push(Event::ReadArrived { from, token: ours, offset, len });
            }
            t => warn!(peer = from, tag = t, len = body.len(), "malformed RDMA side-channel message dropped"),
        }
    }

    /// Reads the header of cell `idx`; `None` if it holds none.
    fn header(&self, idx: usize) -> Option<(CellHeader, [u8; cells::HEADER_LEN])> {
        let mut h = [0u8; cells::HEADER_LEN];
        self.inner.read_region(cells::cell_offset(idx, self.cell_size) as u64, &mut h).ok()?;
        Some((cells::decode_header(&h, self.cell_size)?, h))
    }

    /// The payload of cell `idx` under `h` if it landed whole (canary, CRC).
    fn payload(&self, idx: usize, h: &CellHeader, raw: &[u8; cells::HEADER_LEN]) -> Option<Bytes> {
        let base = cells::cell_offset(idx, self.cell_size) as u64;
        let canary = self.inner.load_u64(base + cells::canary_offset(h.len) as u64).ok()?;
        if canary != cells::canary(h.pos) {
            return None;
        }
        let mut p = vec![0u8; h.len as usize];
        self.inner.read_region(base + cells::HEADER_LEN as u64, &mut p).ok()?;
        // Re-read the header: the CRC must cover the header that goes with this payload.
        let (h2, raw2) = self.header(idx)?;
        if h2 != *h || raw2 != *raw || !cells::check(&raw2, &h2, &p) {
            return None;
        }
        Some(Bytes::from(p))
    }

    /// Follower: takes the holder's newly landed cells, in order.
    fn scan(&mut self, events: &mut Vec<Event>) {
        // Without a holder the stream being taken is kept: a fence revokes its writer,
        // takes what landed, and may grant the same writer again, which then goes on
        // where it was.
        let Some(holder) = self.inner.permission_holder() else { return };
        self.take_cells(holder, MAX_CELLS_PER_SCAN, events);
    }

    /// The stream pointer in our region, if one is whole there.
    fn pointer(&self) -> Option<StreamPointer> {
        let mut b = [0u8; cells::POINTER_LEN];
        self.inner.read_region(0, &mut b).ok()?;
        cells::decode_pointer(&b)
    }

    /// Follower: takes up to `max` newly landed cells of `writer`, in order.
    fn take_cells(&mut self, holder: PeerId, max: usize, events: &mut Vec<Event>) {
        if self.current.is_some_and(|(w, _)| w != holder) {
            self.current = None;
        }
        let taken = self.take_stream(max, events);
        if taken == max {
            return; // more may follow in this epoch
        }
        // This epoch has nothing more for now. The pointer names the writer's newest
        // epoch: once it is visible no cell of an older one lands any more.
        let Some(p) = self.pointer() else { return };
        let newer_than_seen = self.seen.get(&holder).is_none_or(|&e| p.epoch > e);
        let newer_than_current = self.current.is_none_or(|(_, e)| p.epoch > e);
        if p.writer != holder || !newer_than_seen || !newer_than_current {
            return;
        }
        let Some(first) = self.cell(holder, p.epoch, p.start) else { return };
        // The writer may have counted cells of its earlier epochs as accepted that we did
        // not take (acceptance by landing): from `resume` it kept them out of the new
        // epoch's way. Taken in position order, the ones taken already left out.
        let behind = p.start.saturating_sub(p.resume).min(self.cells as u64);
        for pos in p.start - behind..p.start {
            let Some((h, data)) = self.cell_at(pos) else { continue };
            let already = match self.current {
                Some((_, e)) => h.epoch < e || (h.epoch == e && pos < self.next_pos),
                None => self.seen.get(&holder).is_some_and(|&e| h.epoch <= e),
            };
            if h.writer == holder && h.epoch < p.epoch && !already {
                self.arrive(holder, &h, data, events);
            }
        }
        debug!(writer = holder, epoch = ?p.epoch, start = p.start, resume = p.resume, "new cell stream");
        self.current = Some((holder, p.epoch));
        self.next_pos = p.start;
        let (h, data) = first;
        self.arrive(holder, &h, data, events);
        self.next_pos = p.start + 1;
        self.take_stream(max - taken - 1, events);
    }

    /// The whole cell of position `pos`, if that is what its ring cell holds.
    fn cell_at(&self, pos: u64) -> Option<(CellHeader, Bytes)> {
        let idx = (pos % self.cells as u64) as usize;
        let (h, raw) = self.header(idx)?;
        if h.pos != pos {
            return None;
        }
        let data = self.payload(idx, &h, &raw)?;
        Some((h, data))
    }

    /// The whole cell of `writer` in `epoch` at position `pos`.
    fn cell(&self, writer: PeerId, epoch: (u64, u64), pos: u64) -> Option<(CellHeader, Bytes)> {
        self.cell_at(pos).filter(|(h, _)| h.writer == writer && h.epoch == epoch)
    }

    /// Reports a cell taken as an arrived write.
    fn arrive(&mut self, writer: PeerId, h: &CellHeader, data: Bytes, events: &mut Vec<Event>) {
        let ours = self.token();
        self.arrived_writes.insert(ours, Arrived { writer, epoch: h.epoch, pos: h.pos, theirs: h.token });
        self.saw(writer, h.epoch);
        events.push(Event::WriteArrived { from: writer, token: ours, offset: h.first, data });
    }

    /// Cells of `writer`'s `epoch` were taken: the live scan takes only a later epoch of it.
    fn saw(&mut self, writer: PeerId, epoch: (u64, u64)) {
        let seen = self.seen.entry(writer).or_insert(epoch);
        *seen = (*seen).max(epoch);
    }

    /// Follower: takes up to `max` newly landed cells of the stream being taken, in
    /// order; how many.
    fn take_stream(&mut self, max: usize, events: &mut Vec<Event>) -> usize {
        let Some((writer, epoch)) = self.current else { return 0 };
        let mut n = 0;
        while n < max {
            let Some((h, data)) = self.cell(writer, epoch, self.next_pos) else { break };
            self.arrive(writer, &h, data, events);
            self.next_pos += 1;
            n += 1;
        }
        n
    }
}

impl Transport for RdmaAgent {
    fn local(&self) -> PeerId {
        self.inner.local()
    }

    fn peers(&self) -> Vec<PeerId> {
        self.inner.peers()
    }

    fn max_payload(&self) -> usize {
        self.inner.max_payload().saturating_sub(OVERHEAD).min(self.cell_capacity())
    }

    fn send(&mut self, to: PeerId, payload: &[u8]) -> Result<(), SendError> {
        let limit = self.inner.max_payload().saturating_sub(OVERHEAD);
        if payload.len() > limit {
            return Err(SendError::TooLarge { size: payload.len(), limit });
        }
        self.send_tagged(to, TAG_MSG, &[payload])
    }

    fn write(&mut self, to: PeerId, offset: u64, data: &[u8]) -> Result<Token, SendError> {
        if !self.inner.peers().contains(&to) {
            return Err(SendError::UnknownPeer(to));
        }
        let cap = self.cell_capacity();
        if data.len() > cap {
            return Err(SendError::TooLarge { size: data.len(), limit: cap });
        }
        // The write's ballot round opens a new epoch when it grew (a new term).
        let round = u64_at(data, 0).unwrap_or(0);
        if self.streams.get(&to).is_none_or(|s| round > s.epoch.0) {
            let mut events = Vec::new();
            self.restart(to, round, "new term", &mut events);
            self.scratch.extend(events);
        }
        // Replays go first: nothing new before them.
        if !self.flush_replays(to) {
            return Err(SendError::Backpressure(to));
        }
        let token = self.issue(to, offset, data)?;
        self.pending_writes.insert(token, to);
        if self.landing != Landing::Ack {
            self.sent.insert(token, (offset, Bytes::copy_from_slice(data)));
        }
        Ok(token)
    }

    fn read(&mut self, from: PeerId, offset: u64, len: u32) -> Result<Token, SendError> {
        if !self.inner.peers().contains(&from) {
            return Err(SendError::UnknownPeer(from));
        }
        let token = self.token();
        let since = Instant::now();
        // By RDMA READ of the peer's mirror when it has one; else over the side channel.
        if self.mirror_reads_on && offset >= 1 && self.inner.peer_mirror_len(from).is_some() {
            // Seen before: the header, the records and the header again in one list (the
            // records placed by the geometry seen); else the header first.
            let max = self.inner.mirror_read_max();
            let chain =
                self.mirrors_seen.get(&from).and_then(|seen| Some((*seen, mirror::plan_chain(seen, offset, max)?)));
            let header = (0, mirror::HEADER_LEN as u32);
            let issued = match chain {
                Some((seen, (off, len))) => self
                    .inner
                    .read_mirror_chain(from, &[header, (off, len), header])
                    .map(|t| (t, MirrorStep::Chain(seen, len))),
                None => self.inner.read_mirror_chain(from, &[header]).map(|t| (t, MirrorStep::Header)),
            };
            match issued {
                Ok((t, step)) => {
                    self.mirror_reads
                        .insert(t, MirrorRead { peer: from, ours: token, from: offset, budget: len, step });
                    self.pending_reads.insert(token, PendingRead { peer: from, since, side: false });
                    return Ok(token);
                }
                Err(e) => {
                    debug!(peer = from, error = %e, "mirror read not issued; read over the side channel");
                    self.read_paths.fallbacks += 1;
                    *self.fallbacks.entry("not_issued").or_default() += 1;
                }
            }
        }
        self.read_by_message(from, token, offset, len)?;
        self.pending_reads.insert(token, PendingRead { peer: from, since, side: true });
        Ok(token)
    }

    fn complete_write(&mut self, from: PeerId, token: Token, result: Result<&[u8], &[u8]>) -> Result<(), SendError> {
        let Some(a) = self.arrived_writes.remove(&token) else { return Ok(()) };
        debug_assert_eq!(a.writer, from);
        let (ok, body) = match result {
            Ok(b) => (true, b),
            Err(d) => (false, d),
        };
        let slots = self.inner.peer_ack_area_len(a.writer).map_or(0, cells::ack_slots);
        let rec = AckRecord { epoch: a.epoch, pos: a.pos, token: a.theirs, ok, reply: body.to_vec() };
        let mut buf = std::mem::take(&mut self.buf);
        let fits = slots > 0 && cells::encode_ack(&rec, &mut buf);
        let r = if fits { Some(self.inner.write_ack(a.writer, cells::ack_offset(a.pos, slots), &buf)) } else { None };
        self.buf = buf;
        match r {
            Some(Ok(t)) => {
                self.ack_writes.insert(t, (a.writer, a.theirs, ok, rec.reply));
                Ok(())
            }
            Some(Err(e)) => {
                debug!(peer = a.writer, error = %e, "acknowledgement write not issued; sent as a message");
                self.ack_by_message(a.writer, a.theirs, ok, body)
            }
            None => self.ack_by_message(a.writer, a.theirs, ok, body),
        }
    }

    fn complete_read(&mut self, from: PeerId, token: Token, result: Result<&[u8], &[u8]>) -> Result<(), SendError> {
        let Some((reader, theirs)) = self.arrived_reads.remove(&token) else { return Ok(()) };
        debug_assert_eq!(reader, from);
        self.answer(reader, TAG_READ_RESP, theirs, result)
    }

    fn grant(&mut self, peer: PeerId) {
        self.inner.grant(peer);
    }

    fn revoke(&mut self, peer: PeerId) {
        self.inner.revoke(peer);
    }

    fn permission_holder(&self) -> Option<PeerId> {
        self.inner.permission_holder()
    }

    fn fence(&mut self, holder: PeerId, events: &mut Vec<Event>) -> std::io::Result<()> {
        // Was the holder, it is the stream's writer (as `scan` would have seen it).
        let was_holder = self.inner.permission_holder() == Some(holder);
        self.inner.revoke(holder);
        // The drain: after the revocation no WRITE of `holder` lands, so every cell of
        // it that a writer may count as accepted is in the ring now. A WRITE still in
        // flight is refused at the NIC (its writer sees `Denied`), or was placed whole.
        if was_holder || self.current.is_some_and(|(w, _)| w == holder) {
            // Every cell: a ring holds at most `cells` not taken yet.
            let before = events.len();
            self.take_cells(holder, self.cells, events);
            let n = (events.len() - before) as u64;
            self.stats.fences += 1;
            self.stats.drained += n;
            info!(peer = holder, drained = n, "rdma fence: write permission revoked, landed cells taken");
        }
        Ok(())
    }

    fn completes_on_landing(&self) -> bool {
        self.landing != Landing::Ack
    }

    fn recover_landed(&mut self, fresh: bool, events: &mut Vec<Event>) -> std::io::Result<()> {
        let io = |e: transport::rdma::RdmaError| std::io::Error::other(e.to_string());
        if fresh {
            // An earlier life's cells (the region is persistent, the data directory new):
            // its ballots may come again in this one, so they must never be taken.
            let mut n = 0;
            for idx in 0..self.cells {
                let at = cells::cell_offset(idx, self.cell_size) as u64;
                let mut magic = [0u8; 4];
                self.inner.read_region(at, &mut magic).map_err(io)?;
                if magic == cells::MAGIC {
                    self.inner.write_region(at, &[0u8; cells::HEADER_LEN]).map_err(io)?;
                    n += 1;
                }
            }
            self.inner.write_region(0, &[0u8; cells::POINTER_LEN]).map_err(io)?;
            self.stats.discarded += n;
            if n > 0 {
                info!(cells = n, "rdma region: cells of an earlier life discarded (the data directory is new)");
            }
            return Ok(());
        }
        // Every whole cell, in each writer's order; the core takes those of its promise's
        // owner under that promise (taking one again is harmless: same ballot, same value).
        let mut found = Vec::new();
        for idx in 0..self.cells {
            let Some((h, raw)) = self.header(idx) else { continue };
            if let Some(data) = self.payload(idx, &h, &raw) {
                found.push((h.writer, h.epoch, h.pos, h.first, data));
            }
        }
        found.sort_by_key(|&(writer, epoch, pos, _, _)| (writer, epoch, pos));
        for (writer, epoch, _, first, data) in found {
            // Those epochs are taken: the live scan starts from the writer's next one.
            self.saw(writer, epoch);
            self.stats.recovered += 1;
            // Not an arrived write: answering it sends nothing.
            let token = self.token();
            events.push(Event::WriteArrived { from: writer, token, offset: first, data });
        }
        if self.stats.recovered > 0 {
            info!(cells = self.stats.recovered, "rdma region: landed cells handed to the core at start");
        }
        Ok(())
    }

    fn send_queued(&mut self) {
        self.inner.send_queued()
    }

    fn poll(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> std::io::Result<()> {
        let start = events.len();
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut inner_events = Vec::new();
        // A pass of the transport at least every SCAN_SLICE, even when the rings have
        // events on every call: its completions (acknowledgement writes), side channels
        // and heartbeat counter must not wait for a call that finds the rings empty.
        if self.last_inner.elapsed() >= SCAN_SLICE {
            self.last_inner = Instant::now();
            self.inner.poll(&mut inner_events, Some(Duration::ZERO))?;
            for ev in inner_events.drain(..) {
                self.on_inner(ev, events);
            }
        }
        loop {
            events.append(&mut self.scratch);
            let waiting: Vec<PeerId> =
                self.streams.iter().filter(|(_, s)| !s.replay.is_empty()).map(|(&p, _)| p).collect();
            for peer in waiting {
                self.flush_replays(peer);
            }
            self.scan(events);
            self.scan_acks(events);
            self.log_stats();
            let woken = self.waker.woken.swap(false, Ordering::AcqRel);
            if events.len() > start || woken {
                return Ok(());
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Ok(());
            }
            let remaining = deadline.map_or(Duration::from_secs(3600), |d| d - now);
            let scanning = self.awaiting_acks() || self.inner.permission_holder().is_some();
            let wait = if scanning { remaining.min(SCAN_SLICE) } else { remaining };
            inner_events.clear();
            self.inner.poll(&mut inner_events, Some(wait))?;
            self.last_inner = Instant::now();
            for ev in inner_events.drain(..) {
                self.on_inner(ev, events);
            }
        }
    }

    fn waker(&self) -> Arc<dyn Wake> {
        self.waker.clone()
    }
    fn name(&self) -> &'static str {
        "rdma"
    }

    fn mirror_geometry(&self) -> Option<(usize, usize)> {
        let len = self.inner.mirror_len();
        (len > 0 && self.mirror_stride > 0).then_some((len, self.mirror_stride))
    }

    fn put_mirror(&mut self, offset: usize, data: &[u8]) -> Result<(), String> {
        self.inner.write_mirror(offset as u64, data).map_err(|e| e.to_string())
    }

    fn read_paths(&self) -> ReadPaths {
        self.read_paths
    }
}

/// The transport of `replog serve` with `transport = "rdma"`: opens the RDMA device
/// named in `[rdma]`, registers the log region, and wraps it in an [`RdmaAgent`].
pub fn open(cfg: &crate::config::ServeConfig) -> Result<RdmaAgent, crate::server::ServeError> {
    use crate::config::DurabilityKind;
    use crate::server::ServeError;
    let rc = transport_config(cfg)?;
    if let (DurabilityKind::Pmem, Some(path)) = (cfg.durability, &rc.region_path) {
        // Writes complete at a read-after-write here: claim it only on persistent memory.
        use std::os::unix::fs::FileTypeExt;
        let meta = std::fs::metadata(path)
            .map_err(|e| ServeError::Rdma(format!("rdma.region_path {}: cannot stat it: {e}", path.display())))?;
        if !meta.file_type().is_char_device() {
            return Err(ServeError::Rdma(format!(
                "rdma.region_path {}: durability = \"pmem\" needs a device-dax device (/dev/daxN.M) for the \
                 cell ring; this is not a character device, and a file's pages are not persistent memory \
                 (leave rdma.region_path empty to keep the ring in memory, acknowledged after the sync)",
                path.display()
            )));
        }
    }
    let me_addr = rc.listen;
    let cell =
        usize::try_from(cfg.rdma.cell_bytes).map_err(|_| ServeError::Rdma("rdma.cell_bytes too large".into()))?;
    let stride = usize::try_from(cfg.rdma.mirror_record_bytes).unwrap_or(usize::MAX);
    let inner = RdmaTransport::open(rc).map_err(|e| ServeError::Rdma(format!("{e} (peer address {me_addr})")))?;
    tracing::info!(
        node = cfg.id,
        device = inner.device_name(),
        region_bytes = inner.region_len(),
        region_path = %cfg.rdma.region_path.display(),
        cell_bytes = cell,
        "rdma transport open"
    );
    let landing = landing_for(cfg);
    tracing::info!(node = cfg.id, ?landing, durability = cfg.durability.as_str(), "rdma writes complete");
    let agent = RdmaAgent::new(inner, cell).map_err(ServeError::Rdma)?.with_landing(landing);
    if cfg.rdma.mirror_bytes > 0 {
        agent.with_mirror(stride).map_err(ServeError::Rdma)
    } else {
        Ok(agent)
    }
}

/// When a replica with `cfg` completes its writes (see [`crate::config::LandingKind`]).
pub fn landing_for(cfg: &crate::config::ServeConfig) -> Landing {
    use crate::config::{DurabilityKind, LandingKind};
    // The ring is on persistent memory under pmem with a region path (`open` refuses
    // one that is not a device-dax device); followers are configured alike.
    let ring_persistent = cfg.rdma.ring_path().is_some();
    match (cfg.rdma.landing, cfg.durability) {
        (LandingKind::Auto, DurabilityKind::Memory) => Landing::Write,
        (LandingKind::ReadAfterWrite, DurabilityKind::Memory) => Landing::ReadAfterWrite,
        // pmem with the ring on device-dax: a cell placed there is durable, which a read
        // after the write shows (no RDMA FLUSH: rdma-core 44 has no `ibv_wr_flush`).
        (LandingKind::Auto | LandingKind::ReadAfterWrite, DurabilityKind::Pmem) if ring_persistent => {
            Landing::ReadAfterWrite
        }
        // fsync, ack, and pmem with the ring in ordinary memory (a landed cell is not
        // persistent there): by the follower's acknowledgement, after its sync.
        _ => Landing::Ack,
    }
}

/// The [`transport::rdma::RdmaConfig`] a replica with `cfg` opens its transport with
/// (device, region, staging, acknowledgement areas, mirror, heartbeat timeout, secret):
/// what [`open`] uses, and what `bench` opens for its raw RDMA ping-pong baseline so that
/// the baseline takes the replicas' own queue pairs and memory.
pub fn transport_config(
    cfg: &crate::config::ServeConfig,
) -> Result<transport::rdma::RdmaConfig, crate::server::ServeError> {
    use crate::server::ServeError;
    use transport::rdma::RdmaConfig;
    let me = cfg.me().clone();
    let peers = cfg.members.iter().filter(|m| m.id != cfg.id).map(|m| (m.id, m.peer_addr)).collect();
    let mut rc = RdmaConfig::new(cfg.cluster_id, cfg.id, me.peer_addr, peers);
    let r = &cfg.rdma;
    rc.device = (!r.device.is_empty()).then(|| r.device.clone());
    rc.port = r.port;
    rc.gid_index = r.gid_index;
    rc.region_len =
        usize::try_from(r.region_bytes).map_err(|_| ServeError::Rdma("rdma.region_bytes too large".into()))?;
    rc.region_path = r.ring_path().map(std::path::Path::to_path_buf);
    let cell = usize::try_from(r.cell_bytes).map_err(|_| ServeError::Rdma("rdma.cell_bytes too large".into()))?;
    // A message (a read answer) may be as large as a frame; a write is one cell.
    rc.max_payload = (cfg.limits.max_frame_bytes as usize).max(cell) + OVERHEAD;
    // Staging holds one access of the largest size plus a few cells in flight.
    rc.staging_per_peer = rc.max_payload + 4 * cell;
    rc.secret = cfg.read_secret().map_err(|e| ServeError::Security(e.to_string()))?;
    // Replicas must also agree on when a write counts as accepted: a leader that completes
    // at a read-after-write into a follower whose ring is ordinary memory (no
    // region_path there) would count a landing that a crash loses. A replica configured
    // otherwise is refused at the handshake ("stale configuration").
    let settings = format!("durability {} landing {:?}", cfg.durability.as_str(), landing_for(cfg));
    rc.config_digest = cfg.config_digest() ^ u64::from(crc32c::crc32c(settings.as_bytes())).rotate_left(32);
    // One acknowledgement slot per cell of the ring (a peer's region is as large as ours).
    let ring = (rc.region_len / cell.max(1)).max(1);
    rc.ack_area_len = cells::ACK_AREA_HEADER + ring * cells::ACK_SLOT;
    // The accepted-entries mirror (remote READ only) and the staging a read of a peer's
    // mirror lands in: at most a read answer's worth of records, at least one record.
    let stride = usize::try_from(r.mirror_record_bytes).unwrap_or(usize::MAX);
    rc.mirror_len =
        usize::try_from(r.mirror_bytes).map_err(|_| ServeError::Rdma("rdma.mirror_bytes too large".into()))?;
    if rc.mirror_len > 0 {
        let records = rc.max_payload.div_ceil(stride.max(1)).clamp(1, 256);
        rc.mirror_read_max = (records * stride).min(rc.mirror_len).max(mirror::HEADER_LEN);
    }
    rc.reconnect_max =
        Duration::from_nanos(cfg.timing.election_timeout_ns() * 4).clamp(Duration::from_millis(50), rc.reconnect_max);
    // A peer whose poll loop has not run for this long (heartbeat counter read by RDMA
    // READ) is a failed link: a hung follower stops taking writes that its NIC still lands.
    rc.heartbeat_timeout = Some(
        Duration::from_nanos(cfg.timing.election_timeout_ns() * 4)
            .clamp(Duration::from_millis(500), Duration::from_secs(5)),
    );
    Ok(rc)
}
