//! The sender's scheduler and pacer (sans-IO): which symbol goes out next, and when.
//!
//! Active objects (those whose group has at least one listener) take turns by rounds: an
//! object's round goes out back to back, then the next object's. A round is what a receiver
//! needs (K + 2 symbols) the first time, and K/8 doubling after that; between two rounds of one
//! object lies a cooldown longer than an MLD leave takes to arrive, so a receiver that decoded
//! is gone before anything more is sent for it. Whole rounds, rather than packet-by-packet
//! round robin, make objects complete one after another, so a receiver's window of objects in
//! flight refills continuously instead of draining all at once. Each object keeps a
//! cursor, the next ESI to send, which only ever grows (modulo 2^24), also across a leave and a
//! rejoin: source symbols go first, then repair symbols never sent before, so a receiver that
//! joins late or lost packets always gets symbols it lacks. The root record, while its group is
//! active, is interleaved every `root_interval`.
//!
//! The pacer is a token bucket counting wire bytes (payload plus IPv6 and UDP headers): it
//! holds the average to `rate` and lets at most `burst` bytes out at once, because multicast
//! has no congestion control and an unpaced sender floods the link.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use lcfs_cache::Hash;

/// What to send next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transmit {
    Root,
    Symbol { hash: Hash, esi: u32 },
}

#[derive(Clone, Debug)]
pub struct SchedConfig {
    /// How often the root record is repeated while its group has listeners.
    pub root_interval: Duration,
    /// Pause between rounds of one object: longer than a receiver's leave takes to arrive, so
    /// that a receiver that has decoded is gone before more is sent.
    pub cooldown: Duration,
    /// Cursors remembered for objects that are no longer active.
    pub remembered_cursors: usize,
}

impl Default for SchedConfig {
    fn default() -> Self {
        SchedConfig {
            root_interval: Duration::from_millis(25),
            cooldown: Duration::from_millis(30),
            remembered_cursors: 1 << 16,
        }
    }
}

/// An active object's progress.
struct Active {
    k: u32,
    /// Symbols left in the current round.
    budget: u32,
    /// Rounds completed since the object became active.
    rounds: u32,
}

impl Active {
    fn new(k: u32) -> Active {
        Active {
            k,
            budget: first_round(k),
            rounds: 0,
        }
    }

    fn next_round(&mut self) {
        self.rounds += 1;
        self.budget = later_round(self.k, self.rounds);
    }
}

/// The first round: what a receiver that lost nothing needs, and a symbol or two to spare
/// (RaptorQ decodes from K symbols with probability above 99 %, K + 2 almost surely).
/// Receivers that lost some get the rest in the next rounds, after the others have left.
fn first_round(k: u32) -> u32 {
    k + 2
}

/// Later rounds serve stragglers and late joiners: K/8 doubling each time, at most K.
fn later_round(k: u32, round: u32) -> u32 {
    let base = (k / 8).max(2);
    base.saturating_mul(1 << (round - 1).min(8)).min(k.max(2))
}

pub struct Scheduler {
    config: SchedConfig,
    ring: VecDeque<Hash>,
    active: HashMap<Hash, Active>,
    /// Objects between rounds, in order of when they resume.
    cooling: VecDeque<(Instant, Hash)>,
    cursors: HashMap<Hash, u32>,
    root_active: bool,
    next_root: Option<Instant>,
}

impl Scheduler {
    pub fn new(config: SchedConfig) -> Scheduler {
        Scheduler {
            config,
            ring: VecDeque::new(),
            active: HashMap::new(),
            cooling: VecDeque::new(),
            cursors: HashMap::new(),
            root_active: false,
            next_root: None,
        }
    }

    /// An object's group gained its first listener; `k` is its number of source symbols.
    pub fn handle_active(&mut self, hash: Hash, k: u32) {
        if self.active.contains_key(&hash) {
            return;
        }
        self.active.insert(hash, Active::new(k));
        self.ring.push_back(hash);
        self.cursors.entry(hash).or_insert(0);
    }

    pub fn handle_inactive(&mut self, hash: &Hash) {
        if self.active.remove(hash).is_none() {
            return;
        }
        self.ring.retain(|h| h != hash);
        self.cooling.retain(|(_, h)| h != hash);
        if self.cursors.len() > self.config.remembered_cursors {
            let active = &self.active;
            self.cursors.retain(|h, _| active.contains_key(h));
        }
    }

    pub fn handle_root(&mut self, now: Instant, active: bool) {
        self.root_active = active;
        self.next_root = active.then_some(now);
    }

    /// Restarts an object's symbols at zero (after its bytes were found to have changed).
    pub fn forget(&mut self, hash: &Hash) {
        self.handle_inactive(hash);
        self.cursors.remove(hash);
    }

    pub fn is_idle(&self) -> bool {
        self.active.is_empty() && !self.root_active
    }

    pub fn active_objects(&self) -> usize {
        self.active.len()
    }

    /// The next packet to send at `now`, or None when there is nothing to send until
    /// [`Scheduler::poll_timeout`].
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        if let Some(at) = self.next_root.filter(|&at| at <= now) {
            self.next_root =
                Some(at.max(now - self.config.root_interval) + self.config.root_interval);
            return Some(Transmit::Root);
        }
        while self.cooling.front().is_some_and(|(t, _)| *t <= now) {
            let (_, hash) = self.cooling.pop_front()?;
            if let Some(a) = self.active.get_mut(&hash) {
                a.next_round();
                self.ring.push_back(hash);
            }
        }
        let hash = *self.ring.front()?;
        let a = self.active.get_mut(&hash)?;
        a.budget = a.budget.saturating_sub(1);
        if a.budget == 0 {
            self.ring.pop_front();
            self.cooling.push_back((now + self.config.cooldown, hash));
        }
        let cursor = self.cursors.entry(hash).or_insert(0);
        let esi = *cursor;
        *cursor = (*cursor + 1) % crate::fec::ESI_LIMIT;
        Some(Transmit::Symbol { hash, esi })
    }

    /// When the scheduler next has something to send, if it has nothing now.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if !self.ring.is_empty() {
            return None;
        }
        let cool = self.cooling.front().map(|(t, _)| *t);
        match (cool, self.next_root) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// A token bucket of wire bytes.
pub struct Pacer {
    bytes_per_sec: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Pacer {
    /// A pacer for `rate_bps` bits per second that lets `burst` bytes out back to back.
    pub fn new(now: Instant, rate_bps: u64, burst: usize) -> Pacer {
        Pacer {
            bytes_per_sec: rate_bps as f64 / 8.0,
            burst: burst as f64,
            tokens: burst as f64,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.bytes_per_sec).min(self.burst);
        self.last = now;
    }

    /// How many bytes may go out now.
    pub fn available(&mut self, now: Instant) -> usize {
        self.refill(now);
        self.tokens.max(0.0) as usize
    }

    pub fn handle_sent(&mut self, now: Instant, wire_bytes: usize) {
        self.refill(now);
        self.tokens -= wire_bytes as f64;
    }

    /// When `bytes` will be available.
    pub fn poll_timeout(&mut self, now: Instant, bytes: usize) -> Instant {
        self.refill(now);
        let missing = bytes as f64 - self.tokens;
        if missing <= 0.0 {
            return now;
        }
        now + Duration::from_secs_f64(missing / self.bytes_per_sec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u8) -> Hash {
        blake3::hash(&[i])
    }

    #[test]
    fn objects_take_turns_by_rounds_and_cursors_grow() {
        let now = Instant::now();
        let mut s = Scheduler::new(SchedConfig::default());
        s.handle_active(h(1), 100);
        s.handle_active(h(2), 100);
        s.handle_active(h(1), 100);
        let sent: Vec<_> = (0..204).map(|_| s.poll_transmit(now).unwrap()).collect();
        assert_eq!(
            sent.iter()
                .filter(|t| matches!(t, Transmit::Symbol { hash, .. } if *hash == h(1)))
                .count(),
            102
        );
        assert_eq!(sent[2], Transmit::Symbol { hash: h(1), esi: 2 });
        assert_eq!(
            sent[102],
            Transmit::Symbol { hash: h(2), esi: 0 },
            "whole rounds, in turn"
        );
    }

    #[test]
    fn nothing_is_sent_without_a_listener() {
        let now = Instant::now();
        let mut s = Scheduler::new(SchedConfig::default());
        assert!(s.poll_transmit(now).is_none());
        s.handle_active(h(1), 100);
        s.handle_inactive(&h(1));
        assert!(s.poll_transmit(now).is_none() && s.is_idle());
    }

    #[test]
    fn rejoin_continues_with_new_symbols() {
        let now = Instant::now();
        let mut s = Scheduler::new(SchedConfig::default());
        s.handle_active(h(1), 100);
        s.poll_transmit(now);
        s.handle_inactive(&h(1));
        s.handle_active(h(1), 100);
        assert_eq!(
            s.poll_transmit(now),
            Some(Transmit::Symbol { hash: h(1), esi: 1 })
        );
        s.forget(&h(1));
        s.handle_active(h(1), 100);
        assert_eq!(
            s.poll_transmit(now),
            Some(Transmit::Symbol { hash: h(1), esi: 0 })
        );
    }

    #[test]
    fn root_is_interleaved_on_its_interval() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(SchedConfig::default());
        s.handle_active(h(1), 100);
        s.handle_root(t0, true);
        assert_eq!(s.poll_transmit(t0), Some(Transmit::Root));
        assert!(matches!(s.poll_transmit(t0), Some(Transmit::Symbol { .. })));
        let t1 = t0 + Duration::from_millis(30);
        assert_eq!(s.poll_transmit(t1), Some(Transmit::Root));
        s.handle_inactive(&h(1));
        assert!(s.poll_transmit(t1).is_none());
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_millis(50)));
    }

    #[test]
    fn rounds_pause_for_leaves_then_grow() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(SchedConfig::default());
        s.handle_active(h(1), 32);
        let first = std::iter::from_fn(|| s.poll_transmit(t0)).count();
        assert_eq!(first, 32 + 2, "first round: K + 2");
        let resume = s.poll_timeout().unwrap();
        assert_eq!(resume, t0 + SchedConfig::default().cooldown);
        let second = std::iter::from_fn(|| s.poll_transmit(resume)).count();
        assert_eq!(second, 4, "then K/8");
        let third = std::iter::from_fn(|| s.poll_transmit(resume + Duration::from_secs(1))).count();
        assert_eq!(third, 8, "doubling");
        s.handle_inactive(&h(1));
        assert!(s.poll_timeout().is_none() && s.is_idle());
        s.handle_active(h(1), 32);
        assert_eq!(
            s.poll_transmit(t0),
            Some(Transmit::Symbol {
                hash: h(1),
                esi: 34 + 4 + 8
            })
        );
    }

    #[test]
    fn pacer_holds_the_rate() {
        let t0 = Instant::now();
        let mut p = Pacer::new(t0, 8_000_000, 10_000);
        assert_eq!(p.available(t0), 10_000);
        p.handle_sent(t0, 10_000);
        assert_eq!(p.available(t0), 0);
        assert_eq!(p.poll_timeout(t0, 1000), t0 + Duration::from_millis(1));
        assert_eq!(
            p.available(t0 + Duration::from_secs(1)),
            10_000,
            "burst caps the bucket"
        );
    }
}
