//! The client library against client-port servers in front of a fake node (test
//! support, see `client_support`): append, batch, read, tail, status, retries, redirects.

mod client_support;

use bytes::Bytes;
use client_support::{FakeCluster, CLUSTER};
use replog::client::{Client, ClientConfig, ClientError, ErrorCode};
use std::time::{Duration, Instant};

fn cfg(servers: Vec<std::net::SocketAddr>) -> ClientConfig {
    ClientConfig { retries: 4, ..ClientConfig::new(CLUSTER, servers) }
}

#[test]
fn append_read_status_round_trip() {
    let fake = FakeCluster::start(1);
    let mut c = Client::connect(cfg(fake.addrs())).unwrap();
    assert_eq!(c.node(), Some(1));
    assert_eq!(c.append("hello").unwrap(), 1);
    assert_eq!(c.append(Bytes::from_static(b"world")).unwrap(), 2);
    let got = c.read(0, 10).unwrap();
    assert_eq!(got, vec![(1, Bytes::from_static(b"hello")), (2, Bytes::from_static(b"world"))]);
    assert_eq!(c.read(2, 10).unwrap(), vec![(2, Bytes::from_static(b"world"))]);
    assert_eq!(c.read(1, 1).unwrap().len(), 1);
    assert!(c.read(3, 10).unwrap().is_empty());
    let s = c.status().unwrap();
    assert_eq!((s.node, s.leader, s.last_position), (1, Some(1), 2));
    assert_eq!(s.role, "leader");
    let s2 = Client::status_of(fake.addr(0), CLUSTER, Duration::from_secs(5)).unwrap();
    assert_eq!(s2, s);
    drop(c);
    fake.shutdown();
}

#[test]
fn batch_append_and_large_entries() {
    let fake = FakeCluster::start(1);
    let mut c = Client::connect(cfg(fake.addrs())).unwrap();
    let batch: Vec<Bytes> = (0..100u32).map(|i| Bytes::from(vec![i as u8; i as usize * 100])).collect();
    let pos = c.append_batch(batch.clone()).unwrap();
    assert_eq!(pos, (1..=100).collect::<Vec<u64>>());
    assert_eq!(c.append_batch(vec![]).unwrap(), Vec::<u64>::new());
    let big = Bytes::from(vec![7u8; 4 << 20]);
    assert_eq!(c.append(big.clone()).unwrap(), 101);
    let got = c.read(1, 1000).unwrap();
    assert_eq!(got.len(), 101);
    for (i, (p, e)) in got.iter().enumerate() {
        assert_eq!(*p, i as u64 + 1);
        if i < 100 {
            assert_eq!(e, &batch[i]);
        } else {
            assert_eq!(e, &big);
        }
    }
    drop(c);
    fake.shutdown();
}

#[test]
fn tail_follows_new_entries() {
    let fake = FakeCluster::start(1);
    let mut c = Client::connect(cfg(fake.addrs())).unwrap();
    c.append("a").unwrap();
    c.append("b").unwrap();
    let mut tail = c.tail(0).unwrap();
    tail.set_wait_timeout(Some(Duration::from_secs(5)));
    let mut writer = Client::connect(cfg(fake.addrs())).unwrap();
    let w = std::thread::spawn(move || {
        for i in 0..20 {
            writer.append(format!("e{i}")).unwrap();
        }
    });
    let mut seen = Vec::new();
    for _ in 0..22 {
        let (p, e) = tail.next().expect("tail ended").expect("tail failed");
        seen.push((p, e));
    }
    w.join().unwrap();
    assert_eq!(seen[0], (1, Bytes::from_static(b"a")));
    assert_eq!(seen[1], (2, Bytes::from_static(b"b")));
    for (i, (p, e)) in seen.iter().enumerate().skip(2) {
        assert_eq!(*p, i as u64 + 1);
        assert_eq!(e, &Bytes::from(format!("e{}", i - 2)));
    }
    // A tail from the middle, and a wait that times out and leaves the tail usable.
    let mut t2 = c.tail(21).unwrap();
    t2.set_wait_timeout(Some(Duration::from_millis(300)));
    assert_eq!(t2.next().unwrap().unwrap().0, 21);
    assert_eq!(t2.next().unwrap().unwrap().0, 22);
    assert!(matches!(t2.next(), Some(Err(ClientError::Timeout { .. }))));
    c.append("late").unwrap();
    assert_eq!(t2.next().unwrap().unwrap(), (23, Bytes::from_static(b"late")));
    // Closing the tails tells the node (Disconnected), which drops the subscriptions.
    drop(tail);
    drop(t2);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !fake.state.lock().unwrap().subs.is_empty() {
        assert!(Instant::now() < deadline, "subscriptions not dropped");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(c);
    fake.shutdown();
}

#[test]
fn retry_after_dropped_connection_is_applied_once() {
    let fake = FakeCluster::start(1);
    let mut c = Client::connect(cfg(fake.addrs())).unwrap();
    assert_eq!(c.append("first").unwrap(), 1);
    fake.state.lock().unwrap().drop_next_append = true;
    // The fake node applies the batch, then closes the connection without answering:
    // the client retries the same (client, seq) and gets the same positions.
    let pos = c.append_batch(vec![Bytes::from_static(b"x"), Bytes::from_static(b"y")]).unwrap();
    assert_eq!(pos, vec![2, 3]);
    {
        let st = fake.state.lock().unwrap();
        assert_eq!(st.appends_received, 3, "the retry reached the node");
        assert_eq!(st.log.len(), 3, "applied once");
    }
    assert_eq!(c.append("next").unwrap(), 4);
    drop(c);
    fake.shutdown();
}

#[test]
fn retry_across_servers_and_redirect() {
    // Server 0 leads; the client knows only server 1 first: redirected to 0.
    let fake = FakeCluster::start(3);
    let a = fake.addrs();
    let mut c = Client::connect(cfg(vec![a[1], a[2], a[0]])).unwrap();
    assert_eq!(c.server(), Some(a[1]));
    assert_eq!(c.append("r").unwrap(), 1);
    assert_eq!(c.server(), Some(a[0]), "followed the redirect");
    // The leader drops the connection mid-append: the client tries the next server
    // (a follower), is redirected back, and the retry is applied once.
    fake.state.lock().unwrap().drop_next_append = true;
    assert_eq!(c.append("s").unwrap(), 2);
    assert_eq!(fake.log().len(), 2);
    // Leadership moves to server 2: the next append is redirected there.
    fake.state.lock().unwrap().leader = Some(2);
    assert_eq!(c.append("t").unwrap(), 3);
    assert_eq!(c.server(), Some(a[2]));
    // No leader: redirects without an address, bounded, then a typed error.
    fake.state.lock().unwrap().leader = None;
    let t0 = Instant::now();
    let e = c.append("u").unwrap_err();
    assert!(matches!(e, ClientError::Exhausted { .. }), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert_eq!(fake.log().len(), 3);
    drop(c);
    fake.shutdown();
}

#[test]
fn connect_errors_are_typed() {
    // Nothing listens there (bind, learn the port, close).
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let e = Client::connect(ClientConfig { retries: 0, ..cfg(vec![dead]) }).err().unwrap();
    assert!(
        matches!(&e, ClientError::Exhausted { last, .. } if matches!(**last, ClientError::Connect { server, .. } if server == dead)),
        "{e}"
    );
    assert!(matches!(Client::connect(cfg(vec![])).err().unwrap(), ClientError::NoServers));
    // A dead server first, a live one second: connect moves on.
    let fake = FakeCluster::start(1);
    let mut c = Client::connect(cfg(vec![dead, fake.addr(0)])).unwrap();
    assert_eq!(c.append("ok").unwrap(), 1);
    // The wrong cluster id is a non-retryable, typed refusal.
    let e = Client::connect(ClientConfig { cluster_id: CLUSTER + 1, ..cfg(fake.addrs()) }).err().unwrap();
    assert!(
        matches!(&e, ClientError::Server { code: ErrorCode::WrongCluster, message, .. }
            if message == &format!("cluster id {}, this cluster is {CLUSTER}", CLUSTER + 1)),
        "{e}"
    );
    drop(c);
    fake.shutdown();
}

#[test]
fn concurrent_clients_each_entry_once_in_order() {
    let fake = FakeCluster::start(1);
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let cfg = cfg(fake.addrs());
            std::thread::spawn(move || {
                let mut c = Client::connect(cfg).unwrap();
                let mut last = 0;
                for i in 0..200 {
                    let p = if i % 10 == 0 {
                        let b = (0..5).map(|j| Bytes::from(format!("{t}/{i}/{j}"))).collect();
                        let ps = c.append_batch(b).unwrap();
                        assert!(ps.windows(2).all(|w| w[1] == w[0] + 1));
                        ps[0]
                    } else {
                        c.append(format!("{t}/{i}")).unwrap()
                    };
                    assert!(p > last, "positions of one client increase");
                    last = p;
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let log = fake.log();
    assert_eq!(log.len(), 8 * (180 + 20 * 5));
    let unique: std::collections::HashSet<_> = log.iter().collect();
    assert_eq!(unique.len(), log.len(), "no entry twice");
    fake.shutdown();
}
