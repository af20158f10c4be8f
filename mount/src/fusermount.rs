//! User mounts through fusermount3, the setuid helper of the fuse3 package.
//!
//! A user cannot call mount(2), so fusermount3 mounts for them: it opens /dev/fuse, mounts it
//! on the mountpoint (checking that the user may) and passes the descriptor back over a Unix
//! socket named by `_FUSE_COMMFD`. The session then runs on that descriptor
//! (`fuser::Session::from_fd`). Doing this here rather than through fuser's own fallback means a
//! user mount also works where /dev/fuse is not open to users (fuser opens it first and gives
//! up), and lets every failure say what fusermount3 said.
//!
//! Unmounting as a user is `fusermount3 -u` (`-uz` to detach lazily).

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::error::MountError;

const FUSERMOUNT: &str = "fusermount3";

/// Mounts with mount `options` (as `-o` takes them) on `path`; returns the /dev/fuse descriptor.
pub(crate) fn mount(path: &Path, options: &str) -> Result<OwnedFd, MountError> {
    let io_error = |source| MountError::Io {
        path: path.into(),
        source,
    };
    let (ours, theirs) = UnixStream::pair().map_err(io_error)?;
    let theirs_fd = theirs.as_raw_fd();
    let mut cmd = Command::new(FUSERMOUNT);
    cmd.arg("-o").arg(options).arg("--").arg(path);
    cmd.env("_FUSE_COMMFD", theirs_fd.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: the closure runs in the child between fork and exec and only calls fcntl, which
    // is async-signal-safe, on a descriptor that is open there.
    unsafe { cmd.pre_exec(move || keep_across_exec(theirs_fd)) };
    let child = cmd.spawn().map_err(|e| spawn_error(path, e))?;
    drop(theirs);
    let received = receive_fd(&ours);
    let out = child.wait_with_output().map_err(io_error)?;
    match received {
        Ok(Some(fd)) => Ok(fd),
        Ok(None) => Err(classify(path, &String::from_utf8_lossy(&out.stderr))),
        Err(e) => Err(io_error(e)),
    }
}

/// Unmounts `path` (lazily: detaches it at once, it goes when its last user leaves).
pub(crate) fn unmount(path: &Path, lazy: bool) -> Result<(), MountError> {
    let out = Command::new(FUSERMOUNT)
        .arg(if lazy { "-uz" } else { "-u" })
        .arg("--")
        .arg(path)
        .output()
        .map_err(|e| spawn_error(path, e))?;
    if out.status.success() {
        return Ok(());
    }
    Err(classify(path, &String::from_utf8_lossy(&out.stderr)))
}

fn spawn_error(path: &Path, e: io::Error) -> MountError {
    match e.kind() {
        io::ErrorKind::NotFound => MountError::NoFusermount(path.into()),
        _ => MountError::Io {
            path: path.into(),
            source: e,
        },
    }
}

fn keep_across_exec(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an integer descriptor touches no memory of ours.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives the descriptor fusermount3 sends; `None` if it closed the socket without one.
fn receive_fd(sock: &UnixStream) -> io::Result<Option<OwnedFd>> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: byte.len(),
    };
    // Room for a control message carrying one descriptor, aligned as cmsghdr needs.
    let mut control = [0u64; 8];
    // SAFETY: msghdr is a plain C struct for which all zeroes is a valid value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = mem::size_of_val(&control) as _;
    let n = loop {
        // SAFETY: msg points at iov and control, which live until the call returns.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            break n;
        }
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: msg was filled by recvmsg; CMSG_FIRSTHDR checks msg_controllen and returns
    // either null or a header inside `control`.
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    if n == 0 || cmsg.is_null() {
        return Ok(None);
    }
    // SAFETY: cmsg points at a complete header inside `control` (checked non-null above).
    let (level, kind, len) = unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type, (*cmsg).cmsg_len) };
    // SAFETY: CMSG_LEN only does arithmetic.
    let want = unsafe { libc::CMSG_LEN(mem::size_of::<RawFd>() as u32) } as usize;
    #[allow(clippy::unnecessary_cast)] // cmsg_len is usize with glibc, u32 with musl
    let len = len as usize;
    if level != libc::SOL_SOCKET || kind != libc::SCM_RIGHTS || len < want {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "fusermount3 sent no descriptor",
        ));
    }
    // SAFETY: the message carries at least one descriptor (length checked above); the data
    // may be unaligned, hence read_unaligned.
    let fd: RawFd = unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast()) };
    if fd < 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "fusermount3 sent a bad descriptor",
        ));
    }
    // SAFETY: SCM_RIGHTS gave this process a new descriptor that nothing else owns.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Classifies what fusermount3 said on failure.
pub(crate) fn classify(path: &Path, stderr: &str) -> MountError {
    let path = path.to_path_buf();
    let said = stderr.trim().to_string();
    if said.contains("not found in") || said.contains("not mounted") {
        MountError::NotMounted(path)
    } else if said.contains("/dev/fuse") {
        MountError::FuseDeviceDenied(path)
    } else if said.contains("busy") {
        MountError::Busy(path)
    } else if said.contains("not permitted")
        || said.contains("ermission denied")
        || said.contains("no write access")
        || said.contains("only allowed if")
    {
        MountError::PermissionDenied { path, detail: said }
    } else {
        MountError::Io {
            path,
            source: io::Error::other(said),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fusermount_messages_are_classified() {
        let p = Path::new("/m");
        let e = |s| classify(p, s);
        assert!(matches!(
            e("fusermount3: entry for /m not found in /etc/mtab"),
            MountError::NotMounted(_)
        ));
        assert!(matches!(
            e("fusermount3: failed to unmount /m: Device or resource busy"),
            MountError::Busy(_)
        ));
        let perm = e("fusermount3: mount failed: Operation not permitted");
        assert!(matches!(perm, MountError::PermissionDenied { .. }));
        assert!(
            perm.to_string().contains("Operation not permitted"),
            "{perm}"
        );
        let other = e("fusermount3: option allow_other only allowed if 'user_allow_other' is set");
        assert!(matches!(other, MountError::PermissionDenied { .. }));
        let dev = e("fusermount3: failed to open /dev/fuse: Permission denied");
        assert!(matches!(dev, MountError::FuseDeviceDenied(_)));
        assert!(matches!(e("something else"), MountError::Io { .. }));
    }

    #[test]
    fn a_closed_socket_means_no_descriptor() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        assert!(receive_fd(&ours).unwrap().is_none());
    }
}
