//! Tests of the receiver state without sockets: requests, claims, datagrams and time go in,
//! membership changes, claims and events come out, on a simulated clock.

use std::net::Ipv6Addr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lcfs_cache::Verified;
use proptest::prelude::*;

use super::config::{FetchConfig, FetchStats, Freshness, Priority};
use super::membership::Memberships;
use super::state::{
    Claim, Event, Feed, FetchState, Requested, ELSEWHERE_PATIENCE, ROOT_WATCH_REJOIN,
};
use crate::net::Envelope;
use crate::wire::channel::{Channel, Report, Tag};
use crate::wire::fec::{Esi, ObjectEncoder};
use crate::wire::object::bundle::{Bundle, Bundling};
use crate::wire::object::{ObjectHash, ObjectRef};
use crate::wire::packet;

const IFINDEX: u32 = 7;
const SERVER: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
const SYMBOL: usize = 1024;

struct Rig {
    now: Instant,
    st: FetchState,
    channel: Channel,
    stats: Arc<FetchStats>,
}

fn rig(max_joined: usize) -> Rig {
    let now = Instant::now();
    let channel = Channel::new("state-test", None);
    let stats = Arc::new(FetchStats::default());
    let config = FetchConfig {
        max_joined,
        ..FetchConfig::default()
    };
    let st = FetchState::new(
        now,
        channel.clone(),
        IFINDEX,
        config,
        stats.clone(),
        Memberships::new(Duration::ZERO),
    );
    Rig {
        now,
        st,
        channel,
        stats,
    }
}

fn object(n: u32, len: usize) -> Verified {
    let bytes: Vec<u8> = (0..len).map(|i| (i as u32 * 7 + n) as u8).collect();
    Verified::hash_of(bytes)
}

fn want(v: &Verified) -> ObjectRef {
    ObjectRef {
        hash: ObjectHash::of_verified(v),
        len: v.len() as u32,
    }
}

impl Rig {
    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.st.handle_timeout(self.now);
    }

    fn request(&mut self, v: &Verified, priority: Priority) -> Tag {
        match self
            .st
            .handle_request(self.now, want(v), priority, Freshness::Current)
        {
            Requested::Pending(tag) => tag,
            Requested::Recent(_) => panic!("not pending"),
        }
    }

    fn claims(&mut self) -> Vec<(Tag, ObjectHash)> {
        std::iter::from_fn(|| self.st.poll_claim(self.now)).collect()
    }

    fn grant_all(&mut self) {
        for (tag, _) in self.claims() {
            assert!(!self.st.handle_claim(self.now, tag, Claim::Granted));
        }
    }

    /// Membership changes, but for the bulk and hurry reports' (see `intents`).
    fn membership(&mut self) -> Vec<(Ipv6Addr, bool)> {
        let intents = [Report::Bulk, Report::Hurry].map(|r| self.report_group(r));
        let mut all = self.all_membership();
        all.retain(|(g, _)| !intents.contains(g));
        all
    }

    fn all_membership(&mut self) -> Vec<(Ipv6Addr, bool)> {
        self.st.poll_membership(self.now).unwrap_or_default()
    }

    fn report_group(&self, r: Report) -> Ipv6Addr {
        self.channel.report_address(r).unwrap().group
    }

    fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.st.poll_event()).collect()
    }

    fn group(&self, v: &Verified) -> Ipv6Addr {
        self.channel
            .object_address(&ObjectHash::of_verified(v))
            .group
    }

    /// Every source symbol of `bytes` under `tag`, from `from` to `to` on `ifindex`.
    fn send_symbols(
        &mut self,
        from: Ipv6Addr,
        tag: Tag,
        bytes: &[u8],
        to: Option<Ipv6Addr>,
        ifindex: u32,
    ) {
        let enc = ObjectEncoder::new(bytes, SYMBOL.min(bytes.len())).unwrap();
        let (mut sym, mut pkt) = (Vec::new(), Vec::new());
        for esi in 0..enc.source_symbols() {
            enc.symbol(Esi(esi), &mut sym);
            packet::encode_symbol(&mut pkt, tag, Esi(esi), &sym, None);
            let env = Envelope { from, to, ifindex };
            self.st.handle_datagram(self.now, env, &mut pkt);
        }
    }

    /// Every source symbol of `v` from the server, multicast to `to` on `ifindex`.
    fn send(&mut self, v: &Verified, to: Option<Ipv6Addr>, ifindex: u32) {
        let tag = self.channel.object_address(&ObjectHash::of_verified(v)).tag;
        self.send_symbols(SERVER, tag, v, to, ifindex);
    }

    /// Every source symbol of `bytes` under `tag` from the server, to `group` on our
    /// interface.
    fn send_bytes(&mut self, tag: Tag, group: Ipv6Addr, bytes: &[u8]) {
        self.send_symbols(SERVER, tag, bytes, Some(group), IFINDEX);
    }

    /// The first `n` source symbols of `bytes` under `tag`, to `group`.
    fn send_bytes_symbols(&mut self, tag: Tag, group: Ipv6Addr, bytes: &[u8], n: u32) {
        let k = ObjectEncoder::new(bytes, SYMBOL.min(bytes.len()))
            .unwrap()
            .source_symbols();
        self.send_esis(tag, group, bytes, 0..n.min(k));
    }

    /// Symbols `esis` of `bytes` under `tag`, to `group`.
    fn send_esis(
        &mut self,
        tag: Tag,
        group: Ipv6Addr,
        bytes: &[u8],
        esis: impl Iterator<Item = u32>,
    ) {
        let enc = ObjectEncoder::new(bytes, SYMBOL.min(bytes.len())).unwrap();
        let (mut sym, mut pkt) = (Vec::new(), Vec::new());
        for esi in esis {
            enc.symbol(Esi(esi), &mut sym);
            packet::encode_symbol(&mut pkt, tag, Esi(esi), &sym, None);
            let env = Envelope {
                from: SERVER,
                to: Some(group),
                ifindex: IFINDEX,
            };
            self.st.handle_datagram(self.now, env, &mut pkt);
        }
    }

    /// The fetch `tag` of `v` on its own group: granted, joined, still pending after
    /// `ticks` quiet ticks, then completed by the server's symbols.
    fn own_fetch_completes(&mut self, tag: Tag, v: &Verified, ticks: usize) {
        self.st.handle_claim(self.now, tag, Claim::Granted);
        let group = self.group(v);
        assert!(self.membership().contains(&(group, true)));
        for _ in 0..ticks {
            self.advance(FetchState::TICK);
        }
        assert!(!self
            .events()
            .iter()
            .any(|e| matches!(e, Event::Failed { .. })));
        self.deliver(v);
        assert_eq!(completed(&self.events()), [ObjectHash::of_verified(v)]);
        assert_eq!(self.st.pending(), 0);
    }

    /// `n` small files of 2000 bytes and their bundle, which the state now knows.
    fn learn_bundle(&mut self, n: u32) -> (Vec<Verified>, Bundle) {
        let files: Vec<Verified> = (0..n).map(|i| object(i, 2000)).collect();
        let (bundle, _) = bundle_of(&files);
        self.st.handle_bundles(Bundling {
            bundles: vec![bundle.clone()],
            alone: Vec::new(),
        });
        (files, bundle)
    }

    fn tags(&self, objs: &[Verified]) -> Vec<Tag> {
        let tag = |v| self.channel.object_address(&ObjectHash::of_verified(v)).tag;
        objs.iter().map(tag).collect()
    }

    /// The server's beacon, listing `on_air` as its next rounds.
    fn beacon(&mut self, on_air: &[Tag]) {
        let air = self.channel.air_address();
        let mut pkt = Vec::new();
        packet::encode_air(&mut pkt, air.tag, on_air, None);
        let env = Envelope {
            from: SERVER,
            to: Some(air.group),
            ifindex: IFINDEX,
        };
        self.st.handle_datagram(self.now, env, &mut pkt);
    }

    fn deliver(&mut self, v: &Verified) {
        let group = self.group(v);
        self.send(v, Some(group), IFINDEX);
    }

    /// A demand fetch of `v` that loses one symbol in five and completes.
    fn fetch_one_in_five_lost(&mut self, v: &Verified) {
        let tag = self.request(v, Priority::Demand);
        self.grant_all();
        let group = self.group(v);
        // One in five lost; 40 of the first 50 decode it.
        self.send_esis(tag, group, v, (0..50).filter(|e| e % 5 != 4));
        assert_eq!(completed(&self.events()), [ObjectHash::of_verified(v)]);
    }

    /// As [`Rig::fetch_one_in_five_lost`], with the losses in two bursts of five.
    fn fetch_in_bursts_lost(&mut self, v: &Verified) {
        let tag = self.request(v, Priority::Demand);
        self.grant_all();
        let group = self.group(v);
        let lost = |e: &u32| (10..15).contains(e) || (30..35).contains(e);
        self.send_esis(tag, group, v, (0..50).filter(|e| !lost(e)));
        assert_eq!(completed(&self.events()), [ObjectHash::of_verified(v)]);
    }

    /// The groups of the loss levels, lowest first.
    fn loss_groups(&self) -> Vec<Ipv6Addr> {
        (0..crate::wire::channel::LOSS_LEVELS.len())
            .map(|l| self.channel.loss_address(l).unwrap().group)
            .collect()
    }

    /// Runs the state as its shell does, waking only at `poll_timeout`, until `end`: each
    /// wake's time and the membership changes it made.
    fn run_on_timers(&mut self, end: Instant) -> Vec<(Instant, Vec<(Ipv6Addr, bool)>)> {
        let mut wakes = Vec::new();
        loop {
            let at = self.st.poll_timeout().max(self.now);
            if at > end {
                break;
            }
            self.now = at;
            self.st.handle_timeout(self.now);
            wakes.push((self.now, self.all_membership()));
            assert!(wakes.len() < 100_000, "poll_timeout does not move on");
        }
        self.now = end;
        wakes
    }
}

/// When `group` was joined (`join`) or left, among the `wakes` of [`Rig::run_on_timers`].
fn changed_at(
    wakes: &[(Instant, Vec<(Ipv6Addr, bool)>)],
    group: Ipv6Addr,
    join: bool,
) -> Vec<Instant> {
    let hit =
        |(t, ops): &(Instant, Vec<(Ipv6Addr, bool)>)| ops.contains(&(group, join)).then_some(*t);
    wakes.iter().filter_map(hit).collect()
}

fn completed(events: &[Event]) -> Vec<ObjectHash> {
    let done = |e: &Event| match e {
        Event::Completed { object, .. } => Some(ObjectHash::of_verified(object)),
        _ => None,
    };
    events.iter().filter_map(done).collect()
}

#[test]
fn a_request_is_claimed_joined_decoded_and_left() {
    let mut r = rig(32);
    let v = object(1, 5000);
    r.request(&v, Priority::Demand);
    assert!(
        r.membership().is_empty(),
        "nothing is joined before the claim"
    );
    r.grant_all();
    let group = r.group(&v);
    assert_eq!(r.membership(), [(group, true)]);
    r.deliver(&v);
    let events = r.events();
    assert_eq!(completed(&events), [ObjectHash::of_verified(&v)]);
    assert!(
        matches!(events[..], [Event::Completed { member: false, .. }]),
        "an object fetched on its own group is not a bundle's member"
    );
    assert_eq!(r.membership(), [(group, false)]);
    assert_eq!(r.st.pending(), 0);
    let again =
        r.st.handle_request(r.now, want(&v), Priority::Demand, Freshness::Current);
    assert!(
        matches!(again, Requested::Recent(o) if o == v),
        "kept until stored"
    );
}

#[test]
fn symbols_count_only_on_their_own_group_and_interface() {
    let mut r = rig(32);
    let (v, other) = (object(1, 3000), object(2, 3000));
    r.request(&v, Priority::Demand);
    r.request(&other, Priority::Demand);
    r.grant_all();
    let wrong_group = r.group(&other);
    r.send(&v, Some(wrong_group), IFINDEX);
    r.send(&v, Some(SERVER), IFINDEX);
    r.send(&v, None, IFINDEX);
    let group = r.group(&v);
    r.send(&v, Some(group), IFINDEX + 1);
    assert!(completed(&r.events()).is_empty());
    let misaddressed = r
        .stats
        .misaddressed
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(misaddressed, 4 * 3, "every datagram of the four wrong ways");
    r.deliver(&v);
    assert_eq!(completed(&r.events()), [ObjectHash::of_verified(&v)]);
}

#[test]
fn the_window_admits_demand_at_once_and_the_rest_in_turn() {
    let mut r = rig(2);
    let objs: Vec<Verified> = (0..5).map(|n| object(n, 2000)).collect();
    for v in &objs {
        r.request(v, Priority::Prefetch);
    }
    assert!(
        r.claims().is_empty(),
        "more than the window: the beacon first"
    );
    let air = r.channel.air_address().group;
    assert!(
        r.membership().contains(&(air, true)),
        "the beacon is heard while some wait"
    );
    // An idle server sends no beacon: after a short wait the window fills in order.
    r.advance(Duration::from_millis(70));
    assert_eq!(r.claims().len(), 2, "the window holds two");
    let urgent = object(9, 2000);
    r.request(&urgent, Priority::Demand);
    assert_eq!(r.claims().len(), 1, "a demand read never waits for room");
    r.st.handle_claim(
        r.now,
        r.channel
            .object_address(&ObjectHash::of_verified(&objs[0]))
            .tag,
        Claim::Granted,
    );
    r.membership();
    r.deliver(&objs[0]);
    r.events();
    // One place is free again but the demand read still holds one: the window is full.
    assert!(r.claims().is_empty());
}

#[test]
fn a_receiver_asking_more_than_its_window_takes_what_is_on_air_first() {
    let mut r = rig(2);
    let objs: Vec<Verified> = (0..6).map(|n| object(n, 2000)).collect();
    for v in &objs {
        r.request(v, Priority::Prefetch);
    }
    assert!(r.claims().is_empty());
    // The server is sending objects 4 and 5 to others: its beacon says so.
    let on_air = r.tags(&objs[4..]);
    r.now += Duration::from_millis(20);
    r.beacon(&on_air);
    let claimed: Vec<Tag> = r.claims().into_iter().map(|(t, _)| t).collect();
    assert_eq!(claimed, on_air, "rides along with the rounds under way");
}

#[test]
fn a_full_window_still_joins_the_rounds_about_to_go_out() {
    let mut r = rig(2);
    let objs: Vec<Verified> = (0..6).map(|n| object(n, 2000)).collect();
    for v in &objs {
        r.request(v, Priority::Prefetch);
    }
    assert!(r.claims().is_empty(), "waits for the beacon");
    r.advance(Duration::from_millis(70));
    assert_eq!(
        r.claims().len(),
        2,
        "no beacon came: the window fills in order"
    );
    // The server's next rounds are objects 4 and 5, for another receiver.
    let on_air = r.tags(&objs[4..]);
    r.beacon(&on_air);
    let claimed: Vec<Tag> = r.claims().into_iter().map(|(t, _)| t).collect();
    assert_eq!(
        claimed, on_air,
        "joined beyond the window, to share those rounds"
    );
}

/// A receiver that measured loss in bursts joins four times as many groups ahead: it falls
/// behind the others, and must still be among an object's listeners when their round goes
/// out. Independent loss keeps the window.
#[test]
fn a_lossy_receiver_joins_further_ahead() {
    let queue = |r: &mut Rig| {
        for n in 0..12 {
            r.request(&object(n, 2000), Priority::Prefetch);
        }
        assert!(
            r.claims().is_empty(),
            "more than the window: the beacon first"
        );
        // No beacon comes: after its wait the window fills in order.
        r.advance(Duration::from_millis(70));
        r.claims().len()
    };
    let mut lossless = rig(2);
    assert_eq!(queue(&mut lossless), 2, "no loss measured: the window");
    // Eight objects fetched with a fifth of their symbols lost as `fetch` loses them.
    let lossy = |fetch: fn(&mut Rig, &Verified)| {
        let mut r = rig(2);
        for n in 0..8 {
            fetch(&mut r, &object(100 + n, 40 * SYMBOL));
            r.advance(FetchState::TICK);
        }
        assert!(r.st.loss().is_some_and(|l| l > 0.1));
        r
    };
    let mut bursty = lossy(Rig::fetch_in_bursts_lost);
    assert_eq!(queue(&mut bursty), 8, "four times the window");
    // As much loss, one symbol at a time: the window stays (receivers starting over
    // seconds cost the server dearly with four of them, see `LOSSY`).
    let mut independent = lossy(Rig::fetch_one_in_five_lost);
    assert_eq!(queue(&mut independent), 2, "independent loss: the window");
}

#[test]
fn a_fetch_claimed_elsewhere_waits_for_the_cache_then_joins_after_patience() {
    let mut r = rig(32);
    let (v, w) = (object(1, 4000), object(2, 4000));
    let tv = r.request(&v, Priority::Readahead);
    let tw = r.request(&w, Priority::Readahead);
    for (tag, _) in r.claims() {
        r.st.handle_claim(r.now, tag, Claim::Elsewhere);
    }
    assert!(
        r.membership().is_empty(),
        "another process fetches them: no join"
    );
    // The other process stores v: a probe finds it.
    r.now += Duration::from_millis(10);
    let probes = r.st.poll_probe(r.now);
    assert!(probes.iter().any(|(t, _)| *t == tv) && probes.iter().any(|(t, _)| *t == tw));
    assert!(r.st.handle_cached(r.now, tv, &v));
    assert!(r.membership().is_empty(), "never joined, nothing to leave");
    // w's claim is asked again every 100 ms; the holder never lets go.
    r.advance(Duration::from_millis(150));
    let asked = r.claims();
    assert_eq!(asked.iter().map(|(t, _)| *t).collect::<Vec<_>>(), [tw]);
    r.st.handle_claim(r.now, tw, Claim::Elsewhere);
    let waiting_since = r.now - Duration::from_millis(150);
    let mut joined = Vec::new();
    while joined.is_empty() {
        r.advance(Duration::from_millis(20));
        for (tag, _) in r.claims() {
            r.st.handle_claim(r.now, tag, Claim::Elsewhere);
        }
        joined = r.membership();
    }
    let waited = r.now.duration_since(waiting_since);
    assert_eq!(joined, [(r.group(&w), true)]);
    assert!(
        waited >= ELSEWHERE_PATIENCE && waited < ELSEWHERE_PATIENCE + Duration::from_millis(100),
        "joined anyway after {waited:?}"
    );
    r.deliver(&w);
    assert_eq!(completed(&r.events()), [ObjectHash::of_verified(&w)]);
}

#[test]
fn a_granted_claim_for_an_ended_fetch_goes_back() {
    let mut r = rig(32);
    let v = object(1, 4000);
    let tag = r.request(&v, Priority::Readahead);
    r.claims();
    // Found in the cache while its claim was being asked.
    r.now += Duration::from_millis(200);
    r.st.handle_claim(r.now, tag, Claim::Cached);
    assert!(r.st.handle_cached(r.now, tag, &v));
    assert!(
        r.st.handle_claim(r.now, tag, Claim::Granted),
        "give it back"
    );
}

#[test]
fn silence_rejoins_then_fails_and_doubt_fails_fast_as_stale() {
    let mut r = rig(32);
    let (v, w) = (object(1, 4000), object(2, 4000));
    r.request(&v, Priority::Demand);
    r.grant_all();
    r.membership();
    let group = r.group(&v);
    r.advance(Duration::from_millis(450));
    assert_eq!(
        r.membership(),
        [(group, false), (group, true)],
        "a stall rejoins"
    );
    let (timeout, joined_at) = (r.st.config().timeout, r.now - Duration::from_millis(450));
    let mut failed = Vec::new();
    while failed.is_empty() {
        r.advance(Duration::from_millis(500));
        failed = r.events();
    }
    assert!(matches!(failed[..], [Event::Failed { stale: false, .. }]));
    let took = r.now.duration_since(joined_at);
    assert!(
        took >= timeout && took <= timeout + Duration::from_secs(1),
        "{took:?}"
    );
    // In doubt after a new generation, nothing comes: stale within stale_after.
    let start = r.now;
    r.request(&w, Priority::Demand);
    r.grant_all();
    r.st.handle_new_generation(r.now);
    let mut events = Vec::new();
    while events.is_empty() {
        r.advance(Duration::from_millis(20));
        events = r.events();
    }
    assert!(matches!(events[..], [Event::Failed { stale: true, .. }]));
    assert!(r.now.duration_since(start) < r.st.config().stale_after + Duration::from_millis(100));
}

#[test]
fn the_root_group_is_joined_while_watched_and_rejoined_while_silent() {
    let mut r = rig(32);
    let root = r.channel.root_address();
    r.st.set_watching(r.now, true);
    assert_eq!(r.membership(), [(root.group, true)]);
    r.advance(ROOT_WATCH_REJOIN);
    assert_eq!(r.membership(), [(root.group, false), (root.group, true)]);
    r.st.set_watching(r.now, false);
    assert_eq!(r.membership(), [(root.group, false)]);
}

#[test]
fn a_foreign_root_record_is_dropped() {
    let mut r = rig(32);
    let root = r.channel.root_address();
    r.st.set_watching(r.now, true);
    let mut pkt = Vec::new();
    packet::encode_root(&mut pkt, root.tag, b"not a record", None);
    let env = Envelope {
        from: SERVER,
        to: Some(root.group),
        ifindex: IFINDEX,
    };
    r.st.handle_datagram(r.now, env, &mut pkt);
    assert!(r.events().is_empty());
    assert_eq!(
        r.stats.malformed.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

/// A root record heard again within `ROOT_REPEAT` of being handed on only says its server is
/// there; a new record, another sender's, a new watcher or the second's end hand it on again.
#[test]
fn a_repeated_root_record_is_handed_on_once_a_second() {
    use super::state::ROOT_REPEAT;
    let mut r = rig(32);
    let root = r.channel.root_address();
    r.st.set_watching(r.now, true);
    let record = |generation| crate::wire::object::RootRecord {
        channel_id: *r.channel.id(),
        generation,
        publish_time_ns: 0,
        root: want(&object(0, 100)),
        block_size: crate::wire::object::BlockSize::DEFAULT,
        single_file: false,
        signature: None,
    };
    let (one, two) = (record(1), record(2));
    let other = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 2);
    let hear = |r: &mut Rig, rec: &crate::wire::object::RootRecord, from: Ipv6Addr| {
        let mut pkt = Vec::new();
        packet::encode_root(&mut pkt, root.tag, &rec.encode(), None);
        let env = Envelope {
            from,
            to: Some(root.group),
            ifindex: IFINDEX,
        };
        r.st.handle_datagram(r.now, env, &mut pkt);
        match r.events().as_slice() {
            [Event::Root(h)] => {
                assert_eq!((&h.record, h.from), (rec, from));
                true
            }
            [Event::RootRepeated] => false,
            e => panic!("{e:?}"),
        }
    };
    let tick = Duration::from_millis(25);
    assert!(hear(&mut r, &one, SERVER), "the first is handed on");
    for _ in 0..3 {
        r.now += tick;
        assert!(!hear(&mut r, &one, SERVER), "repeats are not");
    }
    assert!(hear(&mut r, &one, other), "another sender's is");
    assert!(!hear(&mut r, &one, other));
    r.now += tick;
    assert!(hear(&mut r, &two, SERVER), "a new record is, at once");
    assert!(!hear(&mut r, &two, SERVER));
    r.st.set_watching(r.now, true);
    assert!(hear(&mut r, &two, SERVER), "a new watcher gets the next");
    r.now += ROOT_REPEAT - tick;
    assert!(!hear(&mut r, &two, SERVER));
    r.now += tick;
    assert!(hear(&mut r, &two, SERVER), "and so does the next second");
    assert!(
        hear(&mut r, &one, SERVER),
        "a record that changes back is new"
    );
    r.st.forget_root(SERVER);
    assert!(
        hear(&mut r, &one, SERVER),
        "a copy a watcher missed goes again"
    );
    assert!(hear(&mut r, &one, other), "a second after its last");
    assert!(
        !hear(&mut r, &one, SERVER),
        "one sender's copies leave another's be"
    );
    // Repeats say the server is there: the root group is not rejoined while they come.
    r.all_membership();
    for _ in 0..(2 * ROOT_WATCH_REJOIN.as_millis() / tick.as_millis()) {
        r.now += tick;
        hear(&mut r, &one, SERVER);
        r.st.handle_timeout(r.now);
        assert!(r.membership().is_empty());
    }
}

proptest! {
    #[test]
    fn garbage_datagrams_never_panic_or_complete(
        dgrams in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..1600), 1..40),
    ) {
        let mut r = rig(32);
        let v = object(1, 3000);
        r.request(&v, Priority::Demand);
        r.grant_all();
        let group = r.group(&v);
        for mut d in dgrams {
            let env = Envelope { from: SERVER, to: Some(group), ifindex: IFINDEX };
            r.st.handle_datagram(r.now, env, &mut d);
        }
        prop_assert!(completed(&r.events()).is_empty());
        prop_assert_eq!(r.st.pending(), 1);
    }
}

#[test]
fn forged_symbols_are_thrown_away_and_the_real_ones_still_decode() {
    let mut r = rig(32);
    let v = object(1, 6000);
    r.request(&v, Priority::Demand);
    r.grant_all();
    let group = r.group(&v);
    let tag = r.channel.object_address(&ObjectHash::of_verified(&v)).tag;
    // A forger on the link sends symbols with the object's real tag and group but bytes of
    // its own: enough of them to decode, into something that does not verify.
    let forger = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0x666);
    r.send_symbols(forger, tag, &object(2, 6000), Some(group), IFINDEX);
    assert!(
        completed(&r.events()).is_empty(),
        "a forgery never completes a fetch"
    );
    let forged = r
        .stats
        .forged_decodes
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(forged, 1, "the forged decode was made and thrown away");
    r.deliver(&v);
    assert_eq!(
        completed(&r.events()),
        [ObjectHash::of_verified(&v)],
        "the server's symbols still decode"
    );
}

fn bundle_of(files: &[Verified]) -> (Bundle, Vec<u8>) {
    let bundle = Bundle::new(files.iter().map(want).collect());
    let bytes = files
        .iter()
        .flat_map(|f| f.bytes().iter().copied())
        .collect();
    (bundle, bytes)
}

#[test]
fn small_files_are_fetched_through_their_bundle() {
    let mut r = rig(32);
    let files: Vec<Verified> = (0..4).map(|n| object(n, 3000 + n as usize)).collect();
    let (bundle, bytes) = bundle_of(&files);
    r.st.handle_bundles(Bundling {
        bundles: vec![bundle.clone()],
        alone: Vec::new(),
    });
    let tags = [
        r.request(&files[0], Priority::Readahead),
        r.request(&files[2], Priority::Demand),
    ];
    assert_eq!(
        tags[0],
        r.channel
            .object_address(&ObjectHash::of_verified(&files[0]))
            .tag
    );
    let claims = r.claims();
    assert_eq!(claims.len(), 1, "one fetch, of the bundle: {claims:?}");
    assert_eq!(claims[0].1, bundle.id.hash);
    assert!(!r.st.handle_claim(r.now, claims[0].0, Claim::Granted));
    let at = r.channel.object_address(&bundle.id.hash);
    assert_eq!(
        r.membership(),
        [(at.group, true)],
        "only the bundle's group"
    );
    // A hostile bundle: right length, one member's byte flipped. Nothing completes.
    let mut forged = bytes.clone();
    forged[7000] ^= 0x40;
    r.send_bytes(at.tag, at.group, &forged);
    assert!(completed(&r.events()).is_empty());
    assert_eq!(r.stats.forged_decodes.load(Ordering::Relaxed), 1);
    r.send_bytes(at.tag, at.group, &bytes);
    let events = r.events();
    let want_all: Vec<ObjectHash> = files.iter().map(ObjectHash::of_verified).collect();
    assert_eq!(
        completed(&events),
        want_all,
        "every member, asked for or not"
    );
    let completed_tags: Vec<Tag> = events
        .iter()
        .filter_map(|e| match e {
            Event::Completed { tag, .. } => Some(*tag),
            _ => None,
        })
        .collect();
    assert!(tags.iter().all(|t| completed_tags.contains(t)));
    assert!(
        events
            .iter()
            .all(|e| !matches!(e, Event::Completed { member: false, .. })),
        "every object is marked as a bundle's member, which a copy need not cache"
    );
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::Release { hash } if *hash == bundle.id.hash)));
    assert_eq!(r.membership(), [(at.group, false)]);
    assert_eq!(r.st.pending(), 0);
    let later =
        r.st.handle_request(r.now, want(&files[3]), Priority::Demand, Freshness::Current);
    assert!(matches!(later, Requested::Recent(o) if o == files[3]));
}

#[test]
fn a_bundle_fetched_elsewhere_ends_when_its_riders_are_cached() {
    let mut r = rig(32);
    let (files, bundle) = r.learn_bundle(3);
    let a = r.request(&files[0], Priority::Demand);
    let b = r.request(&files[1], Priority::Demand);
    let (tag, _) = r.claims()[0];
    r.st.handle_claim(r.now, tag, Claim::Elsewhere);
    r.advance(Duration::from_millis(10));
    let mut probes = r.st.poll_probe(r.now);
    probes.sort_by_key(|p| p.0);
    let mut want_probes = vec![
        (a, ObjectHash::of_verified(&files[0])),
        (b, ObjectHash::of_verified(&files[1])),
    ];
    want_probes.sort_by_key(|p| p.0);
    assert_eq!(probes, want_probes, "the members asked for, not the bundle");
    assert!(r.st.handle_cached(r.now, a, &files[0]));
    assert_eq!(r.st.pending(), 1);
    assert!(r.st.handle_cached(r.now, b, &files[1]));
    assert_eq!(r.st.pending(), 0);
    assert!(r
        .events()
        .iter()
        .any(|e| matches!(e, Event::Release { hash } if *hash == bundle.id.hash)));
}

#[test]
fn a_failed_bundle_fails_each_member_asked_for() {
    let mut r = rig(32);
    let files: Vec<Verified> = (0..3).map(|n| object(n, 2000)).collect();
    let (bundle, bytes) = bundle_of(&files);
    r.st.handle_bundles(Bundling {
        bundles: vec![bundle.clone()],
        alone: Vec::new(),
    });
    let a = r.request(&files[0], Priority::Demand);
    let b = r.request(&files[2], Priority::Readahead);
    r.grant_all();
    // One symbol: the server has the bundle, and then goes silent.
    let at = r.channel.object_address(&bundle.id.hash);
    r.send_bytes_symbols(at.tag, at.group, &bytes, 1);
    let timeout = r.st.config().timeout;
    for _ in 0..(timeout.as_millis() / 20 + 2) {
        r.advance(FetchState::TICK);
    }
    let mut failed: Vec<Tag> = r
        .events()
        .iter()
        .filter_map(|e| match e {
            Event::Failed { tag, .. } => Some(*tag),
            _ => None,
        })
        .collect();
    failed.sort();
    let mut want_failed = vec![a, b];
    want_failed.sort();
    assert_eq!(failed, want_failed);
    assert_eq!(r.st.pending(), 0);
}

#[test]
fn a_bundle_gone_stale_falls_back_to_its_members_own_groups() {
    let mut r = rig(32);
    let (files, _) = r.learn_bundle(3);
    let a = r.request(&files[1], Priority::Demand);
    r.grant_all();
    r.membership();
    // A new generation: the bundle may be gone (its directory changed), and it is.
    r.st.handle_new_generation(r.now);
    let stale_after = r.st.config().stale_after;
    let mut claims = Vec::new();
    for _ in 0..(stale_after.as_millis() / 20 + 3) {
        r.advance(FetchState::TICK);
        claims.extend(r.claims());
    }
    let failed = r.events().iter().any(|e| matches!(e, Event::Failed { .. }));
    assert!(!failed, "the member is still wanted");
    assert_eq!(
        claims,
        [(a, ObjectHash::of_verified(&files[1]))],
        "fetched on its own now"
    );
    r.own_fetch_completes(a, &files[1], 0);
}

/// regression (tools/soak): a read rode a bundle the server did not publish (the mapping
/// came from another generation's listing) and waited out the whole timeout, then failed,
/// though its file was current. A bundle silent from the start is given up after
/// `BUNDLE_PATIENCE`, and its riders are fetched on their own groups, as current objects.
#[test]
fn regression_a_bundle_never_sent_falls_back_to_its_members_own_groups() {
    let mut r = rig(32);
    let (files, bundle) = r.learn_bundle(3);
    let a = r.request(&files[1], Priority::Demand);
    r.grant_all();
    let at = r.channel.object_address(&bundle.id.hash);
    assert_eq!(r.membership(), [(at.group, true)]);
    let patience = crate::fetch::object::BUNDLE_PATIENCE;
    let mut claims = Vec::new();
    let started = r.now;
    while claims.is_empty() {
        r.advance(FetchState::TICK);
        claims.extend(r.claims());
        assert!(
            r.now.duration_since(started) < patience + Duration::from_secs(1),
            "the rider was not fetched on its own within the bundle's patience"
        );
    }
    assert!(r.now.duration_since(started) >= patience);
    assert_eq!(
        claims,
        [(a, ObjectHash::of_verified(&files[1]))],
        "fetched on its own now"
    );
    assert!(!r.events().iter().any(|e| matches!(e, Event::Failed { .. })));
    // Current: not failed as stale while the server takes its time.
    r.own_fetch_completes(a, &files[1], 100);
}

/// regression (tools/soak): a small file left out of its directory's bundles by a new
/// listing (a sibling grew, and the packing changed) must not keep riding the bundle an
/// older listing put it in, which the server no longer publishes.
#[test]
fn regression_a_file_a_new_listing_leaves_unbundled_is_fetched_on_its_own() {
    let mut r = rig(32);
    let (files, _) = r.learn_bundle(3);
    r.st.handle_bundles(Bundling {
        bundles: Vec::new(),
        alone: vec![ObjectHash::of_verified(&files[1])],
    });
    let a = r.request(&files[1], Priority::Demand);
    assert_eq!(
        r.claims(),
        [(a, ObjectHash::of_verified(&files[1]))],
        "its own object, no bundle"
    );
}

/// The engine routes a batch under its lock, decodes outside it and hands back what the
/// symbols did. A fetch that ended in between (here: failed by its timeout) still completes
/// the object its symbols verified, once, for the cache; later symbols of the same batch
/// are no news.
#[test]
fn a_fetch_that_ends_while_its_symbols_decode_still_completes_once() {
    let mut r = rig(4);
    let v = object(1, 3 * SYMBOL);
    let tag = r.request(&v, Priority::Readahead);
    r.grant_all();
    let group = r.group(&v);
    assert!(r.membership().contains(&(group, true)));
    let enc = ObjectEncoder::new(&v, SYMBOL).unwrap();
    let mut pkts: Vec<Vec<u8>> = (0..enc.source_symbols() + 2)
        .map(|esi| {
            let (mut sym, mut pkt) = (Vec::new(), Vec::new());
            enc.symbol(Esi(esi), &mut sym);
            packet::encode_symbol(&mut pkt, tag, Esi(esi), &sym, None);
            pkt
        })
        .collect();
    let env = Envelope {
        from: SERVER,
        to: Some(group),
        ifindex: IFINDEX,
    };
    let opener = r.st.opener();
    let now = r.now;
    let feeds: Vec<_> = pkts
        .iter_mut()
        .filter_map(|p| opener.open(&env, p))
        .filter_map(|p| r.st.handle_packet(now, env, p))
        .collect();
    assert_eq!(feeds.len(), 5, "every symbol routed to the pending fetch");
    // Another thread's timers fail the fetch before the decodes come back.
    r.advance(FetchConfig::default().timeout + Duration::from_secs(1));
    assert!(matches!(r.events()[..], [Event::Failed { .. }]));
    for fed in feeds.into_iter().map(Feed::run).collect::<Vec<_>>() {
        r.st.handle_fed(r.now, fed);
    }
    let completed: Vec<_> = r
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Completed { tag: t, object, .. } => Some((t, object)),
            _ => None,
        })
        .collect();
    assert_eq!(
        completed.len(),
        1,
        "one completion, not one per extra symbol"
    );
    assert_eq!(completed[0].0, tag);
    assert_eq!(&completed[0].1[..], &v[..]);
}

/// A receiver that loses one symbol in five measures it from the gaps between the ESIs it
/// gets, joins the group of that loss level while it fetches, moves to another level's
/// group only by leaving the first, and leaves when it has fetched nothing for a while.
#[test]
fn a_receiver_reports_its_loss_by_joining_one_level_group_while_it_fetches() {
    use crate::fetch::loss::IDLE;
    use crate::wire::channel::LOSS_LEVELS;
    let mut r = rig(32);
    let levels = r.loss_groups();
    let mut joined: Option<usize> = None;
    let follow = |changes: Vec<(Ipv6Addr, bool)>, joined: &mut Option<usize>| {
        for (group, join) in changes {
            let Some(level) = levels.iter().position(|g| *g == group) else {
                continue;
            };
            match join {
                true => {
                    assert_eq!(*joined, None, "one level at a time");
                    *joined = Some(level);
                }
                false => {
                    assert_eq!(*joined, Some(level));
                    *joined = None;
                }
            }
        }
    };
    for n in 0..8 {
        r.fetch_one_in_five_lost(&object(n, 40 * SYMBOL));
        let changes = r.membership();
        follow(changes, &mut joined);
        r.advance(FetchState::TICK);
    }
    let loss = r.st.loss().expect("measured");
    assert!((loss - 0.2).abs() < 0.03, "{loss}");
    let level = joined.expect("reported");
    assert!(
        (200..=240).contains(&LOSS_LEVELS[level]),
        "{}",
        LOSS_LEVELS[level]
    );
    // Nothing fetched for IDLE: the report is withdrawn.
    r.advance(IDLE);
    let changes = r.membership();
    follow(changes, &mut joined);
    assert_eq!(joined, None);
}

/// A receiver says whether it fetches in bulk and whether a reader waits (see
/// `super::intent`): bulk requests join the bulk report's group, a demand read the hurry
/// report's, also when it asks for what readahead already fetches; each is left once
/// nothing of its kind was pending for its linger.
#[test]
fn a_receiver_reports_bulk_fetches_and_waiting_readers() {
    use super::intent::{BULK_LINGER, HURRY_LINGER};
    let mut r = rig(32);
    let (bulk, hurry) = (r.report_group(Report::Bulk), r.report_group(Report::Hurry));
    let ahead = object(1, 5000);
    r.request(&ahead, Priority::Readahead);
    r.grant_all();
    let joined = r.all_membership();
    assert!(joined.contains(&(bulk, true)), "{joined:?}");
    assert!(!joined.iter().any(|(g, _)| *g == hurry), "nobody waits yet");
    // A reader now waits for the block readahead asked for.
    r.request(&ahead, Priority::Demand);
    r.grant_all();
    assert_eq!(r.all_membership(), [(hurry, true)]);
    r.deliver(&ahead);
    assert_eq!(completed(&r.events()), [ObjectHash::of_verified(&ahead)]);
    let group = r.group(&ahead);
    assert_eq!(r.all_membership(), [(group, false)], "the reports linger");
    r.advance(BULK_LINGER);
    assert_eq!(r.all_membership(), [(bulk, false)]);
    r.advance(HURRY_LINGER - BULK_LINGER + FetchState::TICK);
    assert_eq!(r.all_membership(), [(hurry, false)]);
    r.advance(HURRY_LINGER * 4);
    assert!(r.all_membership().is_empty(), "and stay left");
}

/// A receiver that will fetch in bulk (`copy`, `prefetch`) joins the bulk report's group
/// with the root group, before it can ask for anything; one that will not (a mount) does
/// not, and neither holds it for long without a request.
#[test]
fn a_bulk_receiver_says_so_from_its_start() {
    use super::intent::BULK_EXPECTED;
    for bulk in [true, false] {
        let mut r = rig(32);
        let mut config = r.st.config().clone();
        config.bulk = bulk;
        r.st = FetchState::new(
            r.now,
            r.channel.clone(),
            IFINDEX,
            config,
            r.stats.clone(),
            Memberships::new(Duration::ZERO),
        );
        let (root, report) = (r.channel.root_address().group, r.report_group(Report::Bulk));
        r.st.set_watching(r.now, true);
        let joined = r.all_membership();
        assert!(joined.contains(&(root, true)), "{joined:?}");
        assert_eq!(joined.contains(&(report, true)), bulk, "{joined:?}");
        r.advance(BULK_EXPECTED);
        let left = r.all_membership();
        assert_eq!(left.contains(&(report, false)), bulk, "{left:?}");
    }
}

/// A receiver with nothing pending wakes for its own timers only, each at its time: the ends
/// of the intent reports' lingers, the root group's rejoin while the server is silent, and a
/// tick a second (`FetchState::IDLE_TICK`), not fifty.
#[test]
fn an_idle_receiver_wakes_only_for_its_timers_each_at_its_time() {
    use super::intent::{BULK_LINGER, HURRY_LINGER};
    let mut r = rig(32);
    let (bulk, hurry) = (r.report_group(Report::Bulk), r.report_group(Report::Hurry));
    let root = r.channel.root_address().group;
    let t0 = r.now;
    r.st.set_watching(r.now, true);
    let v = object(1, 5000);
    r.request(&v, Priority::Readahead);
    r.grant_all();
    r.request(&v, Priority::Demand);
    r.grant_all();
    let joined = r.all_membership();
    assert!(joined.contains(&(bulk, true)), "{joined:?}");
    assert!(joined.contains(&(hurry, true)), "{joined:?}");
    r.deliver(&v);
    assert_eq!(completed(&r.events()), [ObjectHash::of_verified(&v)]);
    // The lingers run from the last time a request was pending: now.
    let done = r.now;
    r.all_membership();
    let wakes = r.run_on_timers(t0 + Duration::from_secs(10));
    assert_eq!(changed_at(&wakes, bulk, false), [done + BULK_LINGER]);
    assert_eq!(changed_at(&wakes, hurry, false), [done + HURRY_LINGER]);
    let rejoins: Vec<Instant> = (1..=10).map(|s| t0 + ROOT_WATCH_REJOIN * s).collect();
    assert_eq!(changed_at(&wakes, root, true), rejoins);
    // Two lingers, ten rejoins and at most a tick a second besides.
    assert!(wakes.len() <= 2 + 10 + 10, "{} wakes in 10 s", wakes.len());
}

/// The loss report of a receiver that stopped fetching is withdrawn when its idle time is
/// up, not at the next idle tick.
#[test]
fn a_loss_report_is_withdrawn_on_time_by_a_receiver_woken_only_by_its_timers() {
    use crate::fetch::loss::IDLE;
    let mut r = rig(32);
    let levels = r.loss_groups();
    for n in 0..8 {
        // Off the second's grid, so that no idle tick lands on the report's end by chance.
        r.now += Duration::from_millis(37);
        r.fetch_one_in_five_lost(&object(n, 40 * SYMBOL));
    }
    let reported = r.all_membership();
    let level = *levels
        .iter()
        .find(|g| reported.contains(&(**g, true)))
        .expect("a level reported");
    // The last fetch ended now: the receiver was busy until then.
    let last = r.now;
    let wakes = r.run_on_timers(last + IDLE + Duration::from_secs(3));
    assert_eq!(changed_at(&wakes, level, false), [last + IDLE]);
}
