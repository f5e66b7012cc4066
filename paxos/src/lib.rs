//! # paxos: replog's Multi-Paxos core, without I/O
//!
//! (crate docs are filled in below as the core lands)
#![deny(missing_docs)]

pub mod config;
pub mod contracts;
pub mod message;
pub mod replica;
pub mod rng;
pub mod storage;
pub mod types;

pub use config::{Config, ConfigError, PlantedBug};
pub use message::{Message, ReadRequest, ReadResult, WriteRequest, WriteResult};
pub use replica::{
    Action, Applied, AppliedEntry, Error, MembershipError, PeerProgress, ProposeError, Replica, Role, SnapshotMeta,
    TransferError,
};
pub use storage::{MemStorage, Storage, StorageError};
pub use types::{Ballot, Command, Entry, Membership, Nanos, NodeId, Position, Slot, Value};

#[cfg(feature = "sim")]
pub mod sim;
