//! Store benchmark: appends/s and append latency per durability mode, for 64 B and
//! 4 KiB records, at 1 and 64 concurrent appenders, next to the raw limits measured in
//! the same run (pwrite+fdatasync loop on a written, synced file: the disk's best case;
//! memcpy+flush+fence on a mapped file).
//!
//! Run: `cargo run --release -p replog --bin store-bench -- [DIR] [SECONDS_PER_RUN]`
//! (DIR defaults to a fresh directory under /tmp, which is what "disk" means here;
//! SECONDS_PER_RUN defaults to 2). A third argument `MODE/SIZE/THREADS` (for example
//! `fsync/64/64`) runs only that store configuration, without the raw loops: for
//! profiling one case (`perf record -g -- store-bench DIR 3 fsync/64/64`).

use replog::store::persist::{fence, FlushInstr, Mapping};
use replog::store::{Log, Mode, StoreConfig, StoreError};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Stats {
    ops: usize,
    secs: f64,
    p50_us: f64,
    p99_us: f64,
}

impl Stats {
    /// `lat_ns`: one sample per `batch` operations (their mean).
    fn from(mut lat_ns: Vec<u64>, secs: f64, batch: usize) -> Stats {
        lat_ns.sort_unstable();
        let q = |f: f64| {
            if lat_ns.is_empty() {
                0.0
            } else {
                lat_ns[((lat_ns.len() - 1) as f64 * f) as usize] as f64 / 1000.0
            }
        };
        Stats { ops: lat_ns.len() * batch, secs, p50_us: q(0.50), p99_us: q(0.99) }
    }
    fn rate(&self) -> f64 {
        self.ops as f64 / self.secs
    }
}

fn print_row(what: &str, size: usize, threads: usize, s: &Stats) {
    println!(
        "{what:<28} {size:>6} B {threads:>3} thr {:>12.0} appends/s   p50 {:>9.2} us   p99 {:>9.2} us   ({} ops)",
        s.rate(),
        s.p50_us,
        s.p99_us,
        s.ops
    );
}

/// Cap on appends per run, so memory mode (which keeps everything) stays bounded.
/// Appends per latency sample where one append is too short to time alone (mapped and
/// memory modes, the raw mapped loop): a sample is the mean of this many.
const BATCH: usize = 32;

fn cap(size: usize) -> usize {
    (512 << 20) / (size + 64)
}

/// Brings a fresh log to the steady state of one that trims behind itself (a replica
/// after snapshots): its active segment and the spares after it are trimmed segments'
/// files, reused (fsync mode). Filled with 64 KiB records, buffered: the content does
/// not matter, only that the files' blocks were written.
fn recycle_warm_up(log: &Log) -> Result<(), StoreError> {
    let filler = vec![0x5Au8; 64 << 10];
    let fill_until = |done: &dyn Fn(&Log) -> bool| -> Result<(), StoreError> {
        while !done(log) {
            log.append_buffered(&filler)?;
        }
        log.sync()
    };
    fill_until(&|l| l.segment_paths().len() >= 3)?;
    log.trim_prefix(log.next_pos() - 1)?;
    let active = log.segment_paths().last().cloned();
    fill_until(&|l| l.segment_paths().last() != active.as_ref())?;
    log.trim_prefix(log.next_pos() - 1)?;
    Ok(())
}

fn bench_store(
    dir: &Path,
    mode: Mode,
    size: usize,
    threads: usize,
    dur: Duration,
    recycled: bool,
) -> Result<Stats, StoreError> {
    let _ = std::fs::remove_dir_all(dir);
    let log = Arc::new(Log::open(dir, StoreConfig::new(mode))?);
    if recycled {
        recycle_warm_up(&log)?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    // With recycling, the log trims behind the appenders (to its active segment) as a
    // replica does after snapshots, so that every new segment is a reused file.
    let trimmer = recycled.then(|| {
        let (log, stop) = (log.clone(), stop.clone());
        std::thread::spawn(move || -> Result<(), StoreError> {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(5));
                log.trim_prefix(log.next_pos() - 1)?;
            }
            Ok(())
        })
    });
    let per_thread = cap(size) / threads;
    let batch = if mode == Mode::Fsync { 1 } else { BATCH };
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let log = log.clone();
            let stop = stop.clone();
            std::thread::spawn(move || -> Result<(Vec<u64>, Instant), StoreError> {
                let payload = vec![t as u8; size];
                let mut lat = Vec::with_capacity((per_thread / batch).min(1 << 20));
                while !stop.load(Ordering::Relaxed) && lat.len() * batch < per_thread {
                    let t0 = Instant::now();
                    for _ in 0..batch {
                        log.append(&payload)?;
                    }
                    lat.push(t0.elapsed().as_nanos() as u64 / batch as u64);
                }
                Ok((lat, Instant::now()))
            })
        })
        .collect();
    let deadline = start + dur;
    while Instant::now() < deadline && !handles.iter().all(|h| h.is_finished()) {
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let mut end = start;
    for h in handles {
        let (lat, done) = h.join().expect("bench thread")?;
        all.extend(lat);
        end = end.max(done);
    }
    if let Some(t) = trimmer {
        t.join().expect("trimmer thread")?;
    }
    let secs = (end - start).as_secs_f64();
    drop(log);
    let _ = std::fs::remove_dir_all(dir);
    Ok(Stats::from(all, secs, batch))
}

/// Where a raw pwrite+fdatasync loop writes.
#[derive(Clone, Copy, PartialEq)]
enum Blocks {
    /// A file whose blocks are all written (zeros) and synced: the device's best case,
    /// each fdatasync carries only the data, never a filesystem metadata change (block
    /// allocation or unwritten-extent conversion) and the journal commit it needs.
    Written,
    /// A preallocated file, as a store segment is: each fdatasync also converts the
    /// unwritten extents it wrote (a journal commit).
    Preallocated,
}

fn raw_fdatasync(dir: &Path, size: usize, dur: Duration, blocks: Blocks) -> Stats {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("raw-fdatasync");
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    let len = if blocks == Blocks::Written { 64u64 << 20 } else { 1 << 30 };
    if blocks == Blocks::Written {
        let zeros = vec![0u8; 1 << 20];
        for i in 0..len >> 20 {
            f.write_all_at(&zeros, i << 20).unwrap();
        }
    } else {
        // SAFETY: fallocate on an open descriptor.
        let r = unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 0, len as libc::off_t) };
        assert_eq!(r, 0, "fallocate: {}", std::io::Error::last_os_error());
    }
    f.sync_all().unwrap();
    let buf = vec![7u8; size];
    let mut lat = Vec::new();
    let mut off = 0u64;
    let start = Instant::now();
    while start.elapsed() < dur {
        let t0 = Instant::now();
        f.write_all_at(&buf, off).unwrap();
        f.sync_data().unwrap();
        lat.push(t0.elapsed().as_nanos() as u64);
        off = (off + size as u64) % (len - size as u64);
        if blocks == Blocks::Preallocated && off < size as u64 {
            break; // written through: the rest would be written blocks
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    Stats::from(lat, secs, 1)
}

fn raw_mapped(dir: &Path, size: usize, dur: Duration, flush: FlushInstr) -> Stats {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("raw-mapped");
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    // Prepared as a store segment is (preallocated, then mapped), so that both pay the
    // same first-touch page faults.
    let len = 256usize << 20;
    // SAFETY: fallocate on an open descriptor.
    let r = unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 0, len as libc::off_t) };
    assert_eq!(r, 0, "fallocate: {}", std::io::Error::last_os_error());
    let mut map = Mapping::map(&f, len, false).unwrap();
    let buf = vec![7u8; size];
    let mut lat = Vec::new();
    let mut off = 0usize;
    let start = Instant::now();
    while start.elapsed() < dur && lat.len() * BATCH < cap(size) {
        let t0 = Instant::now();
        for _ in 0..BATCH {
            let dst = &mut map.as_mut_slice()[off..off + size];
            dst.copy_from_slice(&buf);
            flush.flush(dst);
            fence();
            off = (off + size.next_multiple_of(64)) % (len - size - 64);
        }
        lat.push(t0.elapsed().as_nanos() as u64 / BATCH as u64);
    }
    let secs = start.elapsed().as_secs_f64();
    drop(map);
    let _ = std::fs::remove_file(&path);
    Stats::from(lat, secs, BATCH)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let base: PathBuf = args
        .get(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join(format!("replog-store-bench-{}", std::process::id())));
    let secs: f64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2.0);
    let dur = Duration::from_secs_f64(secs);
    let flush = FlushInstr::detect().expect("a cache-line flush instruction");
    if let Some(only) = args.get(3) {
        let parts: Vec<&str> = only.split('/').collect();
        let mode = match parts.first().copied() {
            Some("fsync") => Mode::Fsync,
            Some("mapped") => Mode::MappedNotDurable,
            Some("memory") => Mode::Memory,
            _ => panic!(
                "configuration {only:?}: expected MODE/SIZE/THREADS[/recycled], MODE one of fsync, mapped, memory"
            ),
        };
        let num = |i: usize| -> usize {
            parts.get(i).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("configuration {only:?}: bad number"))
        };
        let (size, threads) = (num(1), num(2));
        match bench_store(&base.join("store"), mode, size, threads, dur, parts.get(3) == Some(&"recycled")) {
            Ok(s) => print_row(only, size, threads, &s),
            Err(e) => println!("{only}: ERROR {e}"),
        }
        return;
    }
    println!("store-bench: dir {}, {secs} s per run, flush {flush:?}", base.display());
    println!(
        "(latencies of the mapped and memory modes and of the raw mapped loop are per-append means \
         over batches of {BATCH}: one append is near the timer's resolution)"
    );

    match Log::open(base.join("pmem-probe"), StoreConfig::new(Mode::Pmem)) {
        Ok(_) => println!("pmem: available (DAX); measured below as mapped"),
        Err(e) => println!("pmem: not available here: {e}"),
    }
    let _ = std::fs::remove_dir_all(base.join("pmem-probe"));

    for size in [64usize, 4096] {
        println!("\n== {size} B records ==");
        let raw_sync = raw_fdatasync(&base, size, dur, Blocks::Written);
        print_row("raw pwrite+fdatasync", size, 1, &raw_sync);
        // What one fdatasync of a whole 64-appender batch costs: the disk's ceiling for
        // group commit with 64 appenders (each commit carrying all 64 records), into
        // written blocks and into preallocated ones (what a store segment has).
        let rec = replog::store::format::record_size(size as u64) as usize;
        let ceiling: Vec<(Stats, &str)> = [(Blocks::Written, "written"), (Blocks::Preallocated, "preallocated")]
            .into_iter()
            .map(|(b, what)| {
                let s = raw_fdatasync(&base, 64 * rec, dur, b);
                print_row(&format!("raw batch of 64 ({what})"), 64 * rec, 1, &s);
                (s, what)
            })
            .collect();
        let raw_map = raw_mapped(&base, size, dur, flush);
        print_row("raw memcpy+flush+fence", size, 1, &raw_map);
        // The bytes a store record of this payload occupies (header, payload, padding,
        // commit word): what the store copies and flushes.
        let raw_rec = raw_mapped(&base, rec, dur, flush);
        print_row("raw memcpy+flush+fence", rec, 1, &raw_rec);
        let mut fsync1 = None;
        let mut fsync64 = None;
        let mut recycled64 = None;
        let mut mapped1 = None;
        for (mode, name, recycled) in [
            (Mode::Fsync, "store fsync", false),
            (Mode::Fsync, "store fsync, recycled", true),
            (Mode::MappedNotDurable, "store mapped (NOT durable)", false),
            (Mode::Memory, "store memory", false),
        ] {
            for threads in [1usize, 64] {
                match bench_store(&base.join("store"), mode, size, threads, dur, recycled) {
                    Ok(s) => {
                        print_row(name, size, threads, &s);
                        match (mode, threads, recycled) {
                            (Mode::Fsync, 1, false) => fsync1 = Some(s),
                            (Mode::Fsync, 64, false) => fsync64 = Some(s),
                            (Mode::Fsync, 64, true) => recycled64 = Some(s),
                            (Mode::MappedNotDurable, 1, _) => mapped1 = Some(s),
                            _ => {}
                        }
                    }
                    Err(e) => println!("{name:<28} {size:>6} B {threads:>3} thr  ERROR {e}"),
                }
            }
        }
        let verdict = |ok: bool| if ok { "ok" } else { "BELOW TARGET" };
        for (s, what) in [(&fsync64, "a fresh log"), (&recycled64, "recycled segments, the log trimming behind")] {
            let Some(s) = s else { continue };
            let r = s.rate() / raw_sync.rate();
            println!(
                "ratio fsync 64 appenders ({what}) / raw fdatasync rate: {r:.1}x (target >= 20x: {})",
                verdict(r >= 20.0)
            );
            for (c, what) in &ceiling {
                let bound = 64.0 * c.rate();
                println!(
                    "  disk ceiling, batches of 64 into {what} blocks: {bound:.0} appends/s = {:.1}x raw; store at {:.0}% of it",
                    bound / raw_sync.rate(),
                    100.0 * s.rate() / bound
                );
            }
        }
        if let Some(s) = &fsync1 {
            let r = s.p50_us / raw_sync.p50_us;
            println!("ratio fsync 1 appender p50 / raw fdatasync p50: {r:.2}x (target <= 1.3x: {})", verdict(r <= 1.3));
        }
        if let Some(s) = &mapped1 {
            for (raw, what) in [(&raw_map, "payload"), (&raw_rec, "record")] {
                let r = s.p50_us / raw.p50_us;
                let rr = raw.rate() / s.rate();
                // The rates include first-touch page faults, which differ between the raw
                // loop's one 256 MiB file and the store's 64 MiB segments (each created,
                // preallocated and synced when the last one fills): informative only.
                println!(
                    "ratio mapped 1 appender p50 / raw memcpy+flush p50 ({what} bytes): {r:.2}x (target <= 2x: \
                     {}); rate {rr:.2}x slower (page faults included)",
                    verdict(r <= 2.0)
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&base);
}
