//! Linearizable reads on the leader: under a read lease, or confirmed by a quorum round.
//!
//! A read arriving at the leader gets a read index: its commit index, or the last slot
//! it adopted in phase 1 if that is higher (every write acknowledged before the read
//! arrived is at or below the commit index, since acknowledgements follow commit, and
//! anything an earlier leader may have committed is among the adopted slots). It may be
//! served once (1) leadership at arrival is confirmed and (2) every slot up to the index
//! is applied. Writes still in flight are concurrent with the read and may be missed.
//!
//! Confirmation, two ways:
//! - **Lease.** Each follower refuses to help elect another leader until an election
//!   timeout has passed on *its* clock since it last heard the leader (stickiness), and a
//!   restarted replica refuses for an election timeout after starting (it may have
//!   acknowledged a heartbeat just before it crashed). So if a quorum acknowledged the
//!   heartbeat round sent at leader time `t`, no other leader can exist before `t +
//!   election_timeout / (1 + drift)` on the leader's clock, where `drift` bounds how much
//!   faster any replica's clock runs (`Config::max_clock_drift_percent`). A read arriving
//!   before that is confirmed at once. A leadership transfer lets its target bypass the
//!   followers' stickiness, so a leader that attempted one serves no lease read for the
//!   rest of its ballot.
//! - **Quorum round.** Otherwise the leader starts a heartbeat round after the read
//!   arrived; when a quorum acknowledged it, no higher ballot had a quorum of promises
//!   at those moments, so the leader was still the leader when the read arrived.

use super::{Action, Error, LeaderState, Replica, Role};
use crate::contracts::{ensure, require};
use crate::message::Message;
use crate::storage::Storage;
use crate::types::{Nanos, Slot};

/// A read waiting at the leader.
#[derive(Debug, Clone)]
pub(crate) struct PendingRead {
    pub(crate) id: u64,
    /// Serve once every slot up to here is applied.
    pub(crate) index: Slot,
    /// Confirmed when a quorum acknowledged this heartbeat round (0: by the lease).
    pub(crate) round: u64,
}

/// Heartbeat rounds remembered (for the send time of acknowledged rounds).
const ROUNDS_KEPT: usize = 64;

impl LeaderState {
    /// Starts a heartbeat round sent at `now`; returns its number.
    pub(crate) fn new_round(&mut self, now: Nanos) -> u64 {
        self.hb_seq += 1;
        self.hb_sent.push_back((self.hb_seq, now));
        while self.hb_sent.len() > ROUNDS_KEPT {
            self.hb_sent.pop_front();
        }
        self.hb_seq
    }

    /// When round `seq` was sent, if still remembered.
    pub(crate) fn sent_at(&self, seq: u64) -> Option<Nanos> {
        self.hb_sent.iter().find(|(s, _)| *s == seq).map(|(_, t)| *t)
    }
}

impl<S: Storage> Replica<S> {
    /// When the leader's read lease ends (leader clock), if it holds one.
    fn lease_end(&self) -> Option<Nanos> {
        let l = self.lead.as_ref()?;
        if l.transfer_attempted || l.transfer.is_some() {
            return None;
        }
        // The quorum-th most recent acknowledged send time, counting ourselves as now.
        let mut sent: Vec<Nanos> = l.peers.values().filter(|p| p.voter).filter_map(|p| p.acked_sent_at).collect();
        sent.sort_unstable_by(|a, b| b.cmp(a));
        let need = self.cfg.quorum() - 1; // besides ourselves
        let t = if need == 0 { self.now } else { *sent.get(need - 1)? };
        let timeout = self.cfg.election_timeout;
        let lease = timeout * 100 / (100 + self.cfg.max_clock_drift_percent);
        Some(t + lease)
    }

    pub(super) fn start_read(&mut self, id: u64) -> Result<(), Error> {
        require!(self.role == Role::Leader);
        let now = self.now;
        let leased = self.lease_end().is_some_and(|end| now < end);
        let l = self.lead.as_mut().expect("leader state");
        // Every write acknowledged before the read arrived is at or below the commit
        // index (acknowledgements follow commit), and everything earlier leaders may
        // have committed is at or below the slots this leader adopted in phase 1.
        let index = l.commit.max(l.term_start);
        if leased {
            l.reads.push_back(PendingRead { id, index, round: 0 });
        } else {
            // A round sent after the read arrived; heartbeats now (they also carry the
            // commit index).
            let round = l.new_round(now);
            let (ballot, commit) = (l.ballot, l.commit);
            l.reads.push_back(PendingRead { id, index, round });
            let peers: Vec<_> = l.peers.keys().copied().collect();
            for p in peers {
                self.send(p, Message::Heartbeat { ballot, commit, seq: round });
            }
        }
        self.check_reads()
    }

    /// Releases the reads that are confirmed and applied, in order.
    pub(super) fn check_reads(&mut self) -> Result<(), Error> {
        let quorum = self.cfg.quorum();
        let applied = self.applied;
        let Some(l) = self.lead.as_mut() else { return Ok(()) };
        let mut ready = Vec::new();
        while let Some(r) = l.reads.front() {
            let confirmed =
                r.round == 0 || 1 + l.peers.values().filter(|p| p.voter && p.acked_seq >= r.round).count() >= quorum;
            if !confirmed || applied < r.index {
                break;
            }
            let r = l.reads.pop_front().expect("front");
            ready.push(r);
        }
        for r in ready {
            ensure!(self.applied >= r.index);
            self.emit(Action::ReadReady { id: r.id, index: r.index });
        }
        Ok(())
    }
}
