//! Tests of the filesystem core over a [`MemSource`], without the kernel.

use std::ffi::OsStr;
use std::sync::Arc;

use super::*;
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
    assert_eq!(fs.opendir(f.ino, libc::O_RDONLY), Err(FsError::NotDir));
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
