//! DEST by descriptor: the only way `lcfs copy` touches the filesystem below DEST.
//!
//! A copy often runs as root into a directory other users can write in, and anything done
//! there by path can be turned elsewhere by a symlink or a directory swapped in between two
//! system calls. So:
//!
//! - DEST is resolved once, as the user named it, and held open ([`Dest`]). A DEST the copy
//!   creates is made 0700 and opened without following a symlink; it must then be ours.
//! - Below DEST every call is `*at()` on a directory descriptor with a single name, and no
//!   symlink is ever followed: directories are opened `O_DIRECTORY | O_NOFOLLOW`, files
//!   `O_NOFOLLOW`, symlinks' times set with `AT_SYMLINK_NOFOLLOW`. A symlink or any other
//!   non-directory where a directory is wanted is unlinked and replaced, never entered.
//! - Every directory the copy writes in below DEST belongs to the copying euid. One that
//!   already exists and belongs to anyone else is refused with an error naming it and its
//!   owner; for root too, since copy never chowns and the intended owner is always the euid.
//!   Each is remembered by device and inode when prepared and checked again whenever it is
//!   reopened, so a directory moved away and replaced during the copy is an error, never a
//!   new target.
//! - While the copy runs the directories it writes in are 0700 (new ones are made so, existing
//!   ones are closed to others) and staged files are created 0600 with `O_EXCL`: nothing can
//!   be read before the copy publishes it, nor planted where it writes.
//! - Removal works by descriptor too: a directory standing where a file goes is emptied entry
//!   by entry without following a symlink or leaving its filesystem, and left-over part files
//!   are removed only when the copying euid owns them.
//!
//! At most [`OPEN_DIRS`] directory descriptors stay open; the others are reopened from DEST one
//! component at a time, each component checked against its remembered identity.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use lru::LruCache;
use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, Stat, Timespec, Timestamps, CWD};
use rustix::io::Errno;

use crate::wire::object::Timestamp;

/// Names of staged files: hidden, and removed by a later copy if a killed one left them.
pub const PART_PREFIX: &str = ".lcfs-part-";
/// Directory descriptors kept open between uses. Files are staged and committed in the walk's
/// order, so consecutive uses mostly hit the same few directories.
const OPEN_DIRS: usize = 64;
/// How often a name is retried when someone else keeps changing it (or a random part name
/// is taken) before the copy gives up on it.
const ATTEMPTS: usize = 8;
/// The deepest directory [`replace`] removes: each level holds a descriptor while it is emptied.
const MAX_REMOVE_DEPTH: usize = 256;

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);
/// Reading a file someone else may have planted: a FIFO must not block the open.
const READ_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::NOFOLLOW)
    .union(OFlags::NONBLOCK)
    .union(OFlags::NOCTTY)
    .union(OFlags::CLOEXEC);
const PRIVATE_DIR: u32 = 0o700;
const PRIVATE_FILE: u32 = 0o600;

#[derive(Debug, thiserror::Error)]
pub enum DestError {
    #[error("cannot {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "refusing to write in {}: it belongs to uid {owner}, and this copy runs as uid {euid}",
        path.display()
    )]
    Foreign {
        path: PathBuf,
        owner: u32,
        euid: u32,
    },
    #[error("{} was replaced by something else during the copy", path.display())]
    Replaced { path: PathBuf },
    #[error("{} kept changing while the copy tried to make it a directory", path.display())]
    Unstable { path: PathBuf },
}

/// DEST, held open, and every directory this copy prepared below it.
pub struct Dest {
    root: Arc<OwnedFd>,
    path: PathBuf,
    euid: u32,
    created: bool,
    /// (device, inode) of every directory prepared below DEST, by path relative to it.
    known: Mutex<HashMap<PathBuf, (u64, u64)>>,
    open: Mutex<LruCache<PathBuf, Arc<OwnedFd>>>,
}

impl Dest {
    /// Opens the directory DEST for a tree, creating it 0700 (and missing parents as
    /// `mkdir -p` does) when it does not exist, and removes our part files a killed copy left.
    pub fn open_or_create(path: &Path) -> Result<Dest, DestError> {
        let created = create_dest(path)?;
        // A DEST the user named is followed like cp follows it; one we just made must be ours.
        let flags = if created {
            DIR_FLAGS
        } else {
            DIR_FLAGS.difference(OFlags::NOFOLLOW)
        };
        let fd = rfs::openat(CWD, path, flags, Mode::empty()).map_err(io_at("open", path))?;
        let dest = Dest::new(fd, path, created);
        if created {
            dest.own_and_close(dest.root.as_fd(), Path::new(""))?;
        }
        clean_parts(dest.root.as_fd(), dest.euid);
        Ok(dest)
    }

    /// Opens an existing directory, as named: where a single file goes.
    pub fn open_existing(path: &Path) -> Result<Dest, DestError> {
        let flags = DIR_FLAGS.difference(OFlags::NOFOLLOW);
        let fd = rfs::openat(CWD, path, flags, Mode::empty()).map_err(io_at("open", path))?;
        Ok(Dest::new(fd, path, false))
    }

    fn new(fd: OwnedFd, path: &Path, created: bool) -> Dest {
        Dest {
            root: Arc::new(fd),
            path: path.to_owned(),
            euid: euid(),
            created,
            known: Mutex::new(HashMap::new()),
            open: Mutex::new(LruCache::new(
                NonZeroUsize::new(OPEN_DIRS).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }

    /// True if this copy made DEST (so its mode and mtime are the copy's to set).
    pub fn created(&self) -> bool {
        self.created
    }

    pub fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    pub fn euid(&self) -> u32 {
        self.euid
    }

    /// `rel` as a path under DEST, for messages.
    pub fn display(&self, rel: &Path) -> PathBuf {
        self.path.join(rel)
    }

    /// Makes `rel` (whose parent is DEST or was prepared before) a directory of ours, 0700,
    /// with no part files of ours left in it.
    pub fn prepare_dir(&self, rel: &Path) -> Result<(), DestError> {
        let (parent, name) = self.parent_of(rel)?;
        let fd = self.dir_at(&parent, name, rel)?;
        let st = self.own_and_close(fd.as_fd(), rel)?;
        clean_parts(fd.as_fd(), self.euid);
        lock(&self.known).insert(rel.to_owned(), identity(&st));
        lock(&self.open).put(rel.to_owned(), Arc::new(fd));
        Ok(())
    }

    /// Opens the directory at `name` in `parent`, creating it or replacing a non-directory.
    fn dir_at(&self, parent: &OwnedFd, name: &OsStr, rel: &Path) -> Result<OwnedFd, DestError> {
        for _ in 0..ATTEMPTS {
            match rfs::openat(parent, name, DIR_FLAGS, Mode::empty()) {
                Ok(fd) => return Ok(fd),
                Err(Errno::NOENT) => match rfs::mkdirat(parent, name, mode(PRIVATE_DIR)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(self.io("create", rel, e)),
                },
                // A symlink (ELOOP) or another non-directory (ENOTDIR): unlinked, never entered.
                Err(Errno::LOOP | Errno::NOTDIR) => {
                    match rfs::unlinkat(parent, name, AtFlags::empty()) {
                        Ok(()) | Err(Errno::NOENT) => {}
                        Err(e) => return Err(self.io("remove", rel, e)),
                    }
                }
                Err(e) => return Err(self.io("open", rel, e)),
            }
        }
        Err(DestError::Unstable {
            path: self.display(rel),
        })
    }

    /// Refuses a directory another user owns; closes ours to everyone else until the end.
    fn own_and_close(&self, fd: BorrowedFd<'_>, rel: &Path) -> Result<Stat, DestError> {
        let st = rfs::fstat(fd).map_err(|e| self.io("stat", rel, e))?;
        if st.st_uid != self.euid {
            return Err(DestError::Foreign {
                path: self.display(rel),
                owner: st.st_uid,
                euid: self.euid,
            });
        }
        if st.st_mode & 0o7777 != PRIVATE_DIR {
            rfs::fchmod(fd, mode(PRIVATE_DIR)).map_err(|e| self.io("chmod", rel, e))?;
        }
        Ok(st)
    }

    /// The directory `rel`: DEST itself for "", else one [`Dest::prepare_dir`] made, still
    /// the same one.
    pub fn dir(&self, rel: &Path) -> Result<Arc<OwnedFd>, DestError> {
        if rel.as_os_str().is_empty() {
            return Ok(self.root.clone());
        }
        if let Some(fd) = lock(&self.open).get(rel) {
            return Ok(fd.clone());
        }
        let (parent, name) = self.parent_of(rel)?;
        let replaced = || DestError::Replaced {
            path: self.display(rel),
        };
        let fd = match rfs::openat(&*parent, name, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT | Errno::LOOP | Errno::NOTDIR) => return Err(replaced()),
            Err(e) => return Err(self.io("open", rel, e)),
        };
        let st = rfs::fstat(&fd).map_err(|e| self.io("stat", rel, e))?;
        if lock(&self.known).get(rel) != Some(&identity(&st)) {
            return Err(replaced());
        }
        let fd = Arc::new(fd);
        lock(&self.open).put(rel.to_owned(), fd.clone());
        Ok(fd)
    }

    /// Whether the directory `rel` is closed to everyone but this copy's euid until the copy
    /// ends: one [`Dest::prepare_dir`] made ours and 0700, or a DEST this copy created. Nothing
    /// in it can be reached by another user, so a part there may carry its final mode.
    pub fn is_closed(&self, rel: &Path) -> bool {
        match rel.as_os_str().is_empty() {
            true => self.created,
            false => lock(&self.known).contains_key(rel),
        }
    }

    /// The directory holding `rel`, and `rel`'s name in it.
    pub fn parent_of<'r>(&self, rel: &'r Path) -> Result<(Arc<OwnedFd>, &'r OsStr), DestError> {
        let name = rel
            .file_name()
            .ok_or_else(|| self.io("name an entry of", rel, Errno::INVAL))?;
        let parent = rel.parent().unwrap_or(Path::new(""));
        Ok((self.dir(parent)?, name))
    }

    fn io(&self, op: &'static str, rel: &Path, e: Errno) -> DestError {
        DestError::Io {
            op,
            path: self.display(rel),
            source: e.into(),
        }
    }

    /// Forgets the open descriptors, so that the next use reopens and re-checks.
    #[cfg(test)]
    fn forget_open(&self) {
        lock(&self.open).clear();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn io_at<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(Errno) -> DestError + 'a {
    move |e| DestError::Io {
        op,
        path: path.to_owned(),
        source: e.into(),
    }
}

/// Makes DEST 0700 if it is missing; true if this call made it.
fn create_dest(path: &Path) -> Result<bool, DestError> {
    match rfs::mkdirat(CWD, path, mode(PRIVATE_DIR)) {
        Ok(()) => return Ok(true),
        Err(Errno::EXIST) => return Ok(false),
        Err(Errno::NOENT) => {}
        Err(e) => return Err(io_at("create", path)(e)),
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| DestError::Io {
            op: "create",
            path: parent.to_owned(),
            source,
        })?;
    }
    match rfs::mkdirat(CWD, path, mode(PRIVATE_DIR)) {
        Ok(()) => Ok(true),
        Err(Errno::EXIST) => Ok(false),
        Err(e) => Err(io_at("create", path)(e)),
    }
}

pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

fn mode(bits: u32) -> Mode {
    Mode::from_raw_mode(bits)
}

// `struct stat`'s field widths differ between architectures; these read them as u64.
#[allow(clippy::useless_conversion)]
fn dev(st: &Stat) -> u64 {
    u64::from(st.st_dev)
}

#[allow(clippy::useless_conversion)]
fn ino(st: &Stat) -> u64 {
    u64::from(st.st_ino)
}

#[allow(clippy::useless_conversion)]
fn nlink(st: &Stat) -> u64 {
    u64::from(st.st_nlink)
}

fn identity(st: &Stat) -> (u64, u64) {
    (dev(st), ino(st))
}

fn is_dir(st: &Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::Directory
}

fn part_name() -> OsString {
    format!("{PART_PREFIX}{:016x}", rand::random::<u64>()).into()
}

/// A part file just created: its name, the open file, its inode.
pub struct NewPart {
    pub name: OsString,
    pub file: File,
    pub ino: u64,
}

/// Creates a part file in `dir` under a fresh name: `O_EXCL`, `O_NOFOLLOW`, 0600.
pub fn create_part(dir: &OwnedFd) -> io::Result<NewPart> {
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    for _ in 0..ATTEMPTS {
        let name = part_name();
        let fd = match rfs::openat(dir, &name, flags, mode(PRIVATE_FILE)) {
            Ok(fd) => fd,
            Err(Errno::EXIST) => continue,
            Err(e) => return Err(e.into()),
        };
        return match rfs::fstat(&fd) {
            Ok(st) => Ok(NewPart {
                name,
                file: File::from(fd),
                ino: ino(&st),
            }),
            Err(e) => {
                remove_part(dir, &name);
                Err(e.into())
            }
        };
    }
    Err(Errno::EXIST.into())
}

/// Creates a symlink to `target` in `dir` under a fresh part name.
pub fn symlink_part(dir: &OwnedFd, target: &[u8]) -> io::Result<OsString> {
    for _ in 0..ATTEMPTS {
        let name = part_name();
        match rfs::symlinkat(OsStr::from_bytes(target), dir, &name) {
            Ok(()) => return Ok(name),
            Err(Errno::EXIST) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Errno::EXIST.into())
}

/// Makes a hard link to `name` in `src` under a fresh part name in `dir`; `name` is not
/// followed if it is a symlink.
pub fn link_part(src: &OwnedFd, name: &OsStr, dir: &OwnedFd) -> io::Result<OsString> {
    for _ in 0..ATTEMPTS {
        let part = part_name();
        match rfs::linkat(src, name, dir, &part, AtFlags::empty()) {
            Ok(()) => return Ok(part),
            Err(Errno::EXIST) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Errno::EXIST.into())
}

/// Whether `a` in `da` and `b` in `db` are the same file (not following symlinks).
pub fn same_file(da: &OwnedFd, a: &OsStr, db: &OwnedFd, b: &OsStr) -> bool {
    let st = |d: &OwnedFd, n: &OsStr| rfs::statat(d, n, AtFlags::SYMLINK_NOFOLLOW).ok();
    match (st(da, a), st(db, b)) {
        (Some(x), Some(y)) => identity(&x) == identity(&y),
        _ => false,
    }
}

/// Opens the part file `part` for reading, if it is still the regular file with inode `ino`.
pub fn open_part(dir: &OwnedFd, part: &OsStr, expected: u64) -> io::Result<File> {
    let replaced = || io::Error::other("its staged file was replaced by someone else");
    let fd = match rfs::openat(dir, part, READ_FLAGS, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOENT | Errno::LOOP) => return Err(replaced()),
        Err(e) => return Err(e.into()),
    };
    let st = rfs::fstat(&fd)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile || ino(&st) != expected {
        return Err(replaced());
    }
    Ok(File::from(fd))
}

/// The regular file at `name` in `dir`, opened for reading, with its status; `None` for
/// anything else (absent, a symlink, a FIFO, ...) or when it cannot be opened.
pub fn open_regular(dir: &OwnedFd, name: &OsStr) -> Option<(File, Stat)> {
    let fd = rfs::openat(dir, name, READ_FLAGS, Mode::empty()).ok()?;
    let st = rfs::fstat(&fd).ok()?;
    (FileType::from_raw_mode(st.st_mode) == FileType::RegularFile).then(|| (File::from(fd), st))
}

/// The target of the symlink `name` in `dir`, with its status; `None` for anything else.
pub fn symlink_at(dir: &OwnedFd, name: &OsStr) -> Option<(Vec<u8>, Stat)> {
    let st = rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).ok()?;
    if FileType::from_raw_mode(st.st_mode) != FileType::Symlink {
        return None;
    }
    let target = rfs::readlinkat(dir, name, Vec::new()).ok()?;
    Some((target.into_bytes(), st))
}

/// The modification time in `st`.
#[allow(clippy::useless_conversion)]
pub fn mtime_of(st: &Stat) -> Timestamp {
    Timestamp {
        secs: i64::from(st.st_mtime),
        nanos: u32::try_from(st.st_mtime_nsec).unwrap_or(0),
    }
}

/// True if `st` is a file only the copying user can have planted or changed: its own, and
/// with no other name (a hard link) that a mode change would reach.
pub fn solely_ours(st: &Stat, euid: u32) -> bool {
    st.st_uid == euid && nlink(st) == 1
}

/// Renames `part` over `name` in `dir`, first removing a directory that stands in the way.
/// A symlink at `name` is replaced, not followed.
pub fn replace(dir: &OwnedFd, part: &OsStr, name: &OsStr) -> io::Result<()> {
    // A part is never a directory, so EISDIR means one stands at `name`; trying the rename
    // first saves a stat per file in the usual case.
    match rfs::renameat(dir, part, dir, name) {
        Err(Errno::ISDIR) => {}
        done => return Ok(done?),
    }
    let st = rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
    if is_dir(&st) {
        remove_tree(dir.as_fd(), name, dev(&st), 0)?;
    }
    Ok(rfs::renameat(dir, part, dir, name)?)
}

/// Removes the directory `name` in `parent` with everything in it, by descriptor: symlinks
/// are unlinked, not followed, and a directory on another filesystem than `fs_dev` is an error.
fn remove_tree(parent: BorrowedFd<'_>, name: &OsStr, fs_dev: u64, depth: usize) -> io::Result<()> {
    if depth >= MAX_REMOVE_DEPTH {
        return Err(io::Error::other("directory nested too deep to remove"));
    }
    let dir = rfs::openat(parent, name, DIR_FLAGS, Mode::empty())?;
    if dev(&rfs::fstat(&dir)?) != fs_dev {
        return Err(Errno::XDEV.into());
    }
    for child in names_in(&dir)? {
        match rfs::unlinkat(&dir, &child, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => {}
            // Linux answers EISDIR for a directory.
            Err(Errno::ISDIR) => remove_tree(dir.as_fd(), &child, fs_dev, depth + 1)?,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(rfs::unlinkat(parent, name, AtFlags::REMOVEDIR)?)
}

/// The names in a directory, without `.` and `..`.
fn names_in(dir: &OwnedFd) -> io::Result<Vec<OsString>> {
    let mut entries = rfs::Dir::read_from(dir)?;
    let mut names = Vec::new();
    while let Some(e) = entries.read() {
        let name = e?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(OsString::from(OsStr::from_bytes(&name)));
        }
    }
    Ok(names)
}

/// Removes the part files a killed copy of this user left in `dir`; other users' are theirs.
pub fn clean_parts(dir: BorrowedFd<'_>, euid: u32) {
    let Ok(dir) = rfs::openat(dir, ".", DIR_FLAGS, Mode::empty()) else {
        return;
    };
    let Ok(names) = names_in(&dir) else {
        return;
    };
    for name in names {
        if !name.as_bytes().starts_with(PART_PREFIX.as_bytes()) {
            continue;
        }
        let Ok(st) = rfs::statat(&dir, &name, AtFlags::SYMLINK_NOFOLLOW) else {
            continue;
        };
        if st.st_uid == euid && !is_dir(&st) {
            let _ = rfs::unlinkat(&dir, &name, AtFlags::empty());
        }
    }
}

/// Removes a part this copy made (best effort: it is being cleaned up after a failure).
pub fn remove_part(dir: &OwnedFd, part: &OsStr) {
    let _ = rfs::unlinkat(dir, part, AtFlags::empty());
}

fn timestamps(t: Timestamp) -> Timestamps {
    let ts = Timespec {
        tv_sec: t.secs,
        tv_nsec: t.nanos.into(),
    };
    Timestamps {
        last_access: ts,
        last_modification: ts,
    }
}

/// Sets the permission bits of an open file or directory.
pub fn set_mode(fd: impl AsFd, bits: u32) -> io::Result<()> {
    Ok(rfs::fchmod(fd, mode(bits))?)
}

/// Sets the modification time (and the access time to the same) of an open file or directory.
pub fn set_times(fd: impl AsFd, t: Timestamp) -> io::Result<()> {
    Ok(rfs::futimens(fd, &timestamps(t))?)
}

/// Sets the times of the entry `name` in `dir` itself, a symlink included.
pub fn set_times_at(dir: &OwnedFd, name: &OsStr, t: Timestamp) -> io::Result<()> {
    Ok(rfs::utimensat(
        dir,
        name,
        &timestamps(t),
        AtFlags::SYMLINK_NOFOLLOW,
    )?)
}

/// Makes everything written under `dir`'s filesystem durable.
pub fn sync_fs(dir: BorrowedFd<'_>) -> io::Result<()> {
    Ok(rfs::syncfs(dir)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

    /// Everything under `dir`: name, kind and mode bits, mtime, contents.
    fn snapshot(dir: &Path) -> Vec<(PathBuf, u32, i64, i64, Vec<u8>)> {
        let mut out = Vec::new();
        let mut todo = vec![dir.to_owned()];
        while let Some(d) = todo.pop() {
            let m = fs::symlink_metadata(&d).unwrap();
            let body = if m.is_file() {
                fs::read(&d).unwrap()
            } else {
                Vec::new()
            };
            out.push((d.clone(), m.mode(), m.mtime(), m.mtime_nsec(), body));
            if m.is_dir() {
                todo.extend(fs::read_dir(&d).unwrap().map(|e| e.unwrap().path()));
            }
        }
        out.sort();
        out
    }

    /// A root-only directory beside DEST holding a secret: what a planted symlink aims at.
    fn outside(tmp: &Path) -> PathBuf {
        let dir = tmp.join("outside");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("secret"), b"root only").unwrap();
        fs::set_permissions(dir.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        dir
    }

    fn mode_of(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    fn chown_nobody(p: &Path) {
        std::os::unix::fs::lchown(p, Some(65534), Some(65534)).unwrap();
    }

    fn os(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    #[test]
    fn symlink_where_a_dir_goes_is_replaced_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let out = outside(tmp.path());
        let before = snapshot(&out);
        let root = tmp.path().join("dest");
        fs::create_dir(&root).unwrap();
        symlink(&out, root.join("a")).unwrap();
        let dest = Dest::open_or_create(&root).unwrap();
        dest.prepare_dir(Path::new("a")).unwrap();
        dest.prepare_dir(Path::new("a/b")).unwrap();
        let m = fs::symlink_metadata(root.join("a")).unwrap();
        assert!(m.is_dir(), "the symlink was not replaced by a directory");
        assert_eq!(mode_of(&root.join("a")), 0o700);
        assert_eq!(mode_of(&root.join("a/b")), 0o700);
        assert_eq!(snapshot(&out), before, "the directory outside DEST changed");
    }

    #[test]
    fn symlink_where_a_file_goes_is_replaced_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let out = outside(tmp.path());
        let before = snapshot(&out);
        let root = tmp.path().join("dest");
        fs::create_dir(&root).unwrap();
        symlink(out.join("secret"), root.join("f")).unwrap();
        let dest = Dest::open_or_create(&root).unwrap();
        let dir = dest.dir(Path::new("")).unwrap();
        assert!(
            open_regular(&dir, os("f")).is_none(),
            "a symlink was opened for reading"
        );
        let mut part = create_part(&dir).unwrap();
        io::Write::write_all(&mut part.file, b"published").unwrap();
        open_part(&dir, &part.name, part.ino).unwrap();
        replace(&dir, &part.name, os("f")).unwrap();
        set_mode(&part.file, 0o644).unwrap();
        assert!(fs::symlink_metadata(root.join("f")).unwrap().is_file());
        assert_eq!(fs::read(root.join("f")).unwrap(), b"published");
        assert_eq!(mode_of(&root.join("f")), 0o644);
        assert_eq!(snapshot(&out), before, "the directory outside DEST changed");
    }

    #[test]
    fn foreign_directory_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("dest");
        fs::create_dir_all(root.join("theirs")).unwrap();
        chown_nobody(&root.join("theirs"));
        fs::set_permissions(root.join("theirs"), fs::Permissions::from_mode(0o777)).unwrap();
        let dest = Dest::open_or_create(&root).unwrap();
        match dest.prepare_dir(Path::new("theirs")) {
            Err(DestError::Foreign { path, owner, euid }) => {
                assert_eq!((owner, euid), (65534, super::euid()));
                assert_eq!(path, root.join("theirs"));
            }
            other => panic!("a directory of uid 65534 was accepted: {other:?}"),
        }
        assert_eq!(
            mode_of(&root.join("theirs")),
            0o777,
            "it was changed anyway"
        );
    }

    #[test]
    fn own_existing_directory_is_closed_to_others_while_copying() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("dest");
        fs::create_dir_all(root.join("mine")).unwrap();
        fs::set_permissions(root.join("mine"), fs::Permissions::from_mode(0o1777)).unwrap();
        let dest = Dest::open_or_create(&root).unwrap();
        assert!(!dest.created());
        dest.prepare_dir(Path::new("mine")).unwrap();
        assert_eq!(mode_of(&root.join("mine")), 0o700);
    }

    #[test]
    fn created_dest_is_private_and_an_existing_one_untouched() {
        let tmp = tempfile::tempdir().unwrap();
        let made = tmp.path().join("new/deeper/dest");
        let dest = Dest::open_or_create(&made).unwrap();
        assert!(dest.created());
        assert_eq!(mode_of(&made), 0o700);
        let shared = tmp.path().join("shared");
        fs::create_dir(&shared).unwrap();
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).unwrap();
        let dest = Dest::open_or_create(&shared).unwrap();
        assert!(!dest.created());
        assert_eq!(mode_of(&shared), 0o1777);
    }

    #[test]
    fn part_files_are_private_fresh_and_removable() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = Dest::open_or_create(tmp.path()).unwrap();
        let dir = dest.dir(Path::new("")).unwrap();
        let a = create_part(&dir).unwrap();
        let b = create_part(&dir).unwrap();
        assert_ne!(a.name, b.name);
        for p in [&a, &b] {
            assert!(p.name.as_bytes().starts_with(PART_PREFIX.as_bytes()));
            let m = fs::symlink_metadata(tmp.path().join(&p.name)).unwrap();
            assert_eq!(m.mode() & 0o7777, 0o600, "a part file is not 0600");
            assert_eq!(m.ino(), p.ino);
        }
        assert!(
            open_part(&dir, &a.name, b.ino).is_err(),
            "a part with another inode was accepted as ours"
        );
        let link = symlink_part(&dir, b"../anywhere").unwrap();
        set_times_at(&dir, &link, Timestamp { secs: 7, nanos: 9 }).unwrap();
        let m = fs::symlink_metadata(tmp.path().join(&link)).unwrap();
        assert_eq!((m.mtime(), m.mtime_nsec()), (7, 9));
        for p in [&a.name, &b.name, &link] {
            remove_part(&dir, p);
        }
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_directory_swapped_during_the_copy_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let out = outside(tmp.path());
        let before = snapshot(&out);
        let root = tmp.path().join("dest");
        let dest = Dest::open_or_create(&root).unwrap();
        dest.prepare_dir(Path::new("a")).unwrap();
        dest.forget_open();
        fs::rename(root.join("a"), root.join("a.moved")).unwrap();
        symlink(&out, root.join("a")).unwrap();
        assert!(matches!(
            dest.dir(Path::new("a")),
            Err(DestError::Replaced { .. })
        ));
        fs::remove_file(root.join("a")).unwrap();
        fs::create_dir(root.join("a")).unwrap();
        assert!(matches!(
            dest.dir(Path::new("a")),
            Err(DestError::Replaced { .. })
        ));
        assert_eq!(snapshot(&out), before);
    }

    #[test]
    fn a_directory_in_the_way_is_removed_without_following_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let out = outside(tmp.path());
        let before = snapshot(&out);
        let root = tmp.path().join("dest");
        fs::create_dir_all(root.join("f/x/y")).unwrap();
        symlink(&out, root.join("f/x/to_outside")).unwrap();
        symlink(out.join("secret"), root.join("f/secret")).unwrap();
        fs::write(root.join("f/x/y/z"), b"z").unwrap();
        let dest = Dest::open_or_create(&root).unwrap();
        let dir = dest.dir(Path::new("")).unwrap();
        let part = create_part(&dir).unwrap();
        replace(&dir, &part.name, os("f")).unwrap();
        assert!(fs::symlink_metadata(root.join("f")).unwrap().is_file());
        assert_eq!(snapshot(&out), before);
    }

    #[test]
    fn clean_parts_removes_only_our_own() {
        let tmp = tempfile::tempdir().unwrap();
        let out = outside(tmp.path());
        let before = snapshot(&out);
        let root = tmp.path().join("dest");
        fs::create_dir(&root).unwrap();
        let ours = root.join(format!("{PART_PREFIX}0001"));
        let theirs = root.join(format!("{PART_PREFIX}0002"));
        let link = root.join(format!("{PART_PREFIX}0003"));
        fs::write(&ours, b"left by a killed copy").unwrap();
        fs::write(&theirs, b"another user's").unwrap();
        chown_nobody(&theirs);
        symlink(&out, &link).unwrap();
        fs::write(root.join("kept"), b"not a part").unwrap();
        Dest::open_or_create(&root).unwrap();
        assert!(!ours.exists(), "our left-over part file was not removed");
        assert!(theirs.exists(), "another user's part file was removed");
        assert!(
            fs::symlink_metadata(&link).is_err(),
            "our stale link stayed"
        );
        assert!(root.join("kept").exists());
        assert_eq!(snapshot(&out), before);
    }

    #[test]
    fn a_file_of_someone_else_or_with_other_links_is_not_solely_ours() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("f");
        fs::write(&f, b"x").unwrap();
        let dest = Dest::open_or_create(tmp.path()).unwrap();
        let dir = dest.dir(Path::new("")).unwrap();
        let st = |name| open_regular(&dir, os(name)).unwrap().1;
        assert!(solely_ours(&st("f"), euid()));
        fs::hard_link(&f, tmp.path().join("g")).unwrap();
        assert!(!solely_ours(&st("f"), euid()), "a hard-linked file");
        fs::remove_file(tmp.path().join("g")).unwrap();
        chown_nobody(&f);
        assert!(!solely_ours(&st("f"), euid()), "a file of uid 65534");
    }
}
