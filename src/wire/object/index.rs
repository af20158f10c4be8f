//! File-index objects: the leaf hashes of one file, the [`ObjectHash`] of each of its blocks.
//!
//! Encoding (version 1): `"LCFI" 1 | kind u8 | count u32 | hash[32] * count`. Kind 0 lists leaf
//! hashes, at most [`LEAVES_PER_PAGE`] of them. A file with more blocks than one page holds has a
//! top level of kind 1 listing its pages, each a kind-0 index of [`LEAVES_PER_PAGE`] leaves
//! (the last one fewer). The number of blocks follows from the file size and the channel's block
//! size, so every page's length is known before it is fetched.

use super::codec::{Reader, Writer};
use super::{object_ref, ObjectError, ObjectHash, ObjectRef};

const MAGIC: &[u8; 4] = b"LCFI";
const VERSION: u8 = 1;
const HEADER: usize = 10;
/// Leaves in one page: 64 KiB of hashes.
pub const LEAVES_PER_PAGE: u64 = 2048;
const MAX_PAGES: usize = 1 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileIndex {
    Leaves(Vec<ObjectHash>),
    Pages(Vec<ObjectHash>),
}

impl FileIndex {
    pub fn encode(&self) -> Vec<u8> {
        let (kind, hashes) = match self {
            FileIndex::Leaves(h) => (0, h),
            FileIndex::Pages(h) => (1, h),
        };
        let mut w = Writer::header(MAGIC, VERSION);
        w.u8(kind);
        w.u32(hashes.len() as u32);
        for h in hashes {
            w.hash(h.as_bytes());
        }
        w.buf
    }

    pub fn decode(buf: &[u8]) -> Result<FileIndex, ObjectError> {
        let mut r = Reader::new(buf);
        r.header(MAGIC, "file index", VERSION)?;
        let kind = r.u8()?;
        let max = match kind {
            0 => LEAVES_PER_PAGE as usize,
            1 => MAX_PAGES,
            _ => return Err(ObjectError::Invalid("unknown file index kind")),
        };
        let n = r.count(32, max)?;
        let hashes = (0..n)
            .map(|_| r.object_hash())
            .collect::<Result<Vec<_>, _>>()?;
        r.finish()?;
        Ok(match kind {
            0 => FileIndex::Leaves(hashes),
            _ => FileIndex::Pages(hashes),
        })
    }

    /// Builds the index objects of a file from its leaves: the top object and, for files of
    /// more than one page, the page encodings it lists.
    pub fn build(leaves: &[ObjectHash]) -> (Vec<u8>, Vec<Vec<u8>>) {
        if leaves.len() as u64 <= LEAVES_PER_PAGE {
            return (FileIndex::Leaves(leaves.to_vec()).encode(), Vec::new());
        }
        let pages: Vec<Vec<u8>> = leaves
            .chunks(LEAVES_PER_PAGE as usize)
            .map(|c| FileIndex::Leaves(c.to_vec()).encode())
            .collect();
        let top = FileIndex::Pages(pages.iter().map(|p| ObjectHash::of(p)).collect());
        (top.encode(), pages)
    }
}

/// Shape of a file's index, derived from its block count alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexShape {
    pub blocks: u64,
}

impl IndexShape {
    pub fn pages(self) -> u64 {
        self.blocks.div_ceil(LEAVES_PER_PAGE)
    }

    pub fn paged(self) -> bool {
        self.blocks > LEAVES_PER_PAGE
    }

    /// Encoded length of the top-level index.
    pub fn top_len(self) -> u64 {
        let n = if self.paged() {
            self.pages()
        } else {
            self.blocks
        };
        HEADER as u64 + 32 * n
    }

    /// Leaves in page `page`.
    pub fn page_leaves(self, page: u64) -> u64 {
        self.blocks
            .saturating_sub(page * LEAVES_PER_PAGE)
            .min(LEAVES_PER_PAGE)
    }

    pub fn page_ref(self, page: u64, hash: ObjectHash) -> ObjectRef {
        ObjectRef {
            hash,
            len: (HEADER as u64 + 32 * self.page_leaves(page)) as u32,
        }
    }

    /// Checks that a decoded top-level index has the shape this file needs.
    pub fn check(self, index: &FileIndex) -> Result<(), ObjectError> {
        let ok = match index {
            FileIndex::Leaves(l) => !self.paged() && l.len() as u64 == self.blocks,
            FileIndex::Pages(p) => self.paged() && p.len() as u64 == self.pages(),
        };
        if ok {
            Ok(())
        } else {
            Err(ObjectError::Invalid(
                "file index does not fit the file size",
            ))
        }
    }
}

/// The reference a directory entry holds for an index encoding.
pub fn index_ref(top: &[u8]) -> ObjectRef {
    object_ref(top)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn leaves(n: usize) -> Vec<ObjectHash> {
        (0..n).map(|i| ObjectHash::of(&i.to_le_bytes())).collect()
    }

    #[test]
    fn single_page_round_trip() {
        let (top, pages) = FileIndex::build(&leaves(3));
        assert!(pages.is_empty());
        let idx = FileIndex::decode(&top).unwrap();
        assert_eq!(idx, FileIndex::Leaves(leaves(3)));
        let shape = IndexShape { blocks: 3 };
        assert_eq!(shape.top_len(), top.len() as u64);
        shape.check(&idx).unwrap();
        assert!(IndexShape { blocks: 4 }.check(&idx).is_err());
    }

    #[test]
    fn paged_round_trip() {
        let n = LEAVES_PER_PAGE as usize * 2 + 5;
        let (top, pages) = FileIndex::build(&leaves(n));
        let shape = IndexShape { blocks: n as u64 };
        assert_eq!(pages.len(), 3);
        assert_eq!(shape.top_len(), top.len() as u64);
        let FileIndex::Pages(ph) = FileIndex::decode(&top).unwrap() else {
            panic!()
        };
        for (i, p) in pages.iter().enumerate() {
            assert_eq!(shape.page_ref(i as u64, ph[i]), index_ref(p));
        }
        assert_eq!(
            FileIndex::decode(&pages[2]).unwrap(),
            FileIndex::Leaves(leaves(n)[4096..].to_vec())
        );
    }

    #[test]
    fn hostile_counts_and_truncation() {
        let (top, _) = FileIndex::build(&leaves(2));
        for n in 0..top.len() {
            assert!(FileIndex::decode(&top[..n]).is_err());
        }
        let mut big = top.clone();
        big[6..10].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(FileIndex::decode(&big).is_err());
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = FileIndex::decode(&bytes);
        }
    }
}
