//! The transport's contract on loopback: messages, remote writes and reads, permission,
//! exactly-once completions, the waker, and argument errors.

mod common;

use bytes::Bytes;
use common::*;
use fallback_tcp::{TcpConfig, TcpTransport};
use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};
use transport::{AccessError, Event, SendError, Transport};

fn payload(seq: u32, len: usize) -> Vec<u8> {
    let mut v = vec![(seq % 251) as u8; len.max(4)];
    v[..4].copy_from_slice(&seq.to_le_bytes());
    v
}

#[test]
fn messages_arrive_in_order_including_large_ones() {
    let mut ts = cluster(3);
    let mut evs = vec![Vec::new(); 3];
    let sizes = [0usize, 1, 100, 70_000, 1 << 20, 4 << 20, 17, 8191, 8192];
    let n = 600u32;
    let mut sent = 0u32;
    let end = Instant::now() + Duration::from_secs(30);
    let count = |e: &Vec<Event>| e.iter().filter(|e| matches!(e, Event::Message { .. })).count();
    while count(&evs[1]) < n as usize || count(&evs[2]) < n as usize {
        assert!(Instant::now() < end, "messages not delivered in time");
        while sent < n {
            let p = payload(sent, sizes[sent as usize % sizes.len()]);
            let r2 = ts[0].send(2, &p);
            if r2 == Err(SendError::Backpressure(2)) {
                break;
            }
            r2.unwrap();
            // Resend to 3 until queued, so both see the same sequence.
            while let Err(e) = ts[0].send(3, &p) {
                assert_eq!(e, SendError::Backpressure(3));
                pump(&mut ts, &mut evs);
            }
            sent += 1;
        }
        pump(&mut ts, &mut evs);
    }
    for (i, e) in evs.iter().enumerate().skip(1) {
        let msgs: Vec<&Bytes> = e
            .iter()
            .filter_map(|e| match e {
                Event::Message { from, payload } => {
                    assert_eq!(*from, 1);
                    Some(payload)
                }
                _ => None,
            })
            .collect();
        assert_eq!(msgs.len(), n as usize, "node {}", i + 1);
        for (seq, m) in msgs.iter().enumerate() {
            assert_eq!(&m[..], &payload(seq as u32, sizes[seq % sizes.len()])[..]);
        }
    }
}

#[test]
fn write_and_read_round_trip() {
    let mut ts = cluster(2);
    let mut evs = vec![Vec::new(); 2];
    ts[1].grant(1);
    assert_eq!(ts[1].permission_holder(), Some(1));
    let w = ts[0].write(2, 4096, b"entry bytes").unwrap();
    pump_until(&mut ts, &mut evs, Duration::from_secs(5), |e| !e[1].is_empty());
    let Event::WriteArrived { from, token, offset, data } = evs[1].remove(0) else {
        panic!("expected WriteArrived, got {:?}", evs[1]);
    };
    assert_eq!((from, offset, &data[..]), (1, 4096, &b"entry bytes"[..]));
    ts[1].complete_write(1, token, Ok(b"ack")).unwrap();
    // A second completion for the same token is refused, not sent.
    assert!(ts[1].complete_write(1, token, Ok(b"again")).is_err());
    pump_until(&mut ts, &mut evs, Duration::from_secs(5), |e| !e[0].is_empty());
    assert_eq!(evs[0].remove(0), Event::WriteDone { to: 2, token: w, result: Ok(Bytes::from_static(b"ack")) });

    // Reads are allowed without permission, in both directions.
    ts[1].revoke(1);
    let r = ts[0].read(2, 7, 10).unwrap();
    let r2 = ts[0].read(2, 8, 4).unwrap();
    pump_until(&mut ts, &mut evs, Duration::from_secs(5), |e| e[1].len() >= 2);
    let tokens: Vec<(u64, u64, u32)> = evs[1]
        .drain(..)
        .map(|e| match e {
            Event::ReadArrived { from: 1, token, offset, len } => (token, offset, len),
            e => panic!("unexpected {e:?}"),
        })
        .collect();
    assert_eq!((tokens[0].1, tokens[0].2), (7, 10));
    // An answer longer than asked is refused.
    assert!(matches!(
        ts[1].complete_read(1, tokens[0].0, Ok(&[0u8; 11])),
        Err(SendError::TooLarge { size: 11, limit: 10 })
    ));
    // Answer out of order: the second first, as a denial.
    ts[1].complete_read(1, tokens[1].0, Err(b"trimmed")).unwrap();
    ts[1].complete_read(1, tokens[0].0, Ok(b"0123456789")).unwrap();
    pump_until(&mut ts, &mut evs, Duration::from_secs(5), |e| e[0].len() >= 2);
    assert_eq!(
        evs[0],
        vec![
            Event::ReadDone {
                from: 2,
                token: r2,
                result: Err(AccessError::Denied { detail: Bytes::from_static(b"trimmed") })
            },
            Event::ReadDone { from: 2, token: r, result: Ok(Bytes::from_static(b"0123456789")) },
        ]
    );
}

#[test]
fn writes_from_non_holders_are_denied_by_the_transport() {
    let mut ts = cluster(3);
    let mut evs = vec![Vec::new(); 3];
    ts[1].grant(3);
    let w1 = ts[0].write(2, 0, b"from 1").unwrap();
    pump_until(&mut ts, &mut evs, Duration::from_secs(5), |e| !e[0].is_empty());
    assert_eq!(
        evs[0].remove(0),
        Event::WriteDone { to: 2, token: w1, result: Err(AccessError::Denied { detail: Bytes::new() }) }
    );
    assert!(evs[1].is_empty(), "no WriteArrived for a non-holder: {:?}", evs[1]);

    // The holder's write arrives; after revoke, its next one is denied.
    ts[2].write(2, 1, b"from 3").unwrap();
    pump_until(&mut ts, &mut evs, Duration::from_secs(5), |e| !e[1].is_empty());
    assert!(matches!(evs[1].remove(0), Event::WriteArrived { from: 3, .. }));
    ts[1].revoke(3);
    assert_eq!(ts[1].permission_holder(), None);
    let w3 = ts[2].write(2, 2, b"from 3 again").unwrap();
    pump_until(&mut ts, &mut evs, Duration::from_secs(5), |e| !e[2].is_empty());
    assert_eq!(
        evs[2].remove(0),
        Event::WriteDone { to: 2, token: w3, result: Err(AccessError::Denied { detail: Bytes::new() }) }
    );
    // Granting 1 takes permission from anyone else.
    ts[1].grant(3);
    ts[1].grant(1);
    ts[2].write(2, 3, b"3 after grant(1)").unwrap();
    ts[0].write(2, 3, b"1 after grant(1)").unwrap();
    pump_until(&mut ts, &mut evs, Duration::from_secs(5), |e| !e[2].is_empty() && !e[1].is_empty());
    assert!(matches!(evs[2][0], Event::WriteDone { to: 2, result: Err(AccessError::Denied { .. }), .. }));
    assert!(matches!(&evs[1][0], Event::WriteArrived { from: 1, data, .. } if &data[..] == b"1 after grant(1)"));
}

#[test]
fn ten_thousand_writes_each_complete_once() {
    let mut ts = cluster(2);
    let mut evs = vec![Vec::new(); 2];
    ts[1].grant(1);
    let n = 10_000usize;
    let mut issued = HashSet::new();
    let mut done = HashSet::new();
    let end = Instant::now() + Duration::from_secs(60);
    let mut off = 0u64;
    while done.len() < n {
        assert!(Instant::now() < end, "{} of {n} writes done", done.len());
        while issued.len() < n {
            match ts[0].write(2, off, &off.to_le_bytes()) {
                Ok(t) => {
                    assert!(issued.insert(t), "token {t} issued twice");
                    off += 1;
                }
                Err(SendError::Backpressure(2)) => break,
                Err(e) => panic!("{e}"),
            }
        }
        pump(&mut ts, &mut evs);
        for e in evs[1].drain(..) {
            match e {
                Event::WriteArrived { from: 1, token, offset, data } => {
                    assert_eq!(&data[..], &offset.to_le_bytes());
                    ts[1].complete_write(1, token, Ok(&offset.to_le_bytes())).unwrap();
                }
                e => panic!("unexpected {e:?}"),
            }
        }
        for e in evs[0].drain(..) {
            match e {
                Event::WriteDone { to: 2, token, result: Ok(_) } => {
                    assert!(issued.contains(&token));
                    assert!(done.insert(token), "token {token} completed twice");
                }
                e => panic!("unexpected {e:?}"),
            }
        }
    }
    // Nothing more arrives afterwards.
    for _ in 0..20 {
        pump(&mut ts, &mut evs);
    }
    assert!(evs.iter().all(|e| e.is_empty()), "{evs:?}");
}

#[test]
fn waker_interrupts_a_blocked_poll() {
    let mut ts = cluster(2);
    let w = ts[0].waker();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        w.wake();
    });
    let start = Instant::now();
    let mut evs = Vec::new();
    ts[0].poll(&mut evs, Some(Duration::from_secs(20))).unwrap();
    let took = start.elapsed();
    t.join().unwrap();
    assert!(evs.is_empty());
    assert!(took < Duration::from_secs(5), "poll took {took:?}");
    // A poll with a timeout and nothing to do returns after about that long.
    let start = Instant::now();
    ts[0].poll(&mut evs, Some(Duration::from_millis(30))).unwrap();
    assert!(start.elapsed() >= Duration::from_millis(25));
}

#[test]
fn argument_errors() {
    let mut ts = cluster(2);
    let max = ts[0].max_payload();
    assert_eq!(ts[0].peers(), vec![2]);
    assert_eq!(ts[0].local(), 1);
    assert_eq!(ts[0].send(9, b"x"), Err(SendError::UnknownPeer(9)));
    assert_eq!(ts[0].send(1, b"x"), Err(SendError::UnknownPeer(1)));
    assert_eq!(ts[0].send(2, &vec![0; max + 1]), Err(SendError::TooLarge { size: max + 1, limit: max }));
    assert!(matches!(ts[0].read(2, 0, u32::MAX), Err(SendError::TooLarge { .. })));
    assert_eq!(ts[0].write(9, 0, b"x"), Err(SendError::UnknownPeer(9)));
    assert!(ts[1].complete_write(1, 12345, Ok(b"")).is_err());
    assert_eq!(ts[1].complete_write(9, 1, Ok(b"")), Err(SendError::UnknownPeer(9)));

    let bad = TcpConfig::new(7, 1, any(), BTreeMap::from([(1, any())]));
    assert!(TcpTransport::bind(bad).is_err());
    assert!(TcpTransport::bind(TcpConfig::new(7, 0, any(), BTreeMap::new())).is_err());

    // A peer that is configured but not running: LinkDown, nothing queued.
    let mut lonely = TcpTransport::bind(config(1, any())).unwrap();
    lonely.set_peers(BTreeMap::from([(2, "127.0.0.1:9".parse().unwrap())])).unwrap();
    let mut evs = Vec::new();
    lonely.poll(&mut evs, Some(Duration::from_millis(20))).unwrap();
    assert_eq!(lonely.send(2, b"x"), Err(SendError::LinkDown(2)));
    assert_eq!(lonely.write(2, 0, b"x"), Err(SendError::LinkDown(2)));
    assert!(!lonely.is_up(2));
}
