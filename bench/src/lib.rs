//! replog benchmarks: workloads, baselines, the etcd peer, reports and plots.
//!
//! The `bench` binary (`src/main.rs`, documented in `bench/README.md`) starts a cluster
//! of `replog serve` processes ([`cluster`]), measures the baselines of the same machine
//! in the same run ([`baseline`]: TCP loopback round trip, fdatasync), drives the cluster
//! and a 3-member etcd cluster ([`etcd`]) with one load generator ([`load`]), and writes
//! JSON, CSV and SVG plots ([`report`], [`plot`]). With `--transport dpdk` the replicas
//! run over DPDK in network namespaces and the raw DPDK ping-pong is measured too
//! ([`dpdk`]); with `--transport rdma` they run over RDMA on the device found here and
//! the raw RDMA one-sided-write ping-pong is measured ([`rdma`]).

pub mod baseline;
pub mod cluster;
pub mod dpdk;
pub mod etcd;
pub mod load;
pub mod pingpong;
pub mod plot;
pub mod proc;
pub mod rdma;
pub mod report;
pub mod stats;
