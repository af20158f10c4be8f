//! The event loop: a virtual clock, one queue of timed events, the servers (one, or several
//! of one channel), the receivers and the snooping bridge between them.
//!
//! Time is a base `Instant` plus offsets; nothing sleeps. Each event runs at its time, in
//! the order it was queued among equals, and whatever it changes is followed at once by the
//! state machines' own work (`poll_*`), whose next timer is queued as an event in turn.
//!
//! The bridge forwards a packet for a group only to the hosts joined to it when it is sent
//! (IGMP/MLD snooping), and counts any packet sent on a group that no host had joined then.
//! "When it is sent" is the packet's departure from the server's uplink, as the pacer set
//! it, not the server's poll that handed out a whole round at once: forwarding by the poll's
//! time, a receiver whose join came a few microseconds after a round's first packet missed
//! all of it, needed a later round a cooldown after the others, and at 1000 receivers under
//! 20% loss a few such receivers fell further behind with every object, each object they
//! reached after the others costing a round of its own (1.37 times one receiver's bytes for
//! a 1,000-file tree at seed 2; 1.07 with departure times).
//! "Then" allows for the protocol's own delays: after the last host leaves, the leave takes
//! the uplink's delay to reach the server and the tracker's last-listener check runs
//! (robustness x last-listener interval); after a host crashes, its listeners expire at the
//! server after the listener interval. Packets sent within those spans are the protocol
//! working as specified; any other is a bug.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::Ipv6Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::receiver::{Life, SimReceiver};
use super::server::{Output, SimServer};
use crate::mld::parse::{encode_report, GroupRecord, RecordType};

/// Slack for a leave's consequences to reach the carousel on top of the computed spans.
const SLACK: Duration = Duration::from_millis(50);

/// What happens at one instant.
pub enum Ev {
    Start(usize),
    Stop(usize),
    Crash(usize),
    Datagram {
        rx: usize,
        from: Ipv6Addr,
        group: Ipv6Addr,
        bytes: Arc<[u8]>,
    },
    /// A server's packet leaves its uplink: the bridge forwards it to the ports that hold its
    /// group then (see the module doc).
    Depart {
        from: Ipv6Addr,
        group: Ipv6Addr,
        bytes: Arc<[u8]>,
    },
    /// An MLD message reaches the servers (all but its sender).
    Mld {
        from: Ipv6Addr,
        bytes: Arc<[u8]>,
    },
    /// A host answers a query: every group it holds (general) or `group`.
    Answer {
        rx: usize,
        group: Option<Ipv6Addr>,
    },
    RxTimer(usize),
    ServerWake(usize),
    /// The first server's process restarts (see [`SimServer::restart`]).
    RestartServer,
}

struct Scheduled {
    at: Instant,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

/// The snooping bridge's view: who holds which group, and until when a group that lost its
/// last holder may still carry packets.
#[derive(Default)]
pub struct Bridge {
    members: HashMap<Ipv6Addr, HashSet<usize>>,
    grace: HashMap<Ipv6Addr, Instant>,
    ever: HashSet<Ipv6Addr>,
    pub sent_unjoined: u64,
    pub sent_never_joined: u64,
}

impl Bridge {
    pub fn join(&mut self, rx: usize, group: Ipv6Addr) {
        self.ever.insert(group);
        self.members.entry(group).or_default().insert(rx);
    }

    /// `rx` no longer holds `group`; packets may go on until `until`.
    pub fn leave(&mut self, rx: usize, group: Ipv6Addr, until: Instant) {
        if let Some(m) = self.members.get_mut(&group) {
            m.remove(&rx);
        }
        let g = self.grace.entry(group).or_insert(until);
        *g = (*g).max(until);
    }

    /// The hosts a packet to `group` sent at `now` reaches, after counting it.
    pub fn forward(&mut self, group: &Ipv6Addr, now: Instant) -> Vec<usize> {
        let members: Vec<usize> = self
            .members
            .get(group)
            .map(|m| m.iter().copied().collect())
            .unwrap_or_default();
        if members.is_empty() {
            if !self.ever.contains(group) {
                self.sent_never_joined += 1;
            } else if self.grace.get(group).is_none_or(|g| *g < now) {
                self.sent_unjoined += 1;
            }
        }
        members
    }
}

/// The queue and everything it drives.
pub struct World {
    pub now: Instant,
    queue: BinaryHeap<Reverse<Scheduled>>,
    seq: u64,
    pub servers: Vec<SimServer>,
    pub receivers: Vec<SimReceiver>,
    pub bridge: Bridge,
    uplink: Duration,
    server_wake: Vec<Option<Instant>>,
    rx_wake: Vec<Option<Instant>>,
    out: Vec<Output>,
    leave_grace: Duration,
    crash_grace: Duration,
}

impl World {
    pub fn new(
        now: Instant,
        servers: Vec<SimServer>,
        receivers: Vec<SimReceiver>,
        uplink: Duration,
    ) -> World {
        let tracker = servers[0].tracker().config();
        let llqt = tracker.last_listener_interval * u32::from(tracker.timing.robustness.max(1));
        let jitter = receivers
            .iter()
            .map(|r| r.downlink.config().delay + r.downlink.config().jitter)
            .max()
            .unwrap_or_default();
        World {
            now,
            queue: BinaryHeap::new(),
            seq: 0,
            rx_wake: vec![None; receivers.len()],
            leave_grace: uplink + llqt + jitter + SLACK,
            crash_grace: uplink + tracker.timing.listener_interval() + jitter + SLACK,
            server_wake: vec![None; servers.len()],
            servers,
            receivers,
            bridge: Bridge::default(),
            uplink,
            out: Vec::new(),
        }
    }

    pub fn schedule(&mut self, at: Instant, ev: Ev) {
        self.seq += 1;
        let seq = self.seq;
        self.queue.push(Reverse(Scheduled { at, seq, ev }));
    }

    /// Runs events until `until`, or until `stop` says so (checked after each event).
    pub fn run(&mut self, until: Instant, mut stop: impl FnMut(&World) -> bool) {
        for i in 0..self.servers.len() {
            self.wake_server(i, self.now);
        }
        while let Some(Reverse(s)) = self.queue.pop() {
            if s.at > until {
                self.queue.push(Reverse(s));
                self.now = until;
                return;
            }
            self.now = self.now.max(s.at);
            self.handle(s.at, s.ev);
            if stop(self) {
                return;
            }
        }
    }

    fn handle(&mut self, at: Instant, ev: Ev) {
        let now = self.now;
        match ev {
            Ev::Start(rx) => {
                let channel = self.servers[0].carousel().table().channel.clone();
                self.receivers[rx].start(now, channel);
                self.service_rx(rx);
            }
            Ev::Stop(rx) => self.stop(rx),
            Ev::Crash(rx) => self.crash(rx),
            Ev::Datagram {
                rx,
                from,
                group,
                bytes,
            } => {
                self.receivers[rx].handle_datagram(now, from, group, &bytes);
                self.service_rx(rx);
            }
            Ev::Depart { from, group, bytes } => self.deliver(from, group, bytes),
            Ev::Mld { from, bytes } => {
                for i in 0..self.servers.len() {
                    if self.servers[i].addr != from {
                        self.servers[i].handle_mld(now, from, &bytes);
                        self.wake_server(i, now);
                    }
                }
            }
            Ev::Answer { rx, group } => self.answer(rx, group),
            Ev::RxTimer(rx) if self.rx_wake[rx] == Some(at) => {
                self.rx_wake[rx] = None;
                self.service_rx(rx);
            }
            Ev::ServerWake(i) if self.server_wake[i] == Some(at) => {
                self.server_wake[i] = None;
                self.service_server(i);
            }
            Ev::RestartServer => {
                self.servers[0].restart(now);
                self.server_wake[0] = None;
                self.wake_server(0, now);
            }
            Ev::RxTimer(_) | Ev::ServerWake(_) => {}
        }
    }

    fn wake_server(&mut self, i: usize, at: Instant) {
        if self.server_wake[i].is_none_or(|w| at < w) {
            self.server_wake[i] = Some(at);
            self.schedule(at, Ev::ServerWake(i));
        }
    }

    fn service_server(&mut self, i: usize) {
        let now = self.now;
        let from = self.servers[i].addr;
        let mut out = std::mem::take(&mut self.out);
        self.servers[i].poll(now, &mut out);
        for o in out.drain(..) {
            match o {
                Output::Packet { at, group, bytes } => {
                    self.schedule(at.max(now), Ev::Depart { from, group, bytes })
                }
                Output::Query { to, bytes } => {
                    self.query(to);
                    // The other servers' queriers hear it, and the lowest address wins.
                    if self.servers.len() > 1 {
                        self.schedule(now + self.uplink, Ev::Mld { from, bytes });
                    }
                }
            }
        }
        self.out = out;
        if let Some(t) = self.servers[i].poll_timeout() {
            // The carousel may ask for "now" while its pacer is short of one packet.
            self.wake_server(i, t.max(now + Duration::from_micros(10)));
        }
    }

    fn deliver(&mut self, from: Ipv6Addr, group: Ipv6Addr, bytes: Arc<[u8]>) {
        let at = self.now;
        for rx in self.bridge.forward(&group, at) {
            for d in self.receivers[rx].downlink.carry() {
                let bytes = bytes.clone();
                self.schedule(
                    at + d,
                    Ev::Datagram {
                        rx,
                        from,
                        group,
                        bytes,
                    },
                );
            }
        }
    }

    /// A query reaches the hosts it is for; each answers after a random delay.
    fn query(&mut self, to: Ipv6Addr) {
        let general = to.segments()[0] == 0xff02;
        let tracker = self.servers[0].tracker().config();
        let window = if general {
            tracker.timing.max_response_delay
        } else {
            tracker.last_listener_interval
        };
        for rx in 0..self.receivers.len() {
            let r = &mut self.receivers[rx];
            let holds = if general {
                r.life == Life::Running || !r.joined.is_empty()
            } else {
                r.joined.contains(&to)
            };
            if holds && r.life != Life::Crashed {
                let after = r.downlink.delay() + r.downlink.below(window);
                let group = (!general).then_some(to);
                self.schedule(self.now + after, Ev::Answer { rx, group });
            }
        }
    }

    /// A host's answer to a query: current-state records (MODE_IS_EXCLUDE) of what it holds.
    fn answer(&mut self, rx: usize, group: Option<Ipv6Addr>) {
        let r = &self.receivers[rx];
        if r.life == Life::Crashed {
            return;
        }
        let groups: Vec<Ipv6Addr> = match group {
            Some(g) if r.joined.contains(&g) => vec![g],
            Some(_) => Vec::new(),
            None => r.joined.iter().copied().collect(),
        };
        let records: Vec<(RecordType, Ipv6Addr)> = groups
            .into_iter()
            .map(|g| (RecordType::ModeIsExclude, g))
            .collect();
        self.report(rx, &records);
    }

    fn report(&mut self, rx: usize, records: &[(RecordType, Ipv6Addr)]) {
        if records.is_empty() {
            return;
        }
        let records: Vec<GroupRecord> = records
            .iter()
            .map(|&(record_type, group)| GroupRecord {
                record_type,
                group,
                sources: Vec::new(),
            })
            .collect();
        let from = self.receivers[rx].addr;
        let bytes = encode_report(&records).into();
        self.schedule(self.now + self.uplink, Ev::Mld { from, bytes });
    }

    fn service_rx(&mut self, rx: usize) {
        let now = self.now;
        let ops = self.receivers[rx].service(now);
        self.membership(rx, &ops);
        if let Some(t) = self.receivers[rx].poll_timeout() {
            let t = t.max(now + Duration::from_micros(10));
            if self.rx_wake[rx].is_none_or(|w| t < w || w <= now) {
                self.rx_wake[rx] = Some(t);
                self.schedule(t, Ev::RxTimer(rx));
            }
        }
    }

    /// Applies membership changes at the bridge and reports them as the fetch engine's
    /// `Reporter` does: one record per group for its last change, CHANGE_TO_EXCLUDE for a
    /// join, CHANGE_TO_INCLUDE for a leave.
    fn membership(&mut self, rx: usize, ops: &[(Ipv6Addr, bool)]) {
        let mut last: Vec<(Ipv6Addr, bool)> = Vec::new();
        for &(group, join) in ops {
            if join {
                self.bridge.join(rx, group);
            } else {
                self.bridge.leave(rx, group, self.now + self.leave_grace);
            }
            last.retain(|(g, _)| *g != group);
            last.push((group, join));
        }
        let (joined, left): (Vec<_>, Vec<_>) = last.into_iter().partition(|(_, j)| *j);
        let records: Vec<(RecordType, Ipv6Addr)> = joined
            .into_iter()
            .map(|(g, _)| (RecordType::ChangeToExclude, g))
            .chain(
                left.into_iter()
                    .map(|(g, _)| (RecordType::ChangeToInclude, g)),
            )
            .collect();
        self.report(rx, &records);
    }

    fn stop(&mut self, rx: usize) {
        if self.receivers[rx].life != Life::Running {
            return;
        }
        let ops = self.receivers[rx].stop();
        self.membership(rx, &ops);
    }

    fn crash(&mut self, rx: usize) {
        if self.receivers[rx].life != Life::Running {
            return;
        }
        let until = self.now + self.crash_grace;
        for group in self.receivers[rx].crash() {
            self.bridge.leave(rx, group, until);
        }
    }
}
