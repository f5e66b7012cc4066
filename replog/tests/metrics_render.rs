//! The Prometheus text exposition: every line valid, histograms consistent.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use replog::metrics::{Metrics, LATENCY_BUCKETS};

/// One parsed sample line.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn valid_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_' || ch == ':')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
}

/// Parses `name{k="v",...} value`, checking the syntax of the text format 0.0.4.
fn parse_sample(line: &str) -> Sample {
    let (name_end, rest) = match line.find(['{', ' ']) {
        Some(i) => (i, &line[i..]),
        None => panic!("no value: {line:?}"),
    };
    let name = &line[..name_end];
    assert!(valid_name(name), "bad metric name in {line:?}");
    let mut labels = BTreeMap::new();
    let rest = if let Some(r) = rest.strip_prefix('{') {
        let mut r = r;
        loop {
            if let Some(after) = r.strip_prefix('}') {
                r = after;
                break;
            }
            let eq = r.find('=').unwrap_or_else(|| panic!("label without = in {line:?}"));
            let key = &r[..eq];
            assert!(valid_name(key) && !key.starts_with("__"), "bad label {key:?} in {line:?}");
            r = r[eq + 1..].strip_prefix('"').unwrap_or_else(|| panic!("unquoted in {line:?}"));
            let mut val = String::new();
            let mut chars = r.char_indices();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => val.push('\n'),
                        Some((_, c @ ('\\' | '"'))) => val.push(c),
                        other => panic!("bad escape {other:?} in {line:?}"),
                    },
                    Some((i, '"')) => break i,
                    Some((_, c)) => val.push(c),
                    None => panic!("unterminated label value in {line:?}"),
                }
            };
            assert!(labels.insert(key.to_string(), val).is_none(), "repeated label in {line:?}");
            r = &r[end + 1..];
            if let Some(after) = r.strip_prefix(',') {
                r = after;
            }
        }
        r
    } else {
        rest
    };
    let value = rest.strip_prefix(' ').unwrap_or_else(|| panic!("no space before value: {line:?}"));
    assert!(!value.contains(' '), "timestamps are not used: {line:?}");
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse::<f64>().unwrap_or_else(|_| panic!("bad value in {line:?}")),
    };
    Sample { name: name.to_string(), labels, value }
}

/// Checks the whole exposition; returns (type by family, samples).
fn parse(text: &str) -> (HashMap<String, String>, Vec<Sample>) {
    assert!(text.ends_with('\n'), "the exposition ends with a newline");
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helps: HashMap<String, String> = HashMap::new();
    let mut samples = Vec::new();
    let mut seen_families: Vec<String> = Vec::new();
    for line in text.lines() {
        assert!(!line.is_empty(), "no empty lines");
        if let Some(h) = line.strip_prefix("# HELP ") {
            let (name, help) = h.split_once(' ').expect("HELP has text");
            assert!(valid_name(name) && !help.is_empty(), "{line}");
            assert!(helps.insert(name.to_string(), help.to_string()).is_none(), "two HELP for {name}");
        } else if let Some(t) = line.strip_prefix("# TYPE ") {
            let (name, kind) = t.split_once(' ').expect("TYPE has a kind");
            assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind), "{line}");
            assert!(helps.contains_key(name), "TYPE before HELP for {name}");
            assert!(types.insert(name.to_string(), kind.to_string()).is_none(), "two TYPE for {name}");
            seen_families.push(name.to_string());
        } else {
            assert!(!line.starts_with('#'), "unexpected comment {line}");
            let s = parse_sample(line);
            // A sample belongs to the family declared last (the TYPE comes first).
            let fam = seen_families.last().expect("a sample after a TYPE line");
            let ok = match types[fam].as_str() {
                "histogram" => {
                    [format!("{fam}_bucket"), format!("{fam}_sum"), format!("{fam}_count")].contains(&s.name)
                }
                _ => &s.name == fam,
            };
            assert!(ok, "sample {} outside its family {fam}", s.name);
            if types[fam] == "counter" {
                assert!(fam.ends_with("_total"), "counter {fam} ends in _total");
            }
            samples.push(s);
        }
    }
    (types, samples)
}

fn value(samples: &[Sample], name: &str, label: Option<(&str, &str)>) -> f64 {
    samples
        .iter()
        .find(|s| s.name == name && label.is_none_or(|(k, v)| s.labels.get(k).map(String::as_str) == Some(v)))
        .unwrap_or_else(|| panic!("no sample {name} {label:?}"))
        .value
}

fn check_histogram(samples: &[Sample], fam: &str) -> (Vec<(f64, f64)>, f64, f64) {
    let buckets: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.name == format!("{fam}_bucket"))
        .map(|s| {
            let le = &s.labels["le"];
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().expect("numeric le") };
            (le, s.value)
        })
        .collect();
    assert_eq!(buckets.len(), LATENCY_BUCKETS.len() + 1);
    for w in buckets.windows(2) {
        assert!(w[0].0 < w[1].0, "bounds increase");
        assert!(w[0].1 <= w[1].1, "buckets are cumulative");
    }
    let last = buckets.last().unwrap();
    assert!(last.0.is_infinite(), "the last bucket is +Inf");
    let count = value(samples, &format!("{fam}_count"), None);
    let sum = value(samples, &format!("{fam}_sum"), None);
    assert_eq!(last.1, count, "+Inf equals the count");
    (buckets, sum, count)
}

#[test]
fn fresh_metrics_render_validly() {
    let m = Metrics::new(3);
    let (types, samples) = parse(&m.render());
    assert_eq!(types["replog_commit_latency_seconds"], "histogram");
    assert_eq!(types["replog_role"], "gauge");
    assert_eq!(types["replog_elections_total"], "counter");
    for s in &samples {
        assert_eq!(s.labels.get("node").map(String::as_str), Some("3"), "{s:?}");
    }
    let (_, sum, count) = check_histogram(&samples, "replog_commit_latency_seconds");
    assert_eq!((sum, count), (0.0, 0.0));
    // No role yet: every role 0.
    assert!(samples.iter().filter(|s| s.name == "replog_role").all(|s| s.value == 0.0));
}

#[test]
fn values_show_up() {
    let m = Metrics::new(1);
    m.set_role("candidate");
    m.set_role("leader");
    m.set_ballot(7, 1);
    m.set_commit_index(1234);
    m.set_applied(1200, 99_000);
    m.set_log_bytes(1 << 30);
    m.set_peer_lag(2, 0, true);
    m.set_peer_lag(3, 17, false);
    m.inc_appends(10);
    m.inc_appends(5);
    m.inc_client_errors("not_leader");
    m.inc_client_errors("not_leader");
    m.inc_client_errors("we\"ird\\code\n");
    m.inc_elections();
    for us in [5u64, 20, 80, 300, 900, 2_000, 40_000, 700_000, 100_000_000] {
        m.observe_commit_latency(Duration::from_micros(us));
    }
    let text = m.render();
    let (_, samples) = parse(&text);

    let roles: Vec<(&str, f64)> =
        samples.iter().filter(|s| s.name == "replog_role").map(|s| (s.labels["role"].as_str(), s.value)).collect();
    assert_eq!(
        roles,
        vec![("follower", 0.0), ("precandidate", 0.0), ("candidate", 0.0), ("leader", 1.0), ("learner", 0.0)]
    );
    assert_eq!(value(&samples, "replog_ballot_round", None), 7.0);
    assert_eq!(value(&samples, "replog_ballot_node", None), 1.0);
    assert_eq!(value(&samples, "replog_commit_index", None), 1234.0);
    assert_eq!(value(&samples, "replog_applied_slot", None), 1200.0);
    assert_eq!(value(&samples, "replog_applied_position", None), 99_000.0);
    assert_eq!(value(&samples, "replog_log_bytes", None), (1u64 << 30) as f64);
    assert_eq!(value(&samples, "replog_peer_lag_slots", Some(("peer", "3"))), 17.0);
    assert_eq!(value(&samples, "replog_peer_connected", Some(("peer", "3"))), 0.0);
    assert_eq!(value(&samples, "replog_peer_connected", Some(("peer", "2"))), 1.0);
    assert_eq!(value(&samples, "replog_appends_total", None), 15.0);
    assert_eq!(value(&samples, "replog_elections_total", None), 1.0);
    assert_eq!(value(&samples, "replog_client_errors_total", Some(("code", "not_leader"))), 2.0);
    assert_eq!(value(&samples, "replog_client_errors_total", Some(("code", "we\"ird\\code\n"))), 1.0);

    let (buckets, sum, count) = check_histogram(&samples, "replog_commit_latency_seconds");
    assert_eq!(count, 9.0);
    let exact: f64 =
        [5u64, 20, 80, 300, 900, 2_000, 40_000, 700_000, 100_000_000].iter().map(|us| *us as f64 / 1e6).sum();
    assert!((sum - exact).abs() < 1e-9, "{sum} vs {exact}");
    let at = |le: f64| buckets.iter().find(|b| b.0 == le).unwrap().1;
    assert_eq!(at(0.00001), 1.0); // 5 us
    assert_eq!(at(0.000025), 2.0); // + 20 us
    assert_eq!(at(0.001), 5.0); // + 80, 300, 900 us
    assert_eq!(at(0.05), 7.0); // + 2 ms, 40 ms
    assert_eq!(at(1.0), 8.0); // + 700 ms
    assert_eq!(at(30.0), 8.0); // 100 s only under +Inf
}

#[test]
fn unknown_roles_and_extreme_latencies_stay_valid() {
    let m = Metrics::new(u64::MAX);
    m.set_role("leader");
    m.set_role("confused");
    m.observe_commit_latency(Duration::ZERO);
    m.observe_commit_latency(Duration::from_secs(100_000));
    m.set_ballot(u64::MAX, u64::MAX);
    let (_, samples) = parse(&m.render());
    assert!(samples.iter().filter(|s| s.name == "replog_role").all(|s| s.value == 0.0));
    let (buckets, _, count) = check_histogram(&samples, "replog_commit_latency_seconds");
    assert_eq!(count, 2.0);
    assert_eq!(buckets[0].1, 1.0);
    assert_eq!(buckets[buckets.len() - 2].1, 1.0, "100000 s only in +Inf");
}

#[test]
fn updates_from_another_thread_are_seen() {
    let m = Metrics::new(1);
    let w = m.clone();
    std::thread::spawn(move || {
        for i in 0..1000 {
            w.set_commit_index(i);
            w.observe_commit_latency(Duration::from_micros(i));
        }
    })
    .join()
    .unwrap();
    let (_, samples) = parse(&m.render());
    assert_eq!(value(&samples, "replog_commit_index", None), 999.0);
    assert_eq!(value(&samples, "replog_commit_latency_seconds_count", None), 1000.0);
}
