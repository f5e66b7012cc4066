//! What the raw ping-pong baselines of the replicas' transports share ([`crate::dpdk`],
//! [`crate::rdma`]): two processes (this `bench` binary again, a hidden subcommand), an
//! echo and a ping that times round trips and prints one [`SAMPLE`] line per round trip;
//! the parent reads the samples into a histogram and stops both processes.

use crate::proc::stop;
use crate::stats::new_hist;
use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

/// The ping side's output line prefix of one round trip, in nanoseconds.
pub const SAMPLE: &str = "rtt_ns ";

/// The role of a ping-pong process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Times round trips and prints them.
    Ping,
    /// Sends every message back.
    Echo,
}

/// One side of a raw ping-pong baseline: the hidden subcommands' arguments, and what
/// [`crate::dpdk::pingpong`] and [`crate::rdma::pingpong`] take.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// ping (times round trips, prints `rtt_ns N` lines) or echo.
    #[arg(long, value_enum)]
    pub role: Role,
    /// A replica configuration whose transport is opened (DPDK: with a `[dpdk]`
    /// section; RDMA: with transport = "rdma").
    #[arg(long)]
    pub config: std::path::PathBuf,
    /// The other side's member id.
    #[arg(long)]
    pub peer: u64,
    /// Message bytes (RDMA: 16..=256).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Timed round trips.
    #[arg(long, default_value_t = 10_000)]
    pub iters: usize,
    /// Untimed round trips first.
    #[arg(long, default_value_t = 1_000)]
    pub warmup: usize,
    /// Stop after this many milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub max_ms: u64,
    /// Busy-poll (poll with a zero timeout) instead of waiting as a replica does.
    #[arg(long)]
    pub busy: bool,
}

/// Polls `t` for 50 ms (10 ms at a time), dropping whatever arrives, so that what was
/// sent last (the echo's last answers, the ping's bye) leaves before the transport is
/// closed. A poll's failure ends it.
pub fn linger(t: &mut impl transport::Transport) -> std::io::Result<()> {
    let mut events = Vec::new();
    let until = Instant::now() + Duration::from_millis(50);
    while Instant::now() < until {
        events.clear();
        t.poll(&mut events, Some(Duration::from_millis(10)))?;
    }
    Ok(())
}

/// A child process stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        stop(&mut self.0, Duration::from_secs(3));
    }
}

/// The last lines of `dir/pingpong-<id>.log` (the side with member id `id`).
pub fn log_tail(dir: &Path, id: u64) -> String {
    let text = std::fs::read_to_string(dir.join(format!("pingpong-{id}.log"))).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Reads the samples `ping` (member 1, stdout piped) prints until it exits, then stops
/// `echo` (member 2); fails with their logs (in `dir`) if the ping side failed, did not
/// exit within 10 s of closing its output, or printed no (or unreadable) samples. The
/// ping side bounds its own run and closes its stdout when it exits.
pub fn collect(mut ping: Guard, mut echo: Guard, dir: &Path) -> Result<Histogram<u64>> {
    let out = ping.0.stdout.take().context("the ping process's stdout")?;
    let mut h = new_hist();
    let mut bad = 0usize;
    for line in BufReader::new(out).lines() {
        let line = line.context("reading the ping process's output")?;
        if let Some(v) = line.strip_prefix(SAMPLE) {
            match v.trim().parse::<u64>() {
                Ok(ns) => crate::stats::record(&mut h, Duration::from_nanos(ns)),
                Err(_) => bad += 1,
            }
        }
    }
    // The ping side exits after its last sample (or on an error, with a message).
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = ping.0.try_wait()? {
            break Some(s);
        }
        if t0.elapsed() > Duration::from_secs(10) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    match status {
        Some(s) if s.success() => {}
        Some(s) => {
            bail!("the ping side exited ({s}); its log:\n{}\necho's log:\n{}", log_tail(dir, 1), log_tail(dir, 2))
        }
        None => bail!("the ping side did not exit 10 s after its output ended; its log:\n{}", log_tail(dir, 1)),
    }
    stop(&mut echo.0, Duration::from_secs(3));
    if bad > 0 || h.is_empty() {
        bail!("the ping side printed {} samples ({bad} unreadable); its log:\n{}", h.len(), log_tail(dir, 1));
    }
    Ok(h)
}
