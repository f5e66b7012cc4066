//! The simulator must catch deliberately wrong variants of the core. Each planted bug
//! is switched on alone; the permission check of the one-sided model is switched off so
//! that the end-to-end checks (agreement, state machine, lost acknowledgements,
//! linearizability, liveness, contracts) have to find it.

use paxos::sim::{self, SimConfig, ALL_BUGS};
use paxos::PlantedBug;

const MAX_SEEDS: u64 = 600;

fn hunt(bug: PlantedBug) {
    hunt_within(bug, MAX_SEEDS)
}

fn hunt_within(bug: PlantedBug, max_seeds: u64) {
    for seed in 1..=max_seeds {
        let mut cfg = SimConfig::hunting(seed).with_bug(Some(bug));
        cfg.check_permission = false;
        if let Err(v) = sim::run_quiet(cfg) {
            println!("planted bug {} caught after {seed} seeds:\n{v}", sim::bug_name(bug));
            return;
        }
    }
    panic!("planted bug {} not caught within {max_seeds} seeds", sim::bug_name(bug));
}

#[test]
fn catches_skipped_value_adoption() {
    hunt(PlantedBug::SkipValueAdoption);
}

#[test]
fn catches_accepting_a_lower_ballot() {
    hunt(PlantedBug::AcceptLowerBallot);
}

#[test]
fn catches_a_vote_counted_twice() {
    // Needs a duplicated promise or read completion that makes a minority look like a
    // quorum, then a conflicting choice: first caught at seed 1433 of the hunting mix.
    hunt_within(PlantedBug::DoubleCountVote, 3000);
}

#[test]
fn catches_acknowledging_before_sync() {
    // Needs a crash that loses an acknowledged write, then an election without it.
    hunt_within(PlantedBug::AckBeforeSync, 3000);
}

#[test]
fn catches_commit_without_quorum() {
    hunt(PlantedBug::CommitWithoutQuorum);
}

#[test]
fn catches_a_leader_voting_before_its_own_sync() {
    // Needs a crash of the leader between its remote writes and its own sync, then an
    // election without the followers that hold the slot: rarer, so more seeds.
    hunt_within(PlantedBug::LeaderVotesBeforeSync, 10_000);
}

#[test]
fn catches_a_candidate_that_ignores_a_trimmed_log() {
    // A candidate behind a promiser's snapshot fills the trimmed (chosen) slots with
    // no-ops: needs snapshots on, a lagging replica and an election it wins.
    hunt(PlantedBug::IgnoreTrimmedPromiser);
}

#[test]
fn catches_a_new_membership_counted_too_early() {
    // The leader counts the new membership's quorum from the change's own slot and keeps
    // opening slots before the change is chosen; the simulator's nemesis splits the
    // leader and the new voters from the other old voters when a change is made.
    hunt(PlantedBug::EarlyNewQuorum);
}

#[test]
fn catches_a_trim_snapshot_labelled_with_an_earlier_slot() {
    // A log-service trim whose snapshot carries the de-duplication table and position
    // counter of a later slot: needs a replica behind the trim that installs it.
    hunt(PlantedBug::TrimAtApplied);
}

#[test]
fn catches_a_promise_raised_before_the_landed_writes_were_taken() {
    // Acceptance by landing: the acceptor promises a new ballot while writes the old
    // leader already counted sit unseen in its region; its core then denies them, and
    // the new leader, not reading them, can choose another value for their slots.
    hunt(PlantedBug::PromiseBeforeDrain);
}

#[test]
fn every_planted_bug_has_a_test() {
    assert_eq!(ALL_BUGS.len(), 10);
}
