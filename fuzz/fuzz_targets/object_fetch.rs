//! Symbols for one object from the link, forged or real, in any order, of any size: a fetch
//! completes with exactly the object's bytes or not at all. The input is a list of symbols:
//! a flags byte (real or forged, which sender), a 3-byte ESI, a length byte, and for a forged
//! symbol its bytes.
#![no_main]
use std::net::Ipv6Addr;
use std::time::Instant;

use lcfs::fetch::object::ObjectFetch;
use lcfs::wire::fec::{Esi, ObjectEncoder};
use lcfs::wire::object::{ObjectHash, ObjectRef};
use libfuzzer_sys::fuzz_target;

const SYMBOL: usize = 64;

fuzz_target!(|data: &[u8]| {
    let object: Vec<u8> = (0..700u32).map(|i| (i * 31 % 251) as u8).collect();
    let want = ObjectRef {
        hash: ObjectHash::of(&object),
        len: object.len() as u32,
    };
    let encoder = ObjectEncoder::new(&object, SYMBOL).expect("an encoder for the object");
    let now = Instant::now();
    let mut fetch = ObjectFetch::new(now, want);
    let mut rest = data;
    let mut real = Vec::new();
    while let [flags, a, b, c, len, tail @ ..] = rest {
        let esi = Esi(u32::from(*a) << 16 | u32::from(*b) << 8 | u32::from(*c));
        let sender = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, u16::from(flags >> 4));
        let symbol: &[u8] = if flags & 1 == 1 {
            real.clear();
            encoder.symbol(Esi(esi.0 % 64), &mut real);
            rest = tail;
            &real
        } else {
            let n = usize::from(*len).min(tail.len());
            let (forged, after) = tail.split_at(n);
            rest = after;
            forged
        };
        let preferred = flags & 2 == 2;
        if let Some(done) = fetch.handle_symbol(now, sender, preferred, esi, symbol) {
            assert_eq!(done.len(), 1);
            assert_eq!(
                &done[0][..],
                &object[..],
                "a fetch completed with wrong bytes"
            );
            return;
        }
    }
});
