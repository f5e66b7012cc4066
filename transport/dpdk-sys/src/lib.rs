//! # dpdk-sys: raw bindings to the system's DPDK
//!
//! Generated at build time by `bindgen` from the headers of the libdpdk that pkg-config
//! finds (Debian 12: DPDK 22.11), with pkg-config's own compiler flags. DPDK's fast path
//! (`rte_eth_rx_burst`, `rte_eth_tx_burst`, `rte_pktmbuf_alloc`, `rte_pktmbuf_free`,
//! `rte_pktmbuf_append`...) is `static inline` in the headers: bindgen's
//! `wrap_static_fns` emits a C wrapper for each, compiled into this crate, so they are
//! callable under their own names.
//!
//! Beyond the generated items, only a few helpers for what the headers express as macros
//! or thread-locals: [`mtod`], [`rte_errno`], [`strerror`], [`eal_init`] and [`PMD_DIR`].
//!
//! Poll-mode drivers (PMDs: `net_af_packet`, the vdev bus...) are plugins that EAL
//! loads from a directory at start-up; pass `-d` [`PMD_DIR`] to `rte_eal_init` to be
//! independent of EAL's compiled-in default.
//!
//! `rte_eal_init` succeeds once per process: tests that need several DPDK instances run
//! each in its own process.

#![deny(missing_docs)]

use std::ffi::{CStr, CString};
use std::os::raw::c_char;

/// Everything bindgen generated from the DPDK headers (see `build.rs` for the allowlist).
#[allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    dead_code,
    missing_docs,
    clippy::all,
    clippy::pedantic,
    rustdoc::all
)]
mod bindings {
    include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
}

pub use bindings::*;

/// The directory EAL should load poll-mode drivers from, found at build time (from
/// pkg-config's `pmdsdir`, or `<libdir>/dpdk/pmds-*`, or `$DPDK_PMD_DIR`).
pub const PMD_DIR: &str = env!("DPDK_SYS_PMD_DIR");

/// The libdpdk version pkg-config reported at build time.
pub const DPDK_VERSION: &str = env!("DPDK_SYS_VERSION");

/// Pointer to the first data byte of an mbuf segment: C's `rte_pktmbuf_mtod(m, uint8_t *)`
/// (a macro, so bindgen cannot wrap it): `buf_addr + data_off`.
///
/// # Safety
/// `m` must point to a valid, initialised `rte_mbuf`.
#[inline]
pub unsafe fn mtod(m: *const rte_mbuf) -> *mut u8 {
    // SAFETY: the caller guarantees `m` is a valid mbuf; `data_off` is within the buffer
    // that `buf_addr` points to by DPDK's mbuf invariants.
    unsafe { ((*m).buf_addr as *mut u8).add(usize::from((*m).data_off)) }
}

/// The calling thread's `rte_errno` (a macro over a thread-local in C).
#[inline]
pub fn rte_errno() -> i32 {
    // SAFETY: the shim only reads the calling thread's thread-local `rte_errno`.
    unsafe { dpdk_sys_rte_errno() }
}

/// `rte_strerror(errnum)` as an owned string (covers DPDK's own codes as well as errno).
pub fn strerror(errnum: i32) -> String {
    // SAFETY: rte_strerror returns a pointer to a NUL-terminated string, static or in a
    // thread-local buffer, valid at least until the next call on this thread; we copy it
    // out at once.
    unsafe {
        let s = rte_strerror(errnum);
        if s.is_null() {
            format!("error {errnum}")
        } else {
            CStr::from_ptr(s).to_string_lossy().into_owned()
        }
    }
}

/// Why [`eal_init`] failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EalError {
    /// `rte_errno` after the failed `rte_eal_init`.
    pub errno: i32,
    /// `rte_strerror(rte_errno)`.
    pub message: String,
}

impl std::fmt::Display for EalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rte_eal_init failed: {} (rte_errno {})", self.message, self.errno)
    }
}

impl std::error::Error for EalError {}

/// Calls `rte_eal_init` with `args` (`args[0]` is the program name, as in C's argv) and
/// returns how many arguments EAL consumed. The argument strings are leaked on purpose:
/// EAL may keep pointers into argv for the life of the process, and it initialises once
/// per process anyway.
///
/// # Errors
/// `rte_errno` and its `rte_strerror` text when EAL does not start (for example
/// `EALREADY` on a second call in the same process).
///
/// # Panics
/// If an argument contains a NUL byte.
pub fn eal_init<S: AsRef<str>>(args: &[S]) -> Result<usize, EalError> {
    let argv: Vec<*mut c_char> = args
        .iter()
        .map(|a| CString::new(a.as_ref()).expect("EAL argument without NUL").into_raw())
        .chain(std::iter::once(std::ptr::null_mut()))
        .collect();
    let argv: &'static mut [*mut c_char] = argv.leak();
    let argc = i32::try_from(args.len()).expect("argument count fits in an int");
    // SAFETY: argv holds argc valid NUL-terminated strings followed by NULL, all leaked
    // so they outlive EAL, which may permute the array and keep pointers into it.
    let rc = unsafe { rte_eal_init(argc, argv.as_mut_ptr()) };
    if rc < 0 {
        let errno = rte_errno();
        Err(EalError { errno, message: strerror(errno) })
    } else {
        Ok(usize::try_from(rc).expect("non-negative"))
    }
}
