//! `lcfs serve` + `lcfs copy` end to end in the namespace lab (DESIGN.md sections
//! 3, 4 and 9; issue 2's acceptance criteria). Needs root. Run with
//! `cargo test --test copy -- --test-threads=1` on a small machine.
//!
//! The lab's kernel may lack sch_netem: loss and duplication then come from
//! netlab's BPF fallback, and delay/reorder are not available, so these tests use
//! loss (and duplication) only.

mod common;

use common::lab::{Lab, LabOptions};
use common::tree::{
    assert_entries_equal, assert_trees_equal, list_tree, make_edge_tree, set_mtime,
    tree_file_bytes, tree_file_count, write_random_file, BLOCK, LARGE_FILE_SIZE,
};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use std::fs;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const LCFS: &str = env!("CARGO_BIN_EXE_lcfs");
const IFACE: &str = Lab::IFACE;
/// The product requirement: bytes the server sends for three lossy receivers
/// together, over the tree's file bytes.
const MAX_SEND_RATIO: f64 = 1.6;
/// Packets an idle server may send in [`IDLE_WINDOW`].
const MAX_IDLE_PACKETS: u64 = 20;
const IDLE_WINDOW: Duration = Duration::from_secs(5);

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Reads `reader` line by line on a thread: each line is appended to the
/// returned buffer and echoed to the test's stderr with `tag`.
fn collect_lines(
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
fn wait_limit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
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

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: plain syscall on our own, not yet reaped, child.
    unsafe { libc::kill(child.id() as libc::pid_t, sig) };
}

// ---------------------------------------------------------------- server

#[derive(Clone, Debug)]
struct Ready {
    line: String,
    channel: String,
    generation: u64,
    root: String,
    files: u64,
    bytes: u64,
}

fn parse_ready(line: &str) -> Ready {
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

struct Server {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
    stderr_thread: Option<JoinHandle<()>>,
    ready: Ready,
}

/// Starts `lcfs serve PATH` in `srv` and waits (up to 90 s) for its ready line;
/// panics with the server's stderr if it exits first.
fn start_server(lab: &Lab, path: &Path, channel: &str, state: &Path, extra: &[&str]) -> Server {
    let mut cmd = lab.command("srv", LCFS);
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
        ready: Ready {
            line: String::new(),
            channel: String::new(),
            generation: 0,
            root: String::new(),
            files: 0,
            bytes: 0,
        },
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
    fn wait_ready(&mut self, limit: Duration) -> Ready {
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

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Asserts the server is still running.
    fn assert_running(&mut self) {
        if let Some(st) = self.child.try_wait().unwrap() {
            panic!(
                "lcfs serve exited unexpectedly ({st}); stderr:\n{}",
                self.stderr()
            );
        }
    }

    /// SIGTERM, wait for exit (10 s), return the whole stderr.
    fn stop(mut self) -> String {
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
}

/// The number right before `suffix` in `line` (e.g. "123" in "x 123 bytes hashed").
fn number_before(line: &str, suffix: &str) -> Option<u64> {
    let i = line.find(suffix)?;
    let head = line[..i].trim_end();
    let start = head
        .rfind(|c: char| !c.is_ascii_digit())
        .map(|j| j + 1)
        .unwrap_or(0);
    head[start..].parse().ok()
}

/// (packets, bytes, root records) from the server's final `sent N packets (B bytes on the wire, R root records)`.
fn parse_sent(stderr: &str) -> (u64, u64, u64) {
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

/// Bytes hashed from every `indexed PATH in X s (N bytes hashed)` line, in order.
fn parse_hashed(stderr: &str) -> Vec<u64> {
    stderr
        .lines()
        .filter(|l| l.contains("indexed ") && l.contains("bytes hashed"))
        .map(|l| number_before(l, " bytes hashed").expect("bytes hashed"))
        .collect()
}

// ---------------------------------------------------------------- copy

struct CopyRun {
    node: String,
    child: Child,
    stderr: Arc<Mutex<String>>,
    stderr_thread: Option<JoinHandle<()>>,
    started: Instant,
}

struct CopyOutcome {
    node: String,
    status: ExitStatus,
    stderr: String,
    elapsed: Duration,
}

#[derive(Debug, Default)]
struct Summary {
    files: u64,
    dirs: u64,
    symlinks: u64,
    bytes: u64,
    network: u64,
    reused: u64,
    cache: u64,
}

/// Starts `lcfs copy SPEC DEST` in `node` with its own cache.
fn spawn_copy(
    lab: &Lab,
    node: &str,
    spec: &str,
    dest: &Path,
    cache: &Path,
    timeout_secs: u32,
) -> CopyRun {
    let mut cmd = lab.command(node, LCFS);
    cmd.args([
        "copy",
        spec,
        s(dest),
        "--iface",
        IFACE,
        "--cache",
        s(cache),
        "--timeout",
        &timeout_secs.to_string(),
    ])
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
    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits up to `limit`; panics (after killing it) if the copy is still running.
    fn wait(mut self, limit: Duration) -> CopyOutcome {
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
    fn assert_success(&self) {
        assert!(
            self.status.success(),
            "lcfs copy in {} failed ({}) after {:.1} s; stderr:\n{}",
            self.node,
            self.status,
            self.elapsed.as_secs_f64(),
            self.stderr
        );
    }

    /// The `copied ...` summary line, parsed.
    fn summary(&self) -> Summary {
        let line = self
            .stderr
            .lines()
            .rev()
            .find(|l| l.contains("copied ") && l.contains(" bytes from the network"))
            .unwrap_or_else(|| {
                panic!(
                    "lcfs copy in {} printed no summary line; stderr:\n{}",
                    self.node, self.stderr
                )
            });
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

/// Every non-directory under `dir` (none when `dir` does not exist).
fn non_dirs(dir: &Path) -> Vec<PathBuf> {
    list_tree(dir)
        .into_iter()
        .filter(|p| {
            !fs::symlink_metadata(dir.join(p))
                .map(|m| m.is_dir())
                .unwrap_or(false)
        })
        .collect()
}

fn assert_no_part_files(dir: &Path) {
    let parts: Vec<_> = list_tree(dir)
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

fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("lcfs-copy-test-")
        .tempdir()
        .expect("tempdir")
}

/// Packets the server sent (srv's bridge port rx) during `window`.
fn server_packets_during(lab: &Lab, window: Duration) -> (u64, u64) {
    let (p0, b0) = lab.port_rx("srv");
    std::thread::sleep(window);
    let (p1, b1) = lab.port_rx("srv");
    (p1 - p0, b1 - b0)
}

// ---------------------------------------------------------------- tests

/// Issue 2's main criterion: three receivers at once, each with its own 5% loss,
/// get identical trees; the server sends at most 1.6 × the tree's bytes for all
/// three together, and is quiet once they have finished.
#[test]
fn three_receivers_with_loss() {
    let lab = Lab::up(LabOptions {
        clients: 3,
        loss: Some(5.0),
        ..Default::default()
    });
    let tmp = tmpdir();
    let src = tmp.path().join("edge");
    make_edge_tree(&src, 0x1cf5_0001);
    let tree_bytes = tree_file_bytes(&src);
    let tree_files = tree_file_count(&src);
    let kinds = |dir: bool| {
        list_tree(&src)
            .iter()
            .filter(|p| {
                let m = fs::symlink_metadata(src.join(p)).unwrap();
                if dir {
                    m.is_dir()
                } else {
                    m.file_type().is_symlink()
                }
            })
            .count() as u64
    };
    let (tree_dirs, tree_symlinks) = (kinds(true), kinds(false));
    let mut srv = start_server(&lab, &src, "edge", &tmp.path().join("state"), &[]);
    assert_eq!(
        (srv.ready.files, srv.ready.bytes),
        (tree_files, tree_bytes),
        "ready line's files/bytes differ from the source tree's regular files: {}",
        srv.ready.line
    );

    let before = lab.port_rx("srv");
    let runs: Vec<(CopyRun, PathBuf)> = lab
        .client_names()
        .iter()
        .map(|c| {
            let dest = tmp.path().join(format!("dest-{c}"));
            let cache = tmp.path().join(format!("cache-{c}"));
            (spawn_copy(&lab, c, "edge", &dest, &cache, 30), dest)
        })
        .collect();
    let outcomes: Vec<(CopyOutcome, PathBuf)> = runs
        .into_iter()
        .map(|(r, d)| (r.wait(Duration::from_secs(120)), d))
        .collect();
    let after = lab.port_rx("srv");
    srv.assert_running();
    for (o, dest) in &outcomes {
        o.assert_success();
        let sum = o.summary();
        eprintln!("{}: {:.1} s, {sum:?}", o.node, o.elapsed.as_secs_f64());
        assert_trees_equal(&src, dest);
        assert_eq!(
            (sum.files, sum.dirs, sum.symlinks, sum.bytes),
            (tree_files, tree_dirs, tree_symlinks, tree_bytes),
            "{}: summary (files, dirs, symlinks, bytes) differ from the source tree's",
            o.node
        );
    }

    // quiet once every receiver has finished
    std::thread::sleep(Duration::from_secs(1));
    let (idle_packets, idle_bytes) = server_packets_during(&lab, IDLE_WINDOW);
    let log = srv.stop();
    let (sent_packets, sent_bytes, root_records) = parse_sent(&log);

    let port_bytes = after.1 - before.1;
    let port_packets = after.0 - before.0;
    let port_ratio = port_bytes as f64 / tree_bytes as f64;
    let log_ratio = sent_bytes as f64 / tree_bytes as f64;
    eprintln!(
        "three_receivers_with_loss: tree {tree_bytes} B in {tree_files} files; server egress \
         during the copies (bridge port rx) {port_bytes} B in {port_packets} packets = \
         {port_ratio:.3} x tree; server's own count over its lifetime {sent_bytes} B in \
         {sent_packets} packets ({root_records} root records) = {log_ratio:.3} x tree; \
         after the copies: {idle_packets} packets ({idle_bytes} B) in {IDLE_WINDOW:?}"
    );
    let mut failures = Vec::new();
    if port_ratio > MAX_SEND_RATIO {
        failures.push(format!(
            "server egress on the wire {port_bytes} B = {port_ratio:.3} x the tree's {tree_bytes} B (max {MAX_SEND_RATIO})"
        ));
    }
    if log_ratio > MAX_SEND_RATIO {
        failures.push(format!(
            "server reports {sent_bytes} B sent = {log_ratio:.3} x the tree's {tree_bytes} B (max {MAX_SEND_RATIO})"
        ));
    }
    if idle_packets > MAX_IDLE_PACKETS {
        failures.push(format!(
            "server sent {idle_packets} packets in {IDLE_WINDOW:?} after every receiver finished (max {MAX_IDLE_PACKETS})"
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A server with no receivers sends at most a few MLD queries; so does one
/// whose receivers have all finished.
#[test]
fn idle_server_is_quiet() {
    let lab = Lab::up(LabOptions {
        clients: 3,
        ..Default::default()
    });
    let tmp = tmpdir();
    let src = tmp.path().join("quiet");
    let mut rng = StdRng::seed_from_u64(7);
    write_random_file(&src.join("a.bin"), &mut rng, 3 * BLOCK + 5);
    write_random_file(&src.join("d/b.bin"), &mut rng, 100_000);
    fs::write(src.join("small.txt"), b"small\n").unwrap();
    let mut srv = start_server(&lab, &src, "quiet", &tmp.path().join("state"), &[]);

    let (before_packets, before_bytes) = server_packets_during(&lab, IDLE_WINDOW);
    eprintln!(
        "idle before any receiver: {before_packets} packets ({before_bytes} B) in {IDLE_WINDOW:?}"
    );

    let runs: Vec<(CopyRun, PathBuf)> = lab
        .client_names()
        .iter()
        .map(|c| {
            let dest = tmp.path().join(format!("dest-{c}"));
            let cache = tmp.path().join(format!("cache-{c}"));
            (spawn_copy(&lab, c, "quiet", &dest, &cache, 30), dest)
        })
        .collect();
    for (r, dest) in runs {
        let o = r.wait(Duration::from_secs(60));
        o.assert_success();
        assert_trees_equal(&src, &dest);
    }
    std::thread::sleep(Duration::from_secs(1));
    let (after_packets, after_bytes) = server_packets_during(&lab, IDLE_WINDOW);
    eprintln!(
        "idle after the copies: {after_packets} packets ({after_bytes} B) in {IDLE_WINDOW:?}"
    );
    srv.assert_running();
    assert!(
        before_packets <= MAX_IDLE_PACKETS && after_packets <= MAX_IDLE_PACKETS,
        "an idle server must send at most {MAX_IDLE_PACKETS} packets in {IDLE_WINDOW:?}: \
         {before_packets} before any receiver, {after_packets} after every receiver finished"
    );
    srv.stop();
}

/// c2 joins while c1 is halfway through a large file: both get it whole.
#[test]
fn late_joiner() {
    let lab = Lab::up(LabOptions {
        clients: 2,
        loss: Some(2.0),
        duplicate: Some(1.0),
        ..Default::default()
    });
    let tmp = tmpdir();
    let src = tmp.path().join("big");
    let size = 32 * 1024 * 1024 + 4321;
    let mut rng = StdRng::seed_from_u64(0x1a7e);
    write_random_file(&src.join("big.bin"), &mut rng, size);
    fs::write(src.join("note.txt"), b"the big file is next to me\n").unwrap();
    set_mtime(&src.join("big.bin"), 1_600_000_000, 123_456_789);
    // 32 MiB at 50 Mbit/s: about 5.5 s for c1 alone
    let srv = start_server(
        &lab,
        &src,
        "big",
        &tmp.path().join("state"),
        &["--rate", "50M"],
    );

    let d1 = tmp.path().join("dest-c1");
    let d2 = tmp.path().join("dest-c2");
    let (_, c1_base) = lab.port_tx("c1");
    let srv_base = lab.port_rx("srv").1;
    let mut r1 = spawn_copy(&lab, "c1", "big", &d1, &tmp.path().join("cache-c1"), 30);
    // wait until half the file has reached c1's link
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = lab.port_tx("c1").1 - c1_base;
        if got >= size as u64 / 2 {
            eprintln!("c1 has received {got} B of {size}: starting c2");
            break;
        }
        assert!(
            r1.running(),
            "c1 finished before it had half the file on its link ({got} B of {size}): {}",
            r1.wait(Duration::from_secs(1)).stderr
        );
        assert!(
            Instant::now() < deadline,
            "c1 received only {got} B of {size} in 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let r2 = spawn_copy(&lab, "c2", "big", &d2, &tmp.path().join("cache-c2"), 30);
    let o1 = r1.wait(Duration::from_secs(90));
    let o2 = r2.wait(Duration::from_secs(90));
    o1.assert_success();
    o2.assert_success();
    let sent = lab.port_rx("srv").1 - srv_base;
    eprintln!(
        "late_joiner: c1 {:.1} s, c2 {:.1} s; server sent {sent} B = {:.3} x the file",
        o1.elapsed.as_secs_f64(),
        o2.elapsed.as_secs_f64(),
        sent as f64 / size as f64
    );
    assert_trees_equal(&src, &d1);
    assert_trees_equal(&src, &d2);
    srv.stop();
}

/// A channel that is one file: copied into a directory it keeps its name;
/// copied to a file path it takes that name.
#[test]
fn single_file_channel() {
    let lab = Lab::up(LabOptions {
        clients: 1,
        ..Default::default()
    });
    let tmp = tmpdir();
    let dir = tmp.path().join("src");
    fs::create_dir(&dir).unwrap();
    let mut rng = StdRng::seed_from_u64(0x5111);

    for (name, size, mode) in [
        ("payload.bin", 3 * BLOCK + 12345, 0o640),
        ("tiny.txt", 100, 0o755),
    ] {
        let file = dir.join(name);
        write_random_file(&file, &mut rng, size);
        fs::set_permissions(&file, fs::Permissions::from_mode(mode)).unwrap();
        set_mtime(&file, 1_500_000_000, 987_654_321);
        let state = tmp.path().join(format!("state-{name}"));
        let srv = start_server(&lab, &file, "single", &state, &[]);
        assert_eq!(srv.ready.files, 1, "{}", srv.ready.line);
        assert_eq!(srv.ready.bytes, size as u64, "{}", srv.ready.line);

        // into an existing directory: DEST/name
        let into = tmp.path().join(format!("into-{name}"));
        fs::create_dir(&into).unwrap();
        let o = spawn_copy(
            &lab,
            "c1",
            "single",
            &into,
            &tmp.path().join(format!("cache-a-{name}")),
            30,
        )
        .wait(Duration::from_secs(60));
        o.assert_success();
        assert_entries_equal(&file, &into.join(name));
        assert_eq!(
            list_tree(&into),
            vec![PathBuf::from(name)],
            "copying a single-file channel into a directory must create exactly DEST/{name}"
        );

        // to a file path that does not exist yet
        let out = tmp.path().join(format!("out-{name}"));
        fs::create_dir(&out).unwrap();
        let target = out.join("renamed.bin");
        let o = spawn_copy(
            &lab,
            "c1",
            "single",
            &target,
            &tmp.path().join(format!("cache-b-{name}")),
            30,
        )
        .wait(Duration::from_secs(60));
        o.assert_success();
        assert!(
            fs::symlink_metadata(&target)
                .map(|m| m.is_file())
                .unwrap_or(false),
            "copying a single-file channel to {} must create that file",
            target.display()
        );
        assert_entries_equal(&file, &target);
        assert_eq!(list_tree(&out), vec![PathBuf::from("renamed.bin")]);

        // over an existing file of that path: replaced, fetching nothing
        let o = spawn_copy(
            &lab,
            "c1",
            "single",
            &target,
            &tmp.path().join(format!("cache-c-{name}")),
            30,
        )
        .wait(Duration::from_secs(60));
        o.assert_success();
        assert_entries_equal(&file, &target);
        let sum = o.summary();
        assert!(
            sum.network < BLOCK as u64,
            "re-copying an identical file fetched {} B from the network",
            sum.network
        );
        srv.stop();
    }
}

/// Re-copying onto an existing DEST after the server's tree changed fetches only
/// the changed blocks, even with an empty cache.
#[test]
fn recopy_fetches_only_changed_blocks() {
    let lab = Lab::up(LabOptions {
        clients: 1,
        ..Default::default()
    });
    let tmp = tmpdir();
    let src = tmp.path().join("delta");
    let state = tmp.path().join("state");
    let dest = tmp.path().join("dest");
    let mut rng = StdRng::seed_from_u64(0xde17a);
    let blocks = 128usize;
    let big = src.join("big.bin");
    write_random_file(&big, &mut rng, blocks * BLOCK);
    write_random_file(&src.join("other.bin"), &mut rng, 3 * BLOCK + 99);
    fs::write(src.join("small.txt"), b"unchanged\n").unwrap();
    set_mtime(&big, 1_400_000_000, 111);

    let srv = start_server(&lab, &src, "delta", &state, &[]);
    let o = spawn_copy(&lab, "c1", "delta", &dest, &tmp.path().join("cache1"), 30)
        .wait(Duration::from_secs(60));
    o.assert_success();
    assert_trees_equal(&src, &dest);
    srv.stop();

    // change three whole blocks in place and append 10000 bytes
    let changed_blocks = [5u64, 60, 100];
    {
        let mut f = fs::OpenOptions::new().write(true).open(&big).unwrap();
        let mut buf = vec![0u8; BLOCK];
        for b in changed_blocks {
            rng.fill_bytes(&mut buf);
            f.seek(SeekFrom::Start(b * BLOCK as u64)).unwrap();
            f.write_all(&buf).unwrap();
        }
        let mut tail = vec![0u8; 10_000];
        rng.fill_bytes(&mut tail);
        f.seek(SeekFrom::End(0)).unwrap();
        f.write_all(&tail).unwrap();
    }
    set_mtime(&big, 1_400_000_500, 222_333_444);
    let changed_bytes = changed_blocks.len() as u64 * BLOCK as u64 + 10_000;
    let unchanged_bytes = (blocks - changed_blocks.len()) as u64 * BLOCK as u64;

    let srv = start_server(&lab, &src, "delta", &state, &[]);
    let srv_before = lab.port_rx("srv").1;
    let o = spawn_copy(&lab, "c1", "delta", &dest, &tmp.path().join("cache2"), 30)
        .wait(Duration::from_secs(60));
    o.assert_success();
    let srv_sent = lab.port_rx("srv").1 - srv_before;
    assert_trees_equal(&src, &dest);
    assert_no_part_files(&dest);
    let sum = o.summary();
    // file indexes (32 B a leaf for every file) and the directory, plus slack
    // well below one block
    let leaves = (blocks + 1) as u64 + 4 + 1;
    let allowance = leaves * 32 + 4096 + 16 * 1024;
    eprintln!(
        "recopy: changed {changed_bytes} B, fetched {} B from the network, reused {} B, \
         {} B from the cache; server sent {srv_sent} B on the wire; allowance {}",
        sum.network,
        sum.reused,
        sum.cache,
        changed_bytes + allowance
    );
    assert!(
        sum.network <= changed_bytes + allowance,
        "re-copy fetched {} B from the network; only {changed_bytes} B changed \
         (+ {allowance} B for indexes and slack)\n{}",
        sum.network,
        o.stderr
    );
    assert!(
        sum.reused >= unchanged_bytes,
        "re-copy reused only {} B from DEST; {unchanged_bytes} B of big.bin were unchanged\n{}",
        sum.reused,
        o.stderr
    );
    srv.stop();
}

/// A restart with the same --state rehashes nothing of an unchanged tree and
/// publishes the same root.
#[test]
fn restart_does_not_rehash() {
    let lab = Lab::up(LabOptions {
        clients: 1,
        ..Default::default()
    });
    let tmp = tmpdir();
    let src = tmp.path().join("edge");
    make_edge_tree(&src, 0x1cf5_0002);
    let state = tmp.path().join("state");

    let first = start_server(&lab, &src, "edge", &state, &[]);
    let r1 = first.ready.clone();
    let log1 = first.stop();
    let h1 = parse_hashed(&log1);
    let second = start_server(&lab, &src, "edge", &state, &[]);
    let r2 = second.ready.clone();
    // the restarted server serves
    let dest = tmp.path().join("dest");
    let o = spawn_copy(
        &lab,
        "c1",
        "edge:misc/sub",
        &dest,
        &tmp.path().join("cache"),
        30,
    )
    .wait(Duration::from_secs(60));
    let log2 = second.stop();
    let h2 = parse_hashed(&log2);
    eprintln!(
        "restart: first start hashed {h1:?} B, second {h2:?} B; roots {} / {}",
        r1.root, r2.root
    );

    assert_eq!(
        h1.len(),
        1,
        "expected one `indexed ... (N bytes hashed)` line; stderr:\n{log1}"
    );
    assert!(
        h1[0] >= LARGE_FILE_SIZE as u64,
        "the first start hashed only {} B; the tree has {} B",
        h1[0],
        tree_file_bytes(&src)
    );
    assert_eq!(
        h2.len(),
        1,
        "expected one `indexed ... (N bytes hashed)` line; stderr:\n{log2}"
    );
    assert_eq!(
        h2[0], 0,
        "a restart on an unchanged tree with the same --state rehashed {} B",
        h2[0]
    );
    assert_eq!(
        r1.root, r2.root,
        "the root hash changed across a restart on an unchanged tree"
    );
    assert!(
        r2.generation >= r1.generation,
        "the generation went down across a restart: {} then {}",
        r1.generation,
        r2.generation
    );
    o.assert_success();
    assert_trees_equal(&src.join("misc/sub"), &dest);
}

/// A channel nobody serves: non-zero exit after --timeout, naming the channel,
/// and nothing that looks like a file under DEST.
#[test]
fn no_server_times_out() {
    let lab = Lab::up(LabOptions {
        clients: 1,
        ..Default::default()
    });
    let tmp = tmpdir();
    let dest = tmp.path().join("dest");
    let o = spawn_copy(&lab, "c1", "nosuch", &dest, &tmp.path().join("cache"), 3)
        .wait(Duration::from_secs(30));
    eprintln!(
        "no server: exit {} after {:.1} s",
        o.status,
        o.elapsed.as_secs_f64()
    );
    assert!(
        !o.status.success(),
        "copy of a channel nobody serves succeeded:\n{}",
        o.stderr
    );
    assert!(
        o.elapsed < Duration::from_secs(10),
        "copy with --timeout 3 took {:.1} s to give up",
        o.elapsed.as_secs_f64()
    );
    assert!(
        o.stderr.contains("nosuch"),
        "the error does not name the channel `nosuch`:\n{}",
        o.stderr
    );
    let left = non_dirs(&dest);
    assert!(
        left.is_empty(),
        "a failed copy left files under DEST: {left:?}"
    );
}

/// `CHANNEL:SUBPATH` copies a subtree, or one file, and nothing else.
#[test]
fn subpath_copy() {
    let lab = Lab::up(LabOptions {
        clients: 1,
        ..Default::default()
    });
    let tmp = tmpdir();
    let src = tmp.path().join("edge");
    make_edge_tree(&src, 0x1cf5_0003);
    let srv = start_server(&lab, &src, "edge", &tmp.path().join("state"), &[]);

    for (i, sub) in ["misc/sub", "nest/l01/l02", "perms/ro_dir"]
        .iter()
        .enumerate()
    {
        let dest = tmp.path().join(format!("dest{i}"));
        let o = spawn_copy(
            &lab,
            "c1",
            &format!("edge:{sub}"),
            &dest,
            &tmp.path().join(format!("cache{i}")),
            30,
        )
        .wait(Duration::from_secs(60));
        o.assert_success();
        assert_trees_equal(&src.join(sub), &dest);
    }
    // one file of the tree, into a directory
    let dest = tmp.path().join("dest-file");
    fs::create_dir(&dest).unwrap();
    let o = spawn_copy(
        &lab,
        "c1",
        "edge:perms/run.sh",
        &dest,
        &tmp.path().join("cache-file"),
        30,
    )
    .wait(Duration::from_secs(60));
    o.assert_success();
    assert_eq!(list_tree(&dest), vec![PathBuf::from("run.sh")]);
    assert_entries_equal(&src.join("perms/run.sh"), &dest.join("run.sh"));
    // a path that does not exist in the channel
    let dest = tmp.path().join("dest-missing");
    let o = spawn_copy(
        &lab,
        "c1",
        "edge:no/such/dir",
        &dest,
        &tmp.path().join("cache-missing"),
        5,
    )
    .wait(Duration::from_secs(30));
    assert!(
        !o.status.success(),
        "copy of a missing subpath succeeded:\n{}",
        o.stderr
    );
    assert!(
        non_dirs(&dest).is_empty(),
        "a failed copy left files: {:?}",
        non_dirs(&dest)
    );
    srv.stop();
}

/// The basic copy with MLD snooping off on the bridge (everything flooded).
#[test]
fn copy_with_snooping_off() {
    let lab = Lab::up(LabOptions {
        clients: 1,
        snooping: false,
        ..Default::default()
    });
    let tmp = tmpdir();
    let src = tmp.path().join("edge");
    make_edge_tree(&src, 0x1cf5_0004);
    let tree_bytes = tree_file_bytes(&src);
    let srv = start_server(&lab, &src, "edge", &tmp.path().join("state"), &[]);
    let before = lab.port_rx("srv").1;
    let dest = tmp.path().join("dest");
    let o = spawn_copy(&lab, "c1", "edge", &dest, &tmp.path().join("cache"), 30)
        .wait(Duration::from_secs(90));
    o.assert_success();
    let sent = lab.port_rx("srv").1 - before;
    eprintln!(
        "snooping off: {:.1} s, server sent {sent} B = {:.3} x tree",
        o.elapsed.as_secs_f64(),
        sent as f64 / tree_bytes as f64
    );
    assert_trees_equal(&src, &dest);
    assert_no_part_files(&dest);
    std::thread::sleep(Duration::from_secs(1));
    let (idle, _) = server_packets_during(&lab, IDLE_WINDOW);
    eprintln!("snooping off: idle after the copy {idle} packets in {IDLE_WINDOW:?}");
    assert!(
        idle <= MAX_IDLE_PACKETS,
        "idle server sent {idle} packets in {IDLE_WINDOW:?} with snooping off"
    );
    srv.stop();
}
