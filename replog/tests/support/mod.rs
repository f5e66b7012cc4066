//! Test support: real `replog serve` processes on loopback, stopped when dropped.
#![allow(dead_code)]

use replog::client::{Client, ClientConfig, Status};
use replog::config::{DurabilityKind, ServeConfig};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free run of `n` consecutive loopback ports (probed; good enough for tests).
pub fn free_ports(n: u16) -> u16 {
    for _ in 0..200 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let base = l.local_addr().unwrap().port();
        drop(l);
        if base as u32 + n as u32 >= 65000 || base < 20000 {
            continue;
        }
        if (0..n).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
    panic!("no free port range");
}

/// A cluster of `replog serve` processes.
pub struct Cluster {
    pub dir: PathBuf,
    pub cfgs: Vec<ServeConfig>,
    pub procs: Vec<Option<Child>>,
}

impl Cluster {
    /// Writes configs for `n` replicas under `dir` and starts them.
    pub fn start(dir: &Path, n: usize, durability: DurabilityKind) -> Cluster {
        let base = free_ports(3 * n as u16 + 3);
        let cfgs = ServeConfig::local_cluster(n, base, dir, durability);
        let mut c = Cluster { dir: dir.to_path_buf(), cfgs, procs: Vec::new() };
        for i in 0..n {
            let p = c.spawn(i);
            c.procs.push(Some(p));
        }
        c
    }

    fn spawn(&self, i: usize) -> Child {
        let cfg = &self.cfgs[i];
        let path = self.dir.join(format!("node-{}.toml", cfg.id));
        std::fs::write(&path, cfg.to_toml()).expect("write config");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("node-{}.log", cfg.id)))
            .expect("log file");
        Command::new(env!("CARGO_BIN_EXE_replog"))
            .args(["serve", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start replog serve")
    }

    pub fn cluster_id(&self) -> u64 {
        self.cfgs[0].cluster_id
    }

    pub fn client_addrs(&self) -> Vec<SocketAddr> {
        self.cfgs.iter().map(|c| c.me().client_addr).collect()
    }

    pub fn client(&self) -> Client {
        let mut cfg = ClientConfig::new(self.cluster_id(), self.client_addrs());
        cfg.timeout = Duration::from_secs(2);
        cfg.retries = 60;
        Client::connect(cfg).expect("connect to the cluster")
    }

    /// A client talking to replica `i` only (reads are served by any replica).
    pub fn client_of(&self, i: usize) -> Client {
        let mut cfg = ClientConfig::new(self.cluster_id(), vec![self.cfgs[i].me().client_addr]);
        cfg.timeout = Duration::from_secs(2);
        Client::connect(cfg).expect("connect to a replica")
    }

    pub fn status(&self, i: usize) -> Option<Status> {
        Client::status_of(self.cfgs[i].me().client_addr, self.cluster_id(), Duration::from_millis(500)).ok()
    }

    /// The index of the replica that says it leads, waiting up to `timeout`.
    pub fn wait_leader(&self, timeout: Duration) -> usize {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            for i in 0..self.cfgs.len() {
                if self.procs[i].is_some() {
                    if let Some(s) = self.status(i) {
                        if s.role == "leader" {
                            return i;
                        }
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("no leader within {timeout:?}; logs in {}", self.dir.display());
    }

    /// SIGKILLs replica `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.procs[i].take() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }

    /// Restarts replica `i` on its data directory.
    pub fn restart(&mut self, i: usize) {
        assert!(self.procs[i].is_none());
        let p = self.spawn(i);
        self.procs[i] = Some(p);
    }

    /// Waits until every running replica applied the same number of entries, at least
    /// `min`; returns that number.
    pub fn wait_converged(&self, min: u64, timeout: Duration) -> u64 {
        let t0 = Instant::now();
        let mut last = Vec::new();
        while t0.elapsed() < timeout {
            last = (0..self.cfgs.len()).map(|i| self.status(i).map(|s| (s.last_position, s.applied_slot))).collect();
            if let Some(Some((p, _))) = last.first() {
                if *p >= min && last.iter().all(|s| s.map(|x| x.0) == Some(*p)) {
                    return *p;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("replicas did not converge: {last:?}; logs in {}", self.dir.display());
    }

    /// The whole log as replica `i` serves it.
    pub fn read_all(&self, i: usize) -> Vec<(u64, Vec<u8>)> {
        let mut c = self.client_of(i);
        let mut out = Vec::new();
        let mut from = 1;
        for _ in 0..100_000 {
            let batch = c.read(from, 4096).expect("read");
            if batch.is_empty() {
                break;
            }
            for (p, d) in batch {
                assert_eq!(p, from, "positions are consecutive");
                from += 1;
                out.push((p, d.to_vec()));
            }
        }
        out
    }

    pub fn log_of(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("node-{}.log", self.cfgs[i].id))).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for p in self.procs.iter_mut().flatten() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}
