//! The node driver: one run-to-completion loop per replica that feeds the Paxos core
//! from the transport, the client port and the clock, syncs the store once per round
//! (group commit), and executes the core's actions.
//!
//! ```text
//! loop {
//!     transport.poll(events, until the core's next timer)      // peers
//!     core.handle_*(events)                                     // messages, remote writes/reads, completions
//!     core.propose / reads / status  <- client requests         // from the client-port thread
//!     core.handle_timeout if due
//!     execute core.poll_action()                                // what needs no sync: a leader's remote writes
//!     core.flush()                                              // one storage sync covers everything above
//!     execute core.poll_action(): send, write, read, complete, grant/revoke, apply -> answer clients
//! }
//! ```
//!
//! The receiver-side agent of the one-sided model is the `WriteArrived`/`ReadArrived`
//! handling here: the transport already refused writers without permission; the core
//! checks the ballot again and acknowledges only after the sync that covers the write
//! (its completion action is released by `flush`).

use crate::app::AppHost;
use crate::client::server::ClientPort;
use crate::client::MemberOp;
use crate::client::{ConnId, ErrorCode, Inbound, Outbound, PeerStatus, Request, Responder, Response, Status};
use crate::embed::{Local, LocalReply, LOCAL_CONN};
use crate::members::{Directory, MemberAddrs};
use crate::metrics::Metrics;
use crate::mirrored_store::{MirroredStore, PublishError};
use crate::snapshot;
use crate::store::PaxosStore;
use crate::wire;
use bytes::Bytes;
use paxos::{
    Action, Applied, Ballot, Command, Config, Nanos, NodeId, Position, ProposeError, ReadRequest, Replica, Role, Slot,
    SnapshotMeta, Storage, Value, WriteResult,
};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, error, info, warn};
use transport::{AccessError, Event, PeerId, PeerSpec, Token, Transport};

/// What the node needs besides the protocol configuration.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// The protocol configuration (id, members, timing, limits).
    pub paxos: Config,
    /// The cluster id (for status).
    pub cluster_id: u64,
    /// Each configured member's client address, for redirects (members added later are
    /// found in `directory`).
    pub client_addrs: BTreeMap<NodeId, String>,
    /// The configured members' addresses; the replicated membership adds and overrides
    /// entries (see [`crate::members`]).
    pub directory: Directory,
    /// Largest client entry accepted.
    pub max_entry_bytes: usize,
    /// Largest response frame (reads and tails are cut to fit).
    pub max_frame_bytes: usize,
    /// The durability mode in force, as reported by the store.
    pub durability: String,
    /// After any activity, poll without sleeping for this long before blocking
    /// (`[timing] spin_us`).
    pub spin: Duration,
}

/// Why a node stopped.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The protocol core stopped (a storage failure: nothing more is acknowledged).
    #[error("replica stopped: {0}")]
    Core(#[from] paxos::Error),
    /// The transport failed.
    #[error("transport failed: {0}")]
    Transport(#[from] std::io::Error),
    /// A snapshot could not be saved, verified or loaded (nothing is trimmed then).
    #[error("snapshot: {0}")]
    Snapshot(#[from] crate::snapshot::SnapshotError),
}

struct PendingAppend {
    positions: Vec<Position>,
    remaining: usize,
    started: Instant,
}

struct LinRead {
    conn: ConnId,
    req_id: u64,
    from: Position,
    max_entries: usize,
    max_bytes: usize,
    /// A state-machine query to answer instead of a read of entries.
    query: Option<Bytes>,
}

struct TailSub {
    conn: ConnId,
    req_id: u64,
    next: Position,
}

/// One replica's driver.
pub struct Node<T: Transport> {
    opts: NodeOptions,
    replica: Replica<MirroredStore>,
    transport: T,
    inbound: Receiver<Inbound>,
    responder: Responder,
    metrics: Arc<Metrics>,
    start: Instant,
    /// Agent side: tokens of arrived accesses, per peer, in arrival order (the core
    /// answers each access exactly once, in order).
    arrived_writes: HashMap<PeerId, VecDeque<Token>>,
    /// The core asked for a fence ([`Action::Fence`]) and it was carried out: tell the
    /// core once the actions in hand are executed.
    fence_done: bool,
    /// Arrived reads: token and the reader's byte budget.
    arrived_reads: HashMap<PeerId, VecDeque<(Token, usize)>>,
    /// Issuer side: what each outstanding access was.
    my_writes: HashMap<Token, (Ballot, Slot, u64)>,
    my_reads: HashMap<Token, ReadRequest>,
    /// Client appends waiting for their entries to be applied.
    appends: HashMap<(ConnId, u64), PendingAppend>,
    /// (client, seq) -> (conn, request, index in the request's batch).
    waiters: HashMap<(u64, u64), (ConnId, u64, usize)>,
    /// Position `index_base + 1 + i` -> (slot, index in the slot's batch), for reads by
    /// position. Positions up to `index_base` are covered by a snapshot.
    index: Vec<(Slot, u32)>,
    index_base: Position,
    /// The embedded application, if any (none: the plain log service).
    app: Option<AppHost>,
    /// The last slot the application applied.
    app_slot: Slot,
    /// Snapshot transfer frames to send.
    frames: Vec<(NodeId, Vec<u8>)>,
    /// In-process requests (see [`crate::embed`]): where their answers go.
    local: Local,
    /// Requests for a snapshot, answered once one is taken.
    snapshot_waiters: Vec<(ConnId, u64)>,
    /// A log-service trim applied, to save and compact to (see [`Node::trim_housekeeping`]).
    pending_trim: Option<SnapshotMeta>,
    /// Trim requests proposed here, answered once a trim is applied (or leadership lost).
    trim_waiters: Vec<(ConnId, u64)>,
    /// The client port, when it is served on this thread (see [`Node::with_client_port`]).
    client_port: Option<ClientPort>,
    /// The last decoded slot (reads usually walk consecutive positions).
    cache: Option<(Slot, Arc<Vec<Command>>)>,
    tails: Vec<TailSub>,
    /// Linearizable reads waiting for the core's confirmation, by read id.
    lin_reads: HashMap<u64, LinRead>,
    next_read_id: u64,
    connected: BTreeMap<PeerId, bool>,
    /// Where the members are: the configured ones and those the log added.
    directory: Directory,
    /// The newest membership change in the log at start (see [`Node::with_app`]):
    /// its members keep a link until this replica applied past its slot.
    logged_config: Option<(Slot, paxos::Membership)>,
    /// The peer set last given to the transport.
    transport_peers: BTreeMap<PeerId, PeerSpec>,
    /// Whether this replica is in the membership in force.
    member: bool,
    buf: Vec<u8>,
    last_metrics: Instant,
    /// Publishes into the transport's one-sided read mirror, when it has one (the
    /// store then notes which slots it accepts at for it: [`MirroredStore`]).
    mirror: Option<crate::rdma_mirror::Publisher>,
}

impl<T: Transport> Node<T> {
    /// A node over `store` and `transport`, answering the client requests that arrive on
    /// `inbound` through `responder`.
    pub fn new(
        opts: NodeOptions,
        store: PaxosStore,
        transport: T,
        inbound: Receiver<Inbound>,
        responder: Responder,
        metrics: Arc<Metrics>,
    ) -> Result<Self, NodeError> {
        Self::with_app(opts, store, transport, inbound, responder, metrics, None)
    }

    /// A node that drives the application `app` (see [`crate::app`]): it starts from
    /// the newest valid snapshot beside the log.
    pub fn with_app(
        opts: NodeOptions,
        store: PaxosStore,
        transport: T,
        inbound: Receiver<Inbound>,
        responder: Responder,
        metrics: Arc<Metrics>,
        mut app: Option<AppHost>,
    ) -> Result<Self, NodeError> {
        let mut meta = SnapshotMeta::default();
        let mut paxos = opts.paxos.clone();
        if let Some(a) = app.as_mut() {
            let (snap, rejected) = a.restore()?;
            for why in rejected {
                warn!(%why, "snapshot passed over");
            }
            if let Some(m) = snap {
                info!(slot = m.slot, last_position = m.last_position, "state machine loaded from snapshot");
                meta = m;
            }
            a.sm().configuration_changed(&paxos.voters, &paxos.learners);
            paxos.can_lead = paxos.can_lead && a.sm().may_lead();
        }
        let (index_base, app_slot) = (meta.last_position, meta.slot);
        let mut directory = opts.directory.clone();
        // A restarted replica links at once to the members of the newest change in its
        // log (it applies the log again only as it learns the commit index, and a
        // member added since the start may be the one leading).
        let logged = store.recovered_config().cloned();
        if let Some((slot, m)) = &logged {
            for (id, why) in directory.learn(m) {
                warn!(member = id, %why, "logged member addresses ignored");
            }
            info!(slot, voters = ?m.voters, learners = ?m.learners, "newest membership change in the log");
        }
        let mirror = transport.mirror_geometry().and_then(|(len, stride)| {
            crate::rdma_mirror::Publisher::new(len, stride)
                .map_err(|e| warn!(error = %e, "read mirror not used; log-tail reads go over the side channel"))
                .ok()
        });
        let replica = Replica::restore(paxos, MirroredStore::new(store, mirror.is_some()), 0, meta)?;
        let connected = transport.peers().into_iter().map(|p| (p, false)).collect();
        let mut node = Node {
            opts,
            replica,
            transport,
            inbound,
            responder,
            metrics,
            start: Instant::now(),
            arrived_writes: HashMap::new(),
            fence_done: false,
            arrived_reads: HashMap::new(),
            my_writes: HashMap::new(),
            my_reads: HashMap::new(),
            appends: HashMap::new(),
            waiters: HashMap::new(),
            index: Vec::new(),
            index_base,
            app,
            app_slot,
            frames: Vec::new(),
            local: Local::default(),
            snapshot_waiters: Vec::new(),
            pending_trim: None,
            trim_waiters: Vec::new(),
            client_port: None,
            cache: None,
            tails: Vec::new(),
            lin_reads: HashMap::new(),
            next_read_id: 0,
            connected,
            directory,
            logged_config: logged,
            transport_peers: BTreeMap::new(),
            member: false,
            buf: Vec::with_capacity(64 << 10),
            last_metrics: Instant::now(),
            mirror,
        };
        node.member = node.replica.membership().contains(node.opts.paxos.id);
        node.sync_members();
        Ok(node)
    }

    /// Follows the membership in force: learns the members' addresses it carries and
    /// gives the transport a link to every member (and, while this replica is not a
    /// member yet, to the members it was configured to contact; and to the known
    /// leader). Links to replicas that left are closed.
    fn sync_members(&mut self) {
        let m = self.replica.membership();
        for (id, why) in self.directory.learn(&m) {
            warn!(member = id, %why, "replicated member addresses ignored");
        }
        let me = self.opts.paxos.id;
        let mut ids: Vec<NodeId> = m.voters.iter().chain(&m.learners).copied().collect();
        if !m.contains(me) {
            ids.extend(self.opts.client_addrs.keys().copied().filter(|&id| self.directory.is_configured(id)));
        }
        ids.extend(self.replica.leader());
        if self.logged_config.as_ref().is_some_and(|(slot, _)| self.replica.applied() >= *slot) {
            self.logged_config = None;
        }
        if let Some((_, l)) = &self.logged_config {
            ids.extend(l.voters.iter().chain(&l.learners));
        }
        let mut peers = BTreeMap::new();
        for id in ids.into_iter().filter(|&id| id != me) {
            match self.directory.get(id) {
                Some(a) => {
                    peers.insert(id, PeerSpec { addr: a.peer.to_string(), digest: a.identity_digest(id) });
                }
                None => warn!(member = id, "no address known for this member: no link to it"),
            }
        }
        if peers == self.transport_peers {
            return;
        }
        match self.transport.update_peers(&peers) {
            Ok(()) => {
                let added: Vec<NodeId> =
                    peers.keys().filter(|id| !self.transport_peers.contains_key(id)).copied().collect();
                let removed: Vec<NodeId> =
                    self.transport_peers.keys().filter(|id| !peers.contains_key(id)).copied().collect();
                if !self.transport_peers.is_empty() && (!added.is_empty() || !removed.is_empty()) {
                    info!(?added, ?removed, "peer links follow the membership");
                }
                self.connected.retain(|id, _| peers.contains_key(id));
                for &id in peers.keys() {
                    self.connected.entry(id).or_insert(false);
                }
                self.transport_peers = peers;
            }
            Err(e) => {
                error!(error = %e, members = ?peers.keys().collect::<Vec<_>>(), "peer links cannot follow the membership");
                // Do not retry on every change of the same set.
                self.transport_peers = peers;
            }
        }
    }

    /// Serves the client port on this node's thread: `port`'s descriptor must be one the
    /// transport's `poll` watches ([`transport::Transport::watch_fd`]).
    pub fn with_client_port(mut self, port: Option<ClientPort>) -> Self {
        self.client_port = port;
        self
    }

    /// Answers in-process requests (see [`crate::embed`]) through `local`.
    pub fn with_local(mut self, local: Local) -> Self {
        self.local = local;
        self
    }

    fn now(&self) -> Nanos {
        self.start.elapsed().as_nanos() as Nanos
    }

    /// Runs until `stop` is set (or a fatal error).
    pub fn run(mut self, stop: Arc<AtomicBool>) -> Result<(), NodeError> {
        info!(node = self.opts.paxos.id, durability = %self.opts.durability, "replica started");
        let mut events = Vec::with_capacity(256);
        // Writes that landed in a persistent region before a restart and that this
        // replica's CPU may not have taken (a leader may have counted them as accepted at
        // landing): to the core, before anything else. A replica that never promised
        // anything discards what its region holds from an earlier life.
        let fresh = self.replica.promised() == paxos::Ballot::ZERO;
        self.transport.recover_landed(fresh, &mut events)?;
        let now = self.now();
        for ev in events.drain(..) {
            self.on_event(now, ev)?;
        }
        // Spin-then-block: after activity, poll without sleeping for `spin`.
        let spin = self.opts.spin;
        let mut active_at = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let now = self.now();
            let wait = match self.replica.poll_timeout() {
                Some(t) if t <= now => Duration::ZERO,
                Some(t) => Duration::from_nanos(t - now).min(Duration::from_millis(50)),
                None => Duration::from_millis(50),
            };
            let wait = if !spin.is_zero() && active_at.elapsed() < spin { Duration::ZERO } else { wait };
            let wait = match self.client_port.as_ref().and_then(|p| p.next_timeout()) {
                Some(t) => wait.min(t),
                None => wait,
            };
            events.clear();
            self.transport.poll(&mut events, Some(wait))?;
            if let Some(p) = self.client_port.as_mut() {
                p.turn();
            }
            let now = self.now();
            let mut active = !events.is_empty();
            for ev in events.drain(..) {
                self.on_event(now, ev)?;
            }
            for _ in 0..4096 {
                match self.inbound.try_recv() {
                    Ok(inb) => {
                        active = true;
                        self.on_client(now, inb)?
                    }
                    Err(_) => break,
                }
            }
            if active {
                active_at = Instant::now();
            }
            if self.replica.poll_timeout().is_some_and(|t| t <= now) {
                self.replica.handle_timeout(now)?;
            }
            // Actions that need no sync (a leader's remote writes) leave before the
            // sync, so the followers' syncs run in parallel with ours.
            while let Some(a) = self.replica.poll_action() {
                self.execute(a)?;
            }
            if self.replica.needs_flush() {
                // Out to the network now, not at the next poll: after the sync.
                self.transport.send_queued();
            }
            if let Err(e) = self.replica.flush() {
                error!(error = %e, "storage failed: this replica stops acknowledging");
                return Err(e.into());
            }
            // What the sync covered goes into the read mirror before anything that waited
            // for it (acknowledgements, promises) leaves.
            self.publish_mirror();
            while let Some(a) = self.replica.poll_action() {
                self.execute(a)?;
            }
            if std::mem::take(&mut self.fence_done) {
                self.replica.fence_done(now)?;
                while let Some(a) = self.replica.poll_action() {
                    self.execute(a)?;
                }
            }
            self.app_housekeeping(now)?;
            self.serve_tails();
            if let Some(p) = self.client_port.as_mut() {
                // Send the answers queued in this pass (no socket poll: the next pass
                // polls after the transport's wait).
                p.send_answers();
            }
            if self.last_metrics.elapsed() >= Duration::from_millis(100) {
                self.update_metrics();
            }
        }
        info!(node = self.opts.paxos.id, "replica stopping");
        Ok(())
    }

    // ---- transport events ----------------------------------------------------------

    fn on_event(&mut self, now: Nanos, ev: Event) -> Result<(), NodeError> {
        match ev {
            Event::Message { from, payload } => match snapshot::decode_transfer(&payload) {
                Some(Ok(frame)) => self.on_transfer(now, from, frame)?,
                Some(Err(e)) => warn!(peer = from, error = %e, "undecodable snapshot frame dropped"),
                None => match wire::decode_message(&payload) {
                    Ok(m) => self.replica.handle_message(now, from, m)?,
                    Err(e) => warn!(peer = from, error = %e, "undecodable peer message dropped"),
                },
            },
            Event::WriteArrived { from, token, offset, data } => match wire::decode_write(offset, &data) {
                Ok(req) => {
                    self.arrived_writes.entry(from).or_default().push_back(token);
                    self.replica.handle_remote_write(now, from, req)?;
                }
                Err(e) => {
                    warn!(peer = from, error = %e, "undecodable remote write denied");
                    let _ = self.transport.complete_write(from, token, Err(&[]));
                }
            },
            Event::ReadArrived { from, token, offset, len } => {
                self.arrived_reads.entry(from).or_default().push_back((token, len as usize));
                self.replica.handle_remote_read(now, from, wire::read_request(offset))?;
            }
            Event::WriteDone { to, token, result } => {
                let Some((ballot, first, count)) = self.my_writes.remove(&token) else {
                    return Ok(());
                };
                let res = match result {
                    Ok(_) => WriteResult::Ok { ballot, first, count },
                    Err(AccessError::Denied { detail }) => {
                        WriteResult::Denied { ballot, promised: wire::decode_denied(&detail) }
                    }
                    Err(AccessError::LinkFailed(why)) => {
                        debug!(peer = to, %why, "remote write lost; the core re-sends");
                        return Ok(());
                    }
                };
                self.replica.handle_write_completion(now, to, res)?;
            }
            Event::ReadDone { from, token, result } => {
                let Some(q) = self.my_reads.remove(&token) else {
                    return Ok(());
                };
                match result {
                    Ok(data) => match wire::decode_read_result(&q, &data) {
                        Ok(res) => self.replica.handle_read_completion(now, from, res)?,
                        Err(e) => warn!(peer = from, error = %e, "undecodable read answer dropped"),
                    },
                    Err(e) => debug!(peer = from, error = %e, "remote read failed"),
                }
            }
            Event::PeerUp { peer } => {
                info!(peer, "peer link up");
                self.connected.insert(peer, true);
            }
            Event::PeerDown { peer, reason } => {
                warn!(peer, %reason, "peer link down");
                self.connected.insert(peer, false);
            }
        }
        Ok(())
    }

    // ---- the core's actions --------------------------------------------------------

    fn execute(&mut self, a: Action) -> Result<(), NodeError> {
        match a {
            Action::Send { to, msg } => {
                self.buf.clear();
                wire::encode_message(&msg, &mut self.buf);
                if let Err(e) = self.transport.send(to, &self.buf) {
                    debug!(peer = to, error = %e, "message not sent");
                }
            }
            Action::RemoteWrite { to, req } => {
                self.buf.clear();
                let offset = wire::encode_write(&req, &mut self.buf);
                match self.transport.write(to, offset, &self.buf) {
                    Ok(token) => {
                        self.my_writes.insert(token, (req.ballot, req.first, req.values.len() as u64));
                    }
                    Err(e) => {
                        debug!(peer = to, error = %e, "remote write not issued; the core re-sends")
                    }
                }
            }
            Action::RemoteRead { to, req } => {
                let (offset, len) = wire::read_args(&req, self.transport.max_payload());
                match self.transport.read(to, offset, len) {
                    Ok(token) => {
                        self.my_reads.insert(token, req);
                    }
                    Err(e) => debug!(peer = to, error = %e, "remote read not issued"),
                }
            }
            Action::WriteCompletion { to, result } => {
                let Some(token) = self.arrived_writes.get_mut(&to).and_then(|q| q.pop_front()) else {
                    error!(peer = to, "write completion without an arrived write");
                    return Ok(());
                };
                let r = match result {
                    WriteResult::Ok { .. } => self.transport.complete_write(to, token, Ok(&[])),
                    WriteResult::Denied { promised, .. } => {
                        let d = wire::encode_denied(promised);
                        self.transport.complete_write(to, token, Err(&d))
                    }
                };
                if let Err(e) = r {
                    debug!(peer = to, error = %e, "write completion not delivered");
                }
            }
            Action::ReadCompletion { to, result } => {
                let Some((token, budget)) = self.arrived_reads.get_mut(&to).and_then(|q| q.pop_front()) else {
                    error!(peer = to, "read completion without an arrived read");
                    return Ok(());
                };
                let budget = budget.min(self.transport.max_payload());
                self.buf.clear();
                wire::encode_read_result(&result, budget, &mut self.buf);
                if self.buf.len() > budget {
                    // Not even one entry fits the reader's budget: refuse rather than
                    // answer short of what the range says.
                    warn!(peer = to, bytes = self.buf.len(), budget, "read answer too large; denied");
                    let _ = self.transport.complete_read(to, token, Err(&[]));
                } else if let Err(e) = self.transport.complete_read(to, token, Ok(&self.buf)) {
                    debug!(peer = to, error = %e, "read completion not delivered");
                }
            }
            Action::GrantWrite { to, ballot } => {
                debug!(peer = to, %ballot, "write permission granted");
                self.transport.grant(to);
            }
            Action::RevokeWrite { from } => {
                debug!(peer = from, "write permission revoked");
                self.transport.revoke(from);
            }
            Action::Fence { holder } => self.fence(holder)?,
            Action::Apply(applied) => self.on_apply(applied),
            Action::ReadReady { id, .. } => {
                // Confirmed, and everything committed at arrival is applied (and so in
                // the position index): serve it from the applied prefix.
                if let Some(r) = self.lin_reads.remove(&id) {
                    let resp = match r.query {
                        Some(q) => self.query(&q),
                        None => self.read_entries(r.from, r.max_entries, r.max_bytes),
                    };
                    self.reply(r.conn, r.req_id, resp);
                }
            }
            Action::ReadsAborted(ids) => {
                let leader = self.replica.leader();
                for id in ids {
                    if let Some(r) = self.lin_reads.remove(&id) {
                        let resp = self.redirect(leader);
                        self.reply(r.conn, r.req_id, resp);
                    }
                }
            }
            Action::Aborted(cmds) => {
                let leader = self.replica.leader();
                let mut tokens = Vec::new();
                for c in cmds {
                    if let Some((conn, req_id, _)) = self.waiters.remove(&(c.client, c.seq)) {
                        if conn == LOCAL_CONN {
                            tokens.extend(self.local.lock().tokens.get(&req_id).copied());
                        }
                        if self.appends.remove(&(conn, req_id)).is_some() {
                            let resp = self.redirect(leader);
                            self.reply(conn, req_id, resp);
                        }
                    }
                }
                if let (Some(a), false) = (self.app.as_mut(), tokens.is_empty()) {
                    a.sm().proposals_aborted(&tokens);
                }
            }
            Action::SendSnapshot { to } => {
                let started = self.app.as_mut().is_some_and(|a| a.start_send(to, &mut self.frames));
                if started {
                    info!(peer = to, "sending a snapshot (the follower needs trimmed slots)");
                } else {
                    error!(peer = to, "a follower needs trimmed slots but no snapshot is at hand");
                }
                self.send_frames();
            }
            Action::RoleChanged { role, ballot, leader } => {
                info!(?role, %ballot, ?leader, "role changed");
                self.sync_members();
                if let Some(a) = self.app.as_mut() {
                    a.sm().leadership_changed(role == Role::Leader, leader);
                    let may = a.sm().may_lead();
                    if may != self.replica.config().can_lead {
                        self.replica.set_can_lead(self.now(), may);
                    }
                }
                if role == Role::Leader {
                    self.metrics.inc_elections();
                } else {
                    for (conn, req_id) in std::mem::take(&mut self.trim_waiters) {
                        let resp = self.redirect(leader);
                        self.reply(conn, req_id, resp);
                    }
                }
                self.metrics.set_role(role_name(role));
                self.metrics.set_ballot(ballot.round, ballot.node);
            }
        }
        Ok(())
    }

    /// Executes [`Action::Fence`]: takes write permission from `holder` at the
    /// transport, hands the core every write of `holder` that landed before that took
    /// effect (in ring order); the core may raise its promise once told (`fence_done`,
    /// after the actions in hand, in this turn of the loop): no write the holder's NIC
    /// completed reaches the core after a higher promise.
    fn fence(&mut self, holder: NodeId) -> Result<(), NodeError> {
        let mut drained = Vec::new();
        // A drain that failed may have left landed writes behind: stop rather than
        // promise over them.
        self.transport.fence(holder, &mut drained)?;
        let n = drained.iter().filter(|e| matches!(e, Event::WriteArrived { .. })).count();
        let now = self.now();
        for ev in drained {
            self.on_event(now, ev)?;
        }
        debug!(peer = holder, drained = n, "fenced: write permission revoked, landed writes drained");
        // The core hears it once the actions in hand are executed (this turn).
        self.fence_done = true;
        Ok(())
    }

    fn on_apply(&mut self, applied: Applied) {
        let slot = applied.slot;
        self.app_slot = slot;
        if let Some(meta) = applied.trim {
            self.pending_trim = Some(meta);
        }
        if let Some(m) = &applied.membership {
            info!(slot, voters = ?m.voters, learners = ?m.learners, "membership changed");
            if let Some(a) = self.app.as_mut() {
                a.sm().configuration_changed(&m.voters, &m.learners);
            }
            let me = self.opts.paxos.id;
            if self.member && !m.contains(me) {
                warn!(slot, "this replica was removed from the membership: it no longer takes part; stop it");
            } else if !self.member && m.contains(me) {
                info!(slot, learner = !m.is_voter(me), "this replica is a member now");
            }
            self.member = m.contains(me);
            self.sync_members();
        }
        for (i, e) in applied.entries.into_iter().enumerate() {
            if !e.duplicate {
                debug_assert_eq!(e.position, self.index_base + self.index.len() as u64 + 1);
                self.index.push((slot, i as u32));
            }
            let key = (e.command.client, e.command.seq);
            if !e.duplicate {
                if let Some(a) = self.app.as_mut() {
                    // The proposer's token, when this replica proposed it in-process.
                    let w = self.waiters.get(&key).copied().filter(|w| w.0 == LOCAL_CONN);
                    let token = w.and_then(|(_, req_id, _)| self.local.lock().tokens.get(&req_id).copied());
                    let result = a.apply(e.position, &e.command.payload, token);
                    if let Some((_, req_id, _)) = w {
                        self.local.lock().results.entry(req_id).or_default().push(result);
                    }
                }
            }
            if let Some((conn, req_id, idx)) = self.waiters.remove(&key) {
                let done = match self.appends.get_mut(&(conn, req_id)) {
                    Some(p) => {
                        if p.positions[idx] == 0 {
                            p.positions[idx] = e.position;
                            p.remaining -= 1;
                        }
                        p.remaining == 0
                    }
                    None => false,
                };
                if done {
                    let p = self.appends.remove(&(conn, req_id)).expect("pending append");
                    self.metrics.observe_commit_latency(p.started.elapsed());
                    self.metrics.inc_appends(p.positions.len() as u64);
                    self.reply(conn, req_id, Response::Appended { positions: p.positions });
                }
            }
        }
    }

    // ---- clients -------------------------------------------------------------------

    fn reply(&self, conn: ConnId, req_id: u64, response: Response) {
        if let Response::Error { code, .. } = &response {
            self.metrics.inc_client_errors(&format!("{code:?}"));
        }
        if conn == LOCAL_CONN {
            let mut l = self.local.lock();
            let results = l.results.remove(&req_id).unwrap_or_default();
            if let Some(tx) = l.replies.remove(&req_id) {
                let _ = tx.send(LocalReply { response, results });
            }
            return;
        }
        self.responder.send(Outbound::Reply { conn, req_id, response });
    }

    /// The answer to a request the core refused: a redirect to the leader, or
    /// `Unavailable` with the reason.
    fn refused(&self, what: &str, e: ProposeError) -> Response {
        match e {
            ProposeError::NotLeader { leader } => self.redirect(leader),
            e => Response::Error { code: ErrorCode::Unavailable, message: format!("{what} refused: {e}") },
        }
    }

    fn redirect(&self, leader: Option<NodeId>) -> Response {
        let leader = leader.filter(|&l| l != self.opts.paxos.id);
        let addr = leader.and_then(|l| self.directory.get(l)).map(|a| a.client.to_string());
        Response::Redirect { leader, addr }
    }

    fn on_client(&mut self, now: Nanos, inb: Inbound) -> Result<(), NodeError> {
        let Inbound { conn, req_id, request } = inb;
        match request {
            Request::Append { client, seq, entries } => {
                if entries.is_empty() {
                    self.reply(conn, req_id, Response::Appended { positions: Vec::new() });
                    return Ok(());
                }
                if let Some(big) = entries.iter().find(|e| e.len() > self.opts.max_entry_bytes) {
                    let message =
                        format!("entry of {} bytes exceeds the limit of {}", big.len(), self.opts.max_entry_bytes);
                    self.reply(conn, req_id, Response::Error { code: ErrorCode::TooLarge, message });
                    return Ok(());
                }
                if self.replica.role() != Role::Leader {
                    let resp = self.redirect(self.replica.leader());
                    self.reply(conn, req_id, resp);
                    return Ok(());
                }
                let n = entries.len();
                let cmds: Vec<Command> = entries
                    .into_iter()
                    .enumerate()
                    .map(|(i, payload)| Command { client, seq: seq + i as u64, payload })
                    .collect();
                match self.replica.propose(now, cmds) {
                    Ok(()) => {
                        for i in 0..n {
                            self.waiters.insert((client, seq + i as u64), (conn, req_id, i));
                        }
                        let p = PendingAppend { positions: vec![0; n], remaining: n, started: Instant::now() };
                        self.appends.insert((conn, req_id), p);
                    }
                    Err(ProposeError::NotLeader { leader }) => {
                        let resp = self.redirect(leader);
                        self.reply(conn, req_id, resp);
                    }
                    Err(ProposeError::Transferring { to }) => {
                        let message = format!("leadership transfer to replica {to} in progress; retry");
                        self.reply(conn, req_id, Response::Error { code: ErrorCode::Busy, message });
                    }
                    Err(ProposeError::Busy) => {
                        let message = "too many pending entries; retry".to_string();
                        self.reply(conn, req_id, Response::Error { code: ErrorCode::Busy, message });
                    }
                    Err(ProposeError::Stopped) => {
                        let message = "replica stopped after a storage failure".to_string();
                        self.reply(conn, req_id, Response::Error { code: ErrorCode::Unavailable, message });
                    }
                }
            }
            Request::Read { from, max_entries, max_bytes } => {
                let resp = self.read_entries(from, max_entries as usize, max_bytes as usize);
                self.reply(conn, req_id, resp);
            }
            Request::Tail { from } => {
                self.tails.push(TailSub { conn, req_id, next: from.max(1) });
                self.serve_tails();
            }
            Request::ReadLinearizable { from, max_entries, max_bytes } => {
                self.next_read_id += 1;
                let id = self.next_read_id;
                match self.replica.read(now, id) {
                    Ok(()) => {
                        let r = LinRead {
                            conn,
                            req_id,
                            from,
                            max_entries: max_entries as usize,
                            max_bytes: max_bytes as usize,
                            query: None,
                        };
                        self.lin_reads.insert(id, r);
                    }
                    Err(e) => {
                        let resp = self.refused("linearizable read", e);
                        self.reply(conn, req_id, resp);
                    }
                }
            }
            Request::Transfer { to } => {
                let r = if to == 0 { self.replica.step_down(now) } else { self.replica.transfer_leadership(now, to) };
                match r {
                    Ok(()) => {
                        info!(to, "leadership transfer started");
                        let s = self.status();
                        self.reply(conn, req_id, Response::Status(s));
                    }
                    Err(paxos::TransferError::NotLeader { leader }) => {
                        let resp = self.redirect(leader);
                        self.reply(conn, req_id, resp);
                    }
                    Err(e) => {
                        let message = format!("leadership transfer refused: {e}");
                        self.reply(conn, req_id, Response::Error { code: ErrorCode::BadRequest, message });
                    }
                }
            }
            Request::Status => {
                let s = self.status();
                self.reply(conn, req_id, Response::Status(s));
            }
            Request::Snapshot => match self.app.as_mut().filter(|a| !a.is_log_service()) {
                None => {
                    let message =
                    "this replica embeds no state machine to snapshot (the plain log service is trimmed with `trim`)"
                        .to_string();
                    self.reply(conn, req_id, Response::Error { code: ErrorCode::BadRequest, message });
                }
                Some(a) => {
                    a.request_snapshot();
                    self.snapshot_waiters.push((conn, req_id));
                }
            },
            Request::ChangeMembership { voters, learners } => {
                // Every member must have known addresses (configured, or replicated
                // when it was added); they travel with the change.
                let unknown = voters.iter().chain(&learners).find(|&&id| self.directory.get(id).is_none());
                let m = paxos::Membership::new(voters.clone(), learners.clone());
                let resp = match unknown {
                    Some(id) => Response::Error {
                        code: ErrorCode::BadRequest,
                        message: format!(
                            "replica {id} is neither configured nor added with its addresses \
                             (add it first: replog members add {id} --peer-addr HOST:PORT --client-addr HOST:PORT)"
                        ),
                    },
                    None => {
                        let addrs = self.directory.addrs_for(&m);
                        let m = m.with_addrs(addrs);
                        self.propose_membership(now, m, &format!("voters {voters:?}, learners {learners:?}"))
                    }
                };
                self.reply(conn, req_id, resp);
            }
            Request::MemberChange(op) => {
                let resp = if self.replica.role() != Role::Leader {
                    self.redirect(self.replica.leader())
                } else {
                    match self.member_step(&op) {
                        Ok(m) => self.propose_membership(now, m, &op.to_string()),
                        Err(message) => Response::Error { code: ErrorCode::BadRequest, message },
                    }
                };
                self.reply(conn, req_id, resp);
            }
            Request::Query { linearizable, query } => {
                if !self.embeds_app() {
                    let message = "this replica embeds no state machine to query".to_string();
                    self.reply(conn, req_id, Response::Error { code: ErrorCode::BadRequest, message });
                } else if !linearizable {
                    let resp = self.query(&query);
                    self.reply(conn, req_id, resp);
                } else {
                    self.next_read_id += 1;
                    let id = self.next_read_id;
                    match self.replica.read(now, id) {
                        Ok(()) => {
                            let r = LinRead { conn, req_id, from: 0, max_entries: 0, max_bytes: 0, query: Some(query) };
                            self.lin_reads.insert(id, r);
                        }
                        Err(e) => {
                            let resp = self.refused("linearizable query", e);
                            self.reply(conn, req_id, resp);
                        }
                    }
                }
            }
            Request::Trim { upto } => self.on_trim(now, conn, req_id, upto),
            Request::Disconnected => {
                self.tails.retain(|t| t.conn != conn);
                self.lin_reads.retain(|_, r| r.conn != conn);
                self.appends.retain(|(c, _), _| *c != conn);
            }
            Request::Hello { .. } | Request::Auth { .. } => {}
        }
        Ok(())
    }

    /// Whether a state machine of the user's is embedded (not the plain log service).
    fn embeds_app(&self) -> bool {
        self.app.as_ref().is_some_and(|a| !a.is_log_service())
    }

    /// A client asks the leader of the plain log service to trim up to `upto`.
    fn on_trim(&mut self, now: Nanos, conn: ConnId, req_id: u64, upto: Position) {
        let refuse = |message: String| Response::Error { code: ErrorCode::BadRequest, message };
        if !self.app.as_ref().is_some_and(|a| a.is_log_service()) {
            let why = "trim is for the plain log service; a replica with a state machine trims its log behind \
                       its snapshots ([app] snapshot_* settings, `replog snapshot`)";
            self.reply(conn, req_id, refuse(why.to_string()));
            return;
        }
        if self.replica.role() != Role::Leader {
            let resp = self.redirect(self.replica.leader());
            self.reply(conn, req_id, resp);
            return;
        }
        let last = self.last_position();
        if upto > last {
            let why = format!("cannot trim to position {upto}: the last committed position is {last}");
            self.reply(conn, req_id, refuse(why));
            return;
        }
        if upto < self.first_readable() {
            let first_position = self.first_readable();
            self.reply(conn, req_id, Response::Trimmed { first_position });
            return;
        }
        match self.replica.propose_trim(now, upto) {
            Ok(()) => {
                info!(upto, "trim proposed");
                self.trim_waiters.push((conn, req_id));
            }
            Err(e) => {
                let resp = self.refused("trim", e);
                self.reply(conn, req_id, resp);
            }
        }
    }

    /// Saves the snapshot of a log-service trim applied here and drops the prefix it
    /// covers (store, position index); answers the trim requests waiting.
    fn trim_housekeeping(&mut self, now: Nanos) -> Result<(), NodeError> {
        let Some(meta) = self.pending_trim.take() else { return Ok(()) };
        let Some(app) = self.app.as_mut().filter(|a| a.is_log_service()) else {
            warn!(slot = meta.slot, "trim in the log ignored: this replica embeds a state machine");
            return Ok(());
        };
        if meta.slot > self.replica.base().slot {
            app.save_trim(self.opts.cluster_id, &meta)?;
            let (slot, last_position) = (meta.slot, meta.last_position);
            self.replica.compact_to(now, meta)?;
            // Positions up to the snapshot's are gone from the index too.
            let drop = self.index.iter().take_while(|&&(s, _)| s <= slot).count();
            self.index.drain(..drop);
            self.index_base += drop as Position;
            debug_assert_eq!(self.index_base, last_position);
            self.cache = None;
            info!(slot, first_position = last_position + 1, "log trimmed");
        }
        let first_position = self.first_readable();
        for (conn, req_id) in std::mem::take(&mut self.trim_waiters) {
            self.reply(conn, req_id, Response::Trimmed { first_position });
        }
        Ok(())
    }

    /// The payload at `position` (1-based), from the store.
    /// Proposes the membership `m` (what the client asked for: `what`) and says how it went.
    fn propose_membership(&mut self, now: Nanos, m: paxos::Membership, what: &str) -> Response {
        match self.replica.change_membership(now, m) {
            Ok(()) => {
                info!(change = what, "membership change proposed");
                Response::Status(self.status())
            }
            Err(paxos::MembershipError::NotLeader { leader }) => self.redirect(leader),
            Err(e @ (paxos::MembershipError::Busy | paxos::MembershipError::Transferring { .. })) => {
                Response::Error { code: ErrorCode::Busy, message: format!("membership change ({what}): {e}; retry") }
            }
            Err(e) => Response::Error {
                code: ErrorCode::BadRequest,
                message: format!("membership change ({what}) refused: {e}"),
            },
        }
    }

    /// The membership one step `op` from the one in force, with every member's
    /// addresses; or why the step makes no sense.
    fn member_step(&self, op: &MemberOp) -> Result<paxos::Membership, String> {
        let cur = self.replica.membership();
        let (mut voters, mut learners) = (cur.voters.clone(), cur.learners.clone());
        let mut dir = self.directory.clone();
        let role = |id| if cur.is_voter(id) { "a voter" } else { "a learner" };
        match *op {
            MemberOp::Add { id, peer_addr, client_addr } => {
                if id == 0 || id > crate::config::MAX_ID {
                    return Err(format!("replica id {id} is not usable (ids are 1 to {})", crate::config::MAX_ID));
                }
                if cur.contains(id) {
                    return Err(format!("replica {id} is already a member ({}): pick an unused id", role(id)));
                }
                if peer_addr == client_addr {
                    return Err(format!("the peer and the client address are the same ({peer_addr})"));
                }
                for (what, a) in [("peer", peer_addr), ("client", client_addr)] {
                    if a.ip().is_unspecified() || a.port() == 0 {
                        return Err(format!("{what} address {a}: give an address and a port the others can reach"));
                    }
                    if let Some(other) = dir.owner_of(&cur, a, id) {
                        return Err(format!("{what} address {a} is in use by replica {other}"));
                    }
                }
                if !self.transport.dynamic_peers() {
                    return Err(format!(
                        "replicas cannot be added while running over the {} transport: configure replica {id} \
                         on every replica and restart them",
                        self.transport.name()
                    ));
                }
                dir.insert(id, MemberAddrs { peer: peer_addr, client: client_addr });
                learners.push(id);
            }
            MemberOp::Promote { id } => {
                if cur.is_voter(id) {
                    return Err(format!("replica {id} is already a voter"));
                }
                if !cur.contains(id) {
                    return Err(format!("replica {id} is not a member: add it first (replog members add {id} ...)"));
                }
                learners.retain(|&x| x != id);
                voters.push(id);
            }
            MemberOp::Remove { id } => {
                if !cur.contains(id) {
                    return Err(format!(
                        "replica {id} is not a member (members: voters {voters:?}, learners {learners:?})"
                    ));
                }
                if voters == [id] {
                    return Err(format!("replica {id} is the last voter: add and promote another first"));
                }
                voters.retain(|&x| x != id);
                learners.retain(|&x| x != id);
            }
        }
        let m = paxos::Membership::new(voters, learners);
        Ok(m.clone().with_addrs(dir.addrs_for(&m)))
    }

    fn payload(&mut self, position: Position) -> Option<Bytes> {
        let &(slot, idx) = self.index.get(position.checked_sub(self.index_base + 1)? as usize)?;
        let cmds = match &self.cache {
            Some((s, c)) if *s == slot => c.clone(),
            _ => {
                let e = self.replica.storage().entry(slot).ok()??;
                let Value::Batch(cmds) = e.value else {
                    return None;
                };
                let c = Arc::new(cmds);
                self.cache = Some((slot, c.clone()));
                c
            }
        };
        cmds.get(idx as usize).map(|c| c.payload.clone())
    }

    fn read_entries(&mut self, from: Position, max_entries: usize, max_bytes: usize) -> Response {
        let from = from.max(1);
        let last = self.last_position();
        let first_kept = self.first_readable();
        if from < first_kept && from <= last {
            let message = format!(
                "position {from} is trimmed (covered by a snapshot); the first readable position is {first_kept}"
            );
            return Response::Error { code: ErrorCode::BadRequest, message };
        }
        let budget = max_bytes.min(self.opts.max_frame_bytes.saturating_sub(64)).max(1);
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        let mut p = from;
        while p <= last && entries.len() < max_entries.max(1) {
            let Some(e) = self.payload(p) else {
                let message = format!("entry {p} could not be read from the store");
                return Response::Error { code: ErrorCode::Internal, message };
            };
            if !entries.is_empty() && bytes + e.len() + 4 > budget {
                break;
            }
            bytes += e.len() + 4;
            entries.push(e);
            p += 1;
        }
        Response::Entries { from, entries, last_committed: last }
    }

    fn serve_tails(&mut self) {
        if self.tails.is_empty() {
            return;
        }
        let last = self.last_position();
        let mut tails = std::mem::take(&mut self.tails);
        for t in tails.iter_mut() {
            let mut rounds = 0;
            while t.next <= last && rounds < 16 {
                rounds += 1;
                let resp = self.read_entries(t.next, 4096, self.opts.max_frame_bytes);
                if let Response::Entries { entries, .. } = &resp {
                    if entries.is_empty() {
                        break;
                    }
                    t.next += entries.len() as u64;
                }
                self.reply(t.conn, t.req_id, resp);
            }
        }
        self.tails = tails;
    }

    /// The highest committed position applied here.
    fn last_position(&self) -> Position {
        self.index_base + self.index.len() as Position
    }

    /// The first position whose entry the log still holds.
    fn first_readable(&self) -> Position {
        let trimmed = self.replica.storage().trimmed();
        let kept = self.index.iter().position(|&(slot, _)| slot > trimmed).unwrap_or(self.index.len());
        self.index_base + kept as Position + 1
    }

    fn query(&mut self, q: &[u8]) -> Response {
        let applied_slot = self.app_slot;
        match self.app.as_mut().filter(|a| !a.is_log_service()) {
            Some(a) => Response::QueryResult { applied_slot, data: a.sm().query(q) },
            None => {
                let message = "this replica embeds no state machine to query".to_string();
                Response::Error { code: ErrorCode::BadRequest, message }
            }
        }
    }

    fn send_frames(&mut self) {
        for (to, frame) in self.frames.drain(..) {
            if let Err(e) = self.transport.send(to, &frame) {
                debug!(peer = to, error = %e, "snapshot frame not sent; the transfer resumes later");
            }
        }
    }

    /// A snapshot transfer frame from `from`.
    fn on_transfer(&mut self, now: Nanos, from: NodeId, frame: snapshot::Transfer) -> Result<(), NodeError> {
        let Some(app) = self.app.as_mut() else {
            warn!(peer = from, "snapshot frame dropped: this replica embeds no state machine");
            return Ok(());
        };
        let replica = &self.replica;
        let received =
            app.on_frame(from, frame, self.opts.cluster_id, |s| replica.snapshot_useful(s), &mut self.frames);
        self.send_frames();
        let r = match received {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(snapshot::SnapshotError::Invalid(why)) => {
                warn!(peer = from, why, "received snapshot rejected; asking for it again");
                return Ok(());
            }
            Err(e @ snapshot::SnapshotError::WrongCluster { .. }) => {
                warn!(peer = from, error = %e, "received snapshot rejected");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let meta = r.snapshot.meta;
        let (slot, base) = (meta.slot, meta.last_position);
        if self.replica.install_snapshot(now, meta)? {
            info!(peer = from, slot, last_position = base, "snapshot installed");
            self.index.clear();
            self.index_base = base;
            self.app_slot = slot;
            self.cache = None;
            // The snapshot carries the membership after its slot (with the members'
            // addresses).
            self.sync_members();
        }
        Ok(())
    }

    /// Snapshots by policy (when the application has applied exactly what the core
    /// applied), and resumes stalled snapshot transfers.
    fn app_housekeeping(&mut self, now: Nanos) -> Result<(), NodeError> {
        self.trim_housekeeping(now)?;
        let Some(app) = self.app.as_mut() else { return Ok(()) };
        let resume = Duration::from_nanos(self.opts.paxos.election_timeout);
        app.tick(resume, &mut self.frames);
        if app.snapshot_due() && self.app_slot == self.replica.applied() && self.app_slot > 0 {
            let meta = self.replica.snapshot_meta();
            let upto = app.take_snapshot(self.opts.cluster_id, &meta)?;
            info!(slot = meta.slot, trim_to = upto, "snapshot taken");
            self.replica.compact(now, upto)?;
            for (conn, req_id) in std::mem::take(&mut self.snapshot_waiters) {
                let s = self.status();
                self.reply(conn, req_id, Response::Status(s));
            }
        }
        self.send_frames();
        Ok(())
    }

    fn status(&self) -> Status {
        let r = &self.replica;
        let commit = r.commit_index();
        let peers = if r.role() == Role::Leader {
            r.peer_progress()
                .into_iter()
                .map(|p| PeerStatus {
                    id: p.id,
                    matched_slot: p.matched,
                    lag: commit.saturating_sub(p.matched),
                    connected: self.connected.get(&p.id).copied().unwrap_or(false),
                })
                .collect()
        } else {
            self.connected.iter().map(|(&id, &c)| PeerStatus { id, matched_slot: 0, lag: 0, connected: c }).collect()
        };
        Status {
            node: self.opts.paxos.id,
            role: role_name(r.role()).to_string(),
            leader: r.leader(),
            ballot: r.promised().to_string(),
            commit_slot: commit,
            applied_slot: r.applied(),
            last_position: self.last_position(),
            durability: self.opts.durability.clone(),
            peers,
        }
    }

    /// Publishes into the transport's read mirror (see [`crate::rdma_mirror`]) what the
    /// store now holds durably and the mirror does not: called after each sync. The
    /// store's hook notes which slots it accepted at since the last publication, and
    /// [`MirroredStore::publish`] reads their entries back with `Storage::entries`, which
    /// the store answers from its cache of the newest entries (no log read); only the
    /// first publication reads every slot of its range (a reopened store holds entries
    /// that no hook saw), and may then read the log.
    fn publish_mirror(&mut self) {
        let Some(p) = self.mirror.as_mut() else { return };
        let st = self.replica.storage();
        let fresh = p.is_fresh();
        let len = self.transport.mirror_geometry().map_or(0, |(len, _)| len);
        let mut mem = TransportMirror(&mut self.transport, len);
        match st.publish(p, &mut mem) {
            Ok(_) => {}
            Err(PublishError::Read { from, to, error }) if fresh => {
                // Tried again after the next sync (still fresh: it reads the store
                // again, so the slots noted until now are not lost); readers meanwhile
                // find no mirror header and use the side channel.
                warn!(error = %error, from, to, "read mirror not published yet");
            }
            Err(e @ PublishError::Read { .. }) => {
                // The mirror holds an older state than the store: it must not answer
                // readers any more (not even once the acknowledgements of this sync left).
                error!(error = %e, "read mirror withdrawn; log-tail reads go over the side channel");
                if let Some(p) = self.mirror.take() {
                    if let Err(e) = p.withdraw(&mut mem) {
                        error!(error = %e, "read mirror could not be withdrawn");
                    }
                }
                st.stop_keeping();
            }
            Err(e @ PublishError::Write(_)) => {
                // The header stays odd: readers fall back to the side channel from now on.
                error!(error = %e, "read mirror write failed; log-tail reads go over the side channel");
                self.mirror = None;
                st.stop_keeping();
            }
        }
    }

    fn update_metrics(&mut self) {
        self.last_metrics = Instant::now();
        let rp = self.transport.read_paths();
        self.metrics.set_remote_reads(rp.one_sided, rp.side_channel, rp.fallbacks);
        let r = &self.replica;
        self.metrics.set_commit_index(r.commit_index());
        self.metrics.set_applied(r.applied(), self.index_base + self.index.len() as u64);
        let log = r.storage().store().log();
        self.metrics.set_log_bytes(log.segment_paths().len() as u64 * log.segment_size());
        let commit = r.commit_index();
        for p in r.peer_progress() {
            let connected = self.connected.get(&p.id).copied().unwrap_or(false);
            self.metrics.set_peer_lag(p.id, commit.saturating_sub(p.matched), connected);
        }
    }
}

/// The transport's read mirror as [`crate::rdma_mirror::MirrorMemory`].
struct TransportMirror<'a, T: Transport>(&'a mut T, usize);

impl<T: Transport> crate::rdma_mirror::MirrorMemory for TransportMirror<'_, T> {
    fn mirror_len(&self) -> usize {
        self.1
    }
    fn put(&mut self, offset: usize, data: &[u8]) -> Result<(), crate::rdma_mirror::MirrorError> {
        self.0.put_mirror(offset, data).map_err(|why| crate::rdma_mirror::MirrorError::Write { offset, why })
    }
}

/// The name of a role in status and metrics.
pub fn role_name(r: Role) -> &'static str {
    match r {
        Role::Follower => "follower",
        Role::PreCandidate => "precandidate",
        Role::Candidate => "candidate",
        Role::Leader => "leader",
        Role::Learner => "learner",
    }
}
