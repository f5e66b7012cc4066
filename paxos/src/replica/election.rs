//! Leader election: pre-vote, phase 1 (promise and write permission, then a remote
//! read of each promiser's log tail), the Paxos value-adoption rule, leader stickiness
//! and check-quorum.
//!
//! Safety rests on phase 1: a candidate with ballot `b` adopts, for every slot above
//! its chosen prefix, the value of the highest ballot found in the logs of a quorum of
//! acceptors that promised `b`, and rewrites it under `b` before proposing anything
//! new. Liveness rests on randomized timeouts, pre-vote (a replica that cannot reach a
//! quorum never raises anybody's promise) and stickiness (a replica that heard a
//! leader within the election timeout refuses to help depose it).

use super::{Action, CandidateState, Error, FenceState, LeaderState, PreVoteState, Progress, Replica, Role};
use crate::config::PlantedBug;
use crate::contracts::{ensure, invariant, require};
use crate::message::{Message, ReadRequest, ReadResult};
use crate::storage::Storage;
use crate::types::{Ballot, Entry, Membership, Nanos, NodeId, Slot, Value};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

impl<S: Storage> Replica<S> {
    /// Timers: heartbeats and check-quorum for a leader, the election timeout for the
    /// others.
    pub(super) fn on_timeout(&mut self) -> Result<(), Error> {
        let now = self.now;
        match self.role {
            Role::Learner => Ok(()),
            Role::Leader => {
                let (hb_due, qc_due) = {
                    let l = self.lead.as_ref().expect("leader state");
                    (l.heartbeat_due, l.quorum_check_due)
                };
                if now >= qc_due && !self.check_quorum() {
                    return Ok(()); // stepped down
                }
                self.notify_commit();
                if now >= hb_due {
                    self.heartbeat_tick()?;
                }
                Ok(())
            }
            Role::Follower | Role::PreCandidate | Role::Candidate => {
                // A replica that has not applied its own trimmed prefix (it restarted
                // from an older snapshot) must catch up before it may lead.
                let caught_up = self.chosen >= self.storage.trimmed() || self.bug(PlantedBug::IgnoreTrimmedPromiser);
                if now >= self.election_deadline && self.cfg.can_lead && caught_up {
                    self.start_pre_vote()?;
                }
                Ok(())
            }
        }
    }

    /// Whether this replica currently refuses to help elect `from`: it leads, or it heard
    /// from another leader within the election timeout (leader stickiness).
    fn lease_active(&self, from: NodeId) -> bool {
        match self.role {
            Role::Leader => true,
            _ if self.now < self.boot_lease_until => true,
            // A candidate whose phase 1 is progressing (tails being read) does not help
            // another election start; if it stalls, its lease lapses.
            Role::Candidate => self.candidate_contact.is_some_and(|t| self.now < t + self.cfg.election_timeout),
            _ => {
                let recent = |t: Option<Nanos>| t.is_some_and(|t| self.now < t + self.cfg.election_timeout);
                let leader_alive = self.leader.is_some() && self.leader != Some(from) && recent(self.leader_contact);
                // A candidate we promised that is still reading tails in parts.
                let candidate_busy = self.promised.node != from
                    && self.promised.node != self.cfg.id
                    && self.leader.is_none()
                    && recent(self.candidate_contact);
                leader_alive || candidate_busy
            }
        }
    }

    fn start_pre_vote(&mut self) -> Result<(), Error> {
        require!(self.role != Role::Learner && self.role != Role::Leader);
        let round = self.max_round + 1;
        self.cand = None;
        self.role = Role::PreCandidate;
        self.leader = None;
        self.pre = Some(PreVoteState { round, granted: BTreeSet::from([self.cfg.id]), granted_msgs: 1 });
        let now = self.now;
        self.reset_election_timer(now);
        self.note_role();
        let voters: Vec<NodeId> = self.cfg.voters.iter().copied().filter(|&v| v != self.cfg.id).collect();
        let chosen = self.chosen;
        for v in voters {
            self.send(v, Message::PreVote { round, chosen });
        }
        self.maybe_start_election()
    }

    pub(super) fn on_pre_vote(&mut self, from: NodeId, round: u64, chosen: Slot) -> Result<(), Error> {
        // Answered whatever our (possibly stale) view of the membership says: a grant
        // changes nothing here, and the pre-candidate counts only its voters. (A
        // replica that missed its promotion must still help elect a leader.)
        if Ballot::new(round, from) <= self.promised {
            // Tell the pre-candidate how far rounds went, or it may never catch up.
            let (ballot, promised) = (Ballot::new(round, from), self.promised);
            self.send(from, Message::Reject { ballot, promised });
        }
        let behind = chosen < self.storage.trimmed() && !self.bug(PlantedBug::IgnoreTrimmedPromiser);
        if behind {
            // It cannot lead before it has our snapshot: send it (there may be no
            // leader to do so, e.g. when it is the only other replica that may lead).
            self.emit(Action::SendSnapshot { to: from });
        }
        let granted = Ballot::new(round, from) > self.promised && !self.lease_active(from) && !behind;
        self.send(from, Message::PreVoteReply { round, granted });
        Ok(())
    }

    pub(super) fn on_pre_vote_reply(&mut self, from: NodeId, round: u64, granted: bool) -> Result<(), Error> {
        if self.role != Role::PreCandidate || !granted || !self.cfg.voters.contains(&from) {
            return Ok(());
        }
        let pre = self.pre.as_mut().expect("pre-vote state");
        if pre.round != round {
            return Ok(());
        }
        pre.granted.insert(from);
        pre.granted_msgs += 1;
        self.maybe_start_election()
    }

    fn maybe_start_election(&mut self) -> Result<(), Error> {
        let pre = self.pre.as_ref().expect("pre-vote state");
        let votes = if self.bug(PlantedBug::DoubleCountVote) { pre.granted_msgs } else { pre.granted.len() };
        if votes >= self.cfg.quorum() {
            self.start_election(false)?;
        }
        Ok(())
    }

    /// Phase 1a: take a new ballot, promise it ourselves, ask the voters. `transfer`:
    /// the leader handed leadership to us (no pre-vote was run; voters skip their lease).
    fn start_election(&mut self, transfer: bool) -> Result<(), Error> {
        require!(self.role == Role::PreCandidate || (transfer && self.role == Role::Follower));
        require!(self.cfg.can_lead && self.cfg.is_voter());
        if self.fence_first() {
            // Acceptance by landing: the holder is fenced first (see `fence_first`).
            self.fence.as_mut().expect("fence asked").election = Some(transfer);
            return Ok(());
        }
        let ballot = Ballot::new(self.max_round + 1, self.cfg.id);
        self.raise_promise(ballot)?;
        self.pre = None;
        self.role = Role::Candidate;
        self.leader = None;
        let from = self.chosen + 1;
        let last = self.storage.last_slot();
        let own = if last >= from { self.storage.entries(from, last)? } else { Vec::new() };
        let stage = self.cfg.membership();
        self.cand = Some(CandidateState {
            ballot,
            from,
            configs: BTreeMap::from([(from, stage.clone())]),
            stage,
            asked: BTreeSet::new(),
            promised: BTreeMap::from([(self.cfg.id, (self.chosen, last))]),
            read: BTreeMap::from([(self.cfg.id, own)]),
            partial: BTreeMap::new(),
            promise_msgs: 1,
            read_msgs: 1,
        });
        // Until promisers' tails are being read, other elections may preempt this one.
        self.candidate_contact = None;
        let now = self.now;
        self.reset_election_timer(now);
        self.note_role();
        let voters: Vec<NodeId> = self.cfg.voters.iter().copied().filter(|&v| v != self.cfg.id).collect();
        for v in voters {
            self.send(v, Message::Prepare { ballot, transfer });
        }
        self.maybe_adopt()
    }

    /// Phase 1b at an acceptor.
    pub(super) fn on_prepare(&mut self, from: NodeId, ballot: Ballot, transfer: bool) -> Result<(), Error> {
        // Learners answer too: a candidate may be collecting a quorum of a newer
        // membership in which they vote, before they applied it. A promise binds only
        // the promiser; the candidate counts only the voters of the membership at hand.
        if ballot.node != from {
            return Ok(());
        }
        self.max_round = self.max_round.max(ballot.round);
        if ballot > self.promised {
            // A leader answers only the transfer it started; others answer a transfer
            // despite their lease (the leader asked for it).
            let handed_to_sender = self.lead.as_ref().and_then(|l| l.transfer).is_some_and(|t| t.to == from);
            let lease = if self.role == Role::Leader {
                !(transfer && handed_to_sender)
            } else {
                !transfer && self.lease_active(from)
            };
            if lease {
                return Ok(()); // a healthy leader is known: do not help depose it
            }
            if self.fence_first() {
                let f = self.fence.as_mut().expect("fence asked");
                f.stash.push((from, Message::Prepare { ballot, transfer }));
                return Ok(());
            }
            let before = self.promised;
            if self.role != Role::Follower {
                self.become_follower(None);
            }
            self.raise_promise(ballot)?;
            self.leader = None;
            self.leader_contact = None;
            let now = self.now;
            self.candidate_contact = Some(now);
            self.reset_election_timer(now);
            self.send_promise(from, ballot);
            ensure!(self.promised == ballot && self.promised > before);
        } else if ballot == self.promised {
            // A duplicate Prepare: promise again (idempotent).
            self.send_promise(from, ballot);
        } else if self.bug(PlantedBug::AcceptLowerBallot) {
            // Planted bug: answer a lower ballot's Prepare as if it were current.
            self.send_promise(from, ballot);
        } else {
            self.send(from, Message::Reject { ballot, promised: self.promised });
        }
        Ok(())
    }

    fn send_promise(&mut self, to: NodeId, ballot: Ballot) {
        let (chosen, last, trimmed) = (self.chosen, self.storage.last_slot(), self.storage.trimmed());
        self.send(to, Message::Promise { ballot, chosen, last, trimmed });
    }

    /// The leader hands leadership to us: start an election now.
    pub(super) fn on_timeout_now(&mut self, from: NodeId, ballot: Ballot) -> Result<(), Error> {
        let from_our_leader = ballot == self.promised && from == self.promised.node && self.leader == Some(from);
        if self.chosen < self.storage.trimmed() {
            return Ok(()); // not caught up with our own snapshot: we may not lead yet
        }
        if !from_our_leader || self.role != Role::Follower || !self.cfg.can_lead || !self.cfg.is_voter() {
            return Ok(()); // stale, or we may not lead: the leader's transfer times out
        }
        self.start_election(true)
    }

    /// A promise reached the candidate: read the promiser's log tail.
    pub(super) fn on_promise(
        &mut self,
        from: NodeId,
        ballot: Ballot,
        chosen: Slot,
        last: Slot,
        trimmed: Slot,
    ) -> Result<(), Error> {
        if self.role != Role::Candidate {
            return Ok(());
        }
        let double = self.bug(PlantedBug::DoubleCountVote);
        let ignore_trim = self.bug(PlantedBug::IgnoreTrimmedPromiser);
        let cand = self.cand.as_mut().expect("candidate state");
        if cand.ballot != ballot {
            return Ok(());
        }
        if trimmed >= cand.from && !ignore_trim {
            // The promiser dropped slots we have not learned (they are chosen, and live
            // on in its snapshot): its tail cannot tell us their values, so it does not
            // count towards our quorum. (Pre-vote normally keeps such a candidate from
            // starting, and sends it the snapshot.)
            return Ok(());
        }
        cand.promise_msgs += 1;
        let fresh = cand.promised.insert(from, (chosen, last)).is_none();
        if !fresh && !double {
            return Ok(());
        }
        let from_slot = cand.from;
        if last >= from_slot {
            let req = ReadRequest { ballot, from: from_slot, to: last };
            self.emit(Action::RemoteRead { to: from, req });
            Ok(())
        } else {
            cand.read.entry(from).or_default();
            cand.read_msgs += 1;
            self.maybe_adopt()
        }
    }

    /// (A part of) a promiser's log tail arrived. The agent may answer a shorter range
    /// than asked (`to` below the promiser's last slot): read the rest, then count it.
    pub(super) fn on_read_completion(&mut self, from: NodeId, res: ReadResult) -> Result<(), Error> {
        if self.role != Role::Candidate {
            return Ok(());
        }
        let double = self.bug(PlantedBug::DoubleCountVote);
        let cand = self.cand.as_mut().expect("candidate state");
        let Some(&(_, last)) = cand.promised.get(&from) else {
            return Ok(());
        };
        if cand.ballot != res.ballot || res.to < res.from || res.to > last {
            return Ok(());
        }
        if cand.read.contains_key(&from) && !double {
            return Ok(());
        }
        // Parts arrive in order (one outstanding read per promiser); anything else is a
        // stale duplicate.
        let start = cand.from;
        let (next, part) = cand.partial.entry(from).or_insert_with(|| (start, Vec::new()));
        if res.from != *next && !double {
            return Ok(());
        }
        // Keep only entries inside the range answered. Entries of a ballot above ours
        // may appear (the acceptor promised a higher ballot after promising ours and
        // accepted from its owner): adopting them is safe, because a value proposed
        // under a higher ballot is safe for every lower one; dropping them is not.
        part.extend(res.entries.into_iter().filter(|e| e.slot >= res.from && e.slot <= res.to));
        *next = res.to + 1;
        // Reading a long tail in parts is progress: do not give up on the election.
        let now = self.now;
        self.candidate_contact = Some(now);
        self.reset_election_timer(now);
        let cand = self.cand.as_mut().expect("candidate state");
        if res.to < last {
            let req = ReadRequest { ballot: res.ballot, from: res.to + 1, to: last };
            self.emit(Action::RemoteRead { to: from, req });
            return Ok(());
        }
        let entries = cand.partial.remove(&from).map(|(_, e)| e).unwrap_or_default();
        cand.read.insert(from, entries);
        cand.read_msgs += 1;
        self.maybe_adopt()
    }

    /// The memberships by the first slot they govern, from the candidate's start, as
    /// the adopted values change them.
    fn membership_walk(cand: &CandidateState, adopt: &BTreeMap<Slot, (Ballot, Value)>) -> BTreeMap<Slot, Membership> {
        let mut walk = BTreeMap::from([(cand.from, cand.stage.clone())]);
        for (&k, (_, v)) in adopt.range(cand.from..) {
            if let Value::Config(m) = v {
                walk.insert(k + 1, m.clone());
            }
        }
        walk
    }

    /// The Paxos rule over every tail read so far: for each slot, the value accepted
    /// under the highest ballot.
    fn adopted(cand: &CandidateState) -> BTreeMap<Slot, (Ballot, Value)> {
        let mut adopt: BTreeMap<Slot, (Ballot, Value)> = BTreeMap::new();
        for entries in cand.read.values() {
            for e in entries {
                match adopt.get(&e.slot) {
                    Some((b, v)) if *b > e.ballot || (*b == e.ballot && *v == e.value) => {}
                    Some((b, v)) if *b == e.ballot => {
                        // Two different values accepted under one ballot: impossible.
                        invariant!(false, "slot {} has two values under {:?}: {:?} / {:?}", e.slot, b, v, e.value);
                    }
                    _ => {
                        adopt.insert(e.slot, (e.ballot, e.value.clone()));
                    }
                }
            }
        }
        adopt
    }

    /// With the tails of a quorum read (of every membership the adopted values lead
    /// to), adopt values and become leader.
    fn maybe_adopt(&mut self) -> Result<(), Error> {
        let double = self.bug(PlantedBug::DoubleCountVote);
        let cand = self.cand.as_ref().expect("candidate state");
        let reads_of = |m: &Membership| cand.read.keys().filter(|id| m.is_voter(**id)).count();
        let base_reads = if double { cand.read_msgs } else { reads_of(&cand.stage) };
        if base_reads < cand.stage.quorum() {
            return Ok(());
        }
        // Every membership the adopted values lead to governs the slots after its
        // change: each needs a quorum of its voters read too. (The adopted values may
        // change as more tails arrive, so the walk is recomputed each time.)
        let adopt = Self::adopted(cand);
        let walk = Self::membership_walk(cand, &adopt);
        let missing: Vec<NodeId> = walk
            .values()
            .filter(|m| reads_of(m) < m.quorum())
            .flat_map(|m| m.voters.iter().copied())
            .filter(|v| !cand.promised.contains_key(v) && !cand.asked.contains(v))
            .collect();
        let complete = walk.values().all(|m| reads_of(m) >= m.quorum());
        if !complete {
            let ballot = cand.ballot;
            for v in missing {
                self.cand.as_mut().expect("candidate state").asked.insert(v);
                self.send(v, Message::Prepare { ballot, transfer: false });
            }
            return Ok(());
        }
        self.cand.as_mut().expect("candidate state").configs = walk;
        let cand = self.cand.as_ref().expect("candidate state");
        let ballot = cand.ballot;
        let from = cand.from;
        let configs = cand.configs.clone();
        let mut adopt = Self::adopted(cand);
        let max_slot = adopt.keys().next_back().copied().unwrap_or(0).max(from - 1);
        // The last membership change adopted, if it is not committed yet, holds the
        // pipeline (nothing after it is opened until it is chosen).
        let config_slot = adopt
            .iter()
            .rev()
            .find(|(_, (_, v))| matches!(v, Value::Config(_)))
            .map(|(&k, _)| k)
            .filter(|&k| k <= max_slot);
        let promisers: BTreeMap<NodeId, (Slot, Slot)> = cand.promised.clone();
        let skip_adoption = self.bug(PlantedBug::SkipValueAdoption);
        for slot in from..=max_slot {
            let value = match adopt.remove(&slot) {
                Some((_, v)) if !skip_adoption => v,
                _ => Value::Noop,
            };
            self.accept_local(Entry { slot, ballot, value })?;
        }
        // Become leader.
        let now = self.now;
        let mut peers = BTreeMap::new();
        for id in self.cfg.peers().collect::<Vec<_>>() {
            let voter = self.cfg.voters.contains(&id);
            let (base, heard) = match promisers.get(&id) {
                Some(&(chosen, _)) => (chosen.min(max_slot), Some(now)),
                None => (0, None),
            };
            let next = if heard.is_some() { base + 1 } else { self.chosen + 1 };
            let p = Progress {
                voter,
                next: next.max(base + 1),
                base,
                matched: base,
                acked: BTreeMap::new(),
                last_heard: heard,
                last_progress: now,
                commit_sent: 0,
                acked_seq: 0,
                acked_sent_at: None,
                snapshot_sent: None,
            };
            peers.insert(id, p);
        }
        self.cand = None;
        self.role = Role::Leader;
        self.leader = Some(self.cfg.id);
        self.lead = Some(LeaderState {
            ballot,
            next_slot: max_slot + 1,
            commit: self.chosen,
            pending: VecDeque::new(),
            peers,
            heartbeat_due: now,
            quorum_check_due: now + self.cfg.election_timeout,
            commit_notify_at: None,
            transfer: None,
            transfer_attempted: false,
            hb_seq: 0,
            hb_sent: VecDeque::new(),
            reads: VecDeque::new(),
            term_start: max_slot,
            synced: self.chosen,
            configs,
            config_slot,
            pending_config: None,
            last_handover: None,
            pending_trim: None,
        });
        self.sync_peers();
        self.note_role();
        self.heartbeat_tick()?;
        self.try_advance_commit()?;
        // (A leader that committed its own removal at once has handed over already.)
        ensure!(self.promised == ballot && (self.role == Role::Leader || !self.cfg.is_voter()));
        Ok(())
    }

    /// A refusal: someone promised a higher ballot than ours.
    pub(super) fn on_reject(&mut self, _from: NodeId, ballot: Ballot, promised: Ballot) -> Result<(), Error> {
        self.max_round = self.max_round.max(promised.round);
        if promised <= ballot || ballot != self.promised {
            return Ok(());
        }
        match self.role {
            Role::Candidate | Role::Leader if ballot.node == self.cfg.id => {
                self.become_follower(None);
            }
            _ => {}
        }
        Ok(())
    }

    /// Check-quorum: a leader that has not heard from a quorum within an election
    /// timeout steps down. Returns whether it is still leader.
    fn check_quorum(&mut self) -> bool {
        let now = self.now;
        let window = self.cfg.election_timeout;
        let early = self.bug(PlantedBug::EarlyNewQuorum);
        let l = self.lead.as_mut().expect("leader state");
        // The membership in force (the planted bug: the newest one, even uncommitted).
        let m = if early { l.configs.values().next_back().cloned() } else { None };
        let m = m.unwrap_or_else(|| self.cfg.membership());
        let quorum = m.quorum();
        let me = self.cfg.id;
        let recent = |p: &Progress| p.last_heard.is_some_and(|t| t + window >= now);
        let heard =
            l.peers.iter().filter(|(id, p)| m.is_voter(**id) && recent(p)).count() + usize::from(m.is_voter(me));
        l.quorum_check_due = now + window;
        // A leader its own change removed keeps leading until it has handed over (see
        // `hand_over_after_removal`): stepping down could leave no replica to lead, when
        // the new voters have not yet learned that they vote (they learn it from this
        // leader) and the others may not lead. Paxos safety does not rest on
        // check-quorum, and its lease reads need a quorum's recent answers anyway.
        if heard < quorum && m.is_voter(me) {
            self.become_follower(None);
            return false;
        }
        true
    }
}

impl<S: Storage> Replica<S> {
    /// Acceptance by landing ([`crate::Config::accept_on_landing`]): whether the promise
    /// must wait for a fence of the permission holder before it rises. The holder's
    /// writer counts a write as accepted once it landed in our region, possibly before
    /// we handed it to the core; raising the promise first would deny those writes (their
    /// ballot is no longer the promise) and leave them out of the tail the next
    /// candidate reads, though the old leader may have chosen values with them. So:
    /// revoke the holder, take every write that landed, and only then promise. Asks for
    /// the fence (once) and returns true when the caller must wait for it; the caller
    /// notes in `self.fence` what to do afterwards.
    pub(super) fn fence_first(&mut self) -> bool {
        if self.fence.is_some() {
            return true;
        }
        let p = self.promised;
        let holder_elsewhere = !p.is_zero() && p.node != self.cfg.id;
        if !self.cfg.accept_on_landing
            || !holder_elsewhere
            || self.fenced == Some(p)
            || self.bug(PlantedBug::PromiseBeforeDrain)
        {
            return false;
        }
        self.fence = Some(FenceState { at: p, stash: Vec::new(), election: None });
        self.emit(Action::Fence { holder: p.node });
        true
    }

    pub(super) fn on_fence_done(&mut self) -> Result<(), Error> {
        let Some(f) = self.fence.take() else {
            return Ok(()); // nothing was asked (a driver repeating itself): nothing to do
        };
        require!(self.cfg.accept_on_landing, "a fence without acceptance by landing");
        require!(self.promised == f.at, "the promise rose during a fence: {:?} -> {:?}", f.at, self.promised);
        self.fenced = Some(f.at);
        let mut stash = f.stash.into_iter();
        while let Some((from, msg)) = stash.next() {
            self.dispatch(from, msg)?;
            if let Some(g) = self.fence.as_mut() {
                // The promise rose to a new holder, and a later message would raise it
                // again: that waits for a fence of the new holder.
                g.stash.extend(stash.by_ref());
                g.election = g.election.or(f.election);
                return Ok(());
            }
        }
        if let Some(transfer) = f.election {
            let may = self.cfg.can_lead
                && self.cfg.is_voter()
                && (self.role == Role::PreCandidate || (transfer && self.role == Role::Follower));
            if may && self.promised == f.at {
                self.start_election(transfer)?;
            }
        }
        if self.promised == f.at && self.fence.is_none() {
            // Nothing raised the promise after all: its owner may write again.
            self.fenced = None;
            self.emit(Action::GrantWrite { to: f.at.node, ballot: f.at });
        }
        ensure!(self.fence.is_some() || self.promised != f.at || self.fenced.is_none());
        Ok(())
    }
}
