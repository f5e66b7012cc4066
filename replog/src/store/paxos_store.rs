//! The paxos acceptor state ([`paxos::Storage`]) on top of the [`Log`].
//!
//! Every `set_promise` appends a promise record and every `accept` appends an entry
//! record; nothing is ever rewritten in place. The in-memory index maps each slot to
//! the position of its newest entry record, so `accept` is a per-slot upsert that never
//! touches other slots; at open the index is rebuilt by replaying the log in position
//! order (the newest record of a slot wins, the highest promise wins).

use super::codec::{decode_value, encode_value};
use super::error::{Result, StoreError};
use super::format::RecordKind;
use super::log::Log;
use super::{Durability, StoreConfig};
use paxos::{Ballot, Entry, Membership, Position, Slot, Storage, StorageError, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// A paxos acceptor's durable state, kept in a [`Log`].
#[derive(Debug)]
pub struct PaxosStore {
    log: Log,
    promise: Ballot,
    /// slot -> (position of its newest entry record, its ballot).
    index: BTreeMap<Slot, (Position, Ballot)>,
    /// Reused encoding buffer: no allocation per accept once warm.
    scratch: Vec<u8>,
    /// The newest chosen-prefix hint.
    chosen: Slot,
    /// Entries of slots up to here are dropped (covered by a snapshot).
    trimmed: Slot,
    /// The membership change of the highest slot found at open, if any.
    recovered_config: Option<(Slot, Membership)>,
    /// The newest accepted entries as accepted, with their encoded sizes: reads of the
    /// log's tail (what a leader sends its followers, what is applied next) are served
    /// from here instead of read back from the log and decoded (an allocation per
    /// command). Always the slot's newest entry record; at most [`CACHE_BYTES`] of
    /// encoded values, the lowest slots dropped first.
    cache: BTreeMap<Slot, (Entry, usize)>,
    cache_bytes: usize,
}

/// Bound of [`PaxosStore`]'s entry cache (encoded bytes).
const CACHE_BYTES: usize = 8 << 20;

impl PaxosStore {
    /// Opens (recovering) or creates the store in `dir`.
    pub fn open(dir: impl AsRef<Path>, cfg: StoreConfig) -> Result<PaxosStore> {
        PaxosStore::from_log(Log::open(dir, cfg)?)
    }

    /// Rebuilds the acceptor state from an opened log. Data records are ignored.
    pub fn from_log(log: Log) -> Result<PaxosStore> {
        let mut promise = Ballot::ZERO;
        let mut chosen = 0;
        let mut trimmed = 0;
        let mut index: BTreeMap<Slot, (Position, Ballot)> = BTreeMap::new();
        let mut buf = Vec::new();
        let mut recovered_config: Option<(Slot, Membership)> = None;
        let (first, next) = (log.first_pos(), log.next_pos());
        for pos in first..next {
            let meta = log.read_into(pos, &mut buf)?;
            match meta.kind {
                RecordKind::Promise => promise = promise.max(meta.ballot),
                RecordKind::Entry => {
                    let value = decode_value(&buf).map_err(|reason| StoreError::Decode { pos, reason })?;
                    if meta.slot == 0 {
                        return Err(StoreError::Decode { pos, reason: "entry record at slot 0" });
                    }
                    if let Value::Config(m) = value {
                        if recovered_config.as_ref().is_none_or(|(s, _)| *s <= meta.slot) {
                            recovered_config = Some((meta.slot, m));
                        }
                    }
                    index.insert(meta.slot, (pos, meta.ballot));
                }
                RecordKind::Chosen => chosen = chosen.max(meta.slot),
                RecordKind::Trimmed => {
                    if meta.slot > trimmed {
                        trimmed = meta.slot;
                        index = index.split_off(&(trimmed + 1));
                    }
                }
                RecordKind::Data | RecordKind::End => {}
            }
        }
        Ok(PaxosStore {
            log,
            promise,
            index,
            scratch: Vec::new(),
            chosen,
            trimmed,
            recovered_config,
            cache: BTreeMap::new(),
            cache_bytes: 0,
        })
    }

    /// The membership change accepted at the highest slot of the log as it was opened
    /// (chosen or not), with its slot: a restarted replica learns from it which
    /// members to link to before it applied its log again.
    pub fn recovered_config(&self) -> Option<&(Slot, Membership)> {
        self.recovered_config.as_ref()
    }

    /// The underlying log.
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// The durability in force.
    pub fn durability(&self) -> Durability {
        self.log.durability()
    }

    fn read_entry(&self, slot: Slot, pos: Position) -> Result<Entry> {
        if let Some((e, _)) = self.cache.get(&slot) {
            debug_assert_eq!(self.index.get(&slot).map(|&(_, b)| b), Some(e.ballot), "cache holds the newest entry");
            return Ok(e.clone());
        }
        let rec = self.log.read(pos)?;
        if rec.meta.kind != RecordKind::Entry || rec.meta.slot != slot {
            return Err(StoreError::Decode { pos, reason: "index points at a record that is not this slot's entry" });
        }
        let value = decode_value(&rec.payload).map_err(|reason| StoreError::Decode { pos, reason })?;
        Ok(Entry { slot, ballot: rec.meta.ballot, value })
    }
}

impl Storage for PaxosStore {
    fn promise(&self) -> Ballot {
        self.promise
    }

    fn set_chosen_hint(&mut self, slot: Slot) -> Result<(), StorageError> {
        if slot <= self.chosen {
            return Ok(());
        }
        // Appended after the entries it covers: recovery keeps a prefix of the log, so
        // the hint never survives without them.
        self.log.append_record(RecordKind::Chosen, slot, Ballot::ZERO, &[])?;
        self.chosen = slot;
        Ok(())
    }

    fn chosen_hint(&self) -> Slot {
        self.chosen
    }

    fn set_promise(&mut self, b: Ballot) -> Result<(), StorageError> {
        if b < self.promise {
            return Err(StorageError::msg(format!("promise lowered {:?} -> {b:?}", self.promise)));
        }
        if b == self.promise {
            return Ok(());
        }
        self.log.append_record(RecordKind::Promise, 0, b, &[])?;
        self.promise = b;
        Ok(())
    }

    fn accept(&mut self, entry: Entry) -> Result<(), StorageError> {
        if entry.slot == 0 {
            return Err(StorageError::msg("accept at slot 0"));
        }
        if let Some(&(_, old)) = self.index.get(&entry.slot) {
            if old > entry.ballot {
                return Err(StorageError::msg(format!(
                    "slot {} overwritten by a lower ballot {:?} < {old:?}",
                    entry.slot, entry.ballot
                )));
            }
        }
        self.scratch.clear();
        encode_value(&entry.value, &mut self.scratch);
        let pos = self.log.append_record(RecordKind::Entry, entry.slot, entry.ballot, &self.scratch)?;
        self.index.insert(entry.slot, (pos, entry.ballot));
        let size = self.scratch.len();
        if let Some((_, old)) = self.cache.insert(entry.slot, (entry, size)) {
            self.cache_bytes -= old;
        }
        self.cache_bytes += size;
        while self.cache_bytes > CACHE_BYTES {
            match self.cache.pop_first() {
                Some((_, (_, n))) => self.cache_bytes -= n,
                None => break,
            }
        }
        Ok(())
    }

    fn entry(&self, slot: Slot) -> Result<Option<Entry>, StorageError> {
        match self.index.get(&slot) {
            None => Ok(None),
            Some(&(pos, _)) => Ok(Some(self.read_entry(slot, pos)?)),
        }
    }

    fn last_slot(&self) -> Slot {
        self.index.keys().next_back().copied().unwrap_or(0).max(self.trimmed)
    }

    /// Drops the entries up to `upto` and the log segments that hold nothing else. The
    /// promise and the chosen hint are written again first (their old records may sit
    /// in a dropped segment), with the trim record, and synced before any segment goes.
    fn trim(&mut self, upto: Slot) -> Result<(), StorageError> {
        if upto <= self.trimmed {
            return Ok(());
        }
        if !self.promise.is_zero() {
            self.log.append_record(RecordKind::Promise, 0, self.promise, &[])?;
        }
        if self.chosen > 0 {
            self.log.append_record(RecordKind::Chosen, self.chosen, Ballot::ZERO, &[])?;
        }
        let at = self.log.append_record(RecordKind::Trimmed, upto, Ballot::ZERO, &[])?;
        self.log.sync()?;
        self.index = self.index.split_off(&(upto + 1));
        self.cache = self.cache.split_off(&(upto + 1));
        self.cache_bytes = self.cache.values().map(|&(_, n)| n).sum();
        self.trimmed = upto;
        let keep_from = self.index.values().map(|&(pos, _)| pos).min().unwrap_or(at).min(at);
        self.log.trim_prefix(keep_from)?;
        Ok(())
    }

    fn trimmed(&self) -> Slot {
        self.trimmed
    }

    fn sync(&mut self) -> Result<(), StorageError> {
        Ok(self.log.sync()?)
    }

    fn entries(&self, from: Slot, to: Slot) -> Result<Vec<Entry>, StorageError> {
        if from > to {
            return Ok(Vec::new());
        }
        self.index
            .range(from.max(1)..=to)
            .map(|(&slot, &(pos, _))| self.read_entry(slot, pos).map_err(Into::into))
            .collect()
    }
}
