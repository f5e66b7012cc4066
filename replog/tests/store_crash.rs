//! Crash test: a child process (this test binary, re-executed) appends under `fsync`
//! from several threads and prints each position once `append` returned, while another
//! thread trims the log behind them (so that trimmed segments are kept as spares and
//! reused as new segments: kills land in recycling too); the parent SIGKILLs it at
//! random moments, reopens the store, and checks that every position ever reported and
//! not trimmed is there, intact, and that nothing was trimmed beyond what was asked.
//! Bounded in rounds and in time.

use replog::store::format::{SegmentHeader, SEG_RECYCLED};
use replog::store::{Log, Mode, StoreConfig};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "REPLOG_STORE_CRASH_CHILD";
const ROUND_ENV: &str = "REPLOG_STORE_CRASH_ROUND";
const ROUNDS: u64 = 24;
const MIN_KILLS: u64 = 20;
const TIME_LIMIT: Duration = Duration::from_secs(120);

fn cfg() -> StoreConfig {
    // Small segments: kills also land during segment rolls.
    StoreConfig::new(Mode::Fsync).with_segment_size(64 * 1024)
}

/// The payload for a tag: its length and bytes are derived from the tag.
fn payload(tag: u64) -> Vec<u8> {
    let len = (tag.wrapping_mul(2654435761) % 900) as usize + 8;
    let mut p = tag.to_le_bytes().to_vec();
    p.extend((0..len - 8).map(|i| (tag as usize).wrapping_mul(31).wrapping_add(i) as u8));
    p
}

fn tag(round: u64, thread: u64, n: u64) -> u64 {
    (round << 40) | (thread << 32) | n
}

/// The child's body: runs only when re-executed with `CHILD_ENV` set.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let round: u64 = std::env::var(ROUND_ENV).unwrap().parse().unwrap();
    let log = match Log::open(&dir, cfg()) {
        Ok(l) => Arc::new(l),
        Err(e) => {
            println!("ERR open: {e}");
            std::process::exit(2);
        }
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut n = 0;
                while Instant::now() < deadline {
                    let tg = tag(round, t, n);
                    match log.append(&payload(tg)) {
                        // The line leaves only after append returned (durable).
                        Ok(pos) => println!("ACK {pos} {tg}"),
                        Err(e) => {
                            println!("ERR append: {e}");
                            std::process::exit(3);
                        }
                    }
                    n += 1;
                }
            })
        })
        .collect();
    // Trims to 200 positions behind the tail, saying where before it asks.
    let trimmer = {
        let log = log.clone();
        std::thread::spawn(move || {
            while Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
                let p = log.next_pos().saturating_sub(200);
                if p > log.first_pos() {
                    println!("TRIM {p}");
                    if let Err(e) = log.trim_prefix(p) {
                        println!("ERR trim: {e}");
                        std::process::exit(4);
                    }
                }
            }
        })
    };
    for t in threads {
        t.join().unwrap();
    }
    trimmer.join().unwrap();
    std::process::exit(0);
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn sigkill_while_appending_loses_nothing_acknowledged() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    eprintln!("crash test seed {seed}");
    let mut rng = Rng(seed);
    let start = Instant::now();
    let mut acked: BTreeMap<u64, u64> = BTreeMap::new();
    let mut kills = 0;
    // The highest position a trim was asked for, and the rounds that found a recycled
    // segment in the log.
    let mut trim_asked = 0u64;
    let mut recycled_rounds = 0;
    for round in 0..ROUNDS {
        if start.elapsed() > TIME_LIMIT {
            break;
        }
        let mut child = Command::new(&exe)
            .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .env(ROUND_ENV, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (first_tx, first_rx) = std::sync::mpsc::channel::<()>();
        let reader = std::thread::spawn(move || {
            let mut acks = Vec::new();
            let mut errs = Vec::new();
            let mut trim = 0u64;
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("ACK ") {
                    let mut it = rest.split(' ');
                    let pos: u64 = it.next().unwrap().parse().unwrap();
                    let tg: u64 = it.next().unwrap().parse().unwrap();
                    if acks.is_empty() {
                        let _ = first_tx.send(());
                    }
                    acks.push((pos, tg));
                } else if let Some(p) = line.strip_prefix("TRIM ") {
                    trim = trim.max(p.parse().unwrap_or(u64::MAX));
                } else if line.starts_with("ERR") {
                    errs.push(line);
                }
            }
            (acks, errs, trim)
        });
        // Half the kills come a random time after the first acknowledgement, the
        // others a random time after the start (possibly during open and recovery).
        if round % 2 == 0 {
            let _ = first_rx.recv_timeout(Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(rng.next() % 150));
        } else {
            std::thread::sleep(Duration::from_millis(rng.next() % 120));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        let (acks, errs, trim) = reader.join().unwrap();
        trim_asked = trim_asked.max(trim);
        assert!(errs.is_empty(), "child errors: {errs:?}");
        for (pos, tg) in &acks {
            if let Some(old) = acked.insert(*pos, *tg) {
                panic!("position {pos} acknowledged twice (tags {old} and {tg}): an acknowledged append was lost");
            }
        }
        let log = Log::open(dir.path(), cfg()).unwrap_or_else(|e| panic!("round {round}: reopen: {e}"));
        // A trim of `p` keeps the segment holding `p`: nothing at or above `p` goes.
        let first = log.first_pos();
        assert!(
            first <= trim_asked.max(1),
            "round {round}: the log starts at {first}, but trims asked up to {trim_asked}"
        );
        acked.retain(|&pos, _| pos >= first);
        for (&pos, &tg) in &acked {
            let r = log.read(pos).unwrap_or_else(|e| panic!("round {round}: acknowledged position {pos} lost: {e}"));
            assert_eq!(r.payload, payload(tg), "round {round}: position {pos} altered");
        }
        let recycled = log
            .segment_paths()
            .iter()
            .filter(|p| {
                let b = std::fs::read(p).unwrap_or_default();
                SegmentHeader::decode(&b).is_ok_and(|h| h.flags & SEG_RECYCLED != 0)
            })
            .count();
        recycled_rounds += usize::from(recycled > 0);
        eprintln!(
            "round {round}: {} acks this round, {} kept, log {first}..{}, {recycled} recycled segments, torn tail {:?}",
            acks.len(),
            acked.len(),
            log.next_pos(),
            log.recovery_report().torn_tail
        );
    }
    assert!(recycled_rounds > 0, "no round found a recycled segment: recycling was not exercised");
    assert!(kills >= MIN_KILLS, "only {kills} kills within the time limit");
    assert!(acked.len() > 100, "too few acknowledged appends ({}) to mean anything", acked.len());
}
