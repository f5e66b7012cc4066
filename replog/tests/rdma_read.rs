//! Log-tail reads over RDMA between two [`RdmaAgent`]s on one RDMA device: a read of a
//! range the peer's accepted-entries mirror holds is answered by one-sided RDMA READs
//! (the serving agent sees nothing), with exactly the bytes the side channel would carry;
//! a range older than the ring falls back to the side channel, which the serving side
//! answers. Prints the latency of both paths measured in the same run.
//!
//! Needs an RDMA device with an active port (`hw-setup/rxe-vm.sh run -- <this test
//! binary>`); without one it prints why and passes, unless `REPLOG_REQUIRE_ALL=1`.
#![cfg(feature = "rdma")]

use paxos::{Ballot, Command, Entry, ReadRequest, ReadResult, Slot, Value};
use replog::rdma_agent::RdmaAgent;
use replog::rdma_mirror::{MirrorError, MirrorMemory, Publisher, HEADER_LEN};
use replog::wire;
use std::time::{Duration, Instant};
use transport::{Event, PeerId, SendError, Token, Transport};

const WAIT: Duration = Duration::from_secs(60);
const STRIDE: usize = 256;
const RECORDS: usize = 16;
const BUDGET: u32 = 64 << 10;

use transport::rdma::testing::{self, device_or_skip as rdma_available};

fn open(ids: &[PeerId]) -> Vec<RdmaAgent> {
    let (eps, _) = testing::open_cluster(78, ids, |c| c.mirror_len = HEADER_LEN + RECORDS * STRIDE);
    eps.into_iter().map(|t| RdmaAgent::new(t, 64 << 10).and_then(|a| a.with_mirror(STRIDE)).expect("agent")).collect()
}

struct Mirror<'a>(&'a mut RdmaAgent);

impl MirrorMemory for Mirror<'_> {
    fn mirror_len(&self) -> usize {
        self.0.inner().mirror_len()
    }
    fn put(&mut self, offset: usize, data: &[u8]) -> Result<(), MirrorError> {
        self.0.put_mirror(offset, data).map_err(|why| MirrorError::Write { offset, why })
    }
}

fn entry(slot: Slot) -> Entry {
    let cmd = Command { client: 5, seq: slot, payload: bytes::Bytes::from(format!("entry {slot}")) };
    Entry { slot, ballot: Ballot { round: 3, node: 1 }, value: Value::Batch(vec![cmd]) }
}

/// Polls both agents once, keeping what each reported.
fn pump(agents: &mut [RdmaAgent], inbox: &mut [Vec<Event>]) {
    for (a, q) in agents.iter_mut().zip(inbox.iter_mut()) {
        let mut ev = Vec::new();
        a.poll(&mut ev, Some(Duration::from_micros(100))).expect("poll");
        q.extend(ev);
    }
}

fn take(
    agents: &mut [RdmaAgent],
    inbox: &mut [Vec<Event>],
    at: usize,
    what: &str,
    pred: impl Fn(&Event) -> bool,
) -> Event {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(pos) = inbox[at].iter().position(&pred) {
            return inbox[at].remove(pos);
        }
        assert!(Instant::now() < deadline, "agent {at} waited {WAIT:?} for {what}; it has {:?}", inbox[at]);
        pump(agents, inbox);
    }
}

/// Issues a read of `from..` by agent 1 (index 1) from agent 0 (id 1); serves a
/// side-channel request on agent 0 from `log` if one arrives; returns the answer.
fn read(agents: &mut [RdmaAgent], inbox: &mut [Vec<Event>], log: &[Entry], from: Slot) -> Vec<u8> {
    let deadline = Instant::now() + WAIT;
    let token: Token = loop {
        match agents[1].read(1, from, BUDGET) {
            Ok(t) => break t,
            Err(SendError::LinkDown(_) | SendError::Backpressure(_)) if Instant::now() < deadline => {
                pump(agents, inbox)
            }
            Err(e) => panic!("read not issued: {e}"),
        }
    };
    loop {
        if let Some(pos) = inbox[1].iter().position(|e| matches!(e, Event::ReadDone { token: t, .. } if *t == token)) {
            match inbox[1].remove(pos) {
                Event::ReadDone { result: Ok(b), .. } => return b.to_vec(),
                other => panic!("read from {from} failed: {other:?}"),
            }
        }
        if let Some(pos) = inbox[0].iter().position(|e| matches!(e, Event::ReadArrived { .. })) {
            if let Event::ReadArrived { from: reader, token, offset, .. } = inbox[0].remove(pos) {
                // The serving side's CPU answers, as its core would.
                let res = answer(log, offset);
                let mut out = Vec::new();
                wire::encode_read_result(&res, BUDGET as usize, &mut out);
                agents[0].complete_read(reader, token, Ok(&out)).expect("answer the read");
            }
        }
        assert!(Instant::now() < deadline, "read from {from} not answered within {WAIT:?}");
        pump(agents, inbox);
    }
}

fn answer(log: &[Entry], from: Slot) -> ReadResult {
    let to = log.last().map_or(0, |e| e.slot);
    let entries = log.iter().filter(|e| e.slot >= from).cloned().collect();
    ReadResult { ballot: Ballot::ZERO, from, to, entries }
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort_unstable();
    v.get(((v.len() as f64 - 1.0) * p) as usize).copied().unwrap_or_default()
}

#[test]
fn log_tail_reads_go_by_rdma_read_and_fall_back_when_older_than_the_ring() {
    if !rdma_available("log_tail_reads_go_by_rdma_read_and_fall_back_when_older_than_the_ring") {
        return;
    }
    let mut agents = open(&[1, 2]);
    let mut inbox = vec![Vec::new(), Vec::new()];
    for at in 0..2 {
        let peer = if at == 0 { 2 } else { 1 };
        take(&mut agents, &mut inbox, at, "PeerUp", |e| matches!(e, Event::PeerUp { peer: p } if *p == peer));
    }
    // Agent 1 publishes slots 1..=40 (slot 7 accepted nothing): its 16-record ring keeps 25..=40.
    let log: Vec<Entry> = (1..=40).filter(|&s| s != 7).map(entry).collect();
    let mut p = Publisher::new(agents[0].inner().mirror_len(), STRIDE).expect("geometry");
    assert_eq!(p.publish(&mut Mirror(&mut agents[0]), 0, 40, &log).map_err(|e| e.to_string()), Ok(true));
    assert_eq!((p.header().low, p.header().high), (25, 40));

    // In the ring: RDMA READ, the same bytes as the side channel's answer, no CPU there.
    let got = read(&mut agents, &mut inbox, &log, 33);
    let q = ReadRequest { ballot: Ballot::ZERO, from: 33, to: 40 };
    let res = wire::decode_read_result(&q, &got).map(|r| (r.to, r.entries)).map_err(|e| e.to_string());
    assert_eq!(res, Ok((40, log.iter().filter(|e| e.slot >= 33).cloned().collect::<Vec<_>>())));
    let mut want = Vec::new();
    wire::encode_read_result(&answer(&log, 33), BUDGET as usize, &mut want);
    assert_eq!(got, want, "the mirror answers exactly what the side channel would");
    let paths = agents[1].read_paths();
    assert_eq!((paths.one_sided, paths.side_channel, paths.fallbacks), (1, 0, 0));
    assert!(!inbox[0].iter().any(|e| matches!(e, Event::ReadArrived { .. })), "the serving side saw the read");

    // Older than the ring (slot 5): the side channel answers, and it is counted as a fallback.
    let got = read(&mut agents, &mut inbox, &log, 5);
    let q = ReadRequest { ballot: Ballot::ZERO, from: 5, to: 40 };
    let res = wire::decode_read_result(&q, &got).map(|r| r.entries.len()).map_err(|e| e.to_string());
    assert_eq!(res, Ok(35), "slots 5..=40 but 7");
    let paths = agents[1].read_paths();
    assert_eq!((paths.one_sided, paths.side_channel, paths.fallbacks), (1, 1, 1));
    // Not published yet (slot 41): the side channel too.
    let _ = read(&mut agents, &mut inbox, &log, 41);
    assert_eq!(agents[1].read_paths().fallbacks, 2);

    // A rewrite (a new ballot for 38..=40) is seen by the next read.
    let mut log2 = log.clone();
    for e in log2.iter_mut().filter(|e| e.slot >= 38) {
        e.ballot = Ballot { round: 4, node: 2 };
    }
    let changed: Vec<Entry> = log2.iter().filter(|e| e.slot >= 38).cloned().collect();
    assert_eq!(p.publish(&mut Mirror(&mut agents[0]), 0, 40, &changed).map_err(|e| e.to_string()), Ok(true));
    let got = read(&mut agents, &mut inbox, &log2, 36);
    let q = ReadRequest { ballot: Ballot::ZERO, from: 36, to: 40 };
    let res = wire::decode_read_result(&q, &got).map(|r| r.entries).map_err(|e| e.to_string());
    assert_eq!(res, Ok(log2.iter().filter(|e| e.slot >= 36).cloned().collect::<Vec<_>>()));

    // Latency of both paths, same run, same reads (8 slots of ~60 bytes).
    let mut rdma = Vec::new();
    let mut side = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        let _ = read(&mut agents, &mut inbox, &log2, 33);
        rdma.push(t.elapsed());
        let t = Instant::now();
        let _ = read(&mut agents, &mut inbox, &log2, 20);
        side.push(t.elapsed());
    }
    // The side channel alone (mirror reads off): the path the RDMA READs replace.
    agents[1].set_mirror_reads(false);
    let mut plain = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        let _ = read(&mut agents, &mut inbox, &log2, 33);
        plain.push(t.elapsed());
    }
    let paths = agents[1].read_paths();
    assert_eq!(paths.one_sided, 1 + 1 + 200);
    assert_eq!(paths.side_channel, 2 + 200 + 200);
    assert_eq!(paths.fallbacks, 2 + 200, "reads with mirror reads off are not fallbacks");
    println!(
        "rdma: log-tail read latency, 200 reads each, same run: rdma_read (slots 33..=40) p50 {:?} p99 {:?}; \
         side_channel only (slots 33..=40, peer CPU) p50 {:?} p99 {:?}; fallback (slot 20, older than the ring: \
         mirror read, then side channel) p50 {:?} p99 {:?}; counts {paths:?}",
        percentile(&mut rdma, 0.5),
        percentile(&mut rdma, 0.99),
        percentile(&mut plain, 0.5),
        percentile(&mut plain, 0.99),
        percentile(&mut side, 0.5),
        percentile(&mut side, 0.99),
    );
}
