//! Peer authentication between `replog serve` processes: with a cluster secret, a
//! process holding the wrong secret cannot join (neither as an extra member nor by
//! claiming a member's id), a member with a stale member list is refused, and the
//! cluster keeps its leader and its log.

mod support;

use replog::config::{DurabilityKind, Member, ServeConfig};
use std::time::Duration;
use support::*;

/// Kills the child when dropped.
struct Rogue(std::process::Child);

impl Drop for Rogue {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_text(path: &std::path::Path, needle: &str, timeout: Duration) -> bool {
    let t0 = std::time::Instant::now();
    while t0.elapsed() < timeout {
        if strip_ansi(&std::fs::read_to_string(path).unwrap_or_default()).contains(needle) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn processes_without_the_secret_or_with_a_stale_member_list_cannot_join() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let c = Cluster::start_with_secret(d, 3, DurabilityKind::Memory, b"the right secret\n");
    let leader = c.wait_leader(Duration::from_secs(20));
    let leader_id = c.cfgs[leader].id;
    let mut client = c.client();
    for i in 0..5 {
        client.append(format!("entry {i}").into_bytes()).unwrap();
    }
    c.wait_converged(5, Duration::from_secs(10));
    let before = c.read_all(0);
    assert_eq!(before.len(), 5);

    let base = free_ports(12);
    let port = |k: u16| std::net::SocketAddr::from(([127, 0, 0, 1], base + k));
    let wrong = d.join("wrong-secret");
    std::fs::write(&wrong, b"not the secret").unwrap();

    // 1. An extra member (id 4) with the wrong secret, listing the cluster plus itself.
    let mut extra = c.cfgs[0].clone();
    extra.id = 4;
    extra.data_dir = d.join("rogue-4");
    extra.members.push(Member { id: 4, peer_addr: port(0), client_addr: port(1), metrics_addr: None, learner: false });
    extra.security.secret_file = Some(wrong.clone());
    // 2. A process claiming member 3's id with the wrong secret (on its own ports).
    let mut impostor = c.cfgs[2].clone();
    impostor.data_dir = d.join("rogue-3");
    impostor.members[2].peer_addr = port(3);
    impostor.members[2].client_addr = port(4);
    impostor.members[2].metrics_addr = None;
    impostor.security.secret_file = Some(wrong.clone());
    // 3. A process claiming member 3's id with the right secret but a stale member list.
    let mut stale = impostor.clone();
    stale.data_dir = d.join("rogue-stale");
    stale.members[2].peer_addr = port(6);
    stale.members[2].client_addr = port(7);
    stale.security.secret_file = c.cfgs[0].security.secret_file.clone();
    let rogues = [
        Rogue(spawn_serve(d, "rogue-extra", &extra)),
        Rogue(spawn_serve(d, "rogue-impostor", &impostor)),
        Rogue(spawn_serve(d, "rogue-stale", &stale)),
    ];

    let t = Duration::from_secs(10);
    let others: Vec<usize> = (0..3).filter(|&i| i != 2).collect();
    for &i in &others {
        for needles in [
            &["WARN", "unknown node id 4"][..],
            &["WARN", "authentication failed: node 3 did not prove it knows the cluster secret"][..],
            &["WARN", "stale configuration: node 3 was configured with another member list"][..],
        ] {
            let line = c.wait_log_line(i, needles, t);
            assert!(line.is_some(), "replica {}: no line with {needles:?}:\n{}", i + 1, strip_ansi(&c.log_of(i)));
        }
    }
    assert!(wait_text(&d.join("rogue-extra.log"), "rejected by the peer: unknown node id 4", t));
    assert!(wait_text(&d.join("rogue-impostor.log"), "rejected by the peer: authentication failed", t));
    assert!(wait_text(&d.join("rogue-stale.log"), "rejected by the peer: stale configuration", t));
    // Let the rogues try for a while (elections, redials).
    std::thread::sleep(Duration::from_secs(2));

    // The cluster kept its leader and its log, and still takes writes.
    assert_eq!(c.wait_leader(Duration::from_secs(5)), leader);
    for i in 0..3 {
        let s = c.status(i).expect("status");
        assert_eq!(s.leader, Some(leader_id), "replica {}: {s:?}", i + 1);
    }
    let p = client.append(b"after the rogues".to_vec()).unwrap();
    assert_eq!(p, 6);
    c.wait_converged(6, Duration::from_secs(10));
    for i in 0..3 {
        let log = c.read_all(i);
        assert_eq!(&log[..5], &before[..], "replica {}", i + 1);
        assert_eq!(log.len(), 6);
    }
    // No rogue ever saw a peer link come up.
    for name in ["rogue-extra", "rogue-impostor", "rogue-stale"] {
        let text = strip_ansi(&std::fs::read_to_string(d.join(format!("{name}.log"))).unwrap_or_default());
        assert!(!text.contains("link up") && !text.contains("accepted peer"), "{name}:\n{text}");
    }
    drop(rogues);
}

#[test]
fn an_empty_or_missing_secret_file_is_refused_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut cfg = ServeConfig::local_cluster(1, free_ports(3), d, DurabilityKind::Memory).remove(0);
    let empty = d.join("empty-secret");
    std::fs::write(&empty, b" \n").unwrap();
    cfg.security.secret_file = Some(empty.clone());
    let err = cfg.read_secret().unwrap_err().to_string();
    assert!(err.contains("empty-secret") && err.contains("is empty"), "{err}");
    cfg.security.secret_file = Some(d.join("missing"));
    let err = cfg.read_secret().unwrap_err().to_string();
    assert!(err.contains("cannot read the secret file") && err.contains("missing"), "{err}");
    // `replog serve` says so and exits.
    let mut child = spawn_serve(d, "no-secret", &cfg);
    let status = child.wait().unwrap();
    assert!(!status.success());
    let text = std::fs::read_to_string(d.join("no-secret.log")).unwrap();
    assert!(text.contains("cannot read the secret file") && text.contains("missing"), "{text}");
    // And a file that parses keeps the setting.
    let back = ServeConfig::from_toml(&cfg.to_toml(), "x").unwrap();
    assert_eq!(back.security.secret_file, Some(d.join("missing")));
}
