//! Property tests of recovery: random appends (with random sync points), then
//! (a) the last segment cut at every byte (from there on, the bytes the file held
//! before the appends, and the file truncated there), and (b) single bit flips anywhere
//! in any segment. Recovery must return exactly the longest valid prefix, or refuse
//! with the corruption error when the damaged record is in the middle (followed by data
//! proving it was durable).
//!
//! Both on fresh segments (preallocated: the bytes before were zeros) and on recycled
//! ones (trimmed segments' files reused: the bytes before were an earlier segment's
//! records, under another epoch).

use proptest::prelude::*;
use replog::store::{Log, Mode, RecordMeta, StoreConfig, StoreError};
use std::path::{Path, PathBuf};

const SEG: u64 = 4096;

fn cfg() -> StoreConfig {
    StoreConfig::new(Mode::Fsync).with_segment_size(SEG)
}

fn scratch_dir() -> tempfile::TempDir {
    // tmpfs when there is one: thousands of reopens per case.
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new().prefix("replog-prop").tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().unwrap()
}

struct Rec {
    meta: RecordMeta,
    payload: Vec<u8>,
    seg: usize,
    offset: u64,
    size: u64,
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    files: Vec<(PathBuf, Vec<u8>)>,
    /// Every file in the directory (segments and spares) as built.
    all_files: Vec<(PathBuf, Vec<u8>)>,
    recs: Vec<Rec>,
    /// The log's first position.
    base: u64,
    /// What the last segment's file held before its records were written: zeros for a
    /// fresh segment, an earlier segment's bytes for a recycled one.
    before_last: Vec<u8>,
}

/// The images of the spare files (trimmed segments kept for reuse) in `dir`.
fn spare_images(dir: &Path) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_name().to_string_lossy().ends_with(".log.spare") {
            out.push(std::fs::read(e.path()).unwrap());
        }
    }
    out
}

impl Fixture {
    /// Appends records of the given sizes; `true` means sync after that append. With
    /// `recycled`, the log first runs through three segments and trims them, so that
    /// its active segment and the next ones are trimmed segments' files, reused.
    fn build(ops: &[(usize, bool)], recycled: bool) -> Fixture {
        let dir = scratch_dir();
        let path = dir.path().to_path_buf();
        let log = Log::open(&path, cfg()).unwrap();
        let mut befores = Vec::new();
        if recycled {
            let filler: Vec<u8> = (0..300).map(|j| (j * 13) as u8 | 0x80).collect();
            while log.segment_paths().len() < 3 {
                log.append_buffered(&filler).unwrap();
            }
            log.sync().unwrap();
            log.trim_prefix(log.next_pos() - 1).unwrap();
            befores.extend(spare_images(&path));
            assert_eq!(befores.len(), 2, "two trimmed segments kept as spares");
            let active = log.segment_paths().last().cloned();
            while log.segment_paths().last() == active.as_ref() {
                log.append_buffered(&filler).unwrap();
            }
            log.sync().unwrap();
            log.trim_prefix(log.next_pos() - 1).unwrap();
            befores.extend(spare_images(&path));
        }
        for (i, &(len, sync)) in ops.iter().enumerate() {
            let p: Vec<u8> = (0..len).map(|j| (i * 7 + j) as u8 | 1).collect();
            log.append_buffered(&p).unwrap();
            if sync {
                log.sync().unwrap();
            }
        }
        let paths = log.segment_paths();
        let base = log.first_pos();
        let mut recs = Vec::new();
        for pos in base..log.next_pos() {
            let r = log.read(pos).unwrap();
            let loc = log.locate(pos).unwrap();
            let seg = paths.iter().position(|p| Some(p) == loc.path.as_ref()).unwrap();
            recs.push(Rec { meta: r.meta, payload: r.payload, seg, offset: loc.offset, size: loc.size });
        }
        drop(log);
        let files: Vec<(PathBuf, Vec<u8>)> = paths.iter().map(|p| (p.clone(), std::fs::read(p).unwrap())).collect();
        // The last segment's earlier bytes: the spare image it still equals after its
        // records (zeros when none does: a fresh segment).
        let (_, img) = &files[files.len() - 1];
        let last = files.len() - 1;
        let end = recs.iter().filter(|r| r.seg == last).map(|r| (r.offset + r.size) as usize).max().unwrap_or(64);
        let before_last = befores
            .into_iter()
            .find(|b| b.len() == img.len() && b[end..] == img[end..] && b[64..] != img[64..])
            .unwrap_or_else(|| vec![0; img.len()]);
        if recycled && paths.len() == 1 {
            assert!(before_last.iter().any(|&x| x != 0), "the active segment is a reused file");
        }
        let all_files = std::fs::read_dir(&path)
            .unwrap()
            .map(|e| {
                let p = e.unwrap().path();
                let b = std::fs::read(&p).unwrap();
                (p, b)
            })
            .collect();
        Fixture { _dir: dir, path, files, all_files, recs, base, before_last }
    }

    /// Puts the directory back as built: every file's bytes, and no other file (a
    /// segment an append after repair created, a spare it reused).
    fn restore(&self) {
        for e in std::fs::read_dir(&self.path).unwrap() {
            let p = e.unwrap().path();
            if !self.all_files.iter().any(|(q, _)| *q == p) {
                std::fs::remove_file(&p).unwrap();
            }
        }
        for (p, b) in &self.all_files {
            std::fs::write(p, b).unwrap();
        }
    }

    fn last_seg(&self) -> usize {
        self.files.len() - 1
    }

    /// Opens and checks that exactly records `1..=n` came back.
    fn expect_prefix(&self, n: usize, what: &str) -> Result<(), TestCaseError> {
        let log = match Log::open(&self.path, cfg()) {
            Ok(l) => l,
            Err(e) => return Err(TestCaseError::fail(format!("{what}: expected {n} records, got error {e}"))),
        };
        prop_assert_eq!(log.next_pos(), self.base + n as u64, "{}: recovered count", what);
        for r in &self.recs[..n] {
            let got = log.read(r.meta.pos).map_err(|e| TestCaseError::fail(format!("{what}: {e}")))?;
            prop_assert_eq!(got.meta, r.meta, "{}", what);
            prop_assert_eq!(&got.payload, &r.payload, "{}", what);
        }
        Ok(())
    }

    /// Opens the log holding `n` records, appends two and checks that they (and only
    /// they) come back after a reopen. Each has the size of the cut record it replaces,
    /// so that the next cut record, if recovery left it, would sit exactly where the
    /// log continues and come back as a record never appended.
    fn append_and_reopen(&self, n: usize, what: &str) -> Result<(), TestCaseError> {
        for k in 0..2 {
            let len = self.recs.get(n + k).map_or(12, |r| r.payload.len());
            let payload = vec![0x5A; len];
            let log = Log::open(&self.path, cfg()).map_err(|e| TestCaseError::fail(format!("{what}: {e}")))?;
            let p = log.append(&payload).map_err(|e| TestCaseError::fail(format!("{what}: {e}")))?;
            prop_assert_eq!(p, self.base + (n + k) as u64, "{}", what);
            drop(log);
            let log = Log::open(&self.path, cfg()).map_err(|e| TestCaseError::fail(format!("{what}: reopen: {e}")))?;
            prop_assert_eq!(log.next_pos(), p + 1, "{}: a cut record came back", what);
            let got = log.read(p).map_err(|e| TestCaseError::fail(format!("{what}: {e}")))?;
            prop_assert_eq!(got.payload, payload, "{}", what);
        }
        Ok(())
    }

    fn expect_corrupt(&self, rec: usize, what: &str) -> Result<(), TestCaseError> {
        let r = &self.recs[rec];
        match Log::open(&self.path, cfg()) {
            Err(StoreError::Corrupt { path, offset, pos, .. }) => {
                prop_assert_eq!(&path, &self.files[r.seg].0, "{}", what);
                prop_assert_eq!(offset, r.offset, "{}", what);
                prop_assert_eq!(pos, r.meta.pos, "{}", what);
                Ok(())
            }
            Err(e) => Err(TestCaseError::fail(format!("{what}: expected Corrupt, got {e}"))),
            Ok(l) => Err(TestCaseError::fail(format!(
                "{what}: expected Corrupt at record {}, opened with next_pos {}",
                r.meta.pos,
                l.next_pos()
            ))),
        }
    }
}

fn ops_strategy() -> impl Strategy<Value = Vec<(usize, bool)>> {
    proptest::collection::vec((0usize..600, proptest::bool::weighted(0.3)), 1..40)
}

fn cases(default: u32) -> u32 {
    std::env::var("REPLOG_PROP_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A torn tail: from byte `b` of the last segment on, the file holds what it held
/// before the appends (zeros for a fresh segment, an earlier segment's bytes for a
/// recycled one), or it ends at `b`, for every `b` in its record area.
fn torn_tail_at_every_byte(fx: &Fixture, append_every: usize) -> Result<(), TestCaseError> {
    let last = fx.last_seg();
    let (lpath, img) = &fx.files[last];
    let old = &fx.before_last;
    let end = fx.recs.iter().filter(|r| r.seg == last).map(|r| r.offset + r.size).max().unwrap_or(64);
    for b in 64..=(end + 8).min(SEG) as usize {
        // A record survives if it ends before `b`, or if every byte it has from `b` on
        // was there before (a commit word whose CRC ends in zero bytes, over zeros).
        let n = fx
            .recs
            .iter()
            .filter(|r| {
                let end = (r.offset + r.size) as usize;
                r.seg < last || end <= b || img[b..end] == old[b..end]
            })
            .count();
        // The earlier bytes from b (a write cut at b).
        fx.restore();
        let mut cut = img.clone();
        cut[b..].copy_from_slice(&old[b..]);
        std::fs::write(lpath, &cut).unwrap();
        fx.expect_prefix(n, &format!("earlier bytes from byte {b}"))?;
        // The file itself ends at b.
        fx.restore();
        std::fs::OpenOptions::new().write(true).open(lpath).unwrap().set_len(b as u64).unwrap();
        let n_cut = fx
            .recs
            .iter()
            .filter(|r| {
                let end = (r.offset + r.size) as usize;
                r.seg < last || end <= b || img[b..end].iter().all(|&x| x == 0)
            })
            .count();
        fx.expect_prefix(n_cut, &format!("file cut at byte {b}"))?;
        if b % append_every == 0 {
            // The repaired log (from the earlier bytes) takes appends and keeps them,
            // twice, so that a torn record left in place is written over.
            fx.restore();
            std::fs::write(lpath, &cut).unwrap();
            fx.append_and_reopen(n, &format!("appends after a cut at byte {b}"))?;
        }
    }
    Ok(())
}

/// A single bit flipped anywhere.
fn bit_flip_anywhere(fx: &Fixture, flips: Vec<(usize, usize, u8)>) -> Result<(), TestCaseError> {
    let last = fx.last_seg();
    for (s, b, bit) in flips {
        let s = s % fx.files.len();
        // Half the flips land in the written area, half anywhere in the segment.
        let written_end = fx.recs.iter().filter(|r| r.seg == s).map(|r| r.offset + r.size).max().unwrap_or(64);
        let b =
            if b % 2 == 0 { (b / 2) % (written_end as usize + 16).min(SEG as usize) } else { (b / 2) % SEG as usize };
        let what = format!("bit {bit} of byte {b} in segment {s} of {}", fx.files.len());
        fx.restore();
        let (p, img) = &fx.files[s];
        let mut bad = img.clone();
        bad[b] ^= 1 << bit;
        std::fs::write(p, &bad).unwrap();
        if b < 64 {
            match Log::open(&fx.path, cfg()) {
                Err(StoreError::CorruptHeader { path, .. }) => prop_assert_eq!(&path, p),
                other => return Err(TestCaseError::fail(format!("{what}: expected CorruptHeader, got {other:?}"))),
            }
            continue;
        }
        match fx.recs.iter().position(|r| r.seg == s && r.offset <= b as u64 && (b as u64) < r.offset + r.size) {
            None => fx.expect_prefix(fx.recs.len(), &what)?,
            Some(k) => {
                let pos = fx.recs[k].meta.pos;
                let vouched = fx.recs[k + 1..].iter().any(|r| r.meta.durable_hint >= pos);
                if s != last || vouched {
                    fx.expect_corrupt(k, &what)?;
                } else {
                    fx.expect_prefix(k, &what)?;
                    // Records after the damaged one were cut: appends go where they
                    // were, and a reopen finds exactly the new ones after the prefix.
                    fx.append_and_reopen(k, &what)?;
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(12), ..ProptestConfig::default() })]

    #[test]
    fn torn_tail_at_every_byte_of_a_fresh_segment(ops in ops_strategy()) {
        torn_tail_at_every_byte(&Fixture::build(&ops, false), 61)?;
    }

    #[test]
    fn bit_flip_anywhere_in_fresh_segments(
        ops in ops_strategy(),
        flips in proptest::collection::vec((any::<usize>(), any::<usize>(), 0u8..8), 48),
    ) {
        bit_flip_anywhere(&Fixture::build(&ops, false), flips)?;
    }

    #[test]
    fn bit_flip_anywhere_in_recycled_segments(
        ops in ops_strategy(),
        flips in proptest::collection::vec((any::<usize>(), any::<usize>(), 0u8..8), 48),
    ) {
        bit_flip_anywhere(&Fixture::build(&ops, true), flips)?;
    }
}

proptest! {
    // Half the cases: a recycled last segment has a whole segment of bytes to cut at.
    #![proptest_config(ProptestConfig { cases: cases(12) / 2, ..ProptestConfig::default() })]

    #[test]
    fn torn_tail_at_every_byte_of_a_recycled_segment(ops in ops_strategy()) {
        torn_tail_at_every_byte(&Fixture::build(&ops, true), 13)?;
    }
}
