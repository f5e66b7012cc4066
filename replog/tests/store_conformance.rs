//! The paxos `Storage` conformance suite, run against the store in every mode and
//! against `paxos::MemStorage`.

use paxos::{Ballot, MemStorage, Storage};
use replog::store::conformance::check_storage;
use replog::store::{Log, Mode, PaxosStore, RecordKind, StoreConfig, StoreError};
use std::path::PathBuf;

fn run_with_reopen(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().to_path_buf();
    // Small segments so the suite crosses many of them.
    let cfg = StoreConfig::new(mode).with_segment_size(16 * 1024);
    let p2 = path.clone();
    let mut fresh = move || PaxosStore::open(&path, cfg).unwrap();
    let mut reopen = move |s: PaxosStore| {
        drop(s);
        let s = PaxosStore::open(&p2, cfg).unwrap();
        assert!(s.log().recovery_report().torn_tail.is_none());
        s
    };
    check_storage(&mut fresh, Some(&mut reopen));
}

#[test]
fn conformance_fsync() {
    run_with_reopen(Mode::Fsync);
}

#[test]
fn conformance_mapped_not_durable() {
    run_with_reopen(Mode::MappedNotDurable);
}

#[test]
fn conformance_pmem_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    match PaxosStore::open(dir.path(), StoreConfig::new(Mode::Pmem)) {
        Err(StoreError::PmemUnavailable { reason, .. }) => {
            eprintln!("pmem suite not run: {reason}");
        }
        Ok(_) => run_with_reopen(Mode::Pmem),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn conformance_memory() {
    let mut fresh = || PaxosStore::open("", StoreConfig::new(Mode::Memory).with_segment_size(16 * 1024)).unwrap();
    check_storage(&mut fresh, None);
}

#[test]
fn conformance_mem_storage() {
    let mut fresh = MemStorage::new;
    check_storage(&mut fresh, None);
}

#[test]
fn corrupt_value_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig::new(Mode::Fsync).with_segment_size(16 * 1024);
    {
        let log = Log::open(dir.path(), cfg).unwrap();
        // A record with a valid checksum whose payload is not a valid value.
        log.append_record(RecordKind::Entry, 1, Ballot::new(1, 1), &[1, 0xff, 0xff, 0xff, 0x7f]).unwrap();
        log.sync().unwrap();
    }
    match PaxosStore::open(dir.path(), cfg) {
        Err(StoreError::Decode { pos: 1, .. }) => {}
        other => panic!("expected a decode error, got {other:?}"),
    }
}

#[test]
fn promise_never_lowered() {
    let mut s = PaxosStore::open("", StoreConfig::new(Mode::Memory).with_segment_size(16 * 1024)).unwrap();
    s.set_promise(Ballot::new(5, 1)).unwrap();
    assert!(s.set_promise(Ballot::new(4, 9)).is_err());
    assert_eq!(s.promise(), Ballot::new(5, 1));
}

#[test]
fn paxos_store_keeps_the_chosen_hint_across_reopen() {
    use paxos::{Ballot, Entry, Storage, Value};
    use replog::store::{Mode, PaxosStore, StoreConfig};
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig::new(Mode::Fsync).with_segment_size(1 << 20);
    {
        let mut s = PaxosStore::open(dir.path(), cfg).unwrap();
        for slot in 1..=5 {
            s.accept(Entry { slot, ballot: Ballot::new(1, 1), value: Value::Noop }).unwrap();
        }
        s.set_chosen_hint(4).unwrap();
        s.set_chosen_hint(3).unwrap(); // never lowered
        assert_eq!(s.chosen_hint(), 4);
        s.sync().unwrap();
    }
    let s = PaxosStore::open(dir.path(), cfg).unwrap();
    assert_eq!(s.chosen_hint(), 4);
    assert_eq!(s.last_slot(), 5);
}

#[test]
fn trim_drops_entries_and_segments_and_survives_reopen() {
    use paxos::{Command, Entry, Value};
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig::new(Mode::Fsync).with_segment_size(8 * 1024);
    let mut s = PaxosStore::open(dir.path(), cfg).unwrap();
    let b = Ballot::new(3, 1);
    s.set_promise(b).unwrap();
    let value = |slot: u64| {
        Value::Batch(vec![Command { client: 9, seq: slot, payload: bytes::Bytes::from(vec![slot as u8; 200]) }])
    };
    for slot in 1..=200 {
        s.accept(Entry { slot, ballot: b, value: value(slot) }).unwrap();
    }
    s.set_chosen_hint(180).unwrap();
    s.sync().unwrap();
    let segments_before = s.log().segment_paths().len();
    s.trim(150).unwrap();
    assert_eq!(s.trimmed(), 150);
    assert!(s.entry(150).unwrap().is_none() && s.entry(1).unwrap().is_none());
    assert_eq!(s.entry(151).unwrap().unwrap().value, value(151));
    assert_eq!(s.last_slot(), 200);
    let segments_after = s.log().segment_paths().len();
    assert!(segments_after < segments_before, "no segment dropped: {segments_before} -> {segments_after}");
    // A trim below the trim point changes nothing.
    s.trim(100).unwrap();
    assert_eq!(s.trimmed(), 150);
    drop(s);
    let s = PaxosStore::open(dir.path(), cfg).unwrap();
    assert_eq!(s.promise(), b, "the promise outlives the segment that first held it");
    assert_eq!(s.chosen_hint(), 180);
    assert_eq!(s.trimmed(), 150);
    assert!(s.entry(120).unwrap().is_none());
    let kept = s.entries(1, 300).unwrap();
    assert_eq!(kept.len(), 50);
    assert!(kept.iter().all(|e| e.slot > 150 && e.value == value(e.slot)));
    // Everything trimmed: the last slot is still the trim point.
    let dir2 = tempfile::tempdir().unwrap();
    let mut s = PaxosStore::open(dir2.path(), cfg).unwrap();
    s.trim(40).unwrap();
    assert_eq!((s.last_slot(), s.trimmed()), (40, 40));
}

/// The store serves the log's tail from an in-memory cache (bounded, oldest dropped
/// first): what it answers, cached or not, equals what the log holds, as a reopened
/// store (which starts with nothing cached) reads it.
#[test]
fn cached_entries_equal_the_log() {
    use bytes::Bytes;
    use paxos::{Command, Entry, Value};
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig::new(Mode::Fsync).with_segment_size(4 << 20);
    let mut s = PaxosStore::open(dir.path(), cfg).unwrap();
    let value = |slot: u64, round: u64| {
        let cmds = (0..4)
            .map(|i| Command { client: slot, seq: i, payload: Bytes::from(vec![(slot + round) as u8; 16 * 1024]) })
            .collect();
        Value::Batch(cmds)
    };
    // 12 MiB of entries: more than the cache holds.
    let n = 200;
    for slot in 1..=n {
        s.accept(Entry { slot, ballot: Ballot::new(1, 1), value: value(slot, 1) }).unwrap();
    }
    // Rewrites of an old (uncached) and a recent (cached) slot at a higher ballot.
    for slot in [3, n - 1] {
        s.accept(Entry { slot, ballot: Ballot::new(2, 1), value: value(slot, 2) }).unwrap();
    }
    s.sync().unwrap();
    s.trim(10).unwrap();
    let got = s.entries(1, n).unwrap();
    let single: Vec<Entry> = (11..=n).map(|slot| s.entry(slot).unwrap().unwrap()).collect();
    drop(s);
    let reopened = PaxosStore::open(dir.path(), cfg).unwrap();
    let want = reopened.entries(1, n).unwrap();
    assert_eq!(want.len(), (n - 10) as usize);
    assert_eq!(got, want);
    assert_eq!(single, want);
    let rewritten = want.iter().find(|e| e.slot == n - 1).map(|e| (e.ballot, e.value.clone()));
    assert_eq!(rewritten, Some((Ballot::new(2, 1), value(n - 1, 2))));
}
