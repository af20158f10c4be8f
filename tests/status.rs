//! `lcfs status` and the Prometheus endpoints beside a running serve and two mounts, in the
//! namespace lab: what they say is compared with what the test itself read and the server
//! announced, and a server killed shows as offline on both mounts within seconds.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::lab::Lab;
use common::lcfs::{getfattr, s, start_server, tmpdir, within, Mount, LCFS};
use common::tree::write_random_file;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::Value;

const CHANNEL: &str = "statusch";

/// `lcfs status --json`, only this test's processes (other tests may run beside it).
fn statuses(pids: &[u32]) -> Vec<Value> {
    let out = Command::new(LCFS)
        .args(["status", "--json"])
        .output()
        .expect("run lcfs status");
    assert!(out.status.success(), "lcfs status --json failed: {out:?}");
    let all: Vec<Value> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("lcfs status --json is not JSON ({e}): {out:?}"));
    all.into_iter()
        .filter(|v| pids.contains(&(v["pid"].as_u64().unwrap_or(0) as u32)))
        .collect()
}

fn of(all: &[Value], pid: u32) -> &Value {
    all.iter()
        .find(|v| v["pid"].as_u64() == Some(u64::from(pid)))
        .unwrap_or_else(|| panic!("lcfs status does not show pid {pid}: {all:#?}"))
}

/// One metric's value from a scrape, in the namespace of `node`.
fn scrape(lab: &Lab, node: &str, port: u16) -> String {
    let out = lab
        .command(node, "python3")
        .args([
            "-c",
            &format!(
                "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics', timeout=5).read().decode())"
            ),
        ])
        .output()
        .expect("scrape");
    assert!(
        out.status.success(),
        "scraping port {port} in {node}: {out:?}"
    );
    String::from_utf8(out.stdout).unwrap()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}

#[test]
fn status_and_metrics_beside_a_serve_and_two_mounts() {
    let lab = Lab::with_clients(2);
    let tmp = tmpdir("status");
    let src = tmp.path().join("src");
    let mut rng = StdRng::seed_from_u64(0x5747);
    write_random_file(&src.join("a.bin"), &mut rng, 3 << 20);
    write_random_file(&src.join("d/b.bin"), &mut rng, 200_000);
    let srv = start_server(
        &lab,
        &src,
        CHANNEL,
        &tmp.path().join("state"),
        &["--metrics", "9464"],
    );
    let srv_pid = srv.child.id();
    let m1 = Mount::new(
        &lab,
        "c1",
        CHANNEL,
        &tmp.path().join("m1"),
        &tmp.path().join("cache1"),
        20,
        &["--metrics", "9465"],
    );
    let m2 = Mount::new(
        &lab,
        "c2",
        CHANNEL,
        &tmp.path().join("m2"),
        &tmp.path().join("cache2"),
        20,
        &[],
    );
    let (p1, p2) = (m1.daemon_pid.unwrap(), m2.daemon_pid.unwrap());
    let a = std::fs::read(m1.path().join("a.bin")).unwrap();
    assert_eq!(a.len(), 3 << 20);
    std::fs::read(m2.path().join("d/b.bin")).unwrap();

    // a report a second after the reads shows them
    let pids = [srv_pid, p1, p2];
    let mut all = Vec::new();
    let shown = within(Duration::from_secs(10), || {
        all = statuses(&pids);
        all.len() == 3
            && of(&all, p1)["receiver"]["bytes_fetched"].as_u64() >= Some(3 << 20)
            && of(&all, srv_pid)["server"]["listeners"].as_u64() == Some(2)
    });
    assert!(
        shown.is_some(),
        "lcfs status never showed the reads: {all:#?}"
    );
    let serve = of(&all, srv_pid);
    assert_eq!(serve["command"], "serve");
    assert_eq!(serve["channel"], CHANNEL);
    assert_eq!(serve["server"]["generation"], srv.ready.generation);
    assert_eq!(serve["server"]["files"], srv.ready.files);
    assert_eq!(serve["server"]["bytes"], srv.ready.bytes);
    assert_eq!(serve["metrics"], "127.0.0.1:9464");
    for (pid, mnt) in [(p1, &m1), (p2, &m2)] {
        let m = of(&all, pid);
        assert_eq!(m["command"], "mount");
        assert_eq!(m["target"], s(mnt.path()));
        assert_eq!(m["receiver"]["generation"], srv.ready.generation);
        assert_eq!(m["receiver"]["server_online"], true, "{m:#}");
    }
    let r1 = &of(&all, p1)["receiver"];
    let fetched = r1["bytes_fetched"].as_u64().unwrap();
    // the file's blocks, its index and the directories: a little more than the file
    assert!(
        fetched < (3 << 20) + 200_000,
        "mount 1 says it fetched {fetched} B for a 3 MiB file"
    );
    assert!(r1["cache"]["bytes"].as_u64() >= Some(3 << 20), "{r1:#}");
    assert!(r1["latency"]["counts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c != 0));

    // the human view names every process
    let out = Command::new(LCFS).arg("status").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for pid in pids {
        assert!(text.contains(&format!("pid {pid} ")), "{text}");
    }
    eprintln!("{text}");

    // the metrics agree with the status files
    let mm = scrape(&lab, "c1", 9465);
    assert!(metric(&mm, "lcfs_fetched_bytes_total") >= (3 << 20) as f64);
    assert_eq!(metric(&mm, "lcfs_server_online"), 1.0);
    assert!(metric(&mm, "lcfs_fetch_duration_seconds_count") >= 1.0);
    assert!(mm.contains(&format!(
        "lcfs_info{{command=\"mount\",channel=\"{CHANNEL}\""
    )));
    let ms = scrape(&lab, "srv", 9464);
    assert_eq!(metric(&ms, "lcfs_serve_listeners"), 2.0);
    assert_eq!(metric(&ms, "lcfs_generation"), srv.ready.generation as f64);
    assert!(metric(&ms, "lcfs_serve_sent_bytes_total") >= (3 << 20) as f64);
    // what the receivers report: two mounts at most, the wait at most its longest
    assert!(metric(&ms, "lcfs_serve_bulk_receivers") <= 2.0);
    assert!(metric(&ms, "lcfs_serve_loss_reporters") <= 2.0);
    assert!(metric(&ms, "lcfs_serve_gather_wait_seconds") <= 0.1);
    // the lab's links lose nothing: no loss in bursts, no first round in turns
    assert_eq!(metric(&ms, "lcfs_serve_bursty_loss"), 0.0);
    assert_eq!(metric(&ms, "lcfs_serve_first_rounds_in_turns_total"), 0.0);
    // rounds for late joiners are counted (two mounts may or may not start apart)
    assert!(metric(&ms, "lcfs_serve_late_joiner_rounds_total") >= 0.0);

    // the server gone: both mounts say so within OFFLINE_AFTER (3 s) and a report
    let killed = Instant::now();
    srv.kill();
    let offline = within(Duration::from_secs(15), || {
        let all = statuses(&[p1, p2]);
        all.len() == 2 && all.iter().all(|v| v["receiver"]["server_online"] == false)
    });
    let took = offline.unwrap_or_else(|| {
        panic!(
            "the mounts still say the server is online 15 s after it was killed: {:#?}",
            statuses(&[p1, p2])
        )
    });
    eprintln!(
        "both mounts showed the server offline {:.1} s after it was killed",
        took.as_secs_f64()
    );
    assert!(killed.elapsed() >= Duration::from_secs(2));
    assert!(
        xattr_offline(m1.path()),
        "user.lcfs.server still says online"
    );
    assert!(!statuses(&[srv_pid]).iter().any(|v| v["pid"] == srv_pid));

    // unmounted: their status files go
    m1.unmount();
    m2.unmount();
    let gone = within(Duration::from_secs(10), || statuses(&[p1, p2]).is_empty());
    assert!(gone.is_some(), "lcfs status still shows unmounted mounts");
}

fn xattr_offline(mnt: &Path) -> bool {
    getfattr(mnt, "user.lcfs.server").is_some_and(|v| v.starts_with("offline"))
}

/// A raw request that is not GET /metrics gets a 404, and the endpoint survives it.
#[test]
fn metrics_endpoint_refuses_other_paths() {
    let lab = Lab::with_clients(1);
    let tmp = tmpdir("status-http");
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("x"), b"x").unwrap();
    let srv = start_server(
        &lab,
        &src,
        "statushttp",
        &tmp.path().join("state"),
        &["--metrics", "9470"],
    );
    let out = lab
        .command("srv", "python3")
        .args([
            "-c",
            "import socket\n\
             for req in [b'GET /secret HTTP/1.0\\r\\n\\r\\n', b'\\x00' * 3000, b'GET /metrics HTTP/1.0\\r\\n\\r\\n']:\n\
             \x20   s = socket.create_connection(('127.0.0.1', 9470), timeout=5)\n\
             \x20   s.sendall(req)\n\
             \x20   got = b''\n\
             \x20   while True:\n\
             \x20       part = s.recv(4096)\n\
             \x20       if not part: break\n\
             \x20       got += part\n\
             \x20   print(got.split(b'\\r\\n')[0].decode(errors='replace'))\n\
             \x20   s.close()\n",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [
            "HTTP/1.0 404 Not Found",
            "HTTP/1.0 404 Not Found",
            "HTTP/1.0 200 OK"
        ],
        "{out:?}"
    );
    srv.stop();
}
