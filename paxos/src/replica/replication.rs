//! Phase 2: the leader batches proposals into slots, writes them into every follower's
//! log with one-sided remote writes (pipelined up to `window` open slots), counts
//! acknowledgements, advances the commit index, and catches lagging or restarted
//! followers up from its own log. The follower side (the agent) checks write
//! permission and learns which slots are chosen.

use super::{Action, Error, Progress, Replica, Role};
use crate::config::PlantedBug;
use crate::contracts::{ensure, invariant, require};
use crate::message::{Message, ReadRequest, ReadResult, WriteRequest, WriteResult};
use crate::storage::Storage;
use crate::types::{Ballot, Command, Entry, NodeId, Slot, Value};

impl<S: Storage> Replica<S> {
    // ---- leader --------------------------------------------------------------------

    /// Moves pending client entries into new slots, as far as the window allows.
    pub(super) fn fill_slots(&mut self) -> Result<(), Error> {
        let window = self.cfg.window;
        let max_n = self.cfg.max_batch_entries;
        let max_bytes = self.cfg.max_batch_bytes;
        loop {
            if self.lead.as_ref().is_none_or(|l| l.next_slot > l.commit + window || l.transfer.is_some()) {
                return Ok(());
            }
            if !self.place_pending_config()? {
                return Ok(());
            }
            let Some(l) = self.lead.as_mut() else {
                return Ok(());
            };
            if let Some(p) = l.pending_trim.take() {
                let (slot, ballot) = (l.next_slot, l.ballot);
                l.next_slot += 1;
                require!(self.storage.entry(slot)?.is_none_or(|e| e.ballot < ballot));
                self.accept_local(Entry { slot, ballot, value: Value::Trim(p) })?;
                continue;
            }
            if l.pending.is_empty() || l.next_slot > l.commit + window {
                return Ok(());
            }
            let mut batch: Vec<Command> = Vec::new();
            let mut bytes = 0usize;
            while let Some(c) = l.pending.front() {
                if !batch.is_empty() && (batch.len() >= max_n || bytes + c.payload.len() > max_bytes) {
                    break;
                }
                bytes += c.payload.len();
                batch.push(l.pending.pop_front().expect("front"));
            }
            let slot = l.next_slot;
            let ballot = l.ballot;
            l.next_slot += 1;
            // A leader writes each slot once per ballot.
            require!(
                self.storage.entry(slot)?.is_none_or(|e| e.ballot < ballot),
                "slot {slot} already written under our ballot"
            );
            self.accept_local(Entry { slot, ballot, value: Value::Batch(batch) })?;
        }
    }

    /// Sends outstanding slots to every peer.
    pub(super) fn send_writes_all(&mut self) -> Result<(), Error> {
        let ids: Vec<NodeId> = match &self.lead {
            Some(l) => l.peers.keys().copied().collect(),
            None => return Ok(()),
        };
        for id in ids {
            self.send_writes(id)?;
        }
        Ok(())
    }

    /// Sends `id` the slots it has not been sent, within its flow-control window.
    pub(super) fn send_writes(&mut self, id: NodeId) -> Result<(), Error> {
        let window = self.cfg.window;
        let max_slots = self.cfg.max_write_slots as u64;
        let trimmed = self.storage.trimmed();
        if self.lead.as_ref().and_then(|l| l.peers.get(&id)).is_some_and(|p| p.next <= trimmed) {
            // The follower needs slots we no longer hold: it catches up by snapshot.
            self.need_snapshot(id);
            return Ok(());
        }
        loop {
            let Some(l) = self.lead.as_mut() else {
                return Ok(());
            };
            let (ballot, commit, next_slot) = (l.ballot, l.commit, l.next_slot);
            // (A membership change may have removed the peer meanwhile.)
            let Some(p) = l.peers.get_mut(&id) else {
                return Ok(());
            };
            let limit = (p.matched + window + 1).min(next_slot);
            if p.next >= limit {
                return Ok(());
            }
            let first = p.next;
            let count = (limit - first).min(max_slots);
            p.next += count;
            p.commit_sent = p.commit_sent.max(commit);
            let entries = self.storage.entries(first, first + count - 1)?;
            invariant!(
                entries.len() as u64 == count && entries.iter().enumerate().all(|(i, e)| e.slot == first + i as u64),
                "leader log has a gap in {first}..{}",
                first + count
            );
            let values = entries.into_iter().map(|e| e.value).collect();
            let req = WriteRequest { ballot, first, values, commit };
            self.emit(Action::RemoteWrite { to: id, req });
        }
    }

    /// Heartbeats (with the commit index) and re-sends to followers that made no
    /// progress within `retransmit_timeout`.
    pub(super) fn heartbeat_tick(&mut self) -> Result<(), Error> {
        let now = self.now;
        let rto = self.cfg.retransmit_timeout;
        let hb = self.cfg.heartbeat_interval;
        let l = self.lead.as_mut().expect("leader state");
        l.heartbeat_due = now + hb;
        let (ballot, commit) = (l.ballot, l.commit);
        let seq = l.new_round(now);
        let mut ids = Vec::new();
        for (&id, p) in l.peers.iter_mut() {
            if p.next > p.matched + 1 && now >= p.last_progress + rto {
                // Writes went unanswered: re-send from the last contiguous acknowledgement.
                p.next = p.matched + 1;
                p.acked.clear();
                p.last_progress = now;
            }
            p.commit_sent = p.commit_sent.max(commit);
            ids.push(id);
        }
        for id in ids {
            self.send(id, Message::Heartbeat { ballot, commit, seq });
            self.send_writes(id)?;
        }
        self.check_transfer()?;
        // A leader no longer voting retries its hand-over after a failed transfer.
        self.hand_over_after_removal()
    }

    /// A leadership transfer: once the target holds every slot, tell it to start an
    /// election; past the deadline, give up and lead on.
    pub(super) fn check_transfer(&mut self) -> Result<(), Error> {
        let now = self.now;
        let Some(l) = self.lead.as_mut() else { return Ok(()) };
        let Some(mut t) = l.transfer else { return Ok(()) };
        if now >= t.deadline {
            l.transfer = None;
            return self.fill_slots().and_then(|_| self.send_writes_all());
        }
        let caught_up = l.peers.get(&t.to).is_some_and(|p| p.matched + 1 >= l.next_slot);
        if caught_up && !t.sent {
            t.sent = true;
            l.transfer = Some(t);
            let ballot = l.ballot;
            self.send(t.to, Message::TimeoutNow { ballot });
        }
        Ok(())
    }

    /// Once `Config::commit_notify_delay` passed since the commit index advanced, tells
    /// the followers that no write has carried it meanwhile (so an idle cluster's
    /// followers learn it within that delay, not a heartbeat interval).
    pub(super) fn notify_commit(&mut self) {
        let now = self.now;
        let Some(l) = self.lead.as_mut() else { return };
        if l.commit_notify_at.is_none_or(|t| t > now) {
            return;
        }
        l.commit_notify_at = None;
        let (ballot, commit, seq) = (l.ballot, l.commit, l.hb_seq);
        let mut to = Vec::new();
        for (&id, p) in l.peers.iter_mut() {
            if p.commit_sent < commit {
                p.commit_sent = commit;
                to.push(id);
            }
        }
        for id in to {
            self.send(id, Message::Heartbeat { ballot, commit, seq });
        }
    }

    /// A remote write we issued completed.
    pub(super) fn on_write_completion(&mut self, from: NodeId, res: WriteResult) -> Result<(), Error> {
        if self.role != Role::Leader {
            return Ok(());
        }
        let now = self.now;
        let l = self.lead.as_mut().expect("leader state");
        match res {
            WriteResult::Ok { ballot, first, count } => {
                if ballot != l.ballot || count == 0 {
                    return Ok(());
                }
                let Some(p) = l.peers.get_mut(&from) else {
                    return Ok(());
                };
                p.last_heard = Some(now);
                let last = first + count - 1;
                if last >= l.next_slot {
                    return Ok(()); // not something we sent under this ballot
                }
                if record_ack(p, first, last) {
                    p.last_progress = now;
                }
                self.try_advance_commit()?;
                self.fill_slots()?;
                self.send_writes_all()?;
                self.check_transfer()
            }
            WriteResult::Denied { ballot, promised } => {
                if ballot != l.ballot {
                    return Ok(());
                }
                if let Some(p) = promised {
                    self.max_round = self.max_round.max(p.round);
                    if p > ballot {
                        // Someone else holds the permission now: we lost leadership.
                        self.become_follower(None);
                        return Ok(());
                    }
                }
                // The follower has not granted us yet (it missed our Prepare): a
                // heartbeat makes it promise our ballot; the writes are re-sent after
                // the retransmit timeout.
                let (commit, seq) = (l.commit, l.hb_seq);
                self.send(from, Message::Heartbeat { ballot, commit, seq });
                Ok(())
            }
        }
    }

    /// A heartbeat reply: liveness, and the follower's chosen prefix for catch-up.
    pub(super) fn on_heartbeat_reply(
        &mut self,
        from: NodeId,
        ballot: Ballot,
        chosen: Slot,
        last: Slot,
        seq: u64,
    ) -> Result<(), Error> {
        if self.role != Role::Leader {
            return Ok(());
        }
        let now = self.now;
        let l = self.lead.as_mut().expect("leader state");
        if ballot != l.ballot {
            return Ok(());
        }
        let next_slot = l.next_slot;
        let sent_at = l.sent_at(seq);
        let Some(p) = l.peers.get_mut(&from) else {
            return Ok(());
        };
        p.last_heard = Some(now);
        if seq > p.acked_seq {
            p.acked_seq = seq;
            if sent_at.is_some() {
                p.acked_sent_at = sent_at;
            }
        }
        // Slots up to the follower's chosen prefix hold the chosen values there.
        let chosen = chosen.min(next_slot - 1);
        if chosen < p.base || last < p.matched {
            // The follower restarted and forgot which slots are chosen (that knowledge
            // is volatile; it learns them again only from entries under our ballot), or
            // its log is shorter than what it acknowledged (it lost data): rewrite its
            // log from its chosen prefix on.
            p.base = chosen;
            p.matched = chosen;
            p.acked.clear();
            p.next = chosen + 1;
            p.last_progress = now;
        } else if chosen > p.base {
            p.base = chosen;
            if chosen > p.matched {
                record_ack(p, p.matched + 1, chosen);
                p.last_progress = now;
            }
        }
        self.try_advance_commit()?;
        self.send_writes(from)?;
        self.check_transfer()?;
        self.check_reads()
    }

    /// Advances the commit index over slots acknowledged by a quorum, then applies.
    pub(super) fn try_advance_commit(&mut self) -> Result<(), Error> {
        let no_quorum = self.bug(PlantedBug::CommitWithoutQuorum);
        let votes_early = self.bug(PlantedBug::LeaderVotesBeforeSync);
        let me = self.cfg.id;
        let notify_at = self.now + self.cfg.commit_notify_delay;
        let l = self.lead.as_mut().expect("leader state");
        let before = l.commit;
        while l.commit + 1 < l.next_slot {
            let s = l.commit + 1;
            // Each slot is decided by the membership in force at it.
            let m = l.configs.range(..=s).next_back().map(|(_, m)| m).expect("a membership in force");
            let quorum = if no_quorum { 1 } else { m.quorum() };
            // Our own vote counts once our acceptance of `s` is durable.
            let own = usize::from(m.is_voter(me) && (s <= l.synced || votes_early));
            let votes = own + l.peers.iter().filter(|(id, p)| m.is_voter(**id) && p.matched >= s).count();
            if votes < quorum {
                break;
            }
            l.commit = s;
        }
        let commit = l.commit;
        if commit > before {
            l.commit_notify_at.get_or_insert(notify_at);
        }
        ensure!(commit >= before, "commit moved back");
        if commit > self.chosen {
            self.chosen = commit;
            self.apply_ready()?;
            if self.role == Role::Leader && !self.cfg.is_voter() {
                // A membership change removed this leader from the voters and is now
                // chosen: hand over to a voter of the new membership.
                self.hand_over_after_removal()?;
            }
            self.check_reads()?;
            // A committed membership change lets the pipeline open again.
            self.fill_slots()?;
        }
        Ok(())
    }

    // ---- follower (agent) ----------------------------------------------------------

    /// A remote write into our log: accepted only from the permission holder, that is
    /// the owner of the ballot we promised, under exactly that ballot.
    pub(super) fn on_remote_write(&mut self, from: NodeId, req: WriteRequest) -> Result<(), Error> {
        let permitted = if self.bug(PlantedBug::AcceptLowerBallot) {
            req.ballot.node == from && req.ballot <= self.promised && self.role != Role::Leader
        } else {
            req.ballot == self.promised && req.ballot.node == from
        };
        if !permitted || req.values.is_empty() || req.first == 0 {
            let result = WriteResult::Denied { ballot: req.ballot, promised: Some(self.promised) };
            self.emit(Action::WriteCompletion { to: from, result });
            return Ok(());
        }
        if self.role == Role::PreCandidate && req.ballot == self.promised {
            // The leader we were about to replace is alive after all.
            self.become_follower(Some(from));
        }
        invariant!(
            self.role == Role::Follower || self.role == Role::Learner || self.bug(PlantedBug::AcceptLowerBallot),
            "a {:?} accepted a remote write",
            self.role
        );
        if req.ballot == self.promised {
            self.leader_seen(from);
        }
        let count = req.values.len() as u64;
        let trimmed = self.storage.trimmed();
        for (i, value) in req.values.into_iter().enumerate() {
            let slot = req.first + i as u64;
            if slot <= trimmed {
                // Chosen, and held by the snapshot we trimmed to (a write that raced a
                // snapshot install, or one replayed from a persistent region).
                continue;
            }
            self.accept_local(Entry { slot, ballot: req.ballot, value })?;
        }
        self.learn_commit(req.ballot, req.commit)?;
        let result = WriteResult::Ok { ballot: req.ballot, first: req.first, count };
        self.emit(Action::WriteCompletion { to: from, result });
        Ok(())
    }

    /// A remote read of our log (phase 1 of a candidate).
    pub(super) fn on_remote_read(&mut self, from: NodeId, req: ReadRequest) -> Result<(), Error> {
        if from == self.promised.node && self.leader.is_none() {
            // The candidate we promised is reading our tail: it is making progress, so
            // give it time before starting an election of our own.
            let now = self.now;
            self.candidate_contact = Some(now);
            self.reset_election_timer(now);
        }
        if req.from <= self.storage.trimmed() {
            // Slots the reader asks for were trimmed since we promised (a snapshot was
            // taken meanwhile): our tail cannot tell it their values. Answer an empty
            // range, which the reader does not count (it must not mistake the missing
            // entries for empty slots).
            let result =
                ReadResult { ballot: req.ballot, from: req.from, to: req.from.saturating_sub(1), entries: Vec::new() };
            self.emit(Action::ReadCompletion { to: from, result });
            return Ok(());
        }
        // Answer at most `max_read_slots` slots; the reader asks for the rest.
        let to = req.to.min(req.from.saturating_add(self.cfg.max_read_slots - 1));
        let entries = if req.from <= to { self.storage.entries(req.from, to)? } else { Vec::new() };
        let result = ReadResult { ballot: req.ballot, from: req.from, to, entries };
        self.emit(Action::ReadCompletion { to: from, result });
        Ok(())
    }

    /// A leader's heartbeat.
    pub(super) fn on_heartbeat(&mut self, from: NodeId, ballot: Ballot, commit: Slot, seq: u64) -> Result<(), Error> {
        if ballot.node != from {
            return Ok(());
        }
        self.max_round = self.max_round.max(ballot.round);
        if ballot < self.promised {
            if self.bug(PlantedBug::AcceptLowerBallot) {
                // Planted bug: keep serving a lower ballot's leader.
                let last = self.storage.last_slot();
                let chosen = self.chosen;
                self.send(from, Message::HeartbeatReply { ballot, chosen, last, seq });
                return Ok(());
            }
            self.send(from, Message::Reject { ballot, promised: self.promised });
            return Ok(());
        }
        if ballot > self.promised {
            // The sender completed phase 1 with a quorum that did not include us:
            // promise its ballot (this grants it write permission).
            if self.fence_first() {
                let f = self.fence.as_mut().expect("fence asked");
                f.stash.push((from, Message::Heartbeat { ballot, commit, seq }));
                return Ok(());
            }
            if self.role != Role::Follower && self.role != Role::Learner {
                self.become_follower(None);
            }
            self.raise_promise(ballot)?;
        }
        invariant!(ballot == self.promised);
        invariant!(self.role != Role::Leader, "two leaders under one ballot {:?}", ballot);
        if self.role == Role::PreCandidate || self.role == Role::Candidate {
            self.become_follower(Some(from));
        }
        self.leader_seen(from);
        self.learn_commit(ballot, commit)?;
        let last = self.storage.last_slot();
        self.send(from, Message::HeartbeatReply { ballot, chosen: self.chosen, last, seq });
        Ok(())
    }

    /// Notes that the leader `from` (owner of our promise) is alive.
    fn leader_seen(&mut self, from: NodeId) {
        require!(self.promised.node == from);
        let now = self.now;
        self.leader_contact = Some(now);
        self.reset_election_timer(now);
        if self.leader != Some(from) {
            self.leader = Some(from);
            self.note_role();
        }
    }

    /// Learns a commit index from the leader of `ballot`, then advances the chosen
    /// prefix over slots that hold that leader's values, and applies.
    fn learn_commit(&mut self, ballot: Ballot, commit: Slot) -> Result<(), Error> {
        let before = self.chosen;
        if ballot == self.known_commit.0 {
            self.known_commit.1 = self.known_commit.1.max(commit);
        } else if ballot > self.known_commit.0 {
            // Use what the older leader told us before switching.
            self.advance_chosen()?;
            self.known_commit = (ballot, commit);
        }
        self.advance_chosen()?;
        ensure!(self.chosen >= before);
        Ok(())
    }

    /// Slot `s <= known commit` is chosen here once our entry at `s` carries the ballot
    /// of the leader that reported the commit index: that leader writes one value per
    /// slot, and everything up to its commit index is chosen with its values.
    pub(super) fn advance_chosen(&mut self) -> Result<(), Error> {
        let (b, c) = self.known_commit;
        let start = self.chosen;
        while self.chosen < c {
            match self.storage.entry(self.chosen + 1)? {
                Some(e) if e.ballot == b => self.chosen += 1,
                _ => break,
            }
        }
        if self.chosen > start {
            self.apply_ready()?;
        }
        Ok(())
    }
}

/// Records an acknowledgement of `first..=last`; returns whether `matched` advanced.
fn record_ack(p: &mut Progress, first: Slot, last: Slot) -> bool {
    let before = p.matched;
    if last > p.matched {
        let start = first.max(p.matched + 1);
        let e = p.acked.entry(start).or_insert(last);
        *e = (*e).max(last);
    }
    // Merge contiguous ranges into `matched`.
    while let Some((&s, &e)) = p.acked.iter().next() {
        if s > p.matched + 1 {
            break;
        }
        p.acked.remove(&s);
        p.matched = p.matched.max(e);
    }
    if p.next <= p.matched {
        p.next = p.matched + 1;
    }
    p.matched > before
}
