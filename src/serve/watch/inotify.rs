//! The notification shell: the `notify` crate's inotify watcher on the served tree, its events
//! turned into [`Notice`]s for the publish loop.
//!
//! The watch is recursive on the directory the tree was opened at (the one held open, by the
//! path it had then; see `index/beneath.rs`), never following symlinks, so that a symlink in
//! the tree cannot add watches outside it. inotify itself watches by path, so a user who
//! swaps a directory for a symlink just as the watcher adds a watch for it can make it watch
//! a directory outside the tree. That is harmless: notifications only say *that* something
//! changed, and what is published is always what a fresh walk by descriptor finds, so a
//! notification with a stale or misleading path costs at most a reindex that publishes
//! nothing new.
//!
//! Filtering, because the server itself is a reader of the tree: inotify reports every open
//! (`IN_OPEN`, from the indexer and the sender), and those would make each reindex schedule
//! the next. Only creations, removals, renames, writes, attribute changes and closes after
//! writing are changes. An overflow (`IN_Q_OVERFLOW`) or a watcher error is a [`Notice::Overflow`]:
//! rescan. A tree too large for `fs.inotify.max_user_watches` is watched in part, with a
//! warning; the periodic rescan finds the rest.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;

use notify::event::{AccessKind, AccessMode};
use notify::{Config, Event, EventKind, INotifyWatcher, RecursiveMode, Watcher};

use super::Notice;
use crate::serve::index::Tree;

/// A running watcher; dropping it stops the notifications.
pub struct TreeWatcher {
    _watcher: INotifyWatcher,
}

/// Watches `tree` and sends what changed to `tx`. Fails only if inotify cannot be had at
/// all; a partial watch is logged and kept.
pub fn watch(tree: &Tree, tx: Sender<Notice>) -> notify::Result<TreeWatcher> {
    let root = tree.dir_path().to_path_buf();
    let only = tree
        .single_file()
        .map(|(name, _)| PathBuf::from(std::ffi::OsStr::from_bytes(name.to_bytes())));
    let mode = match only {
        Some(_) => RecursiveMode::NonRecursive,
        None => RecursiveMode::Recursive,
    };
    let prefix = root.clone();
    let handler = move |event: notify::Result<Event>| {
        for notice in notices(&prefix, only.as_deref(), event) {
            let _ = tx.send(notice);
        }
    };
    let config = Config::default().with_follow_symlinks(false);
    let mut watcher = INotifyWatcher::new(handler, config)?;
    if let Err(e) = watcher.watch(&root, mode) {
        if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) {
            tracing::warn!(
                "cannot watch every directory of {}: fs.inotify.max_user_watches is too low; \
                 raise it, or rely on the periodic rescan (--rescan)",
                root.display()
            );
        } else {
            return Err(e);
        }
    }
    Ok(TreeWatcher { _watcher: watcher })
}

/// The notices one event gives: the changed paths relative to `root`, keeping only `only`
/// when the tree is a single file.
fn notices(root: &Path, only: Option<&Path>, event: notify::Result<Event>) -> Vec<Notice> {
    let event = match event {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!("file change notifications failed ({e}): rescanning");
            return vec![Notice::Overflow];
        }
    };
    if event.need_rescan() {
        return vec![Notice::Overflow];
    }
    if !is_change(&event.kind) {
        return Vec::new();
    }
    event
        .paths
        .iter()
        .map(|p| {
            p.strip_prefix(root)
                .map_or_else(|_| PathBuf::new(), Path::to_path_buf)
        })
        .filter(|rel| only.is_none_or(|f| rel.starts_with(f) || rel.as_os_str().is_empty()))
        .map(Notice::Changed)
        .collect()
}

/// Whether an event kind can change what is published: anything but accesses, except a
/// close after writing.
fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Other => false,
        EventKind::Any | EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, Flag, ModifyKind, RenameMode};

    fn event(kind: EventKind, paths: &[&str]) -> notify::Result<Event> {
        let mut e = Event::new(kind);
        for p in paths {
            e = e.add_path(PathBuf::from(p));
        }
        Ok(e)
    }

    fn changed(paths: &[&str]) -> Vec<Notice> {
        paths
            .iter()
            .map(|p| Notice::Changed(PathBuf::from(p)))
            .collect()
    }

    #[test]
    fn opens_by_the_server_itself_are_no_change() {
        let root = Path::new("/srv/t");
        let open = EventKind::Access(AccessKind::Open(AccessMode::Read));
        assert!(notices(root, None, event(open, &["/srv/t/a"])).is_empty());
        let close = EventKind::Access(AccessKind::Close(AccessMode::Read));
        assert!(notices(root, None, event(close, &["/srv/t/a"])).is_empty());
        let written = EventKind::Access(AccessKind::Close(AccessMode::Write));
        assert_eq!(
            notices(root, None, event(written, &["/srv/t/a"])),
            changed(&["a"])
        );
    }

    #[test]
    fn paths_become_relative_and_renames_name_both_ends() {
        let root = Path::new("/srv/t");
        let rename = EventKind::Modify(ModifyKind::Name(RenameMode::Both));
        let got = notices(root, None, event(rename, &["/srv/t/d/a", "/srv/t/b"]));
        assert_eq!(got, changed(&["d/a", "b"]));
        let gone = EventKind::Remove(notify::event::RemoveKind::Folder);
        assert_eq!(
            notices(root, None, event(gone, &["/srv/t"])),
            changed(&[""])
        );
        let odd = EventKind::Create(CreateKind::File);
        assert_eq!(
            notices(root, None, event(odd, &["/elsewhere"])),
            changed(&[""])
        );
    }

    #[test]
    fn overflow_and_errors_ask_for_a_rescan() {
        let root = Path::new("/srv/t");
        let overflow = Ok(Event::new(EventKind::Other).set_flag(Flag::Rescan));
        assert_eq!(notices(root, None, overflow), vec![Notice::Overflow]);
        let error = Err(notify::Error::generic("boom"));
        assert_eq!(notices(root, None, error), vec![Notice::Overflow]);
    }

    #[test]
    fn a_single_file_tree_hears_only_of_its_file() {
        let root = Path::new("/srv");
        let only = Some(Path::new("f"));
        let modify = EventKind::Modify(ModifyKind::Any);
        assert!(notices(root, only, event(modify, &["/srv/other"])).is_empty());
        assert_eq!(
            notices(root, only, event(modify, &["/srv/f"])),
            changed(&["f"])
        );
    }
}
