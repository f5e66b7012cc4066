//! The configuration file: the example parses, derived configurations, round trips.

use std::path::{Path, PathBuf};

use replog::config::{DurabilityKind, LogFormat, ServeConfig, TransportKind, LOCAL_CLUSTER_ID};
use replog::store::Mode;

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/replog.toml")
}

#[test]
fn the_example_file_loads() {
    let cfg = ServeConfig::load(&example_path()).expect("the example is valid");
    assert_eq!(cfg.id, 1);
    assert_eq!(cfg.cluster_id, LOCAL_CLUSTER_ID);
    assert_eq!(cfg.transport, TransportKind::Tcp);
    assert_eq!(cfg.durability, DurabilityKind::Fsync);
    assert_eq!(cfg.data_dir, PathBuf::from("/var/lib/replog/node-1"));
    assert_eq!(cfg.recycle_segments, 2);
    assert_eq!(cfg.store_config().recycle_segments, 2);
    assert_eq!(cfg.members.len(), 3);
    assert_eq!(cfg.me().client_addr, "127.0.0.1:7101".parse().unwrap());
    assert_eq!(cfg.members[2].metrics_addr, Some("127.0.0.1:7122".parse().unwrap()));
    assert_eq!(cfg.log.format, LogFormat::Text);
    assert_eq!(cfg.store_mode(), Mode::Fsync);
    assert_eq!(cfg.peers().map(|m| m.id).collect::<Vec<_>>(), vec![2, 3]);

    let p = cfg.paxos_config();
    p.validate().unwrap();
    assert_eq!(p.id, 1);
    assert_eq!(p.voters, vec![1, 2, 3]);
    assert!(p.learners.is_empty());
    assert_eq!(p.heartbeat_interval, 10_000_000);
    assert_eq!(p.election_timeout, 150_000_000);
    assert_eq!(p.retransmit_timeout, 40_000_000);
    assert_eq!(p.window, 256);
    assert_eq!(p.max_batch_bytes, 1 << 20);
    assert_eq!(p.seed, 1);
}

const MINIMAL: &str = r#"
id = 2
cluster_id = 7
durability = "memory"

[[members]]
id = 1
peer_addr = "127.0.0.1:9000"
client_addr = "127.0.0.1:9001"

[[members]]
id = 2
peer_addr = "127.0.0.1:9010"
client_addr = "127.0.0.1:9011"

[[members]]
id = 3
peer_addr = "127.0.0.1:9020"
client_addr = "127.0.0.1:9021"
learner = true
"#;

#[test]
fn a_minimal_file_takes_defaults() {
    let cfg = ServeConfig::from_toml(MINIMAL, "min.toml").unwrap();
    assert_eq!(cfg.transport, TransportKind::Tcp);
    assert_eq!(cfg.store_mode(), Mode::Memory);
    assert!(cfg.data_dir.as_os_str().is_empty());
    assert_eq!(cfg.timing.heartbeat_ms, 10.0);
    assert_eq!(cfg.limits.max_entry_bytes, 1 << 20);
    assert_eq!(cfg.log.level, "info");
    assert_eq!(cfg.me().metrics_addr, None);
    let p = cfg.paxos_config();
    assert_eq!(p.voters, vec![1, 2]);
    assert_eq!(p.learners, vec![3]);
}

#[test]
fn fractional_milliseconds_become_nanoseconds() {
    let text = MINIMAL.replace(
        "durability = \"memory\"",
        "durability = \"memory\"\n[timing]\nheartbeat_ms = 0.25\nelection_timeout_ms = 2\nretransmit_ms = 1.5",
    );
    let cfg = ServeConfig::from_toml(&text, "t.toml").unwrap();
    let p = cfg.paxos_config();
    assert_eq!(p.heartbeat_interval, 250_000);
    assert_eq!(p.election_timeout, 2_000_000);
    assert_eq!(p.retransmit_timeout, 1_500_000);
}

#[test]
fn to_toml_round_trips() {
    for text in [std::fs::read_to_string(example_path()).unwrap(), MINIMAL.to_string()] {
        let cfg = ServeConfig::from_toml(&text, "a.toml").unwrap();
        let written = cfg.to_toml();
        let back = ServeConfig::from_toml(&written, "b.toml").unwrap_or_else(|e| panic!("{e}\n{written}"));
        assert_eq!(back, cfg, "{written}");
    }
}

#[test]
fn local_cluster_validates_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    for durability in [DurabilityKind::Fsync, DurabilityKind::Memory] {
        let cfgs = ServeConfig::local_cluster(3, 17000, dir.path(), durability);
        assert_eq!(cfgs.len(), 3);
        for (i, cfg) in cfgs.iter().enumerate() {
            cfg.validate().unwrap();
            assert_eq!(cfg.id, i as u64 + 1);
            assert_eq!(cfg.cluster_id, LOCAL_CLUSTER_ID);
            assert_eq!(cfg.members, cfgs[0].members);
            assert_eq!(cfg.durability, durability);
            assert_eq!(cfg.data_dir, dir.path().join(format!("node-{}", i + 1)));
            let port = 17000 + 3 * i as u16;
            assert_eq!(cfg.me().peer_addr.port(), port);
            assert_eq!(cfg.me().client_addr.port(), port + 1);
            assert_eq!(cfg.me().metrics_addr.unwrap().port(), port + 2);
            assert!(cfg.me().peer_addr.ip().is_loopback());

            // `replog up` writes the file that `replog serve --config` reads.
            let path = dir.path().join(format!("node-{}.toml", i + 1));
            std::fs::write(&path, cfg.to_toml()).unwrap();
            assert_eq!(&ServeConfig::load(&path).unwrap(), cfg);
        }
    }
}

#[test]
fn a_missing_file_is_named() {
    let e = ServeConfig::load(Path::new("/nonexistent/replog.toml")).unwrap_err();
    let m = e.to_string();
    assert!(m.starts_with("/nonexistent/replog.toml: cannot read"), "{m}");
}

#[test]
fn init_tracing_can_be_called_more_than_once() {
    replog::config::init_tracing("info,replog=debug", false);
    replog::config::init_tracing("warn", true);
    replog::config::init_tracing("not a level", false);
    tracing::info!(key = 1, "logging works");
}

#[test]
fn free_loopback_port_runs_are_disjoint_bindable_and_outside_the_ephemeral_range() {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let eph: Vec<u32> = range.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    let mut runs = Vec::new();
    for _ in 0..20 {
        let base = replog::config::free_loopback_ports(9).expect("a free run");
        let (lo, hi) = (u32::from(base), u32::from(base) + 9);
        if let [first, last] = eph[..] {
            assert!(hi <= first || lo > last, "run {lo}..{hi} overlaps the ephemeral range {first}..={last}");
        }
        for &(a, b) in &runs {
            assert!(hi <= a || lo >= b, "run {lo}..{hi} overlaps an earlier run {a}..{b}");
        }
        // Each port of the run can still be bound (nothing holds it).
        for p in lo..hi {
            std::net::TcpListener::bind(("127.0.0.1", p as u16)).expect("the port is free");
        }
        runs.push((lo, hi));
    }
}

#[test]
fn rdma_region_path_defaults_to_memory_and_round_trips() {
    let cfg = ServeConfig::from_toml(MINIMAL, "a.toml").unwrap();
    assert!(cfg.rdma.region_path.as_os_str().is_empty(), "default: anonymous memory");
    assert!(!cfg.to_toml().contains("region_path"), "an empty path is not written");
    let text = format!("{MINIMAL}\n[rdma]\nregion_path = \"/dev/dax1.0\"\n");
    let cfg = ServeConfig::from_toml(&text, "a.toml").unwrap();
    assert_eq!(cfg.rdma.region_path, PathBuf::from("/dev/dax1.0"));
    let written = cfg.to_toml();
    let back = ServeConfig::from_toml(&written, "b.toml").unwrap_or_else(|e| panic!("{e}\n{written}"));
    assert_eq!(back, cfg, "{written}");
}
