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
        if let Some(f) = Decoder::new(4096).decode(buf).unwrap() {
            return Some(f);
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
