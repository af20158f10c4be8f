//! `lcfs cache unpin`: the objects of a channel's tree, or of some paths in it, found in the
//! cache alone, walking down from the channel's remembered root record; so unpinning needs
//! neither the server nor the network (DESIGN.md section 5: pins stay until unpinned).
//!
//! It names the objects `lcfs prefetch --pin` pins for the same paths: each directory at or
//! below a path, and each file's index objects and blocks. What is not cached is not pinned
//! either and is skipped; but a path can only be resolved through cached directories.
//!
//! Invariants: every byte read comes from [`Cache::get`], so it is verified against the hash
//! that named it; decoding is checked; the walk lists each directory object once and is
//! bounded in entries and depth by [`WalkLimits`], and a file's leaves by
//! [`MAX_FILE_BLOCKS`], so a hostile tree costs bounded time and memory.
//!
//! Pins are not counted: an object shared with another pinned path or channel (the same
//! block in two files) is unpinned with this one. Pin that path again to keep it.

use std::collections::HashSet;

use crate::wire::object::ObjectHash;
use lcfs_cache::{Cache, CacheError};

use crate::fetch::tree::{WalkLimits, MAX_FILE_BLOCKS};
use crate::wire::object::{Content, Directory, EntryKind, FileIndex, FileRef, ObjectRef};

/// Why the cached tree could not be walked.
#[derive(Debug, thiserror::Error)]
pub enum CachedWalkError {
    #[error("{path:?} is not in the channel's cached tree")]
    NotFound { path: String },
    #[error(
        "cannot resolve {path:?}: directory object {hash} on the way is not in the cache; \
         unpin the whole channel (no path), or `lcfs cache unpin --all`"
    )]
    NotCached { path: String, hash: String },
    #[error("cached {what} does not decode ({reason}); run `lcfs cache verify`")]
    Invalid { what: String, reason: String },
    #[error("refused to walk the cached tree: {0}")]
    TooBig(String),
    #[error("{0}")]
    Cache(#[from] CacheError),
}

/// The distinct cached objects at and below each of `subpaths` ("" or none: the whole tree)
/// of the tree whose root directory is `root` (only its hash is used).
pub fn cached_objects(
    cache: &Cache,
    root: ObjectRef,
    subpaths: &[String],
) -> Result<Vec<ObjectHash>, CachedWalkError> {
    let mut walk = Walk {
        cache,
        limits: WalkLimits::default(),
        seen: HashSet::new(),
        objects: Vec::new(),
        entries: 0,
    };
    let whole = [String::new()];
    let subpaths = if subpaths.is_empty() {
        &whole[..]
    } else {
        subpaths
    };
    for path in subpaths {
        match resolve(cache, root, path)? {
            EntryKind::Dir(r) => walk.below(r)?,
            EntryKind::File(f) => walk.file(&f)?,
            EntryKind::Symlink(_) => {}
        }
    }
    Ok(walk.objects)
}

/// The kind of the entry at `path`; the root directory for "".
fn resolve(cache: &Cache, root: ObjectRef, path: &str) -> Result<EntryKind, CachedWalkError> {
    let not_found = || CachedWalkError::NotFound {
        path: path.to_owned(),
    };
    let mut at = EntryKind::Dir(root);
    for name in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
        let EntryKind::Dir(r) = at else {
            return Err(not_found());
        };
        let Some(dir) = directory(cache, r)? else {
            return Err(CachedWalkError::NotCached {
                path: path.to_owned(),
                hash: r.hash.to_hex().to_string(),
            });
        };
        at = dir.get(name.as_bytes()).ok_or_else(not_found)?.kind.clone();
    }
    Ok(at)
}

/// A cached directory, decoded; `None` if it is not cached.
fn directory(cache: &Cache, r: ObjectRef) -> Result<Option<Directory>, CachedWalkError> {
    let Some(v) = cache.get(r.hash.raw())? else {
        return Ok(None);
    };
    Directory::decode(&v)
        .map(Some)
        .map_err(|e| CachedWalkError::Invalid {
            what: format!("directory {}", r.hash),
            reason: e.to_string(),
        })
}

struct Walk<'a> {
    cache: &'a Cache,
    limits: WalkLimits,
    seen: HashSet<ObjectHash>,
    objects: Vec<ObjectHash>,
    entries: u64,
}

impl Walk<'_> {
    fn add(&mut self, h: ObjectHash) -> bool {
        let new = self.seen.insert(h);
        if new {
            self.objects.push(h);
        }
        new
    }

    /// Directory `start` and everything below it that is cached, each directory once.
    fn below(&mut self, start: ObjectRef) -> Result<(), CachedWalkError> {
        if !self.add(start.hash) {
            return Ok(());
        }
        let mut level = vec![start];
        let mut depth = 0;
        while !level.is_empty() {
            let mut next = Vec::new();
            for r in level {
                let Some(dir) = directory(self.cache, r)? else {
                    continue;
                };
                self.entries += dir.entries.len() as u64;
                if self.entries > self.limits.max_entries {
                    let why = format!("more than {} entries", self.limits.max_entries);
                    return Err(CachedWalkError::TooBig(why));
                }
                for entry in dir.entries {
                    match entry.kind {
                        EntryKind::Dir(child) if self.add(child.hash) => next.push(child),
                        EntryKind::File(f) => self.file(&f)?,
                        _ => {}
                    }
                }
            }
            depth += 1;
            if !next.is_empty() && depth >= self.limits.max_depth {
                let why = format!("more than {} levels", self.limits.max_depth);
                return Err(CachedWalkError::TooBig(why));
            }
            level = next;
        }
        Ok(())
    }

    /// A file's index objects and blocks, as far as its index is cached.
    fn file(&mut self, f: &FileRef) -> Result<(), CachedWalkError> {
        let index = match &f.content {
            Content::Inline(_) => return Ok(()),
            Content::Block(h) => {
                self.add(*h);
                return Ok(());
            }
            Content::Index { index, first_leaf } => {
                self.add(*first_leaf);
                *index
            }
        };
        if !self.add(index.hash) {
            return Ok(());
        }
        let mut leaves = 0u64;
        match self.index(&index.hash)? {
            None => {}
            Some(FileIndex::Leaves(l)) => self.leaves(&l, &mut leaves)?,
            Some(FileIndex::Pages(pages)) => {
                for page in pages {
                    if !self.add(page) {
                        continue;
                    }
                    if let Some(FileIndex::Leaves(l)) = self.index(&page)? {
                        self.leaves(&l, &mut leaves)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn leaves(&mut self, l: &[ObjectHash], count: &mut u64) -> Result<(), CachedWalkError> {
        *count += l.len() as u64;
        if *count > MAX_FILE_BLOCKS {
            let why = format!("a file with more than {MAX_FILE_BLOCKS} blocks");
            return Err(CachedWalkError::TooBig(why));
        }
        for h in l {
            self.add(*h);
        }
        Ok(())
    }

    fn index(&self, h: &ObjectHash) -> Result<Option<FileIndex>, CachedWalkError> {
        let Some(v) = self.cache.get(h.raw())? else {
            return Ok(None);
        };
        FileIndex::decode(&v)
            .map(Some)
            .map_err(|e| CachedWalkError::Invalid {
                what: format!("file index {h}"),
                reason: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::object::{object_ref, Entry, FileHash, Timestamp};
    use lcfs_cache::{CacheConfig, Verified};

    /// A cache without a memory LRU, so that removing files is seen at once.
    fn open(dir: &std::path::Path) -> Cache {
        let mut config = CacheConfig::new(dir);
        config.memory = 0;
        Cache::open(config).unwrap()
    }

    fn entry(name: &str, kind: EntryKind) -> Entry {
        Entry {
            name: name.as_bytes().to_vec(),
            mode: 0o644,
            mtime: Timestamp { secs: 0, nanos: 0 },
            nlink: Entry::plain_nlink(&kind),
            link: 0,
            kind,
        }
    }

    /// A file of `n` blocks of `fill`, as objects; its entry kind.
    fn file(n: u8, fill: u8, objects: &mut Vec<Vec<u8>>) -> EntryKind {
        let blocks: Vec<Vec<u8>> = (0..n).map(|i| vec![fill ^ i; 100]).collect();
        let leaves: Vec<ObjectHash> = blocks.iter().map(|b| ObjectHash::of(b)).collect();
        objects.extend(blocks);
        let content = if n == 1 {
            Content::Block(leaves[0])
        } else {
            let index = FileIndex::Leaves(leaves.clone()).encode();
            let r = object_ref(&index);
            objects.push(index);
            Content::Index {
                index: r,
                first_leaf: leaves[0],
            }
        };
        EntryKind::File(FileRef {
            size: 100 * u64::from(n),
            b3: FileHash::of(&[fill]),
            content,
        })
    }

    /// `/a/f` (3 blocks), `/a/g` (1 block), `/h` (inline); every object cached and pinned.
    fn tree(cache: &Cache) -> (ObjectRef, Vec<Vec<u8>>) {
        let mut objects = Vec::new();
        let f = file(3, 1, &mut objects);
        let g = file(1, 50, &mut objects);
        let a = Directory::new(vec![entry("f", f), entry("g", g)]).encode();
        let a_ref = object_ref(&a);
        objects.push(a);
        let inline = EntryKind::File(FileRef {
            size: 2,
            b3: FileHash::of(b"hi"),
            content: Content::Inline(b"hi".to_vec()),
        });
        let top = Directory::new(vec![entry("a", EntryKind::Dir(a_ref)), entry("h", inline)]);
        let top = top.encode();
        let root = object_ref(&top);
        objects.push(top);
        for o in &objects {
            let v = Verified::hash_of(o.clone());
            cache.insert(&v).unwrap();
            cache.pin(v.hash()).unwrap();
        }
        (root, objects)
    }

    fn hashes(objects: &[Vec<u8>]) -> HashSet<ObjectHash> {
        objects.iter().map(|o| ObjectHash::of(o)).collect()
    }

    #[test]
    fn the_whole_tree_and_single_paths_name_their_objects() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open(dir.path());
        let (record, objects) = tree(&cache);
        let all = cached_objects(&cache, record, &[]).unwrap();
        assert_eq!(all.len(), objects.len(), "each object once");
        assert_eq!(all.into_iter().collect::<HashSet<_>>(), hashes(&objects));
        // /a/f: its 3 blocks and its index, nothing else.
        let f = cached_objects(&cache, record, &["a/f".into()]).unwrap();
        assert_eq!(f.into_iter().collect::<HashSet<_>>(), hashes(&objects[..4]));
        let h = cached_objects(&cache, record, &["/h".into()]).unwrap();
        assert!(h.is_empty(), "an inline file has no objects");
    }

    #[test]
    fn missing_paths_and_uncached_directories_are_errors_and_uncached_objects_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open(dir.path());
        let (record, objects) = tree(&cache);
        for path in ["nope", "a/nope", "h/x", "a/f/x"] {
            let e = cached_objects(&cache, record, &[path.into()]).unwrap_err();
            assert!(matches!(e, CachedWalkError::NotFound { .. }), "{path}: {e}");
            assert!(e.to_string().contains(path), "{e}");
        }
        // A block evicted: the rest is still named.
        cache.clear(false).unwrap();
        for o in objects.iter().filter(|o| **o != objects[0]) {
            cache.insert(&Verified::hash_of(o.clone())).unwrap();
        }
        let all = cached_objects(&cache, record, &[]).unwrap();
        assert_eq!(all.len(), objects.len(), "leaves are named by the index");
        // The directory on the way gone: resolving through it fails, saying so.
        std::fs::remove_dir_all(dir.path().join("objects")).unwrap();
        let e = cached_objects(&cache, record, &["a/f".into()]).unwrap_err();
        assert!(matches!(e, CachedWalkError::NotCached { .. }), "{e}");
    }

    #[test]
    fn a_cached_object_that_does_not_decode_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open(dir.path());
        let junk = Verified::hash_of(&b"not a directory"[..]);
        cache.insert(&junk).unwrap();
        let record = ObjectRef {
            hash: ObjectHash::of_verified(&junk),
            len: junk.len() as u32,
        };
        let e = cached_objects(&cache, record, &[]).unwrap_err();
        assert!(matches!(e, CachedWalkError::Invalid { .. }), "{e}");
    }
}
