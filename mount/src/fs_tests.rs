//! Tests of the filesystem core over a [`MemSource`], without the kernel.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::Arc;

use super::*;
use crate::inode::Invalidation;
use crate::testing::MemSource;

const KIB: u64 = 1024;

fn fs() -> (Fs<MemSource>, Arc<MemSource>) {
    let mut s = MemSource::new();
    s.file("a/f", (0..=255).collect(), 0o644)
        .file("a/big", vec![7; 1024 * 1024], 0o644)
        .symlink("a/l", "f")
        .dir("a/d", 0o700);
    let s = Arc::new(s);
    (Fs::new(s.clone(), 128 * KIB, 8 * 1024 * KIB), s)
}

async fn lookup(fs: &Fs<MemSource>, path: &str) -> Entry {
    let mut entry = Entry {
        ino: ROOT,
        attr: fs.getattr(ROOT).unwrap(),
    };
    for name in path.split('/') {
        entry = fs.lookup(entry.ino, OsStr::new(name)).await.unwrap();
    }
    entry
}

#[tokio::test]
async fn lookup_lists_each_directory_once() {
    let (fs, src) = fs();
    let f = lookup(&fs, "a/f").await;
    assert_eq!(f.attr.size, 256);
    let again = lookup(&fs, "a/f").await;
    assert_eq!(again.ino, f.ino);
    assert_eq!(src.lists(), ["", "a"]);
    assert_eq!(
        fs.lookup(ROOT, OsStr::new("nope")).await,
        Err(FsError::NotFound)
    );
    assert_eq!(
        fs.lookup(f.ino, OsStr::new("x")).await,
        Err(FsError::NotDir)
    );
}

#[tokio::test]
async fn forget_balances_lookups() {
    let (fs, _) = fs();
    let a = lookup(&fs, "a").await;
    let f = lookup(&fs, "a/f").await;
    assert_eq!(fs.stats().inodes, 3);
    fs.forget(f.ino, 1);
    assert_eq!(fs.stats().inodes, 2);
    fs.forget(a.ino, 2);
    assert_eq!(fs.stats().inodes, 1);
    assert_eq!(fs.getattr(a.ino), Err(FsError::NotFound));
}

#[tokio::test]
async fn readdir_offsets_resume() {
    let (fs, _) = fs();
    let a = lookup(&fs, "a").await;
    let view = fs.dir(a.ino).await.unwrap();
    let all: Vec<_> = view
        .items(0)
        .map(|i| (i.name.to_owned(), i.offset))
        .collect();
    let names: Vec<_> = all.iter().map(|(n, _)| n.to_str().unwrap()).collect();
    assert_eq!(names, [".", "..", "big", "d", "f", "l"]);
    for (k, (_, offset)) in all.iter().enumerate() {
        assert_eq!(*offset, k as u64 + 1);
        let rest: Vec<_> = view.items(*offset).map(|i| i.offset).collect();
        assert_eq!(rest, (*offset + 1..=all.len() as u64).collect::<Vec<_>>());
    }
    assert_eq!(view.items(u64::MAX).count(), 0);
    // The inode numbers readdir reports are the ones lookup gives.
    let f = view.items(0).find(|i| i.name == "f").unwrap().ino;
    assert_eq!(lookup(&fs, "a/f").await.ino, f);
    assert_eq!(view.items(1).next().unwrap().ino, ROOT, "..");
}

#[tokio::test]
async fn readdirplus_counts_lookups() {
    let (fs, _) = fs();
    let a = lookup(&fs, "a").await;
    let view = fs.dir(a.ino).await.unwrap();
    fs.remember(&view, &[0, 2]).unwrap();
    assert_eq!(fs.stats().inodes, 4);
    fs.forget(view.listing.ino(0), 1);
    assert_eq!(fs.stats().inodes, 3);
}

#[tokio::test]
async fn reads_clip_and_hint_sequential_readers() {
    let (fs, src) = fs();
    let big = lookup(&fs, "a/big").await;
    let fh = fs.open(big.ino, libc::O_RDONLY).unwrap();
    for i in 0..3 {
        let bytes = fs
            .read(fh, i * 128 * KIB, 128 * 1024)
            .unwrap()
            .await
            .unwrap();
        assert_eq!(bytes.len(), 128 * 1024);
    }
    let hints: Vec<_> = src.reads().iter().map(|r| r.hint.readahead / KIB).collect();
    assert_eq!(hints, [128, 256, 512]);
    // The hint never runs past the end of the file.
    let tail = fs.read(fh, 1024 * KIB - 10, 100).unwrap().await.unwrap();
    assert_eq!(tail.len(), 10);
    assert_eq!(src.reads().last().unwrap().hint.readahead, 0);
    assert!(fs
        .read(fh, 5 * 1024 * KIB, 100)
        .unwrap()
        .await
        .unwrap()
        .is_empty());
    fs.release(fh);
    assert_eq!(fs.read(fh, 0, 1).err(), Some(FsError::BadHandle));
    assert_eq!(fs.stats().open_files, 0);
}

#[tokio::test]
async fn opening_for_writing_is_refused() {
    let (fs, _) = fs();
    let f = lookup(&fs, "a/f").await;
    for flags in [
        libc::O_WRONLY,
        libc::O_RDWR,
        libc::O_RDONLY | libc::O_TRUNC,
        libc::O_RDONLY | libc::O_APPEND,
    ] {
        assert_eq!(fs.open(f.ino, flags), Err(FsError::ReadOnly), "{flags:#o}");
    }
    assert_eq!(fs.access(f.ino, libc::W_OK), Err(FsError::ReadOnly));
    assert_eq!(fs.access(f.ino, libc::R_OK | libc::X_OK), Ok(()));
    let d = lookup(&fs, "a/d").await;
    assert_eq!(fs.open(d.ino, libc::O_RDONLY), Err(FsError::IsDir));
}

#[tokio::test]
async fn symlinks_read_their_target() {
    let (fs, _) = fs();
    let l = lookup(&fs, "a/l").await;
    assert_eq!(fs.readlink(l.ino).unwrap(), b"f");
    assert_eq!(fs.readlink(ROOT), Err(FsError::NotSymlink));
}

#[tokio::test]
async fn xattrs_probe_size_and_check_the_buffer() {
    let (fs, _) = fs();
    let f = lookup(&fs, "a/f").await;
    let name = OsStr::new("user.lcfs.kind");
    assert_eq!(fs.getxattr(f.ino, name, 0), Ok(Xattr::Size(4)));
    assert_eq!(fs.getxattr(f.ino, name, 3), Err(FsError::Range));
    assert_eq!(
        fs.getxattr(f.ino, name, 4),
        Ok(Xattr::Data(b"file".to_vec()))
    );
    assert_eq!(
        fs.getxattr(f.ino, OsStr::new("user.nope"), 0),
        Err(FsError::NoXattr)
    );
    let list = b"user.lcfs.kind\0user.lcfs.size\0".to_vec();
    assert_eq!(fs.listxattr(f.ino, 0), Ok(Xattr::Size(list.len() as u32)));
    assert_eq!(fs.listxattr(f.ino, 1), Err(FsError::Range));
    assert_eq!(fs.listxattr(f.ino, 100), Ok(Xattr::Data(list)));
    let Ok(Xattr::Data(root)) = fs.listxattr(ROOT, 1000) else {
        panic!()
    };
    assert!(root.windows(16).any(|w| w == b"user.lcfs.source"));
}

// ---------------------------------------------------------------- new versions

/// A tree with one entry of each kind of change to come.
fn versioned() -> (Fs<MemSource>, Arc<MemSource>) {
    let mut s = MemSource::new();
    s.file("keep/a", b"unchanged".to_vec(), 0o644)
        .file("keep/deep/b", b"deep".to_vec(), 0o644)
        .file("chg", b"version one".to_vec(), 0o644)
        .file("del", b"deleted".to_vec(), 0o644)
        .file("ren-old", b"renamed".to_vec(), 0o644)
        .file("mode.sh", b"#!/bin/sh\n".to_vec(), 0o644)
        .symlink("link", "chg")
        .file("sub/x", b"x1".to_vec(), 0o644);
    let s = Arc::new(s);
    (Fs::new(s.clone(), 128 * KIB, 8 * 1024 * KIB), s)
}

/// Every kind of change at once, as a publisher would make them.
fn publish_changes(s: &MemSource) -> u64 {
    s.publish(|t| {
        t.file("chg", b"version two, longer".to_vec(), 0o644)
            .remove("del")
            .rename("ren-old", "ren-new")
            .chmod("mode.sh", 0o755)
            .symlink("link", "keep/a")
            .dir("made", 0o755)
            .file("sub/x", b"x2".to_vec(), 0o644);
    })
}

fn entries(invalidations: &[Invalidation]) -> Vec<(u64, String)> {
    let mut v: Vec<_> = invalidations
        .iter()
        .filter_map(|i| match i {
            Invalidation::Entry { parent, name } => {
                Some((*parent, name.to_string_lossy().into_owned()))
            }
            _ => None,
        })
        .collect();
    v.sort();
    v
}

async fn read_all(fs: &Fs<MemSource>, fh: u64) -> Result<Vec<u8>, FsError> {
    fs.read(fh, 0, 1 << 20)?.await
}

#[tokio::test]
async fn a_new_version_invalidates_what_changed_and_nothing_else() {
    let (fs, src) = versioned();
    let names = [
        "keep/a",
        "keep/deep/b",
        "chg",
        "del",
        "ren-old",
        "mode.sh",
        "link",
        "sub/x",
    ];
    let mut before = HashMap::new();
    for n in names {
        before.insert(n, lookup(&fs, n).await);
    }
    let lists_before = src.lists().len();
    let v = publish_changes(&src);
    let inv = fs.switch(src.next_version(1).await.unwrap()).await;
    assert_eq!(fs.version(), v);
    // Only the root and sub/ were listed: keep/ is the same subtree, recognised at its top.
    assert_eq!(src.lists()[lists_before..], ["", "sub"]);
    let sub = lookup(&fs, "sub").await.ino;
    let mut want = vec![
        (ROOT, "chg".to_string()),
        (ROOT, "del".into()),
        (ROOT, "link".into()),
        (ROOT, "made".into()),
        (ROOT, "ren-new".into()),
        (ROOT, "ren-old".into()),
        (sub, "x".into()),
    ];
    want.sort();
    assert_eq!(entries(&inv), want);
    assert!(inv.contains(&Invalidation::Data(ROOT)) && inv.contains(&Invalidation::Data(sub)));
    let mode = before["mode.sh"].ino;
    assert!(inv.contains(&Invalidation::Attr(mode)));
    // Unchanged files (and the chmodded one) keep their inode numbers; changed ones do not.
    for n in ["keep/a", "keep/deep/b", "mode.sh"] {
        assert_eq!(lookup(&fs, n).await.ino, before[n].ino, "{n}");
    }
    assert_eq!(fs.getattr(mode).unwrap().mode, 0o755);
    for n in ["chg", "link", "sub/x"] {
        assert_ne!(lookup(&fs, n).await.ino, before[n].ino, "{n}");
    }
    assert_eq!(
        fs.lookup(ROOT, OsStr::new("del")).await,
        Err(FsError::NotFound)
    );
    assert_eq!(
        fs.lookup(ROOT, OsStr::new("ren-old")).await,
        Err(FsError::NotFound)
    );
    let link = lookup(&fs, "link").await.ino;
    assert_eq!(fs.readlink(link).unwrap(), b"keep/a");
    lookup(&fs, "ren-new").await;
    lookup(&fs, "made").await;
}

#[tokio::test]
async fn handles_keep_the_version_they_opened() {
    let (fs, src) = versioned();
    let chg = lookup(&fs, "chg").await.ino;
    let keep = lookup(&fs, "keep/a").await.ino;
    let old = fs.open(chg, libc::O_RDONLY).unwrap();
    let unchanged = fs.open(keep, libc::O_RDONLY).unwrap();
    publish_changes(&src);
    fs.switch(src.next_version(1).await.unwrap()).await;
    // The old handle reads the old bytes, and says it is superseded.
    assert_eq!(read_all(&fs, old).await.unwrap(), b"version one");
    assert!(src.reads().last().unwrap().hint.superseded);
    // A new open sees the new version.
    let new_ino = lookup(&fs, "chg").await.ino;
    let new = fs.open(new_ino, libc::O_RDONLY).unwrap();
    assert_eq!(read_all(&fs, new).await.unwrap(), b"version two, longer");
    assert!(!src.reads().last().unwrap().hint.superseded);
    // Once the source cannot get the old bytes, the old handle fails with ESTALE at once;
    // the handle of the unchanged file goes on reading.
    src.forget_old();
    let e = read_all(&fs, old).await.unwrap_err();
    assert_eq!(e.errno(), libc::ESTALE, "{e}");
    assert_eq!(read_all(&fs, unchanged).await.unwrap(), b"unchanged");
    assert!(!src.reads().last().unwrap().hint.superseded);
    // Even an open of the old inode (an entry the kernel has not dropped yet) is superseded.
    let late = fs.open(chg, libc::O_RDONLY).unwrap();
    assert_eq!(read_all(&fs, late).await.unwrap_err().errno(), libc::ESTALE);
}

#[tokio::test(start_paused = true)]
async fn a_lookup_racing_with_a_move_answers_from_the_new_version() {
    let (fs, src) = versioned();
    src.set_fault(
        "",
        crate::testing::Fault::slow(std::time::Duration::from_secs(1)),
    );
    let (found, ()) = tokio::join!(fs.lookup(ROOT, OsStr::new("chg")), async {
        publish_changes(&src);
        let v = src.next_version(1).await.unwrap();
        fs.switch(v).await;
    });
    let fh = fs.open(found.unwrap().ino, libc::O_RDONLY).unwrap();
    assert_eq!(read_all(&fs, fh).await.unwrap(), b"version two, longer");
}

#[tokio::test]
async fn a_move_to_the_same_content_changes_nothing() {
    let (fs, src) = versioned();
    let a = lookup(&fs, "keep/a").await;
    let lists = src.lists().len();
    src.publish(|_| {});
    let inv = fs.switch(src.next_version(1).await.unwrap()).await;
    assert!(inv.is_empty(), "{inv:?}");
    assert_eq!(src.lists().len(), lists);
    assert_eq!(lookup(&fs, "keep/a").await.ino, a.ino);
    assert_eq!(fs.version(), 2);
}
