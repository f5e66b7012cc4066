//! A replicated key-value map embedded in one program: three replicas in this process
//! (each with its own [`KvMachine`], talking TCP on loopback), driven through the
//! embedding API. Shows replicate/query/status/transfer, then stops.
//!
//! ```sh
//! cargo run --release -p replog --example kv -- --keys 1000
//! ```

use replog::app::KvMachine;
use replog::config::{DurabilityKind, ServeConfig};
use replog::embed::{self, HandleError};
use std::time::{Duration, Instant};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let keys: u32 = std::env::args().skip_while(|a| a != "--keys").nth(1).and_then(|v| v.parse().ok()).unwrap_or(200);
    let dir = std::env::temp_dir().join(format!("replog-kv-example-{}", std::process::id()));
    let base = 27_400 + (std::process::id() % 500) as u16 * 10;
    let cfgs = ServeConfig::local_cluster(3, base, &dir, DurabilityKind::Memory);
    let replicas: Vec<_> =
        cfgs.into_iter().map(|c| embed::start(c, Box::new(KvMachine::default()))).collect::<Result<_, _>>()?;
    let handles: Vec<_> = replicas.iter().map(|r| r.handle()).collect();

    // Find the leader (any replica's status names it once elected).
    let t0 = Instant::now();
    let leader = loop {
        if let Some(l) = handles.iter().filter_map(|h| h.status().ok()).find_map(|s| s.leader) {
            break l as usize - 1;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            return Err("no leader elected within 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    println!("replica {} leads", leader + 1);

    let t0 = Instant::now();
    for i in 0..keys {
        let (pos, answer) = handles[leader].replicate(format!("set key{i} value{i}").into_bytes(), i as u64)?;
        if i < 3 {
            println!("set key{i}: position {pos}, answer {:?}", String::from_utf8_lossy(&answer));
        }
    }
    let took = t0.elapsed();
    println!("{keys} sets in {took:?} ({:.0} µs each, one at a time)", took.as_micros() as f64 / keys as f64);
    let v = handles[leader].query(format!("get key{}", keys - 1).as_bytes(), true)?;
    println!("linearizable get key{}: {:?}", keys - 1, String::from_utf8_lossy(&v));
    match handles[(leader + 1) % 3].replicate(b"set x y".to_vec(), 0) {
        Err(HandleError::NotLeader { leader: l }) => println!("a follower refuses to propose (leader: {l:?})"),
        other => println!("unexpected answer from a follower: {other:?}"),
    }
    handles[leader].step_down()?;
    std::thread::sleep(Duration::from_millis(500));
    for h in &handles {
        let s = h.status()?;
        println!("replica {}: {} leader={:?} applied slot {}", s.node, s.role, s.leader, s.applied_slot);
    }
    for r in replicas {
        r.stop()?;
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}
