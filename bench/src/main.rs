//! `bench`: replog against its baselines and against etcd (see `bench/README.md`).
//!
//! ```sh
//! CARGO_TARGET_DIR=/work/target-bench cargo build --release -p replog -p bench
//! /work/target-bench/release/bench --short            # CI: seconds, exits 0/1
//! /work/target-bench/release/bench --out bench/results # the full suite (a few minutes)
//! # Over DPDK (root; replicas in network namespaces on af_packet vdevs):
//! CARGO_TARGET_DIR=/work/target-bench cargo build --release -p replog -p bench --features bench/dpdk
//! /work/target-bench/release/bench --short --transport dpdk
//! # Over RDMA (an RDMA device: here the soft-RoCE VM; see hw-setup/rdma.md):
//! CARGO_TARGET_DIR=/work/target-bench cargo build --release -p replog -p bench --features bench/rdma
//! hw-setup/rxe-vm.sh run -- /work/target-bench/release/bench --short --transport rdma --out /tmp/bench-out
//! ```

use anyhow::{bail, Context, Result};
use bench::cluster::{find_replog, Fabric, ReplogCluster};
use bench::etcd::{find_etcd, EtcdCluster};
use bench::load::{self, Driver, EtcdDriver, Load, Loop, ReplogDriver};
use bench::report::{self, Baselines, Machine, Report, RunResult};
use bench::stats::{cdf, fmt_rate, Latency};
use bench::{baseline, dpdk, plot, proc, rdma};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use replog::config::DurabilityKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Transport {
    Tcp,
    Dpdk,
    Rdma,
}

impl Transport {
    fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Dpdk => "dpdk",
            Transport::Rdma => "rdma",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Durability {
    Memory,
    Fsync,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ModeArg {
    Closed,
    Open,
    Both,
}

/// replog against its baselines (TCP round trip, fdatasync) and against etcd.
///
/// Without workload options it runs the standard suite (what bench/RESULTS.md reports);
/// any of --durability/--clients/--sizes/--batch/--rates/--mode runs their cross product
/// instead (memory and fsync, 64 B, batch 1, closed loop where not given).
#[derive(Parser, Debug)]
#[command(name = "bench", version, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// CI mode: a few seconds per configuration (3 replicas memory + fsync, 1 and 4
    /// clients, 64 B; etcd 1 and 4 clients; with --transport dpdk or rdma: no etcd, fewer
    /// configurations); checks the harness works; exits 0 or 1.
    #[arg(long)]
    short: bool,
    /// Replicas per cluster.
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Transports between replicas (comma-separated: `tcp,dpdk` runs every replog
    /// configuration over each, and plots them together). dpdk: needs root, iproute2 and
    /// a build with `--features bench/dpdk` (replicas in network namespaces on af_packet
    /// vdevs; the raw DPDK ping-pong is measured as the baseline of the replicas' hop).
    /// rdma: needs an RDMA device (the soft-RoCE VM: hw-setup/rxe-vm.sh run -- bench ...)
    /// and a build with `--features bench/rdma` (replicas on the first active device, or
    /// $RXE_DEV; the raw one-sided RDMA WRITE ping-pong is measured as the baseline of the
    /// replicas' hop; with rdma alone etcd is not run).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "tcp")]
    transport: Vec<Transport>,
    /// The replog binary (default: next to this one, in the same target directory).
    #[arg(long)]
    replog: Option<PathBuf>,
    /// Where replicas, etcd and the fdatasync probe keep their data (must be the disk to
    /// measure; default: the system temporary directory).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Where results.json, results.csv and the SVG plots go.
    #[arg(long, default_value = "bench-out")]
    out: PathBuf,
    /// Measured seconds per configuration (default 3; --short: 1.5).
    #[arg(long)]
    duration: Option<f64>,
    /// Untimed seconds before each measurement (default 0.5; --short: 0.3).
    #[arg(long)]
    warmup: Option<f64>,
    /// Durability modes (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    durability: Option<Vec<Durability>>,
    /// Client threads, one connection each (comma-separated list).
    #[arg(long, value_delimiter = ',')]
    clients: Option<Vec<usize>>,
    /// Entry sizes in bytes, 16 to 65536 (comma-separated).
    #[arg(long, value_delimiter = ',')]
    sizes: Option<Vec<usize>>,
    /// Entries per append request (append_batch; comma-separated).
    #[arg(long, value_delimiter = ',')]
    batch: Option<Vec<usize>>,
    /// Closed loop, open loop (needs --rates), or both.
    #[arg(long, value_enum)]
    mode: Option<ModeArg>,
    /// Open loop: offered appends/s of all clients together (comma-separated).
    #[arg(long, value_delimiter = ',')]
    rates: Option<Vec<f64>>,
    /// Spin-then-block waits, in microseconds, of the replicas' polling threads and of
    /// the clients (comma-separated; 0 blocks at once): runs each replog configuration
    /// once per value. The standard suite runs 1 client at 0 and 50.
    #[arg(long, value_delimiter = ',')]
    spin_us: Option<Vec<u64>>,
    /// Serve each replica's client port on a thread of its own (`[timing]
    /// client_port_thread`) instead of the replica's polling thread, to compare.
    #[arg(long)]
    client_port_thread: bool,
    /// Over RDMA: when a leader counts a follower's acceptance (`[rdma] landing`: auto,
    /// at the RDMA WRITE's completion in memory mode; ack, by the follower's
    /// acknowledgement in every mode), to compare the two.
    #[arg(long, value_enum, default_value = "auto")]
    rdma_landing: RdmaLanding,
    /// Skip the etcd peer.
    #[arg(long)]
    no_etcd: bool,
    /// Skip replog (measure etcd and the baselines only).
    #[arg(long)]
    no_replog: bool,
}

/// `--rdma-landing`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum RdmaLanding {
    Auto,
    Ack,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Internal: one side of the raw DPDK ping-pong baseline, run by `bench --transport
    /// dpdk` inside a replica's namespace.
    #[command(hide = true)]
    DpdkPingpong(bench::pingpong::Args),
    /// Internal: one side of the raw RDMA ping-pong baseline (one-sided writes over the
    /// replicas' RDMA transport), run by `bench --transport rdma`.
    #[command(hide = true)]
    RdmaPingpong(bench::pingpong::Args),
}

/// One configuration to measure.
#[derive(Clone, Debug)]
struct Spec {
    /// None: etcd.
    durability: Option<DurabilityKind>,
    clients: usize,
    size: usize,
    batch: usize,
    mode: Loop,
    /// Spin-then-block waits of replicas and clients (µs; replog only).
    spin_us: u64,
    /// Between the replicas (etcd: always tcp).
    transport: Transport,
}

impl Spec {
    fn replog(d: DurabilityKind, clients: usize, size: usize, batch: usize, mode: Loop) -> Spec {
        Spec { durability: Some(d), clients, size, batch, mode, spin_us: 0, transport: Transport::Tcp }
    }
    fn etcd(clients: usize, size: usize, batch: usize, mode: Loop) -> Spec {
        Spec { durability: None, clients, size, batch, mode, spin_us: 0, transport: Transport::Tcp }
    }
    fn spinning(self, spin_us: u64) -> Spec {
        Spec { spin_us, ..self }
    }
    fn label(&self) -> String {
        let sys = match (self.durability, self.transport) {
            (Some(d), Transport::Tcp) => format!("replog {}", d.as_str()),
            (Some(d), t) => format!("replog {} {}", t.as_str(), d.as_str()),
            (None, _) => "etcd".to_string(),
        };
        let mode = match self.mode {
            Loop::Closed => "closed".to_string(),
            Loop::Open { rate } => format!("open @{}/s", fmt_rate(rate)),
        };
        let spin = if self.spin_us > 0 { format!(" spin={}us", self.spin_us) } else { String::new() };
        format!("{sys} {mode} c={} {}B b={}{spin}", self.clients, self.size, self.batch)
    }
}

/// `spec` over `t` (replog only: etcd stays on TCP).
fn with_transport(spec: Spec, t: Transport) -> Spec {
    if spec.durability.is_some() {
        Spec { transport: t, ..spec }
    } else {
        spec
    }
}

const MEM: DurabilityKind = DurabilityKind::Memory;
const FSYNC: DurabilityKind = DurabilityKind::Fsync;

fn short_plan(transport: Transport) -> Vec<Spec> {
    let mut p = Vec::new();
    if transport != Transport::Tcp {
        // Starting EAL (DPDK) or registering memory and bootstrapping queue pairs
        // (RDMA, in an emulated VM) makes each configuration slower to set up: the four
        // basic ones only (under a minute with the baselines).
        for d in [MEM, FSYNC] {
            for c in [1, 4] {
                p.push(Spec::replog(d, c, 64, 1, Loop::Closed));
            }
        }
        return p;
    }
    for d in [MEM, FSYNC] {
        for c in [1, 4] {
            p.push(Spec::replog(d, c, 64, 1, Loop::Closed));
        }
    }
    p.push(Spec::replog(MEM, 1, 64, 1, Loop::Closed).spinning(50));
    p.push(Spec::replog(MEM, 2, 64, 16, Loop::Closed));
    p.push(Spec::replog(MEM, 2, 64, 1, Loop::Open { rate: 1000.0 }));
    for c in [1, 4] {
        p.push(Spec::etcd(c, 64, 1, Loop::Closed));
    }
    p
}

/// The standard suite behind bench/RESULTS.md.
fn full_plan() -> Vec<Spec> {
    let mut p = Vec::new();
    let clients = [1, 2, 4, 8, 16];
    for d in [MEM, FSYNC] {
        for c in clients {
            p.push(Spec::replog(d, c, 64, 1, Loop::Closed));
        }
        // Spinning against blocking waits (with more busy threads than cores at 4).
        for c in [1, 4] {
            p.push(Spec::replog(d, c, 64, 1, Loop::Closed).spinning(50));
        }
    }
    // Batching: the throughput target.
    for (d, batches) in [(MEM, &[16usize, 64, 256][..]), (FSYNC, &[64][..])] {
        for &b in batches {
            for c in [1, 4, 16] {
                p.push(Spec::replog(d, c, 64, b, Loop::Closed));
            }
        }
    }
    // Entry sizes.
    for d in [MEM, FSYNC] {
        for z in [16, 1024, 16384, 65536] {
            p.push(Spec::replog(d, 4, z, 1, Loop::Closed));
        }
    }
    // Open loop: latency against offered load.
    for r in [1000.0, 4000.0, 8000.0, 16000.0, 32000.0] {
        p.push(Spec::replog(MEM, 8, 64, 1, Loop::Open { rate: r }));
    }
    for r in [500.0, 1000.0, 2000.0, 4000.0] {
        p.push(Spec::replog(FSYNC, 8, 64, 1, Loop::Open { rate: r }));
        p.push(Spec::etcd(8, 64, 1, Loop::Open { rate: r }));
    }
    // etcd at the same client counts, sizes and (one) batch size.
    for c in clients {
        p.push(Spec::etcd(c, 64, 1, Loop::Closed));
    }
    for c in [1, 4, 16] {
        p.push(Spec::etcd(c, 64, 64, Loop::Closed));
    }
    for z in [16, 1024, 16384, 65536] {
        p.push(Spec::etcd(4, z, 1, Loop::Closed));
    }
    p
}

fn custom_plan(a: &Args) -> Result<Vec<Spec>> {
    let durs: Vec<DurabilityKind> = a
        .durability
        .clone()
        .unwrap_or(vec![Durability::Memory, Durability::Fsync])
        .into_iter()
        .map(|d| if d == Durability::Memory { MEM } else { FSYNC })
        .collect();
    let clients = a.clients.clone().unwrap_or(vec![1, 4]);
    let sizes = a.sizes.clone().unwrap_or(vec![64]);
    let batches = a.batch.clone().unwrap_or(vec![1]);
    let spins = a.spin_us.clone().unwrap_or(vec![0]);
    let mode = a.mode.unwrap_or(if a.rates.is_some() { ModeArg::Open } else { ModeArg::Closed });
    let rates = a.rates.clone().unwrap_or_default();
    if mode != ModeArg::Closed && rates.is_empty() {
        bail!("--mode open needs --rates R1,R2,...");
    }
    let mut loops = Vec::new();
    if mode != ModeArg::Open {
        loops.push(Loop::Closed);
    }
    if mode != ModeArg::Closed {
        loops.extend(rates.iter().map(|&rate| Loop::Open { rate }));
    }
    let mut p = Vec::new();
    let mut systems: Vec<Option<DurabilityKind>> = Vec::new();
    if !a.no_replog {
        systems.extend(durs.into_iter().map(Some));
    }
    if !a.no_etcd {
        systems.push(None);
    }
    for sys in systems {
        for &z in &sizes {
            for &b in &batches {
                for &c in &clients {
                    for &l in &loops {
                        let spec = Spec {
                            durability: sys,
                            clients: c,
                            size: z,
                            batch: b,
                            mode: l,
                            spin_us: 0,
                            transport: Transport::Tcp,
                        };
                        if sys.is_none() {
                            p.push(spec);
                            continue;
                        }
                        for &spin_us in &spins {
                            p.push(Spec { spin_us, ..spec.clone() });
                        }
                    }
                }
            }
        }
    }
    Ok(p)
}

fn validate(spec: &Spec) -> Result<()> {
    if !(16..=65536).contains(&spec.size) {
        bail!("entry size {} outside 16 B..64 KiB", spec.size);
    }
    if spec.clients == 0 || spec.clients > 256 || spec.batch == 0 {
        bail!("clients must be 1..=256 and batch at least 1");
    }
    if spec.size * spec.batch > 8 << 20 {
        bail!("a request of {} x {} B exceeds 8 MiB", spec.batch, spec.size);
    }
    if spec.spin_us > 100_000 {
        bail!("--spin-us {} exceeds 100000 (the replicas' limit)", spec.spin_us);
    }
    if spec.durability.is_none() && spec.batch > 128 {
        bail!("etcd refuses transactions of more than 128 operations (--max-txn-ops)");
    }
    Ok(())
}

fn main() {
    proc::install_signal_handlers();
    let args = Args::parse();
    if let Some(cmd) = &args.cmd {
        let (name, a) = match cmd {
            Cmd::DpdkPingpong(a) => ("dpdk-pingpong", a),
            Cmd::RdmaPingpong(a) => ("rdma-pingpong", a),
        };
        let r = match cmd {
            Cmd::DpdkPingpong(_) => dpdk::pingpong(a),
            Cmd::RdmaPingpong(_) => rdma::pingpong(a),
        };
        if let Err(e) = r {
            eprintln!("bench {name} ({:?}): error: {e:#}", a.role);
            std::process::exit(1);
        }
        std::process::exit(0);
    }
    match run(args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Runs the benchmark; returns the exit code.
fn run(args: Args) -> Result<i32> {
    let mut transports: Vec<Transport> = Vec::new();
    for &t in &args.transport {
        if !transports.contains(&t) {
            transports.push(t);
        }
    }
    if transports.is_empty() {
        bail!("--transport needs at least one of tcp, dpdk, rdma");
    }
    let dpdk_wanted = transports.contains(&Transport::Dpdk);
    let rdma_wanted = transports.contains(&Transport::Rdma);
    let transport_list = transports.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(",");
    if args.replicas == 0 || args.replicas > 9 {
        bail!("--replicas must be 1..=9");
    }
    let custom = args.durability.is_some()
        || args.clients.is_some()
        || args.sizes.is_some()
        || args.batch.is_some()
        || args.mode.is_some()
        || args.rates.is_some()
        || args.spin_us.is_some();
    let mut plan = if args.short {
        // The short plans differ: each transport's own, etcd once (with tcp's).
        transports.iter().flat_map(|&t| short_plan(t).into_iter().map(move |s| with_transport(s, t))).collect()
    } else {
        let base = if custom { custom_plan(&args)? } else { full_plan() };
        // Every replog configuration once per transport; etcd once.
        let mut p: Vec<Spec> = Vec::new();
        for &t in &transports {
            p.extend(base.iter().filter(|s| s.durability.is_some()).map(|s| with_transport(s.clone(), t)));
        }
        p.extend(base.into_iter().filter(|s| s.durability.is_none()));
        p
    };
    // Over RDMA alone (inside the soft-RoCE VM) there is no etcd: its cluster would run
    // on TCP in the same emulated machine and compare with nothing measured here.
    let rdma_only = transports == [Transport::Rdma];
    if args.no_etcd || rdma_only {
        plan.retain(|s| s.durability.is_some());
    }
    if args.no_replog {
        plan.retain(|s| s.durability.is_none());
    }
    for s in &plan {
        validate(s).with_context(|| s.label())?;
    }
    let duration = Duration::from_secs_f64(args.duration.unwrap_or(if args.short { 1.5 } else { 3.0 }));
    let warmup = Duration::from_secs_f64(args.warmup.unwrap_or(if args.short { 0.3 } else { 0.5 }));
    let data_dir = args.data_dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&data_dir)?;
    let replog_bin =
        if plan.iter().any(|s| s.durability.is_some()) { Some(find_replog(args.replog.as_deref())?) } else { None };
    // DPDK: the replicas' namespaces and bridge, for the whole run (the ping-pong
    // baseline runs in two of them first). Deleted when `net` drops: on return, on an
    // error, and after Ctrl-C (the loops below stop on the signal flag).
    let net = if dpdk_wanted && plan.iter().any(|s| s.durability.is_some()) {
        let n = args.replicas.max(2);
        Some(dpdk::create_net(n).with_context(|| format!("creating the network of {n} DPDK replicas"))?)
    } else {
        None
    };
    // RDMA: the device every replica (and the ping-pong) uses.
    let rdma_net = if rdma_wanted && plan.iter().any(|s| s.durability.is_some()) {
        let mut n = rdma::RdmaNet::detect()?;
        n.landing = match args.rdma_landing {
            RdmaLanding::Auto => replog::config::LandingKind::Auto,
            RdmaLanding::Ack => replog::config::LandingKind::Ack,
        };
        Some(n)
    } else {
        None
    };
    let machine = Machine::probe();
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    println!(
        "bench: {} configurations, {:.1} s each (+{:.1} s warm-up)",
        plan.len(),
        duration.as_secs_f64(),
        warmup.as_secs_f64()
    );
    println!(
        "machine: {} ({} cores), kernel {}, load average {}",
        machine.cpu, machine.cores, machine.kernel, machine.loadavg_before
    );
    if let Some(b) = &replog_bin {
        let mut hows = Vec::new();
        if transports.contains(&Transport::Tcp) {
            hows.push("over TCP on loopback".to_string());
        }
        if let Some(n) = &net {
            hows.push(format!(
                "over DPDK (af_packet vdevs on veths, namespaces {p}1..{p}{r}, bridge {br} with {h}/24 for the clients)",
                p = n.layout().prefix,
                r = args.replicas,
                br = n.layout().bridge,
                h = n.layout().host_addr()
            ));
        }
        if let Some(r) = &rdma_net {
            hows.push(format!("over RDMA on {} (clients over TCP on loopback)", r.describe()));
        }
        let how = hows.join(", and ");
        println!(
            "replog: {}; {} replicas as processes {how}; data in {}",
            b.display(),
            args.replicas,
            data_dir.display()
        );
    }

    // Baselines, in this run.
    let (iters, syncs) = if args.short { (5_000, 200) } else { (20_000, 1_000) };
    let rtt = baseline::tcp_rtt(64, iters, 1_000, Duration::from_secs(10)).context("TCP round-trip baseline")?;
    let sync = baseline::fdatasync(&data_dir, syncs, Duration::from_secs(10)).context("fdatasync baseline")?;
    // A raw ping-pong baseline waiting as the replicas do, then busy-polling (64 B
    // messages, 1,000 untimed round trips first, at most 10 s each).
    let me = std::env::current_exe().context("locating the bench executable")?;
    let ping_pair = |rtt: &dyn Fn(bool) -> Result<hdrhistogram::Histogram<u64>>, what: &str, how: &str| -> Result<_> {
        let h = rtt(false).with_context(|| format!("{what} round-trip baseline ({how})"))?;
        let b = rtt(true).with_context(|| format!("{what} round-trip baseline, busy-polling"))?;
        Ok((Some(h), Some(b)))
    };
    let (dpdk_rtt, dpdk_busy) = match &net {
        Some(net) => ping_pair(
            &|busy| dpdk::rtt(net, &me, &data_dir, 64, iters, 1_000, Duration::from_secs(10), busy),
            "DPDK",
            "ping-pong between two replicas' namespaces",
        )?,
        None => (None, None),
    };
    let (rdma_rtt, rdma_busy) = match &rdma_net {
        Some(net) => ping_pair(
            &|busy| rdma::rtt(net, &me, &data_dir, 64, iters, 1_000, Duration::from_secs(10), busy),
            "RDMA",
            "one-sided write ping-pong between two processes",
        )?,
        None => (None, None),
    };
    let baselines = Baselines {
        tcp_rtt: Latency::of(&rtt),
        tcp_rtt_cdf: cdf(&rtt),
        fdatasync: Latency::of(&sync),
        fdatasync_cdf: cdf(&sync),
        data_dir: data_dir.display().to_string(),
        dpdk_rtt: dpdk_rtt.as_ref().map(Latency::of),
        dpdk_rtt_cdf: dpdk_rtt.as_ref().map(cdf).unwrap_or_default(),
        dpdk_rtt_busy: dpdk_busy.as_ref().map(Latency::of),
        dpdk_rtt_busy_cdf: dpdk_busy.as_ref().map(cdf).unwrap_or_default(),
        rdma_rtt: rdma_rtt.as_ref().map(Latency::of),
        rdma_rtt_cdf: rdma_rtt.as_ref().map(cdf).unwrap_or_default(),
        rdma_rtt_busy: rdma_busy.as_ref().map(Latency::of),
        rdma_rtt_busy_cdf: rdma_busy.as_ref().map(cdf).unwrap_or_default(),
        rdma_device: rdma_net.as_ref().map(|r| r.describe()),
    };
    println!("baseline TCP loopback RTT 64 B (TcpStream, TCP_NODELAY): {}", baselines.tcp_rtt.line());
    println!("baseline 4 KiB pwrite+fdatasync on {}: {}", data_dir.display(), baselines.fdatasync.line());
    if let Some(l) = &baselines.dpdk_rtt {
        println!(
            "baseline DPDK RTT 64 B (replog's DPDK transport, af_packet on veths, namespace 1 <-> 2 via the bridge): {}",
            l.line()
        );
    }
    if let Some(l) = &baselines.dpdk_rtt_busy {
        println!("baseline DPDK RTT 64 B, both sides busy-polling (the same path without idle naps): {}", l.line());
    }
    if let Some(l) = &baselines.rdma_rtt {
        println!(
            "baseline RDMA RTT 64 B (replog's RDMA transport on {}: one-sided WRITE into the peer's log region, \
             reply WRITE into the writer's acknowledgement area, each seen by polling memory; waiting as the replicas do): {}",
            baselines.rdma_device.as_deref().unwrap_or("?"),
            l.line()
        );
    }
    if let Some(l) = &baselines.rdma_rtt_busy {
        println!("baseline RDMA RTT 64 B, both sides busy-polling (the same path without sleeps): {}", l.line());
    }

    // etcd, started at its first configuration and stopped at the end (drop guard).
    let want_etcd = plan.iter().any(|s| s.durability.is_none());
    let mut etcd: Option<EtcdCluster> = None;
    let mut etcd_version = None;
    let mut etcd_unavailable = None;
    if want_etcd {
        match find_etcd() {
            Ok(bin) => {
                etcd_version = Some(bench::etcd::version(&bin));
                match EtcdCluster::start(&bin, 3, &data_dir) {
                    Ok(c) => {
                        println!(
                            "etcd: {} ({}), 3 members on 127.0.0.1 {:?}",
                            bin.display(),
                            etcd_version.as_deref().unwrap_or("?"),
                            c.client_addrs
                        );
                        etcd = Some(c);
                    }
                    Err(e) => etcd_unavailable = Some(format!("etcd did not start: {e:#}")),
                }
            }
            Err(e) => etcd_unavailable = Some(format!("{e:#}")),
        }
        if let Some(why) = &etcd_unavailable {
            println!("ETCD NOT MEASURED: {why}");
        }
    }

    let pb = ProgressBar::new(plan.len() as u64);
    pb.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut runs: Vec<RunResult> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    for spec in &plan {
        if proc::stopped() {
            failures.push("stopped by a signal".into());
            break;
        }
        pb.set_message(spec.label());
        if spec.durability.is_none() && etcd.is_none() {
            pb.inc(1);
            continue;
        }
        let r = measure(
            spec,
            &args,
            replog_bin.as_deref(),
            &data_dir,
            etcd.as_mut(),
            net.as_ref(),
            rdma_net.as_ref(),
            &baselines,
            duration,
            warmup,
            &pb,
        );
        match r {
            Ok(res) => {
                say(&pb, res.line(&baselines));
                runs.push(res);
            }
            Err(e) => {
                let msg = format!("{}: {e:#}", spec.label());
                say(&pb, format!("FAILED {msg}"));
                failures.push(msg);
            }
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    if let Some(mut c) = etcd.take() {
        c.stop();
    }
    // Every cluster stopped already (each measurement stops its own).
    drop(net);

    let comparisons = report::compare(&runs);
    if !comparisons.is_empty() {
        println!("replog (fsync) / etcd at the same client count, entry size and batch:");
        for c in &comparisons {
            println!("  {}", c.line());
        }
    } else if want_etcd {
        println!("replog/etcd comparison: none (etcd not measured)");
    }
    let spins = report::spin_pairs(&runs);
    if !spins.is_empty() {
        println!("spinning against blocking waits (same configuration otherwise):");
        for l in &spins {
            println!("  {l}");
        }
    }
    let targets = report::targets(&runs, &baselines, &comparisons);
    println!("issue 7 targets:");
    for t in &targets {
        let state = match t.met {
            Some(true) => "met",
            Some(false) => "NOT met",
            None => "not measured",
        };
        println!("  [{state}] {}: {}", t.name, t.reached);
    }
    let mut machine = machine;
    machine.loadavg_after = report::loadavg();
    let rep = Report {
        date: report::utc_now(),
        machine,
        command,
        transport: transport_list,
        etcd_version,
        etcd_unavailable: etcd_unavailable.clone(),
        baselines,
        runs,
        comparisons,
        targets,
    };
    report::write_files(&rep, &args.out)?;
    let plots = plot::write_plots(&rep, &args.out)?;
    println!(
        "wrote {} and {} plots: {}",
        args.out.join("results.{json,csv}").display(),
        plots.len(),
        plots.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    );

    let mut code = if failures.is_empty() { 0 } else { 1 };
    for f in &failures {
        println!("FAILED: {f}");
    }
    if args.short {
        let checks = short_checks(&rep, &args.out, &plots, want_etcd, &transports);
        let bad: Vec<_> = checks.iter().filter(|c| !c.1).collect();
        for (name, ok) in &checks {
            println!("  check {}: {name}", if *ok { "ok" } else { "FAILED" });
        }
        println!("bench --short: {} checks passed, {} failed", checks.len() - bad.len(), bad.len());
        if !bad.is_empty() {
            code = 1;
        }
    }
    Ok(code)
}

/// Prints above the progress bar (or plainly when there is no terminal to draw it on).
fn say(pb: &ProgressBar, line: String) {
    if pb.is_hidden() {
        println!("{line}");
    } else {
        pb.println(line);
    }
}

fn short_checks(
    rep: &Report,
    out: &Path,
    plots: &[PathBuf],
    want_etcd: bool,
    transports: &[Transport],
) -> Vec<(String, bool)> {
    let mut c = Vec::new();
    c.push(("TCP RTT baseline measured".to_string(), rep.baselines.tcp_rtt.count > 0));
    c.push(("fdatasync baseline measured".to_string(), rep.baselines.fdatasync.count > 0));
    if transports.contains(&Transport::Dpdk) {
        c.push((
            "DPDK RTT baseline measured".to_string(),
            rep.baselines.dpdk_rtt.as_ref().is_some_and(|l| l.count > 0)
                && !rep.baselines.dpdk_rtt_cdf.is_empty()
                && rep.baselines.dpdk_rtt_busy.as_ref().is_some_and(|l| l.count > 0),
        ));
    }
    if transports.contains(&Transport::Rdma) {
        c.push((
            "RDMA RTT baseline measured".to_string(),
            rep.baselines.rdma_rtt.as_ref().is_some_and(|l| l.count > 0)
                && !rep.baselines.rdma_rtt_cdf.is_empty()
                && rep.baselines.rdma_rtt_busy.as_ref().is_some_and(|l| l.count > 0),
        ));
    }
    for (t, d) in transports.iter().flat_map(|t| ["memory", "fsync"].map(|d| (t.as_str(), d))) {
        let transport = t;
        let rs: Vec<_> =
            rep.runs.iter().filter(|r| r.system == "replog" && r.durability == d && r.transport == t).collect();
        c.push((
            format!("replog {transport} {d}: every configuration ran with non-zero throughput ({} runs)", rs.len()),
            !rs.is_empty() && rs.iter().all(|r| r.throughput > 0.0 && r.latency.count > 0),
        ));
        if transport != "tcp" {
            c.push((
                format!("replog {transport} {d}: p50 / {} p50 computed", Baselines::rtt_name(transport)),
                !rs.is_empty() && rs.iter().all(|r| r.p50_over_rtt > 0.0 && r.p50_over_rtt.is_finite()),
            ));
        }
    }
    if want_etcd {
        let es: Vec<_> = rep.runs.iter().filter(|r| r.system == "etcd").collect();
        c.push((
            format!(
                "etcd measured with non-zero throughput ({} runs{})",
                es.len(),
                rep.etcd_unavailable.as_deref().map(|w| format!("; {w}")).unwrap_or_default()
            ),
            !es.is_empty() && es.iter().all(|r| r.throughput > 0.0),
        ));
        c.push(("replog/etcd comparison printed".to_string(), !rep.comparisons.is_empty()));
    }
    for f in ["results.json", "results.csv"] {
        let p = out.join(f);
        c.push((format!("{} written", p.display()), std::fs::metadata(&p).map(|m| m.len() > 0).unwrap_or(false)));
    }
    c.push((
        format!("{} plots written", plots.len()),
        plots.len() >= 2
            && plots.iter().all(|p| std::fs::read_to_string(p).map(|s| s.contains("<svg")).unwrap_or(false)),
    ));
    c
}

#[allow(clippy::too_many_arguments)]
fn measure(
    spec: &Spec,
    args: &Args,
    replog_bin: Option<&Path>,
    data_dir: &Path,
    etcd: Option<&mut EtcdCluster>,
    net: Option<&dpdk::DpdkNet>,
    rdma_net: Option<&rdma::RdmaNet>,
    baselines: &Baselines,
    duration: Duration,
    warmup: Duration,
    pb: &ProgressBar,
) -> Result<RunResult> {
    let load = Load { clients: spec.clients, size: spec.size, batch: spec.batch, mode: spec.mode, warmup, duration };
    let spin = Duration::from_micros(spec.spin_us);
    let progress = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    // Live rate on the progress bar.
    let ticker = {
        let (progress, done, pb, label) = (progress.clone(), done.clone(), pb.clone(), spec.label());
        std::thread::spawn(move || {
            let t0 = Instant::now();
            for _ in 0..100_000 {
                if done.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(250));
                let n = progress.load(Ordering::Relaxed);
                pb.set_message(format!("{label}: {} appends/s", fmt_rate(n as f64 / t0.elapsed().as_secs_f64())));
            }
        })
    };
    let result = (|| -> Result<(load::Outcome, &'static str)> {
        match spec.durability {
            Some(d) => {
                let bin = replog_bin.context("no replog binary")?;
                let fabric = match spec.transport {
                    Transport::Tcp => Fabric::Tcp,
                    Transport::Dpdk => {
                        Fabric::Dpdk(net.context("no DPDK network (bench --transport dpdk creates it)")?)
                    }
                    Transport::Rdma => {
                        Fabric::Rdma(rdma_net.context("no RDMA device (bench --transport rdma finds it)")?)
                    }
                };
                let mut cluster = ReplogCluster::start(
                    bin,
                    args.replicas,
                    d,
                    spin.as_micros() as u64,
                    args.client_port_thread,
                    data_dir,
                    fabric,
                )?;
                let mut cfg = cluster.client_config()?;
                cfg.spin = spin;
                let out = load::run(
                    &load,
                    |_| Ok(Box::new(ReplogDriver::connect(cfg.clone())?) as Box<dyn Driver>),
                    progress.clone(),
                )?;
                if !cluster.all_running() {
                    bail!("a replica exited during the run; replica 1's log:\n{}", cluster.log_tail(0));
                }
                // A window in which no append completed measured nothing: a failure, not
                // a result of 0 appends/s.
                if out.requests == 0 {
                    let logs: Vec<String> = (0..args.replicas)
                        .map(|i| format!("replica {}'s log:\n{}", i + 1, cluster.log_tail(i)))
                        .collect();
                    bail!(
                        "no append completed in the {:.1} s window ({} failed{}); {}",
                        out.elapsed.as_secs_f64(),
                        out.errors,
                        out.first_error.as_deref().map(|e| format!(", first: {e}")).unwrap_or_default(),
                        logs.join("\n")
                    );
                }
                cluster.stop();
                Ok((out, d.as_str()))
            }
            None => {
                let etcd = etcd.context("etcd is not running")?;
                let leader = etcd.leader(Duration::from_secs(10))?;
                let out = load::run(
                    &load,
                    |i| Ok(Box::new(EtcdDriver::connect(leader, i)?) as Box<dyn Driver>),
                    progress.clone(),
                )?;
                Ok((out, "fsync"))
            }
        }
    })();
    done.store(true, Ordering::Relaxed);
    let _ = ticker.join();
    let (out, durability) = result?;
    let secs = out.elapsed.as_secs_f64();
    let lat = Latency::of(&out.hist);
    // etcd always runs over TCP; replog over the configuration's transport.
    let transport = spec.transport.as_str();
    let floor = baselines.floor_us(transport, durability);
    let div = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    Ok(RunResult {
        system: if spec.durability.is_some() { "replog" } else { "etcd" }.to_string(),
        transport: transport.to_string(),
        durability: durability.to_string(),
        mode: match spec.mode {
            Loop::Closed => "closed",
            Loop::Open { .. } => "open",
        }
        .to_string(),
        clients: spec.clients,
        size: spec.size,
        batch: spec.batch,
        spin_us: spec.spin_us,
        offered_rate: match spec.mode {
            Loop::Closed => None,
            Loop::Open { rate } => Some(rate),
        },
        duration_s: secs,
        requests: out.requests,
        entries: out.entries,
        throughput: out.entries as f64 / secs,
        request_rate: out.requests as f64 / secs,
        mb_per_s: out.entries as f64 * spec.size as f64 / secs / 1e6,
        p50_over_rtt: div(lat.p50_us, baselines.rtt_us(transport)),
        p50_over_busy_rtt: baselines.busy_rtt(transport).map(|l| div(lat.p50_us, l.p50_us)),
        p50_over_floor: div(lat.p50_us, floor),
        latency: lat,
        errors: out.errors,
        first_error: out.first_error,
        missed: out.missed,
        cdf: cdf(&out.hist),
    })
}
