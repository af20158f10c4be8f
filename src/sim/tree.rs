//! What the simulated server publishes: a synthetic tree written from a seed into a directory
//! the caller owns, indexed by the real indexer ([`index_path`]) into a real [`Table`].
//!
//! File contents come from BLAKE3's extendable output keyed by the seed and the file's
//! number, so two files never share blocks by accident and a seed always gives the same tree.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::Path;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::serve::index::{index_path, IndexConfig, IndexError, Source};
use crate::serve::table::Table;
use crate::wire::channel::Channel;
use crate::wire::object::{ObjectHash, RootRecord};

/// The shape of a synthetic tree.
#[derive(Clone, Copy, Debug)]
pub enum Shape {
    /// One file of this many bytes (published as a file, like `lcfs serve FILE`).
    File(u64),
    /// `files` files spread over `dirs` directories (two levels deep), each of a size drawn
    /// from `min..=max` bytes.
    Tree {
        files: usize,
        dirs: usize,
        min: u64,
        max: u64,
    },
}

/// What the server publishes, and what a receiver of all of it must end with.
pub struct Published {
    pub table: Arc<Table>,
    /// Every object of the generation, with its length: the data a receiver of the whole
    /// tree verifies.
    pub objects: HashMap<ObjectHash, u32>,
}

impl Published {
    /// Bytes of all objects (directories, indexes and blocks): the data one receiver needs.
    pub fn data_bytes(&self) -> u64 {
        self.objects.values().map(|l| u64::from(*l)).sum()
    }
}

/// Writes the tree of `shape` and `seed` under `dir` (which must exist and be empty), and
/// publishes it as generation 1 of `channel`.
pub fn publish(
    dir: &Path,
    shape: Shape,
    seed: u64,
    channel: &Channel,
) -> Result<Published, IndexError> {
    let path = write(dir, shape, seed).map_err(IndexError::io(dir))?;
    let published = index_path(&path, &IndexConfig::default())?;
    let objects = published
        .objects
        .iter()
        // Bundles are how objects travel, not objects a receiver keeps.
        .filter(|(_, o)| !matches!(o.source, Source::Bundle(_)))
        .map(|(h, o)| (*h, o.len))
        .collect();
    let record = RootRecord {
        channel_id: *channel.id(),
        generation: 1,
        publish_time_ns: 0,
        root: published.root,
        block_size: published.block_size,
        single_file: published.single_file,
        signature: None,
    };
    let table = Arc::new(Table::new(channel.clone(), published, record));
    Ok(Published { table, objects })
}

/// Writes the files; returns the path to publish.
fn write(dir: &Path, shape: Shape, seed: u64) -> io::Result<std::path::PathBuf> {
    match shape {
        Shape::File(size) => {
            let path = dir.join("file.bin");
            fs::write(&path, contents(seed, 0, size))?;
            Ok(path)
        }
        Shape::Tree {
            files,
            dirs,
            min,
            max,
        } => {
            let root = dir.join("tree");
            let mut rng = StdRng::seed_from_u64(seed);
            let dirs = dirs.max(1);
            for n in 0..files {
                let d = rng.random_range(0..dirs);
                let sub = root
                    .join(format!("d{:02}", d % 16))
                    .join(format!("e{d:04}"));
                fs::create_dir_all(&sub)?;
                let size = rng.random_range(min..=max.max(min));
                fs::write(sub.join(format!("f{n:05}")), contents(seed, n as u64, size))?;
            }
            fs::create_dir_all(&root)?;
            Ok(root)
        }
    }
}

/// `size` bytes that only this seed and file number give.
fn contents(seed: u64, n: u64, size: u64) -> Vec<u8> {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&n.to_le_bytes());
    let mut out = vec![0u8; size as usize];
    blake3::Hasher::new_keyed(&key)
        .finalize_xof()
        .fill(&mut out);
    out
}
