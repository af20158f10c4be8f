//! lcfs-mount: the FUSE adaptor. It presents any [`Source`] as a read-only filesystem.
//!
//! Job: turn kernel requests into calls on a [`Source`] (directory listings and byte ranges,
//! as futures) and the answers back into replies, without ever blocking the FUSE session on
//! the network. lcfs implements [`Source`] with its fetch engine; [`testing::MemSource`]
//! implements it in memory.
//!
//! Layout:
//! - `source`: the trait and its plain types;
//! - `fs`: the filesystem core (inode table, open files, read-only policy, moves to new
//!   versions), free of fuser; `follow`: the task that follows the source's versions and
//!   tells the kernel what to forget;
//! - `fuse`: the thin fuser adaptor (forward, log, reply); `attr`: attributes for the kernel;
//! - `inode`: the lazily populated inode table and its diff between versions;
//!   `readahead`: sequential detection;
//! - `mount`: [`mount`], [`MountConfig`], [`MountHandle`];
//! - `mountpoint`: checks, dead-mountpoint recovery, [`unmount`]; `fusermount`: user mounts;
//! - `error`: [`FsError`] with the one errno table, and [`MountError`].
//!
//! Invariants: every write operation answers EROFS; inodes live exactly while the kernel
//! holds lookups on them (the root always); replies that need the source are sent from tasks
//! on the tokio runtime given to [`mount`].

mod attr;
mod error;
mod follow;
mod fs;
mod fuse;
mod fusermount;
mod inode;
mod mount;
mod mountpoint;
pub mod readahead;
mod session;
pub mod source;
pub mod testing;

pub use error::{FsError, MountError};
pub use fuser::{INodeNo, Notifier};
pub use mount::{mount, MountConfig, MountHandle, MountStats};
pub use mountpoint::unmount;
pub use source::{
    Attr, BoxFuture, Child, Children, Kind, ReadHint, Source, SourceError, Totals, Version,
};
