//! The trait the filesystem reads through, and the plain types it speaks.
//!
//! The mount knows nothing of packets, channels or caches: it asks a [`Source`] for the
//! entries of a directory and for byte ranges of a file, and gets futures back, so that FUSE
//! handlers never block on the network (the reply is sent by a task when the future ends).
//! `lcfs` implements this trait with its fetch engine; tests implement it in memory.
//!
//! A source may move to new versions of its tree while mounted ([`Source::next_version`]).
//! Nodes stay valid after a move: a node of an older version still reads that version's bytes
//! for as long as the source can get them, and fails with [`SourceError::Stale`] once it
//! cannot. [`Source::same_content`] tells the mount which nodes of two versions are the same,
//! so that it keeps their inodes and skips unchanged subtrees without listing them.

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
    /// The link count `stat` shows (at least 1).
    pub nlink: u32,
    /// A hard-link group: children of any directories with the same non-zero `link` in one
    /// version are one file, and get one inode number.
    pub link: u64,
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
    /// The file changed or went away in a later version: the handle reads the version it
    /// opened, whose bytes the source may no longer be able to get. It should answer from
    /// what it has, or fail fast with [`SourceError::Stale`] rather than wait.
    pub superseded: bool,
}

/// One version of the source's tree.
#[derive(Clone, Debug)]
pub struct Version<N> {
    /// Increases with every version (for lcfs, the root record's generation).
    pub number: u64,
    /// The root directory.
    pub root: N,
    pub attr: Attr,
}

/// Errors a source reports; the mount maps each to one errno in one place.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SourceError {
    /// The data could not be had in time (server gone, timeout): EIO.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The data belongs to a version the source has moved past, and it can no longer be had
    /// (the server stopped sending it): ESTALE, at once rather than after a timeout.
    #[error("stale: {0}")]
    Stale(String),
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
            SourceError::Stale(_) => libc::ESTALE,
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

    /// The current version: its number and root directory.
    fn root(&self) -> Version<Self::Node>;

    /// Resolves with the current version once its number is above `seen`. A source that never
    /// changes never resolves (the default); [`SourceError::Closed`] ends the mount's watch.
    fn next_version(&self, seen: u64) -> BoxFuture<Result<Version<Self::Node>, SourceError>> {
        let _ = seen;
        Box::pin(std::future::pending())
    }

    /// Whether nodes `a` and `b`, of the same kind and possibly of two versions, hold the same
    /// content: for files the same bytes (the mount keeps the inode and its page cache), for
    /// directories the same entries all the way down (the mount skips the subtree). Must be
    /// cheap: it is asked without the network. `false` when unsure (the default).
    fn same_content(&self, a: &Self::Node, b: &Self::Node) -> bool {
        let _ = (a, b);
        false
    }

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
