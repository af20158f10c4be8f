//! Receivers that cannot be fed by the wrong party (issue 9, parts 1 and 6), in the namespace
//! lab: forged trees sent as unicast or through loopback are never acted on; trust on first use
//! remembers the publisher; an expired signed root record is refused while a live server keeps
//! renewing its signature. Needs root.
//!
//! The attacker's packets are built with the library's own encoders on a thread that enters
//! the client's network namespace (`setns` is per thread), so they are exactly what a hostile
//! local user or host could send.

mod common;

use common::lab::Lab;
use common::lcfs::{
    assert_nothing_written, s, spawn_copy_with, start_server, start_server_at, start_server_env,
    tmpdir, CopyOutcome, Mount,
};
use common::tree::assert_trees_equal;
use lcfs::wire::channel::Channel;
use lcfs::wire::fec::{symbol_size_for_object, Esi, ObjectEncoder};
use lcfs::wire::object::{
    object_ref, BlockSize, Content, Directory, Entry, EntryKind, FileHash, FileRef, ObjectHash,
    RootRecord, Timestamp,
};
use lcfs::wire::packet;
use std::fs;
use std::net::{Ipv6Addr, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const PORT: u16 = 4242;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Runs `f` on a thread inside lab node `node`'s network namespace.
fn in_netns<T: Send + 'static>(
    lab: &Lab,
    node: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let ns = fs::File::open(lab.netns_path(node)).expect("open the namespace");
    std::thread::spawn(move || {
        // SAFETY: setns on a valid namespace fd changes only this thread's network namespace.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
}

fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: c is a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(i, 0, "no interface {name} in this namespace");
    i
}

/// Every packet of a hostile clear-channel tree: a root record of a generation above anything
/// real, naming a directory with a setuid "pwned" file.
fn forged_tree_packets(channel_name: &str) -> Vec<Vec<u8>> {
    let channel = Channel::new(channel_name, None);
    let body = b"#!/bin/sh\necho owned\n".to_vec();
    let file = Entry {
        name: b"pwned".to_vec(),
        mode: 0o4755,
        mtime: Timestamp { secs: 0, nanos: 0 },
        nlink: 1,
        link: 0,
        kind: EntryKind::File(FileRef {
            size: body.len() as u64,
            b3: FileHash::of(&body),
            content: Content::Inline(body),
        }),
    };
    let dir = Directory::new(vec![file]).encode();
    let root = RootRecord {
        channel_id: *channel.id(),
        generation: unix_now() + 3600,
        publish_time_ns: 0,
        root: object_ref(&dir),
        block_size: BlockSize::DEFAULT,
        single_file: false,
        signature: None,
    };
    let mut packets = Vec::new();
    let mut out = Vec::new();
    packet::encode_root(&mut out, channel.root_address().tag, &root.encode(), None);
    packets.push(out.clone());
    let enc = ObjectEncoder::new(&dir, symbol_size_for_object(dir.len() as u64, 1400)).unwrap();
    let tag = channel.object_address(&root.root.hash).tag;
    let mut sym = Vec::new();
    for esi in 0..enc.source_symbols() + 4 {
        enc.symbol(Esi(esi), &mut sym);
        packet::encode_symbol(&mut out, tag, Esi(esi), &sym, None);
        packets.push(out.clone());
    }
    packets
}

/// Sends `packets` to each of `dests` in a loop until `stop`; returns how many went out.
fn blast(dests: Vec<SocketAddrV6>, packets: Vec<Vec<u8>>, stop: Arc<AtomicBool>) -> u64 {
    let sock = UdpSocket::bind("[::]:0").expect("bind");
    let mut sent = 0;
    while !stop.load(Ordering::Relaxed) {
        for d in &dests {
            for p in &packets {
                sent += sock.send_to(p, d).is_ok() as u64;
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    sent
}

fn copy(
    lab: &Lab,
    spec: &str,
    dest: &Path,
    cache: &Path,
    timeout: u32,
    extra: &[&str],
) -> CopyOutcome {
    spawn_copy_with(lab, "c1", spec, dest, cache, Some(timeout), extra, &[])
        .wait(Duration::from_secs(timeout as u64 + 60))
}

/// A local user (or anyone who reaches the port) sends a forged tree by unicast, to `[::1]`
/// and to the receiver's own address. With no server, the copy must time out having written
/// nothing; with the real server, it must get the real tree. Before the receiver checked
/// `IPV6_PKTINFO`, the first copy installed the forged setuid file.
#[test]
fn unicast_and_loopback_forgeries_are_ignored() {
    let lab = Lab::with_clients(1);
    let tmp = tmpdir("trust");
    let stop = Arc::new(AtomicBool::new(false));
    let dests = vec![
        SocketAddrV6::new(Ipv6Addr::LOCALHOST, PORT, 0, 0),
        SocketAddrV6::new(lab.addr("c1"), PORT, 0, 0),
    ];
    let packets = forged_tree_packets("forged");
    let st = stop.clone();
    let forger = in_netns(&lab, "c1", move || blast(dests, packets, st));

    let dest = tmp.path().join("dest-noserver");
    let o = copy(&lab, "forged", &dest, &tmp.path().join("cache1"), 4, &[]);
    o.assert_failure("a copy fed only by unicast forgeries");
    assert_nothing_written(&dest, "a copy fed only by unicast forgeries");

    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("sub/real.txt"), b"the real tree\n").unwrap();
    let mut server = start_server(&lab, &src, "forged", &tmp.path().join("state"), &[]);
    let dest = tmp.path().join("dest-server");
    let o = copy(&lab, "forged", &dest, &tmp.path().join("cache2"), 20, &[]);
    o.assert_success();
    assert_trees_equal(&src, &dest);
    assert!(
        !dest.join("pwned").exists(),
        "the forged file was installed"
    );

    stop.store(true, Ordering::Relaxed);
    let sent = forger.join().unwrap();
    assert!(sent > 1000, "the forger sent only {sent} packets");
    server.assert_running();
    server.stop();
}

/// Trust on first use remembers the publisher: after a copy from the server in `srv`, the same
/// channel served from another host is refused with advice, accepted with
/// `--allow-new-publisher`, and trusted from then on.
#[test]
fn another_publisher_is_refused_until_allowed() {
    let lab = Lab::with_clients(2);
    let tmp = tmpdir("trust");
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("a.txt"), b"first publisher\n").unwrap();
    let cache = tmp.path().join("cache");

    let server = start_server(&lab, &src, "tofu", &tmp.path().join("state1"), &[]);
    let dest = tmp.path().join("dest1");
    copy(&lab, "tofu", &dest, &cache, 20, &[]).assert_success();
    assert_trees_equal(&src, &dest);
    server.stop();

    fs::write(src.join("a.txt"), b"a second host publishes now\n").unwrap();
    let state2 = tmp.path().join("state2");
    let other = start_server_at(&lab, "c2", &src, "tofu", &state2, &[], &[]);
    let dest = tmp.path().join("dest2");
    let o = copy(&lab, "tofu", &dest, &cache, 3, &[]);
    o.assert_failure("a second publisher");
    assert_nothing_written(&dest, "a second publisher");
    assert!(
        o.stderr.contains("--allow-new-publisher") && o.stderr.contains("the server at"),
        "the refusal does not name the remembered publisher and the way out:\n{}",
        o.stderr
    );
    copy(&lab, "tofu", &dest, &cache, 20, &["--allow-new-publisher"]).assert_success();
    assert_trees_equal(&src, &dest);
    let dest = tmp.path().join("dest3");
    copy(&lab, "tofu", &dest, &cache, 20, &[]).assert_success();
    assert_trees_equal(&src, &dest);
    other.stop();
}

/// Joins the channel's root group in `node` and returns the first root packet heard.
fn capture_root(lab: &Lab, node: &str, channel: &str) -> Vec<u8> {
    let group = Channel::new(channel, None).root_address().group;
    in_netns(lab, node, move || {
        let sock = UdpSocket::bind(format!("[::]:{PORT}")).expect("bind the lcfs port");
        sock.join_multicast_v6(&group, ifindex(Lab::IFACE)).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut buf = vec![0; 2048];
        let (n, _) = sock.recv_from(&mut buf).expect("a root record within 20 s");
        buf.truncate(n);
        buf
    })
    .join()
    .unwrap()
}

fn decode_root(mut pkt: Vec<u8>) -> RootRecord {
    let p = packet::decode(&mut pkt, None).expect("a root packet");
    match p.body {
        packet::Body::Root(b) => RootRecord::decode(b).expect("a root record"),
        _ => panic!("not a root packet"),
    }
}

/// Waits, by the wall clock, until `t_ns` (Unix ns) has passed: signatures expire by time.
fn wait_until_unix_ns(t_ns: u64) {
    loop {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        if now > t_ns {
            return;
        }
        std::thread::sleep(Duration::from_nanos((t_ns - now).min(200_000_000)));
    }
}

/// TUF's freeze attack: a captured signed root record is replayed after it expired. A live
/// server renews its signature, so a copy after the first signature's expiry still works; the
/// replay of that first record, with the server gone, is refused as expired.
#[test]
fn expired_signed_root_is_refused() {
    let lab = Lab::with_clients(1);
    let tmp = tmpdir("trust");
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("signed.txt"), b"signed\n").unwrap();
    let (key, public) = signing_key(tmp.path());
    let server = start_server(
        &lab,
        &src,
        "fresh",
        &tmp.path().join("state"),
        &["--sign-key", s(&key), "--sign-validity", "3s"],
    );
    let first = capture_root(&lab, "c1", "fresh");
    let record = decode_root(first.clone());
    let sig = record.signature.clone().expect("a signed record");
    assert_eq!(sig.expires_ns - sig.signed_at_ns, 3_000_000_000);

    wait_until_unix_ns(sig.expires_ns);
    let dest = tmp.path().join("dest-renewed");
    let o = copy(
        &lab,
        "fresh",
        &dest,
        &tmp.path().join("cache1"),
        10,
        &["--publisher", &public],
    );
    o.assert_success();
    assert_trees_equal(&src, &dest);
    server.stop();

    let stop = Arc::new(AtomicBool::new(false));
    let replayer = replay(&lab, "c1", "fresh", first, stop.clone());
    let dest = tmp.path().join("dest-replay");
    let o = copy(
        &lab,
        "fresh",
        &dest,
        &tmp.path().join("cache2"),
        3,
        &["--publisher", &public],
    );
    stop.store(true, Ordering::Relaxed);
    replayer.join().unwrap();
    o.assert_failure("a replayed expired root record");
    assert_nothing_written(&dest, "a replayed expired root record");
    assert!(
        o.stderr.contains("expired"),
        "the refusal does not say the record expired:\n{}",
        o.stderr
    );
}

/// A new publisher signing key in `dir`: its path, and the path of its public half.
fn signing_key(dir: &Path) -> (std::path::PathBuf, String) {
    let key = dir.join("publisher.key");
    let o = std::process::Command::new(common::lcfs::LCFS)
        .args(["keygen", "--sign", "--out", s(&key)])
        .output()
        .unwrap();
    assert!(o.status.success(), "keygen: {o:?}");
    let public = format!("{}.pub", s(&key));
    (key, public)
}

/// Sends `record` (a captured root packet) from `node` to its channel's root group every
/// millisecond until `stop`, as a host replaying it would.
fn replay(
    lab: &Lab,
    node: &str,
    channel: &str,
    record: Vec<u8>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<()> {
    let group = Channel::new(channel, None).root_address().group;
    in_netns(lab, node, move || {
        let sock = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, None).unwrap();
        sock.set_multicast_if_v6(ifindex(Lab::IFACE)).unwrap();
        sock.set_multicast_loop_v6(true).unwrap();
        let to = SocketAddrV6::new(group, PORT, 0, 0).into();
        while !stop.load(Ordering::Relaxed) {
            let _ = sock.send_to(&record, &to);
            std::thread::sleep(Duration::from_millis(1));
        }
    })
}

/// A host replays an older root record of the same publisher, validly signed, while the
/// live server is on a newer generation: the replay is most likely the first record the copy
/// hears. A copy starts on the first acceptable record, and moves to a newer one of the same
/// publisher heard within the listening window, writing nothing under DEST before the window
/// closes: it ends with the newer generation, whole, and nothing of the older.
#[test]
fn a_replayed_older_generation_loses_to_the_live_server() {
    let lab = Lab::with_clients(1);
    let tmp = tmpdir("trust");
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("only-in-v1.txt"), b"old\n").unwrap();
    fs::write(src.join("sub/kept.txt"), b"version 1\n").unwrap();
    let (key, public) = signing_key(tmp.path());
    let state = tmp.path().join("state");
    let sign = ["--sign-key", s(&key)];
    let v1 = start_server(&lab, &src, "replayed", &state, &sign);
    let old = capture_root(&lab, "c1", "replayed");
    let old_generation = decode_root(old.clone()).generation;
    v1.stop();

    fs::remove_file(src.join("only-in-v1.txt")).unwrap();
    fs::write(src.join("sub/kept.txt"), b"version 2, longer\n").unwrap();
    fs::write(src.join("only-in-v2.txt"), b"new\n").unwrap();
    let v2 = start_server(&lab, &src, "replayed", &state, &sign);
    let stop = Arc::new(AtomicBool::new(false));
    let replayer = replay(&lab, "c1", "replayed", old, stop.clone());
    let dest = tmp.path().join("dest");
    let o = spawn_copy_with(
        &lab,
        "c1",
        "replayed",
        &dest,
        &tmp.path().join("cache"),
        Some(20),
        &["--publisher", &public],
        &[("RUST_LOG", "lcfs=info")],
    )
    .wait(Duration::from_secs(80));
    stop.store(true, Ordering::Relaxed);
    replayer.join().unwrap();
    v2.stop();
    o.assert_success();
    assert_trees_equal(&src, &dest);
    println!(
        "replayed generation {old_generation}; the copy {} from it",
        if o.stderr.contains("starting again on it") {
            "moved"
        } else {
            "never started"
        }
    );
}

/// `mount --daemon --password`: the parent takes the password and hands the derived key to
/// the daemon through a pipe, so the daemon mounts without a terminal and its environment
/// holds no password.
#[test]
fn a_password_daemon_keeps_no_password() {
    const PW: &str = "correct horse battery staple";
    let lab = Lab::with_clients(1);
    let tmp = tmpdir("trust");
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f.txt"), b"behind a password\n").unwrap();
    let envs = [("LCFS_PASSWORD", PW)];
    let state = tmp.path().join("state");
    let server = start_server_env(&lab, &src, "pw", &state, &["--password"], &envs);
    let mnt = tmp.path().join("mnt");
    let cache = tmp.path().join("cache");
    let m = Mount::new_env(&lab, "c1", "pw", &mnt, &cache, 20, &["--password"], &envs);
    assert_eq!(
        fs::read(m.path().join("f.txt")).unwrap(),
        b"behind a password\n"
    );
    let pid = m.daemon_pid.expect("the daemon's pid");
    let environ = fs::read(format!("/proc/{pid}/environ")).unwrap();
    let has = |needle: &[u8]| environ.windows(needle.len()).any(|w| w == needle);
    assert!(
        !has(b"LCFS_PASSWORD") && !has(PW.as_bytes()),
        "the mount daemon's environment holds the password"
    );
    drop(m);
    server.stop();
}

/// Packets of a hostile channel sent by a host of the link: `dirs` are directory encodings,
/// the last one the root.
fn hostile_channel_packets(channel_name: &str, dirs: &[Vec<u8>]) -> Vec<(Ipv6Addr, Vec<u8>)> {
    let channel = Channel::new(channel_name, None);
    let top = dirs.last().expect("a root directory");
    let root = RootRecord {
        channel_id: *channel.id(),
        generation: unix_now(),
        publish_time_ns: 0,
        root: object_ref(top),
        block_size: BlockSize::DEFAULT,
        single_file: false,
        signature: None,
    };
    let mut out = Vec::new();
    packet::encode_root(&mut out, channel.root_address().tag, &root.encode(), None);
    let mut packets = vec![(channel.root_address().group, out.clone())];
    for d in dirs {
        let enc = ObjectEncoder::new(d, symbol_size_for_object(d.len() as u64, 1400)).unwrap();
        let addr = channel.object_address(&ObjectHash::of(d));
        let mut sym = Vec::new();
        for esi in 0..enc.source_symbols() + 2 {
            enc.symbol(Esi(esi), &mut sym);
            packet::encode_symbol(&mut out, addr.tag, Esi(esi), &sym, None);
            packets.push((addr.group, out.clone()));
        }
    }
    packets
}

/// Sends every packet to its group on the lab interface until `stop`.
fn multicast_blast(packets: Vec<(Ipv6Addr, Vec<u8>)>, stop: Arc<AtomicBool>) {
    let sock = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, None).unwrap();
    sock.set_multicast_if_v6(ifindex(Lab::IFACE)).unwrap();
    while !stop.load(Ordering::Relaxed) {
        for (group, p) in &packets {
            let _ = sock.send_to(p, &SocketAddrV6::new(*group, PORT, 0, 0).into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn dir_named(entries: Vec<Entry>) -> Vec<u8> {
    Directory::new(entries).encode()
}

fn subdir(name: &str, below: &[u8]) -> Entry {
    Entry {
        name: name.as_bytes().to_vec(),
        mode: 0o755,
        mtime: Timestamp { secs: 0, nanos: 0 },
        nlink: 2,
        link: 0,
        kind: EntryKind::Dir(object_ref(below)),
    }
}

/// Runs `args` in c1 and samples its peak resident memory (VmHWM) until it exits; returns
/// its output and the peak in MiB.
fn run_measured(lab: &Lab, args: &[&str]) -> (std::process::Output, u64) {
    let mut cmd = lab.command("c1", common::lcfs::LCFS);
    cmd.args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let child = lab.spawn_command(cmd);
    let pid = child.id();
    let mut peak_kib = 0;
    let sampler = std::thread::spawn(move || {
        while let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) {
            let hwm = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
            match hwm {
                Some(h) => peak_kib = peak_kib.max(h),
                None => break, // a zombie: it has exited
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        peak_kib
    });
    let out = child.wait_with_output().unwrap();
    (out, sampler.join().unwrap() / 1024)
}

/// A few kilobytes of hostile tree must fail cleanly and in bounded memory: 40 directories
/// that each name the next twice (2^40 paths), and a file that claims 2^50 bytes. Before the
/// walks were bounded, 21 such objects made `prefetch` list a million paths in 1.35 GB.
#[test]
fn a_hostile_tree_fails_cleanly_in_bounded_memory() {
    const MAX_MIB: u64 = 100;
    let lab = Lab::with_clients(2);
    let tmp = tmpdir("trust");
    let mut dirs = vec![dir_named(vec![])];
    for _ in 0..40 {
        let below = dirs.last().unwrap().clone();
        dirs.push(dir_named(vec![subdir("a", &below), subdir("b", &below)]));
    }
    let huge = Entry {
        name: b"huge".to_vec(),
        mode: 0o644,
        mtime: Timestamp { secs: 0, nanos: 0 },
        nlink: 1,
        link: 0,
        kind: EntryKind::File(FileRef {
            size: 1 << 50,
            b3: FileHash::of(b""),
            content: Content::Index {
                index: object_ref(b"never sent"),
                first_leaf: ObjectHash::of(b""),
            },
        }),
    };
    let huge_dirs = vec![dir_named(vec![huge])];
    let total: usize = dirs.iter().map(Vec::len).sum();
    eprintln!("the doubling tree is {total} bytes of directory objects");

    let stop = Arc::new(AtomicBool::new(false));
    let mut packets = hostile_channel_packets("doubling", &dirs);
    packets.extend(hostile_channel_packets("hugefile", &huge_dirs));
    let st = stop.clone();
    let forger = in_netns(&lab, "c2", move || multicast_blast(packets, st));

    let cache = |n: &str| tmp.path().join(format!("cache-{n}"));
    let runs: [(&str, Vec<String>, &str); 4] = [
        (
            "copy doubling",
            vec![
                "copy".into(),
                "doubling".into(),
                s(&tmp.path().join("d1")).into(),
            ],
            "already listed",
        ),
        (
            "prefetch hugefile",
            vec!["prefetch".into(), "hugefile".into()],
            "--block-size",
        ),
        (
            "copy hugefile",
            vec![
                "copy".into(),
                "hugefile".into(),
                s(&tmp.path().join("d2")).into(),
            ],
            "--block-size",
        ),
        (
            "prefetch doubling",
            vec!["prefetch".into(), "doubling".into()],
            "",
        ),
    ];
    for (what, mut args, says) in runs {
        let c = cache(&what.replace(' ', "-"));
        args.extend(["--iface", Lab::IFACE, "--timeout", "10", "--cache", s(&c)].map(String::from));
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let (out, peak) = run_measured(&lab, &argv);
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("{what}: {} with a peak of {peak} MiB: {stderr}", out.status);
        assert!(peak < MAX_MIB, "{what} reached {peak} MiB resident");
        if says.is_empty() {
            // Objects, not paths: each of the 41 directories is fetched once.
            assert!(out.status.success(), "{what} failed: {stderr}");
        } else {
            assert!(!out.status.success(), "{what} succeeded on a hostile tree");
            assert!(
                stderr.contains(says),
                "{what} does not say {says:?}: {stderr}"
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    forger.join().unwrap();
}
