//! Disk fault injection for tests (feature `fault-injection`, which only replog's own
//! test builds enable through its dev-dependency on itself; release and ordinary
//! builds compile the plain calls).
//!
//! With the feature, an fdatasync of a segment fails with `EIO` while the file
//! [`EIO_ON_SYNC`] exists in the segment's directory: a test creates it in one
//! replica's data directory to make that replica's disk fail under a running cluster.

use std::fs::File;
use std::io;
use std::path::Path;

/// The file whose presence in a data directory makes its syncs fail with `EIO`.
pub const EIO_ON_SYNC: &str = "INJECT-EIO-ON-SYNC";

/// Whether this build injects faults (the `fault-injection` feature).
pub const ENABLED: bool = cfg!(feature = "fault-injection");

/// `file.sync_data()`, or (with the feature, while [`EIO_ON_SYNC`] exists beside
/// `path`) an `EIO` error without syncing.
pub(crate) fn sync_data(file: &File, path: &Path) -> io::Result<()> {
    if ENABLED && path.parent().is_some_and(|d| d.join(EIO_ON_SYNC).exists()) {
        return Err(io::Error::from_raw_os_error(libc::EIO));
    }
    file.sync_data()
}
