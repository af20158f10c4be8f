//! Errors of the mount, and the one table that turns them into errno values.
//!
//! [`FsError`] is what a filesystem operation fails with; [`FsError::errno`] is the only place
//! in the crate that chooses an errno, so the handlers never spell errno literals.
//! [`MountError`] is what mounting and unmounting fail with: each variant names the mountpoint
//! and says what the user can do about it.

use std::io;
use std::path::PathBuf;

use crate::source::SourceError;

/// Why a filesystem operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FsError {
    /// No entry of that name, or an inode the kernel should not know.
    #[error("no such entry")]
    NotFound,
    /// A directory operation on something else.
    #[error("not a directory")]
    NotDir,
    /// A file operation on a directory.
    #[error("is a directory")]
    IsDir,
    /// `readlink` of something that is not a symlink.
    #[error("not a symlink")]
    NotSymlink,
    /// Any attempt to change the filesystem.
    #[error("read-only filesystem")]
    ReadOnly,
    /// No extended attribute of that name.
    #[error("no such extended attribute")]
    NoXattr,
    /// The caller's buffer is too small for the value.
    #[error("buffer too small")]
    Range,
    /// A file handle this filesystem did not give out (or already released).
    #[error("bad file handle")]
    BadHandle,
    /// The source could not answer.
    #[error(transparent)]
    Source(#[from] SourceError),
}

impl FsError {
    /// The errno the kernel passes on to the caller.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotSymlink => libc::EINVAL,
            FsError::ReadOnly => libc::EROFS,
            FsError::NoXattr => libc::ENODATA,
            FsError::Range => libc::ERANGE,
            FsError::BadHandle => libc::EBADF,
            FsError::Source(e) => e.errno(),
        }
    }
}

/// Why mounting or unmounting failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The mountpoint does not exist.
    #[error("{0}: no such directory; create it first")]
    NotFound(PathBuf),
    /// The mountpoint is not a directory.
    #[error("{0}: not a directory; mount on an (empty) directory")]
    NotADirectory(PathBuf),
    /// /dev/fuse is missing.
    #[error("cannot mount on {0}: /dev/fuse is missing; load the fuse module (`modprobe fuse`) or install fuse3")]
    NoFuseDevice(PathBuf),
    /// A user (not root) may not mount here.
    #[error(
        "cannot mount on {path}: permission denied ({detail}); a user mount needs fusermount3 \
         (install fuse3) and write access to the mountpoint; or run as root"
    )]
    PermissionDenied {
        /// The mountpoint.
        path: PathBuf,
        /// What the system said.
        detail: String,
    },
    /// /dev/fuse is not open to users (fusermount3 opens it as the user).
    #[error(
        "cannot mount on {0}: /dev/fuse is not open to users here; make it mode 0666 \
         (`chmod 0666 /dev/fuse`, as distributions ship it), or run as root"
    )]
    FuseDeviceDenied(PathBuf),
    /// A user mount or unmount needs fusermount3, which is not installed.
    #[error("{0}: fusermount3 not found; install fuse3, or run as root")]
    NoFusermount(PathBuf),
    /// A FUSE filesystem is already mounted there.
    #[error("{path}: already mounted ({fstype}); unmount it first (`lcfs umount {}`)", path.display())]
    AlreadyMounted {
        /// The mountpoint.
        path: PathBuf,
        /// Its filesystem type, as /proc/self/mountinfo gives it.
        fstype: String,
    },
    /// Unmounting something that is not mounted.
    #[error("{0}: not mounted")]
    NotMounted(PathBuf),
    /// Unmounting a filesystem that is in use.
    #[error("{0}: busy; close the files and shells using it, or unmount lazily (`umount -l`)")]
    Busy(PathBuf),
    /// Anything else, with the system's words.
    #[error("{path}: {source}")]
    Io {
        /// The mountpoint.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

impl MountError {
    /// Classifies an errno from mount(2), umount(2) or fusermount3 for `path`.
    pub(crate) fn from_io(path: PathBuf, error: io::Error) -> MountError {
        match error.raw_os_error() {
            Some(libc::ENOENT) => MountError::NotFound(path),
            Some(libc::ENOTDIR) => MountError::NotADirectory(path),
            Some(libc::EINVAL) => MountError::NotMounted(path),
            Some(libc::EBUSY) => MountError::Busy(path),
            Some(libc::EPERM) | Some(libc::EACCES) => MountError::PermissionDenied {
                path,
                detail: error.to_string(),
            },
            _ => MountError::Io {
                path,
                source: error,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_an_errno() {
        let cases = [
            (FsError::NotFound, libc::ENOENT),
            (FsError::NotDir, libc::ENOTDIR),
            (FsError::IsDir, libc::EISDIR),
            (FsError::NotSymlink, libc::EINVAL),
            (FsError::ReadOnly, libc::EROFS),
            (FsError::NoXattr, libc::ENODATA),
            (FsError::Range, libc::ERANGE),
            (FsError::BadHandle, libc::EBADF),
            (SourceError::Unavailable("gone".into()).into(), libc::EIO),
            (SourceError::Invalid("bad".into()).into(), libc::EIO),
            (SourceError::Stale("gone".into()).into(), libc::ESTALE),
            (SourceError::Closed.into(), libc::EIO),
        ];
        for (error, errno) in cases {
            assert_eq!(error.errno(), errno, "{error:?}");
        }
    }

    #[test]
    fn mount_errors_name_the_mountpoint_and_a_remedy() {
        let path = PathBuf::from("/mnt/x");
        let busy = MountError::from_io(path.clone(), io::Error::from_raw_os_error(libc::EBUSY));
        assert!(busy.to_string().contains("/mnt/x") && busy.to_string().contains("umount -l"));
        let perm = MountError::from_io(path, io::Error::from_raw_os_error(libc::EPERM));
        assert!(perm.to_string().contains("fusermount3"), "{perm}");
    }
}
