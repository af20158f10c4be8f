//! What programs see through the mount: listings, stat, contents, symlinks, random and mmap
//! reads, exec, tar, Python and SQLite.

mod common;

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, UNIX_EPOCH};

use common::{sample, sh_ok, Mounted, Rng, HELLO_MTIME, RANDOM_LEN};
use lcfs_mount::MountConfig;

#[test]
fn ls_cat_stat_and_readlink() {
    let m = Mounted::new(sample());
    let ls = sh_ok(&m.mnt, "ls -l");
    for name in [
        "hello.txt",
        "bin",
        "data",
        "links",
        "many",
        "odd name \u{2713}.txt",
        "private",
    ] {
        assert!(ls.contains(name), "ls -l lacks {name}:\n{ls}");
    }
    assert_eq!(
        sh_ok(&m.mnt, "cat hello.txt links/rel"),
        "hello world\nhello world\n"
    );
    assert_eq!(
        sh_ok(
            &m.mnt,
            "stat -c '%a %s %Y %F' hello.txt bin/run.sh data/empty private"
        ),
        [
            "644 12 1600000000 regular file\n",
            "755 24 1700000000 regular file\n",
            "600 0 1700000000 regular empty file\n",
            "700 0 1700000000 directory\n",
        ]
        .concat()
    );
    assert_eq!(
        sh_ok(&m.mnt, "readlink links/rel links/abs links/dangling"),
        "../hello.txt\n/nonexistent/target\nnope\n"
    );
    assert_eq!(sh_ok(&m.mnt, "cat deep/a/b/c/d/e/f.txt"), "deep\n");
}

#[test]
fn metadata_follows_the_source() {
    let m = Mounted::new(sample());
    let hello = fs::metadata(m.path("hello.txt")).unwrap();
    assert_eq!(hello.mode(), 0o100644);
    assert_eq!(hello.len(), 12);
    assert_eq!(
        hello.modified().unwrap(),
        UNIX_EPOCH + Duration::new(HELLO_MTIME.0 as u64, HELLO_MTIME.1)
    );
    assert_eq!(
        (hello.mtime(), hello.ctime(), hello.atime()),
        (HELLO_MTIME.0, HELLO_MTIME.0, HELLO_MTIME.0)
    );
    assert_eq!(
        (hello.nlink(), hello.blocks(), hello.blksize()),
        (1, 1, 4096)
    );
    // SAFETY: getuid and getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    assert_eq!((hello.uid(), hello.gid()), (uid, gid));
    let random = fs::metadata(m.path("data/random.bin")).unwrap();
    assert_eq!(random.len(), RANDOM_LEN as u64);
    assert_eq!(random.blocks(), (RANDOM_LEN as u64).div_ceil(512));
    let dir = fs::metadata(m.path("private")).unwrap();
    assert!(dir.is_dir());
    assert_eq!((dir.mode() & 0o7777, dir.nlink()), (0o700, 2));
    let link = fs::symlink_metadata(m.path("links/rel")).unwrap();
    assert!(link.file_type().is_symlink());
    assert_eq!(link.len(), "../hello.txt".len() as u64);
    assert_eq!(
        fs::read_link(m.path("links/rel")).unwrap().as_os_str(),
        "../hello.txt"
    );
    assert_eq!(
        fs::metadata(m.path("nope")).unwrap_err().raw_os_error(),
        Some(libc::ENOENT)
    );
}

#[test]
fn a_1500_entry_directory_lists_completely() {
    let m = Mounted::new(sample());
    let names: BTreeSet<String> = fs::read_dir(m.path("many"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let expected: BTreeSet<String> = (0..1500).map(|i| format!("f{i:04}")).collect();
    assert_eq!(names, expected);
    assert_eq!(sh_ok(&m.mnt, "ls many | wc -l").trim(), "1500");
    assert_eq!(
        sh_ok(&m.mnt, "ls -la many | grep -c ' f[0-9]'").trim(),
        "1500"
    );
    assert_eq!(sh_ok(&m.mnt, "cat many/f1499"), "1499\n");
    assert_eq!(fs::read_dir(m.path("empty-dir")).unwrap().count(), 0);
}

#[test]
fn readdir_resumes_at_telldir_offsets() {
    let m = Mounted::new(sample());
    let path = CString::new(m.path("many").as_os_str().as_bytes()).unwrap();
    // SAFETY: path is a valid C string; dir is checked and closed below; the dirent pointers
    // are used before the next readdir call on the same stream.
    unsafe {
        let dir = libc::opendir(path.as_ptr());
        assert!(!dir.is_null());
        let mut seen = Vec::new();
        loop {
            let pos = libc::telldir(dir);
            let ent = libc::readdir(dir);
            if ent.is_null() {
                break;
            }
            let name = std::ffi::CStr::from_ptr((*ent).d_name.as_ptr())
                .to_string_lossy()
                .into_owned();
            seen.push((pos, name));
        }
        assert_eq!(seen.len(), 1502, "1500 entries, . and ..");
        let mut rng = Rng::new(11);
        for _ in 0..50 {
            let (pos, name) = &seen[rng.below(seen.len() as u64) as usize];
            libc::seekdir(dir, *pos);
            let ent = libc::readdir(dir);
            assert!(!ent.is_null());
            assert_eq!(
                std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()).to_string_lossy(),
                name.as_str()
            );
        }
        libc::closedir(dir);
    }
}

#[test]
fn random_preads_from_several_threads_match_the_source() {
    // Two session threads, so requests are also served concurrently.
    let config = MountConfig {
        threads: 2,
        ..MountConfig::default()
    };
    let m = Mounted::with_config(sample(), config);
    let want = m.source.contents("data/random.bin");
    let file = Arc::new(fs::File::open(m.path("data/random.bin")).unwrap());
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (file, want) = (file.clone(), want.clone());
            thread::spawn(move || {
                let mut rng = Rng::new(100 + t);
                for _ in 0..300 {
                    let offset = rng.below(RANDOM_LEN as u64 + 100) as usize;
                    let len = 1 + rng.below(300_000) as usize;
                    let mut buf = vec![0; len];
                    let n = file.read_at(&mut buf, offset as u64).unwrap();
                    let end = (offset + len).min(RANDOM_LEN).max(offset.min(RANDOM_LEN));
                    let expect = &want[offset.min(RANDOM_LEN)..end];
                    // One read may return less than asked; what it returns must be right.
                    assert!(
                        n <= expect.len() && (n > 0 || expect.is_empty()),
                        "offset {offset} len {len} -> {n}"
                    );
                    assert!(
                        buf[..n] == expect[..n],
                        "bytes differ at offset {offset} len {len}"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Seek + read on another descriptor.
    let mut f = fs::File::open(m.path("data/random.bin")).unwrap();
    f.seek(SeekFrom::Start(1_000_003)).unwrap();
    let mut buf = vec![0; 70_000];
    f.read_exact(&mut buf).unwrap();
    assert!(buf[..] == want[1_000_003..1_070_003]);
    f.seek(SeekFrom::End(-10)).unwrap();
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).unwrap();
    assert_eq!(tail, want[RANDOM_LEN - 10..]);
}

#[test]
fn mmap_reads_the_file() {
    let m = Mounted::new(sample());
    let want = m.source.contents("data/random.bin");
    let file = fs::File::open(m.path("data/random.bin")).unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: a private read-only mapping of an open file of RANDOM_LEN bytes; the slice is
    // only used before munmap.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            RANDOM_LEN,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        let mapped = std::slice::from_raw_parts(p as *const u8, RANDOM_LEN);
        assert!(mapped == &want[..], "mapped bytes differ");
        libc::munmap(p, RANDOM_LEN);
    }
}

#[test]
fn a_script_runs_from_the_mount() {
    let m = Mounted::new(sample());
    assert_eq!(
        fs::metadata(m.path("bin/run.sh"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
    let out = std::process::Command::new(m.path("bin/run.sh"))
        .arg("here")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ran here\n");
}

#[test]
fn tar_of_the_whole_mount_works() {
    let m = Mounted::new(sample());
    let listing = sh_ok(&m.mnt, "tar cf - -C . . | tar tvf - | wc -l");
    // Every node (the root, 10 directories ... 1500 files) is in the archive.
    let nodes = sh_ok(&m.mnt, "find . | wc -l");
    assert_eq!(listing.trim(), nodes.trim());
    let out = tempfile::tempdir().unwrap();
    sh_ok(
        out.path(),
        &format!("tar cf - -C '{}' . | tar xf -", m.mnt.display()),
    );
    assert_eq!(
        fs::read(out.path().join("data/random.bin")).unwrap(),
        *m.source.contents("data/random.bin")
    );
    assert_eq!(
        fs::read_link(out.path().join("links/rel"))
            .unwrap()
            .as_os_str(),
        "../hello.txt"
    );
}

#[test]
fn python_imports_and_sqlite_queries_work() {
    let db_dir = tempfile::tempdir().unwrap();
    sh_ok(
        db_dir.path(),
        "sqlite3 db.sqlite 'create table t(x); insert into t values (1),(2),(39);'",
    );
    let mut source = sample();
    source.file(
        "db.sqlite",
        fs::read(db_dir.path().join("db.sqlite")).unwrap(),
        0o644,
    );
    let m = Mounted::new(source);
    let py = sh_ok(
        &m.mnt,
        "python3 -B -c 'import sys; sys.path.insert(0, \".\"); import pkg; print(pkg.VALUE)'",
    );
    assert_eq!(py.trim(), "42");
    let sql = sh_ok(
        &m.mnt,
        "sqlite3 'file:db.sqlite?immutable=1' 'select sum(x) from t'",
    );
    assert_eq!(sql.trim(), "42");
}
