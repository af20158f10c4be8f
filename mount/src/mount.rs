//! Mounting: [`mount`], [`MountConfig`], [`MountHandle`].
//!
//! Root mounts through fuser's pure-Rust path (mount(2) itself); a user through fusermount3
//! (from the fuse3 package, see `fusermount.rs`). Never `AutoUnmount`, which needs fusermount
//! even for root. The session runs on fuser's background thread; the handle unmounts it.
//! Before mounting, the mountpoint is checked and a dead mount there detached
//! (`mountpoint.rs`).
//!
//! Invariants: a [`MountHandle`] unmounts on drop (lazily if the mount is busy); the
//! "ended" signal fires exactly when the session thread lets go of the filesystem, whoever
//! unmounted it; a task follows the source's new versions until then (`follow.rs`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{BackgroundSession, Config, MountOption, Notifier, Session, SessionACL};
use tracing::{info, warn};

use crate::error::MountError;
use crate::fuse::FuseFs;
use crate::fusermount;
use crate::mountpoint::{detach, is_root, prepare, set_kernel_readahead, unmount};
use crate::session::{Census, Ended};
use crate::source::Source;

pub use crate::session::{MountConfig, MountStats};

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
        self.ended.wait_async().await;
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
/// that wait on the source are sent from tasks on `runtime`, which must keep running.
pub fn mount<S: Source>(
    source: Arc<S>,
    mountpoint: &Path,
    config: MountConfig,
    runtime: tokio::runtime::Handle,
) -> Result<MountHandle, MountError> {
    let path = prepare(mountpoint)?;
    let ended = Arc::new(Ended::new());
    let fs = FuseFs::new(source, &config, runtime.clone(), ended.clone());
    let census = fs.census();
    let core = fs.core();
    let session = start(fs, &path, &config)?;
    info!(mountpoint = %path.display(), fs_name = %config.fs_name, "mounted");
    if config.kernel_readahead > 0 {
        set_kernel_readahead(&path, config.kernel_readahead);
    }
    let notifier = session.notifier();
    runtime.spawn(crate::follow::run(core, notifier.clone(), ended.clone()));
    Ok(MountHandle {
        session: Some(session),
        mountpoint: path,
        notifier,
        ended,
        census,
    })
}

/// Mounts and starts the session: mount(2) through fuser as root, fusermount3 as a user.
fn start<S: Source>(
    fs: FuseFs<S>,
    path: &Path,
    config: &MountConfig,
) -> Result<BackgroundSession, MountError> {
    let io_error = |source| MountError::Io {
        path: path.into(),
        source,
    };
    let fuser_config = fuser_config(config);
    if is_root() {
        return fuser::spawn_mount(fs, path, &fuser_config).map_err(io_error);
    }
    let fd = fusermount::mount(path, &fusermount_options(config))?;
    Session::from_fd(fs, fd, fuser_config.acl, fuser_config)
        .and_then(Session::spawn)
        .map_err(io_error)
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

/// The same options, as fusermount3 takes them.
fn fusermount_options(config: &MountConfig) -> String {
    let fs_name: String = config
        .fs_name
        .chars()
        .map(|c| if c == ',' { '_' } else { c })
        .collect();
    let mut options = format!("ro,nosuid,nodev,default_permissions,subtype=lcfs,fsname={fs_name}");
    if config.allow_other {
        options.push_str(",allow_other");
    }
    options
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuser_gets_a_read_only_lcfs_mount() {
        let config = MountConfig {
            allow_other: true,
            ..MountConfig::default()
        };
        let c = fuser_config(&config);
        assert!(c.mount_options.contains(&MountOption::RO));
        assert!(c
            .mount_options
            .contains(&MountOption::CUSTOM("subtype=lcfs".into())));
        assert!(!c.mount_options.contains(&MountOption::AutoUnmount));
        assert_eq!(c.acl, SessionACL::All);
        assert_eq!(
            fusermount_options(&MountConfig {
                fs_name: "a,b".into(),
                ..config
            }),
            "ro,nosuid,nodev,default_permissions,subtype=lcfs,fsname=a_b,allow_other"
        );
    }
}
