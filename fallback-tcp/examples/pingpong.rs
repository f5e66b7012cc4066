//! Message round trip between two `TcpTransport`s on loopback, against a raw blocking
//! `std::net::TcpStream` ping-pong of the same size measured in the same run.
//!
//! ```sh
//! cargo run --release -p fallback-tcp --example pingpong -- [--size 64] [--iters 20000]
//! ```
//!
//! Each side runs in its own thread, as a replica's polling thread would. The echo side
//! answers every message with the same bytes; the timed side sends one message, waits
//! for its echo, and records the round trip.

use fallback_tcp::{TcpConfig, TcpTransport};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};
use transport::{Event, Transport};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map_or(default, |v| v.parse().expect("a number"))
}

fn percentiles(name: &str, mut rtts: Vec<Duration>) -> Duration {
    rtts.sort_unstable();
    let p = |q: f64| rtts[((rtts.len() as f64 * q) as usize).min(rtts.len() - 1)];
    println!(
        "{name:<14} p50 {:>8.1} us  p99 {:>8.1} us  p99.9 {:>8.1} us  ({} round trips)",
        p(0.50).as_secs_f64() * 1e6,
        p(0.99).as_secs_f64() * 1e6,
        p(0.999).as_secs_f64() * 1e6,
        rtts.len()
    );
    p(0.5)
}

fn wait_up(t: &mut TcpTransport, peer: u64) {
    let mut evs = Vec::new();
    let end = Instant::now() + Duration::from_secs(10);
    while !evs.contains(&Event::PeerUp { peer }) {
        assert!(Instant::now() < end, "link to {peer} did not come up");
        t.poll(&mut evs, Some(Duration::from_millis(10))).unwrap();
    }
}

fn transport_rtts(size: usize, iters: usize, warmup: usize) -> Vec<Duration> {
    let any = "127.0.0.1:0".parse().unwrap();
    let mut a = TcpTransport::bind(TcpConfig::new(1, 1, any, BTreeMap::new())).unwrap();
    let mut b = TcpTransport::bind(TcpConfig::new(1, 2, any, BTreeMap::new())).unwrap();
    a.set_peers(BTreeMap::from([(2, b.local_addr())])).unwrap();
    b.set_peers(BTreeMap::from([(1, a.local_addr())])).unwrap();
    let echo = std::thread::spawn(move || {
        wait_up(&mut b, 1);
        b.send(1, b"ready").unwrap();
        let mut evs = Vec::new();
        loop {
            b.poll(&mut evs, None).unwrap();
            for e in evs.drain(..) {
                if let Event::Message { payload, .. } = e {
                    if payload.is_empty() {
                        return;
                    }
                    b.send(1, &payload).unwrap();
                }
            }
        }
    });
    wait_up(&mut a, 2);
    let mut evs = Vec::new();
    while !evs.iter().any(|e| matches!(e, Event::Message { .. })) {
        a.poll(&mut evs, Some(Duration::from_secs(10))).unwrap();
    }
    let msg = vec![0x5A; size.max(1)];
    let mut rtts = Vec::with_capacity(iters);
    for i in 0..warmup + iters {
        evs.clear();
        let t0 = Instant::now();
        a.send(2, &msg).unwrap();
        while evs.is_empty() {
            a.poll(&mut evs, None).unwrap();
        }
        let rtt = t0.elapsed();
        assert!(matches!(&evs[0], Event::Message { payload, .. } if payload.len() == msg.len()));
        if i >= warmup {
            rtts.push(rtt);
        }
    }
    // An empty message stops the echo thread.
    a.send(2, b"").unwrap();
    a.poll(&mut evs, Some(Duration::from_millis(1))).unwrap();
    echo.join().unwrap();
    rtts
}

fn raw_rtts(size: usize, iters: usize, warmup: usize) -> Vec<Duration> {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let echo = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_nodelay(true).unwrap();
        let mut buf = vec![0u8; size.max(1)];
        while s.read_exact(&mut buf).is_ok() {
            s.write_all(&buf).unwrap();
        }
    });
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let msg = vec![0x5A; size.max(1)];
    let mut back = vec![0u8; size.max(1)];
    let mut rtts = Vec::with_capacity(iters);
    for i in 0..warmup + iters {
        let t0 = Instant::now();
        s.write_all(&msg).unwrap();
        s.read_exact(&mut back).unwrap();
        if i >= warmup {
            rtts.push(t0.elapsed());
        }
    }
    drop(s);
    echo.join().unwrap();
    rtts
}

fn main() {
    let size = arg("--size", 64);
    let iters = arg("--iters", 20_000);
    let warmup = iters / 10;
    println!("round trip of a {size}-byte message on 127.0.0.1, {iters} samples after {warmup} warm-up");
    // Alternate to spread machine noise over both.
    let raw1 = raw_rtts(size, iters / 2, warmup);
    let tcp1 = transport_rtts(size, iters / 2, warmup);
    let raw2 = raw_rtts(size, iters - iters / 2, warmup);
    let tcp2 = transport_rtts(size, iters - iters / 2, warmup);
    let raw = percentiles("raw TcpStream", [raw1, raw2].concat());
    let tcp = percentiles("TcpTransport", [tcp1, tcp2].concat());
    println!("ratio (TcpTransport / raw) at p50: {:.2}", tcp.as_secs_f64() / raw.as_secs_f64());
}
