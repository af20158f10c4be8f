//! What the fetch engine is told and what it counts: its settings ([`FetchConfig`]), the
//! priority and freshness of a request, the counters it keeps ([`FetchStats`]) and a root
//! record as heard. Shared by the sans-IO state ([`super::state`]) and its I/O shell
//! ([`super::engine`]), so that neither imports the other's types.

use std::net::Ipv6Addr;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use crate::wire::object::RootRecord;

/// Objects just completed, kept until the cache surely has them, so that a request arriving
/// between the end of a fetch and its store does not start it again. A bundle completes up
/// to 64 members at once, most of them not yet asked for: room for several bundles.
pub const RECENT: usize = 512;

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

/// Whether the small files that come in bundles go into the cache.
///
/// A mount reads its files from the cache, and `prefetch` is there to fill it: they keep
/// everything. `copy` writes every file under DEST, verified; a small file kept in the cache
/// as well costs a second inode, a rename and two index keys for a copy of what DEST holds,
/// and gives back only a refetch a later reader would make cheaply, in its bundle. On
/// tools/bench's tree_10k (10,000 files, two cores) that second store was as much CPU as
/// writing DEST: eight copies at once took 8.77 s with it and 5.41 s without, one 3.8 s
/// (`tools/bench --only tree_10k --runs 2 --seed 777`, both builds back to back). The price:
/// a copy interrupted before its end fetches its small files again. While another process
/// shares the cache, members are kept after all: it may want the same files now, and the
/// claim on their bundle made it wait for this process's fetch rather than make its own
/// (three processes reading one small-file tree cost the server 1.39 times the tree without
/// that, 1.11 with it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KeepMembers {
    /// Every object fetched is stored.
    #[default]
    Always,
    /// A bundle's members are stored only while [`lcfs_cache::Cache::is_shared`].
    WhenShared,
}

#[derive(Clone, Debug)]
pub struct FetchConfig {
    /// A fetch fails after this long without a useful symbol.
    pub timeout: Duration,
    /// After this long without a useful symbol, leave and rejoin the group.
    pub stall: Duration,
    /// Groups joined at once, demand reads aside, by a receiver that measures no loss in
    /// bursts (one that does joins four times as many, see below). Small on purpose: the
    /// kernel walks the host's list of joined groups for every multicast packet it
    /// receives, and 256 MiB unshaped took 2.9 s with 512 joined, 1.0 s with 32 (measured
    /// in the lab). Two MiB in flight still covers a LAN's round trip, and loss costs the
    /// same (5% per receiver: 13.5 s at 200 Mbit/s with 16 to 128). 128 keeps receivers in
    /// step under loss in bursts (the simulation's 1,000-file tree at 100 and 1000
    /// receivers: 1.50 to 1.79 times one receiver's bytes against 1.98 to 2.82), but in
    /// `tools/bench` it cost a copy of the 10,000-file tree 40% more CPU, eight shaped
    /// copies 1.16 times one copy's time against 1.10, and 256 MiB unshaped 188 against 234
    /// MB/s. So only a receiver that measured 1% loss or more, in bursts, joins four times
    /// this many (`FetchState::window`).
    pub max_joined: usize,
    /// A fetch in doubt (the channel moved to a new generation, or a superseded file's
    /// reader asked for it) fails as stale after this long without a useful symbol. The
    /// server answers a join within a round trip and sends its first round of an object
    /// within a few hundred milliseconds when it has it.
    pub stale_after: Duration,
    /// How long a receiver waits for the channel's first root record before it gives up
    /// (`None`: for ever, `--wait`). Short by default: a mistyped channel name, a wrong
    /// interface or a server that is not running are known within seconds, and waiting out
    /// `timeout` (30 s) before saying so only delayed the error (issue 13).
    pub root_wait: Option<Duration>,
    /// Objects just completed that the state keeps at hand ([`RECENT`]); the simulation,
    /// which has no cache to wait for and runs a thousand receivers, keeps fewer.
    pub recent: usize,
    /// Whether small files fetched in bundles are stored in the cache.
    pub keep_members: KeepMembers,
    /// The receiver fetches in bulk (`copy`, `prefetch`): it says so from its start
    /// (`crate::fetch::intent`).
    pub bulk: bool,
    /// Simulation only: decode by counting symbols ([`crate::wire::fec::ObjectDecoder::counting`]).
    pub stand_in: Option<super::object::StandIn>,
    pub port: u16,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            timeout: Duration::from_secs(30),
            stall: Duration::from_millis(400),
            max_joined: 32,
            stale_after: Duration::from_millis(750),
            root_wait: Some(ROOT_WAIT),
            recent: RECENT,
            keep_members: KeepMembers::Always,
            bulk: false,
            stand_in: None,
            port: crate::wire::channel::DEFAULT_PORT,
        }
    }
}

/// The default of [`FetchConfig::root_wait`]. The server repeats its root record every 25 ms
/// to a joined group and answers a join at once, so five seconds leave room for a lossy
/// link and a busy server, and for the receiver's own MLD report to get through.
pub const ROOT_WAIT: Duration = Duration::from_secs(5);

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
    /// When the server was last heard: a root record, or an object completed.
    pub last_heard: crate::status::LastHeard,
    /// Network fetches by [`crate::fetch::Fetcher::fetch`], by how long they took.
    pub latency: crate::status::Histogram,
    /// The generation of the newest tree opened on this engine.
    pub generation: AtomicU64,
}

/// A root record as received, before any trust decision: the record and who sent it.
#[derive(Clone, Debug)]
pub struct HeardRoot {
    pub record: RootRecord,
    /// The sender's address: what trust on first use remembers on a clear, unsigned channel.
    pub from: Ipv6Addr,
}
