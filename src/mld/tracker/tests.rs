//! Unit tests of the listener tracker: filter semantics, transitions, limits, timers and
//! their cost, last-listener checks and their rate limit, and a proptest of hostile report
//! sequences.

use super::*;
use proptest::prelude::*;
use std::time::Duration;

const G1: Ipv6Addr = Ipv6Addr::new(0xff1e, 0, 0, 0, 0, 0, 0, 1);
const G2: Ipv6Addr = Ipv6Addr::new(0xff1e, 0, 0, 0, 0, 0, 0, 2);
const BORING: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0xfb);
const H1: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0x11);
const H2: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0x22);
const OWN: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const OTHER: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
const MALI: Duration = Duration::from_secs(11);
/// Last Listener Query Interval and Time with the defaults (robustness 2).
const LLQI: Duration = Duration::from_millis(250);
const LLQT: Duration = Duration::from_millis(500);
const NO_QUERY: [Ipv6Addr; 0] = [];

fn tracker() -> ListenerTracker {
    tracker_with(TrackerConfig::default())
}

fn tracker_with(config: TrackerConfig) -> ListenerTracker {
    ListenerTracker::new(config, Box::new(|g: &Ipv6Addr| g.segments()[0] == 0xff1e))
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

fn join(g: Ipv6Addr) -> MldMessage {
    rec(ChangeToExclude, g, &[])
}

fn done(g: Ipv6Addr) -> MldMessage {
    MldMessage::DoneV1 { group: g }
}

/// The i-th of many distinct link-local hosts.
fn host(i: u32) -> Ipv6Addr {
    Ipv6Addr::from(0xfe80_u128 << 112 | 0x1_0000_0000 | u128::from(i))
}

/// The i-th of many distinct interesting groups.
fn group(i: u32) -> Ipv6Addr {
    Ipv6Addr::from(0xff1e_u128 << 112 | 0x1_0000_0000 | u128::from(i))
}

fn queries(t: &mut ListenerTracker) -> Vec<Ipv6Addr> {
    std::iter::from_fn(|| t.poll_query()).collect()
}

use GroupEvent::{Active, Inactive, Leaving, Listeners};
use RecordType::*;

// ------------------------------------------------------------------ filter semantics

#[test]
fn v2_join_and_leave_with_a_last_listener_check() {
    let (mut t, now) = (tracker(), Instant::now());
    assert_eq!(t.handle_message(now, H1, &join(G1)), [Active(G1)]);
    assert!(t.is_active(&G1));
    assert_eq!(t.handle_message(now, H1, &rec(ModeIsExclude, G1, &[])), []);
    assert_eq!(
        t.handle_message(now, H1, &rec(ChangeToInclude, G1, &[])),
        [Leaving(G1)]
    );
    assert_eq!(t.listener_count(&G1), 0, "INCLUDE{{}} is not stored");
    assert!(t.is_active(&G1), "checking until the query time passes");
    assert_eq!(queries(&mut t), [G1], "a query goes out at once");
    assert_eq!(t.poll_expired(now + LLQI), []);
    assert_eq!(queries(&mut t), [G1], "robustness 2: a second one");
    assert_eq!(t.poll_expired(now + LLQT - Duration::from_millis(1)), []);
    assert_eq!(t.poll_expired(now + LLQT), [Inactive(G1)]);
    assert!(!t.is_active(&G1));
    assert_eq!(queries(&mut t), NO_QUERY);
    assert_eq!(t.poll_timeout(), None);
    assert_eq!(t.tracked_groups(), 0);
}

#[test]
fn v1_report_and_done() {
    let (mut t, now) = (tracker(), Instant::now());
    assert_eq!(
        t.handle_message(now, H1, &MldMessage::ReportV1 { group: G1 }),
        [Active(G1)]
    );
    assert_eq!(t.handle_message(now, H1, &done(G1)), [Leaving(G1)]);
    assert_eq!(t.poll_expired(now + LLQT), [Inactive(G1)]);
}

#[test]
fn status_events_only_on_transitions_with_several_listeners() {
    let (mut t, now) = (tracker(), Instant::now());
    assert_eq!(
        t.handle_message(now, H1, &MldMessage::ReportV1 { group: G1 }),
        [Active(G1)]
    );
    assert_eq!(t.handle_message(now, H2, &join(G1)), [Listeners(G1, 2)]);
    assert_eq!(t.handle_message(now, H2, &join(G1)), [], "a refresh");
    assert_eq!(t.listener_count(&G1), 2);
    assert_eq!(t.handle_message(now, H1, &done(G1)), [Listeners(G1, 1)]);
    assert_eq!(
        queries(&mut t),
        NO_QUERY,
        "H2 still listens: no query needed"
    );
    assert_eq!(t.listener_count(&G1), 1);
    assert_eq!(
        t.handle_message(now, H2, &rec(ModeIsInclude, G1, &[])),
        [Leaving(G1)]
    );
}

#[test]
fn unspecified_source_is_a_listener() {
    let (mut t, now) = (tracker(), Instant::now());
    let msg = join(G1);
    assert_eq!(
        t.handle_message(now, Ipv6Addr::UNSPECIFIED, &msg),
        [Active(G1)]
    );
    assert_eq!(t.handle_message(now, H1, &msg), [Listeners(G1, 2)]);
    assert_eq!(t.listener_count(&G1), 2);
}

#[test]
fn expiry() {
    let (mut t, now) = (tracker(), Instant::now());
    t.handle_message(now, H1, &join(G1));
    let later = now + Duration::from_secs(5);
    t.handle_message(later, H2, &join(G1));
    assert_eq!(t.poll_timeout(), Some(now + MALI));
    assert_eq!(t.poll_expired(now + MALI - Duration::from_millis(1)), []);
    assert_eq!(t.poll_expired(now + MALI), [Listeners(G1, 1)]);
    assert_eq!(t.listener_count(&G1), 1);
    assert_eq!(t.poll_timeout(), Some(later + MALI));
    assert_eq!(t.poll_expired(later + MALI), [Inactive(G1)]);
    assert_eq!(t.poll_timeout(), None);
    assert_eq!(queries(&mut t), NO_QUERY, "an expiry is no leave: no query");
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
    t.set_timing(MldTiming::default());
    t.handle_message(now, H1, &MldMessage::ReportV1 { group: G1 });
    assert_eq!(
        t.poll_timeout(),
        Some(now + MALI),
        "a shorter expiry is not late"
    );
    assert_eq!(t.poll_expired(now + MALI), [Inactive(G1)]);
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
    assert_eq!(t.handle_message(now, H1, &done(G1)), [Listeners(G1, 1)]);
    assert_eq!(
        t.handle_message(now, H2, &rec(BlockOldSources, G1, &[OWN])),
        [Leaving(G1)]
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
        "only OTHER is included; our own address is local knowledge: no check"
    );
    assert_eq!(
        t.handle_message(now, H1, &rec(AllowNewSources, G1, &[OWN])),
        [Active(G1)]
    );
    assert_eq!(
        t.handle_message(now, H1, &rec(BlockOldSources, G1, &[OWN])),
        [Leaving(G1)]
    );
    assert_eq!(t.listener_count(&G1), 0);
    assert_eq!(
        t.handle_message(now, H1, &rec(BlockOldSources, G1, &[OTHER])),
        []
    );
    assert_eq!(t.total_listeners(), 0, "INCLUDE{{}} listener removed");
    assert_eq!(t.poll_expired(now + LLQT), [Inactive(G1)]);
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
        [Leaving(G1)]
    );
    assert_eq!(
        t.handle_message(now, H1, &rec(AllowNewSources, G1, &[OWN])),
        [Active(G1)],
        "wanting again during the check ends it"
    );
    assert_eq!(t.poll_expired(now + LLQT), [], "the check was cancelled");
    assert_eq!(
        t.handle_message(now, H1, &rec(ModeIsExclude, G1, &[OWN])),
        [Leaving(G1)]
    );
    assert_eq!(t.set_own_addresses(&[]), [Active(G1)]);
    assert_eq!(
        t.set_own_addresses(&[]),
        [],
        "unchanged addresses cost nothing"
    );
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
    assert_eq!(
        queries(&mut t),
        NO_QUERY,
        "G1 was never active: nothing to check"
    );
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
    let sources = &t.groups[&G1].listeners[&H1].sources;
    assert_eq!(sources.len(), 4);
    assert!(sources.contains(&OWN));
}

// ------------------------------------------------------------------ last-listener checks

#[test]
fn a_forged_done_is_answered_by_the_real_listener() {
    let (mut t, now) = (tracker(), Instant::now());
    t.handle_message(now, H1, &join(G1));
    // Someone sends a done from H1's address; the real H1 answers the query.
    assert_eq!(t.handle_message(now, H1, &done(G1)), [Leaving(G1)]);
    assert_eq!(queries(&mut t), [G1]);
    let answer = now + Duration::from_millis(120);
    assert_eq!(
        t.handle_message(answer, H1, &rec(ModeIsExclude, G1, &[])),
        [Active(G1)]
    );
    assert_eq!(t.poll_expired(now + LLQT), []);
    assert_eq!(queries(&mut t), NO_QUERY, "the answer stopped the repeats");
    assert_eq!(t.listener_count(&G1), 1);
    assert_eq!(t.poll_expired(answer + MALI), [Inactive(G1)]);
}

#[test]
fn a_done_from_a_stranger_changes_nothing() {
    let (mut t, now) = (tracker(), Instant::now());
    t.handle_message(now, H1, &join(G1));
    assert_eq!(t.handle_message(now, H2, &done(G1)), []);
    assert_eq!(
        t.handle_message(now, H2, &rec(ChangeToInclude, G1, &[])),
        []
    );
    assert_eq!(queries(&mut t), NO_QUERY);
    assert_eq!(t.listener_count(&G1), 1);
}

#[test]
fn a_new_listener_during_the_check_keeps_the_group() {
    let (mut t, now) = (tracker(), Instant::now());
    t.handle_message(now, H1, &join(G1));
    t.handle_message(now, H1, &done(G1));
    assert_eq!(t.handle_message(now, H2, &join(G1)), [Active(G1)]);
    assert_eq!(t.poll_expired(now + LLQT), []);
    assert!(t.is_active(&G1));
}

#[test]
fn a_robustness_of_one_sends_one_query() {
    let mut t = tracker();
    t.set_timing(MldTiming {
        robustness: 1,
        ..MldTiming::default()
    });
    let now = Instant::now();
    t.handle_message(now, H1, &join(G1));
    t.handle_message(now, H1, &done(G1));
    assert_eq!(queries(&mut t), [G1]);
    assert_eq!(t.poll_expired(now + LLQI), [Inactive(G1)]);
    assert_eq!(queries(&mut t), NO_QUERY);
}

#[test]
fn a_done_flood_cannot_make_a_query_amplifier() {
    let config = TrackerConfig {
        specific_queries_per_sec: 100,
        specific_query_burst: 10,
        ..TrackerConfig::default()
    };
    let (mut t, start) = (tracker_with(config), Instant::now());
    for i in 0..1000 {
        t.handle_message(start, H1, &join(group(i)));
    }
    // One second of dones, one per millisecond, each for a group still listened to.
    let (mut sent, mut events) = (0, Vec::new());
    for i in 0..1000u32 {
        let now = start + Duration::from_millis(u64::from(i));
        t.handle_message(now, H1, &done(group(i)));
        events.extend(t.poll_expired(now));
        sent += queries(&mut t).len() as u64;
    }
    // At most the burst plus a second of the rate, however many dones came.
    assert!(sent <= 10 + 100 + 1, "{sent} queries for 1000 dones");
    let s = t.stats();
    assert_eq!(s.specific_queries, sent);
    assert!(s.specific_queries_limited >= 1000 - sent, "{s:?}");
    // Checks without a query still end, so the state does not pile up.
    events.extend(t.poll_expired(start + Duration::from_secs(2)));
    assert_eq!(events.len(), 1000);
    assert!(events.iter().all(|e| matches!(e, Inactive(_))));
    assert_eq!(t.tracked_groups(), 0);
}

#[test]
fn dones_for_a_group_under_check_send_nothing_more() {
    let (mut t, now) = (tracker(), Instant::now());
    t.handle_message(now, H1, &join(G1));
    t.handle_message(now, H1, &done(G1));
    for i in 0..100 {
        assert_eq!(t.handle_message(now, host(i), &done(G1)), []);
    }
    assert_eq!(queries(&mut t), [G1]);
}

// ------------------------------------------------------------------ limits

fn small_limits() -> TrackerConfig {
    TrackerConfig {
        max_groups: 4,
        max_listeners: 8,
        max_listeners_per_group: 3,
        ..TrackerConfig::default()
    }
}

/// The sender gathers a block's first round until every receiver fetching in bulk has
/// joined, and learns loss from the share still listening: it needs the crowd's count, not
/// only that someone listens. A thousand receivers that lose packets, each in its root,
/// beacon and report groups and a window of 128 objects, must all be counted.
#[test]
fn the_default_limits_count_a_thousand_lossy_receivers_in_every_group() {
    let (mut t, now) = (tracker(), Instant::now());
    let groups: Vec<Ipv6Addr> = (0..131).map(group).collect();
    for h in 0..1000 {
        let records: Vec<_> = groups
            .iter()
            .map(|&g| (ChangeToExclude, g, &[][..]))
            .collect();
        t.handle_message(now, host(h), &v2(&records));
    }
    assert_eq!(t.stats().refused_listeners, 0);
    assert!(groups.iter().all(|g| t.listener_count(g) == 1000));
    // Their count falls as they leave, one event per leave.
    assert_eq!(
        t.handle_message(now, host(0), &done(groups[5])),
        [Listeners(groups[5], 999)]
    );
}

#[test]
fn a_full_group_keeps_and_refreshes_its_listeners() {
    let (mut t, now) = (tracker_with(small_limits()), Instant::now());
    for i in 0..3 {
        t.handle_message(now, host(i), &join(G1));
    }
    for i in 3..1000 {
        assert_eq!(t.handle_message(now, host(i), &join(G1)), []);
    }
    assert_eq!(t.listener_count(&G1), 3);
    assert_eq!(t.stats().refused_listeners, 997);
    // The first three refresh as usual and outlive the refused flood.
    let later = now + Duration::from_secs(8);
    for i in 0..3 {
        t.handle_message(later, host(i), &rec(ModeIsExclude, G1, &[]));
    }
    assert_eq!(t.poll_expired(now + MALI), []);
    assert_eq!(t.listener_count(&G1), 3);
}

#[test]
fn a_new_group_always_admits_its_first_listener() {
    let (mut t, now) = (tracker_with(small_limits()), Instant::now());
    for g in [G1, G2, group(1)] {
        for i in 0..3 {
            t.handle_message(now, host(i), &join(g));
        }
    }
    assert_eq!(t.total_listeners(), 8, "the total limit stopped the ninth");
    assert_eq!(
        t.handle_message(now, H1, &join(group(2))),
        [Active(group(2))]
    );
    assert_eq!(
        t.total_listeners(),
        9,
        "beyond max_listeners by one per group"
    );
    assert_eq!(t.handle_message(now, H1, &join(group(3))), []);
    assert_eq!(t.stats().refused_groups, 1, "max_groups holds");
    assert_eq!(t.tracked_groups(), 4);
}

#[test]
fn a_crowded_group_checks_before_its_last_known_listener_expires() {
    let (mut t, now) = (tracker_with(small_limits()), Instant::now());
    for i in 0..3 {
        t.handle_message(now, host(i), &join(G1));
    }
    // A real receiver joins later and is refused; the flood stops and its listeners expire.
    let real = H1;
    assert_eq!(t.handle_message(now, real, &join(G1)), []);
    assert_eq!(
        t.poll_expired(now + MALI),
        [Listeners(G1, 2), Listeners(G1, 1), Leaving(G1)]
    );
    assert_eq!(
        queries(&mut t),
        [G1],
        "the refused may still listen: ask them"
    );
    let answer = now + MALI + Duration::from_millis(50);
    assert_eq!(
        t.handle_message(answer, real, &rec(ModeIsExclude, G1, &[])),
        [Active(G1)]
    );
    assert_eq!(t.listener_count(&G1), 1);
}

#[test]
fn expiry_with_no_refusals_ends_at_once() {
    let (mut t, now) = (tracker_with(small_limits()), Instant::now());
    t.handle_message(now, H1, &join(G1));
    assert_eq!(t.poll_expired(now + MALI), [Inactive(G1)]);
    assert_eq!(queries(&mut t), NO_QUERY);
}

// ------------------------------------------------------------------ timers and their cost

fn roomy() -> TrackerConfig {
    TrackerConfig {
        max_groups: 1 << 20,
        max_listeners: 1 << 20,
        max_listeners_per_group: 1 << 20,
        ..TrackerConfig::default()
    }
}

#[test]
fn a_packet_after_100k_listeners_scans_none_of_them() {
    let (mut t, now) = (tracker_with(roomy()), Instant::now());
    for i in 0..100_000 {
        t.handle_message(now, host(i), &join(G1));
        t.poll_expired(now);
    }
    assert_eq!(t.total_listeners(), 100_000);
    let before = t.stats().timer_work;
    let later = now + Duration::from_secs(1);
    t.poll_expired(later);
    t.handle_message(later, H1, &join(G2));
    t.poll_expired(later);
    assert_eq!(t.poll_timeout(), Some(now + MALI));
    t.handle_message(later, host(7), &done(G1));
    t.poll_expired(later);
    let work = t.stats().timer_work - before;
    assert!(
        work <= 4,
        "one packet and its timers examined {work} entries"
    );
}

#[test]
fn listeners_expire_in_deadline_order_each_at_log_cost() {
    let (mut t, start) = (tracker_with(roomy()), Instant::now());
    let n = 10_000u32;
    for i in 0..n {
        let at = start + Duration::from_millis(u64::from(i));
        t.handle_message(at, host(i), &join(group(i)));
    }
    let before = t.stats().timer_work;
    let mut expired = Vec::new();
    for ms in 0..n + 100 {
        let now = start + MALI + Duration::from_millis(u64::from(ms));
        for e in t.poll_expired(now) {
            expired.push(e);
        }
    }
    let want: Vec<GroupEvent> = (0..n).map(|i| Inactive(group(i))).collect();
    assert_eq!(expired, want);
    assert_eq!(t.stats().timer_work - before, u64::from(n), "one pop each");
    assert_eq!(t.timer_entries(), 0);
}

#[test]
fn refreshes_do_not_grow_the_heap() {
    let (mut t, start) = (tracker(), Instant::now());
    for ms in 0..100_000u64 {
        let now = start + Duration::from_millis(ms);
        t.handle_message(now, H1, &join(G1));
        t.poll_expired(now);
    }
    assert!(t.timer_entries() <= 2, "{} entries", t.timer_entries());
}

#[test]
fn join_leave_churn_keeps_the_heap_bounded() {
    let (mut t, start) = (tracker(), Instant::now());
    for i in 0..50_000u32 {
        let now = start + Duration::from_micros(u64::from(i) * 10);
        t.handle_message(now, host(i % 7), &join(group(i % 13)));
        t.handle_message(now, host(i % 7), &rec(ChangeToInclude, group(i % 13), &[]));
        t.poll_expired(now);
        assert!(t.timer_entries() <= 2 * (t.total_listeners() + t.tracked_groups()) + 1024);
    }
}

// ------------------------------------------------------------------ hostile sequences

#[derive(Debug, Clone)]
enum Op {
    Message(u32, MldMessage),
    Advance(u64),
    Own(bool),
}

fn small_addr(range: u32) -> impl Strategy<Value = Ipv6Addr> {
    (0..range).prop_map(|i| Ipv6Addr::from(0xff1e_u128 << 112 | u128::from(i)))
}

fn record_strategy() -> impl Strategy<Value = GroupRecord> {
    let types = prop_oneof![
        Just(ModeIsInclude),
        Just(ModeIsExclude),
        Just(ChangeToInclude),
        Just(ChangeToExclude),
        Just(AllowNewSources),
        Just(BlockOldSources),
    ];
    let sources = prop::collection::vec(
        prop_oneof![
            Just(OWN),
            Just(OTHER),
            any::<u128>().prop_map(Ipv6Addr::from)
        ],
        0..6,
    );
    (types, small_addr(12), sources).prop_map(|(record_type, group, sources)| GroupRecord {
        record_type,
        group,
        sources,
    })
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let message = prop_oneof![
        4 => prop::collection::vec(record_strategy(), 1..5)
            .prop_map(|records| MldMessage::ReportV2 { records }),
        1 => small_addr(12).prop_map(|group| MldMessage::ReportV1 { group }),
        2 => small_addr(12).prop_map(|group| MldMessage::DoneV1 { group }),
    ];
    prop_oneof![
        8 => (0..40u32, message).prop_map(|(h, m)| Op::Message(h, m)),
        3 => (0..3000u64).prop_map(Op::Advance),
        1 => any::<bool>().prop_map(Op::Own),
    ]
}

/// Checks the limits and that events agree with `is_active`, alternating per group.
fn check_invariants(
    t: &ListenerTracker,
    c: &TrackerConfig,
    events: &[GroupEvent],
    last: &mut HashMap<Ipv6Addr, GroupEvent>,
) -> Result<(), TestCaseError> {
    prop_assert!(t.tracked_groups() <= c.max_groups);
    prop_assert!(t.total_listeners() <= c.max_listeners + c.max_groups);
    let live = t.total_listeners() + t.tracked_groups();
    prop_assert!(t.timer_entries() <= 2 * live + 1024);
    for e in events {
        let g = match *e {
            GroupEvent::Listeners(g, n) => {
                prop_assert!(n > 0);
                prop_assert!(
                    matches!(last.get(&g), Some(GroupEvent::Active(_))),
                    "a count for {} that is not listened",
                    g
                );
                continue;
            }
            GroupEvent::Active(g) | GroupEvent::Leaving(g) | GroupEvent::Inactive(g) => g,
        };
        if let Some(prev) = last.insert(g, *e) {
            prop_assert_ne!(prev, *e, "an event repeated for {}", g);
        }
    }
    for (g, e) in last.iter() {
        prop_assert_eq!(t.is_active(g), !matches!(e, GroupEvent::Inactive(_)));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn hostile_sequences_never_panic_and_stay_bounded(
        ops in prop::collection::vec(op_strategy(), 1..300)
    ) {
        let config = TrackerConfig {
            max_groups: 6,
            max_listeners: 20,
            max_listeners_per_group: 5,
            specific_queries_per_sec: 5,
            specific_query_burst: 2,
            ..TrackerConfig::default()
        };
        let mut t = ListenerTracker::new(config, Box::new(|g: &Ipv6Addr| !g.segments()[7].is_multiple_of(5)));
        let mut now = Instant::now();
        let mut last = HashMap::new();
        for op in ops {
            let events = match op {
                Op::Message(h, msg) => t.handle_message(now, host(h), &msg),
                Op::Advance(ms) => {
                    now += Duration::from_millis(ms);
                    t.poll_expired(now)
                }
                Op::Own(known) => t.set_own_addresses(if known { &[OWN][..] } else { &[][..] }),
            };
            check_invariants(&t, &config, &events, &mut last)?;
            while t.poll_query().is_some() {}
        }
        // Everything ends once nobody reports: a minute later (and the checks that the last
        // expiries started) nothing is tracked.
        for wait in [60, 1] {
            now += Duration::from_secs(wait);
            let events = t.poll_expired(now);
            check_invariants(&t, &config, &events, &mut last)?;
        }
        prop_assert_eq!(t.tracked_groups(), 0);
        prop_assert_eq!(t.total_listeners(), 0);
        prop_assert_eq!(t.poll_timeout(), None);
    }
}
