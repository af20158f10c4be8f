//! `lcfs sync SRC DEST` on temporary directories: no network, no root needed (the DEST
//! checks that need another uid are in `copy::dest`'s unit tests).

mod common;

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::lcfs::{assert_no_part_files, number_before, LCFS};
use common::tree::{assert_trees_equal, seeded, set_mtime};

const BLOCK: u64 = 64 << 10;
const BIG: usize = 10 << 20;

/// Runs `lcfs sync ARGS...`; panics unless it succeeds. Returns its summary line.
fn sync(args: &[&Path], flags: &[&str]) -> String {
    let out = Command::new(LCFS)
        .arg("sync")
        .args(flags)
        .args(args)
        .output()
        .expect("run lcfs sync");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "lcfs sync failed: {stderr}");
    stderr
        .lines()
        .find(|l| l.starts_with("synced "))
        .unwrap_or_else(|| panic!("no summary line: {stderr}"))
        .to_owned()
}

fn written(line: &str) -> u64 {
    number_before(line, "bytes written from").unwrap_or_else(|| panic!("{line}"))
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

/// A tree with a big file, small and empty ones, modes, nanosecond mtimes, symlinks.
fn make_src(src: &Path) {
    fs::create_dir_all(src.join("sub/deeper")).unwrap();
    fs::write(src.join("big"), seeded(1, BIG)).unwrap();
    fs::write(src.join("small"), b"small file").unwrap();
    fs::write(src.join("empty"), b"").unwrap();
    fs::write(src.join("sub/odd"), seeded(2, 3 * BLOCK as usize + 17)).unwrap();
    fs::write(src.join("sub/deeper/tool"), b"#!/bin/sh\n").unwrap();
    chmod(&src.join("sub/deeper/tool"), 0o755);
    chmod(&src.join("small"), 0o600);
    symlink("../big", src.join("sub/up")).unwrap();
    symlink("/nonexistent/abs", src.join("dangling")).unwrap();
    chmod(&src.join("sub/deeper"), 0o750);
    for (i, p) in [
        "big",
        "small",
        "empty",
        "sub/odd",
        "sub/deeper/tool",
        "sub/up",
    ]
    .iter()
    .enumerate()
    {
        set_mtime(&src.join(p), 1_600_000_000 + i as i64, 123_456_789);
    }
    set_mtime(&src.join("sub/deeper"), 1_500_000_000, 5);
    set_mtime(&src.join("sub"), 1_500_000_001, 7);
}

#[test]
fn a_sync_mirrors_src_and_a_second_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dest) = (tmp.path().join("src"), tmp.path().join("dest"));
    make_src(&src);
    let first = sync(&[&src, &dest], &[]);
    assert_trees_equal(&src, &dest);
    assert_no_part_files(&dest);
    assert!(written(&first) >= BIG as u64, "{first}");
    let second = sync(&[&src, &dest], &[]);
    assert_eq!(written(&second), 0, "a second sync wrote: {second}");
    assert_trees_equal(&src, &dest);
    // Only metadata changed: the contents stay, the mode and mtime are set again.
    chmod(&dest.join("small"), 0o644);
    set_mtime(&dest.join("sub/odd"), 7, 7);
    let third = sync(&[&src, &dest], &[]);
    assert_eq!(written(&third), 0, "{third}");
    assert_trees_equal(&src, &dest);
}

#[test]
fn one_changed_block_of_a_big_file_writes_about_one_block() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dest) = (tmp.path().join("src"), tmp.path().join("dest"));
    make_src(&src);
    sync(&[&src, &dest], &[]);
    let ino = fs::metadata(dest.join("big")).unwrap().ino();
    let mut bytes = fs::read(src.join("big")).unwrap();
    bytes[5 * BLOCK as usize + 100] ^= 0xff;
    fs::write(src.join("big"), &bytes).unwrap();
    let line = sync(&[&src, &dest], &[]);
    let w = written(&line);
    assert!(
        w > 0 && w <= BLOCK,
        "one changed byte wrote {w} bytes: {line}"
    );
    assert_eq!(fs::read(dest.join("big")).unwrap(), bytes);
    assert_ne!(
        fs::metadata(dest.join("big")).unwrap().ino(),
        ino,
        "the file was changed in place instead of staged and renamed"
    );
    assert_trees_equal(&src, &dest);
    assert_no_part_files(&dest);
    // Appending and truncating.
    bytes.extend(seeded(3, 1000));
    fs::write(src.join("big"), &bytes).unwrap();
    let w = written(&sync(&[&src, &dest], &[]));
    assert!(w <= BLOCK, "appending 1000 bytes wrote {w}");
    fs::write(src.join("big"), &bytes[..BIG / 2]).unwrap();
    assert_eq!(written(&sync(&[&src, &dest], &[])), 0, "a truncation");
    assert_trees_equal(&src, &dest);
}

#[test]
fn delete_moves_extras_to_the_trash_and_only_with_delete() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dest) = (tmp.path().join("src"), tmp.path().join("dest"));
    make_src(&src);
    sync(&[&src, &dest], &[]);
    fs::remove_file(src.join("small")).unwrap();
    fs::remove_dir_all(src.join("sub/deeper")).unwrap();
    sync(&[&src, &dest], &[]);
    assert!(dest.join("small").exists(), "removed without --delete");
    let line = sync(&[&src, &dest], &["--delete"]);
    assert!(line.contains("2 entries moved to"), "{line}");
    assert!(!dest.join("small").exists() && !dest.join("sub/deeper").exists());
    let trash: Vec<_> = fs::read_dir(dest.join(".lcfs-trash")).unwrap().collect();
    let stamp = trash[0].as_ref().unwrap().path();
    assert_eq!(fs::read(stamp.join("small")).unwrap(), b"small file");
    assert!(stamp.join("sub/deeper/tool").exists());
    // The trash itself is left alone, and SRC is mirrored otherwise.
    fs::remove_dir_all(dest.join(".lcfs-trash")).unwrap();
    assert_trees_equal(&src, &dest);
}

#[test]
fn symlinks_planted_in_dest_are_replaced_not_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dest) = (tmp.path().join("src"), tmp.path().join("dest"));
    let outside = tmp.path().join("outside");
    fs::create_dir_all(outside.join("sub")).unwrap();
    fs::write(outside.join("big"), b"secret").unwrap();
    fs::write(outside.join("sub/odd"), b"secret too").unwrap();
    make_src(&src);
    fs::create_dir(&dest).unwrap();
    symlink(outside.join("big"), dest.join("big")).unwrap();
    symlink(outside.join("sub"), dest.join("sub")).unwrap();
    sync(&[&src, &dest], &[]);
    assert_eq!(fs::read(outside.join("big")).unwrap(), b"secret");
    assert_eq!(fs::read(outside.join("sub/odd")).unwrap(), b"secret too");
    assert_eq!(fs::read_dir(outside.join("sub")).unwrap().count(), 1);
    assert!(fs::symlink_metadata(dest.join("sub")).unwrap().is_dir());
    assert_trees_equal(&src, &dest);
    assert_no_part_files(&dest);
}

#[test]
fn setuid_is_dropped_unless_kept_and_a_single_file_syncs() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dest) = (tmp.path().join("src"), tmp.path().join("dest"));
    fs::create_dir(&src).unwrap();
    fs::write(src.join("suid"), b"x").unwrap();
    chmod(&src.join("suid"), 0o4755);
    sync(&[&src, &dest], &[]);
    assert_eq!(
        fs::metadata(dest.join("suid")).unwrap().mode() & 0o7777,
        0o755
    );
    sync(&[&src, &dest], &["--keep-setuid"]);
    assert_eq!(
        fs::metadata(dest.join("suid")).unwrap().mode() & 0o7777,
        0o4755
    );
    // One file, to a new name and into a directory.
    let one = tmp.path().join("one");
    sync(&[&src.join("suid"), &one], &[]);
    assert_eq!(fs::read(&one).unwrap(), b"x");
    sync(&[&src.join("suid"), tmp.path()], &[]);
    assert_eq!(fs::read(tmp.path().join("suid")).unwrap(), b"x");
}

#[test]
fn a_missing_src_is_an_error_naming_it_and_creates_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dest) = (tmp.path().join("nope"), tmp.path().join("dest"));
    let out = Command::new(LCFS)
        .arg("sync")
        .args([&src, &dest])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&*src.to_string_lossy()), "{stderr}");
    assert!(!dest.exists());
}
