//! `lcfs man` and `lcfs completions`: the man pages and shell completions, generated from the
//! same clap definitions as `--help`, so that they never disagree with it.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;

use super::args::Cli;

/// Writes `lcfs.1` and `lcfs-COMMAND.1` for every command into `dir`.
pub(crate) fn man_pages(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let cmd = Cli::command();
    let mut written = Vec::new();
    let mut write = |name: String, cmd: clap::Command| -> anyhow::Result<()> {
        let path = dir.join(format!("{name}.1"));
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd.name(name.clone()))
            .render(&mut out)
            .context("rendering a man page")?;
        std::fs::write(&path, out).with_context(|| format!("cannot write {}", path.display()))?;
        written.push(path);
        Ok(())
    };
    for sub in cmd.get_subcommands() {
        if sub.get_name() != "help" {
            write(format!("lcfs-{}", sub.get_name()), sub.clone())?;
        }
    }
    write("lcfs".into(), cmd.clone())?;
    eprintln!(
        "wrote {} man pages to {} (man {}/lcfs.1)",
        written.len(),
        dir.display(),
        dir.display()
    );
    Ok(())
}

/// Prints the completion script for `shell`.
pub(crate) fn completions(shell: clap_complete::Shell, out: &mut dyn Write) {
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "lcfs", out);
}
