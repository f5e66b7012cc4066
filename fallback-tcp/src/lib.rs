//! # fallback-tcp: replog's transport over plain TCP
//!
//! [`TcpTransport`] implements [`transport::Transport`] on kernel TCP sockets, for
//! machines without RDMA or DPDK. It is the replication path of the fallback, so it is
//! built to be cheap per message:
//!
//! - **one thread**: all I/O happens inside [`Transport::poll`], on the caller's
//!   thread; there are no background threads. Sockets are non-blocking and driven by
//!   [`mio`] (epoll on Linux; maintained by the tokio project, it is the standard
//!   readiness layer under tokio itself and adds nothing we do not need).
//!   `send`/`write`/`read` and the completions only queue; `poll` flushes every queue
//!   with one `writev` per connection (header and payload slices, up to 64 per call),
//!   reads into a reusable buffer and decodes frames with
//!   [`transport::envelope::Decoder`] without copying payloads out of it.
//! - **TCP_NODELAY** on every socket: frames are coalesced by the queue, not by Nagle.
//! - **bounded queues**: a peer whose outgoing queue passed
//!   [`TcpConfig::max_queued_bytes_per_peer`] gets
//!   [`SendError::Backpressure`]; completions have their own, larger bound.
//! - **two connections per pair**: each replica dials every peer and sends its own
//!   messages, writes and reads on that connection; it accepts each peer's connection
//!   and receives the peer's traffic there, answering writes and reads on the same
//!   connection. No tie-breaking is needed. See [`wire`] for the frames.
//! - **handshake**: HELLO (cluster id, node id, target node id, version, configuration
//!   digest) and HELLO_OK or REJECT; with a cluster secret ([`TcpConfig::secret`]) a
//!   mutual HMAC-SHA256 challenge-response in between, so that a process that does not
//!   know the secret cannot join, and a replica configured with another member list
//!   ([`TcpConfig::config_digest`]) is refused as stale. Every refusal is a `tracing` warning naming the remote address and the
//!   reason, and closes the connection; the transport goes on serving.
//! - **TLS** (optional, [`TcpConfig::tls`], see [`PeerTls`]): every connection runs a
//!   rustls handshake first (mutual, against the cluster CA), non-blocking inside
//!   `poll`; the HELLO handshake and every frame then travel inside TLS. A failed TLS
//!   handshake is a warning naming the remote and rustls' reason; the link is retried
//!   like any failed link.
//! - **reconnect**: a failed dial or a dropped outgoing connection is retried after an
//!   exponential, jittered (seeded) delay between [`TcpConfig::reconnect_min`] and
//!   [`TcpConfig::reconnect_max`]. [`Event::PeerUp`] follows each successful
//!   handshake; [`Event::PeerDown`] follows the loss of a link that was up (failed
//!   attempts to reach a peer that is already down are logged, not reported again).
//!   Writes and reads in flight on a lost link complete with
//!   [`AccessError::LinkFailed`], each exactly once; `send` to a peer whose link is not
//!   up answers [`SendError::LinkDown`] (nothing is buffered for it).
//! - **receiver-side agent**: a WRITE from a peer that does not hold permission
//!   ([`Transport::grant`]) is answered "denied" by the transport itself and never
//!   surfaces as [`Event::WriteArrived`]. Reads are allowed from any peer.
//!
//! ## Two-step set-up
//! Tests bind every transport on port 0 first, then tell each where the others are:
//!
//! ```no_run
//! use fallback_tcp::{TcpConfig, TcpTransport};
//! use std::collections::BTreeMap;
//! let any = "127.0.0.1:0".parse().unwrap();
//! let mut a = TcpTransport::bind(TcpConfig::new(7, 1, any, BTreeMap::new())).unwrap();
//! let mut b = TcpTransport::bind(TcpConfig::new(7, 2, any, BTreeMap::new())).unwrap();
//! a.set_peers(BTreeMap::from([(2, b.local_addr())])).unwrap();
//! b.set_peers(BTreeMap::from([(1, a.local_addr())])).unwrap();
//! ```

#![deny(missing_docs)]

mod config;
mod conn;
mod tls;
pub mod wire;

pub use config::TcpConfig;
/// The rustls version the TLS settings are built with.
pub use rustls;
pub use tls::{PeerTls, TlsSetupError};
pub use wire::ProtocolError;

use config::Rng;
use conn::{AuthState, Conn, ReadOutcome, Role};
use hmac::Mac;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token as MioToken};
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};
use transport::envelope::{Decoder, Frame, VERSION};
use transport::{AccessError, Event, PeerId, SendError, Token, Transport, Wake};
use wire::{kind, Hello, HelloOk};

const LISTENER: MioToken = MioToken(0);
const WAKER: MioToken = MioToken(1);
/// A descriptor of the caller's ([`Transport::watch_fd`]).
const WATCH: MioToken = MioToken(usize::MAX - 1);
const FIRST_CONN: usize = 2;
/// Size of the reusable read buffer (one `read` call at most).
const SCRATCH: usize = 64 * 1024;
/// Most bytes read from one connection per pass before others get their turn.
const READ_BUDGET: usize = 4 * SCRATCH;

/// What an issued access waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    Write,
    Read,
}

/// Per configured peer.
struct Peer {
    addr: SocketAddr,
    /// Our connection to it (connecting, handshaking or established).
    out: Option<usize>,
    /// `out` completed its handshake.
    up: bool,
    /// Its established connection to us.
    incoming: Option<usize>,
    /// Delay before the next redial after a failure.
    backoff: Duration,
    /// When to dial next (`None`: a connection exists).
    next_dial: Option<Instant>,
    /// Writes and reads issued to it and not yet answered.
    inflight: HashMap<Token, Pending>,
}

/// A write or read that arrived from a peer and awaits the owner's completion. Keyed by
/// (peer, the peer's token): the token in `WriteArrived`/`ReadArrived` is the writer's
/// own, as [`transport::conformance`] expects.
struct Arrived {
    conn: usize,
    /// `Some(len)` for a read: the most bytes the answer may carry.
    read_len: Option<u32>,
}

struct MioWake(mio::Waker);

impl Wake for MioWake {
    fn wake(&self) {
        if let Err(e) = self.0.wake() {
            warn!("waking the transport failed: {e}");
        }
    }
}

/// A replica's endpoint on TCP. See the crate docs.
pub struct TcpTransport {
    cfg: TcpConfig,
    poll: Poll,
    mio_events: Option<Events>,
    listener: TcpListener,
    local_addr: SocketAddr,
    waker: Arc<MioWake>,
    peers: BTreeMap<PeerId, Peer>,
    conns: HashMap<usize, Conn>,
    next_conn: usize,
    dirty: Vec<usize>,
    /// Connections that had more to read when their read budget ran out.
    pending_read: Vec<usize>,
    handshake_decoder: Decoder,
    decoder: Decoder,
    scratch: Vec<u8>,
    next_token: Token,
    arrived: HashMap<(PeerId, Token), Arrived>,
    holder: Option<PeerId>,
    rng: Rng,
    /// Events produced outside `poll` (by `set_peers`), reported by the next `poll`.
    pending_events: Vec<Event>,
}

/// Tokens start from the wall clock (in nanoseconds) so that a restarted replica does not
/// reuse the tokens of its previous life: an agent that answers an access of the old
/// life late keys it by (peer, token) and must not hit a new access.
fn first_token() -> Token {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    nanos.max(1)
}

/// A fresh nonce from the OS.
fn nonce() -> Result<[u8; wire::NONCE_LEN], ProtocolError> {
    let mut n = [0u8; wire::NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| ProtocolError::Entropy(e.to_string()))?;
    Ok(n)
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

fn check_peers(local: PeerId, peers: &BTreeMap<PeerId, SocketAddr>) -> io::Result<()> {
    if local == 0 {
        return Err(invalid("the local node id must not be 0".into()));
    }
    if peers.contains_key(&0) {
        return Err(invalid("peer id 0 is not allowed".into()));
    }
    if peers.contains_key(&local) {
        return Err(invalid(format!("the peer list contains the local node id {local}")));
    }
    Ok(())
}

impl TcpTransport {
    /// Listens on `cfg.listen` at once and starts dialing `cfg.peers` at the first
    /// [`Transport::poll`].
    pub fn bind(cfg: TcpConfig) -> io::Result<Self> {
        check_peers(cfg.local, &cfg.peers)?;
        let listener = TcpListener::bind(cfg.listen)?;
        Self::with_listener(cfg, listener)
    }

    /// Like [`TcpTransport::bind`] with a listener bound by the caller (`cfg.listen` is
    /// ignored).
    pub fn from_std_listener(cfg: TcpConfig, listener: std::net::TcpListener) -> io::Result<Self> {
        check_peers(cfg.local, &cfg.peers)?;
        listener.set_nonblocking(true)?;
        Self::with_listener(cfg, TcpListener::from_std(listener))
    }

    fn with_listener(cfg: TcpConfig, mut listener: TcpListener) -> io::Result<Self> {
        if cfg.secret.as_ref().is_some_and(|s| s.is_empty()) {
            return Err(invalid("the cluster secret must not be empty".into()));
        }
        let poll = Poll::new()?;
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(MioWake(mio::Waker::new(poll.registry(), WAKER)?));
        let local_addr = listener.local_addr()?;
        let max = u32::try_from(cfg.max_payload + wire::MAX_META)
            .map_err(|_| invalid("max_payload must be below 4 GiB".into()))?;
        let mut t = TcpTransport {
            poll,
            mio_events: Some(Events::with_capacity(256)),
            listener,
            local_addr,
            waker,
            peers: BTreeMap::new(),
            conns: HashMap::new(),
            next_conn: FIRST_CONN,
            dirty: Vec::new(),
            pending_read: Vec::new(),
            handshake_decoder: Decoder::new(wire::HANDSHAKE_MAX_FRAME),
            decoder: Decoder::new(max),
            scratch: vec![0; SCRATCH],
            next_token: first_token(),
            arrived: HashMap::new(),
            holder: None,
            rng: Rng::new(cfg.seed),
            pending_events: Vec::new(),
            cfg,
        };
        let peers = std::mem::take(&mut t.cfg.peers);
        t.set_peers(peers)?;
        info!(local = t.cfg.local, addr = %t.local_addr, "tcp transport listening");
        Ok(t)
    }

    /// The address the transport listens on (the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The configuration in force (with the current peers).
    pub fn config(&self) -> &TcpConfig {
        &self.cfg
    }

    /// Replaces the peer set. New peers are dialed at the next poll; the connections
    /// of removed peers, and of peers whose address changed, are closed.
    pub fn set_peers(&mut self, peers: BTreeMap<PeerId, SocketAddr>) -> io::Result<()> {
        check_peers(self.cfg.local, &peers)?;
        let now = Instant::now();
        let gone: Vec<PeerId> =
            self.peers.iter().filter(|(id, p)| peers.get(id) != Some(&p.addr)).map(|(id, _)| *id).collect();
        let mut events = Vec::new();
        for id in gone {
            let p = &self.peers[&id];
            let conns: Vec<usize> = p.out.iter().chain(p.incoming.iter()).copied().collect();
            for c in conns {
                self.close(c, &ProtocolError::Removed.to_string(), &mut events);
            }
            self.peers.remove(&id);
        }
        // In-flight accesses to removed peers fail (LinkFailed) at the next poll.
        self.pending_events.append(&mut events);
        for (&id, &addr) in &peers {
            self.peers.entry(id).or_insert_with(|| Peer {
                addr,
                out: None,
                up: false,
                incoming: None,
                backoff: self.cfg.reconnect_min,
                next_dial: Some(now),
                inflight: HashMap::new(),
            });
        }
        self.cfg.peers = peers;
        Ok(())
    }

    /// Replaces the digests expected of particular peers in their HELLO (see
    /// [`TcpConfig::peer_digests`]). Links already up stay up; the new digests apply to
    /// the next handshakes.
    pub fn set_peer_digests(&mut self, digests: BTreeMap<PeerId, u64>) {
        self.cfg.peer_digests = digests;
    }

    /// Whether our link to `peer` is up (handshake done).
    pub fn is_up(&self, peer: PeerId) -> bool {
        self.peers.get(&peer).is_some_and(|p| p.up)
    }

    /// Bytes queued to `peer` on our outgoing connection and not yet written.
    pub fn queued_bytes(&self, peer: PeerId) -> usize {
        self.peers.get(&peer).and_then(|p| p.out).and_then(|c| self.conns.get(&c)).map_or(0, |c| c.out.queued())
    }

    // ----- connections -----

    fn add_conn(&mut self, mut conn: Conn) -> io::Result<usize> {
        let id = self.next_conn;
        self.next_conn += 1;
        self.poll.registry().register(&mut conn.stream, MioToken(id), Interest::READABLE | Interest::WRITABLE)?;
        self.conns.insert(id, conn);
        Ok(id)
    }

    fn mark_dirty(&mut self, id: usize) {
        if let Some(c) = self.conns.get_mut(&id) {
            if !c.dirty {
                c.dirty = true;
                self.dirty.push(id);
            }
        }
    }

    fn schedule_redial(&mut self, peer: PeerId, now: Instant) {
        let max = self.cfg.reconnect_max;
        if let Some(p) = self.peers.get_mut(&peer) {
            let delay = self.rng.jitter(p.backoff);
            p.backoff = (p.backoff * 2).min(max);
            p.next_dial = Some(now + delay);
        }
    }

    fn dial(&mut self, peer: PeerId, now: Instant) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        p.next_dial = None;
        let addr = p.addr;
        let stream = match TcpStream::connect(addr) {
            Ok(s) => s,
            Err(e) => {
                debug!(peer, remote = %addr, "dial failed: {e}");
                self.schedule_redial(peer, now);
                return;
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            debug!(peer, remote = %addr, "TCP_NODELAY: {e}");
        }
        if let Err(e) = detect_dead_links(&stream, self.cfg.dead_link_timeout) {
            debug!(peer, remote = %addr, "dead-link detection: {e}");
        }
        let mut conn = Conn::new(stream, addr, Role::Outgoing(peer), false, now + self.cfg.handshake_timeout);
        if let Some(tls) = &self.cfg.tls {
            match rustls::ClientConnection::new(tls.client.clone(), tls.name_of(peer, addr)) {
                Ok(c) => conn.tls = Some(Box::new(c.into())),
                Err(e) => {
                    warn!(peer, remote = %addr, "not dialing: TLS session: {e}");
                    self.schedule_redial(peer, now);
                    return;
                }
            }
        }
        let mut dialer_nonce = [0u8; wire::NONCE_LEN];
        if self.cfg.secret.is_some() {
            match nonce() {
                Ok(n) => dialer_nonce = n,
                Err(e) => {
                    warn!(peer, remote = %addr, "not dialing: {e}");
                    self.schedule_redial(peer, now);
                    return;
                }
            }
            let digest = self.cfg.config_digest;
            conn.auth = Some(Box::new(AuthState { peer, digest, acceptor_nonce: None, dialer_nonce }));
        }
        let hello = Hello {
            cluster_id: self.cfg.cluster_id,
            node_id: self.cfg.local,
            target: peer,
            version: VERSION,
            config_digest: self.cfg.config_digest,
            nonce: dialer_nonce,
        };
        conn.out.push_frame(kind::HELLO, &hello.encode(), &[]);
        match self.add_conn(conn) {
            Ok(id) => {
                self.peers.get_mut(&peer).expect("peer").out = Some(id);
                debug!(peer, remote = %addr, conn = id, "dialing");
            }
            Err(e) => {
                warn!(peer, remote = %addr, "registering a socket failed: {e}");
                self.schedule_redial(peer, now);
            }
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, addr)) => {
                    if let Err(e) = stream.set_nodelay(true) {
                        debug!(remote = %addr, "TCP_NODELAY: {e}");
                    }
                    if let Err(e) = detect_dead_links(&stream, self.cfg.dead_link_timeout) {
                        debug!(remote = %addr, "dead-link detection: {e}");
                    }
                    let deadline = Instant::now() + self.cfg.handshake_timeout;
                    let mut conn = Conn::new(stream, addr, Role::Incoming(None), true, deadline);
                    if let Some(tls) = &self.cfg.tls {
                        match rustls::ServerConnection::new(tls.server.clone()) {
                            Ok(s) => conn.tls = Some(Box::new(s.into())),
                            Err(e) => {
                                warn!(remote = %addr, "refusing a peer connection: TLS session: {e}");
                                continue;
                            }
                        }
                    }
                    match self.add_conn(conn) {
                        Ok(id) => debug!(remote = %addr, conn = id, "accepted"),
                        Err(e) => warn!(remote = %addr, "registering a socket failed: {e}"),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and the like: try again at the next readiness.
                    warn!(addr = %self.local_addr, "accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// Closes connection `id`, failing what waits on it. `reason` goes into the events;
    /// the caller has logged it.
    fn close(&mut self, id: usize, reason: &str, events: &mut Vec<Event>) {
        let Some(mut conn) = self.conns.remove(&id) else {
            return;
        };
        // Best effort: a REJECT or last answers may still be queued.
        if conn.connected && conn.has_output() {
            let _ = conn.flush();
        }
        let _ = self.poll.registry().deregister(&mut conn.stream);
        let now = Instant::now();
        match conn.role {
            Role::Outgoing(peer) => {
                let Some(p) = self.peers.get_mut(&peer) else {
                    return;
                };
                if p.out != Some(id) {
                    return;
                }
                p.out = None;
                let was_up = std::mem::replace(&mut p.up, false);
                let mut failed: Vec<(Token, Pending)> = p.inflight.drain().collect();
                failed.sort_unstable_by_key(|(t, _)| *t);
                for (token, what) in failed {
                    let result = Err(AccessError::LinkFailed(reason.to_string()));
                    events.push(match what {
                        Pending::Write => Event::WriteDone { to: peer, token, result },
                        Pending::Read => Event::ReadDone { from: peer, token, result },
                    });
                }
                if was_up {
                    events.push(Event::PeerDown { peer, reason: reason.to_string() });
                }
                self.schedule_redial(peer, now);
            }
            Role::Incoming(peer) => {
                if let Some(peer) = peer {
                    if let Some(p) = self.peers.get_mut(&peer) {
                        if p.incoming == Some(id) {
                            p.incoming = None;
                        }
                    }
                    self.arrived.retain(|_, a| a.conn != id);
                }
            }
        }
    }

    /// Closes `id` after a protocol error: one warning naming the remote and the reason.
    fn fail(&mut self, id: usize, err: ProtocolError, events: &mut Vec<Event>) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let (addr, role) = (conn.addr, conn.role);
        let reason = err.to_string();
        match role {
            Role::Incoming(peer) => {
                if !matches!(err, ProtocolError::Truncated(_) | ProtocolError::Replaced | ProtocolError::Tls(_)) {
                    conn.out.push_frame(kind::REJECT, &[], wire::reject_payload(&reason));
                }
                warn!(local = self.cfg.local, remote = %addr, peer = ?peer,
                    "closing incoming peer connection: {reason}");
            }
            Role::Outgoing(peer) => {
                warn!(local = self.cfg.local, remote = %addr, peer,
                    "closing connection to peer: {reason}");
            }
        }
        self.close(id, &reason, events);
    }

    fn flush_conn(&mut self, id: usize, events: &mut Vec<Event>) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        conn.dirty = false;
        if !conn.connected || !conn.has_output() {
            return;
        }
        if let Err(e) = conn.flush() {
            let (addr, role) = (conn.addr, conn.role);
            info!(local = self.cfg.local, remote = %addr, role = ?role, "write failed: {e}");
            self.close(id, &format!("write failed: {e}"), events);
        }
    }

    fn flush_dirty(&mut self, events: &mut Vec<Event>) {
        while !self.dirty.is_empty() {
            let dirty = std::mem::take(&mut self.dirty);
            for id in dirty {
                self.flush_conn(id, events);
            }
        }
    }

    /// Handshake deadlines and redials. Returns the next time something is due.
    fn run_timers(&mut self, now: Instant, events: &mut Vec<Event>) -> Option<Instant> {
        let expired: Vec<usize> =
            self.conns.iter().filter(|(_, c)| c.deadline.is_some_and(|d| d <= now)).map(|(id, _)| *id).collect();
        for id in expired {
            let t = self.cfg.handshake_timeout;
            self.fail(id, ProtocolError::HandshakeTimeout(t), events);
        }
        let due: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.out.is_none() && p.next_dial.is_some_and(|d| d <= now))
            .map(|(id, _)| *id)
            .collect();
        for peer in due {
            self.dial(peer, now);
        }
        let conn_next = self.conns.values().filter_map(|c| c.deadline).min();
        let dial_next = self.peers.values().filter(|p| p.out.is_none()).filter_map(|p| p.next_dial).min();
        match (conn_next, dial_next) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Readiness of connection `id`.
    fn conn_ready(&mut self, id: usize, ev: (bool, bool, bool), events: &mut Vec<Event>) {
        let (readable, writable, closed) = ev;
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if !conn.connected {
            let err = match conn.stream.take_error() {
                Ok(Some(e)) | Err(e) => Some(e),
                Ok(None) => match conn.stream.peer_addr() {
                    Ok(_) => None,
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                    Err(e) => Some(e),
                },
            };
            if let Some(e) = err {
                let addr = conn.addr;
                debug!(local = self.cfg.local, remote = %addr, "connect failed: {e}");
                self.close(id, &format!("connect to {addr} failed: {e}"), events);
                return;
            }
            conn.connected = true;
            self.mark_dirty(id);
        }
        if writable {
            self.mark_dirty(id);
        }
        if readable || closed {
            self.read_conn(id, closed, events);
        }
    }

    fn read_conn(&mut self, id: usize, closed: bool, events: &mut Vec<Event>) {
        let mut budget = READ_BUDGET;
        let mut scratch = std::mem::take(&mut self.scratch);
        while let Some(conn) = self.conns.get_mut(&id) {
            let res = conn.read_once(&mut scratch);
            match res {
                Ok(ReadOutcome::Data { n, more }) => {
                    if conn.tls.is_some() && conn.has_output() {
                        self.mark_dirty(id);
                    }
                    if !self.decode_frames(id, events) {
                        break;
                    }
                    budget = budget.saturating_sub(n);
                    // A short read drained the socket (epoll(7)), unless the peer also
                    // closed: then read on to see the end.
                    if !more && !closed {
                        break;
                    }
                    if budget == 0 {
                        self.pending_read.push(id);
                        break;
                    }
                }
                Ok(ReadOutcome::WouldBlock) => {
                    if conn.tls.is_some() && conn.has_output() {
                        // The TLS session has handshake records to send, or finished
                        // its handshake and may now carry the queued frames.
                        self.mark_dirty(id);
                    }
                    break;
                }
                Ok(ReadOutcome::Tls(why)) => {
                    self.fail(id, ProtocolError::Tls(why), events);
                    break;
                }
                Ok(ReadOutcome::Eof) => {
                    let (addr, role, left) = (conn.addr, conn.role, conn.rbuf.len());
                    if left > 0 {
                        self.fail(id, ProtocolError::Truncated(left), events);
                    } else {
                        info!(local = self.cfg.local, remote = %addr, role = ?role,
                            "peer closed the connection");
                        self.close(id, "connection closed by the peer", events);
                    }
                    break;
                }
                Err(e) => {
                    let (addr, role) = (conn.addr, conn.role);
                    info!(local = self.cfg.local, remote = %addr, role = ?role, "read failed: {e}");
                    self.close(id, &format!("read failed: {e}"), events);
                    break;
                }
            }
        }
        self.scratch = scratch;
    }

    /// Decodes and handles every whole frame buffered on `id`. False: the connection
    /// was closed.
    fn decode_frames(&mut self, id: usize, events: &mut Vec<Event>) -> bool {
        loop {
            let Some(conn) = self.conns.get_mut(&id) else {
                return false;
            };
            let decoder = if conn.established { &self.decoder } else { &self.handshake_decoder };
            match decoder.decode(&mut conn.rbuf) {
                Ok(Some(frame)) => {
                    if let Err(e) = self.handle_frame(id, frame, events) {
                        self.fail(id, e, events);
                        return false;
                    }
                }
                Ok(None) => return true,
                Err(e) => {
                    self.fail(id, e.into(), events);
                    return false;
                }
            }
        }
    }

    fn handle_frame(&mut self, id: usize, frame: Frame, events: &mut Vec<Event>) -> Result<(), ProtocolError> {
        let conn = self.conns.get_mut(&id).expect("live connection");
        let (role, established, addr) = (conn.role, conn.established, conn.addr);
        match (role, established) {
            (Role::Incoming(_), false) if conn.auth.is_none() => {
                if frame.kind != kind::HELLO {
                    return Err(ProtocolError::UnexpectedKind { kind: frame.kind, when: "before HELLO" });
                }
                let hello = Hello::decode(&frame.payload)?;
                let me = self.cfg.local;
                if hello.version != VERSION {
                    return Err(ProtocolError::Version { got: hello.version, expected: VERSION });
                }
                if hello.cluster_id != self.cfg.cluster_id {
                    return Err(ProtocolError::WrongCluster { got: hello.cluster_id, expected: self.cfg.cluster_id });
                }
                if hello.node_id == me {
                    return Err(ProtocolError::SelfId(me));
                }
                if !self.peers.contains_key(&hello.node_id) {
                    return Err(ProtocolError::UnknownNode(hello.node_id));
                }
                if hello.target != me {
                    return Err(ProtocolError::WrongTarget { target: hello.target, local: me });
                }
                if self.cfg.secret.is_none() {
                    self.check_digest(hello.node_id, hello.config_digest)?;
                    return self.accept_peer(id, hello.node_id, None, events);
                }
                let acceptor_nonce = nonce()?;
                let conn = self.conns.get_mut(&id).expect("live connection");
                conn.auth = Some(Box::new(AuthState {
                    peer: hello.node_id,
                    digest: hello.config_digest,
                    acceptor_nonce: Some(acceptor_nonce),
                    dialer_nonce: hello.nonce,
                }));
                conn.out.push_frame(kind::CHALLENGE, &acceptor_nonce, &[]);
                self.mark_dirty(id);
                debug!(local = me, peer = hello.node_id, remote = %addr, "challenged");
                Ok(())
            }
            (Role::Incoming(_), false) => {
                if frame.kind != kind::AUTH {
                    return Err(ProtocolError::UnexpectedKind { kind: frame.kind, when: "before AUTH" });
                }
                let proof = wire::decode_32(&frame.payload, "AUTH")?;
                let a = conn.auth.take().expect("guarded");
                let na = a.acceptor_nonce.expect("set with the challenge");
                let me = self.cfg.local;
                let secret = self.cfg.secret.as_deref().expect("challenged only with a secret");
                let cluster_id = self.cfg.cluster_id;
                let mac = |role| wire::proof_mac(secret, role, cluster_id, a.peer, me, a.digest, &na, &a.dialer_nonce);
                if mac(wire::ROLE_DIALER).verify_slice(&proof).is_err() {
                    return Err(ProtocolError::AuthFailed { node: a.peer });
                }
                self.check_digest(a.peer, a.digest)?;
                if !self.peers.contains_key(&a.peer) {
                    return Err(ProtocolError::UnknownNode(a.peer));
                }
                let proof: [u8; wire::MAC_LEN] = mac(wire::ROLE_ACCEPTOR).finalize().into_bytes().into();
                self.accept_peer(id, a.peer, Some(proof), events)
            }
            (Role::Outgoing(peer), false) => match frame.kind {
                kind::REJECT => Err(ProtocolError::Rejected(String::from_utf8_lossy(&frame.payload).into_owned())),
                kind::CHALLENGE => {
                    let na = wire::decode_32(&frame.payload, "CHALLENGE")?;
                    let Some(secret) = self.cfg.secret.as_deref() else {
                        return Err(ProtocolError::NoSecret);
                    };
                    let Some(a) = conn.auth.as_mut().filter(|a| a.acceptor_nonce.is_none()) else {
                        return Err(ProtocolError::UnexpectedKind { kind: frame.kind, when: "after a CHALLENGE" });
                    };
                    a.acceptor_nonce = Some(na);
                    let mac = wire::proof_mac(
                        secret,
                        wire::ROLE_DIALER,
                        self.cfg.cluster_id,
                        self.cfg.local,
                        peer,
                        a.digest,
                        &na,
                        &a.dialer_nonce,
                    );
                    conn.out.push_frame(kind::AUTH, &mac.finalize().into_bytes(), &[]);
                    self.mark_dirty(id);
                    Ok(())
                }
                kind::HELLO_OK => {
                    let ok = HelloOk::decode(&frame.payload)?;
                    if ok.cluster_id != self.cfg.cluster_id {
                        return Err(ProtocolError::WrongCluster { got: ok.cluster_id, expected: self.cfg.cluster_id });
                    }
                    if ok.node_id != peer {
                        return Err(ProtocolError::WrongPeer { expected: peer, got: ok.node_id });
                    }
                    if let Some(secret) = self.cfg.secret.as_deref() {
                        let a = conn.auth.take().ok_or(ProtocolError::PeerNotAuthenticated)?;
                        let (Some(na), Some(proof)) = (a.acceptor_nonce, ok.proof) else {
                            return Err(ProtocolError::PeerNotAuthenticated);
                        };
                        let mac = wire::proof_mac(
                            secret,
                            wire::ROLE_ACCEPTOR,
                            self.cfg.cluster_id,
                            self.cfg.local,
                            peer,
                            a.digest,
                            &na,
                            &a.dialer_nonce,
                        );
                        if mac.verify_slice(&proof).is_err() {
                            return Err(ProtocolError::PeerNotAuthenticated);
                        }
                    }
                    conn.established = true;
                    conn.deadline = None;
                    let p = self.peers.get_mut(&peer).expect("outgoing to a peer");
                    p.up = true;
                    p.backoff = self.cfg.reconnect_min;
                    info!(local = self.cfg.local, peer, remote = %addr, "link up");
                    events.push(Event::PeerUp { peer });
                    Ok(())
                }
                k => Err(ProtocolError::UnexpectedKind { kind: k, when: "before HELLO_OK" }),
            },
            (Role::Incoming(Some(peer)), true) => self.handle_request(id, peer, frame, events),
            (Role::Incoming(None), true) => unreachable!("established implies a peer"),
            (Role::Outgoing(peer), true) => self.handle_answer(peer, frame, events),
        }
    }

    /// Refuses a dialer whose digest is not the one expected of it (see
    /// [`TcpConfig::peer_digests`]).
    fn check_digest(&self, node: PeerId, got: u64) -> Result<(), ProtocolError> {
        let expected = self.cfg.peer_digests.get(&node).copied().unwrap_or(self.cfg.config_digest);
        if got != expected {
            return Err(ProtocolError::StaleConfig { node, got, expected });
        }
        Ok(())
    }

    /// Completes the handshake of incoming connection `id` from `peer`.
    fn accept_peer(
        &mut self,
        id: usize,
        peer: PeerId,
        proof: Option<[u8; wire::MAC_LEN]>,
        events: &mut Vec<Event>,
    ) -> Result<(), ProtocolError> {
        let me = self.cfg.local;
        let conn = self.conns.get_mut(&id).expect("live connection");
        let addr = conn.addr;
        conn.role = Role::Incoming(Some(peer));
        conn.established = true;
        conn.deadline = None;
        let ok = HelloOk { cluster_id: self.cfg.cluster_id, node_id: me, proof };
        conn.out.push_frame(kind::HELLO_OK, &ok.encode(), &[]);
        self.mark_dirty(id);
        let p = self.peers.get_mut(&peer).expect("checked");
        if let Some(old) = p.incoming.replace(id) {
            self.fail(old, ProtocolError::Replaced, events);
        }
        info!(local = me, peer, remote = %addr, authenticated = proof.is_some(), "accepted peer");
        Ok(())
    }

    /// A frame on an established incoming connection from `peer`.
    fn handle_request(
        &mut self,
        id: usize,
        peer: PeerId,
        frame: Frame,
        events: &mut Vec<Event>,
    ) -> Result<(), ProtocolError> {
        match frame.kind {
            kind::MSG => {
                events.push(Event::Message { from: peer, payload: frame.payload });
                Ok(())
            }
            kind::WRITE => {
                let (remote_token, offset, data) = wire::decode_write(&frame.payload)?;
                if self.holder != Some(peer) {
                    debug!(local = self.cfg.local, peer, offset, "write denied: no permission");
                    let conn = self.conns.get_mut(&id).expect("live");
                    conn.out.push_frame(kind::WRITE_ACK, &wire::answer_meta(remote_token, false), &[]);
                    let q = conn.out.queued();
                    if q > self.cfg.max_queued_completion_bytes_per_peer {
                        return Err(ProtocolError::NotReading(q));
                    }
                    self.mark_dirty(id);
                    return Ok(());
                }
                self.arrive(id, peer, remote_token, None)?;
                events.push(Event::WriteArrived { from: peer, token: remote_token, offset, data });
                Ok(())
            }
            kind::READ => {
                let (remote_token, offset, len) = wire::decode_read(&frame.payload)?;
                self.arrive(id, peer, remote_token, Some(len))?;
                events.push(Event::ReadArrived { from: peer, token: remote_token, offset, len });
                Ok(())
            }
            k => Err(ProtocolError::UnexpectedKind { kind: k, when: "on an incoming connection" }),
        }
    }

    /// A frame on our established connection to `peer`.
    fn handle_answer(&mut self, peer: PeerId, frame: Frame, events: &mut Vec<Event>) -> Result<(), ProtocolError> {
        let (what, expect) = match frame.kind {
            kind::WRITE_ACK => ("WRITE_ACK", Pending::Write),
            kind::READ_RESP => ("READ_RESP", Pending::Read),
            k => return Err(ProtocolError::UnexpectedKind { kind: k, when: "on an outgoing connection" }),
        };
        let (token, ok, bytes) = wire::decode_answer(&frame.payload, what)?;
        let p = self.peers.get_mut(&peer).expect("outgoing to a peer");
        if p.inflight.get(&token) != Some(&expect) {
            return Err(ProtocolError::UnknownToken(token));
        }
        p.inflight.remove(&token);
        let result = if ok { Ok(bytes) } else { Err(AccessError::Denied { detail: bytes }) };
        events.push(match expect {
            Pending::Write => Event::WriteDone { to: peer, token, result },
            Pending::Read => Event::ReadDone { from: peer, token, result },
        });
        Ok(())
    }

    fn arrive(&mut self, conn: usize, peer: PeerId, token: Token, read_len: Option<u32>) -> Result<(), ProtocolError> {
        match self.arrived.entry((peer, token)) {
            std::collections::hash_map::Entry::Occupied(_) => Err(ProtocolError::DuplicateToken(token)),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(Arrived { conn, read_len });
                Ok(())
            }
        }
    }

    /// Queues a request frame on our link to `to`.
    fn queue_request(&mut self, to: PeerId, kind: u8, meta: &[u8], body: &[u8]) -> Result<(), SendError> {
        let p = self.peers.get(&to).ok_or(SendError::UnknownPeer(to))?;
        if body.len() > self.cfg.max_payload {
            return Err(SendError::TooLarge { size: body.len(), limit: self.cfg.max_payload });
        }
        if !p.up {
            return Err(SendError::LinkDown(to));
        }
        let id = p.out.expect("up implies a connection");
        let conn = self.conns.get_mut(&id).expect("live");
        let q = conn.out.queued();
        let frame = transport::envelope::HEADER_LEN + meta.len() + body.len();
        if q > 0 && q + frame > self.cfg.max_queued_bytes_per_peer {
            return Err(SendError::Backpressure(to));
        }
        conn.out.push_frame(kind, meta, body);
        self.mark_dirty(id);
        Ok(())
    }

    fn complete(
        &mut self,
        from: PeerId,
        token: Token,
        result: Result<&[u8], &[u8]>,
        read: bool,
    ) -> Result<(), SendError> {
        if !self.peers.contains_key(&from) {
            return Err(SendError::UnknownPeer(from));
        }
        let bytes = match result {
            Ok(b) | Err(b) => b,
        };
        let Some(a) = self.arrived.get(&(from, token)) else {
            // Its connection is gone (the requester saw LinkFailed) or it was answered.
            debug!(local = self.cfg.local, from, token, "completion for no pending access");
            return Err(SendError::LinkDown(from));
        };
        if a.read_len.is_some() != read {
            debug!(local = self.cfg.local, from, token, "completion does not match the access");
            return Err(SendError::LinkDown(from));
        }
        let limit = match (a.read_len, result) {
            (Some(len), Ok(_)) => (len as usize).min(self.cfg.max_payload),
            _ => self.cfg.max_payload,
        };
        if bytes.len() > limit {
            return Err(SendError::TooLarge { size: bytes.len(), limit });
        }
        let id = a.conn;
        let conn = self.conns.get_mut(&id).expect("arrived entries die with their conn");
        let q = conn.out.queued();
        let frame = transport::envelope::HEADER_LEN + 9 + bytes.len();
        if q > 0 && q + frame > self.cfg.max_queued_completion_bytes_per_peer {
            return Err(SendError::Backpressure(from));
        }
        let k = if read { kind::READ_RESP } else { kind::WRITE_ACK };
        conn.out.push_frame(k, &wire::answer_meta(token, result.is_ok()), bytes);
        self.arrived.remove(&(from, token));
        self.mark_dirty(id);
        Ok(())
    }
}

impl Transport for TcpTransport {
    fn local(&self) -> PeerId {
        self.cfg.local
    }

    fn peers(&self) -> Vec<PeerId> {
        self.peers.keys().copied().collect()
    }

    fn max_payload(&self) -> usize {
        self.cfg.max_payload
    }

    fn send(&mut self, to: PeerId, payload: &[u8]) -> Result<(), SendError> {
        self.queue_request(to, kind::MSG, &[], payload)
    }

    fn write(&mut self, to: PeerId, offset: u64, data: &[u8]) -> Result<Token, SendError> {
        let token = self.next_token;
        self.queue_request(to, kind::WRITE, &wire::write_meta(token, offset), data)?;
        self.next_token += 1;
        let p = self.peers.get_mut(&to).expect("queued");
        p.inflight.insert(token, Pending::Write);
        Ok(token)
    }

    fn read(&mut self, from: PeerId, offset: u64, len: u32) -> Result<Token, SendError> {
        if len as usize > self.cfg.max_payload && self.peers.contains_key(&from) {
            return Err(SendError::TooLarge { size: len as usize, limit: self.cfg.max_payload });
        }
        let token = self.next_token;
        self.queue_request(from, kind::READ, &wire::read_meta(token, offset, len), &[])?;
        self.next_token += 1;
        let p = self.peers.get_mut(&from).expect("queued");
        p.inflight.insert(token, Pending::Read);
        Ok(token)
    }

    fn complete_write(&mut self, from: PeerId, token: Token, result: Result<&[u8], &[u8]>) -> Result<(), SendError> {
        self.complete(from, token, result, false)
    }

    fn complete_read(&mut self, from: PeerId, token: Token, result: Result<&[u8], &[u8]>) -> Result<(), SendError> {
        self.complete(from, token, result, true)
    }

    fn grant(&mut self, peer: PeerId) {
        self.holder = Some(peer);
    }

    fn revoke(&mut self, peer: PeerId) {
        if self.holder == Some(peer) {
            self.holder = None;
        }
    }

    fn permission_holder(&self) -> Option<PeerId> {
        self.holder
    }

    fn send_queued(&mut self) {
        // A connection that fails here is reported by the next poll.
        let mut events = std::mem::take(&mut self.pending_events);
        self.flush_dirty(&mut events);
        self.pending_events = events;
    }

    fn poll(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        let start = events.len();
        events.append(&mut self.pending_events);
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut mio_events = self.mio_events.take().expect("events buffer");
        let res = loop {
            let now = Instant::now();
            let next_timer = self.run_timers(now, events);
            self.flush_dirty(events);
            let wait = if events.len() > start || !self.pending_read.is_empty() {
                Some(Duration::ZERO)
            } else {
                let user = deadline.map(|d| d.saturating_duration_since(now));
                let timer = next_timer.map(|d| d.saturating_duration_since(now));
                match (user, timer) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            };
            if let Err(e) = self.poll.poll(&mut mio_events, wait) {
                if e.kind() != io::ErrorKind::Interrupted {
                    break Err(e);
                }
            }
            let mut woken = false;
            for ev in mio_events.iter() {
                match ev.token() {
                    LISTENER => self.accept_all(),
                    WAKER | WATCH => woken = true,
                    MioToken(id) => {
                        let closed = ev.is_read_closed() || ev.is_error();
                        let ready = (ev.is_readable(), ev.is_writable() || ev.is_error(), closed);
                        self.conn_ready(id, ready, events);
                    }
                }
            }
            for id in std::mem::take(&mut self.pending_read) {
                self.read_conn(id, false, events);
            }
            self.flush_dirty(events);
            if events.len() > start || woken || deadline.is_some_and(|d| Instant::now() >= d) {
                break Ok(());
            }
        };
        self.mio_events = Some(mio_events);
        res
    }

    fn waker(&self) -> Arc<dyn Wake> {
        self.waker.clone()
    }

    fn watch_fd(&mut self, fd: std::os::fd::RawFd) -> io::Result<bool> {
        self.poll.registry().register(&mut mio::unix::SourceFd(&fd), WATCH, mio::Interest::READABLE)?;
        Ok(true)
    }

    /// Dials the new peers, closes the links of removed ones (and of peers whose
    /// address changed), and expects each peer's digest in its next handshakes.
    fn update_peers(&mut self, peers: &BTreeMap<PeerId, transport::PeerSpec>) -> Result<(), transport::PeersError> {
        let mut addrs = BTreeMap::new();
        for (&id, p) in peers {
            let a: SocketAddr = p.addr.parse().map_err(|e| {
                transport::PeersError::Invalid(format!("peer {id}: address {:?} is not host:port ({e})", p.addr))
            })?;
            addrs.insert(id, a);
        }
        self.set_peers(addrs).map_err(|e| transport::PeersError::Invalid(e.to_string()))?;
        self.set_peer_digests(peers.iter().map(|(&id, p)| (id, p.digest)).collect());
        Ok(())
    }

    fn name(&self) -> &'static str {
        "tcp"
    }

    fn dynamic_peers(&self) -> bool {
        true
    }
}

/// Makes the kernel declare the connection dead when sent data stays unacknowledged for
/// `timeout` (TCP_USER_TIMEOUT) or an idle link stops answering keepalive probes sent
/// every `timeout / 2` after `timeout / 2` of silence. The transport then reconnects.
fn detect_dead_links(stream: &mio::net::TcpStream, timeout: Duration) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    let ms = timeout.as_millis().clamp(1, u32::MAX as u128) as libc::c_uint;
    let half = (timeout.as_secs() / 2).max(1) as libc::c_int;
    let set = |level: libc::c_int, name: libc::c_int, value: &[u8]| -> std::io::Result<()> {
        // SAFETY: `fd` is a valid open socket owned by `stream` for the duration of the
        // call, and `value` points to `value.len()` readable bytes.
        let r = unsafe { libc::setsockopt(fd, level, name, value.as_ptr().cast(), value.len() as libc::socklen_t) };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    set(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, &ms.to_ne_bytes())?;
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, &1i32.to_ne_bytes())?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, &half.to_ne_bytes())?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, &half.to_ne_bytes())?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, &2i32.to_ne_bytes())?;
    Ok(())
}
