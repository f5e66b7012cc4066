//! The store's one error type.

use std::io;
use std::path::{Path, PathBuf};

/// Everything that can go wrong in the store. Disk input never panics: it ends here.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O call failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What the store was doing.
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The filesystem is full (ENOSPC / EDQUOT). Nothing acknowledged is lost; the
    /// failed append was not recorded.
    #[error("no space left on device: {op} {path}: {source}")]
    NoSpace {
        /// What the store was doing.
        op: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The data directory cannot be written (EROFS / EACCES / EPERM).
    #[error("data directory is not writable: {op} {path}: {source}")]
    ReadOnly {
        /// What the store was doing.
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A segment header does not validate. The store refuses to open.
    #[error("corrupt segment header in {path}: {reason}; refusing to open")]
    CorruptHeader {
        /// The segment file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A record in the middle of the log does not validate (it is followed by data that
    /// proves it had been durable). The store refuses to open.
    #[error(
        "corrupt log: {path} at byte offset {offset} (record at position {pos}): {reason}; \
         refusing to open"
    )]
    Corrupt {
        /// The segment file.
        path: PathBuf,
        /// Byte offset of the bad record within the file.
        offset: u64,
        /// Position the record should have carried.
        pos: u64,
        /// What is wrong.
        reason: String,
    },
    /// `pmem` mode was asked for but the file cannot be mapped with `MAP_SYNC` (no DAX
    /// filesystem) or the CPU has no cache-line flush. The store does not fall back.
    #[error("pmem durability unavailable for {path}: {reason}")]
    PmemUnavailable {
        /// The probed file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// An earlier fatal error (for example a failed fsync) stopped the store.
    #[error("store stopped after a fatal error: {0}")]
    Poisoned(String),
    /// A record does not fit in a segment.
    #[error("record of {len} payload bytes exceeds the maximum {max} for this segment size")]
    TooLarge {
        /// Requested payload length.
        len: usize,
        /// Largest payload accepted.
        max: u64,
    },
    /// A position outside the log.
    #[error("position {pos} outside the log [{first}, {next})")]
    OutOfRange {
        /// Requested position.
        pos: u64,
        /// First position held.
        first: u64,
        /// Next position to be written.
        next: u64,
    },
    /// A record payload that does not decode (for example a corrupt paxos value).
    #[error("cannot decode record at position {pos}: {reason}")]
    Decode {
        /// The record's position.
        pos: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// A bad configuration or argument.
    #[error("invalid argument: {0}")]
    Invalid(String),
}

/// Result with [`StoreError`].
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl StoreError {
    /// Classifies an OS error: full disk and read-only directories get their own
    /// variants, everything else is [`StoreError::Io`].
    pub fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        let path = path.to_path_buf();
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => StoreError::NoSpace { op, path, source },
            Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EPERM) => StoreError::ReadOnly { op, path, source },
            _ => StoreError::Io { op, path, source },
        }
    }

    /// A copy good enough to hand to every later caller once the store is poisoned.
    pub(crate) fn poison_message(&self) -> String {
        self.to_string()
    }
}

impl From<StoreError> for paxos::StorageError {
    fn from(e: StoreError) -> Self {
        paxos::StorageError::new(e)
    }
}
