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

use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

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
    last_flush: Option<Instant>,
    gap: Duration,
}

impl Memberships {
    pub fn new(gap: Duration) -> Memberships {
        Memberships {
            ops: Vec::new(),
            last_flush: None,
            gap,
        }
    }

    /// Queues a join (`true`) or leave of `group`; changes keep their order.
    pub fn push(&mut self, group: Ipv6Addr, join: bool) {
        self.ops.push((group, join));
    }

    /// The changes to apply now, when there are some and the last batch is `gap` old.
    pub fn poll_flush(&mut self, now: Instant) -> Option<Vec<(Ipv6Addr, bool)>> {
        let due = self.last_flush.is_none_or(|t| now >= t + self.gap);
        if self.ops.is_empty() || !due {
            return None;
        }
        self.last_flush = Some(now);
        Some(std::mem::take(&mut self.ops))
    }

    /// When the queued changes may be applied.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.ops.is_empty() {
            return None;
        }
        Some(self.last_flush.map_or_else(Instant::now, |t| t + self.gap))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_change_goes_at_once_then_batches() {
        let t0 = Instant::now();
        let g = |i: u16| Ipv6Addr::new(0xff1e, 0, 0, 0, 0, 0, 0, i);
        let gap = Duration::from_millis(11);
        let mut m = Memberships::new(gap);
        assert!(m.poll_flush(t0).is_none());
        m.push(g(1), true);
        assert_eq!(m.poll_flush(t0), Some(vec![(g(1), true)]));
        m.push(g(1), false);
        m.push(g(2), true);
        assert!(m.poll_flush(t0 + Duration::from_millis(5)).is_none());
        assert_eq!(m.poll_timeout(), Some(t0 + gap));
        let later = t0 + gap;
        assert_eq!(m.poll_flush(later), Some(vec![(g(1), false), (g(2), true)]));
        assert!(m.poll_timeout().is_none());
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
