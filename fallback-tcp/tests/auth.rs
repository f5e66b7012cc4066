//! Peer authentication with a cluster secret and the configuration digest: a process
//! with the wrong secret, no secret, or a stale member list never comes up with the
//! members, is refused with a clear REJECT and a warning naming the remote address, and
//! the members go on serving each other.

mod common;

use common::*;
use fallback_tcp::wire::{self, kind, Hello};
use fallback_tcp::{TcpConfig, TcpTransport};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use transport::envelope::{self, Decoder, VERSION};
use transport::{Event, Transport};

const SECRET: &[u8] = b"correct horse battery staple";

fn with_secret(id: u64, secret: Option<&[u8]>, digest: u64) -> TcpConfig {
    let mut c = config(id, any());
    c.secret = secret.map(<[u8]>::to_vec);
    c.config_digest = digest;
    c
}

/// Pumps for `d`, collecting events.
fn pump_for(ts: &mut [TcpTransport], d: Duration) -> Vec<Vec<Event>> {
    let mut evs = vec![Vec::new(); ts.len()];
    let end = Instant::now() + d;
    while Instant::now() < end {
        pump(ts, &mut evs);
    }
    evs
}

fn ups(evs: &[Event]) -> Vec<u64> {
    let mut v: Vec<u64> =
        evs.iter().filter_map(|e| if let Event::PeerUp { peer } = e { Some(*peer) } else { None }).collect();
    v.sort_unstable();
    v.dedup();
    v
}

#[test]
fn conformance_suite_with_a_secret() {
    transport::conformance::run_all(|ids| {
        connect(ids.iter().map(|&id| with_secret(id, Some(SECRET), 42)).collect())
            .into_iter()
            .map(|t| Box::new(t) as Box<dyn Transport>)
            .collect()
    });
}

#[test]
fn a_node_with_the_wrong_secret_never_comes_up_and_is_logged() {
    let (logs, _guard) = capture_logs();
    let mut ts = connect(vec![
        with_secret(1, Some(SECRET), 42),
        with_secret(2, Some(SECRET), 42),
        with_secret(3, Some(b"not the secret"), 42),
    ]);
    let evs = pump_for(&mut ts, Duration::from_millis(600));
    assert_eq!(ups(&evs[0]), vec![2], "{evs:?}");
    assert_eq!(ups(&evs[1]), vec![1], "{evs:?}");
    assert_eq!(ups(&evs[2]), Vec::<u64>::new(), "{evs:?}");
    assert!(!ts[0].is_up(3) && !ts[1].is_up(3) && !ts[2].is_up(1));
    let text = logs.text();
    let addr3 = "127.0.0.1:"; // the remote of an incoming connection is the dialer's ephemeral port
    assert!(
        text.lines().any(|l| l.contains("WARN")
            && l.contains(addr3)
            && l.contains("authentication failed: node 3 did not prove it knows the cluster secret")),
        "{text}"
    );
    assert!(text.contains("rejected by the peer: authentication failed: node 3"), "{text}");
    // The members still talk.
    ts[0].send(2, b"hi").unwrap();
    let mut evs = vec![Vec::new(); 3];
    pump_until(&mut ts, &mut evs, Duration::from_secs(5), |e| {
        e[1].iter().any(|e| matches!(e, Event::Message { from: 1, .. }))
    });
    assert_eq!(ts[2].send(1, b"x"), Err(transport::SendError::LinkDown(1)));
}

#[test]
fn a_member_with_a_stale_configuration_is_refused() {
    let (logs, _guard) = capture_logs();
    let mut ts = connect(vec![
        with_secret(1, Some(SECRET), 42),
        with_secret(2, Some(SECRET), 42),
        with_secret(3, Some(SECRET), 43),
    ]);
    let evs = pump_for(&mut ts, Duration::from_millis(600));
    assert_eq!(ups(&evs[0]), vec![2], "{evs:?}");
    assert_eq!(ups(&evs[1]), vec![1], "{evs:?}");
    assert_eq!(ups(&evs[2]), Vec::<u64>::new(), "{evs:?}");
    let text = logs.text();
    assert!(
        text.lines()
            .any(|l| l.contains("WARN")
                && l.contains("stale configuration: node 3 was configured with another member list")),
        "{text}"
    );
    assert!(text.contains("rejected by the peer: stale configuration: node 1"), "{text}");
}

#[test]
fn a_stale_configuration_is_refused_without_a_secret_too() {
    let (logs, _guard) = capture_logs();
    let mut ts = connect(vec![with_secret(1, None, 42), with_secret(2, None, 43)]);
    let evs = pump_for(&mut ts, Duration::from_millis(400));
    assert!(evs.iter().all(|e| ups(e).is_empty()), "{evs:?}");
    assert!(logs.text().contains("stale configuration: node 2"), "{}", logs.text());
}

#[test]
fn a_secret_on_one_side_only_never_comes_up() {
    let (logs, _guard) = capture_logs();
    let mut ts = connect(vec![with_secret(1, Some(SECRET), 0), with_secret(2, None, 0)]);
    let evs = pump_for(&mut ts, Duration::from_millis(400));
    assert!(evs.iter().all(|e| ups(e).is_empty()), "{evs:?}");
    let text = logs.text();
    assert!(text.contains("the peer requires a cluster secret and none is configured on this node"), "{text}");
    assert!(text.contains("the acceptor did not prove it knows the cluster secret"), "{text}");
}

/// Reads frames from `raw` until one arrives or the connection closes.
fn next_frame(raw: &mut TcpStream, ts: &mut [TcpTransport], buf: &mut bytes::BytesMut) -> Option<envelope::Frame> {
    let mut evs = vec![Vec::new(); ts.len()];
    let end = Instant::now() + Duration::from_secs(5);
    let mut b = [0u8; 4096];
    loop {
        match Decoder::new(4096).decode(buf) {
            Ok(Some(f)) => return Some(f),
            Ok(None) => {}
            Err(e) => panic!("the transport's bytes do not decode as a frame: {e}"),
        }
        assert!(Instant::now() < end, "nothing from the transport");
        pump(ts, &mut evs);
        match raw.read(&mut b) {
            Ok(0) => return None,
            Ok(n) => buf.extend_from_slice(&b[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return None,
        }
    }
}

#[test]
fn a_forged_proof_gets_a_reject_and_the_transport_keeps_serving() {
    let (logs, _guard) = capture_logs();
    let mut ts = connect(vec![with_secret(1, Some(SECRET), 42), with_secret(2, Some(SECRET), 42)]);
    wait_all_up(&mut ts);
    for attempt in ["zero proof", "proof before hello", "hello again"] {
        let mut raw = TcpStream::connect(ts[0].local_addr()).unwrap();
        raw.set_read_timeout(Some(Duration::from_millis(2))).unwrap();
        let me = raw.local_addr().unwrap().to_string();
        let mut out = Vec::new();
        let hello =
            Hello { cluster_id: CLUSTER, node_id: 2, target: 1, version: VERSION, config_digest: 42, nonce: [1; 32] };
        if attempt == "proof before hello" {
            envelope::encode(kind::AUTH, &[0u8; 32], &mut out);
        } else {
            envelope::encode(kind::HELLO, &hello.encode(), &mut out);
        }
        raw.write_all(&out).unwrap();
        let mut buf = bytes::BytesMut::new();
        let (reason, f) = if attempt == "proof before hello" {
            ("unexpected frame kind 5 before HELLO", next_frame(&mut raw, &mut ts, &mut buf).unwrap())
        } else {
            let c = next_frame(&mut raw, &mut ts, &mut buf).unwrap();
            assert_eq!(c.kind, kind::CHALLENGE, "{attempt}");
            assert_eq!(c.payload.len(), wire::NONCE_LEN);
            let mut out = Vec::new();
            let reason = if attempt == "zero proof" {
                envelope::encode(kind::AUTH, &[0u8; 32], &mut out);
                "authentication failed: node 2 did not prove it knows the cluster secret"
            } else {
                envelope::encode(kind::HELLO, &hello.encode(), &mut out);
                "unexpected frame kind 1 before AUTH"
            };
            raw.write_all(&out).unwrap();
            (reason, next_frame(&mut raw, &mut ts, &mut buf).unwrap())
        };
        assert_eq!(f.kind, kind::REJECT, "{attempt}");
        assert!(String::from_utf8_lossy(&f.payload).contains(reason), "{attempt}: {f:?}");
        let text = logs.text();
        assert!(
            text.lines().any(|l| l.contains("WARN") && l.contains(&me) && l.contains(reason)),
            "{attempt}: no warning naming {me}:\n{text}"
        );
        // The real node 2 is still up and talking.
        assert!(ts[0].is_up(2) && ts[1].is_up(1), "{attempt}");
        ts[1].send(1, b"still here").unwrap();
        let mut evs = vec![Vec::new(); 2];
        pump_until(&mut ts, &mut evs, Duration::from_secs(5), |e| {
            e[0].iter().any(|e| matches!(e, Event::Message { from: 2, .. }))
        });
    }
}

#[test]
fn an_empty_secret_is_refused() {
    let c = with_secret(1, Some(b""), 0);
    let err = TcpTransport::bind(c).err().expect("refused");
    assert!(err.to_string().contains("secret must not be empty"), "{err}");
    let dbg = format!("{:?}", with_secret(1, Some(SECRET), 0));
    assert!(!dbg.contains("horse") && dbg.contains("redacted"), "{dbg}");
}

/// The digest each test node presents (its "identity").
fn identity(id: u64) -> u64 {
    1000 + id
}

fn spec(t: &TcpTransport, digest: u64) -> transport::PeerSpec {
    transport::PeerSpec { addr: t.local_addr().to_string(), digest }
}

#[test]
fn peers_added_and_removed_while_running_with_per_peer_digests() {
    let (logs, _guard) = capture_logs();
    // Nodes 1 and 2 know each other; node 3 is new and knows them; each presents its own
    // identity digest and expects each peer's.
    let mut ts = connect(vec![
        with_secret(1, Some(SECRET), identity(1)),
        with_secret(2, Some(SECRET), identity(2)),
        with_secret(3, Some(SECRET), identity(3)),
    ]);
    for i in 0..3 {
        let peers = (0..3).filter(|&j| j != i).map(|j| (j as u64 + 1, spec(&ts[j], identity(j as u64 + 1))));
        let peers: std::collections::BTreeMap<u64, transport::PeerSpec> = peers.collect();
        if i < 2 {
            // 1 and 2 do not know 3 yet.
            let old: std::collections::BTreeMap<u64, transport::PeerSpec> =
                peers.into_iter().filter(|(id, _)| *id != 3).collect();
            ts[i].update_peers(&old).unwrap();
        } else {
            ts[i].update_peers(&peers).unwrap();
        }
    }
    let evs = pump_for(&mut ts, Duration::from_millis(400));
    assert_eq!(ups(&evs[0]), vec![2], "{evs:?}");
    assert!(ups(&evs[2]).is_empty(), "{evs:?}");
    assert!(logs.text().contains("unknown node id 3 (not a member this node knows)"), "{}", logs.text());

    // 1 and 2 learn of 3 (a membership change): every link comes up.
    for i in 0..2 {
        let peers = (0..3).filter(|&j| j != i).map(|j| (j as u64 + 1, spec(&ts[j], identity(j as u64 + 1)))).collect();
        ts[i].update_peers(&peers).unwrap();
    }
    let mut evs = vec![Vec::new(); 3];
    let t0 = Instant::now();
    while !(ts[0].is_up(3) && ts[1].is_up(3) && ts[2].is_up(1) && ts[2].is_up(2)) {
        assert!(t0.elapsed() < Duration::from_secs(10), "links to the new node did not come up: {evs:?}");
        pump(&mut ts, &mut evs);
    }
    ts[0].send(3, b"welcome").unwrap();
    pump_until(&mut ts, &mut evs, Duration::from_secs(5), |e| {
        e[2].iter().any(|e| matches!(e, Event::Message { from: 1, payload } if &payload[..] == b"welcome"))
    });

    // Node 1 drops node 3 (removed from the membership): the link closes, sends fail.
    let peers = [(2, spec(&ts[1], identity(2)))].into_iter().collect();
    ts[0].update_peers(&peers).unwrap();
    assert!(!ts[0].is_up(3));
    assert!(matches!(ts[0].send(3, b"gone"), Err(transport::SendError::UnknownPeer(3))));
    // A peer that presents another digest than the one expected of it is refused.
    let peers = [(2, spec(&ts[1], identity(2))), (3, spec(&ts[2], 777))].into_iter().collect();
    ts[0].update_peers(&peers).unwrap();
    let _ = pump_for(&mut ts, Duration::from_millis(400));
    assert!(!ts[0].is_up(3) || !ts[2].is_up(1));
    assert!(logs.text().contains("stale configuration: node 3"), "{}", logs.text());
    // Addresses that do not parse are refused, and the old set stays.
    let bad = [(2, transport::PeerSpec { addr: "not an address".into(), digest: 1 })].into_iter().collect();
    assert!(matches!(ts[0].update_peers(&bad), Err(transport::PeersError::Invalid(_))));
    assert!(ts[0].peers().contains(&3));
}
