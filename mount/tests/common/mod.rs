//! Test fixture: a [`MemSource`] mounted on a temporary directory, unmounted on drop (even
//! when the test panics), plus seeded randomness and helpers to run programs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lcfs_mount::testing::MemSource;
use lcfs_mount::{mount, MountConfig, MountHandle};
use tempfile::TempDir;

/// A seeded generator (splitmix64): tests are reproducible.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

/// Fails the test, clearly, when FUSE is not available.
pub fn require_fuse() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: these tests mount a FUSE filesystem; load the fuse module \
         (`modprobe fuse`) or run them where FUSE is available"
    );
}

/// A mounted [`MemSource`].
pub struct Mounted {
    handle: Option<MountHandle>,
    pub source: Arc<MemSource>,
    pub mnt: PathBuf,
    runtime: Option<tokio::runtime::Runtime>,
    _dir: TempDir,
}

impl Mounted {
    pub fn new(source: MemSource) -> Mounted {
        Mounted::with_config(
            source,
            MountConfig {
                // the tests read the user.lcfs.* attributes
                xattrs: true,
                ..MountConfig::default()
            },
        )
    }

    pub fn with_config(source: MemSource, config: MountConfig) -> Mounted {
        require_fuse();
        let dir = tempfile::tempdir().expect("tempdir");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mkdir mnt");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let source = Arc::new(source);
        let handle = mount(source.clone(), &mnt, config, runtime.handle().clone())
            .unwrap_or_else(|e| panic!("mount failed: {e}"));
        let mnt = handle.mountpoint().to_path_buf();
        Mounted {
            handle: Some(handle),
            source,
            mnt,
            runtime: Some(runtime),
            _dir: dir,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn handle(&self) -> &MountHandle {
        self.handle.as_ref().expect("mounted")
    }

    pub fn runtime(&self) -> tokio::runtime::Handle {
        self.runtime.as_ref().expect("runtime").handle().clone()
    }

    /// Unmounts, reporting failure.
    pub fn unmount(mut self) {
        self.handle
            .take()
            .expect("mounted")
            .unmount()
            .expect("unmount");
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        drop(self.handle.take());
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// Runs `sh -c script` in `dir`; returns its output.
pub fn sh(dir: &Path, script: &str) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .expect("run sh")
}

/// Runs `sh -c script` in `dir`, asserting success; returns stdout.
pub fn sh_ok(dir: &Path, script: &str) -> String {
    let out = sh(dir, script);
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits up to `limit` for `cond`.
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// Mtime of hello.txt in [`sample`].
pub const HELLO_MTIME: (i64, u32) = (1_600_000_000, 123_456_789);
/// Size of data/random.bin in [`sample`].
pub const RANDOM_LEN: usize = 3 * 1024 * 1024 + 1234;

/// A tree with the usual edge cases.
pub fn sample() -> MemSource {
    let mut s = MemSource::new();
    s.file("hello.txt", b"hello world\n".to_vec(), 0o644)
        .mtime("hello.txt", HELLO_MTIME.0, HELLO_MTIME.1)
        .file(
            "bin/run.sh",
            b"#!/bin/sh\necho \"ran $1\"\n".to_vec(),
            0o755,
        )
        .file("data/random.bin", Rng::new(7).bytes(RANDOM_LEN), 0o640)
        .file("data/empty", Vec::new(), 0o600)
        .file("odd name \u{2713}.txt", b"odd\n".to_vec(), 0o444)
        .file("deep/a/b/c/d/e/f.txt", b"deep\n".to_vec(), 0o644)
        .file("pkg/__init__.py", b"VALUE = 42\n".to_vec(), 0o644)
        .symlink("links/rel", "../hello.txt")
        .symlink("links/abs", "/nonexistent/target")
        .symlink("links/dangling", "nope")
        .dir("private", 0o700)
        .dir("empty-dir", 0o755)
        .xattr("hello.txt", "user.lcfs.generation", b"7");
    for i in 0..1500 {
        s.file(
            &format!("many/f{i:04}"),
            format!("{i}\n").into_bytes(),
            0o644,
        );
    }
    s
}
