//! A deterministic simulator for the core (test support, feature `sim`).
//!
//! N replicas (voters, optionally learners) and M clients run in one thread on a
//! virtual clock that jumps from event to event. Everything random is drawn from one
//! seed, so a failing seed replays exactly. During a fault phase the network drops,
//! duplicates, delays and reorders messages, remote writes, reads and their
//! completions; partitions (symmetric, isolating, one-way) come and go; replicas crash
//! (losing everything their storage had not synced) and restart; every replica's
//! clock runs at its own rate. Then everything heals and the run must settle.
//!
//! A third of the seeds run **acceptance by landing** (Mu's model, what replog's RDMA
//! transport does in `memory` and `pmem` modes): a remote write lands in the target's
//! persistent region when the writer holds its permission, the writer counts it
//! accepted on the landing's acknowledgement, and the target's CPU takes it into its
//! core only up to `drain_max` later; a promise rises only after a fence (revoke, take
//! what landed). Restarted replicas replay what is still in their region.
//!
//! Checks, on every step and at the end:
//! - **agreement**: no two replicas apply different values at one slot;
//! - **state-machine agreement**: every client entry gets the same result everywhere,
//!   and de-duplication hands out positions consistently;
//! - **permission**: a replica only accepts remote writes from the holder of the write
//!   permission it granted (as an RDMA NIC would enforce; under landing, the landing
//!   itself is checked);
//! - **no acknowledged append lost**: every append a client saw acknowledged is in the
//!   final log, at its position, exactly once;
//! - **linearizability** of the client history (Wing & Gong with Lowe's memoization,
//!   see [`linearizability`]);
//! - **liveness**: after healing, a leader is elected, every client operation completes
//!   and all replicas converge within a bound;
//! - every code contract of the core (the crate is built with `contracts`); a contract
//!   panic is reported as a violation of the seed.

pub mod disk;
pub mod linearizability;
mod world;

use crate::config::PlantedBug;
use crate::rng::Rng;
use crate::types::Nanos;
use std::fmt;

pub use world::World;

/// Milliseconds in nanoseconds.
pub const MS: Nanos = 1_000_000;

/// Parameters of one simulated run. [`SimConfig::from_seed`] draws them from the seed.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// The seed of everything random in the run.
    pub seed: u64,
    /// Number of voting replicas.
    pub voters: usize,
    /// Number of learners.
    pub learners: usize,
    /// Number of concurrent clients.
    pub clients: usize,
    /// Faults are injected during `0..fault_time`; then everything heals.
    pub fault_time: Nanos,
    /// Clients start no new operation after `fault_time + client_time`.
    pub client_time: Nanos,
    /// After healing, every operation must complete and replicas converge within this.
    pub liveness_bound: Nanos,
    /// Probability that a message (or remote access) is dropped during the fault phase.
    pub drop: f64,
    /// Probability that a message is duplicated during the fault phase.
    pub dup: f64,
    /// Network delay range.
    pub delay: (Nanos, Nanos),
    /// Probability of a long extra delay (reordering) during the fault phase.
    pub slow: f64,
    /// Maximum of that extra delay.
    pub slow_max: Nanos,
    /// Storage sync latency range: a replica's sync completes this long after the
    /// writes it covers (inputs arriving meanwhile join the same sync: group commit).
    /// A crash in between loses the writes.
    pub disk_latency: (Nanos, Nanos),
    /// Slots a replica answers per remote read (small values make candidates read
    /// tails in many parts).
    pub read_slots: u64,
    /// Number of crash-restart events in the fault phase.
    pub crashes: usize,
    /// Number of leadership transfers asked of the leader in the fault phase.
    pub transfers: usize,
    /// Whether one voter may never lead.
    pub one_cannot_lead: bool,
    /// Whether replicas get random election priorities.
    pub priorities: bool,
    /// Number of partition events in the fault phase.
    pub partitions: usize,
    /// Clock rate spread: each replica's clock runs at a rate in `1/(1+x)..=(1+x)`.
    pub clock_spread: f64,
    /// Fraction of client operations that are reads (through the log).
    pub read_ratio: f64,
    /// Probability that a client whose request timed out gives up on it (its outcome
    /// stays unknown in the history).
    pub give_up: f64,
    /// Whether to check the one-sided permission model (a replica accepts remote writes
    /// only from the holder of the permission it granted, as an RDMA NIC enforces).
    /// Planted-bug tests turn it off to show that the end-to-end checks catch the bug.
    pub check_permission: bool,
    /// Acceptance by landing (Mu's model, [`crate::Config::accept_on_landing`]): a
    /// remote write lands in the target's region if the writer holds its permission,
    /// and the writer counts it accepted when the landing is acknowledged (the NIC's
    /// completion), while the target's CPU takes landed writes into its core only
    /// later (after up to `drain_max`). The region is persistent (pmem): what landed
    /// survives a crash and is handed to the restarted core. The follower core's own
    /// acknowledgements are then credits and do not reach the writer's core.
    pub landing: bool,
    /// With `landing`: the longest a landed write waits for the target's CPU.
    pub drain_max: Nanos,
    /// A deliberately wrong variant of the core.
    pub planted_bug: Option<PlantedBug>,
    /// Upper bound on events processed (a run that needs more is a liveness failure).
    pub max_events: u64,
    /// A replica snapshots its state machine every this many applied slots and trims
    /// its log behind it (0: never). Lagging or restarted replicas then catch up by
    /// snapshot transfer.
    pub snapshot_every: u64,
    /// Slots kept in the log behind a snapshot (followers that lag less catch up from
    /// the log).
    pub snapshot_keep: u64,
    /// Extra replicas outside the initial membership, that membership changes add.
    pub spares: usize,
    /// Membership changes asked of the leader during the fault phase (add a spare as a
    /// learner, promote learners, demote or remove voters, replace voters), mixed with
    /// the other faults.
    pub reconfigs: usize,
    /// A nemesis for membership changes: when a change makes quorums of the old and the
    /// new membership that need not intersect, cut the leader and the new voters off
    /// from the other old voters for a while, at once.
    pub reconfig_split: bool,
    /// The leader proposes a log-service trim ([`crate::Replica::propose_trim`]) every
    /// this many applied slots, to a position somewhat behind its applied one (0:
    /// never). Every replica snapshots the core's state at the trim point and drops the
    /// prefix; a replica behind it catches up by snapshot transfer.
    pub trim_every: u64,
}

impl SimConfig {
    /// Draws a configuration from `seed`: cluster size, fault rates and schedule sizes.
    pub fn from_seed(seed: u64) -> Self {
        let mut r = Rng::new(seed ^ 0xC0FF_EE00_D15E_A5E5);
        let voters = if r.chance(0.35) { 5 } else { 3 };
        let learners = if r.chance(0.2) { 1 } else { 0 };
        SimConfig {
            seed,
            voters,
            learners,
            clients: r.range(1, 5) as usize,
            fault_time: r.range(300, 1200) * MS,
            client_time: 200 * MS,
            liveness_bound: 3000 * MS,
            drop: [0.0, 0.01, 0.05, 0.15][r.below(4) as usize],
            dup: [0.0, 0.02, 0.1][r.below(3) as usize],
            delay: (50_000, r.range(200, 3000) * 1000),
            slow: [0.0, 0.02, 0.1][r.below(3) as usize],
            slow_max: r.range(5, 60) * MS,
            disk_latency: [(0, 0), (10_000, 200_000), (100_000, 2 * MS)][r.below(3) as usize],
            read_slots: [2, 7, 1024][r.below(3) as usize],
            crashes: r.range(0, 4) as usize,
            transfers: r.range(0, 3) as usize,
            one_cannot_lead: r.chance(0.2),
            priorities: r.chance(0.3),
            partitions: r.range(0, 4) as usize,
            clock_spread: [0.0, 0.1, 0.5][r.below(3) as usize],
            read_ratio: [0.0, 0.2, 0.4][r.below(3) as usize],
            give_up: [0.0, 0.2][r.below(2) as usize],
            check_permission: true,
            planted_bug: None,
            max_events: 3_000_000,
            // Drawn apart so that the draws above stay what they were for old seeds.
            snapshot_every: [0, 0, 4, 25][(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60) as usize % 4],
            snapshot_keep: [0, 1, 8][(seed.wrapping_mul(0xD1B5_4A32_D192_ED03) >> 60) as usize % 3],
            spares: [0, 2, 2][(seed.wrapping_mul(0x94D0_49BB_1331_11EB) >> 60) as usize % 3],
            reconfigs: [0, 4, 10][(seed.wrapping_mul(0xBF58_476D_1CE4_E5B9) >> 60) as usize % 3],
            reconfig_split: false,
            trim_every: [0, 0, 6, 20][(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 60) as usize % 4],
            landing: (seed.wrapping_mul(0x9FB2_1C65_1E98_DF25) >> 60).is_multiple_of(3),
            drain_max: [MS / 10, 2 * MS, 30 * MS][(seed.wrapping_mul(0xFF51_AFD7_ED55_8CCD) >> 60) as usize % 3],
        }
    }

    /// A harsher configuration for hunting bugs: more crashes and partitions, slow
    /// syncs, five voters half of the time.
    pub fn hunting(seed: u64) -> Self {
        let mut c = Self::from_seed(seed);
        let mut r = Rng::new(seed ^ 0x0BAD_5EED);
        c.voters = if r.chance(0.5) { 5 } else { 3 };
        c.crashes = c.crashes.max(3);
        c.partitions = c.partitions.max(2);
        c.disk_latency = (100_000, 3 * MS);
        c.dup = c.dup.max(0.05);
        c.slow = c.slow.max(0.05);
        // Clocks up to 2x apart half of the time (a wide window for lease mistakes).
        if r.chance(0.5) {
            c.clock_spread = 1.0;
            c.read_ratio = c.read_ratio.max(0.3);
        }
        c.slow_max = c.slow_max.max(150 * MS);
        // Membership churn on a quarter of the seeds: many changes, two spares.
        if r.chance(0.25) {
            c.spares = 2;
            c.reconfigs = 60;
            c.reconfig_split = true;
        }
        c
    }

    /// The same configuration with acceptance by landing on or off.
    pub fn with_landing(mut self, landing: bool) -> Self {
        self.landing = landing;
        self
    }

    /// The same configuration with a planted bug. A bug of acceptance by landing
    /// turns landing on (it exists only there).
    pub fn with_bug(mut self, bug: Option<PlantedBug>) -> Self {
        self.planted_bug = bug;
        if bug == Some(PlantedBug::PromiseBeforeDrain) {
            self.landing = true;
        }
        self
    }
}

/// What a passing run checked.
#[derive(Clone, Debug, Default)]
pub struct SimReport {
    /// The seed.
    pub seed: u64,
    /// Events processed (message deliveries, timers, client steps, faults).
    pub events: u64,
    /// Distinct slots chosen (and checked for agreement).
    pub slots_chosen: u64,
    /// Client entries applied (over all replicas).
    pub entries_applied: u64,
    /// Client operations in the history (checked for linearizability).
    pub client_ops: u64,
    /// Of which acknowledged appends (checked as present in the final log).
    pub acked_appends: u64,
    /// Leader elections seen (role changes to leader).
    pub elections: u64,
    /// Crash-restarts injected.
    pub crashes: u64,
    /// Leadership transfers asked of a leader.
    pub transfers: u64,
    /// Membership changes committed.
    pub reconfigs: u64,
    /// Snapshots taken (and the log trimmed behind them).
    pub snapshots_taken: u64,
    /// Snapshots received from a leader and installed.
    pub snapshots_installed: u64,
    /// Log-service trims applied (a snapshot of the core's state saved, the prefix
    /// dropped), over all replicas.
    pub trims: u64,
    /// Acceptance by landing: writes that landed (counted accepted at the NIC), fences
    /// carried out before a promise rose, and landed writes handed to a restarted core.
    pub writes_landed: u64,
    /// See `writes_landed`.
    pub fences: u64,
    /// See `writes_landed`.
    pub replayed: u64,
    /// Virtual time from healing to the first commit after it.
    pub recovery_after_heal: Option<Nanos>,
    /// Virtual time simulated.
    pub sim_time: Nanos,
}

/// Sums of the reports of many passing runs.
#[derive(Clone, Debug, Default)]
pub struct SimTotals {
    /// Runs added.
    pub runs: u64,
    /// Events processed.
    pub events: u64,
    /// Slots chosen.
    pub slots_chosen: u64,
    /// Client entries applied (over all replicas).
    pub entries_applied: u64,
    /// Client operations checked for linearizability.
    pub client_ops: u64,
    /// Acknowledged appends checked as present.
    pub acked_appends: u64,
    /// Leader elections.
    pub elections: u64,
    /// Crash-restarts.
    pub crashes: u64,
    /// Leadership transfers asked.
    pub transfers: u64,
    /// Membership changes committed.
    pub reconfigs: u64,
    /// Snapshots taken.
    pub snapshots_taken: u64,
    /// Snapshots installed by transfer.
    pub snapshots_installed: u64,
    /// Log-service trims applied.
    pub trims: u64,
    /// Runs with acceptance by landing.
    pub landing_runs: u64,
    /// Writes that landed, fences, and landed writes replayed after restarts.
    pub writes_landed: u64,
    /// See `writes_landed`.
    pub fences: u64,
    /// See `writes_landed`.
    pub replayed: u64,
    /// The longest time from healing to the first commit after it.
    pub worst_recovery: Nanos,
}

impl SimTotals {
    /// Adds one run's report.
    pub fn add(&mut self, r: &SimReport) {
        self.runs += 1;
        self.events += r.events;
        self.slots_chosen += r.slots_chosen;
        self.entries_applied += r.entries_applied;
        self.client_ops += r.client_ops;
        self.acked_appends += r.acked_appends;
        self.elections += r.elections;
        self.crashes += r.crashes;
        self.transfers += r.transfers;
        self.snapshots_taken += r.snapshots_taken;
        self.reconfigs += r.reconfigs;
        self.snapshots_installed += r.snapshots_installed;
        self.trims += r.trims;
        self.landing_runs += u64::from(r.writes_landed > 0 || r.fences > 0);
        self.writes_landed += r.writes_landed;
        self.fences += r.fences;
        self.replayed += r.replayed;
        self.worst_recovery = self.worst_recovery.max(r.recovery_after_heal.unwrap_or(0));
    }
}

impl fmt::Display for SimTotals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} events, {} slots chosen, {} entries applied, {} client ops ({} acknowledged appends), \
             {} elections, {} crashes, {} leadership transfers, {} membership changes, {} snapshots taken, \
             {} installed by transfer, {} log trims; acceptance by landing in {} runs ({} writes landed, \
             {} fences, {} replayed at restarts); worst recovery after healing {:.1}ms",
            self.events,
            self.slots_chosen,
            self.entries_applied,
            self.client_ops,
            self.acked_appends,
            self.elections,
            self.crashes,
            self.transfers,
            self.reconfigs,
            self.snapshots_taken,
            self.snapshots_installed,
            self.trims,
            self.landing_runs,
            self.writes_landed,
            self.fences,
            self.replayed,
            self.worst_recovery as f64 / 1e6
        )
    }
}

/// What went wrong in a failing run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ViolationKind {
    /// Two different values applied at one slot.
    Agreement,
    /// Replicas disagree on a client entry's result or position.
    StateMachine,
    /// A remote write was accepted from a replica without write permission.
    Permission,
    /// An acknowledged append is missing from the final log (or present twice).
    LostAck,
    /// The client history is not linearizable.
    Linearizability,
    /// The run did not settle after healing.
    Liveness,
    /// A code contract of the core failed (a panic).
    Contract,
}

/// A failed check, with the seed that replays it.
#[derive(Clone, Debug)]
pub struct Violation {
    /// The seed.
    pub seed: u64,
    /// The planted bug, if any.
    pub bug: Option<PlantedBug>,
    /// Which check failed.
    pub kind: ViolationKind,
    /// What was seen.
    pub detail: String,
    /// Virtual time of detection.
    pub time: Nanos,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "seed {} violated {:?} at t={:.3}ms: {}",
            self.seed,
            self.kind,
            self.time as f64 / 1e6,
            self.detail
        )?;
        write!(f, "  replay: cargo run --release -p paxos --example sim -- --seed {}", self.seed)?;
        if let Some(b) = self.bug {
            write!(f, " --bug {}", bug_name(b))?;
        }
        Ok(())
    }
}

/// The command-line name of a planted bug.
pub fn bug_name(b: PlantedBug) -> &'static str {
    match b {
        PlantedBug::SkipValueAdoption => "skip-value-adoption",
        PlantedBug::AcceptLowerBallot => "accept-lower-ballot",
        PlantedBug::DoubleCountVote => "double-count-vote",
        PlantedBug::AckBeforeSync => "ack-before-sync",
        PlantedBug::CommitWithoutQuorum => "commit-without-quorum",
        PlantedBug::LeaderVotesBeforeSync => "leader-votes-before-sync",
        PlantedBug::IgnoreTrimmedPromiser => "ignore-trimmed-promiser",
        PlantedBug::EarlyNewQuorum => "early-new-quorum",
        PlantedBug::TrimAtApplied => "trim-at-applied",
        PlantedBug::PromiseBeforeDrain => "promise-before-drain",
    }
}

/// Every planted bug.
pub const ALL_BUGS: [PlantedBug; 10] = [
    PlantedBug::SkipValueAdoption,
    PlantedBug::AcceptLowerBallot,
    PlantedBug::DoubleCountVote,
    PlantedBug::AckBeforeSync,
    PlantedBug::CommitWithoutQuorum,
    PlantedBug::LeaderVotesBeforeSync,
    PlantedBug::IgnoreTrimmedPromiser,
    PlantedBug::EarlyNewQuorum,
    PlantedBug::TrimAtApplied,
    PlantedBug::PromiseBeforeDrain,
];

/// Parses a planted bug's command-line name.
pub fn parse_bug(s: &str) -> Option<PlantedBug> {
    ALL_BUGS.into_iter().find(|&b| bug_name(b) == s)
}

/// Runs one simulation; contract panics become [`ViolationKind::Contract`].
pub fn run(cfg: SimConfig) -> Result<SimReport, Box<Violation>> {
    let seed = cfg.seed;
    let bug = cfg.planted_bug;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| World::new(cfg).run()));
    match result {
        Ok(r) => r,
        Err(panic) => {
            let detail = if let Some(s) = panic.downcast_ref::<String>() {
                s.clone()
            } else if let Some(s) = panic.downcast_ref::<&str>() {
                s.to_string()
            } else {
                "panic".to_string()
            };
            Err(Box::new(Violation { seed, bug, kind: ViolationKind::Contract, detail, time: 0 }))
        }
    }
}

/// Runs `run` with the default panic message printing silenced (for planted-bug runs,
/// where panics are expected and reported as violations).
pub fn run_quiet(cfg: SimConfig) -> Result<SimReport, Box<Violation>> {
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = run(cfg);
    std::panic::set_hook(prev);
    r
}
