//! A mount whose daemon was killed with SIGKILL leaves a dead mountpoint whose attributes the
//! kernel still has cached: `stat` works, every read fails with ENOTCONN. The next
//! `lcfs mount` on it must detach it and mount again (issue 10's "Bad input and faults").
//! Needs root.

mod common;

use common::lab::Lab;
use common::lcfs::{start_server, tmpdir, Mount};
use std::fs;
use std::time::{Duration, Instant};

#[test]
fn a_mount_killed_with_sigkill_is_mounted_again() {
    let lab = Lab::with_clients(1);
    let tmp = tmpdir("remount");
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f.txt"), b"still here\n").unwrap();
    let server = start_server(&lab, &src, "remount", &tmp.path().join("state"), &[]);
    let mnt = tmp.path().join("mnt");
    let cache = tmp.path().join("cache");

    let first = Mount::new(&lab, "c1", "remount", &mnt, &cache, 20, &[]);
    // Attributes of the root and the file are now in the kernel's cache for an hour.
    assert!(fs::metadata(&mnt).unwrap().is_dir());
    assert_eq!(fs::read(mnt.join("f.txt")).unwrap(), b"still here\n");
    let pid = first.daemon_pid.expect("the daemon's pid");
    // SAFETY: a plain kill of the daemon this test started.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while fs::metadata(format!("/proc/{pid}")).is_ok() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let err = fs::read_dir(&mnt).map(drop).unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ENOTCONN),
        "the mount is not dead: {err}"
    );
    assert!(
        fs::metadata(&mnt).is_ok(),
        "stat of the dead mountpoint no longer works from the cache: this test lost its point"
    );
    // If this fails, dropping `first` clears the dead mount.
    let second = Mount::new(&lab, "c1", "remount", &mnt, &cache, 20, &[]);
    std::mem::forget(first); // the new mount replaced it
    assert_eq!(fs::read(mnt.join("f.txt")).unwrap(), b"still here\n");
    drop(second);
    server.stop();
}
