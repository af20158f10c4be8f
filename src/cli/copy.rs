//! `lcfs copy` and `lcfs prefetch`: a channel's tree to a directory, or into the cache.

use std::path::Path;
use std::sync::atomic::Ordering;

use super::args::{parse_channel_spec, CopyArgs, PrefetchArgs};
use super::receive::{on_latest_tree, report_status};
use crate::fetch::follow::RootFollower;
use crate::fetch::{KeepMembers, Tree};

pub(crate) async fn copy(args: CopyArgs) -> anyhow::Result<()> {
    let spec = parse_channel_spec(&args.channel)?;
    let opts = crate::copy::CopyOptions {
        keep_setuid: args.keep_setuid,
        delete: args.delete,
    };
    let status = std::sync::OnceLock::new();
    // DEST gets every file verified; the cache need not hold the small ones too.
    let keep = KeepMembers::WhenShared;
    let (rx, report) = on_latest_tree(&spec, &args.recv, keep, |tree, settled| {
        let (spec, args, status) = (&spec, &args, &status);
        async move {
            if status.get().is_none() {
                let r = report_status("copy", spec, &args.recv, &args.dest, tree.fetcher())?;
                let _ = status.set(r);
            }
            let dest = &args.dest;
            Ok(crate::copy::copy(&tree, &spec.subpath, dest, opts, settled.wait()).await?)
        }
    })
    .await?;
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
    let Some(follower) = RootFollower::of_tree(&rx.tree, &rx.policy)? else {
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
        match crate::copy::copy(&next, &spec.subpath, &args.dest, opts, async {}).await {
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
pub(crate) fn say_copied(
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

pub(crate) async fn prefetch(args: PrefetchArgs) -> anyhow::Result<()> {
    let spec = parse_channel_spec(&args.channel)?;
    let mut subpaths = args.subpaths.clone();
    if !spec.subpath.is_empty() {
        subpaths.push(spec.subpath.clone());
    }
    // Only the cache is written, which any generation's verified objects may fill; but pins
    // last, so a pinning prefetch waits until the generation is settled.
    let status = std::sync::OnceLock::new();
    let keep = KeepMembers::Always;
    let (rx, report) = on_latest_tree(&spec, &args.recv, keep, |tree, settled| {
        let (subpaths, pin, spec, status) = (&subpaths, args.pin, &spec, &status);
        let recv = &args.recv;
        async move {
            if status.get().is_none() {
                let r = report_status("prefetch", spec, recv, Path::new(""), tree.fetcher())?;
                let _ = status.set(r);
            }
            if pin {
                settled.wait().await;
            }
            Ok(crate::prefetch::prefetch(&tree, subpaths, pin).await?)
        }
    })
    .await?;
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
