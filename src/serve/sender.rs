//! The sender's I/O loop: MLD events in, paced batches of symbols out.
//!
//! One thread owns the send socket, the [`Scheduler`], the [`Pacer`] and a byte-bounded cache
//! of RaptorQ encoders. It sleeps while no group has listeners, and otherwise fills each batch
//! from the scheduler, limited by the pacer. A block is read from disk and hashed again before
//! its encoder is built; a block whose file changed is never sent as the old object: it is
//! dropped and, when it belongs to the current generation, reported so that the server
//! reindexes (blocks kept from older generations are expected to change, see `table.rs`). That read goes through the served tree's
//! descriptor with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` (`Table::load`, `index::read_block`):
//! a symlink planted on the block's path after indexing makes it "changed", never followed.

pub mod carousel;
pub mod encoders;

use std::collections::HashSet;
use std::net::{Ipv6Addr, SocketAddrV6};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use lcfs_cache::Hash;
use lru::LruCache;
use socket2::Socket;

use super::sched::{Pacer, SchedConfig, Scheduler, Transmit};
use super::table::{LoadError, Table};
use super::watch::Notice;
use crate::fec::{symbol_size_for_object, ObjectEncoder};
use crate::mld::GroupEvent;
use crate::net::{send_batch, WIRE_OVERHEAD};
use crate::packet;

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
            port: crate::channel::DEFAULT_PORT,
            max_payload: 1452,
            batch: 32,
            encoder_memory: 32 << 20,
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
}

/// The shared, swappable table of what is published now.
pub type SharedTable = Arc<RwLock<Arc<Table>>>;

struct Encoders {
    lru: LruCache<Hash, Arc<ObjectEncoder>>,
    bytes: usize,
    max: usize,
}

impl Encoders {
    fn get(&mut self, hash: &Hash) -> Option<Arc<ObjectEncoder>> {
        self.lru.get(hash).cloned()
    }

    fn put(&mut self, hash: Hash, enc: Arc<ObjectEncoder>) {
        self.bytes += enc_size(&enc);
        self.lru.put(hash, enc);
        while self.bytes > self.max && self.lru.len() > 1 {
            if let Some((_, old)) = self.lru.pop_lru() {
                self.bytes -= enc_size(&old);
            }
        }
    }
}

fn enc_size(e: &ObjectEncoder) -> usize {
    // The padded source plus, once repair symbols were asked for, RaptorQ's copy of the
    // source symbols and its intermediate symbols, each about as large again (measured with
    // heaptrack): count all three, as an encoder may need them at any time.
    3 * e.source_symbols() as usize * e.symbol_size()
}

pub struct SenderLoop {
    config: SenderConfig,
    socket: Socket,
    table: SharedTable,
    current: Arc<Table>,
    sched: Scheduler,
    pacer: Pacer,
    encoders: Encoders,
    active: HashSet<Ipv6Addr>,
    stats: Arc<SendStats>,
    changed: Sender<Notice>,
    packets: Vec<Vec<u8>>,
    dests: Vec<SocketAddrV6>,
    symbol: Vec<u8>,
}

impl SenderLoop {
    pub fn new(
        config: SenderConfig,
        socket: Socket,
        table: SharedTable,
        stats: Arc<SendStats>,
        changed: Sender<Notice>,
    ) -> SenderLoop {
        let now = Instant::now();
        let burst = config.batch * (config.max_payload + WIRE_OVERHEAD);
        let current = table.read().expect("table lock").clone();
        SenderLoop {
            pacer: Pacer::new(now, config.rate_bps, burst),
            encoders: Encoders {
                lru: LruCache::unbounded(),
                bytes: 0,
                max: config.encoder_memory,
            },
            sched: Scheduler::new(SchedConfig::default()),
            socket,
            table,
            current,
            active: HashSet::new(),
            stats,
            changed,
            packets: Vec::new(),
            dests: Vec::new(),
            symbol: Vec::new(),
            config,
        }
    }

    /// Runs until `shutdown` is set or the event channel closes.
    pub fn run(mut self, events: Receiver<GroupEvent>, shutdown: &AtomicBool) {
        while !shutdown.load(Ordering::Relaxed) {
            if !self.handle_events(&events) {
                break;
            }
            self.refresh_table();
            if let Err(e) = self.send_some() {
                tracing::warn!("sending on the multicast socket failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let s = self.sched.stats();
        tracing::debug!(
            "scheduler: {} distinct objects; metadata {} activations, {} of {} source symbols sent, {} later rounds; blocks {} activations, {} of {} source symbols sent, {} later rounds; margin {:.3}; leaves after <10/20/40/80/160/more ms: {:?}; {} bulk rounds let ahead",
            s.distinct, s.activations[0], s.sent[0], s.source_symbols[0], s.later_rounds[0],
            s.activations[1], s.sent[1], s.source_symbols[1], s.later_rounds[1], self.sched.margin(), s.leave_delay,
            s.bulk_turns
        );
    }

    /// Applies pending MLD events, waiting for one while there is nothing to send.
    fn handle_events(&mut self, events: &Receiver<GroupEvent>) -> bool {
        let now = Instant::now();
        let wait = if self.sched.is_idle() {
            Duration::from_millis(100)
        } else {
            match self.sched.poll_timeout() {
                Some(t) => t
                    .saturating_duration_since(now)
                    .min(Duration::from_millis(100)),
                None => Duration::ZERO,
            }
        };
        let first = match events.recv_timeout(wait) {
            Ok(e) => e,
            Err(RecvTimeoutError::Timeout) => return true,
            Err(RecvTimeoutError::Disconnected) => return false,
        };
        self.apply(first);
        while let Ok(e) = events.try_recv() {
            self.apply(e);
        }
        true
    }

    fn apply(&mut self, event: GroupEvent) {
        let now = Instant::now();
        let (group, on) = match event {
            GroupEvent::Active(g) => (g, true),
            GroupEvent::Inactive(g) => (g, false),
            GroupEvent::Leaving(g) => {
                // The root record and the beacon are cheap: they go on until `Inactive`.
                if let Some(hash) = self.current.hash_of(&g) {
                    self.sched.handle_leaving(now, &hash);
                }
                return;
            }
        };
        if on {
            self.active.insert(group);
        } else {
            self.active.remove(&group);
        }
        self.route(now, group, on);
    }

    fn route(&mut self, now: Instant, group: Ipv6Addr, on: bool) {
        if group == self.current.root.group {
            tracing::debug!(on, "root group");
            self.sched.handle_root(now, on);
        } else if group == self.current.air.group {
            tracing::debug!(on, "beacon group");
            self.sched.handle_air(now, on);
        } else if let Some(hash) = self.current.hash_of(&group) {
            tracing::trace!(%hash, on, "object group");
            if on {
                self.sched
                    .handle_active(hash, self.source_symbols(&hash), self.urgent(&hash));
            } else {
                self.sched.handle_inactive(now, &hash);
            }
        }
    }

    /// Metadata (kept in memory: directories, file indexes) is urgent: receivers walk it
    /// before they can ask for blocks.
    fn urgent(&self, hash: &Hash) -> bool {
        matches!(
            self.current.object(hash).map(|o| &o.source),
            Some(super::index::Source::Memory(_))
        )
    }

    /// K of an object, from its length and the symbol size it will be sent with.
    fn source_symbols(&self, hash: &Hash) -> u32 {
        let len = self.current.object(hash).map_or(1, |o| o.len as u64);
        let link = packet::symbol_size_for(
            self.config.max_payload,
            self.current.channel.seal().is_some(),
        );
        len.div_ceil(symbol_size_for_object(len, link) as u64) as u32
    }

    /// Picks up a new generation's table and re-routes the groups that have listeners.
    fn refresh_table(&mut self) {
        let latest = self.table.read().expect("table lock").clone();
        if Arc::ptr_eq(&latest, &self.current) {
            return;
        }
        // Groups are derived from object hashes, so a group active in both tables names the
        // same object and its round goes on untouched: only groups whose object left or came
        // are routed again (the root and beacon groups stay; the new record goes out on the
        // root's next repeat).
        let now = Instant::now();
        let moved: Vec<Ipv6Addr> = self
            .active
            .iter()
            .copied()
            .filter(|g| self.current.hash_of(g) != latest.hash_of(g))
            .collect();
        for &g in &moved {
            self.route(now, g, false);
        }
        self.current = latest;
        for g in moved {
            self.route(now, g, true);
        }
    }

    fn wire(&self, payload: usize) -> usize {
        payload + WIRE_OVERHEAD
    }

    fn send_some(&mut self) -> std::io::Result<()> {
        if self.sched.is_idle() {
            return Ok(());
        }
        let now = Instant::now();
        let full = self.wire(self.config.max_payload);
        let room = self.pacer.available(now) / full;
        if room == 0 {
            let at = self
                .pacer
                .poll_timeout(now, full * self.config.batch.min(8));
            std::thread::sleep(at.saturating_duration_since(now));
            return Ok(());
        }
        self.fill(now, room.min(self.config.batch));
        if self.packets.is_empty() {
            return Ok(());
        }
        let sent = send_batch(&self.socket, &self.dests, &self.packets)?;
        let bytes: usize = self.packets[..sent]
            .iter()
            .map(|p| self.wire(p.len()))
            .sum();
        self.pacer.handle_sent(Instant::now(), bytes);
        self.stats.packets.fetch_add(sent as u64, Ordering::Relaxed);
        self.stats.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Fills the batch with up to `n` packets.
    fn fill(&mut self, now: Instant, n: usize) {
        self.packets.resize_with(n, Vec::new);
        self.dests.clear();
        let mut used = 0;
        while used < n {
            let Some(t) = self.sched.poll_transmit(now) else {
                break;
            };
            let table = self.current.clone();
            let mut out = std::mem::take(&mut self.packets[used]);
            let dest = match t {
                Transmit::Root => {
                    packet::encode_root(
                        &mut out,
                        table.root.tag,
                        &table.record(),
                        table.channel.seal(),
                    );
                    self.stats.root_packets.fetch_add(1, Ordering::Relaxed);
                    table.root.group
                }
                Transmit::Air => {
                    let tags: Vec<_> = self
                        .sched
                        .on_air(packet::MAX_AIR_TAGS)
                        .iter()
                        .map(|h| table.channel.object_address(h).tag)
                        .collect();
                    packet::encode_air(&mut out, table.air.tag, &tags, table.channel.seal());
                    table.air.group
                }
                Transmit::Symbol { hash, esi } => match self.encode(&table, &hash, esi, &mut out) {
                    Some(group) => group,
                    None => {
                        self.packets[used] = out;
                        continue;
                    }
                },
            };
            self.packets[used] = out;
            self.dests
                .push(SocketAddrV6::new(dest, self.config.port, 0, 0));
            used += 1;
        }
        self.packets.truncate(used);
    }

    /// Encodes one symbol of `hash` into `out`; None if the object cannot be sent.
    fn encode(
        &mut self,
        table: &Table,
        hash: &Hash,
        esi: u32,
        out: &mut Vec<u8>,
    ) -> Option<Ipv6Addr> {
        let enc = match self.encoders.get(hash) {
            Some(e) => e,
            None => self.build_encoder(table, hash)?,
        };
        let addr = table.channel.object_address(hash);
        enc.symbol(esi, &mut self.symbol);
        packet::encode_symbol(out, addr.tag, esi, &self.symbol, table.channel.seal());
        Some(addr.group)
    }

    /// A block of the current generation that changed on disk means the tree changed: the
    /// server is told, to reindex. One of an older generation is expected to change (its
    /// generation was replaced because files changed) and is only dropped.
    fn report_unloadable(&self, table: &Table, hash: &Hash, e: &LoadError) {
        match e.changed_path() {
            Some(path) if table.is_current(hash) => {
                tracing::warn!("not sending object {hash}: {e}");
                let _ = self.changed.send(Notice::BlockChanged(path));
            }
            Some(_) => tracing::debug!("not sending object {hash} of an older generation: {e}"),
            None => tracing::warn!("not sending object {hash}: {e}"),
        }
    }

    fn build_encoder(&mut self, table: &Table, hash: &Hash) -> Option<Arc<ObjectEncoder>> {
        let bytes = match table.load(hash) {
            Ok(b) => b,
            Err(e) => {
                self.sched.forget(Instant::now(), hash);
                self.report_unloadable(table, hash, &e);
                return None;
            }
        };
        let link = packet::symbol_size_for(self.config.max_payload, table.channel.seal().is_some());
        let size = symbol_size_for_object(bytes.len() as u64, link);
        match ObjectEncoder::new(&bytes, size) {
            Ok(enc) => {
                let enc = Arc::new(enc);
                self.encoders.put(*hash, enc.clone());
                self.stats.encoders_built.fetch_add(1, Ordering::Relaxed);
                Some(enc)
            }
            Err(e) => {
                tracing::warn!("cannot encode object {hash}: {e}");
                self.sched.forget(Instant::now(), hash);
                None
            }
        }
    }
}
