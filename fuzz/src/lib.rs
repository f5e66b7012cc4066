//! The fuzz targets' bodies, in a module the main workspace's regression test
//! (`replog/tests/fuzz_regressions.rs`) includes too, so every input kept in
//! `fuzz/regressions/<target>/` is replayed by `cargo test`.
pub mod checks;
