//! What an acceptor must persist, and an in-memory implementation for tests.
//!
//! # Correctness rules for implementations
//!
//! - [`Storage::set_promise`] and [`Storage::accept`] may buffer. Everything written
//!   before a call to [`Storage::sync`] must be durable (per the store's durability
//!   mode) when `sync` returns `Ok`. The core never releases a message, an
//!   acknowledgement or a completion that depends on a write before the `sync` that
//!   covers the write returned.
//! - `accept` records one slot's acceptance and replaces any earlier acceptance *of that
//!   slot only*: it must never drop or alter entries at other slots. (An acceptor that
//!   dropped an accepted entry at a later slot could erase the last copy of a chosen
//!   value; an append-only store implements `accept` by appending a record and letting
//!   the newest record of a slot win at recovery.)
//! - After a crash, a reopened store returns every promise and entry covered by a
//!   successful `sync`, and possibly some later ones (never torn ones).
//! - An error from any method is fatal for the replica: the core stops and reports it
//!   instead of acknowledging anything that might not be durable.

use crate::types::{Ballot, Entry, Slot};
use std::collections::BTreeMap;

/// A storage failure. Fatal for the replica (see the module docs).
#[derive(Debug, thiserror::Error)]
#[error("storage failed: {0}")]
pub struct StorageError(#[source] pub Box<dyn std::error::Error + Send + Sync + 'static>);

impl StorageError {
    /// Wraps any error.
    pub fn new(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        StorageError(Box::new(e))
    }

    /// An error made of a message.
    pub fn msg(m: impl Into<String>) -> Self {
        StorageError(m.into().into())
    }
}

/// The acceptor state a replica persists: its promise and its accepted entries.
pub trait Storage {
    /// The highest ballot promised (as persisted, or as buffered by `set_promise`).
    fn promise(&self) -> Ballot;

    /// Raises the promise. Precondition: `b >= self.promise()`.
    fn set_promise(&mut self, b: Ballot) -> Result<(), StorageError>;

    /// Records that this acceptor accepted `entry.value` at `entry.slot` under
    /// `entry.ballot`, replacing an earlier acceptance of that slot (only).
    /// Precondition: `entry.slot >= 1` and the slot's previous ballot, if any, is not
    /// higher than `entry.ballot`.
    fn accept(&mut self, entry: Entry) -> Result<(), StorageError>;

    /// The entry accepted at `slot`, if any.
    fn entry(&self, slot: Slot) -> Result<Option<Entry>, StorageError>;

    /// The highest slot holding an accepted entry (0 when none).
    fn last_slot(&self) -> Slot;

    /// Makes every earlier write durable.
    fn sync(&mut self) -> Result<(), StorageError>;

    /// Records that every slot up to `slot` is chosen with the value this store holds
    /// for it, so that a restarted replica need not learn it again (and its leader need
    /// not rewrite those slots). A hint: it may be buffered and lost in a crash, but it
    /// must never survive without the entries it covers (an append-only store gets this
    /// for free by writing it after them). The default keeps nothing.
    fn set_chosen_hint(&mut self, slot: Slot) -> Result<(), StorageError> {
        let _ = slot;
        Ok(())
    }

    /// The last chosen hint that survived (0 when none).
    fn chosen_hint(&self) -> Slot {
        0
    }

    /// Discards the entries of slots `..=upto`: every one of them is chosen and covered
    /// by a snapshot the application saved durably before (the core calls this only
    /// then). Entries above `upto` are kept. May be buffered; a trim lost in a crash
    /// only leaves entries the store could have dropped. The default keeps everything.
    fn trim(&mut self, upto: Slot) -> Result<(), StorageError> {
        let _ = upto;
        Ok(())
    }

    /// The highest slot trimmed (0 when none): entries up to it may be missing.
    /// `last_slot()` is never below it.
    fn trimmed(&self) -> Slot {
        0
    }

    /// The entries accepted at slots `from..=to` (absent slots skipped), in slot order.
    fn entries(&self, from: Slot, to: Slot) -> Result<Vec<Entry>, StorageError> {
        let mut out = Vec::new();
        let mut s = from.max(1);
        while s <= to {
            if let Some(e) = self.entry(s)? {
                out.push(e);
            }
            s += 1;
        }
        Ok(out)
    }
}

/// Storage in memory: durable only as long as the process lives. For tests and for the
/// `memory` durability mode's acceptor state. `sync` does nothing.
#[derive(Debug, Default, Clone)]
pub struct MemStorage {
    promise: Ballot,
    log: BTreeMap<Slot, Entry>,
    chosen_hint: Slot,
    trimmed: Slot,
}

impl MemStorage {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Storage for MemStorage {
    fn promise(&self) -> Ballot {
        self.promise
    }

    fn set_promise(&mut self, b: Ballot) -> Result<(), StorageError> {
        crate::contracts::require!(b >= self.promise, "promise lowered {:?} -> {:?}", self.promise, b);
        self.promise = b;
        Ok(())
    }

    fn accept(&mut self, entry: Entry) -> Result<(), StorageError> {
        crate::contracts::require!(entry.slot >= 1, "accept at slot 0");
        if let Some(old) = self.log.get(&entry.slot) {
            crate::contracts::require!(
                old.ballot <= entry.ballot,
                "slot {} overwritten by a lower ballot {:?} < {:?}",
                entry.slot,
                entry.ballot,
                old.ballot
            );
        }
        self.log.insert(entry.slot, entry);
        Ok(())
    }

    fn entry(&self, slot: Slot) -> Result<Option<Entry>, StorageError> {
        Ok(self.log.get(&slot).cloned())
    }

    fn last_slot(&self) -> Slot {
        self.log.keys().next_back().copied().unwrap_or(0).max(self.trimmed)
    }

    fn trim(&mut self, upto: Slot) -> Result<(), StorageError> {
        if upto > self.trimmed {
            self.log = self.log.split_off(&(upto + 1));
            self.trimmed = upto;
        }
        Ok(())
    }

    fn trimmed(&self) -> Slot {
        self.trimmed
    }

    fn sync(&mut self) -> Result<(), StorageError> {
        Ok(())
    }

    fn set_chosen_hint(&mut self, slot: Slot) -> Result<(), StorageError> {
        self.chosen_hint = self.chosen_hint.max(slot);
        Ok(())
    }

    fn chosen_hint(&self) -> Slot {
        self.chosen_hint
    }

    fn entries(&self, from: Slot, to: Slot) -> Result<Vec<Entry>, StorageError> {
        if from > to {
            return Ok(Vec::new());
        }
        Ok(self.log.range(from..=to).map(|(_, e)| e.clone()).collect())
    }
}
