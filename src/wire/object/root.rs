//! The root record: the one mutable object of a channel, sent on the channel's own group.
//!
//! Encoding (version 2): `"LCFR" 2 | flags u8 | block_log2 u8 | channel_id [32] |
//! generation u64 | publish_time_ns u64 | root_hash [32] | root_len u32`, then, when flag bit 1
//! is set, `signed_at_ns u64 | expires_ns u64 | public_key [32] | ed25519 signature [64]`, the
//! signature over every byte before it. Flag bit 0 marks a single-file channel: the root
//! directory then holds exactly one file. Times are Unix nanoseconds.
//!
//! Version 2 added the signing time and expiry (TUF's freeze attack: a captured signed record
//! would otherwise authenticate for ever). The publisher re-signs the current generation long
//! before it expires, so a fresh signature proves the publisher still stands by this root; a
//! receiver refuses an expired record and one signed longer ago than its `--max-age`.
//!
//! A receiver trusts a root record only after checking the channel id, and then (by the
//! caller's policy, `fetch::trust`) the signature and its times, a pinned root hash, the
//! publisher remembered on first use, and that the generation never decreases.

use super::codec::{Reader, Writer};
use super::{BlockSize, ObjectError, ObjectRef};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

const MAGIC: &[u8; 4] = b"LCFR";
const VERSION: u8 = 2;
const FLAG_SINGLE_FILE: u8 = 1;
const FLAG_SIGNED: u8 = 2;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    /// When the publisher signed, Unix ns.
    pub signed_at_ns: u64,
    /// After this (Unix ns) the record must be refused.
    pub expires_ns: u64,
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
    fn encode_unsigned(&self, signed: Option<(u64, u64, &[u8; 32])>) -> Writer {
        let mut w = Writer::header(MAGIC, VERSION);
        let mut flags = 0;
        if self.single_file {
            flags |= FLAG_SINGLE_FILE;
        }
        if signed.is_some() {
            flags |= FLAG_SIGNED;
        }
        w.u8(flags);
        w.u8(self.block_size.log2());
        w.bytes(&self.channel_id);
        w.u64(self.generation);
        w.u64(self.publish_time_ns);
        w.hash(self.root.hash.as_bytes());
        w.u32(self.root.len);
        if let Some((signed_at, expires, key)) = signed {
            w.u64(signed_at);
            w.u64(expires);
            w.bytes(key);
        }
        w
    }

    fn signed_part(&self) -> Writer {
        self.encode_unsigned(
            self.signature
                .as_ref()
                .map(|s| (s.signed_at_ns, s.expires_ns, &s.public_key)),
        )
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = self.signed_part();
        if let Some(s) = &self.signature {
            w.bytes(&s.signature);
        }
        w.buf
    }

    /// Signs the record with a publisher key at `now_ns`, valid for `validity_ns`, replacing
    /// any earlier signature.
    pub fn sign(&mut self, key: &SigningKey, now_ns: u64, validity_ns: u64) {
        let public_key = key.verifying_key().to_bytes();
        let expires_ns = now_ns.saturating_add(validity_ns);
        let w = self.encode_unsigned(Some((now_ns, expires_ns, &public_key)));
        let signature = key.sign(&w.buf).to_bytes();
        self.signature = Some(Signature {
            signed_at_ns: now_ns,
            expires_ns,
            public_key,
            signature,
        });
    }

    /// Whether the record carries a valid signature by `publisher`. Says nothing of its
    /// times: see [`Signature::expires_ns`].
    pub fn verify(&self, publisher: &VerifyingKey) -> bool {
        match &self.signature {
            Some(s) if s.public_key == publisher.to_bytes() => self.verify_self_signed(),
            _ => false,
        }
    }

    /// Whether the record is signed, and correctly, by the key it names (which is not yet a
    /// reason to trust that key).
    pub fn verify_self_signed(&self) -> bool {
        let Some(s) = &self.signature else {
            return false;
        };
        let Ok(key) = VerifyingKey::from_bytes(&s.public_key) else {
            return false;
        };
        let sig = ed25519_dalek::Signature::from_bytes(&s.signature);
        key.verify_strict(&self.signed_part().buf, &sig).is_ok()
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
            hash: r.object_hash()?,
            len: r.u32()?,
        };
        let signature = if flags & FLAG_SIGNED != 0 {
            Some(Signature {
                signed_at_ns: r.u64()?,
                expires_ns: r.u64()?,
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
    use crate::wire::object::ObjectHash;
    use proptest::prelude::*;

    fn sample() -> RootRecord {
        RootRecord {
            channel_id: [7; 32],
            generation: 3,
            publish_time_ns: 1_700_000_000_000_000_000,
            root: ObjectRef {
                hash: ObjectHash::of(b"r"),
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
        s.sign(&key, 1_700_000_000_000_000_000, 3_600_000_000_000);
        let d = RootRecord::decode(&s.encode()).unwrap();
        assert_eq!(d, s);
        assert!(d.verify_self_signed());
        assert!(d.verify(&key.verifying_key()));
        assert!(!r.verify(&key.verifying_key()));
        let other = SigningKey::from_bytes(&[8; 32]);
        assert!(!d.verify(&other.verifying_key()));
    }

    #[test]
    fn tampering_breaks_the_signature() {
        let key = SigningKey::from_bytes(&[9; 32]);
        let mut s = sample();
        s.sign(&key, 1_700_000_000_000_000_000, 3_600_000_000_000);
        s.generation += 1;
        assert!(!s.verify(&key.verifying_key()));
        assert!(!s.verify_self_signed());
    }

    #[test]
    fn the_expiry_is_signed_too() {
        let key = SigningKey::from_bytes(&[9; 32]);
        let mut s = sample();
        s.sign(&key, 1_700_000_000_000_000_000, 3_600_000_000_000);
        let mut later = s.clone();
        later.signature.as_mut().unwrap().expires_ns += 1;
        assert!(!later.verify(&key.verifying_key()));
        let mut fresher = s.clone();
        fresher.signature.as_mut().unwrap().signed_at_ns += 1;
        assert!(!fresher.verify_self_signed());
    }

    #[test]
    fn bit_flips_of_a_signed_record_never_verify() {
        let key = SigningKey::from_bytes(&[9; 32]);
        let mut s = sample();
        s.sign(&key, 1_700_000_000_000_000_000, 3_600_000_000_000);
        let enc = s.encode();
        for bit in 0..enc.len() * 8 {
            let mut b = enc.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            if let Ok(d) = RootRecord::decode(&b) {
                assert!(!d.verify(&key.verifying_key()), "bit {bit}");
            }
        }
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
