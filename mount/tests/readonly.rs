//! The mount is read-only, and says so: writes fail with EROFS, statfs reports it; extended
//! attributes and statfs totals come from the source.

mod common;

use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use common::{sample, sh, sh_ok, Mounted};

fn erofs<T: std::fmt::Debug>(what: &str, r: std::io::Result<T>) {
    let e = r.expect_err(what);
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{what}: {e}");
}

#[test]
fn shell_writes_fail_with_read_only_file_system() {
    let m = Mounted::new(sample());
    for script in [
        "touch new",
        "touch hello.txt",
        "echo x > hello.txt",
        "echo x >> hello.txt",
        "echo x > new",
        "mkdir d",
        "rm hello.txt",
        "rmdir empty-dir",
        "mv hello.txt moved",
        "ln -s hello.txt l2",
        "ln hello.txt h2",
        "chmod 777 hello.txt",
        "truncate -s 0 hello.txt",
        "cp hello.txt copy",
    ] {
        let out = sh(&m.mnt, script);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{script} succeeded");
        assert!(
            stderr.contains("Read-only file system"),
            "{script}: {stderr}"
        );
    }
    assert_eq!(sh_ok(&m.mnt, "cat hello.txt"), "hello world\n");
}

#[test]
fn syscalls_that_write_fail_with_erofs() {
    let m = Mounted::new(sample());
    let p = |rel: &str| m.path(rel);
    erofs(
        "open O_WRONLY",
        OpenOptions::new().write(true).open(p("hello.txt")),
    );
    erofs(
        "open O_RDWR",
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(p("hello.txt")),
    );
    erofs(
        "open O_APPEND",
        OpenOptions::new().append(true).open(p("hello.txt")),
    );
    erofs(
        "open O_TRUNC",
        OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(p("hello.txt")),
    );
    erofs("create", fs::File::create(p("new")));
    erofs("mkdir", fs::create_dir(p("d")));
    erofs("unlink", fs::remove_file(p("hello.txt")));
    erofs("rmdir", fs::remove_dir(p("empty-dir")));
    erofs("rename", fs::rename(p("hello.txt"), p("x")));
    erofs("symlink", std::os::unix::fs::symlink("hello.txt", p("l")));
    erofs("link", fs::hard_link(p("hello.txt"), p("h")));
    erofs(
        "chmod",
        fs::set_permissions(
            p("hello.txt"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        ),
    );
    let path = CString::new(p("hello.txt").as_os_str().as_bytes()).unwrap();
    // SAFETY: path and the value are valid for the calls; access/setxattr/removexattr only
    // read them.
    unsafe {
        assert_eq!(libc::access(path.as_ptr(), libc::W_OK), -1);
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EROFS)
        );
        assert_eq!(libc::access(path.as_ptr(), libc::R_OK), 0);
        let name = CString::new("user.x").unwrap();
        assert_eq!(
            libc::setxattr(path.as_ptr(), name.as_ptr(), b"v".as_ptr().cast(), 1, 0),
            -1
        );
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EROFS)
        );
        assert_eq!(libc::removexattr(path.as_ptr(), name.as_ptr()), -1);
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EROFS)
        );
    }
}

/// getxattr through libc: the size probe, then the value; errno on failure.
fn getxattr(path: &Path, name: &str, size: usize) -> Result<Vec<u8>, i32> {
    let path = CString::new(path.as_os_str().as_bytes()).unwrap();
    let name = CString::new(name).unwrap();
    let mut buf = vec![0u8; size];
    // SAFETY: the pointers are valid; buf has `size` bytes (a null pointer with size 0).
    let n = unsafe {
        let p = if size == 0 {
            std::ptr::null_mut()
        } else {
            buf.as_mut_ptr().cast()
        };
        libc::getxattr(path.as_ptr(), name.as_ptr(), p, size)
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    buf.truncate(if size == 0 { 0 } else { n as usize });
    Ok(if size == 0 {
        n.to_string().into_bytes()
    } else {
        buf
    })
}

fn listxattr(path: &Path) -> Vec<String> {
    let path = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: the pointers are valid and buf has 4096 bytes.
    let n = unsafe { libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n >= 0, "{}", std::io::Error::last_os_error());
    buf.truncate(n as usize);
    buf.split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

#[test]
fn xattrs_come_from_the_source() {
    let m = Mounted::new(sample());
    let hello = m.path("hello.txt");
    assert_eq!(
        listxattr(&hello),
        ["user.lcfs.kind", "user.lcfs.size", "user.lcfs.generation"]
    );
    assert_eq!(
        getxattr(&hello, "user.lcfs.kind", 0),
        Ok(b"4".to_vec()),
        "size probe"
    );
    assert_eq!(
        getxattr(&hello, "user.lcfs.kind", 100),
        Ok(b"file".to_vec())
    );
    assert_eq!(getxattr(&hello, "user.lcfs.kind", 2), Err(libc::ERANGE));
    assert_eq!(
        getxattr(&hello, "user.lcfs.generation", 100),
        Ok(b"7".to_vec())
    );
    assert_eq!(
        getxattr(&hello, "user.lcfs.missing", 100),
        Err(libc::ENODATA)
    );
    assert_eq!(
        getxattr(&hello, "security.capability", 100),
        Err(libc::ENODATA)
    );
    assert!(listxattr(&m.mnt).contains(&"user.lcfs.source".to_string()));
    assert_eq!(
        getxattr(&m.path("private"), "user.lcfs.kind", 100),
        Ok(b"dir".to_vec())
    );
    let dump = sh_ok(&m.mnt, "getfattr -d -m - hello.txt");
    assert!(dump.contains("user.lcfs.kind=\"file\""), "{dump}");
    assert!(dump.contains("user.lcfs.size=\"12\""), "{dump}");
}

/// Without `xattrs` both calls answer ENOSYS, which the kernel turns into EOPNOTSUPP and
/// remembers: `ls -l` then no longer asks the mount about every file it shows.
#[test]
fn xattrs_are_off_by_default() {
    let m = Mounted::with_config(sample(), lcfs_mount::MountConfig::default());
    let hello = m.path("hello.txt");
    for name in ["security.selinux", "user.lcfs.kind"] {
        assert_eq!(getxattr(&hello, name, 100), Err(libc::EOPNOTSUPP), "{name}");
    }
    // ACLs go through the kernel's own handler: there are none
    assert_eq!(
        getxattr(&hello, "system.posix_acl_access", 100),
        Err(libc::ENODATA)
    );
    let path = CString::new(hello.as_os_str().as_bytes()).unwrap();
    // SAFETY: path is NUL-terminated; a null buffer of size 0 asks for the size only.
    let n = unsafe { libc::listxattr(path.as_ptr(), std::ptr::null_mut(), 0) };
    assert_eq!(n, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EOPNOTSUPP)
    );
    let listing = sh_ok(&m.mnt, "ls -l hello.txt");
    assert!(listing.starts_with("-r"), "{listing}");
}

#[test]
fn statfs_reports_totals_and_read_only() {
    let source = sample();
    let m = Mounted::new(source);
    let path = CString::new(m.mnt.as_os_str().as_bytes()).unwrap();
    // SAFETY: path is valid and st is a plain struct the call fills.
    let st = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        assert_eq!(
            libc::statvfs(path.as_ptr(), &mut st),
            0,
            "{}",
            std::io::Error::last_os_error()
        );
        st
    };
    let totals = lcfs_mount::Source::totals(&*m.source);
    assert_eq!(st.f_bsize, 4096);
    assert_eq!(st.f_frsize, 4096);
    assert_eq!(st.f_blocks, totals.bytes.div_ceil(4096));
    assert_eq!((st.f_bfree, st.f_bavail, st.f_ffree), (0, 0, 0));
    assert_eq!(st.f_files, totals.files);
    assert_eq!(st.f_namemax, 255);
    assert_ne!(st.f_flag & libc::ST_RDONLY, 0, "flags {:#x}", st.f_flag);
    assert_eq!(sh_ok(&m.mnt, "stat -f -c %S .").trim(), "4096");
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    let line = mounts
        .lines()
        .find(|l| l.contains(&*m.mnt.to_string_lossy()))
        .expect("in /proc/self/mounts");
    assert!(
        line.starts_with("lcfs ") && line.contains(" fuse.lcfs ro,"),
        "{line}"
    );
}
