//! The server's index: every object the tree at PATH publishes, and where its bytes are
//! (DESIGN.md sections 1 and 3).
//!
//! [`Tree::open`] resolves PATH once and holds it open; [`index_tree`] walks that [`Tree`] and
//! returns a [`Published`]: the root directory's reference and every object by hash with the
//! [`Source`] of its bytes. Directories and file indexes are encoded here and kept in memory;
//! blocks stay in their files, named by path relative to the tree and offset, and are read
//! again through the tree and re-verified by [`read_block`] each time they are sent.
//!
//! How:
//! - The walk goes by descriptor, one name at a time, and never leaves the tree: no symlink is
//!   followed below PATH, and what is published is what was opened (see `beneath.rs`, which
//!   holds every file system call the server makes on the tree). Symlinks are recorded with
//!   their raw target bytes; sockets, fifos and devices are left out with a warning naming them
//!   (and listed in [`Published::skipped`]), and are never read, also when one is swapped in
//!   for a file. An entry that cannot be read (permission denied, vanished, swapped for a
//!   symlink, name or target lcfs cannot encode, deeper than [`MAX_DEPTH`], a file that keeps
//!   changing while read) is skipped with a warning and listed in [`Published::skipped`]; the
//!   rest is served. Only PATH itself failing, or a directory whose encoding passes
//!   [`DIRECTORY_MAX`], stops indexing.
//! - Directory objects are built bottom-up, siblings in parallel (rayon, on a pool of our own
//!   with large stacks, since the recursion follows the tree's depth).
//! - A file is read once, in block-sized `pread`s; each read gives both the block's leaf and its
//!   part of the whole-file BLAKE3, and the blocks of one big file are hashed in parallel too
//!   (see [`hash`]).
//! - A file is `fstat`ed before and after it is read; if it changed meanwhile it is read again,
//!   and skipped after [`READ_ATTEMPTS`] tries.
//! - Paths matched by `.lcfsignore` at the tree's root (gitignore syntax, see `ignore.rs`)
//!   are left out, and so is that file; an ignored directory is not entered.
//! - With a state dir, results are kept in the leaf cache (`leafcache.rs`), so an unchanged file
//!   (same size, mtime, ctime, inode, device, block size) is not read at all, not even when it
//!   is inlined. Entries of files that are gone are dropped after each walk.
//!
//! Invariants of a [`Published`]: each object's hash is the BLAKE3 of the bytes its source gave
//! at index time and its length is their length; every hash reachable from the root (except
//! inline content) is in `objects`; identical blocks, pages or directories are one object. The
//! exception: each directory's bundles ([`crate::wire::object::bundle`]) are in `objects` too, keyed
//! by their id, and their members, blocks of the same walk, are in `objects` themselves.

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use super::leafcache::{Body, HashedFile, LeafCache};
use crate::wire::object::bundle::bundles;
use crate::wire::object::dir::{valid_name, DirMeta, MAX_NLINK};
use crate::wire::object::index::index_ref;
use crate::wire::object::{
    object_ref, BlockSize, Content, Directory, Entry, EntryKind, FileIndex, FileRef, ObjectHash,
    ObjectRef, DIRECTORY_MAX, LEAVES_PER_PAGE,
};
pub use beneath::Tree;
use beneath::{Attrs, Kind};
use hash::hash_contents;
pub use ignore::{IgnoreRules, IGNORE_FILE};

pub(crate) mod beneath;
mod hash;
mod ignore;

/// Times a file is read before it is given up as changing too fast to index.
pub const READ_ATTEMPTS: usize = 3;
/// The most pages a top-level file index may list (the decoder's limit).
const MAX_PAGES: u64 = 1 << 20;
/// Stack of each indexing thread: directory recursion is as deep as the tree.
const STACK_BYTES: usize = 64 << 20;
/// Longest symlink target a directory entry carries.
const TARGET_MAX: usize = 4095;
/// Deepest directory published, below PATH. Paths by name stopped near here (`PATH_MAX` is
/// 4096 bytes); a walk by descriptor has no such limit but holds a descriptor per level.
pub const MAX_DEPTH: usize = 2048;

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
    /// A block: `len` bytes at `offset` of the file at `path`. Nothing else about the file
    /// is kept: a block is re-hashed whenever it is read, which is what says whether it
    /// still is what was published (a server holds one of these per block, 164,000 for a
    /// 10 GiB file).
    File {
        /// Relative to the [`Tree`], plain names only; shared by every block of the file:
        /// one allocation per file, not per block.
        path: Arc<Path>,
        offset: u64,
        len: u32,
    },
    /// A bundle (see [`crate::wire::object::bundle`]): the bytes of its members, each an object of
    /// this table, one after another. Keyed by the bundle's id, not by a hash of its bytes.
    Bundle(Arc<[ObjectRef]>),
}

/// One published object: its length, where its bytes are, and the last generation that
/// published it (set by [`super::table::Table`]; the indexer leaves it 0). The indexer's map
/// of these becomes the table's as it is, not copied: at 10 GiB a second map of every
/// block was 28 MB of the server's peak memory.
#[derive(Clone, Debug)]
pub struct Object {
    pub len: u32,
    pub source: Source,
    pub generation: u64,
}

impl Object {
    fn new(len: u32, source: Source) -> Object {
        Object {
            len,
            source,
            generation: 0,
        }
    }
}

/// Everything one walk of PATH publishes.
#[derive(Clone, Debug)]
pub struct Published {
    /// The root directory object.
    pub root: ObjectRef,
    /// PATH was a regular file: the root directory holds exactly that file.
    pub single_file: bool,
    pub block_size: BlockSize,
    /// The tree walked: file sources are relative to it, and are read again through it.
    pub tree: Arc<Tree>,
    /// Every object by hash, with its length and where its bytes are.
    pub objects: HashMap<ObjectHash, Object>,
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
    /// The `.lcfsignore` rules this walk followed.
    pub ignore: Arc<IgnoreRules>,
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
    #[error("{} is more than {max} directories below the served path", path.display())]
    TooDeep { path: PathBuf, max: usize },
    #[error("cannot use the ignore file {}: {why}", path.display())]
    IgnoreFile { path: PathBuf, why: String },
}

impl IndexError {
    pub(crate) fn io(path: &Path) -> impl FnOnce(io::Error) -> IndexError + '_ {
        move |source| IndexError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Whether the error stops the whole walk rather than skipping one entry.
    fn is_fatal(&self) -> bool {
        matches!(
            self,
            IndexError::DirectoryTooLarge { .. } | IndexError::IgnoreFile { .. }
        )
    }
}

/// Opens `path` (see [`Tree::open`]) and indexes it once.
pub fn index_path(path: &Path, config: &IndexConfig) -> Result<Published, IndexError> {
    index_tree(&Arc::new(Tree::open(path)?), config)
}

/// Walks `tree` by descriptor and builds every object it publishes. See the module docs.
pub fn index_tree(tree: &Arc<Tree>, config: &IndexConfig) -> Result<Published, IndexError> {
    let (walker, root, single_file) = walk(tree, config)?;
    Ok(walker.finish(root, single_file))
}

/// What [`index_tree_unless`] found when the root was the one given.
pub struct Unchanged {
    /// What the walk left out, as [`Published::skipped`].
    pub skipped: Vec<(PathBuf, String)>,
    /// The ignore rules it walked by, as [`Published::ignore`] (a rule for a path that does
    /// not exist yet changes no root, and must still be followed).
    pub ignore: Arc<IgnoreRules>,
}

/// [`index_tree`], unless the walk's root is `unchanged`: then [`Unchanged`], and no object
/// of a block was made. A periodic rescan of an unchanged tree finds exactly that; at 10 GiB
/// making every block's object, only to drop them, raised the server's peak memory by
/// 47 MB (its map of 164,000 entries, and the map it grew out of) once a minute.
pub fn index_tree_unless(
    tree: &Arc<Tree>,
    config: &IndexConfig,
    unchanged: ObjectRef,
) -> Result<Result<Published, Unchanged>, IndexError> {
    let (walker, root, single_file) = walk(tree, config)?;
    if root != unchanged {
        return Ok(Ok(walker.finish(root, single_file)));
    }
    Ok(Err(Unchanged {
        skipped: sorted(walker.skipped),
        ignore: walker.ignore,
    }))
}

/// One walk of `tree`: the walker holding what it found, the root, and whether the tree is a
/// single file. The leaf cache has forgotten the files the walk no longer saw.
fn walk(tree: &Arc<Tree>, config: &IndexConfig) -> Result<(Walker, ObjectRef, bool), IndexError> {
    let cache = config.state_dir.as_deref().and_then(LeafCache::shared);
    let ignore = Arc::new(IgnoreRules::load(tree)?);
    let walker = Walker::new(tree.clone(), config.block_size, cache.clone(), ignore);
    let pool = rayon::ThreadPoolBuilder::new()
        .stack_size(STACK_BYTES)
        .thread_name(|i| format!("lcfs-index-{i}"))
        .build()
        .map_err(|e| IndexError::io(tree.dir_path())(io::Error::other(e)))?;
    let root_ref = pool.install(|| walker.root())?;
    let single_file = tree.single_file().is_some();
    if let Some(cache) = &cache {
        if !single_file {
            let seen = walker.seen.lock().unwrap_or_else(|e| e.into_inner());
            cache.forget_unseen(tree.dir_path(), &seen);
        }
        cache.flush();
    }
    Ok((walker, root_ref, single_file))
}

/// What a walk skipped, in path order.
fn sorted(skipped: Mutex<Vec<(PathBuf, String)>>) -> Vec<(PathBuf, String)> {
    let mut skipped = skipped.into_inner().unwrap_or_else(|e| e.into_inner());
    skipped.sort();
    skipped
}

/// Re-reads one object's bytes from `tree` and checks that they still hash to `expected`.
/// Memory sources were encoded by the indexer and are returned as they are; a file that is
/// gone, shorter, different, no longer a regular file, or reachable only through a symlink
/// gives [`IndexError::Changed`]. Nothing outside `tree` is opened (see [`Tree::open_file`]).
pub fn read_block(
    tree: &Tree,
    source: &Source,
    expected: &ObjectHash,
) -> Result<Arc<[u8]>, IndexError> {
    let (rel, offset, len) = match source {
        Source::Memory(bytes) => return Ok(bytes.clone()),
        // Read member by member by `Table::load`, which knows the members' sources.
        Source::Bundle(_) => {
            let path = PathBuf::from("(a bundle, read as its members)");
            return Err(IndexError::NotServable { path });
        }
        Source::File {
            path, offset, len, ..
        } => (path, *offset, *len as usize),
    };
    let changed = || IndexError::Changed {
        path: tree.display(rel),
    };
    let mut buf = vec![0u8; len];
    let read = tree.open_file(rel).and_then(|file| {
        if beneath::stat_fd(&file)?.kind != Kind::File {
            return Err(io::Error::from_raw_os_error(libc::EISDIR));
        }
        file.read_exact_at(&mut buf, offset)
    });
    match read {
        Err(e) if replaced(&e) => Err(changed()),
        Err(e) => Err(IndexError::io(&tree.display(rel))(e)),
        Ok(()) if ObjectHash::of(&buf) != *expected => Err(changed()),
        Ok(()) => Ok(buf.into()),
    }
}

/// Whether a read failed because the file is gone, shorter, no longer a regular file, or
/// now behind a symlink (`ELOOP`, or `EXDEV` from `RESOLVE_BENEATH`).
fn replaced(e: &io::Error) -> bool {
    use io::ErrorKind::{NotFound, UnexpectedEof};
    let other_kind = [libc::ELOOP, libc::EISDIR, libc::ENOTDIR, libc::EXDEV];
    matches!(e.kind(), NotFound | UnexpectedEof)
        || e.raw_os_error().is_some_and(|n| other_kind.contains(&n))
}

/// A file's blocks as the walk found them: 32 bytes a block until they become objects.
struct FileBlocks {
    /// Relative to the tree; shared by every block of the file.
    path: Arc<Path>,
    size: u64,
    leaves: Vec<ObjectHash>,
}

impl FileBlocks {
    fn add_to(self, bs: BlockSize, objects: &mut HashMap<ObjectHash, Object>) {
        for (i, leaf) in bs.blocks_of(self.size).zip(self.leaves) {
            objects.entry(leaf).or_insert_with(|| {
                let (offset, len) = (bs.offset_of(i), bs.block_len(self.size, i));
                let path = self.path.clone();
                Object::new(len, Source::File { path, offset, len })
            });
        }
    }
}

/// The shared state of one walk; its methods run on many threads at once.
struct Walker {
    tree: Arc<Tree>,
    block_size: BlockSize,
    cache: Option<LeafCache>,
    ignore: Arc<IgnoreRules>,
    objects: Mutex<HashMap<ObjectHash, Object>>,
    /// Each file's blocks, made objects only once the walk's root is known to be wanted
    /// (see [`index_tree_unless`]).
    blocks: Mutex<Vec<FileBlocks>>,
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
    fn new(
        tree: Arc<Tree>,
        block_size: BlockSize,
        cache: Option<LeafCache>,
        ignore: Arc<IgnoreRules>,
    ) -> Walker {
        Walker {
            tree,
            block_size,
            cache,
            ignore,
            objects: Mutex::default(),
            blocks: Mutex::default(),
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
        let skipped = sorted(self.skipped);
        let mut objects = self.objects.into_inner().unwrap_or_else(|e| e.into_inner());
        let blocks = self.blocks.into_inner().unwrap_or_else(|e| e.into_inner());
        objects.reserve(blocks.iter().map(|f| f.leaves.len()).sum());
        for file in blocks {
            file.add_to(self.block_size, &mut objects);
        }
        Published {
            root,
            single_file,
            block_size: self.block_size,
            tree: self.tree,
            objects,
            files: self.files.into_inner(),
            dirs: self.dirs.into_inner(),
            symlinks: self.symlinks.into_inner(),
            bytes: self.bytes.into_inner(),
            skipped,
            hashed_bytes: self.hashed_bytes.into_inner(),
            ignore: self.ignore,
        }
    }

    /// The root directory: the tree's directory, or one holding just the single file.
    fn root(&self) -> Result<ObjectRef, IndexError> {
        let tree = self.tree.clone();
        match tree.single_file() {
            None => {
                let path = self.tree.display(Path::new(""));
                let own = beneath::stat_fd(tree.dir()).map_err(IndexError::io(&path))?;
                self.dir(tree.dir(), &own, Path::new(""), 0).map(|(r, _)| r)
            }
            Some((name, published)) => self.single_file(name, published),
        }
    }

    /// Builds the object of directory `fd` (at `rel` in the tree, `depth` levels down) and of
    /// everything below it.
    /// `own` is its `fstat`. Returns its object and how many subdirectories it has.
    fn dir(
        &self,
        fd: &OwnedFd,
        own: &Attrs,
        rel: &Path,
        depth: usize,
    ) -> Result<(ObjectRef, u32), IndexError> {
        let path = self.tree.display(rel);
        let names = beneath::list(fd).map_err(IndexError::io(&path))?;
        let entries: Vec<Entry> = names
            .into_par_iter()
            .map(|name| self.child(fd, rel, name, depth))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .flatten()
            .collect();
        let subdirs = entries
            .iter()
            .filter(|e| matches!(e.kind, EntryKind::Dir(_)))
            .count() as u32;
        let meta = DirMeta {
            mode: own.mode,
            mtime: own.mtime,
        };
        let r = self.add_directory(&path, Directory::with_meta(entries, meta))?;
        Ok((r, subdirs))
    }

    fn single_file(&self, name: &CStr, published: &[u8]) -> Result<ObjectRef, IndexError> {
        let rel = Path::new(OsStr::from_bytes(name.to_bytes()));
        let path = self.tree.display(rel);
        if !valid_name(published) {
            let what = "its name cannot be a directory entry";
            return Err(IndexError::Unencodable { path, what });
        }
        let dir = self.tree.dir().as_fd();
        let attrs = beneath::stat_at(dir, name).map_err(IndexError::io(&path))?;
        if attrs.kind != Kind::File {
            return Err(IndexError::NotServable { path });
        }
        let entry = self.file(dir, rel, name, published.to_vec(), &attrs)?;
        self.add_directory(&path, Directory::new(vec![entry]))
    }

    fn add_directory(&self, path: &Path, dir: Directory) -> Result<ObjectRef, IndexError> {
        let encoding = dir.encode();
        if encoding.len() > DIRECTORY_MAX {
            let (path, len, max) = (path.to_path_buf(), encoding.len(), DIRECTORY_MAX);
            return Err(IndexError::DirectoryTooLarge { path, len, max });
        }
        self.dirs.fetch_add(1, Relaxed);
        self.add_bundles(&dir);
        Ok(self.add_memory(encoding))
    }

    /// The bundles of `dir`'s small files, published beside their members.
    fn add_bundles(&self, dir: &Directory) {
        let bundles = bundles(dir, self.block_size);
        if bundles.is_empty() {
            return;
        }
        let mut objects = self.objects.lock().unwrap_or_else(|e| e.into_inner());
        for b in bundles {
            objects
                .entry(b.id.hash)
                .or_insert_with(|| Object::new(b.id.len, Source::Bundle(b.members)));
        }
    }

    /// The entry for `name` in directory `dir` (at `parent` in the tree), or `None` if it is
    /// skipped or not servable.
    fn child(
        &self,
        dir: &OwnedFd,
        parent: &Path,
        name: CString,
        depth: usize,
    ) -> Result<Option<Entry>, IndexError> {
        let rel = parent.join(OsStr::from_bytes(name.to_bytes()));
        let result = if !valid_name(name.to_bytes()) {
            let what = "its name cannot be a directory entry";
            Err(IndexError::Unencodable {
                path: self.tree.display(&rel),
                what,
            })
        } else {
            self.entry(dir.as_fd(), &rel, &name, depth)
        };
        match result {
            Err(e) if e.is_fatal() => Err(e),
            Err(e) => {
                self.skip(&self.tree.display(&rel), &e);
                Ok(None)
            }
            Ok(entry) => Ok(entry),
        }
    }

    /// The entry of `name` in `dir`. Its kind comes from an `lstat`; what is then published
    /// comes from the `fstat` of what was opened (a symlink, fifo or device swapped in
    /// meanwhile fails to open or is found out, see `beneath.rs`).
    fn entry(
        &self,
        dir: BorrowedFd,
        rel: &Path,
        name: &CStr,
        depth: usize,
    ) -> Result<Option<Entry>, IndexError> {
        let path = || self.tree.display(rel);
        let attrs = beneath::stat_at(dir, name).map_err(|e| IndexError::io(&path())(e))?;
        if self.ignore.is_ignored(rel, attrs.kind == Kind::Dir) {
            tracing::debug!("leaving out {}: ignored", path().display());
            return Ok(None);
        }
        let name_bytes = name.to_bytes().to_vec();
        let (attrs, kind) = match attrs.kind {
            Kind::Other => {
                // Said once per publication, and listed: a user who put a fifo or a socket in
                // the tree learns that receivers will not see it (issue 13).
                self.skip(
                    &path(),
                    &"a fifo, socket or device: lcfs publishes files, directories and symlinks",
                );
                return Ok(None);
            }
            Kind::File => return self.file(dir, rel, name, name_bytes, &attrs).map(Some),
            Kind::Symlink => (attrs, EntryKind::Symlink(self.symlink(dir, rel, name)?)),
            Kind::Dir if depth >= MAX_DEPTH => {
                return Err(IndexError::TooDeep {
                    path: path(),
                    max: MAX_DEPTH,
                })
            }
            Kind::Dir => {
                let fd = beneath::open_dir_at(dir, name).map_err(|e| IndexError::io(&path())(e))?;
                let opened = beneath::stat_fd(&fd).map_err(|e| IndexError::io(&path())(e))?;
                let (r, subdirs) = self.dir(&fd, &opened, rel, depth + 1)?;
                let mut e = entry_of(name_bytes, &opened, EntryKind::Dir(r));
                e.nlink = 2 + subdirs;
                return Ok(Some(e));
            }
        };
        Ok(Some(entry_of(name_bytes, &attrs, kind)))
    }

    /// The entry of regular file `name` in `dir`, its objects added; `attrs` is its `lstat`,
    /// enough to find it in the leaf cache without opening it.
    fn file(
        &self,
        dir: BorrowedFd,
        rel: &Path,
        name: &CStr,
        published: Vec<u8>,
        attrs: &Attrs,
    ) -> Result<Entry, IndexError> {
        let (bs, path) = (self.block_size, self.tree.display(rel));
        let cached = self
            .cache
            .as_ref()
            .and_then(|c| c.get(&path, &attrs.stamp(), bs));
        let (attrs, hash) = match cached {
            Some(hash) => (*attrs, hash),
            None => {
                let (attrs, hash) = self.read_file(dir, &path, name)?;
                if let Some(cache) = &self.cache {
                    cache.put(&path, &attrs.stamp(), bs, &hash);
                }
                (attrs, hash)
            }
        };
        if self.cache.is_some() {
            self.seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(path);
        }
        let file = self.add_file(rel, &attrs, hash);
        self.files.fetch_add(1, Relaxed);
        self.bytes.fetch_add(file.size, Relaxed);
        Ok(entry_of(published, &attrs, EntryKind::File(file)))
    }

    /// Opens `name` in `dir` (at `path`) and hashes it, again if it changed meanwhile. Returns
    /// the `fstat` the contents match.
    fn read_file(
        &self,
        dir: BorrowedFd,
        path: &Path,
        name: &CStr,
    ) -> Result<(Attrs, HashedFile), IndexError> {
        let file = beneath::open_file_at(dir, name).map_err(IndexError::io(path))?;
        for _ in 0..READ_ATTEMPTS {
            let before = beneath::stat_fd(&file).map_err(IndexError::io(path))?;
            self.check_file(path, &before)?;
            let hashed = hash_contents(&file, before.size, self.block_size);
            self.hashed_bytes.fetch_add(before.size, Relaxed);
            let after = beneath::stat_fd(&file).map_err(IndexError::io(path))?;
            match hashed {
                Ok(hash) if before.stamp() == after.stamp() => return Ok((before, hash)),
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

    /// Refuses what was opened unless it is a regular file the index can list.
    fn check_file(&self, path: &Path, attrs: &Attrs) -> Result<(), IndexError> {
        if attrs.kind != Kind::File {
            return Err(IndexError::NotServable {
                path: path.to_path_buf(),
            });
        }
        let blocks = self.block_size.blocks_in(attrs.size);
        if blocks > MAX_PAGES * LEAVES_PER_PAGE {
            return Err(IndexError::FileTooLarge {
                path: path.to_path_buf(),
                blocks,
            });
        }
        Ok(())
    }

    /// The target of symlink `name` in `dir`, checked to fit a directory entry.
    fn symlink(&self, dir: BorrowedFd, rel: &Path, name: &CStr) -> Result<Vec<u8>, IndexError> {
        let path = self.tree.display(rel);
        let target = beneath::read_link_at(dir, name).map_err(IndexError::io(&path))?;
        if target.is_empty() || target.len() > TARGET_MAX || target.contains(&0) {
            let what = "its symlink target cannot be carried";
            return Err(IndexError::Unencodable { path, what });
        }
        self.symlinks.fetch_add(1, Relaxed);
        Ok(target)
    }

    /// Adds the block and index objects of a file and returns what its entry holds.
    fn add_file(&self, rel: &Path, attrs: &Attrs, hash: HashedFile) -> FileRef {
        let size = attrs.size;
        let content = match hash.body {
            Body::Inline(bytes) => Content::Inline(bytes),
            Body::Leaves(leaves) => {
                let content = if let [leaf] = leaves[..] {
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
                };
                let file = FileBlocks {
                    path: Arc::from(rel),
                    size,
                    leaves,
                };
                (self.blocks.lock().unwrap_or_else(|e| e.into_inner())).push(file);
                content
            }
        };
        FileRef {
            size,
            b3: hash.b3,
            content,
        }
    }

    fn add_memory(&self, encoding: Vec<u8>) -> ObjectRef {
        let r = object_ref(&encoding);
        let mut objects = self.objects.lock().unwrap_or_else(|e| e.into_inner());
        objects
            .entry(r.hash)
            .or_insert_with(|| Object::new(r.len, Source::Memory(encoding.into())));
        r
    }

    /// Records what is left out; the server says it once (see `Published::skipped`).
    fn skip(&self, path: &Path, why: &dyn std::fmt::Display) {
        tracing::debug!("skipping {}: {why}", path.display());
        let entry = (path.to_path_buf(), why.to_string());
        self.skipped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(entry);
    }
}

/// The entry of a file or symlink (a directory's link count is its caller's to set). A file
/// with several links names its group by a hash of its device and inode: the same in every
/// generation, and the same for every name of it in the tree.
fn entry_of(name: Vec<u8>, attrs: &Attrs, kind: EntryKind) -> Entry {
    let (nlink, link) = match kind {
        EntryKind::File(_) if attrs.nlink > 1 => {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&attrs.dev.to_le_bytes());
            id[8..].copy_from_slice(&attrs.ino.to_le_bytes());
            let h = blake3::hash(&id);
            let link = u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"));
            (attrs.nlink.min(MAX_NLINK - 1), link.max(1))
        }
        _ => (Entry::plain_nlink(&kind), 0),
    };
    Entry {
        name,
        mode: attrs.mode,
        mtime: attrs.mtime,
        nlink,
        link,
        kind,
    }
}

#[cfg(test)]
mod tests;
