//! Tests of the operator's commands on a cache (`lcfs cache status|verify|gc|clear`):
//! hostile object files are dropped by verify and never panic it; gc and status work from a
//! process that does not own the cache, verify and clear refuse there and name the owner.

use std::fs;

use proptest::prelude::*;

use crate::tests::{obj, open, present};
use crate::{Cache, CacheError, VerifyReport};

fn verify(cache: &Cache) -> VerifyReport {
    let mut seen = 0;
    let report = cache.verify(&mut |n| seen += n).unwrap();
    assert_eq!(seen, report.checked_bytes, "progress told every byte read");
    report
}

#[test]
fn verify_drops_damaged_files_and_repairs_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), None, 0);
    for n in 0..8 {
        cache.insert(&obj(n)).unwrap();
    }
    cache.pin(obj(1).hash()).unwrap();
    let path = |n| cache.object_path(obj(n).hash());
    // Bit flipped (and pinned), truncated, emptied, replaced, deleted.
    let mut flipped = obj(1).to_vec();
    flipped[100] ^= 4;
    fs::write(path(1), flipped).unwrap();
    fs::write(path(2), &obj(2)[..4095]).unwrap();
    fs::write(path(3), b"").unwrap();
    fs::write(path(4), &obj(40)[..]).unwrap();
    fs::remove_file(path(5)).unwrap();
    // Good and bad files the index does not list.
    let orphan = |n: u32, bytes: &[u8]| {
        let p = cache.object_path(obj(n).hash());
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, bytes).unwrap();
    };
    orphan(20, &obj(20));
    orphan(21, b"not it");

    let report = verify(&cache);
    assert_eq!(report.checked, 9, "{report:?}");
    assert_eq!(
        report.dropped, 5,
        "flipped, truncated, emptied, replaced, orphan: {report:?}"
    );
    assert!(report.dropped_bytes > 0);
    assert_eq!(report.forgotten, 1, "the deleted file's entry: {report:?}");
    assert_eq!(report.adopted, 1, "the good orphan: {report:?}");
    for n in [0, 6, 7, 20] {
        assert!(present(&cache, &obj(n)), "good object {n} kept");
    }
    for n in 1..=5 {
        assert!(!cache.contains(obj(n).hash()), "damaged object {n} dropped");
        assert_eq!(cache.get(obj(n).hash()).unwrap(), None);
    }
    assert!(!cache.object_path(obj(21).hash()).exists());
    let usage = cache.usage();
    assert_eq!((usage.objects, usage.pinned_bytes), (4, 0), "{usage:?}");
    // A second pass finds nothing to do.
    let again = verify(&cache);
    assert_eq!(
        (again.checked, again.dropped, again.forgotten, again.adopted),
        (4, 0, 0, 0)
    );
    // The totals it left agree with a reopen's count.
    drop(cache);
    assert_eq!(open(dir.path(), None, 0).usage(), usage);
}

#[test]
fn verify_replaces_an_undecodable_entry_over_a_good_file() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), None, 0);
    cache.insert(&obj(1)).unwrap();
    cache.insert(&obj(2)).unwrap();
    let owned = cache.owned();
    owned.index().put_raw_entry(obj(1).hash(), b"junk").unwrap();
    owned.index().put_raw_entry(obj(2).hash(), b"").unwrap();
    fs::write(cache.object_path(obj(2).hash()), b"damaged").unwrap();
    drop(owned);
    let report = verify(&cache);
    assert_eq!((report.adopted, report.dropped), (1, 1), "{report:?}");
    assert!(present(&cache, &obj(1)));
    assert!(!cache.contains(obj(2).hash()));
}

#[test]
fn verify_and_clear_refuse_in_a_client_naming_the_owner() {
    let dir = tempfile::tempdir().unwrap();
    let owner = open(dir.path(), None, 0);
    let client = open(dir.path(), None, 0);
    assert!(!client.is_owner());
    assert_eq!(client.owner_pid(), Some(std::process::id() as i32));
    assert_eq!(owner.owner_pid(), None);
    let pid = std::process::id().to_string();
    for e in [
        client.verify(&mut |_| {}).unwrap_err(),
        client.clear(false).unwrap_err(),
    ] {
        assert!(
            matches!(&e, CacheError::InUse { pid: p, .. } if *p == pid),
            "{e}"
        );
        assert!(e.to_string().contains(&format!("process {pid}")), "{e}");
    }
}

#[test]
fn gc_evicts_unpinned_objects_from_any_process_and_removes_stale_temps() {
    let dir = tempfile::tempdir().unwrap();
    let owner = open(dir.path(), None, 0);
    let client = open(dir.path(), None, 0);
    for n in 0..6 {
        client.insert(&obj(n)).unwrap();
    }
    client.pin(obj(0).hash()).unwrap();
    let one = owner.usage().disk_bytes / 6;
    // Oldest first: 1 and 2 go, for 4 objects' worth.
    let left = client.gc(4 * one).unwrap();
    assert_eq!(left.objects, 4);
    assert!(!owner.contains(obj(1).hash()) && !owner.contains(obj(2).hash()));
    // A temp file of a process that is gone (above any pid_max) goes too.
    let stale = dir.path().join("tmp/2147483646-0");
    fs::write(&stale, b"x").unwrap();
    let left = client.gc(0).unwrap();
    assert_eq!((left.objects, left.disk_bytes), (1, left.pinned_bytes));
    assert!(present(&client, &obj(0)), "pinned stays");
    assert!(!stale.exists());
    assert_eq!(owner.usage(), left);
}

#[test]
fn status_reports_usage_quota_and_roots_to_any_process() {
    let dir = tempfile::tempdir().unwrap();
    let owner = open(dir.path(), Some(1 << 30), 0);
    let client = open(dir.path(), None, 0);
    owner.insert(&obj(1)).unwrap();
    owner.set_root(&[1; 32], b"one").unwrap();
    client.set_root(&[2; 32], b"two").unwrap();
    for cache in [&owner, &client] {
        let status = cache.status().unwrap();
        assert_eq!(status.usage, owner.usage());
        assert_eq!(status.quota, Some(1 << 30), "the owner's quota");
        assert_eq!(
            status.roots,
            vec![([1; 32], b"one".to_vec()), ([2; 32], b"two".to_vec())]
        );
    }
    assert!(client.free_bytes().is_some());
}

#[test]
fn clear_removes_objects_and_orphans_but_keeps_roots() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), None, 1 << 20);
    for n in 0..4 {
        cache.insert(&obj(n)).unwrap();
    }
    cache.pin(obj(0).hash()).unwrap();
    cache.set_root(&[1; 32], b"root").unwrap();
    let orphan = cache.object_path(obj(9).hash());
    fs::create_dir_all(orphan.parent().unwrap()).unwrap();
    fs::write(&orphan, b"left by an insert that failed halfway").unwrap();
    let left = cache.clear(true).unwrap();
    assert_eq!(left.objects, 1);
    assert!(present(&cache, &obj(0)) && !cache.contains(obj(1).hash()));
    assert!(!orphan.exists());
    let left = cache.clear(false).unwrap();
    assert_eq!(left, crate::Usage::default());
    assert_eq!(
        cache.get(obj(0).hash()).unwrap(),
        None,
        "not even from memory"
    );
    assert_eq!(
        cache.get_root(&[1; 32]).unwrap().as_deref(),
        Some(&b"root"[..])
    );
    // The index and the files agree after a reopen.
    drop(cache);
    let cache = open(dir.path(), None, 0);
    assert_eq!(cache.usage(), crate::Usage::default());
    cache.insert(&obj(5)).unwrap();
    assert!(present(&cache, &obj(5)));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Whatever is done to an object file (cut anywhere, any bit flipped, bytes appended),
    /// verify drops it and keeps the others, without panicking.
    #[test]
    fn verify_drops_any_damaged_file(cut in 0usize..4096, bit in 0usize..4096 * 8, tail: Vec<u8>, how in 0u8..3) {
        let dir = tempfile::tempdir().unwrap();
        let cache = open(dir.path(), None, 0);
        cache.insert(&obj(1)).unwrap();
        cache.insert(&obj(2)).unwrap();
        let mut bytes = obj(1).to_vec();
        match how {
            0 => bytes.truncate(cut),
            1 => bytes[bit / 8] ^= 1 << (bit % 8),
            _ => bytes.extend_from_slice(if tail.is_empty() { &[0] } else { &tail }),
        }
        fs::write(cache.object_path(obj(1).hash()), bytes).unwrap();
        let report = verify(&cache);
        prop_assert_eq!((report.checked, report.dropped), (2, 1));
        prop_assert!(!cache.contains(obj(1).hash()));
        prop_assert!(present(&cache, &obj(2)));
    }
}
