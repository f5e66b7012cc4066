//! The Prometheus endpoint over real loopback sockets.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use replog::metrics::{Metrics, MetricsServer, CONNECTION_TIMEOUT};

fn start() -> (MetricsServer, std::sync::Arc<Metrics>) {
    let m = Metrics::new(2);
    m.set_commit_index(77);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    (MetricsServer::start(l, m.clone()).unwrap(), m)
}

/// Sends `request` and reads the whole response (the server closes after it).
fn exchange(server: &MetricsServer, request: &[u8]) -> String {
    let mut s = TcpStream::connect(server.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    String::from_utf8(out).unwrap()
}

fn split(resp: &str) -> (&str, &str, &str) {
    let (head, body) = resp.split_once("\r\n\r\n").expect("a head");
    let status = head.lines().next().unwrap();
    (status, head, body)
}

#[test]
fn get_metrics_answers_the_exposition() {
    let (server, m) = start();
    let resp = exchange(&server, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n");
    let (status, head, body) = split(&resp);
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(head.contains("Content-Type: text/plain; version=0.0.4"), "{head}");
    let len: usize = head.lines().find_map(|l| l.strip_prefix("Content-Length: ")).unwrap().parse().unwrap();
    assert_eq!(len, body.len());
    assert!(body.contains("replog_commit_index{node=\"2\"} 77\n"), "{body}");

    // Later updates show in the next scrape; a query string is ignored.
    m.set_commit_index(78);
    let resp = exchange(&server, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n");
    assert!(resp.contains("replog_commit_index{node=\"2\"} 78\n"));

    // HEAD: the head only.
    let resp = exchange(&server, b"HEAD /metrics HTTP/1.1\r\n\r\n");
    let (status, _, body) = split(&resp);
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.is_empty());
    server.shutdown();
}

#[test]
fn other_paths_are_404_and_bad_requests_400() {
    let (server, _m) = start();
    for (req, want) in [
        (&b"GET / HTTP/1.1\r\n\r\n"[..], "HTTP/1.1 404 Not Found"),
        (b"GET /metricsx HTTP/1.1\r\n\r\n", "HTTP/1.1 404 Not Found"),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", "HTTP/1.1 405 Method Not Allowed"),
        (b"garbage\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        (b"GET /metrics\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        (b"GET /metrics SPDY/3\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        (b"\xff\xfe /metrics HTTP/1.1\r\n\r\n", "HTTP/1.1 400 Bad Request"),
    ] {
        let resp = exchange(&server, req);
        assert_eq!(split(&resp).0, want, "{:?}", String::from_utf8_lossy(req));
    }
    // An oversized head.
    let mut big = b"GET /metrics HTTP/1.1\r\n".to_vec();
    big.extend(std::iter::repeat_n(b'a', 20_000));
    let mut s = TcpStream::connect(server.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(&big);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 400 Bad Request"));
    // A request cut short by the client closing its side.
    let mut s = TcpStream::connect(server.local_addr()).unwrap();
    s.write_all(b"GET /metr").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 400 Bad Request"), "{out}");

    // Still serving.
    assert!(exchange(&server, b"GET /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200 OK"));
    server.shutdown();
}

#[test]
fn a_silent_client_blocks_nobody() {
    let (server, _m) = start();
    // Several clients connect and send nothing (or half a request).
    let mut idle: Vec<TcpStream> = (0..5).map(|_| TcpStream::connect(server.local_addr()).unwrap()).collect();
    idle[0].write_all(b"GET /met").unwrap();
    std::thread::sleep(Duration::from_millis(50));

    let t = Instant::now();
    let resp = exchange(&server, b"GET /metrics HTTP/1.1\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 200 OK"));
    assert!(t.elapsed() < Duration::from_millis(500), "served in {:?}", t.elapsed());

    // The silent ones are closed after the timeout.
    let c = &mut idle[1];
    c.set_read_timeout(Some(CONNECTION_TIMEOUT * 3)).unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 16];
    let n = c.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    assert!(t.elapsed() <= CONNECTION_TIMEOUT + Duration::from_secs(1));
    server.shutdown();
}

#[test]
fn many_concurrent_scrapes() {
    let (server, _m) = start();
    let addr = server.local_addr();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                for _ in 0..20 {
                    let mut s = TcpStream::connect(addr).unwrap();
                    s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
                    let mut out = String::new();
                    s.read_to_string(&mut out).unwrap();
                    assert!(out.starts_with("HTTP/1.1 200 OK"));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    server.shutdown();
}

#[test]
fn shutdown_closes_the_listener() {
    let (server, _m) = start();
    let addr = server.local_addr();
    let t = Instant::now();
    server.shutdown();
    assert!(t.elapsed() < Duration::from_secs(1));
    assert!(TcpStream::connect(addr).is_err(), "nobody listens after shutdown");
}
