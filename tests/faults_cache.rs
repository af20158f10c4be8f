//! The cache rows of issue 12's fault matrix, in the namespace lab: what a user is promised
//! when the cache directory is damaged, lost, full or too small. Needs root, /dev/fuse and
//! tmpfs. Run with `cargo test --test faults_cache -- --test-threads=1` on a small machine.
//!
//! - Object files flipped, truncated, emptied, deleted or replaced while a mount runs, and
//!   while it is stopped: detected on read, fetched again, never a wrong byte; with the server
//!   gone, an offline mount answers EIO for exactly those files, while untouched cached files
//!   (and the untouched blocks of damaged ones) still read.
//! - The sled index deleted or turned to garbage while nothing runs: rebuilt at the next
//!   start from the object files, whose bytes are then read from the cache, not the network;
//!   pins either survive or the loss is reported.
//! - The cache's file system full (a small tmpfs): reads through a mount keep working, and
//!   new data still gets into the cache by evicting the oldest; when nothing can be evicted
//!   (pinned) reads are served from memory, and no pin is ever lost to a full disk (a mount
//!   started on it works or fails saying ENOSPC); a `lcfs copy` whose DEST fills up fails
//!   with ENOSPC naming the path.
//! - `--cache-size` far below what is read: reads stay correct, the object files stay
//!   within the quota plus one block, and what `lcfs prefetch --pin` pinned is never evicted.
//!
//! A block of a file is the cache object named by the BLAKE3 of its bytes, at
//! `CACHE/objects/<first 2 hex digits>/<64 hex digits>`: the tests damage and count those
//! files directly. Every tmpfs, mount and process a test makes is removed by a guard, also
//! when it fails.

mod common;

use common::lab::Lab;
use common::lcfs::{
    bounded, describe, is_mountpoint, s, spawn_copy, spawn_copy_with, start_server, tail, tmpdir,
    within, Mount, IFACE, LCFS,
};
use common::tree::{assert_trees_equal, object_path, tree_file_bytes, write_random_file, BLOCK};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const MIB: usize = 1024 * 1024;
/// `--timeout` of receivers while the server runs: far above what a fetch here needs.
const TIMEOUT: u32 = 20;
/// `--timeout` of an offline mount: how long a read of what is not cached waits for EIO.
const OFFLINE_TIMEOUT: u32 = 3;
/// Longest wait for one read through a mount, or one command.
const LIMIT: Duration = Duration::from_secs(60);
/// The channel every test serves.
const CHANNEL: &str = "faults";

// ---------------------------------------------------------------- files and blocks

/// A file of the published tree: where it is, and its bytes (block `i` is the cache object
/// named by the BLAKE3 of `data[i * BLOCK..]`, one block long or shorter at the end).
#[derive(Clone)]
struct Published {
    rel: String,
    data: Vec<u8>,
}

impl Published {
    /// Writes `size` seeded random bytes at `src/rel`.
    fn write(src: &Path, rel: &str, seed: u64, size: usize) -> Published {
        let path = src.join(rel);
        write_random_file(&path, &mut StdRng::seed_from_u64(seed), size);
        Published {
            rel: rel.to_string(),
            data: fs::read(&path).unwrap(),
        }
    }

    fn blocks(&self) -> usize {
        self.data.len().div_ceil(BLOCK)
    }

    fn block(&self, i: usize) -> &[u8] {
        &self.data[i * BLOCK..((i + 1) * BLOCK).min(self.data.len())]
    }

    /// The object file of block `i` in `cache`.
    fn object(&self, cache: &Path, i: usize) -> PathBuf {
        object_path(cache, &blake3::hash(self.block(i)))
    }

    /// Blocks whose object file is missing from `cache` or does not hold the block.
    fn blocks_not_cached(&self, cache: &Path) -> Vec<usize> {
        (0..self.blocks())
            .filter(|&i| fs::read(self.object(cache, i)).ok().as_deref() != Some(self.block(i)))
            .collect()
    }
}

/// The object files of a cache directory: how many, their real disk use (allocated blocks,
/// which is what the quota counts) and their sizes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ObjectFiles {
    count: u64,
    disk: u64,
    bytes: u64,
}

fn object_files(cache: &Path) -> ObjectFiles {
    let mut o = ObjectFiles::default();
    let Ok(fans) = fs::read_dir(cache.join("objects")) else {
        return o;
    };
    for fan in fans.filter_map(Result::ok) {
        let Ok(files) = fs::read_dir(fan.path()) else {
            continue;
        };
        for f in files.filter_map(Result::ok) {
            if let Ok(m) = f.metadata() {
                o.count += 1;
                o.disk += m.blocks() * 512;
                o.bytes += m.len();
            }
        }
    }
    o
}

/// [`object_files`] once two walks in a row agree (a walk during inserts and evictions can
/// count a file that is gone by its end), within 10 s.
fn object_files_settled(cache: &Path) -> ObjectFiles {
    let mut last = object_files(cache);
    let mut now = last;
    within(Duration::from_secs(10), || {
        std::thread::sleep(Duration::from_millis(100));
        now = object_files(cache);
        std::mem::replace(&mut last, now) == now
    });
    now
}

// ---------------------------------------------------------------- damage

/// What is done to an object file.
#[derive(Clone, Copy, Debug)]
enum Damage {
    /// One bit flipped in the middle.
    Flip,
    /// Cut to half its length.
    Truncate,
    /// Cut to zero bytes.
    Empty,
    /// Deleted.
    Delete,
    /// Overwritten with another object's (valid) bytes.
    Replace,
}

/// Damages the object file `path`; `other` is another object file (for [`Damage::Replace`]).
fn damage(path: &Path, how: Damage, other: &Path) {
    let what = format!("{how:?} {}", path.display());
    let len = fs::metadata(path)
        .unwrap_or_else(|e| panic!("{what}: the object file is not there to damage: {e}"))
        .len();
    match how {
        Damage::Flip => {
            let mut b = fs::read(path).unwrap();
            let at = b.len() / 2;
            b[at] ^= 0x10;
            fs::write(path, b)
        }
        Damage::Truncate => fs::OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.set_len(len / 2)),
        Damage::Empty => fs::OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.set_len(0)),
        Damage::Delete => fs::remove_file(path),
        Damage::Replace => fs::copy(other, path).map(drop),
    }
    .unwrap_or_else(|e| panic!("{what}: {e}"));
}

/// One damaged block: which file, which block, how.
struct Damaged<'a> {
    file: &'a Published,
    block: usize,
    how: Damage,
}

impl Damaged<'_> {
    fn new(file: &Published, block: usize, how: Damage) -> Damaged<'_> {
        Damaged { file, block, how }
    }

    fn apply(&self, cache: &Path) {
        // another block of the same file: a valid object, under the wrong name
        let other = self
            .file
            .object(cache, (self.block + 1) % self.file.blocks());
        damage(&self.file.object(cache, self.block), self.how, &other);
    }

    fn hex(&self) -> String {
        blake3::hash(self.file.block(self.block))
            .to_hex()
            .to_string()
    }

    fn describe(&self) -> String {
        format!("{} block {} ({:?})", self.file.rel, self.block, self.how)
    }
}

// ---------------------------------------------------------------- reading

/// Drops the page cache of the whole machine, so that the next read of a mounted file asks
/// the mount again (it keeps pages with FOPEN_KEEP_CACHE).
fn drop_page_cache() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    fs::write("/proc/sys/vm/drop_caches", b"3\n")
        .unwrap_or_else(|e| panic!("cannot drop the page cache via /proc/sys/vm/drop_caches: {e}"));
}

/// Reads `path` whole on a thread, within [`LIMIT`]; returns the result and how long it took.
fn read_timed(path: &Path) -> (io::Result<Vec<u8>>, Duration) {
    let p = path.to_path_buf();
    let t = Instant::now();
    let r = bounded(&format!("reading {}", path.display()), LIMIT, move || {
        fs::read(p)
    });
    (r, t.elapsed())
}

/// Reads `len` bytes at `off` of `path` (fewer at EOF) on a thread, within [`LIMIT`].
fn pread_timed(path: &Path, off: u64, len: usize) -> (io::Result<Vec<u8>>, Duration) {
    let p = path.to_path_buf();
    let t = Instant::now();
    let r = bounded(&format!("pread of {}", path.display()), LIMIT, move || {
        let f = fs::File::open(p)?;
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            let n = f.read_at(&mut buf[got..], off + got as u64)?;
            if n == 0 {
                break;
            }
            got += n;
        }
        buf.truncate(got);
        Ok(buf)
    });
    (r, t.elapsed())
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

fn assert_bytes_equal(what: &str, got: &[u8], want: &[u8]) {
    if let Some(i) = first_difference(got, want) {
        panic!(
            "{what}: got {} bytes, want {}; first difference at byte {i} (block {})",
            got.len(),
            want.len(),
            i / BLOCK
        );
    }
}

/// Reads `file` through the mount `m`: panics unless it gives exactly the published bytes.
fn read_ok(m: &Mount, file: &Published) -> Duration {
    let (r, took) = read_timed(&m.path().join(&file.rel));
    let got = r.unwrap_or_else(|e| {
        panic!(
            "reading {} through the mount failed after {:.1} s: {e}\n--- mount log (tail) ---\n{}",
            file.rel,
            took.as_secs_f64(),
            tail(&m.log_text(), 40)
        )
    });
    assert_bytes_equal(&format!("{} through the mount", file.rel), &got, &file.data);
    took
}

/// `getxattr(2)` as a string; panics with the errno when it fails.
fn xattr(path: &Path, name: &str) -> String {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid C strings; buf is writable for buf.len() bytes.
    let got = unsafe {
        libc::getxattr(
            p.as_ptr(),
            n.as_ptr(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
        )
    };
    assert!(
        got >= 0,
        "getxattr({}, {name}) failed: {}",
        path.display(),
        io::Error::last_os_error()
    );
    buf.truncate(got as usize);
    String::from_utf8(buf).unwrap_or_else(|e| panic!("{name} is not UTF-8: {e}"))
}

/// The mount's `user.lcfs.fetched_bytes`: object bytes it has taken from the network.
fn fetched_bytes(m: &Mount) -> u64 {
    xattr(m.path(), "user.lcfs.fetched_bytes")
        .parse()
        .expect("user.lcfs.fetched_bytes is a number")
}

/// The last 20 WARN and ERROR lines of a log, for failure messages.
fn warnings(log: &str) -> String {
    tail(
        &log.lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .collect::<Vec<_>>()
            .join("\n"),
        20,
    )
}

// ---------------------------------------------------------------- processes

/// `lcfs mount CHANNEL TMP/<name> --cache CACHE --timeout T EXTRA..` in c1.
fn mount(lab: &Lab, tmp: &Path, name: &str, cache: &Path, timeout: u32, extra: &[&str]) -> Mount {
    Mount::new(lab, "c1", CHANNEL, &tmp.join(name), cache, timeout, extra)
}

/// `lcfs prefetch CHANNEL SUBPATHS.. --iface lc0 --cache CACHE --timeout T EXTRA..` in c1;
/// panics unless it succeeds.
fn prefetch(lab: &Lab, subpaths: &[&str], cache: &Path, extra: &[&str]) -> Output {
    let timeout = TIMEOUT.to_string();
    let mut args = vec![LCFS, "prefetch", CHANNEL];
    args.extend_from_slice(subpaths);
    args.extend_from_slice(&["--iface", IFACE, "--cache", s(cache), "--timeout", &timeout]);
    args.extend_from_slice(extra);
    let t = Instant::now();
    let out = lab.run("c1", &args);
    eprintln!(
        "`lcfs prefetch {}` in {:.1} s: {}",
        args[3..].join(" "),
        t.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    out
}

// ---------------------------------------------------------------- tmpfs

/// A tmpfs the test mounted; unmounted on drop (lazily if still busy), also when the test
/// fails.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (mount(8) syntax, e.g. `8m`) on `path`, created if missing.
    fn mount(path: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .args(["lcfs-test", s(path)])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run mount(8): {e}"));
        assert!(
            out.status.success(),
            "mount -t tmpfs -o size={size} on {} failed (this test needs tmpfs): {}",
            path.display(),
            describe(&out)
        );
        assert!(
            is_mountpoint(path),
            "mount -t tmpfs succeeded but {} is not a mountpoint",
            path.display()
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }

    /// (bytes used, bytes in all) of the file system, from statvfs.
    fn usage(&self) -> (u64, u64) {
        let p = CString::new(self.path.as_os_str().as_bytes()).unwrap();
        // SAFETY: statvfs only writes into the zeroed struct we hand it.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: p is a valid C string, st a valid statvfs.
        let rc = unsafe { libc::statvfs(p.as_ptr(), &mut st) };
        assert_eq!(
            rc,
            0,
            "statvfs {}: {}",
            self.path.display(),
            io::Error::last_os_error()
        );
        let frsize = st.f_frsize;
        ((st.f_blocks - st.f_bfree) * frsize, st.f_blocks * frsize)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Never panic here: Drop also runs while a failed test unwinds.
        if !is_mountpoint(&self.path) {
            return;
        }
        let umount = |lazy: bool| {
            let mut c = Command::new("umount");
            if lazy {
                c.arg("-l");
            }
            c.arg(&self.path)
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !umount(false) && !umount(true) {
            eprintln!("could not unmount the tmpfs on {}", self.path.display());
        }
    }
}

// ---------------------------------------------------------------- row 1: damaged objects

/// Builds `src/t/f0.bin` .. with `n` files of 8 blocks and a ragged tail, plus `keep.bin`
/// (never damaged); returns the damaged-to-be files and `keep.bin`.
fn damage_tree(src: &Path, n: usize, seed: u64) -> (Vec<Published>, Published) {
    let files = (0..n)
        .map(|i| {
            Published::write(
                src,
                &format!("t/f{i}.bin"),
                seed + i as u64,
                8 * BLOCK + 100,
            )
        })
        .collect();
    let keep = Published::write(src, "keep.bin", seed + 100, 6 * BLOCK + 7);
    (files, keep)
}

/// Asserts that every damaged block's object file is back in the cache with its bytes, and
/// that the mount's log names each one (the damage was detected on read, not missed).
fn assert_refetched(damaged: &[Damaged], cache: &Path, m: &Mount, when: &str) {
    let log = m.log_text();
    for d in damaged {
        let path = d.file.object(cache, d.block);
        let bytes = fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{when}: {}: the object file {} is not back in the cache after the read: {e}",
                d.describe(),
                path.display()
            )
        });
        assert!(
            bytes == d.file.block(d.block),
            "{when}: {}: the object file {} holds {} other bytes after the read",
            d.describe(),
            path.display(),
            bytes.len()
        );
        assert!(
            log.contains(&d.hex()),
            "{when}: {}: the mount's log never names object {}: the damage went unnoticed\n\
             --- mount log (tail) ---\n{}",
            d.describe(),
            d.hex(),
            tail(&log, 40)
        );
    }
}

/// Cache object files flipped, truncated, emptied, deleted or replaced while a mount runs:
/// the next read of each file (after the page cache is dropped) gives the published bytes,
/// the damaged blocks are fetched again from the server and stored again, and only they.
#[test]
fn objects_damaged_under_a_running_mount_are_refetched() {
    let lab = Lab::with_clients(1);
    let tmp = tmpdir("faults-cache");
    let src = tmp.path().join("src");
    let (files, keep) = damage_tree(&src, 5, 0xf1_0000);
    // read after the others, so that neither the cache's 16 MiB memory LRU nor the fetch
    // engine's 512 objects just completed still hold them: their next read goes to the files
    let filler = Published::write(&src, "filler.bin", 0xf1_0100, 34 * MIB);
    let srv = start_server(&lab, &src, CHANNEL, &tmp.path().join("state"), &[]);
    let cache = tmp.path().join("cache");
    let m = mount(&lab, tmp.path(), "mnt", &cache, TIMEOUT, &[]);

    for f in files.iter().chain([&keep, &filler]) {
        read_ok(&m, f);
    }
    for f in files.iter().chain([&keep]) {
        let missing = f.blocks_not_cached(&cache);
        assert!(
            missing.is_empty(),
            "{}: blocks {missing:?} are not in the cache as files after a full read: \
             the test cannot damage them",
            f.rel
        );
    }
    let damaged = [
        Damaged::new(&files[0], 2, Damage::Flip),
        Damaged::new(&files[1], 3, Damage::Truncate),
        Damaged::new(&files[2], 0, Damage::Empty),
        Damaged::new(&files[3], 5, Damage::Delete),
        Damaged::new(&files[4], 8, Damage::Replace),
    ];
    for d in &damaged {
        d.apply(&cache);
    }
    drop_page_cache();

    let before = fetched_bytes(&m);
    for f in &files {
        let took = read_ok(&m, f);
        eprintln!(
            "{} re-read with a damaged block in {:.3} s",
            f.rel,
            took.as_secs_f64()
        );
    }
    let took = read_ok(&m, &keep);
    eprintln!(
        "keep.bin (untouched) re-read in {:.3} s",
        took.as_secs_f64()
    );
    let refetched = fetched_bytes(&m) - before;
    let damaged_bytes: u64 = damaged
        .iter()
        .map(|d| d.file.block(d.block).len() as u64)
        .sum();
    let file_bytes: u64 = files.iter().map(|f| f.data.len() as u64).sum();
    eprintln!(
        "the mount fetched {refetched} B from the network for {} damaged blocks of {damaged_bytes} B \
         ({file_bytes} B re-read)",
        damaged.len()
    );
    assert_refetched(&damaged, &cache, &m, "damaged under the mount");
    assert!(
        refetched >= damaged_bytes,
        "the mount fetched {refetched} B from the network, less than the {damaged_bytes} B of \
         damaged blocks: some damaged block was served without being fetched again"
    );
    assert!(
        refetched < file_bytes,
        "the mount fetched {refetched} B from the network to re-read {file_bytes} B of which \
         only {damaged_bytes} B were damaged: intact cached blocks were fetched again"
    );
    m.unmount();
    srv.stop();
}

/// Cache object files damaged while no mount runs: a new mount with the server up reads the
/// published bytes and fetches the damaged blocks again. Damaged again and with the server
/// killed, an offline mount answers EIO for the damaged blocks (a whole read, and a pread of
/// the block), never other bytes, while their intact blocks and untouched files still read.
#[test]
fn objects_damaged_while_stopped_are_refetched_or_eio_offline() {
    let lab = Lab::with_clients(1);
    let tmp = tmpdir("faults-cache");
    let src = tmp.path().join("src");
    let (files, keep) = damage_tree(&src, 4, 0xf1_1000);
    let srv = start_server(&lab, &src, CHANNEL, &tmp.path().join("state"), &[]);
    let cache = tmp.path().join("cache");

    let m = mount(&lab, tmp.path(), "mnt", &cache, TIMEOUT, &[]);
    for f in files.iter().chain([&keep]) {
        read_ok(&m, f);
    }
    m.unmount();

    // damaged while stopped; the server is up for the next mount
    let damaged = [
        Damaged::new(&files[0], 1, Damage::Flip),
        Damaged::new(&files[1], 4, Damage::Truncate),
        Damaged::new(&files[2], 7, Damage::Delete),
        Damaged::new(&files[3], 2, Damage::Replace),
    ];
    for d in &damaged {
        d.apply(&cache);
    }
    let m = mount(&lab, tmp.path(), "mnt", &cache, TIMEOUT, &[]);
    let before = fetched_bytes(&m);
    for f in files.iter().chain([&keep]) {
        let took = read_ok(&m, f);
        eprintln!(
            "{} read by a new mount in {:.3} s",
            f.rel,
            took.as_secs_f64()
        );
    }
    let refetched = fetched_bytes(&m) - before;
    eprintln!("the new mount fetched {refetched} B from the network for 4 damaged blocks");
    assert_refetched(&damaged, &cache, &m, "damaged while stopped");
    m.unmount();

    // damaged again while stopped, other blocks, and now the server is gone
    let damaged = [
        Damaged::new(&files[0], 6, Damage::Flip),
        Damaged::new(&files[1], 8, Damage::Empty),
        Damaged::new(&files[2], 5, Damage::Delete),
        Damaged::new(&files[3], 7, Damage::Replace),
    ];
    for d in &damaged {
        d.apply(&cache);
    }
    srv.kill();
    let t = Instant::now();
    let m = mount(&lab, tmp.path(), "mnt", &cache, OFFLINE_TIMEOUT, &[]);
    eprintln!("offline mount up in {:.1} s", t.elapsed().as_secs_f64());
    let state = xattr(m.path(), "user.lcfs.server");
    assert!(
        state.starts_with("offline"),
        "user.lcfs.server is {state:?} with the server killed"
    );
    let took = read_ok(&m, &keep);
    eprintln!(
        "offline: keep.bin (untouched) read in {:.3} s",
        took.as_secs_f64()
    );
    for d in &damaged {
        let path = m.path().join(&d.file.rel);
        // the file's intact first block still reads
        let (r, took) = pread_timed(&path, 0, BLOCK);
        let got = r.unwrap_or_else(|e| {
            panic!(
                "offline: the intact block 0 of {} fails after {:.1} s: {e}",
                d.file.rel,
                took.as_secs_f64()
            )
        });
        assert_bytes_equal(
            &format!("offline: block 0 of {}", d.file.rel),
            &got,
            d.file.block(0),
        );
        eprintln!(
            "offline: intact block 0 of {} read in {:.3} s",
            d.file.rel,
            took.as_secs_f64()
        );
        // the whole file, and the damaged block alone, fail with EIO
        let off = (d.block * BLOCK) as u64;
        for (what, (r, took)) in [
            ("a read of the whole file", read_timed(&path)),
            (
                "a pread of the damaged block",
                pread_timed(&path, off, BLOCK),
            ),
        ] {
            eprintln!(
                "offline: {what} of {}: {:?} after {:.2} s",
                d.describe(),
                r.as_ref().map(Vec::len).map_err(|e| e.to_string()),
                took.as_secs_f64()
            );
            match r {
                Ok(v) => panic!(
                    "offline: {what} of {} returned {} bytes instead of EIO",
                    d.describe(),
                    v.len()
                ),
                Err(e) => assert_eq!(
                    e.raw_os_error(),
                    Some(libc::EIO),
                    "offline: {what} of {} failed with {e}, not EIO",
                    d.describe()
                ),
            }
            assert!(
                took < Duration::from_secs(OFFLINE_TIMEOUT as u64 + 10),
                "offline: {what} of {} took {:.1} s to fail (--timeout {OFFLINE_TIMEOUT})",
                d.describe(),
                took.as_secs_f64()
            );
        }
        // the bad file is gone from the cache, not kept to fail again
        let obj = d.file.object(&cache, d.block);
        assert!(
            !obj.exists(),
            "offline: {}: the damaged object file {} is still in the cache after the read \
             found it bad",
            d.describe(),
            obj.display()
        );
    }
    // what was read offline before still reads
    let took = read_ok(&m, &keep);
    eprintln!(
        "offline: keep.bin read again in {:.3} s",
        took.as_secs_f64()
    );
    m.unmount();
}

// ---------------------------------------------------------------- row 2: the index

/// A tree of `pinned/` (4 files, 2 MiB) and `rest/` (6 files, 6 MiB, and small files).
fn index_tree(src: &Path, seed: u64) -> (Vec<Published>, Vec<Published>) {
    let pinned = (0..4)
        .map(|i| Published::write(src, &format!("pinned/p{i}.bin"), seed + i, 8 * BLOCK + 11))
        .collect();
    let rest = (0..6)
        .map(|i| Published::write(src, &format!("rest/r{i}.bin"), seed + 10 + i, MIB))
        .collect();
    for i in 0..20u64 {
        Published::write(src, &format!("rest/small/s{i:02}"), seed + 100 + i, 3000);
    }
    (pinned, rest)
}

/// The files of `files` with blocks missing from `cache`: `(file, how many)`.
fn lost_blocks<'a>(files: &'a [Published], cache: &Path) -> Vec<(&'a str, usize)> {
    files
        .iter()
        .map(|f| (f.rel.as_str(), f.blocks_not_cached(cache).len()))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// Fills a cache (a pinning prefetch of `pinned/`, a prefetch of everything), damages its index
/// while nothing runs, then checks the promise: the next copy with that cache rebuilds the
/// index and reads every byte from the cache, not the network; and pins either survive (a
/// process with a 1 MiB quota then evicts none of them) or the copy said they were lost.
fn index_lost_while_stopped(what: &str, damage_index: impl Fn(&Path)) {
    let lab = Lab::with_clients(1);
    let tmp = tmpdir("faults-cache");
    let src = tmp.path().join("src");
    let (pinned, _rest) = index_tree(&src, 0xf2_0000);
    let tree_bytes = tree_file_bytes(&src);
    let srv = start_server(&lab, &src, CHANNEL, &tmp.path().join("state"), &[]);
    let cache = tmp.path().join("cache");

    prefetch(&lab, &["pinned"], &cache, &["--pin"]);
    // A prefetch, not a copy: a copy alone on its cache leaves small files in DEST only.
    let first = prefetch(&lab, &[], &cache, &[]);
    assert!(first.status.success(), "the prefetch of everything failed");
    let before = object_files(&cache);
    eprintln!("the cache holds {before:?}");

    let index = cache.join("index");
    assert!(
        index.exists(),
        "no sled index at {}: the test looks in the wrong place",
        index.display()
    );
    damage_index(&index);

    let dest = tmp.path().join("dest2");
    let second = spawn_copy(&lab, "c1", CHANNEL, &dest, &cache, TIMEOUT).wait(LIMIT);
    second.assert_success();
    let sum = second.summary();
    eprintln!(
        "copy after the index was {what}: {:.1} s, {}",
        second.elapsed.as_secs_f64(),
        second.summary_line()
    );
    assert_trees_equal(&src, &dest);
    assert!(
        sum.network * 100 < tree_bytes,
        "after the index was {what}, the copy took {} B from the network and {} B from the \
         cache for a tree of {tree_bytes} B whose every object file was still there: the \
         index was not rebuilt from them\n--- copy stderr ---\n{}",
        sum.network,
        sum.cache,
        second.stderr
    );
    assert!(
        sum.cache >= tree_bytes,
        "after the index was {what}, the copy read only {} B from the cache for a tree of \
         {tree_bytes} B\n--- copy stderr ---\n{}",
        sum.cache,
        second.stderr
    );
    let after = object_files(&cache);
    assert_eq!(
        after.count, before.count,
        "the rebuild kept {after:?} of the {before:?} object files"
    );

    // Do the pins hold? A process with a quota far below the pinned bytes evicts every
    // unpinned object; pinned ones stay.
    prefetch(&lab, &["rest/r0.bin"], &cache, &["--cache-size", "1M"]);
    let lost = lost_blocks(&pinned, &cache);
    let said = second
        .stderr
        .lines()
        .filter(|l| l.contains("pins") && l.contains("lost"))
        .collect::<Vec<_>>()
        .join("\n");
    eprintln!(
        "after the index was {what}: pinned blocks evicted under a 1 MiB quota: {lost:?}; the \
         copy that rebuilt the index said about pins: {said:?}"
    );
    assert!(
        lost.is_empty() || !said.is_empty(),
        "after the index was {what}, pins were silently lost: a 1 MiB quota evicted pinned \
         blocks {lost:?}, and the copy that rebuilt the index said nothing of pins\n\
         --- copy stderr ---\n{}",
        second.stderr
    );
    srv.stop();
}

/// Sled's directory deleted while nothing runs.
#[test]
fn index_deleted_while_stopped_is_rebuilt() {
    index_lost_while_stopped("deleted", |index| {
        fs::remove_dir_all(index).unwrap_or_else(|e| panic!("rm -r {}: {e}", index.display()))
    });
}

/// Every file of sled's directory overwritten with garbage while nothing runs.
#[test]
fn index_corrupted_while_stopped_is_rebuilt() {
    fn garble(dir: &Path) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                garble(&p);
            } else {
                let len = fs::metadata(&p).unwrap().len().max(64) as usize;
                fs::write(&p, vec![0xA5; len]).unwrap();
            }
        }
    }
    index_lost_while_stopped("corrupted", garble);
}

// ---------------------------------------------------------------- row 3: a full file system

/// The cache on an 8 MiB tmpfs, 40 MiB read through a mount: every read gives the published
/// bytes, none fails, and the cache still takes in new data once the file system is full
/// (at least half the blocks of the file read last are in it: older ones made room).
#[test]
fn cache_file_system_full() {
    let lab = Lab::with_clients(1);
    let tmp = tmpdir("faults-cache");
    let src = tmp.path().join("src");
    let files: Vec<Published> = (0..5)
        .map(|i| Published::write(&src, &format!("f{i}.bin"), 0xf3_0000 + i, 8 * MIB))
        .collect();
    let srv = start_server(&lab, &src, CHANNEL, &tmp.path().join("state"), &[]);
    let fs8 = Tmpfs::mount(&tmp.path().join("cachefs"), "8m");
    let cache = fs8.path.join("cache");
    let m = mount(&lab, tmp.path(), "mnt", &cache, TIMEOUT, &[]);

    let t = Instant::now();
    for f in &files {
        let took = read_ok(&m, f);
        let (used, size) = fs8.usage();
        eprintln!(
            "{} read in {:.2} s; the cache's file system: {used} of {size} B used; {:?}; \
             cached fraction {}",
            f.rel,
            took.as_secs_f64(),
            object_files(&cache),
            xattr(&m.path().join(&f.rel), "user.lcfs.cached")
        );
    }
    let total = t.elapsed();
    let read: usize = files.iter().map(|f| f.data.len()).sum();
    let log = m.log_text();
    let warned = log
        .lines()
        .filter(|l| l.contains("cannot store fetched objects in the cache"))
        .count();
    eprintln!(
        "{read} B read through the mount in {:.1} s with the cache on an 8 MiB tmpfs; \
         {warned} `cannot store` warnings in the mount log",
        total.as_secs_f64()
    );
    // lcfs alone filled the file system: it kept the index room to write, so storing never
    // failed (sled refuses every write after one that met a full disk)
    assert_eq!(
        warned,
        0,
        "the cache failed to store objects on a file system only it filled:\n{}",
        warnings(&log)
    );
    // once full, the cache still takes in what is read: most of the last file is in it
    let last = files.last().unwrap();
    let cached = last.blocks() - last.blocks_not_cached(&cache).len();
    eprintln!(
        "{} of the {} blocks of {}, read last, are in the cache",
        cached,
        last.blocks(),
        last.rel
    );
    assert!(
        cached * 2 >= last.blocks(),
        "with its file system full, the cache took in only {cached} of the {} blocks of {}, \
         the file read last: older objects were not evicted to make room\n\
         --- mount log (tail) ---\n{}",
        last.blocks(),
        last.rel,
        tail(&log, 8)
    );
    // and every file still reads, after the page cache is dropped
    drop_page_cache();
    for f in &files {
        read_ok(&m, f);
    }
    m.unmount();
    srv.stop();
}

/// Fills the file system of `dir` with a file `dir/hog`, until it says ENOSPC; returns the
/// bytes written.
fn fill_up(dir: &Path) -> u64 {
    use std::io::Write;
    let path = dir.join("hog");
    let mut f =
        fs::File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let chunk = vec![0x5a; 4096];
    let mut written = 0;
    loop {
        match f.write(&chunk) {
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return written,
            Err(e) => panic!("filling {} up: {e}", path.display()),
        }
    }
}

/// Reads every pinned file through `m` after the page cache is dropped: panics unless each
/// gives its bytes without a byte from the network.
fn assert_pinned_read_from_cache(m: &Mount, keep: &[Published], when: &str) {
    drop_page_cache();
    let before = fetched_bytes(m);
    for f in keep {
        read_ok(m, f);
    }
    let fetched = fetched_bytes(m) - before;
    assert_eq!(
        fetched, 0,
        "{when}: reading the pinned keep/ fetched {fetched} B from the network"
    );
}

/// Panics if the log of a cache's user says pins were lost.
fn assert_no_pins_lost(log: &str, who: &str) {
    assert!(
        !log.contains("pins are lost") && !log.contains("lost pins"),
        "{who} says pins were lost, though only the disk was full:\n{}",
        warnings(log)
    );
}

/// The cache on an 8 MiB tmpfs holding 4 MiB of pinned objects, the rest filled by another
/// file: nothing can be evicted and nothing new kept. A mount started on it works or fails
/// saying ENOSPC, and loses no pin. Once space is freed a mount starts; filled up again
/// under it, reads of 24 MiB still give the published bytes (from memory), and the pinned
/// files stay and read without the network.
#[test]
fn cache_file_system_full_of_pinned_data() {
    let lab = Lab::with_clients(1);
    let tmp = tmpdir("faults-cache");
    let src = tmp.path().join("src");
    let keep: Vec<Published> = (0..4)
        .map(|i| Published::write(&src, &format!("keep/k{i}.bin"), 0xf3_2000 + i, 16 * BLOCK))
        .collect();
    let bulk: Vec<Published> = (0..3)
        .map(|i| Published::write(&src, &format!("bulk/b{i}.bin"), 0xf3_2100 + i, 8 * MIB))
        .collect();
    let srv = start_server(&lab, &src, CHANNEL, &tmp.path().join("state"), &[]);
    let fs8 = Tmpfs::mount(&tmp.path().join("cachefs"), "8m");
    let cache = fs8.path.join("cache");
    let mnt = tmp.path().join("mnt");

    prefetch(&lab, &["keep"], &cache, &["--pin"]);
    let hog = fill_up(&fs8.path);
    let (used, size) = fs8.usage();
    eprintln!(
        "the cache's file system: {:?} pinned, {hog} B of another file, {used} of {size} B used",
        object_files(&cache)
    );

    // a mount started on the full file system
    match Mount::daemon(&lab, "c1", CHANNEL, &mnt, &cache, TIMEOUT, &[]) {
        Ok(m) => {
            eprintln!("a mount started on the full file system works");
            assert_no_pins_lost(&m.log_text(), "a mount started on the full file system");
            assert_pinned_read_from_cache(&m, &keep, "a mount started on the full file system");
            m.unmount();
        }
        Err(f) => {
            let err = String::from_utf8_lossy(&f.output.stderr);
            eprintln!(
                "a mount started on the full file system fails after {:.1} s: {}",
                f.elapsed.as_secs_f64(),
                err.trim()
            );
            assert!(
                err.contains("No space left on device"),
                "a mount started on the full cache file system failed without saying ENOSPC: \
                 {err}"
            );
            assert_no_pins_lost(&f.log, "a mount started on the full file system");
        }
    }
    let lost = lost_blocks(&keep, &cache);
    assert!(
        lost.is_empty(),
        "a mount started on the full file system lost pinned blocks: {lost:?}"
    );

    // freed, a mount starts; filled up again under it, nothing new can be kept
    fs::remove_file(fs8.path.join("hog")).unwrap();
    let m = mount(&lab, tmp.path(), "mnt", &cache, TIMEOUT, &[]);
    assert_no_pins_lost(&m.log_text(), "the mount after the file system was freed");
    let hog = fill_up(&fs8.path);
    eprintln!("filled up again under the mount: {hog} B");
    let t = Instant::now();
    for f in &bulk {
        let took = read_ok(&m, f);
        eprintln!(
            "{} read in {:.2} s with the cache's file system full",
            f.rel,
            took.as_secs_f64()
        );
    }
    eprintln!(
        "{} B read in {:.1} s; {} `cannot store` warnings in the mount log",
        bulk.iter().map(|f| f.data.len()).sum::<usize>(),
        t.elapsed().as_secs_f64(),
        m.log_text()
            .lines()
            .filter(|l| l.contains("cannot store fetched objects in the cache"))
            .count()
    );
    let lost = lost_blocks(&keep, &cache);
    assert!(
        lost.is_empty(),
        "pinned blocks were evicted from the full cache: {lost:?}\n--- mount log warnings ---\n{}",
        warnings(&m.log_text())
    );
    assert_pinned_read_from_cache(&m, &keep, "the file system full");

    // freed again: what is read now makes room by evicting unpinned objects only
    fs::remove_file(fs8.path.join("hog")).unwrap();
    for f in &bulk {
        read_ok(&m, f);
    }
    let lost = lost_blocks(&keep, &cache);
    assert!(
        lost.is_empty(),
        "reading 24 MiB after the file system was freed evicted pinned blocks: {lost:?}\n\
         --- mount log warnings ---\n{}",
        warnings(&m.log_text())
    );
    assert_pinned_read_from_cache(&m, &keep, "after the file system was freed");
    assert_no_pins_lost(&m.log_text(), "the mount");
    m.unmount();
    srv.stop();
}

/// `lcfs copy` into a DEST on a 4 MiB tmpfs of a 12 MiB tree: non-zero exit, an error that
/// says ENOSPC and names the path under DEST, and no temporary file left behind.
#[test]
fn copy_to_a_full_file_system_fails_naming_the_path() {
    let lab = Lab::with_clients(1);
    let tmp = tmpdir("faults-cache");
    let src = tmp.path().join("src");
    Published::write(&src, "a/big.bin", 0xf3_1000, 8 * MIB);
    Published::write(&src, "a/b.bin", 0xf3_1001, 4 * MIB);
    let srv = start_server(&lab, &src, CHANNEL, &tmp.path().join("state"), &[]);
    let fs4 = Tmpfs::mount(&tmp.path().join("destfs"), "4m");
    let dest = fs4.path.join("dest");
    let cache = tmp.path().join("cache");

    let out =
        spawn_copy_with(&lab, "c1", CHANNEL, &dest, &cache, Some(TIMEOUT), &[], &[]).wait(LIMIT);
    eprintln!(
        "copy of 12 MiB to a 4 MiB tmpfs: {} after {:.1} s",
        out.status,
        out.elapsed.as_secs_f64()
    );
    out.assert_failure("a copy to a full file system");
    let last = out
        .stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("lcfs: "))
        .unwrap_or_else(|| panic!("the failed copy printed no `lcfs: ` error:\n{}", out.stderr));
    assert!(
        last.contains("No space left on device"),
        "the failed copy's error does not say ENOSPC (No space left on device): {last}"
    );
    assert!(
        last.contains(s(&dest)),
        "the failed copy's error does not name a path under DEST {}: {last}",
        dest.display()
    );
    common::lcfs::assert_no_part_files(&dest);
    srv.stop();
}

// ---------------------------------------------------------------- row 4: a small quota

/// `--cache-size 8M` on a mount that reads 48 MiB, after `lcfs prefetch --pin` of a 2 MiB
/// subtree: every read is right, the object files never exceed the quota by more than one
/// block once the reads settle, and every pinned block is still in the cache at the end and
/// reads without the network.
#[test]
fn cache_size_far_below_the_data_read() {
    const QUOTA: u64 = 8 * MIB as u64;
    let lab = Lab::with_clients(1);
    let tmp = tmpdir("faults-cache");
    let src = tmp.path().join("src");
    let keep: Vec<Published> = (0..4)
        .map(|i| {
            Published::write(
                &src,
                &format!("keep/k{i}.bin"),
                0xf4_0000 + i,
                8 * BLOCK + 3,
            )
        })
        .collect();
    let bulk: Vec<Published> = (0..6)
        .map(|i| Published::write(&src, &format!("bulk/b{i}.bin"), 0xf4_0100 + i, 8 * MIB))
        .collect();
    let srv = start_server(&lab, &src, CHANNEL, &tmp.path().join("state"), &[]);
    let cache = tmp.path().join("cache");

    prefetch(&lab, &["keep"], &cache, &["--pin"]);
    let pinned = object_files(&cache);
    eprintln!("after prefetch --pin of keep/: {pinned:?}");
    let lost = lost_blocks(&keep, &cache);
    assert!(
        lost.is_empty(),
        "prefetch --pin left blocks of keep/ out of the cache: {lost:?}"
    );

    let m = mount(
        &lab,
        tmp.path(),
        "mnt",
        &cache,
        TIMEOUT,
        &["--cache-size", "8M"],
    );
    let t = Instant::now();
    let mut worst = ObjectFiles::default();
    for f in &bulk {
        let took = read_ok(&m, f);
        let now = object_files_settled(&cache);
        eprintln!(
            "{} read in {:.2} s; the cache holds {now:?}",
            f.rel,
            took.as_secs_f64()
        );
        if now.disk > worst.disk {
            worst = now;
        }
        assert!(
            now.disk <= QUOTA + BLOCK as u64,
            "after reading {}, the cache's object files use {} B of disk; the quota is {QUOTA} B \
             (one block over is allowed): {now:?}",
            f.rel,
            now.disk
        );
        let lost = lost_blocks(&keep, &cache);
        assert!(
            lost.is_empty(),
            "pinned blocks were evicted while reading {}: {lost:?}",
            f.rel
        );
    }
    let read: usize = bulk.iter().map(|f| f.data.len()).sum();
    eprintln!(
        "{read} B read through the mount in {:.1} s with --cache-size 8M; the most the cache \
         held after a file: {worst:?} ({:.3} of the quota)",
        t.elapsed().as_secs_f64(),
        worst.disk as f64 / QUOTA as f64
    );
    // the pinned files read from the cache alone
    drop_page_cache();
    let before = fetched_bytes(&m);
    for f in &keep {
        read_ok(&m, f);
        assert_eq!(
            xattr(&m.path().join(&f.rel), "user.lcfs.cached"),
            "1.000",
            "{}",
            f.rel
        );
    }
    let fetched = fetched_bytes(&m) - before;
    assert_eq!(
        fetched, 0,
        "reading the pinned keep/ fetched {fetched} B from the network"
    );
    m.unmount();
    srv.stop();
}
