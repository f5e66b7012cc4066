#![no_main]
//! See `replog_fuzz::checks::client_frames`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| replog_fuzz::checks::client_frames(data));
