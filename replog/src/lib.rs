//! replog: the replicated log service.

pub mod store;
