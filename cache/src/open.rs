//! Opening a cache directory: the process lock, the index, and recovery.
//!
//! Invariants:
//! - `DIR/lock` is held with `flock(LOCK_EX)` by the process that owns the directory, for as
//!   long as it owns it, and holds its pid; only that process opens the index (the others
//!   are its clients, see [`crate::shared`]).
//! - The index is disposable. If sled cannot open or read it (error or panic), it is deleted
//!   and rebuilt by scanning `objects/`, hashing every file and deleting mismatches; root
//!   records and pins are lost, and a warning says so. A lock conflict or a full disk is
//!   never treated as damage: the open fails instead, and the index stays.
//! - An orderly close writes `DIR/clean` with the totals of the index, after flushing sled;
//!   open removes it. If it is missing or disagrees with the entries (a crash, or sled
//!   recovering only a prefix of its log), the index is reconciled with the files: the `lru`
//!   tree is rebuilt, entries whose file is gone are dropped, and files missing from the index
//!   are hashed and adopted. Otherwise only the entries are summed.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::thread;
use std::time::Duration;

use tracing::{info, warn};

use crate::error::{CacheError, IoContext};
use crate::index::{parse_hash, Entry, Index, Lookup, Totals};
use crate::store::{disk_size, Read, Store};

/// An open index and what was learned while opening it.
pub(crate) struct Recovered {
    pub(crate) index: Index,
    pub(crate) totals: Totals,
    /// The next value of the logical use clock.
    pub(crate) clock: u64,
}

/// Takes the exclusive lock of the cache directory if it is free, and writes our pid into it
/// (for messages of the processes that find it taken); the lock lasts as long as the file.
/// `None`: another process owns the directory.
pub(crate) fn try_lock_dir(dir: &Path) -> Result<Option<File>, CacheError> {
    let path = dir.join("lock");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(0o600)
        .open(&path)
        .at(&path)?;
    // SAFETY: flock takes a file descriptor, which `file` owns and keeps open; no memory is
    // shared with the kernel.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Ok(None);
        }
        return Err(CacheError::io(&path, err));
    }
    let pid = format!("{}\n", std::process::id());
    file.set_len(0)
        .and_then(|()| file.write_all_at(pid.as_bytes(), 0))
        .at(&path)?;
    Ok(Some(file))
}

/// Name of the clean-close mark in the cache directory.
const CLEAN_MARK: &str = "clean";

/// Why one attempt to open the index failed.
enum Failure {
    /// sled's own lock is held (a cache of this process just closed and its threads have
    /// not yet let go): not damage.
    Locked,
    /// Anything else sled complained (or panicked) about.
    Broken(String),
    /// The object files could not be read, or the disk is full: rebuilding the index would
    /// not help.
    Fatal(CacheError),
}

/// Opens the index at `DIR/index`, rebuilding it if it is damaged.
pub(crate) fn open_index(dir: &Path, store: &Store) -> Result<Recovered, CacheError> {
    let path = dir.join("index");
    let mark = take_clean_mark(dir)?;
    let why = match attempt(&path, store, mark) {
        Ok(recovered) => {
            warn_lost_pins(mark, &recovered.totals);
            return Ok(recovered);
        }
        Err(Failure::Broken(why)) => why,
        Err(failure) => return Err(fatal(dir, &path, failure)),
    };
    warn!(
        path = %path.display(),
        error = %why,
        "cache index is damaged; rebuilding it from the object files (root records and pins \
         are lost: objects pinned by `lcfs prefetch --pin` can be evicted until pinned again)"
    );
    remove_index(&path)?;
    attempt(&path, store, None).map_err(|failure| fatal(dir, &path, failure))
}

/// Pins live only in the index, and objects adopted from their files come back unpinned: when
/// the last orderly close counted more pinned bytes than the index now holds (it was deleted,
/// or lost its last writes), the user who pinned them is told, since they can now be evicted.
fn warn_lost_pins(mark: Option<Totals>, now: &Totals) {
    let Some(mark) = mark.filter(|m| m.pinned_bytes > now.pinned_bytes) else {
        return;
    };
    warn!(
        lost_bytes = mark.pinned_bytes - now.pinned_bytes,
        "the cache index lost pins (it was deleted or damaged since the last close): objects \
         pinned by `lcfs prefetch --pin` can be evicted until pinned again"
    );
}

fn fatal(dir: &Path, path: &Path, failure: Failure) -> CacheError {
    match failure {
        Failure::Locked => CacheError::io(
            path,
            io::Error::other(format!(
                "the index is still held by another cache of this process ({})",
                dir.display()
            )),
        ),
        Failure::Broken(why) => CacheError::io(path, io::Error::other(why)),
        Failure::Fatal(e) => e,
    }
}

fn remove_index(path: &Path) -> Result<(), CacheError> {
    let removed = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match removed {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(CacheError::io(path, e)),
        _ => Ok(()),
    }
}

/// Opens and loads the index once, turning sled errors and panics into [`Failure`]s.
fn attempt(path: &Path, store: &Store, mark: Option<Totals>) -> Result<Recovered, Failure> {
    let result = panic::catch_unwind(AssertUnwindSafe(|| {
        let index = open_waiting(path)?;
        load(index, store, mark)
    }));
    match result {
        Ok(Ok(recovered)) => Ok(recovered),
        Ok(Err(CacheError::Index(e))) if is_lock_error(&e) => Err(Failure::Locked),
        // Not damage: deleting the index would throw its root records and pins away for a
        // disk that is merely full.
        Ok(Err(CacheError::IndexFull(sled::Error::Io(e)))) => {
            Err(Failure::Fatal(CacheError::io(path, e)))
        }
        Ok(Err(CacheError::Index(e))) => Err(Failure::Broken(e.to_string())),
        Ok(Err(e)) => Err(Failure::Fatal(e)),
        Err(panic) => Err(Failure::Broken(panic_message(&panic))),
    }
}

/// Opens sled, waiting a little if its lock is held: since we hold the directory lock, the
/// holder can only be a just-closed cache of this process whose sled threads are still exiting.
fn open_waiting(path: &Path) -> Result<Index, CacheError> {
    let mut tries = 0;
    loop {
        match Index::open(path) {
            Err(e) if is_lock_error(&e) && tries < 50 => {
                tries += 1;
                thread::sleep(Duration::from_millis(40));
            }
            other => return Ok(other?),
        }
    }
}

fn is_lock_error(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    let text = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied());
    format!("sled panicked: {}", text.unwrap_or("(no message)"))
}

/// Sums the entries, reconciling with the files if they disagree with the clean mark.
fn load(index: Index, store: &Store, mark: Option<Totals>) -> Result<Recovered, CacheError> {
    let mut r = Recovered {
        index,
        totals: Totals::default(),
        clock: 0,
    };
    let dropped = sum_entries(&mut r, store, false)?;
    // A brand-new cache has no mark and nothing to check.
    let fresh = mark.is_none() && r.totals == Totals::default() && store.is_empty();
    if !fresh && (dropped > 0 || mark != Some(r.totals)) {
        info!("cache was not closed cleanly; checking the index against the object files");
        r.totals = Totals::default();
        r.index.clear_lru()?;
        sum_entries(&mut r, store, true)?;
        adopt_orphans(&mut r, store)?;
        r.index.flush()?;
    }
    let newest = r.index.newest_lru_use()?.unwrap_or(0);
    r.clock = r.clock.max(newest.saturating_add(1));
    Ok(r)
}

/// Reads and removes `DIR/clean`; `None` if it is missing or garbage.
fn take_clean_mark(dir: &Path) -> Result<Option<Totals>, CacheError> {
    let path = dir.join(CLEAN_MARK);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(_) => String::new(),
    };
    fs::remove_file(&path).at(&path)?;
    let mut numbers = text.split_whitespace().map(|n| n.parse::<u64>().ok());
    let mut next = || numbers.next().flatten();
    Ok(match (next(), next(), next()) {
        (Some(objects), Some(disk_bytes), Some(pinned_bytes)) => Some(Totals {
            objects,
            disk_bytes,
            pinned_bytes,
        }),
        _ => None,
    })
}

/// Writes `DIR/clean` after an orderly close of the index.
pub(crate) fn write_clean_mark(dir: &Path, totals: &Totals) -> Result<(), CacheError> {
    let path = dir.join(CLEAN_MARK);
    let text = format!(
        "{} {} {}\n",
        totals.objects, totals.disk_bytes, totals.pinned_bytes
    );
    fs::write(&path, text).at(&path)
}

/// Adds up all entries, dropping garbage; with `check_files`, also drops entries without a
/// file and re-adds the `lru` keys of the rest. Returns how many garbage entries were dropped.
fn sum_entries(r: &mut Recovered, store: &Store, check_files: bool) -> Result<u64, CacheError> {
    let mut dropped = 0;
    for item in r.index.entries() {
        let (key, value) = item?;
        let hash = parse_hash(&key);
        let entry = Entry::decode(&value);
        let (Some(hash), Some(entry)) = (hash, entry) else {
            warn!("dropping an undecodable cache index entry");
            r.index.remove_raw_entry(&key)?;
            dropped += 1;
            continue;
        };
        if check_files && !store.path(&hash).is_file() {
            r.index.remove(&hash, entry)?;
            continue;
        }
        if check_files && !entry.pinned {
            r.index.add_lru(&hash, entry.last_use)?;
        }
        r.totals.add(&entry);
        r.clock = r.clock.max(entry.last_use.saturating_add(1));
    }
    Ok(dropped)
}

/// Indexes object files the index does not know, after checking their hash.
fn adopt_orphans(r: &mut Recovered, store: &Store) -> Result<(), CacheError> {
    let mut adopted = 0u64;
    store.scan(|hash, meta| {
        if let Lookup::Found(_) = r.index.lookup(&hash)? {
            return Ok(());
        }
        match store.read(&hash)? {
            Read::Good(_) => {
                let entry = Entry {
                    disk_size: disk_size(meta),
                    last_use: r.clock,
                    pinned: false,
                };
                r.clock += 1;
                r.index.add(&hash, entry)?;
                r.totals.add(&entry);
                adopted += 1;
            }
            Read::Bad => {
                warn!(path = %store.path(&hash).display(), "deleting damaged object file");
                store.remove(&hash)?;
            }
            Read::Missing => {}
        }
        Ok(())
    })?;
    if adopted > 0 {
        info!(adopted, "indexed object files missing from the cache index");
    }
    Ok(())
}
