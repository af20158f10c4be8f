//! One file: compare SRC with DEST's file block by block, then build the new file from both.
//!
//! The comparison is a direct `memcmp` of the two blocks at the same offset. Both files are
//! local and read in full either way, so a hash buys nothing: comparing bytes runs at memory
//! speed (several GB/s) where BLAKE3 of both sides costs two hashes per block, and equal
//! bytes cannot collide. Only blocks at the same offset are matched (an insertion shifts
//! everything after it; lcfs copy's any-offset reuse needs the hashes a channel carries).
//!
//! Blocks taken from DEST are moved with `copy_file_range`, which on a filesystem with
//! reflinks (btrfs, XFS) shares the extents instead of copying them and elsewhere copies
//! inside the kernel; where it is refused (another filesystem, an old kernel) they are read
//! and written. Blocks from SRC are read and written.
//!
//! Invariant: the new file is the SRC file as one `fstat` saw it. SRC and DEST are `fstat`ed
//! before the comparison and after the last write; if either changed (size, mtime, ctime,
//! inode), or a read came up short, the part is discarded and the file is done again, up to
//! [`ATTEMPTS`] times, then [`BuildError::Unstable`]. A file someone keeps writing is never
//! published half old, half new.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use rustix::io::Errno;

use super::plan::{plan, BlockPlan, From};
use crate::serve::index::beneath;
use crate::wire::object::{BlockSize, Timestamp};

/// Times a file is done before it is given up as changing too fast.
pub const ATTEMPTS: usize = 3;
/// Bytes moved by one `copy_file_range` or one read and write.
const CHUNK: u64 = 4 << 20;

/// What changes whenever a file's contents do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub size: u64,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub ino: u64,
}

/// A file read by offset, with its [`Stamp`]: a real file, or a test double.
pub trait Source {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn stamp(&self) -> io::Result<Stamp>;
}

impl Source for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }

    fn stamp(&self) -> io::Result<Stamp> {
        let a = beneath::stat_fd(self)?;
        Ok(Stamp {
            size: a.size,
            mtime: a.mtime,
            ctime: a.ctime,
            ino: a.ino,
        })
    }
}

/// Where the new file is written: a fresh part each attempt, discarded if the attempt fails.
pub trait Sink {
    fn create(&mut self) -> io::Result<File>;
    fn discard(&mut self);
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("it kept changing while it was read ({ATTEMPTS} tries)")]
    Unstable,
}

/// What became of one file.
#[derive(Debug)]
pub enum Built {
    /// DEST's file already holds these bytes (SRC's, with this stamp) and may stay: nothing
    /// was written.
    Unchanged(Stamp),
    /// The sink's last part holds the new file, built by this plan, with SRC's stamp.
    Staged(BlockPlan, Stamp),
}

/// Builds SRC's file from DEST's (`None`: there is none) and SRC. When DEST's is equal and
/// `may_keep`, nothing is written. `bs` is the comparison's block size.
pub fn build<S: Source, D: Source + AsFd>(
    src: &S,
    dest: Option<&D>,
    may_keep: bool,
    bs: BlockSize,
    sink: &mut impl Sink,
) -> Result<Built, BuildError> {
    for _ in 0..ATTEMPTS {
        match attempt(src, dest, may_keep, bs, sink) {
            Ok(Some(built)) => return Ok(built),
            Ok(None) => tracing::debug!("changed while it was synced; again"),
            Err(e) => {
                sink.discard();
                return Err(e.into());
            }
        }
    }
    Err(BuildError::Unstable)
}

/// One try; `None` when SRC or DEST changed meanwhile (the part is discarded).
fn attempt<S: Source, D: Source + AsFd>(
    src: &S,
    dest: Option<&D>,
    may_keep: bool,
    bs: BlockSize,
    sink: &mut impl Sink,
) -> io::Result<Option<Built>> {
    let before = (src.stamp()?, dest.map(Source::stamp).transpose()?);
    let mut bufs = (vec![0; bs.bytes() as usize], vec![0; bs.bytes() as usize]);
    let dest_size = before.1.map(|s| s.size);
    let planned = plan(bs, before.0.size, dest_size, |off, len| match dest {
        Some(d) => same(src, d, off, len as usize, &mut bufs),
        None => Ok(false),
    });
    let plan = match planned {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        r => r?,
    };
    if plan.unchanged() && may_keep {
        let after = (src.stamp()?, dest.map(Source::stamp).transpose()?);
        return Ok((after == before).then_some(Built::Unchanged(before.0)));
    }
    let part = sink.create()?;
    part.set_len(plan.size)?;
    let written = write_runs(src, dest, &part, &plan, &mut bufs.0);
    let after = (src.stamp()?, dest.map(Source::stamp).transpose()?);
    match written {
        Ok(()) if after == before => Ok(Some(Built::Staged(plan, before.0))),
        Err(e) if e.kind() != io::ErrorKind::UnexpectedEof => Err(e),
        _ => {
            sink.discard();
            Ok(None)
        }
    }
}

/// Whether `len` bytes at `off` are the same in both files.
fn same<S: Source, D: Source>(
    src: &S,
    dest: &D,
    off: u64,
    len: usize,
    (a, b): &mut (Vec<u8>, Vec<u8>),
) -> io::Result<bool> {
    src.read_exact_at(&mut a[..len], off)?;
    dest.read_exact_at(&mut b[..len], off)?;
    Ok(a[..len] == b[..len])
}

fn write_runs<S: Source, D: Source + AsFd>(
    src: &S,
    dest: Option<&D>,
    part: &File,
    plan: &BlockPlan,
    buf: &mut [u8],
) -> io::Result<()> {
    for r in &plan.runs {
        match (r.from, dest) {
            (From::Dest, Some(d)) => clone_range(d, part, r.offset, r.len, buf)?,
            _ => copy_range(src, part, r.offset, r.len, buf)?,
        }
    }
    Ok(())
}

/// `len` bytes at `off` of `from` to the same offset of `to`, by read and write.
fn copy_range(
    from: &impl Source,
    to: &File,
    mut off: u64,
    len: u64,
    buf: &mut [u8],
) -> io::Result<()> {
    let end = off + len;
    while off < end {
        let n = (end - off).min(buf.len() as u64) as usize;
        from.read_exact_at(&mut buf[..n], off)?;
        to.write_all_at(&buf[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

/// Like [`copy_range`] with `copy_file_range`: extents shared where the filesystem can,
/// copied in the kernel otherwise; read and write where the call is refused.
fn clone_range<D: Source + AsFd>(
    from: &D,
    to: &File,
    off: u64,
    len: u64,
    buf: &mut [u8],
) -> io::Result<()> {
    let (mut at_in, mut at_out, end) = (off, off, off + len);
    while at_in < end {
        let n = (end - at_in).min(CHUNK) as usize;
        match rustix::fs::copy_file_range(from, Some(&mut at_in), to, Some(&mut at_out), n) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            Err(Errno::XDEV | Errno::NOSYS | Errno::OPNOTSUPP | Errno::INVAL) => {
                return copy_range(from, to, at_in, end - at_in, buf);
            }
            Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};
    use std::io::Read;
    use std::os::fd::BorrowedFd;

    const B: usize = 16 << 10;

    fn bs() -> BlockSize {
        BlockSize::from_bytes(B as u64).unwrap()
    }

    fn data(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
    }

    /// A SRC that someone else writes: after `grow_after` reads, each read first appends
    /// `grow` bytes (and bumps the ctime), `times` times in all.
    struct Growing {
        data: RefCell<Vec<u8>>,
        reads: Cell<usize>,
        grow_after: usize,
        times: Cell<usize>,
        version: Cell<u32>,
    }

    impl Growing {
        fn new(data: Vec<u8>, grow_after: usize, times: usize) -> Growing {
            Growing {
                data: RefCell::new(data),
                reads: Cell::new(0),
                grow_after,
                times: Cell::new(times),
                version: Cell::new(0),
            }
        }
    }

    impl Source for Growing {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.reads.set(self.reads.get() + 1);
            if self.reads.get() > self.grow_after && self.times.get() > 0 {
                self.times.set(self.times.get() - 1);
                self.data.borrow_mut().extend(data(B / 2, 9));
                self.version.set(self.version.get() + 1);
            }
            let d = self.data.borrow();
            let src = d
                .get(offset as usize..offset as usize + buf.len())
                .ok_or(io::ErrorKind::UnexpectedEof)?;
            buf.copy_from_slice(src);
            Ok(())
        }

        fn stamp(&self) -> io::Result<Stamp> {
            let t = Timestamp { secs: 1, nanos: 0 };
            Ok(Stamp {
                size: self.data.borrow().len() as u64,
                mtime: t,
                ctime: Timestamp {
                    secs: 1,
                    nanos: self.version.get(),
                },
                ino: 1,
            })
        }
    }

    /// Parts as temporary files; counts what was discarded.
    #[derive(Default)]
    struct Parts {
        last: Option<tempfile::NamedTempFile>,
        discarded: usize,
    }

    impl Sink for Parts {
        fn create(&mut self) -> io::Result<File> {
            let f = tempfile::NamedTempFile::new()?;
            let file = f.reopen()?;
            self.last = Some(f);
            Ok(file)
        }

        fn discard(&mut self) {
            if self.last.take().is_some() {
                self.discarded += 1;
            }
        }
    }

    impl Parts {
        fn contents(&mut self) -> Vec<u8> {
            let mut out = Vec::new();
            let f = self.last.as_mut().expect("a staged part");
            f.reopen().unwrap().read_to_end(&mut out).unwrap();
            out
        }
    }

    fn file_with(bytes: &[u8]) -> File {
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(bytes, 0).unwrap();
        f
    }

    fn no_dest() -> Option<&'static File> {
        None
    }

    #[test]
    fn one_changed_block_is_written_and_the_rest_reused() {
        let old = data(10 * B, 1);
        let mut new = old.clone();
        new[3 * B + 5] ^= 0x55;
        let (src, dest) = (file_with(&new), file_with(&old));
        let mut parts = Parts::default();
        match build(&src, Some(&dest), true, bs(), &mut parts).unwrap() {
            Built::Staged(plan, stamp) => {
                assert_eq!((plan.written(), plan.reused()), (B as u64, 9 * B as u64));
                assert_eq!(stamp.size, new.len() as u64);
            }
            Built::Unchanged(_) => panic!("a changed file was left"),
        }
        assert_eq!(parts.contents(), new);
    }

    #[test]
    fn an_equal_file_is_left_unless_it_may_not_stay() {
        let a = data(3 * B + 1, 2);
        let (src, dest) = (file_with(&a), file_with(&a));
        let mut parts = Parts::default();
        assert!(matches!(
            build(&src, Some(&dest), true, bs(), &mut parts).unwrap(),
            Built::Unchanged(_)
        ));
        assert!(parts.last.is_none(), "a part was made for an equal file");
        match build(&src, Some(&dest), false, bs(), &mut parts).unwrap() {
            Built::Staged(plan, _) => assert_eq!(plan.written(), 0),
            Built::Unchanged(_) => panic!("a file that may not stay was left"),
        }
        assert_eq!(parts.contents(), a);
    }

    #[test]
    fn a_source_that_grows_once_is_done_again_and_ends_whole() {
        let src = Growing::new(data(4 * B, 3), 2, 1);
        let mut parts = Parts::default();
        let built = build(&src, no_dest(), true, bs(), &mut parts).unwrap();
        assert_eq!(parts.discarded, 1, "the torn attempt was not discarded");
        let Built::Staged(plan, stamp) = built else {
            panic!("nothing staged")
        };
        let now = src.data.borrow().clone();
        assert_eq!(stamp.size, now.len() as u64);
        assert_eq!(plan.size, now.len() as u64);
        assert_eq!(
            parts.contents(),
            now,
            "the staged file is not SRC as it is now"
        );
    }

    #[test]
    fn a_source_that_keeps_changing_is_an_error_and_leaves_no_part() {
        let src = Growing::new(data(4 * B, 4), 1, usize::MAX);
        let dest = file_with(&data(4 * B, 4));
        let mut parts = Parts::default();
        let e = build(&src, Some(&dest), true, bs(), &mut parts).unwrap_err();
        assert!(matches!(e, BuildError::Unstable), "{e:?}");
        assert!(parts.last.is_none(), "a torn part was kept");
    }

    #[test]
    fn a_source_that_shrinks_under_the_reader_is_done_again() {
        // A SRC whose first stamp says 4 blocks but that holds 2: reads come up short.
        struct Shrunk(Cell<bool>, Vec<u8>);
        impl Source for Shrunk {
            fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
                let r = off as usize..off as usize + buf.len();
                let bytes = self.1[..2 * B].get(r).ok_or(io::ErrorKind::UnexpectedEof)?;
                buf.copy_from_slice(bytes);
                Ok(())
            }
            fn stamp(&self) -> io::Result<Stamp> {
                let size = if self.0.replace(false) { 4 * B } else { 2 * B } as u64;
                let t = Timestamp { secs: 0, nanos: 0 };
                Ok(Stamp {
                    size,
                    mtime: t,
                    ctime: Timestamp {
                        secs: 0,
                        nanos: size as u32,
                    },
                    ino: 1,
                })
            }
        }
        let src = Shrunk(Cell::new(true), data(4 * B, 5));
        let mut parts = Parts::default();
        build(&src, no_dest(), true, bs(), &mut parts).unwrap();
        assert_eq!(parts.contents(), data(4 * B, 5)[..2 * B]);
    }

    #[test]
    fn a_dest_that_changes_meanwhile_is_not_trusted() {
        struct Moving(File, Cell<u32>);
        impl Source for Moving {
            fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
                FileExt::read_exact_at(&self.0, buf, off)
            }
            fn stamp(&self) -> io::Result<Stamp> {
                // Every look at it finds another version until the third attempt.
                let n = self.1.get();
                self.1.set(n + 1);
                let mut s = Source::stamp(&self.0)?;
                s.ctime.nanos = n.min(4);
                Ok(s)
            }
        }
        impl AsFd for Moving {
            fn as_fd(&self) -> BorrowedFd<'_> {
                self.0.as_fd()
            }
        }
        let a = data(2 * B, 6);
        let (src, dest) = (file_with(&a), Moving(file_with(&a), Cell::new(0)));
        let mut parts = Parts::default();
        let built = build(&src, Some(&dest), true, bs(), &mut parts).unwrap();
        assert!(matches!(built, Built::Unchanged(_)), "{built:?}");
        assert!(dest.1.get() >= 6, "DEST was not looked at again");
    }
}
