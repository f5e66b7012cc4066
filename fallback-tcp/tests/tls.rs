//! TLS on peer links ([`TcpConfig::tls`]): with mutual TLS against a cluster CA (test
//! certificates made with the `openssl` command) the transports pass the conformance
//! suite and exchange messages and remote writes; a plaintext peer, or one whose
//! certificate comes from another CA, never comes up and is logged.

mod common;

use common::*;
use fallback_tcp::{PeerTls, TcpConfig, TcpTransport};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use transport::{Event, Transport};

fn cannot_run(why: &str) {
    if std::env::var("REPLOG_REQUIRE_ALL").is_ok_and(|v| v == "1") {
        panic!("REPLOG_REQUIRE_ALL=1 but this test cannot run: {why}");
    }
    eprintln!("SKIPPED: {why} (set REPLOG_REQUIRE_ALL=1 to make this a failure)");
}

fn openssl(args: &[&str], dir: &Path) -> Result<(), String> {
    let out =
        Command::new("openssl").args(args).current_dir(dir).output().map_err(|e| format!("cannot run openssl: {e}"))?;
    if !out.status.success() {
        return Err(format!("openssl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(())
}

const EC: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];

/// A CA (`ca`.crt, `ca`.key) and a node certificate it signs (`node`.crt, `node`.key)
/// for 127.0.0.1 and localhost, good for server and client authentication.
fn ca_and_node(dir: &Path, ca: &str, node: &str) -> Result<(), String> {
    let (ca_crt, ca_key) = (format!("{ca}.crt"), format!("{ca}.key"));
    let (crt, key) = (format!("{node}.crt"), format!("{node}.key"));
    let mut a = vec!["req", "-x509"];
    a.extend(EC);
    a.extend(["-nodes", "-days", "2", "-subj", "/CN=test cluster CA", "-keyout", &ca_key, "-out", &ca_crt]);
    a.extend(["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign"]);
    openssl(&a, dir)?;
    let mut a = vec!["req", "-x509", "-CA", &ca_crt, "-CAkey", &ca_key];
    a.extend(EC);
    a.extend(["-nodes", "-days", "2", "-subj", "/CN=replica", "-keyout", &key, "-out", &crt]);
    a.extend(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]);
    a.extend(["-addext", "basicConstraints=critical,CA:FALSE", "-addext", "keyUsage=digitalSignature"]);
    a.extend(["-addext", "extendedKeyUsage=serverAuth,clientAuth"]);
    openssl(&a, dir)
}

struct Certs {
    dir: PathBuf,
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Certs {
    /// `cluster` CA with `node`; `other` CA with `stranger`. `None`: openssl is missing.
    fn make() -> Option<Certs> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let dir = std::env::temp_dir().join(format!("fallback-tcp-tls-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let certs = Certs { dir };
        match ca_and_node(&certs.dir, "cluster", "node").and_then(|_| ca_and_node(&certs.dir, "other", "stranger")) {
            Ok(()) => Some(certs),
            Err(why) => {
                cannot_run(&why);
                None
            }
        }
    }

    fn tls(&self, node: &str, ca: &str) -> PeerTls {
        let f = |n: String| self.dir.join(n);
        PeerTls::from_pem_files(&f(format!("{node}.crt")), &f(format!("{node}.key")), &f(format!("{ca}.crt"))).unwrap()
    }
}

fn with_tls(id: u64, tls: Option<PeerTls>) -> TcpConfig {
    let mut c = config(id, any());
    c.tls = tls;
    c
}

fn ups(evs: &[Event]) -> Vec<u64> {
    let mut v: Vec<u64> =
        evs.iter().filter_map(|e| if let Event::PeerUp { peer } = e { Some(*peer) } else { None }).collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn pump_for(ts: &mut [TcpTransport], d: Duration) -> Vec<Vec<Event>> {
    let mut evs = vec![Vec::new(); ts.len()];
    let end = Instant::now() + d;
    while Instant::now() < end {
        pump(ts, &mut evs);
    }
    evs
}

#[test]
fn conformance_suite_over_mutual_tls_with_a_secret() {
    let Some(certs) = Certs::make() else { return };
    transport::conformance::run_all(|ids| {
        connect(
            ids.iter()
                .map(|&id| {
                    let mut c = with_tls(id, Some(certs.tls("node", "cluster")));
                    c.secret = Some(b"tls and a secret".to_vec());
                    c
                })
                .collect(),
        )
        .into_iter()
        .map(|t| Box::new(t) as Box<dyn Transport>)
        .collect()
    });
}

#[test]
fn messages_and_remote_writes_over_tls() {
    let Some(certs) = Certs::make() else { return };
    let (logs, _guard) = capture_logs();
    let mut ts = connect((1..=2).map(|id| with_tls(id, Some(certs.tls("node", "cluster")))).collect());
    wait_all_up(&mut ts);
    let big = vec![0xA5u8; 1 << 20];
    ts[0].send(2, b"hello over tls").unwrap();
    ts[0].send(2, &big).unwrap();
    ts[1].grant(1);
    let token = ts[0].write(2, 4096, b"written over tls").unwrap();
    let mut evs = vec![Vec::new(); 2];
    pump_until(&mut ts, &mut evs, Duration::from_secs(10), |e| {
        e[1].iter().any(|e| matches!(e, Event::WriteArrived { .. }))
            && e[1].iter().filter(|e| matches!(e, Event::Message { .. })).count() == 2
    });
    let msgs: Vec<&[u8]> = evs[1]
        .iter()
        .filter_map(|e| if let Event::Message { payload, .. } = e { Some(&payload[..]) } else { None })
        .collect();
    assert_eq!(msgs, vec![&b"hello over tls"[..], &big[..]]);
    let (from, remote_token, offset, data) = evs[1]
        .iter()
        .find_map(|e| match e {
            Event::WriteArrived { from, token, offset, data } => Some((*from, *token, *offset, data.clone())),
            _ => None,
        })
        .unwrap();
    assert_eq!((from, remote_token, offset, &data[..]), (1, token, 4096, &b"written over tls"[..]));
    ts[1].complete_write(1, remote_token, Ok(b"")).unwrap();
    pump_until(&mut ts, &mut evs, Duration::from_secs(10), |e| {
        e[0].iter().any(|e| matches!(e, Event::WriteDone { token: t, result: Ok(_), .. } if *t == token))
    });
    assert!(!logs.text().contains("TLS handshake failed"), "{}", logs.text());
}

#[test]
fn a_plaintext_peer_never_comes_up_and_is_logged() {
    let Some(certs) = Certs::make() else { return };
    let (logs, _guard) = capture_logs();
    let mut ts = connect(vec![
        with_tls(1, Some(certs.tls("node", "cluster"))),
        with_tls(2, Some(certs.tls("node", "cluster"))),
        with_tls(3, None),
    ]);
    let evs = pump_for(&mut ts, Duration::from_millis(800));
    assert_eq!(ups(&evs[0]), vec![2], "{evs:?}");
    assert_eq!(ups(&evs[1]), vec![1], "{evs:?}");
    assert_eq!(ups(&evs[2]), Vec::<u64>::new(), "{evs:?}");
    let text = logs.text();
    // Node 3's HELLO reaches a TLS acceptor, and a TLS dialer meets node 3's plaintext.
    assert!(
        text.lines()
            .any(|l| l.contains("WARN") && l.contains("closing incoming peer connection: TLS handshake failed")),
        "{text}"
    );
    assert!(text.lines().any(|l| l.contains("WARN") && l.contains("peer: TLS handshake failed")), "{text}");
    // The TLS members still talk.
    ts[0].send(2, b"hi").unwrap();
    let mut evs = vec![Vec::new(); 3];
    pump_until(&mut ts, &mut evs, Duration::from_secs(5), |e| {
        e[1].iter().any(|e| matches!(e, Event::Message { from: 1, .. }))
    });
}

#[test]
fn a_peer_with_a_certificate_from_another_ca_never_comes_up() {
    let Some(certs) = Certs::make() else { return };
    let (logs, _guard) = capture_logs();
    let mut ts = connect(vec![
        with_tls(1, Some(certs.tls("node", "cluster"))),
        with_tls(2, Some(certs.tls("node", "cluster"))),
        // Trusts the cluster CA but presents a certificate from another one.
        with_tls(3, Some(certs.tls("stranger", "cluster"))),
    ]);
    let evs = pump_for(&mut ts, Duration::from_millis(800));
    assert_eq!(ups(&evs[0]), vec![2], "{evs:?}");
    assert_eq!(ups(&evs[1]), vec![1], "{evs:?}");
    assert_eq!(ups(&evs[2]), Vec::<u64>::new(), "{evs:?}");
    let text = logs.text();
    assert!(
        text.lines().any(|l| l.contains("WARN") && l.contains("TLS handshake failed") && l.contains("certificate")),
        "{text}"
    );
    // And a node trusting another CA refuses the members' certificates.
    drop(ts);
    let (logs2, _guard2) = capture_logs();
    let mut ts =
        connect(vec![with_tls(1, Some(certs.tls("node", "cluster"))), with_tls(2, Some(certs.tls("node", "other")))]);
    let evs = pump_for(&mut ts, Duration::from_millis(600));
    assert!(evs.iter().all(|e| ups(e).is_empty()), "{evs:?}");
    assert!(logs2.text().contains("TLS handshake failed"), "{}", logs2.text());
}
