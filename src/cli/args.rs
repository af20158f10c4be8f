//! The command line's arguments: what each subcommand takes, and how values are parsed.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail};
use clap::{Args, Parser, Subcommand};

use crate::net::{resolve_iface, Iface};
use crate::wire::object::BlockSize;

#[derive(Parser)]
#[command(
    name = "lcfs",
    version,
    about = "Hand the same files to many machines at once over IPv6 multicast",
    long_about = "lcfs publishes a directory over IPv6 multicast (`lcfs serve`) and copies or mounts it on any \
number of receivers. The server sends only while MLD shows listeners; receivers never send it a request. \
Every byte is verified against BLAKE3 hashes from the root record down.\n\nLogging: RUST_LOG=lcfs=debug"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
    ///
    /// Fetched blocks are kept in the cache as well, so that an interrupted copy resumes;
    /// small files only while another lcfs process uses the same cache (DEST holds them).
    Copy(CopyArgs),
    /// Fill the cache with a channel's tree for offline use.
    Prefetch(PrefetchArgs),
    /// Sync a local directory (or file) into DEST, writing only the blocks that differ.
    ///
    /// Each file is compared with DEST's file of the same name block by block; a changed
    /// file is rebuilt under a hidden .lcfs-part-* name from DEST's equal blocks and SRC's
    /// differing ones, made durable, then renamed into place. DEST is handled as lcfs copy
    /// handles it: no symlink below it is followed, a directory another user owns is
    /// refused, setuid and setgid are dropped unless --keep-setuid.
    Sync(SyncArgs),
    /// Inspect and manage the receiver cache: status, pin, unpin, verify, gc, clear.
    #[command(subcommand, long_about = CACHE_ABOUT)]
    Cache(CacheCommand),
    /// Mount a channel as a read-only filesystem.
    Mount(MountArgs),
    /// Unmount an lcfs mount.
    Umount(UmountArgs),
    /// Show every lcfs process on this machine: serves, mounts, copies and prefetches, with
    /// their channel, generation, server state, traffic and cache.
    ///
    /// Each process rewrites its status every second under /run/lcfs (root) or
    /// $XDG_RUNTIME_DIR/lcfs; root sees every user's.
    Status(StatusArgs),
    /// Write a new random keyfile for an encrypted channel.
    Keygen(KeygenArgs),
    /// Write a man page for lcfs and for each of its commands into DIR.
    ///
    /// Install them with: lcfs man /usr/local/share/man/man1 && mandb -q
    Man(ManArgs),
    /// Print a shell completion script for lcfs.
    ///
    /// bash: lcfs completions bash > /etc/bash_completion.d/lcfs
    /// zsh: lcfs completions zsh > "${fpath[1]}/_lcfs"
    /// fish: lcfs completions fish > ~/.config/fish/completions/lcfs.fish
    Completions(CompletionsArgs),
}

#[derive(Args)]
pub(crate) struct ManArgs {
    /// Directory to write lcfs.1, lcfs-serve.1, ... into (created if missing).
    pub(crate) dir: PathBuf,
}

#[derive(Args)]
pub(crate) struct CompletionsArgs {
    /// The shell.
    pub(crate) shell: clap_complete::Shell,
}

pub(crate) const SERVE_ABOUT: &str = "Publish a directory (or one file) on a channel, and follow its changes.

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
    /// Give every file the user.lcfs.* attributes (cached fraction, generation, server
    /// state; `getfattr -d -m user.lcfs PATH`). Off by default because FUSE keeps no cache
    /// of absent attributes: with it, `ls -l` asks the mount about every file it shows and
    /// takes 4 to 5 times as long.
    #[arg(long)]
    pub(crate) xattrs: bool,
}

#[derive(Args)]
pub(crate) struct StatusArgs {
    /// Print the statuses as JSON (an array of objects; see `crate::status::ProcessStatus`).
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args)]
pub(crate) struct UmountArgs {
    /// The mountpoint.
    pub(crate) mountpoint: PathBuf,
}

#[derive(Args)]
pub(crate) struct NetArgs {
    /// Network interface to use (required when several are up; never lo).
    #[arg(long, short = 'i', env = "LCFS_IFACE")]
    pub(crate) iface: Option<String>,
    /// UDP port of the channel.
    #[arg(long, default_value_t = crate::wire::channel::DEFAULT_PORT)]
    pub(crate) port: u16,
}

#[derive(Args)]
pub(crate) struct KeyArgs {
    /// Encrypt (serve) or decrypt (receive) with the key in FILE (see `lcfs keygen`).
    #[arg(long, value_name = "FILE", conflicts_with = "password")]
    pub(crate) keyfile: Option<PathBuf>,
    /// Derive the key from a password: $LCFS_PASSWORD if set, else asked for on the terminal.
    #[arg(long)]
    pub(crate) password: bool,
}

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// Directory or file to publish.
    pub(crate) path: PathBuf,
    /// Channel name [default: PATH's base name].
    #[arg(long, short = 'c')]
    pub(crate) channel: Option<String>,
    #[command(flatten)]
    pub(crate) net: NetArgs,
    /// Send rate in bits per second on the wire, Ethernet, IPv6 and UDP headers included
    /// (suffixes K, M, G).
    #[arg(long, default_value = "100M", value_parser = parse_rate)]
    pub(crate) rate: u64,
    /// Block size: a power of two from 16K to 4M.
    #[arg(long, default_value = "64K", value_parser = parse_block_size)]
    pub(crate) block_size: BlockSize,
    /// Where the leaf-hash cache and generation counter live [default: /var/lib/lcfs for root,
    /// else $XDG_STATE_HOME/lcfs].
    #[arg(long, value_name = "DIR")]
    pub(crate) state: Option<PathBuf>,
    /// Multicast hop limit (1 keeps traffic on the link).
    #[arg(long, default_value_t = 1)]
    pub(crate) hops: u32,
    /// Seconds between MLD general queries while this server is the link's querier.
    #[arg(long, default_value_t = 5)]
    pub(crate) query_interval: u64,
    /// Serve Prometheus metrics on PORT (loopback) or ADDR:PORT, at /metrics.
    #[arg(long, value_name = "ADDR", value_parser = crate::status::metrics::parse_addr)]
    pub(crate) metrics: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub(crate) key: KeyArgs,
    /// Sign root records with the publisher key in FILE (see `lcfs keygen --sign`).
    #[arg(long, value_name = "FILE")]
    pub(crate) sign_key: Option<PathBuf>,
    /// How long a root record's signature stays valid (e.g. 12h, 7d). The server renews it
    /// every quarter of that, at most every hour, while it runs; receivers refuse an expired one.
    #[arg(long, value_name = "DURATION", default_value = "7d", value_parser = parse_duration, requires = "sign_key")]
    pub(crate) sign_validity: Duration,
    /// Do not follow the tree: serve it as it is at start; SIGHUP still rescans and publishes.
    #[arg(long)]
    pub(crate) no_watch: bool,
    /// Quiet time after the last change of a burst before publishing (e.g. 200ms, 2s).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration, conflicts_with = "no_watch")]
    pub(crate) debounce: Duration,
    /// Rescan the whole tree this often without being notified (network file systems); 0: never.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration, conflicts_with = "no_watch")]
    pub(crate) rescan: Duration,
}

#[derive(Args)]
pub(crate) struct RecvArgs {
    #[command(flatten)]
    pub(crate) net: NetArgs,
    /// Cache directory [default: /var/cache/lcfs for root, else $XDG_CACHE_HOME/lcfs].
    #[arg(long, value_name = "DIR")]
    pub(crate) cache: Option<PathBuf>,
    /// Quota on the cache's disk use (suffixes K, M, G, T); least recently used blocks go first.
    #[arg(long, value_parser = parse_size)]
    pub(crate) cache_size: Option<u64>,
    /// Seconds without data after which a fetch fails.
    #[arg(long, default_value_t = 30)]
    pub(crate) timeout: u64,
    /// Wait for the channel's root record as long as it takes (at boot, before the server is
    /// up). Without it, a receiver that hears none within 5 s (or --timeout, if shorter) fails
    /// and says why; a mount with a cached root record starts offline after 3 s instead.
    #[arg(long)]
    pub(crate) wait: bool,
    #[command(flatten)]
    pub(crate) key: KeyArgs,
    /// Accept a root record with a lower generation than one already seen.
    #[arg(long)]
    pub(crate) allow_rollback: bool,
    /// Accept only root records signed by this publisher key (64 hex digits, or a .pub file).
    #[arg(long, value_name = "PUBKEY")]
    pub(crate) publisher: Option<String>,
    /// Accept a publisher other than the one this cache trusted first for the channel (another
    /// server address, or another signing key), and trust it from now on.
    #[arg(long)]
    pub(crate) allow_new_publisher: bool,
    /// Refuse signed root records signed longer ago than this (e.g. 6h, 3d): a replayed old
    /// record cannot hold a receiver on an old generation.
    #[arg(long, value_name = "DURATION", default_value = "3d", value_parser = parse_duration)]
    pub(crate) max_age: Duration,
    /// Serve Prometheus metrics on PORT (loopback) or ADDR:PORT, at /metrics.
    #[arg(long, value_name = "ADDR", value_parser = crate::status::metrics::parse_addr)]
    pub(crate) metrics: Option<std::net::SocketAddr>,
}

#[derive(Args)]
pub(crate) struct CopyArgs {
    /// NAME[@ROOTHASH][:SUBPATH]: the channel, optionally a pinned snapshot and a path in it.
    pub(crate) channel: String,
    /// Where to write: a directory for a tree; a file path or a directory for one file.
    pub(crate) dest: PathBuf,
    /// Keep setuid and setgid bits as published. Without it they are dropped, since the copy's
    /// files belong to whoever runs it (root, as root).
    #[arg(long)]
    pub(crate) keep_setuid: bool,
    /// Move what DEST holds and the channel does not into DEST/.lcfs-trash/<UTC time>/
    /// (nothing is deleted outright).
    #[arg(long)]
    pub(crate) delete: bool,
    /// After the copy, keep following the channel: apply each new generation to DEST,
    /// fetching only changed blocks. Ctrl-C stops it; no partial file is ever left.
    #[arg(long)]
    pub(crate) watch: bool,
    #[command(flatten)]
    pub(crate) recv: RecvArgs,
}

#[derive(Args)]
pub(crate) struct SyncArgs {
    /// The directory (or file) to sync from. Symlinks below it are copied as symlinks.
    pub(crate) src: PathBuf,
    /// Where to: a directory for a directory; a file path or a directory for one file.
    pub(crate) dest: PathBuf,
    /// Keep setuid and setgid bits. Without it they are dropped, since the synced files
    /// belong to whoever runs the sync.
    #[arg(long)]
    pub(crate) keep_setuid: bool,
    /// Move what DEST holds and SRC does not into DEST/.lcfs-trash/<UTC time>/
    /// (nothing is deleted outright).
    #[arg(long)]
    pub(crate) delete: bool,
    /// Files are compared in blocks of this size (a power of two, 16K to 4M).
    #[arg(long, default_value = "64K", value_parser = parse_block_size)]
    pub(crate) block_size: BlockSize,
}

#[derive(Args)]
pub(crate) struct PrefetchArgs {
    /// NAME[@ROOTHASH]: the channel.
    pub(crate) channel: String,
    /// Paths inside the channel to fetch [default: everything].
    pub(crate) subpaths: Vec<String>,
    /// Keep the fetched objects from eviction.
    #[arg(long)]
    pub(crate) pin: bool,
    #[command(flatten)]
    pub(crate) recv: RecvArgs,
}

pub(crate) const CACHE_ABOUT: &str =
    "Inspect and manage the receiver cache: status, pin, unpin, verify, gc, clear.

The cache (--cache DIR) holds verified objects of every channel received on this machine, \
keyed by hash, and the last root record of each channel. status, pin, unpin and gc work while \
mounts and copies use the cache; verify and clear need it to themselves and name the lcfs \
process to stop first.";

#[derive(Subcommand)]
pub(crate) enum CacheCommand {
    /// Show the cache's objects, disk use, pinned bytes, quota, free space and the channels
    /// it remembers a root record for (by channel id: names are not stored).
    Status(CacheStatusArgs),
    /// Fetch and pin a channel's tree, or paths in it, so eviction never removes them
    /// (the same as `lcfs prefetch --pin`; needs the server).
    Pin(PrefetchPinArgs),
    /// Make a channel's tree, or paths in it, evictable again. Works offline: the tree is
    /// walked from the cache, down from the channel's remembered root record.
    ///
    /// Pins are not counted: a block shared with another pinned path or channel is
    /// unpinned too; pin that path again to keep it.
    Unpin(CacheUnpinArgs),
    /// Re-hash every object file against its name; delete those that fail and report.
    ///
    /// Damaged objects are dropped (file and index entry) and fetched again when next read,
    /// so the exit status is 0 when the check ran, whatever it dropped; the last line says
    /// what was dropped. Needs the cache to itself.
    Verify(CacheDirArgs),
    /// Evict least recently used unpinned objects down to a size, and remove temp files
    /// left by lcfs processes that died.
    Gc(CacheGcArgs),
    /// Delete every cached object (with --keep-pinned, every unpinned one). The root
    /// records and trusted publishers stay: they hold no content and guard against rollback.
    /// Needs the cache to itself.
    Clear(CacheClearArgs),
}

#[derive(Args)]
pub(crate) struct CacheDirArgs {
    /// Cache directory [default: /var/cache/lcfs for root, else $XDG_CACHE_HOME/lcfs].
    #[arg(long, value_name = "DIR")]
    pub(crate) cache: Option<PathBuf>,
}

#[derive(Args)]
pub(crate) struct CacheStatusArgs {
    #[command(flatten)]
    pub(crate) dir: CacheDirArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args)]
pub(crate) struct PrefetchPinArgs {
    /// NAME[@ROOTHASH]: the channel.
    pub(crate) channel: String,
    /// Paths inside the channel to pin [default: everything].
    pub(crate) subpaths: Vec<String>,
    #[command(flatten)]
    pub(crate) recv: RecvArgs,
}

#[derive(Args)]
pub(crate) struct CacheUnpinArgs {
    /// NAME[@ROOTHASH]: the channel (its remembered root record, or that snapshot).
    #[arg(required_unless_present = "all")]
    pub(crate) channel: Option<String>,
    /// Paths inside the channel to unpin [default: everything].
    pub(crate) subpaths: Vec<String>,
    /// Unpin every object of every channel.
    #[arg(long, conflicts_with_all = ["channel", "subpaths"])]
    pub(crate) all: bool,
    #[command(flatten)]
    pub(crate) dir: CacheDirArgs,
    #[command(flatten)]
    pub(crate) key: KeyArgs,
}

#[derive(Args)]
pub(crate) struct CacheGcArgs {
    #[command(flatten)]
    pub(crate) dir: CacheDirArgs,
    /// Evict down to SIZE of disk use (suffixes K, M, G, T; 0 evicts every unpinned
    /// object) [default: the --cache-size of the lcfs process using the cache; without
    /// one, gc asks for --max-size].
    #[arg(long, value_name = "SIZE", value_parser = parse_size_or_zero)]
    pub(crate) max_size: Option<u64>,
}

#[derive(Args)]
pub(crate) struct CacheClearArgs {
    #[command(flatten)]
    pub(crate) dir: CacheDirArgs,
    /// Keep pinned objects (and their pins).
    #[arg(long)]
    pub(crate) keep_pinned: bool,
}

#[derive(Args)]
pub(crate) struct KeygenArgs {
    /// Write the key to FILE (mode 0600) instead of standard output.
    #[arg(long, value_name = "FILE")]
    pub(crate) out: Option<PathBuf>,
    /// Make an Ed25519 publisher key pair instead: the secret to FILE, the public key to
    /// FILE.pub (requires --out).
    #[arg(long, requires = "out")]
    pub(crate) sign: bool,
}

/// `NAME[@ROOTHASH][:SUBPATH]`.
#[derive(Debug, PartialEq, Eq)]
pub struct ChannelSpec {
    pub name: String,
    pub pinned: Option<crate::wire::object::ObjectHash>,
    pub subpath: String,
}

pub fn parse_channel_spec(s: &str) -> anyhow::Result<ChannelSpec> {
    let (head, subpath) = s.split_once(':').unwrap_or((s, ""));
    let (name, pinned) = match head.split_once('@') {
        Some((n, h)) => {
            let hash = crate::wire::object::ObjectHash::from_hex(h)
                .ok_or_else(|| anyhow!("{h:?} is not a 64-digit root hash"))?;
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

pub(crate) fn parse_scaled(s: &str, base: u64) -> Result<u64, String> {
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

pub(crate) fn parse_rate(s: &str) -> Result<u64, String> {
    parse_scaled(s, 1000)
}

pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    parse_scaled(s, 1024)
}

/// A size as [`parse_size`] reads it, or 0.
pub(crate) fn parse_size_or_zero(s: &str) -> Result<u64, String> {
    match s.trim() {
        "0" => Ok(0),
        _ => parse_size(s),
    }
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration such as 90s, 6h or 3d: {e}"))
}

pub(crate) fn parse_block_size(s: &str) -> Result<BlockSize, String> {
    let n = parse_size(s)?;
    BlockSize::from_bytes(n)
        .map_err(|_| format!("{s:?}: the block size must be a power of two from 16K to 4M"))
}

pub(crate) fn home_dir(var: &str, fallback: &str, root: &str) -> PathBuf {
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

impl NetArgs {
    /// The interface named, or the only candidate.
    pub(crate) fn iface(&self) -> anyhow::Result<Iface> {
        Ok(resolve_iface(self.iface.as_deref())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::object::ObjectHash;

    #[test]
    fn channel_specs() {
        let h = ObjectHash::of(b"r");
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
        assert_eq!(parse_size_or_zero("0"), Ok(0));
        assert_eq!(parse_size_or_zero("1G"), Ok(1 << 30));
        assert!(parse_size("0").is_err());
        assert!(parse_rate("fast").is_err());
        assert!(parse_block_size("48K").is_err());
        assert_eq!(parse_block_size("1M").unwrap().bytes(), 1 << 20);
    }
}
