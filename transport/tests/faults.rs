//! The fault-injection wrapper: conformance with no faults (and with delay only), then
//! drops, partitions and delays over the in-memory transport.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use transport::faults::{FaultControl, Faulty};
use transport::mem::{MemConfig, MemNetwork, MemTransport};
use transport::{conformance, AccessError, Event, PeerId, Transport};

fn wrapped(ids: &[PeerId], control: &FaultControl) -> Vec<Box<dyn Transport>> {
    MemNetwork::new()
        .cluster(ids)
        .into_iter()
        .enumerate()
        .map(|(i, t)| Box::new(Faulty::with_control(t, control.clone(), 7 + i as u64)) as Box<dyn Transport>)
        .collect()
}

#[test]
fn conformance_no_faults() {
    conformance::run_all(|ids| wrapped(ids, &FaultControl::new()));
}

#[test]
fn conformance_no_faults_over_a_trait_object() {
    let config = MemConfig { max_payload: 2048, queue_depth: 16 };
    conformance::run_all(|ids| {
        MemNetwork::with_config(config)
            .cluster(ids)
            .into_iter()
            .map(|t| {
                let inner: Box<dyn Transport> = Box::new(t);
                Box::new(Faulty::new(inner, 1)) as Box<dyn Transport>
            })
            .collect()
    });
}

#[test]
fn conformance_with_delay_only() {
    // Delay reorders nothing within a link and keeps every rule.
    let control = FaultControl::new();
    control.set_delay(Duration::ZERO, Duration::from_millis(2));
    conformance::run_all(|ids| wrapped(ids, &control));
}

/// Two endpoints, 1 wrapped (seed 42), 2 plain; link events drained.
fn pair() -> (Faulty<MemTransport>, MemTransport, FaultControl) {
    let net = MemNetwork::new();
    let mut ts = net.cluster(&[1, 2]);
    let mut b = ts.pop().unwrap();
    let mut a = Faulty::new(ts.pop().unwrap(), 42);
    drain(&mut a, Duration::ZERO);
    drain(&mut b, Duration::ZERO);
    let c = a.control();
    (a, b, c)
}

/// Everything `t` reports within `d` (polling in 5 ms steps, at least once).
fn drain(t: &mut impl Transport, d: Duration) -> Vec<Event> {
    let until = Instant::now() + d;
    let mut got = Vec::new();
    loop {
        t.poll(&mut got, Some(Duration::from_millis(5).min(d))).unwrap();
        if Instant::now() >= until {
            return got;
        }
    }
}

/// The numbers carried by the messages from `from`. A payload that is not a 4-byte
/// number is reported by an assertion naming it (decoding itself never panics).
fn messages(events: &[Event], from: PeerId) -> Vec<u32> {
    let mut numbers = Vec::new();
    let mut malformed = Vec::new();
    for e in events {
        if let Event::Message { from: f, payload } = e {
            if *f == from {
                match <[u8; 4]>::try_from(&payload[..]) {
                    Ok(b) => numbers.push(u32::from_le_bytes(b)),
                    Err(_) => malformed.push(payload.len()),
                }
            }
        }
    }
    assert!(malformed.is_empty(), "messages from {from} that are not 4-byte numbers (lengths {malformed:?})");
    numbers
}

fn send_numbered(t: &mut impl Transport, to: PeerId, range: std::ops::Range<u32>) {
    for i in range {
        t.send(to, &i.to_le_bytes()).unwrap();
    }
}

#[test]
fn drop_30_percent_of_messages() {
    let (mut a, mut b, c) = pair();
    c.set_drop_messages(0.3);
    send_numbered(&mut a, 2, 0..1000);
    let got = messages(&drain(&mut b, Duration::from_millis(50)), 1);
    assert!((550..=850).contains(&got.len()), "{} of 1000 arrived at 30% loss", got.len());
    assert!(got.windows(2).all(|w| w[0] < w[1]), "reordered or duplicated: {got:?}");
    // Replays: the same seed loses the same messages.
    let (mut a2, mut b2, c2) = pair();
    c2.set_drop_messages(0.3);
    send_numbered(&mut a2, 2, 0..1000);
    assert_eq!(messages(&drain(&mut b2, Duration::from_millis(50)), 1), got, "same seed, same losses");
    // And no loss once cleared.
    c.clear();
    send_numbered(&mut a, 2, 0..100);
    assert_eq!(messages(&drain(&mut b, Duration::from_millis(20)), 1), (0..100).collect::<Vec<_>>());
}

#[test]
fn symmetric_partition_blocks_both_ways_and_heals() {
    let (mut a, mut b, c) = pair();
    c.partition(2);
    send_numbered(&mut a, 2, 0..10);
    send_numbered(&mut b, 1, 0..10);
    assert_eq!(messages(&drain(&mut b, Duration::from_millis(20)), 1), Vec::<u32>::new());
    assert_eq!(messages(&drain(&mut a, Duration::from_millis(20)), 2), Vec::<u32>::new());
    c.heal(2);
    send_numbered(&mut a, 2, 10..20);
    send_numbered(&mut b, 1, 10..20);
    assert_eq!(messages(&drain(&mut b, Duration::from_millis(20)), 1), (10..20).collect::<Vec<_>>());
    assert_eq!(messages(&drain(&mut a, Duration::from_millis(20)), 2), (10..20).collect::<Vec<_>>());
}

#[test]
fn one_way_partitions() {
    let (mut a, mut b, c) = pair();
    c.block_outgoing(2);
    send_numbered(&mut a, 2, 0..5);
    send_numbered(&mut b, 1, 0..5);
    assert_eq!(messages(&drain(&mut b, Duration::from_millis(20)), 1), Vec::<u32>::new());
    assert_eq!(messages(&drain(&mut a, Duration::from_millis(20)), 2), (0..5).collect::<Vec<_>>());
    c.heal_all();
    c.block_incoming(2);
    send_numbered(&mut a, 2, 5..10);
    send_numbered(&mut b, 1, 5..10);
    assert_eq!(messages(&drain(&mut b, Duration::from_millis(20)), 1), (5..10).collect::<Vec<_>>());
    assert_eq!(messages(&drain(&mut a, Duration::from_millis(20)), 2), Vec::<u32>::new());
}

#[test]
fn delay_delays_but_keeps_order_and_wakes_in_time() {
    let (mut a, mut b, c) = pair();
    c.set_delay(Duration::from_millis(30), Duration::from_millis(60));
    let sent_at = Instant::now();
    send_numbered(&mut b, 1, 0..200);
    let mut got = Vec::new();
    // The first poll may block: it must return when the first held event is due, not
    // at the 5 s timeout.
    a.poll(&mut got, Some(Duration::from_secs(5))).unwrap();
    let first = sent_at.elapsed();
    assert!(!got.is_empty(), "poll returned without the held events");
    assert!(first >= Duration::from_millis(30), "released after {first:?}, before the minimum delay");
    assert!(first < Duration::from_millis(1000), "released only after {first:?}");
    while messages(&got, 2).len() < 200 {
        assert!(sent_at.elapsed() < Duration::from_secs(5), "only {} of 200 arrived", messages(&got, 2).len());
        a.poll(&mut got, Some(Duration::from_secs(1))).unwrap();
    }
    assert_eq!(messages(&got, 2), (0..200).collect::<Vec<_>>(), "delay reordered a link");
    assert_eq!(a.held(), 0);
}

#[test]
fn delay_holds_completions_and_a_blocked_poll_wakes_for_them() {
    let (mut a, mut b, c) = pair();
    c.set_delay(Duration::from_millis(20), Duration::from_millis(20));
    b.grant(1);
    let w = a.write(2, 0, b"x").unwrap();
    let arrived = drain(&mut b, Duration::from_millis(10));
    let Some(Event::WriteArrived { token, .. }) = arrived.first() else { panic!("{arrived:?}") };
    b.complete_write(1, *token, Ok(b"ack")).unwrap();
    let t = Instant::now();
    let mut got = Vec::new();
    a.poll(&mut got, None).unwrap();
    assert!(t.elapsed() < Duration::from_secs(1));
    assert_eq!(got, vec![Event::WriteDone { to: 2, token: w, result: Ok("ack".into()) }]);
}

/// Issues `n` writes from `a` to `b` (which grants `a`), answers every arrival, and
/// returns each token's completions.
fn writes_through(
    a: &mut Faulty<MemTransport>,
    b: &mut MemTransport,
    n: usize,
) -> HashMap<u64, Vec<Result<bytes::Bytes, AccessError>>> {
    b.grant(1);
    let mut issued = HashSet::new();
    let mut done: HashMap<u64, Vec<_>> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut i = 0u64;
    while done.len() < n {
        assert!(Instant::now() < deadline, "{} of {n} completed", done.len());
        while (i as usize) < n && issued.len() - done.len() < 100 {
            issued.insert(a.write(2, i, &i.to_le_bytes()).unwrap());
            i += 1;
        }
        for e in drain(b, Duration::ZERO) {
            if let Event::WriteArrived { from, token, offset, .. } = e {
                b.complete_write(from, token, Ok(&offset.to_be_bytes())).unwrap();
            }
        }
        for e in drain(a, Duration::ZERO) {
            if let Event::WriteDone { token, result, .. } = e {
                assert!(issued.contains(&token), "completion for unknown token {token}");
                done.entry(token).or_default().push(result);
            }
        }
    }
    for e in drain(a, Duration::from_millis(50)) {
        if let Event::WriteDone { token, result, .. } = e {
            done.entry(token).or_default().push(result);
        }
    }
    done
}

#[test]
fn dropped_accesses_complete_with_link_failed_exactly_once() {
    let (mut a, mut b, c) = pair();
    c.set_drop_accesses(0.3);
    let done = writes_through(&mut a, &mut b, 2000);
    assert_eq!(done.len(), 2000);
    let mut failed = 0;
    for (token, results) in &done {
        assert_eq!(results.len(), 1, "write {token} completed {} times: {results:?}", results.len());
        match &results[0] {
            Ok(_) => {}
            Err(AccessError::LinkFailed(why)) => {
                assert_eq!(why, "dropped by fault injection");
                failed += 1;
            }
            other => panic!("write {token}: {other:?}"),
        }
    }
    // Lost going out (30%) or coming back (30% of the rest): about 51%.
    assert!((800..=1250).contains(&failed), "{failed} of 2000 failed");
}

#[test]
fn partition_fails_accesses_in_flight_once_and_parks_the_peers() {
    let (mut a, mut b, c) = pair();
    b.grant(1);
    a.grant(2);
    // a's write reaches b, then the partition falls.
    let w = a.write(2, 0, b"in flight").unwrap();
    let arrived = drain(&mut b, Duration::from_millis(5));
    let Some(Event::WriteArrived { token, .. }) = arrived.first() else { panic!("{arrived:?}") };
    c.partition(2);
    let got = drain(&mut a, Duration::from_millis(20));
    assert_eq!(
        got,
        vec![Event::WriteDone {
            to: 2,
            token: w,
            result: Err(AccessError::LinkFailed("partitioned by fault injection".into())),
        }]
    );
    // The late answer is discarded; new accesses fail at once.
    b.complete_write(1, *token, Ok(b"late")).unwrap();
    let r = a.read(2, 0, 1).unwrap();
    let got = drain(&mut a, Duration::from_millis(20));
    assert_eq!(
        got,
        vec![Event::ReadDone {
            from: 2,
            token: r,
            result: Err(AccessError::LinkFailed("partitioned by fault injection".into())),
        }]
    );
    // b (not wrapped) writes to a: the arrival is parked until the partition heals.
    let bw = b.write(1, 8, b"from b").unwrap();
    assert_eq!(drain(&mut a, Duration::from_millis(20)), vec![]);
    c.heal(2);
    let got = drain(&mut a, Duration::from_millis(20));
    let [Event::WriteArrived { from: 2, token, offset: 8, .. }] = &got[..] else { panic!("{got:?}") };
    a.complete_write(2, *token, Ok(b"ok")).unwrap();
    let got = drain(&mut b, Duration::from_millis(20));
    assert_eq!(got, vec![Event::WriteDone { to: 1, token: bw, result: Ok("ok".into()) }]);
}

#[test]
fn a_parked_write_is_denied_if_permission_moved_meanwhile() {
    let (mut a, mut b, c) = pair();
    a.grant(2);
    c.block_incoming(2);
    let bw = b.write(1, 0, b"x").unwrap();
    assert_eq!(drain(&mut a, Duration::from_millis(10)), vec![]);
    a.revoke(2);
    c.heal_all();
    assert_eq!(drain(&mut a, Duration::from_millis(20)), vec![]);
    let got = drain(&mut b, Duration::from_millis(20));
    assert_eq!(
        got,
        vec![Event::WriteDone { to: 1, token: bw, result: Err(AccessError::Denied { detail: Default::default() }) }]
    );
}

#[test]
fn answers_to_a_blocked_peer_wait_for_the_heal() {
    let (mut a, mut b, c) = pair();
    let r = b.read(1, 0, 4).unwrap();
    let got = drain(&mut a, Duration::from_millis(10));
    let [Event::ReadArrived { token, .. }] = &got[..] else { panic!("{got:?}") };
    c.block_outgoing(2);
    a.complete_read(2, *token, Ok(b"data")).unwrap();
    assert_eq!(drain(&mut b, Duration::from_millis(20)), vec![]);
    c.heal(2);
    drain(&mut a, Duration::ZERO); // the wrapper flushes on poll
    assert_eq!(
        drain(&mut b, Duration::from_millis(20)),
        vec![Event::ReadDone { from: 1, token: r, result: Ok("data".into()) }]
    );
}

#[test]
fn waker_still_interrupts_and_control_changes_do_not_return_early() {
    let (mut a, _b, c) = pair();
    let w = a.waker();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(30));
        c.set_drop_messages(0.1); // must not make poll return
        std::thread::sleep(Duration::from_millis(70));
        w.wake();
    });
    let start = Instant::now();
    let mut got = Vec::new();
    a.poll(&mut got, Some(Duration::from_secs(10))).unwrap();
    let took = start.elapsed();
    t.join().unwrap();
    assert!(took >= Duration::from_millis(90) && took < Duration::from_secs(2), "{took:?}");
    assert!(got.is_empty());
}
