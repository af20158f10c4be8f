//! What the kernel says about a received MLD message besides its bytes, and the checks RFC
//! 3810 section 5 asks of every MLD message before it is believed.
//!
//! RFC 3810 section 5: MLDv2 messages are sent with a link-local source address, an IPv6 hop
//! limit of 1 and a Router Alert option in a hop-by-hop header; a message that fails one of
//! these checks is dropped (6.2 for queries, 7.4 for reports; RFC 2710 says the same for
//! MLDv1). A hop limit of 1 and a link-local source keep off-link senders out: a router never
//! forwards either. (A hop limit of 255, as Neighbor Discovery requires, is not MLD's rule.)
//! Reports may also come from `::`, sent during duplicate address detection (RFC 3810 5.2.13).
//!
//! The raw socket is asked for the hop limit (`IPV6_RECVHOPLIMIT`) and the hop-by-hop header
//! (`IPV6_RECVHOPOPTS`) of each message; [`parse_control`] reads them from the control
//! messages with checked reads only. A check whose socket option the kernel refused is not
//! made (and said so once at debug level): the other checks and the parser still hold.

use std::net::Ipv6Addr;

/// Router Alert option type (RFC 2711).
const OPT_ROUTER_ALERT: u8 = 5;
/// Router Alert value: "the datagram contains a Multicast Listener Discovery message".
const ROUTER_ALERT_MLD: u16 = 0;
/// Pad1 is the one option without a length byte (RFC 8200 4.2).
const OPT_PAD1: u8 = 0;

/// The kernel's facts about one received message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Envelope {
    /// IPv6 source address.
    pub from: Option<Ipv6Addr>,
    /// IPv6 hop limit, when the kernel reported it.
    pub hop_limit: Option<u8>,
    /// True when a hop-by-hop header held a Router Alert option for MLD.
    pub router_alert: bool,
}

/// Which checks can be made: those whose socket option the kernel accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checks {
    /// The hop limit is reported with each message.
    pub hop_limit: bool,
    /// The hop-by-hop header is reported with each message.
    pub router_alert: bool,
}

/// Why a message was not believed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Distrust {
    /// The source is neither link-local nor `::` (or unknown).
    Source,
    /// The hop limit is not 1 (or unknown).
    HopLimit,
    /// No Router Alert option for MLD.
    RouterAlert,
}

/// The message's source, if the message passes the RFC 3810 section 5 checks.
pub fn check(envelope: &Envelope, checks: Checks) -> Result<Ipv6Addr, Distrust> {
    let from = envelope
        .from
        .filter(|a| a.is_unicast_link_local() || a.is_unspecified())
        .ok_or(Distrust::Source)?;
    if checks.hop_limit && envelope.hop_limit != Some(1) {
        return Err(Distrust::HopLimit);
    }
    if checks.router_alert && !envelope.router_alert {
        return Err(Distrust::RouterAlert);
    }
    Ok(from)
}

/// Hop limit and Router Alert from the control messages of one `recvmsg` (Linux layout:
/// `cmsghdr` of `size_t` length, `int` level and `int` type, each header and its data aligned
/// to `size_t`). A control message that claims more bytes than there are ends the walk.
pub fn parse_control(control: &[u8]) -> (Option<u8>, bool) {
    const WORD: usize = std::mem::size_of::<usize>();
    let header = align(std::mem::size_of::<libc::cmsghdr>(), WORD);
    let (mut hop_limit, mut router_alert, mut at) = (None, false, 0);
    while let Some(head) = control.get(at..at + header) {
        let len = read_usize(head, 0).unwrap_or(0);
        let level = read_i32(head, WORD);
        let kind = read_i32(head, WORD + 4);
        let Some(data) = at
            .checked_add(len)
            .and_then(|end| control.get(at + header..end))
        else {
            break;
        };
        match (level, kind) {
            (Some(libc::IPPROTO_IPV6), Some(libc::IPV6_HOPLIMIT)) => {
                hop_limit = read_i32(data, 0).and_then(|h| u8::try_from(h).ok());
            }
            (Some(libc::IPPROTO_IPV6), Some(libc::IPV6_HOPOPTS)) => {
                router_alert |= has_mld_router_alert(data);
            }
            _ => {}
        }
        // `len` is at least `header` and within `control` here, so this cannot overflow.
        at += align(len, WORD);
    }
    (hop_limit, router_alert)
}

/// True when the hop-by-hop header `hbh` (next header, length, options) holds a Router Alert
/// option with the MLD value.
pub fn has_mld_router_alert(hbh: &[u8]) -> bool {
    let Some(&units) = hbh.get(1) else {
        return false;
    };
    let end = (usize::from(units) + 1) * 8;
    let options = hbh.get(2..end.min(hbh.len())).unwrap_or(&[]);
    let mut at = 0;
    while let Some(&kind) = options.get(at) {
        if kind == OPT_PAD1 {
            at += 1;
            continue;
        }
        let Some(&len) = options.get(at + 1) else {
            return false;
        };
        let value = options.get(at + 2..at + 2 + usize::from(len));
        if kind == OPT_ROUTER_ALERT {
            return value == Some(&ROUTER_ALERT_MLD.to_be_bytes()[..]);
        }
        at += 2 + usize::from(len);
    }
    false
}

fn align(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

fn read_usize(b: &[u8], at: usize) -> Option<usize> {
    let bytes = b.get(at..at + std::mem::size_of::<usize>())?;
    Some(usize::from_ne_bytes(bytes.try_into().ok()?))
}

fn read_i32(b: &[u8], at: usize) -> Option<i32> {
    let bytes = b.get(at..at + 4)?;
    Some(i32::from_ne_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 7);
    const ALL: Checks = Checks {
        hop_limit: true,
        router_alert: true,
    };
    /// What our own queries and reports carry: RA (MLD), PadN.
    const HBH: [u8; 8] = [58, 0, 5, 2, 0, 0, 1, 0];

    fn cmsg(kind: libc::c_int, data: &[u8]) -> Vec<u8> {
        const WORD: usize = std::mem::size_of::<usize>();
        let header = align(std::mem::size_of::<libc::cmsghdr>(), WORD);
        let mut out = (header + data.len()).to_ne_bytes().to_vec();
        out.extend(libc::IPPROTO_IPV6.to_ne_bytes());
        out.extend(kind.to_ne_bytes());
        out.resize(header, 0);
        out.extend(data);
        out.resize(align(out.len(), WORD), 0);
        out
    }

    fn good() -> Envelope {
        Envelope {
            from: Some(LL),
            hop_limit: Some(1),
            router_alert: true,
        }
    }

    #[test]
    fn reads_what_the_kernel_sends() {
        let mut control = cmsg(libc::IPV6_HOPLIMIT, &1i32.to_ne_bytes());
        control.extend(cmsg(libc::IPV6_HOPOPTS, &HBH));
        assert_eq!(parse_control(&control), (Some(1), true));
        let hl255 = cmsg(libc::IPV6_HOPLIMIT, &255i32.to_ne_bytes());
        assert_eq!(parse_control(&hl255), (Some(255), false));
        assert_eq!(parse_control(&[]), (None, false));
    }

    #[test]
    fn router_alert_must_say_mld() {
        assert!(has_mld_router_alert(&HBH));
        assert!(
            has_mld_router_alert(&[58, 0, 0, 0, 5, 2, 0, 0]),
            "after Pad1s"
        );
        assert!(
            !has_mld_router_alert(&[58, 0, 5, 2, 0, 1, 1, 0]),
            "RSVP's value"
        );
        assert!(
            !has_mld_router_alert(&[58, 0, 1, 4, 0, 0, 0, 0]),
            "PadN only"
        );
        assert!(
            !has_mld_router_alert(&[58, 0, 1, 200, 5, 2, 0, 0]),
            "hidden in PadN"
        );
        assert!(!has_mld_router_alert(&[58]));
    }

    #[test]
    fn checks_follow_rfc_3810_section_5() {
        assert_eq!(check(&good(), ALL), Ok(LL));
        let unspecified = Envelope {
            from: Some(Ipv6Addr::UNSPECIFIED),
            ..good()
        };
        assert_eq!(check(&unspecified, ALL), Ok(Ipv6Addr::UNSPECIFIED));
        let global = Envelope {
            from: Some("2001:db8::1".parse().unwrap()),
            ..good()
        };
        assert_eq!(check(&global, ALL), Err(Distrust::Source));
        let routed = Envelope {
            hop_limit: Some(255),
            ..good()
        };
        assert_eq!(check(&routed, ALL), Err(Distrust::HopLimit));
        let bare = Envelope {
            router_alert: false,
            ..good()
        };
        assert_eq!(check(&bare, ALL), Err(Distrust::RouterAlert));
        let none = Checks {
            hop_limit: false,
            router_alert: false,
        };
        assert_eq!(check(&bare, none), Ok(LL), "checks the kernel cannot make");
    }

    proptest! {
        #[test]
        fn control_parsing_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_control(&bytes);
            let _ = has_mld_router_alert(&bytes);
        }

        #[test]
        fn truncated_control_never_panics(cut in 0usize..64) {
            let mut control = cmsg(libc::IPV6_HOPLIMIT, &1i32.to_ne_bytes());
            control.extend(cmsg(libc::IPV6_HOPOPTS, &HBH));
            let _ = parse_control(&control[..cut.min(control.len())]);
        }
    }
}
