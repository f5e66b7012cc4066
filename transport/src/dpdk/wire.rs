//! The DPDK transport's frames: Ethernet with ethertype [`ETHERTYPE`], then our
//! 52-byte header, then a payload. Pure code (no DPDK): every decoder checks lengths
//! and returns [`WireError`] on garbage; none panics.
//!
//! ```text
//! offset size field (after the 14-byte Ethernet header; integers little-endian)
//!  0     1    version     VERSION
//!  1     1    kind        DATA 1, ACK 2, HELLO 3
//!  2     2    len         payload bytes after the header
//!  4     4    crc         CRC32C of the header (crc field zero) and the payload
//!  8     8    src         the sender's node id
//! 16     8    src_epoch   the sender's incarnation of this link (random, new on every reset)
//! 24     8    dst_epoch   the receiver's incarnation as the sender knows it (0: unknown)
//! 32     8    seq         DATA: this frame's sequence number (per link and direction, from 1)
//! 40     8    ack         cumulative acknowledgement: the next DATA seq the sender expects
//! 48     2    frag        DATA: index of this fragment in its record
//! 50     2    frags       DATA: number of fragments of the record (>= 1)
//! 52     len  payload     DATA: a fragment; ACK: sack u64 (bit i: seq ack+1+i received);
//!                         HELLO: see [`Hello`]
//! ```
//!
//! A *record* (what one `send`, `write`, `read` or completion produces) is split into
//! fragments of at most `mtu - HEADER_LEN` bytes, sent as consecutive DATA frames and
//! joined again in sequence order. A record is `kind u8` then:
//!
//! ```text
//! 16 MSG        payload
//! 17 WRITE      token u64, offset u64, data
//! 18 WRITE_ACK  token u64, status u8 (0 ok, 1 denied), ack or detail bytes
//! 19 READ       token u64, offset u64, len u32
//! 20 READ_RESP  token u64, status u8 (0 ok, 1 denied), data or detail bytes
//! ```
//! (the same kinds and layouts as `fallback-tcp`'s peer link).

use bytes::Bytes;

/// Our ethertype: IEEE 802 "local experimental ethertype 1", never a kernel protocol.
pub const ETHERTYPE: u16 = 0x88B5;
/// Ethernet header length (no VLAN tag).
pub const ETH_LEN: usize = 14;
/// Our header's length.
pub const HEADER_LEN: usize = 52;
/// The frame format version spoken by this build.
pub const VERSION: u8 = 1;

/// Frame kinds.
pub mod kind {
    /// A fragment of a record, sequenced and acknowledged.
    pub const DATA: u8 = 1;
    /// A cumulative acknowledgement with a selective-ack bitmap (also the keepalive).
    pub const ACK: u8 = 2;
    /// The handshake.
    pub const HELLO: u8 = 3;
}

/// Record kinds (the first byte of a reassembled record).
pub mod rec {
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

/// Most bytes a record adds in front of the user's bytes (READ: 21).
pub const MAX_META: usize = 21;

/// Why bytes are not a valid frame or record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Shorter than the headers.
    #[error("frame of {0} bytes is shorter than the headers")]
    Short(usize),
    /// Another ethertype (kernel traffic on the same interface): not ours.
    #[error("ethertype {0:#06x} is not ours")]
    Ethertype(u16),
    /// Another frame format version.
    #[error("frame version {0} not supported (this build speaks {VERSION})")]
    Version(u8),
    /// The length field disagrees with the frame.
    #[error("length field {len} but {have} payload bytes")]
    Length {
        /// The length field.
        len: usize,
        /// The bytes present.
        have: usize,
    },
    /// The checksum does not match.
    #[error("checksum mismatch")]
    Checksum,
    /// A kind we do not know.
    #[error("unknown {what} kind {kind}")]
    Kind {
        /// Frame or record.
        what: &'static str,
        /// The kind byte.
        kind: u8,
    },
    /// A payload that is not what its kind requires.
    #[error("malformed {what} ({len} bytes)")]
    Malformed {
        /// Which thing.
        what: &'static str,
        /// Its length.
        len: usize,
    },
}

/// The addresses of a received frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Macs {
    /// Destination.
    pub dst: [u8; 6],
    /// Source.
    pub src: [u8; 6],
}

/// A decoded header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Header {
    /// [`kind`].
    pub kind: u8,
    /// The sender's node id.
    pub src: u64,
    /// The sender's link incarnation.
    pub src_epoch: u64,
    /// The receiver's link incarnation as the sender knows it.
    pub dst_epoch: u64,
    /// DATA sequence number.
    pub seq: u64,
    /// Cumulative acknowledgement.
    pub ack: u64,
    /// Fragment index.
    pub frag: u16,
    /// Fragment count.
    pub frags: u16,
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// Writes a whole frame (Ethernet header, our header, payload) into `out`, which must
/// be exactly `ETH_LEN + HEADER_LEN + payload.len()` bytes long.
pub fn write_frame(out: &mut [u8], dst_mac: &[u8; 6], src_mac: &[u8; 6], h: &Header, payload: &[u8]) {
    debug_assert_eq!(out.len(), ETH_LEN + HEADER_LEN + payload.len());
    let len = u16::try_from(payload.len()).expect("a frame payload fits the MTU");
    out[0..6].copy_from_slice(dst_mac);
    out[6..12].copy_from_slice(src_mac);
    out[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    let b = &mut out[ETH_LEN..];
    b[0] = VERSION;
    b[1] = h.kind;
    b[2..4].copy_from_slice(&len.to_le_bytes());
    b[4..8].copy_from_slice(&[0; 4]);
    b[8..16].copy_from_slice(&h.src.to_le_bytes());
    b[16..24].copy_from_slice(&h.src_epoch.to_le_bytes());
    b[24..32].copy_from_slice(&h.dst_epoch.to_le_bytes());
    b[32..40].copy_from_slice(&h.seq.to_le_bytes());
    b[40..48].copy_from_slice(&h.ack.to_le_bytes());
    b[48..50].copy_from_slice(&h.frag.to_le_bytes());
    b[50..52].copy_from_slice(&h.frags.to_le_bytes());
    b[HEADER_LEN..].copy_from_slice(payload);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..HEADER_LEN]), &b[HEADER_LEN..]);
    b[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// A whole frame as a vector (tests and the handshake).
pub fn frame(dst_mac: &[u8; 6], src_mac: &[u8; 6], h: &Header, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; ETH_LEN + HEADER_LEN + payload.len()];
    write_frame(&mut v, dst_mac, src_mac, h, payload);
    v
}

/// Parses a received Ethernet frame: the destination and source MACs, our header and
/// the payload.
pub fn parse_frame(f: &[u8]) -> Result<(Macs, Header, &[u8]), WireError> {
    if f.len() < ETH_LEN {
        return Err(WireError::Short(f.len()));
    }
    let et = u16::from_be_bytes([f[12], f[13]]);
    if et != ETHERTYPE {
        return Err(WireError::Ethertype(et));
    }
    if f.len() < ETH_LEN + HEADER_LEN {
        return Err(WireError::Short(f.len()));
    }
    let mut macs = Macs::default();
    macs.dst.copy_from_slice(&f[0..6]);
    macs.src.copy_from_slice(&f[6..12]);
    let b = &f[ETH_LEN..];
    if b[0] != VERSION {
        return Err(WireError::Version(b[0]));
    }
    let len = usize::from(u16_at(b, 2));
    // Ethernet pads short frames to 60 bytes: trailing bytes beyond `len` are allowed.
    let have = b.len() - HEADER_LEN;
    if len > have {
        return Err(WireError::Length { len, have });
    }
    let expected = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let mut c = crc32c::crc32c(&b[0..4]);
    c = crc32c::crc32c_append(c, &[0; 4]);
    c = crc32c::crc32c_append(c, &b[8..HEADER_LEN]);
    c = crc32c::crc32c_append(c, &b[HEADER_LEN..HEADER_LEN + len]);
    if c != expected {
        return Err(WireError::Checksum);
    }
    let h = Header {
        kind: b[1],
        src: u64_at(b, 8),
        src_epoch: u64_at(b, 16),
        dst_epoch: u64_at(b, 24),
        seq: u64_at(b, 32),
        ack: u64_at(b, 40),
        frag: u16_at(b, 48),
        frags: u16_at(b, 50),
    };
    if !matches!(h.kind, kind::DATA | kind::ACK | kind::HELLO) {
        return Err(WireError::Kind { what: "frame", kind: h.kind });
    }
    Ok((macs, h, &b[HEADER_LEN..HEADER_LEN + len]))
}

/// Length of a nonce and of a proof.
pub const NONCE_LEN: usize = 32;
/// Length of the HELLO payload.
pub const HELLO_LEN: usize = 8 + 8 + 1 + 8 + NONCE_LEN + 1 + 1 + NONCE_LEN;

/// The handshake payload, sent by each side of a link until both verified the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The sender's cluster.
    pub cluster_id: u64,
    /// The node the sender means to reach.
    pub target: u64,
    /// The sender's protocol version.
    pub version: u8,
    /// The digest of the sender's member list.
    pub config_digest: u64,
    /// The sender's nonce for its current link incarnation.
    pub nonce: [u8; NONCE_LEN],
    /// The sender has verified the receiver (for the epochs in the header).
    pub verified_you: bool,
    /// The sender considers the link up (it needs no answer).
    pub up: bool,
    /// The sender's proof (with a cluster secret, once it knows the receiver's nonce).
    pub proof: Option<[u8; NONCE_LEN]>,
}

impl Hello {
    /// The payload bytes.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[0..8].copy_from_slice(&self.cluster_id.to_le_bytes());
        b[8..16].copy_from_slice(&self.target.to_le_bytes());
        b[16] = self.version;
        b[17..25].copy_from_slice(&self.config_digest.to_le_bytes());
        b[25..57].copy_from_slice(&self.nonce);
        b[57] = u8::from(self.verified_you) | u8::from(self.up) << 1;
        b[58] = u8::from(self.proof.is_some());
        if let Some(p) = &self.proof {
            b[59..91].copy_from_slice(p);
        }
        b
    }

    /// Parses a payload.
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        if b.len() != HELLO_LEN || b[57] > 3 || b[58] > 1 {
            return Err(WireError::Malformed { what: "HELLO", len: b.len() });
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&b[25..57]);
        let proof = (b[58] == 1).then(|| {
            let mut p = [0u8; NONCE_LEN];
            p.copy_from_slice(&b[59..91]);
            p
        });
        Ok(Hello {
            cluster_id: u64_at(b, 0),
            target: u64_at(b, 8),
            version: b[16],
            config_digest: u64_at(b, 17),
            nonce,
            verified_you: b[57] & 1 != 0,
            up: b[57] & 2 != 0,
            proof,
        })
    }
}

/// The HMAC-SHA256 proof of a HELLO: `mac(secret, "replog-dpdk-link" || cluster_id ||
/// sender || receiver || digest || sender_epoch || receiver_epoch || receiver_nonce ||
/// sender_nonce)`. The receiver's fresh nonce and epoch (new on every link reset) keep
/// a proof from being replayed to a later incarnation; sender and receiver ids in that
/// order keep it from being reflected. The same construction as `fallback-tcp`'s
/// handshake (HMAC-SHA256 over both nonces), with its own label.
#[allow(clippy::too_many_arguments)]
pub fn proof(
    secret: &[u8],
    cluster_id: u64,
    sender: u64,
    receiver: u64,
    digest: u64,
    sender_epoch: u64,
    receiver_epoch: u64,
    receiver_nonce: &[u8; NONCE_LEN],
    sender_nonce: &[u8; NONCE_LEN],
) -> hmac::Hmac<sha2::Sha256> {
    use hmac::Mac;
    let mut m = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    m.update(b"replog-dpdk-link");
    for x in [cluster_id, sender, receiver, digest, sender_epoch, receiver_epoch] {
        m.update(&x.to_le_bytes());
    }
    m.update(receiver_nonce);
    m.update(sender_nonce);
    m
}

/// A decoded record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// A message.
    Msg(Bytes),
    /// A write request.
    Write {
        /// The issuer's token.
        token: u64,
        /// Where.
        offset: u64,
        /// What.
        data: Bytes,
    },
    /// A read request.
    Read {
        /// The issuer's token.
        token: u64,
        /// Where.
        offset: u64,
        /// How much at most.
        len: u32,
    },
    /// The answer to a write (`read == false`) or a read.
    Answer {
        /// Write or read.
        read: bool,
        /// The issuer's token.
        token: u64,
        /// Ok or denied.
        ok: bool,
        /// Ack, data or detail bytes.
        bytes: Bytes,
    },
}

/// Encodes a record's metadata (what precedes the user's bytes).
pub fn record_meta(rec: &Record, out: &mut Vec<u8>) {
    match rec {
        Record::Msg(_) => out.push(rec::MSG),
        Record::Write { token, offset, .. } => {
            out.push(rec::WRITE);
            out.extend_from_slice(&token.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
        }
        Record::Read { token, offset, len } => {
            out.push(rec::READ);
            out.extend_from_slice(&token.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
        }
        Record::Answer { read, token, ok, .. } => {
            out.push(if *read { rec::READ_RESP } else { rec::WRITE_ACK });
            out.extend_from_slice(&token.to_le_bytes());
            out.push(if *ok { 0 } else { 1 });
        }
    }
}

/// Parses a reassembled record.
pub fn decode_record(b: Bytes) -> Result<Record, WireError> {
    let Some(&k) = b.first() else {
        return Err(WireError::Malformed { what: "record", len: 0 });
    };
    let malformed = |what| WireError::Malformed { what, len: b.len() };
    match k {
        rec::MSG => Ok(Record::Msg(b.slice(1..))),
        rec::WRITE => {
            if b.len() < 17 {
                return Err(malformed("WRITE"));
            }
            Ok(Record::Write { token: u64_at(&b, 1), offset: u64_at(&b, 9), data: b.slice(17..) })
        }
        rec::READ => {
            if b.len() != 21 {
                return Err(malformed("READ"));
            }
            let len = u32::from_le_bytes([b[17], b[18], b[19], b[20]]);
            Ok(Record::Read { token: u64_at(&b, 1), offset: u64_at(&b, 9), len })
        }
        rec::WRITE_ACK | rec::READ_RESP => {
            if b.len() < 10 || b[9] > 1 {
                return Err(malformed("answer"));
            }
            Ok(Record::Answer { read: k == rec::READ_RESP, token: u64_at(&b, 1), ok: b[9] == 0, bytes: b.slice(10..) })
        }
        kind => Err(WireError::Kind { what: "record", kind }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 2];

    #[test]
    fn frame_round_trip_and_padding() {
        let h = Header { kind: kind::DATA, src: 7, src_epoch: 9, dst_epoch: 11, seq: 3, ack: 5, frag: 1, frags: 4 };
        let mut f = frame(&B, &A, &h, b"hello");
        f.extend_from_slice(&[0; 20]); // Ethernet padding
        assert_eq!(parse_frame(&f), Ok((Macs { dst: B, src: A }, h, &b"hello"[..])));
    }

    #[test]
    fn refuses_garbage_without_panicking() {
        let h = Header { kind: kind::ACK, ..Header::default() };
        let f = frame(&B, &A, &h, &[1; 8]);
        for cut in 0..f.len() {
            let _ = parse_frame(&f[..cut]);
        }
        let mut bad = f.clone();
        bad[ETH_LEN + HEADER_LEN] ^= 1;
        assert_eq!(parse_frame(&bad), Err(WireError::Checksum));
        let mut other = f.clone();
        other[12] = 0x86;
        other[13] = 0xdd;
        assert_eq!(parse_frame(&other), Err(WireError::Ethertype(0x86dd)));
        let mut v = f.clone();
        v[ETH_LEN] = 9;
        assert_eq!(parse_frame(&v), Err(WireError::Version(9)));
        let mut long = f;
        long[ETH_LEN + 2] = 200;
        assert!(matches!(parse_frame(&long), Err(WireError::Length { .. })));
        // Pseudo-random garbage of every length.
        let mut x = 0x1234_5678_u64;
        for len in 0..200 {
            let mut g: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            if g.len() > 14 {
                g[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
                g[ETH_LEN] = VERSION;
            }
            let _ = parse_frame(&g);
            let _ = decode_record(Bytes::from(g.clone()));
            let _ = Hello::decode(&g);
        }
    }

    #[test]
    fn hello_and_records_round_trip() {
        let h = Hello {
            cluster_id: 1,
            target: 2,
            version: VERSION,
            config_digest: 3,
            nonce: [4; 32],
            verified_you: true,
            up: false,
            proof: Some([5; 32]),
        };
        assert_eq!(Hello::decode(&h.encode()), Ok(h));
        let h2 = Hello { proof: None, verified_you: false, up: true, ..h };
        assert_eq!(Hello::decode(&h2.encode()), Ok(h2));
        for r in [
            Record::Msg(Bytes::from_static(b"m")),
            Record::Write { token: 1, offset: 2, data: Bytes::from_static(b"data") },
            Record::Read { token: 3, offset: 4, len: 5 },
            Record::Answer { read: false, token: 6, ok: true, bytes: Bytes::from_static(b"ack") },
            Record::Answer { read: true, token: 7, ok: false, bytes: Bytes::new() },
        ] {
            let mut v = Vec::new();
            record_meta(&r, &mut v);
            assert!(v.len() <= MAX_META);
            match &r {
                Record::Msg(b) | Record::Write { data: b, .. } | Record::Answer { bytes: b, .. } => {
                    v.extend_from_slice(b)
                }
                Record::Read { .. } => {}
            }
            assert_eq!(decode_record(Bytes::from(v)), Ok(r));
        }
        assert!(decode_record(Bytes::from_static(&[99])).is_err());
        assert!(decode_record(Bytes::new()).is_err());
    }
}
