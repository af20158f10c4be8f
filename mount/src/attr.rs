//! Attributes as the kernel sees them: source [`Attr`]s become fuser `FileAttr`s.
//!
//! uid and gid are the mounting user's, or 0 with `keep_ownership` (the published tree has
//! no owners); atime and ctime are the mtime; directories have 2 links, everything else 1;
//! `blocks` counts 512-byte units of the size, `blksize` is 4096.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo};

use crate::source::{Attr, Kind};

/// statfs block size, and the `blksize` files report.
pub(crate) const BLOCK: u32 = 4096;
/// The longest name statfs admits.
pub(crate) const NAME_MAX: u32 = 255;

/// How entries and attributes are reported.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttrStyle {
    /// How long the kernel may cache what it is told.
    pub(crate) ttl: Duration,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
}

impl AttrStyle {
    /// The kernel's view of `a`, as inode `ino`.
    pub(crate) fn file_attr(&self, ino: u64, a: &Attr) -> FileAttr {
        let mtime = system_time(a.mtime_secs, a.mtime_nanos);
        FileAttr {
            ino: INodeNo(ino),
            size: a.size,
            blocks: a.size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind: file_type(a.kind),
            perm: (a.mode & 0o7777) as u16,
            nlink: a.nlink.max(1),
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: BLOCK,
            flags: 0,
        }
    }
}

/// A source timestamp as a `SystemTime` (the epoch if it does not fit).
fn system_time(secs: i64, nanos: u32) -> SystemTime {
    let base = if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(secs.unsigned_abs()))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))
    };
    base.and_then(|t| t.checked_add(Duration::from_nanos(nanos.into())))
        .unwrap_or(UNIX_EPOCH)
}

/// The kernel's file type for `kind`.
pub(crate) fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_follow_the_entry() {
        let style = AttrStyle {
            ttl: Duration::from_secs(1),
            uid: 1000,
            gid: 100,
        };
        let a = Attr {
            kind: Kind::File,
            size: 513,
            mode: 0o100755,
            mtime_secs: 1_700_000_000,
            mtime_nanos: 5,
            nlink: 1,
            link: 0,
        };
        let f = style.file_attr(9, &a);
        assert_eq!(
            (f.ino, f.size, f.blocks, f.perm, f.nlink),
            (INodeNo(9), 513, 2, 0o755, 1)
        );
        assert_eq!(
            (f.uid, f.gid, f.blksize, f.kind),
            (1000, 100, 4096, FileType::RegularFile)
        );
        assert_eq!(f.mtime, UNIX_EPOCH + Duration::new(1_700_000_000, 5));
        assert_eq!((f.atime, f.ctime), (f.mtime, f.mtime));
        let d = style.file_attr(
            1,
            &Attr {
                kind: Kind::Dir,
                nlink: 2,
                ..a
            },
        );
        assert_eq!((d.nlink, d.kind), (2, FileType::Directory));
    }

    #[test]
    fn times_before_the_epoch_and_out_of_range_do_not_panic() {
        assert_eq!(
            system_time(-1, 500_000_000),
            UNIX_EPOCH - Duration::from_millis(500)
        );
        let _ = system_time(i64::MIN, u32::MAX);
        let _ = system_time(i64::MAX, u32::MAX);
    }
}
