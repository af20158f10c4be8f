//! `lcfs copy`: write a channel's tree (or a subtree, or one file) under a local directory.
//!
//! Invariants:
//! - No partial or corrupt file ever appears under its real name. Every file and symlink is
//!   first written under a hidden temporary name (`.lcfs-part-*`) in its target directory,
//!   every block verified on the way; once all are staged an `fdatasync` each (or one `syncfs`
//!   for many files) makes them durable and they are renamed into place. A failed copy removes its temporary files, and a later copy
//!   into the same place removes any a killed copy left.
//! - Where DEST already holds a file of the same name, each of its blocks whose BLAKE3 equals a
//!   wanted leaf is reused (at any block-aligned offset), and only the others are fetched
//!   (lcsync's delta transfer). A file whose blocks all match is left in place.
//! - Blocks already in the cache are not fetched again.
//! - What lands belongs to the user running the copy (copy never chowns; run as root,
//!   everything is root's) with the published permission bits, except that setuid and setgid
//!   are dropped unless [`CopyOptions::keep_setuid`] asks for them: a published setuid file
//!   would otherwise run as root. A directory's sticky bit stays, since it only restricts who
//!   may delete in it.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::{stream, StreamExt, TryStreamExt};
use lcfs_cache::Hash;

use crate::fetch::tree::Found;
use crate::fetch::{FetchError, Priority, Tree};
use crate::object::{BlockSize, Content, Entry, EntryKind, FileRef, Timestamp};
use crate::progress::Progress;

const PART_PREFIX: &str = ".lcfs-part-";
/// Files staged concurrently, and blocks asked for per file. The fetch engine joins a window
/// of them at a time; the rest wait in its queue, where the server's beacon can pick the ones
/// on air (see `fetch::engine`), so this is well beyond the window.
const FILES_IN_FLIGHT: usize = 128;
const BLOCKS_IN_FLIGHT: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("cannot write {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CopyError + '_ {
    move |source| CopyError::Io {
        path: path.to_owned(),
        source,
    }
}

/// How to copy.
#[derive(Debug, Clone, Copy, Default)]
pub struct CopyOptions {
    /// Keep setuid and setgid bits as published (they are dropped by default).
    pub keep_setuid: bool,
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
    pub elapsed: Duration,
}

/// Temporary names in use, removed on drop unless renamed into place.
#[derive(Default)]
struct Staging {
    parts: Mutex<Vec<(PathBuf, PathBuf)>>,
}

impl Staging {
    fn part_name(dest: &Path) -> PathBuf {
        let dir = dest.parent().unwrap_or(Path::new("."));
        dir.join(format!("{PART_PREFIX}{:016x}", rand::random::<u64>()))
    }

    fn add(&self, part: PathBuf, dest: PathBuf) {
        self.parts.lock().expect("staging lock").push((part, dest));
    }

    /// Makes the staged files durable before [`Staging::commit`] publishes them. A few files
    /// get an `fdatasync` each, which waits for their own data only; many get one `syncfs`,
    /// which costs one journal commit but also waits for every other writer of that
    /// filesystem (a copy right after another program wrote 256 MiB took half a second more).
    fn sync(&self, dest: &Path) {
        const PER_FILE_LIMIT: usize = 64;
        let parts = self.parts.lock().expect("staging lock");
        if parts.len() > PER_FILE_LIMIT {
            drop(parts);
            sync_fs(dest);
            return;
        }
        for (part, _) in parts.iter() {
            if let Ok(f) = File::open(part) {
                let _ = f.sync_data();
            }
        }
    }

    fn commit(&self) -> Result<(), CopyError> {
        let parts = std::mem::take(&mut *self.parts.lock().expect("staging lock"));
        let mut left = parts.into_iter();
        while let Some((part, dest)) = left.next() {
            if let Err(e) = replace(&part, &dest) {
                let _ = fs::remove_file(&part);
                self.parts.lock().expect("staging lock").extend(left);
                return Err(e);
            }
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Ok(parts) = self.parts.lock() {
            for (part, _) in parts.iter() {
                let _ = fs::remove_file(part);
            }
        }
    }
}

/// Renames `part` over `dest`, first removing a directory that stands in the way.
fn replace(part: &Path, dest: &Path) -> Result<(), CopyError> {
    if let Ok(m) = fs::symlink_metadata(dest) {
        if m.is_dir() {
            fs::remove_dir_all(dest).map_err(io_err(dest))?;
        }
    }
    fs::rename(part, dest).map_err(io_err(dest))
}

struct Copier<'a> {
    tree: &'a Tree,
    staging: Staging,
    progress: Progress,
    reused: AtomicU64,
    unchanged: AtomicU64,
    opts: CopyOptions,
}

/// Copies `subpath` of the tree (the whole tree for "") to `dest`.
pub async fn copy(
    tree: &Tree,
    subpath: &str,
    dest: &Path,
    opts: CopyOptions,
) -> Result<CopyReport, CopyError> {
    let started = Instant::now();
    let items = plan(tree, subpath, dest).await?;
    let total = items.iter().map(|(_, e)| file_size(e)).sum();
    let copier = Copier {
        tree,
        staging: Staging::default(),
        progress: Progress::new("copy", total),
        reused: AtomicU64::new(0),
        unchanged: AtomicU64::new(0),
        opts,
    };
    copier.make_dirs(&items)?;
    let mut report = copier.stage_all(&items).await?;
    copier.staging.sync(dest);
    copier.staging.commit()?;
    set_dir_attrs(&items, opts)?;
    copier.progress.finish();
    report.bytes = total;
    report.reused = copier.reused.load(Ordering::Relaxed);
    report.unchanged = copier.unchanged.load(Ordering::Relaxed);
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Every entry to create, with its absolute target path, parents before children.
async fn plan(tree: &Tree, subpath: &str, dest: &Path) -> Result<Vec<(PathBuf, Entry)>, CopyError> {
    let single = |e: Entry| {
        let target = if dest.is_dir() {
            dest.join(OsStr::from_bytes(&e.name))
        } else {
            dest.to_owned()
        };
        vec![(target, e)]
    };
    let dir = match tree.resolve(subpath).await? {
        None if tree.root_record().single_file => {
            let root = tree.root_dir().await?;
            return Ok(root.entries.into_iter().flat_map(single).collect());
        }
        None => tree.root_record().root,
        Some(Entry {
            kind: EntryKind::Dir(r),
            ..
        }) => r,
        Some(e) => return Ok(single(e)),
    };
    fs::create_dir_all(dest).map_err(io_err(dest))?;
    clean_parts(dest);
    let found = tree.walk(dir, Priority::Readahead).await?;
    Ok(found
        .into_iter()
        .map(|Found { path, entry }| (dest.join(path), entry))
        .collect())
}

fn file_size(e: &Entry) -> u64 {
    match &e.kind {
        EntryKind::File(f) => f.size,
        _ => 0,
    }
}

impl Copier<'_> {
    /// Creates every directory (replacing anything else of that name) and removes the
    /// temporary files an earlier, killed copy left in them.
    fn make_dirs(&self, items: &[(PathBuf, Entry)]) -> Result<(), CopyError> {
        for (path, e) in items {
            if !matches!(e.kind, EntryKind::Dir(_)) {
                continue;
            }
            match fs::symlink_metadata(path) {
                Ok(m) if m.is_dir() => {
                    // A read-only directory from an earlier copy must take new entries.
                    let mode = m.permissions().mode();
                    if mode & 0o200 == 0 {
                        let _ = fs::set_permissions(path, fs::Permissions::from_mode(mode | 0o700));
                    }
                    clean_parts(path);
                }
                Ok(_) => {
                    fs::remove_file(path).map_err(io_err(path))?;
                    fs::create_dir(path).map_err(io_err(path))?;
                }
                Err(_) => fs::create_dir(path).map_err(io_err(path))?,
            }
        }
        Ok(())
    }

    async fn stage_all(&self, items: &[(PathBuf, Entry)]) -> Result<CopyReport, CopyError> {
        let mut report = CopyReport::default();
        for (_, e) in items {
            match e.kind {
                EntryKind::File(_) => report.files += 1,
                EntryKind::Dir(_) => report.dirs += 1,
                EntryKind::Symlink(_) => report.symlinks += 1,
            }
        }
        stream::iter(items)
            .map(|(path, e)| self.stage(path, e))
            .buffer_unordered(FILES_IN_FLIGHT)
            .try_collect::<()>()
            .await?;
        Ok(report)
    }

    async fn stage(&self, path: &Path, e: &Entry) -> Result<(), CopyError> {
        match &e.kind {
            EntryKind::Dir(_) => Ok(()),
            EntryKind::Symlink(target) => self.stage_symlink(path, target, e.mtime),
            EntryKind::File(f) => {
                let mode = final_mode(e.mode, false, self.opts.keep_setuid);
                self.stage_file(path, f, mode, e.mtime).await
            }
        }
    }

    fn stage_symlink(&self, path: &Path, target: &[u8], mtime: Timestamp) -> Result<(), CopyError> {
        let part = Staging::part_name(path);
        std::os::unix::fs::symlink(OsStr::from_bytes(target), &part).map_err(io_err(path))?;
        self.staging.add(part.clone(), path.to_owned());
        set_mtime(&part, mtime, false).map_err(io_err(path))
    }

    async fn stage_file(
        &self,
        path: &Path,
        f: &FileRef,
        mode: u32,
        mtime: Timestamp,
    ) -> Result<(), CopyError> {
        if let Content::Inline(bytes) = &f.content {
            return self.write_whole(path, bytes, mode, mtime);
        }
        let leaves = self.tree.leaves(f, Priority::Readahead).await?;
        let existing = existing_blocks(path, self.tree.block_size()).await;
        if existing.in_place(&leaves, f.size) {
            self.unchanged.fetch_add(1, Ordering::Relaxed);
            self.reused.fetch_add(f.size, Ordering::Relaxed);
            self.progress.inc(f.size);
            return finish_attrs(path, mode, mtime).map_err(io_err(path));
        }
        let part = Staging::part_name(path);
        let file = File::create(&part).map_err(io_err(path))?;
        self.staging.add(part.clone(), path.to_owned());
        file.set_len(f.size).map_err(io_err(path))?;
        stream::iter(leaves.iter().enumerate())
            .map(|(i, leaf)| self.place_block(&file, &existing, path, f.size, i as u64, *leaf))
            .buffer_unordered(BLOCKS_IN_FLIGHT)
            .try_collect::<()>()
            .await?;
        drop(file);
        finish_attrs(&part, mode, mtime).map_err(io_err(path))
    }

    async fn place_block(
        &self,
        file: &File,
        existing: &Existing,
        path: &Path,
        size: u64,
        i: u64,
        leaf: Hash,
    ) -> Result<(), CopyError> {
        let bs = self.tree.block_size();
        let len = bs.block_len(size, i) as u64;
        let bytes = match existing.read(&leaf, len) {
            Some(b) => {
                self.reused.fetch_add(len, Ordering::Relaxed);
                b
            }
            None => self
                .tree
                .block(leaf, size, i, Priority::Readahead)
                .await?
                .bytes()
                .to_vec(),
        };
        file.write_all_at(&bytes, i * bs.bytes())
            .map_err(io_err(path))?;
        start_writeback(file, i * bs.bytes(), len);
        self.progress.inc(len);
        Ok(())
    }

    fn write_whole(
        &self,
        path: &Path,
        bytes: &[u8],
        mode: u32,
        mtime: Timestamp,
    ) -> Result<(), CopyError> {
        let part = Staging::part_name(path);
        fs::write(&part, bytes).map_err(io_err(path))?;
        self.staging.add(part.clone(), path.to_owned());
        self.progress.inc(bytes.len() as u64);
        finish_attrs(&part, mode, mtime).map_err(io_err(path))
    }
}

/// Starts writing `len` bytes at `offset` of `file` to disk without waiting, so that the
/// final `syncfs` finds little left to do: 256 MiB to three receivers ended with ~1 s of
/// writeback after the last block arrived. Best effort: an error only means later.
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

/// The blocks of a file already at the target path, by leaf hash.
#[derive(Default)]
struct Existing {
    file: Option<File>,
    /// leaf -> offset of a block with that hash.
    blocks: HashMap<Hash, u64>,
    /// The leaves in file order, and the file's size.
    order: Vec<Hash>,
    size: u64,
}

impl Existing {
    /// True if the file already holds exactly these leaves.
    fn in_place(&self, leaves: &[Hash], size: u64) -> bool {
        self.file.is_some() && self.size == size && self.order == leaves && !leaves.is_empty()
    }

    /// A block of the existing file with hash `leaf`, re-verified as it is read.
    fn read(&self, leaf: &Hash, len: u64) -> Option<Vec<u8>> {
        let off = *self.blocks.get(leaf)?;
        let mut buf = vec![0; len as usize];
        self.file.as_ref()?.read_exact_at(&mut buf, off).ok()?;
        (blake3::hash(&buf) == *leaf).then_some(buf)
    }
}

async fn existing_blocks(path: &Path, bs: BlockSize) -> Existing {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || hash_existing(&path, bs).unwrap_or_default())
        .await
        .unwrap_or_default()
}

fn hash_existing(path: &Path, bs: BlockSize) -> io::Result<Existing> {
    let meta = fs::symlink_metadata(path)?;
    if !meta.is_file() {
        return Ok(Existing::default());
    }
    let file = File::open(path)?;
    let size = meta.len();
    let mut ex = Existing {
        size,
        ..Existing::default()
    };
    let mut buf = vec![0; bs.bytes() as usize];
    for i in 0..bs.blocks_in(size) {
        let len = bs.block_len(size, i) as usize;
        file.read_exact_at(&mut buf[..len], i * bs.bytes())?;
        let leaf = blake3::hash(&buf[..len]);
        ex.blocks.entry(leaf).or_insert(i * bs.bytes());
        ex.order.push(leaf);
    }
    ex.file = Some(file);
    Ok(ex)
}

/// Removes temporary files a killed copy left in `dir`.
fn clean_parts(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().as_bytes().starts_with(PART_PREFIX.as_bytes()) {
            let _ = fs::remove_file(e.path());
        }
    }
}

fn finish_attrs(path: &Path, mode: u32, mtime: Timestamp) -> io::Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    set_mtime(path, mtime, true)
}

/// Sets modes and mtimes of directories, deepest first (adding entries changes a parent's mtime).
fn set_dir_attrs(items: &[(PathBuf, Entry)], opts: CopyOptions) -> Result<(), CopyError> {
    for (path, e) in items.iter().rev() {
        if matches!(e.kind, EntryKind::Dir(_)) {
            let mode = final_mode(e.mode, true, opts.keep_setuid);
            finish_attrs(path, mode, e.mtime).map_err(io_err(path))?;
        }
    }
    Ok(())
}

/// Sets the modification time (and the access time to the same), following symlinks or not.
pub fn set_mtime(path: &Path, t: Timestamp, follow: bool) -> io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))?;
    let ts = libc::timespec {
        tv_sec: t.secs as libc::time_t,
        tv_nsec: t.nanos as libc::c_long,
    };
    let times = [ts, ts];
    let flags = if follow { 0 } else { libc::AT_SYMLINK_NOFOLLOW };
    // SAFETY: `c` is a valid NUL-terminated path and `times` holds exactly two timespecs.
    let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes everything written under `dir` durable before the renames publish it.
fn sync_fs(dir: &Path) {
    let target = if dir.is_dir() {
        dir
    } else {
        dir.parent().unwrap_or(Path::new("."))
    };
    if let Ok(f) = File::open(target) {
        // SAFETY: syncfs only reads the descriptor, which `f` keeps open.
        unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f)) };
    }
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
