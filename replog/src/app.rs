//! Embedding an application: the [`StateMachine`] a replica drives, its snapshots by
//! policy, and the chunked snapshot transfer to followers that fell behind the log.
//!
//! A replica without a state machine is the plain replicated log service: its state is
//! the log itself, so it never snapshots by policy; it drops a prefix only when a client
//! asks ([`crate::client::Request::Trim`]). The trim is a log value, so every replica
//! drops the same prefix at the same point; each saves the core's state there (the
//! de-duplication table, position counter and membership: [`SnapshotMeta`]) as a
//! snapshot with an empty application part ([`AppHost::log_service`]), and a replica
//! behind the trim is sent that snapshot and continues from the log after it. With one,
//! every committed client
//! entry is applied to it in order, exactly once (retries are filtered by the core's
//! de-duplication, which travels inside snapshots); every `every_entries` entries (or
//! `every_bytes` bytes, or `interval`) the replica saves a snapshot beside its log
//! ([`crate::snapshot`]), verifies it, and trims the log behind it, keeping
//! `keep_slots` slots for followers that lag a little. A follower that lags more is sent
//! the snapshot in chunks, resumably, with a window of chunks in flight.

use crate::snapshot::{self, Chunk, ChunkAck, Snapshot, SnapshotError, SnapshotStore, Transfer};
use bytes::Bytes;
use paxos::{NodeId, Position, Slot, SnapshotMeta};
use std::collections::HashMap;
use std::io;
use std::time::{Duration, Instant};

/// What an application implements to be replicated by replog.
///
/// Every method runs on the replica's polling thread: keep them short (no blocking I/O
/// but in the snapshot methods).
pub trait StateMachine: Send {
    /// Applies one committed client entry, in position order, exactly once. `token` is
    /// the token given to [`crate::embed::ReplicaHandle::replicate`] when this replica
    /// proposed the entry (`None` for entries proposed elsewhere or by a remote
    /// client). The returned bytes answer the proposer.
    fn apply(&mut self, position: Position, payload: &[u8], token: Option<u64>) -> Bytes;

    /// Writes the whole state to `out` (the core's part is added by replog).
    fn save_snapshot(&mut self, out: &mut Vec<u8>) -> io::Result<()>;

    /// Replaces the whole state with a snapshot written by `save_snapshot`.
    fn load_snapshot(&mut self, data: &[u8]) -> io::Result<()>;

    /// Answers a read-only query on the applied state (linearizable when asked of the
    /// leader with `linearizable`, else possibly stale).
    fn query(&mut self, request: &[u8]) -> Bytes {
        let _ = request;
        Bytes::new()
    }

    /// This replica became leader (`leading`), or stopped being it; `leader` is the
    /// leader now known.
    fn leadership_changed(&mut self, leading: bool, leader: Option<NodeId>) {
        let _ = (leading, leader);
    }

    /// Proposals this replica made (by token) will not be committed by it: it stopped
    /// leading before they got a slot. The application may retry them at the new leader.
    fn proposals_aborted(&mut self, tokens: &[u64]) {
        let _ = tokens;
    }

    /// The membership changed (also called once at start with the initial one).
    fn configuration_changed(&mut self, voters: &[NodeId], learners: &[NodeId]) {
        let _ = (voters, learners);
    }

    /// Whether this replica may become leader; asked at start and after every role
    /// change (a veto).
    fn may_lead(&mut self) -> bool {
        true
    }
}

/// When a replica with a state machine snapshots (any condition that holds triggers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotPolicy {
    /// After this many applied entries since the last snapshot (0: never by count).
    pub every_entries: u64,
    /// After this many applied payload bytes since the last snapshot (0: never).
    pub every_bytes: u64,
    /// After this long since the last snapshot, if anything was applied (None: never).
    pub interval: Option<Duration>,
    /// Slots kept in the log behind a snapshot for followers that lag a little.
    pub keep_slots: u64,
    /// Snapshot transfer: bytes per chunk.
    pub chunk_bytes: usize,
    /// Snapshot transfer: chunks in flight.
    pub window: u64,
}

impl Default for SnapshotPolicy {
    fn default() -> Self {
        SnapshotPolicy {
            every_entries: 100_000,
            every_bytes: 256 << 20,
            interval: None,
            keep_slots: 1000,
            chunk_bytes: 256 << 10,
            window: 4,
        }
    }
}

/// An outgoing snapshot transfer.
struct Outgoing {
    slot: Slot,
    bytes: Bytes,
    /// Every byte before this is acknowledged.
    acked: u64,
    /// Every byte before this was sent.
    sent: u64,
    last_progress: Instant,
}

/// An incoming snapshot transfer.
struct Incoming {
    from: NodeId,
    slot: Slot,
    total: u64,
    buf: Vec<u8>,
}

/// Counters for status and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapshotStats {
    /// Snapshots taken here.
    pub taken: u64,
    /// Snapshots received and installed.
    pub installed: u64,
    /// Snapshot transfers started to followers.
    pub sent: u64,
    /// Received snapshots rejected (corrupt, wrong cluster).
    pub rejected: u64,
    /// The slot of the newest snapshot.
    pub last_slot: Slot,
}

/// What a finished incoming transfer asks of the node.
pub struct Received {
    /// The leader that sent it.
    pub from: NodeId,
    /// The snapshot, verified.
    pub snapshot: Snapshot,
}

/// The application side of a replica: the state machine, its snapshots and transfers.
pub struct AppHost {
    sm: Box<dyn StateMachine>,
    store: SnapshotStore,
    policy: SnapshotPolicy,
    since_entries: u64,
    since_bytes: u64,
    since: Instant,
    outgoing: HashMap<NodeId, Outgoing>,
    incoming: Option<Incoming>,
    stats: SnapshotStats,
    requested: bool,
    /// The plain log service (see [`AppHost::log_service`]).
    log_service: bool,
}

impl AppHost {
    /// Hosts `sm` with snapshots in `store`.
    pub fn new(sm: Box<dyn StateMachine>, store: SnapshotStore, policy: SnapshotPolicy) -> Self {
        AppHost {
            sm,
            store,
            policy,
            log_service: false,
            since_entries: 0,
            since_bytes: 0,
            since: Instant::now(),
            outgoing: HashMap::new(),
            incoming: None,
            stats: SnapshotStats::default(),
            requested: false,
        }
    }

    /// The plain log service's host: no state machine of its own (its state is the
    /// log), no snapshots by policy; it saves the snapshots of trims
    /// ([`AppHost::save_trim`]) and sends them to replicas behind a trim.
    pub fn log_service(store: SnapshotStore, policy: SnapshotPolicy) -> Self {
        let never = SnapshotPolicy { every_entries: 0, every_bytes: 0, interval: None, keep_slots: 0, ..policy };
        let mut h = AppHost::new(Box::new(LogService), store, never);
        h.log_service = true;
        h
    }

    /// Whether this hosts the plain log service (no state machine of the user's).
    pub fn is_log_service(&self) -> bool {
        self.log_service
    }

    /// The plain log service: saves (and verifies) the snapshot of a trim at
    /// `meta.slot`, which may be behind what was applied (the log service's own state is
    /// the log, so the snapshot is the core's state alone).
    pub fn save_trim(&mut self, cluster_id: u64, meta: &SnapshotMeta) -> Result<(), SnapshotError> {
        debug_assert!(self.log_service);
        let bytes = Bytes::from(snapshot::encode(cluster_id, meta, &[]));
        self.store.save(meta.slot, bytes)?;
        self.stats.taken += 1;
        self.stats.last_slot = meta.slot;
        Ok(())
    }

    /// The state machine.
    pub fn sm(&mut self) -> &mut dyn StateMachine {
        &mut *self.sm
    }

    /// Counters.
    pub fn stats(&self) -> SnapshotStats {
        self.stats
    }

    /// Loads the newest valid snapshot into the state machine (at start). Returns its
    /// core part, and the reasons older or corrupt files were passed over.
    pub fn restore(&mut self) -> Result<(Option<SnapshotMeta>, Vec<String>), SnapshotError> {
        let (snap, rejected) = self.store.load_latest()?;
        let Some(s) = snap else { return Ok((None, rejected)) };
        self.sm.load_snapshot(&s.app).map_err(|e| SnapshotError::Io {
            op: "load into the state machine",
            path: "snapshot".into(),
            source: e,
        })?;
        self.stats.last_slot = s.meta.slot;
        Ok((Some(s.meta), rejected))
    }

    /// Notes an applied entry for the snapshot policy and applies it.
    pub fn apply(&mut self, position: Position, payload: &[u8], token: Option<u64>) -> Bytes {
        self.since_entries += 1;
        self.since_bytes += payload.len() as u64;
        self.sm.apply(position, payload, token)
    }

    /// Asks for a snapshot at the next chance, whatever the policy says.
    pub fn request_snapshot(&mut self) {
        self.requested = true;
    }

    /// Whether the policy (or a request) asks for a snapshot now.
    pub fn snapshot_due(&self) -> bool {
        let p = &self.policy;
        self.requested
            || (p.every_entries > 0 && self.since_entries >= p.every_entries)
            || (p.every_bytes > 0 && self.since_bytes >= p.every_bytes)
            || (self.since_entries > 0 && p.interval.is_some_and(|i| self.since.elapsed() >= i))
    }

    /// Takes a snapshot at `meta.slot` (the state machine must have applied exactly up
    /// to it), saves and verifies it. Returns the slot up to which the log may be
    /// trimmed.
    pub fn take_snapshot(&mut self, cluster_id: u64, meta: &SnapshotMeta) -> Result<Slot, SnapshotError> {
        let mut app = Vec::new();
        self.sm.save_snapshot(&mut app).map_err(|e| SnapshotError::Io {
            op: "save from the state machine",
            path: "snapshot".into(),
            source: e,
        })?;
        let bytes = Bytes::from(snapshot::encode(cluster_id, meta, &app));
        self.store.save(meta.slot, bytes)?;
        self.since_entries = 0;
        self.since_bytes = 0;
        self.since = Instant::now();
        self.stats.taken += 1;
        self.stats.last_slot = meta.slot;
        self.requested = false;
        Ok(meta.slot.saturating_sub(self.policy.keep_slots))
    }

    /// The core asked to send `to` our snapshot: start (or resume) the transfer. Frames
    /// to send are appended to `out` as (peer, bytes).
    pub fn start_send(&mut self, to: NodeId, out: &mut Vec<(NodeId, Vec<u8>)>) -> bool {
        let Some((slot, bytes)) = self.store.latest().cloned() else { return false };
        let o = self.outgoing.entry(to).or_insert_with(|| Outgoing {
            slot,
            bytes: bytes.clone(),
            acked: 0,
            sent: 0,
            last_progress: Instant::now(),
        });
        if o.slot != slot {
            *o = Outgoing { slot, bytes, acked: 0, sent: 0, last_progress: Instant::now() };
        }
        // Asked again: resume from what the follower acknowledged.
        o.sent = o.acked;
        o.last_progress = Instant::now();
        self.stats.sent += 1;
        self.pump(to, out);
        true
    }

    fn pump(&mut self, to: NodeId, out: &mut Vec<(NodeId, Vec<u8>)>) {
        let (chunk, window) = (self.policy.chunk_bytes.max(1) as u64, self.policy.window.max(1));
        let Some(o) = self.outgoing.get_mut(&to) else { return };
        let total = o.bytes.len() as u64;
        while o.sent < total && o.sent < o.acked + chunk * window {
            let end = (o.sent + chunk).min(total);
            let c = Chunk { slot: o.slot, total, offset: o.sent, data: o.bytes.slice(o.sent as usize..end as usize) };
            let mut b = Vec::with_capacity(c.data.len() + 32);
            snapshot::encode_chunk(&c, &mut b);
            out.push((to, b));
            o.sent = end;
        }
    }

    /// Re-sends from the last acknowledgement transfers that made no progress for
    /// `timeout`.
    pub fn tick(&mut self, timeout: Duration, out: &mut Vec<(NodeId, Vec<u8>)>) {
        let stalled: Vec<NodeId> =
            self.outgoing.iter().filter(|(_, o)| o.last_progress.elapsed() >= timeout).map(|(&p, _)| p).collect();
        for p in stalled {
            if let Some(o) = self.outgoing.get_mut(&p) {
                o.sent = o.acked;
                o.last_progress = Instant::now();
            }
            self.pump(p, out);
        }
    }

    /// A transfer frame from `from`. `useful(slot)` says whether a snapshot of that
    /// slot would move the replica forward. A completed, verified snapshot is saved
    /// durably and returned for the node to install.
    pub fn on_frame(
        &mut self,
        from: NodeId,
        frame: Transfer,
        cluster_id: u64,
        useful: impl Fn(Slot) -> bool,
        out: &mut Vec<(NodeId, Vec<u8>)>,
    ) -> Result<Option<Received>, SnapshotError> {
        match frame {
            Transfer::Ack(a) => {
                if let Some(o) = self.outgoing.get_mut(&from) {
                    if a.slot != o.slot || a.next == u64::MAX {
                        self.outgoing.remove(&from);
                        return Ok(None);
                    }
                    if a.next > o.acked {
                        o.acked = a.next.min(o.bytes.len() as u64);
                        o.last_progress = Instant::now();
                    }
                    if o.acked >= o.bytes.len() as u64 {
                        self.outgoing.remove(&from);
                        return Ok(None);
                    }
                    self.pump(from, out);
                }
                Ok(None)
            }
            Transfer::Chunk(c) => {
                let ack = |next: u64, out: &mut Vec<(NodeId, Vec<u8>)>| {
                    let mut b = Vec::with_capacity(17);
                    snapshot::encode_ack(&ChunkAck { slot: c.slot, next }, &mut b);
                    out.push((from, b));
                };
                if !useful(c.slot) {
                    ack(u64::MAX, out);
                    return Ok(None);
                }
                let fresh = self.incoming.as_ref().is_none_or(|i| i.from != from || i.slot != c.slot);
                if fresh {
                    if c.offset != 0 {
                        ack(0, out); // start over: we hold nothing of this one
                        return Ok(None);
                    }
                    let cap = c.total.min(64 << 20) as usize;
                    self.incoming = Some(Incoming { from, slot: c.slot, total: c.total, buf: Vec::with_capacity(cap) });
                }
                let inc = self.incoming.as_mut().expect("incoming");
                if c.total != inc.total {
                    self.incoming = None;
                    ack(0, out);
                    return Ok(None);
                }
                if c.offset == inc.buf.len() as u64 {
                    inc.buf.extend_from_slice(&c.data);
                }
                let have = inc.buf.len() as u64;
                if have < inc.total {
                    ack(have, out);
                    return Ok(None);
                }
                let inc = self.incoming.take().expect("incoming");
                let snap = match snapshot::decode(&inc.buf) {
                    Ok(s) if s.cluster_id != cluster_id => {
                        Err(SnapshotError::WrongCluster { found: s.cluster_id, expected: cluster_id })
                    }
                    Ok(s) if s.meta.slot != inc.slot => Err(SnapshotError::Invalid("slot differs from the transfer's")),
                    other => other,
                };
                let snap = match snap {
                    Ok(s) => s,
                    Err(e) => {
                        self.stats.rejected += 1;
                        ack(0, out); // corrupt: ask for it again from the start
                        return Err(e);
                    }
                };
                self.store.save(inc.slot, Bytes::from(inc.buf))?;
                self.sm.load_snapshot(&snap.app).map_err(|e| SnapshotError::Io {
                    op: "load into the state machine",
                    path: "snapshot".into(),
                    source: e,
                })?;
                self.stats.installed += 1;
                self.stats.last_slot = inc.slot;
                self.since_entries = 0;
                self.since_bytes = 0;
                self.since = Instant::now();
                ack(u64::MAX, out);
                Ok(Some(Received { from, snapshot: snap }))
            }
        }
    }
}

/// The plain log service's stand-in state machine: its state is the log, which the
/// node serves from the store, so it applies nothing and its snapshot part is empty.
#[derive(Debug, Default)]
struct LogService;

impl StateMachine for LogService {
    fn apply(&mut self, _position: Position, _payload: &[u8], _token: Option<u64>) -> Bytes {
        Bytes::new()
    }

    fn save_snapshot(&mut self, _out: &mut Vec<u8>) -> io::Result<()> {
        Ok(())
    }

    fn load_snapshot(&mut self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            Ok(())
        } else {
            let msg = format!("a log-service snapshot carries no application state, this one {} bytes", data.len());
            Err(io::Error::new(io::ErrorKind::InvalidData, msg))
        }
    }
}

/// A replicated key-value map, the example state machine (`state_machine = "kv"`).
///
/// Commands (payloads): `set <key> <value>` and `del <key>`; answers `ok`, or the
/// previous value for `set`/`del` when there was one. Queries: `get <key>` answers the
/// value or nothing; `len` answers the number of keys.
#[derive(Debug, Default)]
pub struct KvMachine {
    map: std::collections::BTreeMap<Vec<u8>, Vec<u8>>,
}

impl KvMachine {
    /// The number of keys.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

fn split_word(b: &[u8]) -> (&[u8], &[u8]) {
    match b.iter().position(|&c| c == b' ') {
        Some(i) => (&b[..i], &b[i + 1..]),
        None => (b, &[]),
    }
}

impl StateMachine for KvMachine {
    fn apply(&mut self, _position: Position, payload: &[u8], _token: Option<u64>) -> Bytes {
        let (cmd, rest) = split_word(payload);
        match cmd {
            b"set" => {
                let (k, v) = split_word(rest);
                match self.map.insert(k.to_vec(), v.to_vec()) {
                    Some(old) => Bytes::from(old),
                    None => Bytes::from_static(b"ok"),
                }
            }
            b"del" => match self.map.remove(rest) {
                Some(old) => Bytes::from(old),
                None => Bytes::from_static(b"ok"),
            },
            _ => Bytes::from_static(b"error: unknown command (set <key> <value> | del <key>)"),
        }
    }

    fn save_snapshot(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        out.extend_from_slice(&(self.map.len() as u64).to_le_bytes());
        for (k, v) in &self.map {
            out.extend_from_slice(&(k.len() as u32).to_le_bytes());
            out.extend_from_slice(k);
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(v);
        }
        Ok(())
    }

    fn load_snapshot(&mut self, data: &[u8]) -> io::Result<()> {
        let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed key-value snapshot");
        let mut r = data;
        let mut take = |n: usize| -> io::Result<&[u8]> {
            if r.len() < n {
                return Err(bad());
            }
            let (a, b) = r.split_at(n);
            r = b;
            Ok(a)
        };
        let n = u64::from_le_bytes(take(8)?.try_into().map_err(|_| bad())?);
        let mut map = std::collections::BTreeMap::new();
        for _ in 0..n {
            let kl = u32::from_le_bytes(take(4)?.try_into().map_err(|_| bad())?) as usize;
            let k = take(kl)?.to_vec();
            let vl = u32::from_le_bytes(take(4)?.try_into().map_err(|_| bad())?) as usize;
            let v = take(vl)?.to_vec();
            map.insert(k, v);
        }
        if !take(0)?.is_empty() || !r.is_empty() {
            return Err(bad());
        }
        self.map = map;
        Ok(())
    }

    fn query(&mut self, request: &[u8]) -> Bytes {
        let (cmd, rest) = split_word(request);
        match cmd {
            b"get" => self.map.get(rest).map(|v| Bytes::copy_from_slice(v)).unwrap_or_default(),
            b"len" => Bytes::from(self.map.len().to_string()),
            _ => Bytes::from_static(b"error: unknown query (get <key> | len)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_applies_snapshots_and_rejects_garbage() {
        let mut kv = KvMachine::default();
        assert_eq!(&kv.apply(1, b"set a 1", None)[..], b"ok");
        assert_eq!(&kv.apply(2, b"set a 2", None)[..], b"1");
        kv.apply(3, b"set b x y", None);
        assert_eq!(&kv.query(b"get b")[..], b"x y");
        let mut snap = Vec::new();
        kv.save_snapshot(&mut snap).unwrap();
        let mut other = KvMachine::default();
        if let Err(e) = other.load_snapshot(&snap) {
            panic!("a snapshot just saved does not load: {e}");
        }
        assert_eq!(&other.query(b"get a")[..], b"2");
        assert_eq!(&other.query(b"len")[..], b"2");
        for n in 0..snap.len() {
            assert!(KvMachine::default().load_snapshot(&snap[..n]).is_err(), "truncated at {n} accepted");
        }
    }

    /// A transfer frame the test's own side just made, decoded.
    fn transfer(frame: &[u8]) -> snapshot::Transfer {
        match snapshot::decode_transfer(frame) {
            Some(Ok(t)) => t,
            Some(Err(e)) => panic!("a transfer frame does not decode: {e}"),
            None => panic!("not a transfer frame: {frame:?}"),
        }
    }

    #[test]
    fn transfer_delivers_a_snapshot_in_chunks_despite_loss_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let policy = SnapshotPolicy { chunk_bytes: 100, window: 3, ..SnapshotPolicy::default() };
        let store = SnapshotStore::open(Some(dir.path().join("a")), 7).unwrap();
        let mut leader = AppHost::new(Box::new(KvMachine::default()), store, policy.clone());
        for i in 0..200u64 {
            leader.apply(i + 1, format!("set k{i} value-{i}").as_bytes(), None);
        }
        let meta = SnapshotMeta {
            slot: 77,
            last_position: 200,
            clients: vec![(1, vec![(5, 200)])],
            membership: paxos::Membership::new(vec![1, 2, 3], vec![]),
        };
        leader.take_snapshot(7, &meta).unwrap();
        let store = SnapshotStore::open(Some(dir.path().join("b")), 7).unwrap();
        let mut follower = AppHost::new(Box::new(KvMachine::default()), store, policy);
        let mut to_f = Vec::new();
        assert!(leader.start_send(2, &mut to_f));
        let mut got = None;
        let mut dropped = 0;
        for round in 0..10_000 {
            if to_f.is_empty() {
                // Everything in flight was lost: the sender times out and resumes.
                leader.tick(Duration::ZERO, &mut to_f);
            }
            let mut to_l = Vec::new();
            for (i, (_, frame)) in std::mem::take(&mut to_f).into_iter().enumerate() {
                if (round + i) % 5 == 0 {
                    dropped += 1;
                    continue; // lost
                }
                let t = transfer(&frame);
                match follower.on_frame(1, t, 7, |s| s > 0, &mut to_l) {
                    Ok(Some(r)) => got = Some(r),
                    Ok(None) => {}
                    Err(e) => panic!("the follower refuses a chunk (or the snapshot it completes): {e}"),
                }
            }
            for (_, frame) in to_l {
                if let Err(e) = leader.on_frame(2, transfer(&frame), 7, |_| false, &mut to_f) {
                    panic!("the leader refuses an acknowledgement: {e}");
                }
            }
            if got.is_some() {
                break;
            }
        }
        let r = got.expect("snapshot delivered");
        assert!(dropped > 0);
        assert_eq!(r.snapshot.meta, meta);
        assert_eq!(&follower.sm().query(b"get k199")[..], b"value-199");
        assert_eq!(follower.stats().installed, 1);
        // Saved durably on the follower's side.
        let mut reopened = SnapshotStore::open(Some(dir.path().join("b")), 7).unwrap();
        let loaded = reopened.load_latest().map(|(s, _)| s.map(|s| s.meta.slot)).map_err(|e| e.to_string());
        assert_eq!(loaded, Ok(Some(77)), "the follower's snapshot reads back");
    }
}
