//! What a receiver tells the publisher about its requests (sans-IO): whether it fetches in
//! bulk, and whether a reader waits.
//!
//! The publisher holds an object's first round until every receiver fetching in bulk has
//! joined it, for at most `SchedConfig::gather` (`crate::serve::sched`): receivers copying
//! the same tree then share each round even when they run tens of milliseconds apart, as
//! they do when they share a machine's cores. It counts those receivers as the listeners of
//! the [`Report::Bulk`] group, and skips the wait while the [`Report::Hurry`] group has any:
//! a program blocked in `read` must not wait for other machines.
//!
//! Invariants: the bulk group is joined while requests other than demand reads are pending,
//! and for [`BULK_LINGER`] after, and by a receiver that will fetch in bulk from when it
//! starts to watch the root group until its first requests, [`BULK_EXPECTED`] at most; the
//! hurry group while a demand read is pending, and for [`HURRY_LINGER`] after. The lingers
//! keep a receiver that asks in turns (a copy asks for 4096 files at a time, a reader reads
//! block after block) from sending a report for every turn.
//!
//! A receiver that will fetch in bulk (`copy`, `prefetch`) joins the bulk group with its
//! first join of the root group, before it has anything to ask for: copies started
//! together hear the root record up to a root interval apart, and the first to hear it used
//! to count as the only bulk receiver, so its first directories went out for it alone and
//! every other copy needed rounds of its own (eight copies of tools/bench's tree_10k: the
//! first second at half the link's rate).

use std::time::{Duration, Instant};

use crate::wire::channel::Report;

/// How long the bulk group stays joined after the last bulk request ended. Longer makes
/// others' blocks wait `gather` for a receiver that is done; the process of a `copy` that
/// ends leaves at once.
pub const BULK_LINGER: Duration = Duration::from_millis(200);

/// How long the hurry group stays joined after the last demand read ended: a reader's next
/// read usually follows within milliseconds.
pub const HURRY_LINGER: Duration = Duration::from_millis(250);

/// How long a receiver that will fetch in bulk (`copy`, `prefetch`) says so before its first
/// request: from its first join of the root group until the root record is heard and the
/// first directory asked for, which takes a root interval (25 ms) on a quiet link. Bounded,
/// so that a receiver that never hears a root it accepts does not hold others' rounds. A
/// copy whose objects are all in its cache asks the network for nothing and holds it the
/// whole second: first rounds of others then wait for it, and teach their waits to shrink.
pub const BULK_EXPECTED: Duration = Duration::from_secs(1);

/// The bulk and hurry reports of one receiver.
#[derive(Debug, Default)]
pub struct IntentReport {
    /// Until when each is held: [bulk, hurry].
    until: [Option<Instant>; 2],
    joined: [bool; 2],
}

const REPORTS: [Report; 2] = [Report::Bulk, Report::Hurry];

impl IntentReport {
    pub fn new() -> IntentReport {
        IntentReport::default()
    }

    /// What is pending at `now`: requests other than demand reads (`bulk`), and demand
    /// reads (`demand`).
    pub fn handle_pending(&mut self, now: Instant, bulk: bool, demand: bool) {
        for (i, (pending, linger)) in [(bulk, BULK_LINGER), (demand, HURRY_LINGER)]
            .into_iter()
            .enumerate()
        {
            if pending {
                self.until[i] = Some(now + linger);
            }
        }
    }

    /// The receiver will fetch in bulk: the bulk report holds for [`BULK_EXPECTED`] from
    /// `now`, or until a linger after its requests ends it sooner.
    pub fn handle_bulk_expected(&mut self, now: Instant) {
        self.until[0] = Some(now + BULK_EXPECTED);
    }

    /// When a report joined is next due to be left.
    pub fn poll_timeout(&self) -> Option<Instant> {
        (0..2)
            .filter(|&i| self.joined[i])
            .filter_map(|i| self.until[i])
            .min()
    }

    /// The next report to join (true) or leave (false) at `now`.
    pub fn poll_change(&mut self, now: Instant) -> Option<(Report, bool)> {
        (0..2).find_map(|i| {
            let on = self.until[i].is_some_and(|t| now < t);
            (on != self.joined[i]).then(|| {
                self.joined[i] = on;
                (REPORTS[i], on)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changes(r: &mut IntentReport, now: Instant) -> Vec<(Report, bool)> {
        std::iter::from_fn(|| r.poll_change(now)).collect()
    }

    #[test]
    fn bulk_and_hurry_are_joined_while_pending_and_left_after_their_linger() {
        let t0 = Instant::now();
        let mut r = IntentReport::new();
        assert!(
            changes(&mut r, t0).is_empty(),
            "nothing pending, nothing said"
        );
        r.handle_pending(t0, true, false);
        assert_eq!(changes(&mut r, t0), [(Report::Bulk, true)]);
        r.handle_pending(t0, true, true);
        assert_eq!(changes(&mut r, t0), [(Report::Hurry, true)]);
        // Nothing pending any more: each stays for its linger, then goes.
        let t1 = t0 + Duration::from_millis(10);
        r.handle_pending(t1, false, false);
        assert!(changes(&mut r, t1).is_empty());
        assert_eq!(changes(&mut r, t0 + BULK_LINGER), [(Report::Bulk, false)]);
        assert_eq!(changes(&mut r, t0 + HURRY_LINGER), [(Report::Hurry, false)]);
        assert!(
            changes(&mut r, t0 + HURRY_LINGER * 4).is_empty(),
            "and stay left"
        );
    }

    #[test]
    fn an_expected_bulk_fetch_is_reported_before_its_first_request() {
        let t0 = Instant::now();
        let mut r = IntentReport::new();
        r.handle_bulk_expected(t0);
        assert_eq!(changes(&mut r, t0), [(Report::Bulk, true)]);
        // The first requests come and end: the linger after them is what holds now.
        let t1 = t0 + Duration::from_millis(30);
        assert!(changes(&mut r, t1).is_empty());
        r.handle_pending(t1, true, false);
        r.handle_pending(t1, false, false);
        assert!(changes(&mut r, t1 + BULK_LINGER / 2).is_empty());
        assert_eq!(changes(&mut r, t1 + BULK_LINGER), [(Report::Bulk, false)]);
        // Never a request: the report goes after BULK_EXPECTED.
        let mut r = IntentReport::new();
        r.handle_bulk_expected(t0);
        assert_eq!(changes(&mut r, t0).len(), 1);
        assert_eq!(changes(&mut r, t0 + BULK_EXPECTED), [(Report::Bulk, false)]);
    }

    #[test]
    fn requests_in_turns_keep_the_report_without_a_change() {
        let t0 = Instant::now();
        let mut r = IntentReport::new();
        r.handle_pending(t0, true, false);
        assert_eq!(changes(&mut r, t0).len(), 1);
        // A new turn of requests every 150 ms, idle in between.
        for i in 1..20u32 {
            let t = t0 + Duration::from_millis(150) * i;
            assert!(changes(&mut r, t).is_empty(), "turn {i}");
            r.handle_pending(t, true, false);
        }
    }
}
