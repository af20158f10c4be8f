//! What every receiving command does first: the channel's key, and opening its tree.

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};

use super::args::{default_cache_dir, ChannelSpec, KeyArgs, RecvArgs};
use crate::fetch::{FetchConfig, Fetcher, KeepMembers, RootPolicy, Tree};
use crate::wire::channel::{Channel, MasterKey};

/// The descriptor on which a mount daemon child reads the 32-byte key its parent derived.
pub(crate) const KEY_FD: &str = "LCFS_KEY_FD";

pub(crate) fn master_key(args: &KeyArgs, channel: &str) -> anyhow::Result<Option<MasterKey>> {
    if let Some(path) = &args.keyfile {
        return Ok(Some(crate::wire::keys::from_keyfile(path)?));
    }
    if !args.password {
        return Ok(None);
    }
    // A mount daemon gets the key its parent derived, through a pipe: it has no terminal to
    // ask on, and the password is not left in its environment.
    if let Some(key) = inherited_key()? {
        return Ok(Some(key));
    }
    let password = zeroize::Zeroizing::new(match std::env::var("LCFS_PASSWORD") {
        Ok(p) if !p.is_empty() => p,
        _ => rpassword_prompt(channel)?,
    });
    Ok(Some(crate::wire::keys::from_password(&password, channel)?))
}

impl RecvArgs {
    /// The channel's key, if the options name one (asking for a password if need be).
    pub(crate) fn master_key(&self, channel: &str) -> anyhow::Result<Option<MasterKey>> {
        master_key(&self.key, channel)
    }

    pub(crate) fn uses_password(&self) -> bool {
        self.key.password
    }
}

fn rpassword_prompt(channel: &str) -> anyhow::Result<String> {
    use std::io::{BufRead, IsTerminal, Write};
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        bail!("--password needs a terminal to ask on, or the password in $LCFS_PASSWORD");
    }
    eprint!("password for channel {channel:?}: ");
    std::io::stderr().flush()?;
    let echo = Echo::off();
    let mut line = String::new();
    stdin.lock().read_line(&mut line)?;
    drop(echo);
    eprintln!();
    Ok(line.trim_end_matches(['\n', '\r']).to_owned())
}

/// Turns terminal echo off while alive.
struct Echo(Option<libc::termios>);

impl Echo {
    fn off() -> Echo {
        // SAFETY: tcgetattr/tcsetattr on stdin with a zeroed termios that tcgetattr fills in.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return Echo(None);
            }
            let saved = t;
            t.c_lflag &= !libc::ECHO;
            libc::tcsetattr(0, libc::TCSANOW, &t);
            Echo(Some(saved))
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            // SAFETY: restores the settings read in `off`.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, t) };
        }
    }
}

/// The key a daemon's parent handed over (see [`spawn_daemon`]), read once.
pub(crate) fn inherited_key() -> anyhow::Result<Option<crate::wire::channel::MasterKey>> {
    use std::io::Read;
    static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let Some(fd) = std::env::var(KEY_FD)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return Ok(None);
    };
    if TAKEN.swap(true, std::sync::atomic::Ordering::SeqCst) {
        bail!("the channel key from the parent of the mount daemon was already read");
    }
    // SAFETY: the parent passed this descriptor for us alone; nothing else owns it.
    let mut f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut key = zeroize::Zeroizing::new([0u8; 32]);
    f.read_exact(&mut key[..])
        .context("reading the channel key from the parent of the mount daemon")?;
    Ok(Some(crate::wire::channel::MasterKey::from_bytes(*key)))
}

pub(crate) struct Receiver {
    pub(crate) tree: Tree,
    /// What the tree's root record was accepted under; a mount and `copy --watch` follow the
    /// publisher by it.
    pub(crate) policy: RootPolicy,
}

pub(crate) async fn open_tree(
    spec: &ChannelSpec,
    args: &RecvArgs,
    offline_ok: bool,
) -> anyhow::Result<Receiver> {
    let (fetcher, policy) = start(spec, args, KeepMembers::Always, false)?;
    let tree = Tree::open(fetcher, &policy, offline_ok).await?;
    Ok(Receiver { tree, policy })
}

/// Opened once the root record's listening window has closed on the generation `work` runs
/// on (see [`on_latest_tree`]): work that cannot be undone (writing under DEST) waits for it.
pub(crate) struct Settled(tokio::sync::watch::Receiver<bool>);

impl Settled {
    fn already() -> Settled {
        Settled(tokio::sync::watch::channel(true).1)
    }

    pub(crate) async fn wait(mut self) {
        // An error means the sender is gone: then this work is being dropped anyway.
        let _ = self.0.wait_for(|settled| *settled).await;
    }
}

/// Opens the channel's tree at the first acceptable root record (see [`Tree::open_early`])
/// and runs `work` on it at once; if the listening window then hears a newer generation of
/// the same publisher, `work` on the first is dropped (a replayed old record can come first,
/// and its objects may no longer be served) and runs again on the newer one. `work` is given
/// a [`Settled`] to wait on before it does anything that cannot be undone. Returns the
/// receiver at the generation `work` finished on. `keep` says which fetched objects the cache
/// keeps.
///
/// A newer generation heard later, while `work` runs, puts its fetches in doubt
/// ([`crate::fetch::Fetcher::handle_new_generation`]): a server that follows its tree keeps
/// sending the previous generation, and `work` finishes on it; a server restarted over a
/// changed tree does not, those fetches fail as stale within `stale_after`, and `work` runs
/// again on the newer generation. So a copy ends as one generation, old or new, and does not
/// wait out `--timeout` for objects nobody sends (issue 12's fault matrix; before, it failed
/// after 30 s saying the server might not be running).
pub(crate) async fn on_latest_tree<T, Fut>(
    spec: &ChannelSpec,
    args: &RecvArgs,
    keep: KeepMembers,
    work: impl Fn(Tree, Settled) -> Fut,
) -> anyhow::Result<(Receiver, T)>
where
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let (fetcher, policy) = start(spec, args, keep, true)?;
    let (mut tree, mut listening) = Tree::open_early(fetcher, &policy).await?;
    let (settle, settled) = tokio::sync::watch::channel(false);
    let mut run = Box::pin(work(tree.clone(), Settled(settled)));
    let heard = tokio::select! {
        r = &mut run => Err(r),
        n = listening.newer() => Ok(n),
    };
    let mut newer = match heard {
        // Finished within the window (it did not wait for it): it counts only if nothing
        // newer comes.
        Err(r) => match listening.newer().await {
            None => return Ok((Receiver { tree, policy }, r?)),
            Some(record) => Some(record),
        },
        Ok(None) => {
            let _ = settle.send(true);
            None
        }
        Ok(Some(record)) => Some(record),
    };
    loop {
        if let Some(record) = newer.take() {
            // Its fetches end with it, rather than wait for objects no longer served.
            drop(run);
            tracing::info!(
                "channel {:?}: generation {} was heard after {}; starting again on it",
                tree.fetcher().channel().name(),
                record.generation,
                tree.root_record().generation
            );
            tree.fetcher().handle_new_generation();
            tree = tree.moved_to(record);
            run = Box::pin(work(tree.clone(), Settled::already()));
        }
        let mut moved = None;
        let done = loop {
            tokio::select! {
                r = &mut run => break r,
                record = listening.later() => {
                    tree.fetcher().handle_new_generation();
                    moved = Some(record);
                }
            }
        };
        match (done, moved) {
            (Ok(done), _) => return Ok((Receiver { tree, policy }, done)),
            (Err(e), Some(record)) if is_stale(&e) => newer = Some(record),
            (Err(e), _) => return Err(e),
        }
    }
}

/// Whether `e` is a fetch of an object the server no longer sends since it moved on.
fn is_stale(e: &anyhow::Error) -> bool {
    use crate::fetch::FetchError;
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<FetchError>(),
            Some(FetchError::Stale { .. })
        ) || matches!(
            c.downcast_ref::<crate::copy::CopyError>(),
            Some(crate::copy::CopyError::Fetch(FetchError::Stale { .. }))
        )
    })
}

/// Starts the fetch engine for the channel, and says what its root records must pass.
/// `bulk`: the receiver will fetch in bulk (see [`FetchConfig::bulk`]).
fn start(
    spec: &ChannelSpec,
    args: &RecvArgs,
    keep_members: KeepMembers,
    bulk: bool,
) -> anyhow::Result<(Fetcher, RootPolicy)> {
    let key = master_key(&args.key, &spec.name)?;
    let channel = Channel::new(&spec.name, key.as_ref());
    let iface = args.net.iface()?;
    let dir = args.cache.clone().unwrap_or_else(default_cache_dir);
    let mut cache_config = lcfs_cache::CacheConfig::new(dir);
    cache_config.quota = args.cache_size;
    let cache = lcfs_cache::Cache::open(cache_config)?;
    let timeout = Duration::from_secs(args.timeout.max(1));
    let config = FetchConfig {
        timeout,
        root_wait: (!args.wait).then_some(crate::fetch::ROOT_WAIT.min(timeout)),
        port: args.net.port,
        keep_members,
        bulk,
        ..FetchConfig::default()
    };
    let fetcher = Fetcher::start(channel, iface, cache, config)?;
    let publisher = match &args.publisher {
        Some(k) => Some(crate::wire::keys::publisher::parse_public_key(k)?),
        None => None,
    };
    let policy = RootPolicy {
        pinned: spec.pinned,
        publisher,
        allow_rollback: args.allow_rollback,
        allow_new_publisher: args.allow_new_publisher,
        max_age: args.max_age,
    };
    Ok((fetcher, policy))
}

/// Publishes the status of a receiving command (see [`crate::status`]) while the returned
/// reporter lives, and serves its metrics if `--metrics` asks.
pub(crate) fn report_status(
    command: &str,
    spec: &ChannelSpec,
    args: &RecvArgs,
    target: &std::path::Path,
    fetcher: &Fetcher,
) -> anyhow::Result<crate::status::Reporter> {
    let (fetcher, quota) = (fetcher.clone(), args.cache_size);
    let started = crate::status::unix_now();
    let base = crate::status::ProcessStatus {
        pid: std::process::id(),
        command: command.to_owned(),
        channel: spec.name.clone(),
        iface: fetcher.iface().name.clone(),
        target: target.display().to_string(),
        started,
        ..Default::default()
    };
    let status: crate::status::StatusFn = Arc::new(move || {
        let mut receiver = fetcher.status();
        receiver.cache.quota = quota;
        crate::status::ProcessStatus {
            pid: std::process::id(),
            updated: crate::status::unix_now(),
            receiver: Some(receiver),
            ..base.clone()
        }
    });
    crate::status::publish(status, args.metrics)
}
