//! Walking SRC: by descriptor, one name at a time, never following a symlink (the server's
//! `beneath` calls, see `serve/index/beneath.rs`). Symlinks are listed with their raw
//! targets; fifos, sockets and devices are left out and named in [`Walked::skipped`], as
//! `lcfs serve` does. Also left out: part files of a running copy or sync, the trash at
//! SRC's root, and DEST itself when it lies inside SRC.

use std::ffi::{CStr, OsStr};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::copy::{dest::PART_PREFIX, trash::TRASH};
use crate::serve::index::beneath::{self, Kind};
use crate::serve::index::{Tree, MAX_DEPTH};
use crate::wire::object::Timestamp;

/// One entry of SRC, by path relative to SRC (the DEST name for a single file).
#[derive(Clone, Debug)]
pub struct Item {
    pub rel: PathBuf,
    pub kind: ItemKind,
    pub mode: u32,
    pub mtime: Timestamp,
}

#[derive(Clone, Debug)]
pub enum ItemKind {
    Dir,
    /// `src` is its path relative to SRC's directory, `size` its size when walked.
    File {
        src: PathBuf,
        size: u64,
    },
    Symlink(Vec<u8>),
}

#[derive(Debug, Default)]
pub struct Walked {
    /// Parents before children.
    pub items: Vec<Item>,
    /// Left out, with why.
    pub skipped: Vec<(PathBuf, String)>,
}

/// Walks SRC's directory; `skip_dir` is (device, inode) of a directory not to enter (DEST).
pub fn walk(tree: &Tree, skip_dir: Option<(u64, u64)>) -> std::io::Result<Walked> {
    let mut w = Walked::default();
    walk_dir(tree, tree.dir(), Path::new(""), 0, skip_dir, &mut w)?;
    Ok(w)
}

fn walk_dir(
    tree: &Tree,
    fd: &OwnedFd,
    rel: &Path,
    depth: usize,
    skip_dir: Option<(u64, u64)>,
    w: &mut Walked,
) -> std::io::Result<()> {
    let mut names = beneath::list(fd)?;
    names.sort();
    for name in names {
        let child = rel.join(OsStr::from_bytes(name.to_bytes()));
        let skip = |w: &mut Walked, why: &str| w.skipped.push((tree.display(&child), why.into()));
        if left_out(rel, &name) {
            continue;
        }
        let attrs = match beneath::stat_at(fd.as_fd(), &name) {
            Ok(a) => a,
            Err(e) => {
                skip(w, &e.to_string());
                continue;
            }
        };
        let item = |kind| Item {
            rel: child.clone(),
            kind,
            mode: attrs.mode,
            mtime: attrs.mtime,
        };
        match attrs.kind {
            Kind::Other => skip(
                w,
                "a fifo, socket or device: lcfs sync copies files, directories and symlinks",
            ),
            Kind::File => w.items.push(item(ItemKind::File {
                src: child.clone(),
                size: attrs.size,
            })),
            Kind::Symlink => match beneath::read_link_at(fd.as_fd(), &name) {
                Ok(target) => w.items.push(item(ItemKind::Symlink(target))),
                Err(e) => skip(w, &e.to_string()),
            },
            Kind::Dir if skip_dir == Some((attrs.dev, attrs.ino)) => {
                skip(w, "it is DEST");
            }
            Kind::Dir if depth >= MAX_DEPTH => skip(w, "too deep"),
            Kind::Dir => match beneath::open_dir_at(fd.as_fd(), &name) {
                Ok(sub) => {
                    w.items.push(item(ItemKind::Dir));
                    walk_dir(tree, &sub, &child, depth + 1, skip_dir, w)?;
                }
                Err(e) => skip(w, &e.to_string()),
            },
        }
    }
    Ok(())
}

/// Names never synced: part files, and the trash at the root.
fn left_out(parent: &Path, name: &CStr) -> bool {
    let name = name.to_bytes();
    name.starts_with(PART_PREFIX.as_bytes())
        || (parent.as_os_str().is_empty() && name == TRASH.as_bytes())
}
