//! The receivers' loss, as the first rounds are sized for it: reported by the receivers
//! when they do, else learned from MLD alone.
//!
//! Receivers report their loss by joining one group of [`LOSS_LEVELS`] (`crate::fetch::loss`
//! says how they measure it). The tracker counts each level's listeners (at most 64 each),
//! and a first round is the least that leaves at most [`target_share`] of the reporting
//! receivers short, each at its own level's loss: a receiver at 20% among many at none gets
//! later rounds rather than everyone a fifth more. A report is taken as it is, capped at
//! `max_loss`: anyone on the link can forge an MLD report, and the most a forged one costs is
//! what a real receiver at `max_loss` would.
//!
//! Without reports (receivers of an older version, or none measured yet) the loss is learned
//! as before ([`LossEstimate`]). The learned estimate alone let a lone receiver's first
//! rounds wander by the seed: a round aimed at a 0.5% tail answers yes or no and rarely no,
//! and one lucky early object held the estimate low for the rest of a 64-block file. In the
//! simulation (4 MiB file, 20% loss), one receiver cost 1.48 to 1.65 times its data at seeds
//! 1 to 40 and 1000 receivers 1.77 to 1.78, so their ratio, meant to stay within 1.15, came
//! to 1.20 at some seeds. With reports one receiver costs 1.59 to 1.67 (seeds 1 to 20) and
//! 1000 receivers 1.74, a ratio of 1.05 to 1.10 (seeds 1 to 8); 5% loss at 1000 receivers
//! went from 1.08 to 1.12 to 1.05 to 1.09 (seeds 1 to 4), and a clean link costs what it did.

use std::collections::HashMap;

use crate::wire::channel::LOSS_LEVELS;

/// What first rounds are sized for.
pub(super) struct Loss {
    learned: LossEstimate,
    max: f64,
    /// Listeners of each level's group.
    reported: [usize; LOSS_LEVELS.len()],
    /// First rounds by K for the reports as they stand (emptied when they change).
    sized: HashMap<u32, u32>,
    /// Loss comes in bursts ([`Loss::bursty`]).
    bursty: bool,
}

impl Loss {
    pub(super) fn new(start: f64, max: f64) -> Loss {
        Loss {
            learned: LossEstimate::new(start, max),
            max: max.clamp(0.0, 0.9),
            reported: [0; LOSS_LEVELS.len()],
            sized: HashMap::new(),
            bursty: false,
        }
    }

    /// `still` of the `of` listeners an object of `k` symbols had during its first round of
    /// `first` symbols are still there after it.
    pub(super) fn observe(&mut self, k: u32, first: u32, still: usize, of: usize) {
        self.learned.observe(k, first, still, of);
        self.judge_bursts();
    }

    /// `listeners` now report loss level `level` (out of range: ignored).
    pub(super) fn handle_reported(&mut self, level: usize, listeners: usize) {
        if let Some(n) = self.reported.get_mut(level) {
            if *n != listeners {
                *n = listeners;
                self.sized.clear();
                self.judge_bursts();
            }
        }
    }

    /// The loss learned from MLD alone.
    pub(super) fn learned(&self) -> f64 {
        self.learned.loss
    }

    /// Loss comes in bursts: first rounds sent whole leave far more receivers short than
    /// independent loss at the rate they report would. A burst takes several symbols of
    /// one round at once, which a margin sized for the mean does not cover, so the loss
    /// learned from those rounds climbs well above the reported one: 0.09 to 0.12 against
    /// 0.05 to 0.08 for one receiver and 0.11 to 0.14 against 0.05 to 0.056 for a hundred or
    /// a thousand (5% in bursts of 5), while independent loss keeps them together (0.06
    /// against 0.055 at 5%, 0.18 to 0.20 against 0.20 to 0.21 at 20%). Only with reports,
    /// and only once the learned loss rests on [`MIN_EVIDENCE`] listeners and [`MIN_SHORT`]
    /// of them short: it starts at a guess.
    pub(super) fn bursty(&self) -> bool {
        self.bursty
    }

    /// Loss turns bursty when the learned loss is [`BURSTY`] times the reported mean and
    /// [`BURSTY_GAP`] above it, and stays so until it is less than half as far above: the
    /// learned loss moves in steps of a point, and one object more or less short must not
    /// turn rounds whole and back.
    fn judge_bursts(&mut self) {
        let (n, mean) = self.reported();
        let learned = self.learned.loss;
        let (times, gap) = match self.bursty {
            false => (BURSTY, BURSTY_GAP),
            true => (1.0 + (BURSTY - 1.0) / 2.0, BURSTY_GAP / 2.0),
        };
        self.bursty = n > 0
            && self.max > 0.0
            && self.learned.evidence >= MIN_EVIDENCE
            && self.learned.shorts >= MIN_SHORT
            && learned >= times * mean
            && learned - mean >= gap;
    }

    /// How many receivers report, and the mean of what they report.
    pub(super) fn reported(&self) -> (usize, f64) {
        let n: usize = self.reported.iter().sum();
        let sum: f64 = self
            .reported
            .iter()
            .zip(LOSS_LEVELS)
            .map(|(&c, l)| c as f64 * f64::from(l) / 1000.0)
            .sum();
        (n, if n == 0 { 0.0 } else { sum / n as f64 })
    }

    /// The first round of an object of `k` symbols. K source symbols always decode (the code
    /// is systematic); the rest covers loss.
    pub(super) fn first_round(&mut self, k: u32) -> u32 {
        if self.reported.iter().all(|&n| n == 0) || self.max <= 0.0 {
            return first_round_for(k, self.learned.loss, target_share(k));
        }
        if let Some(&n) = self.sized.get(&k) {
            return n;
        }
        let n = first_round_for_reports(k, &self.reported, self.max, target_share(k));
        self.sized.insert(k, n);
        n
    }
}

/// The least first round that leaves at most a share `short` of the receivers `reported`
/// (listeners per level of [`LOSS_LEVELS`], losses capped at `max`) with fewer than K.
fn first_round_for_reports(k: u32, reported: &[usize], max: f64, short: f64) -> u32 {
    let total: usize = reported.iter().sum();
    let levels: Vec<(f64, f64)> = reported
        .iter()
        .zip(LOSS_LEVELS)
        .filter(|(&c, _)| c > 0)
        .map(|(&c, l)| ((f64::from(l) / 1000.0).min(max), c as f64 / total as f64))
        .collect();
    let left_short = |n: u32| -> f64 {
        levels
            .iter()
            .map(|&(p, w)| match p > 0.0 {
                true => w * short_share(n, k, p),
                false => w * f64::from(u8::from(n < k)),
            })
            .sum()
    };
    // Enough for every level alone, so enough for the mix; the share left short falls as
    // the round grows, so the least enough is found by bisection.
    let worst = levels.iter().map(|&(p, _)| p).fold(0.0, f64::max);
    let (mut lo, mut hi) = (k, first_round_for(k, worst, short).max(k));
    if left_short(hi) > short {
        return hi;
    }
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if left_short(mid) <= short {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    hi
}

/// Listeners' first rounds (an object's listeners each count, each object weighing less by
/// [`DECAY`] per object after it) the learned loss must rest on before it says that loss
/// comes in bursts: ten objects of a lone receiver, the first object of ten or more.
const MIN_EVIDENCE: f64 = 10.0;

/// Listeners left short (weighed like the evidence) before the learned loss may say that
/// loss comes in bursts. A lone receiver answers each object yes or no, and one object it
/// was short of among fifty took the learned loss from 0.02 to 0.08 under independent loss
/// of 5%, which read as bursts (a 2,000-file tree, seed 9).
const MIN_SHORT: f64 = 3.0;

/// How many times the reported loss the learned one must be, and by how much above it at
/// least, for loss to count as bursty ([`Loss::bursty`]). A crowd under bursts is at twice
/// or more; independent loss came to 1.4 and 1.5 times, 0.02 and 0.026 above, for a lone
/// receiver early in a tree (its first objects sized before it reported) and for receivers
/// starting over 10 s (some short for joining late), which 1.4 and 0.02 read as bursts.
const BURSTY: f64 = 1.6;
const BURSTY_GAP: f64 = 0.03;

/// The receivers' loss, learned from the share of an object's listeners still there after
/// its first round, and the first round it calls for.
///
/// The share is what one receiver's loss decides, whatever their number, so one receiver
/// and a thousand get the same first round and differ only in the later rounds of the
/// unlucky few. (Counting objects that still had *any* listener, as before, learned the
/// worst of N receivers: at 1000 receivers the margin climbed to its ceiling, and at 20%
/// loss a 4 MiB file cost 2.4 times one receiver's bytes.)
///
/// A first round of `n` symbols leaves a receiver that loses a share `p` of them with fewer
/// than K with probability P(Binomial(n, 1 - p) < K). Each object's first round is an
/// experiment: `of` listeners, `still` of them short. The estimate is the loss of greatest
/// likelihood over recent objects (older ones weigh less by `DECAY` per object), on a grid
/// of `GRID_STEP`. A controller nudged by each object's share moved as the share, and a
/// copy's 32 objects in flight made a burst of early shares push it to its ceiling; a
/// likelihood weighs each object by what it shows, and a lone receiver's one short
/// object among many says little. Of equally likely losses the least is taken: a run of
/// objects all short says only that the loss is at least so much. (The posterior mean
/// instead never came down on a clean link: rounds sized for a loss say nothing against
/// it when nobody is short, and a file without loss cost 1.18 times its data.)
///
/// The first round is then sized so that [`target_share`] of receivers are left short.
/// The aim is lower for small objects: a later round is at least two symbols and a
/// cooldown, dear beside a first round of a few, and at 1000 receivers even a small share
/// is a later round for nearly every object; a few more symbols for everyone cost less.
pub(super) struct LossEstimate {
    /// Log-likelihood of loss `i * GRID_STEP`, for each grid point up to `max`.
    likelihood: Vec<f64>,
    pub(super) loss: f64,
    /// Listeners of the objects observed, and those of them left short, each object weighing
    /// less by `DECAY` per object after it.
    evidence: f64,
    shorts: f64,
    /// ln P(short) and ln P(whole) at each grid point, by (K, first round): objects of one
    /// size share them, and computing them took a twentieth of a serve's CPU time with a
    /// tree of small files. At most [`TERMS_KEPT`] entries.
    terms: HashMap<(u32, u32), Vec<(f64, f64)>>,
}

/// Entries of [`LossEstimate::terms`] kept before they are forgotten all at once.
const TERMS_KEPT: usize = 256;

/// The grid of losses the estimate chooses from.
const GRID_STEP: f64 = 0.01;

/// How much less each object's evidence weighs, per object observed after it.
const DECAY: f64 = 0.98;

/// The share of receivers a first round of a block of 64 KiB (46 symbols) or more aims to
/// leave short. In the simulation (4 MiB, 1000 receivers against one, 20% loss, seeds 1 to
/// 4 and 11) 1% with four root copies gave 1.15 to 1.25, 0.5% with six 1.09 to 1.24; what
/// 0.5% costs one receiver under 5% loss is about 2% more bytes.
const TARGET_SHARE: f64 = 0.005;

/// [`TARGET_SHARE`] for an object of `k` symbols: less in proportion below 46, at least
/// 0.05%.
fn target_share(k: u32) -> f64 {
    (TARGET_SHARE * f64::from(k) / 46.0).clamp(0.0005, TARGET_SHARE)
}

impl LossEstimate {
    pub(super) fn new(start: f64, max: f64) -> LossEstimate {
        let points = (max.clamp(0.0, 0.9) / GRID_STEP).round() as usize + 1;
        LossEstimate {
            likelihood: vec![0.0; points],
            loss: start.clamp(0.0, max.max(0.0)),
            evidence: 0.0,
            shorts: 0.0,
            terms: HashMap::new(),
        }
    }

    /// `still` of the `of` listeners an object of `k` symbols had during its first round of
    /// `first` symbols are still there after it.
    pub(super) fn observe(&mut self, k: u32, first: u32, still: usize, of: usize) {
        if self.likelihood.len() < 2 {
            return;
        }
        let of = of.max(1);
        self.evidence = DECAY * self.evidence + of as f64;
        self.shorts = DECAY * self.shorts + still.min(of) as f64;
        let (short, whole) = (still.min(of) as f64, (of - still.min(of)) as f64);
        if self.terms.len() >= TERMS_KEPT {
            self.terms.clear();
        }
        let points = self.likelihood.len();
        let terms = self.terms.entry((k, first)).or_insert_with(|| {
            let ln = |x: f64| x.max(1e-300).ln();
            (0..points)
                .map(|i| {
                    let miss = match i {
                        0 => f64::from(u8::from(first < k)),
                        _ => short_share(first, k, i as f64 * GRID_STEP),
                    };
                    (ln(miss), ln(1.0 - miss))
                })
                .collect()
        });
        let mut best = (f64::NEG_INFINITY, 0.0);
        for (i, (l, &(ln_short, ln_whole))) in
            self.likelihood.iter_mut().zip(terms.iter()).enumerate()
        {
            *l = DECAY * *l + short * ln_short + whole * ln_whole;
            if *l > best.0 + 1e-6 {
                best = (*l, i as f64 * GRID_STEP);
            }
        }
        self.loss = best.1;
    }
}

/// The least `n` for which a receiver that loses a share `loss` of `n` symbols misses K
/// with probability `short` at most. The normal approximation to the binomial (with a
/// continuity correction), n q - z sqrt(n p q) >= K - 1/2, a quadratic in sqrt(n), gives a
/// start; for blocks and small objects the exact tail then moves it to the least `n`, as
/// the binomial is skewed where K is small (one symbol at 1% loss: n = 2, not 1).
fn first_round_for(k: u32, loss: f64, short: f64) -> u32 {
    if loss <= 0.0 || k == 0 {
        return k;
    }
    let (p, q) = (loss.min(0.9), 1.0 - loss.min(0.9));
    let z = normal_quantile(short);
    let spread = z * (p * q).sqrt();
    let root = (spread + (spread * spread + 4.0 * q * (f64::from(k) - 0.5)).sqrt()) / (2.0 * q);
    let most = k.saturating_mul(8).saturating_add(16);
    let mut n = ((root * root).ceil() as u32).clamp(k, most);
    if k <= EXACT_UP_TO {
        while n < most && short_share(n, k, p) > short {
            n += 1;
        }
        while n > k && short_share(n - 1, k, p) <= short {
            n -= 1;
        }
    }
    n
}

/// Objects up to this K get their first round from the exact binomial tail.
const EXACT_UP_TO: u32 = 256;

/// P(Binomial(n, 1 - p) < k): a receiver losing a share `p` of `n` symbols gets fewer than
/// `k`. Summed in logarithms, as p^n underflows.
fn short_share(n: u32, k: u32, p: f64) -> f64 {
    let (ln_p, ln_odds) = (p.ln(), ((1.0 - p) / p).ln());
    let mut ln_term = f64::from(n) * ln_p; // exactly 0 of n received
    let mut sum = 0.0;
    for i in 0..k.min(n + 1) {
        sum += ln_term.exp();
        ln_term += (f64::from(n - i) / f64::from(i + 1)).ln() + ln_odds;
    }
    sum
}

/// z with P(Z > z) = `tail` for a standard normal Z, 0 < tail <= 1/2 (Abramowitz and
/// Stegun 26.2.23, within 4.5e-4).
fn normal_quantile(tail: f64) -> f64 {
    let t = (-2.0 * tail.clamp(1e-12, 0.5).ln()).sqrt();
    t - (2.515517 + 0.802853 * t + 0.010328 * t * t)
        / (1.0 + 1.432788 * t + 0.189269 * t * t + 0.001308 * t * t * t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_rounds_leave_about_the_target_share_short() {
        // Exact below EXACT_UP_TO; above, the normal approximation against the exact tail.
        let short = short_share;
        for k in [1, 2, 5, 12, 46, 200, 1000] {
            for p in [0.01, 0.05, 0.2, 0.4] {
                let target = target_share(k);
                let n = first_round_for(k, p, target);
                let got = short(n, k, p);
                assert!(
                    got <= target * 3.0,
                    "k {k} p {p}: n {n} leaves {got} short, aim {target}"
                );
                if n > k {
                    let fewer = short(n - 1, k, p);
                    assert!(
                        fewer > target / 3.0,
                        "k {k} p {p}: n {n} is more than needed ({fewer})"
                    );
                }
            }
        }
        assert_eq!(first_round_for(46, 0.0, 0.01), 46);
    }

    fn level(per_mille: u16) -> usize {
        LOSS_LEVELS.iter().position(|&l| l == per_mille).unwrap()
    }

    /// A fresh estimate (2% at the start, at most 30%) with `reports`: (per mille, listeners).
    fn with_reports(reports: &[(u16, usize)]) -> Loss {
        let mut loss = Loss::new(0.02, 0.3);
        for &(per_mille, listeners) in reports {
            loss.handle_reported(level(per_mille), listeners);
        }
        loss
    }

    #[test]
    fn reports_size_first_rounds_whatever_was_learned() {
        let mut loss = Loss::new(0.02, 0.3);
        let learned = loss.first_round(46);
        loss.handle_reported(level(200), 1);
        let reported = loss.first_round(46);
        assert_eq!(reported, first_round_for(46, 0.2, target_share(46)));
        assert!(reported > learned + 10, "{learned} {reported}");
        // Everyone gone: back to what was learned.
        loss.handle_reported(level(200), 0);
        assert_eq!(loss.first_round(46), learned);
        // No loss reported: K.
        loss.handle_reported(level(0), 3);
        assert_eq!(loss.first_round(46), 46);
    }

    #[test]
    fn a_lossy_few_among_many_clean_receivers_get_later_rounds_not_everyone_a_margin() {
        let mut loss = with_reports(&[(0, 64), (200, 1)]);
        let n = loss.first_round(46);
        assert!(n < first_round_for(46, 0.2, target_share(46)) - 5, "{n}");
        // Half of them lossy: the round must cover the lossy half's tail.
        loss.handle_reported(level(200), 64);
        let n = loss.first_round(46);
        let alone = first_round_for(46, 0.2, target_share(46));
        assert!(n + 3 >= alone && n <= alone, "{n} against {alone}");
    }

    /// A host that forges a report of the highest level beside receivers that lose nothing
    /// (the README's figure): first rounds grow, but never beyond what a real receiver at
    /// that loss would cost.
    #[test]
    fn one_forged_report_among_clean_ones_costs_at_most_a_lossy_receiver() {
        let n = with_reports(&[(0, 64), (300, 1)]).first_round(46);
        assert!(n <= first_round_for(46, 0.3, target_share(46)));
        assert!((60..=70).contains(&n), "{n}");
    }

    #[test]
    fn reports_never_size_beyond_the_most_loss_allowed() {
        let mut loss = Loss::new(0.02, 0.1);
        loss.handle_reported(level(300), 5);
        assert_eq!(
            loss.first_round(46),
            first_round_for(46, 0.1, target_share(46))
        );
        let mut none = Loss::new(0.02, 0.0);
        none.handle_reported(level(300), 5);
        assert_eq!(none.first_round(46), 46, "no margin at all");
        // Out of range: ignored.
        none.handle_reported(LOSS_LEVELS.len(), 5);
        none.handle_reported(usize::MAX, 5);
    }

    #[test]
    fn a_report_mix_is_sized_between_its_levels() {
        for k in [1, 3, 46, 300] {
            let lo = first_round_for(k, 0.05, target_share(k));
            let hi = first_round_for(k, 0.2, target_share(k));
            let reported = [(level(50), 10), (level(200), 10)];
            let mut counts = [0; LOSS_LEVELS.len()];
            for (l, c) in reported {
                counts[l] = c;
            }
            let n = first_round_for_reports(k, &counts, 0.3, target_share(k));
            assert!(lo <= n && n <= hi, "k {k}: {lo} <= {n} <= {hi}");
        }
    }

    /// `objects` blocks' first rounds, sized for the reports, each leaving `short` of `of`
    /// listeners without K.
    fn rounds_leaving_short(loss: &mut Loss, objects: usize, short: usize, of: usize) {
        for _ in 0..objects {
            let first = loss.first_round(46);
            loss.observe(46, first, short, of);
        }
    }

    #[test]
    fn bursts_are_told_from_independent_loss() {
        // Rounds sized for the reported 5% that leave three receivers in ten short: the
        // loss is far worse within a round than on average, so it comes in bursts.
        let mut bursty = with_reports(&[(50, 10)]);
        rounds_leaving_short(&mut bursty, 3, 3, 10);
        assert!(bursty.bursty(), "learned {}", bursty.learned());
        // A lone receiver's objects are one listener each: ten say as much as one of ten.
        let mut lone = with_reports(&[(50, 1)]);
        rounds_leaving_short(&mut lone, 8, 1, 1);
        assert!(!lone.bursty(), "too few objects to say");
        rounds_leaving_short(&mut lone, 4, 1, 1);
        assert!(lone.bursty(), "learned {}", lone.learned());
        // One object short among fifty moves a lone receiver's learned loss far, but one
        // object says little.
        let mut lucky = with_reports(&[(50, 1)]);
        rounds_leaving_short(&mut lucky, 49, 0, 1);
        rounds_leaving_short(&mut lucky, 1, 1, 1);
        assert!(lucky.learned() >= 0.07, "learned {}", lucky.learned());
        assert!(!lucky.bursty());
        // Rounds that leave a share short near what was aimed for: independent loss.
        let mut independent = with_reports(&[(50, 10)]);
        rounds_leaving_short(&mut independent, 40, 0, 10);
        assert!(!independent.bursty(), "learned {}", independent.learned());
        // Without reports there is nothing to weigh the learned loss against.
        let mut unreported = with_reports(&[]);
        rounds_leaving_short(&mut unreported, 40, 3, 10);
        assert!(!unreported.bursty());
        // Between the two thresholds (reported 5%: in from 8%, out below 6.5%) it stays as
        // it was, so that a learned loss a point either way does not flip it.
        let mut edge = with_reports(&[(50, 10)]);
        rounds_leaving_short(&mut edge, 20, 3, 10);
        for (learned, want) in [(0.07, true), (0.06, false), (0.07, false), (0.085, true)] {
            edge.learned.loss = learned;
            edge.judge_bursts();
            assert_eq!(edge.bursty(), want, "at {learned}");
        }
    }
}
