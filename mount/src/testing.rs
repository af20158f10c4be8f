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
//! ```
//!
//! Invariants: a node is its path (the root is ""); parents are created as needed (0o755);
//! listings come out sorted by name bytes.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::source::{Attr, BoxFuture, Child, Kind, ReadHint, Source, SourceError, Totals};

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
    pub offset: u64,
    pub len: u32,
    pub hint: ReadHint,
}

#[derive(Clone, Debug)]
struct MemEntry {
    attr: Attr,
    data: Arc<Vec<u8>>,
    target: Option<Vec<u8>>,
    xattrs: Vec<(String, Vec<u8>)>,
}

/// An in-memory tree served as a [`Source`].
#[derive(Debug)]
pub struct MemSource {
    root: MemEntry,
    tree: BTreeMap<String, MemEntry>,
    faults: Mutex<HashMap<String, Fault>>,
    reads: Mutex<Vec<ReadRecord>>,
    lists: Mutex<Vec<String>>,
}

impl Default for MemSource {
    fn default() -> Self {
        MemSource::new()
    }
}

fn entry(kind: Kind, size: u64, mode: u32) -> MemEntry {
    let attr = Attr {
        kind,
        size,
        mode,
        mtime_secs: DEFAULT_MTIME,
        mtime_nanos: 0,
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

impl MemSource {
    /// An empty root directory (mode 0o755).
    pub fn new() -> MemSource {
        MemSource {
            root: entry(Kind::Dir, 0, 0o755),
            tree: BTreeMap::new(),
            faults: Mutex::default(),
            reads: Mutex::default(),
            lists: Mutex::default(),
        }
    }

    /// Adds directory `path` with permission bits `mode`.
    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.insert(path, entry(Kind::Dir, 0, mode))
    }

    /// Adds file `path` holding `data`.
    pub fn file(&mut self, path: &str, data: Vec<u8>, mode: u32) -> &mut Self {
        let mut e = entry(Kind::File, data.len() as u64, mode);
        e.data = Arc::new(data);
        self.insert(path, e)
    }

    /// Adds symlink `path` pointing at `target`.
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

    /// Adds extended attribute `name` to `path` (which must exist).
    pub fn xattr(&mut self, path: &str, name: &str, value: &[u8]) -> &mut Self {
        self.entry_mut(path)
            .xattrs
            .push((name.to_string(), value.to_vec()));
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

    /// Makes the lists and reads of `path` behave as `fault` says from now on.
    pub fn set_fault(&self, path: &str, fault: Fault) {
        self.faults
            .lock()
            .expect("faults")
            .insert(clean(path), fault);
    }

    /// Removes the fault of `path`.
    pub fn clear_fault(&self, path: &str) {
        self.faults.lock().expect("faults").remove(&clean(path));
    }

    /// Every read so far, oldest first.
    pub fn reads(&self) -> Vec<ReadRecord> {
        self.reads.lock().expect("reads").clone()
    }

    /// The directories listed so far, oldest first.
    pub fn lists(&self) -> Vec<String> {
        self.lists.lock().expect("lists").clone()
    }

    /// The bytes of file `path` (empty for anything else).
    pub fn contents(&self, path: &str) -> Arc<Vec<u8>> {
        self.get(&clean(path))
            .map(|e| e.data.clone())
            .unwrap_or_default()
    }

    fn get(&self, path: &str) -> Option<&MemEntry> {
        if path.is_empty() {
            Some(&self.root)
        } else {
            self.tree.get(path)
        }
    }

    fn children(&self, dir: &str) -> Vec<Child<Arc<str>>> {
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        let under = self
            .tree
            .range(prefix.clone()..)
            .take_while(|(p, _)| p.starts_with(&prefix));
        under
            .filter(|(p, _)| !p[prefix.len()..].contains('/'))
            .map(|(p, e)| Child {
                name: OsString::from_vec(p.as_bytes()[prefix.len()..].to_vec()),
                attr: e.attr.clone(),
                target: e.target.clone(),
                node: Arc::from(p.as_str()),
            })
            .collect()
    }

    /// Runs `result` after the fault of `path`, if any.
    fn faulty<T: Send + 'static>(
        &self,
        path: &str,
        result: Result<T, SourceError>,
    ) -> BoxFuture<Result<T, SourceError>> {
        let fault = self.faults.lock().expect("faults").get(path).cloned();
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

impl Source for MemSource {
    type Node = Arc<str>;

    fn root(&self) -> (Arc<str>, Attr) {
        (Arc::from(""), self.root.attr.clone())
    }

    fn list(&self, dir: &Arc<str>) -> BoxFuture<Result<Arc<Vec<Child<Arc<str>>>>, SourceError>> {
        self.lists.lock().expect("lists").push(dir.to_string());
        let result = match self.get(dir) {
            Some(e) if e.attr.kind == Kind::Dir => Ok(Arc::new(self.children(dir))),
            _ => Err(SourceError::WrongKind),
        };
        self.faulty(dir, result)
    }

    fn read(
        &self,
        file: &Arc<str>,
        offset: u64,
        len: u32,
        hint: ReadHint,
    ) -> BoxFuture<Result<Vec<u8>, SourceError>> {
        let record = ReadRecord {
            path: file.to_string(),
            offset,
            len,
            hint,
        };
        self.reads.lock().expect("reads").push(record);
        let result = match self.get(file) {
            Some(e) if e.attr.kind == Kind::File => {
                let start = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(e.data.len());
                let end = start.saturating_add(len as usize).min(e.data.len());
                Ok(e.data[start..end].to_vec())
            }
            _ => Err(SourceError::WrongKind),
        };
        self.faulty(file, result)
    }

    fn xattrs(&self, node: &Arc<str>, root: bool) -> Vec<(String, Vec<u8>)> {
        let Some(e) = self.get(node) else {
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
        }
        xattrs.extend(e.xattrs.iter().cloned());
        xattrs
    }

    fn totals(&self) -> Totals {
        let bytes = self.tree.values().map(|e| e.data.len() as u64).sum();
        Totals {
            bytes,
            files: self.tree.len() as u64 + 1,
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

    #[tokio::test]
    async fn lists_are_sorted_and_create_parents() {
        let s = source();
        let root = s.list(&s.root().0).await.unwrap();
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
        let node: Arc<str> = Arc::from("a/b/c.txt");
        let hint = ReadHint { readahead: 7 };
        assert_eq!(s.read(&node, 3, 100, hint).await.unwrap(), b"lo");
        assert_eq!(s.read(&node, 100, 1, hint).await.unwrap(), b"");
        assert_eq!(
            s.reads()[0],
            ReadRecord {
                path: "a/b/c.txt".into(),
                offset: 3,
                len: 100,
                hint
            }
        );
        assert_eq!(
            s.read(&Arc::from("a"), 0, 1, hint).await,
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
            .read(&Arc::from("a/b/c.txt"), 0, 1, ReadHint::default())
            .await;
        assert!(matches!(r, Err(SourceError::Unavailable(_))));
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        s.clear_fault("a/b/c.txt");
        assert!(s
            .read(&Arc::from("a/b/c.txt"), 0, 1, ReadHint::default())
            .await
            .is_ok());
    }

    #[test]
    fn xattrs_and_totals() {
        let mut s = source();
        s.xattr("z", "user.lcfs.generation", b"7");
        let z = s.xattrs(&Arc::from("z"), false);
        assert!(z.contains(&("user.lcfs.generation".to_string(), b"7".to_vec())));
        assert!(s
            .xattrs(&Arc::from(""), true)
            .iter()
            .any(|(n, _)| n == "user.lcfs.source"));
        assert_eq!(s.totals(), Totals { bytes: 5, files: 6 });
    }
}
