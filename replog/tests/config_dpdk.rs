//! The `[dpdk]` section: parsed, written back, and refused with a message naming the key.
#![cfg(feature = "dpdk")]

use replog::config::{ServeConfig, TransportKind};

const BASE: &str = r#"id = 1
cluster_id = 42
transport = "dpdk"
durability = "memory"

[dpdk]
port = "net_af_packet0"
vdevs = ["net_af_packet0,iface=eth0"]
no_huge = true
memory_mb = 256
no_shconf = true
file_prefix = "replog-1"
drop_probability = 0.05

[[dpdk.members]]
id = 1
mac = "02:00:00:77:fe:01"

[[dpdk.members]]
id = 2
mac = "02:00:00:77:FE:02"

[[members]]
id = 1
peer_addr = "10.0.0.1:7100"
client_addr = "10.0.0.1:7101"

[[members]]
id = 2
peer_addr = "10.0.0.2:7100"
client_addr = "10.0.0.2:7101"
"#;

fn err(text: &str) -> String {
    match ServeConfig::from_toml(text, "replog.toml") {
        Ok(c) => panic!("accepted:\n{text}\n{c:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_dpdk_section_parses_and_round_trips() {
    let cfg = ServeConfig::from_toml(BASE, "replog.toml").unwrap();
    assert_eq!(cfg.transport, TransportKind::Dpdk);
    let d = cfg.dpdk.as_ref().unwrap();
    assert_eq!(d.mac_of(2), Some([2, 0, 0, 0x77, 0xfe, 2]));
    assert_eq!((d.mtu, d.mbufs, d.drop_probability), (1500, 8191, 0.05));
    let back = ServeConfig::from_toml(&cfg.to_toml(), "written").unwrap();
    assert_eq!(back, cfg);
    // The MACs are part of the member-list digest that peers compare.
    let mut other = cfg.clone();
    other.dpdk.as_mut().unwrap().members[1].mac = "02:00:00:77:fe:09".into();
    assert_ne!(other.config_digest(), cfg.config_digest());
}

#[test]
fn a_bad_dpdk_section_is_refused_naming_the_key() {
    let e = err(&BASE.replace("02:00:00:77:FE:02", "02:00:00:77:fe"));
    assert!(e.contains("replog.toml: dpdk.members[1].mac: \"02:00:00:77:fe\" is not a MAC"), "{e}");
    let e = err(&BASE.replace("02:00:00:77:FE:02", "02:00:00:77:fe:01"));
    assert!(e.contains("dpdk.members[1].mac: duplicate MAC"), "{e}");
    let e = err(&BASE.replace("02:00:00:77:FE:02", "03:00:00:77:fe:02"));
    assert!(e.contains("not a unicast address"), "{e}");
    let e = err(&BASE.replace("id = 2\nmac", "id = 7\nmac"));
    assert!(e.contains("dpdk.members[1].id: 7 is not among members"), "{e}");
    let e = err(&BASE.replace("drop_probability = 0.05", "drop_probability = 1.5"));
    assert!(e.contains("dpdk.drop_probability: 1.5 must be in [0, 1)"), "{e}");
    let e = err(&BASE.replace("no_shconf = true", "no_shconf = true\nin_memory = true"));
    assert!(e.contains("dpdk.in_memory"), "{e}");
    let two = BASE.find("[[dpdk.members]]\nid = 2").unwrap();
    let end = BASE.find("[[members]]").unwrap();
    let e = err(&format!("{}{}", &BASE[..two], &BASE[end..]));
    assert!(e.contains("dpdk.members: no MAC for member 2"), "{e}");
    let e = err(&BASE.replace("[dpdk]", "[dpdk]\nmtu_typo = 1"));
    assert!(e.contains("mtu_typo"), "{e}");
}
