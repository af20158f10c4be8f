//! Following the publisher: which root records a running mount moves to.
//!
//! A mount keeps the channel's root group joined ([`Fetcher::watch_roots`]; the server repeats
//! its record every 25 ms while the group has listeners, so a new generation is heard within
//! tens of milliseconds of its publication) and hands each new record, and a repeat once a
//! second ([`super::state::ROOT_REPEAT`]), to a [`RootFollower`]
//! (sans-IO: every input, the clock included, is a parameter). Each record must pass
//! [`trust::check`] exactly like the first one did, against what the receiver remembers (the
//! last record accepted and its publisher): forged, unsigned where a key is required,
//! expired, too old, rolled back, forked, from the far future or from another publisher, it is
//! refused and the mount stays where it is. A pinned mount (`CHANNEL@ROOTHASH`) has no
//! follower at all: it never moves.
//!
//! An acceptable record of a higher generation than the current one (and than any move under
//! way) becomes the candidate. The I/O shell ([`run`]) takes it with
//! [`RootFollower::poll_move`], puts the engine's pending fetches in doubt
//! ([`Fetcher::handle_new_generation`]), fetches and verifies the new root directory, and
//! reports with [`RootFollower::handle_moved`]: on success the record becomes current and is
//! remembered in the cache (so that going back to an older one is a refused rollback); on
//! failure the same generation is not tried again for [`RETRY`]. Only then does the mount
//! hear of it. A higher generation heard during a move is taken next.
//!
//! Any acceptable record also says the server is there: a mount started offline from its
//! cached root goes online with the first one ([`RootFollower::poll_online`]), and moves on if
//! it is newer.

use std::net::Ipv6Addr;
use std::time::Duration;

use super::tree::Origin;
use super::trust::{self, Memory, Publisher, Refusal, RootPolicy};
use super::{FetchError, Fetcher, HeardRoot, Tree};
use crate::wire::object::RootRecord;

/// How long a generation whose move failed is not tried again.
pub const RETRY: Duration = Duration::from_secs(5);

/// A record to move to, with its publisher as [`trust::check`] named it.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub heard: HeardRoot,
    pub publisher: Publisher,
}

/// The follow decisions of one mount (see the module doc).
#[derive(Debug)]
pub struct RootFollower {
    policy: RootPolicy,
    memory: Memory,
    current: RootRecord,
    online: bool,
    /// The server answered while offline: the sender to prefer, not yet polled.
    came_online: Option<Ipv6Addr>,
    candidate: Option<Candidate>,
    /// The generation of the move under way.
    moving: Option<u64>,
    /// A generation whose move failed, and until when (Unix ns) it is not tried again.
    failed: Option<(u64, u64)>,
}

impl RootFollower {
    /// The follower of `tree`'s publisher, for a mount or `copy --watch`: `None` when
    /// `policy` pins a snapshot, which never moves.
    pub fn of_tree(tree: &Tree, policy: &RootPolicy) -> Result<Option<Self>, FetchError> {
        if policy.pinned.is_some() {
            return Ok(None);
        }
        let memory = super::tree::remembered(tree.fetcher())?;
        let online = tree.origin() == Origin::Network;
        Ok(Some(RootFollower::new(
            policy.clone(),
            memory,
            tree.root_record().clone(),
            online,
        )))
    }

    /// A follower of a mount showing `current`, remembering `memory`; `online` unless it
    /// started from the cached record.
    pub fn new(policy: RootPolicy, memory: Memory, current: RootRecord, online: bool) -> Self {
        RootFollower {
            policy,
            memory,
            current,
            online,
            came_online: None,
            candidate: None,
            moving: None,
            failed: None,
        }
    }

    /// The record the mount shows.
    pub fn current(&self) -> &RootRecord {
        &self.current
    }

    /// What the receiver remembers of the channel.
    pub fn memory(&self) -> &Memory {
        &self.memory
    }

    pub fn is_online(&self) -> bool {
        self.online
    }

    /// A record heard at `now_ns` (Unix ns). Refused records change nothing.
    pub fn handle_record(&mut self, now_ns: u64, heard: HeardRoot) -> Result<(), Refusal> {
        let publisher = trust::check(&self.policy, &heard, &self.memory, now_ns)?;
        if self.policy.pinned.is_some() {
            return Ok(());
        }
        if !self.online {
            self.online = true;
            self.came_online = Some(heard.from);
        }
        let generation = heard.record.generation;
        let ahead = [
            Some(self.current.generation),
            self.moving,
            self.candidate.as_ref().map(|c| c.heard.record.generation),
        ];
        let retry_later = self
            .failed
            .is_some_and(|(g, until)| generation <= g && now_ns < until);
        if ahead.iter().flatten().all(|g| generation > *g) && !retry_later {
            self.candidate = Some(Candidate { heard, publisher });
        }
        Ok(())
    }

    /// The sender of the first acceptable record heard while offline, once.
    pub fn poll_online(&mut self) -> Option<Ipv6Addr> {
        self.came_online.take()
    }

    /// The record to move to now, if any and no move is under way.
    pub fn poll_move(&mut self) -> Option<Candidate> {
        if self.moving.is_some() {
            return None;
        }
        let c = self.candidate.take()?;
        self.moving = Some(c.heard.record.generation);
        Some(c)
    }

    /// The move to `c` (from [`RootFollower::poll_move`]) ended at `now_ns`: done, or not.
    pub fn handle_moved(&mut self, now_ns: u64, c: &Candidate, done: bool) {
        self.moving = None;
        if !done {
            let until = now_ns.saturating_add(RETRY.as_nanos() as u64);
            self.failed = Some((c.heard.record.generation, until));
            return;
        }
        self.current = c.heard.record.clone();
        self.memory.root = Some(c.heard.record.clone());
        self.memory.publisher = Some(c.publisher);
    }
}

/// What [`run`] tells the mount.
pub enum Followed {
    /// The server answered a mount that started offline.
    Online,
    /// The channel moved to this tree's generation.
    Moved(Box<Tree>),
}

/// Follows the publisher of `tree`'s channel until the engine stops, telling `sink` of each
/// move (see the module doc).
pub async fn run(mut tree: Tree, mut follower: RootFollower, mut sink: impl FnMut(Followed)) {
    let fetcher = tree.fetcher().clone();
    let mut roots = fetcher.watch_roots();
    let mut refusals = 0u64;
    while let Some(heard) = roots.next().await {
        let from = heard.from;
        if let Err(e) = follower.handle_record(super::tree::unix_now_ns(), heard) {
            refusals += 1;
            // A flood of forgeries must not flood the log: the first, then every 1000th.
            if refusals % 1000 == 1 {
                tracing::warn!("ignoring a root record from {from} ({refusals} so far): {e}");
            }
            continue;
        }
        if let Some(from) = follower.poll_online() {
            fetcher.prefer_sender(from);
            tracing::info!(
                "the server of channel {:?} answers",
                fetcher.channel().name()
            );
            sink(Followed::Online);
        }
        while let Some(c) = follower.poll_move() {
            let moved = move_to(&tree, &fetcher, &follower, &c).await;
            follower.handle_moved(super::tree::unix_now_ns(), &c, moved.is_some());
            if let Some(next) = moved {
                tree = next.clone();
                sink(Followed::Moved(Box::new(next)));
            }
        }
    }
}

/// Moves to candidate `c`: doubts pending fetches, then fetches the new root directory; on
/// success remembers the record and returns the new tree.
async fn move_to(
    tree: &Tree,
    fetcher: &Fetcher,
    follower: &RootFollower,
    c: &Candidate,
) -> Option<Tree> {
    let record = &c.heard.record;
    fetcher.handle_new_generation();
    let next = tree.moved_to(record.clone());
    if let Err(e) = next.root_dir(super::Priority::Demand).await {
        tracing::warn!(
            "channel {:?}: staying on generation {}: the root directory of generation {} is not available: {}",
            fetcher.channel().name(),
            follower.current().generation,
            record.generation,
            e.report()
        );
        return None;
    }
    fetcher.prefer_sender(c.heard.from);
    super::tree::remember(fetcher, record, Some(c.publisher), follower.memory());
    tracing::info!(
        "channel {:?}: moved from generation {} to {} (root {})",
        fetcher.channel().name(),
        follower.current().generation,
        record.generation,
        &record.root.hash.to_hex()[..16]
    );
    Some(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::trust::fixtures::{record, FORGER, NOW, SERVER};
    use crate::wire::object::ObjectHash;
    use ed25519_dalek::SigningKey;

    const SEC: u64 = 1_000_000_000;

    fn heard(generation: u64, root: &[u8], from: Ipv6Addr) -> HeardRoot {
        HeardRoot {
            record: record(generation, root),
            from,
        }
    }

    const G: u64 = 1_800_000_000;

    /// A follower of generation G from SERVER, trusted on first use.
    fn follower(policy: RootPolicy, online: bool) -> RootFollower {
        let memory = Memory {
            root: Some(record(G, b"one")),
            publisher: Some(Publisher::Address(SERVER)),
        };
        RootFollower::new(policy, memory, record(G, b"one"), online)
    }

    /// Moves to whatever is polled, successfully.
    fn settle(f: &mut RootFollower) -> Option<u64> {
        let c = f.poll_move()?;
        f.handle_moved(NOW, &c, true);
        Some(c.heard.record.generation)
    }

    #[test]
    fn a_higher_generation_from_the_publisher_is_moved_to_and_remembered() {
        let mut f = follower(RootPolicy::default(), true);
        f.handle_record(NOW, heard(G, b"one", SERVER)).unwrap();
        assert!(f.poll_move().is_none(), "the same record is no move");
        f.handle_record(NOW, heard(G + 5, b"two", SERVER)).unwrap();
        assert_eq!(settle(&mut f), Some(G + 5));
        assert_eq!(f.current().generation, G + 5);
        assert_eq!(f.memory().root.as_ref().unwrap().generation, G + 5);
        // Going back is now a rollback, refused.
        let e = f.handle_record(NOW, heard(G, b"one", SERVER)).unwrap_err();
        assert!(matches!(e, Refusal::Rollback { .. }), "{e}");
        assert!(f.poll_move().is_none());
    }

    #[test]
    fn records_are_checked_like_the_first_one() {
        let mut f = follower(RootPolicy::default(), true);
        let e = f.handle_record(NOW, heard(G + 9, b"evil", FORGER));
        assert!(matches!(e, Err(Refusal::NewPublisher { .. })), "{e:?}");
        let e = f.handle_record(NOW, heard(G, b"fork", SERVER));
        assert!(matches!(e, Err(Refusal::Fork { .. })), "{e:?}");
        let e = f.handle_record(NOW, heard(1 << 62, b"far", SERVER));
        assert!(matches!(e, Err(Refusal::FromTheFuture { .. })), "{e:?}");
        assert!(f.poll_move().is_none());
        assert_eq!(f.current().generation, G);
    }

    #[test]
    fn a_publisher_key_is_required_of_every_record() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let policy = RootPolicy {
            publisher: Some(key.verifying_key()),
            ..RootPolicy::default()
        };
        let mut f = follower(policy, true);
        let e = f.handle_record(NOW, heard(G + 1, b"unsigned", SERVER));
        assert_eq!(e, Err(Refusal::NotSigned));
        let mut signed = heard(G + 2, b"signed", SERVER);
        signed.record.sign(&key, NOW, 3600 * SEC);
        f.handle_record(NOW, signed.clone()).unwrap();
        assert_eq!(settle(&mut f), Some(G + 2));
        // The same record once it expired: refused, and the mount stays.
        let later = NOW + 2 * 3600 * SEC;
        let e = f.handle_record(later, signed);
        assert!(matches!(e, Err(Refusal::Expired { .. })), "{e:?}");
    }

    #[test]
    fn a_pinned_follower_never_moves() {
        let policy = RootPolicy {
            pinned: Some(ObjectHash::of(b"one")),
            ..RootPolicy::default()
        };
        let mut f = follower(policy, true);
        f.handle_record(NOW, heard(G + 1, b"one", SERVER)).unwrap();
        assert!(f.handle_record(NOW, heard(G + 2, b"two", SERVER)).is_err());
        assert!(f.poll_move().is_none());
    }

    #[test]
    fn one_move_at_a_time_and_the_highest_next() {
        let mut f = follower(RootPolicy::default(), true);
        f.handle_record(NOW, heard(G + 1, b"a", SERVER)).unwrap();
        let c = f.poll_move().unwrap();
        // While moving: the same generation again is nothing new, a lower one neither.
        f.handle_record(NOW, heard(G + 1, b"a", SERVER)).unwrap();
        assert!(f.poll_move().is_none());
        f.handle_record(NOW, heard(G + 3, b"c", SERVER)).unwrap();
        f.handle_record(NOW, heard(G + 2, b"b", SERVER)).unwrap();
        assert!(f.poll_move().is_none(), "one move at a time");
        f.handle_moved(NOW, &c, true);
        assert_eq!(settle(&mut f), Some(G + 3));
    }

    #[test]
    fn a_failed_move_is_retried_later() {
        let mut f = follower(RootPolicy::default(), true);
        f.handle_record(NOW, heard(G + 1, b"a", SERVER)).unwrap();
        let c = f.poll_move().unwrap();
        f.handle_moved(NOW, &c, false);
        assert_eq!(f.current().generation, G);
        f.handle_record(NOW + SEC, heard(G + 1, b"a", SERVER))
            .unwrap();
        assert!(f.poll_move().is_none(), "not again at once");
        let later = NOW + RETRY.as_nanos() as u64;
        f.handle_record(later, heard(G + 1, b"a", SERVER)).unwrap();
        assert!(f.poll_move().is_some());
    }

    #[test]
    fn an_offline_mount_goes_online_and_moves_on() {
        let mut f = follower(RootPolicy::default(), false);
        assert!(!f.is_online());
        f.handle_record(NOW, heard(G, b"one", SERVER)).unwrap();
        assert_eq!(f.poll_online(), Some(SERVER));
        assert_eq!(f.poll_online(), None, "once");
        assert!(f.is_online() && f.poll_move().is_none());
        f.handle_record(NOW, heard(G + 1, b"two", SERVER)).unwrap();
        assert_eq!(settle(&mut f), Some(G + 1));
    }
}
