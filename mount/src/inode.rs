//! The inode table: which source node each inode number the kernel holds stands for.
//!
//! The table is populated lazily. Inode 1 is the root and is always present. When a
//! directory's listing is first needed it is stored on the directory's inode together with an
//! inode number for each child, taken from one counter. So readdir can report the same inode
//! numbers that lookup later gives, without creating table entries for children nobody looks
//! up.
//!
//! When the source moves to a new version (`switch.rs`), a child keeps its inode number when
//! its parent directory keeps its number, its name and kind are the same, and its content is
//! the same (a directory keeps its number whatever its content: it is diffed instead). So an
//! inode number stands for (parent inode, name, content), and a changed file is a new inode
//! with a page cache of its own: a file handle opened before the change keeps the old inode,
//! its page cache and its version, and never sees a byte of the new one.
//!
//! Invariants:
//! - An inode other than the root is in the table exactly while the kernel holds lookups on
//!   it: every reply that hands out an entry (lookup, readdirplus) counts one lookup
//!   ([`InodeTable::remember`]) before it is sent, and `forget` takes them back; at zero the
//!   inode and its listing are dropped, so memory follows what the kernel keeps.
//! - A stored listing changes only when the table moves to a new version, which bumps the
//!   epoch; a listing read from the source under an older epoch is not stored. Listings are
//!   sorted by name bytes.
//! - Inode numbers come from one counter and are never reused, across versions too, except
//!   that the names of one hard-link group ([`Attr::link`]) listed under the same epoch get
//!   one number: a hard link is one inode, as on the publisher. (Across a move to a new
//!   version a kept name keeps its number and a newly listed one may get another: the group
//!   is one inode again once its directories are listed afresh.)
//! - An inode is superseded once its entry was replaced or removed by a later version (or it
//!   was found below such an entry); it keeps reading the version it stood for.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use crate::error::FsError;
use crate::source::{Attr, Child, Kind};

mod switch;

pub use switch::{kept_dirs, Invalidation};

/// The root's inode number.
pub const ROOT: u64 = 1;

/// What the table keeps for one inode.
#[derive(Debug)]
pub struct Inode<N> {
    pub node: N,
    pub attr: Attr,
    /// The symlink's target, for symlinks.
    pub target: Option<Vec<u8>>,
    /// The directory this inode was found in (the root's parent is the root).
    pub parent: u64,
    /// A later version replaced or removed this entry (see the module doc).
    pub superseded: bool,
    lookups: u64,
    listing: Option<Listing<N>>,
}

/// A directory's entries, with the inode number of each.
#[derive(Debug)]
pub struct Listing<N> {
    pub children: Arc<Vec<Child<N>>>,
    /// The inode number of each child, in the same order.
    inos: Arc<[u64]>,
}

impl<N> Clone for Listing<N> {
    fn clone(&self) -> Self {
        Listing {
            children: self.children.clone(),
            inos: self.inos.clone(),
        }
    }
}

impl<N> Listing<N> {
    /// The inode number of child `index` (0 past the end, which no inode has).
    pub fn ino(&self, index: usize) -> u64 {
        self.inos.get(index).copied().unwrap_or(0)
    }

    /// Whether `self` and `other` are the same stored listing.
    pub fn same(&self, other: &Listing<N>) -> bool {
        Arc::ptr_eq(&self.children, &other.children)
    }

    /// The index of the child called `name`.
    pub fn find(&self, name: &OsStr) -> Option<usize> {
        self.children
            .binary_search_by(|c| c.name.as_bytes().cmp(name.as_bytes()))
            .ok()
    }
}

/// Inode number to node, attributes and listing.
#[derive(Debug)]
pub struct InodeTable<N> {
    inodes: HashMap<u64, Inode<N>>,
    next: u64,
    /// Bumped by every move to a new version.
    epoch: u64,
    /// The number given to each hard-link group listed under the current epoch.
    links: HashMap<u64, u64>,
}

impl<N: Clone> InodeTable<N> {
    /// A table holding only the root.
    pub fn new(root: N, attr: Attr) -> InodeTable<N> {
        let inode = Inode {
            node: root,
            attr,
            target: None,
            parent: ROOT,
            superseded: false,
            lookups: 1,
            listing: None,
        };
        InodeTable {
            inodes: HashMap::from([(ROOT, inode)]),
            next: ROOT + 1,
            epoch: 0,
            links: HashMap::new(),
        }
    }

    /// The current epoch: listings read from the source under it may be stored.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The inode `ino`, if the kernel may know it.
    pub fn get(&self, ino: u64) -> Result<&Inode<N>, FsError> {
        self.inodes.get(&ino).ok_or(FsError::NotFound)
    }

    /// The stored listing of directory `ino`, if any.
    pub fn listing(&self, ino: u64) -> Result<Option<Listing<N>>, FsError> {
        let inode = self.get(ino)?;
        if inode.attr.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        Ok(inode.listing.clone())
    }

    /// Stores `children`, listed from the source under `epoch`, as the listing of directory
    /// `ino`, unless one is already there (a concurrent list got there first); returns the
    /// stored one. `None` when the table moved to a new version meanwhile: the caller lists
    /// the directory's new node instead.
    pub fn set_listing(
        &mut self,
        ino: u64,
        children: Arc<Vec<Child<N>>>,
        epoch: u64,
    ) -> Result<Option<Listing<N>>, FsError> {
        let stale = epoch != self.epoch;
        let next = &mut self.next;
        let inode = self.inodes.get_mut(&ino).ok_or(FsError::NotFound)?;
        if inode.attr.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        if let Some(listing) = &inode.listing {
            return Ok(Some(listing.clone()));
        }
        if stale {
            return Ok(None);
        }
        let children = sorted(children);
        let links = &mut self.links;
        let inos = children
            .iter()
            .map(|c| new_ino(next, links, &c.attr))
            .collect();
        let listing = Listing { children, inos };
        inode.listing = Some(listing.clone());
        Ok(Some(listing))
    }

    /// Whether `listing` is the one stored on `dir` (no new version replaced it).
    pub fn is_current(&self, dir: u64, listing: &Listing<N>) -> bool {
        self.inodes
            .get(&dir)
            .and_then(|d| d.listing.as_ref())
            .is_some_and(|l| l.same(listing))
    }

    /// Counts one kernel lookup of child `index` of `listing`, the listing of `dir`; returns
    /// the child's inode number.
    pub fn remember(
        &mut self,
        dir: u64,
        listing: &Listing<N>,
        index: usize,
    ) -> Result<u64, FsError> {
        let child = listing.children.get(index).ok_or(FsError::NotFound)?;
        let ino = listing.ino(index);
        // Below a replaced or removed directory, everything is of the old version too.
        let superseded = self.inodes.get(&dir).is_some_and(|d| d.superseded);
        let inode = self.inodes.entry(ino).or_insert_with(|| Inode {
            node: child.node.clone(),
            attr: child.attr.clone(),
            target: child.target.clone(),
            parent: dir,
            superseded,
            lookups: 0,
            listing: None,
        });
        inode.lookups += 1;
        Ok(ino)
    }

    /// Takes back `n` lookups of `ino`; drops the inode when none are left.
    pub fn forget(&mut self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        if let Some(inode) = self.inodes.get_mut(&ino) {
            inode.lookups = inode.lookups.saturating_sub(n);
            if inode.lookups == 0 {
                self.inodes.remove(&ino);
            }
        }
    }

    /// How many inodes the table holds.
    pub fn len(&self) -> usize {
        self.inodes.len()
    }
}

/// The inode number of a newly listed child: its hard-link group's if another name of the
/// group was listed in this epoch, else the next from the counter.
fn new_ino(next: &mut u64, links: &mut HashMap<u64, u64>, attr: &Attr) -> u64 {
    let mut fresh = || {
        let n = *next;
        *next += 1;
        n
    };
    match attr.link {
        0 => fresh(),
        link => *links.entry(link).or_insert_with(fresh),
    }
}

/// The listing in name order (sources promise it; this keeps lookup right if one does not).
pub fn sorted<N: Clone>(children: Arc<Vec<Child<N>>>) -> Arc<Vec<Child<N>>> {
    if children
        .windows(2)
        .all(|w| w[0].name.as_bytes() < w[1].name.as_bytes())
    {
        return children;
    }
    let mut v = children.as_ref().clone();
    v.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    v.dedup_by(|a, b| a.name == b.name);
    Arc::new(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: Kind) -> Attr {
        Attr {
            kind,
            size: 0,
            mode: 0o755,
            mtime_secs: 0,
            mtime_nanos: 0,
            nlink: 1,
            link: 0,
        }
    }

    fn child(name: &str, kind: Kind, node: u32) -> Child<u32> {
        Child {
            name: name.into(),
            attr: attr(kind),
            target: None,
            node,
        }
    }

    fn table() -> InodeTable<u32> {
        InodeTable::new(0, attr(Kind::Dir))
    }

    fn set(t: &mut InodeTable<u32>, ino: u64, children: Arc<Vec<Child<u32>>>) -> Listing<u32> {
        let epoch = t.epoch();
        t.set_listing(ino, children, epoch).unwrap().unwrap()
    }

    fn listing(names: &[&str]) -> Arc<Vec<Child<u32>>> {
        Arc::new(
            names
                .iter()
                .zip(1..)
                .map(|(n, i)| child(n, Kind::File, i))
                .collect(),
        )
    }

    #[test]
    fn children_get_the_numbers_of_their_block() {
        let mut t = table();
        let l = set(&mut t, ROOT, listing(&["a", "b", "c"]));
        assert_eq!(l.ino(0), 2);
        assert_eq!(t.remember(ROOT, &l, 2).unwrap(), 4);
        assert_eq!(t.get(4).unwrap().node, 3);
        assert_eq!(t.get(4).unwrap().parent, ROOT);
        assert_eq!(l.find("b".as_ref()), Some(1));
        assert_eq!(l.find("z".as_ref()), None);
    }

    #[test]
    fn blocks_do_not_overlap() {
        let mut t = table();
        let root = set(
            &mut t,
            ROOT,
            Arc::new(vec![child("d", Kind::Dir, 1), child("e", Kind::Dir, 2)]),
        );
        let d = t.remember(ROOT, &root, 0).unwrap();
        let e = t.remember(ROOT, &root, 1).unwrap();
        let ld = set(&mut t, d, listing(&["x", "y"]));
        let le = set(&mut t, e, listing(&["x"]));
        let all = [d, e, ld.ino(0), ld.ino(1), le.ino(0)];
        let mut unique = all.to_vec();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), all.len(), "{all:?}");
    }

    #[test]
    fn a_second_listing_does_not_replace_the_first() {
        let mut t = table();
        let first = set(&mut t, ROOT, listing(&["a"]));
        let second = set(&mut t, ROOT, listing(&["a", "b"]));
        assert!(second.same(&first));
        assert_eq!(second.children.len(), 1);
    }

    #[test]
    fn forget_drops_an_inode_when_its_lookups_are_gone() {
        let mut t = table();
        let l = set(&mut t, ROOT, listing(&["a"]));
        let a = t.remember(ROOT, &l, 0).unwrap();
        t.remember(ROOT, &l, 0).unwrap();
        t.forget(a, 1);
        assert!(t.get(a).is_ok());
        t.forget(a, 1);
        assert_eq!(t.get(a).unwrap_err(), FsError::NotFound);
        // Looking it up again gives the same number.
        assert_eq!(t.remember(ROOT, &l, 0).unwrap(), a);
        t.forget(ROOT, 100);
        assert!(t.get(ROOT).is_ok());
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn listings_are_kept_sorted() {
        let mut t = table();
        let l = set(&mut t, ROOT, listing(&["c", "a", "b", "a"]));
        let names: Vec<_> = l.children.iter().map(|c| c.name.clone()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(l.find("c".as_ref()), Some(2));
    }

    #[test]
    fn only_directories_have_listings() {
        let mut t = table();
        let l = set(&mut t, ROOT, listing(&["f"]));
        let f = t.remember(ROOT, &l, 0).unwrap();
        assert_eq!(t.listing(f).unwrap_err(), FsError::NotDir);
        assert_eq!(t.listing(999).unwrap_err(), FsError::NotFound);
    }
}
