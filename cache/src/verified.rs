//! Bytes whose BLAKE3 hash has been checked.
//!
//! Invariant: for every [`Verified`] value, `blake3::hash(bytes) == hash`. The only ways to build
//! one are [`Verified::new`], which hashes and compares against the expected name, and
//! [`Verified::hash_of`], which hashes and takes the result as the name. There is no unchecked
//! constructor, so code that holds a `Verified` never needs to check it again.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use blake3::Hash;

/// Bytes whose BLAKE3 equals [`Verified::hash`]. Cloning is cheap (the bytes are shared).
#[derive(Clone, PartialEq, Eq)]
pub struct Verified {
    hash: Hash,
    bytes: Arc<[u8]>,
}

/// The bytes offered for an object did not hash to its name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("object {expected} hashed to {actual}")]
pub struct HashMismatch {
    /// The name the bytes were supposed to have.
    pub expected: Hash,
    /// What the bytes actually hash to.
    pub actual: Hash,
}

impl Verified {
    /// Checks that `bytes` hash to `expected`.
    pub fn new(expected: &Hash, bytes: impl Into<Arc<[u8]>>) -> Result<Verified, HashMismatch> {
        let verified = Verified::hash_of(bytes);
        if verified.hash == *expected {
            Ok(verified)
        } else {
            Err(HashMismatch {
                expected: *expected,
                actual: verified.hash,
            })
        }
    }

    /// Hashes `bytes`; the result is their name.
    pub fn hash_of(bytes: impl Into<Arc<[u8]>>) -> Verified {
        let bytes = bytes.into();
        let hash = blake3::hash(&bytes);
        Verified { hash, bytes }
    }

    /// The BLAKE3 hash of the bytes, i.e. the object's name.
    pub fn hash(&self) -> &Hash {
        &self.hash
    }

    /// The verified bytes.
    pub fn bytes(&self) -> &Arc<[u8]> {
        &self.bytes
    }

    /// Length of the bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// True for the empty object.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

impl Deref for Verified {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

impl AsRef<[u8]> for Verified {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl fmt::Debug for Verified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verified")
            .field("hash", &self.hash.to_hex())
            .field("len", &self.bytes.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hash_of_names_the_bytes() {
        let v = Verified::hash_of(&b"hello"[..]);
        assert_eq!(*v.hash(), blake3::hash(b"hello"));
        assert_eq!(&*v, b"hello");
        assert_eq!(v.as_ref(), b"hello");
        assert_eq!(v.len(), 5);
        assert!(!v.is_empty());
        assert_eq!(&v.bytes()[..], b"hello");
    }

    #[test]
    fn new_rejects_wrong_bytes() {
        let expected = blake3::hash(b"right");
        let err = Verified::new(&expected, &b"wrong"[..]).unwrap_err();
        assert_eq!(err.expected, expected);
        assert_eq!(err.actual, blake3::hash(b"wrong"));
        assert!(err.to_string().contains(&expected.to_hex().to_string()));
    }

    #[test]
    fn new_accepts_right_bytes() {
        let expected = blake3::hash(b"right");
        let v = Verified::new(&expected, b"right".to_vec()).unwrap();
        assert_eq!(*v.hash(), expected);
    }

    #[test]
    fn empty_object_is_valid() {
        let v = Verified::hash_of(Vec::new());
        assert!(v.is_empty());
        assert!(format!("{v:?}").contains("len: 0"));
    }

    proptest! {
        #[test]
        fn new_accepts_exactly_matching_bytes(a: Vec<u8>, b: Vec<u8>) {
            let expected = blake3::hash(&a);
            prop_assert_eq!(Verified::new(&expected, b.clone()).is_ok(), a == b);
        }
    }
}
