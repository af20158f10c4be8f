//! The filesystem core: every operation of the mount over a [`Source`], in plain types.
//!
//! This module never sees fuser: operations take inode numbers, handles and offsets and return
//! `Result<_, FsError>`; those that may need the source are `async` (the adaptor in `fuse.rs`
//! polls them once and hands them to a task if they are not done). It owns the inode table,
//! the open files with their sequential detectors, and the read-only policy.
//!
//! It also moves the mount to new versions of the source ([`Fs::switch`]): it plans the move
//! (listing the changed directories the kernel knows, see `inode/switch.rs`), applies it to
//! the inode table in one step, marks the open files it superseded, and returns what the
//! kernel must forget. Lookups and listings racing with a move retry on the new version rather
//! than store or hand out entries of the old one.
//!
//! An open file pins the version it was opened on: its handle keeps the node (for lcfs, the
//! file's reference with its index) and every read goes through it, so one handle never
//! returns bytes of two versions. A handle whose file a later version replaced or removed
//! reads with [`ReadHint::superseded`], so that the source fails fast with ESTALE where it
//! can no longer get the old bytes, instead of waiting for its timeout.
//!
//! Invariants:
//! - Every entry handed out (lookup, readdirplus) is counted in the inode table before the
//!   adaptor replies (see `inode.rs`).
//! - Nothing writes: opens for writing and write access checks fail with [`FsError::ReadOnly`].
//! - A read never returns more than was asked for, nor bytes past the end of the file.
//! - Directory offsets: "." is 1, ".." is 2, child `i` is `i + 3`; readdir at offset `k`
//!   resumes after the entry whose offset is `k`.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::FsError;
use crate::inode::{kept_dirs, sorted, InodeTable, Invalidation, Listing, ROOT};
use crate::readahead::SequentialDetector;
use crate::session::{Census, MountStats};
use crate::source::{Attr, BoxFuture, Children, Kind, ReadHint, Source, Totals, Version};

/// An entry handed to the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub ino: u64,
    pub attr: Attr,
}

/// The answer to an extended-attribute query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Xattr {
    /// The size of the value (the caller asked with size 0).
    Size(u32),
    /// The value itself.
    Data(Vec<u8>),
}

/// A directory as readdir sees it.
#[derive(Debug)]
pub struct DirView<N> {
    pub ino: u64,
    pub attr: Attr,
    pub parent: u64,
    pub parent_attr: Attr,
    pub listing: Listing<N>,
}

/// One readdir entry.
#[derive(Debug)]
pub struct DirItem<'a> {
    pub ino: u64,
    /// The offset to resume after this entry.
    pub offset: u64,
    pub name: &'a OsStr,
    pub attr: &'a Attr,
    /// The child's index in the listing (`None` for "." and "..").
    pub index: Option<usize>,
}

impl<N> DirView<N> {
    /// The entries after offset `offset`.
    pub fn items(&self, offset: u64) -> impl Iterator<Item = DirItem<'_>> + '_ {
        let offset = usize::try_from(offset).unwrap_or(usize::MAX);
        let dots = [
            (".", self.ino, &self.attr),
            ("..", self.parent, &self.parent_attr),
        ];
        let dots = dots
            .into_iter()
            .enumerate()
            .skip(offset)
            .map(|(i, (name, ino, attr))| DirItem {
                ino,
                offset: i as u64 + 1,
                name: OsStr::new(name),
                attr,
                index: None,
            });
        let children = self
            .listing
            .children
            .iter()
            .enumerate()
            .skip(offset.saturating_sub(2));
        dots.chain(children.map(|(i, c)| DirItem {
            ino: self.listing.ino(i),
            offset: i as u64 + 3,
            name: &c.name,
            attr: &c.attr,
            index: Some(i),
        }))
    }
}

struct OpenFile<N> {
    ino: u64,
    /// The node as it was at open: the version this handle reads.
    node: N,
    size: u64,
    detector: SequentialDetector,
    /// A later version replaced or removed the file.
    superseded: bool,
}

/// The filesystem over source `S`. Lock order: the inode table, then the open files.
pub struct Fs<S: Source> {
    source: Arc<S>,
    table: Mutex<InodeTable<S::Node>>,
    files: Mutex<HashMap<u64, OpenFile<S::Node>>>,
    next_fh: AtomicU64,
    /// The number of the version the table is on.
    version: AtomicU64,
    readahead_min: u64,
    readahead_max: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the whole mount down with it.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<S: Source> Fs<S> {
    /// A filesystem whose sequential readers get readahead windows from `readahead_min` up to
    /// `readahead_max` bytes.
    pub fn new(source: Arc<S>, readahead_min: u64, readahead_max: u64) -> Fs<S> {
        let root = source.root();
        Fs {
            source,
            table: Mutex::new(InodeTable::new(root.root, root.attr)),
            files: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            version: AtomicU64::new(root.number),
            readahead_min,
            readahead_max,
        }
    }

    /// The source it reads through.
    pub fn source(&self) -> &Arc<S> {
        &self.source
    }

    /// The number of the version the mount shows.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Finds `name` in directory `parent` and counts one lookup of it.
    pub async fn lookup(&self, parent: u64, name: &OsStr) -> Result<Entry, FsError> {
        loop {
            let listing = self.listing(parent).await?;
            let index = listing.find(name).ok_or(FsError::NotFound)?;
            let mut table = lock(&self.table);
            // A move to a new version got in between: look again, in the new listing.
            if !table.is_current(parent, &listing) {
                continue;
            }
            let ino = table.remember(parent, &listing, index)?;
            return Ok(Entry {
                ino,
                attr: listing.children[index].attr.clone(),
            });
        }
    }

    /// The listing of directory `dir`, from the table or else from the source.
    async fn listing(&self, dir: u64) -> Result<Listing<S::Node>, FsError> {
        loop {
            let (node, epoch) = {
                let table = lock(&self.table);
                if let Some(listing) = table.listing(dir)? {
                    return Ok(listing);
                }
                (table.get(dir)?.node.clone(), table.epoch())
            };
            let children = self.source.list(&node).await?;
            // None: the directory moved to a new version while it was being listed.
            if let Some(listing) = lock(&self.table).set_listing(dir, children, epoch)? {
                return Ok(listing);
            }
        }
    }

    /// Moves the mount to version `v` (see the module doc); returns what the kernel must
    /// forget. Never fails: a changed directory that cannot be listed now is forgotten, and
    /// listed afresh when next looked up.
    pub async fn switch(&self, v: Version<S::Node>) -> Vec<Invalidation> {
        let same = |a: &S::Node, b: &S::Node| self.source.same_content(a, b);
        let listed = self.plan(&v.root).await;
        let applied = lock(&self.table).apply(v.root, v.attr, &listed, &same);
        if !applied.superseded.is_empty() {
            let mut files = lock(&self.files);
            for f in files.values_mut() {
                f.superseded |= applied.superseded.contains(&f.ino);
            }
        }
        self.version.store(v.number, Ordering::Release);
        applied.invalidations
    }

    /// The new listing of every changed directory the table has a listing of, from the root
    /// of the new version down; unchanged subtrees are skipped at their top.
    async fn plan(&self, root: &S::Node) -> HashMap<u64, Children<S::Node>> {
        let same = |a: &S::Node, b: &S::Node| self.source.same_content(a, b);
        let mut listed = HashMap::new();
        let mut todo = vec![(ROOT, root.clone())];
        while let Some((ino, node)) = todo.pop() {
            let Some(old) = lock(&self.table).changed_listing(ino, &node, &same) else {
                continue;
            };
            match self.source.list(&node).await {
                Ok(new) => {
                    let new = sorted(new);
                    todo.extend(kept_dirs(&old, &new, &same));
                    listed.insert(ino, new);
                }
                Err(e) => tracing::warn!(
                    ino,
                    error = %e,
                    "cannot list a changed directory of the new version; its entries will be looked up again"
                ),
            }
        }
        listed
    }

    /// Takes back `n` lookups of `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        lock(&self.table).forget(ino, n);
    }

    /// The attributes of `ino`.
    pub fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        Ok(lock(&self.table).get(ino)?.attr.clone())
    }

    /// The target of symlink `ino`.
    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        lock(&self.table)
            .get(ino)?
            .target
            .clone()
            .ok_or(FsError::NotSymlink)
    }

    /// Opens file `ino` with open(2) `flags`; returns the file handle.
    pub fn open(&self, ino: u64, flags: i32) -> Result<u64, FsError> {
        if flags & libc::O_ACCMODE != libc::O_RDONLY
            || flags & (libc::O_TRUNC | libc::O_APPEND) != 0
        {
            return Err(FsError::ReadOnly);
        }
        let (node, attr, superseded) = {
            let table = lock(&self.table);
            let inode = table.get(ino)?;
            (inode.node.clone(), inode.attr.clone(), inode.superseded)
        };
        match attr.kind {
            Kind::File => {}
            Kind::Dir => return Err(FsError::IsDir),
            Kind::Symlink => return Err(FsError::NotFound),
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let detector = SequentialDetector::new(self.readahead_min, self.readahead_max);
        lock(&self.files).insert(
            fh,
            OpenFile {
                ino,
                node,
                size: attr.size,
                detector,
                superseded,
            },
        );
        Ok(fh)
    }

    /// Reads up to `size` bytes at `offset` of open file `fh` (fewer only at the end).
    pub fn read(
        &self,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Result<BoxFuture<Result<Vec<u8>, FsError>>, FsError> {
        let (node, len, hint) = {
            let mut files = lock(&self.files);
            let file = files.get_mut(&fh).ok_or(FsError::BadHandle)?;
            let window = file.detector.handle_read(offset, u64::from(size));
            let left = file.size.saturating_sub(offset);
            let len = u64::from(size).min(left);
            (
                file.node.clone(),
                len,
                ReadHint {
                    readahead: window.min(left - len),
                    superseded: file.superseded,
                },
            )
        };
        if len == 0 {
            return Ok(Box::pin(async { Ok(Vec::new()) }));
        }
        // `len <= size`, a u32.
        let read = self.source.read(&node, offset, len as u32, hint);
        Ok(Box::pin(async move {
            let mut bytes = read.await?;
            bytes.truncate(len as usize);
            Ok(bytes)
        }))
    }

    /// Forgets open file `fh`.
    pub fn release(&self, fh: u64) {
        lock(&self.files).remove(&fh);
    }

    /// Directory `ino` for readdir.
    pub async fn dir(&self, ino: u64) -> Result<DirView<S::Node>, FsError> {
        let listing = self.listing(ino).await?;
        let table = lock(&self.table);
        let inode = table.get(ino)?;
        let parent_attr = table
            .get(inode.parent)
            .map_or_else(|_| inode.attr.clone(), |p| p.attr.clone());
        Ok(DirView {
            ino,
            attr: inode.attr.clone(),
            parent: inode.parent,
            parent_attr,
            listing,
        })
    }

    /// Counts one lookup of each child `indices` of `view` (readdirplus hands out entries).
    pub fn remember(&self, view: &DirView<S::Node>, indices: &[usize]) -> Result<(), FsError> {
        let mut table = lock(&self.table);
        for &i in indices {
            table.remember(view.ino, &view.listing, i)?;
        }
        Ok(())
    }

    /// Totals for statfs.
    pub fn totals(&self) -> Totals {
        self.source.totals()
    }

    /// Extended attribute `name` of `ino`, for a caller with a `size`-byte buffer.
    pub fn getxattr(&self, ino: u64, name: &OsStr, size: u32) -> Result<Xattr, FsError> {
        // The kernel and programs probe security.*, system.* and trusted.* names on every
        // file `ls -l` shows: answered at once, without building this node's attributes.
        if !name.as_bytes().starts_with(b"user.lcfs.") {
            lock(&self.table).get(ino)?;
            return Err(FsError::NoXattr);
        }
        let xattrs = self.xattrs(ino)?;
        let (_, value) = xattrs
            .into_iter()
            .find(|(n, _)| n.as_bytes() == name.as_bytes())
            .ok_or(FsError::NoXattr)?;
        sized(value, size)
    }

    /// The extended attribute names of `ino` (each followed by a NUL).
    pub fn listxattr(&self, ino: u64, size: u32) -> Result<Xattr, FsError> {
        let mut names = Vec::new();
        for (name, _) in self.xattrs(ino)? {
            names.extend_from_slice(name.as_bytes());
            names.push(0);
        }
        sized(names, size)
    }

    fn xattrs(&self, ino: u64) -> Result<Vec<(String, Vec<u8>)>, FsError> {
        let node = lock(&self.table).get(ino)?.node.clone();
        Ok(self.source.xattrs(&node, ino == ROOT))
    }

    /// access(2) with `mask`: anything asking to write fails.
    pub fn access(&self, ino: u64, mask: i32) -> Result<(), FsError> {
        lock(&self.table).get(ino)?;
        if mask & libc::W_OK != 0 {
            return Err(FsError::ReadOnly);
        }
        Ok(())
    }
}

impl<S: Source> Census for Fs<S> {
    fn stats(&self) -> MountStats {
        MountStats {
            inodes: lock(&self.table).len(),
            open_files: lock(&self.files).len(),
        }
    }
}

/// The answer to a caller with a `size`-byte buffer (0: it asks for the size).
fn sized(value: Vec<u8>, size: u32) -> Result<Xattr, FsError> {
    let len = u32::try_from(value.len()).map_err(|_| FsError::Range)?;
    if size == 0 {
        Ok(Xattr::Size(len))
    } else if len > size {
        Err(FsError::Range)
    } else {
        Ok(Xattr::Data(value))
    }
}

#[cfg(test)]
#[path = "fs_tests.rs"]
mod tests;
