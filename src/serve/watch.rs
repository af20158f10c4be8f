//! When the server publishes again: the debounce of change notifications, periodic rescans
//! and SIGHUP, as a state machine fed the time (issue 10).
//!
//! `lcfs serve` follows its tree. Notifications (inotify, through the shell in
//! `watch/inotify.rs`), a block the sender found changed, SIGHUP and a periodic timer all end
//! in one question this module answers: *reindex now?* It owns no thread, socket or clock:
//! inputs are [`Debouncer::handle_event`]`(now, ..)`, the next deadline is
//! [`Debouncer::poll_timeout`], and [`Debouncer::poll_publish`]`(now)` says when to reindex
//! and why. The server reindexes on that answer and publishes a new generation only if the
//! root hash differs from the one it serves.
//!
//! The rules:
//! - A burst of changes is published once: [`WatchConfig::debounce`] after its last change,
//!   but never later than [`WatchConfig::max_delay`] after its first, so a tree that never
//!   stops changing is still published, at most once per `max_delay`, and a file copied in
//!   over a few seconds is published once, when the copy is done. A file written for longer
//!   than `max_delay` is published half-written: writers publish safely by writing to a
//!   temporary name and renaming it into place (a rename is atomic, and the new name appears
//!   whole or not at all).
//! - Overflowed notifications (inotify's `IN_Q_OVERFLOW`: events were lost) and a block found
//!   changed at send time are changes like any other: they start or extend a burst.
//! - SIGHUP rescans at once, taking any burst under way with it.
//! - Every [`WatchConfig::rescan`] after the last reindex the tree is rescanned anyway, for
//!   file systems whose changes inotify never sees (NFS and other network file systems,
//!   FUSE, changes made on another host); the root hash tells whether anything changed.
//!
//! Invariants: `poll_publish` answers at most once per burst and resets the periodic timer;
//! a reason is never empty (it names what led to the reindex); the distinct paths counted
//! in one burst are bounded by [`MAX_PATHS`].

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub mod inotify;

/// Distinct paths remembered in one burst; past this the reason says "more than".
pub const MAX_PATHS: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchConfig {
    /// Quiet time after the last change of a burst before the tree is reindexed.
    pub debounce: Duration,
    /// Longest a burst may hold a reindex back, counted from its first change.
    pub max_delay: Duration,
    /// Interval of full rescans that do not rely on notifications; `None`: never.
    pub rescan: Option<Duration>,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            debounce: Duration::from_secs(1),
            max_delay: Duration::from_secs(5),
            rescan: Some(Duration::from_secs(60)),
        }
    }
}

/// What the threads around the publish loop tell it: the notification shell and the sender.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// A path of the tree changed (relative to the tree; empty for the tree's directory).
    Changed(PathBuf),
    /// Notifications were lost, or the watcher failed: rescan.
    Overflow,
    /// The sender found this file's block of the current generation changed.
    BlockChanged(PathBuf),
}

/// One input to the debouncer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A path of the tree changed (relative to it; empty for the tree's root).
    Path(PathBuf),
    /// Notifications were lost: the whole tree may have changed.
    Overflow,
    /// The sender re-read a block of the current generation and found it changed.
    BlockChanged,
    /// SIGHUP: rescan now.
    Signal,
}

/// Why the tree is reindexed; shown in the server's log line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reason {
    /// Distinct paths that changed (at most [`MAX_PATHS`]).
    pub paths: usize,
    /// More than [`MAX_PATHS`] paths changed.
    pub more_paths: bool,
    pub overflow: bool,
    pub block_changed: bool,
    pub signal: bool,
    pub periodic: bool,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        match (self.paths, self.more_paths) {
            (_, true) => parts.push(format!("more than {MAX_PATHS} paths changed")),
            (0, false) => {}
            (1, false) => parts.push("1 path changed".to_string()),
            (n, false) => parts.push(format!("{n} paths changed")),
        }
        let flags = [
            (self.overflow, "change notifications overflowed"),
            (self.block_changed, "a block changed while being served"),
            (self.signal, "SIGHUP"),
            (self.periodic, "periodic rescan"),
        ];
        parts.extend(flags.iter().filter(|f| f.0).map(|f| f.1.to_string()));
        if parts.is_empty() {
            parts.push("start".to_string());
        }
        f.write_str(&parts.join(", "))
    }
}

/// Changes seen since the last reindex.
#[derive(Debug)]
struct Burst {
    first: Instant,
    last: Instant,
    paths: HashSet<PathBuf>,
    reason: Reason,
}

/// The debounce state machine. See the module docs.
#[derive(Debug)]
pub struct Debouncer {
    config: WatchConfig,
    burst: Option<Burst>,
    /// When SIGHUP asked for a rescan not yet answered.
    signal: Option<Instant>,
    next_rescan: Option<Instant>,
}

impl Debouncer {
    /// A debouncer whose first periodic rescan is one interval after `now`.
    pub fn new(now: Instant, config: WatchConfig) -> Debouncer {
        Debouncer {
            next_rescan: config.rescan.map(|r| now + r),
            config,
            burst: None,
            signal: None,
        }
    }

    pub fn handle_event(&mut self, now: Instant, change: Change) {
        if change == Change::Signal {
            self.signal.get_or_insert(now);
            return;
        }
        let burst = self.burst.get_or_insert_with(|| Burst {
            first: now,
            last: now,
            paths: HashSet::new(),
            reason: Reason::default(),
        });
        burst.last = burst.last.max(now);
        match change {
            Change::Path(p) if burst.paths.len() < MAX_PATHS => {
                burst.paths.insert(p);
            }
            Change::Path(p) => burst.reason.more_paths |= !burst.paths.contains(&p),
            Change::Overflow => burst.reason.overflow = true,
            Change::BlockChanged => burst.reason.block_changed = true,
            Change::Signal => {}
        }
    }

    /// The burst's deadline: quiet for `debounce`, or `max_delay` after its first change.
    fn burst_due(&self) -> Option<Instant> {
        let b = self.burst.as_ref()?;
        Some((b.last + self.config.debounce).min(b.first + self.config.max_delay))
    }

    /// When [`Debouncer::poll_publish`] may next answer; `None` when nothing is pending and
    /// no rescan is scheduled.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [self.signal, self.burst_due(), self.next_rescan]
            .into_iter()
            .flatten()
            .min()
    }

    /// Whether to reindex now, and why. Answers at most once per burst, signal or period.
    pub fn poll_publish(&mut self, now: Instant) -> Option<Reason> {
        let burst_due = self.burst_due().is_some_and(|t| t <= now);
        let periodic = self.next_rescan.is_some_and(|t| t <= now);
        if !(burst_due || periodic || self.signal.is_some()) {
            return None;
        }
        let mut reason = match self.burst.take() {
            Some(b) => Reason {
                paths: b.paths.len(),
                ..b.reason
            },
            None => Reason::default(),
        };
        reason.signal = self.signal.take().is_some();
        reason.periodic = periodic && !burst_due && !reason.signal;
        self.next_rescan = self.config.rescan.map(|r| now + r);
        Some(reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    fn config() -> WatchConfig {
        WatchConfig {
            debounce: 1000 * MS,
            max_delay: 5000 * MS,
            rescan: None,
        }
    }

    fn path(n: u32) -> Change {
        Change::Path(PathBuf::from(format!("f{n}")))
    }

    #[test]
    fn a_burst_is_published_once_after_it_goes_quiet() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(t0, config());
        assert_eq!((d.poll_timeout(), d.poll_publish(t0)), (None, None));
        for i in 0..3 {
            d.handle_event(t0 + 300 * MS * i, path(i));
        }
        d.handle_event(t0 + 700 * MS, path(0));
        assert_eq!(d.poll_timeout(), Some(t0 + 1700 * MS));
        assert_eq!(d.poll_publish(t0 + 1699 * MS), None);
        let reason = d.poll_publish(t0 + 1700 * MS).expect("published");
        assert_eq!(reason.to_string(), "3 paths changed");
        assert_eq!(d.poll_publish(t0 + 9000 * MS), None, "once per burst");
        assert_eq!(d.poll_timeout(), None);
    }

    #[test]
    fn a_tree_that_never_goes_quiet_is_published_every_max_delay() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(t0, config());
        let mut published = Vec::new();
        // A change every 100 ms for 20 s, as a file being copied in slowly gives.
        for step in 0..200u32 {
            let now = t0 + 100 * MS * step;
            d.handle_event(now, path(step % 2));
            if d.poll_publish(now).is_some() {
                published.push(step);
            }
        }
        assert_eq!(published, [50, 101, 152]);
    }

    #[test]
    fn a_copy_shorter_than_max_delay_is_published_once() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(t0, config());
        let mut answers = 0;
        // 3 s of writes every 50 ms, then quiet; polled every 10 ms as the shell would.
        for tick in 0..1000u32 {
            let now = t0 + 10 * MS * tick;
            if tick % 5 == 0 && tick <= 300 {
                d.handle_event(now, path(7));
            }
            if let Some(reason) = d.poll_publish(now) {
                assert_eq!((now, reason.paths), (t0 + 4000 * MS, 1));
                answers += 1;
            }
        }
        assert_eq!(answers, 1);
    }

    #[test]
    fn a_signal_rescans_at_once_and_takes_the_burst_along() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(t0, config());
        d.handle_event(t0, path(1));
        d.handle_event(t0 + 10 * MS, Change::Signal);
        assert_eq!(d.poll_timeout(), Some(t0 + 10 * MS));
        let reason = d.poll_publish(t0 + 10 * MS).unwrap();
        assert_eq!(reason.to_string(), "1 path changed, SIGHUP");
        assert_eq!(d.poll_publish(t0 + 2000 * MS), None);
    }

    #[test]
    fn periodic_rescans_follow_the_last_reindex() {
        let t0 = Instant::now();
        let every = 60_000 * MS;
        let mut d = Debouncer::new(
            t0,
            WatchConfig {
                rescan: Some(every),
                ..config()
            },
        );
        assert_eq!(d.poll_timeout(), Some(t0 + every));
        assert_eq!(d.poll_publish(t0 + every - MS), None);
        let r = d.poll_publish(t0 + every).unwrap();
        assert_eq!(r.to_string(), "periodic rescan");
        // A burst's reindex postpones the next rescan: it looked at the whole tree too.
        d.handle_event(t0 + every + 1000 * MS, Change::Overflow);
        let r = d.poll_publish(t0 + every + 2000 * MS).unwrap();
        assert_eq!(r.to_string(), "change notifications overflowed");
        assert_eq!(d.poll_timeout(), Some(t0 + 2 * every + 2000 * MS));
    }

    #[test]
    fn block_changes_and_overflow_are_named() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(t0, config());
        d.handle_event(t0, Change::BlockChanged);
        d.handle_event(t0, Change::Overflow);
        d.handle_event(t0, path(1));
        let r = d.poll_publish(t0 + 1000 * MS).unwrap();
        assert_eq!(
            r.to_string(),
            "1 path changed, change notifications overflowed, a block changed while being served"
        );
    }

    #[test]
    fn paths_counted_are_bounded() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(t0, config());
        for i in 0..(MAX_PATHS as u32 + 10) {
            d.handle_event(t0, path(i));
        }
        let r = d.poll_publish(t0 + 1000 * MS).unwrap();
        assert_eq!(r.paths, MAX_PATHS);
        assert_eq!(
            r.to_string(),
            format!("more than {MAX_PATHS} paths changed")
        );
    }

    proptest! {
        /// Whatever the changes, each is followed by a reindex within `max_delay`, and two
        /// reindexes for changes are at least `debounce` apart unless a signal asked.
        #[test]
        fn every_change_is_published_within_max_delay(
            gaps in proptest::collection::vec(0u64..3000, 1..60),
        ) {
            let cfg = config();
            let t0 = Instant::now();
            let mut d = Debouncer::new(t0, cfg.clone());
            let mut now = t0;
            let mut pending: Option<Instant> = None;
            let mut last_publish: Option<Instant> = None;
            let mut check = |d: &mut Debouncer, at: Instant, pending: &mut Option<Instant>| {
                while let Some(t) = d.poll_timeout().filter(|t| *t <= at) {
                    let reason = d.poll_publish(t).expect("due");
                    let first = pending.take().expect("a change was pending");
                    prop_assert!(t - first <= cfg.max_delay);
                    prop_assert!(reason.paths > 0);
                    if let Some(l) = last_publish {
                        prop_assert!(t - l >= cfg.debounce);
                    }
                    last_publish = Some(t);
                }
                Ok(())
            };
            for (i, gap) in gaps.iter().enumerate() {
                let at = now + MS * *gap as u32;
                check(&mut d, at, &mut pending)?;
                now = at;
                d.handle_event(now, path(i as u32));
                pending.get_or_insert(now);
            }
            check(&mut d, now + cfg.max_delay, &mut pending)?;
            prop_assert!(pending.is_none());
        }
    }
}
