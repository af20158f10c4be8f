//! Test trees: [`make_edge_tree`] builds, deterministically from a seed, a tree
//! full of the cases a copy gets wrong (empty files, block boundaries, repeated
//! blocks, a large file, many small files, deep nesting, odd names, every kind of
//! symlink, executables, read-only files and directories, mtimes with
//! nanoseconds); [`assert_trees_equal`] compares two trees entry by entry.
#![allow(dead_code)]

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use std::collections::BTreeMap;
use std::ffi::{CString, OsString};
use std::fs::{self, File, Metadata};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The block size lcfs uses by default.
pub const BLOCK: usize = 65536;
/// Size of the large random file in the edge tree (not block aligned).
pub const LARGE_FILE_SIZE: usize = 24 * 1024 * 1024 + 777;
/// Number of small files in the edge tree's `many/` directory.
pub const MANY_FILES: usize = 1500;
/// Depth of the edge tree's `nest/` chain.
pub const NEST_DEPTH: usize = 20;
/// A 250-byte file name used in the edge tree (`names/<this>`).
pub fn long_name() -> String {
    let name = format!("long_{}.txt", "x".repeat(241));
    assert_eq!(name.len(), 250);
    name
}

fn random_bytes(rng: &mut StdRng, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill_bytes(&mut v);
    v
}

fn write_file(path: &Path, data: &[u8]) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)
            .unwrap_or_else(|e| panic!("create_dir_all {}: {e}", parent.display()));
    }
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(data)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Writes `size` random bytes to `path`, in 1 MiB chunks.
pub fn write_random_file(path: &Path, rng: &mut StdRng, size: usize) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let mut left = size;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let n = left.min(buf.len());
        rng.fill_bytes(&mut buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        left -= n;
    }
}

fn mkdir(path: &Path) {
    fs::create_dir_all(path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
}

fn link(target: &str, at: &Path) {
    symlink(target, at).unwrap_or_else(|e| panic!("symlink {} -> {target}: {e}", at.display()));
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {:o} {}: {e}", mode, path.display()));
}

/// Sets atime and mtime of `path` itself (never following a symlink).
pub fn set_mtime(path: &Path, secs: i64, nanos: i64) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let ts = libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: nanos as _,
    };
    let times = [ts, ts];
    // SAFETY: c is a valid NUL-terminated path, times points to two timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert!(
        r == 0,
        "utimensat {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// Sorted entries of a directory.
fn sorted_entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

/// Gives every entry under `dir` (not `dir` itself) a random mtime with
/// nanoseconds, children before their directory so that nothing changes a
/// directory's mtime after it is set.
fn stamp_mtimes(dir: &Path, rng: &mut StdRng) {
    for p in sorted_entries(dir) {
        let m = fs::symlink_metadata(&p).unwrap();
        if m.is_dir() {
            stamp_mtimes(&p, rng);
        }
        let secs = rng.random_range(1_000_000_000i64..1_700_000_000);
        // some whole seconds, most with nanoseconds
        let nanos = if rng.random_range(0..8) == 0 {
            0
        } else {
            rng.random_range(1i64..1_000_000_000)
        };
        set_mtime(&p, secs, nanos);
    }
}

/// Builds the edge-case tree under `root` (created if missing; should be empty).
/// The same seed gives the same tree (content, names, modes, mtimes).
///
/// Layout:
/// - `empty`, `.hidden`, `empty_dir/`, `sub/empty2`: empty things
/// - `one_block.bin` (65536 B), `one_block_plus_one.bin` (65537 B), `one_block_minus_one.bin`
/// - `repeated.bin`: 16 identical 64 KiB blocks; `repeated_tail.bin`: 8 of another block + 100 B
/// - `large.bin`: [`LARGE_FILE_SIZE`] random bytes
/// - `many/f0000.txt` .. `f1499.txt`: 100 B to 3 KiB each
/// - `nest/l01/.../l20/bottom.txt` and a file at every level
/// - `names/`: spaces, unicode, a 250-byte name, a unicode directory
/// - `links/`: relative, absolute, dangling, to a directory, chained
/// - `perms/`: `run.sh` 0755, `readonly.txt` 0444, `private.txt` 0600, `ro_dir/` 0555 with files
/// - `misc/sub/`: a small mixed subtree (for subpath copies)
pub fn make_edge_tree(root: &Path, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    mkdir(root);

    // empty things
    write_file(&root.join("empty"), b"");
    write_file(&root.join(".hidden"), b"hidden file\n");
    mkdir(&root.join("empty_dir"));
    write_file(&root.join("sub/empty2"), b"");

    // block boundaries
    let b = random_bytes(&mut rng, BLOCK);
    write_file(&root.join("one_block.bin"), &b);
    let b = random_bytes(&mut rng, BLOCK + 1);
    write_file(&root.join("one_block_plus_one.bin"), &b);
    let b = random_bytes(&mut rng, BLOCK - 1);
    write_file(&root.join("one_block_minus_one.bin"), &b);

    // repeated blocks
    let block = random_bytes(&mut rng, BLOCK);
    let mut rep = Vec::with_capacity(16 * BLOCK);
    for _ in 0..16 {
        rep.extend_from_slice(&block);
    }
    write_file(&root.join("repeated.bin"), &rep);
    let block2 = random_bytes(&mut rng, BLOCK);
    let mut rep2 = Vec::with_capacity(8 * BLOCK + 100);
    for _ in 0..8 {
        rep2.extend_from_slice(&block2);
    }
    rep2.extend_from_slice(&random_bytes(&mut rng, 100));
    write_file(&root.join("repeated_tail.bin"), &rep2);

    // a large random file
    write_random_file(&root.join("large.bin"), &mut rng, LARGE_FILE_SIZE);

    // many small files
    let many = root.join("many");
    mkdir(&many);
    for i in 0..MANY_FILES {
        let n = rng.random_range(100..=3072);
        let data = random_bytes(&mut rng, n);
        write_file(&many.join(format!("f{i:04}.txt")), &data);
    }

    // deep nesting
    let mut dir = root.join("nest");
    for level in 1..=NEST_DEPTH {
        dir = dir.join(format!("l{level:02}"));
        mkdir(&dir);
        let n = rng.random_range(10..200);
        let data = random_bytes(&mut rng, n);
        write_file(&dir.join(format!("at_{level:02}.dat")), &data);
    }
    write_file(&dir.join("bottom.txt"), b"the bottom of the nest\n");

    // names
    let names = root.join("names");
    mkdir(&names);
    write_file(&names.join("with spaces in it.txt"), b"spaces\n");
    write_file(&names.join(" leading and trailing "), b"more spaces\n");
    write_file(&names.join("naïve café ☕.txt"), "unicode ☕\n".as_bytes());
    write_file(&names.join("日本語のファイル名.txt"), "日本語\n".as_bytes());
    let data = random_bytes(&mut rng, 5000);
    write_file(&names.join(long_name()), &data);
    write_file(&names.join("Ωμέγα dir/inner file.txt"), b"inner\n");
    write_file(&names.join("odd'chars\"&$#!(){}[].txt"), b"odd\n");

    // symlinks
    let links = root.join("links");
    mkdir(&links);
    link("../one_block.bin", &links.join("relative"));
    link("/etc/hostname", &links.join("absolute"));
    link("no/such/target", &links.join("dangling"));
    link("../nest/l01", &links.join("to_dir"));
    link("relative", &links.join("chained"));
    link("../names/naïve café ☕.txt", &links.join("to unicode"));
    link(
        "/nonexistent/absolute/dangling",
        &links.join("absolute_dangling"),
    );

    // permissions
    let perms = root.join("perms");
    mkdir(&perms);
    write_file(&perms.join("run.sh"), b"#!/bin/sh\necho hello from lcfs\n");
    chmod(&perms.join("run.sh"), 0o755);
    let data = random_bytes(&mut rng, 70_000);
    write_file(&perms.join("readonly.txt"), &data);
    chmod(&perms.join("readonly.txt"), 0o444);
    write_file(&perms.join("private.txt"), b"secret-ish\n");
    chmod(&perms.join("private.txt"), 0o600);
    write_file(&perms.join("group_exec"), b"#!/bin/sh\n");
    chmod(&perms.join("group_exec"), 0o750);
    let ro = perms.join("ro_dir");
    mkdir(&ro);
    write_file(&ro.join("inside.txt"), b"in a read-only directory\n");
    let data = random_bytes(&mut rng, BLOCK * 2 + 3);
    write_file(&ro.join("inside_big.bin"), &data);
    chmod(&ro.join("inside_big.bin"), 0o444);
    chmod(&ro, 0o555);

    // a small mixed subtree
    let sub = root.join("misc/sub");
    mkdir(&sub);
    write_file(&sub.join("a.txt"), b"alpha\n");
    let data = random_bytes(&mut rng, 3 * BLOCK + 17);
    write_file(&sub.join("b.bin"), &data);
    write_file(&sub.join("deeper/c.txt"), b"gamma\n");
    write_file(&sub.join("deeper/empty"), b"");
    link("deeper/c.txt", &sub.join("link_to_c"));
    chmod(&sub.join("a.txt"), 0o640);
    write_file(&root.join("misc/outside.txt"), b"not in misc/sub\n");

    stamp_mtimes(root, &mut rng);
}

/// Sum of the sizes of every regular file under `root`.
pub fn tree_file_bytes(root: &Path) -> u64 {
    let mut total = 0;
    for p in sorted_entries(root) {
        let m = fs::symlink_metadata(&p).unwrap();
        if m.is_dir() {
            total += tree_file_bytes(&p);
        } else if m.is_file() {
            total += m.len();
        }
    }
    total
}

/// Number of regular files under `root`.
pub fn tree_file_count(root: &Path) -> u64 {
    let mut total = 0;
    for p in sorted_entries(root) {
        let m = fs::symlink_metadata(&p).unwrap();
        if m.is_dir() {
            total += tree_file_count(&p);
        } else if m.is_file() {
            total += 1;
        }
    }
    total
}

/// Every path under `root` (files, dirs, symlinks), relative, sorted.
pub fn list_tree(root: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, rel: &Path, out: &mut Vec<PathBuf>) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        let mut names: Vec<OsString> = rd.map(|e| e.unwrap().file_name()).collect();
        names.sort();
        for n in names {
            let p = dir.join(&n);
            let r = rel.join(&n);
            out.push(r.clone());
            if fs::symlink_metadata(&p)
                .map(|m| m.is_dir())
                .unwrap_or(false)
            {
                walk(&p, &r, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, Path::new(""), &mut out);
    out
}

const MAX_REPORTED: usize = 40;

struct Diffs {
    list: Vec<String>,
    total: usize,
}

impl Diffs {
    fn push(&mut self, s: String) {
        self.total += 1;
        if self.list.len() < MAX_REPORTED {
            self.list.push(s);
        }
    }
}

fn kind(m: &Metadata) -> &'static str {
    let ft = m.file_type();
    if ft.is_symlink() {
        "symlink"
    } else if ft.is_dir() {
        "dir"
    } else if ft.is_file() {
        "file"
    } else {
        "special"
    }
}

fn list_dir(dir: &Path) -> BTreeMap<OsString, ()> {
    fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| (e.unwrap().file_name(), ()))
        .collect()
}

/// First offset at which two files differ, if they do.
fn first_difference(a: &Path, b: &Path) -> Option<u64> {
    let mut fa = File::open(a).unwrap_or_else(|e| panic!("open {}: {e}", a.display()));
    let mut fb = File::open(b).unwrap_or_else(|e| panic!("open {}: {e}", b.display()));
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba);
        let nb = read_full(&mut fb, &mut bb);
        let n = na.min(nb);
        if let Some(i) = (0..n).find(|&i| ba[i] != bb[i]) {
            return Some(off + i as u64);
        }
        if na != nb {
            return Some(off + n as u64);
        }
        if na == 0 {
            return None;
        }
        off += na as u64;
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    n
}

/// Compares two entries (kind, permission bits, mtime, size, content, link target).
fn compare_entry(a: &Path, b: &Path, rel: &Path, diffs: &mut Diffs) {
    let ma = fs::symlink_metadata(a).unwrap_or_else(|e| panic!("lstat {}: {e}", a.display()));
    let mb = match fs::symlink_metadata(b) {
        Ok(m) => m,
        Err(e) => {
            diffs.push(format!("- {}: missing in copy ({e})", rel.display()));
            return;
        }
    };
    let (ka, kb) = (kind(&ma), kind(&mb));
    if ka != kb {
        diffs.push(format!("! {}: kind {ka} != {kb}", rel.display()));
        return;
    }
    let (pa, pb) = (ma.mode() & 0o7777, mb.mode() & 0o7777);
    if pa != pb {
        diffs.push(format!("! {}: mode {pa:04o} != {pb:04o}", rel.display()));
    }
    let (ta, tb) = ((ma.mtime(), ma.mtime_nsec()), (mb.mtime(), mb.mtime_nsec()));
    if ta != tb {
        diffs.push(format!(
            "! {}: {ka} mtime {}.{:09} != {}.{:09}",
            rel.display(),
            ta.0,
            ta.1,
            tb.0,
            tb.1
        ));
    }
    match ka {
        "symlink" => {
            let (la, lb) = (fs::read_link(a).unwrap(), fs::read_link(b).unwrap());
            if la != lb {
                diffs.push(format!(
                    "! {}: link target {:?} != {:?}",
                    rel.display(),
                    la,
                    lb
                ));
            }
        }
        "file" => {
            if ma.len() != mb.len() {
                diffs.push(format!(
                    "! {}: size {} != {}",
                    rel.display(),
                    ma.len(),
                    mb.len()
                ));
            }
            if let Some(off) = first_difference(a, b) {
                diffs.push(format!(
                    "! {}: content differs from byte {off} (block {})",
                    rel.display(),
                    off / BLOCK as u64
                ));
            }
        }
        _ => {}
    }
}

fn compare_dir(a: &Path, b: &Path, rel: &Path, diffs: &mut Diffs) {
    let la = list_dir(a);
    let lb = list_dir(b);
    let mut names: Vec<&OsString> = la.keys().chain(lb.keys()).collect();
    names.sort();
    names.dedup();
    for name in names {
        let r = rel.join(name);
        match (la.contains_key(name), lb.contains_key(name)) {
            (true, false) => diffs.push(format!("- {}: missing in copy", r.display())),
            (false, true) => diffs.push(format!("+ {}: extra in copy", r.display())),
            _ => {
                let (pa, pb) = (a.join(name), b.join(name));
                compare_entry(&pa, &pb, &r, diffs);
                let both_dirs = fs::symlink_metadata(&pa)
                    .map(|m| m.is_dir())
                    .unwrap_or(false)
                    && fs::symlink_metadata(&pb)
                        .map(|m| m.is_dir())
                        .unwrap_or(false);
                if both_dirs {
                    compare_dir(&pa, &pb, &r, diffs);
                }
            }
        }
    }
}

fn report(what: &str, a: &Path, b: &Path, diffs: Diffs) {
    if diffs.total == 0 {
        return;
    }
    let mut msg = format!(
        "{what} differ: source {} vs copy {}: {} mismatch(es){}\n",
        a.display(),
        b.display(),
        diffs.total,
        if diffs.total > diffs.list.len() {
            format!(", first {}", diffs.list.len())
        } else {
            String::new()
        }
    );
    for d in &diffs.list {
        msg.push_str("  ");
        msg.push_str(d);
        msg.push('\n');
    }
    panic!("{msg}");
}

/// Panics, listing the first mismatches, unless the trees under `a` and `b` are
/// identical: same names, kinds, content, permission bits, mtimes (with
/// nanoseconds, for files, dirs and symlinks) and link targets. The attributes
/// of `a` and `b` themselves are not compared.
pub fn assert_trees_equal(a: &Path, b: &Path) {
    assert!(
        fs::symlink_metadata(b).map(|m| m.is_dir()).unwrap_or(false),
        "copy {} is not a directory (source {})",
        b.display(),
        a.display()
    );
    let mut diffs = Diffs {
        list: Vec::new(),
        total: 0,
    };
    compare_dir(a, b, Path::new(""), &mut diffs);
    report("trees", a, b, diffs);
}

/// Like [`assert_trees_equal`] for one entry (a file or symlink): kind, mode,
/// mtime, content or target.
pub fn assert_entries_equal(a: &Path, b: &Path) {
    let mut diffs = Diffs {
        list: Vec::new(),
        total: 0,
    };
    let name = PathBuf::from(b.file_name().unwrap_or_default());
    compare_entry(a, b, &name, &mut diffs);
    report("entries", a, b, diffs);
}

/// `len` bytes from a generator seeded with `seed`.
pub fn seeded(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// The BLAKE3 of `bytes`, as an array.
pub fn b3(bytes: &[u8]) -> [u8; 32] {
    *blake3::hash(bytes).as_bytes()
}

/// Where the object named `hash` lives in a cache directory (`CACHE/objects/ab/<hash>`).
pub fn object_path(cache: &Path, hash: &blake3::Hash) -> PathBuf {
    let hex = hash.to_hex();
    cache.join("objects").join(&hex[..2]).join(hex.as_str())
}
