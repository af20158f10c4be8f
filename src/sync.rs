//! `lcfs sync SRC DEST`: a local directory (or file) into DEST, writing only the blocks that
//! differ (lcsync's local delta sync, done with lcfs copy's DEST machinery).
//!
//! - SRC is walked by descriptor and never left ([`walk`]): no symlink below it is followed,
//!   symlinks are copied as symlinks, fifos, sockets and devices are left out with a warning.
//! - DEST is handled exactly as `lcfs copy` handles it (`copy::dest`, `copy::staging`,
//!   `copy::trash`): only by descriptor below DEST, never following a symlink there, refusing
//!   directories another user owns, private modes until the end; every new or changed file
//!   and symlink is staged under `.lcfs-part-*` in its directory, made durable, then renamed
//!   into place; `--delete` moves extras to `DEST/.lcfs-trash/<time>/`.
//! - Each file is compared with DEST's file of the same name block by block ([`file`] says
//!   how, and why bytes rather than hashes). An equal file of the syncing user alone stays in
//!   place and only gets its mode and mtime; otherwise the new file is built from DEST's
//!   equal blocks and SRC's differing ones ([`plan`]).
//! - Modes and mtimes land as in `lcfs copy`: setuid and setgid dropped unless
//!   `keep_setuid`, nanosecond mtimes on files, symlinks and directories, directory modes at
//!   the end, deepest first; DEST's own only when the sync created it.

mod file;
mod plan;
mod walk;

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::copy::dest::{self, Dest, DestError};
use crate::copy::staging::{Part, Staging};
use crate::copy::{final_mode, trash, CopyError};
use crate::progress::Progress;
use crate::serve::index::{beneath, IndexError, Tree};
use crate::wire::object::BlockSize;
use file::{build, BuildError, Built, Sink};
use walk::{Item, ItemKind};

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Source(#[from] IndexError),
    #[error("cannot sync {} to {}", src.display(), dest.display())]
    File {
        src: PathBuf,
        dest: PathBuf,
        source: io::Error,
    },
    #[error("{} kept changing while it was synced ({} tries); sync again once nothing writes it", path.display(), file::ATTEMPTS)]
    Unstable { path: PathBuf },
    #[error(transparent)]
    Copy(#[from] CopyError),
    #[error(transparent)]
    Dest(#[from] DestError),
    #[error("interrupted")]
    Interrupted,
}

/// How to sync.
#[derive(Debug, Clone, Copy)]
pub struct SyncOptions {
    /// Keep setuid and setgid bits (they are dropped by default).
    pub keep_setuid: bool,
    /// Move what DEST holds and SRC does not into `DEST/.lcfs-trash/<time>/`.
    pub delete: bool,
    /// Files are compared in blocks of this size.
    pub block_size: BlockSize,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            keep_setuid: false,
            delete: false,
            block_size: BlockSize::DEFAULT,
        }
    }
}

/// What a sync did.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Bytes of all files synced.
    pub bytes: u64,
    /// Bytes written from SRC.
    pub written: u64,
    /// Bytes taken from DEST's files (shared or copied in the kernel), or left in place.
    pub reused: u64,
    /// Files and symlinks DEST already had right.
    pub unchanged: u64,
    /// Entries moved to the trash (`--delete`).
    pub trashed: u64,
    /// Entries of SRC left out, with why.
    pub skipped: Vec<(PathBuf, String)>,
    pub elapsed: Duration,
}

struct Syncer<'a> {
    tree: &'a Tree,
    dest: &'a Dest,
    staging: Staging<'a>,
    progress: Progress,
    opts: SyncOptions,
    stop: &'a AtomicBool,
    report: SyncReport,
}

/// Syncs `src` into `dest`. `stop` set (by a signal) ends it between two files or runs, with
/// every part file removed and nothing published.
pub fn sync(
    src: &Path,
    dest: &Path,
    opts: SyncOptions,
    stop: &AtomicBool,
) -> Result<SyncReport, SyncError> {
    let started = Instant::now();
    let tree = Tree::open(src)?;
    let (dest, walked, whole) = match tree.single_file() {
        Some((name, published)) => single(&tree, dest, name, published)?,
        None => {
            let dest = Dest::open_or_create(dest)?;
            let st = rustix::fs::fstat(dest.root()).map_err(io::Error::from);
            let id = st.ok().map(|st| (st.st_dev, st.st_ino));
            #[allow(clippy::useless_conversion)]
            let id = id.map(|(d, i)| (u64::from(d), u64::from(i)));
            let walked = walk::walk(&tree, id).map_err(IndexError::io(src))?;
            (dest, walked, true)
        }
    };
    for (path, why) in &walked.skipped {
        tracing::warn!("skipping {}: {why}", path.display());
    }
    let total = walked.items.iter().map(file_size).sum();
    let mut s = Syncer {
        tree: &tree,
        dest: &dest,
        staging: Staging::new(&dest),
        progress: Progress::new("sync", total),
        opts,
        stop,
        report: SyncReport {
            bytes: total,
            skipped: walked.skipped,
            ..SyncReport::default()
        },
    };
    s.run(&walked.items, whole)?;
    s.report.elapsed = started.elapsed();
    Ok(s.report)
}

/// SRC is one file: into DEST if that is a directory, else to the path DEST.
fn single(
    tree: &Tree,
    dest: &Path,
    name: &std::ffi::CStr,
    published: &[u8],
) -> Result<(Dest, walk::Walked, bool), SyncError> {
    use std::os::unix::ffi::OsStrExt;
    let src_rel = PathBuf::from(std::ffi::OsStr::from_bytes(name.to_bytes()));
    let (dir, rel) = if dest.is_dir() {
        (dest, PathBuf::from(std::ffi::OsStr::from_bytes(published)))
    } else {
        let parent = dest.parent().filter(|p| !p.as_os_str().is_empty());
        let rel = dest
            .file_name()
            .map(PathBuf::from)
            .ok_or_else(|| SyncError::File {
                src: tree.display(&src_rel),
                dest: dest.to_owned(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"),
            })?;
        (parent.unwrap_or(Path::new(".")), rel)
    };
    let attrs = beneath::stat_at(tree.dir().as_fd(), name)
        .map_err(IndexError::io(&tree.display(&src_rel)))?;
    let item = Item {
        rel,
        kind: ItemKind::File {
            src: src_rel,
            size: attrs.size,
        },
        mode: attrs.mode,
        mtime: attrs.mtime,
    };
    let walked = walk::Walked {
        items: vec![item],
        skipped: Vec::new(),
    };
    Ok((Dest::open_existing(dir)?, walked, false))
}

fn file_size(i: &Item) -> u64 {
    match i.kind {
        ItemKind::File { size, .. } => size,
        _ => 0,
    }
}

fn is_dir(i: &Item) -> bool {
    matches!(i.kind, ItemKind::Dir)
}

impl Syncer<'_> {
    fn run(&mut self, items: &[Item], whole: bool) -> Result<(), SyncError> {
        for i in items.iter().filter(|i| is_dir(i)) {
            self.dest.prepare_dir(&i.rel)?;
            self.report.dirs += 1;
        }
        for i in items {
            if self.stop.load(Ordering::Relaxed) {
                return Err(SyncError::Interrupted);
            }
            match &i.kind {
                ItemKind::Dir => {}
                ItemKind::File { src, .. } => self.sync_file(i, src)?,
                ItemKind::Symlink(target) => self.sync_symlink(i, target)?,
            }
        }
        self.staging.sync();
        self.staging.commit()?;
        if self.opts.delete && whole {
            let paths = items.iter().map(|i| (i.rel.as_path(), is_dir(i)));
            self.report.trashed = trash::sweep(self.dest, paths)?;
        }
        self.set_dir_attrs(items, whole)?;
        self.progress.finish();
        Ok(())
    }

    fn dest_err(&self, rel: &Path) -> impl Fn(io::Error) -> CopyError + '_ {
        let path = self.dest.display(rel);
        move |source| CopyError::Io {
            path: path.clone(),
            source,
        }
    }

    fn sync_file(&mut self, item: &Item, src_rel: &Path) -> Result<(), SyncError> {
        let src_path = self.tree.display(src_rel);
        let Some((src, attrs)) = self.open_src(src_rel)? else {
            return Ok(());
        };
        let (dir, name) = self.dest.parent_of(&item.rel)?;
        let existing = dest::open_regular(&dir, name);
        let may_keep = existing
            .as_ref()
            .is_some_and(|(_, st)| dest::solely_ours(st, self.dest.euid()));
        let mut sink = Parts {
            dir: &dir,
            last: None,
        };
        let old = existing.as_ref().map(|(f, _)| f);
        let built = build(&src, old, may_keep, self.opts.block_size, &mut sink);
        let mode = final_mode(attrs.mode, false, self.opts.keep_setuid);
        let err = |source| SyncError::File {
            src: src_path.clone(),
            dest: self.dest.display(&item.rel),
            source,
        };
        self.report.files += 1;
        self.progress.inc(attrs.size);
        match built {
            Err(BuildError::Unstable) => Err(SyncError::Unstable { path: src_path }),
            Err(BuildError::Io(e)) => Err(err(e)),
            Ok(Built::Unchanged(stamp)) => {
                let Some((file, st)) = existing else {
                    return Ok(());
                };
                self.report.unchanged += 1;
                self.report.reused += stamp.size;
                if st.st_mode & 0o7777 != mode {
                    dest::set_mode(&file, mode).map_err(self.dest_err(&item.rel))?;
                }
                if dest::mtime_of(&st) != stamp.mtime {
                    dest::set_times(&file, stamp.mtime).map_err(self.dest_err(&item.rel))?;
                }
                Ok(())
            }
            Ok(Built::Staged(plan, stamp)) => {
                let Some((part, ino, file)) = sink.last.take() else {
                    return Ok(());
                };
                self.staging
                    .add(Part::new(&item.rel, part, Some((ino, mode))));
                self.report.written += plan.written();
                self.report.reused += plan.reused();
                dest::set_times(&file, stamp.mtime).map_err(self.dest_err(&item.rel))?;
                Ok(())
            }
        }
    }

    /// SRC's file at `rel`, with its attributes; `None` (and a warning) if it is no longer
    /// a regular file or is gone.
    fn open_src(&mut self, rel: &Path) -> Result<Option<(File, beneath::Attrs)>, SyncError> {
        let path = self.tree.display(rel);
        let opened = self
            .tree
            .open_file(rel)
            .and_then(|f| Ok((beneath::stat_fd(&f)?, f)));
        let why = match opened {
            Ok((a, f)) if a.kind == beneath::Kind::File => return Ok(Some((f, a))),
            Ok(_) => "it is no longer a regular file".to_owned(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => "it vanished".to_owned(),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => "it became a symlink".to_owned(),
            Err(e) => return Err(IndexError::io(&path)(e).into()),
        };
        tracing::warn!("skipping {}: {why}", path.display());
        self.report.skipped.push((path, why));
        Ok(None)
    }

    fn sync_symlink(&mut self, item: &Item, target: &[u8]) -> Result<(), SyncError> {
        self.report.symlinks += 1;
        let (dir, name) = self.dest.parent_of(&item.rel)?;
        if let Some((t, st)) = dest::symlink_at(&dir, name) {
            if t == target && dest::mtime_of(&st) == item.mtime {
                self.report.unchanged += 1;
                return Ok(());
            }
        }
        let part = dest::symlink_part(&dir, target).map_err(self.dest_err(&item.rel))?;
        self.staging.add(Part::new(&item.rel, part.clone(), None));
        dest::set_times_at(&dir, &part, item.mtime).map_err(self.dest_err(&item.rel))?;
        Ok(())
    }

    /// Directory modes and mtimes, deepest first; DEST's own when the sync made it.
    fn set_dir_attrs(&self, items: &[Item], whole: bool) -> Result<(), SyncError> {
        let dirs = items.iter().rev().filter(|i| is_dir(i));
        let dirs = dirs.map(|i| (i.rel.as_path(), i.mode, i.mtime));
        let root = (whole && self.dest.created())
            .then(|| beneath::stat_fd(self.tree.dir()).ok())
            .flatten()
            .map(|a| (Path::new(""), a.mode, a.mtime));
        for (rel, mode, mtime) in dirs.chain(root) {
            let fd = self.dest.dir(rel)?;
            let mode = final_mode(mode, true, self.opts.keep_setuid);
            dest::set_mode(&*fd, mode).map_err(self.dest_err(rel))?;
            dest::set_times(&*fd, mtime).map_err(self.dest_err(rel))?;
        }
        Ok(())
    }
}

/// Part files in one DEST directory, one per attempt.
struct Parts<'a> {
    dir: &'a OwnedFd,
    /// The last part: its name, inode and file.
    last: Option<(OsString, u64, File)>,
}

impl Sink for Parts<'_> {
    fn create(&mut self) -> io::Result<File> {
        let p = dest::create_part(self.dir)?;
        let file = p.file.try_clone()?;
        self.last = Some((p.name, p.ino, p.file));
        Ok(file)
    }

    fn discard(&mut self) {
        if let Some((name, _, _)) = self.last.take() {
            dest::remove_part(self.dir, &name);
        }
    }
}

impl Drop for Parts<'_> {
    /// A part not handed to the staging (an error between creating and staging it) is removed.
    fn drop(&mut self) {
        self.discard();
    }
}
