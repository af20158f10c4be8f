//! The in-memory LRU of hot objects, bounded in bytes.
//!
//! Invariants: `bytes` is the sum of the lengths of the objects held, and never exceeds
//! `capacity` after a call returns. An object larger than the capacity is not kept. Everything
//! held is [`Verified`], so a hit needs no hashing.

use blake3::Hash;
use lru::LruCache;

use crate::Verified;

/// Hot objects, least recently used evicted first once `capacity` bytes are exceeded.
pub(crate) struct MemLru {
    objects: LruCache<Hash, Verified>,
    bytes: usize,
    capacity: usize,
}

impl MemLru {
    /// An empty LRU holding at most `capacity` bytes of objects.
    pub(crate) fn new(capacity: usize) -> MemLru {
        MemLru {
            objects: LruCache::unbounded(),
            bytes: 0,
            capacity,
        }
    }

    /// The object, marked as most recently used.
    pub(crate) fn get(&mut self, hash: &Hash) -> Option<Verified> {
        self.objects.get(hash).cloned()
    }

    /// Whether the object is held, without marking it used.
    pub(crate) fn contains(&self, hash: &Hash) -> bool {
        self.objects.contains(hash)
    }

    /// Keeps `obj` as most recently used, evicting older objects to stay within capacity.
    pub(crate) fn put(&mut self, obj: &Verified) {
        self.remove(obj.hash());
        if obj.len() > self.capacity {
            return;
        }
        self.bytes += obj.len();
        self.objects.put(*obj.hash(), obj.clone());
        while self.bytes > self.capacity {
            match self.objects.pop_lru() {
                Some((_, old)) => self.bytes -= old.len(),
                None => break,
            }
        }
    }

    /// Forgets the object, if held.
    pub(crate) fn remove(&mut self, hash: &Hash) {
        if let Some(old) = self.objects.pop(hash) {
            self.bytes -= old.len();
        }
    }

    /// Bytes of objects held.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Number of objects held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.objects.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(tag: u8, len: usize) -> Verified {
        Verified::hash_of(vec![tag; len])
    }

    #[test]
    fn bounded_in_bytes_not_entries() {
        let mut m = MemLru::new(1000);
        for i in 0..10 {
            m.put(&obj(i, 300));
            assert!(m.bytes() <= 1000);
        }
        assert_eq!(m.len(), 3);
        assert_eq!(m.bytes(), 900);
        for i in 0..100 {
            m.put(&obj(i, 1));
        }
        assert_eq!(m.bytes(), 1000);
        assert_eq!(m.len(), 103);
        m.put(&obj(200, 1));
        assert_eq!(m.len(), 103, "one 300-byte object made room for 1 byte");
        assert_eq!(m.bytes(), 701);
    }

    #[test]
    fn evicts_least_recently_used() {
        let mut m = MemLru::new(300);
        let (a, b, c, d) = (obj(1, 100), obj(2, 100), obj(3, 100), obj(4, 100));
        m.put(&a);
        m.put(&b);
        m.put(&c);
        assert!(m.get(a.hash()).is_some());
        m.put(&d);
        assert!(m.get(b.hash()).is_none());
        assert!(m.get(a.hash()).is_some());
        assert!(m.get(c.hash()).is_some());
        assert!(m.get(d.hash()).is_some());
    }

    #[test]
    fn too_big_objects_are_not_kept() {
        let mut m = MemLru::new(100);
        let small = obj(1, 50);
        m.put(&small);
        m.put(&obj(2, 101));
        assert_eq!(m.len(), 1);
        assert!(m.get(small.hash()).is_some());
        let mut off = MemLru::new(0);
        off.put(&obj(3, 1));
        assert_eq!(off.len(), 0);
        off.put(&obj(4, 0));
        assert_eq!(off.bytes(), 0);
    }

    #[test]
    fn put_twice_and_remove_keep_the_count() {
        let mut m = MemLru::new(1000);
        let a = obj(1, 100);
        m.put(&a);
        m.put(&a);
        assert_eq!(m.bytes(), 100);
        m.remove(a.hash());
        m.remove(a.hash());
        assert_eq!(m.bytes(), 0);
        assert!(m.get(a.hash()).is_none());
    }
}
