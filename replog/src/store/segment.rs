//! One segment: a preallocated file (or memory block) holding a header and records,
//! and the three ways to write it (pwrite, mapped memcpy + flush, plain memory).

use super::error::{Result, StoreError};
use super::format::{
    commit_word, pad8, record_crc, RecordHeader, SegmentHeader, COMMIT_LEN, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN,
    SEG_RECYCLED, ZEROS,
};
use super::persist::{copy_streaming, fence, FlushInstr, Mapping};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{self, Ordering};
use std::sync::Arc;

/// Where a segment's bytes live and how they are written.
pub(crate) enum Backing {
    /// `fsync` mode: records buffered in `Segment::pending`, then `pwrite`; `pread`;
    /// durable after `fdatasync`.
    File(Arc<File>),
    /// `pmem` (with `MAP_SYNC`) or the non-durable mapped test mode: memcpy into a
    /// shared mapping; persisted by cache-line flushes and one fence per batch.
    Map {
        /// Keeps the file open (directory syncs, truncation).
        _file: File,
        /// The whole segment, mapped.
        map: Mapping,
        /// The flush instruction chosen at start-up.
        flush: FlushInstr,
    },
    /// `memory` mode: plain memory, nothing persists.
    Mem(Vec<u8>),
}

/// A segment in use by the log.
pub(crate) struct Segment {
    /// Its validated header.
    pub header: SegmentHeader,
    /// Its file (`None` in memory mode).
    pub path: Option<PathBuf>,
    /// Where its bytes are.
    pub backing: Backing,
    /// Byte offset of each record; record `i` has position `header.base_pos + i`.
    pub offsets: Vec<u32>,
    /// End of the last record: where the next one goes.
    pub write_off: u64,
    /// Mapped backing: bytes before this offset have been flushed.
    pub flushed_off: u64,
    /// File backing: records appended but not yet written to the file, which start at
    /// `pending_off` (the file holds everything before). Appenders copy their record
    /// here under the log's lock and the syncer writes the whole batch with one
    /// `pwrite` before its fdatasync: one system call per group commit instead of one
    /// per append, and a lock held for a memcpy instead of a system call.
    pending: Vec<u8>,
    pending_off: u64,
    /// File backing: bytes from `pending_off` (or `write_off`) to here are zeros
    /// written to the file, not just preallocated (see [`ZERO_AHEAD`]).
    zeroed_to: u64,
}

/// Payloads of at least this size skip `pending` (a second copy would cost more than
/// the system call it saves).
const DIRECT_WRITE: usize = 64 * 1024;

/// Zeros are written this far ahead of the last record (fsync mode), so that records
/// overwrite blocks the filesystem already holds as written. A preallocated segment's
/// blocks are "unwritten" extents: the first write into each converts it, a metadata
/// change, and an fdatasync that carries one must also write that metadata (a journal
/// commit on a journalled ext4; this VM's ext4 has no journal, and its fdatasync writes
/// the changed extent blocks and inode): with 4 KiB records that was every fdatasync,
/// about 1.5 times as slow as one that only writes data (measured on ext4 here). Writing zeros ahead converts a quarter
/// MiB at once, in the same fdatasync as the records before it; the price is that
/// every log byte is written twice. So only batches up to [`ZERO_AHEAD_MAX_BATCH`]
/// bytes, which a journal commit slows most, write zeros ahead; larger batches (many
/// appenders with big records) write into the preallocated blocks (with 64 appenders
/// of 4 KiB records the zeros cost a third of the throughput).
const ZERO_AHEAD: u64 = 256 * 1024;
const ZERO_AHEAD_MAX_BATCH: usize = 16 * 1024;

/// Mapped backing: payloads from this size on are copied with non-temporal stores (see
/// [`copy_streaming`]). Measured here (store-bench, mapped mode, p50): 4 KiB 0.73-1.16
/// us streamed against 0.96-1.67 us copied and flushed; 1-2 KiB 0.55-0.77 against
/// 0.36-0.57 (below ~4 KiB the second fence costs more than the flushes it saves).
const STREAM_FROM: usize = 4096;

/// `pending` is written out when it reaches this size, even without a sync.
const PENDING_LIMIT: usize = 1 << 20;

/// The file name of segment `index`.
pub(crate) fn segment_file_name(index: u64) -> String {
    format!("seg-{index:016x}.log")
}

/// Parses a segment file name back to its index.
pub(crate) fn parse_segment_file_name(name: &str) -> Option<u64> {
    let hex = name.strip_prefix("seg-")?.strip_suffix(".log")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// The file name a trimmed segment `index` is kept under for recycling.
pub(crate) fn spare_file_name(index: u64) -> String {
    format!("{}.spare", segment_file_name(index))
}

/// Parses a spare's file name back to the index of the segment it was.
pub(crate) fn parse_spare_file_name(name: &str) -> Option<u64> {
    parse_segment_file_name(name.strip_suffix(".spare")?)
}

/// `fsync` on a directory, so that created, renamed and removed entries persist.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir).map_err(|e| StoreError::io("open directory", dir, e))?;
    d.sync_all().map_err(|e| StoreError::io("fsync directory", dir, e))
}

/// Reserves `len` bytes for `file` (so later writes cannot hit ENOSPC).
pub(crate) fn preallocate(file: &File, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
        // Filesystems without fallocate: size the file at least.
        return file.set_len(len);
    }
    Err(e)
}

/// `pwritev` of all of `parts` at `off`, retrying short writes.
fn pwritev_all(file: &File, mut off: u64, parts: &[&[u8]]) -> io::Result<()> {
    let mut iov: [libc::iovec; 4] = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; 4];
    assert!(parts.len() <= iov.len());
    let mut n = 0;
    for p in parts.iter().filter(|p| !p.is_empty()) {
        iov[n] = libc::iovec { iov_base: p.as_ptr() as *mut libc::c_void, iov_len: p.len() };
        n += 1;
    }
    let mut first = 0;
    while first < n {
        // SAFETY: every iovec points into a live borrowed slice for this call.
        let w = unsafe {
            libc::pwritev(file.as_raw_fd(), iov[first..n].as_ptr(), (n - first) as libc::c_int, off as libc::off_t)
        };
        if w < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if w == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "pwritev wrote 0 bytes"));
        }
        let mut w = w as usize;
        off += w as u64;
        while first < n && w >= iov[first].iov_len {
            w -= iov[first].iov_len;
            first += 1;
        }
        if first < n && w > 0 {
            // SAFETY: advancing within the same slice (w < iov_len).
            iov[first].iov_base = unsafe { iov[first].iov_base.cast::<u8>().add(w) }.cast();
            iov[first].iov_len -= w;
        }
    }
    Ok(())
}

static ZERO_CHUNK: [u8; 64 * 1024] = [0; 64 * 1024];

/// Writes zeros to `from..to` of `file`.
fn write_zeros(file: &File, from: u64, to: u64) -> io::Result<()> {
    let mut o = from;
    while o < to {
        let n = ((to - o) as usize).min(ZERO_CHUNK.len());
        file.write_all_at(&ZERO_CHUNK[..n], o)?;
        o += n as u64;
    }
    Ok(())
}

impl Segment {
    /// Creates segment file `index` in `dir` crash-safely: written and synced under a
    /// temporary name, then renamed, then the directory synced. A crash leaves either
    /// no segment or a whole one (stray `.tmp` files are removed at open).
    pub(crate) fn create_file(dir: &Path, header: &SegmentHeader) -> Result<(PathBuf, File)> {
        let path = dir.join(segment_file_name(header.index));
        let tmp = dir.join(format!("{}.tmp", segment_file_name(header.index)));
        let made = (|| {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(|e| StoreError::io("create segment", &tmp, e))?;
            preallocate(&f, header.segment_size).map_err(|e| StoreError::io("preallocate segment", &tmp, e))?;
            f.write_all_at(&header.encode(), 0).map_err(|e| StoreError::io("write segment header", &tmp, e))?;
            f.sync_all().map_err(|e| StoreError::io("fsync new segment", &tmp, e))?;
            std::fs::rename(&tmp, &path).map_err(|e| StoreError::io("rename new segment", &path, e))?;
            Ok(f)
        })();
        match made {
            Ok(f) => {
                sync_dir(dir)?;
                Ok((path, f))
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Makes the spare file `spare` (a trimmed segment's file, all its blocks written)
    /// segment `header.index` in `dir`, crash-safely: the new header (flagged
    /// [`SEG_RECYCLED`], with a new epoch, so that none of the old records validate) is
    /// written and synced under the spare's name, then the file is renamed and the
    /// directory synced. A crash leaves a spare or a whole segment.
    pub(crate) fn recycle_file(dir: &Path, spare: &Path, header: &SegmentHeader) -> Result<(PathBuf, File)> {
        debug_assert!(header.flags & SEG_RECYCLED != 0);
        let path = dir.join(segment_file_name(header.index));
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(spare)
            .map_err(|e| StoreError::io("open spare", spare, e))?;
        let len = f.metadata().map_err(|e| StoreError::io("stat spare", spare, e))?.len();
        if len != header.segment_size {
            return Err(StoreError::Invalid(format!(
                "spare {} is {len} bytes, not the segment size {}",
                spare.display(),
                header.segment_size
            )));
        }
        f.write_all_at(&header.encode(), 0).map_err(|e| StoreError::io("write segment header", spare, e))?;
        f.sync_data().map_err(|e| StoreError::io("fsync recycled segment", spare, e))?;
        std::fs::rename(spare, &path).map_err(|e| StoreError::io("rename recycled segment", &path, e))?;
        sync_dir(dir)?;
        Ok((path, f))
    }

    /// A fresh in-memory segment (memory mode).
    pub(crate) fn new_mem(header: SegmentHeader) -> Segment {
        let mut buf = vec![0u8; header.segment_size as usize];
        buf[..SEGMENT_HEADER_LEN].copy_from_slice(&header.encode());
        Segment {
            header,
            path: None,
            backing: Backing::Mem(buf),
            offsets: Vec::new(),
            write_off: SEGMENT_HEADER_LEN as u64,
            flushed_off: SEGMENT_HEADER_LEN as u64,
            pending: Vec::new(),
            pending_off: SEGMENT_HEADER_LEN as u64,
            zeroed_to: SEGMENT_HEADER_LEN as u64,
        }
    }

    /// Wraps an opened, recovered segment file.
    pub(crate) fn from_file(
        header: SegmentHeader,
        path: PathBuf,
        file: File,
        map: Option<(bool, FlushInstr)>,
        offsets: Vec<u32>,
        write_off: u64,
    ) -> Result<Segment> {
        let backing = match map {
            None => Backing::File(Arc::new(file)),
            Some((sync, flush)) => {
                let map = Mapping::map(&file, header.segment_size as usize, sync).map_err(|e| {
                    if sync {
                        StoreError::PmemUnavailable {
                            path: path.clone(),
                            reason: format!("mmap(MAP_SYNC|MAP_SHARED_VALIDATE) refused: {e}"),
                        }
                    } else {
                        StoreError::io("mmap segment", &path, e)
                    }
                })?;
                Backing::Map { _file: file, map, flush }
            }
        };
        Ok(Segment {
            header,
            path: Some(path),
            backing,
            offsets,
            write_off,
            flushed_off: write_off,
            pending: Vec::new(),
            pending_off: write_off,
            // A recycled file's blocks are all written: nothing to zero ahead.
            zeroed_to: if header.flags & SEG_RECYCLED != 0 { header.segment_size } else { write_off },
        })
    }

    /// The segment's file name for error messages.
    pub(crate) fn display_path(&self) -> PathBuf {
        self.path.clone().unwrap_or_else(|| PathBuf::from(format!("<memory segment {}>", self.header.index)))
    }

    /// Position of the first record.
    pub(crate) fn base_pos(&self) -> u64 {
        self.header.base_pos
    }

    /// One past the position of the last record.
    pub(crate) fn end_pos(&self) -> u64 {
        self.header.base_pos + self.offsets.len() as u64
    }

    /// Free bytes after the last record.
    pub(crate) fn room(&self) -> u64 {
        self.header.segment_size - self.write_off
    }

    /// Writes a record at the end. `hdr.crc` is computed here. Returns the offset.
    /// The commit word goes last: in memory after a release fence, in the file as the
    /// last bytes of one `pwrite` (its order on disk does not matter: the CRC decides).
    pub(crate) fn write_record(&mut self, mut hdr: RecordHeader, payload: &[u8]) -> Result<u64> {
        let off = self.write_off;
        let mut hb = hdr.encode();
        hdr.crc = record_crc(self.header.epoch, &hb, payload);
        hb[48..52].copy_from_slice(&hdr.crc.to_le_bytes());
        let pad = (pad8(payload.len() as u64) - payload.len() as u64) as usize;
        let mut tail = [0u8; 16];
        tail[pad..pad + COMMIT_LEN].copy_from_slice(&commit_word(hdr.crc).to_le_bytes());
        let tail = &tail[..pad + COMMIT_LEN];
        let size = (RECORD_HEADER_LEN + payload.len() + tail.len()) as u64;
        debug_assert!(off + size <= self.header.segment_size);
        // Mapped backing: where the bytes still to flush start, when this write
        // flushed everything before its commit word itself.
        let mut flushed_to = None;
        match &mut self.backing {
            Backing::File(_) if payload.len() >= DIRECT_WRITE => {
                self.flush_pending()?;
                let (f, path) = self.file()?;
                pwritev_all(f, off, &[&hb, payload, tail]).map_err(|e| StoreError::io("write record", path, e))?;
                self.pending_off = off + size;
            }
            Backing::File(_) => {
                if self.pending_off + self.pending.len() as u64 != off {
                    self.flush_pending()?;
                    self.pending_off = off;
                }
                self.pending.extend_from_slice(&hb);
                self.pending.extend_from_slice(payload);
                self.pending.extend_from_slice(tail);
                if self.pending.len() >= PENDING_LIMIT {
                    self.flush_pending()?;
                }
            }
            Backing::Map { map, flush, .. } if payload.len() >= STREAM_FROM => {
                // Header, head and tail of the payload and padding are flushed here, the
                // payload's aligned middle streamed: all of it ordered by one fence
                // before the commit word, which the next sync flushes and fences.
                let dst = map.as_mut_slice();
                let (o, p) = (off as usize, off as usize + RECORD_HEADER_LEN);
                let pad = tail.len() - COMMIT_LEN;
                let commit = p + payload.len() + pad;
                dst[o..p].copy_from_slice(&hb);
                let streamed = copy_streaming(&mut dst[p..p + payload.len()], payload);
                dst[commit - pad..commit].copy_from_slice(&ZEROS[..pad]);
                flush.flush(&dst[(self.flushed_off.min(off) as usize)..p + streamed.start]);
                flush.flush(&dst[p + streamed.end..commit]);
                fence();
                dst[commit..commit + COMMIT_LEN].copy_from_slice(&tail[pad..]);
                flushed_to = Some(commit as u64);
            }
            Backing::Map { map, .. } => write_mem(map.as_mut_slice(), off as usize, &hb, payload, tail),
            Backing::Mem(buf) => write_mem(buf, off as usize, &hb, payload, tail),
        }
        self.offsets.push(off as u32);
        self.write_off = off + size;
        self.flushed_off = flushed_to.unwrap_or(self.flushed_off.min(off));
        Ok(off)
    }

    /// Reads `buf.len()` bytes at `off`.
    pub(crate) fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        match &self.backing {
            // Records are whole in `pending` or whole in the file.
            Backing::File(_) if off >= self.pending_off && !self.pending.is_empty() => {
                let from = (off - self.pending_off) as usize;
                let src = self.pending.get(from..from + buf.len()).ok_or_else(|| {
                    StoreError::Invalid(format!("read of {} bytes at {off} past the written end", buf.len()))
                })?;
                buf.copy_from_slice(src);
                Ok(())
            }
            Backing::File(f) => f
                .read_exact_at(buf, off)
                .map_err(|e| StoreError::io("read record", self.path.as_deref().unwrap_or(Path::new("")), e)),
            Backing::Map { map, .. } => {
                buf.copy_from_slice(&map.as_slice()[off as usize..off as usize + buf.len()]);
                Ok(())
            }
            Backing::Mem(m) => {
                buf.copy_from_slice(&m[off as usize..off as usize + buf.len()]);
                Ok(())
            }
        }
    }

    /// Zeroes bytes `from..to` (not yet durable: follow with [`Segment::sync`]).
    pub(crate) fn zero(&mut self, from: u64, to: u64) -> Result<()> {
        if from >= to {
            return Ok(());
        }
        self.flush_pending()?;
        match &mut self.backing {
            Backing::File(f) => write_zeros(f, from, to)
                .map_err(|e| StoreError::io("zero range", self.path.as_deref().unwrap_or(Path::new("")), e))?,
            Backing::Map { map, flush, .. } => {
                let r = &mut map.as_mut_slice()[from as usize..to as usize];
                r.fill(0);
                // Flushed now, fenced by the next sync (same thread, under the lock).
                flush.flush(r);
            }
            Backing::Mem(m) => m[from as usize..to as usize].fill(0),
        }
        Ok(())
    }

    /// For a mapped segment: flushes what was written since the last flush, up to
    /// `upto` bytes (the end of the data to persist), and fences. One fence per batch.
    pub(crate) fn persist_mapped(&mut self, upto: u64) {
        if let Backing::Map { map, flush, .. } = &self.backing {
            let from = self.flushed_off.min(upto) as usize;
            flush.flush(&map.as_slice()[from..upto as usize]);
            fence();
        }
        if matches!(self.backing, Backing::Map { .. }) {
            self.flushed_off = upto;
        }
    }

    /// The file and path of a file-backed segment.
    fn file(&self) -> Result<(&File, &Path)> {
        match (&self.backing, self.path.as_deref()) {
            (Backing::File(f), Some(path)) => Ok((f, path)),
            _ => Err(StoreError::Invalid(format!("segment {} is not a file", self.header.index))),
        }
    }

    /// Writes the records buffered in `pending` to the file (one `pwrite`). Called under
    /// the log's lock before every fdatasync, before writes elsewhere in the file and
    /// when the buffer grows past [`PENDING_LIMIT`].
    pub(crate) fn flush_pending(&mut self) -> Result<()> {
        // Field by field (not `self.file()`): the fields below change while these are
        // borrowed. Other backings buffer nothing.
        let (Backing::File(f), Some(path)) = (&self.backing, self.path.as_deref()) else {
            return Ok(());
        };
        let batch = self.pending.len();
        if batch > 0 {
            pwritev_all(f, self.pending_off, &[&self.pending]).map_err(|e| StoreError::io("write records", path, e))?;
            self.pending_off += batch as u64;
            self.pending.clear();
        }
        // Keep zeros written ahead of small batches (see ZERO_AHEAD).
        let ahead = self.pending_off + ZERO_AHEAD / 2 > self.zeroed_to && self.zeroed_to < self.header.segment_size;
        if ahead && (1..=ZERO_AHEAD_MAX_BATCH).contains(&batch) {
            let from = self.zeroed_to.max(self.pending_off);
            let to = (from + ZERO_AHEAD).min(self.header.segment_size);
            write_zeros(f, from, to).map_err(|e| StoreError::io("zero ahead of the log", path, e))?;
            self.zeroed_to = to;
        }
        Ok(())
    }

    /// Makes everything written so far durable, per the backing (write `pending` and
    /// fdatasync, flush + fence, or nothing). Runs under the log's lock.
    pub(crate) fn sync(&mut self) -> Result<()> {
        match &self.backing {
            Backing::File(_) => {
                self.flush_pending()?;
                let (f, path) = self.file()?;
                super::fault::sync_data(f, path).map_err(|e| StoreError::io("fdatasync", path, e))
            }
            Backing::Map { .. } => {
                self.persist_mapped(self.write_off);
                Ok(())
            }
            Backing::Mem(_) => Ok(()),
        }
    }

    /// The file handle for a sync done outside the lock (file backing only).
    pub(crate) fn file_for_sync(&self) -> Option<Arc<File>> {
        match &self.backing {
            Backing::File(f) => Some(f.clone()),
            _ => None,
        }
    }

    /// Start and length of the segment's memory, when it has memory (mapped or memory
    /// mode).
    pub(crate) fn memory(&self) -> Option<(*mut u8, usize)> {
        match &self.backing {
            Backing::File(_) => None,
            Backing::Map { map, .. } => Some((map.as_ptr(), self.header.segment_size as usize)),
            Backing::Mem(m) => Some((m.as_ptr() as *mut u8, m.len())),
        }
    }
}

/// Copies a record into memory: header, payload and padding, a release fence, then the
/// commit word, so a concurrent reader of the memory never sees the commit word before
/// the rest.
fn write_mem(dst: &mut [u8], off: usize, hb: &[u8], payload: &[u8], tail: &[u8]) {
    let mut o = off;
    dst[o..o + hb.len()].copy_from_slice(hb);
    o += hb.len();
    dst[o..o + payload.len()].copy_from_slice(payload);
    o += payload.len();
    let pad = tail.len() - COMMIT_LEN;
    dst[o..o + pad].copy_from_slice(&ZEROS[..pad]);
    o += pad;
    atomic::fence(Ordering::Release);
    dst[o..o + COMMIT_LEN].copy_from_slice(&tail[pad..]);
}

impl Drop for Segment {
    /// Writes what is still buffered, so that a log closed without a final sync leaves
    /// its last appends in the file, as if they had been written at once (they were
    /// never reported durable; recovery keeps whatever the kernel kept).
    fn drop(&mut self) {
        let _ = self.flush_pending();
    }
}
