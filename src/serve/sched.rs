//! The sender's scheduler and pacer (sans-IO): which symbol goes out next, and when.
//!
//! Active objects (those whose group has at least one listener) are sent in rounds. An
//! object's round goes out back to back (blocks' first rounds take turns while loss comes in
//! bursts, below); between two rounds of one object lies a cooldown longer than an MLD leave
//! takes to arrive, so a receiver that decoded is gone before more is sent for it. Whole
//! rounds, rather than packet-by-packet round robin, make objects complete one after another,
//! so a receiver's window of objects in flight refills continuously.
//!
//! Three queues order the rounds, each first come first served:
//! - urgent: later rounds (stragglers that lost symbols). These are small, and serving them
//!   first keeps receivers that fell behind in step with the others, so that the rounds
//!   that follow are shared instead of sent once per receiver;
//! - metadata: first rounds of directories and file indexes, which a receiver needs before
//!   it knows what to ask for next;
//! - bulk: first rounds of blocks, and blocks' rounds for receivers that joined late (below).
//!   Receivers walking the same tree join the same blocks in the same order, long before
//!   their turn comes, so one round serves them all.
//!
//! When the server is faster than its receivers, first rounds wait for them (below).
//!
//! A first round is K symbols plus a margin for the receivers' loss (`sched/loss.rs`): the loss
//! the receivers report by joining a loss level's group, else the loss learned from MLD
//! alone (the share of an object's listeners still there after its first round). Either is
//! what one receiver's loss decides, whatever their number, so one receiver and a thousand
//! get the same first rounds and differ only in the later rounds of the unlucky few. A
//! first round is sized when its first symbol goes out, by what was known until then.
//!
//! A block's later rounds are K/8 for `steady_rounds` rounds, then double (at most K),
//! counted from its last full round; a metadata object's are as large as its least first
//! round, K + max(8, 4 sqrt(K)). The
//! server cannot know how many symbols the receivers still listening lack, only that some
//! do, so a round's size is a guess, and loss in bursts punishes both ways of guessing
//! wrong. Rounds that doubled from the first (K/8, K/4, K/2, K) overshot: a hundred
//! receivers' worst lacked about 20 symbols of a 46-symbol block after its first round (a
//! server that saw every loss needed 25 beyond K), and the rounds that covered that summed
//! to 35 or 75. And a later round of a directory or file index was K + 2, three symbols
//! for a one-symbol object: a receiver in a burst lost round after round, the rounds'
//! cooldown doubled after the fourth, and it waited a second for a one-symbol file index
//! while the others fetched the file without it, which then went out again for it alone,
//! every block. Measured in the simulation (`examples/sim`, 5% loss in bursts of 5 unless
//! said), server bytes over the data, before and after:
//! - 8 MiB, 100 receivers: 2.40 to 1.86 at seed 11, 3.16 to 1.84 at seed 2 (metadata's
//!   rounds alone: 1.99 and 2.04);
//! - 4 MiB, 1000 receivers, seed 5: 5.03 to 2.59;
//! - a 1,000-file tree: 2.66 to 2.61 (100 receivers, seed 12), 3.91 to 3.44 and 4.47 to
//!   3.80 (1000, seeds 7 and 6), 4.80 to 4.19 (100, seed 7, 20% loss in bursts);
//! - independent loss moved by 0.01 at most, and a lone receiver not at all.
//!
//! Eight steady rounds rather than four (the rounds' cooldown doubles after as many) took
//! bursty loss further, server bytes at N over those at one: 1.91 to 1.77 (4 MiB, 1000
//! receivers, seed 5), 1.49 to 1.43 and 1.48 to 1.45 (8 MiB, 100 receivers, seeds 2 and
//! 11), 2.04 to 1.93 and 1.88 to 1.82 (1,000 files to 16 KiB, 1000 receivers, seeds 7 and
//! 6); independent loss moved by 0.008 at most. Starts spread over 10 s (8 MiB, 5% loss,
//! 100 receivers) cost 11.6 rather than 12.0 times one receiver, 2.2 s median either way
//! and 3.2 s at most against 2.8. Sizes alone held steady for longer cost late joiners, who
//! need most of K, their time: sixteen steady sizes with the cooldown doubling after
//! four made that run 3.9 times one receiver, but 9.2 s median and 12.1 s at most.
//!
//! At seed 11 a server that saw every receiver's losses and sent blocks one after another
//! would send 1.53 symbols per source symbol for a hundred receivers (lcfs then 1.75) and
//! 1.05 for one (lcfs 1.17; `crate::sim::oracle`): most of what was left of the gap between
//! a hundred receivers and one was what blocks sent whole cost under bursts, which blocks
//! taking turns (below) took further.
//!
//! The root record goes out in a burst of [`ROOT_BURST`] copies when its group turns
//! active: a receiver that missed the single copy started `root_interval` after the others,
//! too late for the first rounds of the metadata and the first blocks, which then went out
//! again for it (a fifth of the receivers at 20% loss).
//!
//! In the simulation (seed 11, 4 MiB, 1000 receivers against one) the learned loss took 20%
//! loss from 2.37 to 1.10 times one receiver's bytes and 5% from 1.14 to 1.09, and a file
//! without loss from 1.13 to 1.07 times its data (the old margin started at 15% and came
//! down slowly). The reported loss made 20% hold at every seed (see `sched/loss.rs`).
//!
//! Metadata's first round has a margin of its own, K + max(8, 4 sqrt(K)) at least (it was
//! K + max(4, 2 sqrt(K)), which at 1000 receivers and 20% loss left a few without the file
//! index, and every block sent before its later round went out again for them). A binomial
//! loss's spread grows as sqrt(K), so a fraction of K is no margin for a directory of a few
//! symbols, and a receiver that misses a directory's only round asks for its files a
//! cooldown after the others and gets rounds of its own. In the simulation (100 receivers,
//! 5% loss, seed 11) it took a 4 MiB file from 1.25 to 1.08 times one receiver's bytes, and
//! a 1,000-file tree from 1.43 to 1.20, for 1% more bytes at one receiver. It used to make
//! three receivers of tools/bench's tree_10k fall out of step in the lab (1.96 to 2.02 times
//! one receiver's bytes): the copy that started first no longer waited for a directory's
//! later round, ran ahead, and the others, with only 128 files asked for at a time, never
//! knew the objects it was fetching, so the beacon could not bring them into its rounds.
//! `copy` now asks for 4096 files at a time (see `crate::copy`), and the same lab run gives
//! 1.12 to 1.14 times one receiver's time with the margin, as without it.
//!
//! Each object keeps a cursor, the next ESI to send, which only ever grows (modulo 2^24), also
//! across a leave and a rejoin: source symbols go first, then repair symbols never sent
//! before, so a receiver that joins late or lost packets always gets symbols it lacks. An
//! object nobody asked for during `cursor_reset` starts again from its source symbols: its
//! new listeners hold nothing of it, and source symbols cost neither side any coding (a
//! second receiver of a 256 MiB file an hour later got repair symbols only, and decoded at
//! 68 against 95 MB/s). The root record, while its group is
//! active, is interleaved every `root_interval`.
//!
//! A round goes out whole, back to back, unless loss comes in bursts. Then blocks' first
//! rounds take turns, a symbol each, eight at a time ([`SchedConfig::turns`]), so that a
//! burst of lost packets takes a symbol from each of several blocks, which their margins
//! cover, rather than several from one, which sends a later round for every receiver it
//! hit. Loss counts as bursty when whole first rounds leave far more receivers short than
//! the loss they report would (`sched/loss.rs`); while it does, one first round in
//! [`PROBE`] still goes whole to go on learning from, and later rounds, metadata and any
//! round while a reader waits go whole as ever. Measured in the simulation (`examples/sim`,
//! 5% loss in bursts of 5), server bytes at N receivers over those at one, and at N over
//! the data, before and after:
//! - 8 MiB, 100 receivers: 1.45 to 1.27 (1.80 to 1.56 times the data) at seed 11, 1.43 to
//!   1.27 at seed 2, 1.39 to 1.21 at seed 3; 50 receivers at seed 11, 1.27 to 1.12, where
//!   lcfs now sends 0.89 times the symbols of a server that saw every loss and sent blocks
//!   one after another (`crate::sim::oracle`), which it could not beat before;
//! - 4 MiB, 1000 receivers, seed 5: 1.77 to 1.56 (2.32 to 2.05 times the data); a
//!   transfer this short goes partly whole, as the first losses are learned a cooldown after
//!   the first rounds (42 of 64 blocks in turns);
//! - 1,000 files to 16 KiB: 1.44 to 1.25 (100 receivers, seed 12), 1.82 to 1.52 and 1.93 to
//!   1.69 (1000 receivers, seeds 6 and 7);
//! - independent loss did not move (4 MiB and the tree at 20% and 1000 receivers, 1.08 and
//!   1.10; six seeds no test uses at 5% and 20%, within 0.004).
//!
//! Turns for every round whatever the loss made the bursty rows as good or a little better
//! (8 MiB at 100 receivers, seed 3: 1.16) but cost the independent ones their flatness, for
//! no byte more at many receivers: a lone receiver that decoded leaves while its round's
//! margin is still to go, and in a crowd someone always needs that margin. A 4 MiB file at
//! 20% loss cost one receiver 1.42 rather than 1.59 times the data and 1000 receivers 1.73
//! either way, 1.22 times one receiver (the tree: 1.26). Four blocks in turn rather than
//! eight kept more of the bursts together (8 MiB at 100 receivers, seed 2: 1.55 times the
//! data against 1.48), sixteen kept a block's round apart longer for little more (1.44).
//! Turns cost CPU on both ends: consecutive packets go to different groups, so the sender's
//! UDP GSO runs (one group a run, see `serve::sender`) and the receivers' GRO are one packet
//! long. In the lab (8 copies of a 10,000-file tree on two cores, tbf 200mbit, turns forced
//! on in a scratch build) eight copies took 6.7 to 7.2 s against 4.4 to 5.0 s, for the same
//! bytes; a bench run in which receivers had said their losses came in bursts (a report
//! tried in b1abce0 and reverted) sent 992 rounds in turns and took
//! 8.38 s against 4.28. So turns stay for loss learned in bursts, not for every hint of it.
//! Later rounds in turns too moved nothing (within 0.01): they are a few symbols each, for
//! the few receivers a burst hit. Loss in bursts of 5 at 20% is not told from independent
//! loss (the learned loss is held at `max_loss`, 0.3, against 0.22 reported), and turns
//! would take its tree at 100 receivers only from 1.49 to 1.44.
//!
//! All of this rests on the tracker counting every listener of a group: a first round waits
//! until every receiver fetching in bulk has joined, and the share still listening after it
//! is what loss is learned from. While the tracker counted at most 64 a group, a crowd of
//! 100 read as 64 and rounds began without the rest, who then took each block in later
//! rounds of K/8 (the bursty rows above were measured so). Counting up to 8192 (see
//! `crate::mld::tracker`) took 8 MiB at 100 receivers, seeds 11, 2 and 3, to 1.17, 1.14 and
//! 1.15; 4 MiB at 1000, seed 5, to 1.38; the tree to 1.15 (100, seed 12), 1.25 and 1.57
//! (1000, seeds 6 and 7); and independent loss at 1000 receivers a little too (the tree at
//! 20%: 1.10 to 1.05).
//!
//! While the beacon group has listeners and bulk rounds are queued, a beacon listing the bulk
//! queue's head goes out every `air_interval`. Receivers that started late (or fell behind)
//! join those objects first, and share the rounds under way instead of asking later for
//! rounds of their own: without it, a receiver that starts a second after another trails it
//! for the whole transfer and every block goes out twice.
//!
//! A block that a receiver joined after its last full round began (a receiver that started
//! late, or one whose stall made it join again) gets a round for late joiners
//! ([`Active::late_joiner_round`]): as large as what that listener missed plus the first round's
//! margin, at most a first round, queued at the back of the bulk queue as a first round is
//! (the urgent queue is for stragglers short of a few symbols, and for these rounds too
//! while a reader waits, who must not wait behind every first round asked for), and listed
//! by the beacon as one. First come first served, the bulk queue makes these rounds a
//! carousel: while late receivers keep coming, each block goes out about once per pass over
//! what is asked for, and every receiver that joined since takes it from that pass. The
//! tracker's count of a group's listeners says who is new (it rose since the round began).
//! Before, late receivers took each block in later rounds of K/8 after cooldowns, each group
//! of them at its own place in the file, and their urgent rounds went before the first
//! receivers' first rounds. Measured in the simulation (`examples/sim`, 8 MiB, 5% loss,
//! seed 11 unless said), server bytes over those of a server that keeps nobody waiting
//! longer than one receiver alone (`crate::sim::Report::no_wait_bytes`), and median
//! completion (one receiver alone: 0.9 s), before and after:
//! - 100 receivers starting over 1 s: 1.10 to 1.08 (1.50 to 1.46 s); over 2 s: 1.17 to
//!   0.98 (2.22 to 1.05 s), 1.21 to 1.04 at seed 9014 (2.15 to 1.03 s); over 5 s: 1.25 to
//!   0.89 (2.34 to 1.38 s), without loss 1.12 either way (2.02 to 0.93 s), at 20% loss
//!   1.14 to 1.04 (2.29 to 1.36 s); over 10 s: 0.96 to 1.01 (2.36 to 1.64 s), 1.00 to 1.07
//!   at seed 9013 (2.22 to 1.75 s);
//! - 1000 receivers over 10 s: 1.02 to 0.91 (2.66 to 1.59 s);
//! - a 1,000-file tree, 100 receivers over 5 s (seed 9015): 1.17 to 1.01 (3.24 to 2.68 s);
//! - receivers starting together: independent loss as before to the third decimal (nine
//!   seeds no test uses, 10 to 1000 receivers), bursts within 0.01.
//!
//! A round for late joiners as large as a first round whatever they missed took late receivers
//! faster still (100 over 10 s, seed 9013: 0.96 s median) but cost more (100 over 2 s, seed
//! 9014: 1.23 times the no-wait server). Listeners that come and go, or forged reports, make
//! a block cost a round for late joiners once per [`LATE_JOINER_EVERY`] at most.
//!
//! Metadata has no rounds for late joiners: a directory's later round is whole anyway. But
//! receivers that start apart each ask for every directory of a tree as they start (`copy`
//! and `prefetch` walk the directories first), and a paused directory whose next listener
//! came after all before it had left (a newcomer) resumed at once with a round for it alone,
//! or for two: 100 receivers of a 10,000-file tree in 100 directories starting over 10 s
//! under 5% loss (seed 9406) cost 36 times one receiver's directory symbols, 1.130 times
//! the no-wait server, median 15.1 s against 8.6 s alone. Newcomers' rounds of metadata now
//! go at once while they take no more than [`NEWCOMER_SHARE`] of what is sent; beyond
//! that, a metadata object's next round for newcomers waits until [`METADATA_EVERY`]
//! (500 ms) after its last, for every newcomer that joined meanwhile, and never while a
//! reader waits. That run: 22 times the directories' symbols, 1.026, median 13.7 s; at
//! 20% loss (seed 9302) 1.131 to 1.079; 50 receivers of a 3,000-file tree in 30
//! directories over 5 s (seed 9203) 1.235 to 1.103 (with the fix below). Gathering without the share, every
//! newcomer's round waiting 500 ms after the object's last round of any kind, took the
//! first to 1.041 but cost two other cases. Receivers of one 8 MiB file over 2 s went from
//! 0.875 to 1.064 times the no-wait server, each waiting for a two-symbol file index while
//! the blocks' carousel went on without it. And a crowd under loss in bursts (a 1,000-file
//! tree, 100 receivers) went from 1.17 to 2.15 times one receiver: one that got a parent
//! directory in its later round joined the child just after the crowd's round, waited, and
//! fell out of step with the blocks' rounds. So the first newcomer's round after any other
//! goes at once, and only the share decides when to gather. 250 ms gathered too few
//! newcomers (1.113 at seed 9406), 750 ms held them from the blocks' carousel too long
//! (1.093 at seed 9302, against 1.038 for 500 ms; both without the share). A join within
//! [`REJOIN_WITHIN`] of the leave is a stalled receiver rejoining, not a newcomer.
//!
//! Listeners that joined an object after its first round began are not listeners its
//! margin left short, and the loss learned from MLD leaves them out ([`Active`]'s
//! `joined_after`). Counted in, they made the learned loss climb with the number of late
//! joiners: with newcomers' directories gathered, 100 receivers of a 10,000-file tree
//! starting over 5 s under 5% independent loss (seed 9301) learned 0.08, read it as loss in
//! bursts, sent 1,815 first rounds in turns and cost 1.78 times the no-wait server (median
//! 20.6 s) against 1.04 (11.1 s) without them; 50 receivers of a 3,000-file tree over 5 s
//! (seed 9203) 1.33 against 1.10.
//!
//! A block's first round waits until every receiver fetching in bulk has joined its group,
//! for at most `gather` (250 ms), and not at all while a reader waits somewhere. Receivers
//! say both by joining report groups (`crate::fetch::intent`): the tracker's count of the
//! bulk report's listeners is the number to wait for, and a listener of the hurry report's
//! group ends every wait (a program blocked in `read` must not wait for other machines).
//! Without it, a server faster than its receivers (tools/bench's unshaped link, `--rate 5G`)
//! ends a round in microseconds, and receivers a few milliseconds apart never share one:
//! three copies of tools/bench's tree_10k sharing two cores drifted apart and the server sent
//! 1.9 to 2.6 times the tree (2.2 to 2.3 s, against 0.82 to 0.89 s for one copy); with it,
//! 1.02 to 1.03 times (1.35 to 1.57 s, the copies' CPU), and eight copies 1.04 rather than
//! 1.20 to 1.26 times. A lone receiver never waits (its own join is every bulk receiver's),
//! and on a link the server fills rounds wait in the bulk queue longer than this anyway:
//! shaped runs did not move. The length: in the simulation (a 4,000-file tree at 5 Gbit/s,
//! three receivers starting within 10 ms) 20 ms did not keep receivers in step (1.76 times
//! one receiver's bytes), 100 and 300 ms did (1.003). A server starts at 100 ms
//! (`gather_start`), and misses take the wait up to 250 ms: at 1000 receivers under 5% loss
//! in bursts of 5 the 100 ms waits ran out for 17 of 66 first rounds of a 4 MiB file, whose
//! late joiners then took the block in later rounds. With the longer bound it cost 1.21
//! rather than 1.38 times one receiver's bytes (seed 5; median completion 0.94 s against
//! 0.88), a 1,000-file tree 1.29 rather than 1.57 (seed 7; median 1.37 s against 1.56), and
//! the tree at 100 receivers under 20% in bursts 1.35 rather than 1.39; the rest of the
//! bursty rows and independent loss did not move. Metadata's wait needs the longer bound as
//! much as the blocks' (the tree at seed 7 stayed at 1.59 with it for blocks alone). The
//! wait is only as long as waiting pays ([`next_wait`]): a quarter shorter each time it ran
//! out, none below 1 ms, and twice as long (from 1 ms) each time a round was shared by every
//! bulk receiver after others joined (up to `gather_start`), or missed by one (it joined
//! after the first round began, or wanted the block again within a second of its listeners
//! leaving; up to `gather`). Receivers copying different files would
//! otherwise each get a window of 32 blocks per wait, a fifth of an unshaped link; now the
//! first window waits and the rest do not (two 40 MiB copies at once: 0.72 to 0.77 s, 0.66
//! to 0.71 s without any wait, 2.2 s with a fixed one). The bulk queue is looked at
//! [`RIPE_SCAN`] blocks deep, so a block every receiver listens to does not wait behind one
//! that waits for them. A forged bulk report makes first rounds wait for a receiver that
//! never comes, as one copying other files does, and a forged hurry report only ends the
//! waiting; a forged leave of the hurry group makes a reader's rounds wait until its host
//! answers the tracker's query.
//!
//! Metadata's first rounds wait in the same way, with a wait of their own that learns as the
//! blocks' does ([`Waits`]); their queue is looked at [`RIPE_SCAN`] deep, later rounds never
//! wait behind it, and it waits behind later rounds for `bulk_patience` symbols at most. A directory's round is over in a millisecond, so copies a few
//! milliseconds apart each asked for rounds of their own: eight copies of tools/bench's
//! tree_10k in the lab sent 80 to 100 later rounds of the tree's 101 directories, and the
//! copies that had missed one stayed behind until the blocks' wait caught them up. With it
//! (and copies that say they fetch in bulk from their start, see `crate::fetch::intent`):
//! no later round of either kind in three runs, the server's bytes 1.01 times one copy's
//! rather than 1.03 to 1.05, eight copies 4.15 to 4.47 s against 4.27 to 4.57 s; three
//! unshaped copies 1.29 to 1.45 s against 1.38 to 1.40 s, with 0 to 19 later rounds of
//! directories against 126 to 200 (alternating runs in a netlab lab). In tools/bench (seed
//! 9191) eight copies' bytes went from 1.047 to 1.016 times one copy's. The cost: a receiver
//! copying other files than the rest waits for its first lookups until the wait has run out
//! a few times: in a path's lookups one after another, 100 + 75 + 56 + 42 ms at the most.
//!
//! A leave is not trusted (anyone on the link can forge one; see `crate::mld::tracker`): when
//! the last listener of an object says it left, the tracker asks whether others still listen
//! and reports the object *leaving*. A leaving object is paused at once, as a leave always
//! stopped it (sending on until the query's answer sent 2.3 rather than about 1.7 times the
//! tree in the lossy three-receiver test: rounds queued or under way when receivers leave
//! are mostly not needed), but keeps its state: if a listener answers the query (within the
//! tracker's Last Listener Query Interval, 250 ms), it resumes exactly where it stopped, with
//! the rest of its round; if nobody does, the tracker reports it inactive and it is dropped.
//! So a forged leave costs a real receiver one query's answer, not a stall and a rejoin.
//!
//! Nothing can starve the bulk queue, because a listener may never leave: a receiver stopped
//! mid-transfer (SIGSTOP, a hung process: the kernel still answers queries for it) or a
//! hostile host that joins every group it sees keeps objects listened to forever, and with
//! strict priority their later rounds filled the urgent queue and no new block went out (a
//! real copy stalled beside a host that did this). So:
//! - a bulk round that has waited behind `bulk_patience` (2048) urgent symbols goes next, so
//!   new objects get at least a round per 2048 symbols (a quarter of a second at 100 Mbit/s).
//!   Honest later rounds (32 objects in flight, K/8 to K symbols a block) rarely keep the queue
//!   busy that long (at most once a run in the lossy three-receiver test), so they keep their
//!   priority: alternating every round with bulk sent about 8% more bytes there, stragglers
//!   falling out of step. Counted in symbols, unlike in time, the limit does not fire when
//!   the sending thread merely waited for a core;
//! - an object that still has listeners after `steady_rounds` later rounds waits twice as
//!   long after each further round, up to `max_cooldown`, so an object listened to forever
//!   costs about one round per `max_cooldown` (honest stragglers need a few rounds at most).
//!   A round for late joiners starts the count again, and comes once per [`LATE_JOINER_EVERY`] at
//!   most, so listeners that come and go forever cost a block at most four first rounds a
//!   second, in the bulk queue with everyone else's.
//!
//! The pacer counts wire bytes (payload plus IPv6 and UDP headers): it holds the average to
//! `rate` and lets at most `burst` bytes out at once, because multicast has no congestion
//! control and an unpaced sender floods the link. Time the sending thread lost while it had
//! packets to send (waiting for a core, or loading an encoder) is made up, up to [`CATCH_UP`]
//! or [`CATCH_UP_MAX`] whichever is less, at twice the rate at most ([`Pacer`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::wire::channel::Report;
use crate::wire::fec::Esi;
use crate::wire::object::ObjectHash;

mod loss;
use loss::Loss;

/// What to send next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transmit {
    Root,
    /// A beacon of the bulk queue's head ([`Scheduler::on_air`]).
    Air,
    Symbol {
        hash: ObjectHash,
        esi: Esi,
    },
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
    /// After this long without listeners an object starts again at ESI 0.
    pub cursor_reset: Duration,
    /// The receivers' loss assumed at the start, before anything was reported or learned
    /// (see `sched/loss.rs`).
    pub start_loss: f64,
    /// The most loss the first round is ever sized for, learned or reported; 0 sends K source
    /// symbols and no margin (tests). The learned estimate assumes losses independent from symbol
    /// to symbol; bursts (Gilbert-Elliott, 10% in bursts of 20 symbols) leave receivers short
    /// whatever the margin, and unbounded it climbed to 0.5: one receiver of a 2,000-file tree cost
    /// 1.90 times the data, against 1.42 with the old margin of at most 15%. At 0.3 it cost
    /// 1.69 (1.54 since receivers report their loss, 10%), and 20% independent loss, which the
    /// estimate puts at 0.21, kept its figures.
    pub max_loss: f64,
    /// How often the beacon goes out while its group has listeners and bulk is queued.
    pub air_interval: Duration,
    /// Later rounds after which the cooldown, and a block's later round, double with each
    /// further round.
    pub steady_rounds: u32,
    /// The longest pause between rounds of an object whose listeners never leave.
    pub max_cooldown: Duration,
    /// Urgent symbols a queued bulk round lets go first, at most, before it goes.
    pub bulk_patience: u32,
    /// The longest a first round waits for every receiver fetching in bulk to join
    /// it (see the module docs; the wait itself adapts below this); never while a reader
    /// waits.
    pub gather: Duration,
    /// The wait a server starts with, below `gather`: receivers copying different files
    /// pay it once or twice before it shrinks, a crowd whose rounds are missed doubles it.
    pub gather_start: Duration,
    /// Blocks whose first rounds go out in turns, a symbol each, while loss comes in bursts
    /// (see the module docs); 1 sends every round whole.
    pub turns: usize,
}

impl SchedConfig {
    /// The wait first rounds start with, and the longest that shared rounds bring it to.
    pub fn first_wait(&self) -> Duration {
        self.gather_start.min(self.gather)
    }
}

impl Default for SchedConfig {
    fn default() -> Self {
        SchedConfig {
            root_interval: Duration::from_millis(25),
            cooldown: Duration::from_millis(60),
            remembered_cursors: 1 << 16,
            cursor_reset: Duration::from_secs(2),
            start_loss: 0.02,
            max_loss: 0.3,
            air_interval: Duration::from_millis(50),
            steady_rounds: 8,
            max_cooldown: Duration::from_secs(1),
            bulk_patience: 2048,
            gather: Duration::from_millis(250),
            gather_start: Duration::from_millis(100),
            turns: 8,
        }
    }
}

/// An active object's progress.
struct Active {
    k: u32,
    /// When its first listener joined: its first round waits at most `wait` after it.
    since: Instant,
    urgent: bool,
    /// Symbols left in the current round.
    budget: u32,
    /// Rounds completed since the object became active.
    rounds: u32,
    /// When the first round ended.
    first_done: Option<Instant>,
    /// When the object last lost its listeners, until its first symbol of this activation.
    idle_since: Option<Instant>,
    /// When its last listener said it left, while the tracker checks whether others listen:
    /// the object is in no queue and waits for a listener or the end.
    leaving: Option<Instant>,
    /// The first round's size, set when its first symbol goes out, so that it is sized by
    /// all that was learned until then (a copy asks for 32 objects at once).
    first: Option<u32>,
    /// Stored listeners now (the tracker counts at most `max_listeners_per_group`).
    listeners: usize,
    /// The most listeners while the first round went out.
    heard: usize,
    /// Listeners that joined after the first round began, and of them those that joined
    /// before it ended: not listeners its margin left short.
    joined_after: usize,
    joined_during: usize,
    /// Its first round goes out back to back, not in turns with other blocks': what the
    /// loss is learned from.
    whole: bool,
    /// The most symbols that a listener who joined since the last full round began had
    /// missed when it joined: what a round for late joiners must bring
    /// ([`Active::late_joiner_round`]).
    missed: u32,
    /// Symbols sent since the last full round began.
    sent_since_full: u32,
    /// When the last round for late joiners was queued.
    late_joiner_at: Option<Instant>,
    /// Later rounds since its last full round (the first, or one for late joiners).
    since_full: u32,
    /// When its last round for a newcomer (a listener that came after all before it had
    /// left) goes out: a metadata object's next such round waits until [`METADATA_EVERY`]
    /// after it.
    newcomer_at: Option<Instant>,
}

impl Active {
    /// Everyone left after the first round's K source symbols went out and before a second
    /// round: the first was enough, and `loss` learns so. (Counting only leaves after its
    /// end, as before, missed every object whose receivers decoded while its margin was
    /// still going out, which on a fast uplink is all of them without loss: the margin never
    /// came down.)
    fn learn_if_first_round_sufficed(&self, loss: &mut Loss) {
        let Some(first) = self.first else {
            return;
        };
        if self.rounds == 0 && !self.urgent && self.whole && first - self.budget >= self.k {
            loss.observe(self.k, first, 0, self.heard);
        }
    }

    /// A round for listeners that joined after its last full round began, if one is due: as
    /// large as what the one that missed most lacks (what it missed plus the first round's
    /// margin, at most a first round, `full`), when that is more than a later round brings
    /// and the last such round was queued [`LATE_JOINER_EVERY`] ago or more. Blocks only: a
    /// metadata object's later rounds are whole anyway.
    fn late_joiner_round(&mut self, now: Instant, full: u32) -> bool {
        let size = full.min(self.missed.saturating_add(full.saturating_sub(self.k)));
        if self.urgent || self.missed == 0 || size <= block_later_base(self.k) {
            self.missed = 0;
            return false;
        }
        if self
            .late_joiner_at
            .is_some_and(|t| now.saturating_duration_since(t) < LATE_JOINER_EVERY)
        {
            return false;
        }
        self.rounds += 1;
        self.since_full = 0;
        self.sent_since_full = 0;
        self.missed = 0;
        self.late_joiner_at = Some(now);
        self.budget = size;
        true
    }

    /// The next later round's size (see the module doc): a metadata object's is its least
    /// first round; a block's is K/8 for `steady` rounds, then doubles, at most K.
    fn later_round(&mut self, steady: u32) {
        self.rounds += 1;
        self.since_full += 1;
        self.budget = if self.urgent {
            metadata_round(self.k)
        } else {
            let base = block_later_base(self.k);
            let doublings = self.since_full.saturating_sub(steady).min(8);
            base.saturating_mul(1 << doublings).min(self.k.max(2))
        };
    }
}

/// A block's later rounds before they double: K/8, at least 2.
fn block_later_base(k: u32) -> u32 {
    (k / 8).max(2)
}

/// The least first round of a metadata object: its K plus a margin that covers a binomial
/// loss's spread, which grows as sqrt(K), so that nearly every receiver decodes it at once.
fn metadata_round(k: u32) -> u32 {
    let spread = (4.0 * f64::from(k).sqrt()).ceil() as u32;
    k + spread.max(8)
}

/// What the scheduler did, per class of object, for logs and benchmarks.
#[derive(Clone, Debug, Default)]
pub struct SchedStats {
    /// [urgent, bulk]: times an object became active.
    pub activations: [u64; 2],
    /// [urgent, bulk]: sum of K over activations.
    pub source_symbols: [u64; 2],
    /// [urgent, bulk]: symbols sent.
    pub sent: [u64; 2],
    /// [urgent, bulk]: rounds after the first.
    pub later_rounds: [u64; 2],
    /// Activations of objects without a remembered cursor: the distinct objects activated,
    /// while they are fewer than `remembered_cursors`. (A set of every object ever activated
    /// held one entry per object for the life of the server: 9 MB after a 10 GiB file.)
    pub distinct: u64,
    /// Blocks whose listeners all left within 10, 20, 40, 80, 160 ms or later after the end
    /// of the first round: how long MLD leaves take to arrive.
    pub leave_delay: [u64; 6],
    /// Bulk rounds sent ahead of urgent ones because they had waited `bulk_patience`.
    pub bulk_turns: u64,
    /// First rounds that began [listened to by every receiver fetching in bulk, when
    /// a reader waited, when the wait ran out].
    pub gathered: [u64; 3],
    /// Blocks' first rounds sent in turns with others', as loss came in bursts.
    pub in_turns: u64,
    /// Blocks' rounds for listeners that joined after the last full round began (also
    /// counted in `later_rounds`).
    pub late_joiner_rounds: u64,
}

pub struct Scheduler {
    config: SchedConfig,
    stats: SchedStats,
    /// Later rounds, and the rest of a first round resumed after a leave: never wait.
    urgent: VecDeque<ObjectHash>,
    /// Metadata's first rounds, while they may wait for the receivers fetching in bulk.
    metadata: VecDeque<ObjectHash>,
    bulk: VecDeque<ObjectHash>,
    active: HashMap<ObjectHash, Active>,
    /// Objects between rounds, by when they resume.
    cooling: Cooling,
    /// Urgent symbols sent while a bulk round waited.
    bulk_waited: u32,
    /// A bulk round goes first until it ends: the bulk queue waited `bulk_patience`.
    bulk_turn: bool,
    /// Urgent symbols sent while metadata that may go waited.
    metadata_waited: u32,
    cursors: HashMap<ObjectHash, Esi>,
    /// When objects that have a cursor last lost their listeners.
    idle_since: HashMap<ObjectHash, Instant>,
    loss: Loss,
    root_active: bool,
    next_root: Option<Instant>,
    /// Copies of the root record still to go back to back.
    root_burst: u32,
    air_active: bool,
    next_air: Option<Instant>,
    /// Receivers fetching in bulk, as counted by the tracker (at most its listeners per group).
    bulk_receivers: usize,
    /// A reader waits for a block somewhere: no first round waits.
    hurry: bool,
    waits: Waits,
    /// Blocks' first rounds begun while loss came in bursts: every [`PROBE`]th goes whole.
    bursty_firsts: u32,
    /// Symbols that metadata's rounds for newcomers may still take at once
    /// ([`NEWCOMER_SHARE`] of what is sent, up to [`NEWCOMER_CREDIT`]).
    newcomer_credit: f64,
}

/// How long first rounds now wait for the receivers fetching in bulk, at most, as waiting
/// pays ([`next_wait`]), up to `gather`: blocks' and metadata's, each learned from its own
/// class, so that a burst of lookups that ran out (a copy a moment behind the others) does
/// not end the blocks' wait, which keeps copies in step. With one wait for both, three
/// unshaped copies of tools/bench's tree_10k fell out of step in one run of two (1.2 times
/// the tree's bytes). A cap of 50 ms on metadata's wait was too short for eight copies on
/// two cores: 72 and 125 later rounds of directories in two runs of three.
#[derive(Clone, Copy, Debug)]
struct Waits {
    blocks: Duration,
    metadata: Duration,
}

impl Waits {
    fn learn(&mut self, metadata: bool, config: &SchedConfig, what: Waited) {
        if metadata {
            self.metadata = next_wait(self.metadata, config, what);
        } else {
            self.blocks = next_wait(self.blocks, config, what);
        }
    }
}

impl Scheduler {
    pub fn new(config: SchedConfig) -> Scheduler {
        Scheduler {
            stats: SchedStats::default(),
            loss: Loss::new(config.start_loss, config.max_loss),
            waits: Waits {
                blocks: config.first_wait(),
                metadata: config.first_wait(),
            },
            config,
            urgent: VecDeque::new(),
            metadata: VecDeque::new(),
            bulk: VecDeque::new(),
            active: HashMap::new(),
            cooling: Cooling::default(),
            bulk_waited: 0,
            bulk_turn: false,
            metadata_waited: 0,
            cursors: HashMap::new(),
            idle_since: HashMap::new(),
            root_active: false,
            next_root: None,
            root_burst: 0,
            air_active: false,
            next_air: None,
            bulk_receivers: 0,
            hurry: false,
            bursty_firsts: 0,
            newcomer_credit: NEWCOMER_CREDIT,
        }
    }

    /// An object's group gained its first listener; `k` is its number of source symbols and
    /// `urgent` marks metadata.
    pub fn handle_active(&mut self, now: Instant, hash: ObjectHash, k: u32, urgent: bool) {
        if let Some(a) = self.active.get_mut(&hash) {
            if let Some(left) = a.leaving.take() {
                // A join right after the leave is a receiver rejoining (a stalled fetch
                // does, see `crate::fetch::state`): one that was listening all along.
                let newcomer = now.saturating_duration_since(left) >= REJOIN_WITHIN;
                self.resume(now, hash, newcomer);
            }
            return;
        }
        let idle_since = self.idle_since.remove(&hash);
        // Wanted again right after its listeners left: a round this one could have shared.
        if idle_since.is_some_and(|t| now.saturating_duration_since(t) < MISSED_WITHIN) {
            self.waits.learn(urgent, &self.config, Waited::Missed);
        }
        self.active.insert(
            hash,
            Active {
                k,
                since: now,
                urgent,
                budget: 0,
                first: None,
                rounds: 0,
                first_done: None,
                idle_since,
                leaving: None,
                listeners: 1,
                heard: 1,
                joined_after: 0,
                joined_during: 0,
                whole: true,
                since_full: 0,
                sent_since_full: 0,
                missed: 0,
                late_joiner_at: None,
                newcomer_at: None,
            },
        );
        let class = usize::from(!urgent);
        self.stats.activations[class] += 1;
        self.stats.source_symbols[class] += k as u64;
        if !self.cursors.contains_key(&hash) {
            self.stats.distinct += 1;
        }
        if urgent {
            self.metadata.push_back(hash);
        } else {
            self.bulk.push_back(hash);
        }
        self.cursors.entry(hash).or_default();
    }

    /// The last listener of an object said it left; the tracker checks whether others still
    /// listen. The object pauses where it is.
    pub fn handle_leaving(&mut self, now: Instant, hash: &ObjectHash) {
        let Some(a) = self.active.get_mut(hash) else {
            return;
        };
        if a.leaving.is_some() {
            return;
        }
        a.leaving = Some(now);
        Self::note_leave(&mut self.stats, a, now);
        a.learn_if_first_round_sufficed(&mut self.loss);
        self.withdraw(hash);
    }

    /// The number of `hash`'s listeners changed to `n`.
    pub fn handle_listeners(&mut self, hash: &ObjectHash, n: usize) {
        if let Some(a) = self.active.get_mut(hash) {
            // A receiver joined an object whose first round had begun: it needs a round of
            // its own, which a longer wait would have spared.
            let missed = n > a.listeners && a.first.is_some() && a.rounds == 0;
            if n > a.listeners && a.first.is_some() {
                a.missed = a.missed.max(a.sent_since_full);
                a.joined_after += n - a.listeners;
                if a.first_done.is_none() {
                    a.joined_during += n - a.listeners;
                }
            }
            a.listeners = n;
            if a.first_done.is_none() {
                a.heard = a.heard.max(n);
            }
            if missed {
                self.waits.learn(a.urgent, &self.config, Waited::Missed);
            }
        }
    }

    /// A paused object whose listener answered: the rest of its round, or its next round
    /// (a metadata object's no sooner than [`METADATA_EVERY`] after its last when a
    /// `newcomer` asks and no reader waits).
    fn resume(&mut self, now: Instant, hash: ObjectHash, newcomer: bool) {
        let Some(a) = self.active.get_mut(&hash) else {
            return;
        };
        let between = a.first.is_some() && a.budget == 0;
        if between && newcomer && a.urgent {
            let cost = f64::from(metadata_round(a.k));
            let at = a.newcomer_at.map_or(now, |t| t + METADATA_EVERY);
            if at > now && !self.hurry && self.newcomer_credit < cost {
                a.newcomer_at = Some(at);
                self.cooling.insert(at, hash);
                return;
            }
            self.newcomer_credit = (self.newcomer_credit - cost).max(0.0);
            a.newcomer_at = Some(now);
        }
        if between {
            a.later_round(self.config.steady_rounds);
            self.stats.later_rounds[usize::from(!a.urgent)] += 1;
        }
        match (a.first, a.urgent) {
            (Some(_), _) => self.urgent.push_back(hash),
            (None, true) => self.metadata.push_back(hash),
            (None, false) => self.bulk.push_back(hash),
        }
    }

    /// Takes `hash` out of every queue.
    fn withdraw(&mut self, hash: &ObjectHash) {
        self.urgent.retain(|h| h != hash);
        self.metadata.retain(|h| h != hash);
        self.bulk.retain(|h| h != hash);
        self.cooling.remove(hash);
    }

    /// How long after the end of its first round a block's listeners left.
    fn note_leave(stats: &mut SchedStats, a: &Active, now: Instant) {
        if let (Some(t), false) = (a.first_done, a.urgent) {
            let ms = now.saturating_duration_since(t).as_millis();
            let bucket = [10, 20, 40, 80, 160]
                .iter()
                .position(|&b| ms < b)
                .unwrap_or(5);
            stats.leave_delay[bucket] += 1;
        }
    }

    pub fn handle_inactive(&mut self, now: Instant, hash: &ObjectHash) {
        let Some(a) = self.active.remove(hash) else {
            return;
        };
        if a.leaving.is_none() {
            Self::note_leave(&mut self.stats, &a, now);
            a.learn_if_first_round_sufficed(&mut self.loss);
            self.withdraw(hash);
        }
        self.idle_since.insert(*hash, a.leaving.unwrap_or(now));
        if self.cursors.len() > self.config.remembered_cursors {
            let active = &self.active;
            self.cursors.retain(|h, _| active.contains_key(h));
            self.idle_since.retain(|h, _| active.contains_key(h));
        }
    }

    pub fn handle_root(&mut self, now: Instant, active: bool) {
        self.root_active = active;
        self.next_root = active.then_some(now);
        self.root_burst = if active { ROOT_BURST } else { 0 };
    }

    pub fn handle_air(&mut self, now: Instant, active: bool) {
        self.air_active = active;
        self.next_air = active.then_some(now);
    }

    /// The first `n` objects of the bulk queue: what goes out next, soonest first.
    pub fn on_air(&self, n: usize) -> Vec<ObjectHash> {
        self.bulk.iter().take(n).copied().collect()
    }

    /// Restarts an object's symbols at zero (after its bytes were found to have changed).
    pub fn forget(&mut self, now: Instant, hash: &ObjectHash) {
        self.handle_inactive(now, hash);
        self.cursors.remove(hash);
    }

    /// True when nothing is queued, cooling or repeating (paused objects wait for an event).
    pub fn is_idle(&self) -> bool {
        self.urgent.is_empty()
            && self.metadata.is_empty()
            && self.bulk.is_empty()
            && self.cooling.is_empty()
            && !self.root_active
    }

    pub fn active_objects(&self) -> usize {
        self.active.len()
    }

    pub fn stats(&self) -> &SchedStats {
        &self.stats
    }

    /// The receivers' loss the first rounds are sized for now.
    pub fn loss(&self) -> f64 {
        self.loss.learned()
    }

    /// Loss comes in bursts: blocks' first rounds go in turns.
    pub fn bursty(&self) -> bool {
        self.loss.bursty()
    }

    /// How many receivers report their loss, and the mean they report.
    pub fn reported_loss(&self) -> (usize, f64) {
        self.loss.reported()
    }

    /// `listeners` receivers report `report`.
    pub fn handle_report(&mut self, report: Report, listeners: usize) {
        match report {
            Report::Loss(level) => self.loss.handle_reported(level, listeners),
            Report::Bulk => self.bulk_receivers = listeners,
            Report::Hurry => self.hurry = listeners > 0,
        }
    }

    /// The next packet to send at `now`, or None when there is nothing to send until
    /// [`Scheduler::poll_timeout`].
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        if let Some(at) = self.next_root.filter(|&at| at <= now) {
            self.root_burst = self.root_burst.saturating_sub(1);
            self.next_root = Some(if self.root_burst > 0 {
                now
            } else {
                at.max(now - self.config.root_interval) + self.config.root_interval
            });
            return Some(Transmit::Root);
        }
        if let Some(at) = self
            .next_air
            .filter(|&at| at <= now && !self.bulk.is_empty())
        {
            self.next_air = Some(at.max(now - self.config.air_interval) + self.config.air_interval);
            return Some(Transmit::Air);
        }
        self.resume_cooled(now);
        let from = self.pick(now)?;
        let from_bulk = from == Queue::Bulk;
        let queue = match from {
            Queue::Urgent => &mut self.urgent,
            Queue::Metadata => &mut self.metadata,
            Queue::Bulk => &mut self.bulk,
        };
        let hash = *queue.front()?;
        let a = self.active.get_mut(&hash)?;
        if a.first.is_none() {
            // What the wait came to decides the next one (`next_wait`): a round every bulk
            // receiver shares after others joined, or a wait that ran out.
            let all = a.listeners >= self.bulk_receivers;
            let ran_out = !all && !self.hurry;
            let outcome = usize::from(!all) + usize::from(ran_out);
            self.stats.gathered[outcome] += 1;
            let waited = match (all && a.heard > 1, ran_out) {
                (true, _) => Some(Waited::Gained),
                (false, true) => Some(Waited::RanOut),
                (false, false) => None,
            };
            if let Some(w) = waited {
                self.waits.learn(a.urgent, &self.config, w);
            }
            let size = self.loss.first_round(a.k);
            a.budget = if a.urgent {
                size.max(metadata_round(a.k))
            } else {
                size
            };
            a.first = Some(a.budget);
            if from_bulk && self.config.turns > 1 && !self.hurry && self.loss.bursty() {
                self.bursty_firsts = self.bursty_firsts.wrapping_add(1);
                a.whole = self.bursty_firsts.is_multiple_of(PROBE);
                self.stats.in_turns += u64::from(!a.whole);
            }
        }
        a.budget = a.budget.saturating_sub(1);
        a.sent_since_full = a.sent_since_full.saturating_add(1);
        self.stats.sent[usize::from(!a.urgent)] += 1;
        self.newcomer_credit = (self.newcomer_credit + NEWCOMER_SHARE).min(NEWCOMER_CREDIT);
        if a.budget == 0 {
            if a.rounds == 0 {
                a.first_done = Some(now);
            }
            queue.pop_front();
            self.bulk_turn &= !from_bulk;
            let pause = cooldown_after(&self.config, a.since_full);
            self.cooling.insert(now + pause, hash);
        } else if from_bulk && !a.whole {
            // Its turn is over: the next symbol is the next block's in turn.
            queue.pop_front();
            queue.insert((self.config.turns - 1).min(queue.len()), hash);
        }
        let cursor = self.cursors.entry(hash).or_default();
        if let Some(t) = a.idle_since.take() {
            if now.saturating_duration_since(t) >= self.config.cursor_reset {
                *cursor = Esi(0);
            }
        }
        let esi = *cursor;
        *cursor = cursor.next();
        Some(Transmit::Symbol { hash, esi })
    }

    /// Which queue the next symbol comes from, None when none may go now: later rounds
    /// first, then metadata's first rounds, then blocks'; but metadata that has waited
    /// behind `bulk_patience` urgent symbols goes next, and so does a bulk round that has
    /// waited behind `bulk_patience` symbols of the others (then until it ends).
    fn pick(&mut self, now: Instant) -> Option<Queue> {
        // A round goes out whole: a metadata round under way goes on first.
        let begun = |h: &ObjectHash| self.active.get(h).is_some_and(|a| a.first.is_some());
        let other = if self.metadata.front().is_some_and(begun) {
            Some(Queue::Metadata)
        } else if self.urgent.is_empty() || self.metadata_waited >= self.config.bulk_patience {
            // Metadata that may go goes when nothing is urgent, and after `bulk_patience`
            // urgent symbols at the latest: later rounds that never end (listeners that
            // never leave) must not starve lookups.
            self.metadata_waited = 0;
            if self.ripe_first(Queue::Metadata, now) {
                Some(Queue::Metadata)
            } else {
                (!self.urgent.is_empty()).then_some(Queue::Urgent)
            }
        } else {
            if self.ripe_first(Queue::Metadata, now) {
                self.metadata_waited += 1;
            }
            Some(Queue::Urgent)
        };
        if !self.ripe_first(Queue::Bulk, now) {
            self.bulk_turn = false;
            self.bulk_waited = 0;
            return other;
        }
        if other.is_none() || self.bulk_turn {
            self.bulk_waited = 0;
            return Some(Queue::Bulk);
        }
        self.bulk_waited += 1;
        if self.bulk_waited >= self.config.bulk_patience {
            self.bulk_turn = true;
            self.stats.bulk_turns += 1;
        }
        if self.bulk_turn {
            Some(Queue::Bulk)
        } else {
            other
        }
    }

    /// Objects whose cooldown ended still have listeners: a round for late joiners if some
    /// joined late (in the bulk queue, or the urgent one while a reader waits), else a later
    /// round, urgently.
    fn resume_cooled(&mut self, now: Instant) {
        while let Some(hash) = self.cooling.pop_due(now) {
            let Some(a) = self.active.get_mut(&hash) else {
                continue;
            };
            if let (0, false, true, Some(first)) = (a.rounds, a.urgent, a.whole, a.first) {
                let still = a.listeners.saturating_sub(a.joined_after);
                let of = a.heard.saturating_sub(a.joined_during);
                self.loss.observe(a.k, first, still, of);
            }
            self.stats.later_rounds[usize::from(!a.urgent)] += 1;
            if a.late_joiner_round(now, self.loss.first_round(a.k)) {
                self.stats.late_joiner_rounds += 1;
                // A reader blocked somewhere must not wait behind every queued first round.
                if self.hurry {
                    self.urgent.push_back(hash);
                } else {
                    self.bulk.push_back(hash);
                }
                continue;
            }
            a.later_round(self.config.steady_rounds);
            self.urgent.push_back(hash);
        }
    }

    /// When `a` may go: at once when its first round began, when a reader waits, or when
    /// every receiver fetching in bulk listens to it; else `wait` after its first listener
    /// joined. A directory's first round is over in a
    /// millisecond, and a copy that joins it later waits a cooldown for a round of its own.
    fn ripe_at(&self, a: &Active) -> Instant {
        if a.first.is_some() || self.hurry || a.listeners >= self.bulk_receivers {
            a.since
        } else if a.urgent {
            a.since + self.waits.metadata
        } else {
            a.since + self.waits.blocks
        }
    }

    /// When the first of a queue's first [`RIPE_SCAN`] may go; None when it is empty.
    fn ripe_at_of(&self, queue: &VecDeque<ObjectHash>) -> Option<Instant> {
        let queued = queue.iter().take(RIPE_SCAN);
        queued
            .filter_map(|h| self.active.get(h))
            .map(|a| self.ripe_at(a))
            .min()
    }

    /// Puts the first of a waiting queue's first [`RIPE_SCAN`] that may go now in front, so
    /// that an object every receiver listens to does not wait behind one that waits for
    /// them; false when none may go.
    fn ripe_first(&mut self, which: Queue, now: Instant) -> bool {
        let queue = match which {
            Queue::Metadata => &self.metadata,
            _ => &self.bulk,
        };
        let ripe = |h: &ObjectHash| self.active.get(h).is_some_and(|a| self.ripe_at(a) <= now);
        let Some(i) = queue.iter().take(RIPE_SCAN).position(ripe) else {
            return false;
        };
        let queue = match which {
            Queue::Metadata => &mut self.metadata,
            _ => &mut self.bulk,
        };
        if let Some(h) = queue.remove(i) {
            queue.push_front(h);
        }
        true
    }

    /// How long a block's first round now waits for the receivers fetching in bulk, at most.
    pub fn gather_wait(&self) -> Duration {
        self.waits.blocks
    }

    /// Receivers that say they fetch in bulk (at most the tracker's listeners per group).
    pub fn bulk_receivers(&self) -> usize {
        self.bulk_receivers
    }

    /// When the scheduler next has something to send (a time passed: now), if it has
    /// nothing now (None: something now, or nothing until an event when [`Self::is_idle`]).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if !self.urgent.is_empty() {
            return None;
        }
        // The beacon goes on while blocks wait: it tells late receivers what they wait for.
        let air = self.next_air.filter(|_| !self.bulk.is_empty());
        [
            self.cooling.next_due(),
            self.next_root,
            air,
            self.ripe_at_of(&self.metadata),
            self.ripe_at_of(&self.bulk),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

/// Objects between rounds, by when they resume; those due at one instant in the order they
/// came.
#[derive(Default)]
struct Cooling {
    due: BTreeMap<(Instant, u64), ObjectHash>,
    seq: u64,
}

impl Cooling {
    fn insert(&mut self, at: Instant, hash: ObjectHash) {
        self.due.insert((at, self.seq), hash);
        self.seq += 1;
    }

    fn remove(&mut self, hash: &ObjectHash) {
        self.due.retain(|_, h| h != hash);
    }

    fn next_due(&self) -> Option<Instant> {
        self.due.first_key_value().map(|((t, _), _)| *t)
    }

    /// The first object due at `now`, taken out.
    fn pop_due(&mut self, now: Instant) -> Option<ObjectHash> {
        self.next_due().filter(|t| *t <= now)?;
        self.due.pop_first().map(|(_, h)| h)
    }

    fn is_empty(&self) -> bool {
        self.due.is_empty()
    }
}

/// An object wanted again within this of its listeners leaving was a round missed: the
/// receiver that wants it now could have shared the last one.
const MISSED_WITHIN: Duration = Duration::from_secs(1);

/// The least time between two rounds of one block for listeners that joined late
/// ([`Active::late_joiner_round`]): what listeners that come and go (or forged reports) can make a
/// block cost, at most four first rounds a second, where late joiners that keep coming
/// over seconds need one about every time the file takes.
const LATE_JOINER_EVERY: Duration = Duration::from_millis(250);

/// The least time between two rounds of a metadata object for newcomers (listeners that
/// came after all before them had left) once such rounds take more than [`NEWCOMER_SHARE`],
/// while no reader waits (see the module docs): receivers that start apart each ask for
/// every directory of a tree as they start, and a round at once for each cost a round per
/// receiver or two.
const METADATA_EVERY: Duration = Duration::from_millis(500);

/// The share of the symbols sent that metadata's rounds for newcomers may take at once:
/// a file's index and directory are a round of a few symbols per newcomer, which holding
/// back costs more blocks than it saves; a tree's hundred directories are 3.5% of its bytes
/// per newcomer, and at ten newcomers a second would take a third of the link.
const NEWCOMER_SHARE: f64 = 0.05;

/// The most symbols metadata's rounds for newcomers take at once, before the share refills:
/// the index and directory of a file for a hundred newcomers, or half a tree of a hundred
/// directories for one.
const NEWCOMER_CREDIT: f64 = 1024.0;

/// A join this soon after an object's last listener left is that listener rejoining, not
/// a newcomer: a stalled receiver leaves and joins at once, and the two reports arrive
/// together.
const REJOIN_WITHIN: Duration = Duration::from_millis(10);

/// Objects at a waiting queue's head looked at for one that may go before it.
const RIPE_SCAN: usize = 16;

/// While loss comes in bursts, one block's first round in this many still goes whole: the
/// loss is learned from those alone (rounds in turns spread bursts, so they would say that
/// loss no longer comes in bursts, and rounds would go whole again).
const PROBE: u32 = 8;

/// The scheduler's queues.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Queue {
    Urgent,
    Metadata,
    Bulk,
}

/// What a first round's wait for the receivers fetching in bulk came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Waited {
    /// Every receiver fetching in bulk listened when its first round began, and more than
    /// one did.
    Gained,
    /// Its wait ran out before every receiver fetching in bulk listened.
    RanOut,
    /// A receiver joined it after its first round began, or wanted it again within
    /// [`MISSED_WITHIN`] of its listeners leaving.
    Missed,
}

/// The wait after `what`: twice as long (1 ms at least) when a round was missed by one, up
/// to `gather`, or shared by every bulk receiver, up to [`SchedConfig::first_wait`] (a wait
/// already longer stays); a quarter shorter when it ran out, and none below 1 ms. Only
/// misses, a receiver that came after the round began, say that a longer wait would have
/// paid: receivers that share a tree's top directories and then read different files
/// gained at first and ran out ever after, and a gain that doubled to 250 ms held each of
/// their lookups that long (two copies of 12 files at 5 Gbit/s: 0.53 s against 0.23 s).
/// Receivers copying different files each ran out every wait, and a window of 32 blocks
/// per 100 ms is a fifth of an unshaped link; the wait is gone within one window. Receivers that share some blocks and not others settle where misses and waits
/// that ran out balance (about two in five shared blocks missed), not at the longest wait.
fn next_wait(wait: Duration, config: &SchedConfig, what: Waited) -> Duration {
    const LEAST: Duration = Duration::from_millis(1);
    match what {
        Waited::Missed => (wait * 2).max(LEAST).min(config.gather),
        Waited::Gained => (wait * 2).max(LEAST).min(config.first_wait()).max(wait),
        Waited::RanOut => Some(wait * 3 / 4)
            .filter(|w| *w >= LEAST)
            .unwrap_or_default(),
    }
}

/// The pause after an object's round number `rounds` (0 for the first): `cooldown` for the
/// first `steady_rounds` later rounds, then doubling, up to `max_cooldown`.
fn cooldown_after(config: &SchedConfig, rounds: u32) -> Duration {
    let doublings = rounds.saturating_sub(config.steady_rounds).min(16);
    config
        .cooldown
        .saturating_mul(1 << doublings)
        .min(config.max_cooldown.max(config.cooldown))
}

/// Copies of the root record sent back to back when its group turns active. A receiver
/// that misses the one copy starts `root_interval` after the others, too late for the
/// first round of the metadata and of the first blocks, which then go out again for it;
/// at 20% loss that was a fifth of the receivers.
const ROOT_BURST: u32 = 6;

/// How much sending time the pacer makes up for, at most: time the sending thread lost while
/// it had packets to send, mostly waiting for a core. A runnable thread on a busy host can
/// wait a scheduler period or more for one; a bucket of 32 packets (1.9 ms at 200 Mbit/s)
/// lost that time for good. Eight copies of tools/bench's tree on the server's two cores
/// stretched its sending by a tenth to a fifth, while the scheduler had rounds ready all
/// along and tbf never throttled (lab,
/// one copy 3.74 s; eight: 4.43 to 5.05 s with 32 packets, 4.05 to 4.11 s with this pacer,
/// three runs each, alternating).
pub const CATCH_UP: Duration = Duration::from_millis(20);
/// And at most this many bytes, whatever the rate: at tools/bench's unshaped 5 Gbit/s 20 ms
/// is 12.5 MB, far more than a switch port buffers or receivers that share the server's
/// cores take at once (three copies of 256 MiB fell behind in one bench with no such cap,
/// 1019 later rounds of blocks against none). At 200 Mbit/s it is 10 ms: eight copies took
/// 4.40 s with it and 4.41 to 4.46 s with 20 ms (6ade2a4, same lab and hour).
pub const CATCH_UP_MAX: usize = 256 << 10;

/// Bytes made up at most at `bytes_per_sec`: `min(rate * CATCH_UP, CATCH_UP_MAX)`.
fn catch_up_bytes(bytes_per_sec: f64) -> f64 {
    (bytes_per_sec * CATCH_UP.as_secs_f64()).min(CATCH_UP_MAX as f64)
}

/// The pacer: wire bytes at `rate` on average, at most `burst` of them back to back.
///
/// Two token buckets. The rate's bucket holds `burst` plus [`catch_up_bytes`] while there is
/// something to send, so time the sending thread lost (mostly waiting for a core) is made
/// up. While there is nothing ([`Pacer::handle_idle`], until the scheduler's next timer or
/// until an event) it holds `burst` only: an idle sender owes nothing, but one that wakes
/// late for its timer makes up the delay. The peak's bucket holds `burst` and refills at
/// twice the rate, so what is made up goes at twice the rate at most, never as one burst at
/// the speed of the link.
///
/// Bounds: from its start the pacer lets out at most `rate * t + burst`; over any span `t`,
/// at most `rate * t + burst + catch_up_bytes(rate)` and `2 * rate * t + burst`.
pub struct Pacer {
    rate: Bucket,
    peak: Bucket,
    burst: f64,
    /// Nothing to send, until this time (`Some(None)`: until an event): meanwhile the rate's
    /// bucket holds `burst` at most. `None`: something to send.
    idle: Option<Option<Instant>>,
}

impl Pacer {
    /// A pacer for `rate_bps` bits per second that lets `burst` bytes out back to back.
    pub fn new(now: Instant, rate_bps: u64, burst: usize) -> Pacer {
        // A floor keeps the timer maths finite for a rate that rounds to zero.
        let bytes_per_sec = (rate_bps as f64 / 8.0).max(1.0);
        let burst = burst as f64;
        let cap = burst + catch_up_bytes(bytes_per_sec);
        Pacer {
            rate: Bucket::new(now, bytes_per_sec, cap, burst),
            peak: Bucket::new(now, 2.0 * bytes_per_sec, burst, burst),
            burst,
            idle: None,
        }
    }

    fn refill(&mut self, now: Instant) {
        if let Some(until) = self.idle {
            let end = until.map_or(now, |t| t.min(now));
            self.rate.refill(end, self.burst);
            if end < now {
                // The timer came due before this call: from then on the sender was late.
                self.idle = None;
            }
        }
        self.rate.refill(now, self.rate.cap);
        self.peak.refill(now, self.peak.cap);
    }

    /// How many bytes may go out now.
    pub fn available(&mut self, now: Instant) -> usize {
        self.refill(now);
        self.rate.tokens.min(self.peak.tokens).max(0.0) as usize
    }

    pub fn handle_sent(&mut self, now: Instant, wire_bytes: usize) {
        self.refill(now);
        self.rate.tokens -= wire_bytes as f64;
        self.peak.tokens -= wire_bytes as f64;
    }

    /// Nothing to send from `now` until `until` (`None`: until an event): that time is not
    /// made up, and what was owed is dropped (the rate's bucket down to `burst`).
    pub fn handle_idle(&mut self, now: Instant, until: Option<Instant>) {
        self.refill(now);
        self.idle = Some(until);
        self.rate.tokens = self.rate.tokens.min(self.burst);
    }

    /// Something to send again. Called for every packet: nothing to do unless idle.
    pub fn handle_busy(&mut self, now: Instant) {
        if self.idle.is_some() {
            self.refill(now);
            self.idle = None;
        }
    }

    /// When `bytes` will be available.
    pub fn poll_timeout(&mut self, now: Instant, bytes: usize) -> Instant {
        self.refill(now);
        self.ready_at(bytes)
    }

    /// When `bytes` will be available, counted from the last refill (no clock needed). More
    /// than `burst` never is: that asks for `burst`.
    pub fn ready_at(&self, bytes: usize) -> Instant {
        let bytes = (bytes as f64).min(self.burst);
        self.rate.ready_at(bytes).max(self.peak.ready_at(bytes))
    }
}

/// A token bucket: `tokens` bytes, refilled at `bytes_per_sec` up to a cap.
struct Bucket {
    bytes_per_sec: f64,
    cap: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(now: Instant, bytes_per_sec: f64, cap: f64, tokens: f64) -> Bucket {
        Bucket {
            bytes_per_sec,
            cap,
            tokens,
            last: now,
        }
    }

    /// Refills up to `now`, to `cap` at most; tokens already above it stay (they are spent).
    fn refill(&mut self, now: Instant, cap: f64) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        if self.tokens < cap {
            self.tokens = (self.tokens + dt * self.bytes_per_sec).min(cap);
        }
        self.last = self.last.max(now);
    }

    fn ready_at(&self, bytes: f64) -> Instant {
        let missing = bytes - self.tokens;
        if missing <= 0.0 {
            return self.last;
        }
        self.last + Duration::from_secs_f64(missing / self.bytes_per_sec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u8) -> ObjectHash {
        ObjectHash::of(&[i])
    }

    fn now_for_test() -> Instant {
        Instant::now()
    }

    /// Rounds of exactly K symbols, for tests that count them.
    fn no_margin() -> SchedConfig {
        SchedConfig {
            start_loss: 0.0,
            max_loss: 0.0,
            ..SchedConfig::default()
        }
    }

    fn drain(s: &mut Scheduler, now: Instant) -> Vec<Transmit> {
        std::iter::from_fn(|| s.poll_transmit(now)).collect()
    }

    #[test]
    fn objects_take_turns_by_rounds_and_cursors_grow() {
        let now = Instant::now();
        let mut s = Scheduler::new(no_margin());
        s.handle_active(now, h(1), 100, false);
        s.handle_active(now, h(2), 100, false);
        s.handle_active(now, h(1), 100, false);
        let sent = drain(&mut s, now);
        assert_eq!(sent.len(), 200);
        assert_eq!(
            sent[2],
            Transmit::Symbol {
                hash: h(1),
                esi: Esi(2)
            }
        );
        assert_eq!(
            sent[100],
            Transmit::Symbol {
                hash: h(2),
                esi: Esi(0)
            },
            "whole rounds, in turn"
        );
    }

    #[test]
    fn nothing_is_sent_without_a_listener() {
        let now = Instant::now();
        let mut s = Scheduler::new(SchedConfig::default());
        assert!(s.poll_transmit(now).is_none());
        s.handle_active(now, h(1), 100, false);
        s.handle_inactive(now_for_test(), &h(1));
        assert!(s.poll_transmit(now).is_none() && s.is_idle());
    }

    #[test]
    fn rejoin_continues_with_new_symbols() {
        let now = Instant::now();
        let mut s = Scheduler::new(SchedConfig::default());
        s.handle_active(now, h(1), 100, false);
        s.poll_transmit(now);
        s.handle_inactive(now_for_test(), &h(1));
        s.handle_active(now, h(1), 100, false);
        assert_eq!(
            s.poll_transmit(now),
            Some(Transmit::Symbol {
                hash: h(1),
                esi: Esi(1)
            })
        );
        s.forget(now, &h(1));
        s.handle_active(now, h(1), 100, false);
        assert_eq!(
            s.poll_transmit(now),
            Some(Transmit::Symbol {
                hash: h(1),
                esi: Esi(0)
            })
        );
    }

    #[test]
    fn long_idle_objects_start_again_with_source_symbols() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(no_margin());
        s.handle_active(t0, h(1), 4, false);
        drain(&mut s, t0);
        s.handle_inactive(t0, &h(1));
        s.handle_active(t0, h(1), 4, false);
        let soon = t0 + Duration::from_millis(500);
        assert_eq!(
            s.poll_transmit(soon),
            Some(Transmit::Symbol {
                hash: h(1),
                esi: Esi(4)
            }),
            "a quick rejoin gets new symbols"
        );
        s.handle_inactive(soon, &h(1));
        s.handle_active(t0, h(1), 4, false);
        assert_eq!(
            s.poll_transmit(soon + Duration::from_secs(3)),
            Some(Transmit::Symbol {
                hash: h(1),
                esi: Esi(0)
            }),
            "after a long idle spell, source symbols again"
        );
    }

    #[test]
    fn root_goes_out_in_a_burst_then_on_its_interval() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(SchedConfig::default());
        s.handle_active(t0, h(1), 100, false);
        s.handle_root(t0, true);
        for _ in 0..ROOT_BURST {
            assert_eq!(s.poll_transmit(t0), Some(Transmit::Root));
        }
        assert!(matches!(s.poll_transmit(t0), Some(Transmit::Symbol { .. })));
        let t1 = t0 + Duration::from_millis(30);
        assert_eq!(s.poll_transmit(t1), Some(Transmit::Root));
        s.handle_inactive(now_for_test(), &h(1));
        assert!(s.poll_transmit(t1).is_none());
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_millis(50)));
    }

    #[test]
    fn beacon_lists_the_bulk_head_while_bulk_is_queued() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(SchedConfig::default());
        s.handle_air(t0, true);
        assert!(
            s.poll_transmit(t0).is_none(),
            "no beacon for an empty queue"
        );
        s.handle_active(t0, h(1), 2, false);
        s.handle_active(t0, h(2), 2, false);
        s.handle_active(t0, h(3), 1, true);
        assert_eq!(s.poll_transmit(t0), Some(Transmit::Air));
        assert_eq!(s.on_air(8), vec![h(1), h(2)], "bulk only, soonest first");
        assert_eq!(s.on_air(1), vec![h(1)]);
        assert!(matches!(s.poll_transmit(t0), Some(Transmit::Symbol { .. })));
        let t1 = t0 + Duration::from_millis(60);
        assert_eq!(s.poll_transmit(t1), Some(Transmit::Air));
        s.handle_air(t1, false);
        let sent = drain(&mut s, t1 + Duration::from_millis(200));
        assert!(
            !sent.contains(&Transmit::Air),
            "no beacon without listeners"
        );
    }

    #[test]
    fn a_leaving_object_pauses_and_resumes_where_it_stopped() {
        let t0 = Instant::now();
        let cooldown = SchedConfig::default().cooldown;
        let mut s = Scheduler::new(no_margin());
        s.handle_active(t0, h(1), 32, false);
        let first = std::iter::from_fn(|| s.poll_transmit(t0)).take(20).count();
        assert_eq!(first, 20);
        s.handle_leaving(t0, &h(1));
        assert!(drain(&mut s, t0).is_empty(), "paused at once");
        assert!(drain(&mut s, t0 + cooldown).is_empty());
        assert!(s.is_idle() && s.poll_timeout().is_none(), "no busy wait");
        // A listener answers the query: the rest of the round, with the next symbols.
        s.handle_active(t0, h(1), 32, false);
        let rest = drain(&mut s, t0);
        assert_eq!(rest.len(), 12);
        assert_eq!(
            rest[0],
            Transmit::Symbol {
                hash: h(1),
                esi: Esi(20)
            }
        );
        // Paused between rounds, it resumes with a later round.
        s.handle_leaving(t0, &h(1));
        s.handle_active(t0, h(1), 32, false);
        assert_eq!(drain(&mut s, t0).len(), 4, "a later round of K/8");
        s.handle_leaving(t0, &h(1));
        s.handle_inactive(t0 + cooldown * 3, &h(1));
        assert!(s.is_idle() && s.active_objects() == 0);
    }

    /// A directory whose listeners all left and that newcomers keep joining: the first
    /// newcomer's round goes at once; once newcomers' rounds took more than their share, the
    /// next waits until [`METADATA_EVERY`] after the last, for every newcomer that comes
    /// meanwhile. A stalled receiver's rejoin, and any newcomer while a reader waits, never
    /// wait.
    #[test]
    fn newcomers_to_a_directory_are_gathered_beyond_their_share() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut s = Scheduler::new(no_margin());
        // More symbols than the credit: one newcomer's round takes all of it.
        let k = 2000;
        let round = metadata_round(k) as usize;
        s.handle_active(t0, h(1), k, true);
        assert_eq!(drain(&mut s, t0).len(), round, "the first round");
        let newcomer = |s: &mut Scheduler, at: Instant| {
            s.handle_leaving(at, &h(1));
            s.handle_active(at + ms(20), h(1), k, true);
            drain(s, at + ms(20)).len()
        };
        assert_eq!(
            newcomer(&mut s, t0 + ms(100)),
            round,
            "the first newcomer's, at once"
        );
        let next = t0 + ms(120) + METADATA_EVERY;
        assert_eq!(newcomer(&mut s, t0 + ms(200)), 0, "the next waits");
        assert_eq!(s.poll_timeout(), Some(next));
        s.handle_listeners(&h(1), 2);
        assert!(drain(&mut s, next - ms(1)).is_empty());
        assert_eq!(drain(&mut s, next).len(), round, "one round for both");
        let t1 = next + ms(50);
        s.handle_leaving(t1, &h(1));
        s.handle_active(t1, h(1), k, true);
        assert_eq!(drain(&mut s, t1).len(), round, "a rejoin is no newcomer");
        s.handle_report(Report::Hurry, 1);
        assert_eq!(newcomer(&mut s, t1 + ms(10)), round, "a reader waits");
    }

    /// Symbols sent for `hash` in `sent`.
    fn count(sent: &[Transmit], hash: ObjectHash) -> usize {
        sent.iter()
            .filter(|t| matches!(t, Transmit::Symbol { hash: h, .. } if *h == hash))
            .count()
    }

    #[test]
    fn listeners_that_never_leave_cannot_starve_new_objects() {
        let mut s = Scheduler::new(SchedConfig::default());
        // 40 large objects whose listeners never leave; one packet per 116 us (100 Mbit/s).
        for i in 0..40 {
            s.handle_active(now_for_test(), h(i), 400, false);
        }
        let (t0, tick) = (Instant::now(), Duration::from_micros(116));
        let mut now = t0;
        let send_until = |s: &mut Scheduler, now: &mut Instant, end: Instant| {
            let mut sent = Vec::new();
            while *now < end {
                sent.extend(s.poll_transmit(*now));
                *now += tick;
            }
            sent
        };
        // Long enough for every first round and for the rounds to slow down: 40 rounds of
        // 400 a second are still more than the link carries.
        send_until(&mut s, &mut now, t0 + Duration::from_secs(20));
        assert!(s.bulk.is_empty());
        // A real receiver's new block and directory arrive while their later rounds go on.
        s.handle_active(now, h(200), 32, false);
        s.handle_active(now, h(201), 8, true);
        let sent = send_until(&mut s, &mut now, t0 + Duration::from_secs(21));
        let got = count(&sent, h(200));
        assert!(
            got >= 32,
            "the new block got {got} symbols in a second, K is 32"
        );
        let got = count(&sent, h(201));
        assert!(
            got >= 8,
            "the new directory got {got} symbols in a second, K is 8"
        );
    }

    #[test]
    fn rounds_of_an_object_listened_to_forever_slow_down() {
        let config = SchedConfig::default();
        let mut s = Scheduler::new(config.clone());
        s.handle_active(now_for_test(), h(1), 32, false);
        let (t0, mut now) = (Instant::now(), Instant::now());
        let mut symbols = 0;
        while now < t0 + Duration::from_secs(10) {
            symbols += drain(&mut s, now).len();
            now = s
                .poll_timeout()
                .unwrap()
                .max(now + Duration::from_millis(1));
        }
        // Without the backoff: a round of K every 60 ms, about 5300 symbols in 10 s.
        assert!(symbols < 32 * 20, "{symbols} symbols in 10 s");
        assert_eq!(cooldown_after(&config, 0), config.cooldown);
        let steady = config.steady_rounds;
        assert_eq!(cooldown_after(&config, steady), config.cooldown);
        assert_eq!(cooldown_after(&config, steady + 1), config.cooldown * 2);
        assert_eq!(cooldown_after(&config, 100), config.max_cooldown);
    }

    #[test]
    fn rounds_pause_for_leaves_then_grow() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(no_margin());
        s.handle_active(t0, h(1), 32, false);
        assert_eq!(
            drain(&mut s, t0).len(),
            32,
            "first round: K, no loss seen yet"
        );
        let resume = s.poll_timeout().unwrap();
        assert_eq!(resume, t0 + SchedConfig::default().cooldown);
        assert_eq!(drain(&mut s, resume).len(), 4, "then K/8");
        let steady = SchedConfig::default().steady_rounds as usize;
        let mut at = resume;
        let sizes: Vec<usize> = (1..steady + 3)
            .map(|_| {
                at += Duration::from_secs(2);
                drain(&mut s, at).len()
            })
            .collect();
        let mut expected = vec![4; steady - 1];
        expected.extend([8, 16, 32]);
        assert_eq!(sizes, expected, "K/8 while steady, then doubling up to K");
        s.handle_inactive(now_for_test(), &h(1));
        assert!(s.poll_timeout().is_none() && s.is_idle());
    }

    /// Metadata's first round waits as a block's does, and its running out shortens
    /// metadata's wait, not the blocks'; a later round never waits behind metadata that
    /// waits.
    #[test]
    fn metadata_learns_its_own_wait_and_later_rounds_never_wait_behind_it() {
        let t0 = Instant::now();
        let cooldown = SchedConfig::default().cooldown;
        let mut s = Scheduler::new(no_margin());
        s.handle_report(Report::Bulk, 2);
        // A block both bulk receivers listened to went out; one still listens after it.
        s.handle_active(t0, h(1), 8, false);
        s.handle_listeners(&h(1), 2);
        assert_eq!(count(&drain(&mut s, t0), h(1)), 8);
        s.handle_listeners(&h(1), 1);
        // Meanwhile more directories than RIPE_SCAN that only one receiver asks for.
        let t1 = t0 + cooldown / 2;
        let dirs = 10..(10 + RIPE_SCAN as u8 + 4);
        for i in dirs.clone() {
            s.handle_active(t1, h(i), 2, true);
        }
        assert!(drain(&mut s, t1).is_empty(), "the directories wait");
        let sent = drain(&mut s, t0 + cooldown);
        assert!(
            !sent.is_empty() && count(&sent, h(1)) == sent.len(),
            "the later round goes, the directories still wait: {sent:?}"
        );
        s.handle_inactive(t0 + cooldown, &h(1));
        assert_eq!(
            s.poll_timeout(),
            Some(t1 + SchedConfig::default().first_wait()),
            "woken when the directories' wait runs out, not the blocks'"
        );
        let (blocks, metadata) = (s.gather_wait(), s.waits.metadata);
        let sent = drain(&mut s, t1 + SchedConfig::default().first_wait());
        assert!(
            dirs.clone().all(|i| count(&sent, h(i)) > 0),
            "every directory goes once its wait ran out"
        );
        assert!(
            s.waits.metadata < metadata,
            "the waits that ran out shorten the next"
        );
        assert_eq!(s.gather_wait(), blocks, "not the blocks' wait");
    }

    #[test]
    fn urgent_objects_and_later_rounds_go_before_bulk() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(no_margin());
        s.handle_active(t0, h(1), 10, false);
        assert_eq!(drain(&mut s, t0).len(), 10);
        for i in 2..6 {
            s.handle_active(t0, h(i), 40, false);
        }
        s.handle_active(t0, h(9), 3, true);
        assert_eq!(
            s.poll_transmit(t0),
            Some(Transmit::Symbol {
                hash: h(9),
                esi: Esi(0)
            }),
            "urgent first"
        );
        let t1 = t0 + SchedConfig::default().cooldown;
        let sent = drain(&mut s, t1);
        let first_bulk = sent
            .iter()
            .position(|t| matches!(t, Transmit::Symbol { hash, .. } if *hash == h(2)));
        let straggler = sent
            .iter()
            .position(|t| matches!(t, Transmit::Symbol { hash, .. } if *hash == h(1)));
        assert!(
            straggler < first_bulk,
            "the straggler's round jumps the bulk queue"
        );
    }

    /// A scheduler without margins that sent the first round of block 1 (K = 40) at `t0`.
    fn first_round_sent(t0: Instant) -> Scheduler {
        let mut s = Scheduler::new(no_margin());
        s.handle_active(t0, h(1), 40, false);
        assert_eq!(drain(&mut s, t0).len(), 40);
        s
    }

    /// A receiver that joins a block after its first round began gets a round as large as
    /// what it missed, queued behind the first rounds already asked for (the carousel of
    /// late joiners); a straggler that only lost a few symbols still gets K/8.
    #[test]
    fn a_late_joiner_gets_what_it_missed_behind_the_first_rounds_already_asked_for() {
        let t0 = Instant::now();
        let mut s = first_round_sent(t0);
        s.handle_listeners(&h(1), 2);
        s.handle_active(t0, h(2), 40, false);
        let t1 = t0 + SchedConfig::default().cooldown;
        let sent = drain(&mut s, t1);
        let order: Vec<ObjectHash> = sent
            .iter()
            .filter_map(|t| match t {
                Transmit::Symbol { hash, .. } => Some(*hash),
                _ => None,
            })
            .collect();
        let want: Vec<ObjectHash> = [h(2); 40].into_iter().chain([h(1); 40]).collect();
        assert_eq!(
            order, want,
            "the first round asked for first, then the late joiner's"
        );
        assert_eq!(s.stats().late_joiner_rounds, 1);
        // Nobody new: the next rounds are the stragglers' K/8.
        let t2 = t1 + SchedConfig::default().cooldown;
        let sent = drain(&mut s, t2);
        assert_eq!(count(&sent, h(1)), 5);
        assert_eq!(count(&sent, h(2)), 5);
        // One that joined when 3 symbols of a first round had gone needs no round of its own.
        s.handle_active(t2, h(3), 40, false);
        for _ in 0..3 {
            s.poll_transmit(t2);
        }
        s.handle_listeners(&h(3), 2);
        assert_eq!(count(&drain(&mut s, t2), h(3)), 37);
        let t3 = t2 + SchedConfig::default().cooldown;
        assert_eq!(count(&drain(&mut s, t3), h(3)), 5);
        assert_eq!(s.stats().late_joiner_rounds, 1);
    }

    /// A reader blocked in `read` that joins a block late does not wait behind the first
    /// rounds of everything other receivers asked for.
    #[test]
    fn a_late_joiner_goes_before_bulk_while_a_reader_waits() {
        let t0 = Instant::now();
        let mut s = first_round_sent(t0);
        for i in 2..10 {
            s.handle_active(t0, h(i), 40, false);
        }
        s.handle_listeners(&h(1), 2);
        s.handle_report(Report::Hurry, 1);
        let sent = drain(&mut s, t0 + SchedConfig::default().cooldown);
        let first = |want: ObjectHash| {
            sent.iter()
                .position(|t| matches!(t, Transmit::Symbol { hash, .. } if *hash == want))
        };
        assert!(first(h(1)) < first(h(2)), "the reader's block first");
        assert_eq!(count(&sent, h(1)), 40);
    }

    /// Listeners that come and go (or forged reports) buy a block a round for late joiners
    /// once per [`LATE_JOINER_EVERY`] at most.
    #[test]
    fn listeners_that_come_and_go_buy_a_late_joiners_round_once_per_250_ms_at_most() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(no_margin());
        s.handle_active(t0, h(1), 40, false);
        let mut now = t0;
        let mut symbols = 0;
        while now < t0 + Duration::from_secs(2) {
            symbols += count(&drain(&mut s, now), h(1));
            s.handle_listeners(&h(1), 2);
            s.handle_listeners(&h(1), 1);
            now += Duration::from_millis(10);
        }
        let most = (2000 / LATE_JOINER_EVERY.as_millis() + 1) as u64;
        let rounds = s.stats().late_joiner_rounds;
        assert!(
            (2..=most).contains(&rounds),
            "{rounds} rounds for late joiners in 2 s"
        );
        assert!(
            symbols <= 40 * (most as usize + 1) + 5 * 40,
            "{symbols} symbols in 2 s"
        );
    }

    /// A first round, of a block or of metadata, waits for every receiver fetching in bulk,
    /// `gather` at most; nothing waits while a reader does.
    #[test]
    fn first_rounds_wait_for_every_bulk_receiver_for_gather_at_most() {
        let t0 = Instant::now();
        let wait = SchedConfig::default().first_wait();
        let mut s = Scheduler::new(no_margin());
        s.handle_report(Report::Bulk, 3);
        s.handle_active(t0, h(1), 4, false);
        assert!(drain(&mut s, t0).is_empty());
        assert_eq!(
            s.poll_timeout(),
            Some(t0 + wait),
            "the block waits, no busy loop"
        );
        s.handle_active(t0, h(9), 2, true);
        assert!(drain(&mut s, t0).is_empty(), "metadata waits too");
        s.handle_listeners(&h(9), 3);
        let sent = drain(&mut s, t0);
        assert!(
            !sent.is_empty() && count(&sent, h(9)) == sent.len(),
            "metadata once every bulk receiver listens, the block not"
        );
        // The second receiver joins; the third is not needed once the wait ran out.
        s.handle_listeners(&h(1), 2);
        let t1 = t0 + wait / 2;
        assert_eq!(count(&drain(&mut s, t1), h(1)), 0, "the block still waits");
        assert_eq!(count(&drain(&mut s, t0 + wait), h(1)), 4);

        // Every bulk receiver listens: at once.
        s.handle_active(t1, h(2), 4, false);
        s.handle_listeners(&h(2), 3);
        assert_eq!(count(&drain(&mut s, t1), h(2)), 4);

        // A reader waits somewhere: nothing waits.
        s.handle_report(Report::Hurry, 1);
        s.handle_active(t1, h(3), 4, false);
        s.handle_active(t1, h(8), 2, true);
        let sent = drain(&mut s, t1);
        assert_eq!(count(&sent, h(3)), 4);
        assert!(count(&sent, h(8)) >= 2, "a directory a reader waits for");
        s.handle_report(Report::Hurry, 0);
        s.handle_active(t1, h(4), 4, false);
        assert!(
            drain(&mut s, t1).is_empty(),
            "the reader is done: blocks wait again"
        );

        // A block every receiver listens to does not wait behind one that waits for them,
        // and the beacon goes on meanwhile.
        let t2 = t1 + wait;
        s.handle_report(Report::Bulk, 2);
        drain(&mut s, t2);
        s.handle_active(t2, h(5), 4, false);
        s.handle_active(t2, h(6), 4, false);
        s.handle_listeners(&h(6), 2);
        assert_eq!(count(&drain(&mut s, t2), h(6)), 4, "h(6) goes first");
        let mut s = Scheduler::new(no_margin());
        s.handle_report(Report::Bulk, 2);
        s.handle_active(t0, h(5), 4, false);
        s.handle_air(t0, true);
        assert_eq!(s.poll_transmit(t0), Some(Transmit::Air));
        let next = t0 + SchedConfig::default().air_interval;
        assert_eq!(
            s.poll_timeout(),
            Some(next),
            "woken for the beacon, not for h(5)"
        );
        assert_eq!(
            s.poll_transmit(next),
            Some(Transmit::Air),
            "the beacon while h(5) waits"
        );

        // A lone receiver, or one that says nothing (older receivers): never waits.
        for bulk in [1, 0] {
            let mut s = Scheduler::new(no_margin());
            s.handle_report(Report::Bulk, bulk);
            s.handle_active(t0, h(1), 4, false);
            assert_eq!(count(&drain(&mut s, t0), h(1)), 4, "{bulk} bulk receivers");
        }
    }

    /// The wait shrinks when it brings nobody (receivers copying different files), within
    /// one window of blocks, and comes back as soon as rounds are missed or shared again.
    #[test]
    fn the_wait_follows_what_waiting_brings() {
        let config = SchedConfig::default();
        let (start, max) = (config.first_wait(), config.gather);
        let mut wait = max;
        for _ in 0..32 {
            wait = next_wait(wait, &config, Waited::RanOut);
        }
        assert_eq!(wait, Duration::ZERO, "gone within a window of 32 blocks");
        for _ in 0..9 {
            wait = next_wait(wait, &config, Waited::Gained);
        }
        assert_eq!(
            wait, start,
            "rounds shared bring it back to where it started"
        );
        for _ in 0..2 {
            wait = next_wait(wait, &config, Waited::Missed);
        }
        assert_eq!(wait, max, "rounds missed take it further");
        assert_eq!(
            next_wait(max, &config, Waited::Gained),
            max,
            "and a gain keeps it"
        );

        // Through the scheduler: blocks nobody else joins shorten the wait, and a block
        // wanted again right after its round brings it back.
        let t0 = Instant::now();
        let mut s = Scheduler::new(no_margin());
        s.handle_report(Report::Bulk, 2);
        for i in 0..4 {
            s.handle_active(t0, h(i), 4, false);
        }
        assert_eq!(drain(&mut s, t0 + max).len(), 16);
        assert!(s.gather_wait() < max / 2, "{:?}", s.gather_wait());
        let shorter = s.gather_wait();
        s.handle_inactive(t0 + max, &h(0));
        s.handle_active(t0 + max * 2, h(0), 4, false);
        assert!(s.gather_wait() > shorter, "a round missed");

        // A receiver joins a block whose first round began: a round missed.
        let before = s.gather_wait();
        let t2 = t0 + max * 3;
        s.handle_active(t2, h(7), 4, false);
        s.handle_listeners(&h(7), 2);
        assert_eq!(
            count(&drain(&mut s, t2), h(7)),
            4,
            "both bulk receivers listen"
        );
        s.handle_listeners(&h(7), 3);
        assert!(s.gather_wait() > before, "a third joined late");

        // Two receivers share blocks a third bulk receiver never joins: the waits run out,
        // and the wait does not stay at its longest.
        let mut s = Scheduler::new(no_margin());
        s.handle_report(Report::Bulk, 3);
        for i in 0..8 {
            s.handle_active(t0, h(i), 4, false);
            s.handle_listeners(&h(i), 2);
        }
        drain(&mut s, t0 + max);
        assert!(s.gather_wait() < max / 2, "{:?}", s.gather_wait());
    }

    #[test]
    fn metadata_first_rounds_cover_the_loss_spread_of_few_symbols() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(no_margin());
        for (i, k) in [(1, 1), (2, 4), (3, 100)] {
            s.handle_active(t0, h(i), k, true);
        }
        s.handle_active(t0, h(4), 100, false);
        let sent = drain(&mut s, t0);
        let count = |i| {
            sent.iter()
                .filter(|t| matches!(t, Transmit::Symbol { hash, .. } if *hash == h(i)))
                .count()
        };
        assert_eq!(count(1), 9, "K + 8");
        assert_eq!(count(2), 12, "K + 8");
        assert_eq!(count(3), 140, "K + 4 sqrt(K)");
        assert_eq!(count(4), 100, "blocks keep the learned margin, here none");
    }

    /// Runs `objects` first rounds of `k` symbols, each heard by `listeners` of which
    /// `short` are still there after the cooldown; returns the learned loss.
    fn learn(
        s: &mut Scheduler,
        now: &mut Instant,
        objects: u32,
        k: u32,
        listeners: usize,
        short: usize,
    ) -> f64 {
        for _ in 0..objects {
            let hash = ObjectHash::of(&now.elapsed().as_nanos().to_le_bytes());
            let hash = ObjectHash::of(&[hash.as_bytes().as_slice(), &[listeners as u8]].concat());
            s.handle_active(*now, hash, k, false);
            s.handle_listeners(&hash, listeners);
            drain(s, *now);
            s.handle_listeners(&hash, short.max(1));
            *now += SchedConfig::default().cooldown;
            if short == 0 {
                s.handle_inactive(*now, &hash);
            } else {
                drain(s, *now);
                s.handle_inactive(*now, &hash);
            }
        }
        s.loss()
    }

    /// Makes `s` see loss in bursts: receivers report 5%, and blocks' first rounds leave
    /// three in ten of their listeners short. Returns when that was learned.
    fn learn_bursts(s: &mut Scheduler, t0: Instant) -> Instant {
        let five = crate::wire::channel::LOSS_LEVELS
            .iter()
            .position(|&l| l == 50);
        s.handle_report(Report::Loss(five.unwrap()), 10);
        let mut now = t0;
        for i in 0..30 {
            let hash = h(200 + i);
            s.handle_active(now, hash, 46, false);
            s.handle_listeners(&hash, 10);
            drain(s, now);
            now += s.config.cooldown;
            s.handle_listeners(&hash, 3);
            drain(s, now);
            s.handle_inactive(now, &hash);
        }
        now
    }

    /// The object of each symbol sent, in order.
    fn objects_sent(sent: &[Transmit]) -> Vec<ObjectHash> {
        let symbol = |t: &Transmit| match t {
            Transmit::Symbol { hash, .. } => Some(*hash),
            _ => None,
        };
        sent.iter().filter_map(symbol).collect()
    }

    /// The symbols sent of each object, in order.
    fn esis_by_object(sent: &[Transmit]) -> HashMap<ObjectHash, Vec<u32>> {
        let mut by = HashMap::<ObjectHash, Vec<u32>>::new();
        for t in sent {
            if let Transmit::Symbol { hash, esi } = t {
                by.entry(*hash).or_default().push(esi.0);
            }
        }
        by
    }

    #[test]
    fn blocks_first_rounds_take_turns_while_loss_comes_in_bursts() {
        let mut s = Scheduler::new(SchedConfig::default());
        let now = learn_bursts(&mut s, Instant::now());
        assert!(s.loss.bursty(), "learned {}", s.loss());
        let in_turns = s.stats().in_turns;
        for i in 1..=16 {
            s.handle_active(now, h(i), 46, false);
        }
        let sent = drain(&mut s, now);
        let by = esis_by_object(&sent);
        assert_eq!(by.len(), 16);
        for (hash, esis) in &by {
            assert!(
                esis.len() > 46,
                "{hash}: a whole first round, K and a margin"
            );
            assert!(esis.iter().enumerate().all(|(i, &e)| e as usize == i));
        }
        assert_eq!(
            s.stats().in_turns - in_turns,
            14,
            "one in eight still goes whole, for the loss to be learned from"
        );
        let hashes = objects_sent(&sent);
        let whole = by
            .iter()
            .filter(|(h, esis)| {
                let start = hashes.iter().position(|x| x == *h).unwrap();
                hashes[start..start + esis.len()].iter().all(|x| x == *h)
            })
            .count();
        assert_eq!(whole, 2, "the two that went whole, and no other");
        // Symbol by symbol, the rounds begun and not ended.
        let mut left: HashMap<ObjectHash, usize> = HashMap::new();
        for h in &hashes {
            let n = left.entry(*h).or_insert(by[h].len());
            *n -= 1;
            let under_way = left.values().filter(|&&n| n > 0).count();
            assert!(under_way <= 8, "{under_way} rounds under way");
        }

        // A reader waiting somewhere: no block waits behind seven others.
        s.handle_report(Report::Hurry, 1);
        for i in 20..23 {
            s.handle_active(now, h(i), 46, false);
        }
        let hashes = objects_sent(&drain(&mut s, now));
        let switches = hashes.windows(2).filter(|w| w[0] != w[1]).count();
        assert_eq!(switches, 2, "three whole rounds, one after another");
    }

    /// A fresh server sizes for 2% loss; on a clean link a lone receiver's first few objects
    /// bring first rounds down to K (a posterior mean in place of the likelihood's maximum
    /// never came down: rounds sized for some loss say nothing against it).
    #[test]
    fn a_clean_link_brings_first_rounds_down_to_k_within_a_few_objects() {
        let mut now = Instant::now();
        let mut s = Scheduler::new(SchedConfig::default());
        assert!(
            s.loss.first_round(46) > 46,
            "a fresh server sizes for some loss"
        );
        learn(&mut s, &mut now, 3, 46, 1, 0);
        assert_eq!(s.loss(), 0.0);
        assert_eq!(s.loss.first_round(46), 46);
    }

    #[test]
    fn the_loss_learned_follows_the_share_left_short_not_the_number_of_listeners() {
        let mut now = Instant::now();
        let mut one = Scheduler::new(SchedConfig::default());
        let mut many = Scheduler::new(SchedConfig::default());
        assert_eq!(one.loss(), SchedConfig::default().start_loss);
        // A fifth of the listeners left short, one object in five for a lone listener:
        // both learn about the same loss (and much more than they started with).
        let mut lone = 0.0;
        for i in 0..400u32 {
            lone = learn(&mut one, &mut now, 1, 46, 1, usize::from(i % 5 == 0));
        }
        let crowd = learn(&mut many, &mut now, 400, 46, 60, 12);
        assert!(lone > 0.1 && crowd > 0.1, "{lone} {crowd}");
        assert!((lone - crowd).abs() < 0.1, "{lone} {crowd}");
        // Nobody left short: the estimate comes down, and first rounds are K again.
        let clean = learn(&mut many, &mut now, 2000, 46, 60, 0);
        assert!(clean < 0.01, "{clean}");
        assert!(many.loss.first_round(46) <= 48);
    }

    /// Listeners that joined after a first round began are no loss its margin left short:
    /// a dozen newcomers at every block leave the loss where the rounds' own listeners put
    /// it (counted in, they read as a fifth of the listeners short, as in the test above).
    #[test]
    fn late_joiners_are_not_learned_as_loss() {
        let mut now = Instant::now();
        let mut s = Scheduler::new(SchedConfig::default());
        for i in 0..2000u32 {
            let hash = ObjectHash::of(&i.to_le_bytes());
            s.handle_active(now, hash, 46, false);
            s.handle_listeners(&hash, 60);
            drain(&mut s, now);
            s.handle_listeners(&hash, 72);
            s.handle_listeners(&hash, 12);
            now += SchedConfig::default().cooldown;
            drain(&mut s, now);
            s.handle_inactive(now, &hash);
        }
        assert!(s.loss() < 0.01, "{}", s.loss());
    }

    #[test]
    fn everyone_leaving_after_k_symbols_shows_the_first_round_was_enough() {
        let now = Instant::now();
        let mut s = Scheduler::new(SchedConfig::default());
        let start = s.loss();
        s.handle_active(now, h(1), 40, false);
        for _ in 0..39 {
            s.poll_transmit(now);
        }
        s.handle_leaving(now, &h(1));
        assert_eq!(s.loss(), start, "gone before K symbols: nothing learned");
        s.handle_inactive(now, &h(1));
        s.handle_active(now, h(2), 40, false);
        for _ in 0..40 {
            s.poll_transmit(now);
        }
        s.handle_leaving(now, &h(2));
        assert!(
            s.loss() < start,
            "gone while the margin was still going out: it was enough"
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
            p.ready_at(1000),
            t0 + Duration::from_millis(1),
            "no clock needed"
        );
        assert_eq!(
            p.ready_at(50_000),
            t0 + Duration::from_millis(10),
            "never more than the burst"
        );
        assert_eq!(
            p.available(t0 + Duration::from_secs(1)),
            10_000,
            "burst caps the bucket"
        );
    }

    /// What a sender that sends all it may at each of `times` gets out each time.
    fn send_all(p: &mut Pacer, times: impl Iterator<Item = Instant>) -> Vec<usize> {
        times
            .map(|now| {
                let n = p.available(now);
                p.handle_sent(now, n);
                n
            })
            .collect()
    }

    /// Each millisecond from `from` to `to` ms after `t0`.
    fn each_ms(t0: Instant, from: u64, to: u64) -> impl Iterator<Item = Instant> {
        (from..to).map(move |ms| t0 + Duration::from_millis(ms))
    }

    fn near(got: usize, want: usize) -> bool {
        got.abs_diff(want) <= 1
    }

    #[test]
    fn a_busy_sender_makes_up_lost_time_at_twice_the_rate_at_most() {
        let t0 = Instant::now();
        // 8 Mbit/s: 1000 bytes a millisecond; CATCH_UP is 20,000 bytes.
        let mut p = Pacer::new(t0, 8_000_000, 10_000);
        p.handle_sent(t0, 10_000);
        // The thread runs again 50 ms later, then every millisecond.
        let per_ms = send_all(&mut p, each_ms(t0, 50, 100));
        assert_eq!(per_ms[0], 10_000, "a burst at most at once");
        // The burst and 20 ms of the 50 are owed: made up at 2000 bytes a millisecond.
        assert!(per_ms[1..=20].iter().all(|&n| near(n, 2000)), "{per_ms:?}");
        assert!(per_ms[21..].iter().all(|&n| near(n, 1000)), "{per_ms:?}");
    }

    #[test]
    fn a_fast_sender_makes_up_no_more_than_catch_up_max() {
        let t0 = Instant::now();
        let (rate, burst) = (625_000_000.0, 46_000.0); // 5 Gbit/s
        let mut p = Pacer::new(t0, 5_000_000_000, burst as usize);
        p.handle_sent(t0, burst as usize);
        // 30 ms lost (18.75 MB at the rate), then 2 ms of sending all it may.
        let t1 = t0 + Duration::from_millis(30);
        let times = (0..=200).map(|i| t1 + Duration::from_micros(10 * i));
        let sent: usize = send_all(&mut p, times).iter().sum();
        let most = rate * 0.002 + burst + CATCH_UP_MAX as f64;
        assert!((sent as f64) <= most + 1.0, "{sent} bytes, {most} at most");
        assert!(
            (sent as f64) >= most - 2.0 * burst,
            "{sent} bytes: nothing made up"
        );
    }

    #[test]
    fn an_idle_sender_owes_nothing() {
        let t0 = Instant::now();
        let mut p = Pacer::new(t0, 8_000_000, 10_000);
        p.handle_sent(t0, 10_000);
        // Busy for 30 ms (30,000 bytes owed), then the round's last batch and nothing more
        // until an event; the batch is counted after the sender said so, as the shell does.
        let t1 = t0 + Duration::from_millis(30);
        p.handle_idle(t1, None);
        p.handle_sent(t1, 1000);
        assert_eq!(
            p.ready_at(10_000),
            t1 + Duration::from_millis(1),
            "owed: cleared"
        );
        // A join a second later: a burst, then the rate, not twice it.
        let t2 = t1 + Duration::from_secs(1);
        p.handle_busy(t2);
        let per_ms = send_all(&mut p, each_ms(t2, 0, 10));
        assert_eq!(per_ms[0], 10_000);
        assert!(per_ms[1..].iter().all(|&n| near(n, 1000)), "{per_ms:?}");
    }

    #[test]
    fn a_sender_late_for_its_timer_makes_up_the_delay() {
        let t0 = Instant::now();
        let mut p = Pacer::new(t0, 8_000_000, 10_000);
        p.handle_sent(t0, 10_000);
        // Nothing to send until a cooldown ends at 10 ms; the thread wakes at 40 ms.
        p.handle_idle(t0, Some(t0 + Duration::from_millis(10)));
        let per_ms = send_all(&mut p, each_ms(t0, 40, 80));
        // The first 10 ms fill the burst; the 30 ms late, 20 at most, are made up.
        assert_eq!(per_ms[0], 10_000);
        assert!(per_ms[1..=20].iter().all(|&n| near(n, 2000)), "{per_ms:?}");
        assert!(per_ms[21..].iter().all(|&n| near(n, 1000)), "{per_ms:?}");
    }

    #[test]
    fn the_pacer_never_lets_out_more_than_its_bounds_over_any_span() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        let (rate, burst) = (1_000_000.0, 15_000.0); // bytes a second
        for _ in 0..50 {
            let t0 = Instant::now();
            let mut p = Pacer::new(t0, 8 * rate as u64, burst as usize);
            let (mut now, mut sent) = (t0, Vec::new());
            for _ in 0..400 {
                now += Duration::from_micros(rng.random_range(0..30_000));
                if rng.random_bool(0.1) {
                    let until = now + Duration::from_micros(rng.random_range(0..30_000));
                    p.handle_idle(now, rng.random_bool(0.5).then_some(until));
                } else if rng.random_bool(0.2) {
                    p.handle_busy(now);
                }
                let n = p.available(now).min(rng.random_range(0..40_000));
                if n > 0 {
                    p.handle_sent(now, n);
                    sent.push((now, n as f64));
                }
            }
            let catch_up = catch_up_bytes(rate);
            for i in 0..sent.len() {
                let mut bytes = 0.0;
                for &(at, n) in &sent[i..] {
                    bytes += n;
                    let span = at.duration_since(sent[i].0).as_secs_f64();
                    assert!(
                        bytes <= rate * span + burst + catch_up + 1.0,
                        "{bytes} in {span}"
                    );
                    assert!(
                        bytes <= 2.0 * rate * span + burst + 1.0,
                        "{bytes} in {span}"
                    );
                }
            }
            let total: f64 = sent.iter().map(|s| s.1).sum();
            let span = now.duration_since(t0).as_secs_f64();
            assert!(total <= rate * span + burst + 1.0, "{total} from the start");
        }
    }

    #[test]
    fn a_rate_that_rounds_to_zero_waits_instead_of_panicking() {
        // `--rate 0.5` parses to 0 bit/s.
        let t0 = Instant::now();
        let mut p = Pacer::new(t0, 0, 3000);
        p.handle_sent(t0, 3000);
        assert!(p.poll_timeout(t0, 1500) > t0);
    }
}
