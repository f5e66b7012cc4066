//! The log-region layout used over RDMA: a ring of fixed-size **cells**, each holding
//! one remote write (one [`crate::wire`] write request: ballot, commit, slots) that a
//! leader placed with a one-sided RDMA WRITE into a follower's registered region.
//!
//! ```text
//! offset size field
//!  0     4    magic     b"RPCL"
//!  4     4    len       payload bytes (at most cell size - 72)
//!  8     8    writer    node id of the writer
//! 16     8    round     epoch, first part: the ballot round of the writer's term
//! 24     8    restart   epoch, second part: the writer's restarts of this stream in the term
//! 32     8    seq       1, 2, 3... within the epoch; cell index = (seq - 1) % cells
//! 40     8    first     first slot of the write (the agent transports' `offset`)
//! 48     8    token     the writer's token, echoed in the follower's acknowledgement
//! 56     4    crc       CRC32C of bytes 0..56 and of the payload
//! 60     4    zero
//! 64     len  payload
//!  ..    pad  zeros to a multiple of 8
//!  ..    8    canary    seq ^ CANARY_MIX, the last word written
//! ```
//!
//! A stream of cells from one writer to one follower is an **epoch** `(round, restart)`:
//! it starts at cell 0 with seq 1. A writer starts a new epoch (strictly greater) when its
//! ballot round grows and whenever the stream broke (a failed or denied write, a link
//! that went down): what it had in flight is then failed back to the core, which
//! re-sends. The follower takes the cell at its expected position when its writer,
//! epoch and seq are the expected ones, its canary is in place and its CRC matches
//! (a torn or still-landing cell fails one of these and is looked at again later); it
//! switches to a new epoch when cell 0 holds seq 1 of an epoch greater than the last one
//! it took from that writer. Only the permission holder's cells are taken: other
//! writers cannot write the region at all (queue-pair access flags), and stale cells of
//! a previous holder are ignored.
//!
//! Fixed-size cells, rather than entries spanning cells, keep the follower's scan one
//! header read per poll and make wrap-around trivial; a write larger than a cell is
//! refused at issue (`TooLarge`), and `replog serve` bounds the slots per write so that
//! the core never builds one (see `server.rs`).

/// The cell magic.
pub const MAGIC: [u8; 4] = *b"RPCL";
/// Header bytes before the payload.
pub const HEADER_LEN: usize = 64;
/// Mixed into the canary so that a zeroed region never looks written.
pub const CANARY_MIX: u64 = 0x5a5a_c3c3_a5a5_3c3c;

const _: () = assert!(HEADER_LEN.is_multiple_of(8));

/// A cell's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CellHeader {
    /// Payload length.
    pub len: u32,
    /// The writer's node id.
    pub writer: u64,
    /// Epoch: (ballot round, restart count).
    pub epoch: (u64, u64),
    /// Sequence number in the epoch (from 1).
    pub seq: u64,
    /// First slot of the write.
    pub first: u64,
    /// The writer's token.
    pub token: u64,
    /// The checksum of header and payload.
    pub crc: u32,
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

/// The canary of `seq`.
pub fn canary(seq: u64) -> u64 {
    seq ^ CANARY_MIX
}

fn crc_of(header: &[u8], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&header[..56]), payload)
}

/// Encodes a whole cell (header, payload, padding, canary) into `out` (cleared first).
pub fn encode(h: &CellHeader, payload: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    for x in [h.writer, h.epoch.0, h.epoch.1, h.seq, h.first, h.token] {
        out.extend_from_slice(&x.to_le_bytes());
    }
    let crc = crc_of(out, payload);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(payload);
    out.resize(canary_offset(payload.len() as u32), 0);
    out.extend_from_slice(&canary(h.seq).to_le_bytes());
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
        seq: u64_at(32)?,
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

    fn hdr(seq: u64) -> CellHeader {
        CellHeader { len: 0, writer: 3, epoch: (7, 1), seq, first: 42, token: 99, crc: 0 }
    }

    #[test]
    fn round_trip_and_canary_position() {
        let mut out = Vec::new();
        let payload = b"hello, follower";
        encode(&hdr(5), payload, &mut out);
        assert_eq!(out.len(), cell_bytes(payload.len()));
        let h = decode_header(&out, 4096).expect("header");
        assert_eq!((h.len, h.writer, h.epoch, h.seq, h.first, h.token), (15, 3, (7, 1), 5, 42, 99));
        let c = canary_offset(h.len);
        assert_eq!(out.get(c..c + 8), Some(&canary(5).to_le_bytes()[..]));
        assert!(check(&out[..HEADER_LEN], &h, &out[HEADER_LEN..HEADER_LEN + 15]));
    }

    #[test]
    fn torn_or_garbage_cells_are_refused_without_panicking() {
        let mut out = Vec::new();
        encode(&hdr(1), &[7u8; 100], &mut out);
        let h = decode_header(&out, 4096).expect("header");
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
}
