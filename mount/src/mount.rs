//! Mounting and unmounting: [`mount`], [`MountHandle`], [`unmount`].
//!
//! The mount uses fuser's pure-Rust path: root calls mount(2) itself, a user goes through
//! fusermount3 (from the fuse3 package). Never `AutoUnmount`, which needs fusermount even for
//! root. The session runs on fuser's background thread; the handle unmounts it.
//!
//! Before mounting, a mountpoint left dead by a killed daemon (stat says "Transport endpoint is
//! not connected") is detached. Errors name the mountpoint and what to do.
//!
//! Invariants: a [`MountHandle`] unmounts on drop (lazily if the mount is busy); the
//! "ended" signal fires exactly when the session thread lets go of the filesystem, whoever
//! unmounted it.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use fuser::{BackgroundSession, Config, MountOption, Notifier, SessionACL};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::error::MountError;
use crate::fuse::FuseFs;
use crate::source::Source;

/// How to mount.
#[derive(Clone, Debug)]
pub struct MountConfig {
    /// Report uid/gid 0 for every node, as published (the source has no owners); otherwise
    /// everything belongs to the mounting user.
    pub keep_ownership: bool,
    /// How long the kernel may cache entries and attributes (contents are immutable per
    /// generation; a new generation invalidates through the notifier).
    pub attr_ttl: Duration,
    /// The first readahead window a sequential reader gets, in bytes.
    pub min_readahead: u64,
    /// The widest readahead window a sequential reader grows to, in bytes.
    pub max_readahead: u64,
    /// The kernel's own readahead for the mount (its bdi `read_ahead_kb`), in bytes; above
    /// 128 KiB it lets the kernel send read requests of up to 1 MiB. 0 leaves the default.
    /// Only root may set it; a user mount keeps the default.
    pub kernel_readahead: u64,
    /// The source name shown in /proc/mounts (the channel).
    pub fs_name: String,
    /// Let users other than the mounting one see the mount (`allow_other`; a user mount needs
    /// `user_allow_other` in /etc/fuse.conf).
    pub allow_other: bool,
    /// Threads reading kernel requests (replies that wait on the network come from tokio
    /// tasks whatever this is).
    pub threads: usize,
}

impl Default for MountConfig {
    fn default() -> Self {
        MountConfig {
            keep_ownership: false,
            attr_ttl: Duration::from_secs(3600),
            min_readahead: 128 * 1024,
            max_readahead: 8 * 1024 * 1024,
            kernel_readahead: 1024 * 1024,
            fs_name: "lcfs".to_string(),
            allow_other: false,
            threads: 1,
        }
    }
}

/// Fires when the session ends; wait for it from threads or from async code.
#[derive(Debug)]
pub(crate) struct Ended {
    done: Mutex<bool>,
    cond: Condvar,
    tx: watch::Sender<bool>,
}

impl Ended {
    fn new() -> Ended {
        Ended {
            done: Mutex::new(false),
            cond: Condvar::new(),
            tx: watch::Sender::new(false),
        }
    }

    pub(crate) fn set(&self) {
        *self.done.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cond.notify_all();
        self.tx.send_replace(true);
    }

    fn is_set(&self) -> bool {
        *self.done.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait(&self) {
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        while !*done {
            done = self.cond.wait(done).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// What the filesystem holds, for diagnostics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MountStats {
    /// Inodes the kernel holds lookups on, the root included.
    pub inodes: usize,
    /// Open files.
    pub open_files: usize,
}

/// The filesystem's counters, whatever its source type.
pub(crate) trait Census: Send + Sync {
    fn stats(&self) -> MountStats;
}

/// A mounted filesystem. Dropping it unmounts.
pub struct MountHandle {
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
    notifier: Notifier,
    ended: Arc<Ended>,
    census: Arc<dyn Census>,
}

impl std::fmt::Debug for MountHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MountHandle")
            .field("mountpoint", &self.mountpoint)
            .field("ended", &self.is_ended())
            .finish()
    }
}

impl MountHandle {
    /// Where it is mounted (canonical).
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Sends invalidations to the kernel (entries, inode attributes and page cache).
    pub fn notifier(&self) -> Notifier {
        self.notifier.clone()
    }

    /// What the filesystem holds now.
    pub fn stats(&self) -> MountStats {
        self.census.stats()
    }

    /// Whether the session has ended (unmounted by this handle or from outside, e.g. `umount`).
    pub fn is_ended(&self) -> bool {
        self.ended.is_set()
    }

    /// Blocks until the session ends.
    pub fn wait(&self) {
        self.ended.wait();
    }

    /// Resolves when the session ends.
    pub async fn ended(&self) {
        let mut rx = self.ended.tx.subscribe();
        let _ = rx.wait_for(|done| *done).await;
    }

    /// Unmounts and waits for the session to end. If the mount is busy it is detached lazily
    /// instead: the mountpoint is free at once, and programs holding files in it keep reading
    /// them until they close them or this process exits.
    pub fn unmount(mut self) -> Result<(), MountError> {
        self.finish()
    }

    fn finish(&mut self) -> Result<(), MountError> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        if !self.ended.is_set() {
            match unmount(&self.mountpoint) {
                Ok(()) | Err(MountError::NotMounted(_)) => {}
                Err(MountError::Busy(_)) => {
                    warn!(mountpoint = %self.mountpoint.display(), "busy: detaching lazily");
                    detach(&self.mountpoint)?;
                    // The session serves the remaining users; do not wait for them.
                    std::mem::forget(session);
                    return Ok(());
                }
                Err(e) => {
                    self.session = Some(session);
                    return Err(e);
                }
            }
        }
        session.join().map_err(|source| MountError::Io {
            path: self.mountpoint.clone(),
            source,
        })?;
        info!(mountpoint = %self.mountpoint.display(), "unmounted");
        Ok(())
    }
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            warn!(error = %e, "unmount failed, detaching lazily");
            let _ = detach(&self.mountpoint);
            if let Some(session) = self.session.take() {
                std::mem::forget(session);
            }
        }
    }
}

/// Mounts `source` read-only on `mountpoint`, serving it from a background thread; replies
/// that wait on the source are sent from tasks on `runtime`.
pub fn mount<S: Source>(
    source: Arc<S>,
    mountpoint: &Path,
    config: MountConfig,
    runtime: tokio::runtime::Handle,
) -> Result<MountHandle, MountError> {
    let path = prepare(mountpoint)?;
    let ended = Arc::new(Ended::new());
    let fs = FuseFs::new(source, &config, runtime, ended.clone());
    let census = fs.census();
    let session =
        fuser::spawn_mount(fs, &path, &fuser_config(&config)).map_err(|e| mount_error(&path, e))?;
    info!(mountpoint = %path.display(), fs_name = %config.fs_name, "mounted");
    if config.kernel_readahead > 0 {
        set_kernel_readahead(&path, config.kernel_readahead);
    }
    let notifier = session.notifier();
    Ok(MountHandle {
        session: Some(session),
        mountpoint: path,
        notifier,
        ended,
        census,
    })
}

fn fuser_config(config: &MountConfig) -> Config {
    let mut c = Config::default();
    c.mount_options = vec![
        MountOption::RO,
        MountOption::FSName(config.fs_name.clone()),
        // fuser passes `Subtype` only to fusermount3; as a kernel option it works both ways.
        MountOption::CUSTOM("subtype=lcfs".to_string()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    c.acl = if config.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    c.n_threads = Some(config.threads.max(1));
    c.clone_fd = config.threads > 1;
    c
}

/// Checks the mountpoint (detaching a dead mount there first); returns its canonical path.
fn prepare(mountpoint: &Path) -> Result<PathBuf, MountError> {
    detach_if_dead(mountpoint)?;
    let meta = fs::metadata(mountpoint).map_err(|e| MountError::from_io(mountpoint.into(), e))?;
    if !meta.is_dir() {
        return Err(MountError::NotADirectory(mountpoint.into()));
    }
    let path = mountpoint
        .canonicalize()
        .map_err(|e| MountError::from_io(mountpoint.into(), e))?;
    if let Some(fstype) = fuse_mounted_at(&path) {
        return Err(MountError::AlreadyMounted { path, fstype });
    }
    if !Path::new("/dev/fuse").exists() {
        return Err(MountError::NoFuseDevice(path));
    }
    Ok(path)
}

fn mount_error(path: &Path, e: io::Error) -> MountError {
    let path = path.to_path_buf();
    match e.kind() {
        io::ErrorKind::PermissionDenied => MountError::PermissionDenied {
            path,
            detail: e.to_string(),
        },
        // Past the /dev/fuse check, a missing program is fusermount3.
        io::ErrorKind::NotFound if !is_root() => MountError::NoFusermount(path),
        _ => MountError::Io { path, source: e },
    }
}

/// Detaches `path` if it is a dead FUSE mount ("Transport endpoint is not connected").
fn detach_if_dead(path: &Path) -> Result<(), MountError> {
    match fs::metadata(path) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            warn!(mountpoint = %path.display(), "detaching a dead mount (its daemon was killed)");
            detach(path)
        }
        _ => Ok(()),
    }
}

/// The type of the FUSE filesystem mounted at canonical `path`, if there is one.
fn fuse_mounted_at(path: &Path) -> Option<String> {
    let mountinfo = fs::read("/proc/self/mountinfo").ok()?;
    let mut found = None;
    for line in mountinfo.split(|&b| b == b'\n') {
        let text = String::from_utf8_lossy(line);
        let Some((fields, after)) = text.split_once(" - ") else {
            continue;
        };
        let point = fields.split(' ').nth(4).unwrap_or_default();
        let fstype = after.split(' ').next().unwrap_or_default();
        if unescape(point) == path.as_os_str().as_bytes() && fstype.starts_with("fuse") {
            // The last mount on top is the one visible.
            found = Some(fstype.to_string());
        }
    }
    found
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .and_then(|d| std::str::from_utf8(d).ok());
        match (bytes[i], octal.and_then(|d| u8::from_str_radix(d, 8).ok())) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// Raises the kernel readahead of the mount at `path` (best effort: needs root).
fn set_kernel_readahead(path: &Path, bytes: u64) {
    let Ok(meta) = fs::metadata(path) else { return };
    let dev = meta.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let knob = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    match fs::write(&knob, format!("{}\n", bytes.div_ceil(1024))) {
        Ok(()) => debug!(knob, bytes, "kernel readahead set"),
        Err(e) => debug!(knob, error = %e, "kernel readahead left at its default"),
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// Unmounts the lcfs mount at `path` (`lcfs umount`): umount(2) as root, `fusermount3 -u` as a
/// user. Fails with [`MountError::Busy`] while programs use it.
pub fn unmount(path: &Path) -> Result<(), MountError> {
    if is_root() {
        umount2(path, 0)
    } else {
        fusermount(path, false)
    }
}

/// Detaches the mount at `path` now; it goes away when its last user leaves.
fn detach(path: &Path) -> Result<(), MountError> {
    if is_root() {
        umount2(path, libc::MNT_DETACH)
    } else {
        fusermount(path, true)
    }
}

fn umount2(path: &Path, flags: libc::c_int) -> Result<(), MountError> {
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|e| MountError::Io {
        path: path.into(),
        source: io::Error::new(io::ErrorKind::InvalidInput, e),
    })?;
    // SAFETY: c_path is a valid NUL-terminated string that outlives the call.
    if unsafe { libc::umount2(c_path.as_ptr(), flags) } == 0 {
        Ok(())
    } else {
        Err(MountError::from_io(path.into(), io::Error::last_os_error()))
    }
}

fn fusermount(path: &Path, lazy: bool) -> Result<(), MountError> {
    let mut cmd = Command::new("fusermount3");
    cmd.arg(if lazy { "-uz" } else { "-u" }).arg("--").arg(path);
    let out = match cmd.output() {
        Ok(out) => out,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(MountError::NoFusermount(path.into()))
        }
        Err(e) => {
            return Err(MountError::Io {
                path: path.into(),
                source: e,
            })
        }
    };
    if out.status.success() {
        return Ok(());
    }
    Err(fusermount_error(
        path,
        &String::from_utf8_lossy(&out.stderr),
    ))
}

/// Classifies what fusermount3 said on failure.
fn fusermount_error(path: &Path, stderr: &str) -> MountError {
    let path = path.to_path_buf();
    let said = stderr.trim().to_string();
    if said.contains("not found in") || said.contains("not mounted") {
        MountError::NotMounted(path)
    } else if said.contains("busy") {
        MountError::Busy(path)
    } else if said.contains("not permitted") || said.contains("ermission denied") {
        MountError::PermissionDenied { path, detail: said }
    } else {
        MountError::Io {
            path,
            source: io::Error::other(said),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/mnt/a\040b"), b"/mnt/a b");
        assert_eq!(unescape(r"/x\134y"), b"/x\\y");
        assert_eq!(unescape(r"/trailing\04"), b"/trailing\\04");
    }

    #[test]
    fn fusermount_messages_are_classified() {
        let p = Path::new("/m");
        let e = |s| fusermount_error(p, s);
        assert!(matches!(
            e("fusermount3: entry for /m not found in /etc/mtab"),
            MountError::NotMounted(_)
        ));
        assert!(matches!(
            e("fusermount3: failed to unmount /m: Device or resource busy"),
            MountError::Busy(_)
        ));
        assert!(matches!(
            e("fusermount3: mount failed: Operation not permitted"),
            MountError::PermissionDenied { .. }
        ));
        assert!(matches!(e("something else"), MountError::Io { .. }));
    }

    #[test]
    fn missing_and_non_directory_mountpoints_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        assert!(matches!(prepare(&missing), Err(MountError::NotFound(_))));
        let file = dir.path().join("f");
        fs::write(&file, b"x").unwrap();
        let err = prepare(&file).unwrap_err();
        assert!(matches!(err, MountError::NotADirectory(_)), "{err}");
        assert!(err.to_string().contains(&*file.to_string_lossy()));
    }

    #[test]
    fn fuser_gets_a_read_only_lcfs_mount() {
        let c = fuser_config(&MountConfig {
            allow_other: true,
            ..MountConfig::default()
        });
        assert!(c.mount_options.contains(&MountOption::RO));
        assert!(c
            .mount_options
            .contains(&MountOption::CUSTOM("subtype=lcfs".into())));
        assert!(!c.mount_options.contains(&MountOption::AutoUnmount));
        assert_eq!(c.acl, SessionACL::All);
    }
}
