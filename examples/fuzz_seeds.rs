//! Writes well-formed inputs for each fuzz target (`fuzz/`) into `fuzz/corpus/<target>/`,
//! so that the fuzzers start from real encodings rather than from nothing. The seeds are
//! committed; run this again when an encoding changes:
//!
//! ```text
//! cargo run --example fuzz_seeds -- fuzz/corpus
//! ```

use std::net::Ipv6Addr;
use std::path::Path;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use lcfs::fetch::trust::Publisher;
use lcfs::mld::parse::{encode_query, encode_report, GroupRecord, Query, RecordType};
use lcfs::wire::channel::{Channel, MasterKey, Tag};
use lcfs::wire::fec::Esi;
use lcfs::wire::object::{
    BlockSize, Content, Directory, Entry, EntryKind, FileHash, FileIndex, FileRef, ObjectHash,
    ObjectRef, RootRecord, Timestamp,
};
use lcfs::wire::packet;

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    std::fs::create_dir_all(&d).expect("the corpus directory");
    std::fs::write(d.join(format!("seed-{name}")), bytes).expect("a seed file");
}

fn with_kind(kind: u8, bytes: &[u8]) -> Vec<u8> {
    [&[kind][..], bytes].concat()
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "fuzz/corpus".into());
    let dir = Path::new(&dir);
    let h = |s: &str| ObjectHash::of(s.as_bytes());
    let tag = Tag([9; 16]);

    // Packets, clear and sealed.
    let mut b = Vec::new();
    packet::encode_symbol(&mut b, tag, Esi(5), b"symbol bytes", None);
    write(dir, "packet", "symbol", &b);
    b.clear();
    packet::encode_root(&mut b, tag, b"root record", None);
    write(dir, "packet", "root", &b);
    b.clear();
    packet::encode_air(&mut b, tag, &[tag, Tag([1; 16])], None);
    write(dir, "packet", "air", &b);
    let channel = Channel::new("fuzz", Some(&MasterKey::from_bytes([7; 32])));
    b.clear();
    packet::encode_symbol(&mut b, tag, Esi(5), b"symbol bytes", channel.seal());
    write(dir, "packet_sealed", "whole", &with_kind(0, &b));
    write(
        dir,
        "packet_sealed",
        "edits",
        &[1, 0, 0, 1, 2, 3, 0, 30, 0xff, 4],
    );

    // MLD: queries of both versions and a report of every record type.
    let g: Ipv6Addr = "ff12::1234".parse().expect("an address");
    let q = Query::general(Duration::from_secs(10), 2, Duration::from_secs(125));
    write(dir, "mld", "query-general", &encode_query(&q));
    let mut q1 = Query::address_specific(g, Duration::from_secs(1), 2, Duration::from_secs(125));
    q1.v2 = None;
    write(dir, "mld", "query-v1", &encode_query(&q1));
    let records: Vec<GroupRecord> = (1..=6u8)
        .map(|t| GroupRecord {
            record_type: RecordType::from_u8(t).expect("a record type"),
            group: g,
            sources: vec!["fe80::1".parse().expect("an address")],
        })
        .collect();
    write(dir, "mld", "report-v2", &encode_report(&records));
    let mut v1 = vec![131, 0, 0, 0, 0, 0, 0, 0];
    v1.extend_from_slice(&g.octets());
    write(dir, "mld", "report-v1", &v1);

    // Objects.
    let file = |content| {
        EntryKind::File(FileRef {
            size: 3,
            b3: FileHash::of(b"abc"),
            content,
        })
    };
    let entry = |name: &str, kind| Entry {
        name: name.as_bytes().to_vec(),
        mode: 0o644,
        mtime: Timestamp {
            secs: 1_700_000_000,
            nanos: 5,
        },
        nlink: lcfs::wire::object::Entry::plain_nlink(&kind),
        link: 0,
        kind,
    };
    let dir_obj = Directory::new(vec![
        entry("inline", file(Content::Inline(b"abc".to_vec()))),
        entry("block", file(Content::Block(h("block")))),
        entry(
            "big",
            file(Content::Index {
                index: ObjectRef {
                    hash: h("index"),
                    len: 64,
                },
                first_leaf: h("leaf"),
            }),
        ),
        entry(
            "sub",
            EntryKind::Dir(ObjectRef {
                hash: h("sub"),
                len: 10,
            }),
        ),
        entry("link", EntryKind::Symlink(b"../target".to_vec())),
    ]);
    write(
        dir,
        "objects",
        "directory",
        &with_kind(0, &dir_obj.encode()),
    );
    // version 2: the directory's own attributes, and two names of one hard-linked file
    let mut entries = dir_obj.entries.clone();
    let mut again = entries[1].clone();
    again.name = b"block again".to_vec();
    for e in [&mut entries[1], &mut again] {
        e.nlink = 2;
        e.link = 42;
    }
    entries.push(again);
    let meta = lcfs::wire::object::dir::DirMeta {
        mode: 0o750,
        mtime: Timestamp {
            secs: 1_600_000_000,
            nanos: 7,
        },
    };
    write(
        dir,
        "objects",
        "directory-v2",
        &with_kind(0, &Directory::with_meta(entries, meta).encode()),
    );
    let leaves = FileIndex::Leaves(vec![h("a"), h("b")]);
    write(
        dir,
        "objects",
        "index-leaves",
        &with_kind(1, &leaves.encode()),
    );
    let pages = FileIndex::Pages(vec![h("p")]);
    write(
        dir,
        "objects",
        "index-pages",
        &with_kind(1, &pages.encode()),
    );
    let mut root = RootRecord {
        channel_id: *channel.id(),
        generation: 3,
        publish_time_ns: 1_700_000_000_000_000_000,
        root: ObjectRef {
            hash: h("root"),
            len: 100,
        },
        block_size: BlockSize::from_bytes(1 << 20).expect("a block size"),
        single_file: false,
        signature: None,
    };
    write(dir, "objects", "root", &with_kind(2, &root.encode()));
    root.sign(
        &SigningKey::from_bytes(&[3; 32]),
        1_700_000_000_000_000_000,
        1 << 40,
    );
    write(dir, "objects", "root-signed", &with_kind(2, &root.encode()));
    let publisher = Publisher::Address("fe80::1".parse().expect("an address"));
    write(
        dir,
        "objects",
        "publisher",
        &with_kind(3, &publisher.encode()),
    );
    let bundle: Vec<u8> = [&b"one"[..], b"", b"three and more", b"four"].concat();
    write(dir, "objects", "bundle", &with_kind(4, &bundle));

    // Symbols: every real source symbol of the fuzzed object, from two senders.
    let symbols: Vec<u8> = (0..12u8)
        .flat_map(|i| [1 | (i % 2) << 4, 0, 0, i, 0])
        .collect();
    write(dir, "object_fetch", "real", &symbols);

    // Cache records: an index entry, and what the sharing protocol's seeds look like are
    // left to the fuzzer (its frames are small and their kinds are single bytes).
    let mut entry = vec![0, 1];
    entry.extend_from_slice(&4096u64.to_be_bytes());
    entry.extend_from_slice(&7u64.to_be_bytes());
    entry.push(1);
    write(dir, "cache_records", "entry", &entry);
    println!("seeds written under {}", dir.display());
}
