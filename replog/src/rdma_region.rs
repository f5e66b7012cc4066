//! The log-region layout used over RDMA: a 64-byte **stream pointer** at offset 0, then
//! a ring of fixed-size **cells** from [`RING_BASE`], each holding one remote write (one
//! [`crate::wire`] write request: ballot, commit, slots) that a leader placed with a
//! one-sided RDMA WRITE into a follower's registered region.
//!
//! ```text
//! offset size field
//!  0     4    magic     b"RPCL"
//!  4     4    len       payload bytes (at most cell size - 72)
//!  8     8    writer    node id of the writer
//! 16     8    round     epoch, first part: the ballot round of the writer's term
//! 24     8    restart   epoch, second part: the writer's restarts of this stream in the term
//! 32     8    pos       the cell's position in the writer's stream; ring cell pos % cells
//! 40     8    first     first slot of the write (the agent transports' `offset`)
//! 48     8    token     the writer's token, echoed in the follower's acknowledgement
//! 56     4    crc       CRC32C of bytes 0..56 and of the payload
//! 60     4    zero
//! 64     len  payload
//!  ..    pad  zeros to a multiple of 8
//!  ..    8    canary    pos ^ CANARY_MIX, the last word written
//! ```
//!
//! A writer numbers the cells it writes to one follower by **position** (0, 1, 2...,
//! never reset while it runs): the cell of position `p` is ring cell `p % cells`, and
//! carries `p` in its header. A stream of cells is an **epoch** `(round, restart)` that
//! starts at some position. A writer starts a new epoch (strictly greater) when its
//! ballot round grows and whenever the stream broke (a failed or denied write, a link
//! that went down): what it had in flight is then failed back to the core, which
//! re-sends. The new epoch goes on at the next position, and its first write is the
//! **stream pointer** naming it:
//!
//! ```text
//! offset size field
//!  0     4    magic     b"RPSP"
//!  4     4    zero
//!  8     8    writer    node id of the writer
//! 16     8    round     the epoch
//! 24     8    restart
//! 32     8    start     position of the epoch's first cell
//! 40     8    resume    the oldest position whose cell the follower may not have taken
//! 48     4    crc       CRC32C of bytes 0..48
//! 52    12    zero
//! ```
//!
//! The follower takes the cell at its expected position when its writer, epoch and
//! position are the expected ones, its canary is in place and its CRC matches (a torn
//! or still-landing cell fails one of these and is looked at again later). When the
//! epoch it takes has nothing more, it looks at the pointer: if it names an epoch of
//! that writer greater than the last one it took, whose first cell is in place, the
//! follower first takes, in position order from `resume` to `start`, every whole cell
//! of the writer's earlier epochs it had not taken yet, then goes on in the new epoch.
//! Once the pointer is visible no cell of an older epoch lands any more (the pointer
//! follows them on one queue pair, or the old queue pair was torn down).
//!
//! This matters under acceptance by landing, where the writer may count a cell as
//! accepted before the follower's CPU took it: the writer keeps every position from
//! `resume` on out of the new epoch's way (its window counts from there, until the
//! follower acknowledges a cell of the new epoch, which it takes only after the old
//! ones), and also writes such cells again early in the new epoch (see
//! `replog::rdma_agent`), so a cell it counted is found even if it dies mid-way. Only
//! the permission holder's cells are taken: other writers cannot write the region at
//! all (queue-pair access flags), and stale cells of a previous holder are ignored.
//!
//! Fixed-size cells, rather than entries spanning cells, keep the follower's scan one
//! header read per poll and make wrap-around trivial; a write larger than a cell is
//! refused at issue (`TooLarge`), and `replog serve` bounds the slots per write so that
//! the core never builds one (see `server.rs`).
//!
//! ## Acknowledgement records
//!
//! The follower acknowledges a cell with a one-sided RDMA WRITE of one fixed-size
//! **acknowledgement record** into the writer's acknowledgement area for it (the
//! transport's second protection domain: see `transport::rdma`). The area starts with a
//! reserved 64-byte header; then come [`ACK_SLOT`]-byte slots, the record of the cell of
//! position `p` going to slot `p % slots`:
//!
//! ```text
//! offset size field
//!  0     4    magic     b"RPAK"
//!  4     1    status    0 ok, 1 denied (the core's answer)
//!  5     1    zero
//!  6     2    len       reply bytes (at most ACK_REPLY_MAX = 72)
//!  8     8    round     the cell's epoch, first part
//! 16     8    restart   the cell's epoch, second part
//! 24     8    pos       the cell's position
//! 32     8    token     the writer's token from the cell header
//! 40     4    crc       CRC32C of bytes 0..40 and of the reply bytes
//! 44     4    zero
//! 48     len  reply     the core's reply (ok: empty; denied: the promised ballot)
//!  ..    pad  zeros up to byte 120
//! 120    8    canary    ack_canary(pos, token), the last word written
//! ```
//!
//! The writer looks for the record of each unacknowledged cell of its current epoch at
//! that cell's slot, and takes it only if the canary is the one of that position and
//! token, the CRC matches and magic, epoch, position and token are the expected ones: a record still
//! landing or torn, one of an earlier epoch (the stream restarted, the queue pair was
//! renewed) or of the cell `slots` positions back is never taken, and the writer never
//! has a cell outstanding whose slot holds a record it has not taken yet (it keeps the
//! positions it has outstanding within one window of the ring). A reply longer than
//! [`ACK_REPLY_MAX`] goes as a side-channel message instead.

/// The cell magic.
pub const MAGIC: [u8; 4] = *b"RPCL";
/// The stream pointer's magic.
pub const POINTER_MAGIC: [u8; 4] = *b"RPSP";
/// Bytes of the stream pointer at offset 0.
pub const POINTER_LEN: usize = 64;
/// Offset of the ring's first cell (after the stream pointer).
pub const RING_BASE: usize = POINTER_LEN;
/// Header bytes before the payload.
pub const HEADER_LEN: usize = 64;
/// Mixed into the canary so that a zeroed region never looks written.
pub const CANARY_MIX: u64 = 0x5a5a_c3c3_a5a5_3c3c;

const _: () = assert!(HEADER_LEN.is_multiple_of(8));

/// Bytes of one acknowledgement record slot.
pub const ACK_SLOT: usize = 128;
/// Bytes reserved at the start of an acknowledgement area before the first slot.
pub const ACK_AREA_HEADER: usize = 64;
/// The acknowledgement record magic.
pub const ACK_MAGIC: [u8; 4] = *b"RPAK";
/// Offset of the reply bytes in a record.
const ACK_REPLY_AT: usize = 48;
/// Offset of the canary in a record.
const ACK_CANARY_AT: usize = ACK_SLOT - 8;
/// The longest reply an acknowledgement record carries.
pub const ACK_REPLY_MAX: usize = ACK_CANARY_AT - ACK_REPLY_AT;
/// Mixed into the acknowledgement canary.
const ACK_CANARY_MIX: u64 = 0x3c3c_a5a5_c3c3_5a5a;

const _: () = assert!(ACK_SLOT.is_multiple_of(8) && ACK_AREA_HEADER.is_multiple_of(8));
const _: () = assert!(ACK_REPLY_MAX == 72);

/// A decoded acknowledgement record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AckRecord {
    /// The acknowledged cell's epoch.
    pub epoch: (u64, u64),
    /// Its position.
    pub pos: u64,
    /// The writer's token from its header.
    pub token: u64,
    /// The core accepted the write.
    pub ok: bool,
    /// The core's reply bytes.
    pub reply: Vec<u8>,
}

/// The canary of the acknowledgement record of position `pos` and `token`.
pub fn ack_canary(pos: u64, token: u64) -> u64 {
    pos.rotate_left(32) ^ token ^ ACK_CANARY_MIX
}

/// Slots in an acknowledgement area of `area_len` bytes.
pub fn ack_slots(area_len: u64) -> u64 {
    area_len.saturating_sub(ACK_AREA_HEADER as u64) / ACK_SLOT as u64
}

/// Offset of the record of the cell of position `pos` in an area of `slots` slots (> 0).
pub fn ack_offset(pos: u64, slots: u64) -> u64 {
    ACK_AREA_HEADER as u64 + (pos % slots.max(1)) * ACK_SLOT as u64
}

/// Offset of the canary within a record.
pub fn ack_canary_offset() -> u64 {
    ACK_CANARY_AT as u64
}

fn ack_crc(record: &[u8], reply: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(record.get(..40).unwrap_or_default()), reply)
}

/// Encodes a whole record into `out` (cleared first; [`ACK_SLOT`] bytes). False (and
/// `out` empty) when the reply is longer than [`ACK_REPLY_MAX`].
pub fn encode_ack(r: &AckRecord, out: &mut Vec<u8>) -> bool {
    out.clear();
    if r.reply.len() > ACK_REPLY_MAX {
        return false;
    }
    out.extend_from_slice(&ACK_MAGIC);
    out.push(if r.ok { 0 } else { 1 });
    out.push(0);
    out.extend_from_slice(&(r.reply.len() as u16).to_le_bytes());
    for x in [r.epoch.0, r.epoch.1, r.pos, r.token] {
        out.extend_from_slice(&x.to_le_bytes());
    }
    let crc = ack_crc(out, &r.reply);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&r.reply);
    out.resize(ACK_CANARY_AT, 0);
    out.extend_from_slice(&ack_canary(r.pos, r.token).to_le_bytes());
    true
}

/// Parses one [`ACK_SLOT`]-byte record: `None` unless the magic, status, length,
/// canary (of the record's own position and token) and CRC all check. Never panics.
/// The caller still compares epoch, position and token with what it expects.
pub fn decode_ack(b: &[u8]) -> Option<AckRecord> {
    if b.len() != ACK_SLOT || b.get(0..4)? != ACK_MAGIC {
        return None;
    }
    let u64_at = |i: usize| Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?));
    let ok = match b.get(4)? {
        0 => true,
        1 => false,
        _ => return None,
    };
    let len = u16::from_le_bytes(b.get(6..8)?.try_into().ok()?) as usize;
    if len > ACK_REPLY_MAX {
        return None;
    }
    let (pos, token) = (u64_at(24)?, u64_at(32)?);
    if u64_at(ACK_CANARY_AT)? != ack_canary(pos, token) {
        return None;
    }
    let reply = b.get(ACK_REPLY_AT..ACK_REPLY_AT + len)?;
    // The bytes the CRC does not cover must be zeros.
    if b.get(44..48)?.iter().chain(b.get(ACK_REPLY_AT + len..ACK_CANARY_AT)?).any(|&x| x != 0) {
        return None;
    }
    let crc = u32::from_le_bytes(b.get(40..44)?.try_into().ok()?);
    if ack_crc(b, reply) != crc {
        return None;
    }
    Some(AckRecord { epoch: (u64_at(8)?, u64_at(16)?), pos, token, ok, reply: reply.to_vec() })
}

/// A cell's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CellHeader {
    /// Payload length.
    pub len: u32,
    /// The writer's node id.
    pub writer: u64,
    /// Epoch: (ballot round, restart count).
    pub epoch: (u64, u64),
    /// Position in the writer's stream to this follower.
    pub pos: u64,
    /// First slot of the write.
    pub first: u64,
    /// The writer's token.
    pub token: u64,
    /// The checksum of header and payload.
    pub crc: u32,
}

/// The stream pointer: where a writer's epoch starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamPointer {
    /// The writer's node id.
    pub writer: u64,
    /// The epoch.
    pub epoch: (u64, u64),
    /// Position of the epoch's first cell.
    pub start: u64,
    /// The oldest position (at most `start`) whose cell the follower may not have taken
    /// when the epoch started.
    pub resume: u64,
}

/// Encodes the stream pointer ([`POINTER_LEN`] bytes).
pub fn encode_pointer(p: &StreamPointer) -> [u8; POINTER_LEN] {
    let mut b = [0u8; POINTER_LEN];
    b[0..4].copy_from_slice(&POINTER_MAGIC);
    for (i, x) in [p.writer, p.epoch.0, p.epoch.1, p.start, p.resume].into_iter().enumerate() {
        b[8 + 8 * i..16 + 8 * i].copy_from_slice(&x.to_le_bytes());
    }
    let crc = crc32c::crc32c(&b[..48]);
    b[48..52].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Parses a stream pointer; `None` unless magic, CRC and the zero bytes are right (a
/// torn or never-written pointer). Never panics.
pub fn decode_pointer(b: &[u8]) -> Option<StreamPointer> {
    let b = b.get(..POINTER_LEN)?;
    if b[0..4] != POINTER_MAGIC || b[4..8].iter().chain(&b[52..]).any(|&x| x != 0) {
        return None;
    }
    let u64_at = |i: usize| Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?));
    let crc = u32::from_le_bytes(b.get(48..52)?.try_into().ok()?);
    if crc32c::crc32c(&b[..48]) != crc {
        return None;
    }
    let (start, resume) = (u64_at(32)?, u64_at(40)?);
    if resume > start {
        return None;
    }
    Some(StreamPointer { writer: u64_at(8)?, epoch: (u64_at(16)?, u64_at(24)?), start, resume })
}

/// Cells in a ring of `cell_size`-byte cells in a region of `region_len` bytes.
pub fn ring_cells(region_len: usize, cell_size: usize) -> usize {
    region_len.saturating_sub(RING_BASE) / cell_size.max(1)
}

/// Offset in the region of ring cell `idx`.
pub fn cell_offset(idx: usize, cell_size: usize) -> usize {
    RING_BASE + idx * cell_size
}

/// Bytes a cell of `payload` bytes occupies up to and including its canary.
pub fn cell_bytes(payload: usize) -> usize {
    HEADER_LEN + payload.div_ceil(8) * 8 + 8
}

/// The payload capacity of a cell of `cell_size` bytes.
pub fn capacity(cell_size: usize) -> usize {
    (cell_size.saturating_sub(HEADER_LEN + 8)) / 8 * 8
}

/// Offset of the canary of a cell whose payload is `len` bytes.
pub fn canary_offset(len: u32) -> usize {
    HEADER_LEN + (len as usize).div_ceil(8) * 8
}

/// The canary of the cell of position `pos`.
pub fn canary(pos: u64) -> u64 {
    pos ^ CANARY_MIX
}

fn crc_of(header: &[u8], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&header[..56]), payload)
}

/// Encodes a whole cell (header, payload, padding, canary) into `out` (cleared first).
pub fn encode(h: &CellHeader, payload: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    for x in [h.writer, h.epoch.0, h.epoch.1, h.pos, h.first, h.token] {
        out.extend_from_slice(&x.to_le_bytes());
    }
    let crc = crc_of(out, payload);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(payload);
    out.resize(canary_offset(payload.len() as u32), 0);
    out.extend_from_slice(&canary(h.pos).to_le_bytes());
}

/// Parses a header; `None` if the magic is missing or the length does not fit
/// `cell_size`. Never panics.
pub fn decode_header(b: &[u8], cell_size: usize) -> Option<CellHeader> {
    if b.len() < HEADER_LEN || b[0..4] != MAGIC {
        return None;
    }
    let u64_at = |i: usize| Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?));
    let u32_at = |i: usize| Some(u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?));
    let len = u32_at(4)?;
    if len as usize > capacity(cell_size) {
        return None;
    }
    Some(CellHeader {
        len,
        writer: u64_at(8)?,
        epoch: (u64_at(16)?, u64_at(24)?),
        pos: u64_at(32)?,
        first: u64_at(40)?,
        token: u64_at(48)?,
        crc: u32_at(56)?,
    })
}

/// Whether `payload` under `header_bytes` matches the header's checksum.
pub fn check(header_bytes: &[u8], h: &CellHeader, payload: &[u8]) -> bool {
    header_bytes.len() >= HEADER_LEN && payload.len() == h.len as usize && crc_of(header_bytes, payload) == h.crc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(pos: u64) -> CellHeader {
        CellHeader { len: 0, writer: 3, epoch: (7, 1), pos, first: 42, token: 99, crc: 0 }
    }

    #[test]
    fn round_trip_and_canary_position() {
        let mut out = Vec::new();
        let payload = b"hello, follower";
        encode(&hdr(5), payload, &mut out);
        assert_eq!(out.len(), cell_bytes(payload.len()));
        let Some(h) = decode_header(&out, 4096) else { panic!("the header of a cell just encoded does not decode") };
        assert_eq!((h.len, h.writer, h.epoch, h.pos, h.first, h.token), (15, 3, (7, 1), 5, 42, 99));
        let c = canary_offset(h.len);
        assert_eq!(out.get(c..c + 8), Some(&canary(5).to_le_bytes()[..]));
        assert!(check(&out[..HEADER_LEN], &h, &out[HEADER_LEN..HEADER_LEN + 15]));
    }

    #[test]
    fn stream_pointers_round_trip_and_torn_ones_are_refused() {
        let p = StreamPointer { writer: 2, epoch: (5, 3), start: 1 << 40, resume: (1 << 40) - 7 };
        let b = encode_pointer(&p);
        assert_eq!(decode_pointer(&b), Some(p));
        assert_eq!(decode_pointer(&[0u8; POINTER_LEN]), None, "a zeroed region holds no pointer");
        assert_eq!(decode_pointer(&b[..POINTER_LEN - 1]), None);
        let ahead = StreamPointer { resume: p.start + 1, ..p };
        assert_eq!(decode_pointer(&encode_pointer(&ahead)), None, "resume after start is refused");
        for i in 0..POINTER_LEN {
            let mut torn = b;
            torn[i] ^= 0x10;
            assert_eq!(decode_pointer(&torn), None, "byte {i} flipped");
        }
    }

    #[test]
    fn torn_or_garbage_cells_are_refused_without_panicking() {
        let mut out = Vec::new();
        encode(&hdr(1), &[7u8; 100], &mut out);
        let Some(h) = decode_header(&out, 4096) else { panic!("the header of a cell just encoded does not decode") };
        let mut torn = out.clone();
        torn[HEADER_LEN + 50] ^= 1;
        assert!(!check(&torn[..HEADER_LEN], &h, &torn[HEADER_LEN..HEADER_LEN + 100]), "a flipped byte fails the CRC");
        assert!(decode_header(&out, 100).is_none(), "a length beyond the cell is refused");
        for len in 0..HEADER_LEN + 2 {
            let _ = decode_header(&vec![0xffu8; len], 4096);
        }
        assert!(decode_header(&[0u8; 64], 4096).is_none(), "a zeroed cell has no magic");
        assert_ne!(canary(0), 0, "a zeroed canary never matches");
    }

    fn ack(pos: u64) -> AckRecord {
        AckRecord { epoch: (7, 2), pos, token: 1000 + pos, ok: false, reply: b"promised 9.2".to_vec() }
    }

    #[test]
    fn ack_records_round_trip_and_fit_their_slot() {
        let mut out = Vec::new();
        assert!(encode_ack(&ack(5), &mut out));
        assert_eq!(out.len(), ACK_SLOT);
        assert_eq!(decode_ack(&out), Some(ack(5)));
        let ok = AckRecord { ok: true, reply: Vec::new(), ..ack(6) };
        assert!(encode_ack(&ok, &mut out));
        assert_eq!(decode_ack(&out), Some(ok));
        let long = AckRecord { reply: vec![1; ACK_REPLY_MAX + 1], ..ack(1) };
        assert!(!encode_ack(&long, &mut out), "a reply beyond the record goes by message");
        assert!(out.is_empty());
        let full = AckRecord { reply: vec![1; ACK_REPLY_MAX], ..ack(1) };
        assert!(encode_ack(&full, &mut out));
        assert_eq!(decode_ack(&out), Some(full));
        // Slots wrap after the header.
        assert_eq!(ack_slots(64 + 4 * 128), 4);
        assert_eq!(ack_offset(0, 4), 64);
        assert_eq!(ack_offset(4, 4), 64);
        assert_eq!(ack_offset(3, 4), 64 + 3 * 128);
        // The ring's cells follow the stream pointer.
        assert_eq!(ring_cells(64 + 4 * 4096 + 100, 4096), 4);
        assert_eq!(ring_cells(4 * 4096, 4096), 3);
        assert_eq!(cell_offset(2, 4096), 64 + 2 * 4096);
    }

    #[test]
    fn torn_stale_or_corrupt_ack_records_are_never_taken() {
        let mut good = Vec::new();
        assert!(encode_ack(&ack(3), &mut good));
        // Torn: any prefix of the record landed over a zeroed slot (the canary last).
        for landed in 0..ACK_SLOT {
            let mut slot = vec![0u8; ACK_SLOT];
            slot[..landed].copy_from_slice(&good[..landed]);
            assert_eq!(decode_ack(&slot), None, "a record torn after {landed} bytes");
        }
        // Torn the other way: the tail of the record of position 7 landed over the record of
        // position 3 in the same slot (a 4-slot ring). Whatever prefix landed, the slot reads as
        // nothing, as the whole older record (which the writer, waiting for position 7, does not
        // take), or as the whole newer one: never a mix.
        let newer_rec = AckRecord { ok: true, reply: Vec::new(), ..ack(7) };
        let mut newer = Vec::new();
        assert!(encode_ack(&newer_rec, &mut newer));
        for landed in 1..=ACK_SLOT {
            let mut slot = good.clone();
            slot[ACK_SLOT - landed..].copy_from_slice(&newer[ACK_SLOT - landed..]);
            let d = decode_ack(&slot);
            assert!(d.is_none() || d == Some(ack(3)) || d == Some(newer_rec.clone()), "after {landed} bytes: {d:?}");
        }
        // Any single flipped bit.
        for byte in 0..ACK_SLOT {
            let mut bad = good.clone();
            bad[byte] ^= 0x10;
            assert_eq!(decode_ack(&bad), None, "byte {byte} flipped");
        }
        // A record of another position or token in the slot: its canary is not the expected one.
        let mut other = Vec::new();
        assert!(encode_ack(&ack(3 + 4), &mut other));
        let d = decode_ack(&other).map(|d| (d.pos, d.token));
        assert_eq!(d, Some((7, 1007)), "a well-formed record of another position decodes as what it is");
        assert_ne!(d, Some((3, 1003)), "the caller sees it is not the record it waits for");
        assert_ne!(ack_canary(3, 1003), ack_canary(7, 1007));
        // An older epoch decodes, and the caller refuses it by comparing the epoch.
        let mut stale = Vec::new();
        assert!(encode_ack(&AckRecord { epoch: (7, 1), ..ack(3) }, &mut stale));
        assert_ne!(decode_ack(&stale).map(|r| r.epoch), Some((7, 2)));
        for len in 0..300 {
            let _ = decode_ack(&vec![0xffu8; len]);
            let _ = decode_ack(&vec![0u8; len]);
        }
    }
}
