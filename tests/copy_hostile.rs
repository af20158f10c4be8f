//! `lcfs copy` run as root into a DEST that an unprivileged local user can write in (issue 9,
//! parts 1 to 3), end to end in the namespace lab. Needs root. Run with
//! `cargo test --test copy_hostile -- --test-threads=1`.
//!
//! The attacker is uid 65534 (nobody): shell loops the tests start as that user, bounded by a
//! stop file and by `timeout`. What must hold whatever it does: nothing outside DEST is
//! written, chmodded or touched (a root-only directory beside DEST is compared before and
//! after, modes and mtimes included); nothing private can be read while the copy runs; no
//! setuid bit appears unless `--keep-setuid` asks for it.

mod common;

use common::lab::Lab;
use common::lcfs::{
    assert_no_part_files, s, signal, spawn_copy, spawn_copy_with, start_server, tmpdir, wait_limit,
    CopyOutcome, Server,
};
use common::tree::{assert_trees_equal, set_mtime, write_random_file};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NOBODY: u32 = 65534;
/// A send rate at which copying the test tree takes a few seconds: long enough for the
/// attacker's loops to act while the copy runs.
const SLOW_RATE: &str = "8M";

/// Sets `p`'s permission bits.
fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

fn mode_of(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

/// The published tree: a private key, a 6755 "tool", bulk to make a slow copy last, nested
/// directories of several modes (one private), a sticky shared directory and a symlink.
fn make_tree(root: &Path) {
    let mut rng = StdRng::seed_from_u64(0x9a57_11e5);
    let file = |rel: &str, size: usize, mode: u32, rng: &mut StdRng| {
        let p = root.join(rel);
        write_random_file(&p, rng, size);
        chmod(&p, mode);
        set_mtime(&p, 1_600_000_000, 123_456_789);
    };
    fs::create_dir_all(root.join("a/b/c")).unwrap();
    fs::create_dir_all(root.join("shared")).unwrap();
    file("private.key", 3000, 0o600, &mut rng);
    file("tool", 20_000, 0o6755, &mut rng);
    file("bulk.bin", 2 << 20, 0o644, &mut rng);
    file("note.txt", 100, 0o644, &mut rng);
    file("a/big.bin", 1 << 20, 0o640, &mut rng);
    file("a/small.txt", 200, 0o644, &mut rng);
    file("a/b/c/secret.txt", 2000, 0o600, &mut rng);
    file("a/b/c/deep.bin", 512 << 10, 0o600, &mut rng);
    file("shared/note.txt", 50, 0o644, &mut rng);
    std::os::unix::fs::symlink("a/b", root.join("link")).unwrap();
    for (dir, mode) in [
        ("a/b/c", 0o700),
        ("a/b", 0o755),
        ("a", 0o750),
        ("shared", 0o1777),
    ] {
        chmod(&root.join(dir), mode);
        set_mtime(&root.join(dir), 1_500_000_000, 987_654_321);
    }
}

/// Everything under `dir`, `dir` itself included: path, mode, mtime, contents.
type Snapshot = Vec<(PathBuf, u32, i64, i64, Vec<u8>)>;

fn snapshot(dir: &Path) -> Snapshot {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(p) = todo.pop() {
        let m = fs::symlink_metadata(&p).unwrap();
        let body = if m.is_file() {
            fs::read(&p).unwrap()
        } else {
            Vec::new()
        };
        out.push((p.clone(), m.mode(), m.mtime(), m.mtime_nsec(), body));
        if m.is_dir() {
            todo.extend(fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
    }
    out.sort();
    out
}

/// A root-only directory beside DEST, what the attacker aims the copy at.
struct Outside {
    dir: PathBuf,
    before: Snapshot,
}

impl Outside {
    fn new(tmp: &Path) -> Outside {
        let dir = tmp.join("outside");
        fs::create_dir_all(dir.join("sub")).unwrap();
        fs::write(dir.join("secret"), b"root only\n").unwrap();
        fs::write(dir.join("sub/inner"), b"also root only\n").unwrap();
        chmod(&dir.join("secret"), 0o600);
        chmod(&dir.join("sub"), 0o700);
        chmod(&dir, 0o700);
        set_mtime(&dir.join("sub"), 1_400_000_000, 1);
        set_mtime(&dir, 1_400_000_000, 2);
        let before = snapshot(&dir);
        Outside { dir, before }
    }

    fn assert_unchanged(&self, what: &str) {
        let now = snapshot(&self.dir);
        assert!(
            now == self.before,
            "{what}: the root-only directory outside DEST changed.\nbefore: {:?}\nafter:  {:?}",
            summary(&self.before),
            summary(&now)
        );
    }
}

fn summary(s: &Snapshot) -> Vec<String> {
    s.iter()
        .map(|(p, mode, sec, ns, body)| {
            format!("{} {mode:o} {sec}.{ns:09} {}B", p.display(), body.len())
        })
        .collect()
}

/// A test's scratch space, which nobody may traverse (tempdirs are 0700).
fn scratch() -> tempfile::TempDir {
    let tmp = tmpdir("copyhostile");
    chmod(tmp.path(), 0o755);
    tmp
}

/// An empty DEST of root's, mode 0777 (no sticky bit): the attacker may create, rename and
/// remove entries in it.
fn shared_dest(tmp: &Path, name: &str) -> PathBuf {
    let d = tmp.join(name);
    fs::create_dir(&d).unwrap();
    chmod(&d, 0o777);
    d
}

/// `sh -c SCRIPT` as nobody (no supplementary groups), ended by `timeout` after 90 s at most.
fn as_nobody(script: &str, args: &[&Path]) -> Command {
    let mut c = Command::new("timeout");
    c.args(["90", "sh", "-c", script, "nobody-sh"]);
    c.args(args.iter().map(|p| s(p)));
    c.uid(NOBODY).gid(NOBODY).stdin(Stdio::null());
    c
}

fn run_as_nobody(script: &str, args: &[&Path]) {
    let out = as_nobody(script, args).output().unwrap();
    assert!(
        out.status.success(),
        "as nobody: `{script}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A loop running as nobody until [`Attacker::stop`] creates its stop file (its last
/// argument).
struct Attacker {
    child: Child,
    stop: PathBuf,
    /// Reads the loop's output as it comes, so that a full pipe never blocks the loop.
    output: Option<std::thread::JoinHandle<String>>,
}

impl Attacker {
    fn start(tmp: &Path, script: &str, args: &[&Path]) -> Attacker {
        let stop = tmp.join(format!("stop-{}", rand::random::<u32>()));
        let mut all = args.to_vec();
        all.push(&stop);
        let mut child = as_nobody(script, &all)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let output = std::thread::spawn(move || {
            let mut out = String::new();
            let _ = stdout.read_to_string(&mut out);
            out
        });
        Attacker {
            child,
            stop,
            output: Some(output),
        }
    }

    /// Stops the loop and returns what it printed.
    fn stop(mut self) -> String {
        fs::write(&self.stop, b"").unwrap();
        if wait_limit(&mut self.child, Duration::from_secs(20)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            panic!("the attacker's loop did not stop within 20 s of its stop file");
        }
        self.output
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default()
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        let _ = fs::write(&self.stop, b"");
        if wait_limit(&mut self.child, Duration::from_secs(5)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn serve(lab: &Lab, src: &Path, tmp: &Path, extra: &[&str]) -> Server {
    start_server(lab, src, "hostile", &tmp.join("state"), extra)
}

fn copy_ok(lab: &Lab, spec: &str, dest: &Path, cache: &Path, extra: &[&str]) -> CopyOutcome {
    let o = spawn_copy_with(lab, "c1", spec, dest, cache, Some(30), extra, &[])
        .wait(Duration::from_secs(90));
    o.assert_success();
    o
}

/// After a default copy: the tool lost its setuid and setgid bits and nothing else differs.
fn assert_copied_without_setuid(src: &Path, dest: &Path) {
    assert_eq!(
        mode_of(&dest.join("tool")),
        0o755,
        "the published 6755 tool kept setuid/setgid bits in a default copy"
    );
    assert_eq!(mode_of(&dest.join("shared")), 0o1777, "the sticky bit");
    let mtime = fs::metadata(dest.join("tool")).unwrap().modified().unwrap();
    chmod(&dest.join("tool"), 0o6755);
    assert_eq!(
        fs::metadata(dest.join("tool")).unwrap().modified().unwrap(),
        mtime
    );
    assert_trees_equal(src, dest);
}

/// (a) Symlinks planted by nobody at every name the copy creates, toward a root-only
/// directory: the copy replaces them and touches nothing outside DEST. A directory of
/// nobody's where the copy wants one is refused, naming it and its owner. (c) No setuid bit
/// by default, kept with `--keep-setuid`; a DEST the copy creates gets the published mode.
#[test]
fn planted_symlinks_and_foreign_directories() {
    let lab = Lab::with_clients(1);
    let tmp = scratch();
    let src = tmp.path().join("src");
    make_tree(&src);
    let outside = Outside::new(tmp.path());
    let srv = serve(&lab, &src, tmp.path(), &[]);

    let dest = shared_dest(tmp.path(), "dest");
    run_as_nobody(
        r#"cd "$1" || exit 1
           for n in a shared; do ln -s "$2" "$n" || exit 1; done
           for n in private.key tool bulk.bin note.txt link; do ln -s "$2/secret" "$n" || exit 1; done
           ln -s "$2/secret" .lcfs-part-0123456789abcdef"#,
        &[&dest, &outside.dir],
    );
    copy_ok(&lab, "hostile", &dest, &tmp.path().join("cache1"), &[]);
    outside.assert_unchanged("copy over planted symlinks");
    let theirs = dest.join(".lcfs-part-0123456789abcdef");
    assert!(
        fs::symlink_metadata(&theirs).is_ok(),
        "another user's part-named entry was removed"
    );
    fs::remove_file(&theirs).unwrap();
    assert_eq!(
        mode_of(&dest),
        0o777,
        "a DEST the copy did not make changed"
    );
    assert_copied_without_setuid(&src, &dest);

    let dest2 = shared_dest(tmp.path(), "dest2");
    run_as_nobody(
        r#"mkdir -m 777 "$1/a" && ln -s "$2" "$1/a/b""#,
        &[&dest2, &outside.dir],
    );
    let o = spawn_copy(
        &lab,
        "c1",
        "hostile",
        &dest2,
        &tmp.path().join("cache2"),
        30,
    )
    .wait(Duration::from_secs(60));
    o.assert_failure("copy into a DEST holding nobody's directory where it wants one");
    let named = format!("{}", dest2.join("a").display());
    assert!(
        o.stderr.contains(&named) && o.stderr.contains("uid 65534"),
        "the refusal does not name {named} and its owner uid 65534:\n{}",
        o.stderr
    );
    outside.assert_unchanged("copy into nobody's directory");

    let made = tmp.path().join("made/dest3");
    copy_ok(
        &lab,
        "hostile",
        &made,
        &tmp.path().join("cache1"),
        &["--keep-setuid"],
    );
    assert_eq!(mode_of(&made.join("tool")), 0o6755, "--keep-setuid");
    assert_trees_equal(&src, &made);
    let sub = tmp.path().join("made/dest4");
    copy_ok(&lab, "hostile:a", &sub, &tmp.path().join("cache1"), &[]);
    let (want, got) = (
        fs::metadata(src.join("a")).unwrap(),
        fs::metadata(&sub).unwrap(),
    );
    assert_eq!(
        (got.mode() & 0o7777, got.mtime(), got.mtime_nsec()),
        (want.mode() & 0o7777, want.mtime(), want.mtime_nsec()),
        "a DEST the copy created lacks the published directory's mode and mtime"
    );
    srv.stop();
}

/// What a root poll of DEST saw while a copy ran.
#[derive(Default)]
struct Watch {
    polls: u64,
    /// Polls that saw part files.
    with_parts: u64,
    violations: Vec<String>,
}

/// Every entry below `root` with its lstat, skipping what vanishes meanwhile.
fn entries(root: &Path) -> Vec<(PathBuf, fs::Metadata)> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_owned()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(m) = fs::symlink_metadata(e.path()) else {
                continue;
            };
            if m.is_dir() {
                todo.push(e.path());
            }
            out.push((e.path(), m));
        }
    }
    out
}

fn is_part(p: &Path) -> bool {
    p.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with(".lcfs-part-"))
}

/// Polls DEST as root until the copy exits. A staged file must be 0600 whenever seen, unless
/// its directory is closed to others (0700, the copy's own): there its creator gives it its
/// published mode before the rename (`copy/staging.rs`), and no one else can reach it (a
/// directory made between this poll's two listings is looked at after them). A
/// directory must be 0700 in any poll after which part files still exist (the copy sets
/// directory modes only once every part is renamed, so those polls were all before it).
fn watch(run: &mut common::lcfs::CopyRun, dest: &Path, limit: Duration) -> Watch {
    let mut w = Watch::default();
    let deadline = Instant::now() + limit;
    while run.running() && Instant::now() < deadline {
        let dirs: Vec<_> = entries(dest)
            .into_iter()
            .filter(|(_, m)| m.is_dir())
            .collect();
        let parts: Vec<_> = entries(dest)
            .into_iter()
            .filter(|(p, _)| is_part(p))
            .collect();
        w.polls += 1;
        for (p, m) in &parts {
            // A staged symlink's own mode is always 0777 and grants nothing.
            if m.is_file() && m.mode() & 0o7777 != 0o600 {
                // As listed before the parts: later the copy may have finished and opened it.
                // A directory the copy made after that listing is looked at now; if it is
                // open now and the part is gone, the copy renamed it and then opened the
                // directory, as it should.
                let dir = dirs.iter().find(|(d, _)| Some(d.as_path()) == p.parent());
                let closed_dir =
                    |d: &fs::Metadata| d.mode() & 0o7777 == 0o700 && d.uid() == m.uid();
                let closed = match dir {
                    Some((_, d)) => closed_dir(d),
                    None => p
                        .parent()
                        .and_then(|d| fs::symlink_metadata(d).ok())
                        .is_some_and(|d| closed_dir(&d) || fs::symlink_metadata(p).is_err()),
                };
                if !closed {
                    w.violations.push(format!(
                        "part {} is {:o} in a directory open to others",
                        p.display(),
                        m.mode() & 0o7777
                    ));
                }
            }
        }
        if !parts.is_empty() {
            w.with_parts += 1;
            for (p, m) in &dirs {
                if m.mode() & 0o7777 != 0o700 {
                    w.violations.push(format!(
                        "directory {} is {:o}",
                        p.display(),
                        m.mode() & 0o7777
                    ));
                }
            }
        }
    }
    w
}

/// Tries, as nobody, to read any part file it can see and the private files by their final
/// names, until stopped; prints `READ path` for each success.
const READER: &str = r#"d="$1"; stop="$2"; n=0
while [ ! -e "$stop" ]; do
  for f in "$d"/.lcfs-part-* "$d"/*/.lcfs-part-* "$d"/*/*/.lcfs-part-* "$d"/*/*/*/.lcfs-part-* \
           "$d"/private.key "$d"/a/b/c/secret.txt "$d"/a/b/c/deep.bin; do
    if [ -e "$f" ] && head -c 1 "$f" >/dev/null 2>&1; then echo "READ $f"; fi
  done
  n=$((n+1))
done
echo "rounds $n""#;

/// (b) While a slow copy runs, every part file is 0600 and every new directory 0700, and a
/// reader running as nobody never opens a part file nor a private file. An interrupted copy
/// leaves no part file behind.
#[test]
fn nothing_private_is_readable_while_copying() {
    let lab = Lab::with_clients(1);
    let tmp = scratch();
    let src = tmp.path().join("src");
    make_tree(&src);
    let srv = serve(&lab, &src, tmp.path(), &["--rate", SLOW_RATE]);

    let dest = shared_dest(tmp.path(), "dest");
    let reader = Attacker::start(tmp.path(), READER, &[&dest]);
    let mut run = spawn_copy(&lab, "c1", "hostile", &dest, &tmp.path().join("cache1"), 30);
    let w = watch(&mut run, &dest, Duration::from_secs(90));
    let o = run.wait(Duration::from_secs(10));
    let read = reader.stop();
    o.assert_success();
    eprintln!(
        "watched {} polls, {} with part files; reader: {}",
        w.polls,
        w.with_parts,
        read.lines().last().unwrap_or("")
    );
    assert!(
        w.violations.is_empty(),
        "while the copy ran: {:?}",
        &w.violations[..w.violations.len().min(20)]
    );
    assert!(
        w.with_parts >= 3,
        "only {} polls saw the copy's part files: the copy was not watched while it ran",
        w.with_parts
    );
    let reads: Vec<_> = read.lines().filter(|l| l.starts_with("READ")).collect();
    assert!(reads.is_empty(), "nobody read: {reads:?}");
    assert_copied_without_setuid(&src, &dest);

    // interrupted once its part files exist: exit 130 and none left
    let dest2 = shared_dest(tmp.path(), "dest2");
    let mut run = spawn_copy(
        &lab,
        "c1",
        "hostile",
        &dest2,
        &tmp.path().join("cache2"),
        30,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !entries(&dest2).iter().any(|(p, _)| is_part(p)) {
        assert!(
            run.running(),
            "the copy ended before any part file appeared"
        );
        assert!(
            Instant::now() < deadline,
            "no part file appeared within 30 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    signal(&run.child, libc::SIGINT);
    let o = run.wait(Duration::from_secs(20));
    assert_eq!(o.status.code(), Some(130), "stderr:\n{}", o.stderr);
    assert_no_part_files(&dest2);
    srv.stop();
}

/// Swaps every part file nobody can see for a symlink to the target, as the copy stages.
const PART_SWAPPER: &str = r#"d="$1"; target="$2"; stop="$3"
cd "$d" || exit 1
while [ ! -e "$stop" ]; do
  for p in .lcfs-part-*; do
    [ -f "$p" ] && [ ! -L "$p" ] || continue
    ln -sf "$target" .swap && mv -f .swap "$p" && echo "swapped $p"
  done
done"#;

/// Moves every directory the copy makes in DEST aside and plants a symlink to the target
/// in its place, as soon as it appears.
const DIR_SWAPPER: &str = r#"d="$1"; target="$2"; stop="$3"; n=0
cd "$d" || exit 1
while [ ! -e "$stop" ]; do
  for x in a shared; do
    [ -d "$x" ] && [ ! -L "$x" ] || continue
    n=$((n+1)); mv "$x" "$x.moved$n" && ln -s "$target" "$x" && echo "swapped $x"
  done
done"#;

/// Races while a slow copy runs: nobody swaps the copy's part files for symlinks to a
/// root-only file, then (another copy) its freshly made directories for symlinks to a
/// root-only directory. Whatever the copy then does, nothing outside DEST changes.
#[test]
fn swaps_during_the_copy_stay_inside_dest() {
    let lab = Lab::with_clients(1);
    let tmp = scratch();
    let src = tmp.path().join("src");
    make_tree(&src);
    let outside = Outside::new(tmp.path());
    let srv = serve(&lab, &src, tmp.path(), &["--rate", SLOW_RATE]);
    let secret = outside.dir.join("secret");
    let runs: [(&str, &str, &Path); 2] = [
        ("parts", PART_SWAPPER, &secret),
        ("dirs", DIR_SWAPPER, &outside.dir),
    ];
    for (what, script, target) in runs {
        let dest = shared_dest(tmp.path(), &format!("dest-{what}"));
        let attacker = Attacker::start(tmp.path(), script, &[&dest, target]);
        let cache = tmp.path().join(format!("cache-{what}"));
        let o = spawn_copy(&lab, "c1", "hostile", &dest, &cache, 30).wait(Duration::from_secs(90));
        let swaps = attacker.stop();
        let n = swaps.lines().filter(|l| l.starts_with("swapped")).count();
        eprintln!(
            "{what}: {n} swaps; copy exit {} after {:.1} s",
            o.status,
            o.elapsed.as_secs_f64()
        );
        assert!(n > 0, "{what}: the attacker never got to swap anything");
        outside.assert_unchanged(&format!("copy while nobody swapped {what}"));
        if what == "parts" {
            o.assert_failure("a copy whose part files were swapped for symlinks");
            assert!(
                o.stderr.contains("replaced"),
                "the failure does not say a staged file was replaced:\n{}",
                o.stderr
            );
            let ours: Vec<_> = entries(&dest)
                .into_iter()
                .filter(|(p, m)| is_part(p) && m.uid() == 0)
                .collect();
            assert!(ours.is_empty(), "part files left: {ours:?}");
        }
    }
    srv.stop();
}
