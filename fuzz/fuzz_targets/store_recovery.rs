#![no_main]
//! See `replog_fuzz::checks::store_recovery`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| replog_fuzz::checks::store_recovery(data));
