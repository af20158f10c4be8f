//! Tests of one cache directory shared by several handles, as several processes share it: the
//! first open owns the directory, the others are clients (flock is per open file, so two
//! opens in one process contend as two processes do). The lab tests (`tests/shared_cache.rs`)
//! do the same with real processes and kill -9.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use crate::shared::wire::{frame_len, Reply, Request};
use crate::tests::{obj, open, present};
use crate::CacheError;

fn pair(dir: &Path, quota: Option<u64>) -> (crate::Cache, crate::Cache) {
    let owner = open(dir, quota, 1 << 20);
    let client = open(dir, quota, 1 << 20);
    assert!(owner.is_owner() && !client.is_owner());
    (owner, client)
}

#[test]
fn a_second_open_is_a_client_that_shares_objects_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let (owner, client) = pair(dir.path(), None);
    owner.insert(&obj(1)).unwrap();
    client.insert(&obj(2)).unwrap();
    assert!(present(&client, &obj(1)) && client.contains(obj(1).hash()));
    assert!(present(&owner, &obj(2)) && owner.contains(obj(2).hash()));
    assert_eq!(owner.usage().objects, 2);
    assert_eq!(client.usage(), owner.usage());
    // Inserting what is there already changes nothing.
    client.insert(&obj(1)).unwrap();
    assert_eq!(owner.usage().objects, 2);
}

#[test]
fn the_quota_holds_for_every_process() {
    let dir = tempfile::tempdir().unwrap();
    let one = {
        let probe = open(&dir.path().join("probe"), None, 0);
        probe.insert(&obj(u32::MAX)).unwrap();
        probe.usage().disk_bytes
    };
    let (owner, client) = pair(&dir.path().join("c"), Some(8 * one));
    for n in 0..6 {
        owner.insert(&obj(n)).unwrap();
    }
    client.pin(obj(0).hash()).unwrap();
    for n in 100..110 {
        client.insert(&obj(n)).unwrap();
        assert!(owner.usage().disk_bytes <= 8 * one, "over quota after {n}");
    }
    assert!(
        present(&client, &obj(0)),
        "pinned by a client, never evicted"
    );
    assert!(
        !owner.contains(obj(1).hash()),
        "least recently used went first"
    );
    assert!(present(&owner, &obj(109)));
}

#[test]
fn pins_roots_and_publishers_go_through_the_owner() {
    let dir = tempfile::tempdir().unwrap();
    let (owner, client) = pair(dir.path(), None);
    client.insert(&obj(1)).unwrap();
    client.pin(obj(1).hash()).unwrap();
    assert_eq!(owner.usage().pinned_bytes, owner.usage().disk_bytes);
    let missing = client.pin(obj(2).hash()).unwrap_err();
    assert!(matches!(missing, CacheError::NotCached { .. }), "{missing}");
    client.unpin_all().unwrap();
    assert_eq!(owner.usage().pinned_bytes, 0);
    client.set_root(&[7; 32], b"record").unwrap();
    client.set_publisher(&[7; 32], b"key").unwrap();
    assert_eq!(
        owner.get_root(&[7; 32]).unwrap().as_deref(),
        Some(&b"record"[..])
    );
    assert_eq!(
        client.get_publisher(&[7; 32]).unwrap().as_deref(),
        Some(&b"key"[..])
    );
    assert_eq!(client.get_root(&[8; 32]).unwrap(), None);
    client.flush().unwrap();
}

#[test]
fn a_client_takes_over_when_the_owner_goes() {
    let dir = tempfile::tempdir().unwrap();
    let (owner, client) = pair(dir.path(), None);
    let other = open(dir.path(), None, 0);
    owner.insert(&obj(1)).unwrap();
    client.insert(&obj(2)).unwrap();
    client.set_root(&[1; 32], b"root").unwrap();
    drop(owner);
    client.insert(&obj(3)).unwrap();
    assert!(
        client.is_owner(),
        "the first client to need the owner became it"
    );
    for n in 1..=3 {
        assert!(
            present(&client, &obj(n)) && present(&other, &obj(n)),
            "object {n}"
        );
    }
    assert_eq!(
        other.get_root(&[1; 32]).unwrap().as_deref(),
        Some(&b"root"[..])
    );
    assert!(
        !other.is_owner(),
        "the other client now talks to the new owner"
    );
    assert_eq!(other.usage().objects, 3);
}

#[test]
fn a_damaged_file_found_by_a_client_is_deleted_by_the_owner() {
    let dir = tempfile::tempdir().unwrap();
    let (owner, client) = pair(dir.path(), None);
    let o = obj(1);
    owner.insert(&o).unwrap();
    let before = owner.usage();
    fs::write(owner.object_path(o.hash()), b"flipped").unwrap();
    let client = {
        drop(client);
        open(dir.path(), None, 0)
    };
    assert_eq!(client.get(o.hash()).unwrap(), None);
    assert!(!owner.object_path(o.hash()).exists());
    assert_eq!(owner.usage().objects, before.objects - 1);
}

#[test]
fn a_socket_that_is_not_ours_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let owner = open(dir.path(), None, 0);
    let sock = dir.path().join("cache.sock");
    fs::remove_file(&sock).unwrap();
    fs::write(&sock, b"not a socket").unwrap();
    let err = crate::Cache::open(crate::CacheConfig::new(dir.path()))
        .err()
        .expect("refused");
    assert!(
        matches!(&err, CacheError::ForeignSocket { path, .. } if *path == sock),
        "{err}"
    );
    // A socket of another user (only root can make one).
    if crate::shared::euid() == 0 {
        fs::remove_file(&sock).unwrap();
        let _listener = UnixListener::bind(&sock).unwrap();
        std::os::unix::fs::lchown(&sock, Some(65534), Some(65534)).unwrap();
        let err = crate::Cache::open(crate::CacheConfig::new(dir.path()))
            .err()
            .expect("refused");
        assert!(err.to_string().contains("uid 65534"), "{err}");
    }
    drop(owner);
}

#[test]
fn a_long_directory_path_is_reached_through_a_descriptor() {
    let dir = tempfile::tempdir().unwrap();
    let long = dir.path().join("d".repeat(120));
    let (owner, client) = pair(&long, None);
    client.insert(&obj(1)).unwrap();
    assert!(present(&owner, &obj(1)));
}

fn raw_call(stream: &mut UnixStream, frame: &[u8]) -> std::io::Result<Reply> {
    stream.write_all(frame)?;
    let mut header = [0; 4];
    stream.read_exact(&mut header)?;
    let mut body = vec![0; frame_len(header).unwrap()];
    stream.read_exact(&mut body)?;
    Ok(Reply::decode(&body).unwrap())
}

#[test]
fn hostile_requests_fail_alone() {
    let dir = tempfile::tempdir().unwrap();
    let owner = open(dir.path(), None, 0);
    let sock = dir.path().join("cache.sock");
    // A temp name that leaves tmp/ is refused, and nothing moves.
    let mut s = UnixStream::connect(&sock).unwrap();
    fs::write(dir.path().join("victim"), b"x").unwrap();
    for temp in ["../victim", "/etc/passwd", "1-2/../../victim", ""] {
        let req = Request::Commit(vec![(*obj(1).hash(), temp.into())]);
        assert!(
            matches!(raw_call(&mut s, &req.encode()), Ok(Reply::Failed(_))),
            "{temp}"
        );
    }
    assert!(dir.path().join("victim").exists());
    assert!(!owner.contains(obj(1).hash()));
    // An oversized frame and garbage end that connection only.
    let mut bad = UnixStream::connect(&sock).unwrap();
    assert!(raw_call(&mut bad, &u32::MAX.to_be_bytes()).is_err());
    let mut garbage = UnixStream::connect(&sock).unwrap();
    assert!(raw_call(&mut garbage, &[0, 0, 0, 2, 99, 1]).is_err());
    assert_eq!(
        raw_call(&mut s, &Request::Usage.encode()).unwrap(),
        Reply::Usage(owner.usage())
    );
    let client = open(dir.path(), None, 0);
    client.insert(&obj(2)).unwrap();
    assert!(owner.contains(obj(2).hash()));
}

#[test]
fn a_fetch_is_claimed_by_one_process_until_stored_released_or_gone() {
    let dir = tempfile::tempdir().unwrap();
    let (owner, client) = pair(dir.path(), None);
    let (x, y) = (obj(1), obj(2));
    assert!(owner.claim_fetch(x.hash()));
    assert!(!client.claim_fetch(x.hash()), "the owner is fetching it");
    owner.insert(&x).unwrap();
    assert!(client.claim_fetch(x.hash()), "stored: the claim ended");
    client.insert(&x).unwrap();
    assert!(client.claim_fetch(y.hash()));
    assert!(!owner.claim_fetch(y.hash()));
    client.release_fetch(y.hash());
    assert!(owner.claim_fetch(y.hash()));
    owner.release_fetch(y.hash());
    // A client that goes away gives up its claims.
    assert!(client.claim_fetch(y.hash()));
    drop(client);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !owner.claim_fetch(y.hash()) {
        assert!(
            std::time::Instant::now() < deadline,
            "claim of a closed client kept"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn a_stopped_owner_costs_one_wait_not_one_per_request() {
    let dir = tempfile::tempdir().unwrap();
    crate::store::create_private_dir(dir.path()).unwrap();
    // An "owner" that holds the lock and accepts connections but never answers, as a
    // SIGSTOPped process does (the kernel still accepts on its socket).
    let _lock = crate::open::try_lock_dir(dir.path())
        .unwrap()
        .expect("lock free");
    let _listener = UnixListener::bind(dir.path().join("cache.sock")).unwrap();
    let client = open(dir.path(), None, 0);
    let started = std::time::Instant::now();
    let err = client.set_root(&[1; 32], b"r").unwrap_err();
    assert!(err.to_string().contains("did not answer within"), "{err}");
    assert!(started.elapsed() >= crate::shared::client::ANSWER_WITHIN);
    let again = std::time::Instant::now();
    let err = client.get_root(&[1; 32]).unwrap_err();
    assert!(
        again.elapsed() < std::time::Duration::from_secs(1),
        "waited again: {err}"
    );
    assert!(
        client.claim_fetch(obj(1).hash()),
        "no answer: fetch rather than wait"
    );
    // Reads of what is on disk need no owner.
    assert_eq!(client.get(obj(1).hash()).unwrap(), None);
}

/// Waits up to 5 s for `cond`: the owner accepts and ends connections on its own threads.
fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    cond()
}

#[test]
fn the_cache_is_shared_while_a_client_is_connected() {
    let dir = tempfile::tempdir().unwrap();
    let owner = open(dir.path(), None, 1 << 20);
    assert!(!owner.is_shared(), "an owner alone");
    let client = open(dir.path(), None, 1 << 20);
    assert!(client.is_shared(), "a client shares by definition");
    assert!(
        eventually(|| owner.is_shared()),
        "the owner never saw its client"
    );
    drop(client);
    assert!(
        eventually(|| !owner.is_shared()),
        "the owner still counts a client that left"
    );
}
