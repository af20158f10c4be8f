//! The mount's view of a channel: [`lcfs_mount::Source`] implemented with the fetch engine.
//!
//! A node is a directory entry with its object references. Reads fetch the blocks covering the
//! range at demand priority (concurrently, from the cache when there) and start fetches of the
//! blocks in the readahead window the mount asks for, without waiting for them. File leaves
//! and directory listings are kept in small LRUs so that a sequential reader costs one index
//! fetch per file, not one per read.
//!
//! A demand fetch that timed out or went stale is remembered for [`RECENT_FAILURE`]: the
//! kernel retries a failed page read at once (the readahead request fails, then it reads the
//! page again synchronously), and without this the reader would wait for the timeout twice.
//!
//! Generations. The source follows the publisher ([`TreeSource::follow`], with
//! [`crate::fetch::follow`] deciding which root records to move to) and tells the mount of
//! each move ([`Source::next_version`]). A node carries the tree of the generation it was
//! listed from, so it keeps reading that generation (its block size, its objects) for as long
//! as the objects can be had: from the cache, or from the server while it still sends them
//! (objects are content-addressed: what a later generation kept, it still sends). Two nodes
//! have the same content when they name the same objects ([`Source::same_content`]): a
//! directory by its object hash, a file by its content reference (index, block or inline
//! bytes) at the same block size. Reads of a superseded handle ([`ReadHint::superseded`]) are
//! fetched as [`Freshness::Superseded`]: what the server no longer sends fails with ESTALE
//! within the engine's `stale_after` (0.75 s) instead of EIO after `--timeout`, and they start
//! no readahead of objects that are most likely gone.

use std::ffi::OsStr;
use std::num::NonZeroUsize;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::try_join_all;
use lcfs_mount::{Attr, BoxFuture, Child, Kind, ReadHint, Source, SourceError, Totals, Version};
use lru::LruCache;
use tokio::sync::watch;

use crate::fetch::follow::{self, Followed, RootFollower};
use crate::fetch::tree::Origin;
use crate::fetch::{FetchError, Fetcher, Freshness, Priority, RootPolicy, Tree};
use crate::wire::object::index::IndexShape;
use crate::wire::object::{
    BlockIndex, Content, Directory, Entry, EntryKind, FileHash, FileIndex, FileRef, ObjectHash,
    ObjectRef, Timestamp,
};

/// A node of the published tree, with the tree of the generation it was listed from.
#[derive(Clone, Debug)]
pub enum Node {
    Dir(ObjectRef, Arc<Tree>),
    File(Arc<FileRef>, Arc<Tree>),
    Symlink,
}

/// How long a demand fetch that timed out or went stale answers with the same error at once.
const RECENT_FAILURE: Duration = Duration::from_secs(2);

/// The largest subdirectory listing fetched ahead of a reader (see `list_dir`): 64 KiB
/// holds some 1,000 entries and crosses a 100 Mbit/s link in 5 ms.
const DIR_READAHEAD_MAX: u32 = 64 * 1024;

/// The channel's tree as a mount source; clone it freely.
#[derive(Clone)]
pub struct TreeSource(Arc<Inner>);

pub struct Inner {
    fetcher: Fetcher,
    /// The tree of the generation the mount shows; receivers hear of moves.
    current: watch::Sender<Arc<Tree>>,
    /// Whether the server has answered (false for a mount started from the cached root).
    online: AtomicBool,
    leaves: Mutex<LruCache<ObjectHash, Arc<Vec<ObjectHash>>>>,
    /// Listings by directory hash; the nodes in them carry the tree they were listed from.
    dirs: Mutex<LruCache<ObjectHash, Arc<Vec<Child<Node>>>>>,
    /// Objects whose demand fetch timed out or went stale: when, and the error.
    failures: Mutex<LruCache<ObjectHash, (Instant, SourceError)>>,
    /// Per file (by index hash): the blocks `lo..hi` for which readahead has been started.
    ahead: Mutex<LruCache<ObjectHash, (u64, u64)>>,
    /// Prefetch sets found so far (see [`crate::prefetch::set`]).
    sets: Mutex<Sets>,
    /// Whether any set file was seen: until then reads skip the `sets` lock. A member is
    /// always read after its set's directory was listed, so none is missed.
    sets_seen: AtomicBool,
}

/// The prefetch sets a mount knows: which directories were looked at, and each member's
/// set by the member's whole-file hash.
struct Sets {
    looked_at: LruCache<ObjectHash, ()>,
    by_member: std::collections::HashMap<FileHash, Arc<PrefetchSet>>,
    /// Files read lately, by whole-file hash: a set learned just after its first member was
    /// read (the walk that learns it races the reader) starts at once.
    read: LruCache<FileHash, ()>,
}

/// Members with more sets than this are not remembered (each costs a map entry).
const MAX_SET_MEMBERS: usize = 1 << 18;

struct PrefetchSet {
    files: Vec<FileRef>,
    tree: Arc<Tree>,
    started: AtomicBool,
}

/// The one mapping of fetch errors to what the mount passes on (and so to an errno:
/// `lcfs_mount`'s `FsError::errno`), with the whole message, sources included. Exhaustive, so
/// that a new kind of failure is given its errno here.
fn unavailable(e: FetchError) -> SourceError {
    let text = e.report();
    match e {
        FetchError::Invalid { .. } | FetchError::Untrusted { .. } => SourceError::Invalid(text),
        FetchError::Stale { .. } => SourceError::Stale(text),
        FetchError::Closed => SourceError::Closed,
        FetchError::Timeout { .. }
        | FetchError::NoRoot { .. }
        | FetchError::Cache { .. }
        | FetchError::NotFound(_) => SourceError::Unavailable(text),
    }
}

fn freshness(hint: ReadHint) -> Freshness {
    match hint.superseded {
        true => Freshness::Superseded,
        false => Freshness::Current,
    }
}

impl TreeSource {
    pub fn new(tree: Tree) -> TreeSource {
        let n = |k| NonZeroUsize::new(k).expect("non-zero");
        TreeSource(Arc::new(Inner {
            fetcher: tree.fetcher().clone(),
            online: AtomicBool::new(tree.origin() == Origin::Network),
            current: watch::Sender::new(Arc::new(tree)),
            leaves: Mutex::new(LruCache::new(n(1024))),
            dirs: Mutex::new(LruCache::new(n(4096))),
            failures: Mutex::new(LruCache::new(n(256))),
            ahead: Mutex::new(LruCache::new(n(1024))),
            sets: Mutex::new(Sets {
                looked_at: LruCache::new(n(4096)),
                by_member: std::collections::HashMap::new(),
                read: LruCache::new(n(4096)),
            }),
            sets_seen: AtomicBool::new(false),
        }))
    }

    /// The tree of the generation the mount shows.
    pub fn tree(&self) -> Arc<Tree> {
        self.0.tree()
    }

    /// Follows the channel's publisher from now on, on the current tokio runtime: every root
    /// record accepted under `policy` with a higher generation moves the source (see the
    /// module doc). A pinned policy never moves, and nothing is started for it.
    pub fn follow(&self, policy: &RootPolicy) -> Result<(), FetchError> {
        let tree = self.tree().as_ref().clone();
        let Some(follower) = RootFollower::of_tree(&tree, policy)? else {
            return Ok(());
        };
        let me = self.0.clone();
        tokio::spawn(follow::run(tree, follower, move |e| me.handle_followed(e)));
        Ok(())
    }
}

impl Inner {
    fn tree(&self) -> Arc<Tree> {
        self.current.borrow().clone()
    }

    fn handle_followed(&self, e: Followed) {
        match e {
            Followed::Online => self.online.store(true, Ordering::Relaxed),
            Followed::Moved(tree) => {
                self.online.store(true, Ordering::Relaxed);
                self.current.send_replace(Arc::new(*tree));
            }
        }
    }

    /// The error of a demand fetch of `h` that failed less than [`RECENT_FAILURE`] ago. A
    /// stale failure answers superseded readers only: a current reader's object is in the
    /// current tree, so it asks again (the kernel retries a failed page read once, and that
    /// retry then waits as long as it needs, however busy the server was at the move).
    fn recent_failure(&self, h: &ObjectHash, freshness: Freshness) -> Result<(), SourceError> {
        let mut t = self.failures.lock().expect("failures lock");
        match t.get(h) {
            Some((_, SourceError::Stale(_))) if freshness == Freshness::Current => Ok(()),
            Some((at, e)) if at.elapsed() < RECENT_FAILURE => Err(e.clone()),
            _ => Ok(()),
        }
    }

    /// Maps a failed demand fetch of `h`, remembering it when it timed out or went stale.
    fn demand_failed(&self, h: ObjectHash, e: FetchError) -> SourceError {
        let remember = matches!(e, FetchError::Timeout { .. } | FetchError::Stale { .. });
        let e = unavailable(e);
        if remember {
            self.failures
                .lock()
                .expect("failures lock")
                .put(h, (Instant::now(), e.clone()));
        }
        e
    }

    async fn list_dir(
        self: Arc<Self>,
        r: ObjectRef,
        tree: Arc<Tree>,
    ) -> Result<Arc<Vec<Child<Node>>>, SourceError> {
        if let Some(hit) = self.dirs.lock().expect("dirs lock").get(&r.hash) {
            return Ok(hit.clone());
        }
        self.recent_failure(&r.hash, Freshness::Current)?;
        // Always as current: the directories of an unchanged subtree keep the nodes of the
        // generation they were first listed in, and must never fail as stale.
        let dir = tree
            .directory(r, Priority::Demand)
            .await
            .map_err(|e| self.demand_failed(r.hash, e))?;
        let children = Arc::new(children(dir, &tree));
        // Whoever lists a directory mostly goes on into its subdirectories (find, ls -R, tar,
        // a compiler's include search): start the small ones at readahead priority, so that
        // a walk waits on about one round trip per level rather than one per directory. A
        // big one could hold back the very listing a reader waits for: the server cannot
        // tell readahead from demand, and shares its rate between them.
        let subdirs: Vec<ObjectRef> = children
            .iter()
            .filter_map(|c| match &c.node {
                Node::Dir(r, _) if r.len <= DIR_READAHEAD_MAX => Some(*r),
                _ => None,
            })
            .collect();
        if !subdirs.is_empty() {
            self.fetcher.start_fetches(&subdirs, Priority::Readahead);
        }
        self.look_for_set(r, &children, &tree);
        self.dirs
            .lock()
            .expect("dirs lock")
            .put(r.hash, children.clone());
        Ok(children)
    }

    /// Learns the prefetch set of directory `r` in the background, if it has one.
    fn look_for_set(self: &Arc<Self>, r: ObjectRef, children: &[Child<Node>], tree: &Arc<Tree>) {
        let Some(Node::File(f, _)) = children
            .iter()
            .find(|c| c.name.as_bytes() == crate::prefetch::set::SET_FILE)
            .map(|c| &c.node)
        else {
            return;
        };
        self.sets_seen.store(true, Ordering::Relaxed);
        if self
            .sets
            .lock()
            .expect("sets lock")
            .looked_at
            .put(r.hash, ())
            .is_some()
        {
            return;
        }
        let (me, f, tree) = (self.clone(), f.clone(), tree.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            match me.learn_set(r, &f, &tree).await {
                Ok(n) => tracing::debug!(
                    dir = %&r.hash.to_hex()[..12],
                    members = n,
                    took_ms = started.elapsed().as_millis() as u64,
                    "prefetch set learned"
                ),
                Err(e) => tracing::warn!(
                    "ignoring the prefetch set (.lcfs-prefetch) of directory {}: {e}",
                    &r.hash.to_hex()[..12]
                ),
            }
        });
    }

    async fn learn_set(
        &self,
        r: ObjectRef,
        f: &FileRef,
        tree: &Arc<Tree>,
    ) -> Result<usize, String> {
        use crate::prefetch::set::{members, read_set_file, SetSpec, MAX_SET_FILE};
        let text = read_set_file(tree, f)
            .await
            .map_err(|e| e.report())?
            .ok_or_else(|| format!("it is larger than {MAX_SET_FILE} bytes"))?;
        let spec = SetSpec::parse(&text)?;
        let files = members(tree, r, &spec).await.map_err(|e| e.report())?;
        let n = files.len();
        let set = Arc::new(PrefetchSet {
            files,
            tree: tree.clone(),
            started: AtomicBool::new(false),
        });
        let read_already = {
            let mut sets = self.sets.lock().expect("sets lock");
            for m in &set.files {
                if sets.by_member.len() >= MAX_SET_MEMBERS {
                    break;
                }
                sets.by_member.entry(m.b3).or_insert_with(|| set.clone());
            }
            set.files
                .iter()
                .find(|m| sets.read.contains(&m.b3))
                .cloned()
        };
        if let Some(member) = read_already {
            self.start_set_of(&member);
        }
        Ok(n)
    }

    /// Starts the whole set of `f` at readahead priority, the first time one of its members
    /// is read.
    fn start_set_of(&self, f: &FileRef) {
        if !self.sets_seen.load(Ordering::Relaxed) {
            return;
        }
        let set = {
            let mut sets = self.sets.lock().expect("sets lock");
            sets.read.put(f.b3, ());
            if sets.by_member.is_empty() {
                return;
            }
            match sets.by_member.get(&f.b3) {
                Some(s) if !s.started.swap(true, Ordering::Relaxed) => s.clone(),
                _ => return,
            }
        };
        let fetcher = self.fetcher.clone();
        tokio::spawn(async move {
            let objects =
                crate::prefetch::objects_of(&set.tree, &set.files, Priority::Readahead).await;
            match objects {
                Ok(objects) => {
                    tracing::debug!(
                        files = set.files.len(),
                        objects = objects.len(),
                        "prefetch set started"
                    );
                    fetcher.start_fetches(&objects, Priority::Readahead);
                }
                Err(e) => tracing::debug!("prefetch set not started: {e}"),
            }
        });
    }

    async fn file_leaves(
        &self,
        tree: &Tree,
        f: &FileRef,
        freshness: Freshness,
    ) -> Result<Arc<Vec<ObjectHash>>, SourceError> {
        let key = match &f.content {
            Content::Index { index, .. } => index.hash,
            Content::Block(h) => return Ok(Arc::new(vec![*h])),
            Content::Inline(_) => return Ok(Arc::new(Vec::new())),
        };
        if let Some(hit) = self.leaves.lock().expect("leaves lock").get(&key) {
            return Ok(hit.clone());
        }
        self.recent_failure(&key, freshness)?;
        let leaves = Arc::new(
            tree.leaves_as(f, Priority::Demand, freshness)
                .await
                .map_err(|e| self.demand_failed(key, e))?,
        );
        self.leaves
            .lock()
            .expect("leaves lock")
            .put(key, leaves.clone());
        Ok(leaves)
    }

    async fn read_file(
        self: Arc<Self>,
        file: Reading,
        offset: u64,
        len: u32,
        hint: ReadHint,
    ) -> Result<Vec<u8>, SourceError> {
        let f = &file.f;
        if file.freshness == Freshness::Current {
            self.start_set_of(f);
        }
        let end = offset.saturating_add(len as u64).min(f.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        if let Content::Inline(bytes) = &f.content {
            return Ok(bytes[offset as usize..end as usize].to_vec());
        }
        let bs = file.tree.block_size();
        // A superseded file's objects are most likely gone: fetch only what is read.
        let ahead = file.freshness == Freshness::Current;
        if offset < bs.bytes() && ahead {
            self.start_first_block(&file);
            if end <= bs.bytes() {
                if let Some(first) = self.first_block_alone(&file, end + hint.readahead).await? {
                    return Ok(first[offset as usize..end as usize].to_vec());
                }
            }
        }
        let leaves = self.file_leaves(&file.tree, f, file.freshness).await?;
        let (first, last) = (bs.block_at(offset).0, bs.block_at(end - 1).0);
        if ahead {
            self.spawn_readahead(&file, &leaves, last + 1, end.saturating_add(hint.readahead));
        }
        let (this, file) = (&self, &file);
        let blocks = (first..=last).map(BlockIndex).map(|i| {
            let leaf = leaves.get(i.as_usize()).copied();
            async move {
                let leaf = leaf.ok_or_else(|| {
                    SourceError::Invalid(format!("block {i} beyond the file's index"))
                })?;
                this.block(file, leaf, i, Priority::Demand).await
            }
        });
        let blocks = try_join_all(blocks).await?;
        let mut out = Vec::with_capacity((end - offset) as usize);
        for (i, b) in (first..=last).map(BlockIndex).zip(&blocks) {
            let start = bs.offset_of(i);
            let lo = offset.max(start) - start;
            let hi = end.min(start + b.len() as u64) - start;
            out.extend_from_slice(&b[lo as usize..hi as usize]);
        }
        Ok(out)
    }

    /// Block 0 of a file with an index, without waiting for the index: the directory entry
    /// names the first block, so a read within it (a cold `head`, a magic-number sniff) costs
    /// one round trip. The index follows in the background, and with it the readahead up to
    /// byte `until`. `None` for files without an index.
    async fn first_block_alone(
        self: &Arc<Self>,
        file: &Reading,
        until: u64,
    ) -> Result<Option<lcfs_cache::Verified>, SourceError> {
        let Content::Index { index, first_leaf } = &file.f.content else {
            return Ok(None);
        };
        // Both were asked of the same server: if one just failed, so does the other.
        self.recent_failure(&index.hash, file.freshness)?;
        let first = match self
            .block(file, *first_leaf, BlockIndex(0), Priority::Demand)
            .await
        {
            Ok(b) => b,
            Err(e) => {
                let mut failures = self.failures.lock().expect("failures lock");
                if let Some(t) = failures.get(first_leaf).cloned() {
                    failures.put(index.hash, t);
                }
                return Err(e);
            }
        };
        let (this, file) = (self.clone(), file.clone());
        tokio::spawn(async move {
            if let Ok(leaves) = this.file_leaves(&file.tree, &file.f, file.freshness).await {
                this.spawn_readahead(&file, &leaves, 1, until);
            }
        });
        Ok(Some(first))
    }

    /// Block `i` of `file`, whose leaf hash is `leaf`.
    async fn block(
        &self,
        file: &Reading,
        leaf: ObjectHash,
        i: BlockIndex,
        prio: Priority,
    ) -> Result<lcfs_cache::Verified, SourceError> {
        let fetch = file
            .tree
            .block_as(leaf, file.f.size, i, prio, file.freshness);
        if prio != Priority::Demand {
            return fetch.await.map_err(unavailable);
        }
        self.recent_failure(&leaf, file.freshness)?;
        fetch.await.map_err(|e| self.demand_failed(leaf, e))
    }

    /// Starts fetching a file's index and first block together: the entry names the first
    /// block, so a cold first read costs one round trip instead of two.
    fn start_first_block(&self, file: &Reading) {
        let Content::Index { index, first_leaf } = file.f.content else {
            return;
        };
        if self
            .leaves
            .lock()
            .expect("leaves lock")
            .contains(&index.hash)
        {
            return;
        }
        let block = ObjectRef {
            hash: first_leaf,
            len: file.tree.block_size().block_len(file.f.size, BlockIndex(0)),
        };
        self.fetcher
            .start_fetches(&[index, block], Priority::Demand);
    }

    /// Starts fetching blocks from `from` up to byte `until`, without waiting for them. Each
    /// block is started once: a sequential reader's window slides, it is not started anew.
    fn spawn_readahead(
        self: &Arc<Self>,
        file: &Reading,
        leaves: &Arc<Vec<ObjectHash>>,
        from: u64,
        until: u64,
    ) {
        let (f, bs) = (&file.f, file.tree.block_size());
        let until = until.min(f.size);
        let key = match &f.content {
            Content::Index { index, .. } => index.hash,
            _ => return,
        };
        if until == 0 || leaves.is_empty() {
            return;
        }
        let last = ((until - 1) / bs.bytes()).min(leaves.len() as u64 - 1);
        let from = {
            let mut ahead = self.ahead.lock().expect("readahead lock");
            // Within the window already started, only the new tail; after a jump (forwards,
            // or back as when the file is read again), a new window.
            let (lo, hi) = match ahead.get(&key).copied() {
                Some((lo, hi)) if (lo..=hi).contains(&from) => (lo, hi),
                _ => (from, from),
            };
            ahead.put(key, (lo, (last + 1).max(hi)));
            from.max(hi)
        };
        let refs: Vec<ObjectRef> = (from..=last)
            .map(|i| ObjectRef {
                hash: leaves[i as usize],
                len: bs.block_len(f.size, BlockIndex(i)),
            })
            .collect();
        self.fetcher.start_fetches(&refs, Priority::Readahead);
    }

    /// Fraction of a file's blocks in the cache, from the cache alone (no network). Blocks
    /// whose leaf hashes are not known from a cached file index count as not cached (they
    /// cannot be read offline), so a file nobody has read yet says 0.
    fn cached_fraction(&self, tree: &Tree, f: &FileRef) -> f64 {
        let leaves = match &f.content {
            Content::Inline(_) => return 1.0,
            Content::Block(h) => vec![*h],
            Content::Index { index, .. } => self.cached_leaves(tree, f, *index),
        };
        let total = tree.block_size().blocks_in(f.size).max(1);
        let cache = self.fetcher.cache();
        let have = leaves.iter().filter(|h| cache.contains(h.raw())).count() as u64;
        (have as f64 / total as f64).min(1.0)
    }

    /// The leaf hashes of `f` that the cache knows: all of them when its whole index is
    /// cached, those of the cached pages otherwise, none without the top of the index.
    fn cached_leaves(&self, tree: &Tree, f: &FileRef, r: ObjectRef) -> Vec<ObjectHash> {
        if let Some(hit) = self
            .leaves
            .lock()
            .ok()
            .and_then(|mut l| l.get(&r.hash).cloned())
        {
            return hit.to_vec();
        }
        let fetcher = &self.fetcher;
        let Some(top) = fetcher
            .cached(&r)
            .ok()
            .flatten()
            .and_then(|b| FileIndex::decode(&b).ok())
        else {
            return Vec::new();
        };
        match top {
            FileIndex::Leaves(l) => l,
            FileIndex::Pages(pages) => {
                let shape = IndexShape {
                    blocks: tree.block_size().blocks_in(f.size),
                };
                let mut all = Vec::new();
                for (i, h) in pages.iter().enumerate() {
                    let page = fetcher
                        .cached(&shape.page_ref(i as u64, *h))
                        .ok()
                        .flatten()
                        .and_then(|b| FileIndex::decode(&b).ok());
                    if let Some(FileIndex::Leaves(l)) = page {
                        all.extend(l);
                    }
                }
                all
            }
        }
    }

    fn root_xattrs(&self) -> Vec<(String, Vec<u8>)> {
        let tree = self.tree();
        let r = tree.root_record();
        let stats = self.fetcher.stats();
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let heard = stats.last_heard.ms();
        let now = crate::status::unix_ms_now();
        let state = match (crate::status::online(heard, now), heard) {
            (true, _) => "online".to_owned(),
            (false, 0) if !self.online.load(Ordering::Relaxed) => {
                "offline (from the cached root record)".to_owned()
            }
            (false, 0) => "offline (not heard since the mount started)".to_owned(),
            (false, at) => format!(
                "offline (not heard for {} s)",
                now.saturating_sub(at) / 1000
            ),
        };
        vec![
            (
                "user.lcfs.channel".into(),
                self.fetcher.channel().name().as_bytes().to_vec(),
            ),
            (
                "user.lcfs.generation".into(),
                r.generation.to_string().into_bytes(),
            ),
            (
                "user.lcfs.root".into(),
                r.root.hash.to_hex().as_bytes().to_vec(),
            ),
            ("user.lcfs.server".into(), state.as_bytes().to_vec()),
            (
                "user.lcfs.fetched_bytes".into(),
                load(&stats.bytes_fetched).to_string().into_bytes(),
            ),
            (
                "user.lcfs.dropped_packets".into(),
                load(&stats.malformed).to_string().into_bytes(),
            ),
        ]
    }
}

/// A file being read: its reference, the tree of its generation, and the reader's freshness.
#[derive(Clone)]
struct Reading {
    f: Arc<FileRef>,
    tree: Arc<Tree>,
    freshness: Freshness,
}

fn attr(e: &Entry) -> Attr {
    let (kind, size) = match &e.kind {
        EntryKind::File(f) => (Kind::File, f.size),
        EntryKind::Dir(r) => (Kind::Dir, r.len as u64),
        EntryKind::Symlink(t) => (Kind::Symlink, t.len() as u64),
    };
    Attr {
        kind,
        size,
        mode: e.mode,
        mtime_secs: e.mtime.secs,
        mtime_nanos: e.mtime.nanos,
        nlink: e.nlink,
        link: e.link,
    }
}

/// The children of `dir`, listed from `tree`'s generation.
fn children(dir: Directory, tree: &Arc<Tree>) -> Vec<Child<Node>> {
    dir.entries
        .into_iter()
        .map(|e| {
            let attr = attr(&e);
            let (node, target) = match e.kind {
                EntryKind::File(f) => (Node::File(Arc::new(f), tree.clone()), None),
                EntryKind::Dir(r) => (Node::Dir(r, tree.clone()), None),
                EntryKind::Symlink(t) => (Node::Symlink, Some(t)),
            };
            Child {
                name: OsStr::from_bytes(&e.name).to_owned(),
                attr,
                target,
                node,
            }
        })
        .collect()
}

/// The version `tree` shows. The root's mode, mtime and link count are its directory
/// object's (read before a version is shown: at mount, and by the follower before a move);
/// a version 1 object has none, and then the root shows 0755 and the publish time.
fn version(tree: &Arc<Tree>) -> Version<Node> {
    let r = tree.root_record();
    let (meta, nlink) = match tree.root_meta() {
        Some(m) => (m.meta, m.nlink),
        None => (
            crate::wire::object::dir::DirMeta {
                mode: 0o755,
                mtime: Timestamp {
                    secs: (r.publish_time_ns / 1_000_000_000) as i64,
                    nanos: (r.publish_time_ns % 1_000_000_000) as u32,
                },
            },
            2,
        ),
    };
    let attr = Attr {
        kind: Kind::Dir,
        size: r.root.len as u64,
        mode: meta.mode,
        mtime_secs: meta.mtime.secs,
        mtime_nanos: meta.mtime.nanos,
        nlink,
        link: 0,
    };
    Version {
        number: r.generation,
        root: Node::Dir(r.root, tree.clone()),
        attr,
    }
}

impl Source for TreeSource {
    type Node = Node;

    fn root(&self) -> Version<Node> {
        version(&self.tree())
    }

    fn next_version(&self, seen: u64) -> BoxFuture<Result<Version<Node>, SourceError>> {
        let mut rx = self.0.current.subscribe();
        Box::pin(async move {
            let tree = rx
                .wait_for(|t| t.root_record().generation > seen)
                .await
                .map_err(|_| SourceError::Closed)?;
            Ok(version(&tree))
        })
    }

    fn same_content(&self, a: &Node, b: &Node) -> bool {
        match (a, b) {
            (Node::Dir(x, _), Node::Dir(y, _)) => x == y,
            // The same objects, read at the same block size.
            (Node::File(x, tx), Node::File(y, ty)) => {
                x.size == y.size && x.content == y.content && tx.block_size() == ty.block_size()
            }
            _ => false,
        }
    }

    fn list(&self, dir: &Node) -> BoxFuture<Result<Arc<Vec<Child<Node>>>, SourceError>> {
        let me = self.0.clone();
        match dir {
            Node::Dir(r, tree) => Box::pin(me.list_dir(*r, tree.clone())),
            _ => Box::pin(async { Err(SourceError::WrongKind) }),
        }
    }

    fn read(
        &self,
        file: &Node,
        offset: u64,
        len: u32,
        hint: ReadHint,
    ) -> BoxFuture<Result<Vec<u8>, SourceError>> {
        let me = self.0.clone();
        match file {
            Node::File(f, tree) => {
                let reading = Reading {
                    f: f.clone(),
                    tree: tree.clone(),
                    freshness: freshness(hint),
                };
                Box::pin(me.read_file(reading, offset, len, hint))
            }
            _ => Box::pin(async { Err(SourceError::WrongKind) }),
        }
    }

    fn xattrs(&self, node: &Node, root: bool) -> Vec<(String, Vec<u8>)> {
        let mut out = if root {
            self.0.root_xattrs()
        } else {
            Vec::new()
        };
        if let Node::File(f, tree) = node {
            out.push(("user.lcfs.blake3".into(), f.b3.to_hex().as_bytes().to_vec()));
            // rounded down: "1.000" only when every block is cached
            let frac = (self.0.cached_fraction(tree, f) * 1000.0).floor() / 1000.0;
            out.push(("user.lcfs.cached".into(), format!("{frac:.3}").into_bytes()));
            if !root {
                let g = self.0.tree().root_record().generation;
                out.push(("user.lcfs.generation".into(), g.to_string().into_bytes()));
            }
        }
        out
    }

    fn totals(&self) -> Totals {
        let usage = self.0.fetcher.cache().usage();
        Totals {
            bytes: usage.disk_bytes,
            files: usage.objects,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::{FetchConfig, Part, Subject};
    use crate::wire::channel::Channel;
    use crate::wire::object::{object_ref, BlockSize, RootRecord};

    fn source() -> (TreeSource, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let cache = lcfs_cache::Cache::open(lcfs_cache::CacheConfig::new(dir.path())).unwrap();
        let lo = crate::net::Iface {
            name: "lo".into(),
            index: 1,
            mtu: 65536,
        };
        let config = FetchConfig {
            port: 0,
            ..FetchConfig::default()
        };
        let channel = Channel::new("t", None);
        let record = RootRecord {
            channel_id: *channel.id(),
            generation: 1,
            publish_time_ns: 0,
            root: object_ref(b"root"),
            block_size: BlockSize::DEFAULT,
            single_file: false,
            signature: None,
        };
        let fetcher = Fetcher::start(channel, lo, cache, config).unwrap();
        (TreeSource::new(Tree::for_tests(fetcher, record)), dir)
    }

    #[test]
    fn a_stale_failure_is_repeated_to_superseded_readers_only() {
        let (s, _dir) = source();
        let h = ObjectHash::of(b"block");
        let what = Subject::part(Part::Block(BlockIndex(0)), ObjectRef { hash: h, len: 5 });
        let stale = FetchError::Stale {
            channel: "t".into(),
            what: Box::new(what.clone()),
        };
        assert!(matches!(s.0.demand_failed(h, stale), SourceError::Stale(_)));
        assert!(matches!(
            s.0.recent_failure(&h, Freshness::Superseded),
            Err(SourceError::Stale(_))
        ));
        assert_eq!(s.0.recent_failure(&h, Freshness::Current), Ok(()));
        let timeout = s.0.fetcher.timeout_error(what);
        s.0.demand_failed(h, timeout);
        assert!(s.0.recent_failure(&h, Freshness::Current).is_err());
    }

    #[test]
    fn same_content_means_the_same_objects_at_the_same_block_size() {
        let (s, _dir) = source();
        let tree = s.tree();
        let file = |content: Content| {
            let f = FileRef {
                size: 5,
                b3: FileHash::of(b"hello"),
                content,
            };
            Node::File(Arc::new(f), tree.clone())
        };
        let a = file(Content::Block(ObjectHash::of(b"hello")));
        assert!(s.same_content(&a, &a.clone()));
        assert!(!s.same_content(&a, &file(Content::Inline(b"hello".to_vec()))));
        let mut other = tree.root_record().clone();
        other.block_size = BlockSize::from_log2(20).unwrap();
        let moved = Arc::new(tree.moved_to(other));
        let b = Node::File(
            Arc::new(FileRef {
                size: 5,
                b3: FileHash::of(b"hello"),
                content: Content::Block(ObjectHash::of(b"hello")),
            }),
            moved,
        );
        assert!(!s.same_content(&a, &b), "another block size");
        let d = |x: &[u8]| Node::Dir(object_ref(x), tree.clone());
        assert!(s.same_content(&d(b"x"), &d(b"x")) && !s.same_content(&d(b"x"), &d(b"y")));
    }
}
