//! What a mount session shares with the filesystem it serves: how it was mounted
//! ([`MountConfig`]), the signal that it ended ([`Ended`]) and the counters it reports
//! ([`MountStats`]). Kept apart so that `mount.rs` (which starts sessions), `fuse.rs` and
//! `fs.rs` (which serve them) depend on it and not on each other.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

use tokio::sync::watch;

/// How to mount.
#[derive(Clone, Debug)]
pub struct MountConfig {
    /// Report uid/gid 0 for every node, as published (the source has no owners); otherwise
    /// everything belongs to the mounting user.
    pub keep_ownership: bool,
    /// How long the kernel may cache entries and attributes (contents are immutable per
    /// generation; a new generation invalidates through the notifier).
    pub attr_ttl: Duration,
    /// The first readahead window a sequential reader gets, in bytes.
    pub min_readahead: u64,
    /// The widest readahead window a sequential reader grows to, in bytes.
    pub max_readahead: u64,
    /// The kernel's own readahead for the mount (its bdi `read_ahead_kb`), in bytes; above
    /// 128 KiB it lets the kernel send read requests of up to 1 MiB. 0 leaves the default.
    /// Only root may set it; a user mount keeps the default.
    pub kernel_readahead: u64,
    /// The source name shown in /proc/mounts (the channel).
    pub fs_name: String,
    /// Let users other than the mounting one see the mount (`allow_other`; a user mount needs
    /// `user_allow_other` in /etc/fuse.conf).
    pub allow_other: bool,
    /// Answer getxattr and listxattr with the `user.lcfs.*` attributes. Off, both answer
    /// ENOSYS, after which the kernel stops asking: FUSE keeps no cache of absent
    /// attributes, so with them on `ls -l` costs one request per file it shows (coreutils
    /// asks every file for `security.selinux`), 4 to 5 times the time of a local disk.
    pub xattrs: bool,
    /// Threads reading kernel requests (replies that wait on the network come from tokio
    /// tasks whatever this is).
    pub threads: usize,
}

impl Default for MountConfig {
    fn default() -> Self {
        MountConfig {
            keep_ownership: false,
            attr_ttl: Duration::from_secs(3600),
            min_readahead: 128 * 1024,
            max_readahead: 8 * 1024 * 1024,
            kernel_readahead: 1024 * 1024,
            fs_name: "lcfs".to_string(),
            allow_other: false,
            xattrs: false,
            threads: 1,
        }
    }
}

/// Fires when the session ends; wait for it from threads or from async code.
#[derive(Debug)]
pub(crate) struct Ended {
    done: Mutex<bool>,
    cond: Condvar,
    tx: watch::Sender<bool>,
}

impl Ended {
    pub(crate) fn new() -> Ended {
        Ended {
            done: Mutex::new(false),
            cond: Condvar::new(),
            tx: watch::Sender::new(false),
        }
    }

    pub(crate) fn set(&self) {
        *self.done.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cond.notify_all();
        self.tx.send_replace(true);
    }

    /// Resolves when the session ends.
    pub(crate) async fn wait_async(&self) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|done| *done).await;
    }

    pub(crate) fn is_set(&self) -> bool {
        *self.done.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn wait(&self) {
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        while !*done {
            done = self.cond.wait(done).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// What the filesystem holds, for diagnostics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MountStats {
    /// Inodes the kernel holds lookups on, the root included.
    pub inodes: usize,
    /// Open files.
    pub open_files: usize,
}

/// The filesystem's counters, whatever its source type.
pub(crate) trait Census: Send + Sync {
    fn stats(&self) -> MountStats;
}
