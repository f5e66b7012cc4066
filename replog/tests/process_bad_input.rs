//! Bad input against a live cluster of three `replog serve` processes (fsync): garbage
//! bytes, a truncated frame then EOF, a header announcing 1 GiB, a wrong cluster id and
//! a wrong protocol version, on the peer port and the client port of the leader and of
//! a follower. Each connection is closed by the replica within a bound, with a REJECT
//! (peer port) or an Error frame (client port) naming the reason where the protocol
//! sends one, and a warning naming the connection and the reason in the replica's log.
//! Between the attacks the cluster keeps serving appends, the leader and its ballot do
//! not change (bad input must not cause an election), and at the end every
//! acknowledged entry is on every replica exactly once, at its position.

mod support;

use bytes::Bytes;
use fallback_tcp::wire::{self, Hello};
use replog::client::proto::{self, kind as ckind};
use replog::client::{ErrorCode, Request, Response};
use replog::config::DurabilityKind;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use support::{frames_in, raw_send, Cluster, RawOutcome};
use transport::envelope::{self, VERSION};

/// How long a replica may take to close a bad connection. (The client port drains a
/// refused connection's input for up to `LINGER` = 2 s, but shuts its write side at
/// once, so the close is seen well within this.)
const CLOSE_WITHIN: Duration = Duration::from_secs(5);
/// How long a warning may take to reach the log file.
const LOG_WITHIN: Duration = Duration::from_secs(5);
const INITIAL: usize = 500;
const INTERLEAVED: usize = 500;

/// What the replica must answer before it closes.
enum Expect {
    /// Nothing (the stream ended: there is no one left to tell).
    Nothing,
    /// A peer-port REJECT whose reason contains this.
    Reject(String),
    /// Client port: a HelloOk first, then nothing.
    HelloOkOnly,
    /// Client port: exactly one Error frame of this code whose message contains this.
    Error(ErrorCode, String),
}

struct Attack {
    name: String,
    bytes: Vec<u8>,
    half_close: bool,
    /// The replica's warning must contain this.
    log_reason: String,
    expect: Expect,
}

/// A checksummed frame with envelope version byte `version`.
fn frame_with_version(kind: u8, payload: &[u8], version: u8) -> Vec<u8> {
    let mut f = Vec::new();
    envelope::encode(kind, payload, &mut f);
    f[4] = version;
    let c = crc32c::crc32c_append(crc32c::crc32c(&f[0..12]), &f[envelope::HEADER_LEN..]);
    f[12..16].copy_from_slice(&c.to_le_bytes());
    f
}

/// A header announcing a 1 GiB payload (none follows).
fn oversized_header(kind: u8) -> Vec<u8> {
    let mut h = envelope::header(kind, &[]);
    h[8..12].copy_from_slice(&(1u32 << 30).to_le_bytes());
    // The checksum covers the length; keep it right so that only the length is wrong.
    let c = crc32c::crc32c(&h[0..12]);
    h[12..16].copy_from_slice(&c.to_le_bytes());
    h.to_vec()
}

/// Bytes that are not a replog frame (an HTTP request, then pseudo-random bytes).
fn garbage(seed: u64) -> Vec<u8> {
    let mut out = b"GET /metrics HTTP/1.1\r\nHost: replica\r\n\r\n".to_vec();
    let mut x = seed | 1;
    for _ in 0..200 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push(x as u8);
    }
    out
}

fn peer_hello(cluster_id: u64, node_id: u64, target: u64, version: u8) -> Vec<u8> {
    let mut out = Vec::new();
    let h = Hello { cluster_id, node_id, target, version, config_digest: 0, nonce: [0; 32] };
    envelope::encode(wire::kind::HELLO, &h.encode(), &mut out);
    out
}

fn client_frame(req_id: u64, req: &Request) -> Vec<u8> {
    let mut out = Vec::new();
    proto::encode_request(req_id, req, &mut out).unwrap();
    out
}

/// The attacks on replica `target`'s peer port (`other` is another configured node id).
fn peer_attacks(cluster: u64, target: u64, other: u64) -> Vec<Attack> {
    let good = peer_hello(cluster, other, target, VERSION);
    let cut = good.len() - 7;
    let wrong = cluster ^ 0x5a5a;
    let v = VERSION + 1;
    vec![
        Attack {
            name: "peer: garbage".into(),
            bytes: garbage(target),
            half_close: false,
            log_reason: "bad magic".into(),
            expect: Expect::Reject("bad magic".into()),
        },
        Attack {
            name: "peer: truncated HELLO then EOF".into(),
            bytes: good[..cut].to_vec(),
            half_close: true,
            log_reason: format!("closed in the middle of a frame ({cut} bytes of it received)"),
            expect: Expect::Nothing,
        },
        Attack {
            name: "peer: 1 GiB length".into(),
            bytes: oversized_header(wire::kind::HELLO),
            half_close: false,
            log_reason: "frame of 1073741824 bytes exceeds the limit".into(),
            expect: Expect::Reject("frame of 1073741824 bytes exceeds the limit".into()),
        },
        Attack {
            name: "peer: HELLO with a wrong cluster id".into(),
            bytes: peer_hello(wrong, other, target, VERSION),
            half_close: false,
            log_reason: format!("wrong cluster id {wrong} (expected {cluster})"),
            expect: Expect::Reject(format!("wrong cluster id {wrong} (expected {cluster})")),
        },
        Attack {
            name: "peer: envelope with a wrong protocol version".into(),
            bytes: frame_with_version(
                wire::kind::HELLO,
                &Hello {
                    cluster_id: cluster,
                    node_id: other,
                    target,
                    version: VERSION,
                    config_digest: 0,
                    nonce: [0; 32],
                }
                .encode(),
                v,
            ),
            half_close: false,
            log_reason: format!("protocol version {v} not supported"),
            expect: Expect::Reject(format!("protocol version {v} not supported")),
        },
        Attack {
            name: "peer: HELLO stating a wrong protocol version".into(),
            bytes: peer_hello(cluster, other, target, v),
            half_close: false,
            log_reason: format!("protocol version {v} not supported (this build speaks {VERSION})"),
            expect: Expect::Reject(format!("protocol version {v} not supported (this build speaks {VERSION})")),
        },
    ]
}

/// The attacks on a client port of cluster `cluster`.
fn client_attacks(cluster: u64, seed: u64) -> Vec<Attack> {
    let hello = client_frame(1, &Request::Hello { cluster_id: cluster });
    // A good Hello, then most of an Append whose entry must never appear anywhere.
    let append = client_frame(
        2,
        &Request::Append { client: 0xbad, seq: 1, entries: vec![Bytes::from_static(b"poison: truncated append")] },
    );
    let mut truncated = hello.clone();
    truncated.extend_from_slice(&append[..append.len() - 5]);
    let wrong = cluster ^ 0x5a5a;
    let v = VERSION + 1;
    vec![
        Attack {
            name: "client: garbage".into(),
            bytes: garbage(seed),
            half_close: false,
            log_reason: "bad frame: bad magic".into(),
            expect: Expect::Error(ErrorCode::BadRequest, "bad magic".into()),
        },
        Attack {
            name: "client: Hello, truncated Append, EOF".into(),
            bytes: truncated,
            half_close: true,
            log_reason: format!("connection ended inside a frame ({} bytes of it received)", append.len() - 5),
            expect: Expect::HelloOkOnly,
        },
        Attack {
            name: "client: 1 GiB length".into(),
            bytes: oversized_header(ckind::APPEND),
            half_close: false,
            log_reason: "bad frame: frame of 1073741824 bytes exceeds the limit".into(),
            expect: Expect::Error(ErrorCode::TooLarge, "frame of 1073741824 bytes exceeds the limit".into()),
        },
        Attack {
            name: "client: Hello with a wrong cluster id".into(),
            bytes: client_frame(9, &Request::Hello { cluster_id: wrong }),
            half_close: false,
            log_reason: format!("cluster id {wrong}, this cluster is {cluster}"),
            expect: Expect::Error(ErrorCode::WrongCluster, format!("cluster id {wrong}, this cluster is {cluster}")),
        },
        Attack {
            name: "client: Hello with a wrong protocol version".into(),
            bytes: frame_with_version(ckind::HELLO, &hello[envelope::HEADER_LEN..], v),
            half_close: false,
            log_reason: format!("bad frame: protocol version {v} not supported"),
            expect: Expect::Error(ErrorCode::BadRequest, format!("protocol version {v} not supported")),
        },
    ]
}

/// Checks what the attacker received against what the protocol must send.
fn check_answer(a: &Attack, out: &RawOutcome, peer_port: bool) {
    let frames = frames_in(&out.received);
    let name = &a.name;
    match &a.expect {
        Expect::Nothing => assert!(out.received.is_empty(), "{name}: expected no answer, got {:?}", out.received),
        Expect::Reject(reason) => {
            assert!(peer_port);
            match frames.as_slice() {
                [f] if f.kind == wire::kind::REJECT => {
                    let r = String::from_utf8_lossy(&f.payload);
                    assert!(r.contains(reason.as_str()), "{name}: REJECT says {r:?}, expected {reason:?}");
                    println!("{name}: REJECT {r:?}");
                }
                other => panic!("{name}: expected one REJECT frame, got {other:?} (raw {:?})", out.received),
            }
        }
        Expect::HelloOkOnly => {
            let resp: Vec<Response> = match frames.iter().map(|f| proto::decode_response(f).map(|(_, r)| r)).collect() {
                Ok(resp) => resp,
                Err(e) => panic!("{name}: an answer does not decode: {e}"),
            };
            assert!(matches!(resp.as_slice(), [Response::HelloOk { .. }]), "{name}: got {resp:?}");
            println!("{name}: {resp:?}, then closed");
        }
        Expect::Error(code, text) => {
            let resp: Vec<(u64, Response)> = match frames.iter().map(proto::decode_response).collect() {
                Ok(resp) => resp,
                Err(e) => panic!("{name}: an answer does not decode: {e}"),
            };
            match resp.as_slice() {
                [(_, Response::Error { code: c, message })] if c == code && message.contains(text.as_str()) => {
                    println!("{name}: Error {{{c}: {message}}}");
                }
                other => panic!("{name}: expected one {code} error naming {text:?}, got {other:?}"),
            }
        }
    }
}

/// (leader id, ballot) as every replica reports it; panics if they disagree or a
/// replica does not answer.
fn leadership(cluster: &Cluster) -> (u64, String) {
    let leader = cluster.wait_leader(Duration::from_secs(20));
    let s = cluster.status(leader).expect("the leader answers status");
    for i in 0..3 {
        let st = cluster.status(i).unwrap_or_else(|| panic!("replica {} does not answer status", i + 1));
        assert_eq!(st.leader, Some(s.node), "replica {} names leader {:?}, the leader is {}", i + 1, st.leader, s.node);
    }
    (s.node, s.ballot)
}

/// Every replica's role changes and warnings, for failure messages.
fn role_changes(cluster: &Cluster) -> String {
    let mut out = String::new();
    for i in 0..cluster.cfgs.len() {
        for l in support::strip_ansi(&cluster.log_of(i)).lines() {
            if l.contains("role changed") || l.contains("WARN") {
                out.push_str(&format!("replica {}: {l}\n", i + 1));
            }
        }
    }
    out
}

#[test]
fn bad_input_on_both_ports_of_a_live_cluster_is_refused_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    // An election timeout of 1.5 s instead of the default 50 ms: on a loaded machine
    // (2 CPUs shared with compilers and VMs) the default times out now and then with no
    // bad input at all (seen in a control run without attacks: 2 ballot changes in 6
    // runs), and then a change of leader could not be blamed on the attacks. With 1.5 s
    // the control run kept its ballot in 6 of 6 runs; an attack that stalls a replica
    // or drops a peer link for that long is still caught.
    let cluster = Cluster::start_with(dir.path(), 3, DurabilityKind::Fsync, |c| c.timing.election_timeout_ms = 1500.0);
    let leader = cluster.wait_leader(Duration::from_secs(20));
    let cid = cluster.cluster_id();

    let mut client = cluster.client();
    let mut acked: HashMap<Vec<u8>, u64> = HashMap::new();
    let mut next = 0usize;
    let mut append_n = |client: &mut replog::client::Client, n: usize, acked: &mut HashMap<Vec<u8>, u64>| {
        for _ in 0..n {
            let payload = format!("entry-{next}").into_bytes();
            next += 1;
            let pos = client.append(payload.clone()).unwrap_or_else(|e| panic!("append {next} failed: {e}"));
            assert!(acked.insert(payload, pos).is_none());
        }
    };
    let t0 = Instant::now();
    append_n(&mut client, INITIAL, &mut acked);
    println!("{INITIAL} appends in {:.0} ms", t0.elapsed().as_secs_f64() * 1e3);

    let before = leadership(&cluster);
    assert_eq!(before.0, cluster.cfgs[leader].id);
    println!("leader: replica {} ballot {}", before.0, before.1);
    let follower = (leader + 1) % 3;

    // (replica index, peer port?, attack)
    let mut plan: Vec<(usize, bool, Attack)> = Vec::new();
    for target in [leader, follower] {
        let id = cluster.cfgs[target].id;
        let other = cluster.cfgs[(target + 2) % 3].id;
        plan.extend(peer_attacks(cid, id, other).into_iter().map(|a| (target, true, a)));
        plan.extend(client_attacks(cid, id).into_iter().map(|a| (target, false, a)));
    }
    let per_attack = INTERLEAVED / plan.len();
    let extra = INTERLEAVED - per_attack * plan.len();
    for (k, (target, peer_port, a)) in plan.iter().enumerate() {
        let me = &cluster.cfgs[*target];
        let addr = if *peer_port { me.me().peer_addr } else { me.me().client_addr };
        let role = if *target == leader { "leader" } else { "follower" };
        let out = raw_send(addr, &a.bytes, a.half_close, CLOSE_WITHIN);
        assert!(
            out.closed,
            "{} on replica {} ({role}) {addr}: connection not closed within {CLOSE_WITHIN:?}; logs in {}",
            a.name,
            me.id,
            dir.path().display()
        );
        check_answer(a, &out, *peer_port);
        let line =
            cluster.wait_log_line(*target, &["WARN", &out.local, &a.log_reason], LOG_WITHIN).unwrap_or_else(|| {
                panic!(
                    "{} on replica {}: no WARN line naming {} and {:?} in its log:\n{}",
                    a.name,
                    me.id,
                    out.local,
                    a.log_reason,
                    support::strip_ansi(&cluster.log_of(*target))
                )
            });
        println!("  replica {} ({role}) closed in {:.0} ms; log: {line}", me.id, out.elapsed.as_secs_f64() * 1e3);

        // The cluster keeps serving, the attacked replica answers, nobody was deposed.
        append_n(&mut client, per_attack + if k == 0 { extra } else { 0 }, &mut acked);
        assert!(cluster.status(*target).is_some(), "replica {} stopped answering after {}", me.id, a.name);
        let now = leadership(&cluster);
        assert_eq!(
            now,
            before,
            "leadership changed after {} (bad input must not cause an election); role changes:\n{}",
            a.name,
            role_changes(&cluster)
        );
    }
    assert_eq!(acked.len(), INITIAL + INTERLEAVED);

    // Every acknowledged entry, once, at its position, on every replica; nothing else.
    let total = cluster.wait_converged(acked.len() as u64, Duration::from_secs(30));
    assert_eq!(total, acked.len() as u64, "the log holds exactly the acknowledged appends");
    let logs: Vec<Vec<(u64, Vec<u8>)>> = (0..3).map(|i| cluster.read_all(i)).collect();
    for (i, l) in logs.iter().enumerate() {
        assert_eq!(l.len(), acked.len(), "replica {} serves {} entries", i + 1, l.len());
        assert!(l == &logs[0], "replica {} holds a different log from replica 1", i + 1);
    }
    let mut seen: HashMap<&[u8], u64> = HashMap::new();
    for (p, d) in &logs[0] {
        assert!(seen.insert(d.as_slice(), *p).is_none(), "entry {:?} appears twice", String::from_utf8_lossy(d));
        assert!(!d.starts_with(b"poison"), "a truncated append was applied at {p}");
    }
    for (payload, pos) in &acked {
        assert_eq!(seen.get(payload.as_slice()), Some(pos), "{:?} not at {pos}", String::from_utf8_lossy(payload));
    }
    assert_eq!(leadership(&cluster), before, "leadership changed; role changes:\n{}", role_changes(&cluster));
    // No replica exited.
    for i in 0..3 {
        assert!(cluster.status(i).is_some(), "replica {} is gone", i + 1);
    }
    println!("{} entries on every replica, leader {} ballot {} throughout", acked.len(), before.0, before.1);
}
