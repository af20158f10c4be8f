//! The simulated server: the real [`Carousel`], [`ListenerTracker`] and [`Querier`] over a
//! real [`Table`], with the shell's duties done in memory.
//!
//! Like `serve::sender`, it feeds the tracker's group events to the carousel, builds the
//! encoders the carousel asks for (`Table::load`, which re-reads and re-hashes the block, and
//! `ObjectEncoder::new`), and encodes every packet for real (`packet::encode_*`); like
//! `mld::socket`, it feeds reports to the tracker and sends the querier's general queries and
//! the tracker's last-listener queries. What it sends is counted in wire bytes (payload plus
//! [`WIRE_OVERHEAD`]); the link is held to the carousel's rate by serialising packets one
//! after the other, so a batch leaves over time, not at one instant.

use std::net::Ipv6Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::mld::parse::{encode_query, parse, MldMessage, Query};
use crate::mld::querier::{Querier, QuerierConfig};
use crate::mld::{GroupEvent, ListenerTracker};
use crate::net::WIRE_OVERHEAD;
use crate::serve::sender::carousel::{Carousel, CarouselConfig, Payload, Transmit};
use crate::serve::table::Table;
use crate::wire::fec::ObjectEncoder;

/// Packets the shell takes from the carousel before it reports them sent (its `batch`).
const BATCH: usize = 32;

/// Something the server puts on the link.
pub enum Output {
    /// A packet to an object, root or beacon group, leaving the server at `at`.
    Packet {
        at: Instant,
        group: Ipv6Addr,
        bytes: Arc<[u8]>,
    },
    /// An MLD query to `to` (all nodes for a general query, the group for a specific one).
    Query { to: Ipv6Addr, bytes: Arc<[u8]> },
}

/// Counters of what the server did.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerStats {
    pub packets: u64,
    /// Wire bytes of every packet sent (payload and headers).
    pub wire_bytes: u64,
    pub symbol_packets: u64,
    pub encoders_built: u64,
    pub unloadable: u64,
    pub general_queries: u64,
    pub specific_queries: u64,
    pub reports: u64,
    pub restarts: u64,
}

pub struct SimServer {
    pub addr: Ipv6Addr,
    config: CarouselConfig,
    carousel: Carousel,
    tracker: ListenerTracker,
    querier: Querier,
    /// Nanoseconds a wire byte takes at the carousel's rate.
    ns_per_byte: f64,
    /// When the link is free for the next packet.
    wire_free: Instant,
    symbol: Vec<u8>,
    stats: ServerStats,
}

impl SimServer {
    pub fn new(
        now: Instant,
        addr: Ipv6Addr,
        table: Arc<Table>,
        config: CarouselConfig,
    ) -> SimServer {
        let querier_config = QuerierConfig::default();
        let mut querier = Querier::new(querier_config, now);
        querier.set_own_address(Some(addr));
        let interest_table = table.clone();
        let tracker = ListenerTracker::new(
            querier_config.tracker_config(),
            Box::new(move |g| interest_table.interested(g)),
        );
        SimServer {
            addr,
            config: config.clone(),
            ns_per_byte: 8e9 / config.rate_bps.max(1) as f64,
            carousel: Carousel::new(now, config, table),
            tracker,
            querier,
            wire_free: now,
            symbol: Vec::new(),
            stats: ServerStats::default(),
        }
    }

    /// The server process restarts at `now`: carousel, tracker and querier start afresh on
    /// the same table (what `lcfs serve` does after a restart with its state dir), and
    /// learn their listeners again from MLD. The counters go on, so a report covers both.
    pub fn restart(&mut self, now: Instant) {
        let stats = self.stats;
        let table = self.carousel.table().clone();
        *self = SimServer::new(now, self.addr, table, self.config.clone());
        self.stats = stats;
        self.stats.restarts += 1;
    }

    pub fn stats(&self) -> ServerStats {
        self.stats
    }

    pub fn tracker(&self) -> &ListenerTracker {
        &self.tracker
    }

    pub fn carousel(&self) -> &Carousel {
        &self.carousel
    }

    /// An MLD message from `from`, as the MLD thread would take it.
    pub fn handle_mld(&mut self, now: Instant, from: Ipv6Addr, bytes: &[u8]) {
        match parse(bytes) {
            Ok(MldMessage::Query(q)) => self.querier.handle_query(now, from, &q),
            Ok(msg) => {
                self.stats.reports += 1;
                let events = self.tracker.handle_message(now, from, &msg);
                self.feed(now, events);
            }
            Err(_) => {}
        }
    }

    fn feed(&mut self, now: Instant, events: Vec<GroupEvent>) {
        for e in events {
            self.carousel.handle_group_event(now, e);
        }
    }

    /// Runs everything due at `now`: timers, queries, and packets while the pacer allows.
    pub fn poll(&mut self, now: Instant, out: &mut Vec<Output>) {
        let expired = self.tracker.poll_expired(now);
        self.feed(now, expired);
        self.queries(now, out);
        self.wire_free = self.wire_free.max(now);
        while self.batch(now, out) > 0 {}
    }

    fn queries(&mut self, now: Instant, out: &mut Vec<Output>) {
        if let Some(q) = self.querier.poll_transmit(now) {
            self.stats.general_queries += 1;
            let to = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
            out.push(Output::Query {
                to,
                bytes: encode_query(&q).into(),
            });
        }
        let c = *self.querier.config();
        let delay = self.tracker.config().last_listener_interval;
        while let Some(group) = self.tracker.poll_query() {
            self.stats.specific_queries += 1;
            let q = Query::address_specific(group, delay, c.robustness, c.query_interval);
            out.push(Output::Query {
                to: group,
                bytes: encode_query(&q).into(),
            });
        }
        self.tracker.set_timing(self.querier.timing());
    }

    /// One batch of packets, as the shell's `fill` and `send_some`; returns how many.
    fn batch(&mut self, now: Instant, out: &mut Vec<Output>) -> usize {
        let mut sent = 0;
        let mut wire = 0;
        while sent < BATCH {
            let Some(t) = self.next_transmit(now) else {
                break;
            };
            let table = self.carousel.table().clone();
            let mut bytes = Vec::new();
            t.encode(table.channel.seal(), &mut self.symbol, &mut bytes);
            let size = bytes.len() + WIRE_OVERHEAD;
            let at = self.wire_free;
            self.wire_free += Duration::from_nanos((size as f64 * self.ns_per_byte) as u64);
            self.stats.packets += 1;
            self.stats.wire_bytes += size as u64;
            self.stats.symbol_packets += u64::from(matches!(t.payload, Payload::Symbol { .. }));
            out.push(Output::Packet {
                at,
                group: t.to.group,
                bytes: bytes.into(),
            });
            wire += size;
            sent += 1;
        }
        if sent > 0 {
            self.carousel.handle_sent(now, wire);
        }
        sent
    }

    fn next_transmit(&mut self, now: Instant) -> Option<Transmit> {
        let stats = &mut self.stats;
        self.carousel.next_transmit(now, |table, load| {
            let built = table
                .load(&load.hash)
                .ok()
                .and_then(|b| ObjectEncoder::new(&b, load.symbol_size).ok());
            match built {
                Some(_) => stats.encoders_built += 1,
                None => stats.unloadable += 1,
            }
            built
        })
    }

    /// When [`SimServer::poll`] has something to do next.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        [
            self.carousel.poll_timeout(),
            self.tracker.poll_timeout(),
            self.querier.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}
