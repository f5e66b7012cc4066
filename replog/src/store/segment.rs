//! One segment: a preallocated file (or memory block) holding a header and records,
//! and the three ways to write it (pwrite, mapped memcpy + flush, plain memory).

use super::error::{Result, StoreError};
use super::format::{
    commit_word, pad8, record_crc, RecordHeader, SegmentHeader, COMMIT_LEN, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN,
    ZEROS,
};
use super::persist::{fence, FlushInstr, Mapping};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{self, Ordering};
use std::sync::Arc;

/// Where a segment's bytes live and how they are written.
pub(crate) enum Backing {
    /// `fsync` mode: `pwritev`/`pread` on the file; durable after `fdatasync`.
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
}

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
        Ok(Segment { header, path: Some(path), backing, offsets, write_off, flushed_off: write_off })
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
    /// last bytes of one `pwritev` (its order on disk does not matter: the CRC decides).
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
        match &mut self.backing {
            Backing::File(f) => {
                let path = self.path.as_deref().unwrap_or(Path::new(""));
                pwritev_all(f, off, &[&hb, payload, tail]).map_err(|e| StoreError::io("write record", path, e))?;
            }
            Backing::Map { map, .. } => write_mem(map.as_mut_slice(), off as usize, &hb, payload, tail),
            Backing::Mem(buf) => write_mem(buf, off as usize, &hb, payload, tail),
        }
        self.offsets.push(off as u32);
        self.write_off = off + size;
        self.flushed_off = self.flushed_off.min(off);
        Ok(off)
    }

    /// Reads `buf.len()` bytes at `off`.
    pub(crate) fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        match &self.backing {
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
        match &mut self.backing {
            Backing::File(f) => {
                let mut o = from;
                while o < to {
                    let n = ((to - o) as usize).min(ZERO_CHUNK.len());
                    f.write_all_at(&ZERO_CHUNK[..n], o)
                        .map_err(|e| StoreError::io("zero range", self.path.as_deref().unwrap_or(Path::new("")), e))?;
                    o += n as u64;
                }
            }
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

    /// Makes everything written so far durable, per the backing (fdatasync, flush +
    /// fence, or nothing). Runs under the log's lock.
    pub(crate) fn sync(&mut self) -> Result<()> {
        match &self.backing {
            Backing::File(f) => {
                let path = self.path.as_deref().unwrap_or(Path::new(""));
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
