//! The server's index: every object the tree at PATH publishes, and where its bytes are
//! (DESIGN.md sections 1 and 3).
//!
//! [`index_path`] walks PATH once and returns a [`Published`]: the root directory's reference
//! and every object by hash with the [`Source`] of its bytes. Directories and file indexes are
//! encoded here and kept in memory; blocks stay in their files, named by path and offset, and
//! are read again and re-verified by [`read_block`] each time they are sent.
//!
//! How:
//! - Below PATH the walk never follows symlinks (PATH itself is resolved). Symlinks are recorded
//!   with their raw target bytes; sockets, fifos and devices are left out with a debug log. An
//!   entry that cannot be read (permission denied, vanished, name or target lcfs cannot encode,
//!   a file that keeps changing while read) is skipped with a warning and listed in
//!   [`Published::skipped`]; the rest is served. Only PATH itself failing, or a directory whose
//!   encoding passes [`DIRECTORY_MAX`], stops indexing.
//! - Directory objects are built bottom-up, siblings in parallel (rayon, on a pool of our own
//!   with large stacks, since the recursion follows the tree's depth).
//! - A file is read once, in block-sized `pread`s; each read gives both the block's leaf and its
//!   part of the whole-file BLAKE3, and the blocks of one big file are hashed in parallel too
//!   (see [`hash`]).
//! - A file is `fstat`ed before and after it is read; if it changed meanwhile it is read again,
//!   and skipped after [`READ_ATTEMPTS`] tries.
//! - With a state dir, results are kept in the leaf cache (`leafcache.rs`), so an unchanged file
//!   (same size, mtime, ctime, inode, device, block size) is not read at all, not even when it
//!   is inlined. Entries of files that are gone are dropped after each walk.
//!
//! Invariants of a [`Published`]: each object's hash is the BLAKE3 of the bytes its source gave
//! at index time and its length is their length; every hash reachable from the root (except
//! inline content) is in `objects`; identical blocks, pages or directories are one object.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::{self, File, FileType, Metadata};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use lcfs_cache::Hash;
use rayon::prelude::*;

use super::leafcache::{Body, FileHash, FileStamp, LeafCache};
use crate::object::dir::valid_name;
use crate::object::index::index_ref;
use crate::object::{
    object_ref, BlockSize, Content, Directory, Entry, EntryKind, FileIndex, FileRef, ObjectRef,
    Timestamp, DIRECTORY_MAX, LEAVES_PER_PAGE,
};
use hash::hash_contents;

mod hash;

/// Times a file is read before it is given up as changing too fast to index.
pub const READ_ATTEMPTS: usize = 3;
/// The most pages a top-level file index may list (the decoder's limit).
const MAX_PAGES: u64 = 1 << 20;
/// Stack of each indexing thread: directory recursion is as deep as the tree.
const STACK_BYTES: usize = 64 << 20;
/// Longest symlink target a directory entry carries.
const TARGET_MAX: usize = 4095;

#[derive(Clone, Debug)]
pub struct IndexConfig {
    /// Block size of the channel: files are cut into blocks of this many bytes.
    pub block_size: BlockSize,
    /// Where the leaf cache lives (`leaves.sled` inside); `None` keeps nothing across runs.
    pub state_dir: Option<PathBuf>,
}

impl Default for IndexConfig {
    fn default() -> Self {
        IndexConfig {
            block_size: BlockSize::DEFAULT,
            state_dir: None,
        }
    }
}

/// Where the bytes of one object come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// Directories and file indexes, encoded at index time.
    Memory(Arc<[u8]>),
    /// A block: `len` bytes at `offset` of the file at `path`, which had `size` bytes and
    /// modification time `mtime` when it was indexed.
    File {
        /// Shared by every block of the file: one allocation per file, not per block.
        path: Arc<Path>,
        offset: u64,
        len: u32,
        size: u64,
        mtime: Timestamp,
    },
}

/// Everything one walk of PATH publishes.
#[derive(Clone, Debug)]
pub struct Published {
    /// The root directory object.
    pub root: ObjectRef,
    /// PATH was a regular file: the root directory holds exactly that file.
    pub single_file: bool,
    pub block_size: BlockSize,
    /// Every object by hash, with its length and where its bytes are.
    pub objects: HashMap<Hash, (u32, Source)>,
    /// Regular files published.
    pub files: u64,
    /// Directory objects built, the root included.
    pub dirs: u64,
    pub symlinks: u64,
    /// Total size of the files published.
    pub bytes: u64,
    /// Entries left out because they could not be read, with the reason, sorted by path.
    pub skipped: Vec<(PathBuf, String)>,
    /// File bytes read and hashed by this walk (0 when the leaf cache knew every file).
    pub hashed_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("cannot read {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{} is neither a directory nor a regular file", path.display())]
    NotServable { path: PathBuf },
    #[error("directory {} encodes to {len} bytes, more than the {max} a directory may have", path.display())]
    DirectoryTooLarge {
        path: PathBuf,
        len: usize,
        max: usize,
    },
    #[error("{} has {blocks} blocks, more than a file index can list", path.display())]
    FileTooLarge { path: PathBuf, blocks: u64 },
    #[error("{} cannot be published: {what}", path.display())]
    Unencodable { path: PathBuf, what: &'static str },
    #[error("{} kept changing while it was read ({READ_ATTEMPTS} tries)", path.display())]
    Unstable { path: PathBuf },
    #[error("{} changed since it was indexed", path.display())]
    Changed { path: PathBuf },
}

impl IndexError {
    fn io(path: &Path) -> impl FnOnce(io::Error) -> IndexError + '_ {
        move |source| IndexError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Whether the error stops the whole walk rather than skipping one entry.
    fn is_fatal(&self) -> bool {
        matches!(self, IndexError::DirectoryTooLarge { .. })
    }
}

/// Walks `path` and builds every object it publishes. See the module docs.
pub fn index_path(path: &Path, config: &IndexConfig) -> Result<Published, IndexError> {
    let root = fs::canonicalize(path).map_err(IndexError::io(path))?;
    let meta = fs::metadata(&root).map_err(IndexError::io(path))?;
    let cache = config.state_dir.as_deref().and_then(LeafCache::shared);
    let walker = Walker::new(config.block_size, cache.clone());
    let pool = rayon::ThreadPoolBuilder::new()
        .stack_size(STACK_BYTES)
        .thread_name(|i| format!("lcfs-index-{i}"))
        .build()
        .map_err(|e| IndexError::io(path)(io::Error::other(e)))?;
    let root_ref = pool.install(|| walker.root(path, &root, &meta))?;
    let single_file = !meta.is_dir();
    if let Some(cache) = &cache {
        if !single_file {
            let seen = walker.seen.lock().unwrap_or_else(|e| e.into_inner());
            cache.forget_unseen(&root, &seen);
        }
        cache.flush();
    }
    Ok(walker.finish(root_ref, single_file))
}

/// Re-reads one object's bytes and checks that they still hash to `expected`. Memory sources
/// were encoded by the indexer and are returned as they are; a file that is gone, shorter or
/// different gives [`IndexError::Changed`].
pub fn read_block(source: &Source, expected: &Hash) -> Result<Arc<[u8]>, IndexError> {
    let (path, offset, len) = match source {
        Source::Memory(bytes) => return Ok(bytes.clone()),
        Source::File {
            path, offset, len, ..
        } => (path, *offset, *len as usize),
    };
    let changed = || IndexError::Changed {
        path: path.to_path_buf(),
    };
    let mut buf = vec![0u8; len];
    let read = open_file(path).and_then(|file| file.read_exact_at(&mut buf, offset));
    match read {
        Err(e) if replaced(&e) => Err(changed()),
        Err(e) => Err(IndexError::io(path)(e)),
        Ok(()) if blake3::hash(&buf) != *expected => Err(changed()),
        Ok(()) => Ok(buf.into()),
    }
}

/// Whether a read failed because the file is gone, shorter, or no longer a regular file.
fn replaced(e: &io::Error) -> bool {
    use io::ErrorKind::{NotFound, UnexpectedEof};
    let other_kind = [libc::ELOOP, libc::EISDIR, libc::ENOTDIR];
    matches!(e.kind(), NotFound | UnexpectedEof)
        || e.raw_os_error().is_some_and(|n| other_kind.contains(&n))
}

/// Opens a file for reading without following a final symlink or blocking on a fifo that
/// replaced it.
fn open_file(path: &Path) -> io::Result<File> {
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
}

/// The shared state of one walk; its methods run on many threads at once.
struct Walker {
    block_size: BlockSize,
    cache: Option<LeafCache>,
    objects: Mutex<HashMap<Hash, (u32, Source)>>,
    skipped: Mutex<Vec<(PathBuf, String)>>,
    /// Files whose results are in the leaf cache now.
    seen: Mutex<HashSet<PathBuf>>,
    files: AtomicU64,
    dirs: AtomicU64,
    symlinks: AtomicU64,
    bytes: AtomicU64,
    hashed_bytes: AtomicU64,
}

impl Walker {
    fn new(block_size: BlockSize, cache: Option<LeafCache>) -> Walker {
        Walker {
            block_size,
            cache,
            objects: Mutex::default(),
            skipped: Mutex::default(),
            seen: Mutex::default(),
            files: AtomicU64::new(0),
            dirs: AtomicU64::new(0),
            symlinks: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            hashed_bytes: AtomicU64::new(0),
        }
    }

    fn finish(self, root: ObjectRef, single_file: bool) -> Published {
        let mut skipped = self.skipped.into_inner().unwrap_or_else(|e| e.into_inner());
        skipped.sort();
        Published {
            root,
            single_file,
            block_size: self.block_size,
            objects: self.objects.into_inner().unwrap_or_else(|e| e.into_inner()),
            files: self.files.into_inner(),
            dirs: self.dirs.into_inner(),
            symlinks: self.symlinks.into_inner(),
            bytes: self.bytes.into_inner(),
            skipped,
            hashed_bytes: self.hashed_bytes.into_inner(),
        }
    }

    /// Builds the object of directory `path` and of everything below it.
    fn dir(&self, path: &Path) -> Result<ObjectRef, IndexError> {
        let children = self.list(path)?;
        let entries: Vec<Entry> = children
            .into_par_iter()
            .map(|(name, ty)| self.child(path, name, ty))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .flatten()
            .collect();
        self.add_directory(path, Directory::new(entries))
    }

    /// The root directory of PATH (`given`, resolved to `root`, whose metadata is `meta`).
    fn root(&self, given: &Path, root: &Path, meta: &Metadata) -> Result<ObjectRef, IndexError> {
        if meta.is_dir() {
            self.dir(root)
        } else if meta.is_file() {
            let name = given.file_name().or(root.file_name()).unwrap_or_default();
            self.single_file(root, name.as_bytes())
        } else {
            let path = given.to_path_buf();
            Err(IndexError::NotServable { path })
        }
    }

    fn single_file(&self, path: &Path, name: &[u8]) -> Result<ObjectRef, IndexError> {
        if !valid_name(name) {
            let what = "its name cannot be a directory entry";
            return Err(IndexError::Unencodable {
                path: path.to_path_buf(),
                what,
            });
        }
        let meta = fs::symlink_metadata(path).map_err(IndexError::io(path))?;
        let entry = self.file(path, name.to_vec(), &meta)?;
        self.add_directory(path, Directory::new(vec![entry]))
    }

    fn add_directory(&self, path: &Path, dir: Directory) -> Result<ObjectRef, IndexError> {
        let encoding = dir.encode();
        if encoding.len() > DIRECTORY_MAX {
            let (path, len, max) = (path.to_path_buf(), encoding.len(), DIRECTORY_MAX);
            return Err(IndexError::DirectoryTooLarge { path, len, max });
        }
        self.dirs.fetch_add(1, Relaxed);
        Ok(self.add_memory(encoding))
    }

    /// The names and types in directory `path`; entries whose type cannot be had are skipped.
    fn list(&self, path: &Path) -> Result<Vec<(OsString, FileType)>, IndexError> {
        let mut out = Vec::new();
        for item in fs::read_dir(path).map_err(IndexError::io(path))? {
            let item = item.map_err(IndexError::io(path))?;
            match item.file_type() {
                Ok(ty) => out.push((item.file_name(), ty)),
                Err(e) => self.skip(&item.path(), &e),
            }
        }
        Ok(out)
    }

    /// The entry for `name` in `parent`, or `None` if it is skipped or not servable.
    fn child(
        &self,
        parent: &Path,
        name: OsString,
        ty: FileType,
    ) -> Result<Option<Entry>, IndexError> {
        let path = parent.join(&name);
        let name = name.into_vec();
        let result = if !valid_name(&name) {
            let what = "its name cannot be a directory entry";
            Err(IndexError::Unencodable {
                path: path.clone(),
                what,
            })
        } else {
            self.entry(&path, name, ty)
        };
        match result {
            Err(e) if e.is_fatal() => Err(e),
            Err(e) => {
                self.skip(&path, &e);
                Ok(None)
            }
            Ok(entry) => Ok(entry),
        }
    }

    fn entry(&self, path: &Path, name: Vec<u8>, ty: FileType) -> Result<Option<Entry>, IndexError> {
        if !(ty.is_dir() || ty.is_file() || ty.is_symlink()) {
            tracing::debug!(
                "leaving out {}: not a file, directory or symlink",
                path.display()
            );
            return Ok(None);
        }
        let meta = fs::symlink_metadata(path).map_err(IndexError::io(path))?;
        let kind = if ty.is_dir() {
            EntryKind::Dir(self.dir(path)?)
        } else if ty.is_symlink() {
            let target = symlink_target(path)?;
            self.symlinks.fetch_add(1, Relaxed);
            EntryKind::Symlink(target)
        } else {
            return self.file(path, name, &meta).map(Some);
        };
        Ok(Some(entry_of(name, &meta, kind)))
    }

    /// The entry of regular file `path`, its objects added; `meta` is its `lstat`.
    fn file(&self, path: &Path, name: Vec<u8>, meta: &Metadata) -> Result<Entry, IndexError> {
        let (bs, stamp) = (self.block_size, FileStamp::of(meta));
        let cached = self.cache.as_ref().and_then(|c| c.get(path, &stamp, bs));
        let (meta, hash) = match cached {
            Some(hash) => (meta.clone(), hash),
            None => {
                let (meta, hash) = self.read_file(path)?;
                if let Some(cache) = &self.cache {
                    cache.put(path, &FileStamp::of(&meta), bs, &hash);
                }
                (meta, hash)
            }
        };
        if self.cache.is_some() {
            self.seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(path.to_path_buf());
        }
        let file = self.add_file(path, &meta, hash);
        self.files.fetch_add(1, Relaxed);
        self.bytes.fetch_add(file.size, Relaxed);
        Ok(entry_of(name, &meta, EntryKind::File(file)))
    }

    /// Reads and hashes `path`, again if it changed meanwhile. Returns the `fstat` it matches.
    fn read_file(&self, path: &Path) -> Result<(Metadata, FileHash), IndexError> {
        let file = open_file(path).map_err(IndexError::io(path))?;
        for _ in 0..READ_ATTEMPTS {
            let before = file.metadata().map_err(IndexError::io(path))?;
            self.check_file(path, &before)?;
            let hashed = hash_contents(&file, before.len(), self.block_size);
            self.hashed_bytes.fetch_add(before.len(), Relaxed);
            let after = file.metadata().map_err(IndexError::io(path))?;
            match hashed {
                Ok(hash) if FileStamp::of(&before) == FileStamp::of(&after) => {
                    return Ok((before, hash))
                }
                Err(e) if e.kind() != io::ErrorKind::UnexpectedEof => {
                    return Err(IndexError::io(path)(e))
                }
                _ => tracing::debug!("{} changed while it was read; again", path.display()),
            }
        }
        Err(IndexError::Unstable {
            path: path.to_path_buf(),
        })
    }

    fn check_file(&self, path: &Path, meta: &Metadata) -> Result<(), IndexError> {
        if !meta.is_file() {
            return Err(IndexError::NotServable {
                path: path.to_path_buf(),
            });
        }
        let blocks = self.block_size.blocks_in(meta.len());
        if blocks > MAX_PAGES * LEAVES_PER_PAGE {
            return Err(IndexError::FileTooLarge {
                path: path.to_path_buf(),
                blocks,
            });
        }
        Ok(())
    }

    /// Adds the block and index objects of a file and returns what its entry holds.
    fn add_file(&self, path: &Path, meta: &Metadata, hash: FileHash) -> FileRef {
        let size = meta.len();
        let content = match hash.body {
            Body::Inline(bytes) => Content::Inline(bytes),
            Body::Leaves(leaves) => {
                self.add_blocks(path, meta, &leaves);
                if let [leaf] = leaves[..] {
                    Content::Block(leaf)
                } else {
                    let (top, pages) = FileIndex::build(&leaves);
                    for page in pages {
                        self.add_memory(page);
                    }
                    let top_ref = index_ref(&top);
                    self.add_memory(top);
                    Content::Index {
                        index: top_ref,
                        first_leaf: leaves[0],
                    }
                }
            }
        };
        FileRef {
            size,
            b3: hash.b3,
            content,
        }
    }

    fn add_blocks(&self, path: &Path, meta: &Metadata, leaves: &[Hash]) {
        let (bs, size, mtime) = (self.block_size, meta.len(), mtime_of(meta));
        let shared: Arc<Path> = Arc::from(path);
        let mut objects = self.objects.lock().unwrap_or_else(|e| e.into_inner());
        for (i, leaf) in (0u64..).zip(leaves) {
            objects.entry(*leaf).or_insert_with(|| {
                let (offset, len) = (i * bs.bytes(), bs.block_len(size, i));
                let path = shared.clone();
                (
                    len,
                    Source::File {
                        path,
                        offset,
                        len,
                        size,
                        mtime,
                    },
                )
            });
        }
    }

    fn add_memory(&self, encoding: Vec<u8>) -> ObjectRef {
        let r = object_ref(&encoding);
        let mut objects = self.objects.lock().unwrap_or_else(|e| e.into_inner());
        objects
            .entry(r.hash)
            .or_insert_with(|| (r.len, Source::Memory(encoding.into())));
        r
    }

    fn skip(&self, path: &Path, why: &dyn std::fmt::Display) {
        tracing::warn!("skipping {}: {why}", path.display());
        let entry = (path.to_path_buf(), why.to_string());
        self.skipped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(entry);
    }
}

fn mtime_of(meta: &Metadata) -> Timestamp {
    Timestamp {
        secs: meta.mtime(),
        nanos: meta.mtime_nsec() as u32,
    }
}

fn entry_of(name: Vec<u8>, meta: &Metadata, kind: EntryKind) -> Entry {
    Entry {
        name,
        mode: meta.mode() & 0o7777,
        mtime: mtime_of(meta),
        kind,
    }
}

fn symlink_target(path: &Path) -> Result<Vec<u8>, IndexError> {
    let target = fs::read_link(path)
        .map_err(IndexError::io(path))?
        .into_os_string()
        .into_vec();
    if target.is_empty() || target.len() > TARGET_MAX || target.contains(&0) {
        let what = "its symlink target cannot be carried";
        return Err(IndexError::Unencodable {
            path: path.to_path_buf(),
            what,
        });
    }
    Ok(target)
}

#[cfg(test)]
mod tests;
