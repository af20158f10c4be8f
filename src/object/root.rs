//! The root record: the one mutable object of a channel, sent on the channel's own group.
//!
//! Encoding (version 1): `"LCFR" 1 | flags u8 | block_log2 u8 | channel_id [32] |
//! generation u64 | publish_time_ns u64 | root_hash [32] | root_len u32`, then, when flag bit 1
//! is set, `public_key [32] | ed25519 signature [64]` over every byte before the signature.
//! Flag bit 0 marks a single-file channel: the root directory then holds exactly one file.
//!
//! A receiver trusts a root record only after checking the channel id, and then (by the
//! caller's policy) the signature, a pinned root hash, or that the generation never decreases.

use super::codec::{Reader, Writer};
use super::{BlockSize, ObjectError, ObjectRef};
use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};

const MAGIC: &[u8; 4] = b"LCFR";
const VERSION: u8 = 1;
const FLAG_SINGLE_FILE: u8 = 1;
const FLAG_SIGNED: u8 = 2;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    pub public_key: [u8; 32],
    pub signature: [u8; 64],
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootRecord {
    pub channel_id: [u8; 32],
    pub generation: u64,
    /// Unix time of publication in nanoseconds.
    pub publish_time_ns: u64,
    pub root: ObjectRef,
    pub block_size: BlockSize,
    pub single_file: bool,
    pub signature: Option<Signature>,
}

impl RootRecord {
    fn encode_unsigned(&self, signed: bool) -> Writer {
        let mut w = Writer::header(MAGIC, VERSION);
        let mut flags = 0;
        if self.single_file {
            flags |= FLAG_SINGLE_FILE;
        }
        if signed {
            flags |= FLAG_SIGNED;
        }
        w.u8(flags);
        w.u8(self.block_size.log2());
        w.bytes(&self.channel_id);
        w.u64(self.generation);
        w.u64(self.publish_time_ns);
        w.hash(&self.root.hash);
        w.u32(self.root.len);
        w
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = self.encode_unsigned(self.signature.is_some());
        if let Some(s) = &self.signature {
            w.bytes(&s.public_key);
            w.bytes(&s.signature);
        }
        w.buf
    }

    /// Signs the record with a publisher key, replacing any earlier signature.
    pub fn sign(&mut self, key: &SigningKey) {
        let public_key = key.verifying_key().to_bytes();
        let mut w = self.encode_unsigned(true);
        w.bytes(&public_key);
        let signature = key.sign(&w.buf).to_bytes();
        self.signature = Some(Signature {
            public_key,
            signature,
        });
    }

    /// Whether the record carries a valid signature by `publisher`.
    pub fn verify(&self, publisher: &VerifyingKey) -> bool {
        let Some(s) = &self.signature else {
            return false;
        };
        if s.public_key != publisher.to_bytes() {
            return false;
        }
        let mut w = self.encode_unsigned(true);
        w.bytes(&s.public_key);
        let sig = ed25519_dalek::Signature::from_bytes(&s.signature);
        publisher.verify(&w.buf, &sig).is_ok()
    }

    pub fn decode(buf: &[u8]) -> Result<RootRecord, ObjectError> {
        let mut r = Reader::new(buf);
        r.header(MAGIC, "root record", VERSION)?;
        let flags = r.u8()?;
        if flags & !(FLAG_SINGLE_FILE | FLAG_SIGNED) != 0 {
            return Err(ObjectError::Invalid("unknown root record flags"));
        }
        let block_size = BlockSize::from_log2(r.u8()?)?;
        let channel_id = r.array()?;
        let generation = r.u64()?;
        let publish_time_ns = r.u64()?;
        let root = ObjectRef {
            hash: r.hash()?,
            len: r.u32()?,
        };
        let signature = if flags & FLAG_SIGNED != 0 {
            Some(Signature {
                public_key: r.array()?,
                signature: r.array()?,
            })
        } else {
            None
        };
        r.finish()?;
        Ok(RootRecord {
            channel_id,
            generation,
            publish_time_ns,
            root,
            block_size,
            single_file: flags & FLAG_SINGLE_FILE != 0,
            signature,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> RootRecord {
        RootRecord {
            channel_id: [7; 32],
            generation: 3,
            publish_time_ns: 1_700_000_000_000_000_000,
            root: ObjectRef {
                hash: blake3::hash(b"r"),
                len: 99,
            },
            block_size: BlockSize::DEFAULT,
            single_file: false,
            signature: None,
        }
    }

    #[test]
    fn round_trip_unsigned_and_signed() {
        let r = sample();
        assert_eq!(RootRecord::decode(&r.encode()).unwrap(), r);
        let key = SigningKey::from_bytes(&[9; 32]);
        let mut s = sample();
        s.sign(&key);
        let d = RootRecord::decode(&s.encode()).unwrap();
        assert!(d.verify(&key.verifying_key()));
        assert!(!r.verify(&key.verifying_key()));
        let other = SigningKey::from_bytes(&[8; 32]);
        assert!(!d.verify(&other.verifying_key()));
    }

    #[test]
    fn tampering_breaks_the_signature() {
        let key = SigningKey::from_bytes(&[9; 32]);
        let mut s = sample();
        s.sign(&key);
        s.generation += 1;
        assert!(!s.verify(&key.verifying_key()));
    }

    #[test]
    fn truncation_is_an_error() {
        let enc = sample().encode();
        for n in 0..enc.len() {
            assert!(RootRecord::decode(&enc[..n]).is_err());
        }
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = RootRecord::decode(&bytes);
        }
    }
}
