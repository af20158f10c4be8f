//! Access to the served tree by descriptor only, so that nothing outside it is ever read
//! (issue 9; DESIGN.md section 7: "`serve` indexes by descriptor and never leaves its tree").
//!
//! The server runs as root over a tree that other users may write to. Anything done by path
//! below PATH can be redirected: a directory swapped for a symlink between the listing and the
//! open makes a path walk continue outside the tree. So:
//! - PATH is resolved once, by [`Tree::open`], into a directory descriptor (PATH itself, or
//!   the directory holding it when PATH is a file). Nothing resolves PATH again: a reindex
//!   walks the same directory, even if PATH now names another one.
//! - The walk goes one name at a time from a directory descriptor: [`stat_at`] never follows
//!   a symlink, [`open_dir_at`] and [`open_file_at`] open with `O_NOFOLLOW`, so a name that
//!   became a symlink fails to open (`ELOOP`) instead of being followed. The kind a caller acts
//!   on is the `fstat` of what it opened: the listing and the `lstat` may be stale.
//! - Files are opened `O_NONBLOCK | O_NOCTTY`: a fifo or device swapped in for a file neither
//!   blocks the walk nor becomes its controlling terminal, and its `fstat` says it is no file.
//! - The sender re-opens a block's file by its path relative to the tree with
//!   [`Tree::open_file`]: `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` (Linux 5.6),
//!   or, where that system call is missing, one `O_NOFOLLOW` open per component from the tree's
//!   descriptor. Either way no symlink and no `..` is ever followed.
//!
//! Not covered: a hard link is the file itself. A user who can hard-link a file into the tree
//! publishes it; with `fs.protected_hardlinks = 1` (the default of most distributions) users
//! can only hard-link files they could read and write anyway.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, StatxFlags, CWD};

use super::IndexError;
use crate::serve::leafcache::FileStamp;
use crate::wire::object::Timestamp;

/// Flags of every open of something to be read: never follow, never block, never adopt a tty.
const READ_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::NOFOLLOW)
    .union(OFlags::NONBLOCK)
    .union(OFlags::NOCTTY)
    .union(OFlags::CLOEXEC);

/// What kind of inode a stat found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    File,
    Dir,
    Symlink,
    /// Fifo, socket or device: never published, never read.
    Other,
}

/// The attributes of one inode that the index uses, from one `statx`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Attrs {
    pub kind: Kind,
    /// Permission bits, setuid, setgid and sticky.
    pub mode: u32,
    pub size: u64,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub ino: u64,
    /// Encoded as `st_dev` is, so that leaf cache entries from `stat` still match.
    pub dev: u64,
    pub nlink: u32,
}

impl Attrs {
    fn of(st: &rustix::fs::Statx) -> Attrs {
        let kind = match u32::from(st.stx_mode) & libc::S_IFMT {
            libc::S_IFREG => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            _ => Kind::Other,
        };
        let time = |t: rustix::fs::StatxTimestamp| Timestamp {
            secs: t.tv_sec,
            nanos: t.tv_nsec,
        };
        Attrs {
            kind,
            mode: u32::from(st.stx_mode) & 0o7777,
            size: st.stx_size,
            mtime: time(st.stx_mtime),
            ctime: time(st.stx_ctime),
            ino: st.stx_ino,
            dev: rustix::fs::makedev(st.stx_dev_major, st.stx_dev_minor),
            nlink: st.stx_nlink,
        }
    }

    /// What identifies this version of the file in the leaf cache.
    pub fn stamp(&self) -> FileStamp {
        FileStamp {
            size: self.size,
            mtime: self.mtime,
            ctime: self.ctime,
            ino: self.ino,
            dev: self.dev,
        }
    }
}

/// Every field [`Attrs`] reads.
const STATX_MASK: StatxFlags = StatxFlags::TYPE
    .union(StatxFlags::MODE)
    .union(StatxFlags::SIZE)
    .union(StatxFlags::MTIME)
    .union(StatxFlags::CTIME)
    .union(StatxFlags::INO)
    .union(StatxFlags::NLINK);

/// `lstat` of `name` in `dir`: a symlink is reported as one, never followed.
pub(crate) fn stat_at(dir: BorrowedFd, name: &CStr) -> io::Result<Attrs> {
    let st = rustix::fs::statx(dir, name, AtFlags::SYMLINK_NOFOLLOW, STATX_MASK)?;
    Ok(Attrs::of(&st))
}

/// `fstat` of an open descriptor: the attributes of exactly what was opened.
pub(crate) fn stat_fd(fd: impl AsFd) -> io::Result<Attrs> {
    let st = rustix::fs::statx(fd, c"", AtFlags::EMPTY_PATH, STATX_MASK)?;
    Ok(Attrs::of(&st))
}

/// Opens directory `name` in `dir`; a symlink or anything but a directory fails to open.
pub(crate) fn open_dir_at(dir: BorrowedFd, name: &CStr) -> io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    Ok(rustix::fs::openat(dir, name, flags, Mode::empty())?)
}

/// Opens `name` in `dir` for reading; a symlink fails to open. The caller must `fstat` the
/// result: a fifo or device opens too (without blocking) and must not be read.
pub(crate) fn open_file_at(dir: BorrowedFd, name: &CStr) -> io::Result<File> {
    Ok(rustix::fs::openat(dir, name, READ_FLAGS, Mode::empty())?.into())
}

/// The target of symlink `name` in `dir`, as raw bytes.
pub(crate) fn read_link_at(dir: BorrowedFd, name: &CStr) -> io::Result<Vec<u8>> {
    Ok(rustix::fs::readlinkat(dir, name, Vec::new())?.into_bytes())
}

/// The names in directory `dir`, without `.` and `..`, read with `getdents64` from a fresh
/// open of `dir`'s `.`: a `dup` would share the read position, and a second walk of the same
/// directory (a reindex) would find it empty.
pub(crate) fn list(dir: &OwnedFd) -> io::Result<Vec<CString>> {
    list_where(dir, |_| true)
}

/// The names in `dir` the listing says are directories, or does not say what they are (they
/// fail to open with [`open_dir_at`] when they are no directory).
pub(crate) fn list_dirs(dir: &OwnedFd) -> io::Result<Vec<CString>> {
    list_where(dir, |t| {
        matches!(t, FileType::Directory | FileType::Unknown)
    })
}

fn list_where(dir: &OwnedFd, keep: impl Fn(FileType) -> bool) -> io::Result<Vec<CString>> {
    let mut stream = rustix::fs::Dir::read_from(dir)?;
    let mut names = Vec::new();
    while let Some(entry) = stream.read() {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_bytes() != b"." && name.to_bytes() != b".." && keep(entry.file_type()) {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

/// The served tree, held open: the only place every access starts from.
#[derive(Debug)]
pub struct Tree {
    /// The directory PATH resolved to, or the one holding PATH when it is a file.
    dir: OwnedFd,
    /// Where `dir` was when it was opened: for messages and leaf cache keys only, never
    /// opened again.
    dir_path: PathBuf,
    /// When PATH is a regular file: its name in `dir`, and the name it is published under
    /// (the last component of PATH as given).
    file: Option<(CString, Vec<u8>)>,
    /// PATH as given, to tell when it names another directory; never opened again.
    given: PathBuf,
}

impl Tree {
    /// Resolves `path` once, following symlinks (the administrator chose it), and holds the
    /// result open. `path` must be a directory or a regular file.
    pub fn open(path: &Path) -> Result<Tree, IndexError> {
        raise_fd_limit();
        let io = IndexError::io(path);
        let resolved = std::fs::canonicalize(path).map_err(io)?;
        // O_PATH opens nothing: a fifo or device named by PATH is not touched.
        let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let handle = rustix::fs::openat(CWD, &resolved, flags, Mode::empty())
            .map_err(|e| IndexError::io(path)(e.into()))?;
        let attrs = stat_fd(&handle).map_err(IndexError::io(path))?;
        match attrs.kind {
            Kind::Dir => Ok(Tree {
                dir: open_dir_at(handle.as_fd(), c".").map_err(IndexError::io(path))?,
                dir_path: resolved,
                file: None,
                given: path.to_path_buf(),
            }),
            Kind::File => Self::open_file_root(path, &resolved, &attrs),
            _ => Err(IndexError::NotServable {
                path: path.to_path_buf(),
            }),
        }
    }

    /// The tree of a single file: the directory holding it, and its name there.
    fn open_file_root(given: &Path, resolved: &Path, attrs: &Attrs) -> Result<Tree, IndexError> {
        let (Some(parent), Some(name)) = (resolved.parent(), resolved.file_name()) else {
            return Err(IndexError::NotServable {
                path: given.to_path_buf(),
            });
        };
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let dir = rustix::fs::openat(CWD, parent, flags, Mode::empty())
            .map_err(|e| IndexError::io(parent)(e.into()))?;
        let name = CString::new(name.as_bytes()).map_err(|e| IndexError::io(given)(e.into()))?;
        let now = stat_at(dir.as_fd(), &name).map_err(IndexError::io(given))?;
        if (now.kind, now.dev, now.ino) != (Kind::File, attrs.dev, attrs.ino) {
            return Err(IndexError::Changed {
                path: given.to_path_buf(),
            });
        }
        let published = given
            .file_name()
            .map_or(name.to_bytes(), OsStrExt::as_bytes);
        Ok(Tree {
            dir,
            dir_path: parent.to_path_buf(),
            file: Some((name.clone(), published.to_vec())),
            given: given.to_path_buf(),
        })
    }

    pub(crate) fn dir(&self) -> &OwnedFd {
        &self.dir
    }

    /// The name of the file, in the tree's directory and as published, when PATH is a file.
    pub(crate) fn single_file(&self) -> Option<(&CStr, &[u8])> {
        self.file.as_ref().map(|(n, p)| (n.as_c_str(), &p[..]))
    }

    /// Where the tree's directory was when it was opened.
    pub fn dir_path(&self) -> &Path {
        &self.dir_path
    }

    /// Whether the tree's directory has been deleted (no name links to it any more): the
    /// descriptor still works, but lists nothing, and nothing can be added to it.
    pub fn is_deleted(&self) -> bool {
        rustix::fs::fstat(&self.dir).is_ok_and(|st| st.st_nlink == 0)
    }

    /// Whether PATH now names another directory than the one held, or nothing: it was moved,
    /// replaced or repointed (a symlink such as `current`). Only compared, never opened.
    pub fn moved(&self) -> bool {
        let held = rustix::fs::fstat(&self.dir);
        let named = match self.file {
            None => rustix::fs::stat(&self.given),
            Some(_) => rustix::fs::stat(&self.dir_path),
        };
        match (held, named) {
            (Ok(h), Ok(n)) => (h.st_dev, h.st_ino) != (n.st_dev, n.st_ino),
            _ => true,
        }
    }

    /// `rel` (relative to the tree) as a path, for messages and leaf cache keys.
    pub fn display(&self, rel: &Path) -> PathBuf {
        if rel.as_os_str().is_empty() {
            self.dir_path.clone()
        } else {
            self.dir_path.join(rel)
        }
    }

    /// Opens `rel`, a path relative to the tree made of plain names, for reading; fails if
    /// any component is a symlink or `..`, or resolves outside the tree. The caller must
    /// `fstat` the result (it may be a fifo or a device).
    pub fn open_file(&self, rel: &Path) -> io::Result<File> {
        if OPENAT2.load(Relaxed) {
            let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS;
            match rustix::fs::openat2(&self.dir, rel, READ_FLAGS, Mode::empty(), resolve) {
                Err(rustix::io::Errno::NOSYS) => OPENAT2.store(false, Relaxed),
                result => return Ok(result?.into()),
            }
        }
        open_by_components(self.dir.as_fd(), rel)
    }
}

/// Whether `openat2` is there; cleared at the first `ENOSYS`.
static OPENAT2: AtomicBool = AtomicBool::new(true);

/// [`Tree::open_file`] without `openat2`: each directory component opened with `O_NOFOLLOW`
/// from the one before, so a symlink anywhere fails (`ENOTDIR` or `ELOOP`).
pub(crate) fn open_by_components(root: BorrowedFd, rel: &Path) -> io::Result<File> {
    let mut names = Vec::new();
    for component in rel.components() {
        let Component::Normal(name) = component else {
            return Err(io::Error::from_raw_os_error(libc::EXDEV));
        };
        names.push(CString::new(name.as_bytes())?);
    }
    let Some((last, dirs)) = names.split_last() else {
        return Err(io::Error::from_raw_os_error(libc::EISDIR));
    };
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut held: Option<OwnedFd> = None;
    for name in dirs {
        let at = held.as_ref().map_or(root, |fd| fd.as_fd());
        held = Some(rustix::fs::openat(at, name, flags, Mode::empty())?);
    }
    open_file_at(held.as_ref().map_or(root, |fd| fd.as_fd()), last)
}

/// Opens the directory `rel` below `root` (itself for an empty `rel`) one name at a time
/// with `O_NOFOLLOW`, so that a symlink or `..` anywhere fails.
pub(crate) fn open_dir_beneath(root: BorrowedFd, rel: &Path) -> io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut dir = rustix::fs::openat(root, c".", flags, Mode::empty())?;
    for component in rel.components() {
        let Component::Normal(name) = component else {
            return Err(io::Error::from_raw_os_error(libc::EXDEV));
        };
        dir = open_dir_at(dir.as_fd(), &CString::new(name.as_bytes())?)?;
    }
    Ok(dir)
}

/// Raises the soft limit on open files to the hard one, once: a walk holds one descriptor
/// for each directory level it is inside, on every indexing thread.
fn raise_fd_limit() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        use rustix::process::{getrlimit, setrlimit, Resource};
        let mut limit = getrlimit(Resource::Nofile);
        if limit.current < limit.maximum {
            limit.current = limit.maximum;
            if let Err(e) = setrlimit(Resource::Nofile, limit) {
                tracing::debug!("cannot raise the open file limit: {e}");
            }
        }
    });
}
