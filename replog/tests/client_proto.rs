//! Property tests of the client protocol codec: every message round-trips through the
//! envelope, and arbitrary bytes (raw, or inside a valid envelope) never panic the
//! decoders.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use replog::client::proto::{self, ProtoError, MAX_FRAME};
use replog::client::{ErrorCode, PeerStatus, Request, Response, Status};
use transport::envelope::{self, Decoder, Frame};

fn bytes() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::from)
}

fn entries() -> impl Strategy<Value = Vec<Bytes>> {
    proptest::collection::vec(bytes(), 0..8)
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        any::<u64>().prop_map(|cluster_id| Request::Hello { cluster_id }),
        (any::<u64>(), any::<u64>(), entries())
            .prop_map(|(client, seq, entries)| { Request::Append { client, seq, entries } }),
        (any::<u64>(), any::<u32>(), any::<u32>())
            .prop_map(|(from, max_entries, max_bytes)| { Request::Read { from, max_entries, max_bytes } }),
        any::<u64>().prop_map(|from| Request::Tail { from }),
        Just(Request::Status),
        (any::<u64>(), any::<u32>(), any::<u32>())
            .prop_map(|(from, max_entries, max_bytes)| { Request::ReadLinearizable { from, max_entries, max_bytes } }),
        any::<u64>().prop_map(|to| Request::Transfer { to }),
        (any::<bool>(), bytes()).prop_map(|(linearizable, query)| Request::Query { linearizable, query }),
        (proptest::collection::vec(any::<u64>(), 0..6), proptest::collection::vec(any::<u64>(), 0..6))
            .prop_map(|(voters, learners)| Request::ChangeMembership { voters, learners }),
        Just(Request::Snapshot),
        any::<u64>().prop_map(|upto| Request::Trim { upto }),
        any::<[u8; 32]>().prop_map(|proof| Request::Auth { proof }),
        (any::<u64>(), any::<u8>(), any::<[u8; 16]>(), any::<u16>(), any::<u16>()).prop_map(|(id, op, ip, p1, p2)| {
            let peer_addr = std::net::SocketAddr::from((ip, p1));
            let client_addr = std::net::SocketAddr::from(([127, 0, 0, 1], p2));
            Request::MemberChange(match op % 3 {
                0 => replog::client::MemberOp::Add { id, peer_addr, client_addr },
                1 => replog::client::MemberOp::Promote { id },
                _ => replog::client::MemberOp::Remove { id },
            })
        }),
    ]
}

fn code() -> impl Strategy<Value = ErrorCode> {
    (1u16..=8).prop_filter_map("a defined error code", ErrorCode::from_u16)
}

fn status() -> impl Strategy<Value = Status> {
    (
        (any::<u64>(), ".{0,12}", any::<Option<u64>>(), ".{0,12}"),
        (any::<u64>(), any::<u64>(), any::<u64>(), ".{0,8}"),
        proptest::collection::vec(
            (any::<u64>(), any::<u64>(), any::<u64>(), any::<bool>())
                .prop_map(|(id, matched_slot, lag, connected)| PeerStatus { id, matched_slot, lag, connected }),
            0..5,
        ),
    )
        .prop_map(
            |((node, role, leader, ballot), (commit_slot, applied_slot, last_position, durability), peers)| Status {
                node,
                role,
                leader,
                ballot,
                commit_slot,
                applied_slot,
                last_position,
                durability,
                peers,
            },
        )
}

fn response() -> impl Strategy<Value = Response> {
    prop_oneof![
        any::<u64>().prop_map(|node| Response::HelloOk { node }),
        proptest::collection::vec(any::<u64>(), 0..10).prop_map(|positions| Response::Appended { positions }),
        (any::<u64>(), entries(), any::<u64>())
            .prop_map(|(from, entries, last_committed)| { Response::Entries { from, entries, last_committed } }),
        status().prop_map(Response::Status),
        (any::<Option<u64>>(), proptest::option::of(".{0,20}"))
            .prop_map(|(leader, addr)| Response::Redirect { leader, addr }),
        (code(), ".{0,40}").prop_map(|(code, message)| Response::Error { code, message }),
        (any::<u64>(), bytes()).prop_map(|(applied_slot, data)| Response::QueryResult { applied_slot, data }),
        any::<[u8; 32]>().prop_map(|nonce| Response::Challenge { nonce }),
        any::<u64>().prop_map(|first_position| Response::Trimmed { first_position }),
    ]
}

/// The one whole frame `b` holds.
fn one_frame(b: &[u8]) -> Frame {
    match Decoder::new(MAX_FRAME).decode(&mut BytesMut::from(b)) {
        Ok(Some(f)) => f,
        Ok(None) => panic!("no whole frame in {} bytes", b.len()),
        Err(e) => panic!("the envelope does not decode: {e}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn request_round_trips(id in any::<u64>(), req in request()) {
        let mut out = Vec::new();
        proto::encode_request(id, &req, &mut out).unwrap();
        prop_assert_eq!(proto::decode_request(&one_frame(&out)), Ok((id, req)));
    }

    #[test]
    fn response_round_trips(id in any::<u64>(), resp in response()) {
        let mut out = Vec::new();
        proto::encode_response(id, &resp, &mut out).unwrap();
        prop_assert_eq!(proto::decode_response(&one_frame(&out)), Ok((id, resp)));
    }

    /// Random bytes on the stream: the envelope decoder and both message decoders
    /// return values or typed errors, never panic, and never yield more than was sent.
    #[test]
    fn random_stream_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512), max in 0u32..1024) {
        let d = Decoder::new(max);
        let mut buf = BytesMut::from(&data[..]);
        for _ in 0..data.len() + 1 {
            match d.decode(&mut buf) {
                Ok(Some(f)) => {
                    prop_assert!(f.payload.len() <= max as usize);
                    let _ = proto::decode_request(&f);
                    let _ = proto::decode_response(&f);
                }
                Ok(None) | Err(_) => break,
            }
        }
    }

    /// Random payloads in a valid envelope of every kind: typed errors, never a panic.
    #[test]
    fn random_payload_never_panics(kind in any::<u8>(), payload in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut out = Vec::new();
        envelope::encode(kind, &payload, &mut out);
        let f = one_frame(&out);
        let _ = proto::decode_request(&f);
        let _ = proto::decode_response(&f);
    }

    /// A valid message with bytes cut off or appended is refused with a typed error.
    #[test]
    fn cut_or_padded_payload_is_refused(id in any::<u64>(), req in request(), cut in 1usize..8, pad in 1usize..8) {
        let mut out = Vec::new();
        proto::encode_request(id, &req, &mut out).unwrap();
        let payload = &out[envelope::HEADER_LEN..];
        if payload.len() >= cut {
            let mut f = Vec::new();
            envelope::encode(out[5], &payload[..payload.len() - cut], &mut f);
            let r = proto::decode_request(&one_frame(&f));
            prop_assert!(r.is_err(), "{:?}", r);
        }
        let mut padded = payload.to_vec();
        padded.extend(std::iter::repeat_n(0u8, pad));
        let mut f = Vec::new();
        envelope::encode(out[5], &padded, &mut f);
        let r = proto::decode_request(&one_frame(&f));
        prop_assert!(r.is_err());
    }
}

#[test]
fn wrong_version_is_refused_by_the_envelope() {
    let mut out = Vec::new();
    proto::encode_request(1, &Request::Status, &mut out).unwrap();
    out[4] = 9;
    let e = Decoder::new(MAX_FRAME).decode(&mut BytesMut::from(&out[..]));
    assert_eq!(e, Err(envelope::FrameError::Version { got: 9 }));
    let pe: ProtoError = match e {
        Err(e) => e.into(),
        Ok(f) => panic!("a frame of version 9 decoded: {f:?}"),
    };
    assert!(pe.to_string().contains("version 9"));
}
