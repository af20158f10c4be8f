//! The network lab itself (tools/netlab, tests/common/lab.rs): multicast
//! crosses the bridge, per-client loss works (per datagram), MLD snooping behaves as lcfs
//! expects, and `netlab down` leaves nothing behind. Needs root.

mod common;

use common::lab::{lab_namespaces, netlab, Lab, LabOptions};
use std::io::{BufRead, BufReader, Read};
use std::process::Child;

const GROUP: &str = "ff1e::1:2";
const PORT: &str = "4242";

/// Joins GROUP on lc0, bound to PORT; prints READY, then receives until it has
/// `expect` datagrams or `secs` passed, then prints "GOT <n> <source> <whole> <part>": with
/// argv[5] (`per`), how many of the sender's GSO runs of `per` datagrams arrived whole and
/// how many in part.
const RECEIVER: &str = r#"
import socket, struct, sys, time, collections
group, port, expect, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
per = int(sys.argv[5]) if len(sys.argv) > 5 else 0
runs = collections.Counter()
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:  # room for whole runs while the receiver waits for a core (SO_RCVBUFFORCE, as root)
    s.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)
except OSError:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind(("::", port))
idx = socket.if_nametoindex("lc0")
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP,
             socket.inet_pton(socket.AF_INET6, group) + struct.pack("@I", idx))
print("READY", flush=True)
end = time.time() + secs
n, src = 0, "-"
while n < expect:
    left = end - time.time()
    if left <= 0:
        break
    s.settimeout(left)
    try:
        data, addr = s.recvfrom(65535)
    except socket.timeout:
        break
    if data.startswith(b"lcfs-lab "):
        n, src = n + 1, addr[0]
        f = data.split(b" ")
        if per and len(f) > 2:
            runs[int(f[1])] += 1
whole = sum(1 for c in runs.values() if c == per)
print("GOT", n, src, whole, len(runs) - whole, flush=True)
"#;

/// Sends `count` datagrams to GROUP:PORT out of lc0, `gap` seconds apart; with argv[5]
/// (`per`), `count` UDP GSO runs (`UDP_SEGMENT`) of `per` datagrams each, as `lcfs serve`
/// sends its rounds, datagram `i` of run `r` starting "lcfs-lab r i ".
const SENDER: &str = r#"
import socket, sys, time
group, port, count, gap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
per = int(sys.argv[5]) if len(sys.argv) > 5 else 0
SEG = 1000
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, socket.if_nametoindex("lc0"))
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 8)
if per:
    s.setsockopt(socket.IPPROTO_UDP, 103, SEG)  # UDP_SEGMENT
for i in range(count):
    if per:
        run = b"".join((b"lcfs-lab %d %d " % (i, j)).ljust(SEG, b".") for j in range(per))
        s.sendto(run, (group, port))
    else:
        s.sendto(b"lcfs-lab %d" % i, (group, port))
    time.sleep(gap)
"#;

/// Sends one MLDv2 general query to ff02::1 on lc0, as the lcfs server (the
/// lab's querier) will: hop limit 1, router alert, link-local source.
/// argv[1]: Maximum Response Delay in ms.
const QUERIER: &str = r#"
import socket, struct, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
idx = socket.if_nametoindex("lc0")
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, idx)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 1)
s.setsockopt(socket.IPPROTO_IPV6, 54, bytes([0, 0, 5, 2, 0, 0, 1, 0]))  # IPV6_HOPOPTS: router alert
# type 130, code, checksum (kernel), max response ms, reserved, address ::, QRV 2, QQIC 125, 0 sources
s.sendto(struct.pack("!BBHHH16sBBH", 130, 0, 0, int(sys.argv[1]), 0, bytes(16), 2, 125, 0), ("ff02::1", 0, 0, idx))
"#;

struct Receiver {
    node: String,
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

/// Starts a receiver in `node` and waits until it has joined the group.
fn receiver(lab: &Lab, node: &str, group: &str, expect: usize, secs: f64) -> Receiver {
    receiver_with(lab, node, group, expect, secs, &[])
}

/// As [`receiver`], with RECEIVER's optional arguments.
fn receiver_with(
    lab: &Lab,
    node: &str,
    group: &str,
    expect: usize,
    secs: f64,
    more: &[&str],
) -> Receiver {
    let (expect, secs) = (expect.to_string(), secs.to_string());
    let mut args = vec!["python3", "-c", RECEIVER, group, PORT, &expect, &secs];
    args.extend_from_slice(more);
    let mut child = lab.spawn(node, &args);
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "READY", "receiver in {node} did not start");
    Receiver {
        node: node.to_string(),
        child,
        out,
    }
}

impl Receiver {
    /// Waits for the receiver to finish; returns how many datagrams it got and the source.
    fn finish(self) -> (usize, String) {
        let (n, source, _) = self.finish_runs();
        (n, source)
    }

    /// As [`Receiver::finish`], and how many GSO runs arrived [whole, in part].
    fn finish_runs(mut self) -> (usize, String, [usize; 2]) {
        let mut rest = String::new();
        self.out.read_to_string(&mut rest).unwrap();
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "receiver in {} failed ({status}): {rest}",
            self.node
        );
        let f: Vec<&str> = rest.split_whitespace().collect();
        assert!(
            f.len() == 5 && f[0] == "GOT",
            "receiver in {} said {rest:?}",
            self.node
        );
        (
            f[1].parse().unwrap(),
            f[2].to_string(),
            [f[3].parse().unwrap(), f[4].parse().unwrap()],
        )
    }
}

fn send(lab: &Lab, group: &str, count: usize, gap: f64) {
    send_with(lab, group, count, gap, &[]);
}

/// As [`send`], with SENDER's optional arguments.
fn send_with(lab: &Lab, group: &str, count: usize, gap: f64, more: &[&str]) {
    let (count, gap) = (count.to_string(), gap.to_string());
    let mut args = vec!["python3", "-c", SENDER, group, PORT, &count, &gap];
    args.extend_from_slice(more);
    lab.run("srv", &args);
}

#[test]
fn multicast_reaches_joined_clients_and_loss_is_per_client() {
    let lab = Lab::up(LabOptions {
        clients: 3,
        snooping: true,
        ..Default::default()
    });
    lab.shape("c2", &["--loss", "100"]);

    const N: usize = 20;
    let r1 = receiver(&lab, "c1", GROUP, N, 4.0);
    let r2 = receiver(&lab, "c2", GROUP, N, 2.0);
    let r3 = receiver(&lab, "c3", GROUP, N, 4.0);
    send(&lab, GROUP, N, 0.005);

    let (n1, src1) = r1.finish();
    let (n2, _) = r2.finish();
    let (n3, _) = r3.finish();
    // only link-local + ULA addresses: the ULA is the source of ff1e:: traffic
    assert_eq!(n1, N, "c1 joined {GROUP} and should get every datagram");
    assert_eq!(
        src1,
        lab.addr("srv").to_string(),
        "source address of the server's datagrams"
    );
    assert_eq!(
        n3, N,
        "c3 has no loss configured and should get every datagram"
    );
    assert_eq!(n2, 0, "c2 has 100% loss on its port and should get nothing");

    // loss is removable again
    lab.shape("c2", &[]);
    let r2 = receiver(&lab, "c2", GROUP, 5, 4.0);
    send(&lab, GROUP, 5, 0.005);
    assert_eq!(r2.finish().0, 5, "c2 after clearing its loss");
}

/// Loss acts on datagrams, also when they leave the server as GSO runs (as `lcfs serve`
/// sends its rounds): veths and the bridge pass a run on whole, and a client port's netem
/// dropped whole runs, so "5% loss" was 5% of runs, in bursts of up to 64 (tools/netlab,
/// `datagrams_on_the_wire`).
#[test]
fn loss_drops_datagrams_not_whole_gso_runs() {
    let lab = Lab::up(LabOptions {
        clients: 1,
        snooping: true,
        ..Default::default()
    });
    lab.shape("c1", &["--loss", "50"]);
    const RUNS: usize = 20;
    const PER: usize = 40;
    let per = PER.to_string();
    let r = receiver_with(&lab, "c1", GROUP, RUNS * PER, 3.0, &[&per]);
    send_with(&lab, GROUP, RUNS, 0.005, &[&per]);
    let (got, _, [whole, partial]) = r.finish_runs();
    assert!(
        got > 0 && got < RUNS * PER,
        "50% loss let {got} of {} datagrams through",
        RUNS * PER
    );
    assert!(
        partial > 0 && whole + partial == RUNS,
        "of {RUNS} runs {whole} arrived whole, {partial} in part, the rest not at all: loss \
         dropped GSO runs, not datagrams"
    );
}

#[test]
fn snooping_floods_until_a_querier_appears_then_prunes() {
    let lab = Lab::up(LabOptions {
        clients: 2,
        snooping: true,
        ..Default::default()
    });
    const N: usize = 30;
    // c1 joins GROUP; c2 joins nothing of ours.
    let r1 = receiver(&lab, "c1", GROUP, 2 * N, 8.0);

    // no querier yet (the bridge's own is off): unregistered and registered
    // multicast is flooded to every port
    let before = lab.port_tx("c2").0;
    send(&lab, GROUP, N, 0.002);
    let flooded = lab.port_tx("c2").0 - before;
    assert!(
        flooded >= N as u64,
        "without a querier c2's port should see the flood: {flooded} packets"
    );

    // The server sends one general query. The bridge counts the querier as
    // present only once the query's Maximum Response Delay has passed (it
    // keeps flooding until then, so hosts can report); from then on it
    // forwards GROUP only to members (c1) and router ports (srv).
    lab.run("srv", &["python3", "-c", QUERIER, "500"]);
    std::thread::sleep(std::time::Duration::from_millis(800));
    let before = lab.port_tx("c2").0;
    send(&lab, GROUP, N, 0.002);
    let leaked = lab.port_tx("c2").0 - before;
    assert!(
        leaked < 5,
        "with a querier c2 (not a member) should not get GROUP: {leaked} packets"
    );

    assert_eq!(
        r1.finish().0,
        2 * N,
        "c1 (member) gets everything, before and after the query"
    );
}

#[test]
fn snooping_off_always_floods() {
    let lab = Lab::up(LabOptions {
        clients: 2,
        snooping: false,
        ..Default::default()
    });
    lab.run("srv", &["python3", "-c", QUERIER, "100"]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let before = lab.port_tx("c2").0;
    send(&lab, GROUP, 10, 0.002);
    let got = lab.port_tx("c2").0 - before;
    assert!(
        got >= 10,
        "snooping off: c2's port should see every packet, saw {got}"
    );
}

#[test]
fn netlab_down_leaves_nothing_behind() {
    let lab = Lab::up(LabOptions {
        clients: 2,
        ..Default::default()
    });
    let prefix = lab.prefix().to_string();
    assert_eq!(lab_namespaces(&prefix).len(), 4, "br, srv, c1, c2");
    let ll = lab.run(
        "c2",
        &[
            "ip",
            "-6",
            "-o",
            "addr",
            "show",
            "dev",
            Lab::IFACE,
            "scope",
            "link",
        ],
    );
    let ll = String::from_utf8_lossy(&ll.stdout);
    assert!(
        ll.contains("fe80:") && !ll.contains("tentative"),
        "link-local must be usable at once: {ll}"
    );
    // a stray process in a namespace (not spawned through the Lab) is killed too
    lab.run(
        "c1",
        &["sh", "-c", "setsid sleep 300 </dev/null >/dev/null 2>&1 &"],
    );
    let mut sleeper = lab.spawn("srv", &["sleep", "300"]);

    drop(lab);
    let status = sleeper.wait().unwrap();
    assert!(
        !status.success(),
        "the spawned sleep should have been killed: {status}"
    );
    assert!(
        lab_namespaces(&prefix).is_empty(),
        "left behind: {:?}",
        lab_namespaces(&prefix)
    );
    let again = netlab(&["down", &prefix]);
    assert!(again.status.success(), "netlab down must be idempotent");
    let help = netlab(&["--help"]);
    assert!(
        help.status.success() && String::from_utf8_lossy(&help.stdout).contains("netlab up PREFIX")
    );
}
