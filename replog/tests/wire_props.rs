//! Property tests of the peer wire (`replog::wire`): every control message and every
//! remote write round-trips, any cut of an encoding is refused with a typed error, and
//! a read answer round-trips within the range asked.

use bytes::Bytes;
use paxos::{Ballot, Command, Entry, Message, ReadRequest, ReadResult, Value, WriteRequest};
use proptest::prelude::*;
use replog::wire;

fn ballot() -> impl Strategy<Value = Ballot> {
    (any::<u64>(), any::<u64>()).prop_map(|(r, n)| Ballot::new(r, n))
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u64>(), any::<u64>()).prop_map(|(round, chosen)| Message::PreVote { round, chosen }),
        (any::<u64>(), any::<bool>()).prop_map(|(round, granted)| Message::PreVoteReply { round, granted }),
        (ballot(), any::<bool>()).prop_map(|(ballot, transfer)| Message::Prepare { ballot, transfer }),
        ballot().prop_map(|ballot| Message::TimeoutNow { ballot }),
        (ballot(), any::<u64>(), any::<u64>(), any::<u64>())
            .prop_map(|(ballot, chosen, last, trimmed)| Message::Promise { ballot, chosen, last, trimmed }),
        (ballot(), ballot()).prop_map(|(ballot, promised)| Message::Reject { ballot, promised }),
        (ballot(), any::<u64>(), any::<u64>()).prop_map(|(ballot, commit, seq)| Message::Heartbeat {
            ballot,
            commit,
            seq
        }),
        (ballot(), any::<u64>(), any::<u64>(), any::<u64>())
            .prop_map(|(ballot, chosen, last, seq)| Message::HeartbeatReply { ballot, chosen, last, seq }),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Noop),
        any::<u64>().prop_map(Value::Trim),
        proptest::collection::vec(
            (any::<u64>(), any::<u64>(), proptest::collection::vec(any::<u8>(), 0..40))
                .prop_map(|(client, seq, p)| Command { client, seq, payload: Bytes::from(p) }),
            0..5
        )
        .prop_map(Value::Batch),
        (proptest::collection::btree_set(1u64..10, 1..5), proptest::collection::btree_set(10u64..20, 0..3)).prop_map(
            |(v, l)| {
                let addrs =
                    v.iter().map(|&id| (id, format!("10.0.0.{id}:7000 10.0.0.{id}:7001").into_bytes())).collect();
                Value::Config(paxos::Membership {
                    voters: v.into_iter().collect(),
                    learners: l.into_iter().collect(),
                    addrs,
                })
            }
        ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn messages_round_trip_and_cuts_are_refused(m in message()) {
        let mut out = Vec::new();
        wire::encode_message(&m, &mut out);
        prop_assert_eq!(wire::decode_message(&out), Ok(m));
        for cut in 0..out.len() {
            prop_assert!(wire::decode_message(&out[..cut]).is_err());
        }
    }

    #[test]
    fn writes_round_trip(b in ballot(), first in 1u64..u64::MAX / 2, commit in any::<u64>(),
                         values in proptest::collection::vec(value(), 1..6)) {
        let w = WriteRequest { ballot: b, first, values, commit };
        let mut data = Vec::new();
        let off = wire::encode_write(&w, &mut data);
        prop_assert_eq!(wire::decode_write(off, &data), Ok(w));
        for cut in 0..data.len() {
            prop_assert!(wire::decode_write(off, &data[..cut]).is_err());
        }
    }

    #[test]
    fn read_results_round_trip(b in ballot(), from in 1u64..1000, n in 0u64..6,
                               values in proptest::collection::vec((value(), ballot()), 0..6)) {
        let to = from + n;
        let entries: Vec<Entry> = values
            .into_iter()
            .enumerate()
            .filter(|(i, _)| (*i as u64) <= n)
            .map(|(i, (value, ballot))| Entry { slot: from + i as u64, ballot, value })
            .collect();
        let res = ReadResult { ballot: Ballot::ZERO, from, to, entries };
        let q = ReadRequest { ballot: b, from, to };
        let mut data = Vec::new();
        wire::encode_read_result(&res, 1 << 20, &mut data);
        let got = wire::decode_read_result(&q, &data).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!((got.ballot, got.from, got.to), (b, from, to));
        prop_assert_eq!(got.entries, res.entries);
        prop_assert_eq!(wire::check_read_result(from, &data), Ok(()));
    }
}
