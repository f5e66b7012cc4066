//! replog: the replicated log service.

pub mod app;
pub mod client;
pub mod config;
pub mod dpdk_net;
pub mod embed;
pub mod members;
pub mod metrics;
pub mod mirrored_store;
pub mod node;
#[cfg(feature = "rdma")]
pub mod rdma_agent;
pub mod rdma_mirror;
pub mod rdma_region;
pub mod server;
pub mod snapshot;
pub mod store;
pub mod wire;
