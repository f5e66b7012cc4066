#![no_main]
//! See `replog_fuzz::checks::envelope`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| replog_fuzz::checks::envelope(data));
