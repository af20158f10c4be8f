//! `lcfs serve`.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};

use super::args::{default_state_dir, ServeArgs};
use super::receive::master_key;

pub(crate) fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let path = args.path.clone();
    if !path.exists() {
        bail!("{} does not exist", path.display());
    }
    let channel = match args.channel {
        Some(c) => c,
        None => base_name(&path)?,
    };
    let key = master_key(&args.key, &channel)?;
    let opts = crate::serve::server::ServeOptions {
        path,
        iface: args.net.iface()?,
        port: args.net.port,
        rate_bps: args.rate,
        block_size: args.block_size,
        state_dir: Some(args.state.unwrap_or_else(default_state_dir)),
        key,
        sign_key: match &args.sign_key {
            Some(p) => Some(crate::wire::keys::publisher::read_signing_key(p)?),
            None => None,
        },
        sign_validity: args.sign_validity,
        hops: args.hops,
        query_interval: Duration::from_secs(args.query_interval.max(1)),
        channel,
        watch: (!args.no_watch).then(|| watch_config(args.debounce, args.rescan)),
        rescan_now: Arc::new(AtomicBool::new(false)),
        metrics: args.metrics,
    };
    let shutdown = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, shutdown.clone())?;
    }
    signal_hook::flag::register(signal_hook::consts::SIGHUP, opts.rescan_now.clone())?;
    crate::serve::server::run(opts, shutdown)
}

/// How `serve` follows its tree: a burst is published at most 5 s (or one debounce, if
/// longer) after its first change.
pub(crate) fn watch_config(
    debounce: Duration,
    rescan: Duration,
) -> crate::serve::watch::WatchConfig {
    crate::serve::watch::WatchConfig {
        debounce,
        max_delay: debounce.max(Duration::from_secs(5)),
        rescan: (!rescan.is_zero()).then_some(rescan),
    }
}

pub(crate) fn base_name(path: &Path) -> anyhow::Result<String> {
    let canonical = path
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", path.display()))?;
    canonical
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .ok_or_else(|| {
            anyhow!(
                "{} has no usable base name: pass --channel NAME",
                path.display()
            )
        })
}
