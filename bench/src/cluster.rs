//! A cluster of `replog serve` processes, stopped (and its data removed) when dropped,
//! and the `replog` binary it runs: over TCP on loopback, over DPDK with each replica
//! in its namespace of a [`DpdkNet`] (its client port on the namespace's address,
//! reached from the host through the bridge, as `replog up --transport dpdk` does), or
//! over RDMA on one device shared by every replica ([`RdmaNet`]; clients still on
//! loopback TCP, as `replog up --transport rdma` does).

use crate::proc::{free_ports, spawn_tied, stop, TempDir};
use crate::rdma::RdmaNet;
use anyhow::{bail, Context, Result};
use replog::client::{Client, ClientConfig, Status};
use replog::config::{DurabilityKind, ServeConfig};
use replog::dpdk_net::DpdkNet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `replog` binary: `explicit` if given, else the one next to this executable (the
/// same cargo target directory: `cargo build --release -p replog -p bench`).
pub fn find_replog(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        bail!("--replog {}: no such file", p.display());
    }
    let me = std::env::current_exe().context("locating the bench executable")?;
    let dir = me.parent().context("the bench executable has no directory")?;
    let mut candidates = vec![dir.join("replog")];
    // `cargo run` from target/<profile>/: also try the sibling profile.
    if let Some(target) = dir.parent() {
        candidates.push(target.join("release").join("replog"));
    }
    for c in &candidates {
        if c.is_file() {
            return Ok(c.clone());
        }
    }
    bail!(
        "no replog binary next to {} (looked at {:?}); build it with `cargo build --release -p replog -p bench` \
         in the same CARGO_TARGET_DIR, or pass --replog PATH",
        me.display(),
        candidates
    )
}

/// What carries the replicas' traffic to each other.
#[derive(Clone, Copy)]
pub enum Fabric<'a> {
    /// TCP on loopback.
    Tcp,
    /// DPDK, each replica in its namespace of the network.
    Dpdk(&'a DpdkNet),
    /// RDMA on the device (side channels on its address).
    Rdma(&'a RdmaNet),
}

/// Running replicas.
pub struct ReplogCluster {
    /// The replicas' configurations (written to `dir/node-<id>.toml`).
    pub cfgs: Vec<ServeConfig>,
    procs: Vec<Child>,
    dir: TempDir,
}

impl ReplogCluster {
    /// Starts `n` replicas with `durability` under a fresh directory in `parent` and waits
    /// (up to 20 s; DPDK 40 s, RDMA 60 s) until the cluster has settled
    /// ([`ReplogCluster::wait_settled`]). `spin_us`: the replicas' spin-then-block waits
    /// (`[timing] spin_us`; 0 blocks at once); `client_port_thread`: `[timing]
    /// client_port_thread`. `fabric`: between the replicas (a DPDK network must have at
    /// least `n` namespaces).
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        replog: &Path,
        n: usize,
        durability: DurabilityKind,
        spin_us: u64,
        client_port_thread: bool,
        parent: &Path,
        fabric: Fabric<'_>,
    ) -> Result<ReplogCluster> {
        let net = match fabric {
            Fabric::Dpdk(n) => Some(n),
            _ => None,
        };
        let dir = TempDir::new(parent, "replog-bench")?;
        let base = free_ports(3 * n as u16 + 3)?;
        let mut cfgs = ServeConfig::local_cluster(n, base, dir.path(), durability);
        match fabric {
            Fabric::Tcp => {}
            Fabric::Dpdk(net) => net.configure(&mut cfgs),
            Fabric::Rdma(net) => net.configure(&mut cfgs),
        }
        for c in &mut cfgs {
            // Logging at info costs CPU on the hot path of a 2-core machine.
            c.log.level = "warn".to_string();
            c.timing.spin_us = spin_us;
            c.timing.client_port_thread = client_port_thread;
        }
        let mut cluster = ReplogCluster { cfgs, procs: Vec::new(), dir };
        for i in 0..n {
            let cfg = &cluster.cfgs[i];
            let path = cluster.dir.path().join(format!("node-{}.toml", cfg.id));
            std::fs::write(&path, cfg.to_toml())?;
            cfg.validate().with_context(|| format!("replica {}'s configuration", cfg.id))?;
            let log = std::fs::File::create(cluster.dir.path().join(format!("node-{}.log", cfg.id)))?;
            // DPDK: `ip netns exec NS replog ...` execs the replica, so the child's pid
            // (and PDEATHSIG) is the replica's.
            let mut cmd = match net {
                Some(net) => {
                    let w = net.wrapper(cfg.id);
                    let mut c = Command::new(&w[0]);
                    c.args(&w[1..]).arg(replog);
                    c
                }
                None => Command::new(replog),
            };
            let child = spawn_tied(
                cmd.args(["serve", "--config"])
                    .arg(&path)
                    .env_remove("RUST_LOG")
                    .stdin(Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log),
            )
            .with_context(|| format!("starting {} serve", replog.display()))?;
            cluster.procs.push(child);
        }
        // EAL's start and the DPDK links' handshakes take longer than TCP's connects; so
        // do registering RDMA memory and bootstrapping queue pairs (much longer under
        // soft-RoCE in an emulated VM).
        let bound = match fabric {
            Fabric::Tcp => 20,
            Fabric::Dpdk(_) => 40,
            Fabric::Rdma(_) => 60,
        };
        cluster.wait_settled(Duration::from_secs(bound))?;
        Ok(cluster)
    }

    /// The cluster id.
    pub fn cluster_id(&self) -> u64 {
        self.cfgs[0].cluster_id
    }

    /// Client addresses of every replica.
    pub fn client_addrs(&self) -> Vec<SocketAddr> {
        self.cfgs.iter().map(|c| c.me().client_addr).collect()
    }

    /// Waits (up to `timeout`) until the cluster has settled, and returns the leader's
    /// client address: every replica answers its status, exactly one says it leads, every
    /// replica names it as the leader at its ballot (so each follower has promised it and,
    /// over RDMA, granted it write access to its log region), and an append through it
    /// commits. One replica saying "leader" is not enough: a leader that has not yet heard
    /// of a newer ballot, or whose followers have not all promised it, has its first writes
    /// refused (over RDMA: denied at the NIC, and the queue pairs renewed). Under an
    /// emulated VM that recovery takes seconds (a request waits out its 5 s timeout), so a
    /// run started on it measured no append in its window.
    pub fn wait_settled(&mut self, timeout: Duration) -> Result<SocketAddr> {
        let t0 = Instant::now();
        let mut last = "no status asked yet".to_string();
        while t0.elapsed() < timeout && !crate::proc::stopped() {
            self.check_running()?;
            match self.agreed_leader() {
                Ok(addr) => {
                    let mut cfg = ClientConfig::new(self.cluster_id(), vec![addr]);
                    cfg.timeout =
                        timeout.saturating_sub(t0.elapsed()).clamp(Duration::from_millis(100), Duration::from_secs(5));
                    cfg.retries = 0;
                    let probe = Client::connect(cfg).and_then(|mut c| c.append(&b"bench: settle probe"[..]));
                    match probe {
                        Ok(_) if self.agreed_leader().as_ref() == Ok(&addr) => return Ok(addr),
                        Ok(_) => last = "the leader changed during the probe append".to_string(),
                        Err(e) => last = format!("probe append through {addr}: {e}"),
                    }
                }
                Err(why) => last = why,
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("the cluster did not settle within {timeout:?} ({last}); replica 1's log:\n{}", self.log_tail(0))
    }

    /// The client address of the one replica that leads with every replica following it
    /// at its ballot, or what keeps the statuses from agreeing.
    fn agreed_leader(&self) -> std::result::Result<SocketAddr, String> {
        let mut statuses = Vec::with_capacity(self.cfgs.len());
        for (i, addr) in self.client_addrs().into_iter().enumerate() {
            let s = Client::status_of(addr, self.cluster_id(), Duration::from_millis(300))
                .map_err(|e| format!("replica {}'s status: {e}", i + 1))?;
            statuses.push(s);
        }
        let leaders: Vec<&Status> = statuses.iter().filter(|s| s.role == "leader").collect();
        let [l] = leaders[..] else {
            return Err(format!("{} replicas say they lead", leaders.len()));
        };
        if let Some(s) = statuses.iter().find(|s| s.leader != Some(l.node) || s.ballot != l.ballot) {
            return Err(format!(
                "replica {} follows {:?} at ballot {}; replica {} leads at {}",
                s.node, s.leader, s.ballot, l.node, l.ballot
            ));
        }
        let me = self.cfgs.iter().find(|c| c.id == l.node).ok_or(format!("replica {} is not a member", l.node))?;
        Ok(me.me().client_addr)
    }

    /// An error if a replica has exited.
    fn check_running(&mut self) -> Result<()> {
        for (i, p) in self.procs.iter_mut().enumerate() {
            if let Ok(Some(st)) = p.try_wait() {
                bail!("replica {} exited ({st}); its log:\n{}", i + 1, self.log_tail(i));
            }
        }
        Ok(())
    }

    /// A client configuration that tries the leader first (once the cluster has settled).
    pub fn client_config(&mut self) -> Result<ClientConfig> {
        let leader = self.wait_settled(Duration::from_secs(10))?;
        let mut servers = vec![leader];
        servers.extend(self.client_addrs().into_iter().filter(|a| *a != leader));
        let mut cfg = ClientConfig::new(self.cluster_id(), servers);
        cfg.timeout = Duration::from_secs(5);
        Ok(cfg)
    }

    /// The last lines of replica `i`'s log.
    pub fn log_tail(&self, i: usize) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join(format!("node-{}.log", self.cfgs[i].id))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Whether every replica is still running.
    pub fn all_running(&mut self) -> bool {
        self.procs.iter_mut().all(|p| matches!(p.try_wait(), Ok(None)))
    }

    /// Stops the replicas (SIGTERM, then SIGKILL after 2 s). Also done on drop.
    pub fn stop(&mut self) {
        for p in &mut self.procs {
            stop(p, Duration::from_secs(2));
        }
        self.procs.clear();
    }
}

impl Drop for ReplogCluster {
    fn drop(&mut self) {
        self.stop();
    }
}
