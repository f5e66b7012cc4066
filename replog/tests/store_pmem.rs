//! The store in `pmem` mode on a real DAX filesystem: segments mapped with
//! `MAP_SYNC|MAP_SHARED_VALIDATE`, records made durable by cache-line flushes. Appends
//! of several sizes across segment rolls, a trim, a reopen that must give back every
//! record, the recovery of a torn tail, and the paxos `Storage` conformance suite.
//!
//! Needs a directory on a DAX filesystem in `REPLOG_TEST_PMEM_DIR`. The soft-RoCE VM
//! provides one (`RXE_PMEM=256M hw-setup/rxe-vm.sh run -- <this test binary>`: an
//! emulated pmem region with ext4 mounted `-o dax`). Without it the test prints why and passes, unless
//! `REPLOG_REQUIRE_ALL=1`, which makes that a failure; `test.sh` runs this binary in the
//! VM and sets `REPLOG_TEST_PMEM_IN_VM=1` for its host run, where the test only says so.

use replog::store::conformance::check_storage;
use replog::store::{Durability, Log, Mode, PaxosStore, StoreConfig};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const SEG: u64 = 64 * 1024;

type TestResult = Result<(), String>;

fn cfg() -> StoreConfig {
    StoreConfig::new(Mode::Pmem).with_segment_size(SEG)
}

fn cannot_run(why: &str) {
    if std::env::var("REPLOG_REQUIRE_ALL").is_ok_and(|v| v == "1") {
        panic!("REPLOG_REQUIRE_ALL=1 but this test cannot run: {why}");
    }
    eprintln!("SKIPPED: {why} (set REPLOG_REQUIRE_ALL=1 to make this a failure)");
}

/// A fresh directory on the DAX filesystem, or `None` (after saying why) without one.
fn pmem_dir(test: &str) -> Result<Option<tempfile::TempDir>, String> {
    let Some(root) = std::env::var_os("REPLOG_TEST_PMEM_DIR") else {
        if std::env::var("REPLOG_TEST_PMEM_IN_VM").is_ok_and(|v| v == "1") {
            eprintln!("SKIPPED here: test.sh runs {test} in the soft-RoCE VM, on its emulated pmem");
        } else {
            cannot_run(
                "REPLOG_TEST_PMEM_DIR is not set (a directory on a DAX filesystem; \
                 `RXE_PMEM=256M hw-setup/rxe-vm.sh run -- <this test binary>` provides one)",
            );
        }
        return Ok(None);
    };
    let dir = tempfile::Builder::new()
        .prefix(test)
        .tempdir_in(&root)
        .map_err(|e| format!("cannot make a directory in REPLOG_TEST_PMEM_DIR={}: {e}", Path::new(&root).display()))?;
    Ok(Some(dir))
}

fn open(dir: &Path) -> Result<Log, String> {
    let log = Log::open(dir, cfg()).map_err(|e| format!("open {} in pmem mode: {e}", dir.display()))?;
    if log.durability() != Durability::Pmem || !log.is_durable() || log.flush_instruction().is_none() {
        return Err(format!(
            "{} opened in pmem mode reports {:?} (durable {}, flush {:?})",
            dir.display(),
            log.durability(),
            log.is_durable(),
            log.flush_instruction()
        ));
    }
    Ok(log)
}

/// Sizes from empty to a large share of a segment, including cache-line and 8-byte
/// boundaries (the flush code works in 64-byte lines).
const SIZES: [usize; 14] = [0, 1, 7, 8, 9, 55, 63, 64, 65, 127, 500, 4095, 4097, 20_000];

fn payload(i: u64, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i as usize * 31 + j * 7) as u8 | 1).collect()
}

/// Every record in `first..next` of `log` has the payload `expected[pos - 1]`.
fn check_records(log: &Log, first: u64, expected: &[Vec<u8>], what: &str) -> TestResult {
    let next = expected.len() as u64 + 1;
    if log.first_pos() != first || log.next_pos() != next {
        return Err(format!("{what}: log holds {}..{}, expected {first}..{next}", log.first_pos(), log.next_pos()));
    }
    for pos in first..next {
        let r = log.read(pos).map_err(|e| format!("{what}: read {pos}: {e}"))?;
        if r.meta.pos != pos {
            return Err(format!("{what}: read {pos} returned the record at {}", r.meta.pos));
        }
        let want = &expected[(pos - 1) as usize];
        if &r.payload != want {
            return Err(format!(
                "{what}: record {pos}: {} bytes back, {} written, or other bytes",
                r.payload.len(),
                want.len()
            ));
        }
    }
    let mut n = 0;
    for r in log.iter(first, next) {
        let r = r.map_err(|e| format!("{what}: iterate: {e}"))?;
        n += 1;
        if r.payload != expected[(r.meta.pos - 1) as usize] {
            return Err(format!("{what}: iterating, record {} differs", r.meta.pos));
        }
    }
    if n != next - first {
        return Err(format!("{what}: iterating gave {n} records, expected {}", next - first));
    }
    Ok(())
}

#[test]
fn pmem_appends_across_segments_trim_and_reopen() -> TestResult {
    let Some(dir) = pmem_dir("append-trim-reopen")? else { return Ok(()) };
    let path = dir.path().join("log");
    let mut expected = Vec::new();
    let first;
    {
        let log = open(&path)?;
        // Both append paths (each durable; buffered ones made durable by one sync) until
        // the log spans at least four segments.
        let mut i = 0u64;
        while log.segment_paths().len() < 4 {
            let p = payload(i, SIZES[i as usize % SIZES.len()]);
            let pos = if i.is_multiple_of(3) { log.append_buffered(&p) } else { log.append(&p) }
                .map_err(|e| format!("append {} bytes: {e}", p.len()))?;
            expected.push(p);
            if pos != expected.len() as u64 {
                return Err(format!("append returned position {pos}, expected {}", expected.len()));
            }
            if i % 5 == 4 {
                log.sync().map_err(|e| format!("sync: {e}"))?;
            }
            i += 1;
        }
        log.sync().map_err(|e| format!("sync: {e}"))?;
        if log.durable_pos() != expected.len() as u64 {
            return Err(format!("durable up to {} after sync, appended {}", log.durable_pos(), expected.len()));
        }
        check_records(&log, 1, &expected, "before the trim")?;
        // Trim to the middle of the log: whole segments below go.
        let cut = expected.len() as u64 / 2;
        first = log.trim_prefix(cut).map_err(|e| format!("trim_prefix({cut}): {e}"))?;
        if first <= 1 || first > cut {
            return Err(format!("trim_prefix({cut}) left the log starting at {first}"));
        }
        check_records(&log, first, &expected, "after the trim")?;
        eprintln!(
            "pmem: {} records in {} segments of {SEG} bytes, trimmed to start at {first}",
            expected.len(),
            log.segment_paths().len()
        );
    }
    // Reopen: recovery finds exactly what was written, with no torn tail.
    {
        let log = open(&path)?;
        let report = log.recovery_report();
        if report.torn_tail.is_some() {
            return Err(format!("a clean close left a torn tail: {:?}", report.torn_tail));
        }
        check_records(&log, first, &expected, "after reopening")?;
        // The reopened log takes appends (the recycled trimmed segments included).
        let start = expected.len();
        while log.segment_paths().len() < 6 {
            let i = expected.len() as u64;
            let p = payload(i, SIZES[(i as usize * 5 + 3) % SIZES.len()]);
            log.append(&p).map_err(|e| format!("append after reopening: {e}"))?;
            expected.push(p);
        }
        eprintln!("pmem: {} more records after reopening", expected.len() - start);
    }
    let log = open(&path)?;
    check_records(&log, first, &expected, "after the second reopen")
}

/// The last record, half written: recovery keeps every record before it, reports the
/// torn tail at its offset, and the log continues there.
#[test]
fn pmem_torn_tail_is_recovered() -> TestResult {
    let Some(dir) = pmem_dir("torn-tail")? else { return Ok(()) };
    let path = dir.path().join("log");
    let mut expected = Vec::new();
    let (seg, offset, size): (PathBuf, u64, u64);
    {
        let log = open(&path)?;
        for i in 0..40u64 {
            let p = payload(i, SIZES[i as usize % SIZES.len()].min(3000));
            log.append(&p).map_err(|e| format!("append: {e}"))?;
            expected.push(p);
        }
        let last = expected.len() as u64;
        let loc = log.locate(last).map_err(|e| format!("locate {last}: {e}"))?;
        seg = loc.path.ok_or_else(|| format!("record {last} has no segment file"))?;
        (offset, size) = (loc.offset, loc.size);
    }
    if size < 64 {
        return Err(format!("the last record is {size} bytes: too short to tear in the middle"));
    }
    // A write cut in the middle: the second half of the record never reached the media
    // (zeros, as in a fresh segment).
    let torn_from = offset + size / 2;
    let f = std::fs::OpenOptions::new().write(true).open(&seg).map_err(|e| format!("open {}: {e}", seg.display()))?;
    f.write_all_at(&vec![0u8; (offset + size - torn_from) as usize], torn_from)
        .map_err(|e| format!("tear {}: {e}", seg.display()))?;
    f.sync_all().map_err(|e| format!("sync {}: {e}", seg.display()))?;
    drop(f);
    expected.pop();
    {
        let log = open(&path)?;
        match &log.recovery_report().torn_tail {
            Some((p, o)) if *p == seg && *o == offset => {}
            other => return Err(format!("torn tail reported as {other:?}, expected ({}, {offset})", seg.display())),
        }
        check_records(&log, 1, &expected, "after recovering the torn tail")?;
        // The log continues where the torn record was.
        let p = payload(1000, 777);
        let pos = log.append(&p).map_err(|e| format!("append after recovery: {e}"))?;
        expected.push(p);
        if pos != expected.len() as u64 {
            return Err(format!("append after recovery returned {pos}, expected {}", expected.len()));
        }
        let loc = log.locate(pos).map_err(|e| format!("locate {pos}: {e}"))?;
        if loc.offset != offset {
            return Err(format!("the next record went to offset {}, not the torn record's {offset}", loc.offset));
        }
    }
    let log = open(&path)?;
    if log.recovery_report().torn_tail.is_some() {
        return Err(format!("a torn tail after the repair: {:?}", log.recovery_report().torn_tail));
    }
    check_records(&log, 1, &expected, "after the repair and a reopen")
}

/// The paxos `Storage` conformance suite, with reopens, on pmem (the host's run of it in
/// store_conformance.rs can only see pmem refused).
#[test]
fn pmem_paxos_store_conformance() -> TestResult {
    let Some(dir) = pmem_dir("conformance")? else { return Ok(()) };
    let path = dir.path().join("store");
    let cfg = StoreConfig::new(Mode::Pmem).with_segment_size(16 * 1024);
    let open_store = move |path: &Path| match PaxosStore::open(path, cfg) {
        Ok(s) => {
            assert_eq!(s.log().durability(), Durability::Pmem, "{} opened in pmem mode", path.display());
            s
        }
        Err(e) => panic!("open the paxos store in {} in pmem mode: {e}", path.display()),
    };
    let p2 = path.clone();
    let mut fresh = move || open_store(&path);
    let mut reopen = move |s: PaxosStore| {
        drop(s);
        let s = open_store(&p2);
        assert!(s.log().recovery_report().torn_tail.is_none(), "a torn tail after a clean close");
        s
    };
    check_storage(&mut fresh, Some(&mut reopen));
    Ok(())
}
