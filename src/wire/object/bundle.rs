//! Bundles: the small files of one directory, sent as one transport unit.
//!
//! A file of one small block costs the server a round of its own: a few symbols, over in
//! microseconds, so receivers a few milliseconds apart never share it and the server sends a
//! tree of small files once per receiver (tools/bench tree_10k: 29,156 rounds for 9,570
//! objects over 1 + 3 receivers). A fountain code also needs more overhead, relative to the
//! data, the fewer symbols an object has. A bundle concatenates the single-block files of one
//! directory, in name order, into units of at most one block, and is sent as one object on a
//! group of its own: rounds as long as a block's, which receivers share as they share the
//! blocks of a big file.
//!
//! Bundles change no object and no encoding: both ends compute them from the directory
//! object with [`bundles`], the server to publish them, the receiver to fetch a member through
//! its bundle. A bundle is named by its [`Bundle::id`], a keyed hash of its members' hashes
//! and lengths (not of its bytes); a receiver verifies a decoded bundle by cutting it into its
//! members and hashing each, and stores the members, never the bundle. The cache, the mount
//! and `copy` see only the usual objects.
//!
//! Rule (it must not change without a protocol version): members are the distinct files of
//! [`Content::Block`] at most half a block long, in name order, first occurrence kept; a bundle
//! takes members while their total stays within one block and they number at most
//! [`MAX_MEMBERS`]; bundles of one member are not made (the file's own group serves it).

use std::sync::Arc;

use lcfs_cache::Verified;

use super::{BlockSize, Content, Directory, EntryKind, ObjectHash, ObjectRef};

/// The most files in one bundle: bounds the work of verifying one decode.
pub const MAX_MEMBERS: usize = 64;

const ID_CONTEXT: &str = "lcfs 2026-11 bundle id v1";

/// A bundle: its id and total length as an [`ObjectRef`], and its members in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bundle {
    pub id: ObjectRef,
    pub members: Arc<[ObjectRef]>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BundleError {
    #[error("bundle decoded to {got} bytes, its members need {want}")]
    Length { got: usize, want: usize },
    #[error("member {index} of the bundle does not match its hash")]
    Member { index: usize },
}

impl Bundle {
    /// The bundle of `members` (its id is computed here).
    pub fn new(members: Vec<ObjectRef>) -> Bundle {
        let mut h = blake3::Hasher::new_derive_key(ID_CONTEXT);
        h.update(&(members.len() as u32).to_le_bytes());
        for m in &members {
            h.update(m.hash.as_bytes());
            h.update(&m.len.to_le_bytes());
        }
        let len = members.iter().map(|m| m.len).sum();
        Bundle {
            id: ObjectRef {
                hash: h.finalize().into(),
                len,
            },
            members: members.into(),
        }
    }

    /// The members of a decoded bundle, each verified against its hash (hashed once, here):
    /// all of them, or an error (forged or corrupt symbols), never some.
    pub fn split(&self, bytes: &[u8]) -> Result<Vec<Verified>, BundleError> {
        if bytes.len() != self.id.len as usize {
            return Err(BundleError::Length {
                got: bytes.len(),
                want: self.id.len as usize,
            });
        }
        let mut at = 0;
        let mut out = Vec::with_capacity(self.members.len());
        for (index, m) in self.members.iter().enumerate() {
            let part = &bytes[at..at + m.len as usize];
            let member =
                Verified::new(m.hash.raw(), part).map_err(|_| BundleError::Member { index })?;
            out.push(member);
            at += m.len as usize;
        }
        Ok(out)
    }
}

/// The bundles of `dir` at `block_size` (see the module doc for the rule).
pub fn bundles(dir: &Directory, block_size: BlockSize) -> Vec<Bundle> {
    let cap = block_size.bytes();
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    let mut members: Vec<ObjectRef> = Vec::new();
    let mut total = 0u64;
    let small = dir.entries.iter().filter_map(|e| match &e.kind {
        EntryKind::File(f) => match f.content {
            Content::Block(hash) if f.size > 0 && f.size <= cap / 2 => Some(ObjectRef {
                hash,
                len: f.size as u32,
            }),
            _ => None,
        },
        _ => None,
    });
    for m in small {
        if !seen.insert(m.hash) {
            continue;
        }
        if total + m.len as u64 > cap || members.len() == MAX_MEMBERS {
            close(&mut out, std::mem::take(&mut members));
            total = 0;
        }
        total += m.len as u64;
        members.push(m);
    }
    close(&mut out, members);
    out
}

/// How a receiver fetches the small files of one directory listing: through `bundles`, and
/// the single-block files in `alone` on their own groups.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bundling {
    pub bundles: Vec<Bundle>,
    /// Single-block files of the directory in no bundle (too big, or left alone by the
    /// packing). A receiver must forget any bundle it knew them by: another listing of the
    /// directory may have bundled them (tools/soak found a read that rode such a bundle, gone
    /// from the server since a sibling grew, and waited out its timeout).
    pub alone: Vec<ObjectHash>,
}

/// The [`Bundling`] of `dir` at `block_size`.
pub fn bundling(dir: &Directory, block_size: BlockSize) -> Bundling {
    let bundles = bundles(dir, block_size);
    let members: std::collections::HashSet<ObjectHash> = bundles
        .iter()
        .flat_map(|b| b.members.iter().map(|m| m.hash))
        .collect();
    let alone = dir
        .entries
        .iter()
        .filter_map(|e| match &e.kind {
            EntryKind::File(f) => match f.content {
                Content::Block(hash) if !members.contains(&hash) => Some(hash),
                _ => None,
            },
            _ => None,
        })
        .collect();
    Bundling { bundles, alone }
}

fn close(out: &mut Vec<Bundle>, members: Vec<ObjectRef>) {
    if members.len() > 1 {
        out.push(Bundle::new(members));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundling_names_the_single_block_files_left_out() {
        let bs = BlockSize::from_bytes(64 << 10).unwrap();
        let file = |name: &str, size: u64| Entry {
            name: name.as_bytes().to_vec(),
            mode: 0o644,
            mtime: Default::default(),
            nlink: 1,
            link: 0,
            kind: EntryKind::File(crate::wire::object::FileRef {
                size,
                b3: FileHash::of(name.as_bytes()),
                content: Content::Block(ObjectHash::of(name.as_bytes())),
            }),
        };
        // a and b share a bundle; c (over half a block) and d (no room left: alone) do not.
        let dir = Directory::new(vec![
            file("a", 30_000),
            file("b", 30_000),
            file("c", 40_000),
            file("d", 30_000),
        ]);
        let got = bundling(&dir, bs);
        assert_eq!(got.bundles.len(), 1);
        assert_eq!(got.bundles[0].members.len(), 2);
        let mut alone = got.alone.clone();
        alone.sort_by_key(|h| *h.as_bytes());
        let mut want = vec![ObjectHash::of(b"c"), ObjectHash::of(b"d")];
        want.sort_by_key(|h| *h.as_bytes());
        assert_eq!(alone, want);
    }
    use crate::wire::object::{Entry, FileHash, FileRef, Timestamp};

    fn file(name: &str, bytes: &[u8]) -> Entry {
        let content = if bytes.len() as u64 <= crate::wire::object::INLINE_MAX {
            Content::Inline(bytes.to_vec())
        } else {
            Content::Block(ObjectHash::of(bytes))
        };
        Entry {
            name: name.as_bytes().to_vec(),
            mode: 0o644,
            mtime: Timestamp::default(),
            nlink: 1,
            link: 0,
            kind: EntryKind::File(FileRef {
                size: bytes.len() as u64,
                b3: FileHash::of(bytes),
                content,
            }),
        }
    }

    #[test]
    fn small_files_fill_bundles_of_at_most_one_block_in_name_order() {
        let bs = BlockSize::DEFAULT; // 64 KiB
        let mut entries = Vec::new();
        for i in 0..20u8 {
            entries.push(file(&format!("f{i:02}"), &vec![i; 10_000]));
        }
        entries.push(file("inline", b"tiny"));
        entries.push(file("big", &vec![7; 40_000])); // above half a block: its own group
        entries.push(file("same", &vec![3; 10_000])); // a duplicate of f03: once
        let dir = Directory::new(entries);
        let b = bundles(&dir, bs);
        assert_eq!(b.len(), 4, "6 + 6 + 6 + 2 members of 10,000 bytes");
        assert!(b.iter().all(|b| b.id.len as u64 <= bs.bytes()));
        let all: Vec<ObjectHash> = b
            .iter()
            .flat_map(|b| b.members.iter().map(|m| m.hash))
            .collect();
        let want: Vec<ObjectHash> = (0..20u8)
            .map(|i| ObjectHash::of(&vec![i; 10_000]))
            .collect();
        assert_eq!(all, want);
        assert_eq!(
            bundles(&dir, bs),
            b,
            "the rule is a pure function of the directory"
        );
    }

    #[test]
    fn one_member_makes_no_bundle() {
        let dir = Directory::new(vec![file("a", &vec![1; 5000]), file("b", b"x")]);
        assert!(bundles(&dir, BlockSize::DEFAULT).is_empty());
    }

    #[test]
    fn split_verifies_every_member_and_rejects_hostile_bytes() {
        let parts: Vec<Vec<u8>> = (1..5u8).map(|i| vec![i; 2000 + i as usize]).collect();
        let refs = parts
            .iter()
            .map(|p| ObjectRef {
                hash: ObjectHash::of(p),
                len: p.len() as u32,
            })
            .collect();
        let b = Bundle::new(refs);
        let bytes: Vec<u8> = parts.concat();
        let got = b.split(&bytes).unwrap();
        assert_eq!(got.len(), 4);
        assert!(got.iter().zip(&parts).all(|(g, p)| g.bytes()[..] == p[..]));
        let mut flipped = bytes.clone();
        flipped[5000] ^= 1;
        assert_eq!(b.split(&flipped), Err(BundleError::Member { index: 2 }));
        assert!(matches!(
            b.split(&bytes[..bytes.len() - 1]),
            Err(BundleError::Length { .. })
        ));
        assert!(matches!(
            b.split(&[bytes.clone(), vec![0]].concat()),
            Err(BundleError::Length { .. })
        ));
        assert!(b.split(&[]).is_err());
    }

    #[test]
    fn ids_name_the_members_and_their_order() {
        let a = ObjectRef {
            hash: ObjectHash::of(b"a"),
            len: 1,
        };
        let b = ObjectRef {
            hash: ObjectHash::of(b"b"),
            len: 1,
        };
        assert_ne!(Bundle::new(vec![a, b]).id, Bundle::new(vec![b, a]).id);
        assert_ne!(Bundle::new(vec![a, b]).id.hash, a.hash);
    }
}
