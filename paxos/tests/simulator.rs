//! The simulator over many seeds with faults: every check must hold on every seed.
//! (`cargo run --release -p paxos --example sim -- --seeds 5000` runs more.)

use paxos::sim::{self, SimConfig};

fn run_range(name: &str, seeds: std::ops::Range<u64>, make: fn(u64) -> SimConfig) {
    let n = seeds.end - seeds.start;
    let mut totals = sim::SimTotals::default();
    let mut failures = Vec::new();
    for seed in seeds {
        match sim::run(make(seed)) {
            Ok(r) => {
                assert!(r.slots_chosen > 0, "seed {seed} chose nothing");
                totals.add(&r);
            }
            Err(v) => failures.push(v.to_string()),
        }
    }
    println!("{name}: {n} seeds, {totals}");
    assert!(failures.is_empty(), "{} of {n} seeds failed:\n{}", failures.len(), failures.join("\n"));
    let (crashes, elections) = (totals.crashes, totals.elections);
    assert!(crashes > 0 && elections > n, "the faults did not bite: {crashes} crashes, {elections} elections");
}

#[test]
fn two_hundred_fifty_seeds_with_faults() {
    run_range("default faults", 1..251, SimConfig::from_seed);
}

#[test]
fn one_hundred_seeds_hunting() {
    run_range("hunting faults", 100_001..100_101, SimConfig::hunting);
}

#[test]
fn a_seed_replays_exactly() {
    let a = sim::run(SimConfig::from_seed(77)).expect("seed 77");
    let b = sim::run(SimConfig::from_seed(77)).expect("seed 77");
    assert_eq!(
        (a.events, a.slots_chosen, a.entries_applied, a.client_ops, a.elections, a.sim_time),
        (b.events, b.slots_chosen, b.entries_applied, b.client_ops, b.elections, b.sim_time)
    );
}

#[test]
fn a_violation_names_its_seed_and_replay_command() {
    // Use a planted bug to get a violation, and check its report.
    let mut found = None;
    for seed in 1..200 {
        let cfg = SimConfig::hunting(seed).with_bug(Some(paxos::PlantedBug::CommitWithoutQuorum));
        if let Err(v) = sim::run_quiet(cfg) {
            found = Some(v);
            break;
        }
    }
    let v = found.expect("commit-without-quorum is caught within 200 seeds");
    let text = v.to_string();
    assert!(text.contains(&format!("seed {}", v.seed)), "{text}");
    assert!(text.contains("--example sim -- --seed"), "{text}");
    assert!(text.contains("--bug commit-without-quorum"), "{text}");
}
