//! The mountpoint: checks before mounting, dead-mount recovery, unmounting by path.
//!
//! A daemon killed with its mount in place leaves a dead mountpoint: every request to it fails
//! with ENOTCONN ("Transport endpoint is not connected"). `stat` alone does not tell: the
//! kernel answers it from the attributes it cached (for an hour), so a FUSE mount found at the
//! mountpoint is probed with `statfs`, which always reaches the daemon. [`prepare`] detaches a
//! dead mount before mounting again, refuses a mountpoint that already has a live FUSE mount
//! (or one whose daemon does not answer, naming `lcfs umount`), and checks for /dev/fuse, so
//! that each failure names the mountpoint and the remedy.
//!
//! Root unmounts with umount2(2); a user through fusermount3.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use tracing::{debug, warn};

use crate::error::MountError;
use crate::fusermount;

/// Whether this process may mount and unmount with the system calls.
pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// Checks the mountpoint (detaching a dead mount there first); returns its canonical path.
pub(crate) fn prepare(mountpoint: &Path) -> Result<PathBuf, MountError> {
    detach_if_dead(mountpoint)?;
    let meta = fs::metadata(mountpoint).map_err(|e| MountError::from_io(mountpoint.into(), e))?;
    if !meta.is_dir() {
        return Err(MountError::NotADirectory(mountpoint.into()));
    }
    let path = mountpoint
        .canonicalize()
        .map_err(|e| MountError::from_io(mountpoint.into(), e))?;
    if let Some(fstype) = fuse_mounted_at(&path) {
        match probe(&path) {
            Probe::Dead => {
                warn!(mountpoint = %path.display(), "detaching a dead mount (its daemon was killed)");
                detach(&path)?;
            }
            Probe::Alive | Probe::Silent => {
                return Err(MountError::AlreadyMounted { path, fstype });
            }
        }
    }
    if !Path::new("/dev/fuse").exists() {
        return Err(MountError::NoFuseDevice(path));
    }
    Ok(path)
}

/// Detaches `path` if it is a dead FUSE mount ("Transport endpoint is not connected").
fn detach_if_dead(path: &Path) -> Result<(), MountError> {
    match fs::metadata(path) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            warn!(mountpoint = %path.display(), "detaching a dead mount (its daemon was killed)");
            detach(path)
        }
        _ => Ok(()),
    }
}

/// What a FUSE mount's daemon said to a `statfs`.
#[derive(Debug, PartialEq, Eq)]
enum Probe {
    Alive,
    /// ENOTCONN: the daemon is gone.
    Dead,
    /// No answer in time (a stopped or hung daemon); the probe thread is left behind.
    Silent,
}

/// Asks the filesystem at `path` for its statistics, which FUSE never caches.
fn probe(path: &Path) -> Probe {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return Probe::Alive;
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: statfs is plain data; c_path is a valid NUL-terminated string.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut st) };
        let err = (rc != 0).then(io::Error::last_os_error);
        let _ = tx.send(err.and_then(|e| e.raw_os_error()));
    });
    match rx.recv_timeout(std::time::Duration::from_secs(2)) {
        Ok(Some(libc::ENOTCONN)) => Probe::Dead,
        Ok(_) => Probe::Alive,
        Err(_) => Probe::Silent,
    }
}

/// The type of the FUSE filesystem mounted at canonical `path`, if there is one.
fn fuse_mounted_at(path: &Path) -> Option<String> {
    let mountinfo = fs::read("/proc/self/mountinfo").ok()?;
    let mut found = None;
    for line in mountinfo.split(|&b| b == b'\n') {
        let text = String::from_utf8_lossy(line);
        let Some((fields, after)) = text.split_once(" - ") else {
            continue;
        };
        let point = fields.split(' ').nth(4).unwrap_or_default();
        let fstype = after.split(' ').next().unwrap_or_default();
        if unescape(point) == path.as_os_str().as_bytes() && fstype.starts_with("fuse") {
            // The last mount on top is the one visible.
            found = Some(fstype.to_string());
        }
    }
    found
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .and_then(|d| std::str::from_utf8(d).ok());
        match (bytes[i], octal.and_then(|d| u8::from_str_radix(d, 8).ok())) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// Raises the kernel readahead of the mount at `path` (best effort: needs root).
pub(crate) fn set_kernel_readahead(path: &Path, bytes: u64) {
    let Ok(meta) = fs::metadata(path) else { return };
    let (major, minor) = (libc::major(meta.dev()), libc::minor(meta.dev()));
    let knob = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    match fs::write(&knob, format!("{}\n", bytes.div_ceil(1024))) {
        Ok(()) => debug!(knob, bytes, "kernel readahead set"),
        Err(e) => debug!(knob, error = %e, "kernel readahead left at its default"),
    }
}

/// Unmounts the lcfs mount at `path` (`lcfs umount`): umount(2) as root, `fusermount3 -u` as a
/// user. Fails with [`MountError::Busy`] while programs use it.
pub fn unmount(path: &Path) -> Result<(), MountError> {
    if is_root() {
        umount2(path, 0)
    } else {
        fusermount::unmount(path, false)
    }
}

/// Detaches the mount at `path` now; it goes away when its last user leaves.
pub(crate) fn detach(path: &Path) -> Result<(), MountError> {
    if is_root() {
        umount2(path, libc::MNT_DETACH)
    } else {
        fusermount::unmount(path, true)
    }
}

fn umount2(path: &Path, flags: libc::c_int) -> Result<(), MountError> {
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|e| MountError::Io {
        path: path.into(),
        source: io::Error::new(io::ErrorKind::InvalidInput, e),
    })?;
    // SAFETY: c_path is a valid NUL-terminated string that outlives the call.
    if unsafe { libc::umount2(c_path.as_ptr(), flags) } == 0 {
        Ok(())
    } else {
        Err(MountError::from_io(path.into(), io::Error::last_os_error()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/mnt/a\040b"), b"/mnt/a b");
        assert_eq!(unescape(r"/x\134y"), b"/x\\y");
        assert_eq!(unescape(r"/trailing\04"), b"/trailing\\04");
    }

    #[test]
    fn missing_and_non_directory_mountpoints_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        assert!(matches!(prepare(&missing), Err(MountError::NotFound(_))));
        let file = dir.path().join("f");
        fs::write(&file, b"x").unwrap();
        let err = prepare(&file).unwrap_err();
        assert!(matches!(err, MountError::NotADirectory(_)), "{err}");
        assert!(err.to_string().contains(&*file.to_string_lossy()));
    }

    #[test]
    fn a_plain_directory_is_not_a_fuse_mount() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(fuse_mounted_at(&dir.path().canonicalize().unwrap()), None);
        assert_eq!(
            prepare(dir.path()).unwrap(),
            dir.path().canonicalize().unwrap()
        );
    }
}
