//! A conformance suite every [`Transport`] backend runs (test support).
//!
//! A backend's test hands a factory to [`run_all`] (or to the individual checks): given
//! replica ids, the factory opens one endpoint per id, **in that order**, each listing
//! all the others as peers, with no permission granted yet. The links may still be
//! coming up when it returns: the suite retries `LinkDown` and `Backpressure` while
//! polling every endpoint, so a backend that handshakes asynchronously needs nothing
//! special. Each check opens fresh endpoints and drops them at its end.
//!
//! The suite drives every endpoint from the calling thread (polling each in turn with a
//! short timeout); every wait is bounded by [`TIMEOUT`] and fails with a message saying
//! which endpoint waited for what.
//!
//! ```
//! use transport::conformance;
//! use transport::mem::MemNetwork;
//! use transport::Transport;
//!
//! conformance::run_all(|ids| {
//!     MemNetwork::new()
//!         .cluster(ids)
//!         .into_iter()
//!         .map(|t| Box::new(t) as Box<dyn Transport>)
//!         .collect()
//! });
//! ```

use crate::{AccessError, Event, PeerId, SendError, Token, Transport};
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// The longest any single wait of the suite lasts before it fails.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// How long the suite watches for something that must *not* happen.
pub const QUIET: Duration = Duration::from_millis(200);

/// Opens one connected endpoint per id, in the order given.
pub type Factory<'a> = &'a mut dyn FnMut(&[PeerId]) -> Vec<Box<dyn Transport>>;

type Check = fn(Factory<'_>);

/// An agent's answer: bytes, or a denial's detail.
type Answer = Result<Vec<u8>, Vec<u8>>;

/// Runs every check of the suite with endpoints from `make`.
pub fn run_all<F>(mut make: F)
where
    F: FnMut(&[PeerId]) -> Vec<Box<dyn Transport>>,
{
    let checks: &[(&str, Check)] = &[
        ("messages_in_order_and_intact", messages_in_order_and_intact),
        ("too_large_is_refused", too_large_is_refused),
        ("unknown_peer_is_refused", unknown_peer_is_refused),
        ("write_round_trip", write_round_trip),
        ("read_round_trip", read_round_trip),
        ("write_from_non_holder_is_denied", write_from_non_holder_is_denied),
        ("grant_moves_permission", grant_moves_permission),
        ("revoke_denies_later_writes", revoke_denies_later_writes),
        ("every_access_completes_once", |m| every_access_completes_once(m, 10_000)),
        ("waker_interrupts_poll", waker_interrupts_poll),
    ];
    for (name, check) in checks {
        let started = Instant::now();
        check(&mut make);
        eprintln!("transport conformance: {name} ok ({:?})", started.elapsed());
    }
}

/// The endpoints under test and what they received that a check has not taken yet.
pub struct Net {
    ids: Vec<PeerId>,
    eps: Vec<Box<dyn Transport>>,
    inbox: Vec<VecDeque<Event>>,
    scratch: Vec<Event>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net").field("ids", &self.ids).finish_non_exhaustive()
    }
}

impl Net {
    /// Opens endpoints `ids` with `make`, checks their identities, and waits until every
    /// link carries a message both ways.
    pub fn open(make: Factory<'_>, ids: &[PeerId]) -> Net {
        let eps = make(ids);
        assert_eq!(eps.len(), ids.len(), "the factory returned {} endpoints for ids {ids:?}", eps.len());
        for (ep, &id) in eps.iter().zip(ids) {
            assert_eq!(ep.local(), id, "the factory's endpoints must come in the order of the ids");
            let mut peers = ep.peers();
            peers.sort_unstable();
            let mut want: Vec<PeerId> = ids.iter().copied().filter(|&p| p != id).collect();
            want.sort_unstable();
            assert_eq!(peers, want, "endpoint {id} must list every other id as a peer");
        }
        let mut net =
            Net { ids: ids.to_vec(), inbox: ids.iter().map(|_| VecDeque::new()).collect(), eps, scratch: Vec::new() };
        for &a in ids {
            for &b in ids {
                if a != b {
                    net.send(a, b, b"conformance: hello");
                }
            }
        }
        for &b in ids {
            for &a in ids {
                if a != b {
                    net.expect_message(b, a, b"conformance: hello");
                }
            }
        }
        net
    }

    fn idx(&self, id: PeerId) -> usize {
        self.ids.iter().position(|&x| x == id).unwrap_or_else(|| panic!("no endpoint {id} in {:?}", self.ids))
    }

    /// The endpoint `id`.
    pub fn ep(&mut self, id: PeerId) -> &mut dyn Transport {
        let i = self.idx(id);
        &mut *self.eps[i]
    }

    /// Polls every endpoint once (1 ms each at most), keeping what they report except
    /// link events (`PeerUp`/`PeerDown`), which are discarded.
    pub fn pump(&mut self) {
        for i in 0..self.eps.len() {
            self.scratch.clear();
            let id = self.ids[i];
            self.eps[i]
                .poll(&mut self.scratch, Some(Duration::from_millis(1)))
                .unwrap_or_else(|e| panic!("poll of endpoint {id} failed: {e}"));
            for e in self.scratch.drain(..) {
                if !matches!(e, Event::PeerUp { .. } | Event::PeerDown { .. }) {
                    self.inbox[i].push_back(e);
                }
            }
        }
    }

    /// Takes the first event at `id` matching `pred`, pumping until one comes.
    pub fn take(&mut self, id: PeerId, what: &str, mut pred: impl FnMut(&Event) -> bool) -> Event {
        let i = self.idx(id);
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(pos) = self.inbox[i].iter().position(&mut pred) {
                return self.inbox[i].remove(pos).expect("position is valid");
            }
            assert!(
                Instant::now() < deadline,
                "endpoint {id} waited {TIMEOUT:?} for {what}; it has {:?}",
                self.inbox[i]
            );
            self.pump();
        }
    }

    /// Pumps for [`QUIET`] and fails if an event at `id` matches `pred`.
    pub fn expect_none(&mut self, id: PeerId, what: &str, mut pred: impl FnMut(&Event) -> bool) {
        let i = self.idx(id);
        let until = Instant::now() + QUIET;
        while Instant::now() < until {
            self.pump();
        }
        if let Some(e) = self.inbox[i].iter().find(|e| pred(e)) {
            panic!("endpoint {id} must not see {what}, but got {e:?}");
        }
    }

    /// Runs `op` on endpoint `from`, retrying `LinkDown` and `Backpressure` while
    /// pumping; fails on any other error.
    pub fn retry<R>(
        &mut self,
        from: PeerId,
        what: &str,
        mut op: impl FnMut(&mut dyn Transport) -> Result<R, SendError>,
    ) -> R {
        let i = self.idx(from);
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match op(&mut *self.eps[i]) {
                Ok(r) => return r,
                Err(SendError::LinkDown(_) | SendError::Backpressure(_)) if Instant::now() < deadline => self.pump(),
                Err(e) => panic!("endpoint {from}: {what} failed: {e}"),
            }
        }
    }

    /// Sends `payload` from `from` to `to` (retrying as [`Net::retry`] does).
    pub fn send(&mut self, from: PeerId, to: PeerId, payload: &[u8]) {
        self.retry(from, &format!("send to {to}"), |t| t.send(to, payload))
    }

    /// Issues a write from `from` to `to`.
    pub fn write(&mut self, from: PeerId, to: PeerId, offset: u64, data: &[u8]) -> Token {
        self.retry(from, &format!("write to {to}"), |t| t.write(to, offset, data))
    }

    /// Issues a read by `from` of `to`'s region.
    pub fn read(&mut self, from: PeerId, to: PeerId, offset: u64, len: u32) -> Token {
        self.retry(from, &format!("read of {to}"), |t| t.read(to, offset, len))
    }

    /// Waits for the message `payload` from `from` at `at`; fails if a different
    /// message from `from` comes first.
    pub fn expect_message(&mut self, at: PeerId, from: PeerId, payload: &[u8]) {
        let e = self.take(
            at,
            &format!("a message from {from}"),
            |e| matches!(e, Event::Message { from: f, .. } if *f == from),
        );
        let Event::Message { payload: got, .. } = e else { unreachable!() };
        assert!(
            got == payload,
            "endpoint {at}: the next message from {from} has {} bytes {:?}..., expected {} bytes {:?}...",
            got.len(),
            &got[..got.len().min(16)],
            payload.len(),
            &payload[..payload.len().min(16)]
        );
    }

    /// Waits for the write arrival `token` from `from` at `at`; returns (offset, data).
    pub fn expect_write_arrived(&mut self, at: PeerId, from: PeerId, token: Token) -> (u64, Bytes) {
        let e = self.take(
            at,
            &format!("WriteArrived {token} from {from}"),
            |e| matches!(e, Event::WriteArrived { from: f, token: t, .. } if *f == from && *t == token),
        );
        match e {
            Event::WriteArrived { offset, data, .. } => (offset, data),
            _ => unreachable!(),
        }
    }

    /// Waits for the completion of write `token` issued by `at` to `to`.
    pub fn expect_write_done(&mut self, at: PeerId, to: PeerId, token: Token) -> Result<Bytes, AccessError> {
        let e = self.take(
            at,
            &format!("WriteDone {token} from {to}"),
            |e| matches!(e, Event::WriteDone { token: t, .. } if *t == token),
        );
        match e {
            Event::WriteDone { to: got, result, .. } => {
                assert_eq!(got, to, "endpoint {at}: WriteDone {token} names the wrong target");
                result
            }
            _ => unreachable!(),
        }
    }

    /// Waits for the completion of read `token` issued by `at` of `of`.
    pub fn expect_read_done(&mut self, at: PeerId, of: PeerId, token: Token) -> Result<Bytes, AccessError> {
        let e = self.take(
            at,
            &format!("ReadDone {token} from {of}"),
            |e| matches!(e, Event::ReadDone { token: t, .. } if *t == token),
        );
        match e {
            Event::ReadDone { from, result, .. } => {
                assert_eq!(from, of, "endpoint {at}: ReadDone {token} names the wrong target");
                result
            }
            _ => unreachable!(),
        }
    }
}

/// A recognizable payload of `len` bytes.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn max_payload(net: &mut Net, id: PeerId) -> usize {
    net.ep(id).max_payload()
}

/// Messages arrive intact and in order per link, including an empty one and one of
/// exactly `max_payload` bytes, with two senders interleaving to one receiver.
pub fn messages_in_order_and_intact(make: Factory<'_>) {
    let mut net = Net::open(make, &[1, 2, 3]);
    let max = max_payload(&mut net, 1).min(max_payload(&mut net, 3));
    let mut sent: HashMap<PeerId, Vec<Vec<u8>>> = HashMap::new();
    for i in 0..300u64 {
        for from in [1, 3] {
            let len = match i {
                0 => 0,
                1 => max,
                _ => ((i * 37 + from * 11) % 2048) as usize,
            };
            let p = pattern(i * 10 + from, len);
            net.send(from, 2, &p);
            sent.entry(from).or_default().push(p);
        }
    }
    for from in [1, 3] {
        for (i, p) in sent[&from].iter().enumerate() {
            let e = net.take(
                2,
                &format!("message #{i} from {from}"),
                |e| matches!(e, Event::Message { from: f, .. } if *f == from),
            );
            let Event::Message { payload, .. } = e else { unreachable!() };
            assert!(
                payload == p[..],
                "message #{i} from {from} to 2 arrived as {} bytes, sent {} bytes (reordered or corrupted)",
                payload.len(),
                p.len()
            );
        }
    }
    net.expect_none(2, "a message beyond those sent (a duplicate)", |e| matches!(e, Event::Message { .. }));
}

/// `send` and `write` beyond `max_payload` fail with `TooLarge` and leave the link usable.
pub fn too_large_is_refused(make: Factory<'_>) {
    let mut net = Net::open(make, &[1, 2]);
    let max = max_payload(&mut net, 1);
    let big = vec![7u8; max + 1];
    let want = SendError::TooLarge { size: max + 1, limit: max };
    assert_eq!(net.ep(1).send(2, &big), Err(want.clone()), "send of max_payload + 1 bytes");
    assert_eq!(net.ep(1).write(2, 0, &big).map(|_| ()), Err(want), "write of max_payload + 1 bytes");
    net.send(1, 2, b"after");
    net.expect_message(2, 1, b"after");
}

/// Every operation naming a peer outside the configuration fails with `UnknownPeer`.
pub fn unknown_peer_is_refused(make: Factory<'_>) {
    let mut net = Net::open(make, &[1, 2]);
    let t = net.ep(1);
    assert_eq!(t.send(999, b"x"), Err(SendError::UnknownPeer(999)), "send to 999");
    assert_eq!(t.write(999, 0, b"x").map(|_| ()), Err(SendError::UnknownPeer(999)), "write to 999");
    assert_eq!(t.read(999, 0, 1).map(|_| ()), Err(SendError::UnknownPeer(999)), "read of 999");
}

/// A write from the holder reaches the target's owner with its offset and bytes; the
/// owner's answer comes back as the writer's `WriteDone` (ack bytes, or a denial with
/// its detail); empty and `max_payload`-sized writes and acks work.
pub fn write_round_trip(make: Factory<'_>) {
    let mut net = Net::open(make, &[1, 2]);
    net.ep(2).grant(1);
    assert_eq!(net.ep(2).permission_holder(), Some(1), "holder after grant(1)");
    let max = max_payload(&mut net, 1).min(max_payload(&mut net, 2));
    let cases: Vec<(u64, Vec<u8>, Answer)> = vec![
        (4096, pattern(1, 1000), Ok(b"ack-1".to_vec())),
        (0, Vec::new(), Ok(Vec::new())),
        (u64::MAX - 1, pattern(2, max), Ok(pattern(3, max))),
        (8192, pattern(4, 10), Err(b"promised ballot 7".to_vec())),
    ];
    for (offset, data, answer) in cases {
        let token = net.write(1, 2, offset, &data);
        let (got_off, got_data) = net.expect_write_arrived(2, 1, token);
        assert_eq!(got_off, offset, "WriteArrived {token}: offset");
        assert!(got_data == data, "WriteArrived {token}: data differs ({} bytes sent)", data.len());
        let r = answer.as_deref().map_err(|e| e.as_slice());
        net.retry(2, "complete_write", |t| t.complete_write(1, token, r));
        let done = net.expect_write_done(1, 2, token);
        match (&answer, &done) {
            (Ok(a), Ok(b)) => assert!(a[..] == b[..], "WriteDone {token}: ack bytes differ"),
            (Err(a), Err(AccessError::Denied { detail })) => {
                assert!(a[..] == detail[..], "WriteDone {token}: denial detail differs")
            }
            _ => panic!("WriteDone {token}: agent answered {answer:?}, writer got {done:?}"),
        }
    }
    net.expect_none(1, "a second completion", |e| matches!(e, Event::WriteDone { .. }));
}

/// A read (no permission needed) reaches the target's owner; its answer comes back as
/// the reader's `ReadDone`, also when short or a denial.
pub fn read_round_trip(make: Factory<'_>) {
    let mut net = Net::open(make, &[1, 2]);
    let max = max_payload(&mut net, 2);
    let cases: Vec<(u64, u32, Answer)> = vec![
        (512, 100, Ok(pattern(5, 100))),
        (0, 64, Ok(pattern(6, 10))), // short answer
        (1 << 40, 0, Ok(Vec::new())),
        (7, max as u32, Ok(pattern(7, max))),
        (9, 10, Err(b"trimmed".to_vec())),
    ];
    for (offset, len, answer) in cases {
        let token = net.read(1, 2, offset, len);
        let e = net.take(
            2,
            &format!("ReadArrived {token} from 1"),
            |e| matches!(e, Event::ReadArrived { from: 1, token: t, .. } if *t == token),
        );
        let Event::ReadArrived { offset: o, len: l, .. } = e else { unreachable!() };
        assert_eq!((o, l), (offset, len), "ReadArrived {token}: offset and len");
        let r = answer.as_deref().map_err(|e| e.as_slice());
        net.retry(2, "complete_read", |t| t.complete_read(1, token, r));
        let done = net.expect_read_done(1, 2, token);
        match (&answer, &done) {
            (Ok(a), Ok(b)) => assert!(a[..] == b[..], "ReadDone {token}: bytes differ"),
            (Err(a), Err(AccessError::Denied { detail })) => {
                assert!(a[..] == detail[..], "ReadDone {token}: denial detail differs")
            }
            _ => panic!("ReadDone {token}: agent answered {answer:?}, reader got {done:?}"),
        }
    }
}

fn expect_denied(net: &mut Net, writer: PeerId, target: PeerId, token: Token) {
    let r = net.expect_write_done(writer, target, token);
    assert!(
        matches!(r, Err(AccessError::Denied { .. })),
        "write {token} from {writer} (not the holder of {target}) must be Denied, got {r:?}"
    );
}

/// A write from a peer without permission is denied by the transport; the target's owner
/// never sees it.
pub fn write_from_non_holder_is_denied(make: Factory<'_>) {
    let mut net = Net::open(make, &[1, 2, 3]);
    assert_eq!(net.ep(2).permission_holder(), None, "a fresh endpoint has no holder");
    let t1 = net.write(1, 2, 0, b"no permission at all");
    expect_denied(&mut net, 1, 2, t1);
    net.ep(2).grant(3);
    let t2 = net.write(1, 2, 0, b"someone else holds it");
    expect_denied(&mut net, 1, 2, t2);
    net.expect_none(2, "a WriteArrived from the non-holder 1", |e| matches!(e, Event::WriteArrived { from: 1, .. }));
}

/// `grant` moves permission: the old holder's later writes are denied, the new one's
/// arrive.
pub fn grant_moves_permission(make: Factory<'_>) {
    let mut net = Net::open(make, &[1, 2, 3]);
    net.ep(3).grant(1);
    let t = net.write(1, 3, 0, b"from 1");
    net.expect_write_arrived(3, 1, t);
    net.retry(3, "complete_write", |x| x.complete_write(1, t, Ok(b"ok")));
    assert_eq!(net.expect_write_done(1, 3, t), Ok(Bytes::from_static(b"ok")));

    net.ep(3).grant(2);
    assert_eq!(net.ep(3).permission_holder(), Some(2), "holder after grant(2)");
    let old = net.write(1, 3, 64, b"from the old holder");
    expect_denied(&mut net, 1, 3, old);
    let new = net.write(2, 3, 64, b"from the new holder");
    let (off, data) = net.expect_write_arrived(3, 2, new);
    assert_eq!((off, &data[..]), (64, &b"from the new holder"[..]));
    net.retry(3, "complete_write", |x| x.complete_write(2, new, Ok(b"")));
    assert_eq!(net.expect_write_done(2, 3, new), Ok(Bytes::new()));
    net.expect_none(3, "a WriteArrived from the old holder 1", |e| matches!(e, Event::WriteArrived { from: 1, .. }));
}

/// `revoke` of a non-holder changes nothing; `revoke` of the holder leaves none, and its
/// later writes are denied.
pub fn revoke_denies_later_writes(make: Factory<'_>) {
    let mut net = Net::open(make, &[1, 2, 3]);
    net.ep(2).grant(1);
    net.ep(2).revoke(3);
    assert_eq!(net.ep(2).permission_holder(), Some(1), "revoke(3) must not take 1's permission");
    net.ep(2).revoke(1);
    assert_eq!(net.ep(2).permission_holder(), None, "holder after revoke(1)");
    let t = net.write(1, 2, 0, b"revoked");
    expect_denied(&mut net, 1, 2, t);
    net.expect_none(2, "a WriteArrived after revoke", |e| matches!(e, Event::WriteArrived { .. }));
}

/// `n` accesses in flight at once (writes from the holder and from a non-holder,
/// reads, some answered with a denial): each completes exactly once, with its own answer.
pub fn every_access_completes_once(make: Factory<'_>, n: usize) {
    let mut net = Net::open(make, &[1, 2, 3]);
    net.ep(3).grant(1);
    // What each access must complete with: Ok(bytes) or Err(Some(detail)) for an agent
    // denial, Err(None) for a transport denial (any detail).
    type Expect = Result<Vec<u8>, Option<Vec<u8>>>;
    let mut expected: HashMap<(PeerId, bool, Token), Expect> = HashMap::new();
    let mut done: HashMap<(PeerId, bool, Token), usize> = HashMap::new();
    let deadline = Instant::now() + TIMEOUT.max(Duration::from_secs(60));
    let mut issued = 0usize;
    let answer_of = |offset: u64| -> Result<Vec<u8>, Vec<u8>> {
        // One in seven is denied by the agent.
        match offset % 7 {
            0 => Err(offset.to_le_bytes().to_vec()),
            _ => Ok(offset.to_be_bytes().to_vec()),
        }
    };
    while done.len() < n || issued < n {
        assert!(
            Instant::now() < deadline,
            "{} of {n} accesses completed after {:?} ({issued} issued)",
            done.len(),
            deadline.elapsed()
        );
        // Issue a batch, stopping at backpressure.
        let mut batch = 0;
        while issued < n && batch < 64 {
            let from = if issued % 5 == 4 { 2 } else { 1 };
            let is_read = issued % 3 == 2;
            let offset = issued as u64;
            let r = if is_read {
                net.ep(from).read(3, offset, 8)
            } else {
                net.ep(from).write(3, offset, &offset.to_le_bytes())
            };
            match r {
                Ok(token) => {
                    let want = if !is_read && from == 2 { Err(None) } else { answer_of(offset).map_err(Some) };
                    let key = (from, is_read, token);
                    assert!(expected.insert(key, want).is_none(), "endpoint {from} returned token {token} twice");
                    issued += 1;
                    batch += 1;
                }
                Err(SendError::Backpressure(_) | SendError::LinkDown(_)) => break,
                Err(e) => panic!("access #{issued} from {from}: {e}"),
            }
        }
        net.pump();
        // The agent answers every arrival.
        let arrivals: Vec<Event> = net.inbox[2].drain(..).collect();
        for e in arrivals {
            let (from, token, offset, is_read) = match e {
                Event::WriteArrived { from, token, offset, data } => {
                    assert_eq!(from, 1, "a write from non-holder {from} reached the agent");
                    assert_eq!(data[..], offset.to_le_bytes(), "write {token}: data");
                    (from, token, offset, false)
                }
                Event::ReadArrived { from, token, offset, .. } => (from, token, offset, true),
                other => panic!("endpoint 3 got unexpected {other:?}"),
            };
            let a = answer_of(offset);
            let r = a.as_deref().map_err(|e| e.as_slice());
            net.retry(3, "answer", |t| {
                if is_read {
                    t.complete_read(from, token, r)
                } else {
                    t.complete_write(from, token, r)
                }
            });
        }
        for from in [1, 2] {
            let i = net.idx(from);
            let events: Vec<Event> = net.inbox[i].drain(..).collect();
            for e in events {
                let (key, result) = match e {
                    Event::WriteDone { token, result, to } => {
                        assert_eq!(to, 3);
                        ((from, false, token), result)
                    }
                    Event::ReadDone { token, result, from: f } => {
                        assert_eq!(f, 3);
                        ((from, true, token), result)
                    }
                    other => panic!("endpoint {from} got unexpected {other:?}"),
                };
                let want = expected
                    .get(&key)
                    .unwrap_or_else(|| panic!("endpoint {from}: completion {key:?} for a token never issued"));
                let count = done.entry(key).or_default();
                *count += 1;
                assert_eq!(*count, 1, "endpoint {from}: access {key:?} completed twice");
                match (want, &result) {
                    (Ok(a), Ok(b)) => assert!(a[..] == b[..], "access {key:?}: answer bytes"),
                    (Err(Some(a)), Err(AccessError::Denied { detail })) => {
                        assert!(a[..] == detail[..], "access {key:?}: denial detail")
                    }
                    (Err(None), Err(AccessError::Denied { .. })) => {}
                    _ => panic!("access {key:?}: expected {want:?}, got {result:?}"),
                }
            }
        }
    }
    for from in [1, 2] {
        net.expect_none(from, "a completion after all completed", |e| {
            matches!(e, Event::WriteDone { .. } | Event::ReadDone { .. })
        });
    }
}

/// `poll` honours its timeout, and `waker()` interrupts a blocked `poll` from another
/// thread (and a wake before `poll` makes the next one return).
pub fn waker_interrupts_poll(make: Factory<'_>) {
    let mut net = Net::open(make, &[1, 2]);
    for _ in 0..3 {
        net.pump(); // settle
    }
    let bound = Duration::from_secs(2);
    let mut events = Vec::new();
    let t = Instant::now();
    net.ep(1).poll(&mut events, Some(Duration::from_millis(50))).expect("poll");
    assert!(t.elapsed() < bound, "poll(50 ms) took {:?}", t.elapsed());

    let w = net.ep(1).waker();
    let waker = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        w.wake();
    });
    let t = Instant::now();
    net.ep(1).poll(&mut events, Some(Duration::from_secs(30))).expect("poll");
    let took = t.elapsed();
    waker.join().expect("waker thread");
    assert!(took < bound, "poll(30 s) woken after 100 ms returned only after {took:?}");

    net.ep(1).waker().wake();
    let t = Instant::now();
    net.ep(1).poll(&mut events, Some(Duration::from_secs(30))).expect("poll");
    assert!(t.elapsed() < bound, "a wake before poll must make it return; it took {:?}", t.elapsed());
}
