//! Persistence primitives: cache-line flushes chosen by CPUID, the store fence, and
//! shared file mappings (with or without `MAP_SYNC`). The only module with `unsafe`
//! besides the raw-region accessor of the log.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Cache-line size assumed for flushing (x86-64).
pub const CACHE_LINE: usize = 64;

/// The instruction used to write a cache line back to the persistence domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushInstr {
    /// `clwb`: write back, keep the line cached (best).
    Clwb,
    /// `clflushopt`: write back and invalidate, weakly ordered.
    Clflushopt,
    /// `clflush`: write back and invalidate, serialising (slowest).
    Clflush,
}

impl FlushInstr {
    /// The best flush instruction this CPU has (CPUID leaf 7 EBX bit 24 for clwb,
    /// bit 23 for clflushopt, leaf 1 EDX bit 19 for clflush), or `None`.
    #[allow(unused_unsafe)] // `__cpuid_count` is safe from Rust 1.87 on, unsafe before.
    pub fn detect() -> Option<FlushInstr> {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::__cpuid_count;
            // SAFETY: CPUID exists on every x86-64 CPU; leaves 1 and 7 are checked for.
            let max_leaf = unsafe { __cpuid_count(0, 0) }.eax;
            if max_leaf >= 7 {
                // SAFETY: leaf 7 exists (checked above).
                let l7 = unsafe { __cpuid_count(7, 0) };
                if l7.ebx & (1 << 24) != 0 {
                    return Some(FlushInstr::Clwb);
                }
                if l7.ebx & (1 << 23) != 0 {
                    return Some(FlushInstr::Clflushopt);
                }
            }
            // SAFETY: leaf 1 exists on every x86-64 CPU.
            let l1 = unsafe { __cpuid_count(1, 0) };
            if l1.edx & (1 << 19) != 0 {
                return Some(FlushInstr::Clflush);
            }
            None
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            None
        }
    }

    /// Writes back every cache line overlapping `bytes`. Not ordered: call [`fence`]
    /// once after a batch of flushes.
    pub fn flush(self, bytes: &[u8]) {
        #[cfg(target_arch = "x86_64")]
        {
            if bytes.is_empty() {
                return;
            }
            let start = bytes.as_ptr() as usize & !(CACHE_LINE - 1);
            let end = bytes.as_ptr() as usize + bytes.len();
            let mut p = start;
            while p < end {
                let line = p as *const u8;
                match self {
                    // SAFETY: `line` lies within (or on the cache line of) `bytes`,
                    // which is mapped; clwb only writes the line back, no memory change.
                    FlushInstr::Clwb => unsafe {
                        std::arch::asm!("clwb [{0}]", in(reg) line, options(nostack, preserves_flags));
                    },
                    // SAFETY: as above; clflushopt writes back and invalidates.
                    FlushInstr::Clflushopt => unsafe {
                        std::arch::asm!("clflushopt [{0}]", in(reg) line, options(nostack, preserves_flags));
                    },
                    // SAFETY: as above; `_mm_clflush` is SSE2, always on x86-64.
                    FlushInstr::Clflush => unsafe { std::arch::x86_64::_mm_clflush(line) },
                }
                p += CACHE_LINE;
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = bytes;
        }
    }
}

/// Copies `src` into `dst` (of the same length), the 64-byte-aligned middle of `dst` by
/// non-temporal stores, and returns that middle's range. Those bytes bypass the cache:
/// there is nothing to flush for them, and the next [`fence`] orders them (and makes
/// them persistent on pmem) like flushed lines; the head and tail are ordinary stores
/// that still need [`FlushInstr::flush`]. For large records this halves the work of
/// copy-then-flush (PMDK's `memcpy_persist` does the same).
pub fn copy_streaming(dst: &mut [u8], src: &[u8]) -> std::ops::Range<usize> {
    assert_eq!(dst.len(), src.len(), "copy_streaming: lengths differ");
    let addr = dst.as_ptr() as usize;
    let head = (addr.next_multiple_of(CACHE_LINE) - addr).min(dst.len());
    let end = head + (dst.len() - head) / CACHE_LINE * CACHE_LINE;
    dst[..head].copy_from_slice(&src[..head]);
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
        let mut i = head;
        while i < end {
            // SAFETY: `i..i + 64` lies within both slices (`end <= len`); the stores'
            // destination is 16-byte aligned (64-aligned line, 16-byte steps); the loads
            // are unaligned loads; SSE2 is always on x86-64.
            unsafe {
                let s = src.as_ptr().add(i) as *const __m128i;
                let d = dst.as_mut_ptr().add(i) as *mut __m128i;
                for k in 0..4 {
                    _mm_stream_si128(d.add(k), _mm_loadu_si128(s.add(k)));
                }
            }
            i += CACHE_LINE;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    dst[head..end].copy_from_slice(&src[head..end]);
    dst[end..].copy_from_slice(&src[end..]);
    head..end
}

/// The store fence ending a batch of flushes: after it, the flushed lines are in the
/// persistence domain (on pmem with `MAP_SYNC`).
pub fn fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: sfence has no memory-safety preconditions; SSE is always on x86-64.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
    #[cfg(not(target_arch = "x86_64"))]
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

/// A shared, writable mapping of a whole file.
#[derive(Debug)]
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory; the store hands out access only under its lock
// (or, for the raw region, with documented caller obligations).
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `file` read-write and shared. With `sync`, uses
    /// `MAP_SHARED_VALIDATE | MAP_SYNC`, which the kernel refuses (EOPNOTSUPP) unless
    /// the file is on a DAX filesystem: that refusal is the test for "not pmem".
    pub fn map(file: &File, len: usize, sync: bool) -> io::Result<Mapping> {
        let flags = if sync { libc::MAP_SHARED_VALIDATE | libc::MAP_SYNC } else { libc::MAP_SHARED };
        // SAFETY: a fresh mapping at a kernel-chosen address; the fd is valid for the
        // call and the mapping keeps its own reference to the file.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, file.as_raw_fd(), 0)
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { ptr: ptr.cast(), len })
    }

    /// The mapped bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr..ptr+len` is a live mapping owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The mapped bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` gives exclusive access through this handle.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Start of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped; no reference outlives `self`.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_streaming_copies_every_alignment_and_length() {
        let src: Vec<u8> = (0..5000u32).map(|i| (i * 7 + 3) as u8).collect();
        let mut buf = vec![0u8; 5200];
        for start in [0usize, 1, 8, 56, 63, 64, 65] {
            for len in [0usize, 1, 63, 64, 65, 200, 511, 512, 4096, 4097, 4999] {
                buf.fill(0xAA);
                let r = copy_streaming(&mut buf[start..start + len], &src[..len]);
                fence();
                assert_eq!(&buf[start..start + len], &src[..len], "start {start} len {len}");
                assert!(buf[..start].iter().all(|&b| b == 0xAA) && buf[start + len..].iter().all(|&b| b == 0xAA));
                assert!(r.start <= r.end && r.end <= len && (r.end - r.start).is_multiple_of(CACHE_LINE));
                if !r.is_empty() {
                    let at = buf[start..].as_ptr() as usize + r.start;
                    assert_eq!(at % CACHE_LINE, 0, "the streamed part is line-aligned");
                }
            }
        }
    }
}
