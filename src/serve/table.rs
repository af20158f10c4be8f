//! What one generation publishes: the object table the sender and the MLD listener consult.
//!
//! The table maps every object's group to its hash and every hash to where its bytes are. It
//! is immutable but for the root record's signature, which is renewed while the generation
//! is served; a new generation builds a new table and swaps it in whole.

use std::collections::HashMap;
use std::net::Ipv6Addr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use ed25519_dalek::SigningKey;

use lcfs_cache::Hash;

use super::index::{read_block, IndexError, Published, Source, Tree};
use crate::channel::{Address, Channel};
use crate::object::RootRecord;

pub struct Table {
    pub channel: Channel,
    /// The root record as last signed (or unsigned), and its encoding as sent. Re-signing
    /// replaces both; everything else in a table is immutable.
    signed: RwLock<(RootRecord, Arc<[u8]>)>,
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
            signed: RwLock::new((root_record.clone(), root_record.encode().into())),
            root: channel.root_address(),
            air: channel.air_address(),
            objects: published.objects,
            tree: published.tree,
            by_group,
            channel,
        }
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
