//! The store a node's replica writes through: a [`PaxosStore`] that also keeps, for the
//! read mirror ([`crate::rdma_mirror`]), every entry the store accepted since the last
//! publication, so that the mirror is published from the entries already in hand
//! instead of reading them back from the store.
//!
//! The hook is [`Storage::accept`], the one way an entry enters the store: the core
//! calls it only for an entry it accepted (a write the core denies, or a stale one it
//! ignores, never reaches it), and only after the store took it is the entry kept here.
//! The store changes no slot otherwise (`accept` never drops other slots; a trim only
//! raises the first slot kept), so these entries are the whole change since the last
//! publication.

use crate::store::PaxosStore;
use paxos::{Ballot, Entry, Slot, Storage, StorageError};
use std::cell::Cell;
use std::collections::BTreeMap;

/// A [`PaxosStore`] that keeps the entries it accepted for the read mirror.
pub struct MirroredStore {
    store: PaxosStore,
    /// The entries accepted since the last [`MirroredStore::take_accepted`], the newest
    /// per slot; `None`: not kept (no mirror). In a `Cell` because the replica owns the
    /// store and lends it out only shared: the node takes the entries through `&self`.
    accepted: Cell<Option<BTreeMap<Slot, Entry>>>,
}

impl MirroredStore {
    /// Wraps `store`; `keep`: keep accepted entries (there is a mirror to publish).
    pub fn new(store: PaxosStore, keep: bool) -> MirroredStore {
        MirroredStore { store, accepted: Cell::new(keep.then(BTreeMap::new)) }
    }

    /// The underlying store.
    pub fn store(&self) -> &PaxosStore {
        &self.store
    }

    /// The entries accepted since the last call (newest per slot, in slot order); none
    /// when entries are not kept.
    pub fn take_accepted(&self) -> BTreeMap<Slot, Entry> {
        match self.accepted.take() {
            Some(m) => {
                self.accepted.set(Some(BTreeMap::new()));
                m
            }
            None => BTreeMap::new(),
        }
    }

    /// Stops keeping accepted entries (the mirror is gone) and drops those kept.
    pub fn stop_keeping(&self) {
        self.accepted.set(None);
    }
}

impl std::fmt::Debug for MirroredStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A `Cell` is not looked into: its contents are taken, not borrowed.
        f.debug_struct("MirroredStore").field("store", &self.store).finish_non_exhaustive()
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
        let Some(m) = self.accepted.get_mut() else { return self.store.accept(entry) };
        // The store keeps the entry itself (its cache of the newest entries): the mirror
        // keeps a clone (the batch's command list; the payloads are shared, not copied),
        // once the store took it.
        let kept = entry.clone();
        self.store.accept(entry)?;
        m.insert(kept.slot, kept);
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
    use crate::rdma_mirror::{self as mirror, Publisher};
    use crate::store::Log;
    use paxos::{Action, Config, ReadRequest, Replica, Value, WriteRequest, WriteResult};

    fn store(keep: bool) -> MirroredStore {
        match Log::memory(1 << 20).and_then(PaxosStore::from_log) {
            Ok(s) => MirroredStore::new(s, keep),
            Err(e) => panic!("an in-memory store opens: {e}"),
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

    /// What a reader of `mem` gets for slots `from..`: (to, entries).
    fn read(mem: &[u8], from: Slot) -> Option<(Slot, Vec<Entry>)> {
        let h = mirror::decode_header(mem, mem.len() as u64).ok()?;
        let (off, len, _) = mirror::plan_read(&h, from, 1 << 20).ok()?;
        let mut answer = Vec::new();
        mirror::assemble(&h, from, mem.get(off as usize..(off + u64::from(len)) as usize)?, 1 << 20, &mut answer)
            .ok()?;
        let q = ReadRequest { ballot: Ballot::ZERO, from, to: u64::MAX };
        crate::wire::decode_read_result(&q, &answer).ok().map(|r| (r.to, r.entries))
    }

    #[test]
    fn only_entries_the_store_accepted_are_kept_for_the_mirror() {
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
        let mut p = match Publisher::new(mem.len(), 128) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        // Denied: a writer without the permission, and an old ballot.
        for (from, b) in [(3, Ballot::new(5, 3)), (1, Ballot::new(3, 1))] {
            let acts = write(&mut r, from, b, 1, 2);
            assert!(acts
                .iter()
                .any(|a| matches!(a, Action::WriteCompletion { result: WriteResult::Denied { .. }, .. })));
            assert!(r.storage().take_accepted().is_empty(), "a denied write is not kept");
        }
        // Accepted: slots 1..=3; then a new ballot's leader overwrites 2..=3 and adds 4.
        write(&mut r, 1, b1, 1, 3);
        let first = r.storage().take_accepted();
        assert_eq!(first.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3]);
        let publish = |p: &mut Publisher, mem: &mut Vec<u8>, st: &MirroredStore, changed: &BTreeMap<Slot, Entry>| {
            p.publish(mem, st.trimmed(), st.last_slot(), changed.values()).map_err(|e| e.to_string())
        };
        assert_eq!(publish(&mut p, &mut mem, r.storage(), &first), Ok(true));
        if let Err(e) = r.handle_message(LATER, 1, paxos::Message::Prepare { ballot: b2, transfer: true }) {
            panic!("{e}");
        }
        write(&mut r, 1, b2, 2, 3);
        let st = r.storage();
        let second = st.take_accepted();
        assert_eq!(second.keys().copied().collect::<Vec<_>>(), vec![2, 3, 4]);
        assert_eq!(publish(&mut p, &mut mem, st, &second), Ok(true));
        // The mirror answers what the store holds, read back only here to compare.
        let want = match st.entries(1, 4) {
            Ok(e) => e,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(want.iter().map(|e| e.ballot).collect::<Vec<_>>(), vec![b1, b2, b2, b2]);
        assert_eq!(read(&mem, 1), Some((4, want)));
    }

    #[test]
    fn nothing_is_kept_without_a_mirror_or_once_stopped() {
        let mut st = store(false);
        let e = Entry { slot: 1, ballot: Ballot::new(1, 1), value: Value::Noop };
        assert!(st.accept(e.clone()).is_ok());
        assert!(st.take_accepted().is_empty());
        let mut st = store(true);
        assert!(st.accept(e.clone()).is_ok());
        st.stop_keeping();
        assert!(st.accept(Entry { slot: 2, ..e }).is_ok());
        assert!(st.take_accepted().is_empty());
        assert_eq!(st.last_slot(), 2);
    }
}
