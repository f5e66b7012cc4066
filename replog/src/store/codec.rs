//! The compact encoding of a [`paxos::Value`] in an entry record's payload.
//!
//! ```text
//!  u8  tag        0 = Noop, 1 = Batch, 2 = Config, 3 = Trim, 4 = Config with addresses
//!  Trim only: u64 position
//!  Config only: u32 voters, voters x u64, u32 learners, learners x u64
//!  Config with addresses (version 2 of Config: written only when the membership
//!  carries per-member bytes, so logs without them read the same as before):
//!    the Config fields, then u32 count, count x (u64 id, u32 len, len bytes),
//!    ids strictly increasing, each one a voter or a learner
//!  Batch only:
//!  u32 count      number of commands
//!  count times:
//!    u64 client
//!    u64 seq
//!    u32 len
//!    len bytes    payload
//! ```
//!
//! All integers little-endian. Decoding checks every length against the input and
//! rejects trailing bytes; it never panics on any input.

use bytes::Bytes;
use paxos::{Command, Membership, Value};

const TAG_NOOP: u8 = 0;
const TAG_BATCH: u8 = 1;
const TAG_CONFIG: u8 = 2;
const TAG_TRIM: u8 = 3;
const TAG_CONFIG_ADDRS: u8 = 4;
/// Largest per-member bytes accepted (addresses are far shorter).
pub const MAX_MEMBER_BYTES: usize = 1024;
const CMD_FIXED: usize = 8 + 8 + 4;

/// Bytes `value` takes encoded.
pub fn encoded_len(value: &Value) -> usize {
    match value {
        Value::Noop => 1,
        Value::Batch(cmds) => 5 + cmds.iter().map(|c| CMD_FIXED + c.payload.len()).sum::<usize>(),
        Value::Config(m) if m.addrs.is_empty() => 9 + 8 * (m.voters.len() + m.learners.len()),
        Value::Config(m) => {
            13 + 8 * (m.voters.len() + m.learners.len()) + m.addrs.values().map(|a| 12 + a.len()).sum::<usize>()
        }
        Value::Trim(_) => 9,
    }
}

/// Appends the encoding of `value` to `out`.
pub fn encode_value(value: &Value, out: &mut Vec<u8>) {
    out.reserve(encoded_len(value));
    match value {
        Value::Noop => out.push(TAG_NOOP),
        Value::Batch(cmds) => {
            out.push(TAG_BATCH);
            out.extend_from_slice(&(cmds.len() as u32).to_le_bytes());
            for c in cmds {
                out.extend_from_slice(&c.client.to_le_bytes());
                out.extend_from_slice(&c.seq.to_le_bytes());
                out.extend_from_slice(&(c.payload.len() as u32).to_le_bytes());
                out.extend_from_slice(&c.payload);
            }
        }
        Value::Config(m) => {
            out.push(if m.addrs.is_empty() { TAG_CONFIG } else { TAG_CONFIG_ADDRS });
            for ids in [&m.voters, &m.learners] {
                out.extend_from_slice(&(ids.len() as u32).to_le_bytes());
                for id in ids {
                    out.extend_from_slice(&id.to_le_bytes());
                }
            }
            if !m.addrs.is_empty() {
                out.extend_from_slice(&(m.addrs.len() as u32).to_le_bytes());
                for (id, a) in &m.addrs {
                    out.extend_from_slice(&id.to_le_bytes());
                    out.extend_from_slice(&(a.len() as u32).to_le_bytes());
                    out.extend_from_slice(a);
                }
            }
        }
        Value::Trim(p) => {
            out.push(TAG_TRIM);
            out.extend_from_slice(&p.to_le_bytes());
        }
    }
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.b.len() < n {
            return Err("value truncated");
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, &'static str> {
        self.take(1)?.first().copied().ok_or("value truncated")
    }
    fn u32(&mut self) -> Result<u32, &'static str> {
        self.take(4)?.try_into().map(u32::from_le_bytes).map_err(|_| "value truncated")
    }
    fn u64(&mut self) -> Result<u64, &'static str> {
        self.take(8)?.try_into().map(u64::from_le_bytes).map_err(|_| "value truncated")
    }
}

/// Decodes a value; any malformed input is an error, never a panic.
pub fn decode_value(b: &[u8]) -> Result<Value, &'static str> {
    parse_value(b, true)
}

/// Whether `b` is a value [`decode_value`] accepts (the same parser), without building
/// it: a batch's commands are walked, not copied. (A membership change, rare, is
/// decoded whole: its checks need the lists.) Never panics.
pub fn check_value(b: &[u8]) -> Result<(), &'static str> {
    parse_value(b, false).map(drop)
}

/// Decodes a value (`build`), or only checks it: without `build`, a batch comes back
/// with no commands.
fn parse_value(b: &[u8], build: bool) -> Result<Value, &'static str> {
    let mut r = Reader { b };
    let v = match r.u8()? {
        TAG_NOOP => Value::Noop,
        TAG_BATCH => {
            let n = r.u32()? as usize;
            if n > r.b.len() / CMD_FIXED {
                return Err("command count exceeds the value's length");
            }
            let mut cmds = Vec::with_capacity(if build { n } else { 0 });
            for _ in 0..n {
                let client = r.u64()?;
                let seq = r.u64()?;
                let len = r.u32()? as usize;
                let payload = r.take(len)?;
                if build {
                    cmds.push(Command { client, seq, payload: Bytes::copy_from_slice(payload) });
                }
            }
            Value::Batch(cmds)
        }
        tag @ (TAG_CONFIG | TAG_CONFIG_ADDRS) => {
            let mut lists = [Vec::new(), Vec::new()];
            for l in lists.iter_mut() {
                let n = r.u32()? as usize;
                if n > r.b.len() / 8 {
                    return Err("member count exceeds the value's length");
                }
                for _ in 0..n {
                    l.push(r.u64()?);
                }
            }
            let [voters, learners] = lists;
            let m = Membership::new(voters.clone(), learners.clone());
            if m.voters != voters || m.learners != learners || !m.is_valid() {
                return Err("membership not sorted, duplicated or without voters");
            }
            let mut addrs = std::collections::BTreeMap::new();
            if tag == TAG_CONFIG_ADDRS {
                let n = r.u32()? as usize;
                if n == 0 || n > r.b.len() / 12 {
                    return Err("member address count is zero or exceeds the value's length");
                }
                let mut last = None;
                for _ in 0..n {
                    let id = r.u64()?;
                    let len = r.u32()? as usize;
                    if len > MAX_MEMBER_BYTES {
                        return Err("member address too long");
                    }
                    if last.is_some_and(|l| l >= id) || !m.contains(id) {
                        return Err("member addresses not sorted, duplicated or of a non-member");
                    }
                    last = Some(id);
                    addrs.insert(id, r.take(len)?.to_vec());
                }
            }
            Value::Config(m.with_addrs(addrs))
        }
        TAG_TRIM => Value::Trim(r.u64()?),
        _ => return Err("unknown value tag"),
    };
    if !r.b.is_empty() {
        return Err("trailing bytes after value");
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Noop),
            any::<u64>().prop_map(Value::Trim),
            proptest::collection::vec(
                (any::<u64>(), any::<u64>(), proptest::collection::vec(any::<u8>(), 0..40)),
                0..6
            )
            .prop_map(|v| Value::Batch(
                v.into_iter().map(|(client, seq, p)| Command { client, seq, payload: Bytes::from(p) }).collect()
            )),
            (proptest::collection::vec(1u64..20, 1..6), proptest::collection::vec(1u64..20, 0..4))
                .prop_map(|(v, l)| Value::Config(Membership::new(v, l))),
            (
                proptest::collection::vec(1u64..20, 1..6),
                proptest::collection::vec(1u64..20, 0..4),
                proptest::collection::btree_map(1u64..20, proptest::collection::vec(any::<u8>(), 0..30), 0..8)
            )
                .prop_map(|(v, l, a)| Value::Config(Membership::new(v, l).with_addrs(a))),
        ]
    }

    proptest! {
        #[test]
        fn roundtrip(v in arb_value()) {
            let mut b = Vec::new();
            encode_value(&v, &mut b);
            prop_assert_eq!(b.len(), encoded_len(&v));
            prop_assert_eq!(check_value(&b), Ok(()));
            prop_assert_eq!(decode_value(&b), Ok(v));
        }

        #[test]
        fn garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            prop_assert_eq!(check_value(&b).is_ok(), decode_value(&b).is_ok());
        }

        #[test]
        fn mutations_never_panic(v in arb_value(), i in any::<usize>(), x in any::<u8>(), cut in any::<usize>()) {
            let mut b = Vec::new();
            encode_value(&v, &mut b);
            let i = i % b.len();
            b[i] ^= x;
            prop_assert_eq!(check_value(&b).is_ok(), decode_value(&b).is_ok());
            b.truncate(cut % (b.len() + 1));
            prop_assert_eq!(check_value(&b).is_ok(), decode_value(&b).is_ok());
        }
    }
}
