//! The simulated network's scenarios (issue 11): the real carousel, tracker, querier and
//! fetch state, joined through seeded in-memory links on a virtual clock (`lcfs::sim`).
//! Each scenario asserts and prints its report. Every scenario asserts that every receiver
//! that was not stopped ends with every object verified, that no fetch failed, and that
//! nothing was sent on a group nobody held.
//!
//! What holds today: server bytes flat in the receiver count for a file without loss, with
//! 5% loss (at 100 and 1000 receivers; 4, 8 and 64 MiB) and with 20% loss (at 100 and
//! 1000), and for trees of small files (they travel in bundles; 1,000 and 10,000 files, at
//! 100 and 1000 receivers) without loss, with 5% and with 20% loss, starts together, and
//! for a server much faster than receivers that start 10 ms apart (blocks wait for every
//! receiver fetching in bulk: 2.3 times one receiver's bytes without the wait). Above
//! [`sim::COUNTING_ABOVE`] receivers both runs decode by counting symbols (tested against
//! RaptorQ in `fec`). 20% loss at 1000 receivers held or not by the seed until receivers
//! reported their loss (a 4 MiB file 1.08 to 1.20 at seeds 1 to 6, a 1,000-file tree 1.07
//! to 1.18 at seeds 1 to 7; since, 1.05 to 1.10 at seeds 1 to 8 and 1.05 to 1.07 at seeds
//! 1 to 7). What does not hold is kept as a `known_gap_*` test that asserts today's figure
//! as an upper bound and prints the ratio: bursty loss at many receivers.
//!
//! Starts spread over seconds are held to what a server that keeps no receiver waiting
//! longer than one alone must send ([`Report::no_wait_bytes`]), not to one receiver: for
//! receivers that start apart that is set by the span of their starts.

use std::time::Duration;

use lcfs::sim::{self, Departure, LinkConfig, Loss, Report, Scenario, Shape};

const FILE: Shape = Shape::File(8 << 20);
const TREE: Shape = Shape::Tree {
    files: 1000,
    dirs: 40,
    min: 0,
    max: 64 << 10,
};

/// A tree of `files` files of 100 B to `max` bytes in `dirs` directories.
fn small_files(files: usize, dirs: usize, max: u64) -> Shape {
    Shape::Tree {
        files,
        dirs,
        min: 100,
        max,
    }
}

fn run(s: &Scenario) -> Report {
    let dir = tempfile::tempdir().expect("a temporary directory for the tree");
    let r = sim::run(dir.path(), s).expect("the tree is built and published");
    println!("{r}");
    r
}

/// What every run must show, whatever the figures ([`Report::problems`]).
fn assert_sound(r: &Report) {
    let problems = r.problems();
    assert!(problems.is_empty(), "{problems:#?}");
}

/// Runs `shape` at 1 and `n` receivers under `loss` and `spread`, at seed 11; returns both
/// reports and the ratio of their server bytes.
fn flatness(name: &str, shape: Shape, n: usize, loss: Loss, spread: u64) -> (Report, Report, f64) {
    flatness_at(name, 11, shape, n, loss, spread)
}

/// [`flatness`] at `seed`.
fn flatness_at(
    name: &str,
    seed: u64,
    shape: Shape,
    n: usize,
    loss: Loss,
    spread: u64,
) -> (Report, Report, f64) {
    let (one, many, ratio) = compare(name, n, |k| {
        let mut s = Scenario::new(&format!("{name}-{k}"), seed, shape, k, loss);
        s.start_spread = Duration::from_secs(spread);
        s.counting = n > sim::COUNTING_ABOVE; // both runs decode alike
        s
    });
    if !matches!(loss, Loss::Bursty { .. }) && spread == 0 {
        // Rounds in turns are for loss in bursts: under independent loss they would cut a
        // lone receiver's bytes and not a crowd's (`serve::sched`). Receivers that start
        // over seconds may read as bursts: a late joiner is short of the round it joined,
        // and MLD cannot tell why (70 first rounds of 128 in turns at seed 11, for 11.63
        // times one receiver's bytes against 11.61 with none).
        for r in [&one, &many] {
            assert_eq!(
                r.in_turns, 0,
                "{name}: first rounds in turns without bursts"
            );
        }
    }
    (one, many, ratio)
}

/// Runs `scenario(1)` and `scenario(n)`; returns both reports and the ratio of their server
/// bytes.
fn compare(name: &str, n: usize, scenario: impl Fn(usize) -> Scenario) -> (Report, Report, f64) {
    let one = run(&scenario(1));
    let many = run(&scenario(n));
    assert_sound(&one);
    assert_sound(&many);
    let ratio = many.server_bytes as f64 / one.server_bytes as f64;
    println!("{name}: server bytes at {n} receivers / at 1 = {ratio:.3}");
    (one, many, ratio)
}

#[test]
fn a_file_costs_the_same_for_100_receivers_as_for_one_without_loss() {
    for n in [10, 100] {
        let (one, many, ratio) = flatness("file-flat", FILE, n, Loss::None, 0);
        assert!(ratio <= 1.15, "{ratio:.3}");
        assert!(one.over_data() < 1.15, "{:.3}", one.over_data());
        assert!(many.over_unicast() < 1.2 / n as f64);
    }
}

/// Small files, as in tools/bench's tree_10k (100 B to 16 KiB): they travel in bundles.
const SMALL_TREE: Shape = Shape::Tree {
    files: 1000,
    dirs: 20,
    min: 100,
    max: 16 << 10,
};

#[test]
fn a_tree_of_small_files_costs_the_same_for_100_receivers_as_for_one_without_loss() {
    let (one, _, ratio) = flatness("small-tree-flat", SMALL_TREE, 100, Loss::None, 0);
    assert!(ratio <= 1.15, "{ratio:.3}");
    assert!(one.over_data() < 1.2, "{:.3}", one.over_data());
}

/// The scale: 1000 receivers of a 4 MiB file, starting together, no loss.
#[test]
fn a_file_costs_the_same_for_1000_receivers_as_for_one_without_loss() {
    let file = Shape::File(4 << 20);
    let (_, many, ratio) = flatness("file-1000", file, 1000, Loss::None, 0);
    assert!(ratio <= 1.15, "{ratio:.3}");
    assert_eq!(many.completion.len(), 1000);
}

/// 1000 receivers of a 4 MiB file under 5% loss each. The server sends until the
/// unluckiest of 1000 has enough, so a block needs more than for one receiver; first rounds
/// are sized by the loss the receivers report, the same at one receiver and at 1000, so
/// only the few stragglers' later rounds differ: 1.07 at seed 11 (1.07 to 1.11 at seeds 1
/// to 4 and 11 while the loss was learned from the share of listeners left short, 1.12 to
/// 1.20 while the margin followed the worst of N).
#[test]
fn a_file_under_5_percent_loss_costs_the_same_for_1000_receivers_as_for_one() {
    let file = Shape::File(4 << 20);
    let (_, many, ratio) = flatness("file-1000-loss", file, 1000, Loss::Uniform(0.05), 0);
    assert!(ratio <= 1.15, "{ratio:.3}");
    assert_eq!(many.completion.len(), 1000);
}

/// The server restarts in the middle of a transfer: the new process knows no listener, and
/// learns them from the answers to its first query (and from receivers' rejoins). Every
/// receiver still ends with every object verified, and the restart costs at most a few
/// rounds (compared with the same run without it).
#[test]
fn a_server_restart_midway_leaves_every_receiver_whole() {
    let scenario = |restart: Option<Duration>| {
        let mut s = Scenario::new("restart", 16, FILE, 20, Loss::Uniform(0.05));
        s.server_restart = restart;
        s
    };
    let steady = run(&scenario(None));
    let restarted = run(&scenario(Some(Duration::from_millis(300))));
    assert_sound(&steady);
    assert_sound(&restarted);
    assert_eq!(restarted.server_restarts, 1);
    assert!(
        restarted
            .completion
            .iter()
            .all(|c| *c > Duration::from_millis(300)),
        "the restart came while every receiver was still at work"
    );
    let ratio = restarted.server_bytes as f64 / steady.server_bytes as f64;
    let slower = restarted
        .completion
        .last()
        .copied()
        .unwrap_or_default()
        .as_secs_f64()
        / steady
            .completion
            .last()
            .copied()
            .unwrap_or_default()
            .as_secs_f64()
            .max(1e-9);
    println!(
        "restart midway: server bytes {ratio:.3}x, last completion {slower:.2}x the steady run"
    );
    assert!(ratio <= 1.3, "{ratio:.3}");
}

#[test]
fn every_receiver_verifies_a_file_under_uniform_loss() {
    for loss in [0.05, 0.2] {
        let s = Scenario::new("file-loss", 12, FILE, 10, Loss::Uniform(loss));
        let r = run(&s);
        assert_sound(&r);
        assert!(r.over_unicast() < 0.25, "{:.3}", r.over_unicast());
    }
}

#[test]
fn bursty_loss_duplication_and_reordering_still_verify() {
    let mut s = Scenario::new("file-bursty", 13, FILE, 10, Loss::bursty(0.05, 8.0));
    s.downlink = LinkConfig {
        loss: Loss::bursty(0.05, 8.0),
        delay: Duration::from_millis(2),
        jitter: Duration::from_millis(5),
        duplicate: 0.05,
    };
    s.uplink = Duration::from_millis(5);
    s.start_spread = Duration::from_millis(500);
    let r = run(&s);
    assert_sound(&r);
}

#[test]
fn receivers_that_stop_or_crash_leave_the_rest_whole() {
    let mut s = Scenario::new("file-departures", 14, FILE, 10, Loss::Uniform(0.05));
    s.start_spread = Duration::from_millis(200);
    s.departures = (0..4)
        .map(|i| Departure {
            receiver: i,
            after: Duration::from_millis(150 + 50 * i as u64),
            crash: i % 2 == 1,
        })
        .collect();
    let r = run(&s);
    assert_sound(&r);
    assert_eq!(r.completion.len(), 6, "the six that stayed finished");
}

#[test]
fn a_tree_walked_by_ten_receivers_verifies_every_object() {
    let s = Scenario::new("tree-10", 15, TREE, 10, Loss::Uniform(0.05));
    let r = run(&s);
    assert_sound(&r);
}

#[test]
fn receivers_reading_random_files_verify_them() {
    let mut s = Scenario::new("tree-random", 16, TREE, 20, Loss::Uniform(0.05));
    s.workload = sim::Workload::Files(20);
    s.start_spread = Duration::from_secs(2);
    let r = run(&s);
    assert_sound(&r);
    assert_eq!(r.completion.len(), 20);
}

#[test]
fn a_seed_gives_the_same_run() {
    let s = Scenario::new("repro", 17, Shape::File(2 << 20), 5, Loss::Uniform(0.1));
    let (a, b) = (run(&s), run(&s));
    assert_eq!(
        (a.server_bytes, a.completion.clone(), a.max_wait),
        (b.server_bytes, b.completion, b.max_wait)
    );
}

/// 5% independent loss at 100 receivers costs the server at most 1.15 times what one
/// receiver costs. It did not (1.30 at seed 11) until receivers that ask for more than their
/// window waited for the server's beacon before filling it: receivers a few milliseconds
/// apart then take the same rounds instead of each asking for the blocks the others just
/// got (1.12 then, 1.03 now).
#[test]
fn a_file_under_5_percent_loss_costs_100_receivers_what_it_costs_one() {
    let (_, _, ratio) = flatness("file-loss-flat", FILE, 100, Loss::Uniform(0.05), 0);
    assert!(ratio <= 1.15, "{ratio:.3}");
}

/// 20% independent loss at 100 receivers: 1.04 times one receiver's bytes at seed 11. It
/// was 1.75 while the first round's margin had a ceiling of 15% of K, below what 20% loss
/// needs, so every block took later rounds and receivers fell out of step.
#[test]
fn a_file_under_20_percent_loss_costs_100_receivers_what_it_costs_one() {
    let (_, _, ratio) = flatness("file-heavy-loss", FILE, 100, Loss::Uniform(0.2), 0);
    assert!(ratio <= 1.15, "{ratio:.3}");
}

/// 20% loss at 1000 receivers of a 4 MiB file: 1.74 times the data, against 1.59 to 1.67 at
/// one receiver (seeds 1 to 20), so 1.05 to 1.10 times one receiver at seeds 1 to 8.
///
/// The bound is tight by nature: with 46-symbol blocks the unluckiest of 1000 needs about
/// 1.52 times K even with feedback after every symbol, against 1.25 for one receiver, so
/// 1.15 holds only because first rounds are sized for many whatever the count. It held or
/// not by the seed (1.08 to 1.20 at seeds 1 to 6) while the server learned the loss from
/// MLD alone: a lone receiver answers each first round yes or no, and one lucky early
/// object held its estimate low for the rest of the file, so its first rounds stayed small
/// and cheap. Receivers now report their measured loss by joining a group
/// (`lcfs::fetch::loss`), and one receiver's first rounds are sized as a thousand's.
#[test]
fn a_file_under_20_percent_loss_costs_1000_receivers_what_it_costs_one() {
    let file = Shape::File(4 << 20);
    let (_, many, ratio) = flatness("file-heavy-1000", file, 1000, Loss::Uniform(0.2), 0);
    assert_eq!(many.completion.len(), 1000);
    assert!(ratio <= 1.15, "{ratio:.3}");
}

/// Regression, seed 4: 1.20 times one receiver's bytes while the loss was learned from
/// MLD alone (see above); the lone receiver cost 1.48 times the data. 1.10 since receivers
/// report their loss.
#[test]
fn regression_a_file_at_1000_receivers_under_20_percent_loss_seed_4() {
    let file = Shape::File(4 << 20);
    let (one, many, ratio) = flatness_at("file-heavy-1000", 4, file, 1000, Loss::Uniform(0.2), 0);
    assert_eq!(many.completion.len(), 1000);
    assert!(one.over_data() > 1.55, "{:.3}", one.over_data());
    assert!(ratio <= 1.15, "{ratio:.3}");
}

/// What starts spread over seconds cost, against a server that keeps no receiver waiting
/// longer than one alone ([`Report::no_wait_bytes`]) and against one receiver.
struct Spread {
    over_floor: f64,
    over_one: f64,
    /// The median receiver's completion over one receiver's alone.
    median_over_alone: f64,
}

/// Runs an 8 MiB file under 5% loss at 1 and `n` receivers whose starts spread over
/// `secs` seconds, at seed 11.
fn spread_starts(n: usize, secs: u64) -> Spread {
    let (one, many, over_one) = flatness("spread", FILE, n, Loss::Uniform(0.05), secs);
    let (over_floor, floor) = many.over_no_wait(&one).expect("the lone receiver finished");
    let (_, alone, _) = one.completion_summary();
    let (_, median, _) = many.completion_summary();
    let median_over_alone = median.as_secs_f64() / alone.as_secs_f64();
    println!(
        "starts over {secs} s, {n} receivers: {over_one:.3} times one receiver, {over_floor:.3} \
         times a server that keeps nobody waiting ({floor:.1} times one receiver), median \
         completion {:.2} s, {median_over_alone:.2} times one alone",
        median.as_secs_f64()
    );
    Spread {
        over_floor,
        over_one,
        median_over_alone,
    }
}

/// The most the median receiver may take, over one receiver alone, when starts spread over
/// seconds. Late receivers took each block in later rounds of K/8 until blocks got rounds
/// for late joiners (`serve::sched`): 2.5 to 3.0 times one alone, 1.2 to 1.8 since.
const SPREAD_MEDIAN: f64 = 2.2;

/// Starts spread over 10 s for a file that one receiver alone fetches in 0.9 s: what the
/// server sends is set by the span of the starts, not by the receivers. A receiver alone
/// takes the link's whole rate, so a server that keeps nobody waiting longer than one
/// receiver alone must keep the link busy whenever some receiver's lone transfer would be
/// under way: here 12.1 times one receiver's bytes at 100 receivers and 12.2 at 1000. lcfs
/// sends 1.01 and 0.91 times that (12.2 and 11.1 times one receiver; median completion
/// 1.6 s either way). Held to one receiver, the ratio measures the span, not the receivers.
#[test]
fn starts_spread_over_10_s_cost_the_span_not_the_receivers() {
    let hundred = spread_starts(100, 10);
    let thousand = spread_starts(1000, 10);
    for (n, s) in [(100, &hundred), (1000, &thousand)] {
        assert!(s.over_floor <= 1.15, "{n}: {:.3}", s.over_floor);
        assert!(
            s.median_over_alone <= SPREAD_MEDIAN,
            "{n}: median {:.2} times one alone",
            s.median_over_alone
        );
    }
    let growth = thousand.over_one / hundred.over_one;
    assert!(
        growth <= 1.15,
        "ten times the receivers: {growth:.3} times the bytes"
    );
}

/// Starts over 1, 2 and 5 s, 100 receivers: 1.08, 0.98 and 0.89 times what a server that
/// keeps nobody waiting sends, the median receiver done in 1.46, 1.05 and 1.38 s against
/// 0.9 s alone. Late receivers join blocks whose first rounds are over; each such block
/// gets a round for its late joiners in the bulk queue, which makes a carousel of what late
/// receivers still lack (`serve::sched`). Before, they took each block in later rounds of
/// K/8 after cooldowns, each group of late receivers at its own place in the file: 1.10,
/// 1.17 and 1.25 times the no-wait server, 1.5, 2.2 and 2.3 s median.
#[test]
fn starts_spread_over_1_to_5_s_cost_the_span_and_keep_late_receivers_near_one_alone() {
    for secs in [1, 2, 5] {
        let s = spread_starts(100, secs);
        assert!(s.over_floor <= 1.15, "over {secs} s: {:.3}", s.over_floor);
        assert!(
            s.median_over_alone <= SPREAD_MEDIAN,
            "over {secs} s: median {:.2} times one alone",
            s.median_over_alone
        );
    }
}

/// 50 receivers of a 3,000-file tree in 30 directories starting over 5 s (5% loss, seed
/// 9203): 1.10 times what a server that keeps nobody waiting sends. It was 1.33 before blocks
/// got rounds for their late joiners, then 1.24 while every newcomer got the directories in
/// rounds of its own (35,131 of their symbols against 817 for one receiver): a directory
/// whose last reader had left resumed at once for its next. Newcomers' rounds of metadata
/// are gathered every 500 ms now, beyond a share of what is sent (`serve::sched`,
/// `METADATA_EVERY`).
#[test]
fn a_tree_in_30_directories_with_starts_spread_over_5_s_costs_the_span() {
    let shape = small_files(3000, 30, 16 << 10);
    let (one, many, _) = flatness_at("dirs-spread", 9203, shape, 50, Loss::Uniform(0.05), 5);
    assert_sound(&many);
    let (over_floor, _) = many.over_no_wait(&one).expect("the lone receiver finished");
    println!("a 3,000-file tree, starts over 5 s: {over_floor:.3} times the no-wait floor");
    assert!(over_floor <= 1.15, "{over_floor:.3}");
}

/// 100 receivers of a 10,000-file tree starting over 5 s under 5% loss (seed 9301): 1.04
/// times what a server that keeps nobody waiting sends, median 11.1 s against 8.6 s alone
/// (1.07 and 11.5 s before newcomers' directories were gathered, `serve::sched`).
/// It was 1.40 (median 12.5 s) while every receiver that measured 1% loss joined four
/// windows ahead: one that started late joined objects at its own place in the tree, each
/// queued for it alone, and blocks were activated three times each. Only loss in bursts
/// widens the window now (`lcfs::fetch::state`, `LOSSY`).
#[test]
fn a_tree_under_loss_with_starts_spread_over_5_s_costs_the_span() {
    let over_floor = spread_tree(9301, 5);
    println!("a 10,000-file tree, 100 receivers over 5 s: {over_floor:.3} times the no-wait floor");
    assert!(over_floor <= 1.15, "{over_floor:.3}");
}

/// 100 receivers of a 10,000-file tree under 5% loss starting over `secs` at `seed`: server
/// bytes over the no-wait server's.
fn spread_tree(seed: u64, secs: u64) -> f64 {
    let shape = small_files(10_000, 100, 16 << 10);
    let name = format!("tree-spread-{secs}");
    let (one, many, _) = flatness_at(&name, seed, shape, 100, Loss::Uniform(0.05), secs);
    assert_sound(&many);
    many.over_no_wait(&one)
        .expect("the lone receiver finished")
        .0
}

/// The same tree with starts spread over 10 s (seed 9406): 1.03 times the no-wait server,
/// median 13.7 s against 8.6 s alone. It was 1.27 (median 18.0 s) while the simulated
/// receivers asked for each directory's files as they decoded it, before its
/// subdirectories, unlike `lcfs copy`, which walks every directory first (`sim::walk`): a
/// receiver that started late met most directories when the others had long left them,
/// and metadata was 59% of what the server sent. With the directories first it was 1.13
/// (median 15.1 s): newcomers, each asking for every directory as it started, got them in
/// rounds of their own, 36 times one receiver's directory symbols, now 22 (`serve::sched`,
/// `METADATA_EVERY`). At 20% loss (seed 9302) 1.46, 1.13, now 1.08; a thousand receivers
/// of a 1,000-file tree over 10 s at 20% (seed 9404) 1.38, 1.14, now 1.10.
#[test]
fn a_tree_with_starts_spread_over_10_s_costs_the_span() {
    let over_floor = spread_tree(9406, 10);
    println!(
        "a 10,000-file tree, 100 receivers over 10 s: {over_floor:.3} times the no-wait floor"
    );
    assert!(over_floor <= 1.15, "{over_floor:.3}");
}

/// 5% loss in bursts of 5 packets on average (Gilbert-Elliott), 100 receivers of an 8 MiB
/// file: 1.17 times one receiver's bytes at seed 11 (50 receivers: 1.12), 1.38 for 1000
/// receivers of a 4 MiB file (seed 5). A server that saw every receiver's losses and sent
/// each block whole on its own ([`lcfs::sim::oracle`]) would send 1.46 times one receiver's
/// symbols here, because the worst of a hundred receivers loses a burst in nearly every
/// block and one receiver seldom does. lcfs sent within 2% of that server's symbols until
/// blocks' first rounds took turns under bursts (`serve::sched`); it was 1.27 times one
/// receiver then, and 1.27 still while the MLD tracker counted at most 64 listeners of a
/// group (`mld::tracker`): first rounds began without the receivers it could not count,
/// who then took each block in later rounds of K/8. What is left is later rounds for the
/// few a burst still left short, and the first blocks of a transfer, sent whole until the
/// bursts are learned.
#[test]
fn known_gap_bursty_loss_costs_many_receivers_later_rounds() {
    let (one, many, ratio) = flatness("gap-file-bursty", FILE, 100, Loss::bursty(0.05, 5.0), 0);
    let (Some(best_one), Some(best)) = (one.oracle_over_source(), many.oracle_over_source()) else {
        panic!("a whole-file run has a yardstick");
    };
    let waste = many.symbols_over_source() / best;
    println!(
        "known gap: 5% loss in bursts of 5, 100 receivers: {ratio:.3} times one receiver; \
         a server that saw every loss {:.3} times, lcfs {waste:.3} times its symbols",
        best / best_one
    );
    assert!(
        best / best_one > 1.15,
        "per-block coding alone now keeps bursts flat: {:.3}; this is no gap any more",
        best / best_one
    );
    assert!(
        waste <= 0.92,
        "{waste:.3} times what a server seeing every loss and sending blocks whole sends"
    );
    assert!(ratio <= 1.2, "{ratio:.3}");
}

/// 5% loss in bursts of 5, 100 receivers of 1,000 files of 100 B to 16 KiB: 1.17 times one
/// receiver's bytes at seed 11 since the simulated receivers walk every directory before
/// any file, as `lcfs copy` does (1.44 before, `sim::walk`), 1.51 while the MLD tracker counted at most 64 listeners of
/// a group, 1.67 before blocks' first rounds took turns under bursts
/// (1.74 with four steady later rounds rather than eight, see `serve::sched`). It was 2.10
/// while a receiver that measured loss kept the window of 32 groups: it lost whole rounds
/// of small objects, fell behind the others, and asked for objects after they had all left
/// them (see `fetch::state`'s `LOSSY`). Further from flat than a file under the same loss,
/// whose figure the test above explains.
#[test]
fn known_gap_bursty_loss_on_a_tree_of_small_files() {
    let tree = small_files(1000, 20, 16 << 10);
    let (_, _, ratio) = flatness("gap-tree-bursty", tree, 100, Loss::bursty(0.05, 5.0), 0);
    println!("known gap: 5% loss in bursts of 5, a tree at 100 receivers: {ratio:.3} times one");
    assert!(ratio <= 1.25, "{ratio:.3}");
}

/// A tree of files up to 64 KiB at 100 receivers starting together under 5% loss: 1.02
/// times one receiver's bytes at seed 11. It was 2.41 while the margin was learned upwards, then 1.25: receivers that missed a
/// directory's only round asked for its files a cooldown later and needed rounds of their
/// own, until metadata's first round got a margin of its own (see `serve::sched`).
#[test]
fn a_tree_of_small_files_under_5_percent_loss_costs_100_receivers_what_it_costs_one() {
    let (_, _, ratio) = flatness("tree-loss-flat", TREE, 100, Loss::Uniform(0.05), 0);
    assert!(ratio <= 1.15, "{ratio:.3}");
}

/// A thousand receivers of a 1,000-file tree of files up to 4 KiB (2.2 MB; 21 directories,
/// bundles of a few dozen files) starting together under 5% loss: 1.08 times one receiver's
/// bytes at seed 11. It was 1.46: directory rounds are over in a millisecond, while the
/// receivers' joins spread over the links' jitter, and those that missed the root record's
/// one copy or a directory's round took later rounds of their own. The root record now
/// goes out in a burst, metadata's first round covers a wider spread, and small objects'
/// first rounds aim at fewer receivers left short (see `serve::sched`).
#[test]
fn a_tree_of_tiny_files_costs_1000_receivers_what_it_costs_one() {
    let tiny = small_files(1000, 20, 4 << 10);
    let (_, many, ratio) = flatness("tree-1000", tiny, 1000, Loss::Uniform(0.05), 0);
    assert_eq!(many.completion.len(), 1000);
    assert!(ratio <= 1.15, "{ratio:.3}");
}

/// Regression, seed 2: a 1,000-file tree (files of 100 B to 16 KiB) at 1000 receivers under
/// 20% loss cost 1.37 times one receiver's bytes while the simulated bridge forwarded a
/// round's packets by the time the server handed them out rather than by their departure:
/// two receivers whose joins came microseconds after rounds began fell behind for good,
/// and 30 objects went out again for them alone. 1.06 since, and 1.08 since lossy receivers
/// join 128 groups ahead (`fetch::state`'s `LOSSY`).
#[test]
fn regression_a_tree_at_1000_receivers_under_20_percent_loss_seed_2() {
    let tree = small_files(1000, 20, 16 << 10);
    let (_, many, ratio) = flatness_at("tree-1000-heavy", 2, tree, 1000, Loss::Uniform(0.2), 0);
    assert_eq!(many.completion.len(), 1000);
    assert!(ratio <= 1.15, "{ratio:.3}");
}

/// The worst case for multicast: a thousand receivers each reading three files chosen at
/// random out of a thousand (up to 64 KiB each), starting together. Rounds are shared only
/// where choices meet: 0.20 of unicast's bytes at seed 11, and 1.25 times the tree's own
/// bytes, which is what every file once, under 5% loss, costs.
#[test]
fn a_thousand_receivers_reading_different_random_files_cost_less_than_unicast() {
    let mut s = Scenario::new("random-1000", 11, TREE, 1000, Loss::Uniform(0.05));
    s.workload = sim::Workload::Files(3);
    let r = run(&s);
    assert_sound(&r);
    assert_eq!(r.completion.len(), 1000);
    assert!(r.over_unicast() < 0.3, "{:.3}", r.over_unicast());
    assert!(r.over_data() < 1.5, "{:.3}", r.over_data());
}

/// Two servers of one channel (the same tree and channel, each from its own address and
/// uplink), 100 receivers of an 8 MiB file under 5% loss: every receiver verifies, and each
/// server sends about what one server alone sends (0.90 times at seed 11: a symbol lost
/// from one may come from the other, so fewer later rounds), so the link carries both.
/// Both start each object at ESI 0 and send the same symbols: a second server buys
/// failover, not speed (the last receiver done at 0.86 s against 1.06 s).
#[test]
fn two_servers_of_one_channel_each_send_what_one_would() {
    let scenario = |servers: usize| {
        let mut s = Scenario::new(
            &format!("two-servers-{servers}"),
            11,
            FILE,
            100,
            Loss::Uniform(0.05),
        );
        s.servers = servers;
        s
    };
    let one = run(&scenario(1));
    let two = run(&scenario(2));
    assert_sound(&one);
    assert_sound(&two);
    assert_eq!(two.completion.len(), 100);
    assert_eq!(two.per_server_bytes.len(), 2);
    for (i, b) in two.per_server_bytes.iter().enumerate() {
        let ratio = *b as f64 / one.server_bytes as f64;
        println!("two servers: server {i} sent {ratio:.3} times what one server sends");
        assert!(ratio <= 1.15, "server {i}: {ratio:.3}");
    }
}

/// The sizes: a 64 MiB file at 100 receivers under 5% loss costs 1.05 times what it
/// costs one receiver at seed 11 (about 20 s of CPU and 3.5 GB of memory: a hundred
/// receivers hold their decoders and the objects they verified).
#[test]
fn a_64_mib_file_under_5_percent_loss_costs_100_receivers_what_it_costs_one() {
    let big = Shape::File(64 << 20);
    let (_, many, ratio) = flatness("file-64m", big, 100, Loss::Uniform(0.05), 0);
    assert_eq!(many.completion.len(), 100);
    assert!(ratio <= 1.15, "{ratio:.3}");
}

/// The sizes: a 10,000-file tree (100 directories, files of 100 B to 16 KiB, 83 MB)
/// at 100 receivers under 5% loss costs 1.02 times what it costs one receiver at seed 11
/// (about 45 s of CPU).
#[test]
fn a_10000_file_tree_under_5_percent_loss_costs_100_receivers_what_it_costs_one() {
    let tree = small_files(10_000, 100, 16 << 10);
    let (_, many, ratio) = flatness("tree-10k", tree, 100, Loss::Uniform(0.05), 0);
    assert_eq!(many.completion.len(), 100);
    assert!(ratio <= 1.15, "{ratio:.3}");
}

/// A server much faster than its receivers (tools/bench's unshaped link, `--rate 5G`) and
/// receivers tens of milliseconds apart, as copies sharing a machine's cores run: a round is
/// over before the next receiver asks, so each block's first round waits for every receiver
/// fetching in bulk (`lcfs::serve::sched`, `gather`) and one round serves them all.
#[test]
fn receivers_tens_of_milliseconds_apart_share_a_fast_servers_rounds() {
    for n in [3, 10] {
        let (_, _, ratio) = compare("fast-server", n, |k| {
            let tree = small_files(4000, 40, 64 << 10);
            let mut s = Scenario::new(&format!("fast-{k}"), 11, tree, k, Loss::None);
            s.rate_bps = 5_000_000_000;
            s.start_spread = Duration::from_millis(10);
            // A LAN's jitter: 1 ms would reorder hundreds of packets at this rate.
            s.downlink.jitter = Duration::from_micros(10);
            s
        });
        assert!(ratio <= 1.15, "{n} receivers: {ratio:.3}");
    }
}

/// Receivers fetching different files wait for nobody: the wait for the receivers fetching
/// in bulk shrinks when it brings no one (`lcfs::serve::sched`, `next_wait`). At 100 ms a
/// wait, a window of 32 blocks per wait would hold each to a fifth of this link. What is
/// left is a wait that ran out once for the first lookups and once for the first window of
/// blocks (100 ms each): 231 ms here against 22 ms alone; 400 ms and more if the blocks'
/// wait did not shrink (12 files of 64 KiB blocks are four windows).
#[test]
fn receivers_fetching_different_files_are_not_held_by_the_wait() {
    let tree = Shape::Tree {
        files: 400,
        dirs: 20,
        min: 256 << 10,
        max: 1 << 20,
    };
    let scenario = |k: usize| {
        let mut s = Scenario::new(&format!("apart-{k}"), 11, tree, k, Loss::None);
        s.workload = sim::Workload::Files(12);
        s.rate_bps = 5_000_000_000;
        s.downlink.jitter = Duration::from_micros(10);
        s
    };
    let (one, many) = (run(&scenario(1)), run(&scenario(2)));
    assert_sound(&one);
    assert_sound(&many);
    let last = |r: &Report| r.completion.iter().max().copied().unwrap_or_default();
    let allowed = last(&one) + Duration::from_millis(250);
    assert!(
        last(&many) < allowed,
        "{:?} against {:?} alone",
        last(&many),
        last(&one)
    );
}
