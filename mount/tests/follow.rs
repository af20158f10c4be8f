//! A mounted [`MemSource`] moving to new versions, through the kernel: entries and attributes
//! the kernel cached are invalidated, unchanged files keep their inode numbers and page cache,
//! and an open file keeps reading the version it opened, or fails with ESTALE once the source
//! can no longer get it.

mod common;

use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{eventually, Mounted, Rng};
use lcfs_mount::testing::MemSource;

const MIB: usize = 1024 * 1024;

fn tree(big: &[u8]) -> MemSource {
    let mut s = MemSource::new();
    s.file("keep.txt", b"unchanged\n".to_vec(), 0o644)
        .file("chg.bin", big.to_vec(), 0o644)
        .file("del.txt", b"deleted\n".to_vec(), 0o644)
        .file("ren-old.txt", b"renamed\n".to_vec(), 0o644)
        .file("mode.sh", b"#!/bin/sh\n".to_vec(), 0o644)
        .symlink("link", "keep.txt")
        .file("sub/x", b"x1\n".to_vec(), 0o644);
    s
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn generation(path: &Path) -> String {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new("user.lcfs.generation").unwrap();
    let mut buf = [0u8; 64];
    // SAFETY: valid C strings and a buffer of buf.len() writable bytes.
    let len = unsafe {
        libc::getxattr(
            p.as_ptr(),
            n.as_ptr(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
        )
    };
    assert!(len >= 0, "getxattr: {}", std::io::Error::last_os_error());
    String::from_utf8_lossy(&buf[..len as usize]).into_owned()
}

#[test]
fn a_mount_follows_new_versions() {
    let old = Rng::new(1).bytes(4 * MIB);
    let new = Rng::new(2).bytes(3 * MIB + 17);
    let m = Mounted::new(tree(&old));
    let ino = |p: &str| fs::symlink_metadata(m.path(p)).unwrap().ino();
    let (keep, chg, mode) = (ino("keep.txt"), ino("chg.bin"), ino("mode.sh"));
    // Everything looked at, cached by the kernel for the attribute TTL (an hour).
    assert_eq!(names(&m.mnt).len(), 7);
    assert_eq!(fs::read(m.path("keep.txt")).unwrap(), b"unchanged\n");
    assert_eq!(
        fs::read_link(m.path("link")).unwrap(),
        Path::new("keep.txt")
    );
    assert_eq!(fs::read(m.path("sub/x")).unwrap(), b"x1\n");
    let mut held = fs::File::open(m.path("chg.bin")).unwrap();
    let mut head = vec![0; MIB];
    held.read_exact(&mut head).unwrap();
    assert!(head == old[..MIB]);

    let published = Instant::now();
    m.source.publish(|t| {
        t.file("chg.bin", new.clone(), 0o644)
            .remove("del.txt")
            .rename("ren-old.txt", "ren-new.txt")
            .chmod("mode.sh", 0o755)
            .symlink("link", "sub/x")
            .dir("made", 0o755)
            .file("sub/x", b"x2\n".to_vec(), 0o644);
    });
    assert!(
        eventually(Duration::from_secs(5), || fs::read(m.path("chg.bin"))
            .is_ok_and(|b| b == new)),
        "new opens still see the old chg.bin 5 s after the new version"
    );
    eprintln!("visible after {:?}", published.elapsed());
    assert_eq!(generation(&m.mnt), "2");
    assert_eq!(
        names(&m.mnt),
        [
            "chg.bin",
            "keep.txt",
            "link",
            "made",
            "mode.sh",
            "ren-new.txt",
            "sub"
        ]
    );
    assert_eq!(fs::read(m.path("sub/x")).unwrap(), b"x2\n");
    assert_eq!(fs::read_link(m.path("link")).unwrap(), Path::new("sub/x"));
    let meta = fs::metadata(m.path("mode.sh")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o755);
    assert_eq!(
        (ino("keep.txt"), meta.ino()),
        (keep, mode),
        "unchanged inodes kept"
    );
    assert_ne!(ino("chg.bin"), chg, "a changed file is a new inode");
    assert!(fs::metadata(m.path("del.txt")).is_err());

    // The handle opened before the change reads on in its own version...
    let mut rest = Vec::new();
    held.read_to_end(&mut rest).unwrap();
    assert!(
        rest == old[MIB..],
        "the old handle returned bytes of another version"
    );
    // ...and once its pages are gone and the source cannot get them, fails with ESTALE.
    m.source.forget_old();
    // SAFETY: plain syscall on a descriptor we own.
    let rc = unsafe { libc::posix_fadvise(held.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0);
    let mut buf = vec![0; 4096];
    let e = held.read_at(&mut buf, 2 * MIB as u64).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ESTALE), "{e}");
    assert_eq!(fs::read(m.path("keep.txt")).unwrap(), b"unchanged\n");
}
