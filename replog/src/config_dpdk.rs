//! The `[dpdk]` section of a replica's configuration (`transport = "dpdk"`): how EAL
//! starts, which port carries the frames, and every member's MAC.
//!
//! ```toml
//! transport = "dpdk"
//!
//! [dpdk]
//! port = "net_af_packet0"                 # the port's name as EAL knows it
//! vdevs = ["net_af_packet0,iface=eth0"]   # or pci = ["0000:3b:00.1"] with port = "0000:3b:00.1"
//! no_huge = true                          # tests: no hugepages (then memory_mb)
//! memory_mb = 256
//! no_shconf = true
//! file_prefix = "replog-1"                # unique per process on a host
//! lcores = "0@1"                          # EAL's main lcore on CPU 1
//! mtu = 1500                              # within the mbuf data room (2048 bytes)
//! mbufs = 8191
//! drop_probability = 0.0                  # fault injection: share of frames lost
//!
//! [[dpdk.members]]
//! id = 1
//! mac = "02:00:00:77:fe:01"
//! # ... one per member, this replica included
//! ```
//!
//! The members' `peer_addr` is not used by this transport (their client and metrics
//! addresses are).

use serde::{Deserialize, Serialize};
use std::collections::HashMap;

use crate::config::ConfigError;

/// `[dpdk]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpdkSection {
    /// The port's name as EAL knows it: a vdev name (`net_af_packet0`) or a PCI
    /// address. Default `net_af_packet0`.
    #[serde(default = "default_port")]
    pub port: String,
    /// EAL `--lcores`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lcores: Option<String>,
    /// EAL `-m` (megabytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u32>,
    /// EAL `--no-huge` (tests).
    #[serde(default)]
    pub no_huge: bool,
    /// EAL `--in-memory`.
    #[serde(default)]
    pub in_memory: bool,
    /// EAL `--no-shconf`.
    #[serde(default)]
    pub no_shconf: bool,
    /// EAL `--file-prefix`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_prefix: Option<String>,
    /// EAL `--vdev` arguments.
    #[serde(default)]
    pub vdevs: Vec<String>,
    /// PCI devices EAL may use (`-a`); none: `--no-pci`.
    #[serde(default)]
    pub pci: Vec<String>,
    /// More EAL arguments, verbatim.
    #[serde(default)]
    pub eal_args: Vec<String>,
    /// The largest Ethernet payload sent. Default 1500.
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    /// Buffers in the port's mbuf pool. Default 8191.
    #[serde(default = "default_mbufs")]
    pub mbufs: u32,
    /// Fault injection: each transmitted frame is lost with this probability. Default 0.
    #[serde(default)]
    pub drop_probability: f64,
    /// Every member's MAC.
    pub members: Vec<DpdkMember>,
}

/// One member's MAC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpdkMember {
    /// The member's id.
    pub id: u64,
    /// Its port's MAC, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
}

fn default_port() -> String {
    "net_af_packet0".into()
}

fn default_mtu() -> u32 {
    1500
}

fn default_mbufs() -> u32 {
    8191
}

/// Parses `aa:bb:cc:dd:ee:ff` (case-insensitive).
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

impl DpdkSection {
    /// Checks the section against the member ids.
    pub fn validate(&self, member_ids: &[u64]) -> Result<(), ConfigError> {
        let at = |k: String, m: String| Err(ConfigError::at(format!("dpdk.{k}"), m));
        if self.port.is_empty() {
            return at("port".into(), "must name the port (e.g. \"net_af_packet0\")".into());
        }
        if !(116..=9000).contains(&self.mtu) {
            return at("mtu".into(), format!("{} must be from 116 to 9000", self.mtu));
        }
        if !(0.0..1.0).contains(&self.drop_probability) {
            return at("drop_probability".into(), format!("{} must be in [0, 1)", self.drop_probability));
        }
        if self.no_huge && self.in_memory {
            return at("in_memory".into(), "EAL refuses in_memory with no_huge".into());
        }
        let mut seen: HashMap<u64, usize> = HashMap::new();
        let mut macs: HashMap<[u8; 6], usize> = HashMap::new();
        for (i, m) in self.members.iter().enumerate() {
            let Some(mac) = parse_mac(&m.mac) else {
                return at(format!("members[{i}].mac"), format!("{:?} is not a MAC (aa:bb:cc:dd:ee:ff)", m.mac));
            };
            if mac[0] & 1 == 1 || mac == [0; 6] {
                return at(format!("members[{i}].mac"), format!("{} is not a unicast address", m.mac));
            }
            if !member_ids.contains(&m.id) {
                return at(format!("members[{i}].id"), format!("{} is not among members", m.id));
            }
            if let Some(j) = seen.insert(m.id, i) {
                return at(format!("members[{i}].id"), format!("duplicate id {} (also dpdk.members[{j}])", m.id));
            }
            if let Some(j) = macs.insert(mac, i) {
                return at(format!("members[{i}].mac"), format!("duplicate MAC {} (also dpdk.members[{j}])", m.mac));
            }
        }
        if let Some(id) = member_ids.iter().find(|id| !seen.contains_key(id)) {
            return at("members".into(), format!("no MAC for member {id}: list every member in [[dpdk.members]]"));
        }
        Ok(())
    }

    /// The MAC of member `id` (after [`validate`](Self::validate)).
    pub fn mac_of(&self, id: u64) -> Option<[u8; 6]> {
        self.members.iter().find(|m| m.id == id).and_then(|m| parse_mac(&m.mac))
    }
}
