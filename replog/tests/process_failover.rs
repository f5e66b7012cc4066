//! Three `replog serve` processes on loopback (fsync durability): 10,000 appends from
//! four concurrent clients while the leader is SIGKILLed twice and restarted. Every
//! acknowledged append must be present exactly once, at its position, in one order on
//! every replica after healing; appends must continue after each failover.

mod support;

use replog::config::DurabilityKind;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::Cluster;

/// Payload -> acknowledged position; payloads whose outcome is unknown.
type Outcomes = (HashMap<Vec<u8>, u64>, Vec<Vec<u8>>);

const CLIENTS: usize = 4;
const PER_CLIENT: usize = 2500;

#[test]
fn ten_thousand_appends_survive_two_leader_kills() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(dir.path(), 3, DurabilityKind::Fsync);
    cluster.wait_leader(Duration::from_secs(20));

    let acked = Arc::new(AtomicU64::new(0));
    // (call, return) of every acknowledged append.
    let spans: Arc<Mutex<Vec<(Instant, Instant)>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let results: Arc<Mutex<Outcomes>> = Arc::default();
    let mut threads = Vec::new();
    for c in 0..CLIENTS {
        let mut client = cluster.client();
        let (acked, spans, results) = (acked.clone(), spans.clone(), results.clone());
        threads.push(std::thread::spawn(move || {
            for i in 0..PER_CLIENT {
                let payload = format!("client{c}-entry{i}").into_bytes();
                let call = Instant::now();
                match client.append(payload.clone()) {
                    Ok(pos) => {
                        results.lock().unwrap().0.insert(payload, pos);
                        acked.fetch_add(1, Ordering::SeqCst);
                        spans.lock().unwrap().push((call, Instant::now()));
                    }
                    Err(e) => {
                        eprintln!("client {c}: append {i} outcome unknown: {e}");
                        results.lock().unwrap().1.push(payload);
                    }
                }
            }
        }));
    }

    // Kill the leader after 2,000 and after 6,000 acknowledgements; restart it 1 s later.
    let mut failovers = Vec::new();
    for threshold in [2000, 6000] {
        let t0 = Instant::now();
        while acked.load(Ordering::SeqCst) < threshold {
            assert!(t0.elapsed() < Duration::from_secs(120), "appends stalled at {}", acked.load(Ordering::SeqCst));
            std::thread::sleep(Duration::from_millis(5));
        }
        let leader = cluster.wait_leader(Duration::from_secs(20));
        let killed_at = Instant::now();
        cluster.kill(leader);
        // Failover: from the kill to the first acknowledgement of an append called
        // after it (so it cannot have been served by the killed leader).
        let t0 = Instant::now();
        let failover = loop {
            assert!(t0.elapsed() < Duration::from_secs(30), "no append succeeded within 30 s after killing the leader");
            let first = spans.lock().unwrap().iter().filter(|(c, _)| *c > killed_at).map(|(_, r)| *r).min();
            if let Some(r) = first {
                break r.duration_since(killed_at);
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        println!("failover after killing replica {} (leader): {:.1} ms", leader + 1, failover.as_secs_f64() * 1e3);
        failovers.push(failover);
        std::thread::sleep(Duration::from_secs(1));
        cluster.restart(leader);
    }
    for t in threads {
        t.join().expect("client thread");
    }
    done.store(true, Ordering::SeqCst);
    let (acks, unknown) = {
        let r = results.lock().unwrap();
        (r.0.clone(), r.1.clone())
    };
    assert!(acks.len() >= CLIENTS * PER_CLIENT - unknown.len());
    println!("{} appends acknowledged, {} with unknown outcome", acks.len(), unknown.len());

    // Heal: every replica converges on the same log.
    let total = cluster.wait_converged(acks.len() as u64, Duration::from_secs(60));
    let logs: Vec<Vec<(u64, Vec<u8>)>> = (0..3).map(|i| cluster.read_all(i)).collect();
    for (i, l) in logs.iter().enumerate() {
        assert_eq!(l.len() as u64, total, "replica {} serves {} entries", i + 1, l.len());
        assert!(l == &logs[0], "replica {} holds a different log from replica 1", i + 1);
    }
    let mut seen: HashMap<&[u8], u64> = HashMap::new();
    for (p, d) in &logs[0] {
        assert!(seen.insert(d.as_slice(), *p).is_none(), "entry {:?} appears twice", String::from_utf8_lossy(d));
    }
    for (payload, pos) in &acks {
        assert_eq!(
            seen.get(payload.as_slice()),
            Some(pos),
            "acknowledged entry {:?} at position {pos} is not there",
            String::from_utf8_lossy(payload)
        );
    }
    assert_eq!(
        seen.len(),
        acks.len() + unknown.iter().filter(|u| seen.contains_key(u.as_slice())).count(),
        "the log holds only appended entries"
    );
    for (i, f) in failovers.iter().enumerate() {
        println!("failover {}: {:.1} ms", i + 1, f.as_secs_f64() * 1e3);
    }
}
