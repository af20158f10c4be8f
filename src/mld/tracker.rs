//! Explicit tracking of multicast listeners: per group, per reporting address, that listener's
//! filter mode, source list and expiry.
//!
//! The tracker is a sans-IO state machine: [`ListenerTracker::handle_message`] takes a decoded
//! report and `now`, [`ListenerTracker::poll_expired`] drops listeners that stopped reporting,
//! [`ListenerTracker::poll_timeout`] says when that next happens. Both return [`GroupEvent`]s.
//!
//! Semantics (the listener's own filter state, RFC 3810 section 6 as a host keeps it):
//! - MLDv1 report = EXCLUDE{}; MLDv1 done = the listener leaves.
//! - IS_IN / TO_IN (S) = INCLUDE(S); IS_EX / TO_EX (S) = EXCLUDE(S).
//! - ALLOW(S): INCLUDE(A) becomes A + S, EXCLUDE(X) becomes X - S; with no state, INCLUDE(S).
//! - BLOCK(S): INCLUDE(A) becomes A - S, EXCLUDE(X) becomes X + S; with no state, nothing.
//! - INCLUDE{} removes the listener at once (no last-listener query: explicit tracking knows).
//! - A listener wants the group in EXCLUDE mode unless it excludes one of our own addresses,
//!   and in INCLUDE mode if the list is non-empty and, when our addresses are known, holds one.
//! - Any record from a listener refreshes its expiry to `now` + [`MldTiming::listener_interval`].
//! - Reports from `::` (sent during duplicate address detection) are one more listener.
//!
//! Invariants: only groups for which the interest predicate (given to the constructor) returns
//! true are stored; a group is active iff one of its listeners wants it; [`GroupEvent`]s are
//! emitted only when that changes, once per message; a listener in INCLUDE{} is never stored.
//! Queries are ignored here (the querier handles them). `poll_timeout` is O(listeners).

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv6Addr;
use std::time::Instant;

use super::parse::{GroupRecord, MldMessage, RecordType};
use super::MldTiming;

/// Which groups the tracker stores: the server passes "is this group one of my objects".
pub type Interest = Box<dyn Fn(&Ipv6Addr) -> bool + Send>;

/// A change of a whole group: its first listener arrived, or its last one left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GroupEvent {
    /// Someone listens now: start sending the group's object.
    Active(Ipv6Addr),
    /// Nobody listens any more: stop sending.
    Inactive(Ipv6Addr),
}

/// Tracker settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackerConfig {
    /// Query timing the listener expiry is derived from; keep it equal to the querier's.
    pub timing: MldTiming,
    /// Most sources remembered per listener per group (bounds memory under hostile ALLOWs).
    pub max_sources: usize,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self {
            timing: MldTiming::default(),
            max_sources: 1024,
        }
    }
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

/// A change to one listener's state, from one record.
enum Change<'a> {
    Record(&'a GroupRecord),
    JoinV1,
    Leave,
}

/// Listeners per group, for the groups the server is interested in.
pub struct ListenerTracker {
    config: TrackerConfig,
    interest: Interest,
    own: Vec<Ipv6Addr>,
    groups: HashMap<Ipv6Addr, HashMap<Ipv6Addr, Listener>>,
}

impl std::fmt::Debug for ListenerTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerTracker")
            .field("config", &self.config)
            .field("own", &self.own)
            .field("groups", &self.groups)
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
        }
    }

    /// Change the timing (the shell copies the querier's effective timing here). Applies to
    /// expiries set from now on.
    pub fn set_timing(&mut self, timing: MldTiming) {
        self.config.timing = timing;
    }

    /// The addresses our data is sent from; decides source-filtered listeners. Empty: unknown,
    /// any INCLUDE list that is not empty and any EXCLUDE list count as listening.
    pub fn set_own_addresses(&mut self, own: &[Ipv6Addr]) -> Vec<GroupEvent> {
        let groups: Vec<Ipv6Addr> = self.groups.keys().copied().collect();
        let before = self.snapshot(&groups);
        self.own = own.to_vec();
        self.transitions(before)
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
        let changes: Vec<_> = changes
            .into_iter()
            .filter(|(group, _)| group.is_multicast() && (self.interest)(group))
            .collect();
        let mut touched: Vec<Ipv6Addr> = changes.iter().map(|(g, _)| *g).collect();
        touched.sort_unstable();
        touched.dedup();
        let before = self.snapshot(&touched);
        for (group, change) in changes {
            self.apply(now, from, group, change);
        }
        self.transitions(before)
    }

    /// Drop listeners whose expiry is at or before `now`.
    pub fn poll_expired(&mut self, now: Instant) -> Vec<GroupEvent> {
        let groups: Vec<Ipv6Addr> = self.groups.keys().copied().collect();
        let before = self.snapshot(&groups);
        self.groups.retain(|_, listeners| {
            listeners.retain(|_, l| l.expires > now);
            !listeners.is_empty()
        });
        self.transitions(before)
    }

    /// The next listener expiry, if any listener is stored.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.groups
            .values()
            .flat_map(|listeners| listeners.values().map(|l| l.expires))
            .min()
    }

    /// True while at least one listener wants `group`.
    pub fn is_active(&self, group: &Ipv6Addr) -> bool {
        self.listener_count(group) > 0
    }

    /// The groups someone listens to, in no particular order.
    pub fn active_groups(&self) -> impl Iterator<Item = Ipv6Addr> + '_ {
        self.groups
            .iter()
            .filter(|(_, listeners)| listeners.values().any(|l| l.wants(&self.own)))
            .map(|(group, _)| *group)
    }

    /// How many listeners want `group` (listeners that exclude all our sources do not count).
    pub fn listener_count(&self, group: &Ipv6Addr) -> usize {
        self.groups.get(group).map_or(0, |listeners| {
            listeners.values().filter(|l| l.wants(&self.own)).count()
        })
    }

    fn snapshot(&self, groups: &[Ipv6Addr]) -> Vec<(Ipv6Addr, bool)> {
        groups.iter().map(|g| (*g, self.is_active(g))).collect()
    }

    fn transitions(&self, before: Vec<(Ipv6Addr, bool)>) -> Vec<GroupEvent> {
        before
            .into_iter()
            .filter_map(|(group, was)| match (was, self.is_active(&group)) {
                (false, true) => Some(GroupEvent::Active(group)),
                (true, false) => Some(GroupEvent::Inactive(group)),
                _ => None,
            })
            .collect()
    }

    fn apply(&mut self, now: Instant, from: Ipv6Addr, group: Ipv6Addr, change: Change<'_>) {
        let listeners = self.groups.entry(group).or_default();
        let old = listeners.remove(&from);
        let state = old.map(|l| (l.mode, l.sources));
        if let Some((mode, mut sources)) = next_state(state, change) {
            cap_sources(&mut sources, &self.own, self.config.max_sources);
            let expires = now + self.config.timing.listener_interval();
            let listener = Listener {
                mode,
                sources,
                expires,
            };
            listeners.insert(from, listener);
        }
        if listeners.is_empty() {
            self.groups.remove(&group);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const G1: Ipv6Addr = Ipv6Addr::new(0xff1e, 0, 0, 0, 0, 0, 0, 1);
    const G2: Ipv6Addr = Ipv6Addr::new(0xff1e, 0, 0, 0, 0, 0, 0, 2);
    const BORING: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0xfb);
    const H1: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0x11);
    const H2: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0x22);
    const OWN: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
    const OTHER: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
    const MALI: Duration = Duration::from_secs(11);

    fn tracker() -> ListenerTracker {
        ListenerTracker::new(
            TrackerConfig::default(),
            Box::new(|g: &Ipv6Addr| g.segments()[0] == 0xff1e),
        )
    }

    fn v2(records: &[(RecordType, Ipv6Addr, &[Ipv6Addr])]) -> MldMessage {
        let records = records
            .iter()
            .map(|(t, g, s)| GroupRecord {
                record_type: *t,
                group: *g,
                sources: s.to_vec(),
            })
            .collect();
        MldMessage::ReportV2 { records }
    }

    fn rec(t: RecordType, g: Ipv6Addr, s: &[Ipv6Addr]) -> MldMessage {
        v2(&[(t, g, s)])
    }

    use GroupEvent::{Active, Inactive};
    use RecordType::*;

    #[test]
    fn v2_join_and_leave() {
        let (mut t, now) = (tracker(), Instant::now());
        assert_eq!(
            t.handle_message(now, H1, &rec(ChangeToExclude, G1, &[])),
            [Active(G1)]
        );
        assert!(t.is_active(&G1));
        assert_eq!(t.handle_message(now, H1, &rec(ModeIsExclude, G1, &[])), []);
        assert_eq!(
            t.handle_message(now, H1, &rec(ChangeToInclude, G1, &[])),
            [Inactive(G1)]
        );
        assert!(!t.is_active(&G1));
        assert_eq!(t.poll_timeout(), None, "INCLUDE{{}} is not stored");
    }

    #[test]
    fn v1_report_and_done() {
        let (mut t, now) = (tracker(), Instant::now());
        let join = MldMessage::ReportV1 { group: G1 };
        assert_eq!(t.handle_message(now, H1, &join), [Active(G1)]);
        assert_eq!(
            t.handle_message(now, H1, &MldMessage::DoneV1 { group: G1 }),
            [Inactive(G1)]
        );
    }

    #[test]
    fn events_only_on_transitions_with_several_listeners() {
        let (mut t, now) = (tracker(), Instant::now());
        assert_eq!(
            t.handle_message(now, H1, &MldMessage::ReportV1 { group: G1 }),
            [Active(G1)]
        );
        assert_eq!(
            t.handle_message(now, H2, &rec(ChangeToExclude, G1, &[])),
            []
        );
        assert_eq!(t.listener_count(&G1), 2);
        assert_eq!(
            t.handle_message(now, H1, &MldMessage::DoneV1 { group: G1 }),
            []
        );
        assert_eq!(t.listener_count(&G1), 1);
        assert_eq!(
            t.handle_message(now, H2, &rec(ModeIsInclude, G1, &[])),
            [Inactive(G1)]
        );
    }

    #[test]
    fn unspecified_source_is_a_listener() {
        let (mut t, now) = (tracker(), Instant::now());
        let msg = rec(ChangeToExclude, G1, &[]);
        assert_eq!(
            t.handle_message(now, Ipv6Addr::UNSPECIFIED, &msg),
            [Active(G1)]
        );
        assert_eq!(t.handle_message(now, H1, &msg), []);
        assert_eq!(t.listener_count(&G1), 2);
    }

    #[test]
    fn expiry() {
        let (mut t, now) = (tracker(), Instant::now());
        t.handle_message(now, H1, &rec(ChangeToExclude, G1, &[]));
        let later = now + Duration::from_secs(5);
        t.handle_message(later, H2, &rec(ChangeToExclude, G1, &[]));
        assert_eq!(t.poll_timeout(), Some(now + MALI));
        assert_eq!(t.poll_expired(now + MALI - Duration::from_millis(1)), []);
        assert_eq!(t.poll_expired(now + MALI), []);
        assert_eq!(t.listener_count(&G1), 1);
        assert_eq!(t.poll_timeout(), Some(later + MALI));
        assert_eq!(t.poll_expired(later + MALI), [Inactive(G1)]);
        assert_eq!(t.poll_timeout(), None);
    }

    #[test]
    fn reports_refresh_expiry() {
        let (mut t, now) = (tracker(), Instant::now());
        t.handle_message(now, H1, &MldMessage::ReportV1 { group: G1 });
        let later = now + Duration::from_secs(10);
        t.handle_message(later, H1, &rec(ModeIsExclude, G1, &[]));
        assert_eq!(t.poll_expired(now + MALI), []);
        assert_eq!(t.poll_expired(later + MALI), [Inactive(G1)]);
    }

    #[test]
    fn timing_change_applies_to_later_reports() {
        let (mut t, now) = (tracker(), Instant::now());
        t.set_timing(MldTiming {
            robustness: 3,
            query_interval: Duration::from_secs(125),
            max_response_delay: Duration::from_secs(10),
        });
        t.handle_message(now, H1, &MldMessage::ReportV1 { group: G1 });
        assert_eq!(t.poll_timeout(), Some(now + Duration::from_secs(385)));
    }

    #[test]
    fn uninteresting_groups_are_ignored() {
        let (mut t, now) = (tracker(), Instant::now());
        let msg = v2(&[(ChangeToExclude, BORING, &[]), (ChangeToExclude, G2, &[])]);
        assert_eq!(t.handle_message(now, H1, &msg), [Active(G2)]);
        assert!(!t.is_active(&BORING));
        assert_eq!(t.active_groups().collect::<Vec<_>>(), [G2]);
        let unicast = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 9);
        let mut all = ListenerTracker::new(TrackerConfig::default(), Box::new(|_| true));
        assert_eq!(
            all.handle_message(now, H1, &rec(ChangeToExclude, unicast, &[])),
            []
        );
    }

    #[test]
    fn queries_are_ignored() {
        let (mut t, now) = (tracker(), Instant::now());
        let q = crate::mld::Query::general(Duration::from_secs(1), 2, Duration::from_secs(5));
        assert_eq!(t.handle_message(now, H1, &MldMessage::Query(q)), []);
        assert_eq!(t.poll_timeout(), None);
    }

    #[test]
    fn v1_and_v2_listeners_mix() {
        let (mut t, now) = (tracker(), Instant::now());
        t.handle_message(now, H1, &MldMessage::ReportV1 { group: G1 });
        t.handle_message(now, H2, &rec(AllowNewSources, G1, &[OWN]));
        assert_eq!(t.listener_count(&G1), 2);
        assert_eq!(
            t.handle_message(now, H1, &MldMessage::DoneV1 { group: G1 }),
            []
        );
        assert_eq!(
            t.handle_message(now, H2, &rec(BlockOldSources, G1, &[OWN])),
            [Inactive(G1)]
        );
    }

    #[test]
    fn include_mode_with_sources() {
        let (mut t, now) = (tracker(), Instant::now());
        assert_eq!(
            t.handle_message(now, H1, &rec(ModeIsInclude, G1, &[OTHER])),
            [Active(G1)]
        );
        assert_eq!(
            t.set_own_addresses(&[OWN]),
            [Inactive(G1)],
            "only OTHER is included"
        );
        assert_eq!(
            t.handle_message(now, H1, &rec(AllowNewSources, G1, &[OWN])),
            [Active(G1)]
        );
        assert_eq!(
            t.handle_message(now, H1, &rec(BlockOldSources, G1, &[OWN])),
            [Inactive(G1)]
        );
        assert_eq!(t.listener_count(&G1), 0);
        assert_eq!(
            t.handle_message(now, H1, &rec(BlockOldSources, G1, &[OTHER])),
            []
        );
        assert_eq!(t.poll_timeout(), None, "INCLUDE{{}} listener removed");
    }

    #[test]
    fn exclude_mode_with_own_address() {
        let (mut t, now) = (tracker(), Instant::now());
        t.set_own_addresses(&[OWN]);
        assert_eq!(
            t.handle_message(now, H1, &rec(ChangeToExclude, G1, &[OTHER])),
            [Active(G1)]
        );
        assert_eq!(
            t.handle_message(now, H1, &rec(BlockOldSources, G1, &[OWN])),
            [Inactive(G1)]
        );
        assert_eq!(
            t.handle_message(now, H1, &rec(AllowNewSources, G1, &[OWN])),
            [Active(G1)]
        );
        assert_eq!(
            t.handle_message(now, H1, &rec(ModeIsExclude, G1, &[OWN])),
            [Inactive(G1)]
        );
        assert_eq!(t.set_own_addresses(&[]), [Active(G1)]);
    }

    #[test]
    fn allow_without_state_is_include() {
        let (mut t, now) = (tracker(), Instant::now());
        assert_eq!(
            t.handle_message(now, H1, &rec(BlockOldSources, G1, &[OWN])),
            []
        );
        assert_eq!(t.poll_timeout(), None);
        assert_eq!(
            t.handle_message(now, H1, &rec(AllowNewSources, G1, &[OWN])),
            [Active(G1)]
        );
    }

    #[test]
    fn one_message_gives_net_transitions() {
        let (mut t, now) = (tracker(), Instant::now());
        let msg = v2(&[
            (ChangeToExclude, G1, &[]),
            (ChangeToInclude, G1, &[]),
            (ChangeToExclude, G2, &[]),
            (ModeIsExclude, G2, &[]),
        ]);
        assert_eq!(t.handle_message(now, H1, &msg), [Active(G2)]);
    }

    #[test]
    fn source_lists_are_capped() {
        let config = TrackerConfig {
            max_sources: 4,
            ..TrackerConfig::default()
        };
        let mut t = ListenerTracker::new(config, Box::new(|_| true));
        t.set_own_addresses(&[OWN]);
        let many: Vec<Ipv6Addr> = (0..100u16)
            .map(|i| Ipv6Addr::new(0x3000, 0, 0, 0, 0, 0, 0, i))
            .chain([OWN])
            .collect();
        let now = Instant::now();
        assert_eq!(
            t.handle_message(now, H1, &rec(ModeIsInclude, G1, &many)),
            [Active(G1)]
        );
        let sources = &t.groups[&G1][&H1].sources;
        assert_eq!(sources.len(), 4);
        assert!(sources.contains(&OWN));
    }
}
