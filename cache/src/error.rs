//! Errors of the cache.
//!
//! Invariant: every message says which path (or object) failed and what the user can do about
//! it. Damaged object files are not errors: they are misses, repaired by deleting them.

use std::io;
use std::path::{Path, PathBuf};

use blake3::Hash;

/// Why a cache operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A file or directory of the cache could not be read or written.
    #[error(
        "cache file {path}: {source}; check that the cache directory is writable and the disk \
         is not full, or pass --cache to use another"
    )]
    Io {
        /// The file or directory that failed.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
    /// The sled index failed after it was opened.
    #[error(
        "cache index (the index/ directory inside the cache directory): {0}; stop lcfs and \
         delete that directory to have it rebuilt from the object files"
    )]
    Index(#[source] sled::Error),
    /// The sled index met a full file system while writing its log. sled then refuses
    /// every later write until the index is reopened; the index itself is sound.
    #[error(
        "cache index (the index/ directory inside the cache directory) could not write its \
         log: the file system is full ({0}); new objects are not kept until space is freed \
         there and lcfs is restarted (nothing needs deleting)"
    )]
    IndexFull(#[source] sled::Error),
    /// The process that owns the cache directory neither answers nor lets go of it.
    #[error(
        "cache {dir} is locked by lcfs process {pid}, which does not answer on {dir}/cache.sock \
         (waited {secs} s); if it hangs, kill it (the next lcfs process takes the cache over), \
         or pass --cache to use another"
    )]
    OwnerSilent {
        /// The cache directory.
        dir: PathBuf,
        /// The owner's pid, as written in `DIR/lock` (or "?" if unknown).
        pid: String,
        /// How long we waited.
        secs: u64,
    },
    /// The process that owns the cache directory failed a request, or answered nonsense.
    #[error("cache {dir}, owned by lcfs process {pid}: {message}")]
    Owner {
        /// The cache directory.
        dir: PathBuf,
        /// The owner's pid.
        pid: i32,
        /// What went wrong (the owner's own error names the path and the remedy).
        message: String,
    },
    /// The cache socket is not a socket of ours: whoever made it could read what we cache
    /// or feed us objects.
    #[error("cache socket {path} is not a socket owned by you (uid {euid}) but by uid {owner}: refusing it; remove it, or pass --cache with a directory of your own")]
    ForeignSocket {
        /// The socket's path.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Who we are.
        euid: u32,
    },
    /// The cache directory belongs to another user: its owner could read the plaintext it
    /// holds and feed this process objects.
    #[error("cache directory {dir} belongs to uid {owner}, not to you (uid {euid}): refusing it; pass --cache with a directory of your own")]
    Foreign {
        /// The cache directory.
        dir: PathBuf,
        /// Its owner.
        owner: u32,
        /// Who we are.
        euid: u32,
    },
    /// The cache's file system has too little room left, and what the cache holds there is
    /// pinned (or the space is taken by other files).
    #[error(
        "cache {dir}: its file system has {free} bytes free, less than the {want} needed to \
         store an object and keep the index writable, and the rest is pinned or not the \
         cache's; free space there, unpin objects (lcfs cache unpin), or pass --cache with a \
         directory on a larger file system"
    )]
    NoRoom {
        /// The cache directory.
        dir: PathBuf,
        /// Bytes free.
        free: u64,
        /// Bytes needed.
        want: u64,
    },
    /// An operation that needs the cache to itself (verify, clear) found another process
    /// owning it.
    #[error(
        "cache {dir} is in use by lcfs process {pid}, and {what} needs it to itself: stop \
         that process (`lcfs umount MOUNTPOINT` for a mount, Ctrl-C for a copy or prefetch) \
         and run it again"
    )]
    InUse {
        /// The cache directory.
        dir: PathBuf,
        /// The owner's pid, as written in `DIR/lock` (or "?" if unknown).
        pid: String,
        /// What was asked, e.g. "`lcfs cache verify`".
        what: String,
    },
    /// `pin` was asked for an object that is not in the cache.
    #[error("object {hash} is not in cache {dir}; fetch it before pinning it")]
    NotCached {
        /// The object asked for.
        hash: Hash,
        /// The cache directory.
        dir: PathBuf,
    },
}

impl CacheError {
    /// Wraps an I/O error with the path it concerns.
    pub(crate) fn io(path: &Path, source: io::Error) -> CacheError {
        CacheError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Whether the file system (or the user's disk quota) is full.
    pub(crate) fn is_disk_full(&self) -> bool {
        matches!(self, CacheError::Io { source, .. } if disk_full(source))
    }
}

/// Whether an I/O error says the file system (or the user's disk quota) is full.
pub(crate) fn disk_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

impl From<sled::Error> for CacheError {
    fn from(e: sled::Error) -> CacheError {
        match &e {
            sled::Error::Io(io) if disk_full(io) => CacheError::IndexFull(e),
            _ => CacheError::Index(e),
        }
    }
}

/// Attaches a path to I/O errors: `fs::read(p).at(p)?`.
pub(crate) trait IoContext<T> {
    fn at(self, path: &Path) -> Result<T, CacheError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: &Path) -> Result<T, CacheError> {
        self.map_err(|e| CacheError::io(path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_path_and_a_remedy() {
        let silent = CacheError::OwnerSilent {
            dir: PathBuf::from("/x/cache"),
            pid: "42".into(),
            secs: 60,
        };
        let msg = silent.to_string();
        assert!(
            msg.contains("/x/cache/cache.sock") && msg.contains("process 42"),
            "{msg}"
        );
        assert!(msg.contains("kill it") && msg.contains("--cache"), "{msg}");
        let foreign = CacheError::ForeignSocket {
            path: PathBuf::from("/x/cache/cache.sock"),
            owner: 1000,
            euid: 0,
        };
        let msg = foreign.to_string();
        assert!(
            msg.contains("/x/cache/cache.sock") && msg.contains("uid 1000"),
            "{msg}"
        );
        let busy = CacheError::InUse {
            dir: PathBuf::from("/x/cache"),
            pid: "42".into(),
            what: "`lcfs cache clear`".into(),
        };
        let msg = busy.to_string();
        assert!(
            msg.contains("/x/cache") && msg.contains("process 42"),
            "{msg}"
        );
        assert!(
            msg.contains("lcfs umount") && msg.contains("run it again"),
            "{msg}"
        );
        let io = CacheError::io(Path::new("/x/cache/objects"), io::Error::other("boom"));
        let msg = io.to_string();
        assert!(
            msg.contains("/x/cache/objects") && msg.contains("--cache"),
            "{msg}"
        );
    }
}
