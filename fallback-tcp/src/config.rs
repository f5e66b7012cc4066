//! Configuration of a [`crate::TcpTransport`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use transport::PeerId;

/// Everything a [`crate::TcpTransport`] needs. Build it with [`TcpConfig::new`] and
/// adjust the public fields; every field has a sane default.
#[derive(Clone)]
pub struct TcpConfig {
    /// The cluster this replica belongs to. A peer presenting another id is refused.
    pub cluster_id: u64,
    /// This replica's id (never 0).
    pub local: PeerId,
    /// Where to listen for peers (port 0 picks an ephemeral port; see
    /// [`crate::TcpTransport::local_addr`]).
    pub listen: SocketAddr,
    /// The other replicas and where to dial them. Must not contain `local` or 0.
    /// May be empty at first and given later with [`crate::TcpTransport::set_peers`].
    pub peers: BTreeMap<PeerId, SocketAddr>,
    /// The largest payload `send`, `write` or a completion may carry (bytes).
    /// Default 16 MiB.
    pub max_payload: usize,
    /// The most bytes queued on the outgoing connection to one peer (messages, writes
    /// and reads) before `send`/`write`/`read` answer
    /// [`transport::SendError::Backpressure`]. A single frame is always accepted into
    /// an empty queue, whatever its size. Default 64 MiB.
    pub max_queued_bytes_per_peer: usize,
    /// The same limit for completions queued back to one peer (`complete_write`,
    /// `complete_read` and the transport's own denials). Larger, because a completion
    /// answers someone who waits for it. When the transport's own denials would pass
    /// it, the peer is not reading its answers and its connection is closed.
    /// Default 256 MiB.
    pub max_queued_completion_bytes_per_peer: usize,
    /// First delay before redialing a peer after a failed dial or a dropped link.
    /// Default 10 ms.
    pub reconnect_min: Duration,
    /// The delay doubles after each failure up to this bound. Default 1 s.
    pub reconnect_max: Duration,
    /// How long a new connection (either side) may take to complete its handshake
    /// (including the TCP connect on the dialing side). Default 2 s.
    pub handshake_timeout: Duration,
    /// How long sent data may stay unacknowledged, or an idle link unanswered, before
    /// the connection is declared dead and redialed (TCP_USER_TIMEOUT and keepalive
    /// probes). Without it a partitioned link stalls in TCP's own retransmission backoff
    /// (minutes) and catch-up after the partition heals waits for it. Default 2 s.
    pub dead_link_timeout: Duration,
    /// Seed of the generator that jitters reconnect delays (so runs can be replayed).
    /// Default: derived from `cluster_id` and `local`.
    pub seed: u64,
    /// The cluster secret. When set, every link is authenticated both ways with an
    /// HMAC-SHA256 challenge-response (see [`crate::wire`]): a process that does not know
    /// it cannot join, and a peer that does not prove it is not trusted. Must not be
    /// empty. Both sides of a link must agree on having one. Default `None`.
    pub secret: Option<Vec<u8>>,
    /// [`crate::wire::config_digest`] of the member list this replica was configured
    /// with, sent in HELLO; a peer whose digest differs is refused as a stale
    /// configuration. Default 0 (every replica that leaves it at 0 agrees).
    pub config_digest: u64,
    /// The digest expected in the HELLO of particular peers (by id); a peer not listed
    /// here must present `config_digest`. Replaced with
    /// [`crate::TcpTransport::set_peer_digests`]. Default empty.
    pub peer_digests: BTreeMap<PeerId, u64>,
    /// TLS on every peer link (see [`crate::PeerTls`]): the TLS handshake runs first,
    /// then the HELLO handshake and all frames inside TLS. Both sides of a link must
    /// agree on having it. Default `None` (plaintext).
    pub tls: Option<crate::PeerTls>,
}

impl std::fmt::Debug for TcpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpConfig")
            .field("cluster_id", &self.cluster_id)
            .field("local", &self.local)
            .field("listen", &self.listen)
            .field("peers", &self.peers)
            .field("max_payload", &self.max_payload)
            .field("max_queued_bytes_per_peer", &self.max_queued_bytes_per_peer)
            .field("max_queued_completion_bytes_per_peer", &self.max_queued_completion_bytes_per_peer)
            .field("reconnect_min", &self.reconnect_min)
            .field("reconnect_max", &self.reconnect_max)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("dead_link_timeout", &self.dead_link_timeout)
            .field("seed", &self.seed)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("config_digest", &format_args!("{:016x}", self.config_digest))
            .field("peer_digests", &self.peer_digests)
            .field("tls", &self.tls)
            .finish()
    }
}

impl TcpConfig {
    /// A configuration with the defaults documented on each field.
    pub fn new(cluster_id: u64, local: PeerId, listen: SocketAddr, peers: BTreeMap<PeerId, SocketAddr>) -> Self {
        TcpConfig {
            cluster_id,
            local,
            listen,
            peers,
            max_payload: 16 << 20,
            max_queued_bytes_per_peer: 64 << 20,
            max_queued_completion_bytes_per_peer: 256 << 20,
            reconnect_min: Duration::from_millis(10),
            reconnect_max: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(2),
            dead_link_timeout: Duration::from_secs(2),
            seed: cluster_id.rotate_left(17) ^ local.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            secret: None,
            config_digest: 0,
            peer_digests: BTreeMap::new(),
            tls: None,
        }
    }
}

/// xorshift64*: a tiny seeded generator for reconnect jitter.
#[derive(Clone, Debug)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A delay uniformly drawn from [d/2, d].
    pub(crate) fn jitter(&mut self, d: Duration) -> Duration {
        let nanos = d.as_nanos().min(u64::MAX as u128) as u64;
        let half = nanos / 2;
        let extra = if half == 0 { 0 } else { self.next_u64() % (half + 1) };
        Duration::from_nanos(nanos - half + extra)
    }
}
