//! `replog serve`: one replica process, wired from its configuration: the store, the
//! transport to the peers (TCP, or DPDK with the `dpdk` feature), the client port, the
//! metrics endpoint and the node driver on the calling thread.

use crate::app::{AppHost, KvMachine, StateMachine};
use crate::client::{ClientServer, ClientServerConfig};
use crate::config::{ServeConfig, StateMachineKind, TransportKind};
use crate::embed::{Local, ReplicaHandle};
use crate::metrics::{Metrics, MetricsServer};
use crate::node::{Node, NodeError, NodeOptions};
use crate::snapshot::SnapshotStore;
use crate::store::{Log, Mode, PaxosStore, StoreConfig, StoreError};
use fallback_tcp::{TcpConfig, TcpTransport};
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use tracing::{info, warn};
use transport::Transport;

/// Why a replica could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The store could not be opened.
    #[error("opening the store in {dir}: {source}")]
    Store {
        /// The data directory.
        dir: PathBuf,
        /// Why.
        source: StoreError,
    },
    /// A socket could not be bound.
    #[error("binding the {what} address {addr}: {source}")]
    Bind {
        /// Which port.
        what: &'static str,
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The transport in the configuration is not built into this binary.
    #[error("transport {0:?} is not available in this build")]
    Transport(TransportKind),
    /// The RDMA transport could not start.
    #[error("rdma transport: {0}")]
    Rdma(String),
    /// The secret file cannot be used.
    #[error("security: {0}")]
    Security(String),
    /// Sizes that do not fit together.
    #[error("limits: {0}")]
    Limits(String),
    /// The DPDK transport could not start.
    #[cfg(feature = "dpdk")]
    #[error("dpdk transport: {0}")]
    Dpdk(#[from] transport::dpdk::DpdkError),
    /// The node stopped with an error.
    #[error(transparent)]
    Node(#[from] NodeError),
}

/// Opens the replica's store as its configuration says.
pub fn open_store(cfg: &ServeConfig) -> Result<PaxosStore, ServeError> {
    let mode = cfg.store_mode();
    let dir = cfg.data_dir.clone();
    let r = if mode == Mode::Memory {
        Log::memory(cfg.segment_size).and_then(PaxosStore::from_log)
    } else {
        std::fs::create_dir_all(&dir)
            .map_err(|e| StoreError::io("create data directory", &dir, e))
            .and_then(|_| PaxosStore::open(&dir, StoreConfig::new(mode).with_segment_size(cfg.segment_size)))
    };
    r.map_err(|source| ServeError::Store { dir, source })
}

/// Runs one replica until `stop` is set.
pub fn serve(cfg: ServeConfig, stop: Arc<AtomicBool>) -> Result<(), ServeError> {
    serve_embedded(cfg, stop, None, None)
}

/// Runs one replica until `stop` is set, driving `sm` if given (else the state machine
/// the configuration names), and hands a [`ReplicaHandle`] to `handle` once started.
pub fn serve_embedded(
    cfg: ServeConfig,
    stop: Arc<AtomicBool>,
    sm: Option<Box<dyn StateMachine>>,
    handle: Option<std::sync::mpsc::Sender<ReplicaHandle>>,
) -> Result<(), ServeError> {
    match cfg.transport {
        TransportKind::Tcp => {
            let transport = tcp_transport(&cfg)?;
            run(cfg, transport, stop, sm, handle)
        }
        #[cfg(feature = "dpdk")]
        TransportKind::Dpdk => {
            let transport = dpdk_transport(&cfg)?;
            run(cfg, transport, stop, sm, handle)
        }
        #[cfg(feature = "rdma")]
        TransportKind::Rdma => {
            let transport = crate::rdma_agent::open(&cfg)?;
            run(cfg, transport, stop, sm, handle)
        }
        #[allow(unreachable_patterns)]
        other => Err(ServeError::Transport(other)),
    }
}

fn tcp_transport(cfg: &ServeConfig) -> Result<TcpTransport, ServeError> {
    let me = cfg.me();
    let peers: BTreeMap<u64, std::net::SocketAddr> =
        cfg.members.iter().filter(|m| m.id != cfg.id).map(|m| (m.id, m.peer_addr)).collect();
    let secret = cfg.read_secret().map_err(|e| ServeError::Security(e.to_string()))?;
    let mut tcfg = TcpConfig::new(cfg.cluster_id, cfg.id, me.peer_addr, peers);
    tcfg.secret = secret;
    tcfg.tls = cfg.peer_tls().map_err(|e| ServeError::Security(e.to_string()))?;
    // Each replica presents its own identity; it expects of each peer the identity its
    // directory holds (the configured one here, then the replicated one: see
    // `crate::members`).
    tcfg.config_digest = cfg.identity_digest();
    tcfg.peer_digests =
        cfg.peers().map(|m| (m.id, crate::members::identity_digest(m.id, m.peer_addr, m.client_addr))).collect();
    info!(node = cfg.id, authenticated = tcfg.secret.is_some(), tls = tcfg.tls.is_some(), config_digest = %format_args!("{:016x}", tcfg.config_digest), "peer links");
    tcfg.max_payload = cfg.limits.max_frame_bytes as usize;
    tcfg.seed = cfg.id;
    // Redial a lost peer at least every few election timeouts: a restarted replica
    // rejoins (and can vote again) quickly.
    tcfg.reconnect_max = std::time::Duration::from_nanos(cfg.timing.election_timeout_ns() * 4)
        .clamp(std::time::Duration::from_millis(50), tcfg.reconnect_max);
    TcpTransport::bind(tcfg).map_err(|source| ServeError::Bind { what: "peer", addr: me.peer_addr.to_string(), source })
}

/// Starts EAL and opens the port the `[dpdk]` section names: the transport a replica
/// with `cfg` runs on (also used by `bench` for its raw DPDK ping-pong baseline, so that
/// the baseline takes the replicas' own path).
#[cfg(feature = "dpdk")]
pub fn dpdk_transport(cfg: &ServeConfig) -> Result<transport::dpdk::DpdkTransport, ServeError> {
    use transport::dpdk::{DpdkConfig, DpdkTransport, Eal, EalConfig};
    let d =
        cfg.dpdk.as_ref().ok_or_else(|| ServeError::Limits("transport = \"dpdk\" needs a [dpdk] section".into()))?;
    let eal = EalConfig {
        lcores: d.lcores.clone(),
        memory_mb: d.memory_mb,
        no_huge: d.no_huge,
        in_memory: d.in_memory,
        no_shconf: d.no_shconf,
        file_prefix: d.file_prefix.clone(),
        vdevs: d.vdevs.clone(),
        pci: d.pci.clone(),
        extra: d.eal_args.clone(),
    };
    let eal = Eal::init(&eal)?;
    let peers = cfg.peers().filter_map(|m| d.mac_of(m.id).map(|mac| (m.id, mac))).collect();
    let mut dcfg = DpdkConfig::new(cfg.cluster_id, cfg.id, &d.port, peers);
    dcfg.local_mac = d.mac_of(cfg.id);
    dcfg.mtu = d.mtu as usize;
    dcfg.mbufs = d.mbufs;
    dcfg.drop_probability = d.drop_probability;
    dcfg.max_payload = cfg.limits.max_frame_bytes as usize;
    dcfg.seed = cfg.id;
    dcfg.secret = cfg.read_secret().map_err(|e| ServeError::Security(e.to_string()))?;
    dcfg.config_digest = cfg.config_digest();
    info!(node = cfg.id, authenticated = dcfg.secret.is_some(), config_digest = %format_args!("{:016x}", dcfg.config_digest), eal = %eal.args().join(" "), "peer links over DPDK");
    Ok(DpdkTransport::new(eal, dcfg)?)
}

fn run<T: Transport>(
    cfg: ServeConfig,
    mut transport: T,
    stop: Arc<AtomicBool>,
    sm: Option<Box<dyn StateMachine>>,
    handle: Option<std::sync::mpsc::Sender<ReplicaHandle>>,
) -> Result<(), ServeError> {
    let me = cfg.me().clone();
    let store = open_store(&cfg)?;
    let durability = format!("{:?}", store.durability()).to_lowercase();
    info!(node = cfg.id, dir = %cfg.data_dir.display(), %durability, "store opened");
    let sm: Option<Box<dyn StateMachine>> = match (sm, cfg.app.state_machine) {
        (Some(sm), _) => Some(sm),
        (None, StateMachineKind::Log) => None,
        (None, StateMachineKind::Kv) => Some(Box::new(KvMachine::default())),
    };
    let dir = (cfg.store_mode() != Mode::Memory).then(|| cfg.data_dir.join("snapshots"));
    let snaps = SnapshotStore::open(dir, cfg.cluster_id).map_err(NodeError::from)?;
    let policy = cfg.app.policy(cfg.limits.max_frame_bytes);
    let app = match sm {
        // The plain log service: snapshots only of trims.
        None => AppHost::log_service(snaps, policy),
        Some(sm) => {
            info!(node = cfg.id, ?policy, "embedded state machine");
            AppHost::new(sm, snaps, policy)
        }
    };
    let app = Some(app);

    let listener = TcpListener::bind(me.client_addr).map_err(|source| ServeError::Bind {
        what: "client",
        addr: me.client_addr.to_string(),
        source,
    })?;
    let (tx, rx) = std::sync::mpsc::channel();
    let waker = transport.waker();
    let local = Local::default();
    let local_tx = tx.clone();
    let local_waker = transport.waker();
    let mut ccfg = ClientServerConfig::new(cfg.cluster_id, cfg.id);
    ccfg.max_connections = cfg.limits.max_client_connections as usize;
    ccfg.max_frame = cfg.limits.max_frame_bytes.min(u32::MAX as u64) as u32;
    ccfg.max_inflight_per_conn = cfg.limits.max_inflight_per_client as usize;
    ccfg.max_inflight_bytes = cfg.limits.max_inflight_bytes as usize;
    ccfg.spin = cfg.timing.spin();
    ccfg.client_secret = cfg.read_client_secret().map_err(|e| ServeError::Security(e.to_string()))?;
    ccfg.tls = match (&cfg.security.tls_cert_file, &cfg.security.tls_key_file) {
        (None, None) => None,
        (Some(cert), Some(key)) => {
            let t = crate::client::tls::server_config(cert, key).map_err(|e| ServeError::Security(e.to_string()))?;
            info!(node = cfg.id, cert = %cert.display(), "client port: TLS");
            Some(t)
        }
        _ => {
            return Err(ServeError::Security(
                "security.tls_cert_file and security.tls_key_file go together: give both or neither".into(),
            ))
        }
    };
    if ccfg.client_secret.is_none() {
        warn!(node = cfg.id, "client port: no client_secret_file, clients are not authenticated");
    } else {
        info!(node = cfg.id, "client port: clients must prove the client secret");
    }
    // The client port on the replica's polling thread when the transport can wait on
    // its descriptor too (two fewer thread wake-ups per request), else on a thread.
    let bind_err = |source| ServeError::Bind { what: "client", addr: me.client_addr.to_string(), source };
    let (clients, port) = if cfg.timing.client_port_thread {
        (ClientServer::start(listener, ccfg, tx, Arc::new(move || waker.wake())).map_err(bind_err)?, None)
    } else {
        let l2 = listener.try_clone().map_err(bind_err)?;
        let (server, port) = ClientServer::start_inline(listener, ccfg.clone(), tx.clone()).map_err(bind_err)?;
        if transport.watch_fd(port.fd()).map_err(bind_err)? {
            info!(node = cfg.id, "client port served on the replica's polling thread");
            (server, Some(port))
        } else {
            drop(port);
            server.shutdown();
            (ClientServer::start(l2, ccfg, tx, Arc::new(move || waker.wake())).map_err(bind_err)?, None)
        }
    };

    let metrics = Metrics::new(cfg.id);
    let metrics_server = match me.metrics_addr {
        Some(addr) => {
            let l = TcpListener::bind(addr).map_err(|source| ServeError::Bind {
                what: "metrics",
                addr: addr.to_string(),
                source,
            })?;
            Some(MetricsServer::start(l, metrics.clone()).map_err(|source| ServeError::Bind {
                what: "metrics",
                addr: addr.to_string(),
                source,
            })?)
        }
        None => None,
    };
    info!(
        node = cfg.id,
        peer = %me.peer_addr,
        client = %me.client_addr,
        metrics = ?me.metrics_addr,
        "listening"
    );

    // Every remote write and read answer must fit a transport payload: bound the slots
    // per access by the largest slot a batch can make.
    let mut paxos = cfg.paxos_config();
    // Over RDMA in memory mode a leader counts a follower's acceptance when its write
    // landed, not when the follower answered: followers must then fence the writer
    // before their promise rises (`Action::Fence`, `Transport::fence`).
    paxos.accept_on_landing = transport.completes_on_landing();
    // (The TCP transport's limit is max_frame_bytes; RDMA's is also bounded by a cell.)
    let max_payload = transport.max_payload().min(cfg.limits.max_frame_bytes as usize);
    let per_slot = paxos.max_batch_bytes + paxos.max_batch_entries * 24 + 64;
    if per_slot + 64 > max_payload {
        return Err(ServeError::Limits(format!(
            "a batch of up to {} bytes in {} entries does not fit a frame of {max_payload} bytes \
             (raise limits.max_frame_bytes, and rdma.cell_bytes over RDMA, or lower limits.max_batch_bytes)",
            paxos.max_batch_bytes, paxos.max_batch_entries
        )));
    }
    paxos.max_write_slots = paxos.max_write_slots.min((max_payload / per_slot).max(1));
    paxos.max_read_slots = paxos.max_read_slots.min((max_payload / (per_slot + 32)).max(1) as u64);
    let opts = NodeOptions {
        paxos,
        cluster_id: cfg.cluster_id,
        client_addrs: cfg.members.iter().map(|m| (m.id, m.client_addr.to_string())).collect(),
        directory: cfg.directory(),
        max_entry_bytes: cfg.limits.max_entry_bytes as usize,
        max_frame_bytes: cfg.limits.max_frame_bytes as usize,
        durability,
        spin: cfg.timing.spin(),
    };
    let result = Node::with_app(opts, store, transport, rx, clients.responder(), metrics, app).and_then(|node| {
        if let Some(h) = handle {
            let wake: Arc<dyn Fn() + Send + Sync> = Arc::new(move || local_waker.wake());
            let _ = h.send(ReplicaHandle::new(local_tx, wake, local.clone()));
        }
        node.with_local(local).with_client_port(port).run(stop)
    });
    clients.shutdown();
    if let Some(m) = metrics_server {
        m.shutdown();
    }
    result.map_err(Into::into)
}
