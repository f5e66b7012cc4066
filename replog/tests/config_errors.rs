//! Each way a configuration can be wrong gives a message naming the file and the key.

use replog::config::{ConfigError, LandingKind, ServeConfig};

/// A valid three-member file; tests break one thing in it.
const BASE: &str = r#"id = 1
cluster_id = 42
transport = "tcp"
durability = "fsync"
data_dir = "/tmp/replog-test"

[timing]
heartbeat_ms = 5
election_timeout_ms = 50
retransmit_ms = 20

[[members]]
id = 1
peer_addr = "127.0.0.1:7100"
client_addr = "127.0.0.1:7101"
metrics_addr = "127.0.0.1:7102"

[[members]]
id = 2
peer_addr = "127.0.0.1:7110"
client_addr = "127.0.0.1:7111"

[[members]]
id = 3
peer_addr = "127.0.0.1:7120"
client_addr = "127.0.0.1:7121"
"#;

fn err(text: &str) -> String {
    match ServeConfig::from_toml(text, "replog.toml") {
        Ok(c) => panic!("accepted:\n{text}\n{c:?}"),
        Err(e) => e.to_string(),
    }
}

/// `BASE` with the first occurrence of `from` replaced by `to`.
fn with(from: &str, to: &str) -> String {
    assert!(BASE.contains(from), "{from}");
    BASE.replacen(from, to, 1)
}

fn expect(text: &str, wanted: &[&str]) {
    let m = err(text);
    for w in wanted {
        assert!(m.contains(w), "message {m:?} lacks {w:?}");
    }
    assert!(m.starts_with("replog.toml: "), "{m}");
}

#[test]
fn the_base_is_valid() {
    ServeConfig::from_toml(BASE, "replog.toml").unwrap();
}

#[test]
fn invalid_socket_address_names_the_member_and_line() {
    let text = with("peer_addr = \"127.0.0.1:7120\"", "peer_addr = \"x\"");
    expect(&text, &["replog.toml: members[2].peer_addr: invalid socket address \"x\"", "line 25, column 13"]);
    let text = with("metrics_addr = \"127.0.0.1:7102\"", "metrics_addr = \"localhost:1\"");
    expect(&text, &["members[0].metrics_addr: invalid socket address \"localhost:1\""]);
}

#[test]
fn id_not_among_members() {
    expect(&with("id = 1\ncluster", "id = 4\ncluster"), &["replog.toml: id 4 is not among members (1, 2, 3)"]);
}

#[test]
fn duplicate_member_ids_and_addresses() {
    expect(&with("id = 3\n", "id = 2\n"), &["members[2].id: duplicate member id 2 (also members[1].id)"]);
    expect(
        &with("\"127.0.0.1:7121\"", "\"127.0.0.1:7110\""),
        &["members[2].client_addr: duplicate address 127.0.0.1:7110 (also members[1].peer_addr)"],
    );
}

#[test]
fn unreachable_member_addresses() {
    expect(&with("\"127.0.0.1:7111\"", "\"0.0.0.0:7111\""), &["members[1].client_addr: 0.0.0.0:7111 is unspecified"]);
    expect(&with("\"127.0.0.1:7110\"", "\"127.0.0.1:0\""), &["members[1].peer_addr: 127.0.0.1:0 has port 0"]);
}

#[test]
fn zero_ids() {
    expect(&with("cluster_id = 42", "cluster_id = 0"), &["replog.toml: cluster_id: must be non-zero"]);
    expect(&with("id = 1\ncluster", "id = 0\ncluster"), &["replog.toml: id: must be non-zero"]);
    expect(&with("id = 2\n", "id = 0\n"), &["members[1].id: must be non-zero"]);
    expect(&with("cluster_id = 42", "cluster_id = -1"), &["cluster_id: invalid value", "line 2"]);
}

#[test]
fn data_dir_is_required_unless_memory() {
    let text = with("data_dir = \"/tmp/replog-test\"\n", "");
    expect(&text, &["replog.toml: data_dir: required with durability = \"fsync\""]);
    let text = text.replace("durability = \"fsync\"", "durability = \"pmem\"");
    expect(&text, &["data_dir: required with durability = \"pmem\""]);
    let text = text.replace("durability = \"pmem\"", "durability = \"memory\"");
    ServeConfig::from_toml(&text, "replog.toml").unwrap();
}

#[test]
fn heartbeat_must_be_below_half_the_election_timeout() {
    expect(
        &with("heartbeat_ms = 5", "heartbeat_ms = 25"),
        &["replog.toml: timing.heartbeat_ms: 25 must be below half of timing.election_timeout_ms (50)"],
    );
    expect(&with("retransmit_ms = 20", "retransmit_ms = 0"), &["timing.retransmit_ms: 0 is out of range"]);
    expect(
        &with("retransmit_ms = 20", "retransmit_ms = 20\nspin_us = 200000"),
        &["timing.spin_us: 200000 is out of range: give microseconds from 0 to 100000"],
    );
    expect(&with("retransmit_ms = 20", "retransmit_ms = nan"), &["timing.retransmit_ms: NaN is out of range"]);
    expect(
        &with("heartbeat_ms = 5", "heartbeat_ms = \"5\""),
        &["timing.heartbeat_ms: invalid type: string \"5\", expected a number of milliseconds", "line 8"],
    );
}

#[test]
fn unknown_keys_are_refused() {
    expect(&with("transport", "tranport"), &["replog.toml: tranport: unknown field `tranport`", "line 3, column 1"]);
    expect(&with("retransmit_ms", "retransmit"), &["timing.retransmit: unknown field `retransmit`"]);
    expect(
        &with("client_addr = \"127.0.0.1:7111\"", "client_addr = \"127.0.0.1:7111\"\nlearnr = true"),
        &["members[1].learnr: unknown field `learnr`"],
    );
    expect(&format!("{BASE}\n[limit]\nwindow = 3\n"), &["limit: unknown field `limit`"]);
}

#[test]
fn wrong_types_and_values() {
    expect(
        &with("id = 1\ncluster", "id = \"one\"\ncluster"),
        &["replog.toml: id: invalid type: string \"one\"", "line 1, column 6"],
    );
    expect(&with("id = 2\n", "id = 2.5\n"), &["members[1].id: invalid type: floating point"]);
    expect(&with("transport = \"tcp\"", "transport = \"udp\""), &["transport: unknown variant `udp`"]);
    expect(&with("durability = \"fsync\"", "durability = 1"), &["durability: wanted string", "line 4"]);
    expect(&with("id = 3\npeer_addr = \"127.0.0.1:7120\"\n", "id = 3\n"), &["members[2]: missing field `peer_addr`"]);
    expect(
        &format!("{BASE}\n[log]\nformat = \"xml\"\n"),
        &["log.format: unknown variant `xml`, expected `text` or `json`"],
    );
    expect(&format!("{BASE}\n[log]\nlevel = \"loud=\"\n"), &["log.level: invalid filter \"loud=\""]);
}

#[test]
fn toml_syntax_errors_give_the_line() {
    expect(&BASE.replacen("id = 1\n", "id = = 1\n", 1), &["line 1, column 6"]);
    expect(&with("[timing]", "[timing"), &["line 7"]);
}

#[test]
fn backends_not_built_are_refused_clearly() {
    if !cfg!(feature = "rdma") {
        expect(
            &with("transport = \"tcp\"", "transport = \"rdma\""),
            &["replog.toml: transport: \"rdma\": the RDMA backend is not built in this binary yet"],
        );
    }
    if cfg!(feature = "dpdk") {
        expect(
            &with("transport = \"tcp\"", "transport = \"dpdk\""),
            &["dpdk: transport = \"dpdk\" needs a [dpdk] section"],
        );
    } else {
        expect(
            &with("transport = \"tcp\"", "transport = \"dpdk\""),
            &["the DPDK backend is not built in this binary yet"],
        );
    }
}

#[test]
fn members_must_include_a_voter() {
    let text = BASE
        .replace("client_addr = \"127.0.0.1:7101\"", "client_addr = \"127.0.0.1:7101\"\nlearner = true")
        .replace("client_addr = \"127.0.0.1:7111\"", "client_addr = \"127.0.0.1:7111\"\nlearner = true")
        .replace("client_addr = \"127.0.0.1:7121\"", "client_addr = \"127.0.0.1:7121\"\nlearner = true");
    expect(&text, &["members: every member is a learner"]);
    expect("id = 1\ncluster_id = 1\ndurability = \"memory\"\nmembers = []\n", &["members: no members"]);
}

#[test]
fn limits_are_checked() {
    expect(&format!("{BASE}\n[limits]\nwindow = 0\n"), &["limits.window: must be non-zero"]);
    expect(
        &format!("{BASE}\n[limits]\nmax_entry_bytes = 16777216\n"),
        &["limits.max_frame_bytes: 16777216 cannot carry an entry of limits.max_entry_bytes (16777216)"],
    );
    expect(&with("data_dir", "segment_size = 65536\ndata_dir"), &["segment_size: 65536 holds records of at most"]);
    expect(&with("data_dir", "segment_size = 1001\ndata_dir"), &["segment_size: 1001 must be a multiple of 8"]);
}

#[test]
fn validate_names_keys_for_configs_built_in_code() {
    let mut cfg = ServeConfig::from_toml(BASE, "replog.toml").unwrap();
    cfg.members[1].peer_addr = cfg.members[0].peer_addr;
    let e = cfg.validate().unwrap_err();
    assert_eq!(e.key(), Some("members[1].peer_addr"));
    assert!(matches!(e, ConfigError::Invalid { .. }));
    assert!(e.to_string().starts_with("configuration: members[1].peer_addr: duplicate address"), "{e}");
    assert!(e.with_origin("x.toml").to_string().starts_with("x.toml: "));
}

#[test]
fn log_levels() {
    for ok in ["info", "DEBUG", "warn,replog=trace", "replog::node=debug,info", "off"] {
        let text = format!("{BASE}\n[log]\nlevel = \"{ok}\"\nformat = \"json\"\n");
        ServeConfig::from_toml(&text, "replog.toml").unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    for bad in ["inf", "", "info,", "replog=loud"] {
        expect(&format!("{BASE}\n[log]\nlevel = \"{bad}\"\n"), &["log.level: invalid filter"]);
    }
}

#[test]
fn peer_tls_files_go_together() {
    let m = err(&format!("{BASE}\n[security]\npeer_tls_cert_file = \"a.crt\"\npeer_tls_key_file = \"a.key\"\n"));
    assert!(m.contains("peer_tls_cert_file, peer_tls_key_file and peer_tls_ca_file together"), "{m}");
    assert!(m.contains("security.peer_tls_ca_file missing"), "{m}");
    let m = err(&format!("{BASE}\n[security]\npeer_tls_ca_file = \"ca.crt\"\n"));
    assert!(m.contains("security.peer_tls_cert_file and security.peer_tls_key_file missing"), "{m}");
    let all =
        "[security]\npeer_tls_cert_file = \"a.crt\"\npeer_tls_key_file = \"a.key\"\npeer_tls_ca_file = \"ca.crt\"\n";
    let cfg = ServeConfig::from_toml(&format!("{BASE}\n{all}"), "replog.toml").unwrap();
    // The files are read when the transport is built: missing ones are named.
    let e = cfg.peer_tls().expect_err("no such files").to_string();
    assert!(e.contains("peer TLS certificate file a.crt: cannot read it"), "{e}");
}

#[test]
fn a_joining_replica_starts_in_no_membership_and_needs_a_voter_to_contact() {
    // Replica 1 joins a cluster of 2 and 3: it is neither voter nor learner at start.
    let cfg = ServeConfig::from_toml(&with("cluster_id = 42", "cluster_id = 42\njoin = true"), "replog.toml").unwrap();
    let p = cfg.paxos_config();
    assert_eq!((p.voters, p.learners), (vec![2, 3], vec![]));
    assert_eq!(ServeConfig::from_toml(&cfg.to_toml(), "again").unwrap(), cfg);
    // Alone, it has nobody to contact.
    let alone = BASE.split("[[members]]").take(2).collect::<Vec<_>>().join("[[members]]");
    expect(&alone.replacen("cluster_id = 42", "cluster_id = 42\njoin = true", 1), &["members", "current voters"]);
    // Only over TCP.
    let dpdk = with("cluster_id = 42", "cluster_id = 42\njoin = true").replacen(
        "transport = \"tcp\"",
        "transport = \"rdma\"",
        1,
    );
    let m = err(&dpdk);
    assert!(m.contains("join") || m.contains("rdma"), "{m}");
}

#[test]
fn read_after_write_landing_needs_memory_durability() {
    let text = format!("{BASE}\n[rdma]\nlanding = \"read_after_write\"\n");
    expect(&text, &["rdma.landing", "read_after_write", "fsync"]);
    let ok = text.replace("durability = \"fsync\"", "durability = \"memory\"");
    ServeConfig::from_toml(&ok, "replog.toml").unwrap();
}

#[test]
fn landing_kinds_parse() {
    for (name, kind) in [("auto", LandingKind::Auto), ("ack", LandingKind::Ack)] {
        let text = format!("{BASE}\n[rdma]\nlanding = \"{name}\"\n");
        let c = ServeConfig::from_toml(&text, "replog.toml").unwrap();
        assert_eq!(c.rdma.landing, kind);
        assert_eq!(kind.as_str(), name);
    }
    expect(&format!("{BASE}\n[rdma]\nlanding = \"flush\"\n"), &["landing"]);
}

#[test]
fn read_after_write_landing_under_pmem_needs_a_region_path() {
    let pmem = with("durability = \"fsync\"", "durability = \"pmem\"");
    let text = format!("{pmem}\n[rdma]\nlanding = \"read_after_write\"\n");
    expect(&text, &["rdma.landing", "read_after_write", "rdma.region_path", "not durable"]);
    let ok = format!("{pmem}\n[rdma]\nlanding = \"read_after_write\"\nregion_path = \"/dev/dax0.0\"\n");
    let c = ServeConfig::from_toml(&ok, "replog.toml").unwrap();
    assert_eq!(c.rdma.region_path, std::path::PathBuf::from("/dev/dax0.0"));
    // fsync's ring is not persistent memory even on a device.
    let fsync = format!("{BASE}\n[rdma]\nlanding = \"read_after_write\"\nregion_path = \"/dev/dax0.0\"\n");
    expect(&fsync, &["rdma.landing", "read_after_write", "fsync"]);
}

#[test]
fn a_relative_region_path_is_refused() {
    expect(&format!("{BASE}\n[rdma]\nregion_path = \"dax0.0\"\n"), &["rdma.region_path", "dax0.0", "absolute"]);
    expect(&format!("{BASE}\n[rdma]\nregion_path = \"./ring\"\n"), &["rdma.region_path", "absolute"]);
    // Empty: anonymous memory.
    let c = ServeConfig::from_toml(&format!("{BASE}\n[rdma]\nregion_path = \"\"\n"), "replog.toml").unwrap();
    assert!(c.rdma.region_path.as_os_str().is_empty());
}

/// Where the leader's writes complete, by durability, landing and region path.
#[cfg(feature = "rdma")]
#[test]
fn landing_follows_durability_and_region_path() {
    use replog::rdma_agent::{landing_for, Landing};
    let case = |durability: &str, landing: &str, path: &str| {
        let mut text = with("durability = \"fsync\"", &format!("durability = \"{durability}\""));
        text.push_str(&format!("\n[rdma]\nlanding = \"{landing}\"\nregion_path = \"{path}\"\n"));
        landing_for(&ServeConfig::from_toml(&text, "replog.toml").unwrap())
    };
    assert_eq!(case("memory", "auto", ""), Landing::Write);
    assert_eq!(case("memory", "read_after_write", ""), Landing::ReadAfterWrite);
    assert_eq!(case("fsync", "auto", ""), Landing::Ack);
    assert_eq!(case("fsync", "auto", "/dev/dax0.0"), Landing::Ack);
    assert_eq!(case("pmem", "auto", ""), Landing::Ack);
    assert_eq!(case("pmem", "auto", "/dev/dax0.0"), Landing::ReadAfterWrite);
    assert_eq!(case("pmem", "read_after_write", "/dev/dax0.0"), Landing::ReadAfterWrite);
    assert_eq!(case("pmem", "ack", "/dev/dax0.0"), Landing::Ack);
}

/// Replicas that disagree on when a write counts as accepted (durability, or a pmem ring
/// on device-dax on one and in memory on another) present different configuration
/// digests at the RDMA handshake, which refuses them; replicas that agree present one.
#[cfg(feature = "rdma")]
#[test]
fn replicas_must_agree_on_durability_and_landing_over_rdma() {
    let digest = |durability: &str, path: &str| {
        let mut text = with("durability = \"fsync\"", &format!("durability = \"{durability}\""));
        text.push_str(&format!("\n[rdma]\nregion_path = \"{path}\"\n"));
        let cfg = ServeConfig::from_toml(&text, "replog.toml").unwrap();
        replog::rdma_agent::transport_config(&cfg).unwrap().config_digest
    };
    // Each replica has its own device: the path itself does not matter, its presence does.
    assert_eq!(digest("pmem", "/dev/dax0.0"), digest("pmem", "/dev/dax1.0"));
    assert_ne!(digest("pmem", "/dev/dax0.0"), digest("pmem", ""), "read-after-write against acknowledgements");
    assert_ne!(digest("memory", ""), digest("fsync", ""));
    assert_ne!(digest("fsync", ""), digest("pmem", ""));
    assert_eq!(digest("fsync", ""), digest("fsync", "/dev/dax0.0"), "fsync completes by acknowledgement either way");
}

/// Under pmem, writes complete at a read-after-write into the ring: `open` claims that
/// only for a device-dax device, before it touches any RDMA device.
#[cfg(feature = "rdma")]
#[test]
fn a_pmem_ring_must_be_a_device_dax_device() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ring");
    std::fs::write(&file, [0u8; 4096]).unwrap();
    let text = format!(
        "{}\n[rdma]\nregion_path = \"{}\"\n",
        with("durability = \"fsync\"", "durability = \"pmem\"").replacen(
            "transport = \"tcp\"",
            "transport = \"rdma\"",
            1
        ),
        file.display()
    );
    let cfg = ServeConfig::from_toml(&text, "replog.toml").unwrap();
    let e = replog::rdma_agent::open(&cfg).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("rdma.region_path") && e.contains("device-dax") && e.contains("not a character device"), "{e}");
    let missing = text.replace(&file.display().to_string(), "/nonexistent/dax9.9");
    let e = replog::rdma_agent::open(&ServeConfig::from_toml(&missing, "replog.toml").unwrap())
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/dax9.9") && e.contains("cannot stat"), "{e}");
}
