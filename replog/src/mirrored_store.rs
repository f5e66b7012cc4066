//! The store a node's replica writes through: a [`PaxosStore`] that also notes, for the
//! read mirror ([`crate::rdma_mirror`]), which slots it accepted an entry at since the
//! last publication, and publishes them ([`MirroredStore::publish`]) with the entries the
//! store holds there. Those are read back with [`Storage::entries`], which the store
//! answers from its cache of the newest accepted entries (no log read, no decoding: the
//! changed slots were just accepted), so no second copy of the entries is kept here.
//!
//! The hook is [`Storage::accept`], the one way an entry enters the store: the core
//! calls it only for an entry it accepted (a write the core denies, or a stale one it
//! ignores, never reaches it), and only once the store took it is the slot noted. The
//! store changes no slot otherwise (`accept` never drops other slots; a trim only raises
//! the first slot kept), so the noted slots are the whole change since the last
//! publication. Only their span is noted (the lowest and the highest slot): the store's
//! other entries inside it are published again as they were, which changes nothing.

use crate::rdma_mirror::{MirrorError, MirrorMemory, Publisher};
use crate::store::PaxosStore;
use paxos::{Ballot, Entry, Slot, Storage, StorageError};
use std::cell::Cell;

/// A [`PaxosStore`] that notes the slots it accepted entries at, for the read mirror.
pub struct MirroredStore {
    store: PaxosStore,
    /// Whether changed slots are noted (there is a mirror to publish).
    keep: Cell<bool>,
    /// The lowest and the highest slot accepted at since the last publication (none:
    /// nothing accepted, or not noted). In `Cell`s because the replica owns the store
    /// and lends it out only shared: the node publishes through `&self`.
    changed: Cell<Option<(Slot, Slot)>>,
}

/// Why [`MirroredStore::publish`] published nothing, or not everything.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The store's entries could not be read; nothing was written.
    #[error("reading slots {from}..={to} for the read mirror: {error}")]
    Read {
        /// First slot read.
        from: Slot,
        /// Last slot read.
        to: Slot,
        /// The store's error.
        #[source]
        error: StorageError,
    },
    /// The mirror refused a write (its header is left odd: readers fall back).
    #[error(transparent)]
    Write(#[from] MirrorError),
}

impl MirroredStore {
    /// Wraps `store`; `keep`: note the changed slots (there is a mirror to publish).
    pub fn new(store: PaxosStore, keep: bool) -> MirroredStore {
        MirroredStore { store, keep: Cell::new(keep), changed: Cell::new(None) }
    }

    /// The underlying store.
    pub fn store(&self) -> &PaxosStore {
        &self.store
    }

    /// Publishes through `p` into `mem` what the store changed since the last
    /// publication: its trim point, its last slot, and its entries in the span of the
    /// slots it accepted at since then, as far as the publication's range holds them
    /// (a fresh publisher: every entry in its range; a reopened store holds entries that
    /// no hook saw). The noted span is cleared, whatever the outcome: after an error a
    /// publisher that published before is not used again (see
    /// [`Publisher::withdraw`]), and a fresh one reads its whole range again. Returns
    /// whether anything was written.
    pub fn publish<M: MirrorMemory + ?Sized>(&self, p: &mut Publisher, mem: &mut M) -> Result<bool, PublishError> {
        let (trimmed, last) = (self.trimmed(), self.last_slot());
        let changed = self.changed.take();
        let (low, high) = p.range(trimmed, last);
        let span = if p.is_fresh() { Some((low, high)) } else { changed.map(|(a, b)| (a.max(low), b.min(high))) };
        let held = match span {
            Some((from, to)) if from <= to => {
                self.entries(from, to).map_err(|error| PublishError::Read { from, to, error })?
            }
            _ => Vec::new(),
        };
        Ok(p.publish(mem, trimmed, last, &held)?)
    }

    /// Stops noting changed slots (the mirror is gone).
    pub fn stop_keeping(&self) {
        self.keep.set(false);
        self.changed.set(None);
    }
}

impl std::fmt::Debug for MirroredStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirroredStore")
            .field("store", &self.store)
            .field("keep", &self.keep.get())
            .field("changed", &self.changed.get())
            .finish()
    }
}

// Every method is forwarded, the provided ones included: a default (`trimmed() == 0`,
// a `trim` that keeps everything) would silently differ from the store's.
impl Storage for MirroredStore {
    fn promise(&self) -> Ballot {
        self.store.promise()
    }
    fn set_promise(&mut self, b: Ballot) -> Result<(), StorageError> {
        self.store.set_promise(b)
    }
    fn accept(&mut self, entry: Entry) -> Result<(), StorageError> {
        let slot = entry.slot;
        self.store.accept(entry)?;
        if *self.keep.get_mut() {
            let changed = self.changed.get_mut();
            *changed = Some(changed.map_or((slot, slot), |(low, high)| (low.min(slot), high.max(slot))));
        }
        Ok(())
    }
    fn entry(&self, slot: Slot) -> Result<Option<Entry>, StorageError> {
        self.store.entry(slot)
    }
    fn last_slot(&self) -> Slot {
        self.store.last_slot()
    }
    fn sync(&mut self) -> Result<(), StorageError> {
        self.store.sync()
    }
    fn set_chosen_hint(&mut self, slot: Slot) -> Result<(), StorageError> {
        self.store.set_chosen_hint(slot)
    }
    fn chosen_hint(&self) -> Slot {
        self.store.chosen_hint()
    }
    fn trim(&mut self, upto: Slot) -> Result<(), StorageError> {
        self.store.trim(upto)
    }
    fn trimmed(&self) -> Slot {
        self.store.trimmed()
    }
    fn entries(&self, from: Slot, to: Slot) -> Result<Vec<Entry>, StorageError> {
        self.store.entries(from, to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rdma_mirror as mirror;
    use crate::store::{Log, Mode, StoreConfig};
    use paxos::{Action, Config, ReadRequest, Replica, Value, WriteRequest, WriteResult};
    use proptest::prelude::*;

    fn store(keep: bool) -> MirroredStore {
        match Log::memory(1 << 20).and_then(PaxosStore::from_log) {
            Ok(s) => MirroredStore::new(s, keep),
            Err(e) => panic!("an in-memory store opens: {e}"),
        }
    }

    fn publisher(mem: &[u8], stride: usize) -> Publisher {
        match Publisher::new(mem.len(), stride) {
            Ok(p) => p,
            Err(e) => panic!("mirror geometry: {e}"),
        }
    }

    /// Past any lease of the first leader.
    const LATER: u64 = 60_000_000_000;

    fn write(r: &mut Replica<MirroredStore>, from: u64, ballot: Ballot, first: Slot, n: u8) -> Vec<Action> {
        let values = (0..n).map(|i| Value::Trim(u64::from(i) + 100 * ballot.round)).collect();
        let req = WriteRequest { ballot, first, values, commit: 0 };
        if let Err(e) = r.handle_remote_write(LATER, from, req).and_then(|()| r.flush()) {
            panic!("an in-memory replica takes a write: {e}");
        }
        std::iter::from_fn(|| r.poll_action()).collect()
    }

    /// What a reader of `mem` gets for slots `from..`: (to, entries), or what failed.
    fn read(mem: &[u8], from: Slot) -> Result<(Slot, Vec<Entry>), String> {
        let h = mirror::decode_header(mem, mem.len() as u64).map_err(|f| format!("header: {f:?}"))?;
        let (off, len, _) = mirror::plan_read(&h, from, 1 << 20).map_err(|f| format!("plan from {from}: {f:?}"))?;
        let records = mem.get(off as usize..(off + u64::from(len)) as usize).ok_or("records out of the mirror")?;
        let mut answer = Vec::new();
        mirror::assemble(&h, from, records, 1 << 20, &mut answer).map_err(|f| format!("records from {from}: {f:?}"))?;
        let q = ReadRequest { ballot: Ballot::ZERO, from, to: u64::MAX };
        let r = crate::wire::decode_read_result(&q, &answer).map_err(|e| format!("answer from {from}: {e}"))?;
        Ok((r.to, r.entries))
    }

    /// Checks that the mirror in `mem`, published by `p`, holds the range the store's
    /// state calls for and answers for it exactly what the store holds.
    fn assert_mirrors(p: &Publisher, mem: &[u8], st: &MirroredStore) {
        let (low, high) = p.range(st.trimmed(), st.last_slot());
        let h = p.header();
        assert_eq!((h.low, h.high), (low, high), "the published range");
        let want = match st.entries(low, high) {
            Ok(e) => e,
            Err(e) => panic!("the store reads back: {e}"),
        };
        // Reads stop at the ring's end: read on from there.
        let (mut from, mut got) = (low, Vec::new());
        while from <= high {
            match read(mem, from) {
                Ok((to, entries)) if to >= from => {
                    got.extend(entries);
                    from = to + 1;
                }
                Ok((to, _)) => panic!("a read from {from} answered up to {to}"),
                Err(e) => panic!("the mirror answers slots {from}..={high}: {e}"),
            }
        }
        assert_eq!(got, want, "the mirror answers what the store holds in {low}..={high}");
    }

    fn publish(p: &mut Publisher, mem: &mut Vec<u8>, st: &MirroredStore) -> Result<bool, String> {
        st.publish(p, mem).map_err(|e| e.to_string())
    }

    #[test]
    fn only_slots_the_store_accepted_at_are_noted_for_the_mirror() {
        let (b1, b2) = (Ballot::new(4, 1), Ballot::new(5, 1));
        let mut st = store(true);
        if let Err(e) = st.set_promise(b1) {
            panic!("{e}");
        }
        let mut r = match Replica::new(Config::new(2, vec![1, 2, 3]), st, 0) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        };
        let mut mem = vec![0u8; mirror::HEADER_LEN + 16 * 128];
        let mut p = publisher(&mem, 128);
        // Denied: a writer without the permission, and an old ballot.
        for (from, b) in [(3, Ballot::new(5, 3)), (1, Ballot::new(3, 1))] {
            let acts = write(&mut r, from, b, 1, 2);
            assert!(acts
                .iter()
                .any(|a| matches!(a, Action::WriteCompletion { result: WriteResult::Denied { .. }, .. })));
            assert_eq!(r.storage().changed.get(), None, "a denied write is not noted");
        }
        // Accepted: slots 1..=3; then a new ballot's leader overwrites 2..=3 and adds 4.
        write(&mut r, 1, b1, 1, 3);
        assert_eq!(r.storage().changed.get(), Some((1, 3)));
        assert_eq!(publish(&mut p, &mut mem, r.storage()), Ok(true));
        assert_eq!(r.storage().changed.get(), None, "a publication clears what it published");
        assert_mirrors(&p, &mem, r.storage());
        if let Err(e) = r.handle_message(LATER, 1, paxos::Message::Prepare { ballot: b2, transfer: true }) {
            panic!("{e}");
        }
        write(&mut r, 1, b2, 2, 3);
        let st = r.storage();
        assert_eq!(st.changed.get(), Some((2, 4)));
        assert_eq!(publish(&mut p, &mut mem, st), Ok(true));
        assert_mirrors(&p, &mem, st);
        let ballots = read(&mem, 1).map(|(to, e)| (to, e.iter().map(|e| e.ballot).collect::<Vec<_>>()));
        assert_eq!(ballots, Ok((4, vec![b1, b2, b2, b2])));
        assert_eq!(publish(&mut p, &mut mem, st), Ok(false), "nothing changed, nothing written");
    }

    #[test]
    fn nothing_is_noted_without_a_mirror_or_once_stopped() {
        let mut st = store(false);
        let e = Entry { slot: 1, ballot: Ballot::new(1, 1), value: Value::Noop };
        assert!(st.accept(e.clone()).is_ok());
        assert_eq!(st.changed.get(), None);
        let mut st = store(true);
        assert!(st.accept(e.clone()).is_ok());
        assert_eq!(st.changed.get(), Some((1, 1)));
        st.stop_keeping();
        assert_eq!(st.changed.get(), None);
        assert!(st.accept(Entry { slot: 2, ..e }).is_ok());
        assert_eq!(st.changed.get(), None);
        assert_eq!(st.last_slot(), 2);
    }

    fn accept(st: &mut MirroredStore, slot: Slot, round: u64) {
        let e = Entry { slot, ballot: Ballot::new(round, 1), value: Value::Trim(slot * 10 + round) };
        if let Err(e) = st.accept(e).and_then(|()| st.sync()) {
            panic!("the store takes slot {slot}: {e}");
        }
    }

    #[test]
    fn the_mirror_equals_the_store_through_overwrites_trims_and_restarts() {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        };
        let cfg = StoreConfig::new(Mode::Fsync).with_segment_size(64 * 1024);
        let open = || match PaxosStore::open(dir.path(), cfg) {
            Ok(s) => MirroredStore::new(s, true),
            Err(e) => panic!("the store opens: {e}"),
        };
        let mut st = open();
        // An 8-record ring.
        let mut mem = vec![0u8; mirror::HEADER_LEN + 8 * 128];
        let mut p = publisher(&mem, 128);
        // Slot 3 accepted nothing.
        for slot in [1, 2, 4, 5] {
            accept(&mut st, slot, 1);
        }
        assert_eq!(publish(&mut p, &mut mem, &st), Ok(true));
        assert_mirrors(&p, &mem, &st);
        // A new leader overwrites the unchosen tail 4..=5 and adds 6 and 9 (not 7, 8).
        for slot in [4, 5, 6, 9] {
            accept(&mut st, slot, 2);
        }
        assert_eq!(publish(&mut p, &mut mem, &st), Ok(true));
        assert_mirrors(&p, &mem, &st);
        // Past the ring's end: 1..=6 wrap away.
        for slot in 10..=14 {
            accept(&mut st, slot, 2);
        }
        assert_eq!(publish(&mut p, &mut mem, &st), Ok(true));
        assert_eq!(p.header().low, 7);
        assert_mirrors(&p, &mem, &st);
        // A slot overwritten and then trimmed before the publication, one overwritten
        // above the trim point, and a trim alone.
        accept(&mut st, 10, 3);
        accept(&mut st, 13, 3);
        if let Err(e) = st.trim(11) {
            panic!("{e}");
        }
        assert_eq!(publish(&mut p, &mut mem, &st), Ok(true));
        assert_eq!(p.header().low, 12);
        assert_eq!(read(&mem, 11).map_err(|e| e.contains("TooOld")), Err(true));
        assert_mirrors(&p, &mem, &st);
        if let Err(e) = st.trim(12) {
            panic!("{e}");
        }
        assert_eq!(publish(&mut p, &mut mem, &st), Ok(true));
        assert_mirrors(&p, &mem, &st);
        // A restart: the reopened store holds entries no hook saw, the new mirror is
        // fresh (zeroed memory) and its first publication reads them.
        drop(st);
        let mut st = open();
        assert_eq!(st.changed.get(), None);
        let mut mem = vec![0u8; mirror::HEADER_LEN + 8 * 128];
        let mut p = publisher(&mem, 128);
        assert_eq!(publish(&mut p, &mut mem, &st), Ok(true));
        assert_mirrors(&p, &mem, &st);
        accept(&mut st, 14, 4);
        accept(&mut st, 16, 4);
        assert_eq!(publish(&mut p, &mut mem, &st), Ok(true));
        assert_mirrors(&p, &mem, &st);
    }

    proptest! {
        /// Random accepts (a slot's ballot never going back), trims and publications:
        /// after each publication the mirror answers what the store holds.
        #[test]
        fn each_publication_mirrors_the_store(
            ops in proptest::collection::vec((1u64..40, 1u64..4, 0u8..4), 1..60),
            cap in 4usize..16,
        ) {
            let mut st = store(true);
            let mut mem = vec![0u8; mirror::HEADER_LEN + cap * 128];
            let mut p = Publisher::new(mem.len(), 128).map_err(|e| TestCaseError::fail(e.to_string()))?;
            for (slot, round, op) in ops {
                match op {
                    0 | 1 if slot > st.trimmed() => {
                        let held = st.entry(slot).map_err(|e| TestCaseError::fail(e.to_string()))?;
                        let round = round.max(held.map_or(0, |e| e.ballot.round));
                        accept(&mut st, slot, round);
                    }
                    2 => {
                        let upto = (st.trimmed() + round).min(st.last_slot());
                        st.trim(upto).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    }
                    _ => {
                        prop_assert!(publish(&mut p, &mut mem, &st).is_ok());
                        assert_mirrors(&p, &mem, &st);
                    }
                }
            }
        }
    }
}
