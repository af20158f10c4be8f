//! lcfs: a directory published over IPv6 multicast, mounted as a read-only filesystem.
//!
//! This crate holds the protocol core and the commands. The sans-IO parts (object encodings,
//! packet codec, FEC sessions, MLD parsing and tracking, the sender's scheduler, the receiver's
//! object state) are plain state machines fed bytes and time; the I/O shells around them are
//! kept thin. See DESIGN.md in the project's shared folder for the settled decisions.

pub mod cli;
pub mod copy;
pub mod fetch;
pub mod mld;
pub mod mountfs;
pub mod net;
pub mod prefetch;
pub mod progress;
pub mod serve;
pub mod sim;
pub mod status;
pub mod sync;
pub mod wire;
