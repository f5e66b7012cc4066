//! The TCP side channel of the RDMA transport: one connection per pair of replicas,
//! dialed by the lower id. It authenticates the peer, carries the queue-pair bootstrap
//! (QPN, GID/LID, PSN, region address and rkey) and its renewals, and the control-plane
//! messages. Frames are [`crate::envelope`] frames.
//!
//! ```text
//! kind  name        direction          payload (integers little-endian)
//!  1    HELLO       dialer -> acceptor cluster_id u64, dialer u64, acceptor u64, digest u64, nonce_d [32]
//!  2    CHALLENGE   acceptor -> dialer nonce_a [32]
//!  3    AUTH        dialer -> acceptor proof(1) [32]
//!  4    WELCOME     acceptor -> dialer proof(2) [32]
//!  5    REJECT      acceptor -> dialer reason (UTF-8, at most 1 KiB); then the acceptor closes
//! 16    MSG         either way         the message payload
//! 17    QP_OFFER    dialer -> acceptor generation u64, endpoint [, ack extension]
//! 18    QP_ACCEPT   acceptor -> dialer generation u64, endpoint [, ack extension]
//! 19    QP_READY    dialer -> acceptor generation u64
//! 20    QP_RENEW    acceptor -> dialer generation u64 (the acceptor's queue pair of that generation failed)
//!
//! endpoint = qpn u32, psn u32, lid u16, gid [16], region addr u64, rkey u32, region len u64
//! ack extension = version u8 (2), ack qpn u32, ack psn u32, ack area addr u64,
//!                 ack area rkey u32, ack area len u64,
//!                 (version >= 2) mirror addr u64, mirror rkey u32, mirror len u64 (0: none)
//!                 [, bytes of later versions]
//!
//! proof(role) = HMAC-SHA256(secret, "replog-rdma" || role u8 || cluster_id u64 || dialer u64
//!               || acceptor u64 || digest u64 || nonce_a || nonce_d)
//! ```
//!
//! The handshake is the one of `fallback-tcp` (mutual challenge-response over fresh
//! nonces, proofs compared in constant time, the member-list digest compared only after
//! the dialer's proof verified) with its own label, so a proof made for one kind of link
//! is never valid on the other. Without a cluster secret the proofs are zero and not
//! checked; a side with a secret refuses a peer that cannot prove it.
//!
//! The acknowledgement extension (version 1) offers the second, acknowledgement queue
//! pair and the acknowledgement area the receiver of the frame may write into (see the
//! transport's module docs). A bootstrap without it (an older peer, or a side with
//! `ack_area_len = 0`) connects the log queue pair only, and acknowledgements then go as
//! messages. Version 2 adds the **read mirror** (a region the receiver may RDMA READ and
//! not write; see the transport's module docs); a version-1 peer has none, and reads of
//! it go as messages. Version 0 is invalid; a version above 2 must carry at least the
//! version-2 fields, which are read, and the bytes after them are ignored (room for
//! later versions).
//!
//! Every decoder checks lengths and returns [`SideError`]; none panics.

use super::verbs::{AckEndpoint, Endpoint, MirrorEndpoint, ACK_ENDPOINT_LEN, ENDPOINT_LEN, MIRROR_ENDPOINT_LEN};
use crate::envelope::{self, Decoder, FrameError};
use bytes::BytesMut;
use std::io::{self, Read, Write};
use std::net::TcpStream;

/// Frame kinds.
pub(crate) mod kind {
    pub(crate) const HELLO: u8 = 1;
    pub(crate) const CHALLENGE: u8 = 2;
    pub(crate) const AUTH: u8 = 3;
    pub(crate) const WELCOME: u8 = 4;
    pub(crate) const REJECT: u8 = 5;
    pub(crate) const MSG: u8 = 16;
    pub(crate) const QP_OFFER: u8 = 17;
    pub(crate) const QP_ACCEPT: u8 = 18;
    pub(crate) const QP_READY: u8 = 19;
    pub(crate) const QP_RENEW: u8 = 20;
}

/// Nonce and proof length.
pub(crate) const NONCE_LEN: usize = 32;
/// HELLO payload length.
pub(crate) const HELLO_LEN: usize = 32 + NONCE_LEN;
/// Longest REJECT reason sent.
const MAX_REJECT_LEN: usize = 1024;

/// Why a side-channel connection is closed. Its `Display` is the log line's reason.
#[derive(Debug, thiserror::Error)]
pub enum SideError {
    /// An invalid envelope.
    #[error("{0}")]
    Frame(#[from] FrameError),
    /// A payload of the wrong size for its kind.
    #[error("malformed {what} frame ({len} bytes)")]
    Malformed {
        /// Which frame.
        what: &'static str,
        /// Its payload length.
        len: usize,
    },
    /// A frame not allowed at this point.
    #[error("unexpected frame kind {kind} {when}")]
    Unexpected {
        /// The kind received.
        kind: u8,
        /// Where in the connection's life.
        when: &'static str,
    },
    /// Another cluster.
    #[error("wrong cluster id {got} (expected {expected})")]
    WrongCluster {
        /// Received.
        got: u64,
        /// Ours.
        expected: u64,
    },
    /// The HELLO names a node that is not a configured peer, or the wrong direction.
    #[error("node {0} is not a configured peer that dials this node")]
    UnknownNode(u64),
    /// The dialer meant another node.
    #[error("the dialer meant to reach node {target}, but this is node {local}")]
    WrongTarget {
        /// Whom the dialer meant.
        target: u64,
        /// Who we are.
        local: u64,
    },
    /// The dialer's proof does not verify.
    #[error("authentication failed: node {0} did not prove it knows the cluster secret")]
    AuthFailed(u64),
    /// The acceptor's proof does not verify.
    #[error("authentication failed: the acceptor did not prove it knows the cluster secret")]
    PeerNotAuthenticated,
    /// Another member list (or other settings the caller folds into the digest:
    /// `replog` adds durability and landing, see [`super::RdmaConfig::config_digest`]).
    #[error(
        "stale configuration: node {node} has configuration digest {got:016x}, this node {expected:016x} \
         (member list, durability or rdma landing differ)"
    )]
    StaleConfig {
        /// The peer.
        node: u64,
        /// Its digest.
        got: u64,
        /// Ours.
        expected: u64,
    },
    /// The acceptor refused us.
    #[error("refused by the peer: {0}")]
    Rejected(String),
    /// No randomness for a nonce.
    #[error("no entropy for a nonce: {0}")]
    Entropy(String),
    /// The handshake did not finish in time.
    #[error("handshake timed out")]
    Timeout,
    /// The socket failed or closed.
    #[error("side channel: {0}")]
    Io(#[from] io::Error),
}

/// A fresh nonce from the OS.
pub(crate) fn nonce() -> Result<[u8; NONCE_LEN], SideError> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| SideError::Entropy(e.to_string()))?;
    Ok(n)
}

/// The proof of `role` (1: dialer, 2: acceptor); zero without a secret.
#[allow(clippy::too_many_arguments)]
pub(crate) fn proof(
    secret: Option<&[u8]>,
    role: u8,
    cluster_id: u64,
    dialer: u64,
    acceptor: u64,
    digest: u64,
    nonce_a: &[u8; NONCE_LEN],
    nonce_d: &[u8; NONCE_LEN],
) -> [u8; NONCE_LEN] {
    use hmac::Mac;
    let Some(secret) = secret else { return [0; NONCE_LEN] };
    let mut m = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    m.update(b"replog-rdma");
    m.update(&[role]);
    for x in [cluster_id, dialer, acceptor, digest] {
        m.update(&x.to_le_bytes());
    }
    m.update(nonce_a);
    m.update(nonce_d);
    m.finalize().into_bytes().into()
}

/// Checks `got` against the expected proof in constant time (always true without a
/// secret).
pub(crate) fn verify(secret: Option<&[u8]>, expected: &[u8; NONCE_LEN], got: &[u8]) -> bool {
    if secret.is_none() {
        return true;
    }
    if got.len() != NONCE_LEN {
        return false;
    }
    expected.iter().zip(got).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// The HELLO payload.
pub(crate) fn hello(cluster: u64, dialer: u64, acceptor: u64, digest: u64, nonce_d: &[u8; NONCE_LEN]) -> Vec<u8> {
    let mut b = Vec::with_capacity(HELLO_LEN);
    for x in [cluster, dialer, acceptor, digest] {
        b.extend_from_slice(&x.to_le_bytes());
    }
    b.extend_from_slice(nonce_d);
    b
}

/// A parsed HELLO.
pub(crate) struct Hello {
    pub(crate) cluster: u64,
    pub(crate) dialer: u64,
    pub(crate) acceptor: u64,
    pub(crate) digest: u64,
    pub(crate) nonce_d: [u8; NONCE_LEN],
}

pub(crate) fn u64_at(b: &[u8], i: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?))
}

/// Parses a HELLO payload.
pub(crate) fn decode_hello(p: &[u8]) -> Result<Hello, SideError> {
    let bad = || SideError::Malformed { what: "HELLO", len: p.len() };
    if p.len() != HELLO_LEN {
        return Err(bad());
    }
    Ok(Hello {
        cluster: u64_at(p, 0).ok_or_else(bad)?,
        dialer: u64_at(p, 8).ok_or_else(bad)?,
        acceptor: u64_at(p, 16).ok_or_else(bad)?,
        digest: u64_at(p, 24).ok_or_else(bad)?,
        nonce_d: decode32("HELLO", p.get(32..).unwrap_or_default())?,
    })
}

/// Parses a 32-byte nonce or proof.
pub(crate) fn decode32(what: &'static str, p: &[u8]) -> Result<[u8; NONCE_LEN], SideError> {
    p.try_into().map_err(|_| SideError::Malformed { what, len: p.len() })
}

/// Parses a payload made of a generation number and optionally more bytes of exactly
/// `rest` length.
pub(crate) fn decode_gen<'a>(what: &'static str, p: &'a [u8], rest: usize) -> Result<(u64, &'a [u8]), SideError> {
    match (u64_at(p, 0), p.get(8..)) {
        (Some(gen), Some(tail)) if p.len() == 8 + rest => Ok((gen, tail)),
        _ => Err(SideError::Malformed { what, len: p.len() }),
    }
}

/// Version of the bootstrap's acknowledgement extension this side writes.
pub(crate) const ACK_EXT_VERSION: u8 = 2;

/// Encodes a QP_OFFER/QP_ACCEPT payload. The mirror rides on the acknowledgement
/// extension (version 2): without an acknowledgement path there is no queue pair to read
/// it on.
pub(crate) fn encode_bootstrap(
    gen: u64,
    ep: &Endpoint,
    ack: Option<&AckEndpoint>,
    mirror: Option<&MirrorEndpoint>,
) -> Vec<u8> {
    let mut p = Vec::with_capacity(8 + ENDPOINT_LEN + 1 + ACK_ENDPOINT_LEN + MIRROR_ENDPOINT_LEN);
    p.extend_from_slice(&gen.to_le_bytes());
    ep.encode(&mut p);
    if let Some(a) = ack {
        p.push(ACK_EXT_VERSION);
        a.encode(&mut p);
        mirror.copied().unwrap_or(MirrorEndpoint { addr: 0, rkey: 0, len: 0 }).encode(&mut p);
    }
    p
}

/// What a QP_OFFER/QP_ACCEPT carries: generation, endpoint, and from the extension the
/// acknowledgement endpoint and the read mirror.
pub(crate) type Bootstrap = (u64, Endpoint, Option<AckEndpoint>, Option<MirrorEndpoint>);

/// Parses a QP_OFFER/QP_ACCEPT payload: generation, endpoint and the acknowledgement
/// extension if present (see the module docs for the versioning rule).
pub(crate) fn decode_bootstrap(what: &'static str, p: &[u8]) -> Result<Bootstrap, SideError> {
    let bad = || SideError::Malformed { what, len: p.len() };
    let gen = u64_at(p, 0).ok_or_else(bad)?;
    let ep = Endpoint::decode(p.get(8..8 + ENDPOINT_LEN).ok_or_else(bad)?).ok_or_else(bad)?;
    let ext = p.get(8 + ENDPOINT_LEN..).unwrap_or_default();
    let Some((&version, body)) = ext.split_first() else { return Ok((gen, ep, None, None)) };
    if version == 0 || body.len() < ACK_ENDPOINT_LEN {
        return Err(bad());
    }
    let ack = AckEndpoint::decode(body).ok_or_else(bad)?;
    if version == 1 {
        return Ok((gen, ep, Some(ack), None));
    }
    let m = body.get(ACK_ENDPOINT_LEN..).and_then(MirrorEndpoint::decode).ok_or_else(bad)?;
    Ok((gen, ep, Some(ack), (m.len > 0).then_some(m)))
}

/// A REJECT payload: the reason, cut to its limit on a character boundary.
pub(crate) fn reject(reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_REJECT_LEN);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason.as_bytes()[..end].to_vec()
}

/// A non-blocking framed TCP connection.
pub(crate) struct Conn {
    pub(crate) stream: TcpStream,
    rbuf: BytesMut,
    wbuf: Vec<u8>,
    wpos: usize,
    /// The non-blocking connect has not completed yet (dialer).
    pub(crate) connecting: bool,
    decoder: Decoder,
}

impl Conn {
    pub(crate) fn new(stream: TcpStream, connecting: bool, max_frame: u32) -> Conn {
        Conn { stream, rbuf: BytesMut::new(), wbuf: Vec::new(), wpos: 0, connecting, decoder: Decoder::new(max_frame) }
    }

    /// Bytes queued and not yet written.
    pub(crate) fn queued(&self) -> usize {
        self.wbuf.len() - self.wpos
    }

    /// Queues a frame and tries to write it at once.
    pub(crate) fn push(&mut self, kind: u8, parts: &[&[u8]]) -> Result<(), SideError> {
        let h = envelope::header(kind, parts);
        self.wbuf.extend_from_slice(&h);
        for p in parts {
            self.wbuf.extend_from_slice(p);
        }
        if self.connecting {
            return Ok(());
        }
        self.flush()
    }

    /// Writes what the socket takes.
    pub(crate) fn flush(&mut self) -> Result<(), SideError> {
        while self.wpos < self.wbuf.len() {
            match self.stream.write(&self.wbuf[self.wpos..]) {
                Ok(0) => return Err(SideError::Io(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        if self.wpos == self.wbuf.len() {
            self.wbuf.clear();
            self.wpos = 0;
        } else if self.wpos > (1 << 20) {
            self.wbuf.drain(..self.wpos);
            self.wpos = 0;
        }
        Ok(())
    }

    /// Reads what the socket has (bounded per call) and decodes complete frames into
    /// `out`. `Ok(false)`: the peer closed.
    pub(crate) fn read_frames(&mut self, out: &mut Vec<envelope::Frame>) -> Result<bool, SideError> {
        let mut scratch = [0u8; 64 * 1024];
        for _ in 0..64 {
            match self.stream.read(&mut scratch) {
                Ok(0) => {
                    self.decode(out)?;
                    return Ok(false);
                }
                Ok(n) => {
                    self.rbuf.extend_from_slice(&scratch[..n]);
                    if n < scratch.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.decode(out)?;
        Ok(true)
    }

    fn decode(&mut self, out: &mut Vec<envelope::Frame>) -> Result<(), SideError> {
        while !self.rbuf.is_empty() {
            match self.decoder.decode(&mut self.rbuf)? {
                Some(f) => out.push(f),
                None => break,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoders_refuse_garbage_without_panicking() {
        for len in [0usize, 1, 31, 33, 63, 65, 200] {
            let b = vec![0xa5u8; len];
            assert!(decode_hello(&b).is_err() || len == HELLO_LEN);
            assert!(decode32("AUTH", &b).is_err() || len == NONCE_LEN);
            assert!(decode_gen("QP_READY", &b, 0).is_err() || len == 8);
            assert!(crate::rdma::verbs::Endpoint::decode(&b).is_none() || len == crate::rdma::verbs::ENDPOINT_LEN);
        }
        let h = hello(7, 1, 2, 9, &[3; NONCE_LEN]);
        let p = match decode_hello(&h) {
            Ok(p) => p,
            Err(e) => panic!("a HELLO we made does not decode: {e}"),
        };
        assert_eq!((p.cluster, p.dialer, p.acceptor, p.digest, p.nonce_d), (7, 1, 2, 9, [3; NONCE_LEN]));
    }

    /// `decode_bootstrap` of a QP_OFFER, its error as text (comparable).
    fn offer(p: &[u8]) -> Result<Bootstrap, String> {
        decode_bootstrap("QP_OFFER", p).map_err(|e| e.to_string())
    }

    #[test]
    fn bootstrap_frames_are_versioned_and_bounds_checked() {
        let ep = Endpoint { qpn: 7, psn: 9, lid: 0, gid: [4; 16], addr: 0x1000, rkey: 0x55, len: 1 << 20 };
        let ack = AckEndpoint { qpn: 8, psn: 10, addr: 0x2000, rkey: 0x66, len: 65536 };
        let mirror = MirrorEndpoint { addr: 0x3000, rkey: 0x77, len: 4096 };
        // No extension, and version 2 with and without a mirror, round-trip.
        let v0 = encode_bootstrap(3, &ep, None, Some(&mirror));
        assert_eq!(v0.len(), 8 + ENDPOINT_LEN);
        assert_eq!(offer(&v0), Ok((3, ep, None, None)), "v0");
        let v2 = encode_bootstrap(4, &ep, Some(&ack), Some(&mirror));
        assert_eq!(v2.len(), 8 + ENDPOINT_LEN + 1 + ACK_ENDPOINT_LEN + MIRROR_ENDPOINT_LEN);
        assert_eq!(offer(&v2), Ok((4, ep, Some(ack), Some(mirror))), "v2");
        let v2_none = encode_bootstrap(4, &ep, Some(&ack), None);
        assert_eq!(offer(&v2_none), Ok((4, ep, Some(ack), None)), "v2 without mirror");
        // Version 1 (an older peer): the acknowledgement fields only, no mirror.
        let mut v1 = v2[..8 + ENDPOINT_LEN + 1 + ACK_ENDPOINT_LEN].to_vec();
        v1[8 + ENDPOINT_LEN] = 1;
        assert_eq!(offer(&v1), Ok((4, ep, Some(ack), None)), "v1");
        // A later version with more fields: the version-2 fields are read, the rest ignored.
        let mut v3 = v2.clone();
        v3[8 + ENDPOINT_LEN] = 3;
        v3.extend_from_slice(&[0xee; 17]);
        assert_eq!(offer(&v3), Ok((4, ep, Some(ack), Some(mirror))), "v3");
        // Version 0 in the extension, and every truncation, are refused.
        let mut bad = v2.clone();
        bad[8 + ENDPOINT_LEN] = 0;
        assert!(decode_bootstrap("QP_OFFER", &bad).is_err());
        for len in 0..v2.len() {
            let r = decode_bootstrap("QP_ACCEPT", &v2[..len]);
            assert_eq!(r.is_ok(), len == v0.len(), "a {len}-byte prefix");
        }
        for len in 0..300 {
            let _ = decode_bootstrap("QP_ACCEPT", &vec![0xa5u8; len]);
        }
    }

    #[test]
    fn proofs_bind_role_and_nonces() {
        let s = Some(&b"secret"[..]);
        let a = proof(s, 1, 1, 1, 2, 0, &[1; 32], &[2; 32]);
        assert!(verify(s, &a, &a));
        assert_ne!(a, proof(s, 2, 1, 1, 2, 0, &[1; 32], &[2; 32]), "role is bound");
        assert_ne!(a, proof(s, 1, 1, 1, 2, 0, &[9; 32], &[2; 32]), "acceptor nonce is bound");
        assert_ne!(a, proof(Some(b"other"), 1, 1, 1, 2, 0, &[1; 32], &[2; 32]), "secret is bound");
        assert!(!verify(s, &a, &[0; 32]));
        assert!(!verify(s, &a, &a[..31]));
        assert!(verify(None, &[0; 32], b"anything"));
    }

    #[test]
    fn reject_reason_is_cut_on_a_char_boundary() {
        let long = "é".repeat(1000);
        let r = reject(&long);
        assert!(r.len() <= MAX_REJECT_LEN);
        assert!(std::str::from_utf8(&r).is_ok());
    }
}
