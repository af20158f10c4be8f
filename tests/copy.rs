//! `lcfs serve` + `lcfs copy` end to end in the namespace lab (DESIGN.md sections
//! 3, 4 and 9; issue 2's acceptance criteria). Needs root. Run with
//! `cargo test --test copy -- --test-threads=1` on a small machine.
//!
//! The lab's kernel may lack sch_netem: loss and duplication then come from
//! netlab's BPF fallback, and delay/reorder are not available, so these tests use
//! loss (and duplication) only.

mod common;

use common::lab::{Lab, LabOptions};
use common::lcfs::{
    assert_no_part_files, assert_nothing_written, describe, parse_hashed, parse_sent, spawn_copy,
    spawn_copy_wrapped, start_server, start_server_env, tmpdir, CopyOutcome, CopyRun, Mount,
};
use common::tree::{
    assert_entries_equal, assert_trees_equal, list_tree, make_edge_tree, object_path, set_mtime,
    tree_file_bytes, tree_file_count, write_random_file, BLOCK, LARGE_FILE_SIZE,
};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The product requirement: bytes the server sends for three lossy receivers
/// together, over the tree's file bytes.
/// The tests here measure what the server sends and how long receivers take: they run one
/// at a time, so that another lab's transfers on the same two cores do not skew them.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

const MAX_SEND_RATIO: f64 = 1.6;
/// Packets an idle server may send in [`IDLE_WINDOW`].
const MAX_IDLE_PACKETS: u64 = 20;
const IDLE_WINDOW: Duration = Duration::from_secs(5);

/// `lcfs copy SPEC DEST --timeout 30` in `node`, waited for up to 60 s;
/// panics unless it succeeds.
fn copy_ok(lab: &Lab, node: &str, spec: &str, dest: &Path, cache: &Path) -> CopyOutcome {
    let o = spawn_copy(lab, node, spec, dest, cache, 30).wait(Duration::from_secs(60));
    o.assert_success();
    o
}

/// Starts `lcfs copy SPEC TMP/dest-<client> --timeout 30` in every client, each
/// with its own cache `TMP/cache-<client>`; returns the runs and their DESTs.
fn spawn_copy_in_every_client(lab: &Lab, tmp: &Path, spec: &str) -> Vec<(CopyRun, PathBuf)> {
    lab.client_names()
        .iter()
        .map(|c| {
            let dest = tmp.join(format!("dest-{c}"));
            let cache = tmp.join(format!("cache-{c}"));
            (spawn_copy(lab, c, spec, &dest, &cache, 30), dest)
        })
        .collect()
}

/// Packets and bytes the server sent (srv's bridge port rx) during `window`.
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
    let _serial = serial();
    let lab = Lab::up(LabOptions {
        clients: 3,
        loss: Some(5.0),
        ..Default::default()
    });
    let tmp = tmpdir("copy");
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
    let state = tmp.path().join("state");
    let serve = || {
        let srv = start_server(&lab, &src, "edge", &state, &[]);
        assert_eq!(
            (srv.ready.files, srv.ready.bytes),
            (tree_files, tree_bytes),
            "ready line's files/bytes differ from the source tree's regular files: {}",
            srv.ready.line
        );
        srv
    };

    // Three rounds of three copies, each from a freshly started server into fresh destinations
    // and caches. Every copy must be right every time; the byte ratio is judged on the median,
    // as benchmarks are, because three receivers and a server share two cores here and one
    // round's ratio moves with the machine's load.
    let mut ratios = Vec::new();
    let mut srv = serve();
    for round in 0..3 {
        if round > 0 {
            srv.stop();
            srv = serve();
        }
        let dir = tmp.path().join(format!("round{round}"));
        fs::create_dir_all(&dir).unwrap();
        let before = lab.port_rx("srv");
        let runs = spawn_copy_in_every_client(&lab, &dir, "edge");
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
        let (port_bytes, port_packets) = (after.1 - before.1, after.0 - before.0);
        let ratio = port_bytes as f64 / tree_bytes as f64;
        eprintln!(
            "three_receivers_with_loss round {round}: server egress during the copies (bridge \
             port rx) {port_bytes} B in {port_packets} packets = {ratio:.3} x the tree's \
             {tree_bytes} B in {tree_files} files"
        );
        ratios.push(ratio);
    }

    // quiet once every receiver has finished
    std::thread::sleep(Duration::from_secs(1));
    let (idle_packets, idle_bytes) = server_packets_during(&lab, IDLE_WINDOW);
    let log = srv.stop();
    let (sent_packets, sent_bytes, root_records) = parse_sent(&log);
    let log_ratio = sent_bytes as f64 / tree_bytes as f64;
    ratios.sort_by(f64::total_cmp);
    let median = ratios[1];
    eprintln!(
        "three_receivers_with_loss: ratios {ratios:.3?}, median {median:.3}; server's own count \
         in the last round {sent_bytes} B in {sent_packets} packets ({root_records} root \
         records) = {log_ratio:.3} x tree; after the copies: {idle_packets} packets \
         ({idle_bytes} B) in {IDLE_WINDOW:?}"
    );
    let mut failures = Vec::new();
    if median > MAX_SEND_RATIO {
        failures.push(format!(
            "server egress on the wire: median {median:.3} x the tree's {tree_bytes} B over rounds {ratios:.3?} (max {MAX_SEND_RATIO})"
        ));
    }
    if idle_packets > MAX_IDLE_PACKETS {
        failures.push(format!(
            "server sent {idle_packets} packets in {IDLE_WINDOW:?} after every receiver finished (max {MAX_IDLE_PACKETS})"
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Three copies of a tree of small files from a server much faster than they are
/// (`--rate 5G` on bare veth, three copies and the server on the lab's cores): a round ends
/// in microseconds, so a block's first round waits for every receiver fetching in bulk
/// (`serve::sched`, `gather`) and each goes out once for all three. Without that wait the
/// server sent 2.0 to 2.9 times the tree here (median of three rounds 2.37), with it 1.09 to
/// 1.11.
#[test]
fn three_copies_share_a_fast_servers_rounds() {
    let _serial = serial();
    let lab = Lab::up(LabOptions {
        clients: 3,
        ..Default::default()
    });
    let tmp = tmpdir("copy-fast");
    let src = tmp.path().join("small");
    let mut rng = StdRng::seed_from_u64(0x1cf5_0fa5);
    for i in 0..3000 {
        let dir = src.join(format!("d{:02}", i % 30));
        fs::create_dir_all(&dir).unwrap();
        let size = 1024 + (rng.next_u32() % (15 << 10)) as usize;
        write_random_file(&dir.join(format!("f{i:04}")), &mut rng, size);
    }
    let tree_bytes = tree_file_bytes(&src);
    let state = tmp.path().join("state");
    // Median of three rounds, as in `three_receivers_with_loss`: the copies share the lab's
    // cores, and one round's figure moves with the machine's load.
    let mut ratios = Vec::new();
    for round in 0..3 {
        let envs = [("RUST_LOG", "lcfs=debug")]; // for the scheduler's line
        let srv = start_server_env(&lab, &src, "small", &state, &["--rate", "5G"], &envs);
        let dir = tmp.path().join(format!("round{round}"));
        fs::create_dir_all(&dir).unwrap();
        let before = lab.port_rx("srv");
        let runs = spawn_copy_in_every_client(&lab, &dir, "small");
        for (run, dest) in runs {
            run.wait(Duration::from_secs(120)).assert_success();
            assert_trees_equal(&src, &dest);
        }
        let after = lab.port_rx("srv");
        let log = srv.stop();
        let ratio = (after.1 - before.1) as f64 / tree_bytes as f64;
        let sched = log.lines().find(|l| l.contains("scheduler:")).unwrap_or("");
        eprintln!("round {round}: server egress {ratio:.3} x the tree's {tree_bytes} B; {sched}");
        ratios.push(ratio);
    }
    ratios.sort_by(f64::total_cmp);
    assert!(
        ratios[1] <= 1.4,
        "the server sent a median {:.3} times the tree for three copies (rounds {ratios:.3?}); \
         at most 1.4",
        ratios[1]
    );
}

/// A server with no receivers sends at most a few MLD queries; so does one
/// whose receivers have all finished.
#[test]
fn idle_server_is_quiet() {
    let _serial = serial();
    let lab = Lab::with_clients(3);
    let tmp = tmpdir("copy");
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

    let runs = spawn_copy_in_every_client(&lab, tmp.path(), "quiet");
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

/// c2 joins while c1 is halfway through a large file: both get it whole, and c2 shares
/// the second half with c1.
#[test]
fn late_joiner() {
    let _serial = serial();
    let lab = Lab::up(LabOptions {
        clients: 2,
        loss: Some(2.0),
        duplicate: Some(1.0),
        ..Default::default()
    });
    let tmp = tmpdir("copy");
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
    // c2 missed the first half: that half goes out again for it alone, while the second half
    // is shared because c2 follows the server's beacon. Trailing c1 instead, as receivers did
    // before the beacon, costs every block twice (2.1 x with framing and loss).
    let ratio = sent as f64 / size as f64;
    assert!(
        ratio <= 1.8,
        "late_joiner: the server sent {ratio:.3} x the file; a late receiver should share the \
         rounds on air (about 1.5 x the file, 1.7 with framing and 2% loss)"
    );
    srv.stop();
}

/// A channel that is one file: copied into a directory it keeps its name;
/// copied to a file path it takes that name.
#[test]
fn single_file_channel() {
    let _serial = serial();
    let lab = Lab::with_clients(1);
    let tmp = tmpdir("copy");
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
        let cache = tmp.path().join(format!("cache-a-{name}"));
        copy_ok(&lab, "c1", "single", &into, &cache);
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
        let cache = tmp.path().join(format!("cache-b-{name}"));
        copy_ok(&lab, "c1", "single", &target, &cache);
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
        let cache = tmp.path().join(format!("cache-c-{name}"));
        let o = copy_ok(&lab, "c1", "single", &target, &cache);
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
    let _serial = serial();
    let lab = Lab::with_clients(1);
    let tmp = tmpdir("copy");
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
    copy_ok(&lab, "c1", "delta", &dest, &tmp.path().join("cache1"));
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
    let o = copy_ok(&lab, "c1", "delta", &dest, &tmp.path().join("cache2"));
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
    let _serial = serial();
    let lab = Lab::with_clients(1);
    let tmp = tmpdir("copy");
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
    let _serial = serial();
    let lab = Lab::with_clients(1);
    let tmp = tmpdir("copy");
    let dest = tmp.path().join("dest");
    let o = spawn_copy(&lab, "c1", "nosuch", &dest, &tmp.path().join("cache"), 3)
        .wait(Duration::from_secs(30));
    eprintln!(
        "no server: exit {} after {:.1} s",
        o.status,
        o.elapsed.as_secs_f64()
    );
    o.assert_failure("copy of a channel nobody serves");
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
    assert_nothing_written(&dest, "copy of a channel nobody serves");
}

/// A mistyped channel fails within the root record's short wait (5 s), whatever
/// `--timeout`, naming the channel and the interface and saying that nothing arrived; with
/// `--wait` a copy started before its server (boot ordering) waits and then copies.
#[test]
fn a_mistyped_channel_fails_fast_and_wait_waits_for_the_server() {
    let _serial = serial();
    let lab = Lab::with_clients(1);
    let tmp = tmpdir("copy");
    let src = tmp.path().join("src");
    write_random_file(&src.join("a.bin"), &mut StdRng::seed_from_u64(5), 300_000);
    let srv = start_server(&lab, &src, "images", &tmp.path().join("state"), &[]);
    let o = spawn_copy(
        &lab,
        "c1",
        "imagse",
        &tmp.path().join("d1"),
        &tmp.path().join("c1"),
        30,
    )
    .wait(Duration::from_secs(60));
    eprintln!(
        "mistyped: {:.1} s: {}",
        o.elapsed.as_secs_f64(),
        o.stderr.trim()
    );
    o.assert_failure("copy of a mistyped channel");
    assert!(
        o.elapsed < Duration::from_secs(10),
        "a mistyped channel took {:.1} s to fail (--timeout 30)",
        o.elapsed.as_secs_f64()
    );
    for needle in [
        "\"imagse\"",
        "lc0",
        "no root record",
        "no lcfs packet arrived",
        "--wait",
    ] {
        assert!(
            o.stderr.contains(needle),
            "the error lacks {needle}:\n{}",
            o.stderr
        );
    }
    drop(srv);

    // Boot ordering: the receiver first, the server 8 s later.
    let dest = tmp.path().join("d2");
    let copy = common::lcfs::spawn_copy_with(
        &lab,
        "c1",
        "late",
        &dest,
        &tmp.path().join("c2"),
        Some(30),
        &["--wait"],
        &[],
    );
    std::thread::sleep(Duration::from_secs(8)); // the boot delay being tested
    let _late = start_server(&lab, &src, "late", &tmp.path().join("state2"), &[]);
    let out = copy.wait(Duration::from_secs(60));
    out.assert_success();
    assert_trees_equal(&src, &dest);
}

/// `CHANNEL:SUBPATH` copies a subtree, or one file, and nothing else.
#[test]
fn subpath_copy() {
    let _serial = serial();
    let lab = Lab::with_clients(1);
    let tmp = tmpdir("copy");
    let src = tmp.path().join("edge");
    make_edge_tree(&src, 0x1cf5_0003);
    let srv = start_server(&lab, &src, "edge", &tmp.path().join("state"), &[]);

    for (i, sub) in ["misc/sub", "nest/l01/l02", "perms/ro_dir"]
        .iter()
        .enumerate()
    {
        let dest = tmp.path().join(format!("dest{i}"));
        let cache = tmp.path().join(format!("cache{i}"));
        copy_ok(&lab, "c1", &format!("edge:{sub}"), &dest, &cache);
        assert_trees_equal(&src.join(sub), &dest);
    }
    // one file of the tree, into a directory
    let dest = tmp.path().join("dest-file");
    fs::create_dir(&dest).unwrap();
    let cache = tmp.path().join("cache-file");
    copy_ok(&lab, "c1", "edge:perms/run.sh", &dest, &cache);
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
    o.assert_failure("copy of a missing subpath");
    assert_nothing_written(&dest, "copy of a missing subpath");
    srv.stop();
}

/// A copy alone on its cache keeps the small files it fetched (a bundle's members) in DEST
/// only, and the blocks of larger files in the cache as well; a copy that shares its cache
/// with a mount keeps them all, since the mount may want them now (`fetch::KeepMembers`).
#[test]
fn a_copy_caches_small_files_only_while_it_shares_its_cache() {
    let _serial = serial();
    let lab = Lab::with_clients(1);
    let tmp = tmpdir("copy");
    let src = tmp.path().join("src");
    let mut rng = StdRng::seed_from_u64(0x1cf5_0011);
    // Two directories of 20 files, 59 KB each: one bundle each. Each file is above
    // INLINE_MAX, which a directory would carry itself.
    let small: Vec<Vec<u8>> = (0..40)
        .map(|i| {
            let p = src.join(format!("d{}/s{i:02}", i % 2));
            write_random_file(&p, &mut rng, 2000 + 50 * i);
            fs::read(&p).unwrap()
        })
        .collect();
    let big = src.join("big.bin");
    write_random_file(&big, &mut rng, 5 * BLOCK + 123);
    let big = fs::read(&big).unwrap();
    let srv = start_server(&lab, &src, "kept", &tmp.path().join("state"), &[]);
    let cached = |cache: &Path, bytes: &[u8]| {
        fs::read(object_path(cache, &blake3::hash(bytes))).is_ok_and(|b| b == bytes)
    };
    let small_cached = |cache: &Path| small.iter().filter(|b| cached(cache, b)).count();
    let big_cached = |cache: &Path| big.chunks(BLOCK).filter(|b| cached(cache, b)).count();

    let (dest, cache) = (
        tmp.path().join("dest-alone"),
        tmp.path().join("cache-alone"),
    );
    copy_ok(&lab, "c1", "kept", &dest, &cache);
    assert_trees_equal(&src, &dest);
    assert_eq!(
        small_cached(&cache),
        0,
        "a copy alone on its cache stored small files DEST holds"
    );
    assert_eq!(
        big_cached(&cache),
        6,
        "every block of the big file is cached"
    );

    let (dest, cache) = (
        tmp.path().join("dest-shared"),
        tmp.path().join("cache-shared"),
    );
    let mnt = tmp.path().join("mnt");
    let mount = Mount::daemon(&lab, "c1", "kept", &mnt, &cache, 30, &[])
        .unwrap_or_else(|f| panic!("the mount failed: {}", describe(&f.output)));
    copy_ok(&lab, "c1", "kept", &dest, &cache);
    assert_trees_equal(&src, &dest);
    assert_eq!(
        small_cached(&cache),
        small.len(),
        "a copy sharing its cache with a mount left small files out of it"
    );
    assert_eq!(big_cached(&cache), 6);
    mount.unmount();
    srv.stop();
}

/// The basic copy with MLD snooping off on the bridge (everything flooded).
#[test]
fn copy_with_snooping_off() {
    let _serial = serial();
    let lab = Lab::up(LabOptions {
        clients: 1,
        snooping: false,
        ..Default::default()
    });
    let tmp = tmpdir("copy");
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

/// A copy asks for 4096 files ahead (so that a receiver that fell behind can join the rounds
/// others are on), yet stays within a small descriptor limit: one-block files are fetched
/// before their part file is made, and at most 128 part files are open. 1,000 one-block
/// files and 300 two-block files, under `prlimit --nofile=200`.
#[test]
fn a_copy_of_many_files_stays_within_a_small_descriptor_limit() {
    let _serial = serial();
    let lab = Lab::with_clients(1);
    let tmp = tmpdir("copy");
    let src = tmp.path().join("many");
    for d in 0..10 {
        fs::create_dir_all(src.join(format!("d{d}"))).unwrap();
    }
    for i in 0..1000u32 {
        let body: Vec<u8> = (0..1000u32)
            .map(|j| (i.wrapping_mul(31) ^ j) as u8)
            .collect();
        fs::write(src.join(format!("d{}/small{i}", i % 10)), body).unwrap();
    }
    for i in 0..300u32 {
        let body: Vec<u8> = (0..70_000u32)
            .map(|j| (i.wrapping_mul(7) ^ j) as u8)
            .collect();
        fs::write(src.join(format!("d{}/two{i}", i % 10)), body).unwrap();
    }
    let srv = start_server(&lab, &src, "many", &tmp.path().join("state"), &[]);
    let dest = tmp.path().join("dest");
    let o = spawn_copy_wrapped(
        &lab,
        "c1",
        &["prlimit", "--nofile=200:200"],
        "many",
        &dest,
        &tmp.path().join("cache"),
        Some(30),
        &[],
        &[],
    )
    .wait(Duration::from_secs(90));
    o.assert_success();
    assert_trees_equal(&src, &dest);
    srv.stop();
}
