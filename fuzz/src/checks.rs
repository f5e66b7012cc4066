//! One function per fuzz target: feed `data` to a decoder of network or disk input.
//! Each must return (a value or a typed error) and never panic; where a decoder accepts
//! the input, its value must survive an encode/decode round trip unchanged.
//!
//! This file is also compiled into `replog/tests/fuzz_regressions.rs` (by `#[path]`),
//! which replays every input kept under `fuzz/regressions/<target>/`: keep it free of
//! anything but the workspace crates, `bytes` and `tempfile`.

use bytes::{Bytes, BytesMut};

/// A target's check.
pub type Check = fn(&[u8]);

/// The targets, by name (the names of the fuzz binaries and regression directories).
pub const TARGETS: &[(&str, Check)] = &[
    ("client_frames", client_frames),
    ("peer_messages", peer_messages),
    ("log_records", log_records),
    ("store_recovery", store_recovery),
    ("envelope", envelope),
    ("peer_handshake", peer_handshake),
    ("config_toml", config_toml),
    ("snapshots", snapshots),
    ("rdma_records", rdma_records),
];

fn u64_of(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    let n = b.len().min(8);
    a[..n].copy_from_slice(&b[..n]);
    u64::from_le_bytes(a)
}

/// Client protocol frames (`replog::client::proto`): the first byte is the frame kind,
/// the rest its payload (the envelope's checksum is bypassed so that the fuzzer reaches
/// the payload decoders); also the raw bytes as a stream through the envelope decoder.
pub fn client_frames(data: &[u8]) {
    use replog::client::proto;
    use transport::envelope::{Decoder, Frame};
    let Some((&kind, payload)) = data.split_first() else {
        return;
    };
    let frame = Frame { kind, payload: Bytes::copy_from_slice(payload) };
    let dec = Decoder::new(u32::MAX);
    if let Ok((id, req)) = proto::decode_request(&frame) {
        let mut out = Vec::new();
        proto::encode_request(id, &req, &mut out).expect("a decoded request encodes");
        let again = dec.decode(&mut BytesMut::from(&out[..])).expect("own frame").expect("whole frame");
        assert_eq!(proto::decode_request(&again).expect("re-decodes"), (id, req));
    }
    if let Ok((id, resp)) = proto::decode_response(&frame) {
        let mut out = Vec::new();
        proto::encode_response(id, &resp, &mut out).expect("a decoded response encodes");
        let again = dec.decode(&mut BytesMut::from(&out[..])).expect("own frame").expect("whole frame");
        assert_eq!(proto::decode_response(&again).expect("re-decodes"), (id, resp));
    }
    let small = Decoder::new(1 << 16);
    let mut buf = BytesMut::from(data);
    for _ in 0..=data.len() {
        match small.decode(&mut buf) {
            Ok(Some(f)) => {
                let _ = proto::decode_request(&f);
                let _ = proto::decode_response(&f);
            }
            Ok(None) | Err(_) => break,
        }
    }
}

/// Peer messages (`replog::wire`): control messages, remote writes (the first 8 bytes
/// are the write's offset), read answers and denials.
pub fn peer_messages(data: &[u8]) {
    use paxos::{Ballot, ReadRequest};
    use replog::wire;
    if let Ok(m) = wire::decode_message(data) {
        let mut out = Vec::new();
        wire::encode_message(&m, &mut out);
        assert_eq!(wire::decode_message(&out), Ok(m));
    }
    let (head, rest) = data.split_at(data.len().min(8));
    let offset = u64_of(head);
    if let Ok(w) = wire::decode_write(offset, rest) {
        let mut out = Vec::new();
        let off = wire::encode_write(&w, &mut out);
        assert_eq!(off, w.first);
        assert_eq!(wire::decode_write(off, &out), Ok(w));
    }
    let q = ReadRequest { ballot: Ballot::new(offset >> 8, offset & 0xff), from: (offset >> 40).max(1), to: u64::MAX };
    let decoded = wire::decode_read_result(&q, rest);
    if let Ok(r) = &decoded {
        assert!(r.entries.iter().all(|e| e.slot >= q.from && e.slot <= r.to), "entries outside the answer's range");
    }
    // The agent's check of a mirror answer accepts exactly what the node decodes.
    assert_eq!(wire::check_read_result(q.from, rest).is_ok(), decoded.is_ok(), "check and decode disagree");
    let _ = wire::decode_denied(data);
}

/// Log records (`replog::store`): the value codec, segment headers, and a walk over
/// the records of a segment image (epoch from the first 8 bytes).
pub fn log_records(data: &[u8]) {
    use replog::store::codec;
    use replog::store::format::{check_record, SegmentHeader};
    assert_eq!(codec::check_value(data).is_ok(), codec::decode_value(data).is_ok(), "check and decode disagree");
    if let Ok(v) = codec::decode_value(data) {
        let mut out = Vec::new();
        codec::encode_value(&v, &mut out);
        assert_eq!(out.len(), codec::encoded_len(&v));
        assert_eq!(codec::decode_value(&out), Ok(v));
    }
    if let Ok(h) = SegmentHeader::decode(data) {
        assert_eq!(SegmentHeader::decode(&h.encode()), Ok(h));
    }
    let epoch = u64_of(data);
    let mut off = 0usize;
    for _ in 0..=data.len() {
        match check_record(data, off, epoch, None) {
            Ok((_, size)) if size > 0 => off += size,
            _ => break,
        }
    }
}

/// Store recovery (`replog::store::Log::open` on a damaged directory). Either the
/// segment file is the input itself (first byte's top bit set), or a valid log of a
/// few records (lengths from the input) is written, then damaged as the input says
/// (xor a byte at an offset, or cut the file there), and reopened. Opening returns a
/// log or a typed error; an opened log reads back every record it claims to hold; an
/// undamaged log reopens with every record.
pub fn store_recovery(data: &[u8]) {
    use replog::store::{Log, Mode, StoreConfig};
    const SEG: u64 = 4096;
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let base = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm" } else { "/tmp" };
    let dir = tempfile::Builder::new().prefix("replog-fuzz-").tempdir_in(base).expect("a temporary directory");
    let cfg = StoreConfig::new(Mode::Fsync).with_segment_size(SEG);
    let seg_path = dir.path().join(format!("seg-{:016x}.log", 0));
    let mut expect = None;
    if first & 0x80 != 0 {
        std::fs::write(&seg_path, &rest[..rest.len().min(4 * SEG as usize)]).expect("write the segment");
    } else {
        let n = (first & 0x0f) as usize;
        let (lens, damage) = rest.split_at(rest.len().min(n));
        {
            let log = Log::open(dir.path(), cfg).expect("a new log");
            for (i, &len) in lens.iter().enumerate() {
                log.append(&vec![i as u8; len as usize]).expect("append");
            }
            log.sync().expect("sync");
        }
        let mut files: Vec<_> = std::fs::read_dir(dir.path())
            .expect("the log directory")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        files.sort();
        let Some(target) = files.first().cloned() else {
            return;
        };
        let mut bytes = std::fs::read(&target).expect("read the segment");
        let mut damaged = false;
        for ch in damage.chunks_exact(3).take(16) {
            if bytes.is_empty() {
                break;
            }
            let off = u16::from_le_bytes([ch[0], ch[1]]) as usize % bytes.len();
            if ch[2] == 0 {
                bytes.truncate(off);
            } else {
                bytes[off] ^= ch[2];
            }
            damaged = true;
        }
        std::fs::write(&target, &bytes).expect("write the segment back");
        if !damaged {
            expect = Some(lens.len() as u64);
        }
    }
    match Log::open(dir.path(), cfg) {
        Ok(log) => {
            let (from, to) = (log.first_pos(), log.next_pos());
            if let Some(n) = expect {
                assert_eq!(to - from, n, "an undamaged log lost records on reopening");
            }
            let mut read = 0u64;
            for r in log.iter(from, to) {
                if r.is_err() {
                    break;
                }
                read += 1;
            }
            if expect.is_some() {
                assert_eq!(read, to - from, "an undamaged log cannot read back its records");
            }
        }
        Err(e) => {
            assert!(expect.is_none(), "an undamaged log does not reopen: {e}");
        }
    }
}

/// The transport envelope (`transport::envelope`): a byte stream of frames under a
/// frame limit from the first 4 bytes; every decoded frame re-encodes to a frame that
/// decodes the same.
pub fn envelope(data: &[u8]) {
    use transport::envelope::{self, Decoder, HEADER_LEN};
    let (head, rest) = data.split_at(data.len().min(4));
    let max = (u64_of(head) as u32) % (1 << 20);
    let dec = Decoder::new(max);
    if let Some(h) = rest.get(..HEADER_LEN).and_then(|h| h.try_into().ok()) {
        let _ = dec.check_header(h);
    }
    let mut buf = BytesMut::from(rest);
    for _ in 0..=rest.len() {
        match dec.decode(&mut buf) {
            Ok(Some(f)) => {
                assert!(f.payload.len() <= max as usize, "a frame above the limit was accepted");
                let mut out = Vec::new();
                envelope::encode(f.kind, &f.payload, &mut out);
                let again = dec.decode(&mut BytesMut::from(&out[..])).expect("own frame").expect("whole frame");
                assert_eq!(again, f);
            }
            Ok(None) | Err(_) => break,
        }
    }
}

/// The TCP transport's handshake and data-frame payloads (`fallback_tcp::wire`).
pub fn peer_handshake(data: &[u8]) {
    use fallback_tcp::wire;
    if let Ok(h) = wire::Hello::decode(data) {
        assert_eq!(&h.encode()[..], data);
    }
    if let Ok(h) = wire::HelloOk::decode(data) {
        assert_eq!(wire::HelloOk::decode(&h.encode()), Ok(h));
    }
    let _ = wire::decode_32(data, "fuzz");
    let b = Bytes::copy_from_slice(data);
    if let Ok((token, offset, rest)) = wire::decode_write(&b) {
        let mut out = wire::write_meta(token, offset).to_vec();
        out.extend_from_slice(&rest);
        assert_eq!(&out[..], data);
    }
    if let Ok((token, offset, len)) = wire::decode_read(data) {
        assert_eq!(&wire::read_meta(token, offset, len)[..], data);
    }
    if let Ok((token, ok, rest)) = wire::decode_answer(&b, "fuzz") {
        let mut out = wire::answer_meta(token, ok).to_vec();
        out.extend_from_slice(&rest);
        assert_eq!(&out[..], data);
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let r = wire::reject_payload(s);
        assert!(r.len() <= wire::MAX_REJECT_LEN && std::str::from_utf8(r).is_ok());
    }
}

/// Configuration files (`replog::config::ServeConfig::from_toml`): a parsed and
/// validated configuration written back with `to_toml` parses to the same value.
pub fn config_toml(data: &[u8]) {
    use replog::config::ServeConfig;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = ServeConfig::from_toml(text, "fuzz.toml") {
        let back = cfg.to_toml();
        let again = ServeConfig::from_toml(&back, "written").expect("a written configuration parses");
        assert_eq!(again, cfg);
    }
}

/// Snapshots (`replog::snapshot`): transfer frames (chunks and acknowledgements), and
/// snapshot files (the input is the body: its checksum is appended so that the fuzzer
/// reaches the decoder; the raw input is decoded too).
pub fn snapshots(data: &[u8]) {
    use replog::snapshot::{self, Transfer};
    match snapshot::decode_transfer(data) {
        Some(Ok(Transfer::Chunk(c))) => {
            assert!(c.offset + c.data.len() as u64 <= c.total, "a chunk beyond its snapshot was accepted");
            let mut out = Vec::new();
            snapshot::encode_chunk(&c, &mut out);
            let again = snapshot::decode_transfer(&out).expect("a transfer frame").expect("decodes");
            assert_eq!(again, Transfer::Chunk(c));
        }
        Some(Ok(Transfer::Ack(a))) => {
            let mut out = Vec::new();
            snapshot::encode_ack(&a, &mut out);
            let again = snapshot::decode_transfer(&out).expect("a transfer frame").expect("decodes");
            assert_eq!(again, Transfer::Ack(a));
        }
        Some(Err(_)) | None => {}
    }
    let _ = snapshot::decode(data);
    let mut file = data.to_vec();
    file.extend_from_slice(&crc32c::crc32c(data).to_le_bytes());
    if let Ok(s) = snapshot::decode(&file) {
        let again = snapshot::encode(s.cluster_id, &s.meta, &s.app);
        assert_eq!(snapshot::decode(&again).expect("a re-encoded snapshot decodes"), s);
    }
}

/// What RDMA peers write into this replica's memory (`replog::rdma_region`): cell
/// headers, stream pointers and acknowledgement records, decoded at every 8-byte offset as a poll loop
/// would meet them. An accepted acknowledgement record re-encodes to the same bytes; an
/// accepted cell header whose payload checks re-encodes to a cell with the same header.
pub fn rdma_records(data: &[u8]) {
    use replog::rdma_region as r;
    for start in (0..data.len()).step_by(8) {
        let b = &data[start..];
        if let Some(h) = r::decode_header(b, 4096) {
            let payload = b.get(r::HEADER_LEN..r::HEADER_LEN + h.len as usize);
            if let Some(p) = payload.filter(|p| r::check(b, &h, p)) {
                let mut out = Vec::new();
                r::encode(&h, p, &mut out);
                assert_eq!(r::decode_header(&out, 4096), Some(h));
                assert!(r::check(&out, &h, p), "a re-encoded cell checks");
            }
        }
        if let Some(p) = r::decode_pointer(b) {
            assert!(p.resume <= p.start, "a pointer resumes at or before its start");
            assert_eq!(&r::encode_pointer(&p)[..], &b[..r::POINTER_LEN], "an accepted pointer is exactly its encoding");
        }
        if let Some(a) = b.get(..r::ACK_SLOT).and_then(r::decode_ack) {
            let mut out = Vec::new();
            assert!(r::encode_ack(&a, &mut out), "an accepted record's reply fits");
            assert_eq!(&out[..], &b[..r::ACK_SLOT], "an accepted record is exactly its encoding");
        }
    }
    read_mirror(data);
}

/// The accepted-entries mirror as a reader meets it (bytes from the network): header,
/// read plan, records, re-check. Nothing panics; a header that decodes re-encodes to
/// one that decodes the same; an answer that assembles covers the slot asked.
fn read_mirror(data: &[u8]) {
    use replog::rdma_mirror as m;
    let len = data.len() as u64;
    let Ok(h) = m::decode_header(data, len) else { return };
    assert_eq!(m::decode_header(&m::encode_header(&h), len), Ok(h), "a decoded header re-encodes");
    for from in [h.low, h.high, h.low.wrapping_add(1)] {
        let Ok((off, n, count)) = m::plan_read(&h, from, 1 << 16) else { continue };
        assert!(count >= 1 && from + count - 1 <= h.high, "a plan stays in the range held");
        let Some(recs) = data.get(off as usize..(off as usize).saturating_add(n as usize)) else { continue };
        let mut out = Vec::new();
        if let Ok(to) = m::assemble(&h, from, recs, 1 << 16, &mut out) {
            assert!(to >= from && to < from + count, "an answer covers the slot asked and no more");
            assert!(m::recheck(&h, data, len).is_ok(), "the same header re-checks");
        }
        // The same read in one go (header, records, header), placed by the header seen.
        let seen = m::Seen::from(&h);
        let Some((off, n)) = m::plan_chain(&seen, from, 1 << 16) else { continue };
        let Some(recs) = data.get(off as usize..(off as usize).saturating_add(n as usize)) else { continue };
        let Some(head) = data.get(..m::HEADER_LEN) else { continue };
        let chained: Vec<u8> = [head, recs, head].concat();
        if let Ok((again, to)) = m::answer_chain(&seen, from, &chained, n, len, 1 << 16, &mut Vec::new()) {
            assert_eq!(again, h, "answered under the header read");
            assert!(to >= from && to <= h.high, "a chained answer covers the slot asked, within the range held");
        }
        let _ = m::answer_chain(&seen, from, data, n, len, 1 << 16, &mut Vec::new());
    }
}
