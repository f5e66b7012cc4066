//! In-order apply, exactly once, with client de-duplication and positions.
//!
//! Every replica applies the same chosen slots in the same order, so the positions it
//! hands out and the duplicates it drops are the same everywhere.

use super::{Action, Error, Replica};
use crate::contracts::{ensure, invariant, require};
use crate::storage::Storage;
use crate::types::{Command, Membership, Position, Slot, Value};
use std::collections::{BTreeMap, HashMap};

/// How many recent sequence numbers per client are remembered for de-duplication.
/// A retry older than that is still recognised as a duplicate (its sequence number is
/// below every remembered one) but its original position is no longer known.
pub const DEDUP_WINDOW: usize = 4096;

/// One client entry as applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedEntry {
    /// The entry's position in the log of client entries. For a duplicate, the
    /// position of the original, or 0 if it is too old to be remembered.
    pub position: Position,
    /// The entry.
    pub command: Command,
    /// Whether this is a retry of an entry applied before (it takes no new position).
    pub duplicate: bool,
}

/// A chosen slot as applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// The slot.
    pub slot: Slot,
    /// Its client entries in order (empty for a no-op or a membership change).
    pub entries: Vec<AppliedEntry>,
    /// The membership this slot changed to, if it is a membership change (in force for
    /// every later slot).
    pub membership: Option<Membership>,
    /// For a chosen [`Value::Trim`]: the core's snapshot of the prefix to drop (its
    /// slot is the last slot whose entries all lie at or below the trim position, and
    /// before the trim's own slot), when that moves past the last snapshot. The driver
    /// saves it durably, then calls [`crate::Replica::compact_to`]. Every replica gets
    /// the same one at the same point of the log.
    pub trim: Option<SnapshotMeta>,
}

/// The core's part of a snapshot taken after applying `slot`: the client
/// de-duplication table and the position counter. The application saves it with its own
/// state and hands both back on restart ([`crate::Replica::restore`]) or when a leader's
/// snapshot arrives ([`crate::Replica::install_snapshot`]).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SnapshotMeta {
    /// Every slot up to this one is reflected in the snapshot.
    pub slot: Slot,
    /// The last position handed out.
    pub last_position: Position,
    /// Per client (sorted by id): its remembered sequence numbers and their positions.
    pub clients: Vec<(u64, Vec<(u64, Position)>)>,
    /// The membership in force after `slot` (empty: the configured one).
    pub membership: Membership,
}

#[derive(Debug, Default)]
struct ClientRecord {
    seqs: BTreeMap<u64, Position>,
}

/// De-duplication table and position counter.
#[derive(Debug, Default)]
pub(crate) struct ApplyState {
    last_position: Position,
    clients: HashMap<u64, ClientRecord>,
}

impl ApplyState {
    pub(crate) fn last_position(&self) -> Position {
        self.last_position
    }

    pub(crate) fn snapshot(&self, slot: Slot) -> SnapshotMeta {
        let mut clients: Vec<(u64, Vec<(u64, Position)>)> =
            self.clients.iter().map(|(&c, r)| (c, r.seqs.iter().map(|(&s, &p)| (s, p)).collect())).collect();
        clients.sort_unstable_by_key(|c| c.0);
        SnapshotMeta { slot, last_position: self.last_position, clients, membership: Membership::default() }
    }

    pub(crate) fn restore(meta: &SnapshotMeta) -> Self {
        let clients =
            meta.clients.iter().map(|(c, seqs)| (*c, ClientRecord { seqs: seqs.iter().copied().collect() })).collect();
        ApplyState { last_position: meta.last_position, clients }
    }

    fn apply(&mut self, slot: Slot, value: Value) -> Applied {
        let (cmds, membership) = match value {
            Value::Noop => (Vec::new(), None),
            Value::Batch(c) => (c, None),
            Value::Config(m) => (Vec::new(), Some(m)),
            Value::Trim(_) => (Vec::new(), None),
        };
        let mut entries = Vec::with_capacity(cmds.len());
        for command in cmds {
            let rec = self.clients.entry(command.client).or_default();
            let known = rec.seqs.get(&command.seq).copied();
            let too_old = rec.seqs.len() >= DEDUP_WINDOW && rec.seqs.keys().next().is_some_and(|&lo| command.seq < lo);
            match known {
                Some(pos) => entries.push(AppliedEntry { position: pos, command, duplicate: true }),
                None if too_old => entries.push(AppliedEntry { position: 0, command, duplicate: true }),
                None => {
                    self.last_position += 1;
                    rec.seqs.insert(command.seq, self.last_position);
                    if rec.seqs.len() > DEDUP_WINDOW {
                        rec.seqs.pop_first();
                    }
                    entries.push(AppliedEntry { position: self.last_position, command, duplicate: false });
                }
            }
        }
        Applied { slot, entries, membership, trim: None }
    }
}

impl<S: Storage> Replica<S> {
    /// Applies every chosen slot not applied yet, in order, once each.
    pub(super) fn apply_ready(&mut self) -> Result<(), Error> {
        if self.chosen > self.storage.chosen_hint() {
            // Written after the entries it covers; rides on the next sync.
            self.storage.set_chosen_hint(self.chosen)?;
        }
        while self.applied < self.chosen {
            let slot = self.applied + 1;
            let entry = self.storage.entry(slot)?;
            invariant!(entry.is_some(), "chosen slot {slot} missing from storage");
            let Some(entry) = entry else { break };
            require!(entry.slot == slot);
            let trim = match entry.value {
                Value::Trim(p) => self.trim_meta(p, slot)?,
                _ => None,
            };
            let before = self.apply_state.last_position();
            let mut applied = self.apply_state.apply(slot, entry.value);
            applied.trim = trim;
            ensure!(self.apply_state.last_position() >= before);
            self.applied = slot;
            let changed = applied.membership.clone();
            self.emit(Action::Apply(applied));
            if let Some(m) = changed {
                self.apply_membership(m);
            }
        }
        Ok(())
    }
}

impl<S: Storage> Replica<S> {
    /// The core's snapshot after the last slot before `trim_slot` whose entries all lie
    /// at or below `position`, if that is past the last snapshot ([`Replica::base`]).
    /// Called while applying `trim_slot`, so the apply state is the one after
    /// `trim_slot - 1`; an earlier point is replayed from the last snapshot over the
    /// stored entries (which is why the log service's snapshots are taken exactly at the
    /// slot they trim to).
    fn trim_meta(&self, position: Position, trim_slot: Slot) -> Result<Option<SnapshotMeta>, Error> {
        require!(self.applied + 1 == trim_slot);
        let base = &self.base;
        if position <= base.last_position || trim_slot <= base.slot + 1 {
            return Ok(None);
        }
        let wrong_point = self.bug(crate::config::PlantedBug::TrimAtApplied);
        if position >= self.apply_state.last_position() || wrong_point {
            let mut m = self.snapshot_meta();
            if wrong_point {
                // The planted bug: the state after `trim_slot - 1`, labelled with an
                // earlier slot.
                m.slot = self.trim_stop(position, trim_slot)?.unwrap_or(m.slot);
            }
            ensure!(m.slot == trim_slot - 1 || wrong_point);
            return Ok(Some(m).filter(|m| m.slot > base.slot));
        }
        if self.storage.trimmed() > base.slot {
            // The entries after the last snapshot are gone (an application snapshot
            // compacted them): the prefix cannot be replayed, so it is not trimmed.
            return Ok(None);
        }
        let Some(last) = self.trim_stop(position, trim_slot)? else { return Ok(None) };
        // Replay the last snapshot's state up to `last`.
        let mut state = ApplyState::restore(base);
        let mut membership = base.membership.clone();
        for s in base.slot + 1..=last {
            let Some(e) = self.storage.entry(s)? else {
                invariant!(false, "applied slot {s} missing from storage");
                return Ok(None);
            };
            if let Value::Config(m) = &e.value {
                membership = m.clone();
            }
            state.apply(s, e.value);
        }
        let mut m = state.snapshot(last);
        m.membership = membership;
        ensure!(m.last_position <= position && m.slot < trim_slot);
        Ok(Some(m))
    }

    /// The last slot after the last snapshot and before `trim_slot` whose entries all
    /// lie at or below `position` (`None`: no slot after the snapshot qualifies).
    fn trim_stop(&self, position: Position, trim_slot: Slot) -> Result<Option<Slot>, Error> {
        let base = &self.base;
        let mut state = ApplyState::restore(base);
        let mut last = None;
        for s in base.slot + 1..trim_slot {
            let Some(e) = self.storage.entry(s)? else { break };
            state.apply(s, e.value);
            if state.last_position() > position {
                break;
            }
            last = Some(s);
        }
        Ok(last)
    }
}
