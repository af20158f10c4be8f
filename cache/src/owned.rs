//! [`Owned`]: the cache as its owning process sees it: the memory LRU, the object files and
//! the index, kept in step. Other processes reach it through [`Owned::serve`].
//!
//! Concurrency: reads (`get`, `contains`, `get_root`) take no lock except the short one around
//! the memory LRU. Everything that changes which objects exist, their pins or the totals holds
//! the `write` mutex (which owns the [`Totals`]); lock order is `write` before `hot`. Object
//! bytes are written to a temp file before taking `write`; only the rename happens under it.
//!
//! Invariants (under `write`): `Totals` is the sum over decodable index entries; an object file
//! is deleted before its entry, so an entry may lack a file (repaired on read) but a counted
//! file always has an entry unless an insert failed halfway (then the close is left unclean so
//! the next open adopts the file). Anything in the memory LRU is verified; it may outlive its
//! file briefly, which can only return correct bytes.

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use blake3::Hash;
use parking_lot::Mutex;
use tracing::{debug, warn};

use crate::index::{parse_lru_key, Entry, Index, Lookup, Totals};
use crate::memory::MemLru;
use crate::open::{open_index, write_clean_mark, Recovered};
use crate::shared::claims::Claims;
use crate::store::{discard, disk_size, make_private, Read, Store, TempObject};
use crate::{CacheConfig, CacheError, Status, Usage, Verified, VerifyReport};

/// Uses remembered in memory before they are written to the index.
pub(crate) const RECENCY_BATCH: usize = 4096;

/// Room kept free on the cache's file system for the index's log. sled gives up for good
/// after one failed write (every later write fails until the index is reopened), so object
/// files must never take the last bytes: four of its 512 KiB log segments stay free.
pub(crate) const INDEX_HEADROOM: u64 = 2 << 20;

/// How long, and how far above what an insert wants, an answer about free space is trusted
/// without asking the file system again ([`Owned::free_for`]).
const ROOM_TTL: Duration = Duration::from_secs(1);
const ROOM_SLACK: u64 = 1 << 30;

/// The file system's last answer about free space, and the cache's disk use then.
#[derive(Clone, Copy)]
struct RoomSeen {
    at: Instant,
    free: u64,
    disk_bytes: u64,
}

/// The cache of the process that owns the directory: it alone writes the index.
pub(crate) struct Owned {
    dir: PathBuf,
    quota: Option<u64>,
    pub(crate) store: Store,
    index: Index,
    write: Mutex<Totals>,
    /// Taken under `write` only.
    room: Mutex<Option<RoomSeen>>,
    hot: Mutex<Hot>,
    /// Set when an operation failed halfway; the close is then left unclean.
    damaged: AtomicBool,
    /// Objects being fetched by some process sharing the cache.
    pub(crate) claims: Claims,
    /// Dropped last, so the directory stays locked until the index is closed.
    _lock: File,
}
/// State touched on every read.
struct Hot {
    memory: MemLru,
    /// Last uses not yet written to the index.
    dirty: HashMap<Hash, u64>,
    /// The logical clock of uses.
    clock: u64,
}

impl Hot {
    fn next_use(&mut self) -> u64 {
        let now = self.clock;
        self.clock += 1;
        now
    }

    /// Records a use; true when the batch of unwritten uses is full.
    fn touch(&mut self, hash: &Hash) -> bool {
        let now = self.next_use();
        self.dirty.insert(*hash, now);
        self.dirty.len() >= RECENCY_BATCH
    }

    fn remember(&mut self, obj: &Verified) -> bool {
        self.memory.put(obj);
        self.touch(obj.hash())
    }
}

impl Owned {
    /// Opens (and if needed repairs) the index of a directory whose `lock` the caller holds.
    pub(crate) fn open(config: &CacheConfig, lock: File) -> Result<Owned, CacheError> {
        let store = Store::open(&config.dir)?;
        let Recovered {
            index,
            totals,
            clock,
        } = open_index(&config.dir, &store)?;
        // sled creates its files by the umask; the directory above already shuts others out.
        let _ = make_private(&config.dir.join("index"));
        let owned = Owned {
            dir: config.dir.clone(),
            quota: config.quota,
            store,
            index,
            write: Mutex::new(totals),
            room: Mutex::new(None),
            hot: Mutex::new(Hot {
                memory: MemLru::new(config.memory),
                dirty: HashMap::new(),
                clock,
            }),
            damaged: AtomicBool::new(false),
            claims: Claims::default(),
            _lock: lock,
        };
        owned.evict_over_quota(&mut owned.write.lock())?;
        Ok(owned)
    }

    /// The object, from memory or from its file (re-hashed). A damaged file is deleted, logged
    /// and reported as a miss.
    pub(crate) fn get(&self, hash: &Hash) -> Result<Option<Verified>, CacheError> {
        let inner = self;
        let hit = {
            let mut hot = inner.hot.lock();
            hot.memory.get(hash).map(|obj| (obj, hot.touch(hash)))
        };
        if let Some((obj, batch_full)) = hit {
            inner.persist_if(batch_full);
            return Ok(Some(obj));
        }
        match inner.index.lookup(hash)? {
            Lookup::Absent => return Ok(None),
            Lookup::Garbage(_) => return inner.repair(hash),
            Lookup::Found(_) => {}
        }
        match inner.store.read(hash)? {
            Read::Good(obj) => {
                let batch_full = inner.hot.lock().remember(&obj);
                inner.persist_if(batch_full);
                Ok(Some(obj))
            }
            Read::Missing | Read::Bad => inner.repair(hash),
        }
    }

    /// Whether the index lists the object (no file access).
    pub(crate) fn contains(&self, hash: &Hash) -> bool {
        matches!(self.index.contains(hash), Ok(true))
    }

    /// Starts reading the files of those objects that are on disk but not in memory, so that
    /// a later [`Cache::get`] finds them in the page cache. Reading object files one at a
    /// time keeps one request in flight, which on this kind of disk is about half of what
    /// it can give (0.6 against 1 GB/s with eight in flight); the kernel queues these
    /// together. It blocks on file opens: call it off any latency-sensitive thread.
    pub(crate) fn will_need(&self, hashes: &[Hash]) {
        for hash in hashes {
            // No index lookup: a file that is not there is simply not opened.
            if !self.hot.lock().memory.contains(hash) {
                self.store.will_need(hash);
            }
        }
    }

    /// Stores the object (a no-op if present), then evicts down to the quota.
    pub(crate) fn insert(&self, obj: &Verified) -> Result<(), CacheError> {
        if let Lookup::Found(_) = self.index.lookup(obj.hash())? {
            self.claims.stored(obj.hash());
            let batch_full = self.hot.lock().remember(obj);
            self.persist_if(batch_full);
            return Ok(());
        }
        self.keep_headroom(obj.len() as u64, &mut self.write.lock())?;
        let temp = match self.store.write_temp(obj) {
            // The file system is full (no quota, or other files filled it): evicting makes
            // room, and the object is kept after all.
            Err(e) if e.is_disk_full() => {
                self.make_room(obj.len() as u64)?;
                self.store.write_temp(obj)?
            }
            written => written?,
        };
        // Kept in memory before the eviction that may take its file (a huge object over the
        // quota): then eviction forgets it from memory too.
        self.hot.lock().memory.put(obj);
        self.adopt(temp, obj.hash())
    }

    /// Takes a client's fully written temp file `name` as the object `hash` (see
    /// [`crate::shared`]). The bytes are not hashed here: every read re-hashes them.
    pub(crate) fn commit_temp(&self, name: &str, hash: &Hash) -> Result<(), CacheError> {
        match self.store.temp_named(name)? {
            Some(temp) => self.adopt(temp, hash),
            // A client retrying a commit whose reply was lost with the previous owner: its
            // file may already be in place.
            None => self.adopt_in_place(hash),
        }
    }

    /// Renames a temp file into place as `hash` and indexes it, unless the object is there
    /// already; then evicts down to the quota.
    fn adopt(&self, temp: TempObject, hash: &Hash) -> Result<(), CacheError> {
        let mut totals = self.write.lock();
        if let Lookup::Found(_) = self.index.lookup(hash)? {
            discard(temp);
            self.claims.stored(hash);
            return Ok(());
        }
        let disk_size = temp.disk_size;
        self.store.commit(temp, hash)?;
        self.claims.stored(hash);
        self.index_new(hash, disk_size, &mut totals)?;
        self.evict_over_quota(&mut totals)?;
        // A client wrote the file without asking: give the index its room back.
        self.keep_headroom(0, &mut totals)
    }

    /// Indexes an object file already in place, if the index lacks it.
    fn adopt_in_place(&self, hash: &Hash) -> Result<(), CacheError> {
        let mut totals = self.write.lock();
        if let Lookup::Found(_) = self.index.lookup(hash)? {
            return Ok(());
        }
        let disk_size = self.store.disk_size_of(hash)?;
        self.index_new(hash, disk_size, &mut totals)?;
        self.evict_over_quota(&mut totals)
    }

    fn index_new(
        &self,
        hash: &Hash,
        disk_size: u64,
        totals: &mut Totals,
    ) -> Result<(), CacheError> {
        let last_use = self.hot.lock().next_use();
        let entry = Entry {
            disk_size,
            last_use,
            pinned: false,
        };
        if let Err(e) = self.index.add(hash, entry) {
            self.damaged.store(true, Ordering::Relaxed);
            return Err(e.into());
        }
        totals.add(&entry);
        Ok(())
    }

    /// Records uses of objects by another process (their order is approximate).
    pub(crate) fn touch_all(&self, hashes: &[Hash]) {
        let batch_full = {
            let mut hot = self.hot.lock();
            hashes.iter().fold(false, |full, h| hot.touch(h) | full)
        };
        self.persist_if(batch_full);
    }

    /// Re-reads an object another process found damaged, deleting it if it still is.
    pub(crate) fn check(&self, hash: &Hash) -> Result<(), CacheError> {
        self.hot.lock().memory.remove(hash);
        self.repair(hash).map(drop)
    }

    /// Protects a cached object from eviction until unpinned.
    pub(crate) fn pin(&self, hash: &Hash) -> Result<(), CacheError> {
        let inner = self;
        let mut totals = inner.write.lock();
        match inner.index.lookup(hash)? {
            Lookup::Found(entry) => inner.set_pinned(hash, entry, true, &mut totals),
            Lookup::Absent | Lookup::Garbage(_) => Err(CacheError::NotCached {
                hash: *hash,
                dir: inner.dir.clone(),
            }),
        }
    }

    /// Makes the object evictable again (a no-op if absent or not pinned).
    pub(crate) fn unpin(&self, hash: &Hash) -> Result<(), CacheError> {
        let inner = self;
        let mut totals = inner.write.lock();
        if let Lookup::Found(entry) = inner.index.lookup(hash)? {
            inner.set_pinned(hash, entry, false, &mut totals)?;
        }
        inner.evict_over_quota(&mut totals)
    }

    /// Unpins every object.
    pub(crate) fn unpin_all(&self) -> Result<(), CacheError> {
        let inner = self;
        let mut totals = inner.write.lock();
        let mut pinned = Vec::new();
        for item in inner.index.entries() {
            let (key, value) = item?;
            let entry = Entry::decode(&value).filter(|e| e.pinned);
            if let (Some(hash), Some(entry)) = (crate::index::parse_hash(&key), entry) {
                pinned.push((hash, entry));
            }
        }
        for (hash, entry) in pinned {
            inner.set_pinned(&hash, entry, false, &mut totals)?;
        }
        inner.evict_over_quota(&mut totals)
    }

    /// Remembers the last root record seen on a channel.
    pub(crate) fn set_root(&self, channel: &[u8; 32], record: &[u8]) -> Result<(), CacheError> {
        Ok(self.index.set_root(channel, record)?)
    }

    /// The last root record remembered for a channel.
    pub(crate) fn get_root(&self, channel: &[u8; 32]) -> Result<Option<Vec<u8>>, CacheError> {
        Ok(self.index.get_root(channel)?)
    }

    /// Remembers the publisher first trusted on a channel (an opaque identity).
    pub(crate) fn set_publisher(
        &self,
        channel: &[u8; 32],
        identity: &[u8],
    ) -> Result<(), CacheError> {
        Ok(self.index.set_publisher(channel, identity)?)
    }

    /// The publisher remembered for a channel.
    pub(crate) fn get_publisher(&self, channel: &[u8; 32]) -> Result<Option<Vec<u8>>, CacheError> {
        Ok(self.index.get_publisher(channel)?)
    }

    /// What the cache holds on disk.
    pub(crate) fn usage(&self) -> Usage {
        let totals = *self.write.lock();
        Usage {
            objects: totals.objects,
            disk_bytes: totals.disk_bytes,
            pinned_bytes: totals.pinned_bytes,
        }
    }

    /// Usage, quota and remembered root records.
    pub(crate) fn status(&self) -> Result<Status, CacheError> {
        Ok(Status {
            usage: self.usage(),
            quota: self.quota,
            roots: self.index.roots()?,
        })
    }

    /// Evicts least recently used unpinned objects until disk use is at most `limit`, and
    /// removes the temp files of processes that are gone. Returns what is left.
    pub(crate) fn evict_to(&self, limit: u64) -> Result<Usage, CacheError> {
        {
            let mut totals = self.write.lock();
            self.evict_down_to(limit, &mut totals)?;
            self.index.flush()?;
        }
        self.store.clear_tmp()?;
        Ok(self.usage())
    }

    /// Deletes every object (with `keep_pinned`, every unpinned one), and object files the
    /// index does not list. Root records and trusted publishers stay: they are trust state
    /// (rollback and first-use checks), not content. Returns what is left.
    pub(crate) fn clear(&self, keep_pinned: bool) -> Result<Usage, CacheError> {
        let mut totals = self.write.lock();
        let mut doomed = Vec::new();
        for item in self.index.entries() {
            let (key, value) = item?;
            match (crate::index::parse_hash(&key), Entry::decode(&value)) {
                (Some(hash), Some(entry)) if !(keep_pinned && entry.pinned) => {
                    doomed.push((hash, entry))
                }
                (Some(_), Some(_)) => {}
                (hash, _) => {
                    if let Some(hash) = hash {
                        self.store.remove(&hash)?;
                    }
                    self.index.remove_raw_entry(&key)?;
                }
            }
        }
        for (hash, entry) in doomed {
            self.remove_object(&hash, entry, &mut totals)?;
        }
        // Files no entry names (an insert that failed halfway) are nobody's.
        self.store.scan(|hash, _| match self.index.lookup(&hash)? {
            Lookup::Absent => self.store.remove(&hash),
            _ => Ok(()),
        })?;
        if !keep_pinned {
            // Only stale keys can be left: every entry is gone.
            self.index.clear_lru()?;
        }
        self.index.flush()?;
        drop(totals);
        self.store.clear_tmp()?;
        Ok(self.usage())
    }

    /// Re-hashes every object file against its name: deletes those that fail (file, then
    /// entry), indexes good files the index lacks, and drops entries without a file.
    /// `progress` is called with the length of each file read. The files are read without
    /// the `write` lock; each repair takes it and looks again.
    pub(crate) fn verify(&self, progress: &mut dyn FnMut(u64)) -> Result<VerifyReport, CacheError> {
        let mut report = VerifyReport::default();
        self.store.scan(|hash, meta| {
            report.checked += 1;
            report.checked_bytes += meta.len();
            progress(meta.len());
            match self.store.read(&hash)? {
                Read::Good(_) => report.adopted += u64::from(self.adopt_checked(&hash, meta)?),
                Read::Bad => {
                    if self.drop_damaged(&hash)? {
                        report.dropped += 1;
                        report.dropped_bytes += disk_size(meta);
                    }
                }
                Read::Missing => {}
            }
            Ok(())
        })?;
        report.forgotten = self.forget_fileless()?;
        self.index.flush()?;
        Ok(report)
    }

    /// Indexes a verified file the index lacks; true if it did.
    fn adopt_checked(&self, hash: &Hash, meta: &std::fs::Metadata) -> Result<bool, CacheError> {
        let mut totals = self.write.lock();
        // An undecodable entry is replaced: the file it names is good.
        if let Lookup::Found(_) = self.index.lookup(hash)? {
            return Ok(false);
        }
        self.index_new(hash, disk_size(meta), &mut totals)?;
        Ok(true)
    }

    /// Deletes an object file found damaged, and its entry, if it still is damaged under
    /// `write` (another process may have replaced it meanwhile); true if it was.
    fn drop_damaged(&self, hash: &Hash) -> Result<bool, CacheError> {
        let mut totals = self.write.lock();
        if !matches!(self.store.read(hash)?, Read::Bad) {
            return Ok(false);
        }
        warn!(
            path = %self.store.path(hash).display(),
            "object file does not match its hash; deleted it, it will be fetched again"
        );
        match self.index.lookup(hash)? {
            Lookup::Found(entry) => self.remove_object(hash, entry, &mut totals)?,
            Lookup::Garbage(raw) => {
                self.store.remove(hash)?;
                self.index.remove_garbage(hash, raw)?;
            }
            Lookup::Absent => self.store.remove(hash)?,
        }
        Ok(true)
    }

    /// Drops index entries whose file is gone, and undecodable ones; returns how many.
    fn forget_fileless(&self) -> Result<u64, CacheError> {
        let mut totals = self.write.lock();
        let mut stale = Vec::new();
        for item in self.index.entries() {
            let (key, value) = item?;
            match (crate::index::parse_hash(&key), Entry::decode(&value)) {
                (Some(hash), Some(entry)) if !self.store.exists(&hash) => {
                    stale.push((key, Some((hash, entry))))
                }
                (Some(_), Some(_)) => {}
                _ => stale.push((key, None)),
            }
        }
        for (key, found) in &stale {
            match found {
                Some((hash, entry)) => self.remove_object(hash, *entry, &mut totals)?,
                None => {
                    if let Some(hash) = crate::index::parse_hash(key) {
                        self.store.remove(&hash)?;
                    }
                    self.index.remove_raw_entry(key)?;
                }
            }
        }
        Ok(stale.len() as u64)
    }

    /// Bytes of objects held in the memory LRU.
    pub(crate) fn memory_bytes(&self) -> usize {
        self.hot.lock().memory.bytes()
    }

    /// Writes remembered uses and the index to disk.
    pub(crate) fn flush(&self) -> Result<(), CacheError> {
        let inner = self;
        let mut totals = inner.write.lock();
        inner.persist_recency(&mut totals)?;
        Ok(inner.index.flush()?)
    }

    #[cfg(test)]
    pub(crate) fn index(&self) -> &Index {
        &self.index
    }

    /// Leaves the next close unclean, as after a crash.
    #[cfg(test)]
    pub(crate) fn mark_damaged(&self) {
        self.damaged.store(true, Ordering::Relaxed);
    }
}

impl Owned {
    /// Writes the remembered uses to the index if the batch is full; failures only cost
    /// recency, so they are logged.
    fn persist_if(&self, batch_full: bool) {
        if batch_full {
            if let Err(e) = self.persist_recency(&mut self.write.lock()) {
                warn!(dir = %self.dir.display(), error = %e, "could not record object uses");
            }
        }
    }

    /// Writes the remembered uses to the index. `_totals` proves `write` is held.
    fn persist_recency(&self, _totals: &mut Totals) -> Result<(), CacheError> {
        let dirty = std::mem::take(&mut self.hot.lock().dirty);
        for (hash, last_use) in dirty {
            if let Lookup::Found(entry) = self.index.lookup(&hash)? {
                if entry.last_use < last_use {
                    self.index.touch(&hash, entry, last_use)?;
                }
            }
        }
        Ok(())
    }

    fn set_pinned(
        &self,
        hash: &Hash,
        entry: Entry,
        pinned: bool,
        totals: &mut Totals,
    ) -> Result<(), CacheError> {
        if entry.pinned == pinned {
            return Ok(());
        }
        self.index.set_pinned(hash, entry, pinned)?;
        totals.sub(&entry);
        totals.add(&Entry { pinned, ..entry });
        Ok(())
    }

    /// Evicts least recently used unpinned objects until disk use is within the quota.
    fn evict_over_quota(&self, totals: &mut Totals) -> Result<(), CacheError> {
        match self.quota {
            Some(quota) => self.evict_down_to(quota, totals),
            None => Ok(()),
        }
    }

    /// After the file system said it is full: evicts least recently used unpinned objects
    /// for `needed` bytes, and at least an eighth of what the cache holds, so that the next
    /// inserts do not each meet a full disk again.
    pub(crate) fn make_room(&self, needed: u64) -> Result<(), CacheError> {
        let mut totals = self.write.lock();
        debug!(
            used = totals.disk_bytes,
            needed, "the cache's file system is full: evicting to make room"
        );
        self.evict_down_to(room_limit(&totals, needed), &mut totals)
    }

    /// Evicts until the file system has room for `bytes` more and [`INDEX_HEADROOM`] besides.
    /// Fails, storing nothing, when what is left is pinned or not the cache's.
    fn keep_headroom(&self, bytes: u64, totals: &mut Totals) -> Result<(), CacheError> {
        let want = bytes.saturating_add(INDEX_HEADROOM);
        let Some(free) = self.free_for(want, totals).filter(|&f| f < want) else {
            return Ok(());
        };
        debug!(
            used = totals.disk_bytes,
            free, "the cache's file system is nearly full: evicting to keep room for the index"
        );
        self.evict_down_to(room_limit(totals, want - free), totals)?;
        match self.store.free_bytes() {
            Some(free) if free < want => Err(CacheError::NoRoom {
                dir: self.dir.clone(),
                free,
                want,
            }),
            _ => Ok(()),
        }
    }

    /// Free bytes on the cache's file system, as far as an insert that wants `want` needs to
    /// know: the last answer, less what the cache has grown since, while that is recent and
    /// at least [`ROOM_SLACK`] above `want`; else the file system's own. Asking on every
    /// insert (twice) was a twenty-fifth of a copy's CPU time on a tree of small files. Near
    /// a full disk every insert still asks, and another writer would have to fill a GiB
    /// within a second to catch the index short.
    fn free_for(&self, want: u64, totals: &Totals) -> Option<u64> {
        let now = Instant::now();
        let mut seen = self.room.lock();
        if let Some(s) = *seen {
            let left = s
                .free
                .saturating_sub(totals.disk_bytes.saturating_sub(s.disk_bytes));
            if now.saturating_duration_since(s.at) < ROOM_TTL
                && left >= want.saturating_add(ROOM_SLACK)
            {
                return Some(left);
            }
        }
        let free = self.store.free_bytes();
        *seen = free.map(|free| RoomSeen {
            at: now,
            free,
            disk_bytes: totals.disk_bytes,
        });
        free
    }

    /// Evicts least recently used unpinned objects until disk use is at most `limit`.
    fn evict_down_to(&self, limit: u64, totals: &mut Totals) -> Result<(), CacheError> {
        if totals.disk_bytes <= limit {
            return Ok(());
        }
        // Recency only orders the candidates; it must not stop an eviction that makes the
        // room the index needs to write it.
        if let Err(e) = self.persist_recency(totals) {
            debug!(error = %e, "evicting without the latest object uses");
        }
        for key in self.index.lru_keys() {
            if totals.disk_bytes <= limit {
                return Ok(());
            }
            self.evict_key(&key?, totals)?;
        }
        if totals.disk_bytes > limit {
            debug!(
                limit,
                used = totals.disk_bytes,
                "cache over its limit: the rest is pinned"
            );
        }
        Ok(())
    }

    /// Evicts the object of one `lru` key, or drops the key if it is stale.
    fn evict_key(&self, key: &[u8], totals: &mut Totals) -> Result<(), CacheError> {
        if let Some((last_use, hash)) = parse_lru_key(key) {
            if let Lookup::Found(e) = self.index.lookup(&hash)? {
                if !e.pinned && e.last_use == last_use {
                    return self.remove_object(&hash, e, totals);
                }
            }
        }
        // Left behind by a crash: its entry is gone, pinned, or has moved on.
        Ok(self.index.remove_lru_key(key)?)
    }

    /// Deletes an object: file first, then entry, then memory.
    fn remove_object(
        &self,
        hash: &Hash,
        entry: Entry,
        totals: &mut Totals,
    ) -> Result<(), CacheError> {
        self.store.remove(hash)?;
        self.index.remove(hash, entry)?;
        totals.sub(&entry);
        let mut hot = self.hot.lock();
        hot.memory.remove(hash);
        hot.dirty.remove(hash);
        Ok(())
    }

    /// Looks again, under `write`, at an object whose file or entry looked bad, and deletes
    /// it if it still does.
    fn repair(&self, hash: &Hash) -> Result<Option<Verified>, CacheError> {
        let mut totals = self.write.lock();
        let path = self.store.path(hash);
        let entry = match self.index.lookup(hash)? {
            Lookup::Absent => return Ok(None),
            Lookup::Found(entry) => entry,
            Lookup::Garbage(raw) => {
                warn!(path = %path.display(), "undecodable cache index entry; deleting the object");
                self.store.remove(hash)?;
                self.index.remove_garbage(hash, raw)?;
                return Ok(None);
            }
        };
        match self.store.read(hash)? {
            Read::Good(obj) => {
                self.hot.lock().remember(&obj);
                return Ok(Some(obj));
            }
            Read::Missing => warn!(path = %path.display(), "object file vanished; forgetting it"),
            Read::Bad => warn!(
                path = %path.display(),
                "object file does not match its hash; deleted it, it will be fetched again"
            ),
        }
        self.remove_object(hash, entry, &mut totals)?;
        Ok(None)
    }
}

/// The disk use to evict down to for `needed` bytes of room: at least an eighth of the
/// cache goes, so that the next inserts do not each find the disk full again.
fn room_limit(totals: &Totals, needed: u64) -> u64 {
    let room = needed.max(totals.disk_bytes / 8);
    totals.disk_bytes.saturating_sub(room)
}

impl Drop for Owned {
    fn drop(&mut self) {
        let closed = (|| -> Result<(), CacheError> {
            let mut totals = self.write.lock();
            self.persist_recency(&mut totals)?;
            self.index.flush()?;
            if self.damaged.load(Ordering::Relaxed) {
                return Ok(());
            }
            write_clean_mark(&self.dir, &totals)
        })();
        if let Err(e) = closed {
            warn!(
                dir = %self.dir.display(),
                error = %e,
                "could not close the cache index cleanly; it will be checked at next open"
            );
        }
    }
}
