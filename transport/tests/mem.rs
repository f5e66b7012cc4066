//! The in-memory transport: the conformance suite, and what only it can show (link
//! failures on demand, backpressure, restarts).

use std::time::{Duration, Instant};
use transport::mem::{MemConfig, MemNetwork, MemTransport};
use transport::{conformance, AccessError, Event, PeerId, SendError, Transport};

fn boxed(ts: Vec<MemTransport>) -> Vec<Box<dyn Transport>> {
    ts.into_iter().map(|t| Box::new(t) as Box<dyn Transport>).collect()
}

#[test]
fn conformance_default_limits() {
    conformance::run_all(|ids| boxed(MemNetwork::new().cluster(ids)));
}

#[test]
fn conformance_small_limits() {
    // A tiny queue makes backpressure part of every check.
    let config = MemConfig { max_payload: 4096, queue_depth: 8 };
    conformance::run_all(|ids| boxed(MemNetwork::with_config(config).cluster(ids)));
}

/// Polls `t` until `pred` matches an event (at most 5 s), returning it.
fn wait(t: &mut impl Transport, what: &str, mut pred: impl FnMut(&Event) -> bool) -> Event {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    loop {
        if let Some(i) = got.iter().position(&mut pred) {
            return got.remove(i);
        }
        assert!(Instant::now() < deadline, "waited for {what}; got {got:?}");
        t.poll(&mut got, Some(Duration::from_millis(10))).unwrap();
    }
}

fn drain(t: &mut impl Transport) -> Vec<Event> {
    let mut got = Vec::new();
    t.poll(&mut got, Some(Duration::ZERO)).unwrap();
    got
}

#[test]
fn peer_up_at_creation_and_down_on_close() {
    let net = MemNetwork::new();
    let mut a = net.endpoint(1, &[2]);
    assert_eq!(drain(&mut a), vec![], "no peer yet");
    assert_eq!(a.send(2, b"x"), Err(SendError::LinkDown(2)));
    let mut b = net.endpoint(2, &[1]);
    wait(&mut a, "PeerUp 2", |e| *e == Event::PeerUp { peer: 2 });
    wait(&mut b, "PeerUp 1", |e| *e == Event::PeerUp { peer: 1 });
    drop(b);
    wait(&mut a, "PeerDown 2", |e| matches!(e, Event::PeerDown { peer: 2, .. }));
    // A restart: the id can be opened again, links come back up.
    let _b = net.endpoint(2, &[1]);
    wait(&mut a, "PeerUp 2 again", |e| *e == Event::PeerUp { peer: 2 });
}

#[test]
fn closing_the_target_fails_accesses_in_flight_once() {
    let net = MemNetwork::new();
    let mut ts = net.cluster(&[1, 2]);
    let mut b = ts.pop().unwrap();
    let mut a = ts.pop().unwrap();
    b.grant(1);
    let w = a.write(2, 0, b"data").unwrap();
    let r = a.read(2, 0, 4).unwrap();
    // b sees the write but does not answer it; the read is still queued.
    wait(&mut b, "WriteArrived", |e| matches!(e, Event::WriteArrived { .. }));
    b.close();
    assert_eq!(b.send(1, b"x"), Err(SendError::Closed));
    assert!(b.poll(&mut Vec::new(), Some(Duration::ZERO)).is_err());
    let mut done = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while done.len() < 3 && Instant::now() < deadline {
        a.poll(&mut done, Some(Duration::from_millis(10))).unwrap();
        done.retain(|e| !matches!(e, Event::PeerUp { .. }));
    }
    assert!(
        matches!(
            &done[..],
            [
                Event::WriteDone { token: t1, result: Err(AccessError::LinkFailed(_)), .. },
                Event::ReadDone { token: t2, result: Err(AccessError::LinkFailed(_)), .. },
                Event::PeerDown { peer: 2, .. },
            ] if *t1 == w && *t2 == r
        ),
        "{done:?}"
    );
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(drain(&mut a), vec![]);
}

#[test]
fn disconnect_fails_both_sides_and_reconnect_restores() {
    let net = MemNetwork::new();
    let mut ts = net.cluster(&[1, 2]);
    let mut b = ts.pop().unwrap();
    let mut a = ts.pop().unwrap();
    drain(&mut a);
    drain(&mut b);
    b.grant(1);
    let w = a.write(2, 0, b"data").unwrap();
    let r = b.read(1, 0, 1).unwrap();
    let arrived = wait(&mut b, "WriteArrived", |e| matches!(e, Event::WriteArrived { .. }));
    let Event::WriteArrived { token, .. } = arrived else { unreachable!() };
    a.send(2, b"lost in transit").unwrap();
    net.disconnect(1);
    assert!(!net.is_linked(1, 2));
    assert_eq!(a.send(2, b"x"), Err(SendError::LinkDown(2)));
    // The agent's late answer goes nowhere.
    assert_eq!(b.complete_write(1, token, Ok(b"late")), Err(SendError::LinkDown(1)));
    let ev_a = drain(&mut a);
    assert!(
        ev_a.contains(&Event::WriteDone {
            to: 2,
            token: w,
            result: Err(AccessError::LinkFailed("link to peer 2 failed: peer 1 disconnected".into())),
        }),
        "{ev_a:?}"
    );
    assert!(ev_a.iter().any(|e| matches!(e, Event::PeerDown { peer: 2, .. })));
    let ev_b = drain(&mut b);
    assert!(
        ev_b.iter().any(
            |e| matches!(e, Event::ReadDone { token, result: Err(AccessError::LinkFailed(_)), .. } if *token == r)
        ),
        "{ev_b:?}"
    );
    assert!(!ev_b.iter().any(|e| matches!(e, Event::Message { .. })), "a queued message survived the link: {ev_b:?}");
    net.reconnect(1);
    wait(&mut a, "PeerUp", |e| *e == Event::PeerUp { peer: 2 });
    wait(&mut b, "PeerUp", |e| *e == Event::PeerUp { peer: 1 });
    a.send(2, b"again").unwrap();
    wait(&mut b, "message", |e| matches!(e, Event::Message { from: 1, payload } if payload == "again"));
    // A stale answer after the link came back is ignored, not delivered.
    assert_eq!(b.complete_write(1, token, Ok(b"stale")), Ok(()));
    std::thread::sleep(Duration::from_millis(20));
    assert!(!drain(&mut a).iter().any(|e| matches!(e, Event::WriteDone { .. })));
}

#[test]
fn backpressure_is_per_link_and_clears_on_poll() {
    let net = MemNetwork::with_config(MemConfig { max_payload: 16, queue_depth: 3 });
    let mut ts = net.cluster(&[1, 2, 3]);
    let mut c = ts.pop().unwrap();
    let mut b = ts.pop().unwrap();
    let mut a = ts.pop().unwrap();
    for _ in 0..3 {
        a.send(2, b"m").unwrap();
    }
    assert_eq!(a.send(2, b"m"), Err(SendError::Backpressure(2)));
    assert_eq!(a.write(2, 0, b"w").map(|_| ()), Err(SendError::Backpressure(2)));
    a.send(3, b"other link").unwrap();
    c.send(2, b"other sender").unwrap();
    drain(&mut b);
    a.send(2, b"m").unwrap();
    assert_eq!(a.read(2, 0, 17).map(|_| ()), Err(SendError::TooLarge { size: 17, limit: 16 }));
    assert_eq!(a.send(1 + 10, b"m"), Err(SendError::UnknownPeer(11)));
    drain(&mut c);
}

#[test]
fn poll_blocks_until_a_message_arrives_from_another_thread() {
    let net = MemNetwork::new();
    let mut ts = net.cluster(&[1, 2]);
    let mut b = ts.pop().unwrap();
    let mut a = ts.pop().unwrap();
    drain(&mut b);
    let sender = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        a.send(2, b"wake up").unwrap();
        a
    });
    let t = Instant::now();
    let mut got = Vec::new();
    b.poll(&mut got, None).unwrap();
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(got, vec![Event::Message { from: 1, payload: "wake up".into() }]);
    let _a = sender.join().unwrap();
}

#[test]
fn grant_checked_at_arrival() {
    // A write issued while 1 holds permission but polled after a revoke is denied.
    let net = MemNetwork::new();
    let mut ts = net.cluster(&[1, 2]);
    let mut b = ts.pop().unwrap();
    let mut a = ts.pop().unwrap();
    b.grant(1);
    let w = a.write(2, 0, b"x").unwrap();
    b.revoke(1);
    assert!(!drain(&mut b).iter().any(|e| matches!(e, Event::WriteArrived { .. })));
    let e = wait(&mut a, "WriteDone", |e| matches!(e, Event::WriteDone { .. }));
    assert_eq!(
        e,
        Event::WriteDone { to: 2, token: w, result: Err(AccessError::Denied { detail: Default::default() }) }
    );
    let _: PeerId = a.local();
}
