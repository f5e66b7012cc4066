//! The client protocol: requests, responses and their codec.
//!
//! Every client frame travels in the transport's [`envelope`] (magic, version, kind,
//! length, CRC32C): a client of another protocol version is refused by the envelope
//! check alone. The envelope's `kind` byte says what the payload is; every payload
//! starts with the **request id** (`u64`, chosen by the client; a response echoes the
//! id of the request it answers, and every `Entries` frame of a tail carries the tail's
//! id). All integers are little-endian.
//!
//! ```text
//! kind  frame        payload after req_id (u64)
//! 0x01  Hello        cluster_id u64
//! 0x02  Append       client u64, seq u64, count u32, count × (len u32, bytes)
//! 0x03  Read         from u64, max_entries u32, max_bytes u32
//! 0x04  Tail         from u64
//! 0x05  Status       (nothing)
//! 0x06  ReadLinear.  from u64, max_entries u32, max_bytes u32
//! 0x07  Transfer     to u64
//! 0x08  Query        linearizable u8, query bytes (len u32, bytes)
//! 0x09  ChangeMemb.  count u32, count × voter u64, count u32, count × learner u64
//! 0x0A  Auth         proof [32]
//! 0x0B  Snapshot     (nothing)
//! 0x0C  Trim         upto u64
//! 0x10  MemberChange op u8 (1 add, 2 promote, 3 remove), id u64, add only: peer_addr str,
//!                    client_addr str (each `host:port`)
//! 0x41  HelloOk      node u64
//! 0x42  Appended     count u32, count × position u64
//! 0x43  Entries      from u64, last_committed u64, count u32, count × (len u32, bytes)
//! 0x44  Status       node u64, role str, leader opt<u64>, ballot str, commit_slot u64,
//!                    applied_slot u64, last_position u64, durability str,
//!                    count u32, count × (id u64, matched_slot u64, lag u64, connected u8)
//! 0x45  Redirect     leader opt<u64>, addr opt<str>
//! 0x46  Error        code u16, message str
//! 0x47  QueryResult  applied_slot u64, data (len u32, bytes)
//! 0x48  Challenge    nonce [32]
//! 0x49  Trimmed      first_position u64
//!
//! str      = len u32, UTF-8 bytes
//! opt<T>   = 0u8 (none) | 1u8, T
//! ```
//!
//! A connection starts with `Hello` (anything else first is refused and the connection
//! closed); the server answers `HelloOk` or `Error { WrongCluster }` and closes.
//!
//! # Client credentials
//! A server configured with a client secret answers `Hello` with `Challenge { nonce }`
//! (32 fresh random bytes) instead of `HelloOk`; the client must answer
//! `Auth { proof }` with `proof = HMAC-SHA256(secret, "replog-client" || cluster_id u64
//! || nonce)` ([`client_proof`]) before anything else. A right proof gets `HelloOk`;
//! anything else (a wrong proof, another request) gets `Error { Unauthorized }` and the
//! connection is closed. The secret never crosses the wire and a proof is good for one
//! nonce only (no replay). Only the client is authenticated (the server proves nothing
//! back), and frames after the handshake are not authenticated: that is TLS's job.
//!
//! [`Request::Disconnected`] has no kind: it is never sent on the wire.
//!
//! Decoding never panics: any malformed payload (unknown kind, truncated field, bad
//! UTF-8, an unknown error code or option tag, trailing bytes, a count the payload
//! cannot hold) is a typed [`ProtoError`], and counts are checked against the bytes
//! actually present before anything is allocated.
//!
//! [`envelope`]: transport::envelope

use bytes::Bytes;
use std::fmt;
use transport::envelope::{self, Frame, FrameError, HEADER_LEN};

/// The default largest frame payload (16 MiB), in both directions.
pub const MAX_FRAME: u32 = 16 << 20;

/// The server's id for one client connection (unique for the server's lifetime).
pub type ConnId = u64;

/// Frame kinds of the client protocol (the envelope's `kind` byte).
pub mod kind {
    /// [`super::Request::Hello`].
    pub const HELLO: u8 = 0x01;
    /// [`super::Request::Append`].
    pub const APPEND: u8 = 0x02;
    /// [`super::Request::Read`].
    pub const READ: u8 = 0x03;
    /// [`super::Request::Tail`].
    pub const TAIL: u8 = 0x04;
    /// [`super::Request::Status`].
    pub const STATUS: u8 = 0x05;
    /// [`super::Request::ReadLinearizable`].
    pub const READ_LINEARIZABLE: u8 = 0x06;
    /// [`super::Request::Transfer`].
    pub const TRANSFER: u8 = 0x07;
    /// [`super::Request::Query`].
    pub const QUERY: u8 = 0x08;
    /// [`super::Request::ChangeMembership`].
    pub const CHANGE_MEMBERSHIP: u8 = 0x09;
    /// [`super::Request::Auth`].
    pub const AUTH: u8 = 0x0A;
    /// [`super::Request::Snapshot`].
    pub const SNAPSHOT: u8 = 0x0B;
    /// [`super::Request::Trim`].
    pub const TRIM: u8 = 0x0C;
    /// [`super::Request::MemberChange`].
    pub const MEMBER_CHANGE: u8 = 0x10;
    /// [`super::Response::HelloOk`].
    pub const HELLO_OK: u8 = 0x41;
    /// [`super::Response::Appended`].
    pub const APPENDED: u8 = 0x42;
    /// [`super::Response::Entries`].
    pub const ENTRIES: u8 = 0x43;
    /// [`super::Response::Status`].
    pub const STATUS_REPLY: u8 = 0x44;
    /// [`super::Response::Redirect`].
    pub const REDIRECT: u8 = 0x45;
    /// [`super::Response::Error`].
    pub const ERROR: u8 = 0x46;
    /// [`super::Response::QueryResult`].
    pub const QUERY_RESULT: u8 = 0x47;
    /// [`super::Response::Challenge`].
    pub const CHALLENGE: u8 = 0x48;
    /// [`super::Response::Trimmed`].
    pub const TRIMMED: u8 = 0x49;
}

/// Bytes of a challenge nonce and of a proof.
pub const AUTH_LEN: usize = 32;

/// The proof a client holding `secret` gives for the server's challenge `nonce` in
/// cluster `cluster_id`: HMAC-SHA256(secret, "replog-client" || cluster_id (u64 LE) || nonce).
pub fn client_proof(secret: &[u8], cluster_id: u64, nonce: &[u8; AUTH_LEN]) -> [u8; AUTH_LEN] {
    use hmac::Mac;
    let mut m = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    m.update(b"replog-client");
    m.update(&cluster_id.to_le_bytes());
    m.update(nonce);
    m.finalize().into_bytes().into()
}

/// Whether `proof` is the right one for `nonce` (compared in constant time).
pub fn verify_client_proof(secret: &[u8], cluster_id: u64, nonce: &[u8; AUTH_LEN], proof: &[u8; AUTH_LEN]) -> bool {
    use hmac::Mac;
    let mut m = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    m.update(b"replog-client");
    m.update(&cluster_id.to_le_bytes());
    m.update(nonce);
    m.verify_slice(proof).is_ok()
}

/// Bytes one entry costs in an `Append` or `Entries` payload beyond its own length.
pub const ENTRY_OVERHEAD: usize = 4;
/// Bytes of an `Entries` frame (envelope header included) besides its entries.
pub const ENTRIES_FRAME_OVERHEAD: usize = HEADER_LEN + 8 + 8 + 8 + 4;

/// A client request.
#[derive(Clone, PartialEq, Eq)]
pub enum Request {
    /// The first frame on a connection (the protocol version is in the envelope).
    Hello {
        /// The cluster the client means to talk to.
        cluster_id: u64,
    },
    /// Append entries; they get sequence numbers `seq, seq+1, ...` of `client`, and a
    /// retry reuses them, so an entry is applied once however often it is sent.
    Append {
        /// The client's id.
        client: u64,
        /// The sequence number of the first entry.
        seq: u64,
        /// The entries, in order.
        entries: Vec<Bytes>,
    },
    /// Read committed entries from position `from` (0 = from the first).
    Read {
        /// The first position wanted (0 = from the first).
        from: u64,
        /// At most this many entries.
        max_entries: u32,
        /// At most this many bytes of entries, each counted as its length plus
        /// [`ENTRY_OVERHEAD`] (but at least one entry is returned if there is one, and
        /// the answer must fit the frame limit: see [`ENTRIES_FRAME_OVERHEAD`]).
        max_bytes: u32,
    },
    /// Subscribe: the server streams `Entries` from position `from` (0 = from the
    /// first) with this request's id until the connection closes. Each `Entries` frame
    /// must fit the frame limit (the node splits a backlog into several frames); a
    /// position already sent is never required to be sent again, and the client skips
    /// repeats.
    Tail {
        /// The first position wanted (0 = from the first).
        from: u64,
    },
    /// This replica's view of the cluster.
    Status,
    /// Like `Read`, but linearizable: served by the leader once it confirmed its
    /// leadership (read lease or a quorum round) and applied every entry committed when
    /// the request arrived. Other replicas answer `Redirect`.
    ReadLinearizable {
        /// The first position wanted (0 = from the first).
        from: u64,
        /// At most this many entries.
        max_entries: u32,
        /// At most this many bytes of entries (as for `Read`).
        max_bytes: u32,
    },
    /// Ask the leader to hand leadership to replica `to` (0: to the most caught-up
    /// other voter, that is, step down). Answered with the leader's `Status` once the
    /// transfer started; other replicas answer `Redirect`.
    Transfer {
        /// The replica to lead next (0: any).
        to: u64,
    },
    /// A read-only query of the replicated state machine (replicas that embed one,
    /// e.g. `state_machine = "kv"`). `linearizable`: served by the leader once it
    /// confirmed its leadership and applied everything committed at arrival (others
    /// answer `Redirect`); else served by any replica from what it applied.
    Query {
        /// Whether the answer must be linearizable.
        linearizable: bool,
        /// The query, as the state machine understands it.
        query: Bytes,
    },
    /// Ask the leader to change the membership to these voters and learners (every one
    /// a configured member). Answered with the leader's `Status` once the change is
    /// proposed; it takes effect when committed. Other replicas answer `Redirect`.
    ChangeMembership {
        /// The voters.
        voters: Vec<u64>,
        /// The learners.
        learners: Vec<u64>,
    },
    /// Ask the leader for one membership step, computed from the membership in force:
    /// add a new replica as a learner (with its addresses, replicated to every member),
    /// promote a caught-up learner to voter, or remove a member. Answered like
    /// `ChangeMembership`.
    MemberChange(MemberOp),
    /// The answer to a server's `Challenge`: the client's [`client_proof`].
    Auth {
        /// HMAC-SHA256 of the challenge under the client secret.
        proof: [u8; AUTH_LEN],
    },
    /// Ask this replica to snapshot its state machine now (replicas that embed one) and
    /// trim its log behind the snapshot. Answered with its `Status` once the snapshot is
    /// saved and verified.
    Snapshot,
    /// Ask the leader of a plain log service (`state_machine = "log"`) to discard the
    /// entries at positions up to `upto` on every replica. The cut is rounded down to a
    /// slot boundary (a batch of entries is trimmed whole or not at all), so a few
    /// entries at or below `upto` may stay readable. Answered with `Trimmed` once the
    /// leader applied the trim; other replicas answer `Redirect`. A position beyond the
    /// last committed one is refused.
    Trim {
        /// The last position that may be discarded.
        upto: u64,
    },
    /// Never on the wire: the server tells the node that the connection closed (so it
    /// can drop the connection's tail subscriptions). Sent exactly once for every
    /// connection that completed `Hello`, whatever closed it; its `req_id` is 0.
    Disconnected,
}

/// One membership step ([`Request::MemberChange`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberOp {
    /// Add replica `id` (not a member yet) as a learner reached at these addresses.
    Add {
        /// The new replica's id (non-zero, unused).
        id: u64,
        /// Where replicas connect to it.
        peer_addr: std::net::SocketAddr,
        /// Where clients connect to it.
        client_addr: std::net::SocketAddr,
    },
    /// Make learner `id` a voter (refused until it caught up).
    Promote {
        /// The learner.
        id: u64,
    },
    /// Remove member `id` (voter or learner).
    Remove {
        /// The member.
        id: u64,
    },
}

impl fmt::Display for MemberOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemberOp::Add { id, peer_addr, client_addr } => {
                write!(f, "add replica {id} (peer {peer_addr}, client {client_addr}) as a learner")
            }
            MemberOp::Promote { id } => write!(f, "promote replica {id} to voter"),
            MemberOp::Remove { id } => write!(f, "remove replica {id}"),
        }
    }
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::Hello { cluster_id } => write!(f, "Hello{{cluster_id: {cluster_id}}}"),
            Request::Append { client, seq, entries } => write!(
                f,
                "Append{{client: {client}, seq: {seq}, entries: {} ({}B)}}",
                entries.len(),
                entries.iter().map(|e| e.len()).sum::<usize>()
            ),
            Request::Read { from, max_entries, max_bytes } => {
                write!(f, "Read{{from: {from}, max_entries: {max_entries}, max_bytes: {max_bytes}}}")
            }
            Request::Tail { from } => write!(f, "Tail{{from: {from}}}"),
            Request::Status => write!(f, "Status"),
            Request::ReadLinearizable { from, max_entries, max_bytes } => {
                write!(f, "ReadLinearizable{{from: {from}, max_entries: {max_entries}, max_bytes: {max_bytes}}}")
            }
            Request::Transfer { to } => write!(f, "Transfer{{to: {to}}}"),
            Request::Query { linearizable, query } => {
                write!(f, "Query{{linearizable: {linearizable}, {}B}}", query.len())
            }
            Request::ChangeMembership { voters, learners } => {
                write!(f, "ChangeMembership{{voters: {voters:?}, learners: {learners:?}}}")
            }
            Request::MemberChange(op) => write!(f, "MemberChange{{{op:?}}}"),
            Request::Snapshot => write!(f, "Snapshot"),
            Request::Trim { upto } => write!(f, "Trim{{upto: {upto}}}"),
            Request::Auth { .. } => write!(f, "Auth"),
            Request::Disconnected => write!(f, "Disconnected"),
        }
    }
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The request is malformed or not allowed here (also: bad frames, protocol version).
    BadRequest,
    /// The Hello named another cluster.
    WrongCluster,
    /// A frame or request exceeds a limit.
    TooLarge,
    /// The server is overloaded (or out of connections): back off and retry.
    Busy,
    /// The service cannot answer now (no leader, shutting down): retry later/elsewhere.
    Unavailable,
    /// What was asked for does not exist (for example positions trimmed away).
    NotFound,
    /// A bug or an unexpected failure on the server.
    Internal,
    /// The client did not present a valid credential (see the module docs).
    Unauthorized,
}

impl ErrorCode {
    /// The wire code.
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 1,
            ErrorCode::WrongCluster => 2,
            ErrorCode::TooLarge => 3,
            ErrorCode::Busy => 4,
            ErrorCode::Unavailable => 5,
            ErrorCode::NotFound => 6,
            ErrorCode::Internal => 7,
            ErrorCode::Unauthorized => 8,
        }
    }

    /// From the wire code (`None` for an unknown code).
    pub fn from_u16(c: u16) -> Option<ErrorCode> {
        Some(match c {
            1 => ErrorCode::BadRequest,
            2 => ErrorCode::WrongCluster,
            3 => ErrorCode::TooLarge,
            4 => ErrorCode::Busy,
            5 => ErrorCode::Unavailable,
            6 => ErrorCode::NotFound,
            7 => ErrorCode::Internal,
            8 => ErrorCode::Unauthorized,
            _ => return None,
        })
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// One replica's view of the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// This replica.
    pub node: u64,
    /// Its role ("leader", "follower", "candidate", ...).
    pub role: String,
    /// The leader it knows of.
    pub leader: Option<u64>,
    /// Its ballot, printed.
    pub ballot: String,
    /// Highest committed slot it knows (0 = none).
    pub commit_slot: u64,
    /// Highest slot it applied (0 = none).
    pub applied_slot: u64,
    /// Highest client position it applied (0 = none).
    pub last_position: u64,
    /// Its durability mode ("pmem", "fsync", "memory").
    pub durability: String,
    /// Per-peer replication state (meaningful on the leader).
    pub peers: Vec<PeerStatus>,
}

/// One peer as the reporting replica sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerStatus {
    /// The peer.
    pub id: u64,
    /// Highest slot known to match the reporter's log.
    pub matched_slot: u64,
    /// How many slots it is behind the reporter's commit.
    pub lag: u64,
    /// Whether the link to it is up.
    pub connected: bool,
}

/// A server response.
#[derive(Clone, PartialEq, Eq)]
pub enum Response {
    /// The Hello was accepted by replica `node`.
    HelloOk {
        /// The answering replica.
        node: u64,
    },
    /// The entries of an `Append` are committed at these positions, one per entry, in order.
    Appended {
        /// One position per entry.
        positions: Vec<u64>,
    },
    /// Entries at positions `from, from+1, ...` (for `Read`, and streamed for `Tail`).
    Entries {
        /// The position of the first entry.
        from: u64,
        /// The entries.
        entries: Vec<Bytes>,
        /// The highest committed position the server knows.
        last_committed: u64,
    },
    /// The answer to `Status`.
    Status(Status),
    /// Not the leader: try there.
    Redirect {
        /// The leader, if known.
        leader: Option<u64>,
        /// The client address of the leader, if known (`host:port`).
        addr: Option<String>,
    },
    /// The answer to `Query`, from the state after applying slot `applied_slot`.
    QueryResult {
        /// The last slot applied to the state that answered.
        applied_slot: u64,
        /// The state machine's answer.
        data: Bytes,
    },
    /// The request failed.
    Error {
        /// Why.
        code: ErrorCode,
        /// A human-readable explanation.
        message: String,
    },
    /// The answer to `Trim`: entries before `first_position` are gone on the leader
    /// (and on every replica once it applies the trim).
    Trimmed {
        /// The first position still readable.
        first_position: u64,
    },
    /// The server wants a client credential: answer with `Auth` (see the module docs).
    Challenge {
        /// Fresh random bytes to prove the secret against.
        nonce: [u8; AUTH_LEN],
    },
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Response::HelloOk { node } => write!(f, "HelloOk{{node: {node}}}"),
            Response::Appended { positions } => write!(f, "Appended{{positions: {positions:?}}}"),
            Response::Entries { from, entries, last_committed } => write!(
                f,
                "Entries{{from: {from}, entries: {} ({}B), last_committed: {last_committed}}}",
                entries.len(),
                entries.iter().map(|e| e.len()).sum::<usize>()
            ),
            Response::Status(s) => write!(f, "Status({s:?})"),
            Response::Redirect { leader, addr } => {
                write!(f, "Redirect{{leader: {leader:?}, addr: {addr:?}}}")
            }
            Response::Error { code, message } => write!(f, "Error{{{code}: {message}}}"),
            Response::QueryResult { applied_slot, data } => {
                write!(f, "QueryResult{{applied_slot: {applied_slot}, {}B}}", data.len())
            }
            Response::Challenge { .. } => write!(f, "Challenge"),
            Response::Trimmed { first_position } => write!(f, "Trimmed{{first_position: {first_position}}}"),
        }
    }
}

/// Why a frame is not a valid client-protocol message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// The envelope is bad (magic, version, flags, length, checksum).
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The frame kind is not one this side accepts.
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    /// The payload ends inside a field.
    #[error("truncated payload: {0} missing")]
    Truncated(&'static str),
    /// Bytes left after the last field.
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    /// A field holds an invalid value.
    #[error("invalid {field}: {detail}")]
    Invalid {
        /// Which field.
        field: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// The message is larger than the limit (or than 4 GiB) once encoded.
    #[error("message of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// The payload length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// [`Request::Disconnected`] cannot be encoded: it never goes on the wire.
    #[error("Disconnected is not a wire message")]
    NotOnWire,
}

// ---------------------------------------------------------------------------------------
// Writing

struct W(Vec<u8>);

impl W {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn len(&mut self, n: usize) -> Result<(), ProtoError> {
        let n = u32::try_from(n).map_err(|_| ProtoError::TooLarge { len: n, max: u32::MAX as usize })?;
        self.u32(n);
        Ok(())
    }
    fn bytes(&mut self, b: &[u8]) -> Result<(), ProtoError> {
        self.len(b.len())?;
        self.0.extend_from_slice(b);
        Ok(())
    }
    fn entries(&mut self, e: &[Bytes]) -> Result<(), ProtoError> {
        self.len(e.len())?;
        for b in e {
            self.bytes(b)?;
        }
        Ok(())
    }
    fn opt_u64(&mut self, v: Option<u64>) {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                self.u64(v);
            }
        }
    }
}

fn finish(kind: u8, payload: W, out: &mut Vec<u8>) -> Result<(), ProtoError> {
    if payload.0.len() > u32::MAX as usize {
        return Err(ProtoError::TooLarge { len: payload.0.len(), max: u32::MAX as usize });
    }
    envelope::encode(kind, &payload.0, out);
    Ok(())
}

/// Appends the frame of `req` with id `req_id` to `out`. Fails only for
/// [`Request::Disconnected`] and for payloads above 4 GiB (nothing is appended then).
pub fn encode_request(req_id: u64, req: &Request, out: &mut Vec<u8>) -> Result<(), ProtoError> {
    let mut w = W(Vec::with_capacity(64));
    w.u64(req_id);
    let kind = match req {
        Request::Hello { cluster_id } => {
            w.u64(*cluster_id);
            kind::HELLO
        }
        Request::Append { client, seq, entries } => {
            w.u64(*client);
            w.u64(*seq);
            w.entries(entries)?;
            kind::APPEND
        }
        Request::Read { from, max_entries, max_bytes } => {
            w.u64(*from);
            w.u32(*max_entries);
            w.u32(*max_bytes);
            kind::READ
        }
        Request::Tail { from } => {
            w.u64(*from);
            kind::TAIL
        }
        Request::Status => kind::STATUS,
        Request::ReadLinearizable { from, max_entries, max_bytes } => {
            w.u64(*from);
            w.u32(*max_entries);
            w.u32(*max_bytes);
            kind::READ_LINEARIZABLE
        }
        Request::Transfer { to } => {
            w.u64(*to);
            kind::TRANSFER
        }
        Request::Query { linearizable, query } => {
            w.u8(*linearizable as u8);
            w.bytes(query)?;
            kind::QUERY
        }
        Request::ChangeMembership { voters, learners } => {
            for ids in [voters, learners] {
                w.len(ids.len())?;
                for id in ids {
                    w.u64(*id);
                }
            }
            kind::CHANGE_MEMBERSHIP
        }
        Request::MemberChange(op) => {
            match op {
                MemberOp::Add { id, peer_addr, client_addr } => {
                    w.u8(1);
                    w.u64(*id);
                    w.bytes(peer_addr.to_string().as_bytes())?;
                    w.bytes(client_addr.to_string().as_bytes())?;
                }
                MemberOp::Promote { id } => {
                    w.u8(2);
                    w.u64(*id);
                }
                MemberOp::Remove { id } => {
                    w.u8(3);
                    w.u64(*id);
                }
            }
            kind::MEMBER_CHANGE
        }
        Request::Snapshot => kind::SNAPSHOT,
        Request::Trim { upto } => {
            w.u64(*upto);
            kind::TRIM
        }
        Request::Auth { proof } => {
            w.0.extend_from_slice(proof);
            kind::AUTH
        }
        Request::Disconnected => return Err(ProtoError::NotOnWire),
    };
    finish(kind, w, out)
}

/// Appends the frame of `resp` answering request `req_id` to `out`. Fails only for
/// payloads above 4 GiB (nothing is appended then).
pub fn encode_response(req_id: u64, resp: &Response, out: &mut Vec<u8>) -> Result<(), ProtoError> {
    let mut w = W(Vec::with_capacity(64));
    w.u64(req_id);
    let kind = match resp {
        Response::HelloOk { node } => {
            w.u64(*node);
            kind::HELLO_OK
        }
        Response::Appended { positions } => {
            w.len(positions.len())?;
            for p in positions {
                w.u64(*p);
            }
            kind::APPENDED
        }
        Response::Entries { from, entries, last_committed } => {
            w.u64(*from);
            w.u64(*last_committed);
            w.entries(entries)?;
            kind::ENTRIES
        }
        Response::Status(s) => {
            w.u64(s.node);
            w.bytes(s.role.as_bytes())?;
            w.opt_u64(s.leader);
            w.bytes(s.ballot.as_bytes())?;
            w.u64(s.commit_slot);
            w.u64(s.applied_slot);
            w.u64(s.last_position);
            w.bytes(s.durability.as_bytes())?;
            w.len(s.peers.len())?;
            for p in &s.peers {
                w.u64(p.id);
                w.u64(p.matched_slot);
                w.u64(p.lag);
                w.u8(p.connected as u8);
            }
            kind::STATUS_REPLY
        }
        Response::Redirect { leader, addr } => {
            w.opt_u64(*leader);
            match addr {
                None => w.u8(0),
                Some(a) => {
                    w.u8(1);
                    w.bytes(a.as_bytes())?;
                }
            }
            kind::REDIRECT
        }
        Response::Error { code, message } => {
            w.u16(code.to_u16());
            w.bytes(message.as_bytes())?;
            kind::ERROR
        }
        Response::QueryResult { applied_slot, data } => {
            w.u64(*applied_slot);
            w.bytes(data)?;
            kind::QUERY_RESULT
        }
        Response::Challenge { nonce } => {
            w.0.extend_from_slice(nonce);
            kind::CHALLENGE
        }
        Response::Trimmed { first_position } => {
            w.u64(*first_position);
            kind::TRIMMED
        }
    };
    finish(kind, w, out)
}

// ---------------------------------------------------------------------------------------
// Reading

struct R {
    b: Bytes,
    pos: usize,
}

impl R {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&[u8], ProtoError> {
        if self.b.len() - self.pos < n {
            return Err(ProtoError::Truncated(what));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, ProtoError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, ProtoError> {
        let s = self.take(2, what)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, ProtoError> {
        let s = self.take(4, what)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, ProtoError> {
        let s = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    fn arr32(&mut self, what: &'static str) -> Result<[u8; AUTH_LEN], ProtoError> {
        let s = self.take(AUTH_LEN, what)?;
        let mut a = [0u8; AUTH_LEN];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn bool(&mut self, what: &'static str) -> Result<bool, ProtoError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(ProtoError::Invalid { field: what, detail: format!("boolean byte {v}") }),
        }
    }
    /// A count of items each at least `min_item` bytes long, checked against the bytes left.
    fn count(&mut self, min_item: usize, what: &'static str) -> Result<usize, ProtoError> {
        let n = self.u32(what)? as usize;
        if n.saturating_mul(min_item) > self.remaining() {
            return Err(ProtoError::Truncated(what));
        }
        Ok(n)
    }
    fn bytes(&mut self, what: &'static str) -> Result<Bytes, ProtoError> {
        let n = self.u32(what)? as usize;
        if self.remaining() < n {
            return Err(ProtoError::Truncated(what));
        }
        let b = self.b.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(b)
    }
    fn string(&mut self, what: &'static str) -> Result<String, ProtoError> {
        let b = self.bytes(what)?;
        String::from_utf8(b.to_vec()).map_err(|e| ProtoError::Invalid { field: what, detail: e.to_string() })
    }
    fn entries(&mut self, what: &'static str) -> Result<Vec<Bytes>, ProtoError> {
        let n = self.count(ENTRY_OVERHEAD, what)?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(self.bytes(what)?);
        }
        Ok(v)
    }
    fn opt_u64(&mut self, what: &'static str) -> Result<Option<u64>, ProtoError> {
        if self.bool(what)? {
            Ok(Some(self.u64(what)?))
        } else {
            Ok(None)
        }
    }
    fn end(&self) -> Result<(), ProtoError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(ProtoError::Trailing(n)),
        }
    }
}

/// Decodes a request frame into `(req_id, request)`. Never yields
/// [`Request::Disconnected`]: that has no wire kind.
pub fn decode_request(frame: &Frame) -> Result<(u64, Request), ProtoError> {
    let mut r = R { b: frame.payload.clone(), pos: 0 };
    let req_id = r.u64("request id")?;
    let req = match frame.kind {
        kind::HELLO => Request::Hello { cluster_id: r.u64("cluster id")? },
        kind::APPEND => Request::Append {
            client: r.u64("client id")?,
            seq: r.u64("sequence number")?,
            entries: r.entries("entries")?,
        },
        kind::READ => {
            Request::Read { from: r.u64("from")?, max_entries: r.u32("max entries")?, max_bytes: r.u32("max bytes")? }
        }
        kind::TAIL => Request::Tail { from: r.u64("from")? },
        kind::STATUS => Request::Status,
        kind::READ_LINEARIZABLE => Request::ReadLinearizable {
            from: r.u64("from")?,
            max_entries: r.u32("max entries")?,
            max_bytes: r.u32("max bytes")?,
        },
        kind::TRANSFER => Request::Transfer { to: r.u64("transfer target")? },
        kind::QUERY => Request::Query { linearizable: r.bool("linearizable")?, query: r.bytes("query")? },
        kind::CHANGE_MEMBERSHIP => {
            let mut lists = [Vec::new(), Vec::new()];
            for l in lists.iter_mut() {
                let n = r.count(8, "members")?;
                for _ in 0..n {
                    l.push(r.u64("member id")?);
                }
            }
            let [voters, learners] = lists;
            Request::ChangeMembership { voters, learners }
        }
        kind::MEMBER_CHANGE => {
            let op = r.u8("member change")?;
            let id = r.u64("member id")?;
            let mut addr = |what| {
                r.string(what)?
                    .parse()
                    .map_err(|e: std::net::AddrParseError| ProtoError::Invalid { field: what, detail: e.to_string() })
            };
            Request::MemberChange(match op {
                1 => MemberOp::Add { id, peer_addr: addr("peer address")?, client_addr: addr("client address")? },
                2 => MemberOp::Promote { id },
                3 => MemberOp::Remove { id },
                v => return Err(ProtoError::Invalid { field: "member change", detail: format!("operation {v}") }),
            })
        }
        kind::AUTH => Request::Auth { proof: r.arr32("proof")? },
        kind::SNAPSHOT => Request::Snapshot,
        kind::TRIM => Request::Trim { upto: r.u64("trim position")? },
        k => return Err(ProtoError::UnknownKind(k)),
    };
    r.end()?;
    Ok((req_id, req))
}

/// Decodes a response frame into `(req_id, response)`.
pub fn decode_response(frame: &Frame) -> Result<(u64, Response), ProtoError> {
    let mut r = R { b: frame.payload.clone(), pos: 0 };
    let req_id = r.u64("request id")?;
    let resp = match frame.kind {
        kind::HELLO_OK => Response::HelloOk { node: r.u64("node")? },
        kind::APPENDED => {
            let n = r.count(8, "positions")?;
            let mut positions = Vec::with_capacity(n);
            for _ in 0..n {
                positions.push(r.u64("positions")?);
            }
            Response::Appended { positions }
        }
        kind::ENTRIES => {
            let from = r.u64("from")?;
            let last_committed = r.u64("last committed")?;
            Response::Entries { from, entries: r.entries("entries")?, last_committed }
        }
        kind::STATUS_REPLY => {
            let node = r.u64("node")?;
            let role = r.string("role")?;
            let leader = r.opt_u64("leader")?;
            let ballot = r.string("ballot")?;
            let commit_slot = r.u64("commit slot")?;
            let applied_slot = r.u64("applied slot")?;
            let last_position = r.u64("last position")?;
            let durability = r.string("durability")?;
            let n = r.count(25, "peers")?;
            let mut peers = Vec::with_capacity(n);
            for _ in 0..n {
                peers.push(PeerStatus {
                    id: r.u64("peer id")?,
                    matched_slot: r.u64("peer matched slot")?,
                    lag: r.u64("peer lag")?,
                    connected: r.bool("peer connected")?,
                });
            }
            Response::Status(Status {
                node,
                role,
                leader,
                ballot,
                commit_slot,
                applied_slot,
                last_position,
                durability,
                peers,
            })
        }
        kind::REDIRECT => {
            let leader = r.opt_u64("leader")?;
            let addr = if r.bool("leader address")? { Some(r.string("leader address")?) } else { None };
            Response::Redirect { leader, addr }
        }
        kind::ERROR => {
            let c = r.u16("error code")?;
            let code = ErrorCode::from_u16(c)
                .ok_or_else(|| ProtoError::Invalid { field: "error code", detail: format!("unknown code {c}") })?;
            Response::Error { code, message: r.string("error message")? }
        }
        kind::QUERY_RESULT => {
            Response::QueryResult { applied_slot: r.u64("applied slot")?, data: r.bytes("query result")? }
        }
        kind::CHALLENGE => Response::Challenge { nonce: r.arr32("nonce")? },
        kind::TRIMMED => Response::Trimmed { first_position: r.u64("first position")? },
        k => return Err(ProtoError::UnknownKind(k)),
    };
    r.end()?;
    Ok((req_id, resp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    /// The one whole frame `bytes` hold.
    fn frame_of(bytes: &[u8]) -> Frame {
        match envelope::Decoder::new(MAX_FRAME).decode(&mut BytesMut::from(bytes)) {
            Ok(Some(f)) => f,
            Ok(None) => panic!("no whole frame in {} bytes", bytes.len()),
            Err(e) => panic!("the envelope does not decode: {e}"),
        }
    }

    #[test]
    fn disconnected_is_not_on_the_wire() {
        let mut out = Vec::new();
        assert_eq!(encode_request(1, &Request::Disconnected, &mut out), Err(ProtoError::NotOnWire));
        assert!(out.is_empty());
    }

    #[test]
    fn huge_count_is_refused_without_allocating() {
        let mut out = Vec::new();
        encode_request(7, &Request::Append { client: 1, seq: 1, entries: vec![] }, &mut out).unwrap();
        // Patch the entry count to u32::MAX and rebuild the envelope.
        let mut payload = out[HEADER_LEN..].to_vec();
        payload[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut f = Vec::new();
        envelope::encode(kind::APPEND, &payload, &mut f);
        assert_eq!(decode_request(&frame_of(&f)), Err(ProtoError::Truncated("entries")));
    }

    #[test]
    fn response_kind_is_not_a_request() {
        let mut out = Vec::new();
        encode_response(3, &Response::HelloOk { node: 1 }, &mut out).unwrap();
        assert_eq!(decode_request(&frame_of(&out)), Err(ProtoError::UnknownKind(kind::HELLO_OK)));
    }
}
