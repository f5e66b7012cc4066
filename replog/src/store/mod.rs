//! The replog store: a segmented, checksummed append log with three durability modes,
//! and the paxos acceptor state kept in it.
//!
//! - [`format`](mod@format): the byte layout of segments and records (the "log region").
//! - [`log`]: the [`Log`]: append with group commit, read, iterate, wait for the tail,
//!   trim a prefix, truncate a suffix.
//! - [`recovery`]: what happens at open (torn tail cut, corrupt middle refused).
//! - [`persist`]: cache-line flushes chosen by CPUID, fences, shared mappings.
//! - [`codec`]: the encoding of a [`paxos::Value`].
//! - [`PaxosStore`]: the [`paxos::Storage`] implementation.
//! - [`conformance`]: the test suite every [`paxos::Storage`] runs.
//!
//! # Durability modes
//!
//! | [`Mode`] | writes | an acknowledged append survives | reported [`Durability`] |
//! | --- | --- | --- | --- |
//! | `Pmem` | memcpy into a `MAP_SYNC` mapping, clwb/clflushopt/clflush, one sfence per batch | power loss | `Pmem` |
//! | `Fsync` | memcpy into a buffer; per group commit one `pwrite` and one `fdatasync` shared by all waiting appenders | power loss | `Fsync` |
//! | `MappedNotDurable` | the `Pmem` code on an ordinary shared mapping (tests) | a process crash only | `Memory` |
//! | `Memory` | memory | nothing (a minority of replicas failing, at best) | `Memory` |
//!
//! `Pmem` is never claimed where the kernel refuses the `MAP_SYNC` mapping: opening
//! fails with [`StoreError::PmemUnavailable`] instead. A failed `fdatasync` stops the
//! store for good ([`StoreError::Poisoned`]): retrying could report lost data durable.

pub mod codec;
pub mod conformance;
mod error;
pub mod fault;
pub mod format;
pub mod log;
mod paxos_store;
pub mod persist;
pub mod recovery;
mod segment;
mod watch;

pub use error::{Result, StoreError};
pub use format::RecordKind;
pub use log::{Log, LogIter, LogRegion, Record, RecordLocation, RecordMeta};
pub use paxos_store::PaxosStore;
pub use recovery::RecoveryReport;

/// The durability a store provides (what [`Log::durability`] reports).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Durability {
    /// Persistent memory: flushed cache lines under `MAP_SYNC`.
    Pmem,
    /// Files made durable with `fdatasync` (group commit).
    Fsync,
    /// No persistence.
    Memory,
}

/// How to open a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Persistent memory. Fails to open unless the directory is on a DAX filesystem.
    Pmem,
    /// The `Pmem` write and flush code on an ordinary shared file mapping: for tests
    /// and benchmarks. NOT durable across power loss (reported as
    /// [`Durability::Memory`]).
    MappedNotDurable,
    /// Ordinary files with `fdatasync` and group commit.
    Fsync,
    /// Memory only; the directory is not used.
    Memory,
}

impl Mode {
    /// The durability this mode gives.
    pub fn durability(self) -> Durability {
        match self {
            Mode::Pmem => Durability::Pmem,
            Mode::Fsync => Durability::Fsync,
            Mode::MappedNotDurable | Mode::Memory => Durability::Memory,
        }
    }

    /// Whether an acknowledged append survives power loss.
    pub fn is_durable(self) -> bool {
        matches!(self, Mode::Pmem | Mode::Fsync)
    }
}

/// Store configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// The durability mode.
    pub mode: Mode,
    /// Bytes per segment file (preallocated), a multiple of 8 from 4 KiB to 4 GiB.
    pub segment_size: u64,
    /// `fsync` mode: how many trimmed segment files are kept (as
    /// `seg-<index>.log.spare`) to be reused as new segments, instead of removed. A
    /// reused file's blocks are already written, so appends into it need no
    /// unwritten-extent conversion (a metadata write in every fdatasync that carries
    /// one): with many appenders of 4 KiB records that is most of an fdatasync's cost
    /// (see `bench/RESULTS.md`, "The store alone"). Costs this many segments of disk
    /// beyond the log itself. 0 removes trimmed segments. Other modes ignore it.
    pub recycle_segments: usize,
}

impl StoreConfig {
    /// Default segment size: 64 MiB.
    pub const DEFAULT_SEGMENT_SIZE: u64 = 64 << 20;

    /// Default [`recycle_segments`](Self::recycle_segments): 2.
    pub const DEFAULT_RECYCLE_SEGMENTS: usize = 2;

    /// A configuration with `mode`, the default segment size and recycling.
    pub fn new(mode: Mode) -> Self {
        StoreConfig { mode, segment_size: Self::DEFAULT_SEGMENT_SIZE, recycle_segments: Self::DEFAULT_RECYCLE_SEGMENTS }
    }

    /// The same keeping at most `n` trimmed segments for reuse (0: none).
    pub fn with_recycled_segments(mut self, n: usize) -> Self {
        self.recycle_segments = n;
        self
    }

    /// The same with another segment size.
    pub fn with_segment_size(mut self, segment_size: u64) -> Self {
        self.segment_size = segment_size;
        self
    }
}
