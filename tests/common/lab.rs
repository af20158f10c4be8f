//! The network lab for integration tests (DESIGN.md section 9): a thin wrapper
//! around `tools/netlab`.
//!
//! ```ignore
//! let lab = Lab::up(LabOptions { clients: 2, ..Default::default() });
//! let out = lab.run("c1", &["ip", "-6", "addr", "show", "dev", Lab::IFACE]);
//! let server = lab.spawn("srv", &[env!("CARGO_BIN_EXE_lcfs"), "serve", "--iface", Lab::IFACE]);
//! // dropping `lab` kills what it spawned and every other process in its
//! // namespaces, then deletes the namespaces — also when the test panics.
//! ```
//!
//! Nodes are `"srv"`, `"c1"` ..= `"cN"` and `"br"` (the bridge namespace). Every
//! host has one interface, [`Lab::IFACE`] (`lc0`), with a link-local address and
//! the ULA [`Lab::addr`]. Commands enter only the *network* namespace
//! (`nsenter --net`), so FUSE mounts they make are visible to the whole machine.
//! Note that `/sys/class/net` still shows the root namespace there; use netlink
//! or `if_nametoindex` (which work per network namespace) instead.
#![allow(dead_code)]

use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How to build a lab. `Default`: 3 clients, MLD snooping on, no shaping.
#[derive(Clone, Debug)]
pub struct LabOptions {
    /// Number of clients, `c1` ..= `cN` (1..=99).
    pub clients: usize,
    /// MLD snooping on the bridge (its own querier is always off).
    pub snooping: bool,
    /// tbf rate on the server's `lc0` egress, in tc syntax, e.g. `"200mbit"`.
    pub rate: Option<String>,
    /// Loss in percent on every client's bridge port (server → client).
    pub loss: Option<f64>,
    /// Delay in ms on every client's bridge port (needs sch_netem in the kernel).
    pub delay_ms: Option<u32>,
    /// Jitter in ms, with `delay_ms` (needs sch_netem).
    pub jitter_ms: Option<u32>,
    /// Reorder in percent, with `delay_ms` (needs sch_netem).
    pub reorder: Option<f64>,
    /// Duplication in percent on every client's bridge port.
    pub duplicate: Option<f64>,
    /// MTU of every lab link.
    pub mtu: Option<u32>,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            clients: 3,
            snooping: true,
            rate: None,
            loss: None,
            delay_ms: None,
            jitter_ms: None,
            reorder: None,
            duplicate: None,
            mtu: None,
        }
    }
}

impl LabOptions {
    fn netlab_args(&self) -> Vec<String> {
        let mut a = vec![
            "--clients".to_string(),
            self.clients.to_string(),
            "--snooping".to_string(),
            if self.snooping { "on" } else { "off" }.to_string(),
        ];
        let mut opt = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                a.push(k.to_string());
                a.push(v);
            }
        };
        opt("--rate", self.rate.clone());
        opt("--loss", self.loss.map(|v| v.to_string()));
        opt("--delay", self.delay_ms.map(|v| v.to_string()));
        opt("--jitter", self.jitter_ms.map(|v| v.to_string()));
        opt("--reorder", self.reorder.map(|v| v.to_string()));
        opt("--duplicate", self.duplicate.map(|v| v.to_string()));
        opt("--mtu", self.mtu.map(|v| v.to_string()));
        a
    }
}

/// A running lab; `Drop` tears it down.
pub struct Lab {
    prefix: String,
    clients: usize,
    /// pids of processes started by [`Lab::spawn`] / [`Lab::spawn_command`].
    children: Mutex<Vec<u32>>,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Panics unless running as root: lab tests must fail, never silently pass.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "this test needs root (network namespaces, veth, tc, FUSE); euid is {euid}. \
         Run it as root, e.g. `sudo -E cargo test`."
    );
}

/// Panics unless root, `ip`, `tc`, `nsenter` and `/dev/fuse` are available.
pub fn require_lab_prerequisites() {
    require_root();
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: the lab tests need FUSE (modprobe fuse, or run the container with --device /dev/fuse)"
    );
    for (tool, arg) in [
        ("ip", "-V"),
        ("tc", "-V"),
        ("nsenter", "--version"),
        ("python3", "--version"),
    ] {
        match Command::new(tool).arg(arg).stdout(Stdio::null()).stderr(Stdio::null()).status() {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("`{tool} {arg}` failed ({s}); the lab needs iproute2, util-linux nsenter and python3"),
            Err(e) => panic!("`{tool}` is not runnable ({e}); the lab needs iproute2 (ip, tc), util-linux (nsenter) and python3"),
        }
    }
}

/// Path of `tools/netlab`.
pub fn netlab_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tools")
        .join("netlab")
}

/// Runs `tools/netlab ARGS`, returning its output (no assertion).
pub fn netlab(args: &[&str]) -> Output {
    Command::new(netlab_path())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", netlab_path().display()))
}

/// Names of the existing network namespaces that belong to lab `prefix`.
pub fn lab_namespaces(prefix: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|ns| {
            ns.strip_prefix(prefix)
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(|node| {
                    node == "br"
                        || node == "srv"
                        || node
                            .strip_prefix('c')
                            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                })
        })
        .map(str::to_string)
        .collect()
}

fn base36(mut n: u32) -> String {
    let digits = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut s = Vec::new();
    loop {
        s.push(digits[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    s.reverse();
    String::from_utf8(s).unwrap()
}

fn describe(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

impl Lab {
    /// The interface every lab host uses.
    pub const IFACE: &'static str = "lc0";

    /// Builds a lab with a prefix unique to this process and call: "lt", the
    /// pid, "x", a counter (base 36), e.g. `lt9ofx2`; so tests can run in
    /// parallel. Panics with a clear message if prerequisites are missing or
    /// `netlab up` fails. A stale lab of the same name is removed first.
    pub fn up(opts: LabOptions) -> Lab {
        require_lab_prerequisites();
        assert!(
            (1..=99).contains(&opts.clients),
            "LabOptions::clients must be 1..=99"
        );
        let prefix = format!(
            "lt{}x{}",
            base36(std::process::id()),
            base36(COUNTER.fetch_add(1, Ordering::Relaxed))
        );
        // a crashed earlier run with the same pid may have left it behind
        let _ = netlab(&["down", &prefix]);
        let mut args = vec!["up".to_string(), prefix.clone()];
        args.extend(opts.netlab_args());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = netlab(&args);
        assert!(
            out.status.success(),
            "netlab {} failed: {}",
            args.join(" "),
            describe(&out)
        );
        eprint!("{}", String::from_utf8_lossy(&out.stdout));
        Lab {
            prefix,
            clients: opts.clients,
            children: Mutex::new(Vec::new()),
        }
    }

    /// [`Lab::up`] with the default options but `clients` clients.
    pub fn with_clients(clients: usize) -> Lab {
        Lab::up(LabOptions {
            clients,
            ..Default::default()
        })
    }

    /// The namespace prefix, e.g. `lt1k3x0`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn clients(&self) -> usize {
        self.clients
    }

    /// `["c1", .., "cN"]`.
    pub fn client_names(&self) -> Vec<String> {
        (1..=self.clients).map(|i| format!("c{i}")).collect()
    }

    fn check_node(&self, node: &str) {
        let ok = node == "srv"
            || node == "br"
            || node
                .strip_prefix('c')
                .and_then(|n| n.parse::<usize>().ok())
                .is_some_and(|n| n >= 1 && n <= self.clients && node == format!("c{n}"));
        assert!(
            ok,
            "lab {}: no node {node:?} (nodes: srv, br, c1..c{})",
            self.prefix, self.clients
        );
    }

    /// Network namespace name of `node`, e.g. `lt1k3x0-c2`.
    pub fn netns(&self, node: &str) -> String {
        self.check_node(node);
        format!("{}-{node}", self.prefix)
    }

    /// `/run/netns/<netns>`.
    pub fn netns_path(&self, node: &str) -> PathBuf {
        Path::new("/run/netns").join(self.netns(node))
    }

    /// ULA of `node` on `lc0`: srv `fd6c:6366:7300::1`, cK `fd6c:6366:7300::1K`
    /// ("1" then the client number: c1 `::11`, c10 `::110`).
    pub fn addr(&self, node: &str) -> Ipv6Addr {
        self.check_node(node);
        let last = match node {
            "srv" => 1,
            "br" => panic!("the bridge namespace has no address"),
            c => u16::from_str_radix(&format!("1{}", &c[1..]), 16).unwrap(),
        };
        Ipv6Addr::new(0xfd6c, 0x6366, 0x7300, 0, 0, 0, 0, last)
    }

    /// The link-local address of `node` on `lc0` (the kernel's, derived from its MAC).
    pub fn link_local(&self, node: &str) -> Ipv6Addr {
        let out = self.run(
            node,
            &[
                "ip",
                "-6",
                "-o",
                "addr",
                "show",
                "dev",
                Self::IFACE,
                "scope",
                "link",
            ],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .skip_while(|w| *w != "inet6")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no link-local address on {node}'s lc0: {text}"))
    }

    /// `nsenter --net=/run/netns/<netns> -- program`; add args and run it.
    pub fn command(&self, node: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.netns_path(node).display()))
            .arg("--")
            .arg(program);
        c
    }

    /// Runs `args` in `node`, panicking (with stdout and stderr) unless it succeeds.
    pub fn run(&self, node: &str, args: &[&str]) -> Output {
        let out = self.try_run(node, args);
        assert!(
            out.status.success(),
            "lab {}: `{}` in {node} failed: {}",
            self.prefix,
            args.join(" "),
            describe(&out)
        );
        out
    }

    /// Runs `args` in `node` and returns its output whatever the exit status.
    pub fn try_run(&self, node: &str, args: &[&str]) -> Output {
        assert!(!args.is_empty(), "Lab::run needs a program");
        self.command(node, args[0])
            .args(&args[1..])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot start `{}` in {node}: {e}", args.join(" ")))
    }

    /// Starts `args` in `node` in the background: stdin null, stdout piped,
    /// stderr inherited (shows in the test's output). When the lab drops it
    /// gets SIGTERM (SIGKILL after 2 s) before `netlab down`; it is not reaped,
    /// so `child.wait()` still works afterwards.
    pub fn spawn(&self, node: &str, args: &[&str]) -> Child {
        assert!(!args.is_empty(), "Lab::spawn needs a program");
        let mut c = self.command(node, args[0]);
        c.args(&args[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        self.spawn_command(c)
    }

    /// Starts a command made with [`Lab::command`] (stdio as you set it); it
    /// is killed when the lab drops.
    pub fn spawn_command(&self, mut cmd: Command) -> Child {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
        self.children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child.id());
        child
    }

    /// Replaces the shaping of `node` (`tools/netlab shape`): for `srv`,
    /// `--rate` is tbf on its lc0; for `cN`, options apply to its bridge port
    /// (server → client). No options clears the shaping.
    pub fn shape(&self, node: &str, opts: &[&str]) {
        self.check_node(node);
        let mut args = vec!["shape", &self.prefix, node];
        args.extend_from_slice(opts);
        let out = netlab(&args);
        assert!(
            out.status.success(),
            "netlab {} failed: {}",
            args.join(" "),
            describe(&out)
        );
    }

    /// Packets and bytes the bridge has sent to `node` (its bridge port's tx
    /// counters): what reached that host's link, independent of sockets.
    pub fn port_tx(&self, node: &str) -> (u64, u64) {
        self.port_counters(node, "TX:")
    }

    /// Packets and bytes the bridge has received from `node` (its bridge
    /// port's rx counters): everything that host sent onto its link, e.g. the
    /// server's whole egress for `port_rx("srv")`.
    pub fn port_rx(&self, node: &str) -> (u64, u64) {
        self.port_counters(node, "RX:")
    }

    fn port_counters(&self, node: &str, which: &str) -> (u64, u64) {
        assert!(node != "br", "port counters take a host node");
        let out = self.run("br", &["ip", "-s", "-o", "link", "show", "dev", node]);
        // `ip -o -s link`: "... \    RX: bytes packets ...\    <bytes> <packets> ...\    TX: ..."
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let fields: Vec<&str> = text.split('\\').map(str::trim).collect();
        let i = fields
            .iter()
            .position(|f| f.starts_with(which))
            .unwrap_or_else(|| panic!("no {which} counters in: {text}"));
        let nums: Vec<u64> = fields[i + 1]
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect();
        (nums[1], nums[0])
    }

    /// Tears the lab down now (same as dropping it).
    pub fn down(self) {}

    /// Is `pid` our child and still running? Uses `waitid(WNOWAIT)`, which
    /// does not reap: the test can still `wait()` on its `Child` afterwards.
    /// False for exited children and for pids that are not (or no longer) ours.
    fn child_running(pid: libc::pid_t) -> bool {
        // SAFETY: siginfo_t is plain data; waitid only writes into it.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let r = libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            );
            r == 0 && info.si_pid() == 0
        }
    }

    /// SIGTERM what we spawned, SIGKILL after 2 s; waits for them to exit
    /// (without reaping them).
    fn kill_children(&self) {
        let pids: Vec<u32> =
            std::mem::take(&mut *self.children.lock().unwrap_or_else(|e| e.into_inner()));
        // only pids that are still our running children: never an unrelated
        // process that reused the pid
        let mut live: Vec<libc::pid_t> = pids
            .into_iter()
            .map(|p| p as libc::pid_t)
            .filter(|&p| Self::child_running(p))
            .collect();
        for &pid in &live {
            // SAFETY: plain syscall on our own child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let mut deadline = Instant::now() + Duration::from_secs(2);
        let mut killed = false;
        while !live.is_empty() {
            std::thread::sleep(Duration::from_millis(10));
            live.retain(|&pid| Self::child_running(pid));
            if live.is_empty() || Instant::now() < deadline {
                continue;
            }
            if killed {
                eprintln!("lab {}: children {live:?} do not die", self.prefix);
                break;
            }
            for &pid in &live {
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            killed = true;
            deadline = Instant::now() + Duration::from_secs(2);
        }
    }
}

/// Removes what libfaketime (tests/faults.rs) left of processes that are gone: a shared
/// memory file and a semaphore in /dev/shm per process it was preloaded in, named by its
/// pid (a mount's daemon among them). Debian's 0.9.10 cannot be told not to make them.
fn remove_faketime_leftovers() {
    let Ok(entries) = std::fs::read_dir("/dev/shm") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let pid = name
            .strip_prefix("faketime_shm_")
            .or_else(|| name.strip_prefix("sem.faketime_sem_"));
        // Gone: no such process, or a zombie (a mount's daemon is reaped by init, later).
        let gone = |p: &str| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).map_or(true, |st| {
                st.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
        };
        if pid.is_some_and(gone) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Never panic here: Drop also runs while a failed test unwinds.
        self.kill_children();
        remove_faketime_leftovers();
        match Command::new(netlab_path())
            .args(["down", &self.prefix])
            .stdin(Stdio::null())
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "lab {}: netlab down failed: {}",
                self.prefix,
                describe(&out)
            ),
            Err(e) => eprintln!("lab {}: cannot run netlab down: {e}", self.prefix),
        }
    }
}
