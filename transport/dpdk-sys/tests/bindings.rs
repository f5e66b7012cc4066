//! Checks on the generated bindings that need no EAL: constants, layouts the fast path
//! relies on, the error helpers, and the PMD directory found at build time.

use std::mem::{offset_of, size_of};
use std::path::Path;

use dpdk_sys as sys;

#[test]
fn constants_and_layouts_match_dpdk_22_11() {
    assert_eq!(sys::RTE_PKTMBUF_HEADROOM, 128);
    assert_eq!(sys::RTE_MBUF_DEFAULT_BUF_SIZE, sys::RTE_MBUF_DEFAULT_DATAROOM + sys::RTE_PKTMBUF_HEADROOM);
    assert_eq!(sys::RTE_ETHER_ADDR_LEN, 6);
    assert_eq!(sys::RTE_ETHER_HDR_LEN, 14);
    assert_eq!(size_of::<sys::rte_ether_hdr>(), 14);
    // The mbuf is two cache lines; the fields `mtod` reads sit where C puts them.
    assert_eq!(size_of::<sys::rte_mbuf>(), 128);
    assert_eq!(offset_of!(sys::rte_mbuf, buf_addr), 0);
    assert_eq!(offset_of!(sys::rte_mbuf, data_off), 16);
    assert_eq!(offset_of!(sys::rte_mbuf, pkt_len), 36);
    assert_eq!(offset_of!(sys::rte_mbuf, data_len), 40);
    println!("dpdk-sys: DPDK {} (pkg-config), PMD directory {}", sys::DPDK_VERSION, sys::PMD_DIR);
}

#[test]
fn mtod_is_buf_addr_plus_data_off() {
    let mut buf = [0u8; 256];
    // SAFETY: rte_mbuf is plain old data (pointers and integers); all-zero is a valid
    // value for a stand-in that only `mtod` reads.
    let mut m: sys::rte_mbuf = unsafe { std::mem::zeroed() };
    m.buf_addr = buf.as_mut_ptr().cast();
    m.data_off = 100;
    // SAFETY: `m` is initialised and data_off is inside `buf`.
    let p = unsafe { sys::mtod(&m) };
    assert_eq!(p, buf[100..].as_mut_ptr());
}

#[test]
fn strerror_covers_errno_and_dpdk_codes() {
    assert_eq!(sys::strerror(22), "Invalid argument");
    // DPDK's own codes start at 1000 (RTE_MIN_ERRNO): E_RTE_SECONDARY.
    assert!(sys::strerror(1001).contains("secondary"), "{}", sys::strerror(1001));
    assert_eq!(sys::rte_errno(), 0, "a fresh thread has rte_errno 0");
}

#[test]
fn pmd_dir_holds_the_test_drivers() {
    let dir = Path::new(sys::PMD_DIR);
    assert!(dir.is_dir(), "PMD_DIR {} is not a directory", sys::PMD_DIR);
    for driver in ["librte_net_af_packet.so", "librte_bus_vdev.so"] {
        let found = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().starts_with(driver));
        assert!(found, "{driver} missing from {}", sys::PMD_DIR);
    }
}
