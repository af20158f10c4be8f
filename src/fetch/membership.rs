//! Pacing of group membership changes (sans-IO), around a Linux MLD behaviour.
//!
//! Linux sends an MLDv2 state-change report two jiffies after the last membership change of
//! an interface, and every further change re-arms that timer. A receiver that joins and leaves
//! groups every few milliseconds (one object done, the next one joined) therefore keeps its
//! own reports from leaving, and the server hears of leaves 40 to 160 ms late, sending rounds
//! nobody needs all the while. Measured here: applying changes in batches at most every
//! `gap`, a little over two jiffies, brought leaves back to tens of milliseconds. A change
//! after a quiet spell is applied at once, so a lone demand read pays no delay. The jiffy is
//! the resolution of `CLOCK_REALTIME_COARSE` (4 ms here, HZ=250), so the gap follows the
//! kernel: 11 ms here, 26 ms at HZ=100.
//!
//! This pacing serves receivers that cannot send their own reports (no CAP_NET_RAW); one that
//! can ([`crate::mld::Reporter`]) reports every change at once and uses a gap of zero.
//!
//! Leaves are not urgent: after a round the sender pauses an object for longer than a leave
//! takes to arrive, so a late leave costs nothing. Leaves alone therefore wait up to four gaps
//! for a join to ride along with, which keeps the gap free for the next demand read's join.
//!
//! The same timer also frees what the kernel keeps of each group left (a "tomb", so that it
//! can report the leave again), after its second run: until then every join walks the list
//! of tombs (`mld_del_delrec`). A receiver with its own reports and no gap never lets the
//! timer run while it fetches, so the list grew to every group it had left: 20% of the
//! receive thread's CPU in eight copies of a 10,000-file tree on two cores. Such a receiver
//! therefore keeps one quiet gap after every [`QUIET_EVERY`] of unbroken changes
//! ([`Memberships::with_quiet`]), which bounds the list to a few hundred milliseconds of
//! leaves: 5% of the receive thread then, eight copies 2 to 3% faster (medians of five), a
//! lone one as fast and as costly to its server as before. A gap after every batch bounded
//! it too, but cost a lone copy 1.5% of its time and its server 1.7% more bytes, from
//! changes held back all along.

use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

/// How many gaps leaves alone may wait for a join.
const LEAVE_HOLD: u32 = 4;

/// How long changes may follow one another without a quiet gap, for a receiver that sends its
/// own reports (see the module doc).
pub const QUIET_EVERY: Duration = Duration::from_millis(100);

/// The gap between two batches of membership changes: two and a half jiffies and a
/// millisecond, so that the kernel's report from the last batch has gone out.
pub fn default_gap() -> Duration {
    let mut res = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_getres only writes the timespec it is given.
    let rc = unsafe { libc::clock_getres(libc::CLOCK_REALTIME_COARSE, &mut res) };
    let jiffy = if rc == 0 && res.tv_sec == 0 && res.tv_nsec > 0 {
        Duration::from_nanos(res.tv_nsec as u64)
    } else {
        Duration::from_millis(10)
    };
    (jiffy * 5 / 2 + Duration::from_millis(1)).min(Duration::from_millis(50))
}

#[derive(Debug)]
pub struct Memberships {
    ops: Vec<(Ipv6Addr, bool)>,
    gap: Duration,
    last_flush: Option<Instant>,
    /// When the oldest queued change was queued.
    first_queued: Option<Instant>,
    joins_queued: bool,
    /// See [`Memberships::with_quiet`].
    quiet: Option<Quiet>,
    /// When the last batch that followed a quiet was applied.
    busy_since: Option<Instant>,
}

/// A quiet of `length` after `every` of changes without one.
#[derive(Clone, Copy, Debug)]
struct Quiet {
    every: Duration,
    length: Duration,
}

impl Memberships {
    /// Changes applied at most every `gap`.
    pub fn new(gap: Duration) -> Memberships {
        Memberships {
            ops: Vec::new(),
            gap,
            last_flush: None,
            first_queued: None,
            joins_queued: false,
            quiet: None,
            busy_since: None,
        }
    }

    /// After `every` of batches less than `length` apart, the next one waits until the last
    /// is `length` old, so that the kernel's MLD timer can run (see the module doc).
    pub fn with_quiet(mut self, every: Duration, length: Duration) -> Memberships {
        self.quiet = Some(Quiet { every, length });
        self
    }

    /// Queues a join (`true`) or leave of `group` at `now`; changes keep their order.
    pub fn push(&mut self, now: Instant, group: Ipv6Addr, join: bool) {
        self.ops.push((group, join));
        self.first_queued.get_or_insert(now);
        self.joins_queued |= join;
    }

    /// The changes to apply now, if they are due (see [`Memberships::poll_timeout`]).
    pub fn poll_flush(&mut self, now: Instant) -> Option<Vec<(Ipv6Addr, bool)>> {
        if self.poll_timeout()? > now {
            return None;
        }
        if let Some(q) = self.quiet {
            if self
                .last_flush
                .is_none_or(|t| now.duration_since(t) >= q.length)
            {
                self.busy_since = Some(now);
            }
        }
        self.last_flush = Some(now);
        self.first_queued = None;
        self.joins_queued = false;
        Some(std::mem::take(&mut self.ops))
    }

    /// When the queued changes are due: with a join among them, once the last batch is `gap`
    /// old; leaves alone, after waiting [`LEAVE_HOLD`] gaps as well.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let queued = self.first_queued?;
        let mut due = match self.last_flush {
            Some(t) => queued.max(t + self.gap),
            None => queued,
        };
        if !self.joins_queued {
            due = due.max(queued + self.gap * LEAVE_HOLD);
        }
        if let (Some(q), Some(busy), Some(last)) = (self.quiet, self.busy_since, self.last_flush) {
            if due.saturating_duration_since(busy) >= q.every {
                due = due.max(last + q.length);
            }
        }
        Some(due)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GAP: Duration = Duration::from_millis(11);

    fn g(i: u16) -> Ipv6Addr {
        Ipv6Addr::new(0xff1e, 0, 0, 0, 0, 0, 0, i)
    }

    #[test]
    fn first_join_goes_at_once_then_batches() {
        let t0 = Instant::now();
        let mut m = Memberships::new(GAP);
        assert!(m.poll_flush(t0).is_none());
        m.push(t0, g(1), true);
        assert_eq!(m.poll_flush(t0), Some(vec![(g(1), true)]));
        let t1 = t0 + Duration::from_millis(5);
        m.push(t1, g(1), false);
        m.push(t1, g(2), true);
        assert!(m.poll_flush(t1).is_none());
        assert_eq!(m.poll_timeout(), Some(t0 + GAP));
        assert_eq!(
            m.poll_flush(t0 + GAP),
            Some(vec![(g(1), false), (g(2), true)])
        );
        assert!(m.poll_timeout().is_none());
    }

    #[test]
    fn leaves_alone_wait_and_leave_the_gap_to_joins() {
        let t0 = Instant::now();
        let mut m = Memberships::new(GAP);
        m.push(t0, g(1), true);
        m.poll_flush(t0);
        let t1 = t0 + Duration::from_millis(12);
        m.push(t1, g(1), false);
        assert!(m.poll_flush(t1).is_none(), "a lone leave waits");
        assert_eq!(m.poll_timeout(), Some(t1 + GAP * LEAVE_HOLD));
        let t2 = t1 + Duration::from_millis(3);
        m.push(t2, g(2), true);
        let both = Some(vec![(g(1), false), (g(2), true)]);
        assert_eq!(m.poll_flush(t2), both, "a join takes it along at once");
        let t3 = t2 + Duration::from_millis(1);
        m.push(t3, g(2), false);
        assert!(m.poll_flush(t3 + GAP).is_none());
        assert_eq!(
            m.poll_flush(t3 + GAP * LEAVE_HOLD),
            Some(vec![(g(2), false)])
        );
    }

    #[test]
    fn unbroken_changes_keep_a_quiet_gap_every_so_often() {
        let t0 = Instant::now();
        let every = Duration::from_millis(100);
        let mut m = Memberships::new(Duration::ZERO).with_quiet(every, GAP);
        let step = Duration::from_millis(3);
        let mut now = t0;
        let mut quiets = Vec::new();
        for i in 0..200u16 {
            m.push(now, g(i), true);
            if let Some(due) = m.poll_timeout().filter(|&d| d > now) {
                quiets.push((now, due));
                assert!(m.poll_flush(now).is_none(), "held for the quiet");
                now = due;
            }
            assert_eq!(m.poll_flush(now), Some(vec![(g(i), true)]));
            now += step;
        }
        // 200 changes 3 ms apart: 600 ms, so about one quiet every 100 ms, each ending a gap
        // after the last batch.
        assert!((4..=6).contains(&quiets.len()), "{quiets:?}");
        for (held_at, due) in &quiets {
            assert!(*due <= *held_at + GAP, "held at {held_at:?} until {due:?}");
        }
        let mut last = t0;
        for (_, due) in &quiets {
            assert!(
                due.duration_since(last) >= every,
                "quiets too close: {quiets:?}"
            );
            last = *due;
        }
    }

    #[test]
    fn a_change_after_a_quiet_spell_goes_at_once_with_quiet_too() {
        let t0 = Instant::now();
        let mut m = Memberships::new(Duration::ZERO).with_quiet(Duration::from_millis(100), GAP);
        m.push(t0, g(1), true);
        assert!(m.poll_flush(t0).is_some());
        let later = t0 + Duration::from_secs(1);
        m.push(later, g(2), true);
        assert_eq!(m.poll_timeout(), Some(later));
        // Changes back to back right after it are not held: the run is young.
        m.poll_flush(later);
        m.push(later, g(3), false);
        assert_eq!(m.poll_timeout(), Some(later));
    }

    #[test]
    fn gap_follows_the_jiffy() {
        let gap = default_gap();
        assert!(
            gap > Duration::from_millis(3) && gap <= Duration::from_millis(50),
            "{gap:?}"
        );
    }
}
