//! The network of a local cluster over the DPDK transport, as `replog up --transport
//! dpdk` and `bench --transport dpdk` build it: replica `i` (1-based) runs in its own
//! network namespace, whose `eth0` (a MAC and a /24 address of the [`Layout`], MTU 1500)
//! is one end of a veth pair; the other end is a port of a bridge in the host's
//! namespace, which holds the layout's host address (`.254`), so clients on the host
//! reach every replica's client port. The replica's DPDK port is an af_packet vdev on
//! its `eth0` (`--no-huge`, `--no-shconf`, a file prefix per replica), as in
//! `tests/process_dpdk.rs` and `hw-setup/dpdk.md`.
//!
//! [`UP`] is `replog up`'s layout (namespaces `replog-up-<i>`, bridge `replog-up-br`,
//! 10.77.255.0/24, MACs `02:00:00:77:ff:<i>`); [`BENCH`] the benchmark's
//! (`rlbench-<i>`, `rlbench-br`, 10.77.253.0/24, `02:00:00:77:fd:<i>`): different
//! names, subnets and lock files, so one does not delete the other's network.
//!
//! Everything is deleted when [`DpdkNet`] drops (after the replicas stopped); leftovers
//! of a previous run of the same layout (killed by SIGKILL, say) are deleted before a
//! new one starts. A lock file per layout keeps two such networks from existing at once.

use crate::config::{DpdkMember, DpdkSection, Member, ServeConfig, TransportKind};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};

/// Names, addresses and the lock file of one kind of local DPDK cluster network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// What builds it, for messages (`replog up --transport dpdk`).
    pub what: &'static str,
    /// Namespace names start with this (`<prefix>1`, ...); veths are `<prefix>v<i>`.
    /// At most 10 characters (interface names are limited to 15).
    pub prefix: &'static str,
    /// The bridge in the host's namespace.
    pub bridge: &'static str,
    /// The first three bytes of the /24 (replica `i` is `.i`, the host `.254`).
    pub subnet: [u8; 3],
    /// The fifth byte of the replicas' MACs (`02:00:00:77:<this>:<i>`).
    pub mac_byte: u8,
    /// The lock file held while the network exists.
    pub lock_file: &'static str,
}

/// `replog up --transport dpdk`.
pub const UP: Layout = Layout {
    what: "replog up --transport dpdk",
    prefix: "replog-up-",
    bridge: "replog-up-br",
    subnet: [10, 77, 255],
    mac_byte: 0xff,
    lock_file: "/run/replog-up-dpdk.lock",
};

/// `bench --transport dpdk`.
pub const BENCH: Layout = Layout {
    what: "bench --transport dpdk",
    prefix: "rlbench-",
    bridge: "rlbench-br",
    subnet: [10, 77, 253],
    mac_byte: 0xfd,
    lock_file: "/run/replog-bench-dpdk.lock",
};

/// The most replicas a /24 holds (254 is the host's).
pub const MAX_NODES: usize = 250;

/// Why the network could not be built.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The machine or this build lacks something (the message says what).
    #[error("{what}: {why}")]
    Missing {
        /// The layout's [`Layout::what`].
        what: &'static str,
        /// What is missing and how to get it.
        why: String,
    },
    /// More replicas than the subnet holds.
    #[error("{what}: {n} replicas asked for, at most {MAX_NODES} fit")]
    TooMany {
        /// The layout's [`Layout::what`].
        what: &'static str,
        /// Replicas asked for.
        n: usize,
    },
    /// The lock file could not be opened.
    #[error("opening {path}: {source}")]
    Lock {
        /// The lock file.
        path: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// Another network of the same layout exists.
    #[error("another `{what}` is running (it holds {path}); stop it first")]
    Busy {
        /// The layout's [`Layout::what`].
        what: &'static str,
        /// The lock file.
        path: &'static str,
    },
    /// An `ip` command failed.
    #[error("creating the namespaces for {what}: ip {args}: {message}")]
    Ip {
        /// The layout's [`Layout::what`].
        what: &'static str,
        /// Its arguments.
        args: String,
        /// Its error output, or why it could not run.
        message: String,
    },
}

impl Layout {
    /// The host's address on the bridge.
    pub fn host_addr(&self) -> Ipv4Addr {
        let [a, b, c] = self.subnet;
        Ipv4Addr::new(a, b, c, 254)
    }

    /// Replica `i`'s address.
    pub fn addr(&self, i: u64) -> Ipv4Addr {
        let [a, b, c] = self.subnet;
        Ipv4Addr::new(a, b, c, i as u8)
    }

    /// Replica `i`'s MAC.
    pub fn mac(&self, i: u64) -> String {
        format!("02:00:00:77:{:02x}:{:02x}", self.mac_byte, i as u8)
    }

    /// Replica `i`'s namespace.
    pub fn ns(&self, i: u64) -> String {
        format!("{}{i}", self.prefix)
    }

    fn veth(&self, i: u64) -> String {
        format!("{}v{i}", self.prefix)
    }

    /// Deletes every namespace of this layout (killing what runs inside), its bridge and
    /// EAL's runtime directories whose names start with the prefix.
    pub fn clean_up(&self) {
        let names: Vec<String> = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter_map(|l| l.split_whitespace().next())
                    .filter(|n| n.starts_with(self.prefix))
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
        quiet(&["link", "del", self.bridge]);
        for base in ["/var/run/dpdk", "/tmp/dpdk"] {
            if let Ok(d) = std::fs::read_dir(base) {
                for e in d.filter_map(Result::ok) {
                    if e.file_name().to_string_lossy().starts_with(self.prefix) {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
        }
    }
}

/// What this machine (or this build of the replog library) lacks to build the network
/// and run replicas over DPDK in it, if anything.
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

fn quiet(args: &[&str]) {
    let _ = Command::new("ip").args(args).stdout(Stdio::null()).stderr(Stdio::null()).status();
}

/// The namespaces, veth pairs and bridge of a running cluster; deleted on drop.
pub struct DpdkNet {
    layout: Layout,
    _lock: std::fs::File,
}

impl DpdkNet {
    /// Creates the network of `layout` for replicas `1..=n` (after deleting a previous
    /// run's).
    pub fn create(layout: Layout, n: usize) -> Result<DpdkNet, NetError> {
        if let Some(why) = missing_prerequisite() {
            return Err(NetError::Missing { what: layout.what, why });
        }
        if n > MAX_NODES {
            return Err(NetError::TooMany { what: layout.what, n });
        }
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(layout.lock_file)
            .map_err(|source| NetError::Lock { path: layout.lock_file, source })?;
        use std::os::fd::AsRawFd;
        // SAFETY: flock(2) on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(NetError::Busy { what: layout.what, path: layout.lock_file });
        }
        layout.clean_up();
        // From here on, drop deletes whatever was built.
        let net = DpdkNet { layout, _lock: lock };
        net.build(n)?;
        Ok(net)
    }

    /// The layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    fn ip(&self, args: &[&str]) -> Result<(), NetError> {
        let fail = |message: String| NetError::Ip { what: self.layout.what, args: args.join(" "), message };
        let out = Command::new("ip").args(args).output().map_err(|e| fail(e.to_string()))?;
        if !out.status.success() {
            return Err(fail(String::from_utf8_lossy(&out.stderr).trim().to_string()));
        }
        Ok(())
    }

    fn build(&self, n: usize) -> Result<(), NetError> {
        let l = &self.layout;
        let br = l.bridge;
        self.ip(&["link", "add", br, "type", "bridge", "stp_state", "0", "forward_delay", "0"])?;
        self.ip(&["addr", "add", &format!("{}/24", l.host_addr()), "dev", br])?;
        self.ip(&["link", "set", br, "up"])?;
        for i in 1..=n as u64 {
            let ns = l.ns(i);
            let v = l.veth(i);
            self.ip(&["netns", "add", &ns])?;
            self.ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            #[rustfmt::skip]
            self.ip(&["link", "add", &v, "mtu", "1500", "type", "veth", "peer", "name", "eth0", "netns", &ns,
                      "address", &l.mac(i), "mtu", "1500"])?;
            self.ip(&["-n", &ns, "addr", "add", &format!("{}/24", l.addr(i)), "dev", "eth0"])?;
            self.ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            self.ip(&["link", "set", &v, "master", br])?;
            self.ip(&["link", "set", &v, "up"])?;
        }
        Ok(())
    }

    /// Puts the members on the namespaces' addresses (same ports) and gives each
    /// replica its `[dpdk]` section (EAL file prefix: the namespace's name).
    pub fn configure(&self, cfgs: &mut [ServeConfig]) {
        self.configure_with_prefix(cfgs, "")
    }

    /// As [`configure`](Self::configure), with EAL file prefixes `<namespace><suffix>`
    /// (for a second DPDK program in the same namespaces).
    pub fn configure_with_prefix(&self, cfgs: &mut [ServeConfig], suffix: &str) {
        let Some(first) = cfgs.first() else { return };
        let l = self.layout;
        let on = |a: SocketAddr, i: u64| SocketAddr::from((l.addr(i), a.port()));
        let members: Vec<Member> = first
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
                file_prefix: Some(format!("{}{suffix}", l.ns(c.id))),
                vdevs: vec!["net_af_packet0,iface=eth0".into()],
                pci: vec![],
                eal_args: vec!["--log-level=lib.eal:notice".into()],
                mtu: 1500,
                mbufs: 8191,
                drop_probability: 0.0,
                members: members.iter().map(|m| DpdkMember { id: m.id, mac: l.mac(m.id) }).collect(),
            });
        }
    }

    /// The command prefix that runs a program in replica `id`'s namespace.
    pub fn wrapper(&self, id: u64) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), self.layout.ns(id)]
    }
}

impl Drop for DpdkNet {
    fn drop(&mut self) {
        self.layout.clean_up();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_do_not_collide_and_names_fit() {
        assert_ne!(UP.prefix, BENCH.prefix);
        assert_ne!(UP.subnet, BENCH.subnet);
        assert_ne!(UP.mac_byte, BENCH.mac_byte);
        assert_ne!(UP.lock_file, BENCH.lock_file);
        // clean_up deletes by prefix: neither may delete the other's namespaces.
        assert!(!UP.prefix.starts_with(BENCH.prefix) && !BENCH.prefix.starts_with(UP.prefix));
        for l in [UP, BENCH] {
            // Linux interface names: at most 15 bytes.
            assert!(l.bridge.len() <= 15 && l.veth(MAX_NODES as u64).len() <= 15, "{l:?}");
        }
        assert_eq!(UP.mac(3), "02:00:00:77:ff:03");
        assert_eq!(UP.addr(3), Ipv4Addr::new(10, 77, 255, 3));
        assert_eq!(UP.host_addr(), Ipv4Addr::new(10, 77, 255, 254));
        assert_eq!(BENCH.ns(2), "rlbench-2");
        assert_eq!(BENCH.mac(2), "02:00:00:77:fd:02");
    }
}
