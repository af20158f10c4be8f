//! `lcfs cache` on a cache this test fills itself (no network, no root): status names the
//! channel's remembered generation; unpin walks the channel's tree from the cache offline;
//! verify drops a damaged file and says so; verify and clear refuse while another process
//! owns the cache and name it, while status and gc work through it; gc and clear empty it.

use std::path::Path;
use std::process::{Command, Output};

use lcfs::wire::channel::Channel;
use lcfs::wire::object::{object_ref, BlockSize, Directory, Entry, EntryKind, FileRef, RootRecord};
use lcfs::wire::object::{Content, FileHash, ObjectHash, Timestamp};
use lcfs_cache::{Cache, CacheConfig, Verified};

const LCFS: &str = env!("CARGO_BIN_EXE_lcfs");

fn lcfs(dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(LCFS)
        .args(["cache"])
        .args(args)
        .arg("--cache")
        .arg(dir)
        .output()
        .expect("run lcfs");
    eprintln!(
        "lcfs cache {args:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn file(name: &str, block: &[u8]) -> Entry {
    Entry {
        name: name.as_bytes().to_vec(),
        mode: 0o644,
        mtime: Timestamp { secs: 0, nanos: 0 },
        nlink: 1,
        link: 0,
        kind: EntryKind::File(FileRef {
            size: block.len() as u64,
            b3: FileHash::of(block),
            content: Content::Block(ObjectHash::of(block)),
        }),
    }
}

/// Channel "c": `/a` and `/b`, one 8 KiB block each, cached and pinned, root remembered at
/// generation 42. Returns the two blocks.
fn fill(dir: &Path) -> (Verified, Verified) {
    let cache = Cache::open(CacheConfig::new(dir)).unwrap();
    let a = Verified::hash_of(vec![1u8; 8192]);
    let b = Verified::hash_of(vec![2u8; 8192]);
    let top = Directory::new(vec![file("a", &a), file("b", &b)]).encode();
    let root = object_ref(&top);
    for v in [a.clone(), b.clone(), Verified::hash_of(top)] {
        cache.insert(&v).unwrap();
        cache.pin(v.hash()).unwrap();
    }
    let channel = Channel::new("c", None);
    let record = RootRecord {
        channel_id: *channel.id(),
        generation: 42,
        publish_time_ns: 0,
        root,
        block_size: BlockSize::DEFAULT,
        single_file: false,
        signature: None,
    };
    cache.set_root(channel.id(), &record.encode()).unwrap();
    (a, b)
}

fn pinned(dir: &Path) -> u64 {
    let json = stdout(&lcfs(dir, &["status", "--json"]));
    let at = json.find("\"pinned_bytes\":").unwrap() + 15;
    json[at..].split(',').next().unwrap().parse().unwrap()
}

#[test]
fn status_unpin_verify_gc_and_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cache");
    let (a, b) = fill(&dir);
    let id = Channel::new("c", None)
        .id()
        .map(|x| format!("{x:02x}"))
        .concat();
    let text = stdout(&lcfs(&dir, &["status"]));
    assert!(text.contains("objects   3"), "{text}");
    assert!(
        text.contains(&id) && text.contains("generation 42"),
        "{text}"
    );
    let json = stdout(&lcfs(&dir, &["status", "--json"]));
    assert!(
        json.contains(&format!(r#""id":"{id}","generation":42"#)),
        "{json}"
    );

    // Unpinning /a offline leaves /b's block and the root directory pinned.
    let all = pinned(&dir);
    stdout(&lcfs(&dir, &["unpin", "c", "a"]));
    let left = pinned(&dir);
    assert!(left < all && left > 0, "{all} -> {left}");
    let missing = lcfs(&dir, &["unpin", "c", "nope"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("\"nope\""));

    // A flipped bit in /b's block: verify drops it and says so.
    let path = |v: &Verified| {
        let hex = v.hash().to_hex();
        dir.join("objects").join(&hex[..2]).join(hex.as_str())
    };
    let mut bytes = std::fs::read(path(&b)).unwrap();
    bytes[10] ^= 1;
    std::fs::write(path(&b), bytes).unwrap();
    let text = stdout(&lcfs(&dir, &["verify"]));
    assert!(
        text.contains("checked 3 object files") && text.contains("DROPPED 1"),
        "{text}"
    );
    assert!(!path(&b).exists() && path(&a).exists());

    // While this process owns the cache: verify and clear refuse naming it; status and gc
    // are answered by it.
    {
        let owner = Cache::open(CacheConfig::new(&dir)).unwrap();
        assert!(owner.is_owner());
        let pid = format!("process {}", std::process::id());
        for cmd in ["verify", "clear"] {
            let out = lcfs(&dir, &[cmd]);
            assert!(!out.status.success());
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains(&pid) && err.contains("run it again"), "{err}");
        }
        let text = stdout(&lcfs(&dir, &["status"]));
        assert!(text.contains(&pid), "{text}");
        let text = stdout(&lcfs(&dir, &["gc", "--max-size", "0"]));
        assert!(
            text.contains("evicted 1 objects"),
            "the unpinned /a: {text}"
        );
        assert!(!owner.contains(a.hash()));
    }
    stdout(&lcfs(&dir, &["unpin", "--all"]));
    assert_eq!(pinned(&dir), 0);
    let text = stdout(&lcfs(&dir, &["clear"]));
    assert!(text.contains("removed 1 objects"), "{text}");
    let text = stdout(&lcfs(&dir, &["status"]));
    assert!(
        text.contains("objects   0") && text.contains("generation 42"),
        "{text}"
    );
}
