//! Moving the inode table to a new version of the source: the diff of directory listings.
//!
//! The filesystem first plans a move without holding the table (`Fs::switch`): starting at the
//! root, every directory the table has a listing of whose content changed
//! ([`Source::same_content`](crate::Source::same_content) says no) is listed afresh from the
//! source, and the plan descends into its subdirectories that kept their name. Unchanged
//! subtrees are recognised at their top and cost nothing: no listing, no walk. Then
//! [`InodeTable::apply`] moves the table in one step under its lock, and returns what the
//! kernel must forget.
//!
//! How a child of a changed directory fares, by name (see `inode.rs` for why):
//! - same kind and same content (a directory: same kind is enough, it is diffed in turn): it
//!   keeps its inode number, its node becomes the new one, and a change of mode or mtime
//!   invalidates its attributes ([`Invalidation::Attr`]);
//! - otherwise (replaced, removed, or added): a fresh inode number, the old inode (if the
//!   kernel holds it) is superseded, and the kernel forgets the entry
//!   ([`Invalidation::Entry`]).
//!
//! A changed directory's cached readdir pages and attributes go too ([`Invalidation::Data`]).
//! A changed directory the plan could not list (the source failed) loses its listing and the
//! kernel forgets all its entries: they are looked up again, from the new version.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use super::{new_ino, sorted, InodeTable, Listing, ROOT};
use crate::source::{Attr, Child, Kind};

/// Whether two nodes (of one kind) hold the same content.
pub type Same<'a, N> = &'a dyn Fn(&N, &N) -> bool;

/// What the kernel must forget after a move.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Invalidation {
    /// Entry `name` of directory `parent`: replaced, removed or added.
    Entry { parent: u64, name: OsString },
    /// The attributes of inode `ino` (its mode or mtime changed, its content did not).
    Attr(u64),
    /// The attributes and cached pages of directory `ino`: its entries changed, so its cached
    /// readdir pages are stale.
    Data(u64),
}

/// The outcome of [`InodeTable::apply`].
#[derive(Debug, Default)]
pub struct Applied {
    pub invalidations: Vec<Invalidation>,
    /// Inodes the kernel holds that the move superseded.
    pub superseded: Vec<u64>,
}

/// The children of a new listing matched with an old one's, by name.
#[derive(Debug, Default, PartialEq, Eq)]
struct Pairing {
    /// For each new child, the index of the old child it continues, if it keeps its inode.
    kept: Vec<Option<usize>>,
    /// Old children that do not continue (replaced or removed).
    gone: Vec<usize>,
    /// Names the kernel must forget: replaced, removed or added.
    names: Vec<OsString>,
}

/// Whether new child `b` continues old child `a` (their names are equal).
fn continues<N>(a: &Child<N>, b: &Child<N>, same: Same<'_, N>) -> bool {
    match (a.attr.kind, b.attr.kind) {
        (Kind::Dir, Kind::Dir) => true,
        (Kind::File, Kind::File) => same(&a.node, &b.node),
        (Kind::Symlink, Kind::Symlink) => a.target == b.target,
        _ => false,
    }
}

/// Matches two listings sorted by name.
fn pair<N>(old: &[Child<N>], new: &[Child<N>], same: Same<'_, N>) -> Pairing {
    let mut p = Pairing {
        kept: vec![None; new.len()],
        ..Pairing::default()
    };
    let (mut i, mut j) = (0, 0);
    while i < old.len() || j < new.len() {
        let order = match (old.get(i), new.get(j)) {
            (Some(a), Some(b)) => a.name.as_bytes().cmp(b.name.as_bytes()),
            (Some(_), None) => Ordering::Less,
            _ => Ordering::Greater,
        };
        match order {
            Ordering::Less => {
                p.gone.push(i);
                p.names.push(old[i].name.clone());
                i += 1;
            }
            Ordering::Greater => {
                p.names.push(new[j].name.clone());
                j += 1;
            }
            Ordering::Equal => {
                if continues(&old[i], &new[j], same) {
                    p.kept[j] = Some(i);
                } else {
                    p.gone.push(i);
                    p.names.push(old[i].name.clone());
                }
                i += 1;
                j += 1;
            }
        }
    }
    p
}

/// The subdirectories of `old` that keep their inode in `new`, with their new nodes: where a
/// plan descends next.
pub fn kept_dirs<N: Clone>(old: &Listing<N>, new: &[Child<N>], same: Same<'_, N>) -> Vec<(u64, N)> {
    let p = pair(&old.children, new, same);
    p.kept
        .iter()
        .zip(new)
        .filter_map(|(k, c)| Some((old.ino((*k)?), c)))
        .filter(|(_, c)| c.attr.kind == Kind::Dir)
        .map(|(ino, c)| (ino, c.node.clone()))
        .collect()
}

impl<N: Clone> InodeTable<N> {
    /// The stored listing of directory `ino`, if moving it to `node` changes its content (so a
    /// plan must list `node`). `None`: unchanged, not a directory, or never listed.
    pub fn changed_listing(&self, ino: u64, node: &N, same: Same<'_, N>) -> Option<Listing<N>> {
        let inode = self.inodes.get(&ino)?;
        if inode.attr.kind != Kind::Dir || same(&inode.node, node) {
            return None;
        }
        inode.listing.clone()
    }

    /// Moves the table to the version whose root is `root` with `attr`. `listed` holds the new
    /// listing of each changed directory the plan listed, by inode number.
    pub fn apply(
        &mut self,
        root: N,
        attr: Attr,
        listed: &HashMap<u64, Arc<Vec<Child<N>>>>,
        same: Same<'_, N>,
    ) -> Applied {
        self.epoch += 1;
        self.links.clear();
        let mut out = Applied::default();
        // Depth first, without recursion: trees may be thousands of levels deep.
        let mut todo = vec![(ROOT, root, attr)];
        while let Some((ino, node, attr)) = todo.pop() {
            self.move_inode(ino, node, attr, listed, same, &mut todo, &mut out);
        }
        out
    }

    /// Moves inode `ino` to `node` and `attr`; its kept subdirectories the kernel holds go on
    /// `todo`.
    #[allow(clippy::too_many_arguments)]
    fn move_inode(
        &mut self,
        ino: u64,
        node: N,
        attr: Attr,
        listed: &HashMap<u64, Arc<Vec<Child<N>>>>,
        same: Same<'_, N>,
        todo: &mut Vec<(u64, N, Attr)>,
        out: &mut Applied,
    ) {
        let Some(inode) = self.inodes.get_mut(&ino) else {
            return;
        };
        let attr_changed = inode.attr != attr;
        // Files and symlinks only get here when their content is the same (else they would
        // have a new inode); directories when they kept their name.
        let unchanged = inode.attr.kind != Kind::Dir || same(&inode.node, &node);
        inode.attr = attr;
        inode.node = node;
        if unchanged {
            if attr_changed {
                out.invalidations.push(Invalidation::Attr(ino));
            }
            return;
        }
        out.invalidations.push(Invalidation::Data(ino));
        let Some(old) = inode.listing.take() else {
            return;
        };
        let Some(new) = listed.get(&ino) else {
            let names = old.children.iter().map(|c| Invalidation::Entry {
                parent: ino,
                name: c.name.clone(),
            });
            out.invalidations.extend(names);
            return;
        };
        let listing = self.relist(ino, &old, sorted(new.clone()), same, todo, out);
        if let Some(inode) = self.inodes.get_mut(&ino) {
            inode.listing = Some(listing);
        }
    }

    /// The new listing of changed directory `ino`, whose old listing was `old`.
    fn relist(
        &mut self,
        ino: u64,
        old: &Listing<N>,
        new: Arc<Vec<Child<N>>>,
        same: Same<'_, N>,
        todo: &mut Vec<(u64, N, Attr)>,
        out: &mut Applied,
    ) -> Listing<N> {
        let p = pair(&old.children, &new, same);
        let mut inos = Vec::with_capacity(new.len());
        for (k, child) in p.kept.iter().zip(new.iter()) {
            let Some(k) = k else {
                inos.push(new_ino(&mut self.next, &mut self.links, &child.attr));
                continue;
            };
            let child_ino = old.ino(*k);
            inos.push(child_ino);
            if self.inodes.contains_key(&child_ino) {
                todo.push((child_ino, child.node.clone(), child.attr.clone()));
            }
        }
        for i in p.gone {
            self.supersede(old.ino(i), out);
        }
        let forget = p
            .names
            .into_iter()
            .map(|name| Invalidation::Entry { parent: ino, name });
        out.invalidations.extend(forget);
        Listing {
            children: new,
            inos: inos.into(),
        }
    }

    /// Marks `ino`, and everything the table holds below it, superseded.
    fn supersede(&mut self, ino: u64, out: &mut Applied) {
        let mut todo = vec![ino];
        while let Some(ino) = todo.pop() {
            let Some(inode) = self.inodes.get_mut(&ino) else {
                continue;
            };
            if inode.superseded {
                continue;
            }
            inode.superseded = true;
            out.superseded.push(ino);
            if let Some(l) = &inode.listing {
                todo.extend(l.inos.iter().copied());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nodes are (name, content) pairs: equal content, same node content.
    type N = (&'static str, u32);

    fn same(a: &N, b: &N) -> bool {
        a.1 == b.1
    }

    fn attr(kind: Kind, mode: u32) -> Attr {
        Attr {
            kind,
            size: 0,
            mode,
            mtime_secs: 0,
            mtime_nanos: 0,
            nlink: 1,
            link: 0,
        }
    }

    fn file(name: &'static str, content: u32) -> Child<N> {
        Child {
            name: name.into(),
            attr: attr(Kind::File, 0o644),
            target: None,
            node: (name, content),
        }
    }

    fn dir(name: &'static str, content: u32) -> Child<N> {
        Child {
            attr: attr(Kind::Dir, 0o755),
            ..file(name, content)
        }
    }

    fn link(name: &'static str, target: &str) -> Child<N> {
        Child {
            attr: attr(Kind::Symlink, 0o777),
            target: Some(target.as_bytes().to_vec()),
            ..file(name, 0)
        }
    }

    fn names(p: &Pairing) -> Vec<&str> {
        p.names.iter().map(|n| n.to_str().unwrap()).collect()
    }

    #[test]
    fn pairing_by_name_and_content() {
        let old = [
            file("a", 1),
            file("b", 2),
            dir("d", 3),
            link("l", "x"),
            file("x", 4),
        ];
        let new = [
            file("a", 1),
            file("b", 9),
            dir("d", 8),
            link("l", "y"),
            file("n", 5),
        ];
        let p = pair(&old, &new, &same);
        assert_eq!(p.kept, [Some(0), None, Some(2), None, None]);
        assert_eq!(p.gone, [1, 3, 4]);
        assert_eq!(names(&p), ["b", "l", "n", "x"]);
        // A kind change is a replacement, even with equal content.
        let p = pair(&[file("k", 1)], &[dir("k", 1)], &same);
        assert_eq!((p.kept, p.gone), (vec![None], vec![0]));
    }

    fn table_with(children: Vec<Child<N>>) -> (InodeTable<N>, Listing<N>) {
        let mut t = InodeTable::new(("", 0), attr(Kind::Dir, 0o755));
        let l = t.set_listing(ROOT, Arc::new(children), 0).unwrap().unwrap();
        (t, l)
    }

    #[test]
    fn unchanged_files_keep_their_inode_and_changed_ones_get_a_new_one() {
        let (mut t, l) = table_with(vec![file("a", 1), file("b", 2), file("gone", 3)]);
        let a = t.remember(ROOT, &l, 0).unwrap();
        let b = t.remember(ROOT, &l, 1).unwrap();
        let gone = t.remember(ROOT, &l, 2).unwrap();
        let new = Arc::new(vec![file("a", 1), file("b", 7), file("c", 4)]);
        let listed = HashMap::from([(ROOT, new)]);
        let applied = t.apply(("", 1), attr(Kind::Dir, 0o755), &listed, &same);
        let l = t.listing(ROOT).unwrap().unwrap();
        assert_eq!(l.ino(0), a);
        assert!(l.ino(1) != b && l.ino(2) > gone, "fresh numbers");
        assert_eq!(applied.superseded, [b, gone]);
        assert!(t.get(b).unwrap().superseded && !t.get(a).unwrap().superseded);
        let entries: Vec<_> = applied
            .invalidations
            .iter()
            .filter_map(|i| match i {
                Invalidation::Entry { parent, name } => Some((*parent, name.to_str().unwrap())),
                _ => None,
            })
            .collect();
        assert_eq!(entries, [(ROOT, "b"), (ROOT, "c"), (ROOT, "gone")]);
        assert!(applied.invalidations.contains(&Invalidation::Data(ROOT)));
    }

    #[test]
    fn a_mode_change_invalidates_attributes_only() {
        let (mut t, l) = table_with(vec![file("a", 1)]);
        let a = t.remember(ROOT, &l, 0).unwrap();
        let mut chmod = file("a", 1);
        chmod.attr.mode = 0o755;
        let listed = HashMap::from([(ROOT, Arc::new(vec![chmod]))]);
        let applied = t.apply(("", 1), attr(Kind::Dir, 0o755), &listed, &same);
        assert_eq!(t.listing(ROOT).unwrap().unwrap().ino(0), a);
        assert_eq!(t.get(a).unwrap().attr.mode, 0o755);
        assert!(applied.invalidations.contains(&Invalidation::Attr(a)));
        assert!(applied.superseded.is_empty());
    }

    #[test]
    fn directories_keep_their_inode_and_are_diffed_in_turn() {
        let (mut t, l) = table_with(vec![dir("d", 1), dir("same", 2)]);
        let d = t.remember(ROOT, &l, 0).unwrap();
        let s = t.remember(ROOT, &l, 1).unwrap();
        let ld = t
            .set_listing(d, Arc::new(vec![file("x", 5)]), 0)
            .unwrap()
            .unwrap();
        let x = t.remember(d, &ld, 0).unwrap();
        t.set_listing(s, Arc::new(vec![file("y", 6)]), 0).unwrap();
        let listed = HashMap::from([
            (ROOT, Arc::new(vec![dir("d", 10), dir("same", 2)])),
            (d, Arc::new(vec![file("x", 50)])),
        ]);
        let applied = t.apply(("", 1), attr(Kind::Dir, 0o755), &listed, &same);
        let root = t.listing(ROOT).unwrap().unwrap();
        assert_eq!((root.ino(0), root.ino(1)), (d, s));
        assert!(t.listing(d).unwrap().unwrap().ino(0) != x);
        assert!(t.get(x).unwrap().superseded);
        // The unchanged directory was neither listed nor touched.
        assert!(!applied.invalidations.contains(&Invalidation::Data(s)));
        assert_eq!(t.get(s).unwrap().node, ("same", 2));
    }

    #[test]
    fn a_changed_directory_that_could_not_be_listed_is_forgotten() {
        let (mut t, l) = table_with(vec![dir("d", 1)]);
        let d = t.remember(ROOT, &l, 0).unwrap();
        t.set_listing(d, Arc::new(vec![file("x", 5)]), 0).unwrap();
        let listed = HashMap::from([(ROOT, Arc::new(vec![dir("d", 2)]))]);
        let applied = t.apply(("", 1), attr(Kind::Dir, 0o755), &listed, &same);
        assert!(t.listing(d).unwrap().is_none());
        assert!(applied.invalidations.contains(&Invalidation::Entry {
            parent: d,
            name: "x".into()
        }));
    }

    #[test]
    fn everything_below_a_removed_directory_is_superseded() {
        let (mut t, l) = table_with(vec![dir("d", 1)]);
        let d = t.remember(ROOT, &l, 0).unwrap();
        let ld = t
            .set_listing(d, Arc::new(vec![file("x", 5)]), 0)
            .unwrap()
            .unwrap();
        let x = t.remember(d, &ld, 0).unwrap();
        let listed = HashMap::from([(ROOT, Arc::new(vec![]))]);
        let applied = t.apply(("", 1), attr(Kind::Dir, 0o755), &listed, &same);
        assert_eq!(applied.superseded, [d, x]);
        // What the kernel finds there later is of the old version too.
        let ld = t.listing(d).unwrap().unwrap();
        let x2 = t.remember(d, &ld, 0).unwrap();
        assert!(t.get(x2).unwrap().superseded);
    }

    #[test]
    fn a_listing_read_before_a_move_is_not_stored() {
        let mut t = InodeTable::new(("", 0), attr(Kind::Dir, 0o755));
        let before = t.epoch();
        t.apply(("", 1), attr(Kind::Dir, 0o755), &HashMap::new(), &same);
        let old = Arc::new(vec![file("a", 1)]);
        assert!(t.set_listing(ROOT, old, before).unwrap().is_none());
        let new = Arc::new(vec![file("a", 2)]);
        let epoch = t.epoch();
        assert!(t.set_listing(ROOT, new, epoch).unwrap().is_some());
    }

    #[test]
    fn kept_dirs_are_where_a_plan_descends() {
        let (_, l) = table_with(vec![dir("d", 1), file("f", 2), dir("k", 3)]);
        let new = [dir("d", 10), file("f", 20), file("k", 3)];
        assert_eq!(kept_dirs(&l, &new, &same), [(l.ino(0), ("d", 10))]);
    }
}
