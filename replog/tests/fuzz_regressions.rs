//! Replays every input kept in `fuzz/regressions/<target>/` (crashes found by the fuzz
//! targets, once fixed, and seeds) through the same checks the fuzz targets run
//! (`fuzz/src/checks.rs`, compiled in here), so a fixed crash stays fixed under plain
//! `cargo test`.
//!
//! `cargo test -p replog --test fuzz_regressions -- --ignored write_seeds` rewrites the
//! seed inputs (`seed-*` files: valid encodings of each format) from the encoders.

#[allow(dead_code)]
#[path = "../../fuzz/src/checks.rs"]
mod checks;

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions")
}

#[test]
fn every_kept_fuzz_input_passes_its_check() {
    let mut total = 0;
    for (name, check) in checks::TARGETS {
        let dir = root().join(name);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no kept inputs for fuzz target {name} in {}", dir.display());
        for f in &files {
            let data = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            println!("{name}: {} ({} bytes)", f.file_name().unwrap().to_string_lossy(), data.len());
            check(&data);
            total += 1;
        }
    }
    println!("{total} kept inputs replayed");
}

#[test]
#[ignore = "writes the seed files; run by hand after a format change"]
fn write_seeds() {
    use bytes::Bytes;
    use paxos::{Ballot, Command, Entry, Message, ReadResult, Value, WriteRequest};
    use replog::client::proto::{self, Request, Response};
    use replog::client::{ErrorCode, PeerStatus, Status};
    let put = |target: &str, name: &str, data: &[u8]| {
        let dir = root().join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
    };
    // Client frames: kind byte + payload.
    let cmd = |s: u64| Command { client: 7, seq: s, payload: Bytes::from(vec![s as u8; 3]) };
    let reqs = [
        Request::Hello { cluster_id: 0xC1 },
        Request::Append { client: 1, seq: 2, entries: vec!["a".into(), "bc".into()] },
        Request::Read { from: 1, max_entries: 10, max_bytes: 1000 },
        Request::Tail { from: 3 },
        Request::Status,
        Request::ReadLinearizable { from: 1, max_entries: 5, max_bytes: 100 },
        Request::Transfer { to: 2 },
        Request::Auth { proof: [9; 32] },
        Request::ChangeMembership { voters: vec![1, 2, 3], learners: vec![4] },
    ];
    let status = Status {
        node: 1,
        role: "leader".into(),
        leader: Some(1),
        ballot: "3.1".into(),
        commit_slot: 9,
        applied_slot: 9,
        last_position: 20,
        durability: "fsync".into(),
        peers: vec![PeerStatus { id: 2, matched_slot: 9, lag: 0, connected: true }],
    };
    let resps = [
        Response::HelloOk { node: 2 },
        Response::Appended { positions: vec![4, 5] },
        Response::Entries { from: 4, entries: vec!["x".into()], last_committed: 5 },
        Response::Status(status),
        Response::Redirect { leader: Some(3), addr: Some("127.0.0.1:7401".into()) },
        Response::Error { code: ErrorCode::Busy, message: "busy".into() },
        Response::Challenge { nonce: [5; 32] },
    ];
    let mut stream = Vec::new();
    for (i, r) in reqs.iter().enumerate() {
        let mut out = Vec::new();
        proto::encode_request(i as u64 + 1, r, &mut out).unwrap();
        stream.extend_from_slice(&out);
        let mut seed = vec![out[5]];
        seed.extend_from_slice(&out[transport::envelope::HEADER_LEN..]);
        put("client_frames", &format!("request-{i}"), &seed);
    }
    for (i, r) in resps.iter().enumerate() {
        let mut out = Vec::new();
        proto::encode_response(i as u64 + 1, r, &mut out).unwrap();
        let mut seed = vec![out[5]];
        seed.extend_from_slice(&out[transport::envelope::HEADER_LEN..]);
        put("client_frames", &format!("response-{i}"), &seed);
    }
    put("client_frames", "stream", &stream);
    let mut env = 1_000_000u32.to_le_bytes().to_vec();
    env.extend_from_slice(&stream);
    put("envelope", "stream", &env);
    // Peer messages.
    let b = Ballot::new(4, 2);
    let msgs = [
        Message::PreVote { round: 3, chosen: 2 },
        Message::Prepare { ballot: b, transfer: true },
        Message::Promise { ballot: b, chosen: 10, last: 12, trimmed: 4 },
        Message::Heartbeat { ballot: b, commit: 99, seq: 7 },
        Message::HeartbeatReply { ballot: b, chosen: 98, last: 99, seq: 7 },
    ];
    for (i, m) in msgs.iter().enumerate() {
        let mut out = Vec::new();
        replog::wire::encode_message(m, &mut out);
        put("peer_messages", &format!("message-{i}"), &out);
    }
    let w =
        WriteRequest { ballot: b, first: 5, values: vec![Value::Noop, Value::Batch(vec![cmd(1), cmd(2)])], commit: 4 };
    let mut data = Vec::new();
    let off = replog::wire::encode_write(&w, &mut data);
    let mut seed = off.to_le_bytes().to_vec();
    seed.extend_from_slice(&data);
    put("peer_messages", "write", &seed);
    let res = ReadResult {
        ballot: Ballot::ZERO,
        from: 1,
        to: 3,
        entries: vec![Entry { slot: 2, ballot: b, value: Value::Batch(vec![cmd(3)]) }],
    };
    let mut data = Vec::new();
    replog::wire::encode_read_result(&res, 1 << 20, &mut data);
    let mut seed = (1u64 << 40 | 4 << 8 | 2).to_le_bytes().to_vec();
    seed.extend_from_slice(&data);
    put("peer_messages", "read-result", &seed);
    // Log records: a value, and a real segment image.
    let mut v = Vec::new();
    replog::store::codec::encode_value(&Value::Batch(vec![cmd(1), cmd(2)]), &mut v);
    put("log_records", "value", &v);
    let mut v = Vec::new();
    let config = paxos::Membership::new(vec![1, 2, 3], vec![4]);
    replog::store::codec::encode_value(&Value::Config(config.clone()), &mut v);
    put("log_records", "config", &v);
    let mut v = Vec::new();
    let with_addrs = config.with_addrs([(4, b"127.0.0.1:7010 127.0.0.1:7011".to_vec())].into_iter().collect());
    replog::store::codec::encode_value(&Value::Config(with_addrs), &mut v);
    put("log_records", "config-addrs", &v);
    let dir = tempfile::tempdir().unwrap();
    {
        let cfg = replog::store::StoreConfig::new(replog::store::Mode::Fsync).with_segment_size(4096);
        let log = replog::store::Log::open(dir.path(), cfg).unwrap();
        for i in 0..5u8 {
            log.append(&vec![i; 20 + i as usize]).unwrap();
        }
        log.sync().unwrap();
    }
    let seg = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "log"))
        .unwrap();
    let image = std::fs::read(seg).unwrap();
    let used = image.iter().rposition(|&b| b != 0).map(|i| (i + 8) & !7).unwrap_or(0).min(image.len());
    put("log_records", "segment", &image[..used]);
    let mut raw = vec![0x80];
    raw.extend_from_slice(&image);
    put("store_recovery", "raw-segment", &raw);
    put("store_recovery", "valid-5", &[5, 10, 20, 30, 40, 50]);
    put("store_recovery", "flip-and-cut", &[3, 100, 200, 255, 40, 0, 0x5a, 0x80, 0, 0]);
    // Peer handshake payloads.
    use fallback_tcp::wire as tw;
    let hello = tw::Hello { cluster_id: 1, node_id: 2, target: 3, version: 1, config_digest: 77, nonce: [1; 32] };
    put("peer_handshake", "hello", &hello.encode());
    put("peer_handshake", "hello-ok", &tw::HelloOk { cluster_id: 1, node_id: 3, proof: Some([2; 32]) }.encode());
    put("peer_handshake", "read", &tw::read_meta(1, 2, 3));
    let mut wr = tw::write_meta(1, 2).to_vec();
    wr.extend_from_slice(b"data");
    put("peer_handshake", "write", &wr);
    put("peer_handshake", "answer", &tw::answer_meta(9, true));
    // Configuration files: the documented example and what `replog up` writes.
    let example = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/replog.toml")).unwrap();
    put("config_toml", "example", &example);
    let mut cfgs = replog::config::ServeConfig::local_cluster(
        3,
        7400,
        Path::new("/var/lib/replog"),
        replog::config::DurabilityKind::Fsync,
    );
    cfgs[0].security.secret_file = Some("/etc/replog/secret".into());
    cfgs[0].security.client_secret_file = Some("/etc/replog/client-secret".into());
    put("config_toml", "local", cfgs[0].to_toml().as_bytes());
    // Snapshot files (the body: the check appends the checksum) and transfer frames.
    let meta = paxos::SnapshotMeta {
        slot: 9,
        last_position: 20,
        clients: vec![(7, vec![(1, 19), (2, 20)])],
        membership: paxos::Membership::new(vec![1, 2, 3], vec![4])
            .with_addrs([(4, b"127.0.0.1:7010 127.0.0.1:7011".to_vec())].into_iter().collect()),
    };
    let file = replog::snapshot::encode(0xC1, &meta, b"app state");
    put("snapshots", "file-body", &file[..file.len() - 4]);
    let mut chunk = Vec::new();
    replog::snapshot::encode_chunk(
        &replog::snapshot::Chunk { slot: 9, total: 100, offset: 10, data: Bytes::from_static(b"0123456789") },
        &mut chunk,
    );
    put("snapshots", "chunk", &chunk);
    let mut ack = Vec::new();
    replog::snapshot::encode_ack(&replog::snapshot::ChunkAck { slot: 9, next: 20 }, &mut ack);
    put("snapshots", "ack", &ack);
    // RDMA cells and acknowledgement records.
    use replog::rdma_region as r;
    let h = r::CellHeader { len: 0, writer: 2, epoch: (4, 1), pos: 3, first: 17, token: 99, crc: 0 };
    let mut cell = Vec::new();
    r::encode(&h, b"a remote write", &mut cell);
    put("rdma_records", "cell", &cell);
    let mut rec = Vec::new();
    assert!(r::encode_ack(&r::AckRecord { epoch: (4, 1), pos: 3, token: 99, ok: false, reply: vec![1; 16] }, &mut rec));
    put("rdma_records", "ack", &rec);
    let ptr = r::encode_pointer(&r::StreamPointer { writer: 2, epoch: (4, 1), start: 40, resume: 33 });
    put("rdma_records", "pointer", &ptr);
    // An accepted-entries mirror of 4 records (slots 1..=6 published: 3..=6 held).
    let mut mirror = vec![0u8; replog::rdma_mirror::HEADER_LEN + 4 * 128];
    let mut p = replog::rdma_mirror::Publisher::new(mirror.len(), 128).unwrap();
    let entries: Vec<paxos::Entry> = (1..=6)
        .map(|slot| paxos::Entry {
            slot,
            ballot: paxos::Ballot { round: 2, node: 1 },
            value: paxos::Value::Batch(vec![paxos::Command {
                client: 1,
                seq: slot,
                payload: Bytes::from_static(b"v"),
            }]),
        })
        .collect();
    assert_eq!(p.publish(&mut mirror, 0, 6, &entries), Ok(true));
    put("rdma_records", "mirror", &mirror);
}
