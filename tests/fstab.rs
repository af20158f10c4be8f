//! Integration with the system (issue 13): `mount -t fuse.lcfs`, an fstab line and `umount`
//! through the shipped helper `dist/mount.fuse.lcfs`, in the namespace lab; and the shipped
//! systemd units pass `systemd-analyze verify`.
//!
//! The helper is linked as `/sbin/mount.fuse.lcfs` for the test when no other is installed,
//! and the link is removed afterwards.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::lab::Lab;
use common::lcfs::{describe, is_mountpoint, s, start_server, tmpdir, within, LCFS};
use common::tree::write_random_file;
use rand::rngs::StdRng;
use rand::SeedableRng;

fn dist(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("dist").join(rel)
}

/// `/sbin/mount.fuse.lcfs`, linked to the shipped helper for the test's life.
struct Helper(Option<PathBuf>);

impl Helper {
    fn install() -> Helper {
        let at = PathBuf::from("/sbin/mount.fuse.lcfs");
        match fs::symlink_metadata(&at) {
            Ok(_) => {
                let target = fs::read_link(&at).unwrap_or_default();
                assert_eq!(
                    target,
                    dist("mount.fuse.lcfs"),
                    "{} exists and is not this checkout's helper: remove it to run this test",
                    at.display()
                );
                Helper(None)
            }
            Err(_) => {
                std::os::unix::fs::symlink(dist("mount.fuse.lcfs"), &at)
                    .unwrap_or_else(|e| panic!("cannot link {} (run as root): {e}", at.display()));
                Helper(Some(at))
            }
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if let Some(at) = &self.0 {
            let _ = fs::remove_file(at);
        }
    }
}

/// Unmounts `path` with umount(8) if it is still mounted when dropped.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        if is_mountpoint(&self.0) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
}

#[test]
fn fstab_line_and_mount_t_fuse_lcfs_mount_and_umount() {
    let lab = Lab::with_clients(1);
    let _helper = Helper::install();
    let tmp = tmpdir("fstab");
    let src = tmp.path().join("src");
    write_random_file(&src.join("a.bin"), &mut StdRng::seed_from_u64(7), 200_000);
    let want = fs::read(src.join("a.bin")).unwrap();
    let _srv = start_server(&lab, &src, "images", &tmp.path().join("state"), &[]);

    // An fstab line, mounted by its mountpoint.
    let mnt = tmp.path().join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let fstab = tmp.path().join("fstab");
    fs::write(
        &fstab,
        format!(
            "# lcfs\nimages {} fuse.lcfs iface={},cache={},timeout=10,log={},_netdev,nofail 0 0\n",
            s(&mnt),
            Lab::IFACE,
            s(&tmp.path().join("cache")),
            s(&tmp.path().join("fstab-mount.log")),
        ),
    )
    .unwrap();
    let guard = Mounted(mnt.clone());
    let out = lab
        .command("c1", "mount")
        .args(["-T", s(&fstab), s(&mnt)])
        .env("LCFS", LCFS)
        .output()
        .unwrap();
    assert!(out.status.success(), "mount -T fstab: {}", describe(&out));
    assert!(is_mountpoint(&mnt), "the fstab line mounted nothing");
    assert!(fs::read(mnt.join("a.bin")).unwrap() == want);
    let out = Command::new("umount").arg(&mnt).output().unwrap();
    assert!(out.status.success(), "umount: {}", describe(&out));
    assert!(
        within(Duration::from_secs(10), || !is_mountpoint(&mnt)).is_some(),
        "umount left the mount"
    );
    drop(guard);

    // mount -t fuse.lcfs, with a bad option first: refused, naming it.
    let mnt2 = tmp.path().join("mnt2");
    fs::create_dir_all(&mnt2).unwrap();
    let _guard2 = Mounted(mnt2.clone());
    let opts = format!(
        "iface={},cache={},log={}",
        Lab::IFACE,
        s(&tmp.path().join("cache2")),
        s(&tmp.path().join("t-mount.log"))
    );
    let bad = lab
        .command("c1", "mount")
        .args([
            "-t",
            "fuse.lcfs",
            "images",
            s(&mnt2),
            "-o",
            &format!("{opts},colour=blue"),
        ])
        .env("LCFS", LCFS)
        .output()
        .unwrap();
    assert!(!bad.status.success(), "an unknown option was accepted");
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("colour=blue"),
        "the error names the option: {}",
        describe(&bad)
    );
    let out = lab
        .command("c1", "mount")
        .args(["-t", "fuse.lcfs", "images", s(&mnt2), "-o", &opts])
        .env("LCFS", LCFS)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount -t fuse.lcfs: {}",
        describe(&out)
    );
    assert!(fs::read(mnt2.join("a.bin")).unwrap() == want);
    let out = Command::new(LCFS)
        .args(["umount", s(&mnt2)])
        .output()
        .unwrap();
    assert!(out.status.success(), "lcfs umount: {}", describe(&out));
}

/// The shipped units are valid systemd units. They name `/usr/local/bin/lcfs` (where
/// `cargo install --root /usr/local` puts it); the check runs on copies naming this build.
#[test]
fn systemd_units_verify() {
    let which = Command::new("systemd-analyze").arg("--version").output();
    assert!(
        which.is_ok_and(|o| o.status.success()),
        "systemd-analyze is missing: install Debian's systemd (tools/setup does)"
    );
    let dir = tmpdir("units");
    let mut units = Vec::new();
    for entry in fs::read_dir(dist("systemd")).unwrap() {
        let entry = entry.unwrap();
        let text = fs::read_to_string(entry.path()).unwrap();
        if text.contains("ExecStart=") {
            assert!(text.contains("ExecStart=/usr/local/bin/lcfs "), "{text}");
        }
        let text = text.replace("/usr/local/bin/lcfs", LCFS);
        let name = entry
            .file_name()
            .to_string_lossy()
            .replace("@.", "@images.");
        fs::write(dir.path().join(&name), text).unwrap();
        units.push(dir.path().join(&name));
    }
    assert!(units.len() >= 3, "units: {units:?}");
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&units)
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "systemd-analyze verify: {}",
        describe(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.trim().is_empty(),
        "systemd-analyze verify warned: {err}"
    );
}
