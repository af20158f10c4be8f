//! The hashes and indexes the object encodings carry, each its own type so that one cannot be
//! passed where another is meant.
//!
//! - [`ObjectHash`] names an object: what a receiver fetches, the cache keeps and the channel
//!   derives a group and tag from. For a directory, a file-index page and a block it is the
//!   BLAKE3 of the object's bytes; for a bundle it is the bundle's id, a keyed hash of its
//!   members ([`super::bundle`]). A file's *leaf hashes* are the object hashes of its blocks:
//!   a leaf is fetched as an object by that very hash, so it is not a type of its own.
//! - [`FileHash`] is the BLAKE3 of a whole file, what `b3sum` prints. No object is named by it:
//!   fetching, caching or addressing by it would wait for something nobody sends, so it
//!   cannot be passed where an [`ObjectHash`] is expected.
//! - [`BlockIndex`] numbers a block within its file (byte offset / block size), so that it is
//!   never mistaken for a byte offset, a page number or an encoding symbol id
//!   ([`crate::wire::fec::Esi`]).
//!
//! On the wire and on disk each is exactly the bytes it wraps; conversions to and from the
//! raw [`blake3::Hash`] happen at the edges (encoding, hashing, and the cache crate, which
//! keys objects by the raw hash and depends on nothing of ours).

use std::fmt;

use lcfs_cache::{Hash, Verified};

/// The name of an object (see the module doc): the BLAKE3 of its bytes, or a bundle's id.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct ObjectHash(Hash);

/// The BLAKE3 of a whole file, as `b3sum` prints it; names no object (see the module doc).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct FileHash(Hash);

/// Index of a block within its file: block `i` holds bytes `i * block size ..`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct BlockIndex(pub u64);

impl ObjectHash {
    /// The name of a content-addressed object whose bytes are `bytes`.
    pub fn of(bytes: &[u8]) -> ObjectHash {
        ObjectHash(blake3::hash(bytes))
    }

    /// The name of an object already verified against its hash.
    pub fn of_verified(v: &Verified) -> ObjectHash {
        ObjectHash(*v.hash())
    }

    pub const fn from_bytes(bytes: [u8; 32]) -> ObjectHash {
        ObjectHash(Hash::from_bytes(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        self.0.as_bytes()
    }

    pub fn to_hex(&self) -> String {
        self.0.to_hex().to_string()
    }

    /// Parses 64 hex digits, as [`ObjectHash::to_hex`] writes them.
    pub fn from_hex(hex: &str) -> Option<ObjectHash> {
        Hash::from_hex(hex).ok().map(ObjectHash)
    }

    /// The raw hash, for the cache crate (which keys objects by it).
    pub fn raw(&self) -> &Hash {
        &self.0
    }

    /// The first 16 hex digits: how logs and errors name an object.
    pub fn short(&self) -> String {
        self.0.to_hex()[..16].to_owned()
    }
}

/// Wraps a raw hash known to name an object (one read back from the cache, a bundle id).
impl From<Hash> for ObjectHash {
    fn from(h: Hash) -> ObjectHash {
        ObjectHash(h)
    }
}

impl FileHash {
    /// The hash of a whole file whose bytes are `bytes`.
    pub fn of(bytes: &[u8]) -> FileHash {
        FileHash(blake3::hash(bytes))
    }

    pub const fn from_bytes(bytes: [u8; 32]) -> FileHash {
        FileHash(Hash::from_bytes(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        self.0.as_bytes()
    }

    pub fn to_hex(&self) -> String {
        self.0.to_hex().to_string()
    }
}

/// Wraps a raw hash computed over a whole file (the serve side merges block chaining values).
impl From<Hash> for FileHash {
    fn from(h: Hash) -> FileHash {
        FileHash(h)
    }
}

impl BlockIndex {
    /// The index as a `usize`, for indexing a file's leaves (saturating on 32-bit hosts, so an
    /// out-of-range index stays out of range).
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

macro_rules! hash_fmt {
    ($t:ty, $name:literal) => {
        /// The full lowercase hex.
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0.to_hex())
            }
        }

        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($name, "({})"), self.0.to_hex())
            }
        }

        /// By bytes, for sorting and ordered maps (BLAKE3 hashes have no order of their own).
        impl Ord for $t {
            fn cmp(&self, other: &Self) -> std::cmp::Ordering {
                self.as_bytes().cmp(other.as_bytes())
            }
        }

        impl PartialOrd for $t {
            fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(other))
            }
        }
    };
}

hash_fmt!(ObjectHash, "ObjectHash");
hash_fmt!(FileHash, "FileHash");

impl fmt::Display for BlockIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_bytes_as_the_raw_hash() {
        let raw = blake3::hash(b"x");
        let o = ObjectHash::of(b"x");
        assert_eq!(o.as_bytes(), raw.as_bytes());
        assert_eq!(FileHash::of(b"x").as_bytes(), raw.as_bytes());
        assert_eq!(o.to_string(), raw.to_hex().as_str());
        assert_eq!(o.short(), &raw.to_hex()[..16]);
        assert_eq!(ObjectHash::from_bytes(*raw.as_bytes()), o);
        assert_eq!(std::mem::size_of::<ObjectHash>(), 32);
    }

    #[test]
    fn block_indexes_and_byte_offsets() {
        let bs = crate::wire::object::BlockSize::DEFAULT; // 64 KiB
        assert_eq!(bs.block_at(0), BlockIndex(0));
        assert_eq!(bs.block_at(65_535), BlockIndex(0));
        assert_eq!(bs.block_at(65_536), BlockIndex(1));
        assert_eq!(bs.offset_of(BlockIndex(3)), 3 << 16);
        assert_eq!(bs.offset_of(BlockIndex(u64::MAX)), u64::MAX);
        assert_eq!(bs.block_len(100_000, BlockIndex(1)), 100_000 - 65_536);
        assert_eq!(bs.block_len(100_000, BlockIndex(2)), 0);
        let all: Vec<BlockIndex> = bs.blocks_of(100_000).collect();
        assert_eq!(all, [BlockIndex(0), BlockIndex(1)]);
    }

    #[test]
    fn ordered_by_bytes() {
        let (a, b) = (
            ObjectHash::from_bytes([1; 32]),
            ObjectHash::from_bytes([2; 32]),
        );
        assert!(a < b);
        assert!(BlockIndex(1) < BlockIndex(2));
    }
}
