//! Tests of recovery: index rebuild after damage, reconciliation after a crash,
//! hostile files in the cache directory.

use std::fs;
use std::path::Path;

use crate::tests::{obj, open, present};

fn index_is_rebuilt_after(damage: impl Fn(&Path)) {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), None, 0);
    for n in 0..20 {
        cache.insert(&obj(n)).unwrap();
    }
    let bad = obj(100);
    cache.insert(&bad).unwrap();
    let bad_path = cache.object_path(bad.hash());
    let usage = cache.usage();
    drop(cache);
    fs::write(&bad_path, b"flipped").unwrap();
    damage(&dir.path().join("index"));
    let cache = open(dir.path(), None, 0);
    for n in 0..20 {
        assert!(present(&cache, &obj(n)), "object {n} lost");
    }
    assert!(!cache.contains(bad.hash()));
    assert!(!bad_path.exists());
    assert_eq!(cache.usage().objects, usage.objects - 1);
    cache.set_root(&[1; 32], b"works").unwrap();
}

fn for_each_file(dir: &Path, f: &dyn Fn(&Path)) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            for_each_file(&path, f);
        } else {
            f(&path);
        }
    }
}

#[test]
fn garbage_index_files_are_rebuilt() {
    index_is_rebuilt_after(|index| {
        for_each_file(index, &|p| {
            let len = fs::metadata(p).unwrap().len().max(64) as usize;
            fs::write(p, vec![0xA5; len]).unwrap();
        })
    });
}

#[test]
fn truncated_index_files_are_rebuilt() {
    index_is_rebuilt_after(|index| for_each_file(index, &|p| fs::write(p, b"x").unwrap()));
}

#[test]
fn deleted_index_is_rebuilt() {
    index_is_rebuilt_after(|index| fs::remove_dir_all(index).unwrap());
}

#[test]
fn index_replaced_by_a_file_is_rebuilt() {
    index_is_rebuilt_after(|index| {
        fs::remove_dir_all(index).unwrap();
        fs::write(index, b"not a directory").unwrap();
    });
}

#[test]
fn garbage_index_value_is_a_repaired_miss() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), None, 0);
    let [a, b] = [obj(1), obj(2)];
    cache.insert(&a).unwrap();
    cache.insert(&b).unwrap();
    cache
        .owned()
        .index()
        .put_raw_entry(a.hash(), b"\xff garbage")
        .unwrap();
    assert_eq!(cache.get(a.hash()).unwrap(), None);
    assert!(!cache.contains(a.hash()));
    assert!(!cache.object_path(a.hash()).exists());
    cache.owned().index().put_raw_entry(b.hash(), b"").unwrap();
    drop(cache);
    let cache = open(dir.path(), None, 0);
    assert!(present(&cache, &b), "re-adopted from its file at open");
    assert_eq!(cache.usage().objects, 1);
}

#[test]
fn unclean_close_adopts_orphans_and_drops_dangling_entries() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), None, 0);
    let [a, b, orphan] = [obj(1), obj(2), obj(3)];
    cache.insert(&a).unwrap();
    cache.insert(&b).unwrap();
    cache.insert(&orphan).unwrap();
    let orphan_bytes = fs::read(cache.object_path(orphan.hash())).unwrap();
    let orphan_path = cache.object_path(orphan.hash());
    cache.inner_mark_damaged();
    drop(cache);
    let cache = open(dir.path(), None, 0);
    // Simulate a crash after rename but before indexing, and a lost file.
    let entry = match cache.owned().index().lookup(orphan.hash()).unwrap() {
        crate::index::Lookup::Found(e) => e,
        _ => panic!("orphan not indexed"),
    };
    cache.owned().index().remove(orphan.hash(), entry).unwrap();
    fs::remove_file(cache.object_path(b.hash())).unwrap();
    cache.inner_mark_damaged();
    drop(cache);
    assert_eq!(fs::read(&orphan_path).unwrap(), orphan_bytes);
    let cache = open(dir.path(), None, 0);
    assert!(present(&cache, &a));
    assert!(present(&cache, &orphan));
    assert!(!cache.contains(b.hash()));
    assert_eq!(cache.usage().objects, 2);
}

#[test]
fn hostile_object_directory_does_not_panic() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), None, 0);
    let a = obj(1);
    cache.insert(&a).unwrap();
    drop(cache);
    let objects = dir.path().join("objects");
    fs::write(objects.join("garbage"), b"x").unwrap();
    fs::create_dir(objects.join("zz")).unwrap();
    fs::write(objects.join("zz/also-garbage"), b"x").unwrap();
    fs::write(objects.join("00/notahash"), b"x").ok();
    fs::write(dir.path().join("tmp/stale"), b"half an object").unwrap();
    fs::remove_dir_all(dir.path().join("index")).unwrap();
    let cache = open(dir.path(), None, 0);
    assert!(present(&cache, &a));
    assert_eq!(cache.usage().objects, 1);
    assert!(!dir.path().join("tmp/stale").exists());
    assert!(!objects.join("garbage").exists());
}

#[test]
fn garbage_sled_log_is_rebuilt() {
    index_is_rebuilt_after(|index| {
        for_each_file(index, &|p| {
            if !p.ends_with("conf") {
                let len = fs::metadata(p).unwrap().len() as usize;
                let mut bytes = fs::read(p).unwrap();
                for (i, b) in bytes.iter_mut().enumerate().skip(len / 3) {
                    *b ^= (i % 251) as u8 | 1;
                }
                fs::write(p, bytes).unwrap();
            }
        })
    });
}

#[test]
fn flipped_bits_in_sled_log_are_rebuilt() {
    for seed in 0..8u64 {
        index_is_rebuilt_after(|index| {
            for_each_file(index, &|p| {
                if !p.ends_with("conf") {
                    let mut bytes = fs::read(p).unwrap();
                    if !bytes.is_empty() {
                        let at = (seed.wrapping_mul(7919) as usize * 131) % bytes.len();
                        bytes[at] ^= 1 << (seed % 8);
                        fs::write(p, bytes).unwrap();
                    }
                }
            })
        });
    }
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let dest = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &dest);
        } else {
            fs::copy(&path, &dest).unwrap();
        }
    }
}

#[test]
fn index_that_lost_its_last_writes_is_reconciled() {
    let dir = tempfile::tempdir().unwrap();
    let saved = tempfile::tempdir().unwrap();
    let [a, b] = [obj(1), obj(2)];
    let cache = open(dir.path(), None, 0);
    cache.insert(&a).unwrap();
    drop(cache);
    copy_dir(&dir.path().join("index"), saved.path());
    let cache = open(dir.path(), None, 0);
    cache.insert(&b).unwrap();
    cache.unpin(a.hash()).unwrap();
    drop(cache);
    fs::remove_dir_all(dir.path().join("index")).unwrap();
    copy_dir(saved.path(), &dir.path().join("index"));
    let cache = open(dir.path(), None, 0);
    assert!(present(&cache, &a) && present(&cache, &b));
    assert_eq!(cache.usage().objects, 2);
}
