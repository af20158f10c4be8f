//! The command line: argument parsing, logging, signals and exit codes. Each subcommand
//! resolves its options into the library's types and calls into the library; nothing here
//! knows about packets. One file a subcommand; `args` and `receive` are shared, and nothing
//! below imports this file.

mod args;
mod cache;
mod copy;
mod docs;
mod keygen;
mod logging;
mod mount;
mod receive;
mod serve;
mod status;
mod sync;

use anyhow::Context;
use clap::Parser;

use args::{Cli, Command};

pub use args::{default_cache_dir, default_state_dir, parse_channel_spec, ChannelSpec};

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

/// The `lcfs` binary. Exit codes: 0 success, 1 failure, 2 usage, 130 interrupted.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // A detached mount sets up its own logging once it knows where to.
    if !matches!(&cli.command, Command::Mount(m) if m.daemon || mount::is_daemon_child()) {
        logging::init_logging();
    }
    let result = match cli.command {
        Command::Serve(a) => serve::serve(a),
        Command::Copy(a) => run_async(copy::copy(a)),
        Command::Prefetch(a) => run_async(copy::prefetch(a)),
        Command::Sync(a) => sync::sync(a),
        Command::Cache(c) => cache::cache(c),
        Command::Mount(a) => mount::mount(a),
        Command::Umount(a) => lcfs_mount::unmount(&a.mountpoint)
            .with_context(|| format!("cannot unmount {}", a.mountpoint.display())),
        Command::Status(a) => status::status(a),
        Command::Keygen(a) => keygen::keygen(a),
        Command::Man(a) => docs::man_pages(&a.dir),
        Command::Completions(a) => {
            docs::completions(a.shell, &mut std::io::stdout());
            Ok(())
        }
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
