//! A yardstick for the simulation's figures: the symbols that an all-seeing server would
//! send, one that knew every receiver's losses as they happened.
//!
//! That server codes each object on its own, as lcfs does (K source symbols, any K of its
//! symbols decode it, one symbol a packet), and takes the objects one after another in the
//! order given. It sends each symbol of the object at hand to every receiver, with no
//! cooldown and no delay before it knows who holds what, and moves on the moment the last
//! receiver holds K. What it sends for one receiver and for N shows what coding objects
//! alone costs under a loss, whatever a scheduler does: under loss in bursts the worst of
//! fifty receivers loses a burst in nearly every block and one receiver seldom does, so
//! even this server is not flat in the receivers (`known_gap_bursty_*` in `tests/sim.rs`
//! gives the figures).
//!
//! It is a yardstick, not a lower bound: lcfs sends a block's later rounds after other
//! blocks' rounds, so a burst that took the end of a first round does not also take the
//! start of the next, and while loss comes in bursts its blocks' first rounds take turns
//! (`crate::serve::sched`), so that a burst takes a symbol of each of several blocks. It
//! can send less than this: 0.89 times its symbols for fifty receivers under 5% loss in
//! bursts of 5. The simulation gives it for
//! receivers of one file only: a tree's small files travel in bundles, and this would code
//! them file by file.
//!
//! Losses are drawn by the simulation's link model ([`Link`]) with the run's loss, from
//! generators seeded from the caller's seed: the same kind of loss as the run's receivers
//! had, not the same draws, and a figure is a function of its arguments.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::link::{Link, LinkConfig, Loss};

/// An object whose receivers are still short after this many symbols per source symbol (a
/// link that loses everything) is given up, so that the count always ends.
const GIVE_UP_PER_SOURCE: u64 = 1000;

/// Symbols the all-seeing server sends so that each of `receivers` holds K of every object,
/// for the objects' K in `ks`, in that order.
pub fn symbols_needed(loss: Loss, receivers: usize, ks: &[u32], seed: u64) -> u64 {
    let mut rng = StdRng::seed_from_u64(seed);
    let config = LinkConfig {
        loss,
        ..LinkConfig::default()
    };
    let mut links: Vec<Link> = (0..receivers.max(1))
        .map(|_| Link::new(config, rng.random()))
        .collect();
    let mut held = vec![0u32; links.len()];
    let mut sent = 0u64;
    for &k in ks {
        held.fill(0);
        let mut short = if k == 0 { 0 } else { links.len() };
        let limit = u64::from(k) * GIVE_UP_PER_SOURCE;
        let mut this = 0u64;
        while short > 0 && this < limit {
            this += 1;
            for (h, link) in held.iter_mut().zip(&mut links) {
                // Every receiver's link carries every symbol, also once it holds K: its
                // losses run on in the same chain, as on a real port.
                if !link.lost() && *h < k {
                    *h += 1;
                    short -= usize::from(*h == k);
                }
            }
        }
        sent += this;
    }
    sent
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_loss_every_source_symbol_once() {
        assert_eq!(symbols_needed(Loss::None, 100, &[1, 46, 7], 1), 54);
    }

    #[test]
    fn one_receiver_needs_k_over_one_minus_loss() {
        let ks = vec![46; 2000];
        let sent = symbols_needed(Loss::Uniform(0.2), 1, &ks, 7) as f64;
        let per = sent / (46.0 * 2000.0);
        assert!((per - 1.25).abs() < 0.02, "{per}");
    }

    /// It waits for the last receiver: two receivers losing half of what they get need the
    /// longer of two geometric waits for a one-symbol object, 8/3 symbols on average (a
    /// server that moved on with the first would send 4/3, with both 2).
    #[test]
    fn it_waits_for_the_last_receiver() {
        let ks = vec![1; 20_000];
        let per = symbols_needed(Loss::Uniform(0.5), 2, &ks, 5) as f64 / 20_000.0;
        assert!((per - 8.0 / 3.0).abs() < 0.05, "{per}");
    }

    /// Bursts at the same mean loss cost one receiver what independent loss does over a
    /// long run, and the crowd more.
    #[test]
    fn the_crowd_and_bursts_cost_more() {
        let ks = vec![46; 200];
        let need = |loss, n| symbols_needed(loss, n, &ks, 3);
        let (one, many) = (need(Loss::Uniform(0.05), 1), need(Loss::Uniform(0.05), 100));
        let bursty = need(Loss::bursty(0.05, 5.0), 100);
        assert!(one < many && many < bursty, "{one} {many} {bursty}");
        let lone_bursty = need(Loss::bursty(0.05, 5.0), 1) as f64 / (46.0 * 200.0);
        assert!((lone_bursty - 1.0 / 0.95).abs() < 0.03, "{lone_bursty}");
    }

    #[test]
    fn a_seed_gives_the_same_count() {
        let ks = vec![10; 50];
        let loss = Loss::bursty(0.1, 4.0);
        assert_eq!(
            symbols_needed(loss, 20, &ks, 9),
            symbols_needed(loss, 20, &ks, 9)
        );
    }

    #[test]
    fn a_link_that_loses_everything_ends() {
        assert_eq!(symbols_needed(Loss::Uniform(1.0), 2, &[3, 2], 1), 5000);
    }
}
