//! Reference-model test: random sequences of inserts, gets, pins, bit flips on disk, reopens
//! and crashes, run against a real cache with a small quota and a small memory LRU.
//!
//! The model does not predict evictions exactly; it checks what must always hold:
//! - `get` returns the right bytes or nothing, never other bytes;
//! - a pinned object whose file was not damaged is always there;
//! - an object just inserted is there if it fits beside the pinned ones;
//! - the totals agree with the files on disk, and disk use is within the quota unless
//!   everything left is pinned.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use proptest::prelude::*;

use crate::store::disk_size;
use crate::{Cache, CacheConfig, CacheError, Verified};

const OBJECTS: usize = 8;
const QUOTA: u64 = 5 * 4096;

#[derive(Clone, Debug)]
enum Op {
    Insert(usize),
    Get(usize),
    Pin(usize),
    Unpin(usize),
    UnpinAll,
    FlipBit(usize, usize),
    Flush,
    Reopen,
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    let i = 0..OBJECTS;
    prop_oneof![
        6 => i.clone().prop_map(Op::Insert),
        6 => i.clone().prop_map(Op::Get),
        2 => i.clone().prop_map(Op::Pin),
        2 => i.clone().prop_map(Op::Unpin),
        1 => Just(Op::UnpinAll),
        2 => (i, any::<usize>()).prop_map(|(i, bit)| Op::FlipBit(i, bit)),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
        1 => Just(Op::Crash),
    ]
}

/// Object `i`: 1 to 3 blocks of 4 KiB, minus a little so sizes get rounded.
fn object(i: usize) -> Verified {
    let len = (i % 3 + 1) * 4096 - 100;
    Verified::hash_of(
        (0..len)
            .map(|n| (n * 31 + i * 7) as u8)
            .collect::<Vec<u8>>(),
    )
}

fn object_disk(i: usize) -> u64 {
    (i as u64 % 3 + 1) * 4096
}

struct Model {
    pinned: BTreeSet<usize>,
    /// Objects whose file was damaged since it was written.
    damaged: BTreeSet<usize>,
}

fn open(dir: &Path) -> Cache {
    Cache::open(CacheConfig {
        dir: dir.to_path_buf(),
        quota: Some(QUOTA),
        memory: 9000,
    })
    .unwrap()
}

fn apply(cache: &Cache, model: &mut Model, op: &Op) {
    match *op {
        Op::Insert(i) => {
            let pinned_before = cache.usage().pinned_bytes;
            cache.insert(&object(i)).unwrap();
            let fits = pinned_before + object_disk(i) <= QUOTA || model.pinned.contains(&i);
            assert!(
                !fits || cache.contains(object(i).hash()),
                "{i} evicted at once"
            );
        }
        Op::Get(i) => {
            let got = cache.get(object(i).hash()).unwrap();
            assert!(
                got.is_none() || got == Some(object(i)),
                "wrong bytes for {i}"
            );
            let must = model.pinned.contains(&i) && !model.damaged.contains(&i);
            assert!(!must || got.is_some(), "pinned {i} lost");
        }
        Op::Pin(i) => match cache.pin(object(i).hash()) {
            Ok(()) => drop(model.pinned.insert(i)),
            Err(CacheError::NotCached { .. }) => assert!(!cache.contains(object(i).hash())),
            Err(e) => panic!("pin: {e}"),
        },
        Op::Unpin(i) => {
            cache.unpin(object(i).hash()).unwrap();
            model.pinned.remove(&i);
        }
        Op::UnpinAll => {
            cache.unpin_all().unwrap();
            model.pinned.clear();
        }
        Op::FlipBit(i, bit) => {
            let path = cache.object_path(object(i).hash());
            if let Ok(mut bytes) = fs::read(&path) {
                let at = bit % (bytes.len() * 8);
                bytes[at / 8] ^= 1 << (at % 8);
                fs::write(&path, bytes).unwrap();
                model.damaged.insert(i);
            }
        }
        Op::Flush => cache.flush().unwrap(),
        Op::Reopen | Op::Crash => unreachable!("handled by the caller"),
    }
}

/// Forgets pins and damage of objects the cache no longer holds.
fn settle(cache: &Cache, model: &mut Model) {
    let gone = |i: &usize| !cache.contains(object(*i).hash());
    let lost: Vec<usize> = model.damaged.iter().copied().filter(gone).collect();
    for i in lost {
        model.damaged.remove(&i);
        model.pinned.remove(&i);
    }
    for &i in &model.pinned {
        assert!(
            model.damaged.contains(&i) || !gone(&i),
            "pinned {i} evicted"
        );
    }
}

fn check_disk(cache: &Cache, dir: &Path, model: &Model) {
    let usage = cache.usage();
    let (mut objects, mut disk, mut pinned) = (0, 0, 0);
    for i in 0..OBJECTS {
        let path = cache.object_path(object(i).hash());
        let Ok(meta) = fs::metadata(&path) else {
            continue;
        };
        assert_eq!(disk_size(&meta), object_disk(i));
        if !model.damaged.contains(&i) {
            assert_eq!(blake3::hash(&fs::read(&path).unwrap()), *object(i).hash());
        }
        objects += 1;
        disk += object_disk(i);
        if model.pinned.contains(&i) {
            pinned += object_disk(i);
        }
    }
    assert_eq!((usage.objects, usage.disk_bytes), (objects, disk));
    assert_eq!(usage.pinned_bytes, pinned);
    assert!(usage.disk_bytes <= QUOTA || usage.disk_bytes == usage.pinned_bytes);
    assert_eq!(fs::read_dir(dir.join("tmp")).unwrap().count(), 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn cache_never_returns_wrong_bytes(ops in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let mut cache = open(dir.path());
        let mut model = Model { pinned: BTreeSet::new(), damaged: BTreeSet::new() };
        for op in &ops {
            match op {
                Op::Reopen | Op::Crash => {
                    if let Op::Crash = op {
                        cache.inner_mark_damaged();
                    }
                    drop(cache);
                    cache = open(dir.path());
                }
                _ => apply(&cache, &mut model, op),
            }
            settle(&cache, &mut model);
            check_disk(&cache, dir.path(), &model);
        }
        for i in 0..OBJECTS {
            let got = cache.get(object(i).hash()).unwrap();
            prop_assert!(got.is_none() || got == Some(object(i)));
        }
    }
}
