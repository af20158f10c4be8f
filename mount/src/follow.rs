//! Following the source to its new versions while mounted.
//!
//! One task per mount waits for [`Source::next_version`], moves the filesystem to it
//! ([`Fs::switch`]) and tells the kernel what to forget through fuser's notifier:
//! `inval_entry` for replaced, removed and added names, `inval_inode` for changed attributes
//! (offset -1: the page cache stays) and for changed directories (offset 0: their cached
//! readdir pages go). Unchanged files are not touched, so they keep their page cache.
//!
//! Every batch is sent twice: at once, and again [`RESEND`] later. A lookup or readdir reply
//! computed before the move can reach the kernel after the first notification, and would
//! otherwise re-create an old entry for as long as the entry TTL (an hour). Sending again
//! costs at most one extra lookup per changed name.
//!
//! The notifier writes to /dev/fuse, and the kernel may make that write wait (an entry
//! invalidation takes the directory's lock, which an unanswered lookup holds), so sends run on
//! a blocking thread, never on the runtime's workers or the session thread.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use fuser::{INodeNo, Notifier};
use tracing::{debug, info, warn};

use crate::fs::Fs;
use crate::inode::Invalidation;
use crate::session::Ended;
use crate::source::{Source, SourceError};

/// When a batch of invalidations is sent again.
pub const RESEND: Duration = Duration::from_millis(250);

/// Follows `fs`'s source until the session ends or the source closes.
pub(crate) async fn run<S: Source>(fs: Arc<Fs<S>>, notifier: Notifier, ended: Arc<Ended>) {
    loop {
        let seen = fs.version();
        let next = tokio::select! {
            v = fs.source().next_version(seen) => v,
            () = ended.wait_async() => return,
        };
        let version = match next {
            Ok(v) if v.number > seen => v,
            Ok(_) => continue,
            Err(SourceError::Closed) => return,
            Err(e) => {
                warn!(error = %e, "cannot learn of new versions; the mount stays on version {seen}");
                return;
            }
        };
        let number = version.number;
        let invalidations = Arc::new(fs.switch(version).await);
        info!(
            from = seen,
            to = number,
            invalidations = invalidations.len(),
            "moved to a new version"
        );
        send(&notifier, invalidations.clone()).await;
        tokio::time::sleep(RESEND).await;
        send(&notifier, invalidations).await;
    }
}

/// Sends `invalidations` from a blocking thread.
async fn send(notifier: &Notifier, invalidations: Arc<Vec<Invalidation>>) {
    let notifier = notifier.clone();
    let sent = tokio::task::spawn_blocking(move || {
        for i in invalidations.iter() {
            if let Err(e) = notify(&notifier, i) {
                // ENOENT: the kernel did not hold it; nothing to forget.
                if e.raw_os_error() != Some(libc::ENOENT) {
                    debug!(invalidation = ?i, error = %e, "invalidation refused");
                }
            }
        }
    });
    if let Err(e) = sent.await {
        warn!(error = %e, "sending invalidations failed");
    }
}

fn notify(notifier: &Notifier, i: &Invalidation) -> io::Result<()> {
    match i {
        Invalidation::Entry { parent, name } => notifier.inval_entry(INodeNo(*parent), name),
        Invalidation::Attr(ino) => notifier.inval_inode(INodeNo(*ino), -1, 0),
        Invalidation::Data(ino) => notifier.inval_inode(INodeNo(*ino), 0, 0),
    }
}
