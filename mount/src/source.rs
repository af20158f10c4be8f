//! The trait the filesystem reads through, and the plain types it speaks.
//!
//! The mount knows nothing of packets, channels or caches: it asks a [`Source`] for the
//! entries of a directory and for byte ranges of a file, and gets futures back, so that FUSE
//! handlers never block on the network (the reply is sent by a task when the future ends).
//! `lcfs` implements this trait with its fetch engine; tests implement it in memory.

use std::ffi::OsString;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// A boxed future, as trait methods return them.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

/// Attributes of a node, as a directory entry gives them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub kind: Kind,
    /// File size in bytes; the target length for a symlink; for a directory, any size.
    pub size: u64,
    /// Permission bits (`0o7777`).
    pub mode: u32,
    pub mtime_secs: i64,
    pub mtime_nanos: u32,
}

/// One entry of a directory, in the source's terms.
#[derive(Clone, Debug)]
pub struct Child<N> {
    pub name: OsString,
    pub attr: Attr,
    /// The symlink's target, for symlinks.
    pub target: Option<Vec<u8>>,
    pub node: N,
}

/// How the mount is reading, so the source can fetch ahead of the reader.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadHint {
    /// Bytes after the requested range that the reader is expected to want soon (0 for a
    /// random reader).
    pub readahead: u64,
}

/// Errors a source reports; the mount maps each to one errno in one place.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SourceError {
    /// The data could not be had in time (server gone, timeout): EIO.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The data is corrupt or does not verify: EIO.
    #[error("invalid: {0}")]
    Invalid(String),
    /// The node is not a directory / not a file as the call needs.
    #[error("wrong kind")]
    WrongKind,
    /// The source is shutting down.
    #[error("shutting down")]
    Closed,
}

impl SourceError {
    pub fn errno(&self) -> i32 {
        match self {
            SourceError::Unavailable(_) | SourceError::Invalid(_) | SourceError::Closed => {
                libc::EIO
            }
            SourceError::WrongKind => libc::EINVAL,
        }
    }
}

/// A directory's entries, shared (the mount keeps them while the kernel holds the directory).
pub type Children<N> = Arc<Vec<Child<N>>>;

/// File-system totals for statfs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub bytes: u64,
    pub files: u64,
}

/// What the filesystem reads through. `Node` identifies a node the source gave out (for lcfs,
/// a directory entry with its object references); it must be cheap to clone.
pub trait Source: Send + Sync + 'static {
    type Node: Clone + Send + Sync + 'static;

    /// The root directory.
    fn root(&self) -> (Self::Node, Attr);

    /// The entries of directory `dir`, sorted by name.
    fn list(&self, dir: &Self::Node) -> BoxFuture<Result<Children<Self::Node>, SourceError>>;

    /// Up to `len` bytes of file `file` from `offset` (fewer only at the end of the file).
    fn read(
        &self,
        file: &Self::Node,
        offset: u64,
        len: u32,
        hint: ReadHint,
    ) -> BoxFuture<Result<Vec<u8>, SourceError>>;

    /// Extended attributes of a node, `user.lcfs.*` names with their values; `root` is true
    /// for the mount's root (which may add channel and server state).
    fn xattrs(&self, node: &Self::Node, root: bool) -> Vec<(String, Vec<u8>)>;

    /// Totals for statfs.
    fn totals(&self) -> Totals;
}
