//! Block diff planning, without I/O: which byte ranges of the new file come from DEST's old
//! file and which from SRC.
//!
//! Block `i` covers `[i * B, min((i + 1) * B, src_size))`. It is taken from DEST when DEST
//! holds the whole range and the caller's comparison says the bytes are equal; otherwise it
//! is written from SRC. Neighbouring blocks from the same side are merged into one [`Run`],
//! so a file that changed in one place costs three system calls, not one per block.

use std::io;

use crate::wire::object::BlockSize;

/// Where a range of the new file comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum From {
    /// The same offset of the file DEST already holds.
    Dest,
    /// The same offset of the SRC file.
    Src,
}

/// `len` bytes at `offset`, from one side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub offset: u64,
    pub len: u64,
    pub from: From,
}

/// How to build one file of `size` bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockPlan {
    pub size: u64,
    /// In file order, covering `[0, size)` without gaps or overlaps.
    pub runs: Vec<Run>,
    /// DEST's file had exactly `size` bytes.
    pub same_size: bool,
}

impl BlockPlan {
    /// Bytes taken from SRC.
    pub fn written(&self) -> u64 {
        self.bytes_from(From::Src)
    }

    /// Bytes taken from DEST.
    pub fn reused(&self) -> u64 {
        self.bytes_from(From::Dest)
    }

    /// DEST's file already has these contents: same size, every block equal.
    pub fn unchanged(&self) -> bool {
        self.same_size && self.written() == 0
    }

    fn bytes_from(&self, from: From) -> u64 {
        self.runs
            .iter()
            .filter(|r| r.from == from)
            .map(|r| r.len)
            .sum()
    }

    fn push(&mut self, offset: u64, len: u64, from: From) {
        match self.runs.last_mut() {
            Some(last) if last.from == from && last.offset + last.len == offset => last.len += len,
            _ => self.runs.push(Run { offset, len, from }),
        }
    }
}

/// Plans a file of `src_size` bytes over DEST's file of `dest_size` bytes (`None`: DEST has
/// no regular file there). `same(offset, len)` compares those bytes of both files; it is only
/// called for ranges DEST holds entirely. Its errors end the planning.
pub fn plan(
    bs: BlockSize,
    src_size: u64,
    dest_size: Option<u64>,
    mut same: impl FnMut(u64, u64) -> io::Result<bool>,
) -> io::Result<BlockPlan> {
    let mut out = BlockPlan {
        size: src_size,
        runs: Vec::new(),
        same_size: dest_size == Some(src_size),
    };
    for i in bs.blocks_of(src_size) {
        let offset = bs.offset_of(i);
        let len = u64::from(bs.block_len(src_size, i));
        let held = dest_size.is_some_and(|d| d >= offset + len);
        let from = if held && same(offset, len)? {
            From::Dest
        } else {
            From::Src
        };
        out.push(offset, len, from);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: u64 = 16 << 10;

    fn bs() -> BlockSize {
        BlockSize::from_bytes(B).unwrap()
    }

    /// Plans `src` over `dest` by comparing their bytes, as the real comparison does.
    fn plan_bytes(src: &[u8], dest: Option<&[u8]>) -> BlockPlan {
        let d = dest.unwrap_or_default();
        plan(
            bs(),
            src.len() as u64,
            dest.map(|d| d.len() as u64),
            |off, len| {
                let r = off as usize..(off + len) as usize;
                Ok(src[r.clone()] == d[r])
            },
        )
        .unwrap()
    }

    fn data(len: u64, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
    }

    fn run(offset: u64, len: u64, from: From) -> Run {
        Run { offset, len, from }
    }

    #[test]
    fn equal_files_reuse_everything_in_one_run() {
        let a = data(5 * B + 7, 1);
        let p = plan_bytes(&a, Some(&a));
        assert!(p.unchanged());
        assert_eq!(p.runs, vec![run(0, 5 * B + 7, From::Dest)]);
        assert_eq!((p.written(), p.reused()), (0, 5 * B + 7));
    }

    #[test]
    fn appended_bytes_are_written_and_the_old_part_reused() {
        let old = data(3 * B, 2);
        let mut new = old.clone();
        new.extend(data(B + 100, 3));
        let p = plan_bytes(&new, Some(&old));
        assert!(!p.unchanged());
        assert_eq!(
            p.runs,
            vec![run(0, 3 * B, From::Dest), run(3 * B, B + 100, From::Src)]
        );
    }

    #[test]
    fn a_grown_partial_last_block_is_written() {
        let old = data(2 * B + 10, 2);
        let mut new = old.clone();
        new.extend(b"more");
        let p = plan_bytes(&new, Some(&old));
        assert_eq!(
            p.runs,
            vec![run(0, 2 * B, From::Dest), run(2 * B, 14, From::Src)]
        );
    }

    #[test]
    fn truncated_files_reuse_their_prefix_and_write_nothing() {
        let old = data(4 * B, 4);
        let new = old[..(2 * B + 5) as usize].to_vec();
        let p = plan_bytes(&new, Some(&old));
        assert!(
            !p.unchanged(),
            "the size differs, so the file must be rebuilt"
        );
        assert_eq!(p.written(), 0);
        assert_eq!(p.runs, vec![run(0, 2 * B + 5, From::Dest)]);
    }

    #[test]
    fn one_changed_block_is_the_only_one_written() {
        let old = data(10 * B, 5);
        let mut new = old.clone();
        new[(4 * B + 3) as usize] ^= 0xff;
        let p = plan_bytes(&new, Some(&old));
        assert_eq!(
            p.runs,
            vec![
                run(0, 4 * B, From::Dest),
                run(4 * B, B, From::Src),
                run(5 * B, 5 * B, From::Dest)
            ]
        );
        assert_eq!(p.written(), B);
    }

    #[test]
    fn empty_files() {
        let p = plan_bytes(&[], Some(&[]));
        assert!(p.unchanged() && p.runs.is_empty());
        let p = plan_bytes(&[], None);
        assert!(!p.unchanged(), "a missing file must be created");
        let p = plan_bytes(&[], Some(b"old"));
        assert!(!p.unchanged() && p.runs.is_empty());
        let p = plan_bytes(b"new", Some(&[]));
        assert_eq!(p.runs, vec![run(0, 3, From::Src)]);
    }

    #[test]
    fn no_dest_file_writes_everything_without_comparing() {
        let a = data(3 * B, 6);
        let p = plan(bs(), a.len() as u64, None, |_, _| panic!("compared")).unwrap();
        assert_eq!(p.runs, vec![run(0, 3 * B, From::Src)]);
    }

    #[test]
    fn comparison_errors_end_the_plan() {
        let e = plan(bs(), 3 * B, Some(3 * B), |_, _| {
            Err(io::ErrorKind::UnexpectedEof.into())
        });
        assert_eq!(e.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn runs_cover_the_file_exactly() {
        // Every block alternately equal and changed.
        let old = data(9 * B + 1, 7);
        let mut new = old.clone();
        for i in (0..10).step_by(2) {
            new[(i * B) as usize] ^= 1;
        }
        let p = plan_bytes(&new, Some(&old));
        let mut at = 0;
        for r in &p.runs {
            assert_eq!(r.offset, at);
            at += r.len;
        }
        assert_eq!(at, p.size);
        assert_eq!(p.runs.len(), 10);
        assert_eq!(p.written(), 5 * B);
    }
}
