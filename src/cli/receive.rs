//! What every receiving command does first: the channel's key, and opening its tree.

use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

use anyhow::{bail, Context};

use super::args::{default_cache_dir, ChannelSpec, KeyArgs, RecvArgs};
use crate::channel::{Channel, MasterKey};
use crate::fetch::{FetchConfig, Fetcher, RootPolicy, Tree};

/// The descriptor on which a mount daemon child reads the 32-byte key its parent derived.
pub(crate) const KEY_FD: &str = "LCFS_KEY_FD";

pub(crate) fn master_key(args: &KeyArgs, channel: &str) -> anyhow::Result<Option<MasterKey>> {
    if let Some(path) = &args.keyfile {
        return Ok(Some(crate::keys::from_keyfile(path)?));
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
    Ok(Some(crate::keys::from_password(&password, channel)?))
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
pub(crate) fn inherited_key() -> anyhow::Result<Option<crate::channel::MasterKey>> {
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
    Ok(Some(crate::channel::MasterKey::from_bytes(*key)))
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
    let key = master_key(&args.key, &spec.name)?;
    let channel = Channel::new(&spec.name, key.as_ref());
    let iface = args.net.iface()?;
    let dir = args.cache.clone().unwrap_or_else(default_cache_dir);
    let mut cache_config = lcfs_cache::CacheConfig::new(dir);
    cache_config.quota = args.cache_size;
    let cache = lcfs_cache::Cache::open(cache_config)?;
    let config = FetchConfig {
        timeout: Duration::from_secs(args.timeout.max(1)),
        port: args.net.port,
        ..FetchConfig::default()
    };
    let fetcher = Fetcher::start(channel, iface, cache, config)?;
    let publisher = match &args.publisher {
        Some(k) => Some(crate::keys::publisher::parse_public_key(k)?),
        None => None,
    };
    let policy = RootPolicy {
        pinned: spec.pinned,
        publisher,
        allow_rollback: args.allow_rollback,
        allow_new_publisher: args.allow_new_publisher,
        max_age: args.max_age,
    };
    let tree = Tree::open(fetcher, &policy, offline_ok).await?;
    Ok(Receiver { tree, policy })
}
