//! Fault injection for any [`Transport`]: test support.
//!
//! [`Faulty`] wraps a backend (generic, or a `Box<dyn Transport>`) and loses, delays and
//! partitions traffic as its [`FaultControl`] says; the control is a cloneable handle a
//! test changes at run time from any thread. Randomness comes from a seed, so a
//! single-threaded test replays exactly.
//!
//! # What is faulted where
//! Each endpoint's wrapper faults what *it* originates and what it receives:
//!
//! - **drop** ([`FaultConfig::drop_messages`]): each message this endpoint sends is lost
//!   with that probability (`send` still returns `Ok`). Dropping happens at the sender
//!   only, so wrap the senders whose messages should be lost.
//! - **access drop** ([`FaultConfig::drop_accesses`]): each write or read this endpoint
//!   issues is lost with that probability, and so is each answer to one. One-sided
//!   accesses still complete exactly once: a lost access or answer completes with
//!   [`AccessError::LinkFailed`]`("dropped by fault injection")`, after the delay, and a
//!   late real answer is discarded.
//! - **delay** ([`FaultConfig::delay`]): every event this endpoint receives is held for a
//!   uniformly drawn time in `min..=max` before `poll` returns it. Events of one peer
//!   keep their order (a later event is never released before an earlier one), so delay
//!   reorders nothing within a link; events of different peers may interleave
//!   differently.
//! - **partition** ([`FaultConfig::blocked_out`], [`FaultConfig::blocked_in`]): blocking
//!   *outgoing* to X loses messages to X and fails new accesses to X with `LinkFailed`;
//!   blocking *incoming* from X loses messages from X and fails this endpoint's accesses
//!   to X still in flight (and turns any later answer to them into nothing). A symmetric
//!   partition blocks both. Link events (`PeerUp`/`PeerDown`) of the inner transport
//!   pass through: a partition is silent, as a real one is.
//!
//! The agent side of a *peer's* access (an incoming `WriteArrived`/`ReadArrived`, our
//! outgoing `complete_write`/`complete_read`) is never dropped, because only the issuer
//! can turn a loss into a completion: while the peer is blocked, such arrivals and
//! answers are parked and go through when the block is lifted (as TCP would deliver
//! them after a healed partition). If the peer is wrapped too, its own wrapper has
//! failed the access already and discards the late answer. A write arrival released
//! after a delay or a partition is checked again against the current permission
//! holder, and denied (empty detail) if the writer lost permission meanwhile.
//!
//! ```
//! use transport::faults::Faulty;
//! use transport::mem::MemNetwork;
//! use transport::Transport;
//! use std::time::Duration;
//!
//! let net = MemNetwork::new();
//! let mut a = Faulty::new(net.endpoint(1, &[2]), 42);
//! let _b = net.endpoint(2, &[1]);
//! let faults = a.control();
//! faults.set_drop_messages(0.3);
//! faults.set_delay(Duration::from_millis(1), Duration::from_millis(5));
//! faults.partition(2); // both ways
//! a.send(2, b"lost").unwrap();
//! faults.heal_all();
//! ```

use crate::{AccessError, Event, PeerId, SendError, Token, Transport, Wake};
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

/// A boxed transport is a transport, so [`Faulty`] and [`crate::conformance`] accept
/// trait objects (`Faulty<Box<dyn Transport>>`) as well as concrete backends.
impl<T: Transport + ?Sized> Transport for Box<T> {
    fn local(&self) -> PeerId {
        (**self).local()
    }
    fn peers(&self) -> Vec<PeerId> {
        (**self).peers()
    }
    fn max_payload(&self) -> usize {
        (**self).max_payload()
    }
    fn send(&mut self, to: PeerId, payload: &[u8]) -> Result<(), SendError> {
        (**self).send(to, payload)
    }
    fn write(&mut self, to: PeerId, offset: u64, data: &[u8]) -> Result<Token, SendError> {
        (**self).write(to, offset, data)
    }
    fn read(&mut self, from: PeerId, offset: u64, len: u32) -> Result<Token, SendError> {
        (**self).read(from, offset, len)
    }
    fn complete_write(&mut self, from: PeerId, token: Token, result: Result<&[u8], &[u8]>) -> Result<(), SendError> {
        (**self).complete_write(from, token, result)
    }
    fn complete_read(&mut self, from: PeerId, token: Token, result: Result<&[u8], &[u8]>) -> Result<(), SendError> {
        (**self).complete_read(from, token, result)
    }
    fn grant(&mut self, peer: PeerId) {
        (**self).grant(peer)
    }
    fn revoke(&mut self, peer: PeerId) {
        (**self).revoke(peer)
    }
    fn permission_holder(&self) -> Option<PeerId> {
        (**self).permission_holder()
    }
    fn fence(&mut self, holder: PeerId, events: &mut Vec<Event>) -> std::io::Result<()> {
        (**self).fence(holder, events)
    }
    fn completes_on_landing(&self) -> bool {
        (**self).completes_on_landing()
    }
    fn recover_landed(&mut self, fresh: bool, events: &mut Vec<Event>) -> std::io::Result<()> {
        (**self).recover_landed(fresh, events)
    }
    fn poll(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> std::io::Result<()> {
        (**self).poll(events, timeout)
    }
    fn waker(&self) -> Arc<dyn Wake> {
        (**self).waker()
    }
    fn send_queued(&mut self) {
        (**self).send_queued()
    }
    fn watch_fd(&mut self, fd: std::os::fd::RawFd) -> std::io::Result<bool> {
        (**self).watch_fd(fd)
    }
    fn mirror_geometry(&self) -> Option<(usize, usize)> {
        (**self).mirror_geometry()
    }
    fn put_mirror(&mut self, offset: usize, data: &[u8]) -> Result<(), String> {
        (**self).put_mirror(offset, data)
    }
    fn read_paths(&self) -> crate::ReadPaths {
        (**self).read_paths()
    }
    fn update_peers(
        &mut self,
        peers: &std::collections::BTreeMap<PeerId, crate::PeerSpec>,
    ) -> Result<(), crate::PeersError> {
        (**self).update_peers(peers)
    }
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn dynamic_peers(&self) -> bool {
        (**self).dynamic_peers()
    }
}

/// The faults one wrapper applies. All default to none.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FaultConfig {
    /// Probability in `0.0..=1.0` that a message this endpoint sends is lost.
    pub drop_messages: f64,
    /// Probability that a write or read this endpoint issues, or the answer to one, is
    /// lost (the access then completes with `LinkFailed`).
    pub drop_accesses: f64,
    /// Every received event is held for a time drawn uniformly in `min..=max`.
    pub delay: Option<(Duration, Duration)>,
    /// Peers nothing may be sent to.
    pub blocked_out: HashSet<PeerId>,
    /// Peers nothing may be received from.
    pub blocked_in: HashSet<PeerId>,
}

/// A cloneable handle changing the faults of one or more [`Faulty`] wrappers at run
/// time, from any thread. A change wakes the wrappers' blocked polls.
#[derive(Clone, Default)]
pub struct FaultControl {
    shared: Arc<ControlShared>,
}

#[derive(Default)]
struct ControlShared {
    config: Mutex<FaultConfig>,
    version: AtomicU64,
    wakers: Mutex<Vec<Weak<FaultyWaker>>>,
}

impl std::fmt::Debug for FaultControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("FaultControl").field(&self.config()).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl FaultControl {
    /// A control with no faults.
    pub fn new() -> Self {
        Self::default()
    }

    /// A snapshot of the current faults.
    pub fn config(&self) -> FaultConfig {
        lock(&self.shared.config).clone()
    }

    /// Changes the faults with `f` and wakes the wrappers.
    pub fn update(&self, f: impl FnOnce(&mut FaultConfig)) {
        {
            let mut c = lock(&self.shared.config);
            f(&mut c);
            assert!(
                (0.0..=1.0).contains(&c.drop_messages) && (0.0..=1.0).contains(&c.drop_accesses),
                "drop probabilities must be within 0..=1"
            );
            if let Some((min, max)) = c.delay {
                assert!(min <= max, "delay min {min:?} exceeds max {max:?}");
            }
        }
        self.shared.version.fetch_add(1, Ordering::SeqCst);
        let mut wakers = lock(&self.shared.wakers);
        wakers.retain(|w| match w.upgrade() {
            Some(w) => {
                // Only make the poll look at the new faults, not return.
                w.inner.wake();
                true
            }
            None => false,
        });
    }

    /// Sets the probability that a sent message is lost.
    pub fn set_drop_messages(&self, p: f64) {
        self.update(|c| c.drop_messages = p);
    }

    /// Sets the probability that an issued access, or its answer, is lost.
    pub fn set_drop_accesses(&self, p: f64) {
        self.update(|c| c.drop_accesses = p);
    }

    /// Holds every received event for `min..=max` before releasing it.
    pub fn set_delay(&self, min: Duration, max: Duration) {
        self.update(|c| c.delay = Some((min, max)));
    }

    /// Stops delaying (events already held are still released at their time).
    pub fn clear_delay(&self) {
        self.update(|c| c.delay = None);
    }

    /// One-way partition: nothing goes out to `peer`.
    pub fn block_outgoing(&self, peer: PeerId) {
        self.update(|c| {
            c.blocked_out.insert(peer);
        });
    }

    /// One-way partition: nothing comes in from `peer`.
    pub fn block_incoming(&self, peer: PeerId) {
        self.update(|c| {
            c.blocked_in.insert(peer);
        });
    }

    /// Symmetric partition from `peer`: blocks both directions.
    pub fn partition(&self, peer: PeerId) {
        self.update(|c| {
            c.blocked_in.insert(peer);
            c.blocked_out.insert(peer);
        });
    }

    /// Lifts both blocks on `peer`.
    pub fn heal(&self, peer: PeerId) {
        self.update(|c| {
            c.blocked_in.remove(&peer);
            c.blocked_out.remove(&peer);
        });
    }

    /// Lifts every block.
    pub fn heal_all(&self) {
        self.update(|c| {
            c.blocked_in.clear();
            c.blocked_out.clear();
        });
    }

    /// Removes every fault: no drops, no delay, no partition.
    pub fn clear(&self) {
        self.update(|c| *c = FaultConfig::default());
    }

    fn register(&self, w: &Arc<FaultyWaker>) {
        lock(&self.shared.wakers).push(Arc::downgrade(w));
    }
}

/// Waking a wrapper's poll: `wake` makes it return; a control change only makes it
/// look at the new faults.
struct FaultyWaker {
    woken: AtomicBool,
    inner: Arc<dyn Wake>,
}

impl Wake for FaultyWaker {
    fn wake(&self) {
        self.woken.store(true, Ordering::SeqCst);
        self.inner.wake();
    }
}

/// splitmix64: tiny, seedable, good enough for fault decisions.
#[derive(Clone, Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// True with probability `p`.
    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    fn between(&mut self, min: Duration, max: Duration) -> Duration {
        let span = (max - min).as_nanos() as u64;
        if span == 0 {
            return min;
        }
        min + Duration::from_nanos(self.next() % (span + 1))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Write,
    Read,
}

/// An answer to a peer's access waiting for a block to lift.
struct Parked {
    kind: Kind,
    token: Token,
    result: Result<Vec<u8>, Vec<u8>>,
}

const DROPPED: &str = "dropped by fault injection";
const PARTITIONED: &str = "partitioned by fault injection";

/// A [`Transport`] that injects the faults its [`FaultControl`] describes. See the
/// module docs for what is faulted where.
pub struct Faulty<T: Transport> {
    inner: T,
    control: FaultControl,
    config: FaultConfig,
    config_version: u64,
    rng: SplitMix64,
    waker: Arc<FaultyWaker>,
    peers: Vec<PeerId>,
    next_token: Token,
    /// Our accesses not yet completed: outer token -> (target, kind).
    outstanding: HashMap<Token, (PeerId, Kind)>,
    /// Inner token -> outer token, for accesses passed to the inner transport.
    by_inner: HashMap<Token, Token>,
    /// Received events held until their release time, by (time, sequence).
    held: BTreeMap<(Instant, u64), Event>,
    seq: u64,
    /// The latest release time given to each peer's events (keeps per-link order).
    last_release: HashMap<PeerId, Instant>,
    /// Arrivals from peers blocked incoming, in order.
    parked_in: HashMap<PeerId, VecDeque<Event>>,
    /// Answers to peers blocked outgoing, in order.
    parked_out: HashMap<PeerId, VecDeque<Parked>>,
}

impl<T: Transport> std::fmt::Debug for Faulty<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faulty")
            .field("local", &self.inner.local())
            .field("config", &self.config)
            .field("held", &self.held.len())
            .field("outstanding", &self.outstanding.len())
            .finish_non_exhaustive()
    }
}

impl<T: Transport> Faulty<T> {
    /// Wraps `inner` with a fresh [`FaultControl`] (no faults yet) and the RNG seed
    /// `seed`.
    pub fn new(inner: T, seed: u64) -> Self {
        Self::with_control(inner, FaultControl::new(), seed)
    }

    /// Wraps `inner` under an existing control (several wrappers may share one, e.g. to
    /// set the same loss rate everywhere).
    pub fn with_control(inner: T, control: FaultControl, seed: u64) -> Self {
        let waker = Arc::new(FaultyWaker { woken: AtomicBool::new(false), inner: inner.waker() });
        control.register(&waker);
        let peers = inner.peers();
        Faulty {
            inner,
            config: control.config(),
            config_version: control.shared.version.load(Ordering::SeqCst),
            control,
            rng: SplitMix64(seed),
            waker,
            peers,
            next_token: 1,
            outstanding: HashMap::new(),
            by_inner: HashMap::new(),
            held: BTreeMap::new(),
            seq: 0,
            last_release: HashMap::new(),
            parked_in: HashMap::new(),
            parked_out: HashMap::new(),
        }
    }

    /// The handle changing this wrapper's faults.
    pub fn control(&self) -> FaultControl {
        self.control.clone()
    }

    /// The wrapped transport.
    pub fn inner(&self) -> &T {
        &self.inner
    }

    /// The wrapped transport, mutably. Accesses issued directly on it bypass the
    /// wrapper's token mapping: their completions are discarded by [`Faulty::poll`].
    pub fn inner_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    /// Unwraps; events held or parked are lost.
    pub fn into_inner(self) -> T {
        self.inner
    }

    /// Events held for a delay (for tests' curiosity).
    pub fn held(&self) -> usize {
        self.held.len()
    }

    fn refresh_config(&mut self) {
        let v = self.control.shared.version.load(Ordering::SeqCst);
        if v != self.config_version {
            self.config = self.control.config();
            self.config_version = v;
        }
    }

    fn check(&self, to: PeerId, size: usize) -> Result<(), SendError> {
        if !self.peers.contains(&to) {
            return Err(SendError::UnknownPeer(to));
        }
        let limit = self.inner.max_payload();
        if size > limit {
            return Err(SendError::TooLarge { size, limit });
        }
        Ok(())
    }

    /// Holds `e`, received from `peer`, until its release time.
    fn hold(&mut self, peer: PeerId, e: Event, now: Instant) {
        let d = match self.config.delay {
            Some((min, max)) => self.rng.between(min, max),
            None => Duration::ZERO,
        };
        let mut at = now + d;
        if let Some(&last) = self.last_release.get(&peer) {
            at = at.max(last);
        }
        self.last_release.insert(peer, at);
        self.seq += 1;
        self.held.insert((at, self.seq), e);
    }

    /// Completes our access `token` (outer) with `result`, once.
    fn finish(&mut self, token: Token, result: Result<Bytes, AccessError>, now: Instant) {
        let Some((peer, kind)) = self.outstanding.remove(&token) else {
            return;
        };
        let e = match kind {
            Kind::Write => Event::WriteDone { to: peer, token, result },
            Kind::Read => Event::ReadDone { from: peer, token, result },
        };
        self.hold(peer, e, now);
    }

    fn issue(
        &mut self,
        to: PeerId,
        kind: Kind,
        size: usize,
        f: impl FnOnce(&mut T) -> Result<Token, SendError>,
    ) -> Result<Token, SendError> {
        self.check(to, size)?;
        self.refresh_config();
        let lost = if self.config.blocked_out.contains(&to) {
            Some(PARTITIONED)
        } else if self.rng.chance(self.config.drop_accesses) {
            Some(DROPPED)
        } else {
            None
        };
        let token = self.next_token;
        if let Some(why) = lost {
            self.next_token += 1;
            self.outstanding.insert(token, (to, kind));
            self.finish(token, Err(AccessError::LinkFailed(why.into())), Instant::now());
            return Ok(token);
        }
        let inner = f(&mut self.inner)?;
        self.next_token += 1;
        self.outstanding.insert(token, (to, kind));
        self.by_inner.insert(inner, token);
        Ok(token)
    }

    fn answer(
        &mut self,
        kind: Kind,
        from: PeerId,
        token: Token,
        result: Result<&[u8], &[u8]>,
    ) -> Result<(), SendError> {
        let size = match result {
            Ok(b) | Err(b) => b.len(),
        };
        self.check(from, size)?;
        self.refresh_config();
        if self.config.blocked_out.contains(&from) || self.parked_out.contains_key(&from) {
            self.parked_out.entry(from).or_default().push_back(Parked {
                kind,
                token,
                result: result.map(<[u8]>::to_vec).map_err(<[u8]>::to_vec),
            });
            return Ok(());
        }
        match kind {
            Kind::Write => self.inner.complete_write(from, token, result),
            Kind::Read => self.inner.complete_read(from, token, result),
        }
    }

    /// Takes an event from the inner transport.
    fn admit(&mut self, e: Event, now: Instant) {
        match e {
            Event::Message { from, .. } => {
                if !self.config.blocked_in.contains(&from) {
                    self.hold(from, e, now);
                }
            }
            Event::WriteArrived { from, .. } | Event::ReadArrived { from, .. } => {
                if self.config.blocked_in.contains(&from) || self.parked_in.contains_key(&from) {
                    self.parked_in.entry(from).or_default().push_back(e);
                } else {
                    self.hold(from, e, now);
                }
            }
            Event::WriteDone { to: peer, token, result } | Event::ReadDone { from: peer, token, result } => {
                let Some(outer) = self.by_inner.remove(&token) else {
                    return; // not issued through the wrapper
                };
                let result = if self.config.blocked_in.contains(&peer) {
                    Err(AccessError::LinkFailed(PARTITIONED.into()))
                } else if self.rng.chance(self.config.drop_accesses) {
                    Err(AccessError::LinkFailed(DROPPED.into()))
                } else {
                    result
                };
                self.finish(outer, result, now);
            }
            Event::PeerUp { peer } | Event::PeerDown { peer, .. } => self.hold(peer, e, now),
        }
    }

    /// Applies partitions that changed: fails accesses to newly blocked peers, lets
    /// parked items of unblocked peers go.
    fn sweep(&mut self, now: Instant) {
        self.refresh_config();
        if !self.config.blocked_in.is_empty() {
            let mut cut: Vec<Token> = self
                .outstanding
                .iter()
                .filter(|(_, (p, _))| self.config.blocked_in.contains(p))
                .map(|(t, _)| *t)
                .collect();
            cut.sort_unstable();
            for t in cut {
                self.finish(t, Err(AccessError::LinkFailed(PARTITIONED.into())), now);
            }
        }
        let free_in: Vec<PeerId> =
            self.parked_in.keys().filter(|p| !self.config.blocked_in.contains(p)).copied().collect();
        for p in free_in {
            for e in self.parked_in.remove(&p).unwrap_or_default() {
                self.hold(p, e, now);
            }
        }
        let free_out: Vec<PeerId> =
            self.parked_out.keys().filter(|p| !self.config.blocked_out.contains(p)).copied().collect();
        for p in free_out {
            for a in self.parked_out.remove(&p).unwrap_or_default() {
                let r = a.result.as_deref().map_err(|e| e.as_slice());
                // If the link is down now, the peer's access failed with it already.
                let _ = match a.kind {
                    Kind::Write => self.inner.complete_write(p, a.token, r),
                    Kind::Read => self.inner.complete_read(p, a.token, r),
                };
            }
        }
    }

    /// Moves due events to `events`; returns how many.
    fn release(&mut self, now: Instant, events: &mut Vec<Event>) -> usize {
        let mut n = 0;
        while let Some(entry) = self.held.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let e = entry.remove();
            if let Event::WriteArrived { from, token, .. } = &e {
                // Permission is checked on arrival; held this long, check again.
                if self.inner.permission_holder() != Some(*from) {
                    let _ = self.inner.complete_write(*from, *token, Err(&[]));
                    continue;
                }
            }
            events.push(e);
            n += 1;
        }
        n
    }
}

impl<T: Transport> Transport for Faulty<T> {
    fn local(&self) -> PeerId {
        self.inner.local()
    }

    fn peers(&self) -> Vec<PeerId> {
        self.inner.peers()
    }

    fn max_payload(&self) -> usize {
        self.inner.max_payload()
    }

    fn send(&mut self, to: PeerId, payload: &[u8]) -> Result<(), SendError> {
        self.check(to, payload.len())?;
        self.refresh_config();
        if self.config.blocked_out.contains(&to) || self.rng.chance(self.config.drop_messages) {
            return Ok(());
        }
        self.inner.send(to, payload)
    }

    fn write(&mut self, to: PeerId, offset: u64, data: &[u8]) -> Result<Token, SendError> {
        self.issue(to, Kind::Write, data.len(), |t| t.write(to, offset, data))
    }

    fn read(&mut self, from: PeerId, offset: u64, len: u32) -> Result<Token, SendError> {
        // `len` is not checked against max_payload here: that is the backend's call.
        self.issue(from, Kind::Read, 0, |t| t.read(from, offset, len))
    }

    fn complete_write(&mut self, from: PeerId, token: Token, result: Result<&[u8], &[u8]>) -> Result<(), SendError> {
        self.answer(Kind::Write, from, token, result)
    }

    fn complete_read(&mut self, from: PeerId, token: Token, result: Result<&[u8], &[u8]>) -> Result<(), SendError> {
        self.answer(Kind::Read, from, token, result)
    }

    fn grant(&mut self, peer: PeerId) {
        self.inner.grant(peer)
    }

    fn revoke(&mut self, peer: PeerId) {
        self.inner.revoke(peer)
    }

    fn permission_holder(&self) -> Option<PeerId> {
        self.inner.permission_holder()
    }

    fn send_queued(&mut self) {
        self.inner.send_queued()
    }

    fn poll(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> std::io::Result<()> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut got = Vec::new();
        loop {
            let now = Instant::now();
            self.sweep(now);
            // Sleep no longer than the caller allows and no longer than the next
            // held event needs.
            let mut wait = deadline.map(|d| d.saturating_duration_since(now));
            if let Some(((at, _), _)) = self.held.first_key_value() {
                let until = at.saturating_duration_since(now);
                wait = Some(wait.map_or(until, |w| w.min(until)));
            }
            got.clear();
            self.inner.poll(&mut got, wait)?;
            let now = Instant::now();
            for e in got.drain(..) {
                self.admit(e, now);
            }
            self.sweep(now);
            let n = self.release(now, events);
            if n > 0 || self.waker.woken.swap(false, Ordering::SeqCst) {
                return Ok(());
            }
            if deadline.is_some_and(|d| now >= d) {
                return Ok(());
            }
        }
    }

    fn waker(&self) -> Arc<dyn Wake> {
        self.waker.clone()
    }

    fn update_peers(
        &mut self,
        peers: &std::collections::BTreeMap<PeerId, crate::PeerSpec>,
    ) -> Result<(), crate::PeersError> {
        self.inner.update_peers(peers)
    }

    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn dynamic_peers(&self) -> bool {
        self.inner.dynamic_peers()
    }
}
