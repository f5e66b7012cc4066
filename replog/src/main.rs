//! The `replog` command.

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use replog::client::{Client, ClientConfig};
use replog::config::{DurabilityKind, ServeConfig, TransportKind};
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use replog::dpdk_net::{DpdkNet, UP as UP_NET};

/// Default first port of `replog up` (each replica takes a few ports from there).
const DEFAULT_BASE_PORT: u16 = 7400;

#[derive(Parser)]
#[command(name = "replog", version, about = "A replicated log: Multi-Paxos over RDMA, DPDK or TCP")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum UpTransport {
    Tcp,
    Rdma,
    Dpdk,
}

#[derive(Clone, Copy, ValueEnum)]
enum Durability {
    Memory,
    Fsync,
    Pmem,
}

impl From<Durability> for DurabilityKind {
    fn from(d: Durability) -> Self {
        match d {
            Durability::Memory => DurabilityKind::Memory,
            Durability::Fsync => DurabilityKind::Fsync,
            Durability::Pmem => DurabilityKind::Pmem,
        }
    }
}

#[derive(clap::Args, Clone)]
struct Target {
    /// Client addresses of the cluster's replicas (default: the cluster `replog up` starts).
    #[arg(long, value_delimiter = ',')]
    servers: Vec<SocketAddr>,
    /// The cluster id (default: the one `replog up` uses).
    #[arg(long)]
    cluster_id: Option<u64>,
    /// How long to wait for an answer, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// The client secret file, for a cluster that requires client credentials (default:
    /// $REPLOG_CLIENT_SECRET_FILE, else, without --servers, replog-data/client-secret if
    /// it exists: the one `replog up` writes).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Speak TLS to the client port, trusting the certificate(s) in this PEM file.
    #[arg(long)]
    tls_ca_file: Option<PathBuf>,
    /// The name the servers' TLS certificate must carry (with --tls-ca-file).
    #[arg(long, default_value = "localhost")]
    tls_server_name: String,
}

impl Target {
    /// The servers and cluster id to use: as given, else those of the cluster
    /// `replog up` starts with its defaults.
    fn resolve(&self) -> (Vec<SocketAddr>, u64) {
        let defaults =
            ServeConfig::local_cluster(3, DEFAULT_BASE_PORT, Path::new("replog-data"), DurabilityKind::Fsync);
        let servers = if self.servers.is_empty() {
            defaults.iter().map(|c| c.me().client_addr).collect()
        } else {
            self.servers.clone()
        };
        (servers, self.cluster_id.unwrap_or(defaults[0].cluster_id))
    }

    /// The client secret to present, if any (see `secret_file`).
    fn secret(&self) -> Result<Option<Vec<u8>>> {
        let path = match (&self.secret_file, std::env::var_os("REPLOG_CLIENT_SECRET_FILE")) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(p)) if !p.is_empty() => Some(PathBuf::from(p)),
            _ => Some(Path::new("replog-data").join(CLIENT_SECRET)).filter(|p| self.servers.is_empty() && p.exists()),
        };
        match path {
            Some(p) => Ok(Some(replog::client::read_secret_file(&p)?)),
            None => Ok(None),
        }
    }

    /// A client configuration for `servers` with this target's cluster id, timeout and secret.
    fn config(&self, servers: Vec<SocketAddr>) -> Result<ClientConfig> {
        let (_, cluster_id) = self.resolve();
        let mut cfg = ClientConfig::new(cluster_id, servers);
        cfg.timeout = Duration::from_millis(self.timeout_ms);
        cfg.secret = self.secret()?;
        if let Some(ca) = &self.tls_ca_file {
            cfg.tls = Some(replog::client::TlsClientConfig::from_ca_file(ca, &self.tls_server_name)?);
        }
        Ok(cfg)
    }
}

/// The file name of the client secret `replog up` writes in its data directory.
const CLIENT_SECRET: &str = "client-secret";

#[derive(Subcommand)]
enum Cmd {
    /// Run one replica from a TOML configuration.
    Serve {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Start a local cluster (one process per replica) and keep it running until
    /// interrupted: over TCP on 127.0.0.1, RDMA, or DPDK (each replica in its own network
    /// namespace on a bridge, 10.77.255.0/24).
    Up {
        /// Data directory (each replica uses a subdirectory; configs and logs go here too).
        #[arg(long, default_value = "replog-data")]
        dir: PathBuf,
        /// Number of replicas.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// First port: replica i (1..=nodes) listens for peers on base + 3(i-1), for
        /// clients on the next port and for metrics on the one after.
        #[arg(long, default_value_t = DEFAULT_BASE_PORT)]
        base_port: u16,
        /// Durability mode.
        #[arg(long, value_enum, default_value = "fsync")]
        durability: Durability,
        /// Transport between the replicas (`rdma` needs a build with the `rdma` feature
        /// and an RDMA device; see hw-setup/rdma.md; `dpdk` needs a build with the `dpdk`
        /// feature, root and iproute2, see hw-setup/dpdk.md).
        #[arg(long, value_enum, default_value = "tcp")]
        transport: UpTransport,
    },
    /// Append entries (each argument is one entry; with none, one entry per stdin line).
    Append {
        #[command(flatten)]
        target: Target,
        /// The entries.
        entries: Vec<String>,
    },
    /// Read committed entries from a position (0 = from the first).
    Read {
        #[command(flatten)]
        target: Target,
        /// First position.
        #[arg(default_value_t = 0)]
        from: u64,
        /// Maximum number of entries.
        #[arg(long, default_value_t = 100)]
        max: u32,
        /// Read from any replica's applied prefix (may trail the leader by a round
        /// trip) instead of a linearizable read at the leader.
        #[arg(long)]
        stale: bool,
    },
    /// Follow the log from a position, printing entries as they commit.
    Tail {
        #[command(flatten)]
        target: Target,
        /// First position.
        #[arg(default_value_t = 0)]
        from: u64,
    },
    /// Hand leadership to a replica (or, without one, to the most caught-up other voter).
    Transfer {
        #[command(flatten)]
        target: Target,
        /// The replica to lead next.
        to: Option<u64>,
    },
    /// Query the replicated state machine (replicas with `[app] state_machine = "kv"`:
    /// `get <key>`, `len`); writes are appends (`set <key> <value>`, `del <key>`).
    Query {
        #[command(flatten)]
        target: Target,
        /// The query, e.g. `get k`.
        query: Vec<String>,
        /// Answer from any replica's applied state (may be stale) instead of a
        /// linearizable query at the leader.
        #[arg(long)]
        stale: bool,
    },
    /// Change the membership while serving. One step at a time:
    /// `members add ID --peer-addr A --client-addr B` adds a new replica (that no
    /// configuration lists; start it with `join = true`) as a learner,
    /// `members promote ID` makes a caught-up learner a voter, `members remove ID`
    /// removes a member (replace a replica: add, promote, remove). Or give the whole
    /// membership: `members --voters 1,2,3 --learners 4` (members with known addresses).
    #[command(args_conflicts_with_subcommands = true)]
    Members {
        #[command(subcommand)]
        step: Option<Box<MemberStep>>,
        #[command(flatten)]
        target: Target,
        /// The voters, e.g. `1,2,3,4,5`.
        #[arg(long, value_delimiter = ',')]
        voters: Vec<u64>,
        /// The learners, e.g. `4,5`.
        #[arg(long, value_delimiter = ',')]
        learners: Vec<u64>,
    },
    /// Ask one replica (the first of --servers) to snapshot its state machine now and
    /// trim its log behind the snapshot (replicas with a state machine).
    Snapshot {
        #[command(flatten)]
        target: Target,
    },
    /// Discard the log's entries up to a position on every replica (the plain log
    /// service; the cut is rounded down to a batch boundary). Prints the first position
    /// still readable.
    Trim {
        #[command(flatten)]
        target: Target,
        /// The last position that may be discarded.
        upto: u64,
    },
    /// Show each replica's view: role, leader, ballot, commit index, per-peer lag.
    Status {
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand)]
enum MemberStep {
    /// Add a new replica as a learner; every replica learns its addresses from the log.
    Add {
        #[command(flatten)]
        target: Target,
        /// The new replica's id (unused in the cluster).
        id: u64,
        /// Where the other replicas reach it (its `peer_addr`).
        #[arg(long)]
        peer_addr: SocketAddr,
        /// Where clients reach it (its `client_addr`).
        #[arg(long)]
        client_addr: SocketAddr,
    },
    /// Make a learner that caught up a voter.
    Promote {
        #[command(flatten)]
        target: Target,
        /// The learner's id.
        id: u64,
    },
    /// Remove a voter or a learner (its process may then be stopped).
    Remove {
        #[command(flatten)]
        target: Target,
        /// The member's id.
        id: u64,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("replog: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Serve { config } => serve(&config),
        Cmd::Up { dir, nodes, base_port, durability, transport } => {
            let transport = match transport {
                UpTransport::Tcp => TransportKind::Tcp,
                UpTransport::Rdma => TransportKind::Rdma,
                UpTransport::Dpdk => TransportKind::Dpdk,
            };
            up(&dir, nodes, base_port, durability.into(), transport)
        }
        Cmd::Append { target, entries } => append(&target, entries),
        Cmd::Read { target, from, max, stale } => read(&target, from, max, stale),
        Cmd::Transfer { target, to } => transfer(&target, to),
        Cmd::Tail { target, from } => tail(&target, from),
        Cmd::Status { target } => status(&target),
        Cmd::Snapshot { target } => {
            let (servers, _) = target.resolve();
            let cfg = target.config(servers.clone())?;
            let at = servers[0];
            let st = Client::snapshot_at(at, &cfg).with_context(|| format!("asking {at} for a snapshot"))?;
            println!("replica {} at {at}: snapshot taken at slot {}", st.node, st.applied_slot);
            Ok(())
        }
        Cmd::Members { step: Some(step), .. } => {
            use replog::client::MemberOp;
            let (target, op) = match *step {
                MemberStep::Add { target, id, peer_addr, client_addr } => {
                    (target, MemberOp::Add { id, peer_addr, client_addr })
                }
                MemberStep::Promote { target, id } => (target, MemberOp::Promote { id }),
                MemberStep::Remove { target, id } => (target, MemberOp::Remove { id }),
            };
            let mut c = client(&target)?;
            let st = c.member_change(op.clone()).with_context(|| format!("asking the leader to {op}"))?;
            println!("replica {} proposed to {op}", st.node);
            Ok(())
        }
        Cmd::Members { step: None, target, voters, learners } => {
            if voters.is_empty() {
                bail!("give a step (members add|promote|remove ID) or the whole membership (--voters ...)");
            }
            let mut c = client(&target)?;
            let st = c.change_membership(voters.clone(), learners.clone()).context("changing the membership")?;
            println!("replica {} proposed voters {voters:?}, learners {learners:?}", st.node);
            Ok(())
        }
        Cmd::Query { target, query: words, stale } => query(&target, &words.join(" "), stale),
        Cmd::Trim { target, upto } => {
            let mut c = client(&target)?;
            let first = c.trim(upto).with_context(|| format!("trimming the log up to position {upto}"))?;
            println!("trimmed: the first readable position is {first}");
            Ok(())
        }
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

fn serve(path: &Path) -> Result<()> {
    // The configuration error names the file and the key already.
    let cfg = ServeConfig::load(path)?;
    replog::config::init_tracing(&cfg.log.level, cfg.log.format == replog::config::LogFormat::Json);
    install_signal_handlers();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    std::thread::spawn(move || loop {
        if STOP.load(Ordering::SeqCst) {
            s.store(true, Ordering::SeqCst);
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    });
    replog::server::serve(cfg, stop).with_context(|| format!("replica from {}", path.display()))?;
    Ok(())
}

/// A secret of a local cluster: `dir/name`, created (32 random bytes from the OS, hex,
/// readable by the owner only) unless it exists, so that a restarted `up` keeps the
/// secret its replicas were started with.
fn ensure_secret_file(dir: &Path, name: &str) -> Result<PathBuf> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    if path.exists() {
        return Ok(path);
    }
    let mut raw = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut raw))
        .context("reading random bytes from /dev/urandom for the cluster secret")?;
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating the secret file {}", path.display()))?;
    writeln!(f, "{hex}").with_context(|| format!("writing the secret file {}", path.display()))?;
    Ok(path)
}

fn up(dir: &Path, n: usize, base_port: u16, durability: DurabilityKind, transport: TransportKind) -> Result<()> {
    if n == 0 {
        bail!("--nodes must be at least 1");
    }
    let last_port = u64::from(base_port) + 3 * n as u64 - 1;
    if base_port == 0 || last_port > u64::from(u16::MAX) {
        bail!(
            "--base-port {base_port} with --nodes {n} needs ports {base_port}..={last_port} (3 per replica): \
             choose a base port from 1 to {}",
            (u64::from(u16::MAX) + 1).saturating_sub(3 * n as u64)
        );
    }
    // DPDK: a namespace per replica on a bridge (checks root, iproute2 and the build
    // first; deletes a previous run's leftovers). Dropped (deleted) when `up` returns.
    let net = match transport {
        TransportKind::Dpdk => Some(DpdkNet::create(UP_NET, n)?),
        _ => None,
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize().with_context(|| format!("resolving {}", dir.display()))?;
    let mut cfgs = ServeConfig::local_cluster(n, base_port, &dir, durability);
    let secret_path = ensure_secret_file(&dir, "secret")?;
    let client_secret_path = ensure_secret_file(&dir, CLIENT_SECRET)?;
    if let Some(net) = &net {
        net.configure(&mut cfgs);
    }
    for c in &mut cfgs {
        c.security.secret_file = Some(secret_path.clone());
        c.transport = transport;
        if transport == TransportKind::Rdma {
            // Three replicas on one host share one device: keep the pinned memory small.
            c.rdma.region_bytes = 32 << 20;
        }
        c.security.client_secret_file = Some(client_secret_path.clone());
    }
    let client_secret = replog::client::read_secret_file(&client_secret_path)?;
    let exe = std::env::current_exe().context("finding the replog binary")?;
    install_signal_handlers();
    let mut children: Vec<(u64, Child)> = Vec::new();
    for c in &cfgs {
        c.validate().context("local cluster configuration")?;
        let path = dir.join(format!("node-{}.toml", c.id));
        std::fs::write(&path, c.to_toml()).with_context(|| format!("writing {}", path.display()))?;
        let child = spawn_replica(&exe, &dir, c.id, net.as_ref())?;
        children.push((c.id, child));
    }
    let servers: Vec<String> = cfgs.iter().map(|c| c.me().client_addr.to_string()).collect();
    let over = match transport {
        TransportKind::Rdma => "RDMA (side channels on 127.0.0.1)".to_string(),
        TransportKind::Dpdk => format!(
            "DPDK (af_packet on veths; namespaces {p}1..{p}{n}, bridge {b} with {h}/24 on the host)",
            p = UP_NET.prefix,
            b = UP_NET.bridge,
            h = UP_NET.host_addr()
        ),
        _ => "TCP on 127.0.0.1".to_string(),
    };
    println!("replog: {n} replicas over {over}, data in {}", dir.display());
    println!("  peer links authenticated with the cluster secret in {}", secret_path.display());
    println!(
        "  clients must present the client secret in {} (the CLI finds it there when run from {}; \
         elsewhere give --secret-file)",
        client_secret_path.display(),
        dir.parent().map(|p| p.display().to_string()).unwrap_or_default()
    );
    for c in &cfgs {
        let m = c.me();
        println!(
            "  replica {}: client {}  peer {}  metrics {}  log {}",
            c.id,
            m.client_addr,
            m.peer_addr,
            m.metrics_addr.map(|a| format!("http://{a}/metrics")).unwrap_or_else(|| "-".into()),
            dir.join(format!("node-{}.log", c.id)).display()
        );
    }
    // Wait for a leader so that the next command works at once.
    let addrs: Vec<SocketAddr> = cfgs.iter().map(|c| c.me().client_addr).collect();
    let t0 = Instant::now();
    let mut leader = None;
    let wait = if net.is_some() { Duration::from_secs(40) } else { Duration::from_secs(20) };
    while t0.elapsed() < wait && leader.is_none() && !STOP.load(Ordering::SeqCst) {
        for a in &addrs {
            let mut cc = ClientConfig::new(cfgs[0].cluster_id, vec![*a]);
            cc.timeout = Duration::from_millis(500);
            cc.secret = Some(client_secret.clone());
            if let Ok(s) = Client::status_at(*a, &cc) {
                if s.leader.is_some() {
                    leader = s.leader;
                }
            }
        }
        if leader.is_none() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    match leader {
        Some(l) if net.is_none() => {
            println!("leader: replica {l}. Try: replog append hello; replog read 0 (servers {})", servers.join(","))
        }
        Some(l) => println!("leader: replica {l}"),
        None => println!("no leader yet; see the replica logs"),
    }
    if net.is_some() {
        // Not the default servers: give them (and then the client secret) explicitly.
        let target = format!("--servers {} --secret-file {}", servers.join(","), client_secret_path.display());
        println!("clients: replog append {target} hello");
        println!("         replog read {target} 0");
        println!("         replog status {target}");
    }
    println!("press Ctrl-C to stop the cluster");
    // Supervise: a replica that exits (killed to try a failover, say) is restarted on
    // its data directory after a second; the others keep serving meanwhile.
    let mut restarts = 0u32;
    let mut pending: Vec<(usize, Instant)> = Vec::new();
    let result = loop {
        if STOP.load(Ordering::SeqCst) {
            break Ok(());
        }
        for (i, (id, c)) in children.iter_mut().enumerate() {
            if pending.iter().any(|(j, _)| *j == i) {
                continue;
            }
            if let Ok(Some(status)) = c.try_wait() {
                println!("replica {id} exited ({status}); restarting it in 1 s");
                pending.push((i, Instant::now() + Duration::from_secs(1)));
            }
        }
        let due: Vec<usize> = pending.iter().filter(|(_, t)| Instant::now() >= *t).map(|(i, _)| *i).collect();
        pending.retain(|(_, t)| Instant::now() < *t);
        for i in due {
            restarts += 1;
            if restarts > 100 {
                break;
            }
            let id = children[i].0;
            match spawn_replica(&exe, &dir, id, net.as_ref()) {
                Ok(c) => {
                    println!("replica {id} restarted");
                    children[i].1 = c;
                }
                Err(e) => println!("replica {id} could not be restarted: {e:#}"),
            }
        }
        if restarts > 100 {
            break Err(anyhow::anyhow!("replicas keep exiting (over 100 restarts); see the logs in {}", dir.display()));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    println!("stopping the cluster");
    for (_, c) in children.iter_mut() {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
        }
    }
    let t0 = Instant::now();
    for (_, c) in children.iter_mut() {
        while t0.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = c.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
    if let Some(net) = net {
        drop(net);
        println!("deleted the namespaces {}* and the bridge {}", UP_NET.prefix, UP_NET.bridge);
    }
    result
}

/// `servers` with the current leader first (reads from the leader see every
/// acknowledged append at once; a follower may be a round trip behind).
fn leader_first(servers: Vec<SocketAddr>, cfg: &ClientConfig) -> Vec<SocketAddr> {
    let mut leader = None;
    let mut by_node = Vec::new();
    let mut probe = cfg.clone();
    probe.timeout = Duration::from_millis(300);
    for &s in &servers {
        if let Ok(st) = Client::status_at(s, &probe) {
            if st.role == "leader" {
                leader = Some(s);
                break;
            }
            by_node.push((st.node, s));
            if let Some(l) = st.leader {
                if let Some(&(_, a)) = by_node.iter().find(|(n, _)| *n == l) {
                    leader = Some(a);
                    break;
                }
            }
        }
    }
    let mut out = servers;
    if let Some(l) = leader {
        out.retain(|&s| s != l);
        out.insert(0, l);
    }
    out
}

/// Starts `replog serve` for replica `id` of a cluster written by `up` in `dir` (in its
/// namespace of `net`, if given).
fn spawn_replica(exe: &Path, dir: &Path, id: u64, net: Option<&DpdkNet>) -> Result<Child> {
    let path = dir.join(format!("node-{id}.toml"));
    let log_path = dir.join(format!("node-{id}.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let mut cmd = match net {
        // `ip netns exec` execs the program: the child's pid (and PDEATHSIG) is the replica's.
        Some(net) => {
            let w = net.wrapper(id);
            let mut c = Command::new(&w[0]);
            c.args(&w[1..]).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches only the child:
    // if `replog up` dies (even by SIGKILL), its replicas get SIGTERM instead of
    // lingering on the cluster's ports.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.arg("serve")
        .arg("--config")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting replica {id}"))
}

fn client(t: &Target) -> Result<Client> {
    let (servers, _) = t.resolve();
    let mut cfg = t.config(servers.clone())?;
    let servers = leader_first(servers, &cfg);
    cfg.servers = servers.clone();
    Client::connect(cfg).map_err(|e| {
        let list: Vec<String> = servers.iter().map(|s| s.to_string()).collect();
        let hint = match &e {
            replog::client::ClientError::CredentialRequired { .. } => {
                "the cluster requires a client credential: give --secret-file (replog up writes \
                 replog-data/client-secret)"
            }
            replog::client::ClientError::TlsRequired { .. } => {
                "the cluster's client port requires TLS: give --tls-ca-file (the CA of its certificate)"
            }
            replog::client::ClientError::Unauthorized { .. } => {
                "the cluster refused the client secret: is --secret-file the cluster's client secret?"
            }
            _ => "is it running (replog up)?",
        };
        anyhow::Error::new(e).context(format!("connecting to the cluster (servers {}); {hint}", list.join(",")))
    })
}

fn append(t: &Target, entries: Vec<String>) -> Result<()> {
    let entries: Vec<Bytes> = if entries.is_empty() {
        let mut v = Vec::new();
        for line in std::io::stdin().lock().lines() {
            v.push(Bytes::from(line.context("reading stdin")?));
        }
        v
    } else {
        entries.into_iter().map(Bytes::from).collect()
    };
    if entries.is_empty() {
        bail!("nothing to append");
    }
    let mut c = client(t)?;
    let positions = c.append_batch(entries).context("appending")?;
    for p in positions {
        println!("{p}");
    }
    Ok(())
}

fn show(out: &mut impl Write, pos: u64, data: &[u8]) -> std::io::Result<()> {
    match std::str::from_utf8(data) {
        Ok(s) => writeln!(out, "{pos}\t{s}"),
        Err(_) => writeln!(out, "{pos}\t<{} bytes>", data.len()),
    }
}

fn read(t: &Target, from: u64, max: u32, stale: bool) -> Result<()> {
    let mut c = client(t)?;
    let entries =
        if stale { c.read(from, max).context("reading") } else { c.read_linearizable(from, max).context("reading") }?;
    let mut out = std::io::stdout().lock();
    for (p, d) in entries {
        show(&mut out, p, &d)?;
    }
    Ok(())
}

fn query(t: &Target, q: &str, stale: bool) -> Result<()> {
    let mut c = client(t)?;
    let (_, answer) = c.query(q.as_bytes(), !stale).with_context(|| format!("querying {q:?}"))?;
    let mut out = std::io::stdout().lock();
    out.write_all(&answer)?;
    out.write_all(b"\n")?;
    Ok(())
}

fn transfer(t: &Target, to: Option<u64>) -> Result<()> {
    let mut c = client(t)?;
    let st = c.transfer_leadership(to.unwrap_or(0)).context("asking the leader to hand over")?;
    match to {
        Some(to) => println!("replica {} is handing leadership to replica {to}", st.node),
        None => println!("replica {} is stepping down", st.node),
    }
    // Show who leads once the hand-over settles.
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(20));
        if let Ok(s) = c.status() {
            if let Some(l) = s.leader.filter(|&l| l != st.node) {
                println!("leader: replica {l}");
                return Ok(());
            }
        }
    }
    println!("the leader has not changed yet; see `replog status`");
    Ok(())
}

fn tail(t: &Target, from: u64) -> Result<()> {
    let mut c = client(t)?;
    let tail = c.tail(from).context("starting to tail")?;
    let mut out = std::io::stdout().lock();
    for item in tail {
        let (p, d) = item.context("tailing")?;
        show(&mut out, p, &d)?;
        out.flush()?;
    }
    Ok(())
}

fn status(t: &Target) -> Result<()> {
    let (servers, _) = t.resolve();
    let cfg = t.config(servers.clone())?;
    let mut any = false;
    for s in servers {
        match Client::status_at(s, &cfg) {
            Ok(st) => {
                any = true;
                println!(
                    "replica {} at {s}: {} leader={} ballot={} commit={} applied={} entries={} durability={}",
                    st.node,
                    st.role,
                    st.leader.map(|l| l.to_string()).unwrap_or_else(|| "?".into()),
                    st.ballot,
                    st.commit_slot,
                    st.applied_slot,
                    st.last_position,
                    st.durability
                );
                for p in st.peers {
                    let link = if p.connected { "connected" } else { "disconnected" };
                    if st.role == "leader" {
                        println!("    peer {}: {link} matched={} lag={}", p.id, p.matched_slot, p.lag);
                    } else {
                        println!("    peer {}: {link}", p.id);
                    }
                }
            }
            Err(e) => println!("{s}: unreachable ({e})"),
        }
    }
    if !any {
        bail!("no replica answered");
    }
    Ok(())
}
