//! An in-memory [`Transport`]: **test support, not a fabric**.
//!
//! Every endpoint of a [`MemNetwork`] lives in the same process and shares one hub
//! guarded by a mutex; [`Transport::poll`] sleeps on a per-endpoint condition variable.
//! It exists so the layers above (the node driver, the protocol's integration tests,
//! the fault-injection wrapper in [`crate::faults`]) can run without sockets. It moves
//! bytes between queues and copies nothing it need not; it does not model latency,
//! loss or bandwidth (wrap it in [`crate::faults::Faulty`] for those).
//!
//! It follows every rule of the trait, like the TCP agent would:
//!
//! - messages, write arrivals and read arrivals travel in one FIFO queue per link, so
//!   they are seen in the order issued; a link's queue holds at most
//!   [`MemConfig::queue_depth`] items not yet polled by the target, beyond which `send`,
//!   `write` and `read` return [`SendError::Backpressure`];
//! - write permission is checked when the target *polls* the write (its "arrival"), so a
//!   `grant`/`revoke` made by the target before that poll applies to it, as it would for
//!   a TCP agent. A write from a non-holder never reaches the target's owner: the writer
//!   gets `WriteDone { result: Err(Denied { detail: empty }) }`. Reads are not
//!   permission-checked (the trait restricts writes only);
//! - each issued access completes exactly once: with the agent's answer, with the
//!   automatic denial, or with [`AccessError::LinkFailed`] when the link goes down first
//!   (the target closed or dropped, or [`MemNetwork::disconnect`]); an answer arriving
//!   after that is discarded;
//! - a link is up while both endpoints are open, not disconnected, and list each other
//!   as peers. Each side sees [`Event::PeerUp`] when it comes up (including at creation)
//!   and [`Event::PeerDown`] when it goes down; items in flight on a failed link are lost.
//!
//! ```
//! use transport::mem::MemNetwork;
//! use transport::{Event, Transport};
//! use std::time::Duration;
//!
//! let net = MemNetwork::new();
//! let mut a = net.endpoint(1, &[2]);
//! let mut b = net.endpoint(2, &[1]);
//! a.send(2, b"hello").unwrap();
//! let mut events = Vec::new();
//! while !events.iter().any(|e| matches!(e, Event::Message { .. })) {
//!     b.poll(&mut events, Some(Duration::from_secs(1))).unwrap();
//! }
//! assert!(events.contains(&Event::Message { from: 1, payload: "hello".into() }));
//! ```

use crate::{AccessError, Event, PeerId, SendError, Token, Transport, Wake};
use bytes::Bytes;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Limits of a [`MemNetwork`], shared by all its endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemConfig {
    /// The largest payload a message, a write, or a completion may carry; also the
    /// largest `len` a read may ask for.
    pub max_payload: usize,
    /// How many items (messages, write and read arrivals) one link holds before the
    /// sender gets [`SendError::Backpressure`].
    pub queue_depth: usize,
}

impl Default for MemConfig {
    /// 1 MiB payloads, 4096 items per link.
    fn default() -> Self {
        MemConfig { max_payload: 1 << 20, queue_depth: 4096 }
    }
}

/// The shared hub of in-memory endpoints. Cloning it gives another handle to the same
/// network.
#[derive(Clone)]
pub struct MemNetwork {
    hub: Arc<Hub>,
}

impl std::fmt::Debug for MemNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemNetwork").field("config", &self.hub.config).finish_non_exhaustive()
    }
}

struct Hub {
    config: MemConfig,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    nodes: HashMap<PeerId, Node>,
    next_incarnation: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Write,
    Read,
}

/// An item in a target's queue.
enum Item {
    /// On the link from `from`: counted against its queue depth, lost if it fails.
    Link { from: PeerId, what: LinkItem },
    /// Produced at this node (completions, link events): never lost.
    Local(Event),
}

enum LinkItem {
    Message(Bytes),
    Write { token: Token, offset: u64, data: Bytes },
    Read { token: Token, offset: u64, len: u32 },
}

struct Node {
    incarnation: u64,
    peers: Vec<PeerId>,
    open: bool,
    disconnected: bool,
    queue: VecDeque<Item>,
    /// Link items from each peer in `queue`.
    in_transit: HashMap<PeerId, usize>,
    holder: Option<PeerId>,
    woken: bool,
    cv: Arc<Condvar>,
    next_token: Token,
    /// Accesses this node issued and that have not completed: token -> (target, kind).
    outstanding: HashMap<Token, (PeerId, Kind)>,
    /// Arrivals handed to this node's owner and not yet answered.
    pending: HashMap<(PeerId, Token), Kind>,
    /// Peers whose link this node has seen come up (and not yet go down).
    up: HashSet<PeerId>,
}

impl Node {
    fn push(&mut self, item: Item) {
        if let Item::Link { from, .. } = &item {
            *self.in_transit.entry(*from).or_default() += 1;
        }
        self.queue.push_back(item);
        self.cv.notify_all();
    }
}

impl State {
    fn link_up(&self, a: PeerId, b: PeerId) -> bool {
        let ok = |x: PeerId, y: PeerId| {
            self.nodes.get(&x).is_some_and(|n| n.open && !n.disconnected && n.peers.contains(&y))
        };
        ok(a, b) && ok(b, a)
    }

    /// Brings every node's view of its links in line with the truth, emitting
    /// `PeerUp`/`PeerDown` and failing what a downed link carried.
    fn refresh_links(&mut self, reason: &str) {
        let ids: Vec<PeerId> = self.nodes.keys().copied().collect();
        for id in ids {
            let peers = match self.nodes.get(&id) {
                Some(n) if n.open => n.peers.clone(),
                _ => continue,
            };
            for p in peers {
                let now_up = self.link_up(id, p);
                let n = self.nodes.get_mut(&id).expect("node exists");
                let was_up = n.up.contains(&p);
                if now_up && !was_up {
                    n.up.insert(p);
                    n.push(Item::Local(Event::PeerUp { peer: p }));
                } else if !now_up && was_up {
                    n.up.remove(&p);
                    fail_link(n, p, reason);
                }
            }
        }
    }

    /// Delivers the completion of `token` to `issuer` if it is still outstanding.
    fn complete(&mut self, issuer: PeerId, target: PeerId, token: Token, r: Result<Bytes, AccessError>) {
        let Some(n) = self.nodes.get_mut(&issuer) else {
            return;
        };
        if !n.open {
            return;
        }
        let Some((to, kind)) = n.outstanding.remove(&token) else {
            return; // already completed (the link failed first)
        };
        debug_assert_eq!(to, target);
        let event = match kind {
            Kind::Write => Event::WriteDone { to: target, token, result: r },
            Kind::Read => Event::ReadDone { from: target, token, result: r },
        };
        n.push(Item::Local(event));
    }
}

/// The link from `n` to `p` went down: fail `n`'s accesses to `p`, drop what `p` sent
/// that `n` has not polled, forget `p`'s unanswered arrivals, tell the owner.
fn fail_link(n: &mut Node, p: PeerId, reason: &str) {
    let mut failed: Vec<(Token, Kind)> =
        n.outstanding.iter().filter(|(_, (to, _))| *to == p).map(|(t, (_, k))| (*t, *k)).collect();
    failed.sort_unstable_by_key(|(t, _)| *t);
    n.queue.retain(|it| !matches!(it, Item::Link { from, .. } if *from == p));
    n.in_transit.remove(&p);
    n.pending.retain(|(from, _), _| *from != p);
    for (token, kind) in failed {
        n.outstanding.remove(&token);
        let result = Err(AccessError::LinkFailed(format!("link to peer {p} failed: {reason}")));
        let event = match kind {
            Kind::Write => Event::WriteDone { to: p, token, result },
            Kind::Read => Event::ReadDone { from: p, token, result },
        };
        n.push(Item::Local(event));
    }
    n.push(Item::Local(Event::PeerDown { peer: p, reason: reason.to_string() }));
}

impl Default for MemNetwork {
    fn default() -> Self {
        Self::new()
    }
}

impl MemNetwork {
    /// An empty network with [`MemConfig::default`] limits.
    pub fn new() -> Self {
        Self::with_config(MemConfig::default())
    }

    /// An empty network with the given limits.
    pub fn with_config(config: MemConfig) -> Self {
        assert!(config.queue_depth > 0, "queue_depth must be at least 1");
        MemNetwork { hub: Arc::new(Hub { config, state: Mutex::new(State::default()) }) }
    }

    /// The network's limits.
    pub fn config(&self) -> MemConfig {
        self.hub.config
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.hub)
    }

    /// Opens the endpoint of replica `id`, which talks to `peers`. Its links come up
    /// (both sides see [`Event::PeerUp`]) with every open peer that lists it back.
    /// An id may be opened again after its previous endpoint was closed or dropped (a
    /// restart: a fresh endpoint with no permission holder and new tokens).
    ///
    /// # Panics
    /// If `id` is 0, is among `peers`, or an endpoint with this id is still open.
    pub fn endpoint(&self, id: PeerId, peers: &[PeerId]) -> MemTransport {
        assert_ne!(id, 0, "peer id 0 is reserved");
        assert!(!peers.contains(&id), "endpoint {id} lists itself as a peer");
        let mut st = self.lock();
        if let Some(n) = st.nodes.get(&id) {
            assert!(!n.open, "endpoint {id} is already open");
        }
        st.next_incarnation += 1;
        let incarnation = st.next_incarnation;
        let mut uniq = peers.to_vec();
        uniq.sort_unstable();
        uniq.dedup();
        st.nodes.insert(
            id,
            Node {
                incarnation,
                peers: uniq,
                open: true,
                disconnected: false,
                queue: VecDeque::new(),
                in_transit: HashMap::new(),
                holder: None,
                woken: false,
                cv: Arc::new(Condvar::new()),
                next_token: 1,
                outstanding: HashMap::new(),
                pending: HashMap::new(),
                up: HashSet::new(),
            },
        );
        st.refresh_links("peer opened");
        drop(st);
        MemTransport { net: self.clone(), id, incarnation, closed: false }
    }

    /// Opens a fully connected cluster: one endpoint per id, each listing all others,
    /// in the order of `ids`.
    pub fn cluster(&self, ids: &[PeerId]) -> Vec<MemTransport> {
        ids.iter()
            .map(|&id| {
                let peers: Vec<PeerId> = ids.iter().copied().filter(|&p| p != id).collect();
                self.endpoint(id, &peers)
            })
            .collect()
    }

    /// Cuts every link of `id` (a crashed NIC or a pulled cable): both sides see
    /// [`Event::PeerDown`], accesses in flight across those links complete with
    /// [`AccessError::LinkFailed`], queued items are lost. No effect if already cut.
    pub fn disconnect(&self, id: PeerId) {
        let mut st = self.lock();
        if let Some(n) = st.nodes.get_mut(&id) {
            n.disconnected = true;
        }
        st.refresh_links(&format!("peer {id} disconnected"));
    }

    /// Undoes [`MemNetwork::disconnect`]: links come back up with [`Event::PeerUp`].
    pub fn reconnect(&self, id: PeerId) {
        let mut st = self.lock();
        if let Some(n) = st.nodes.get_mut(&id) {
            n.disconnected = false;
        }
        st.refresh_links(&format!("peer {id} reconnected"));
    }

    /// Whether the link between `a` and `b` is up.
    pub fn is_linked(&self, a: PeerId, b: PeerId) -> bool {
        self.lock().link_up(a, b)
    }
}

fn lock(hub: &Hub) -> MutexGuard<'_, State> {
    // A panic while holding the lock (a failed assertion in a test) must not turn
    // every later call into a second panic: the state is still consistent.
    hub.state.lock().unwrap_or_else(|e| e.into_inner())
}

/// One replica's endpoint on a [`MemNetwork`]. Closing it ([`MemTransport::close`] or
/// drop) takes its links down.
pub struct MemTransport {
    net: MemNetwork,
    id: PeerId,
    incarnation: u64,
    closed: bool,
}

impl std::fmt::Debug for MemTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemTransport").field("id", &self.id).field("closed", &self.closed).finish_non_exhaustive()
    }
}

impl MemTransport {
    /// The network this endpoint belongs to.
    pub fn network(&self) -> &MemNetwork {
        &self.net
    }

    /// Closes the endpoint: its peers see [`Event::PeerDown`] and their accesses to it
    /// complete with [`AccessError::LinkFailed`]. Later calls return
    /// [`SendError::Closed`] (and `poll` an error). Idempotent; drop does the same.
    pub fn close(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        let mut st = self.net.lock();
        if let Some(n) = st.nodes.get_mut(&self.id) {
            if n.incarnation == self.incarnation {
                n.open = false;
                n.queue.clear();
                n.outstanding.clear();
                n.pending.clear();
                n.up.clear();
                n.cv.notify_all();
            }
        }
        st.refresh_links(&format!("peer {} closed", self.id));
    }

    /// Runs `f` on this endpoint's node, or returns `Closed`.
    fn with_node<R>(&self, f: impl FnOnce(&mut State, PeerId) -> Result<R, SendError>) -> Result<R, SendError> {
        if self.closed {
            return Err(SendError::Closed);
        }
        let mut st = self.net.lock();
        match st.nodes.get(&self.id) {
            Some(n) if n.open && n.incarnation == self.incarnation => {}
            _ => return Err(SendError::Closed),
        }
        f(&mut st, self.id)
    }

    fn check_peer(st: &State, me: PeerId, to: PeerId) -> Result<(), SendError> {
        if st.nodes[&me].peers.contains(&to) {
            Ok(())
        } else {
            Err(SendError::UnknownPeer(to))
        }
    }

    fn check_size(&self, size: usize) -> Result<(), SendError> {
        let limit = self.net.hub.config.max_payload;
        if size > limit {
            Err(SendError::TooLarge { size, limit })
        } else {
            Ok(())
        }
    }

    /// Queues `what` on the link to `to` after the common checks.
    fn enqueue(&mut self, to: PeerId, size: usize, what: impl FnOnce(&mut Node) -> LinkItem) -> Result<(), SendError> {
        self.check_size(size)?;
        let depth = self.net.hub.config.queue_depth;
        self.with_node(|st, me| {
            Self::check_peer(st, me, to)?;
            if !st.link_up(me, to) {
                return Err(SendError::LinkDown(to));
            }
            if st.nodes[&to].in_transit.get(&me).copied().unwrap_or(0) >= depth {
                return Err(SendError::Backpressure(to));
            }
            let item = what(st.nodes.get_mut(&me).expect("checked"));
            st.nodes.get_mut(&to).expect("link up").push(Item::Link { from: me, what: item });
            Ok(())
        })
    }

    fn issue(
        &mut self,
        to: PeerId,
        kind: Kind,
        size: usize,
        make: impl FnOnce(Token) -> LinkItem,
    ) -> Result<Token, SendError> {
        let mut issued = 0;
        self.enqueue(to, size, |n| {
            let token = n.next_token;
            n.next_token += 1;
            n.outstanding.insert(token, (to, kind));
            issued = token;
            make(token)
        })?;
        Ok(issued)
    }

    fn answer(
        &mut self,
        from: PeerId,
        token: Token,
        kind: Kind,
        result: Result<&[u8], &[u8]>,
    ) -> Result<(), SendError> {
        let size = match result {
            Ok(b) | Err(b) => b.len(),
        };
        self.check_size(size)?;
        self.with_node(|st, me| {
            Self::check_peer(st, me, from)?;
            let n = st.nodes.get_mut(&me).expect("checked");
            match n.pending.remove(&(from, token)) {
                Some(k) => assert_eq!(
                    k, kind,
                    "complete_{kind:?} for token {token} from peer {from}, which arrived as a {k:?}"
                ),
                None if !st.link_up(me, from) => return Err(SendError::LinkDown(from)),
                // Unknown or already answered: the link failed in between (the issuer
                // got LinkFailed), so the answer goes nowhere.
                None => return Ok(()),
            }
            let r = match result {
                Ok(b) => Ok(Bytes::copy_from_slice(b)),
                Err(d) => Err(AccessError::Denied { detail: Bytes::copy_from_slice(d) }),
            };
            st.complete(from, me, token, r);
            Ok(())
        })
    }

    /// Moves queued items into `events`; returns how many events were produced.
    fn drain(st: &mut State, me: PeerId, events: &mut Vec<Event>) -> usize {
        let mut produced = 0;
        loop {
            let n = st.nodes.get_mut(&me).expect("open node");
            let Some(item) = n.queue.pop_front() else {
                return produced;
            };
            let (from, what) = match item {
                Item::Local(e) => {
                    events.push(e);
                    produced += 1;
                    continue;
                }
                Item::Link { from, what } => (from, what),
            };
            if let Some(c) = n.in_transit.get_mut(&from) {
                *c -= 1;
            }
            match what {
                LinkItem::Message(payload) => {
                    events.push(Event::Message { from, payload });
                    produced += 1;
                }
                LinkItem::Write { token, offset, data } => {
                    if n.holder == Some(from) {
                        n.pending.insert((from, token), Kind::Write);
                        events.push(Event::WriteArrived { from, token, offset, data });
                        produced += 1;
                    } else {
                        let denied = Err(AccessError::Denied { detail: Bytes::new() });
                        st.complete(from, me, token, denied);
                    }
                }
                LinkItem::Read { token, offset, len } => {
                    n.pending.insert((from, token), Kind::Read);
                    events.push(Event::ReadArrived { from, token, offset, len });
                    produced += 1;
                }
            }
        }
    }
}

impl Drop for MemTransport {
    fn drop(&mut self) {
        self.close();
    }
}

impl Transport for MemTransport {
    fn local(&self) -> PeerId {
        self.id
    }

    fn peers(&self) -> Vec<PeerId> {
        let st = self.net.lock();
        st.nodes
            .get(&self.id)
            .filter(|n| n.incarnation == self.incarnation)
            .map(|n| n.peers.clone())
            .unwrap_or_default()
    }

    fn max_payload(&self) -> usize {
        self.net.hub.config.max_payload
    }

    fn send(&mut self, to: PeerId, payload: &[u8]) -> Result<(), SendError> {
        self.enqueue(to, payload.len(), |_| LinkItem::Message(Bytes::copy_from_slice(payload)))
    }

    fn write(&mut self, to: PeerId, offset: u64, data: &[u8]) -> Result<Token, SendError> {
        self.issue(to, Kind::Write, data.len(), |token| LinkItem::Write {
            token,
            offset,
            data: Bytes::copy_from_slice(data),
        })
    }

    fn read(&mut self, from: PeerId, offset: u64, len: u32) -> Result<Token, SendError> {
        self.issue(from, Kind::Read, len as usize, |token| LinkItem::Read { token, offset, len })
    }

    fn complete_write(&mut self, from: PeerId, token: Token, result: Result<&[u8], &[u8]>) -> Result<(), SendError> {
        self.answer(from, token, Kind::Write, result)
    }

    fn complete_read(&mut self, from: PeerId, token: Token, result: Result<&[u8], &[u8]>) -> Result<(), SendError> {
        self.answer(from, token, Kind::Read, result)
    }

    fn grant(&mut self, peer: PeerId) {
        let _ = self.with_node(|st, me| {
            st.nodes.get_mut(&me).expect("checked").holder = Some(peer);
            Ok(())
        });
    }

    fn revoke(&mut self, peer: PeerId) {
        let _ = self.with_node(|st, me| {
            let n = st.nodes.get_mut(&me).expect("checked");
            if n.holder == Some(peer) {
                n.holder = None;
            }
            Ok(())
        });
    }

    fn permission_holder(&self) -> Option<PeerId> {
        self.with_node(|st, me| Ok(st.nodes[&me].holder)).ok().flatten()
    }

    fn poll(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> std::io::Result<()> {
        let closed = || std::io::Error::new(std::io::ErrorKind::NotConnected, "transport closed");
        if self.closed {
            return Err(closed());
        }
        // A deadline too far to represent is treated as no deadline.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut st = self.net.lock();
        loop {
            let cv = match st.nodes.get_mut(&self.id) {
                Some(n) if n.open && n.incarnation == self.incarnation => n.cv.clone(),
                _ => return Err(closed()),
            };
            let produced = Self::drain(&mut st, self.id, events);
            let n = st.nodes.get_mut(&self.id).expect("open node");
            if produced > 0 || n.woken {
                n.woken = false;
                return Ok(());
            }
            st = match deadline {
                None => cv.wait(st).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Ok(());
                    }
                    cv.wait_timeout(st, d - now).unwrap_or_else(|e| e.into_inner()).0
                }
            };
        }
    }

    fn waker(&self) -> Arc<dyn Wake> {
        Arc::new(MemWaker { hub: self.net.hub.clone(), id: self.id, incarnation: self.incarnation })
    }
    fn name(&self) -> &'static str {
        "memory"
    }
}

/// Wakes one [`MemTransport`]'s `poll`.
struct MemWaker {
    hub: Arc<Hub>,
    id: PeerId,
    incarnation: u64,
}

impl Wake for MemWaker {
    fn wake(&self) {
        let mut st = lock(&self.hub);
        if let Some(n) = st.nodes.get_mut(&self.id) {
            if n.incarnation == self.incarnation {
                n.woken = true;
                n.cv.notify_all();
            }
        }
    }
}
