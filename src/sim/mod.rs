//! The simulated network (issue 11): one server (or several of one channel, each hearing
//! the others' MLD queries) and N receivers joined through in-memory
//! links on a virtual clock, running the real state machines: the sender's [`Carousel`],
//! the MLD [`ListenerTracker`] and [`Querier`], and each receiver's [`FetchState`], with the
//! object decoders of [`crate::wire::object`]. Nothing here copies their logic; this module only
//! plays the parts that are I/O in the product (sockets, disk, kernel, switch).
//!
//! - [`link`]: per-receiver downlinks (seeded uniform or Gilbert-Elliott loss, delay, jitter,
//!   duplication; reordering comes from jitter) and the uplink's delay for MLD;
//! - [`tree`]: a synthetic seeded tree in a directory, indexed and published as a [`Table`];
//! - [`server`]: the sender's shell in memory (encoders built on `poll_load`, every packet
//!   encoded, wire bytes counted, the link held to the carousel's rate);
//! - [`receiver`] and [`walk`]: a host driving a `FetchState` (claims always granted) through
//!   its workload: the whole tree or random files, walked from the root record it hears;
//! - [`world`]: the event queue and the snooping bridge (packets reach only hosts joined to
//!   their group; joins and leaves become MLDv2 reports; queries are answered);
//! - [`report`]: the figures of a run;
//! - [`oracle`]: what a server that saw every loss would have sent, the yardstick for them.
//!
//! Invariants: every random draw comes from a generator seeded from [`Scenario::seed`], and
//! events at equal times run in the order they were queued, so a seed always gives the same
//! run; nothing sleeps or reads the clock except to time the run itself.
//!
//! [`Carousel`]: crate::serve::sender::carousel::Carousel
//! [`ListenerTracker`]: crate::mld::ListenerTracker
//! [`Querier`]: crate::mld::Querier
//! [`FetchState`]: crate::fetch::state::FetchState
//! [`Table`]: crate::serve::table::Table

pub mod link;
pub mod oracle;
pub mod receiver;
pub mod report;
pub mod server;
pub mod tree;
pub mod walk;
pub mod world;

use std::net::Ipv6Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub use link::{LinkConfig, Loss};
pub use receiver::Life;
pub use report::Report;
pub use tree::Shape;
pub use walk::Workload;

use crate::fetch::object::StandIn;
use crate::serve::index::IndexError;
use crate::serve::sender::carousel::CarouselConfig;
use crate::wire::channel::Channel;
use receiver::SimReceiver;
use server::SimServer;
use world::{Ev, World};

/// The first server's link-local address (the others follow it).
pub const SERVER: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// A receiver that leaves before its workload is done.
#[derive(Clone, Copy, Debug)]
pub struct Departure {
    pub receiver: usize,
    /// After its own start.
    pub after: Duration,
    /// Goes silent without leaving (power cut), rather than leaving its groups.
    pub crash: bool,
}

/// Scenarios of more receivers than this decode by counting symbols ([`Scenario::counting`]).
pub const COUNTING_ABOVE: usize = 100;

/// One simulated run.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: String,
    pub seed: u64,
    pub shape: Shape,
    pub receivers: usize,
    pub workload: Workload,
    /// Receivers start at seeded times spread uniformly over this span.
    pub start_spread: Duration,
    pub downlink: LinkConfig,
    /// Delay of MLD messages from a receiver to the server.
    pub uplink: Duration,
    /// The server's send rate (bits per second, headers counted).
    pub rate_bps: u64,
    pub departures: Vec<Departure>,
    /// When the (first) server restarts, after the run's start.
    pub server_restart: Option<Duration>,
    /// Servers of the one channel, each publishing the same tree from its own address with
    /// its own uplink (as two `lcfs serve` of one tree and key would).
    pub servers: usize,
    /// Virtual time after which the run is cut short (and counted unfinished).
    pub limit: Duration,
    /// Receivers decode by counting distinct symbols ([`ObjectDecoder::counting`]) instead of
    /// with RaptorQ: what lets a thousand receivers run in seconds and a few GiB. What they
    /// get is still verified against its hash.
    ///
    /// [`ObjectDecoder::counting`]: crate::wire::fec::ObjectDecoder::counting
    pub counting: bool,
}

impl Scenario {
    /// `receivers` copying the whole of `shape` over links of `loss`, starting within
    /// `spread`, at 100 Mbit/s with 0.2 ms of delay and 1 ms of jitter down, 1 ms up.
    pub fn new(name: &str, seed: u64, shape: Shape, receivers: usize, loss: Loss) -> Scenario {
        Scenario {
            name: name.into(),
            seed,
            shape,
            receivers,
            workload: Workload::Whole,
            start_spread: Duration::ZERO,
            downlink: LinkConfig {
                loss,
                jitter: Duration::from_millis(1),
                ..LinkConfig::default()
            },
            uplink: Duration::from_millis(1),
            rate_bps: 100_000_000,
            departures: Vec::new(),
            server_restart: None,
            servers: 1,
            limit: Duration::from_secs(600),
            counting: receivers > COUNTING_ABOVE,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("building the published tree: {0}")]
    Tree(#[from] IndexError),
}

/// Runs `scenario`, writing its tree under `dir` (an empty directory the caller owns).
pub fn run(dir: &Path, scenario: &Scenario) -> Result<Report, SimError> {
    let wall = Instant::now();
    let base = Instant::now();
    let channel = Channel::new(&format!("sim-{}", scenario.seed), None);
    let published = tree::publish(dir, scenario.shape, scenario.seed, &channel)?;
    let config = CarouselConfig {
        rate_bps: scenario.rate_bps,
        ..CarouselConfig::default()
    };
    let servers = (0..scenario.servers.max(1))
        .map(|i| {
            let mut addr = SERVER.segments();
            addr[7] += i as u16;
            let table = published.table.clone();
            SimServer::new(base, addr.into(), table, config.clone())
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(scenario.seed);
    let stand_in = scenario
        .counting
        .then(|| objects_of(published.table.clone()));
    let receivers = (0..scenario.receivers)
        .map(|i| {
            let link = link::Link::new(scenario.downlink, rng.random());
            let mut r = SimReceiver::new(host(i), link, scenario.workload, rng.random());
            r.stand_in = stand_in.clone();
            r
        })
        .collect();
    let mut world = World::new(base, servers, receivers, scenario.uplink);
    let spread = scenario.start_spread.as_nanos() as u64;
    let mut starts = Vec::new();
    for i in 0..scenario.receivers {
        let at = base
            + Duration::from_nanos(if spread == 0 {
                0
            } else {
                rng.random_range(0..spread)
            });
        starts.push(at);
        world.schedule(at, Ev::Start(i));
    }
    for d in &scenario.departures {
        let at = starts.get(d.receiver).copied().unwrap_or(base) + d.after;
        let ev = if d.crash {
            Ev::Crash(d.receiver)
        } else {
            Ev::Stop(d.receiver)
        };
        world.schedule(at, ev);
    }
    if let Some(after) = scenario.server_restart {
        world.schedule(base + after, Ev::RestartServer);
    }
    world.run(base + scenario.limit, settled);
    // Let the server finish what it still sends for groups that are left or expire.
    let tail = world.now
        + world.servers[0]
            .tracker()
            .config()
            .timing
            .listener_interval()
            * 2;
    world.run(tail.min(base + scenario.limit), |w| {
        w.servers.iter().all(|s| s.carousel().scheduler().is_idle())
    });
    Ok(report(scenario, &published, &world, base, wall))
}

/// The objects `table` publishes, each loaded once and shared by every receiver's stand-in
/// decoder.
fn objects_of(table: std::sync::Arc<crate::serve::table::Table>) -> StandIn {
    let loaded = std::sync::Mutex::new(std::collections::HashMap::new());
    StandIn(std::sync::Arc::new(move |hash| {
        let mut loaded = loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(bytes) = loaded.get(hash) {
            return Some(std::sync::Arc::clone(bytes));
        }
        let bytes = table.load(hash).ok()?;
        loaded.insert(*hash, bytes.clone());
        Some(bytes)
    }))
}

/// Every receiver is done, stopped or crashed.
fn settled(w: &World) -> bool {
    w.receivers
        .iter()
        .all(|r| matches!(r.life, Life::Done | Life::Stopped | Life::Crashed))
}

/// The link-local address of receiver `i`.
fn host(i: usize) -> Ipv6Addr {
    let i = i as u32;
    Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 1, (i >> 16) as u16, i as u16)
}

fn report(s: &Scenario, p: &tree::Published, w: &World, base: Instant, wall: Instant) -> Report {
    let stats: Vec<_> = w.servers.iter().map(SimServer::stats).collect();
    let sum = |f: fn(&server::ServerStats) -> u64| stats.iter().map(f).sum::<u64>();
    let sched = w.servers[0].carousel().scheduler();
    let mut r = Report {
        later_rounds: sched.stats().later_rounds[1],
        loss: sched.loss(),
        reported: sched.reported_loss(),
        leave_delay: sched.stats().leave_delay,
        gathered: sched.stats().gathered,
        in_turns: sched.stats().in_turns,
        late_joiner_rounds: sched.stats().late_joiner_rounds,
        activations: sched.stats().activations,
        distinct: sched.stats().distinct,
        symbols: sched.stats().sent,
        name: s.name.clone(),
        seed: s.seed,
        receivers: s.receivers,
        data_bytes: p.data_bytes(),
        server_bytes: sum(|s| s.wire_bytes),
        per_server_bytes: stats.iter().map(|s| s.wire_bytes).collect(),
        server_packets: sum(|s| s.packets),
        mld_reports: sum(|s| s.reports),
        encoders_built: sum(|s| s.encoders_built),
        server_restarts: sum(|s| s.restarts),
        sent_unjoined: w.bridge.sent_unjoined,
        sent_never_joined: w.bridge.sent_never_joined,
        sim_time: w.now.duration_since(base),
        wall_time: wall.elapsed(),
        ..Report::default()
    };
    for rx in &w.receivers {
        r.starts.extend(rx.started.map(|a| a.duration_since(base)));
        r.failures += rx.failures;
        r.max_wait = r.max_wait.max(rx.max_wait);
        r.rejoins += rx.stats.rejoins.load(std::sync::atomic::Ordering::Relaxed);
        let walk = rx.walk();
        r.invalid += walk.map_or(0, |w| w.invalid.len());
        if matches!(rx.life, Life::Stopped | Life::Crashed) {
            continue;
        }
        let complete = walk.is_some_and(|walk| {
            walk.invalid.is_empty()
                && (s.workload != Workload::Whole
                    || p.objects.keys().all(|h| walk.verified.contains(h)))
        });
        match (rx.life, rx.started, rx.done) {
            (Life::Done, Some(a), Some(b)) if complete => {
                r.completion.push(b.duration_since(a));
                r.unicast_bytes += walk.map_or(0, |w| w.bytes);
            }
            _ => r.unfinished += 1,
        }
    }
    r.completion.sort();
    r.starts.sort();
    // The yardstick serves receivers that are all there from start to end, from one server,
    // and codes what they verify object by object: for a file that is what the server
    // sends, while a tree's small files travel in bundles that it would code file by file.
    let receivers = s.receivers.saturating_sub(s.departures.len());
    let one_file = matches!(s.shape, Shape::File(_));
    let together = s.start_spread.is_zero() && s.server_restart.is_none() && s.servers <= 1;
    if s.workload == Workload::Whole && one_file && together && receivers > 0 {
        let carousel = w.servers[0].carousel();
        let mut ks: Vec<u32> = p
            .objects
            .keys()
            .filter_map(|h| carousel.source_symbols(h))
            .collect();
        // The yardstick's count depends only on the sequence of K, which must not follow a
        // map's order or the hashes (the file index's changes with the tree's mtimes, and
        // ordering by hash moved the figure in its third decimal from run to run).
        ks.sort_unstable();
        r.source_symbols = ks.iter().map(|&k| u64::from(k)).sum();
        let loss = s.downlink.loss;
        r.oracle_symbols = Some(oracle::symbols_needed(loss, receivers, &ks, s.seed));
    }
    r
}
