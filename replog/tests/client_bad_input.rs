//! Bad input on the client port: each bad connection gets a clear error frame where the
//! protocol allows and is closed within a bounded time, the refusal is logged naming the
//! peer and the reason, and the server keeps serving a good client afterwards.

mod client_support;

use client_support::{
    capture_logs, frame, raw, read_n, read_one, read_until_closed, wait_for_log, FakeCluster, CLUSTER,
};
use replog::client::proto::kind;
use replog::client::{Client, ClientConfig, ErrorCode, Request, Response};
use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};
use transport::envelope;

const CLOSE_WITHIN: Duration = Duration::from_secs(5);

fn good_client_works(fake: &FakeCluster) {
    let mut c = Client::connect(ClientConfig { retries: 2, ..ClientConfig::new(CLUSTER, fake.addrs()) }).unwrap();
    let p = c.append("still serving").unwrap();
    assert_eq!(c.read(p, 1).unwrap()[0].0, p);
}

/// Sends `bytes` on a fresh connection; expects the connection closed within the bound,
/// a log line naming this peer and `reason`, and returns the error frames received.
fn refused(fake: &FakeCluster, bytes: &[u8], half_close: bool, reason: &str) -> Vec<(u64, Response)> {
    let mut s = raw(fake.addr(0));
    let me = s.local_addr().unwrap().to_string();
    s.write_all(bytes).unwrap();
    if half_close {
        s.shutdown(Shutdown::Write).unwrap();
    }
    let t0 = Instant::now();
    let (got, closed) = read_until_closed(&mut s, CLOSE_WITHIN);
    assert!(closed, "not closed within {CLOSE_WITHIN:?} ({reason})");
    assert!(t0.elapsed() < CLOSE_WITHIN);
    let line = wait_for_log(&[&me, reason], Duration::from_secs(5));
    assert!(
        line.as_deref().is_some_and(|l| l.contains("WARN")),
        "no warning naming {me} and {reason:?}; logs:\n{}",
        client_support::logs()
    );
    eprintln!("{}", line.unwrap_or_default());
    good_client_works(fake);
    got
}

fn hello() -> Vec<u8> {
    frame(1, &Request::Hello { cluster_id: CLUSTER })
}

fn only_error(got: &[(u64, Response)], code: ErrorCode) -> String {
    match got {
        [(_, Response::Error { code: c, message })] if *c == code => message.clone(),
        other => panic!("expected one {code} error frame, got {other:?}"),
    }
}

#[test]
fn garbage_bytes() {
    capture_logs();
    let fake = FakeCluster::start(1);
    let got = refused(&fake, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", false, "bad magic");
    assert!(only_error(&got, ErrorCode::BadRequest).contains("bad magic"));
    // Garbage after a good Hello, too.
    let mut g = hello();
    g.extend_from_slice(&[0xAB; 100]);
    let got = refused(&fake, &g, false, "bad magic");
    assert!(matches!(got[0].1, Response::HelloOk { node: 1 }));
    fake.shutdown();
}

#[test]
fn truncated_frame_then_eof() {
    capture_logs();
    let fake = FakeCluster::start(1);
    let mut b = hello();
    let st = frame(2, &Request::Status);
    b.extend_from_slice(&st[..st.len() - 3]);
    let got = refused(&fake, &b, true, "ended inside a frame");
    assert_eq!(got.len(), 1, "only the HelloOk: {got:?}");
    // A header cut short, before Hello.
    let got = refused(&fake, &hello()[..10], true, "ended inside a frame");
    assert!(got.is_empty());
    fake.shutdown();
}

#[test]
fn oversized_length() {
    capture_logs();
    let fake = FakeCluster::start_with(1, |c| c.max_frame = 1 << 20);
    // A header announcing 1 GiB: refused from the header alone (before Hello the limit
    // is the handshake's, HANDSHAKE_MAX_FRAME).
    let mut h = envelope::header(kind::APPEND, &[]);
    h[8..12].copy_from_slice(&(1u32 << 30).to_le_bytes());
    let got = refused(&fake, &h, false, "exceeds the limit");
    let msg = only_error(&got, ErrorCode::TooLarge);
    let small = replog::client::server::HANDSHAKE_MAX_FRAME.to_string();
    assert!(msg.contains("1073741824") && msg.contains(&small), "{msg}");
    // After Hello the configured limit applies.
    let mut b = hello();
    let mut h = envelope::header(kind::APPEND, &[]);
    h[8..12].copy_from_slice(&(1u32 << 30).to_le_bytes());
    b.extend_from_slice(&h);
    let got = refused(&fake, &b, false, "exceeds the limit");
    match &got[1].1 {
        Response::Error { code: ErrorCode::TooLarge, message } => {
            assert!(message.contains("1073741824") && message.contains("1048576"), "{message}")
        }
        other => panic!("after Hello a 1 GiB header got {other:?}"),
    }
    // A real append just above the limit, after Hello.
    let mut b = hello();
    b.extend(frame(2, &Request::Append { client: 1, seq: 1, entries: vec![vec![0u8; 1 << 20].into()] }));
    let got = refused(&fake, &b, false, "exceeds the limit");
    assert!(matches!(got[1].1, Response::Error { code: ErrorCode::TooLarge, .. }));
    assert!(fake.log().iter().all(|e| e.len() < 1 << 20));
    fake.shutdown();
}

#[test]
fn wrong_cluster_id() {
    capture_logs();
    let fake = FakeCluster::start(1);
    let b = frame(9, &Request::Hello { cluster_id: 77 });
    let got = refused(&fake, &b, false, "cluster id 77, this cluster is 193");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, 9, "the error answers the Hello");
    assert_eq!(only_error(&got, ErrorCode::WrongCluster), format!("cluster id 77, this cluster is {CLUSTER}"));
    fake.shutdown();
}

#[test]
fn wrong_protocol_version() {
    capture_logs();
    let fake = FakeCluster::start(1);
    let mut b = hello();
    b[4] = envelope::VERSION + 1; // patched, checksum not recomputed
    let got = refused(&fake, &b, false, "protocol version 2 not supported");
    assert!(only_error(&got, ErrorCode::BadRequest).contains("version"));
    // With the checksum recomputed, too.
    let mut b = hello();
    b[4] = 0;
    let c = crc32c::crc32c_append(crc32c::crc32c(&b[0..12]), &b[16..]);
    b[12..16].copy_from_slice(&c.to_le_bytes());
    refused(&fake, &b, false, "protocol version 0 not supported");
    fake.shutdown();
}

#[test]
fn bad_checksum_unknown_kind_and_bad_payload() {
    capture_logs();
    let fake = FakeCluster::start(1);
    let mut b = hello();
    let n = b.len();
    b[n - 1] ^= 0x40;
    refused(&fake, &b, false, "checksum mismatch");
    let mut b = hello();
    let mut f = Vec::new();
    envelope::encode(0x7f, &[0u8; 8], &mut f);
    b.extend(f);
    refused(&fake, &b, false, "unknown frame kind 0x7f");
    // A response kind sent as a request.
    let mut b = hello();
    let mut f = Vec::new();
    envelope::encode(kind::HELLO_OK, &[0u8; 16], &mut f);
    b.extend(f);
    refused(&fake, &b, false, "unknown frame kind 0x41");
    // A Read with a field missing.
    let mut b = hello();
    let mut f = Vec::new();
    envelope::encode(kind::READ, &[0u8; 12], &mut f);
    b.extend(f);
    refused(&fake, &b, false, "truncated payload");
    fake.shutdown();
}

#[test]
fn request_before_hello_and_second_hello() {
    capture_logs();
    let fake = FakeCluster::start(1);
    let got = refused(&fake, &frame(5, &Request::Status), false, "before Hello");
    assert_eq!(got[0].0, 5);
    only_error(&got, ErrorCode::BadRequest);
    let mut b = hello();
    b.extend(hello());
    let got = refused(&fake, &b, false, "second Hello");
    assert_eq!(got.len(), 2);
    // The node never saw a request from these connections.
    assert_eq!(fake.state.lock().unwrap().appends_received, 2);
    fake.shutdown();
}

#[test]
fn max_connections_enforced() {
    capture_logs();
    let fake = FakeCluster::start_with(1, |c| c.max_connections = 2);
    let mut a = raw(fake.addr(0));
    let mut b = raw(fake.addr(0));
    for s in [&mut a, &mut b] {
        s.write_all(&hello()).unwrap();
        assert!(matches!(read_one(s).1, Response::HelloOk { .. }));
    }
    let mut third = raw(fake.addr(0));
    let me = third.local_addr().unwrap().to_string();
    let _ = third.write_all(&hello());
    let (got, closed) = read_until_closed(&mut third, CLOSE_WITHIN);
    assert!(closed);
    assert!(only_error(&got, ErrorCode::Busy).contains("limit 2"));
    assert!(wait_for_log(&[&me, "too many connections"], Duration::from_secs(5)).is_some());
    // The first two still work; after one leaves, a new one is accepted.
    a.write_all(&frame(2, &Request::Status)).unwrap();
    assert!(matches!(read_one(&mut a), (2, Response::Status(_))));
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut s = raw(fake.addr(0));
        s.write_all(&hello()).unwrap();
        match read_one(&mut s).1 {
            Response::HelloOk { .. } => break,
            Response::Error { code: ErrorCode::Busy, .. } => {
                assert!(Instant::now() < deadline, "slot never freed");
                std::thread::sleep(Duration::from_millis(20));
            }
            other => panic!("{other:?}"),
        }
    }
    fake.shutdown();
}

#[test]
fn slow_reader_is_disconnected() {
    capture_logs();
    let fake = FakeCluster::start_with(1, |c| c.max_queued_bytes_per_conn = 256 << 10);
    fake.state.lock().unwrap().log.push(vec![1u8; 1 << 20].into());
    let mut s = TcpStream::connect(fake.addr(0)).unwrap();
    let me = s.local_addr().unwrap().to_string();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&hello()).unwrap();
    // Ask for a 1 MiB entry many times and never read: socket buffers fill, then the
    // server's queue passes the limit and it closes the connection.
    let read = frame(3, &Request::Read { from: 1, max_entries: 1, max_bytes: 2 << 20 });
    for _ in 0..200 {
        if s.write_all(&read).is_err() {
            break;
        }
        if client_support::logs().lines().any(|l| l.contains(&me) && l.contains("slow reader")) {
            break;
        }
    }
    let line = wait_for_log(&[&me, "slow reader"], Duration::from_secs(10));
    assert!(line.is_some(), "no slow-reader warning");
    let deadline = Instant::now() + Duration::from_secs(5);
    while fake.state.lock().unwrap().disconnected.is_empty() {
        assert!(Instant::now() < deadline, "node not told of the disconnect");
        std::thread::sleep(Duration::from_millis(10));
    }
    good_client_works(&fake);
    fake.shutdown();
}

#[test]
fn requests_in_flight_beyond_the_limits_are_answered_busy_and_the_connection_stays() {
    capture_logs();
    let fake = FakeCluster::start_with(1, |c| {
        c.max_inflight_per_conn = 2;
        c.max_inflight_bytes = 1 << 20;
    });
    fake.state.lock().unwrap().hold_appends = true;
    let mut s = raw(fake.addr(0));
    s.write_all(&hello()).unwrap();
    assert!(matches!(read_one(&mut s), (1, Response::HelloOk { .. })));
    // Two appends the node holds, then a third: Busy at once, naming the limit.
    for id in [2u64, 3, 4] {
        let e = format!("entry {id}");
        s.write_all(&frame(id, &Request::Append { client: 9, seq: id, entries: vec![e.into()] })).unwrap();
    }
    match read_one(&mut s) {
        (4, Response::Error { code: ErrorCode::Busy, message }) => {
            assert!(message.contains("2 requests in flight on this connection (limit 2)"), "{message}")
        }
        other => panic!("the third append in flight got {other:?}"),
    }
    assert!(wait_for_log(&["overloaded", "answered Busy"], Duration::from_secs(5)).is_some());
    // Another connection fills the replica-wide byte budget: a request above it is Busy.
    let mut t = raw(fake.addr(0));
    t.write_all(&hello()).unwrap();
    assert!(matches!(read_one(&mut t), (1, Response::HelloOk { .. })));
    let big = frame(2, &Request::Append { client: 10, seq: 1, entries: vec![vec![7u8; 1 << 20].into()] });
    t.write_all(&big).unwrap();
    match read_one(&mut t) {
        (2, Response::Error { code: ErrorCode::Busy, message }) => {
            assert!(message.contains("bytes of requests in flight at this replica (limit 1048576)"), "{message}")
        }
        other => panic!("an append above the byte budget got {other:?}"),
    }
    assert_eq!(fake.log().len(), 2, "only the two admitted appends reached the node");
    // Once the node answers, the connection is served again.
    fake.state.lock().unwrap().hold_appends = false;
    let mut got: Vec<u64> = read_n(&mut s, 2).into_iter().map(|(id, _)| id).collect();
    got.sort();
    assert_eq!(got, vec![2, 3]);
    s.write_all(&frame(5, &Request::Append { client: 9, seq: 5, entries: vec!["after".into()] })).unwrap();
    assert!(matches!(read_one(&mut s), (5, Response::Appended { .. })));
    t.write_all(&big).unwrap();
    assert!(matches!(read_one(&mut t), (2, Response::Appended { .. })));
    fake.shutdown();
}

#[test]
fn connections_that_do_not_complete_the_handshake_in_time_are_refused() {
    capture_logs();
    // Nothing at all: refused and closed, logged.
    let fake = FakeCluster::start_with(1, |c| c.handshake_timeout = Duration::from_millis(300));
    let got = refused(&fake, b"", false, "no Hello within 300ms");
    assert!(only_error(&got, ErrorCode::BadRequest).contains("no Hello within"));
    fake.shutdown();
    // Hello, then no Auth for the challenge: refused, closed, logged.
    let fake = FakeCluster::start_with(1, |c| {
        c.handshake_timeout = Duration::from_millis(300);
        c.client_secret = Some(b"s".to_vec());
    });
    let mut s = raw(fake.addr(0));
    let me = s.local_addr().unwrap().to_string();
    s.write_all(&hello()).unwrap();
    let (got, closed) = read_until_closed(&mut s, CLOSE_WITHIN);
    assert!(closed, "a stalled authentication was not closed");
    assert!(matches!(got.first(), Some((1, Response::Challenge { .. }))), "{got:?}");
    match got.get(1) {
        Some((0, Response::Error { code: ErrorCode::Unauthorized, message })) => {
            assert!(message.contains("no Auth within"), "{message}")
        }
        other => panic!("a stalled authentication got {other:?}"),
    }
    assert!(wait_for_log(&[&me, "no Auth within 300ms"], Duration::from_secs(5)).is_some());
    // A client that authenticates in time is served past the deadline.
    let mut s = raw(fake.addr(0));
    s.write_all(&hello()).unwrap();
    let nonce = match read_one(&mut s) {
        (1, Response::Challenge { nonce }) => nonce,
        other => panic!("{other:?}"),
    };
    let proof = replog::client::proto::client_proof(b"s", CLUSTER, &nonce);
    s.write_all(&frame(2, &Request::Auth { proof })).unwrap();
    assert!(matches!(read_one(&mut s), (2, Response::HelloOk { .. })));
    std::thread::sleep(Duration::from_millis(600));
    s.write_all(&frame(3, &Request::Status)).unwrap();
    assert!(matches!(read_one(&mut s), (3, Response::Status(_))));
    fake.shutdown();
}
