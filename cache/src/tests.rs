//! Tests of the whole cache against a real directory: round trips, damaged object files,
//! memory bound, quota and pins, persistence across reopen.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::{Cache, CacheConfig, CacheError, Hash, Verified};

pub(crate) fn open(dir: &Path, quota: Option<u64>, memory: usize) -> Cache {
    Cache::open(CacheConfig {
        dir: dir.to_path_buf(),
        quota,
        memory,
    })
    .unwrap()
}

/// A 4 KiB object, distinct for each `n`.
pub(crate) fn obj(n: u32) -> Verified {
    let mut bytes = vec![0u8; 4096];
    bytes[..4].copy_from_slice(&n.to_le_bytes());
    Verified::hash_of(bytes)
}

/// Disk use of one 4 KiB object on this file system.
fn unit(dir: &Path) -> u64 {
    let cache = open(&dir.join("probe"), None, 0);
    cache.insert(&obj(u32::MAX)).unwrap();
    cache.usage().disk_bytes
}

pub(crate) fn present(cache: &Cache, o: &Verified) -> bool {
    cache.get(o.hash()).unwrap().as_ref() == Some(o)
}

#[test]
fn insert_get_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), None, 1 << 20);
    let a = Verified::hash_of(&b"hello"[..]);
    assert!(!cache.contains(a.hash()));
    assert_eq!(cache.get(a.hash()).unwrap(), None);
    cache.insert(&a).unwrap();
    cache.insert(&a).unwrap();
    assert!(cache.contains(a.hash()));
    assert_eq!(cache.get(a.hash()).unwrap(), Some(a.clone()));
    assert_eq!(fs::read(cache.object_path(a.hash())).unwrap(), b"hello");
    let usage = cache.usage();
    assert_eq!((usage.objects, usage.pinned_bytes), (1, 0));
    assert!(usage.disk_bytes >= 4096);
    assert_eq!(cache.dir(), dir.path());
    let mode = fs::metadata(dir.path().join("objects"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
}

#[test]
fn new_directory_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/cache");
    let _cache = open(&path, None, 0);
    let mode = fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
}

fn damaged_file_is_a_miss(damage: impl Fn(&Path)) {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), None, 0);
    let a = obj(1);
    cache.insert(&a).unwrap();
    let path = cache.object_path(a.hash());
    damage(&path);
    assert_eq!(cache.get(a.hash()).unwrap(), None);
    assert!(!path.exists());
    assert!(!cache.contains(a.hash()));
    assert_eq!(cache.usage().objects, 0);
    assert_eq!(cache.usage().disk_bytes, 0);
    cache.insert(&a).unwrap();
    assert!(present(&cache, &a));
}

#[test]
fn get_rehashes_flipped_bit() {
    damaged_file_is_a_miss(|path| {
        let mut bytes = fs::read(path).unwrap();
        bytes[1000] ^= 0x10;
        fs::write(path, bytes).unwrap();
    });
}

#[test]
fn truncated_file_is_a_miss() {
    damaged_file_is_a_miss(|path| {
        let bytes = fs::read(path).unwrap();
        fs::write(path, &bytes[..100]).unwrap();
    });
}

#[test]
fn vanished_file_is_a_miss() {
    damaged_file_is_a_miss(|path| fs::remove_file(path).unwrap());
}

#[test]
fn memory_hit_needs_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), None, 1 << 20);
    let a = obj(1);
    cache.insert(&a).unwrap();
    fs::write(cache.object_path(a.hash()), b"junk").unwrap();
    assert!(present(&cache, &a), "hot object served from memory");
}

#[test]
fn memory_lru_is_bounded_in_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), None, 10_000);
    for n in 0..10 {
        cache.insert(&obj(n)).unwrap();
        assert!(cache.memory_bytes() <= 10_000);
    }
    assert_eq!(cache.memory_bytes(), 8192);
    for n in 0..10 {
        assert!(present(&cache, &obj(n)));
        assert!(cache.memory_bytes() <= 10_000);
    }
}

#[test]
fn quota_evicts_least_recently_used() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit(dir.path());
    let cache = open(&dir.path().join("c"), Some(3 * unit), 0);
    let [a, b, c, d] = [obj(1), obj(2), obj(3), obj(4)];
    for o in [&a, &b, &c] {
        cache.insert(o).unwrap();
    }
    assert!(present(&cache, &a));
    cache.insert(&d).unwrap();
    assert!(!cache.contains(b.hash()));
    assert!(!cache.object_path(b.hash()).exists());
    for o in [&a, &c, &d] {
        assert!(present(&cache, o));
    }
    assert_eq!(cache.usage().disk_bytes, 3 * unit);
}

#[test]
fn quota_never_evicts_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit(dir.path());
    let cache = open(&dir.path().join("c"), Some(2 * unit), 0);
    let a = obj(1);
    cache.insert(&a).unwrap();
    cache.pin(&a.hash().clone()).unwrap();
    for n in 2..10 {
        cache.insert(&obj(n)).unwrap();
        assert!(cache.usage().disk_bytes <= 2 * unit);
    }
    assert!(present(&cache, &a));
    assert!(present(&cache, &obj(9)));
    assert!(!cache.contains(obj(8).hash()));
    assert_eq!(cache.usage().pinned_bytes, unit);
}

/// What an insert does when the file system says it is full: the least recently used
/// unpinned objects go, an eighth of the cache at least, and never a pinned one.
#[test]
fn making_room_evicts_the_oldest_unpinned_objects() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), None, 0);
    for n in 0..16 {
        cache.insert(&obj(n)).unwrap();
    }
    cache.pin(obj(0).hash()).unwrap();
    let before = cache.usage().disk_bytes;
    cache.owned().make_room(1).unwrap();
    let after = cache.usage().disk_bytes;
    assert!(before - after >= before / 8, "{before} -> {after}");
    assert!(present(&cache, &obj(0)), "the pinned object stays");
    assert!(
        !cache.contains(obj(1).hash()),
        "the oldest unpinned object goes"
    );
    assert!(present(&cache, &obj(15)), "the newest stays");
}

#[test]
fn pin_unpin() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit(dir.path());
    let cache = open(&dir.path().join("c"), Some(unit), 0);
    let missing = obj(0);
    assert!(matches!(
        cache.pin(missing.hash()),
        Err(CacheError::NotCached { .. })
    ));
    cache.unpin(missing.hash()).unwrap();
    let [a, b, c] = [obj(1), obj(2), obj(3)];
    cache.insert(&a).unwrap();
    cache.pin(a.hash()).unwrap();
    cache.pin(a.hash()).unwrap();
    cache.insert(&b).unwrap();
    cache.pin(b.hash()).unwrap_err();
    assert_eq!(cache.usage().pinned_bytes, unit);
    cache.unpin(a.hash()).unwrap();
    assert_eq!(cache.usage().pinned_bytes, 0);
    assert!(cache.contains(a.hash()));
    cache.insert(&b).unwrap();
    cache.pin(b.hash()).unwrap();
    cache.insert(&c).unwrap();
    cache.pin(c.hash()).unwrap_err();
    assert!(cache.contains(b.hash()) && !cache.contains(a.hash()));
    cache.unpin_all().unwrap();
    assert_eq!(cache.usage().pinned_bytes, 0);
    assert_eq!(cache.usage().objects, 1);
}

#[test]
fn pins_exceeding_quota_stay_until_unpinned() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit(dir.path());
    let cache = open(&dir.path().join("c"), None, 0);
    for n in 1..=4 {
        cache.insert(&obj(n)).unwrap();
        cache.pin(obj(n).hash()).unwrap();
    }
    drop(cache);
    let cache = open(&dir.path().join("c"), Some(2 * unit), 0);
    assert_eq!(cache.usage().objects, 4);
    assert_eq!(cache.usage().pinned_bytes, 4 * unit);
    cache.unpin_all().unwrap();
    assert_eq!(cache.usage().disk_bytes, 2 * unit);
    assert!(present(&cache, &obj(3)) && present(&cache, &obj(4)));
}

#[test]
fn roots_and_objects_persist_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), None, 1 << 20);
    cache.set_root(&[1; 32], b"first").unwrap();
    cache.set_root(&[1; 32], b"second").unwrap();
    cache.set_root(&[2; 32], b"other").unwrap();
    for n in 0..5 {
        cache.insert(&obj(n)).unwrap();
    }
    cache.pin(obj(0).hash()).unwrap();
    let usage = cache.usage();
    drop(cache);
    let cache = open(dir.path(), None, 1 << 20);
    assert_eq!(
        cache.get_root(&[1; 32]).unwrap().as_deref(),
        Some(&b"second"[..])
    );
    assert_eq!(
        cache.get_root(&[2; 32]).unwrap().as_deref(),
        Some(&b"other"[..])
    );
    assert_eq!(cache.get_root(&[3; 32]).unwrap(), None);
    assert_eq!(cache.usage(), usage);
    for n in 0..5 {
        assert!(present(&cache, &obj(n)));
    }
}

#[test]
fn lru_order_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit(dir.path());
    let path = dir.path().join("c");
    let cache = open(&path, None, 1 << 20);
    for n in 1..=3 {
        cache.insert(&obj(n)).unwrap();
    }
    assert!(present(&cache, &obj(1)));
    drop(cache);
    let cache = open(&path, Some(3 * unit), 0);
    cache.insert(&obj(4)).unwrap();
    assert!(!cache.contains(obj(2).hash()));
    assert!(cache.contains(obj(1).hash()));
}

#[test]
fn huge_object_over_quota_is_evicted_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), Some(1000), 1 << 20);
    let big = Verified::hash_of(vec![1u8; 10_000]);
    cache.insert(&big).unwrap();
    assert_eq!(cache.usage().disk_bytes, 0);
    assert!(!cache.contains(big.hash()));
    assert_eq!(cache.get(big.hash()).unwrap(), None);
}

#[test]
fn concurrent_use_keeps_totals_right() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), None, 20_000);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let cache = cache.clone();
            std::thread::spawn(move || {
                for n in 0..50u32 {
                    let o = obj(n % 30);
                    cache.insert(&o).unwrap();
                    assert_eq!(
                        cache.get(o.hash()).unwrap().as_ref(),
                        Some(&o),
                        "thread {t}"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(cache.usage().objects, 30);
    let on_disk: u64 = (0..30)
        .map(|n| fs::metadata(cache.object_path(obj(n).hash())).is_ok() as u64)
        .sum();
    assert_eq!(on_disk, 30);
    assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
}

#[test]
fn recency_batches_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), None, 1 << 20);
    let a = obj(1);
    cache.insert(&a).unwrap();
    for _ in 0..crate::owned::RECENCY_BATCH + 1 {
        cache.get(a.hash()).unwrap();
    }
    cache.flush().unwrap();
    let hash: Hash = *a.hash();
    match cache.owned().index().lookup(&hash).unwrap() {
        crate::index::Lookup::Found(e) => assert!(e.last_use > crate::owned::RECENCY_BATCH as u64),
        _ => panic!("entry lost"),
    }
}

#[test]
fn cache_is_send_sync_and_clone() {
    fn check<T: Send + Sync + Clone + 'static>() {}
    check::<Cache>();
    check::<Verified>();
}

#[test]
fn an_existing_cache_directory_is_made_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("c");
    std::fs::create_dir(&c).unwrap();
    std::fs::set_permissions(&c, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cache = Cache::open(CacheConfig::new(&c)).unwrap();
    drop(cache);
    for d in [c.clone(), c.join("index")] {
        let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", d.display());
    }
}

#[test]
fn a_cache_directory_of_another_user_is_refused() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test chowns a directory: run it as root"
    );
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("theirs");
    std::fs::create_dir(&c).unwrap();
    std::os::unix::fs::chown(&c, Some(65534), Some(65534)).unwrap();
    let e = Cache::open(CacheConfig::new(&c)).err().expect("refused");
    assert!(matches!(e, CacheError::Foreign { owner: 65534, .. }), "{e}");
    assert!(e.to_string().contains("--cache"), "{e}");
}
