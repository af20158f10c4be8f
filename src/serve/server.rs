//! `lcfs serve`: index, publish a generation, and run the MLD listener and the sender until
//! asked to stop. A block found changed at send time makes the server reindex (cheap with the
//! leaf cache) and publish a new generation; generations never decrease, also across
//! restarts, because the last one is kept in the state directory.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use ed25519_dalek::SigningKey;

use super::index::{index_path, IndexConfig, Published};
use super::sender::{SendStats, SenderConfig, SenderLoop, SharedTable};
use super::table::Table;
use crate::channel::{Channel, MasterKey};
use crate::mld::{self, ListenerConfig, MldStats, QuerierConfig, TrackerConfig};
use crate::net::{sender_socket, Iface};
use crate::object::{BlockSize, RootRecord};

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
    pub hops: u32,
    pub query_interval: Duration,
}

struct Publisher<'a> {
    opts: &'a ServeOptions,
    channel: Channel,
    generation: u64,
}

impl Publisher<'_> {
    fn publish(&mut self) -> anyhow::Result<Table> {
        let started = Instant::now();
        let config = IndexConfig {
            block_size: self.opts.block_size,
            state_dir: self.opts.state_dir.clone(),
        };
        let published = index_path(&self.opts.path, &config)
            .with_context(|| format!("cannot index {}", self.opts.path.display()))?;
        for (path, why) in &published.skipped {
            tracing::warn!("skipped {}: {why}", path.display());
        }
        self.generation = next_generation(
            self.opts.state_dir.as_deref(),
            &self.channel,
            self.generation,
        );
        let record = self.record(&published);
        report_ready(
            self.opts,
            &self.channel,
            &record,
            &published,
            started.elapsed(),
        );
        Ok(Table::new(self.channel.clone(), published, record))
    }

    fn record(&self, p: &Published) -> RootRecord {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut record = RootRecord {
            channel_id: *self.channel.id(),
            generation: self.generation,
            publish_time_ns: now.as_nanos() as u64,
            root: p.root,
            block_size: p.block_size,
            single_file: p.single_file,
            signature: None,
        };
        if let Some(key) = &self.opts.sign_key {
            record.sign(key);
        }
        record
    }
}

fn report_ready(
    opts: &ServeOptions,
    channel: &Channel,
    r: &RootRecord,
    p: &Published,
    took: Duration,
) {
    tracing::info!(
        "indexed {} in {:.2} s ({} bytes hashed)",
        opts.path.display(),
        took.as_secs_f64(),
        p.hashed_bytes
    );
    println!(
        "ready channel={} generation={} root={} files={} bytes={} iface={} port={}",
        channel.name(),
        r.generation,
        r.root.hash.to_hex(),
        p.files,
        p.bytes,
        opts.iface.name,
        opts.port
    );
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
    let mut publisher = Publisher {
        opts: &opts,
        channel,
        generation: 0,
    };
    let table: SharedTable = Arc::new(RwLock::new(Arc::new(publisher.publish()?)));

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
    let (changed_tx, changed_rx) = mpsc::channel();
    let config = SenderConfig {
        rate_bps: opts.rate_bps,
        port: opts.port,
        max_payload: opts.iface.max_payload(),
        ..SenderConfig::default()
    };
    let sender = SenderLoop::new(config, socket, table.clone(), stats.clone(), changed_tx);
    let stop = shutdown.clone();
    let sender = std::thread::Builder::new()
        .name("lcfs-send".into())
        .spawn(move || sender.run(events_rx, &stop))?;

    while !shutdown.load(Ordering::Relaxed) {
        match changed_rx.recv_timeout(Duration::from_millis(200)) {
            Ok(path) => {
                tracing::warn!(
                    "{} changed while being served: publishing a new generation",
                    path.display()
                );
                // Let a writer finish before reading the tree again.
                std::thread::sleep(Duration::from_millis(500));
                while changed_rx.try_recv().is_ok() {}
                match publisher.publish() {
                    Ok(t) => *table.write().expect("table lock") = Arc::new(t),
                    Err(e) => tracing::error!(
                        "reindexing failed, still serving the old generation: {e:#}"
                    ),
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
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
