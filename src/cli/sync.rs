//! `lcfs sync`: a local directory into DEST, only differing blocks written.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::args::SyncArgs;
use super::Interrupted;
use crate::sync::{SyncError, SyncOptions, SyncReport};

pub(crate) fn sync(args: SyncArgs) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let opts = SyncOptions {
        keep_setuid: args.keep_setuid,
        delete: args.delete,
        block_size: args.block_size,
    };
    match crate::sync::sync(&args.src, &args.dest, opts, &stop) {
        Ok(report) => {
            say_synced(&report, &args);
            Ok(())
        }
        Err(SyncError::Interrupted) => Err(Interrupted.into()),
        Err(e) => Err(e.into()),
    }
}

fn say_synced(r: &SyncReport, args: &SyncArgs) {
    let secs = r.elapsed.as_secs_f64().max(1e-3);
    let unchanged = match r.unchanged {
        0 => String::new(),
        n => format!(", {n} already up to date"),
    };
    let trashed = match r.trashed {
        0 => String::new(),
        n => format!(
            ", {n} entries moved to {}",
            args.dest.join(crate::copy::trash::TRASH).display()
        ),
    };
    let skipped = match r.skipped.len() {
        0 => String::new(),
        n => format!(
            ", {n} entries of {} left out (see above)",
            args.src.display()
        ),
    };
    eprintln!(
        "synced {} files, {} dirs, {} symlinks ({} bytes) to {} in {:.2} s ({:.1} MB/s): {} bytes written from {}, {} reused from {}{unchanged}{trashed}{skipped}",
        r.files,
        r.dirs,
        r.symlinks,
        r.bytes,
        args.dest.display(),
        secs,
        r.bytes as f64 / secs / 1e6,
        r.written,
        args.src.display(),
        r.reused,
        args.dest.display(),
    );
}
