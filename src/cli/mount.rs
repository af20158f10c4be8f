//! `lcfs mount`: mount a channel, in the foreground or detached.
//!
//! In the foreground the mount lives until SIGINT, SIGTERM or an unmount, and always ends
//! with a clean unmount. `--daemon` starts the same command again as a detached child (a fresh
//! process, because a multi-threaded one cannot safely fork) and waits on a pipe until the
//! child's mount answers: the parent exits 0 only then, or non-zero with the child's error.
//! With no server, a mount whose cache holds the channel's last root record starts from it
//! (offline); with no server and nothing cached it fails within the timeout. Once mounted, it
//! follows the publisher to every new generation it accepts (`mountfs`), and an offline
//! mount goes online when the server answers; a pinned snapshot never moves.

use std::io::{BufRead, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use anyhow::{bail, Context};

use super::args::{parse_channel_spec, MountArgs};
use super::logging::init_logging_to;
use super::receive::{open_tree, report_status, KEY_FD};
use crate::fetch::tree::Origin;
use crate::mountfs::TreeSource;

const READY_FD: &str = "LCFS_READY_FD";

/// True in the detached child of `lcfs mount --daemon`.
pub fn is_daemon_child() -> bool {
    std::env::var_os(READY_FD).is_some()
}

pub(crate) fn mount(args: MountArgs) -> anyhow::Result<()> {
    if args.daemon && !is_daemon_child() {
        return spawn_daemon(&args);
    }
    let ready = take_ready_pipe();
    if is_daemon_child() {
        if let Some(log) = &args.log {
            init_logging_to(log)?;
        }
    }
    let result = run(&args, ready.as_ref());
    if let (Err(e), Some(fd)) = (&result, &ready) {
        // The parent is still waiting: tell it why.
        let _ = write_fd(fd, format!("error: {e:#}\n").as_bytes());
    }
    result
}

fn run(args: &MountArgs, ready: Option<&OwnedFd>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let spec = parse_channel_spec(&args.channel)?;
        let rx = open_tree(&spec, &args.recv, true).await?;
        let (tree, policy) = (rx.tree, rx.policy);
        let root = tree.root_record().clone();
        if tree.origin() == Origin::Offline {
            tracing::warn!(
                "no server answered for channel {:?}: mounted offline from the cached root record (generation {}); cached files read, others fail with EIO",
                spec.name,
                root.generation
            );
        }
        let config = lcfs_mount::MountConfig {
            keep_ownership: args.keep_ownership,
            allow_other: args.allow_other,
            xattrs: args.xattrs,
            fs_name: format!("lcfs:{}", spec.name),
            // Cache hits are answered on the session threads (hashing every block read from
            // disk): one per core keeps warm reads from being bound to one core.
            threads: std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8)),
            ..lcfs_mount::MountConfig::default()
        };
        // Every path lookup starts at the root directory: have it before the first one
        // (offline, a missing one would only hold the mount back for the timeout).
        if tree.origin() == Origin::Network {
            if let Err(e) = tree.root_dir(crate::fetch::Priority::Demand).await {
                tracing::warn!("the root directory is not available yet: {}", e.report());
            }
        }
        let _status = report_status("mount", &spec, &args.recv, &args.mountpoint, tree.fetcher())?;
        let source = Arc::new(TreeSource::new(tree));
        source.follow(&policy)?;
        let handle = lcfs_mount::mount(source, &args.mountpoint, config, tokio::runtime::Handle::current())?;
        check_answers(&args.mountpoint).await?;
        tracing::info!(
            "mounted channel {:?} generation {} (root {}) on {}",
            spec.name,
            root.generation,
            &root.root.hash.to_hex()[..16],
            args.mountpoint.display()
        );
        if let Some(fd) = ready {
            write_fd(fd, b"ok\n")?;
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = handle.ended() => tracing::info!("{} was unmounted", args.mountpoint.display()),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: unmounting"),
            _ = term.recv() => tracing::info!("terminated: unmounting"),
        }
        if !handle.is_ended() {
            handle.unmount()?;
        }
        Ok(())
    })
}

/// Waits until a stat of the mountpoint is answered by the new mount.
async fn check_answers(mountpoint: &Path) -> anyhow::Result<()> {
    let path = mountpoint.to_owned();
    tokio::task::spawn_blocking(move || std::fs::metadata(&path).map(drop))
        .await?
        .with_context(|| format!("the mount on {} does not answer", mountpoint.display()))
}

fn take_ready_pipe() -> Option<OwnedFd> {
    let fd: i32 = std::env::var(READY_FD).ok()?.parse().ok()?;
    // SAFETY: the parent passed this descriptor for us alone; nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn write_fd(fd: &OwnedFd, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::File::from(fd.try_clone()?);
    f.write_all(bytes)
}

/// Starts the detached child and waits for its verdict. A password is asked for (or taken
/// from `$LCFS_PASSWORD`) here, where there is a terminal, and the derived key goes to the
/// child through a pipe; the password itself is removed from the child's environment.
fn spawn_daemon(args: &MountArgs) -> anyhow::Result<()> {
    let (mut reader, writer) = std::io::pipe()?;
    let fd = writer.as_raw_fd();
    let mut inherit = vec![fd];
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(std::env::args_os().skip(1))
        .env(READY_FD, fd.to_string())
        .env_remove("LCFS_PASSWORD")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut key_pipe = None;
    if args.recv.uses_password() {
        let name = parse_channel_spec(&args.channel)?.name;
        if let Some(key) = args.recv.master_key(&name)? {
            let (key_reader, mut key_writer) = std::io::pipe()?;
            key_writer.write_all(key.as_bytes())?;
            drop(key_writer);
            cmd.env(KEY_FD, key_reader.as_raw_fd().to_string());
            inherit.push(key_reader.as_raw_fd());
            key_pipe = Some(key_reader);
        }
    }
    // SAFETY: only async-signal-safe calls (setsid, fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            for &fd in &inherit {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            }
            Ok(())
        });
    }
    let child = cmd.spawn().context("cannot start the mount daemon")?;
    drop(writer);
    drop(key_pipe);
    // The child keeps the pipe open while it runs: read its one line, not to the end.
    let mut verdict = String::new();
    std::io::BufReader::new(&mut reader).read_line(&mut verdict)?;
    match verdict.lines().next() {
        Some("ok") => {
            eprintln!(
                "lcfs: mounted {} on {} (daemon pid {})",
                args.channel,
                args.mountpoint.display(),
                child.id()
            );
            Ok(())
        }
        Some(line) => bail!("{}", line.trim_start_matches("error: ")),
        None => bail!(
            "the mount daemon exited before mounting {}",
            args.mountpoint.display()
        ),
    }
}
