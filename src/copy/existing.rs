//! Delta reuse: the blocks of a file already at the target name in DEST, by leaf hash.
//!
//! Invariants: the file is opened `O_NOFOLLOW` relative to its directory's descriptor, and only
//! a regular file is read; every block taken from it is hashed again as it is read, so a file
//! someone else planted or changes meanwhile can cost time but never put a wrong byte in the
//! copy. It is left in place (and given its published mode) only when it belongs to the
//! copying user alone ([`dest::solely_ours`]).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;

use rustix::fs::Stat;

use crate::wire::object::ObjectHash;

use super::dest;
use crate::wire::object::{BlockSize, Timestamp};

/// The blocks of a file already at the target path.
#[derive(Default)]
pub struct Existing {
    file: Option<File>,
    /// leaf -> offset of a block with that hash.
    blocks: HashMap<ObjectHash, u64>,
    /// The leaves in file order, and the file's size.
    order: Vec<ObjectHash>,
    size: u64,
    /// The file belongs to the copying user alone, so it may stay in place.
    ours: bool,
}

impl Existing {
    /// True if the file already holds exactly these leaves and may stay where it is.
    pub fn in_place(&self, leaves: &[ObjectHash], size: u64) -> bool {
        self.ours
            && self.file.is_some()
            && self.size == size
            && self.order == leaves
            && !leaves.is_empty()
    }

    /// A block of the existing file with hash `leaf`, re-verified as it is read.
    pub fn read(&self, leaf: &ObjectHash, len: u64) -> Option<Vec<u8>> {
        let off = *self.blocks.get(leaf)?;
        let mut buf = vec![0; len as usize];
        self.file.as_ref()?.read_exact_at(&mut buf, off).ok()?;
        (ObjectHash::of(&buf) == *leaf).then_some(buf)
    }

    /// Gives a file left in place its published mode and mtime, through its descriptor.
    pub fn finish(&self, mode: u32, mtime: Timestamp) -> io::Result<()> {
        let file = self
            .file
            .as_ref()
            .ok_or_else(|| io::Error::other("no existing file"))?;
        dest::set_mode(file, mode)?;
        dest::set_times(file, mtime)
    }
}

/// The blocks of the file `name` in `dir` (none if it is not a regular file).
///
/// The name is looked up here and only a file that is there goes to the blocking pool to
/// be hashed: most names of a first copy are not there yet, and a failed lookup costs less
/// than the pool's two thread wake-ups (a copy of tools/bench's 10,000-file tree took 0.80 s
/// of CPU instead of 1.09 s, DEST and cache on tmpfs).
pub async fn existing_blocks(dir: &OwnedFd, name: &OsStr, bs: BlockSize, euid: u32) -> Existing {
    let Some((file, st)) = dest::open_regular(dir, name) else {
        return Existing::default();
    };
    tokio::task::spawn_blocking(move || hash_existing(file, &st, bs, euid).unwrap_or_default())
        .await
        .unwrap_or_default()
}

fn hash_existing(file: File, st: &Stat, bs: BlockSize, euid: u32) -> io::Result<Existing> {
    let size = u64::try_from(st.st_size).unwrap_or(0);
    let mut ex = Existing {
        size,
        ours: dest::solely_ours(st, euid),
        ..Existing::default()
    };
    let mut buf = vec![0; bs.bytes() as usize];
    for i in bs.blocks_of(size) {
        let (offset, len) = (bs.offset_of(i), bs.block_len(size, i) as usize);
        file.read_exact_at(&mut buf[..len], offset)?;
        let leaf = ObjectHash::of(&buf[..len]);
        ex.blocks.entry(leaf).or_insert(offset);
        ex.order.push(leaf);
    }
    ex.file = Some(file);
    Ok(ex)
}
