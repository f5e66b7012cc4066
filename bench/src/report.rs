//! Results: one [`RunResult`] per configuration, the [`Baselines`] of the same run, the
//! ratios between them and against etcd; written as JSON and CSV.

use crate::stats::{fmt_rate, fmt_us, Latency};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;

/// Baselines measured in the same run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Baselines {
    /// 64 B TCP loopback ping-pong (raw `TcpStream`, TCP_NODELAY).
    pub tcp_rtt: Latency,
    /// Its CDF `(us, quantile)`.
    pub tcp_rtt_cdf: Vec<(f64, f64)>,
    /// 4 KiB pwrite + fdatasync on the data directory.
    pub fdatasync: Latency,
    /// Its CDF.
    pub fdatasync_cdf: Vec<(f64, f64)>,
    /// Where the fdatasync probe ran.
    pub data_dir: String,
    /// `--transport dpdk` only: 64 B ping-pong over the DPDK transport between two
    /// replicas' namespaces (af_packet vdevs on veths through the bridge), the
    /// replicas' own path without consensus.
    pub dpdk_rtt: Option<Latency>,
    /// Its CDF (empty without it).
    pub dpdk_rtt_cdf: Vec<(f64, f64)>,
    /// The same ping-pong with both sides busy-polling (`poll` with a zero timeout)
    /// instead of napping when idle as the replicas do: the path's floor.
    pub dpdk_rtt_busy: Option<Latency>,
    /// Its CDF (empty without it).
    pub dpdk_rtt_busy_cdf: Vec<(f64, f64)>,
    /// `--transport rdma` only: 64 B one-sided RDMA WRITE ping-pong over the replicas'
    /// RDMA transport (write into the peer's log region, reply written into the
    /// writer's acknowledgement area, each seen by the target's CPU polling its memory;
    /// see `bench::rdma`), waiting between looks as the replicas do.
    pub rdma_rtt: Option<Latency>,
    /// Its CDF (empty without it).
    pub rdma_rtt_cdf: Vec<(f64, f64)>,
    /// The same ping-pong with both sides busy-polling: the path's floor.
    pub rdma_rtt_busy: Option<Latency>,
    /// Its CDF (empty without it).
    pub rdma_rtt_busy_cdf: Vec<(f64, f64)>,
    /// The RDMA device the replicas and the ping-pong used (`rxe0 (GID index 1), ...`).
    pub rdma_device: Option<String>,
}

impl Baselines {
    /// The raw round trip (p50) between replicas over `transport`: the DPDK ping-pong
    /// for `dpdk`, the RDMA ping-pong for `rdma` (0 if not measured), else the TCP
    /// loopback one.
    pub fn rtt_us(&self, transport: &str) -> f64 {
        match transport {
            "dpdk" => self.dpdk_rtt.as_ref().map_or(0.0, |l| l.p50_us),
            "rdma" => self.rdma_rtt.as_ref().map_or(0.0, |l| l.p50_us),
            _ => self.tcp_rtt.p50_us,
        }
    }

    /// The busy-polling ping-pong of `transport` (dpdk and rdma), if measured.
    pub fn busy_rtt(&self, transport: &str) -> Option<&Latency> {
        match transport {
            "dpdk" => self.dpdk_rtt_busy.as_ref(),
            "rdma" => self.rdma_rtt_busy.as_ref(),
            _ => None,
        }
    }

    /// The name of that round trip in printed lines.
    pub fn rtt_name(transport: &str) -> &'static str {
        match transport {
            "dpdk" => "DPDK RTT",
            "rdma" => "RDMA RTT",
            _ => "TCP RTT",
        }
    }

    /// The floor of a commit in memory mode: client to leader (TCP) and leader to a
    /// follower (over `transport`): 2 TCP round trips, or 1 TCP + 1 DPDK (or RDMA) round
    /// trip.
    pub fn memory_floor_us(&self, transport: &str) -> f64 {
        self.tcp_rtt.p50_us + self.rtt_us(transport)
    }

    /// The floor of a commit in fsync mode: the memory floor + one fdatasync.
    pub fn fsync_floor_us(&self, transport: &str) -> f64 {
        self.memory_floor_us(transport) + self.fdatasync.p50_us
    }

    /// The floor of `durability` over `transport`.
    pub fn floor_us(&self, transport: &str, durability: &str) -> f64 {
        if durability == "memory" {
            self.memory_floor_us(transport)
        } else {
            self.fsync_floor_us(transport)
        }
    }
}

/// One measured configuration.
#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    /// `replog` or `etcd`.
    pub system: String,
    /// Between the replicas: `tcp`, `dpdk` or `rdma` (etcd: `tcp`). Clients always use TCP.
    pub transport: String,
    /// `memory` or `fsync` (etcd: `fsync`, its WAL is synced).
    pub durability: String,
    /// `closed` or `open`.
    pub mode: String,
    /// Client threads (connections).
    pub clients: usize,
    /// Bytes per entry.
    pub size: usize,
    /// Entries per request.
    pub batch: usize,
    /// Spin-then-block waits of the replicas and the clients, in microseconds (0: they
    /// block at once).
    pub spin_us: u64,
    /// Open loop: offered entries per second.
    pub offered_rate: Option<f64>,
    /// Measured seconds.
    pub duration_s: f64,
    /// Requests answered in the window.
    pub requests: u64,
    /// Entries acknowledged in the window.
    pub entries: u64,
    /// Entries per second.
    pub throughput: f64,
    /// Requests per second.
    pub request_rate: f64,
    /// Payload MB/s.
    pub mb_per_s: f64,
    /// Per-request latency.
    pub latency: Latency,
    /// Failed requests.
    pub errors: u64,
    /// The first failure.
    pub first_error: Option<String>,
    /// Open loop: requests due but never sent.
    pub missed: u64,
    /// p50 / the raw RTT p50 of its transport (tcp: the TCP loopback ping-pong; dpdk:
    /// the DPDK ping-pong, [`Baselines::dpdk_rtt`]; rdma: the RDMA ping-pong,
    /// [`Baselines::rdma_rtt`]).
    pub p50_over_rtt: f64,
    /// dpdk and rdma only: p50 / the busy-polling ping-pong's p50 of its transport
    /// ([`Baselines::busy_rtt`]).
    pub p50_over_busy_rtt: Option<f64>,
    /// p50 / the floor of its durability and transport ([`Baselines::floor_us`]).
    pub p50_over_floor: f64,
    /// CDF points `(us, quantile)`.
    pub cdf: Vec<(f64, f64)>,
}

impl RunResult {
    /// `replog memory closed c=4 64B b=1` (and `@10k/s` in open loop; `replog dpdk
    /// memory ...` over DPDK).
    pub fn label(&self) -> String {
        let system =
            if self.transport == "tcp" { self.system.clone() } else { format!("{} {}", self.system, self.transport) };
        let mut s =
            format!("{system} {} {} c={} {}B b={}", self.durability, self.mode, self.clients, self.size, self.batch);
        if let Some(r) = self.offered_rate {
            let _ = write!(s, " @{}/s", fmt_rate(r));
        }
        if self.spin_us > 0 {
            let _ = write!(s, " spin={}us", self.spin_us);
        }
        s
    }

    /// The result line printed beside its baseline ratios.
    pub fn line(&self, b: &Baselines) -> String {
        let floor_name = floor_name(&self.transport, &self.durability);
        let floor = b.floor_us(&self.transport, &self.durability);
        let mut s = format!(
            "{:<34} {:>8} appends/s {:>8} req/s  {}  | p50 / {} p50 [{}] = {:.1}x; p50 / {floor_name} p50 [{}] = {:.2}x",
            self.label(),
            fmt_rate(self.throughput),
            fmt_rate(self.request_rate),
            self.latency.line(),
            Baselines::rtt_name(&self.transport),
            fmt_us(b.rtt_us(&self.transport)),
            self.p50_over_rtt,
            fmt_us(floor),
            self.p50_over_floor
        );
        if let (Some(x), Some(l)) = (self.p50_over_busy_rtt, b.busy_rtt(&self.transport)) {
            let name = Baselines::rtt_name(&self.transport);
            let _ = write!(s, "; p50 / busy-polling {name} p50 [{}] = {x:.1}x", fmt_us(l.p50_us));
        }
        if self.errors > 0 {
            let _ = write!(s, "  [{} errors: {}]", self.errors, self.first_error.as_deref().unwrap_or(""));
        }
        if self.missed > 0 {
            let _ = write!(s, "  [{} requests never sent: clients fell behind]", self.missed);
        }
        s
    }
}

/// The floor's name: `2 RTT`, `(TCP RTT + DPDK RTT + fdatasync)`...
pub fn floor_name(transport: &str, durability: &str) -> &'static str {
    match (transport, durability == "memory") {
        ("dpdk", true) => "(TCP RTT + DPDK RTT)",
        ("dpdk", false) => "(TCP RTT + DPDK RTT + fdatasync)",
        ("rdma", true) => "(TCP RTT + RDMA RTT)",
        ("rdma", false) => "(TCP RTT + RDMA RTT + fdatasync)",
        (_, true) => "2 RTT",
        (_, false) => "(2 RTT + fdatasync)",
    }
}

/// replog (fsync) against etcd at the same client count, size, batch and loop.
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    /// The configuration, without the system.
    pub config: String,
    /// replog entries/s.
    pub replog_throughput: f64,
    /// etcd entries/s.
    pub etcd_throughput: f64,
    /// replog / etcd throughput.
    pub throughput_ratio: f64,
    /// replog p50 (us).
    pub replog_p50_us: f64,
    /// etcd p50 (us).
    pub etcd_p50_us: f64,
    /// replog p50 / etcd p50 (below 1: replog is faster).
    pub p50_ratio: f64,
    /// replog p99 / etcd p99.
    pub p99_ratio: f64,
}

/// Pairs every replog fsync result with the etcd result of the same configuration.
pub fn compare(runs: &[RunResult]) -> Vec<Comparison> {
    let mut out = Vec::new();
    for r in runs.iter().filter(|r| r.system == "replog" && r.durability == "fsync" && r.spin_us == 0) {
        let same = |e: &&RunResult| e.system == "etcd" && same_load(e, r);
        if let Some(e) = runs.iter().find(same) {
            let div = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
            let mut config = format!("{} c={} {}B b={}", r.mode, r.clients, r.size, r.batch);
            if r.transport != "tcp" {
                config = format!("{} {config}", r.transport);
            }
            if let Some(x) = r.offered_rate {
                let _ = write!(config, " @{}/s", fmt_rate(x));
            }
            out.push(Comparison {
                config,
                replog_throughput: r.throughput,
                etcd_throughput: e.throughput,
                throughput_ratio: div(r.throughput, e.throughput),
                replog_p50_us: r.latency.p50_us,
                etcd_p50_us: e.latency.p50_us,
                p50_ratio: div(r.latency.p50_us, e.latency.p50_us),
                p99_ratio: div(r.latency.p99_us, e.latency.p99_us),
            });
        }
    }
    out
}

impl Comparison {
    /// One printed line.
    pub fn line(&self) -> String {
        format!(
            "{:<24} replog fsync {:>8}/s vs etcd {:>8}/s: replog/etcd throughput = {:.1}x; p50 {} vs {} (replog/etcd = {:.2}x); p99 ratio {:.2}x",
            self.config,
            fmt_rate(self.replog_throughput),
            fmt_rate(self.etcd_throughput),
            self.throughput_ratio,
            fmt_us(self.replog_p50_us),
            fmt_us(self.etcd_p50_us),
            self.p50_ratio,
            self.p99_ratio
        )
    }
}

/// One issue target and what was reached.
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    /// The target.
    pub name: String,
    /// What was measured.
    pub reached: String,
    /// Whether it is met (None: not measured in this run).
    pub met: Option<bool>,
}

/// The targets, judged on `runs`.
pub fn targets(runs: &[RunResult], b: &Baselines, cmp: &[Comparison]) -> Vec<Target> {
    let mut t = Vec::new();
    let replog = |d: &'static str| runs.iter().filter(move |r| r.system == "replog" && r.durability == d);
    // 1. 300k appends/s, memory mode, with batching.
    let best = replog("memory")
        .filter(|r| r.mode == "closed" && r.size <= 64)
        .max_by(|a, b| a.throughput.partial_cmp(&b.throughput).unwrap_or(std::cmp::Ordering::Equal));
    t.push(match best {
        Some(r) => Target {
            name: "memory mode >= 300,000 appends/s (batching)".into(),
            reached: format!("{} appends/s ({})", fmt_rate(r.throughput), r.label()),
            met: Some(r.throughput >= 300_000.0),
        },
        None => Target { name: "memory mode >= 300,000 appends/s".into(), reached: "not measured".into(), met: None },
    });
    // 2. 10x etcd in fsync mode at the same client count.
    let best_ratio = cmp
        .iter()
        .filter(|c| c.config.starts_with("closed"))
        .max_by(|a, b| a.throughput_ratio.partial_cmp(&b.throughput_ratio).unwrap_or(std::cmp::Ordering::Equal));
    let worst_ratio = cmp
        .iter()
        .filter(|c| c.config.starts_with("closed"))
        .min_by(|a, b| a.throughput_ratio.partial_cmp(&b.throughput_ratio).unwrap_or(std::cmp::Ordering::Equal));
    t.push(match (best_ratio, worst_ratio) {
        (Some(b), Some(w)) => Target {
            name: "fsync mode >= 10x etcd throughput at the same client count".into(),
            reached: format!(
                "best {:.1}x ({}), worst {:.1}x ({})",
                b.throughput_ratio, b.config, w.throughput_ratio, w.config
            ),
            met: Some(b.throughput_ratio >= 10.0),
        },
        _ => Target { name: "fsync mode >= 10x etcd".into(), reached: "not measured".into(), met: None },
    });
    // 3. memory, one client: p50 <= 3 x the raw RTT of its transport. Judged on the
    // better of blocking and spinning waits where both ran (the choice per transport
    // the issue asks for), once per transport measured.
    let mut transports: Vec<&str> = Vec::new();
    for r in runs.iter().filter(|r| r.system == "replog") {
        if !transports.contains(&r.transport.as_str()) {
            transports.push(&r.transport);
        }
    }
    if transports.is_empty() {
        transports.push("tcp");
    }
    let one = |d: &'static str, tr: &str| {
        replog(d)
            .filter(|r| r.transport == tr && r.mode == "closed" && r.clients == 1 && r.batch == 1 && r.size == 64)
            .min_by(|a, b| a.latency.p50_us.total_cmp(&b.latency.p50_us))
    };
    for &tr in &transports {
        t.push(match one("memory", tr) {
            Some(r) => Target {
                name: format!("memory mode, 1 client: commit p50 <= 3x {} p50", Baselines::rtt_name(tr)),
                reached: format!(
                    "p50 {} / RTT {} = {:.1}x ({})",
                    fmt_us(r.latency.p50_us),
                    fmt_us(b.rtt_us(tr)),
                    r.p50_over_rtt,
                    r.label()
                ),
                met: Some(r.p50_over_rtt <= 3.0),
            },
            None => Target {
                name: format!("memory 1-client p50 <= 3x {}", Baselines::rtt_name(tr)),
                reached: "not measured".into(),
                met: None,
            },
        });
    }
    // 4. fsync, one client: p50 <= 1.5 x (2 RTT + fdatasync), once per transport.
    for &tr in &transports {
        t.push(match one("fsync", tr) {
            Some(r) => Target {
                name: format!("fsync mode, 1 client: commit p50 <= 1.5x {} p50", floor_name(tr, "fsync")),
                reached: format!(
                    "p50 {} / {} = {:.2}x ({})",
                    fmt_us(r.latency.p50_us),
                    fmt_us(b.fsync_floor_us(tr)),
                    r.p50_over_floor,
                    r.label()
                ),
                met: Some(r.p50_over_floor <= 1.5),
            },
            None => Target {
                name: format!("fsync 1-client p50 <= 1.5x {}", floor_name(tr, "fsync")),
                reached: "not measured".into(),
                met: None,
            },
        });
    }
    t
}

/// Everything a run produced.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// UTC date and time.
    pub date: String,
    /// Machine and load.
    pub machine: Machine,
    /// The command line.
    pub command: String,
    /// The replicas' transports in this run (`tcp`, `dpdk`, `rdma`, or a list: `tcp,rdma`).
    pub transport: String,
    /// The etcd version used, if any.
    pub etcd_version: Option<String>,
    /// Why etcd was not measured, if it was not.
    pub etcd_unavailable: Option<String>,
    /// Baselines.
    pub baselines: Baselines,
    /// Every configuration.
    pub runs: Vec<RunResult>,
    /// replog fsync vs etcd.
    pub comparisons: Vec<Comparison>,
    /// The targets.
    pub targets: Vec<Target>,
}

/// What the run ran on.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Machine {
    /// CPU model.
    pub cpu: String,
    /// Cores online.
    pub cores: usize,
    /// Kernel.
    pub kernel: String,
    /// /proc/loadavg before the run.
    pub loadavg_before: String,
    /// /proc/loadavg after the run.
    pub loadavg_after: String,
}

impl Machine {
    /// Reads /proc.
    pub fn probe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default();
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string(),
            loadavg_before: loadavg(),
            loadavg_after: String::new(),
        }
    }
}

/// /proc/loadavg, trimmed.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_string()
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days, no time crate).
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

/// Whether two runs offered the same load (loop, clients, entry size, batch, rate).
fn same_load(a: &RunResult, b: &RunResult) -> bool {
    a.mode == b.mode
        && a.clients == b.clients
        && a.size == b.size
        && a.batch == b.batch
        && a.offered_rate == b.offered_rate
}

/// Each replog run with spinning waits beside the same configuration with blocking
/// waits: p50, p99 and throughput of both, and which wins on p50.
pub fn spin_pairs(runs: &[RunResult]) -> Vec<String> {
    let mut out = Vec::new();
    for s in runs.iter().filter(|r| r.system == "replog" && r.spin_us > 0) {
        let same = |b: &&RunResult| {
            b.system == s.system
                && b.transport == s.transport
                && b.spin_us == 0
                && b.durability == s.durability
                && same_load(b, s)
        };
        if let Some(b) = runs.iter().find(same) {
            let better = if s.latency.p50_us < b.latency.p50_us { "spinning" } else { "blocking" };
            out.push(format!(
                "{}: spin {} us p50 {} p99 {} {} appends/s | block p50 {} p99 {} {} appends/s | p50 spin/block = {:.2}x: {better} wins",
                b.label(),
                s.spin_us,
                fmt_us(s.latency.p50_us),
                fmt_us(s.latency.p99_us),
                fmt_rate(s.throughput),
                fmt_us(b.latency.p50_us),
                fmt_us(b.latency.p99_us),
                fmt_rate(b.throughput),
                s.latency.p50_us / b.latency.p50_us.max(f64::MIN_POSITIVE)
            ));
        }
    }
    out
}

/// Writes `results.json` and `results.csv` into `dir`.
pub fn write_files(report: &Report, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("results.json"), serde_json::to_string_pretty(report)?)?;
    let mut csv = String::from(
        "system,transport,durability,mode,clients,size,batch,spin_us,offered_rate,duration_s,requests,entries,\
         throughput,request_rate,mb_per_s,p50_us,p90_us,p99_us,p999_us,max_us,mean_us,errors,missed,\
         p50_over_rtt,p50_over_floor,tcp_rtt_p50_us,fdatasync_p50_us,dpdk_rtt_p50_us,dpdk_rtt_busy_p50_us,\
         p50_over_busy_rtt,rdma_rtt_p50_us,rdma_rtt_busy_p50_us\n",
    );
    for r in &report.runs {
        let l = &r.latency;
        let _ = writeln!(
            csv,
            "{},{},{},{},{},{},{},{},{},{:.3},{},{},{:.1},{:.1},{:.3},{:.2},{:.2},{:.2},{:.2},{:.2},{:.2},{},{},{:.3},{:.3},{:.2},{:.2},{},{},{},{},{}",
            r.system,
            r.transport,
            r.durability,
            r.mode,
            r.clients,
            r.size,
            r.batch,
            r.spin_us,
            r.offered_rate.map(|x| format!("{x:.0}")).unwrap_or_default(),
            r.duration_s,
            r.requests,
            r.entries,
            r.throughput,
            r.request_rate,
            r.mb_per_s,
            l.p50_us,
            l.p90_us,
            l.p99_us,
            l.p999_us,
            l.max_us,
            l.mean_us,
            r.errors,
            r.missed,
            r.p50_over_rtt,
            r.p50_over_floor,
            report.baselines.tcp_rtt.p50_us,
            report.baselines.fdatasync.p50_us,
            report.baselines.dpdk_rtt.as_ref().map(|l| format!("{:.2}", l.p50_us)).unwrap_or_default(),
            report.baselines.dpdk_rtt_busy.as_ref().map(|l| format!("{:.2}", l.p50_us)).unwrap_or_default(),
            r.p50_over_busy_rtt.map(|x| format!("{x:.3}")).unwrap_or_default(),
            report.baselines.rdma_rtt.as_ref().map(|l| format!("{:.2}", l.p50_us)).unwrap_or_default(),
            report.baselines.rdma_rtt_busy.as_ref().map(|l| format!("{:.2}", l.p50_us)).unwrap_or_default()
        );
    }
    std::fs::write(dir.join("results.csv"), csv)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lat(p50_us: f64) -> Latency {
        Latency { count: 10, p50_us, ..Latency::default() }
    }

    fn run(transport: &str, durability: &str, p50_us: f64, b: &Baselines) -> RunResult {
        RunResult {
            system: "replog".into(),
            transport: transport.into(),
            durability: durability.into(),
            mode: "closed".into(),
            clients: 1,
            size: 64,
            batch: 1,
            spin_us: 0,
            offered_rate: None,
            duration_s: 1.0,
            requests: 10,
            entries: 10,
            throughput: 10.0,
            request_rate: 10.0,
            mb_per_s: 0.0,
            latency: lat(p50_us),
            errors: 0,
            first_error: None,
            missed: 0,
            p50_over_rtt: p50_us / b.rtt_us(transport),
            p50_over_busy_rtt: b.busy_rtt(transport).map(|l| p50_us / l.p50_us),
            p50_over_floor: p50_us / b.floor_us(transport, durability),
            cdf: vec![(p50_us, 0.5)],
        }
    }

    fn baselines() -> Baselines {
        Baselines {
            tcp_rtt: lat(20.0),
            fdatasync: lat(500.0),
            dpdk_rtt: Some(lat(100.0)),
            dpdk_rtt_cdf: vec![(100.0, 0.5)],
            dpdk_rtt_busy: Some(lat(25.0)),
            rdma_rtt: Some(lat(80.0)),
            rdma_rtt_cdf: vec![(80.0, 0.5)],
            rdma_rtt_busy: Some(lat(40.0)),
            ..Baselines::default()
        }
    }

    #[test]
    fn dpdk_runs_are_judged_against_the_dpdk_round_trip() {
        let b = baselines();
        assert_eq!(b.rtt_us("tcp"), 20.0);
        assert_eq!(b.rtt_us("dpdk"), 100.0);
        // TCP: 2 TCP round trips; DPDK: the client's TCP hop + the replicas' DPDK hop.
        assert_eq!(b.floor_us("tcp", "memory"), 40.0);
        assert_eq!(b.floor_us("dpdk", "memory"), 120.0);
        assert_eq!(b.floor_us("dpdk", "fsync"), 620.0);
        assert_eq!(Baselines { dpdk_rtt: None, ..b.clone() }.rtt_us("dpdk"), 0.0);
        let r = run("dpdk", "memory", 250.0, &b);
        assert_eq!(r.label(), "replog dpdk memory closed c=1 64B b=1");
        let line = r.line(&b);
        assert!(line.contains("p50 / DPDK RTT p50 [100.0us] = 2.5x"), "{line}");
        assert!(line.contains("(TCP RTT + DPDK RTT)"), "{line}");
        assert!(line.contains("p50 / busy-polling DPDK RTT p50 [25.0us] = 10.0x"), "{line}");
        let t = run("tcp", "memory", 50.0, &b);
        assert_eq!(t.label(), "replog memory closed c=1 64B b=1");
        assert!(t.line(&b).contains("p50 / TCP RTT p50 [20.0us] = 2.5x"), "{}", t.line(&b));
        let targets = targets(std::slice::from_ref(&r), &b, &[]);
        assert!(targets.iter().any(|t| t.name.contains("3x DPDK RTT") && t.met == Some(true)), "{targets:?}");
        // Both transports in one run: the latency targets are judged per transport.
        let both = super::targets(&[t, r], &b, &[]);
        let names: Vec<&str> = both.iter().map(|t| t.name.as_str()).collect();
        assert!(names.iter().any(|n| n.contains("3x TCP RTT")) && names.iter().any(|n| n.contains("3x DPDK RTT")));
        assert_eq!(both.len(), 2 + 2 * 2, "{names:?}");
    }

    #[test]
    fn files_carry_the_transport_and_the_dpdk_baselines() {
        let b = baselines();
        let rep = Report {
            date: utc_now(),
            machine: Machine::default(),
            command: "bench --transport dpdk".into(),
            transport: "dpdk".into(),
            etcd_version: None,
            etcd_unavailable: None,
            runs: vec![run("dpdk", "memory", 250.0, &b), run("dpdk", "fsync", 900.0, &b)],
            baselines: b,
            comparisons: vec![],
            targets: vec![],
        };
        let dir = std::env::temp_dir().join(format!("bench-report-test-{}", std::process::id()));
        write_files(&rep, &dir).expect("write");
        let csv = std::fs::read_to_string(dir.join("results.csv")).expect("csv");
        let json = std::fs::read_to_string(dir.join("results.json")).expect("json");
        let plots = crate::plot::write_plots(&rep, &dir).expect("plots");
        let cdf = std::fs::read_to_string(dir.join("latency_cdf.svg")).expect("cdf");
        let _ = std::fs::remove_dir_all(&dir);
        let mut lines = csv.lines();
        let header = lines.next().expect("header");
        assert!(
            header.ends_with(
                "dpdk_rtt_p50_us,dpdk_rtt_busy_p50_us,p50_over_busy_rtt,rdma_rtt_p50_us,rdma_rtt_busy_p50_us"
            ),
            "{header}"
        );
        for l in lines {
            assert!(
                l.starts_with("replog,dpdk,") && l.contains(",100.00,25.00,") && l.ends_with(",80.00,40.00"),
                "{l}"
            );
        }
        assert!(json.contains("\"transport\": \"dpdk\"") && json.contains("\"dpdk_rtt\""), "{json}");
        assert!(!plots.is_empty());
        assert!(cdf.contains("replog dpdk memory") && cdf.contains("DPDK af_packet RTT"), "CDF labels");
    }

    #[test]
    fn rdma_runs_are_judged_against_the_rdma_round_trip() {
        let b = baselines();
        assert_eq!(b.rtt_us("rdma"), 80.0);
        // The client's TCP hop + the replicas' RDMA hop (+ one fdatasync).
        assert_eq!(b.floor_us("rdma", "memory"), 100.0);
        assert_eq!(b.floor_us("rdma", "fsync"), 600.0);
        assert_eq!(Baselines { rdma_rtt: None, ..b.clone() }.rtt_us("rdma"), 0.0);
        let r = run("rdma", "fsync", 1200.0, &b);
        assert_eq!(r.label(), "replog rdma fsync closed c=1 64B b=1");
        let line = r.line(&b);
        assert!(line.contains("p50 / RDMA RTT p50 [80.0us] = 15.0x"), "{line}");
        assert!(line.contains("(TCP RTT + RDMA RTT + fdatasync) p50 [600.0us] = 2.00x"), "{line}");
        assert!(line.contains("p50 / busy-polling RDMA RTT p50 [40.0us] = 30.0x"), "{line}");
        let m = run("rdma", "memory", 200.0, &b);
        let targets = targets(std::slice::from_ref(&m), &b, &[]);
        assert!(targets.iter().any(|t| t.name.contains("3x RDMA RTT") && t.met == Some(true)), "{targets:?}");
    }
}
