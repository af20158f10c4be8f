//! `lcfs prefetch`: fill the cache with a channel's tree (or some subtrees) for offline use,
//! optionally pinning every object so that eviction never removes it.

pub mod set;
pub mod unpin;

use std::time::{Duration, Instant};

use futures::{stream, StreamExt, TryStreamExt};

use crate::fetch::tree::WalkLimits;
use crate::fetch::{FetchError, Priority, Tree};
use crate::progress::Progress;
use crate::wire::object::{Content, EntryKind, FileIndex, FileRef, ObjectRef};

/// Objects asked for at once: well beyond the engine's window, as for `lcfs copy`.
const IN_FLIGHT: usize = 4096;

#[derive(Debug, Default)]
pub struct PrefetchReport {
    pub files: u64,
    pub objects: u64,
    pub bytes: u64,
    pub elapsed: Duration,
}

/// Fetches (and with `pin`, pins) every object under each of `subpaths` ("" for the whole tree).
pub async fn prefetch(
    tree: &Tree,
    subpaths: &[String],
    pin: bool,
) -> Result<PrefetchReport, FetchError> {
    let started = Instant::now();
    let whole = [String::new()];
    let subpaths = if subpaths.is_empty() {
        &whole[..]
    } else {
        subpaths
    };
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    for sub in subpaths {
        match tree.resolve(sub, Priority::Prefetch).await? {
            None => dirs.push(tree.root_record().root),
            Some(e) => match e.kind {
                EntryKind::Dir(r) => dirs.push(r),
                EntryKind::File(f) => files.push(f),
                EntryKind::Symlink(_) => {}
            },
        }
    }
    let mut objects: Vec<ObjectRef> = Vec::new();
    let limits = WalkLimits::default();
    for d in dirs {
        let (below, found) = tree.distinct_below(d, Priority::Prefetch, &limits).await?;
        objects.extend(below);
        files.extend(found);
    }
    files.sort_by_key(|f| *f.b3.as_bytes());
    files.dedup();
    let total = files.iter().map(|f| f.size).sum();
    let progress = Progress::new("prefetch", total);
    let mut report = PrefetchReport {
        files: files.len() as u64,
        ..Default::default()
    };
    objects.extend(objects_of(tree, &files, Priority::Prefetch).await?);
    objects.sort_by_key(|r| *r.hash.as_bytes());
    objects.dedup();
    let fetched: Vec<u64> = stream::iter(&objects)
        .map(|r| async {
            let v = tree.fetcher().fetch(*r, Priority::Prefetch).await?;
            if pin {
                let cache = tree.fetcher().cache();
                // An object completed a moment ago (a bundle's member) may still be on its
                // way to the cache: stored here, then pinned.
                cache
                    .pin(v.hash())
                    .or_else(|_| cache.insert(&v).and_then(|()| cache.pin(v.hash())))
                    .map_err(|e| FetchError::cache(format!("pin object {}", *r), e))?;
            }
            progress.inc(v.len() as u64);
            Ok::<_, FetchError>(v.len() as u64)
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect()
        .await?;
    progress.finish();
    report.objects = fetched.len() as u64;
    report.bytes = fetched.iter().sum();
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Every object of `files`: their index objects and blocks. The indexes are fetched (at
/// `prio`) to learn the blocks.
pub async fn objects_of(
    tree: &Tree,
    files: &[FileRef],
    prio: Priority,
) -> Result<Vec<ObjectRef>, FetchError> {
    let mut objects = Vec::new();
    for f in files {
        // Leaves first: they check what the entry claims before its index is fetched.
        let leaves = tree.leaves(f, prio).await?;
        objects.extend(index_objects(tree, f, prio).await?);
        let bs = tree.block_size();
        let blocks = bs
            .blocks_of(f.size)
            .zip(leaves.iter())
            .map(|(i, h)| ObjectRef {
                hash: *h,
                len: bs.block_len(f.size, i),
            });
        objects.extend(blocks);
    }
    Ok(objects)
}

/// The file-index objects of a file (top level and pages).
async fn index_objects(
    tree: &Tree,
    f: &FileRef,
    prio: Priority,
) -> Result<Vec<ObjectRef>, FetchError> {
    let Content::Index { index: top, .. } = f.content else {
        return Ok(Vec::new());
    };
    let mut out = vec![top];
    let v = tree.fetcher().fetch(top, prio).await?;
    if let Ok(FileIndex::Pages(pages)) = FileIndex::decode(&v) {
        let shape = crate::wire::object::index::IndexShape {
            blocks: tree.block_size().blocks_in(f.size),
        };
        out.extend(
            pages
                .iter()
                .enumerate()
                .map(|(i, h)| shape.page_ref(i as u64, *h)),
        );
    }
    Ok(out)
}
