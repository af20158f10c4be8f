use super::*;

fn receiver(online: bool, fetched: u64) -> ProcessStatus {
    ProcessStatus {
        pid: std::process::id(),
        command: "mount".into(),
        channel: "images".into(),
        started: 100,
        updated: 200,
        receiver: Some(ReceiverStatus {
            server_online: online,
            bytes_fetched: fetched,
            ..ReceiverStatus::default()
        }),
        ..ProcessStatus::default()
    }
}

#[test]
fn rates_and_online_since() {
    let mut rates = Rates::default();
    let t0 = Instant::now();
    let s = rates.apply(receiver(true, 0), t0);
    let r = s.receiver.unwrap();
    assert_eq!(r.fetch_rate, 0.0, "no rate before two samples");
    assert_eq!(r.server_since, 100, "online since the start");
    let mut later = receiver(true, 2_000_000);
    later.updated = 201;
    let r = rates
        .apply(later, t0 + Duration::from_secs(2))
        .receiver
        .unwrap();
    assert_eq!(r.fetch_rate, 1_000_000.0);
    assert_eq!(r.server_since, 100);
    let mut gone = receiver(false, 2_000_000);
    gone.updated = 205;
    let r = rates
        .apply(gone, t0 + Duration::from_secs(6))
        .receiver
        .unwrap();
    assert!(!r.server_online);
    assert_eq!(r.server_since, 205, "offline since the report that saw it");
    assert_eq!(r.fetch_rate, 0.0);
}

#[test]
fn online_needs_a_recent_hearing() {
    assert!(!online(0, 10_000), "never heard");
    assert!(online(9_000, 10_000));
    assert!(!online(6_000, 10_000));
    assert!(online(10_500, 10_000), "a clock step back is not offline");
}

#[test]
fn status_files_round_trip_and_hostile_ones_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let me = receiver(true, 5);
    std::fs::write(
        dir.path().join(format!("{}.json", me.pid)),
        serde_json::to_vec(&me).unwrap(),
    )
    .unwrap();
    // pid 1 exists: garbage and a file claiming another pid are skipped, not trusted
    std::fs::write(dir.path().join("1.json"), b"{\"pid\": 1, \"command\": [").unwrap();
    let mut liar = me.clone();
    liar.pid = 1;
    std::fs::write(
        dir.path().join("2.json"),
        serde_json::to_vec(&liar).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.path().join("notes.txt"), b"x").unwrap();
    // a process that is gone: its file is removed
    let dead = dir.path().join(format!("{}.json", i32::MAX - 7));
    std::fs::write(&dead, serde_json::to_vec(&me).unwrap()).unwrap();
    let all = read_all(&[dir.path().to_path_buf(), dir.path().join("missing")]);
    assert_eq!(all, vec![me]);
    assert!(!dead.exists());
}

#[test]
fn reporter_writes_and_removes_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let sdir = dir.path().join("status");
    let r = Reporter::start_in(&sdir, Arc::new(|| receiver(true, 1)));
    let path = sdir.join(format!("{}.json", std::process::id()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while read_all(std::slice::from_ref(&sdir)).is_empty() {
        assert!(Instant::now() < deadline, "no status file after 10 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(path.exists());
    drop(r);
    assert!(!path.exists());
}

#[test]
fn histogram_buckets_and_quantiles() {
    let h = Histogram::default();
    for ms in [0.5, 0.8, 3.0, 40.0, 20_000.0] {
        h.record(Duration::from_secs_f64(ms / 1000.0));
    }
    let s = h.snapshot();
    assert_eq!(s.count(), 5);
    assert_eq!(s.quantile_bound(0.5), Some(0.005));
    assert_eq!(s.quantile_bound(0.2), Some(0.001));
    assert_eq!(s.quantile_bound(1.0), None, "above the last bound");
    assert_eq!(HistogramSnapshot::default().quantile_bound(0.5), None);
}

#[test]
fn metrics_text_format() {
    let mut s = receiver(true, 42);
    s.channel = "we\"ird\nname".into();
    let h = Histogram::default();
    h.record(Duration::from_millis(3));
    s.receiver.as_mut().unwrap().latency = h.snapshot();
    let text = metrics::render(&s);
    assert!(text.contains("lcfs_fetched_bytes_total 42\n"), "{text}");
    assert!(text.contains("lcfs_server_online 1\n"), "{text}");
    assert!(text.contains("channel=\"we\\\"ird\\nname\""), "{text}");
    assert!(text.contains("lcfs_fetch_duration_seconds_bucket{le=\"0.0025\"} 0\n"));
    assert!(text.contains("lcfs_fetch_duration_seconds_bucket{le=\"0.005\"} 1\n"));
    assert!(text.contains("lcfs_fetch_duration_seconds_bucket{le=\"+Inf\"} 1\n"));
    assert!(text.contains("lcfs_fetch_duration_seconds_count 1\n"));
    // every sample line is NAME[{labels}] VALUE
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (_, value) = line.rsplit_once(' ').expect(line);
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }
}

#[test]
fn metrics_addresses() {
    assert_eq!(
        metrics::parse_addr("9464").unwrap().to_string(),
        "127.0.0.1:9464"
    );
    assert_eq!(
        metrics::parse_addr("[::1]:80").unwrap().to_string(),
        "[::1]:80"
    );
    assert!(metrics::parse_addr("eth0").is_err());
}
