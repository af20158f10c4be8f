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

fn log_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("lcfs=info,lcfs_cache=info,lcfs_mount=info,warn")
    })
}

pub(crate) fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
