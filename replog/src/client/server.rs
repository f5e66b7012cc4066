//! The client-port server: one background thread (`mio`, non-blocking, TCP_NODELAY)
//! that accepts client connections, checks their `Hello`, decodes their frames and hands
//! requests to the node thread; the node answers through a [`Responder`].
//!
//! # Contract with the node
//! - Every decoded request except `Hello` goes to the node as an [`Inbound`] on the
//!   channel given to [`ClientServer::start`], after which `wake_node` is called (once
//!   per batch).
//! - For every connection that completed `Hello`, exactly one
//!   [`Request::Disconnected`] (with `req_id` 0) follows its last request, whatever
//!   closed it (the client, a bad frame, the node's [`Outbound::Close`], a slow reader,
//!   shutdown). The node drops the connection's tail subscriptions then.
//! - The node answers with [`Responder::send`]; replies to a connection that is gone are
//!   dropped silently. A reply larger than `max_frame` is replaced by
//!   `Error { TooLarge }` (and logged).
//!
//! # Refusals (each logged with `tracing::warn!` naming the peer and the reason)
//! A bad envelope (bad magic, another protocol version, reserved flags, a length above
//! `max_frame`, a checksum mismatch), an undecodable request, a request before `Hello`, a
//! second `Hello`, or a wrong cluster id get an `Error` frame with request id 0 (or the
//! Hello's id) and the connection is closed: the error is flushed, the write side shut
//! down, and what the client still sends is drained for at most [`LINGER`] so that the
//! error is not lost to a reset. A connection that ends inside a frame is closed (there
//! is no one left to tell). With a client secret configured, `Hello` is answered with a
//! `Challenge` and only a right `Auth` proof completes it; a wrong proof, any other
//! request before it, or a close without one is logged naming the client and why (a
//! wrong proof and an early request also get `Error { Unauthorized }`). Until `Hello`
//! completes, frames above [`HANDSHAKE_MAX_FRAME`] are refused, so an unauthenticated
//! client cannot make the server buffer a large frame, and a connection that has not
//! completed them within `handshake_timeout` (10 s) is refused and closed (logged), so
//! that stalled unauthenticated connections cannot hold the connection slots. A connection beyond `max_connections` gets
//! `Error { Busy }` and is closed. A client whose unsent responses exceed
//! `max_queued_bytes_per_conn` is closed at once. Everyone else keeps being served.
//!
//! # Backpressure (answered `Error { Busy }`, the connection stays open)
//! The queue to the node is bounded: a request is passed on only while its connection
//! has fewer than `max_inflight_per_conn` requests the node has not answered yet, and
//! while the requests in flight from every connection hold fewer than
//! `max_inflight_bytes` bytes (one request is always admitted when none is in flight).
//! Otherwise it is answered `Busy` at once (the client backs off and retries). Tails
//! count apart: at most [`MAX_TAILS_PER_CONN`] per connection, and a tail may not share
//! its request id with another request in flight (`BadRequest`), since the tail's
//! answers carry that id. A node that never answers a
//! request keeps its slot until the connection closes.

use super::proto::{self, ConnId, ErrorCode, Request, Response, AUTH_LEN, MAX_FRAME};
use bytes::BytesMut;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tracing::{debug, warn};
use transport::envelope::{Decoder, HEADER_LEN};

/// The largest frame payload accepted before `Hello` (and `Auth`) completed.
pub const HANDSHAKE_MAX_FRAME: u32 = 1024;

/// Most tail subscriptions one connection may hold; more are answered `Busy`.
pub const MAX_TAILS_PER_CONN: usize = 16;

/// How long a connection being closed with an error keeps draining input.
pub const LINGER: Duration = Duration::from_secs(2);

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_CONN: ConnId = 2;
/// Reads per readiness event before other connections get a turn.
const READ_BUDGET: usize = 16;
const SCRATCH: usize = 64 * 1024;

/// A request for the node (never `Hello`: the server handles it).
#[derive(Debug)]
pub struct Inbound {
    /// The connection it came on (answer to it).
    pub conn: ConnId,
    /// The client's request id (echo it).
    pub req_id: u64,
    /// The request (`Disconnected`: the connection is gone).
    pub request: Request,
}

/// What the node tells the server.
#[derive(Debug)]
pub enum Outbound {
    /// Send `response` for request `req_id` on `conn`.
    Reply {
        /// The connection.
        conn: ConnId,
        /// The request id answered.
        req_id: u64,
        /// The response.
        response: Response,
    },
    /// Close `conn` once what is queued for it is sent.
    Close {
        /// The connection.
        conn: ConnId,
    },
}

/// Configuration of the client port.
#[derive(Clone, Debug)]
pub struct ClientServerConfig {
    /// The cluster's id: a `Hello` naming another is refused.
    pub cluster_id: u64,
    /// This replica's id (sent in `HelloOk`).
    pub node: u64,
    /// Largest frame payload accepted or sent (see [`MAX_FRAME`]).
    pub max_frame: u32,
    /// Most open connections; more are refused with `Error { Busy }`.
    pub max_connections: usize,
    /// A client whose unsent responses exceed this many bytes is disconnected (keep it
    /// a few times `max_frame`: one large answer to a slow socket must fit).
    pub max_queued_bytes_per_conn: usize,
    /// The client secret: with one, every connection must prove it knows it (see
    /// [`proto`]'s client credentials) before any request. `None`: clients
    /// are not authenticated.
    pub client_secret: Option<Vec<u8>>,
    /// TLS: with a server configuration the port speaks TLS only (see
    /// [`tls`](super::tls)). `None`: plain TCP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// A connection that has not completed `Hello` (and `Auth`, and the TLS handshake)
    /// this long after connecting is refused and closed, so that idle or stalled
    /// unauthenticated connections cannot hold the connection slots.
    pub handshake_timeout: Duration,
    /// Most requests of one connection the node has not answered; beyond it, `Busy`.
    pub max_inflight_per_conn: usize,
    /// Most bytes of requests (frames) all connections have in flight at the node;
    /// beyond it, `Busy`.
    pub max_inflight_bytes: usize,
    /// After any activity, poll without sleeping for this long before blocking
    /// (`[timing] spin_us`; zero: block at once).
    pub spin: Duration,
}

impl ClientServerConfig {
    /// The defaults: [`MAX_FRAME`], 1024 connections, 64 MiB queued per connection, 64
    /// requests in flight per connection, 256 MiB of requests in flight in all.
    pub fn new(cluster_id: u64, node: u64) -> Self {
        ClientServerConfig {
            cluster_id,
            node,
            max_frame: MAX_FRAME,
            max_connections: 1024,
            max_queued_bytes_per_conn: 64 << 20,
            client_secret: None,
            tls: None,
            handshake_timeout: Duration::from_secs(10),
            max_inflight_per_conn: 64,
            max_inflight_bytes: 256 << 20,
            spin: Duration::ZERO,
        }
    }
}

enum Ctl {
    Out(Outbound),
    Shutdown,
}

/// A cloneable, thread-safe handle the node answers through.
#[derive(Clone)]
pub struct Responder {
    tx: mpsc::Sender<Ctl>,
    waker: Arc<Waker>,
    /// The port runs on the node's thread ([`ClientPort`]): it sends the queue on its
    /// next turn, so there is no thread to wake.
    inline: bool,
}

impl Responder {
    /// Queues `out` for the server thread and wakes it. Does nothing once the server
    /// has shut down.
    pub fn send(&self, out: Outbound) {
        if self.tx.send(Ctl::Out(out)).is_ok() && !self.inline {
            let _ = self.waker.wake();
        }
    }
}

/// The client port served on the caller's thread ([`ClientServer::start_inline`]):
/// the node calls [`ClientPort::turn`] after each wait and after answering, and waits
/// on [`ClientPort::fd`] together with its transport ([`transport::Transport::watch_fd`]).
pub struct ClientPort {
    worker: Worker,
    events: Events,
}

impl ClientPort {
    /// The descriptor that becomes readable when the port has work (its epoll
    /// instance).
    pub fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.worker.poll.as_raw_fd()
    }

    /// Serves whatever is ready, without waiting: accepts, reads requests (pushed to the
    /// node's queue), sends queued answers, expires handshakes.
    pub fn turn(&mut self) {
        self.worker.turn(&mut self.events, Some(Duration::ZERO));
    }

    /// Sends the answers queued since the last turn, without polling the sockets.
    pub fn send_answers(&mut self) {
        self.worker.send_answers();
    }

    /// How long the caller may wait before the next turn (zero: at once; `None`:
    /// until `fd` is readable).
    pub fn next_timeout(&self) -> Option<Duration> {
        self.worker.next_timeout()
    }
}

impl Drop for ClientPort {
    fn drop(&mut self) {
        self.worker.close_all();
    }
}

/// The running client-port server (see the module docs). Dropping it shuts it down.
pub struct ClientServer {
    addr: SocketAddr,
    responder: Responder,
    thread: Option<JoinHandle<()>>,
}

impl ClientServer {
    /// Starts the thread. `inbound` is where requests go; `wake_node` is called after
    /// pushing (it wakes the node's poll).
    pub fn start(
        listener: std::net::TcpListener,
        cfg: ClientServerConfig,
        inbound: mpsc::Sender<Inbound>,
        wake_node: Arc<dyn Fn() + Send + Sync>,
    ) -> io::Result<ClientServer> {
        let (worker, responder) = Self::worker(listener, cfg, inbound, wake_node, false)?;
        let addr = worker.listener.local_addr()?;
        let thread =
            std::thread::Builder::new().name(format!("client-port-{}", addr.port())).spawn(move || worker.run())?;
        Ok(ClientServer { addr, responder, thread: Some(thread) })
    }

    /// The same port served on the caller's thread: no thread of its own, no wake-ups
    /// between it and the node (two fewer per request). The caller drives the returned
    /// [`ClientPort`].
    pub fn start_inline(
        listener: std::net::TcpListener,
        cfg: ClientServerConfig,
        inbound: mpsc::Sender<Inbound>,
    ) -> io::Result<(ClientServer, ClientPort)> {
        let (worker, responder) = Self::worker(listener, cfg, inbound, Arc::new(|| {}), true)?;
        let addr = worker.listener.local_addr()?;
        let port = ClientPort { worker, events: Events::with_capacity(256) };
        Ok((ClientServer { addr, responder, thread: None }, port))
    }

    fn worker(
        listener: std::net::TcpListener,
        cfg: ClientServerConfig,
        inbound: mpsc::Sender<Inbound>,
        wake_node: Arc<dyn Fn() + Send + Sync>,
        inline: bool,
    ) -> io::Result<(Worker, Responder)> {
        listener.set_nonblocking(true)?;
        let mut listener = TcpListener::from_std(listener);
        let poll = Poll::new()?;
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, rx) = mpsc::channel();
        let worker = Worker {
            decoder: Decoder::new(cfg.max_frame),
            hello_decoder: Decoder::new(HANDSHAKE_MAX_FRAME.min(cfg.max_frame)),
            cfg,
            poll,
            listener,
            conns: HashMap::new(),
            next_id: FIRST_CONN,
            inbound,
            wake_node,
            pushed: false,
            node_gone: false,
            rx,
            scratch: vec![0; SCRATCH],
            again: Vec::new(),
            inflight_bytes: 0,
            last_busy_log: None,
            busy_since_log: 0,
            active_at: Instant::now(),
            busy: false,
        };
        Ok((worker, Responder { tx, waker, inline }))
    }

    /// The address the client port listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// A cloneable, thread-safe handle the node uses to answer (pushes to a queue and
    /// wakes the server thread via `mio::Waker`).
    pub fn responder(&self) -> Responder {
        self.responder.clone()
    }

    /// Stops the thread, closes every connection and the listener, joins.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.responder.tx.send(Ctl::Shutdown);
            let _ = self.responder.waker.wake();
            if t.join().is_err() {
                warn!("client-port thread panicked");
            }
        }
    }
}

impl Drop for ClientServer {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    rbuf: BytesMut,
    out: Vec<u8>,
    written: usize,
    /// Completed `Hello` (and `Auth` when a client secret is set): the node may know
    /// this connection.
    hello: bool,
    /// The nonce of the challenge sent, until the client answers it.
    challenge: Option<[u8; AUTH_LEN]>,
    /// Until `hello`: the connection is refused and closed if it is not done by then.
    hello_by: Option<Instant>,
    /// Requests passed to the node and not answered yet: (request id, frame bytes), in
    /// order (ids may repeat; an answer settles the oldest with its id).
    inflight: Vec<(u64, usize)>,
    /// Request ids of this connection's tails.
    tails: Vec<u64>,
    /// Being closed: flush, shut down writing, drain input until EOF or this deadline.
    closing: Option<Instant>,
    write_shut: bool,
    /// The TLS session, when the port speaks TLS (`out` and `rbuf` hold plaintext).
    tls: Option<Box<rustls::ServerConnection>>,
}

impl Conn {
    fn queued(&self) -> usize {
        self.out.len() - self.written
    }

    /// Whether a flush has something to do (plaintext queued, or TLS records).
    fn needs_flush(&self) -> bool {
        self.queued() > 0 || self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// Reads plaintext: `Ok(0)` at the end, `WouldBlock` when nothing is there now.
    fn read_plain(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = self.tls.as_mut() else {
            return self.stream.read(buf);
        };
        for _ in 0..READ_BUDGET {
            match tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if tls.read_tls(&mut self.stream)? == 0 {
                return Ok(0);
            }
            if let Err(e) = tls.process_new_packets() {
                // Best effort: tell the client why (an alert) before closing.
                let _ = tls.write_tls(&mut self.stream);
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}")));
            }
        }
        Err(io::ErrorKind::WouldBlock.into())
    }

    /// Writes what it can. `Err`: the connection is broken.
    fn flush(&mut self) -> io::Result<()> {
        if let Some(tls) = self.tls.as_mut() {
            // Plaintext into the session (it bounds what it buffers), records out.
            while self.written < self.out.len() {
                match tls.writer().write(&self.out[self.written..]) {
                    Ok(0) => break,
                    Ok(n) => self.written += n,
                    Err(e) => return Err(e),
                }
            }
            while tls.wants_write() {
                match tls.write_tls(&mut self.stream) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        } else {
            while self.written < self.out.len() {
                match self.stream.write(&self.out[self.written..]) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => self.written += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        if self.written == self.out.len() {
            self.out.clear();
            self.written = 0;
            if self.closing.is_some() && !self.write_shut {
                if let Some(tls) = self.tls.as_mut() {
                    tls.send_close_notify();
                    while tls.wants_write() {
                        if tls.write_tls(&mut self.stream).is_err() {
                            break;
                        }
                    }
                }
                self.write_shut = true;
                let _ = self.stream.shutdown(Shutdown::Write);
            }
        } else if self.written > (1 << 20) && self.written * 2 > self.out.len() {
            self.out.drain(..self.written);
            self.written = 0;
        }
        Ok(())
    }
}

enum Fate {
    Keep,
    Close,
}

struct Worker {
    cfg: ClientServerConfig,
    decoder: Decoder,
    /// For connections that have not completed `Hello`.
    hello_decoder: Decoder,
    poll: Poll,
    listener: TcpListener,
    conns: HashMap<ConnId, Conn>,
    next_id: ConnId,
    inbound: mpsc::Sender<Inbound>,
    wake_node: Arc<dyn Fn() + Send + Sync>,
    pushed: bool,
    node_gone: bool,
    rx: mpsc::Receiver<Ctl>,
    scratch: Vec<u8>,
    /// Connections that used their read budget and may have more to read.
    again: Vec<ConnId>,
    /// Bytes of requests in flight at the node, over all connections.
    inflight_bytes: usize,
    /// When a `Busy` refusal was last logged, and how many since (logged once a second).
    last_busy_log: Option<Instant>,
    busy_since_log: u64,
    /// The last activity (for the spin window).
    active_at: Instant,
    /// The last poll filled the events buffer.
    busy: bool,
}

impl Worker {
    fn run(mut self) {
        let mut events = Events::with_capacity(256);
        while self.turn(&mut events, self.next_timeout()) {}
        self.close_all();
        debug!("client port {:?} stopped", self.listener.local_addr());
    }

    /// How long the next poll may wait: zero while connections have more to read or
    /// the spin window is open, else until the next handshake or linger deadline.
    fn next_timeout(&self) -> Option<Duration> {
        let spinning = !self.cfg.spin.is_zero() && self.active_at.elapsed() < self.cfg.spin;
        if self.again.is_empty() && !spinning && !self.busy {
            self.conns
                .values()
                .filter_map(|c| c.closing.or(c.hello_by))
                .min()
                .map(|d| d.saturating_duration_since(Instant::now()))
        } else {
            Some(Duration::ZERO)
        }
    }

    /// One turn: waits up to `timeout` for socket events, serves them, sends the
    /// node's queued answers, and expires handshakes and lingering connections.
    /// Returns false once asked to shut down.
    fn turn(&mut self, events: &mut Events, timeout: Option<Duration>) -> bool {
        if let Err(e) = self.poll.poll(events, timeout) {
            if e.kind() != io::ErrorKind::Interrupted {
                warn!("client port: poll failed: {e}; stopping");
                return false;
            }
        }
        if !events.is_empty() {
            self.active_at = Instant::now();
        }
        // A full buffer may have left events behind: look again at once.
        self.busy = events.iter().count() >= events.capacity();
        for ev in events.iter() {
            match ev.token() {
                LISTENER => self.accept(),
                WAKER => {}
                Token(t) => {
                    let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
                    self.on_conn(t as ConnId, readable, ev.is_writable());
                }
            }
        }
        for id in std::mem::take(&mut self.again) {
            self.on_conn(id, true, false);
        }
        if !self.send_answers() {
            return false;
        }
        let now = Instant::now();
        let expired: Vec<ConnId> =
            self.conns.iter().filter(|(_, c)| c.closing.is_some_and(|d| d <= now)).map(|(id, _)| *id).collect();
        for id in expired {
            if let Some(c) = self.conns.remove(&id) {
                debug!("client {}: linger time over, closing", c.peer);
                self.finish(id, c);
            }
        }
        let slow: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.closing.is_none() && c.hello_by.is_some_and(|d| d <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in slow {
            if let Some(mut c) = self.conns.remove(&id) {
                let t = self.cfg.handshake_timeout;
                let (code, msg) = if c.challenge.is_some() {
                    (ErrorCode::Unauthorized, format!("unauthorized: no Auth within {t:?} of the challenge"))
                } else {
                    (ErrorCode::BadRequest, format!("no Hello within {t:?} of connecting"))
                };
                self.fail(&mut c, 0, code, msg);
                c.hello_by = None;
                match c.flush() {
                    Ok(()) => {
                        self.conns.insert(id, c);
                    }
                    Err(_) => self.finish(id, c),
                }
            }
        }
        self.wake();
        true
    }

    /// Sends the answers the node queued. Returns false once asked to shut down.
    fn send_answers(&mut self) -> bool {
        loop {
            match self.rx.try_recv() {
                Ok(Ctl::Out(out)) => {
                    self.active_at = Instant::now();
                    self.on_out(out)
                }
                Ok(Ctl::Shutdown) | Err(mpsc::TryRecvError::Disconnected) => return false,
                Err(mpsc::TryRecvError::Empty) => return true,
            }
        }
    }

    /// Closes every connection (each reported to the node as `Disconnected`).
    fn close_all(&mut self) {
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            if let Some(c) = self.conns.remove(&id) {
                self.finish(id, c);
            }
        }
        self.wake();
    }

    fn wake(&mut self) {
        if self.pushed {
            self.pushed = false;
            (self.wake_node)();
        }
    }

    fn push(&mut self, conn: ConnId, req_id: u64, request: Request) {
        let msg = Inbound { conn, req_id, request };
        if self.inbound.send(msg).is_err() {
            if !self.node_gone {
                self.node_gone = true;
                warn!("client port: the node's request queue is closed; requests are dropped");
            }
        } else {
            self.pushed = true;
        }
    }

    fn open_conns(&self) -> usize {
        self.conns.values().filter(|c| c.closing.is_none()).count()
    }

    fn accept(&mut self) {
        loop {
            let (mut stream, peer) = match self.listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("client port: accept failed: {e}");
                    return;
                }
            };
            let open = self.open_conns();
            if self.conns.len() >= 2 * self.cfg.max_connections + 16 {
                warn!(
                    "client {peer}: refused, {} connections open or closing (limit {})",
                    self.conns.len(),
                    self.cfg.max_connections
                );
                drop(stream);
                continue;
            }
            if let Err(e) = stream.set_nodelay(true) {
                debug!("client {peer}: TCP_NODELAY: {e}");
            }
            let id = self.next_id;
            self.next_id += 1;
            if let Err(e) =
                self.poll.registry().register(&mut stream, Token(id as usize), Interest::READABLE | Interest::WRITABLE)
            {
                warn!("client {peer}: cannot register: {e}");
                continue;
            }
            let mut c = Conn {
                stream,
                peer,
                rbuf: BytesMut::new(),
                out: Vec::new(),
                written: 0,
                hello: false,
                challenge: None,
                hello_by: Some(Instant::now() + self.cfg.handshake_timeout),
                inflight: Vec::new(),
                tails: Vec::new(),
                closing: None,
                write_shut: false,
                tls: None,
            };
            if let Some(tcfg) = &self.cfg.tls {
                match rustls::ServerConnection::new(tcfg.clone()) {
                    Ok(t) => c.tls = Some(Box::new(t)),
                    Err(e) => {
                        warn!("client {peer}: cannot start a TLS session: {e}; closing");
                        let _ = self.poll.registry().deregister(&mut c.stream);
                        continue;
                    }
                }
            }
            if open >= self.cfg.max_connections {
                let msg = format!("too many connections ({open} open, limit {})", self.cfg.max_connections);
                self.fail(&mut c, 0, ErrorCode::Busy, msg);
                match c.flush() {
                    Ok(()) => {
                        self.conns.insert(id, c);
                    }
                    Err(_) => self.finish(id, c),
                }
                continue;
            }
            debug!("client {peer}: connected as conn {id}");
            self.conns.insert(id, c);
        }
    }

    /// Sends an error frame, logs, and starts closing `c`.
    fn fail(&mut self, c: &mut Conn, req_id: u64, code: ErrorCode, reason: String) {
        warn!(
            peer = %c.peer,
            "client {}: {reason}; closing the connection",
            c.peer
        );
        let resp = Response::Error { code, message: reason };
        if proto::encode_response(req_id, &resp, &mut c.out).is_err() {
            debug!("client {}: cannot encode the error frame", c.peer);
        }
        c.rbuf.clear();
        c.closing = Some(Instant::now() + LINGER);
    }

    fn on_conn(&mut self, id: ConnId, readable: bool, writable: bool) {
        let Some(mut c) = self.conns.remove(&id) else {
            return;
        };
        let fate = self.drive(id, &mut c, readable, writable);
        match fate {
            Fate::Keep => {
                self.conns.insert(id, c);
            }
            Fate::Close => self.finish(id, c),
        }
    }

    fn drive(&mut self, id: ConnId, c: &mut Conn, readable: bool, writable: bool) -> Fate {
        if readable {
            let mut reads = 0;
            loop {
                if reads == READ_BUDGET {
                    self.again.push(id);
                    break;
                }
                reads += 1;
                match c.read_plain(&mut self.scratch) {
                    Ok(0) => {
                        if c.closing.is_none() && c.challenge.is_some() {
                            warn!(
                                peer = %c.peer,
                                "client {}: closed without authenticating (no client credential presented)",
                                c.peer
                            );
                        } else if c.closing.is_none() && !c.rbuf.is_empty() {
                            warn!(
                                peer = %c.peer,
                                "client {}: connection ended inside a frame ({} bytes of it received); closing",
                                c.peer,
                                c.rbuf.len()
                            );
                        } else {
                            debug!("client {}: closed by the client", c.peer);
                        }
                        // Best effort: what is already queued (a client may half-close
                        // and still read; answers the node has yet to give are lost).
                        let _ = c.flush();
                        return Fate::Close;
                    }
                    Ok(n) => {
                        if c.closing.is_some() {
                            continue; // draining
                        }
                        c.rbuf.extend_from_slice(&self.scratch[..n]);
                        self.frames(id, c);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        if c.closing.is_none() {
                            warn!(peer = %c.peer, "client {}: read error: {e}; closing", c.peer);
                        }
                        return Fate::Close;
                    }
                }
            }
        }
        if writable || c.needs_flush() {
            if let Err(e) = c.flush() {
                debug!("client {}: write error: {e}; closing", c.peer);
                return Fate::Close;
            }
        }
        Fate::Keep
    }

    /// Decodes and dispatches every whole frame in `c.rbuf`.
    fn frames(&mut self, id: ConnId, c: &mut Conn) {
        while c.closing.is_none() {
            let decoder = if c.hello { &self.decoder } else { &self.hello_decoder };
            let frame = match decoder.decode(&mut c.rbuf) {
                Ok(Some(f)) => f,
                Ok(None) => return,
                Err(e) => {
                    let code = match e {
                        transport::envelope::FrameError::TooLarge { .. } => ErrorCode::TooLarge,
                        _ => ErrorCode::BadRequest,
                    };
                    self.fail(c, 0, code, format!("bad frame: {e}"));
                    return;
                }
            };
            let (req_id, req) = match proto::decode_request(&frame) {
                Ok(x) => x,
                Err(e) => {
                    self.fail(c, 0, ErrorCode::BadRequest, format!("bad request: {e}"));
                    return;
                }
            };
            match req {
                Request::Hello { cluster_id } => {
                    if c.hello || c.challenge.is_some() {
                        self.fail(c, req_id, ErrorCode::BadRequest, "second Hello".into());
                    } else if cluster_id != self.cfg.cluster_id {
                        let msg = format!("cluster id {cluster_id}, this cluster is {}", self.cfg.cluster_id);
                        self.fail(c, req_id, ErrorCode::WrongCluster, msg);
                    } else if self.cfg.client_secret.is_some() {
                        let mut nonce = [0u8; AUTH_LEN];
                        if let Err(e) = getrandom::fill(&mut nonce) {
                            let msg = format!("no randomness for a challenge: {e}");
                            self.fail(c, req_id, ErrorCode::Internal, msg);
                            continue;
                        }
                        c.challenge = Some(nonce);
                        let _ = proto::encode_response(req_id, &Response::Challenge { nonce }, &mut c.out);
                    } else {
                        c.hello = true;
                        c.hello_by = None;
                        let ok = Response::HelloOk { node: self.cfg.node };
                        let _ = proto::encode_response(req_id, &ok, &mut c.out);
                    }
                }
                Request::Auth { proof } => match (c.challenge.take(), &self.cfg.client_secret) {
                    (Some(nonce), Some(secret)) => {
                        if proto::verify_client_proof(secret, self.cfg.cluster_id, &nonce, &proof) {
                            debug!("client {}: authenticated", c.peer);
                            c.hello = true;
                            c.hello_by = None;
                            let ok = Response::HelloOk { node: self.cfg.node };
                            let _ = proto::encode_response(req_id, &ok, &mut c.out);
                        } else {
                            let msg = "authentication failed: the proof does not match the client secret".to_string();
                            self.fail(c, req_id, ErrorCode::Unauthorized, msg);
                        }
                    }
                    _ => self.fail(c, req_id, ErrorCode::BadRequest, "Auth without a challenge".into()),
                },
                other if c.challenge.is_some() => {
                    let msg = format!("unauthorized: {other:?} before authenticating (no client credential presented)");
                    self.fail(c, req_id, ErrorCode::Unauthorized, msg);
                }
                other if !c.hello => {
                    let msg = format!("{other:?} before Hello");
                    self.fail(c, req_id, ErrorCode::BadRequest, msg);
                }
                other => self.admit(id, c, req_id, other, HEADER_LEN + frame.payload.len()),
            }
        }
    }

    /// Passes a request to the node, or answers it `Busy` (see the module docs).
    fn admit(&mut self, id: ConnId, c: &mut Conn, req_id: u64, req: Request, size: usize) {
        let is_tail = matches!(req, Request::Tail { .. });
        if c.tails.contains(&req_id) || (is_tail && c.inflight.iter().any(|(r, _)| *r == req_id)) {
            let message = format!("request id {req_id} is in use by a tail or a request in flight");
            debug!("client {}: {message}", c.peer);
            let _ =
                proto::encode_response(req_id, &Response::Error { code: ErrorCode::BadRequest, message }, &mut c.out);
            return;
        }
        let busy = if is_tail {
            (c.tails.len() >= MAX_TAILS_PER_CONN)
                .then(|| format!("busy: {} tails on this connection (limit {MAX_TAILS_PER_CONN})", c.tails.len()))
        } else if c.inflight.len() >= self.cfg.max_inflight_per_conn {
            Some(format!(
                "busy: {} requests in flight on this connection (limit {}); retry",
                c.inflight.len(),
                self.cfg.max_inflight_per_conn
            ))
        } else if self.inflight_bytes > 0 && self.inflight_bytes + size > self.cfg.max_inflight_bytes {
            Some(format!(
                "busy: {} bytes of requests in flight at this replica (limit {}); retry",
                self.inflight_bytes, self.cfg.max_inflight_bytes
            ))
        } else {
            None
        };
        if let Some(message) = busy {
            self.busy_since_log += 1;
            if self.last_busy_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                warn!(
                    "client port: overloaded, {} request(s) answered Busy in the last second (latest: client {}: {message})",
                    self.busy_since_log, c.peer
                );
                self.last_busy_log = Some(Instant::now());
                self.busy_since_log = 0;
            }
            let _ = proto::encode_response(req_id, &Response::Error { code: ErrorCode::Busy, message }, &mut c.out);
            return;
        }
        if is_tail {
            c.tails.push(req_id);
        } else {
            c.inflight.push((req_id, size));
            self.inflight_bytes += size;
        }
        self.push(id, req_id, req);
    }

    fn on_out(&mut self, out: Outbound) {
        match out {
            Outbound::Reply { conn, req_id, response } => {
                let Some(mut c) = self.conns.remove(&conn) else {
                    return;
                };
                if let Some(i) = c.inflight.iter().position(|(r, _)| *r == req_id) {
                    self.inflight_bytes -= c.inflight.remove(i).1;
                }
                if c.closing.is_some() {
                    self.conns.insert(conn, c);
                    return;
                }
                let start = c.out.len();
                let too_large = match proto::encode_response(req_id, &response, &mut c.out) {
                    Ok(()) => c.out.len() - start - HEADER_LEN > self.cfg.max_frame as usize,
                    Err(_) => true,
                };
                if too_large {
                    let len = c.out.len() - start;
                    c.out.truncate(start);
                    warn!(
                        "client {}: response {response:?} of {len} bytes exceeds the frame limit {}; sending an error instead",
                        c.peer, self.cfg.max_frame
                    );
                    let err = Response::Error {
                        code: ErrorCode::TooLarge,
                        message: format!("response of {len} bytes exceeds the frame limit of {}", self.cfg.max_frame),
                    };
                    let _ = proto::encode_response(req_id, &err, &mut c.out);
                }
                if let Err(e) = c.flush() {
                    debug!("client {}: write error: {e}; closing", c.peer);
                    self.finish(conn, c);
                    return;
                }
                if c.queued() > self.cfg.max_queued_bytes_per_conn {
                    warn!(
                        peer = %c.peer,
                        "client {}: slow reader, {} response bytes queued (limit {}); closing",
                        c.peer,
                        c.queued(),
                        self.cfg.max_queued_bytes_per_conn
                    );
                    self.finish(conn, c);
                    return;
                }
                self.conns.insert(conn, c);
            }
            Outbound::Close { conn } => {
                let Some(mut c) = self.conns.remove(&conn) else {
                    return;
                };
                if c.closing.is_none() {
                    debug!("client {}: closed by the node", c.peer);
                    c.closing = Some(Instant::now() + LINGER);
                }
                match c.flush() {
                    Ok(()) => {
                        self.conns.insert(conn, c);
                    }
                    Err(_) => self.finish(conn, c),
                }
            }
        }
    }

    /// Drops a connection that is out of the map; tells the node if it knew it.
    fn finish(&mut self, id: ConnId, mut c: Conn) {
        self.inflight_bytes -= c.inflight.iter().map(|(_, n)| n).sum::<usize>();
        let _ = self.poll.registry().deregister(&mut c.stream);
        if c.hello {
            self.push(id, 0, Request::Disconnected);
        }
    }
}
