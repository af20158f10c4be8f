//! Reading and hashing one file's contents: leaves, whole-file BLAKE3, or inline bytes.
//!
//! A file is read once, in block-sized `pread`s into a per-thread buffer. Each block gives its
//! leaf (BLAKE3 of the block alone) and the chaining value of the same bytes as a subtree of
//! the whole file's BLAKE3 tree (`blake3::hazmat`): blocks are power-of-two sized and aligned,
//! so each is exactly a subtree, and the whole-file hash is merged from their chaining values.
//! The blocks of one file need no order, so big files are hashed in parallel segments.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use blake3::hazmat::{self, ChainingValue, HasherExt, Mode};
use rayon::prelude::*;

use crate::serve::leafcache::{Body, HashedFile};
use crate::wire::object::{BlockIndex, BlockSize, FileHash, ObjectHash, INLINE_MAX};

/// Bytes of one big file hashed by one task; the segments of a file are hashed in parallel.
const SEGMENT_BYTES: u64 = 4 << 20;

thread_local! {
    /// One block-sized read buffer per indexing thread, reused for every block it reads.
    static BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Reads `len` bytes at `offset` of `file` into this thread's buffer and hands them to `f`.
/// `f` must not start rayon work (it could run another task that wants the buffer).
fn with_block<T>(
    file: &File,
    offset: u64,
    len: usize,
    f: impl FnOnce(&[u8]) -> T,
) -> io::Result<T> {
    BUFFER.with_borrow_mut(|buf| {
        if buf.len() < len {
            buf.resize(len, 0);
        }
        file.read_exact_at(&mut buf[..len], offset)?;
        Ok(f(&buf[..len]))
    })
}

/// Hashes the first `size` bytes of `file`: inline bytes for small files, else leaves, and
/// the whole-file BLAKE3. A file shorter than `size` gives `UnexpectedEof`.
pub(super) fn hash_contents(file: &File, size: u64, bs: BlockSize) -> io::Result<HashedFile> {
    if size <= INLINE_MAX {
        let mut bytes = vec![0u8; size as usize];
        file.read_exact_at(&mut bytes, 0)?;
        return Ok(HashedFile {
            b3: FileHash::of(&bytes),
            body: Body::Inline(bytes),
        });
    }
    if size <= bs.bytes() {
        let leaf = with_block(file, 0, size as usize, ObjectHash::of)?;
        // The file is its one block: the same bytes, the same hash.
        return Ok(HashedFile {
            b3: FileHash::from_bytes(*leaf.as_bytes()),
            body: Body::Leaves(vec![leaf]),
        });
    }
    let blocks = bs.blocks_in(size);
    let per_segment = (SEGMENT_BYTES / bs.bytes()).max(1);
    let segments: Vec<Vec<(ObjectHash, ChainingValue)>> = (0..blocks.div_ceil(per_segment))
        .into_par_iter()
        .map(|s| {
            hash_segment(
                file,
                size,
                bs,
                s * per_segment..blocks.min((s + 1) * per_segment),
            )
        })
        .collect::<io::Result<_>>()?;
    let (leaves, cvs): (Vec<ObjectHash>, Vec<ChainingValue>) =
        segments.into_iter().flatten().unzip();
    let b3 = whole_file_hash(&cvs, size, bs.bytes());
    Ok(HashedFile {
        b3,
        body: Body::Leaves(leaves),
    })
}

/// Leaf and subtree chaining value of each block in `blocks`.
fn hash_segment(
    file: &File,
    size: u64,
    bs: BlockSize,
    blocks: Range<u64>,
) -> io::Result<Vec<(ObjectHash, ChainingValue)>> {
    blocks
        .map(|i| {
            let i = BlockIndex(i);
            let offset = bs.offset_of(i);
            with_block(file, offset, bs.block_len(size, i) as usize, |block| {
                let mut subtree = blake3::Hasher::new();
                subtree.set_input_offset(offset).update(block);
                (ObjectHash::of(block), subtree.finalize_non_root())
            })
        })
        .collect()
}

/// The BLAKE3 of a whole file of `size` bytes (more than one block) from the chaining values
/// of its blocks, merged in BLAKE3's tree shape: a node of `len` bytes has a left subtree of
/// `left_subtree_len(len)` bytes, which for `len` above one block is a power-of-two multiple of
/// the block size, so every split falls between blocks.
fn whole_file_hash(cvs: &[ChainingValue], size: u64, block: u64) -> FileHash {
    let left = hazmat::left_subtree_len(size);
    let n = (left / block) as usize;
    let (l, r) = (
        subtree(&cvs[..n], left, block),
        subtree(&cvs[n..], size - left, block),
    );
    hazmat::merge_subtrees_root(&l, &r, Mode::Hash).into()
}

fn subtree(cvs: &[ChainingValue], len: u64, block: u64) -> ChainingValue {
    if let [cv] = cvs {
        return *cv;
    }
    let left = hazmat::left_subtree_len(len);
    let n = (left / block) as usize;
    let (l, r) = (
        subtree(&cvs[..n], left, block),
        subtree(&cvs[n..], len - left, block),
    );
    hazmat::merge_subtrees_non_root(&l, &r, Mode::Hash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const BS: u64 = 16 << 10;

    #[test]
    fn whole_file_hash_is_blake3_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        for size in [
            BS + 1,
            2 * BS,
            2 * BS + 1,
            3 * BS,
            5 * BS + 7,
            64 * BS,
            100 * BS + 3,
        ] {
            let bytes = data(size, size as u8);
            fs::write(&path, &bytes).unwrap();
            let hash = hash_contents(
                &File::open(&path).unwrap(),
                size,
                BlockSize::from_bytes(BS).unwrap(),
            )
            .unwrap();
            assert_eq!(hash.b3, FileHash::of(&bytes), "size {size}");
            let leaves: Vec<ObjectHash> = bytes.chunks(BS as usize).map(ObjectHash::of).collect();
            assert_eq!(hash.body, Body::Leaves(leaves));
        }
        let short = hash_contents(
            &File::open(&path).unwrap(),
            200 * BS,
            BlockSize::from_bytes(BS).unwrap(),
        );
        assert_eq!(short.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    fn data(len: u64, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i / 7 + i / BS * 13) as u8 ^ seed)
            .collect()
    }
}
