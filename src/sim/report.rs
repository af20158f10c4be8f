//! What one simulated run measured, and its one-paragraph printout.

use std::fmt;
use std::time::Duration;

#[derive(Clone, Debug, Default)]
pub struct Report {
    pub name: String,
    pub seed: u64,
    pub receivers: usize,
    /// Bytes of every object one receiver of the whole workload needs.
    pub data_bytes: u64,
    /// Wire bytes the servers sent (payload and headers), every packet counted.
    pub server_bytes: u64,
    /// The same, per server.
    pub per_server_bytes: Vec<u64>,
    pub server_packets: u64,
    /// MLD reports the servers took in. Bytes stay flat in the receiver count, but each
    /// receiver reports each of its joins and leaves, and a server parses every report.
    pub mld_reports: u64,
    /// What unicast would send: the bytes each receiver that finished verified, summed.
    pub unicast_bytes: u64,
    /// Per receiver that finished: from its start to its last object verified, sorted.
    pub completion: Vec<Duration>,
    /// When each receiver started, from the run's start, sorted.
    pub starts: Vec<Duration>,
    /// The longest any receiver waited for one object, from its request to its completion.
    pub max_wait: Duration,
    /// Receivers that should have finished (not stopped, not crashed) and did not end with
    /// every object verified.
    pub unfinished: usize,
    /// Fetches that failed (timed out), over all receivers.
    pub failures: u64,
    /// Objects that failed to decode or did not fit their reference.
    pub invalid: usize,
    /// Packets sent on a group no receiver had joined then (allowing for a leave or a
    /// crash to reach the server and its last-listener check, or expiry, to run).
    pub sent_unjoined: u64,
    /// Packets sent on a group no receiver ever joined.
    pub sent_never_joined: u64,
    pub encoders_built: u64,
    /// Times the server restarted during the run.
    pub server_restarts: u64,
    pub rejoins: u64,
    /// Virtual time the run covered.
    pub sim_time: Duration,
    /// Real time it took.
    pub wall_time: Duration,
    /// The first server's: block rounds after the first (stragglers, late joiners, leaves
    /// that came late).
    pub later_rounds: u64,
    /// The receivers' loss the server learned from MLD alone, at the end.
    pub loss: f64,
    /// Receivers reporting their loss at the end (at most 64 a level), and their mean.
    pub reported: (usize, f64),
    /// Blocks whose listeners all left within 10, 20, 40, 80, 160 ms or later after the end
    /// of their first round.
    pub leave_delay: [u64; 6],
    /// First rounds that began with every receiver fetching in bulk, when a reader
    /// waited, and when the gathering ran out (`SchedStats::gathered`).
    pub gathered: [u64; 3],
    /// Blocks' first rounds sent in turns with others' (`SchedStats::in_turns`).
    pub in_turns: u64,
    /// Blocks' rounds for listeners that joined after the last full round began
    /// (`SchedStats::late_joiner_rounds`).
    pub late_joiner_rounds: u64,
    /// [metadata, blocks and bundles]: times an object became active, and distinct objects
    /// among those (all classes), and symbols sent.
    pub activations: [u64; 2],
    pub distinct: u64,
    pub symbols: [u64; 2],
    /// Source symbols of every object one receiver of the file needs; set with
    /// `oracle_symbols`.
    pub source_symbols: u64,
    /// What a server that saw every loss would have sent ([`super::oracle`]); only for
    /// receivers of one file who start together, from one server that does not restart.
    pub oracle_symbols: Option<u64>,
}

impl Report {
    /// What every run must show, whatever its figures: each failure, named. Empty when every
    /// receiver that was not stopped verified every object, no fetch failed, and nothing was
    /// sent on a group nobody held.
    pub fn problems(&self) -> Vec<String> {
        let checks = [
            (self.unfinished as u64, "receivers without every object"),
            (self.failures, "fetches failed"),
            (self.invalid as u64, "objects that did not decode"),
            (self.sent_unjoined, "packets sent on a group nobody held"),
            (
                self.sent_never_joined,
                "packets sent on a group never joined",
            ),
        ];
        checks
            .iter()
            .filter(|(n, _)| *n > 0)
            .map(|(n, what)| format!("{}: {n} {what}", self.name))
            .collect()
    }

    /// Server bytes over the data one receiver needs.
    pub fn over_data(&self) -> f64 {
        self.server_bytes as f64 / self.data_bytes.max(1) as f64
    }

    /// Server bytes over what unicast would have sent.
    pub fn over_unicast(&self) -> f64 {
        self.server_bytes as f64 / self.unicast_bytes.max(1) as f64
    }

    /// Symbols the (first) server sent per source symbol of the data; for runs with a
    /// yardstick, which have one server.
    pub fn symbols_over_source(&self) -> f64 {
        self.symbols.iter().sum::<u64>() as f64 / self.source_symbols.max(1) as f64
    }

    /// The same for the server that saw every loss ([`super::oracle`]).
    pub fn oracle_over_source(&self) -> Option<f64> {
        let source = self.source_symbols.max(1) as f64;
        self.oracle_symbols.map(|o| o as f64 / source)
    }

    /// How long the link must be busy for no receiver to wait longer than `alone`, the
    /// time one receiver alone takes: the union of the spans `[start, start + alone]`.
    pub fn busy_span(&self, alone: Duration) -> Duration {
        let mut busy = Duration::ZERO;
        let mut until = Duration::ZERO;
        for &start in &self.starts {
            let end = start + alone;
            busy += end - start.max(until).min(end);
            until = until.max(end);
        }
        busy
    }

    /// The fewest bytes a server can send so that no receiver of this run waits longer than
    /// the one receiver of `alone` did: its bytes for every `alone`'s time of
    /// [`Self::busy_span`]. A receiver alone already takes the link's whole rate, so while
    /// any receiver's lone transfer would be under way the link must be as busy as for one.
    /// This is what receivers that start apart cost: it grows with their receiver count
    /// only until their spans overlap, and then with the span of their starts alone.
    pub fn no_wait_bytes(&self, alone: &Report) -> Option<u64> {
        let took = *alone.completion.first()?;
        if took.is_zero() {
            return None;
        }
        let share = self.busy_span(took).as_secs_f64() / took.as_secs_f64();
        Some((alone.server_bytes as f64 * share) as u64)
    }

    /// Server bytes over [`Self::no_wait_bytes`], and that floor over `alone`'s bytes.
    pub fn over_no_wait(&self, alone: &Report) -> Option<(f64, f64)> {
        let floor = self.no_wait_bytes(alone)?.max(1) as f64;
        let one = alone.server_bytes.max(1) as f64;
        Some((self.server_bytes as f64 / floor, floor / one))
    }

    /// The (min, median, max) completion time.
    pub fn completion_summary(&self) -> (Duration, Duration, Duration) {
        let c = &self.completion;
        match (c.first(), c.get(c.len() / 2), c.last()) {
            (Some(a), Some(b), Some(z)) => (*a, *b, *z),
            _ => Default::default(),
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (lo, med, hi) = self.completion_summary();
        writeln!(
            f,
            "sim {} (seed {}): {} receivers, data {} B, server {} B in {} packets = {:.3}x data, {:.4}x unicast",
            self.name,
            self.seed,
            self.receivers,
            self.data_bytes,
            self.server_bytes,
            self.server_packets,
            self.over_data(),
            self.over_unicast()
        )?;
        if self.per_server_bytes.len() > 1 {
            writeln!(f, "  bytes per server {:?}", self.per_server_bytes)?;
        }
        writeln!(
            f,
            "  completion min/median/max {:.2}/{:.2}/{:.2} s over {} receivers; longest wait for one object {:.2} s",
            lo.as_secs_f64(),
            med.as_secs_f64(),
            hi.as_secs_f64(),
            self.completion.len(),
            self.max_wait.as_secs_f64()
        )?;
        write!(
            f,
            "  unfinished {}, failed fetches {}, invalid {}, sent on unjoined groups {} (never joined {}), encoders built {}, rejoins {}; {:.1} s simulated in {:.2} s",
            self.unfinished,
            self.failures,
            self.invalid,
            self.sent_unjoined,
            self.sent_never_joined,
            self.encoders_built,
            self.rejoins,
            self.sim_time.as_secs_f64(),
            self.wall_time.as_secs_f64()
        )?;
        write!(
            f,
            "\n  server: {} later block rounds, loss learned {:.3}, reported {:.3} by {}, leaves after <10/20/40/80/160/more ms {:?}, first rounds with every bulk receiver/hurried/gather ran out {:?}, {} in turns, {} rounds for late joiners",
            self.later_rounds, self.loss, self.reported.1, self.reported.0, self.leave_delay, self.gathered, self.in_turns, self.late_joiner_rounds
        )?;
        write!(
            f,
            "\n  MLD reports taken in {} ({:.0} per receiver)",
            self.mld_reports,
            self.mld_reports as f64 / self.receivers.max(1) as f64
        )?;
        write!(
            f,
            "\n  activations metadata/blocks {}/{} of {} distinct objects; symbols sent {}/{}",
            self.activations[0],
            self.activations[1],
            self.distinct,
            self.symbols[0],
            self.symbols[1]
        )?;
        if let Some(oracle) = self.oracle_over_source() {
            write!(
                f,
                "\n  symbols per source symbol {:.3}; a server that saw every loss, \
                 coding blocks alone, {:.3}",
                self.symbols_over_source(),
                oracle
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_no_wait_floor_counts_each_stretch_of_overlapping_transfers_once() {
        let alone = Report {
            server_bytes: 1000,
            completion: vec![ms(300)],
            ..Report::default()
        };
        // [0, 300] and [100, 400] overlap: 400 ms; [1000, 1350]: 350 ms; [5000, 5300].
        let apart = Report {
            starts: vec![ms(0), ms(100), ms(1000), ms(1050), ms(5000)],
            ..Report::default()
        };
        assert_eq!(apart.busy_span(ms(300)), ms(1050));
        let floor = apart.no_wait_bytes(&alone).unwrap();
        assert!((3499..=3500).contains(&floor), "{floor}");
        // Receivers that start together cost what one costs, however many.
        let together = Report {
            starts: vec![ms(0); 1000],
            ..Report::default()
        };
        assert_eq!(together.no_wait_bytes(&alone), Some(1000));
        assert_eq!(apart.no_wait_bytes(&Report::default()), None);
    }
}
