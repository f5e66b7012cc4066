#![no_main]
//! See `replog_fuzz::checks::snapshots`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| replog_fuzz::checks::snapshots(data));
