//! Prefetch sets on a real mount: a `.lcfs-prefetch` file names members in three directories;
//! reading one member brings the others into the cache without a read of theirs, and leaves
//! a file the set does not name alone.

mod common;

use std::time::Duration;

use common::lab::Lab;
use common::lcfs::{getfattr, start_server, tmpdir, within, Mount};
use common::tree::write_random_file;
use rand::rngs::StdRng;
use rand::SeedableRng;

/// `user.lcfs.cached` of a file on the mount: the fraction of its blocks in the cache.
fn cached(path: &std::path::Path) -> f64 {
    getfattr(path, "user.lcfs.cached")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no user.lcfs.cached on {}", path.display()))
}

#[test]
fn reading_one_member_fetches_the_set() {
    let lab = Lab::with_clients(1);
    let tmp = tmpdir("prefetch-set");
    let src = tmp.path().join("src");
    let mut rng = StdRng::seed_from_u64(0x5e75);
    // several blocks each, so that none rides a directory's bundle with another
    for f in [
        "lib/x/a.bin",
        "lib/y/b.bin",
        "lib/y/deep/c.bin",
        "lib/w/d.bin",
        "other/e.bin",
    ] {
        write_random_file(&src.join(f), &mut rng, 300_000);
    }
    std::fs::write(
        src.join("lib/.lcfs-prefetch"),
        "# read together\nx/a.bin\ny/**\n",
    )
    .unwrap();
    let srv = start_server(&lab, &src, "setch", &tmp.path().join("state"), &[]);
    let m = Mount::new(
        &lab,
        "c1",
        "setch",
        &tmp.path().join("mnt"),
        &tmp.path().join("cache"),
        20,
        &[],
    );
    let mnt = m.path().to_path_buf();
    // listing lib/ learns the set; a set learned after the first read starts at the next
    let listing = std::fs::read_dir(mnt.join("lib")).unwrap().count();
    assert_eq!(listing, 4, "lib/ lists x, y, w and .lcfs-prefetch");
    let members = [mnt.join("lib/y/b.bin"), mnt.join("lib/y/deep/c.bin")];
    let fetched = within(Duration::from_secs(20), || {
        std::fs::read(mnt.join("lib/x/a.bin")).unwrap();
        members.iter().all(|p| cached(p) == 1.0)
    });
    let took = fetched.unwrap_or_else(|| {
        panic!(
            "the set's other members are not in the cache 20 s after a member was read: b {} c {}\n{}",
            cached(&members[0]),
            cached(&members[1]),
            m.log_text()
        )
    });
    eprintln!(
        "the set's other members were cached {:.2} s after the first read",
        took.as_secs_f64()
    );
    assert_eq!(
        cached(&mnt.join("lib/w/d.bin")),
        0.0,
        "a file outside the set was fetched"
    );
    assert_eq!(
        cached(&mnt.join("other/e.bin")),
        0.0,
        "a file outside lib/ was fetched"
    );
    m.unmount();
    srv.stop();
}
