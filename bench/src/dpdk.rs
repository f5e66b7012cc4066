//! `bench --transport dpdk`: the replicas' network ([`replog::dpdk_net`] with the
//! [`BENCH`] layout: namespaces `rlbench-<i>` on the bridge `rlbench-br`, the host at
//! 10.77.253.254) and the raw DPDK ping-pong baseline of the same path.
//!
//! The baseline: two processes (this `bench` binary again, subcommand `dpdk-pingpong`),
//! one in replica 1's namespace and one in replica 2's, each opening the transport a
//! replica with the same configuration opens (`replog::server::dpdk_transport`: EAL
//! with `--no-huge`, an af_packet vdev on the namespace's `eth0`, the transport's
//! framing, acknowledgements and idle naps), exchange `size`-byte messages one at a
//! time. The ping side times each round trip (`send` to the echo's arrival) and prints
//! the samples; the parent reads them into a histogram. Measured twice: waiting as a
//! replica waits (`poll` with a timeout: the transport spins while frames come, then
//! naps from 10 us up, as af_packet has no rx interrupt), and busy-polling (`poll` with
//! a zero timeout in a loop, both sides: the path's floor without the naps).

pub use crate::pingpong::Role;
use crate::pingpong::{collect, Guard};
use crate::proc::{spawn_tied, TempDir};
use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use replog::config::{DurabilityKind, ServeConfig};
pub use replog::dpdk_net::{DpdkNet, BENCH};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// What keeps `bench --transport dpdk` from running here, if anything.
pub fn missing_prerequisite() -> Option<String> {
    if !cfg!(feature = "dpdk") {
        return Some(
            "this bench was built without its `dpdk` feature: \
             cargo build --release -p replog -p bench --features bench/dpdk"
                .into(),
        );
    }
    replog::dpdk_net::missing_prerequisite()
}

/// Creates the network for `n` replicas (after deleting a previous run's leftovers);
/// deleted when dropped.
pub fn create_net(n: usize) -> Result<DpdkNet> {
    if let Some(why) = missing_prerequisite() {
        bail!("bench --transport dpdk: {why}");
    }
    Ok(DpdkNet::create(BENCH, n)?)
}

/// The raw DPDK round trip of `size`-byte messages between replica 1's and replica 2's
/// namespaces of `net`: `iters` timed after `warmup` untimed, stopping early after
/// `max_time`. `bench` is this program (run again in the namespaces); `dir` holds the
/// two processes' configurations. `busy`: both sides busy-poll instead of napping.
#[allow(clippy::too_many_arguments)]
pub fn rtt(
    net: &DpdkNet,
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
    let tmp = TempDir::new(dir, "dpdk-pingpong")?;
    // A two-member "cluster" on the replicas' network, with their EAL settings (file
    // prefixes of their own, so nothing of the replicas' runtime state is shared).
    let mut cfgs = ServeConfig::local_cluster(2, 7000, tmp.path(), DurabilityKind::Memory);
    net.configure_with_prefix(&mut cfgs, "-pp");
    let mut paths = Vec::new();
    for c in &cfgs {
        c.validate().context("ping-pong configuration")?;
        let p = tmp.path().join(format!("pingpong-{}.toml", c.id));
        std::fs::write(&p, c.to_toml()).with_context(|| format!("writing {}", p.display()))?;
        paths.push(p);
    }
    let spawn = |id: u64, role: &str, out: Stdio| -> Result<std::process::Child> {
        let w = net.wrapper(id);
        let log = std::fs::File::create(tmp.path().join(format!("pingpong-{id}.log")))?;
        spawn_tied(
            Command::new(&w[0])
                .args(&w[1..])
                .arg(bench)
                .args(["dpdk-pingpong", "--role", role, "--peer"])
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
        .with_context(|| format!("starting {} dpdk-pingpong in {}", bench.display(), net.layout().ns(id)))
    };
    // Killed (SIGTERM, then SIGKILL) when this function returns, whatever happened.
    let echo = Guard(spawn(2, "echo", Stdio::null())?);
    let ping = Guard(spawn(1, "ping", Stdio::piped())?);
    collect(ping, echo, tmp.path())
}

/// The `dpdk-pingpong` process (run inside a namespace by [`rtt`]).
#[cfg(feature = "dpdk")]
pub fn pingpong(a: &crate::pingpong::Args) -> Result<()> {
    let crate::pingpong::Args { role, ref config, peer, size, iters, warmup, max_ms, busy } = *a;
    let max_time = Duration::from_millis(max_ms);
    use crate::pingpong::SAMPLE;
    use bytes::Bytes;
    use std::io::Write;
    use std::time::Instant;
    use transport::{Event, Transport};
    let cfg = ServeConfig::load(config)?;
    let mut t = replog::server::dpdk_transport(&cfg).context("opening the DPDK transport")?;
    let mut events: Vec<Event> = Vec::new();
    // Message kinds: the first byte (1 = ping, 2 = bye).
    const PING: u8 = 1;
    const BYE: u8 = 2;
    match role {
        Role::Echo => {
            // Until the ping side says bye (or it is time to give up). No wait for the
            // link first: the first ping may arrive in the same poll as the link's PeerUp.
            let end = Instant::now() + max_time + Duration::from_secs(30);
            let mut bye = false;
            while !bye && Instant::now() < end && !crate::proc::stopped() {
                events.clear();
                t.poll(&mut events, Some(if busy { Duration::ZERO } else { Duration::from_millis(100) }))?;
                for e in events.drain(..) {
                    if let Event::Message { from, payload } = e {
                        if payload.first() == Some(&BYE) {
                            bye = true;
                        } else {
                            t.send(from, &payload).map_err(|e| anyhow::anyhow!("echo to {from}: {e}"))?;
                        }
                    }
                }
            }
            // Let the last acknowledgements go out before the port closes.
            crate::pingpong::linger(&mut t)?;
        }
        Role::Ping => {
            // The link comes up after the handshake (HELLOs every 50 ms until the peer
            // answers); only then is a message sure to be delivered.
            let up_by = Instant::now() + Duration::from_secs(30);
            let mut up = false;
            while !up && Instant::now() < up_by && !crate::proc::stopped() {
                events.clear();
                t.poll(&mut events, Some(Duration::from_millis(50)))?;
                up = events.iter().any(|e| matches!(e, Event::PeerUp { peer: p } if *p == peer));
            }
            if !up {
                bail!("the link to {peer} did not come up within 30 s");
            }
            let mut msg = vec![0x5Au8; size.max(1)];
            msg[0] = PING;
            let msg = Bytes::from(msg);
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let end = Instant::now() + max_time;
            for i in 0..warmup + iters {
                let t0 = Instant::now();
                t.send(peer, &msg).map_err(|e| anyhow::anyhow!("ping to {peer}: {e}"))?;
                let give_up = t0 + Duration::from_secs(2);
                let mut back = false;
                while !back {
                    let now = Instant::now();
                    if now >= give_up {
                        bail!("round trip {i}: no echo within 2 s");
                    }
                    events.clear();
                    t.poll(&mut events, Some(if busy { Duration::ZERO } else { give_up - now }))?;
                    back = events.iter().any(|e| matches!(e, Event::Message { from, payload } if *from == peer && payload.len() == msg.len()));
                }
                let took = t0.elapsed();
                if i >= warmup {
                    writeln!(out, "{SAMPLE}{}", took.as_nanos())?;
                }
                if t0 >= end || crate::proc::stopped() {
                    break;
                }
            }
            out.flush()?;
            t.send(peer, &[BYE]).map_err(|e| anyhow::anyhow!("bye to {peer}: {e}"))?;
            crate::pingpong::linger(&mut t)?;
        }
    }
    drop(t);
    Ok(())
}

/// Without the `dpdk` feature there is no DPDK transport to measure.
#[cfg(not(feature = "dpdk"))]
pub fn pingpong(_: &crate::pingpong::Args) -> Result<()> {
    bail!("{}", missing_prerequisite().unwrap_or_default())
}
