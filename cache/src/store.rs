//! Object bodies as content-addressed files: `DIR/objects/ab/<64 hex>`.
//!
//! Invariants:
//! - A file appears under `objects/` only by `rename` from `DIR/tmp/`, after all its bytes were
//!   written, so a reader never sees a half-written object from this process; a crash or a
//!   hostile disk can still leave short or damaged files, which is why every read re-hashes.
//! - `tmp/` holds files being written by any process sharing the cache, named `<pid>-<n>`;
//!   the owner removes those of processes that no longer exist when it opens the cache.
//! - Files under `objects/` whose names are not the lowercase hex of a hash, in the directory
//!   named by the first two hex digits, are deleted by [`Store::scan`].
//!
//! This module knows nothing of the index: callers keep the two in step.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use blake3::Hash;
use tracing::warn;

use crate::error::{CacheError, IoContext};
use crate::Verified;

/// The object files of one cache directory.
pub(crate) struct Store {
    objects: PathBuf,
    tmp: PathBuf,
    next_temp: AtomicU64,
}

/// A fully written object file under `tmp/`, not yet renamed into place.
pub(crate) struct TempObject {
    path: PathBuf,
    /// Real disk use of the file.
    pub(crate) disk_size: u64,
}

impl TempObject {
    /// The file's name under `tmp/`, which the owner is told to commit.
    pub(crate) fn name(&self) -> &str {
        self.path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("temp names are made by create_temp")
    }
}

/// What reading an object file found.
pub(crate) enum Read {
    /// The file holds exactly the object.
    Good(Verified),
    /// There is no file.
    Missing,
    /// The file exists but its bytes do not hash to its name (short, damaged, replaced).
    Bad,
}

/// Creates `path` and its missing parents with mode 0700.
pub(crate) fn create_private_dir(path: &Path) -> Result<(), CacheError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .at(path)
}

/// Makes an existing directory private: refuses one that another user owns, and takes group
/// and other permissions away (a cache holds decrypted plaintext). Works on a descriptor, so
/// the directory checked is the one changed.
pub(crate) fn make_private(path: &Path) -> Result<(), CacheError> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let dir = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(path)
        .at(path)?;
    let meta = dir.metadata().at(path)?;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid {
        return Err(CacheError::Foreign {
            dir: path.to_owned(),
            owner: meta.uid(),
            euid,
        });
    }
    if meta.mode() & 0o077 != 0 {
        let mode = meta.mode() & 0o700;
        dir.set_permissions(fs::Permissions::from_mode(mode))
            .at(path)?;
    }
    Ok(())
}

/// Real disk use of a file: allocated blocks, or its size rounded up to 4 KiB when the file
/// system reports no blocks (inline data, delayed allocation).
pub(crate) fn disk_size(meta: &fs::Metadata) -> u64 {
    let allocated = meta.blocks().saturating_mul(512);
    if allocated > 0 {
        allocated
    } else {
        meta.len().div_ceil(4096).saturating_mul(4096)
    }
}

impl Store {
    /// Opens (creating if needed) `DIR/objects` and `DIR/tmp`, as the owner: removes the temp
    /// files of processes that are gone.
    pub(crate) fn open(dir: &Path) -> Result<Store, CacheError> {
        let store = Store::attach(dir)?;
        store.clear_tmp()?;
        Ok(store)
    }

    /// The object files of a directory another process (or another handle) owns: created if
    /// missing, but `tmp/` is left to the owner, who clears it when it opens.
    pub(crate) fn attach(dir: &Path) -> Result<Store, CacheError> {
        let store = Store {
            objects: dir.join("objects"),
            tmp: dir.join("tmp"),
            next_temp: AtomicU64::new(0),
        };
        create_private_dir(&store.objects)?;
        create_private_dir(&store.tmp)?;
        Ok(store)
    }

    /// Bytes an unprivileged writer may still use on the file system of the object files;
    /// `None` when it cannot be asked (then no headroom is kept).
    pub(crate) fn free_bytes(&self) -> Option<u64> {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(self.objects.as_os_str().as_bytes()).ok()?;
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `path` is NUL-terminated and `st` is a valid out-pointer.
        if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
            return None;
        }
        #[allow(clippy::useless_conversion)] // the field types differ between libc targets
        Some(u64::from(st.f_bavail).saturating_mul(u64::from(st.f_frsize)))
    }

    /// True when no object file has ever been written here.
    pub(crate) fn is_empty(&self) -> bool {
        fs::read_dir(&self.objects).map_or(true, |mut d| d.next().is_none())
    }

    /// Removes the temp files of processes that are gone (and anything not named like a
    /// temp file); those of live processes are theirs to commit.
    pub(crate) fn clear_tmp(&self) -> Result<(), CacheError> {
        for entry in fs::read_dir(&self.tmp).at(&self.tmp)? {
            let entry = entry.at(&self.tmp)?;
            let writer = entry.file_name().to_str().and_then(temp_writer);
            if writer.is_some_and(process_exists) {
                continue;
            }
            let path = entry.path();
            let removed = match fs::remove_file(&path) {
                Err(e) if e.kind() == io::ErrorKind::IsADirectory => fs::remove_dir_all(&path),
                other => other,
            };
            if let Err(e) = removed {
                warn!(path = %path.display(), error = %e, "could not remove stale temp file");
            }
        }
        Ok(())
    }

    /// A temp file another process wrote and asks us to commit; `None` if it is not there.
    /// The name must be one [`Store::write_temp`] makes, and the file a regular file.
    pub(crate) fn temp_named(&self, name: &str) -> Result<Option<TempObject>, CacheError> {
        let path = self.tmp.join(name);
        if temp_writer(name).is_none() {
            return Err(CacheError::io(
                &path,
                io::Error::new(io::ErrorKind::InvalidInput, "not a temp file name"),
            ));
        }
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_file() => Ok(Some(TempObject {
                disk_size: disk_size(&meta),
                path,
            })),
            Ok(_) => Err(CacheError::io(
                &path,
                io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CacheError::io(&path, e)),
        }
    }

    /// Real disk use of the object file of `hash`.
    pub(crate) fn disk_size_of(&self, hash: &Hash) -> Result<u64, CacheError> {
        let path = self.path(hash);
        let meta = fs::symlink_metadata(&path).at(&path)?;
        Ok(disk_size(&meta))
    }

    /// Whether the object file of `hash` exists (no hashing).
    pub(crate) fn exists(&self, hash: &Hash) -> bool {
        fs::symlink_metadata(self.path(hash)).is_ok_and(|m| m.is_file())
    }

    /// Where the object named `hash` lives.
    pub(crate) fn path(&self, hash: &Hash) -> PathBuf {
        let hex = hash.to_hex();
        self.objects.join(&hex[..2]).join(hex.as_str())
    }

    /// Writes `bytes` to a new file under `tmp/`.
    pub(crate) fn write_temp(&self, bytes: &[u8]) -> Result<TempObject, CacheError> {
        let (path, mut file) = self.create_temp()?;
        let written = file.write_all(bytes).and_then(|()| file.metadata());
        match written {
            Ok(meta) => Ok(TempObject {
                path,
                disk_size: disk_size(&meta),
            }),
            Err(e) => {
                let _ = fs::remove_file(&path);
                Err(CacheError::io(&path, e))
            }
        }
    }

    fn create_temp(&self) -> Result<(PathBuf, File), CacheError> {
        loop {
            let n = self.next_temp.fetch_add(1, Ordering::Relaxed);
            let path = self.tmp.join(format!("{}-{n}", std::process::id()));
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => return Ok((path, file)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(CacheError::io(&path, e)),
            }
        }
    }

    /// Renames a temp file into place as the object `hash`.
    pub(crate) fn commit(&self, temp: TempObject, hash: &Hash) -> Result<(), CacheError> {
        let dest = self.path(hash);
        let renamed = match fs::rename(&temp.path, &dest) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => match dest.parent() {
                Some(parent) => create_private_dir(parent)
                    .and_then(|()| fs::rename(&temp.path, &dest).at(&dest)),
                None => Err(CacheError::io(&dest, e)),
            },
            other => other.at(&dest),
        };
        if renamed.is_err() {
            discard(temp);
        }
        renamed
    }

    /// Reads and re-hashes the object file of `hash`.
    pub(crate) fn read(&self, hash: &Hash) -> Result<Read, CacheError> {
        let path = self.path(hash);
        match fs::read(&path) {
            Ok(bytes) => Ok(match Verified::new(hash, bytes) {
                Ok(obj) => Read::Good(obj),
                Err(_) => Read::Bad,
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Read::Missing),
            Err(e) => Err(CacheError::io(&path, e)),
        }
    }

    /// Asks the kernel to start reading the object's file in the background
    /// (`POSIX_FADV_WILLNEED`). A missing or unreadable file is ignored: this is a hint.
    pub(crate) fn will_need(&self, hash: &Hash) {
        if let Ok(file) = File::open(self.path(hash)) {
            // SAFETY: `file` owns the descriptor and keeps it open for the call; fadvise
            // touches no memory of ours.
            unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED) };
        }
    }

    /// Deletes the object file of `hash`; a missing file is not an error.
    pub(crate) fn remove(&self, hash: &Hash) -> Result<(), CacheError> {
        let path = self.path(hash);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(CacheError::io(&path, e)),
            _ => Ok(()),
        }
    }

    /// Calls `found` for every well-named object file, deleting badly named files.
    pub(crate) fn scan(
        &self,
        mut found: impl FnMut(Hash, &fs::Metadata) -> Result<(), CacheError>,
    ) -> Result<(), CacheError> {
        for entry in fs::read_dir(&self.objects).at(&self.objects)? {
            let entry = entry.at(&self.objects)?;
            let path = entry.path();
            let is_dir = entry.file_type().at(&path)?.is_dir();
            match entry.file_name().to_str() {
                Some(name) if is_dir && is_fanout_name(name) => {
                    self.scan_fanout(&path, name, &mut found)?
                }
                _ => remove_stray(&path, is_dir),
            }
        }
        Ok(())
    }

    fn scan_fanout(
        &self,
        dir: &Path,
        prefix: &str,
        found: &mut impl FnMut(Hash, &fs::Metadata) -> Result<(), CacheError>,
    ) -> Result<(), CacheError> {
        for entry in fs::read_dir(dir).at(dir)? {
            let entry = entry.at(dir)?;
            let path = entry.path();
            let meta = entry.metadata().at(&path)?;
            let hash = entry
                .file_name()
                .to_str()
                .and_then(|n| parse_name(n, prefix));
            match hash {
                Some(hash) if meta.is_file() => found(hash, &meta)?,
                _ => remove_stray(&path, meta.is_dir()),
            }
        }
        Ok(())
    }
}

/// Removes a temp file that will not be committed (gone already is fine).
pub(crate) fn discard(temp: TempObject) {
    match fs::remove_file(&temp.path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            warn!(path = %temp.path.display(), error = %e, "could not remove temp file");
        }
        _ => {}
    }
}

/// The pid in a temp file's name `<pid>-<n>`, if it is one.
fn temp_writer(name: &str) -> Option<i32> {
    let (pid, n) = name.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !digits(n) {
        return None;
    }
    pid.parse().ok().filter(|&p: &i32| p > 0)
}

/// Whether a process with this pid exists (a recycled pid only keeps a stale file longer).
fn process_exists(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists and may be signalled.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn is_fanout_name(name: &str) -> bool {
    name.len() == 2 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The hash named by a file in fan-out directory `prefix`, if the name is canonical.
fn parse_name(name: &str, prefix: &str) -> Option<Hash> {
    let hash = Hash::from_hex(name).ok()?;
    let canonical = hash.to_hex();
    (canonical.as_str() == name && name.starts_with(prefix)).then_some(hash)
}

/// Deletes a file that has no business under `objects/`; leaves unknown directories alone.
fn remove_stray(path: &Path, is_dir: bool) {
    if is_dir {
        warn!(path = %path.display(), "ignoring unexpected directory in the cache");
        return;
    }
    warn!(path = %path.display(), "removing badly named file from the cache");
    if let Err(e) = fs::remove_file(path) {
        warn!(path = %path.display(), error = %e, "could not remove badly named file");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(store: &Store) -> Vec<Hash> {
        let mut seen = Vec::new();
        store
            .scan(|h, _| {
                seen.push(h);
                Ok(())
            })
            .unwrap();
        seen
    }

    #[test]
    fn write_commit_read_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let obj = Verified::hash_of(vec![7u8; 5000]);
        let temp = store.write_temp(&obj).unwrap();
        assert!(temp.disk_size >= 4096);
        store.commit(temp, obj.hash()).unwrap();
        assert!(matches!(store.read(obj.hash()).unwrap(), Read::Good(o) if o == obj));
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        store.remove(obj.hash()).unwrap();
        store.remove(obj.hash()).unwrap();
        assert!(matches!(store.read(obj.hash()).unwrap(), Read::Missing));
    }

    #[test]
    fn damaged_file_reads_as_bad() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let obj = Verified::hash_of(&b"abc"[..]);
        store
            .commit(store.write_temp(&obj).unwrap(), obj.hash())
            .unwrap();
        fs::write(store.path(obj.hash()), b"abd").unwrap();
        assert!(matches!(store.read(obj.hash()).unwrap(), Read::Bad));
    }

    #[test]
    fn open_removes_stale_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        create_private_dir(&dir.path().join("tmp/sub")).unwrap();
        // Above any pid_max: no such process.
        fs::write(dir.path().join("tmp/2147483646-0"), b"x").unwrap();
        fs::write(dir.path().join("tmp/garbage"), b"x").unwrap();
        let live = format!("{}-7", std::process::id());
        fs::write(dir.path().join("tmp").join(&live), b"x").unwrap();
        Store::open(dir.path()).unwrap();
        let left: Vec<_> = fs::read_dir(dir.path().join("tmp"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            left,
            [std::ffi::OsString::from(live)],
            "a live process's temp stays"
        );
    }

    #[test]
    fn scan_finds_objects_and_removes_garbage_names() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let obj = Verified::hash_of(&b"abc"[..]);
        store
            .commit(store.write_temp(&obj).unwrap(), obj.hash())
            .unwrap();
        let objects = dir.path().join("objects");
        let hex = obj.hash().to_hex();
        let wrong_dir = if &hex[..2] == "00" { "01" } else { "00" };
        create_private_dir(&objects.join(wrong_dir)).unwrap();
        let strays = [
            objects.join("junk"),
            objects.join(&hex[..2]).join("not-hex"),
            objects.join(&hex[..2]).join(hex.to_uppercase()),
            objects.join(wrong_dir).join(hex.as_str()),
        ];
        for stray in &strays {
            fs::write(stray, b"garbage").unwrap();
        }
        create_private_dir(&objects.join("ZZ")).unwrap();
        assert_eq!(scan_all(&store), vec![*obj.hash()]);
        for stray in &strays {
            assert!(!stray.exists(), "{}", stray.display());
        }
        assert!(objects.join("ZZ").is_dir());
    }

    #[test]
    fn disk_size_rounds_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, [1u8; 10]).unwrap();
        let size = disk_size(&fs::metadata(&path).unwrap());
        assert!(size >= 4096, "{size}");
        assert_eq!(size % 512, 0);
    }
}
