//! Reliability of one link incarnation, both directions, without I/O (time comes in as
//! an argument): records are queued, cut into fragments, numbered, kept until
//! acknowledged and sent again when their timer runs out; received fragments are put
//! back in order (out-of-order ones held within the window), duplicates are dropped,
//! and records are joined again.
//!
//! - sequence numbers are `u64` from 1 per direction (no wrap in practice);
//! - the receiver acknowledges cumulatively (`ack` = the next seq it expects) plus a
//!   64-bit selective-ack bitmap for `ack+1 ..= ack+64`, so a loss costs one
//!   retransmission, not the window after it;
//! - the sender keeps at most `window` frames unacknowledged; records beyond wait in a
//!   queue whose size the transport bounds (backpressure, never an unbounded queue);
//! - a frame not acknowledged after the retransmission timeout is sent again; one that
//!   the bitmap shows was skipped over is sent again after a quarter of it.

use bytes::Bytes;
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// A fragment in the send window.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub(crate) seq: u64,
    pub(crate) frag: u16,
    pub(crate) frags: u16,
    pub(crate) payload: Bytes,
    /// `None`: never handed to the NIC yet.
    pub(crate) sent_at: Option<Instant>,
    sacked: bool,
    /// The bitmap showed a later frame arrived: resend early.
    hole: bool,
}

/// Why the peer broke the link protocol (the link is reset).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// A fragment out of its record's order, or a record announced with too many
    /// fragments.
    #[error("bad fragment {frag}/{frags} (expected {expected}, at most {max} fragments per record)")]
    Fragment {
        /// Index received.
        frag: u16,
        /// Count received.
        frags: u16,
        /// Index expected.
        expected: u16,
        /// The limit.
        max: u16,
    },
    /// An acknowledgement of frames never sent.
    #[error("acknowledgement {ack} beyond the next sequence number {next}")]
    AckBeyond {
        /// The ack.
        ack: u64,
        /// Our next sequence number.
        next: u64,
    },
}

/// Counters of one link (cumulative over its incarnations in the transport's stats).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// DATA frames sent for the first time.
    pub data_sent: u64,
    /// DATA frames sent again.
    pub retransmits: u64,
    /// DATA frames received that were already received (dropped).
    pub duplicates: u64,
    /// DATA frames received beyond the window (dropped).
    pub beyond_window: u64,
    /// Records delivered.
    pub records: u64,
}

/// A record not yet wholly in the window.
struct Queued {
    rest: Bytes,
    next: u16,
    frags: u16,
}

struct Partial {
    buf: Vec<u8>,
    next: u16,
    frags: u16,
}

/// One incarnation of a link's reliability state.
pub(crate) struct Link {
    frag_payload: usize,
    window: usize,
    max_frags: u16,
    // Sender.
    next_seq: u64,
    pub(crate) unacked: VecDeque<Outgoing>,
    queue: VecDeque<Queued>,
    queued_bytes: usize,
    // Receiver.
    expected: u64,
    ooo: BTreeMap<u64, (u16, u16, Bytes)>,
    partial: Option<Partial>,
    /// Something arrived that the peer should hear an acknowledgement of.
    pub(crate) ack_due: bool,
    pub(crate) stats: LinkStats,
}

impl Link {
    /// `frag_payload`: bytes per fragment; `window`: most frames unacknowledged (and
    /// held out of order); `max_record`: the largest record accepted from the peer.
    pub(crate) fn new(frag_payload: usize, window: usize, max_record: usize) -> Link {
        let max_frags = max_record.div_ceil(frag_payload).clamp(1, u16::MAX as usize) as u16;
        Link {
            frag_payload,
            window,
            max_frags,
            next_seq: 1,
            unacked: VecDeque::new(),
            queue: VecDeque::new(),
            queued_bytes: 0,
            expected: 1,
            ooo: BTreeMap::new(),
            partial: None,
            ack_due: false,
            stats: LinkStats::default(),
        }
    }

    /// Bytes of records queued or in flight (not yet acknowledged).
    pub(crate) fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Whether nothing waits to be sent or acknowledged.
    #[cfg(test)]
    pub(crate) fn is_idle(&self) -> bool {
        self.unacked.is_empty() && self.queue.is_empty()
    }

    /// The largest record this link cuts into fragments.
    pub(crate) fn max_record(&self) -> usize {
        self.frag_payload * self.max_frags as usize
    }

    /// Queues a record.
    pub(crate) fn push(&mut self, record: Bytes) {
        debug_assert!(record.len() <= self.max_record());
        self.queued_bytes += record.len();
        let frags = record.len().div_ceil(self.frag_payload).max(1) as u16;
        self.queue.push_back(Queued { rest: record, next: 0, frags });
    }

    /// Moves queued records into the window, fragment by fragment, while it has room.
    pub(crate) fn fill_window(&mut self) {
        while self.unacked.len() < self.window {
            let Some(q) = self.queue.front_mut() else { break };
            let n = q.rest.len().min(self.frag_payload);
            let payload = q.rest.split_to(n);
            self.unacked.push_back(Outgoing {
                seq: self.next_seq,
                frag: q.next,
                frags: q.frags,
                payload,
                sent_at: None,
                sacked: false,
                hole: false,
            });
            self.next_seq += 1;
            q.next += 1;
            if q.next == q.frags {
                self.queue.pop_front();
            }
        }
    }

    /// Handles the peer's acknowledgement: `ack` is the next seq it expects, bit `i` of
    /// `sack` says it holds `ack + 1 + i`.
    pub(crate) fn on_ack(&mut self, ack: u64, sack: u64) -> Result<(), LinkError> {
        if ack > self.next_seq {
            return Err(LinkError::AckBeyond { ack, next: self.next_seq });
        }
        while self.unacked.front().is_some_and(|o| o.seq < ack) {
            let o = self.unacked.pop_front().expect("front");
            self.queued_bytes -= o.payload.len();
        }
        if sack != 0 {
            let highest = ack + 64 - u64::from(sack.leading_zeros());
            for o in self.unacked.iter_mut() {
                if o.seq > highest {
                    break;
                }
                let bit = o.seq - ack;
                if (1..=64).contains(&bit) && sack & (1 << (bit - 1)) != 0 {
                    o.sacked = true;
                } else if !o.sacked {
                    o.hole = true;
                }
            }
        }
        Ok(())
    }

    /// Indices (in `unacked`) of the frames to hand to the NIC now: never sent, or
    /// unacknowledged for `rto` (a quarter of it for a hole the bitmap showed).
    /// Marks them sent at `now` and counts them.
    pub(crate) fn due(&mut self, now: Instant, rto: Duration, out: &mut Vec<usize>) {
        out.clear();
        for (i, o) in self.unacked.iter_mut().enumerate() {
            let due = match o.sent_at {
                None => {
                    self.stats.data_sent += 1;
                    true
                }
                Some(_) if o.sacked => false,
                Some(t) => {
                    let after = if o.hole { rto / 4 } else { rto };
                    let late = now.saturating_duration_since(t) >= after;
                    if late {
                        self.stats.retransmits += 1;
                        o.hole = false;
                    }
                    late
                }
            };
            if due {
                o.sent_at = Some(now);
                out.push(i);
            }
        }
    }

    /// The acknowledgement to send: the next seq expected and the bitmap of what is
    /// held beyond it.
    pub(crate) fn ack_info(&self) -> (u64, u64) {
        let mut sack = 0u64;
        for &seq in self.ooo.keys() {
            let bit = seq - self.expected;
            if bit > 64 {
                break;
            }
            sack |= 1 << (bit - 1);
        }
        (self.expected, sack)
    }

    /// Handles a DATA frame; complete records are appended to `records` in order.
    pub(crate) fn on_data(
        &mut self,
        seq: u64,
        frag: u16,
        frags: u16,
        payload: &[u8],
        records: &mut Vec<Bytes>,
    ) -> Result<(), LinkError> {
        self.ack_due = true;
        if seq < self.expected || self.ooo.contains_key(&seq) {
            self.stats.duplicates += 1;
            return Ok(());
        }
        if seq >= self.expected + self.window as u64 || seq == 0 {
            self.stats.beyond_window += 1;
            return Ok(());
        }
        if frags == 0 || frags > self.max_frags || frag >= frags {
            return Err(LinkError::Fragment { frag, frags, expected: 0, max: self.max_frags });
        }
        self.ooo.insert(seq, (frag, frags, Bytes::copy_from_slice(payload)));
        while let Some((frag, frags, payload)) = self.ooo.remove(&self.expected) {
            self.expected += 1;
            let expected = self.partial.as_ref().map_or(0, |p| p.next);
            let bad = LinkError::Fragment { frag, frags, expected, max: self.max_frags };
            match &mut self.partial {
                None if frag == 0 && frags == 1 => {
                    self.stats.records += 1;
                    records.push(payload);
                }
                None if frag == 0 => {
                    let mut buf = Vec::with_capacity(frags as usize * self.frag_payload);
                    buf.extend_from_slice(&payload);
                    self.partial = Some(Partial { buf, next: 1, frags });
                }
                Some(p) if frag == p.next && frags == p.frags => {
                    p.buf.extend_from_slice(&payload);
                    p.next += 1;
                    if p.next == p.frags {
                        let p = self.partial.take().expect("partial");
                        self.stats.records += 1;
                        records.push(Bytes::from(p.buf));
                    }
                }
                _ => return Err(bad),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift for loss decisions.
    struct Rng(u64);
    impl Rng {
        fn chance(&mut self, p: f64) -> bool {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % 1_000_000) as f64 / 1_000_000.0 < p
        }
    }

    /// Two links exchanging frames over a lossy, virtual-time channel.
    fn exchange(records: &[Bytes], loss: f64, seed: u64) -> (Vec<Bytes>, LinkStats) {
        let (fp, window) = (100, 16);
        let mut a = Link::new(fp, window, 1 << 20);
        let mut b = Link::new(fp, window, 1 << 20);
        for r in records {
            a.push(r.clone());
        }
        let mut rng = Rng(seed | 1);
        let mut now = Instant::now();
        let rto = Duration::from_millis(10);
        let mut got = Vec::new();
        let mut idx = Vec::new();
        for _ in 0..100_000 {
            if a.is_idle() {
                break;
            }
            a.fill_window();
            a.due(now, rto, &mut idx);
            let frames: Vec<_> =
                idx.iter().map(|&i| &a.unacked[i]).map(|o| (o.seq, o.frag, o.frags, o.payload.clone())).collect();
            for (seq, frag, frags, p) in frames {
                if !rng.chance(loss) {
                    b.on_data(seq, frag, frags, &p, &mut got).unwrap();
                }
            }
            if b.ack_due {
                b.ack_due = false;
                let (ack, sack) = b.ack_info();
                if !rng.chance(loss) {
                    a.on_ack(ack, sack).unwrap();
                }
            }
            now += Duration::from_millis(1);
        }
        assert!(a.is_idle(), "everything acknowledged");
        assert_eq!(a.queued_bytes(), 0);
        (got, a.stats)
    }

    fn records() -> Vec<Bytes> {
        (0..300u32)
            .map(|i| {
                let len = (i as usize * 37) % 1000 + if i % 50 == 0 { 5000 } else { 0 };
                Bytes::from((0..len).map(|k| (k as u32 ^ i) as u8).collect::<Vec<u8>>())
            })
            .collect()
    }

    #[test]
    fn records_cross_in_order_without_loss() {
        let rs = records();
        let (got, stats) = exchange(&rs, 0.0, 1);
        assert_eq!(got, rs);
        assert_eq!(stats.retransmits, 0);
    }

    #[test]
    fn records_cross_exactly_once_with_loss() {
        let rs = records();
        for seed in 1..20 {
            let (got, stats) = exchange(&rs, 0.05, seed);
            assert_eq!(got, rs, "seed {seed}");
            assert!(stats.retransmits > 0, "seed {seed}: losses were repaired");
        }
        let (got, _) = exchange(&rs, 0.3, 99);
        assert_eq!(got, rs);
    }

    #[test]
    fn protocol_violations_are_errors() {
        let mut b = Link::new(100, 16, 1000);
        let mut got = Vec::new();
        assert!(b.on_data(1, 0, 11, b"x", &mut got).is_err(), "more fragments than a record may have");
        let mut b = Link::new(100, 16, 1000);
        b.on_data(1, 0, 3, b"x", &mut got).unwrap();
        assert!(b.on_data(2, 2, 3, b"x", &mut got).is_err(), "fragment skipped");
        let mut a = Link::new(100, 16, 1000);
        assert!(a.on_ack(5, 0).is_err());
        // Duplicates and far-away frames are dropped, not errors.
        let mut b = Link::new(100, 4, 1000);
        b.on_data(1, 0, 1, b"x", &mut got).unwrap();
        b.on_data(1, 0, 1, b"x", &mut got).unwrap();
        b.on_data(100, 0, 1, b"x", &mut got).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!((b.stats.duplicates, b.stats.beyond_window), (1, 1));
    }
}
