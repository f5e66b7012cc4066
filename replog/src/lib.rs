//! replog: the replicated log service.

pub mod client;
pub mod store;
