//! `lcfs status`: every lcfs process on this machine, from the status files they keep (see
//! [`crate::status`]).

use std::fmt::Write as _;

use super::args::StatusArgs;
use crate::status::{read_all, ProcessStatus, ReceiverStatus, ServerStatus};

pub(crate) fn status(args: StatusArgs) -> anyhow::Result<()> {
    let all = read_all(&crate::status::dirs_to_read());
    if args.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    print!("{}", render(&all, crate::status::unix_now()));
    Ok(())
}

/// The human view: two to four lines a process.
fn render(all: &[ProcessStatus], now: u64) -> String {
    let mut out = String::new();
    if all.is_empty() {
        let dir = crate::status::status_dir();
        let _ = writeln!(
            out,
            "no lcfs process is running on this machine (status files: {})",
            dir.display()
        );
        return out;
    }
    for s in all {
        let _ = writeln!(
            out,
            "{:<8} pid {:<7} channel {}  iface {}  {}  up {}",
            s.command,
            s.pid,
            s.channel,
            s.iface,
            s.target,
            ago(now.saturating_sub(s.started))
        );
        if let Some(v) = &s.server {
            server_lines(&mut out, v);
        }
        if let Some(r) = &s.receiver {
            receiver_lines(&mut out, r, now);
        }
        if let Some(m) = &s.metrics {
            let _ = writeln!(out, "         metrics http://{m}/metrics");
        }
    }
    out
}

fn server_lines(out: &mut String, v: &ServerStatus) {
    let _ = writeln!(
        out,
        "         generation {}  {} files, {}  listeners {}  groups wanted {}",
        v.generation,
        v.files,
        bytes(v.bytes),
        v.listeners,
        v.wanted_groups,
    );
    let _ = writeln!(
        out,
        "         sent {} in {} packets  now {}/s of {}/s",
        bytes(v.bytes_sent),
        v.packets_sent,
        bytes(v.send_rate as u64),
        bytes(v.rate_limit / 8)
    );
    let _ = writeln!(
        out,
        "         receivers: {} fetching in bulk, blocks wait up to {:.0} ms for them; {} report {:.1}% loss",
        v.bulk_receivers,
        v.gather_wait_ms,
        v.loss_reporters,
        v.reported_loss * 100.0
    );
    if v.late_joiner_rounds > 0 {
        let _ = writeln!(
            out,
            "         receivers that joined late: {} blocks' rounds sent for them",
            v.late_joiner_rounds
        );
    }
    if v.bursty || v.first_rounds_in_turns > 0 {
        let now = if v.bursty {
            "in bursts"
        } else {
            "no longer in bursts"
        };
        let _ = writeln!(
            out,
            "         loss comes {now}: {} blocks' first rounds sent in turns",
            v.first_rounds_in_turns
        );
    }
}

fn receiver_lines(out: &mut String, r: &ReceiverStatus, now: u64) {
    let state = if r.server_online { "online" } else { "OFFLINE" };
    let latency = match (
        r.latency.quantile_bound(0.5),
        r.latency.quantile_bound(0.99),
    ) {
        (Some(m), Some(p)) => format!("  fetch latency median <= {}, p99 <= {}", ms(m), ms(p)),
        (Some(m), None) => format!("  fetch latency median <= {}, p99 above 10 s", ms(m)),
        _ => String::new(),
    };
    let _ = writeln!(
        out,
        "         generation {}  server {state} for {}{latency}",
        r.generation,
        ago(now.saturating_sub(r.server_since))
    );
    let _ = writeln!(
        out,
        "         fetched {} ({} objects)  now {}/s  from cache {}  in flight {}  dropped {} of {} packets",
        bytes(r.bytes_fetched),
        r.objects_fetched,
        bytes(r.fetch_rate as u64),
        bytes(r.bytes_from_cache),
        r.in_flight,
        r.dropped_packets,
        r.packets
    );
    let quota = r
        .cache
        .quota
        .map_or(String::new(), |q| format!(", quota {}", bytes(q)));
    let _ = writeln!(
        out,
        "         cache {}: {} in {} objects, {} pinned{quota}",
        r.cache.dir,
        bytes(r.cache.bytes),
        r.cache.objects,
        bytes(r.cache.pinned_bytes)
    );
}

/// Bytes with a decimal unit, three significant digits.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["kB", "MB", "GB", "TB", "PB"];
    if n < 1000 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut unit = "B";
    for u in UNITS {
        if v < 1000.0 {
            break;
        }
        v /= 1000.0;
        unit = u;
    }
    match v {
        v if v < 10.0 => format!("{v:.2} {unit}"),
        v if v < 100.0 => format!("{v:.1} {unit}"),
        v => format!("{v:.0} {unit}"),
    }
}

fn ms(secs: f64) -> String {
    match secs {
        s if s < 1.0 => format!("{} ms", s * 1000.0),
        s => format!("{s} s"),
    }
}

/// A duration in seconds, as "42 s", "12 min", "3 h 5 min" or "2 d 4 h".
fn ago(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min", s / 60),
        s if s < 86_400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        s => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::CacheStatus;

    #[test]
    fn human_view_fits_and_says_what_matters() {
        let mount = ProcessStatus {
            pid: 42,
            command: "mount".into(),
            channel: "images".into(),
            iface: "eth1".into(),
            target: "/mnt/images".into(),
            started: 1_000,
            updated: 4_700,
            metrics: Some("127.0.0.1:9464".into()),
            receiver: Some(ReceiverStatus {
                generation: 7,
                server_online: false,
                server_since: 4_640,
                bytes_fetched: 812_000_000,
                cache: CacheStatus {
                    dir: "/var/cache/lcfs".into(),
                    bytes: 1_234_567_890,
                    quota: Some(10_000_000_000),
                    ..CacheStatus::default()
                },
                ..ReceiverStatus::default()
            }),
            ..ProcessStatus::default()
        };
        let text = render(&[mount], 4_700);
        assert!(text.contains("server OFFLINE for 1 min"), "{text}");
        assert!(text.contains("fetched 812 MB"), "{text}");
        assert!(text.contains("1.23 GB in 0 objects"), "{text}");
        assert!(text.contains("quota 10.0 GB"), "{text}");
        assert!(text.contains("up 1 h 1 min"), "{text}");
        assert!(text.contains("http://127.0.0.1:9464/metrics"), "{text}");
        assert!(text.lines().all(|l| l.len() <= 120), "{text}");
        assert!(render(&[], 0).starts_with("no lcfs process"));
    }

    #[test]
    fn the_server_view_says_what_its_receivers_report() {
        let serve = ProcessStatus {
            pid: 7,
            command: "serve".into(),
            server: Some(ServerStatus {
                files: 10_000,
                bulk_receivers: 3,
                loss_reporters: 3,
                reported_loss: 0.052,
                gather_wait_ms: 100.0,
                ..ServerStatus::default()
            }),
            ..ProcessStatus::default()
        };
        let text = render(std::slice::from_ref(&serve), 0);
        assert!(
            text.contains(
                "3 fetching in bulk, blocks wait up to 100 ms for them; 3 report 5.2% loss"
            ),
            "{text}"
        );
        assert!(!text.contains("bursts"), "{text}");
        assert!(!text.contains("joined late"), "{text}");
        assert!(text.lines().all(|l| l.len() <= 120), "{text}");
        let mut bursty = serve;
        if let Some(s) = bursty.server.as_mut() {
            s.bursty = true;
            s.first_rounds_in_turns = 412;
            s.late_joiner_rounds = 37;
        }
        let text = render(&[bursty], 0);
        assert!(
            text.contains("loss comes in bursts: 412 blocks' first rounds sent in turns"),
            "{text}"
        );
        assert!(
            text.contains("receivers that joined late: 37 blocks' rounds sent for them"),
            "{text}"
        );
        assert!(text.lines().all(|l| l.len() <= 120), "{text}");
        // A status file written before these fields existed still reads.
        let old: ServerStatus = serde_json::from_str(r#"{"generation": 4, "files": 2}"#).unwrap();
        assert_eq!((old.generation, old.bulk_receivers), (4, 0));
    }

    #[test]
    fn units() {
        assert_eq!(bytes(999), "999 B");
        assert_eq!(bytes(1_000), "1.00 kB");
        assert_eq!(bytes(12_345_678), "12.3 MB");
        assert_eq!(ago(59), "59 s");
        assert_eq!(ago(3_661), "1 h 1 min");
        assert_eq!(ago(90_000), "1 d 1 h");
    }
}
