//! # paxos: replog's Multi-Paxos core, without I/O
//!
//! (crate docs are filled in below as the core lands)
#![deny(missing_docs)]

pub mod contracts;
pub mod storage;
pub mod types;

pub use storage::{MemStorage, Storage, StorageError};
pub use types::{Ballot, Command, Entry, Nanos, NodeId, Position, Slot, Value};
