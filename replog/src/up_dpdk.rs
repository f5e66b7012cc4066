//! `replog up --transport dpdk`: the network for a local cluster over the DPDK
//! transport. Replica `i` (1-based) runs in network namespace `replog-up-<i>`, whose
//! `eth0` (MAC `02:00:00:77:ff:<i>`, address `10.77.255.<i>/24`, MTU 1500) is one end
//! of a veth pair; the other end, `replog-up-v<i>`, is a port of the bridge
//! `replog-up-br` in the host's namespace, which holds `10.77.255.254/24`, so clients on
//! the host reach every replica's client port. The replica's DPDK port is an af_packet
//! vdev on its `eth0` (`--no-huge`, `--no-shconf`, a file prefix per replica), as in
//! `tests/process_dpdk.rs` and `hw-setup/dpdk.md`.
//!
//! Everything is deleted when [`UpNet`] drops (after the replicas stopped); leftovers of
//! a previous run (killed by SIGKILL, say) are deleted before a new one starts. A lock
//! file (`/run/replog-up-dpdk.lock`) keeps two such clusters from running at once.

use anyhow::{bail, Context, Result};
use replog::config::{DpdkMember, DpdkSection, Member, ServeConfig, TransportKind};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};

/// Namespace names start with this (`replog-up-1`, ...).
pub const NS_PREFIX: &str = "replog-up-";
/// The bridge in the host's namespace.
pub const BRIDGE: &str = "replog-up-br";
/// The host's address on the bridge.
pub const HOST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 255, 254);
const LOCK_FILE: &str = "/run/replog-up-dpdk.lock";
/// The most replicas the /24 holds (254 is the host's).
pub const MAX_NODES: usize = 250;

/// Replica `i`'s address.
pub fn addr(i: u64) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 255, i as u8)
}

/// Replica `i`'s MAC.
pub fn mac(i: u64) -> String {
    format!("02:00:00:77:ff:{i:02x}")
}

/// Replica `i`'s namespace.
pub fn ns(i: u64) -> String {
    format!("{NS_PREFIX}{i}")
}

fn veth(i: u64) -> String {
    format!("{NS_PREFIX}v{i}")
}

/// What this machine (or this build) lacks to run the cluster, if anything.
pub fn missing_prerequisite() -> Option<String> {
    if !cfg!(feature = "dpdk") {
        return Some(
            "this replog was built without the `dpdk` feature: cargo build --release -p replog --features dpdk".into(),
        );
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("it creates network namespaces, veth pairs and a bridge: run it as root".into());
    }
    match Command::new("ip").arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status() {
        Ok(s) if s.success() => {}
        _ => return Some("the `ip` command (iproute2) is missing: apt-get install iproute2".into()),
    }
    #[cfg(feature = "dpdk")]
    {
        let dir = transport::dpdk::pmd_dir();
        let has = |prefix: &str| {
            std::fs::read_dir(dir)
                .map(|d| d.filter_map(Result::ok).any(|e| e.file_name().to_string_lossy().starts_with(prefix)))
                .unwrap_or(false)
        };
        if !has("librte_net_af_packet.so") || !has("librte_bus_vdev.so") {
            return Some(format!("DPDK's af_packet PMD or vdev bus is missing from {dir} (apt-get install dpdk)"));
        }
    }
    None
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().with_context(|| format!("running ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn quiet(args: &[&str]) {
    let _ = Command::new("ip").args(args).stdout(Stdio::null()).stderr(Stdio::null()).status();
}

/// Deletes every `replog-up-*` namespace (killing what runs inside), the bridge and
/// EAL's runtime directories of a previous run.
pub fn clean_up() {
    let names: Vec<String> = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .filter(|n| n.starts_with(NS_PREFIX))
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    for n in &names {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", n]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<libc::pid_t>() {
                    // SAFETY: plain kill(2).
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
        }
        quiet(&["netns", "del", n]);
    }
    quiet(&["link", "del", BRIDGE]);
    for base in ["/var/run/dpdk", "/tmp/dpdk"] {
        if let Ok(d) = std::fs::read_dir(base) {
            for e in d.filter_map(Result::ok) {
                if e.file_name().to_string_lossy().starts_with(NS_PREFIX) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
}

/// The namespaces, veth pairs and bridge of a running cluster; deleted on drop.
pub struct UpNet {
    _lock: std::fs::File,
}

impl UpNet {
    /// Creates the network for replicas `1..=n` (after deleting a previous run's).
    pub fn create(n: usize) -> Result<UpNet> {
        if let Some(why) = missing_prerequisite() {
            bail!("replog up --transport dpdk: {why}");
        }
        if n > MAX_NODES {
            bail!("--nodes {n}: at most {MAX_NODES} replicas with --transport dpdk");
        }
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_FILE)
            .with_context(|| format!("opening {LOCK_FILE}"))?;
        use std::os::fd::AsRawFd;
        // SAFETY: flock(2) on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            bail!("another `replog up --transport dpdk` is running (it holds {LOCK_FILE}); stop it first");
        }
        clean_up();
        let net = UpNet { _lock: lock };
        net.build(n).context("creating the namespaces for replog up --transport dpdk")?;
        Ok(net)
    }

    fn build(&self, n: usize) -> Result<()> {
        ip(&["link", "add", BRIDGE, "type", "bridge", "stp_state", "0", "forward_delay", "0"])?;
        ip(&["addr", "add", &format!("{HOST_ADDR}/24"), "dev", BRIDGE])?;
        ip(&["link", "set", BRIDGE, "up"])?;
        for i in 1..=n as u64 {
            let ns = ns(i);
            let v = veth(i);
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            #[rustfmt::skip]
            ip(&["link", "add", &v, "mtu", "1500", "type", "veth", "peer", "name", "eth0", "netns", &ns,
                 "address", &mac(i), "mtu", "1500"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", addr(i)), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["link", "set", &v, "master", BRIDGE])?;
            ip(&["link", "set", &v, "up"])?;
        }
        Ok(())
    }

    /// Puts the members on the namespaces' addresses (same ports) and gives each
    /// replica its `[dpdk]` section.
    pub fn configure(&self, cfgs: &mut [ServeConfig]) {
        let on = |a: SocketAddr, i: u64| SocketAddr::from((addr(i), a.port()));
        let members: Vec<Member> = cfgs[0]
            .members
            .iter()
            .map(|m| Member {
                id: m.id,
                peer_addr: on(m.peer_addr, m.id),
                client_addr: on(m.client_addr, m.id),
                metrics_addr: m.metrics_addr.map(|a| on(a, m.id)),
                learner: m.learner,
            })
            .collect();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        for (k, c) in cfgs.iter_mut().enumerate() {
            c.members = members.clone();
            c.transport = TransportKind::Dpdk;
            c.dpdk = Some(DpdkSection {
                port: "net_af_packet0".into(),
                lcores: Some(format!("0@{}", k % cpus)),
                memory_mb: Some(256),
                no_huge: true,
                in_memory: false,
                no_shconf: true,
                file_prefix: Some(ns(c.id)),
                vdevs: vec!["net_af_packet0,iface=eth0".into()],
                pci: vec![],
                eal_args: vec!["--log-level=lib.eal:notice".into()],
                mtu: 1500,
                mbufs: 8191,
                drop_probability: 0.0,
                members: members.iter().map(|m| DpdkMember { id: m.id, mac: mac(m.id) }).collect(),
            });
        }
    }

    /// The command prefix that runs a program in replica `id`'s namespace.
    pub fn wrapper(&self, id: u64) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), ns(id)]
    }
}

impl Drop for UpNet {
    fn drop(&mut self) {
        clean_up();
    }
}
