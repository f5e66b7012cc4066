//! Link failures and slow peers: reconnect after a peer is dropped and recreated on the
//! same port; backpressure from a peer that stops reading.

mod common;

use common::*;
use fallback_tcp::wire::{kind, HelloOk, HELLO_LEN};
use fallback_tcp::TcpTransport;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::io::Write;
use std::net::TcpListener;
use std::time::{Duration, Instant};
use transport::envelope::{self, HEADER_LEN};
use transport::{AccessError, Event, SendError, Transport};

#[test]
fn reconnect_after_a_peer_is_dropped_and_recreated() {
    let mut ts = cluster(2);
    let mut evs = vec![Vec::new(); 2];
    ts[1].grant(1);
    let writes: BTreeSet<u64> = (0..5).map(|i| ts[0].write(2, i, b"in flight").unwrap()).collect();
    let read = ts[0].read(2, 0, 100).unwrap();
    // Node 2 receives them and never answers.
    pump_until(&mut ts, &mut evs, Duration::from_secs(5), |e| e[1].len() >= 6);

    let b_addr = ts[1].local_addr();
    let b = ts.pop().unwrap();
    drop(b);
    let mut a_evs = Vec::new();
    let end = Instant::now() + Duration::from_secs(5);
    while !a_evs.iter().any(|e| matches!(e, Event::PeerDown { peer: 2, .. })) {
        assert!(Instant::now() < end, "no PeerDown: {a_evs:?}");
        ts[0].poll(&mut a_evs, Some(Duration::from_millis(5))).unwrap();
    }
    let mut failed_writes = BTreeSet::new();
    let mut failed_reads = 0;
    for e in &a_evs {
        match e {
            Event::WriteDone { to: 2, token, result: Err(AccessError::LinkFailed(_)) } => {
                assert!(failed_writes.insert(*token), "write {token} failed twice")
            }
            Event::ReadDone { from: 2, token, result: Err(AccessError::LinkFailed(_)) } => {
                assert_eq!(*token, read);
                failed_reads += 1;
            }
            Event::PeerDown { peer: 2, .. } => {}
            e => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(failed_writes, writes);
    assert_eq!(failed_reads, 1);
    assert_eq!(ts[0].send(2, b"x"), Err(SendError::LinkDown(2)));
    // Redials fail for a while (nobody listens); nothing more is reported.
    a_evs.clear();
    let end = Instant::now() + Duration::from_millis(200);
    while Instant::now() < end {
        ts[0].poll(&mut a_evs, Some(Duration::from_millis(5))).unwrap();
    }
    assert!(a_evs.is_empty(), "{a_evs:?}");

    // Node 2 comes back on the same port.
    let mut cfg = config(2, b_addr);
    cfg.peers = BTreeMap::from([(1, ts[0].local_addr())]);
    ts.push(TcpTransport::bind(cfg).unwrap());
    let mut evs = vec![Vec::new(); 2];
    pump_until(&mut ts, &mut evs, Duration::from_secs(10), |e| {
        e[0].contains(&Event::PeerUp { peer: 2 }) && e[1].contains(&Event::PeerUp { peer: 1 })
    });
    ts[1].grant(1);
    let w = ts[0].write(2, 9, b"after restart").unwrap();
    ts[1].send(1, b"hello again").unwrap();
    let mut evs = vec![Vec::new(); 2];
    pump_until(&mut ts, &mut evs, Duration::from_secs(5), |e| !e[1].is_empty());
    let Event::WriteArrived { from: 1, token, .. } = evs[1][0] else { panic!("{evs:?}") };
    assert_eq!(token, w);
    ts[1].complete_write(1, token, Ok(b"ok")).unwrap();
    pump_until(&mut ts, &mut evs, Duration::from_secs(5), |e| e[0].len() >= 2);
    assert!(evs[0].iter().any(|e| matches!(e, Event::WriteDone { token, result: Ok(_), .. } if *token == w)));
    assert!(evs[0].iter().any(|e| matches!(e, Event::Message { from: 2, payload } if &payload[..] == b"hello again")));
}

#[test]
fn a_peer_that_does_not_read_gets_backpressure_not_memory() {
    // A fake node 2: accepts, answers the handshake by hand, then never reads.
    let fake = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = config(1, any());
    cfg.max_queued_bytes_per_peer = 1 << 20;
    cfg.peers = BTreeMap::from([(2, fake.local_addr().unwrap())]);
    let limit = cfg.max_queued_bytes_per_peer;
    let mut a = TcpTransport::bind(cfg).unwrap();
    let mut evs = Vec::new();
    a.poll(&mut evs, Some(Duration::from_millis(10))).unwrap();
    let (mut raw, _) = fake.accept().unwrap();
    let mut hello = [0u8; HEADER_LEN + HELLO_LEN];
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    raw.read_exact(&mut hello).unwrap();
    assert_eq!(hello[5], kind::HELLO);
    let mut ok = Vec::new();
    let body = HelloOk { cluster_id: CLUSTER, node_id: 2, proof: None };
    envelope::encode(kind::HELLO_OK, &body.encode(), &mut ok);
    raw.write_all(&ok).unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    while !evs.contains(&Event::PeerUp { peer: 2 }) {
        assert!(Instant::now() < end, "no PeerUp: {evs:?}");
        a.poll(&mut evs, Some(Duration::from_millis(5))).unwrap();
    }

    let msg = vec![0xAB; 64 * 1024];
    let mut accepted = 0usize;
    let mut refused = false;
    for _ in 0..4000 {
        match a.send(2, &msg) {
            Ok(()) => accepted += 1,
            Err(SendError::Backpressure(2)) => {
                refused = true;
                break;
            }
            Err(e) => panic!("{e}"),
        }
        assert!(a.queued_bytes(2) <= limit + msg.len() + 64);
        a.poll(&mut evs, Some(Duration::ZERO)).unwrap();
    }
    assert!(refused, "no backpressure after {accepted} messages of 64 KiB");
    assert!(a.queued_bytes(2) <= limit);
    println!(
        "backpressure after {accepted} x 64 KiB ({} KiB in kernel buffers, {} KiB queued)",
        (accepted * msg.len()).saturating_sub(a.queued_bytes(2)) / 1024,
        a.queued_bytes(2) / 1024
    );

    // Once the peer reads again, the queue drains and sends are accepted.
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0usize;
        raw.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        while let Ok(n) = raw.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n;
        }
        total
    });
    let end = Instant::now() + Duration::from_secs(10);
    while a.queued_bytes(2) > 0 {
        assert!(Instant::now() < end, "queue did not drain");
        a.poll(&mut evs, Some(Duration::from_millis(5))).unwrap();
    }
    a.send(2, &msg).unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    while a.queued_bytes(2) > 0 {
        assert!(Instant::now() < end, "queue did not drain");
        a.poll(&mut evs, Some(Duration::from_millis(5))).unwrap();
    }
    drop(a);
    let total = reader.join().unwrap();
    assert_eq!(total, (accepted + 1) * (HEADER_LEN + msg.len()));
}

#[test]
fn removing_a_peer_fails_its_accesses_once() {
    let mut ts = cluster(2);
    ts[1].grant(1);
    let w = ts[0].write(2, 0, b"x").unwrap();
    let mut evs = vec![Vec::new(); 2];
    pump_until(&mut ts, &mut evs, Duration::from_secs(5), |e| !e[1].is_empty());
    ts[0].set_peers(BTreeMap::new()).unwrap();
    assert_eq!(ts[0].peers(), Vec::<u64>::new());
    let mut a = Vec::new();
    ts[0].poll(&mut a, Some(Duration::from_millis(5))).unwrap();
    assert!(
        a.iter().any(
            |e| matches!(e, Event::WriteDone { to: 2, token, result: Err(AccessError::LinkFailed(_)) } if *token == w)
        ),
        "{a:?}"
    );
    assert_eq!(ts[0].send(2, b"x"), Err(SendError::UnknownPeer(2)));
    for _ in 0..20 {
        ts[0].poll(&mut a, Some(Duration::from_millis(1))).unwrap();
    }
    assert_eq!(a.iter().filter(|e| matches!(e, Event::WriteDone { .. })).count(), 1);
}
