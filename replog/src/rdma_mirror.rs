//! The **accepted-entries mirror**: what a replica would answer to a log-tail read,
//! published in memory that its peers read with one-sided RDMA READs (the RDMA
//! transport registers it with remote READ access only: `transport::rdma`, "read
//! mirror"), so that a candidate reads a promiser's tail with no CPU on the serving side.
//! This module is the layout, the owner's [`Publisher`] and the reader's checks; it needs
//! no RDMA (its tests run over a byte buffer). The agent (`rdma_agent`) moves the bytes.
//!
//! ## Layout (integers little-endian)
//! ```text
//! header, 64 bytes at offset 0:
//!   0  magic     u64   MAGIC
//!   8  gen       u64   seqlock generation: odd while the owner rewrites records or header
//!  16  low       u64   first slot held (inclusive)            \  low = high + 1: empty;
//!  24  high      u64   last slot held (inclusive)             /  high - low < capacity
//!  32  base      u64   byte offset of record 0 (= 64)
//!  40  stride    u32   bytes per record (multiple of 8, >= 64)
//!  44  capacity  u32   records in the ring
//!  48  reserved  u64   0
//!  56  crc       u32   CRC32C of bytes 0..56
//!  60  reserved  u32   0
//! record of slot s, at base + (s % capacity) * stride, `stride` bytes:
//!   0  crc       u32   CRC32C of bytes 4 .. 36 + len
//!   4  kind      u32   0 the slot holds no accepted value, 1 a value, 2 a value too large
//!                      for a record (readers fall back to the side channel for it)
//!   8  slot u64, ballot (round u64, node u64), len u32, value [len]
//!                      = one entry exactly as `wire::encode_read_result` writes it
//!                      (len 0 and a zero ballot for kinds 0 and 2)
//!  stride-8  canary u64 = CANARY ^ slot ^ (crc << 32 | kind), written last
//! ```
//! Every slot of `low..=high` has its record in the ring; the range answers a read the
//! way `Replica::handle_remote_read` does from the store (the values accepted in it, an
//! absent slot meaning "accepted nothing").
//!
//! ## Owner ([`Publisher::publish`])
//! After each storage sync and before anything that waits for it leaves (the
//! acknowledgement of an accepted write, a promise), the node publishes the slots that
//! changed since the last publication, with the entries the store holds there
//! ([`crate::mirrored_store`] notes which slots changed; the store answers their
//! entries from its cache of the newest ones; the first publication reads every slot):
//! header with `gen + 1` (odd), the records, header with `gen + 2` (even) and the new
//! `low`/`high`. So the mirror holds what the store
//! holds durably (under `fsync`), never less than a promise or an acknowledgement
//! already told a peer.
//!
//! ## Reader
//! RDMA READ of the header ([`decode_header`]: magic, CRC, even generation, geometry),
//! [`plan_read`] for the records of the slots asked (never across the ring's end), RDMA
//! READ of those records, [`assemble`] (each record whole: canary, CRC, kind, the slot
//! expected), then the header again: the same generation means no rewrite overlapped the
//! record read (the seqlock), and the answer stands. Anything else is a [`Fallback`]:
//! the reader asks over the side channel instead. Nothing here panics on any bytes.
//!
//! A reader that saw the mirror before knows its geometry ([`Seen`]), so it places the
//! records of a slot without the header and issues the three reads at once, each
//! starting after the one before completed (`IBV_SEND_FENCE`): [`plan_chain`], then
//! [`answer_chain`] checks the same things in the same order.

use crate::wire::{ENTRY_HEAD, READ_RESULT_HEAD};
use paxos::{Entry, Slot};

/// `"RLMIRR01"`.
pub const MAGIC: u64 = u64::from_le_bytes(*b"RLMIRR01");
/// Bytes of the header.
pub const HEADER_LEN: usize = 64;
/// Record bytes before the entry (CRC, kind).
pub const RECORD_HEAD: usize = 8;
/// Record bytes after the value slot (the canary).
pub const RECORD_TAIL: usize = 8;
/// Smallest record stride.
pub const MIN_STRIDE: usize = 64;
const CANARY: u64 = 0x6d69_7272_6f72_c0de;

const KIND_EMPTY: u32 = 0;
const KIND_VALUE: u32 = 1;
const KIND_TOO_LARGE: u32 = 2;

const _: () = assert!(HEADER_LEN == 64 && MIN_STRIDE >= RECORD_HEAD + ENTRY_HEAD + RECORD_TAIL);

/// Why a mirror could not be set up or written.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MirrorError {
    /// The geometry does not fit.
    #[error("mirror of {len} bytes with {stride}-byte records: {why}")]
    Geometry {
        /// Mirror bytes.
        len: usize,
        /// Record stride.
        stride: usize,
        /// What is wrong.
        why: &'static str,
    },
    /// The memory refused a write.
    #[error("mirror write at {offset} failed: {why}")]
    Write {
        /// Byte offset.
        offset: usize,
        /// The memory's reason.
        why: String,
    },
}

/// Why a read must go over the side channel instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// The header is not whole (torn by a concurrent rewrite, CRC or magic wrong) or a
    /// rewrite is in progress (odd generation), or its geometry is impossible.
    Header,
    /// The first slot asked is older than the ring holds (or trimmed).
    TooOld,
    /// The first slot asked is not published yet.
    NotYet,
    /// A record is not whole or not the slot expected (a concurrent rewrite or wrap).
    Record,
    /// The first slot's value does not fit a record, or not even one entry fits the
    /// reader's budget.
    TooLarge,
    /// The generation changed between the header and the re-read (the seqlock).
    Changed,
}

impl Fallback {
    /// A short name (logs, metrics labels).
    pub fn name(self) -> &'static str {
        match self {
            Fallback::Header => "header",
            Fallback::TooOld => "too_old",
            Fallback::NotYet => "not_yet",
            Fallback::Record => "record",
            Fallback::TooLarge => "too_large",
            Fallback::Changed => "changed",
        }
    }
}

/// The decoded header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Seqlock generation (even in a decoded header).
    pub gen: u64,
    /// First slot held.
    pub low: Slot,
    /// Last slot held (`low - 1`: none).
    pub high: Slot,
    /// Bytes per record.
    pub stride: u32,
    /// Records in the ring.
    pub capacity: u32,
}

fn u64_at(b: &[u8], i: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(i..i.checked_add(8)?)?.try_into().ok()?))
}

fn u32_at(b: &[u8], i: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(i..i.checked_add(4)?)?.try_into().ok()?))
}

/// Encodes `h` (its generation as given, odd or even).
pub fn encode_header(h: &Header) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    b[8..16].copy_from_slice(&h.gen.to_le_bytes());
    b[16..24].copy_from_slice(&h.low.to_le_bytes());
    b[24..32].copy_from_slice(&h.high.to_le_bytes());
    b[32..40].copy_from_slice(&(HEADER_LEN as u64).to_le_bytes());
    b[40..44].copy_from_slice(&h.stride.to_le_bytes());
    b[44..48].copy_from_slice(&h.capacity.to_le_bytes());
    let crc = crc32c::crc32c(&b[..56]);
    b[56..60].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes a header read from a mirror of `mirror_len` bytes: whole (magic, CRC), not
/// being rewritten (even generation), and a geometry that fits the mirror.
pub fn decode_header(b: &[u8], mirror_len: u64) -> Result<Header, Fallback> {
    let f = |_| Fallback::Header;
    let b = b.get(..HEADER_LEN).ok_or(Fallback::Header)?;
    let crc = u32_at(b, 56).ok_or(Fallback::Header)?;
    if u64_at(b, 0) != Some(MAGIC) || crc32c::crc32c(&b[..56]) != crc {
        return Err(Fallback::Header);
    }
    let (gen, low, high, base) = (u64_at(b, 8), u64_at(b, 16), u64_at(b, 24), u64_at(b, 32));
    let (Some(gen), Some(low), Some(high), Some(base)) = (gen, low, high, base) else {
        return Err(Fallback::Header);
    };
    let (Some(stride), Some(capacity)) = (u32_at(b, 40), u32_at(b, 44)) else { return Err(Fallback::Header) };
    let h = Header { gen, low, high, stride, capacity };
    if gen % 2 == 1 {
        return Err(Fallback::Header);
    }
    geometry(mirror_len as usize, stride as usize).map_err(f)?;
    let fits = u64::from(capacity)
        .checked_mul(u64::from(stride))
        .and_then(|r| r.checked_add(HEADER_LEN as u64))
        .is_some_and(|end| end <= mirror_len);
    let range_ok = low >= 1 && high.checked_add(1).is_some_and(|h1| h1 >= low && h1 - low <= u64::from(capacity));
    if base != HEADER_LEN as u64 || capacity == 0 || !fits || !range_ok {
        return Err(Fallback::Header);
    }
    Ok(h)
}

/// The records (capacity) a mirror of `len` bytes holds with `stride`-byte records.
pub fn geometry(len: usize, stride: usize) -> Result<u32, MirrorError> {
    let err = |why| Err(MirrorError::Geometry { len, stride, why });
    if stride < MIN_STRIDE || !stride.is_multiple_of(8) || stride > u32::MAX as usize {
        return err("the stride must be a multiple of 8 from 64 bytes");
    }
    let capacity = len.saturating_sub(HEADER_LEN) / stride;
    if capacity == 0 {
        return err("not even one record fits");
    }
    Ok(capacity.min(u32::MAX as usize) as u32)
}

/// Byte offset of `slot`'s record.
pub fn record_offset(slot: Slot, stride: u32, capacity: u32) -> u64 {
    debug_assert!(capacity > 0);
    HEADER_LEN as u64 + (slot % u64::from(capacity.max(1))) * u64::from(stride)
}

fn canary(slot: Slot, crc: u32, kind: u32) -> u64 {
    CANARY ^ slot ^ ((u64::from(crc) << 32) | u64::from(kind))
}

/// Encodes `slot`'s record (`entry` the value accepted there, `None`: nothing) into
/// `out` (`stride` bytes). A value too large for the record is recorded as such.
pub fn encode_record(slot: Slot, entry: Option<&Entry>, stride: usize, out: &mut Vec<u8>) {
    debug_assert!(stride >= MIN_STRIDE && stride.is_multiple_of(8));
    debug_assert!(entry.is_none_or(|e| e.slot == slot), "a record holds its own slot's entry");
    out.clear();
    out.extend_from_slice(&[0u8; RECORD_HEAD]);
    let mut kind = KIND_EMPTY;
    if let Some(e) = entry {
        crate::wire::encode_entry(e, out);
        kind = KIND_VALUE;
        if out.len() + RECORD_TAIL > stride {
            kind = KIND_TOO_LARGE;
        }
    }
    if kind != KIND_VALUE {
        out.truncate(RECORD_HEAD);
        out.extend_from_slice(&slot.to_le_bytes());
        out.extend_from_slice(&[0u8; ENTRY_HEAD - 8]);
    }
    out[4..8].copy_from_slice(&kind.to_le_bytes());
    let crc = crc32c::crc32c(&out[4..]);
    out[0..4].copy_from_slice(&crc.to_le_bytes());
    out.resize(stride - RECORD_TAIL, 0);
    out.extend_from_slice(&canary(slot, crc, kind).to_le_bytes());
    debug_assert_eq!(out.len(), stride);
}

/// A record checked whole: its kind and its entry bytes (as `wire` encodes an entry).
#[derive(Debug, PartialEq, Eq)]
enum Record<'a> {
    Empty,
    Value(&'a [u8]),
    TooLarge,
}

/// Checks the record `b` (`stride` bytes) of `slot`: canary, CRC, kind, slot.
fn check_record(b: &[u8], slot: Slot) -> Option<Record<'_>> {
    let stride = b.len();
    let crc = u32_at(b, 0)?;
    let kind = u32_at(b, 4)?;
    let len = u32_at(b, RECORD_HEAD + 24)? as usize;
    let end = (RECORD_HEAD + ENTRY_HEAD).checked_add(len)?;
    if end + RECORD_TAIL > stride || u64_at(b, stride.checked_sub(8)?)? != canary(slot, crc, kind) {
        return None;
    }
    if crc32c::crc32c(b.get(4..end)?) != crc || u64_at(b, RECORD_HEAD)? != slot {
        return None;
    }
    match kind {
        KIND_EMPTY if len == 0 => Some(Record::Empty),
        KIND_VALUE => Some(Record::Value(b.get(RECORD_HEAD..end)?)),
        KIND_TOO_LARGE if len == 0 => Some(Record::TooLarge),
        _ => None,
    }
}

/// The records to read for a read from `from`: (byte offset, bytes, slots), at most
/// `max_bytes` and never across the ring's end.
pub fn plan_read(h: &Header, from: Slot, max_bytes: usize) -> Result<(u64, u32, u64), Fallback> {
    if from < h.low {
        return Err(Fallback::TooOld);
    }
    if from > h.high {
        return Err(Fallback::NotYet);
    }
    let stride = u64::from(h.stride);
    let cap = u64::from(h.capacity);
    let to_ring_end = cap - from % cap;
    let count = (h.high - from + 1).min(to_ring_end).min(max_bytes as u64 / stride.max(1));
    if count == 0 {
        return Err(Fallback::TooLarge);
    }
    let len = u32::try_from(count * stride).map_err(|_| Fallback::TooLarge)?;
    Ok((record_offset(from, h.stride, h.capacity), len, count))
}

/// Builds the read answer (the bytes `wire::encode_read_result` would give) from the
/// records of slots `from..` read at [`plan_read`]'s place, within `budget` bytes. Stops
/// before a value too large for its record or past the budget (the reader asks for the
/// rest). Covers at least `from`, or is a [`Fallback`].
pub fn assemble(h: &Header, from: Slot, records: &[u8], budget: usize, out: &mut Vec<u8>) -> Result<Slot, Fallback> {
    out.clear();
    out.extend_from_slice(&[0u8; READ_RESULT_HEAD]);
    let stride = h.stride as usize;
    if from == 0 || stride == 0 || records.is_empty() || !records.len().is_multiple_of(stride) {
        return Err(Fallback::Record);
    }
    let mut count = 0u32;
    let mut to = from - 1;
    for (i, b) in records.chunks_exact(stride).enumerate() {
        let slot = from + i as u64;
        match check_record(b, slot).ok_or(Fallback::Record)? {
            Record::Empty => {}
            Record::Value(e) => {
                if out.len() + e.len() > budget {
                    break;
                }
                out.extend_from_slice(e);
                count += 1;
            }
            Record::TooLarge => break,
        }
        to = slot;
    }
    if to < from {
        return Err(Fallback::TooLarge);
    }
    out[0..8].copy_from_slice(&to.to_le_bytes());
    out[8..12].copy_from_slice(&count.to_le_bytes());
    debug_assert!(out.len() <= budget.max(READ_RESULT_HEAD));
    Ok(to)
}

/// The re-read header must be whole and of the generation the records were read under.
pub fn recheck(first: &Header, again: &[u8], mirror_len: u64) -> Result<(), Fallback> {
    match decode_header(again, mirror_len) {
        Ok(h) if h.gen == first.gen => Ok(()),
        Ok(_) => Err(Fallback::Changed),
        Err(_) => Err(Fallback::Changed),
    }
}

/// What a reader keeps of a peer's mirror between reads: its geometry (fixed for a
/// mirror) and the last slot its header held, so that a read can fetch the header, the
/// records and the header again in one go ([`plan_chain`], [`answer_chain`]) instead of
/// waiting for the header before it knows where the records are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    /// Bytes per record.
    pub stride: u32,
    /// Records in the ring.
    pub capacity: u32,
    /// Last slot held, when last seen (a hint: it moves on).
    pub high: Slot,
}

impl From<&Header> for Seen {
    fn from(h: &Header) -> Seen {
        Seen { stride: h.stride, capacity: h.capacity, high: h.high }
    }
}

/// The records to read with the header for a read from `from` of a mirror `seen`
/// before: (byte offset, bytes), the slots `from..` up to the ring's end, the last slot
/// seen (or, past it, as many as fit: more may have been published since) and
/// `max_bytes` with the two headers. `None`: not even one record fits, or the geometry
/// is impossible. The header read with them decides what is answered.
pub fn plan_chain(seen: &Seen, from: Slot, max_bytes: usize) -> Option<(u64, u32)> {
    let (stride, cap) = (u64::from(seen.stride), u64::from(seen.capacity));
    if from == 0 || stride == 0 || cap == 0 {
        return None;
    }
    let room = max_bytes.saturating_sub(2 * HEADER_LEN) as u64 / stride;
    let to_end = cap - from % cap;
    let want = if seen.high >= from { seen.high - from + 1 } else { to_end };
    let count = want.min(to_end).min(room);
    let len = u32::try_from(count.checked_mul(stride)?).ok().filter(|&l| l > 0)?;
    Some((record_offset(from, seen.stride, seen.capacity), len))
}

/// Builds the answer (as [`assemble`]) from one chained read of a mirror of
/// `mirror_len` bytes: `data` is the header, the `records` bytes read at
/// [`plan_chain`]'s place for `seen` and `from`, and the header again, each read
/// issued only after the one before completed. The seqlock as in the three-step read:
/// the first header is whole, even and of `seen`'s geometry (else [`Fallback::Header`]:
/// the records were read at the wrong place), the slots answered are in its range, and
/// the second header has its generation, so no rewrite overlapped the records' read.
/// Returns the first header and the last slot covered.
pub fn answer_chain(
    seen: &Seen,
    from: Slot,
    data: &[u8],
    records: u32,
    mirror_len: u64,
    budget: usize,
    out: &mut Vec<u8>,
) -> Result<(Header, Slot), Fallback> {
    let (first, rest) = data.split_at_checked(HEADER_LEN).ok_or(Fallback::Header)?;
    let (recs, again) = rest.split_at_checked(records as usize).ok_or(Fallback::Record)?;
    let h = decode_header(first, mirror_len)?;
    if (h.stride, h.capacity) != (seen.stride, seen.capacity) {
        return Err(Fallback::Header);
    }
    let (off, len, _) = plan_read(&h, from, recs.len())?;
    debug_assert_eq!(off, record_offset(from, seen.stride, seen.capacity), "records read where planned");
    let recs = recs.get(..len as usize).ok_or(Fallback::Record)?;
    let to = assemble(&h, from, recs, budget, out)?;
    recheck(&h, again, mirror_len)?;
    Ok((h, to))
}

/// Memory the owner publishes into (the RDMA transport's mirror; a byte vector in tests).
/// Each `put` is visible to readers no earlier than the puts before it.
pub trait MirrorMemory {
    /// Bytes of the memory.
    fn mirror_len(&self) -> usize;
    /// Copies `data` to `offset`.
    fn put(&mut self, offset: usize, data: &[u8]) -> Result<(), MirrorError>;
}

impl MirrorMemory for Vec<u8> {
    fn mirror_len(&self) -> usize {
        self.len()
    }
    fn put(&mut self, offset: usize, data: &[u8]) -> Result<(), MirrorError> {
        let end = offset.checked_add(data.len()).filter(|&e| e <= self.len());
        let Some(end) = end else { return Err(MirrorError::Write { offset, why: "out of range".into() }) };
        self[offset..end].copy_from_slice(data);
        Ok(())
    }
}

/// The owner's side: keeps the header's state and writes publications.
#[derive(Debug)]
pub struct Publisher {
    stride: u32,
    capacity: u32,
    gen: u64,
    low: Slot,
    high: Slot,
    buf: Vec<u8>,
    /// Publications written.
    pub publications: u64,
}

impl Publisher {
    /// A publisher for a mirror of `len` bytes with `stride`-byte records (empty until
    /// the first publication).
    pub fn new(len: usize, stride: usize) -> Result<Publisher, MirrorError> {
        let capacity = geometry(len, stride)?;
        Ok(Publisher { stride: stride as u32, capacity, gen: 0, low: 1, high: 0, buf: Vec::new(), publications: 0 })
    }

    /// Records in the ring.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// The header as last published.
    pub fn header(&self) -> Header {
        Header { gen: self.gen, low: self.low, high: self.high, stride: self.stride, capacity: self.capacity }
    }

    /// Whether nothing was published yet: the first publication writes every record of
    /// its range, so it must be given every entry the store holds in
    /// [`Publisher::range`] (a store reopened with entries the mirror never saw).
    pub fn is_fresh(&self) -> bool {
        self.publications == 0
    }

    /// The range (`low`, `high`) a publication for a store whose last slot is `last` and
    /// first kept slot `trimmed + 1` holds: the newest slots that fit the ring.
    pub fn range(&self, trimmed: Slot, last: Slot) -> (Slot, Slot) {
        let high = last;
        let low = (trimmed + 1).max((high + 1).saturating_sub(u64::from(self.capacity))).max(1);
        (low.min(high + 1), high)
    }

    /// Publishes the store's state into `mem`: its last slot `last`, first kept slot
    /// `trimmed + 1`, and `changed`, in slot order with one entry per slot, the store's
    /// entry of every slot it accepted an entry at since the last publication (a fresh
    /// publisher: every entry it holds in [`Publisher::range`]). More of the store's
    /// entries may be given (their records are rewritten as they were); entries outside
    /// the range are passed over.
    ///
    /// What is written: the records of the changed slots, and every record of the slots
    /// new to the range (above the last publication's `high`; empty when `changed` has
    /// nothing for one: the store accepted nothing there). This is the whole change
    /// because a store changes a slot only by accepting an entry there, never drops a
    /// slot above its trim point (`paxos::Storage::accept`), and a trim only raises
    /// `low`. Seqlock: the header goes odd, the records are written, the header goes even
    /// with the new range. Returns whether anything was written (nothing changed: no).
    pub fn publish<'e, M: MirrorMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        trimmed: Slot,
        last: Slot,
        changed: impl IntoIterator<Item = &'e Entry>,
    ) -> Result<bool, MirrorError> {
        let (low, high) = self.range(trimmed, last);
        debug_assert!(self.is_fresh() || high >= self.high, "a store's last slot never goes back");
        debug_assert!(self.is_fresh() || low >= self.low, "a store's first kept slot never goes back");
        // Slots from here on are new to the range: every record is written.
        let new_from = if self.is_fresh() { low } else { (self.high + 1).max(low) };
        let mut changed = changed.into_iter().filter(|e| e.slot >= low && e.slot <= high).peekable();
        if !self.is_fresh() && changed.peek().is_none() && new_from > high && (low, high) == (self.low, self.high) {
            return Ok(false);
        }
        let before = self.header();
        mem.put(0, &encode_header(&Header { gen: before.gen + 1, ..before }))?;
        let mut rec = std::mem::take(&mut self.buf);
        let mut written = Ok(());
        let mut prev = None;
        let mut slot = new_from;
        loop {
            // Changed slots below the new ones first, then each new slot (its change or
            // nothing), in slot order.
            let (s, e) = match changed.next_if(|e| e.slot < new_from) {
                Some(e) => (e.slot, Some(e)),
                None if slot <= high => {
                    slot += 1;
                    (slot - 1, changed.next_if(|e| e.slot == slot - 1))
                }
                None => break,
            };
            debug_assert!(prev.is_none_or(|p| p < s), "changed entries in slot order, one per slot");
            prev = Some(s);
            encode_record(s, e, self.stride as usize, &mut rec);
            written = mem.put(record_offset(s, self.stride, self.capacity) as usize, &rec);
            if written.is_err() {
                break;
            }
        }
        self.buf = rec;
        written?;
        debug_assert!(changed.next().is_none(), "changed entries in slot order, one per slot");
        self.gen += 2;
        self.low = low;
        self.high = high;
        self.publications += 1;
        mem.put(0, &encode_header(&self.header()))?;
        debug_assert_eq!(self.gen % 2, 0, "a published header is even");
        Ok(true)
    }

    /// Takes the mirror down for good: the header goes odd (a rewrite in progress, as
    /// readers see it) and stays so, and readers use the side channel from then on. For
    /// a publisher that published before and cannot publish the store's latest change:
    /// readers must not go on finding the older state.
    pub fn withdraw<M: MirrorMemory + ?Sized>(self, mem: &mut M) -> Result<(), MirrorError> {
        let h = self.header();
        mem.put(0, &encode_header(&Header { gen: h.gen | 1, ..h }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire;
    use paxos::{Ballot, Command, ReadRequest, Value};
    use proptest::prelude::*;

    fn entry(slot: Slot, round: u64, bytes: usize) -> Entry {
        let cmd = Command { client: 7, seq: slot, payload: bytes::Bytes::from(vec![slot as u8; bytes]) };
        Entry { slot, ballot: Ballot { round, node: 2 }, value: Value::Batch(vec![cmd]) }
    }

    /// Reads slots `from..` of `mem` as a reader would: header, records, header again.
    fn read(mem: &[u8], from: Slot, budget: usize) -> Result<Vec<u8>, Fallback> {
        let h = decode_header(mem, mem.len() as u64)?;
        let (off, len, _) = plan_read(&h, from, budget)?;
        let recs = mem.get(off as usize..off as usize + len as usize).ok_or(Fallback::Record)?;
        let mut out = Vec::new();
        assemble(&h, from, recs, budget, &mut out)?;
        recheck(&h, mem, mem.len() as u64)?;
        Ok(out)
    }

    /// Publishes `changed` (the entries accepted since the last publication) for a store
    /// whose last slot is `last`.
    fn publish(p: &mut Publisher, mem: &mut Vec<u8>, changed: &[Entry], trimmed: Slot, last: Slot) -> bool {
        match p.publish(mem, trimmed, last, changed) {
            Ok(wrote) => wrote,
            Err(e) => panic!("a byte-vector mirror takes every write: {e}"),
        }
    }

    #[test]
    fn answers_equal_the_side_channel_encoding() {
        let mut mem = vec![0u8; HEADER_LEN + 16 * 256];
        let mut p = Publisher::new(mem.len(), 256).expect("geometry");
        assert_eq!(p.capacity(), 16);
        // Slot 4 accepted nothing.
        let log: Vec<Entry> = (1..=10).filter(|&s| s != 4).map(|s| entry(s, 3, 20)).collect();
        publish(&mut p, &mut mem, &log, 0, 10);
        let got = match read(&mem, 2, 1 << 20) {
            Ok(b) => b,
            Err(f) => panic!("a published range must be answered from the mirror, fell back: {f:?}"),
        };
        let res = paxos::ReadResult { ballot: Ballot::ZERO, from: 2, to: 10, entries: log[1..].to_vec() };
        let mut want = Vec::new();
        wire::encode_read_result(&res, 1 << 20, &mut want);
        assert_eq!(got, want, "the mirror answers exactly what the side channel would");
        let q = ReadRequest { ballot: Ballot::ZERO, from: 2, to: 10 };
        let dec = wire::decode_read_result(&q, &got).map_err(|e| e.to_string());
        assert_eq!(dec.map(|r| r.entries.len()), Ok(8));
    }

    #[test]
    fn fallbacks_too_old_not_yet_torn_changed_too_large() {
        let mut mem = vec![0u8; HEADER_LEN + 8 * 128];
        let mut p = Publisher::new(mem.len(), 128).expect("geometry");
        let log: Vec<Entry> = (1..=20).map(|s| entry(s, 1, 10)).collect();
        publish(&mut p, &mut mem, &log, 0, 20);
        assert_eq!(p.header().low, 13, "the ring keeps the last 8 slots");
        assert_eq!(read(&mem, 12, 1 << 20), Err(Fallback::TooOld));
        assert_eq!(read(&mem, 21, 1 << 20), Err(Fallback::NotYet));
        assert!(read(&mem, 13, 1 << 20).is_ok());
        // Reads never cross the ring's end: slots 13..=15 fill its last records.
        let h = match decode_header(&mem, mem.len() as u64) {
            Ok(h) => h,
            Err(f) => panic!("a published header must decode: {f:?}"),
        };
        assert_eq!(plan_read(&h, 13, 1 << 20).map(|(_, _, n)| n), Ok(3));
        // A header caught mid-rewrite (odd generation) or torn.
        let mut odd = mem.clone();
        odd[..HEADER_LEN].copy_from_slice(&encode_header(&Header { gen: h.gen + 1, ..h }));
        assert_eq!(read(&odd, 13, 1 << 20), Err(Fallback::Header));
        let mut torn = mem.clone();
        torn[20] ^= 1;
        assert_eq!(read(&torn, 13, 1 << 20), Err(Fallback::Header));
        // A record torn, or overwritten by a wrap (slot 21 lands where 13 was).
        let mut bad = mem.clone();
        let off = record_offset(14, 128, 8) as usize;
        bad[off + 40] ^= 0xff;
        assert_eq!(read(&bad, 13, 1 << 20), Err(Fallback::Record));
        let stale = mem.clone();
        let mut log2 = log.clone();
        log2.push(entry(21, 1, 10));
        publish(&mut p, &mut mem, &log2[20..], 0, 21);
        let h_old = match decode_header(&stale, stale.len() as u64) {
            Ok(h) => h,
            Err(f) => panic!("the earlier published header must decode: {f:?}"),
        };
        let (off, len, _) = match plan_read(&h_old, 13, 1 << 20) {
            Ok(plan) => plan,
            Err(f) => panic!("slot 13 is in the earlier header's range: {f:?}"),
        };
        let recs = &mem[off as usize..(off + u64::from(len)) as usize];
        assert_eq!(assemble(&h_old, 13, recs, 1 << 20, &mut Vec::new()), Err(Fallback::Record));
        // The seqlock: records read under one generation, the header re-read under another.
        assert_eq!(recheck(&h_old, &mem, mem.len() as u64), Err(Fallback::Changed));
        // A value too large for its record is never served; the reader asks for it elsewhere.
        let mut log3 = log2.clone();
        log3.push(entry(22, 1, 500));
        publish(&mut p, &mut mem, &log3[21..], 0, 22);
        assert_eq!(read(&mem, 22, 1 << 20), Err(Fallback::TooLarge));
        let q = ReadRequest { ballot: Ballot::ZERO, from: 21, to: 22 };
        let got = read(&mem, 21, 1 << 20).map(|b| wire::decode_read_result(&q, &b).map(|r| r.to).ok());
        assert_eq!(got, Ok(Some(21)), "covers up to the slot before the large value");
        // A budget below one entry.
        assert_eq!(read(&mem, 21, 40), Err(Fallback::TooLarge));
    }

    /// Reads every slot `from..` of `mem` and decodes the answer: (to, entries).
    fn read_all(mem: &[u8], from: Slot) -> Option<(Slot, Vec<Entry>)> {
        let q = ReadRequest { ballot: Ballot::ZERO, from, to: u64::MAX };
        let res = read(mem, from, 1 << 20).ok().map(|b| wire::decode_read_result(&q, &b).ok());
        res.flatten().map(|r| (r.to, r.entries))
    }

    #[test]
    fn overwrites_new_slots_and_trim_are_published() {
        let mut mem = vec![0u8; HEADER_LEN + 32 * 128];
        let mut p = Publisher::new(mem.len(), 128).expect("geometry");
        let mut log: Vec<Entry> = (1..=10).map(|s| entry(s, 1, 10)).collect();
        assert!(publish(&mut p, &mut mem, &log, 0, 10));
        assert!(!publish(&mut p, &mut mem, &[], 0, 10), "nothing changed, nothing written");
        // A new leader overwrites 6..=8 with its ballot, and slot 12 is accepted with
        // nothing at 11: only the changes are handed in.
        let changed: Vec<Entry> = [6, 7, 8, 12].into_iter().map(|s| entry(s, 2, 11)).collect();
        assert!(publish(&mut p, &mut mem, &changed, 0, 12));
        for e in &changed {
            match log.iter_mut().find(|l| l.slot == e.slot) {
                Some(l) => *l = e.clone(),
                None => log.push(e.clone()),
            }
        }
        assert_eq!(read_all(&mem, 1), Some((12, log.clone())));
        // A trim moves `low` and rewrites no record: older slots fall back.
        assert!(publish(&mut p, &mut mem, &[], 4, 12));
        assert_eq!(p.header().low, 5);
        assert_eq!(read(&mem, 4, 1 << 20), Err(Fallback::TooOld));
        assert_eq!(read_all(&mem, 5), Some((12, log[4..].to_vec())));
        // Changes below `low` (trimmed) are passed over.
        assert!(!publish(&mut p, &mut mem, &[entry(3, 3, 1)], 4, 12));
    }

    #[test]
    fn a_withdrawn_mirror_answers_nothing() {
        let mut mem = vec![0u8; HEADER_LEN + 8 * 128];
        let mut p = Publisher::new(mem.len(), 128).expect("geometry");
        let log: Vec<Entry> = (1..=4).map(|s| entry(s, 1, 10)).collect();
        assert!(publish(&mut p, &mut mem, &log, 0, 4));
        assert!(read(&mem, 1, 1 << 20).is_ok());
        assert_eq!(p.withdraw(&mut mem), Ok(()));
        assert_eq!(read(&mem, 1, 1 << 20), Err(Fallback::Header));
    }

    #[test]
    fn new_slots_without_a_change_replace_a_wrapped_record() {
        let mut mem = vec![0u8; HEADER_LEN + 8 * 128];
        let mut p = Publisher::new(mem.len(), 128).expect("geometry");
        let log: Vec<Entry> = (1..=8).map(|s| entry(s, 1, 10)).collect();
        publish(&mut p, &mut mem, &log, 0, 8);
        // Slot 10 accepted, 9 not: 9's record (where slot 1's was) says "nothing".
        assert!(publish(&mut p, &mut mem, &[entry(10, 1, 10)], 0, 10));
        assert_eq!(p.header().low, 3);
        let want: Vec<Entry> = log[2..].iter().cloned().chain([entry(10, 1, 10)]).collect();
        // Reads stop at the ring's end (slot 7 is its last record).
        assert_eq!(read_all(&mem, 3).map(|(to, _)| to), Some(7));
        assert_eq!(read_all(&mem, 8), Some((10, want[5..].to_vec())));
    }

    /// Reads slots `from..` of `mem` as a reader that saw `seen` before: the header, the
    /// records and the header again, in one go.
    fn read_chain(mem: &[u8], seen: &Seen, from: Slot, budget: usize) -> Result<Vec<u8>, Fallback> {
        let (off, len) = plan_chain(seen, from, 1 << 16).ok_or(Fallback::TooLarge)?;
        let recs = mem.get(off as usize..off as usize + len as usize).ok_or(Fallback::Record)?;
        let data: Vec<u8> = [&mem[..HEADER_LEN], recs, &mem[..HEADER_LEN]].concat();
        let mut out = Vec::new();
        answer_chain(seen, from, &data, len, mem.len() as u64, budget, &mut out)?;
        Ok(out)
    }

    #[test]
    fn chained_reads_answer_as_the_three_step_read() {
        let mut mem = vec![0u8; HEADER_LEN + 16 * 128];
        let mut p = Publisher::new(mem.len(), 128).expect("geometry");
        let log: Vec<Entry> = (1..=20).filter(|&s| s != 15).map(|s| entry(s, 1, 10)).collect();
        publish(&mut p, &mut mem, &log, 0, 20);
        let h = p.header();
        let seen = Seen::from(&h);
        for from in [5, 6, 16, 20] {
            assert_eq!(read_chain(&mem, &seen, from, 1 << 20), read(&mem, from, 1 << 20), "from {from}");
        }
        assert_eq!(read_chain(&mem, &seen, 4, 1 << 20), Err(Fallback::TooOld));
        assert_eq!(read_chain(&mem, &seen, 21, 1 << 20), Err(Fallback::NotYet));
        // A hint behind the header: a shorter answer, the core reads on.
        let behind = Seen { high: 7, ..seen };
        let q = ReadRequest { ballot: Ballot::ZERO, from: 6, to: u64::MAX };
        let got = read_chain(&mem, &behind, 6, 1 << 20).map(|b| wire::decode_read_result(&q, &b).map(|r| r.to).ok());
        assert_eq!(got, Ok(Some(7)));
        // A hint ahead: the records past the header's last slot are not answered.
        let ahead = Seen { high: 40, ..seen };
        assert_eq!(read_chain(&mem, &ahead, 17, 1 << 20), read(&mem, 17, 1 << 20));
        // Another geometry than the records were read for.
        let other = Seen { stride: 256, capacity: 8, ..seen };
        assert_eq!(read_chain(&mem, &other, 6, 1 << 20), Err(Fallback::Header));
        // A rewrite between the two headers: the seqlock.
        let (off, len) = plan_chain(&seen, 6, 1 << 16).expect("a plan");
        let before = mem.clone();
        publish(&mut p, &mut mem, &[entry(21, 2, 10)], 0, 21);
        let data: Vec<u8> = [
            &before[..off as usize + len as usize][..HEADER_LEN],
            &before[off as usize..(off + u64::from(len)) as usize],
            &mem[..HEADER_LEN],
        ]
        .concat();
        let got = answer_chain(&seen, 6, &data, len, mem.len() as u64, 1 << 20, &mut Vec::new());
        assert_eq!(got, Err(Fallback::Changed));
        // Cut anywhere: never an answer.
        for cut in 0..data.len() {
            assert!(answer_chain(&seen, 6, &data[..cut], len, mem.len() as u64, 1 << 20, &mut Vec::new()).is_err());
        }
    }

    proptest! {
        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..700), from in any::<u64>(),
                                budget in 0usize..4096) {
            let _ = decode_header(&data, data.len() as u64);
            let h = Header { gen: 2, low: 1, high: 100, stride: 64, capacity: 10 };
            let _ = plan_read(&h, from, budget);
            let _ = assemble(&h, from.max(1), &data, budget, &mut Vec::new());
            let _ = recheck(&h, &data, 4096);
            let _ = check_record(&data, from);
            let seen = Seen { stride: 64, capacity: 10, high: from };
            let _ = plan_chain(&seen, from, budget);
            let records = (data.len() / 2) as u32;
            let _ = answer_chain(&seen, from, &data, records, 4096, budget, &mut Vec::new());
        }

        #[test]
        fn random_logs_read_back_as_published(n in 1u64..60, holes in proptest::collection::vec(any::<bool>(), 60),
                                             from in 1u64..70, cap in 4usize..20) {
            let mut mem = vec![0u8; HEADER_LEN + cap * 192];
            let mut p = Publisher::new(mem.len(), 192).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let log: Vec<Entry> = (1..=n).filter(|&s| !holes[s as usize - 1]).map(|s| entry(s, 1, (s % 50) as usize)).collect();
            let last = n;
            prop_assert_eq!(p.publish(&mut mem, 0, last, &log), Ok(true));
            let low = p.header().low;
            let q = ReadRequest { ballot: Ballot::ZERO, from, to: u64::MAX };
            match read(&mem, from, 1 << 20) {
                Ok(b) => {
                    let r = wire::decode_read_result(&q, &b).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert!(r.to >= from && r.to <= last);
                    let want: Vec<Entry> = log.iter().filter(|e| e.slot >= from && e.slot <= r.to).cloned().collect();
                    prop_assert_eq!(r.entries, want);
                }
                Err(Fallback::TooOld) => prop_assert!(from < low),
                Err(Fallback::NotYet) => prop_assert!(from > last),
                Err(f) => prop_assert!(false, "unexpected fallback {:?}", f),
            }
        }

        #[test]
        fn incremental_publications_match_the_store(ops in proptest::collection::vec((1u64..40, 1u64..4, any::<bool>()), 1..80),
                                                    cap in 4usize..24) {
            // A model store (slot -> entry, a trim point) fed accepts; each publication is
            // handed only the entries accepted since the previous one.
            let mut mem = vec![0u8; HEADER_LEN + cap * 192];
            let mut p = Publisher::new(mem.len(), 192).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let mut store = std::collections::BTreeMap::new();
            let mut changed = std::collections::BTreeMap::new();
            let mut trimmed = 0;
            for (slot, round, publish_now) in ops {
                if slot > trimmed {
                    let round = round.max(store.get(&slot).map_or(0, |e: &Entry| e.ballot.round));
                    let e = entry(slot, round, (slot + round) as usize % 40);
                    store.insert(slot, e.clone());
                    changed.insert(slot, e);
                }
                if !publish_now {
                    continue;
                }
                let mut last = store.keys().next_back().copied().unwrap_or(0).max(trimmed);
                if round == 3 {
                    trimmed = (trimmed + 3).min(last);
                    store = store.split_off(&(trimmed + 1));
                    last = last.max(trimmed);
                }
                prop_assert!(p.publish(&mut mem, trimmed, last, changed.values()).is_ok());
                changed.clear();
                let low = p.header().low;
                let (mut from, mut got) = (low, Vec::new());
                while from <= last {
                    let (to, es) = read_all(&mem, from).ok_or_else(|| TestCaseError::fail(format!("slot {from} not served")))?;
                    got.extend(es);
                    from = to + 1;
                }
                let want: Vec<Entry> = store.range(low..).map(|(_, e)| e.clone()).collect();
                prop_assert_eq!(got, want);
            }
        }
    }
}
