//! Staged entries: written under hidden part names, made durable, then renamed into place.
//!
//! Invariants: a part file keeps mode 0600 for as long as it has its part name and others can
//! reach that name; its published mode is set on a descriptor after the rename, on the inode
//! recorded when it was created, so a part someone swapped is refused rather than published.
//! In a directory closed to others ([`Dest::is_closed`]: ours, 0700 until the copy ends) no
//! one else can reach the name, so the mode is set on the creating descriptor instead
//! ([`Part::ready`]): that saves an open, a stat, a chmod and a close per file, a fifth of
//! the system calls of a tree of small files. Parts not yet renamed are removed when the
//! [`Staging`] drops: a failed or interrupted copy leaves none of them behind.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::dest::{self, Dest};
use super::CopyError;

/// A staged entry.
pub struct Part {
    /// The directory holding it, relative to DEST.
    dir: PathBuf,
    part: OsString,
    name: OsString,
    /// Inode of a file, and the permission bits still to publish after the rename (`None`
    /// when its creator already set them); `None` for a symlink.
    file: Option<(u64, Option<u32>)>,
}

impl Part {
    /// The part `part` staged for the entry at `rel`.
    pub fn new(rel: &Path, part: OsString, file: Option<(u64, u32)>) -> Part {
        Part {
            dir: rel.parent().unwrap_or(Path::new("")).to_owned(),
            part,
            name: rel.file_name().unwrap_or_default().to_owned(),
            file: file.map(|(ino, mode)| (ino, Some(mode))),
        }
    }

    /// The part `part`, file `ino`, staged for `rel` in a directory closed to others: its
    /// creator sets its published mode on the creating descriptor, before the rename.
    pub fn ready(rel: &Path, part: OsString, ino: u64) -> Part {
        Part {
            file: Some((ino, None)),
            ..Part::new(rel, part, None)
        }
    }

    fn rel(&self) -> PathBuf {
        self.dir.join(&self.name)
    }
}

pub struct Staging<'a> {
    dest: &'a Dest,
    parts: Mutex<Vec<Part>>,
}

impl<'a> Staging<'a> {
    pub fn new(dest: &'a Dest) -> Staging<'a> {
        Staging {
            dest,
            parts: Mutex::new(Vec::new()),
        }
    }

    pub fn add(&self, part: Part) {
        self.lock().push(part);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Part>> {
        self.parts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the staged files durable before [`Staging::commit`] publishes them. A few files
    /// get an `fdatasync` each, which waits for their own data only; many get one `syncfs`,
    /// which costs one journal commit but also waits for every other writer of that
    /// filesystem (a copy right after another program wrote 256 MiB took half a second more).
    pub fn sync(&self) {
        const PER_FILE_LIMIT: usize = 64;
        let parts = self.lock();
        if parts.len() > PER_FILE_LIMIT {
            drop(parts);
            let _ = dest::sync_fs(self.dest.root());
            return;
        }
        for p in parts.iter() {
            let Some((ino, _)) = p.file else { continue };
            let file = self
                .dest
                .dir(&p.dir)
                .ok()
                .and_then(|dir| dest::open_part(&dir, &p.part, ino).ok());
            if let Some(f) = file {
                let _ = f.sync_data();
            }
        }
    }

    /// Renames every part into place; on the first failure the rest stay staged (and are
    /// removed on drop).
    pub fn commit(&self) -> Result<(), CopyError> {
        let parts = std::mem::take(&mut *self.lock());
        let mut left = parts.into_iter();
        while let Some(p) = left.next() {
            if let Err(e) = self.publish(&p) {
                if let Ok(dir) = self.dest.dir(&p.dir) {
                    dest::remove_part(&dir, &p.part);
                }
                self.lock().extend(left);
                return Err(e);
            }
        }
        Ok(())
    }

    fn publish(&self, p: &Part) -> Result<(), CopyError> {
        let err = |source| CopyError::Io {
            path: self.dest.display(&p.rel()),
            source,
        };
        let dir = self.dest.dir(&p.dir)?;
        let file = match p.file {
            Some((ino, Some(mode))) => {
                Some((dest::open_part(&dir, &p.part, ino).map_err(err)?, mode))
            }
            _ => None,
        };
        dest::replace(&dir, &p.part, &p.name).map_err(err)?;
        if let Some((f, mode)) = file {
            dest::set_mode(&f, mode).map_err(err)?;
        }
        Ok(())
    }
}

impl Drop for Staging<'_> {
    fn drop(&mut self) {
        for p in self.lock().iter() {
            if let Ok(dir) = self.dest.dir(&p.dir) {
                dest::remove_part(&dir, &p.part);
            }
        }
    }
}
