//! The sender's state (sans-IO): which object each listened group names, which encoders are
//! at hand, what goes out next and when (DESIGN.md section 3, "an object carousel driven by
//! MLD"). quinn-proto's split: inputs are `handle_*(now, ...)`, outputs are `poll_*()`, and
//! the shell (`super::SenderLoop`) owns the socket, the disk and the clock.
//!
//! - Routing. MLD reports groups ([`GroupEvent`]); the published [`Table`] names the object of
//!   each, or the loss level its listeners report (counted by the [`Scheduler`]). A listened
//!   group that the table does not name is remembered all the same (at most `max_unrouted` of
//!   them, the tracker's own group limit): the MLD thread filters reports by the newest
//!   table, which may reach it before it reaches this state, and such a group must be routed
//!   once its table arrives.
//! - Table swaps. Groups are derived from object hashes, so a group listened in both tables
//!   names the same object and its round goes on untouched; only groups whose object left or
//!   came are routed again. Bouncing every group instead restarted the rounds under way at
//!   each generation (a copy riding through new generations cost 5.9 times the file, issue 10).
//! - Encoders. A symbol needs its object's encoder; when it is not at hand the symbol waits,
//!   [`Carousel::poll_load`] names the object, and the shell reads it from disk (re-hashing it)
//!   and hands back an encoder ([`Carousel::handle_encoder`]) or says it cannot
//!   ([`Carousel::handle_unloadable`]). Kept encoders are bounded in bytes (`encoders`).
//! - What next and when: the [`Scheduler`] orders rounds, the [`Pacer`] holds the rate.
//!   Each packet handed out reserves a full packet's wire bytes until the shell reports what
//!   it really sent ([`Carousel::handle_sent`]), so a batch never outruns the bucket.
//!
//! Invariants (checked by the tests beside this file, a proptest among them):
//! - nothing is sent on a group nobody listens to: a symbol only for an object whose group is
//!   listened and not leaving, the root record and the beacon only while their groups are;
//! - every symbol is of an object the current table publishes (current or kept generation);
//! - an object that cannot be loaded is asked for at most once per table, and then not sent;
//! - at most `max_unrouted` unrouted groups, so a flood of joins costs bounded memory;
//! - wire bytes handed out from the start stay within `rate * t + burst` (and over any span
//!   `t` within `2 * rate * t + burst`, and `rate * t + burst` plus what the pacer makes up,
//!   `sched::CATCH_UP_MAX` at most: the pacer's own tests check those); time with nothing
//!   to send is not made up.

use std::collections::{HashMap, HashSet};
use std::net::Ipv6Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::wire::object::ObjectHash;

use super::encoders::Encoders;
use crate::mld::GroupEvent;
use crate::net::WIRE_OVERHEAD;
use crate::serve::index::Source;
use crate::serve::sched::{self, Pacer, SchedConfig, Scheduler};
use crate::serve::table::Table;
use crate::wire::channel::{Address, SealKeys, Tag};
use crate::wire::fec::{symbol_size_for_object, Esi, ObjectEncoder};
use crate::wire::packet;

/// The pacer lets out at least this much sending time back to back, as Linux's TCP paces
/// (a millisecond of data a burst). The shell sleeps between bursts, and a sleep ends 50 to
/// 150 us late (timer slack, a wake-up), or a scheduler slice late when receivers share the
/// server's cores; what a burst does not cover is lost for good once the pacer's catch-up is
/// spent. With a burst of 32 packets (46 KB, 74 us at 5 Gbit/s) each wake sent one batch,
/// and `--rate 5G` sent at 1.7 Gbit/s. tools/bench's unshaped 256 MiB copy, one receiver
/// (lab `pu`, three runs each, same hour, iperf2 459 MB/s): 207 to 215 MB/s with 32
/// packets, 360 to 372 with 250 us, 384 to 392 with 1 ms. Rates of 370 Mbit/s and less keep
/// their 32 packets.
pub const BURST_TIME: Duration = Duration::from_millis(1);

/// Bytes the pacer lets out back to back: `burst_packets` full packets, or [`BURST_TIME`] at
/// `rate_bps`, whichever is more.
fn burst_bytes(config: &CarouselConfig) -> usize {
    let packets = config.burst_packets.max(1) * (config.max_payload + WIRE_OVERHEAD);
    let timed = config.rate_bps as f64 / 8.0 * BURST_TIME.as_secs_f64();
    packets.max(timed as usize)
}

#[derive(Clone, Debug)]
pub struct CarouselConfig {
    /// Send rate in bits per second, counting Ethernet, IPv6 and UDP headers.
    pub rate_bps: u64,
    /// The largest UDP payload the interface carries unfragmented.
    pub max_payload: usize,
    /// Full-size packets the pacer lets out back to back, at least (more at a rate whose
    /// [`BURST_TIME`] holds more).
    pub burst_packets: usize,
    /// Full-size packets of room the pacer waits for once it ran dry, so that the shell wakes
    /// for a batch rather than for every packet.
    pub wake_packets: usize,
    /// Bytes of encoders kept in memory.
    pub encoder_memory: usize,
    /// Listened groups remembered that the current table does not name.
    pub max_unrouted: usize,
    pub sched: SchedConfig,
}

impl Default for CarouselConfig {
    fn default() -> Self {
        CarouselConfig {
            rate_bps: 100_000_000,
            max_payload: 1452,
            burst_packets: 32,
            wake_packets: 8,
            encoder_memory: 32 << 20,
            max_unrouted: crate::mld::TrackerConfig::default().max_groups,
            sched: SchedConfig::default(),
        }
    }
}

/// A listened object group: the object it names in the current table (None: not in it), and
/// whether its last listener said it left (then nothing starts on it until one answers).
#[derive(Clone, Copy, Debug)]
struct Listened {
    hash: Option<ObjectHash>,
    leaving: bool,
}

/// How an object goes out, worked out once when it is routed on, not per packet.
#[derive(Clone, Copy, Debug)]
struct Route {
    address: Address,
    k: u32,
    symbol_size: usize,
}

/// An encoder the state needs: the shell loads `hash` (`Table::load`) and encodes it with
/// symbols of `symbol_size` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Load {
    pub hash: ObjectHash,
    pub symbol_size: usize,
}

/// One packet to send: where, and what it carries.
#[derive(Clone)]
pub struct Transmit {
    pub to: Address,
    pub payload: Payload,
}

#[derive(Clone)]
pub enum Payload {
    /// The encoded root record.
    Root(Arc<[u8]>),
    /// A beacon: the tags of the objects about to be sent, soonest first.
    Air(Vec<Tag>),
    Symbol {
        hash: ObjectHash,
        esi: Esi,
        encoder: Arc<ObjectEncoder>,
    },
}

impl Transmit {
    /// Writes the packet into `out` (`symbol` is scratch for a symbol's bytes).
    pub fn encode(&self, seal: Option<&SealKeys>, symbol: &mut Vec<u8>, out: &mut Vec<u8>) {
        match &self.payload {
            Payload::Root(record) => packet::encode_root(out, self.to.tag, record, seal),
            Payload::Air(tags) => packet::encode_air(out, self.to.tag, tags, seal),
            Payload::Symbol { esi, encoder, .. } => {
                encoder.symbol(*esi, symbol);
                packet::encode_symbol(out, self.to.tag, *esi, symbol, seal);
            }
        }
    }
}

pub struct Carousel {
    config: CarouselConfig,
    table: Arc<Table>,
    /// Listened object groups.
    listened: HashMap<Ipv6Addr, Listened>,
    unrouted: usize,
    /// Objects routed on: exactly those the scheduler may send.
    routes: HashMap<ObjectHash, Route>,
    sched: Scheduler,
    pacer: Pacer,
    /// Wire bytes handed out and not yet reported sent.
    reserved: usize,
    encoders: Encoders,
    /// A symbol the scheduler chose whose encoder is not at hand.
    waiting: Option<(ObjectHash, Esi)>,
    /// Objects of this table that could not be loaded: never routed on again while it lasts.
    unloadable: HashSet<ObjectHash>,
    /// The latest time the state was given.
    clock: Instant,
}

impl Carousel {
    pub fn new(now: Instant, config: CarouselConfig, table: Arc<Table>) -> Carousel {
        Carousel {
            pacer: Pacer::new(now, config.rate_bps, burst_bytes(&config)),
            sched: Scheduler::new(config.sched.clone()),
            encoders: Encoders::new(config.encoder_memory),
            table,
            listened: HashMap::new(),
            unrouted: 0,
            routes: HashMap::new(),
            reserved: 0,
            waiting: None,
            unloadable: HashSet::new(),
            clock: now,
            config,
        }
    }

    /// The table objects are loaded from and packets sealed with.
    pub fn table(&self) -> &Arc<Table> {
        &self.table
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.sched
    }

    /// K of `hash` as this carousel sends it; None for an object it cannot send.
    pub fn source_symbols(&self, hash: &ObjectHash) -> Option<u32> {
        self.route_of(hash).map(|r| r.k)
    }

    /// Listened groups remembered, routed or not.
    pub fn listened_groups(&self) -> usize {
        self.listened.len()
    }

    pub fn encoders(&self) -> &Encoders {
        &self.encoders
    }

    fn tick(&mut self, now: Instant) {
        self.clock = self.clock.max(now);
    }

    pub fn handle_group_event(&mut self, now: Instant, event: GroupEvent) {
        self.tick(now);
        match event {
            GroupEvent::Active(g) => self.listen(now, g),
            GroupEvent::Inactive(g) => self.unlisten(now, g),
            GroupEvent::Leaving(g) => self.leaving(now, g),
            GroupEvent::Listeners(g, n) => {
                if let Some(hash) = self.listened.get(&g).and_then(|l| l.hash) {
                    self.sched.handle_listeners(&hash, n);
                } else {
                    self.reported(&g, n);
                }
            }
        }
        self.note_idle(now);
    }

    /// The root record and the beacon are cheap: they go on until `Inactive`. An object
    /// pauses where it is.
    fn leaving(&mut self, now: Instant, group: Ipv6Addr) {
        // A receiver leaves a report's group when it no longer says so (its loss moved to
        // another level): the report is void at once (a forged leave voids it until the
        // query's answer).
        if self.reported(&group, 0) {
            return;
        }
        let Some(listened) = self.listened.get_mut(&group) else {
            return;
        };
        listened.leaving = true;
        if let Some(hash) = listened.hash {
            self.sched.handle_leaving(now, &hash);
            self.unwait(&hash);
        }
    }

    fn listen(&mut self, now: Instant, group: Ipv6Addr) {
        if group == self.table.root.group {
            return self.sched.handle_root(now, true);
        }
        if group == self.table.air.group {
            return self.sched.handle_air(now, true);
        }
        if self.reported(&group, 1) {
            return;
        }
        let hash = self.table.hash_of(&group);
        if !self.remember(group, hash, false) {
            return;
        }
        if let Some(hash) = hash {
            self.route_on(now, hash);
        }
    }

    /// Tells the scheduler that `listeners` receivers report what `group` stands for; false
    /// when `group` is no report's group.
    fn reported(&mut self, group: &Ipv6Addr, listeners: usize) -> bool {
        let report = self.table.report(group);
        if let Some(report) = report {
            self.sched.handle_report(report, listeners);
        }
        report.is_some()
    }

    /// Notes `group` as listened (and no longer leaving unless `leaving`), naming `hash`;
    /// false when it cannot be, as too many unrouted groups are remembered already.
    fn remember(&mut self, group: Ipv6Addr, hash: Option<ObjectHash>, leaving: bool) -> bool {
        if let Some(listened) = self.listened.get_mut(&group) {
            listened.leaving = leaving;
            return true;
        }
        if hash.is_none() && self.unrouted >= self.config.max_unrouted {
            return false;
        }
        self.unrouted += usize::from(hash.is_none());
        self.listened.insert(group, Listened { hash, leaving });
        true
    }

    fn unlisten(&mut self, now: Instant, group: Ipv6Addr) {
        if group == self.table.root.group {
            return self.sched.handle_root(now, false);
        }
        if group == self.table.air.group {
            return self.sched.handle_air(now, false);
        }
        if self.reported(&group, 0) {
            return;
        }
        match self.listened.remove(&group).map(|l| l.hash) {
            Some(Some(hash)) => self.route_off(now, &hash),
            Some(None) => self.unrouted -= 1,
            None => {}
        }
    }

    /// Starts (or resumes) sending `hash`, unless it cannot be sent.
    fn route_on(&mut self, now: Instant, hash: ObjectHash) {
        if self.unloadable.contains(&hash) {
            return;
        }
        let route = match self.routes.get(&hash) {
            Some(r) => *r,
            None => match self.route_of(&hash) {
                Some(r) => *self.routes.entry(hash).or_insert(r),
                None => return,
            },
        };
        self.sched
            .handle_active(now, hash, route.k, self.urgent(&hash));
    }

    fn route_off(&mut self, now: Instant, hash: &ObjectHash) {
        self.sched.handle_inactive(now, hash);
        self.routes.remove(hash);
        self.unwait(hash);
    }

    /// Where `hash` goes and its K, from its length and the symbol size it is sent with;
    /// None for an object that cannot be coded (empty, or a link too small for a symbol).
    fn route_of(&self, hash: &ObjectHash) -> Option<Route> {
        let len = u64::from(self.table.object(hash)?.len);
        let sealed = self.table.channel.seal().is_some();
        let link = packet::symbol_size_for(self.config.max_payload, sealed);
        let symbol_size = symbol_size_for_object(len, link);
        if symbol_size == 0 {
            return None;
        }
        Some(Route {
            address: self.table.channel.object_address(hash),
            k: u32::try_from(len.div_ceil(symbol_size as u64)).ok()?,
            symbol_size,
        })
    }

    /// Metadata (kept in memory: directories, file indexes) is urgent: receivers walk it
    /// before they can ask for blocks.
    fn urgent(&self, hash: &ObjectHash) -> bool {
        matches!(
            self.table.object(hash).map(|o| &o.source),
            Some(Source::Memory(_))
        )
    }

    fn unwait(&mut self, hash: &ObjectHash) {
        if self.waiting.is_some_and(|(h, _)| h == *hash) {
            self.waiting = None;
        }
    }

    /// Takes `table` as the published one (nothing happens if it already is).
    pub fn handle_table(&mut self, now: Instant, table: Arc<Table>) {
        self.tick(now);
        if Arc::ptr_eq(&table, &self.table) {
            return;
        }
        let moved: Vec<(Ipv6Addr, bool)> = self
            .listened
            .iter()
            .filter(|(g, l)| table.hash_of(g) != l.hash)
            .map(|(g, l)| (*g, l.leaving))
            .collect();
        for (g, _) in &moved {
            self.unlisten(now, *g);
        }
        self.table = table;
        // A new generation is a new chance: its sources may differ from the last one's.
        // (Objects dropped under the old one whose group did not move wait for a new join.)
        self.unloadable.clear();
        for (g, leaving) in moved {
            let hash = self.table.hash_of(&g);
            if self.remember(g, hash, leaving) && !leaving {
                if let Some(hash) = hash {
                    self.route_on(now, hash);
                }
            }
        }
        self.note_idle(now);
    }

    /// `encoder` of `hash`, built by the shell after [`Carousel::poll_load`].
    pub fn handle_encoder(&mut self, now: Instant, hash: ObjectHash, encoder: ObjectEncoder) {
        self.tick(now);
        let Some(route) = self.routes.get(&hash) else {
            return; // no longer sent: nothing to keep it for
        };
        if encoder.source_symbols() != route.k || encoder.symbol_size() != route.symbol_size {
            tracing::warn!(%hash, "an encoder that does not match the table: not sending it");
            return self.drop_object(now, &hash);
        }
        self.encoders.put(hash, Arc::new(encoder));
    }

    /// `hash` could not be loaded (its file changed or is gone): it is not sent again while
    /// this table lasts. The shell reports it; it is never asked for it again.
    pub fn handle_unloadable(&mut self, now: Instant, hash: ObjectHash) {
        self.tick(now);
        self.drop_object(now, &hash);
        self.unloadable.insert(hash);
    }

    fn drop_object(&mut self, now: Instant, hash: &ObjectHash) {
        self.sched.forget(now, hash);
        self.routes.remove(hash);
        self.encoders.remove(hash);
        self.unwait(hash);
    }

    /// `wire_bytes` (payload plus headers) went out of the packets handed out since the last
    /// call; the rest were not sent.
    pub fn handle_sent(&mut self, now: Instant, wire_bytes: usize) {
        self.tick(now);
        self.pacer.handle_sent(now, wire_bytes);
        self.reserved = 0;
        // A batch that ended a round (on its last place, or on the last of the pacer's room)
        // leaves nothing to send, though no poll found that out.
        self.note_idle(now);
    }

    /// The shell pauses sending for `pause` (after a failed send): that time is not made up.
    pub fn handle_pause(&mut self, now: Instant, pause: Duration) {
        self.tick(now);
        self.pacer.handle_idle(now, Some(now + pause));
    }

    /// The encoder to build before the next symbol can go.
    pub fn poll_load(&self) -> Option<Load> {
        let (hash, _) = self.waiting?;
        let route = self.routes.get(&hash)?;
        Some(Load {
            hash,
            symbol_size: route.symbol_size,
        })
    }

    /// [`Carousel::poll_transmit`], building on the way the encoders it waits for with
    /// `build` (the shell's disk read and encoding; `None`: the object cannot be loaded).
    pub fn next_transmit(
        &mut self,
        now: Instant,
        mut build: impl FnMut(&Arc<Table>, Load) -> Option<ObjectEncoder>,
    ) -> Option<Transmit> {
        loop {
            if let Some(t) = self.poll_transmit(now) {
                return Some(t);
            }
            let load = self.poll_load()?;
            let table = self.table.clone();
            match build(&table, load) {
                Some(encoder) => self.handle_encoder(now, load.hash, encoder),
                None => self.handle_unloadable(now, load.hash),
            }
        }
    }

    /// The next packet to send at `now`. None when nothing may go now: then an encoder is
    /// awaited ([`Carousel::poll_load`]) or nothing is due before [`Carousel::poll_timeout`].
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        self.tick(now);
        let full = self.full_packet();
        if self.pacer.available(now) < self.reserved + full {
            return None;
        }
        let transmit = match self.waiting {
            Some((hash, esi)) => self.symbol(hash, esi)?,
            None => self.next_scheduled(now)?,
        };
        self.reserved += full;
        Some(transmit)
    }

    fn next_scheduled(&mut self, now: Instant) -> Option<Transmit> {
        let Some(next) = self.sched.poll_transmit(now) else {
            self.note_idle(now);
            return None;
        };
        self.pacer.handle_busy(now);
        let transmit = match next {
            sched::Transmit::Root => Transmit {
                to: self.table.root,
                payload: Payload::Root(self.table.record()),
            },
            sched::Transmit::Air => self.beacon(),
            sched::Transmit::Symbol { hash, esi } => {
                self.waiting = Some((hash, esi));
                return self.symbol(hash, esi);
            }
        };
        Some(transmit)
    }

    /// Tells the pacer whether anything is to send, after whatever may have changed that
    /// (a batch, an event, a table): the pacer makes up lost time only while something is.
    /// After an event it must not wait for the next poll, which a dry pacer keeps from
    /// reaching the scheduler.
    fn note_idle(&mut self, now: Instant) {
        match self.nothing_until(now) {
            Some(until) => self.pacer.handle_idle(now, until),
            None => self.pacer.handle_busy(now),
        }
    }

    /// Until when nothing is to send: `Some(Some(t))` until the scheduler's next timer,
    /// `Some(None)` until an event, `None` when something is (or waits for its encoder).
    fn nothing_until(&self, now: Instant) -> Option<Option<Instant>> {
        if self.waiting.is_some() {
            return None;
        }
        match self.sched.poll_timeout() {
            Some(t) if t > now => Some(Some(t)),
            None if self.sched.is_idle() => Some(None),
            _ => None,
        }
    }

    /// The waiting symbol, if its encoder is at hand.
    fn symbol(&mut self, hash: ObjectHash, esi: Esi) -> Option<Transmit> {
        let Some(route) = self.routes.get(&hash).copied() else {
            // Scheduled but not routed: cannot happen, and must not send (or loop) if it did.
            self.waiting = None;
            self.sched.forget(self.clock, &hash);
            return None;
        };
        let encoder = self.encoders.get(&hash)?;
        self.waiting = None;
        Some(Transmit {
            to: route.address,
            payload: Payload::Symbol { hash, esi, encoder },
        })
    }

    fn beacon(&self) -> Transmit {
        let tags = self
            .sched
            .on_air(packet::MAX_AIR_TAGS)
            .iter()
            .filter_map(|h| self.routes.get(h).map(|r| r.address.tag))
            .collect();
        Transmit {
            to: self.table.air,
            payload: Payload::Air(tags),
        }
    }

    /// When [`Carousel::poll_transmit`] may next give a packet; None while nothing will
    /// until an event. A time already passed means at once.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.poll_load().is_some() {
            return Some(self.clock);
        }
        if self.sched.is_idle() {
            return None;
        }
        // Not idle and no timer: rounds are queued now.
        let due = self.sched.poll_timeout().unwrap_or(self.clock);
        let room = self.reserved + self.full_packet() * self.config.wake_packets.max(1);
        Some(due.max(self.pacer.ready_at(room)))
    }

    /// Wire bytes of the largest packet: what each packet handed out reserves.
    fn full_packet(&self) -> usize {
        self.config.max_payload + WIRE_OVERHEAD
    }
}

#[cfg(test)]
mod tests;
