//! Client credentials on the client port of `replog serve` processes: with
//! `[security] client_secret_file` set, a client with no credential or the wrong one
//! cannot append, read or transfer (the log is unchanged), gets a typed error from the
//! library and a message naming why from the CLI, and the replica logs why; a client
//! with the right secret is served.

mod support;

use replog::client::proto::{self, kind, Request, Response};
use replog::client::{Client, ClientConfig, ClientError, ErrorCode};
use replog::config::DurabilityKind;
use std::process::{Command, Stdio};
use std::time::Duration;
use support::*;

const LOG_WITHIN: Duration = Duration::from_secs(10);

fn config(c: &Cluster, secret: Option<&[u8]>) -> ClientConfig {
    let mut cfg = ClientConfig::new(c.cluster_id(), c.client_addrs());
    cfg.timeout = Duration::from_secs(2);
    cfg.retries = 3;
    cfg.secret = secret.map(<[u8]>::to_vec);
    cfg
}

/// Runs the `replog` CLI to completion (bounded: it gives up on its own within its
/// `--timeout-ms`; killed after 60 s).
fn cli(args: &[&str]) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_replog"))
        .args(args)
        .env_remove("REPLOG_CLIENT_SECRET_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start replog");
    let t0 = std::time::Instant::now();
    while child.try_wait().ok().flatten().is_none() {
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().expect("replog output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The whole log, read linearizably at the leader with the right secret.
fn log_of(c: &Cluster) -> Vec<(u64, Vec<u8>)> {
    let mut client = c.client();
    client.read_linearizable(1, 100_000).expect("read the log").into_iter().map(|(p, d)| (p, d.to_vec())).collect()
}

#[test]
fn only_clients_with_the_client_secret_can_append_read_or_transfer() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let secret_path = d.join("client-secret");
    std::fs::write(&secret_path, b"the client secret\n").unwrap();
    let wrong_path = d.join("wrong-client-secret");
    std::fs::write(&wrong_path, b"a guess").unwrap();
    let c = Cluster::start_with(d, 3, DurabilityKind::Memory, |cfg| {
        cfg.security.client_secret_file = Some(secret_path.clone())
    });
    assert_eq!(c.client_secret.as_deref(), Some(&b"the client secret"[..]), "surrounding whitespace is trimmed");
    let leader = c.wait_leader(Duration::from_secs(20));
    assert!(
        c.wait_log_line(leader, &["clients must prove the client secret"], LOG_WITHIN).is_some(),
        "the replica says clients are authenticated"
    );

    // The right secret: served.
    let mut good = Client::connect(config(&c, Some(b"the client secret"))).expect("the right secret connects");
    let positions = good.append_batch(vec!["a".into(), "b".into()]).expect("append with the right secret");
    assert_eq!(positions, vec![1, 2]);
    let before = log_of(&c);
    assert_eq!(before, vec![(1, b"a".to_vec()), (2, b"b".to_vec())]);

    // No credential: a typed error at once (no retries), nothing appended.
    match Client::connect(config(&c, None)) {
        Err(ClientError::CredentialRequired { .. }) => {}
        Err(e) => panic!("a client without a credential got {e}, not CredentialRequired"),
        Ok(_) => panic!("a client without a credential was accepted"),
    }
    // The wrong secret: a typed error naming the refusal; the replica logs why.
    match Client::connect(config(&c, Some(b"a guess"))) {
        Err(ClientError::Unauthorized { message, .. }) => {
            assert!(message.contains("authentication failed"), "{message}")
        }
        Err(e) => panic!("a client with the wrong secret got {e}, not Unauthorized"),
        Ok(_) => panic!("a client with the wrong secret was accepted"),
    }
    let logged = (0..3).any(|i| {
        c.wait_log_line(i, &["WARN", "authentication failed: the proof does not match the client secret"], LOG_WITHIN)
            .is_some()
    });
    assert!(logged, "no replica logged the failed authentication");

    // A raw client that skips Auth and sends Append, ReadLinearizable and Transfer
    // straight after Hello: each connection is refused with Unauthorized, and logged.
    let addr = c.cfgs[leader].me().client_addr;
    let requests = [
        Request::Append { client: 77, seq: 1, entries: vec!["sneaky".into()] },
        Request::ReadLinearizable { from: 1, max_entries: 10, max_bytes: 1 << 20 },
        Request::Transfer { to: 0 },
        Request::Auth { proof: [0u8; 32] },
    ];
    for req in &requests {
        let mut bytes = Vec::new();
        proto::encode_request(1, &Request::Hello { cluster_id: c.cluster_id() }, &mut bytes).unwrap();
        proto::encode_request(2, req, &mut bytes).unwrap();
        let out = raw_send(addr, &bytes, false, Duration::from_secs(5));
        assert!(out.closed, "{req:?} without a credential: the connection stays open");
        let frames = frames_in(&out.received);
        let answers: Vec<(u64, Response)> = match frames.iter().map(proto::decode_response).collect() {
            Ok(answers) => answers,
            Err(e) => panic!("{req:?} without a credential: an answer does not decode: {e}"),
        };
        assert!(
            matches!(answers.first(), Some((1, Response::Challenge { .. }))),
            "Hello is answered with a challenge: {answers:?}"
        );
        match answers.get(1) {
            Some((2, Response::Error { code: ErrorCode::Unauthorized, message })) => {
                println!("{req:?} without a credential: Unauthorized: {message}")
            }
            other => panic!("{req:?} without a credential answered {other:?}"),
        }
        assert_eq!(frames.len(), 2, "nothing else is answered");
        assert!(!frames.iter().any(|f| f.kind == kind::APPENDED || f.kind == kind::ENTRIES));
        let needle = if matches!(req, Request::Auth { .. }) {
            "authentication failed".to_string()
        } else {
            format!("unauthorized: {req:?} before authenticating")
        };
        assert!(
            c.wait_log_line(leader, &["WARN", &out.local, &needle], LOG_WITHIN).is_some(),
            "no WARN line naming {} and {needle:?}:\n{}",
            out.local,
            strip_ansi(&c.log_of(leader))
        );
    }
    // A client that connects, gets the challenge and hangs up is logged too.
    let mut hello = Vec::new();
    proto::encode_request(1, &Request::Hello { cluster_id: c.cluster_id() }, &mut hello).unwrap();
    let out = raw_send(addr, &hello, true, Duration::from_millis(500));
    assert!(
        c.wait_log_line(leader, &["WARN", &out.local, "closed without authenticating"], LOG_WITHIN).is_some(),
        "a client that left without a credential is not logged"
    );

    // The CLI: a message naming why, and a failing exit status.
    let servers = c.client_addrs().iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",");
    let cid = c.cluster_id().to_string();
    let base = ["--servers", &servers, "--cluster-id", &cid, "--timeout-ms", "2000"];
    let (ok, _, err) = cli(&[&["append", "cli-none"][..], &base].concat());
    assert!(!ok, "the CLI appended without a credential");
    assert!(err.contains("requires a client credential") && err.contains("--secret-file"), "stderr: {err}");
    let wrong = wrong_path.to_string_lossy().into_owned();
    let (ok, _, err) = cli(&[&["append", "cli-wrong", "--secret-file", &wrong][..], &base].concat());
    assert!(!ok, "the CLI appended with the wrong secret");
    assert!(err.contains("refused the client credential") && err.contains("authentication failed"), "stderr: {err}");
    let (ok, _, err) = cli(&[&["status"][..], &base].concat());
    assert!(!ok && err.contains("no replica answered"), "status without a credential: {err}");

    // Nothing of the refused clients reached the log.
    assert_eq!(log_of(&c), before, "the log changed after refused clients");

    // The right secret through the CLI (flag and environment variable).
    let right = secret_path.to_string_lossy().into_owned();
    let (ok, out, err) = cli(&[&["append", "cli-right", "--secret-file", &right][..], &base].concat());
    assert!(ok, "the CLI with the right secret failed: {err}");
    assert_eq!(out.trim(), "3");
    let mut env_run = Command::new(env!("CARGO_BIN_EXE_replog"));
    env_run.args([&["read", "0"][..], &base].concat()).env("REPLOG_CLIENT_SECRET_FILE", &secret_path);
    let out = env_run.output().expect("replog read");
    assert!(out.status.success(), "read with REPLOG_CLIENT_SECRET_FILE: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1\ta\n2\tb\n3\tcli-right\n");
    let after = log_of(&c);
    assert_eq!(after.len(), 3);
    assert_eq!(&after[..2], &before[..]);
    drop(good);
}
