//! `lcfs cache`: what the receiver cache holds, and the operator's tools to pin, unpin,
//! check, shrink and empty it. status, unpin and gc work beside running lcfs processes (the
//! process that owns the cache does the work); verify and clear need the cache to themselves
//! and name the process to stop. pin is `lcfs prefetch --pin`.

use std::fmt::Write as _;

use anyhow::{bail, Context};
use indicatif::HumanBytes;
use lcfs_cache::{Cache, CacheConfig, Status, Usage};

use super::args::{
    default_cache_dir, parse_channel_spec, CacheClearArgs, CacheCommand, CacheDirArgs, CacheGcArgs,
    CacheStatusArgs, CacheUnpinArgs, PrefetchArgs,
};
use crate::wire::channel::Channel;
use crate::wire::object::{ObjectRef, RootRecord};

pub(crate) fn cache(cmd: CacheCommand) -> anyhow::Result<()> {
    match cmd {
        CacheCommand::Status(a) => status(&a),
        CacheCommand::Pin(a) => super::run_async(super::copy::prefetch(PrefetchArgs {
            channel: a.channel,
            subpaths: a.subpaths,
            pin: true,
            recv: a.recv,
        })),
        CacheCommand::Unpin(a) => unpin(&a),
        CacheCommand::Verify(a) => verify(&a),
        CacheCommand::Gc(a) => gc(&a),
        CacheCommand::Clear(a) => clear(&a),
    }
}

/// Opens an existing cache directory (as its owner, or as a client of the process that
/// owns it), without a quota of its own and without a memory LRU.
fn open(args: &CacheDirArgs) -> anyhow::Result<Cache> {
    let dir = args.cache.clone().unwrap_or_else(default_cache_dir);
    if !dir.join("objects").is_dir() {
        bail!(
            "there is no lcfs cache at {}: nothing was received there yet; pass --cache DIR \
             to name the one a mount or copy uses",
            dir.display()
        );
    }
    let mut config = CacheConfig::new(dir);
    config.memory = 0;
    Ok(Cache::open(config)?)
}

fn bytes(n: u64) -> String {
    format!("{} ({n} bytes)", HumanBytes(n))
}

/// Who uses the cache, for messages.
fn user(cache: &Cache) -> String {
    match cache.owner_pid() {
        Some(pid) => format!("in use by lcfs process {pid}"),
        None => "not in use by another lcfs process".into(),
    }
}

/// A remembered root record, decoded if it can be.
struct Remembered {
    id: [u8; 32],
    record: Option<RootRecord>,
}

fn remembered(status: &Status) -> Vec<Remembered> {
    let roots = status.roots.iter().map(|(id, raw)| Remembered {
        id: *id,
        record: RootRecord::decode(raw).ok(),
    });
    roots.collect()
}

fn status(args: &CacheStatusArgs) -> anyhow::Result<()> {
    let cache = open(&args.dir)?;
    let status = cache.status()?;
    let free = cache.free_bytes();
    let roots = remembered(&status);
    if args.json {
        println!("{}", status_json(&cache, &status, free, &roots));
        return Ok(());
    }
    let u = &status.usage;
    println!("cache     {} ({})", cache.dir().display(), user(&cache));
    println!("objects   {}", u.objects);
    println!("disk use  {}", bytes(u.disk_bytes));
    println!("pinned    {}", bytes(u.pinned_bytes));
    match (status.quota, cache.owner_pid()) {
        (Some(q), _) => println!("quota     {} (--cache-size of the owner)", bytes(q)),
        (None, Some(pid)) => println!("quota     none (lcfs process {pid} has no --cache-size)"),
        (None, None) => {
            println!("quota     none now (each lcfs process sets its own --cache-size)")
        }
    }
    match free {
        Some(f) => println!("free      {} on its file system", bytes(f)),
        None => println!("free      unknown"),
    }
    println!("channels  {} with a remembered root record", roots.len());
    for r in &roots {
        println!("  {}", describe_root(r));
    }
    Ok(())
}

fn describe_root(r: &Remembered) -> String {
    let id = hex(&r.id);
    let Some(record) = &r.record else {
        return format!("{id}  (root record does not decode)");
    };
    let published = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(record.publish_time_ns);
    format!(
        "{id}  generation {}  published {}  root {}{}",
        record.generation,
        humantime::format_rfc3339_seconds(published),
        &record.root.hash.to_hex()[..16],
        if record.signature.is_some() {
            "  signed"
        } else {
            ""
        }
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn status_json(cache: &Cache, status: &Status, free: Option<u64>, roots: &[Remembered]) -> String {
    let num = |n: Option<u64>| n.map_or("null".to_owned(), |n| n.to_string());
    let channels: Vec<String> = roots
        .iter()
        .map(|r| {
            let rec = r.record.as_ref();
            format!(
                r#"{{"id":"{}","generation":{},"publish_time_ns":{},"root":{},"signed":{}}}"#,
                hex(&r.id),
                num(rec.map(|r| r.generation)),
                num(rec.map(|r| r.publish_time_ns)),
                rec.map_or("null".into(), |r| format!("\"{}\"", r.root.hash.to_hex())),
                rec.is_some_and(|r| r.signature.is_some()),
            )
        })
        .collect();
    let u = &status.usage;
    format!(
        r#"{{"dir":{},"owner_pid":{},"objects":{},"disk_bytes":{},"pinned_bytes":{},"quota":{},"free_bytes":{},"channels":[{}]}}"#,
        json_string(&cache.dir().to_string_lossy()),
        num(cache.owner_pid().map(|p| p as u64)),
        u.objects,
        u.disk_bytes,
        u.pinned_bytes,
        num(status.quota),
        num(free),
        channels.join(",")
    )
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn verify(args: &CacheDirArgs) -> anyhow::Result<()> {
    let cache = open(args)?;
    let progress = crate::progress::Progress::new("verify", cache.usage().disk_bytes);
    let report = cache.verify(&mut |n| progress.inc(n))?;
    progress.finish();
    let dir = cache.dir().display();
    println!(
        "checked {} object files in {dir}, {}",
        report.checked,
        HumanBytes(report.checked_bytes)
    );
    if report.adopted > 0 {
        println!("indexed {} good files the index lacked", report.adopted);
    }
    if report.forgotten > 0 {
        println!(
            "forgot {} index entries whose file was gone or unreadable",
            report.forgotten
        );
    }
    if report.dropped == 0 {
        println!("all good: nothing dropped");
    } else {
        println!(
            "DROPPED {} damaged object files, {}: they did not match their hash and are \
             fetched again when read; check the disk under {dir}",
            report.dropped,
            HumanBytes(report.dropped_bytes)
        );
    }
    Ok(())
}

fn gc(args: &CacheGcArgs) -> anyhow::Result<()> {
    let cache = open(&args.dir)?;
    let status = cache.status()?;
    let Some(limit) = args.max_size.or(status.quota) else {
        bail!(
            "no size to collect cache {} down to: no lcfs process using it has a \
             --cache-size; pass --max-size SIZE (0 evicts every unpinned object)",
            cache.dir().display(),
        );
    };
    let after = cache.gc(limit)?;
    let before = status.usage;
    println!(
        "evicted {} objects, {}; {}",
        before.objects.saturating_sub(after.objects),
        HumanBytes(before.disk_bytes.saturating_sub(after.disk_bytes)),
        holds(&after)
    );
    if after.disk_bytes > limit {
        println!(
            "still above {} because the rest is pinned: `lcfs cache unpin` releases it",
            HumanBytes(limit)
        );
    }
    Ok(())
}

fn holds(u: &Usage) -> String {
    format!(
        "the cache holds {} objects, {}, {} of it pinned",
        u.objects,
        HumanBytes(u.disk_bytes),
        HumanBytes(u.pinned_bytes)
    )
}

fn clear(args: &CacheClearArgs) -> anyhow::Result<()> {
    let cache = open(&args.dir)?;
    let before = cache.usage();
    let after = cache.clear(args.keep_pinned)?;
    println!(
        "removed {} objects, {}, from {}; root records kept; {}",
        before.objects.saturating_sub(after.objects),
        HumanBytes(before.disk_bytes.saturating_sub(after.disk_bytes)),
        cache.dir().display(),
        holds(&after)
    );
    Ok(())
}

fn unpin(args: &CacheUnpinArgs) -> anyhow::Result<()> {
    let cache = open(&args.dir)?;
    let before = cache.usage().pinned_bytes;
    let Some(channel) = &args.channel else {
        cache.unpin_all()?;
        return say_unpinned(&cache, "every object", before);
    };
    let spec = parse_channel_spec(channel)?;
    let mut subpaths = args.subpaths.clone();
    if !spec.subpath.is_empty() {
        subpaths.push(spec.subpath.clone());
    }
    let root = cached_root(&cache, &spec.name, spec.pinned, args)?;
    let objects = crate::prefetch::unpin::cached_objects(&cache, root, &subpaths)
        .with_context(|| format!("channel {:?} in cache {}", spec.name, cache.dir().display()))?;
    for h in &objects {
        cache.unpin(h.raw())?;
    }
    let what = match subpaths.is_empty() {
        true => format!(
            "the {} cached objects of channel {:?}",
            objects.len(),
            spec.name
        ),
        false => format!(
            "the {} cached objects of {} in channel {:?}",
            objects.len(),
            subpaths.join(", "),
            spec.name
        ),
    };
    say_unpinned(&cache, &what, before)
}

/// The root directory to walk: the snapshot named, or the channel's remembered root record.
fn cached_root(
    cache: &Cache,
    name: &str,
    snapshot: Option<crate::wire::object::ObjectHash>,
    args: &CacheUnpinArgs,
) -> anyhow::Result<ObjectRef> {
    if let Some(hash) = snapshot {
        // Only the hash is looked up in the cache.
        return Ok(ObjectRef { hash, len: 0 });
    }
    let key = super::receive::master_key(&args.key, name)?;
    let channel = Channel::new(name, key.as_ref());
    let Some(raw) = cache.get_root(channel.id())? else {
        bail!(
            "cache {} remembers no root record for channel {name:?}: nothing of it was \
             received here{}; `lcfs cache unpin --all` unpins everything",
            cache.dir().display(),
            if key.is_none() {
                ", or it is encrypted and needs --keyfile or --password"
            } else {
                ", or the key differs"
            }
        );
    };
    let record = RootRecord::decode(&raw).with_context(|| {
        format!(
            "the root record cache {} remembers for channel {name:?} does not decode; \
             `lcfs cache unpin --all` unpins everything",
            cache.dir().display()
        )
    })?;
    Ok(record.root)
}

fn say_unpinned(cache: &Cache, what: &str, before: u64) -> anyhow::Result<()> {
    let after = cache.usage().pinned_bytes;
    println!(
        "unpinned {what}: pinned bytes {} -> {} ({})",
        HumanBytes(before),
        HumanBytes(after),
        user(cache)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("a\"b\\c\n"), r#""a\"b\\c\u000a""#);
    }
}
