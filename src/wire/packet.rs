//! The packet codec: what one UDP datagram carries (sans-IO).
//!
//! Clear layout: `"LC" | version 1 | kind | tag [16] | body`. Kind 0 is an encoding symbol of an
//! object (body `esi u32 | symbol`), kind 1 the channel's root record (body: the record), kind
//! 2 the "on air" beacon (body: the tags of the objects the server sends next, 16 bytes each,
//! at most [`MAX_AIR_TAGS`]). The
//! symbol size is the body length less four; a receiver learns object lengths from the
//! references it already trusts, so packets carry no sizes.
//!
//! Sealed layout (encrypted channels, kind bit 7 set): `"LC" | 1 | kind|0x80 | tag [16] |
//! nonce [24] | mac [16] | secretbox(kind | tag | body)`. The kind and tag are repeated inside
//! the box, so the clear header is authenticated too: a packet whose header was altered fails
//! to open. Symbol nonces are a keyed hash of (tag, esi, symbol length), which name the
//! plaintext exactly: a nonce is never used for two different plaintexts, and every server and
//! every burst of one channel produce the same packet for the same symbol, so symbols combine.
//! Root-record and beacon nonces are random (neither is ever split into symbols).

use crate::wire::channel::{SealKeys, Tag};
use crate::wire::fec::Esi;
use crypto_secretbox::aead::{AeadInPlace, KeyInit};
use crypto_secretbox::XSalsa20Poly1305;

const MAGIC: &[u8; 2] = b"LC";
const VERSION: u8 = 1;
const KIND_SYMBOL: u8 = 0;
const KIND_ROOT: u8 = 1;
const KIND_AIR: u8 = 2;
/// Tags in one beacon: what fits the IPv6 minimum MTU's payload on a sealed channel.
pub const MAX_AIR_TAGS: usize = 64;
const SEALED: u8 = 0x80;
/// Bytes of the clear header.
pub const HEADER_LEN: usize = 20;
const NONCE_LEN: usize = 24;
const MAC_LEN: usize = 16;
/// Bytes a sealed packet adds: nonce, MAC and the repeated kind and tag.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + MAC_LEN + 17;

#[derive(Debug, PartialEq, Eq)]
pub enum Body<'a> {
    Symbol {
        esi: Esi,
        data: &'a [u8],
    },
    Root(&'a [u8]),
    /// Tags of objects on air, soonest first; a multiple of 16 bytes (see [`air_tags`]).
    Air(&'a [u8]),
}

#[derive(Debug, PartialEq, Eq)]
pub struct Packet<'a> {
    pub tag: Tag,
    pub body: Body<'a>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("datagram too short")]
    Short,
    #[error("not an lcfs packet")]
    Magic,
    #[error("unsupported packet version {0}")]
    Version(u8),
    #[error("unknown packet kind {0}")]
    Kind(u8),
    #[error("sealed packet on a clear channel, or clear packet on a sealed channel")]
    SealMismatch,
    #[error("packet failed authentication (wrong key, or forged)")]
    Auth,
    #[error("empty symbol")]
    EmptySymbol,
    #[error("beacon of {0} bytes is not a list of at most {MAX_AIR_TAGS} tags")]
    BadAir(usize),
}

/// The largest symbol that fits a UDP payload of `payload` bytes.
pub fn symbol_size_for(payload: usize, sealed: bool) -> usize {
    let overhead = HEADER_LEN + 4 + if sealed { SEAL_OVERHEAD } else { 0 };
    payload.saturating_sub(overhead)
}

/// Appends one symbol packet to `out` (which is cleared first).
pub fn encode_symbol(out: &mut Vec<u8>, tag: Tag, esi: Esi, data: &[u8], seal: Option<&SealKeys>) {
    let mut body = Vec::with_capacity(4 + data.len());
    body.extend_from_slice(&esi.0.to_le_bytes());
    body.extend_from_slice(data);
    let nonce = seal.map(|s| symbol_nonce(s, tag, esi, data.len()));
    encode(out, KIND_SYMBOL, tag, &body, seal.zip(nonce));
}

/// Appends one root-record packet to `out` (which is cleared first).
pub fn encode_root(out: &mut Vec<u8>, tag: Tag, record: &[u8], seal: Option<&SealKeys>) {
    let nonce = seal.map(|s| (s, rand::random::<[u8; NONCE_LEN]>()));
    encode(out, KIND_ROOT, tag, record, nonce);
}

/// Appends one beacon packet to `out` (which is cleared first): at most [`MAX_AIR_TAGS`] of
/// `tags`.
pub fn encode_air(out: &mut Vec<u8>, tag: Tag, tags: &[Tag], seal: Option<&SealKeys>) {
    let body: Vec<u8> = tags.iter().take(MAX_AIR_TAGS).flat_map(|t| t.0).collect();
    let nonce = seal.map(|s| (s, rand::random::<[u8; NONCE_LEN]>()));
    encode(out, KIND_AIR, tag, &body, nonce);
}

/// The tags of a beacon's body, as [`decode`] checked it.
pub fn air_tags(body: &[u8]) -> impl Iterator<Item = Tag> + '_ {
    body.chunks_exact(16).map(|c| {
        let mut t = [0; 16];
        t.copy_from_slice(c);
        Tag(t)
    })
}

fn symbol_nonce(seal: &SealKeys, tag: Tag, esi: Esi, len: usize) -> [u8; NONCE_LEN] {
    let mut h = blake3::Hasher::new_keyed(&seal.nonce);
    h.update(&tag.0);
    h.update(&esi.0.to_le_bytes());
    h.update(&(len as u32).to_le_bytes());
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&h.finalize().as_bytes()[..NONCE_LEN]);
    nonce
}

fn encode(out: &mut Vec<u8>, kind: u8, tag: Tag, body: &[u8], seal: Option<(&SealKeys, [u8; 24])>) {
    out.clear();
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    let Some((keys, nonce)) = seal else {
        out.push(kind);
        out.extend_from_slice(&tag.0);
        out.extend_from_slice(body);
        return;
    };
    out.push(kind | SEALED);
    out.extend_from_slice(&tag.0);
    out.extend_from_slice(&nonce);
    let mac_at = out.len();
    out.extend_from_slice(&[0; MAC_LEN]);
    let start = out.len();
    out.push(kind);
    out.extend_from_slice(&tag.0);
    out.extend_from_slice(body);
    let cipher = XSalsa20Poly1305::new(&keys.cipher.into());
    let mac = cipher
        .encrypt_in_place_detached(&nonce.into(), b"", &mut out[start..])
        .expect("secretbox without associated data cannot fail");
    out[mac_at..start].copy_from_slice(&mac);
}

/// Decodes (and, on a sealed channel, authenticates and decrypts in place) one datagram.
pub fn decode<'a>(buf: &'a mut [u8], seal: Option<&SealKeys>) -> Result<Packet<'a>, PacketError> {
    if buf.len() < HEADER_LEN {
        return Err(PacketError::Short);
    }
    if &buf[..2] != MAGIC {
        return Err(PacketError::Magic);
    }
    if buf[2] != VERSION {
        return Err(PacketError::Version(buf[2]));
    }
    let kind = buf[3];
    let mut tag = Tag([0; 16]);
    tag.0.copy_from_slice(&buf[4..HEADER_LEN]);
    let body: &'a [u8] = match (kind & SEALED != 0, seal) {
        (false, None) => &buf[HEADER_LEN..],
        (true, Some(keys)) => open(buf, keys)?,
        _ => return Err(PacketError::SealMismatch),
    };
    parse_body(kind & !SEALED, tag, body)
}

fn open<'a>(buf: &'a mut [u8], keys: &SealKeys) -> Result<&'a [u8], PacketError> {
    let start = HEADER_LEN + NONCE_LEN + MAC_LEN;
    if buf.len() < start + 17 {
        return Err(PacketError::Short);
    }
    let (head, sealed) = buf.split_at_mut(start);
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&head[HEADER_LEN..HEADER_LEN + NONCE_LEN]);
    let mut mac = [0u8; MAC_LEN];
    mac.copy_from_slice(&head[HEADER_LEN + NONCE_LEN..]);
    let cipher = XSalsa20Poly1305::new(&keys.cipher.into());
    cipher
        .decrypt_in_place_detached(&nonce.into(), b"", sealed, &mac.into())
        .map_err(|_| PacketError::Auth)?;
    // The inner kind and tag must repeat the clear header, which binds the header to the MAC.
    if sealed[0] != head[3] & !SEALED || sealed[1..17] != head[4..HEADER_LEN] {
        return Err(PacketError::Auth);
    }
    Ok(&sealed[17..])
}

fn parse_body(kind: u8, tag: Tag, body: &[u8]) -> Result<Packet<'_>, PacketError> {
    let body = match kind {
        KIND_SYMBOL => {
            let (esi, data) = body.split_first_chunk::<4>().ok_or(PacketError::Short)?;
            if data.is_empty() {
                return Err(PacketError::EmptySymbol);
            }
            Body::Symbol {
                esi: Esi(u32::from_le_bytes(*esi)),
                data,
            }
        }
        KIND_ROOT => Body::Root(body),
        KIND_AIR if body.len().is_multiple_of(16) && body.len() <= MAX_AIR_TAGS * 16 => {
            Body::Air(body)
        }
        KIND_AIR => return Err(PacketError::BadAir(body.len())),
        k => return Err(PacketError::Kind(k)),
    };
    Ok(Packet { tag, body })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::channel::{Channel, MasterKey};
    use proptest::prelude::*;

    fn keys() -> SealKeys {
        Channel::new("c", Some(&MasterKey::from_bytes([3; 32])))
            .seal()
            .unwrap()
            .clone()
    }

    const TAG: Tag = Tag([5; 16]);

    #[test]
    fn clear_round_trip() {
        let mut out = Vec::new();
        encode_symbol(&mut out, TAG, Esi(7), b"hello", None);
        let p = decode(&mut out, None).unwrap();
        assert_eq!(
            p,
            Packet {
                tag: TAG,
                body: Body::Symbol {
                    esi: Esi(7),
                    data: b"hello"
                }
            }
        );
        encode_root(&mut out, TAG, b"rec", None);
        assert_eq!(decode(&mut out, None).unwrap().body, Body::Root(b"rec"));
    }

    #[test]
    fn beacons_round_trip_and_reject_bad_lengths() {
        let tags: Vec<Tag> = (0..70u8).map(|i| Tag([i; 16])).collect();
        for seal in [None, Some(keys())] {
            let mut out = Vec::new();
            encode_air(&mut out, TAG, &tags, seal.as_ref());
            let p = decode(&mut out, seal.as_ref()).unwrap();
            let Body::Air(body) = p.body else {
                panic!("not a beacon: {p:?}")
            };
            let got: Vec<Tag> = air_tags(body).collect();
            assert_eq!(got, tags[..MAX_AIR_TAGS], "capped at MAX_AIR_TAGS");
        }
        for len in [1, 15, 17, (MAX_AIR_TAGS + 1) * 16] {
            let mut out = Vec::new();
            encode(&mut out, KIND_AIR, TAG, &vec![0; len], None);
            assert_eq!(decode(&mut out, None), Err(PacketError::BadAir(len)));
        }
    }

    #[test]
    fn sealed_round_trip_hides_content_and_is_deterministic() {
        let k = keys();
        let mut a = Vec::new();
        let mut b = Vec::new();
        encode_symbol(&mut a, TAG, Esi(9), b"secret data", Some(&k));
        encode_symbol(&mut b, TAG, Esi(9), b"secret data", Some(&k));
        assert_eq!(a, b, "same symbol, same packet: servers and bursts combine");
        assert!(!a.windows(6).any(|w| w == b"secret"));
        let p = decode(&mut a, Some(&k)).unwrap();
        assert_eq!(
            p.body,
            Body::Symbol {
                esi: Esi(9),
                data: b"secret data"
            }
        );
        encode_symbol(&mut b, TAG, Esi(10), b"secret data", Some(&k));
        assert_ne!(
            b[HEADER_LEN..HEADER_LEN + 24],
            a[HEADER_LEN..HEADER_LEN + 24]
        );
    }

    #[test]
    fn wrong_key_header_tamper_and_mode_mismatch_fail() {
        let k = keys();
        let other = Channel::new("c", Some(&MasterKey::from_bytes([4; 32])))
            .seal()
            .unwrap()
            .clone();
        let mut p = Vec::new();
        encode_symbol(&mut p, TAG, Esi(1), b"x", Some(&k));
        assert_eq!(decode(&mut p.clone(), Some(&other)), Err(PacketError::Auth));
        let mut t = p.clone();
        t[4] ^= 1;
        assert_eq!(decode(&mut t, Some(&k)), Err(PacketError::Auth));
        assert_eq!(decode(&mut p.clone(), None), Err(PacketError::SealMismatch));
        let mut clear = Vec::new();
        encode_symbol(&mut clear, TAG, Esi(1), b"x", None);
        assert_eq!(decode(&mut clear, Some(&k)), Err(PacketError::SealMismatch));
    }

    #[test]
    fn truncations_fail_cleanly() {
        let k = keys();
        let mut p = Vec::new();
        encode_symbol(&mut p, TAG, Esi(1), b"abcdef", Some(&k));
        for n in 0..p.len() {
            assert!(decode(&mut p[..n].to_vec(), Some(&k)).is_err());
        }
        encode_symbol(&mut p, TAG, Esi(1), b"a", None);
        for n in 0..p.len() {
            assert!(decode(&mut p[..n].to_vec(), None).is_err());
        }
    }

    #[test]
    fn symbol_sizes() {
        assert_eq!(symbol_size_for(1452, false), 1428);
        assert_eq!(symbol_size_for(1452, true), 1371);
    }

    proptest! {
        #[test]
        fn decode_never_panics(mut bytes in proptest::collection::vec(any::<u8>(), 0..200), sealed: bool) {
            let k = keys();
            let _ = decode(&mut bytes, sealed.then_some(&k));
        }

        #[test]
        fn sealed_bit_flips_never_authenticate(pos in 0usize..80, bit in 0u8..8) {
            let k = keys();
            let mut p = Vec::new();
            encode_symbol(&mut p, TAG, Esi(3), &[1u8; 40], Some(&k));
            let i = pos % p.len();
            p[i] ^= 1 << bit;
            prop_assert!(decode(&mut p, Some(&k)).is_err());
        }
    }
}
