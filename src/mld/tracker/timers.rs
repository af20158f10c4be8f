//! The tracker's deadlines: a binary min-heap with lazy deletion.
//!
//! Every timer has an owner (a listener, or a group's last-listener check) that remembers the
//! deadline of its one live entry. Moving a deadline later costs nothing: the owner keeps its
//! entry and, when that entry comes due, pushes it again at the real deadline. Removing an
//! owner leaves its entry behind; an entry popped whose deadline its owner no longer holds is
//! stale and dropped. So pushing and popping cost O(log n), and nothing is ever scanned.
//!
//! Stale entries are bounded: the owner of the heap calls [`Deadlines::needs_rebuild`] and
//! rebuilds from the live owners when the heap holds more than twice as many entries as there
//! are live timers (plus a constant), which costs O(n) once every n or more pushes.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

/// Entries the heap may hold beyond twice the live timers before a rebuild is due.
const SLACK: usize = 1024;

/// A min-heap of `(deadline, key)`.
#[derive(Debug)]
pub(super) struct Deadlines<K: Ord> {
    heap: BinaryHeap<Reverse<(Instant, K)>>,
}

impl<K: Ord + Copy> Deadlines<K> {
    pub(super) fn new() -> Self {
        Self {
            heap: BinaryHeap::new(),
        }
    }

    pub(super) fn push(&mut self, at: Instant, key: K) {
        self.heap.push(Reverse((at, key)));
    }

    /// The earliest entry's deadline; it may be stale, so it is never later than the next
    /// live deadline but may be earlier.
    pub(super) fn peek(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// The earliest entry's key, stale or not.
    pub(super) fn peek_key(&self) -> Option<K> {
        self.heap.peek().map(|Reverse((_, key))| *key)
    }

    /// Removes and returns the earliest entry if it is due at `now`.
    pub(super) fn pop_due(&mut self, now: Instant) -> Option<(Instant, K)> {
        if self.peek()? > now {
            return None;
        }
        self.heap.pop().map(|Reverse(entry)| entry)
    }

    /// Removes the earliest entry (the caller found it stale).
    pub(super) fn pop(&mut self) {
        self.heap.pop();
    }

    pub(super) fn len(&self) -> usize {
        self.heap.len()
    }

    /// True when stale entries outnumber `live` timers enough to pay for a rebuild.
    pub(super) fn needs_rebuild(&self, live: usize) -> bool {
        self.heap.len() > live.saturating_mul(2).saturating_add(SLACK)
    }

    /// Replaces every entry with `live` ones.
    pub(super) fn rebuild(&mut self, live: impl Iterator<Item = (Instant, K)>) {
        self.heap = live.map(Reverse).collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn pops_in_deadline_order_only_when_due() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut d = Deadlines::new();
        for (ms, key) in [(30, 'c'), (10, 'a'), (20, 'b')] {
            d.push(at(ms), key);
        }
        assert_eq!(d.peek(), Some(at(10)));
        assert_eq!(d.pop_due(at(5)), None);
        assert_eq!(d.pop_due(at(25)), Some((at(10), 'a')));
        assert_eq!(d.pop_due(at(25)), Some((at(20), 'b')));
        assert_eq!(d.pop_due(at(25)), None);
        assert_eq!(d.peek_key(), Some('c'));
        d.pop();
        assert_eq!(d.peek(), None);
    }

    #[test]
    fn rebuild_when_stale_entries_pile_up() {
        let t0 = Instant::now();
        let mut d = Deadlines::new();
        for i in 0..(2 * 10 + SLACK as u32 + 1) {
            d.push(t0, i);
        }
        assert!(d.needs_rebuild(10));
        d.rebuild((0..10).map(|i| (t0, i)));
        assert_eq!(d.len(), 10);
        assert!(!d.needs_rebuild(10));
    }
}
