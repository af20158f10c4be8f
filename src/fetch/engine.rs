//! The I/O shell of the fetch engine: socket, threads, cache and waiters around the sans-IO
//! [`FetchState`].
//!
//! Root records reach watchers ([`Fetcher::watch_roots`]: opening a tree listens through one
//! for a short while, a mount and `copy --watch` for as long as they follow the publisher),
//! for whom the root group stays joined. When the channel moves to a new generation,
//! [`Fetcher::handle_new_generation`] puts every pending fetch in doubt (see
//! [`super::object`]): what the server no longer sends fails as stale within `stale_after`
//! instead of `timeout`.
//!
//! Processes sharing a cache coordinate through it: before joining an object's group the
//! engine claims the object ([`Cache::claim_fetch`]); if another process holds the claim, the
//! fetch keeps its place in the window without a group and ends when that process stores the
//! object, so one object wanted by several processes is joined, sent and decoded once (three
//! processes reading one small-file tree cost its server 1.39 times the tree without this,
//! 1.11 with it, as much as one process). Three threads keep the receive thread from ever
//! waiting on another process or the disk: it decodes and leaves; a claim thread asks the
//! cache's owner about claims; a store thread writes what was fetched, in batches, and then
//! answers the waiters (so a reader that gets an object finds it in the cache, to pin it).
//!
//! Lock: one mutex holds the state and the waiters; the cache and the claim thread are
//! asked outside it, except for claims answered by this process's own cache (a table in
//! memory) and the release of a failed fetch's claim. The receive thread decrypts, decodes
//! and hashes outside it too: under the lock it only routes a batch's symbols to their
//! fetches ([`FetchState::handle_packet`]) and takes back what they did
//! ([`FetchState::handle_fed`]); each fetch's decoders have a lock of their own, which
//! only the receive thread takes while it decodes.

use std::collections::HashMap;
use std::net::Ipv6Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lcfs_cache::{Cache, Verified};
use socket2::Socket;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};

use super::config::{FetchConfig, FetchStats, Freshness, HeardRoot, KeepMembers, Priority, RECENT};
use super::membership::{default_gap, Memberships, QUIET_EVERY};
use super::state::{Claim, Event, FetchState, Requested};
use super::{FetchError, Subject, KEY_HINT, SERVER_HINT};
use crate::mld::Reporter;
use crate::net::{recv_batch, set_membership, wait_readable, Iface, RecvBatch, Wakeup};
use crate::wire::channel::{Channel, Tag};
use crate::wire::object::{ObjectHash, ObjectRef};

/// Completed objects waiting to be stored: as many as the state's recent objects, so that a
/// request for one of them finds it there.
const STORE_QUEUE: usize = RECENT;

/// Root records queued for a watcher that is slow to take them; more are dropped (a flood
/// of forged records must not grow memory; the server repeats its record every 25 ms, and
/// a copy dropped here does not count as handed on: see `FetchState::forget_root`).
const ROOT_WATCH_QUEUE: usize = 16;

type Waiter = oneshot::Sender<Result<Verified, FetchError>>;

/// Root records as the engine hears them, not yet trusted; the root group stays joined while
/// this lives.
pub struct RootWatcher {
    rx: mpsc::Receiver<HeardRoot>,
}

impl RootWatcher {
    /// The next record heard; `None` once the engine stopped.
    pub async fn next(&mut self) -> Option<HeardRoot> {
        self.rx.recv().await
    }
}

/// The state and who waits for what, under one lock.
struct Locked {
    state: FetchState,
    waiters: HashMap<Tag, Vec<Waiter>>,
    watchers: Vec<mpsc::Sender<HeardRoot>>,
    /// Objects completed, with their waiters, and bundle claims to give back once their
    /// members are stored: for the store thread, in order.
    completed: Vec<Store>,
    /// Until when the receive thread waits for a datagram, if it does: set before it lets go
    /// of the lock to wait, so a request made in between still wakes it.
    asleep_until: Option<Instant>,
}

struct Inner {
    channel: Channel,
    iface: Iface,
    socket: Socket,
    /// Our own MLD reports of joins; `None` without CAP_NET_RAW.
    reporter: Option<Reporter>,
    /// Ends the receive thread's wait early (see [`Inner::wake_if_sooner`]).
    wake: Wakeup,
    cache: Cache,
    config: FetchConfig,
    locked: Mutex<Locked>,
    stats: Arc<FetchStats>,
    shutdown: AtomicBool,
    /// Whether reads from, and stores to, the cache are failing: failures are logged when
    /// they start and end, not on every object.
    cache_reads_failing: AtomicBool,
    cache_stores_failing: AtomicBool,
    /// Claims to ask the cache's owner about (see [`Inner::claim_loop`]).
    /// `None` ends the claim thread (see [`Inner::run`]).
    claimer: OnceLock<Sender<Option<ClaimAsk>>>,
}

/// A handle to the fetch engine of one channel; clone it freely.
#[derive(Clone)]
pub struct Fetcher {
    inner: Arc<Inner>,
    _thread: Arc<ThreadGuard>,
}

struct ThreadGuard {
    inner: Arc<Inner>,
    handle: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for ThreadGuard {
    fn drop(&mut self) {
        self.inner.shutdown.store(true, Ordering::Relaxed);
        self.inner.wake.wake();
        if let Some(h) = self.handle.lock().ok().and_then(|mut h| h.take()) {
            let _ = h.join();
        }
    }
}

impl Fetcher {
    pub fn start(
        channel: Channel,
        iface: Iface,
        cache: Cache,
        config: FetchConfig,
    ) -> Result<Fetcher, crate::net::NetError> {
        let socket = crate::net::receiver_socket(&iface, config.port)?;
        let wake = Wakeup::new().map_err(|source| crate::net::NetError::Socket {
            what: "creating the receive thread's eventfd",
            iface: iface.name.clone(),
            source,
        })?;
        // LCFS_MLD_REPORTS=kernel leaves reports to the kernel, for networks whose snooping
        // should only ever see the kernel's, and for comparisons.
        let kernel_only = std::env::var("LCFS_MLD_REPORTS").is_ok_and(|v| v == "kernel");
        let reporter = match kernel_only {
            true => None,
            false => Reporter::open(iface.index)
                .map_err(|e| {
                    tracing::debug!(
                        "membership changes are reported by the kernel alone, in batches: {e}"
                    )
                })
                .ok(),
        };
        // Our own reports do not wait for the kernel's timer: no batching needed, but a quiet
        // now and then, for the kernel to forget the groups left (see `membership`).
        let members = match reporter {
            Some(_) => Memberships::new(Duration::ZERO).with_quiet(QUIET_EVERY, default_gap()),
            None => Memberships::new(default_gap()),
        };
        let stats = Arc::new(FetchStats::default());
        let state = FetchState::new(
            Instant::now(),
            channel.clone(),
            iface.index,
            config.clone(),
            stats.clone(),
            members,
        );
        let inner = Arc::new(Inner {
            channel,
            iface,
            socket,
            reporter,
            wake,
            cache,
            config,
            locked: Mutex::new(Locked {
                state,
                waiters: HashMap::new(),
                watchers: Vec::new(),
                completed: Vec::new(),
                asleep_until: None,
            }),
            stats,
            shutdown: AtomicBool::new(false),
            cache_reads_failing: AtomicBool::new(false),
            cache_stores_failing: AtomicBool::new(false),
            claimer: OnceLock::new(),
        });
        let worker = inner.clone();
        let handle = std::thread::Builder::new()
            .name("lcfs-recv".into())
            .spawn(move || worker.run())
            .expect("spawning the receive thread");
        let guard = ThreadGuard {
            inner: inner.clone(),
            handle: Mutex::new(Some(handle)),
        };
        Ok(Fetcher {
            inner,
            _thread: Arc::new(guard),
        })
    }

    pub fn channel(&self) -> &Channel {
        &self.inner.channel
    }

    pub fn cache(&self) -> &Cache {
        &self.inner.cache
    }

    pub fn stats(&self) -> &FetchStats {
        &self.inner.stats
    }

    /// Records the generation of the tree now in use, for [`Fetcher::status`].
    pub fn note_generation(&self, generation: u64) {
        self.inner
            .stats
            .generation
            .store(generation, Ordering::Relaxed);
    }

    /// What `lcfs status` and the metrics show of this engine and its cache.
    pub fn status(&self) -> crate::status::ReceiverStatus {
        let s = &self.inner.stats;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let usage = self.inner.cache.usage();
        crate::status::ReceiverStatus {
            generation: n(&s.generation),
            server_online: crate::status::online(s.last_heard.ms(), crate::status::unix_ms_now()),
            bytes_fetched: n(&s.bytes_fetched),
            objects_fetched: n(&s.objects_fetched),
            bytes_from_cache: n(&s.bytes_cached),
            cache_hits: n(&s.cache_hits),
            packets: n(&s.packets),
            dropped_packets: n(&s.malformed) + n(&s.misaddressed) + n(&s.forged_decodes),
            in_flight: self.inner.lock().state.pending() as u64,
            cache: crate::status::CacheStatus {
                dir: self.inner.cache.dir().display().to_string(),
                objects: usage.objects,
                bytes: usage.disk_bytes,
                pinned_bytes: usage.pinned_bytes,
                quota: None,
            },
            latency: s.latency.snapshot(),
            ..Default::default()
        }
    }

    pub fn iface(&self) -> &Iface {
        &self.inner.iface
    }

    /// The object `r`, from the cache or the network, verified.
    pub async fn fetch(&self, r: ObjectRef, priority: Priority) -> Result<Verified, FetchError> {
        self.fetch_as(r, priority, Freshness::Current).await
    }

    /// [`Fetcher::fetch`] for a reader of the given freshness.
    pub async fn fetch_as(
        &self,
        r: ObjectRef,
        priority: Priority,
        freshness: Freshness,
    ) -> Result<Verified, FetchError> {
        if let Some(v) = self.cached(&r)? {
            return Ok(v);
        }
        tracing::trace!(hash = %&r.hash.to_hex()[..12], ?priority, ?freshness, "fetch");
        let started = Instant::now();
        let rx = {
            let now = Instant::now();
            let mut l = self.inner.lock();
            let tag = match l.state.handle_request(now, r, priority, freshness) {
                Requested::Recent(v) => return Ok(v),
                Requested::Pending(tag) => tag,
            };
            let (tx, rx) = oneshot::channel();
            l.waiters.entry(tag).or_default().push(tx);
            self.inner.drive(&mut l, now);
            rx
        };
        let fetched = rx.await.map_err(|_| FetchError::Closed)?;
        if fetched.is_ok() {
            self.inner.stats.latency.record(started.elapsed());
        }
        fetched
    }

    /// The channel moved to a new generation: every pending fetch is in doubt from now on
    /// (what the server still has keeps coming; the rest fails as stale within
    /// `stale_after`), and joined groups are reported afresh, for a server that restarted.
    pub fn handle_new_generation(&self) {
        let now = Instant::now();
        let mut l = self.inner.lock();
        l.state.handle_new_generation(now);
        self.inner.drive(&mut l, now);
    }

    /// Root records from now on, as heard (not yet trusted); the root group stays joined
    /// until the watcher is dropped.
    pub fn watch_roots(&self) -> RootWatcher {
        let (tx, rx) = mpsc::channel(ROOT_WATCH_QUEUE);
        let now = Instant::now();
        let mut l = self.inner.lock();
        l.watchers.push(tx);
        l.state.set_watching(now, true);
        self.inner.drive(&mut l, now);
        RootWatcher { rx }
    }

    /// Starts fetching every object of `refs` that is not cached, without waiting: their
    /// joins go out together, in one MLD report. A later [`Fetcher::fetch`] of one of them
    /// shares the fetch already under way. Cached ones are read ahead from disk instead
    /// ([`Cache::will_need`]), in the background when there is a runtime to do it on.
    pub fn start_fetches(&self, refs: &[ObjectRef], priority: Priority) {
        let cache = &self.inner.cache;
        let (cached, missing): (Vec<ObjectRef>, Vec<ObjectRef>) =
            refs.iter().partition(|r| cache.contains(r.hash.raw()));
        if !missing.is_empty() {
            let now = Instant::now();
            let mut l = self.inner.lock();
            for r in missing {
                l.state.handle_request(now, r, priority, Freshness::Current);
            }
            self.inner.drive(&mut l, now);
        }
        if !cached.is_empty() {
            let hashes: Vec<lcfs_cache::Hash> = cached.iter().map(|r| *r.hash.raw()).collect();
            let cache = cache.clone();
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(rt.spawn_blocking(move || cache.will_need(&hashes))),
                Err(_) => cache.will_need(&hashes),
            }
        }
    }

    /// The object from the cache alone. A cache that cannot be read is a miss: the object
    /// is fetched instead, and the failure logged once.
    pub fn cached(&self, r: &ObjectRef) -> Result<Option<Verified>, FetchError> {
        let hit = self.inner.cache_outcome(
            &self.inner.cache_reads_failing,
            "read objects from",
            self.inner.cache.get(r.hash.raw()),
        );
        let hit = hit.flatten();
        if let Some(v) = &hit {
            self.inner.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            self.inner
                .stats
                .bytes_cached
                .fetch_add(v.len() as u64, Ordering::Relaxed);
        }
        Ok(hit)
    }

    /// The bundling of a directory just read (see [`crate::wire::object::bundle`]): its small
    /// files are fetched through their bundles from now on, those in none on their own.
    pub fn learn_bundles(&self, bundling: crate::wire::object::bundle::Bundling) {
        if !bundling.bundles.is_empty() || !bundling.alone.is_empty() {
            self.inner.lock().state.handle_bundles(bundling);
        }
    }

    /// Tells the engine that `sender` is a real server of the channel (its root record was
    /// trusted), so that its symbols keep their decoders under a flood.
    pub fn prefer_sender(&self, sender: Ipv6Addr) {
        self.inner.lock().state.prefer_sender(sender);
    }

    /// How long a fetch may go without a useful symbol.
    pub fn timeout(&self) -> Duration {
        self.inner.config.timeout
    }

    /// The error a fetch of `what` that timed out gives.
    pub fn timeout_error(&self, what: Subject) -> FetchError {
        self.inner.timeout_error(Box::new(what))
    }

    /// How long to wait for the channel's first root record (`None`: for ever).
    pub fn root_wait(&self) -> Option<Duration> {
        self.inner.config.root_wait
    }

    /// The error when no acceptable root record came within [`Fetcher::root_wait`]: names
    /// the channel and the interface, and says whether anything arrived at all.
    pub fn no_root_error(&self) -> FetchError {
        let inner = &self.inner;
        let packets = inner.stats.packets.load(Ordering::Relaxed);
        let seen = match packets {
            0 => "no lcfs packet arrived".to_owned(),
            n => format!("{n} packets arrived on the port, none a root record of this channel"),
        };
        let secs = inner.config.root_wait.unwrap_or_default().as_secs_f64();
        let advice = inner.iface_down_hint().unwrap_or_else(|| {
            let key = if inner.channel.seal().is_some() {
                KEY_HINT
            } else {
                ""
            };
            format!(
                " Check the channel's name and --iface, and that `lcfs serve` runs on this link; \
                 --wait keeps waiting (at boot, before the server is up).{key}"
            )
        });
        FetchError::NoRoot {
            channel: inner.channel.name().to_owned(),
            iface: inner.iface.name.clone(),
            secs,
            seen,
            advice,
        }
    }
}

/// A claim for the claim thread to ask about: the fetch's tag, the hash claimed, and for a
/// bundle the members asked for.
type ClaimAsk = (Tag, ObjectHash, Vec<ObjectHash>);

/// Work for the store thread, in the order it came.
enum Store {
    /// A fetched object, whether it came as a bundle's member, and who waits for it.
    Object {
        object: Verified,
        member: bool,
        waiters: Vec<Waiter>,
    },
    /// A bundle's claim, given back once its members (queued before) are stored.
    Release(ObjectHash),
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Locked> {
        self.locked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Carries out what the state asks for: claims, events, membership changes.
    fn drive(&self, l: &mut Locked, now: Instant) {
        loop {
            let mut busy = false;
            while let Some((tag, hash)) = l.state.poll_claim(now) {
                busy = true;
                self.claim(l, now, tag, hash);
            }
            while let Some(event) = l.state.poll_event() {
                busy = true;
                self.handle_event(l, now, event);
            }
            if !busy {
                break;
            }
        }
        self.flush(l, now);
        self.wake_if_sooner(l);
    }

    /// Wakes the receive thread when a timer is now due before its wait ends: requests are
    /// made on the requesters' threads, but their timers run on the receive thread.
    fn wake_if_sooner(&self, l: &mut Locked) {
        if l.asleep_until.is_some_and(|t| next_turn(&l.state) < t) {
            l.asleep_until = None;
            self.wake.wake();
        }
    }

    /// Answers a claim at once when this process owns the cache (a table in memory), else
    /// hands it to the claim thread; without one, the fetch goes on unclaimed.
    fn claim(&self, l: &mut Locked, now: Instant, tag: Tag, hash: ObjectHash) {
        let riders = l.state.riders(&tag);
        if self.cache.is_owner() {
            let answer = self.ask_claim(&hash, &riders);
            if l.state.handle_claim(now, tag, answer) {
                self.cache.release_fetch(hash.raw());
            }
            return;
        }
        let sent = self
            .claimer
            .get()
            .is_some_and(|tx| tx.send(Some((tag, hash, riders))).is_ok());
        if !sent {
            l.state.handle_claim(now, tag, Claim::Granted);
        }
    }

    /// Asks for the claim of `hash`; an object stored meanwhile (the claim of the process
    /// that stored it ended with the store) is not fetched again, and its claim is given back.
    /// For a bundle, `riders` are the members asked for: when the cache has them all (another
    /// process stored the bundle a moment ago), it is as good as cached.
    fn ask_claim(&self, hash: &ObjectHash, riders: &[ObjectHash]) -> Claim {
        if !self.cache.claim_fetch(hash.raw()) {
            return Claim::Elsewhere;
        }
        let riders_cached =
            !riders.is_empty() && riders.iter().all(|r| self.cache.contains(r.raw()));
        if riders_cached || self.cache.contains(hash.raw()) {
            self.cache.release_fetch(hash.raw());
            return Claim::Cached;
        }
        Claim::Granted
    }

    fn handle_event(&self, l: &mut Locked, now: Instant, event: Event) {
        match event {
            Event::Completed {
                tag,
                object,
                member,
            } => {
                let waiters = l.waiters.remove(&tag).unwrap_or_default();
                l.completed.push(Store::Object {
                    object,
                    member,
                    waiters,
                });
            }
            Event::Failed { tag, want, stale } => {
                self.cache.release_fetch(want.hash.raw());
                let what = Box::new(Subject::object(want));
                let err = if stale {
                    FetchError::Stale {
                        channel: self.channel.name().to_owned(),
                        what,
                    }
                } else {
                    self.timeout_error(what)
                };
                for w in l.waiters.remove(&tag).unwrap_or_default() {
                    let _ = w.send(Err(err.clone()));
                }
            }
            // After the members, so that another process asking for the claim finds them.
            Event::Release { hash } => l.completed.push(Store::Release(hash)),
            Event::RootRepeated => {
                self.stats.last_heard.now();
                self.prune_watchers(l, now);
            }
            Event::Root(heard) => {
                self.stats.last_heard.now();
                let mut dropped = false;
                for tx in &l.watchers {
                    // Full: the watcher is behind (or flooded); it gets the server's next copy.
                    dropped |= matches!(tx.try_send(heard.clone()), Err(TrySendError::Full(_)));
                }
                if dropped {
                    l.state.forget_root(heard.from);
                }
                self.prune_watchers(l, now);
            }
        }
    }

    /// Forgets watchers that went away; the root group is left with the last.
    fn prune_watchers(&self, l: &mut Locked, now: Instant) {
        l.watchers.retain(|s| !s.is_closed());
        if l.watchers.is_empty() {
            l.state.set_watching(now, false);
        }
    }

    /// Applies the membership changes due, and reports them without waiting for the kernel
    /// (see [`Reporter`]).
    fn flush(&self, l: &mut Locked, now: Instant) {
        let Some(ops) = l.state.poll_membership(now) else {
            return;
        };
        let (mut joined, mut left): (Vec<Ipv6Addr>, Vec<Ipv6Addr>) = (Vec::new(), Vec::new());
        for &(group, join) in &ops {
            self.membership(&group, join);
            joined.retain(|g| *g != group);
            left.retain(|g| *g != group);
            if join {
                joined.push(group);
            } else {
                left.push(group);
            }
        }
        if let Some(reporter) = &self.reporter {
            if let Err(e) = reporter.report(&joined, &left) {
                tracing::debug!("reporting membership changes on {}: {e}", self.iface.name);
            }
        }
    }

    fn membership(&self, group: &Ipv6Addr, join: bool) {
        tracing::trace!(%group, join, "membership");
        if let Err(e) = set_membership(&self.socket, group, self.iface.index, join) {
            let verb = if join { "join" } else { "leave" };
            tracing::warn!("cannot {verb} group {group} on {}: {e}", self.iface.name);
        }
    }

    /// The receive loop, with the claim and store threads beside it. Completed objects go to
    /// the store thread, which stores them and then answers their waiters, so that the cache
    /// write (a file, and for a process sharing the cache a message to its owner) never holds
    /// up decoding, leaves and joins.
    fn run(self: Arc<Self>) {
        let (store_tx, store_rx) = std::sync::mpsc::sync_channel(STORE_QUEUE);
        let (claim_tx, claim_rx) = std::sync::mpsc::channel();
        let _ = self.claimer.set(claim_tx);
        let this = &*self;
        std::thread::scope(|scope| {
            let claims = std::thread::Builder::new()
                .name("lcfs-claims".into())
                .spawn_scoped(scope, move || this.claim_loop(&claim_rx));
            if let Err(e) = claims {
                tracing::warn!("fetches are not coordinated with other lcfs processes: {e}");
            }
            let storer = std::thread::Builder::new()
                .name("lcfs-store".into())
                .spawn_scoped(scope, move || this.store_loop(&store_rx));
            if let Err(e) = storer {
                tracing::error!("cannot start the thread that stores fetched objects: {e}");
                return;
            }
            this.receive(&store_tx);
            drop(store_tx);
            // Ends the claim thread now rather than at its next wake-up: an engine's drop
            // waits for it, and a `copy` waited up to 100 ms after its work was done.
            if let Some(tx) = self.claimer.get() {
                let _ = tx.send(None);
            }
        });
        self.fail_all(FetchError::Closed);
    }

    /// The receive thread. A batch takes the lock twice, briefly: once to route its
    /// symbols to their fetches, once to hand back what they did; decryption before, and
    /// decoding and hashing between, run outside it, so readers asking for objects never
    /// wait for a decode.
    ///
    /// While fetches are under way it waits in the receive call, 5 ms at most, as the
    /// state's 20 ms tick allows. Once nothing is pending, or 5 ms passed without a
    /// datagram, it waits in poll(2) until the state's next timer, woken by a datagram or by
    /// a request due sooner: an idle mount's thread woke 125 times a second on the receive
    /// timeout alone. Polling before every receive would have cost two system calls more
    /// for every wake of a busy receiver.
    fn receive(&self, store: &SyncSender<Store>) {
        let mut batch = RecvBatch::new(64, 65536);
        let opener = self.lock().state.opener();
        let mut wait: Option<Instant> = None;
        while !self.shutdown.load(Ordering::Relaxed) {
            let readable = match wait.take() {
                Some(until) => {
                    let timeout = until.saturating_duration_since(Instant::now());
                    wait_readable(&self.socket, Some(&self.wake), timeout).unwrap_or_else(|e| {
                        tracing::warn!("waiting for datagrams on {} failed: {e}", self.iface.name);
                        std::thread::sleep(Duration::from_millis(50));
                        true
                    })
                }
                None => true,
            };
            let received = match readable {
                true => recv_batch(&self.socket, &mut batch),
                false => Ok(0),
            };
            let now = Instant::now();
            let failed = received.is_err();
            let quiet = matches!(received, Ok(0));
            let packets: Vec<_> = match received {
                // Nothing received, or no receive at all: `batch` still holds the last one.
                Ok(0) => Vec::new(),
                Ok(_) => batch
                    .datagrams()
                    .filter_map(|(env, dgram)| opener.open(&env, dgram).map(|p| (env, p)))
                    .collect(),
                Err(e) => {
                    tracing::warn!("receiving on {} failed: {e}", self.iface.name);
                    Vec::new()
                }
            };
            let feeds: Vec<_> = if packets.is_empty() {
                Vec::new()
            } else {
                let mut l = self.lock();
                packets
                    .into_iter()
                    .filter_map(|(env, pkt)| l.state.handle_packet(now, env, pkt))
                    .collect()
            };
            let fed: Vec<_> = feeds.into_iter().map(|f| f.run()).collect();
            let (completed, probes) = {
                let mut l = self.lock();
                l.asleep_until = None;
                for f in fed {
                    l.state.handle_fed(now, f);
                }
                if now >= l.state.poll_timeout() {
                    l.state.handle_timeout(now);
                    self.prune_watchers(&mut l, now);
                }
                self.drive(&mut l, now);
                // Set under the lock that saw the state: a request made after it is due
                // sooner wakes the wait (`wake_if_sooner`), even before it starts.
                let idle = l.state.pending() == 0;
                l.asleep_until = (quiet || idle).then(|| next_turn(&l.state));
                wait = l.asleep_until;
                (std::mem::take(&mut l.completed), l.state.poll_probe(now))
            };
            for done in completed {
                // Blocks only while the disk is this far behind: back pressure.
                let _ = store.send(done);
            }
            self.probe_cache(now, probes);
            if failed {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Looks up in the cache the objects the state asked about (outside the lock), and ends
    /// the fetches another process stored.
    fn probe_cache(&self, now: Instant, probes: Vec<(Tag, ObjectHash)>) {
        for (tag, hash) in probes {
            if !self.cache.contains(hash.raw()) {
                continue;
            }
            // Read (and re-hashed) outside the lock; a file evicted meanwhile is fetched on.
            let Ok(Some(v)) = self.cache.get(hash.raw()) else {
                continue;
            };
            let waiters = {
                let mut l = self.lock();
                if !l.state.handle_cached(now, tag, &v) {
                    continue;
                }
                let waiters = l.waiters.remove(&tag).unwrap_or_default();
                self.drive(&mut l, now);
                waiters
            };
            self.cache.release_fetch(hash.raw());
            for w in waiters {
                let _ = w.send(Ok(v.clone()));
            }
        }
    }

    /// The claim thread: asks the cache's owner about claims, so that the receive thread
    /// never waits on another process.
    /// It ends on `None`, sent when the receive loop ends, or (should that loop have
    /// panicked) within a second of the engine's shutdown.
    fn claim_loop(&self, rx: &Receiver<Option<ClaimAsk>>) {
        let mut stop = false;
        while !stop && !self.shutdown.load(Ordering::Relaxed) {
            let first = match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(Some(ask)) => ask,
                Ok(None) | Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => continue,
            };
            let mut asked = vec![first];
            for ask in rx.try_iter() {
                match ask {
                    Some(ask) => asked.push(ask),
                    None => {
                        stop = true;
                        break;
                    }
                }
            }
            let answers: Vec<Claim> = asked
                .iter()
                .map(|(_, h, riders)| self.ask_claim(h, riders))
                .collect();
            let now = Instant::now();
            let mut unwanted = Vec::new();
            {
                let mut l = self.lock();
                for (&(tag, hash, _), answer) in asked.iter().zip(answers) {
                    // Ended meanwhile (found in the cache): the claim goes back.
                    if l.state.handle_claim(now, tag, answer) {
                        unwanted.push(hash);
                    }
                }
                self.drive(&mut l, now);
            }
            unwanted
                .iter()
                .for_each(|h| self.cache.release_fetch(h.raw()));
        }
    }

    /// The store thread: stores what was fetched, in batches, then answers the waiters.
    fn store_loop(&self, rx: &Receiver<Store>) {
        while let Ok(first) = rx.recv() {
            let more = rx.try_iter().take(STORE_QUEUE);
            self.complete(std::iter::once(first).chain(more).collect());
        }
    }

    /// Stores fetched objects (in one request to the cache's owner when it is another
    /// process), then hands them to their waiters: a reader that gets an object can pin it.
    fn complete(&self, done: Vec<Store>) {
        let keep_members = match self.config.keep_members {
            KeepMembers::Always => true,
            KeepMembers::WhenShared => self.cache.is_shared(),
        };
        let mut objects = Vec::new();
        for d in &done {
            let Store::Object { object, member, .. } = d else {
                continue;
            };
            tracing::trace!(hash = %&object.hash().to_hex()[..12], len = object.len(), member, "fetched");
            self.stats.objects_fetched.fetch_add(1, Ordering::Relaxed);
            self.stats
                .bytes_fetched
                .fetch_add(object.len() as u64, Ordering::Relaxed);
            if keep_members || !member {
                objects.push(object.clone());
            }
        }
        if !objects.is_empty() {
            self.stats.last_heard.now();
            self.cache_outcome(
                &self.cache_stores_failing,
                "store fetched objects in",
                self.cache.insert_all(&objects),
            );
        }
        for d in done {
            match d {
                Store::Object {
                    object, waiters, ..
                } => {
                    for w in waiters {
                        let _ = w.send(Ok(object.clone()));
                    }
                }
                Store::Release(hash) => self.cache.release_fetch(hash.raw()),
            }
        }
    }

    /// Logs a cache failure when the cache starts failing and when it works again; readers
    /// go on without it meanwhile (objects come from the network and stay in memory).
    fn cache_outcome<T>(
        &self,
        failing: &AtomicBool,
        what: &str,
        r: Result<T, lcfs_cache::CacheError>,
    ) -> Option<T> {
        match r {
            Ok(v) => {
                if failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("can {what} the cache again");
                }
                Some(v)
            }
            Err(e) => {
                if !failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!("cannot {what} the cache, going on without it: {e}");
                } else {
                    tracing::debug!("cannot {what} the cache: {e}");
                }
                None
            }
        }
    }

    fn timeout_error(&self, what: Box<Subject>) -> FetchError {
        FetchError::Timeout {
            channel: self.channel.name().to_owned(),
            what,
            secs: self.config.timeout.as_secs(),
            iface: self.iface.name.clone(),
            hint: self.iface_down_hint().unwrap_or_else(|| {
                let key = if self.channel.seal().is_some() {
                    KEY_HINT
                } else {
                    ""
                };
                format!("{SERVER_HINT}{key}")
            }),
        }
    }

    /// Advice for an error while the interface is down: the likelier cause of silence, and
    /// one the user can see at once.
    fn iface_down_hint(&self) -> Option<String> {
        let name = &self.iface.name;
        (!crate::net::is_up(name))
            .then(|| format!(" Interface {name} is down now: bring it up (ip link set {name} up)."))
    }

    fn fail_all(&self, err: FetchError) {
        let mut l = self.lock();
        for tag in l.state.drain() {
            for w in l.waiters.remove(&tag).unwrap_or_default() {
                let _ = w.send(Err(err.clone()));
            }
        }
        // Dropping the senders ends every watcher.
        l.watchers.clear();
    }
}

/// When the receive loop must turn next: the state's timers, and the cache probes of fetches
/// held elsewhere, which the loop makes on every turn.
fn next_turn(state: &FetchState) -> Instant {
    let due = state.poll_timeout();
    state.probe_timeout().map_or(due, |t| t.min(due))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An engine on lo whose receive thread sleeps, nothing pending, and until when.
    fn sleeping_engine(config: FetchConfig) -> (Fetcher, Instant, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(lcfs_cache::CacheConfig::new(dir.path())).unwrap();
        let lo = Iface {
            name: "lo".into(),
            index: 1,
            mtu: 65536,
        };
        let config = FetchConfig { port: 0, ..config };
        let fetcher = Fetcher::start(Channel::new("t", None), lo, cache, config).unwrap();
        let until = loop {
            if let Some(until) = fetcher.inner.lock().asleep_until {
                break until;
            }
            std::thread::yield_now();
        };
        (fetcher, until, dir)
    }

    /// A request made while the receive thread sleeps (nothing pending: until its idle tick,
    /// a second away) wakes it, so the request's timers run on time: the fetch of an object
    /// nobody sends fails after its timeout, not at the thread's next idle tick.
    #[test]
    fn a_request_wakes_the_sleeping_receive_thread_for_its_timers() {
        let config = FetchConfig {
            timeout: Duration::from_millis(100),
            stall: Duration::from_secs(60),
            ..Default::default()
        };
        let (fetcher, until, _dir) = sleeping_engine(config);
        let nobody = Verified::hash_of(b"an object nobody sends".to_vec());
        let want = ObjectRef {
            hash: ObjectHash::of_verified(&nobody),
            len: nobody.len() as u32,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let got = rt.block_on(fetcher.fetch(want, Priority::Demand));
        let failed = Instant::now();
        assert!(matches!(got, Err(FetchError::Timeout { .. })), "{got:?}");
        assert!(
            failed < until,
            "failed {:?} after the thread's wait would have ended on its own",
            failed - until
        );
    }

    /// A wait that ends without a datagram (a wake, or a timer) takes nothing: the last batch
    /// is not taken again. It was, once: a mount then heard its server's last root record
    /// at every wake, and said the server was online long after it was killed.
    #[test]
    fn a_wait_that_ends_without_a_datagram_takes_nothing_again() {
        let (fetcher, _, _dir) = sleeping_engine(FetchConfig::default());
        let inner = &fetcher.inner;
        let port = inner.socket.local_addr().unwrap();
        let port = port.as_socket_ipv6().unwrap().port();
        let tx = std::net::UdpSocket::bind("[::1]:0").unwrap();
        tx.send_to(b"unicast, never acted on", ("::1", port))
            .unwrap();
        let packets = || inner.stats.packets.load(Ordering::Relaxed);
        let asleep_again = || {
            while inner.lock().asleep_until.is_none() {
                std::thread::yield_now();
            }
        };
        while packets() == 0 {
            std::thread::yield_now();
        }
        for _ in 0..3 {
            inner.lock().asleep_until = None;
            inner.wake.wake();
            asleep_again();
        }
        assert_eq!(packets(), 1);
    }

    /// Dropping the engine ends its sleeping receive thread at once: a `copy` waits for it
    /// before it exits.
    #[test]
    fn dropping_the_engine_wakes_its_sleeping_receive_thread() {
        let (fetcher, until, _dir) = sleeping_engine(FetchConfig::default());
        drop(fetcher);
        let ended = Instant::now();
        assert!(
            ended < until,
            "ended {:?} after the thread's wait would have ended on its own",
            ended - until
        );
    }
}
