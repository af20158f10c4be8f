//! The leaf cache: hashing results that survive a restart, so that serving an unchanged tree
//! again reads no file data (DESIGN.md section 3).
//!
//! One sled database at `STATE_DIR/leaves.sled`, keyed by a file's absolute path bytes. A value
//! records what the file looked like when it was read (size, mtime, ctime, inode, device) and
//! the block size, then what reading it gave: the whole-file BLAKE3 and either the leaf hashes
//! or, for a file small enough to be inlined, its bytes (so inline files need no read either).
//! Value encoding (version 1, little-endian): `"LCLC" 1 | size u64 | mtime i64 u32 |
//! ctime i64 u32 | ino u64 | dev u64 | block_log2 u8 | b3 [32] | body`, the body being
//! `0 | bytes[size]` or `1 | count u32 | leaf [32] * count`.
//!
//! Invariants:
//! - A lookup answers only when every recorded attribute equals the file's now. ctime is
//!   compared as well as mtime because a program can set mtime back but not ctime; a changed
//!   file is read again and its entry overwritten, one entry per path.
//! - A stored value that does not decode, or does not fit its own size, is a miss, never an
//!   error: the cache is an optimisation and never a reason not to serve.
//! - A database is opened once per state dir and kept open for the life of the process, so the
//!   state dir stays locked against a second `lcfs serve` and reindexing reuses it. One that
//!   cannot be opened because it is locked is left alone (the caller indexes without it); one
//!   that cannot be opened for any other reason is taken as corrupt and recreated empty.

use std::collections::{HashMap, HashSet};
use std::os::unix::ffi::OsStrExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use crate::wire::object::codec::{Reader, Writer};
use crate::wire::object::{BlockSize, FileHash, ObjectError, ObjectHash, Timestamp, INLINE_MAX};

const MAGIC: &[u8; 4] = b"LCLC";
const VERSION: u8 = 1;
/// Name of the database inside the state dir.
pub(crate) const DB_NAME: &str = "leaves.sled";
/// sled's in-memory page cache; leaves are read once per start, so little is needed.
/// Lookups happen while indexing; a small cache keeps the serving process lean.
const SLED_CACHE_BYTES: u64 = 8 << 20;

/// What identifies one version of a file without reading it (made from a `statx` by the
/// indexer, `dev` encoded as `st_dev`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileStamp {
    pub size: u64,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub ino: u64,
    pub dev: u64,
}

/// The result of reading a file: its whole-file BLAKE3 and its leaves or inline bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HashedFile {
    pub b3: FileHash,
    pub body: Body,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Body {
    /// The whole file, for files of at most [`INLINE_MAX`] bytes.
    Inline(Vec<u8>),
    /// One leaf per block, for larger files.
    Leaves(Vec<ObjectHash>),
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum CacheError {
    #[error("{} is locked by another process", .0.display())]
    Locked(PathBuf),
    #[error("cannot open {}: {reason}", path.display())]
    Open { path: PathBuf, reason: String },
}

/// A handle on the leaf cache of one state dir. Cheap to clone.
#[derive(Clone)]
pub(crate) struct LeafCache {
    db: sled::Db,
}

/// The databases this process has open, by state dir.
static OPEN: OnceLock<Mutex<HashMap<PathBuf, sled::Db>>> = OnceLock::new();

impl LeafCache {
    /// The leaf cache of `state_dir`, opened on first use and kept open. `None`, after a
    /// warning that says why, when it cannot be had: the caller then indexes without it.
    pub fn shared(state_dir: &Path) -> Option<LeafCache> {
        let registry = OPEN.get_or_init(Default::default);
        let mut open = registry.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(db) = open.get(state_dir) {
            return Some(LeafCache { db: db.clone() });
        }
        let cache = Self::open_or_recreate(state_dir)?;
        open.insert(state_dir.to_path_buf(), cache.db.clone());
        Some(cache)
    }

    fn open_or_recreate(state_dir: &Path) -> Option<LeafCache> {
        let warn_without = |e: &dyn std::fmt::Display| {
            tracing::warn!("leaf cache unavailable ({e}); every file will be read and hashed");
        };
        match Self::open(state_dir) {
            Ok(cache) => return Some(cache),
            Err(CacheError::Locked(_)) => {
                tracing::warn!(
                    "state dir {} is in use by another `lcfs serve`; give this one its own with \
                     --state DIR. Indexing without the leaf cache",
                    state_dir.display()
                );
                return None;
            }
            Err(e) => tracing::warn!("leaf cache looks corrupt ({e}); recreating it empty"),
        }
        let db_path = state_dir.join(DB_NAME);
        if let Err(e) = std::fs::remove_dir_all(&db_path) {
            warn_without(&format!("cannot remove {}: {e}", db_path.display()));
            return None;
        }
        Self::open(state_dir).map_err(|e| warn_without(&e)).ok()
    }

    /// Opens (creating it if needed) the database of `state_dir`, without sharing it.
    pub fn open(state_dir: &Path) -> Result<LeafCache, CacheError> {
        let path = state_dir.join(DB_NAME);
        let fail = |reason: String| CacheError::Open {
            path: path.clone(),
            reason,
        };
        std::fs::create_dir_all(state_dir).map_err(|e| fail(e.to_string()))?;
        let config = sled::Config::new()
            .path(&path)
            .cache_capacity(SLED_CACHE_BYTES);
        // sled 0.34 can panic on some damaged files instead of returning an error.
        match catch_unwind(AssertUnwindSafe(|| config.open())) {
            Ok(Ok(db)) => Ok(LeafCache { db }),
            Ok(Err(e)) if e.to_string().contains("could not acquire lock") => {
                Err(CacheError::Locked(path))
            }
            Ok(Err(e)) => Err(fail(e.to_string())),
            Err(_) => Err(fail("sled panicked while opening it".into())),
        }
    }

    /// The stored result for `path`, if it was stored for this very file version and block size.
    pub fn get(&self, path: &Path, stamp: &FileStamp, block_size: BlockSize) -> Option<HashedFile> {
        let value = match self.db.get(path.as_os_str().as_bytes()) {
            Ok(v) => v?,
            Err(e) => {
                tracing::debug!("leaf cache read of {} failed: {e}", path.display());
                return None;
            }
        };
        match decode(&value) {
            Ok((s, bs, hash)) if s == *stamp && bs == block_size => Some(hash),
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(
                    "ignoring undecodable leaf cache entry of {}: {e}",
                    path.display()
                );
                None
            }
        }
    }

    /// Stores the result of reading `path`, replacing whatever was stored for it.
    pub fn put(&self, path: &Path, stamp: &FileStamp, block_size: BlockSize, hash: &HashedFile) {
        let value = encode(stamp, block_size, hash);
        if let Err(e) = self.db.insert(path.as_os_str().as_bytes(), value) {
            tracing::warn!(
                "cannot store the leaves of {} in the leaf cache: {e}",
                path.display()
            );
        }
    }

    /// Drops the entries of files under directory `root` that are not in `seen` (deleted files).
    pub fn forget_unseen(&self, root: &Path, seen: &HashSet<PathBuf>) {
        let mut prefix = root.as_os_str().as_bytes().to_vec();
        if prefix.last() != Some(&b'/') {
            prefix.push(b'/');
        }
        let stale: Vec<sled::IVec> = self
            .db
            .scan_prefix(&prefix)
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !seen.contains(Path::new(std::ffi::OsStr::from_bytes(k))))
            .collect();
        for key in stale {
            let _ = self.db.remove(key);
        }
    }

    /// Writes everything stored so far to disk.
    pub fn flush(&self) {
        if let Err(e) = self.db.flush() {
            tracing::warn!("cannot flush the leaf cache: {e}");
        }
    }
}

fn encode(stamp: &FileStamp, block_size: BlockSize, hash: &HashedFile) -> Vec<u8> {
    let mut w = Writer::header(MAGIC, VERSION);
    w.u64(stamp.size);
    for t in [stamp.mtime, stamp.ctime] {
        w.i64(t.secs);
        w.u32(t.nanos);
    }
    w.u64(stamp.ino);
    w.u64(stamp.dev);
    w.u8(block_size.log2());
    w.hash(hash.b3.as_bytes());
    match &hash.body {
        Body::Inline(bytes) => {
            w.u8(0);
            w.bytes(bytes);
        }
        Body::Leaves(leaves) => {
            w.u8(1);
            w.u32(leaves.len() as u32);
            leaves.iter().for_each(|h| w.hash(h.as_bytes()));
        }
    }
    w.buf
}

fn decode(buf: &[u8]) -> Result<(FileStamp, BlockSize, HashedFile), ObjectError> {
    let mut r = Reader::new(buf);
    r.header(MAGIC, "leaf cache entry", VERSION)?;
    let size = r.u64()?;
    let mtime = Timestamp {
        secs: r.i64()?,
        nanos: r.u32()?,
    };
    let ctime = Timestamp {
        secs: r.i64()?,
        nanos: r.u32()?,
    };
    let (ino, dev) = (r.u64()?, r.u64()?);
    let block_size = BlockSize::from_log2(r.u8()?)?;
    let b3 = r.file_hash()?;
    let body = decode_body(&mut r, size, block_size)?;
    r.finish()?;
    let stamp = FileStamp {
        size,
        mtime,
        ctime,
        ino,
        dev,
    };
    Ok((stamp, block_size, HashedFile { b3, body }))
}

/// The body of an entry for a file of `size` bytes: inline bytes or exactly its leaves.
fn decode_body(r: &mut Reader, size: u64, block_size: BlockSize) -> Result<Body, ObjectError> {
    Ok(match r.u8()? {
        0 if size <= INLINE_MAX => Body::Inline(r.bytes(size as usize)?.to_vec()),
        1 if size > INLINE_MAX => {
            let blocks = block_size.blocks_in(size);
            let n = r.count(32, usize::try_from(blocks).unwrap_or(usize::MAX))?;
            if n as u64 != blocks {
                return Err(ObjectError::Invalid("leaf count does not fit the size"));
            }
            Body::Leaves((0..n).map(|_| r.object_hash()).collect::<Result<_, _>>()?)
        }
        _ => return Err(ObjectError::Invalid("body does not fit the size")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(size: u64) -> FileStamp {
        let t = Timestamp {
            secs: 1_700_000_000,
            nanos: 7,
        };
        FileStamp {
            size,
            mtime: t,
            ctime: t,
            ino: 42,
            dev: 3,
        }
    }

    fn leaves(size: u64) -> HashedFile {
        let n = BlockSize::DEFAULT.blocks_in(size);
        let leaves = (0..n).map(|i| ObjectHash::of(&i.to_le_bytes())).collect();
        HashedFile {
            b3: FileHash::of(b"b3"),
            body: Body::Leaves(leaves),
        }
    }

    #[test]
    fn round_trip_and_stamp_checks() {
        let dir = tempfile::tempdir().unwrap();
        let cache = LeafCache::open(dir.path()).unwrap();
        let (path, bs) = (Path::new("/srv/a file"), BlockSize::DEFAULT);
        let big = leaves(200_000);
        cache.put(path, &stamp(200_000), bs, &big);
        assert_eq!(cache.get(path, &stamp(200_000), bs), Some(big));
        let mut other = stamp(200_000);
        other.ctime.nanos += 1;
        assert_eq!(cache.get(path, &other, bs), None);
        assert_eq!(
            cache.get(path, &stamp(200_000), BlockSize::from_log2(14).unwrap()),
            None
        );
        let small = HashedFile {
            b3: FileHash::of(b"hi"),
            body: Body::Inline(b"hi".to_vec()),
        };
        cache.put(path, &stamp(2), bs, &small);
        assert_eq!(cache.get(path, &stamp(2), bs), Some(small));
        assert_eq!(cache.get(path, &stamp(200_000), bs), None, "entry replaced");
    }

    #[test]
    fn survives_reopen_and_forgets_deleted_files() {
        let dir = tempfile::tempdir().unwrap();
        let bs = BlockSize::DEFAULT;
        {
            let cache = LeafCache::open(dir.path()).unwrap();
            for p in ["/r/a", "/r/b", "/rb/c"] {
                cache.put(Path::new(p), &stamp(5000), bs, &leaves(5000));
            }
            let seen = HashSet::from([PathBuf::from("/r/a")]);
            cache.forget_unseen(Path::new("/r"), &seen);
            cache.flush();
        }
        let cache = LeafCache::open(dir.path()).unwrap();
        let got = |p: &str| cache.get(Path::new(p), &stamp(5000), bs).is_some();
        assert!(got("/r/a") && !got("/r/b") && got("/rb/c"));
    }

    #[test]
    fn second_open_is_locked() {
        let dir = tempfile::tempdir().unwrap();
        let _first = LeafCache::open(dir.path()).unwrap();
        assert!(matches!(
            LeafCache::open(dir.path()),
            Err(CacheError::Locked(_))
        ));
        assert!(LeafCache::shared(dir.path()).is_none());
    }

    #[test]
    fn corrupt_database_is_recreated() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join(DB_NAME);
        std::fs::create_dir_all(&db).unwrap();
        std::fs::write(db.join("conf"), b"garbage, not a sled config").unwrap();
        std::fs::write(db.join("db"), vec![0xa5; 100_000]).unwrap();
        assert!(matches!(
            LeafCache::open(dir.path()),
            Err(CacheError::Open { .. })
        ));
        let cache = LeafCache::shared(dir.path()).expect("recreated");
        cache.put(Path::new("/x"), &stamp(1), BlockSize::DEFAULT, &leaves(0));
    }

    #[test]
    fn undecodable_values_are_misses() {
        let dir = tempfile::tempdir().unwrap();
        let cache = LeafCache::open(dir.path()).unwrap();
        let (path, bs) = (Path::new("/f"), BlockSize::DEFAULT);
        let good = encode(&stamp(200_000), bs, &leaves(200_000));
        for n in [0, 5, good.len() - 1] {
            cache.db.insert(b"/f", &good[..n]).unwrap();
            assert_eq!(cache.get(path, &stamp(200_000), bs), None);
        }
        let wrong_count = encode(&stamp(200_000), bs, &leaves(100_000));
        cache.db.insert(b"/f", wrong_count).unwrap();
        assert_eq!(cache.get(path, &stamp(200_000), bs), None);
    }
}
