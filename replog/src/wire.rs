//! How the protocol's messages and one-sided accesses travel as transport bytes.
//!
//! The transport moves opaque payloads; this module maps the core's types onto them.
//! All integers are little-endian; a ballot is `round u64, node u64`. Decoding checks
//! every length against the input, refuses trailing bytes and never panics.
//!
//! Control-plane messages (`Transport::send`): a kind byte, then fixed fields:
//!
//! ```text
//! 1 PreVote        round
//! 2 PreVoteReply   round, granted u8
//! 3 Prepare        ballot, transfer u8
//! 4 Promise        ballot, chosen, last
//! 5 Reject         ballot, promised
//! 6 Heartbeat      ballot, commit, seq
//! 7 HeartbeatReply ballot, chosen, last, seq
//! 8 TimeoutNow     ballot
//! ```
//!
//! A remote write of slots `first..` (`Transport::write`): offset = `first`; data =
//! `ballot, commit, count u32`, then per slot `len u32` and the value in the store's
//! encoding ([`crate::store::codec`]). Its acknowledgement carries nothing; a denial
//! carries the target's promised ballot (16 bytes) when the agent knows it.
//!
//! A remote read of slots `from..=to` (`Transport::read`): offset = `from`, len =
//! number of slots. The answer: `to u64` (the last slot covered; the agent may answer a
//! shorter range), `count u32`, then per entry `slot, ballot, len u32, value`.

use crate::store::codec::{check_value, decode_value, encode_value};
use paxos::{Ballot, Entry, Message, ReadRequest, ReadResult, Slot, WriteRequest};

/// Why bytes are not a valid encoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The input ended early.
    #[error("truncated")]
    Truncated,
    /// Bytes after the end.
    #[error("{0} trailing bytes")]
    Trailing(usize),
    /// An unknown message kind.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// A field is out of range.
    #[error("invalid: {0}")]
    Invalid(&'static str),
}

struct R<'a>(&'a [u8]);

impl<'a> R<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Truncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        self.take(4)?.try_into().map(u32::from_le_bytes).map_err(|_| WireError::Truncated)
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        self.take(8)?.try_into().map(u64::from_le_bytes).map_err(|_| WireError::Truncated)
    }
    fn ballot(&mut self) -> Result<Ballot, WireError> {
        Ok(Ballot::new(self.u64()?, self.u64()?))
    }
    fn end(self) -> Result<(), WireError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(WireError::Trailing(self.0.len()))
        }
    }
}

fn put_ballot(out: &mut Vec<u8>, b: Ballot) {
    out.extend_from_slice(&b.round.to_le_bytes());
    out.extend_from_slice(&b.node.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Appends the encoding of a control-plane message.
pub fn encode_message(m: &Message, out: &mut Vec<u8>) {
    match *m {
        Message::PreVote { round, chosen } => {
            out.push(1);
            put_u64(out, round);
            put_u64(out, chosen);
        }
        Message::PreVoteReply { round, granted } => {
            out.push(2);
            put_u64(out, round);
            out.push(granted as u8);
        }
        Message::Prepare { ballot, transfer } => {
            out.push(3);
            put_ballot(out, ballot);
            out.push(transfer as u8);
        }
        Message::TimeoutNow { ballot } => {
            out.push(8);
            put_ballot(out, ballot);
        }
        Message::Promise { ballot, chosen, last, trimmed } => {
            out.push(4);
            put_ballot(out, ballot);
            put_u64(out, chosen);
            put_u64(out, last);
            put_u64(out, trimmed);
        }
        Message::Reject { ballot, promised } => {
            out.push(5);
            put_ballot(out, ballot);
            put_ballot(out, promised);
        }
        Message::Heartbeat { ballot, commit, seq } => {
            out.push(6);
            put_ballot(out, ballot);
            put_u64(out, commit);
            put_u64(out, seq);
        }
        Message::HeartbeatReply { ballot, chosen, last, seq } => {
            out.push(7);
            put_ballot(out, ballot);
            put_u64(out, chosen);
            put_u64(out, last);
            put_u64(out, seq);
        }
    }
}

/// Decodes a control-plane message.
pub fn decode_message(b: &[u8]) -> Result<Message, WireError> {
    let mut r = R(b);
    let m = match r.u8()? {
        1 => Message::PreVote { round: r.u64()?, chosen: r.u64()? },
        2 => {
            let round = r.u64()?;
            let granted = match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err(WireError::Invalid("granted flag")),
            };
            Message::PreVoteReply { round, granted }
        }
        3 => {
            let ballot = r.ballot()?;
            let transfer = match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err(WireError::Invalid("transfer flag")),
            };
            Message::Prepare { ballot, transfer }
        }
        8 => Message::TimeoutNow { ballot: r.ballot()? },
        4 => Message::Promise { ballot: r.ballot()?, chosen: r.u64()?, last: r.u64()?, trimmed: r.u64()? },
        5 => Message::Reject { ballot: r.ballot()?, promised: r.ballot()? },
        6 => Message::Heartbeat { ballot: r.ballot()?, commit: r.u64()?, seq: r.u64()? },
        7 => Message::HeartbeatReply { ballot: r.ballot()?, chosen: r.u64()?, last: r.u64()?, seq: r.u64()? },
        k => return Err(WireError::UnknownKind(k)),
    };
    r.end()?;
    Ok(m)
}

/// The offset and data of a remote write.
pub fn encode_write(w: &WriteRequest, out: &mut Vec<u8>) -> u64 {
    put_ballot(out, w.ballot);
    put_u64(out, w.commit);
    out.extend_from_slice(&(w.values.len() as u32).to_le_bytes());
    for v in &w.values {
        let at = out.len();
        out.extend_from_slice(&[0; 4]);
        encode_value(v, out);
        let len = (out.len() - at - 4) as u32;
        out[at..at + 4].copy_from_slice(&len.to_le_bytes());
    }
    w.first
}

/// Decodes a remote write that arrived at `offset`.
pub fn decode_write(offset: u64, data: &[u8]) -> Result<WriteRequest, WireError> {
    let mut r = R(data);
    let ballot = r.ballot()?;
    let commit = r.u64()?;
    let count = r.u32()? as usize;
    if offset == 0 || count == 0 {
        return Err(WireError::Invalid("empty write or slot 0"));
    }
    // Each value takes at least 5 bytes: bound the allocation by the input.
    if count > data.len() / 5 {
        return Err(WireError::Truncated);
    }
    let mut values = Vec::with_capacity(count);
    for _ in 0..count {
        let len = r.u32()? as usize;
        let v = decode_value(r.take(len)?).map_err(WireError::Invalid)?;
        values.push(v);
    }
    r.end()?;
    if offset.checked_add(count as u64).is_none() {
        return Err(WireError::Invalid("slot overflow"));
    }
    Ok(WriteRequest { ballot, first: offset, values, commit })
}

/// The detail of a denied write: the target's promise.
pub fn encode_denied(promised: Option<Ballot>) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(b) = promised {
        put_ballot(&mut out, b);
    }
    out
}

/// Decodes a denial's detail (empty: the target did not say).
pub fn decode_denied(b: &[u8]) -> Option<Ballot> {
    let mut r = R(b);
    let ballot = r.ballot().ok()?;
    r.end().ok()?;
    Some(ballot)
}

/// The offset and length of a remote read of `q`: offset = first slot, length = the
/// byte budget of the answer (the transport's unit). The agent answers as many slots
/// from the first as fit, and says which slot it covered up to.
pub fn read_args(q: &ReadRequest, budget: usize) -> (u64, u32) {
    (q.from, budget.min(u32::MAX as usize) as u32)
}

/// The request a read at `offset` stands for, at the agent (which learns neither the
/// reader's ballot nor where it wants to stop: it answers up to its own limits).
pub fn read_request(offset: u64) -> ReadRequest {
    ReadRequest { ballot: Ballot::ZERO, from: offset, to: u64::MAX }
}

/// Bytes of a read answer before its entries: `to u64, count u32`.
pub const READ_RESULT_HEAD: usize = 12;
/// Bytes of an encoded entry before its value: `slot u64, ballot (round u64, node u64),
/// value length u32`.
pub const ENTRY_HEAD: usize = 28;

/// Appends one entry of a read answer: `slot u64, ballot, len u32, value` (the value in
/// the store's encoding). The RDMA read mirror stores entries in exactly these bytes.
pub fn encode_entry(e: &Entry, out: &mut Vec<u8>) {
    let at = out.len();
    put_u64(out, e.slot);
    put_ballot(out, e.ballot);
    out.extend_from_slice(&[0; 4]);
    encode_value(&e.value, out);
    let len = (out.len() - at - ENTRY_HEAD) as u32;
    out[at + 24..at + ENTRY_HEAD].copy_from_slice(&len.to_le_bytes());
}

/// Encodes a read's answer within `budget` bytes: whole entries only; if some do not
/// fit, `to` is lowered to the slot before the first left out.
pub fn encode_read_result(res: &ReadResult, budget: usize, out: &mut Vec<u8>) {
    let start = out.len();
    put_u64(out, res.to);
    out.extend_from_slice(&0u32.to_le_bytes());
    let mut count = 0u32;
    let mut to = res.to;
    for e in &res.entries {
        let at = out.len();
        encode_entry(e, out);
        if out.len() - start > budget && count > 0 {
            out.truncate(at);
            to = e.slot - 1;
            break;
        }
        count += 1;
    }
    out[start..start + 8].copy_from_slice(&to.to_le_bytes());
    out[start + 8..start + 12].copy_from_slice(&count.to_le_bytes());
}

/// Decodes a read's answer for the request `q` this replica issued.
pub fn decode_read_result(q: &ReadRequest, data: &[u8]) -> Result<ReadResult, WireError> {
    parse_read_result(q, data, true)
}

/// Whether `data` is an answer [`decode_read_result`] accepts for a read from `from`
/// (the same parser), without building it: the entries and their values are walked,
/// not copied ([`crate::store::codec::check_value`]). Never panics.
pub fn check_read_result(from: Slot, data: &[u8]) -> Result<(), WireError> {
    parse_read_result(&read_request(from), data, false).map(drop)
}

/// Decodes a read's answer (`build`), or only checks it: without `build`, the result
/// holds no entries.
fn parse_read_result(q: &ReadRequest, data: &[u8], build: bool) -> Result<ReadResult, WireError> {
    let mut r = R(data);
    let to: Slot = r.u64()?;
    if to < q.from.saturating_sub(1) {
        return Err(WireError::Invalid("read answer ends before the range asked"));
    }
    let count = r.u32()? as usize;
    if count > data.len() / 29 {
        return Err(WireError::Truncated);
    }
    let mut entries = Vec::with_capacity(if build { count } else { 0 });
    for _ in 0..count {
        let slot = r.u64()?;
        let ballot = r.ballot()?;
        let len = r.u32()? as usize;
        let bytes = r.take(len)?;
        let value = match build {
            true => Some(decode_value(bytes).map_err(WireError::Invalid)?),
            false => check_value(bytes).map(|()| None).map_err(WireError::Invalid)?,
        };
        if slot < q.from || slot > to {
            return Err(WireError::Invalid("read answer holds a slot outside its range"));
        }
        if let Some(value) = value {
            entries.push(Entry { slot, ballot, value });
        }
    }
    r.end()?;
    // The agent may cover more than asked: keep what was asked.
    let to = to.min(q.to);
    entries.retain(|e| e.slot <= to);
    Ok(ReadResult { ballot: q.ballot, from: q.from, to, entries })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use paxos::{Command, Value};
    use proptest::prelude::*;

    fn b(r: u64, n: u64) -> Ballot {
        Ballot::new(r, n)
    }

    #[test]
    fn messages_round_trip() {
        let ms = [
            Message::PreVote { round: 3, chosen: 9 },
            Message::PreVoteReply { round: 3, granted: true },
            Message::Prepare { ballot: b(4, 2), transfer: false },
            Message::Prepare { ballot: b(4, 2), transfer: true },
            Message::TimeoutNow { ballot: b(4, 2) },
            Message::Promise { ballot: b(4, 2), chosen: 10, last: 12, trimmed: 7 },
            Message::Reject { ballot: b(4, 2), promised: b(5, 1) },
            Message::Heartbeat { ballot: b(5, 1), commit: 99, seq: 7 },
            Message::HeartbeatReply { ballot: b(5, 1), chosen: 98, last: 99, seq: 7 },
        ];
        for m in ms {
            let mut out = Vec::new();
            encode_message(&m, &mut out);
            assert_eq!(decode_message(&out), Ok(m.clone()));
            for cut in 0..out.len() {
                assert!(decode_message(&out[..cut]).is_err());
            }
            out.push(0);
            assert_eq!(decode_message(&out), Err(WireError::Trailing(1)));
        }
    }

    #[test]
    fn writes_and_reads_round_trip() {
        let cmd = |s: u64| Command { client: 7, seq: s, payload: Bytes::from(vec![s as u8; s as usize]) };
        let w = WriteRequest {
            ballot: b(2, 3),
            first: 5,
            values: vec![Value::Noop, Value::Batch(vec![cmd(1), cmd(2)])],
            commit: 4,
        };
        let mut data = Vec::new();
        let off = encode_write(&w, &mut data);
        assert_eq!(decode_write(off, &data), Ok(w.clone()));
        assert!(decode_write(0, &data).is_err());
        let q = ReadRequest { ballot: b(9, 1), from: 5, to: 9 };
        let (off, len) = read_args(&q, 1 << 20);
        assert_eq!((off, len), (5, 1 << 20));
        let at_agent = read_request(off);
        assert_eq!((at_agent.from, at_agent.to), (5, u64::MAX));
        let res = ReadResult {
            ballot: Ballot::ZERO,
            from: 5,
            to: 7,
            entries: vec![Entry { slot: 6, ballot: b(2, 3), value: Value::Batch(vec![cmd(3)]) }],
        };
        let mut data = Vec::new();
        encode_read_result(&res, 1 << 20, &mut data);
        let got = decode_read_result(&q, &data).map(|r| (r.ballot, r.from, r.to, r.entries));
        assert_eq!(got, Ok((q.ballot, 5, 7, res.entries.clone())));
        assert_eq!(check_read_result(5, &data), Ok(()));
        // An answer covering more than asked is cut to the range asked.
        let wide = ReadResult { to: 20, ..res.clone() };
        let mut data = Vec::new();
        encode_read_result(&wide, 1 << 20, &mut data);
        assert_eq!(decode_read_result(&q, &data).map(|r| r.to), Ok(9));
        // A small budget keeps whole entries and lowers `to`.
        let two = ReadResult {
            to: 8,
            entries: vec![
                Entry { slot: 6, ballot: b(2, 3), value: Value::Batch(vec![cmd(50)]) },
                Entry { slot: 8, ballot: b(2, 3), value: Value::Batch(vec![cmd(50)]) },
            ],
            ..res.clone()
        };
        let mut data = Vec::new();
        encode_read_result(&two, 120, &mut data);
        let got = decode_read_result(&q, &data).map(|r| (r.to, r.entries.len()));
        assert_eq!(got, Ok((7, 1)));
        // An answer that does not decode does not pass the check either.
        data.truncate(data.len() - 1);
        assert!(decode_read_result(&q, &data).is_err());
        assert_eq!(check_read_result(5, &data), Err(WireError::Truncated));
        assert_eq!(decode_denied(&encode_denied(Some(b(3, 3)))), Some(b(3, 3)));
        assert_eq!(decode_denied(&encode_denied(None)), None);
    }

    proptest! {
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300), off in any::<u64>()) {
            let _ = decode_message(&data);
            let _ = decode_write(off, &data);
            let q = ReadRequest { ballot: Ballot::ZERO, from: 1, to: u64::MAX };
            let _ = decode_read_result(&q, &data);
            let _ = decode_denied(&data);
        }

        #[test]
        fn the_check_accepts_exactly_what_decodes(data in proptest::collection::vec(any::<u8>(), 0..300),
                                                 from in 0u64..4, n in 0usize..4, cut in any::<prop::sample::Index>()) {
            let q = read_request(from);
            prop_assert_eq!(check_read_result(from, &data).is_ok(), decode_read_result(&q, &data).is_ok());
            // Valid answers, whole and cut anywhere.
            let cmd = |s: u64| Command { client: 1, seq: s, payload: Bytes::from(vec![7; s as usize]) };
            let entries = (0..n as u64).map(|i| Entry { slot: from + i + 1, ballot: b(1, 1), value: Value::Batch(vec![cmd(i)]) });
            let res = ReadResult { ballot: Ballot::ZERO, from, to: from + n as u64, entries: entries.collect() };
            let mut out = Vec::new();
            encode_read_result(&res, 1 << 20, &mut out);
            prop_assert_eq!(check_read_result(from, &out), Ok(()));
            let part = &out[..cut.index(out.len() + 1)];
            prop_assert_eq!(check_read_result(from, part).is_ok(), decode_read_result(&q, part).is_ok());
        }
    }
}
