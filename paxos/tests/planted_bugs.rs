//! The simulator must catch deliberately wrong variants of the core. Each planted bug
//! is switched on alone; the permission check of the one-sided model is switched off so
//! that the end-to-end checks (agreement, state machine, lost acknowledgements,
//! linearizability, liveness, contracts) have to find it.

use paxos::sim::{self, SimConfig, ALL_BUGS};
use paxos::PlantedBug;

const MAX_SEEDS: u64 = 600;

fn hunt(bug: PlantedBug) {
    for seed in 1..=MAX_SEEDS {
        let mut cfg = SimConfig::hunting(seed).with_bug(Some(bug));
        cfg.check_permission = false;
        if let Err(v) = sim::run_quiet(cfg) {
            println!("planted bug {} caught after {seed} seeds:\n{v}", sim::bug_name(bug));
            return;
        }
    }
    panic!("planted bug {} not caught within {MAX_SEEDS} seeds", sim::bug_name(bug));
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
    hunt(PlantedBug::DoubleCountVote);
}

#[test]
fn catches_acknowledging_before_sync() {
    hunt(PlantedBug::AckBeforeSync);
}

#[test]
fn catches_commit_without_quorum() {
    hunt(PlantedBug::CommitWithoutQuorum);
}

#[test]
fn every_planted_bug_has_a_test() {
    assert_eq!(ALL_BUGS.len(), 5);
}
