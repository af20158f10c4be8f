//! One cache directory shared by every lcfs process of a user on a machine.
//!
//! sled cannot be opened by two processes, so one of them owns the directory: the first to
//! take `flock(DIR/lock)`. It keeps the index and answers the others on `DIR/cache.sock`. The
//! others are clients ([`client`]):
//! - they read object files directly (every read re-hashes, so the hot path needs no message
//!   and trusts nothing), and tell the owner in batches which objects they used (LRU order);
//! - they write an object to `DIR/tmp/<pid>-<n>` and ask the owner to commit it: the owner
//!   renames it into place and indexes it under its write lock, so quota and eviction hold
//!   for the whole directory exactly as for one process;
//! - pins, root records, publishers and usage are requests ([`wire`]).
//!
//! When the owner goes away (exit or kill -9), the kernel drops its flock and its sockets; the
//! next request of a client finds the connection closed, takes the lock and becomes the owner
//! (the index's crash recovery adopts files committed but not yet written to the index). A
//! client never waits on a dead owner: a stale socket is replaced by whoever holds the lock.
//!
//! Each process keeps its own fetch engine. Before joining an object's group an engine claims
//! the object ([`claims`]); if another process holds the claim, it waits for that process to
//! store the object instead of joining, so an object several processes want at once is
//! joined, sent and decoded once. An engine that sees another process store an object it is
//! fetching anyway (a claim lost with a dead owner) takes it from the cache and leaves.
//!
//! Security: the directory is 0700 and must be ours; the socket is 0600, must be a socket we
//! own, and both ends check the peer's uid (`SO_PEERCRED`) against their own: no user can
//! read or feed another user's cache, and root's cache is root's alone. (Design choice (b) of
//! issue 10; the alternative, a separate daemon owning cache and engines, would put every
//! read of a mount behind a socket and make one process's crash everyone's.)

pub(crate) mod claims;
pub(crate) mod client;
pub(crate) mod server;
pub(crate) mod wire;

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::CacheError;

/// The socket's name in the cache directory.
pub(crate) const SOCKET: &str = "cache.sock";

/// The longest path `sockaddr_un` takes, with room for its terminating zero.
const SUN_PATH_MAX: usize = 107;

/// How a cache's socket is named in `bind` and `connect`: its path, or, when that is too long
/// for `sockaddr_un`, the same file through a descriptor of the directory
/// (`/proc/self/fd/N/cache.sock`).
pub(crate) struct SockAddr {
    /// The socket's real path, for messages and checks.
    pub(crate) path: PathBuf,
    /// What to pass to bind and connect.
    pub(crate) addr: PathBuf,
    _dir: Option<File>,
}

impl SockAddr {
    pub(crate) fn new(dir: &Path) -> Result<SockAddr, CacheError> {
        let path = dir.join(SOCKET);
        if path.as_os_str().as_bytes().len() <= SUN_PATH_MAX {
            return Ok(SockAddr {
                addr: path.clone(),
                path,
                _dir: None,
            });
        }
        let fd = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(dir)
            .map_err(|e| CacheError::io(dir, e))?;
        let addr = PathBuf::from(format!("/proc/self/fd/{}/{SOCKET}", fd.as_raw_fd()));
        Ok(SockAddr {
            path,
            addr,
            _dir: Some(fd),
        })
    }

    /// Refuses a socket file that is not a socket of ours. `Ok(false)`: there is none.
    pub(crate) fn check_owner(&self) -> Result<bool, CacheError> {
        let meta = match std::fs::symlink_metadata(&self.path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(CacheError::io(&self.path, e)),
        };
        let euid = euid();
        if !meta.file_type().is_socket() || meta.uid() != euid {
            return Err(CacheError::ForeignSocket {
                path: self.path.clone(),
                owner: meta.uid(),
                euid,
            });
        }
        Ok(true)
    }
}

pub(crate) fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The uid and pid of the process at the other end of a Unix socket.
pub(crate) fn peer(sock: &impl AsFd) -> io::Result<(u32, i32)> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given; the descriptor is
    // borrowed for the call.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((cred.uid, cred.pid))
}

/// The pid the owner wrote into `DIR/lock`, for messages.
pub(crate) fn owner_pid(dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(dir.join("lock")).ok()?;
    text.trim().parse().ok()
}
