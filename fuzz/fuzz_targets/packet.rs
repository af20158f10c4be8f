//! Datagrams of a clear channel, as any host on the link may send them: a decode is an error
//! or a packet that encodes back to one that decodes the same.
#![no_main]
use lcfs::wire::packet::{self, Body};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = data.to_vec();
    let Ok(p) = packet::decode(&mut buf, None) else {
        return;
    };
    let mut again = Vec::new();
    match p.body {
        Body::Symbol { esi, data } => packet::encode_symbol(&mut again, p.tag, esi, data, None),
        Body::Root(r) => packet::encode_root(&mut again, p.tag, r, None),
        Body::Air(a) => {
            let tags: Vec<_> = packet::air_tags(a).collect();
            packet::encode_air(&mut again, p.tag, &tags, None)
        }
    }
    let q = packet::decode(&mut again, None).expect("a re-encoded packet decodes");
    assert_eq!(q.tag, p.tag);
    assert_eq!(q.body, p.body);
});
