//! lcfs verified object cache.
//!
//! Job: keep objects (file blocks, directory encodings, file-index encodings) named by their
//! BLAKE3 hash, so that a mount can read them again without the network, and start offline
//! from the last root record of its channel. DESIGN.md section 5 explains the choices.
//!
//! Layout of the cache directory (mode 0700, shared by every channel):
//!
//! ```text
//! DIR/lock              flock'd by the process that owns the cache; holds its pid
//! DIR/cache.sock        the owner answers the other processes here (mode 0600)
//! DIR/objects/ab/<hex>  object bodies, named by the lowercase hex of their hash
//! DIR/tmp/<pid>-<n>     objects being written; renamed into objects/ when complete
//! DIR/index/            sled: hash -> (disk size, last use, pinned); channel -> root record
//! ```
//!
//! Any number of processes of one user share a cache directory: the first to open it owns
//! the index, the others are its clients and take over when it exits (see [`shared`]).
//!
//! Invariants:
//! - Nothing leaves the cache unverified: [`Cache::get`] returns [`Verified`] bytes, and every
//!   read of an object file re-hashes it. A file that does not match its name (short, bit
//!   flipped, replaced) is deleted and reported as a miss, never as an error or wrong bytes.
//! - Disk use of object files stays within the quota except for pinned objects: after an
//!   insert or unpin, the least recently used unpinned objects are evicted until it fits. An
//!   insert that finds the file system full evicts them too (an eighth of the cache at least)
//!   and tries once more: a full disk costs the oldest objects, not every new one.
//! - The index is disposable: if sled cannot open it, it is rebuilt from the object files.
//! - Bad disk state (garbage names, garbage index values, damaged sled files) never panics.
//!
//! Operators manage a cache with [`Cache::status`] and [`Cache::gc`], which work from any
//! process sharing it, and [`Cache::verify`] and [`Cache::clear`], which need the cache to
//! themselves and refuse, naming the owner's pid, while another process owns it (`lcfs
//! cache`).
//!
//! Recency is kept in memory and written to the index in batches (and before evicting, on
//! [`Cache::flush`] and on close), so reads do not write sled; after a crash the LRU order is
//! approximate.

mod cache;
mod error;
mod index;
mod memory;
mod open;
mod owned;
mod shared;
mod store;
mod verified;

#[cfg(test)]
mod admin_tests;
#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod recovery_tests;
#[cfg(test)]
mod shared_tests;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

/// The decoders of what the cache reads from disk (index records) and from other processes
/// (the sharing protocol), for the fuzz targets in `fuzz/`. Each takes hostile bytes and
/// checks that a decode that succeeds encodes back to the same bytes.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    pub fn index_entry(raw: &[u8]) {
        if let Some(e) = crate::index::Entry::decode(raw) {
            assert_eq!(
                e.encode().as_slice(),
                raw,
                "an index entry re-encodes as read"
            );
        }
        let _ = crate::index::parse_lru_key(raw);
        let _ = crate::index::parse_hash(raw);
    }

    pub fn shared_request(body: &[u8]) {
        if let Ok(r) = crate::shared::wire::Request::decode(body) {
            let again = r.encode();
            assert_eq!(crate::shared::wire::Request::decode(&again[4..]), Ok(r));
        }
    }

    pub fn shared_reply(body: &[u8]) {
        if let Ok(r) = crate::shared::wire::Reply::decode(body) {
            let again = r.encode();
            assert_eq!(crate::shared::wire::Reply::decode(&again[4..]), Ok(r));
        }
        if let Ok(header) = body.try_into() {
            let _ = crate::shared::wire::frame_len(header);
        }
    }
}

pub use blake3::Hash;
pub use cache::Cache;
pub use error::CacheError;
pub use verified::{HashMismatch, Verified};

/// Where and how big the cache is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheConfig {
    /// The cache directory; created with mode 0700 if missing.
    pub dir: PathBuf,
    /// Quota on the real disk use of object files, in bytes; `None` means unlimited.
    pub quota: Option<u64>,
    /// Bytes of hot objects kept in memory in front of the files; 0 disables it.
    pub memory: usize,
}

impl CacheConfig {
    /// Default size of the in-memory LRU: 16 MiB. The kernel's page cache already keeps hot
    /// object files; this only spares the re-hash of objects read again soon after they
    /// arrived (a readahead window) and of metadata, and counts against a mount's memory.
    pub const DEFAULT_MEMORY: usize = 16 << 20;

    /// A cache in `dir`, without quota, with the default memory LRU.
    pub fn new(dir: impl Into<PathBuf>) -> CacheConfig {
        CacheConfig {
            dir: dir.into(),
            quota: None,
            memory: CacheConfig::DEFAULT_MEMORY,
        }
    }

    /// The default cache directory: `/var/cache/lcfs` for root, else `$XDG_CACHE_HOME/lcfs`,
    /// else `$HOME/.cache/lcfs`, else `lcfs-<uid>` in the temporary directory.
    pub fn default_dir() -> PathBuf {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let uid = unsafe { libc::geteuid() };
        if uid == 0 {
            return PathBuf::from("/var/cache/lcfs");
        }
        let absolute = |var: &str| {
            std::env::var_os(var)
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
        };
        if let Some(xdg) = absolute("XDG_CACHE_HOME") {
            return xdg.join("lcfs");
        }
        if let Some(home) = absolute("HOME") {
            return home.join(".cache").join("lcfs");
        }
        std::env::temp_dir().join(format!("lcfs-{uid}"))
    }
}

impl Default for CacheConfig {
    fn default() -> CacheConfig {
        CacheConfig::new(CacheConfig::default_dir())
    }
}

/// How much the cache holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Number of objects on disk.
    pub objects: u64,
    /// Real disk use of their files, in bytes.
    pub disk_bytes: u64,
    /// The part of `disk_bytes` that is pinned.
    pub pinned_bytes: u64,
}

/// What the cache holds and remembers, as [`Cache::status`] reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// Objects and their disk use.
    pub usage: Usage,
    /// The quota of the process that owns the cache (its `--cache-size`), if it has one.
    pub quota: Option<u64>,
    /// Channel id and the last root record remembered for it (opaque bytes), by channel id.
    pub roots: Vec<([u8; 32], Vec<u8>)>,
}

/// What [`Cache::verify`] found and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Object files read and re-hashed.
    pub checked: u64,
    /// Their length in bytes.
    pub checked_bytes: u64,
    /// Object files that did not hash to their name (short, bit flipped, replaced), deleted
    /// with their index entries.
    pub dropped: u64,
    /// Their real disk use.
    pub dropped_bytes: u64,
    /// Index entries without a file, or undecodable, dropped.
    pub forgotten: u64,
    /// Good object files the index did not list, indexed.
    pub adopted: u64,
}
