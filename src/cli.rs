//! The command line: argument parsing, logging, signals and exit codes. Each subcommand
//! resolves its options into the library's types and calls into the library; nothing here
//! knows about packets.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Parser, Subcommand};

use crate::channel::{Channel, MasterKey};
use crate::fetch::{FetchConfig, Fetcher, RootPolicy, Tree};
use crate::net::{resolve_iface, Iface};
use crate::object::BlockSize;

#[derive(Parser)]
#[command(
    name = "lcfs",
    version,
    about = "Hand the same files to many machines at once over IPv6 multicast",
    long_about = "lcfs publishes a directory over IPv6 multicast (`lcfs serve`) and copies or mounts it on any \
number of receivers. The server sends only while MLD shows listeners; receivers never send it a request. \
Every byte is verified against BLAKE3 hashes from the root record down.\n\nLogging: RUST_LOG=lcfs=debug"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Publish a directory (or one file) on a channel, and follow its changes.
    #[command(long_about = SERVE_ABOUT)]
    Serve(ServeArgs),
    /// Copy a channel's tree, a subtree or one file to a local path.
    ///
    /// What is written belongs to the user running the copy (copy never chowns: run as root,
    /// everything is root's), with the published permission bits and mtimes, except that
    /// setuid and setgid bits are dropped unless --keep-setuid is given. Below DEST no symlink
    /// is followed, a directory another user owns is refused, and files stay 0600 and new
    /// directories 0700 until the copy ends.
    Copy(CopyArgs),
    /// Fill the cache with a channel's tree for offline use.
    Prefetch(PrefetchArgs),
    /// Mount a channel as a read-only filesystem.
    Mount(MountArgs),
    /// Unmount an lcfs mount.
    Umount(UmountArgs),
    /// Write a new random keyfile for an encrypted channel.
    Keygen(KeygenArgs),
}

const SERVE_ABOUT: &str = "Publish a directory (or one file) on a channel, and follow its changes.

The tree is watched (inotify, plus a rescan every --rescan for file systems that do not notify) \
and a new generation is published --debounce after the last change of a burst, and at most \
max(5s, --debounce) after its first change. Only what changed is read again. SIGHUP rescans at once; \
--no-watch serves the tree as it is at start until SIGHUP.

To publish a file safely, write it under a temporary name and rename it into place: a file still \
being written after that delay is published half-written. Paths matched by .lcfsignore at the \
tree's root (gitignore syntax) are never published, nor is that file.";

#[derive(Args)]
pub(crate) struct MountArgs {
    /// NAME[@ROOTHASH]: the channel.
    pub(crate) channel: String,
    /// An empty directory to mount on.
    pub(crate) mountpoint: PathBuf,
    #[command(flatten)]
    pub(crate) recv: RecvArgs,
    /// Detach, and exit 0 once the mount answers (non-zero with the reason if it cannot).
    #[arg(long)]
    pub(crate) daemon: bool,
    /// With --daemon, append the mount's log to FILE.
    #[arg(long, value_name = "FILE")]
    pub(crate) log: Option<PathBuf>,
    /// Show files as owned by root, as published, instead of by the mounting user.
    #[arg(long)]
    pub(crate) keep_ownership: bool,
    /// Let other users see the mount (a user mount needs user_allow_other in /etc/fuse.conf).
    #[arg(long)]
    pub(crate) allow_other: bool,
}

#[derive(Args)]
struct UmountArgs {
    /// The mountpoint.
    mountpoint: PathBuf,
}

#[derive(Args)]
struct NetArgs {
    /// Network interface to use (required when several are up; never lo).
    #[arg(long, short = 'i', env = "LCFS_IFACE")]
    iface: Option<String>,
    /// UDP port of the channel.
    #[arg(long, default_value_t = crate::channel::DEFAULT_PORT)]
    port: u16,
}

#[derive(Args)]
struct KeyArgs {
    /// Encrypt (serve) or decrypt (receive) with the key in FILE (see `lcfs keygen`).
    #[arg(long, value_name = "FILE", conflicts_with = "password")]
    keyfile: Option<PathBuf>,
    /// Derive the key from a password: $LCFS_PASSWORD if set, else asked for on the terminal.
    #[arg(long)]
    password: bool,
}

#[derive(Args)]
struct ServeArgs {
    /// Directory or file to publish.
    path: PathBuf,
    /// Channel name [default: PATH's base name].
    #[arg(long, short = 'c')]
    channel: Option<String>,
    #[command(flatten)]
    net: NetArgs,
    /// Send rate in bits per second on the wire, Ethernet, IPv6 and UDP headers included
    /// (suffixes K, M, G).
    #[arg(long, default_value = "100M", value_parser = parse_rate)]
    rate: u64,
    /// Block size: a power of two from 16K to 4M.
    #[arg(long, default_value = "64K", value_parser = parse_block_size)]
    block_size: BlockSize,
    /// Where the leaf-hash cache and generation counter live [default: /var/lib/lcfs for root,
    /// else $XDG_STATE_HOME/lcfs].
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// Multicast hop limit (1 keeps traffic on the link).
    #[arg(long, default_value_t = 1)]
    hops: u32,
    /// Seconds between MLD general queries while this server is the link's querier.
    #[arg(long, default_value_t = 5)]
    query_interval: u64,
    #[command(flatten)]
    key: KeyArgs,
    /// Sign root records with the publisher key in FILE (see `lcfs keygen --sign`).
    #[arg(long, value_name = "FILE")]
    sign_key: Option<PathBuf>,
    /// How long a root record's signature stays valid (e.g. 12h, 7d). The server renews it
    /// every quarter of that, at most every hour, while it runs; receivers refuse an expired one.
    #[arg(long, value_name = "DURATION", default_value = "7d", value_parser = parse_duration, requires = "sign_key")]
    sign_validity: Duration,
    /// Do not follow the tree: serve it as it is at start; SIGHUP still rescans and publishes.
    #[arg(long)]
    no_watch: bool,
    /// Quiet time after the last change of a burst before publishing (e.g. 200ms, 2s).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration, conflicts_with = "no_watch")]
    debounce: Duration,
    /// Rescan the whole tree this often without being notified (network file systems); 0: never.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration, conflicts_with = "no_watch")]
    rescan: Duration,
}

#[derive(Args)]
pub(crate) struct RecvArgs {
    #[command(flatten)]
    net: NetArgs,
    /// Cache directory [default: /var/cache/lcfs for root, else $XDG_CACHE_HOME/lcfs].
    #[arg(long, value_name = "DIR")]
    pub(crate) cache: Option<PathBuf>,
    /// Quota on the cache's disk use (suffixes K, M, G, T); least recently used blocks go first.
    #[arg(long, value_parser = parse_size)]
    cache_size: Option<u64>,
    /// Seconds without data after which a fetch fails.
    #[arg(long, default_value_t = 30)]
    pub(crate) timeout: u64,
    #[command(flatten)]
    key: KeyArgs,
    /// Accept a root record with a lower generation than one already seen.
    #[arg(long)]
    allow_rollback: bool,
    /// Accept only root records signed by this publisher key (64 hex digits, or a .pub file).
    #[arg(long, value_name = "PUBKEY")]
    publisher: Option<String>,
    /// Accept a publisher other than the one this cache trusted first for the channel (another
    /// server address, or another signing key), and trust it from now on.
    #[arg(long)]
    allow_new_publisher: bool,
    /// Refuse signed root records signed longer ago than this (e.g. 6h, 3d): a replayed old
    /// record cannot hold a receiver on an old generation.
    #[arg(long, value_name = "DURATION", default_value = "3d", value_parser = parse_duration)]
    max_age: Duration,
}

#[derive(Args)]
struct CopyArgs {
    /// NAME[@ROOTHASH][:SUBPATH]: the channel, optionally a pinned snapshot and a path in it.
    channel: String,
    /// Where to write: a directory for a tree; a file path or a directory for one file.
    dest: PathBuf,
    /// Keep setuid and setgid bits as published. Without it they are dropped, since the copy's
    /// files belong to whoever runs it (root, as root).
    #[arg(long)]
    keep_setuid: bool,
    /// Move what DEST holds and the channel does not into DEST/.lcfs-trash/<UTC time>/
    /// (nothing is deleted outright).
    #[arg(long)]
    delete: bool,
    /// After the copy, keep following the channel: apply each new generation to DEST,
    /// fetching only changed blocks. Ctrl-C stops it; no partial file is ever left.
    #[arg(long)]
    watch: bool,
    #[command(flatten)]
    recv: RecvArgs,
}

#[derive(Args)]
struct PrefetchArgs {
    /// NAME[@ROOTHASH]: the channel.
    channel: String,
    /// Paths inside the channel to fetch [default: everything].
    subpaths: Vec<String>,
    /// Keep the fetched objects from eviction.
    #[arg(long)]
    pin: bool,
    #[command(flatten)]
    recv: RecvArgs,
}

#[derive(Args)]
struct KeygenArgs {
    /// Write the key to FILE (mode 0600) instead of standard output.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Make an Ed25519 publisher key pair instead: the secret to FILE, the public key to
    /// FILE.pub (requires --out).
    #[arg(long, requires = "out")]
    sign: bool,
}

/// `NAME[@ROOTHASH][:SUBPATH]`.
#[derive(Debug, PartialEq, Eq)]
pub struct ChannelSpec {
    pub name: String,
    pub pinned: Option<blake3::Hash>,
    pub subpath: String,
}

pub fn parse_channel_spec(s: &str) -> anyhow::Result<ChannelSpec> {
    let (head, subpath) = s.split_once(':').unwrap_or((s, ""));
    let (name, pinned) = match head.split_once('@') {
        Some((n, h)) => {
            let hash = blake3::Hash::from_hex(h)
                .map_err(|_| anyhow!("{h:?} is not a 64-digit root hash"))?;
            (n, Some(hash))
        }
        None => (head, None),
    };
    if name.is_empty() {
        bail!("the channel name is empty in {s:?}");
    }
    Ok(ChannelSpec {
        name: name.into(),
        pinned,
        subpath: subpath.into(),
    })
}

fn parse_scaled(s: &str, base: u64) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t
        .trim_end_matches("bit/s")
        .trim_end_matches("bps")
        .trim_end_matches("bit")
        .trim_end_matches('b');
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], base),
        Some('m') => (&t[..t.len() - 1], base.pow(2)),
        Some('g') => (&t[..t.len() - 1], base.pow(3)),
        Some('t') => (&t[..t.len() - 1], base.pow(4)),
        _ => (t, 1),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number with an optional K, M, G or T suffix"))?;
    if !(n.is_finite() && n > 0.0) {
        return Err(format!("{s:?} must be positive"));
    }
    Ok((n * mult as f64) as u64)
}

fn parse_rate(s: &str) -> Result<u64, String> {
    parse_scaled(s, 1000)
}

fn parse_size(s: &str) -> Result<u64, String> {
    parse_scaled(s, 1024)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration such as 90s, 6h or 3d: {e}"))
}

fn parse_block_size(s: &str) -> Result<BlockSize, String> {
    let n = parse_size(s)?;
    BlockSize::from_bytes(n)
        .map_err(|_| format!("{s:?}: the block size must be a power of two from 16K to 4M"))
}

fn home_dir(var: &str, fallback: &str, root: &str) -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from(root);
    }
    if let Some(d) = std::env::var_os(var).filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("lcfs");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    PathBuf::from(home).join(fallback).join("lcfs")
}

pub fn default_cache_dir() -> PathBuf {
    home_dir("XDG_CACHE_HOME", ".cache", "/var/cache/lcfs")
}

pub fn default_state_dir() -> PathBuf {
    home_dir("XDG_STATE_HOME", ".local/state", "/var/lib/lcfs")
}

fn master_key(args: &KeyArgs, channel: &str) -> anyhow::Result<Option<MasterKey>> {
    if let Some(path) = &args.keyfile {
        return Ok(Some(crate::keys::from_keyfile(path)?));
    }
    if !args.password {
        return Ok(None);
    }
    // A mount daemon gets the key its parent derived, through a pipe: it has no terminal to
    // ask on, and the password is not left in its environment.
    if let Some(key) = crate::mountcmd::inherited_key()? {
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

fn iface(net: &NetArgs) -> anyhow::Result<Iface> {
    Ok(resolve_iface(net.iface.as_deref())?)
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
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
        iface: iface(&args.net)?,
        port: args.net.port,
        rate_bps: args.rate,
        block_size: args.block_size,
        state_dir: Some(args.state.unwrap_or_else(default_state_dir)),
        key,
        sign_key: match &args.sign_key {
            Some(p) => Some(crate::keys::publisher::read_signing_key(p)?),
            None => None,
        },
        sign_validity: args.sign_validity,
        hops: args.hops,
        query_interval: Duration::from_secs(args.query_interval.max(1)),
        channel,
        watch: (!args.no_watch).then(|| watch_config(args.debounce, args.rescan)),
        rescan_now: Arc::new(AtomicBool::new(false)),
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
fn watch_config(debounce: Duration, rescan: Duration) -> crate::serve::watch::WatchConfig {
    crate::serve::watch::WatchConfig {
        debounce,
        max_delay: debounce.max(Duration::from_secs(5)),
        rescan: (!rescan.is_zero()).then_some(rescan),
    }
}

fn base_name(path: &Path) -> anyhow::Result<String> {
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
    let iface = iface(&args.net)?;
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

async fn copy(args: CopyArgs) -> anyhow::Result<()> {
    let spec = parse_channel_spec(&args.channel)?;
    let rx = open_tree(&spec, &args.recv, false).await?;
    let opts = crate::copy::CopyOptions {
        keep_setuid: args.keep_setuid,
        delete: args.delete,
    };
    let report = crate::copy::copy(&rx.tree, &spec.subpath, &args.dest, opts).await?;
    let mut counted = say_copied(&rx.tree, &report, &args.dest, (0, 0));
    if !args.watch {
        return Ok(());
    }
    eprintln!(
        "following channel {:?} from generation {}: each new generation is applied to {} (Ctrl-C stops)",
        spec.name,
        rx.tree.root_record().generation,
        args.dest.display()
    );
    // The same follower as a mount's: every record is checked like the first, and a move
    // is announced once its root directory is verified. Copies run one at a time, each to
    // the latest generation announced by then.
    let Some(follower) = rx.tree.follower(&rx.policy)? else {
        // A pinned snapshot never moves.
        return std::future::pending().await;
    };
    let (tx, mut moves) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(crate::fetch::follow::run(rx.tree, follower, move |e| {
        if let crate::fetch::follow::Followed::Moved(tree) = e {
            let _ = tx.send(*tree);
        }
    }));
    while let Some(mut next) = moves.recv().await {
        while let Ok(newer) = moves.try_recv() {
            next = newer;
        }
        let generation = next.root_record().generation;
        match crate::copy::copy(&next, &spec.subpath, &args.dest, opts).await {
            Ok(report) => {
                eprintln!("generation {generation}:");
                counted = say_copied(&next, &report, &args.dest, counted);
            }
            // The server may have moved on again: the next generation is tried afresh.
            Err(e) => tracing::warn!("generation {generation} not applied: {e:#}"),
        }
    }
    Ok(())
}

/// Prints what a copy did. `before` is the engine's (network, cache) byte counts when it
/// started (a watching copy reuses one engine); returns the counts now.
fn say_copied(
    tree: &Tree,
    report: &crate::copy::CopyReport,
    dest: &Path,
    before: (u64, u64),
) -> (u64, u64) {
    let stats = tree.fetcher().stats();
    let now = (
        stats.bytes_fetched.load(Ordering::Relaxed),
        stats.bytes_cached.load(Ordering::Relaxed),
    );
    let (fetched, cached) = (
        now.0.saturating_sub(before.0),
        now.1.saturating_sub(before.1),
    );
    let secs = report.elapsed.as_secs_f64().max(1e-3);
    let unchanged = match report.unchanged {
        0 => String::new(),
        n => format!(", {n} files already up to date"),
    };
    let trashed = match report.trashed {
        0 => String::new(),
        n => format!(
            ", {n} entries moved to {}",
            dest.join(crate::copy::trash::TRASH).display()
        ),
    };
    eprintln!(
        "copied {} files, {} dirs, {} symlinks ({} bytes) to {} in {:.2} s: {} bytes from the network ({:.1} MB/s), {} reused from {}, {} from the cache{unchanged}{trashed}",
        report.files,
        report.dirs,
        report.symlinks,
        report.bytes,
        dest.display(),
        secs,
        fetched,
        fetched as f64 / secs / 1e6,
        report.reused,
        dest.display(),
        cached,
    );
    now
}

async fn prefetch(args: PrefetchArgs) -> anyhow::Result<()> {
    let spec = parse_channel_spec(&args.channel)?;
    let rx = open_tree(&spec, &args.recv, false).await?;
    let mut subpaths = args.subpaths.clone();
    if !spec.subpath.is_empty() {
        subpaths.push(spec.subpath.clone());
    }
    let report = crate::prefetch::prefetch(&rx.tree, &subpaths, args.pin).await?;
    let fetched = rx
        .tree
        .fetcher()
        .stats()
        .bytes_fetched
        .load(Ordering::Relaxed);
    eprintln!(
        "cached {} objects of {} files ({} bytes, {} from the network) in {:.2} s{}",
        report.objects,
        report.files,
        report.bytes,
        fetched,
        report.elapsed.as_secs_f64(),
        if args.pin { ", pinned" } else { "" }
    );
    Ok(())
}

fn keygen(args: KeygenArgs) -> anyhow::Result<()> {
    if let (true, Some(path)) = (args.sign, &args.out) {
        let public = crate::keys::publisher::write_key_pair(path)?;
        eprintln!(
            "wrote a publisher key to {} (mode 0600; give it to `lcfs serve --sign-key`) and its public half to {}.pub",
            path.display(),
            path.display()
        );
        println!("{public}");
        return Ok(());
    }
    match args.out {
        Some(path) => {
            crate::keys::write_keyfile(&path)?;
            eprintln!(
                "wrote a new key to {} (mode 0600): share it with receivers over a secure channel",
                path.display()
            );
        }
        None => println!("{}", crate::keys::new_key_hex()),
    }
    Ok(())
}

/// Runs a receiving command, ending it cleanly (temporary files removed) on SIGINT or SIGTERM.
fn run_async<F: std::future::Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = f => r,
            _ = tokio::signal::ctrl_c() => Err(Interrupted.into()),
            _ = term.recv() => Err(Interrupted.into()),
        }
    })
}

#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
struct Interrupted;

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

/// The `lcfs` binary. Exit codes: 0 success, 1 failure, 2 usage, 130 interrupted.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // A detached mount sets up its own logging once it knows where to.
    if !matches!(&cli.command, Command::Mount(m) if m.daemon || crate::mountcmd::is_daemon_child())
    {
        init_logging();
    }
    let result = match cli.command {
        Command::Serve(a) => serve(a),
        Command::Copy(a) => run_async(copy(a)),
        Command::Prefetch(a) => run_async(prefetch(a)),
        Command::Mount(a) => crate::mountcmd::mount(a),
        Command::Umount(a) => lcfs_mount::unmount(&a.mountpoint)
            .with_context(|| format!("cannot unmount {}", a.mountpoint.display())),
        Command::Keygen(a) => keygen(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if e.is::<Interrupted>() => {
            eprintln!("lcfs: interrupted");
            std::process::ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("lcfs: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_specs() {
        let h = blake3::hash(b"r");
        assert_eq!(
            parse_channel_spec("a").unwrap(),
            ChannelSpec {
                name: "a".into(),
                pinned: None,
                subpath: "".into()
            }
        );
        let s = parse_channel_spec(&format!("a@{}:x/y", h.to_hex())).unwrap();
        assert_eq!((s.pinned, s.subpath.as_str()), (Some(h), "x/y"));
        assert!(parse_channel_spec("@abc").is_err());
        assert!(parse_channel_spec("a@zz").is_err());
    }

    #[test]
    fn rates_and_sizes() {
        assert_eq!(parse_rate("100M"), Ok(100_000_000));
        assert_eq!(parse_rate("1.5G"), Ok(1_500_000_000));
        assert_eq!(parse_rate("200mbit"), Ok(200_000_000));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert!(parse_rate("fast").is_err());
        assert!(parse_block_size("48K").is_err());
        assert_eq!(parse_block_size("1M").unwrap().bytes(), 1 << 20);
    }
}
