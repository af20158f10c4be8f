//! The receiver's state for one object in flight (sans-IO).
//!
//! Symbols are fed in as they arrive; the first symbols decide the symbol size, but a few
//! decoders of different sizes may coexist so that forged symbols of a wrong size cannot lock
//! out the real ones. A decode is verified against the object's hash before it is returned;
//! a decode that does not verify (forged symbols on a clear channel) is thrown away and the
//! fetch goes on. From then on symbols are kept apart by sender address, so that a forger's
//! symbols spoil only its own decoder while the server's still combine (symbols from several
//! servers of one channel combine until the first forgery is seen).
//!
//! Decoders are few ([`MAX_DECODERS`]). When a symbol needs a new one and all are taken, the
//! one with the least progress goes, but never one fed by a *preferred* sender (one whose
//! symbols already produced verified objects, or the root record: the engine says which), so
//! that a forger rotating spoofed source addresses cannot evict the server's decoder. Only
//! new symbols count as progress: repeats of an ESI already held do not.
//!
//! Timers: after `stall` without a useful symbol the caller should leave and rejoin the group
//! (a fresh MLD report); after `timeout` without one the fetch fails. Once forgery has been
//! seen, symbols no longer prove progress, so the fetch must then finish within `timeout`
//! of its start: a flood can slow a fetch down, never hang it.
//!
//! A fetch may be *in doubt*: the channel moved to a new generation while it was pending, or
//! it was asked for by a reader of a superseded file, so the object may belong only to an
//! older generation, which the server no longer sends. The server answers a join within a
//! round trip and its first round of an object within a few hundred milliseconds, so a
//! doubtful fetch that sees no useful symbol for `stale_after` (from the doubt, its join or
//! its last progress, whichever is latest) is stale: the caller fails it with ESTALE at once
//! instead of waiting for `timeout`. A request from a reader of the current generation
//! vouches for the object (it is in the current tree, so the server has it) and lifts the
//! doubt.

use std::net::Ipv6Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lcfs_cache::Verified;

use crate::wire::fec::{Decoded, Esi, ObjectDecoder};
use crate::wire::object::bundle::Bundle;
use crate::wire::object::{ObjectHash, ObjectRef};

const MAX_DECODERS: usize = 4;

/// What the I/O shell should do for this object now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Wait,
    Rejoin,
    Fail,
    /// The fetch was in doubt and nothing came: the object is gone from the server.
    Stale,
}

/// The timers a fetch is judged by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timers {
    pub stall: Duration,
    pub timeout: Duration,
    pub stale_after: Duration,
    /// A bundle of which not one symbol came this long after its fetch started is given up
    /// as stale, and its riders are fetched on their own groups (see [`BUNDLE_PATIENCE`]).
    pub bundle_patience: Duration,
}

/// How long a bundle's fetch waits for its first symbol. A bundle is derived from a
/// directory, and nobody vouches for it: the mapping from a small file to its bundle may come
/// from a listing of another generation than the server's (tools/soak found a read that
/// rode such a bundle wait out its 30 s timeout and fail with EIO, though its file was
/// current and the server had it). A server that publishes the bundle answers a join with its
/// first round within a round of its bulk queue (a bulk round goes at least every 2048
/// urgent symbols, a quarter of a second at 100 Mbit/s), so three seconds of silence means it
/// does not.
pub const BUNDLE_PATIENCE: Duration = Duration::from_secs(3);

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SymbolStats {
    pub accepted: u64,
    pub ignored: u64,
    pub duplicates: u64,
    pub forged_decodes: u64,
}

/// Which symbols one decoder takes: one symbol size, and one sender once forgery was seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Key {
    size: usize,
    sender: Option<Ipv6Addr>,
}

struct Slot {
    key: Key,
    /// Whether a preferred sender fed this decoder: it is never evicted for a newcomer.
    preferred: bool,
    decoder: ObjectDecoder,
}

/// The simulation's source of objects for [`ObjectDecoder::counting`]: the bytes of an
/// object by its hash, as the server publishes them. Never set in the product.
#[derive(Clone)]
pub struct StandIn(pub Arc<ObjectsByHash>);

/// An object's bytes by its hash.
pub type ObjectsByHash = dyn Fn(&ObjectHash) -> Option<Arc<[u8]>> + Send + Sync;

impl std::fmt::Debug for StandIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StandIn")
    }
}

pub struct ObjectFetch {
    want: ObjectRef,
    bundle: Option<Bundle>,
    decoding: Arc<Mutex<Decoding>>,
    started: Instant,
    last_progress: Instant,
    last_join: Instant,
    /// Since when the fetch is in doubt (see the module doc).
    doubted: Option<Instant>,
    /// Whether any symbol was news, and whether a decode did not verify (from [`Fed`]s).
    accepted: bool,
    forged: bool,
}

impl ObjectFetch {
    pub fn new(now: Instant, want: ObjectRef) -> ObjectFetch {
        ObjectFetch::with(now, want, None)
    }

    /// The fetch of `bundle`, which completes with its members.
    pub fn of_bundle(now: Instant, bundle: Bundle) -> ObjectFetch {
        ObjectFetch::with(now, bundle.id, Some(bundle))
    }

    fn with(now: Instant, want: ObjectRef, bundle: Option<Bundle>) -> ObjectFetch {
        let decoding = Decoding {
            want,
            stand_in: None,
            bundle: bundle.clone(),
            decoders: Vec::new(),
            finished: false,
            stats: SymbolStats::default(),
        };
        ObjectFetch {
            want,
            bundle,
            decoding: Arc::new(Mutex::new(decoding)),
            started: now,
            last_progress: now,
            last_join: now,
            doubted: None,
            accepted: false,
            forged: false,
        }
    }

    /// The bundle this fetch decodes, if it is one.
    pub fn bundle(&self) -> Option<&Bundle> {
        self.bundle.as_ref()
    }

    pub fn want(&self) -> &ObjectRef {
        &self.want
    }

    /// The symbol half, to feed outside the state's lock ([`super::state::Feed`]).
    pub fn decoding(&self) -> Arc<Mutex<Decoding>> {
        Arc::clone(&self.decoding)
    }

    fn lock_decoding(&self) -> std::sync::MutexGuard<'_, Decoding> {
        self.decoding.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn stats(&self) -> SymbolStats {
        self.lock_decoding().stats
    }

    /// Decodes by counting symbols, with objects from `stand_in` (the simulation's choice).
    pub fn set_stand_in(&mut self, stand_in: StandIn) {
        self.lock_decoding().stand_in = Some(stand_in);
    }

    /// Feeds one symbol and follows what it did ([`Decoding::push`], then
    /// [`ObjectFetch::handle_fed`]). Returns the verified object once it decodes.
    pub fn handle_symbol(
        &mut self,
        now: Instant,
        sender: Ipv6Addr,
        preferred: bool,
        esi: Esi,
        data: &[u8],
    ) -> Option<Vec<Verified>> {
        let fed = self.lock_decoding().push(sender, preferred, esi, data);
        self.handle_fed(now, &fed);
        fed.done
    }

    /// What a symbol fed to [`ObjectFetch::decoding`] did, at `now`.
    pub fn handle_fed(&mut self, now: Instant, fed: &Fed) {
        if fed.progress {
            self.accepted = true;
            self.last_progress = now;
        }
        self.forged |= fed.forged;
    }

    pub fn handle_joined(&mut self, now: Instant) {
        self.last_join = now;
    }

    /// Restarts the timers, when the object (re)enters the joined window.
    pub fn handle_started(&mut self, now: Instant) {
        self.started = now;
        self.last_progress = now;
        self.last_join = now;
    }

    /// Puts the fetch in doubt from `now` (see the module doc).
    pub fn handle_doubt(&mut self, now: Instant) {
        self.doubted = Some(now);
    }

    /// A reader of the current generation wants the object: it is not in doubt.
    pub fn handle_vouched(&mut self) {
        self.doubted = None;
    }

    pub fn is_doubted(&self) -> bool {
        self.doubted.is_some()
    }

    pub fn poll_action(&self, now: Instant, t: &Timers) -> Action {
        let quiet = now.saturating_duration_since(self.last_progress);
        let forged = self.forged;
        let since = |at: Instant| now.saturating_duration_since(at);
        if quiet >= t.timeout || (forged && since(self.started) >= t.timeout) {
            Action::Fail
        } else if self.doubted.is_some_and(|d| {
            // Progress counts only when it is news: `last_progress` starts at the join.
            since(d.max(self.last_progress).max(self.started)) >= t.stale_after
        }) || (self.bundle.is_some()
            && !self.accepted
            && since(self.started) >= t.bundle_patience)
        {
            Action::Stale
        } else if quiet >= t.stall && since(self.last_join) >= t.stall {
            Action::Rejoin
        } else {
            Action::Wait
        }
    }
}

/// The symbol half of a fetch: its decoders, and the check that makes a decode an object.
/// A fetch holds it behind its own lock, so that the engine's receive thread decodes and
/// hashes outside the lock of the rest of the state ([`super::state::Feed`]); nothing else
/// takes that lock while it decodes.
pub struct Decoding {
    want: ObjectRef,
    /// Decoders that count symbols instead of decoding (simulation only).
    stand_in: Option<StandIn>,
    /// The members, when `want` is a bundle's id: a decode is verified member by member.
    bundle: Option<Bundle>,
    decoders: Vec<Slot>,
    /// The object was given once: later symbols are no news.
    finished: bool,
    pub stats: SymbolStats,
}

/// What one symbol did to a fetch: the fetch's timers and the engine's counters follow it.
#[derive(Debug, Default)]
pub struct Fed {
    /// A symbol the fetch did not have.
    pub progress: bool,
    /// A decode did not verify (forged symbols).
    pub forged: bool,
    /// The verified object (a bundle's members, in order).
    pub done: Option<Vec<Verified>>,
}

impl Decoding {
    /// Feeds one symbol from `sender`, `preferred` if the engine knows it as a real server.
    pub fn push(&mut self, sender: Ipv6Addr, preferred: bool, esi: Esi, data: &[u8]) -> Fed {
        let mut fed = Fed::default();
        if self.finished {
            self.stats.duplicates += 1;
            return fed;
        }
        let key = Key {
            size: data.len(),
            sender: (self.stats.forged_decodes > 0).then_some(sender),
        };
        let Some(i) = self.decoder_for(key, preferred) else {
            self.stats.ignored += 1;
            return fed;
        };
        self.decoders[i].preferred |= preferred;
        match self.decoders[i].decoder.push(esi, data) {
            Decoded::Ignored => self.stats.ignored += 1,
            Decoded::Duplicate => self.stats.duplicates += 1,
            Decoded::Pending => {
                self.stats.accepted += 1;
                fed.progress = true;
                if self.decoders[i].decoder.saturated() {
                    self.decoders.swap_remove(i);
                }
            }
            Decoded::Done(bytes) => {
                self.stats.accepted += 1;
                fed.progress = true;
                fed.done = self.verify(i, bytes);
                fed.forged = fed.done.is_none();
                if fed.done.is_some() {
                    self.finished = true;
                    self.decoders.clear();
                }
            }
        }
        fed
    }

    fn verify(&mut self, i: usize, bytes: Vec<u8>) -> Option<Vec<Verified>> {
        let checked = match &self.bundle {
            None => Verified::new(self.want.hash.raw(), bytes)
                .map(|v| vec![v])
                .map_err(|e| e.to_string()),
            Some(b) => b.split(&bytes).map_err(|e| e.to_string()),
        };
        match checked {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::debug!("discarding a decode that does not verify: {e}");
                self.stats.forged_decodes += 1;
                if self.decoders[i].key.sender.is_none() {
                    // Symbols mixed from every sender can no longer be trusted to combine.
                    self.decoders.clear();
                } else {
                    self.decoders.swap_remove(i);
                }
                None
            }
        }
    }

    fn decoder_for(&mut self, key: Key, preferred: bool) -> Option<usize> {
        if let Some(i) = self.decoders.iter().position(|d| d.key == key) {
            return Some(i);
        }
        if self.decoders.len() >= MAX_DECODERS {
            // Make room by dropping the decoder with the least progress, never a preferred
            // sender's; with every slot preferred, only a preferred newcomer gets one.
            let evictable = |i: &usize| !self.decoders[*i].preferred || preferred;
            let worst = (0..self.decoders.len())
                .filter(evictable)
                .min_by_key(|&i| self.decoders[i].decoder.kept())?;
            self.decoders.swap_remove(worst);
        }
        let counted = self.stand_in.as_ref().and_then(|s| (s.0)(&self.want.hash));
        let decoder = match counted {
            Some(object) => ObjectDecoder::counting(object, key.size).ok()?,
            None => ObjectDecoder::new(self.want.len as u64, key.size).ok()?,
        };
        self.decoders.push(Slot {
            key,
            preferred,
            decoder,
        });
        Some(self.decoders.len() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::fec::ObjectEncoder;
    use crate::wire::object::object_ref;

    const SERVER: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
    const FORGER: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 666);

    fn timers(stall: Duration, timeout: Duration) -> Timers {
        Timers {
            stall,
            timeout,
            stale_after: Duration::from_millis(750),
            bundle_patience: BUNDLE_PATIENCE,
        }
    }

    fn setup(len: usize) -> (Vec<u8>, ObjectEncoder, ObjectFetch, Instant) {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let enc = ObjectEncoder::new(&data, 500).unwrap();
        let now = Instant::now();
        let f = ObjectFetch::new(now, object_ref(&data));
        (data, enc, f, now)
    }

    #[test]
    fn decodes_and_verifies() {
        let (data, enc, mut f, now) = setup(5000);
        let mut buf = Vec::new();
        let mut got = None;
        for esi in 3..40 {
            enc.symbol(Esi(esi), &mut buf);
            if let Some(v) = f.handle_symbol(now, SERVER, false, Esi(esi), &buf) {
                got = Some(v);
                break;
            }
        }
        assert_eq!(&got.unwrap()[0][..], &data[..]);
    }

    #[test]
    fn forged_symbols_never_produce_wrong_bytes() {
        let (data, enc, mut f, now) = setup(3000);
        // Forged source symbols with the right size decode to something that fails the hash.
        for esi in 0..6 {
            assert!(f
                .handle_symbol(now, FORGER, false, Esi(esi), &[0xAA; 500])
                .is_none());
        }
        assert_eq!(f.stats().forged_decodes, 1);
        let mut buf = Vec::new();
        let mut got = None;
        for esi in 10..40 {
            enc.symbol(Esi(esi), &mut buf);
            got = got.or(f.handle_symbol(now, SERVER, false, Esi(esi), &buf));
        }
        assert_eq!(&got.unwrap()[0][..], &data[..]);
    }

    #[test]
    fn wrong_sized_flood_does_not_lock_out() {
        let (data, enc, mut f, now) = setup(3000);
        for size in [1usize, 7, 99, 1400] {
            f.handle_symbol(now, FORGER, false, Esi(0), &vec![1; size]);
        }
        let mut buf = Vec::new();
        let mut got = None;
        for esi in 0..20 {
            enc.symbol(Esi(esi), &mut buf);
            got = got.or(f.handle_symbol(now, SERVER, false, Esi(esi), &buf));
        }
        assert_eq!(&got.unwrap()[0][..], &data[..]);
    }

    #[test]
    fn after_a_forgery_senders_are_kept_apart() {
        let (data, enc, mut f, now) = setup(20_000);
        let mut buf = Vec::new();
        // The first decode mixes a forged symbol in and fails; after that the forger's
        // symbols, interleaved with the server's, go to a decoder of their own.
        f.handle_symbol(now, FORGER, false, Esi(0), &[0x55; 500]);
        let mut got = None;
        for esi in 1..200 {
            enc.symbol(Esi(esi), &mut buf);
            got = got.or(f.handle_symbol(now, SERVER, false, Esi(esi), &buf));
            got = got.or(f.handle_symbol(now, FORGER, false, Esi(esi + 1000), &[esi as u8; 500]));
            if got.is_some() {
                break;
            }
        }
        assert!(f.stats().forged_decodes >= 1);
        assert_eq!(&got.unwrap()[0][..], &data[..]);
    }

    #[test]
    fn a_flood_cannot_postpone_the_timeout() {
        let (_, _, mut f, t0) = setup(3000);
        let t = timers(Duration::from_millis(300), Duration::from_secs(2));
        let mut now = t0;
        for round in 0..40u32 {
            now += Duration::from_millis(100);
            for esi in 0..6 {
                f.handle_symbol(
                    now,
                    FORGER,
                    false,
                    Esi(round * 10 + esi),
                    &[round as u8; 500],
                );
            }
        }
        assert!(f.stats().forged_decodes > 0);
        assert_eq!(f.poll_action(now, &t), Action::Fail);
    }

    #[test]
    fn rotating_spoofed_senders_cannot_evict_the_servers_decoder() {
        let (data, enc, mut f, now) = setup(20_000);
        // A forgery first, so that symbols are kept apart by sender.
        for esi in 0..50 {
            f.handle_symbol(now, FORGER, false, Esi(esi), &[0x55; 500]);
        }
        assert!(f.stats().forged_decodes > 0);
        let mut buf = Vec::new();
        let mut got = None;
        for esi in 0..200u32 {
            enc.symbol(Esi(esi), &mut buf);
            got = got.or(f.handle_symbol(now, SERVER, true, Esi(esi), &buf));
            // Each server symbol is followed by three from never-seen addresses, each with
            // more symbols than the server has sent so far.
            for n in 0..3u32 {
                let spoofed = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, esi as u16, n as u16 + 7);
                for e in 0..=esi + 1 {
                    f.handle_symbol(now, spoofed, false, Esi(10_000 + e), &[n as u8; 500]);
                }
            }
            if got.is_some() {
                break;
            }
        }
        assert_eq!(
            &got.expect("the server's decoder survived")[0][..],
            &data[..]
        );
    }

    #[test]
    fn repeated_symbols_are_not_progress() {
        let (_, enc, mut f, t0) = setup(20_000);
        let t = timers(Duration::from_millis(300), Duration::from_secs(2));
        let mut buf = Vec::new();
        enc.symbol(Esi(0), &mut buf);
        let mut now = t0;
        for _ in 0..40 {
            now += Duration::from_millis(100);
            f.handle_symbol(now, SERVER, true, Esi(0), &buf);
        }
        assert!(f.stats().duplicates >= 39);
        assert_eq!(f.poll_action(now, &t), Action::Fail);
    }

    #[test]
    fn timers_stall_then_fail() {
        let (_, _, f, t0) = setup(100);
        let t = timers(Duration::from_millis(300), Duration::from_secs(2));
        assert_eq!(f.poll_action(t0, &t), Action::Wait);
        assert_eq!(f.poll_action(t0 + t.stall, &t), Action::Rejoin);
        assert_eq!(f.poll_action(t0 + t.timeout, &t), Action::Fail);
    }

    #[test]
    fn a_doubtful_fetch_without_symbols_is_stale_soon() {
        let (_, enc, mut f, t0) = setup(20_000);
        let t = timers(Duration::from_millis(300), Duration::from_secs(30));
        let ms = Duration::from_millis;
        // Quiet for a while before the doubt (the server restarted): the doubt counts from
        // itself, not from the last symbol.
        let doubt = t0 + Duration::from_secs(5);
        f.handle_doubt(doubt);
        assert_eq!(f.poll_action(doubt + ms(700), &t), Action::Rejoin);
        assert_eq!(f.poll_action(doubt + t.stale_after, &t), Action::Stale);
        // A symbol after the doubt shows the server has the object: it restarts the clock.
        let mut buf = Vec::new();
        enc.symbol(Esi(0), &mut buf);
        f.handle_symbol(doubt + ms(500), SERVER, true, Esi(0), &buf);
        assert_ne!(f.poll_action(doubt + ms(1000), &t), Action::Stale);
        assert_eq!(f.poll_action(doubt + ms(1250), &t), Action::Stale);
        // A current reader vouches for it: back to the ordinary timeout.
        f.handle_vouched();
        assert_eq!(f.poll_action(doubt + ms(5000), &t), Action::Rejoin);
        assert!(!f.is_doubted());
    }

    #[test]
    fn a_doubtful_fetch_waits_for_its_join() {
        let (_, _, mut f, t0) = setup(100);
        let t = timers(Duration::from_millis(300), Duration::from_secs(30));
        f.handle_doubt(t0);
        // Queued behind the window for a second, then joined: the clock starts at the join.
        let joined = t0 + Duration::from_secs(1);
        f.handle_started(joined);
        assert_eq!(
            f.poll_action(joined + Duration::from_millis(500), &t),
            Action::Rejoin
        );
        assert_eq!(f.poll_action(joined + t.stale_after, &t), Action::Stale);
    }
}
