//! The segmented append log: append (with group commit), read, iterate, wait for the
//! tail, trim a prefix, truncate a suffix.

use super::error::{Result, StoreError};
use super::format::SEG_RECYCLED;
use super::format::{check_record, MAX_SEGMENT_SIZE, MIN_SEGMENT_SIZE, RECORD_HEADER_LEN};
use super::format::{max_payload, record_size, RecordHeader, RecordKind, SegmentHeader};
use super::persist::{FlushInstr, Mapping};
use super::recovery::{recover, RecoveryReport};
use super::segment::{preallocate, spare_file_name, sync_dir, Segment};
use super::watch::{DirWatch, Verdict};
use super::{Durability, Mode, StoreConfig};
use parking_lot::{Mutex, MutexGuard};
use paxos::{Ballot, Position};
use std::collections::VecDeque;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A record read back from the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// What the record is.
    pub meta: RecordMeta,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// A record's header fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordMeta {
    /// Its log position.
    pub pos: Position,
    /// Its kind.
    pub kind: RecordKind,
    /// Its paxos slot (0 if not an entry).
    pub slot: u64,
    /// Its ballot (zero if not a paxos record).
    pub ballot: Ballot,
    /// Every position up to this one was durable when the record was written.
    pub durable_hint: Position,
}

/// Where a record lives: what a remote writer or a test needs to address it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordLocation {
    /// The segment's index.
    pub segment_index: u64,
    /// The segment's file (`None` in memory mode).
    pub path: Option<PathBuf>,
    /// Byte offset of the record in the segment.
    pub offset: u64,
    /// Total bytes of the record (header, payload, padding, commit word).
    pub size: u64,
}

/// The active segment's memory: the "log region" of the architecture, laid out as
/// documented in [`super::format`]. Valid while that segment stays active (until the log
/// rolls to a new segment, is truncated below it, or is dropped).
#[derive(Clone, Copy, Debug)]
pub struct LogRegion {
    /// Start of the segment (its header is at offset 0).
    pub ptr: NonNull<u8>,
    /// Length in bytes (the segment size).
    pub len: usize,
    /// The segment's index.
    pub segment_index: u64,
    /// The segment's epoch (bound into every record's CRC).
    pub epoch: u64,
    /// Position of the segment's first record.
    pub base_pos: Position,
    /// Offset where the next record will be written.
    pub write_offset: u64,
}

struct Inner {
    /// Oldest first; the last one is active. Never empty.
    segs: VecDeque<Segment>,
    /// The position the next record gets.
    next_pos: Position,
    /// Every position `<=` this is durable (per the mode).
    durable: Position,
    /// An fdatasync is running outside the lock (fsync mode group commit).
    syncing: bool,
    /// Bumped by suffix truncation, so a sync that started before it cannot mark
    /// re-written positions durable.
    gen: u64,
    /// Set by a fatal error; every later call fails with it.
    poison: Option<String>,
    /// Group commits started (fsync mode); the running one, if `syncing`, is this one.
    sync_id: u64,
    /// The last position the running group commit covers (`Position::MAX` until it
    /// has written its batch: everything appended before then is in it).
    sync_target: Position,
    /// Appenders parked on [`Log::done`]`[id % 2]`, waiting for group commit `id`: the
    /// running one (their record is in its batch) or the next.
    parked: [u32; 2],
    /// Epoch of the newest segment.
    last_epoch: u64,
    /// Trimmed segments' files kept for reuse (fsync mode; at most `Log::recycle`).
    spares: Vec<PathBuf>,
}

impl Inner {
    fn active(&mut self) -> &mut Segment {
        self.segs.back_mut().expect("the log always has a segment")
    }

    fn check(&self) -> Result<()> {
        match &self.poison {
            Some(m) => Err(StoreError::Poisoned(m.clone())),
            None => Ok(()),
        }
    }

    fn first_pos(&self) -> Position {
        self.segs.front().expect("a segment").base_pos()
    }

    fn seg_of(&self, pos: Position) -> Result<usize> {
        if pos < self.first_pos() || pos >= self.next_pos {
            return Err(StoreError::OutOfRange { pos, first: self.first_pos(), next: self.next_pos });
        }
        Ok(self.segs.partition_point(|s| s.base_pos() <= pos) - 1)
    }
}

/// A segmented append log. `Sync`: share it between threads with `Arc`; concurrent
/// appenders share fsyncs (group commit).
pub struct Log {
    inner: Mutex<Inner>,
    /// Mirrors `Inner::durable`, so that woken waiters need not take `inner`.
    durable_pub: AtomicU64,
    /// Bumped (under `inner`) whenever durability advances, a sync ends, the store is
    /// poisoned or truncated: what tail waiters ([`Log::wait_for`]) wait for, as a
    /// futex word.
    events: AtomicU32,
    /// Threads inside [`Log::wait_event`]: `publish` skips the wake-up when there are
    /// none (the common case of one appender).
    sleepers: AtomicU32,
    /// Futex words of group-commit appenders (fsync mode): those waiting for commit
    /// `id` sleep on `done[id % 2]`. When commit `id` ends, its word changes and one
    /// `FUTEX_WAKE` wakes all of them (and nobody waiting for the next one, but one of
    /// those, woken alone, to run it). Changed only under `inner`.
    done: [AtomicU32; 2],
    mode: Mode,
    segment_size: u64,
    dir: Option<PathBuf>,
    flush: Option<FlushInstr>,
    /// Trimmed segments kept for reuse at most ([`StoreConfig::recycle_segments`];
    /// 0 outside fsync mode).
    recycle: usize,
    report: RecoveryReport,
    /// Removals and renames in the data directory (fsync mode), drained by the syncer.
    /// Made at the first group commit, not at open: closing an inotify descriptor waits
    /// for an SRCU grace period (milliseconds), which a log opened only to be read (as
    /// recovery tests do thousands of times) should not pay.
    watch: Mutex<Option<DirWatch>>,
}

fn new_epoch(prev: u64) -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    now.max(prev + 1)
}

/// Of the spare files recovery found, keeps up to `recycle` whole ones (the segment
/// size, a readable header) and removes the others. Raises `last_epoch` to the kept
/// ones' epochs, so that a recycled segment's epoch is above any its file had.
fn keep_spares(
    dir: &Path,
    found: Vec<PathBuf>,
    recycle: usize,
    segment_size: u64,
    last_epoch: &mut u64,
) -> Result<Vec<PathBuf>> {
    let mut kept = Vec::new();
    let mut removed = false;
    for p in found {
        let header = (kept.len() < recycle)
            .then(|| {
                let f = std::fs::File::open(&p).ok()?;
                let mut b = [0u8; super::format::SEGMENT_HEADER_LEN];
                std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, 0).ok()?;
                let len = f.metadata().ok()?.len();
                SegmentHeader::decode(&b).ok().filter(|_| len == segment_size)
            })
            .flatten();
        match header {
            Some(h) => {
                *last_epoch = (*last_epoch).max(h.epoch);
                kept.push(p);
            }
            None => {
                std::fs::remove_file(&p).map_err(|e| StoreError::io("remove spare segment", &p, e))?;
                removed = true;
            }
        }
    }
    if removed {
        sync_dir(dir)?;
    }
    Ok(kept)
}

/// Checks that `dir` can hold `MAP_SYNC` mappings (a DAX filesystem) by mapping a
/// probe file; the refusal (EOPNOTSUPP on ext4/tmpfs) is the answer.
fn probe_pmem(dir: &Path) -> Result<()> {
    let probe = dir.join(".pmem-probe");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&probe)
        .map_err(|e| StoreError::io("create pmem probe", &probe, e))?;
    let r = preallocate(&f, 4096).map_err(|e| StoreError::io("size pmem probe", &probe, e)).and_then(|()| {
        Mapping::map(&f, 4096, true).map_err(|e| StoreError::PmemUnavailable {
            path: dir.to_path_buf(),
            reason: format!(
                "mmap with MAP_SYNC|MAP_SHARED_VALIDATE refused ({e}): the directory is \
                     not on a DAX (persistent-memory) filesystem; refusing pmem mode \
                     (choose fsync or memory explicitly)"
            ),
        })
    });
    drop(f);
    let _ = std::fs::remove_file(&probe);
    r.map(drop)
}

impl Log {
    /// Opens (recovering) or creates the log in `dir` with `cfg`. In memory mode `dir`
    /// is not touched and the log starts empty.
    pub fn open(dir: impl AsRef<Path>, cfg: StoreConfig) -> Result<Log> {
        let dir = dir.as_ref();
        let size = cfg.segment_size;
        if !(MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&size) || size & 7 != 0 {
            return Err(StoreError::Invalid(format!(
                "segment size {size} must be a multiple of 8 in [{MIN_SEGMENT_SIZE}, \
                 {MAX_SEGMENT_SIZE}]"
            )));
        }
        let flush = match cfg.mode {
            Mode::Pmem | Mode::MappedNotDurable => {
                Some(FlushInstr::detect().ok_or_else(|| StoreError::PmemUnavailable {
                    path: dir.to_path_buf(),
                    reason: "this CPU has no cache-line flush instruction".into(),
                })?)
            }
            _ => None,
        };
        let mut report = RecoveryReport::default();
        let mut segs = VecDeque::new();
        let mut last_epoch = 0;
        let recycle = if cfg.mode == Mode::Fsync { cfg.recycle_segments } else { 0 };
        let mut spares = Vec::new();
        if cfg.mode == Mode::Memory {
            last_epoch = new_epoch(0);
            segs.push_back(Segment::new_mem(SegmentHeader::new(last_epoch, 0, 1, size)));
        } else {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::io("create directory", dir, e))?;
            if cfg.mode == Mode::Pmem {
                probe_pmem(dir)?;
            }
            let map = flush.map(|f| (cfg.mode == Mode::Pmem, f));
            let (found, found_spares, rep) = recover(dir)?;
            report = rep;
            for f in found {
                last_epoch = f.header.epoch;
                segs.push_back(Segment::from_file(f.header, f.path, f.file, map, f.offsets, f.write_off)?);
            }
            spares = keep_spares(dir, found_spares, recycle, size, &mut last_epoch)?;
            if segs.is_empty() {
                last_epoch = new_epoch(0);
                let h = SegmentHeader::new(last_epoch, 0, 1, size);
                let (path, file) = Segment::create_file(dir, &h)?;
                segs.push_back(Segment::from_file(h, path, file, map, Vec::new(), 64)?);
            }
        }
        let next_pos = segs.back().expect("a segment").end_pos();
        let mut inner = Inner {
            segs,
            next_pos,
            durable: 0,
            syncing: false,
            gen: 0,
            poison: None,
            sync_id: 0,
            sync_target: 0,
            parked: [0, 0],
            last_epoch,
            spares,
        };
        // What recovery read may still be only in the page cache (the previous process
        // died before its fsync): make it durable before vouching for it in hints.
        inner.active().sync()?;
        inner.durable = next_pos - 1;
        Ok(Log {
            inner: Mutex::new(inner),
            durable_pub: AtomicU64::new(next_pos - 1),
            events: AtomicU32::new(0),
            sleepers: AtomicU32::new(0),
            done: [AtomicU32::new(0), AtomicU32::new(0)],
            mode: cfg.mode,
            segment_size: size,
            dir: (cfg.mode != Mode::Memory).then(|| dir.to_path_buf()),
            flush,
            recycle,
            report,
            watch: Mutex::new(None),
        })
    }

    /// An empty log in memory (memory mode).
    pub fn memory(segment_size: u64) -> Result<Log> {
        Log::open("", StoreConfig::new(Mode::Memory).with_segment_size(segment_size))
    }

    /// How the log was opened.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The durability actually in force.
    pub fn durability(&self) -> Durability {
        self.mode.durability()
    }

    /// Whether an acknowledged append survives power loss in this mode.
    pub fn is_durable(&self) -> bool {
        self.mode.is_durable()
    }

    /// The flush instruction in use (mapped modes).
    pub fn flush_instruction(&self) -> Option<FlushInstr> {
        self.flush
    }

    /// The segment size.
    pub fn segment_size(&self) -> u64 {
        self.segment_size
    }

    /// What recovery found when the log was opened.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.report
    }

    /// The first position held (positions below were trimmed).
    pub fn first_pos(&self) -> Position {
        self.inner.lock().first_pos()
    }

    /// The position the next append gets; the log holds `first_pos()..next_pos()`.
    pub fn next_pos(&self) -> Position {
        self.inner.lock().next_pos
    }

    /// Every position `<=` this is durable (per the mode).
    pub fn durable_pos(&self) -> Position {
        self.inner.lock().durable
    }

    /// The largest payload one record can carry.
    pub fn max_payload(&self) -> u64 {
        max_payload(self.segment_size)
    }

    /// Appends `payload` as a data record and returns its position once it is durable
    /// per the mode (in `fsync` mode, after the fdatasync covering it returned; that
    /// fdatasync is shared with every concurrent appender).
    pub fn append(&self, payload: &[u8]) -> Result<Position> {
        let mut g = self.inner.lock();
        let pos = self.write(&mut g, RecordKind::Data, 0, Ballot::ZERO, payload)?;
        self.make_durable(g, pos)?;
        Ok(pos)
    }

    /// Appends without waiting for durability; [`Log::sync`] makes it durable.
    pub fn append_buffered(&self, payload: &[u8]) -> Result<Position> {
        let mut g = self.inner.lock();
        self.write(&mut g, RecordKind::Data, 0, Ballot::ZERO, payload)
    }

    /// Appends a record of any kind but [`RecordKind::End`], without waiting.
    pub fn append_record(&self, kind: RecordKind, slot: u64, ballot: Ballot, payload: &[u8]) -> Result<Position> {
        if kind == RecordKind::End {
            return Err(StoreError::Invalid("end markers are written by truncate_suffix".into()));
        }
        let mut g = self.inner.lock();
        self.write(&mut g, kind, slot, ballot, payload)
    }

    /// Makes every earlier append durable.
    pub fn sync(&self) -> Result<()> {
        let g = self.inner.lock();
        let upto = g.next_pos - 1;
        self.make_durable(g, upto)
    }

    fn poison(&self, g: &mut Inner, e: &StoreError) {
        if self.mode != Mode::Memory && g.poison.is_none() {
            g.poison = Some(e.poison_message());
        }
        drop(self.publish(g)); // wakes under the lock: not the group-commit path
    }

    /// Publishes `g.durable` and wakes every waiter it concerns: tail waiters, and
    /// any parked group-commit appender (they re-check; this is not the group-commit
    /// path, which is [`Log::end_group_commit`]). Called with `inner` held; dropping the
    /// result (best after releasing `inner`) does the group-commit wake-ups.
    fn publish(&self, g: &mut Inner) -> Wake<'_> {
        self.durable_pub.store(g.durable, Ordering::Release);
        let mut wake = Wake { words: &self.done, all: [false; 2], one: None };
        for p in 0..2 {
            self.wake_parked(g, p, &mut wake);
        }
        self.wake_tail_waiters();
        wake
    }

    /// Marks every appender parked on `done[p]` to be woken by `wake`.
    fn wake_parked(&self, g: &mut Inner, p: usize, wake: &mut Wake<'_>) {
        if g.parked[p] > 0 {
            self.done[p].fetch_add(1, Ordering::Release);
            wake.all[p] = true;
            g.parked[p] = 0;
        }
    }

    /// Wakes the threads in [`Log::wait_event`]. Called with `inner` held.
    fn wake_tail_waiters(&self) {
        // SeqCst on `events` and `sleepers` on both sides (Dekker): either a waiter sees
        // the new `events` before sleeping, or this sees the waiter and wakes it.
        self.events.fetch_add(1, Ordering::SeqCst);
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            futex::wake_all(&self.events);
        }
    }

    /// Sleeps until `events` moves past `seen` or `deadline` passes. Returns false on
    /// timeout.
    fn wait_event(&self, seen: u32, deadline: Option<Instant>) -> bool {
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        let moved = loop {
            if self.events.load(Ordering::SeqCst) != seen {
                break true;
            }
            let timeout = match deadline {
                None => None,
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => break false,
                },
            };
            futex::wait(&self.events, seen, timeout);
        };
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
        moved
    }

    fn write(&self, g: &mut Inner, kind: RecordKind, slot: u64, ballot: Ballot, payload: &[u8]) -> Result<Position> {
        g.check()?;
        let max = max_payload(self.segment_size);
        if payload.len() as u64 > max || payload.len() > u32::MAX as usize {
            return Err(StoreError::TooLarge { len: payload.len(), max });
        }
        if g.active().room() < record_size(payload.len() as u64) {
            self.roll(g)?;
        }
        let pos = g.next_pos;
        let hdr = RecordHeader {
            payload_len: payload.len() as u32,
            kind: kind as u16,
            flags: 0,
            pos,
            durable_hint: g.durable,
            slot,
            ballot_round: ballot.round,
            ballot_node: ballot.node,
            crc: 0,
            reserved: 0,
        };
        if let Err(e) = g.active().write_record(hdr, payload) {
            self.poison(g, &e);
            return Err(e);
        }
        g.next_pos += 1;
        if self.mode == Mode::Memory {
            g.durable = pos;
            drop(self.publish(g)); // no group-commit waiters in memory mode
        }
        Ok(pos)
    }

    /// Seals the active segment (durable in full) and starts a new one. A failure to
    /// create the new segment (for example ENOSPC) is returned without poisoning: the
    /// old segment stays active and nothing was written.
    fn roll(&self, g: &mut Inner) -> Result<()> {
        // Erase a leftover end marker (from a suffix truncation) at the write point: in
        // a sealed segment it would end the log at recovery.
        let sealed = g.active();
        let (w, size) = (sealed.write_off, sealed.header.segment_size);
        let zeroed = sealed.zero(w, (w + 64).min(size));
        if let Err(e) = zeroed.and_then(|()| g.active().sync()) {
            self.poison(g, &e);
            return Err(e);
        }
        g.durable = g.next_pos - 1;
        drop(self.publish(g)); // wakes under the lock: not the group-commit path
        let epoch = new_epoch(g.last_epoch);
        let index = g.active().header.index + 1;
        let mut h = SegmentHeader::new(epoch, index, g.next_pos, self.segment_size);
        let seg = match &self.dir {
            None => Segment::new_mem(h),
            Some(dir) => {
                let mut made = None;
                if let Some(spare) = g.spares.pop() {
                    let rh = SegmentHeader { flags: SEG_RECYCLED, ..h };
                    match Segment::recycle_file(dir, &spare, &rh) {
                        Ok(m) => (h, made) = (rh, Some(m)),
                        // Not reusable after all: a fresh segment instead (whose creation
                        // reports the error if the disk itself failed).
                        Err(_) => drop(std::fs::remove_file(&spare)),
                    }
                }
                let (path, file) = match made {
                    Some(m) => m,
                    None => Segment::create_file(dir, &h)?,
                };
                let map = self.flush.map(|f| (self.mode == Mode::Pmem, f));
                Segment::from_file(h, path, file, map, Vec::new(), 64)?
            }
        };
        g.last_epoch = epoch;
        g.segs.push_back(seg);
        Ok(())
    }

    /// Publishes the end of group commit `id`: wakes every appender parked for it (one
    /// `FUTEX_WAKE`), and one of those parked for the next, to run it.
    fn end_group_commit(&self, g: &mut Inner, id: u64) -> Wake<'_> {
        self.durable_pub.store(g.durable, Ordering::Release);
        let mut wake = Wake { words: &self.done, all: [false; 2], one: None };
        let (p, q) = ((id % 2) as usize, ((id + 1) % 2) as usize);
        self.wake_parked(g, p, &mut wake);
        if g.parked[q] > 0 {
            // Changed too, so that one parked but not yet asleep does not sleep through
            // it (it re-checks, as the one woken does).
            self.done[q].fetch_add(1, Ordering::Release);
            wake.one = Some(q);
            g.parked[q] -= 1;
        }
        self.wake_tail_waiters();
        wake
    }

    /// Waits until `pos` is durable. In fsync mode: one waiter runs fdatasync outside
    /// the lock for everything written so far; the others wait for it (group commit).
    fn make_durable<'a>(&'a self, mut g: MutexGuard<'a, Inner>, pos: Position) -> Result<()> {
        loop {
            g.check()?;
            if g.durable >= pos {
                return Ok(());
            }
            match self.mode {
                Mode::Memory => {
                    g.durable = g.next_pos - 1;
                }
                Mode::Pmem | Mode::MappedNotDurable => {
                    // Flush what was written since the last batch and fence, on this
                    // thread (a fence orders only its own thread's flushes).
                    g.active().sync().expect("mapped sync cannot fail");
                    g.durable = g.next_pos - 1;
                    drop(self.publish(&mut g)); // no group-commit waiters in mapped modes
                }
                Mode::Fsync => {
                    if g.syncing {
                        // Sleep without holding `inner` until the group commit that
                        // covers us (the running one, or else the next) ends, the store
                        // fails, or we are picked to run the next one.
                        let id = if pos <= g.sync_target { g.sync_id } else { g.sync_id + 1 };
                        let p = (id % 2) as usize;
                        g.parked[p] += 1;
                        let word = &self.done[p];
                        let seen = word.load(Ordering::Acquire);
                        drop(g);
                        futex::wait(word, seen, None);
                        if self.durable_pub.load(Ordering::Acquire) >= pos {
                            return Ok(());
                        }
                        g = self.inner.lock();
                        continue;
                    }
                    g.syncing = true;
                    g.sync_id += 1;
                    g.sync_target = Position::MAX;
                    let id = g.sync_id;
                    // The batch the appenders buffered goes to the file in one write,
                    // under the lock (a concurrent truncation must not race with it).
                    if let Err(e) = g.active().flush_pending() {
                        g.syncing = false;
                        self.poison(&mut g, &e);
                        return Err(e);
                    }
                    let target = g.next_pos - 1;
                    g.sync_target = target;
                    let gen = g.gen;
                    let active = g.active();
                    let file = active.file_for_sync().expect("fsync mode uses files");
                    let path = active.display_path();
                    let r = MutexGuard::unlocked(&mut g, || {
                        super::fault::sync_data(&file, &path)?;
                        // Synced data of a file no longer in the data directory (the
                        // directory was removed or replaced) is lost at the next start:
                        // it must not count as durable. The directory's inotify events
                        // say when to ask (see `watch`); only this syncer drains them.
                        let name = path.file_name().map_or(&[][..], |n| n.as_bytes());
                        let verdict = match (&self.dir, &mut *self.watch.lock()) {
                            (Some(dir), w) => w.get_or_insert_with(|| DirWatch::new(dir)).drain(name),
                            (None, _) => Verdict::Ask,
                        };
                        if verdict == Verdict::Untouched {
                            return Ok(());
                        }
                        match std::fs::symlink_metadata(&path) {
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(std::io::Error::new(
                                std::io::ErrorKind::NotFound,
                                "the segment file is gone from the data directory (was the directory removed?)",
                            )),
                            _ => Ok(()),
                        }
                    });
                    g.syncing = false;
                    match r {
                        Ok(()) => {
                            if g.gen == gen && target > g.durable {
                                g.durable = target;
                            }
                            let wake = self.end_group_commit(&mut g, id);
                            drop(g);
                            drop(wake);
                            return Ok(());
                        }
                        Err(e) => {
                            // Never retry: the kernel may have dropped the dirty pages,
                            // and a later "successful" fsync would report lost data as
                            // durable.
                            let e = StoreError::io("fdatasync", &path, e);
                            self.poison(&mut g, &e);
                            return Err(e);
                        }
                    }
                }
            }
        }
    }

    /// Reads the record at `pos`, verifying its checksum.
    pub fn read(&self, pos: Position) -> Result<Record> {
        let mut buf = Vec::new();
        let meta = self.read_into(pos, &mut buf)?;
        Ok(Record { meta, payload: buf })
    }

    /// Reads the record at `pos` into `buf` (replacing its contents with the payload),
    /// verifying its checksum. Reuse `buf` to read without allocating.
    pub fn read_into(&self, pos: Position, buf: &mut Vec<u8>) -> Result<RecordMeta> {
        let g = self.inner.lock();
        g.check()?;
        let si = g.seg_of(pos)?;
        let seg = &g.segs[si];
        let i = (pos - seg.base_pos()) as usize;
        let off = seg.offsets[i] as u64;
        // Records are contiguous: this one ends where the next starts (or at the write
        // point), so one read gets it whole.
        let end = seg.offsets.get(i + 1).map_or(seg.write_off, |&o| o as u64);
        let corrupt = |reason: &str| StoreError::Corrupt {
            path: seg.display_path(),
            offset: off,
            pos,
            reason: reason.to_string(),
        };
        buf.clear();
        buf.resize((end - off) as usize, 0);
        seg.read_at(off, buf)?;
        let (h, _) = check_record(buf, 0, seg.header.epoch, Some(pos)).map_err(|f| corrupt(f.as_str()))?;
        if record_size(h.payload_len as u64) != end - off {
            return Err(corrupt("record length does not match the record's place in the log"));
        }
        let kind = RecordKind::from_u16(h.kind).expect("validated kind");
        buf.drain(..RECORD_HEADER_LEN);
        buf.truncate(h.payload_len as usize);
        Ok(RecordMeta {
            pos,
            kind,
            slot: h.slot,
            ballot: Ballot::new(h.ballot_round, h.ballot_node),
            durable_hint: h.durable_hint,
        })
    }

    /// Iterates over the records at positions `from..to` (clamped to the log).
    pub fn iter(&self, from: Position, to: Position) -> LogIter<'_> {
        let g = self.inner.lock();
        LogIter { log: self, next: from.max(g.first_pos()), end: to.min(g.next_pos), buf: Vec::new() }
    }

    /// Where the record at `pos` is.
    pub fn locate(&self, pos: Position) -> Result<RecordLocation> {
        let g = self.inner.lock();
        let si = g.seg_of(pos)?;
        let seg = &g.segs[si];
        let i = (pos - seg.base_pos()) as usize;
        let offset = seg.offsets[i] as u64;
        let end = seg.offsets.get(i + 1).map_or(seg.write_off, |&o| o as u64);
        Ok(RecordLocation { segment_index: seg.header.index, path: seg.path.clone(), offset, size: end - offset })
    }

    /// Blocks until position `pos` is durable or `timeout` passes. Returns whether it
    /// is durable. Wakes on every durability advance.
    pub fn wait_for(&self, pos: Position, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = {
                let g = self.inner.lock();
                g.check()?;
                if g.durable >= pos {
                    return Ok(true);
                }
                self.events.load(Ordering::Acquire)
            };
            if !self.wait_event(seen, Some(deadline)) {
                let g = self.inner.lock();
                g.check()?;
                return Ok(g.durable >= pos);
            }
        }
    }

    /// Drops every whole segment all of whose records lie below `pos` (the active
    /// segment is never dropped). Returns the new first position.
    pub fn trim_prefix(&self, pos: Position) -> Result<Position> {
        let mut g = self.inner.lock();
        g.check()?;
        let mut removed = false;
        while g.segs.len() > 1 && g.segs[1].base_pos() <= pos {
            let seg = g.segs.pop_front().expect("checked");
            let (path, index, seg_size) = (seg.path.clone(), seg.header.index, seg.header.segment_size);
            drop(seg);
            if let (Some(p), Some(dir)) = (&path, &self.dir) {
                // Kept for reuse (its blocks are written), or removed.
                let r = if g.spares.len() < self.recycle && seg_size == self.segment_size {
                    let spare = dir.join(spare_file_name(index));
                    std::fs::rename(p, &spare)
                        .map(|()| g.spares.push(spare))
                        .map_err(|e| StoreError::io("keep trimmed segment as a spare", p, e))
                } else {
                    std::fs::remove_file(p).map_err(|e| StoreError::io("remove trimmed segment", p, e))
                };
                if let Err(e) = r {
                    self.poison(&mut g, &e);
                    return Err(e);
                }
                removed = true;
            }
        }
        if removed {
            if let Some(dir) = &self.dir {
                if let Err(e) = sync_dir(dir) {
                    self.poison(&mut g, &e);
                    return Err(e);
                }
            }
        }
        Ok(g.first_pos())
    }

    /// Removes every record at `pos` and after, durably: an end marker is written at
    /// `pos` and synced, later segments are removed, and the rest of the segment is
    /// zeroed and synced. Appends continue at `pos`. A failure here poisons the store.
    pub fn truncate_suffix(&self, pos: Position) -> Result<()> {
        let mut g = self.inner.lock();
        g.check()?;
        if pos >= g.next_pos {
            return Ok(());
        }
        let si = g.seg_of(pos)?;
        g.gen += 1;
        let r = self.truncate_locked(&mut g, si, pos);
        if let Err(e) = &r {
            self.poison(&mut g, e);
        }
        drop(self.publish(&mut g)); // wakes under the lock: not the group-commit path
        r
    }

    fn truncate_locked(&self, g: &mut Inner, si: usize, pos: Position) -> Result<()> {
        let durable = g.durable.min(pos - 1);
        let seg = &mut g.segs[si];
        let keep = (pos - seg.base_pos()) as usize;
        let off = seg.offsets[keep] as u64;
        let old_end = seg.write_off;
        seg.offsets.truncate(keep);
        seg.write_off = off;
        let marker =
            RecordHeader { kind: RecordKind::End as u16, pos, durable_hint: durable, ..RecordHeader::default() };
        seg.write_record(marker, &[])?;
        seg.sync()?;
        seg.offsets.truncate(keep);
        let marker_end = seg.write_off;
        seg.write_off = off;
        // Later segments go, newest first: the marker already ends the log.
        while g.segs.len() > si + 1 {
            let s = g.segs.pop_back().expect("checked");
            let path = s.path.clone();
            drop(s);
            if let Some(p) = &path {
                std::fs::remove_file(p).map_err(|e| StoreError::io("remove segment", p, e))?;
            }
        }
        if let Some(dir) = &self.dir {
            sync_dir(dir)?;
        }
        let seg = &mut g.segs[si];
        seg.zero(marker_end, old_end)?;
        seg.sync()?;
        g.next_pos = pos;
        g.durable = durable;
        Ok(())
    }

    /// Calls `f` with the active segment's bytes (the log region; layout in
    /// [`super::format`]), or returns `None` in fsync mode, where segments are
    /// written with `pwrite` and have no memory of their own.
    pub fn with_active_region<R>(&self, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        let g = self.inner.lock();
        let (ptr, len) = g.segs.back()?.memory()?;
        // SAFETY: the segment's memory is live while we hold the lock, and every write
        // to it also happens under the lock.
        let bytes = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
        Some(f(bytes))
    }

    /// The active segment's memory as a raw region (for registering it with a NIC),
    /// or `None` in fsync mode. See [`LogRegion`] for how long it stays valid; writing
    /// through it bypasses the store, which only sees such writes after a reopen.
    pub fn active_region(&self) -> Option<LogRegion> {
        let mut g = self.inner.lock();
        let a = g.active();
        let (ptr, len) = a.memory()?;
        Some(LogRegion {
            ptr: NonNull::new(ptr)?,
            len,
            segment_index: a.header.index,
            epoch: a.header.epoch,
            base_pos: a.header.base_pos,
            write_offset: a.write_off,
        })
    }

    /// Paths of the segment files, oldest first (empty in memory mode).
    pub fn segment_paths(&self) -> Vec<PathBuf> {
        let g = self.inner.lock();
        g.segs.iter().filter_map(|s| s.path.clone()).collect()
    }

    /// The first error that stopped the store, if any.
    pub fn poisoned(&self) -> Option<String> {
        self.inner.lock().poison.clone()
    }
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.inner.lock();
        f.debug_struct("Log")
            .field("mode", &self.mode)
            .field("dir", &self.dir)
            .field("first_pos", &g.first_pos())
            .field("next_pos", &g.next_pos)
            .field("durable", &g.durable)
            .field("segments", &g.segs.len())
            .finish()
    }
}

/// Iterator over a range of records (see [`Log::iter`]).
pub struct LogIter<'a> {
    log: &'a Log,
    next: Position,
    end: Position,
    buf: Vec<u8>,
}

impl Iterator for LogIter<'_> {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.end {
            return None;
        }
        let pos = self.next;
        self.next += 1;
        Some(self.log.read_into(pos, &mut self.buf).map(|meta| Record { meta, payload: self.buf.clone() }))
    }
}

/// Parked group-commit appenders to wake (see [`Log::done`]): all of those sleeping on
/// a word, and one of another's. Dropping it wakes them; drop it after releasing `inner`.
#[must_use = "dropping it wakes the appenders; drop it after releasing `inner`"]
struct Wake<'a> {
    words: &'a [AtomicU32; 2],
    all: [bool; 2],
    one: Option<usize>,
}

impl Drop for Wake<'_> {
    fn drop(&mut self) {
        for p in 0..2 {
            if self.all[p] {
                futex::wake(&self.words[p], i32::MAX);
            }
        }
        if let Some(q) = self.one {
            futex::wake(&self.words[q], 1);
        }
    }
}

/// The Linux futex calls the waiters use (see `Log::events`).
mod futex {
    use std::sync::atomic::AtomicU32;
    use std::time::Duration;

    /// Sleeps while `word` holds `expected`, at most `timeout`; returns on a wake-up, a
    /// changed word, a timeout or a signal (the caller re-checks).
    pub(super) fn wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
        let ts = timeout.map(|t| libc::timespec {
            tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
            tv_nsec: t.subsec_nanos() as libc::c_long,
        });
        let tsp = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: `word` is a live, aligned u32 for the duration of the call; the
        // timeout (relative, as FUTEX_WAIT takes it) is null or points to `ts`.
        unsafe {
            libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG, expected, tsp);
        }
    }

    /// Wakes every thread sleeping on `word`.
    pub(super) fn wake_all(word: &AtomicU32) {
        wake(word, i32::MAX);
    }

    /// Wakes up to `n` threads sleeping on `word`.
    pub(super) fn wake(word: &AtomicU32, n: i32) {
        // SAFETY: `word` is a live, aligned u32.
        unsafe {
            libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG, n);
        }
    }
}
