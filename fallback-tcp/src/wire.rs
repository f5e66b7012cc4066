//! The peer-link protocol carried in [`transport::envelope`] frames.
//!
//! Two TCP connections join each pair of replicas: each replica dials every peer and
//! uses that *outgoing* connection for its own messages, writes and reads; it accepts
//! the peer's connection and uses that *incoming* one to receive the peer's messages
//! and requests and to send back the completions.
//!
//! ```text
//! kind  name       direction          payload (integers little-endian)
//!  1    HELLO      dialer -> acceptor cluster_id u64, node_id u64, target u64, version u8,
//!                                     config_digest u64, dialer_nonce [32]
//!  2    HELLO_OK   acceptor -> dialer cluster_id u64, node_id u64, [acceptor_proof [32]]
//!  3    REJECT     acceptor -> dialer reason (UTF-8, at most 1 KiB); then the acceptor closes
//!  4    CHALLENGE  acceptor -> dialer acceptor_nonce [32]            (only with a cluster secret)
//!  5    AUTH       dialer -> acceptor dialer_proof [32]              (only with a cluster secret)
//! 16    MSG        dialer -> acceptor the message payload
//! 17    WRITE      dialer -> acceptor token u64, offset u64, data
//! 18    WRITE_ACK  acceptor -> dialer token u64, status u8 (0 ok, 1 denied), ack or detail bytes
//! 19    READ       dialer -> acceptor token u64, offset u64, len u32
//! 20    READ_RESP  acceptor -> dialer token u64, status u8 (0 ok, 1 denied), data or detail bytes
//! ```
//!
//! HELLO is the first frame on a connection and HELLO_OK (or REJECT) the first answer;
//! no other frame is accepted before them. `target` is the node id the dialer meant to
//! reach (a misconfigured address is refused by the acceptor); `version` is
//! [`transport::envelope::VERSION`] (the envelope already refuses frames of another
//! version; the HELLO repeats it so that the handshake states what it agreed on).
//! A token is the dialer's: the acceptor echoes it in the answer.
//!
//! ## Configuration digest
//! `config_digest` is the dialer's [`crate::TcpConfig::config_digest`] (0 when the
//! embedder does not set one). The acceptor expects of each peer the digest it was told
//! for that peer ([`crate::TcpConfig::peer_digests`]), or its own digest when it was told
//! none, and refuses any other as a *stale configuration*. With one digest of a shared
//! member list everywhere, a replica started with another list cannot join; `replog`
//! instead gives each replica a digest of its own identity (id and addresses) and tells
//! every replica the digest it expects of each member from the replicated membership,
//! so that a member added while serving is accepted and a process presenting itself
//! with other addresses than the cluster knows for its id is refused.
//!
//! ## Authentication (cluster secret)
//! Without a secret ([`crate::TcpConfig::secret`] is `None`) the handshake is HELLO ->
//! HELLO_OK (16 bytes), the nonce in HELLO is zero and ignored, and the digest is
//! compared at once. With a secret the handshake is a mutual HMAC-SHA256
//! challenge-response over fresh 32-byte nonces from the OS:
//!
//! ```text
//! dialer                                    acceptor
//!   HELLO(cluster, D, A, version, digest, Nd) ->      identity checks (cluster, ids, target)
//!                                <- CHALLENGE(Na)
//!   AUTH(mac(1))                 ->                   verify mac(1), then compare digest
//!                                <- HELLO_OK(cluster, A, mac(2))    (or REJECT)
//!   verify mac(2)
//!
//! mac(role) = HMAC-SHA256(secret, "replog-peer" || role u8 || cluster_id u64
//!             || D u64 || A u64 || digest u64 || Na || Nd)     (integers little-endian)
//! ```
//!
//! `D`/`A` are the dialer's and the acceptor's node ids and `digest` is the one the
//! dialer sent in HELLO. The role byte (1: dialer's proof, 2: acceptor's proof) keeps a
//! proof from being reflected back; each side's fresh nonce keeps the other's proof from
//! being replayed; proofs are compared in constant time. The digest is compared only
//! after the dialer's proof verified, so a process without the secret learns no more
//! than "authentication failed". A dialer with a secret refuses an acceptor that answers
//! HELLO_OK without a valid proof (or without challenging it); a dialer without a
//! secret refuses a CHALLENGE. The payload is not encrypted or authenticated after the
//! handshake: the secret keeps non-members out, it does not protect the link from an
//! on-path attacker (that is TLS's job).
//!
//! Every decoder here checks lengths and returns [`ProtocolError`] on garbage; none
//! panics.

use bytes::Bytes;
use std::time::Duration;
use transport::envelope::FrameError;

/// Frame kinds of the peer link.
pub mod kind {
    /// Dialer's greeting: cluster id, node id, target node id, version.
    pub const HELLO: u8 = 1;
    /// Acceptor's acceptance: cluster id, node id.
    pub const HELLO_OK: u8 = 2;
    /// Acceptor's refusal with a reason; the connection closes after it.
    pub const REJECT: u8 = 3;
    /// Acceptor's challenge: its nonce (only with a cluster secret).
    pub const CHALLENGE: u8 = 4;
    /// Dialer's answer to the challenge: its proof (only with a cluster secret).
    pub const AUTH: u8 = 5;
    /// A control-plane message.
    pub const MSG: u8 = 16;
    /// A remote write request.
    pub const WRITE: u8 = 17;
    /// The answer to a remote write.
    pub const WRITE_ACK: u8 = 18;
    /// A remote read request.
    pub const READ: u8 = 19;
    /// The answer to a remote read.
    pub const READ_RESP: u8 = 20;
}

/// Status byte of WRITE_ACK / READ_RESP: the access succeeded.
pub const STATUS_OK: u8 = 0;
/// Status byte of WRITE_ACK / READ_RESP: the access was denied.
pub const STATUS_DENIED: u8 = 1;

/// Length of the HELLO payload.
pub const HELLO_LEN: usize = 25 + 8 + NONCE_LEN;
/// Length of the HELLO_OK payload without a proof (no cluster secret).
pub const HELLO_OK_LEN: usize = 16;
/// Length of the HELLO_OK payload with the acceptor's proof.
pub const HELLO_OK_AUTH_LEN: usize = HELLO_OK_LEN + MAC_LEN;
/// Length of a nonce.
pub const NONCE_LEN: usize = 32;
/// Length of a proof (HMAC-SHA256).
pub const MAC_LEN: usize = 32;
/// The role byte of the dialer's proof.
pub const ROLE_DIALER: u8 = 1;
/// The role byte of the acceptor's proof.
pub const ROLE_ACCEPTOR: u8 = 2;
/// Longest REJECT reason sent (longer reasons are cut).
pub const MAX_REJECT_LEN: usize = 1024;
/// Largest frame payload accepted before the handshake completed.
pub const HANDSHAKE_MAX_FRAME: u32 = 4096;
/// Most bytes a request or answer adds in front of the user's bytes (READ: 20).
pub const MAX_META: usize = 20;

/// Why a connection is closed. Its `Display` is the log line's reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The envelope is invalid (bad magic, version, flags, oversized, checksum).
    #[error("{0}")]
    Frame(#[from] FrameError),
    /// A frame's payload is not what its kind requires.
    #[error("malformed {what} frame ({len} bytes)")]
    Malformed {
        /// Which frame.
        what: &'static str,
        /// Its payload length.
        len: usize,
    },
    /// A frame of a kind not allowed at this point of the connection.
    #[error("unexpected frame kind {kind} {when}")]
    UnexpectedKind {
        /// The kind received.
        kind: u8,
        /// Where in the connection's life.
        when: &'static str,
    },
    /// A status byte other than ok or denied.
    #[error("bad status byte {0}")]
    BadStatus(u8),
    /// The HELLO or HELLO_OK names another cluster.
    #[error("wrong cluster id {got} (expected {expected})")]
    WrongCluster {
        /// Received.
        got: u64,
        /// The one expected of it.
        expected: u64,
    },
    /// The HELLO's node id is not one of the peers (configured, or given since with `set_peers`).
    #[error("unknown node id {0} (not a member this node knows)")]
    UnknownNode(u64),
    /// The HELLO's node id is our own.
    #[error("node id {0} is this node's own id")]
    SelfId(u64),
    /// The dialer meant to reach another node.
    #[error("the dialer meant to reach node {target}, but this is node {local}")]
    WrongTarget {
        /// Whom the dialer meant.
        target: u64,
        /// Who we are.
        local: u64,
    },
    /// The HELLO's version differs from ours.
    #[error("protocol version {got} not supported (this build speaks {expected})")]
    Version {
        /// Received.
        got: u8,
        /// Ours.
        expected: u8,
    },
    /// The acceptor is not the node we dialed.
    #[error("dialed node {expected} but the acceptor is node {got}")]
    WrongPeer {
        /// Whom we dialed.
        expected: u64,
        /// Who answered.
        got: u64,
    },
    /// The dialer's proof does not verify: it does not know the cluster secret.
    #[error("authentication failed: node {node} did not prove it knows the cluster secret")]
    AuthFailed {
        /// The node id the dialer claimed.
        node: u64,
    },
    /// The acceptor did not prove it knows the cluster secret.
    #[error("authentication failed: the acceptor did not prove it knows the cluster secret")]
    PeerNotAuthenticated,
    /// The acceptor asks for a proof but no cluster secret is configured here.
    #[error("the peer requires a cluster secret and none is configured on this node")]
    NoSecret,
    /// The peer presented another configuration digest than the one expected of it.
    #[error(
        "stale configuration: node {node} was configured with another member list or other addresses \
         than this node knows for it (digest {got:016x}, expected {expected:016x})"
    )]
    StaleConfig {
        /// The dialer.
        node: u64,
        /// The dialer's digest.
        got: u64,
        /// The one expected of it.
        expected: u64,
    },
    /// The OS gave no random bytes for a nonce.
    #[error("no random bytes from the OS: {0}")]
    Entropy(String),
    /// The acceptor refused our HELLO.
    #[error("rejected by the peer: {0}")]
    Rejected(String),
    /// The handshake did not complete in time.
    #[error("handshake timeout after {0:?}")]
    HandshakeTimeout(Duration),
    /// The stream ended inside a frame.
    #[error("connection closed in the middle of a frame ({0} bytes of it received)")]
    Truncated(usize),
    /// An answer for a token we have no request for.
    #[error("answer for unknown token {0}")]
    UnknownToken(u64),
    /// A request reused the token of one still unanswered.
    #[error("request with token {0} while one with that token is pending")]
    DuplicateToken(u64),
    /// The peer does not read the answers we owe it.
    #[error("peer does not read its answers ({0} bytes queued)")]
    NotReading(usize),
    /// A newer connection from the same peer took this one's place.
    #[error("replaced by a newer connection from the same peer")]
    Replaced,
    /// The peer left the configuration.
    #[error("peer removed from the configuration")]
    Removed,
    /// The TLS layer refused the connection (handshake or record error).
    #[error("{0}")]
    Tls(String),
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The dialer's greeting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The dialer's cluster.
    pub cluster_id: u64,
    /// The dialer's node id.
    pub node_id: u64,
    /// The node the dialer meant to reach.
    pub target: u64,
    /// The dialer's protocol version.
    pub version: u8,
    /// [`config_digest`] of the dialer's member list.
    pub config_digest: u64,
    /// The dialer's nonce (zero without a cluster secret).
    pub nonce: [u8; NONCE_LEN],
}

impl Hello {
    /// The payload bytes.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[0..8].copy_from_slice(&self.cluster_id.to_le_bytes());
        b[8..16].copy_from_slice(&self.node_id.to_le_bytes());
        b[16..24].copy_from_slice(&self.target.to_le_bytes());
        b[24] = self.version;
        b[25..33].copy_from_slice(&self.config_digest.to_le_bytes());
        b[33..].copy_from_slice(&self.nonce);
        b
    }

    /// Parses a payload.
    pub fn decode(b: &[u8]) -> Result<Self, ProtocolError> {
        if b.len() != HELLO_LEN {
            return Err(ProtocolError::Malformed { what: "HELLO", len: b.len() });
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&b[33..]);
        Ok(Hello {
            cluster_id: u64_at(b, 0),
            node_id: u64_at(b, 8),
            target: u64_at(b, 16),
            version: b[24],
            config_digest: u64_at(b, 25),
            nonce,
        })
    }
}

/// The acceptor's acceptance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HelloOk {
    /// The acceptor's cluster.
    pub cluster_id: u64,
    /// The acceptor's node id.
    pub node_id: u64,
    /// The acceptor's proof (with a cluster secret).
    pub proof: Option<[u8; MAC_LEN]>,
}

impl HelloOk {
    /// The payload bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HELLO_OK_AUTH_LEN);
        b.extend_from_slice(&self.cluster_id.to_le_bytes());
        b.extend_from_slice(&self.node_id.to_le_bytes());
        if let Some(p) = &self.proof {
            b.extend_from_slice(p);
        }
        b
    }

    /// Parses a payload.
    pub fn decode(b: &[u8]) -> Result<Self, ProtocolError> {
        let proof = match b.len() {
            HELLO_OK_LEN => None,
            HELLO_OK_AUTH_LEN => Some(fixed32(&b[HELLO_OK_LEN..])),
            len => return Err(ProtocolError::Malformed { what: "HELLO_OK", len }),
        };
        Ok(HelloOk { cluster_id: u64_at(b, 0), node_id: u64_at(b, 8), proof })
    }
}

fn fixed32(b: &[u8]) -> [u8; 32] {
    let mut a = [0u8; 32];
    a.copy_from_slice(b);
    a
}

/// Parses a CHALLENGE (a nonce) or AUTH (a proof) payload: exactly 32 bytes.
pub fn decode_32(b: &[u8], what: &'static str) -> Result<[u8; 32], ProtocolError> {
    if b.len() != 32 {
        return Err(ProtocolError::Malformed { what, len: b.len() });
    }
    Ok(fixed32(b))
}

/// The HMAC-SHA256 of the handshake (see the module docs), ready to be finalized or
/// verified.
#[allow(clippy::too_many_arguments)]
pub fn proof_mac(
    secret: &[u8],
    role: u8,
    cluster_id: u64,
    dialer: u64,
    acceptor: u64,
    digest: u64,
    acceptor_nonce: &[u8; NONCE_LEN],
    dialer_nonce: &[u8; NONCE_LEN],
) -> hmac::Hmac<sha2::Sha256> {
    use hmac::Mac;
    let mut m = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    m.update(b"replog-peer");
    m.update(&[role]);
    for x in [cluster_id, dialer, acceptor, digest] {
        m.update(&x.to_le_bytes());
    }
    m.update(acceptor_nonce);
    m.update(dialer_nonce);
    m
}

/// The digest of a member list, for [`crate::TcpConfig::config_digest`]: the first 8
/// bytes (little-endian) of SHA-256 over the members sorted by id, each as
/// `id=address\n`. Order of the input does not matter; 0 is never returned.
pub fn config_digest<A: std::fmt::Display>(members: impl IntoIterator<Item = (u64, A)>) -> u64 {
    use sha2::Digest;
    let mut list: Vec<(u64, String)> = members.into_iter().map(|(id, a)| (id, a.to_string())).collect();
    list.sort();
    let mut h = sha2::Sha256::new();
    for (id, a) in &list {
        h.update(format!("{id}={a}\n").as_bytes());
    }
    let out = h.finalize();
    u64_at(&out, 0).max(1)
}

/// The fixed part of a WRITE: token, offset.
pub fn write_meta(token: u64, offset: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&token.to_le_bytes());
    b[8..16].copy_from_slice(&offset.to_le_bytes());
    b
}

/// Parses a WRITE payload into (token, offset, data) without copying the data.
pub fn decode_write(p: &Bytes) -> Result<(u64, u64, Bytes), ProtocolError> {
    if p.len() < 16 {
        return Err(ProtocolError::Malformed { what: "WRITE", len: p.len() });
    }
    Ok((u64_at(p, 0), u64_at(p, 8), p.slice(16..)))
}

/// A READ payload: token, offset, len.
pub fn read_meta(token: u64, offset: u64, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..8].copy_from_slice(&token.to_le_bytes());
    b[8..16].copy_from_slice(&offset.to_le_bytes());
    b[16..20].copy_from_slice(&len.to_le_bytes());
    b
}

/// Parses a READ payload into (token, offset, len).
pub fn decode_read(p: &[u8]) -> Result<(u64, u64, u32), ProtocolError> {
    if p.len() != 20 {
        return Err(ProtocolError::Malformed { what: "READ", len: p.len() });
    }
    let len = u32::from_le_bytes([p[16], p[17], p[18], p[19]]);
    Ok((u64_at(p, 0), u64_at(p, 8), len))
}

/// The fixed part of a WRITE_ACK or READ_RESP: token, status.
pub fn answer_meta(token: u64, ok: bool) -> [u8; 9] {
    let mut b = [0u8; 9];
    b[0..8].copy_from_slice(&token.to_le_bytes());
    b[8] = if ok { STATUS_OK } else { STATUS_DENIED };
    b
}

/// Parses a WRITE_ACK or READ_RESP payload into (token, ok, bytes) without copying.
pub fn decode_answer(p: &Bytes, what: &'static str) -> Result<(u64, bool, Bytes), ProtocolError> {
    if p.len() < 9 {
        return Err(ProtocolError::Malformed { what, len: p.len() });
    }
    let ok = match p[8] {
        STATUS_OK => true,
        STATUS_DENIED => false,
        s => return Err(ProtocolError::BadStatus(s)),
    };
    Ok((u64_at(p, 0), ok, p.slice(9..)))
}

/// A REJECT payload (the reason, cut to [`MAX_REJECT_LEN`] bytes on a char boundary).
pub fn reject_payload(reason: &str) -> &[u8] {
    let mut end = reason.len().min(MAX_REJECT_LEN);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason.as_bytes()[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let h = Hello { cluster_id: 7, node_id: 2, target: 3, version: 1, config_digest: 9, nonce: [5; 32] };
        assert_eq!(Hello::decode(&h.encode()), Ok(h));
        let o = HelloOk { cluster_id: 7, node_id: 3, proof: None };
        assert_eq!(HelloOk::decode(&o.encode()), Ok(o));
        let o = HelloOk { cluster_id: 7, node_id: 3, proof: Some([8; 32]) };
        assert_eq!(HelloOk::decode(&o.encode()), Ok(o));
        assert_eq!(config_digest([(2, "b"), (1, "a")]), config_digest([(1, "a"), (2, "b")]));
        assert_ne!(config_digest([(1, "a")]), config_digest([(1, "a"), (2, "b")]));
        let mut w = write_meta(5, 9).to_vec();
        w.extend_from_slice(b"abc");
        assert_eq!(decode_write(&Bytes::from(w)), Ok((5, 9, Bytes::from_static(b"abc"))));
        assert_eq!(decode_read(&read_meta(1, 2, 3)), Ok((1, 2, 3)));
        let mut a = answer_meta(4, false).to_vec();
        a.extend_from_slice(b"why");
        assert_eq!(decode_answer(&Bytes::from(a), "WRITE_ACK"), Ok((4, false, Bytes::from_static(b"why"))));
        assert_eq!(reject_payload(&"é".repeat(1000)).len(), 1024);
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u64 = 0x1234_5678;
        for len in 0..64 {
            for _ in 0..50 {
                let b: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                let bb = Bytes::from(b.clone());
                let _ = Hello::decode(&b);
                let _ = HelloOk::decode(&b);
                let _ = decode_32(&b, "AUTH");
                let _ = decode_write(&bb);
                let _ = decode_read(&b);
                let _ = decode_answer(&bb, "x");
            }
        }
    }
}
