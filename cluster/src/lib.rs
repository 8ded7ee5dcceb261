//! Campanile's replicated state.
//!
//! Every node of a Campanile cluster holds the same subscribers, campaigns and call outcomes. This crate
//! defines that state (`domain`), the commands that change it (`command`) and the deterministic state
//! machine that applies them (`state`), and replicates those commands with openraft, keeping the Raft log,
//! the vote and the state machine's snapshots in sled on local disk (`store`). `Cluster` is the handle the
//! rest of the node uses: propose a command and wait for it to be committed and applied, or read the
//! applied state.

pub mod command;
pub mod domain;
pub mod state;

pub use command::{Command, Imported, Refusal, Response};
pub use domain::*;
pub use state::State;
pub mod clock;
pub mod cluster;
pub mod kv;
pub mod network;
pub mod store;
pub mod tls;

pub use cluster::{Cluster, ClusterError, ClusterOptions, ClusterStatus, MemberNet};
