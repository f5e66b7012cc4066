//! Bad input on the peer port: each kind of garbage gets a warning naming the remote
//! address and the reason, the connection is closed, and the transport keeps serving.

mod common;

use common::*;
use fallback_tcp::wire::{kind, Hello};
use fallback_tcp::TcpTransport;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};
use transport::envelope::{self, Decoder, VERSION};
use transport::{Event, Transport};

fn hello(cluster_id: u64, node_id: u64, target: u64, version: u8) -> Vec<u8> {
    let mut out = Vec::new();
    let h = Hello { cluster_id, node_id, target, version, config_digest: 0, nonce: [0; 32] };
    envelope::encode(kind::HELLO, &h.encode(), &mut out);
    out
}

/// Sends `bytes` from a raw client to node 1 (closing the write side if `eof`), pumps
/// the cluster until the transport closes the connection, and returns what the client
/// received before the close.
fn attack(ts: &mut [TcpTransport], bytes: &[u8], eof: bool) -> (Vec<u8>, String) {
    let mut raw = TcpStream::connect(ts[0].local_addr()).unwrap();
    let me = raw.local_addr().unwrap().to_string();
    raw.write_all(bytes).unwrap();
    if eof {
        raw.shutdown(Shutdown::Write).unwrap();
    }
    raw.set_read_timeout(Some(Duration::from_millis(2))).unwrap();
    let mut got = Vec::new();
    let mut evs = vec![Vec::new(); ts.len()];
    let end = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 4096];
    loop {
        assert!(Instant::now() < end, "connection not closed by the transport");
        pump(ts, &mut evs);
        match raw.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break, // reset: closed too
        }
    }
    // The good peers saw nothing of it.
    for e in &evs {
        assert!(e.iter().all(|e| !matches!(e, Event::PeerDown { .. })), "{evs:?}");
    }
    (got, me)
}

/// The REJECT frame the transport sent, if it arrived whole.
fn reject_reason(got: &[u8]) -> Option<String> {
    let mut b = bytes::BytesMut::from(got);
    let f = Decoder::new(4096).decode(&mut b).ok()??;
    (f.kind == kind::REJECT).then(|| String::from_utf8_lossy(&f.payload).into_owned())
}

/// Node 1 and node 2 still exchange messages both ways.
fn still_serving(ts: &mut [TcpTransport]) {
    ts[0].send(2, b"still there?").unwrap();
    ts[1].send(1, b"yes").unwrap();
    let mut evs = vec![Vec::new(); ts.len()];
    pump_until(ts, &mut evs, Duration::from_secs(5), |e| {
        e[0].iter().any(|e| matches!(e, Event::Message { from: 2, payload } if &payload[..] == b"yes"))
            && e[1].iter().any(|e| matches!(e, Event::Message { from: 1, payload } if &payload[..] == b"still there?"))
    });
}

#[test]
fn each_kind_of_bad_input_is_refused_with_a_clear_log_line() {
    let (logs, _guard) = capture_logs();
    let mut ts = cluster(2);

    let mut oversized = envelope::header(kind::HELLO, &[]).to_vec();
    oversized[8..12].copy_from_slice(&(1u32 << 30).to_le_bytes());

    let mut wrong_version = hello(CLUSTER, 2, 1, VERSION);
    wrong_version[4] = VERSION + 1;

    let mut bad_crc = hello(CLUSTER, 2, 1, VERSION);
    bad_crc[20] ^= 0x40;

    let good = hello(CLUSTER, 2, 1, VERSION);
    let truncated = good[..good.len() - 5].to_vec();
    let truncated_reason = format!("closed in the middle of a frame ({} bytes", truncated.len());

    let v = VERSION + 1;
    let cases: Vec<(&str, Vec<u8>, bool, String, bool)> = vec![
        // (name, bytes, eof after, expected reason, REJECT expected whole)
        ("garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), false, "bad magic".into(), true),
        ("truncated", truncated, true, truncated_reason, false),
        ("oversized", oversized, false, "frame of 1073741824 bytes exceeds the limit of 4096".into(), true),
        ("wrong cluster", hello(999, 2, 1, VERSION), false, format!("wrong cluster id 999 (expected {CLUSTER})"), true),
        ("wrong envelope version", wrong_version, false, format!("protocol version {v} not supported"), true),
        (
            "wrong hello version",
            hello(CLUSTER, 2, 1, v),
            false,
            format!("protocol version {v} not supported (this build speaks {VERSION})"),
            true,
        ),
        ("unknown node", hello(CLUSTER, 42, 1, VERSION), false, "unknown node id 42".into(), true),
        ("own node id", hello(CLUSTER, 1, 1, VERSION), false, "node id 1 is this node's own id".into(), true),
        (
            "wrong target",
            hello(CLUSTER, 2, 3, VERSION),
            false,
            "meant to reach node 3, but this is node 1".into(),
            true,
        ),
        ("checksum", bad_crc, false, "checksum mismatch".into(), true),
        (
            "message before hello",
            {
                let mut o = Vec::new();
                envelope::encode(kind::MSG, b"hi", &mut o);
                o
            },
            false,
            "unexpected frame kind 16 before HELLO".into(),
            true,
        ),
        ("silence", Vec::new(), false, "handshake timeout".into(), true),
    ];
    for (name, bytes, eof, reason, want_reject) in cases {
        let (got, me) = attack(&mut ts, &bytes, eof);
        let text = logs.text();
        let line = text
            .lines()
            .find(|l| l.contains(&me) && l.contains("WARN") && l.contains(&reason))
            .unwrap_or_else(|| panic!("{name}: no warning naming {me} and {reason:?} in:\n{text}"));
        println!("{name}: {line}");
        if want_reject {
            let r = reject_reason(&got).unwrap_or_else(|| panic!("{name}: no REJECT in {got:?}"));
            assert!(r.contains(&reason), "{name}: REJECT says {r:?}");
        }
        still_serving(&mut ts);
    }
}

#[test]
fn a_dialer_refused_by_another_cluster_logs_why_and_never_comes_up() {
    let (logs, _guard) = capture_logs();
    let mut a = config(1, any());
    a.cluster_id = 8;
    let mut ts = connect(vec![a, config(2, any())]);
    let mut evs = vec![Vec::new(); 2];
    let end = Instant::now() + Duration::from_millis(300);
    while Instant::now() < end {
        pump(&mut ts, &mut evs);
    }
    assert!(evs.iter().flatten().all(|e| !matches!(e, Event::PeerUp { .. })), "{evs:?}");
    let text = logs.text();
    assert!(text.contains("wrong cluster id 8 (expected 7)"), "{text}");
    assert!(text.contains("rejected by the peer: wrong cluster id 7 (expected 8)"), "{text}");
}
