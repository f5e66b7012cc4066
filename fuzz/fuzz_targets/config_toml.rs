#![no_main]
//! See `replog_fuzz::checks::config_toml`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| replog_fuzz::checks::config_toml(data));
