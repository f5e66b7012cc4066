//! Noticing that the data directory, or the active segment file in it, was removed or
//! renamed under a running store (fsync mode).
//!
//! Data synced into a file that is no longer in the data directory is lost at the next
//! start, so such a sync must not count as durable. Asking the filesystem after every
//! fdatasync (`stat` of the segment's path) answers that, but on ext4 a `stat` of the
//! file between two fdatasyncs made each fdatasync ~70 us slower on these machines (a
//! single appender's p50 went from ~130 us to ~200 us; see the store benchmark). So
//! the store watches the directory with inotify instead: the kernel queues the event
//! inside the `unlink`/`rename` call itself, so an event for a removal that happened
//! before the sync returned is in the queue when the syncer drains it (one non-blocking
//! `read`, normally `EAGAIN`). The events are a filter, not the verdict: when one names
//! the active segment or the directory itself, or the queue overflowed, the store asks
//! the filesystem with `stat` as before. Where inotify is unavailable (its per-user
//! instance limit reached), every sync asks with `stat`.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::FromRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// What the directory's events since the last drain say about one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Nothing touched the file or the directory.
    Untouched,
    /// Something may have removed or renamed them: ask the filesystem.
    Ask,
}

/// An inotify watch on a data directory (removals and renames of its entries, and of
/// the directory itself). A watch made after the directory was removed has no
/// descriptor, and so asks every time: the answer is then "gone".
pub(crate) struct DirWatch {
    fd: Option<File>,
    buf: Vec<u8>,
}

/// The fixed part of `struct inotify_event`: wd, mask, cookie, len (native endian).
const EVENT_HEADER: usize = 16;

fn ne_u32(b: &[u8], at: usize) -> Option<u32> {
    let mut w = [0u8; 4];
    w.copy_from_slice(b.get(at..at + 4)?);
    Some(u32::from_ne_bytes(w))
}

impl DirWatch {
    /// Watches `dir`. Never fails: without inotify every check says [`Verdict::Ask`].
    pub(crate) fn new(dir: &Path) -> DirWatch {
        let none = DirWatch { fd: None, buf: Vec::new() };
        // SAFETY: plain syscall; the returned descriptor is owned below.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return none;
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        let Ok(cdir) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return none };
        let mask = libc::IN_DELETE | libc::IN_MOVED_FROM | libc::IN_DELETE_SELF | libc::IN_MOVE_SELF;
        // SAFETY: `fd` is an inotify descriptor and `cdir` a NUL-terminated path.
        if unsafe { libc::inotify_add_watch(fd, cdir.as_ptr(), mask) } < 0 {
            return none;
        }
        DirWatch { fd: Some(file), buf: vec![0u8; 4096] }
    }

    /// Drains the queued events and says whether any of them may concern `name` (a file
    /// in the watched directory) or the directory itself.
    pub(crate) fn drain(&mut self, name: &[u8]) -> Verdict {
        let Some(fd) = &mut self.fd else { return Verdict::Ask };
        let mut verdict = Verdict::Untouched;
        loop {
            let n = match fd.read(&mut self.buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return verdict,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The watch is broken: from now on, ask every time.
                Err(_) => {
                    self.fd = None;
                    return Verdict::Ask;
                }
            };
            if n == 0 {
                return verdict;
            }
            if Self::concerns(&self.buf[..n], name) {
                verdict = Verdict::Ask;
            }
        }
    }

    /// Whether a buffer of events holds one that may concern `name` or the directory.
    fn concerns(mut events: &[u8], name: &[u8]) -> bool {
        let mut hit = false;
        while !events.is_empty() {
            let (Some(mask), Some(len)) = (ne_u32(events, 4), ne_u32(events, 12)) else { return true };
            let Some(ev_name) = events.get(EVENT_HEADER..EVENT_HEADER + len as usize) else { return true };
            // The name is NUL-padded.
            let end = ev_name.iter().position(|&b| b == 0).unwrap_or(ev_name.len());
            let self_or_overflow = libc::IN_DELETE_SELF | libc::IN_MOVE_SELF | libc::IN_IGNORED | libc::IN_Q_OVERFLOW;
            if mask & self_or_overflow != 0 || &ev_name[..end] == name {
                hit = true;
            }
            events = &events[EVENT_HEADER + len as usize..];
        }
        hit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removals_of_other_files_are_ignored_and_of_the_file_or_directory_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("data");
        std::fs::create_dir(&d).unwrap();
        for f in ["a", "b", "c"] {
            std::fs::write(d.join(f), b"x").unwrap();
        }
        let mut w = DirWatch::new(&d);
        if w.fd.is_none() {
            eprintln!("skipped: inotify is unavailable here (every check asks the filesystem)");
            return;
        }
        assert_eq!(w.drain(b"a"), Verdict::Untouched);
        std::fs::remove_file(d.join("b")).unwrap();
        std::fs::rename(d.join("c"), d.join("c2")).unwrap();
        assert_eq!(w.drain(b"a"), Verdict::Untouched, "events about other files");
        std::fs::rename(d.join("a"), d.join("a2")).unwrap();
        assert_eq!(w.drain(b"a"), Verdict::Ask, "the watched name was renamed away");
        assert_eq!(w.drain(b"a"), Verdict::Untouched, "drained");
        std::fs::remove_file(d.join("a2")).unwrap();
        assert_eq!(w.drain(b"a2"), Verdict::Ask, "the watched name was removed");
        std::fs::rename(&d, dir.path().join("moved")).unwrap();
        assert_eq!(w.drain(b"zzz"), Verdict::Ask, "the directory itself was renamed");
    }

    #[test]
    fn truncated_or_garbled_event_buffers_ask() {
        assert!(DirWatch::concerns(&[1, 2, 3], b"a"));
        let mut ev = vec![0u8; EVENT_HEADER];
        ev[12..16].copy_from_slice(&100u32.to_ne_bytes()); // name longer than the buffer
        assert!(DirWatch::concerns(&ev, b"a"));
        let mut ok = vec![0u8; EVENT_HEADER + 4];
        ok[4..8].copy_from_slice(&libc::IN_DELETE.to_ne_bytes());
        ok[12..16].copy_from_slice(&4u32.to_ne_bytes());
        ok[16] = b'b';
        assert!(!DirWatch::concerns(&ok, b"a"));
        assert!(DirWatch::concerns(&ok, b"b"));
    }
}
