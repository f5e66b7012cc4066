#![no_main]
//! See `replog_fuzz::checks::peer_handshake`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| replog_fuzz::checks::peer_handshake(data));
