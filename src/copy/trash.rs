//! `copy --delete`: what DEST holds and the channel no longer has is moved, never deleted, into
//! `DEST/.lcfs-trash/<UTC time of the copy>/`, under its path relative to DEST (leafsync's safe
//! mirror delete). Moves are `renameat` between directory descriptors of DEST, so nothing is
//! copied and nothing outside DEST is touched; the trash directories are made 0700.
//!
//! Only directories the copy itself wrote are swept, after the copy committed: a failed copy
//! moves nothing. Part files of a running copy and the trash itself are never moved.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, Mode, OFlags};

use super::dest::Dest;
use super::CopyError;

/// The trash directory's name at DEST's root.
pub const TRASH: &str = ".lcfs-trash";
const PART_PREFIX: &[u8] = b".lcfs-part-";

/// Moves every entry of the directories in `items` (and DEST itself) that `items` does not
/// name into the trash. `items` are paths relative to DEST, each with whether it is a
/// directory. Returns how many entries were moved.
pub fn sweep<'a>(
    dest: &Dest,
    items: impl IntoIterator<Item = (&'a Path, bool)>,
) -> Result<u64, CopyError> {
    let wanted = wanted_names(items);
    // Nanoseconds: two sweeps in one second get trash directories of their own.
    let stamp = humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string();
    let mut trash = Trash {
        dest,
        base: Path::new(TRASH).join(stamp),
        made: HashMap::new(),
    };
    let mut moved = 0;
    for (dir, names) in &wanted {
        let fd = dest.dir(dir)?;
        for name in extra_entries(&fd, names, dir.as_os_str().is_empty())
            .map_err(|e| io_error(dest, dir, e))?
        {
            trash.take(&fd, dir, &name)?;
            moved += 1;
        }
    }
    Ok(moved)
}

/// For DEST ("") and every directory of the tree, the names it should hold.
fn wanted_names<'a>(
    items: impl IntoIterator<Item = (&'a Path, bool)>,
) -> HashMap<PathBuf, HashSet<OsString>> {
    let mut wanted: HashMap<PathBuf, HashSet<OsString>> = HashMap::new();
    wanted.entry(PathBuf::new()).or_default();
    for (rel, is_dir) in items {
        let parent = rel.parent().unwrap_or(Path::new("")).to_owned();
        if let Some(name) = rel.file_name() {
            wanted.entry(parent).or_default().insert(name.to_owned());
        }
        if is_dir {
            wanted.entry(rel.to_owned()).or_default();
        }
    }
    wanted
}

/// Entries of directory `fd` that are not in `names`, leaving part files and (at the root)
/// the trash alone.
fn extra_entries(fd: &OwnedFd, names: &HashSet<OsString>, root: bool) -> io::Result<Vec<OsString>> {
    use std::os::unix::ffi::OsStrExt;
    let mut out = Vec::new();
    for entry in rfs::Dir::read_from(fd)? {
        let entry = entry?;
        let name = OsStr::from_bytes(entry.file_name().to_bytes());
        let skip = name == "." || name == ".." || (root && name == TRASH);
        if skip || name.as_bytes().starts_with(PART_PREFIX) || names.contains(name) {
            continue;
        }
        out.push(name.to_owned());
    }
    Ok(out)
}

fn io_error(dest: &Dest, rel: &Path, source: io::Error) -> CopyError {
    CopyError::Io {
        path: dest.display(rel),
        source,
    }
}

struct Trash<'a> {
    dest: &'a Dest,
    /// `.lcfs-trash/<stamp>`, relative to DEST.
    base: PathBuf,
    /// Trash directories made so far, by path relative to DEST.
    made: HashMap<PathBuf, OwnedFd>,
}

impl Trash<'_> {
    /// Moves `name` of directory `from` (at `rel` in DEST) to the same place in the trash.
    fn take(&mut self, from: &OwnedFd, rel: &Path, name: &OsStr) -> Result<(), CopyError> {
        let target = self.base.join(rel);
        self.make(&target)?;
        let to = &self.made[&target];
        // Never over something already in the trash.
        rfs::renameat_with(from, name, to, name, rfs::RenameFlags::NOREPLACE)
            .map_err(|e| io_error(self.dest, &rel.join(name), e.into()))?;
        tracing::info!(
            "moved {} to {}",
            self.dest.display(&rel.join(name)).display(),
            self.dest.display(&target.join(name)).display()
        );
        Ok(())
    }

    /// Makes `rel` and its parents below DEST as private directories, never following a
    /// symlink (an existing trash directory must be a directory of ours).
    fn make(&mut self, rel: &Path) -> Result<(), CopyError> {
        if self.made.contains_key(rel) {
            return Ok(());
        }
        let mut at = PathBuf::new();
        let mut parent: OwnedFd = self
            .dest
            .root()
            .try_clone_to_owned()
            .map_err(|e| io_error(self.dest, Path::new(""), e))?;
        for part in rel.components() {
            at.push(part);
            if let Some(fd) = self.made.get(&at) {
                parent = fd.try_clone().map_err(|e| io_error(self.dest, &at, e))?;
                continue;
            }
            let fd = self.subdir(&parent, part.as_os_str(), &at)?;
            parent = fd.try_clone().map_err(|e| io_error(self.dest, &at, e))?;
            self.made.insert(at.clone(), fd);
        }
        Ok(())
    }

    fn subdir(&self, parent: &OwnedFd, name: &OsStr, rel: &Path) -> Result<OwnedFd, CopyError> {
        match rfs::mkdirat(parent, name, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(io_error(self.dest, rel, e.into())),
        }
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rfs::openat(parent, name, flags, Mode::empty())
            .map_err(|e| io_error(self.dest, rel, e.into()))?;
        let st = rfs::fstat(&fd).map_err(|e| io_error(self.dest, rel, e.into()))?;
        if st.st_uid != self.dest.euid() {
            return Err(io_error(
                self.dest,
                rel,
                io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "the trash directory is not ours",
                ),
            ));
        }
        Ok(fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::object::{Entry, EntryKind, ObjectHash, ObjectRef, Timestamp};

    fn entry(name: &str, dir: bool) -> Entry {
        Entry {
            name: name.as_bytes().to_vec(),
            mode: 0o755,
            mtime: Timestamp { secs: 0, nanos: 0 },
            nlink: if dir { 2 } else { 1 },
            link: 0,
            kind: if dir {
                EntryKind::Dir(ObjectRef {
                    hash: ObjectHash::of(b""),
                    len: 0,
                })
            } else {
                EntryKind::Symlink(b"x".to_vec())
            },
        }
    }

    #[test]
    fn extra_entries_go_to_the_trash_with_their_paths() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("dest");
        std::fs::create_dir_all(root.join("sub/gone-dir")).unwrap();
        std::fs::write(root.join("keep"), b"k").unwrap();
        std::fs::write(root.join("old"), b"o").unwrap();
        std::fs::write(root.join("sub/keep2"), b"k").unwrap();
        std::fs::write(root.join("sub/gone-dir/f"), b"f").unwrap();
        std::fs::write(root.join(".lcfs-part-0123"), b"p").unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("sub/link")).unwrap();
        let items = [
            (PathBuf::from("keep"), entry("keep", false)),
            (PathBuf::from("sub"), entry("sub", true)),
            (PathBuf::from("sub/keep2"), entry("keep2", false)),
        ];
        let dest = Dest::open_or_create(&root).unwrap();
        dest.prepare_dir(Path::new("sub")).unwrap();
        let paths = || {
            items
                .iter()
                .map(|(p, e)| (p.as_path(), matches!(e.kind, EntryKind::Dir(_))))
        };
        assert_eq!(sweep(&dest, paths()).unwrap(), 3);
        let trash: Vec<_> = std::fs::read_dir(root.join(TRASH)).unwrap().collect();
        assert_eq!(trash.len(), 1);
        let stamp = trash[0].as_ref().unwrap().path();
        assert_eq!(std::fs::read(stamp.join("old")).unwrap(), b"o");
        assert_eq!(std::fs::read(stamp.join("sub/gone-dir/f")).unwrap(), b"f");
        assert!(std::fs::symlink_metadata(stamp.join("sub/link"))
            .unwrap()
            .is_symlink());
        assert!(root.join("keep").exists() && root.join("sub/keep2").exists());
        assert!(outside.exists(), "the symlink was moved, not followed");
        // A second sweep with nothing extra moves nothing, and never the trash itself.
        assert_eq!(sweep(&dest, paths()).unwrap(), 0);
    }
}
