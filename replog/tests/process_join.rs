//! Replacing a replica with a brand-new machine while serving, with real `replog serve`
//! processes (fsync): a 3-replica cluster under a continuous client load adds replica
//! 4, which no configuration file of the cluster lists (new id, new ports; it starts
//! with `join = true`), through `replog members add`; it catches up as a learner, is
//! promoted to voter, the leader of the moment is SIGKILLed, and the dead replica is
//! removed (`replog members remove`): the replacement is done. An original replica then
//! restarts from its unchanged file and rejoins. Bad requests on the way
//! (duplicate id, an address in use, unknown ids) are refused with their reason.
//! Afterwards every remaining replica holds the same log, and every acknowledged
//! append is in it exactly once at its position.

mod support;

use replog::client::{ClientError, ErrorCode, MemberOp};
use replog::config::{DurabilityKind, Member};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};
use support::{free_ports, serve_command, Appenders, Cluster};

/// Runs `replog members ARGS` against the cluster; (success, stdout + stderr).
fn members_cli(cluster: &Cluster, servers: &[SocketAddr], args: &[&str]) -> (bool, String) {
    let list: Vec<String> = servers.iter().map(|a| a.to_string()).collect();
    let out = Command::new(env!("CARGO_BIN_EXE_replog"))
        .arg("members")
        .args(args)
        .args(["--servers", &list.join(","), "--cluster-id", &cluster.cluster_id().to_string()])
        .output()
        .expect("run replog members");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Retries `replog members ARGS` while the leader answers "busy", "not caught up yet" or
/// is being elected; panics on any other refusal or after 60 s.
fn members_cli_until_ok(cluster: &Cluster, servers: &[SocketAddr], args: &[&str]) -> String {
    let t0 = Instant::now();
    for _ in 0..600 {
        let (ok, text) = members_cli(cluster, servers, args);
        if ok {
            return text;
        }
        let retry = ["in progress", "not caught up", "retry", "no leader", "unavailable", "timed out", "connect"]
            .iter()
            .any(|w| text.to_lowercase().contains(w));
        assert!(retry && t0.elapsed() < Duration::from_secs(60), "replog members {args:?} failed: {text}");
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("replog members {args:?} kept failing");
}

#[test]
fn a_replica_no_configuration_lists_replaces_a_killed_leader_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut cluster = Cluster::start(d, 3, DurabilityKind::Fsync);
    cluster.wait_leader(Duration::from_secs(20));
    let original: Vec<SocketAddr> = cluster.client_addrs();

    // The load: two clients appending continuously.
    let load = Appenders::start(&cluster, 2, 50_000);
    load.wait_more(300);

    // Replica 4: a new id on new ports, in no replica's configuration; its own file
    // names the members to contact and itself, with join = true.
    let base = free_ports(2);
    let (peer4, client4) = (SocketAddr::from(([127, 0, 0, 1], base)), SocketAddr::from(([127, 0, 0, 1], base + 1)));
    let mut cfg4 = cluster.cfgs[0].clone();
    cfg4.id = 4;
    cfg4.join = true;
    cfg4.data_dir = d.join("node-4");
    cfg4.members.push(Member { id: 4, peer_addr: peer4, client_addr: client4, metrics_addr: None, learner: false });
    cfg4.validate().expect("the joining replica's configuration");
    for c in &cluster.cfgs {
        assert!(c.member(4).is_none(), "replica 4 is configured on replica {}", c.id);
    }
    let p4 = serve_command(d, "node-4", &cfg4, &[]).spawn().expect("start replica 4");
    cluster.cfgs.push(cfg4);
    cluster.procs.push(Some(p4));

    // Bad requests first: each refused with its reason, nothing changes.
    let p4s = peer4.to_string();
    let c4s = client4.to_string();
    let in_use = cluster.cfgs[1].me().client_addr.to_string();
    let bad: [(&[&str], &str); 5] = [
        (&["add", "2", "--peer-addr", &p4s, "--client-addr", &c4s], "replica 2 is already a member (a voter)"),
        (&["add", "5", "--peer-addr", &p4s, "--client-addr", &in_use], "is in use by replica 2"),
        (&["add", "0", "--peer-addr", &p4s, "--client-addr", &c4s], "replica id 0 is not usable"),
        (&["promote", "9"], "replica 9 is not a member"),
        (&["remove", "9"], "replica 9 is not a member"),
    ];
    for (args, want) in bad {
        let (ok, text) = members_cli(&cluster, &original, args);
        assert!(!ok && text.contains(want), "replog members {args:?}: expected a refusal with {want:?}, got: {text}");
    }

    // Add replica 4 as a learner: it catches up from slot 1.
    let out = members_cli_until_ok(&cluster, &original, &["add", "4", "--peer-addr", &p4s, "--client-addr", &c4s]);
    assert!(out.contains("proposed to add replica 4"), "{out}");
    assert!(
        cluster.wait_log_line(3, &["membership changed", "learners=[4]"], Duration::from_secs(30)).is_some(),
        "replica 4 did not learn it was added; logs in {}",
        d.display()
    );
    load.wait_more(300);
    // Adding it twice is refused.
    let (ok, text) = members_cli(&cluster, &original, &["add", "4", "--peer-addr", &p4s, "--client-addr", &c4s]);
    assert!(!ok && text.contains("replica 4 is already a member (a learner)"), "{text}");

    // Promote it once it caught up (the leader refuses before).
    let out = members_cli_until_ok(&cluster, &original, &["promote", "4"]);
    assert!(out.contains("proposed to promote replica 4"), "{out}");
    assert!(
        cluster.wait_log_line(3, &["membership changed", "voters=[1, 2, 3, 4]"], Duration::from_secs(30)).is_some(),
        "replica 4 was not promoted; logs in {}",
        d.display()
    );
    load.wait_more(300);

    // Kill the leader (an original replica, or replica 1 if replica 4 leads), and
    // replace it: remove it from the membership.
    let leader = cluster.wait_leader(Duration::from_secs(20));
    let gone = if leader < 3 { leader } else { 0 };
    let gone_id = cluster.cfgs[gone].id;
    let pid = cluster.procs[gone].as_ref().map(|p| p.id()).expect("running");
    cluster.kill(gone);
    load.wait_more(300);
    let mut servers = cluster.client_addrs();
    servers.remove(gone);
    let out = members_cli_until_ok(&cluster, &servers, &["remove", &gone_id.to_string()]);
    assert!(out.contains(&format!("proposed to remove replica {gone_id}")), "{out}");
    let keep: Vec<usize> = (0..4).filter(|&i| i != gone).collect();
    let voters: Vec<u64> = keep.iter().map(|&i| cluster.cfgs[i].id).collect();
    let want = format!("voters={voters:?}");
    for &i in &keep {
        assert!(
            cluster.wait_log_line(i, &["membership changed", &want, "learners=[]"], Duration::from_secs(30)).is_some(),
            "replica {} did not apply the replacement; logs in {}",
            cluster.cfgs[i].id,
            d.display()
        );
    }
    load.wait_more(300);

    // An original replica restarts from its unchanged configuration file (which does
    // not list replica 4): it links to replica 4 from the membership in its log, and
    // catches up.
    let restarted = keep[0];
    assert!(cluster.cfgs[restarted].member(4).is_none());
    cluster.kill(restarted);
    load.wait_more(200);
    cluster.restart(restarted);
    assert!(
        cluster
            .wait_log_line(restarted, &["newest membership change in the log", &want], Duration::from_secs(20))
            .is_some(),
        "the restarted replica did not find the membership in its log; logs in {}",
        d.display()
    );
    load.wait_more(300);
    let acks = load.finish().acked;

    // The removed replica's process is gone.
    assert!(cluster.procs[gone].is_none());
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "the removed replica (pid {pid}) still runs");

    // The remaining replicas converge on one log that holds every acknowledged append
    // once, at its position.
    let t0 = Instant::now();
    let positions = loop {
        let p: Vec<Option<u64>> = keep.iter().map(|&i| cluster.status(i).map(|s| s.last_position)).collect();
        if p[0].is_some_and(|x| x >= acks.len() as u64) && p.iter().all(|x| *x == p[0]) {
            break p;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "replicas did not converge: {p:?}; logs in {}", d.display());
        std::thread::sleep(Duration::from_millis(50));
    };
    println!("remaining replicas {voters:?} at position {positions:?}");
    let logs: Vec<Vec<(u64, Vec<u8>)>> = keep.iter().map(|&i| cluster.read_all(i)).collect();
    for (k, l) in logs.iter().enumerate() {
        assert!(l == &logs[0], "replica {} holds a different log from replica {}", voters[k], voters[0]);
    }
    let mut seen: HashMap<&[u8], u64> = HashMap::new();
    for (p, data) in &logs[0] {
        assert!(seen.insert(data.as_slice(), *p).is_none(), "entry {:?} appears twice", String::from_utf8_lossy(data));
    }
    for a in &acks {
        let (payload, pos) = (&a.payload, &a.pos);
        assert_eq!(seen.get(payload.as_slice()), Some(pos), "acknowledged {:?} lost", String::from_utf8_lossy(payload));
    }

    // Through the client library too: replica 4 cannot be added again, and a step on a
    // follower is redirected to the leader.
    let mut c = cluster.client_of(3);
    match c.member_change(MemberOp::Add { id: 4, peer_addr: peer4, client_addr: client4 }) {
        Err(ClientError::Server { code: ErrorCode::BadRequest, message, .. }) => {
            assert!(message.contains("already a member (a voter)"), "{message}")
        }
        other => panic!("adding a voter again: {other:?}"),
    }
}

/// Asks for `op` through the client library until the leader takes it (it refuses while
/// another change is in flight or the learner lags); panics on other refusals or after 60 s.
fn member_change_until_ok(cluster: &Cluster, op: MemberOp) {
    let t0 = Instant::now();
    let mut c = cluster.client();
    for _ in 0..600 {
        match c.member_change(op.clone()) {
            Ok(_) => return,
            Err(e) => {
                let text = e.to_string();
                let retry = e.is_retryable() || text.contains("not caught up") || text.contains("in progress");
                assert!(retry && t0.elapsed() < Duration::from_secs(60), "{op}: {text}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    panic!("{op}: kept failing");
}

/// The log from `from` on as replica `i` serves it.
fn read_from(cluster: &Cluster, i: usize, from: u64) -> Vec<(u64, Vec<u8>)> {
    let mut c = cluster.client_of(i);
    let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut next = from;
    for _ in 0..10_000 {
        let batch = c.read(next, 4096).unwrap_or_else(|e| panic!("replica {i}: read from {next}: {e}"));
        let Some((last, _)) = batch.last() else { break };
        next = last + 1;
        out.extend(batch.into_iter().map(|(p, d)| (p, d.to_vec())));
    }
    out
}

/// A new replica catches up through the trim's snapshot (the log below the cut is gone
/// everywhere), is promoted, and an original replica is removed while it runs.
#[test]
fn a_new_replica_catches_up_through_the_trim_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut cluster = Cluster::start(d, 3, DurabilityKind::Fsync);
    cluster.wait_leader(Duration::from_secs(20));
    let mut client = cluster.client();
    for i in 0..600 {
        client.append(format!("entry {i}").into_bytes()).expect("append");
    }
    let first = client.trim(400).expect("trim");
    assert!(first > 1, "nothing trimmed: {first}");

    let base = free_ports(2);
    let (peer4, client4) = (SocketAddr::from(([127, 0, 0, 1], base)), SocketAddr::from(([127, 0, 0, 1], base + 1)));
    let mut cfg4 = cluster.cfgs[0].clone();
    cfg4.id = 4;
    cfg4.join = true;
    cfg4.data_dir = d.join("node-4");
    cfg4.members.push(Member { id: 4, peer_addr: peer4, client_addr: client4, metrics_addr: None, learner: false });
    let p4 = serve_command(d, "node-4", &cfg4, &[]).spawn().expect("start replica 4");
    cluster.cfgs.push(cfg4);
    cluster.procs.push(Some(p4));
    member_change_until_ok(&cluster, MemberOp::Add { id: 4, peer_addr: peer4, client_addr: client4 });
    assert!(
        cluster.wait_log_line(3, &["snapshot installed"], Duration::from_secs(30)).is_some(),
        "replica 4 did not catch up by the trim's snapshot; logs in {}",
        d.display()
    );
    member_change_until_ok(&cluster, MemberOp::Promote { id: 4 });
    assert!(cluster
        .wait_log_line(3, &["membership changed", "voters=[1, 2, 3, 4]"], Duration::from_secs(30))
        .is_some());
    for i in 600..700 {
        client.append(format!("entry {i}").into_bytes()).expect("append");
    }
    // Remove replica 1 while it runs (it may lead: it hands over), then stop it.
    member_change_until_ok(&cluster, MemberOp::Remove { id: 1 });
    for i in 1..4 {
        assert!(
            cluster.wait_log_line(i, &["membership changed", "voters=[2, 3, 4]"], Duration::from_secs(30)).is_some(),
            "replica {} did not apply the removal of replica 1; logs in {}",
            i + 1,
            d.display()
        );
    }
    let pid = cluster.procs[0].as_ref().map(|p| p.id()).expect("running");
    cluster.kill(0);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "the removed replica still runs");
    let mut client = cluster.client();
    for i in 700..800 {
        client.append(format!("entry {i}").into_bytes()).expect("append");
    }
    // Replica 4 serves the same log from the cut on, and nothing below it.
    let t0 = Instant::now();
    while cluster.status(3).map(|s| s.last_position) != Some(800) {
        assert!(t0.elapsed() < Duration::from_secs(30), "replica 4 did not catch up: {:?}", cluster.status(3));
        std::thread::sleep(Duration::from_millis(50));
    }
    let leader = cluster.wait_leader(Duration::from_secs(20));
    let reference = read_from(&cluster, leader, first);
    assert_eq!(reference.len() as u64, 800 - first + 1);
    assert_eq!(read_from(&cluster, 3, first), reference);
    match cluster.client_of(3).read(1, 1) {
        Err(ClientError::Server { message, .. }) => assert!(message.contains("trimmed"), "{message}"),
        other => panic!("replica 4 read position 1: {other:?}"),
    }
}
