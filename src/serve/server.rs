//! `lcfs serve`: index, publish a generation, run the MLD listener and the sender, and follow
//! the tree until asked to stop (issue 10).
//!
//! Following the tree: change notifications (`watch/inotify.rs`), a block the sender found
//! changed, SIGHUP and a periodic rescan feed the debouncer (`watch.rs`); when it says so, the
//! publish loop here reindexes (cheap with the leaf cache: only changed files are read) and
//! publishes a new generation if, and only if, the root hash differs from the one served
//! (a walk that finds the served root builds no block objects: see `index_tree_unless`).
//! Each new table keeps the objects of the generations just replaced for a while (see
//! `table.rs`). Every generation published logs one `published generation=N ...` line on
//! stderr and prints one `ready ...` line on stdout (the first one is what scripts and tests
//! wait for). Generations never decrease, also across restarts, because the last one is kept
//! in the state directory.
//!
//! PATH is resolved once, at start, into a [`Tree`] held open; every index and every block
//! read goes through it, so a reindex walks the same directory even if PATH was moved or
//! repointed since (issue 9). A tree whose directory was deleted is not indexed again (that
//! would publish it empty): the server says so once and keeps serving the last generation.
//! With `--no-watch` nothing is watched or rescanned on its own: the first generation is
//! served until SIGHUP asks for a rescan.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use ed25519_dalek::SigningKey;

use super::index::{index_tree, index_tree_unless, IgnoreRules, IndexConfig, Published, Tree};
use super::sender::{SendStats, SenderConfig, SenderLoop, SharedTable};
use super::table::Table;
use super::watch::{self, Change, Debouncer, Notice, Reason, WatchConfig};
use crate::mld::{self, ListenerConfig, MldStats, QuerierConfig, TrackerConfig};
use crate::net::{sender_socket, Iface};
use crate::wire::channel::{Channel, MasterKey};
use crate::wire::object::{BlockSize, ObjectRef, RootRecord};

/// Longest the publish loop sleeps: it also renews signatures and looks for shutdown.
const TICK: Duration = Duration::from_millis(200);

pub struct ServeOptions {
    pub path: PathBuf,
    pub channel: String,
    pub iface: Iface,
    pub port: u16,
    pub rate_bps: u64,
    pub block_size: BlockSize,
    pub state_dir: Option<PathBuf>,
    pub key: Option<MasterKey>,
    pub sign_key: Option<SigningKey>,
    /// How long a root record's signature is valid; it is renewed well before that.
    pub sign_validity: Duration,
    pub hops: u32,
    pub query_interval: Duration,
    /// How to follow the tree; `None` serves the first generation until SIGHUP (`--no-watch`).
    pub watch: Option<WatchConfig>,
    /// Set (by SIGHUP) to rescan the tree now; the server clears it.
    pub rescan_now: Arc<AtomicBool>,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics: Option<std::net::SocketAddr>,
}

struct Publisher<'a> {
    opts: &'a ServeOptions,
    tree: Arc<Tree>,
    channel: Channel,
    generation: u64,
    /// The ignore rules of the last index, to drop notifications about ignored paths.
    ignore: Arc<IgnoreRules>,
    /// Whether the tree's deletion or move was reported already.
    said_deleted: bool,
    said_moved: bool,
    /// Files and bytes of the generation published last, for the status report.
    shown: Arc<Mutex<(u64, u64)>>,
    /// What the last index left out, and why: said already.
    said_skipped: std::collections::HashSet<(PathBuf, String)>,
}

/// What one index gave, and how long it took.
struct Indexed {
    published: Published,
    took: Duration,
}

/// The figures of an index that its log line gives, kept when its objects move into a table.
struct Figures {
    files: u64,
    bytes: u64,
    hashed_bytes: u64,
    took: Duration,
}

impl Indexed {
    fn split(self) -> (Published, Figures) {
        let p = &self.published;
        let figures = Figures {
            files: p.files,
            bytes: p.bytes,
            hashed_bytes: p.hashed_bytes,
            took: self.took,
        };
        (self.published, figures)
    }
}

impl Publisher<'_> {
    fn index_config(&self) -> IndexConfig {
        IndexConfig {
            block_size: self.opts.block_size,
            state_dir: self.opts.state_dir.clone(),
        }
    }

    /// Indexes the tree.
    fn index(&mut self) -> anyhow::Result<Indexed> {
        let started = Instant::now();
        let published = index_tree(&self.tree, &self.index_config())
            .with_context(|| format!("cannot index {}", self.opts.path.display()))?;
        self.walked(&published.skipped, &published.ignore);
        let took = started.elapsed();
        Ok(Indexed { published, took })
    }

    /// Indexes the tree again; `Err(took)` when its root is still `served`.
    fn reindex(&mut self, served: ObjectRef) -> anyhow::Result<Result<Indexed, Duration>> {
        let started = Instant::now();
        let walked = index_tree_unless(&self.tree, &self.index_config(), served)
            .with_context(|| format!("cannot index {}", self.opts.path.display()))?;
        match &walked {
            Ok(published) => self.walked(&published.skipped, &published.ignore),
            Err(unchanged) => self.walked(&unchanged.skipped, &unchanged.ignore),
        }
        let took = started.elapsed();
        Ok(walked
            .map(|published| Indexed { published, took })
            .map_err(|_| took))
    }

    /// What every walk does with what it left out and the ignore rules it walked by.
    fn walked(&mut self, skipped: &[(PathBuf, String)], ignore: &Arc<IgnoreRules>) {
        // Once per path and reason: every rescan finds the same fifo again.
        for (path, why) in skipped {
            if !self.said_skipped.contains(&(path.clone(), why.clone())) {
                tracing::warn!("skipped {}: {why}", path.display());
            }
        }
        self.said_skipped = skipped.iter().cloned().collect();
        self.ignore = ignore.clone();
    }

    /// Indexes the tree and builds the first generation's table.
    fn first(&mut self) -> anyhow::Result<Table> {
        let (published, figures) = self.index()?.split();
        let record = self.next_record(&published);
        let table = Table::new(self.channel.clone(), published, record);
        self.report(&table, &figures, None, &Reason::default());
        Ok(table)
    }

    /// Reindexes after `reason`; the table that replaces `current`, if anything changed.
    fn republish(&mut self, current: &Table, reason: &Reason) -> Option<Table> {
        if self.tree_deleted(current) {
            return None;
        }
        self.warn_if_moved();
        let indexed = match self.reindex(current.root_object()) {
            Ok(Ok(indexed)) => indexed,
            Ok(Err(took)) => {
                let took = took.as_secs_f64();
                tracing::debug!("rescanned ({reason}) in {took:.3} s: nothing changed");
                return None;
            }
            Err(e) => {
                tracing::error!("reindexing failed, still serving the old generation: {e:#}");
                return None;
            }
        };
        // Deleted while it was walked: what the walk saw may be half gone.
        if self.tree_deleted(current) {
            return None;
        }
        let (published, figures) = indexed.split();
        let record = self.next_record(&published);
        let next = current.next(published, record, Instant::now());
        self.report(&next, &figures, Some(current), reason);
        Some(next)
    }

    /// Whether the tree's directory is gone; says so once, naming the generation kept.
    fn tree_deleted(&mut self, current: &Table) -> bool {
        let deleted = self.tree.is_deleted();
        if deleted && !self.said_deleted {
            tracing::error!(
                "{} was deleted: still serving generation {}; nothing more will be published \
                 from it (start lcfs serve again on a new tree)",
                self.opts.path.display(),
                current.generation
            );
        }
        self.said_deleted |= deleted;
        deleted
    }

    /// Warns once when PATH names another directory than the one served (issue 9: the one
    /// opened at start is the one followed).
    fn warn_if_moved(&mut self) {
        if !self.said_moved && self.tree.moved() {
            self.said_moved = true;
            tracing::warn!(
                "{} no longer names the directory being served (moved or replaced); still \
                 following the directory opened at start: restart lcfs serve to serve the new one",
                self.opts.path.display()
            );
        }
    }

    /// The next generation's root record for `p`.
    fn next_record(&mut self, p: &Published) -> RootRecord {
        self.generation = next_generation(
            self.opts.state_dir.as_deref(),
            &self.channel,
            self.generation,
        );
        let mut record = RootRecord {
            channel_id: *self.channel.id(),
            generation: self.generation,
            publish_time_ns: unix_ns(),
            root: p.root,
            block_size: p.block_size,
            single_file: p.single_file,
            signature: None,
        };
        if let Some(key) = &self.opts.sign_key {
            record.sign(key, unix_ns(), self.opts.sign_validity.as_nanos() as u64);
        }
        record
    }

    /// The log lines of a published generation: `indexed` and `published` on stderr, and
    /// `ready` on stdout.
    fn report(&self, t: &Table, f: &Figures, previous: Option<&Table>, reason: &Reason) {
        *self.shown.lock().unwrap_or_else(|p| p.into_inner()) = (f.files, f.bytes);
        let took = f.took.as_secs_f64();
        let path = self.opts.path.display();
        tracing::info!(
            "indexed {path} in {took:.2} s ({} bytes hashed)",
            f.hashed_bytes
        );
        let (objects, bytes) = t.new_since(previous);
        let kept = t.counts().1;
        tracing::info!(
            "published generation={} root={} files={} changed={objects} objects ({bytes} bytes) \
             hashed={} took={took:.3}s kept={kept} older objects (reason: {reason})",
            t.generation,
            t.root_object().hash.to_hex(),
            f.files,
            f.hashed_bytes,
        );
        println!(
            "ready channel={} generation={} root={} files={} bytes={} iface={} port={}",
            self.channel.name(),
            t.generation,
            t.root_object().hash.to_hex(),
            f.files,
            f.bytes,
            self.opts.iface.name,
            self.opts.port
        );
    }

    /// Feeds one notice to the debouncer, unless it only concerns ignored paths.
    fn handle_notice(&self, debounce: &mut Debouncer, now: Instant, notice: Notice) {
        let change = match notice {
            Notice::Changed(rel) if self.ignore.change_is_ignored(&rel) => return,
            Notice::Changed(rel) => Change::Path(rel),
            Notice::Overflow => Change::Overflow,
            Notice::BlockChanged(path) => {
                tracing::debug!("{} changed while being served: reindexing", path.display());
                Change::BlockChanged
            }
        };
        debounce.handle_event(now, change);
    }
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
}

/// Renews the current root record's signature once a quarter of its validity (at most an
/// hour) has passed, so that receivers with a `--max-age` of hours still accept it and a
/// captured record stops authenticating soon after the publisher moves on.
fn renew_signature(opts: &ServeOptions, table: &SharedTable, last: &mut Instant) {
    let Some(key) = &opts.sign_key else { return };
    let every = (opts.sign_validity / 4).min(Duration::from_secs(3600));
    if last.elapsed() < every {
        return;
    }
    *last = Instant::now();
    let t = table.read().expect("table lock").clone();
    t.resign(key, unix_ns(), opts.sign_validity.as_nanos() as u64);
    tracing::debug!("renewed the root record's signature");
}

/// The next generation: above the last one published (here or in the state directory) and,
/// without a state directory, the Unix time in seconds so that restarts still move forward.
fn next_generation(state: Option<&Path>, channel: &Channel, last: u64) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let file = state.map(|d| d.join(format!("generation-{}", hex::encode(&channel.id()[..16]))));
    let stored = file
        .as_ref()
        .and_then(|f| std::fs::read_to_string(f).ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let next = now.max(stored + 1).max(last + 1);
    if let Some(f) = file {
        if let Err(e) = std::fs::write(&f, format!("{next}\n")) {
            tracing::warn!("cannot record the generation in {}: {e}", f.display());
        }
    }
    next
}

/// Warns when any user may hard-link any file into the tree: the walk cannot tell a hard
/// link from the file, so it would publish it.
fn warn_unless_protected_hardlinks() {
    let setting = std::fs::read_to_string("/proc/sys/fs/protected_hardlinks");
    if setting.is_ok_and(|s| s.trim() == "0") {
        tracing::warn!(
            "fs.protected_hardlinks is 0: a user who can write in the served tree can hard-link \
             files they cannot read into it, and they would be published; set it to 1"
        );
    }
}

/// Starts the change notifications when the tree is followed; without them (inotify missing
/// or out of instances) the periodic rescan still follows it.
fn start_watching(
    opts: &ServeOptions,
    tree: &Tree,
    tx: &Sender<Notice>,
) -> Option<watch::inotify::TreeWatcher> {
    let config = opts.watch.as_ref()?;
    match watch::inotify::watch(tree, tx.clone()) {
        Ok(w) => Some(w),
        Err(e) => {
            let every = config
                .rescan
                .map_or("never".into(), |r| format!("every {r:?}"));
            tracing::warn!(
                "cannot watch {} for changes ({e}); rescanning {every}",
                opts.path.display()
            );
            None
        }
    }
}

/// The publish loop: notices and SIGHUP in, new generations out, until `shutdown`.
fn follow(
    publisher: &mut Publisher,
    table: &SharedTable,
    notices: &Receiver<Notice>,
    shutdown: &AtomicBool,
) {
    let opts = publisher.opts;
    let config = opts.watch.clone().unwrap_or(WatchConfig {
        rescan: None,
        ..WatchConfig::default()
    });
    let mut debounce = Debouncer::new(Instant::now(), config);
    let mut signed_at = Instant::now();
    while !shutdown.load(Ordering::Relaxed) {
        renew_signature(opts, table, &mut signed_at);
        if opts.rescan_now.swap(false, Ordering::Relaxed) {
            debounce.handle_event(Instant::now(), Change::Signal);
        }
        let now = Instant::now();
        let wait = debounce
            .poll_timeout()
            .map_or(TICK, |t| t.saturating_duration_since(now));
        if let Ok(first) = notices.recv_timeout(wait.min(TICK)) {
            for notice in std::iter::once(first).chain(notices.try_iter()) {
                if opts.watch.is_some() {
                    publisher.handle_notice(&mut debounce, Instant::now(), notice);
                }
            }
        }
        if let Some(reason) = debounce.poll_publish(Instant::now()) {
            let current = table.read().expect("table lock").clone();
            if let Some(next) = publisher.republish(&current, &reason) {
                *table.write().expect("table lock") = Arc::new(next);
                signed_at = Instant::now();
            }
        }
    }
}

/// Wire bytes of one last-listener query: Ethernet, IPv6, hop-by-hop header, MLDv2 query.
const SPECIFIC_QUERY_WIRE_BYTES: u64 = 14 + 40 + 8 + 28;

/// Last-listener queries a second: at most 1% of the send rate, so that a flood of forged
/// leaves can never make the server send much more than it sends anyway (at least 100 a
/// second, for slow links: 1 388 a second at the default 100 Mbit/s, well above the 400 or
/// so that honest leaves ask for at that rate).
fn specific_query_rate(rate_bps: u64) -> u32 {
    let per_sec = rate_bps / 100 / (8 * SPECIFIC_QUERY_WIRE_BYTES);
    u32::try_from(per_sec.max(100)).unwrap_or(u32::MAX)
}

/// Serves until `shutdown` is set.
pub fn run(opts: ServeOptions, shutdown: Arc<AtomicBool>) -> anyhow::Result<()> {
    mld::socket::check_permission()?;
    if let Some(dir) = &opts.state_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the state directory {}", dir.display()))?;
    }
    let channel = Channel::new(&opts.channel, opts.key.as_ref());
    let tree =
        Tree::open(&opts.path).with_context(|| format!("cannot index {}", opts.path.display()))?;
    warn_unless_protected_hardlinks();
    let tree = Arc::new(tree);
    let (notice_tx, notices) = mpsc::channel();
    // Watching before the first index: a change made while it runs is not missed.
    let _watcher = start_watching(&opts, &tree, &notice_tx);
    let mut publisher = Publisher {
        opts: &opts,
        tree,
        channel,
        generation: 0,
        ignore: Arc::new(IgnoreRules::none()),
        said_deleted: false,
        said_moved: false,
        shown: Arc::default(),
        said_skipped: Default::default(),
    };
    let table: SharedTable = Arc::new(RwLock::new(Arc::new(publisher.first()?)));
    let (sender, mld, stats, mld_stats) = start_sending(&opts, &table, notice_tx, &shutdown)?;
    let status = server_status(&opts, &table, &stats, &mld_stats, &publisher.shown);
    let _reporter = crate::status::publish(status, opts.metrics)?;
    follow(&mut publisher, &table, &notices, &shutdown);
    shutdown.store(true, Ordering::Relaxed);
    let _ = sender.join();
    let _ = mld.join();
    tracing::info!("{}", mld_stats.summary());
    tracing::info!(
        "sent {} packets ({} bytes on the wire, {} root records)",
        stats.packets.load(Ordering::Relaxed),
        stats.bytes.load(Ordering::Relaxed),
        stats.root_packets.load(Ordering::Relaxed)
    );
    Ok(())
}

/// What `lcfs status` and the metrics show of this server.
fn server_status(
    opts: &ServeOptions,
    table: &SharedTable,
    stats: &Arc<SendStats>,
    mld: &Arc<MldStats>,
    shown: &Arc<Mutex<(u64, u64)>>,
) -> crate::status::StatusFn {
    let started = crate::status::unix_now();
    let (table, stats, mld, shown) = (table.clone(), stats.clone(), mld.clone(), shown.clone());
    let (channel, iface, path) = (
        opts.channel.clone(),
        opts.iface.name.clone(),
        opts.path.display().to_string(),
    );
    let rate_limit = opts.rate_bps;
    Arc::new(move || {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let t = table.read().unwrap_or_else(|p| p.into_inner()).clone();
        let (files, bytes) = *shown.lock().unwrap_or_else(|p| p.into_inner());
        crate::status::ProcessStatus {
            pid: std::process::id(),
            command: "serve".into(),
            channel: channel.clone(),
            iface: iface.clone(),
            target: path.clone(),
            started,
            updated: crate::status::unix_now(),
            metrics: None,
            receiver: None,
            server: Some(crate::status::ServerStatus {
                generation: t.generation,
                root: t.root_object().hash.to_hex().to_string(),
                files,
                bytes,
                listeners: n(&mld.listeners),
                wanted_groups: n(&mld.wanted_groups),
                active_groups: n(&stats.active_groups),
                packets_sent: n(&stats.packets),
                bytes_sent: n(&stats.bytes),
                send_rate: 0.0,
                rate_limit,
                mld_reports: n(&mld.reports),
                mld_dropped: n(&mld.malformed) + n(&mld.ignored) + n(&mld.untrusted),
                bulk_receivers: n(&stats.bulk_receivers),
                loss_reporters: n(&stats.loss_reporters),
                reported_loss: n(&stats.reported_loss_ppm) as f64 / 1e6,
                gather_wait_ms: n(&stats.gather_wait_us) as f64 / 1e3,
                bursty: n(&stats.bursty) > 0,
                first_rounds_in_turns: n(&stats.first_rounds_in_turns),
                late_joiner_rounds: n(&stats.late_joiner_rounds),
            }),
        }
    })
}

type Threads = (
    std::thread::JoinHandle<()>,
    std::thread::JoinHandle<()>,
    Arc<SendStats>,
    Arc<MldStats>,
);

/// Starts the MLD listener and the sender over `table`.
fn start_sending(
    opts: &ServeOptions,
    table: &SharedTable,
    changed: Sender<Notice>,
    shutdown: &Arc<AtomicBool>,
) -> anyhow::Result<Threads> {
    let (events_tx, events_rx) = mpsc::channel();
    let interest_table = table.clone();
    let interest = Arc::new(move |g: &std::net::Ipv6Addr| {
        interest_table
            .read()
            .map(|t| t.interested(g))
            .unwrap_or(false)
    });
    let mld_stats = Arc::new(MldStats::default());
    let listener_config = ListenerConfig {
        querier: QuerierConfig {
            query_interval: opts.query_interval,
            startup_query_interval: opts.query_interval / 4,
            ..QuerierConfig::default()
        },
        tracker: TrackerConfig {
            specific_queries_per_sec: specific_query_rate(opts.rate_bps),
            ..TrackerConfig::default()
        },
        stats: mld_stats.clone(),
        ..ListenerConfig::default()
    };
    let mld = mld::spawn_listener(
        opts.iface.index,
        listener_config,
        interest,
        events_tx,
        shutdown.clone(),
    )?;
    let socket = sender_socket(&opts.iface, opts.hops)?;
    let stats = Arc::new(SendStats::default());
    let config = SenderConfig {
        rate_bps: opts.rate_bps,
        port: opts.port,
        max_payload: opts.iface.max_payload(),
        ..SenderConfig::default()
    };
    let sender = SenderLoop::new(config, socket, table.clone(), stats.clone(), changed);
    let stop = shutdown.clone();
    let sender = std::thread::Builder::new()
        .name("lcfs-send".into())
        .spawn(move || sender.run(events_rx, &stop))?;
    Ok((sender, mld, stats, mld_stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_listener_queries_stay_within_a_percent_of_the_rate() {
        assert_eq!(specific_query_rate(100_000_000), 1388);
        assert_eq!(
            specific_query_rate(1_000_000),
            100,
            "a floor for slow links"
        );
        let rate = 10_000_000_000;
        let bits = u64::from(specific_query_rate(rate)) * SPECIFIC_QUERY_WIRE_BYTES * 8;
        assert!(bits <= rate / 100);
    }
}
