//! # The DPDK transport: kernel-bypass Ethernet frames (feature `dpdk`)
//!
//! [`DpdkTransport`] implements [`Transport`] on one DPDK Ethernet port: frames go out
//! with `rte_eth_tx_burst` and come in with `rte_eth_rx_burst`, both called from
//! [`Transport::poll`] on the replica's polling thread (no other thread, no interrupt).
//!
//! ## Frames: plain Ethernet, our ethertype
//! Frames are Ethernet with ethertype 0x88B5 (IEEE "local experimental") and our own
//! header ([`wire`]); peers are addressed by MAC ([`DpdkConfig::peers`] maps each peer
//! id to its port's MAC). Not UDP/IP: replicas of one replog cluster sit in one layer-2
//! domain (a rack or a VLAN), where IP would add 28 bytes per frame, ARP, and
//! checksums for nothing, and a NIC's flow rules can steer our ethertype to our queue
//! directly. A routed fabric would need UDP; the header would then move behind a UDP
//! header unchanged (a change of [`wire::write_frame`]/[`wire::parse_frame`] only).
//! Frames of other ethertypes (the kernel's own traffic on an af_packet port), frames
//! not addressed to our MAC, from unknown MACs, or whose sender id does not match the
//! MAC configured for it are dropped and counted.
//!
//! ## Reliability ([`link`])
//! Per peer and direction: sequence numbers from 1, cumulative acknowledgements with a
//! 64-frame selective-ack bitmap, retransmission after [`DpdkConfig::retransmit_timeout`]
//! (early for a frame the bitmap shows was skipped), a window of
//! [`DpdkConfig::window_frames`] unacknowledged frames, out-of-order frames held within
//! the window, duplicates dropped. Records (a message, a write, a read, a completion)
//! larger than a frame are cut into fragments and joined again, so a 64 KiB entry
//! crosses as about 45 frames. Records beyond the window wait in a per-peer queue
//! bounded by [`DpdkConfig::max_queued_bytes_per_peer`] ([`SendError::Backpressure`]
//! beyond it; completions have their own, larger bound). Messages are never lost or
//! duplicated while a link is up; when it goes down, queued messages are dropped and
//! accesses in flight complete with [`AccessError::LinkFailed`].
//!
//! ## Links and the handshake
//! Each side of a link picks a random *epoch* (and a nonce) on every link reset; every
//! frame carries the sender's epoch and the receiver's as the sender knows it, and
//! frames of another incarnation are dropped. Before any message is accepted both
//! sides exchange HELLO frames (cluster id, target id, version, member-list digest,
//! nonce) until each has verified the other: with a cluster secret
//! ([`DpdkConfig::secret`]) by an HMAC-SHA256 proof over both epochs and nonces (the
//! construction of `fallback-tcp`'s challenge-response, see [`wire::proof`]), and the
//! digest ([`DpdkConfig::config_digest`]) is compared only after the proof verified, so
//! a stale member list is refused. A refusal is a `tracing` warning naming the peer
//! and the reason. [`Event::PeerUp`] follows a completed handshake; a link with no
//! frame from the peer for [`DpdkConfig::dead_link_timeout`] (keepalives flow every
//! [`DpdkConfig::keepalive_interval`]), or a peer that restarted (a HELLO with a new
//! epoch), goes down ([`Event::PeerDown`]) and handshakes again.
//!
//! ## The receiver-side agent
//! As over TCP: a WRITE from a peer that does not hold permission ([`Transport::grant`])
//! is answered "denied" by the transport itself; others surface as
//! [`Event::WriteArrived`]/[`Event::ReadArrived`] and are answered with
//! [`Transport::complete_write`]/[`Transport::complete_read`].
//!
//! ## EAL, the port, shutdown
//! [`EalConfig`] says how EAL starts (cores, memory, hugepages or `--no-huge`, vdevs or
//! PCI devices, a file prefix); [`Eal::init`] starts it once per process (EAL cannot
//! start twice) and cleans it up (`rte_eal_cleanup`) when the last handle is dropped.
//! [`DpdkTransport::new`] opens one port by name with an mbuf pool of
//! [`DpdkConfig::mbufs`] buffers; dropping the transport stops and closes the port and
//! frees the pool. Received frames are copied out of their mbufs at once (so no mbuf
//! is held across polls) and frames are built into fresh mbufs when sent.
//!
//! ## Fault injection
//! [`DpdkConfig::drop_probability`] loses that share of the frames this endpoint
//! transmits (all kinds: data, acknowledgements, handshakes), drawn from a seeded
//! generator: tests use it to show that 5% frame loss loses nothing.
//!
//! ## Waiting
//! `poll` spins while frames come, then sleeps in short, growing naps (up to
//! [`DpdkConfig::max_idle_nap`]) that [`Transport::waker`] interrupts: a
//! replica does not burn a core when idle (af_packet has no rx interrupt to wait on).
//! The polling thread's timer slack is set to 1 ns, so a nap lasts about what it asks.

pub mod link;
mod port;
pub mod wire;

pub use link::LinkStats;
pub use port::Eal;

use crate::{AccessError, Event, PeerId, SendError, Token, Transport, Wake};
use bytes::Bytes;
use hmac::Mac;
use link::Link;
use port::Port;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};
use wire::{Header, Hello, Record};

/// How EAL starts. [`EalConfig::args`] turns it into EAL's command line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EalConfig {
    /// `--lcores` (e.g. `0@2`: EAL's main lcore on CPU 2). None: EAL's default.
    pub lcores: Option<String>,
    /// `-m`: megabytes of memory to take. None: EAL's default.
    pub memory_mb: Option<u32>,
    /// `--no-huge`: ordinary memory instead of hugepages (tests; needs `memory_mb`).
    pub no_huge: bool,
    /// `--in-memory`: no shared runtime files (not with `no_huge`).
    pub in_memory: bool,
    /// `--no-shconf`: no shared configuration (af_packet side by side needs it).
    pub no_shconf: bool,
    /// `--file-prefix`: the runtime directory's name, unique per process on a host.
    pub file_prefix: Option<String>,
    /// `--vdev` arguments (e.g. `net_af_packet0,iface=eth0`).
    pub vdevs: Vec<String>,
    /// PCI devices to allow (`-a`); when empty, `--no-pci`.
    pub pci: Vec<String>,
    /// More EAL arguments, verbatim.
    pub extra: Vec<String>,
}

impl EalConfig {
    /// EAL's argv: a program name, `-d` the PMD directory, then the settings.
    pub fn args(&self) -> Vec<String> {
        let mut a = vec!["replog".to_string(), "-d".into(), dpdk_sys::PMD_DIR.into()];
        if let Some(l) = &self.lcores {
            a.push(format!("--lcores={l}"));
        }
        if let Some(m) = self.memory_mb {
            a.extend(["-m".into(), m.to_string()]);
        }
        if self.no_huge {
            a.push("--no-huge".into());
        }
        if self.in_memory {
            a.push("--in-memory".into());
        }
        if self.no_shconf {
            a.push("--no-shconf".into());
        }
        if let Some(p) = &self.file_prefix {
            a.push(format!("--file-prefix={p}"));
        }
        for v in &self.vdevs {
            a.push(format!("--vdev={v}"));
        }
        if self.pci.is_empty() {
            a.push("--no-pci".into());
        }
        for p in &self.pci {
            a.extend(["-a".into(), p.clone()]);
        }
        a.extend(self.extra.iter().cloned());
        a
    }
}

/// Why the DPDK transport could not start.
#[derive(Debug, thiserror::Error)]
pub enum DpdkError {
    /// `rte_eal_init` failed.
    #[error("EAL did not start: {message} (rte_errno {errno}); EAL arguments: {args}")]
    Eal {
        /// The arguments given.
        args: String,
        /// `rte_errno`.
        errno: i32,
        /// `rte_strerror(rte_errno)`.
        message: String,
    },
    /// EAL runs already with other arguments, or was cleaned up (it starts once per
    /// process).
    #[error("EAL cannot start: {0}")]
    EalUsed(String),
    /// No port of that name.
    #[error("no DPDK port named {name:?} (EAL arguments: {eal_args}); is the vdev or PCI device given to EAL?")]
    PortNotFound {
        /// The name looked up.
        name: String,
        /// EAL's arguments.
        eal_args: String,
    },
    /// A port operation failed.
    #[error("{what} on port {port}: {message}")]
    Port {
        /// The operation.
        what: &'static str,
        /// The port id.
        port: u16,
        /// `rte_strerror`.
        message: String,
    },
    /// The mbuf pool could not be created.
    #[error("creating a pool of {mbufs} mbufs: {message} (more memory: EAL's -m)")]
    Pool {
        /// Its size.
        mbufs: u32,
        /// `rte_strerror(rte_errno)`.
        message: String,
    },
    /// The configuration is inconsistent.
    #[error("DPDK transport configuration: {0}")]
    Config(String),
    /// The OS gave no random bytes.
    #[error("no random bytes from the OS: {0}")]
    Entropy(String),
}

/// Everything a [`DpdkTransport`] needs besides EAL. Build it with [`DpdkConfig::new`]
/// and adjust the public fields.
#[derive(Clone)]
pub struct DpdkConfig {
    /// The cluster's id; a peer presenting another is refused.
    pub cluster_id: u64,
    /// This replica's id (never 0).
    pub local: PeerId,
    /// The port's name as EAL knows it (`net_af_packet0`, or a PCI address).
    pub port: String,
    /// This replica's MAC as configured; when set, the port's MAC must equal it.
    pub local_mac: Option<[u8; 6]>,
    /// The other replicas and their ports' MACs. Must not contain `local` or 0.
    pub peers: BTreeMap<PeerId, [u8; 6]>,
    /// The largest Ethernet payload sent (our header included). Default 1500; it and
    /// the Ethernet header must fit an mbuf's data room (2048 bytes).
    pub mtu: usize,
    /// Buffers in the port's mbuf pool. Default 8191.
    pub mbufs: u32,
    /// Descriptors per rx and tx queue. Default 1024.
    pub ring: u16,
    /// Most unacknowledged frames per peer. Default 256.
    pub window_frames: usize,
    /// A frame not acknowledged after this is sent again. Default 20 ms.
    pub retransmit_timeout: Duration,
    /// The largest payload `send`, `write` or a completion may carry. Default 16 MiB.
    pub max_payload: usize,
    /// Bytes queued or unacknowledged to one peer (messages, writes, reads) beyond
    /// which `send`/`write`/`read` answer [`SendError::Backpressure`]. One record is
    /// always accepted into an empty queue. Default 64 MiB.
    pub max_queued_bytes_per_peer: usize,
    /// The same bound for completions. Default 256 MiB.
    pub max_queued_completion_bytes_per_peer: usize,
    /// HELLO frames repeat this often until a link is up. Default 50 ms.
    pub handshake_interval: Duration,
    /// An acknowledgement goes out at least this often on an up link. Default 100 ms.
    pub keepalive_interval: Duration,
    /// A link with no valid frame from the peer for this long goes down. Default 2 s.
    pub dead_link_timeout: Duration,
    /// The longest nap of an idle `poll`. Default 500 us.
    pub max_idle_nap: Duration,
    /// Fault injection: each transmitted frame is lost with this probability.
    /// Default 0.
    pub drop_probability: f64,
    /// Seed of the fault generator. Default: from `cluster_id` and `local`.
    pub seed: u64,
    /// The cluster secret (see the module docs). Default `None`.
    pub secret: Option<Vec<u8>>,
    /// The digest of the member list; a peer with another is refused. Default 0.
    pub config_digest: u64,
}

impl std::fmt::Debug for DpdkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpdkConfig")
            .field("cluster_id", &self.cluster_id)
            .field("local", &self.local)
            .field("port", &self.port)
            .field("peers", &self.peers.iter().map(|(id, m)| (id, mac_str(m))).collect::<Vec<_>>())
            .field("mtu", &self.mtu)
            .field("mbufs", &self.mbufs)
            .field("window_frames", &self.window_frames)
            .field("retransmit_timeout", &self.retransmit_timeout)
            .field("max_payload", &self.max_payload)
            .field("drop_probability", &self.drop_probability)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("config_digest", &format_args!("{:016x}", self.config_digest))
            .finish_non_exhaustive()
    }
}

impl DpdkConfig {
    /// A configuration with the defaults documented on each field.
    pub fn new(cluster_id: u64, local: PeerId, port: &str, peers: BTreeMap<PeerId, [u8; 6]>) -> Self {
        DpdkConfig {
            cluster_id,
            local,
            port: port.into(),
            local_mac: None,
            peers,
            mtu: 1500,
            mbufs: 8191,
            ring: 1024,
            window_frames: 256,
            retransmit_timeout: Duration::from_millis(20),
            max_payload: 16 << 20,
            max_queued_bytes_per_peer: 64 << 20,
            max_queued_completion_bytes_per_peer: 256 << 20,
            handshake_interval: Duration::from_millis(50),
            keepalive_interval: Duration::from_millis(100),
            dead_link_timeout: Duration::from_secs(2),
            max_idle_nap: Duration::from_micros(500),
            drop_probability: 0.0,
            seed: cluster_id.rotate_left(29) ^ local.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            secret: None,
            config_digest: 0,
        }
    }

    fn validate(&self) -> Result<(), DpdkError> {
        let bad = |m: String| Err(DpdkError::Config(m));
        if self.local == 0 || self.peers.contains_key(&0) {
            return bad("node id 0 is not allowed".into());
        }
        if self.peers.contains_key(&self.local) {
            return bad(format!("the peer list contains the local node id {}", self.local));
        }
        let mut macs: Vec<&[u8; 6]> = self.peers.values().collect();
        macs.sort();
        macs.dedup();
        if macs.len() != self.peers.len() {
            return bad("two peers share a MAC".into());
        }
        if self.mtu < wire::HEADER_LEN + 64 || self.mtu > 9000 {
            return bad(format!("mtu {} must be from {} to 9000", self.mtu, wire::HEADER_LEN + 64));
        }
        if !(0.0..1.0).contains(&self.drop_probability) {
            return bad(format!("drop_probability {} must be in [0, 1)", self.drop_probability));
        }
        if self.window_frames == 0 || self.window_frames > 1 << 16 {
            return bad("window_frames must be from 1 to 65536".into());
        }
        if self.max_payload == 0 || self.max_payload > 1 << 30 {
            return bad("max_payload must be from 1 byte to 1 GiB".into());
        }
        let max_record = (self.mtu - wire::HEADER_LEN) * u16::MAX as usize;
        if self.max_payload + wire::MAX_META > max_record {
            return bad(format!(
                "max_payload {} does not fit {} fragments of {} bytes (raise mtu or lower max_payload)",
                self.max_payload,
                u16::MAX,
                self.mtu - wire::HEADER_LEN
            ));
        }
        if self.secret.as_ref().is_some_and(|s| s.is_empty()) {
            return bad("the cluster secret must not be empty".into());
        }
        if self.mbufs < 2 * u32::from(self.ring) {
            return bad(format!("{} mbufs are too few for rings of {} descriptors", self.mbufs, self.ring));
        }
        Ok(())
    }
}

/// The directory EAL loads poll-mode drivers from (found when `dpdk-sys` was built).
pub fn pmd_dir() -> &'static str {
    dpdk_sys::PMD_DIR
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_str(m: &[u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// Frame counters of a transport.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DpdkStats {
    /// Frames received (all).
    pub rx_frames: u64,
    /// Frames transmitted (handed to the NIC).
    pub tx_frames: u64,
    /// Frames lost on purpose ([`DpdkConfig::drop_probability`]).
    pub dropped_injected: u64,
    /// Frames the tx queue did not take (lost; retransmission repairs it).
    pub tx_full: u64,
    /// Received frames not for us (other ethertype, other destination, unknown sender).
    pub foreign: u64,
    /// Received frames of ours that failed to decode or belong to another incarnation.
    pub rejected: u64,
    /// Link resets (peer restarts, dead links, protocol errors).
    pub resets: u64,
    /// The links' counters, summed over peers and incarnations.
    pub link: LinkStats,
}

/// A write or read we issued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    Write,
    Read,
}

struct Peer {
    mac: [u8; 6],
    /// Our incarnation of the link, and its nonce (new on every reset).
    epoch: u64,
    nonce: [u8; wire::NONCE_LEN],
    /// The peer's incarnation (0: unknown) and nonce.
    peer_epoch: u64,
    peer_nonce: [u8; wire::NONCE_LEN],
    /// We verified the peer (its proof and digest) for these epochs.
    verified: bool,
    /// The peer verified us.
    peer_verified_me: bool,
    up: bool,
    link: Link,
    inflight: HashMap<Token, Pending>,
    last_rx: Instant,
    last_tx: Instant,
    next_hello: Instant,
    hello_now: bool,
    /// The last refusal logged (to log each reason once).
    refusal: Option<String>,
    /// Folded into the transport's stats when the link resets.
    retired: LinkStats,
}

/// Interrupts a napping `poll`.
struct ParkWake {
    woken: AtomicBool,
    thread: Mutex<Option<std::thread::Thread>>,
}

impl Wake for ParkWake {
    fn wake(&self) {
        self.woken.store(true, Ordering::Release);
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            t.unpark();
        }
    }
}

/// A replica's endpoint on a DPDK port. See the module docs.
pub struct DpdkTransport {
    cfg: DpdkConfig,
    port: Port,
    waker: Arc<ParkWake>,
    peers: BTreeMap<PeerId, Peer>,
    by_mac: HashMap<[u8; 6], PeerId>,
    next_token: Token,
    /// Accesses arrived from peers and not answered yet: `Some(len)` for a read.
    arrived: HashMap<(PeerId, Token), Option<u32>>,
    holder: Option<PeerId>,
    rng: u64,
    frag_payload: usize,
    stats: DpdkStats,
    rxbuf: Vec<u8>,
    rxlens: Vec<usize>,
    txbuf: Vec<u8>,
    txlens: Vec<usize>,
    due: Vec<usize>,
    /// Events of a [`Transport::send_queued`], reported by the next poll.
    pending_events: Vec<Event>,
    records: Vec<Bytes>,
}

fn random<const N: usize>() -> Result<[u8; N], DpdkError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| DpdkError::Entropy(e.to_string()))?;
    Ok(b)
}

fn new_epoch() -> Result<u64, DpdkError> {
    Ok(u64::from_le_bytes(random::<8>()?).max(1))
}

/// Tokens start from the wall clock so a restarted replica does not reuse the tokens
/// of its previous life.
fn first_token() -> Token {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    nanos.max(1)
}

impl DpdkTransport {
    /// Opens `cfg.port` on the running `eal` and starts handshaking with the peers at
    /// the first [`Transport::poll`].
    pub fn new(eal: Arc<Eal>, cfg: DpdkConfig) -> Result<Self, DpdkError> {
        cfg.validate()?;
        let port = Port::open(eal, &cfg.port, cfg.mbufs, cfg.ring, cfg.mtu)?;
        if let Some(m) = cfg.local_mac {
            if m != port.mac {
                return Err(DpdkError::Config(format!(
                    "port {} has MAC {}, but node {} is configured with {}",
                    cfg.port,
                    mac_str(&port.mac),
                    cfg.local,
                    mac_str(&m)
                )));
            }
        }
        if let Some((id, _)) = cfg.peers.iter().find(|(_, m)| **m == port.mac) {
            return Err(DpdkError::Config(format!("peer {id} is configured with this port's own MAC")));
        }
        let frag_payload = cfg.mtu - wire::HEADER_LEN;
        let now = Instant::now();
        let mut peers = BTreeMap::new();
        for (&id, &mac) in &cfg.peers {
            peers.insert(
                id,
                Peer {
                    mac,
                    epoch: new_epoch()?,
                    nonce: random()?,
                    peer_epoch: 0,
                    peer_nonce: [0; wire::NONCE_LEN],
                    verified: false,
                    peer_verified_me: false,
                    up: false,
                    link: Link::new(frag_payload, cfg.window_frames, cfg.max_payload + wire::MAX_META),
                    inflight: HashMap::new(),
                    last_rx: now,
                    last_tx: now,
                    next_hello: now,
                    hello_now: true,
                    refusal: None,
                    retired: LinkStats::default(),
                },
            );
        }
        let by_mac = cfg.peers.iter().map(|(&id, &m)| (m, id)).collect();
        info!(
            local = cfg.local,
            port = %cfg.port,
            mac = %mac_str(&port.mac),
            mtu = cfg.mtu,
            drop_probability = cfg.drop_probability,
            authenticated = cfg.secret.is_some(),
            "dpdk transport started"
        );
        Ok(DpdkTransport {
            rng: cfg.seed | 1,
            frag_payload,
            port,
            waker: Arc::new(ParkWake { woken: AtomicBool::new(false), thread: Mutex::new(None) }),
            peers,
            by_mac,
            next_token: first_token(),
            arrived: HashMap::new(),
            holder: None,
            stats: DpdkStats::default(),
            rxbuf: Vec::new(),
            rxlens: Vec::new(),
            txbuf: Vec::new(),
            txlens: Vec::new(),
            due: Vec::new(),
            pending_events: Vec::new(),
            records: Vec::new(),
            cfg,
        })
    }

    /// The port's MAC.
    pub fn mac(&self) -> [u8; 6] {
        self.port.mac
    }

    /// Whether the link to `peer` is up.
    pub fn is_up(&self, peer: PeerId) -> bool {
        self.peers.get(&peer).is_some_and(|p| p.up)
    }

    /// The counters so far.
    pub fn stats(&self) -> DpdkStats {
        let mut s = self.stats;
        for p in self.peers.values() {
            add(&mut s.link, &p.retired);
            add(&mut s.link, &p.link.stats);
        }
        s
    }

    /// The configuration in force.
    pub fn config(&self) -> &DpdkConfig {
        &self.cfg
    }

    fn chance_drop(&mut self) -> bool {
        if self.cfg.drop_probability <= 0.0 {
            return false;
        }
        // splitmix64
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 11) as f64 / (1u64 << 53) as f64) < self.cfg.drop_probability
    }

    /// Appends one frame to the transmit batch (or loses it, by fault injection).
    fn stage(&mut self, dst: [u8; 6], h: &Header, payload: &[u8]) {
        if self.chance_drop() {
            self.stats.dropped_injected += 1;
            return;
        }
        let len = wire::ETH_LEN + wire::HEADER_LEN + payload.len();
        let at = self.txbuf.len();
        self.txbuf.resize(at + len, 0);
        wire::write_frame(&mut self.txbuf[at..], &dst, &self.port.mac, h, payload);
        self.txlens.push(len);
    }

    fn transmit(&mut self) {
        if self.txlens.is_empty() {
            return;
        }
        let mut offs = Vec::with_capacity(self.txlens.len());
        let mut at = 0;
        for &l in &self.txlens {
            offs.push(at);
            at += l;
        }
        let buf = &self.txbuf;
        let sent = match self.port.tx(&self.txlens, |i, out| out.copy_from_slice(&buf[offs[i]..offs[i] + out.len()])) {
            Ok(n) => n,
            Err(e) => {
                warn!("dpdk tx: {e}");
                0
            }
        };
        self.stats.tx_frames += sent as u64;
        self.stats.tx_full += (self.txlens.len() - sent) as u64;
        self.txbuf.clear();
        self.txlens.clear();
    }

    fn header(&self, id: PeerId, kind: u8) -> Header {
        let p = &self.peers[&id];
        Header {
            kind,
            src: self.cfg.local,
            src_epoch: p.epoch,
            dst_epoch: p.peer_epoch,
            ack: if p.verified { p.link.ack_info().0 } else { 0 },
            ..Header::default()
        }
    }

    fn stage_hello(&mut self, id: PeerId, now: Instant) {
        let digest = self.cfg.config_digest;
        let p = &self.peers[&id];
        let proof = match (&self.cfg.secret, p.peer_epoch) {
            (Some(secret), pe) if pe != 0 => {
                let m = wire::proof(
                    secret,
                    self.cfg.cluster_id,
                    self.cfg.local,
                    id,
                    digest,
                    p.epoch,
                    pe,
                    &p.peer_nonce,
                    &p.nonce,
                );
                Some(m.finalize().into_bytes().into())
            }
            _ => None,
        };
        let hello = Hello {
            cluster_id: self.cfg.cluster_id,
            target: id,
            version: wire::VERSION,
            config_digest: digest,
            nonce: p.nonce,
            verified_you: p.verified,
            up: p.up,
            proof,
        };
        let (mac, h) = (p.mac, self.header(id, wire::kind::HELLO));
        self.stage(mac, &h, &hello.encode());
        let p = self.peers.get_mut(&id).expect("peer");
        p.hello_now = false;
        p.next_hello = now + self.cfg.handshake_interval;
        p.last_tx = now;
    }

    /// Starts a new incarnation of the link to `id`: in-flight accesses fail, arrived
    /// ones are forgotten, queued records are dropped, the handshake starts again.
    fn reset(&mut self, id: PeerId, reason: &str, events: &mut Vec<Event>) {
        let (epoch, nonce) = match (new_epoch(), random()) {
            (Ok(e), Ok(n)) => (e, n),
            (Err(e), _) | (_, Err(e)) => {
                warn!("{e}; keeping the link's epoch");
                let p = &self.peers[&id];
                (p.epoch.wrapping_add(1).max(1), p.nonce)
            }
        };
        self.stats.resets += 1;
        self.arrived.retain(|(from, _), _| *from != id);
        let (fp, w, max) = (self.frag_payload, self.cfg.window_frames, self.cfg.max_payload + wire::MAX_META);
        let p = self.peers.get_mut(&id).expect("peer");
        let was_up = p.up;
        let old = std::mem::replace(&mut p.link, Link::new(fp, w, max));
        add(&mut p.retired, &old.stats);
        p.epoch = epoch;
        p.nonce = nonce;
        p.peer_epoch = 0;
        p.verified = false;
        p.peer_verified_me = false;
        p.up = false;
        p.hello_now = true;
        let mut inflight: Vec<(Token, Pending)> = p.inflight.drain().collect();
        inflight.sort_unstable_by_key(|(t, _)| *t);
        for (token, what) in inflight {
            let result = Err(AccessError::LinkFailed(format!("link to peer {id} lost: {reason}")));
            events.push(match what {
                Pending::Write => Event::WriteDone { to: id, token, result },
                Pending::Read => Event::ReadDone { from: id, token, result },
            });
        }
        if was_up {
            info!(local = self.cfg.local, peer = id, reason, "link down");
            events.push(Event::PeerDown { peer: id, reason: reason.to_string() });
        } else {
            debug!(local = self.cfg.local, peer = id, reason, "link reset");
        }
    }

    fn refuse(&mut self, id: Option<PeerId>, mac: &[u8; 6], why: String) {
        self.stats.rejected += 1;
        let Some(p) = id.and_then(|id| self.peers.get_mut(&id)) else {
            debug!(local = self.cfg.local, mac = %mac_str(mac), "refused a frame: {why}");
            return;
        };
        if p.refusal.as_deref() != Some(&why) {
            warn!(local = self.cfg.local, peer = ?id, mac = %mac_str(mac), "refused peer: {why}");
            p.refusal = Some(why);
        }
    }

    fn mark_up(&mut self, id: PeerId, now: Instant, events: &mut Vec<Event>) {
        let p = self.peers.get_mut(&id).expect("peer");
        if !p.up && p.verified && p.peer_verified_me {
            p.up = true;
            p.last_rx = now;
            p.refusal = None;
            info!(local = self.cfg.local, peer = id, mac = %mac_str(&p.mac), "link up");
            events.push(Event::PeerUp { peer: id });
        }
    }

    fn on_hello(
        &mut self,
        id: PeerId,
        mac: [u8; 6],
        h: &Header,
        payload: &[u8],
        now: Instant,
        events: &mut Vec<Event>,
    ) {
        let hello = match Hello::decode(payload) {
            Ok(x) => x,
            Err(e) => return self.refuse(Some(id), &mac, e.to_string()),
        };
        if hello.cluster_id != self.cfg.cluster_id {
            let why = format!("wrong cluster id {} (expected {})", hello.cluster_id, self.cfg.cluster_id);
            return self.refuse(Some(id), &mac, why);
        }
        if hello.target != self.cfg.local {
            let why = format!("node {id} meant to reach node {}, but this is node {}", hello.target, self.cfg.local);
            return self.refuse(Some(id), &mac, why);
        }
        if hello.version != wire::VERSION {
            return self.refuse(Some(id), &mac, format!("protocol version {} not supported", hello.version));
        }
        if h.src_epoch == 0 {
            return self.refuse(Some(id), &mac, "epoch 0".into());
        }
        let known = self.peers[&id].peer_epoch;
        if known != h.src_epoch {
            if known != 0 {
                self.reset(id, "the peer restarted its link", events);
            }
            let p = self.peers.get_mut(&id).expect("peer");
            p.peer_epoch = h.src_epoch;
            p.peer_nonce = hello.nonce;
            p.hello_now = true;
        }
        let digest = self.cfg.config_digest;
        let p = self.peers.get_mut(&id).expect("peer");
        if h.dst_epoch != p.epoch {
            p.hello_now = true; // it does not know our incarnation yet
        } else {
            if !p.verified {
                if let Some(secret) = &self.cfg.secret {
                    let ok = hello.proof.is_some_and(|proof| {
                        wire::proof(
                            secret,
                            self.cfg.cluster_id,
                            id,
                            self.cfg.local,
                            hello.config_digest,
                            h.src_epoch,
                            p.epoch,
                            &p.nonce,
                            &hello.nonce,
                        )
                        .verify_slice(&proof)
                        .is_ok()
                    });
                    if !ok {
                        let why = format!("authentication failed: node {id} did not prove it knows the cluster secret");
                        return self.refuse(Some(id), &mac, why);
                    }
                }
                if hello.config_digest != digest {
                    let why = format!(
                        "stale configuration: node {id} was configured with another member list (digest {:016x}, \
                         this node's is {digest:016x})",
                        hello.config_digest
                    );
                    return self.refuse(Some(id), &mac, why);
                }
                p.verified = true;
                p.hello_now = true;
            }
            p.peer_verified_me = hello.verified_you;
        }
        if p.verified && !hello.up {
            p.hello_now = true; // it still waits to hear that we verified it
        }
        p.last_rx = now;
        self.mark_up(id, now, events);
    }

    /// Handles one received frame.
    fn on_frame(&mut self, f: &[u8], now: Instant, events: &mut Vec<Event>) {
        let (macs, h, payload) = match wire::parse_frame(f) {
            Ok(x) => x,
            Err(wire::WireError::Ethertype(_)) | Err(wire::WireError::Short(_)) => {
                self.stats.foreign += 1;
                return;
            }
            Err(e) => {
                let src = if f.len() >= 12 { f[6..12].try_into().unwrap_or([0; 6]) } else { [0; 6] };
                return self.refuse(None, &src, e.to_string());
            }
        };
        if macs.dst != self.port.mac {
            self.stats.foreign += 1;
            return;
        }
        let Some(&id) = self.by_mac.get(&macs.src) else {
            self.stats.foreign += 1;
            return self.refuse(None, &macs.src, format!("frame from unknown MAC claiming node {}", h.src));
        };
        if h.src != id {
            return self.refuse(Some(id), &macs.src, format!("frame from node {id}'s MAC claims node {}", h.src));
        }
        if h.kind == wire::kind::HELLO {
            return self.on_hello(id, macs.src, &h, payload, now, events);
        }
        let p = self.peers.get_mut(&id).expect("peer");
        if !p.verified || h.src_epoch != p.peer_epoch || h.dst_epoch != p.epoch {
            // Another incarnation (or no handshake yet): drop it; our HELLO will follow.
            self.stats.rejected += 1;
            if !p.up {
                p.hello_now = p.hello_now || now >= p.next_hello;
            }
            return;
        }
        // Only a peer that verified us sends data or acknowledgements.
        p.peer_verified_me = true;
        p.last_rx = now;
        self.mark_up(id, now, events);
        let p = self.peers.get_mut(&id).expect("peer");
        let sack = match payload.get(..8) {
            Some(b) if h.kind == wire::kind::ACK => b.try_into().map(u64::from_le_bytes).unwrap_or(0),
            _ => 0,
        };
        if let Err(e) = p.link.on_ack(h.ack, sack) {
            return self.reset(id, &format!("protocol error: {e}"), events);
        }
        if h.kind == wire::kind::DATA {
            let mut records = std::mem::take(&mut self.records);
            let r = p.link.on_data(h.seq, h.frag, h.frags, payload, &mut records);
            for rec in records.drain(..) {
                self.on_record(id, rec, events);
            }
            self.records = records;
            if let Err(e) = r {
                self.reset(id, &format!("protocol error: {e}"), events);
            }
        }
    }

    fn on_record(&mut self, id: PeerId, rec: Bytes, events: &mut Vec<Event>) {
        let rec = match wire::decode_record(rec) {
            Ok(r) => r,
            Err(e) => {
                warn!(local = self.cfg.local, peer = id, "dropped a malformed record: {e}");
                return;
            }
        };
        match rec {
            Record::Msg(payload) => events.push(Event::Message { from: id, payload }),
            Record::Write { token, offset, data } => {
                if self.holder != Some(id) {
                    debug!(local = self.cfg.local, peer = id, offset, "write denied: no permission");
                    let ans = Record::Answer { read: false, token, ok: false, bytes: Bytes::new() };
                    self.push_record(id, &ans, &[]);
                    return;
                }
                if self.arrived.insert((id, token), None).is_some() {
                    warn!(local = self.cfg.local, peer = id, token, "duplicate token from a peer");
                    return;
                }
                events.push(Event::WriteArrived { from: id, token, offset, data });
            }
            Record::Read { token, offset, len } => {
                if self.arrived.insert((id, token), Some(len)).is_some() {
                    warn!(local = self.cfg.local, peer = id, token, "duplicate token from a peer");
                    return;
                }
                events.push(Event::ReadArrived { from: id, token, offset, len });
            }
            Record::Answer { read, token, ok, bytes } => {
                let p = self.peers.get_mut(&id).expect("peer");
                let want = if read { Pending::Read } else { Pending::Write };
                if p.inflight.get(&token) != Some(&want) {
                    debug!(local = self.cfg.local, peer = id, token, "answer for no pending access");
                    return;
                }
                p.inflight.remove(&token);
                let result = if ok { Ok(bytes) } else { Err(AccessError::Denied { detail: bytes }) };
                events.push(if read {
                    Event::ReadDone { from: id, token, result }
                } else {
                    Event::WriteDone { to: id, token, result }
                });
            }
        }
    }

    fn push_record(&mut self, id: PeerId, rec: &Record, body: &[u8]) {
        let mut v = Vec::with_capacity(wire::MAX_META + body.len());
        wire::record_meta(rec, &mut v);
        v.extend_from_slice(body);
        self.peers.get_mut(&id).expect("peer").link.push(Bytes::from(v));
    }

    /// Checks and queues a request record to `to`.
    fn request(&mut self, to: PeerId, rec: &Record, body: &[u8]) -> Result<(), SendError> {
        let p = self.peers.get(&to).ok_or(SendError::UnknownPeer(to))?;
        if body.len() > self.cfg.max_payload {
            return Err(SendError::TooLarge { size: body.len(), limit: self.cfg.max_payload });
        }
        if !p.up {
            return Err(SendError::LinkDown(to));
        }
        let q = p.link.queued_bytes();
        if q > 0 && q + body.len() + wire::MAX_META > self.cfg.max_queued_bytes_per_peer {
            return Err(SendError::Backpressure(to));
        }
        self.push_record(to, rec, body);
        Ok(())
    }

    fn complete(
        &mut self,
        from: PeerId,
        token: Token,
        result: Result<&[u8], &[u8]>,
        read: bool,
    ) -> Result<(), SendError> {
        let p = self.peers.get(&from).ok_or(SendError::UnknownPeer(from))?;
        let Some(&len) = self.arrived.get(&(from, token)) else {
            debug!(local = self.cfg.local, from, token, "completion for no pending access");
            return Err(SendError::LinkDown(from));
        };
        if len.is_some() != read {
            return Err(SendError::LinkDown(from));
        }
        let (ok, bytes) = match result {
            Ok(b) => (true, b),
            Err(b) => (false, b),
        };
        let limit = match (len, ok) {
            (Some(l), true) => (l as usize).min(self.cfg.max_payload),
            _ => self.cfg.max_payload,
        };
        if bytes.len() > limit {
            return Err(SendError::TooLarge { size: bytes.len(), limit });
        }
        let q = p.link.queued_bytes();
        if q > 0 && q + bytes.len() + wire::MAX_META > self.cfg.max_queued_completion_bytes_per_peer {
            return Err(SendError::Backpressure(from));
        }
        self.arrived.remove(&(from, token));
        self.push_record(from, &Record::Answer { read, token, ok, bytes: Bytes::new() }, bytes);
        Ok(())
    }

    /// Timers and output of every link: handshakes, dead links, data, acks, keepalives.
    fn run_links(&mut self, now: Instant, events: &mut Vec<Event>) {
        let ids: Vec<PeerId> = self.peers.keys().copied().collect();
        for id in ids {
            let p = &self.peers[&id];
            if p.up && now.saturating_duration_since(p.last_rx) >= self.cfg.dead_link_timeout {
                let why = format!("no frame from the peer for {:?}", self.cfg.dead_link_timeout);
                self.reset(id, &why, events);
            }
            let p = &self.peers[&id];
            if p.hello_now || (!p.up && now >= p.next_hello) {
                self.stage_hello(id, now);
            }
            let p = self.peers.get_mut(&id).expect("peer");
            if !p.up {
                continue;
            }
            p.link.fill_window();
            let mut due = std::mem::take(&mut self.due);
            p.link.due(now, self.cfg.retransmit_timeout, &mut due);
            let mac = p.mac;
            let base = self.header(id, wire::kind::DATA);
            for &i in &due {
                let o = &self.peers[&id].link.unacked[i];
                let h = Header { seq: o.seq, frag: o.frag, frags: o.frags, ..base };
                let payload = o.payload.clone();
                self.stage(mac, &h, &payload);
            }
            let sent_data = !due.is_empty();
            self.due = due;
            let p = self.peers.get_mut(&id).expect("peer");
            let keepalive = now.saturating_duration_since(p.last_tx) >= self.cfg.keepalive_interval;
            if p.link.ack_due || keepalive {
                p.link.ack_due = false;
                let (_, sack) = p.link.ack_info();
                let h = self.header(id, wire::kind::ACK);
                self.stage(mac, &h, &sack.to_le_bytes());
                self.peers.get_mut(&id).expect("peer").last_tx = now;
            } else if sent_data {
                p.last_tx = now;
            }
        }
        self.transmit();
    }

    /// Receives what the port has (a bounded number of bursts); true if any came.
    fn receive(&mut self, now: Instant, events: &mut Vec<Event>) -> bool {
        let mut any = false;
        for _ in 0..16 {
            let (buf, lens) = (&mut self.rxbuf, &mut self.rxlens);
            buf.clear();
            lens.clear();
            let n = self.port.rx(|f| {
                buf.extend_from_slice(f);
                lens.push(f.len());
            });
            self.stats.rx_frames += n as u64;
            let (buf, lens) = (std::mem::take(&mut self.rxbuf), std::mem::take(&mut self.rxlens));
            let mut at = 0;
            for &l in &lens {
                self.on_frame(&buf[at..at + l], now, events);
                at += l;
            }
            self.rxbuf = buf;
            self.rxlens = lens;
            any |= n > 0;
            if n < port::BURST {
                break;
            }
        }
        any
    }
}

fn add(a: &mut LinkStats, b: &LinkStats) {
    a.data_sent += b.data_sent;
    a.retransmits += b.retransmits;
    a.duplicates += b.duplicates;
    a.beyond_window += b.beyond_window;
    a.records += b.records;
}

impl Drop for DpdkTransport {
    fn drop(&mut self) {
        let s = self.stats();
        info!(
            local = self.cfg.local,
            rx_frames = s.rx_frames,
            tx_frames = s.tx_frames,
            dropped_injected = s.dropped_injected,
            retransmits = s.link.retransmits,
            duplicates = s.link.duplicates,
            records = s.link.records,
            resets = s.resets,
            "dpdk transport closing"
        );
    }
}

impl Transport for DpdkTransport {
    fn local(&self) -> PeerId {
        self.cfg.local
    }

    fn peers(&self) -> Vec<PeerId> {
        self.peers.keys().copied().collect()
    }

    fn max_payload(&self) -> usize {
        self.cfg.max_payload
    }

    fn send(&mut self, to: PeerId, payload: &[u8]) -> Result<(), SendError> {
        self.request(to, &Record::Msg(Bytes::new()), payload)
    }

    fn write(&mut self, to: PeerId, offset: u64, data: &[u8]) -> Result<Token, SendError> {
        let token = self.next_token;
        self.request(to, &Record::Write { token, offset, data: Bytes::new() }, data)?;
        self.next_token += 1;
        self.peers.get_mut(&to).expect("queued").inflight.insert(token, Pending::Write);
        Ok(token)
    }

    fn read(&mut self, from: PeerId, offset: u64, len: u32) -> Result<Token, SendError> {
        if len as usize > self.cfg.max_payload && self.peers.contains_key(&from) {
            return Err(SendError::TooLarge { size: len as usize, limit: self.cfg.max_payload });
        }
        let token = self.next_token;
        self.request(from, &Record::Read { token, offset, len }, &[])?;
        self.next_token += 1;
        self.peers.get_mut(&from).expect("queued").inflight.insert(token, Pending::Read);
        Ok(token)
    }

    fn complete_write(&mut self, from: PeerId, token: Token, result: Result<&[u8], &[u8]>) -> Result<(), SendError> {
        self.complete(from, token, result, false)
    }

    fn complete_read(&mut self, from: PeerId, token: Token, result: Result<&[u8], &[u8]>) -> Result<(), SendError> {
        self.complete(from, token, result, true)
    }

    fn grant(&mut self, peer: PeerId) {
        self.holder = Some(peer);
    }

    fn revoke(&mut self, peer: PeerId) {
        if self.holder == Some(peer) {
            self.holder = None;
        }
    }

    fn permission_holder(&self) -> Option<PeerId> {
        self.holder
    }

    fn poll(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> std::io::Result<()> {
        let start = events.len();
        let deadline = timeout.map(|t| Instant::now() + t);
        *self.waker.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::thread::current());
        fine_timer_slack();
        let mut nap = Duration::from_micros(10);
        events.append(&mut self.pending_events);
        loop {
            let now = Instant::now();
            let got = self.receive(now, events);
            self.run_links(now, events);
            let woken = self.waker.woken.swap(false, Ordering::AcqRel);
            let now = Instant::now();
            if events.len() > start || woken || deadline.is_some_and(|d| now >= d) {
                return Ok(());
            }
            if got {
                nap = Duration::from_micros(10);
                continue;
            }
            let mut wait = nap;
            if let Some(d) = deadline {
                wait = wait.min(d.saturating_duration_since(now));
            }
            std::thread::park_timeout(wait);
            nap = (nap * 2).min(self.cfg.max_idle_nap);
        }
    }

    fn waker(&self) -> Arc<dyn Wake> {
        self.waker.clone()
    }

    fn send_queued(&mut self) {
        let mut events = std::mem::take(&mut self.pending_events);
        self.run_links(Instant::now(), &mut events);
        self.pending_events = events;
    }

    fn name(&self) -> &'static str {
        "dpdk"
    }
}

/// Sets the calling thread's timer slack to 1 ns (once per thread). The poll loop's
/// naps are a few microseconds, and a thread's default slack (50 us) stretches each:
/// a 10 us sleep took 82 us here (p50), 33 us with 1 ns of slack.
fn fine_timer_slack() {
    thread_local!(static SET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    SET.with(|set| {
        if !set.replace(true) {
            // SAFETY: PR_SET_TIMERSLACK takes a plain integer and touches no memory.
            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DpdkConfig {
        DpdkConfig::new(7, 1, "net_af_packet0", BTreeMap::from([(2, [2, 0, 0, 0, 0, 2]), (3, [2, 0, 0, 0, 0, 3])]))
    }

    #[test]
    fn config_is_checked_before_eal_is_touched() {
        assert!(cfg().validate().is_ok());
        let bad = |f: &dyn Fn(&mut DpdkConfig), want: &str| {
            let mut c = cfg();
            f(&mut c);
            let e = c.validate().expect_err(want).to_string();
            assert!(e.contains(want), "{e}");
        };
        bad(&|c| c.local = 0, "node id 0");
        bad(&|c| c.local = 2, "contains the local node id 2");
        bad(&|c| c.peers = BTreeMap::from([(2, [2; 6]), (3, [2; 6])]), "share a MAC");
        bad(&|c| c.mtu = 100, "mtu 100");
        bad(&|c| c.drop_probability = 1.0, "drop_probability");
        bad(&|c| c.window_frames = 0, "window_frames");
        bad(&|c| c.secret = Some(Vec::new()), "secret");
        bad(&|c| c.max_payload = 1 << 30, "does not fit");
        bad(&|c| c.mbufs = 100, "too few");
    }

    #[test]
    fn eal_arguments_and_macs() {
        let e = EalConfig {
            no_huge: true,
            memory_mb: Some(256),
            file_prefix: Some("p".into()),
            vdevs: vec!["net_af_packet0,iface=eth0".into()],
            ..EalConfig::default()
        };
        let a = e.args();
        assert_eq!(a[0], "replog");
        for want in ["--no-huge", "--file-prefix=p", "--vdev=net_af_packet0,iface=eth0", "--no-pci", "256"] {
            assert!(a.iter().any(|x| x == want), "{want} in {a:?}");
        }
        let pci = EalConfig { pci: vec!["0000:3b:00.1".into()], ..EalConfig::default() }.args();
        assert!(!pci.iter().any(|x| x == "--no-pci") && pci.windows(2).any(|w| w == ["-a", "0000:3b:00.1"]));
        assert_eq!(parse_mac("02:00:00:77:FE:0a"), Some([2, 0, 0, 0x77, 0xfe, 0x0a]));
        assert_eq!(mac_str(&[2, 0, 0, 0x77, 0xfe, 0x0a]), "02:00:00:77:fe:0a");
        for bad in ["", "02:00:00:77:fe", "02:00:00:77:fe:0a:01", "2:00:00:77:fe:0a", "zz:00:00:77:fe:0a"] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }
}
