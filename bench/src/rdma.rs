//! `bench --transport rdma`: the replicas over RDMA on the device found here ([`RdmaNet`]:
//! its name, GID index and the address of the side channels) and the raw RDMA ping-pong
//! baseline of the replicas' own path.
//!
//! The baseline: two processes (this `bench` binary again, subcommand `rdma-pingpong`),
//! each opening `transport::rdma::RdmaTransport` with the configuration a replica opens
//! it with (`replog::rdma_agent::transport_config`: the same device, log region,
//! staging, acknowledgement areas and queue pairs), exchange `size`-byte one-sided RDMA
//! WRITEs the way a leader and a follower exchange a cell and its acknowledgement:
//!
//! 1. ping: `Transport::write` of `size` bytes at offset 0 of the echo's **log region**
//!    (on the log queue pair, which the echo granted write permission), posted at once
//!    (`send_queued`);
//! 2. echo: its CPU polls its own log region until the bytes have landed (a sequence
//!    number in the first and in the last aligned word), then `write_ack`s `size` bytes
//!    into the ping's **acknowledgement area** for it (on the acknowledgement queue pair,
//!    as a follower's acknowledgement record goes);
//! 3. ping: its CPU polls its own acknowledgement area until the echo's bytes have landed.
//!
//! What is timed, per round trip: from the ping's `write` call to the moment the ping's
//! CPU reads the echo's reply in its own memory, i.e. two one-sided RDMA WRITEs each
//! observed by the target's CPU polling memory. Neither side waits for its own write's
//! completion (the CQ is drained by `poll` on the way). No consensus, no store, no
//! checksum: the floor of one replication hop over this transport.
//!
//! Measured twice: waiting as a replica waits (between looks at memory, `poll` with
//! `replog::rdma_agent::SCAN_SLICE` (200 us) as its timeout: the transport busy-polls
//! its completion queue for 50 us while a write is in flight and otherwise sleeps until
//! the slice ends, as the replicas' agent does with `spin_us = 0`), and busy-polling
//! (`poll` with a zero timeout between looks, both sides: the path's floor). `size` is
//! at most 256 B (`transport::rdma::ACK_MAX_WRITE`) because the reply travels on the
//! acknowledgement path.

pub use crate::pingpong::Role;
use crate::pingpong::{collect, Guard};
use crate::proc::{free_ports, spawn_tied, TempDir};
use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use replog::config::{DurabilityKind, ServeConfig, TransportKind};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The log region the replicas (and the ping-pong) register: 32 MiB, as `replog up
/// --transport rdma` (three replicas on one host share one device; keep pinned memory small).
pub const REGION_BYTES: u64 = 32 << 20;

/// The largest ping-pong message (the reply goes on the acknowledgement path, whose
/// writes carry at most 256 bytes).
pub const MAX_SIZE: usize = 256;

/// Where the replicas' RDMA runs: the device and GID index, and the address their side
/// channels listen on.
#[derive(Clone, Debug)]
pub struct RdmaNet {
    /// The RDMA device (e.g. `rxe0`).
    pub device: String,
    /// Its GID index (1 on soft-RoCE: the IPv4-mapped GID of the interface).
    pub gid_index: u8,
    /// The side channels' address (`RXE_IP` in the soft-RoCE VM, else 127.0.0.1).
    pub side_ip: IpAddr,
    /// The replicas' `[rdma] landing` (default auto).
    pub landing: replog::config::LandingKind,
}

impl RdmaNet {
    /// Finds the RDMA device: `RXE_DEV` and `RXE_GID_INDEX` when set (the soft-RoCE VM
    /// sets them), else the first device with an active port 1 and GID index 1; fails
    /// with what is missing when there is none.
    pub fn detect() -> Result<RdmaNet> {
        if let Some(why) = missing_prerequisite() {
            bail!("bench --transport rdma: {why}");
        }
        let device = match std::env::var("RXE_DEV") {
            Ok(d) if !d.is_empty() => d,
            _ => probe()?,
        };
        let gid_index = match std::env::var("RXE_GID_INDEX") {
            Ok(g) => g.trim().parse().with_context(|| format!("RXE_GID_INDEX={g:?} is not a GID index"))?,
            Err(_) => 1,
        };
        let side_ip = match std::env::var("RXE_IP") {
            Ok(ip) => ip.trim().parse().with_context(|| format!("RXE_IP={ip:?} is not an IP address"))?,
            Err(_) => IpAddr::from([127, 0, 0, 1]),
        };
        Ok(RdmaNet { device, gid_index, side_ip, landing: replog::config::LandingKind::Auto })
    }

    /// Makes `cfgs` (from [`ServeConfig::local_cluster`]) replicas over RDMA on this
    /// device: `transport = "rdma"`, the `[rdma]` device, GID index and region size, and
    /// the side channels on [`RdmaNet::side_ip`] (same ports).
    pub fn configure(&self, cfgs: &mut [ServeConfig]) {
        for c in cfgs.iter_mut() {
            c.transport = TransportKind::Rdma;
            c.rdma.device = self.device.clone();
            c.rdma.gid_index = self.gid_index;
            c.rdma.region_bytes = REGION_BYTES;
            c.rdma.landing = self.landing;
            for m in &mut c.members {
                m.peer_addr = SocketAddr::new(self.side_ip, m.peer_addr.port());
            }
        }
    }

    /// One line for the report: `rxe0 (GID index 1), side channels on 10.77.0.1`.
    pub fn describe(&self) -> String {
        format!("{} (GID index {}), side channels on {}", self.device, self.gid_index, self.side_ip)
    }
}

/// What keeps `bench --transport rdma` from running here, if anything (the build; the
/// device is checked by [`RdmaNet::detect`]).
pub fn missing_prerequisite() -> Option<String> {
    if !cfg!(feature = "rdma") {
        return Some(
            "this bench was built without its `rdma` feature: \
             cargo build --release -p replog -p bench --features bench/rdma"
                .into(),
        );
    }
    None
}

#[cfg(feature = "rdma")]
fn probe() -> Result<String> {
    transport::rdma::probe_device().map_err(|e| {
        // e: "no usable RDMA device: <what ibv_get_device_list or the port said>".
        anyhow::anyhow!(
            "{e}: run inside the soft-RoCE VM (hw-setup/rxe-vm.sh run -- bench --transport rdma ...) \
             or on a host with an RDMA NIC whose port 1 is active"
        )
    })
}

#[cfg(not(feature = "rdma"))]
fn probe() -> Result<String> {
    bail!("{}", missing_prerequisite().unwrap_or_default())
}

/// The raw RDMA round trip of `size`-byte one-sided writes between two processes on
/// `net`'s device (see the module documentation for what is timed): `iters` timed after
/// `warmup` untimed, stopping early after `max_time`. `bench` is this program; `dir`
/// holds the two processes' configurations and logs. `busy`: both sides busy-poll.
#[allow(clippy::too_many_arguments)]
pub fn rtt(
    net: &RdmaNet,
    bench: &Path,
    dir: &Path,
    size: usize,
    iters: usize,
    warmup: usize,
    max_time: Duration,
    busy: bool,
) -> Result<Histogram<u64>> {
    if crate::proc::stopped() {
        bail!("stopped by a signal");
    }
    check_size(size)?;
    let tmp = TempDir::new(dir, "rdma-pingpong")?;
    // A two-member "cluster" configured as the replicas are.
    let base = free_ports(3 * 2 + 3)?;
    let mut cfgs = ServeConfig::local_cluster(2, base, tmp.path(), DurabilityKind::Memory);
    net.configure(&mut cfgs);
    let mut paths = Vec::new();
    for c in &cfgs {
        c.validate().context("ping-pong configuration")?;
        let p = tmp.path().join(format!("pingpong-{}.toml", c.id));
        std::fs::write(&p, c.to_toml()).with_context(|| format!("writing {}", p.display()))?;
        paths.push(p);
    }
    let spawn = |id: u64, role: &str, out: Stdio| -> Result<std::process::Child> {
        let log = std::fs::File::create(tmp.path().join(format!("pingpong-{id}.log")))?;
        spawn_tied(
            Command::new(bench)
                .args(["rdma-pingpong", "--role", role, "--peer"])
                .arg(if id == 1 { "2" } else { "1" })
                .arg("--config")
                .arg(&paths[id as usize - 1])
                .args(["--size", &size.to_string(), "--iters", &iters.to_string()])
                .args(["--warmup", &warmup.to_string(), "--max-ms", &max_time.as_millis().to_string()])
                .args(if busy { &["--busy"][..] } else { &[][..] })
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(log),
        )
        .with_context(|| format!("starting {} rdma-pingpong --role {role}", bench.display()))
    };
    // Killed (SIGTERM, then SIGKILL) when this function returns, whatever happened.
    let echo = Guard(spawn(2, "echo", Stdio::null())?);
    let ping = Guard(spawn(1, "ping", Stdio::piped())?);
    collect(ping, echo, tmp.path())
}

/// The sequence number that tells the echo to stop.
#[cfg_attr(not(feature = "rdma"), allow(dead_code))] // used by the ping-pong process
const BYE: u64 = u64::MAX;

/// A `size`-byte message carrying `seq` in its first and its last aligned word.
#[cfg_attr(not(feature = "rdma"), allow(dead_code))] // used by the ping-pong process
fn message(size: usize, seq: u64) -> Vec<u8> {
    let mut m = vec![0x5Au8; size];
    let tail = tail_offset(size);
    m[..8].copy_from_slice(&seq.to_le_bytes());
    m[tail..tail + 8].copy_from_slice(&seq.to_le_bytes());
    m
}

/// The offset of the last 8-byte-aligned word of a `size`-byte message (`size` >= 16).
#[cfg_attr(not(feature = "rdma"), allow(dead_code))] // used by the ping-pong process
fn tail_offset(size: usize) -> usize {
    (size - 8) & !7
}

/// Checks a ping-pong message size.
fn check_size(size: usize) -> Result<()> {
    if !(16..=MAX_SIZE).contains(&size) {
        bail!("rdma ping-pong size {size} outside 16..={MAX_SIZE} B (the reply is one acknowledgement-path write)");
    }
    Ok(())
}

/// Where the echo's reply lands in the ping's acknowledgement area for it: past the
/// area's header (its first word is the owner's heartbeat counter).
#[cfg_attr(not(feature = "rdma"), allow(dead_code))] // used by the ping-pong process
const REPLY_OFFSET: u64 = 64;

/// The `rdma-pingpong` process (run twice by [`rtt`]).
#[cfg(feature = "rdma")]
pub fn pingpong(a: &crate::pingpong::Args) -> Result<()> {
    let crate::pingpong::Args { role, ref config, peer, size, iters, warmup, max_ms, busy } = *a;
    let max_time = Duration::from_millis(max_ms);
    use crate::pingpong::SAMPLE;
    use std::io::Write;
    use std::time::Instant;
    use transport::rdma::RdmaTransport;
    use transport::{Event, Transport};
    check_size(size)?;
    let cfg = ServeConfig::load(config)?;
    let rc = replog::rdma_agent::transport_config(&cfg).context("the replica's RDMA transport configuration")?;
    let mut t = RdmaTransport::open(rc).context("opening the RDMA transport")?;
    // The ping writes into the echo's log region: the echo grants it permission, as a
    // follower grants its leader.
    if role == Role::Echo {
        t.grant(peer);
    }
    let wait = if busy { Duration::ZERO } else { replog::rdma_agent::SCAN_SLICE };
    let mut events: Vec<Event> = Vec::new();
    // Any failure of the link or of a write ends the run (a baseline with a broken link
    // measures nothing).
    let check = |events: &[Event]| -> Result<()> {
        for e in events {
            match e {
                Event::PeerDown { peer: p, reason } if *p == peer => bail!("the link to {peer} failed: {reason}"),
                Event::WriteDone { to, result: Err(e), .. } if *to == peer => bail!("a write to {peer} failed: {e}"),
                _ => {}
            }
        }
        Ok(())
    };
    // Both sides: the link (queue pairs and the acknowledgement path) comes up after the
    // side channel's handshake.
    let up_by = Instant::now() + Duration::from_secs(30);
    while t.peer_ack_area_len(peer).is_none() {
        if Instant::now() >= up_by || crate::proc::stopped() {
            bail!("the RDMA link to {peer} did not come up within 30 s");
        }
        events.clear();
        t.poll(&mut events, Some(Duration::from_millis(20)))?;
    }
    let area = t.peer_ack_area_len(peer).unwrap_or(0);
    if REPLY_OFFSET + size as u64 > area {
        bail!("{size} B do not fit the peer's acknowledgement area ({area} B from offset {REPLY_OFFSET})");
    }
    let tail = tail_offset(size) as u64;
    match role {
        Role::Echo => {
            let end = Instant::now() + max_time + Duration::from_secs(30);
            let mut last = 0u64;
            loop {
                if Instant::now() >= end || crate::proc::stopped() {
                    bail!("no bye from the ping side within the run's time bound");
                }
                let seq = t.load_u64(tail)?;
                if seq != last && t.load_u64(0)? == seq {
                    if seq == BYE {
                        break;
                    }
                    last = seq;
                    t.write_ack(peer, REPLY_OFFSET, &message(size, seq))
                        .map_err(|e| anyhow::anyhow!("reply {seq} to {peer}: {e}"))?;
                    continue;
                }
                events.clear();
                t.poll(&mut events, Some(wait))?;
                check(&events)?;
            }
        }
        Role::Ping => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let end = Instant::now() + max_time;
            for i in 0..(warmup + iters) as u64 {
                let seq = i + 1;
                let msg = message(size, seq);
                let t0 = Instant::now();
                t.write(peer, 0, &msg).map_err(|e| anyhow::anyhow!("write {seq} to {peer}: {e}"))?;
                t.send_queued();
                let give_up = t0 + Duration::from_secs(2);
                loop {
                    if t.load_ack_u64(peer, REPLY_OFFSET + tail)? == seq && t.load_ack_u64(peer, REPLY_OFFSET)? == seq {
                        break;
                    }
                    if Instant::now() >= give_up {
                        bail!("round trip {seq}: no reply within 2 s");
                    }
                    events.clear();
                    t.poll(&mut events, Some(wait))?;
                    check(&events)?;
                }
                let took = t0.elapsed();
                if i >= warmup as u64 {
                    writeln!(out, "{SAMPLE}{}", took.as_nanos())?;
                }
                if t0 >= end || crate::proc::stopped() {
                    break;
                }
            }
            out.flush()?;
            // Tell the echo to stop, and let the write leave before the queue pair closes.
            t.write(peer, 0, &message(size, BYE)).map_err(|e| anyhow::anyhow!("bye to {peer}: {e}"))?;
            t.send_queued();
            crate::pingpong::linger(&mut t)?;
        }
    }
    drop(t);
    Ok(())
}

/// Without the `rdma` feature there is no RDMA transport to measure.
#[cfg(not(feature = "rdma"))]
pub fn pingpong(_: &crate::pingpong::Args) -> Result<()> {
    bail!("{}", missing_prerequisite().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_their_sequence_number_at_both_ends() {
        for size in [16, 64, 100, 256] {
            let m = message(size, 42);
            assert_eq!(m.len(), size);
            let tail = tail_offset(size);
            assert!(tail.is_multiple_of(8) && tail + 8 <= size && tail >= 8, "size {size}: tail {tail}");
            assert_eq!(m[..8], 42u64.to_le_bytes());
            assert_eq!(m[tail..tail + 8], 42u64.to_le_bytes());
        }
        assert!(check_size(64).is_ok());
        assert!(check_size(8).is_err() && check_size(MAX_SIZE + 1).is_err());
    }

    #[test]
    fn configured_replicas_use_rdma_on_the_device_and_side_address() {
        let net = RdmaNet {
            device: "rxe0".into(),
            gid_index: 1,
            side_ip: [10, 77, 0, 1].into(),
            landing: Default::default(),
        };
        let mut cfgs = ServeConfig::local_cluster(3, 7100, Path::new("/tmp/x"), DurabilityKind::Memory);
        net.configure(&mut cfgs);
        for c in &cfgs {
            assert_eq!(c.transport, TransportKind::Rdma);
            assert_eq!(c.rdma.device, "rxe0");
            assert_eq!(c.rdma.region_bytes, REGION_BYTES);
            assert!(c.members.iter().all(|m| m.peer_addr.ip() == net.side_ip));
            // Clients still reach the replicas on loopback.
            assert!(c.members.iter().all(|m| m.client_addr.ip() == IpAddr::from([127, 0, 0, 1])));
        }
    }
}
