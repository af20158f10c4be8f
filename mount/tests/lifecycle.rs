//! Mounting, unmounting and failing: dead mountpoints, external umount, slow and failing
//! sources, readahead as the kernel drives it, and inode accounting.

mod common;

use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{eventually, require_fuse, sample, sh, sh_ok, Mounted, Rng};
use lcfs_mount::testing::{Fault, MemSource};
use lcfs_mount::{mount, unmount, MountConfig, MountError};

const MIB: usize = 1024 * 1024;

#[test]
fn a_failing_read_gives_eio_without_hanging() {
    let mut s = sample();
    s.file("bad.bin", vec![1; 1000], 0o644)
        .file("bad-dir/x", vec![], 0o644);
    let m = Mounted::new(s);
    m.source.set_fault(
        "bad.bin",
        Fault::unavailable_after(Duration::from_millis(500)),
    );
    m.source
        .set_fault("bad-dir", Fault::unavailable_after(Duration::ZERO));
    let started = Instant::now();
    let err = fs::read(m.path("bad.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let out = sh(&m.mnt, "cat bad.bin");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Input/output error"));
    let listing = fs::read_dir(m.path("bad-dir")).unwrap().next().unwrap();
    assert_eq!(listing.unwrap_err().raw_os_error(), Some(libc::EIO));
    assert!(
        String::from_utf8_lossy(&sh(&m.mnt, "ls bad-dir").stderr).contains("Input/output error")
    );
    // Once the source recovers, so does the mount.
    m.source.clear_fault("bad.bin");
    m.source.clear_fault("bad-dir");
    assert_eq!(fs::read(m.path("bad.bin")).unwrap(), vec![1; 1000]);
    assert_eq!(fs::read_dir(m.path("bad-dir")).unwrap().count(), 1);
}

#[test]
fn a_slow_read_does_not_block_other_requests() {
    let mut s = sample();
    s.file("slow.bin", vec![2; 5000], 0o644);
    let m = Mounted::new(s);
    m.source
        .set_fault("slow.bin", Fault::slow(Duration::from_secs(2)));
    let path = m.path("slow.bin");
    let slow = std::thread::spawn(move || {
        let started = Instant::now();
        (fs::read(path).unwrap(), started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    assert_eq!(
        sh_ok(&m.mnt, "cat hello.txt && ls many | wc -l"),
        "hello world\n1500\n"
    );
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "blocked for {:?}",
        started.elapsed()
    );
    let (bytes, took) = slow.join().unwrap();
    assert_eq!(bytes, vec![2; 5000]);
    assert!(
        took >= Duration::from_millis(1500),
        "the slow read took only {took:?}"
    );
}

#[test]
fn sequential_readers_widen_readahead_and_random_readers_do_not() {
    let mut s = MemSource::new();
    s.file("s.bin", Rng::new(2).bytes(24 * MIB), 0o644).file(
        "r.bin",
        Rng::new(3).bytes(32 * MIB),
        0o644,
    );
    let m = Mounted::new(s);
    let mut f = fs::File::open(m.path("s.bin")).unwrap();
    let mut all = Vec::new();
    f.read_to_end(&mut all).unwrap();
    assert!(all == *m.source.contents("s.bin"));
    let sequential = m.source.reads();
    let widest = sequential.iter().map(|r| r.hint.readahead).max().unwrap();
    assert_eq!(widest, 8 * MIB as u64, "{sequential:?}");

    let f = fs::File::open(m.path("r.bin")).unwrap();
    let before = m.source.reads().len();
    // SAFETY: advising on an open descriptor only changes the kernel's readahead policy.
    assert_eq!(
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) },
        0
    );
    let mut rng = Rng::new(5);
    let mut buf = vec![0; 4096];
    for _ in 0..100 {
        let offset = rng.below(32 * MIB as u64 - 4096) & !4095;
        f.read_exact_at(&mut buf, offset).unwrap();
    }
    let hinted: Vec<_> = m.source.reads()[before..]
        .iter()
        .filter(|r| r.hint.readahead > 0)
        .cloned()
        .collect();
    assert!(hinted.len() <= 2, "random reads got readahead: {hinted:?}");
}

#[test]
fn one_byte_of_a_big_file_reads_little() {
    let mut s = MemSource::new();
    s.file("big.bin", vec![9; 64 * MIB], 0o644);
    let m = Mounted::new(s);
    let f = fs::File::open(m.path("big.bin")).unwrap();
    let mut one = [0u8; 1];
    f.read_exact_at(&mut one, 0).unwrap();
    assert_eq!(one, [9]);
    let asked: u64 = m
        .source
        .reads()
        .iter()
        .map(|r| u64::from(r.len) + r.hint.readahead)
        .sum();
    assert!(
        asked < 8 * MIB as u64,
        "1 byte cost {asked} bytes: {:?}",
        m.source.reads()
    );
}

#[test]
fn inodes_are_forgotten_when_the_kernel_drops_them() {
    let m = Mounted::new(sample());
    sh_ok(
        &m.mnt,
        "find . -type f | xargs cat > /dev/null; ls -lR > /dev/null",
    );
    let walked = m.handle().stats().inodes;
    assert!(walked > 1500, "{walked}");
    assert_eq!(m.handle().stats().open_files, 0);
    // Invalidate every entry, deepest first, as a new generation would: the kernel lets go.
    invalidate_tree(&m.handle().notifier(), &m.mnt);
    assert!(
        eventually(Duration::from_secs(10), || m.handle().stats().inodes < 5),
        "{} inodes still held after invalidating every entry",
        m.handle().stats().inodes
    );
    assert_eq!(sh_ok(&m.mnt, "cat many/f0042"), "42\n");
}

/// Invalidates every entry under directory `dir`, children before their parents.
fn invalidate_tree(notifier: &lcfs_mount::Notifier, dir: &Path) {
    let ino = lcfs_mount::INodeNo(fs::metadata(dir).unwrap().ino());
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            invalidate_tree(notifier, &entry.path());
        }
        notifier.inval_entry(ino, &entry.file_name()).unwrap();
    }
}

#[test]
fn the_kernel_readahead_is_raised() {
    let m = Mounted::new(sample());
    let dev = fs::metadata(&m.mnt).unwrap().dev();
    let knob = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    assert_eq!(fs::read_to_string(&knob).unwrap().trim(), "1024", "{knob}");
}

/// Leaves a dead FUSE mount at `dir`: mounted, then its /dev/fuse descriptor closed.
fn make_dead_mount(dir: &Path) {
    let fuse = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .unwrap();
    let opts = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0",
        fuse.as_raw_fd()
    );
    let (src, target, fstype) = (
        c"lcfs-dead",
        CString::new(dir.as_os_str().as_bytes()).unwrap(),
        c"fuse.lcfs",
    );
    let opts = CString::new(opts).unwrap();
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_RDONLY,
            opts.as_ptr().cast(),
        )
    };
    assert_eq!(rc, 0, "mount: {}", std::io::Error::last_os_error());
    drop(fuse);
    let err = fs::metadata(dir).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
}

#[test]
fn a_dead_mountpoint_is_detached_and_mounted_again() {
    require_fuse();
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    make_dead_mount(&mnt);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let source = std::sync::Arc::new(sample());
    let handle = mount(source, &mnt, MountConfig::default(), rt.handle().clone())
        .expect("mount over a dead mount");
    assert_eq!(fs::read(mnt.join("hello.txt")).unwrap(), b"hello world\n");
    handle.unmount().unwrap();
    assert!(
        fs::read_dir(&mnt).unwrap().next().is_none(),
        "the dead mount is gone too"
    );
}

#[test]
fn mounting_twice_and_bad_mountpoints_are_refused_with_the_path() {
    let m = Mounted::new(sample());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let again = mount(
        std::sync::Arc::new(sample()),
        &m.mnt,
        MountConfig::default(),
        rt.handle().clone(),
    );
    let err = again.unwrap_err();
    assert!(matches!(err, MountError::AlreadyMounted { .. }), "{err}");
    assert!(err.to_string().contains(&*m.mnt.to_string_lossy()), "{err}");
    let file = mount(
        std::sync::Arc::new(sample()),
        &m.path("hello.txt"),
        MountConfig::default(),
        rt.handle().clone(),
    );
    assert!(matches!(file.unwrap_err(), MountError::NotADirectory(_)));
    let missing = mount(
        std::sync::Arc::new(sample()),
        Path::new("/nonexistent/x"),
        MountConfig::default(),
        rt.handle().clone(),
    );
    assert!(matches!(missing.unwrap_err(), MountError::NotFound(_)));
}

#[test]
fn an_external_umount_ends_the_session() {
    let m = Mounted::new(sample());
    assert!(!m.handle().is_ended());
    let out = std::process::Command::new("umount")
        .arg(&m.mnt)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(eventually(Duration::from_secs(5), || m.handle().is_ended()));
    m.handle().wait();
    m.runtime().block_on(m.handle().ended());
    drop(m);
}

#[test]
fn unmount_by_path_and_its_errors() {
    let m = Mounted::new(sample());
    let busy = fs::File::open(m.path("hello.txt")).unwrap();
    let err = unmount(&m.mnt).unwrap_err();
    assert!(matches!(err, MountError::Busy(_)), "{err}");
    drop(busy);
    unmount(&m.mnt).expect("unmount");
    assert!(eventually(Duration::from_secs(5), || m.handle().is_ended()));
    let err = unmount(&m.mnt).unwrap_err();
    assert!(matches!(err, MountError::NotMounted(_)), "{err}");
    assert!(err.to_string().contains("not mounted"));
}

#[test]
fn a_busy_mount_is_detached_by_unmount() {
    let m = Mounted::new(sample());
    let mut busy = fs::File::open(m.path("hello.txt")).unwrap();
    let mnt = m.mnt.to_string_lossy().into_owned();
    m.unmount();
    // The mountpoint is free; the open file still reads.
    assert!(!fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .contains(&mnt));
    let mut text = String::new();
    busy.read_to_string(&mut text).unwrap();
    assert_eq!(text, "hello world\n");
}

/// The child half of `a_user_mounts_through_fusermount3`: does nothing unless run by it.
/// Mounts at $LCFS_TEST_USER_MOUNT, says MOUNTED, unmounts when a line arrives on stdin.
#[test]
fn user_mount_child() {
    let Some(dir) = std::env::var_os("LCFS_TEST_USER_MOUNT") else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let handle = match mount(
        std::sync::Arc::new(sample()),
        Path::new(&dir),
        MountConfig::default(),
        rt.handle().clone(),
    ) {
        Ok(handle) => handle,
        Err(e) => return println!("\nERROR {e}"),
    };
    println!("\nMOUNTED");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    match handle.unmount() {
        Ok(()) => println!("\nUNMOUNTED"),
        Err(e) => println!("\nERROR {e}"),
    }
}

/// Kills the child and detaches its mount, whatever happens.
struct UserMount {
    child: std::process::Child,
    mnt: std::path::PathBuf,
}

impl Drop for UserMount {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.mnt)
            .output();
    }
}

/// Sets the mode of /dev/fuse, and puts the old one back on drop.
struct DevFuseMode(u32);

impl DevFuseMode {
    fn set(mode: u32) -> DevFuseMode {
        use std::os::unix::fs::PermissionsExt;
        let old = fs::metadata("/dev/fuse").unwrap().permissions().mode() & 0o7777;
        fs::set_permissions("/dev/fuse", fs::Permissions::from_mode(mode)).unwrap();
        DevFuseMode(old)
    }
}

impl Drop for DevFuseMode {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        let _ = fs::set_permissions("/dev/fuse", fs::Permissions::from_mode(self.0));
    }
}

fn as_nobody(program: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", program]);
    cmd
}

/// Starts `user_mount_child` as nobody on `mnt`; returns it and its stdout lines.
fn start_user_mount(mnt: &Path) -> (UserMount, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let exe = std::env::current_exe().unwrap();
    let mut child = as_nobody(exe.to_str().unwrap())
        .args([
            "--exact",
            "user_mount_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("LCFS_TEST_USER_MOUNT", mnt)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    (
        UserMount {
            child,
            mnt: mnt.to_path_buf(),
        },
        rx,
    )
}

/// The first line of the child's that starts with one of `words`.
fn said(rx: &std::sync::mpsc::Receiver<String>, words: &[&str]) -> String {
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the child went quiet");
        if words.iter().any(|w| line.starts_with(w)) {
            return line;
        }
    }
}

#[test]
fn a_user_mounts_and_unmounts_through_fusermount3() {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    require_fuse();
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    std::os::unix::fs::chown(&mnt, Some(65534), Some(65534)).unwrap();

    // With /dev/fuse closed to users, the error says so.
    let mode = DevFuseMode::set(0o600);
    let (_child, rx) = start_user_mount(&mnt);
    let line = said(&rx, &["ERROR", "MOUNTED"]);
    assert!(
        line.contains("/dev/fuse is not open to users") && line.contains("0666"),
        "{line}"
    );
    drop(mode);

    // With it open, as distributions ship it, the mount works and unmounts.
    let _mode = DevFuseMode::set(0o666);
    let (mut guard, rx) = start_user_mount(&mnt);
    let line = said(&rx, &["ERROR", "MOUNTED"]);
    assert_eq!(line, "MOUNTED");
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    let line = mounts
        .lines()
        .find(|l| l.contains(&*mnt.to_string_lossy()))
        .expect("mounted");
    assert!(
        line.contains(" fuse.lcfs ro,") && line.contains("user_id=65534"),
        "{line}"
    );
    let cat = as_nobody("cat")
        .arg(mnt.join("hello.txt"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&cat.stderr);
    assert_eq!(
        String::from_utf8_lossy(&cat.stdout),
        "hello world\n",
        "{stderr}"
    );
    // Everything belongs to the mounting user.
    let owner = as_nobody("stat")
        .args(["-c", "%u %g"])
        .arg(mnt.join("bin/run.sh"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&owner.stdout), "65534 65534\n");
    writeln!(guard.child.stdin.as_mut().unwrap(), "unmount").unwrap();
    assert_eq!(said(&rx, &["ERROR", "UNMOUNTED"]), "UNMOUNTED");
    assert!(guard.child.wait().unwrap().success());
    assert!(!fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .contains(&*mnt.to_string_lossy()));
}
