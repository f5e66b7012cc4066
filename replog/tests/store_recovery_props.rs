//! Property tests of recovery: random appends (with random sync points), then
//! (a) the last segment cut at every byte (zero-filled from there, and the file
//! truncated there), and (b) single bit flips anywhere in any segment. Recovery must
//! return exactly the longest valid prefix, or refuse with the corruption error when
//! the damaged record is in the middle (followed by data proving it was durable).

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
    recs: Vec<Rec>,
}

impl Fixture {
    /// Appends records of the given sizes; `true` means sync after that append.
    fn build(ops: &[(usize, bool)]) -> Fixture {
        let dir = scratch_dir();
        let path = dir.path().to_path_buf();
        let log = Log::open(&path, cfg()).unwrap();
        for (i, &(len, sync)) in ops.iter().enumerate() {
            let p: Vec<u8> = (0..len).map(|j| (i * 7 + j) as u8 | 1).collect();
            log.append_buffered(&p).unwrap();
            if sync {
                log.sync().unwrap();
            }
        }
        let paths = log.segment_paths();
        let mut recs = Vec::new();
        for pos in 1..log.next_pos() {
            let r = log.read(pos).unwrap();
            let loc = log.locate(pos).unwrap();
            let seg = paths.iter().position(|p| Some(p) == loc.path.as_ref()).unwrap();
            recs.push(Rec { meta: r.meta, payload: r.payload, seg, offset: loc.offset, size: loc.size });
        }
        drop(log);
        let files = paths.iter().map(|p| (p.clone(), std::fs::read(p).unwrap())).collect();
        Fixture { _dir: dir, path, files, recs }
    }

    fn restore(&self) {
        for (p, b) in &self.files {
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
        prop_assert_eq!(log.next_pos(), n as u64 + 1, "{}: recovered count", what);
        for r in &self.recs[..n] {
            let got = log.read(r.meta.pos).map_err(|e| TestCaseError::fail(format!("{what}: {e}")))?;
            prop_assert_eq!(got.meta, r.meta, "{}", what);
            prop_assert_eq!(&got.payload, &r.payload, "{}", what);
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

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(12), ..ProptestConfig::default() })]

    /// A torn tail: the last segment ends (zeros, or end of file) at byte `b`, for
    /// every `b` in its record area.
    #[test]
    fn torn_tail_at_every_byte(ops in ops_strategy()) {
        let fx = Fixture::build(&ops);
        let last = fx.last_seg();
        let (lpath, img) = &fx.files[last];
        let end = fx.recs.iter().filter(|r| r.seg == last).map(|r| r.offset + r.size).max().unwrap_or(64);
        for b in 64..=(end + 8).min(SEG) as usize {
            // A record survives if it ends before `b`, or if every byte it has from `b`
            // on was zero anyway (a commit word whose CRC ends in zero bytes).
            let n = fx
                .recs
                .iter()
                .filter(|r| {
                    let end = (r.offset + r.size) as usize;
                    r.seg < last || end <= b || img[b..end].iter().all(|&x| x == 0)
                })
                .count();
            // Zero-filled from b (a preallocated file whose last write was cut).
            fx.restore();
            let mut cut = img.clone();
            cut[b..].fill(0);
            std::fs::write(lpath, &cut).unwrap();
            fx.expect_prefix(n, &format!("zeroed from byte {b}"))?;
            // The file itself ends at b.
            fx.restore();
            std::fs::OpenOptions::new().write(true).open(lpath).unwrap().set_len(b as u64).unwrap();
            fx.expect_prefix(n, &format!("file cut at byte {b}"))?;
            if b % 61 == 0 {
                // The repaired log takes appends and keeps them.
                let log = Log::open(&fx.path, cfg()).unwrap();
                let p = log.append(b"after repair").unwrap();
                prop_assert_eq!(p, n as u64 + 1);
                drop(log);
                let log = Log::open(&fx.path, cfg()).unwrap();
                prop_assert_eq!(log.read(p).unwrap().payload, b"after repair".to_vec());
            }
        }
    }

    /// A single bit flipped anywhere.
    #[test]
    fn bit_flip_anywhere(
        ops in ops_strategy(),
        flips in proptest::collection::vec((any::<usize>(), any::<usize>(), 0u8..8), 48),
    ) {
        let fx = Fixture::build(&ops);
        let last = fx.last_seg();
        for (s, b, bit) in flips {
            let s = s % fx.files.len();
            // Half the flips land in the written area, half anywhere in the segment.
            let written_end = fx.recs.iter().filter(|r| r.seg == s).map(|r| r.offset + r.size).max().unwrap_or(64);
            let b = if b % 2 == 0 { (b / 2) % (written_end as usize + 16).min(SEG as usize) } else { (b / 2) % SEG as usize };
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
                    }
                }
            }
        }
    }
}
