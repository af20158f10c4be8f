//! Sequential-access detection for one open file, as the kernel and mountpoint-s3 do it.
//!
//! Each open file handle owns a [`SequentialDetector`]. A read that starts where the previous
//! one ended is sequential and grows the readahead window (the first one opens it at the
//! minimum, each further one doubles it, up to the maximum). A read that lands a little ahead
//! of that point, within the current window, keeps the window: the kernel skips what its page
//! cache already holds. Any other read is random and closes the window, so random readers never
//! make the source fetch bytes nobody asked for.
//!
//! A fresh handle counts as positioned at offset 0, so a reader starting at the beginning of
//! the file gets the minimum window on its first read.
//!
//! Invariant: the window is 0 or within `[min, max]`.

/// Grows and resets the readahead window of one open file.
#[derive(Clone, Debug)]
pub struct SequentialDetector {
    /// Where the next sequential read would start.
    next: u64,
    /// The current window in bytes (0 after a random access).
    window: u64,
    min: u64,
    max: u64,
}

impl SequentialDetector {
    /// A detector whose window opens at `min` bytes and grows to `max` (`min` is lowered to
    /// `max` if larger; a `max` of 0 turns readahead off).
    pub fn new(min: u64, max: u64) -> SequentialDetector {
        SequentialDetector {
            next: 0,
            window: 0,
            min: min.min(max),
            max,
        }
    }

    /// Takes a read of `len` bytes at `offset`; returns the readahead window for it.
    pub fn handle_read(&mut self, offset: u64, len: u64) -> u64 {
        if offset == self.next {
            self.window = self.grown();
        } else if offset < self.next || offset - self.next > self.window {
            self.window = 0;
        }
        self.next = offset.saturating_add(len);
        self.window
    }

    /// The current window in bytes.
    pub fn window(&self) -> u64 {
        self.window
    }

    fn grown(&self) -> u64 {
        if self.window == 0 {
            self.min
        } else {
            self.window.saturating_mul(2).min(self.max)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;

    fn detector() -> SequentialDetector {
        SequentialDetector::new(128 * KIB, 8 * MIB)
    }

    #[test]
    fn sequential_reads_double_the_window_up_to_the_max() {
        let mut d = detector();
        let mut windows = Vec::new();
        for i in 0..10 {
            windows.push(d.handle_read(i * 128 * KIB, 128 * KIB) / KIB);
        }
        assert_eq!(
            windows,
            [128, 256, 512, 1024, 2048, 4096, 8192, 8192, 8192, 8192]
        );
    }

    #[test]
    fn a_random_read_resets_the_window() {
        let mut d = detector();
        d.handle_read(0, 4096);
        d.handle_read(4096, 4096);
        assert_eq!(d.window(), 256 * KIB);
        assert_eq!(d.handle_read(100 * MIB, 4096), 0);
        // Reading on from the random point starts a new sequential run.
        assert_eq!(d.handle_read(100 * MIB + 4096, 4096), 128 * KIB);
    }

    #[test]
    fn a_first_read_not_at_the_start_is_random() {
        let mut d = detector();
        assert_eq!(d.handle_read(5 * MIB, 4096), 0);
    }

    #[test]
    fn backward_reads_are_random() {
        let mut d = detector();
        d.handle_read(0, 64 * KIB);
        d.handle_read(64 * KIB, 64 * KIB);
        assert_eq!(d.handle_read(0, 4096), 0);
    }

    #[test]
    fn a_small_skip_within_the_window_keeps_it() {
        let mut d = detector();
        d.handle_read(0, 128 * KIB);
        d.handle_read(128 * KIB, 128 * KIB);
        assert_eq!(d.window(), 256 * KIB);
        // The kernel had 64 KiB cached and skipped them.
        assert_eq!(d.handle_read(320 * KIB, 128 * KIB), 256 * KIB);
        // And the run continues from there.
        assert_eq!(d.handle_read(448 * KIB, 128 * KIB), 512 * KIB);
    }

    #[test]
    fn a_skip_beyond_the_window_is_random() {
        let mut d = detector();
        d.handle_read(0, 128 * KIB);
        assert_eq!(d.handle_read(128 * KIB + 129 * KIB, 4096), 0);
    }

    #[test]
    fn zero_max_turns_readahead_off() {
        let mut d = SequentialDetector::new(128 * KIB, 0);
        for i in 0..4 {
            assert_eq!(d.handle_read(i * 4096, 4096), 0);
        }
    }

    #[test]
    fn the_window_stays_within_bounds_for_any_reads() {
        // A seeded walk mixing sequential and random reads.
        let mut d = detector();
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut offset = 0;
        for _ in 0..10_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = 1 + state % (256 * KIB);
            if state.is_multiple_of(3) {
                offset = state % (64 * MIB);
            }
            let w = d.handle_read(offset, len);
            assert!(w == 0 || (128 * KIB..=8 * MIB).contains(&w), "{w}");
            offset += len;
        }
    }
}
