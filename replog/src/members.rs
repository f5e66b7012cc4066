//! The member directory: where each replica of the current membership is reached.
//!
//! The configuration file lists the members a replica starts with (the cluster's
//! bootstrap membership, or for a joining replica the members to contact and itself).
//! Replicas added while serving are known from the log instead: every membership change
//! the service proposes carries, in [`paxos::Membership::addrs`], the peer and client
//! address of every member of the new membership, so any replica learns them when it
//! applies the change (or loads a snapshot, whose metadata keeps the membership). The
//! core carries these bytes without reading them; their format is this module's:
//!
//! ```text
//! "v1 <peer_addr> <client_addr>"     (UTF-8, addresses as host:port, at most 1 KiB)
//! ```
//!
//! The replicated entry wins over the configured one for the same id. Decoding never
//! panics: bytes that do not parse are ignored with a warning (the configured address,
//! if any, is used).
//!
//! Each replica presents in its peer handshake the digest of its own identity (id, peer
//! address, client address), [`identity_digest`]; the TCP transport expects of each peer
//! the digest of the identity the directory holds for it. So a replica added through the
//! log is accepted once the acceptor applied the change, and a process that claims a
//! member's id with other addresses is refused as a stale configuration.

use paxos::{Membership, NodeId};
use std::collections::BTreeMap;
use std::net::SocketAddr;

/// How one member is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemberAddrs {
    /// Where replicas connect to it.
    pub peer: SocketAddr,
    /// Where clients connect to it.
    pub client: SocketAddr,
}

impl MemberAddrs {
    /// The bytes kept in [`Membership::addrs`].
    pub fn encode(&self) -> Vec<u8> {
        format!("v1 {} {}", self.peer, self.client).into_bytes()
    }

    /// Parses [`encode`](Self::encode)'s bytes; never panics.
    pub fn decode(b: &[u8]) -> Result<Self, String> {
        let s = std::str::from_utf8(b).map_err(|_| "member addresses are not UTF-8".to_string())?;
        let mut words = s.split(' ');
        match (words.next(), words.next(), words.next(), words.next()) {
            (Some("v1"), Some(peer), Some(client), None) => Ok(MemberAddrs {
                peer: peer.parse().map_err(|e| format!("peer address {peer:?}: {e}"))?,
                client: client.parse().map_err(|e| format!("client address {client:?}: {e}"))?,
            }),
            (Some(v), ..) if v != "v1" => Err(format!("unknown member address format {v:?}")),
            _ => Err(format!("malformed member addresses {s:?}")),
        }
    }

    /// The digest of member `id`'s identity, presented in its peer handshake.
    pub fn identity_digest(&self, id: NodeId) -> u64 {
        identity_digest(id, self.peer, self.client)
    }
}

/// The digest a replica presents in its peer handshake: its id and addresses.
pub fn identity_digest(id: NodeId, peer: SocketAddr, client: SocketAddr) -> u64 {
    fallback_tcp::wire::config_digest([(id, format!("{peer} {client}"))])
}

/// Every known member's addresses: the configured ones, overridden by the replicated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Directory {
    configured: BTreeMap<NodeId, MemberAddrs>,
    known: BTreeMap<NodeId, MemberAddrs>,
}

impl Directory {
    /// A directory of the configured members.
    pub fn new(configured: BTreeMap<NodeId, MemberAddrs>) -> Self {
        Directory { known: configured.clone(), configured }
    }

    /// Takes in the addresses `m` carries (in force from now on). Returns the ids whose
    /// bytes did not decode, with the reason (they keep their previous addresses).
    pub fn learn(&mut self, m: &Membership) -> Vec<(NodeId, String)> {
        let mut bad = Vec::new();
        for (&id, b) in &m.addrs {
            match MemberAddrs::decode(b) {
                Ok(a) => {
                    self.known.insert(id, a);
                }
                Err(e) => bad.push((id, e)),
            }
        }
        bad
    }

    /// Records `id`'s addresses (a member about to be added).
    pub fn insert(&mut self, id: NodeId, a: MemberAddrs) {
        self.known.insert(id, a);
    }

    /// The addresses of `id`, if known.
    pub fn get(&self, id: NodeId) -> Option<MemberAddrs> {
        self.known.get(&id).copied()
    }

    /// The member (other than `except`) of `m` that already uses address `a` as its
    /// peer or client address.
    pub fn owner_of(&self, m: &Membership, a: SocketAddr, except: NodeId) -> Option<NodeId> {
        m.voters
            .iter()
            .chain(&m.learners)
            .copied()
            .filter(|&id| id != except)
            .find(|&id| self.get(id).is_some_and(|x| x.peer == a || x.client == a))
    }

    /// The bytes of every member of `m` whose addresses are known, for a change to `m`.
    pub fn addrs_for(&self, m: &Membership) -> BTreeMap<NodeId, Vec<u8>> {
        m.voters.iter().chain(&m.learners).filter_map(|&id| self.get(id).map(|a| (id, a.encode()))).collect()
    }

    /// Whether `id` was in the configuration file.
    pub fn is_configured(&self, id: NodeId) -> bool {
        self.configured.contains_key(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(p: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], p))
    }

    #[test]
    fn addresses_round_trip_and_garbage_is_an_error() {
        let m = MemberAddrs { peer: a(1), client: a(2) };
        assert_eq!(MemberAddrs::decode(&m.encode()), Ok(m));
        for bad in [&b""[..], b"v1", b"v1 x y", b"v2 127.0.0.1:1 127.0.0.1:2", b"v1 127.0.0.1:1 127.0.0.1:2 z", b"\xff"]
        {
            assert!(MemberAddrs::decode(bad).is_err(), "{bad:?}");
        }
        let enc = m.encode();
        for n in 0..enc.len() {
            let _ = MemberAddrs::decode(&enc[..n]);
        }
    }

    #[test]
    fn replicated_addresses_override_configured_ones() {
        let mut d = Directory::new([(1, MemberAddrs { peer: a(1), client: a(2) })].into_iter().collect());
        let m = Membership::new(vec![1], vec![4])
            .with_addrs([(4, MemberAddrs { peer: a(7), client: a(8) }.encode()), (1, b"junk".to_vec())].into());
        let bad = d.learn(&m);
        assert_eq!(bad.len(), 1);
        assert_eq!(d.get(4), Some(MemberAddrs { peer: a(7), client: a(8) }));
        assert_eq!(d.get(1).map(|x| x.peer), Some(a(1)));
        assert_eq!(d.owner_of(&m, a(8), 0), Some(4));
        assert_eq!(d.owner_of(&m, a(8), 4), None);
        assert_eq!(d.addrs_for(&m).len(), 2);
        assert!(d.is_configured(1) && !d.is_configured(4));
    }
}
