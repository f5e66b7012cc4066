//! Helpers shared by the integration tests: clusters on 127.0.0.1 with ephemeral ports,
//! a bounded pump, and a log capture.
#![allow(dead_code)]

use fallback_tcp::{TcpConfig, TcpTransport};
use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use transport::{Event, Transport};

pub const CLUSTER: u64 = 7;

pub fn any() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A config with test-friendly timings.
pub fn config(local: u64, listen: SocketAddr) -> TcpConfig {
    let mut c = TcpConfig::new(CLUSTER, local, listen, BTreeMap::new());
    c.reconnect_min = Duration::from_millis(5);
    c.reconnect_max = Duration::from_millis(100);
    c.handshake_timeout = Duration::from_millis(500);
    c
}

/// Binds `cfgs` (ids must be distinct), then gives each the others' addresses.
pub fn connect(cfgs: Vec<TcpConfig>) -> Vec<TcpTransport> {
    let mut ts: Vec<TcpTransport> = cfgs.into_iter().map(|c| TcpTransport::bind(c).unwrap()).collect();
    let addrs: Vec<(u64, SocketAddr)> = ts.iter().map(|t| (t.local(), t.local_addr())).collect();
    for t in &mut ts {
        let me = t.local();
        let peers: BTreeMap<u64, SocketAddr> = addrs.iter().filter(|(id, _)| *id != me).copied().collect();
        t.set_peers(peers).unwrap();
    }
    ts
}

/// `n` transports with ids 1..=n, all links up (PeerUp seen everywhere).
pub fn cluster(n: u64) -> Vec<TcpTransport> {
    let mut ts = connect((1..=n).map(|id| config(id, any())).collect());
    wait_all_up(&mut ts);
    ts
}

/// Pumps until every transport saw PeerUp from every other one.
pub fn wait_all_up(ts: &mut [TcpTransport]) {
    let mut evs = vec![Vec::new(); ts.len()];
    let want = ts.len() - 1;
    pump_until(ts, &mut evs, Duration::from_secs(10), |evs| {
        evs.iter().all(|e| e.iter().filter(|e| matches!(e, Event::PeerUp { .. })).count() >= want)
    });
}

/// Polls every transport once (short timeout), appending to `evs[i]`.
pub fn pump(ts: &mut [TcpTransport], evs: &mut [Vec<Event>]) {
    for (t, e) in ts.iter_mut().zip(evs.iter_mut()) {
        t.poll(e, Some(Duration::from_millis(1))).unwrap();
    }
}

/// Pumps until `done(evs)` or panics after `limit`.
pub fn pump_until(
    ts: &mut [TcpTransport],
    evs: &mut [Vec<Event>],
    limit: Duration,
    mut done: impl FnMut(&[Vec<Event>]) -> bool,
) {
    let end = Instant::now() + limit;
    while !done(evs) {
        assert!(Instant::now() < end, "condition not reached within {limit:?}");
        pump(ts, evs);
    }
}

/// A buffer that a `tracing` subscriber writes into.
#[derive(Clone, Default)]
pub struct LogBuf(pub Arc<Mutex<Vec<u8>>>);

impl LogBuf {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuf {
    type Writer = LogBuf;
    fn make_writer(&'a self) -> LogBuf {
        self.clone()
    }
}

/// Captures this thread's logs (debug and up) until the guard drops.
pub fn capture_logs() -> (LogBuf, tracing::subscriber::DefaultGuard) {
    let buf = LogBuf::default();
    let sub = tracing_subscriber::fmt().with_writer(buf.clone()).with_max_level(tracing::Level::DEBUG).finish();
    (buf, tracing::subscriber::set_default(sub))
}
