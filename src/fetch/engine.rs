//! The I/O shell of the fetch engine: socket, receive thread, joins and waiters.
//!
//! Root records reach watchers ([`Fetcher::watch_roots`]: opening a tree listens through one
//! for a short while, a mount and `copy --watch` for as long as they follow the publisher),
//! for whom the root group stays joined; it is rejoined every
//! [`ROOT_WATCH_REJOIN`] while nothing is heard, so that a restarted server learns of the
//! watcher at once. When the channel moves to a new generation,
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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv6Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lcfs_cache::{Cache, Verified};
use socket2::Socket;
use tokio::sync::{mpsc, oneshot};

use super::membership::{default_gap, Memberships};
use super::object::{Action, ObjectFetch, Timers};
use super::{FetchError, KEY_HINT};
use crate::channel::{Address, Channel, Tag};
use crate::mld::Reporter;
use crate::net::{recv_batch, set_membership, Envelope, Iface, RecvBatch};
use crate::object::{ObjectRef, RootRecord};
use crate::packet::{self, Body};

/// Which requests go first when more objects are wanted than groups may be joined.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    Demand = 0,
    Readahead = 1,
    Prefetch = 2,
}

/// Whether the reader asking for an object reads the channel's current generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freshness {
    /// The object is in the current tree: the server has it.
    Current,
    /// The object is of a file a later generation replaced or removed: the server may no
    /// longer have it, and the fetch fails as stale after `stale_after` without a symbol.
    Superseded,
}

/// While a root watcher hears nothing, its group is rejoined this often (a fresh report).
pub const ROOT_WATCH_REJOIN: Duration = Duration::from_secs(1);

/// How often joined fetches are looked up in the cache, which other processes may have
/// filled: a stat per joined object, and a leave within this of the other process's store.
const CACHED_ELSEWHERE_PROBE: Duration = Duration::from_millis(100);

/// Completed objects waiting to be stored: as many as `State::recent` keeps, so that a request
/// for one of them finds it there.
const STORE_QUEUE: usize = 64;

/// How often fetches waiting for another process are looked up in the cache: a stat each.
const ELSEWHERE_PROBE: Duration = Duration::from_millis(5);

/// How long a fetch waits for another process that holds its claim before joining anyway
/// (that process may be stopped). Joining earlier gains nothing, since the server sends
/// in its own order, but costs: a late joiner lacks the round under way and makes the
/// server send another.
const ELSEWHERE_PATIENCE: Duration = Duration::from_secs(5);

/// How often a fetch waiting for another process asks whether the claim is free again.
const CLAIM_RECHECK: Duration = Duration::from_millis(100);

/// Root records queued for a watcher that is slow to take them; more are dropped (a flood
/// of forged records must not grow memory; the server repeats its record every 25 ms).
const ROOT_WATCH_QUEUE: usize = 16;

#[derive(Clone, Debug)]
pub struct FetchConfig {
    /// A fetch fails after this long without a useful symbol.
    pub timeout: Duration,
    /// After this long without a useful symbol, leave and rejoin the group.
    pub stall: Duration,
    /// Groups joined at once at most, demand reads aside. Small on purpose: the kernel walks
    /// the host's list of joined groups for every multicast packet it receives, and 256 MiB
    /// unshaped took 2.9 s with 512 joined, 1.0 s with 32 (measured in the lab). Two MiB in
    /// flight still covers a LAN's round trip, and loss costs the same (5% per receiver:
    /// 13.5 s at 200 Mbit/s with 16 to 128).
    pub max_joined: usize,
    /// A fetch in doubt (the channel moved to a new generation, or a superseded file's
    /// reader asked for it) fails as stale after this long without a useful symbol. The
    /// server answers a join within a round trip and sends its first round of an object
    /// within a few hundred milliseconds when it has it.
    pub stale_after: Duration,
    pub port: u16,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            timeout: Duration::from_secs(30),
            stall: Duration::from_millis(400),
            max_joined: 32,
            stale_after: Duration::from_millis(750),
            port: crate::channel::DEFAULT_PORT,
        }
    }
}

/// Counters of a running engine.
#[derive(Default, Debug)]
pub struct FetchStats {
    pub packets: AtomicU64,
    pub malformed: AtomicU64,
    /// Datagrams not multicast to the group their tag names, on our interface: unicast,
    /// loopback, another interface, or a tag replayed onto another group. Never acted on.
    pub misaddressed: AtomicU64,
    pub unexpected: AtomicU64,
    pub forged_decodes: AtomicU64,
    pub objects_fetched: AtomicU64,
    pub bytes_fetched: AtomicU64,
    pub cache_hits: AtomicU64,
    pub bytes_cached: AtomicU64,
    pub rejoins: AtomicU64,
    /// Fetches failed as stale: in doubt after a new generation, and nothing came.
    pub stale: AtomicU64,
}

type Waiter = oneshot::Sender<Result<Verified, FetchError>>;

/// A root record as received, before any trust decision: the record and who sent it.
#[derive(Clone, Debug)]
pub struct HeardRoot {
    pub record: RootRecord,
    /// The sender's address: what trust on first use remembers on a clear, unsigned channel.
    pub from: Ipv6Addr,
}

/// Where a pending fetch stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for room in the window.
    Queued,
    /// In the window, asking the cache's owner whether another process fetches it (on
    /// the claim thread, so that the receive thread never waits on another process).
    Claiming { since: Instant },
    /// Its group is joined and its symbols decoded.
    Joined,
    /// Another process sharing the cache claimed it (see [`Cache::claim_fetch`]): it holds
    /// a place in the window but no group, and ends when that process stores the object;
    /// the claim is asked for again every [`CLAIM_RECHECK`], and after [`ELSEWHERE_PATIENCE`]
    /// the group is joined anyway.
    Elsewhere { since: Instant, recheck: Instant },
}

/// The answer to a claim (see [`Inner::ask_claim`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Claim {
    Granted,
    /// Another process is fetching the object.
    Elsewhere,
    /// The object is in the cache already.
    Cached,
}

struct Pending {
    fetch: ObjectFetch,
    group: Ipv6Addr,
    phase: Phase,
    priority: Priority,
    seq: u64,
    waiters: Vec<Waiter>,
}

/// The watchers of root records, and when the root group was last heard and joined for them.
struct RootWatch {
    senders: Vec<mpsc::Sender<HeardRoot>>,
    heard: Instant,
    joined: Instant,
}

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

struct State {
    pending: HashMap<Tag, Pending>,
    /// Not yet joined, in priority order: (priority, arrival) -> tag.
    queue: BTreeMap<(Priority, u64), Tag>,
    /// Places taken in the window: fetches joined or waiting for another process.
    joined: usize,
    /// The fetches in [`Phase::Elsewhere`].
    elsewhere: HashSet<Tag>,
    seq: u64,
    watch: Option<RootWatch>,
    /// Whether the root group is joined (for waiters or watchers).
    root_joined: bool,
    members: Memberships,
    /// Objects just decoded, until the cache surely has them: a request that arrives between
    /// the end of a fetch and the cache insert must not start the fetch again.
    recent: lru::LruCache<Tag, Verified>,
    /// The server's last beacon: objects it sends next, soonest first, and when it came.
    on_air: Vec<Tag>,
    on_air_at: Option<Instant>,
    /// Whether we listen to the beacon (while requests wait for room in the window).
    air_joined: bool,
    /// Senders whose symbols completed verified objects, or whose root record was trusted:
    /// their decoders are never evicted for a newcomer's (see [`ObjectFetch`]).
    good_senders: lru::LruCache<Ipv6Addr, ()>,
}

impl Default for State {
    fn default() -> Self {
        State {
            pending: HashMap::new(),
            queue: BTreeMap::new(),
            joined: 0,
            elsewhere: HashSet::new(),
            seq: 0,
            watch: None,
            root_joined: false,
            members: Memberships::new(default_gap()),
            // The cache's memory LRU shares these bytes; a few dozen cover the insert's delay.
            recent: lru::LruCache::new(std::num::NonZeroUsize::new(64).expect("non-zero")),
            on_air: Vec::new(),
            on_air_at: None,
            air_joined: false,
            good_senders: lru::LruCache::new(std::num::NonZeroUsize::new(8).expect("non-zero")),
        }
    }
}

struct Inner {
    channel: Channel,
    /// The channel's root record and beacon addresses (keyed hashes: derived once).
    root: Address,
    air: Address,
    iface: Iface,
    socket: Socket,
    /// Our own MLD reports of joins; `None` without CAP_NET_RAW.
    reporter: Option<Reporter>,
    cache: Cache,
    config: FetchConfig,
    state: Mutex<State>,
    stats: FetchStats,
    shutdown: AtomicBool,
    /// Claims to ask the cache's owner about (see [`Inner::claim_loop`]).
    claimer: std::sync::OnceLock<std::sync::mpsc::Sender<(Tag, blake3::Hash)>>,
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
        let mut state = State::default();
        if reporter.is_some() {
            // Our own reports do not wait for the kernel's timer: no batching needed.
            state.members = Memberships::new(Duration::ZERO);
        }
        let inner = Arc::new(Inner {
            root: channel.root_address(),
            air: channel.air_address(),
            channel,
            iface,
            socket,
            reporter,
            cache,
            config,
            state: Mutex::new(state),
            stats: FetchStats::default(),
            shutdown: AtomicBool::new(false),
            claimer: std::sync::OnceLock::new(),
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
        let rx = self.inner.request(r, priority, freshness);
        rx.await.map_err(|_| FetchError::Closed)?
    }

    /// The channel moved to a new generation: every pending fetch is in doubt from now on
    /// (what the server still has keeps coming; the rest fails as stale within
    /// `stale_after`), and joined groups are reported afresh, for a server that restarted.
    pub fn handle_new_generation(&self) {
        let now = Instant::now();
        let mut st = self.inner.lock();
        let mut rejoin = Vec::new();
        for p in st.pending.values_mut() {
            p.fetch.handle_doubt(now);
            if p.phase == Phase::Joined {
                p.fetch.handle_joined(now);
                rejoin.push(p.group);
            }
        }
        for group in rejoin {
            st.members.push(now, group, false);
            st.members.push(now, group, true);
        }
        self.inner.flush(&mut st, now);
    }

    /// Root records from now on, as heard (not yet trusted); the root group stays joined
    /// until the watcher is dropped.
    pub fn watch_roots(&self) -> RootWatcher {
        let (tx, rx) = mpsc::channel(ROOT_WATCH_QUEUE);
        let now = Instant::now();
        let mut st = self.inner.lock();
        let watch = st.watch.get_or_insert_with(|| RootWatch {
            senders: Vec::new(),
            heard: now,
            joined: now,
        });
        watch.senders.push(tx);
        self.inner.update_root_membership(&mut st, now);
        self.inner.flush(&mut st, now);
        RootWatcher { rx }
    }

    /// Starts fetching every object of `refs` that is not cached, without waiting: their
    /// joins go out together, in one MLD report. A later [`Fetcher::fetch`] of one of them
    /// shares the fetch already under way. Cached ones are read ahead from disk instead
    /// ([`Cache::will_need`]), in the background when there is a runtime to do it on.
    pub fn start_fetches(&self, refs: &[ObjectRef], priority: Priority) {
        let cache = &self.inner.cache;
        let (cached, missing): (Vec<ObjectRef>, Vec<ObjectRef>) =
            refs.iter().partition(|r| cache.contains(&r.hash));
        if !missing.is_empty() {
            self.inner.start(&missing, priority);
        }
        if !cached.is_empty() {
            let hashes: Vec<blake3::Hash> = cached.iter().map(|r| r.hash).collect();
            let cache = cache.clone();
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(rt.spawn_blocking(move || cache.will_need(&hashes))),
                Err(_) => cache.will_need(&hashes),
            }
        }
    }

    /// The object from the cache alone.
    pub fn cached(&self, r: &ObjectRef) -> Result<Option<Verified>, FetchError> {
        let hit = self
            .inner
            .cache
            .get(&r.hash)
            .map_err(|e| FetchError::Cache(e.to_string()))?;
        if let Some(v) = &hit {
            self.inner.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            self.inner
                .stats
                .bytes_cached
                .fetch_add(v.len() as u64, Ordering::Relaxed);
        }
        Ok(hit)
    }

    /// Tells the engine that `sender` is a real server of the channel (its root record was
    /// trusted), so that its symbols keep their decoders under a flood.
    pub fn prefer_sender(&self, sender: Ipv6Addr) {
        self.inner.lock().good_senders.put(sender, ());
    }

    /// How long a fetch may go without a useful symbol.
    pub fn timeout(&self) -> Duration {
        self.inner.config.timeout
    }

    /// The error a fetch of `what` that timed out gives.
    pub fn timeout_error(&self, what: &str) -> FetchError {
        self.inner.timeout_error(what)
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn request(
        &self,
        r: ObjectRef,
        priority: Priority,
        freshness: Freshness,
    ) -> oneshot::Receiver<Result<Verified, FetchError>> {
        let (tx, rx) = oneshot::channel();
        let mut st = self.lock();
        self.register(&mut st, r, priority, freshness, Some(tx));
        self.admit(&mut st);
        self.flush(&mut st, Instant::now());
        rx
    }

    /// Adds a waiter (or none) for `r`, creating its pending fetch if there is none. A
    /// current reader vouches for the object; a superseded one puts a new fetch in doubt.
    fn register(
        &self,
        st: &mut State,
        r: ObjectRef,
        priority: Priority,
        freshness: Freshness,
        waiter: Option<Waiter>,
    ) {
        let addr = self.channel.object_address(&r.hash);
        if let Some(v) = st.recent.get(&addr.tag).filter(|v| *v.hash() == r.hash) {
            if let Some(w) = waiter {
                let _ = w.send(Ok(v.clone()));
            }
            return;
        }
        if let Some(p) = st.pending.get_mut(&addr.tag) {
            p.waiters.extend(waiter);
            if freshness == Freshness::Current {
                p.fetch.handle_vouched();
            }
            if priority < p.priority && p.phase == Phase::Queued {
                let old = (p.priority, p.seq);
                p.priority = priority;
                let key = (priority, p.seq);
                st.queue.remove(&old);
                st.queue.insert(key, addr.tag);
            }
            return;
        }
        st.seq += 1;
        let seq = st.seq;
        let now = Instant::now();
        let mut fetch = ObjectFetch::new(now, r);
        if freshness == Freshness::Superseded {
            fetch.handle_doubt(now);
        }
        st.pending.insert(
            addr.tag,
            Pending {
                fetch,
                group: addr.group,
                phase: Phase::Queued,
                priority,
                seq,
                waiters: waiter.into_iter().collect(),
            },
        );
        st.queue.insert((priority, seq), addr.tag);
    }

    fn start(&self, refs: &[ObjectRef], priority: Priority) {
        let mut st = self.lock();
        for r in refs {
            self.register(&mut st, *r, priority, Freshness::Current, None);
        }
        self.admit(&mut st);
        self.flush(&mut st, Instant::now());
    }

    /// Joins or leaves the root group as waiters and watchers come and go.
    fn update_root_membership(&self, st: &mut State, now: Instant) {
        if let Some(w) = &mut st.watch {
            w.senders.retain(|s| !s.is_closed());
        }
        if st.watch.as_ref().is_some_and(|w| w.senders.is_empty()) {
            st.watch = None;
        }
        let wanted = st.watch.is_some();
        if wanted != st.root_joined {
            st.root_joined = wanted;
            st.members.push(now, self.root.group, wanted);
        }
    }

    /// Leaves and joins the root group again: the kernel sends a fresh report.
    fn rejoin_root(&self, st: &mut State, now: Instant) {
        if st.root_joined {
            st.members.push(now, self.root.group, false);
            st.members.push(now, self.root.group, true);
        }
    }

    /// Joins demand reads, then queued objects while there is room in the window: what the
    /// server's last beacon says is on air first, then the rest in order. Listens to the beacon
    /// while other requests wait.
    fn admit(&self, st: &mut State) {
        // A program waits for a demand read: it never waits for room.
        while let Some((&(Priority::Demand, _), &tag)) = st.queue.first_key_value() {
            st.queue.pop_first();
            self.join(st, tag);
        }
        let room = |st: &State| st.joined < self.config.max_joined;
        let fresh = st.on_air_at.is_some_and(|t| t.elapsed() < Self::AIR_FRESH);
        let mut i = 0;
        while fresh && room(st) && i < st.on_air.len() {
            let tag = st.on_air[i];
            i += 1;
            let key = match st.pending.get(&tag) {
                Some(p) if p.phase == Phase::Queued => (p.priority, p.seq),
                _ => continue,
            };
            st.queue.remove(&key);
            self.join(st, tag);
        }
        while room(st) {
            let Some((_, tag)) = st.queue.pop_first() else {
                break;
            };
            self.join(st, tag);
        }
        let waiting = !st.queue.is_empty();
        if waiting != st.air_joined {
            st.air_joined = waiting;
            st.members.push(Instant::now(), self.air.group, waiting);
        }
    }

    /// How long a beacon's list is worth following.
    const AIR_FRESH: Duration = Duration::from_millis(200);

    /// Gives `tag` a place in the window: joins its group, unless another process sharing
    /// the cache is fetching it already.
    fn join(&self, st: &mut State, tag: Tag) {
        if !st.pending.contains_key(&tag) {
            return;
        }
        let now = Instant::now();
        st.joined += 1;
        self.claim(st, tag, now, now);
    }

    /// Claims the fetch of `tag` (see [`Cache::claim_fetch`]), which has had a place in the
    /// window since `since`: at once if this process owns the cache (a table in memory), else
    /// on the claim thread; without a claim thread it is joined unclaimed.
    fn claim(&self, st: &mut State, tag: Tag, since: Instant, now: Instant) {
        let Some(p) = st.pending.get_mut(&tag) else {
            return;
        };
        let hash = p.fetch.want().hash;
        if self.cache.is_owner() {
            let answer = self.ask_claim(&hash);
            return self.claimed(st, tag, since, answer, now);
        }
        match self.claimer.get() {
            Some(tx) if tx.send((tag, hash)).is_ok() => p.phase = Phase::Claiming { since },
            _ => self.join_group(st, tag, now),
        }
    }

    /// Asks for the claim of `hash`; an object stored meanwhile (the claim of the process
    /// that stored it ended with the store) is not fetched again, and its claim is given back.
    fn ask_claim(&self, hash: &blake3::Hash) -> Claim {
        if !self.cache.claim_fetch(hash) {
            return Claim::Elsewhere;
        }
        if self.cache.contains(hash) {
            self.cache.release_fetch(hash);
            return Claim::Cached;
        }
        Claim::Granted
    }

    /// Applies the answer to a claim: join, or wait for the process that has it (or for the
    /// next look into the cache, which has it).
    fn claimed(&self, st: &mut State, tag: Tag, since: Instant, answer: Claim, now: Instant) {
        if answer == Claim::Granted {
            return self.join_group(st, tag, now);
        }
        if let Some(p) = st.pending.get_mut(&tag) {
            p.phase = Phase::Elsewhere {
                since,
                recheck: now + CLAIM_RECHECK,
            };
            st.elsewhere.insert(tag);
        }
    }

    /// The claim thread: asks the cache's owner about claims, so that the receive thread
    /// never waits on another process.
    fn claim_loop(&self, rx: &std::sync::mpsc::Receiver<(Tag, blake3::Hash)>) {
        while !self.shutdown.load(Ordering::Relaxed) {
            let Ok(first) = rx.recv_timeout(Duration::from_millis(100)) else {
                continue;
            };
            let asked: Vec<(Tag, blake3::Hash)> =
                std::iter::once(first).chain(rx.try_iter()).collect();
            let answers: Vec<Claim> = asked.iter().map(|(_, h)| self.ask_claim(h)).collect();
            let now = Instant::now();
            let mut unwanted = Vec::new();
            {
                let mut st = self.lock();
                for (&(tag, hash), answer) in asked.iter().zip(answers) {
                    match st.pending.get(&tag).map(|p| p.phase) {
                        Some(Phase::Claiming { since }) => {
                            self.claimed(&mut st, tag, since, answer, now)
                        }
                        // Ended meanwhile (found in the cache): give the claim back.
                        _ if answer == Claim::Granted => unwanted.push(hash),
                        _ => {}
                    }
                }
                self.flush(&mut st, now);
            }
            unwanted.iter().for_each(|h| self.cache.release_fetch(h));
        }
    }

    fn join_group(&self, st: &mut State, tag: Tag, now: Instant) {
        let Some(p) = st.pending.get_mut(&tag) else {
            return;
        };
        p.phase = Phase::Joined;
        p.fetch.handle_started(now);
        let group = p.group;
        st.elsewhere.remove(&tag);
        st.members.push(now, group, true);
    }

    /// Applies queued membership changes if their batch is due, and reports them without
    /// waiting for the kernel (see [`Reporter`]).
    fn flush(&self, st: &mut State, now: Instant) {
        let Some(ops) = st.members.poll_flush(now) else {
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

    /// The receive loop. Completed objects go to a second thread that stores them and then
    /// answers their waiters, so that the cache write (a file, and for a process sharing the
    /// cache a message to its owner) never holds up decoding, leaves and joins.
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
                .spawn_scoped(scope, move || {
                    while let Ok(first) = store_rx.recv() {
                        let more = store_rx.try_iter().take(STORE_QUEUE);
                        this.complete(std::iter::once(first).chain(more).collect());
                    }
                });
            if let Err(e) = storer {
                tracing::error!("cannot start the thread that stores fetched objects: {e}");
                return;
            }
            this.receive(&store_tx);
            drop(store_tx);
        });
        self.fail_all(FetchError::Closed);
    }

    fn receive(&self, store: &std::sync::mpsc::SyncSender<(Verified, Vec<Waiter>)>) {
        let mut batch = RecvBatch::new(64, 65536);
        let mut last_tick = Instant::now();
        let mut last_probe = last_tick;
        let mut last_elsewhere = last_tick;
        while !self.shutdown.load(Ordering::Relaxed) {
            match recv_batch(&self.socket, &mut batch) {
                Ok(_) => {
                    for done in self.handle_batch(&mut batch) {
                        // Blocks only while the disk is this far behind: back pressure.
                        let _ = store.send(done);
                    }
                }
                Err(e) => {
                    tracing::warn!("receiving on {} failed: {e}", self.iface.name);
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            let now = Instant::now();
            if now.duration_since(last_probe) >= CACHED_ELSEWHERE_PROBE {
                last_probe = now;
                self.take_cached_elsewhere(false);
            }
            if now.duration_since(last_elsewhere) >= ELSEWHERE_PROBE {
                last_elsewhere = now;
                self.poll_elsewhere(now);
            }
            if now.duration_since(last_tick) >= Duration::from_millis(20) {
                last_tick = now;
                self.tick(now);
            } else {
                self.flush(&mut self.lock(), now);
            }
        }
    }

    /// Handles received datagrams; returns the objects they completed, with their waiters.
    fn handle_batch(&self, batch: &mut RecvBatch) -> Vec<(Verified, Vec<Waiter>)> {
        let now = Instant::now();
        let seal = self.channel.seal();
        let mut done = Vec::new();
        {
            let mut st = self.lock();
            for (env, dgram) in batch.datagrams() {
                self.stats.packets.fetch_add(1, Ordering::Relaxed);
                // Cheap before any decryption: only multicast on our interface can be ours.
                if !env.to.is_some_and(|to| to.is_multicast()) || env.ifindex != self.iface.index {
                    self.stats.misaddressed.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let Ok(pkt) = packet::decode(dgram, seal) else {
                    self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                match pkt.body {
                    Body::Symbol { esi, data } => {
                        if let Some(v) = self.handle_symbol(&mut st, now, env, pkt.tag, esi, data) {
                            done.push(v);
                        }
                    }
                    Body::Root(bytes) if pkt.tag == self.root.tag => {
                        if !env.is_group(&self.root.group, self.iface.index) {
                            self.stats.misaddressed.fetch_add(1, Ordering::Relaxed);
                        } else {
                            self.handle_root(&mut st, env.from, bytes);
                        }
                    }
                    Body::Air(_) if !env.is_group(&self.air.group, self.iface.index) => {
                        self.stats.misaddressed.fetch_add(1, Ordering::Relaxed);
                    }
                    Body::Air(tags) if pkt.tag == self.air.tag => {
                        st.on_air = packet::air_tags(tags).collect();
                        st.on_air_at = Some(now);
                    }
                    Body::Root(_) | Body::Air(_) => {
                        self.stats.unexpected.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            // Leaves first: admitting may wait on claims (see `join`).
            self.flush(&mut st, now);
            self.admit(&mut st);
            self.flush(&mut st, now);
        }
        done
    }

    fn handle_symbol(
        &self,
        st: &mut State,
        now: Instant,
        env: Envelope,
        tag: Tag,
        esi: u32,
        data: &[u8],
    ) -> Option<(Verified, Vec<Waiter>)> {
        let Some(p) = st
            .pending
            .get_mut(&tag)
            .filter(|p| p.phase == Phase::Joined)
        else {
            self.stats.unexpected.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        // A symbol counts only on its own object's group: a tag copied onto another group
        // (or onto unicast) is someone else's packet.
        if !env.is_group(&p.group, self.iface.index) {
            self.stats.misaddressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let forged = p.fetch.stats.forged_decodes;
        let preferred = st.good_senders.contains(&env.from);
        let v = p.fetch.handle_symbol(now, env.from, preferred, esi, data);
        if p.fetch.stats.forged_decodes > forged {
            self.stats.forged_decodes.fetch_add(1, Ordering::Relaxed);
        }
        let v = v?;
        st.good_senders.put(env.from, ());
        st.recent.put(tag, v.clone());
        let p = st.pending.remove(&tag)?;
        st.joined -= 1;
        st.members.push(Instant::now(), p.group, false);
        Some((v, p.waiters))
    }

    fn handle_root(&self, st: &mut State, from: Ipv6Addr, bytes: &[u8]) {
        let record = match RootRecord::decode(bytes) {
            Ok(r) if r.channel_id == *self.channel.id() => r,
            _ => {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let heard = HeardRoot { record, from };
        let now = Instant::now();
        if let Some(w) = &mut st.watch {
            w.heard = now;
            for tx in &w.senders {
                // Full: the watcher is behind; the server repeats its record anyway.
                let _ = tx.try_send(heard.clone());
            }
        }
        self.update_root_membership(st, now);
    }

    /// Stores fetched objects (in one request to the cache's owner when it is another
    /// process), then hands them to their waiters: a reader that gets an object can pin it.
    fn complete(&self, done: Vec<(Verified, Vec<Waiter>)>) {
        let objects: Vec<Verified> = done.iter().map(|(v, _)| v.clone()).collect();
        for v in &objects {
            tracing::trace!(hash = %&v.hash().to_hex()[..12], len = v.len(), "fetched");
            self.stats.objects_fetched.fetch_add(1, Ordering::Relaxed);
            self.stats
                .bytes_fetched
                .fetch_add(v.len() as u64, Ordering::Relaxed);
        }
        if let Err(e) = self.cache.insert_all(&objects) {
            tracing::warn!("cannot store fetched objects in the cache: {e}");
        }
        for (v, waiters) in done {
            for w in waiters {
                let _ = w.send(Ok(v.clone()));
            }
        }
    }

    /// Ends the fetches (waiting for another process if `waiting`, else joined) whose object
    /// another process sharing the cache has stored meanwhile: their waiters get it from the
    /// cache and joined groups are left. Waiting fetches end this way; joined ones rarely
    /// (a claim lost with a dead owner).
    fn take_cached_elsewhere(&self, waiting: bool) {
        let candidates: Vec<(Tag, blake3::Hash)> = {
            let st = self.lock();
            let want = |(tag, p): (&Tag, &Pending)| (*tag, p.fetch.want().hash);
            if waiting {
                let of = |tag: &Tag| st.pending.get_key_value(tag).map(want);
                st.elsewhere.iter().filter_map(of).collect()
            } else {
                let joined = |e: &(&Tag, &Pending)| e.1.phase == Phase::Joined;
                st.pending.iter().filter(joined).map(want).collect()
            }
        };
        for (tag, hash) in candidates {
            if !self.cache.contains(&hash) {
                continue;
            }
            // Read (and re-hashed) outside the state lock; a file evicted meanwhile is
            // simply fetched on.
            if let Ok(Some(v)) = self.cache.get(&hash) {
                self.finish_from_cache(tag, v);
            }
        }
    }

    /// Completes the pending fetch `tag` with `v`, found in the cache.
    fn finish_from_cache(&self, tag: Tag, v: Verified) {
        let waiters = {
            let mut st = self.lock();
            let Some(p) = st.pending.remove(&tag) else {
                return;
            };
            st.elsewhere.remove(&tag);
            if p.phase == Phase::Joined {
                st.members.push(Instant::now(), p.group, false);
                self.cache.release_fetch(v.hash());
            }
            if p.phase != Phase::Queued {
                st.joined -= 1;
            }
            st.recent.put(tag, v.clone());
            p.waiters
        };
        self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_cached
            .fetch_add(v.len() as u64, Ordering::Relaxed);
        for w in waiters {
            let _ = w.send(Ok(v.clone()));
        }
    }

    /// Fetches waiting for another process: taken from the cache once stored there; joined
    /// when the claim becomes ours (that process gave up or died) or after `stale_after`.
    fn poll_elsewhere(&self, now: Instant) {
        if self.lock().elsewhere.is_empty() {
            return;
        }
        self.take_cached_elsewhere(true);
        let mut st = self.lock();
        let due: Vec<(Tag, Instant)> = st
            .elsewhere
            .iter()
            .filter_map(|tag| match st.pending.get(tag).map(|p| p.phase) {
                Some(Phase::Elsewhere { since, recheck }) if now >= recheck => Some((*tag, since)),
                _ => None,
            })
            .collect();
        for (tag, since) in due {
            if now.duration_since(since) >= ELSEWHERE_PATIENCE {
                self.join_group(&mut st, tag, now);
            } else {
                st.elsewhere.remove(&tag);
                self.claim(&mut st, tag, since, now);
            }
        }
        self.flush(&mut st, now);
    }

    /// Timers: rejoin stalled groups, fail fetches that timed out or went stale.
    fn tick(&self, now: Instant) {
        let timers = Timers {
            stall: self.config.stall,
            timeout: self.config.timeout,
            stale_after: self.config.stale_after,
        };
        let mut failed = Vec::new();
        let mut rejoin = Vec::new();
        let mut st = self.lock();
        for (tag, p) in st
            .pending
            .iter_mut()
            .filter(|(_, p)| p.phase == Phase::Joined)
        {
            match p.fetch.poll_action(now, &timers) {
                Action::Wait => {}
                Action::Rejoin => {
                    self.stats.rejoins.fetch_add(1, Ordering::Relaxed);
                    rejoin.push(p.group);
                    p.fetch.handle_joined(now);
                }
                Action::Fail => failed.push((*tag, false)),
                Action::Stale => failed.push((*tag, true)),
            }
        }
        for group in rejoin {
            // A leave and a join make the kernel send a fresh report for the group.
            st.members.push(Instant::now(), group, false);
            st.members.push(Instant::now(), group, true);
        }
        for (tag, stale) in failed {
            self.fail_pending(&mut st, tag, stale);
        }
        self.tick_root(&mut st, now);
        self.admit(&mut st);
        self.flush(&mut st, now);
    }

    /// Ends the pending fetch `tag` with a timeout, or as stale.
    fn fail_pending(&self, st: &mut State, tag: Tag, stale: bool) {
        let Some(p) = st.pending.remove(&tag) else {
            return;
        };
        st.joined -= 1;
        st.elsewhere.remove(&tag);
        if p.phase == Phase::Joined {
            st.members.push(Instant::now(), p.group, false);
            self.cache.release_fetch(&p.fetch.want().hash);
        }
        let what = format!("object {}", &p.fetch.want().hash.to_hex()[..16]);
        let err = if stale {
            self.stats.stale.fetch_add(1, Ordering::Relaxed);
            FetchError::Stale {
                channel: self.channel.name().to_owned(),
                what,
            }
        } else {
            self.timeout_error(&what)
        };
        p.waiters
            .into_iter()
            .for_each(|w| drop(w.send(Err(err.clone()))));
    }

    /// Root timers: the group is rejoined while nothing is heard.
    fn tick_root(&self, st: &mut State, now: Instant) {
        let mut rejoin = false;
        if let Some(w) = st.watch.as_mut() {
            if now.duration_since(w.heard.max(w.joined)) >= ROOT_WATCH_REJOIN {
                w.joined = now;
                rejoin = true;
            }
        }
        self.update_root_membership(st, now);
        if rejoin {
            self.rejoin_root(st, now);
        }
    }

    fn timeout_error(&self, what: &str) -> FetchError {
        FetchError::Timeout {
            channel: self.channel.name().to_owned(),
            what: what.to_owned(),
            secs: self.config.timeout.as_secs(),
            iface: self.iface.name.clone(),
            hint: if self.channel.seal().is_some() {
                KEY_HINT
            } else {
                ""
            },
        }
    }

    fn fail_all(&self, err: FetchError) {
        let mut st = self.lock();
        for (_, p) in st.pending.drain() {
            p.waiters
                .into_iter()
                .for_each(|w| drop(w.send(Err(err.clone()))));
        }
        // Dropping the senders ends every watcher.
        st.watch = None;
    }
}
