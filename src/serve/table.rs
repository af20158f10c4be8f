//! What the server publishes: the object table the sender and the MLD listener consult.
//!
//! The table maps every object's group to its hash and every hash to where its bytes are. It
//! is immutable but for the root record's signature, which is renewed while the generation
//! is served; a new generation builds a new table ([`Table::next`]) and swaps it in whole.
//!
//! A new table keeps the objects of the generations it replaces for [`GRACE`] (at most
//! [`MAX_OLDER`] of them): a receiver that still reads a file, a directory or a file index of
//! the generation before (a mount with the file open, a copy that started a moment before
//! the change) still gets it while the server has it. "Has it" is checked as always: a block
//! is re-read and re-hashed before it is sent, so a block whose file has changed since is
//! simply not sent, while directories and file indexes, kept in memory, always are. Kept as
//! one map over the union of those generations, each object tagged with the last generation
//! that published it, rather than a table per generation: unchanged objects, nearly all of
//! them, are held once, and memory follows the tree plus what changed within [`GRACE`], not
//! the tree times the number of generations.
//!
//! Invariant: every object of the current generation is in the table with the current
//! generation's tag; an object of an older generation is there only while that generation
//! was replaced less than [`GRACE`] ago (checked when the next generation is built) and is
//! among the [`MAX_OLDER`] latest.

use std::collections::HashMap;
use std::net::Ipv6Addr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;

use crate::wire::object::ObjectHash;

pub use super::index::Object;
use super::index::{read_block, IndexError, Published, Source, Tree};
use crate::wire::channel::{Address, Channel, Report};
use crate::wire::object::{ObjectRef, RootRecord};

/// How long the objects of a replaced generation stay published.
pub const GRACE: Duration = Duration::from_secs(60);
/// The most replaced generations whose objects stay published.
pub const MAX_OLDER: usize = 16;

pub struct Table {
    pub channel: Channel,
    /// The root record as last signed (or unsigned), and its encoding as sent. Re-signing
    /// replaces both; everything else in a table is immutable.
    signed: RwLock<(RootRecord, Arc<[u8]>)>,
    pub root: Address,
    /// Where the beacon goes.
    pub air: Address,
    /// The groups receivers join to report something (`crate::wire::channel::Report`).
    reports: HashMap<Ipv6Addr, Report>,
    /// The generation this table publishes (the root record's).
    pub generation: u64,
    objects: HashMap<ObjectHash, Object>,
    /// The tree that file sources are read from again, by descriptor.
    pub tree: Arc<Tree>,
    by_group: HashMap<Ipv6Addr, ObjectHash>,
    /// The replaced generations whose objects are kept, with when each was replaced.
    older: Vec<(u64, Instant)>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("object is not published in this generation")]
    Unknown,
    #[error(transparent)]
    Index(#[from] IndexError),
}

impl LoadError {
    /// The file whose contents changed under the server, if that is what went wrong.
    pub fn changed_path(&self) -> Option<PathBuf> {
        match self {
            LoadError::Index(IndexError::Changed { path }) => Some(path.clone()),
            _ => None,
        }
    }
}

impl Table {
    /// The table of a first generation.
    pub fn new(channel: Channel, published: Published, record: RootRecord) -> Table {
        let generation = record.generation;
        let mut objects = published.objects;
        for o in objects.values_mut() {
            o.generation = generation;
        }
        Table {
            signed: RwLock::new((record.clone(), record.encode().into())),
            root: channel.root_address(),
            air: channel.air_address(),
            reports: channel.reports().map(|(r, a)| (a.group, r)).collect(),
            generation,
            by_group: groups(&channel, &objects),
            objects,
            tree: published.tree,
            older: Vec::new(),
            channel,
        }
    }

    /// The table that replaces this one at `now`: `published` as the current generation,
    /// plus the objects of this generation and of the older ones still within [`GRACE`].
    /// Directory and index encodings equal to kept ones share their memory.
    pub fn next(&self, published: Published, record: RootRecord, now: Instant) -> Table {
        let mut next = Table::new(self.channel.clone(), published, record);
        let mut older = vec![(self.generation, now)];
        older.extend(
            self.older
                .iter()
                .filter(|(_, replaced)| now.saturating_duration_since(*replaced) < GRACE)
                .take(MAX_OLDER - 1),
        );
        for (hash, old) in &self.objects {
            let kept = older.iter().any(|(g, _)| *g == old.generation);
            match next.objects.get_mut(hash) {
                Some(new) => share_memory(&mut new.source, &old.source),
                None if kept => {
                    next.objects.insert(*hash, old.clone());
                }
                None => {}
            }
        }
        next.by_group = groups(&next.channel, &next.objects);
        next.older = older;
        next
    }

    /// The encoded root record, as it goes on the wire.
    pub fn record(&self) -> Arc<[u8]> {
        self.signed
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }

    /// When the current signature expires (Unix ns), if the record is signed.
    pub fn signature_expiry(&self) -> Option<u64> {
        let signed = self.signed.read().unwrap_or_else(|p| p.into_inner());
        signed.0.signature.as_ref().map(|s| s.expires_ns)
    }

    /// Signs the same generation again at `now_ns`, valid for `validity_ns`: receivers refuse
    /// records whose signature is too old, so the publisher renews it while it serves.
    pub fn resign(&self, key: &SigningKey, now_ns: u64, validity_ns: u64) {
        let mut signed = self.signed.write().unwrap_or_else(|p| p.into_inner());
        signed.0.sign(key, now_ns, validity_ns);
        signed.1 = signed.0.encode().into();
    }

    /// The root directory this generation publishes.
    pub fn root_object(&self) -> ObjectRef {
        self.signed.read().unwrap_or_else(|p| p.into_inner()).0.root
    }

    /// Objects this generation publishes that `previous` did not have at all, and their bytes:
    /// what a receiver that holds the previous generation fetches to move to this one.
    pub fn new_since(&self, previous: Option<&Table>) -> (u64, u64) {
        self.objects
            .iter()
            .filter(|(_, o)| o.generation == self.generation)
            .filter(|(h, _)| previous.is_none_or(|p| p.object(h).is_none()))
            .fold((0, 0), |(n, bytes), (_, o)| (n + 1, bytes + o.len as u64))
    }

    /// Whether `group` carries something this table publishes (the MLD listener's filter).
    pub fn interested(&self, group: &Ipv6Addr) -> bool {
        *group == self.root.group
            || *group == self.air.group
            || self.by_group.contains_key(group)
            || self.reports.contains_key(group)
    }

    /// What receivers joining `group` report, if it is a report's group.
    pub fn report(&self, group: &Ipv6Addr) -> Option<Report> {
        self.reports.get(group).copied()
    }

    /// The object whose group is `group`, of this generation or a kept older one.
    pub fn hash_of(&self, group: &Ipv6Addr) -> Option<ObjectHash> {
        self.by_group.get(group).copied()
    }

    /// Object `hash`, of this generation or a kept older one.
    pub fn object(&self, hash: &ObjectHash) -> Option<&Object> {
        self.objects.get(hash)
    }

    /// Whether the current generation publishes `hash`.
    pub fn is_current(&self, hash: &ObjectHash) -> bool {
        self.objects
            .get(hash)
            .is_some_and(|o| o.generation == self.generation)
    }

    /// How many objects this generation publishes, and how many more are kept from older ones.
    pub fn counts(&self) -> (usize, usize) {
        let current = self
            .objects
            .values()
            .filter(|o| o.generation == self.generation)
            .count();
        (current, self.objects.len() - current)
    }

    /// The bytes of object `hash`, re-read and re-verified when they live in a file.
    pub fn load(&self, hash: &ObjectHash) -> Result<Arc<[u8]>, LoadError> {
        match self.objects.get(hash).map(|o| &o.source) {
            None => Err(LoadError::Unknown),
            Some(Source::Memory(bytes)) => Ok(bytes.clone()),
            // Each member read and re-verified as any block is (members are never bundles).
            Some(Source::Bundle(members)) => {
                let mut bytes = Vec::with_capacity(members.iter().map(|m| m.len as usize).sum());
                for m in members.iter() {
                    bytes.extend_from_slice(&self.load(&m.hash)?);
                }
                Ok(bytes.into())
            }
            Some(source) => Ok(read_block(&self.tree, source, hash)?),
        }
    }
}

fn groups(
    channel: &Channel,
    objects: &HashMap<ObjectHash, Object>,
) -> HashMap<Ipv6Addr, ObjectHash> {
    objects
        .keys()
        .map(|h| (channel.object_address(h).group, *h))
        .collect()
}

/// Points `new` at `old`'s bytes when both are the same encoding in memory (same hash).
fn share_memory(new: &mut Source, old: &Source) {
    if let (Source::Memory(n), Source::Memory(o)) = (&*new, old) {
        if !Arc::ptr_eq(n, o) {
            *new = Source::Memory(o.clone());
        }
    }
}

/// An unsigned root record of `p` as generation `generation`, for tests of tables.
#[cfg(test)]
pub(crate) fn test_record(p: &Published, generation: u64) -> RootRecord {
    RootRecord {
        channel_id: [0; 32],
        generation,
        publish_time_ns: 0,
        root: p.root,
        block_size: p.block_size,
        single_file: false,
        signature: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::index::{index_tree, IndexConfig};

    use super::test_record as record;

    /// The hash of the only block of a file of `len` bytes of `byte`.
    fn block(byte: u8, len: usize) -> ObjectHash {
        ObjectHash::of(&vec![byte; len])
    }

    #[test]
    fn replaced_generations_are_kept_for_the_grace_period() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let len = 20_000;
        std::fs::write(&path, vec![1u8; len]).unwrap();
        let tree = Arc::new(Tree::open(dir.path()).unwrap());
        let index = || index_tree(&tree, &IndexConfig::default()).unwrap();
        let channel = Channel::new("t", None);
        let p1 = index();
        let g1 = Table::new(channel, p1.clone(), record(&p1, 1));
        assert_eq!(g1.counts(), (2, 0));
        let t0 = Instant::now();
        std::fs::write(&path, vec![2u8; len]).unwrap();
        let p2 = index();
        let g2 = g1.next(p2.clone(), record(&p2, 2), t0);
        let old = block(1, len);
        assert!(g2.object(&old).is_some() && !g2.is_current(&old));
        assert!(
            g2.is_current(&block(2, len)) && g2.interested(&g2.channel.object_address(&old).group)
        );
        assert_eq!(
            (g2.counts(), g2.new_since(Some(&g1))),
            (
                (2, 2),
                (2, len as u64 + p2.objects[&p2.root.hash].len as u64)
            )
        );
        // The old block changed on disk: it is not sent, and it is no current block.
        assert!(matches!(
            g2.load(&old),
            Err(LoadError::Index(IndexError::Changed { .. }))
        ));
        std::fs::write(&path, vec![3u8; len]).unwrap();
        let p3 = index();
        let g3 = g2.next(p3.clone(), record(&p3, 3), t0 + GRACE / 2);
        assert_eq!(g3.counts(), (2, 4), "generations 1 and 2 kept");
        let p4 = index();
        let g4 = g3.next(
            p4.clone(),
            record(&p4, 4),
            t0 + GRACE + Duration::from_secs(1),
        );
        assert!(
            g4.object(&old).is_none(),
            "generation 1 was replaced more than GRACE ago"
        );
        assert!(g4.object(&block(2, len)).is_some() && g4.object(&block(3, len)).is_some());
    }
}
