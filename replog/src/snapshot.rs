//! Snapshots on disk and on the wire.
//!
//! A snapshot is the application's state after applying every slot up to `meta.slot`,
//! with the core's part ([`SnapshotMeta`]: the client de-duplication table and the
//! position counter). One file per snapshot, `snap-<slot>.rsnap` in the `snapshots`
//! directory beside the log:
//!
//! ```text
//!  0   8  magic "RPLGSNP1"
//!  8   4  format version (1, or 2 when the membership carries member addresses)
//! 12   8  cluster id
//! 20   8  slot
//! 28   8  last position
//! 36   4  number of clients C, then per client: id u64, count N u32, N x (seq u64, position u64)
//!  ..  4  voters V, V x u64; 4 learners W, W x u64 (the membership after `slot`; V = 0: unknown)
//!  ..  version 2 only: 4 count A, A x (id u64, len u32, len bytes): the members'
//!          addresses ([`paxos::Membership::addrs`]), ids increasing, each a member
//!  ..  8  application state length L, then L bytes
//!  ..  4  CRC32C of everything before
//! ```
//!
//! A snapshot is written to a temporary file, synced, renamed into place, the directory
//! synced, and then read back and verified before the log behind it is trimmed. At
//! start the newest file that verifies is used; a corrupt one is renamed aside
//! (`.corrupt`) and the next older one tried; with none, the replica starts empty and a
//! leader sends it one.
//!
//! On the wire a snapshot travels in chunks ([`Chunk`]) on the peer message plane,
//! acknowledged cumulatively ([`ChunkAck`]): the sender keeps a window of chunks in
//! flight and resumes from the last acknowledged offset after a timeout or when the
//! core asks again.

use bytes::Bytes;
use paxos::{Membership, Slot, SnapshotMeta};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"RPLGSNP1";
const VERSION: u32 = 1;
/// The format with member addresses (written only when the membership has some).
const VERSION_ADDRS: u32 = 2;
const SUFFIX: &str = ".rsnap";

/// Why a snapshot could not be written, read or decoded.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// An I/O error on a snapshot file.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why it failed.
        source: io::Error,
    },
    /// The bytes are not a valid snapshot.
    #[error("invalid snapshot: {0}")]
    Invalid(&'static str),
    /// A snapshot of another cluster.
    #[error("snapshot of cluster {found:016x}, expected {expected:016x}")]
    WrongCluster {
        /// The cluster id in the snapshot.
        found: u64,
        /// Ours.
        expected: u64,
    },
    /// The file written does not read back as written.
    #[error("snapshot {0} did not verify after writing")]
    Verify(PathBuf),
}

/// A decoded snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The cluster it belongs to.
    pub cluster_id: u64,
    /// The core's part, including the slot it covers.
    pub meta: SnapshotMeta,
    /// The application's state, as its `save_snapshot` wrote it.
    pub app: Bytes,
}

/// Encodes a snapshot (see the module docs for the format).
pub fn encode(cluster_id: u64, meta: &SnapshotMeta, app: &[u8]) -> Vec<u8> {
    let entries: usize = meta.clients.iter().map(|(_, s)| 12 + s.len() * 16).sum();
    let mut out = Vec::with_capacity(64 + entries + app.len());
    out.extend_from_slice(MAGIC);
    let version = if meta.membership.addrs.is_empty() { VERSION } else { VERSION_ADDRS };
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&cluster_id.to_le_bytes());
    out.extend_from_slice(&meta.slot.to_le_bytes());
    out.extend_from_slice(&meta.last_position.to_le_bytes());
    out.extend_from_slice(&(meta.clients.len() as u32).to_le_bytes());
    for (client, seqs) in &meta.clients {
        out.extend_from_slice(&client.to_le_bytes());
        out.extend_from_slice(&(seqs.len() as u32).to_le_bytes());
        for (seq, pos) in seqs {
            out.extend_from_slice(&seq.to_le_bytes());
            out.extend_from_slice(&pos.to_le_bytes());
        }
    }
    for ids in [&meta.membership.voters, &meta.membership.learners] {
        out.extend_from_slice(&(ids.len() as u32).to_le_bytes());
        for id in ids.iter() {
            out.extend_from_slice(&id.to_le_bytes());
        }
    }
    if version == VERSION_ADDRS {
        out.extend_from_slice(&(meta.membership.addrs.len() as u32).to_le_bytes());
        for (id, a) in &meta.membership.addrs {
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&(a.len() as u32).to_le_bytes());
            out.extend_from_slice(a);
        }
    }
    out.extend_from_slice(&(app.len() as u64).to_le_bytes());
    out.extend_from_slice(app);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        if self.0.len() < n {
            return Err(SnapshotError::Invalid("truncated"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, SnapshotError> {
        self.take(4)?.try_into().map(u32::from_le_bytes).map_err(|_| SnapshotError::Invalid("truncated"))
    }
    fn u64(&mut self) -> Result<u64, SnapshotError> {
        self.take(8)?.try_into().map(u64::from_le_bytes).map_err(|_| SnapshotError::Invalid("truncated"))
    }
}

/// Decodes and verifies a snapshot. Never panics on any input.
pub fn decode(bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
    if bytes.len() < MAGIC.len() + 4 + 4 {
        return Err(SnapshotError::Invalid("truncated"));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32c::crc32c(body) != u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) {
        return Err(SnapshotError::Invalid("checksum mismatch"));
    }
    let mut r = Reader(body);
    if r.take(8)? != MAGIC {
        return Err(SnapshotError::Invalid("bad magic"));
    }
    let version = r.u32()?;
    if version != VERSION && version != VERSION_ADDRS {
        return Err(SnapshotError::Invalid("unknown format version"));
    }
    let cluster_id = r.u64()?;
    let slot = r.u64()?;
    let last_position = r.u64()?;
    let n = r.u32()? as usize;
    // Each client takes at least 12 bytes: bound the allocation by the input.
    if n > r.0.len() / 12 {
        return Err(SnapshotError::Invalid("client count exceeds the data"));
    }
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let client = r.u64()?;
        let m = r.u32()? as usize;
        if m > r.0.len() / 16 {
            return Err(SnapshotError::Invalid("sequence count exceeds the data"));
        }
        let mut seqs = Vec::with_capacity(m);
        for _ in 0..m {
            seqs.push((r.u64()?, r.u64()?));
        }
        clients.push((client, seqs));
    }
    let mut lists = [Vec::new(), Vec::new()];
    for l in lists.iter_mut() {
        let n = r.u32()? as usize;
        if n > r.0.len() / 8 {
            return Err(SnapshotError::Invalid("member count exceeds the data"));
        }
        for _ in 0..n {
            l.push(r.u64()?);
        }
    }
    let [voters, learners] = lists;
    let membership = Membership::new(voters.clone(), learners.clone());
    if membership.voters != voters || membership.learners != learners {
        return Err(SnapshotError::Invalid("membership not sorted or duplicated"));
    }
    let mut addrs = std::collections::BTreeMap::new();
    if version == VERSION_ADDRS {
        let n = r.u32()? as usize;
        if n > r.0.len() / 12 {
            return Err(SnapshotError::Invalid("member address count exceeds the data"));
        }
        for _ in 0..n {
            let id = r.u64()?;
            let len = r.u32()? as usize;
            if len > crate::store::codec::MAX_MEMBER_BYTES {
                return Err(SnapshotError::Invalid("member address too long"));
            }
            if addrs.last_key_value().is_some_and(|(&l, _)| l >= id) || !membership.contains(id) {
                return Err(SnapshotError::Invalid("member addresses not sorted, duplicated or of a non-member"));
            }
            addrs.insert(id, r.take(len)?.to_vec());
        }
    }
    let membership = membership.with_addrs(addrs);
    let len = r.u64()?;
    if len != r.0.len() as u64 {
        return Err(SnapshotError::Invalid("application state length mismatch"));
    }
    let app = Bytes::copy_from_slice(r.0);
    Ok(Snapshot { cluster_id, meta: SnapshotMeta { slot, last_position, clients, membership }, app })
}

/// The snapshots of one replica: a directory, or memory for the `memory` durability
/// mode (where nothing survives the process anyway).
#[derive(Debug)]
pub struct SnapshotStore {
    dir: Option<PathBuf>,
    cluster_id: u64,
    /// The newest snapshot: its slot and encoded bytes (what is sent to followers).
    latest: Option<(Slot, Bytes)>,
    /// How many snapshot files to keep (the newest ones).
    keep: usize,
}

impl SnapshotStore {
    /// Snapshots in `dir` (created if missing), or in memory when `dir` is `None`.
    pub fn open(dir: Option<PathBuf>, cluster_id: u64) -> Result<Self, SnapshotError> {
        if let Some(d) = &dir {
            fs::create_dir_all(d).map_err(|source| SnapshotError::Io { op: "create", path: d.clone(), source })?;
        }
        Ok(SnapshotStore { dir, cluster_id, latest: None, keep: 2 })
    }

    /// The newest snapshot's slot and bytes, if any.
    pub fn latest(&self) -> Option<&(Slot, Bytes)> {
        self.latest.as_ref()
    }

    fn path_of(dir: &Path, slot: Slot) -> PathBuf {
        dir.join(format!("snap-{slot:020}{SUFFIX}"))
    }

    /// The snapshot files in the directory, newest first.
    fn files(&self) -> Result<Vec<(Slot, PathBuf)>, SnapshotError> {
        let Some(dir) = &self.dir else { return Ok(Vec::new()) };
        let rd = fs::read_dir(dir).map_err(|source| SnapshotError::Io { op: "list", path: dir.clone(), source })?;
        let mut out = Vec::new();
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(num) = name.strip_prefix("snap-").and_then(|n| n.strip_suffix(SUFFIX)) else { continue };
            if let Ok(slot) = num.parse::<u64>() {
                out.push((slot, e.path()));
            }
        }
        out.sort_by_key(|f| std::cmp::Reverse(f.0));
        Ok(out)
    }

    /// Saves an encoded snapshot durably and verifies it by reading it back; older
    /// files beyond the newest `keep` are removed.
    pub fn save(&mut self, slot: Slot, bytes: Bytes) -> Result<(), SnapshotError> {
        if let Some(dir) = self.dir.clone() {
            let path = Self::path_of(&dir, slot);
            let tmp = path.with_extension("tmp");
            fn io(op: &'static str, p: &Path) -> impl FnOnce(io::Error) -> SnapshotError {
                let path = p.to_path_buf();
                move |source| SnapshotError::Io { op, path, source }
            }
            {
                let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
                f.write_all(&bytes).map_err(io("write", &tmp))?;
                f.sync_all().map_err(io("sync", &tmp))?;
            }
            fs::rename(&tmp, &path).map_err(io("rename", &tmp))?;
            File::open(&dir).and_then(|d| d.sync_all()).map_err(io("sync directory", &dir))?;
            let back = fs::read(&path).map_err(io("read back", &path))?;
            if back != bytes[..] || decode(&back).is_err() {
                let _ = fs::rename(&path, path.with_extension("corrupt"));
                return Err(SnapshotError::Verify(path));
            }
            for (_, old) in self.files()?.into_iter().skip(self.keep) {
                let _ = fs::remove_file(old);
            }
        }
        self.latest = Some((slot, bytes));
        Ok(())
    }

    /// Loads the newest snapshot that verifies; corrupt files are renamed aside (with
    /// the reason returned in the second element) and the next older one is tried.
    pub fn load_latest(&mut self) -> Result<(Option<Snapshot>, Vec<String>), SnapshotError> {
        let mut rejected = Vec::new();
        for (slot, path) in self.files()? {
            let bytes = match fs::read(&path) {
                Ok(b) => b,
                Err(e) => {
                    rejected.push(format!("{}: {e}", path.display()));
                    continue;
                }
            };
            match decode(&bytes) {
                Ok(s) if s.cluster_id != self.cluster_id => {
                    let e = SnapshotError::WrongCluster { found: s.cluster_id, expected: self.cluster_id };
                    rejected.push(format!("{}: {e}", path.display()));
                }
                Ok(s) if s.meta.slot != slot => {
                    rejected.push(format!("{}: holds slot {} (name says {slot})", path.display(), s.meta.slot));
                }
                Ok(s) => {
                    self.latest = Some((slot, Bytes::from(bytes)));
                    return Ok((Some(s), rejected));
                }
                Err(e) => rejected.push(format!("{}: {e}", path.display())),
            }
            let _ = fs::rename(&path, path.with_extension("corrupt"));
        }
        Ok((None, rejected))
    }
}

/// Peer frame kinds of the snapshot transfer (beside the protocol's message kinds).
pub mod kind {
    /// A chunk of a snapshot.
    pub const CHUNK: u8 = 20;
    /// A cumulative acknowledgement of chunks.
    pub const ACK: u8 = 21;
}

/// A piece of a snapshot on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// The slot the snapshot covers (identifies it).
    pub slot: Slot,
    /// Its total size in bytes.
    pub total: u64,
    /// Where this piece starts.
    pub offset: u64,
    /// The bytes.
    pub data: Bytes,
}

/// The receiver has every byte of snapshot `slot` before `next` (`next == total`: it
/// has all of it; `u64::MAX`: it installed or no longer needs it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkAck {
    /// The snapshot.
    pub slot: Slot,
    /// The first byte it still needs.
    pub next: u64,
}

/// Appends a chunk frame.
pub fn encode_chunk(c: &Chunk, out: &mut Vec<u8>) {
    out.push(kind::CHUNK);
    out.extend_from_slice(&c.slot.to_le_bytes());
    out.extend_from_slice(&c.total.to_le_bytes());
    out.extend_from_slice(&c.offset.to_le_bytes());
    out.extend_from_slice(&c.data);
}

/// Appends an acknowledgement frame.
pub fn encode_ack(a: &ChunkAck, out: &mut Vec<u8>) {
    out.push(kind::ACK);
    out.extend_from_slice(&a.slot.to_le_bytes());
    out.extend_from_slice(&a.next.to_le_bytes());
}

/// A decoded transfer frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transfer {
    /// A chunk.
    Chunk(Chunk),
    /// An acknowledgement.
    Ack(ChunkAck),
}

/// Decodes a transfer frame, or `None` if `b` is not one (another peer message).
/// Never panics.
pub fn decode_transfer(b: &[u8]) -> Option<Result<Transfer, SnapshotError>> {
    let (&k, rest) = b.split_first()?;
    let mut r = Reader(rest);
    match k {
        kind::CHUNK => Some((|| {
            let (slot, total, offset) = (r.u64()?, r.u64()?, r.u64()?);
            let data = Bytes::copy_from_slice(r.0);
            if offset.checked_add(data.len() as u64).is_none_or(|end| end > total) {
                return Err(SnapshotError::Invalid("chunk beyond the snapshot's size"));
            }
            Ok(Transfer::Chunk(Chunk { slot, total, offset, data }))
        })()),
        kind::ACK => Some((|| {
            let a = ChunkAck { slot: r.u64()?, next: r.u64()? };
            if !r.0.is_empty() {
                return Err(SnapshotError::Invalid("trailing bytes after an acknowledgement"));
            }
            Ok(Transfer::Ack(a))
        })()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> SnapshotMeta {
        SnapshotMeta {
            slot: 42,
            last_position: 100,
            clients: vec![(7, vec![(1, 99), (2, 100)]), (9, vec![])],
            membership: Membership::new(vec![1, 2, 3], vec![4]),
        }
    }

    #[test]
    fn round_trip() {
        let b = encode(5, &meta(), b"state");
        let s = match decode(&b) {
            Ok(s) => s,
            Err(e) => panic!("a snapshot just encoded does not decode: {e}"),
        };
        assert_eq!((s.cluster_id, s.meta, &s.app[..]), (5, meta(), &b"state"[..]));
    }

    #[test]
    fn round_trip_with_member_addresses() {
        let mut m = meta();
        let addrs = [(1, b"a".to_vec()), (4, b"127.0.0.1:1 127.0.0.1:2".to_vec())].into_iter().collect();
        m.membership = m.membership.with_addrs(addrs);
        let b = encode(5, &m, b"state");
        assert_eq!(b.get(8..12), Some(&VERSION_ADDRS.to_le_bytes()[..]), "format version 2");
        assert_eq!(decode(&b).map(|s| s.meta).map_err(|e| e.to_string()), Ok(m));
        for n in 0..b.len() {
            assert!(decode(&b[..n]).is_err(), "truncated to {n} accepted");
        }
        // Without addresses the format stays version 1 (readable by older builds).
        assert_eq!(encode(5, &meta(), b"").get(8..12), Some(&VERSION.to_le_bytes()[..]), "format version 1");
    }

    #[test]
    fn every_truncation_and_every_bit_flip_is_rejected() {
        let b = encode(5, &meta(), b"some application state");
        for n in 0..b.len() {
            assert!(decode(&b[..n]).is_err(), "truncated to {n} accepted");
        }
        for i in 0..b.len() * 8 {
            let mut c = b.clone();
            c[i / 8] ^= 1 << (i % 8);
            assert!(decode(&c).is_err(), "bit {i} flipped accepted");
        }
    }

    #[test]
    fn corrupt_newest_falls_back_to_older() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = SnapshotStore::open(Some(dir.path().to_path_buf()), 5).unwrap();
        let mut m = meta();
        st.save(m.slot, Bytes::from(encode(5, &m, b"old"))).unwrap();
        m.slot = 50;
        st.save(m.slot, Bytes::from(encode(5, &m, b"new"))).unwrap();
        // Corrupt the newest on disk.
        let newest = SnapshotStore::path_of(dir.path(), 50);
        let mut b = fs::read(&newest).unwrap();
        let n = b.len();
        b[n / 2] ^= 0xff;
        fs::write(&newest, b).unwrap();
        let mut st = SnapshotStore::open(Some(dir.path().to_path_buf()), 5).unwrap();
        let (s, rejected) = match st.load_latest() {
            Ok(loaded) => loaded,
            Err(e) => panic!("loading the snapshots: {e}"),
        };
        let Some(s) = s else { panic!("no snapshot verifies, the older one should: {rejected:?}") };
        assert_eq!((s.meta.slot, &s.app[..]), (42, &b"old"[..]));
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        assert!(newest.with_extension("corrupt").exists());
        // Another cluster's snapshot is refused.
        let mut other = SnapshotStore::open(Some(dir.path().to_path_buf()), 6).unwrap();
        let (s, rejected) = match other.load_latest() {
            Ok(loaded) => loaded,
            Err(e) => panic!("loading the snapshots: {e}"),
        };
        assert!(s.is_none() && rejected.first().is_some_and(|r| r.contains("cluster")), "{rejected:?}");
    }

    #[test]
    fn only_the_newest_files_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = SnapshotStore::open(Some(dir.path().to_path_buf()), 5).unwrap();
        for slot in [10, 20, 30, 40] {
            let m = SnapshotMeta { slot, ..meta() };
            st.save(slot, Bytes::from(encode(5, &m, b"x"))).unwrap();
        }
        let slots: Vec<Slot> = st.files().unwrap().into_iter().map(|f| f.0).collect();
        assert_eq!(slots, vec![40, 30]);
    }

    /// `decode_transfer`, its error as text (comparable).
    fn transfer(b: &[u8]) -> Option<Result<Transfer, String>> {
        decode_transfer(b).map(|r| r.map_err(|e| e.to_string()))
    }

    #[test]
    fn transfer_frames_round_trip_and_reject_garbage() {
        let c = Chunk { slot: 3, total: 10, offset: 4, data: Bytes::from_static(b"abcd") };
        let mut b = Vec::new();
        encode_chunk(&c, &mut b);
        assert_eq!(transfer(&b), Some(Ok(Transfer::Chunk(c))));
        let a = ChunkAck { slot: 3, next: 8 };
        let mut b = Vec::new();
        encode_ack(&a, &mut b);
        assert_eq!(transfer(&b), Some(Ok(Transfer::Ack(a))));
        assert!(decode_transfer(&[1, 2, 3]).is_none(), "a protocol message is not a transfer frame");
        let mut bad = Vec::new();
        encode_chunk(&Chunk { slot: 3, total: 2, offset: 1, data: Bytes::from_static(b"abc") }, &mut bad);
        assert!(matches!(transfer(&bad), Some(Err(_))), "a chunk beyond its total: {:?}", transfer(&bad));
        for n in 0..20 {
            let _ = decode_transfer(&b[..n.min(b.len())]);
        }
    }
}
