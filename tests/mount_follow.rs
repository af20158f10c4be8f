//! A running `lcfs mount` follows the publisher (issue 10, part 3), in the namespace lab.
//! Needs root, /dev/fuse and iproute2.
//!
//! The server publishes a new generation when it is restarted over a changed tree with the
//! same `--state` (generations only grow). While four reader threads loop over the mount,
//! opening, reading and checksumming every file, the tree is changed and the server restarted
//! three times, with changes of every kind: content, delete, add, rename, chmod, symlink
//! retarget, mkdir, append. The tests check that:
//! - each change is visible to new opens within 5 s of the server's `ready` line, and
//!   `getfattr -n user.lcfs.generation` shows the new generation;
//! - no read returns a mix of versions (every checksum is one of the file's known versions),
//!   no unchanged file ever fails, and a changed file never fails with anything but ESTALE,
//!   within a bound of the server's return;
//! - a handle opened before a change keeps returning its version from the cache, and fails
//!   with ESTALE, fast, for bytes the server no longer has;
//! - unchanged files keep their inode numbers; a pinned mount (`CHANNEL@ROOT`) does not move;
//! - a mount started offline from its cached root moves to the live generation when the
//!   server comes back.

mod common;

use common::lab::Lab;
use common::lcfs::{s, start_server, start_server_at, tail, tmpdir, within, Mount, Server};
use common::tree::{b3, seeded, BLOCK};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const CHANNEL: &str = "follow";
/// How long after the server's `ready` line a change must be visible to new opens.
const VISIBLE_WITHIN: Duration = Duration::from_secs(5);
/// How long after the server's return a read of a changed file may still wait.
const CHANGED_WAIT: Duration = Duration::from_millis(2500);

// ---------------------------------------------------------------- helpers

fn write(root: &Path, rel: &str, bytes: &[u8]) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, bytes).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
}

/// `getfattr --only-values -n NAME PATH`, as a user would ask.
fn getfattr(path: &Path, name: &str) -> String {
    let out = Command::new("getfattr")
        .args(["--only-values", "-n", name, s(path)])
        .output()
        .unwrap_or_else(|e| panic!("cannot run getfattr (package attr): {e}"));
    assert!(
        out.status.success(),
        "getfattr -n {name} {} failed: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn generation(mnt: &Path) -> u64 {
    getfattr(mnt, "user.lcfs.generation")
        .parse()
        .expect("a numeric generation")
}

fn ino(p: &Path) -> u64 {
    fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
        .ino()
}

// ---------------------------------------------------------------- the tree and its versions

/// Every content each path ever has, and which paths change or may be absent.
#[derive(Default)]
struct Versions {
    known: HashMap<String, HashSet<[u8; 32]>>,
    /// Paths whose content changes or that come and go: ESTALE and ENOENT are allowed.
    changing: HashSet<String>,
}

impl Versions {
    fn add(&mut self, rel: &str, bytes: &[u8], changing: bool) {
        self.known.entry(rel.into()).or_default().insert(b3(bytes));
        if changing {
            self.changing.insert(rel.into());
        }
    }
}

/// The contents of every round: round 0 is the first publication.
struct Plan {
    keep_a: Vec<u8>,
    keep_c: Vec<u8>,
    chg: [Vec<u8>; 4],
    grow: Vec<u8>,
    held: [Vec<u8>; 2],
}

impl Plan {
    fn new() -> Plan {
        Plan {
            keep_a: seeded(1, 5 * BLOCK + 77),
            keep_c: seeded(2, 2 * BLOCK),
            chg: [
                seeded(10, 8 * BLOCK + 5),
                seeded(11, 7 * BLOCK + 1000),
                seeded(12, 9 * BLOCK),
                seeded(13, 300),
            ],
            grow: seeded(20, 5 * BLOCK),
            held: [seeded(30, 64 * BLOCK), seeded(31, 64 * BLOCK)],
        }
    }

    fn versions(&self) -> Versions {
        let mut v = Versions::default();
        v.add("keep/a.bin", &self.keep_a, false);
        v.add("keep/small.txt", b"small and unchanged\n", false);
        v.add("keep/deep/c.bin", &self.keep_c, false);
        v.add("mode.sh", b"#!/bin/sh\necho mode\n", false);
        for c in &self.chg {
            v.add("chg.bin", c, true);
        }
        v.add("del.txt", b"deleted in round 1\n", true);
        v.add("new.txt", b"added in round 1\n", true);
        v.add("ren-old.txt", b"renamed in round 2\n", true);
        v.add("ren-new.txt", b"renamed in round 2\n", true);
        v.add("made/inside.txt", b"made in round 3\n", true);
        v.add("grow.bin", &self.grow[..4 * BLOCK], true);
        v.add("grow.bin", &self.grow, true);
        v
    }

    /// Round 0: the first tree.
    fn create(&self, src: &Path) {
        write(src, "keep/a.bin", &self.keep_a);
        write(src, "keep/small.txt", b"small and unchanged\n");
        write(src, "keep/deep/c.bin", &self.keep_c);
        write(src, "mode.sh", b"#!/bin/sh\necho mode\n");
        fs::set_permissions(src.join("mode.sh"), fs::Permissions::from_mode(0o644)).unwrap();
        write(src, "chg.bin", &self.chg[0]);
        write(src, "del.txt", b"deleted in round 1\n");
        write(src, "ren-old.txt", b"renamed in round 2\n");
        write(src, "grow.bin", &self.grow[..4 * BLOCK]);
        write(src, "held.bin", &self.held[0]);
        std::os::unix::fs::symlink("keep/small.txt", src.join("link")).unwrap();
    }

    /// The changes of round `n` (1..=3).
    fn change(&self, src: &Path, n: usize) {
        write(src, "chg.bin", &self.chg[n]);
        match n {
            1 => {
                fs::remove_file(src.join("del.txt")).unwrap();
                fs::set_permissions(src.join("mode.sh"), fs::Permissions::from_mode(0o755))
                    .unwrap();
                write(src, "new.txt", b"added in round 1\n");
                write(src, "held.bin", &self.held[1]);
            }
            2 => {
                fs::rename(src.join("ren-old.txt"), src.join("ren-new.txt")).unwrap();
                fs::remove_file(src.join("link")).unwrap();
                std::os::unix::fs::symlink("chg.bin", src.join("link")).unwrap();
            }
            _ => {
                write(src, "made/inside.txt", b"made in round 3\n");
                write(src, "grow.bin", &self.grow);
            }
        }
    }

    /// Whether the mount at `mnt` shows round `n` to new opens.
    fn visible(&self, mnt: &Path, n: usize) -> bool {
        let read = |rel: &str| fs::read(mnt.join(rel)).ok();
        let exists = |rel: &str| fs::symlink_metadata(mnt.join(rel)).is_ok();
        if read("chg.bin").as_deref() != Some(&self.chg[n][..]) {
            return false;
        }
        match n {
            1 => {
                let mode = fs::metadata(mnt.join("mode.sh")).map(|m| m.mode() & 0o7777);
                !exists("del.txt")
                    && mode.is_ok_and(|m| m == 0o755)
                    && read("new.txt").is_some()
                    && read("held.bin").as_deref() == Some(&self.held[1][..])
            }
            2 => {
                !exists("ren-old.txt")
                    && read("ren-new.txt").is_some()
                    && fs::read_link(mnt.join("link")).is_ok_and(|t| t == Path::new("chg.bin"))
                    && fs::read_dir(mnt)
                        .is_ok_and(|d| d.flatten().any(|e| e.file_name() == "ren-new.txt"))
            }
            _ => {
                read("made/inside.txt").is_some()
                    && read("grow.bin").as_deref() == Some(&self.grow[..])
            }
        }
    }
}

// ---------------------------------------------------------------- readers

/// One open-read-checksum of a file.
struct Op {
    path: String,
    start: Instant,
    end: Instant,
    outcome: Result<(), String>,
}

#[derive(Default)]
struct Tally {
    ok: u64,
    stale: u64,
    absent: u64,
    /// Reads that broke a rule, with what happened.
    bad: Vec<String>,
    /// Every op on a changing file, for the wait bound.
    changing_ops: Vec<Op>,
}

/// Opens, reads and checksums `rel` under `mnt`.
fn read_once(mnt: &Path, rel: &str) -> io::Result<Vec<u8>> {
    let mut f = fs::File::open(mnt.join(rel))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    Ok(buf)
}

fn judge(v: &Versions, rel: &str, r: io::Result<Vec<u8>>, tally: &mut Tally) -> Result<(), String> {
    let changing = v.changing.contains(rel);
    match r {
        Ok(bytes) if v.known[rel].contains(&b3(&bytes)) => {
            tally.ok += 1;
            Ok(())
        }
        Ok(bytes) => Err(format!(
            "{rel}: {} bytes that are none of its versions (a mix?)",
            bytes.len()
        )),
        Err(e) if changing && e.raw_os_error() == Some(libc::ESTALE) => {
            tally.stale += 1;
            Ok(())
        }
        Err(e) if changing && e.kind() == io::ErrorKind::NotFound => {
            tally.absent += 1;
            Ok(())
        }
        Err(e) => Err(format!("{rel}: {e}")),
    }
}

fn spawn_readers(
    n: u64,
    mnt: &Path,
    versions: &Arc<Versions>,
    stop: &Arc<AtomicBool>,
) -> Vec<JoinHandle<Tally>> {
    (0..n)
        .map(|i| {
            let (mnt, v, stop) = (mnt.to_path_buf(), versions.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(100 + i);
                let mut paths: Vec<String> = v.known.keys().cloned().collect();
                paths.sort();
                let mut tally = Tally::default();
                while !stop.load(Ordering::Relaxed) {
                    paths.shuffle(&mut rng);
                    for rel in &paths {
                        let start = Instant::now();
                        let r = read_once(&mnt, rel);
                        let outcome = judge(&v, rel, r, &mut tally);
                        if let Err(e) = &outcome {
                            tally.bad.push(e.clone());
                        }
                        if v.changing.contains(rel) {
                            let end = Instant::now();
                            let path = rel.clone();
                            tally.changing_ops.push(Op {
                                path,
                                start,
                                end,
                                outcome,
                            });
                        }
                    }
                    // Leave the two cores some room for the server and the mount.
                    std::thread::sleep(Duration::from_millis(20));
                }
                tally
            })
        })
        .collect()
}

/// Restarts the server over the tree as it is now; returns it and when it was ready.
fn restart(lab: &Lab, srv: Server, src: &Path, state: &Path, extra: &[&str]) -> (Server, Instant) {
    srv.stop();
    let srv = start_server(lab, src, CHANNEL, state, extra);
    (srv, Instant::now())
}

// ---------------------------------------------------------------- tests

/// Four readers loop over the mount while the server is restarted over three changed trees.
#[test]
fn a_mount_follows_the_publisher() {
    let lab = Lab::with_clients(1);
    let tmp = tmpdir("follow");
    let (src, state) = (tmp.path().join("src"), tmp.path().join("state"));
    let plan = Plan::new();
    plan.create(&src);
    let versions = Arc::new(plan.versions());
    let mut srv = start_server(&lab, &src, CHANNEL, &state, &[]);
    let first = srv.ready.clone();

    let mnt = tmp.path().join("mnt");
    let m = Mount::new(
        &lab,
        "c1",
        CHANNEL,
        &mnt,
        &tmp.path().join("cache"),
        10,
        &[],
    );
    let pinned = format!("{CHANNEL}@{}", first.root);
    let pin_mnt = tmp.path().join("mnt-pin");
    let pin_cache = tmp.path().join("cache-pin");
    let pin = Mount::new(&lab, "c1", &pinned, &pin_mnt, &pin_cache, 10, &[]);
    assert_eq!(fs::read(pin_mnt.join("chg.bin")).unwrap(), plan.chg[0]);
    assert_eq!(generation(&mnt), first.generation);

    let keep: Vec<PathBuf> = ["keep/a.bin", "keep/deep/c.bin", "keep", "mode.sh"]
        .iter()
        .map(|p| mnt.join(p))
        .collect();
    let inos: Vec<u64> = keep.iter().map(|p| ino(p)).collect();
    // A handle of held.bin, opened and partly read before the change.
    let held = fs::File::open(mnt.join("held.bin")).unwrap();
    let mut head = vec![0; BLOCK];
    held.read_exact_at(&mut head, 0).unwrap();
    assert!(head == plan.held[0][..BLOCK]);

    let stop = Arc::new(AtomicBool::new(false));
    let readers = spawn_readers(4, &mnt, &versions, &stop);
    std::thread::sleep(Duration::from_millis(500));
    let mut readies = vec![Instant::now()];
    for round in 1..=3 {
        plan.change(&src, round);
        let (next, ready) = restart(&lab, srv, &src, &state, &[]);
        srv = next;
        readies.push(ready);
        let gen = srv.ready.generation;
        let took = within(VISIBLE_WITHIN, || {
            generation(&mnt) == gen && plan.visible(&mnt, round)
        });
        let took = took.unwrap_or_else(|| {
            panic!(
                "round {round}: generation {gen} not visible to new opens {VISIBLE_WITHIN:?} after the server's ready line (mount shows {})\n--- mount log ---\n{}",
                getfattr(&mnt, "user.lcfs.generation"),
                tail(&m.log_text(), 60)
            )
        });
        eprintln!("round {round}: generation {gen} visible {took:?} after the ready line");
        let now: Vec<u64> = keep.iter().map(|p| ino(p)).collect();
        assert_eq!(
            now, inos,
            "unchanged entries changed inode numbers in round {round}"
        );
        if round == 1 {
            check_held_handle(&held, &plan, &m);
        }
        // The pinned mount does not move.
        assert_eq!(generation(&pin_mnt), first.generation);
        assert_eq!(getfattr(&pin_mnt, "user.lcfs.root"), first.root);
        assert_eq!(fs::read(pin_mnt.join("chg.bin")).unwrap(), plan.chg[0]);
    }
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let tallies: Vec<Tally> = readers.into_iter().map(|h| h.join().unwrap()).collect();
    check_readers(&tallies, &readies, &m);
    // Closed before the unmount: an open handle makes it lazy, and the daemon then wrote
    // its log while the temporary directory was being removed, which left it behind.
    drop(held);
    drop(pin);
    drop(m);
    srv.stop();
}

/// The handle opened at round 0 reads its version from the cache, and fails with ESTALE,
/// fast, where the server no longer has it.
fn check_held_handle(held: &fs::File, plan: &Plan, m: &Mount) {
    let mut head = vec![0; BLOCK];
    held.read_exact_at(&mut head, 0).unwrap();
    assert!(
        head == plan.held[0][..BLOCK],
        "the old handle read new bytes"
    );
    let mut far = vec![0; 4096];
    let t = Instant::now();
    let r = held.read_at(&mut far, 48 * BLOCK as u64);
    let took = t.elapsed();
    eprintln!("old handle, uncached block: {r:?} after {took:?}");
    match r {
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(libc::ESTALE),
            "the old handle's uncached read failed with {e}, not ESTALE\n--- mount log ---\n{}",
            tail(&m.log_text(), 40)
        ),
        Ok(_) => panic!("the old handle read a block the server no longer sends (cached?)"),
    }
    assert!(took < Duration::from_secs(2), "ESTALE took {took:?}");
}

/// No reader saw a mix, a failure of an unchanged file, or a long wait on a changed one.
fn check_readers(tallies: &[Tally], readies: &[Instant], m: &Mount) {
    let (ok, stale, absent) = tallies.iter().fold((0, 0, 0), |(o, s, a), t| {
        (o + t.ok, s + t.stale, a + t.absent)
    });
    eprintln!("readers: {ok} good reads, {stale} ESTALE, {absent} absent");
    let bad: Vec<&String> = tallies.iter().flat_map(|t| &t.bad).collect();
    assert!(
        bad.is_empty(),
        "{} bad reads, first: {:?}\n--- mount log ---\n{}",
        bad.len(),
        &bad[..bad.len().min(10)],
        tail(&m.log_text(), 60)
    );
    assert!(ok > 100, "the readers read too little: {ok}");
    // A read of a changed file may wait while the server is away, but not long after it is
    // back: the old version's objects fail as stale, the new version's arrive.
    let mut worst = Duration::ZERO;
    for op in tallies.iter().flat_map(|t| &t.changing_ops) {
        let back = readies.iter().rev().find(|r| **r <= op.end).copied();
        let from = back.map_or(op.start, |b| b.max(op.start));
        let waited = op.end.saturating_duration_since(from);
        worst = worst.max(waited);
        assert!(
            waited <= CHANGED_WAIT,
            "a read of {} ({:?}) took {waited:?} after the server was back",
            op.path,
            op.outcome
        );
    }
    eprintln!("longest wait on a changed file after the server was back: {worst:?}");
}

/// A mount started offline from its cached root moves to the live generation once the
/// server is back.
#[test]
fn an_offline_mount_follows_when_the_server_returns() {
    let lab = Lab::with_clients(1);
    let tmp = tmpdir("follow");
    let (src, state) = (tmp.path().join("src"), tmp.path().join("state"));
    let plan = Plan::new();
    plan.create(&src);
    let srv = start_server(&lab, &src, CHANNEL, &state, &[]);
    let first = srv.ready.generation;
    let (mnt, cache) = (tmp.path().join("mnt"), tmp.path().join("cache"));
    let m = Mount::new(&lab, "c1", CHANNEL, &mnt, &cache, 10, &[]);
    assert_eq!(fs::read(mnt.join("keep/a.bin")).unwrap(), plan.keep_a);
    m.unmount();
    srv.stop();

    let m = Mount::new(&lab, "c1", CHANNEL, &mnt, &cache, 10, &[]);
    let server = getfattr(&mnt, "user.lcfs.server");
    assert!(
        server.starts_with("offline"),
        "user.lcfs.server is {server:?}"
    );
    assert_eq!(generation(&mnt), first);
    let a = ino(&mnt.join("keep/a.bin"));
    assert_eq!(fs::read(mnt.join("keep/a.bin")).unwrap(), plan.keep_a);

    plan.change(&src, 1);
    let srv = start_server(&lab, &src, CHANNEL, &state, &[]);
    let gen = srv.ready.generation;
    let took = within(VISIBLE_WITHIN, || {
        generation(&mnt) == gen
            && getfattr(&mnt, "user.lcfs.server") == "online"
            && plan.visible(&mnt, 1)
    })
    .unwrap_or_else(|| {
        panic!(
            "the offline mount did not move to generation {gen} within {VISIBLE_WITHIN:?} of the server's return\n--- mount log ---\n{}",
            tail(&m.log_text(), 60)
        )
    });
    eprintln!("offline mount online at generation {gen} {took:?} after the ready line");
    assert_eq!(
        ino(&mnt.join("keep/a.bin")),
        a,
        "an unchanged file changed inode"
    );
    drop(m);
    srv.stop();
}

/// A second host publishing the channel, with a newer generation, does not move a mount that
/// trusts the first publisher: every record is checked like the first one.
#[test]
fn a_mount_does_not_follow_another_publisher() {
    let lab = Lab::with_clients(2);
    let tmp = tmpdir("follow");
    let (src, state) = (tmp.path().join("src"), tmp.path().join("state"));
    let plan = Plan::new();
    plan.create(&src);
    let srv = start_server(&lab, &src, CHANNEL, &state, &[]);
    let first = srv.ready.generation;
    let mnt = tmp.path().join("mnt");
    let m = Mount::new(
        &lab,
        "c1",
        CHANNEL,
        &mnt,
        &tmp.path().join("cache"),
        10,
        &[],
    );

    let rogue_src = tmp.path().join("rogue");
    plan.create(&rogue_src);
    plan.change(&rogue_src, 1);
    let rogue_state = tmp.path().join("rogue-state");
    // Generations are Unix seconds: let the clock pass the first one, so that the rogue's is
    // higher and would be moved to if it were trusted.
    let unix = || {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        now.unwrap().as_secs()
    };
    assert!(within(Duration::from_secs(3), || unix() > first).is_some());
    let rogue = start_server_at(&lab, "c2", &rogue_src, CHANNEL, &rogue_state, &[], &[]);
    assert!(rogue.ready.generation > first);
    // The mount's log says when it refused the rogue's record: the event to wait for.
    let refused = format!("ignoring a root record from {}", lab.addr("c2"));
    let seen = within(Duration::from_secs(10), || m.log_text().contains(&refused));
    assert!(
        seen.is_some(),
        "the mount never logged {refused:?}\n--- mount log ---\n{}",
        tail(&m.log_text(), 40)
    );
    assert_eq!(
        generation(&mnt),
        first,
        "the mount followed another publisher"
    );
    assert_eq!(fs::read(mnt.join("chg.bin")).unwrap(), plan.chg[0]);
    let line = m.log_text();
    let line = line
        .lines()
        .find(|l| l.contains(&refused))
        .unwrap_or_default();
    assert!(line.contains("--allow-new-publisher"), "{line}");
    drop(m);
    rogue.stop();
    srv.stop();
}
