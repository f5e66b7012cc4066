//! TEST SUPPORT ONLY, not a replica: a fake "cluster" of client-port servers sharing one
//! fake node thread with an in-memory log, used to test the client protocol, the
//! client-port server and the client library without Paxos. It appends without
//! consensus, de-duplicates by (client, seq), serves reads and tails, answers status,
//! redirects to the configured "leader", and can be told to apply an append and then
//! drop the connection instead of answering. Also: log capture and raw-socket helpers.

#![allow(dead_code)]

use bytes::{Bytes, BytesMut};
use replog::client::proto::{self, ENTRY_OVERHEAD};
use replog::client::{
    ClientServer, ClientServerConfig, ConnId, ErrorCode, Inbound, Outbound, PeerStatus, Request, Responder, Response,
    Status,
};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use transport::envelope::Decoder;

/// The cluster id the fake cluster uses.
pub const CLUSTER: u64 = 0xC1;

/// The fake node's state, inspectable and steerable by tests.
#[derive(Default)]
pub struct State {
    /// The log: position p is `log[p - 1]`.
    pub log: Vec<Bytes>,
    /// (client, seq) → position.
    pub dedup: HashMap<(u64, u64), u64>,
    /// Index of the server that acts as leader (`None`: redirect without an address).
    pub leader: Option<usize>,
    /// Apply the next append, then close its connection instead of answering.
    pub drop_next_append: bool,
    /// Append requests received (retries included).
    pub appends_received: usize,
    /// Connections reported closed, per server.
    pub disconnected: Vec<(usize, ConnId)>,
    /// Tail subscriptions: (server, conn, req_id, next position to send).
    pub subs: Vec<(usize, ConnId, u64, u64)>,
    /// Apply appends but hold their answers (sent once this is false again).
    pub hold_appends: bool,
    /// Answers held: (server, conn, req_id, response).
    pub held: Vec<(usize, ConnId, u64, Response)>,
}

/// A wake-up flag for the fake node (what `wake_node` sets).
#[derive(Default)]
struct Wake {
    flag: Mutex<bool>,
    cv: Condvar,
}

/// N client-port servers in front of one fake node thread.
pub struct FakeCluster {
    servers: Vec<ClientServer>,
    /// The shared state.
    pub state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    wake: Arc<Wake>,
    node: Option<JoinHandle<()>>,
}

impl FakeCluster {
    /// Starts `n` servers with the default config (cluster [`CLUSTER`]); server 0 leads.
    pub fn start(n: usize) -> FakeCluster {
        Self::start_with(n, |_| {})
    }

    /// Starts `n` servers, `tweak` adjusting each one's config.
    pub fn start_with(n: usize, tweak: impl Fn(&mut ClientServerConfig)) -> FakeCluster {
        let wake = Arc::new(Wake::default());
        let mut servers = Vec::new();
        let mut rxs = Vec::new();
        for i in 0..n {
            let mut cfg = ClientServerConfig::new(CLUSTER, i as u64 + 1);
            tweak(&mut cfg);
            let (tx, rx) = mpsc::channel();
            let w = wake.clone();
            let wake_node: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
                *w.flag.lock().unwrap() = true;
                w.cv.notify_one();
            });
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            servers.push(ClientServer::start(l, cfg, tx, wake_node).unwrap());
            rxs.push(rx);
        }
        let state = Arc::new(Mutex::new(State { leader: Some(0), ..State::default() }));
        let stop = Arc::new(AtomicBool::new(false));
        let node = {
            let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.local_addr()).collect();
            let responders: Vec<Responder> = servers.iter().map(|s| s.responder()).collect();
            let (state, stop, wake) = (state.clone(), stop.clone(), wake.clone());
            std::thread::spawn(move || node_loop(rxs, responders, addrs, state, stop, wake))
        };
        FakeCluster { servers, state, stop, wake, node: Some(node) }
    }

    /// Client address of server `i`.
    pub fn addr(&self, i: usize) -> SocketAddr {
        self.servers[i].local_addr()
    }

    /// All client addresses.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.servers.iter().map(|s| s.local_addr()).collect()
    }

    /// A copy of the log.
    pub fn log(&self) -> Vec<Bytes> {
        self.state.lock().unwrap().log.clone()
    }

    /// Stops the servers (joining their threads), then the fake node.
    pub fn shutdown(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        for s in self.servers.drain(..) {
            s.shutdown();
        }
        self.stop.store(true, Ordering::SeqCst);
        self.wake.cv.notify_one();
        if let Some(t) = self.node.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for FakeCluster {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn node_loop(
    rxs: Vec<mpsc::Receiver<Inbound>>,
    responders: Vec<Responder>,
    addrs: Vec<SocketAddr>,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    wake: Arc<Wake>,
) {
    while !stop.load(Ordering::SeqCst) {
        let mut any = false;
        {
            let mut st = state.lock().unwrap();
            if !st.hold_appends {
                for (server, conn, req_id, response) in std::mem::take(&mut st.held) {
                    responders[server].send(Outbound::Reply { conn, req_id, response });
                }
            }
        }
        for (i, rx) in rxs.iter().enumerate() {
            while let Ok(inb) = rx.try_recv() {
                any = true;
                handle(i, inb, &responders, &addrs, &mut state.lock().unwrap());
            }
        }
        if !any {
            let mut f = wake.flag.lock().unwrap();
            if !*f {
                f = wake.cv.wait_timeout(f, Duration::from_millis(20)).unwrap().0;
            }
            *f = false;
        }
    }
}

fn handle(server: usize, inb: Inbound, responders: &[Responder], addrs: &[SocketAddr], st: &mut State) {
    let Inbound { conn, req_id, request } = inb;
    let reply = |response| responders[server].send(Outbound::Reply { conn, req_id, response });
    match request {
        Request::Append { client, seq, entries } => {
            st.appends_received += 1;
            if st.leader != Some(server) {
                reply(Response::Redirect {
                    leader: st.leader.map(|l| l as u64 + 1),
                    addr: st.leader.map(|l| addrs[l].to_string()),
                });
                return;
            }
            let mut positions = Vec::new();
            for (i, e) in entries.into_iter().enumerate() {
                let key = (client, seq + i as u64);
                let p = match st.dedup.get(&key) {
                    Some(p) => *p,
                    None => {
                        st.log.push(e);
                        let p = st.log.len() as u64;
                        st.dedup.insert(key, p);
                        p
                    }
                };
                positions.push(p);
            }
            feed_tails(st, responders);
            if std::mem::take(&mut st.drop_next_append) {
                responders[server].send(Outbound::Close { conn });
            } else if st.hold_appends {
                st.held.push((server, conn, req_id, Response::Appended { positions }));
            } else {
                reply(Response::Appended { positions });
            }
        }
        Request::Read { from, max_entries, max_bytes } => {
            let start = from.max(1);
            let mut entries = Vec::new();
            let mut bytes = 0usize;
            for e in st.log.iter().skip(start as usize - 1) {
                if entries.len() as u32 >= max_entries
                    || (!entries.is_empty() && bytes + e.len() + ENTRY_OVERHEAD > max_bytes as usize)
                {
                    break;
                }
                bytes += e.len() + ENTRY_OVERHEAD;
                entries.push(e.clone());
            }
            reply(Response::Entries { from: start, entries, last_committed: st.log.len() as u64 });
        }
        Request::Tail { from } => {
            st.subs.push((server, conn, req_id, from.max(1)));
            feed_tails(st, responders);
        }
        Request::Status => reply(Response::Status(Status {
            node: server as u64 + 1,
            role: if st.leader == Some(server) { "leader".into() } else { "follower".into() },
            leader: st.leader.map(|l| l as u64 + 1),
            ballot: "b1.1".into(),
            commit_slot: st.log.len() as u64,
            applied_slot: st.log.len() as u64,
            last_position: st.log.len() as u64,
            durability: "memory".into(),
            peers: (0..responders.len())
                .filter(|&i| i != server)
                .map(|i| PeerStatus { id: i as u64 + 1, matched_slot: st.log.len() as u64, lag: 0, connected: true })
                .collect(),
        })),
        Request::ReadLinearizable { .. }
        | Request::Transfer { .. }
        | Request::Query { .. }
        | Request::ChangeMembership { .. }
        | Request::Trim { .. }
        | Request::MemberChange(_)
        | Request::Snapshot => reply(Response::Error {
            code: ErrorCode::BadRequest,
            message: "not supported by the fake node (test support)".into(),
        }),
        Request::Disconnected => {
            st.subs.retain(|s| !(s.0 == server && s.1 == conn));
            st.disconnected.push((server, conn));
        }
        Request::Hello { .. } | Request::Auth { .. } => panic!("the server must not pass Hello or Auth on"),
    }
}

fn feed_tails(st: &mut State, responders: &[Responder]) {
    let len = st.log.len() as u64;
    for (server, conn, req_id, next) in st.subs.iter_mut() {
        if *next <= len {
            let entries = st.log[*next as usize - 1..].to_vec();
            responders[*server].send(Outbound::Reply {
                conn: *conn,
                req_id: *req_id,
                response: Response::Entries { from: *next, entries, last_committed: len },
            });
            *next = len + 1;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Log capture

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

static LOGS: OnceLock<Buf> = OnceLock::new();

/// Installs (once per test binary) a subscriber that captures every log line.
pub fn capture_logs() {
    LOGS.get_or_init(|| {
        let buf = Buf::default();
        let w = buf.clone();
        let sub =
            tracing_subscriber::fmt().with_max_level(tracing::Level::DEBUG).with_writer(move || w.clone()).finish();
        tracing::subscriber::set_global_default(sub).unwrap();
        buf
    });
}

/// Everything logged so far in this test binary.
pub fn logs() -> String {
    String::from_utf8_lossy(&LOGS.get().expect("capture_logs first").0.lock().unwrap()).into_owned()
}

/// Waits (at most `within`) for a log line containing every one of `parts`.
pub fn wait_for_log(parts: &[&str], within: Duration) -> Option<String> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(l) = logs().lines().find(|l| parts.iter().all(|p| l.contains(p))) {
            return Some(l.to_string());
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------
// Raw sockets

/// A raw connection to `addr` with a read timeout.
pub fn raw(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    s
}

/// The frame of `req` with id `req_id`.
pub fn frame(req_id: u64, req: &Request) -> Vec<u8> {
    let mut out = Vec::new();
    proto::encode_request(req_id, req, &mut out).unwrap();
    out
}

/// Reads from `s` until the server closes it (EOF or reset) or `within` passes;
/// returns the responses received and whether the connection was closed.
pub fn read_until_closed(s: &mut TcpStream, within: Duration) -> (Vec<(u64, Response)>, bool) {
    let deadline = Instant::now() + within;
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 4096];
    let mut got = Vec::new();
    let dec = Decoder::new(replog::client::MAX_FRAME);
    let closed = loop {
        if Instant::now() > deadline {
            break false;
        }
        match s.read(&mut chunk) {
            Ok(0) => break true,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                loop {
                    match dec.decode(&mut buf) {
                        Ok(Some(f)) => match proto::decode_response(&f) {
                            Ok(r) => got.push(r),
                            Err(e) => panic!("the server sent an undecodable response: {e}"),
                        },
                        Ok(None) => break,
                        Err(e) => panic!("the server sent a bad frame: {e}"),
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                continue
            }
            Err(_) => break true,
        }
    };
    (got, closed)
}

/// Reads one response from `s` (within 5 s). Only for when exactly one is due: bytes
/// after the first frame are dropped (use [`read_n`] for several).
pub fn read_one(s: &mut TcpStream) -> (u64, Response) {
    match read_n(s, 1).pop() {
        Some(r) => r,
        None => unreachable!("read_n returns the number asked for"),
    }
}

/// Reads the next `n` responses from `s` (within 5 s), keeping what follows a frame in
/// the same read for the next one (two answers sent together often come in one read).
pub fn read_n(s: &mut TcpStream, n: usize) -> Vec<(u64, Response)> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 4096];
    let dec = Decoder::new(replog::client::MAX_FRAME);
    let mut got = Vec::new();
    while got.len() < n {
        match dec.decode(&mut buf) {
            Ok(Some(f)) => match proto::decode_response(&f) {
                Ok(r) => {
                    got.push(r);
                    continue;
                }
                Err(e) => panic!("the server sent an undecodable response: {e}"),
            },
            Ok(None) => {}
            Err(e) => panic!("the server sent a bad frame: {e}"),
        }
        assert!(Instant::now() < deadline, "{} of {n} responses within 5 s", got.len());
        match s.read(&mut chunk) {
            Ok(0) => panic!("connection closed"),
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    got
}
