//! MLD tracking that cannot be exhausted (issue 9, part 7), end to end in the
//! namespace lab. Needs root and python3. Run with
//! `cargo test --test mld_flood -- --test-threads=1`.
//!
//! A hostile host on the link (`c2`) runs `tools/flood --mld` at 40 000
//! messages a second: forged MLDv2 reports from 100 000 distinct link-local
//! sources for the channel's root and beacon groups (which every receiver
//! joins), for every group it sees the receiver join (its forged queries make
//! the snooping bridge send it the receiver's reports) and for random groups;
//! spoofed leaves of those groups from the real receiver's own address;
//! general queries from `fe80::1` announcing the largest timers MLD can carry;
//! and reports with a hop limit of 255 or no Router Alert, which the server
//! must not believe (RFC 3810 section 5). Beside it a real `lcfs copy` in `c1`
//! must finish, byte for byte, while the server's memory and its MLD thread's
//! CPU stay bounded.
//!
//! Before the fix the copy failed after its 20 s `--timeout`: the MLD thread
//! scanned every listener before each packet, handled one message in twenty
//! and the socket dropped the rest, the receiver's reports among them; and the
//! objects the flood kept listened to took every round, so the receiver's new
//! blocks never went out.
//!
//! Bounds, with the margin they leave:
//! - [`COPY_LIMIT`] (40 s): the copy of 6.4 MiB takes about 1 s unflooded
//!   here and 4 s beside the flood (the objects the flood keeps listened to
//!   still cost some rounds); a copy whose reports are lost or whose blocks are
//!   starved fails at its 20 s `--timeout` instead;
//! - [`MAX_SERVER_HWM_KIB`] (96 MiB): the server serving this tree peaks near
//!   36 MiB under the flood (its 32 MiB encoder cache included) while the
//!   MLD tracker held 16,384 listeners, 54 MiB since it holds 131,072 (so as to
//!   count 1000 receivers on lossy links); its limits hold its state to 117 MiB
//!   at worst whatever the flood, 29 MiB when no record lists sources (its
//!   module doc sizes them), and this flood lists one to eight;
//! - [`MAX_MLD_CPU_PER_MESSAGE`] (25 us): the MLD thread's CPU time over the
//!   messages it handled: 5 to 7 us measured with 16,384 listeners held, 11 us
//!   with 131,072, against about 400 us before the fix. A cost per message,
//!   unlike a share of a core, does not depend on how busy the machine's two
//!   cores are with other work;
//! - [`MAX_MLD_CPU_SHARE`] (60%): the MLD thread's share of one core over the
//!   flood: 20 to 26% measured, 73% before the fix (when it got the CPU).

mod common;

use common::lab::Lab;
use common::lcfs::{
    collect_lines, number_before, signal, spawn_copy, start_server, tmpdir, wait_limit, Server,
    IFACE,
};
use common::tree::{assert_trees_equal, write_random_file};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const COPY_LIMIT: Duration = Duration::from_secs(40);
const MAX_SERVER_HWM_KIB: u64 = 96 * 1024;
const MAX_MLD_CPU_SHARE: f64 = 0.6;
const MAX_MLD_CPU_PER_MESSAGE: f64 = 25e-6;
/// Distinct forged sources: the 100k spoofed reports.
const SOURCES: u32 = 100_000;
/// The flood must have used every forged source once before the copy starts.
const WARM_UP_MESSAGES: u64 = SOURCES as u64;
/// Forged MLD messages a second: above the 26k packets/s, below what
/// the flood tool can do on one core, so that the copy still gets CPU.
const FLOOD_RATE: u32 = 40_000;

/// The tree to copy: 6 MiB in one large file and 32 small ones.
fn make_tree(root: &Path) {
    let mut rng = StdRng::seed_from_u64(0x3d1d_f100d);
    write_random_file(&root.join("large.bin"), &mut rng, 5 * 1024 * 1024 + 4097);
    for i in 0..32 {
        write_random_file(
            &root.join(format!("small/{i:02}")),
            &mut rng,
            30_000 + i * 1000,
        );
    }
}

/// `tools/flood --mld` running in a lab host.
struct MldFlood {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    threads: Vec<JoinHandle<()>>,
}

impl MldFlood {
    fn start(lab: &Lab, node: &str, groups: &[Ipv6Addr], victim: Ipv6Addr) -> MldFlood {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/flood");
        assert!(path.exists(), "{} is missing", path.display());
        let groups: Vec<String> = groups.iter().map(Ipv6Addr::to_string).collect();
        let mut cmd = lab.command(node, &path);
        cmd.args(["--mld", "--iface", IFACE, "--seconds", "120", "--seed", "9"])
            .args(["--rate", &FLOOD_RATE.to_string()])
            .args(["--sources", &SOURCES.to_string()])
            .args(["--groups", &groups.join(",")])
            .args(["--victim", &victim.to_string()])
            .args([
                "--mld-kinds",
                "report=16,random=4,done=2,query=1,untrusted=1",
                "--verbose",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = lab.spawn_command(cmd);
        let (stdout, h1) = collect_lines(child.stdout.take().unwrap(), format!("flood {node}"));
        let (stderr, h2) = collect_lines(child.stderr.take().unwrap(), format!("flood {node}"));
        MldFlood {
            child,
            stdout,
            stderr,
            threads: vec![h1, h2],
        }
    }

    /// Messages sent so far, from the last `flood: N s: sent M, ...` progress line.
    fn sent_so_far(&self) -> u64 {
        let err = self.stderr.lock().unwrap().clone();
        err.lines()
            .rev()
            .find_map(|l| l.split("sent ").nth(1)?.split(',').next()?.parse().ok())
            .unwrap_or(0)
    }

    /// Waits (at most 30 s) until the flood has sent `n` messages.
    fn wait_sent(&mut self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.sent_so_far() < n {
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "tools/flood ended before sending {n} messages"
            );
            assert!(
                Instant::now() < deadline,
                "tools/flood sent only {} of {n} messages in 30 s",
                self.sent_so_far()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM; returns the JSON report, after checking the flood was still running.
    fn finish(mut self) -> String {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "tools/flood ended before the copy did: it must outlast it"
        );
        signal(&self.child, libc::SIGTERM);
        let st = wait_limit(&mut self.child, Duration::from_secs(10));
        if st.is_none() {
            signal(&self.child, libc::SIGKILL);
            let _ = self.child.wait();
        }
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
        let out = self.stdout.lock().unwrap().clone();
        assert!(
            st.is_some_and(|s| s.success()),
            "tools/flood failed ({st:?}): {out}"
        );
        out.lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .unwrap_or_else(|| panic!("tools/flood printed no JSON report: {out}"))
            .to_string()
    }
}

fn json_u64(json: &str, key: &str) -> u64 {
    let pat = format!("\"{key}\": ");
    let at = json
        .find(&pat)
        .unwrap_or_else(|| panic!("no {key} in {json}"))
        + pat.len();
    json[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{key} is not a number in {json}"))
}

/// A `/proc/PID/status` field in kB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("server status");
    text.lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// CPU seconds used so far by the server's MLD thread (`lcfs-mld-lc0`).
fn mld_thread_cpu(pid: u32) -> f64 {
    let tasks = PathBuf::from(format!("/proc/{pid}/task"));
    for task in std::fs::read_dir(&tasks).expect("server tasks").flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != format!("lcfs-mld-{IFACE}") {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).expect("task stat");
        // After the parenthesised name: state (field 3 of proc(5)) ... utime 14, stime 15.
        let rest = &stat[stat.rfind(')').expect("stat name") + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        let ticks = |i: usize| f[i].parse::<u64>().expect("utime/stime");
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        return (ticks(11) + ticks(12)) as f64 / hz;
    }
    panic!("the server has no lcfs-mld-{IFACE} thread");
}

/// (reports, queries received, untrusted) from the server's `MLD: N reports, M queries
/// received, ... U untrusted` line.
fn mld_messages(log: &str) -> Option<(u64, u64, u64)> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("MLD: ") && l.contains(" reports, "))?;
    let n = |suffix| number_before(line, suffix);
    Some((n(" reports, ")?, n(" queries received")?, n(" untrusted")?))
}

/// Drops counted on the server's raw ICMPv6 sockets (`/proc/net/raw6`, last column).
fn raw_socket_drops(lab: &Lab) -> u64 {
    let out = lab.run("srv", &["cat", "/proc/net/raw6"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
        .sum()
}

fn server_pid(server: &Server) -> u32 {
    let pid = server.child.id();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert_eq!(
        comm.trim(),
        "lcfs",
        "pid {pid} is not the server (nsenter forked?)"
    );
    pid
}

/// Issue 9 part 7, judged: a real copy finishes beside an MLD flood from a
/// hostile host on the link; the server's memory and CPU stay bounded.
#[test]
fn copy_finishes_beside_an_mld_flood() {
    let lab = Lab::with_clients(2);
    let tmp = tmpdir("mld-flood");
    let src = tmp.path().join("src");
    make_tree(&src);
    let server = start_server(&lab, &src, "mldflood", &tmp.path().join("state"), &[]);
    let pid = server_pid(&server);
    let channel = lcfs::wire::channel::Channel::new("mldflood", None);
    let groups = [channel.root_address().group, channel.air_address().group];
    let victim = lab.link_local("c1");

    let mut flood = MldFlood::start(&lab, "c2", &groups, victim);
    let (cpu0, t0) = (mld_thread_cpu(pid), Instant::now());
    flood.wait_sent(WARM_UP_MESSAGES);
    let dest = tmp.path().join("dest");
    let copy = spawn_copy(&lab, "c1", "mldflood", &dest, &tmp.path().join("cache"), 20);
    let outcome = copy.wait(COPY_LIMIT);
    let share = (mld_thread_cpu(pid) - cpu0) / t0.elapsed().as_secs_f64();
    let report = flood.finish();
    let cpu = mld_thread_cpu(pid) - cpu0;
    let hwm = status_kib(pid, "VmHWM:");
    let drops = raw_socket_drops(&lab);
    let log = server.stop();
    let counted = mld_messages(&log);
    // Without the server's counters, what the flood sent less what the socket dropped.
    let sent = json_u64(&report, "sent");
    let (reports, queries, untrusted) = counted.unwrap_or((sent.saturating_sub(drops), 0, 0));
    let per_message = cpu / (reports + queries + untrusted).max(1) as f64;
    eprintln!(
        "copy beside the MLD flood: {:.1} s; server VmHWM {hwm} kB; MLD thread {:.0}% of a core, \
         {:.1} us a message ({reports} reports, {queries} queries handled, {untrusted} not \
         believed, {drops} dropped by the socket); flood {report}",
        outcome.elapsed.as_secs_f64(),
        share * 100.0,
        per_message * 1e6
    );
    assert!(!log.contains("panicked"), "lcfs serve panicked:\n{log}");
    assert!(
        counted.is_some(),
        "lcfs serve logged no `MLD: N reports, ...` line:\n{log}"
    );
    outcome.assert_success();
    assert_trees_equal(&src, &dest);
    assert!(
        json_u64(&report, "sent") >= WARM_UP_MESSAGES,
        "the flood sent too little to prove anything: {report}"
    );
    assert!(
        hwm <= MAX_SERVER_HWM_KIB,
        "server VmHWM {hwm} kB > {MAX_SERVER_HWM_KIB} kB under the MLD flood"
    );
    assert!(
        share <= MAX_MLD_CPU_SHARE,
        "the MLD thread used {:.0}% of a core under the flood (bound {:.0}%)",
        share * 100.0,
        MAX_MLD_CPU_SHARE * 100.0
    );
    assert!(
        reports >= WARM_UP_MESSAGES / 2,
        "the server handled only {reports} reports of the flood: it did not reach the tracker"
    );
    assert!(
        per_message <= MAX_MLD_CPU_PER_MESSAGE,
        "the MLD thread spent {:.1} us a message (bound {:.0} us)",
        per_message * 1e6,
        MAX_MLD_CPU_PER_MESSAGE * 1e6
    );
    let forged_untrusted = json_u64(&report, "untrusted");
    assert!(
        untrusted >= forged_untrusted / 2 && forged_untrusted > 0,
        "{forged_untrusted} reports with hop limit 255 or no Router Alert sent, {untrusted} \
         refused"
    );
    assert!(
        log.contains("MLD listener limits reached"),
        "the flood never reached the tracker's limits: it proved nothing"
    );
}
