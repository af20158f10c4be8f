//! Objects as a receiver decodes them after their hash matched (a hostile publisher chooses
//! every byte): directories, file indexes, root records, remembered publishers, bundles. A decode is
//! an error or a value that encodes back to one that decodes the same.
#![no_main]
use lcfs::fetch::trust::Publisher;
use lcfs::wire::object::bundle::Bundle;
use lcfs::wire::object::{Directory, FileIndex, ObjectHash, ObjectRef, RootRecord};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    match kind % 5 {
        0 => {
            if let Ok(d) = Directory::decode(bytes) {
                assert_eq!(Directory::decode(&d.encode()).ok(), Some(d));
            }
        }
        1 => {
            if let Ok(i) = FileIndex::decode(bytes) {
                assert_eq!(FileIndex::decode(&i.encode()).ok(), Some(i));
            }
        }
        2 => {
            if let Ok(r) = RootRecord::decode(bytes) {
                assert_eq!(RootRecord::decode(&r.encode()).ok(), Some(r));
            }
        }
        3 => {
            if let Some(p) = Publisher::decode(bytes) {
                assert_eq!(Publisher::decode(&p.encode()), Some(p));
            }
        }
        _ => {
            // A decoded bundle, cut into its members: only the members' own bytes pass.
            let members: Vec<&[u8]> = vec![b"one", b"", b"three and more", b"four"];
            let bundle = Bundle::new(
                members
                    .iter()
                    .map(|m| ObjectRef {
                        hash: ObjectHash::of(m),
                        len: m.len() as u32,
                    })
                    .collect(),
            );
            if let Ok(got) = bundle.split(bytes) {
                let got: Vec<&[u8]> = got.iter().map(|v| &v[..]).collect();
                assert_eq!(got, members, "a bundle split into other bytes");
            }
        }
    }
});
