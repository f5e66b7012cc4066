//! Transport traits for replog.
//!
//! Not built yet: the traits, the wire envelope, the in-memory transport and the
//! RDMA/DPDK backends arrive with their issues. This crate is empty on purpose and
//! claims no feature.
