//! `lcfs mount` end to end in the namespace lab (DESIGN.md sections 6 and 9;
//! issue 3's acceptance criteria). Needs root and /dev/fuse. Run with
//! `cargo test --test mount -- --test-threads=1` on a small machine.
//!
//! The server runs in `srv`; `lcfs mount --daemon` runs in a client's network
//! namespace only (`nsenter --net`), so its FUSE mount is visible to this test
//! process, which reads it directly or with ordinary programs (python3,
//! sqlite3, tar, an executable from the mount). Every mount is unmounted by its
//! guard, also when a test fails. "Bytes the server sent" are the server's
//! bridge port rx counters: its whole egress on the wire.

mod common;

use common::lab::Lab;
use common::lcfs::{bounded, describe, s, start_server, tmpdir, Mount, LCFS};
use common::tree::{
    assert_trees_equal, list_tree, make_edge_tree, set_mtime, write_random_file, BLOCK,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MIB: usize = 1024 * 1024;

// ---------------------------------------------------------------- helpers

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("no NUL in path")
}

/// `getxattr(2)` (following symlinks).
fn getxattr(path: &Path, name: &str) -> io::Result<Vec<u8>> {
    let p = cstr(path);
    let n = CString::new(name).unwrap();
    // SAFETY: valid C strings; a null buffer with size 0 asks for the length.
    let len = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) };
    if len < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; len as usize + 64];
    // SAFETY: buf is writable for buf.len() bytes.
    let got = unsafe {
        libc::getxattr(
            p.as_ptr(),
            n.as_ptr(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
        )
    };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(got as usize);
    Ok(buf)
}

/// `getxattr` as a string; panics with the errno when it fails.
fn xattr_str(path: &Path, name: &str) -> String {
    let v = getxattr(path, name)
        .unwrap_or_else(|e| panic!("getxattr({}, {name}) failed: {e}", path.display()));
    String::from_utf8(v)
        .unwrap_or_else(|e| panic!("{name} of {} is not UTF-8: {e}", path.display()))
}

/// `listxattr(2)`: the names.
fn listxattr(path: &Path) -> io::Result<Vec<String>> {
    let p = cstr(path);
    // SAFETY: as in getxattr.
    let len = unsafe { libc::listxattr(p.as_ptr(), std::ptr::null_mut(), 0) };
    if len < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; len as usize + 256];
    // SAFETY: buf is writable for buf.len() bytes.
    let got =
        unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(got as usize);
    Ok(buf
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect())
}

/// Drops the page cache (and dentries and inodes) of the whole machine.
fn drop_page_cache() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    fs::write("/proc/sys/vm/drop_caches", b"3\n")
        .unwrap_or_else(|e| panic!("cannot drop the page cache via /proc/sys/vm/drop_caches: {e}"));
}

/// Runs a program outside the lab, panicking with its output unless it succeeds.
fn run_ok(cmd: &mut Command) -> std::process::Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", describe(&out));
    out
}

/// `lcfs mount CHANNEL TMP/mnt` in c1 with the cache `TMP/cache` and
/// `--timeout 30`; returns the mount and its path.
fn mount_in_c1(lab: &Lab, tmp: &Path, channel: &str) -> (Mount, PathBuf) {
    let mnt = tmp.join("mnt");
    let m = Mount::new(lab, "c1", channel, &mnt, &tmp.join("cache"), 30, &[]);
    (m, mnt)
}

/// Bytes the server has put on the wire so far (its bridge port's rx bytes).
fn server_bytes(lab: &Lab) -> u64 {
    lab.port_rx("srv").1
}

/// Waits until the server has been quiet (< 8 KiB in 500 ms) or `limit`
/// passes, so that in-flight readahead is counted; returns its bytes then.
fn server_bytes_settled(lab: &Lab, limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    let mut last = server_bytes(lab);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = server_bytes(lab);
        if now - last < 8 * 1024 || Instant::now() >= deadline {
            return now;
        }
        last = now;
    }
}

/// A file of `size` seeded random bytes at `path`, returning its content.
fn random_file(path: &Path, seed: u64, size: usize) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    write_random_file(path, &mut rng, size);
    fs::read(path).unwrap()
}

/// Reads `len` bytes at `off` (fewer at EOF) with pread.
fn pread_full(f: &fs::File, off: u64, len: usize) -> io::Result<Vec<u8>> {
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
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or(if a.len() != b.len() {
            Some(a.len().min(b.len()))
        } else {
            None
        })
}

fn assert_bytes_equal(what: &str, got: &[u8], want: &[u8]) {
    if let Some(i) = first_difference(got, want) {
        panic!(
            "{what}: got {} bytes, want {}; first difference at byte {i}",
            got.len(),
            want.len()
        );
    }
}

/// Adds to `root` what programs run from the mount: a Python package
/// `pkg/`, an SQLite database `db.sqlite` (table `t`, 1000 rows) and an
/// executable shell script `hello.sh` (0755).
fn add_program_files(root: &Path) {
    let pkg = root.join("pkg");
    fs::create_dir_all(&pkg).unwrap();
    fs::write(
        pkg.join("__init__.py"),
        "from .sub import answer\n\ndef greet(name):\n    return 'hello ' + name + ' from pkg'\n",
    )
    .unwrap();
    fs::write(
        pkg.join("sub.py"),
        "def answer():\n    return sum(range(10)) * 1 + (42 - 45)\n",
    )
    .unwrap();
    fs::write(
        root.join("hello.sh"),
        "#!/bin/sh\necho \"hello from the mount: $1\"\n",
    )
    .unwrap();
    fs::set_permissions(root.join("hello.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    let db = root.join("db.sqlite");
    run_ok(Command::new("sqlite3").arg(&db).arg(
        "create table t(id integer primary key, v text, n integer); \
         with recursive c(x) as (select 1 union all select x + 1 from c where x < 1000) \
         insert into t select x, 'row ' || x, x * 3 from c;",
    ));
    set_mtime(&pkg.join("__init__.py"), 1_650_000_000, 1);
    set_mtime(&pkg.join("sub.py"), 1_650_000_001, 999_999_999);
    set_mtime(&db, 1_650_000_002, 500);
    set_mtime(&root.join("hello.sh"), 1_650_000_003, 0);
    set_mtime(&pkg, 1_650_000_004, 123);
}

/// mmaps `path` read-only and returns a copy of its bytes.
fn mmap_read(path: &Path) -> Vec<u8> {
    let f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let len = f.metadata().unwrap().len() as usize;
    assert!(len > 0, "mmap_read needs a non-empty file");
    use std::os::fd::AsRawFd;
    // SAFETY: a fresh private read-only mapping of a file we hold open; we
    // only read it, within its length, and unmap it before returning.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            f.as_raw_fd(),
            0,
        );
        assert!(
            p != libc::MAP_FAILED,
            "mmap of {} failed: {}",
            path.display(),
            io::Error::last_os_error()
        );
        let v = std::slice::from_raw_parts(p as *const u8, len).to_vec();
        libc::munmap(p, len);
        v
    }
}

// ---------------------------------------------------------------- tests

/// Reading 1 byte of a 64 MiB file makes the server send less than 8 MiB.
#[test]
fn one_byte_of_a_big_file() {
    let lab = Lab::with_clients(1);
    let tmp = tmpdir("mount");
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    let size = 64 * MIB;
    let mut rng = StdRng::seed_from_u64(0x0b17e);
    write_random_file(&src.join("big.bin"), &mut rng, size);
    let srv = start_server(&lab, &src, "big", &tmp.path().join("state"), &[]);

    let before = server_bytes(&lab);
    let (m, mnt) = mount_in_c1(&lab, tmp.path(), "big");
    let after_mount = server_bytes(&lab);
    let out = run_ok(
        Command::new("head")
            .args(["-c", "1"])
            .arg(mnt.join("big.bin")),
    );
    let first = fs::read(src.join("big.bin")).unwrap()[0];
    assert_eq!(
        out.stdout,
        vec![first],
        "head -c 1 through the mount returned the wrong byte"
    );
    let after = server_bytes_settled(&lab, Duration::from_secs(10));
    let fetched = xattr_str(&mnt, "user.lcfs.fetched_bytes");
    let sent = after - before;
    eprintln!(
        "one byte of 64 MiB: server sent {sent} B on the wire ({} B for the mount, {} B for the read); \
         the mount says it fetched {fetched} B",
        after_mount - before,
        after - after_mount
    );
    drop(m);
    let log = srv.stop();
    let (pk, wire, _) = common::lcfs::parse_sent(&log);
    eprintln!("server's own count: {pk} packets, {wire} B on the wire");
    assert!(
        sent < 8 * MIB as u64,
        "reading 1 byte of a 64 MiB file made the server send {sent} B (limit 8 MiB)"
    );
}

/// A full walk of the mount equals the source; Python imports a package from
/// it, SQLite queries a database in it, an executable runs from it, mmap
/// reads, and tar archives the whole mount.
#[test]
fn full_walk_equals_source() {
    let lab = Lab::with_clients(1);
    let tmp = tmpdir("mount");
    let src = tmp.path().join("src");
    make_edge_tree(&src, 0x3a11_0001);
    add_program_files(&src);
    let srv = start_server(&lab, &src, "walk", &tmp.path().join("state"), &[]);
    let (m, mnt) = mount_in_c1(&lab, tmp.path(), "walk");

    let t = Instant::now();
    let m_path = mnt.clone();
    let s_path = src.clone();
    bounded("the full walk", Duration::from_secs(120), move || {
        assert_trees_equal(&s_path, &m_path)
    });
    eprintln!("full walk: {:.1} s", t.elapsed().as_secs_f64());
    // the mount root is a directory holding exactly the source's names
    let mut top: Vec<_> = fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let mut want: Vec<_> = fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    top.sort();
    want.sort();
    assert_eq!(
        top, want,
        "the mount root lists other names than the source"
    );

    // python3 imports a package from the mount (without writing bytecode)
    let out = run_ok(
        Command::new("python3")
            .args([
                "-B",
                "-c",
                "import pkg, pkg.sub; print(pkg.greet('lcfs')); print(pkg.sub.answer()); print(pkg.__file__)",
            ])
            .env("PYTHONPATH", &mnt)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .current_dir(tmp.path()),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.first().copied(),
        Some("hello lcfs from pkg"),
        "python3 output: {text}"
    );
    assert_eq!(lines.get(1).copied(), Some("42"), "python3 output: {text}");
    assert_eq!(
        lines.get(2).copied(),
        Some(s(&mnt.join("pkg/__init__.py"))),
        "python3 imported pkg from elsewhere: {text}"
    );
    // Python asks TCGETS of every file it opens: an ordinary event, not a warning.
    let noise: Vec<String> = m
        .log_text()
        .lines()
        .filter(|l| l.contains(" WARN ") && l.contains("ioctl"))
        .map(str::to_string)
        .collect();
    assert!(
        noise.is_empty(),
        "python's opens logged warnings: {noise:#?}"
    );

    // sqlite3 queries the database in the mount
    let uri = format!("file:{}?immutable=1", s(&mnt.join("db.sqlite")));
    let out = run_ok(
        Command::new("sqlite3")
            .arg("-readonly")
            .arg(&uri)
            .arg("select count(*), sum(n), max(v) from t where id > 0;"),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1000|1501500|row 999",
        "sqlite3 query on {uri}: {}",
        describe(&out)
    );

    // an executable runs from the mount (and one from the edge tree)
    let out = run_ok(Command::new(mnt.join("hello.sh")).arg("x y"));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from the mount: x y\n"
    );
    let out = run_ok(&mut Command::new(mnt.join("perms/run.sh")));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from lcfs\n");

    // mmap reads equal the source: a large multi-block file, a one-block+1 file
    for f in [
        "large.bin",
        "one_block_plus_one.bin",
        "perms/ro_dir/inside_big.bin",
    ] {
        let got = mmap_read(&mnt.join(f));
        let want = fs::read(src.join(f)).unwrap();
        assert_bytes_equal(&format!("mmap of {f}"), &got, &want);
    }

    // tar of the whole mount: every entry, every byte
    let archive = tmp.path().join("walk.tar");
    let out = Command::new("tar")
        .args(["cf", s(&archive), "-C", s(&mnt), "."])
        .stdin(Stdio::null())
        .output()
        .expect("run tar");
    assert!(
        out.status.success(),
        "tar cf of the mount failed: {}",
        describe(&out)
    );
    let out = run_ok(Command::new("tar").args(["tf", s(&archive)]));
    let listed = String::from_utf8_lossy(&out.stdout).lines().count();
    let entries = list_tree(&src).len() + 1; // plus "./"
    assert_eq!(
        listed, entries,
        "tar of the mount lists {listed} entries; the source has {entries} (with ./)"
    );
    // and what tar stored is the source's bytes: extract some and compare
    let untar = tmp.path().join("untar");
    fs::create_dir(&untar).unwrap();
    run_ok(Command::new("tar").args(["xf", s(&archive), "-C", s(&untar)]));
    for f in [
        "large.bin",
        "db.sqlite",
        "many/f0777.txt",
        "repeated_tail.bin",
    ] {
        assert_bytes_equal(
            &format!("{f} from the tar of the mount"),
            &fs::read(untar.join(f)).unwrap(),
            &fs::read(src.join(f)).unwrap(),
        );
    }

    // A clean run leaves clean logs: no warning from a clean unmount, and no colour codes
    // in logs that go to a file or a pipe.
    let (log_path, daemon) = (m.log.clone(), m.daemon_pid);
    m.unmount();
    if let Some(pid) = daemon {
        let gone = common::lcfs::within(Duration::from_secs(10), || {
            !Path::new(&format!("/proc/{pid}")).exists()
        });
        assert!(
            gone.is_some(),
            "the mount daemon {pid} outlived lcfs umount by 10 s"
        );
    }
    let log = fs::read_to_string(&log_path).unwrap_or_default();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains(" WARN ")).collect();
    assert!(
        warnings.is_empty(),
        "a clean mount logged warnings: {warnings:#?}"
    );
    let serve_log = srv.stop();
    assert!(
        !serve_log.contains('\x1b') && !log.contains('\x1b'),
        "logs written to a pipe or a file carry ANSI escape codes"
    );
}

/// Every write operation on the mount fails with EROFS ("Read-only file system").
#[test]
fn writes_fail_read_only() {
    let lab = Lab::with_clients(1);
    let tmp = tmpdir("mount");
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("dir")).unwrap();
    fs::write(src.join("file.txt"), b"original\n").unwrap();
    fs::write(src.join("dir/inner.txt"), b"inner\n").unwrap();
    fs::create_dir(src.join("empty_dir")).unwrap();
    let srv = start_server(&lab, &src, "ro", &tmp.path().join("state"), &[]);
    let (m, mnt) = mount_in_c1(&lab, tmp.path(), "ro");
    assert_eq!(fs::read(mnt.join("file.txt")).unwrap(), b"original\n");

    let erofs = |what: &str, r: io::Result<()>| match r {
        Ok(()) => panic!("{what} on the read-only mount succeeded"),
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(libc::EROFS),
            "{what} on the mount failed with {e}, not EROFS (Read-only file system)"
        ),
    };
    erofs(
        "creating a new file",
        fs::File::create(mnt.join("new.txt")).map(drop),
    );
    erofs(
        "opening an existing file for append",
        fs::OpenOptions::new()
            .append(true)
            .open(mnt.join("file.txt"))
            .map(drop),
    );
    erofs(
        "opening an existing file for writing with O_TRUNC",
        fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(mnt.join("file.txt"))
            .map(drop),
    );
    erofs("mkdir", fs::create_dir(mnt.join("newdir")));
    erofs("rm of a file", fs::remove_file(mnt.join("file.txt")));
    erofs(
        "rm of a file in a subdirectory",
        fs::remove_file(mnt.join("dir/inner.txt")),
    );
    erofs(
        "rmdir of an empty directory",
        fs::remove_dir(mnt.join("empty_dir")),
    );
    erofs(
        "rename",
        fs::rename(mnt.join("file.txt"), mnt.join("renamed.txt")),
    );
    erofs(
        "symlink",
        std::os::unix::fs::symlink("file.txt", mnt.join("link")),
    );
    erofs(
        "hard link",
        fs::hard_link(mnt.join("file.txt"), mnt.join("hard")),
    );
    erofs(
        "chmod",
        fs::set_permissions(mnt.join("file.txt"), fs::Permissions::from_mode(0o600)),
    );

    // the shell says it too, for appending, creating and removing
    for (what, script) in [
        (
            "append",
            format!("echo x >> '{}'", s(&mnt.join("file.txt"))),
        ),
        ("create", format!("echo x > '{}'", s(&mnt.join("new2.txt")))),
        ("touch", format!("touch '{}'", s(&mnt.join("new3.txt")))),
        ("rm", format!("rm -f '{}'", s(&mnt.join("dir/inner.txt")))),
        ("mkdir", format!("mkdir '{}'", s(&mnt.join("d2")))),
    ] {
        let out = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "`{script}` on the mount succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("Read-only file system"),
            "`{script}` ({what}) failed without \"Read-only file system\": {err}"
        );
    }

    // nothing changed, in the mount or the source
    assert_eq!(fs::read(mnt.join("file.txt")).unwrap(), b"original\n");
    assert!(!mnt.join("new.txt").exists() && !mnt.join("newdir").exists());
    assert_trees_equal(&src, &mnt);
    m.unmount();
    srv.stop();
}

/// With the server killed: cached data still reads after the page cache is
/// dropped, an uncached read fails with EIO within the timeout plus a few
/// seconds; a new mount over a full cache starts offline and reads every file;
/// a mount with no server and an empty cache fails within 30 s, naming the
/// channel.
#[test]
fn server_killed() {
    const TIMEOUT: u32 = 5;
    let lab = Lab::with_clients(2);
    let tmp = tmpdir("mount");
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    let a = random_file(&src.join("a.bin"), 0xa, 20 * BLOCK + 321);
    random_file(&src.join("b.bin"), 0xb, 12 * BLOCK + 5);
    random_file(&src.join("sub/c.bin"), 0xc, 3 * BLOCK);
    fs::write(src.join("sub/small.txt"), b"small\n").unwrap();
    std::os::unix::fs::symlink("sub/c.bin", src.join("link")).unwrap();
    add_program_files(&src);
    let channel = "killed";
    let srv = start_server(&lab, &src, channel, &tmp.path().join("state"), &[]);

    // c2 fills a second cache with everything, for the offline mount later
    let full_cache = tmp.path().join("cache-full");
    let t = Instant::now();
    lab.run(
        "c2",
        &[
            LCFS,
            "prefetch",
            channel,
            "--iface",
            Lab::IFACE,
            "--cache",
            s(&full_cache),
            "--timeout",
            "30",
        ],
    );
    eprintln!("prefetch: {:.1} s", t.elapsed().as_secs_f64());

    // c1 mounts and reads a.bin only
    let cache1 = tmp.path().join("cache1");
    let mnt = tmp.path().join("mnt");
    let m = Mount::new(&lab, "c1", channel, &mnt, &cache1, TIMEOUT, &[]);
    assert_bytes_equal("a.bin", &fs::read(mnt.join("a.bin")).unwrap(), &a);
    assert_eq!(
        fs::metadata(mnt.join("b.bin")).unwrap().len(),
        (12 * BLOCK + 5) as u64
    );
    assert_eq!(xattr_str(&mnt, "user.lcfs.server"), "online");

    let log = srv.kill();
    eprintln!("server killed; it had logged {} lines", log.lines().count());
    drop_page_cache();

    // a.bin still reads, from lcfs's cache
    let p = mnt.join("a.bin");
    let t = Instant::now();
    let got = bounded("re-reading a.bin", Duration::from_secs(60), move || {
        fs::read(p)
    });
    let got = got.unwrap_or_else(|e| {
        panic!(
            "a.bin, read before the server was killed, fails after the page cache was dropped: {e}\n--- mount log ---\n{}",
            m.log_text()
        )
    });
    eprintln!(
        "a.bin re-read with the server gone in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    assert_bytes_equal("a.bin after the server was killed", &got, &a);

    // b.bin was never read: EIO within the timeout plus a few seconds
    let p = mnt.join("b.bin");
    let t = Instant::now();
    let r = bounded(
        "reading the uncached b.bin",
        Duration::from_secs(120),
        move || fs::read(p),
    );
    let took = t.elapsed();
    eprintln!(
        "uncached read with the server gone: {:?} after {:.2} s (--timeout {TIMEOUT})",
        r.as_ref().map(|v| v.len()).map_err(|e| e.to_string()),
        took.as_secs_f64()
    );
    match r {
        Ok(v) => panic!("reading the uncached b.bin with the server gone returned {} bytes", v.len()),
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(libc::EIO),
            "reading the uncached b.bin with the server gone failed with {e}, not EIO\n--- mount log (tail) ---\n{}",
            tail(&m.log_text(), 60)
        ),
    }
    assert!(
        took < Duration::from_secs(TIMEOUT as u64 + 5),
        "the uncached read took {:.1} s to fail; --timeout is {TIMEOUT} s\n--- mount log (tail) ---\n{}",
        took.as_secs_f64(),
        tail(&m.log_text(), 60)
    );
    // the mount still answers, and a.bin still reads
    assert_bytes_equal(
        "a.bin after the EIO",
        &fs::read(mnt.join("a.bin")).unwrap(),
        &a,
    );
    m.unmount();

    // a new mount over the same (partial) cache starts offline; a.bin reads
    let t = Instant::now();
    let m = Mount::new(&lab, "c1", channel, &mnt, &cache1, TIMEOUT, &[]);
    eprintln!(
        "offline mount over the partial cache: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let state = xattr_str(&mnt, "user.lcfs.server");
    assert!(
        state.starts_with("offline"),
        "user.lcfs.server is {state:?} with the server gone"
    );
    assert_bytes_equal("a.bin, offline", &fs::read(mnt.join("a.bin")).unwrap(), &a);
    m.unmount();

    // a new mount over the full cache starts offline and reads every file
    let mnt2 = tmp.path().join("mnt2");
    let t = Instant::now();
    let m = Mount::new(&lab, "c1", channel, &mnt2, &full_cache, TIMEOUT, &[]);
    let started = t.elapsed();
    eprintln!(
        "offline mount over the full cache: {:.1} s",
        started.as_secs_f64()
    );
    let state = xattr_str(&mnt2, "user.lcfs.server");
    assert!(
        state.starts_with("offline"),
        "user.lcfs.server is {state:?} with the server gone"
    );
    let (sp, mp) = (src.clone(), mnt2.clone());
    bounded(
        "the offline full walk",
        Duration::from_secs(120),
        move || assert_trees_equal(&sp, &mp),
    );
    m.unmount();

    // no server, empty cache: non-zero within 30 s, naming the channel
    let mnt3 = tmp.path().join("mnt3");
    let r = Mount::daemon(
        &lab,
        "c1",
        channel,
        &mnt3,
        &tmp.path().join("cache-empty"),
        10,
        &[],
    );
    let f = match r {
        Ok(m) => panic!(
            "a mount with no server and an empty cache succeeded:\n{}",
            String::from_utf8_lossy(&m.output.stderr)
        ),
        Err(f) => f,
    };
    let err = String::from_utf8_lossy(&f.output.stderr);
    eprintln!(
        "no server, empty cache: {} after {:.1} s: {err}",
        f.output.status,
        f.elapsed.as_secs_f64()
    );
    assert!(
        f.elapsed < Duration::from_secs(30),
        "the mount with no server and an empty cache took {:.1} s to fail",
        f.elapsed.as_secs_f64()
    );
    assert!(
        err.contains(channel),
        "the failed mount's error does not name the channel {channel:?}: {err}"
    );
    assert!(
        !common::lcfs::is_mountpoint(&mnt3),
        "a failed mount left {} mounted",
        mnt3.display()
    );
}

/// Four threads read a 24 MiB file at seeded random offsets and lengths
/// (1 B .. 300 KiB) through the mount; every read equals the source bytes.
#[test]
fn randomized_reader() {
    let lab = Lab::with_clients(1);
    let tmp = tmpdir("mount");
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    let size = 24 * MIB + 4567;
    let data = std::sync::Arc::new(random_file(&src.join("r.bin"), 0x7a4d, size));
    let srv = start_server(&lab, &src, "random", &tmp.path().join("state"), &[]);
    let (m, mnt) = mount_in_c1(&lab, tmp.path(), "random");

    const THREADS: u64 = 4;
    const READS: usize = 150;
    let t = Instant::now();
    let handles: Vec<_> = (0..THREADS)
        .map(|i| {
            let data = data.clone();
            let path = mnt.join("r.bin");
            std::thread::spawn(move || -> Result<(usize, u64), String> {
                let mut rng = StdRng::seed_from_u64(0x5eed_0000 + i);
                let f = fs::File::open(&path).map_err(|e| format!("thread {i}: open: {e}"))?;
                let mut bytes = 0u64;
                for n in 0..READS {
                    // now and then a read that runs past the end of the file
                    let off = if rng.random_ratio(1, 20) {
                        size as u64 - rng.random_range(0..1000u64)
                    } else {
                        rng.random_range(0..size as u64)
                    };
                    let len = rng.random_range(1..=300 * 1024usize);
                    let got = pread_full(&f, off, len)
                        .map_err(|e| format!("thread {i} read {n}: pread({off}, {len}): {e}"))?;
                    let end = (off as usize + len).min(size);
                    let want = &data[off as usize..end];
                    if let Some(d) = first_difference(&got, want) {
                        return Err(format!(
                            "thread {i} read {n}: pread({off}, {len}) returned {} bytes, want {}; \
                             first difference at offset {}",
                            got.len(),
                            want.len(),
                            off + d as u64
                        ));
                    }
                    bytes += got.len() as u64;
                }
                Ok((READS, bytes))
            })
        })
        .collect();
    let mut total = 0;
    let mut errors = Vec::new();
    for h in handles {
        match h.join().expect("reader thread panicked") {
            Ok((_, b)) => total += b,
            Err(e) => errors.push(e),
        }
    }
    eprintln!(
        "randomized reader: {} reads, {total} B in {:.1} s",
        THREADS as usize * READS,
        t.elapsed().as_secs_f64()
    );
    assert!(
        errors.is_empty(),
        "random reads differ from the source:\n{}\n--- mount log (tail) ---\n{}",
        errors.join("\n"),
        tail(&m.log_text(), 40)
    );
    m.unmount();
    srv.stop();
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The `user.lcfs.*` extended attributes: a file's BLAKE3 and cached fraction,
/// the root's channel, generation and server state.
#[test]
fn xattrs() {
    let lab = Lab::with_clients(1);
    let tmp = tmpdir("mount");
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    let multi = random_file(&src.join("d/multi.bin"), 0x3a7, 10 * BLOCK + 123);
    let small = b"a small file\n".to_vec();
    fs::write(src.join("small.txt"), &small).unwrap();
    let srv = start_server(&lab, &src, "xattrs", &tmp.path().join("state"), &[]);
    let (m, mnt) = mount_in_c1(&lab, tmp.path(), "xattrs");

    // the root
    let root_names = listxattr(&mnt).expect("listxattr of the mount root");
    eprintln!("root xattrs: {root_names:?}");
    for n in [
        "user.lcfs.channel",
        "user.lcfs.generation",
        "user.lcfs.server",
    ] {
        assert!(
            root_names.iter().any(|x| x == n),
            "the root does not list {n}: {root_names:?}"
        );
    }
    assert_eq!(xattr_str(&mnt, "user.lcfs.channel"), "xattrs");
    assert_eq!(
        xattr_str(&mnt, "user.lcfs.generation"),
        srv.ready.generation.to_string(),
        "root generation differs from the server's ready line: {}",
        srv.ready.line
    );
    assert_eq!(xattr_str(&mnt, "user.lcfs.server"), "online");
    // getfattr, as people would use it, sees them too
    let out = run_ok(Command::new("getfattr").args(["-d", "-m", "^user\\.lcfs\\.", s(&mnt)]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("user.lcfs.channel=\"xattrs\"")
            && text.contains("user.lcfs.server=\"online\""),
        "getfattr -d of the root: {text}"
    );
    // an unknown name is ENODATA
    let e = getxattr(&mnt, "user.lcfs.no_such_attr").expect_err("unknown xattr");
    assert_eq!(e.raw_os_error(), Some(libc::ENODATA), "unknown xattr: {e}");

    // a multi-block file before reading: cached 0
    let f = mnt.join("d/multi.bin");
    let names = listxattr(&f).expect("listxattr of a file");
    eprintln!("file xattrs before reading: {names:?}");
    assert_eq!(
        xattr_str(&f, "user.lcfs.cached"),
        "0.000",
        "user.lcfs.cached of a file nobody has read"
    );
    assert_eq!(
        xattr_str(&f, "user.lcfs.blake3"),
        blake3::hash(&multi).to_hex().to_string(),
        "user.lcfs.blake3 is not the BLAKE3 of the file's content"
    );
    // read it fully: cached 1
    assert_bytes_equal("multi.bin", &fs::read(&f).unwrap(), &multi);
    assert_eq!(
        xattr_str(&f, "user.lcfs.cached"),
        "1.000",
        "user.lcfs.cached of a file read in full"
    );
    assert_eq!(
        xattr_str(&f, "user.lcfs.generation"),
        srv.ready.generation.to_string()
    );
    // a small file
    let f = mnt.join("small.txt");
    assert_eq!(
        xattr_str(&f, "user.lcfs.blake3"),
        blake3::hash(&small).to_hex().to_string()
    );
    assert_eq!(fs::read(&f).unwrap(), small);
    assert_eq!(xattr_str(&f, "user.lcfs.cached"), "1.000");
    // setting or removing an xattr is refused
    let p = cstr(&f);
    let n = CString::new("user.test").unwrap();
    // SAFETY: valid C strings and a 1-byte value.
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            b"x".as_ptr() as *const libc::c_void,
            1,
            0,
        )
    };
    let e = io::Error::last_os_error();
    assert!(r < 0, "setxattr on the read-only mount succeeded");
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "setxattr: {e}");
    m.unmount();
    srv.stop();
}

/// `cat` of a 32 MiB file through the mount returns its bytes, and the server
/// sends less than 1.3 times the file's size for it (readahead does not
/// over-fetch).
#[test]
fn cat_a_big_file() {
    let lab = Lab::with_clients(1);
    let tmp = tmpdir("mount");
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    let size = 32 * MIB;
    let data = random_file(&src.join("seq.bin"), 0xca7, size);
    random_file(&src.join("other.bin"), 0x07e, 8 * MIB);
    let srv = start_server(&lab, &src, "cat", &tmp.path().join("state"), &[]);
    let before = server_bytes(&lab);
    let (m, mnt) = mount_in_c1(&lab, tmp.path(), "cat");
    let t = Instant::now();
    let out = Command::new("cat")
        .arg(mnt.join("seq.bin"))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run cat");
    let out = bounded("cat of the mount", Duration::from_secs(120), move || {
        out.wait_with_output()
    })
    .expect("cat");
    let took = t.elapsed();
    assert!(out.status.success(), "cat failed: {}", describe(&out));
    assert_bytes_equal("cat of seq.bin", &out.stdout, &data);
    let sent = server_bytes_settled(&lab, Duration::from_secs(10)) - before;
    let ratio = sent as f64 / size as f64;
    let fetched: u64 = xattr_str(&mnt, "user.lcfs.fetched_bytes")
        .parse()
        .expect("user.lcfs.fetched_bytes is a number");
    let fetched_ratio = fetched as f64 / size as f64;
    eprintln!(
        "cat of 32 MiB: {:.1} s ({:.0} Mbit/s), server sent {sent} B = {ratio:.3} x the file; \
         the mount fetched {fetched} B = {fetched_ratio:.3} x",
        took.as_secs_f64(),
        size as f64 * 8.0 / took.as_secs_f64() / 1e6,
    );
    m.unmount();
    let log = srv.stop();
    let (packets, wire, _) = common::lcfs::parse_sent(&log);
    // readahead fetched nothing much beyond the file (other.bin is 8 MiB: a
    // readahead that ran past seq.bin's end into nothing would not show here,
    // one that fetched blocks twice or of the wrong file would)
    assert!(
        fetched_ratio < 1.05,
        "cat of a 32 MiB file made the mount fetch {fetched} B = {fetched_ratio:.3} x its size"
    );
    assert!(
        ratio < 1.3,
        "cat of a 32 MiB file made the server send {sent} B = {ratio:.3} x its size (limit 1.3); \
         the mount fetched {fetched} B = {fetched_ratio:.3} x; the server counted {packets} packets, \
         {wire} B on the wire"
    );
}
