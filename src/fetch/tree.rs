//! The published tree as a receiver sees it: the trusted root, directories, file leaves and
//! blocks, each fetched through the engine (or found in the cache) and verified.
//!
//! Trust starts at the root record. [`RootPolicy`] decides whether a record is accepted: a
//! pinned root hash must match exactly; a publisher key must have signed it; otherwise its
//! generation must not be lower than one already seen for the channel (kept in the cache),
//! unless rollback is allowed. From the root down every object is checked against the
//! reference that named it, so nothing unverified reaches a caller.

use std::time::Duration;

use ed25519_dalek::VerifyingKey;
use futures::future::try_join_all;
use lcfs_cache::{Hash, Verified};

use super::{FetchError, Fetcher, Priority};
use crate::object::index::IndexShape;
use crate::object::{
    BlockSize, Content, Directory, EntryKind, FileIndex, FileRef, ObjectRef, RootRecord,
};

/// Which root records a receiver accepts.
#[derive(Clone, Debug, Default)]
pub struct RootPolicy {
    /// Accept only the snapshot whose root directory has this hash (`CHANNEL@ROOTHASH`).
    pub pinned: Option<Hash>,
    /// Accept only records signed by this publisher key.
    pub publisher: Option<VerifyingKey>,
    /// Accept a generation lower than one already seen.
    pub allow_rollback: bool,
}

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
        let remembered_root = match offline_wait {
            Some(_) => remembered(&fetcher)?,
            None => None,
        };
        let wait = match (offline_wait, &remembered_root) {
            (Some(wait), Some(_)) => wait,
            _ => fetcher.timeout(),
        };
        let (root, origin) = match (trusted_root(&fetcher, policy, wait).await, remembered_root) {
            (Ok(r), _) => (r, Origin::Network),
            (Err(FetchError::Timeout { .. }), Some(r)) => {
                check_policy(&fetcher, policy, &r)?;
                (r, Origin::Offline)
            }
            (Err(e), _) => return Err(e),
        };
        if origin == Origin::Network {
            let bytes = root.encode();
            if let Err(e) = fetcher.cache().set_root(fetcher.channel().id(), &bytes) {
                tracing::warn!("cannot remember the root record: {e}");
            }
        }
        Ok(Tree {
            fetcher,
            root,
            origin,
        })
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

    fn invalid(&self, what: String, reason: impl ToString) -> FetchError {
        FetchError::Invalid {
            channel: self.fetcher.channel().name().to_owned(),
            what,
            reason: reason.to_string(),
        }
    }

    pub async fn directory(&self, r: ObjectRef, prio: Priority) -> Result<Directory, FetchError> {
        let v = self.fetcher.fetch(r, prio).await?;
        Directory::decode(&v).map_err(|e| self.invalid(format!("directory {}", short(&r.hash)), e))
    }

    pub async fn root_dir(&self) -> Result<Directory, FetchError> {
        self.directory(self.root.root, Priority::Demand).await
    }

    /// The leaf hashes of a file with block content (empty for inline files).
    pub async fn leaves(&self, f: &FileRef, prio: Priority) -> Result<Vec<Hash>, FetchError> {
        let blocks = self.block_size().blocks_in(f.size);
        match &f.content {
            Content::Inline(_) => Ok(Vec::new()),
            Content::Block(h) if blocks == 1 => Ok(vec![*h]),
            Content::Block(_) => Err(self.invalid(
                "file".into(),
                "one block reference for a file of several blocks",
            )),
            Content::Index { index, .. } => {
                self.index_leaves(*index, IndexShape { blocks }, prio).await
            }
        }
    }

    async fn index_leaves(
        &self,
        r: ObjectRef,
        shape: IndexShape,
        prio: Priority,
    ) -> Result<Vec<Hash>, FetchError> {
        let what = || format!("file index {}", short(&r.hash));
        if r.len as u64 != shape.top_len() {
            return Err(self.invalid(what(), "length does not fit the file size"));
        }
        let v = self.fetcher.fetch(r, prio).await?;
        let index = FileIndex::decode(&v).map_err(|e| self.invalid(what(), e))?;
        shape.check(&index).map_err(|e| self.invalid(what(), e))?;
        match index {
            FileIndex::Leaves(l) => Ok(l),
            FileIndex::Pages(pages) => {
                let fetches = pages.iter().enumerate().map(|(i, h)| async move {
                    let pr = shape.page_ref(i as u64, *h);
                    let v = self.fetcher.fetch(pr, prio).await?;
                    match FileIndex::decode(&v) {
                        Ok(FileIndex::Leaves(l)) => Ok(l),
                        _ => Err(self
                            .invalid(format!("index page {}", short(h)), "not a page of leaves")),
                    }
                });
                Ok(try_join_all(fetches).await?.concat())
            }
        }
    }

    /// Block `index` of a file of `size` bytes whose leaf is `leaf`.
    pub async fn block(
        &self,
        leaf: Hash,
        size: u64,
        index: u64,
        prio: Priority,
    ) -> Result<Verified, FetchError> {
        let len = self.block_size().block_len(size, index);
        self.fetcher
            .fetch(ObjectRef { hash: leaf, len }, prio)
            .await
    }

    /// The entry at `path` (components separated by `/`), or the root directory for "".
    pub async fn resolve(&self, path: &str) -> Result<Option<crate::object::Entry>, FetchError> {
        let mut dir = self.root_dir().await?;
        let mut parts = path
            .split('/')
            .filter(|p| !p.is_empty() && *p != ".")
            .peekable();
        while let Some(name) = parts.next() {
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
                EntryKind::Dir(r) => dir = self.directory(r, Priority::Demand).await?,
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

fn short(h: &Hash) -> String {
    h.to_hex()[..16].to_owned()
}

/// Listens for root records until one passes `policy`. Records that fail it (forged,
/// unsigned, older, another snapshot) are skipped, so a flood of bad records cannot stop a
/// receiver from finding the good one; when time runs out the last refusal is the error.
async fn trusted_root(
    fetcher: &Fetcher,
    policy: &RootPolicy,
    wait: Duration,
) -> Result<RootRecord, FetchError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut refused = None;
    loop {
        let timeout = || {
            refused
                .clone()
                .unwrap_or_else(|| fetcher.timeout_error("the root record"))
        };
        let Ok(fetched) = tokio::time::timeout_at(deadline, fetcher.fetch_root()).await else {
            return Err(timeout());
        };
        let root = match fetched {
            Ok(r) => r,
            Err(FetchError::Timeout { .. }) => return Err(timeout()),
            Err(e) => return Err(e),
        };
        match check_policy(fetcher, policy, &root) {
            Ok(()) => return Ok(root),
            Err(e) => {
                tracing::debug!("skipping a root record: {e}");
                refused = Some(e);
            }
        }
    }
}

fn remembered(fetcher: &Fetcher) -> Result<Option<RootRecord>, FetchError> {
    let bytes = fetcher
        .cache()
        .get_root(fetcher.channel().id())
        .map_err(|e| FetchError::Cache(e.to_string()))?;
    Ok(bytes.and_then(|b| RootRecord::decode(&b).ok()))
}

fn check_policy(
    fetcher: &Fetcher,
    policy: &RootPolicy,
    root: &RootRecord,
) -> Result<(), FetchError> {
    let untrusted = |reason: String| FetchError::Untrusted {
        channel: fetcher.channel().name().to_owned(),
        reason,
    };
    if let Some(pin) = policy.pinned {
        if root.root.hash != pin {
            return Err(untrusted(format!(
                "the server publishes root {}, not the pinned snapshot {}",
                root.root.hash.to_hex(),
                pin.to_hex()
            )));
        }
        return Ok(());
    }
    if let Some(key) = &policy.publisher {
        if !root.verify(key) {
            return Err(untrusted(
                "the root record is not signed by the publisher key given with --publisher".into(),
            ));
        }
    }
    if let Some(seen) = remembered(fetcher)? {
        if root.generation < seen.generation && !policy.allow_rollback {
            return Err(untrusted(format!(
                "the server offers generation {} but generation {} was already seen: refusing a rollback (pass --allow-rollback to accept it)",
                root.generation, seen.generation
            )));
        }
    }
    Ok(())
}

/// One entry found by [`Tree::walk`], with its path relative to the walk's start.
#[derive(Clone, Debug)]
pub struct Found {
    pub path: std::path::PathBuf,
    pub entry: crate::object::Entry,
}

impl Tree {
    /// Every entry below directory `start`, parents before children. Directories of one level
    /// are fetched concurrently.
    pub async fn walk(&self, start: ObjectRef, prio: Priority) -> Result<Vec<Found>, FetchError> {
        use std::os::unix::ffi::OsStrExt;
        let mut found = Vec::new();
        let mut level = vec![(std::path::PathBuf::new(), start)];
        while !level.is_empty() {
            let dirs = try_join_all(level.iter().map(|(_, r)| self.directory(*r, prio))).await?;
            let mut next = Vec::new();
            for ((base, _), dir) in level.iter().zip(dirs) {
                for entry in dir.entries {
                    let path = base.join(std::ffi::OsStr::from_bytes(&entry.name));
                    if let EntryKind::Dir(r) = entry.kind {
                        next.push((path.clone(), r));
                    }
                    found.push(Found { path, entry });
                }
            }
            level = next;
        }
        Ok(found)
    }
}
