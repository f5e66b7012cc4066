//! The RDMA transport on a real (or soft-RoCE) device: one-sided writes and reads,
//! permission switching through queue-pair access flags, queue-pair errors and
//! reconnection, a killed peer, and the parts of the shared conformance suite that apply
//! to a transport without a receiver-side agent.
//!
//! They need an RDMA device with an active port (the soft-RoCE VM of `hw-setup/rxe-vm.sh`
//! provides `rxe0`; `RXE_DEV`, `RXE_GID_INDEX` and `RXE_IP` pick the device, GID index and
//! side-channel address). Without one each test prints why and passes, unless
//! `REPLOG_REQUIRE_ALL=1`, where it fails.
#![cfg(feature = "rdma")]

use bytes::Bytes;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use transport::conformance;
use transport::rdma::{RdmaConfig, RdmaTransport};
use transport::{AccessError, Event, PeerId, SendError, Token, Transport};

const WAIT: Duration = Duration::from_secs(60);

/// Whether an RDMA device is usable; fails under REPLOG_REQUIRE_ALL=1 when not.
use transport::rdma::testing::{device_or_skip as rdma_available, side_channel_ip as ip};

fn base_config(id: PeerId, listen: SocketAddr, peers: BTreeMap<PeerId, SocketAddr>) -> RdmaConfig {
    transport::rdma::testing::config(77, id, listen, peers)
}

/// Listeners for `ids` on ephemeral ports, and their addresses.
fn listeners(ids: &[PeerId]) -> (Vec<TcpListener>, BTreeMap<PeerId, SocketAddr>) {
    let ls: Vec<TcpListener> = ids.iter().map(|_| TcpListener::bind((ip(), 0)).expect("bind side channel")).collect();
    let addrs = ids.iter().zip(&ls).map(|(&id, l)| (id, l.local_addr().expect("addr"))).collect();
    (ls, addrs)
}

fn open_cluster(ids: &[PeerId], tweak: impl Fn(&mut RdmaConfig)) -> (Vec<RdmaTransport>, BTreeMap<PeerId, SocketAddr>) {
    transport::rdma::testing::open_cluster(77, ids, tweak)
}

/// Endpoints driven from the test thread, with what they reported.
struct Net {
    ids: Vec<PeerId>,
    eps: Vec<Option<RdmaTransport>>,
    inbox: Vec<VecDeque<Event>>,
}

impl Net {
    fn new(ids: &[PeerId], eps: Vec<RdmaTransport>) -> Net {
        Net {
            ids: ids.to_vec(),
            inbox: ids.iter().map(|_| VecDeque::new()).collect(),
            eps: eps.into_iter().map(Some).collect(),
        }
    }

    fn open(ids: &[PeerId]) -> Net {
        let (eps, _) = open_cluster(ids, |_| {});
        let mut net = Net::new(ids, eps);
        net.wait_all_up();
        net
    }

    fn i(&self, id: PeerId) -> usize {
        self.ids.iter().position(|&x| x == id).expect("known id")
    }

    fn ep(&mut self, id: PeerId) -> &mut RdmaTransport {
        let i = self.i(id);
        self.eps[i].as_mut().expect("endpoint is open")
    }

    fn pump(&mut self) {
        for (i, ep) in self.eps.iter_mut().enumerate() {
            if let Some(ep) = ep {
                let mut ev = Vec::new();
                ep.poll(&mut ev, Some(Duration::from_millis(1))).expect("poll");
                self.inbox[i].extend(ev);
            }
        }
    }

    fn take(&mut self, at: PeerId, what: &str, mut pred: impl FnMut(&Event) -> bool) -> Event {
        let i = self.i(at);
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(pos) = self.inbox[i].iter().position(&mut pred) {
                return self.inbox[i].remove(pos).expect("valid position");
            }
            assert!(Instant::now() < deadline, "endpoint {at} waited {WAIT:?} for {what}; it has {:?}", self.inbox[i]);
            self.pump();
        }
    }

    /// Waits until every endpoint reported PeerUp for every other.
    fn wait_all_up(&mut self) {
        let ids = self.ids.clone();
        for &a in &ids {
            for &b in &ids {
                if a != b && self.eps[self.i(a)].is_some() && self.eps[self.i(b)].is_some() {
                    self.take(a, &format!("PeerUp {b}"), |e| matches!(e, Event::PeerUp { peer } if *peer == b));
                }
            }
        }
    }

    /// Runs `op`, retrying LinkDown and Backpressure while pumping.
    fn retry<R>(
        &mut self,
        at: PeerId,
        what: &str,
        mut op: impl FnMut(&mut RdmaTransport) -> Result<R, SendError>,
    ) -> R {
        let deadline = Instant::now() + WAIT;
        loop {
            match op(self.ep(at)) {
                Ok(r) => return r,
                Err(SendError::LinkDown(_) | SendError::Backpressure(_)) if Instant::now() < deadline => self.pump(),
                Err(e) => panic!("endpoint {at}: {what}: {e}"),
            }
        }
    }

    fn write(&mut self, from: PeerId, to: PeerId, offset: u64, data: &[u8]) -> Token {
        self.retry(from, "write", |t| t.write(to, offset, data))
    }

    fn write_done(&mut self, at: PeerId, token: Token) -> Result<Bytes, AccessError> {
        match self.take(
            at,
            &format!("WriteDone {token}"),
            |e| matches!(e, Event::WriteDone { token: t, .. } if *t == token),
        ) {
            Event::WriteDone { result, .. } => result,
            _ => unreachable!(),
        }
    }

    fn read_done(&mut self, at: PeerId, token: Token) -> Result<Bytes, AccessError> {
        match self.take(
            at,
            &format!("ReadDone {token}"),
            |e| matches!(e, Event::ReadDone { token: t, .. } if *t == token),
        ) {
            Event::ReadDone { result, .. } => result,
            _ => unreachable!(),
        }
    }

    fn region(&mut self, id: PeerId, offset: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.ep(id).read_region(offset, &mut b).expect("read own region");
        b
    }

    /// Writes until one succeeds (a permission change renews the queue pair; writes in
    /// the renewal window fail with LinkDown or LinkFailed).
    fn write_until_ok(&mut self, from: PeerId, to: PeerId, offset: u64, data: &[u8]) {
        let deadline = Instant::now() + WAIT;
        loop {
            let t = self.write(from, to, offset, data);
            match self.write_done(from, t) {
                Ok(_) => return,
                Err(AccessError::LinkFailed(_)) if Instant::now() < deadline => self.pump(),
                Err(e) => panic!("write {from} -> {to} after grant: {e:?}"),
            }
        }
    }
}

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

fn assert_denied(r: Result<Bytes, AccessError>, what: &str) {
    assert!(matches!(r, Err(AccessError::Denied { .. })), "{what}: expected Denied, got {r:?}");
}

#[test]
fn write_lands_in_the_region_and_read_returns_it() {
    if !rdma_available("write_lands_in_the_region_and_read_returns_it") {
        return;
    }
    let mut net = Net::open(&[1, 2]);
    net.ep(2).grant(1);
    let cases: Vec<(u64, Vec<u8>)> =
        vec![(4096, pattern(1, 1000)), (64, pattern(2, 16)), (8192, pattern(3, 256 << 10)), (100, Vec::new())];
    for (off, data) in &cases {
        let t = net.write(1, 2, *off, data);
        assert_eq!(net.write_done(1, t), Ok(Bytes::new()), "write of {} bytes at {off}", data.len());
        assert!(net.region(2, *off, data.len()) == *data, "region of 2 at {off} holds what 1 wrote");
    }
    // The owner writes locally; the peer reads it back (no permission needed).
    net.ep(2).write_region(300_000, b"owner's own bytes").expect("local write");
    let t = net.retry(1, "read", |e| e.read(2, 300_000, 17));
    assert_eq!(net.read_done(1, t).expect("read"), Bytes::from_static(b"owner's own bytes"));
    let t = net.retry(1, "read", |e| e.read(2, 8192, 256 << 10));
    assert!(net.read_done(1, t).expect("large read") == cases[2].1, "a 256 KiB read returns what was written");
    // Outside the peer's region: refused locally, exactly once, link untouched.
    let t = net.retry(1, "read", |e| e.read(2, (1 << 20) - 4, 8));
    assert_denied(net.read_done(1, t), "read past the region's end");
    let t = net.write(1, 2, u64::MAX - 1, b"xx");
    assert_denied(net.write_done(1, t), "write at u64::MAX - 1");
    let t = net.write(1, 2, 0, b"still fine");
    assert_eq!(net.write_done(1, t), Ok(Bytes::new()));
    // Too large and unknown peers are refused at issue.
    let big = vec![0u8; (256 << 10) + 1];
    assert!(matches!(net.ep(1).write(2, 0, &big), Err(SendError::TooLarge { .. })));
    assert_eq!(net.ep(1).write(9, 0, b"x").map(|_| ()), Err(SendError::UnknownPeer(9)));
}

fn revoke_then_grant(by_reset: bool) {
    let (eps, _) = open_cluster(&[1, 2, 3], |c| c.permission_by_reset = by_reset);
    let mut net = Net::new(&[1, 2, 3], eps);
    net.wait_all_up();
    // No holder yet: denied, nothing lands.
    let t = net.write(1, 2, 0, b"no permission");
    assert_denied(net.write_done(1, t), "write without any grant");
    assert_eq!(net.region(2, 0, 13), vec![0u8; 13], "a denied write must not land");

    net.ep(2).grant(1);
    net.write_until_ok(1, 2, 0, b"granted");
    assert_eq!(net.region(2, 0, 7), b"granted");

    net.ep(2).revoke(1);
    assert_eq!(net.ep(2).permission_holder(), None);
    let deadline = Instant::now() + WAIT;
    loop {
        let t = net.write(1, 2, 64, b"after revoke");
        match net.write_done(1, t) {
            Err(AccessError::Denied { .. }) => break,
            // The reset path cuts the link first; the next write is the denied one.
            Err(AccessError::LinkFailed(_)) if by_reset && Instant::now() < deadline => continue,
            other => panic!("write after revoke must be Denied, got {other:?}"),
        }
    }
    assert_eq!(net.region(2, 64, 12), vec![0u8; 12], "a write after revoke must not land");

    // Grant to 3: 1 stays denied, 3 writes.
    net.ep(2).grant(3);
    net.write_until_ok(3, 2, 128, b"from 3");
    assert_eq!(net.region(2, 128, 6), b"from 3");
    let t = net.write(1, 2, 256, b"old holder");
    assert_denied(net.write_done(1, t), "write from 1 while 3 holds");

    // Grant back to 1: it writes again, 3 is denied.
    net.ep(2).grant(1);
    net.write_until_ok(1, 2, 512, b"granted again");
    assert_eq!(net.region(2, 512, 13), b"granted again");
    let deadline = Instant::now() + WAIT;
    loop {
        let t = net.write(3, 2, 1024, b"3 revoked");
        match net.write_done(3, t) {
            Err(AccessError::Denied { .. }) => break,
            Err(AccessError::LinkFailed(_)) if Instant::now() < deadline => continue,
            other => panic!("write from 3 after grant(1) must be Denied, got {other:?}"),
        }
    }
    assert_eq!(net.region(2, 1024, 9), vec![0u8; 9]);
    let resets = net.ep(2).permission_resets();
    if by_reset {
        assert!(resets >= 5, "every permission change cycles the queue pair when forced ({resets})");
    } else {
        assert_eq!(resets, 0, "ibv_modify_qp of the access flags must have worked in place");
    }
}

#[test]
fn revoke_denies_and_grant_restores_by_modifying_access_flags() {
    if !rdma_available("revoke_denies_and_grant_restores_by_modifying_access_flags") {
        return;
    }
    revoke_then_grant(false);
}

#[test]
fn revoke_denies_and_grant_restores_by_cycling_the_queue_pair() {
    if !rdma_available("revoke_denies_and_grant_restores_by_cycling_the_queue_pair") {
        return;
    }
    revoke_then_grant(true);
}

/// Slots of the revocation stress test: slot `i` of round `r` gets one write of
/// `min..=slot` bytes (a multiple of 8), a nonzero u64 unique to (r, i) repeated; the
/// rest of the slot stays zero.
#[derive(Clone, Copy, Debug)]
struct RevokeShape {
    slot: usize,
    slots: usize,
    min: usize,
}

/// 8..64-byte writes (one packet each, posted inline), 8192 of them per round.
const REVOKE_SMALL: RevokeShape = RevokeShape { slot: 64, slots: 8192, min: 8 };
/// 2..4 KiB writes (several packets each at soft-RoCE's 1024-byte path MTU), 192 per
/// round: a revocation can fall between the packets of one write.
const REVOKE_MULTI_PACKET: RevokeShape = RevokeShape { slot: 4096, slots: 192, min: 2048 };
const REVOKE_MAX_ROUNDS: u64 = 20;
/// Rounds that raced the revocation after which the test stops (if it got there).
const REVOKE_RACED_ENOUGH: u64 = 10;

fn revoke_slot_bytes(shape: RevokeShape, round: u64, slot: usize) -> Vec<u8> {
    let choices = (shape.slot - shape.min) / 8 + 1;
    let words = shape.min / 8 + (slot.wrapping_mul(7) + round as usize) % choices;
    let mut x = (round << 32 | slot as u64).wrapping_add(0x9E37_79B9_7F4A_7C15).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 31;
    let v = x | 1;
    (0..words).flat_map(|_| v.to_le_bytes()).collect()
}

/// What the follower's memory shows of slot `slot`: nothing, exactly the write, its
/// first `n` bytes only (a write refused after some of its packets landed), or anything
/// else (foreign bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotSeen {
    Empty,
    Landed,
    Prefix(usize),
    Other,
}

fn revoke_slot_seen(shape: RevokeShape, snap: &[u8], round: u64, slot: usize) -> SlotSeen {
    let Some(bytes) = snap.get(slot * shape.slot..(slot + 1) * shape.slot) else { return SlotSeen::Other };
    if bytes.iter().all(|&b| b == 0) {
        return SlotSeen::Empty;
    }
    let want = revoke_slot_bytes(shape, round, slot);
    let n = bytes.iter().zip(&want).take_while(|(a, b)| a == b).count();
    if bytes[n..].iter().any(|&b| b != 0) {
        SlotSeen::Other
    } else if n == want.len() {
        SlotSeen::Landed
    } else {
        SlotSeen::Prefix(n)
    }
}

/// How one write of the writer completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    Denied,
    LinkFailed,
}

/// Writes 2 -> 1 at `offset` until one completes Ok, pumping both (after a revocation
/// the writer's queue pair is renewed, and the follower takes part in that).
fn revoke_probe(writer: &mut RdmaTransport, follower: &mut RdmaTransport, offset: u64) {
    let deadline = Instant::now() + WAIT;
    let mut ev = Vec::new();
    let mut token = None;
    loop {
        assert!(Instant::now() < deadline, "the writer's probe write never completed Ok after the grant");
        if token.is_none() {
            match writer.write(1, offset, b"probe---") {
                Ok(t) => token = Some(t),
                Err(SendError::LinkDown(_) | SendError::Backpressure(_)) => {}
                Err(e) => panic!("probe write: {e}"),
            }
        }
        ev.clear();
        writer.poll(&mut ev, Some(Duration::from_millis(1))).expect("poll writer");
        for e in &ev {
            if let Event::WriteDone { token: t, result, .. } = e {
                if Some(*t) == token {
                    if result.is_ok() {
                        return;
                    }
                    token = None;
                }
            }
        }
        follower.poll(&mut ev, Some(Duration::ZERO)).expect("poll follower");
    }
}

/// Totals over the rounds of [`revoke_races_in_flight_writes`].
#[derive(Default, Debug)]
struct RevokeTally {
    rounds: u64,
    raced: u64,
    landed_before: u64,
    denied: u64,
    link_failed: u64,
    torn: u64,
    refused_posted_before: u64,
    landed_after: u64,
    slowest_revoke: Duration,
}

/// The writer (2) keeps up to `depth` distinct one-sided writes in flight, one per
/// slot, while the follower (1), once slot `k` landed, revokes its permission and at
/// once snapshots its whole region; every write then completes, and the follower
/// snapshots again. Nothing may land after the revocation returned: the snapshots are
/// equal, every write the writer saw Ok is in the first one, no Denied write is whole
/// in either (a write of several packets may be refused after its first ones landed:
/// counted, and by the equal snapshots that part landed before). Rounds repeat (fresh grant, cleared region, new patterns) until enough of
/// them raced (a write submitted before the revocation was refused or cut), and one
/// at least must have.
///
/// The writer runs on its own thread, so that it posts while the follower revokes.
fn revoke_races_in_flight_writes(by_reset: bool, shape: RevokeShape) -> RevokeTally {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (eps, _) = open_cluster(&[1, 2], |c| c.permission_by_reset = by_reset);
    let mut net = Net::new(&[1, 2], eps);
    net.wait_all_up();
    let mut follower = net.eps[0].take().expect("follower");
    let mut writer = net.eps[1].take().expect("writer");
    let probe_off = (follower.region_len() - 64) as u64;
    let area = shape.slots * shape.slot;
    assert!(area <= probe_off as usize, "the slots and the probe fit in the region");
    let seed = fresh_seed();
    let started = Instant::now();
    let mut tally = RevokeTally::default();
    for round in 0..REVOKE_MAX_ROUNDS {
        if tally.raced >= REVOKE_RACED_ENOUGH || started.elapsed() > Duration::from_secs(120) {
            break;
        }
        tally.rounds += 1;
        // No holder now (never granted, or revoked last round): clear, then grant.
        assert_eq!(follower.permission_holder(), None);
        follower.write_region(0, &vec![0u8; area]).expect("clear the slots");
        follower.grant(2);
        revoke_probe(&mut writer, &mut follower, probe_off);
        // Revoke once slot k landed: somewhere in the first half, different each round.
        let first = shape.slots / 16;
        let k =
            first + (seed.wrapping_add(round.wrapping_mul(0x9E37_79B9)) % (shape.slots / 2 - first) as u64) as usize;
        let issued = AtomicUsize::new(0);
        let (outcomes, snap1, snap_at, revoke_took, first_change) = std::thread::scope(|s| {
            let writer_thread = s.spawn(|| {
                let mut outcomes: Vec<Option<Outcome>> = vec![None; shape.slots];
                let mut tokens: HashMap<Token, usize> = HashMap::new();
                let mut next = 0usize;
                let mut posting = true;
                let mut ev = Vec::new();
                let deadline = Instant::now() + WAIT;
                loop {
                    assert!(
                        Instant::now() < deadline,
                        "writer: {} writes still in flight after {WAIT:?}",
                        tokens.len()
                    );
                    while posting && next < shape.slots {
                        let off = (next * shape.slot) as u64;
                        match writer.write(1, off, &revoke_slot_bytes(shape, round, next)) {
                            Ok(t) => {
                                tokens.insert(t, next);
                                next += 1;
                                issued.store(next, Ordering::SeqCst);
                            }
                            Err(SendError::Backpressure(_) | SendError::LinkDown(_)) => break,
                            Err(e) => panic!("writer: write of slot {next}: {e}"),
                        }
                    }
                    writer.send_queued();
                    ev.clear();
                    writer.poll(&mut ev, Some(Duration::from_millis(1))).expect("poll writer");
                    for e in &ev {
                        if let Event::WriteDone { token, result, .. } = e {
                            let Some(slot) = tokens.remove(token) else { continue };
                            let o = match result {
                                Ok(_) => Outcome::Ok,
                                Err(AccessError::Denied { .. }) => Outcome::Denied,
                                Err(AccessError::LinkFailed(_)) => Outcome::LinkFailed,
                            };
                            assert!(outcomes[slot].replace(o).is_none(), "slot {slot} completed twice");
                            if o != Outcome::Ok {
                                posting = false;
                            }
                        }
                    }
                    // All slots used: stop posting.
                    if next == shape.slots {
                        posting = false;
                    }
                    if !posting && tokens.is_empty() {
                        break;
                    }
                }
                outcomes
            });
            let deadline = Instant::now() + WAIT;
            let mut ev = Vec::new();
            // The last word of slot k's write: it landed whole (in-order placement).
            let off_k = (k * shape.slot + revoke_slot_bytes(shape, round, k).len() - 8) as u64;
            while follower.load_u64(off_k).expect("load slot k") == 0 {
                assert!(Instant::now() < deadline, "slot {k} never landed");
                assert!(!writer_thread.is_finished(), "the writer stopped before slot {k} landed");
                ev.clear();
                follower.poll(&mut ev, Some(Duration::ZERO)).expect("poll follower");
                std::thread::yield_now();
            }
            let snap_at = issued.load(Ordering::SeqCst);
            let t0 = Instant::now();
            follower.revoke(2);
            let revoke_took = t0.elapsed();
            let mut snap1 = vec![0u8; area];
            follower.read_region(0, &mut snap1).expect("snapshot right after revoke");
            let t1 = Instant::now();
            // Watch the region until the writer is done: when did it first change?
            let mut first_change: Option<(Duration, Vec<usize>)> = None;
            let mut again = vec![0u8; area];
            while !writer_thread.is_finished() {
                assert!(Instant::now() < deadline + WAIT, "the writer never finished");
                ev.clear();
                follower.poll(&mut ev, Some(Duration::from_millis(1))).expect("poll follower");
                if first_change.is_none() {
                    follower.read_region(0, &mut again).expect("watch the region");
                    if again != snap1 {
                        let slots = (0..shape.slots)
                            .filter(|&i| {
                                again[i * shape.slot..(i + 1) * shape.slot]
                                    != snap1[i * shape.slot..(i + 1) * shape.slot]
                            })
                            .collect();
                        first_change = Some((t1.elapsed(), slots));
                    }
                }
            }
            let outcomes = writer_thread.join().expect("writer thread");
            (outcomes, snap1, snap_at, revoke_took, first_change)
        });
        let mut snap2 = vec![0u8; area];
        follower.read_region(0, &mut snap2).expect("snapshot after every write completed");

        let mut landed = 0u64;
        let mut denied = 0u64;
        let mut failed = 0u64;
        let mut refused_before = 0u64;
        let mut torn = 0u64;
        let mut ok_missing = Vec::new();
        let mut refused_present = Vec::new();
        let mut other = Vec::new();
        let mut changed = Vec::new();
        for (slot, o) in outcomes.iter().enumerate() {
            let s1 = revoke_slot_seen(shape, &snap1, round, slot);
            let s2 = revoke_slot_seen(shape, &snap2, round, slot);
            if s1 == SlotSeen::Landed {
                landed += 1;
            }
            if s1 == SlotSeen::Other || s2 == SlotSeen::Other {
                other.push((slot, *o));
            }
            if s1 != s2 {
                changed.push((slot, *o, s1, s2));
            }
            match o {
                Some(Outcome::Ok) if s1 != SlotSeen::Landed => ok_missing.push(slot),
                Some(Outcome::Denied | Outcome::LinkFailed) => {
                    if *o == Some(Outcome::Denied) {
                        denied += 1;
                    } else {
                        failed += 1;
                    }
                    if slot < snap_at {
                        refused_before += 1;
                    }
                    // A refused write may have landed in part (the packets before the
                    // refused one), before the revocation (s1 == s2 is checked apart).
                    if let SlotSeen::Prefix(_) = s2 {
                        torn += 1;
                    }
                    if *o == Some(Outcome::Denied) && s2 == SlotSeen::Landed {
                        refused_present.push(slot);
                    }
                }
                _ => {}
            }
        }
        let issued_total = outcomes.iter().filter(|o| o.is_some()).count();
        eprintln!(
            "rdma revoke ({}, {}-byte slots) round {round}: slot {k}; {snap_at} writes submitted when revoke \
             was called, {issued_total} in all; revoke took {revoke_took:?}; {landed} landed before, {denied} \
             denied, {failed} cut (LinkFailed), {refused_before} of those submitted before the revocation, \
             {torn} of those landed in part; {} slots changed after it{}",
            if by_reset { "reset" } else { "modify" },
            shape.slot,
            changed.len(),
            match &first_change {
                Some((after, slots)) =>
                    format!(" (first seen {after:?} after the snapshot, slots {:?})", &slots[..slots.len().min(16)]),
                None => String::new(),
            }
        );
        tally.landed_before += landed;
        tally.denied += denied;
        tally.link_failed += failed;
        tally.torn += torn;
        tally.refused_posted_before += refused_before;
        tally.landed_after += changed.len() as u64;
        tally.slowest_revoke = tally.slowest_revoke.max(revoke_took);
        // (1)-(2): nothing landed after revoke returned. If these fail on a device, the
        // Mu-style fence assumption does not hold there: do not weaken them.
        assert!(
            changed.is_empty(),
            "round {round}: {} slots changed after revoke returned (slot, outcome, first, second): {:?}",
            changed.len(),
            &changed[..changed.len().min(32)]
        );
        assert!(
            ok_missing.is_empty(),
            "round {round}: {} writes completed Ok but were not in the region right after revoke returned: {:?}",
            ok_missing.len(),
            &ok_missing[..ok_missing.len().min(32)]
        );
        assert!(refused_present.is_empty(), "round {round}: denied writes landed: {refused_present:?}");
        assert!(other.is_empty(), "round {round}: foreign bytes in slots: {:?}", &other[..other.len().min(32)]);
        if refused_before > 0 {
            tally.raced += 1;
        }
        assert_eq!(follower.permission_holder(), None);
    }
    eprintln!(
        "rdma (revoke): by {}, {}..{}-byte writes: {} rounds ({} raced), {} writes landed before the \
         revocation, {} refused ({} denied, {} cut, {} of them submitted before it, {} landed in part before \
         it), {} landed after; slowest revoke {:?}",
        if by_reset { "queue-pair reset" } else { "access-flag modify" },
        shape.min,
        shape.slot,
        tally.rounds,
        tally.raced,
        tally.landed_before,
        tally.denied + tally.link_failed,
        tally.denied,
        tally.link_failed,
        tally.refused_posted_before,
        tally.torn,
        tally.landed_after,
        tally.slowest_revoke
    );
    assert!(tally.raced > 0, "no round raced the revocation against writes in flight: {tally:?}");
    tally
}

/// `revoke` by `ibv_modify_qp` (dropping IBV_ACCESS_REMOTE_WRITE) fences the writer:
/// every write in flight either landed before it returned or is refused (Denied). (The
/// NIC refuses the first one; the access error moves both queue pairs to the error
/// state, and the transport reports the writes queued behind it Denied as well.)
#[test]
fn revoke_by_modifying_access_flags_fences_writes_in_flight() {
    if !rdma_available("revoke_by_modifying_access_flags_fences_writes_in_flight") {
        return;
    }
    let t = revoke_races_in_flight_writes(false, REVOKE_SMALL);
    assert!(t.denied > 0, "the modify path refuses at the NIC: some write must be Denied: {t:?}");
}

/// `revoke` by cycling the queue pair through reset fences the writer: every write in
/// flight either landed before it returned or is cut (LinkFailed) or refused.
#[test]
fn revoke_by_cycling_the_queue_pair_fences_writes_in_flight() {
    if !rdma_available("revoke_by_cycling_the_queue_pair_fences_writes_in_flight") {
        return;
    }
    revoke_races_in_flight_writes(true, REVOKE_SMALL);
}

/// As [`revoke_by_modifying_access_flags_fences_writes_in_flight`] with writes of
/// several packets each: the NIC checks the access flags on every packet, so a write
/// can be refused after its first packets landed (before the revocation: that part is
/// in the first snapshot), and nothing lands after.
#[test]
fn revoke_by_modifying_access_flags_fences_multi_packet_writes_in_flight() {
    if !rdma_available("revoke_by_modifying_access_flags_fences_multi_packet_writes_in_flight") {
        return;
    }
    let t = revoke_races_in_flight_writes(false, REVOKE_MULTI_PACKET);
    assert!(t.denied > 0, "the modify path refuses at the NIC: some write must be Denied: {t:?}");
}

/// As [`revoke_by_cycling_the_queue_pair_fences_writes_in_flight`] with writes of
/// several packets each.
#[test]
fn revoke_by_cycling_the_queue_pair_fences_multi_packet_writes_in_flight() {
    if !rdma_available("revoke_by_cycling_the_queue_pair_fences_multi_packet_writes_in_flight") {
        return;
    }
    revoke_races_in_flight_writes(true, REVOKE_MULTI_PACKET);
}

/// Accesses in flight when the queue pair breaks each complete exactly once (Ok or
/// LinkFailed); PeerDown then PeerUp are reported; the link works again.
#[test]
fn queue_pair_error_fails_in_flight_and_reconnects() {
    if !rdma_available("queue_pair_error_fails_in_flight_and_reconnects") {
        return;
    }
    let mut net = Net::open(&[1, 2]);
    net.ep(2).grant(1);
    net.write_until_ok(1, 2, 0, b"before");
    let mut tokens = Vec::new();
    for i in 0..100u64 {
        tokens.push(net.write(1, 2, i * 64, &pattern(i, 64)));
    }
    net.ep(1).break_link(2).expect("force the queue pair to ERR");
    let mut failed = 0;
    for &t in &tokens {
        match net.write_done(1, t) {
            Ok(_) => {}
            Err(AccessError::LinkFailed(_)) => failed += 1,
            Err(e) => panic!("write {t}: {e:?}"),
        }
    }
    net.take(1, "PeerDown 2", |e| matches!(e, Event::PeerDown { peer: 2, .. }));
    net.take(1, "PeerUp 2 again", |e| matches!(e, Event::PeerUp { peer: 2 }));
    eprintln!("queue pair error: {failed} of {} writes in flight failed", tokens.len());
    net.write_until_ok(1, 2, 4096, b"after reconnect");
    assert_eq!(net.region(2, 4096, 15), b"after reconnect");
    for _ in 0..50 {
        net.pump();
    }
    let i = net.i(1);
    assert!(
        !net.inbox[i].iter().any(|e| matches!(e, Event::WriteDone { .. })),
        "no access completes twice: {:?}",
        net.inbox[i]
    );
}

/// The target process goes away with writes in flight: they complete with LinkFailed,
/// PeerDown is reported; a new process on the same address is reconnected (PeerUp).
#[test]
fn killed_peer_fails_in_flight_and_a_restarted_one_reconnects() {
    if !rdma_available("killed_peer_fails_in_flight_and_a_restarted_one_reconnects") {
        return;
    }
    let (eps, addrs) = open_cluster(&[1, 2], |_| {});
    let mut net = Net::new(&[1, 2], eps);
    net.wait_all_up();
    net.ep(2).grant(1);
    net.write_until_ok(1, 2, 0, b"first life");
    let tokens: Vec<Token> = (0..50u64).map(|i| net.write(1, 2, i * 128, &pattern(i, 128))).collect();
    // Push them onto the wire, then drop the target (its queue pair, region, side channel).
    let mut ev = Vec::new();
    net.ep(1).poll(&mut ev, Some(Duration::from_millis(0))).expect("poll");
    let i1 = net.i(1);
    net.inbox[i1].extend(ev);
    let i2 = net.i(2);
    net.eps[i2] = None;
    for &t in &tokens {
        let r = net.write_done(1, t);
        assert!(matches!(r, Ok(_) | Err(AccessError::LinkFailed(_))), "write {t}: {r:?}");
    }
    net.take(1, "PeerDown 2", |e| matches!(e, Event::PeerDown { peer: 2, .. }));
    // Restart 2 on the same address.
    let peers = [(1, addrs[&1])].into_iter().collect();
    let c = base_config(2, addrs[&2], peers);
    let deadline = Instant::now() + WAIT;
    let ep = loop {
        match RdmaTransport::open(c.clone()) {
            Ok(ep) => break ep,
            Err(e) if Instant::now() < deadline => {
                eprintln!("reopen: {e}");
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!("reopen endpoint 2: {e}"),
        }
    };
    net.eps[i2] = Some(ep);
    net.inbox[i2].clear();
    net.take(1, "PeerUp 2 after restart", |e| matches!(e, Event::PeerUp { peer: 2 }));
    net.ep(2).grant(1);
    net.write_until_ok(1, 2, 64, b"second life");
    assert_eq!(net.region(2, 64, 11), b"second life");
}

/// Many writes and reads in flight, a revoke in the middle: every access completes
/// exactly once; writes before the revoke land, none after it does.
#[test]
fn every_access_completes_exactly_once() {
    if !rdma_available("every_access_completes_exactly_once") {
        return;
    }
    let mut net = Net::open(&[1, 2, 3]);
    net.ep(3).grant(1);
    net.write_until_ok(1, 3, 0, b"warm");
    let n = 3000usize;
    let mut expected: HashMap<Token, (PeerId, bool, u64)> = HashMap::new();
    let mut done: HashMap<Token, Result<Bytes, AccessError>> = HashMap::new();
    let mut issued = 0;
    let mut denied_non_holder = 0;
    let deadline = Instant::now() + Duration::from_secs(240);
    while done.len() < n {
        assert!(Instant::now() < deadline, "{} of {n} accesses completed ({issued} issued)", done.len());
        while issued < n {
            let from = if issued % 5 == 4 { 2 } else { 1 };
            let read = issued % 3 == 2;
            let off = (issued as u64 % 4096) * 8;
            let r = if read {
                net.ep(from).read(3, off, 8)
            } else {
                net.ep(from).write(3, off, &(issued as u64).to_le_bytes())
            };
            match r {
                Ok(t) => {
                    assert!(expected.insert(t, (from, read, off)).is_none(), "token {t} issued twice");
                    issued += 1;
                    if issued == n / 2 {
                        net.ep(3).revoke(1);
                    }
                }
                Err(SendError::Backpressure(_) | SendError::LinkDown(_)) => break,
                Err(e) => panic!("access {issued}: {e}"),
            }
        }
        net.pump();
        for at in [1, 2] {
            let i = net.i(at);
            for e in std::mem::take(&mut net.inbox[i]) {
                let (t, r) = match e {
                    Event::WriteDone { token, result, .. } | Event::ReadDone { token, result, .. } => (token, result),
                    _ => continue,
                };
                let Some(&(from, read, _)) = expected.get(&t) else { panic!("completion of unknown token {t}") };
                assert_eq!(from, at, "completion {t} at the wrong endpoint");
                if from == 2 && !read {
                    // Denied at the NIC; LinkFailed when the target's renewal of the
                    // broken queue pair reached 2 before its completion did. Never Ok.
                    assert!(r.is_err(), "write {t} from non-holder 2 must fail: {r:?}");
                    if matches!(r, Err(AccessError::Denied { .. })) {
                        denied_non_holder += 1;
                    }
                }
                if read {
                    assert!(matches!(&r, Ok(b) if b.len() == 8) || r.is_err(), "read {t}: {r:?}");
                }
                assert!(done.insert(t, r).is_none(), "access {t} completed twice");
            }
        }
    }
    for _ in 0..50 {
        net.pump();
    }
    for at in [1, 2] {
        let i = net.i(at);
        assert!(
            !net.inbox[i].iter().any(|e| matches!(e, Event::WriteDone { .. } | Event::ReadDone { .. })),
            "a completion after all {n} completed"
        );
    }
    let ok = done.values().filter(|r| r.is_ok()).count();
    eprintln!(
        "every_access_completes_exactly_once: {n} accesses, {ok} ok, {denied_non_holder} non-holder writes Denied"
    );
    assert!(denied_non_holder > 0, "at least one write of the non-holder must be reported Denied");
    assert!(ok > n / 4, "most accesses before the revoke must succeed ({ok} of {n})");
}

/// A peer with the wrong cluster secret or another member list never comes up.
#[test]
fn side_channel_refuses_wrong_secret_and_stale_member_list() {
    if !rdma_available("side_channel_refuses_wrong_secret_and_stale_member_list") {
        return;
    }
    for (what, tweak) in [
        (
            "wrong secret",
            (|id: PeerId, c: &mut RdmaConfig| c.secret = Some(format!("secret-{id}").into_bytes())) as fn(_, &mut _),
        ),
        ("stale member list", |id: PeerId, c: &mut RdmaConfig| c.config_digest = id),
    ] {
        let (ls, addrs) = listeners(&[1, 2]);
        let eps: Vec<RdmaTransport> = [1u64, 2]
            .into_iter()
            .zip(ls)
            .map(|(id, l)| {
                let peers = addrs.iter().filter(|(&p, _)| p != id).map(|(&p, &a)| (p, a)).collect();
                let mut c = base_config(id, addrs[&id], peers);
                tweak(id, &mut c);
                RdmaTransport::with_listener(c, l).expect("open")
            })
            .collect();
        let mut net = Net::new(&[1, 2], eps);
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            net.pump();
            let _ = net.ep(1).send(2, b"let me in");
        }
        for at in [1, 2] {
            let i = net.i(at);
            assert!(
                !net.inbox[i].iter().any(|e| matches!(e, Event::PeerUp { .. } | Event::Message { .. })),
                "{what}: endpoint {at} must not come up or receive: {:?}",
                net.inbox[i]
            );
        }
        // With the same secret and list they do come up.
    }
    let (eps, _) = open_cluster(&[1, 2], |c| c.secret = Some(b"shared".to_vec()));
    let mut net = Net::new(&[1, 2], eps);
    net.wait_all_up();
}

/// The conformance checks that apply to a transport without a receiver-side agent
/// (messages, limits, unknown peers, the waker). The agent checks (WriteArrived,
/// ReadArrived) do not apply: their RDMA counterparts are the tests above.
#[test]
fn conformance_messages_limits_and_waker() {
    if !rdma_available("conformance_messages_limits_and_waker") {
        return;
    }
    let mut make = |ids: &[PeerId]| -> Vec<Box<dyn Transport>> {
        open_cluster(ids, |_| {}).0.into_iter().map(|t| Box::new(t) as Box<dyn Transport>).collect()
    };
    conformance::messages_in_order_and_intact(&mut make);
    conformance::too_large_is_refused(&mut make);
    conformance::unknown_peer_is_refused(&mut make);
    conformance::waker_interrupts_poll(&mut make);
}

impl Net {
    fn ack_area(&mut self, at: PeerId, writer: PeerId, offset: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.ep(at).read_ack_area(writer, offset, &mut b).expect("read own acknowledgement area");
        b
    }

    fn write_ack(&mut self, from: PeerId, to: PeerId, offset: u64, data: &[u8]) -> Token {
        self.retry(from, "write_ack", |t| t.write_ack(to, offset, data))
    }
}

/// Acknowledgement writes land in the target's acknowledgement area for the writer, with
/// or without log permission; each peer has its own area; out-of-range or oversized ones
/// are refused at issue; and the acknowledgement queue pair cannot reach the log region
/// (another protection domain): such a write fails at the NIC, leaves the region as it
/// was, and the link is renewed with both queue pairs working again.
#[test]
fn acknowledgement_writes_reach_only_the_acknowledgement_area() {
    if !rdma_available("acknowledgement_writes_reach_only_the_acknowledgement_area") {
        return;
    }
    let mut net = Net::open(&[1, 2, 3]);
    let area = net.ep(1).ack_area_len() as u64;
    assert_eq!(area, 64 << 10);
    assert_eq!(net.ep(2).peer_ack_area_len(1), Some(area));
    // No permission granted anywhere: acknowledgements still go.
    let t = net.write_ack(2, 1, 64, b"ack from 2");
    assert_eq!(net.write_done(2, t), Ok(Bytes::new()));
    let t = net.write_ack(3, 1, 64, b"ack from 3");
    assert_eq!(net.write_done(3, t), Ok(Bytes::new()));
    assert_eq!(net.ack_area(1, 2, 64, 10), b"ack from 2");
    assert_eq!(net.ack_area(1, 3, 64, 10), b"ack from 3", "each peer writes its own area");
    assert_eq!(net.ep(1).load_ack_u64(2, 64).expect("load"), u64::from_le_bytes(*b"ack from"));
    // With 1 holding permission on 2, and after it was revoked: unchanged.
    net.ep(2).grant(1);
    net.write_until_ok(1, 2, 0, b"cell");
    let t = net.write_ack(2, 1, area - 8, &7u64.to_le_bytes());
    assert_eq!(net.write_done(2, t), Ok(Bytes::new()));
    assert_eq!(net.ep(1).load_ack_u64(2, area - 8).expect("load"), 7);
    net.ep(2).revoke(1);
    let t = net.write_ack(3, 1, 128, &pattern(9, 256));
    assert_eq!(net.write_done(3, t), Ok(Bytes::new()));
    assert!(net.ack_area(1, 3, 128, 256) == pattern(9, 256));
    // Refused at issue: past the area, larger than an acknowledgement write, unknown peer.
    assert!(matches!(net.ep(2).write_ack(1, area - 4, b"12345678"), Err(SendError::TooLarge { .. })));
    assert!(matches!(net.ep(2).write_ack(1, u64::MAX - 2, b"1234"), Err(SendError::TooLarge { .. })));
    let big = vec![0u8; transport::rdma::ACK_MAX_WRITE + 1];
    assert!(matches!(net.ep(2).write_ack(1, 0, &big), Err(SendError::TooLarge { .. })));
    assert_eq!(net.ep(2).write_ack(9, 0, b"x").map(|_| ()), Err(SendError::UnknownPeer(9)));

    // Isolation: 3 aims its acknowledgement queue pair at 1's log region.
    let before = net.region(1, 0, 64);
    let t = net.retry(3, "intrusion", |e| e.write_log_region_through_ack_qp(1, b"intruder writes the log"));
    let r = net.write_done(3, t);
    assert!(r.is_err(), "the NIC must refuse a write into another protection domain: {r:?}");
    eprintln!("acknowledgement queue pair aimed at the log region: {r:?}");
    net.take(3, "PeerDown 1", |e| matches!(e, Event::PeerDown { peer: 1, .. }));
    net.take(3, "PeerUp 1 again", |e| matches!(e, Event::PeerUp { peer: 1 }));
    for _ in 0..20 {
        net.pump();
    }
    assert_eq!(net.region(1, 0, 64), before, "the log region is unchanged");
    // Both paths work again after the renewal, and nothing completed twice.
    let t = net.write_ack(3, 1, 64, b"ack again");
    assert_eq!(net.write_done(3, t), Ok(Bytes::new()));
    assert_eq!(net.ack_area(1, 3, 64, 9), b"ack again");
    let i = net.i(3);
    assert!(!net.inbox[i].iter().any(|e| matches!(e, Event::WriteDone { .. })), "{:?}", net.inbox[i]);
}

/// Acknowledgement writes in flight when the link fails complete once each (Ok or
/// LinkFailed); after the renewal the acknowledgement queue pair is connected again.
#[test]
fn acknowledgement_writes_in_flight_complete_once_across_a_link_failure() {
    if !rdma_available("acknowledgement_writes_in_flight_complete_once_across_a_link_failure") {
        return;
    }
    let mut net = Net::open(&[1, 2]);
    // A first batch completes while the link is up.
    let first: Vec<Token> = (0..100u64).map(|i| net.write_ack(2, 1, 64 + i * 128, &pattern(i, 128))).collect();
    for &t in &first {
        assert_eq!(net.write_done(2, t), Ok(Bytes::new()), "acknowledgement write {t} before the failure");
    }
    // A second one with the link broken under it: those not completed by then are
    // flushed (posting on a queue pair in error is allowed), none is lost or doubled.
    let mut tokens = Vec::new();
    for i in 0..100u64 {
        tokens.push(net.write_ack(2, 1, 64 + i * 128, &pattern(i + 100, 128)));
        if i == 20 {
            net.ep(2).break_link(1).expect("force both queue pairs to ERR");
        }
    }
    let (mut ok, mut failed) = (0, 0);
    for &t in &tokens {
        match net.write_done(2, t) {
            Ok(_) => ok += 1,
            Err(AccessError::LinkFailed(_)) => failed += 1,
            Err(e) => panic!("acknowledgement write {t}: {e:?}"),
        }
    }
    eprintln!("acknowledgement writes across a link failure: {ok} ok, {failed} failed");
    assert!(failed >= 79, "those posted on the broken queue pair fail (flushed): {failed}");
    net.take(2, "PeerUp 1 again", |e| matches!(e, Event::PeerUp { peer: 1 }));
    let t = net.write_ack(2, 1, 64, b"after renewal");
    assert_eq!(net.write_done(2, t), Ok(Bytes::new()));
    assert_eq!(net.ack_area(1, 2, 64, 13), b"after renewal");
    for _ in 0..50 {
        net.pump();
    }
    let i = net.i(2);
    assert!(!net.inbox[i].iter().any(|e| matches!(e, Event::WriteDone { .. })), "{:?}", net.inbox[i]);
}

/// A replica without an acknowledgement area (`ack_area_len = 0`, or an older peer that
/// sends the version-0 bootstrap) connects the log queue pair only: writes work, and
/// `write_ack` answers LinkDown both ways (the agent then acknowledges by message).
#[test]
fn a_peer_without_an_acknowledgement_area_connects_the_log_queue_pair_only() {
    if !rdma_available("a_peer_without_an_acknowledgement_area_connects_the_log_queue_pair_only") {
        return;
    }
    for without in [1, 2] {
        let (eps, _) = open_cluster(&[1, 2], |c| {
            if c.local == without {
                c.ack_area_len = 0;
            }
        });
        let mut net = Net::new(&[1, 2], eps);
        net.wait_all_up();
        assert_eq!(net.ep(1).peer_ack_area_len(2), None);
        assert_eq!(net.ep(2).peer_ack_area_len(1), None);
        assert_eq!(net.ep(1).write_ack(2, 64, b"x").map(|_| ()), Err(SendError::LinkDown(2)));
        assert_eq!(net.ep(2).write_ack(1, 64, b"x").map(|_| ()), Err(SendError::LinkDown(1)));
        net.ep(2).grant(1);
        net.write_until_ok(1, 2, 0, b"log path works");
        assert_eq!(net.region(2, 0, 14), b"log path works");
    }
}

/// The heartbeat counter: while both sides poll, each reads the other's moving counter
/// by RDMA READ and nobody goes down; when one side stops polling (a hung process whose
/// NIC and TCP side channel stay up), the other takes the link down within the timeout
/// plus a read interval, and the link comes back once the stalled side polls again.
#[test]
fn a_peer_whose_poll_loop_stalls_is_taken_down_by_its_heartbeat_counter() {
    if !rdma_available("a_peer_whose_poll_loop_stalls_is_taken_down_by_its_heartbeat_counter") {
        return;
    }
    let timeout = Duration::from_millis(400);
    let (eps, _) = open_cluster(&[1, 2], |c| c.heartbeat_timeout = Some(timeout));
    let mut net = Net::new(&[1, 2], eps);
    net.wait_all_up();
    let t0 = Instant::now();
    while t0.elapsed() < timeout * 4 {
        net.pump();
    }
    for id in [1, 2] {
        let i = net.i(id);
        assert!(!net.inbox[i].iter().any(|e| matches!(e, Event::PeerDown { .. })), "{id}: {:?}", net.inbox[i]);
    }
    let (a, b) = (net.ep(1).peer_heartbeat(2), net.ep(2).peer_heartbeat(1));
    assert!(a.is_some_and(|v| v > 0) && b.is_some_and(|v| v > 0), "counters read: {a:?} {b:?}");
    assert_eq!(net.ep(1).heartbeat_failures(), 0);

    // 2 stops polling; only 1 runs.
    let stalled = Instant::now();
    let i = net.i(1);
    let reason = loop {
        assert!(stalled.elapsed() < WAIT, "1 never took 2 down: {:?}", net.inbox[i]);
        let mut ev = Vec::new();
        net.ep(1).poll(&mut ev, Some(Duration::from_millis(1))).expect("poll");
        if let Some(Event::PeerDown { reason, .. }) = ev.iter().find(|e| matches!(e, Event::PeerDown { peer: 2, .. })) {
            break reason.clone();
        }
    };
    let after = stalled.elapsed();
    eprintln!("heartbeat: 2 taken down {after:?} after it stopped polling: {reason}");
    assert!(reason.contains("heartbeat counter"), "{reason}");
    assert!(after >= timeout, "taken down after {after:?}, before the {timeout:?} timeout");
    assert_eq!(net.ep(1).heartbeat_failures(), 1);
    // 2 polls again: the link is renewed and stays up.
    net.take(1, "PeerUp 2 after the stall", |e| matches!(e, Event::PeerUp { peer: 2 }));
    let t = net.write_ack(2, 1, 64, b"back");
    assert_eq!(net.write_done(2, t), Ok(Bytes::new()));
    let t0 = Instant::now();
    while t0.elapsed() < timeout * 3 {
        net.pump();
    }
    assert!(!net.inbox[i].iter().any(|e| matches!(e, Event::PeerDown { .. })), "{:?}", net.inbox[i]);
    assert_eq!(net.ep(1).heartbeat_failures(), 1);
}

/// Measures (and prints) the acknowledgement round trip the replog agent relies on, both
/// ways it can go, in one run: 1 writes a cell into 2's region; 2, polling its memory,
/// sees it and acknowledges either by RDMA WRITE into 1's acknowledgement area (which 1
/// finds by reading its own memory) or by a side-channel message (which 1 receives from
/// its poll). Both must complete every round; the numbers are printed, not asserted
/// (soft-RoCE under emulation says little about a real NIC).
#[test]
fn acknowledgement_round_trip_by_rdma_write_and_by_message() {
    if !rdma_available("acknowledgement_round_trip_by_rdma_write_and_by_message") {
        return;
    }
    let mut net = Net::open(&[1, 2]);
    net.ep(2).grant(1);
    net.write_until_ok(1, 2, 0, &0u64.to_le_bytes());
    const ROUNDS: u64 = 300;
    let mut ev = Vec::new();
    for by_write in [true, false] {
        let mut lat = Vec::new();
        for round in 1..=ROUNDS {
            let marker = if by_write { round } else { round + ROUNDS };
            let t0 = Instant::now();
            net.write(1, 2, 0, &marker.to_le_bytes());
            // 2 polls its own memory for the cell.
            while net.ep(2).load_u64(0).expect("load") != marker {
                net.ep(2).poll(&mut ev, Some(Duration::ZERO)).expect("poll 2");
                net.ep(1).poll(&mut ev, Some(Duration::ZERO)).expect("poll 1");
                assert!(t0.elapsed() < WAIT, "round {round}: the cell never landed");
            }
            if by_write {
                let _ = net.retry(2, "write_ack", |t| t.write_ack(1, 64, &marker.to_le_bytes()));
                while net.ep(1).load_ack_u64(2, 64).expect("load") != marker {
                    net.ep(1).poll(&mut ev, Some(Duration::ZERO)).expect("poll 1");
                    net.ep(2).poll(&mut ev, Some(Duration::ZERO)).expect("poll 2");
                    assert!(t0.elapsed() < WAIT, "round {round}: the acknowledgement record never landed");
                }
            } else {
                net.retry(2, "send", |t| t.send(1, &marker.to_le_bytes()));
                let want = Bytes::copy_from_slice(&marker.to_le_bytes());
                let mut mine = Vec::new();
                loop {
                    net.ep(1).poll(&mut mine, Some(Duration::ZERO)).expect("poll 1");
                    if mine.iter().any(|e| matches!(e, Event::Message { from: 2, payload } if *payload == want)) {
                        break;
                    }
                    mine.clear();
                    net.ep(2).poll(&mut ev, Some(Duration::ZERO)).expect("poll 2");
                    assert!(t0.elapsed() < WAIT, "round {round}: the acknowledgement message never arrived");
                }
            }
            lat.push(t0.elapsed());
            ev.retain(|e| !matches!(e, Event::WriteDone { result: Ok(_), .. }));
            assert!(ev.is_empty(), "unexpected events: {ev:?}");
        }
        lat.sort();
        let us = |p: usize| lat[(lat.len() * p / 100).min(lat.len() - 1)].as_secs_f64() * 1e6;
        println!(
            "rdma: cell write + acknowledgement by {}: p50 {:.0} us, p90 {:.0} us, p99 {:.0} us ({ROUNDS} rounds)",
            if by_write { "RDMA WRITE into the writer's area" } else { "side-channel message" },
            us(50),
            us(90),
            us(99)
        );
    }
}

/// The read mirror: peers read it with RDMA READ (on the acknowledgement queue pair),
/// reads past its end or larger than `mirror_read_max` are refused at issue, one read at
/// a time per peer, and a peer's RDMA WRITE into it is refused by the NIC (registered for
/// remote READ only): the mirror is unchanged and the link is renewed.
#[test]
fn the_read_mirror_is_read_by_rdma_read_and_refuses_writes() {
    if !rdma_available("the_read_mirror_is_read_by_rdma_read_and_refuses_writes") {
        return;
    }
    let (eps, _) = open_cluster(&[1, 2], |c| {
        c.mirror_len = 4096;
        c.mirror_read_max = 1024;
    });
    let mut net = Net::new(&[1, 2], eps);
    net.wait_all_up();
    assert_eq!(net.ep(1).mirror_len(), 4096);
    assert_eq!(net.ep(2).peer_mirror_len(1), Some(4096));
    net.ep(1).write_mirror(512, &pattern(3, 300)).expect("write own mirror");
    let t = net.retry(2, "read_mirror", |e| e.read_mirror(1, 512, 300));
    assert!(net.ep(2).read_mirror(1, 0, 8) == Err(SendError::Backpressure(1)), "one mirror read at a time");
    assert_eq!(net.read_done(2, t), Ok(Bytes::from(pattern(3, 300))));
    assert!(matches!(net.ep(2).read_mirror(1, 4090, 8), Err(SendError::TooLarge { .. })));
    assert!(matches!(net.ep(2).read_mirror(1, 0, 1025), Err(SendError::TooLarge { .. })));
    assert_eq!(net.ep(2).read_mirror(9, 0, 8).map(|_| ()), Err(SendError::UnknownPeer(9)));
    // A list of reads (the later ones fenced) completes once, with the parts one after the other.
    net.ep(1).write_mirror(0, &pattern(5, 64)).expect("write own mirror");
    let parts = [(0, 64), (512, 300), (0, 64)];
    let t = net.retry(2, "read_mirror_chain", |e| e.read_mirror_chain(1, &parts));
    let want: Vec<u8> = [pattern(5, 64), pattern(3, 300), pattern(5, 64)].concat();
    assert_eq!(net.read_done(2, t), Ok(Bytes::from(want)));
    assert!(matches!(net.ep(2).read_mirror_chain(1, &[(0, 512), (512, 513)]), Err(SendError::TooLarge { .. })));
    assert!(matches!(net.ep(2).read_mirror_chain(1, &[]), Err(SendError::TooLarge { .. })));
    assert!(matches!(net.ep(2).read_mirror_chain(1, &[(0, 8); 4]), Err(SendError::TooLarge { .. })));

    let before = {
        let mut b = vec![0u8; 4096];
        net.ep(1).read_own_mirror(0, &mut b).expect("read own mirror");
        b
    };
    let t = net.retry(2, "intrusion", |e| e.write_mirror_through_ack_qp(1, b"a peer writes the mirror"));
    let r = net.write_done(2, t);
    assert!(r.is_err(), "the NIC must refuse a write into a remote-read-only region: {r:?}");
    eprintln!("RDMA WRITE aimed at the read mirror: {r:?}");
    net.take(2, "PeerDown 1", |e| matches!(e, Event::PeerDown { peer: 1, .. }));
    net.take(2, "PeerUp 1 again", |e| matches!(e, Event::PeerUp { peer: 1 }));
    let mut after = vec![0u8; 4096];
    net.ep(1).read_own_mirror(0, &mut after).expect("read own mirror");
    assert!(after == before, "the mirror is unchanged");
    // Reads work again after the renewal.
    let t = net.retry(2, "read_mirror again", |e| e.read_mirror(1, 512, 300));
    assert_eq!(net.read_done(2, t), Ok(Bytes::from(pattern(3, 300))));
}

/// The device-dax device of the persistent-region test: `REPLOG_TEST_DEVDAX`, which
/// `hw-setup/rxe-vm.sh` sets with `RXE_DEVDAX`. Without it (or without an RDMA device)
/// the test is skipped with a line saying why, or fails when `REPLOG_REQUIRE_ALL=1`.
fn devdax_or_skip(test: &str) -> Option<PathBuf> {
    if !rdma_available(test) {
        return None;
    }
    match std::env::var_os("REPLOG_TEST_DEVDAX") {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => {
            let why = format!(
                "{test}: no device-dax device (REPLOG_TEST_DEVDAX is not set); run it in the soft-RoCE VM with \
                 one: RXE_DEVDAX=128M hw-setup/rxe-vm.sh run -- <test binary>"
            );
            if std::env::var("REPLOG_REQUIRE_ALL").as_deref() == Ok("1") {
                panic!("{why} (REPLOG_REQUIRE_ALL=1)");
            }
            eprintln!("SKIP {why}");
            None
        }
    }
}

/// A seed no earlier run used, so bytes left on a persistent region by one cannot pass
/// for this run's.
fn fresh_seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(7, |d| d.as_nanos() as u64)
}

/// Endpoint 2's log region lives at `path`: 1 writes into it one-sidedly, reads it back
/// by RDMA READ on the same queue pair (after the write: the read-after-write a leader
/// uses to know a write reached the target's memory), both transports are dropped, a
/// new pair is opened on the same `path`, and the bytes are still there, locally and
/// by RDMA READ.
fn region_survives_a_reopen(path: &Path, region_len: usize) {
    let seed = fresh_seed();
    let cases: Vec<(u64, Vec<u8>)> = vec![
        (0, pattern(seed, 64)),
        (4096, pattern(seed + 1, 64 << 10)),
        (region_len as u64 - 4096, pattern(seed + 2, 4096)),
    ];
    let on_path = |c: &mut RdmaConfig| {
        c.region_len = region_len;
        if c.local == 2 {
            c.region_path = Some(path.to_path_buf());
        }
    };
    {
        let (eps, _) = open_cluster(&[1, 2], on_path);
        let mut net = Net::new(&[1, 2], eps);
        net.wait_all_up();
        assert_eq!(net.ep(2).region_len(), region_len);
        net.ep(2).grant(1);
        for (off, data) in &cases {
            assert!(net.region(2, *off, data.len()) != *data, "{} bytes at {off} were already there", data.len());
            net.write_until_ok(1, 2, *off, data);
            let t = net.retry(1, "read after write", |e| e.read(2, *off, data.len() as u32));
            assert!(net.read_done(1, t).expect("read after write") == *data, "RDMA READ after the write at {off}");
            assert!(net.region(2, *off, data.len()) == *data, "region of 2 at {off} holds what 1 wrote");
        }
    }
    // Both transports (queue pairs, registrations, mappings) are gone; open new ones.
    let (eps, _) = open_cluster(&[1, 2], on_path);
    let mut net = Net::new(&[1, 2], eps);
    net.wait_all_up();
    for (off, data) in &cases {
        assert!(net.region(2, *off, data.len()) == *data, "after the reopen, region of 2 at {off} still holds it");
        let t = net.retry(1, "read after reopen", |e| e.read(2, *off, data.len() as u32));
        assert!(net.read_done(1, t).expect("read after reopen") == *data, "RDMA READ at {off} after the reopen");
    }
}

#[test]
fn a_log_region_on_device_dax_keeps_one_sided_writes_across_a_reopen() {
    let Some(dax) = devdax_or_skip("a_log_region_on_device_dax_keeps_one_sided_writes_across_a_reopen") else {
        return;
    };
    // 1 MiB: the mapping is 2 MiB, the device's alignment.
    region_survives_a_reopen(&dax, 1 << 20);
    // A region the device cannot hold is refused at open, saying why.
    let (ls, addrs) = listeners(&[2]);
    let mut c = base_config(2, addrs[&2], BTreeMap::new());
    c.region_len = 64 << 30;
    c.region_path = Some(dax.clone());
    match RdmaTransport::with_listener(c, ls.into_iter().next().expect("one listener")) {
        Ok(_) => panic!("a 64 GiB log region on {} was accepted", dax.display()),
        Err(e) => assert!(e.to_string().contains("device-dax device has"), "unexpected error: {e}"),
    }
}

#[test]
fn a_log_region_in_a_file_keeps_one_sided_writes_across_a_reopen() {
    if !rdma_available("a_log_region_in_a_file_keeps_one_sided_writes_across_a_reopen") {
        return;
    }
    // TMPDIR is a tmpfs in the VM: shmem pages may be pinned long-term.
    let dir = std::env::temp_dir().join(format!("replog-rdma-region-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create the region's directory");
    let file = dir.join("region");
    // It must exist (a mistyped device path is an error, not a new file); empty is fine.
    std::fs::File::create(&file).expect("create the region file");
    region_survives_a_reopen(&file, 256 << 10);
    assert_eq!(std::fs::metadata(&file).expect("stat the region file").len(), 256 << 10);
    std::fs::remove_dir_all(&dir).expect("remove the region's directory");
}
