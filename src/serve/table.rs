//! What one generation publishes: the object table the sender and the MLD listener consult.
//!
//! The table maps every object's group to its hash and every hash to where its bytes are. It
//! is immutable; a new generation builds a new table and swaps it in whole.

use std::collections::HashMap;
use std::net::Ipv6Addr;
use std::path::PathBuf;
use std::sync::Arc;

use lcfs_cache::Hash;

use super::index::{read_block, IndexError, Published, Source, Tree};
use crate::channel::{Address, Channel};
use crate::object::RootRecord;

pub struct Table {
    pub channel: Channel,
    pub root_record: RootRecord,
    /// The encoded (and possibly signed) root record, as sent.
    pub record: Vec<u8>,
    pub root: Address,
    /// Where the beacon goes.
    pub air: Address,
    pub objects: HashMap<Hash, (u32, Source)>,
    /// The tree that file sources are read from again, by descriptor.
    pub tree: Arc<Tree>,
    pub by_group: HashMap<Ipv6Addr, Hash>,
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
    pub fn new(channel: Channel, published: Published, root_record: RootRecord) -> Table {
        let by_group = published
            .objects
            .keys()
            .map(|h| (channel.object_address(h).group, *h))
            .collect();
        Table {
            record: root_record.encode(),
            root: channel.root_address(),
            air: channel.air_address(),
            root_record,
            objects: published.objects,
            tree: published.tree,
            by_group,
            channel,
        }
    }

    /// Whether `group` carries something this table publishes (the MLD listener's filter).
    pub fn interested(&self, group: &Ipv6Addr) -> bool {
        *group == self.root.group || *group == self.air.group || self.by_group.contains_key(group)
    }

    /// The bytes of object `hash`, re-read and re-verified when they live in a file.
    pub fn load(&self, hash: &Hash) -> Result<Arc<[u8]>, LoadError> {
        match self.objects.get(hash) {
            None => Err(LoadError::Unknown),
            Some((_, Source::Memory(bytes))) => Ok(bytes.clone()),
            Some((_, source)) => Ok(read_block(&self.tree, source, hash)?),
        }
    }
}
