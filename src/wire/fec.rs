//! RaptorQ (RFC 6330) coding of one object, the unit that travels on one group (sans-IO).
//!
//! Every object is one source block with one sub-block, so an encoding symbol is named by its
//! ESI alone. ESIs below K are the object's bytes in order (the last symbol zero-padded); ESIs
//! from K up are repair symbols. A receiver needs any K (rarely K+1 or K+2) distinct symbols of
//! one symbol size, whatever their order or origin.
//!
//! An ESI is an [`Esi`], not a bare `u32`, so that a block index, a symbol count or a byte
//! offset cannot be sent as one.
//!
//! The decoder never trusts the wire: the object length comes from a verified reference,
//! symbols of another size or an ESI beyond 24 bits are ignored, and the number of symbols it
//! keeps is bounded so that a flood of forged symbols costs memory proportional to the object.

use raptorq::{EncodingPacket, ObjectTransmissionInformation, PayloadId};
use raptorq::{SourceBlockDecoder, SourceBlockEncoder};

/// RaptorQ's limit on source symbols in one block.
pub const MAX_SOURCE_SYMBOLS: u64 = 56_403;
/// ESIs are 24-bit numbers.
pub const ESI_LIMIT: u32 = 1 << 24;

/// An encoding symbol id: which symbol of an object a packet carries (RFC 6330 section 3.2).
/// Below K it names a source symbol, the object's bytes from `esi * symbol size`; from K up a
/// repair symbol. A type of its own, so that a block index or a byte offset cannot be sent
/// as one. On the wire it is a little-endian `u32` ([`crate::wire::packet`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct Esi(pub u32);

impl Esi {
    /// The ESI a sender sends after this one: ESIs wrap at 24 bits.
    pub fn next(self) -> Esi {
        Esi((self.0 + 1) % ESI_LIMIT)
    }
}

impl std::fmt::Display for Esi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FecError {
    #[error("empty objects are never sent")]
    Empty,
    #[error(
        "object of {len} bytes needs more than {MAX_SOURCE_SYMBOLS} symbols of {symbol_size} bytes"
    )]
    TooManySymbols { len: u64, symbol_size: usize },
}

fn oti(len: u64, symbol_size: usize) -> Result<ObjectTransmissionInformation, FecError> {
    if len == 0 || symbol_size == 0 {
        return Err(FecError::Empty);
    }
    if len.div_ceil(symbol_size as u64) > MAX_SOURCE_SYMBOLS || symbol_size > u16::MAX as usize {
        return Err(FecError::TooManySymbols { len, symbol_size });
    }
    Ok(ObjectTransmissionInformation::new(
        len,
        symbol_size as u16,
        1,
        1,
        1,
    ))
}

/// The symbol size to use for an object: the link's, or less for objects smaller than that.
pub fn symbol_size_for_object(len: u64, link_symbol_size: usize) -> usize {
    let min = len.div_ceil(MAX_SOURCE_SYMBOLS) as usize;
    (len as usize).min(link_symbol_size).max(min)
}

/// Produces any encoding symbol of one object. Source symbols are slices of the object;
/// RaptorQ's intermediate symbols (as large again as the object, and the costly part) are
/// computed only when the first repair symbol is asked for, which a lossless link never does.
pub struct ObjectEncoder {
    padded: Vec<u8>,
    symbol_size: usize,
    k: u32,
    encoder: std::sync::OnceLock<SourceBlockEncoder>,
}

impl ObjectEncoder {
    pub fn new(data: &[u8], symbol_size: usize) -> Result<ObjectEncoder, FecError> {
        oti(data.len() as u64, symbol_size)?;
        let k = data.len().div_ceil(symbol_size);
        let mut padded = data.to_vec();
        padded.resize(k * symbol_size, 0);
        Ok(ObjectEncoder {
            padded,
            symbol_size,
            k: k as u32,
            encoder: std::sync::OnceLock::new(),
        })
    }

    /// K: the number of source symbols.
    pub fn source_symbols(&self) -> u32 {
        self.k
    }

    pub fn symbol_size(&self) -> usize {
        self.symbol_size
    }

    /// Writes symbol `esi` (taken modulo 2^24) into `out`.
    pub fn symbol(&self, esi: Esi, out: &mut Vec<u8>) {
        let esi = esi.0 % ESI_LIMIT;
        out.clear();
        if esi < self.k {
            let at = esi as usize * self.symbol_size;
            out.extend_from_slice(&self.padded[at..at + self.symbol_size]);
        } else {
            let encoder = self.encoder.get_or_init(|| {
                let len = self.padded.len() as u64;
                let config =
                    ObjectTransmissionInformation::new(len, self.symbol_size as u16, 1, 1, 1);
                SourceBlockEncoder::new(0, &config, &self.padded)
            });
            let packet = encoder.repair_packets(esi - self.k, 1);
            if let Some(p) = packet.first() {
                out.extend_from_slice(p.data());
            }
        }
    }
}

/// What pushing one symbol into a decoder gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// More symbols are needed.
    Pending,
    /// The symbol did not fit this decoder (size or ESI); it was ignored.
    Ignored,
    /// This decoder already had a symbol with that ESI: no progress, whatever its bytes.
    Duplicate,
    /// The object, exactly `len` bytes. Not yet verified against its hash.
    Done(Vec<u8>),
}

/// Collects symbols of one object until it decodes.
///
/// The code is systematic: source symbols are the object's own bytes. They are copied
/// straight into place, and an object whose K source symbols all came is done without
/// RaptorQ, which copied every symbol twice and allocated once per symbol (on a clean link
/// every object). Repair symbols wait aside until source and repair symbols together reach
/// K; then RaptorQ takes them all and every later symbol.
pub struct ObjectDecoder {
    len: u64,
    symbol_size: usize,
    k: u32,
    kept: u32,
    /// Source ESIs taken so far, a bit each.
    sources: Vec<u64>,
    /// Repair ESIs taken so far: at most [`ObjectDecoder::saturated`]'s bound, then the
    /// caller starts afresh.
    repairs: std::collections::HashSet<Esi>,
    decoder: Inner,
}

enum Inner {
    /// Source symbols in place (`k` of `symbol_size` bytes), repair symbols aside.
    Systematic {
        object: Vec<u8>,
        held: u32,
        repair: Vec<EncodingPacket>,
    },
    RaptorQ(Box<SourceBlockDecoder>),
    /// The simulation's stand-in ([`ObjectDecoder::counting`]): the object it will give.
    Counting(std::sync::Arc<[u8]>),
}

impl ObjectDecoder {
    /// A decoder for an object of `len` bytes coded with symbols of `symbol_size` bytes.
    pub fn new(len: u64, symbol_size: usize) -> Result<ObjectDecoder, FecError> {
        oti(len, symbol_size)?;
        let k = len.div_ceil(symbol_size as u64) as usize;
        let decoder = Inner::Systematic {
            object: vec![0; k * symbol_size],
            held: 0,
            repair: Vec::new(),
        };
        Ok(ObjectDecoder::with(len, symbol_size, decoder))
    }

    fn with(len: u64, symbol_size: usize, decoder: Inner) -> ObjectDecoder {
        let k = len.div_ceil(symbol_size as u64) as u32;
        ObjectDecoder {
            len,
            symbol_size,
            k,
            kept: 0,
            sources: vec![0; (k as usize).div_ceil(64)],
            repairs: std::collections::HashSet::new(),
            decoder,
        }
    }

    /// A stand-in for the simulation of a thousand receivers, where RaptorQ's work and
    /// memory for every receiver would bound the run: it counts distinct symbols and gives
    /// `object` once it holds K, as RaptorQ nearly always decodes from any K (see the test
    /// `the_counting_stand_in_agrees_with_raptorq`). The caller verifies what it gives
    /// against the object's hash as it does a real decode.
    pub fn counting(
        object: std::sync::Arc<[u8]>,
        symbol_size: usize,
    ) -> Result<ObjectDecoder, FecError> {
        let len = object.len() as u64;
        oti(len, symbol_size)?;
        Ok(ObjectDecoder::with(
            len,
            symbol_size,
            Inner::Counting(object),
        ))
    }

    pub fn symbol_size(&self) -> usize {
        self.symbol_size
    }

    pub fn source_symbols(&self) -> u32 {
        self.k
    }

    /// Distinct symbols kept so far.
    pub fn kept(&self) -> u32 {
        self.kept
    }

    /// True once the decoder holds so many symbols that only forged ones can explain a failure
    /// to decode; the caller should start afresh.
    pub fn saturated(&self) -> bool {
        self.kept > self.k.saturating_mul(2) + 64
    }

    pub fn push(&mut self, esi: Esi, data: &[u8]) -> Decoded {
        if data.len() != self.symbol_size || esi.0 >= ESI_LIMIT {
            return Decoded::Ignored;
        }
        // Repeats prove nothing: a trickle of copies must not keep a dead fetch alive.
        let source = esi.0 < self.k;
        let fresh = match source {
            true => {
                let (word, bit) = (esi.0 as usize / 64, 1u64 << (esi.0 % 64));
                let fresh = self.sources[word] & bit == 0;
                self.sources[word] |= bit;
                fresh
            }
            false => self.repairs.insert(esi),
        };
        if !fresh {
            return Decoded::Duplicate;
        }
        self.kept += 1;
        let packet = || EncodingPacket::new(PayloadId::new(0, esi.0), data.to_vec());
        match &mut self.decoder {
            Inner::Counting(object) if self.kept >= self.k => Decoded::Done(object.to_vec()),
            Inner::Counting(_) => Decoded::Pending,
            Inner::RaptorQ(decoder) => finish(self.len, decoder.decode(std::iter::once(packet()))),
            Inner::Systematic {
                object,
                held,
                repair,
            } => {
                if source {
                    let at = esi.0 as usize * self.symbol_size;
                    object[at..at + self.symbol_size].copy_from_slice(data);
                    *held += 1;
                    if *held == self.k {
                        let mut object = std::mem::take(object);
                        object.truncate(self.len as usize);
                        return Decoded::Done(object);
                    }
                } else {
                    repair.push(packet());
                }
                match *held + repair.len() as u32 >= self.k {
                    true => self.hand_to_raptorq(),
                    false => Decoded::Pending,
                }
            }
        }
    }

    /// Source and repair symbols together may decode: RaptorQ takes them all, and every
    /// symbol after them.
    fn hand_to_raptorq(&mut self) -> Decoded {
        let Ok(config) = oti(self.len, self.symbol_size) else {
            return Decoded::Pending;
        };
        let Inner::Systematic { object, repair, .. } = &mut self.decoder else {
            return Decoded::Pending;
        };
        let (size, held) = (self.symbol_size, &self.sources);
        let sources = (0..self.k)
            .filter(|&i| held[i as usize / 64] & (1 << (i % 64)) != 0)
            .map(|i| {
                let at = i as usize * size;
                EncodingPacket::new(PayloadId::new(0, i), object[at..at + size].to_vec())
            });
        let mut decoder = Box::new(SourceBlockDecoder::new(0, &config, self.len));
        let decoded = decoder.decode(sources.chain(std::mem::take(repair)));
        self.decoder = Inner::RaptorQ(decoder);
        finish(self.len, decoded)
    }
}

/// What RaptorQ's answer means: the object, cut to its `len` bytes, or more to wait for.
fn finish(len: u64, decoded: Option<Vec<u8>>) -> Decoded {
    match decoded {
        Some(mut bytes) => {
            bytes.truncate(len as usize);
            Decoded::Done(bytes)
        }
        None => Decoded::Pending,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn data(n: usize, seed: u64) -> Vec<u8> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random()).collect()
    }

    fn decode_with(
        enc: &ObjectEncoder,
        len: usize,
        esis: impl Iterator<Item = u32>,
    ) -> Option<Vec<u8>> {
        let mut dec = ObjectDecoder::new(len as u64, enc.symbol_size()).unwrap();
        let mut buf = Vec::new();
        for esi in esis.map(Esi) {
            enc.symbol(esi, &mut buf);
            if let Decoded::Done(b) = dec.push(esi, &buf) {
                return Some(b);
            }
        }
        None
    }

    /// The simulation's stand-in completes at K distinct symbols; RaptorQ cannot decode from
    /// fewer, and from K it nearly always does. Fed the same symbols (a seeded fifth of them
    /// lost, repairs after the source symbols, as the server sends them), the real decoder
    /// finishes at the same symbol in nearly every trial and never more than two later.
    #[test]
    fn the_counting_stand_in_agrees_with_raptorq() {
        let mut rng = StdRng::seed_from_u64(7);
        let (mut trials, mut same) = (0, 0);
        for (len, size) in [
            (1000usize, 1000usize),
            (5 * 1428, 1428),
            (65536, 1428),
            (9000, 100),
        ] {
            let d = data(len, len as u64);
            let enc = ObjectEncoder::new(&d, size).unwrap();
            let k = enc.source_symbols();
            for _ in 0..60 {
                let esis: Vec<u32> = (0..3 * k + 8)
                    .filter(|_| rng.random::<f64>() >= 0.2)
                    .collect();
                let mut real = ObjectDecoder::new(len as u64, size).unwrap();
                let mut stand_in = ObjectDecoder::counting(d.clone().into(), size).unwrap();
                let (mut at_real, mut at_stand_in) = (None, None);
                let mut buf = Vec::new();
                for (n, &esi) in esis.iter().enumerate() {
                    enc.symbol(Esi(esi), &mut buf);
                    if at_real.is_none() {
                        if let Decoded::Done(b) = real.push(Esi(esi), &buf) {
                            assert_eq!(b, d);
                            at_real = Some(n);
                        }
                    }
                    if at_stand_in.is_none() {
                        if let Decoded::Done(b) = stand_in.push(Esi(esi), &buf) {
                            assert_eq!(b, d);
                            at_stand_in = Some(n);
                        }
                    }
                }
                let (Some(r), Some(c)) = (at_real, at_stand_in) else {
                    panic!("k {k}: both decode from 2.4 K symbols");
                };
                assert!(
                    r >= c && r <= c + 2,
                    "k {k}: RaptorQ at {r}, the stand-in at {c}"
                );
                trials += 1;
                same += usize::from(r == c);
            }
        }
        assert!(same * 100 >= trials * 97, "{same} of {trials} agree");
    }

    #[test]
    fn source_symbols_alone_decode() {
        let d = data(65536, 1);
        let enc = ObjectEncoder::new(&d, 1428).unwrap();
        assert_eq!(enc.source_symbols(), 46);
        assert_eq!(decode_with(&enc, d.len(), 0..46).unwrap(), d);
    }

    /// Source symbols go straight into place; repairs wait until they and the sources held
    /// reach K, then RaptorQ decodes them together.
    #[test]
    fn sources_and_repairs_meet_in_raptorq() {
        let d = data(65536, 3);
        let enc = ObjectEncoder::new(&d, 1428).unwrap();
        let k = enc.source_symbols();
        // Two sources lost, two repairs make up for them.
        let esis = (0..k).filter(|&e| e != 3 && e != 7).chain([k, k + 1]);
        assert_eq!(decode_with(&enc, d.len(), esis).unwrap(), d);
        // Repairs first, the sources after.
        let esis = (k + 10..k + 15).chain(5..k);
        assert_eq!(decode_with(&enc, d.len(), esis).unwrap(), d);
        // Not enough: nothing.
        assert_eq!(decode_with(&enc, d.len(), (0..k - 2).chain([k])), None);
    }

    #[test]
    fn repair_symbols_alone_decode() {
        let d = data(10_000, 2);
        let enc = ObjectEncoder::new(&d, 1000).unwrap();
        assert_eq!(decode_with(&enc, d.len(), 100..200).unwrap(), d);
    }

    #[test]
    fn wrong_size_and_big_esi_are_ignored() {
        let mut dec = ObjectDecoder::new(5000, 1000).unwrap();
        assert_eq!(dec.push(Esi(0), &[0; 999]), Decoded::Ignored);
        assert_eq!(dec.push(Esi(ESI_LIMIT), &[0; 1000]), Decoded::Ignored);
        assert_eq!(dec.push(Esi(0), &[0; 1000]), Decoded::Pending);
        assert_eq!(dec.push(Esi(0), &[1; 1000]), Decoded::Duplicate);
        assert_eq!(Esi(ESI_LIMIT - 1).next(), Esi(0));
    }

    #[test]
    fn invalid_configurations_are_errors() {
        assert_eq!(ObjectDecoder::new(0, 100).err(), Some(FecError::Empty));
        assert!(ObjectDecoder::new(1 << 30, 8).is_err());
        assert_eq!(symbol_size_for_object(100, 1428), 100);
        assert_eq!(symbol_size_for_object(1 << 20, 1428), 1428);
    }

    /// `len` seeded bytes, their encoder, and the ESIs of 4 K + 20 symbols that survive a
    /// seeded `loss`, in order (with the generator, for more).
    fn lossy(len: usize, loss: f64, seed: u64) -> (Vec<u8>, ObjectEncoder, Vec<u32>, StdRng) {
        let d = data(len, seed);
        let enc = ObjectEncoder::new(&d, 1428.min(len)).unwrap();
        let mut rng = StdRng::seed_from_u64(seed);
        let k = enc.source_symbols();
        let survivors = (0..k * 4 + 20)
            .filter(|_| rng.random::<f64>() >= loss)
            .collect();
        (d, enc, survivors, rng)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn any_enough_symbols_decode(len in 1usize..40_000, loss in 0.0f64..0.5, seed: u64) {
            let (d, enc, survivors, _) = lossy(len, loss, seed);
            prop_assert_eq!(decode_with(&enc, len, survivors.into_iter()), Some(d));
        }

        /// Symbols in any order (repairs before sources, sources after RaptorQ took over).
        #[test]
        fn enough_symbols_in_any_order_decode(
            len in 1usize..40_000,
            loss in 0.0f64..0.5,
            seed: u64,
        ) {
            use rand::seq::SliceRandom;
            let (d, enc, mut survivors, mut rng) = lossy(len, loss, seed);
            survivors.shuffle(&mut rng);
            prop_assert_eq!(decode_with(&enc, len, survivors.into_iter()), Some(d));
        }
    }
}
