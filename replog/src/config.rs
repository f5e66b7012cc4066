//! The configuration of one replica (`replog serve --config replog.toml`): the TOML
//! file, its validation, and what the rest of the service derives from it (the
//! protocol's [`paxos::Config`], the store's [`Mode`]); plus [`init_tracing`], the
//! logging set-up.
//!
//! A file looks like `replog/examples/replog.toml`:
//!
//! ```toml
//! id = 1
//! cluster_id = 0x7265706c6f67
//! transport = "tcp"
//! durability = "fsync"
//! data_dir = "/var/lib/replog/1"
//!
//! [[members]]
//! id = 1
//! peer_addr = "10.0.0.1:7100"
//! client_addr = "10.0.0.1:7101"
//! metrics_addr = "10.0.0.1:7102"
//! # ... one [[members]] table per replica, learners with `learner = true`
//! ```
//!
//! Every key but `id`, `cluster_id` and `members` has a default. Unknown keys are
//! refused (a misspelt key is an error, not a silently ignored setting). Every error
//! names the file and the key, and the line where the parser can tell it:
//! `replog.toml: members[2].peer_addr: invalid socket address "x" (line 19, column 13)`.
//! Array indices in key paths count from 0.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

#[path = "config_dpdk.rs"]
mod dpdk;
pub use dpdk::{DpdkMember, DpdkSection};

use crate::store::format::{max_payload, MAX_SEGMENT_SIZE, MIN_SEGMENT_SIZE};
use crate::store::{Mode, StoreConfig};

/// The cluster id [`ServeConfig::local_cluster`] uses ("replog" in ASCII).
pub const LOCAL_CLUSTER_ID: u64 = 0x7265_706c_6f67;

/// The largest id or cluster id a file can hold: TOML integers are signed 64-bit.
pub const MAX_ID: u64 = i64::MAX as u64;

/// The configuration of one replica.
///
/// Build it with [`ServeConfig::load`] or [`ServeConfig::from_toml`] (which
/// validate), or [`ServeConfig::local_cluster`]; check one built by hand with
/// [`ServeConfig::validate`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// This replica's id: non-zero, one of `members`.
    pub id: u64,
    /// The cluster's id, non-zero; every peer and client handshake carries it and a
    /// mismatch is refused.
    pub cluster_id: u64,
    /// The transport between replicas: TCP, or DPDK in a binary built with the
    /// `dpdk` feature.
    #[serde(default)]
    pub transport: TransportKind,
    /// How the log is made durable.
    #[serde(default)]
    pub durability: DurabilityKind,
    /// The directory of the log's segment files; required (non-empty) unless
    /// `durability` is `memory`. Empty means unset.
    #[serde(default, skip_serializing_if = "path_is_empty")]
    pub data_dir: PathBuf,
    /// Bytes per segment file: a multiple of 8 from 4 KiB to 4 GiB (default 64 MiB).
    #[serde(default = "default_segment_size")]
    pub segment_size: u64,
    /// `fsync` mode: trimmed segment files kept (as `seg-<index>.log.spare`) to be
    /// reused as new segments, whose blocks are then already written (see
    /// [`StoreConfig::recycle_segments`]); 0 removes trimmed segments. Default 2.
    #[serde(default = "default_recycle_segments")]
    pub recycle_segments: usize,
    /// Protocol timings.
    #[serde(default)]
    pub timing: Timing,
    /// Sizes and counts that bound memory and work.
    #[serde(default)]
    pub limits: Limits,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Authentication of peers.
    #[serde(default, skip_serializing_if = "Security::is_unset")]
    pub security: Security,
    /// The replicated application and its snapshots.
    #[serde(default, skip_serializing_if = "AppConfig::is_default")]
    pub app: AppConfig,
    /// The DPDK transport's settings (with `transport = "dpdk"`; see
    /// [`DpdkSection`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpdk: Option<DpdkSection>,
    /// The RDMA transport's settings (used with `transport = "rdma"`).
    #[serde(default, skip_serializing_if = "RdmaSection::is_default")]
    pub rdma: RdmaSection,
    /// This replica joins a running cluster (`replog members add` names it there):
    /// `members` lists itself and the cluster's current voters (until the log reaches
    /// it, it accepts links only from members it knows, and the leader must be one),
    /// and it starts as a passive learner until the cluster's log adds it. Only with `transport = "tcp"` (the one
    /// transport that adds peers while running). Default false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub join: bool,
    /// The members this replica starts with, this one included: the cluster's bootstrap
    /// membership (every founding replica lists the same), or with `join` the members to
    /// contact. Members added or removed later are known from the replicated log.
    pub members: Vec<Member>,
}

/// One replica of the cluster, as every other replica and client reaches it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// The replica's id: non-zero, unique in the cluster.
    pub id: u64,
    /// Where replicas connect to it (its transport listens here).
    #[serde(deserialize_with = "de_socket_addr")]
    pub peer_addr: SocketAddr,
    /// Where clients connect to it (and where redirects to it point).
    #[serde(deserialize_with = "de_socket_addr")]
    pub client_addr: SocketAddr,
    /// Where its Prometheus endpoint listens (`GET /metrics`); none if absent.
    #[serde(default, deserialize_with = "de_opt_socket_addr", skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<SocketAddr>,
    /// A learner receives the log but never votes nor leads (default false).
    #[serde(default, skip_serializing_if = "is_false")]
    pub learner: bool,
}

/// The transport between replicas.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// TCP (the fallback that runs anywhere).
    #[default]
    Tcp,
    /// RDMA verbs (in a build with the `rdma` feature; see `[rdma]`).
    Rdma,
    /// DPDK Ethernet frames (built with the `dpdk` feature; needs a `[dpdk]` section).
    Dpdk,
}

impl TransportKind {
    /// The name used in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Tcp => "tcp",
            TransportKind::Rdma => "rdma",
            TransportKind::Dpdk => "dpdk",
        }
    }
}

/// How the log is made durable (see [`crate::store`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DurabilityKind {
    /// Memory only: an acknowledged append survives only while a majority of
    /// replicas keeps running.
    Memory,
    /// Files with `fdatasync` and group commit (the default).
    #[default]
    Fsync,
    /// Persistent memory (the data directory must be on a DAX filesystem).
    Pmem,
}

impl DurabilityKind {
    /// The name used in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            DurabilityKind::Memory => "memory",
            DurabilityKind::Fsync => "fsync",
            DurabilityKind::Pmem => "pmem",
        }
    }
}

/// When a leader over RDMA counts a follower as having accepted a write (`[rdma]
/// landing`; see `replog::rdma_agent`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LandingKind {
    /// By durability: `memory` at the RDMA WRITE's completion (the follower's CPU is not
    /// on the path); `pmem` with `rdma.region_path` (the cell ring on a device-dax
    /// device) as [`LandingKind::ReadAfterWrite`]; `fsync`, and `pmem` without a
    /// `region_path` (the ring in ordinary memory, so a landed cell is not durable), by
    /// the follower's acknowledgement.
    #[default]
    Auto,
    /// Always by the follower's acknowledgement, written after its core took the cell
    /// (and, under `fsync`, after its sync).
    Ack,
    /// At the completion of an RDMA READ of the cell's last word posted right after the
    /// WRITE (read-after-write: the WRITE was placed). With `durability = "memory"`, or
    /// `"pmem"` with `rdma.region_path` (the ring on persistent memory).
    ReadAfterWrite,
}

impl LandingKind {
    /// The name used in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            LandingKind::Auto => "auto",
            LandingKind::Ack => "ack",
            LandingKind::ReadAfterWrite => "read_after_write",
        }
    }
}

/// Protocol timings in milliseconds (integers or fractions: `heartbeat_ms = 0.5`).
/// The defaults suit TCP on loopback or a LAN.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timing {
    /// How often a leader sends heartbeats (default 10 ms). Must be below half the
    /// election timeout.
    #[serde(deserialize_with = "de_ms")]
    pub heartbeat_ms: f64,
    /// The minimum election timeout; each wait is drawn from `[t, 2t)` (default
    /// 150 ms: on a loaded 2-core machine 50 ms caused elections without faults).
    /// Also the lease a follower honours before it lets an election start.
    #[serde(deserialize_with = "de_ms")]
    pub election_timeout_ms: f64,
    /// How long a leader waits for a follower's progress before re-sending (default
    /// 40 ms).
    #[serde(deserialize_with = "de_ms")]
    pub retransmit_ms: f64,
    /// Spin-then-block waits: after any activity, the replica's polling thread and its
    /// client-port thread keep polling without sleeping for this many microseconds
    /// before they block (default 0: block at once). Spinning saves a wake-up per hop
    /// (tens of microseconds on a VM) when there are spare cores, and costs throughput
    /// when busy threads outnumber the cores: `bench --spin-us 0,50` measures both.
    pub spin_us: u64,
    /// Serve the client port on a thread of its own (default false: on the replica's
    /// polling thread, where the transport can wait on both, which saves two thread
    /// wake-ups per request; the TCP transport can, RDMA and DPDK use a thread).
    pub client_port_thread: bool,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            heartbeat_ms: 10.0,
            election_timeout_ms: 150.0,
            retransmit_ms: 40.0,
            spin_us: 0,
            client_port_thread: false,
        }
    }
}

impl Timing {
    /// The heartbeat interval in nanoseconds.
    pub fn heartbeat_ns(&self) -> u64 {
        ms_to_ns(self.heartbeat_ms)
    }

    /// The election timeout in nanoseconds.
    pub fn election_timeout_ns(&self) -> u64 {
        ms_to_ns(self.election_timeout_ms)
    }

    /// How long the polling threads spin before they block.
    pub fn spin(&self) -> std::time::Duration {
        std::time::Duration::from_micros(self.spin_us)
    }

    /// The retransmit timeout in nanoseconds.
    pub fn retransmit_ns(&self) -> u64 {
        ms_to_ns(self.retransmit_ms)
    }
}

/// Sizes and counts that bound memory and work.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// The largest client entry accepted (default 1 MiB).
    pub max_entry_bytes: u64,
    /// Maximum client entries batched into one slot (default 1024).
    pub max_batch_entries: u64,
    /// Maximum payload bytes batched into one slot (default 1 MiB; a single larger
    /// entry still goes alone).
    pub max_batch_bytes: u64,
    /// Maximum slots a leader keeps open, proposed but not committed (default 256).
    pub window: u64,
    /// Maximum slots carried by one remote write (default 64).
    pub max_write_slots: u64,
    /// Maximum slots one remote read answers (default 1024).
    pub max_read_slots: u64,
    /// Maximum client entries waiting at the leader for a slot; beyond it appends are
    /// refused as busy (default 65536).
    pub max_pending_entries: u64,
    /// Maximum open client connections; further ones are refused (default 1024).
    pub max_client_connections: u64,
    /// The largest client-protocol frame payload accepted (default 16 MiB).
    pub max_frame_bytes: u64,
    /// Most requests one client connection may have in flight (sent, not answered);
    /// beyond it requests are answered busy (default 64).
    pub max_inflight_per_client: u64,
    /// Most bytes of client requests in flight at a replica over all connections;
    /// beyond it requests are answered busy (default 256 MiB).
    pub max_inflight_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entry_bytes: 1 << 20,
            max_batch_entries: 1024,
            max_batch_bytes: 1 << 20,
            window: 256,
            max_write_slots: 64,
            max_read_slots: 1024,
            max_pending_entries: 1 << 16,
            max_client_connections: 1024,
            max_frame_bytes: crate::client::MAX_FRAME as u64,
            max_inflight_per_client: 64,
            max_inflight_bytes: 256 << 20,
        }
    }
}

/// Authentication (`[security]`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Security {
    /// A file holding the cluster secret (its bytes, surrounding whitespace removed;
    /// a relative path is taken from the working directory). Every member must hold the
    /// same secret: each peer link then proves it both ways in its handshake (see
    /// `fallback_tcp::wire`), so a process without it cannot join, vote or write.
    /// Unset (the default): peers are not authenticated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// A file holding the client secret (same format). Set: every client connection
    /// must prove it knows it (an HMAC-SHA256 challenge, see `replog::client::proto`)
    /// before any request. Unset (the default): clients are not authenticated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret_file: Option<PathBuf>,
    /// The client port's TLS certificate chain (PEM). With `tls_key_file`, the client
    /// port speaks TLS only (see `replog::client::tls`). Unset (the default): plain TCP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// The private key of `tls_cert_file` (PEM). Both or neither.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    /// This replica's certificate chain for the peer links (PEM). With
    /// `peer_tls_key_file` and `peer_tls_ca_file` (all three or none), every peer link
    /// (TCP transport) runs mutual TLS (see `fallback_tcp::PeerTls`): the certificate,
    /// signed by the cluster CA, must be good for server and client authentication and
    /// carry the IP address of this member's `peer_addr`. Unset (the default): peer
    /// frames travel in plaintext.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_tls_cert_file: Option<PathBuf>,
    /// The private key of `peer_tls_cert_file` (PEM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_tls_key_file: Option<PathBuf>,
    /// The cluster CA (PEM): peers' certificates must chain to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_tls_ca_file: Option<PathBuf>,
}

impl Security {
    fn is_unset(&self) -> bool {
        self.secret_file.is_none()
            && self.client_secret_file.is_none()
            && self.tls_cert_file.is_none()
            && self.tls_key_file.is_none()
            && self.peer_tls_cert_file.is_none()
            && self.peer_tls_key_file.is_none()
            && self.peer_tls_ca_file.is_none()
    }

    /// The peer TLS files (certificate, key, CA), all three or none.
    fn peer_tls_files(&self) -> Result<Option<(&Path, &Path, &Path)>, ConfigError> {
        match (&self.peer_tls_cert_file, &self.peer_tls_key_file, &self.peer_tls_ca_file) {
            (None, None, None) => Ok(None),
            (Some(c), Some(k), Some(a)) => Ok(Some((c, k, a))),
            (c, k, a) => {
                let names = [("peer_tls_cert_file", c), ("peer_tls_key_file", k), ("peer_tls_ca_file", a)];
                let missing: Vec<String> =
                    names.iter().filter(|(_, v)| v.is_none()).map(|(n, _)| format!("security.{n}")).collect();
                Err(ConfigError::at(
                    "security".to_string(),
                    format!(
                        "peer TLS needs peer_tls_cert_file, peer_tls_key_file and peer_tls_ca_file together: \
                         {} missing",
                        missing.join(" and ")
                    ),
                ))
            }
        }
    }
}

/// Which state machine a replica runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateMachineKind {
    /// None: the replicated log service (clients read entries by position). Never
    /// snapshots or trims.
    #[default]
    Log,
    /// The example replicated key-value map (`set`/`del` appends, `get`/`len` queries),
    /// with snapshots by policy.
    Kv,
}

/// The replicated application (`[app]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppConfig {
    /// The state machine (default `log`: none).
    pub state_machine: StateMachineKind,
    /// Snapshot after this many applied entries (0: not by count). Default 100000.
    pub snapshot_every_entries: u64,
    /// Snapshot after this many applied payload bytes (0: not by size). Default 256 MiB.
    pub snapshot_every_bytes: u64,
    /// Snapshot after this many seconds if anything was applied (0: not by time).
    pub snapshot_interval_s: u64,
    /// Slots kept in the log behind a snapshot, for followers that lag a little.
    pub snapshot_keep_slots: u64,
    /// Snapshot transfer chunk size in bytes (at most the frame limit less 64).
    pub snapshot_chunk_bytes: u64,
}

impl Default for AppConfig {
    fn default() -> Self {
        let p = crate::app::SnapshotPolicy::default();
        AppConfig {
            state_machine: StateMachineKind::Log,
            snapshot_every_entries: p.every_entries,
            snapshot_every_bytes: p.every_bytes,
            snapshot_interval_s: 0,
            snapshot_keep_slots: p.keep_slots,
            snapshot_chunk_bytes: p.chunk_bytes as u64,
        }
    }
}

impl AppConfig {
    fn is_default(&self) -> bool {
        *self == AppConfig::default()
    }

    /// The snapshot policy, with chunks that fit a frame of `max_frame` bytes.
    pub fn policy(&self, max_frame: u64) -> crate::app::SnapshotPolicy {
        let chunk = self.snapshot_chunk_bytes.clamp(1, max_frame.saturating_sub(64).max(1));
        crate::app::SnapshotPolicy {
            every_entries: self.snapshot_every_entries,
            every_bytes: self.snapshot_every_bytes,
            interval: (self.snapshot_interval_s > 0).then(|| std::time::Duration::from_secs(self.snapshot_interval_s)),
            keep_slots: self.snapshot_keep_slots,
            chunk_bytes: chunk as usize,
            window: 4,
        }
    }
}

/// The RDMA transport (`[rdma]`, used with `transport = "rdma"`; needs a build with the
/// `rdma` feature). Replicas reach each other's side channel at `peer_addr` (TCP: the
/// queue-pair bootstrap, authentication and control messages); log writes go one-sided
/// into the follower's registered region, a ring of `cell_bytes` cells (see
/// `replog::rdma_region`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RdmaSection {
    /// The RDMA device (`ibv_devices`: e.g. `mlx5_0`, `rxe0`); empty: the first one.
    pub device: String,
    /// The device port. Default 1.
    pub port: u8,
    /// The GID index (RoCE v2: the IPv4-mapped GID of the interface; `show_gids`).
    /// Default 1.
    pub gid_index: u8,
    /// The registered log region's size in bytes. Default 128 MiB.
    pub region_bytes: u64,
    /// The size of one cell of the region's ring (one remote write each; larger writes
    /// are refused, and the slots per write are bounded to fit; it must hold one slot of
    /// `limits.max_batch_bytes`). Default 2 MiB.
    pub cell_bytes: u64,
    /// The accepted-entries read mirror's size in bytes (registered remote-read-only;
    /// candidates read log tails from it by RDMA READ, see `replog::rdma_mirror`); 0: no
    /// mirror, tails are read over the side channel. Default 1 MiB.
    pub mirror_bytes: u64,
    /// Bytes per mirror record (one slot each; a slot whose value does not fit is read
    /// over the side channel). A multiple of 8, at least 64. Default 1 KiB.
    pub mirror_record_bytes: u64,
    /// When the leader counts a write as accepted by a follower: `auto` (default: at
    /// the RDMA WRITE's completion under `durability = "memory"`; under `pmem` with a
    /// `region_path`, at a read-after-write; else by the follower's acknowledgement),
    /// `ack`, or `read_after_write` (`memory`, or `pmem` with a `region_path`).
    pub landing: LandingKind,
    /// Where the registered log region (the cell ring) lives: empty (default),
    /// anonymous memory, zeroed at every start; an absolute path, a shared mapping of a
    /// device-dax device (`/dev/daxN.M`, persistent memory; `ndctl create-namespace
    /// --mode=devdax`) whose contents survive a restart, `region_bytes` rounded up to
    /// the device's alignment must fit in it. Under `durability = "pmem"` it must be a
    /// device-dax device and puts the ring on persistent memory, so a landed cell is
    /// durable: `landing = "auto"` then completes writes at a read-after-write (no
    /// follower CPU on the path). Every replica of a cluster must be configured alike:
    /// the leader decides how its writes complete from its own configuration. Each
    /// replica on a machine needs its own device.
    #[serde(skip_serializing_if = "path_is_empty")]
    pub region_path: PathBuf,
}

impl Default for RdmaSection {
    fn default() -> Self {
        RdmaSection {
            device: String::new(),
            port: 1,
            gid_index: 1,
            region_bytes: 128 << 20,
            cell_bytes: 2 << 20,
            mirror_bytes: 1 << 20,
            mirror_record_bytes: 1 << 10,
            landing: LandingKind::Auto,
            region_path: PathBuf::new(),
        }
    }
}

impl RdmaSection {
    fn is_default(&self) -> bool {
        *self == RdmaSection::default()
    }

    /// Where the cell ring lives (`region_path`), if not in anonymous memory.
    pub fn ring_path(&self) -> Option<&Path> {
        (!path_is_empty(&self.region_path)).then_some(self.region_path.as_path())
    }
}

/// Logging.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter: a level (`info`) or directives (`info,replog=debug`).
    /// `RUST_LOG`, when set, takes precedence. Default `info`.
    pub level: String,
    /// The line format on standard error.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { level: "info".to_string(), format: LogFormat::Text }
    }
}

impl LogConfig {
    /// Installs the global `tracing` subscriber this configuration describes (see
    /// [`init_tracing`]).
    pub fn init(&self) {
        init_tracing(&self.level, self.format == LogFormat::Json);
    }
}

/// The line format of logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines with `key=value` fields.
    #[default]
    Text,
    /// One JSON object per line (for log shippers).
    Json,
}

/// Why a configuration is refused. Messages name the origin (usually the file) and
/// the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{origin}: cannot read the configuration: {source}")]
    Io {
        /// The file.
        origin: String,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// The text is not TOML, or does not have the shape of a configuration (a wrong
    /// type, an unknown or missing key).
    #[error("{origin}: {}{message}{}", key_prefix(key), at_line(*line, *column))]
    Parse {
        /// The file.
        origin: String,
        /// The key path (`members[2].peer_addr`), when it can be told.
        key: Option<String>,
        /// What is wrong.
        message: String,
        /// 1-based line, when known.
        line: Option<usize>,
        /// 1-based column, when known.
        column: Option<usize>,
    },
    /// The configuration parses but is not valid.
    #[error("{origin}: {}{message}", key_prefix(key))]
    Invalid {
        /// The file (`"configuration"` for one built in code).
        origin: String,
        /// The key path, when one key is at fault.
        key: Option<String>,
        /// What is wrong.
        message: String,
    },
}

fn key_prefix(key: &Option<String>) -> String {
    key.as_ref().map(|k| format!("{k}: ")).unwrap_or_default()
}

fn at_line(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(" (line {l}, column {c})"),
        (Some(l), None) => format!(" (line {l})"),
        _ => String::new(),
    }
}

impl ConfigError {
    /// The key path at fault, if known.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Io { .. } => None,
            ConfigError::Parse { key, .. } | ConfigError::Invalid { key, .. } => key.as_deref(),
        }
    }

    /// The same error attributed to `origin`.
    pub fn with_origin(mut self, new: &str) -> Self {
        match &mut self {
            ConfigError::Io { origin, .. }
            | ConfigError::Parse { origin, .. }
            | ConfigError::Invalid { origin, .. } => *origin = new.to_string(),
        }
        self
    }

    /// A [`ConfigError::Invalid`] at `key`.
    fn at(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid { origin: DEFAULT_ORIGIN.to_string(), key: Some(key.into()), message: message.into() }
    }

    /// A [`ConfigError::Invalid`] about no single key.
    fn general(message: impl Into<String>) -> Self {
        ConfigError::Invalid { origin: DEFAULT_ORIGIN.to_string(), key: None, message: message.into() }
    }
}

const DEFAULT_ORIGIN: &str = "configuration";

/// The slack, beyond the payload bytes, that one slot's encoding may take per entry
/// (client id, sequence, length) and in total (tag, count, record metadata).
const ENTRY_OVERHEAD: u64 = 20;
const SLOT_OVERHEAD: u64 = 256;
/// Client-protocol framing around one appended entry.
const FRAME_OVERHEAD: u64 = 4096;

impl ServeConfig {
    /// Reads, parses and validates the file at `path`; errors name it.
    pub fn load(path: &Path) -> Result<ServeConfig, ConfigError> {
        let origin = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Io { origin: origin.clone(), source })?;
        Self::from_toml(&text, &origin)
    }

    /// Parses and validates `text`; errors name `origin` (a file name).
    pub fn from_toml(text: &str, origin: &str) -> Result<ServeConfig, ConfigError> {
        let cfg: ServeConfig = toml::from_str(text).map_err(|e| {
            let (line, column) = match e.span() {
                Some(s) => {
                    let (l, c) = line_col(text, s.start);
                    (Some(l), Some(c))
                }
                None => (None, None),
            };
            let key = e.span().and_then(|s| key_at(text, s.start));
            ConfigError::Parse {
                origin: origin.to_string(),
                key,
                message: e.message().trim_end().to_string(),
                line,
                column,
            }
        })?;
        cfg.validate().map_err(|e| e.with_origin(origin))?;
        Ok(cfg)
    }

    /// Checks everything [`from_toml`](Self::from_toml) checks after parsing. Errors
    /// are attributed to the origin `"configuration"`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cluster_id == 0 {
            return Err(ConfigError::at("cluster_id".to_string(), "must be non-zero"));
        }
        if self.cluster_id > MAX_ID {
            return Err(ConfigError::at(
                "cluster_id".to_string(),
                format!("{} is above {MAX_ID} (TOML integers are signed 64-bit)", self.cluster_id),
            ));
        }
        if self.id == 0 {
            return Err(ConfigError::at("id".to_string(), "must be non-zero"));
        }
        if self.members.is_empty() {
            return Err(ConfigError::at(
                "members".to_string(),
                "no members: list every replica in a [[members]] table",
            ));
        }
        self.validate_members()?;
        if !self.members.iter().any(|m| m.id == self.id) {
            let ids: Vec<String> = self.members.iter().map(|m| m.id.to_string()).collect();
            return Err(ConfigError::general(format!("id {} is not among members ({})", self.id, ids.join(", "))));
        }
        if self.join && self.transport != TransportKind::Tcp {
            return Err(ConfigError::at(
                "join".to_string(),
                format!(
                    "joining a running cluster needs transport = \"tcp\" (the {} transport cannot add peers \
                     while running: configure the member on every replica and restart them)",
                    self.transport.as_str()
                ),
            ));
        }
        if self.join && !self.members.iter().any(|m| m.id != self.id && !m.learner) {
            return Err(ConfigError::at(
                "members".to_string(),
                "join = true: list the cluster's current voters (to contact) besides this replica",
            ));
        }
        if self.members.iter().all(|m| m.learner) {
            return Err(ConfigError::at(
                "members".to_string(),
                "every member is a learner: the cluster needs at least one voter",
            ));
        }
        if let Some(p) = self.rdma.ring_path() {
            if !p.is_absolute() {
                return Err(ConfigError::at(
                    "rdma.region_path".to_string(),
                    format!(
                        "{}: must be an absolute path (a device-dax device such as /dev/dax0.0), or empty for \
                         anonymous memory",
                        p.display()
                    ),
                ));
            }
        }
        let ring_persistent = self.durability == DurabilityKind::Pmem && self.rdma.ring_path().is_some();
        if self.rdma.landing == LandingKind::ReadAfterWrite
            && self.durability != DurabilityKind::Memory
            && !ring_persistent
        {
            let why = if self.durability == DurabilityKind::Pmem {
                "with \"pmem\" it needs rdma.region_path, a device-dax device holding the cell ring: without \
                 one the ring is ordinary memory, so a landed cell is not durable"
                    .to_string()
            } else {
                format!(
                    "with \"{}\" the cell ring is not persistent memory, so a landed cell is not durable",
                    self.durability.as_str()
                )
            };
            return Err(ConfigError::at(
                "rdma.landing".to_string(),
                format!(
                    "\"read_after_write\" needs durability = \"memory\", or \"pmem\" with rdma.region_path \
                     ({why}): use \"auto\" or \"ack\""
                ),
            ));
        }
        if self.transport == TransportKind::Dpdk && cfg!(feature = "dpdk") {
            let Some(d) = &self.dpdk else {
                return Err(ConfigError::at(
                    "dpdk".to_string(),
                    "transport = \"dpdk\" needs a [dpdk] section (the port, EAL arguments and every member's MAC)",
                ));
            };
            let ids: Vec<u64> = self.members.iter().map(|m| m.id).collect();
            d.validate(&ids)?;
        } else if self.transport == TransportKind::Rdma && cfg!(feature = "rdma") {
            let r = &self.rdma;
            if r.cell_bytes < 4096 || !r.cell_bytes.is_multiple_of(8) || r.cell_bytes > r.region_bytes {
                return Err(ConfigError::at(
                    "rdma.cell_bytes".to_string(),
                    format!(
                        "{} must be a multiple of 8, at least 4096 and at most rdma.region_bytes ({})",
                        r.cell_bytes, r.region_bytes
                    ),
                ));
            }
            if r.region_bytes / r.cell_bytes < 4 {
                return Err(ConfigError::at(
                    "rdma.region_bytes".to_string(),
                    format!("{} holds fewer than 4 cells of rdma.cell_bytes ({})", r.region_bytes, r.cell_bytes),
                ));
            }
            if r.mirror_bytes > 0 {
                let (len, stride) = (r.mirror_bytes as usize, r.mirror_record_bytes as usize);
                if let Err(e) = crate::rdma_mirror::geometry(len, stride) {
                    return Err(ConfigError::at("rdma.mirror_record_bytes".to_string(), e.to_string()));
                }
                if !r.mirror_bytes.is_multiple_of(8) || r.mirror_bytes > u32::MAX as u64 {
                    return Err(ConfigError::at(
                        "rdma.mirror_bytes".to_string(),
                        format!("{} must be a multiple of 8 below 4 GiB (0: no mirror)", r.mirror_bytes),
                    ));
                }
            }
        } else if self.transport != TransportKind::Tcp {
            let name = self.transport.as_str();
            return Err(ConfigError::at(
                "transport".to_string(),
                format!(
                    "\"{name}\": the {} backend is not built in this binary yet (only \
                     \"tcp\" is)",
                    name.to_uppercase()
                ),
            ));
        }
        if self.durability != DurabilityKind::Memory && path_is_empty(&self.data_dir) {
            return Err(ConfigError::at(
                "data_dir".to_string(),
                format!(
                    "required with durability = \"{}\" (only \"memory\" runs without one)",
                    self.durability.as_str()
                ),
            ));
        }
        let seg = self.segment_size;
        if !(MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&seg) || seg & 7 != 0 {
            return Err(ConfigError::at(
                "segment_size".to_string(),
                format!("{seg} must be a multiple of 8 from {MIN_SEGMENT_SIZE} to {MAX_SEGMENT_SIZE}"),
            ));
        }
        if self.security.peer_tls_files()?.is_some() && self.transport != TransportKind::Tcp {
            return Err(ConfigError::at(
                "security".to_string(),
                format!(
                    "peer_tls_* files are for the tcp transport; transport = \"{}\" does not run TLS",
                    self.transport.as_str()
                ),
            ));
        }
        self.validate_timing()?;
        self.validate_limits()?;
        self.validate_log()?;
        // A backstop: whatever the protocol itself refuses.
        self.paxos_config()
            .validate()
            .map_err(|e| ConfigError::general(format!("the protocol configuration is refused: {e}")))
    }

    fn validate_members(&self) -> Result<(), ConfigError> {
        let mut ids: HashMap<u64, usize> = HashMap::new();
        let mut addrs: HashMap<SocketAddr, String> = HashMap::new();
        for (i, m) in self.members.iter().enumerate() {
            let at = |k: &str| format!("members[{i}].{k}");
            if m.id == 0 {
                return Err(ConfigError::at(at("id"), "must be non-zero"));
            }
            if m.id > MAX_ID {
                return Err(ConfigError::at(at("id"), format!("{} is above {MAX_ID}", m.id)));
            }
            if let Some(j) = ids.insert(m.id, i) {
                return Err(ConfigError::at(at("id"), format!("duplicate member id {} (also members[{j}].id)", m.id)));
            }
            let listed = [
                ("peer_addr", Some(m.peer_addr)),
                ("client_addr", Some(m.client_addr)),
                ("metrics_addr", m.metrics_addr),
            ];
            for (k, a) in listed {
                let Some(a) = a else { continue };
                if k != "metrics_addr" {
                    if a.ip().is_unspecified() {
                        return Err(ConfigError::at(
                            at(k),
                            format!(
                                "{a} is unspecified: others connect to this address, give \
                                 one they can reach"
                            ),
                        ));
                    }
                    if a.port() == 0 {
                        return Err(ConfigError::at(
                            at(k),
                            format!("{a} has port 0: others connect to it, give a fixed port"),
                        ));
                    }
                }
                if let Some(prev) = addrs.insert(a, at(k)) {
                    return Err(ConfigError::at(at(k), format!("duplicate address {a} (also {prev})")));
                }
            }
        }
        Ok(())
    }

    fn validate_timing(&self) -> Result<(), ConfigError> {
        let t = &self.timing;
        for (k, v) in [
            ("heartbeat_ms", t.heartbeat_ms),
            ("election_timeout_ms", t.election_timeout_ms),
            ("retransmit_ms", t.retransmit_ms),
        ] {
            if !v.is_finite() || !(0.001..=3_600_000.0).contains(&v) {
                return Err(ConfigError::at(
                    format!("timing.{k}"),
                    format!("{v} is out of range: give milliseconds from 0.001 to 3600000"),
                ));
            }
        }
        if t.spin_us > 100_000 {
            return Err(ConfigError::at(
                "timing.spin_us".to_string(),
                format!("{} is out of range: give microseconds from 0 to 100000", t.spin_us),
            ));
        }
        if t.heartbeat_ms >= t.election_timeout_ms / 2.0 {
            return Err(ConfigError::at(
                "timing.heartbeat_ms".to_string(),
                format!(
                    "{} must be below half of timing.election_timeout_ms ({}), so that a \
                     follower hears several heartbeats per election timeout",
                    t.heartbeat_ms, t.election_timeout_ms
                ),
            ));
        }
        Ok(())
    }

    fn validate_limits(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        for (k, v) in [
            ("max_entry_bytes", l.max_entry_bytes),
            ("max_batch_entries", l.max_batch_entries),
            ("max_batch_bytes", l.max_batch_bytes),
            ("window", l.window),
            ("max_write_slots", l.max_write_slots),
            ("max_read_slots", l.max_read_slots),
            ("max_pending_entries", l.max_pending_entries),
            ("max_client_connections", l.max_client_connections),
            ("max_frame_bytes", l.max_frame_bytes),
            ("max_inflight_per_client", l.max_inflight_per_client),
            ("max_inflight_bytes", l.max_inflight_bytes),
        ] {
            if v == 0 {
                return Err(ConfigError::at(format!("limits.{k}"), "must be non-zero"));
            }
            if v > u32::MAX as u64 {
                return Err(ConfigError::at(format!("limits.{k}"), format!("{v} is above {}", u32::MAX)));
            }
        }
        if l.max_frame_bytes < l.max_entry_bytes + FRAME_OVERHEAD {
            return Err(ConfigError::at(
                "limits.max_frame_bytes".to_string(),
                format!(
                    "{} cannot carry an entry of limits.max_entry_bytes ({}): give at least \
                     {}",
                    l.max_frame_bytes,
                    l.max_entry_bytes,
                    l.max_entry_bytes + FRAME_OVERHEAD
                ),
            ));
        }
        // The largest slot: a batch up to max_batch_bytes, or one entry alone.
        let slot = l.max_batch_bytes.max(l.max_entry_bytes) + l.max_batch_entries * ENTRY_OVERHEAD + SLOT_OVERHEAD;
        let room = max_payload(self.segment_size);
        if slot > room {
            return Err(ConfigError::at(
                "segment_size".to_string(),
                format!(
                    "{} holds records of at most {room} bytes, but a slot may take {slot} \
                     (limits.max_batch_bytes, limits.max_entry_bytes, \
                     limits.max_batch_entries): raise segment_size or lower the limits",
                    self.segment_size
                ),
            ));
        }
        Ok(())
    }

    fn validate_log(&self) -> Result<(), ConfigError> {
        check_filter(&self.log.level).map_err(|why| {
            ConfigError::at(
                "log.level",
                format!(
                    "invalid filter \"{}\": {why} (give a level: trace, debug, info, warn, \
                     error or off; or directives such as \"info,replog=debug\")",
                    self.log.level
                ),
            )
        })
    }

    /// This replica's entry in `members`.
    ///
    /// # Panics
    /// If `id` is not among the members (a configuration that did not validate).
    pub fn me(&self) -> &Member {
        self.member(self.id).unwrap_or_else(|| panic!("replica {} is not among the members", self.id))
    }

    /// The member with id `id`.
    pub fn member(&self, id: u64) -> Option<&Member> {
        self.members.iter().find(|m| m.id == id)
    }

    /// Every member but this replica.
    pub fn peers(&self) -> impl Iterator<Item = &Member> + '_ {
        self.members.iter().filter(move |m| m.id != self.id)
    }

    /// The protocol's configuration: voters are the non-learner members (in file
    /// order), learners the others; timings in nanoseconds; the limits; the seed of
    /// the election jitter is this replica's id.
    ///
    /// A joining replica (`join`) is in neither list: it starts passive and learns the
    /// membership from the log.
    pub fn paxos_config(&self) -> paxos::Config {
        let listed = |learner: bool| {
            self.members.iter().filter(move |m| m.learner == learner && !(self.join && m.id == self.id)).map(|m| m.id)
        };
        let mut c = paxos::Config::new(self.id, listed(false).collect());
        c.learners = listed(true).collect();
        c.heartbeat_interval = self.timing.heartbeat_ns();
        c.election_timeout = self.timing.election_timeout_ns();
        c.retransmit_timeout = self.timing.retransmit_ns();
        let l = &self.limits;
        c.window = l.window;
        c.max_batch_entries = l.max_batch_entries as usize;
        c.max_batch_bytes = l.max_batch_bytes as usize;
        c.max_write_slots = l.max_write_slots as usize;
        c.max_read_slots = l.max_read_slots;
        c.max_pending_entries = l.max_pending_entries as usize;
        c.seed = self.id;
        c
    }

    /// The store's mode for `durability`.
    pub fn store_mode(&self) -> Mode {
        match self.durability {
            DurabilityKind::Memory => Mode::Memory,
            DurabilityKind::Fsync => Mode::Fsync,
            DurabilityKind::Pmem => Mode::Pmem,
        }
    }

    /// The store's configuration: [`store_mode`](Self::store_mode), `segment_size` and
    /// `recycle_segments`.
    pub fn store_config(&self) -> StoreConfig {
        StoreConfig::new(self.store_mode())
            .with_segment_size(self.segment_size)
            .with_recycled_segments(self.recycle_segments)
    }

    /// The configurations of an `n`-replica cluster on 127.0.0.1 (for `replog up`):
    /// replica `i` (ids 1..=n) listens for peers on `base_port + 3(i-1)`, for
    /// clients on the next port and for metrics on the one after; its data directory
    /// is `data_dir/node-<i>`; the cluster id is [`LOCAL_CLUSTER_ID`]. Element `i-1`
    /// is replica `i`'s configuration.
    pub fn local_cluster(n: usize, base_port: u16, data_dir: &Path, durability: DurabilityKind) -> Vec<ServeConfig> {
        let addr = |k: usize| -> SocketAddr {
            let port = base_port as usize + k;
            assert!(port <= u16::MAX as usize, "port {port} out of range");
            SocketAddr::from(([127, 0, 0, 1], port as u16))
        };
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                id: i as u64 + 1,
                peer_addr: addr(3 * i),
                client_addr: addr(3 * i + 1),
                metrics_addr: Some(addr(3 * i + 2)),
                learner: false,
            })
            .collect();
        members
            .iter()
            .map(|m| ServeConfig {
                id: m.id,
                cluster_id: LOCAL_CLUSTER_ID,
                join: false,
                members: members.clone(),
                transport: TransportKind::Tcp,
                durability,
                data_dir: data_dir.join(format!("node-{}", m.id)),
                segment_size: StoreConfig::DEFAULT_SEGMENT_SIZE,
                recycle_segments: StoreConfig::DEFAULT_RECYCLE_SEGMENTS,
                timing: Timing::default(),
                limits: Limits::default(),
                log: LogConfig::default(),
                security: Security::default(),
                app: AppConfig::default(),
                dpdk: None,
                rdma: RdmaSection::default(),
            })
            .collect()
    }

    /// The cluster secret from `security.secret_file` (`None` when unset). An
    /// unreadable file, or one holding nothing but whitespace, is an error naming it.
    pub fn read_secret(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        read_secret_at("security.secret_file", self.security.secret_file.as_deref())
    }

    /// The peer-link TLS settings from `security.peer_tls_*_file` (`None` when unset):
    /// the files are read and checked here.
    pub fn peer_tls(&self) -> Result<Option<fallback_tcp::PeerTls>, ConfigError> {
        let Some((cert, key, ca)) = self.security.peer_tls_files()? else {
            return Ok(None);
        };
        fallback_tcp::PeerTls::from_pem_files(cert, key, ca)
            .map(Some)
            .map_err(|e| ConfigError::at("security".to_string(), e.to_string()))
    }

    /// The client secret from `security.client_secret_file` (`None` when unset), read
    /// like [`read_secret`](Self::read_secret).
    pub fn read_client_secret(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        read_secret_at("security.client_secret_file", self.security.client_secret_file.as_deref())
    }

    /// The digest of this replica's identity (id, peer and client address) that it
    /// presents in its TCP peer handshake (see [`crate::members`]).
    pub fn identity_digest(&self) -> u64 {
        let me = self.me();
        crate::members::identity_digest(self.id, me.peer_addr, me.client_addr)
    }

    /// The members listed here, as a [`crate::members::Directory`].
    pub fn directory(&self) -> crate::members::Directory {
        crate::members::Directory::new(
            self.members
                .iter()
                .map(|m| (m.id, crate::members::MemberAddrs { peer: m.peer_addr, client: m.client_addr }))
                .collect(),
        )
    }

    /// The digest of the member list (ids, addresses, roles) that peers compare in
    /// their handshake over DPDK and RDMA (whose peers are fixed at start): a replica
    /// started with another list is refused as stale.
    pub fn config_digest(&self) -> u64 {
        let mac = |id: u64| match (&self.dpdk, self.transport) {
            (Some(d), TransportKind::Dpdk) => d.mac_of(id).map(|m| format!(" {m:02x?}")).unwrap_or_default(),
            _ => String::new(),
        };
        fallback_tcp::wire::config_digest(self.members.iter().map(|m| {
            let role = if m.learner { "learner" } else { "voter" };
            (m.id, format!("{} {} {role}{}", m.peer_addr, m.client_addr, mac(m.id)))
        }))
    }

    /// The configuration as a TOML file that [`from_toml`](Self::from_toml) reads
    /// back to an equal value.
    ///
    /// # Panics
    /// If an id is above [`MAX_ID`] (TOML cannot hold it; `validate` refuses it).
    pub fn to_toml(&self) -> String {
        let body = toml::to_string(self).expect("a configuration serializes to TOML");
        let mut out = String::with_capacity(body.len() + 64);
        let _ = writeln!(out, "# replog replica {} (written by replog)", self.id);
        // The cluster id in hex, as people write it.
        let plain = format!("cluster_id = {}", self.cluster_id);
        let mut done = false;
        for line in body.lines() {
            if !done && line == plain {
                let _ = writeln!(out, "cluster_id = {:#x}", self.cluster_id);
                done = true;
            } else {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

/// The first port of a run of `n` consecutive loopback ports that were all free when
/// probed, for [`ServeConfig::local_cluster`] in test harnesses and benchmarks.
///
/// The run lies below the kernel's ephemeral port range
/// (`/proc/sys/net/ipv4/ip_local_port_range`), so no outgoing connection is given one
/// of its ports between the probe and the replica's bind (a port probed by binding to
/// port 0 can be; that race once made a replica fail with "Address already in use").
/// Successive calls in one process return disjoint runs, and processes start at
/// different places (by process id), so concurrent harnesses rarely probe the same run.
pub fn free_loopback_ports(n: u16) -> std::io::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 10_000;
    let n32 = u32::from(n.max(1));
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok().and_then(|s| {
        let mut it = s.split_whitespace().map(|w| w.parse::<u32>().ok());
        Some((it.next()??, it.next()??))
    });
    let (lo, hi) = match ephemeral {
        // Below the ephemeral range when there is room there, else above it.
        Some((first, _)) if first >= LOW + 4 * n32 => (LOW, first),
        Some((_, last)) if last + 4 * n32 < 65_536 => (last + 1, 65_536),
        Some(_) => (1024, 65_536),
        None => (LOW, 32_768),
    };
    let span = hi - lo - n32;
    let seed = std::process::id().wrapping_mul(2_654_435_761) % span;
    for _ in 0..(span / n32).min(4096) {
        let off = NEXT.fetch_add(n32, Ordering::Relaxed);
        let base = lo + (seed + off % span) % span;
        let free = (0..n32)
            .all(|i| u16::try_from(base + i).is_ok_and(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()));
        if free {
            if let Ok(b) = u16::try_from(base) {
                return Ok(b);
            }
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrNotAvailable,
        format!("no run of {n} free loopback ports in {lo}..{hi}"),
    ))
}

fn read_secret_at(key: &str, path: Option<&Path>) -> Result<Option<Vec<u8>>, ConfigError> {
    let Some(path) = path else {
        return Ok(None);
    };
    let origin = path.display().to_string();
    let bytes =
        std::fs::read(path).map_err(|e| ConfigError::at(key, format!("cannot read the secret file {origin}: {e}")))?;
    let trimmed = bytes.trim_ascii();
    if trimmed.is_empty() {
        return Err(ConfigError::at(key, format!("the secret file {origin} is empty")));
    }
    Ok(Some(trimmed.to_vec()))
}

/// Installs the global `tracing` subscriber: lines on standard error, as text or
/// (with `json`) one JSON object per line. The filter is `RUST_LOG` when that is set
/// and valid, else `level` (a level or filter directives), else `info`. Does nothing
/// if a global subscriber is already installed (tests may call it repeatedly).
pub fn init_tracing(level: &str, json: bool) {
    use tracing_subscriber::EnvFilter;
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .and_then(|s| EnvFilter::builder().parse(s).ok());
    let filter = from_env.or_else(|| EnvFilter::builder().parse(level).ok()).unwrap_or_else(|| EnvFilter::new("info"));
    use std::io::IsTerminal;
    // Colours only on a terminal: log files stay greppable (`peer=3`).
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}

/// Checks a `tracing` filter more strictly than `EnvFilter` does: a bare word must
/// be a level (`EnvFilter` takes `inf` as a target enabled at every level), and a
/// `target=level` directive must end in a level.
fn check_filter(filter: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let is_level = |s: &str| LEVELS.iter().any(|l| l.eq_ignore_ascii_case(s.trim()));
    if filter.trim().is_empty() {
        return Err("it is empty".to_string());
    }
    for d in filter.split(',') {
        let d = d.trim();
        if d.is_empty() {
            return Err("an empty directive".to_string());
        }
        match d.rsplit_once('=') {
            Some((_, lvl)) if !is_level(lvl) => {
                return Err(format!("{lvl:?} in {d:?} is not a level"));
            }
            None if !d.contains('[') && !is_level(d) => {
                return Err(format!("{d:?} is not a level"));
            }
            _ => {}
        }
    }
    tracing_subscriber::EnvFilter::builder().parse(filter).map(drop).map_err(|e| e.to_string())
}

fn ms_to_ns(ms: f64) -> u64 {
    (ms * 1e6).round() as u64
}

fn default_recycle_segments() -> usize {
    StoreConfig::DEFAULT_RECYCLE_SEGMENTS
}

fn default_segment_size() -> u64 {
    StoreConfig::DEFAULT_SEGMENT_SIZE
}

fn path_is_empty(p: &Path) -> bool {
    p.as_os_str().is_empty()
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn parse_socket_addr<E: serde::de::Error>(s: &str) -> Result<SocketAddr, E> {
    s.trim().parse().map_err(|_| {
        E::custom(format!(
            "invalid socket address {s:?} (give IP:port, such as \"127.0.0.1:7100\" or \
             \"[::1]:7100\"; host names are not resolved)"
        ))
    })
}

/// Milliseconds: an integer or a float.
fn de_ms<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    struct Ms;
    impl serde::de::Visitor<'_> for Ms {
        type Value = f64;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a number of milliseconds (such as 5 or 0.5)")
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<f64, E> {
            Ok(v as f64)
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<f64, E> {
            Ok(v as f64)
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<f64, E> {
            Ok(v)
        }
    }
    d.deserialize_any(Ms)
}

fn de_socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    parse_socket_addr(&s)
}

fn de_opt_socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    parse_socket_addr(&s).map(Some)
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..floor_char_boundary(text, offset)];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The dotted key path of the value or key at byte `offset`, for files written one
/// `key = value` per line under `[table]` and `[[array]]` headers (the layout of the
/// example and of [`ServeConfig::to_toml`]). `None` where it cannot tell.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = floor_char_boundary(text, offset.min(text.len()));
    let mut header: Option<String> = None;
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut start = 0;
    for line in text.split_inclusive('\n') {
        let end = start + line.len();
        let t = line.trim();
        let is_last = offset < end || end == text.len();
        if let Some(name) = t.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let name = name.trim().to_string();
            let n = counts.entry(name.clone()).or_insert(0);
            header = Some(format!("{name}[{n}]"));
            *n += 1;
            if is_last {
                return header;
            }
        } else if let Some(name) = t.strip_prefix('[').and_then(|r| r.split(']').next()) {
            header = Some(name.trim().to_string());
            if is_last {
                return header;
            }
        } else if is_last {
            let key = line
                .split_once('=')
                .map(|(k, _)| k.trim().trim_matches('"').to_string())
                .filter(|k| !k.is_empty() && !k.starts_with('#'));
            return match (header, key) {
                (Some(h), Some(k)) => Some(format!("{h}.{k}")),
                (None, Some(k)) => Some(k),
                (h, None) => h,
            };
        }
        start = end;
    }
    header
}
