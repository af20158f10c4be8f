//! The notification shell: inotify watches on every directory of the served tree, their
//! events turned into [`Notice`]s for the publish loop.
//!
//! The watch is recursive on the directory the tree was opened at (the one held open; see
//! `index/beneath.rs`), and it works by descriptor as the indexer does: a directory to watch
//! is opened from the tree's descriptor one name at a time with `O_NOFOLLOW | O_DIRECTORY`
//! (a symlink or `..` anywhere fails), its subdirectories are found by listing that
//! descriptor, and the watch is added on `/proc/self/fd/N`, the directory actually opened.
//! inotify by path would follow a symlink swapped in on the way, and a watch keeps the path it
//! was added under: a directory moved out of the tree and a symlink put in its place would
//! have had the next directory made in it watched, with everything below it, outside the
//! tree. Here a stale path (a directory moved away keeps its watch until it is deleted) names
//! at most something inside the tree, and costs at most a reindex that publishes nothing new.
//!
//! Only changes are asked for: creations, removals, renames, writes, attribute changes and
//! closes after writing. Not opens: the server itself reads the tree, and the `notify` crate
//! this replaced always asked for `IN_OPEN`, so every block the sender read queued an event
//! for the kernel to copy and a thread to discard (a sixth of a serve's CPU time with a tree
//! of small files). An overflow (`IN_Q_OVERFLOW`) is a [`Notice::Overflow`]: rescan; and as
//! the lost events may have been of new directories, every directory is watched again, at
//! most every [`REWALK_EVERY`]. A tree
//! too large for `fs.inotify.max_user_watches` is watched in part, with a warning; the
//! periodic rescan finds the rest.
//!
//! [`Watched`] is the sans-IO part (events in, notices and directories to watch out); the
//! thread that reads the inotify descriptor and adds watches is the shell around it.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use inotify::{EventMask, Inotify, WatchMask, Watches};

use super::Notice;
use crate::net;
use crate::serve::index::{beneath, Tree};

/// The events that can change what is published. No `IN_DONT_FOLLOW`: the watch is added
/// through `/proc/self/fd/N`, a link to the directory opened, which must be followed.
const CHANGES: WatchMask = WatchMask::CREATE
    .union(WatchMask::DELETE)
    .union(WatchMask::MODIFY)
    .union(WatchMask::ATTRIB)
    .union(WatchMask::CLOSE_WRITE)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF)
    .union(WatchMask::ONLYDIR);

/// Full walks after an overflow at most this often: each is a system call or two for every
/// directory, and a user who floods the queue must not keep the watcher walking. Between them
/// the periodic rescan finds what an unwatched directory changed.
const REWALK_EVERY: Duration = Duration::from_secs(30);

/// The watched directories, by watch descriptor number, relative to the tree.
#[derive(Debug, Default)]
pub struct Watched {
    dirs: HashMap<i32, PathBuf>,
    /// The one file of a single-file tree: only its changes are notices.
    only: Option<PathBuf>,
}

/// What one event asks of the shell.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Step {
    pub notices: Vec<Notice>,
    /// A directory that appeared (created or moved in), relative to the tree: watch it and
    /// everything below it. The tree itself ("") after an overflow.
    pub watch: Option<PathBuf>,
}

impl Watched {
    pub fn new(only: Option<PathBuf>) -> Watched {
        Watched {
            dirs: HashMap::new(),
            only,
        }
    }

    /// Records that watch `wd` watches the directory `rel` (replacing what it watched: the
    /// kernel gives an inode's existing watch again when it is added under a new path).
    pub fn handle_added(&mut self, wd: i32, rel: PathBuf) {
        self.dirs.insert(wd, rel);
    }

    pub fn handle_event(&mut self, wd: i32, mask: EventMask, name: Option<&OsStr>) -> Step {
        if mask.contains(EventMask::Q_OVERFLOW) {
            // Lost events may have been of new directories: watch the whole tree again (a
            // directory watched already keeps its watch).
            return Step {
                notices: vec![Notice::Overflow],
                watch: Some(PathBuf::new()),
            };
        }
        if mask.contains(EventMask::IGNORED) {
            self.dirs.remove(&wd);
            return Step::default();
        }
        // An event of a watch already removed (queued before its IN_IGNORED) says nothing new.
        let Some(dir) = self.dirs.get(&wd) else {
            return Step::default();
        };
        let rel = match name {
            Some(n) => dir.join(n),
            None => dir.clone(),
        };
        let appeared = mask.intersects(EventMask::CREATE | EventMask::MOVED_TO);
        let watch = (self.only.is_none() && mask.contains(EventMask::ISDIR) && appeared)
            .then(|| rel.clone());
        let wanted = self
            .only
            .as_deref()
            .is_none_or(|f| rel.starts_with(f) || rel.as_os_str().is_empty());
        Step {
            notices: wanted.then_some(Notice::Changed(rel)).into_iter().collect(),
            watch,
        }
    }

    pub fn watched(&self) -> usize {
        self.dirs.len()
    }
}

/// A running watcher; dropping it stops the notifications and its thread.
pub struct TreeWatcher {
    /// Dropped to wake the thread (its end sees a hangup).
    stop: Option<UnixStream>,
    /// Set first, so that a walk under way stops at its next directory.
    stopping: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for TreeWatcher {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Watches `tree` and sends what changed to `tx`. Fails only if inotify cannot be had at
/// all; a partial watch is logged and kept.
pub fn watch(tree: &Tree, tx: Sender<Notice>) -> io::Result<TreeWatcher> {
    let only = tree
        .single_file()
        .map(|(name, _)| PathBuf::from(OsStr::from_bytes(name.to_bytes())));
    let root = beneath::open_dir_beneath(tree.dir().as_fd(), Path::new(""))?;
    watch_fd(root, tree.dir_path(), only, tx)
}

/// Watches the directory `root`, as named, only its file `only` when given.
#[cfg(test)]
fn watch_dir(root: &Path, only: Option<PathBuf>, tx: Sender<Notice>) -> io::Result<TreeWatcher> {
    let fd = OwnedFd::from(std::fs::File::open(root)?);
    watch_fd(fd, root, only, tx)
}

/// Watches the directory open at `root` (known as `shown` in messages).
fn watch_fd(
    root: OwnedFd,
    shown: &Path,
    only: Option<PathBuf>,
    tx: Sender<Notice>,
) -> io::Result<TreeWatcher> {
    let inotify = Inotify::init()?;
    let stopping = Arc::new(AtomicBool::new(false));
    let mut shell = Shell {
        root,
        shown: shown.to_owned(),
        watches: inotify.watches(),
        watched: Watched::new(only),
        warned: false,
        last_walk: Instant::now(),
        stopping: stopping.clone(),
    };
    shell.add_tree(PathBuf::new())?;
    let (stop, stopped) = UnixStream::pair()?;
    let thread = std::thread::Builder::new()
        .name("lcfs-watch".into())
        .spawn(move || shell.run(inotify, &stopped, &tx))?;
    Ok(TreeWatcher {
        stop: Some(stop),
        stopping,
        thread: Some(thread),
    })
}

/// A directory still to watch, by its parent's descriptor and its name there.
type FromParent = (Arc<OwnedFd>, CString);

struct Shell {
    /// The tree's directory: every directory watched is opened from it.
    root: OwnedFd,
    shown: PathBuf,
    watches: Watches,
    watched: Watched,
    /// Whether running out of watches was logged.
    warned: bool,
    /// When the whole tree was last walked.
    last_walk: Instant,
    stopping: Arc<AtomicBool>,
}

impl Shell {
    /// Watches the directory `rel` and every directory below it, by descriptor (see the
    /// module docs). Fails only when the tree's own directory cannot be watched at all.
    fn add_tree(&mut self, rel: PathBuf) -> io::Result<()> {
        if rel.as_os_str().is_empty() {
            self.last_walk = Instant::now();
        }
        let recursive = self.watched.only.is_none();
        // A subdirectory is opened from its parent, which its siblings still to do share: a
        // walk holds a descriptor for each level it is in, not for each directory it found.
        let mut todo: Vec<(PathBuf, Option<FromParent>)> = vec![(rel, None)];
        while let Some((rel, from)) = todo.pop() {
            if self.stopping.load(Ordering::Relaxed) {
                break;
            }
            let opened = match &from {
                Some((parent, name)) => beneath::open_dir_at(parent.as_fd(), name),
                None => beneath::open_dir_beneath(self.root.as_fd(), &rel),
            };
            let dir = match opened {
                Ok(dir) => dir,
                Err(e) if rel.as_os_str().is_empty() => return Err(e),
                // Gone or replaced since it was seen: its own removal is a notice already.
                Err(_) => continue,
            };
            let at = format!("/proc/self/fd/{}", dir.as_raw_fd());
            match self.watches.add(&at, CHANGES) {
                Ok(wd) => self
                    .watched
                    .handle_added(wd.get_watch_descriptor_id(), rel.clone()),
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                    self.warn_limit();
                    return Ok(());
                }
                Err(e) if rel.as_os_str().is_empty() => {
                    // Through /proc: without it mounted, say so rather than "not found".
                    let why = format!("adding an inotify watch on {at} (is /proc mounted?): {e}");
                    return Err(io::Error::new(e.kind(), why));
                }
                Err(_) => continue,
            }
            if recursive {
                let dir = Arc::new(dir);
                let names = beneath::list_dirs(&dir).unwrap_or_default();
                todo.extend(names.into_iter().map(|n| {
                    let at = rel.join(OsStr::from_bytes(n.to_bytes()));
                    (at, Some((dir.clone(), n)))
                }));
            }
        }
        Ok(())
    }

    fn warn_limit(&mut self) {
        if !std::mem::replace(&mut self.warned, true) {
            tracing::warn!(
                "cannot watch every directory of {} ({} watched): fs.inotify.max_user_watches \
                 is too low; raise it, or rely on the periodic rescan (--rescan)",
                self.shown.display(),
                self.watched.watched()
            );
        }
    }

    /// Reads events until `stopped` hangs up or nobody listens to `tx` any more.
    fn run(mut self, mut inotify: Inotify, stopped: &UnixStream, tx: &Sender<Notice>) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let polled = net::poll_readable([Some(inotify.as_fd()), Some(stopped.as_fd())], None);
            // An error or hang-up without events fails too: a read would find nothing, again
            // and again.
            let failed = match polled {
                Ok(ready) if ready[1] != 0 => return,
                Ok([0, _]) => continue, // a signal ended the wait
                Ok([events, _]) if events & libc::POLLIN == 0 => Some(format!("poll {events:#x}")),
                Ok(_) => None,
                Err(e) => Some(e.to_string()),
            };
            if let Some(why) = failed {
                tracing::warn!("file change notifications failed ({why}): rescanning");
                let _ = tx.send(Notice::Overflow);
                return;
            }
            let mut notices = Vec::new();
            let mut new_dirs = Vec::new();
            match inotify.read_events(&mut buf) {
                Ok(events) => {
                    for event in events {
                        let wd = event.wd.get_watch_descriptor_id();
                        let step = self.watched.handle_event(wd, event.mask, event.name);
                        notices.extend(step.notices);
                        new_dirs.extend(step.watch);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    tracing::warn!("file change notifications failed ({e}): rescanning");
                    let _ = tx.send(Notice::Overflow);
                    return;
                }
            }
            // New directories are watched before their notices go out: whoever hears of one
            // hears of every change made in it after that.
            for dir in new_dirs {
                let whole = dir.as_os_str().is_empty();
                if !whole || self.last_walk.elapsed() >= REWALK_EVERY {
                    let _ = self.add_tree(dir);
                }
            }
            for notice in notices {
                if tx.send(notice).is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::{channel, Receiver};
    use std::time::Duration;

    fn changed(p: &str) -> Vec<Notice> {
        vec![Notice::Changed(PathBuf::from(p))]
    }

    #[test]
    fn events_name_paths_relative_to_the_tree() {
        let mut w = Watched::new(None);
        w.handle_added(1, PathBuf::new());
        w.handle_added(2, PathBuf::from("d"));
        let step = w.handle_event(2, EventMask::CLOSE_WRITE, Some(OsStr::new("a")));
        assert_eq!(step.notices, changed("d/a"));
        assert_eq!(step.watch, None);
        let gone = w.handle_event(1, EventMask::DELETE_SELF, None);
        assert_eq!(gone.notices, changed(""));
    }

    #[test]
    fn a_directory_that_appears_is_watched() {
        let mut w = Watched::new(None);
        w.handle_added(1, PathBuf::new());
        for how in [EventMask::CREATE, EventMask::MOVED_TO] {
            let step = w.handle_event(1, how | EventMask::ISDIR, Some(OsStr::new("n")));
            assert_eq!(step.notices, changed("n"));
            assert_eq!(step.watch, Some(PathBuf::from("n")));
        }
        let file = w.handle_event(1, EventMask::CREATE, Some(OsStr::new("f")));
        assert_eq!(file.watch, None);
        let left = w.handle_event(
            1,
            EventMask::MOVED_FROM | EventMask::ISDIR,
            Some(OsStr::new("n")),
        );
        assert_eq!((left.notices, left.watch), (changed("n"), None));
    }

    #[test]
    fn overflow_asks_for_a_rescan_and_a_new_watch_and_removed_watches_say_nothing() {
        let mut w = Watched::new(None);
        w.handle_added(1, PathBuf::from("d"));
        let over = w.handle_event(-1, EventMask::Q_OVERFLOW, None);
        assert_eq!(over.notices, vec![Notice::Overflow]);
        assert_eq!(
            over.watch,
            Some(PathBuf::new()),
            "the whole tree is watched again"
        );
        assert_eq!(w.handle_event(1, EventMask::IGNORED, None), Step::default());
        assert_eq!(w.watched(), 0);
        let late = w.handle_event(1, EventMask::MODIFY, Some(OsStr::new("a")));
        assert_eq!(late, Step::default());
    }

    #[test]
    fn a_single_file_tree_hears_only_of_its_file() {
        let mut w = Watched::new(Some(PathBuf::from("f")));
        w.handle_added(1, PathBuf::new());
        let other = w.handle_event(1, EventMask::MODIFY, Some(OsStr::new("other")));
        assert_eq!(other, Step::default());
        let dir = w.handle_event(
            1,
            EventMask::CREATE | EventMask::ISDIR,
            Some(OsStr::new("f")),
        );
        assert_eq!((dir.notices, dir.watch), (changed("f"), None));
        assert_eq!(
            w.handle_event(1, EventMask::DELETE_SELF, None).notices,
            changed("")
        );
    }

    fn next(rx: &Receiver<Notice>) -> Option<Notice> {
        rx.recv_timeout(Duration::from_secs(10)).ok()
    }

    /// Waits for the notice of `rel`, skipping others (a write also gives a modify).
    fn expect(rx: &Receiver<Notice>, rel: &str) {
        expect_before(rx, rel, None);
    }

    /// As [`expect`]; panics on a notice of `never` first.
    fn expect_before(rx: &Receiver<Notice>, rel: &str, never: Option<&str>) {
        let want = Notice::Changed(PathBuf::from(rel));
        let bad = never.map(|n| Notice::Changed(PathBuf::from(n)));
        while let Some(n) = next(rx) {
            assert!(Some(&n) != bad.as_ref(), "{never:?} is outside the tree");
            if n == want {
                return;
            }
        }
        panic!("no notice of {rel:?}");
    }

    /// Dropping the watcher ends its thread, which drops its sender.
    fn assert_stops(watcher: TreeWatcher, rx: &Receiver<Notice>) {
        drop(watcher);
        rx.try_iter().for_each(drop);
        let ended = rx.try_recv();
        assert_eq!(ended, Err(std::sync::mpsc::TryRecvError::Disconnected));
    }

    #[test]
    fn reading_the_tree_is_no_change_and_new_directories_are_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir_all(root.join("d/e")).unwrap();
        std::fs::write(root.join("d/e/a"), b"a").unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("link")).unwrap();
        let (tx, rx) = channel();
        let watcher = watch_dir(root, None, tx).unwrap();

        // The server's own reads are no change, and a symlink is not followed: the first
        // notice (inotify keeps events in order) is of the write after them.
        assert_eq!(std::fs::read(root.join("d/e/a")).unwrap(), b"a");
        std::fs::write(outside.path().join("x"), b"x").unwrap();
        std::fs::write(root.join("d/e/b"), b"b").unwrap();
        assert_eq!(next(&rx), Some(Notice::Changed("d/e/b".into())));

        std::fs::create_dir(root.join("n")).unwrap();
        expect(&rx, "n");
        std::fs::write(root.join("n/f"), b"f").unwrap();
        expect(&rx, "n/f");

        // A directory moved in is watched with everything below it.
        std::fs::create_dir_all(outside.path().join("m/deep")).unwrap();
        std::fs::rename(outside.path().join("m"), root.join("m")).unwrap();
        expect(&rx, "m");
        std::fs::write(root.join("m/deep/g"), b"g").unwrap();
        expect(&rx, "m/deep/g");

        assert_stops(watcher, &rx);
    }

    #[test]
    fn a_directory_moved_out_and_replaced_by_a_symlink_leads_nowhere() {
        let tmp = tempfile::tempdir().unwrap();
        let (root, away, target) = (
            tmp.path().join("t"),
            tmp.path().join("away"),
            tmp.path().join("etc"),
        );
        std::fs::create_dir_all(root.join("x")).unwrap();
        std::fs::create_dir_all(target.join("usr")).unwrap();
        let (tx, rx) = channel();
        let watcher = watch_dir(&root, None, tx).unwrap();

        // x leaves the tree with its watch; a symlink to a directory outside takes its place.
        std::fs::rename(root.join("x"), &away).unwrap();
        std::os::unix::fs::symlink(&target, root.join("x")).unwrap();
        expect(&rx, "x");
        // A directory made in the moved one is named x/usr by its stale watch: by path, that
        // is etc/usr through the symlink.
        std::fs::create_dir(away.join("usr")).unwrap();
        expect(&rx, "x/usr");
        std::fs::write(target.join("usr/f"), b"f").unwrap();
        std::fs::write(root.join("marker"), b"m").unwrap();
        expect_before(&rx, "marker", Some("x/usr/f"));

        assert_stops(watcher, &rx);
    }
}
