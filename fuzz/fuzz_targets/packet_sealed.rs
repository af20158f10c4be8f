//! Datagrams of an encrypted channel. The input is either a whole datagram (almost always
//! refused: it must not panic), or edits applied to a real sealed packet: whatever is
//! flipped, cut or appended, the packet is refused or decodes to exactly what was sealed.
#![no_main]
use lcfs::wire::channel::{Channel, MasterKey, Tag};
use lcfs::wire::fec::Esi;
use lcfs::wire::packet::{self, Body};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let channel = Channel::new("fuzz", Some(&MasterKey::from_bytes([7; 32])));
    let seal = channel.seal();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        let mut buf = rest.to_vec();
        let _ = packet::decode(&mut buf, seal);
        return;
    }
    // A real packet: a symbol whose ESI and bytes come from the input's first 16 bytes.
    let (head, edits) = rest.split_at(rest.len().min(16));
    let esi = Esi(head
        .iter()
        .take(3)
        .fold(0u32, |a, b| a << 8 | u32::from(*b)));
    let payload: Vec<u8> = head.iter().chain(b"lcfs".iter()).copied().collect();
    let tag = Tag([mode; 16]);
    let mut buf = Vec::new();
    packet::encode_symbol(&mut buf, tag, esi, &payload, seal);
    // Edits: (position, value) pairs XORed in, and a final length change.
    for pair in edits.chunks(3) {
        match pair {
            [hi, lo, x] => {
                let at = (usize::from(*hi) << 8 | usize::from(*lo)) % buf.len();
                buf[at] ^= x;
            }
            [n] => buf.truncate(buf.len().saturating_sub(usize::from(*n))),
            [n, b] => buf.extend(std::iter::repeat_n(*b, usize::from(*n))),
            _ => {}
        }
    }
    if let Ok(p) = packet::decode(&mut buf, seal) {
        assert_eq!(p.tag, tag, "an edited sealed packet decoded to another tag");
        assert_eq!(
            p.body,
            Body::Symbol {
                esi,
                data: &payload
            },
            "an edited sealed packet decoded to other bytes"
        );
    }
});
