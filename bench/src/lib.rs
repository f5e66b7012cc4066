//! replog benchmarks: workloads, baselines, the etcd peer, reports and plots.
//!
//! Not built yet (see the benchmarks issue). This crate is empty on purpose and
//! claims no result.
