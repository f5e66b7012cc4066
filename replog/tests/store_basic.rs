//! The general log API in every mode: append, read, iterate, wait, trim, truncate,
//! reopen; mode reporting; pmem refusal.

use replog::store::{Durability, Log, Mode, RecordKind, StoreConfig, StoreError};
use std::sync::Arc;
use std::time::Duration;

const SEG: u64 = 8192;

fn cfg(mode: Mode) -> StoreConfig {
    StoreConfig::new(mode).with_segment_size(SEG)
}

fn payload(i: u64) -> Vec<u8> {
    let len = (i * 37 % 500) as usize;
    (0..len).map(|j| (i as usize * 31 + j) as u8).collect()
}

const FILE_MODES: [Mode; 2] = [Mode::Fsync, Mode::MappedNotDurable];

#[test]
fn append_read_iterate_reopen() {
    for mode in FILE_MODES {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = Log::open(dir.path(), cfg(mode)).unwrap();
            assert_eq!(log.first_pos(), 1);
            assert_eq!(log.next_pos(), 1);
            for i in 1..=100u64 {
                let pos = if i % 3 == 0 {
                    log.append(&payload(i)).unwrap()
                } else {
                    log.append_buffered(&payload(i)).unwrap()
                };
                assert_eq!(pos, i);
            }
            log.sync().unwrap();
            assert_eq!(log.durable_pos(), 100);
            assert!(log.segment_paths().len() > 1, "records span several segments");
            for (i, r) in log.iter(1, 101).enumerate() {
                let r = r.unwrap();
                assert_eq!(r.meta.pos, i as u64 + 1);
                assert_eq!(r.meta.kind, RecordKind::Data);
                assert_eq!(r.payload, payload(i as u64 + 1));
            }
        }
        let log = Log::open(dir.path(), cfg(mode)).unwrap();
        assert_eq!(log.next_pos(), 101, "{mode:?}");
        assert_eq!(log.recovery_report().records, 100);
        assert_eq!(log.recovery_report().torn_tail, None);
        for i in 1..=100u64 {
            assert_eq!(log.read(i).unwrap().payload, payload(i), "{mode:?} pos {i}");
        }
        assert!(matches!(log.read(101), Err(StoreError::OutOfRange { .. })));
        assert!(matches!(log.read(0), Err(StoreError::OutOfRange { .. })));
        assert_eq!(log.append(b"more").unwrap(), 101);
    }
}

#[test]
fn memory_mode() {
    let log = Log::memory(SEG).unwrap();
    assert_eq!(log.durability(), Durability::Memory);
    assert!(!log.is_durable());
    for i in 1..=200u64 {
        assert_eq!(log.append_buffered(&payload(i)).unwrap(), i);
    }
    assert_eq!(log.durable_pos(), 200);
    for i in 1..=200u64 {
        assert_eq!(log.read(i).unwrap().payload, payload(i));
    }
    log.truncate_suffix(150).unwrap();
    assert_eq!(log.next_pos(), 150);
    let first = log.trim_prefix(100).unwrap();
    assert!(first > 1 && first <= 100);
    assert!(log.read(first - 1).is_err());
    assert_eq!(log.read(first).unwrap().payload, payload(first));
    assert!(log.active_region().is_some());
}

#[test]
fn mode_reporting_and_pmem_refusal() {
    let dir = tempfile::tempdir().unwrap();
    // This machine has no DAX filesystem: pmem must be refused, never faked.
    match Log::open(dir.path().join("p"), cfg(Mode::Pmem)) {
        Err(StoreError::PmemUnavailable { reason, .. }) => {
            assert!(reason.contains("MAP_SYNC"), "{reason}");
            eprintln!("pmem refused as expected: {reason}");
        }
        Ok(log) => {
            // On a real DAX filesystem this is right; report it.
            assert_eq!(log.durability(), Durability::Pmem);
            eprintln!("pmem mapping accepted: this directory is on a DAX filesystem");
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
    let log = Log::open(dir.path().join("m"), cfg(Mode::MappedNotDurable)).unwrap();
    assert_eq!(log.durability(), Durability::Memory);
    assert!(!log.is_durable());
    assert!(log.flush_instruction().is_some());
    let log = Log::open(dir.path().join("f"), cfg(Mode::Fsync)).unwrap();
    assert_eq!(log.durability(), Durability::Fsync);
    assert!(log.is_durable());
    assert!(log.active_region().is_none());
}

#[test]
fn region_shows_the_documented_layout() {
    use replog::store::format::{check_record, SegmentHeader};
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), cfg(Mode::MappedNotDurable)).unwrap();
    let p1 = log.append(b"hello").unwrap();
    let p2 = log.append(b"world, longer payload").unwrap();
    let region = log.active_region().unwrap();
    assert_eq!(region.len as u64, SEG);
    let loc = log.locate(p2).unwrap();
    log.with_active_region(|bytes| {
        let h = match SegmentHeader::decode(bytes) {
            Ok(h) => h,
            Err(e) => panic!("the active segment's header does not decode: {e}"),
        };
        assert_eq!(h.epoch, region.epoch);
        assert_eq!(h.base_pos, 1);
        let (rh, size) = match check_record(bytes, 64, h.epoch, Some(p1)) {
            Ok(r) => r,
            Err(f) => panic!("the first record does not validate: {}", f.as_str()),
        };
        assert_eq!(rh.payload_len, 5);
        assert_eq!(&bytes[64 + 56..64 + 61], b"hello");
        let (rh2, size2) = match check_record(bytes, 64 + size, h.epoch, Some(p2)) {
            Ok(r) => r,
            Err(f) => panic!("the second record does not validate: {}", f.as_str()),
        };
        assert_eq!(rh2.pos, p2);
        assert_eq!(loc.offset as usize, 64 + size);
        assert_eq!(loc.size as usize, size2);
        assert_eq!(region.write_offset as usize, 64 + size + size2);
    })
    .unwrap();
}

#[test]
fn wait_for_tail() {
    for mode in [Mode::Fsync, Mode::MappedNotDurable, Mode::Memory] {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(Log::open(dir.path(), cfg(mode)).unwrap());
        assert!(!log.wait_for(1, Duration::from_millis(20)).unwrap(), "times out");
        let l2 = log.clone();
        let waiter = std::thread::spawn(move || l2.wait_for(3, Duration::from_secs(10)).unwrap());
        std::thread::sleep(Duration::from_millis(20));
        for i in 1..=3u64 {
            log.append(&payload(i)).unwrap();
        }
        assert!(waiter.join().unwrap(), "{mode:?}");
    }
}

#[test]
fn trim_prefix_drops_whole_segments() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), cfg(Mode::Fsync)).unwrap();
    for i in 1..=200u64 {
        log.append_buffered(&payload(i)).unwrap();
    }
    log.sync().unwrap();
    let before = log.segment_paths();
    let first = log.trim_prefix(120).unwrap();
    assert!(first <= 120 && first > 1, "first {first}");
    let after = log.segment_paths();
    assert!(after.len() < before.len());
    for p in &before[..before.len() - after.len()] {
        assert!(!p.exists(), "{} removed", p.display());
    }
    for i in first..=200 {
        assert_eq!(log.read(i).unwrap().payload, payload(i));
    }
    drop(log);
    let log = Log::open(dir.path(), cfg(Mode::Fsync)).unwrap();
    assert_eq!(log.first_pos(), first);
    assert_eq!(log.next_pos(), 201);
    // Trimming everything keeps the active segment.
    log.trim_prefix(10_000).unwrap();
    assert_eq!(log.segment_paths().len(), 1);
    assert_eq!(log.next_pos(), 201);
}

#[test]
fn truncate_suffix_is_durable_and_appends_resume() {
    for mode in FILE_MODES {
        for cut in [1u64, 2, 57, 100, 150, 199, 200] {
            let dir = tempfile::tempdir().unwrap();
            let log = Log::open(dir.path(), cfg(mode)).unwrap();
            for i in 1..=200u64 {
                log.append_buffered(&payload(i)).unwrap();
            }
            log.sync().unwrap();
            log.truncate_suffix(cut).unwrap();
            assert_eq!(log.next_pos(), cut);
            drop(log);
            // Reopen right after the truncation: the end marker ends the log.
            let log = Log::open(dir.path(), cfg(mode)).unwrap();
            assert_eq!(log.next_pos(), cut, "{mode:?} cut {cut}");
            // Append different data, crossing segment boundaries.
            for i in cut..cut + 60 {
                assert_eq!(log.append(&payload(i + 1000)).unwrap(), i);
            }
            drop(log);
            let log = Log::open(dir.path(), cfg(mode)).unwrap();
            assert_eq!(log.next_pos(), cut + 60, "{mode:?} cut {cut}");
            for i in 1..cut {
                assert_eq!(log.read(i).unwrap().payload, payload(i));
            }
            for i in cut..cut + 60 {
                assert_eq!(log.read(i).unwrap().payload, payload(i + 1000));
            }
        }
    }
}

#[test]
fn too_large_and_invalid_config() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), cfg(Mode::Fsync)).unwrap();
    let big = vec![0u8; SEG as usize];
    assert!(matches!(log.append(&big), Err(StoreError::TooLarge { .. })));
    let max = vec![7u8; log.max_payload() as usize];
    let p = log.append(&max).unwrap();
    assert_eq!(log.read(p).unwrap().payload, max);
    assert!(matches!(
        Log::open(dir.path().join("x"), cfg(Mode::Fsync).with_segment_size(100)),
        Err(StoreError::Invalid(_))
    ));
    assert!(log.append_record(RecordKind::End, 0, Default::default(), b"").is_err());
}

#[test]
fn group_commit_many_threads() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::open(dir.path(), StoreConfig::new(Mode::Fsync)).unwrap());
    let threads: Vec<_> = (0..16u64)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut got = Vec::new();
                for i in 0..50u64 {
                    let p = log.append(&payload(t * 1000 + i)).unwrap();
                    assert!(log.durable_pos() >= p, "acknowledged only once durable");
                    got.push((p, t * 1000 + i));
                }
                got
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in threads {
        all.extend(t.join().unwrap());
    }
    assert_eq!(all.len(), 800);
    for (p, k) in all {
        assert_eq!(log.read(p).unwrap().payload, payload(k));
    }
}

/// Many appenders over small segments (so group commits meet segment rolls) while a
/// reader reads the newest records (served from the not yet written batch buffer or
/// from the file): every append returns, durable, exactly once, and reads back intact.
#[test]
fn group_commit_with_rolls_and_concurrent_reads() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::open(dir.path(), StoreConfig::new(Mode::Fsync).with_segment_size(64 * 1024)).unwrap());
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (log, stop) = (log.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut reads = 0u64;
            let mut buf = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let next = log.next_pos();
                if next > log.first_pos() {
                    log.read_into(next - 1, &mut buf).expect("the newest record reads back");
                    reads += 1;
                }
            }
            reads
        })
    };
    for t in 0..32u64 {
        let (log, done_tx) = (log.clone(), done_tx.clone());
        std::thread::spawn(move || {
            let mut got = Vec::new();
            for i in 0..150u64 {
                let k = t * 1000 + i;
                let p = log.append(&payload(k)).unwrap();
                assert!(log.durable_pos() >= p, "acknowledged only once durable");
                got.push((p, k));
            }
            done_tx.send(got).unwrap();
        });
    }
    drop(done_tx);
    let mut all = std::collections::BTreeMap::new();
    for _ in 0..32 {
        // Bounded: a lost wake-up would hang an appender, and this test with it.
        let got = done_rx.recv_timeout(Duration::from_secs(120)).expect("every appender finishes");
        for (p, k) in got {
            assert!(all.insert(p, k).is_none(), "position {p} acknowledged twice");
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);
    assert_eq!(all.len(), 32 * 150);
    assert!(log.segment_paths().len() > 3, "the appends rolled segments");
    for (&p, &k) in &all {
        assert_eq!(log.read(p).unwrap().payload, payload(k));
    }
    drop(log);
    let log = Log::open(dir.path(), StoreConfig::new(Mode::Fsync).with_segment_size(64 * 1024)).unwrap();
    for (&p, &k) in &all {
        assert_eq!(log.read(p).unwrap().payload, payload(k), "after reopening");
    }
}

/// The spare files (trimmed segments kept for reuse) in `dir`.
fn spares(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".log.spare"))
        .collect();
    v.sort();
    v
}

/// Whether segment file `p` carries the recycled flag.
fn recycled(p: &std::path::Path) -> bool {
    let b = std::fs::read(p).unwrap();
    match replog::store::format::SegmentHeader::decode(&b) {
        Ok(h) => h.flags & replog::store::format::SEG_RECYCLED != 0,
        Err(e) => panic!("{}: {e}", p.display()),
    }
}

#[test]
fn fsync_mode_reuses_trimmed_segments_and_other_modes_remove_them() {
    // fsync mode, two spares: trimming four sealed segments keeps two files and removes
    // two; the next two rolls reuse them, the one after creates a segment.
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), cfg(Mode::Fsync)).unwrap();
    let mut i = 0u64;
    let mut fill_to = |log: &Log, segments: usize| {
        while log.segment_paths().len() < segments {
            i += 1;
            log.append_buffered(&payload(i)).unwrap();
        }
        log.sync().unwrap();
    };
    fill_to(&log, 5);
    let first_kept = log.trim_prefix(log.next_pos() - 1).unwrap();
    assert_eq!(log.segment_paths().len(), 1);
    assert_eq!(spares(dir.path()).len(), 2, "two trimmed segments kept");
    assert!(!recycled(&log.segment_paths()[0]));
    fill_to(&log, 3);
    let segs = log.segment_paths();
    assert!(recycled(&segs[1]) && recycled(&segs[2]), "the two new segments are the spares, reused");
    assert!(spares(dir.path()).is_empty());
    fill_to(&log, 4);
    assert!(!recycled(&log.segment_paths()[3]), "no spare left: a fresh segment");
    let next = log.next_pos();
    drop(log);

    // Reopened: every record since the trim is there, the spares kept by a trim survive
    // a restart, and a recycled segment's stale bytes end no record early.
    let log = Log::open(dir.path(), cfg(Mode::Fsync)).unwrap();
    assert_eq!((log.first_pos(), log.next_pos()), (first_kept, next));
    assert_eq!(log.recovery_report().torn_tail, None);
    for p in first_kept..next {
        let r = match log.read(p) {
            Ok(r) => r,
            Err(e) => panic!("position {p}: {e}"),
        };
        assert_eq!(r.payload, payload(p), "position {p}");
    }
    log.trim_prefix(next - 1).unwrap();
    assert_eq!(spares(dir.path()).len(), 2);
    drop(log);
    let log = Log::open(dir.path(), cfg(Mode::Fsync)).unwrap();
    assert_eq!(spares(dir.path()).len(), 2, "spares found at open are kept");
    drop(log);

    // A spare that changed size while the log ran is not reused: the roll removes it
    // and creates a fresh segment.
    let log = Log::open(dir.path(), cfg(Mode::Fsync)).unwrap();
    for p in spares(dir.path()) {
        std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(SEG / 2).unwrap();
    }
    let before = log.segment_paths().len();
    while log.segment_paths().len() == before {
        log.append_buffered(b"roll").unwrap();
    }
    log.sync().unwrap();
    assert!(!recycled(log.segment_paths().last().unwrap()), "a fresh segment");
    assert_eq!(spares(dir.path()).len(), 1, "the short spare tried is removed, the other kept");
    drop(log);

    // Another segment size: the spares do not fit and are removed at open.
    let log = Log::open(dir.path(), StoreConfig::new(Mode::Fsync).with_segment_size(2 * SEG)).unwrap();
    assert!(spares(dir.path()).is_empty(), "spares of another size removed");
    drop(log);

    // Recycling off, and the mapped mode: trimmed segments are removed.
    for c in [cfg(Mode::Fsync).with_recycled_segments(0), cfg(Mode::MappedNotDurable)] {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), c).unwrap();
        let mut i = 0u64;
        while log.segment_paths().len() < 4 {
            i += 1;
            log.append_buffered(&payload(i)).unwrap();
        }
        log.sync().unwrap();
        log.trim_prefix(log.next_pos() - 1).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "{:?}: only the active segment", c.mode);
    }
}
