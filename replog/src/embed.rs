//! Embedding replog in an application: run a replica in-process with your
//! [`StateMachine`] and drive it through a [`ReplicaHandle`].
//!
//! ```no_run
//! # use replog::{app::KvMachine, config::ServeConfig, embed};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let cfg = ServeConfig::load(std::path::Path::new("replica-1.toml"))?;
//! let replica = embed::start(cfg, Box::new(KvMachine::default()))?;
//! let h = replica.handle();
//! let (position, answer) = h.replicate(b"set greeting hello".to_vec(), 7)?; // token 7
//! let value = h.query(b"get greeting", true)?;                             // linearizable
//! println!("{position}: {answer:?} {value:?} {:?}", h.status()?);
//! replica.stop()?;
//! # Ok(()) }
//! ```
//!
//! The handle sends requests to the replica's polling thread (the same path as the
//! client port's requests) and waits for the answer. `replicate` answers once the entry
//! is applied here, with the state machine's result (the state machine saw the
//! token in `apply`); on a follower it fails with [`HandleError::NotLeader`] naming the
//! leader. Proposals a leader loses when it is deposed are reported to the state machine
//! (`proposals_aborted`) and fail here with `NotLeader`.

use crate::app::StateMachine;
use crate::client::{ConnId, ErrorCode, Inbound, Request, Response, Status};
use crate::config::ServeConfig;
use crate::server::{self, ServeError};
use bytes::Bytes;
use parking_lot::Mutex;
use paxos::Position;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// The connection id of in-process requests (never a client-port connection).
pub const LOCAL_CONN: ConnId = ConnId::MAX;

/// An answer to a local request: the response, and the state machine's results for
/// the entries of an append (in order).
#[derive(Debug)]
pub struct LocalReply {
    /// The node's response.
    pub response: Response,
    /// For `Appended`: what `StateMachine::apply` returned for each entry.
    pub results: Vec<Bytes>,
}

/// What the handles and the node share: where answers to local requests go, and the
/// application's token of each local proposal, by request id.
#[derive(Default)]
pub struct LocalState {
    pub(crate) replies: HashMap<u64, mpsc::Sender<LocalReply>>,
    pub(crate) tokens: HashMap<u64, u64>,
    pub(crate) results: HashMap<u64, Vec<Bytes>>,
}

/// Shared [`LocalState`].
pub type Local = Arc<Mutex<LocalState>>;

/// Why a handle request failed.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// This replica does not lead; `leader` is the one it knows of.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The known leader.
        leader: Option<u64>,
    },
    /// The replica refused (busy, too large, stopped, ...).
    #[error("{code}: {message}")]
    Refused {
        /// Why.
        code: ErrorCode,
        /// Explanation.
        message: String,
    },
    /// No answer in time (the replica is overloaded or stopping).
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The replica stopped.
    #[error("the replica stopped")]
    Stopped,
    /// An answer of an unexpected kind (a bug).
    #[error("unexpected answer {0:?}")]
    Unexpected(Box<Response>),
}

/// A handle to an in-process replica. Cheap to clone; usable from any thread.
#[derive(Clone)]
pub struct ReplicaHandle {
    tx: mpsc::Sender<Inbound>,
    wake: Arc<dyn Fn() + Send + Sync>,
    local: Local,
    next_req: Arc<AtomicU64>,
    /// The client id under which this handle's proposals are de-duplicated.
    client: u64,
    next_seq: Arc<AtomicU64>,
    timeout: Duration,
}

impl ReplicaHandle {
    pub(crate) fn new(tx: mpsc::Sender<Inbound>, wake: Arc<dyn Fn() + Send + Sync>, local: Local) -> Self {
        // The core de-duplicates per client id: one of our own per handle family.
        let client = crate::client::new_client_id();
        ReplicaHandle {
            tx,
            wake,
            local,
            next_req: Arc::new(AtomicU64::new(1)),
            client,
            next_seq: Arc::new(AtomicU64::new(1)),
            timeout: Duration::from_secs(10),
        }
    }

    /// How long requests wait for an answer (default 10 s).
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    fn call(&self, request: Request, token: Option<u64>) -> Result<LocalReply, HandleError> {
        let req_id = self.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        {
            let mut l = self.local.lock();
            l.replies.insert(req_id, tx);
            if let Some(t) = token {
                l.tokens.insert(req_id, t);
            }
        }
        let forget = || {
            let mut l = self.local.lock();
            l.replies.remove(&req_id);
            l.tokens.remove(&req_id);
        };
        if self.tx.send(Inbound { conn: LOCAL_CONN, req_id, request }).is_err() {
            forget();
            return Err(HandleError::Stopped);
        }
        (self.wake)();
        let r = rx.recv_timeout(self.timeout);
        forget();
        match r {
            Ok(reply) => match reply.response {
                Response::Redirect { leader, .. } => Err(HandleError::NotLeader { leader }),
                Response::Error { code, message } => Err(HandleError::Refused { code, message }),
                _ => Ok(reply),
            },
            Err(mpsc::RecvTimeoutError::Timeout) => Err(HandleError::Timeout(self.timeout)),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(HandleError::Stopped),
        }
    }

    /// Replicates `payload` (on the leader): returns its position and what the state
    /// machine's `apply` answered. `token` is handed to `apply` on this replica.
    pub fn replicate(&self, payload: Vec<u8>, token: u64) -> Result<(Position, Bytes), HandleError> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let request = Request::Append { client: self.client, seq, entries: vec![Bytes::from(payload)] };
        let reply = self.call(request, Some(token))?;
        match (reply.response, reply.results.into_iter().next()) {
            (Response::Appended { positions }, Some(result)) if positions.len() == 1 => Ok((positions[0], result)),
            (other, _) => Err(HandleError::Unexpected(Box::new(other))),
        }
    }

    /// Queries the state machine: linearizable (at the leader) or from this replica's
    /// applied state.
    pub fn query(&self, query: &[u8], linearizable: bool) -> Result<Bytes, HandleError> {
        let reply = self.call(Request::Query { linearizable, query: Bytes::copy_from_slice(query) }, None)?;
        match reply.response {
            Response::QueryResult { data, .. } => Ok(data),
            other => Err(HandleError::Unexpected(Box::new(other))),
        }
    }

    /// This replica's view: role, leader, ballot, commit and applied slots, peers.
    pub fn status(&self) -> Result<Status, HandleError> {
        match self.call(Request::Status, None)?.response {
            Response::Status(s) => Ok(s),
            other => Err(HandleError::Unexpected(Box::new(other))),
        }
    }

    /// Hands leadership to replica `to` (on the leader).
    pub fn transfer_leadership(&self, to: u64) -> Result<(), HandleError> {
        self.call(Request::Transfer { to }, None).map(|_| ())
    }

    /// Changes the membership (on the leader; see [`paxos::Replica::change_membership`]).
    pub fn change_membership(&self, voters: Vec<u64>, learners: Vec<u64>) -> Result<(), HandleError> {
        self.call(Request::ChangeMembership { voters, learners }, None).map(|_| ())
    }

    /// One membership step (on the leader): add a replica that no configuration lists
    /// (with its addresses), promote a caught-up learner, or remove a member (see
    /// [`crate::client::MemberOp`]).
    pub fn member_change(&self, op: crate::client::MemberOp) -> Result<(), HandleError> {
        self.call(Request::MemberChange(op), None).map(|_| ())
    }

    /// Snapshots the state machine now (on this replica) and trims the log behind it;
    /// returns once the snapshot is saved and verified.
    pub fn snapshot_now(&self) -> Result<(), HandleError> {
        self.call(Request::Snapshot, None).map(|_| ())
    }

    /// Steps down in favour of the most caught-up other voter (on the leader).
    pub fn step_down(&self) -> Result<(), HandleError> {
        self.transfer_leadership(0)
    }
}

/// A replica running in this process.
pub struct Embedded {
    handle: ReplicaHandle,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), ServeError>>>,
}

impl Embedded {
    /// A handle to drive the replica.
    pub fn handle(&self) -> ReplicaHandle {
        self.handle.clone()
    }

    /// Stops the replica and waits for it; returns how it ended.
    pub fn stop(mut self) -> Result<(), ServeError> {
        self.stop.store(true, Ordering::Relaxed);
        (self.handle.wake)();
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(ServeError::Limits("the replica thread panicked".into())),
            None => Ok(()),
        }
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        (self.handle.wake)();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts a replica of `cfg` in this process, driving `sm`, on a thread of its own (its
/// client port, peer links and metrics run as with `replog serve`). Returns once the
/// ports are bound.
pub fn start(cfg: ServeConfig, sm: Box<dyn StateMachine>) -> Result<Embedded, ServeError> {
    let stop = Arc::new(AtomicBool::new(false));
    let (htx, hrx) = mpsc::channel();
    let s2 = stop.clone();
    let thread = std::thread::Builder::new()
        .name(format!("replog-{}", cfg.id))
        .spawn(move || server::serve_embedded(cfg, s2, Some(sm), Some(htx)))
        .map_err(|e| ServeError::Limits(format!("cannot start the replica thread: {e}")))?;
    match hrx.recv() {
        Ok(handle) => Ok(Embedded { handle, stop, thread: Some(thread) }),
        Err(_) => match thread.join() {
            Ok(Err(e)) => Err(e),
            _ => Err(ServeError::Limits("the replica stopped while starting".into())),
        },
    }
}
