//! A receiver's loss, measured from the symbols it gets and reported to the publisher by
//! joining one group (sans-IO).
//!
//! The publisher sizes an object's first round for its receivers' loss (`crate::serve::sched`),
//! and until now learned that loss from MLD alone: how many of an object's listeners were
//! still there after its first round. That answer is a yes or a no per receiver and object,
//! and a round sized to leave one receiver in 200 short says little either way, so a lone
//! receiver's estimate wandered for the first hundred objects: in the simulation, a 4 MiB
//! file under 20% loss cost one receiver 1.48 to 1.65 times its data by the seed (seeds 1 to
//! 40), and the test that 1000 receivers cost at most 1.15 times one receiver failed on 6
//! seeds in 40. A receiver knows its loss exactly, though: a sender sends an object's symbols
//! with consecutive ESIs, so the gaps between those it received are those it lost. It says
//! so the only way a receiver speaks to a publisher, by joining a group: one of
//! [`LOSS_LEVELS`]'s ([`crate::wire::channel::Channel::loss_address`]). With it, the same file
//! cost one receiver 1.59 to 1.67 times its data (seeds 1 to 20) and 1000 receivers 1.74,
//! and the ratio held at 1.05 to 1.10 (seeds 1 to 8; see `tests/sim.rs`).
//!
//! - [`EsiSpan`]: one fetch's symbols from one sender. It counts only what lies after the first
//!   symbol received (the ones before it were sent, or not, before anything was heard) up to
//!   [`REORDER`] slots before the last one (those may still be on their way); a fetch stops at a
//!   received symbol, and with that stopping rule the share lost among the slots counted over many
//!   fetches is the loss (a negative binomial's estimate). Every symbol from the sender counts, new
//!   to the decoder or not: with two servers sending the same ESIs, each symbol is new from one of
//!   them only. Symbols from other senders (a second server, a forger) are left out, and a span
//!   whose gaps are beyond any loss the sender sizes for is dropped, so a forger moves the report
//!   no further than a forged MLD report would.
//! - [`LossReport`]: the loss over about the last [`WINDOW`] symbols, the level to report
//!   (the nearest to the estimate plus one standard error, so that an early report errs
//!   high, where a receiver left short costs a later round; with some hysteresis so that a
//!   loss between two levels does not flap), and whether
//!   to report at all: only after [`MIN_SLOTS`] symbols were counted, and only while the
//!   receiver fetches or did within [`IDLE`], so that an idle mount does not keep telling the
//!   publisher yesterday's loss for today's receivers.

use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use crate::wire::channel::LOSS_LEVELS;
use crate::wire::fec::{Esi, ESI_LIMIT};

/// The symbols the loss is measured over (older ones weigh less, exponentially).
pub const WINDOW: f64 = 20000.0;

/// Symbols counted before a loss is reported (about two objects): at 20% loss the estimate
/// then has a standard error of four points, which the report adds.
pub const MIN_SLOTS: f64 = 100.0;

/// How long a receiver that fetches nothing keeps reporting its loss.
pub const IDLE: Duration = Duration::from_secs(10);

/// How far past the midpoint between its level and a neighbour the estimate must move before
/// the report changes, as a share of the gap between them.
const HYSTERESIS: f64 = 0.25;

/// The symbols of one fetch from one sender, by ESI, as a bitmap from `BEFORE` (64) slots
/// before the first one received.
#[derive(Clone, Debug)]
pub struct EsiSpan {
    sender: Ipv6Addr,
    /// The ESI of bit 0.
    origin: Esi,
    bits: Vec<u64>,
    /// The slot counting starts after: the first received until something was counted, then
    /// the last slot counted.
    lo: usize,
    counting: bool,
    hi: usize,
    /// A symbol fell outside what a real sender's rounds span: the span says nothing.
    wild: bool,
}

/// Slots kept before the first symbol received, for symbols that overtook earlier ones.
const BEFORE: usize = 64;

/// The most slots a span follows: a first round and later rounds of the largest objects
/// that travel in rounds stay well within it.
const MOST_SLOTS: usize = 1 << 16;

/// Slots at the end of a span that are not counted: symbols sent just before the last one
/// received may still be on their way when the fetch ends (the simulation's links reorder
/// close packets, and so may a real one), and their gaps are not losses.
pub const REORDER: usize = 8;

impl EsiSpan {
    /// A span that starts with symbol `esi` from `sender`.
    pub fn new(sender: Ipv6Addr, esi: Esi) -> EsiSpan {
        let origin = Esi((esi.0 % ESI_LIMIT + ESI_LIMIT - BEFORE as u32) % ESI_LIMIT);
        let mut span = EsiSpan {
            sender,
            origin,
            bits: vec![0; BEFORE / 64 + 1],
            lo: BEFORE,
            counting: false,
            hi: BEFORE,
            wild: false,
        };
        span.set(BEFORE);
        span
    }

    /// Symbol `esi` came from `sender`.
    pub fn push(&mut self, sender: Ipv6Addr, esi: Esi) {
        if sender != self.sender || self.wild {
            return;
        }
        // ESIs wrap at 24 bits.
        let at = (esi.0.wrapping_sub(self.origin.0) % ESI_LIMIT) as usize;
        if at >= MOST_SLOTS {
            // Before the origin (it wrapped) or far beyond any round: not a real sender's.
            self.wild = at < ESI_LIMIT as usize - (ESI_LIMIT as usize - MOST_SLOTS) / 2;
            return;
        }
        if self.bits.len() <= at / 64 {
            self.bits.resize(at / 64 + 1, 0);
        }
        self.set(at);
        if !self.counting {
            self.lo = self.lo.min(at);
        }
        self.hi = self.hi.max(at);
    }

    fn set(&mut self, at: usize) {
        self.bits[at / 64] |= 1 << (at % 64);
    }

    fn has(&self, at: usize) -> bool {
        self.bits[at / 64] & (1 << (at % 64)) != 0
    }

    /// Slots that [`EsiSpan::take_runs`] would count now.
    pub fn countable(&self) -> usize {
        self.hi.saturating_sub(REORDER).saturating_sub(self.lo)
    }

    /// [`EsiSpan::take_runs`] without the runs.
    #[cfg(test)]
    pub fn take_counted(&mut self) -> Option<(u64, u64)> {
        self.take_runs().map(|(slots, lost, _)| (slots, lost))
    }

    /// (slots, lost, runs): the ESIs after the first one received (or the last counted) up
    /// to [`REORDER`] before the last, how many of them never came, and how many runs those
    /// form (a run: lost slots one after another; its mean length tells bursts from
    /// independent loss), which are counted now; None when the span is not believable.
    pub fn take_runs(&mut self) -> Option<(u64, u64, u64)> {
        if self.wild {
            return None;
        }
        let end = self.hi.saturating_sub(REORDER);
        if end <= self.lo {
            return Some((0, 0, 0));
        }
        let slots = (end - self.lo) as u64;
        // A run starts at a lost slot after a received one; the slot at `lo` was counted
        // before, so a run that spans two countings counts once.
        let (mut received, mut runs) = (0u64, 0u64);
        let mut before = self.has(self.lo);
        for at in self.lo + 1..=end {
            let has = self.has(at);
            received += u64::from(has);
            runs += u64::from(!has && before);
            before = has;
        }
        self.lo = end;
        self.counting = true;
        // Sized at most for 30% loss, a real sender's rounds leave fewer gaps than this.
        if slots > 4 * received + 64 {
            self.wild = true;
            return None;
        }
        Some((slots, slots - received, runs))
    }
}

/// What a receiver measured and reports.
#[derive(Debug)]
pub struct LossReport {
    slots: f64,
    lost: f64,
    /// Runs of lost slots, weighed as `slots` and `lost` are.
    runs: f64,
    /// The level the estimate stands at (with hysteresis), once it may be reported.
    level: Option<usize>,
    /// When the receiver last fetched.
    busy: Option<Instant>,
}

impl Default for LossReport {
    fn default() -> Self {
        LossReport::new()
    }
}

impl LossReport {
    pub fn new() -> LossReport {
        LossReport {
            slots: 0.0,
            lost: 0.0,
            runs: 0.0,
            level: None,
            busy: None,
        }
    }

    /// Counts what `span` received since it was last counted; true if the level to report
    /// changed.
    pub fn handle_span(&mut self, span: &mut EsiSpan) -> bool {
        let Some((slots, lost, runs)) = span.take_runs().filter(|&(slots, ..)| slots > 0) else {
            return false;
        };
        let keep = (-(slots as f64) / WINDOW).exp();
        self.slots = self.slots * keep + slots as f64;
        self.lost = self.lost * keep + lost as f64;
        self.runs = self.runs * keep + runs as f64;
        if self.slots >= MIN_SLOTS {
            let p = self.lost / self.slots;
            let loss = 1000.0 * (p + (p * (1.0 - p) / self.slots).sqrt());
            let level = Some(level_for(loss, self.level));
            return std::mem::replace(&mut self.level, level) != level;
        }
        false
    }

    /// The receiver is fetching at `now`.
    pub fn handle_busy(&mut self, now: Instant) {
        self.busy = Some(now);
    }

    /// When [`LossReport::poll_level`] next changes by itself: the end of the report of a
    /// receiver that stopped fetching.
    pub fn poll_timeout(&self) -> Option<Instant> {
        Some(self.busy? + IDLE).filter(|_| self.level.is_some())
    }

    /// The level whose group should be joined at `now`, if any.
    pub fn poll_level(&self, now: Instant) -> Option<usize> {
        let busy = self.busy?;
        (now.saturating_duration_since(busy) < IDLE).then_some(self.level?)
    }

    /// The loss measured, as a share, once enough was counted.
    pub fn loss(&self) -> Option<f64> {
        (self.slots >= MIN_SLOTS).then(|| self.lost / self.slots)
    }

    /// The mean length of a run of lost symbols, once enough was counted and something was
    /// lost: about 1 / (1 - p) under independent loss p (1.25 at 20%), the mean burst
    /// under loss in bursts.
    pub fn mean_run(&self) -> Option<f64> {
        (self.slots >= MIN_SLOTS && self.runs > 0.0).then(|| self.lost / self.runs)
    }
}

/// The level for a loss of `per_mille`, staying at `current` unless the loss moved past the
/// midpoint to a neighbour by [`HYSTERESIS`] of the gap.
fn level_for(per_mille: f64, current: Option<usize>) -> usize {
    let nearest = (0..LOSS_LEVELS.len())
        .min_by(|&a, &b| {
            let d = |l: usize| (f64::from(LOSS_LEVELS[l]) - per_mille).abs();
            d(a).total_cmp(&d(b))
        })
        .unwrap_or(0);
    let Some(c) = current.filter(|&c| c < LOSS_LEVELS.len() && c != nearest) else {
        return nearest;
    };
    let toward = if nearest > c { c + 1 } else { c - 1 };
    let (at, next) = (f64::from(LOSS_LEVELS[c]), f64::from(LOSS_LEVELS[toward]));
    let threshold = at + (next - at) * (0.5 + HYSTERESIS);
    let past = if next > at {
        per_mille >= threshold
    } else {
        per_mille <= threshold
    };
    if past {
        nearest
    } else {
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    const A: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
    const B: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 2);

    fn span(sender: Ipv6Addr, esis: &[u32]) -> EsiSpan {
        let mut s = EsiSpan::new(sender, Esi(esis[0]));
        for &e in &esis[1..] {
            s.push(sender, Esi(e));
        }
        s
    }

    /// `n` symbols in order after `esis`, so that the end's [`REORDER`] slots fall on them.
    fn tail(esis: &[u32], n: u32) -> Vec<u32> {
        let last = *esis.last().unwrap();
        esis.iter()
            .copied()
            .chain((1..=n).map(|i| last + i))
            .collect()
    }

    #[test]
    fn a_span_counts_the_gaps_after_its_first_symbol() {
        let r = REORDER as u32;
        assert_eq!(
            span(A, &tail(&[10, 11, 13, 14], r)).take_counted(),
            Some((4, 1))
        );
        assert_eq!(span(A, &[10]).take_counted(), Some((0, 0)));
        // Reordered: one before the first received.
        assert_eq!(span(A, &tail(&[10, 8, 12], r)).take_counted(), Some((4, 2)));
        // Gaps among the last few slots may be symbols still on their way.
        assert_eq!(
            span(A, &[0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11]).take_counted(),
            Some((3, 0))
        );
    }

    #[test]
    fn runs_of_lost_symbols_are_counted_once_across_countings() {
        let r = REORDER as u32;
        // Lost: 3 and 4 (one run), 7 (another).
        let mut s = span(A, &tail(&[0, 1, 2, 5, 6, 8], r));
        assert_eq!(s.take_runs(), Some((8, 3, 2)));
        // A run that spans two countings (lost 5 to 17, counted up to 10, then on) is one.
        let mut s = span(A, &[0, 1, 2, 3, 4, 18]);
        assert_eq!(s.take_runs(), Some((10, 6, 1)), "1 to 10: 5 to 10 lost");
        for e in 19..=30 {
            s.push(A, Esi(e));
        }
        assert_eq!(
            s.take_runs(),
            Some((12, 7, 0)),
            "11 to 22: 11 to 17 lost, no new run"
        );
        let mut report = LossReport::new();
        let mut bursty = span(A, &[0]);
        for e in (1..400).filter(|e| e % 20 >= 5) {
            bursty.push(A, Esi(e));
        }
        report.handle_span(&mut bursty);
        let run = report.mean_run().expect("counted");
        assert!((run - 5.0).abs() < 0.1, "{run}");
    }

    #[test]
    fn a_span_is_counted_as_it_grows_and_each_slot_once() {
        let mut s = span(A, &[0, 1, 3]);
        assert_eq!(
            s.take_counted(),
            Some((0, 0)),
            "all within the reorder allowance"
        );
        for e in 4..=12 {
            s.push(A, Esi(e));
        }
        assert_eq!(s.take_counted(), Some((4, 1)), "1 to 4");
        assert_eq!(s.take_counted(), Some((0, 0)));
        s.push(A, Esi(2)); // came late: it was counted lost already
        for e in [14, 15, 16, 17, 18, 19, 20, 21, 22] {
            s.push(A, Esi(e));
        }
        assert_eq!(s.take_counted(), Some((10, 1)), "5 to 14");
    }

    #[test]
    fn a_span_wraps_with_the_esis() {
        let mut s = span(
            A,
            &tail(&[ESI_LIMIT - 2, ESI_LIMIT - 1, 1, 2], REORDER as u32),
        );
        assert_eq!(s.take_counted(), Some((4, 1)));
    }

    #[test]
    fn another_senders_symbols_do_not_count() {
        let mut s = span(A, &tail(&[0, 1, 2], REORDER as u32));
        s.push(B, Esi(5000));
        assert_eq!(s.take_counted(), Some((2, 0)));
    }

    #[test]
    fn a_span_beyond_any_real_loss_is_dropped() {
        let mut r = LossReport::new();
        for _ in 0..100 {
            r.handle_span(&mut span(A, &[0, 1, 2, 9000]));
            r.handle_span(&mut span(A, &[1000, 1001, 1002, 100_000]));
            r.handle_span(&mut span(A, &[1000, 1001, 1002, 100]));
        }
        assert_eq!(r.loss(), None);
        // Hostile ESIs: any u32, never a panic.
        let mut s = span(A, &[u32::MAX]);
        for e in [0, u32::MAX - 1, ESI_LIMIT, 7] {
            s.push(A, Esi(e));
        }
        let _ = s.take_counted();
    }

    /// Fetches of `k` symbols each that stop at their K-th, on a link losing `loss`.
    fn measure(r: &mut LossReport, rng: &mut rand::rngs::StdRng, loss: f64, k: u32, n: usize) {
        for _ in 0..n {
            let mut esi = rng.random_range(0..ESI_LIMIT);
            while rng.random_bool(loss) {
                esi = (esi + 1) % ESI_LIMIT;
            }
            let mut s = EsiSpan::new(A, Esi(esi));
            for _ in 1..k {
                esi = (esi + 1) % ESI_LIMIT;
                while rng.random_bool(loss) {
                    esi = (esi + 1) % ESI_LIMIT;
                }
                s.push(A, Esi(esi));
            }
            r.handle_span(&mut s);
        }
    }

    #[test]
    fn the_report_finds_the_loss_of_the_link() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for (loss, level) in [(0.0, 0), (0.01, 10), (0.05, 50), (0.2, 200), (0.3, 300)] {
            let mut r = LossReport::new();
            measure(&mut r, &mut rng, loss, 46, 1);
            assert_eq!(r.loss(), None, "too few symbols to tell");
            measure(&mut r, &mut rng, loss, 46, 200);
            let got = LOSS_LEVELS[r.level.unwrap()];
            assert!(got.abs_diff(level) <= 20, "{loss}: level {got}");
        }
    }

    #[test]
    fn the_report_follows_a_change_of_the_link() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        let mut r = LossReport::new();
        measure(&mut r, &mut rng, 0.2, 46, 200);
        // Within a few windows (about 38 slots counted an object).
        measure(&mut r, &mut rng, 0.0, 46, 2000);
        assert!(LOSS_LEVELS[r.level.unwrap()] <= 5, "{:?}", r.loss());
    }

    #[test]
    fn a_loss_between_two_levels_does_not_flap() {
        // 70 per mille is the midpoint of 60 and 80.
        let mut level = level_for(60.0, None);
        assert_eq!(LOSS_LEVELS[level], 60);
        for x in [69.0, 71.0, 74.0, 66.0, 70.0] {
            level = level_for(x, Some(level));
            assert_eq!(LOSS_LEVELS[level], 60, "{x}");
        }
        level = level_for(76.0, Some(level));
        assert_eq!(LOSS_LEVELS[level], 80);
        level = level_for(66.0, Some(level));
        assert_eq!(LOSS_LEVELS[level], 80);
        level = level_for(64.0, Some(level));
        assert_eq!(LOSS_LEVELS[level], 60);
        // A jump goes straight to the nearest level.
        assert_eq!(LOSS_LEVELS[level_for(250.0, Some(level))], 240);
        assert_eq!(LOSS_LEVELS[level_for(900.0, Some(0))], 300);
    }

    #[test]
    fn an_idle_receiver_stops_reporting() {
        let t0 = Instant::now();
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut r = LossReport::new();
        measure(&mut r, &mut rng, 0.1, 46, 50);
        assert_eq!(r.poll_level(t0), None, "not fetching yet");
        r.handle_busy(t0);
        assert!(r.poll_level(t0 + IDLE / 2).is_some());
        assert_eq!(r.poll_level(t0 + IDLE), None);
    }
}
