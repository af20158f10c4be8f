//! Explicit tracking of multicast listeners: per group, per reporting address, that listener's
//! filter mode, source list and expiry, within fixed limits whatever the link sends.
//!
//! The tracker is a sans-IO state machine: [`ListenerTracker::handle_message`] takes a decoded
//! report and `now`; [`ListenerTracker::poll_expired`] runs the timers that are due,
//! [`ListenerTracker::poll_timeout`] says when that next happens, and
//! [`ListenerTracker::poll_query`] hands out the Multicast-Address-Specific Queries to send.
//!
//! Semantics (the listener's own filter state, RFC 3810 section 6 as a host keeps it):
//! - MLDv1 report = EXCLUDE{}; MLDv1 done = the listener leaves.
//! - IS_IN / TO_IN (S) = INCLUDE(S); IS_EX / TO_EX (S) = EXCLUDE(S).
//! - ALLOW(S): INCLUDE(A) becomes A + S, EXCLUDE(X) becomes X - S; with no state, INCLUDE(S).
//! - BLOCK(S): INCLUDE(A) becomes A - S, EXCLUDE(X) becomes X + S; with no state, nothing.
//! - INCLUDE{} removes the listener.
//! - A listener wants the group in EXCLUDE mode unless it excludes one of our own addresses,
//!   and in INCLUDE mode if the list is non-empty and, when our addresses are known, holds one.
//! - Any record from a listener refreshes its expiry to `now` + [`MldTiming::listener_interval`].
//! - Reports from `::` (sent during duplicate address detection) are one more listener.
//!
//! A group is *listened* while one of its listeners wants it, *checking* while a last-listener
//! query runs, and *idle* otherwise. [`GroupEvent`]s report changes of that status, at most
//! one per group per message or timer: `Active` (now listened), `Leaving` (listened, now
//! checking), `Inactive` (now idle), and `Listeners` (still listened, by a different number of
//! stored listeners).
//!
//! Leaves are not trusted (MLD carries no authentication, and anyone on the link can send a
//! done from a receiver's address). When the last listener that wants a group stops wanting
//! it, by a done, TO_IN{}, BLOCK or an EXCLUDE of our address, the group turns *checking*
//! (RFC 3810 7.6.2 and 9.5 to 9.7): a Multicast-Address-Specific Query goes out at once and
//! `robustness - 1` more follow `last_listener_interval` apart; any report that wants the group
//! makes it listened again, and without one it turns idle after robustness *
//! `last_listener_interval` (the Last Listener Query Time). The same check runs when the last
//! known listener of a group that refused listeners (see below) expires: the refused ones may
//! still listen. We send these queries even while another querier is elected, a deviation
//! from RFC 3810 7.6.2: our own explicit tracking needs the answers, and a forged querier
//! must not make forged leaves trusted again.
//!
//! These queries are rate limited (a token bucket, `specific_queries_per_sec` with a burst of
//! `specific_query_burst`), so that a flood of dones cannot make the server a query
//! amplifier: one check per group at a time, and a check that finds the bucket empty sends no
//! query and turns idle after the same Last Listener Query Time (a receiver that still wants
//! the group rejoins, which reports, within its stall interval).
//!
//! Limits, chosen for real links and held against any flood:
//! - `max_groups` (4096) groups tracked: a receiver joins at most 34 groups at once (root,
//!   beacon and a window of 32 objects), and a sender at 100 Mbit/s finishes about 200 block
//!   rounds a second, so more groups than this could not all be served within a receiver's
//!   timeout anyway. Only groups the interest predicate accepts (our objects) are stored.
//! - `max_listeners` (131,072) listeners in all: a receiver that loses packets holds up to
//!   131 groups (root, beacon, its report group and a window of 128 objects), so 1000 of
//!   them need 131,000 (the simulation's peak at 1000 receivers under 20% loss: 131,007).
//! - `max_listeners_per_group` (8192). The sender needs the count, not only whether anyone
//!   listens: a block's first round waits until every receiver fetching in bulk has joined,
//!   and the share still listening after a round is what it learns loss from. These limits
//!   were 16,384 and 64 while one listener was thought enough; then a crowd of 100 was
//!   counted as 64, first rounds began without the other 36, each of whom then took the
//!   block in later rounds of K/8, and a tracked listener's leave paused a round the others
//!   still wanted. In `examples/sim`, 5% loss in bursts of 5: an 8 MiB file at 100
//!   receivers cost 1.27 times one receiver's bytes with the old limits and 1.17 with
//!   these; a 4 MiB file at 1000 receivers 1.56 and 1.38; 20% independent loss on a
//!   1,000-file tree at 1000 receivers 1.10 and 1.05. Beyond the limits the counts are
//!   lower bounds and the sender behaves as it did then: every receiver still gets
//!   everything, for more bytes. Every receiver joins the root and beacon groups, so on a
//!   link with more receivers the others are refused there and found again by the query
//!   when the known ones leave or expire.
//! - `max_sources` (16) sources per listener, our own addresses kept first: lcfs receivers
//!   filter no sources, and 16 sources decide "wants our data" as well as 1024 did.
//!
//! When a limit is reached, listeners already stored keep their state and are refreshed as
//! usual; only new ones are refused, and counted in [`TrackerStats`]. A group without any
//! listener always admits one, so that a flood of new addresses for the groups already
//! tracked never stops a real receiver's new group from turning active. A listener takes 222
//! bytes (its map entry and heap entry; measured with a counting allocator, 260,000 listeners
//! of 130 groups each), 894 with 16 sources: the limits hold the tracker to 29 MiB for
//! receivers that filter no sources, as lcfs receivers do, and to 117 MiB against a flood
//! whose every record lists 16.
//!
//! Timers (listener expiry, checks and their queries) live in a binary heap with lazy deletion
//! ([`timers`]): a message costs O(records * log n) and a timer O(log n); nothing scans the
//! listeners, except a change of our own addresses (rare) and a heap rebuild that happens once
//! every n pushes or more. [`TrackerStats::timer_work`] counts what timers examined.
//!
//! Invariants: only groups for which the interest predicate (given to the constructor)
//! returns true are stored; a group is stored while it has listeners or a check; a checking
//! group has no listener that wants it; a listener in INCLUDE{} is never stored; each
//! listener and each check has exactly one live heap entry, at or before its deadline.
//! Queries are ignored here (the querier handles them).

mod timers;

#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use super::parse::{GroupRecord, MldMessage, RecordType};
use super::MldTiming;
use timers::Deadlines;

/// Which groups the tracker stores: the server passes "is this group one of my objects".
pub type Interest = Box<dyn Fn(&Ipv6Addr) -> bool + Send>;

/// A change of a whole group's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GroupEvent {
    /// Someone listens now: start sending the group's object, or go on.
    Active(Ipv6Addr),
    /// The last listener said it left, and a last-listener query asks whether anyone else
    /// still listens: finish what is under way but start nothing new. `Active` follows if
    /// someone answers, `Inactive` if nobody does.
    Leaving(Ipv6Addr),
    /// Nobody listens any more: stop sending.
    Inactive(Ipv6Addr),
    /// A listened group's number of stored listeners that want it changed (and it stays
    /// listened): the share of its receivers still listening after a round is what the
    /// sender learns their loss from. Counts are of stored listeners, so at most
    /// `max_listeners_per_group`.
    Listeners(Ipv6Addr, usize),
}

/// Tracker settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackerConfig {
    /// Query timing the listener expiry is derived from; keep it equal to the querier's.
    pub timing: MldTiming,
    /// Most sources remembered per listener per group (bounds memory under hostile ALLOWs).
    pub max_sources: usize,
    /// Most groups tracked at once.
    pub max_groups: usize,
    /// Most listeners stored in all (a group's first listener is admitted beyond this).
    pub max_listeners: usize,
    /// Most listeners stored per group.
    pub max_listeners_per_group: usize,
    /// Last Listener Query Interval: the gap between a check's queries, and their maximum
    /// response delay (RFC 3810 9.8; its default is 1 s, ours is shorter like our query
    /// interval, so that a forged leave delays a receiver little).
    pub last_listener_interval: Duration,
    /// Multicast-Address-Specific Queries sent per second at most, on average.
    pub specific_queries_per_sec: u32,
    /// Multicast-Address-Specific Queries that may go out back to back.
    pub specific_query_burst: u32,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self {
            timing: MldTiming::default(),
            max_sources: 16,
            max_groups: 4096,
            max_listeners: 131_072,
            max_listeners_per_group: 8192,
            last_listener_interval: Duration::from_millis(250),
            specific_queries_per_sec: 1000,
            specific_query_burst: 256,
        }
    }
}

/// What the tracker refused, asked and examined: counters, never logged per packet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrackerStats {
    /// New listeners refused because their group or the tracker was full.
    pub refused_listeners: u64,
    /// New groups refused because `max_groups` were tracked.
    pub refused_groups: u64,
    /// Multicast-Address-Specific Queries handed to [`ListenerTracker::poll_query`].
    pub specific_queries: u64,
    /// Checks and repeats that found the query budget empty and sent nothing.
    pub specific_queries_limited: u64,
    /// Heap entries and listeners examined by timers and own-address changes: what an O(n)
    /// scan per packet would make grow with every packet.
    pub timer_work: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FilterMode {
    Include,
    Exclude,
}

#[derive(Debug)]
struct Listener {
    mode: FilterMode,
    sources: BTreeSet<Ipv6Addr>,
    expires: Instant,
    /// Deadline of this listener's live heap entry: at or before `expires`.
    queued: Instant,
}

impl Listener {
    fn wants(&self, own: &[Ipv6Addr]) -> bool {
        let lists_own = || own.iter().any(|a| self.sources.contains(a));
        match self.mode {
            FilterMode::Exclude => own.is_empty() || !lists_own(),
            FilterMode::Include => !self.sources.is_empty() && (own.is_empty() || lists_own()),
        }
    }
}

/// A last-listener check under way.
#[derive(Debug, Clone, Copy)]
struct Check {
    /// When the group turns idle unless a report wants it.
    deadline: Instant,
    /// When the next query goes out, if one is left.
    next_query: Option<Instant>,
    /// Queries still to send after `next_query`.
    queries_left: u8,
}

impl Check {
    fn next_timer(&self) -> Instant {
        self.next_query
            .map_or(self.deadline, |q| q.min(self.deadline))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Idle,
    Listened,
    Checking,
}

#[derive(Debug, Default)]
struct Group {
    listeners: HashMap<Ipv6Addr, Listener>,
    /// Listeners that want the group.
    wanting: usize,
    /// A listener was refused since the last check: unknown listeners may exist.
    crowded: bool,
    check: Option<Check>,
    /// Deadline of the check's live heap entry.
    queued: Option<Instant>,
}

/// What events are derived from: a group's status and how many listeners want it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    status: Status,
    wanting: usize,
}

impl Seen {
    const IDLE: Seen = Seen {
        status: Status::Idle,
        wanting: 0,
    };
}

impl Group {
    fn seen(&self) -> Seen {
        Seen {
            status: self.status(),
            wanting: self.wanting,
        }
    }

    fn status(&self) -> Status {
        match (self.wanting, self.check) {
            (1.., _) => Status::Listened,
            (0, Some(_)) => Status::Checking,
            (0, None) => Status::Idle,
        }
    }
}

/// A heap entry's owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Listener { group: Ipv6Addr, from: Ipv6Addr },
    Check(Ipv6Addr),
}

/// A change to one listener's state, from one record.
enum Change<'a> {
    Record(&'a GroupRecord),
    JoinV1,
    Leave,
}

/// A token bucket of Multicast-Address-Specific Queries.
#[derive(Debug)]
struct QueryBudget {
    tokens: f64,
    last: Option<Instant>,
}

impl QueryBudget {
    fn take(&mut self, now: Instant, config: &TrackerConfig) -> bool {
        let burst = f64::from(config.specific_query_burst.max(1));
        let rate = f64::from(config.specific_queries_per_sec);
        let elapsed = self
            .last
            .map_or(Duration::MAX, |t| now.saturating_duration_since(t));
        self.tokens = (self.tokens + elapsed.as_secs_f64() * rate).min(burst);
        self.last = Some(now);
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

/// Listeners per group, for the groups the server is interested in.
pub struct ListenerTracker {
    config: TrackerConfig,
    interest: Interest,
    own: Vec<Ipv6Addr>,
    groups: HashMap<Ipv6Addr, Group>,
    /// Listeners stored, in all groups.
    listeners: usize,
    timers: Deadlines<Timer>,
    queries: VecDeque<Ipv6Addr>,
    budget: QueryBudget,
    stats: TrackerStats,
}

impl std::fmt::Debug for ListenerTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerTracker")
            .field("config", &self.config)
            .field("own", &self.own)
            .field("groups", &self.groups.len())
            .field("listeners", &self.listeners)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl ListenerTracker {
    /// A tracker that stores only groups for which `interest` returns true.
    pub fn new(config: TrackerConfig, interest: Interest) -> Self {
        Self {
            config,
            interest,
            own: Vec::new(),
            groups: HashMap::new(),
            listeners: 0,
            timers: Deadlines::new(),
            queries: VecDeque::new(),
            budget: QueryBudget {
                tokens: 0.0,
                last: None,
            },
            stats: TrackerStats::default(),
        }
    }

    /// The settings in force (the timing as last set).
    pub fn config(&self) -> &TrackerConfig {
        &self.config
    }

    /// Change the timing (the shell copies the querier's effective timing here). Applies to
    /// expiries set from now on.
    pub fn set_timing(&mut self, timing: MldTiming) {
        self.config.timing = timing;
    }

    /// The addresses our data is sent from; decides source-filtered listeners. Empty: unknown,
    /// any INCLUDE list that is not empty and any EXCLUDE list count as listening. A change
    /// is local knowledge, not a leave: groups it leaves unwanted turn idle at once.
    pub fn set_own_addresses(&mut self, own: &[Ipv6Addr]) -> Vec<GroupEvent> {
        let same = own.len() == self.own.len() && own.iter().all(|a| self.own.contains(a));
        if same {
            return Vec::new();
        }
        self.own = own.to_vec();
        let mut events = Vec::new();
        let addresses: Vec<Ipv6Addr> = self.groups.keys().copied().collect();
        for address in addresses {
            let Some(group) = self.groups.get_mut(&address) else {
                continue;
            };
            let before = group.seen();
            self.stats.timer_work += group.listeners.len() as u64;
            group.wanting = group.listeners.values().filter(|l| l.wants(own)).count();
            if group.wanting > 0 {
                group.check = None;
                group.queued = None;
            }
            events.extend(transition(address, before, group.seen()));
            self.drop_if_empty(address);
        }
        events
    }

    /// Apply one message received from `from` (its IPv6 source address).
    pub fn handle_message(
        &mut self,
        now: Instant,
        from: Ipv6Addr,
        msg: &MldMessage,
    ) -> Vec<GroupEvent> {
        let changes: Vec<(Ipv6Addr, Change<'_>)> = match msg {
            MldMessage::Query(_) => Vec::new(),
            MldMessage::ReportV1 { group } => vec![(*group, Change::JoinV1)],
            MldMessage::DoneV1 { group } => vec![(*group, Change::Leave)],
            MldMessage::ReportV2 { records } => records
                .iter()
                .map(|r| (r.group, Change::Record(r)))
                .collect(),
        };
        let mut seen = HashSet::new();
        let mut touched = Vec::new();
        for (group, change) in changes {
            if !group.is_multicast() || !(self.interest)(&group) {
                continue;
            }
            if seen.insert(group) {
                touched.push((group, self.seen(&group)));
            }
            self.apply(now, from, group, change);
        }
        let events = touched
            .into_iter()
            .filter_map(|(group, before)| self.settle(now, group, before))
            .collect();
        self.maybe_rebuild();
        events
    }

    /// Runs the timers due at `now`: listeners that stopped reporting expire, checks send
    /// their next query or end.
    pub fn poll_expired(&mut self, now: Instant) -> Vec<GroupEvent> {
        let mut events = Vec::new();
        while let Some((at, timer)) = self.timers.pop_due(now) {
            self.stats.timer_work += 1;
            let event = match timer {
                Timer::Listener { group, from } => self.on_listener_timer(now, at, group, from),
                Timer::Check(group) => self.on_check_timer(now, at, group),
            };
            events.extend(event);
        }
        self.maybe_rebuild();
        events
    }

    /// When [`ListenerTracker::poll_expired`] should next run: never later than the next
    /// expiry or query, sometimes earlier (a listener refreshed since its timer was set).
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        while let Some(timer) = self.timers.peek_key() {
            let at = self.timers.peek()?;
            if self.is_live(at, timer) {
                return Some(at);
            }
            self.stats.timer_work += 1;
            self.timers.pop();
        }
        None
    }

    /// The group of the next Multicast-Address-Specific Query to send, if one is due. The
    /// budget was checked already: send every one returned.
    pub fn poll_query(&mut self) -> Option<Ipv6Addr> {
        self.queries.pop_front()
    }

    /// The counters so far.
    pub fn stats(&self) -> TrackerStats {
        self.stats
    }

    /// Groups that some listener wants now, and the distinct hosts listening to any group:
    /// how many receivers this server serves. O(listeners); call it seldom.
    pub fn census(&self) -> (usize, usize) {
        let wanted = self.groups.values().filter(|g| g.wanting > 0).count();
        let hosts: std::collections::HashSet<&Ipv6Addr> = self
            .groups
            .values()
            .flat_map(|g| g.listeners.keys())
            .collect();
        (wanted, hosts.len())
    }

    /// True while at least one listener wants `group`, or a check runs for it.
    pub fn is_active(&self, group: &Ipv6Addr) -> bool {
        self.status(group) != Status::Idle
    }

    /// The groups that are listened or checking, in no particular order.
    pub fn active_groups(&self) -> impl Iterator<Item = Ipv6Addr> + '_ {
        self.groups
            .iter()
            .filter(|(_, g)| g.status() != Status::Idle)
            .map(|(group, _)| *group)
    }

    /// How many stored listeners want `group` (listeners that exclude all our sources do
    /// not count).
    pub fn listener_count(&self, group: &Ipv6Addr) -> usize {
        self.groups.get(group).map_or(0, |g| g.wanting)
    }

    /// Listeners stored, in all groups.
    pub fn total_listeners(&self) -> usize {
        self.listeners
    }

    /// Groups stored (listened, checking, or holding listeners that do not want them).
    pub fn tracked_groups(&self) -> usize {
        self.groups.len()
    }

    /// Heap entries held, stale ones included (bounded by twice the live timers + 1024).
    pub fn timer_entries(&self) -> usize {
        self.timers.len()
    }

    fn status(&self, group: &Ipv6Addr) -> Status {
        self.groups.get(group).map_or(Status::Idle, Group::status)
    }

    fn seen(&self, group: &Ipv6Addr) -> Seen {
        self.groups.get(group).map_or(Seen::IDLE, Group::seen)
    }

    fn is_live(&self, at: Instant, timer: Timer) -> bool {
        match timer {
            Timer::Listener { group, from } => self
                .groups
                .get(&group)
                .and_then(|g| g.listeners.get(&from))
                .is_some_and(|l| l.queued == at),
            Timer::Check(group) => self
                .groups
                .get(&group)
                .is_some_and(|g| g.queued == Some(at)),
        }
    }

    /// After a message's records for `group`: start a check if its last wanting listener
    /// left, end one if someone wants it again, and say what changed.
    fn settle(&mut self, now: Instant, group: Ipv6Addr, before: Seen) -> Option<GroupEvent> {
        if let Some(g) = self.groups.get_mut(&group) {
            if g.wanting > 0 {
                g.check = None;
                g.queued = None;
            } else if before.status == Status::Listened && g.check.is_none() {
                self.start_check(now, group);
            }
        }
        let after = self.seen(&group);
        self.drop_if_empty(group);
        transition(group, before, after)
    }

    fn apply(&mut self, now: Instant, from: Ipv6Addr, group: Ipv6Addr, change: Change<'_>) {
        let old = self.take_listener(group, from);
        let known = old.is_some();
        let queued = old.as_ref().map(|l| l.queued);
        let Some((mode, sources)) = next_state(old.map(|l| (l.mode, l.sources)), change) else {
            return;
        };
        if known || self.admit(group) {
            self.store_listener(now, group, from, (mode, sources), queued);
        }
    }

    /// Removes a listener, keeping the counts right; its heap entry turns stale.
    fn take_listener(&mut self, group: Ipv6Addr, from: Ipv6Addr) -> Option<Listener> {
        let g = self.groups.get_mut(&group)?;
        let old = g.listeners.remove(&from)?;
        g.wanting -= usize::from(old.wants(&self.own));
        self.listeners -= 1;
        Some(old)
    }

    /// Stores a listener in an existing group, expiring a listener interval from `now`. Its
    /// live heap entry (`queued`) is kept unless it would fire late (the timing shrank).
    fn store_listener(
        &mut self,
        now: Instant,
        group: Ipv6Addr,
        from: Ipv6Addr,
        (mode, mut sources): (FilterMode, BTreeSet<Ipv6Addr>),
        queued: Option<Instant>,
    ) {
        cap_sources(&mut sources, &self.own, self.config.max_sources);
        let expires = now + self.config.timing.listener_interval();
        let queued = match queued {
            Some(q) if q <= expires => q,
            _ => {
                self.timers.push(expires, Timer::Listener { group, from });
                expires
            }
        };
        let Some(g) = self.groups.get_mut(&group) else {
            return;
        };
        let listener = Listener {
            mode,
            sources,
            expires,
            queued,
        };
        g.wanting += usize::from(listener.wants(&self.own));
        g.listeners.insert(from, listener);
        self.listeners += 1;
    }

    /// Whether a new listener may be stored in `group` (creating the group if needed);
    /// counts refusals.
    fn admit(&mut self, group: Ipv6Addr) -> bool {
        let c = &self.config;
        let tracked = self.groups.len();
        match self.groups.get_mut(&group) {
            None if tracked >= c.max_groups => {
                self.stats.refused_groups += 1;
                false
            }
            None => {
                self.groups.insert(group, Group::default());
                true
            }
            Some(g) if g.listeners.is_empty() => true,
            Some(g) => {
                let room = g.listeners.len() < c.max_listeners_per_group
                    && self.listeners < c.max_listeners;
                if !room {
                    g.crowded = true;
                    self.stats.refused_listeners += 1;
                }
                room
            }
        }
    }

    /// The last wanting listener of `group` left: ask whether anyone else listens.
    fn start_check(&mut self, now: Instant, group: Ipv6Addr) {
        let interval = self.config.last_listener_interval;
        let count = self.config.timing.robustness.max(1);
        let queried = self.take_query(now, group);
        let Some(g) = self.groups.get_mut(&group) else {
            return;
        };
        let check = Check {
            deadline: now + interval.saturating_mul(u32::from(count)),
            next_query: (queried && count > 1).then(|| now + interval),
            queries_left: if queried { count.saturating_sub(2) } else { 0 },
        };
        g.crowded = false;
        g.check = Some(check);
        g.queued = Some(check.next_timer());
        self.timers.push(check.next_timer(), Timer::Check(group));
    }

    /// Queues a query for `group` if the budget allows; false (counted) if not.
    fn take_query(&mut self, now: Instant, group: Ipv6Addr) -> bool {
        if !self.budget.take(now, &self.config) {
            self.stats.specific_queries_limited += 1;
            return false;
        }
        self.stats.specific_queries += 1;
        self.queries.push_back(group);
        true
    }

    fn on_listener_timer(
        &mut self,
        now: Instant,
        at: Instant,
        group: Ipv6Addr,
        from: Ipv6Addr,
    ) -> Option<GroupEvent> {
        let g = self.groups.get_mut(&group)?;
        let listener = g.listeners.get_mut(&from).filter(|l| l.queued == at)?;
        if listener.expires > now {
            listener.queued = listener.expires;
            self.timers
                .push(listener.expires, Timer::Listener { group, from });
            return None;
        }
        let before = g.seen();
        let gone = g.listeners.remove(&from)?;
        self.listeners -= 1;
        g.wanting -= usize::from(gone.wants(&self.own));
        if before.status == Status::Listened && g.wanting == 0 && g.crowded {
            self.start_check(now, group);
        }
        let after = self.seen(&group);
        self.drop_if_empty(group);
        transition(group, before, after)
    }

    fn on_check_timer(&mut self, now: Instant, at: Instant, group: Ipv6Addr) -> Option<GroupEvent> {
        let g = self
            .groups
            .get_mut(&group)
            .filter(|g| g.queued == Some(at))?;
        g.queued = None;
        let mut check = g.check?;
        if check.deadline <= now {
            g.check = None;
            self.drop_if_empty(group);
            let checking = Seen {
                status: Status::Checking,
                wanting: 0,
            };
            return transition(group, checking, self.seen(&group));
        }
        if check.next_query.is_some_and(|q| q <= now) {
            let interval = self.config.last_listener_interval;
            let queried = self.take_query(now, group);
            let more = queried && check.queries_left > 0;
            check.next_query = more.then(|| now + interval);
            check.queries_left = check.queries_left.saturating_sub(1);
        }
        let g = self.groups.get_mut(&group)?;
        g.check = Some(check);
        g.queued = Some(check.next_timer());
        self.timers.push(check.next_timer(), Timer::Check(group));
        None
    }

    fn drop_if_empty(&mut self, group: Ipv6Addr) {
        if self
            .groups
            .get(&group)
            .is_some_and(|g| g.listeners.is_empty() && g.check.is_none())
        {
            self.groups.remove(&group);
        }
    }

    /// Rebuilds the heap from the live timers once stale entries outnumber them.
    fn maybe_rebuild(&mut self) {
        if !self
            .timers
            .needs_rebuild(self.listeners + self.groups.len())
        {
            return;
        }
        let live: Vec<(Instant, Timer)> = self
            .groups
            .iter()
            .flat_map(|(&group, g)| {
                let check = g.queued.map(|at| (at, Timer::Check(group)));
                let listeners = g
                    .listeners
                    .iter()
                    .map(move |(&from, l)| (l.queued, Timer::Listener { group, from }));
                check.into_iter().chain(listeners)
            })
            .collect();
        self.stats.timer_work += live.len() as u64;
        self.timers.rebuild(live.into_iter());
    }
}

/// The event for a group that went from `before` to `after`.
fn transition(group: Ipv6Addr, before: Seen, after: Seen) -> Option<GroupEvent> {
    match (before.status, after.status) {
        (Status::Listened, Status::Listened) if before.wanting != after.wanting => {
            Some(GroupEvent::Listeners(group, after.wanting))
        }
        (Status::Listened, Status::Listened)
        | (Status::Checking, Status::Checking)
        | (Status::Idle, Status::Idle | Status::Checking) => None,
        (_, Status::Listened) => Some(GroupEvent::Active(group)),
        (Status::Listened, Status::Checking) => Some(GroupEvent::Leaving(group)),
        (_, Status::Idle) => Some(GroupEvent::Inactive(group)),
    }
}

/// The listener's filter state after `change`; `None` when it is INCLUDE{} (gone).
fn next_state(
    state: Option<(FilterMode, BTreeSet<Ipv6Addr>)>,
    change: Change<'_>,
) -> Option<(FilterMode, BTreeSet<Ipv6Addr>)> {
    let record = match change {
        Change::JoinV1 => return Some((FilterMode::Exclude, BTreeSet::new())),
        Change::Leave => return None,
        Change::Record(record) => record,
    };
    let (mode, mut set) = state.unwrap_or((FilterMode::Include, BTreeSet::new()));
    let listed = record.sources.iter().copied();
    let (mode, set) = match (record.record_type, mode) {
        (RecordType::ModeIsInclude | RecordType::ChangeToInclude, _) => {
            (FilterMode::Include, listed.collect())
        }
        (RecordType::ModeIsExclude | RecordType::ChangeToExclude, _) => {
            (FilterMode::Exclude, listed.collect())
        }
        (RecordType::AllowNewSources, FilterMode::Include)
        | (RecordType::BlockOldSources, FilterMode::Exclude) => {
            set.extend(listed);
            (mode, set)
        }
        (RecordType::AllowNewSources, FilterMode::Exclude)
        | (RecordType::BlockOldSources, FilterMode::Include) => {
            for s in listed {
                set.remove(&s);
            }
            (mode, set)
        }
    };
    (mode == FilterMode::Exclude || !set.is_empty()).then_some((mode, set))
}

/// Keep at most `max` (at least 1) sources, dropping the highest addresses that are not our own first.
fn cap_sources(set: &mut BTreeSet<Ipv6Addr>, own: &[Ipv6Addr], max: usize) {
    let max = max.max(1);
    if set.len() <= max {
        return;
    }
    let victims: Vec<Ipv6Addr> = set
        .iter()
        .rev()
        .filter(|a| !own.contains(a))
        .take(set.len() - max)
        .copied()
        .collect();
    for v in victims {
        set.remove(&v);
    }
}
