//! The client side of replog: the wire protocol ([`proto`]), the client-port server a
//! replica runs ([`server`]) and the blocking Rust client library ([`Client`]).
//!
//! ```no_run
//! use replog::client::{Client, ClientConfig};
//! let cfg = ClientConfig::new(7, vec!["127.0.0.1:7000".parse().unwrap()]);
//! let mut c = Client::connect(cfg)?;
//! let pos = c.append("hello")?;
//! for (p, e) in c.read(pos, 10)? {
//!     println!("{p}: {e:?}");
//! }
//! # Ok::<(), replog::client::ClientError>(())
//! ```
//!
//! # Retries and leader discovery
//! Appends carry the client's id and a sequence number per entry, assigned once: a retry
//! (after a timeout, a dropped connection or a leader change) resends the same
//! `(client, seq)` pairs, and the service applies each pair once. A `Redirect` with an
//! address sends the client there (redirects are bounded, and do not use up `retries`);
//! one without moves on to the next configured server after a short back-off. A
//! connection error, a timeout, `Busy` or `Unavailable` counts as a failure: the client
//! backs off (10 ms doubling up to 100 ms) and tries again, on the next server unless
//! the answer was `Busy`, at most `retries` times.
//!
//! # Credentials
//! A cluster whose replicas have a client secret (`[security] client_secret_file`)
//! serves only clients that prove they know it: set [`ClientConfig::secret`] (see
//! [`read_secret_file`]). A client without one gets [`ClientError::CredentialRequired`],
//! one with a wrong secret [`ClientError::Unauthorized`]; neither is retried.

pub mod proto;
pub mod server;
pub mod tls;

pub use proto::{ConnId, ErrorCode, MemberOp, PeerStatus, ProtoError, Request, Response, Status, MAX_FRAME};
pub use server::{ClientServer, ClientServerConfig, Inbound, Outbound, Responder};
pub use tls::{TlsClientConfig, TlsError};

use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use transport::envelope::{Decoder, HEADER_LEN};

/// Polls `s` without blocking (`MSG_DONTWAIT`) for up to `spin`: the bytes read (0: the
/// peer closed), or `None` if nothing came (or an error, which the blocking read that
/// follows reports).
fn spin_recv(s: &TcpStream, buf: &mut [u8], spin: Duration) -> Option<usize> {
    use std::os::fd::AsRawFd;
    let t0 = Instant::now();
    loop {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes; the descriptor is the
        // stream's own, open for the duration of the call.
        let n = unsafe { libc::recv(s.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Some(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::Interrupted {
            return None;
        }
        if t0.elapsed() >= spin {
            return None;
        }
        std::hint::spin_loop();
    }
}

/// How to reach a cluster.
#[derive(Clone)]
pub struct ClientConfig {
    /// The cluster's id (a server of another cluster refuses the connection).
    pub cluster_id: u64,
    /// Client addresses of the replicas, tried in turn.
    pub servers: Vec<SocketAddr>,
    /// Bound on connecting and on waiting for each answer.
    pub timeout: Duration,
    /// How many failed attempts a request may retry.
    pub retries: u32,
    /// The client secret, for a cluster that requires client credentials (`None`: present
    /// none; a server that requires one then refuses with [`ClientError::CredentialRequired`]).
    pub secret: Option<Vec<u8>>,
    /// Speak TLS, verifying the servers' certificates (`None`: plain TCP).
    pub tls: Option<TlsClientConfig>,
    /// Spin-then-block: wait for an answer by polling the socket without sleeping for
    /// this long before blocking (plain TCP only; zero: block at once). Saves a wake-up
    /// per request where a core is free; costs CPU everywhere.
    pub spin: Duration,
}

impl ClientConfig {
    /// `servers` of cluster `cluster_id` with a 5 s timeout and 30 retries (with the
    /// backoff capped at 100 ms, enough to ride out a leader election).
    pub fn new(cluster_id: u64, servers: Vec<SocketAddr>) -> Self {
        ClientConfig {
            cluster_id,
            servers,
            timeout: Duration::from_secs(5),
            retries: 30,
            secret: None,
            tls: None,
            spin: Duration::ZERO,
        }
    }
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("cluster_id", &self.cluster_id)
            .field("servers", &self.servers)
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .finish()
    }
}

/// Reads a secret file: its bytes with surrounding whitespace removed (the format
/// `replog up` writes and the replicas' `client_secret_file` reads). An unreadable or
/// empty file is [`ClientError::SecretFile`].
pub fn read_secret_file(path: &Path) -> Result<Vec<u8>, ClientError> {
    let bytes = std::fs::read(path)
        .map_err(|e| ClientError::SecretFile { path: path.to_path_buf(), detail: format!("cannot read it: {e}") })?;
    let trimmed = bytes.trim_ascii();
    if trimmed.is_empty() {
        return Err(ClientError::SecretFile { path: path.to_path_buf(), detail: "it is empty".into() });
    }
    Ok(trimmed.to_vec())
}

/// What went wrong, and where.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The configuration lists no server.
    #[error("no servers configured")]
    NoServers,
    /// Could not open a connection.
    #[error("connecting to {server}: {source}")]
    Connect {
        /// The server.
        server: SocketAddr,
        /// The cause.
        source: io::Error,
    },
    /// Reading or writing failed.
    #[error("{op} on {server}: {source}")]
    Io {
        /// The server.
        server: SocketAddr,
        /// What was being done.
        op: &'static str,
        /// The cause.
        source: io::Error,
    },
    /// No answer in time.
    #[error("{op} on {server}: no answer within {timeout:?}")]
    Timeout {
        /// The server.
        server: SocketAddr,
        /// What was being done.
        op: &'static str,
        /// The bound that expired.
        timeout: Duration,
    },
    /// The server closed the connection.
    #[error("{server} closed the connection during {op}")]
    Closed {
        /// The server.
        server: SocketAddr,
        /// What was being done.
        op: &'static str,
    },
    /// The server sent a frame that does not decode.
    #[error("bad frame from {server}: {source}")]
    Frame {
        /// The server.
        server: SocketAddr,
        /// The decoding error.
        source: ProtoError,
    },
    /// The server answered something that makes no sense for the request.
    #[error("protocol violation by {server}: {detail}")]
    Protocol {
        /// The server.
        server: SocketAddr,
        /// What was wrong.
        detail: String,
    },
    /// The server refused the request.
    #[error("{server} refused {op}: {code}: {message}")]
    Server {
        /// The server.
        server: SocketAddr,
        /// What was being done.
        op: &'static str,
        /// Why (see [`ErrorCode`]).
        code: ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// The request is larger than the frame limit.
    #[error("{op} of {len} bytes exceeds the frame limit of {max}")]
    TooLarge {
        /// What was being done.
        op: &'static str,
        /// Its encoded length.
        len: usize,
        /// The limit.
        max: u32,
    },
    /// The server requires a client credential and this client has none.
    #[error("{server} requires a client credential and none is configured (give the client secret file)")]
    CredentialRequired {
        /// The server.
        server: SocketAddr,
    },
    /// The server refused this client's credential.
    #[error("{server} refused the client credential: {message}")]
    Unauthorized {
        /// The server.
        server: SocketAddr,
        /// The server's explanation.
        message: String,
    },
    /// The server speaks TLS and this client does not.
    #[error("{server} speaks TLS on its client port and this client does not (configure TLS: a CA file)")]
    TlsRequired {
        /// The server.
        server: SocketAddr,
    },
    /// A secret file cannot be used.
    #[error("client secret file {}: {detail}", path.display())]
    SecretFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Retries (or redirects) used up.
    #[error("{op}: gave up after {attempts} attempt(s); last error: {last}")]
    Exhausted {
        /// What was being done.
        op: &'static str,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: Box<ClientError>,
    },
}

impl ClientError {
    /// Whether retrying (elsewhere, later) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Connect { .. }
            | ClientError::Io { .. }
            | ClientError::Timeout { .. }
            | ClientError::Closed { .. }
            | ClientError::Frame { .. }
            | ClientError::Protocol { .. } => true,
            ClientError::Server { code, .. } => {
                matches!(code, ErrorCode::Busy | ErrorCode::Unavailable)
            }
            ClientError::NoServers
            | ClientError::TooLarge { .. }
            | ClientError::Exhausted { .. }
            | ClientError::CredentialRequired { .. }
            | ClientError::Unauthorized { .. }
            | ClientError::SecretFile { .. }
            | ClientError::TlsRequired { .. } => false,
        }
    }
}

/// Wait before the next attempt: 10 ms doubling, capped at 100 ms (a leader election
/// takes a few election timeouts; a longer wait only adds to the failover a client sees).
fn backoff(failures: u32) -> Duration {
    Duration::from_millis((10u64 << failures.min(6).saturating_sub(1)).min(100))
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A fresh client id: time, process id and a per-process counter, mixed. Never 0.
pub fn new_client_id() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let id = splitmix64(t ^ splitmix64((std::process::id() as u64) << 32 | (n & 0xffff_ffff)));
    id.max(1)
}

/// A connection's byte stream: plain TCP or TLS over it.
enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => &t.sock,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(t) => t.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(t) => t.flush(),
        }
    }
}

/// One connection that completed Hello.
struct Conn {
    stream: Stream,
    server: SocketAddr,
    rbuf: BytesMut,
    decoder: Decoder,
    scratch: Vec<u8>,
    next_req: u64,
    max_frame: u32,
    /// The replica's id from `HelloOk`.
    node: u64,
    /// See [`ClientConfig::spin`].
    spin: Duration,
}

impl Conn {
    fn open(
        server: SocketAddr,
        cluster_id: u64,
        secret: Option<&[u8]>,
        tls: Option<&TlsClientConfig>,
        timeout: Duration,
        max_frame: u32,
    ) -> Result<Conn, ClientError> {
        let tcp =
            TcpStream::connect_timeout(&server, timeout).map_err(|source| ClientError::Connect { server, source })?;
        let _ = tcp.set_nodelay(true);
        let stream = match tls {
            None => Stream::Plain(tcp),
            Some(t) => {
                // Bound the handshake (it runs inside the first write).
                let _ = tcp.set_read_timeout(Some(timeout));
                let conn = rustls::ClientConnection::new(t.config.clone(), t.server_name.clone()).map_err(|e| {
                    ClientError::Protocol { server, detail: format!("cannot start a TLS session: {e}") }
                })?;
                Stream::Tls(Box::new(rustls::StreamOwned::new(conn, tcp)))
            }
        };
        let mut c = Conn {
            stream,
            server,
            rbuf: BytesMut::new(),
            decoder: Decoder::new(max_frame),
            scratch: vec![0; 64 * 1024],
            next_req: 1,
            max_frame,
            node: 0,
            spin: Duration::ZERO,
        };
        let mut answer = c.call(&Request::Hello { cluster_id }, "hello", Some(timeout))?;
        if let Response::Challenge { nonce } = answer {
            let Some(secret) = secret else {
                return Err(ClientError::CredentialRequired { server });
            };
            let proof = proto::client_proof(secret, cluster_id, &nonce);
            answer = c.call(&Request::Auth { proof }, "authenticate", Some(timeout))?;
        }
        match answer {
            Response::HelloOk { node } => {
                c.node = node;
                Ok(c)
            }
            Response::Error { code: ErrorCode::Unauthorized, message } => {
                Err(ClientError::Unauthorized { server, message })
            }
            Response::Error { code, message } => Err(ClientError::Server { server, op: "hello", code, message }),
            other => Err(ClientError::Protocol { server, detail: format!("answered Hello with {other:?}") }),
        }
    }

    fn send(&mut self, req: &Request, op: &'static str) -> Result<u64, ClientError> {
        let id = self.next_req;
        self.next_req += 1;
        let mut out = Vec::new();
        proto::encode_request(id, req, &mut out)
            .map_err(|e| ClientError::Protocol { server: self.server, detail: format!("cannot encode {op}: {e}") })?;
        if out.len() - HEADER_LEN > self.max_frame as usize {
            return Err(ClientError::TooLarge { op, len: out.len() - HEADER_LEN, max: self.max_frame });
        }
        let server = self.server;
        let _ = self.stream.tcp().set_write_timeout(None);
        self.stream.write_all(&out).map_err(|source| ClientError::Io { server, op, source })?;
        Ok(id)
    }

    /// Reads one response; waits at most `timeout` (`None`: forever).
    fn recv(&mut self, op: &'static str, timeout: Option<Duration>) -> Result<(u64, Response), ClientError> {
        let server = self.server;
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            match self.decoder.decode(&mut self.rbuf) {
                Ok(Some(frame)) => {
                    return proto::decode_response(&frame).map_err(|source| ClientError::Frame { server, source })
                }
                Ok(None) => {}
                Err(transport::envelope::FrameError::BadMagic(m))
                    if matches!(self.stream, Stream::Plain(_)) && matches!(m, [0x15 | 0x16, 0x03, _, _]) =>
                {
                    // A TLS record (alert or handshake) where a frame should be.
                    return Err(ClientError::TlsRequired { server });
                }
                Err(e) => return Err(ClientError::Frame { server, source: e.into() }),
            }
            let wait = match deadline {
                None => None,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(ClientError::Timeout { server, op, timeout: timeout.unwrap_or_default() });
                    }
                    Some(left)
                }
            };
            if let (false, Stream::Plain(s)) = (self.spin.is_zero(), &self.stream) {
                if let Some(n) = spin_recv(s, &mut self.scratch, self.spin) {
                    if n == 0 {
                        return Err(ClientError::Closed { server, op });
                    }
                    self.rbuf.extend_from_slice(&self.scratch[..n]);
                    continue;
                }
            }
            let _ = self.stream.tcp().set_read_timeout(wait);
            match self.stream.read(&mut self.scratch) {
                Ok(0) => return Err(ClientError::Closed { server, op }),
                Ok(n) => self.rbuf.extend_from_slice(&self.scratch[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => {
                    // Loop: the deadline check above reports the timeout.
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(ClientError::Io { server, op, source }),
            }
        }
    }

    /// Sends `req` and waits for its answer (a connection-level error, with request id
    /// 0, also answers it).
    fn call(&mut self, req: &Request, op: &'static str, timeout: Option<Duration>) -> Result<Response, ClientError> {
        let id = self.send(req, op)?;
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let (rid, resp) = self.recv(op, left)?;
            if rid == id || (rid == 0 && matches!(resp, Response::Error { .. })) {
                return Ok(resp);
            }
            // An answer to an earlier request we stopped waiting for: skip it.
        }
    }
}

/// A blocking client of a replog cluster (see the module docs).
pub struct Client {
    cfg: ClientConfig,
    conn: Option<Conn>,
    /// Index of the configured server to try next.
    next_server: usize,
    /// The leader's address learned from a redirect.
    hint: Option<SocketAddr>,
    client_id: u64,
    next_seq: u64,
    max_frame: u32,
}

impl Client {
    /// Connects to the first configured server that answers (trying each in turn).
    pub fn connect(cfg: ClientConfig) -> Result<Client, ClientError> {
        if cfg.servers.is_empty() {
            return Err(ClientError::NoServers);
        }
        let mut c = Client {
            cfg,
            conn: None,
            next_server: 0,
            hint: None,
            client_id: new_client_id(),
            next_seq: 1,
            max_frame: MAX_FRAME,
        };
        let mut last = None;
        let n = c.cfg.servers.len();
        for _ in 0..n {
            match c.ensure_conn() {
                Ok(()) => return Ok(c),
                Err(e) => {
                    if !e.is_retryable() {
                        return Err(e);
                    }
                    last = Some(e);
                    c.advance();
                }
            }
        }
        Err(ClientError::Exhausted {
            op: "connect",
            attempts: n as u32,
            last: Box::new(last.expect("at least one server")),
        })
    }

    /// This client's id (the `client` of its appends).
    pub fn client_id(&self) -> u64 {
        self.client_id
    }

    /// The server currently connected to, if any.
    pub fn server(&self) -> Option<SocketAddr> {
        self.conn.as_ref().map(|c| c.server)
    }

    /// The id of the replica currently connected to, if any.
    pub fn node(&self) -> Option<u64> {
        self.conn.as_ref().map(|c| c.node)
    }

    /// Sets the largest frame payload sent or accepted (default [`MAX_FRAME`]; must
    /// match the servers' limit). Takes effect on the next connection.
    pub fn set_max_frame(&mut self, max: u32) {
        self.max_frame = max;
    }

    fn advance(&mut self) {
        self.next_server = (self.next_server + 1) % self.cfg.servers.len();
    }

    fn ensure_conn(&mut self) -> Result<(), ClientError> {
        if self.conn.is_some() {
            return Ok(());
        }
        let target = match self.hint.take() {
            Some(a) => a,
            None => self.cfg.servers[self.next_server],
        };
        let c = Conn::open(
            target,
            self.cfg.cluster_id,
            self.cfg.secret.as_deref(),
            self.cfg.tls.as_ref(),
            self.cfg.timeout,
            self.max_frame,
        )?;
        let mut c = c;
        c.spin = self.cfg.spin;
        self.conn = Some(c);
        Ok(())
    }

    fn try_once(&mut self, req: &Request, op: &'static str) -> Result<Response, ClientError> {
        self.ensure_conn()?;
        let timeout = self.cfg.timeout;
        let conn = self.conn.as_mut().expect("connected");
        conn.call(req, op, Some(timeout))
    }

    /// Sends `req` until it gets an answer that is not a redirect or a retryable error.
    fn call(&mut self, req: &Request, op: &'static str) -> Result<Response, ClientError> {
        let max_redirects = 2 * self.cfg.servers.len() as u32 + 2;
        let mut failures = 0u32;
        let mut redirects = 0u32;
        loop {
            let server =
                self.conn.as_ref().map(|c| c.server).or(self.hint).unwrap_or(self.cfg.servers[self.next_server]);
            let err = match self.try_once(req, op) {
                Ok(Response::Redirect { leader, addr }) => {
                    self.conn = None;
                    redirects += 1;
                    let target = addr.as_deref().and_then(|a| a.to_socket_addrs().ok()).and_then(|mut it| it.next());
                    if redirects > max_redirects {
                        return Err(ClientError::Exhausted {
                            op,
                            attempts: failures + redirects,
                            last: Box::new(ClientError::Protocol {
                                server,
                                detail: format!("redirected {redirects} times (last: leader {leader:?} at {addr:?})"),
                            }),
                        });
                    }
                    match target {
                        Some(a) => self.hint = Some(a),
                        None => {
                            // No usable leader address (an election?): next server, later.
                            self.advance();
                            std::thread::sleep(backoff(redirects));
                        }
                    }
                    continue;
                }
                Ok(Response::Error { code, message }) => {
                    let e = ClientError::Server { server, op, code, message };
                    match code {
                        ErrorCode::Busy => e,
                        ErrorCode::Unavailable => {
                            self.conn = None;
                            self.advance();
                            e
                        }
                        _ => return Err(e),
                    }
                }
                Ok(r) => return Ok(r),
                Err(e) => {
                    self.conn = None;
                    if !e.is_retryable() {
                        return Err(e);
                    }
                    self.advance();
                    e
                }
            };
            failures += 1;
            if failures > self.cfg.retries {
                return Err(ClientError::Exhausted { op, attempts: failures + redirects, last: Box::new(err) });
            }
            tracing::debug!("{op}: {err}; retrying (attempt {})", failures + 1);
            std::thread::sleep(backoff(failures));
        }
    }

    fn server_for_errors(&self) -> SocketAddr {
        self.conn.as_ref().map(|c| c.server).unwrap_or(self.cfg.servers[self.next_server])
    }

    /// Appends one entry; returns its position once committed.
    pub fn append(&mut self, data: impl Into<Bytes>) -> Result<u64, ClientError> {
        let p = self.append_batch(vec![data.into()])?;
        Ok(p[0])
    }

    /// Appends entries in one request; returns their positions, in order. The entries
    /// take consecutive sequence numbers of this client, reused by every retry.
    pub fn append_batch(&mut self, entries: Vec<Bytes>) -> Result<Vec<u64>, ClientError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let n = entries.len();
        // Sequence numbers are spent even if the append fails: reusing them for other
        // data could make the service answer with the first data's positions.
        let seq = self.next_seq;
        self.next_seq += n as u64;
        let req = Request::Append { client: self.client_id, seq, entries };
        match self.call(&req, "append")? {
            Response::Appended { positions } if positions.len() == n => Ok(positions),
            other => Err(ClientError::Protocol {
                server: self.server_for_errors(),
                detail: format!("answered an append of {n} entries with {other:?}"),
            }),
        }
    }

    /// Reads up to `max_entries` committed entries from position `from` (0 = the first):
    /// `(position, entry)` pairs; empty when there is nothing at `from` yet.
    pub fn read(&mut self, from: u64, max_entries: u32) -> Result<Vec<(u64, Bytes)>, ClientError> {
        let req = Request::Read { from, max_entries, max_bytes: self.max_frame.saturating_sub(1024) };
        match self.call(&req, "read")? {
            Response::Entries { from, entries, .. } => {
                Ok(entries.into_iter().enumerate().map(|(i, e)| (from + i as u64, e)).collect())
            }
            other => Err(ClientError::Protocol {
                server: self.server_for_errors(),
                detail: format!("answered a read with {other:?}"),
            }),
        }
    }

    /// Like [`Client::read`], but linearizable: the leader answers once it confirmed its
    /// leadership and applied everything committed when the request arrived, so the
    /// answer includes every append acknowledged before this call.
    pub fn read_linearizable(&mut self, from: u64, max_entries: u32) -> Result<Vec<(u64, Bytes)>, ClientError> {
        let req = Request::ReadLinearizable { from, max_entries, max_bytes: self.max_frame.saturating_sub(1024) };
        match self.call(&req, "linearizable read")? {
            Response::Entries { from, entries, .. } => {
                Ok(entries.into_iter().enumerate().map(|(i, e)| (from + i as u64, e)).collect())
            }
            other => Err(ClientError::Protocol {
                server: self.server_for_errors(),
                detail: format!("answered a linearizable read with {other:?}"),
            }),
        }
    }

    /// Queries the replicated state machine (replicas that embed one). Linearizable:
    /// answered by the leader from a state that includes every append acknowledged
    /// before this call. Otherwise any replica answers from what it applied. Returns
    /// the last slot applied to the answering state, and the answer.
    pub fn query(&mut self, query: &[u8], linearizable: bool) -> Result<(u64, Bytes), ClientError> {
        let req = Request::Query { linearizable, query: Bytes::copy_from_slice(query) };
        match self.call(&req, "query")? {
            Response::QueryResult { applied_slot, data } => Ok((applied_slot, data)),
            other => Err(ClientError::Protocol {
                server: self.server_for_errors(),
                detail: format!("answered a query with {other:?}"),
            }),
        }
    }

    /// One replica's (possibly stale) answer to `query`, on a connection of its own,
    /// without retries or redirects (and without a credential: see [`Client::query_at`]).
    pub fn query_of(
        addr: SocketAddr,
        cluster_id: u64,
        timeout: Duration,
        query: &[u8],
    ) -> Result<(u64, Bytes), ClientError> {
        let mut cfg = ClientConfig::new(cluster_id, vec![addr]);
        cfg.timeout = timeout;
        Client::query_at(addr, &cfg, query)
    }

    /// Like [`Client::query_of`], with `cfg`'s cluster id, secret and timeout.
    pub fn query_at(addr: SocketAddr, cfg: &ClientConfig, query: &[u8]) -> Result<(u64, Bytes), ClientError> {
        let timeout = cfg.timeout;
        let mut c = Conn::open(addr, cfg.cluster_id, cfg.secret.as_deref(), cfg.tls.as_ref(), timeout, MAX_FRAME)?;
        let req = Request::Query { linearizable: false, query: Bytes::copy_from_slice(query) };
        match c.call(&req, "query", Some(timeout))? {
            Response::QueryResult { applied_slot, data } => Ok((applied_slot, data)),
            Response::Error { code, message } => Err(ClientError::Server { server: addr, op: "query", code, message }),
            other => Err(ClientError::Protocol { server: addr, detail: format!("answered a query with {other:?}") }),
        }
    }

    /// Asks the leader to change the membership to `voters` and `learners` (each a
    /// configured member; a new voter must have caught up as a learner first). Returns
    /// the leader's status once the change is proposed; it takes effect when committed.
    pub fn change_membership(&mut self, voters: Vec<u64>, learners: Vec<u64>) -> Result<Status, ClientError> {
        match self.call(&Request::ChangeMembership { voters, learners }, "membership change")? {
            Response::Status(s) => Ok(s),
            other => Err(ClientError::Protocol {
                server: self.server_for_errors(),
                detail: format!("answered a membership change with {other:?}"),
            }),
        }
    }

    /// Asks the leader of a plain log service to discard the entries at positions up to
    /// `upto` on every replica (rounded down to a slot boundary; see
    /// [`Request::Trim`]). Returns the first position still readable.
    pub fn trim(&mut self, upto: u64) -> Result<u64, ClientError> {
        match self.call(&Request::Trim { upto }, "trim")? {
            Response::Trimmed { first_position } => Ok(first_position),
            other => Err(ClientError::Protocol {
                server: self.server_for_errors(),
                detail: format!("answered a trim with {other:?}"),
            }),
        }
    }

    /// Asks the leader for one membership step (add a new replica as a learner, promote
    /// a caught-up learner, remove a member), computed from the membership in force.
    /// Returns the leader's status once the change is proposed (it takes effect when
    /// committed); refusals (unknown or duplicate id, an address in use, a learner not
    /// caught up, another change in progress) are errors that say why.
    pub fn member_change(&mut self, op: MemberOp) -> Result<Status, ClientError> {
        match self.call(&Request::MemberChange(op), "membership change")? {
            Response::Status(s) => Ok(s),
            other => Err(ClientError::Protocol {
                server: self.server_for_errors(),
                detail: format!("answered a membership change with {other:?}"),
            }),
        }
    }

    /// Asks the leader to hand leadership to replica `to` (0: the most caught-up other
    /// voter). Returns the leader's status once the transfer started; the new leader
    /// takes over within about a round trip (or the transfer is abandoned after an
    /// election timeout, if `to` is down or may not lead).
    pub fn transfer_leadership(&mut self, to: u64) -> Result<Status, ClientError> {
        match self.call(&Request::Transfer { to }, "transfer")? {
            Response::Status(s) => Ok(s),
            other => Err(ClientError::Protocol {
                server: self.server_for_errors(),
                detail: format!("answered a transfer with {other:?}"),
            }),
        }
    }

    /// Follows the log from position `from` (0 = the first) on a connection of its own
    /// (to the server this client uses).
    pub fn tail(&mut self, from: u64) -> Result<Tail, ClientError> {
        let mut failures = 0;
        loop {
            let target =
                self.conn.as_ref().map(|c| c.server).or(self.hint).unwrap_or(self.cfg.servers[self.next_server]);
            match Tail::start(target, &self.cfg, self.max_frame, from) {
                Ok(t) => return Ok(t),
                Err(e) if e.is_retryable() && failures < self.cfg.retries => {
                    failures += 1;
                    self.conn = None;
                    self.hint = None;
                    self.advance();
                    std::thread::sleep(backoff(failures));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The connected replica's view of the cluster (no redirect: any replica answers).
    pub fn status(&mut self) -> Result<Status, ClientError> {
        match self.call(&Request::Status, "status")? {
            Response::Status(s) => Ok(s),
            other => Err(ClientError::Protocol {
                server: self.server_for_errors(),
                detail: format!("answered status with {other:?}"),
            }),
        }
    }

    /// One server's view of the cluster, on a connection of its own, without retries
    /// (and without a credential: see [`Client::status_at`]).
    pub fn status_of(addr: SocketAddr, cluster_id: u64, timeout: Duration) -> Result<Status, ClientError> {
        let mut cfg = ClientConfig::new(cluster_id, vec![addr]);
        cfg.timeout = timeout;
        Client::status_at(addr, &cfg)
    }

    /// Asks the replica at `addr` (a connection of its own, `cfg`'s credentials) to
    /// snapshot its state machine now and trim its log behind it; returns its status
    /// once the snapshot is saved and verified.
    pub fn snapshot_at(addr: SocketAddr, cfg: &ClientConfig) -> Result<Status, ClientError> {
        let timeout = cfg.timeout;
        let mut c = Conn::open(addr, cfg.cluster_id, cfg.secret.as_deref(), cfg.tls.as_ref(), timeout, MAX_FRAME)?;
        match c.call(&Request::Snapshot, "snapshot", Some(timeout))? {
            Response::Status(s) => Ok(s),
            Response::Error { code, message } => {
                Err(ClientError::Server { server: addr, op: "snapshot", code, message })
            }
            other => Err(ClientError::Protocol { server: addr, detail: format!("answered a snapshot with {other:?}") }),
        }
    }

    /// One server's view of the cluster, on a connection of its own, without retries,
    /// with `cfg`'s cluster id, secret and timeout.
    pub fn status_at(addr: SocketAddr, cfg: &ClientConfig) -> Result<Status, ClientError> {
        let timeout = cfg.timeout;
        let mut c = Conn::open(addr, cfg.cluster_id, cfg.secret.as_deref(), cfg.tls.as_ref(), timeout, MAX_FRAME)?;
        match c.call(&Request::Status, "status", Some(timeout))? {
            Response::Status(s) => Ok(s),
            Response::Error { code, message } => Err(ClientError::Server { server: addr, op: "status", code, message }),
            other => Err(ClientError::Protocol { server: addr, detail: format!("answered status with {other:?}") }),
        }
    }
}

/// A subscription to the log: yields `(position, entry)` in position order, from its
/// own connection, until the connection fails. A `Redirect` is followed (the tail
/// resumes at the next position there).
pub struct Tail {
    conn: Conn,
    req_id: u64,
    cluster_id: u64,
    secret: Option<Vec<u8>>,
    tls: Option<TlsClientConfig>,
    connect_timeout: Duration,
    /// Next position expected (0 until the first entry arrives, for `from` = 0).
    next: u64,
    buf: VecDeque<(u64, Bytes)>,
    wait: Option<Duration>,
    redirects: u32,
    done: bool,
}

impl Tail {
    fn start(server: SocketAddr, cfg: &ClientConfig, max_frame: u32, from: u64) -> Result<Tail, ClientError> {
        let mut conn =
            Conn::open(server, cfg.cluster_id, cfg.secret.as_deref(), cfg.tls.as_ref(), cfg.timeout, max_frame)?;
        let req_id = conn.send(&Request::Tail { from }, "tail")?;
        Ok(Tail {
            conn,
            req_id,
            cluster_id: cfg.cluster_id,
            secret: cfg.secret.clone(),
            tls: cfg.tls.clone(),
            connect_timeout: cfg.timeout,
            next: from,
            buf: VecDeque::new(),
            wait: None,
            redirects: 0,
            done: false,
        })
    }

    /// How long [`Iterator::next`] waits for an entry before yielding
    /// [`ClientError::Timeout`] (the tail stays usable); `None` (the default): forever.
    pub fn set_wait_timeout(&mut self, wait: Option<Duration>) {
        self.wait = wait;
    }

    /// The server this tail reads from.
    pub fn server(&self) -> SocketAddr {
        self.conn.server
    }

    /// The next position expected (0 before the first entry of a tail from 0).
    pub fn next_position(&self) -> u64 {
        self.next
    }

    fn redirect(&mut self, addr: Option<String>) -> Result<(), ClientError> {
        let server = self.conn.server;
        self.redirects += 1;
        let target = addr.as_deref().and_then(|a| a.to_socket_addrs().ok()).and_then(|mut it| it.next());
        let Some(target) = target.filter(|_| self.redirects <= 8) else {
            return Err(ClientError::Protocol {
                server,
                detail: format!("tail redirected without a usable address ({addr:?}, redirect {})", self.redirects),
            });
        };
        let mut conn = Conn::open(
            target,
            self.cluster_id,
            self.secret.as_deref(),
            self.tls.as_ref(),
            self.connect_timeout,
            self.conn.max_frame,
        )?;
        self.req_id = conn.send(&Request::Tail { from: self.next }, "tail")?;
        self.conn = conn;
        Ok(())
    }

    fn fill(&mut self) -> Result<(), ClientError> {
        let deadline = self.wait.map(|w| Instant::now() + w);
        while self.buf.is_empty() {
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let (rid, resp) = self.conn.recv("tail", left)?;
            if rid != self.req_id && rid != 0 {
                continue;
            }
            match resp {
                Response::Entries { from, entries, .. } => {
                    for (i, e) in entries.into_iter().enumerate() {
                        let p = from + i as u64;
                        if p >= self.next {
                            self.buf.push_back((p, e));
                            self.next = p + 1;
                        }
                    }
                }
                Response::Redirect { addr, .. } => self.redirect(addr)?,
                Response::Error { code, message } => {
                    return Err(ClientError::Server { server: self.conn.server, op: "tail", code, message })
                }
                other => {
                    return Err(ClientError::Protocol {
                        server: self.conn.server,
                        detail: format!("answered a tail with {other:?}"),
                    })
                }
            }
        }
        Ok(())
    }
}

impl Iterator for Tail {
    type Item = Result<(u64, Bytes), ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(x) = self.buf.pop_front() {
            return Some(Ok(x));
        }
        if self.done {
            return None;
        }
        match self.fill() {
            Ok(()) => self.buf.pop_front().map(Ok),
            Err(e) => {
                if !matches!(e, ClientError::Timeout { .. }) {
                    self.done = true;
                }
                Some(Err(e))
            }
        }
    }
}
