//! `lcfs copy`: write a channel's tree (or a subtree, or one file) under a local directory.
//!
//! Invariants:
//! - No partial or corrupt file ever appears under its real name. Every file and symlink is
//!   first written under a hidden temporary name (`.lcfs-part-*`) in its target directory,
//!   every block verified on the way; once all are staged an `fdatasync` each (or one `syncfs`
//!   for many files) makes them durable and they are renamed into place. A failed or
//!   interrupted copy removes its temporary files, and a later copy by the same user removes
//!   any a killed copy left.
//! - Where DEST already holds a file of the same name, each of its blocks whose BLAKE3 equals a
//!   wanted leaf is reused (at any block-aligned offset), and only the others are fetched
//!   (lcsync's delta transfer). A file whose blocks all match, and which belongs to the
//!   copying user alone, is left in place.
//! - Blocks already in the cache are not fetched again. What the copy fetches goes into the
//!   cache too, except small files (a bundle's members) while no other process shares the
//!   cache: DEST holds them verified, and a second copy of each in the cache cost as much
//!   CPU as DEST itself (see [`crate::fetch::KeepMembers`]). So a copy interrupted before its
//!   end fetches its small files again, in their bundles; its large files' blocks it keeps.
//! - Below DEST the copy works only through descriptors ([`dest`]): it never follows a
//!   symlink there, never writes in a directory another user owns, and keeps what it writes
//!   private (files 0600, directories 0700) until the end.
//! - What lands: files, directories and symlinks belong to the user running the copy (copy
//!   never chowns; run as root, everything is root's) with the published permission bits and
//!   mtimes (nanoseconds, symlinks and directories included), except that setuid and setgid
//!   are dropped unless [`CopyOptions::keep_setuid`] asks for them: a published setuid file
//!   would otherwise run as root. A directory's sticky bit stays, since it only restricts who
//!   may delete in it. Files get their modes before their rename in a directory closed to
//!   others, after it elsewhere (see [`staging`]); directories get theirs at the end, deepest
//!   first; DEST gets the published root's only when the copy created it.
//! - Names of one hard-link group on the publisher ([`Entry::link`]) are hard links in DEST:
//!   the first is staged like any file, the others are linked to it once it is in place
//!   (a link under a part name, then a rename, so each name changes atomically).

pub(crate) mod dest;
mod existing;
pub(crate) mod staging;
pub mod trash;

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{stream, StreamExt, TryStreamExt};

use crate::fetch::{FetchError, Priority, Tree};
use crate::progress::Progress;
use crate::wire::object::{
    BlockIndex, Content, Entry, EntryKind, FileRef, ObjectHash, RootRecord, Timestamp,
};
use dest::Dest;
pub use dest::DestError;
use existing::{existing_blocks, Existing};
use staging::{Part, Staging};

/// Files staged concurrently, and blocks asked for per file. The fetch engine joins a window
/// of them at a time; the rest wait in its queue, where the server's beacon can pick the ones
/// on air (see `fetch::state`), so this is well beyond the window: a receiver that fell
/// behind others can join their rounds only if it has asked for what they fetch now. With
/// 128 files, a copy among three on tools/bench's tree_10k that started 25 ms after the
/// others never caught up (2.0 times one receiver's bytes); with 4096, 1.06.
const FILES_IN_FLIGHT: usize = 4096;
const BLOCKS_IN_FLIGHT: usize = 4096;
/// Part files open at once (files of more than one block; one-block files are fetched
/// before their part file is made), so that a copy stays within a default descriptor limit.
const OPEN_PARTS: usize = 128;
/// What `lcfs mount` shows for a whole tree's root, which has no entry of its own.
const ROOT_DIR_MODE: u32 = 0o755;

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Dest(#[from] DestError),
    #[error("cannot write {}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// How to copy.
#[derive(Debug, Clone, Copy, Default)]
pub struct CopyOptions {
    /// Keep setuid and setgid bits as published (they are dropped by default).
    pub keep_setuid: bool,
    /// Move what DEST holds and the tree does not into `DEST/.lcfs-trash/<time>/` ([`trash`]).
    pub delete: bool,
}

/// What a copy did.
#[derive(Debug, Default)]
pub struct CopyReport {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Bytes of all files copied.
    pub bytes: u64,
    /// Bytes taken from files already in DEST.
    pub reused: u64,
    /// Files already in DEST with every block in place.
    pub unchanged: u64,
    /// Entries moved to the trash (`--delete`).
    pub trashed: u64,
    pub elapsed: Duration,
}

/// The permission bits an entry gets: as published, without setuid and setgid unless `keep`.
/// A directory keeps its sticky bit: dropping it would let every user of a world-writable
/// directory delete or replace what the copy put there.
pub fn final_mode(published: u32, is_dir: bool, keep: bool) -> u32 {
    let mode = published & 0o7777;
    match (keep, is_dir) {
        (true, _) => mode,
        (false, true) => mode & 0o1777,
        (false, false) => mode & 0o777,
    }
}

struct Copier<'a> {
    tree: &'a Tree,
    dest: &'a Dest,
    staging: Staging<'a>,
    progress: Progress,
    reused: AtomicU64,
    unchanged: AtomicU64,
    opts: CopyOptions,
    open_parts: tokio::sync::Semaphore,
}

/// Copies `subpath` of the tree (the whole tree for "") to `dest`. The directories are
/// fetched first; nothing is written under `dest` before `settled` resolves (the caller's
/// word that this generation is the one to copy).
pub async fn copy(
    tree: &Tree,
    subpath: &str,
    dest: &Path,
    opts: CopyOptions,
    settled: impl std::future::Future<Output = ()>,
) -> Result<CopyReport, CopyError> {
    let started = Instant::now();
    let plan = plan(tree, subpath, dest, settled).await?;
    let total = plan.items.iter().map(|(_, e)| file_size(e)).sum();
    let copier = Copier {
        tree,
        dest: &plan.dest,
        staging: Staging::new(&plan.dest),
        progress: Progress::new("copy", total),
        reused: AtomicU64::new(0),
        unchanged: AtomicU64::new(0),
        opts,
        open_parts: tokio::sync::Semaphore::new(OPEN_PARTS),
    };
    copier.make_dirs(&plan.items)?;
    let (mut report, links) = copier.stage_all(&plan.items).await?;
    copier.staging.sync();
    copier.staging.commit()?;
    copier.link_all(&links)?;
    if opts.delete && plan.tree {
        let items = plan.items.iter().map(|(rel, e)| (rel.as_path(), is_dir(e)));
        report.trashed = trash::sweep(&plan.dest, items)?;
    }
    copier.set_dir_attrs(&plan.items, plan.root_attrs)?;
    copier.progress.finish();
    report.bytes = total;
    report.reused = copier.reused.load(Ordering::Relaxed);
    report.unchanged = copier.unchanged.load(Ordering::Relaxed);
    report.elapsed = started.elapsed();
    Ok(report)
}

/// What to create, and where.
struct Plan {
    dest: Dest,
    /// Every entry to create, by path relative to `dest`, parents before children.
    items: Vec<(PathBuf, Entry)>,
    /// DEST's own mode and mtime, when this copy created it.
    root_attrs: Option<(u32, Timestamp)>,
    /// Whether DEST mirrors a directory of the tree (not one file put into it).
    tree: bool,
}

/// What to copy where: the directories are walked first, and DEST is touched only once
/// `settled` resolves.
async fn plan(
    tree: &Tree,
    subpath: &str,
    dest: &Path,
    settled: impl std::future::Future<Output = ()>,
) -> Result<Plan, CopyError> {
    let (dir, attrs) = match tree.resolve(subpath, Priority::Readahead).await? {
        None if tree.root_record().single_file => {
            let root = tree.root_dir(Priority::Readahead).await?;
            settled.await;
            return single(dest, root.entries);
        }
        None => {
            let own = tree.root_dir(Priority::Readahead).await?.meta;
            let attrs = own.map_or_else(|| root_attrs(tree.root_record()), |m| (m.mode, m.mtime));
            (tree.root_record().root, attrs)
        }
        Some(Entry {
            kind: EntryKind::Dir(r),
            mode,
            mtime,
            ..
        }) => (r, (mode, mtime)),
        Some(e) => {
            settled.await;
            return single(dest, vec![e]);
        }
    };
    let found = tree.walk(dir, Priority::Readahead).await?;
    settled.await;
    let dest = Dest::open_or_create(dest)?;
    Ok(Plan {
        root_attrs: dest.created().then_some(attrs),
        dest,
        items: found.into_iter().map(|f| (f.path, f.entry)).collect(),
        tree: true,
    })
}

/// A whole tree's root published by an older server (a version 1 directory object, without
/// its own attributes) gets what `lcfs mount` shows then: 0755 and the publication time.
fn root_attrs(r: &RootRecord) -> (u32, Timestamp) {
    const NS: u64 = 1_000_000_000;
    let mtime = Timestamp {
        secs: i64::try_from(r.publish_time_ns / NS).unwrap_or(i64::MAX),
        nanos: (r.publish_time_ns % NS) as u32,
    };
    (ROOT_DIR_MODE, mtime)
}

/// One file or symlink (or the one entry of a single-file channel): into DEST if that is a
/// directory, else to the path DEST.
fn single(dest: &Path, entries: Vec<Entry>) -> Result<Plan, CopyError> {
    let (dir, rename) = if dest.is_dir() {
        (dest, None)
    } else {
        let name = dest.file_name().ok_or_else(|| CopyError::Io {
            path: dest.to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"),
        })?;
        let parent = dest.parent().filter(|p| !p.as_os_str().is_empty());
        (parent.unwrap_or(Path::new(".")), Some(name))
    };
    let items = entries
        .into_iter()
        .map(|e| {
            let name = rename.unwrap_or(OsStr::from_bytes(&e.name));
            (PathBuf::from(name), e)
        })
        .collect();
    Ok(Plan {
        dest: Dest::open_existing(dir)?,
        items,
        root_attrs: None,
        tree: false,
    })
}

fn is_dir(e: &Entry) -> bool {
    matches!(e.kind, EntryKind::Dir(_))
}

fn file_size(e: &Entry) -> u64 {
    match &e.kind {
        EntryKind::File(f) => f.size,
        _ => 0,
    }
}

impl Copier<'_> {
    fn io_err(&self, rel: &Path) -> impl Fn(io::Error) -> CopyError + '_ {
        let path = self.dest.display(rel);
        move |source| CopyError::Io {
            path: path.clone(),
            source,
        }
    }

    /// Creates every directory (replacing anything else of that name, refusing one another
    /// user owns) and removes the temporary files an earlier, killed copy left in them.
    fn make_dirs(&self, items: &[(PathBuf, Entry)]) -> Result<(), CopyError> {
        for (rel, e) in items {
            if matches!(e.kind, EntryKind::Dir(_)) {
                self.dest.prepare_dir(rel)?;
            }
        }
        Ok(())
    }

    /// Stages every file and symlink, but only the first name of each hard-link group;
    /// returns the other names, each with the first, for [`Copier::link_all`].
    async fn stage_all(
        &self,
        items: &[(PathBuf, Entry)],
    ) -> Result<(CopyReport, Vec<(PathBuf, PathBuf)>), CopyError> {
        let mut report = CopyReport::default();
        let mut firsts: std::collections::HashMap<u64, &Path> = Default::default();
        let mut links = Vec::new();
        let mut staged = Vec::new();
        for (rel, e) in items {
            match e.kind {
                EntryKind::File(_) => report.files += 1,
                EntryKind::Dir(_) => report.dirs += 1,
                EntryKind::Symlink(_) => report.symlinks += 1,
            }
            if e.link != 0 && matches!(e.kind, EntryKind::File(_)) {
                if let Some(first) = firsts.get(&e.link) {
                    links.push((rel.clone(), first.to_path_buf()));
                    continue;
                }
                firsts.insert(e.link, rel);
            }
            staged.push((rel, e));
        }
        stream::iter(staged)
            .map(|(rel, e)| self.stage(rel, e))
            .buffer_unordered(FILES_IN_FLIGHT)
            .try_collect::<()>()
            .await?;
        Ok((report, links))
    }

    /// Makes each `(name, first)` a hard link to `first`, in place by now, replacing what
    /// DEST held at `name` atomically (a link under a part name, then a rename).
    fn link_all(&self, links: &[(PathBuf, PathBuf)]) -> Result<(), CopyError> {
        for (rel, first) in links {
            let (src, src_name) = self.dest.parent_of(first)?;
            let (dir, name) = self.dest.parent_of(rel)?;
            if dest::same_file(&src, src_name, &dir, name) {
                continue;
            }
            let part = dest::link_part(&src, src_name, &dir).map_err(self.io_err(rel))?;
            if let Err(e) = dest::replace(&dir, &part, name) {
                dest::remove_part(&dir, &part);
                return Err(self.io_err(rel)(e));
            }
        }
        Ok(())
    }

    async fn stage(&self, rel: &Path, e: &Entry) -> Result<(), CopyError> {
        match &e.kind {
            EntryKind::Dir(_) => Ok(()),
            EntryKind::Symlink(target) => self.stage_symlink(rel, target, e.mtime),
            EntryKind::File(f) => {
                let mode = final_mode(e.mode, false, self.opts.keep_setuid);
                self.stage_file(rel, f, mode, e.mtime).await
            }
        }
    }

    fn stage_symlink(&self, rel: &Path, target: &[u8], mtime: Timestamp) -> Result<(), CopyError> {
        let (dir, _) = self.dest.parent_of(rel)?;
        let part = dest::symlink_part(&dir, target).map_err(self.io_err(rel))?;
        self.staging.add(Part::new(rel, part.clone(), None));
        dest::set_times_at(&dir, &part, mtime).map_err(self.io_err(rel))
    }

    async fn stage_file(
        &self,
        rel: &Path,
        f: &FileRef,
        mode: u32,
        mtime: Timestamp,
    ) -> Result<(), CopyError> {
        if let Content::Inline(bytes) = &f.content {
            return self.write_whole(rel, bytes, mode, mtime);
        }
        let in_file = |e: FetchError| e.in_file(rel.display());
        let leaves = (self.tree.leaves(f, Priority::Readahead).await).map_err(in_file)?;
        let (dir, name) = self.dest.parent_of(rel)?;
        let bs = self.tree.block_size();
        // A DEST this copy made holds nothing of ours to reuse: no lookup per file.
        let existing = match self.dest.created() {
            true => Existing::default(),
            false => existing_blocks(&dir, name, bs, self.dest.euid()).await,
        };
        if existing.in_place(&leaves, f.size) {
            self.unchanged.fetch_add(1, Ordering::Relaxed);
            self.reused.fetch_add(f.size, Ordering::Relaxed);
            self.progress.inc(f.size);
            return existing.finish(mode, mtime).map_err(self.io_err(rel));
        }
        // A one-block file is fetched before its part file is made, so that the many small
        // files in flight hold no descriptor while they wait; bigger ones take a place.
        let first = match leaves.as_slice() {
            [leaf] => Some(
                self.block_bytes(&existing, rel, f.size, BlockIndex(0), *leaf)
                    .await?,
            ),
            _ => None,
        };
        let _place = match first {
            Some(_) => None,
            None => Some(self.open_parts.acquire().await.expect("never closed")),
        };
        let (file, own_mode) = self.create_part(rel, &dir, mode)?;
        if let Some(bytes) = first {
            // The one block is the whole file: writing it gives the file its size.
            self.write_block(&file, rel, BlockIndex(0), &bytes)?;
        } else {
            file.set_len(f.size).map_err(self.io_err(rel))?;
            stream::iter(bs.blocks_of(f.size).zip(leaves.iter()))
                .map(|(i, leaf)| self.place_block(&file, &existing, rel, f.size, i, *leaf))
                .buffer_unordered(BLOCKS_IN_FLIGHT)
                .try_collect::<()>()
                .await?;
        }
        self.finish_part(rel, &file, own_mode, mtime)
    }

    async fn place_block(
        &self,
        file: &File,
        existing: &Existing,
        rel: &Path,
        size: u64,
        i: BlockIndex,
        leaf: ObjectHash,
    ) -> Result<(), CopyError> {
        let bytes = self.block_bytes(existing, rel, size, i, leaf).await?;
        self.write_block(file, rel, i, &bytes)?;
        start_writeback(
            file,
            self.tree.block_size().offset_of(i),
            bytes.len() as u64,
        );
        Ok(())
    }

    /// Block `i` of a file: from the file DEST already holds, or fetched.
    async fn block_bytes(
        &self,
        existing: &Existing,
        rel: &Path,
        size: u64,
        i: BlockIndex,
        leaf: ObjectHash,
    ) -> Result<Arc<[u8]>, CopyError> {
        let len = self.tree.block_size().block_len(size, i) as u64;
        if let Some(b) = existing.read(&leaf, len) {
            self.reused.fetch_add(len, Ordering::Relaxed);
            return Ok(b.into());
        }
        // The fetched bytes themselves, shared: no copy of every block on the way to DEST.
        Ok(self
            .tree
            .block(leaf, size, i, Priority::Readahead)
            .await
            .map_err(|e| e.in_file(rel.display()))?
            .bytes()
            .clone())
    }

    fn write_block(
        &self,
        file: &File,
        rel: &Path,
        i: BlockIndex,
        bytes: &[u8],
    ) -> Result<(), CopyError> {
        let at = self.tree.block_size().offset_of(i);
        file.write_all_at(bytes, at).map_err(self.io_err(rel))?;
        self.progress.inc(bytes.len() as u64);
        Ok(())
    }

    fn write_whole(
        &self,
        rel: &Path,
        bytes: &[u8],
        mode: u32,
        mtime: Timestamp,
    ) -> Result<(), CopyError> {
        let (dir, _) = self.dest.parent_of(rel)?;
        let (mut file, own_mode) = self.create_part(rel, &dir, mode)?;
        file.write_all(bytes).map_err(self.io_err(rel))?;
        self.progress.inc(bytes.len() as u64);
        self.finish_part(rel, &file, own_mode, mtime)
    }

    /// Creates and stages the part file of `rel` in `dir`. In a directory closed to others
    /// the part is [`Part::ready`]: the mode to set before closing it is returned.
    fn create_part(
        &self,
        rel: &Path,
        dir: &OwnedFd,
        mode: u32,
    ) -> Result<(File, Option<u32>), CopyError> {
        let part = dest::create_part(dir).map_err(self.io_err(rel))?;
        let closed = self.dest.is_closed(rel.parent().unwrap_or(Path::new("")));
        self.staging.add(match closed {
            true => Part::ready(rel, part.name, part.ino),
            false => Part::new(rel, part.name, Some((part.ino, mode))),
        });
        Ok((part.file, closed.then_some(mode)))
    }

    /// Gives a written part its mtime, and the mode its creator sets ([`Copier::create_part`]).
    fn finish_part(
        &self,
        rel: &Path,
        file: &File,
        mode: Option<u32>,
        mtime: Timestamp,
    ) -> Result<(), CopyError> {
        if let Some(mode) = mode {
            dest::set_mode(file, mode).map_err(self.io_err(rel))?;
        }
        dest::set_times(file, mtime).map_err(self.io_err(rel))
    }

    /// Sets modes and mtimes of directories, deepest first (adding entries changes a parent's
    /// mtime, and a directory closed to its owner must not be on the way to one still to do),
    /// then DEST's own when the copy made it.
    fn set_dir_attrs(
        &self,
        items: &[(PathBuf, Entry)],
        root: Option<(u32, Timestamp)>,
    ) -> Result<(), CopyError> {
        let dirs = items.iter().rev().filter_map(|(rel, e)| {
            matches!(e.kind, EntryKind::Dir(_)).then_some((rel.as_path(), e.mode, e.mtime))
        });
        let root = root.map(|(mode, mtime)| (Path::new(""), mode, mtime));
        for (rel, mode, mtime) in dirs.chain(root) {
            let fd = self.dest.dir(rel)?;
            let mode = final_mode(mode, true, self.opts.keep_setuid);
            dest::set_mode(&*fd, mode).map_err(self.io_err(rel))?;
            dest::set_times(&*fd, mtime).map_err(self.io_err(rel))?;
        }
        Ok(())
    }
}

/// Starts writing `len` bytes at `offset` of `file` to disk without waiting, so that the
/// final `syncfs` finds little left to do: 256 MiB to three receivers ended with ~1 s of
/// writeback after the last block arrived. Only for files of more than one block: a tree of
/// small files leaves its writeback to the kernel and `syncfs`, one system call fewer a file.
/// Best effort: an error only means later.
fn start_writeback(file: &File, offset: u64, len: u64) {
    // SAFETY: sync_file_range only reads the descriptor, which `file` keeps open.
    unsafe {
        libc::sync_file_range(
            std::os::fd::AsRawFd::as_raw_fd(file),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}

#[cfg(test)]
mod tests {
    use super::final_mode;

    #[test]
    fn setuid_and_setgid_are_dropped_unless_asked() {
        assert_eq!(final_mode(0o6755, false, false), 0o755);
        assert_eq!(final_mode(0o4700, false, false), 0o700);
        assert_eq!(final_mode(0o1644, false, false), 0o644);
        assert_eq!(final_mode(0o6755, false, true), 0o6755);
        assert_eq!(
            final_mode(0o3777, true, false),
            0o1777,
            "a directory keeps its sticky bit"
        );
        assert_eq!(final_mode(0o2755, true, true), 0o2755);
        assert_eq!(
            final_mode(0o100644, false, true),
            0o644,
            "only permission bits"
        );
    }
}
