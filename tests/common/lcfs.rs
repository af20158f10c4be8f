//! Running the `lcfs` binary in the lab: `lcfs serve` (started, its `ready`
//! line awaited, stopped or killed), `lcfs mount --daemon` (a guard that always
//! unmounts), and small process helpers. Shared by the integration tests.
//!
//! ```ignore
//! let srv = start_server(&lab, &src, "edge", &state, &[]);
//! let m = Mount::daemon(&lab, "c1", "edge", &mnt, &cache, 10, &[]).expect("mount");
//! let bytes = std::fs::read(m.path().join("a.txt")).unwrap();
//! drop(m); // lcfs umount (umount -l as a fallback), also on panic
//! srv.stop();
//! ```
#![allow(dead_code)]

use super::lab::Lab;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const LCFS: &str = env!("CARGO_BIN_EXE_lcfs");
pub const IFACE: &str = Lab::IFACE;

/// `p` as UTF-8 (test paths always are).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A fresh temporary directory named `lcfs-<what>-test-*`.
pub fn tmpdir(what: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("lcfs-{what}-test-"))
        .tempdir()
        .expect("tempdir")
}

/// Reads `reader` line by line on a thread: each line is appended to the
/// returned buffer and echoed to the test's stderr with `tag`.
pub fn collect_lines(
    reader: impl Read + Send + 'static,
    tag: String,
) -> (Arc<Mutex<String>>, JoinHandle<()>) {
    let buf = Arc::new(Mutex::new(String::new()));
    let b = buf.clone();
    let h = std::thread::spawn(move || {
        let mut r = BufReader::new(reader);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let l = String::from_utf8_lossy(&line);
                    eprint!("[{tag}] {l}");
                    if !l.ends_with('\n') {
                        eprintln!();
                    }
                    b.lock().unwrap().push_str(&l);
                }
            }
        }
    });
    (buf, h)
}

/// Waits up to `limit` for `child` to exit, without blocking forever.
pub fn wait_limit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return Some(st);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `sig` to our (not yet reaped) child.
pub fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: plain syscall on our own, not yet reaped, child.
    unsafe { libc::kill(child.id() as libc::pid_t, sig) };
}

/// Exit status, stdout and stderr of `out`, for failure messages.
pub fn describe(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The number right before `suffix` in `line` (e.g. "123" in "x 123 bytes hashed").
pub fn number_before(line: &str, suffix: &str) -> Option<u64> {
    let i = line.find(suffix)?;
    let head = line[..i].trim_end();
    let start = head
        .rfind(|c: char| !c.is_ascii_digit())
        .map(|j| j + 1)
        .unwrap_or(0);
    head[start..].parse().ok()
}

/// (packets, bytes, root records) from the server's final
/// `sent N packets (B bytes on the wire, R root records)`.
pub fn parse_sent(stderr: &str) -> (u64, u64, u64) {
    let line = stderr
        .lines()
        .rev()
        .find(|l| l.contains(" packets (") && l.contains("bytes on the wire"))
        .unwrap_or_else(|| {
            panic!("lcfs serve logged no `sent N packets (B bytes on the wire, ...)` line; stderr:\n{stderr}")
        });
    let p = number_before(line, " packets (").expect("packets");
    let b = number_before(line, " bytes on the wire").expect("bytes");
    let r = number_before(line, " root records").unwrap_or(0);
    (p, b, r)
}

/// Bytes hashed from every `indexed PATH in X s (N bytes hashed)` line of the
/// server's log, in order.
pub fn parse_hashed(stderr: &str) -> Vec<u64> {
    stderr
        .lines()
        .filter(|l| l.contains("indexed ") && l.contains("bytes hashed"))
        .map(|l| number_before(l, " bytes hashed").expect("bytes hashed"))
        .collect()
}

// ---------------------------------------------------------------- server

/// The server's `ready channel=... generation=... root=... files=... bytes=...` line.
#[derive(Clone, Debug, Default)]
pub struct Ready {
    pub line: String,
    pub channel: String,
    pub generation: u64,
    pub root: String,
    pub files: u64,
    pub bytes: u64,
}

pub fn parse_ready(line: &str) -> Ready {
    let field = |k: &str| -> String {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")).map(str::to_string))
            .unwrap_or_else(|| panic!("ready line lacks {k}=: {line:?}"))
    };
    let num = |k: &str| -> u64 {
        field(k)
            .parse()
            .unwrap_or_else(|e| panic!("ready line: {k} is not a number ({e}): {line:?}"))
    };
    assert!(line.starts_with("ready "), "not a ready line: {line:?}");
    Ready {
        line: line.to_string(),
        channel: field("channel"),
        generation: num("generation"),
        root: field("root"),
        files: num("files"),
        bytes: num("bytes"),
    }
}

/// A running `lcfs serve` in the lab's `srv`.
pub struct Server {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
    stderr_thread: Option<JoinHandle<()>>,
    pub ready: Ready,
}

/// Starts `lcfs serve PATH --channel CHANNEL --state STATE EXTRA..` in `srv`
/// and waits (up to 90 s) for its ready line; panics with the server's stderr
/// if it exits first.
pub fn start_server(lab: &Lab, path: &Path, channel: &str, state: &Path, extra: &[&str]) -> Server {
    start_server_env(lab, path, channel, state, extra, &[])
}

/// [`start_server`] with extra environment variables (e.g. `LCFS_PASSWORD`).
pub fn start_server_env(
    lab: &Lab,
    path: &Path,
    channel: &str,
    state: &Path,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> Server {
    start_server_at(lab, "srv", path, channel, state, extra, envs)
}

/// [`start_server_env`] on lab node `node` (another host of the link).
pub fn start_server_at(
    lab: &Lab,
    node: &str,
    path: &Path,
    channel: &str,
    state: &Path,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> Server {
    let mut cmd = lab.command(node, LCFS);
    cmd.envs(envs.iter().copied());
    cmd.args([
        "serve",
        s(path),
        "--iface",
        IFACE,
        "--channel",
        channel,
        "--state",
        s(state),
    ])
    .args(extra)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = lab.spawn_command(cmd);
    let stdout = child.stdout.take().unwrap();
    let (stderr, stderr_thread) = collect_lines(child.stderr.take().unwrap(), "srv".into());
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            eprintln!("[srv stdout] {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut server = Server {
        child,
        lines,
        stderr,
        stderr_thread: Some(stderr_thread),
        ready: Ready::default(),
    };
    server.ready = server.wait_ready(Duration::from_secs(90));
    assert_eq!(
        server.ready.channel, channel,
        "ready line names another channel"
    );
    server
}

impl Server {
    /// The next `ready` line on stdout.
    pub fn wait_ready(&mut self, limit: Duration) -> Ready {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with("ready ") => return parse_ready(&l),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => panic!(
                    "lcfs serve printed no ready line within {limit:?}; stderr:\n{}",
                    self.stderr()
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    let st = wait_limit(&mut self.child, Duration::from_secs(5));
                    if let Some(h) = self.stderr_thread.take() {
                        let _ = h.join();
                    }
                    panic!(
                        "lcfs serve closed stdout before its ready line (exit: {st:?}); stderr:\n{}",
                        self.stderr()
                    );
                }
            }
        }
    }

    /// The next `ready` line on stdout within `limit`, or `None` (a server that publishes
    /// each new generation prints one per generation).
    pub fn try_wait_ready(&mut self, limit: Duration) -> Option<Ready> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with("ready ") => return Some(parse_ready(&l)),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    /// Everything the server has logged so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Asserts the server is still running.
    pub fn assert_running(&mut self) {
        if let Some(st) = self.child.try_wait().unwrap() {
            panic!(
                "lcfs serve exited unexpectedly ({st}); stderr:\n{}",
                self.stderr()
            );
        }
    }

    /// SIGTERM, wait for exit (10 s), return the whole stderr.
    pub fn stop(mut self) -> String {
        self.assert_running();
        signal(&self.child, libc::SIGTERM);
        let st = wait_limit(&mut self.child, Duration::from_secs(10));
        if st.is_none() {
            signal(&self.child, libc::SIGKILL);
            let _ = self.child.wait();
        }
        if let Some(h) = self.stderr_thread.take() {
            let _ = h.join();
        }
        let err = self.stderr();
        assert!(
            st.is_some(),
            "lcfs serve did not exit within 10 s of SIGTERM; stderr:\n{err}"
        );
        err
    }

    /// SIGKILL (no goodbye of any kind) and reap it; returns its stderr.
    pub fn kill(mut self) -> String {
        self.assert_running();
        signal(&self.child, libc::SIGKILL);
        let st = wait_limit(&mut self.child, Duration::from_secs(10));
        assert!(st.is_some(), "lcfs serve survived SIGKILL for 10 s");
        if let Some(h) = self.stderr_thread.take() {
            let _ = h.join();
        }
        self.stderr()
    }
}

// ---------------------------------------------------------------- mount

/// A mount made with `lcfs mount --daemon` in a lab client. `Drop` unmounts it
/// (`lcfs umount`, then `umount -l` if that fails), also while a test unwinds.
/// The daemon lives in the client's network namespace, so `netlab down` kills
/// it if the unmount did not end it.
pub struct Mount {
    path: PathBuf,
    /// The daemon's log (`--log`), RUST_LOG=lcfs=debug,lcfs_mount=debug.
    pub log: PathBuf,
    /// The `lcfs mount --daemon` invocation's output.
    pub output: Output,
    /// How long `lcfs mount --daemon` took to return.
    pub elapsed: Duration,
    /// Daemon pid, from `lcfs: mounted ... (daemon pid N)`.
    pub daemon_pid: Option<u32>,
    mounted: bool,
}

/// A failed `lcfs mount --daemon`.
#[derive(Debug)]
pub struct MountFailure {
    pub output: Output,
    pub elapsed: Duration,
    pub log: String,
}

impl Mount {
    /// `lcfs mount CHANNEL MNT --iface lc0 --cache CACHE --timeout T --daemon
    /// --log MNT.log EXTRA..` in `node`; returns once the daemon says the mount
    /// answers (Ok) or the command failed (Err, with its output and elapsed time).
    /// The log file sits beside the mountpoint (`<mnt>.log`).
    pub fn daemon(
        lab: &Lab,
        node: &str,
        channel: &str,
        mnt: &Path,
        cache: &Path,
        timeout_secs: u32,
        extra: &[&str],
    ) -> Result<Mount, MountFailure> {
        Mount::daemon_env(lab, node, channel, mnt, cache, timeout_secs, extra, &[])
    }

    /// [`Mount::daemon`] with extra environment variables (e.g. `LCFS_PASSWORD`).
    #[allow(clippy::too_many_arguments)]
    pub fn daemon_env(
        lab: &Lab,
        node: &str,
        channel: &str,
        mnt: &Path,
        cache: &Path,
        timeout_secs: u32,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<Mount, MountFailure> {
        std::fs::create_dir_all(mnt).expect("create the mountpoint");
        let log = PathBuf::from(format!("{}.log", mnt.display()));
        let mut cmd = lab.command(node, LCFS);
        cmd.args([
            "mount",
            channel,
            s(mnt),
            "--iface",
            IFACE,
            "--cache",
            s(cache),
            "--timeout",
            &timeout_secs.to_string(),
            "--daemon",
            "--log",
            s(&log),
            // the tests read the user.lcfs.* attributes
            "--xattrs",
        ])
        .args(extra)
        .envs(envs.iter().copied())
        .env("RUST_LOG", "lcfs=debug,lcfs_mount=debug")
        .stdin(Stdio::null());
        let started = Instant::now();
        let output = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run lcfs mount: {e}"));
        let elapsed = started.elapsed();
        eprint!(
            "[mount {}] {}",
            mnt.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        if !output.status.success() {
            return Err(MountFailure {
                output,
                elapsed,
                log: std::fs::read_to_string(&log).unwrap_or_default(),
            });
        }
        let err = String::from_utf8_lossy(&output.stderr);
        let daemon_pid = err
            .find("daemon pid ")
            .and_then(|i| number_before(&err[i..], ")"));
        let m = Mount {
            path: mnt.to_path_buf(),
            log,
            output,
            elapsed,
            daemon_pid: daemon_pid.map(|p| p as u32),
            mounted: true,
        };
        assert!(
            m.is_mounted(),
            "lcfs mount --daemon exited 0 but {} is not a mountpoint in /proc/self/mountinfo",
            mnt.display()
        );
        Ok(m)
    }

    /// Like [`Mount::daemon`], panicking with the output and log on failure.
    pub fn new(
        lab: &Lab,
        node: &str,
        channel: &str,
        mnt: &Path,
        cache: &Path,
        timeout_secs: u32,
        extra: &[&str],
    ) -> Mount {
        Mount::new_env(lab, node, channel, mnt, cache, timeout_secs, extra, &[])
    }

    /// [`Mount::new`] with extra environment variables (e.g. `LCFS_PASSWORD`).
    #[allow(clippy::too_many_arguments)]
    pub fn new_env(
        lab: &Lab,
        node: &str,
        channel: &str,
        mnt: &Path,
        cache: &Path,
        timeout_secs: u32,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Mount {
        Mount::daemon_env(lab, node, channel, mnt, cache, timeout_secs, extra, envs).unwrap_or_else(
            |f| {
                panic!(
                    "lcfs mount {channel} {} failed after {:.1} s: {}\n--- daemon log ---\n{}",
                    mnt.display(),
                    f.elapsed.as_secs_f64(),
                    describe(&f.output),
                    f.log
                )
            },
        )
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Is our mountpoint listed in /proc/self/mountinfo (as a fuse mount)?
    pub fn is_mounted(&self) -> bool {
        is_mountpoint(&self.path)
    }

    /// `lcfs umount MNT`; panics unless it succeeds and the mount is gone.
    pub fn unmount(mut self) {
        let out = Command::new(LCFS)
            .args(["umount", s(&self.path)])
            .stdin(Stdio::null())
            .output()
            .expect("run lcfs umount");
        self.mounted = !out.status.success();
        assert!(
            out.status.success(),
            "lcfs umount {} failed: {}",
            self.path.display(),
            describe(&out)
        );
        assert!(
            !is_mountpoint(&self.path),
            "{} is still mounted after lcfs umount",
            self.path.display()
        );
        self.wait_daemon_exit(Duration::from_secs(10));
    }

    /// Waits (bounded) for the daemon to exit after an unmount.
    fn wait_daemon_exit(&self, limit: Duration) {
        let Some(pid) = self.daemon_pid else { return };
        let deadline = Instant::now() + limit;
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            // a zombie has no cmdline left: it has exited
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if cmd.is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Is `path` a mountpoint (listed in /proc/self/mountinfo)?
pub fn is_mountpoint(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = s(path).replace(' ', "\\040");
    info.lines()
        .any(|l| l.split_whitespace().nth(4) == Some(want.as_str()))
}

impl Drop for Mount {
    fn drop(&mut self) {
        // Never panic here: Drop also runs while a failed test unwinds.
        if !self.mounted || !is_mountpoint(&self.path) {
            return;
        }
        let ok = Command::new(LCFS)
            .args(["umount", s(&self.path)])
            .stdin(Stdio::null())
            .output()
            .map(|o| {
                if !o.status.success() {
                    eprintln!(
                        "lcfs umount {} failed: {}",
                        self.path.display(),
                        describe(&o)
                    );
                }
                o.status.success()
            })
            .unwrap_or(false);
        if !ok || is_mountpoint(&self.path) {
            let _ = Command::new("umount")
                .args(["-l", s(&self.path)])
                .stdin(Stdio::null())
                .status();
        }
        self.wait_daemon_exit(Duration::from_secs(5));
    }
}

// ---------------------------------------------------------------- copy

/// A running `lcfs copy` in a lab client.
pub struct CopyRun {
    pub node: String,
    pub child: Child,
    stderr: Arc<Mutex<String>>,
    stderr_thread: Option<JoinHandle<()>>,
    started: Instant,
}

/// How a `lcfs copy` ended.
#[derive(Debug)]
pub struct CopyOutcome {
    pub node: String,
    pub status: ExitStatus,
    pub stderr: String,
    pub elapsed: Duration,
}

/// The counts of a copy's summary line: `copied F files, D dirs, S symlinks
/// (B bytes) to DEST in T s: N bytes from the network (M MB/s), R reused from
/// DEST, C from the cache`.
#[derive(Debug, Default)]
pub struct Summary {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    pub network: u64,
    pub reused: u64,
    pub cache: u64,
}

/// Starts `lcfs copy SPEC DEST --iface lc0 --cache CACHE --timeout T` in `node`.
pub fn spawn_copy(
    lab: &Lab,
    node: &str,
    spec: &str,
    dest: &Path,
    cache: &Path,
    timeout_secs: u32,
) -> CopyRun {
    spawn_copy_with(lab, node, spec, dest, cache, Some(timeout_secs), &[], &[])
}

/// Starts `lcfs copy SPEC DEST --iface lc0 --cache CACHE [--timeout T] EXTRA..`
/// in `node` with `envs` added to its environment (no `--timeout` when
/// `timeout_secs` is `None`: the default applies).
#[allow(clippy::too_many_arguments)]
pub fn spawn_copy_with(
    lab: &Lab,
    node: &str,
    spec: &str,
    dest: &Path,
    cache: &Path,
    timeout_secs: Option<u32>,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> CopyRun {
    spawn_copy_wrapped(lab, node, &[], spec, dest, cache, timeout_secs, extra, envs)
}

/// As [`spawn_copy_with`], with `wrapper` (a program and its arguments, such as `prlimit
/// --nofile=N`) in front of `lcfs`.
#[allow(clippy::too_many_arguments)]
pub fn spawn_copy_wrapped(
    lab: &Lab,
    node: &str,
    wrapper: &[&str],
    spec: &str,
    dest: &Path,
    cache: &Path,
    timeout_secs: Option<u32>,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> CopyRun {
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = lab.command(node, program);
            c.args(args).arg(LCFS);
            c
        }
        None => lab.command(node, LCFS),
    };
    cmd.args(["copy", spec, s(dest), "--iface", IFACE, "--cache", s(cache)]);
    if let Some(t) = timeout_secs {
        cmd.args(["--timeout", &t.to_string()]);
    }
    cmd.args(extra)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = lab.spawn_command(cmd);
    let (stderr, h) = collect_lines(child.stderr.take().unwrap(), node.to_string());
    CopyRun {
        node: node.to_string(),
        child,
        stderr,
        stderr_thread: Some(h),
        started,
    }
}

impl CopyRun {
    /// What the copy has written to stderr so far.
    pub fn stderr_so_far(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits up to `limit`; panics (after killing it) if the copy is still running.
    pub fn wait(mut self, limit: Duration) -> CopyOutcome {
        let st = wait_limit(&mut self.child, limit);
        if st.is_none() {
            signal(&self.child, libc::SIGKILL);
            let _ = self.child.wait();
        }
        let elapsed = self.started.elapsed();
        if let Some(h) = self.stderr_thread.take() {
            let _ = h.join();
        }
        let stderr = self.stderr.lock().unwrap().clone();
        let Some(status) = st else {
            panic!(
                "lcfs copy in {} still running after {limit:?} (killed); stderr:\n{stderr}",
                self.node
            );
        };
        CopyOutcome {
            node: self.node,
            status,
            stderr,
            elapsed,
        }
    }
}

impl CopyOutcome {
    pub fn assert_success(&self) {
        assert!(
            self.status.success(),
            "lcfs copy in {} failed ({}) after {:.1} s; stderr:\n{}",
            self.node,
            self.status,
            self.elapsed.as_secs_f64(),
            self.stderr
        );
    }

    /// Panics unless the copy failed (non-zero exit).
    pub fn assert_failure(&self, what: &str) {
        assert!(
            !self.status.success(),
            "{what}: lcfs copy in {} succeeded (after {:.1} s) but must fail; stderr:\n{}",
            self.node,
            self.elapsed.as_secs_f64(),
            self.stderr
        );
    }

    /// The `copied ...` summary line.
    pub fn summary_line(&self) -> String {
        self.stderr
            .lines()
            .rev()
            .find(|l| l.contains("copied ") && l.contains(" bytes from the network"))
            .unwrap_or_else(|| {
                panic!(
                    "lcfs copy in {} printed no summary line; stderr:\n{}",
                    self.node, self.stderr
                )
            })
            .to_string()
    }

    /// The `copied ...` summary line, parsed.
    pub fn summary(&self) -> Summary {
        let line = self.summary_line();
        let line = &line[line.find("copied ").unwrap()..];
        let n = |suffix: &str| {
            number_before(line, suffix)
                .unwrap_or_else(|| panic!("summary line lacks `N{suffix}`: {line:?}"))
        };
        let after = |key: &str| -> u64 {
            let i = line.find(key).unwrap() + key.len();
            line[i..]
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        let net_end = line.find(" bytes from the network").unwrap();
        let rest = &line[net_end..];
        Summary {
            files: after("copied "),
            dirs: n(" dirs,"),
            symlinks: n(" symlinks ("),
            bytes: number_before(line, " bytes) to ").expect("bytes"),
            network: n(" bytes from the network"),
            reused: number_before(rest, " reused from ")
                .unwrap_or_else(|| panic!("summary lacks `R reused from`: {line:?}")),
            cache: number_before(rest, " from the cache")
                .unwrap_or_else(|| panic!("summary lacks `C from the cache`: {line:?}")),
        }
    }
}

/// Every non-directory under `dir`, relative (none when `dir` does not exist).
pub fn non_dirs(dir: &Path) -> Vec<PathBuf> {
    super::tree::list_tree(dir)
        .into_iter()
        .filter(|p| {
            !std::fs::symlink_metadata(dir.join(p))
                .map(|m| m.is_dir())
                .unwrap_or(false)
        })
        .collect()
}

/// Panics if `dest` holds anything but directories (a failed copy must leave
/// no file, symlink or `.lcfs-part-*` behind).
pub fn assert_nothing_written(dest: &Path, what: &str) {
    let left = non_dirs(dest);
    assert!(
        left.is_empty(),
        "{what}: the failed copy left {} non-directories under {}: {:?}",
        left.len(),
        dest.display(),
        &left[..left.len().min(20)]
    );
}

/// Panics if any `.lcfs-part-*` temporary file is left under `dir`.
pub fn assert_no_part_files(dir: &Path) {
    let parts: Vec<_> = super::tree::list_tree(dir)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().starts_with(".lcfs-part-"))
                .unwrap_or(false)
        })
        .collect();
    assert!(
        parts.is_empty(),
        "temporary files left under {}: {parts:?}",
        dir.display()
    );
}

/// Runs `f` on a thread and waits up to `limit` for its result; panics with `what` if it
/// does not finish (a hung FUSE read must fail the test, not hang it), and with `f`'s own
/// panic if it panicked.
pub fn bounded<T: Send + 'static>(
    what: &str,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match h.join() {
            Err(payload) => std::panic::resume_unwind(payload),
            Ok(()) => panic!("{what} ended without a result"),
        },
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what} did not finish within {limit:?}")
        }
    }
}

/// The result of `thread`, waited for up to `limit` (see [`bounded`]); panics with `what` if
/// it does not end or panicked.
pub fn join_within<T: Send + 'static>(what: &str, limit: Duration, thread: JoinHandle<T>) -> T {
    bounded(what, limit, move || thread.join()).unwrap_or_else(|_| panic!("{what} panicked"))
}

/// Polls `cond` every 20 ms until it holds (returns how long that took) or `limit` passes.
pub fn within(limit: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if cond() {
            return Some(start.elapsed());
        }
        if start.elapsed() >= limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The server's `published generation=N ...` line for `ready`, waiting up to 5 s for it.
pub fn published_line(srv: &Server, ready: &Ready) -> String {
    let key = format!("published generation={} ", ready.generation);
    let mut line = None;
    within(Duration::from_secs(5), || {
        line = srv
            .stderr()
            .lines()
            .find(|l| l.contains(&key))
            .map(str::to_string);
        line.is_some()
    });
    line.unwrap_or_else(|| panic!("no `{key}` line on stderr:\n{}", srv.stderr()))
}

/// The last `n` lines of `text`, for failure messages.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `getfattr --only-values -n NAME PATH`, trimmed; `None` if getfattr fails (no such
/// attribute, a mount without `--xattrs`, the mount gone).
pub fn getfattr(path: &Path, name: &str) -> Option<String> {
    let out = Command::new("getfattr")
        .args(["--only-values", "-n", name, s(path)])
        .output()
        .unwrap_or_else(|e| panic!("cannot run getfattr (package attr): {e}"));
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}
