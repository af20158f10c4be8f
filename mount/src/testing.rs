//! [`MemSource`]: an in-memory [`Source`] for tests, here and in the crates that use the mount.
//!
//! A tree of directories, files and symlinks named by `/`-separated paths, with failure
//! injection ([`Fault`]: a delay, then optionally an error, for the lists and reads of one
//! path) and a log of every read with its [`ReadHint`], so tests can check what the mount
//! asked for.
//!
//! ```
//! use lcfs_mount::testing::MemSource;
//! let mut src = MemSource::new();
//! src.file("bin/hello.sh", b"#!/bin/sh\necho hi\n".to_vec(), 0o755)
//!     .symlink("hello", "bin/hello.sh")
//!     .dir("empty", 0o700);
//! // Later, while mounted: a new version, as a publisher would make it.
//! src.publish(|t| {
//!     t.file("bin/hello.sh", b"#!/bin/sh\necho bye\n".to_vec(), 0o755)
//!         .remove("empty");
//! });
//! ```
//!
//! Versions: [`MemSource::publish`] edits a copy of the current tree ([`MemTree`]) and makes
//! it the next version; the mount learns of it through [`Source::next_version`]. A node
//! ([`MemNode`]) belongs to the version it was listed from and keeps reading that version,
//! as a content-addressed store would, until [`MemSource::forget_old`]: from then on, a read
//! of an old node whose bytes differ from the current version's at its path fails with
//! [`SourceError::Stale`], as a server that stopped sending them would make it.
//!
//! Invariants: a node is a version and a path (the root is ""); parents are created as needed
//! (0o755); listings come out sorted by name bytes.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

use crate::source::{Attr, BoxFuture, Child, Kind, ReadHint, Source, SourceError, Totals, Version};

/// The default mtime of every node (2023-11-14).
pub const DEFAULT_MTIME: i64 = 1_700_000_000;

/// What happens to the lists and reads of one path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fault {
    /// How long the operation takes.
    pub delay: Duration,
    /// The error it ends with (`None`: it succeeds after the delay).
    pub error: Option<SourceError>,
}

impl Fault {
    /// Fails with [`SourceError::Unavailable`] after `delay`.
    pub fn unavailable_after(delay: Duration) -> Fault {
        Fault {
            delay,
            error: Some(SourceError::Unavailable("injected fault".into())),
        }
    }

    /// Succeeds after `delay`.
    pub fn slow(delay: Duration) -> Fault {
        Fault { delay, error: None }
    }
}

/// One read the mount made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadRecord {
    pub path: String,
    /// The version of the node read.
    pub version: u64,
    pub offset: u64,
    pub len: u32,
    pub hint: ReadHint,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct MemEntry {
    attr: Attr,
    data: Arc<Vec<u8>>,
    target: Option<Vec<u8>>,
    xattrs: Vec<(String, Vec<u8>)>,
}

fn entry(kind: Kind, size: u64, mode: u32) -> MemEntry {
    let attr = Attr {
        kind,
        size,
        mode,
        mtime_secs: DEFAULT_MTIME,
        mtime_nanos: 0,
        nlink: if kind == Kind::Dir { 2 } else { 1 },
        link: 0,
    };
    MemEntry {
        attr,
        data: Arc::default(),
        target: None,
        xattrs: Vec::new(),
    }
}

fn clean(path: &str) -> String {
    path.split('/')
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("/")
}

/// `path/` (or "" for the root): what every path below `path` starts with.
fn prefix(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!("{path}/")
    }
}

/// One version of a [`MemSource`]'s tree, and the builder of the next one.
#[derive(Clone, Debug)]
pub struct MemTree {
    version: u64,
    root: MemEntry,
    tree: BTreeMap<String, MemEntry>,
}

impl MemTree {
    fn new() -> MemTree {
        MemTree {
            version: 1,
            root: entry(Kind::Dir, 0, 0o755),
            tree: BTreeMap::new(),
        }
    }

    /// Its version number.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Adds (or replaces) directory `path` with permission bits `mode`.
    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.insert(path, entry(Kind::Dir, 0, mode))
    }

    /// Adds (or replaces) file `path` holding `data`.
    pub fn file(&mut self, path: &str, data: Vec<u8>, mode: u32) -> &mut Self {
        let mut e = entry(Kind::File, data.len() as u64, mode);
        e.data = Arc::new(data);
        self.insert(path, e)
    }

    /// Adds (or replaces) symlink `path` pointing at `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut e = entry(Kind::Symlink, target.len() as u64, 0o777);
        e.target = Some(target.as_bytes().to_vec());
        self.insert(path, e)
    }

    /// Sets the mtime of `path` (which must exist).
    pub fn mtime(&mut self, path: &str, secs: i64, nanos: u32) -> &mut Self {
        let e = self.entry_mut(path);
        e.attr.mtime_secs = secs;
        e.attr.mtime_nanos = nanos;
        self
    }

    /// Sets the permission bits of `path` (which must exist).
    pub fn chmod(&mut self, path: &str, mode: u32) -> &mut Self {
        self.entry_mut(path).attr.mode = mode;
        self
    }

    /// Adds extended attribute `name` to `path` (which must exist).
    pub fn xattr(&mut self, path: &str, name: &str, value: &[u8]) -> &mut Self {
        self.entry_mut(path)
            .xattrs
            .push((name.to_string(), value.to_vec()));
        self
    }

    /// Removes `path` and everything below it (which must exist).
    pub fn remove(&mut self, path: &str) -> &mut Self {
        let path = clean(path);
        assert!(
            self.tree.remove(&path).is_some(),
            "MemSource: no {path:?} to remove"
        );
        let below = prefix(&path);
        self.tree.retain(|p, _| !p.starts_with(&below));
        self
    }

    /// Moves `from` and everything below it to `to` (whose parent must exist or is created).
    pub fn rename(&mut self, from: &str, to: &str) -> &mut Self {
        let (from, to) = (clean(from), clean(to));
        let below = prefix(&from);
        let moved: Vec<(String, MemEntry)> = self
            .tree
            .iter()
            .filter(|(p, _)| **p == from || p.starts_with(&below))
            .map(|(p, e)| (format!("{to}{}", &p[from.len()..]), e.clone()))
            .collect();
        assert!(!moved.is_empty(), "MemSource: no {from:?} to rename");
        self.remove(&from);
        for (p, e) in moved {
            self.insert(&p, e);
        }
        self
    }

    fn entry_mut(&mut self, path: &str) -> &mut MemEntry {
        let path = clean(path);
        if path.is_empty() {
            return &mut self.root;
        }
        self.tree
            .get_mut(&path)
            .unwrap_or_else(|| panic!("MemSource: no {path:?}"))
    }

    fn insert(&mut self, path: &str, e: MemEntry) -> &mut Self {
        let path = clean(path);
        assert!(!path.is_empty(), "MemSource: the root exists already");
        for (i, _) in path.match_indices('/') {
            let parent = self
                .tree
                .entry(path[..i].to_string())
                .or_insert_with(|| entry(Kind::Dir, 0, 0o755));
            assert_eq!(
                parent.attr.kind,
                Kind::Dir,
                "MemSource: {:?} is not a directory",
                &path[..i]
            );
        }
        self.tree.insert(path, e);
        self
    }

    fn get(&self, path: &str) -> Option<&MemEntry> {
        if path.is_empty() {
            Some(&self.root)
        } else {
            self.tree.get(path)
        }
    }

    /// Everything strictly below `path`, with paths relative to it.
    fn below<'a>(&'a self, path: &str) -> impl Iterator<Item = (&'a str, &'a MemEntry)> + 'a {
        let prefix = prefix(path);
        let n = prefix.len();
        self.tree
            .range(prefix.clone()..)
            .take_while(move |(p, _)| p.starts_with(&prefix))
            .map(move |(p, e)| (&p[n..], e))
    }
}

/// A node of a [`MemSource`]: a path in one version.
#[derive(Clone)]
pub struct MemNode {
    tree: Arc<MemTree>,
    path: Arc<str>,
}

impl MemNode {
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn version(&self) -> u64 {
        self.tree.version
    }

    fn entry(&self) -> Option<&MemEntry> {
        self.tree.get(&self.path)
    }
}

impl std::fmt::Debug for MemNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "v{}:{:?}", self.tree.version, self.path)
    }
}

/// An in-memory tree served as a [`Source`], in versions.
#[derive(Debug)]
pub struct MemSource {
    /// The current version; its receivers learn of new ones.
    current: watch::Sender<Arc<MemTree>>,
    old_gone: AtomicBool,
    faults: Mutex<HashMap<String, Fault>>,
    reads: Mutex<Vec<ReadRecord>>,
    lists: Mutex<Vec<String>>,
}

impl Default for MemSource {
    fn default() -> Self {
        MemSource::new()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MemSource {
    /// Version 1: an empty root directory (mode 0o755).
    pub fn new() -> MemSource {
        MemSource {
            current: watch::Sender::new(Arc::new(MemTree::new())),
            old_gone: AtomicBool::new(false),
            faults: Mutex::default(),
            reads: Mutex::default(),
            lists: Mutex::default(),
        }
    }

    /// Changes the current version in place (building it, before the source is shared).
    fn build(&mut self, edit: impl FnOnce(&mut MemTree)) -> &mut Self {
        self.current.send_modify(|t| edit(Arc::make_mut(t)));
        self
    }

    /// Adds directory `path` with permission bits `mode`.
    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.build(|t| {
            t.dir(path, mode);
        })
    }

    /// Adds file `path` holding `data`.
    pub fn file(&mut self, path: &str, data: Vec<u8>, mode: u32) -> &mut Self {
        self.build(|t| {
            t.file(path, data, mode);
        })
    }

    /// Adds symlink `path` pointing at `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.build(|t| {
            t.symlink(path, target);
        })
    }

    /// Sets the mtime of `path` (which must exist).
    pub fn mtime(&mut self, path: &str, secs: i64, nanos: u32) -> &mut Self {
        self.build(|t| {
            t.mtime(path, secs, nanos);
        })
    }

    /// Adds extended attribute `name` to `path` (which must exist).
    pub fn xattr(&mut self, path: &str, name: &str, value: &[u8]) -> &mut Self {
        self.build(|t| {
            t.xattr(path, name, value);
        })
    }

    /// Makes the next version: a copy of the current tree changed by `edit`. Returns its
    /// number.
    pub fn publish(&self, edit: impl FnOnce(&mut MemTree)) -> u64 {
        let mut next = self.tree().as_ref().clone();
        next.version += 1;
        edit(&mut next);
        let number = next.version;
        self.current.send_replace(Arc::new(next));
        number
    }

    fn tree(&self) -> Arc<MemTree> {
        self.current.borrow().clone()
    }

    /// From now on, old nodes whose bytes the current version does not hold at their path
    /// fail to read with [`SourceError::Stale`].
    pub fn forget_old(&self) {
        self.old_gone.store(true, Ordering::Relaxed);
    }

    /// The current version's number.
    pub fn version(&self) -> u64 {
        self.current.borrow().version
    }

    /// Makes the lists and reads of `path` behave as `fault` says from now on.
    pub fn set_fault(&self, path: &str, fault: Fault) {
        lock(&self.faults).insert(clean(path), fault);
    }

    /// Removes the fault of `path`.
    pub fn clear_fault(&self, path: &str) {
        lock(&self.faults).remove(&clean(path));
    }

    /// Every read so far, oldest first.
    pub fn reads(&self) -> Vec<ReadRecord> {
        lock(&self.reads).clone()
    }

    /// The directories listed so far, oldest first.
    pub fn lists(&self) -> Vec<String> {
        lock(&self.lists).clone()
    }

    /// The bytes of file `path` in the current version (empty for anything else).
    pub fn contents(&self, path: &str) -> Arc<Vec<u8>> {
        self.tree()
            .get(&clean(path))
            .map(|e| e.data.clone())
            .unwrap_or_default()
    }
}

fn node(tree: &Arc<MemTree>, path: &str) -> MemNode {
    MemNode {
        tree: tree.clone(),
        path: Arc::from(path),
    }
}

impl MemSource {
    fn children(&self, dir: &MemNode) -> Vec<Child<MemNode>> {
        let base = prefix(&dir.path);
        dir.tree
            .below(&dir.path)
            .filter(|(rel, _)| !rel.contains('/'))
            .map(|(rel, e)| Child {
                name: OsString::from_vec(rel.as_bytes().to_vec()),
                attr: e.attr.clone(),
                target: e.target.clone(),
                node: node(&dir.tree, &format!("{base}{rel}")),
            })
            .collect()
    }

    /// Whether `node`'s bytes are gone (see [`MemSource::forget_old`]).
    fn gone(&self, node: &MemNode, e: &MemEntry) -> bool {
        if !self.old_gone.load(Ordering::Relaxed) {
            return false;
        }
        let current = self.tree();
        node.tree.version < current.version
            && current.get(&node.path).is_none_or(|c| c.data != e.data)
    }

    /// Runs `result` after the fault of `path`, if any.
    fn faulty<T: Send + 'static>(
        &self,
        path: &str,
        result: Result<T, SourceError>,
    ) -> BoxFuture<Result<T, SourceError>> {
        let fault = lock(&self.faults).get(path).cloned();
        Box::pin(async move {
            let Some(fault) = fault else { return result };
            tokio::time::sleep(fault.delay).await;
            match fault.error {
                Some(e) => Err(e),
                None => result,
            }
        })
    }
}

fn kind_name(kind: Kind) -> &'static [u8] {
    match kind {
        Kind::File => b"file",
        Kind::Dir => b"dir",
        Kind::Symlink => b"symlink",
    }
}

/// Whether the subtrees below `a` and `b` are equal, entry for entry.
fn same_subtree(a: &MemNode, b: &MemNode) -> bool {
    let mut x = a.tree.below(&a.path);
    let mut y = b.tree.below(&b.path);
    loop {
        match (x.next(), y.next()) {
            (None, None) => return true,
            (Some(p), Some(q)) if p == q => {}
            _ => return false,
        }
    }
}

fn version_of(tree: &Arc<MemTree>) -> Version<MemNode> {
    Version {
        number: tree.version,
        attr: tree.root.attr.clone(),
        root: node(tree, ""),
    }
}

fn bytes_of(e: &MemEntry, offset: u64, len: u32) -> Vec<u8> {
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(e.data.len());
    let end = start.saturating_add(len as usize).min(e.data.len());
    e.data[start..end].to_vec()
}

impl Source for MemSource {
    type Node = MemNode;

    fn root(&self) -> Version<MemNode> {
        version_of(&self.tree())
    }

    fn next_version(&self, seen: u64) -> BoxFuture<Result<Version<MemNode>, SourceError>> {
        let mut rx = self.current.subscribe();
        Box::pin(async move {
            let tree = rx
                .wait_for(|t| t.version > seen)
                .await
                .map_err(|_| SourceError::Closed)?;
            Ok(version_of(&tree))
        })
    }

    fn same_content(&self, a: &MemNode, b: &MemNode) -> bool {
        if Arc::ptr_eq(&a.tree, &b.tree) && a.path == b.path {
            return true;
        }
        match (a.entry(), b.entry()) {
            (Some(x), Some(y)) if x.attr.kind == y.attr.kind => match x.attr.kind {
                Kind::File => x.data == y.data,
                Kind::Symlink => x.target == y.target,
                Kind::Dir => same_subtree(a, b),
            },
            _ => false,
        }
    }

    fn list(&self, dir: &MemNode) -> BoxFuture<Result<Arc<Vec<Child<MemNode>>>, SourceError>> {
        lock(&self.lists).push(dir.path.to_string());
        let result = match dir.entry() {
            Some(e) if e.attr.kind == Kind::Dir => Ok(Arc::new(self.children(dir))),
            _ => Err(SourceError::WrongKind),
        };
        self.faulty(&dir.path, result)
    }

    fn read(
        &self,
        file: &MemNode,
        offset: u64,
        len: u32,
        hint: ReadHint,
    ) -> BoxFuture<Result<Vec<u8>, SourceError>> {
        let record = ReadRecord {
            path: file.path.to_string(),
            version: file.version(),
            offset,
            len,
            hint,
        };
        lock(&self.reads).push(record);
        let result = match file.entry() {
            Some(e) if e.attr.kind == Kind::File && self.gone(file, e) => Err(SourceError::Stale(
                format!("{} of version {} is gone", file.path, file.version()),
            )),
            Some(e) if e.attr.kind == Kind::File => Ok(bytes_of(e, offset, len)),
            _ => Err(SourceError::WrongKind),
        };
        self.faulty(&file.path, result)
    }

    fn xattrs(&self, node: &MemNode, root: bool) -> Vec<(String, Vec<u8>)> {
        let Some(e) = node.entry() else {
            return Vec::new();
        };
        let mut xattrs = vec![(
            "user.lcfs.kind".to_string(),
            kind_name(e.attr.kind).to_vec(),
        )];
        if e.attr.kind == Kind::File {
            xattrs.push((
                "user.lcfs.size".to_string(),
                e.attr.size.to_string().into_bytes(),
            ));
        }
        if root {
            xattrs.push(("user.lcfs.source".to_string(), b"memory".to_vec()));
            let v = self.version().to_string().into_bytes();
            xattrs.push(("user.lcfs.generation".to_string(), v));
        }
        xattrs.extend(e.xattrs.iter().cloned());
        xattrs
    }

    fn totals(&self) -> Totals {
        let current = self.tree();
        let bytes = current.tree.values().map(|e| e.data.len() as u64).sum();
        Totals {
            bytes,
            files: current.tree.len() as u64 + 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> MemSource {
        let mut s = MemSource::new();
        s.file("a/b/c.txt", b"hello".to_vec(), 0o644)
            .symlink("a/l", "b/c.txt")
            .dir("z", 0o700);
        s
    }

    /// The node at `path` of the current version.
    fn at(s: &MemSource, path: &str) -> MemNode {
        node(&s.tree(), path)
    }

    #[tokio::test]
    async fn lists_are_sorted_and_create_parents() {
        let s = source();
        let root = s.list(&s.root().root).await.unwrap();
        let names: Vec<_> = root.iter().map(|c| c.name.clone()).collect();
        assert_eq!(names, ["a", "z"]);
        let a = s.list(&root[0].node).await.unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(a[1].target.as_deref(), Some(&b"b/c.txt"[..]));
        assert_eq!(s.lists(), ["", "a"]);
    }

    #[tokio::test]
    async fn reads_clip_at_the_end_and_are_logged() {
        let s = source();
        let node = at(&s, "a/b/c.txt");
        let hint = ReadHint {
            readahead: 7,
            superseded: false,
        };
        assert_eq!(s.read(&node, 3, 100, hint).await.unwrap(), b"lo");
        assert_eq!(s.read(&node, 100, 1, hint).await.unwrap(), b"");
        assert_eq!(
            s.reads()[0],
            ReadRecord {
                path: "a/b/c.txt".into(),
                version: 1,
                offset: 3,
                len: 100,
                hint
            }
        );
        assert_eq!(
            s.read(&at(&s, "a"), 0, 1, hint).await,
            Err(SourceError::WrongKind)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn faults_delay_then_fail() {
        let s = source();
        s.set_fault(
            "/a/b/c.txt",
            Fault::unavailable_after(Duration::from_secs(5)),
        );
        let started = tokio::time::Instant::now();
        let r = s
            .read(&at(&s, "a/b/c.txt"), 0, 1, ReadHint::default())
            .await;
        assert!(matches!(r, Err(SourceError::Unavailable(_))));
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        s.clear_fault("a/b/c.txt");
        assert!(s
            .read(&at(&s, "a/b/c.txt"), 0, 1, ReadHint::default())
            .await
            .is_ok());
    }

    #[test]
    fn xattrs_and_totals() {
        let mut s = source();
        s.xattr("z", "user.lcfs.test", b"7");
        let z = s.xattrs(&at(&s, "z"), false);
        assert!(z.contains(&("user.lcfs.test".to_string(), b"7".to_vec())));
        assert!(s
            .xattrs(&at(&s, ""), true)
            .iter()
            .any(|(n, _)| n == "user.lcfs.source"));
        assert_eq!(s.totals(), Totals { bytes: 5, files: 6 });
    }

    #[tokio::test]
    async fn old_nodes_read_their_version_until_forgotten() {
        let s = source();
        let old = at(&s, "a/b/c.txt");
        let v = s.publish(|t| {
            t.file("a/b/c.txt", b"HELLO".to_vec(), 0o644)
                .rename("z", "y")
                .remove("a/l");
        });
        assert_eq!((v, s.version()), (2, 2));
        assert_eq!(s.next_version(1).await.unwrap().number, 2);
        let hint = ReadHint::default();
        assert_eq!(s.read(&old, 0, 5, hint).await.unwrap(), b"hello");
        assert_eq!(
            s.read(&at(&s, "a/b/c.txt"), 0, 5, hint).await.unwrap(),
            b"HELLO"
        );
        s.forget_old();
        assert!(matches!(
            s.read(&old, 0, 5, hint).await,
            Err(SourceError::Stale(_))
        ));
        let names: Vec<_> = s
            .list(&s.root().root)
            .await
            .unwrap()
            .iter()
            .map(|c| c.name.clone())
            .collect();
        assert_eq!(names, ["a", "y"]);
    }

    #[test]
    fn same_content_compares_bytes_and_whole_subtrees() {
        let s = source();
        let (a1, c1, z1) = (at(&s, "a"), at(&s, "a/b/c.txt"), at(&s, "z"));
        s.publish(|t| {
            t.chmod("a/b/c.txt", 0o600);
        });
        let (a2, c2, z2) = (at(&s, "a"), at(&s, "a/b/c.txt"), at(&s, "z"));
        assert!(s.same_content(&c1, &c2), "a mode change keeps the bytes");
        assert!(
            !s.same_content(&a1, &a2),
            "but changes the directories above"
        );
        assert!(s.same_content(&z1, &z2));
        assert!(!s.same_content(&at(&s, ""), &a2));
    }
}
