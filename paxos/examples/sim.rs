//! Runs the deterministic simulator over many seeds.
//!
//! ```text
//! cargo run --release -p paxos --example sim -- --seeds 5000
//! cargo run --release -p paxos --example sim -- --seed 42            # replay one seed
//! cargo run --release -p paxos --example sim -- --seeds 500 --bug skip-value-adoption
//! ```
//! Exits 0 when every seed passes (or, with `--bug`, when the planted bug was caught),
//! 1 otherwise, and prints the seeds, events, slots and entries it checked.

use paxos::sim::{self, SimConfig};
use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    let mut seeds: u64 = 1000;
    let mut start: u64 = 1;
    let mut one: Option<u64> = None;
    let mut bug = None;
    let mut verbose = false;
    let mut hunting = false;
    let mut check_permission = true;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = |name: &str| args.next().unwrap_or_else(|| panic!("{name} needs a value"));
        match a.as_str() {
            "--seeds" => seeds = val("--seeds").parse().expect("--seeds N"),
            "--start" => start = val("--start").parse().expect("--start N"),
            "--seed" => one = Some(val("--seed").parse().expect("--seed N")),
            "--bug" => {
                let b = val("--bug");
                bug = Some(sim::parse_bug(&b).unwrap_or_else(|| {
                    let names: Vec<_> = sim::ALL_BUGS.iter().map(|&b| sim::bug_name(b)).collect();
                    panic!("unknown bug {b}; known: {names:?}")
                }));
            }
            "-v" | "--verbose" => verbose = true,
            "--hunting" => hunting = true,
            "--no-permission-check" => check_permission = false,
            "-h" | "--help" => {
                println!("usage: sim [--seeds N] [--start S] [--seed S] [--bug NAME] [--hunting] [--no-permission-check] [-v]");
                println!("  (SIMTRACE=1 traces role changes and membership changes to stderr)");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("unknown argument {other}");
                return ExitCode::from(2);
            }
        }
    }
    let list: Vec<u64> = match one {
        Some(s) => vec![s],
        None => (start..start + seeds).collect(),
    };
    let t0 = Instant::now();
    let mut totals = sim::SimTotals::default();
    let mut failures = 0u64;
    for &seed in &list {
        let mut cfg = if hunting { SimConfig::hunting(seed) } else { SimConfig::from_seed(seed) }.with_bug(bug);
        cfg.check_permission = check_permission;
        let r = if bug.is_some() { sim::run_quiet(cfg) } else { sim::run(cfg) };
        match r {
            Ok(rep) => {
                if verbose {
                    println!("{rep:?}");
                }
                totals.add(&rep);
            }
            Err(v) => {
                failures += 1;
                if bug.is_none() || verbose || failures == 1 {
                    println!("{v}");
                }
                if bug.is_some() {
                    break;
                }
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    println!("checked {} seeds in {secs:.1}s: {totals}; {failures} failed", list.len());
    match bug {
        None if failures == 0 => ExitCode::SUCCESS,
        None => ExitCode::FAILURE,
        Some(b) if failures > 0 => {
            println!("planted bug {} caught", sim::bug_name(b));
            ExitCode::SUCCESS
        }
        Some(b) => {
            println!("planted bug {} NOT caught", sim::bug_name(b));
            ExitCode::FAILURE
        }
    }
}
