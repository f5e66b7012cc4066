#![no_main]
//! See `replog_fuzz::checks::rdma_records`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| replog_fuzz::checks::rdma_records(data));
