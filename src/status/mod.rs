//! What each running lcfs process reports about itself, for `lcfs status` and for the
//! Prometheus endpoint (`--metrics`).
//!
//! Every `serve`, `mount`, `copy` and `prefetch` runs a [`Reporter`]: once a second it asks
//! the command for a [`ProcessStatus`], adds the rates and the server's online state, and
//! writes it to `DIR/PID.json` (write to a temp file, then rename: a reader never sees half
//! a file), where DIR is [`status_dir`]. The file goes when the process ends; `lcfs status`
//! ignores (and, when it may, removes) the files of processes that are gone, so a crash
//! leaves nothing that shows as running. No socket, no request: a status read can never
//! block or slow a mount.
//!
//! Invariants: a status file only ever holds what its process wrote (the directory is the
//! caller's own: root's `/run/lcfs`, or `$XDG_RUNTIME_DIR/lcfs`); numbers are counters or
//! gauges as of `updated`; a reader treats every field as untrusted input (it is parsed, and
//! a file that does not parse is skipped).

pub mod metrics;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use metrics::{Histogram, HistogramSnapshot};

/// How often a process rewrites its status file.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// A receiver that has heard nothing from the server for this long shows it as offline.
/// The server repeats its root record every 25 ms to a receiver that follows it (a mount,
/// `copy --watch`), so this is some 120 missed records, or a server gone.
pub const OFFLINE_AFTER: Duration = Duration::from_secs(3);

/// One process, as it last described itself.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ProcessStatus {
    pub pid: u32,
    /// `serve`, `mount`, `copy` or `prefetch`.
    pub command: String,
    pub channel: String,
    pub iface: String,
    /// The mountpoint, DEST, or the published path.
    pub target: String,
    /// Unix seconds.
    pub started: u64,
    /// Unix seconds of this report.
    pub updated: u64,
    /// Where its Prometheus metrics are served, if anywhere.
    pub metrics: Option<String>,
    pub receiver: Option<ReceiverStatus>,
    pub server: Option<ServerStatus>,
}

/// A mount, copy or prefetch.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ReceiverStatus {
    pub generation: u64,
    /// Heard from the server within [`OFFLINE_AFTER`].
    pub server_online: bool,
    /// Unix seconds since when `server_online` has held.
    pub server_since: u64,
    pub bytes_fetched: u64,
    pub objects_fetched: u64,
    /// Bytes of objects read from the cache instead.
    pub bytes_from_cache: u64,
    pub cache_hits: u64,
    /// Bytes fetched per second over the last interval.
    pub fetch_rate: f64,
    /// Datagrams received on the channel's port.
    pub packets: u64,
    /// Datagrams dropped: malformed, misaddressed, or failing their seal.
    pub dropped_packets: u64,
    /// Objects being fetched now.
    pub in_flight: u64,
    pub cache: CacheStatus,
    /// Network fetches, by how long they took.
    pub latency: HistogramSnapshot,
}

/// The receiver's cache, as its process sees it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct CacheStatus {
    pub dir: String,
    pub objects: u64,
    pub bytes: u64,
    pub pinned_bytes: u64,
    pub quota: Option<u64>,
}

/// A serve. Fields missing from an older process's file read as zero.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ServerStatus {
    pub generation: u64,
    pub root: String,
    pub files: u64,
    pub bytes: u64,
    /// Distinct hosts listening to any of the channel's groups (MLD).
    pub listeners: u64,
    /// Groups some listener wants.
    pub wanted_groups: u64,
    /// Object groups with listeners that the sender follows (the root group not counted).
    pub active_groups: u64,
    pub packets_sent: u64,
    /// Bytes on the wire (Ethernet, IPv6 and UDP headers included).
    pub bytes_sent: u64,
    /// Wire bytes per second over the last interval.
    pub send_rate: f64,
    /// The configured limit, bits per second.
    pub rate_limit: u64,
    pub mld_reports: u64,
    pub mld_dropped: u64,
    /// Receivers that say they fetch in bulk (`crate::wire::channel::Report::Bulk`).
    pub bulk_receivers: u64,
    /// Receivers that report their loss, and the mean they report (a share).
    pub loss_reporters: u64,
    pub reported_loss: f64,
    /// How long a block's first round now waits for the receivers fetching in bulk, at most.
    pub gather_wait_ms: f64,
    /// Loss comes in bursts now, so blocks' first rounds go in turns; and how many went so.
    pub bursty: bool,
    pub first_rounds_in_turns: u64,
    /// Blocks' rounds for receivers that joined after the last full round began (`serve::sched`).
    pub late_joiner_rounds: u64,
}

/// Produces a process's status on demand (called from the reporter's thread).
pub type StatusFn = Arc<dyn Fn() -> ProcessStatus + Send + Sync>;

/// The directory where processes of this user publish their status: `/run/lcfs` for root,
/// else `$XDG_RUNTIME_DIR/lcfs`, else `/tmp/lcfs-UID` (created private).
pub fn status_dir() -> PathBuf {
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/run/lcfs");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("lcfs"),
        None => PathBuf::from(format!("/tmp/lcfs-{}", rustix::process::geteuid().as_raw())),
    }
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    unix_ms_now() / 1000
}

/// Unix milliseconds now.
pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Whether the server counts as online, heard last at `last_heard_ms` (0: never).
pub fn online(last_heard_ms: u64, now_ms: u64) -> bool {
    last_heard_ms != 0 && now_ms.saturating_sub(last_heard_ms) < OFFLINE_AFTER.as_millis() as u64
}

/// Serves `status` as metrics on `metrics` if given, and publishes it (naming that
/// address) in the status directory while the returned reporter lives.
pub fn publish(
    status: StatusFn,
    metrics: Option<std::net::SocketAddr>,
) -> anyhow::Result<Reporter> {
    let bound = match metrics {
        Some(addr) => Some(metrics::serve(addr, status.clone())?.to_string()),
        None => None,
    };
    Ok(Reporter::start(Arc::new(move || ProcessStatus {
        metrics: bound.clone(),
        ..status()
    })))
}

/// Publishes a process's status while it lives; dropping it removes the file.
pub struct Reporter {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    path: PathBuf,
}

impl Reporter {
    /// Starts reporting `status` into [`status_dir`]. Cannot fail: a process that cannot
    /// publish its status says so once in its log and runs on.
    pub fn start(status: StatusFn) -> Reporter {
        Reporter::start_in(&status_dir(), status)
    }

    pub fn start_in(dir: &Path, status: StatusFn) -> Reporter {
        let stop = Arc::new(AtomicBool::new(false));
        let path = dir.join(format!("{}.json", std::process::id()));
        let writable = prepare_dir(dir);
        if let Err(e) = &writable {
            tracing::warn!(
                "cannot publish this process's status in {}: {e}; `lcfs status` will not show it",
                dir.display()
            );
        }
        let thread = writable.ok().and_then(|()| {
            let (stop, path) = (stop.clone(), path.clone());
            std::thread::Builder::new()
                .name("lcfs-status".into())
                .spawn(move || report_loop(&status, &path, &stop))
                .ok()
        });
        Reporter { stop, thread, path }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Creates the status directory if needed; refuses one that is not a directory of ours.
fn prepare_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let private = !rustix::process::geteuid().is_root();
    let mode = if private { 0o700 } else { 0o755 };
    match std::fs::DirBuilder::new().mode(mode).create(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let meta = std::fs::symlink_metadata(dir)?;
    let euid = rustix::process::geteuid().as_raw();
    if !meta.is_dir() || meta.uid() != euid {
        return Err(std::io::Error::other(format!(
            "it is not a directory owned by uid {euid}; remove it"
        )));
    }
    Ok(())
}

/// Rewrites the status file every [`INTERVAL`] until `stop`.
fn report_loop(status: &StatusFn, path: &Path, stop: &AtomicBool) {
    let mut rates = Rates::default();
    let mut warned = false;
    while !stop.load(Ordering::Relaxed) {
        let s = rates.apply(status(), Instant::now());
        if let Err(e) = write_status(path, &s) {
            if !warned {
                tracing::warn!("cannot write the status file {}: {e}", path.display());
                warned = true;
            }
        }
        std::thread::park_timeout(INTERVAL);
    }
}

fn write_status(path: &Path, s: &ProcessStatus) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(s)?)?;
    std::fs::rename(&tmp, path)
}

/// Turns counters into rates, and tracks since when the server has been online or not.
#[derive(Default)]
pub struct Rates {
    last: Option<(Instant, u64, u64)>,
    online: Option<(bool, u64)>,
}

impl Rates {
    pub fn apply(&mut self, mut s: ProcessStatus, now: Instant) -> ProcessStatus {
        let fetched = s.receiver.as_ref().map_or(0, |r| r.bytes_fetched);
        let sent = s.server.as_ref().map_or(0, |r| r.bytes_sent);
        if let Some((then, f0, s0)) = self.last {
            let secs = now.saturating_duration_since(then).as_secs_f64().max(1e-3);
            if let Some(r) = &mut s.receiver {
                r.fetch_rate = fetched.saturating_sub(f0) as f64 / secs;
            }
            if let Some(v) = &mut s.server {
                v.send_rate = sent.saturating_sub(s0) as f64 / secs;
            }
        }
        self.last = Some((now, fetched, sent));
        if let Some(r) = &mut s.receiver {
            let since = match self.online {
                Some((was, since)) if was == r.server_online => since,
                Some(_) => s.updated,
                None => s.started,
            };
            self.online = Some((r.server_online, since));
            r.server_since = since;
        }
        s
    }
}

/// The live processes' statuses in `dirs`, oldest first. Files of processes that are gone
/// are removed when this user may; files that do not parse are skipped.
pub fn read_all(dirs: &[PathBuf]) -> Vec<ProcessStatus> {
    let mut out = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            let Some(pid) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
                .and_then(|p| p.parse::<i32>().ok())
            else {
                continue;
            };
            if !alive(pid) {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            // A file left by a killed lcfs whose pid now belongs to another program.
            if !is_lcfs(pid) {
                continue;
            }
            let parsed = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<ProcessStatus>(&b).ok());
            if let Some(s) = parsed.filter(|s| s.pid == pid as u32) {
                out.push(s);
            }
        }
    }
    out.sort_by_key(|s| (s.started, s.pid));
    out
}

/// Whether process `pid` exists.
fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Whether process `pid` runs lcfs (its command name, as the kernel keeps it, starts so);
/// true when that cannot be read.
fn is_lcfs(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).map_or(true, |c| c.starts_with("lcfs"))
}

/// The directories `lcfs status` reads: this user's, and for root also every user's.
pub fn dirs_to_read() -> Vec<PathBuf> {
    let mut dirs = vec![status_dir()];
    if rustix::process::geteuid().is_root() {
        if let Ok(users) = std::fs::read_dir("/run/user") {
            dirs.extend(users.flatten().map(|u| u.path().join("lcfs")));
        }
        if let Ok(tmp) = std::fs::read_dir("/tmp") {
            dirs.extend(tmp.flatten().map(|e| e.path()).filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("lcfs-") && n[5..].parse::<u32>().is_ok())
            }));
        }
    }
    dirs
}

/// A counter of when the server was last heard, shared by a fetch engine and its reporter.
#[derive(Debug, Default)]
pub struct LastHeard(AtomicU64);

impl LastHeard {
    pub fn now(&self) {
        self.0.store(unix_ms_now(), Ordering::Relaxed);
    }

    pub fn ms(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests;
