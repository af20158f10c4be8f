//! A simulated receiver host: one real [`FetchState`] driven as the fetch engine drives it,
//! with a [`Walk`] for its workload and the kernel's part played in memory.
//!
//! The kernel's part: the groups the state joins and leaves ([`FetchState::poll_membership`])
//! are the host's memberships; a datagram reaches the state only for a group joined when it
//! arrives; claims are always granted (one process per host, so no other process shares the
//! cache). The host starts by watching the root group, as `copy` does, and walks the tree
//! from the first root record it hears.

use std::collections::{HashMap, HashSet};
use std::net::Ipv6Addr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::link::Link;
use super::walk::{Walk, Workload};
use crate::fetch::membership::Memberships;
use crate::fetch::object::StandIn;
use crate::fetch::state::{Claim, Event, FetchState, Requested};
use crate::fetch::{FetchConfig, FetchStats, Freshness, Priority};
use crate::net::Envelope;
use crate::wire::channel::{Channel, Tag};
use crate::wire::object::ObjectHash;

/// The interface index every simulated host receives on.
pub const IFINDEX: u32 = 2;

/// Where a host is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Life {
    NotStarted,
    Running,
    /// Its workload is done, every object verified.
    Done,
    /// Stopped cleanly: it left its groups.
    Stopped,
    /// Went silent without leaving.
    Crashed,
}

pub struct SimReceiver {
    pub addr: Ipv6Addr,
    pub life: Life,
    pub downlink: Link,
    /// Groups the host is joined to.
    pub joined: HashSet<Ipv6Addr>,
    pub started: Option<Instant>,
    pub done: Option<Instant>,
    /// The longest wait for one object, from its request to its completion.
    pub max_wait: Duration,
    pub failures: u64,
    pub stats: Arc<FetchStats>,
    state: Option<FetchState>,
    workload: Workload,
    seed: u64,
    walk: Option<Walk>,
    asked: HashMap<Tag, Instant>,
    /// Bundle members that completed before the walk asked for them (the cache a real
    /// receiver has): only those, so memory follows what came unasked.
    kept: HashMap<ObjectHash, lcfs_cache::Verified>,
    /// Decode by counting symbols, with objects from here ([`crate::sim::Scenario::counting`]).
    pub stand_in: Option<StandIn>,

    buf: Vec<u8>,
}

impl SimReceiver {
    pub fn new(addr: Ipv6Addr, downlink: Link, workload: Workload, seed: u64) -> SimReceiver {
        SimReceiver {
            addr,
            life: Life::NotStarted,
            downlink,
            joined: HashSet::new(),
            started: None,
            done: None,
            max_wait: Duration::ZERO,
            failures: 0,
            stats: Arc::new(FetchStats::default()),
            state: None,
            workload,
            seed,
            walk: None,
            asked: HashMap::new(),
            kept: HashMap::new(),
            stand_in: None,
            buf: Vec::new(),
        }
    }

    pub fn walk(&self) -> Option<&Walk> {
        self.walk.as_ref()
    }

    /// Starts the workload: the root group is watched first.
    pub fn start(&mut self, now: Instant, channel: Channel) {
        let stats = self.stats.clone();
        // Objects completed before the walk asked for them (a bundle's members) are `kept`
        // here, so the state need not hold recent ones: 64 of them were 4 MiB a receiver.
        let config = FetchConfig {
            recent: 1,
            stand_in: self.stand_in.clone(),
            // Every simulated receiver copies: it says it fetches in bulk from its start.
            bulk: true,
            ..FetchConfig::default()
        };
        // The simulated network has no kernel MLD timer to make room for.
        let members = Memberships::new(Duration::ZERO);
        let mut state = FetchState::new(now, channel, IFINDEX, config, stats, members);
        state.set_watching(now, true);
        self.state = Some(state);
        self.started = Some(now);
        self.life = Life::Running;
    }

    /// A datagram that `from` sent to `group` arrives.
    pub fn handle_datagram(&mut self, now: Instant, from: Ipv6Addr, group: Ipv6Addr, bytes: &[u8]) {
        if !self.joined.contains(&group) {
            return; // the kernel drops what no socket of the host joined
        }
        let Some(state) = self.state.as_mut() else {
            return;
        };
        self.buf.clear();
        self.buf.extend_from_slice(bytes);
        let env = Envelope {
            from,
            to: Some(group),
            ifindex: IFINDEX,
        };
        state.handle_datagram(now, env, &mut self.buf);
    }

    /// When [`SimReceiver::service`] has something to do next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.state.as_ref().map(FetchState::poll_timeout)
    }

    /// Runs what is due: timers, claims, events and the walk's requests. Returns the
    /// membership changes made, in order, for the bridge and the report.
    pub fn service(&mut self, now: Instant) -> Vec<(Ipv6Addr, bool)> {
        let Some(mut state) = self.state.take() else {
            return Vec::new();
        };
        if now >= state.poll_timeout() {
            state.handle_timeout(now);
        }
        while self.step(now, &mut state) {}
        let ops = state.poll_membership(now).unwrap_or_default();
        for &(group, join) in &ops {
            if join {
                self.joined.insert(group);
            } else {
                self.joined.remove(&group);
            }
        }
        if self.life == Life::Running && self.walk.as_ref().is_some_and(Walk::is_done) {
            self.life = Life::Done;
            self.done = Some(now);
        }
        // Done and every group left: nothing more to run.
        if self.life == Life::Running || !self.joined.is_empty() {
            self.state = Some(state);
        }
        ops
    }

    /// One round of claims, events and requests; false when nothing happened.
    fn step(&mut self, now: Instant, state: &mut FetchState) -> bool {
        let mut busy = false;
        while let Some((tag, _)) = state.poll_claim(now) {
            busy = true;
            state.handle_claim(now, tag, Claim::Granted);
        }
        while let Some(event) = state.poll_event() {
            busy = true;
            self.handle_event(now, state, event);
        }
        for b in self
            .walk
            .as_mut()
            .map(Walk::poll_bundles)
            .unwrap_or_default()
        {
            state.handle_bundles(b);
        }
        while let Some((r, need)) = self.walk.as_mut().and_then(Walk::poll_request) {
            busy = true;
            if let Some(v) = self.kept.remove(&r.hash) {
                if let Some(walk) = self.walk.as_mut() {
                    walk.handle_object(&v, need);
                }
                continue;
            }
            let got = state.handle_request(now, r, Priority::Readahead, Freshness::Current);
            let Some(walk) = self.walk.as_mut() else {
                break;
            };
            match got {
                Requested::Pending(tag) => {
                    self.asked.entry(tag).or_insert(now);
                    walk.handle_pending(tag, need);
                }
                Requested::Recent(v) => walk.handle_object(&v, need),
            }
        }
        busy
    }

    fn handle_event(&mut self, now: Instant, state: &mut FetchState, event: Event) {
        match event {
            Event::Root(heard) if self.walk.is_none() => {
                state.set_watching(now, false);
                let r = heard.record;
                self.walk = Some(Walk::new(self.workload, r.block_size, r.root, self.seed));
            }
            Event::Root(_) | Event::RootRepeated => {}
            Event::Completed { tag, object, .. } => {
                if let Some(asked) = self.asked.remove(&tag) {
                    self.max_wait = self.max_wait.max(now.duration_since(asked));
                }
                self.stats.objects_fetched.fetch_add(1, Ordering::Relaxed);
                if let Some(walk) = self.walk.as_mut() {
                    if !walk.handle_completed(tag, &object) {
                        // A bundle's member not asked for yet: what a cache would keep.
                        self.kept.insert(ObjectHash::of_verified(&object), object);
                    }
                }
            }
            Event::Release { .. } => {}
            Event::Failed { tag, .. } => {
                self.failures += 1;
                self.asked.remove(&tag);
                if let Some(walk) = self.walk.as_mut() {
                    walk.handle_failed(tag);
                }
            }
        }
    }

    /// Stops cleanly: every group is left (and reported). Returns the leaves.
    pub fn stop(&mut self) -> Vec<(Ipv6Addr, bool)> {
        if let Some(mut state) = self.state.take() {
            state.drain();
        }
        self.life = Life::Stopped;
        self.joined.drain().map(|g| (g, false)).collect()
    }

    /// Goes silent: no leave, no answer, no packet taken. Returns the groups it held.
    pub fn crash(&mut self) -> Vec<Ipv6Addr> {
        self.state = None;
        self.life = Life::Crashed;
        self.joined.drain().collect()
    }
}
