//! Snapshots: compacting the log behind an application snapshot, and catching up a
//! follower whose next slot the leader has trimmed by shipping it a snapshot.
//!
//! The core never sees snapshot bytes. The application saves its state together with
//! [`SnapshotMeta`] (the core's de-duplication table) and then calls
//! [`Replica::compact`]; the core trims its storage up to that slot. A leader whose
//! follower needs a trimmed slot emits [`Action::SendSnapshot`]; the driver streams its
//! latest snapshot; the follower's driver verifies and saves it, loads it into the
//! application, and calls [`Replica::install_snapshot`].
//!
//! Safety: a trimmed slot is chosen, and its value lives on in the snapshot. A
//! candidate never adopts values over a trimmed range it has not applied: it needs
//! `chosen >= trimmed` of every promiser (and of itself), else it gives up the election
//! (pre-vote refuses it first), so a missing entry is never mistaken for an empty slot.

use super::{Action, Error, Replica, Role};
use crate::contracts::{ensure, require};
use crate::message::Message;
use crate::storage::Storage;
use crate::types::{Nanos, Slot};

pub use super::apply::SnapshotMeta;

impl<S: Storage> Replica<S> {
    /// The core's part of a snapshot of the state after applying every slot up to
    /// [`Replica::applied`] (take the application's snapshot at the same point).
    pub fn snapshot_meta(&self) -> SnapshotMeta {
        let mut m = self.apply_state.snapshot(self.applied);
        m.membership = self.cfg.membership();
        m
    }

    /// The application durably saved a snapshot covering every slot up to `upto`
    /// (at most [`Replica::applied`]): the storage may drop those entries. Followers
    /// that still need them are sent a snapshot instead ([`Action::SendSnapshot`]).
    pub fn compact(&mut self, now: Nanos, upto: Slot) -> Result<(), Error> {
        self.enter(now)?;
        let r = self.compact_inner(upto);
        self.leave(r)
    }

    fn compact_inner(&mut self, upto: Slot) -> Result<(), Error> {
        require!(upto <= self.applied, "compact to {upto} beyond applied {}", self.applied);
        if upto > self.storage.trimmed() {
            self.storage.trim(upto)?;
            self.dirty = true;
        }
        ensure!(self.storage.trimmed() >= upto);
        Ok(())
    }

    /// The driver durably saved the snapshot `meta` of a log-service trim
    /// ([`Applied::trim`](crate::Applied)): drop the slots it covers. It becomes the
    /// base later trims replay from, and the snapshot a lagging follower is sent.
    pub fn compact_to(&mut self, now: Nanos, meta: SnapshotMeta) -> Result<(), Error> {
        self.enter(now)?;
        let r = self.compact_to_inner(meta);
        self.leave(r)
    }

    fn compact_to_inner(&mut self, meta: SnapshotMeta) -> Result<(), Error> {
        require!(meta.slot <= self.applied, "trim to {} beyond applied {}", meta.slot, self.applied);
        if meta.slot <= self.base.slot {
            return Ok(());
        }
        self.compact_inner(meta.slot)?;
        self.base = meta;
        ensure!(self.storage.trimmed() >= self.base.slot);
        Ok(())
    }

    /// The core's state at the last snapshot restored, installed or trimmed to.
    pub fn base(&self) -> &SnapshotMeta {
        &self.base
    }

    /// Whether a snapshot covering slots up to `slot` would move this replica forward:
    /// it is not leading and has not applied that far. Check before loading a received
    /// snapshot into the application.
    pub fn snapshot_useful(&self, slot: Slot) -> bool {
        self.stopped.is_none() && self.role != Role::Leader && slot > self.chosen
    }

    /// The application loaded (and durably saved) a snapshot covering slots up to
    /// `meta.slot`, received from the leader: continue from there. The log entries up
    /// to it are dropped. Does nothing unless [`Replica::snapshot_useful`].
    pub fn install_snapshot(&mut self, now: Nanos, meta: SnapshotMeta) -> Result<bool, Error> {
        self.enter(now)?;
        if !self.snapshot_useful(meta.slot) {
            return Ok(false);
        }
        let r = self.install_inner(meta);
        self.leave(r).map(|_| true)
    }

    fn install_inner(&mut self, meta: SnapshotMeta) -> Result<(), Error> {
        require!(meta.slot > self.chosen && self.role != Role::Leader);
        if matches!(self.role, Role::PreCandidate | Role::Candidate) {
            self.become_follower(None);
        }
        let slot = meta.slot;
        // Applies not yet released are covered by the snapshot the application loaded.
        let stale = |a: &Action| matches!(a, Action::Apply(x) if x.slot <= slot);
        self.out.retain(|a| !stale(a));
        self.staged.retain(|a| !stale(a));
        self.storage.trim(slot)?;
        self.chosen = slot;
        self.applied = slot;
        self.apply_state = super::apply::ApplyState::restore(&meta);
        self.base = meta.clone();
        if meta.membership.is_valid() && meta.membership != self.cfg.membership() {
            self.apply_membership(meta.membership.clone());
        }
        self.storage.set_chosen_hint(slot)?;
        self.dirty = true;
        // Entries above the snapshot may already be known chosen.
        self.advance_chosen()?;
        // Tell the leader at once, so that it resumes writes after the snapshot.
        if let Some(leader) = self.leader.filter(|&l| l == self.promised.node && l != self.cfg.id) {
            let last = self.storage.last_slot();
            let msg = Message::HeartbeatReply { ballot: self.promised, chosen: self.chosen, last, seq: 0 };
            self.send(leader, msg);
        }
        ensure!(self.applied >= slot && self.chosen >= slot && self.storage.trimmed() >= slot);
        Ok(())
    }

    /// Leader side: `to` needs slots this replica has trimmed. Asks the driver for a
    /// snapshot transfer, at most once per election timeout per follower.
    pub(super) fn need_snapshot(&mut self, to: crate::types::NodeId) {
        let now = self.now;
        let every = self.cfg.election_timeout;
        let Some(l) = self.lead.as_mut() else { return };
        let Some(p) = l.peers.get_mut(&to) else { return };
        if p.snapshot_sent.is_some_and(|t| now < t + every) {
            return;
        }
        p.snapshot_sent = Some(now);
        self.emit(Action::SendSnapshot { to });
    }
}
