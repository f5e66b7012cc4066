//! Acceptance by landing between two [`RdmaAgent`]s on one RDMA device, with the
//! follower's CPU kept off the path (it is not polled while the writer writes):
//!
//! - [`Landing::Write`]: each write completes when its RDMA WRITE completed; the
//!   follower's fence then revokes the writer and hands over, in order, exactly the
//!   cells that landed; a write after the fence is refused at the NIC (`Denied`); the
//!   follower's acknowledgements of the drained cells only free them (no second
//!   completion).
//! - [`Landing::ReadAfterWrite`]: each write completes at the RDMA READ posted after it;
//!   a fence that finds nothing new, then a re-grant of the same writer, keeps the
//!   stream going where it was (the next cell is taken by polling).
//!
//! - A stream restart (a denied write) before the follower took cells that completed at
//!   landing: they are written again, first in the new epoch, so the follower's core
//!   still gets them.
//! - A follower that stops before its CPU took cells that completed at landing, with
//!   its region in a file kept across the restart (as on device-dax): reopened, it hands
//!   them to its core in order; a follower with a fresh data directory discards them.
//! - The same with the untaken cells wrapped round a small ring, and the writer gone
//!   right after its first replay landed: the new epoch went on after the old one and
//!   kept off its untaken cells, so the follower still finds every one of them, then the
//!   new epoch by the stream pointer.
//!
//! Needs an RDMA device with an active port (`hw-setup/rxe-vm.sh run -- <this test
//! binary>`); without one it prints why and passes, unless `REPLOG_REQUIRE_ALL=1`.
#![cfg(feature = "rdma")]

use replog::rdma_agent::{Landing, RdmaAgent};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use transport::rdma::testing::{self, device_or_skip as rdma_available};
use transport::{AccessError, Event, PeerId, SendError, Token, Transport};

const WAIT: Duration = Duration::from_secs(60);
/// Follower (index 0) and writer (index 1).
const FOLLOWER: PeerId = 1;
const WRITER: PeerId = 2;

/// Bytes of one cell of the agents' rings.
const CELL: usize = 16 << 10;

fn open(landing: Landing) -> Vec<RdmaAgent> {
    open_ring(landing, None)
}

/// [`open`], with rings of `cells` cells if given (else the test region's).
fn open_ring(landing: Landing, cells: Option<usize>) -> Vec<RdmaAgent> {
    let (eps, _) = testing::open_cluster(79, &[FOLLOWER, WRITER], |c| {
        c.max_payload = 64 << 10;
        if let Some(n) = cells {
            c.region_len = replog::rdma_region::RING_BASE + n * CELL;
        }
    });
    eps.into_iter().map(|t| RdmaAgent::new(t, CELL).expect("agent").with_landing(landing)).collect()
}

/// Polls the agents at `which` once each, keeping what each reported.
fn pump(agents: &mut [RdmaAgent], inbox: &mut [Vec<Event>], which: &[usize]) {
    for &i in which {
        let mut ev = Vec::new();
        agents[i].poll(&mut ev, Some(Duration::from_micros(100))).expect("poll");
        inbox[i].extend(ev);
    }
}

/// Both agents see each other's link up.
fn connect(agents: &mut [RdmaAgent], inbox: &mut [Vec<Event>]) {
    let deadline = Instant::now() + WAIT;
    for (at, peer) in [(0, WRITER), (1, FOLLOWER)] {
        while !inbox[at].iter().any(|e| matches!(e, Event::PeerUp { peer: p } if *p == peer)) {
            assert!(Instant::now() < deadline, "agent {at} saw no PeerUp from {peer} within {WAIT:?}");
            pump(agents, inbox, &[0, 1]);
        }
        inbox[at].clear();
    }
}

/// A write's bytes: the ballot round first (the agent opens its stream's epoch by it).
fn cell(round: u64, i: u64) -> Vec<u8> {
    let mut v = round.to_le_bytes().to_vec();
    v.extend_from_slice(format!("cell {i} of round {round}").as_bytes());
    v
}

/// Issues a write of the writer, retrying while the link is being set up or full.
fn write(agents: &mut [RdmaAgent], inbox: &mut [Vec<Event>], first: u64, data: &[u8]) -> Token {
    write_pumping(agents, inbox, first, data, &[1])
}

/// [`write`], polling the agents at `which` between tries.
fn write_pumping(
    agents: &mut [RdmaAgent],
    inbox: &mut [Vec<Event>],
    first: u64,
    data: &[u8],
    which: &[usize],
) -> Token {
    let deadline = Instant::now() + WAIT;
    loop {
        match agents[1].write(FOLLOWER, first, data) {
            Ok(t) => return t,
            Err(SendError::LinkDown(_) | SendError::Backpressure(_)) if Instant::now() < deadline => {
                pump(agents, inbox, which)
            }
            Err(e) => panic!("write not issued: {e}"),
        }
    }
}

/// The writer's completions of `tokens`, polling only the writer (the follower's CPU
/// does nothing meanwhile).
fn completions(
    agents: &mut [RdmaAgent],
    inbox: &mut [Vec<Event>],
    tokens: &[Token],
) -> HashMap<Token, Result<(), String>> {
    let deadline = Instant::now() + WAIT;
    let mut done = HashMap::new();
    while done.len() < tokens.len() {
        assert!(Instant::now() < deadline, "writes not completed within {WAIT:?}: {done:?}");
        pump(agents, inbox, &[1]);
        for e in std::mem::take(&mut inbox[1]) {
            match e {
                Event::WriteDone { token, result, .. } if tokens.contains(&token) => {
                    let r = result.map(|_| ()).map_err(|e| match e {
                        AccessError::Denied { .. } => "denied".to_string(),
                        AccessError::LinkFailed(why) => why,
                    });
                    assert!(done.insert(token, r).is_none(), "write {token} completed twice");
                }
                other => inbox[1].push(other),
            }
        }
    }
    done
}

/// Opens the follower and the writer under `landing`, connects them, grants the writer,
/// and writes `n` cells (`cell(round, i)` at first slot `first + i`) with the follower not
/// polled: each must complete at landing. The agents, their inboxes and the tokens.
fn landed_writes(landing: Landing, first: u64, n: u64, round: u64) -> (Vec<RdmaAgent>, Vec<Vec<Event>>, Vec<Token>) {
    let mut agents = open(landing);
    let mut inbox = vec![Vec::new(), Vec::new()];
    connect(&mut agents, &mut inbox);
    agents[0].grant(WRITER);
    let tokens: Vec<Token> = (0..n).map(|i| write(&mut agents, &mut inbox, first + i, &cell(round, i))).collect();
    let done = completions(&mut agents, &mut inbox, &tokens);
    assert!(done.values().all(|r| r.is_ok()), "{done:?}");
    (agents, inbox, tokens)
}

#[test]
fn writes_complete_at_landing_and_a_fence_hands_over_what_landed() {
    if !rdma_available("rdma_landing") {
        return;
    }
    // Three writes, the follower not polled: they complete at landing.
    let (mut agents, mut inbox, tokens) = landed_writes(Landing::Write, 10, 3, 7);
    assert!(agents[0].completes_on_landing() && agents[1].completes_on_landing());
    let datas: Vec<Vec<u8>> = (0..3).map(|i| cell(7, i)).collect();
    let s = agents[1].ack_stats();
    assert_eq!((s.landed, s.taken_rdma, s.taken_side), (3, 0, 0), "{s:?}");

    // The fence: revoked, and the three cells handed over in order.
    let mut drained = Vec::new();
    agents[0].fence(WRITER, &mut drained).expect("fence");
    assert_eq!(agents[0].permission_holder(), None);
    let mut arrived = Vec::new();
    for (i, e) in drained.into_iter().enumerate() {
        match e {
            Event::WriteArrived { from, token, offset, data } => {
                assert_eq!((from, offset), (WRITER, 10 + i as u64));
                assert_eq!(data.as_ref(), datas[i].as_slice(), "cell {i} handed over whole");
                arrived.push(token);
            }
            other => panic!("the drain reported {other:?}"),
        }
    }
    assert_eq!(arrived.len(), 3, "the fence must hand over every cell that landed");
    assert_eq!(agents[0].ack_stats().drained, 3);

    // A write after the fence is refused at the follower's NIC.
    let late = write(&mut agents, &mut inbox, 13, &cell(7, 3));
    let done = completions(&mut agents, &mut inbox, &[late]);
    assert_eq!(done.get(&late), Some(&Err("denied".to_string())), "a fenced writer's write must be denied");

    // The follower's core answers the drained cells: that only frees them at the writer
    // (its stream restarted after the denial anyway); nothing completes twice.
    for t in arrived {
        agents[0].complete_write(WRITER, t, Ok(&[])).expect("acknowledge");
    }
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        pump(&mut agents, &mut inbox, &[0, 1]);
    }
    let again: Vec<&Event> = inbox[1]
        .iter()
        .filter(|e| matches!(e, Event::WriteDone { token, .. } if tokens.contains(token) || *token == late))
        .collect();
    assert!(again.is_empty(), "writes completed twice: {again:?}");
    assert_eq!(agents[1].ack_stats().landed, 3);
}

#[test]
fn read_after_write_completes_writes_and_a_regrant_continues_the_stream() {
    if !rdma_available("rdma_landing") {
        return;
    }
    let (mut agents, mut inbox, _) = landed_writes(Landing::ReadAfterWrite, 20, 2, 9);
    assert_eq!(agents[1].ack_stats().landed, 2);

    // The follower takes them by polling and answers.
    assert_eq!(take_and_answer(&mut agents, &mut inbox, 2), vec![20, 21]);

    // A fence with nothing new to hand over, then the same writer granted again: its
    // stream goes on where it was.
    let mut drained = Vec::new();
    agents[0].fence(WRITER, &mut drained).expect("fence");
    assert!(drained.is_empty(), "nothing new landed: {drained:?}");
    agents[0].grant(WRITER);
    let next = write(&mut agents, &mut inbox, 22, &cell(9, 2));
    let done = completions(&mut agents, &mut inbox, &[next]);
    assert_eq!(done.get(&next), Some(&Ok(())));
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(Instant::now() < deadline, "the re-granted writer's next cell was not taken");
        pump(&mut agents, &mut inbox, &[0, 1]);
        if inbox[0].iter().any(|e| matches!(e, Event::WriteArrived { offset: 22, .. })) {
            break;
        }
    }
    assert_eq!(agents[1].ack_stats().landed, 3);
}

#[test]
fn cells_completed_at_landing_are_written_again_when_the_stream_restarts() {
    if !rdma_available("rdma_landing") {
        return;
    }
    // Three writes complete at landing; the follower does not take them.
    let (mut agents, mut inbox, _) = landed_writes(Landing::Write, 10, 3, 5);

    // A plain revocation (no drain), then a write: denied at the NIC, the stream restarts.
    agents[0].revoke(WRITER);
    let denied = write(&mut agents, &mut inbox, 13, &cell(5, 3));
    let done = completions(&mut agents, &mut inbox, &[denied]);
    assert_eq!(done.get(&denied), Some(&Err("denied".to_string())));

    // Granted again: the next write goes after the three, written again in the new epoch.
    agents[0].grant(WRITER);
    let next = write_pumping(&mut agents, &mut inbox, 14, &cell(5, 4), &[0, 1]);
    let deadline = Instant::now() + WAIT;
    let mut offsets = Vec::new();
    while offsets.last() != Some(&14) {
        assert!(Instant::now() < deadline, "the follower took only {offsets:?}");
        pump(&mut agents, &mut inbox, &[0, 1]);
        for e in std::mem::take(&mut inbox[0]) {
            if let Event::WriteArrived { token, offset, .. } = e {
                offsets.push(offset);
                agents[0].complete_write(WRITER, token, Ok(&[])).expect("acknowledge");
            }
        }
    }
    // The old epoch's cells may have been taken too before the new epoch's first landed.
    assert!(offsets.ends_with(&[10, 11, 12, 14]), "the follower took {offsets:?}");
    let s = agents[1].ack_stats();
    assert_eq!(s.replayed, 3, "{s:?}");
    let done = completions(&mut agents, &mut inbox, &[next]);
    assert_eq!(done.get(&next), Some(&Ok(())));
    assert_eq!(agents[1].ack_stats().landed, 4);
}

/// The follower takes `n` cells by polling and answers each (the writer polled too: it
/// posts its writes as it goes); the writer then has a moment to see the answers. Their
/// first slots.
fn take_and_answer(agents: &mut [RdmaAgent], inbox: &mut [Vec<Event>], n: usize) -> Vec<u64> {
    let deadline = Instant::now() + WAIT;
    let mut taken = Vec::new();
    while taken.len() < n {
        assert!(Instant::now() < deadline, "the follower took only {taken:?}");
        pump(agents, inbox, &[0, 1]);
        for e in std::mem::take(&mut inbox[0]) {
            if let Event::WriteArrived { token, offset, .. } = e {
                taken.push(offset);
                agents[0].complete_write(WRITER, token, Ok(&[])).expect("answer");
            }
        }
    }
    let until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < until {
        pump(agents, inbox, &[0, 1]);
    }
    inbox[0].clear();
    taken
}

#[test]
fn a_new_epoch_keeps_off_the_untaken_cells_of_the_old_one_even_if_its_writer_dies() {
    if !rdma_available("rdma_landing") {
        return;
    }
    // A ring of 8 cells. Four cells taken and answered: the ring's positions 0..=3.
    let mut agents = open_ring(Landing::Write, Some(8));
    let mut inbox = vec![Vec::new(), Vec::new()];
    connect(&mut agents, &mut inbox);
    agents[0].grant(WRITER);
    for i in 0..4 {
        write(&mut agents, &mut inbox, 10 + i, &cell(5, i));
    }
    assert_eq!(take_and_answer(&mut agents, &mut inbox, 4), vec![10, 11, 12, 13]);

    // Five more complete at landing, the follower not polled: positions 4..=8, the last
    // in cell 0 (wrapped round).
    let tokens: Vec<Token> = (4..9).map(|i| write(&mut agents, &mut inbox, 10 + i, &cell(5, i))).collect();
    let done = completions(&mut agents, &mut inbox, &tokens);
    assert!(done.values().all(|r| r.is_ok()), "{done:?}");

    // Revoked without a drain: the next write is denied, the stream restarts.
    agents[0].revoke(WRITER);
    let denied = write(&mut agents, &mut inbox, 19, &cell(5, 9));
    let done = completions(&mut agents, &mut inbox, &[denied]);
    assert_eq!(done.get(&denied), Some(&Err("denied".to_string())));

    // The writer's queue pair went to error: the link is renewed (both polled; the
    // follower takes nothing meanwhile, no one holds its permission).
    let deadline = Instant::now() + WAIT;
    while !inbox[1].iter().any(|e| matches!(e, Event::PeerUp { peer: FOLLOWER })) {
        assert!(Instant::now() < deadline, "the writer's link was not renewed within {WAIT:?}");
        pump(&mut agents, &mut inbox, &[0, 1]);
    }
    assert!(!inbox[0].iter().any(|e| matches!(e, Event::WriteArrived { .. })), "no holder, nothing taken");

    // Granted again: the writer replays the five in the new epoch, as far as the window
    // lets it while the old epoch's cells are not known taken (a restart that started
    // the new epoch at cell 0 would overwrite cell 0, the fifth, with the first replay).
    agents[0].grant(WRITER);
    let deadline = Instant::now() + WAIT;
    while agents[1].ack_stats().replayed == 0 {
        assert!(Instant::now() < deadline, "nothing replayed within {WAIT:?}");
        pump(&mut agents, &mut inbox, &[1]);
    }
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        pump(&mut agents, &mut inbox, &[1]);
    }
    let replayed = agents[1].ack_stats().replayed;
    assert!(replayed < 5, "the window must hold replays off the old epoch's untaken cells: {replayed} replayed");

    // The writer dies. The follower's fence takes what landed: every one of the five
    // from the old epoch, then the new epoch (found by its pointer) with its replays.
    drop(agents.pop());
    let mut drained = Vec::new();
    agents[0].fence(WRITER, &mut drained).expect("fence");
    let offsets: Vec<u64> = drained
        .iter()
        .filter_map(|e| match e {
            Event::WriteArrived { offset, .. } => Some(*offset),
            _ => None,
        })
        .collect();
    let expected: Vec<u64> = (14..19).chain(14..14 + replayed).collect();
    assert_eq!(offsets, expected, "every cell the writer counted, then the replays");
    println!("rdma_landing: wrapped ring: {replayed} replayed before the writer died, follower took {offsets:?}");
}

/// Opens the follower alone on the region in `path`, as a restarted replica does, and
/// recovers what landed there (`fresh`: as with a new data directory).
fn reopen_follower(path: &std::path::Path, fresh: bool) -> (RdmaAgent, Vec<Event>) {
    let (eps, _) = testing::open_cluster(79, &[FOLLOWER], |c| {
        c.max_payload = 64 << 10;
        c.region_path = Some(path.to_path_buf());
    });
    let t = eps.into_iter().next().expect("one endpoint");
    let mut agent = RdmaAgent::new(t, CELL).expect("agent").with_landing(Landing::Write);
    let mut events = Vec::new();
    agent.recover_landed(fresh, &mut events).expect("recover");
    (agent, events)
}

#[test]
fn a_restarted_follower_recovers_the_cells_that_landed_in_its_persistent_region() {
    if !rdma_available("rdma_landing") {
        return;
    }
    // The follower's region in a file (the VM's /tmp is a tmpfs, which registers).
    let path = std::env::temp_dir().join(format!("replog-landing-region-{}", std::process::id()));
    std::fs::write(&path, b"").expect("create the region file");
    let (eps, _) = testing::open_cluster(79, &[FOLLOWER, WRITER], |c| {
        c.max_payload = 64 << 10;
        if c.local == FOLLOWER {
            c.region_path = Some(path.clone());
        }
    });
    let mut agents: Vec<RdmaAgent> =
        eps.into_iter().map(|t| RdmaAgent::new(t, CELL).expect("agent").with_landing(Landing::Write)).collect();
    let mut inbox = vec![Vec::new(), Vec::new()];
    connect(&mut agents, &mut inbox);
    agents[0].grant(WRITER);
    let tokens: Vec<Token> = (0..3).map(|i| write(&mut agents, &mut inbox, 30 + i, &cell(6, i))).collect();
    let done = completions(&mut agents, &mut inbox, &tokens);
    assert!(done.values().all(|r| r.is_ok()), "{done:?}");
    // Both stop; the follower's CPU never took the three cells.
    drop(agents);

    let (mut follower, recovered) = reopen_follower(&path, false);
    let mut got = Vec::new();
    for e in recovered {
        match e {
            Event::WriteArrived { from, token, offset, data } => {
                assert_eq!(from, WRITER);
                got.push((offset, data.to_vec()));
                // Answering a recovered cell sends nothing (its writer is gone).
                follower.complete_write(WRITER, token, Ok(&[])).expect("answer");
            }
            other => panic!("recovery reported {other:?}"),
        }
    }
    let want: Vec<(u64, Vec<u8>)> = (0..3).map(|i| (30 + i, cell(6, i))).collect();
    assert_eq!(got, want, "every cell that landed, whole and in order");
    assert_eq!(follower.ack_stats().recovered, 3);
    drop(follower);

    // A fresh data directory: the region's cells are from an earlier life, discarded.
    let (follower, recovered) = reopen_follower(&path, true);
    assert!(recovered.is_empty(), "{recovered:?}");
    assert_eq!(follower.ack_stats().discarded, 3);
    drop(follower);
    let (_, recovered) = reopen_follower(&path, false);
    assert!(recovered.is_empty(), "discarded cells must not come back: {recovered:?}");
    let _ = std::fs::remove_file(&path);
    println!("rdma_landing: restart: 3 cells recovered from the region file, then 3 discarded for a fresh start");
}
