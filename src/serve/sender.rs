//! The sender's I/O shell: MLD events in, paced batches of symbols out.
//!
//! The state lives in [`carousel`] (sans-IO: which object each listened group names, the
//! encoders at hand, the scheduler and the pacer, all fed `now`). This shell owns what it
//! cannot: the send socket, the disk, the clock and the thread. Each turn it waits for MLD
//! events until the carousel's timeout, feeds it those events and the newest [`Table`], then
//! fills a batch of up to `batch` packets from [`Carousel::poll_transmit`], building encoders
//! when [`Carousel::poll_load`] asks, and hands the batch to `sendmmsg`, each run of equal
//! packets to one group as one UDP GSO send (`net::send_batch_gso`; packet by packet where
//! the kernel refuses GSO). Per-packet work in the kernel was three quarters of the unshaped
//! send thread's time; with GSO a 256 MiB copy went from 0.63 to 0.74 times iperf2's goodput.
//!
//! A block is read from disk and hashed again before its encoder is built; a block whose file
//! changed is never sent as the old object: the carousel drops it and, when it belongs to the
//! current generation, the shell reports it so that the server reindexes (blocks kept from
//! older generations are expected to change, see `table.rs`). That read goes through the
//! served tree's descriptor with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` (`Table::load`,
//! `index::read_block`): a symlink planted on the block's path after indexing makes it
//! "changed", never followed.
//!
//! Layout: `sender.rs` (this shell), `sender/carousel.rs` (the state, with its tests in
//! `sender/carousel/tests.rs`), `sender/encoders.rs` (the byte-bounded encoder LRU).

pub mod carousel;
pub mod encoders;

use std::net::SocketAddrV6;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use socket2::Socket;

use super::table::{LoadError, Table};
use super::watch::Notice;
use crate::mld::GroupEvent;
use crate::net::{send_batch, send_batch_gso, WIRE_OVERHEAD};
use crate::wire::fec::ObjectEncoder;
use crate::wire::object::ObjectHash;
use carousel::{Carousel, CarouselConfig, Payload, Transmit};

/// The longest wait for events: how soon a shutdown or a new table is noticed when idle.
const IDLE_WAIT: Duration = Duration::from_millis(100);

/// How often the status counters are set from the carousel's state.
const STATUS_EVERY: Duration = Duration::from_millis(100);

/// The pause after a failed send (ENOBUFS: the interface's queue is full), so that a failing
/// socket is not retried in a busy loop; the pacer does not make it up.
const SEND_ERROR_PAUSE: Duration = Duration::from_millis(50);

#[derive(Clone, Debug)]
pub struct SenderConfig {
    /// Send rate in bits per second, counting Ethernet, IPv6 and UDP headers.
    pub rate_bps: u64,
    pub port: u16,
    /// The largest UDP payload the interface carries unfragmented.
    pub max_payload: usize,
    /// Packets handed to the kernel in one sendmmsg call at most.
    pub batch: usize,
    /// Bytes of encoders kept in memory.
    pub encoder_memory: usize,
}

impl Default for SenderConfig {
    fn default() -> Self {
        SenderConfig {
            rate_bps: 100_000_000,
            port: crate::wire::channel::DEFAULT_PORT,
            max_payload: 1452,
            batch: 32,
            encoder_memory: 32 << 20,
        }
    }
}

impl SenderConfig {
    fn carousel(&self) -> CarouselConfig {
        CarouselConfig {
            rate_bps: self.rate_bps,
            max_payload: self.max_payload,
            burst_packets: self.batch,
            wake_packets: self.batch.min(8),
            encoder_memory: self.encoder_memory,
            ..CarouselConfig::default()
        }
    }
}

/// Counters a running sender keeps; read them from any thread.
#[derive(Default, Debug)]
pub struct SendStats {
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
    pub root_packets: AtomicU64,
    pub encoders_built: AtomicU64,
    /// Groups with listeners that the carousel serves now.
    pub active_groups: AtomicU64,
    /// What receivers report (`crate::wire::channel::Report`): how many fetch in bulk, how many
    /// report their loss and its mean in parts per million, and the wait for bulk receivers
    /// now, in microseconds.
    pub bulk_receivers: AtomicU64,
    pub loss_reporters: AtomicU64,
    pub reported_loss_ppm: AtomicU64,
    pub gather_wait_us: AtomicU64,
    /// Loss comes in bursts now (1 or 0), and blocks' first rounds sent in turns so far
    /// (`crate::serve::sched`).
    pub bursty: AtomicU64,
    pub first_rounds_in_turns: AtomicU64,
    /// Blocks' rounds for receivers that joined after the last full round began.
    pub late_joiner_rounds: AtomicU64,
}

/// The shared, swappable table of what is published now.
pub type SharedTable = Arc<RwLock<Arc<Table>>>;

pub struct SenderLoop {
    port: u16,
    socket: Socket,
    table: SharedTable,
    carousel: Carousel,
    stats: Arc<SendStats>,
    changed: Sender<Notice>,
    /// The batch being filled: `packets[..used]` and their destinations. Buffers are reused.
    packets: Vec<Vec<u8>>,
    dests: Vec<SocketAddrV6>,
    symbol: Vec<u8>,
    /// Whether the kernel takes UDP GSO sends; cleared at the first refusal.
    gso: bool,
    /// When the status counters were last set ([`SenderLoop::publish_status`]).
    published: Option<Instant>,
}

impl SenderLoop {
    pub fn new(
        config: SenderConfig,
        socket: Socket,
        table: SharedTable,
        stats: Arc<SendStats>,
        changed: Sender<Notice>,
    ) -> SenderLoop {
        let current = table.read().unwrap_or_else(|p| p.into_inner()).clone();
        SenderLoop {
            carousel: Carousel::new(Instant::now(), config.carousel(), current),
            port: config.port,
            socket,
            table,
            stats,
            changed,
            packets: vec![Vec::new(); config.batch.max(1)],
            dests: Vec::new(),
            symbol: Vec::new(),
            gso: true,
            published: None,
        }
    }

    /// Runs until `shutdown` is set or the event channel closes.
    pub fn run(mut self, events: Receiver<GroupEvent>, shutdown: &AtomicBool) {
        while !shutdown.load(Ordering::Relaxed) {
            if !self.handle_events(&events) {
                break;
            }
            let latest = self.table.read().unwrap_or_else(|p| p.into_inner()).clone();
            self.carousel.handle_table(Instant::now(), latest);
            self.publish_status(Instant::now());
            if let Err(e) = self.send_some() {
                tracing::warn!("sending on the multicast socket failed: {e}");
                self.carousel.handle_pause(Instant::now(), SEND_ERROR_PAUSE);
                std::thread::sleep(SEND_ERROR_PAUSE);
            }
        }
        self.log_stats();
    }

    /// Waits for MLD events until the carousel has something to do, and feeds them all.
    fn handle_events(&mut self, events: &Receiver<GroupEvent>) -> bool {
        let now = Instant::now();
        let wait = self
            .carousel
            .poll_timeout()
            .map_or(IDLE_WAIT, |t| t.saturating_duration_since(now))
            .min(IDLE_WAIT);
        let first = match events.recv_timeout(wait) {
            Ok(e) => e,
            Err(RecvTimeoutError::Timeout) => return true,
            Err(RecvTimeoutError::Disconnected) => return false,
        };
        let now = Instant::now();
        self.carousel.handle_group_event(now, first);
        while let Ok(e) = events.try_recv() {
            self.carousel.handle_group_event(now, e);
        }
        true
    }

    /// Sends one batch, if anything is due.
    fn send_some(&mut self) -> std::io::Result<()> {
        let used = self.fill(Instant::now());
        if used == 0 {
            return Ok(());
        }
        let packets = &self.packets[..used];
        let result = match self
            .gso
            .then(|| send_batch_gso(&self.socket, &self.dests, packets))
        {
            Some(Ok(sent)) => Ok(sent),
            refused => {
                if let Some(Err(e)) = refused {
                    tracing::debug!(
                        "UDP segmentation offload refused ({e}); sending packet by packet"
                    );
                    self.gso = false;
                }
                send_batch(&self.socket, &self.dests, packets)
            }
        };
        let sent = *result.as_ref().unwrap_or(&0);
        let bytes: usize = self.packets[..sent]
            .iter()
            .map(|p| p.len() + WIRE_OVERHEAD)
            .sum();
        self.carousel.handle_sent(Instant::now(), bytes);
        self.stats.packets.fetch_add(sent as u64, Ordering::Relaxed);
        self.stats.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        result.map(|_| ())
    }

    /// Encodes up to a batch of packets into `packets`, returning how many.
    fn fill(&mut self, now: Instant) -> usize {
        self.dests.clear();
        let mut used = 0;
        while used < self.packets.len() {
            let Some(t) = self.next_transmit(now) else {
                break;
            };
            let seal = self.carousel.table().channel.seal();
            let out = &mut self.packets[used];
            if matches!(t.payload, Payload::Root(_)) {
                self.stats.root_packets.fetch_add(1, Ordering::Relaxed);
            }
            t.encode(seal, &mut self.symbol, out);
            self.dests
                .push(SocketAddrV6::new(t.to.group, self.port, 0, 0));
            used += 1;
        }
        used
    }

    /// The carousel's next packet, building the encoders it asks for on the way.
    fn next_transmit(&mut self, now: Instant) -> Option<Transmit> {
        let (stats, changed) = (&self.stats, &self.changed);
        self.carousel.next_transmit(now, |table, load| {
            // Read and re-verified, off the carousel.
            let bytes = table
                .load(&load.hash)
                .map_err(|e| report_unloadable(changed, table, &load.hash, &e))
                .ok()?;
            match ObjectEncoder::new(&bytes, load.symbol_size) {
                Ok(encoder) => {
                    stats.encoders_built.fetch_add(1, Ordering::Relaxed);
                    Some(encoder)
                }
                Err(e) => {
                    tracing::warn!("cannot encode object {}: {e}", load.hash);
                    None
                }
            }
        })
    }

    /// The groups served and what receivers report, for `lcfs status` and the metrics, at
    /// most every [`STATUS_EVERY`]: they are read once a second, and this loop turns once
    /// a batch of packets.
    fn publish_status(&mut self, now: Instant) {
        if (self.published).is_some_and(|t| now.saturating_duration_since(t) < STATUS_EVERY) {
            return;
        }
        self.published = Some(now);
        let sched = self.carousel.scheduler();
        let (reporters, loss) = sched.reported_loss();
        let s = &self.stats;
        let set = |a: &AtomicU64, v: u64| a.store(v, Ordering::Relaxed);
        set(&s.active_groups, self.carousel.listened_groups() as u64);
        set(&s.bulk_receivers, sched.bulk_receivers() as u64);
        set(&s.loss_reporters, reporters as u64);
        set(&s.reported_loss_ppm, (loss * 1e6) as u64);
        set(&s.bursty, u64::from(sched.bursty()));
        set(&s.first_rounds_in_turns, sched.stats().in_turns);
        set(&s.late_joiner_rounds, sched.stats().late_joiner_rounds);
        set(&s.gather_wait_us, sched.gather_wait().as_micros() as u64);
    }

    fn log_stats(&self) {
        let sched = self.carousel.scheduler();
        let s = sched.stats();
        let reported = sched.reported_loss();
        tracing::debug!(
            "scheduler: {} distinct objects; metadata {} activations, {} of {} source symbols sent, {} later rounds; blocks {} activations, {} of {} source symbols sent, {} later rounds; loss learned {:.3}, reported {:.3} by {}; leaves after <10/20/40/80/160/more ms: {:?}; {} bulk rounds let ahead; first rounds with every bulk receiver/hurried/gather ran out {:?}, waiting {:?} now; {} blocks' first rounds in turns; {} rounds for late joiners",
            s.distinct, s.activations[0], s.sent[0], s.source_symbols[0], s.later_rounds[0],
            s.activations[1], s.sent[1], s.source_symbols[1], s.later_rounds[1], sched.loss(),
            reported.1, reported.0, s.leave_delay, s.bulk_turns, s.gathered,
            sched.gather_wait(), s.in_turns, s.late_joiner_rounds
        );
    }
}

/// A block of the current generation that changed on disk means the tree changed: the server
/// is told, to reindex. One of an older generation is expected to change (its generation was
/// replaced because files changed) and is only dropped.
fn report_unloadable(changed: &Sender<Notice>, table: &Table, hash: &ObjectHash, e: &LoadError) {
    match e.changed_path() {
        Some(path) if table.is_current(hash) => {
            // Ordinary for a tree being written to: the reindex's `published` line says so.
            tracing::debug!("not sending object {hash}: {e}");
            let _ = changed.send(Notice::BlockChanged(path));
        }
        Some(_) => tracing::debug!("not sending object {hash} of an older generation: {e}"),
        None => tracing::warn!("not sending object {hash}: {e}"),
    }
}
