//! The living filesystem end to end (issue 10): `lcfs serve` follows its tree, a mount follows
//! the server to each new generation without a remount, and `lcfs copy --watch --delete` keeps
//! a mirror, all at once, while a reader loops over the mount. Needs root and /dev/fuse.

mod common;

use common::lab::Lab;
use common::lcfs::{spawn_copy_with, start_server, tmpdir, Mount};
use common::tree::list_tree;
use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Every version each path has had: a reader may see any of them, never anything else.
type Versions = Arc<Mutex<HashMap<PathBuf, HashSet<[u8; 32]>>>>;

fn put(src: &Path, versions: &Versions, rel: &str, bytes: &[u8]) {
    versions
        .lock()
        .unwrap()
        .entry(PathBuf::from(rel))
        .or_default()
        .insert(*blake3::hash(bytes).as_bytes());
    let tmp = src.join(".tmp-write");
    fs::write(&tmp, bytes).unwrap();
    fs::rename(&tmp, src.join(rel)).unwrap();
}

fn body(i: u64, len: usize) -> Vec<u8> {
    (0..len).map(|j| (j as u64 * 31 + i * 7) as u8).collect()
}

/// Reads every file of the mount over and over; returns (good reads, what went wrong).
fn reader(mnt: PathBuf, versions: Versions, stop: Arc<AtomicBool>) -> (u64, Vec<String>) {
    let (mut good, mut bad) = (0, Vec::new());
    while !stop.load(Ordering::Relaxed) {
        let paths: Vec<PathBuf> = versions.lock().unwrap().keys().cloned().collect();
        for rel in paths {
            match fs::read(mnt.join(&rel)) {
                Ok(bytes) => {
                    let h = *blake3::hash(&bytes).as_bytes();
                    if versions.lock().unwrap()[&rel].contains(&h) {
                        good += 1;
                    } else {
                        bad.push(format!("{}: bytes of no version", rel.display()));
                    }
                }
                // Deleted or renamed away, or a version the server no longer has.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESTALE)) => {}
                Err(e) => bad.push(format!("{}: {e}", rel.display())),
            }
        }
    }
    (good, bad)
}

/// Waits until a new open of `rel` in the mount gives `want`; returns how long it took.
fn visible(mnt: &Path, rel: &str, want: Option<&[u8]>, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let got = fs::read(mnt.join(rel)).ok();
        if got.as_deref() == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{rel} in the mount is not {} after {limit:?}",
            if want.is_some() {
                "the new version"
            } else {
                "gone"
            }
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn serve_mount_and_copy_follow_changes_together() {
    let lab = Lab::with_clients(1);
    let tmp = tmpdir("living");
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    let versions: Versions = Arc::default();
    for i in 0..8 {
        put(
            &src,
            &versions,
            &format!("d/f{i}"),
            &body(i, 1000 + i as usize * 40_000),
        );
    }
    let mut server = start_server(
        &lab,
        &src,
        "living",
        &tmp.path().join("state"),
        &["--debounce", "200ms"],
    );
    let mnt = tmp.path().join("mnt");
    let mount = Mount::new(
        &lab,
        "c1",
        "living",
        &mnt,
        &tmp.path().join("cache-m"),
        10,
        &[],
    );
    let dest = tmp.path().join("dest");
    let copy = spawn_copy_with(
        &lab,
        "c1",
        "living",
        &dest,
        &tmp.path().join("cache-c"),
        Some(10),
        &["--watch", "--delete"],
        &[],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let r = {
        let (m, v, s) = (mnt.clone(), versions.clone(), stop.clone());
        std::thread::spawn(move || reader(m, v, s))
    };

    let mut delays = Vec::new();
    for round in 0..10u64 {
        let rel = format!("d/f{}", round % 8);
        let (rel, want) = match round % 3 {
            0 | 1 => {
                let b = body(100 + round, 5000 + round as usize * 30_000);
                put(&src, &versions, &rel, &b);
                (rel, Some(b))
            }
            _ => {
                let fresh = format!("d/new{round}");
                let b = body(200 + round, 777);
                put(&src, &versions, &fresh, &b);
                fs::remove_file(src.join(&rel)).unwrap();
                (rel, None)
            }
        };
        let ready = server.try_wait_ready(Duration::from_secs(10));
        assert!(ready.is_some(), "round {round}: no generation published");
        delays.push(visible(&mnt, &rel, want.as_deref(), Duration::from_secs(5)));
    }
    stop.store(true, Ordering::Relaxed);
    let (good, bad) = r.join().unwrap();
    eprintln!("new opens saw each change {delays:?} after the ready line; {good} good reads");
    assert!(bad.is_empty(), "readers saw: {bad:?}");
    assert!(good > 0);

    // The mirror ends identical to the tree (trash aside), deleted files in the trash.
    let deadline = Instant::now() + Duration::from_secs(15);
    let listing = |d: &Path| -> Vec<PathBuf> {
        list_tree(d)
            .into_iter()
            .filter(|p| !p.starts_with(".lcfs-trash"))
            .collect()
    };
    while listing(&dest) != list_tree(&src) {
        assert!(
            Instant::now() < deadline,
            "the mirror does not match: {:?} vs {:?}",
            listing(&dest),
            list_tree(&src)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for p in list_tree(&src) {
        if src.join(&p).is_file() {
            assert_eq!(
                fs::read(src.join(&p)).unwrap(),
                fs::read(dest.join(&p)).unwrap()
            );
        }
    }
    assert!(
        dest.join(".lcfs-trash").is_dir(),
        "nothing went to the trash"
    );
    common::lcfs::signal(&copy.child, libc::SIGINT);
    assert_eq!(copy.wait(Duration::from_secs(20)).status.code(), Some(130));
    drop(mount);
    server.stop();
}
