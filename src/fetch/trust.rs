//! Which root records a receiver accepts (sans-IO: every input, the clock included, is a
//! parameter).
//!
//! The root record is what every byte below it is checked against, so the decision is made
//! here, once, in the order of strength:
//! 1. **Pinned** (`CHANNEL@ROOTHASH`): exactly that root directory hash, nothing else.
//! 2. **Publisher key** (`--publisher`): a valid signature by that key is required.
//! 3. **Trust on first use** otherwise: the first publisher accepted for a channel is
//!    remembered in the cache, as its key when it signs its records, else as its source
//!    address, and a record from another publisher is refused unless `--allow-new-publisher`.
//!
//! Whatever the mode (pins aside), a signed record must be fresh: not past the expiry it
//! carries and signed at most `max_age` ago (TUF's freeze attack: a captured record otherwise
//! authenticates for ever); a generation lower than the one remembered is a rollback; the
//! same generation with another root is a fork; and a generation far ahead of the clock is
//! refused, because generations are Unix seconds (`serve::server::next_generation`) and one
//! forged generation of 2^63 would otherwise lock out every later honest record as a rollback.
//! A receiver also listens for a short window and takes the highest generation it hears from
//! the publisher of the first acceptable record ([`LISTEN`]), so that a replayed old record
//! does not pin a new receiver to the past while the real server is on the link. Records of
//! other publishers in that window do not count: a forger's higher number must not win.
//! A mount waits out the window before it starts; `copy` and `prefetch` start on the first
//! record and move if the window hears a newer one, and `copy` writes nothing under DEST
//! before the window has closed (`fetch::Tree::open_early`, `cli::receive::on_latest_tree`).

use std::fmt;
use std::net::Ipv6Addr;
use std::time::Duration;

use ed25519_dalek::VerifyingKey;

use super::config::HeardRoot;
use crate::wire::object::{ObjectHash, RootRecord};

/// After the first acceptable root record, how long to keep listening for a higher
/// generation. The server repeats its record every 25 ms while anyone listens
/// (`serve::sched::SchedConfig::root_interval`), so this hears it several times over.
pub const LISTEN: Duration = Duration::from_millis(120);

/// How far ahead of this machine's clock a generation may be: clocks drift and get stepped,
/// but not by days.
pub const MAX_GENERATION_AHEAD: Duration = Duration::from_secs(7 * 24 * 3600);

/// Which root records a receiver accepts.
#[derive(Clone, Debug)]
pub struct RootPolicy {
    /// Accept only the snapshot whose root directory has this hash (`CHANNEL@ROOTHASH`).
    pub pinned: Option<ObjectHash>,
    /// Accept only records signed by this publisher key.
    pub publisher: Option<VerifyingKey>,
    /// Accept a generation lower than one already seen.
    pub allow_rollback: bool,
    /// Accept, and remember from now on, a publisher other than the one trusted on first use.
    pub allow_new_publisher: bool,
    /// Refuse signed records signed longer ago than this.
    pub max_age: Duration,
}

impl Default for RootPolicy {
    fn default() -> Self {
        RootPolicy {
            pinned: None,
            publisher: None,
            allow_rollback: false,
            allow_new_publisher: false,
            max_age: Duration::from_secs(3 * 24 * 3600),
        }
    }
}

/// Who published a root record, as trust on first use remembers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Publisher {
    /// The Ed25519 key that signed the record.
    Key([u8; 32]),
    /// The source address of an unsigned record (spoofable on the link: see the README).
    Address(Ipv6Addr),
}

impl Publisher {
    /// The identity of a record heard from `from`: its signing key if it carries a valid
    /// signature, else the sender's address.
    pub fn of(heard: &HeardRoot) -> Publisher {
        match &heard.record.signature {
            Some(s) if heard.record.verify_self_signed() => Publisher::Key(s.public_key),
            _ => Publisher::Address(heard.from),
        }
    }

    /// The cache's encoding: a kind byte, then the key or the address.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Publisher::Key(k) => [&[b'K'][..], k].concat(),
            Publisher::Address(a) => [&[b'A'][..], &a.octets()].concat(),
        }
    }

    /// None for anything that is not an encoding of [`Publisher::encode`].
    pub fn decode(b: &[u8]) -> Option<Publisher> {
        match b.split_first()? {
            (b'K', k) => Some(Publisher::Key(k.try_into().ok()?)),
            (b'A', a) => Some(Publisher::Address(<[u8; 16]>::try_from(a).ok()?.into())),
            _ => None,
        }
    }
}

impl fmt::Display for Publisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Publisher::Key(k) => write!(f, "publisher key {}", hex::encode(k)),
            Publisher::Address(a) => write!(f, "the server at {a}"),
        }
    }
}

/// What this receiver remembers of a channel (in the cache).
#[derive(Clone, Debug, Default)]
pub struct Memory {
    pub root: Option<RootRecord>,
    pub publisher: Option<Publisher>,
}

/// Why a root record was refused. Each message says what to do if the refusal is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the server publishes root {offered}, not the pinned snapshot {pinned}")]
    NotPinned { offered: String, pinned: String },
    #[error("the root record is not signed by the publisher key given with --publisher")]
    NotSigned,
    #[error("the root record's signature does not verify: forged or damaged")]
    BadSignature,
    #[error("the root record's signature expired {ago} ago: a replay of an old record, or a publisher that stopped renewing it (is its clock right?)")]
    Expired { ago: String },
    #[error("the root record was signed {ago} ago, longer ago than --max-age {max}: a replay of an old record, or this machine's clock is wrong")]
    TooOld { ago: String, max: String },
    #[error("the root record claims generation {generation}, {ahead} ahead of this machine's clock: refused as implausible (generations are Unix seconds); check both clocks")]
    FromTheFuture { generation: u64, ahead: String },
    #[error("this channel was first published by {remembered}; this root record comes from {offered}. If the publisher really changed, pass --allow-new-publisher once")]
    NewPublisher {
        remembered: Publisher,
        offered: Publisher,
    },
    #[error("the server offers generation {offered} but generation {seen} was already seen: refusing a rollback (pass --allow-rollback to accept it)")]
    Rollback { offered: u64, seen: u64 },
    #[error("generation {generation} was already seen with root {seen}, and this record names root {offered}: refusing a forked history")]
    Fork {
        generation: u64,
        seen: String,
        offered: String,
    },
}

fn ns(d: u64) -> String {
    let secs = Duration::from_nanos(d).as_secs();
    match secs {
        s if s >= 2 * 86400 => format!("{} days", s / 86400),
        s if s >= 2 * 3600 => format!("{} hours", s / 3600),
        s if s >= 120 => format!("{} minutes", s / 60),
        s => format!("{s} s"),
    }
}

/// Decides on a root record heard on the network at `now_ns` (Unix ns). On success returns
/// the publisher to remember.
pub fn check(
    policy: &RootPolicy,
    heard: &HeardRoot,
    memory: &Memory,
    now_ns: u64,
) -> Result<Publisher, Refusal> {
    let record = &heard.record;
    if let Some(pin) = policy.pinned {
        return match record.root.hash == pin {
            true => Ok(Publisher::of(heard)),
            false => Err(Refusal::NotPinned {
                offered: record.root.hash.to_hex(),
                pinned: pin.to_hex(),
            }),
        };
    }
    check_signature(policy, record, now_ns)?;
    let offered = Publisher::of(heard);
    let other = memory.publisher.filter(|r| *r != offered);
    if let Some(remembered) = other {
        if policy.publisher.is_none() && !policy.allow_new_publisher {
            return Err(Refusal::NewPublisher {
                remembered,
                offered,
            });
        }
    }
    // Two publishers may well number a generation alike (generations are Unix seconds), so
    // only one publisher's own history can fork.
    check_generation(
        record,
        memory,
        policy.allow_rollback,
        other.is_none(),
        now_ns,
    )?;
    Ok(offered)
}

/// Decides on the record remembered in the cache, for a start without the server: it was
/// checked when it was heard, so only the caller's explicit pin or key apply again.
pub fn check_remembered(policy: &RootPolicy, record: &RootRecord) -> Result<(), Refusal> {
    if let Some(pin) = policy.pinned {
        if record.root.hash != pin {
            return Err(Refusal::NotPinned {
                offered: record.root.hash.to_hex(),
                pinned: pin.to_hex(),
            });
        }
    } else if let Some(key) = &policy.publisher {
        if !record.verify(key) {
            return Err(Refusal::NotSigned);
        }
    }
    Ok(())
}

fn check_signature(policy: &RootPolicy, record: &RootRecord, now_ns: u64) -> Result<(), Refusal> {
    if let Some(key) = &policy.publisher {
        if !record.verify(key) {
            return Err(Refusal::NotSigned);
        }
    }
    let Some(sig) = &record.signature else {
        return Ok(());
    };
    if !record.verify_self_signed() {
        return Err(Refusal::BadSignature);
    }
    if now_ns > sig.expires_ns {
        return Err(Refusal::Expired {
            ago: ns(now_ns - sig.expires_ns),
        });
    }
    let age = now_ns.saturating_sub(sig.signed_at_ns);
    if age > policy.max_age.as_nanos() as u64 {
        return Err(Refusal::TooOld {
            ago: ns(age),
            max: ns(policy.max_age.as_nanos() as u64),
        });
    }
    Ok(())
}

fn check_generation(
    record: &RootRecord,
    memory: &Memory,
    allow_rollback: bool,
    same_publisher: bool,
    now_ns: u64,
) -> Result<(), Refusal> {
    let now_secs = now_ns / 1_000_000_000;
    let limit = now_secs.saturating_add(MAX_GENERATION_AHEAD.as_secs());
    if record.generation > limit {
        return Err(Refusal::FromTheFuture {
            generation: record.generation,
            ahead: ns((record.generation - now_secs).saturating_mul(1_000_000_000)),
        });
    }
    let Some(seen) = &memory.root else {
        return Ok(());
    };
    if record.generation < seen.generation && !allow_rollback {
        return Err(Refusal::Rollback {
            offered: record.generation,
            seen: seen.generation,
        });
    }
    if same_publisher && record.generation == seen.generation && record.root != seen.root {
        return Err(Refusal::Fork {
            generation: record.generation,
            seen: seen.root.hash.to_hex(),
            offered: record.root.hash.to_hex(),
        });
    }
    Ok(())
}

/// Root records for the tests of trust and of following: one clock, a server, a forger.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;
    use crate::wire::object::{BlockSize, ObjectRef};

    pub const NOW: u64 = 1_800_000_000 * 1_000_000_000;
    pub const SERVER: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
    pub const FORGER: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 66);

    /// An unsigned record of channel [1; 32] whose root is the hash of `root`.
    pub fn record(generation: u64, root: &[u8]) -> RootRecord {
        RootRecord {
            channel_id: [1; 32],
            generation,
            publish_time_ns: NOW,
            root: ObjectRef {
                hash: ObjectHash::of(root),
                len: 10,
            },
            block_size: BlockSize::DEFAULT,
            single_file: false,
            signature: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{record, FORGER, NOW, SERVER};
    use super::*;
    use ed25519_dalek::SigningKey;

    const HOUR: u64 = 3600 * 1_000_000_000;

    fn heard(record: RootRecord, from: Ipv6Addr) -> HeardRoot {
        HeardRoot { record, from }
    }

    fn gen_now() -> u64 {
        NOW / 1_000_000_000
    }

    #[test]
    fn first_use_remembers_the_address_and_refuses_another() {
        let p = RootPolicy::default();
        let first = check(
            &p,
            &heard(record(gen_now(), b"a"), SERVER),
            &Memory::default(),
            NOW,
        );
        assert_eq!(first, Ok(Publisher::Address(SERVER)));
        let memory = Memory {
            root: Some(record(gen_now(), b"a")),
            publisher: Some(Publisher::Address(SERVER)),
        };
        let forged = heard(record(gen_now() + 5, b"evil"), FORGER);
        let e = check(&p, &forged, &memory, NOW).unwrap_err();
        assert!(matches!(e, Refusal::NewPublisher { .. }), "{e}");
        assert!(e.to_string().contains("--allow-new-publisher"));
        let allow = RootPolicy {
            allow_new_publisher: true,
            ..RootPolicy::default()
        };
        assert_eq!(
            check(&allow, &forged, &memory, NOW),
            Ok(Publisher::Address(FORGER))
        );
    }

    #[test]
    fn a_generation_from_the_far_future_is_refused() {
        let p = RootPolicy::default();
        let lockout = heard(record(1 << 63, b"evil"), FORGER);
        let e = check(&p, &lockout, &Memory::default(), NOW).unwrap_err();
        assert!(matches!(e, Refusal::FromTheFuture { .. }), "{e}");
        // A day ahead (a stepped clock) is still fine.
        let ahead = heard(record(gen_now() + 86400, b"a"), SERVER);
        assert!(check(&p, &ahead, &Memory::default(), NOW).is_ok());
    }

    #[test]
    fn rollback_and_fork_are_refused() {
        let p = RootPolicy::default();
        let memory = Memory {
            root: Some(record(gen_now(), b"a")),
            publisher: Some(Publisher::Address(SERVER)),
        };
        let older = heard(record(gen_now() - 1, b"old"), SERVER);
        assert!(matches!(
            check(&p, &older, &memory, NOW),
            Err(Refusal::Rollback { .. })
        ));
        let allow = RootPolicy {
            allow_rollback: true,
            ..RootPolicy::default()
        };
        assert!(check(&allow, &older, &memory, NOW).is_ok());
        let fork = heard(record(gen_now(), b"other"), SERVER);
        assert!(matches!(
            check(&p, &fork, &memory, NOW),
            Err(Refusal::Fork { .. })
        ));
        let same = heard(record(gen_now(), b"a"), SERVER);
        assert!(check(&p, &same, &memory, NOW).is_ok());
        // A new publisher (allowed) that numbers its generation alike is no fork.
        let allow_new = RootPolicy {
            allow_new_publisher: true,
            ..RootPolicy::default()
        };
        let elsewhere = heard(record(gen_now(), b"other"), FORGER);
        assert!(check(&allow_new, &elsewhere, &memory, NOW).is_ok());
    }

    fn signed(key: &SigningKey, signed_at: u64, validity: u64) -> RootRecord {
        let mut r = record(gen_now(), b"a");
        r.sign(key, signed_at, validity);
        r
    }

    #[test]
    fn signed_records_expire_and_age() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let p = RootPolicy {
            publisher: Some(key.verifying_key()),
            ..RootPolicy::default()
        };
        let fresh = heard(signed(&key, NOW - HOUR, 24 * HOUR), SERVER);
        assert_eq!(
            check(&p, &fresh, &Memory::default(), NOW),
            Ok(Publisher::Key(key.verifying_key().to_bytes()))
        );
        let expired = heard(signed(&key, NOW - 2 * HOUR, HOUR), SERVER);
        let e = check(&p, &expired, &Memory::default(), NOW).unwrap_err();
        assert!(matches!(e, Refusal::Expired { .. }), "{e}");
        // Valid for a year, but signed longer ago than the receiver's --max-age.
        let stale = heard(signed(&key, NOW - 4 * 24 * HOUR, 365 * 24 * HOUR), SERVER);
        let e = check(&p, &stale, &Memory::default(), NOW).unwrap_err();
        assert!(matches!(e, Refusal::TooOld { .. }), "{e}");
        // The same checks hold for a self-signed record trusted on first use.
        let tofu = RootPolicy::default();
        assert!(check(&tofu, &expired, &Memory::default(), NOW).is_err());
    }

    #[test]
    fn a_signing_publisher_is_remembered_by_key_not_address() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let other = SigningKey::from_bytes(&[4; 32]);
        let p = RootPolicy::default();
        let memory = Memory {
            root: None,
            publisher: Some(Publisher::Key(key.verifying_key().to_bytes())),
        };
        // The publisher moved to another address: still the same key.
        let moved = heard(signed(&key, NOW, HOUR), FORGER);
        assert!(check(&p, &moved, &memory, NOW).is_ok());
        let impostor = heard(signed(&other, NOW, HOUR), SERVER);
        assert!(matches!(
            check(&p, &impostor, &memory, NOW),
            Err(Refusal::NewPublisher { .. })
        ));
        // An unsigned record is not the key's either.
        let unsigned = heard(record(gen_now(), b"a"), SERVER);
        assert!(check(&p, &unsigned, &memory, NOW).is_err());
    }

    #[test]
    fn a_bad_signature_is_refused_even_without_a_key() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let mut r = signed(&key, NOW, HOUR);
        r.generation += 1;
        let e = check(
            &RootPolicy::default(),
            &heard(r, SERVER),
            &Memory::default(),
            NOW,
        );
        assert_eq!(e, Err(Refusal::BadSignature));
    }

    #[test]
    fn a_pin_wins_over_everything_else() {
        let r = record(1, b"old snapshot");
        let p = RootPolicy {
            pinned: Some(r.root.hash),
            ..RootPolicy::default()
        };
        let memory = Memory {
            root: Some(record(gen_now(), b"a")),
            publisher: Some(Publisher::Address(SERVER)),
        };
        assert!(check(&p, &heard(r, FORGER), &memory, NOW).is_ok());
        let other = heard(record(gen_now() + 1, b"b"), SERVER);
        assert!(matches!(
            check(&p, &other, &memory, NOW),
            Err(Refusal::NotPinned { .. })
        ));
    }

    #[test]
    fn publisher_encoding_round_trips_and_rejects_garbage() {
        for p in [Publisher::Key([7; 32]), Publisher::Address(SERVER)] {
            assert_eq!(Publisher::decode(&p.encode()), Some(p));
        }
        for bad in [&b""[..], b"K", b"A123", b"X0123456789abcdef", &[b'K'; 34]] {
            assert_eq!(Publisher::decode(bad), None);
        }
    }
}
