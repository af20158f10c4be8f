//! Logging: `RUST_LOG`, to stderr or, for a detached mount, to a file.

use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;

/// Logging to a file, for a detached mount.
pub(crate) fn init_logging_to(path: &Path) -> anyhow::Result<()> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open the log file {}", path.display()))?;
    tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        .with_writer(Mutex::new(f))
        .with_ansi(false)
        .init();
    Ok(())
}

/// `RUST_LOG`, or lcfs's own news and every other crate's warnings. fuser warns "Unmount
/// failed: Invalid argument" when it drops a mount that `lcfs umount` (or `umount`) already
/// took away, which is every clean unmount: its mount module says only errors.
fn log_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "lcfs=info,lcfs_cache=info,lcfs_mount=info,warn,fuser::mnt=error",
        )
    })
}

/// Logging to stderr: colours only when stderr is a terminal and `NO_COLOR` is unset
/// (<https://no-color.org>), so that redirected logs carry no escape codes.
pub(crate) fn init_logging() {
    use std::io::IsTerminal;
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(colour)
        .init();
}
