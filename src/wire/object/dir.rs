//! Directory objects: the sorted entries of one directory, and the directory's own mode and
//! mtime.
//!
//! Encoding (version 2, little-endian):
//! `"LCFD" 2 | mode u32 | mtime_secs i64 | mtime_nanos u32 | count u32 | entry*`, each entry
//! `name_len u8 | name | kind u8 | mode u32 | mtime_secs i64 | mtime_nanos u32 | nlink u32 |
//! link u64 (files with nlink > 1 only) | body`. `nlink` is what `stat` shows: for a
//! directory 2 + its subdirectories, for a file its link count on the publisher's file system
//! (names outside the tree count, as they do on a bind mount of a subdirectory), and `link`
//! names its hard-link group: entries with the same `link` are one file, which a mount shows
//! as one inode and `copy` writes as hard links. (Version 1, still decoded, had neither the
//! header fields nor `nlink`/`link`: the root then shows mode 0755 and the publish time, and
//! links counts are 1 and 2. [`Directory::encode`] still writes it when nothing needs
//! version 2, so that every decoded object encodes back to the same bytes.) The body is, for a file (kind 0) `size u64 | blake3 [32] | content`, for a directory (1)
//! `hash [32] | len u32`, for a symlink (2) `target_len u16 | target`. File content is
//! `0 | bytes[size]` (inline, size <= [`INLINE_MAX`]), `1 | hash [32]` (one block) or
//! `2 | hash [32] | len u32 | first_leaf [32]` (a file index, and the hash of the file's first
//! block, so that a reader can fetch the index and the first block at once).
//!
//! Invariants checked on decode: names are 1..=255 bytes without `/` or NUL and are neither `.`
//! nor `..`; entries are strictly sorted by name bytes (so no duplicates); modes hold only the
//! permission bits; nanoseconds are below 10^9; symlink targets are 1..=4095 bytes without NUL.

use super::codec::{Reader, Writer};
use super::{FileHash, ObjectError, ObjectHash, ObjectRef, DIRECTORY_MAX, INLINE_MAX};

const MAGIC: &[u8; 4] = b"LCFD";
const VERSION: u8 = 2;
const MIN_ENTRY_V1: usize = 21;
const MIN_ENTRY: usize = 25;
/// The most links a file may claim (Linux allows 65,000 on ext4; more is not believed).
pub const MAX_NLINK: u32 = 1 << 24;

/// A directory's own attributes (the root has no entry to carry them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DirMeta {
    pub mode: u32,
    pub mtime: Timestamp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    /// The whole file, for files of at most [`INLINE_MAX`] bytes (and empty files).
    Inline(Vec<u8>),
    /// A file of exactly one block: the block's hash.
    Block(ObjectHash),
    /// A file of several blocks: its file index, and its first block's hash.
    Index {
        index: ObjectRef,
        first_leaf: ObjectHash,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileRef {
    pub size: u64,
    /// BLAKE3 of the whole file, what `b3sum` prints.
    pub b3: FileHash,
    pub content: Content,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    File(FileRef),
    Dir(ObjectRef),
    Symlink(Vec<u8>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: Vec<u8>,
    /// Permission bits only (`0o7777`).
    pub mode: u32,
    pub mtime: Timestamp,
    /// Link count, as `stat` shows it (see the module doc).
    pub nlink: u32,
    /// Hard-link group of a file whose `nlink` > 1, else 0.
    pub link: u64,
    pub kind: EntryKind,
}

impl Entry {
    /// The conventional link count of an entry that is not a hard link: 1, or 2 for a
    /// directory (whose subdirectories the caller adds).
    pub fn plain_nlink(kind: &EntryKind) -> u32 {
        match kind {
            EntryKind::Dir(_) => 2,
            _ => 1,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Directory {
    pub entries: Vec<Entry>,
    /// Its own mode and mtime (`None` from a version 1 object).
    pub meta: Option<DirMeta>,
}

impl Directory {
    /// Builds a directory, sorting its entries by name.
    pub fn new(mut entries: Vec<Entry>) -> Directory {
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Directory {
            entries,
            meta: None,
        }
    }

    /// [`Directory::new`] with the directory's own attributes.
    pub fn with_meta(entries: Vec<Entry>, meta: DirMeta) -> Directory {
        Directory {
            meta: Some(meta),
            ..Directory::new(entries)
        }
    }

    pub fn get(&self, name: &[u8]) -> Option<&Entry> {
        self.entries
            .binary_search_by(|e| e.name.as_slice().cmp(name))
            .ok()
            .map(|i| &self.entries[i])
    }

    /// Version 2, or version 1 when there is nothing that needs 2 (no own attributes, no
    /// link beyond the conventional counts): what decodes re-encodes to the same bytes.
    pub fn encode(&self) -> Vec<u8> {
        let plain = |e: &Entry| e.link == 0 && e.nlink == Entry::plain_nlink(&e.kind);
        let version = match self.meta {
            None if self.entries.iter().all(plain) => 1,
            _ => VERSION,
        };
        let mut w = Writer::header(MAGIC, version);
        if version > 1 {
            let meta = self.meta.unwrap_or(DirMeta {
                mode: 0o755,
                mtime: Timestamp::default(),
            });
            w.u32(meta.mode);
            w.i64(meta.mtime.secs);
            w.u32(meta.mtime.nanos);
        }
        w.u32(self.entries.len() as u32);
        for e in &self.entries {
            encode_entry(&mut w, e, version);
        }
        w.buf
    }

    pub fn decode(buf: &[u8]) -> Result<Directory, ObjectError> {
        if buf.len() > DIRECTORY_MAX {
            return Err(ObjectError::Invalid("directory larger than the limit"));
        }
        let mut r = Reader::new(buf);
        let version = r.header_of(MAGIC, "directory", 1..=VERSION)?;
        let meta = match version {
            1 => None,
            _ => Some(DirMeta {
                mode: decode_mode(&mut r)?,
                mtime: decode_time(&mut r)?,
            }),
        };
        let min_entry = if version == 1 {
            MIN_ENTRY_V1
        } else {
            MIN_ENTRY
        };
        let n = r.count(min_entry, usize::MAX)?;
        let mut entries: Vec<Entry> = Vec::with_capacity(n);
        for _ in 0..n {
            let e = decode_entry(&mut r, version)?;
            if entries.last().is_some_and(|p| p.name >= e.name) {
                return Err(ObjectError::Invalid("entries not strictly sorted"));
            }
            entries.push(e);
        }
        r.finish()?;
        Ok(Directory { entries, meta })
    }
}

fn encode_entry(w: &mut Writer, e: &Entry, version: u8) {
    w.u8(e.name.len() as u8);
    w.bytes(&e.name);
    let kind = match e.kind {
        EntryKind::File(_) => 0,
        EntryKind::Dir(_) => 1,
        EntryKind::Symlink(_) => 2,
    };
    w.u8(kind);
    w.u32(e.mode);
    w.i64(e.mtime.secs);
    w.u32(e.mtime.nanos);
    if version > 1 {
        w.u32(e.nlink);
        if kind == 0 && e.nlink > 1 {
            w.u64(e.link);
        }
    }
    match &e.kind {
        EntryKind::File(f) => {
            w.u64(f.size);
            w.hash(f.b3.as_bytes());
            match &f.content {
                Content::Inline(b) => {
                    w.u8(0);
                    w.bytes(b);
                }
                Content::Block(h) => {
                    w.u8(1);
                    w.hash(h.as_bytes());
                }
                Content::Index { index, first_leaf } => {
                    w.u8(2);
                    w.hash(index.hash.as_bytes());
                    w.u32(index.len);
                    w.hash(first_leaf.as_bytes());
                }
            }
        }
        EntryKind::Dir(r) => {
            w.hash(r.hash.as_bytes());
            w.u32(r.len);
        }
        EntryKind::Symlink(t) => {
            w.u16(t.len() as u16);
            w.bytes(t);
        }
    }
}

/// Whether `name` may name a directory entry.
pub fn valid_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != b"."
        && name != b".."
        && !name.iter().any(|&b| b == b'/' || b == 0)
}

fn decode_mode(r: &mut Reader) -> Result<u32, ObjectError> {
    let mode = r.u32()?;
    if mode & !0o7777 != 0 {
        return Err(ObjectError::Invalid("mode has bits beyond the permissions"));
    }
    Ok(mode)
}

fn decode_time(r: &mut Reader) -> Result<Timestamp, ObjectError> {
    let secs = r.i64()?;
    let nanos = r.u32()?;
    if nanos >= 1_000_000_000 {
        return Err(ObjectError::Invalid("nanoseconds out of range"));
    }
    Ok(Timestamp { secs, nanos })
}

fn decode_entry(r: &mut Reader, version: u8) -> Result<Entry, ObjectError> {
    let len = r.u8()? as usize;
    let name = r.bytes(len)?.to_vec();
    if !valid_name(&name) {
        return Err(ObjectError::Invalid("bad entry name"));
    }
    let kind = r.u8()?;
    let mode = decode_mode(r)?;
    let mtime = decode_time(r)?;
    let (nlink, link) = match version {
        1 => (if kind == 1 { 2 } else { 1 }, 0),
        _ => {
            let nlink = r.u32()?;
            let link = if kind == 0 && nlink > 1 { r.u64()? } else { 0 };
            match (kind, nlink, link) {
                (_, 0, _) | (_, MAX_NLINK.., _) => {
                    return Err(ObjectError::Invalid("link count out of range"))
                }
                (1, 1, _) => return Err(ObjectError::Invalid("directory with one link")),
                (0, 2.., 0) => return Err(ObjectError::Invalid("hard link without a group")),
                _ => (nlink, link),
            }
        }
    };
    let kind = match kind {
        0 => EntryKind::File(decode_file(r)?),
        1 => EntryKind::Dir(ObjectRef {
            hash: r.object_hash()?,
            len: r.u32()?,
        }),
        2 => EntryKind::Symlink(decode_target(r)?),
        _ => return Err(ObjectError::Invalid("unknown entry kind")),
    };
    Ok(Entry {
        name,
        mode,
        mtime,
        nlink,
        link,
        kind,
    })
}

fn decode_file(r: &mut Reader) -> Result<FileRef, ObjectError> {
    let size = r.u64()?;
    let b3 = r.file_hash()?;
    let content = match r.u8()? {
        0 if size <= INLINE_MAX => Content::Inline(r.bytes(size as usize)?.to_vec()),
        0 => return Err(ObjectError::Invalid("inline file above the inline limit")),
        1 if size > 0 => Content::Block(r.object_hash()?),
        2 if size > 0 => Content::Index {
            index: ObjectRef {
                hash: r.object_hash()?,
                len: r.u32()?,
            },
            first_leaf: r.object_hash()?,
        },
        1 | 2 => return Err(ObjectError::Invalid("empty file with a block reference")),
        _ => return Err(ObjectError::Invalid("unknown content kind")),
    };
    Ok(FileRef { size, b3, content })
}

fn decode_target(r: &mut Reader) -> Result<Vec<u8>, ObjectError> {
    let len = r.u16()? as usize;
    let t = r.bytes(len)?;
    if t.is_empty() || t.len() > 4095 || t.contains(&0) {
        return Err(ObjectError::Invalid("bad symlink target"));
    }
    Ok(t.to_vec())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub fn sample() -> Directory {
        let h = ObjectHash::of(b"x");
        let ts = Timestamp {
            secs: 1_700_000_000,
            nanos: 5,
        };
        let e = |name: &str, kind| Entry {
            name: name.into(),
            mode: 0o644,
            mtime: ts,
            nlink: Entry::plain_nlink(&kind),
            link: 0,
            kind,
        };
        Directory::new(vec![
            e(
                "empty",
                EntryKind::File(FileRef {
                    size: 0,
                    b3: FileHash::of(b""),
                    content: Content::Inline(vec![]),
                }),
            ),
            e(
                "one",
                EntryKind::File(FileRef {
                    size: 70000,
                    b3: FileHash::from_bytes(*h.as_bytes()),
                    content: Content::Block(h),
                }),
            ),
            e(
                "big",
                EntryKind::File(FileRef {
                    size: 1 << 20,
                    b3: FileHash::from_bytes(*h.as_bytes()),
                    content: Content::Index {
                        index: ObjectRef { hash: h, len: 522 },
                        first_leaf: h,
                    },
                }),
            ),
            e("sub dir", EntryKind::Dir(ObjectRef { hash: h, len: 9 })),
            e("link→", EntryKind::Symlink(b"../a b".to_vec())),
        ])
    }

    /// [`sample`] with its own attributes, and two names of one hard-linked file.
    pub fn sample_v2() -> Directory {
        let mut d = sample();
        let i = d.entries.iter().position(|e| e.name == b"one").unwrap();
        let mut linked = d.entries[i].clone();
        linked.name = b"one again".to_vec();
        for e in [&mut d.entries[i], &mut linked] {
            e.nlink = 2;
            e.link = 0x1234_5678_9abc;
        }
        d.entries.push(linked);
        Directory::with_meta(
            d.entries,
            DirMeta {
                mode: 0o750,
                mtime: Timestamp {
                    secs: 1_600_000_000,
                    nanos: 7,
                },
            },
        )
    }

    #[test]
    fn version_2_carries_own_attributes_and_links() {
        let d = sample_v2();
        let back = Directory::decode(&d.encode()).unwrap();
        assert_eq!(back, d);
        assert_eq!(back.meta.unwrap().mode, 0o750);
        let dir = back.get(b"sub dir").unwrap();
        assert_eq!((dir.nlink, dir.link), (2, 0));
        let (a, b) = (back.get(b"one").unwrap(), back.get(b"one again").unwrap());
        assert_eq!((a.nlink, a.link), (2, b.link));
    }

    #[test]
    fn version_1_still_decodes_and_round_trips() {
        let d = sample();
        let v1 = d.encode();
        assert_eq!(v1[4], 1, "nothing here needs version 2");
        let back = Directory::decode(&v1).unwrap();
        assert_eq!(back, d);
        assert_eq!(back.encode(), v1);
        assert_eq!(sample_v2().encode()[4], 2);
    }

    /// Found by `tools/fuzz objects`: an empty version 1 directory re-encoded as version 2
    /// with made-up attributes, so it no longer decoded the same.
    #[test]
    fn regression_v1_directory_reencodes_as_v1() {
        let v1 = b"LCFD\x01\0\0\0\0";
        let d = Directory::decode(v1).unwrap();
        assert_eq!(d.encode(), v1);
        assert_eq!(Directory::decode(&d.encode()).unwrap(), d);
    }

    #[test]
    fn hostile_link_counts_are_refused() {
        let cases: [(&[u8], u32, u64); 4] = [
            (b"one", 0, 0),         // a file with no link
            (b"one", 2, 0),         // linked, but no group
            (b"sub dir", 1, 0),     // a directory with one link
            (b"one", MAX_NLINK, 7), // beyond belief
        ];
        for (name, nlink, link) in cases {
            let mut d = sample();
            let i = d.entries.iter().position(|e| e.name == name).unwrap();
            d.entries[i].nlink = nlink;
            d.entries[i].link = link;
            assert!(
                Directory::decode(&d.encode()).is_err(),
                "{i} {nlink} {link}"
            );
        }
    }

    #[test]
    fn round_trip_and_lookup() {
        let d = sample_v2();
        let enc = d.encode();
        assert_eq!(Directory::decode(&enc).unwrap(), d);
        assert!(d.get(b"one").is_some() && d.get(b"nope").is_none());
    }

    #[test]
    fn every_truncation_is_an_error() {
        let enc = sample().encode();
        for n in 0..enc.len() {
            assert!(Directory::decode(&enc[..n]).is_err(), "prefix {n}");
        }
        let mut long = enc.clone();
        long.push(0);
        assert_eq!(Directory::decode(&long), Err(ObjectError::Trailing(1)));
    }

    #[test]
    fn rejects_unsorted_and_bad_names() {
        let mut d = sample();
        d.entries.swap(0, 1);
        assert!(Directory::decode(&d.encode()).is_err());
        for bad in [&b".."[..], b"a/b", b"", b"nul\0"] {
            let mut d = sample();
            d.entries.truncate(1);
            d.entries[0].name = bad.to_vec();
            assert!(Directory::decode(&d.encode()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn huge_count_does_not_allocate() {
        let v2 = Directory::with_meta(vec![], DirMeta::default());
        for (mut enc, at) in [(Directory::default().encode(), 5), (v2.encode(), 21)] {
            enc[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
            assert!(matches!(
                Directory::decode(&enc),
                Err(ObjectError::Truncated { .. })
            ));
        }
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Directory::decode(&bytes);
        }

        #[test]
        fn bit_flips_never_panic(pos in 0usize..400, bit in 0u8..8) {
            let mut enc = sample().encode();
            let i = pos % enc.len();
            enc[i] ^= 1 << bit;
            if let Ok(d) = Directory::decode(&enc) {
                // Anything that still decodes must re-encode to the same bytes.
                prop_assert_eq!(d.encode(), enc);
            }
        }
    }
}
