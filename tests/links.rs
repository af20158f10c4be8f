//! POSIX fidelity beyond contents, on a real mount and a real copy: hard links are one inode
//! with the publisher's link count (and hard links again in `copy`), directories have the
//! conventional link count (2 + subdirectories), and the root shows the published
//! directory's own mode and mtime.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use common::lab::Lab;
use common::lcfs::{spawn_copy, start_server, tmpdir, Mount};

const LIMIT: Duration = Duration::from_secs(120);

fn set_mtime(p: &Path, secs: i64, nanos: i64) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let t = libc::timespec {
        tv_sec: secs,
        tv_nsec: nanos,
    };
    // SAFETY: a valid path and two valid timespecs.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), [t, t].as_ptr(), 0) };
    assert_eq!(r, 0, "utimensat {}", p.display());
}

fn check(root: &Path, what: &str) {
    let m = |p: &str| std::fs::symlink_metadata(root.join(p)).unwrap();
    let (f, g, h) = (m("a/f.bin"), m("b/deep/g.bin"), m("a/h.bin"));
    assert_eq!(
        f.ino(),
        g.ino(),
        "{what}: a/f.bin and b/deep/g.bin are not one inode"
    );
    assert_eq!((f.nlink(), g.nlink()), (3, 3), "{what}: link counts");
    assert_eq!(f.ino(), h.ino(), "{what}: a/h.bin");
    assert_eq!(
        std::fs::read(root.join("b/deep/g.bin")).unwrap(),
        vec![7u8; 200_000]
    );
    let lone = m("a/lone.txt");
    assert_eq!(lone.nlink(), 1, "{what}: a file without links");
    assert_eq!(m("a").nlink(), 2, "{what}: a has no subdirectory");
    assert_eq!(m("b").nlink(), 4, "{what}: b has two subdirectories");
}

#[test]
fn hard_links_link_counts_and_the_roots_own_attributes() {
    let lab = Lab::with_clients(1);
    let tmp = tmpdir("links");
    let src = tmp.path().join("src");
    for d in ["a", "b/deep", "b/other"] {
        std::fs::create_dir_all(src.join(d)).unwrap();
    }
    std::fs::write(src.join("a/f.bin"), vec![7u8; 200_000]).unwrap();
    std::fs::hard_link(src.join("a/f.bin"), src.join("b/deep/g.bin")).unwrap();
    std::fs::hard_link(src.join("a/f.bin"), src.join("a/h.bin")).unwrap();
    std::fs::write(src.join("a/lone.txt"), b"alone").unwrap();
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o750)).unwrap();
    set_mtime(&src, 1_600_000_000, 123_456_789);
    check(&src, "the source");

    let srv = start_server(&lab, &src, "linksch", &tmp.path().join("state"), &[]);
    let m = Mount::new(
        &lab,
        "c1",
        "linksch",
        &tmp.path().join("mnt"),
        &tmp.path().join("cache"),
        20,
        &[],
    );
    check(m.path(), "the mount");
    let root = std::fs::metadata(m.path()).unwrap();
    assert_eq!(root.mode() & 0o7777, 0o750, "the mount's root mode");
    assert_eq!(
        (root.mtime(), root.mtime_nsec()),
        (1_600_000_000, 123_456_789)
    );
    assert_eq!(root.nlink(), 4, "the root has a and b");
    // tar sees one file and two links
    let out = std::process::Command::new("tar")
        .args(["-cvf", "/dev/null", "-C"])
        .arg(m.path())
        .args(["a", "b"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    m.unmount();

    let dest = tmp.path().join("dest");
    let run = spawn_copy(&lab, "c1", "linksch", &dest, &tmp.path().join("cache2"), 20).wait(LIMIT);
    run.assert_success();
    check(&dest, "the copy");
    let d = std::fs::metadata(&dest).unwrap();
    assert_eq!(d.mode() & 0o7777, 0o750, "the copy's root mode");
    assert_eq!((d.mtime(), d.mtime_nsec()), (1_600_000_000, 123_456_789));
    // a second copy over it keeps the links
    let again =
        spawn_copy(&lab, "c1", "linksch", &dest, &tmp.path().join("cache2"), 20).wait(LIMIT);
    again.assert_success();
    check(&dest, "the copy, copied again");
    srv.stop();
}
