//! The published tree as a receiver sees it: the trusted root, directories, file leaves and
//! blocks, each fetched through the engine (or found in the cache) and verified.
//!
//! Trust starts at the root record; [`super::trust`] decides which records are accepted, and
//! this module feeds it what was heard and what the cache remembers. From the root down every
//! object is checked against the reference that named it, so nothing unverified reaches a
//! caller.

use std::time::Duration;

use futures::future::try_join_all;
use lcfs_cache::Verified;

use super::engine::RootWatcher;
use super::trust::{self, Memory, Publisher, RootPolicy, LISTEN};
use super::{FetchError, Fetcher, Freshness, HeardRoot, InvalidReason, Part, Priority, Subject};
use crate::wire::object::index::IndexShape;
use crate::wire::object::{
    BlockIndex, BlockSize, Content, Directory, EntryKind, FileIndex, FileRef, ObjectHash,
    ObjectRef, RootRecord,
};

/// The most blocks a file may have for a receiver to index it: 2^21 leaves are 64 MiB of
/// hashes in memory (a 128 GiB file at the default 64 KiB blocks, 8 TiB at 4 MiB). A hostile
/// entry that claims more fails at once instead of making the receiver collect pages.
pub const MAX_FILE_BLOCKS: u64 = 1 << 21;

/// Index pages fetched at once for one file.
const PAGES_IN_FLIGHT: usize = 16;

/// How a tree was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Network,
    /// From the root record remembered in the cache: the server did not answer.
    Offline,
}

#[derive(Clone)]
pub struct Tree {
    fetcher: Fetcher,
    root: RootRecord,
    origin: Origin,
    /// The root directory's own attributes, once it was read (see [`Tree::root_meta`]).
    root_meta: std::sync::Arc<std::sync::OnceLock<RootMeta>>,
}

/// The root directory's own attributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RootMeta {
    pub meta: crate::wire::object::dir::DirMeta,
    pub nlink: u32,
}

impl std::fmt::Debug for Tree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tree(generation {}, root {})",
            self.root.generation,
            self.root.root.hash.short()
        )
    }
}

impl Tree {
    /// Learns and checks the channel's root record. With `offline_ok`, a server that does not
    /// answer within the timeout is replaced by the last root record kept in the cache.
    /// When a root record is remembered, the server is given only 3 s to answer.
    pub async fn open(
        fetcher: Fetcher,
        policy: &RootPolicy,
        offline_ok: bool,
    ) -> Result<Tree, FetchError> {
        Self::open_within(
            fetcher,
            policy,
            offline_ok.then_some(Duration::from_secs(3)),
        )
        .await
    }

    /// Like [`Tree::open`]; with `offline_wait`, a remembered root record is used when the
    /// server has not answered within that time.
    pub async fn open_within(
        fetcher: Fetcher,
        policy: &RootPolicy,
        offline_wait: Option<Duration>,
    ) -> Result<Tree, FetchError> {
        let memory = remembered(&fetcher)?;
        let wait = match (offline_wait, &memory.root) {
            (Some(wait), Some(_)) => Some(wait),
            _ => fetcher.root_wait(),
        };
        let offline = memory.root.clone().filter(|_| offline_wait.is_some());
        let (root, origin) = match (trusted_root(&fetcher, policy, &memory, wait).await, offline) {
            (Ok((heard, publisher)), _) => {
                accept(&fetcher, policy, &heard, publisher, &memory);
                (heard.record, Origin::Network)
            }
            (Err(FetchError::NoRoot { .. }), Some(r)) => {
                trust::check_remembered(policy, &r).map_err(|e| untrusted(&fetcher, e))?;
                (r, Origin::Offline)
            }
            (Err(e), _) => return Err(e),
        };
        fetcher.note_generation(root.generation);
        Ok(Tree {
            fetcher,
            root,
            origin,
            root_meta: Default::default(),
        })
    }

    /// Like [`Tree::open`] without an offline fallback, but returns with the first root record
    /// that passes `policy` instead of listening [`LISTEN`] longer for a higher generation
    /// of its publisher; [`Listening::newer`] tells what that window heard. The caller can
    /// start at once, and must move to the newer generation if one comes: a replayed old
    /// record may be the first heard. (Waiting out the window cost every `lcfs copy` 120 ms
    /// before its first request.)
    pub async fn open_early(
        fetcher: Fetcher,
        policy: &RootPolicy,
    ) -> Result<(Tree, Listening), FetchError> {
        let memory = remembered(&fetcher)?;
        let mut roots = fetcher.watch_roots();
        let deadline = fetcher.root_wait().map(|w| tokio::time::Instant::now() + w);
        let (heard, publisher) =
            first_trusted(&fetcher, policy, &memory, &mut roots, deadline).await?;
        accept(&fetcher, policy, &heard, publisher, &memory);
        let pinned = policy.pinned.is_some();
        fetcher.note_generation(heard.record.generation);
        let tree = Tree {
            fetcher: fetcher.clone(),
            root: heard.record.clone(),
            origin: Origin::Network,
            root_meta: Default::default(),
        };
        let (policy, first_generation) = (policy.clone(), heard.record.generation);
        let (window_tx, window) = tokio::sync::oneshot::channel();
        let (later_tx, later) = tokio::sync::mpsc::channel(1);
        let task = tokio::spawn(async move {
            if pinned {
                let _ = window_tx.send(None);
                return;
            }
            let until = tokio::time::Instant::now() + LISTEN;
            let (mut best, publisher) =
                highest_until(&policy, &memory, &mut roots, (heard, publisher), until).await;
            let moved = best.record.generation != first_generation;
            if moved {
                accept(&fetcher, &policy, &best, publisher, &memory);
            }
            let _ = window_tx.send(moved.then(|| best.record.clone()));
            // Then every higher generation of the same publisher, for work that outlasts
            // the window (see [`Listening::later`]).
            while let Some(heard) = roots.next().await {
                if is_later(&policy, &memory, &heard, (&best, publisher)) {
                    accept(&fetcher, &policy, &heard, publisher, &memory);
                    best = heard;
                    if later_tx.send(best.record.clone()).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok((
            tree,
            Listening {
                window: Some(window),
                later,
                task,
            },
        ))
    }

    pub fn fetcher(&self) -> &Fetcher {
        &self.fetcher
    }

    pub fn root_record(&self) -> &RootRecord {
        &self.root
    }

    pub fn origin(&self) -> Origin {
        self.origin
    }

    pub fn block_size(&self) -> BlockSize {
        self.root.block_size
    }

    /// The same channel at generation `root` (heard from the server, and trusted).
    pub fn moved_to(&self, root: RootRecord) -> Tree {
        self.fetcher.note_generation(root.generation);
        Tree {
            fetcher: self.fetcher.clone(),
            root,
            origin: Origin::Network,
            root_meta: Default::default(),
        }
    }

    fn invalid(&self, what: Subject, reason: impl Into<InvalidReason>) -> FetchError {
        FetchError::Invalid {
            channel: self.fetcher.channel().name().to_owned(),
            what: Box::new(what),
            reason: reason.into(),
        }
    }

    pub async fn directory(&self, r: ObjectRef, prio: Priority) -> Result<Directory, FetchError> {
        let what = || Subject::part(Part::Directory, r);
        let v = (self.fetcher.fetch(r, prio).await).map_err(|e| e.as_part(Part::Directory))?;
        let dir = Directory::decode(&v).map_err(|e| self.invalid(what(), e))?;
        // Its small files travel in bundles: reads of them fetch the bundle.
        (self.fetcher).learn_bundles(crate::wire::object::bundle::bundling(
            &dir,
            self.block_size(),
        ));
        Ok(dir)
    }

    /// The root directory; `prio` is `Demand` when a reader waits for it, and a bulk priority
    /// for `copy` and `prefetch` (see `super::intent`).
    pub async fn root_dir(&self, prio: Priority) -> Result<Directory, FetchError> {
        let dir = self.directory(self.root.root, prio).await?;
        if let Some(meta) = dir.meta {
            let subdirs = dir
                .entries
                .iter()
                .filter(|e| matches!(e.kind, EntryKind::Dir(_)))
                .count() as u32;
            let _ = self.root_meta.set(RootMeta {
                meta,
                nlink: 2 + subdirs,
            });
        }
        Ok(dir)
    }

    /// The root directory's own mode and mtime, and its link count, once [`Tree::root_dir`]
    /// read a directory object that has them.
    pub fn root_meta(&self) -> Option<RootMeta> {
        self.root_meta.get().copied()
    }

    /// The leaf hashes of a file with block content (empty for inline files). A file may
    /// claim at most [`MAX_FILE_BLOCKS`] blocks; index pages are fetched a few at a time and
    /// nothing is sized by what the entry claims before the pages are verified.
    pub async fn leaves(&self, f: &FileRef, prio: Priority) -> Result<Vec<ObjectHash>, FetchError> {
        self.leaves_as(f, prio, Freshness::Current).await
    }

    /// [`Tree::leaves`] for a reader of the given freshness.
    pub async fn leaves_as(
        &self,
        f: &FileRef,
        prio: Priority,
        freshness: Freshness,
    ) -> Result<Vec<ObjectHash>, FetchError> {
        let blocks = self.block_size().blocks_in(f.size);
        if blocks > MAX_FILE_BLOCKS && !matches!(f.content, Content::Inline(_)) {
            let block_size = self.block_size().bytes();
            let reason = InvalidReason::TooManyBlocks { blocks, block_size };
            return Err(self.invalid(Subject::file(), reason));
        }
        match &f.content {
            Content::Inline(_) => Ok(Vec::new()),
            Content::Block(h) if blocks == 1 => Ok(vec![*h]),
            Content::Block(_) => {
                Err(self.invalid(Subject::file(), InvalidReason::OneBlockForSeveral))
            }
            Content::Index { index, .. } => {
                let shape = IndexShape { blocks };
                self.index_leaves(*index, shape, prio, freshness).await
            }
        }
    }

    async fn index_leaves(
        &self,
        r: ObjectRef,
        shape: IndexShape,
        prio: Priority,
        freshness: Freshness,
    ) -> Result<Vec<ObjectHash>, FetchError> {
        let what = || Subject::part(Part::FileIndex, r);
        if r.len as u64 != shape.top_len() {
            return Err(self.invalid(what(), InvalidReason::IndexLength));
        }
        let v = (self.fetcher.fetch_as(r, prio, freshness).await)
            .map_err(|e| e.as_part(Part::FileIndex))?;
        let index = FileIndex::decode(&v).map_err(|e| self.invalid(what(), e))?;
        shape.check(&index).map_err(|e| self.invalid(what(), e))?;
        match index {
            FileIndex::Leaves(l) => Ok(l),
            FileIndex::Pages(pages) => {
                let mut leaves = Vec::new();
                for (n, chunk) in pages.chunks(PAGES_IN_FLIGHT).enumerate() {
                    let fetches = chunk.iter().enumerate().map(|(i, h)| async move {
                        let pr = shape.page_ref((n * PAGES_IN_FLIGHT + i) as u64, *h);
                        let v = (self.fetcher.fetch_as(pr, prio, freshness).await)
                            .map_err(|e| e.as_part(Part::IndexPage))?;
                        let what = Subject::part(Part::IndexPage, pr);
                        match FileIndex::decode(&v) {
                            Ok(FileIndex::Leaves(l)) => Ok(l),
                            Ok(FileIndex::Pages(_)) => {
                                Err(self.invalid(what, InvalidReason::NotAPage))
                            }
                            Err(e) => Err(self.invalid(what, e)),
                        }
                    });
                    leaves.extend(try_join_all(fetches).await?.concat());
                }
                Ok(leaves)
            }
        }
    }

    /// Block `index` of a file of `size` bytes whose leaf is `leaf`.
    pub async fn block(
        &self,
        leaf: ObjectHash,
        size: u64,
        index: BlockIndex,
        prio: Priority,
    ) -> Result<Verified, FetchError> {
        self.block_as(leaf, size, index, prio, Freshness::Current)
            .await
    }

    /// [`Tree::block`] for a reader of the given freshness.
    pub async fn block_as(
        &self,
        leaf: ObjectHash,
        size: u64,
        index: BlockIndex,
        prio: Priority,
        freshness: Freshness,
    ) -> Result<Verified, FetchError> {
        let len = self.block_size().block_len(size, index);
        let r = ObjectRef { hash: leaf, len };
        (self.fetcher.fetch_as(r, prio, freshness).await).map_err(|e| e.as_part(Part::Block(index)))
    }

    /// The entry at `path` (components separated by `/`), or the root directory for "";
    /// its directories are fetched at `prio`.
    pub async fn resolve(
        &self,
        path: &str,
        prio: Priority,
    ) -> Result<Option<crate::wire::object::Entry>, FetchError> {
        let mut dir = self.root_dir(prio).await?;
        let mut parts = path
            .split('/')
            .filter(|p| !p.is_empty() && *p != ".")
            .peekable();
        let mut at = String::new();
        while let Some(name) = parts.next() {
            at = if at.is_empty() {
                name.to_owned()
            } else {
                format!("{at}/{name}")
            };
            let entry = dir.get(name.as_bytes()).cloned().ok_or_else(|| {
                FetchError::NotFound(format!(
                    "{path:?} is not in channel {:?}",
                    self.fetcher.channel().name()
                ))
            })?;
            if parts.peek().is_none() {
                return Ok(Some(entry));
            }
            match entry.kind {
                EntryKind::Dir(r) => {
                    let in_dir = |e: FetchError| e.in_file(&at);
                    dir = self.directory(r, prio).await.map_err(in_dir)?
                }
                _ => {
                    return Err(FetchError::NotFound(format!(
                        "{name:?} in {path:?} is not a directory"
                    )))
                }
            }
        }
        Ok(None)
    }
}

/// Listens for root records until one passes `policy`, then for [`LISTEN`] more, and takes
/// the highest generation heard from that same publisher.
async fn trusted_root(
    fetcher: &Fetcher,
    policy: &RootPolicy,
    memory: &Memory,
    wait: Option<Duration>,
) -> Result<(HeardRoot, Publisher), FetchError> {
    // One join for the whole wait: the server repeats its record every 25 ms while the group
    // is joined, and a join and leave per record would make it answer each join at once.
    let mut roots = fetcher.watch_roots();
    let deadline = wait.map(|w| tokio::time::Instant::now() + w);
    let first = first_trusted(fetcher, policy, memory, &mut roots, deadline).await?;
    if policy.pinned.is_some() {
        return Ok(first);
    }
    let listen = tokio::time::Instant::now() + LISTEN;
    let until = deadline.map_or(listen, |d| d.min(listen));
    Ok(highest_until(policy, memory, &mut roots, first, until).await)
}

/// The first root record heard that passes `policy`. Records that fail (forged, unsigned,
/// stale, older, another publisher or snapshot) are skipped, so a flood of bad records
/// cannot stop a receiver from finding the good one; when time runs out the last refusal
/// is the error.
async fn first_trusted(
    fetcher: &Fetcher,
    policy: &RootPolicy,
    memory: &Memory,
    roots: &mut RootWatcher,
    deadline: Option<tokio::time::Instant>,
) -> Result<(HeardRoot, Publisher), FetchError> {
    let mut refused = None;
    loop {
        let next = match deadline {
            Some(d) => tokio::time::timeout_at(d, roots.next()).await,
            None => Ok(roots.next().await),
        };
        let heard = match next {
            Ok(Some(h)) => h,
            Ok(None) => return Err(FetchError::Closed),
            Err(_) => return Err(refused.unwrap_or_else(|| fetcher.no_root_error())),
        };
        match trust::check(policy, &heard, memory, unix_now_ns()) {
            Ok(publisher) => return Ok((heard, publisher)),
            Err(e) => {
                tracing::debug!("skipping a root record from {}: {e}", heard.from);
                refused = Some(untrusted(fetcher, e));
            }
        }
    }
}

/// The highest generation heard until `until` from the publisher of `first`, `first`
/// included (see [`is_later`]).
async fn highest_until(
    policy: &RootPolicy,
    memory: &Memory,
    roots: &mut RootWatcher,
    first: (HeardRoot, Publisher),
    until: tokio::time::Instant,
) -> (HeardRoot, Publisher) {
    let mut best = first;
    while let Ok(Some(heard)) = tokio::time::timeout_at(until, roots.next()).await {
        if is_later(policy, memory, &heard, (&best.0, best.1)) {
            best.0 = heard;
        }
    }
    best
}

/// Whether `heard` passes `policy` and is a higher generation of the publisher of `best`.
/// Only that publisher's later records count: otherwise anyone on the link could win with a
/// higher number (a replay defence must not become a way in).
fn is_later(
    policy: &RootPolicy,
    memory: &Memory,
    heard: &HeardRoot,
    (best, publisher): (&HeardRoot, Publisher),
) -> bool {
    match trust::check(policy, heard, memory, unix_now_ns()) {
        Ok(p) => p == publisher && heard.record.generation > best.record.generation,
        Err(e) => {
            tracing::debug!("skipping a root record from {}: {e}", heard.from);
            false
        }
    }
}

/// The rest of the listening window after [`Tree::open_early`] returned with the first
/// acceptable root record, and the generations heard after it. The root group stays joined
/// (the server repeats its record every 25 ms to a joined group: about 8 KB/s) until this is
/// dropped.
pub struct Listening {
    window: Option<tokio::sync::oneshot::Receiver<Option<RootRecord>>>,
    later: tokio::sync::mpsc::Receiver<RootRecord>,
    task: tokio::task::JoinHandle<()>,
}

impl Listening {
    /// A higher generation of the same publisher heard within [`LISTEN`] of the first
    /// record, remembered as the channel's latest; `None` when the first was the latest.
    /// Resolves once, when the window closes; `None` ever after.
    pub async fn newer(&mut self) -> Option<RootRecord> {
        match self.window.as_mut() {
            Some(w) => {
                let r = w.await.ok().flatten();
                self.window = None;
                r
            }
            None => None,
        }
    }

    /// The next higher generation of the same publisher heard after the window, trusted and
    /// remembered as the channel's latest. Pending forever when none comes.
    pub async fn later(&mut self) -> RootRecord {
        match self.later.recv().await {
            Some(r) => r,
            None => std::future::pending().await,
        }
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(super) fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
}

fn untrusted(fetcher: &Fetcher, e: trust::Refusal) -> FetchError {
    FetchError::Untrusted {
        channel: fetcher.channel().name().to_owned(),
        reason: e,
    }
}

/// What the cache remembers of this channel; unreadable records count as none.
pub(super) fn remembered(fetcher: &Fetcher) -> Result<Memory, FetchError> {
    let cache = fetcher.cache();
    let id = fetcher.channel().id();
    let cache_err = |what: &str| {
        let doing = format!(
            "read the {what} it remembers of channel {:?}",
            fetcher.channel().name()
        );
        move |e| FetchError::cache(doing, e)
    };
    let root = cache.get_root(id).map_err(cache_err("root record"))?;
    let publisher = cache.get_publisher(id).map_err(cache_err("publisher"))?;
    Ok(Memory {
        root: root.and_then(|b| RootRecord::decode(&b).ok()),
        publisher: publisher.and_then(|b| Publisher::decode(&b)),
    })
}

/// Remembers an accepted root record unless it is older than the one remembered, and its
/// publisher on first use (or when a new one was allowed). A pinned snapshot says nothing of
/// who publishes the channel, so it comes with no publisher.
/// A trusted record heard from the network: its sender's symbols are preferred under a
/// flood, and the cache remembers it (and its publisher, unless a pin was the trust).
fn accept(
    fetcher: &Fetcher,
    policy: &RootPolicy,
    heard: &HeardRoot,
    publisher: Publisher,
    memory: &Memory,
) {
    fetcher.prefer_sender(heard.from);
    let publisher = policy.pinned.is_none().then_some(publisher);
    remember(fetcher, &heard.record, publisher, memory);
}

pub(super) fn remember(
    fetcher: &Fetcher,
    root: &RootRecord,
    publisher: Option<Publisher>,
    memory: &Memory,
) {
    let cache = fetcher.cache();
    let id = fetcher.channel().id();
    if memory
        .root
        .as_ref()
        .is_none_or(|m| root.generation >= m.generation)
    {
        if let Err(e) = cache.set_root(id, &root.encode()) {
            tracing::warn!("cannot remember the root record: {e}");
        }
    }
    let Some(publisher) = publisher.filter(|p| memory.publisher != Some(*p)) else {
        return;
    };
    {
        if let Some(was) = memory.publisher {
            tracing::warn!(
                "channel {:?}: now trusting {publisher} (was {was})",
                fetcher.channel().name(),
            );
        }
        if let Err(e) = cache.set_publisher(id, &publisher.encode()) {
            tracing::warn!("cannot remember the channel's publisher: {e}");
        }
    }
}

/// One entry found by [`Tree::walk`], with its path relative to the walk's start.
#[derive(Clone, Debug)]
pub struct Found {
    pub path: std::path::PathBuf,
    pub entry: crate::wire::object::Entry,
}

/// Bounds on a walk. Directory objects are content-addressed, so one object may be named by
/// many parents, and every path to it counts: 21 forged objects (2.4 KB) once named a million
/// paths. Identical subtrees are legitimate (copies of a directory), so sharing is allowed up
/// to a multiple of the distinct entries, and the walk fails with a clear error beyond it.
#[derive(Clone, Copy, Debug)]
pub struct WalkLimits {
    /// Entries listed in all.
    pub max_entries: u64,
    /// Directory levels below the start: as deep as `lcfs serve` publishes (2048; a Linux
    /// path of 4096 bytes has at most that many).
    pub max_depth: usize,
    /// Entries reached through directory objects already listed elsewhere in this walk may
    /// be at most `shared_factor` times the distinct entries, plus `shared_slack`.
    pub shared_factor: u64,
    pub shared_slack: u64,
}

impl Default for WalkLimits {
    fn default() -> Self {
        WalkLimits {
            max_entries: 1 << 23,
            max_depth: 2048,
            shared_factor: 4,
            shared_slack: 1 << 16,
        }
    }
}

/// The chain of directory objects from a walk's start to one directory: a directory object
/// that is its own ancestor is a cycle (impossible with honest hashes, so hostile).
struct Lineage {
    hash: ObjectHash,
    parent: Option<std::sync::Arc<Lineage>>,
}

impl Lineage {
    fn contains(&self, h: &ObjectHash) -> bool {
        let mut at = Some(self);
        while let Some(l) = at {
            if l.hash == *h {
                return true;
            }
            at = l.parent.as_deref();
        }
        false
    }
}

/// Counts of a walk under way, checked against [`WalkLimits`].
#[derive(Default)]
struct WalkCount {
    seen: std::collections::HashSet<ObjectHash>,
    distinct: u64,
    shared: u64,
}

impl WalkCount {
    /// Counts the `n` entries of directory `h`; an error names the limit passed.
    fn add(&mut self, h: ObjectHash, n: u64, limits: &WalkLimits) -> Result<(), String> {
        if self.seen.insert(h) {
            self.distinct += n;
        } else {
            self.shared += n;
        }
        if self.distinct + self.shared > limits.max_entries {
            return Err(format!("it lists more than {} entries", limits.max_entries));
        }
        if self.shared > self.distinct * limits.shared_factor + limits.shared_slack {
            return Err(format!(
                "{} of its paths lead through directories already listed, against {} distinct entries: a tree that names the same directories over and over",
                self.shared, self.distinct
            ));
        }
        Ok(())
    }
}

impl Tree {
    /// Every entry below directory `start`, parents before children, within the default
    /// [`WalkLimits`]. Directories of one level are fetched concurrently.
    pub async fn walk(&self, start: ObjectRef, prio: Priority) -> Result<Vec<Found>, FetchError> {
        self.walk_within(start, prio, &WalkLimits::default()).await
    }

    /// [`Tree::walk`] within `limits`.
    pub async fn walk_within(
        &self,
        start: ObjectRef,
        prio: Priority,
        limits: &WalkLimits,
    ) -> Result<Vec<Found>, FetchError> {
        use std::os::unix::ffi::OsStrExt;
        use std::sync::Arc;
        let mut found = Vec::new();
        let mut count = WalkCount::default();
        let origin = Arc::new(Lineage {
            hash: start.hash,
            parent: None,
        });
        let mut level = vec![(std::path::PathBuf::new(), start, origin)];
        let mut depth = 0;
        while !level.is_empty() {
            let dirs = self
                .distinct_dirs(level.iter().map(|(_, r, _)| *r), prio)
                .await?;
            let mut next = Vec::new();
            for (base, r, lineage) in &level {
                let dir = &dirs[&r.hash];
                let over = |reason: String| self.too_big(base, reason);
                count
                    .add(r.hash, dir.entries.len() as u64, limits)
                    .map_err(over)?;
                for entry in &dir.entries {
                    let path = base.join(std::ffi::OsStr::from_bytes(&entry.name));
                    if let EntryKind::Dir(child) = entry.kind {
                        if lineage.contains(&child.hash) {
                            return Err(self.too_big(&path, "it contains itself".into()));
                        }
                        let lineage = Arc::new(Lineage {
                            hash: child.hash,
                            parent: Some(lineage.clone()),
                        });
                        next.push((path.clone(), child, lineage));
                    }
                    let entry = entry.clone();
                    found.push(Found { path, entry });
                }
            }
            depth += 1;
            if !next.is_empty() && depth >= limits.max_depth {
                return Err(self.too_big(
                    &next[0].0,
                    format!("it is more than {} directories deep", limits.max_depth),
                ));
            }
            level = next;
        }
        Ok(found)
    }

    /// Every distinct directory object and file below `start`, each directory listed once
    /// however many parents name it (what `prefetch` needs: objects, not paths).
    pub async fn distinct_below(
        &self,
        start: ObjectRef,
        prio: Priority,
        limits: &WalkLimits,
    ) -> Result<(Vec<ObjectRef>, Vec<FileRef>), FetchError> {
        let mut seen = std::collections::HashSet::from([start.hash]);
        let (mut dirs, mut files) = (vec![start], Vec::new());
        let mut level = vec![start];
        let (mut entries, mut depth) = (0u64, 0);
        while !level.is_empty() {
            let listed = try_join_all(level.iter().map(|r| self.directory(*r, prio))).await?;
            let mut next = Vec::new();
            for dir in listed {
                entries += dir.entries.len() as u64;
                for entry in dir.entries {
                    match entry.kind {
                        EntryKind::Dir(r) if seen.insert(r.hash) => next.push(r),
                        EntryKind::File(f) => files.push(f),
                        _ => {}
                    }
                }
            }
            depth += 1;
            if entries > limits.max_entries || (!next.is_empty() && depth >= limits.max_depth) {
                let why = format!(
                    "more than {} distinct entries or {} levels",
                    limits.max_entries, limits.max_depth
                );
                return Err(self.too_big(std::path::Path::new(""), why));
            }
            dirs.extend(&next);
            level = next;
        }
        Ok((dirs, files))
    }

    /// The directories of one level of a walk, fetched together and each decoded once
    /// however many paths lead to it.
    async fn distinct_dirs(
        &self,
        refs: impl Iterator<Item = ObjectRef>,
        prio: Priority,
    ) -> Result<std::collections::HashMap<ObjectHash, Directory>, FetchError> {
        let mut unique: Vec<ObjectRef> = refs.collect();
        unique.sort_by_key(|r| *r.hash.as_bytes());
        unique.dedup_by_key(|r| r.hash);
        let dirs = try_join_all(unique.iter().map(|r| self.directory(*r, prio))).await?;
        Ok(unique.iter().map(|r| r.hash).zip(dirs).collect())
    }

    fn too_big(&self, at: &std::path::Path, reason: String) -> FetchError {
        let mut what = Subject::tree();
        if !at.as_os_str().is_empty() {
            what.path = Some(at.display().to_string());
        }
        self.invalid(what, InvalidReason::TooBig(reason))
    }
}

#[cfg(test)]
impl Tree {
    /// A tree over `fetcher` whose root record is `root`, without asking the network: tests
    /// put the objects in the cache first.
    pub(crate) fn for_tests(fetcher: Fetcher, root: RootRecord) -> Tree {
        Tree {
            fetcher,
            root,
            origin: Origin::Offline,
            root_meta: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::channel::Channel;
    use crate::wire::object::{object_ref, Entry, FileHash, Timestamp};

    /// A tree whose objects all sit in a fresh cache; nothing is ever sent.
    fn cached_tree(objects: &[Vec<u8>], root: ObjectRef) -> (Tree, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let cache = lcfs_cache::Cache::open(lcfs_cache::CacheConfig::new(dir.path())).unwrap();
        for o in objects {
            cache.insert(&Verified::hash_of(o.clone())).unwrap();
        }
        let lo = crate::net::Iface {
            name: "lo".into(),
            index: 1,
            mtu: 65536,
        };
        let config = super::super::FetchConfig {
            timeout: Duration::from_secs(1),
            port: 0,
            ..Default::default()
        };
        let fetcher = Fetcher::start(Channel::new("t", None), lo, cache, config).unwrap();
        let record = RootRecord {
            channel_id: *Channel::new("t", None).id(),
            generation: 1,
            publish_time_ns: 0,
            root,
            block_size: BlockSize::DEFAULT,
            single_file: false,
            signature: None,
        };
        (Tree::for_tests(fetcher, record), dir)
    }

    fn dir_entry(name: &str, r: ObjectRef) -> Entry {
        Entry {
            name: name.as_bytes().to_vec(),
            mode: 0o755,
            mtime: Timestamp { secs: 0, nanos: 0 },
            nlink: 2,
            link: 0,
            kind: EntryKind::Dir(r),
        }
    }

    /// `levels` directories, each naming the next one twice: 2^levels paths from `levels`
    /// objects of a few dozen bytes each.
    fn doubling_tree(levels: usize) -> (Vec<Vec<u8>>, ObjectRef) {
        let mut objects = vec![Directory::new(vec![]).encode()];
        for _ in 0..levels {
            let below = object_ref(objects.last().unwrap());
            let d = Directory::new(vec![dir_entry("a", below), dir_entry("b", below)]);
            objects.push(d.encode());
        }
        let top = object_ref(objects.last().unwrap());
        (objects, top)
    }

    #[tokio::test]
    async fn a_doubling_tree_fails_cleanly_and_early() {
        let (objects, top) = doubling_tree(40);
        let (tree, _dir) = cached_tree(&objects, top);
        let e = tree.walk(top, Priority::Demand).await.unwrap_err();
        assert!(e.report().contains("already listed"), "{}", e.report());
        // Each directory object is listed once when only objects are wanted.
        let (dirs, files) = tree
            .distinct_below(top, Priority::Demand, &WalkLimits::default())
            .await
            .unwrap();
        assert_eq!((dirs.len(), files.len()), (41, 0));
    }

    #[tokio::test]
    async fn identical_subtrees_are_still_walked() {
        // Four copies of one directory of 100 files: ordinary sharing.
        let files: Vec<Entry> = (0..100)
            .map(|i| Entry {
                name: format!("f{i}").into_bytes(),
                mode: 0o644,
                mtime: Timestamp { secs: 0, nanos: 0 },
                nlink: 1,
                link: 0,
                kind: EntryKind::Symlink(b"x".to_vec()),
            })
            .collect();
        let leaf = Directory::new(files).encode();
        let r = object_ref(&leaf);
        let top = Directory::new((0..4).map(|i| dir_entry(&format!("copy{i}"), r)).collect());
        let top_enc = top.encode();
        let (tree, _dir) = cached_tree(&[leaf, top_enc.clone()], object_ref(&top_enc));
        let found = tree
            .walk(object_ref(&top_enc), Priority::Demand)
            .await
            .unwrap();
        assert_eq!(found.len(), 404);
    }

    #[tokio::test]
    async fn depth_is_bounded() {
        let mut objects = vec![Directory::new(vec![]).encode()];
        for _ in 0..40 {
            let below = object_ref(objects.last().unwrap());
            objects.push(Directory::new(vec![dir_entry("d", below)]).encode());
        }
        let top = object_ref(objects.last().unwrap());
        let (tree, _dir) = cached_tree(&objects, top);
        let limits = WalkLimits {
            max_depth: 16,
            ..WalkLimits::default()
        };
        let e = tree
            .walk_within(top, Priority::Demand, &limits)
            .await
            .unwrap_err();
        assert!(e.report().contains("16 directories deep"), "{}", e.report());
        assert_eq!(tree.walk(top, Priority::Demand).await.unwrap().len(), 40);
    }

    #[test]
    fn a_directory_that_is_its_own_ancestor_is_seen() {
        let (a, b) = (ObjectHash::of(b"a"), ObjectHash::of(b"b"));
        let root = std::sync::Arc::new(Lineage {
            hash: a,
            parent: None,
        });
        let child = Lineage {
            hash: b,
            parent: Some(root),
        };
        assert!(child.contains(&a) && child.contains(&b));
        assert!(!child.contains(&ObjectHash::of(b"c")));
    }

    #[tokio::test]
    async fn a_file_claiming_too_many_blocks_fails_before_any_fetch() {
        let (tree, _dir) = cached_tree(&[], object_ref(b"none"));
        let f = FileRef {
            size: 1 << 50,
            b3: FileHash::of(b""),
            content: Content::Index {
                index: object_ref(b"never fetched"),
                first_leaf: ObjectHash::of(b""),
            },
        };
        let e = tree.leaves(&f, Priority::Demand).await.unwrap_err();
        assert!(e.report().contains("--block-size"), "{}", e.report());
    }
}
