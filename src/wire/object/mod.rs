//! Object encodings: directories, file indexes and the root record (DESIGN.md section 1).
//!
//! Every encoding starts with a 4-byte magic and a version byte, is little-endian, and is decoded
//! with checked reads only: a truncated, oversized or otherwise hostile encoding is an
//! [`ObjectError`], never a panic and never an allocation larger than the input justifies.
//! Directories and file indexes are content-addressed (their name is the BLAKE3 of their
//! encoding); the root record is the one mutable thing and is carried on the channel's own group.
//!
//! Every reference to an object carries the object's length as well as its hash, so a receiver
//! knows exactly how many bytes to decode before the first packet arrives, and packets need not
//! carry any size.
//!
//! Hashes of different meaning and block indexes have types of their own ([`ids`]): an
//! [`ObjectHash`] names what is fetched and cached, a [`FileHash`] is a whole file's `b3sum`,
//! a [`BlockIndex`] is a block's place in its file.

pub mod bundle;
pub(crate) mod codec;
pub mod dir;
pub mod ids;
pub mod index;
pub mod root;

pub use dir::{Content, Directory, Entry, EntryKind, FileRef, Timestamp};
pub use ids::{BlockIndex, FileHash, ObjectHash};
pub use index::{FileIndex, LEAVES_PER_PAGE};
pub use root::{RootRecord, Signature};

use std::fmt;

/// Files at most this long travel inside their directory entry.
pub const INLINE_MAX: u64 = 1024;
/// The largest directory encoding a server will produce or a receiver accept.
pub const DIRECTORY_MAX: usize = 32 << 20;

/// A reference to a content-addressed object: its hash and its exact encoded length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ObjectRef {
    pub hash: ObjectHash,
    pub len: u32,
}

/// How logs and errors name an object: `0123456789abcdef (65536 bytes)`.
impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({} bytes)", self.hash.short(), self.len)
    }
}

/// Block size of a channel: a power of two from 16 KiB to 4 MiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSize(u8);

impl BlockSize {
    pub const MIN_LOG2: u8 = 14;
    pub const MAX_LOG2: u8 = 22;
    pub const DEFAULT: BlockSize = BlockSize(16);

    pub fn from_log2(log2: u8) -> Result<BlockSize, ObjectError> {
        if (Self::MIN_LOG2..=Self::MAX_LOG2).contains(&log2) {
            Ok(BlockSize(log2))
        } else {
            Err(ObjectError::Invalid("block size out of range"))
        }
    }

    pub fn from_bytes(bytes: u64) -> Result<BlockSize, ObjectError> {
        if !bytes.is_power_of_two() {
            return Err(ObjectError::Invalid("block size is not a power of two"));
        }
        Self::from_log2(bytes.trailing_zeros() as u8)
    }

    pub fn log2(self) -> u8 {
        self.0
    }

    pub fn bytes(self) -> u64 {
        1 << self.0
    }

    /// Number of blocks a file of `size` bytes has.
    pub fn blocks_in(self, size: u64) -> u64 {
        size.div_ceil(self.bytes())
    }

    /// Length of block `index` of a file of `size` bytes.
    pub fn block_len(self, size: u64, index: BlockIndex) -> u32 {
        let start = self.offset_of(index);
        size.saturating_sub(start).min(self.bytes()) as u32
    }

    /// The byte offset at which block `index` starts.
    pub fn offset_of(self, index: BlockIndex) -> u64 {
        index.0.saturating_mul(self.bytes())
    }

    /// The block that holds byte `offset`.
    pub fn block_at(self, offset: u64) -> BlockIndex {
        BlockIndex(offset >> self.0)
    }

    /// The blocks of a file of `size` bytes, in order.
    pub fn blocks_of(self, size: u64) -> impl Iterator<Item = BlockIndex> {
        (0..self.blocks_in(size)).map(BlockIndex)
    }
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ObjectError {
    #[error("encoding truncated: needed {needed} more bytes at offset {offset}")]
    Truncated { offset: usize, needed: usize },
    #[error("bad magic: not an lcfs {0}")]
    Magic(&'static str),
    #[error("unsupported {what} version {version}")]
    Version { what: &'static str, version: u8 },
    #[error("invalid encoding: {0}")]
    Invalid(&'static str),
    #[error("{0} trailing bytes after the encoding")]
    Trailing(usize),
    #[error("object {0} does not match its reference")]
    Mismatch(ObjectHash),
}

/// Hash of an encoding, the name of a directory or file-index object.
pub fn object_ref(encoding: &[u8]) -> ObjectRef {
    ObjectRef {
        hash: ObjectHash::of(encoding),
        len: encoding.len() as u32,
    }
}
