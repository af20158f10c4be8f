//! A yardstick for the simulation's figures: the symbols a server would send if it saw
//! every receiver's losses as they happened, coded each object on its own as lcfs does, and
//! sent objects one after another, each until every receiver held it.
//!
//! It sends each symbol to every receiver and moves on to the next object the moment the
//! last receiver holds K symbols of this one. That is not a strict bound: lcfs sends a
//! straggler's later rounds after other objects' rounds, so a burst that took the end of a
//! first round does not take the start of the next, and for a tree of small objects under
//! bursts lcfs sends less than this. But for a file of large blocks lcfs comes close to it
//! (at 50 to 100 receivers under 5% loss in bursts of 5, from as much to 14% more), and the
//! yardstick's own growth from one receiver to N is what coding blocks alone costs under
//! that loss, not the scheduler: the worst of a hundred receivers loses a burst of several
//! symbols in nearly every block, and one receiver rarely does (`tests/sim.rs`,
//! `known_gap_bursty_*`).
//!
//! Losses are drawn as the simulation's links draw them ([`Link`]), from generators seeded
//! from the caller's seed, so a figure is a function of its arguments.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::link::{Link, LinkConfig, Loss};

/// An object whose receivers are still short after this many symbols per source symbol (a
/// link that loses everything) is given up, so that the count always ends.
const GIVE_UP_PER_SOURCE: u64 = 1000;

/// Symbols that server sends so that each of `receivers` holds K of every object, for the
/// objects' K in `ks`, in that order.
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
                // losses run on in the same chain as on a real port.
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

    /// The worst of many receivers sets every object's count, and bursts make the worst
    /// worse at the same mean loss.
    #[test]
    fn the_crowd_and_bursts_cost_more() {
        let ks = vec![46; 200];
        let need = |loss, n| symbols_needed(loss, n, &ks, 3);
        let (one, many) = (need(Loss::Uniform(0.05), 1), need(Loss::Uniform(0.05), 100));
        let bursty = need(Loss::bursty(0.05, 5.0), 100);
        assert!(one < many && many < bursty, "{one} {many} {bursty}");
    }

    #[test]
    fn a_link_that_loses_everything_ends() {
        assert_eq!(symbols_needed(Loss::Uniform(1.0), 2, &[3, 2], 1), 5000);
    }
}
