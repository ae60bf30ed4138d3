//! The gateway binary's library half: opening the store a config describes, the
//! synthetic KV set, and the `dualpath` subcommands.
#![forbid(unsafe_code)]

pub mod commands;
pub mod server;
pub mod shards;
pub mod synthetic;
