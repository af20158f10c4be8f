//! [`Cache`]: one handle, whichever role this process has in the cache directory: the owner
//! (it holds the lock and the index, [`Owned`]) or a client of the owner ([`crate::shared`]).
//!
//! Invariants: the role changes only under the `role` write lock, and only after a request
//! found the owner gone (then this process takes the lock or connects to whoever took it);
//! `epoch` counts those changes, so threads that saw the same dead owner recover once. A
//! client reads object files itself and never returns unverified bytes; everything that
//! changes the index goes to the owner.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blake3::Hash;
use parking_lot::{Mutex, RwLock};
use tracing::{debug, info, warn};

use crate::memory::MemLru;
use crate::open::try_lock_dir;
use crate::owned::Owned;
use crate::shared::claims::OWNER;
use crate::shared::client::{CallError, Client, ConnectError};
use crate::shared::server::Service;
use crate::shared::wire::{Reply, Request, MAX_COMMIT, MAX_TOUCHED};
use crate::shared::{owner_pid, SockAddr};
use crate::store::{create_private_dir, discard, make_private, Read, Store, TempObject};
use crate::{CacheConfig, CacheError, Status, Usage, Verified, VerifyReport};

/// How long an open waits for an owner that holds the lock but does not answer yet (it may be
/// checking its index after a crash).
const OWNER_WAIT: Duration = Duration::from_secs(60);

/// How long requests fail at once after the owner did not answer in time.
const SILENT_BACKOFF: Duration = Duration::from_secs(10);

/// Uses a client remembers before telling the owner.
const TOUCH_BATCH: usize = 1024;

/// A verified object cache in one directory, shared with every other lcfs process of this
/// user that opened it. Cloning shares it.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Shared>,
}

struct Shared {
    config: CacheConfig,
    addr: SockAddr,
    role: RwLock<Role>,
    epoch: AtomicU64,
    /// The object files, read directly in the client role.
    store: Store,
    /// A client's memory LRU and uses not yet told to the owner.
    hot: Mutex<ClientHot>,
    /// Fetch claims this process holds as a client (see [`Cache::claim_fetch`]).
    claimed: Mutex<HashSet<Hash>>,
    /// After the owner failed to answer in time, requests fail at once until then, so that
    /// a stopped owner costs this process one wait, not one per request.
    silent_until: Mutex<Option<Instant>>,
}

enum Role {
    Owner(Owner),
    Client(Mutex<Client>),
}

/// The service is dropped before the cache it serves, so that no client thread outlives it.
struct Owner {
    service: Service,
    owned: Arc<Owned>,
}

struct ClientHot {
    memory: MemLru,
    touched: Vec<Hash>,
}

impl ClientHot {
    /// Records a use; the batch to send once it is full.
    fn touch(&mut self, hash: &Hash) -> Option<Vec<Hash>> {
        self.touched.push(*hash);
        (self.touched.len() >= TOUCH_BATCH).then(|| std::mem::take(&mut self.touched))
    }
}

impl Cache {
    /// Opens the cache directory (creating it private), as its owner if no other process
    /// owns it, else as a client of the owner.
    pub fn open(config: CacheConfig) -> Result<Cache, CacheError> {
        create_private_dir(&config.dir)?;
        make_private(&config.dir)?;
        let addr = SockAddr::new(&config.dir)?;
        let role = acquire(&config, &addr)?;
        // The owner cleared tmp/ when it opened (this process, if it is the owner).
        let store = Store::attach(&config.dir)?;
        let memory = MemLru::new(config.memory);
        Ok(Cache {
            inner: Arc::new(Shared {
                config,
                addr,
                role: RwLock::new(role),
                epoch: AtomicU64::new(0),
                store,
                hot: Mutex::new(ClientHot {
                    memory,
                    touched: Vec::new(),
                }),
                claimed: Mutex::new(HashSet::new()),
                silent_until: Mutex::new(None),
            }),
        })
    }

    /// Whether this process owns the directory (else it is a client of the process that does).
    pub fn is_owner(&self) -> bool {
        matches!(&*self.inner.role.read(), Role::Owner(_))
    }

    /// Whether another process uses this cache now: this one is a client of its owner, or
    /// owns it and serves a client. What is stored only for others (see `lcfs copy`) is
    /// worth storing then.
    pub fn is_shared(&self) -> bool {
        match &*self.inner.role.read() {
            Role::Owner(o) => o.service.clients() > 0,
            Role::Client(_) => true,
        }
    }

    /// The object, from memory or from its file (re-hashed). A damaged file is deleted, logged
    /// and reported as a miss.
    pub fn get(&self, hash: &Hash) -> Result<Option<Verified>, CacheError> {
        if let Role::Owner(o) = &*self.inner.role.read() {
            return o.owned.get(hash);
        }
        let hit = self.inner.hot.lock().memory.get(hash);
        if let Some(obj) = hit {
            self.remember(&obj);
            return Ok(Some(obj));
        }
        match self.inner.store.read(hash)? {
            Read::Good(obj) => {
                self.remember(&obj);
                Ok(Some(obj))
            }
            Read::Missing => Ok(None),
            Read::Bad => {
                // The owner checks again and deletes it, under its lock.
                self.call(&Request::Check(*hash), |_| Ok(()), |o| o.check(hash))?;
                Ok(None)
            }
        }
    }

    /// Whether the object is cached (no hashing: a later `get` may still miss).
    pub fn contains(&self, hash: &Hash) -> bool {
        if let Role::Owner(o) = &*self.inner.role.read() {
            return o.owned.contains(hash);
        }
        self.inner.hot.lock().memory.contains(hash) || self.inner.store.exists(hash)
    }

    /// Starts reading the files of those objects that are on disk but not in memory, so that
    /// a later [`Cache::get`] finds them in the page cache. Reading object files one at a
    /// time keeps one request in flight, which on this kind of disk is about half of what
    /// it can give (0.6 against 1 GB/s with eight in flight); the kernel queues these
    /// together. It blocks on file opens: call it off any latency-sensitive thread.
    pub fn will_need(&self, hashes: &[Hash]) {
        if let Role::Owner(o) = &*self.inner.role.read() {
            return o.owned.will_need(hashes);
        }
        for hash in hashes {
            if !self.inner.hot.lock().memory.contains(hash) {
                self.inner.store.will_need(hash);
            }
        }
    }

    /// Stores the object (a no-op if present), then evicts down to the quota.
    pub fn insert(&self, obj: &Verified) -> Result<(), CacheError> {
        self.insert_all(std::slice::from_ref(obj))
    }

    /// Stores the objects (those present are no-ops), then evicts down to the quota. A
    /// process sharing the cache hands them to the owner in one request. On an error some
    /// may be stored and others not; it names the first failure.
    pub fn insert_all(&self, objs: &[Verified]) -> Result<(), CacheError> {
        if let Role::Owner(o) = &*self.inner.role.read() {
            return objs
                .iter()
                .map(|obj| o.owned.insert(obj))
                .fold(Ok(()), Result::and);
        }
        let mut temps = Vec::new();
        let mut result = Ok(());
        for obj in objs {
            if self.inner.store.exists(obj.hash()) {
                self.release_fetch(obj.hash());
                self.remember(obj);
                continue;
            }
            match self.inner.store.write_temp(obj) {
                Ok(temp) => temps.push((obj, temp)),
                Err(e) => result = result.and(Err(e)),
            }
        }
        for chunk in temps.chunks(MAX_COMMIT) {
            result = result.and(self.commit(chunk));
        }
        for (obj, temp) in temps {
            // Gone if it was committed; ours to remove if not.
            discard(temp);
            if self.inner.claimed.lock().contains(obj.hash()) {
                self.release_fetch(obj.hash());
            }
        }
        result
    }

    /// Asks the owner to take written temp files as objects.
    fn commit(&self, temps: &[(&Verified, TempObject)]) -> Result<(), CacheError> {
        let list: Vec<(Hash, String)> = temps
            .iter()
            .map(|(obj, temp)| (*obj.hash(), temp.name().to_owned()))
            .collect();
        let request = Request::Commit(list.clone());
        self.call(&request, expect_done, |o| {
            list.iter()
                .map(|(hash, name)| o.commit_temp(name, hash))
                .fold(Ok(()), Result::and)
        })?;
        let mut claimed = self.inner.claimed.lock();
        let mut hot = self.inner.hot.lock();
        for (obj, _) in temps {
            // Storing it ended our claim at the owner.
            claimed.remove(obj.hash());
            hot.memory.put(obj);
        }
        Ok(())
    }

    /// Keeps an object in the memory LRU and records its use.
    fn remember(&self, obj: &Verified) {
        let batch = {
            let mut hot = self.inner.hot.lock();
            hot.memory.put(obj);
            hot.touch(obj.hash())
        };
        self.send_touched(batch);
    }

    /// Claims the fetch of `hash` before joining its group: true if no other process sharing
    /// the cache is fetching it (the claim lasts until this process stores the object, calls
    /// [`Cache::release_fetch`], or exits); false if another is, and this process should
    /// wait for the object to appear in the cache instead. If the owner cannot be asked, the
    /// answer is true: a duplicate fetch costs bytes, a wait on nobody would cost the reader.
    pub fn claim_fetch(&self, hash: &Hash) -> bool {
        let expect_claimed = |reply| match reply {
            Reply::Claimed(granted) => Ok(granted),
            other => Err(other),
        };
        let granted = self
            .call(&Request::Claim(*hash), expect_claimed, |o| {
                Ok(o.claims.claim(hash, OWNER))
            })
            .unwrap_or_else(|e| {
                debug!("fetch claim not answered: {e}");
                true
            });
        if granted && !self.is_owner() {
            self.inner.claimed.lock().insert(*hash);
        }
        granted
    }

    /// Gives up a claim of [`Cache::claim_fetch`] (the fetch failed or was abandoned); a
    /// no-op without one.
    pub fn release_fetch(&self, hash: &Hash) {
        if let Role::Owner(o) = &*self.inner.role.read() {
            return o.owned.claims.release(hash, OWNER);
        }
        if !self.inner.claimed.lock().remove(hash) {
            return;
        }
        let released = self.call(&Request::Release(*hash), expect_done, |o| {
            o.claims.release(hash, OWNER);
            Ok(())
        });
        if let Err(e) = released {
            debug!("fetch claim not released: {e}");
        }
    }

    /// Protects a cached object from eviction until unpinned.
    pub fn pin(&self, hash: &Hash) -> Result<(), CacheError> {
        self.call(&Request::Pin(*hash), expect_done, |o| o.pin(hash))
    }

    /// Makes the object evictable again (a no-op if absent or not pinned).
    pub fn unpin(&self, hash: &Hash) -> Result<(), CacheError> {
        self.call(&Request::Unpin(*hash), expect_done, |o| o.unpin(hash))
    }

    /// Unpins every object.
    pub fn unpin_all(&self) -> Result<(), CacheError> {
        self.call(&Request::UnpinAll, expect_done, Owned::unpin_all)
    }

    /// Remembers the last root record seen on a channel.
    pub fn set_root(&self, channel: &[u8; 32], record: &[u8]) -> Result<(), CacheError> {
        let request = Request::SetRoot {
            channel: *channel,
            record: record.to_vec(),
        };
        self.call(&request, expect_done, |o| o.set_root(channel, record))
    }

    /// The last root record remembered for a channel.
    pub fn get_root(&self, channel: &[u8; 32]) -> Result<Option<Vec<u8>>, CacheError> {
        self.call(&Request::GetRoot(*channel), expect_bytes, |o| {
            o.get_root(channel)
        })
    }

    /// Remembers the publisher first trusted on a channel (an opaque identity).
    pub fn set_publisher(&self, channel: &[u8; 32], identity: &[u8]) -> Result<(), CacheError> {
        let request = Request::SetPublisher {
            channel: *channel,
            identity: identity.to_vec(),
        };
        self.call(&request, expect_done, |o| {
            o.set_publisher(channel, identity)
        })
    }

    /// The publisher remembered for a channel.
    pub fn get_publisher(&self, channel: &[u8; 32]) -> Result<Option<Vec<u8>>, CacheError> {
        self.call(&Request::GetPublisher(*channel), expect_bytes, |o| {
            o.get_publisher(channel)
        })
    }

    /// What the cache directory holds on disk (for every process sharing it); zeros, logged,
    /// if the owner cannot be asked.
    pub fn usage(&self) -> Usage {
        let expect_usage = |reply| match reply {
            Reply::Usage(u) => Ok(u),
            other => Err(other),
        };
        self.call(&Request::Usage, expect_usage, |o| Ok(o.usage()))
            .unwrap_or_else(|e| {
                debug!("cache usage unknown: {e}");
                Usage::default()
            })
    }

    /// Usage, the owner's quota and the remembered root records, from whichever process owns
    /// the cache.
    pub fn status(&self) -> Result<Status, CacheError> {
        let expect_status = |reply| match reply {
            Reply::Status(s) => Ok(s),
            other => Err(other),
        };
        self.call(&Request::Status, expect_status, Owned::status)
    }

    /// Bytes an unprivileged writer may still use on the cache's file system, if it says.
    pub fn free_bytes(&self) -> Option<u64> {
        self.inner.store.free_bytes()
    }

    /// The pid of the process that owns the cache, or `None` if this one does.
    pub fn owner_pid(&self) -> Option<i32> {
        match &*self.inner.role.read() {
            Role::Owner(_) => None,
            Role::Client(_) => owner_pid(self.dir()),
        }
    }

    /// Evicts least recently used unpinned objects until the cache's disk use is at most
    /// `limit` bytes (whichever process owns it does it), and removes the temp files of
    /// processes that are gone. Returns what is left.
    pub fn gc(&self, limit: u64) -> Result<Usage, CacheError> {
        let expect_usage = |reply| match reply {
            Reply::Usage(u) => Ok(u),
            other => Err(other),
        };
        self.call(&Request::Evict(limit), expect_usage, |o| o.evict_to(limit))
    }

    /// Re-hashes every object file against its name: deletes (file and index entry) those
    /// that fail, indexes good files the index lacks, drops entries without a file.
    /// `progress` is told the length of each file read. Only the owner can: in a process
    /// that is a client, it fails with [`CacheError::InUse`] naming the owner.
    pub fn verify(&self, progress: &mut dyn FnMut(u64)) -> Result<VerifyReport, CacheError> {
        self.owned_only("`lcfs cache verify`", |o| o.verify(progress))
    }

    /// Deletes every object, or with `keep_pinned` every unpinned one (pins go with their
    /// objects). Root records and trusted publishers stay: they guard against rollback and
    /// impostors, and hold no content. Only the owner can: in a client process, it fails
    /// with [`CacheError::InUse`] naming the owner. Returns what is left.
    pub fn clear(&self, keep_pinned: bool) -> Result<Usage, CacheError> {
        self.owned_only("`lcfs cache clear`", |o| o.clear(keep_pinned))
    }

    /// Runs `f` on the owned cache, or refuses when another process owns it.
    fn owned_only<T>(
        &self,
        what: &str,
        f: impl FnOnce(&Owned) -> Result<T, CacheError>,
    ) -> Result<T, CacheError> {
        match &*self.inner.role.read() {
            Role::Owner(o) => f(&o.owned),
            Role::Client(_) => Err(CacheError::InUse {
                dir: self.dir().to_owned(),
                pid: pid_text(self.dir()),
                what: what.to_owned(),
            }),
        }
    }

    /// Bytes of objects held in this process's memory LRU.
    pub fn memory_bytes(&self) -> usize {
        if let Role::Owner(o) = &*self.inner.role.read() {
            return o.owned.memory_bytes();
        }
        self.inner.hot.lock().memory.bytes()
    }

    /// Writes remembered uses and the index to disk.
    pub fn flush(&self) -> Result<(), CacheError> {
        let touched = std::mem::take(&mut self.inner.hot.lock().touched);
        self.send_touched(Some(touched));
        self.call(&Request::Flush, expect_done, Owned::flush)
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.inner.config.dir
    }

    /// Tells the owner of a batch of uses; lost uses only cost LRU order, so failures are
    /// logged.
    fn send_touched(&self, batch: Option<Vec<Hash>>) {
        let Some(batch) = batch.filter(|b| !b.is_empty()) else {
            return;
        };
        for chunk in batch.chunks(MAX_TOUCHED) {
            let request = Request::Touched(chunk.to_vec());
            let sent = self.call(&request, expect_done, |o| {
                o.touch_all(chunk);
                Ok(())
            });
            if let Err(e) = sent {
                debug!("could not record object uses: {e}");
            }
        }
    }

    /// Runs a request: on the owned cache if we own it, else by the owner, whose reply
    /// `remote` reads. An owner found gone is replaced (see [`Shared::recover`]) and the
    /// request made again.
    fn call<T>(
        &self,
        request: &Request,
        remote: impl Fn(Reply) -> Result<T, Reply>,
        local: impl Fn(&Owned) -> Result<T, CacheError>,
    ) -> Result<T, CacheError> {
        for _ in 0..3 {
            let epoch = self.inner.epoch.load(Ordering::Acquire);
            {
                let role = self.inner.role.read();
                let client = match &*role {
                    Role::Owner(o) => return local(&o.owned),
                    Role::Client(c) => c,
                };
                let mut client = client.lock();
                if let Some(until) = *self.inner.silent_until.lock() {
                    if Instant::now() < until {
                        return Err(client.owner_error(format!(
                            "it did not answer a moment ago; asking again in {} ms",
                            until.saturating_duration_since(Instant::now()).as_millis()
                        )));
                    }
                }
                match client.call(request) {
                    Ok(reply) => return remote(reply).map_err(|r| self.unexpected(&client, r)),
                    Err(CallError::Stuck(e)) => {
                        warn!("{e}");
                        *self.inner.silent_until.lock() = Some(Instant::now() + SILENT_BACKOFF);
                        return Err(e);
                    }
                    Err(CallError::Failed(e)) => return Err(e),
                    Err(CallError::Gone) => {}
                }
            }
            self.inner.recover(epoch)?;
        }
        Err(CacheError::OwnerSilent {
            dir: self.dir().to_owned(),
            pid: pid_text(self.dir()),
            secs: 0,
        })
    }

    /// The error for a reply that is not the one the request wants.
    fn unexpected(&self, client: &Client, reply: Reply) -> CacheError {
        match reply {
            Reply::NotCached(hash) => CacheError::NotCached {
                hash,
                dir: self.dir().to_owned(),
            },
            Reply::Failed(message) => client.owner_error(message),
            other => client.owner_error(format!("unexpected answer {other:?}")),
        }
    }

    #[cfg(test)]
    pub(crate) fn owned(&self) -> Arc<Owned> {
        match &*self.inner.role.read() {
            Role::Owner(o) => o.owned.clone(),
            Role::Client(_) => panic!("this cache is a client"),
        }
    }

    /// Leaves the next close unclean, as after a crash.
    #[cfg(test)]
    pub(crate) fn inner_mark_damaged(&self) {
        self.owned().mark_damaged();
    }

    #[cfg(test)]
    pub(crate) fn object_path(&self, hash: &Hash) -> std::path::PathBuf {
        self.inner.store.path(hash)
    }
}

fn expect_done(reply: Reply) -> Result<(), Reply> {
    match reply {
        Reply::Done => Ok(()),
        other => Err(other),
    }
}

fn expect_bytes(reply: Reply) -> Result<Option<Vec<u8>>, Reply> {
    match reply {
        Reply::Bytes(b) => Ok(b),
        other => Err(other),
    }
}

fn pid_text(dir: &Path) -> String {
    owner_pid(dir).map_or_else(|| "?".to_owned(), |p| p.to_string())
}

impl Shared {
    /// Replaces an owner found gone: takes the lock, or connects to whoever took it. Only
    /// the first thread that saw this owner gone does it.
    fn recover(&self, seen: u64) -> Result<(), CacheError> {
        let mut role = self.role.write();
        if self.epoch.load(Ordering::Acquire) != seen {
            return Ok(());
        }
        let new = acquire(&self.config, &self.addr)?;
        if matches!(new, Role::Owner(_)) {
            info!(dir = %self.config.dir.display(), "took over the cache from an lcfs process that exited");
        }
        *role = new;
        self.epoch.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }
}

/// Becomes the owner of the directory if nobody is, else a client of the owner, waiting up
/// to [`OWNER_WAIT`] for an owner that holds the lock but does not listen yet.
fn acquire(config: &CacheConfig, addr: &SockAddr) -> Result<Role, CacheError> {
    let deadline = Instant::now() + OWNER_WAIT;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(lock) = try_lock_dir(&config.dir)? {
            let owned = Arc::new(Owned::open(config, lock)?);
            let service = Service::start(owned.clone(), addr)?;
            return Ok(Role::Owner(Owner { service, owned }));
        }
        match Client::connect(&config.dir, addr) {
            Ok(client) => return Ok(Role::Client(Mutex::new(client))),
            Err(ConnectError::Refused(e)) => return Err(e),
            Err(ConnectError::NotListening) if Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            Err(ConnectError::NotListening) => {
                return Err(CacheError::OwnerSilent {
                    dir: config.dir.clone(),
                    pid: pid_text(&config.dir),
                    secs: OWNER_WAIT.as_secs(),
                })
            }
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let touched = std::mem::take(&mut self.hot.lock().touched);
        if touched.is_empty() {
            return;
        }
        if let Role::Client(client) = &*self.role.read() {
            for chunk in touched.chunks(MAX_TOUCHED) {
                if client
                    .lock()
                    .call(&Request::Touched(chunk.to_vec()))
                    .is_err()
                {
                    warn!("could not record object uses in the cache before exiting");
                    return;
                }
            }
        }
    }
}
