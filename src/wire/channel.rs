//! Channels: names, keys and multicast addressing (DESIGN.md section 2 and 7).
//!
//! A channel is named by a string. Everything a receiver needs to find an object on the wire is
//! derived from that name (and from the master key of an encrypted channel) with BLAKE3
//! `derive_key`, each use with its own context string, so that:
//! - every object has its own group in `ff1e::/16` plus 112 bits of a keyed hash of the object
//!   hash, and an opaque 16-byte tag that receivers demultiplex by;
//! - on an encrypted channel outsiders can map neither groups nor tags to content, because the
//!   addressing key depends on the master key;
//! - the root record has its own group and tag, derived from the channel id alone;
//! - a receiver tells the publisher things by joining groups on which nothing is ever sent
//!   ([`Report`]): how much it loses, one group for each of [`LOSS_LEVELS`] (see
//!   `crate::fetch::loss`), and whether its blocks may wait for other receivers' joins
//!   (`crate::serve::sched`).

use std::fmt;
use std::net::Ipv6Addr;

use crate::wire::object::ObjectHash;

/// The UDP port lcfs uses unless told otherwise.
pub const DEFAULT_PORT: u16 = 4242;

const CTX_ID: &str = "lcfs 2026-11 channel id v1";
const CTX_ADDR: &str = "lcfs 2026-11 group addressing v1";
const CTX_SEAL: &str = "lcfs 2026-11 packet sealing v1";
const CTX_NONCE: &str = "lcfs 2026-11 packet nonces v1";

/// A 32-byte secret shared by publisher and receivers of an encrypted channel; wiped from
/// memory when dropped.
#[derive(Clone, zeroize::ZeroizeOnDrop)]
pub struct MasterKey(pub(crate) [u8; 32]);

impl MasterKey {
    pub fn from_bytes(bytes: [u8; 32]) -> MasterKey {
        MasterKey(bytes)
    }

    /// The key's bytes, for handing it to a process of our own (`mount --daemon`).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

/// The opaque per-object label carried in every packet's clear header.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(pub [u8; 16]);

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tag({})", hex::encode(&self.0[..6]))
    }
}

/// The losses a receiver can report, in per mille: finer where a point of loss moves a first
/// round by a symbol or more, and no further than the most the sender ever sizes for
/// (`SchedConfig::max_loss`, 30%).
pub const LOSS_LEVELS: [u16; 21] = [
    0, 5, 10, 15, 20, 30, 40, 50, 60, 80, 100, 120, 140, 160, 180, 200, 220, 240, 260, 280, 300,
];

/// What a receiver tells the publisher by joining a group ([`Channel::report_address`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Report {
    /// It loses about `LOSS_LEVELS[level]` per mille of the symbols sent to it.
    Loss(usize),
    /// It fetches ahead of its readers (copy, prefetch, readahead): the blocks it asks for
    /// may wait a little for other receivers' joins, so that one round serves them all.
    Bulk,
    /// A reader waits for a block now: no block should wait for anyone.
    Hurry,
}

/// Where an object travels: its multicast group and the tag its packets carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Address {
    pub group: Ipv6Addr,
    pub tag: Tag,
}

/// Keys for sealing packets of an encrypted channel; wiped from memory when dropped.
#[derive(Clone, zeroize::ZeroizeOnDrop)]
pub struct SealKeys {
    pub(crate) cipher: [u8; 32],
    pub(crate) nonce: [u8; 32],
}

/// A channel's identity and every key derived from it.
#[derive(Clone)]
pub struct Channel {
    name: String,
    id: [u8; 32],
    addr_key: [u8; 32],
    seal: Option<SealKeys>,
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel")
            .field("name", &self.name)
            .field("id", &hex::encode(&self.id[..8]))
            .field("sealed", &self.seal.is_some())
            .finish()
    }
}

impl Channel {
    /// Derives a channel from its name and, for an encrypted channel, its master key.
    pub fn new(name: &str, key: Option<&MasterKey>) -> Channel {
        let mut material = name.as_bytes().to_vec();
        if let Some(key) = key {
            // A separator that cannot occur inside a UTF-8 name keeps (name, key) unambiguous.
            material.push(0xff);
            material.extend_from_slice(&key.0);
        }
        let id = blake3::derive_key(CTX_ID, &material);
        let addr_key = blake3::derive_key(CTX_ADDR, &id);
        let seal = key.map(|k| SealKeys {
            cipher: blake3::derive_key(CTX_SEAL, &k.0),
            nonce: blake3::derive_key(CTX_NONCE, &k.0),
        });
        Channel {
            name: name.to_owned(),
            id,
            addr_key,
            seal,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn id(&self) -> &[u8; 32] {
        &self.id
    }

    pub fn seal(&self) -> Option<&SealKeys> {
        self.seal.as_ref()
    }

    /// The group and tag of the channel's root record.
    pub fn root_address(&self) -> Address {
        self.address(b"root", &[0; 32])
    }

    /// The group and tag of the channel's "on air" beacon: which objects the server is about
    /// to send (see [`crate::wire::packet::Body::Air`]).
    pub fn air_address(&self) -> Address {
        self.address(b"air!", &[0; 32])
    }

    /// The group and tag of the object named `hash`.
    pub fn object_address(&self, hash: &ObjectHash) -> Address {
        self.address(b"obj!", hash.as_bytes())
    }

    /// The group a receiver joins to report that it loses about `LOSS_LEVELS[level]` per
    /// mille of the symbols sent to it; None for a level out of range.
    pub fn loss_address(&self, level: usize) -> Option<Address> {
        self.report_address(Report::Loss(level))
    }

    /// The group a receiver joins to tell the publisher `report`; None for a loss level out
    /// of range.
    pub fn report_address(&self, report: Report) -> Option<Address> {
        let mut name = [0; 32];
        let domain = match report {
            Report::Loss(level) => {
                name[0] = u8::try_from(level)
                    .ok()
                    .filter(|_| level < LOSS_LEVELS.len())?;
                b"loss"
            }
            Report::Bulk => b"bulk",
            // Every domain is four bytes, as `address` hashes them.
            Report::Hurry => b"hury",
        };
        Some(self.address(domain, &name))
    }

    /// Every report and its group, as the publisher listens for them.
    pub fn reports(&self) -> impl Iterator<Item = (Report, Address)> + '_ {
        (0..LOSS_LEVELS.len())
            .map(Report::Loss)
            .chain([Report::Bulk, Report::Hurry])
            .filter_map(|r| Some((r, self.report_address(r)?)))
    }

    fn address(&self, domain: &[u8; 4], name: &[u8; 32]) -> Address {
        let mut h = blake3::Hasher::new_keyed(&self.addr_key);
        h.update(domain);
        h.update(name);
        let out = h.finalize();
        let out = out.as_bytes();
        let mut group = [0u8; 16];
        group[0] = 0xff;
        group[1] = 0x1e;
        group[2..].copy_from_slice(&out[..14]);
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&out[14..30]);
        Address {
            group: Ipv6Addr::from(group),
            tag: Tag(tag),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_transient_global_scope_and_distinct() {
        let ch = Channel::new("photos", None);
        let a = ch.object_address(&ObjectHash::of(b"a"));
        let b = ch.object_address(&ObjectHash::of(b"b"));
        assert_eq!(a.group.segments()[0], 0xff1e);
        assert_ne!(a.group, b.group);
        assert_ne!(a.tag, b.tag);
        assert_ne!(ch.root_address().group, a.group);
        let reports: std::collections::HashSet<_> = ch.reports().map(|(_, a)| a.group).collect();
        assert_eq!(reports.len(), LOSS_LEVELS.len() + 2);
        assert!(!reports.contains(&a.group) && !reports.contains(&ch.root_address().group));
        assert!(!reports.contains(&ch.air_address().group));
        assert_eq!(ch.loss_address(LOSS_LEVELS.len()), None);
        assert_eq!(ch.loss_address(3), ch.report_address(Report::Loss(3)));
    }

    #[test]
    fn key_changes_every_address() {
        let plain = Channel::new("photos", None);
        let k1 = Channel::new("photos", Some(&MasterKey([1; 32])));
        let k2 = Channel::new("photos", Some(&MasterKey([2; 32])));
        let h = ObjectHash::of(b"x");
        assert_ne!(plain.id(), k1.id());
        assert_ne!(k1.object_address(&h), k2.object_address(&h));
        assert_ne!(k1.root_address(), k2.root_address());
        assert!(plain.seal().is_none() && k1.seal().is_some());
    }

    #[test]
    fn same_name_same_addresses() {
        let h = ObjectHash::of(b"x");
        assert_eq!(
            Channel::new("a", None).object_address(&h),
            Channel::new("a", None).object_address(&h)
        );
    }
}
