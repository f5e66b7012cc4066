//! Membership changes while serving: add, remove and replace replicas.
//!
//! # The scheme (single-step, in the log, with a drained pipeline)
//!
//! A change is a log value, [`Value::Config`], proposed by the leader at some slot `k`.
//! The membership in force at slot `s` is the one set by the last change at a slot
//! below `s` (the configured one before any). Two rules make this safe:
//!
//! 1. **The leader opens no slot after `k` until `k` is chosen.** So while the slots up
//!    to `k` are decided by the old membership `O`, nothing after `k` exists; once `k`
//!    is chosen, the slots after it are decided by the new membership `N` only. No
//!    slot is ever decided by two memberships.
//! 2. **Phase 1 follows changes.** A candidate collects promises and log tails from a
//!    quorum of the membership in force at its chosen prefix. If the values it adopts
//!    hold a change at slot `k` (to `N`), the slots after `k` may have been decided by
//!    `N`, so it also collects promises and tails from a quorum of `N` before adopting
//!    anything after `k`, and so on for further changes. If `k` was chosen, any quorum
//!    of `O` holds its value with the highest ballot at `k` (the Paxos rule), so the
//!    candidate cannot miss it; if `k` was not chosen, nothing after `k` was chosen
//!    either (rule 1), and the candidate decides `k` itself.
//!
//! This is the classic "reconfiguration as a log entry with α = 1" (Lamport, Malkhi and
//! Zhou's Stoppable/Vertical Paxos family) rather than Raft's joint consensus: the
//! drained pipeline costs one round trip per change, which is rare, and keeps the
//! quorum rule per slot simple. Any change is allowed in one step (3 to 5 voters, or a
//! replacement), but a node becomes a voter only from being a caught-up learner: new
//! members catch up as learners first ([`Replica::change_membership`] refuses to promote
//! one that lags).

use super::{Error, Progress, Replica, Role};
use crate::config::PlantedBug;
use crate::contracts::{ensure, invariant, require};
use crate::storage::Storage;
use crate::types::{Entry, Membership, Nanos, NodeId, Value};
use std::collections::BTreeMap;

/// Why a membership change was refused (nothing was done).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    /// This replica is not the leader.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The known leader, if any.
        leader: Option<NodeId>,
    },
    /// Another membership change is not committed yet: retry after it.
    #[error("another membership change is in progress")]
    Busy,
    /// A leadership transfer is in progress.
    #[error("leadership transfer to {to} in progress")]
    Transferring {
        /// The transfer's target.
        to: NodeId,
    },
    /// The change itself is not allowed (the reason says why).
    #[error("{0}")]
    Refused(String),
    /// The replica stopped after a fatal error.
    #[error("replica stopped")]
    Stopped,
}

impl<S: Storage> Replica<S> {
    /// The membership in force here (as of the applied prefix).
    pub fn membership(&self) -> Membership {
        self.cfg.membership()
    }

    /// Asks the leader to change the membership to `m` (voters and learners). Refused
    /// when this replica does not lead, when another change is not yet committed, when
    /// `m` has no voter, or when `m` makes a voter of a node that is not a learner (or
    /// voter) already, or of a learner that lags more than a window behind the commit
    /// index. The change takes effect once committed ([`crate::Action::Apply`] carries
    /// it on every replica).
    pub fn change_membership(&mut self, now: Nanos, m: Membership) -> Result<(), MembershipError> {
        if self.stopped.is_some() {
            return Err(MembershipError::Stopped);
        }
        if self.role != Role::Leader {
            return Err(MembershipError::NotLeader { leader: self.leader });
        }
        let m = Membership::new(m.voters, m.learners).with_addrs(m.addrs);
        if !m.is_valid() {
            return Err(MembershipError::Refused("the membership needs at least one voter and no node 0".into()));
        }
        let window = self.cfg.window;
        let current = self.cfg.membership();
        let l = self.lead.as_ref().expect("leader state");
        if l.pending_config.is_some() || l.config_slot.is_some_and(|k| k > l.commit) {
            return Err(MembershipError::Busy);
        }
        if let Some(t) = l.transfer {
            return Err(MembershipError::Transferring { to: t.to });
        }
        for &v in &m.voters {
            if current.is_voter(v) {
                continue;
            }
            if !current.learners.contains(&v) {
                return Err(MembershipError::Refused(format!(
                    "replica {v} must join as a learner and catch up before it votes"
                )));
            }
            let behind = l.peers.get(&v).is_none_or(|p| p.matched + window < l.commit);
            if behind {
                return Err(MembershipError::Refused(format!("learner {v} has not caught up yet")));
            }
        }
        if self.enter(now).is_err() {
            return Err(MembershipError::Stopped);
        }
        self.lead.as_mut().expect("leader state").pending_config = Some(m);
        let r = self.fill_slots().and_then(|_| self.send_writes_all()).and_then(|_| self.try_advance_commit());
        self.leave(r).map_err(|_| MembershipError::Stopped)
    }

    /// Leader: puts a pending membership change into the next slot, if the pipeline
    /// allows (no other change in flight). Returns whether slots may be opened after.
    pub(super) fn place_pending_config(&mut self) -> Result<bool, Error> {
        let early = self.bug(PlantedBug::EarlyNewQuorum);
        let Some(l) = self.lead.as_mut() else { return Ok(false) };
        if l.config_slot.is_some_and(|k| k > l.commit) && !early {
            return Ok(false); // drained until the change in flight is chosen
        }
        let Some(m) = l.pending_config.take() else { return Ok(true) };
        let slot = l.next_slot;
        let ballot = l.ballot;
        l.next_slot += 1;
        l.config_slot = Some(slot);
        // In force after the change's slot (the planted bug: from the change's slot on,
        // so the change itself and what follows count under the new quorum at once).
        let from = if early { slot } else { slot + 1 };
        l.configs.insert(from, m.clone());
        self.accept_local(Entry { slot, ballot, value: Value::Config(m) })?;
        self.sync_peers();
        Ok(early)
    }

    /// Leader: keeps a replication progress for every member of every membership in
    /// force at or after the commit index, and none for others.
    pub(super) fn sync_peers(&mut self) {
        let me = self.cfg.id;
        let now = self.now;
        let chosen = self.chosen;
        let current = self.cfg.membership();
        let Some(l) = self.lead.as_mut() else { return };
        let mut members: Vec<NodeId> =
            l.configs.values().flat_map(|m| m.voters.iter().chain(&m.learners).copied()).collect();
        members.sort_unstable();
        members.dedup();
        members.retain(|&n| n != me);
        l.peers.retain(|id, _| members.contains(id));
        for id in members {
            let p = l.peers.entry(id).or_insert_with(|| Progress {
                voter: false,
                next: chosen + 1,
                base: 0,
                matched: 0,
                acked: BTreeMap::new(),
                last_heard: None,
                last_progress: now,
                commit_sent: 0,
                acked_seq: 0,
                acked_sent_at: None,
                snapshot_sent: None,
            });
            p.voter = current.is_voter(id);
        }
    }

    /// Leader removed from the voters by a change it committed: it keeps leading (a
    /// proposer need not vote; its own acceptances no longer count) until a voter of
    /// the new membership takes over, handing leadership to the most caught-up voter
    /// with a transfer, and to the next one if that transfer times out (the target may
    /// be down or may not lead). Members keep learning the commit index meanwhile.
    pub(super) fn hand_over_after_removal(&mut self) -> Result<(), Error> {
        let voters = self.cfg.voters.clone();
        let now = self.now;
        let timeout = self.cfg.election_timeout;
        let Some(l) = self.lead.as_mut() else { return Ok(()) };
        if l.transfer.is_some() || voters.contains(&self.cfg.id) {
            return Ok(());
        }
        let last = l.last_handover;
        let mut order: Vec<(NodeId, (crate::types::Slot, Option<Nanos>))> = l
            .peers
            .iter()
            .filter(|(id, _)| voters.contains(id))
            .map(|(&id, p)| (id, (p.matched, p.last_heard)))
            .collect();
        order.sort_by_key(|&(id, key)| std::cmp::Reverse((Some(id) != last, key, id)));
        let Some(&(to, _)) = order.first() else { return Ok(()) };
        l.last_handover = Some(to);
        l.transfer = Some(super::Transfer { to, deadline: now + timeout, sent: false });
        l.transfer_attempted = true;
        self.send_writes(to)?;
        self.check_transfer()
    }

    /// A membership change was applied (it is chosen): it is in force from the next
    /// slot on. Roles follow: a removed leader steps down, a promoted learner starts
    /// taking part in elections, a demoted voter stops.
    pub(super) fn apply_membership(&mut self, m: Membership) {
        require!(m.is_valid(), "applied an invalid membership {m:?}");
        self.cfg.voters = m.voters.clone();
        self.cfg.learners = m.learners.clone();
        self.cfg.addrs = m.addrs.clone();
        let applied = self.applied;
        match self.role {
            Role::Leader => {
                let early = self.bug(PlantedBug::EarlyNewQuorum);
                let l = self.lead.as_mut().expect("leader state");
                let known = l.configs.entry(applied + 1).or_insert_with(|| m.clone());
                invariant!(*known == m || early, "slot {applied}: applied {m:?}, the leader had {known:?}");
                // Keep only the membership in force after the applied slot, and later ones.
                l.configs = l.configs.split_off(&(applied + 1));
                if l.transfer.is_some_and(|t| !m.is_voter(t.to)) {
                    l.transfer = None; // its target no longer votes
                }
                self.sync_peers();
                // A leader removed from the voters hands over once the change is
                // chosen (see `try_advance_commit`).
            }
            Role::Follower if !self.cfg.is_voter() => {
                self.role = Role::Learner;
                self.note_role();
            }
            Role::Learner if self.cfg.is_voter() => {
                self.role = Role::Follower;
                let now = self.now;
                self.reset_election_timer(now);
                self.note_role();
            }
            Role::PreCandidate | Role::Candidate if !self.cfg.is_voter() => self.become_follower(None),
            _ => {}
        }
        ensure!(self.cfg.membership() == m);
    }
}
