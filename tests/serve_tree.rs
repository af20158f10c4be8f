//! `lcfs serve` publishes nothing outside its tree (issue 9), attacked the way the issue
//! describes: an unprivileged user who can write inside the served tree swaps a directory for
//! a symlink to a root-only directory, as fast as it can, while the root-run server indexes
//! and clients copy. Needs root. `cargo test --test serve_tree -- --test-threads=1`.

mod common;

use common::lab::{require_lab_prerequisites, Lab, LabOptions};
use common::lcfs::{s, spawn_copy, start_server, tmpdir};
use common::tree::list_tree;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::time::Duration;

/// Bytes only root can read; no copy may ever hold them.
const MARKER: &[u8] = b"ROOT-ONLY-SECRET";

/// Server starts, each indexing the tree under attack and serving one copy.
const ROUNDS: u32 = 40;

const PYTHON: &str = "/usr/bin/python3";

/// Exchanges argv[1] and argv[2] with renameat2(RENAME_EXCHANGE) forever; says so after
/// the first exchange.
const SWAPPER: &str = r#"
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
a, b = os.fsencode(sys.argv[1]), os.fsencode(sys.argv[2])
first = True
while True:
    if libc.renameat2(-100, a, -100, b, 2) != 0:
        sys.exit("renameat2: " + os.strerror(ctypes.get_errno()))
    if first:
        print("swapping", flush=True)
        first = False
"#;

/// Every regular file under `root` (symlinks not followed) that holds [`MARKER`].
fn files_with_marker(root: &Path) -> Vec<String> {
    list_tree(root)
        .into_iter()
        .map(|rel| root.join(rel))
        .filter(|p| fs::symlink_metadata(p).is_ok_and(|m| m.is_file()))
        .filter(|p| {
            let bytes = fs::read(p).unwrap_or_default();
            bytes.windows(MARKER.len()).any(|w| w == MARKER)
        })
        .map(|p| p.display().to_string())
        .collect()
}

fn chown_nobody(path: &Path) {
    let out = std::process::Command::new("chown")
        .args(["-R", "nobody:nogroup", s(path)])
        .output()
        .expect("run chown");
    assert!(
        out.status.success(),
        "chown nobody {}: {out:?}",
        path.display()
    );
}

#[test]
fn a_symlink_race_never_publishes_a_root_only_file() {
    require_lab_prerequisites();
    assert!(
        Path::new(PYTHON).exists(),
        "{PYTHON} is missing: the swapper runs as nobody with the system's python3 \
         (apt-get install python3); one under root's home (pyenv) is not runnable by nobody"
    );
    let lab = Lab::up(LabOptions {
        clients: 1,
        ..Default::default()
    });
    let base = tmpdir("serve-tree");
    fs::set_permissions(base.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let (tree, outside) = (base.path().join("tree"), base.path().join("outside"));
    // Root's secrets, of the name found in "sub", in a directory nobody else may enter.
    fs::create_dir_all(&outside).unwrap();
    let big: Vec<u8> = MARKER.iter().copied().cycle().take(200_000).collect();
    fs::write(outside.join("big"), &big).unwrap();
    fs::write(outside.join("small"), MARKER).unwrap();
    for (p, mode) in [("big", 0o600), ("small", 0o600), ("", 0o700)] {
        fs::set_permissions(outside.join(p), fs::Permissions::from_mode(mode)).unwrap();
    }
    // "sub" holds only an inlined file, so that the swapping never makes one of its blocks
    // change under the sender (a copy would wait for it in vain); "bulk" gives copies blocks.
    fs::create_dir_all(tree.join("sub")).unwrap();
    fs::write(tree.join("sub/small"), b"harmless").unwrap();
    fs::write(tree.join("plain"), b"always here").unwrap();
    fs::write(tree.join("bulk"), vec![b'x'; 200_000]).unwrap();
    symlink("../outside", tree.join("alt")).unwrap();
    chown_nobody(&tree);
    let mut swapper = start_swapper(&lab, &tree.join("sub"), &tree.join("alt"));

    // Each start of the server indexes the tree while it is being swapped.
    let copies = tmpdir("serve-tree-copies");
    for round in 0..ROUNDS {
        let srv = start_server(&lab, &tree, "edge", &copies.path().join("state"), &[]);
        let dest = copies.path().join(format!("dest-{round}"));
        let cache = copies.path().join(format!("cache-{round}"));
        let copy = spawn_copy(&lab, "c1", "edge", &dest, &cache, 10);
        let outcome = copy.wait(Duration::from_secs(30));
        srv.stop();
        for dir in [&dest, &cache] {
            let leaked = files_with_marker(dir);
            assert!(
                leaked.is_empty(),
                "root-only bytes were published: {leaked:?}"
            );
        }
        outcome.assert_success();
        assert_eq!(fs::read(dest.join("bulk")).unwrap(), vec![b'x'; 200_000]);
    }
    let stopped = swapper.try_wait().unwrap();
    assert!(stopped.is_none(), "the swapper stopped early: {stopped:?}");
    let _ = swapper.kill();
    let _ = swapper.wait();
}

/// Starts the attacker: `SWAPPER` as user nobody, exchanging `a` and `b`; returns once it
/// has swapped them. The lab kills it when it drops.
fn start_swapper(lab: &Lab, a: &Path, b: &Path) -> std::process::Child {
    let mut args = vec![
        "setpriv",
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
    ];
    args.extend([PYTHON, "-c", SWAPPER, s(a), s(b)]);
    let mut swapper = lab.spawn("srv", &args);
    let mut said = String::new();
    BufReader::new(swapper.stdout.take().unwrap())
        .read_line(&mut said)
        .unwrap();
    assert_eq!(
        said.trim(),
        "swapping",
        "the swapper (user nobody) did not start"
    );
    swapper
}
