//! The Prometheus endpoint (`--metrics ADDR`): the same [`ProcessStatus`] as `lcfs status`,
//! in the text exposition format (version 0.0.4), plus the histogram of fetch latency.
//!
//! Names (all prefixed `lcfs_`; counters end in `_total`, sizes in `_bytes`):
//! - every process: `info{command,channel,iface}` (always 1), `generation`;
//! - receivers: `fetched_bytes_total`, `fetched_objects_total`, `cache_hit_bytes_total`,
//!   `cache_hits_total`, `packets_received_total`, `packets_dropped_total`,
//!   `fetches_in_flight`, `server_online` (1 or 0), `cache_objects`, `cache_bytes`,
//!   `cache_pinned_bytes`, `fetch_duration_seconds` (histogram of network fetches);
//! - serve: `serve_files`, `serve_tree_bytes`, `serve_listeners`, `serve_wanted_groups`,
//!   `serve_active_groups`, `serve_packets_sent_total`, `serve_sent_bytes_total` (on the
//!   wire), `serve_rate_limit_bits`, `serve_bulk_receivers`, `serve_loss_reporters`,
//!   `serve_reported_loss_ratio`, `serve_gather_wait_seconds`, `serve_bursty_loss` (1 or 0),
//!   `serve_first_rounds_in_turns_total`, `serve_late_joiner_rounds_total`,
//!   `mld_reports_total`, `mld_dropped_total`.
//!
//! The endpoint is plain HTTP/1.0 on one thread: a scrape is a few microseconds of
//! formatting, and nothing else is served. It binds loopback unless told an address.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ProcessStatus, StatusFn};

/// Upper bounds of the latency buckets, in seconds.
pub const BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A latency histogram updated from any thread without a lock.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per bucket of [`BUCKETS`], then one for larger values (not cumulative).
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn record(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            counts: self
                .counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
            sum_seconds: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

/// A histogram's counts per bucket of [`BUCKETS`] and above them (not cumulative).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct HistogramSnapshot {
    pub counts: Vec<u64>,
    pub sum_seconds: f64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The upper bound of the bucket holding quantile `q` (None when empty or above the
    /// last bound): good enough for "median under 5 ms".
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let want = (q * n as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return BUCKETS.get(i).copied();
            }
        }
        None
    }
}

/// `PORT` (loopback) or `ADDR:PORT`.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    }
    s.parse().map_err(|_| {
        format!("{s:?} is not PORT or ADDR:PORT (e.g. 9464, 127.0.0.1:9464, [::1]:9464)")
    })
}

/// Listens on `addr` and answers every `GET` with the metrics of `status`, on a thread of
/// its own for the rest of the process. Returns the address bound.
pub fn serve(addr: SocketAddr, status: StatusFn) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).map_err(|e| {
        anyhow::anyhow!(
            "cannot serve metrics on {addr}: {e}; pick another --metrics address (is another \
             lcfs process using it?)"
        )
    })?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("lcfs-metrics".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let _ = answer(conn, &status);
            }
        })?;
    Ok(bound)
}

fn answer(mut conn: TcpStream, status: &StatusFn) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    conn.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 1024];
    let n = conn.read(&mut buf)?;
    let request = &buf[..n];
    let (code, body) = if request.starts_with(b"GET /metrics") || request.starts_with(b"GET / ") {
        ("200 OK", render(&status()))
    } else {
        ("404 Not Found", "try GET /metrics\n".to_owned())
    };
    // One write: a scraper that reads the status line from the first segment gets it whole.
    let response = format!(
        "HTTP/1.0 {code}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(response.as_bytes())?;
    // Closing with unread bytes would reset the connection before the client read the
    // answer: say we are done, then drop what is left of its request (a little, for a while).
    conn.shutdown(std::net::Shutdown::Write)?;
    let mut left: usize = 64 * 1024;
    while left > 0 {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
    Ok(())
}

/// The metrics of one process in the text exposition format.
pub fn render(s: &ProcessStatus) -> String {
    let mut out = String::new();
    let mut m = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(out, "# HELP lcfs_{name} {help}\n# TYPE lcfs_{name} {kind}");
        let _ = writeln!(out, "lcfs_{name} {value}");
    };
    let generation = match (&s.receiver, &s.server) {
        (Some(r), _) => r.generation,
        (_, Some(v)) => v.generation,
        _ => 0,
    };
    m(
        "generation",
        "gauge",
        "Generation of the tree in use.",
        generation as f64,
    );
    if let Some(r) = &s.receiver {
        let c = |v: u64| v as f64;
        m(
            "fetched_bytes_total",
            "counter",
            "Object bytes fetched from the network.",
            c(r.bytes_fetched),
        );
        m(
            "fetched_objects_total",
            "counter",
            "Objects fetched from the network.",
            c(r.objects_fetched),
        );
        m(
            "cache_hit_bytes_total",
            "counter",
            "Object bytes read from the cache.",
            c(r.bytes_from_cache),
        );
        m(
            "cache_hits_total",
            "counter",
            "Objects read from the cache.",
            c(r.cache_hits),
        );
        m(
            "packets_received_total",
            "counter",
            "Datagrams received on the channel's port.",
            c(r.packets),
        );
        m(
            "packets_dropped_total",
            "counter",
            "Datagrams dropped: malformed, misaddressed or forged.",
            c(r.dropped_packets),
        );
        m(
            "fetches_in_flight",
            "gauge",
            "Objects being fetched now.",
            c(r.in_flight),
        );
        m(
            "server_online",
            "gauge",
            "1 if the server was heard in the last 3 s.",
            f64::from(u8::from(r.server_online)),
        );
        m(
            "cache_objects",
            "gauge",
            "Objects in the cache.",
            c(r.cache.objects),
        );
        m(
            "cache_bytes",
            "gauge",
            "Disk bytes of the cache's objects.",
            c(r.cache.bytes),
        );
        m(
            "cache_pinned_bytes",
            "gauge",
            "Disk bytes of pinned objects.",
            c(r.cache.pinned_bytes),
        );
    }
    if let Some(v) = &s.server {
        let c = |v: u64| v as f64;
        m("serve_files", "gauge", "Files published.", c(v.files));
        m(
            "serve_tree_bytes",
            "gauge",
            "Bytes of the files published.",
            c(v.bytes),
        );
        m(
            "serve_listeners",
            "gauge",
            "Hosts listening to any group of the channel (MLD).",
            c(v.listeners),
        );
        m(
            "serve_wanted_groups",
            "gauge",
            "Groups some listener wants.",
            c(v.wanted_groups),
        );
        m(
            "serve_active_groups",
            "gauge",
            "Object groups with listeners that the sender follows.",
            c(v.active_groups),
        );
        m(
            "serve_packets_sent_total",
            "counter",
            "Datagrams sent.",
            c(v.packets_sent),
        );
        m(
            "serve_sent_bytes_total",
            "counter",
            "Bytes sent on the wire, headers included.",
            c(v.bytes_sent),
        );
        m(
            "serve_rate_limit_bits",
            "gauge",
            "The configured send rate, bits per second.",
            c(v.rate_limit),
        );
        m(
            "serve_bulk_receivers",
            "gauge",
            "Receivers that say they fetch in bulk (copy, prefetch, readahead).",
            c(v.bulk_receivers),
        );
        m(
            "serve_loss_reporters",
            "gauge",
            "Receivers that report their loss.",
            c(v.loss_reporters),
        );
        m(
            "serve_reported_loss_ratio",
            "gauge",
            "The mean loss receivers report, as a share.",
            v.reported_loss,
        );
        m(
            "serve_gather_wait_seconds",
            "gauge",
            "How long a block's first round now waits for the receivers fetching in bulk, at most.",
            v.gather_wait_ms / 1e3,
        );
        m(
            "serve_bursty_loss",
            "gauge",
            "1 while loss comes in bursts and blocks' first rounds go in turns, else 0.",
            f64::from(u8::from(v.bursty)),
        );
        m(
            "serve_first_rounds_in_turns_total",
            "counter",
            "Blocks' first rounds sent in turns with others', as loss came in bursts.",
            c(v.first_rounds_in_turns),
        );
        m(
            "serve_late_joiner_rounds_total",
            "counter",
            "Blocks' rounds for receivers that joined after the last full round began.",
            c(v.late_joiner_rounds),
        );
        m(
            "mld_reports_total",
            "counter",
            "MLD reports and dones received.",
            c(v.mld_reports),
        );
        m(
            "mld_dropped_total",
            "counter",
            "MLD messages dropped: malformed, ignored or untrusted.",
            c(v.mld_dropped),
        );
    }
    let _ = writeln!(
        out,
        "# HELP lcfs_info The process: its command, channel and interface.\n# TYPE lcfs_info gauge\n\
         lcfs_info{{command=\"{}\",channel=\"{}\",iface=\"{}\"}} 1",
        label(&s.command),
        label(&s.channel),
        label(&s.iface)
    );
    if let Some(r) = &s.receiver {
        histogram(
            &mut out,
            "fetch_duration_seconds",
            "Network fetches of objects, by duration.",
            &r.latency,
        );
    }
    out
}

fn histogram(out: &mut String, name: &str, help: &str, h: &HistogramSnapshot) {
    let _ = writeln!(
        out,
        "# HELP lcfs_{name} {help}\n# TYPE lcfs_{name} histogram"
    );
    let mut cumulative = 0;
    for (i, bound) in BUCKETS.iter().enumerate() {
        cumulative += h.counts.get(i).copied().unwrap_or(0);
        let _ = writeln!(out, "lcfs_{name}_bucket{{le=\"{bound}\"}} {cumulative}");
    }
    let _ = writeln!(out, "lcfs_{name}_bucket{{le=\"+Inf\"}} {}", h.count());
    let _ = writeln!(out, "lcfs_{name}_sum {}", h.sum_seconds);
    let _ = writeln!(out, "lcfs_{name}_count {}", h.count());
}

/// A label value escaped as the format asks (backslash, quote, newline).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
