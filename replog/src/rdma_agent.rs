//! The service over RDMA (`transport = "rdma"`): [`RdmaAgent`] puts the node's remote
//! writes into followers' registered log regions with one-sided RDMA WRITEs, laid out as
//! the cell ring of [`crate::rdma_region`], and presents them to the node exactly as the
//! agent transports do, so that `node.rs` and the core run unchanged:
//!
//! - **leader side**: `write(to, first, bytes)` encodes one cell and issues it with
//!   [`RdmaTransport`]'s one-sided write at the cell's offset. The write completing at
//!   the NIC means the bytes are in the follower's memory, not that the follower
//!   accepted them: the core's `WriteDone` comes from the follower's acknowledgement
//!   (below), or from the NIC's error (a revoked writer is `Denied`, a broken link
//!   `LinkFailed`).
//! - **follower side**: `poll` reads the region (the follower's CPU polls memory, as in
//!   Mu), takes each newly landed, checksummed cell of the permission holder in order and
//!   reports it as [`Event::WriteArrived`]; the node hands it to the core, which checks
//!   the ballot, persists it per the durability mode and, after the covering sync,
//!   answers through [`Transport::complete_write`], which sends the acknowledgement to
//!   the writer as a message on the RDMA transport's side channel. (The end state
//!   is a one-sided write of the acknowledgement into the leader's region; a message is
//!   the first step, and is what `fsync` durability needs anyway: the follower's CPU must
//!   sync before it may acknowledge.)
//! - **reads** (catch-up, a candidate reading a log tail) go as a request and an answer
//!   over the side channel: the core reads slots, which the follower serves from its store,
//!   not from the ring.
//!
//! Messages are tagged with one byte: 0 the core's message, 1 a write acknowledgement
//! (`token u64, status u8, detail`), 2 a read request (`token u64, offset u64, len u32`),
//! 3 a read answer (`token u64, status u8, bytes`). Decoding never panics; malformed
//! frames are dropped.

use crate::rdma_region::{self as cells, CellHeader};
use bytes::Bytes;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, warn};
use transport::rdma::RdmaTransport;
use transport::{AccessError, Event, PeerId, SendError, Token, Transport, Wake};

const TAG_MSG: u8 = 0;
const TAG_ACK: u8 = 1;
const TAG_READ: u8 = 2;
const TAG_READ_RESP: u8 = 3;
const STATUS_OK: u8 = 0;
const STATUS_DENIED: u8 = 1;
/// Bytes a tag and its fixed fields add to a message.
const OVERHEAD: usize = 1 + 8 + 8 + 4;
/// How long `poll` sleeps between looks at the region while a writer holds permission.
const SCAN_SLICE: Duration = Duration::from_micros(200);
/// Cells taken per look.
const MAX_CELLS_PER_SCAN: usize = 256;

/// One writer-to-follower cell stream (leader side).
#[derive(Debug, Default)]
struct Stream {
    epoch: (u64, u64),
    next_seq: u64,
    /// Writes issued in this epoch and not yet acknowledged.
    unacked: BTreeSet<Token>,
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
    cells: usize,
    next_token: Token,
    streams: HashMap<PeerId, Stream>,
    /// The inner transport's write tokens to (target, our token).
    inner_writes: HashMap<Token, (PeerId, Token)>,
    /// Our writes not completed yet, to their target.
    pending_writes: HashMap<Token, PeerId>,
    /// Our reads not completed yet, to their target.
    pending_reads: HashMap<Token, PeerId>,
    // Follower side.
    /// The holder's stream being taken: (writer, epoch), and the next seq expected.
    current: Option<(PeerId, (u64, u64))>,
    next_seq: u64,
    /// The last epoch taken from each writer.
    seen: HashMap<PeerId, (u64, u64)>,
    /// Arrived writes and reads: our token -> (writer, its token).
    arrived_writes: HashMap<Token, (PeerId, Token)>,
    arrived_reads: HashMap<Token, (PeerId, Token)>,
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
        if cell_size < 128 || !cell_size.is_multiple_of(8) || cell_size > region {
            return Err(format!(
                "cell size {cell_size} must be a multiple of 8 from 128 bytes to the region's {region} bytes"
            ));
        }
        let first =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
        let waker = Arc::new(AgentWaker { woken: AtomicBool::new(false), inner: inner.waker() });
        Ok(RdmaAgent {
            cells: region / cell_size,
            cell_size,
            inner,
            next_token: first.max(1),
            streams: HashMap::new(),
            inner_writes: HashMap::new(),
            pending_writes: HashMap::new(),
            pending_reads: HashMap::new(),
            current: None,
            next_seq: 1,
            seen: HashMap::new(),
            arrived_writes: HashMap::new(),
            arrived_reads: HashMap::new(),
            waker,
            buf: Vec::new(),
            scratch: Vec::new(),
        })
    }

    /// The payload capacity of one cell: the largest remote write.
    pub fn cell_capacity(&self) -> usize {
        cells::capacity(self.cell_size)
    }

    /// The RDMA transport underneath.
    pub fn inner(&self) -> &RdmaTransport {
        &self.inner
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
        s.epoch = epoch;
        s.next_seq = 1;
        for token in std::mem::take(&mut s.unacked) {
            if self.pending_writes.remove(&token).is_some() {
                let result = Err(AccessError::LinkFailed(format!("cell stream restarted: {why}")));
                events.push(Event::WriteDone { to: peer, token, result });
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
                let Some((_, ours)) = self.inner_writes.remove(&token) else { return };
                if let Err(e) = result {
                    // The cell did not land (or may not have): the stream has a hole.
                    if self.pending_writes.remove(&ours).is_some() {
                        if let Some(s) = self.streams.get_mut(&to) {
                            s.unacked.remove(&ours);
                        }
                        events.push(Event::WriteDone { to, token: ours, result: Err(e.clone()) });
                    }
                    self.restart(to, 0, &e.to_string(), events);
                }
                // Ok: the cell is in the follower's memory; its acknowledgement completes it.
            }
            Event::PeerDown { peer, reason } => {
                self.restart(peer, 0, &reason, events);
                let lost: Vec<Token> = self.pending_reads.iter().filter(|(_, &p)| p == peer).map(|(&t, _)| t).collect();
                for token in lost {
                    self.pending_reads.remove(&token);
                    let result = Err(AccessError::LinkFailed(reason.clone()));
                    events.push(Event::ReadDone { from: peer, token, result });
                }
                events.push(Event::PeerDown { peer, reason });
            }
            Event::ReadDone { .. } | Event::WriteArrived { .. } | Event::ReadArrived { .. } => {
                // Reads go over messages; the RDMA transport never produces arrivals.
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
                    if self.pending_writes.remove(&token).is_some() {
                        if let Some(s) = self.streams.get_mut(&from) {
                            s.unacked.remove(&token);
                        }
                        events.push(Event::WriteDone { to: from, token, result: result.map(|_| Bytes::new()) });
                    }
                } else if self.pending_reads.remove(&token).is_some() {
                    events.push(Event::ReadDone { from, token, result });
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
        self.inner.read_region((idx * self.cell_size) as u64, &mut h).ok()?;
        Some((cells::decode_header(&h, self.cell_size)?, h))
    }

    /// The payload of cell `idx` under `h` if it landed whole (canary, CRC).
    fn payload(&self, idx: usize, h: &CellHeader, raw: &[u8; cells::HEADER_LEN]) -> Option<Bytes> {
        let base = (idx * self.cell_size) as u64;
        let canary = self.inner.load_u64(base + cells::canary_offset(h.len) as u64).ok()?;
        if canary != cells::canary(h.seq) {
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
        let Some(holder) = self.inner.permission_holder() else {
            self.current = None;
            return;
        };
        if self.current.is_some_and(|(w, _)| w != holder) {
            self.current = None;
        }
        // A new epoch starts at cell 0 with seq 1.
        if let Some((h, raw)) = self.header(0) {
            let newer_than_seen = self.seen.get(&holder).is_none_or(|&e| h.epoch > e);
            let newer_than_current = self.current.is_none_or(|(_, e)| h.epoch > e);
            if h.writer == holder
                && h.seq == 1
                && newer_than_seen
                && newer_than_current
                && self.payload(0, &h, &raw).is_some()
            {
                debug!(writer = holder, epoch = ?h.epoch, "new cell stream");
                self.current = Some((holder, h.epoch));
                self.next_seq = 1;
            }
        }
        let Some((writer, epoch)) = self.current else { return };
        for _ in 0..MAX_CELLS_PER_SCAN {
            let idx = ((self.next_seq - 1) % self.cells as u64) as usize;
            let Some((h, raw)) = self.header(idx) else { break };
            if h.writer != writer || h.epoch != epoch || h.seq != self.next_seq {
                break;
            }
            let Some(data) = self.payload(idx, &h, &raw) else { break };
            let ours = self.token();
            self.arrived_writes.insert(ours, (writer, h.token));
            self.seen.insert(writer, epoch);
            self.next_seq += 1;
            events.push(Event::WriteArrived { from: writer, token: ours, offset: h.first, data });
        }
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
        let s = self.streams.get(&to).expect("stream exists");
        if s.unacked.len() + 1 >= self.cells {
            return Err(SendError::Backpressure(to));
        }
        let (epoch, seq) = (s.epoch, s.next_seq);
        let token = self.token();
        let h = CellHeader { len: 0, writer: self.inner.local(), epoch, seq, first: offset, token, crc: 0 };
        let mut cell = std::mem::take(&mut self.buf);
        cells::encode(&h, data, &mut cell);
        let idx = ((seq - 1) % self.cells as u64) as usize;
        let r = self.inner.write(to, (idx * self.cell_size) as u64, &cell);
        self.buf = cell;
        let inner_token = r?;
        let s = self.streams.get_mut(&to).expect("stream exists");
        s.next_seq += 1;
        s.unacked.insert(token);
        self.inner_writes.insert(inner_token, (to, token));
        self.pending_writes.insert(token, to);
        Ok(token)
    }

    fn read(&mut self, from: PeerId, offset: u64, len: u32) -> Result<Token, SendError> {
        let token = self.token();
        self.send_tagged(from, TAG_READ, &[&token.to_le_bytes(), &offset.to_le_bytes(), &len.to_le_bytes()])?;
        self.pending_reads.insert(token, from);
        Ok(token)
    }

    fn complete_write(&mut self, from: PeerId, token: Token, result: Result<&[u8], &[u8]>) -> Result<(), SendError> {
        let Some((writer, theirs)) = self.arrived_writes.remove(&token) else { return Ok(()) };
        debug_assert_eq!(writer, from);
        self.answer(writer, TAG_ACK, theirs, result)
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

    fn poll(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> std::io::Result<()> {
        let start = events.len();
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut inner_events = Vec::new();
        loop {
            events.append(&mut self.scratch);
            self.scan(events);
            let woken = self.waker.woken.swap(false, Ordering::AcqRel);
            if events.len() > start || woken {
                return Ok(());
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Ok(());
            }
            let remaining = deadline.map_or(Duration::from_secs(3600), |d| d - now);
            let wait = if self.inner.permission_holder().is_some() { remaining.min(SCAN_SLICE) } else { remaining };
            inner_events.clear();
            self.inner.poll(&mut inner_events, Some(wait))?;
            for ev in inner_events.drain(..) {
                self.on_inner(ev, events);
            }
        }
    }

    fn waker(&self) -> Arc<dyn Wake> {
        self.waker.clone()
    }
}

/// The transport of `replog serve` with `transport = "rdma"`: opens the RDMA device
/// named in `[rdma]`, registers the log region, and wraps it in an [`RdmaAgent`].
pub fn open(cfg: &crate::config::ServeConfig) -> Result<RdmaAgent, crate::server::ServeError> {
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
    let cell = usize::try_from(r.cell_bytes).map_err(|_| ServeError::Rdma("rdma.cell_bytes too large".into()))?;
    // A message (a read answer) may be as large as a frame; a write is one cell.
    rc.max_payload = (cfg.limits.max_frame_bytes as usize).max(cell) + OVERHEAD;
    // Staging holds one access of the largest size plus a few cells in flight.
    rc.staging_per_peer = rc.max_payload + 4 * cell;
    rc.secret = cfg.read_secret().map_err(|e| ServeError::Security(e.to_string()))?;
    rc.config_digest = cfg.config_digest();
    rc.reconnect_max =
        Duration::from_nanos(cfg.timing.election_timeout_ns() * 4).clamp(Duration::from_millis(50), rc.reconnect_max);
    let inner =
        RdmaTransport::open(rc).map_err(|e| ServeError::Rdma(format!("{e} (peer address {})", me.peer_addr)))?;
    tracing::info!(
        node = cfg.id,
        device = inner.device_name(),
        region_bytes = inner.region_len(),
        cell_bytes = cell,
        "rdma transport open"
    );
    RdmaAgent::new(inner, cell).map_err(ServeError::Rdma)
}
