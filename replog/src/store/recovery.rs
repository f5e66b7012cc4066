//! Recovery at open: scan every segment, keep the longest valid prefix, truncate a torn
//! tail, and refuse a log whose middle is corrupt.
//!
//! # Rules
//!
//! Records are scanned in order; each must validate (see [`super::format`]) with the
//! next expected position. The scan of a segment stops at the first record that does
//! not, at the end of the segment, or at an end marker (left by a suffix truncation).
//!
//! - A segment header that does not validate: [`StoreError::CorruptHeader`]. Segments are
//!   created under a temporary name and renamed when whole, so a crash never leaves a
//!   torn header under a segment's name.
//! - A sealed segment (one with a successor) was made durable in full before its
//!   successor was created. So if its scan stopped before the position its successor
//!   starts at, or valid records follow the stop point: [`StoreError::Corrupt`].
//! - In the last segment, writes after the last completed sync may have reached the disk
//!   in any order (page writeback, cache-line eviction), so an invalid record followed
//!   by valid ones is not by itself corruption. Each record carries `durable_hint`, the
//!   position known durable when it was written. If a valid record after the stop point
//!   says the stopped-at position had been durable, that record was acknowledged and is
//!   now lost: [`StoreError::Corrupt`]. Otherwise the stop point is a torn tail: the
//!   rest of the segment is zeroed (and synced) and appends resume there.
//! - An end marker ends the log: the rest of its segment is zeroed and later segments
//!   are removed (finishing an interrupted truncation).
//!
//! - A recycled segment ([`super::format::SEG_RECYCLED`]) holds an earlier incarnation's
//!   bytes after its records; they never validate. Repair zeroes only what follows the
//!   end of the log and validates under the segment's epoch (records cut after a torn
//!   one or an end marker), not the stale bytes: a torn record there is left in place,
//!   as harmless as the stale bytes around it, and is not reported as a torn tail.
//! - `seg-<index>.log.spare` files are trimmed segments kept for recycling; recovery
//!   lists them and never reads them as part of the log.
//!
//! Limit: damage to the last records that no later record vouches for is
//! indistinguishable from a torn write; it is truncated like one.

use super::error::{Result, StoreError};
use super::format::{check_record, RecordHeader, RecordKind, SegmentHeader, SEGMENT_HEADER_LEN, SEG_RECYCLED};
use super::segment::{parse_segment_file_name, parse_spare_file_name, preallocate, sync_dir};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// One segment as found on disk, validated and repaired.
pub(crate) struct FoundSegment {
    pub header: SegmentHeader,
    pub path: PathBuf,
    pub file: File,
    pub offsets: Vec<u32>,
    pub write_off: u64,
}

/// What recovery found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segments kept.
    pub segments: usize,
    /// Records recovered.
    pub records: u64,
    /// Where a torn tail was cut (segment file, byte offset), if one was.
    pub torn_tail: Option<(PathBuf, u64)>,
    /// Segment files removed because they followed an end marker.
    pub removed_segments: usize,
}

enum Stop {
    /// A record did not validate (or zeroes: the normal end of data).
    Invalid(&'static str),
    /// Not enough room left for another record.
    Full,
    /// An end marker at this offset.
    EndMarker,
}

struct Scan {
    offsets: Vec<u32>,
    stop_off: usize,
    stop: Stop,
    /// Valid records after the stop point: (offset, durable_hint).
    later: Vec<(usize, u64)>,
    /// One past the last non-zero byte of the segment.
    last_nonzero: usize,
}

fn scan(img: &[u8], h: &SegmentHeader) -> Scan {
    let mut offsets = Vec::new();
    let mut off = SEGMENT_HEADER_LEN;
    let mut pos = h.base_pos;
    let (stop_off, stop) = loop {
        if off + 64 > img.len() {
            break (off, Stop::Full);
        }
        match check_record(img, off, h.epoch, Some(pos)) {
            Ok((rh, size)) => {
                if rh.kind == RecordKind::End as u16 {
                    break (off, Stop::EndMarker);
                }
                offsets.push(off as u32);
                off += size;
                pos += 1;
            }
            Err(f) => break (off, Stop::Invalid(f.as_str())),
        }
    };
    let mut later = Vec::new();
    if !matches!(stop, Stop::EndMarker) {
        valid_records_from(img, stop_off + 8, h.epoch, |o, rh, _| later.push((o, rh.durable_hint)));
    }
    let last_nonzero = img.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    Scan { offsets, stop_off, stop, later, last_nonzero }
}

/// Calls `f(offset, header, size)` for every record at or after `from` (8-byte aligned
/// offsets) that validates under `epoch`, at any position.
fn valid_records_from(img: &[u8], from: usize, epoch: u64, mut f: impl FnMut(usize, &RecordHeader, usize)) {
    let mut o = from;
    while o + 64 <= img.len() {
        // Skip zeroes fast: a record's first non-zero byte is at most its byte 5 (the
        // kind field), so no record starts more than 5 bytes before the next non-zero
        // byte.
        match img[o..].iter().position(|&b| b != 0) {
            None => break,
            Some(z) => o = (o + z.saturating_sub(5)) & !7,
        }
        if o + 64 > img.len() {
            break;
        }
        match check_record(img, o, epoch, None) {
            Ok((rh, size)) => {
                f(o, &rh, size);
                o += size;
            }
            Err(_) => o += 8,
        }
    }
}

/// Reads a whole segment file into memory (missing bytes of a short file read as zero).
fn read_image(file: &File, path: &Path, size: u64) -> Result<Vec<u8>> {
    let mut img = vec![0u8; size as usize];
    let mut off = 0usize;
    while off < img.len() {
        match file.read_at(&mut img[off..], off as u64) {
            Ok(0) => break,
            Ok(n) => off += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(StoreError::io("read segment", path, e)),
        }
    }
    Ok(img)
}

/// Scans, validates and repairs the segments in `dir`. Returns them oldest first.
/// Also returns the spare files found (`seg-<index>.log.spare`, kept for recycling).
pub(crate) fn recover(dir: &Path) -> Result<(Vec<FoundSegment>, Vec<PathBuf>, RecoveryReport)> {
    let mut names = Vec::new();
    let mut spares = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(|e| StoreError::io("read directory", dir, e))?;
    let mut removed_tmp = false;
    for ent in rd {
        let ent = ent.map_err(|e| StoreError::io("read directory", dir, e))?;
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with("seg-") && name.ends_with(".log.tmp") {
            // A segment whose creation did not finish: never acknowledged anything.
            std::fs::remove_file(ent.path())
                .map_err(|e| StoreError::io("remove unfinished segment", &ent.path(), e))?;
            removed_tmp = true;
            continue;
        }
        if let Some(idx) = parse_segment_file_name(name) {
            names.push((idx, ent.path()));
        } else if parse_spare_file_name(name).is_some() {
            spares.push(ent.path());
        }
    }
    if removed_tmp {
        sync_dir(dir)?;
    }
    names.sort();

    let mut report = RecoveryReport::default();
    let mut found: Vec<FoundSegment> = Vec::new();
    let mut scans: Vec<Scan> = Vec::new();
    let mut ended_at: Option<usize> = None;
    // The image of the last segment scanned (what repair looks at again).
    let mut last_img = Vec::new();
    for (idx, path) in &names {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| StoreError::io("open segment", path, e))?;
        let mut hb = [0u8; SEGMENT_HEADER_LEN];
        let mut got = 0;
        while got < hb.len() {
            match file.read_at(&mut hb[got..], got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(StoreError::io("read segment header", path, e)),
            }
        }
        let header = SegmentHeader::decode(&hb[..got])
            .map_err(|reason| StoreError::CorruptHeader { path: path.clone(), reason })?;
        if header.index != *idx {
            return Err(StoreError::CorruptHeader {
                path: path.clone(),
                reason: format!("header says segment {} but the file name says {idx}", header.index),
            });
        }
        if let Some(prev) = found.last() {
            if header.epoch <= prev.header.epoch {
                return Err(StoreError::CorruptHeader {
                    path: path.clone(),
                    reason: format!("epoch {} not above the previous segment's {}", header.epoch, prev.header.epoch),
                });
            }
        }
        let img = read_image(&file, path, header.segment_size)?;
        let sc = scan(&img, &header);
        last_img = img;
        let ended = matches!(sc.stop, Stop::EndMarker);
        found.push(FoundSegment {
            header,
            path: path.clone(),
            file,
            offsets: sc.offsets.clone(),
            write_off: sc.stop_off as u64,
        });
        scans.push(sc);
        if ended {
            ended_at = Some(found.len() - 1);
            break;
        }
    }

    // Segments after an end marker are discarded (newest first, so a crash in between
    // leaves a log that still ends at the marker).
    if let Some(i) = ended_at {
        let extra: Vec<_> = names[i + 1..].iter().rev().collect();
        for (_, p) in &extra {
            std::fs::remove_file(p).map_err(|e| StoreError::io("remove truncated segment", p, e))?;
        }
        if !extra.is_empty() {
            sync_dir(dir)?;
        }
        report.removed_segments = extra.len();
    }

    let n = found.len();
    for i in 0..n {
        let sc = &scans[i];
        let seg = &found[i];
        let expected = seg.header.base_pos + sc.offsets.len() as u64;
        let corrupt = |offset: usize, reason: String| StoreError::Corrupt {
            path: seg.path.clone(),
            offset: offset as u64,
            pos: expected,
            reason,
        };
        let why = match sc.stop {
            Stop::Invalid(w) => w,
            Stop::Full => "end of segment",
            Stop::EndMarker => "end marker",
        };
        if i + 1 < n {
            let next = &found[i + 1].header;
            if let Some(&(o, _)) = sc.later.first() {
                return Err(corrupt(
                    sc.stop_off,
                    format!("{why}, but a valid record follows at offset {o} in a sealed segment"),
                ));
            }
            if next.base_pos != expected {
                return Err(corrupt(
                    sc.stop_off,
                    format!(
                        "{why}; the segment holds positions up to {} but the next segment \
                         ({}) starts at {}",
                        expected - 1,
                        found[i + 1].path.display(),
                        next.base_pos
                    ),
                ));
            }
        } else if let Some(&(o, hint)) = sc.later.iter().find(|&&(_, hint)| hint >= expected) {
            return Err(corrupt(
                sc.stop_off,
                format!(
                    "{why}; the valid record at offset {o} was written after position {hint} \
                     was durable, so this record had been acknowledged"
                ),
            ));
        }
    }

    // Repair the last segment: zero whatever follows the end of the log (a torn tail,
    // or data after an end marker), and give a short file its full size back.
    if let Some(last) = found.last_mut() {
        let sc = &scans[n - 1];
        let keep_to = match sc.stop {
            // The marker itself stays until an append overwrites it.
            Stop::EndMarker => sc.stop_off + 64,
            _ => sc.stop_off,
        };
        let mut dirty = false;
        if last.header.flags & SEG_RECYCLED != 0 {
            // Only bytes that validate under this epoch could be taken for records
            // later; the earlier incarnation's never do (module docs).
            let mut end = keep_to;
            valid_records_from(&last_img, keep_to, last.header.epoch, |o, _, size| end = end.max(o + size));
            if end > keep_to {
                if !matches!(sc.stop, Stop::EndMarker) {
                    report.torn_tail = Some((last.path.clone(), sc.stop_off as u64));
                }
                let zeros = vec![0u8; end - keep_to];
                last.file
                    .write_all_at(&zeros, keep_to as u64)
                    .map_err(|e| StoreError::io("zero the end of a recycled segment", &last.path, e))?;
                dirty = true;
            }
        } else if sc.last_nonzero > keep_to {
            if !matches!(sc.stop, Stop::EndMarker) {
                report.torn_tail = Some((last.path.clone(), sc.stop_off as u64));
            }
            let zeros = vec![0u8; sc.last_nonzero - keep_to];
            last.file
                .write_all_at(&zeros, keep_to as u64)
                .map_err(|e| StoreError::io("zero torn tail", &last.path, e))?;
            dirty = true;
        }
        let len = last.file.metadata().map_err(|e| StoreError::io("stat segment", &last.path, e))?.len();
        if len < last.header.segment_size {
            preallocate(&last.file, last.header.segment_size)
                .map_err(|e| StoreError::io("extend segment", &last.path, e))?;
            dirty = true;
        }
        if dirty {
            last.file.sync_all().map_err(|e| StoreError::io("fsync repaired segment", &last.path, e))?;
        }
    }
    report.segments = found.len();
    report.records = found.iter().map(|s| s.offsets.len() as u64).sum();
    spares.sort();
    Ok((found, spares, report))
}
