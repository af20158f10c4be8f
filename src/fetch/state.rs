//! The receiver's protocol state for one channel (sans-IO): which objects are wanted, which
//! groups are joined, what arriving datagrams complete, and when to rejoin, give up or ask.
//!
//! [`FetchState`] is fed requests, datagrams, answers and time (`now` is always a parameter)
//! and says what to do through `poll_*`: membership changes to make and report, claims to
//! ask the cache's owner about, cache lookups to make, and [`Event`]s (an object completed, a
//! fetch failed, a root record heard). It owns no socket, thread, clock or cache, so tests
//! and the network simulation drive it directly; `super::engine` is its I/O shell.
//!
//! A datagram is handled in three steps, so that a shell that shares the state between
//! threads can run the costly ones outside its lock: [`Opener::open`] checks and decrypts
//! (no state), [`FetchState::handle_packet`] routes a symbol to its fetch and gives back a
//! [`Feed`], whose [`Feed::run`] decodes and hashes (the fetch's own decoders, no state),
//! and [`FetchState::handle_fed`] follows what it did. [`FetchState::handle_datagram`] takes
//! the three at once. A fetch may end between the last two (another thread failed it); a
//! verified object is then completed all the same.
//!
//! A fetch goes `Queued` (waiting for room in the window) → `Claiming` (asking whether
//! another process sharing the cache fetches it) → `Joined` (symbols decoded) or `Elsewhere`
//! (waiting for that process to store it) → done. Demand reads never wait for room; other
//! requests share a window of `max_joined` places (four times as many once the receiver
//! measures loss in bursts, see `LOSSY`), filled first with what the server's beacon lists
//! as on air. Requests of one turn enter the window together, and a receiver
//! that asks for more than the window holds without a fresh beacon waits up to
//! `BEACON_WAIT` for one, so that receivers starting a few milliseconds apart share rounds
//! (DESIGN.md had receivers admit in their own order at once; in the simulation that cost
//! 1.30 times one receiver's bytes at 100 receivers and 5% loss, 1.12 with the wait).
//! A request for a small file whose directory's bundles are known (`handle_bundles`, see
//! [`crate::wire::object::bundle`]) rides on its bundle's fetch: one place in the window, one
//! group, one decode that completes every member, asked for or not (the cache keeps them:
//! the reader of one small file is likely to read its neighbours). The bundle is claimed and
//! probed like an object, but waiters wait on their member's tag, and a bundle fetch ends
//! when it decodes, fails (failing each rider), or when every rider was found in the cache.
//! Invariants:
//! - `riding` maps exactly the riders of the pending bundle fetches to their bundle's tag;
//! - `in_window` counts the fetches in `Claiming`, `Joined` and `Elsewhere`; `joined` and
//!   `elsewhere` hold exactly the tags in `Joined` and in `Elsewhere`; a group is joined
//!   exactly while its fetch is `Joined` (plus the root group while watched, the beacon group
//!   while requests wait, one loss level's group while the receiver reports its loss, and
//!   the bulk and hurry reports' groups, see `super::intent`);
//! - symbols count only when multicast to their own object's group on our interface;
//! - every fetch ends: completed, found in the cache, failed by its timers (`timeout`, or
//!   `stale_after` when in doubt), or joined anyway after [`ELSEWHERE_PATIENCE`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::Ipv6Addr;
use std::num::NonZeroUsize;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lcfs_cache::Verified;

use super::config::{FetchConfig, FetchStats, Freshness, HeardRoot, Priority};
use super::intent::IntentReport;
use super::loss::{EsiSpan, LossReport};
use super::membership::Memberships;
use super::object::{Action, Decoding, Fed, ObjectFetch, Timers};
use crate::net::Envelope;
use crate::wire::channel::{Address, Channel, Tag};
use crate::wire::fec::Esi;
use crate::wire::object::bundle::{Bundle, Bundling};
use crate::wire::object::{ObjectHash, ObjectRef, RootRecord};
use crate::wire::packet::{self, Body, Packet};

/// While the root group is watched and nothing is heard, it is rejoined this often (a fresh
/// report), so that a restarted server learns of the watcher at once.
pub const ROOT_WATCH_REJOIN: Duration = Duration::from_secs(1);

/// A root record is handed on again at most this often while it does not change. The server
/// repeats it every 25 ms for as long as anyone listens; a mount that handed on every copy
/// ran its follower's trust check (a signature, on a signed channel) forty times a second,
/// and woke its runtime over a hundred times a second, to learn nothing. A new record, or
/// one from another sender, goes on at once; a repeat still says the server is there.
pub const ROOT_REPEAT: Duration = Duration::from_secs(1);

/// Senders whose last record is remembered for [`ROOT_REPEAT`]: the servers of a channel,
/// two as a rule. A flood of forged senders only evicts them, and is handed on as before.
const ROOT_SENDERS: usize = 4;

/// How long a beacon's list is worth following.
const AIR_FRESH: Duration = Duration::from_millis(200);

/// The beacon's soonest rounds a receiver joins beyond its window, when it has asked for
/// them: they go out within a beacon interval, and a receiver that joins one after it
/// started needs a round of its own later. In the simulation (1,000-file tree, 100
/// receivers, 5% loss, seed 11) 1.43 rather than 1.50 times one receiver's bytes.
const AIR_AHEAD: usize = 8;

/// A receiver that measures at least this loss in bursts ([`super::loss`]) joins
/// [`LOSSY_WINDOW`] times `max_joined` groups at once (see [`FetchState::window`]). Under
/// loss in bursts a receiver of a tree of small files loses whole rounds, falls behind the
/// others, and asks for objects after every other receiver left them, which then go out
/// again for it: in the simulation (`examples/sim`, 1,000 files of 100 B to 16 KiB in 20
/// directories, 5% loss in bursts of 5) server bytes at N receivers over one's went from
/// 1.98 to 1.46 (100, seed 12), 2.82 to 1.88 and 2.55 to 2.04 (1000, seeds 6 and 7), 2.38
/// to 1.53 (100, 20% loss in bursts, seed 7); files under bursts and every scenario of
/// independent loss moved by 0.07 at most. Not kept, measured on the same scenarios: places
/// given back by fetches that fell behind (no symbol for 40 ms, and a later fetch got
/// symbols; nothing moved, as the receiver that falls behind still asks in its own order),
/// and first rounds that wait 300 ms rather than 100 for every bulk receiver (worse). A
/// receiver without loss keeps the small window, and with it the CPU it saves in the lab
/// (`FetchConfig`): `tools/bench` (tree_10k, seed 881207) gave a shaped copy 1.03 s of CPU
/// before and 1.08 s after, eight shaped copies 1.36 and 1.40 times one copy's time, within
/// the spread of runs, as the lab's links lose nothing.
///
/// Only for loss in bursts ([`BURSTY_RUN`]): under independent loss it bought nothing
/// (within 0.07 either way, above; the simulation's tests all hold without it), and with
/// starts spread over seconds it cost the server dearly. A receiver that started late
/// joined four windows of its own place in the tree, each object queued for it alone, while
/// the beacon's carousel of what the others fetch filled a quarter of its window; blocks
/// were activated three times each. In the simulation (10,000 files of 100 B to 16 KiB, 100
/// receivers starting over 5 s, 5% loss, seed 9301) 1.40 times the server that keeps nobody
/// waiting, 1.07 with the small window; over 10 s at 20% (seed 9302) 2.09 and 1.46 (what is
/// left there is the directories', `serve::sched`). The tree under bursts at 100 receivers
/// (seed 11) stays at 1.43 with the large window, 1.67 without.
const LOSSY: f64 = 0.01;

/// The mean run of lost symbols ([`super::loss::LossReport::mean_run`]) from which loss
/// counts as bursty for [`LOSSY_WINDOW`]: independent loss makes runs of 1 / (1 - p), 1.25
/// at 20% and 1.05 at 5%, and the simulation's bursts of 5 about 5.
const BURSTY_RUN: f64 = 2.0;

/// How many times `max_joined` a lossy receiver's window holds.
const LOSSY_WINDOW: usize = 4;

/// How long a receiver that asks for more than its window holds waits for the server's
/// beacon before filling the window in its own order (the server sends it every 50 ms while
/// rounds are queued; an idle server sends none, and then this is the whole cost).
const BEACON_WAIT: Duration = Duration::from_millis(60);

/// Slots a fetch's [`EsiSpan`] gathers before they are counted into the loss report.
const COUNT_EVERY: usize = 16;

/// How often fetches waiting for another process are looked up in the cache (a stat each).
const ELSEWHERE_PROBE: Duration = Duration::from_millis(5);

/// How often joined fetches are looked up in the cache, which another process may have
/// filled despite the claims (a claim lost with a dead owner).
const JOINED_PROBE: Duration = Duration::from_millis(100);

/// How often a fetch waiting for another process asks whether the claim is free again.
const CLAIM_RECHECK: Duration = Duration::from_millis(100);

/// How long a fetch waits for another process that holds its claim before joining anyway
/// (that process may be stopped). Joining earlier gains nothing, since the server sends in
/// its own order, but costs: a late joiner lacks the round under way and makes the server
/// send another.
pub const ELSEWHERE_PATIENCE: Duration = Duration::from_secs(5);

/// How many small files' bundles are remembered. The map grows to this as bundles are
/// learned rather than being made this large up front (4 MiB for every receiver of the
/// simulation, most of which never see a bundle).
const BUNDLE_MEMBERS_KNOWN: usize = 1 << 17;

/// Opens received datagrams: the checks that need no state (multicast, on our interface),
/// and decryption on a sealed channel. Counts what it drops.
#[derive(Clone)]
pub struct Opener {
    channel: Channel,
    ifindex: u32,
    stats: Arc<FetchStats>,
}

impl Opener {
    /// The packet `dgram` holds (decrypted in place), or None when it is not ours.
    pub fn open<'a>(&self, env: &Envelope, dgram: &'a mut [u8]) -> Option<Packet<'a>> {
        self.stats.packets.fetch_add(1, Ordering::Relaxed);
        // Cheap before any decryption: only multicast on our interface can be ours.
        if !env.to.is_some_and(|to| to.is_multicast()) || env.ifindex != self.ifindex {
            self.stats.misaddressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        match packet::decode(dgram, self.channel.seal()) {
            Ok(pkt) => Some(pkt),
            Err(_) => {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }
}

/// A symbol for a pending fetch, to feed to its decoders: RaptorQ decoding and BLAKE3
/// hashing happen in [`Feed::run`], which needs no access to the state.
pub struct Feed<'a> {
    tag: Tag,
    from: Ipv6Addr,
    preferred: bool,
    esi: Esi,
    data: &'a [u8],
    decoding: Arc<Mutex<Decoding>>,
}

impl Feed<'_> {
    pub fn run(self) -> FedSymbol {
        let mut decoding = self.decoding.lock().unwrap_or_else(|e| e.into_inner());
        FedSymbol {
            tag: self.tag,
            from: self.from,
            esi: self.esi,
            fed: decoding.push(self.from, self.preferred, self.esi, self.data),
        }
    }
}

/// What a [`Feed`] did, for [`FetchState::handle_fed`].
pub struct FedSymbol {
    tag: Tag,
    from: Ipv6Addr,
    esi: Esi,
    fed: Fed,
}

/// Where a pending fetch stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Queued,
    Claiming { since: Instant },
    Joined,
    Elsewhere { since: Instant, recheck: Instant },
}

/// The answer to a claim (see `lcfs_cache::Cache::claim_fetch`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    Granted,
    /// Another process is fetching the object.
    Elsewhere,
    /// The object is in the cache already.
    Cached,
}

/// What a request found.
#[derive(Debug)]
pub enum Requested {
    /// Completed a moment ago: here it is.
    Recent(Verified),
    /// Pending under this tag: its outcome comes as an [`Event`] (or [`FetchState::handle_cached`]).
    Pending(Tag),
}

/// What happened, for the shell to act on.
#[derive(Debug)]
pub enum Event {
    /// Decoded and verified: store it, then hand it to the waiters of `tag`. `member`: it
    /// came as one of a bundle's small files, which the shell may leave out of the cache
    /// (see [`super::KeepMembers`]).
    Completed {
        tag: Tag,
        object: Verified,
        member: bool,
    },
    /// The fetch of `want` failed: nothing useful came within `timeout`, or, in doubt,
    /// within `stale_after` (`stale`).
    Failed {
        tag: Tag,
        want: ObjectRef,
        stale: bool,
    },
    /// A root record of the channel (not yet trusted), while roots are watched.
    Root(HeardRoot),
    /// A record handed on less than [`ROOT_REPEAT`] ago, heard again: its server is there.
    RootRepeated,
    /// A bundle's fetch ended: give back its claim (a member's store gives back nothing).
    Release { hash: ObjectHash },
}

struct Pending {
    fetch: ObjectFetch,
    group: Ipv6Addr,
    phase: Phase,
    priority: Priority,
    seq: u64,
    /// For a bundle: the members asked for, by tag, which complete or fail with it.
    riders: BTreeMap<Tag, ObjectRef>,
    /// The symbols received from one sender since the group was (re)joined, for the loss
    /// report.
    span: Option<EsiSpan>,
}

/// When the watched root group was last heard and joined, and the records last handed on.
struct RootWatch {
    heard: Instant,
    joined: Instant,
    /// By sender: the record last handed on, and when.
    handed: Vec<(Ipv6Addr, RootRecord, Instant)>,
}

impl RootWatch {
    /// Whether `record` from `from`, heard at `now`, goes on to the watchers (and is then
    /// remembered as handed on): not when it repeats what went on less than [`ROOT_REPEAT`]
    /// ago.
    fn hand_on(&mut self, now: Instant, from: Ipv6Addr, record: &RootRecord) -> bool {
        // Repeats come forty times a second: the record is cloned only when it goes on.
        match self.handed.iter_mut().find(|(f, _, _)| *f == from) {
            Some((_, r, at)) if r == record && now.saturating_duration_since(*at) < ROOT_REPEAT => {
                return false;
            }
            Some(last) => *last = (from, record.clone(), now),
            None => {
                if self.handed.len() >= ROOT_SENDERS {
                    self.handed.remove(0);
                }
                self.handed.push((from, record.clone(), now));
            }
        }
        true
    }
}

/// The receiver state of one channel.
pub struct FetchState {
    channel: Channel,
    opener: Opener,
    root: Address,
    air: Address,
    /// The interface datagrams must arrive on.
    ifindex: u32,
    config: FetchConfig,
    stats: Arc<FetchStats>,
    /// Ordered maps, not hash maps: timers and probes visit fetches in one order, so that a
    /// simulated run repeats exactly across processes.
    pending: BTreeMap<Tag, Pending>,
    /// Not yet in the window, in priority order: (priority, arrival) -> tag.
    queue: BTreeMap<(Priority, u64), Tag>,
    in_window: usize,
    /// The tags of the fetches in `Joined`: timers and probes visit these, not every
    /// request (a copy asks for 4096 files ahead).
    joined: BTreeSet<Tag>,
    elsewhere: BTreeSet<Tag>,
    seq: u64,
    watch: Option<RootWatch>,
    root_joined: bool,
    members: Memberships,
    /// Pending fetches by priority.
    by_priority: [usize; 3],
    /// Whether this receiver fetches in bulk, and whether a reader waits.
    intent: IntentReport,
    /// The loss measured, and the level whose group is joined to report it.
    loss: LossReport,
    loss_joined: Option<usize>,
    recent: lru::LruCache<Tag, Verified>,
    /// The server's last beacon: objects it sends next, soonest first, and when it came.
    on_air: Vec<Tag>,
    on_air_at: Option<Instant>,
    air_joined: bool,
    /// When the beacon group was joined, while it is.
    air_since: Option<Instant>,
    /// Senders whose symbols completed verified objects, or whose root record was trusted:
    /// their decoders are never evicted for a newcomer's (see [`ObjectFetch`]).
    good_senders: lru::LruCache<Ipv6Addr, ()>,
    claims: VecDeque<(Tag, ObjectHash)>,
    events: VecDeque<Event>,
    /// Requests came since the window was last filled.
    admit_due: bool,
    /// Which bundle each small file travels in, as learned from directories (bounded: a
    /// member forgotten is fetched on its own group).
    bundle_of: lru::LruCache<ObjectHash, Bundle>,
    /// Members asked for through their bundle: member tag -> the bundle's tag.
    riding: BTreeMap<Tag, Tag>,
    probed_elsewhere: Instant,
    probed_joined: Instant,
    last_tick: Instant,
}

impl FetchState {
    /// The state of `channel` received on interface `ifindex`; membership changes are
    /// batched `member_gap` apart (zero when the shell reports them itself).
    pub fn new(
        now: Instant,
        channel: Channel,
        ifindex: u32,
        config: FetchConfig,
        stats: Arc<FetchStats>,
        members: Memberships,
    ) -> FetchState {
        let recent = lru::LruCache::new(nonzero(config.recent));
        let opener = Opener {
            channel: channel.clone(),
            ifindex,
            stats: stats.clone(),
        };
        FetchState {
            opener,
            root: channel.root_address(),
            air: channel.air_address(),
            channel,
            ifindex,
            config,
            stats,
            pending: BTreeMap::new(),
            queue: BTreeMap::new(),
            in_window: 0,
            joined: BTreeSet::new(),
            elsewhere: BTreeSet::new(),
            seq: 0,
            watch: None,
            root_joined: false,
            members,
            by_priority: [0; 3],
            intent: IntentReport::new(),
            loss: LossReport::new(),
            loss_joined: None,
            recent,
            on_air: Vec::new(),
            on_air_at: None,
            air_joined: false,
            air_since: None,
            good_senders: lru::LruCache::new(nonzero(8)),
            claims: VecDeque::new(),
            events: VecDeque::new(),
            admit_due: false,
            bundle_of: lru::LruCache::unbounded(),
            riding: BTreeMap::new(),
            probed_elsewhere: now,
            probed_joined: now,
            last_tick: now,
        }
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    pub fn config(&self) -> &FetchConfig {
        &self.config
    }

    /// Asks for `r`. A current reader vouches for the object (the server has it); a reader of
    /// a superseded file puts a new fetch in doubt.
    pub fn handle_request(
        &mut self,
        now: Instant,
        r: ObjectRef,
        priority: Priority,
        freshness: Freshness,
    ) -> Requested {
        let addr = self.channel.object_address(&r.hash);
        if let Some(v) = self
            .recent
            .get(&addr.tag)
            .filter(|v| ObjectHash::of_verified(v) == r.hash)
        {
            return Requested::Recent(v.clone());
        }
        // Riding already: the bundle's fetch is the one to raise or vouch for.
        let riding = (self.riding.get(&addr.tag))
            .and_then(|t| self.pending.get(t))
            .map(|p| self.channel.object_address(&p.fetch.want().hash));
        let bundle = match riding {
            Some(_) => None,
            None if self.pending.contains_key(&addr.tag) => None,
            None => (self.bundle_of.get(&r.hash)).map(|b| b.id.hash),
        };
        if let Some(at) = riding {
            self.want(now, at, priority, freshness, || ObjectFetch::new(now, r));
        } else if let Some(hash) = bundle {
            // A small file travels in its directory's bundle: the bundle is fetched for it.
            let at = self.channel.object_address(&hash);
            tracing::debug!(object = %r.hash, bundle = %hash, "request rides a bundle");
            // Its members' list is copied only for a new fetch, not for each member's request.
            if !self.raise(&at, priority, freshness) {
                if let Some(b) = self.bundle_of.peek(&r.hash).cloned() {
                    self.add(now, at, priority, freshness, ObjectFetch::of_bundle(now, b));
                }
            }
            if let Some(p) = self.pending.get_mut(&at.tag) {
                p.riders.insert(addr.tag, r);
                self.riding.insert(addr.tag, at.tag);
            }
        } else {
            self.want(now, addr, priority, freshness, || ObjectFetch::new(now, r));
        }
        // Admitted at the next poll_claim, once every request of this turn is known: asked
        // one at a time, the first would take the window before the beacon could say which
        // of them are on air.
        self.admit_due = true;
        Requested::Pending(addr.tag)
    }

    /// A fetch of the object at `at` from now on: the one pending, its priority raised, or a
    /// new one of `fetch`.
    fn want(
        &mut self,
        now: Instant,
        at: Address,
        priority: Priority,
        freshness: Freshness,
        fetch: impl FnOnce() -> ObjectFetch,
    ) {
        if !self.raise(&at, priority, freshness) {
            self.add(now, at, priority, freshness, fetch());
        }
    }

    /// The fetch pending at `at`, if any, raised to `priority` and vouched for by a current
    /// reader; false if none is pending.
    fn raise(&mut self, at: &Address, priority: Priority, freshness: Freshness) -> bool {
        let Some(p) = self.pending.get_mut(&at.tag) else {
            return false;
        };
        // A current reader vouches for its file, not for the bundle it travels in.
        if freshness == Freshness::Current && p.fetch.bundle().is_none() {
            p.fetch.handle_vouched();
        }
        // Raised also in the window: a reader now waits for what readahead asked for, and
        // says so (`IntentReport`).
        if priority < p.priority {
            self.by_priority[p.priority as usize] -= 1;
            self.by_priority[priority as usize] += 1;
            if p.phase == Phase::Queued {
                self.queue.remove(&(p.priority, p.seq));
                self.queue.insert((priority, p.seq), at.tag);
            }
            p.priority = priority;
        }
        true
    }

    /// `fetch`, new, at `at`.
    fn add(
        &mut self,
        now: Instant,
        at: Address,
        priority: Priority,
        freshness: Freshness,
        mut fetch: ObjectFetch,
    ) {
        self.seq += 1;
        if let Some(stand_in) = &self.config.stand_in {
            fetch.set_stand_in(stand_in.clone());
        }
        if freshness == Freshness::Superseded {
            fetch.handle_doubt(now);
        }
        let pending = Pending {
            fetch,
            group: at.group,
            phase: Phase::Queued,
            priority,
            seq: self.seq,
            riders: BTreeMap::new(),
            span: None,
        };
        self.pending.insert(at.tag, pending);
        self.queue.insert((priority, self.seq), at.tag);
        self.by_priority[priority as usize] += 1;
    }

    /// The bundling of a directory just read: its small files are fetched through their
    /// bundles from now on, and those in none on their own groups.
    pub fn handle_bundles(&mut self, bundling: Bundling) {
        for h in &bundling.alone {
            self.bundle_of.pop(h);
        }
        for b in bundling.bundles {
            for m in b.members.iter() {
                self.bundle_of.put(m.hash, b.clone());
                if self.bundle_of.len() > BUNDLE_MEMBERS_KNOWN {
                    self.bundle_of.pop_lru();
                }
            }
        }
    }

    /// Handles one received datagram (decrypted in place on a sealed channel): the three
    /// steps the engine takes apart ([`Opener::open`], [`FetchState::handle_packet`],
    /// [`Feed::run`] and [`FetchState::handle_fed`]) taken at once.
    pub fn handle_datagram(&mut self, now: Instant, env: Envelope, dgram: &mut [u8]) {
        let Some(pkt) = self.opener.open(&env, dgram) else {
            return;
        };
        if let Some(feed) = self.handle_packet(now, env, pkt) {
            let fed = feed.run();
            self.handle_fed(now, fed);
        }
    }

    /// What opens datagrams for this state; it needs no state, so the engine runs it outside
    /// its lock.
    pub fn opener(&self) -> Opener {
        self.opener.clone()
    }

    /// Handles one opened packet. A symbol of a pending object comes back as a [`Feed`]: the
    /// caller runs it (outside any lock it holds the state with) and hands back what it did.
    pub fn handle_packet<'a>(
        &mut self,
        now: Instant,
        env: Envelope,
        pkt: Packet<'a>,
    ) -> Option<Feed<'a>> {
        match pkt.body {
            Body::Symbol { esi, data } => return self.route_symbol(env, pkt.tag, esi, data),
            Body::Root(bytes) if pkt.tag == self.root.tag => {
                if env.is_group(&self.root.group, self.ifindex) {
                    self.handle_root(now, env.from, bytes);
                } else {
                    self.stats.misaddressed.fetch_add(1, Ordering::Relaxed);
                }
            }
            Body::Air(_) if !env.is_group(&self.air.group, self.ifindex) => {
                self.stats.misaddressed.fetch_add(1, Ordering::Relaxed);
            }
            Body::Air(tags) if pkt.tag == self.air.tag => {
                self.on_air = packet::air_tags(tags).collect();
                self.on_air_at = Some(now);
                self.admit(now);
            }
            Body::Root(_) | Body::Air(_) => {
                self.stats.unexpected.fetch_add(1, Ordering::Relaxed);
            }
        }
        None
    }

    fn route_symbol<'a>(
        &mut self,
        env: Envelope,
        tag: Tag,
        esi: Esi,
        data: &'a [u8],
    ) -> Option<Feed<'a>> {
        let Some(p) = self.pending.get(&tag).filter(|p| p.phase == Phase::Joined) else {
            self.stats.unexpected.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        // A symbol counts only on its own object's group: a tag copied onto another group
        // (or onto unicast) is someone else's packet.
        if !env.is_group(&p.group, self.ifindex) {
            self.stats.misaddressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(Feed {
            tag,
            from: env.from,
            preferred: self.good_senders.contains(&env.from),
            esi,
            data,
            decoding: p.fetch.decoding(),
        })
    }

    /// What a [`Feed`] did. The fetch may have ended meanwhile (failed or given up by another
    /// thread); a verified object is completed all the same, for the cache to keep.
    pub fn handle_fed(&mut self, now: Instant, fed: FedSymbol) {
        let FedSymbol {
            tag,
            from,
            esi,
            fed,
        } = fed;
        if fed.forged {
            self.stats.forged_decodes.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(p) = self.pending.get_mut(&tag) {
            p.fetch.handle_fed(now, &fed);
            // Every symbol from the span's sender counts, new to the decoder or not: with
            // two servers sending the same ESIs, each symbol is new from one of them only.
            let span = p.span.get_or_insert_with(|| EsiSpan::new(from, esi));
            span.push(from, esi);
            // Counted in batches, off the per-symbol path; the rest when the fetch ends.
            if span.countable() >= COUNT_EVERY && self.loss.handle_span(span) {
                self.report_loss(now);
            }
        }
        let Some(objects) = fed.done else {
            return;
        };
        self.good_senders.put(from, ());
        let bundle = self
            .end(now, tag)
            .and_then(|p| p.fetch.bundle().map(|b| b.id.hash));
        for object in objects {
            // A bundle completes all its members, asked for or not: the cache keeps them all.
            let tag = match bundle {
                Some(_) => {
                    self.channel
                        .object_address(&ObjectHash::of_verified(&object))
                        .tag
                }
                None => tag,
            };
            self.recent.put(tag, object.clone());
            self.events.push_back(Event::Completed {
                tag,
                object,
                member: bundle.is_some(),
            });
        }
        if let Some(hash) = bundle {
            self.events.push_back(Event::Release { hash });
        }
        self.admit(now);
    }

    fn handle_root(&mut self, now: Instant, from: Ipv6Addr, bytes: &[u8]) {
        let record = match RootRecord::decode(bytes) {
            Ok(r) if r.channel_id == *self.channel.id() => r,
            _ => {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        if let Some(w) = &mut self.watch {
            w.heard = now;
            let event = match w.hand_on(now, from, &record) {
                true => Event::Root(HeardRoot { record, from }),
                false => Event::RootRepeated,
            };
            self.events.push_back(event);
        }
    }

    /// The answer to a claim [`FetchState::poll_claim`] asked for. True if the shell should
    /// give a granted claim back (the fetch ended meanwhile).
    pub fn handle_claim(&mut self, now: Instant, tag: Tag, answer: Claim) -> bool {
        let since = match self.pending.get(&tag).map(|p| p.phase) {
            Some(Phase::Claiming { since }) => since,
            _ => return answer == Claim::Granted,
        };
        if answer == Claim::Granted {
            self.join_group(now, tag);
        } else if let Some(p) = self.pending.get_mut(&tag) {
            // Cached: the next look into the cache finds it.
            p.phase = Phase::Elsewhere {
                since,
                recheck: now + CLAIM_RECHECK,
            };
            self.elsewhere.insert(tag);
        }
        false
    }

    /// The object of `tag`, found in the cache (stored by another process). Returns whether
    /// the fetch was pending (then its waiters get `object`, and a claim it held goes back).
    pub fn handle_cached(&mut self, now: Instant, tag: Tag, object: &Verified) -> bool {
        if let Some(bundle) = self.riding.remove(&tag) {
            let Some(p) = self.pending.get_mut(&bundle) else {
                return false;
            };
            p.riders.remove(&tag);
            if p.riders.is_empty() {
                let hash = p.fetch.want().hash;
                self.end(now, bundle);
                self.events.push_back(Event::Release { hash });
            }
        } else if self.pending.contains_key(&tag) {
            self.end(now, tag);
        } else {
            return false;
        }
        self.recent.put(tag, object.clone());
        self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
        (self.stats.bytes_cached).fetch_add(object.len() as u64, Ordering::Relaxed);
        self.admit(now);
        true
    }

    /// The channel moved to a new generation: every pending fetch is in doubt from now on
    /// (what the server still has keeps coming; the rest fails as stale within
    /// `stale_after`), and joined groups are reported afresh, for a server that restarted.
    pub fn handle_new_generation(&mut self, now: Instant) {
        let mut rejoin = Vec::new();
        for p in self.pending.values_mut() {
            p.fetch.handle_doubt(now);
            if p.phase == Phase::Joined {
                p.fetch.handle_joined(now);
                rejoin.push(p.group);
            }
        }
        for group in rejoin {
            self.members.push(now, group, false);
            self.members.push(now, group, true);
        }
    }

    /// Whether root records are wanted: the root group stays joined while they are.
    pub fn set_watching(&mut self, now: Instant, on: bool) {
        let starts = on && self.watch.is_none();
        match (on, &mut self.watch) {
            (true, None) => {
                self.watch = Some(RootWatch {
                    heard: now,
                    joined: now,
                    handed: Vec::new(),
                })
            }
            // A new watcher: it gets the next record, repeat or not.
            (true, Some(w)) => w.handed.clear(),
            (false, Some(_)) => self.watch = None,
            _ => {}
        }
        if on != self.root_joined {
            self.root_joined = on;
            self.members.push(now, self.root.group, on);
        }
        if starts && self.config.bulk {
            self.intent.handle_bulk_expected(now);
            self.report_intent(now);
        }
    }

    /// The last record from `from` did not reach every watcher (a queue was full): its next
    /// copy is handed on, repeat or not.
    pub fn forget_root(&mut self, from: Ipv6Addr) {
        if let Some(w) = &mut self.watch {
            w.handed.retain(|(f, _, _)| *f != from);
        }
    }

    /// `sender` is a real server of the channel (its root record was trusted): its symbols
    /// keep their decoders under a flood.
    pub fn prefer_sender(&mut self, sender: Ipv6Addr) {
        self.good_senders.put(sender, ());
    }

    /// Timers: rejoin stalled groups, fail fetches that timed out or went stale, rejoin a
    /// silent root group, ask again about claims held elsewhere. Call it when
    /// [`FetchState::poll_timeout`] is due.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_tick = now;
        let timers = Timers {
            stall: self.config.stall,
            timeout: self.config.timeout,
            stale_after: self.config.stale_after,
            bundle_patience: super::object::BUNDLE_PATIENCE,
        };
        let mut failed = Vec::new();
        if !self.joined.is_empty() {
            self.loss.handle_busy(now);
        }
        for tag in &self.joined {
            let Some(p) = self.pending.get_mut(tag) else {
                continue;
            };
            match p.fetch.poll_action(now, &timers) {
                Action::Wait => {}
                Action::Rejoin => {
                    self.stats.rejoins.fetch_add(1, Ordering::Relaxed);
                    p.fetch.handle_joined(now);
                    // Symbols sent between the leave and the join were not lost.
                    p.span = None;
                    // A leave and a join make the kernel send a fresh report for the group.
                    self.members.push(now, p.group, false);
                    self.members.push(now, p.group, true);
                }
                Action::Fail => failed.push((*tag, false)),
                Action::Stale => failed.push((*tag, true)),
            }
        }
        for (tag, stale) in failed {
            self.fail(now, tag, stale);
        }
        self.recheck_elsewhere(now);
        self.tick_root(now);
        self.admit(now);
        self.report_loss(now);
    }

    /// The loss measured so far, as a share, once enough symbols were counted.
    pub fn loss(&self) -> Option<f64> {
        self.loss.loss()
    }

    /// Joins the group of the loss level to report, leaving the one reported before.
    fn report_loss(&mut self, now: Instant) {
        let level = self.loss.poll_level(now);
        if level == self.loss_joined {
            return;
        }
        let group = |l: Option<usize>| {
            l.and_then(|l| self.channel.loss_address(l))
                .map(|a| a.group)
        };
        if let Some(old) = group(self.loss_joined) {
            self.members.push(now, old, false);
        }
        if let Some(new) = group(level) {
            self.members.push(now, new, true);
        }
        self.loss_joined = level;
    }

    /// How often [`FetchState::handle_timeout`] wants to run while a fetch is pending.
    pub const TICK: Duration = Duration::from_millis(20);

    /// How often it wants to run while none is: every timer of an idle receiver (the root
    /// group's rejoin, the end of the intent reports' lingers and of the loss report, the
    /// next membership batch) is due at its own time in [`FetchState::poll_timeout`], so
    /// this tick only bounds what a shell does on its ticks. A mount kept for years mostly
    /// waits: at [`FetchState::TICK`] it woke fifty times a second for nothing.
    pub const IDLE_TICK: Duration = Duration::from_secs(1);

    /// When [`FetchState::handle_timeout`] or a membership batch is due next.
    pub fn poll_timeout(&self) -> Instant {
        let every = match self.pending.is_empty() {
            true => Self::IDLE_TICK,
            false => Self::TICK,
        };
        let tick = self.last_tick + every;
        let rejoin = self
            .watch
            .as_ref()
            .map(|w| w.heard.max(w.joined) + ROOT_WATCH_REJOIN);
        let unreport = self.loss_joined.and(self.loss.poll_timeout());
        [
            self.members.poll_timeout(),
            rejoin,
            self.intent.poll_timeout(),
            unreport,
        ]
        .into_iter()
        .flatten()
        .fold(tick, Instant::min)
    }

    /// When [`FetchState::poll_probe`] next has fetches held elsewhere to look up in the
    /// cache. Not a timer of [`FetchState::handle_timeout`]: the shell probes on every turn
    /// of its loop, and must not sleep past this.
    pub fn probe_timeout(&self) -> Option<Instant> {
        (!self.elsewhere.is_empty()).then_some(self.probed_elsewhere + ELSEWHERE_PROBE)
    }

    /// Membership changes to make now (and report), in order.
    pub fn poll_membership(&mut self, now: Instant) -> Option<Vec<(Ipv6Addr, bool)>> {
        self.members.poll_flush(now)
    }

    /// The next claim to ask the cache's owner about; answer with [`FetchState::handle_claim`].
    /// Requests made since the last call enter the window first.
    pub fn poll_claim(&mut self, now: Instant) -> Option<(Tag, ObjectHash)> {
        if std::mem::take(&mut self.admit_due) {
            self.admit(now);
        }
        self.claims.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Objects to look up in the cache now: those waiting for another process, and now and
    /// then those joined. Answer hits with [`FetchState::handle_cached`].
    pub fn poll_probe(&mut self, now: Instant) -> Vec<(Tag, ObjectHash)> {
        let mut out = Vec::new();
        if !self.elsewhere.is_empty() && now >= self.probed_elsewhere + ELSEWHERE_PROBE {
            self.probed_elsewhere = now;
            for tag in &self.elsewhere {
                if let Some(p) = self.pending.get(tag) {
                    probe(&mut out, *tag, p);
                }
            }
        }
        if now >= self.probed_joined + JOINED_PROBE {
            self.probed_joined = now;
            for tag in &self.joined {
                if let Some(p) = self.pending.get(tag) {
                    probe(&mut out, *tag, p);
                }
            }
        }
        out
    }

    /// Fails every pending fetch (the engine stops): their tags, to fail their waiters.
    pub fn drain(&mut self) -> Vec<Tag> {
        self.queue.clear();
        self.joined.clear();
        self.elsewhere.clear();
        self.in_window = 0;
        self.watch = None;
        self.riding.clear();
        self.by_priority = [0; 3];
        let pending = std::mem::take(&mut self.pending);
        let riders = pending.values().flat_map(|p| p.riders.keys().copied());
        riders.chain(pending.keys().copied()).collect()
    }

    /// The members asked for through the bundle fetch of `tag` (none for an object).
    pub fn riders(&self, tag: &Tag) -> Vec<ObjectHash> {
        self.pending
            .get(tag)
            .map(|p| p.riders.values().map(|r| r.hash).collect())
            .unwrap_or_default()
    }

    /// Fetches pending (queued or in the window).
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Gives requests places in the window: demand reads at once, then what the server's
    /// last beacon lists, then the rest in order. Listens to the beacon while some wait.
    fn admit(&mut self, now: Instant) {
        // First: a reader's wait is reported even while admission waits for the beacon.
        self.report_intent(now);
        // A program waits for a demand read: it never waits for room.
        while let Some((&(Priority::Demand, _), &tag)) = self.queue.first_key_value() {
            self.queue.pop_first();
            self.enter_window(now, tag);
        }
        let fresh = self
            .on_air_at
            .is_some_and(|t| now.duration_since(t) < AIR_FRESH);
        let window = self.window();
        let room = window.saturating_sub(self.in_window);
        if self.queue.len() > room {
            self.listen_to_beacon(now, true);
        }
        // More is asked than the window holds and the server's beacon is not known: wait for
        // it (it comes every 50 ms while the server has rounds queued), so that a receiver
        // that starts while others are under way takes the rounds on air first instead of
        // asking again for what they already got.
        if !fresh
            && self
                .air_since
                .is_some_and(|t| now.duration_since(t) < BEACON_WAIT)
        {
            return;
        }
        let mut i = 0;
        while fresh && self.in_window < window && i < self.on_air.len() {
            let tag = self.on_air[i];
            i += 1;
            let key = match self.pending.get(&tag) {
                Some(p) if p.phase == Phase::Queued => (p.priority, p.seq),
                _ => continue,
            };
            self.queue.remove(&key);
            self.enter_window(now, tag);
        }
        while self.in_window < window {
            let Some((_, tag)) = self.queue.pop_first() else {
                break;
            };
            self.enter_window(now, tag);
        }
        // The beacon's next few rounds are joined even when the window is full (AIR_AHEAD).
        if fresh {
            let soon: Vec<Tag> = self.on_air.iter().take(AIR_AHEAD).copied().collect();
            for tag in soon {
                let key = match self.pending.get(&tag) {
                    Some(p) if p.phase == Phase::Queued => (p.priority, p.seq),
                    _ => continue,
                };
                self.queue.remove(&key);
                self.enter_window(now, tag);
            }
        }
        let waiting = !self.queue.is_empty();
        self.listen_to_beacon(now, waiting);
    }

    /// Joins or leaves the bulk and hurry reports' groups by what is pending.
    fn report_intent(&mut self, now: Instant) {
        let [demand, readahead, prefetch] = self.by_priority;
        self.intent
            .handle_pending(now, readahead + prefetch > 0, demand > 0);
        while let Some((report, on)) = self.intent.poll_change(now) {
            if let Some(at) = self.channel.report_address(report) {
                self.members.push(now, at.group, on);
            }
        }
    }

    fn listen_to_beacon(&mut self, now: Instant, on: bool) {
        if on != self.air_joined {
            self.air_joined = on;
            self.air_since = on.then_some(now);
            self.members.push(now, self.air.group, on);
        }
    }

    /// Places in the window: `max_joined`, or [`LOSSY_WINDOW`] times as many once the
    /// receiver measured [`LOSSY`] loss in bursts ([`BURSTY_RUN`]). A receiver that loses
    /// rounds falls behind the others; with more of the tree joined it is still among an
    /// object's listeners when the others' first round goes out, rather than asking for the
    /// object after they all left, when it goes out again for it alone. The measure forgets
    /// over [`super::loss::WINDOW`] symbols, so a link that stops losing gets the small
    /// window back.
    fn window(&self) -> usize {
        let max = self.config.max_joined;
        match self.loss.loss() {
            Some(loss)
                if loss >= LOSSY && self.loss.mean_run().is_some_and(|r| r >= BURSTY_RUN) =>
            {
                max * LOSSY_WINDOW
            }
            _ => max,
        }
    }

    /// A place in the window: first the claim.
    fn enter_window(&mut self, now: Instant, tag: Tag) {
        if self.pending.contains_key(&tag) {
            self.in_window += 1;
            self.ask_claim(tag, now);
        }
    }

    fn ask_claim(&mut self, tag: Tag, since: Instant) {
        if let Some(p) = self.pending.get_mut(&tag) {
            p.phase = Phase::Claiming { since };
            self.elsewhere.remove(&tag);
            self.claims.push_back((tag, p.fetch.want().hash));
        }
    }

    fn join_group(&mut self, now: Instant, tag: Tag) {
        let Some(p) = self.pending.get_mut(&tag) else {
            return;
        };
        p.phase = Phase::Joined;
        self.joined.insert(tag);
        p.fetch.handle_started(now);
        self.loss.handle_busy(now);
        self.elsewhere.remove(&tag);
        self.members.push(now, p.group, true);
    }

    /// Fetches waiting for another process ask again about their claim, or join after
    /// [`ELSEWHERE_PATIENCE`].
    fn recheck_elsewhere(&mut self, now: Instant) {
        let due: Vec<(Tag, Instant)> = self
            .elsewhere
            .iter()
            .filter_map(|tag| match self.pending.get(tag).map(|p| p.phase) {
                Some(Phase::Elsewhere { since, recheck }) if now >= recheck => Some((*tag, since)),
                _ => None,
            })
            .collect();
        for (tag, since) in due {
            if now.duration_since(since) >= ELSEWHERE_PATIENCE {
                self.join_group(now, tag);
            } else {
                self.ask_claim(tag, since);
            }
        }
    }

    /// Takes `tag` out of the state: out of the window, its group left.
    fn end(&mut self, now: Instant, tag: Tag) -> Option<Pending> {
        let mut p = self.pending.remove(&tag)?;
        self.by_priority[p.priority as usize] -= 1;
        if let Some(span) = &mut p.span {
            if self.loss.handle_span(span) {
                self.report_loss(now);
            }
        }
        self.elsewhere.remove(&tag);
        for rider in p.riders.keys() {
            self.riding.remove(rider);
        }
        match p.phase {
            Phase::Queued => {
                self.queue.remove(&(p.priority, p.seq));
            }
            Phase::Joined => {
                self.in_window -= 1;
                self.joined.remove(&tag);
                self.members.push(now, p.group, false);
                self.loss.handle_busy(now);
            }
            Phase::Claiming { .. } | Phase::Elsewhere { .. } => self.in_window -= 1,
        }
        Some(p)
    }

    fn fail(&mut self, now: Instant, tag: Tag, stale: bool) {
        let Some(p) = self.end(now, tag) else {
            return;
        };
        if stale {
            self.stats.stale.fetch_add(1, Ordering::Relaxed);
        }
        if p.fetch.bundle().is_some() {
            // In doubt, the server moved on and a member may be gone too; silent from the
            // start (see `object::BUNDLE_PATIENCE`), the bundle is what the server lacks.
            let freshness = match p.fetch.is_doubted() {
                true => Freshness::Superseded,
                false => Freshness::Current,
            };
            for (&tag, &want) in &p.riders {
                if stale {
                    // The server no longer has the bundle (its directory changed), but a
                    // member may still be current: it is fetched on its own group.
                    self.bundle_of.pop(&want.hash);
                    let at = self.channel.object_address(&want.hash);
                    self.want(now, at, p.priority, freshness, || {
                        ObjectFetch::new(now, want)
                    });
                    self.admit_due = true;
                } else {
                    self.events.push_back(Event::Failed { tag, want, stale });
                }
            }
            let hash = p.fetch.want().hash;
            self.events.push_back(Event::Release { hash });
        } else {
            let want = *p.fetch.want();
            self.events.push_back(Event::Failed { tag, want, stale });
        }
    }

    /// The watched root group is rejoined while nothing is heard.
    fn tick_root(&mut self, now: Instant) {
        let Some(w) = self.watch.as_mut() else {
            return;
        };
        if now.duration_since(w.heard.max(w.joined)) >= ROOT_WATCH_REJOIN {
            w.joined = now;
            self.members.push(now, self.root.group, false);
            self.members.push(now, self.root.group, true);
        }
    }
}

/// What to look up in the cache for the fetch `p` of `tag`: its object, or the members
/// asked for through a bundle.
fn probe(out: &mut Vec<(Tag, ObjectHash)>, tag: Tag, p: &Pending) {
    if p.fetch.bundle().is_some() {
        out.extend(p.riders.iter().map(|(t, r)| (*t, r.hash)));
    } else {
        out.push((tag, p.fetch.want().hash));
    }
}

fn nonzero(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN)
}
