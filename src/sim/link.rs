//! The links of the simulated network: what happens to one packet between the bridge and a
//! receiver (seeded loss, delay, jitter, duplication), and between a receiver and the server.
//!
//! Loss is uniform or bursty. Bursty loss is the Gilbert-Elliott model: a two-state Markov
//! chain (good, bad) stepped once per packet, each state with its own loss probability, so
//! that losses come in runs as on a congested or radio link. Reordering is not a separate
//! knob: it comes from jitter, each copy delayed by `delay` plus a uniform draw below
//! `jitter`, so packets sent closer together than the jitter may arrive swapped.
//!
//! Invariant: every draw comes from the link's own seeded generator, in packet order, so a
//! run is a function of its seed.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How a downlink loses packets.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Loss {
    None,
    /// Each packet is lost with this probability, independently.
    Uniform(f64),
    /// Gilbert-Elliott: per packet, good -> bad with `enter_bad`, bad -> good with
    /// `leave_bad`; a packet is lost with `loss_good` or `loss_bad` by the state it meets.
    Bursty {
        enter_bad: f64,
        leave_bad: f64,
        loss_good: f64,
        loss_bad: f64,
    },
}

impl Loss {
    /// Bursty loss averaging `rate` over a long run, in bursts of `burst` packets on
    /// average (every packet of a burst lost, none between bursts).
    pub fn bursty(rate: f64, burst: f64) -> Loss {
        let leave_bad = 1.0 / burst.max(1.0);
        // Stationary share of the bad state: p / (p + r) = rate.
        let enter_bad = leave_bad * rate / (1.0 - rate).max(f64::EPSILON);
        Loss::Bursty {
            enter_bad,
            leave_bad,
            loss_good: 0.0,
            loss_bad: 1.0,
        }
    }

    /// The long-run share of packets lost.
    pub fn mean(&self) -> f64 {
        match *self {
            Loss::None => 0.0,
            Loss::Uniform(p) => p,
            Loss::Bursty {
                enter_bad,
                leave_bad,
                loss_good,
                loss_bad,
            } => {
                let bad = enter_bad / (enter_bad + leave_bad).max(f64::EPSILON);
                bad * loss_bad + (1.0 - bad) * loss_good
            }
        }
    }
}

/// One direction of a receiver's link.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkConfig {
    pub loss: Loss,
    /// Propagation and queueing delay every copy has.
    pub delay: Duration,
    /// Each copy is delayed by a further uniform draw below this (reorders close packets).
    pub jitter: Duration,
    /// Probability that a packet that got through arrives twice.
    pub duplicate: f64,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            loss: Loss::None,
            delay: Duration::from_micros(200),
            jitter: Duration::ZERO,
            duplicate: 0.0,
        }
    }
}

/// A link's state: its configuration, its generator and, for bursty loss, its state.
pub struct Link {
    config: LinkConfig,
    rng: StdRng,
    bad: bool,
}

impl Link {
    pub fn new(config: LinkConfig, seed: u64) -> Link {
        Link {
            config,
            rng: StdRng::seed_from_u64(seed),
            bad: false,
        }
    }

    pub fn config(&self) -> &LinkConfig {
        &self.config
    }

    /// The delays after which copies of one packet arrive: none if it is lost, two if it
    /// is duplicated.
    pub fn carry(&mut self) -> Vec<Duration> {
        if self.lost() {
            return Vec::new();
        }
        let mut out = vec![self.delay()];
        if self.config.duplicate > 0.0 && self.rng.random_bool(self.config.duplicate.min(1.0)) {
            out.push(self.delay());
        }
        out
    }

    /// A delay for one copy: the base plus jitter.
    pub fn delay(&mut self) -> Duration {
        let jitter = self.config.jitter.as_nanos() as u64;
        let extra = if jitter == 0 {
            0
        } else {
            self.rng.random_range(0..jitter)
        };
        self.config.delay + Duration::from_nanos(extra)
    }

    /// A uniform draw below `max` from this link's generator (answer delays).
    pub fn below(&mut self, max: Duration) -> Duration {
        let max = max.as_nanos() as u64;
        Duration::from_nanos(if max == 0 {
            0
        } else {
            self.rng.random_range(0..max)
        })
    }

    /// Whether the next packet is lost (one step of the loss chain, no delays drawn).
    pub fn lost(&mut self) -> bool {
        match self.config.loss {
            Loss::None => false,
            Loss::Uniform(p) => self.rng.random_bool(p.clamp(0.0, 1.0)),
            Loss::Bursty {
                enter_bad,
                leave_bad,
                loss_good,
                loss_bad,
            } => {
                let flip = if self.bad { leave_bad } else { enter_bad };
                if self.rng.random_bool(flip.clamp(0.0, 1.0)) {
                    self.bad = !self.bad;
                }
                let p = if self.bad { loss_bad } else { loss_good };
                self.rng.random_bool(p.clamp(0.0, 1.0))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share_lost(loss: Loss, seed: u64, n: usize) -> (f64, usize) {
        let config = LinkConfig {
            loss,
            ..LinkConfig::default()
        };
        let mut link = Link::new(config, seed);
        let (mut lost, mut runs, mut in_run) = (0, 0, false);
        for _ in 0..n {
            let gone = link.carry().is_empty();
            lost += usize::from(gone);
            runs += usize::from(gone && !in_run);
            in_run = gone;
        }
        (lost as f64 / n as f64, runs)
    }

    #[test]
    fn uniform_and_bursty_loss_reach_their_mean_and_bursty_comes_in_runs() {
        let (uniform, uniform_runs) = share_lost(Loss::Uniform(0.05), 1, 200_000);
        assert!((uniform - 0.05).abs() < 0.005, "{uniform}");
        let bursty = Loss::bursty(0.05, 8.0);
        assert!((bursty.mean() - 0.05).abs() < 1e-9);
        let (share, runs) = share_lost(bursty, 1, 200_000);
        assert!((share - 0.05).abs() < 0.01, "{share}");
        let mean_run = share * 200_000.0 / runs as f64;
        assert!(mean_run > 6.0 && mean_run < 10.0, "runs of {mean_run}");
        assert!(uniform_runs > 4 * runs, "uniform loss is not bursty");
    }

    #[test]
    fn a_seed_gives_the_same_link_every_time() {
        let config = LinkConfig {
            loss: Loss::Uniform(0.2),
            jitter: Duration::from_millis(3),
            duplicate: 0.1,
            ..LinkConfig::default()
        };
        let run = |seed| {
            let mut l = Link::new(config, seed);
            (0..1000).map(|_| l.carry()).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }
}
