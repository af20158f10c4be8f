//! Tests of the indexer: real trees in temporary directories, walked back from the objects.

use super::*;
use crate::wire::object::index::IndexShape;
use crate::wire::object::{FileHash, Timestamp, INLINE_MAX};
use std::fs::{self, File, Metadata};
use std::io::Write;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Component;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, SystemTime};

const BS: u64 = 16 << 10;

fn bs() -> BlockSize {
    BlockSize::from_bytes(BS).unwrap()
}

fn config(state_dir: Option<&Path>) -> IndexConfig {
    IndexConfig {
        block_size: bs(),
        state_dir: state_dir.map(Path::to_path_buf),
    }
}

/// A temporary directory on tmpfs when there is one.
fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap()
}

/// Bytes that differ from block to block (and from file to file by `seed`).
fn data(len: u64, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i / 7 + i / BS * 13) as u8 ^ seed)
        .collect()
}

fn write(path: &Path, bytes: &[u8], mode: u32) {
    fs::write(path, bytes).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// The tree of the tests: every kind of file size, dedup, nesting, links and odd names.
fn build_tree(root: &Path) {
    write(&root.join("empty"), b"", 0o644);
    write(&root.join("small"), b"hello\n", 0o600);
    write(&root.join("inline max"), &data(INLINE_MAX, 1), 0o644);
    write(&root.join("above inline"), &data(INLINE_MAX + 1, 2), 0o755);
    write(&root.join("one block"), &data(BS, 3), 0o644);
    write(&root.join("block plus one"), &data(BS + 1, 4), 0o644);
    let repeated: Vec<u8> = [vec![7u8; BS as usize * 5], data(100, 5)].concat();
    write(&root.join("repeated"), &repeated, 0o644);
    fs::create_dir_all(root.join("a/b c/ünï cödé")).unwrap();
    write(
        &root.join("a/b c/ünï cödé/deep"),
        &data(3 * BS + 17, 6),
        0o4755,
    );
    write(&root.join("a/dup of one block"), &data(BS, 3), 0o644);
    fs::create_dir(root.join("empty dir")).unwrap();
    write(&root.join("x".repeat(250)), b"long name", 0o644);
    symlink("a/b c", root.join("relative link")).unwrap();
    symlink("/etc/hostname", root.join("absolute link")).unwrap();
    symlink("nowhere/at all", root.join("a/dangling")).unwrap();
    let old = SystemTime::UNIX_EPOCH + Duration::new(1_000_000_000, 123_456_789);
    File::options()
        .write(true)
        .open(root.join("small"))
        .unwrap()
        .set_modified(old)
        .unwrap();
}

/// The bytes of object `hash`, checked against its hash and recorded length.
fn load(p: &Published, hash: &ObjectHash) -> Vec<u8> {
    let Object { len, source, .. } = &p.objects[hash];
    let bytes = read_block(&p.tree, source, hash).unwrap();
    assert_eq!(ObjectHash::of(&bytes), *hash);
    assert_eq!(bytes.len(), *len as usize);
    bytes.to_vec()
}

/// The contents of a file, reassembled from the published objects only.
fn file_bytes(p: &Published, f: &FileRef) -> Vec<u8> {
    let leaves = match &f.content {
        Content::Inline(bytes) => return bytes.clone(),
        Content::Block(leaf) => vec![*leaf],
        Content::Index {
            index: r,
            first_leaf,
        } => {
            let top = FileIndex::decode(&load(p, &r.hash)).unwrap();
            let first = match &top {
                FileIndex::Leaves(l) => l[0],
                FileIndex::Pages(pages) => match FileIndex::decode(&load(p, &pages[0])).unwrap() {
                    FileIndex::Leaves(l) => l[0],
                    FileIndex::Pages(_) => panic!("pages of pages"),
                },
            };
            assert_eq!(*first_leaf, first, "the entry names the first block");
            IndexShape {
                blocks: bs().blocks_in(f.size),
            }
            .check(&top)
            .unwrap();
            match top {
                FileIndex::Leaves(leaves) => leaves,
                FileIndex::Pages(pages) => pages.iter().flat_map(|h| page(p, h)).collect(),
            }
        }
    };
    leaves.iter().flat_map(|h| load(p, h)).collect()
}

fn page(p: &Published, hash: &ObjectHash) -> Vec<ObjectHash> {
    match FileIndex::decode(&load(p, hash)).unwrap() {
        FileIndex::Leaves(leaves) => leaves,
        FileIndex::Pages(_) => panic!("page of pages"),
    }
}

/// Walks directory object `dir` beside the real directory `path` and checks they agree.
fn check_dir(p: &Published, dir: &ObjectRef, path: &Path) {
    let decoded = Directory::decode(&load(p, &dir.hash)).unwrap();
    let mut names: Vec<Vec<u8>> = fs::read_dir(path)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_vec())
        .collect();
    names.sort();
    let got: Vec<&[u8]> = decoded.entries.iter().map(|e| &e.name[..]).collect();
    assert_eq!(got, names, "entries of {}", path.display());
    for entry in &decoded.entries {
        check_entry(p, entry, &path.join(OsStr::from_bytes(&entry.name)));
    }
}

fn check_entry(p: &Published, entry: &Entry, path: &Path) {
    let meta = fs::symlink_metadata(path).unwrap();
    assert_eq!(entry.mode, meta.mode() & 0o7777, "{}", path.display());
    assert_eq!(entry.mtime, mtime_of(&meta), "{}", path.display());
    match &entry.kind {
        EntryKind::Dir(r) => check_dir(p, r, path),
        EntryKind::Symlink(t) => {
            assert_eq!(*t, fs::read_link(path).unwrap().into_os_string().into_vec())
        }
        EntryKind::File(f) => {
            let bytes = fs::read(path).unwrap();
            assert_eq!(f.size, bytes.len() as u64);
            assert_eq!(f.b3, FileHash::of(&bytes), "{}", path.display());
            assert_eq!(file_bytes(p, f), bytes, "{}", path.display());
        }
    }
}

fn mtime_of(meta: &Metadata) -> Timestamp {
    Timestamp {
        secs: meta.mtime(),
        nanos: meta.mtime_nsec() as u32,
    }
}

fn check_objects(p: &Published) {
    for hash in p.objects.keys() {
        load(p, hash);
    }
}

#[test]
fn tree_round_trips() {
    let dir = scratch();
    build_tree(dir.path());
    let p = index_path(dir.path(), &config(None)).unwrap();
    assert!(!p.single_file && p.skipped.is_empty(), "{:?}", p.skipped);
    assert_eq!((p.files, p.dirs, p.symlinks), (10, 5, 3));
    check_objects(&p);
    check_dir(&p, &p.root, dir.path());
    let repeated = 5 * BS + 100;
    assert!(p.hashed_bytes >= repeated && p.bytes == p.hashed_bytes);
    let blocks = p
        .objects
        .values()
        .filter(|o| matches!(o.source, Source::File { .. }))
        .count();
    // above inline 1, one block + its duplicate 1, block plus one 2, repeated 2, deep 4.
    assert_eq!(blocks, 10);
}

#[test]
fn paged_file_round_trips() {
    let dir = scratch();
    let size = (LEAVES_PER_PAGE + 5) * BS + 9;
    write(&dir.path().join("big"), &data(size, 9), 0o644);
    let p = index_path(dir.path(), &config(None)).unwrap();
    let root = Directory::decode(&load(&p, &p.root.hash)).unwrap();
    let EntryKind::File(f) = &root.entries[0].kind else {
        panic!("not a file")
    };
    let Content::Index { index: top, .. } = &f.content else {
        panic!("no index")
    };
    assert!(
        matches!(FileIndex::decode(&load(&p, &top.hash)), Ok(FileIndex::Pages(pg)) if pg.len() == 2)
    );
    check_objects(&p);
    check_dir(&p, &p.root, dir.path());
}

#[test]
fn single_file_path() {
    let dir = scratch();
    let path = dir.path().join("only file");
    write(&path, &data(2 * BS + 5, 3), 0o640);
    let p = index_path(&path, &config(None)).unwrap();
    assert!(p.single_file && p.files == 1 && p.dirs == 1);
    let root = Directory::decode(&load(&p, &p.root.hash)).unwrap();
    assert_eq!(root.entries.len(), 1);
    assert_eq!(root.entries[0].name, b"only file");
    check_entry(&p, &root.entries[0], &path);
    check_objects(&p);
}

#[test]
fn missing_path_is_an_error_naming_it() {
    let dir = scratch();
    let missing = dir.path().join("not here");
    let err = index_path(&missing, &config(None)).unwrap_err();
    assert!(err.to_string().contains("not here"), "{err}");
    let socket = dir.path().join("socket");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let err = index_path(&socket, &config(None)).unwrap_err();
    assert!(matches!(err, IndexError::NotServable { .. }), "{err}");
}

#[test]
fn restart_reads_nothing_and_a_touched_file_alone_is_read() {
    let (dir, state) = (scratch(), scratch());
    build_tree(dir.path());
    // Reusing the open database: closing and reopening sled in one process races with its
    // flusher thread for the file lock. A real restart is covered by tests/copy.rs.
    let run = || index_path(dir.path(), &config(Some(state.path()))).unwrap();
    let first = run();
    assert!(first.hashed_bytes > 0);
    let again = run();
    assert_eq!(again.hashed_bytes, 0);
    assert_eq!(again.root, first.root);
    let sorted = |p: &Published| {
        let mut keys: Vec<[u8; 32]> = p.objects.keys().map(|h| *h.as_bytes()).collect();
        keys.sort();
        keys
    };
    assert_eq!(sorted(&again), sorted(&first));
    let touched = File::options()
        .write(true)
        .open(dir.path().join("one block"))
        .unwrap();
    touched.set_modified(SystemTime::now()).unwrap();
    fs::write(dir.path().join("block plus one"), data(BS + 1, 99)).unwrap();
    let third = run();
    assert_eq!(third.hashed_bytes, BS + BS + 1);
    assert_ne!(third.root, first.root);
    check_dir(&third, &third.root, dir.path());
    assert_eq!(run().hashed_bytes, 0);
}

#[test]
fn one_tree_indexed_again_gives_the_same_root() {
    let dir = scratch();
    build_tree(dir.path());
    let tree = Arc::new(Tree::open(dir.path()).unwrap());
    let first = index_tree(&tree, &config(None)).unwrap();
    let again = index_tree(&tree, &config(None)).unwrap();
    assert_eq!((again.root, again.files), (first.root, 10));
}

#[test]
fn locked_state_dir_still_serves() {
    let (dir, state) = (scratch(), scratch());
    write(&dir.path().join("f"), &data(3 * BS, 1), 0o644);
    let _other_server = LeafCache::open(state.path()).unwrap();
    for _ in 0..2 {
        let p = index_path(dir.path(), &config(Some(state.path()))).unwrap();
        assert_eq!(p.hashed_bytes, 3 * BS);
    }
}

#[test]
fn read_block_detects_changes() {
    let dir = scratch();
    let path = dir.path().join("f");
    write(&path, &data(3 * BS, 1), 0o644);
    let p = index_path(dir.path(), &config(None)).unwrap();
    let (hash, Object { source, .. }) = p
        .objects
        .iter()
        .find(|(_, o)| matches!(o.source, Source::File { offset, .. } if offset == BS))
        .unwrap();
    let read = |source: &Source| read_block(&p.tree, source, hash);
    assert!(read(source).is_ok());
    let changed = |r: Result<Arc<[u8]>, IndexError>| matches!(r, Err(IndexError::Changed { path: c }) if c == path);
    File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .write_all_at(b"!", BS + 10)
        .unwrap();
    assert!(changed(read(source)));
    File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(BS + 5)
        .unwrap();
    assert!(changed(read(source)));
    fs::remove_file(&path).unwrap();
    assert!(changed(read(source)));
    symlink(dir.path(), &path).unwrap();
    assert!(changed(read(source)));
}

#[test]
fn vanished_and_unreadable_entries_are_skipped() {
    let dir = scratch();
    write(&dir.path().join("here"), b"x", 0o644);
    let tree = Arc::new(Tree::open(dir.path()).unwrap());
    let walker = Walker::new(tree.clone(), bs(), None, Arc::new(IgnoreRules::none()));
    let gone = walker
        .child(tree.dir(), Path::new(""), c"gone".into(), 0)
        .unwrap();
    assert!(gone.is_none());
    let p = walker.finish(
        ObjectRef {
            hash: ObjectHash::of(b""),
            len: 0,
        },
        false,
    );
    assert_eq!(p.skipped.len(), 1);
    assert_eq!(p.skipped[0].0, dir.path().join("gone"));
    // chmod 000 blocks reads only for non-root users.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        write(&dir.path().join("locked"), b"secret", 0o000);
        let p = index_path(dir.path(), &config(None)).unwrap();
        assert_eq!(p.skipped.len(), 1);
        assert_eq!(p.files, 1);
    }
}

#[test]
fn special_files_are_left_out() {
    let dir = scratch();
    write(&dir.path().join("file"), b"x", 0o644);
    let _socket = std::os::unix::net::UnixListener::bind(dir.path().join("socket")).unwrap();
    let fifo = std::ffi::CString::new(dir.path().join("fifo").into_os_string().into_vec()).unwrap();
    // SAFETY: fifo is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    let p = index_path(dir.path(), &config(None)).unwrap();
    let skipped: Vec<String> = p
        .skipped
        .iter()
        .map(|(path, why)| format!("{} {why}", path.display()))
        .collect();
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert!(
        p.skipped[0].0.ends_with("fifo") && p.skipped[1].0.ends_with("socket"),
        "each is named: {skipped:?}"
    );
    let root = Directory::decode(&load(&p, &p.root.hash)).unwrap();
    assert_eq!(root.entries.len(), 1);
}

#[test]
fn deep_tree_does_not_overflow() {
    let dir = scratch();
    let deep: PathBuf = std::iter::repeat_n("d", 1000).collect();
    fs::create_dir_all(dir.path().join(&deep)).unwrap();
    write(&dir.path().join(&deep).join("f"), b"bottom", 0o644);
    let p = index_path(dir.path(), &config(None)).unwrap();
    assert_eq!((p.dirs, p.files), (1001, 1));
}

#[test]
fn directories_below_max_depth_are_skipped() {
    use rustix::fs::{mkdirat, openat, Mode, OFlags};
    let dir = scratch();
    // Made by descriptor: the path of the deepest one is longer than PATH_MAX.
    let flags = OFlags::RDONLY | OFlags::DIRECTORY;
    let mut fd = openat(rustix::fs::CWD, dir.path(), flags, Mode::empty()).unwrap();
    for _ in 0..=MAX_DEPTH {
        mkdirat(&fd, "d", Mode::from_raw_mode(0o755)).unwrap();
        fd = openat(&fd, "d", flags, Mode::empty()).unwrap();
    }
    let p = index_path(dir.path(), &config(None)).unwrap();
    assert_eq!(p.dirs, 1 + MAX_DEPTH as u64);
    assert_eq!(p.skipped.len(), 1);
    assert!(
        p.skipped[0].1.contains("2048 directories"),
        "{:?}",
        p.skipped
    );
}

#[test]
fn oversized_directory_is_an_error() {
    let dir = scratch();
    let walker = Walker::new(
        Arc::new(Tree::open(dir.path()).unwrap()),
        bs(),
        None,
        Arc::new(IgnoreRules::none()),
    );
    let file = FileRef {
        size: 0,
        b3: FileHash::of(b""),
        content: Content::Inline(vec![]),
    };
    let entries = (0..DIRECTORY_MAX / 250)
        .map(|i| Entry {
            name: format!("{i:0>250}").into_bytes(),
            mode: 0o644,
            mtime: Timestamp::default(),
            nlink: 1,
            link: 0,
            kind: EntryKind::File(file.clone()),
        })
        .collect();
    let err = walker
        .add_directory(Path::new("/huge"), Directory::new(entries))
        .unwrap_err();
    assert!(err.is_fatal() && err.to_string().contains("/huge"), "{err}");
}

/// `cargo test --release --lib serve::index::tests::speed -- --ignored --nocapture`
#[test]
#[ignore = "benchmark: writes 1 GiB and 10,000 files to /dev/shm"]
fn speed() {
    let (dir, state) = (scratch(), scratch());
    let config = IndexConfig {
        state_dir: Some(state.path().into()),
        ..Default::default()
    };
    let block: Vec<u8> = (0..1u32 << 14).flat_map(|i| i.to_le_bytes()).collect();
    let mut file = File::create(dir.path().join("big")).unwrap();
    for i in 0u32..1 << 14 {
        let mut b = block.clone();
        b[..4].copy_from_slice(&i.to_le_bytes());
        io::Write::write_all(&mut file, &b).unwrap();
    }
    let timed = |what: &str, units: f64, unit: &str| {
        let start = std::time::Instant::now();
        let p = index_path(dir.path(), &config).unwrap();
        let secs = start.elapsed().as_secs_f64();
        println!("{what}: {secs:.3} s, {:.0} {unit}/s", units / secs);
        p
    };
    timed("1 GiB file", 1024.0 * 1.048576, "MB");
    timed("1 GiB file, cached", 1024.0 * 1.048576, "MB");
    fs::remove_file(dir.path().join("big")).unwrap();
    for i in 0..10_000u64 {
        let sub = dir.path().join(format!("d{}", i / 100));
        fs::create_dir_all(&sub).unwrap();
        fs::write(sub.join(format!("f{i}")), data(500 + i % 8000, i as u8)).unwrap();
    }
    timed("10,000 small files", 10_000.0, "files");
    timed("10,000 small files, cached", 10_000.0, "files");
}

// ------------------------------------------------------------ the tree's edge (issue 9)

/// Bytes no published object may ever hold: they live outside the served tree.
const SECRET: &[u8] = b"TOP-SECRET outside the tree";

/// Writes the secrets into `outside`: one inlined, one of a block, one a level deeper.
/// Returns every hash that reading any of them would publish (leaves and whole-file BLAKE3).
fn write_secrets(outside: &Path) -> Vec<ObjectHash> {
    let block: Vec<u8> = SECRET.iter().copied().cycle().take(BS as usize).collect();
    fs::create_dir_all(outside.join("deeper")).unwrap();
    write(&outside.join("small"), SECRET, 0o600);
    write(&outside.join("block"), &block, 0o600);
    write(&outside.join("deeper/small"), SECRET, 0o600);
    vec![ObjectHash::of(SECRET), ObjectHash::of(&block)]
}

/// Panics if any object of `p` holds a secret's bytes or hashes, or a block source names a
/// path that is not plain names below the tree.
fn assert_nothing_from_outside(p: &Published, forbidden: &[ObjectHash]) {
    let holds = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    for (hash, Object { source, .. }) in &p.objects {
        assert!(!forbidden.contains(hash), "a secret's block is published");
        match source {
            Source::Memory(bytes) => {
                assert!(!holds(bytes, SECRET), "a secret is inlined in an object");
                for h in forbidden {
                    assert!(!holds(bytes, h.as_bytes()), "a secret's hash is published");
                }
            }
            Source::File { path, .. } => assert!(
                path.components().all(|c| matches!(c, Component::Normal(_))),
                "block source {} leaves the tree",
                path.display()
            ),
            Source::Bundle(members) => {
                for m in members.iter() {
                    assert!(!forbidden.contains(&m.hash), "a secret is bundled");
                    assert!(p.objects.contains_key(&m.hash), "a member is not published");
                }
            }
        }
    }
    for (path, _) in &p.skipped {
        assert!(path.starts_with(p.tree.dir_path()), "{}", path.display());
    }
}

/// Swaps `a` and `b` (RENAME_EXCHANGE) until `stop` is set; returns how many times.
fn swapper(a: PathBuf, b: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut swaps = 0;
        while !stop.load(Relaxed) {
            let flags = rustix::fs::RenameFlags::EXCHANGE;
            rustix::fs::renameat_with(rustix::fs::CWD, &a, rustix::fs::CWD, &b, flags).unwrap();
            swaps += 1;
        }
        swaps
    })
}

#[test]
fn symlinks_out_of_the_tree_are_published_as_symlinks() {
    let base = scratch();
    let (tree, outside) = (base.path().join("tree"), base.path().join("outside"));
    let forbidden = write_secrets(&outside);
    fs::create_dir(&tree).unwrap();
    write(&tree.join("inside"), &data(BS + 3, 1), 0o644);
    symlink(outside.join("block"), tree.join("to a file")).unwrap();
    symlink("../outside", tree.join("to a dir")).unwrap();
    let p = index_path(&tree, &config(None)).unwrap();
    assert_nothing_from_outside(&p, &forbidden);
    assert_eq!((p.files, p.symlinks, p.hashed_bytes), (1, 2, BS + 3));
    let root = Directory::decode(&load(&p, &p.root.hash)).unwrap();
    let targets: Vec<_> = root
        .entries
        .iter()
        .filter_map(|e| match &e.kind {
            EntryKind::Symlink(t) => Some(t.clone()),
            _ => None,
        })
        .collect();
    let block = outside.join("block").into_os_string().into_vec();
    assert_eq!(targets, [b"../outside".to_vec(), block], "in name order");
}

#[test]
fn a_block_is_never_read_again_through_a_symlink() {
    let base = scratch();
    let (tree, outside) = (base.path().join("tree"), base.path().join("outside"));
    fs::create_dir_all(tree.join("sub")).unwrap();
    fs::create_dir_all(&outside).unwrap();
    // The same bytes outside: the hash check alone would let them through.
    let bytes = data(2 * BS, 7);
    write(&tree.join("sub/f"), &bytes, 0o644);
    write(&outside.join("f"), &bytes, 0o600);
    let p = index_path(&tree, &config(None)).unwrap();
    let (hash, Object { source, .. }) = p
        .objects
        .iter()
        .find(|(_, o)| matches!(o.source, Source::File { .. }))
        .unwrap();
    assert!(read_block(&p.tree, source, hash).is_ok());
    fs::rename(tree.join("sub"), base.path().join("moved")).unwrap();
    symlink("../outside", tree.join("sub")).unwrap();
    let got = read_block(&p.tree, source, hash);
    assert!(
        matches!(got, Err(IndexError::Changed { .. })),
        "{:?}",
        got.map(|b| b.len())
    );
    let rel = Path::new("sub/f");
    for open in [
        p.tree.open_file(rel),
        beneath::open_by_components(p.tree.dir().as_fd(), rel),
        p.tree.open_file(Path::new("../outside/f")),
        beneath::open_by_components(p.tree.dir().as_fd(), Path::new("../outside/f")),
    ] {
        let e = open.unwrap_err();
        assert!(replaced(&e), "{e}");
    }
    // Directories (the watcher's opens) the same way; the tree itself for "".
    let root = p.tree.dir().as_fd();
    for rel in ["sub", "../outside", "sub/.."] {
        let e = beneath::open_dir_beneath(root, Path::new(rel)).unwrap_err();
        assert!(replaced(&e), "{rel}: {e}");
    }
    assert!(beneath::open_dir_beneath(root, Path::new("")).is_ok());
}

#[test]
fn swapping_a_directory_for_a_symlink_never_publishes_outside() {
    let base = scratch();
    let (tree, outside) = (base.path().join("tree"), base.path().join("outside"));
    let forbidden = write_secrets(&outside);
    // "sub" holds harmless files of the secrets' names; "alt" points outside. The swapper
    // exchanges the two as fast as it can while the tree is indexed again and again.
    fs::create_dir_all(tree.join("sub/deeper")).unwrap();
    for name in ["small", "block", "deeper/small"] {
        write(&tree.join("sub").join(name), &data(BS + 1, 3), 0o644);
    }
    symlink("../outside", tree.join("alt")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let swaps = swapper(tree.join("sub"), tree.join("alt"), stop.clone());
    let mut dirs_seen = 0;
    for _ in 0..300 {
        let p = index_path(&tree, &config(None)).unwrap();
        assert_nothing_from_outside(&p, &forbidden);
        dirs_seen += p.dirs;
    }
    stop.store(true, Relaxed);
    let swaps = swaps.join().unwrap();
    assert!(swaps > 300, "the swapper ran only {swaps} times");
    assert!(dirs_seen > 300, "the real directory was never published");
}

#[test]
fn fifos_sockets_and_devices_are_never_read() {
    let dir = scratch();
    let content = data(100, 4);
    write(&dir.path().join("file"), &content, 0o644);
    let _socket = std::os::unix::net::UnixListener::bind(dir.path().join("socket")).unwrap();
    let fifo = dir.path().join("fifo");
    let path = std::ffi::CString::new(fifo.clone().into_os_string().into_vec()).unwrap();
    // SAFETY: `path` is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o644) }, 0);
    // Bytes waiting in the fifo: whoever reads it takes them.
    let pending = File::options().read(true).write(true).open(&fifo).unwrap();
    (&pending).write_all(b"in the pipe").unwrap();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let zero = rustix::fs::FileType::CharacterDevice;
        let dev = rustix::fs::makedev(1, 5);
        let mode = rustix::fs::Mode::from_raw_mode(0o644);
        rustix::fs::mknodat(rustix::fs::CWD, dir.path().join("zero"), zero, mode, dev)
            .expect("root can make a device node");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let swaps = swapper(dir.path().join("file"), fifo.clone(), stop.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    let root = dir.path().to_path_buf();
    std::thread::spawn(move || {
        for _ in 0..100 {
            let p = index_path(&root, &config(None)).unwrap();
            let _ = tx.send(Directory::decode(&load(&p, &p.root.hash)).unwrap());
        }
    });
    for _ in 0..100 {
        let listing = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("indexing hung");
        // The one regular file may be seen under both names, each stat'ed at its own time.
        for entry in &listing.entries {
            assert!(
                matches!(&entry.kind, EntryKind::File(f) if f.content == Content::Inline(content.clone()))
            );
        }
    }
    stop.store(true, Relaxed);
    assert!(swaps.join().unwrap() > 0);
    let mut left = vec![0u8; 64];
    let n = io::Read::read(&mut &pending, &mut left).unwrap();
    assert_eq!(&left[..n], b"in the pipe", "the fifo was read");
}

// ------------------------------------------------------------ .lcfsignore (issue 10)

/// The names in directory object `dir`.
fn names(p: &Published, dir: &ObjectHash) -> Vec<String> {
    let decoded = Directory::decode(&load(p, dir)).unwrap();
    decoded
        .entries
        .iter()
        .map(|e| String::from_utf8_lossy(&e.name).into_owned())
        .collect()
}

/// The object of subdirectory `name` of directory object `dir`.
fn subdir(p: &Published, dir: &ObjectHash, name: &str) -> ObjectHash {
    let decoded = Directory::decode(&load(p, dir)).unwrap();
    let entry = decoded.entries.iter().find(|e| e.name == name.as_bytes());
    match entry.map(|e| &e.kind) {
        Some(EntryKind::Dir(r)) => r.hash,
        other => panic!("{name} is no directory: {other:?}"),
    }
}

#[test]
fn lcfsignore_keeps_paths_out() {
    let dir = scratch();
    let root = dir.path();
    fs::create_dir_all(root.join("build/deep")).unwrap();
    fs::create_dir_all(root.join("sub")).unwrap();
    for f in [
        "keep",
        "id.key",
        "a.tmp",
        "build/out",
        "build/deep/x",
        "sub/id.key",
    ] {
        write(&root.join(f), &data(BS + 3, 1), 0o644);
    }
    write(&root.join("sub/keep.tmp"), b"kept", 0o644);
    write(
        &root.join("sub/anchored"),
        b"kept: the pattern is anchored",
        0o644,
    );
    write(&root.join("anchored"), b"left out", 0o644);
    let rules = "# secrets\n*.key\nbuild/\n*.tmp\n!keep.tmp\n/anchored\n";
    write(&root.join(IGNORE_FILE), rules.as_bytes(), 0o644);
    let p = index_path(root, &config(None)).unwrap();
    assert_eq!(names(&p, &p.root.hash), ["keep", "sub"]);
    let sub = subdir(&p, &p.root.hash, "sub");
    assert_eq!(names(&p, &sub), ["anchored", "keep.tmp"]);
    assert_eq!((p.files, p.dirs), (3, 2));
    check_objects(&p);
    for (change, ignored) in [
        ("build/deep/new", true),
        ("sub/x.tmp", true),
        ("sub/keep.tmp", false),
        ("keep", false),
        (IGNORE_FILE, false),
        ("", false),
    ] {
        assert_eq!(
            p.ignore.change_is_ignored(Path::new(change)),
            ignored,
            "{change}"
        );
    }
}

#[test]
fn an_unusable_ignore_file_stops_the_index() {
    let dir = scratch();
    write(&dir.path().join("f"), b"x", 0o644);
    let ignore = dir.path().join(IGNORE_FILE);
    let cases: [(&str, &dyn Fn()); 4] = [
        ("a symlink", &|| symlink("/etc/hostname", &ignore).unwrap()),
        ("not UTF-8", &|| fs::write(&ignore, b"\xff\xfe\n").unwrap()),
        ("a bad pattern", &|| {
            fs::write(&ignore, b"ok\n{unclosed\n").unwrap()
        }),
        ("a directory", &|| fs::create_dir(&ignore).unwrap()),
    ];
    for (what, make) in cases {
        make();
        let err = index_path(dir.path(), &config(None)).unwrap_err();
        assert!(
            matches!(err, IndexError::IgnoreFile { .. }),
            "{what}: {err}"
        );
        let _ = fs::remove_file(&ignore).or_else(|_| fs::remove_dir(&ignore));
    }
    let p = index_path(dir.path(), &config(None)).unwrap();
    assert_eq!(names(&p, &p.root.hash), ["f"]);
}

/// Every object a published directory names, recursively, is in `p.objects`.
fn assert_complete(p: &Published, dir: &ObjectHash) {
    assert!(p.objects.contains_key(dir), "directory object missing");
    let decoded = Directory::decode(&load(p, dir)).unwrap();
    for entry in &decoded.entries {
        match &entry.kind {
            EntryKind::Dir(r) => assert_complete(p, &r.hash),
            EntryKind::File(f) => match &f.content {
                Content::Inline(_) => {}
                Content::Block(leaf) => assert!(p.objects.contains_key(leaf)),
                Content::Index { index, first_leaf } => {
                    assert!(p.objects.contains_key(first_leaf));
                    let source = &p.objects[&index.hash].source;
                    let Source::Memory(bytes) = source else {
                        panic!("index not in memory")
                    };
                    match FileIndex::decode(bytes).unwrap() {
                        FileIndex::Leaves(l) => {
                            assert!(l.iter().all(|h| p.objects.contains_key(h)))
                        }
                        FileIndex::Pages(pages) => {
                            assert!(pages.iter().all(|h| p.objects.contains_key(h)))
                        }
                    }
                }
            },
            EntryKind::Symlink(_) => {}
        }
    }
}

/// Issue 10's "bad input": a tree that changes faster than it can be indexed. Every walk
/// still gives a generation in which each directory entry names objects that were built.
#[test]
fn a_tree_changing_while_indexed_is_never_published_inconsistently() {
    let (dir, state) = (scratch(), scratch());
    let root = dir.path().to_path_buf();
    for i in 0..20 {
        write(
            &root.join(format!("f{i}")),
            &data(BS * 3 + i, i as u8),
            0o644,
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let (root, stop) = (root.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Relaxed) {
                let (i, d) = (n % 20, root.join(format!("d{}", n % 3)));
                let _ = fs::create_dir_all(&d);
                let tmp = root.join(format!(".tmp{i}"));
                fs::write(&tmp, data(BS * (1 + n % 4), n as u8)).unwrap();
                let _ = fs::rename(&tmp, d.join(format!("f{i}")));
                let _ = fs::write(root.join(format!("f{i}")), data(BS * 2 + n, 7));
                let _ = fs::remove_dir_all(root.join(format!("d{}", (n + 1) % 3)));
                n += 1;
            }
            n
        })
    };
    let tree = Arc::new(Tree::open(&root).unwrap());
    for _ in 0..30 {
        let p = index_tree(&tree, &config(Some(state.path()))).unwrap();
        assert_complete(&p, &p.root.hash);
    }
    stop.store(true, Relaxed);
    assert!(churn.join().unwrap() > 30, "the tree hardly changed");
}

/// The server follows the directory it opened (issue 9) and must tell when PATH names another
/// one, or when the directory is deleted (then a walk would find it empty).
#[test]
fn a_moved_repointed_or_deleted_tree_is_noticed() {
    let dir = scratch();
    let (v1, v2, current) = (
        dir.path().join("v1"),
        dir.path().join("v2"),
        dir.path().join("current"),
    );
    for v in [&v1, &v2] {
        fs::create_dir(v).unwrap();
        write(&v.join("f"), b"x", 0o644);
    }
    symlink("v1", &current).unwrap();
    let tree = Tree::open(&current).unwrap();
    assert!(!tree.moved() && !tree.is_deleted());
    fs::remove_file(&current).unwrap();
    symlink("v2", &current).unwrap();
    assert!(tree.moved(), "repointed");
    let by_name = Tree::open(&v1).unwrap();
    fs::rename(&v1, dir.path().join("v1.old")).unwrap();
    assert!(by_name.moved() && !by_name.is_deleted(), "moved away");
    fs::remove_dir_all(dir.path().join("v1.old")).unwrap();
    assert!(tree.is_deleted() && by_name.is_deleted());
}

/// Issue 10's figure: republishing a 10,000-file tree after a one-file change, against its
/// first index. `cargo test --lib serve::index::tests::republish_speed -- --ignored --nocapture`
#[test]
#[ignore = "benchmark: writes 10,000 files to /dev/shm"]
fn republish_speed() {
    use crate::serve::table::Table;
    let (dir, state) = (scratch(), scratch());
    let config = IndexConfig {
        state_dir: Some(state.path().into()),
        ..Default::default()
    };
    for i in 0..10_000u64 {
        let sub = dir.path().join(format!("d{}", i / 100));
        fs::create_dir_all(&sub).unwrap();
        fs::write(sub.join(format!("f{i}")), data(500 + i % 16000, i as u8)).unwrap();
    }
    let tree = Arc::new(Tree::open(dir.path()).unwrap());
    let timed = |what: &str| {
        let start = std::time::Instant::now();
        let p = index_tree(&tree, &config).unwrap();
        println!(
            "{what}: {:.1} ms, {} bytes hashed",
            start.elapsed().as_secs_f64() * 1e3,
            p.hashed_bytes
        );
        p
    };
    let record = crate::serve::table::test_record;
    let first = timed("first index, 10,000 files");
    let table = Table::new(
        crate::wire::channel::Channel::new("b", None),
        first.clone(),
        record(&first, 1),
    );
    timed("unchanged, leaf cache");
    fs::write(dir.path().join("d42/f4242"), data(7000, 1)).unwrap();
    let changed = timed("one file changed");
    let start = std::time::Instant::now();
    let next = table.next(
        changed.clone(),
        record(&changed, 2),
        std::time::Instant::now(),
    );
    println!(
        "new table: {:.1} ms, {:?} new objects",
        start.elapsed().as_secs_f64() * 1e3,
        next.new_since(Some(&table))
    );
}

/// A rescan that finds the root it was given makes no block objects and says what it
/// skipped; one that finds another root publishes what a plain index does.
#[test]
fn an_unchanged_root_is_found_without_making_block_objects() {
    let dir = scratch();
    build_tree(dir.path());
    std::os::unix::net::UnixListener::bind(dir.path().join("sock")).unwrap();
    let tree = Arc::new(Tree::open(dir.path()).unwrap());
    let first = index_tree(&tree, &config(None)).unwrap();
    assert_eq!(first.skipped.len(), 1, "{:?}", first.skipped);
    match index_tree_unless(&tree, &config(None), first.root).unwrap() {
        Err(Unchanged { skipped, .. }) => assert_eq!(skipped, first.skipped),
        Ok(_) => panic!("the same tree gave another root"),
    }
    write(&dir.path().join("new"), &data(3 * BS, 7), 0o644);
    let Ok(second) = index_tree_unless(&tree, &config(None), first.root).unwrap() else {
        panic!("a changed tree gave the same root");
    };
    let again = index_tree(&tree, &config(None)).unwrap();
    assert_eq!(second.root, again.root);
    let mut keys: Vec<_> = second.objects.keys().collect();
    let mut want: Vec<_> = again.objects.keys().collect();
    keys.sort_by_key(|h| *h.as_bytes());
    want.sort_by_key(|h| *h.as_bytes());
    assert_eq!(keys, want);
    check_objects(&second);
}
