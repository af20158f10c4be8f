//! The RaptorQ encoders the sender keeps at hand, least recently used first out, bounded in
//! bytes (sans-IO: the shell builds encoders, this only keeps them).
//!
//! An encoder costs a disk read, a BLAKE3 pass and a copy of its object to build, and an
//! object is sent in several rounds (and to receivers that join late), so encoders are kept
//! between rounds; the bound keeps a tree of millions of blocks from keeping them all.
//!
//! Invariant: [`Encoders::bytes`] is the sum of [`footprint`]s of the encoders held, and it
//! is at most the bound, except when the only encoder held is larger than the bound by itself
//! (the one about to be sent must stay at hand).

use std::sync::Arc;

use crate::wire::object::ObjectHash;
use lru::LruCache;

use crate::wire::fec::ObjectEncoder;

/// The memory an encoder may hold.
pub fn footprint(e: &ObjectEncoder) -> usize {
    // The padded source plus, once repair symbols were asked for, RaptorQ's copy of the
    // source symbols and its intermediate symbols, each about as large again (measured with
    // heaptrack): count all three, as an encoder may need them at any time.
    3 * e.source_symbols() as usize * e.symbol_size()
}

pub struct Encoders {
    lru: LruCache<ObjectHash, Arc<ObjectEncoder>>,
    bytes: usize,
    max: usize,
}

impl Encoders {
    /// Holds encoders of at most `max` bytes in all.
    pub fn new(max: usize) -> Encoders {
        Encoders {
            lru: LruCache::unbounded(),
            bytes: 0,
            max,
        }
    }

    /// The encoder of `hash`, now the most recently used.
    pub fn get(&mut self, hash: &ObjectHash) -> Option<Arc<ObjectEncoder>> {
        self.lru.get(hash).cloned()
    }

    pub fn contains(&self, hash: &ObjectHash) -> bool {
        self.lru.contains(hash)
    }

    /// Keeps `encoder` as the most recently used, dropping the least recently used others
    /// until the bound holds again.
    pub fn put(&mut self, hash: ObjectHash, encoder: Arc<ObjectEncoder>) {
        self.bytes += footprint(&encoder);
        if let Some(old) = self.lru.put(hash, encoder) {
            self.bytes -= footprint(&old);
        }
        while self.bytes > self.max && self.lru.len() > 1 {
            if let Some((_, old)) = self.lru.pop_lru() {
                self.bytes -= footprint(&old);
            }
        }
    }

    pub fn remove(&mut self, hash: &ObjectHash) {
        if let Some(old) = self.lru.pop(hash) {
            self.bytes -= footprint(&old);
        }
    }

    /// Bytes held, by [`footprint`].
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.lru.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lru.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoder(len: usize) -> Arc<ObjectEncoder> {
        Arc::new(ObjectEncoder::new(&vec![7u8; len], 1000).unwrap())
    }

    fn h(i: u32) -> ObjectHash {
        ObjectHash::of(&i.to_le_bytes())
    }

    #[test]
    fn the_bound_holds_and_the_least_recently_used_go_first() {
        let mut e = Encoders::new(10 * footprint(&encoder(4000)));
        for i in 0..10 {
            e.put(h(i), encoder(4000));
        }
        assert_eq!(e.len(), 10);
        assert!(e.get(&h(0)).is_some(), "0 is now the most recent");
        e.put(h(10), encoder(4000));
        assert!(e.contains(&h(0)) && !e.contains(&h(1)) && e.contains(&h(10)));
        assert!(e.bytes() <= 10 * footprint(&encoder(4000)));
    }

    #[test]
    fn one_encoder_larger_than_the_bound_is_kept_alone() {
        let mut e = Encoders::new(100);
        e.put(h(1), encoder(4000));
        e.put(h(2), encoder(5000));
        assert_eq!((e.len(), e.contains(&h(2))), (1, true));
        assert_eq!(e.bytes(), footprint(&encoder(5000)));
    }

    #[test]
    fn putting_one_hash_twice_counts_it_once() {
        let mut e = Encoders::new(1 << 20);
        e.put(h(1), encoder(4000));
        e.put(h(1), encoder(4000));
        assert_eq!(e.bytes(), footprint(&encoder(4000)));
        e.remove(&h(1));
        assert!(e.is_empty() && e.bytes() == 0);
    }
}
