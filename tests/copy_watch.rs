//! `lcfs copy --watch --delete` beside a server that follows its tree (issue 10, part 4): each
//! new generation is applied to DEST, fetching only changed blocks; what the channel no longer
//! has is moved into `DEST/.lcfs-trash/<time>/`, never deleted; Ctrl-C leaves no part file.
//! Needs root.

mod common;

use common::lab::Lab;
use common::lcfs::{assert_no_part_files, signal, spawn_copy_with, start_server, tmpdir};
use common::tree::{assert_trees_equal, list_tree};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// DEST's entries but the trash.
fn listing(dest: &Path) -> Vec<PathBuf> {
    list_tree(dest)
        .into_iter()
        .filter(|p| !p.starts_with(".lcfs-trash"))
        .collect()
}

/// Waits until DEST (trash aside) lists what `src` lists, with the same bytes in every file.
fn wait_mirrored(src: &Path, dest: &Path, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let same = listing(dest) == list_tree(src)
            && list_tree(src).iter().all(|p| {
                let (a, b) = (src.join(p), dest.join(p));
                match fs::symlink_metadata(&a) {
                    Ok(m) if m.is_file() => fs::read(&a).ok() == fs::read(&b).ok(),
                    Ok(m) if m.is_symlink() => fs::read_link(&a).ok() == fs::read_link(&b).ok(),
                    _ => true,
                }
            });
        if same {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "DEST does not mirror the tree after {limit:?}:\nsource {:?}\ndest {:?}",
            list_tree(src),
            listing(dest)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn copy_watch_delete_follows_the_channel_into_the_trash() {
    let lab = Lab::with_clients(1);
    let tmp = tmpdir("copy-watch");
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("dir/sub")).unwrap();
    fs::write(src.join("a.txt"), b"version 1\n").unwrap();
    fs::write(src.join("dir/gone.txt"), b"to be deleted\n").unwrap();
    fs::write(src.join("dir/sub/moved.txt"), b"to be renamed\n").unwrap();
    fs::write(src.join("big.bin"), vec![7u8; 3 << 20]).unwrap();
    let extra = ["--debounce", "200ms"];
    let mut server = start_server(&lab, &src, "cw", &tmp.path().join("state"), &extra);
    let dest = tmp.path().join("dest");
    let cache = tmp.path().join("cache");
    let watch = ["--watch", "--delete"];
    let copy = spawn_copy_with(&lab, "c1", "cw", &dest, &cache, Some(20), &watch, &[]);
    wait_mirrored(&src, &dest, Duration::from_secs(30));

    // Changes of several kinds in one batch, then another batch.
    fs::write(src.join("a.txt"), b"version 2, longer\n").unwrap();
    fs::remove_file(src.join("dir/gone.txt")).unwrap();
    fs::rename(src.join("dir/sub/moved.txt"), src.join("renamed.txt")).unwrap();
    fs::write(src.join("new.txt"), b"added\n").unwrap();
    let mut big = fs::read(src.join("big.bin")).unwrap();
    big[1 << 20] = 8;
    fs::write(src.join("big.bin.tmp"), &big).unwrap();
    fs::rename(src.join("big.bin.tmp"), src.join("big.bin")).unwrap();
    assert!(
        server.try_wait_ready(Duration::from_secs(10)).is_some(),
        "no new generation"
    );
    wait_mirrored(&src, &dest, Duration::from_secs(15));
    fs::remove_dir_all(src.join("dir")).unwrap();
    std::os::unix::fs::symlink("a.txt", src.join("link")).unwrap();
    assert!(
        server.try_wait_ready(Duration::from_secs(10)).is_some(),
        "no new generation"
    );
    wait_mirrored(&src, &dest, Duration::from_secs(15));

    // Everything the channel dropped is in the trash, nothing was deleted outright.
    let trash = dest.join(".lcfs-trash");
    let trashed: Vec<PathBuf> = fs::read_dir(&trash)
        .unwrap()
        .flat_map(|e| list_tree(&e.unwrap().path()))
        .collect();
    for want in ["dir/gone.txt", "dir/sub/moved.txt", "dir"] {
        assert!(
            trashed.iter().any(|p| p == Path::new(want)),
            "{want} is not in the trash: {trashed:?}"
        );
    }
    let stderr = copy.stderr_so_far();
    assert!(stderr.contains("following channel"), "{stderr}");

    // Ctrl-C stops it; no part file is left anywhere.
    signal(&copy.child, libc::SIGINT);
    let o = copy.wait(Duration::from_secs(20));
    assert_eq!(o.status.code(), Some(130), "{}", o.stderr);
    assert_no_part_files(&dest);
    fs::rename(&trash, tmp.path().join("trash")).unwrap();
    assert_trees_equal(&src, &dest);
    server.stop();
}
