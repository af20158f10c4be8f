//! MLD wire format: decode the ICMPv6 messages a raw ICMPv6 socket returns, encode queries.
//!
//! Input is the ICMPv6 message alone (type, code, checksum, body), without the IPv6 header, as
//! `recvfrom` on a raw `IPPROTO_ICMPV6` socket gives it. The checksum field is not checked: for
//! such sockets Linux verifies it (over the pseudo-header we never see) and drops bad packets.
//!
//! Accepted, following RFC 2710 and RFC 3810:
//! - 130 query: exactly 24 bytes is MLDv1, 28 or more is MLDv2 (flags, QRV, QQIC, sources);
//!   25 to 27 bytes is an error (RFC 3810 8.1). Bytes after the announced sources are ignored.
//! - 131 report and 132 done (MLDv1): 24 bytes; anything after them is ignored (RFC 2710 3.8).
//! - 143 MLDv2 report: every record, honouring its aux data length (32-bit words) and source
//!   count. Records of unknown type are skipped by their lengths, not rejected. Bytes after the
//!   announced records are ignored.
//!
//! Invariants: hostile input gives `Err`, never a panic; received bytes are never indexed; no
//! allocation is larger than the bytes left to read can fill.

use std::net::Ipv6Addr;
use std::time::Duration;

use super::MldError;

/// ICMPv6 type of an MLD query (v1 and v2).
pub const MLD_QUERY: u8 = 130;
/// ICMPv6 type of an MLDv1 report.
pub const MLDV1_REPORT: u8 = 131;
/// ICMPv6 type of an MLDv1 done.
pub const MLDV1_DONE: u8 = 132;
/// ICMPv6 type of an MLDv2 report.
pub const MLDV2_REPORT: u8 = 143;

const MLDV1_LEN: usize = 24;
const MLDV2_QUERY_MIN_LEN: usize = 28;
const ADDR_LEN: usize = 16;
const RECORD_HEADER_LEN: usize = 20;

/// One decoded MLD message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MldMessage {
    /// A general, address-specific or address-and-source-specific query.
    Query(Query),
    /// MLDv1 report: the sender listens to `group` (any source).
    ReportV1 {
        /// The group joined.
        group: Ipv6Addr,
    },
    /// MLDv1 done: the sender left `group`.
    DoneV1 {
        /// The group left.
        group: Ipv6Addr,
    },
    /// MLDv2 report: records of known type, in packet order.
    ReportV2 {
        /// The records; records of unknown type are not included.
        records: Vec<GroupRecord>,
    },
}

/// An MLD query, as received or to be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// Raw Maximum Response Code; see [`Query::max_response_delay`].
    pub max_response_code: u16,
    /// `::` for a general query, otherwise the group asked about.
    pub group: Ipv6Addr,
    /// MLDv2 fields; `None` for the 24-byte MLDv1 form.
    pub v2: Option<QueryV2>,
}

/// The fields only an MLDv2 query has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryV2 {
    /// S flag: routers suppress their timer updates.
    pub suppress_router_side: bool,
    /// Querier's Robustness Variable (0 when it exceeds 7).
    pub qrv: u8,
    /// Raw Querier's Query Interval Code; see [`QueryV2::query_interval`].
    pub qqic: u8,
    /// Sources of an address-and-source-specific query.
    pub sources: Vec<Ipv6Addr>,
}

/// The six MLDv2 record types (RFC 3810 5.2.12).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordType {
    /// Current state: INCLUDE(sources).
    ModeIsInclude = 1,
    /// Current state: EXCLUDE(sources).
    ModeIsExclude = 2,
    /// Filter mode changed to INCLUDE(sources).
    ChangeToInclude = 3,
    /// Filter mode changed to EXCLUDE(sources).
    ChangeToExclude = 4,
    /// These sources are now wanted.
    AllowNewSources = 5,
    /// These sources are no longer wanted.
    BlockOldSources = 6,
}

impl RecordType {
    /// The record type for a wire value, `None` for unknown types.
    pub fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Self::ModeIsInclude,
            2 => Self::ModeIsExclude,
            3 => Self::ChangeToInclude,
            4 => Self::ChangeToExclude,
            5 => Self::AllowNewSources,
            6 => Self::BlockOldSources,
            _ => return None,
        })
    }
}

/// One multicast address record of an MLDv2 report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRecord {
    /// What the record says about the sources.
    pub record_type: RecordType,
    /// The multicast address concerned.
    pub group: Ipv6Addr,
    /// The record's source list.
    pub sources: Vec<Ipv6Addr>,
}

impl Query {
    /// An MLDv2 general query (group `::`, no sources).
    pub fn general(max_response_delay: Duration, robustness: u8, query_interval: Duration) -> Self {
        Self::address_specific(
            Ipv6Addr::UNSPECIFIED,
            max_response_delay,
            robustness,
            query_interval,
        )
    }

    /// An MLDv2 multicast-address-specific query for `group`.
    pub fn address_specific(
        group: Ipv6Addr,
        max_response_delay: Duration,
        robustness: u8,
        query_interval: Duration,
    ) -> Self {
        Self {
            max_response_code: encode_max_response_code(max_response_delay),
            group,
            v2: Some(QueryV2 {
                suppress_router_side: false,
                qrv: if robustness > 7 { 0 } else { robustness },
                qqic: encode_qqic(query_interval),
                sources: Vec::new(),
            }),
        }
    }

    /// True for a general query (group `::`).
    pub fn is_general(&self) -> bool {
        self.group.is_unspecified()
    }

    /// The maximum response delay: milliseconds in MLDv1, the floating code in MLDv2.
    pub fn max_response_delay(&self) -> Duration {
        match self.v2 {
            Some(_) => decode_max_response_code(self.max_response_code),
            None => Duration::from_millis(u64::from(self.max_response_code)),
        }
    }
}

impl QueryV2 {
    /// The querier's query interval decoded from QQIC.
    pub fn query_interval(&self) -> Duration {
        decode_qqic(self.qqic)
    }
}

/// Decode an MLDv2 Maximum Response Code (RFC 3810 5.1.3) into a delay.
pub fn decode_max_response_code(code: u16) -> Duration {
    let ms = if code < 0x8000 {
        u64::from(code)
    } else {
        let exp = u32::from((code >> 12) & 0x7);
        let mant = u64::from(code & 0x0fff);
        (mant | 0x1000) << (exp + 3)
    };
    Duration::from_millis(ms)
}

/// Encode a delay as an MLDv2 Maximum Response Code, rounding down, saturating at the maximum.
pub fn encode_max_response_code(delay: Duration) -> u16 {
    let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
    if ms < 0x8000 {
        return ms as u16;
    }
    for exp in 0..8u32 {
        let mant = ms >> (exp + 3);
        if mant <= 0x1fff {
            return 0x8000 | ((exp as u16) << 12) | ((mant as u16) & 0x0fff);
        }
    }
    u16::MAX
}

/// Decode a Querier's Query Interval Code (RFC 3810 5.1.9) into an interval.
pub fn decode_qqic(code: u8) -> Duration {
    let secs = if code < 0x80 {
        u64::from(code)
    } else {
        let exp = u32::from((code >> 4) & 0x7);
        let mant = u64::from(code & 0x0f);
        (mant | 0x10) << (exp + 3)
    };
    Duration::from_secs(secs)
}

/// Encode an interval as a QQIC: whole seconds rounded up, rounding down past 127 s,
/// saturating at the maximum.
pub fn encode_qqic(interval: Duration) -> u8 {
    let secs = interval.as_secs() + u64::from(interval.subsec_nanos() > 0);
    if secs < 0x80 {
        return secs as u8;
    }
    for exp in 0..8u32 {
        let mant = secs >> (exp + 3);
        if mant <= 0x1f {
            return 0x80 | ((exp as u8) << 4) | ((mant as u8) & 0x0f);
        }
    }
    u8::MAX
}

/// Encode a query as ICMPv6 bytes: type 130, code 0, checksum 0 (the kernel fills it in for
/// raw ICMPv6 sockets). The MLDv1 form when `query.v2` is `None`. At most 65535 sources are
/// written.
pub fn encode_query(query: &Query) -> Vec<u8> {
    let sources = query.v2.as_ref().map_or(&[][..], |v2| &v2.sources);
    let count = sources.len().min(usize::from(u16::MAX));
    let mut out = Vec::with_capacity(MLDV2_QUERY_MIN_LEN + count * ADDR_LEN);
    out.extend_from_slice(&[MLD_QUERY, 0, 0, 0]);
    out.extend_from_slice(&query.max_response_code.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&query.group.octets());
    if let Some(v2) = &query.v2 {
        out.push((u8::from(v2.suppress_router_side) << 3) | (v2.qrv & 0x07));
        out.push(v2.qqic);
        out.extend_from_slice(&(count as u16).to_be_bytes());
        for source in sources.iter().take(count) {
            out.extend_from_slice(&source.octets());
        }
    }
    out
}

/// Encode an MLDv2 report (type 143, checksum 0 for the kernel to fill in) of `records`. At
/// most 65535 records, and at most 65535 sources per record, are written.
pub fn encode_report(records: &[GroupRecord]) -> Vec<u8> {
    let count = records.len().min(usize::from(u16::MAX));
    let mut out = vec![MLDV2_REPORT, 0, 0, 0, 0, 0];
    out.extend_from_slice(&(count as u16).to_be_bytes());
    for record in records.iter().take(count) {
        let sources = record.sources.len().min(usize::from(u16::MAX));
        out.extend_from_slice(&[record.record_type as u8, 0]);
        out.extend_from_slice(&(sources as u16).to_be_bytes());
        out.extend_from_slice(&record.group.octets());
        for source in record.sources.iter().take(sources) {
            out.extend_from_slice(&source.octets());
        }
    }
    out
}

/// Decode one ICMPv6 message. `Err(MldError::NotMld)` for ICMPv6 types other than MLD.
pub fn parse(icmpv6: &[u8]) -> Result<MldMessage, MldError> {
    let mut r = Reader::new(icmpv6);
    let msg_type = r.u8()?;
    let _code = r.u8()?;
    let _checksum = r.u16()?;
    match msg_type {
        MLD_QUERY => parse_query(icmpv6.len(), &mut r).map(MldMessage::Query),
        MLDV1_REPORT => parse_v1_group(&mut r).map(|group| MldMessage::ReportV1 { group }),
        MLDV1_DONE => parse_v1_group(&mut r).map(|group| MldMessage::DoneV1 { group }),
        MLDV2_REPORT => parse_v2_report(&mut r),
        other => Err(MldError::NotMld(other)),
    }
}

fn parse_v1_group(r: &mut Reader<'_>) -> Result<Ipv6Addr, MldError> {
    r.skip(4)?; // maximum response delay, reserved
    r.addr()
}

fn parse_query(len: usize, r: &mut Reader<'_>) -> Result<Query, MldError> {
    let max_response_code = r.u16()?;
    r.skip(2)?; // reserved
    let group = r.addr()?;
    let v2 = match len {
        MLDV1_LEN => None,
        l if l < MLDV2_QUERY_MIN_LEN => return Err(MldError::BadQueryLength(l)),
        _ => Some(parse_query_v2(r)?),
    };
    Ok(Query {
        max_response_code,
        group,
        v2,
    })
}

fn parse_query_v2(r: &mut Reader<'_>) -> Result<QueryV2, MldError> {
    let flags = r.u8()?;
    let qqic = r.u8()?;
    let count = usize::from(r.u16()?);
    Ok(QueryV2 {
        suppress_router_side: flags & 0x08 != 0,
        qrv: flags & 0x07,
        qqic,
        sources: r.addrs(count)?,
    })
}

fn parse_v2_report(r: &mut Reader<'_>) -> Result<MldMessage, MldError> {
    r.skip(2)?; // reserved
    let count = usize::from(r.u16()?);
    let mut records = Vec::with_capacity(count.min(r.remaining() / RECORD_HEADER_LEN));
    for _ in 0..count {
        if let Some(record) = parse_record(r)? {
            records.push(record);
        }
    }
    Ok(MldMessage::ReportV2 { records })
}

/// One record; `Ok(None)` for a well-formed record of unknown type, which is skipped.
fn parse_record(r: &mut Reader<'_>) -> Result<Option<GroupRecord>, MldError> {
    let raw_type = r.u8()?;
    let aux_words = usize::from(r.u8()?);
    let count = usize::from(r.u16()?);
    let group = r.addr()?;
    let Some(record_type) = RecordType::from_u8(raw_type) else {
        r.skip(count * ADDR_LEN + aux_words * 4)?;
        return Ok(None);
    };
    let sources = r.addrs(count)?;
    r.skip(aux_words * 4)?;
    Ok(Some(GroupRecord {
        record_type,
        group,
        sources,
    }))
}

/// A cursor over received bytes that only hands out what is there.
struct Reader<'a> {
    rest: &'a [u8],
    offset: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self {
            rest: bytes,
            offset: 0,
        }
    }

    fn remaining(&self) -> usize {
        self.rest.len()
    }

    fn truncated(&self, needed: usize) -> MldError {
        MldError::Truncated {
            offset: self.offset,
            needed,
        }
    }

    fn take<const N: usize>(&mut self) -> Result<&'a [u8; N], MldError> {
        let (head, rest) = self
            .rest
            .split_first_chunk::<N>()
            .ok_or_else(|| self.truncated(N))?;
        self.rest = rest;
        self.offset += N;
        Ok(head)
    }

    fn skip(&mut self, n: usize) -> Result<(), MldError> {
        let (_, rest) = self
            .rest
            .split_at_checked(n)
            .ok_or_else(|| self.truncated(n))?;
        self.rest = rest;
        self.offset += n;
        Ok(())
    }

    fn u8(&mut self) -> Result<u8, MldError> {
        let [b] = *self.take::<1>()?;
        Ok(b)
    }

    fn u16(&mut self) -> Result<u16, MldError> {
        Ok(u16::from_be_bytes(*self.take::<2>()?))
    }

    fn addr(&mut self) -> Result<Ipv6Addr, MldError> {
        Ok(Ipv6Addr::from(*self.take::<ADDR_LEN>()?))
    }

    /// `count` addresses; checks they are all there before allocating.
    fn addrs(&mut self, count: usize) -> Result<Vec<Ipv6Addr>, MldError> {
        let needed = count * ADDR_LEN; // count <= u16::MAX: cannot overflow
        if needed > self.remaining() {
            return Err(self.truncated(needed));
        }
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            out.push(self.addr()?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const G1: Ipv6Addr = Ipv6Addr::new(0xff1e, 0, 0, 0, 0, 0, 0, 0x1234);
    const G2: Ipv6Addr = Ipv6Addr::new(0xff1e, 0xabcd, 0, 0, 0, 0, 0, 0x5678);
    const S1: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
    const S2: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);

    const ALL_TYPES: [RecordType; 6] = [
        RecordType::ModeIsInclude,
        RecordType::ModeIsExclude,
        RecordType::ChangeToInclude,
        RecordType::ChangeToExclude,
        RecordType::AllowNewSources,
        RecordType::BlockOldSources,
    ];

    #[test]
    fn reports_round_trip() {
        let records: Vec<GroupRecord> = ALL_TYPES
            .iter()
            .map(|&record_type| GroupRecord {
                record_type,
                group: G2,
                sources: vec![S1, S2],
            })
            .chain([GroupRecord {
                record_type: RecordType::ChangeToExclude,
                group: G1,
                sources: vec![],
            }])
            .collect();
        let bytes = encode_report(&records);
        assert_eq!(bytes.len(), 8 + 6 * (20 + 32) + 20);
        assert_eq!(parse(&bytes).unwrap(), MldMessage::ReportV2 { records });
    }

    /// Test-only encoder for reports; queries go through the real `encode_query`.
    fn encode(msg: &MldMessage) -> Vec<u8> {
        match msg {
            MldMessage::Query(q) => encode_query(q),
            MldMessage::ReportV1 { group } => v1(MLDV1_REPORT, *group),
            MldMessage::DoneV1 { group } => v1(MLDV1_DONE, *group),
            MldMessage::ReportV2 { records } => {
                let raw: Vec<_> = records
                    .iter()
                    .map(|r| (r.record_type as u8, r.group, r.sources.clone(), vec![]))
                    .collect();
                v2_report(&raw)
            }
        }
    }

    fn v1(msg_type: u8, group: Ipv6Addr) -> Vec<u8> {
        let mut out = vec![msg_type, 0, 0x12, 0x34, 0, 0, 0, 0];
        out.extend_from_slice(&group.octets());
        out
    }

    /// A v2 report from raw records: (type, group, sources, aux data).
    fn v2_report(records: &[(u8, Ipv6Addr, Vec<Ipv6Addr>, Vec<u8>)]) -> Vec<u8> {
        let mut out = vec![MLDV2_REPORT, 0, 0xab, 0xcd, 0, 0];
        out.extend_from_slice(&(records.len() as u16).to_be_bytes());
        for (t, group, sources, aux) in records {
            assert_eq!(aux.len() % 4, 0);
            out.extend_from_slice(&[*t, (aux.len() / 4) as u8]);
            out.extend_from_slice(&(sources.len() as u16).to_be_bytes());
            out.extend_from_slice(&group.octets());
            for s in sources {
                out.extend_from_slice(&s.octets());
            }
            out.extend_from_slice(aux);
        }
        out
    }

    fn records(msg: MldMessage) -> Vec<GroupRecord> {
        match msg {
            MldMessage::ReportV2 { records } => records,
            other => panic!("not a v2 report: {other:?}"),
        }
    }

    #[test]
    fn v1_query() {
        let mut bytes = vec![130, 0, 0, 0, 0x27, 0x10, 0, 0];
        bytes.extend_from_slice(&G1.octets());
        let MldMessage::Query(q) = parse(&bytes).unwrap() else {
            panic!()
        };
        assert_eq!(q.group, G1);
        assert!(q.v2.is_none());
        assert_eq!(q.max_response_delay(), Duration::from_secs(10));
    }

    #[test]
    fn v2_general_query_bytes_and_parse() {
        let q = Query::general(Duration::from_secs(1), 2, Duration::from_secs(5));
        let bytes = encode_query(&q);
        let mut expected = vec![130, 0, 0, 0, 0x03, 0xe8, 0, 0];
        expected.extend_from_slice(&[0; 16]);
        expected.extend_from_slice(&[0x02, 5, 0, 0]);
        assert_eq!(bytes, expected);
        let MldMessage::Query(back) = parse(&bytes).unwrap() else {
            panic!()
        };
        assert!(back.is_general());
        assert_eq!(back.max_response_delay(), Duration::from_secs(1));
        assert_eq!(back.v2.unwrap().query_interval(), Duration::from_secs(5));
    }

    #[test]
    fn v2_query_flags_and_sources() {
        let mut bytes = vec![130, 0, 0, 0, 0x80, 0x00, 0xff, 0xff];
        bytes.extend_from_slice(&G1.octets());
        bytes.extend_from_slice(&[0xf0 | 0x08 | 0x03, 0x91, 0, 2]);
        bytes.extend_from_slice(&S1.octets());
        bytes.extend_from_slice(&S2.octets());
        bytes.extend_from_slice(&[9, 9, 9]); // additional data: ignored
        let MldMessage::Query(q) = parse(&bytes).unwrap() else {
            panic!()
        };
        let v2 = q.v2.clone().unwrap();
        assert!(v2.suppress_router_side);
        assert_eq!(v2.qrv, 3);
        assert_eq!(v2.sources, vec![S1, S2]);
        assert_eq!(v2.query_interval(), Duration::from_secs(0x11 << 4));
        assert_eq!(q.max_response_delay(), Duration::from_millis(32768));
    }

    #[test]
    fn address_specific_query_round_trips() {
        let q =
            Query::address_specific(G2, Duration::from_millis(500), 9, Duration::from_secs(200));
        assert_eq!(q.v2.as_ref().unwrap().qrv, 0, "QRV above 7 is sent as 0");
        assert_eq!(parse(&encode_query(&q)).unwrap(), MldMessage::Query(q));
    }

    #[test]
    fn query_of_25_to_27_bytes_is_rejected() {
        for len in 25..28 {
            let mut bytes = vec![130, 0, 0, 0, 0, 0, 0, 0];
            bytes.resize(len, 0);
            assert!(matches!(parse(&bytes), Err(MldError::BadQueryLength(l)) if l == len));
        }
    }

    #[test]
    fn v1_report_and_done_ignore_trailing_bytes() {
        let mut report = v1(MLDV1_REPORT, G1);
        report.extend_from_slice(&[1, 2, 3]);
        assert_eq!(parse(&report).unwrap(), MldMessage::ReportV1 { group: G1 });
        assert_eq!(
            parse(&v1(MLDV1_DONE, G2)).unwrap(),
            MldMessage::DoneV1 { group: G2 }
        );
    }

    #[test]
    fn other_icmpv6_types_are_not_mld() {
        assert!(matches!(
            parse(&[128, 0, 0, 0, 1, 2]),
            Err(MldError::NotMld(128))
        ));
    }

    #[test]
    fn v2_report_every_record_type() {
        let raw: Vec<_> = ALL_TYPES
            .iter()
            .enumerate()
            .map(|(i, t)| (*t as u8, G1, vec![S1; i], vec![]))
            .collect();
        let recs = records(parse(&v2_report(&raw)).unwrap());
        assert_eq!(recs.len(), 6);
        for (i, (rec, t)) in recs.iter().zip(ALL_TYPES).enumerate() {
            assert_eq!(rec.record_type, t);
            assert_eq!(rec.group, G1);
            assert_eq!(rec.sources, vec![S1; i]);
        }
    }

    #[test]
    fn aux_data_is_skipped() {
        let raw = vec![
            (2, G1, vec![S1], vec![0xee; 8]),
            (4, G2, vec![], vec![0xdd; 4]),
            (1, G1, vec![S2], vec![]),
        ];
        let recs = records(parse(&v2_report(&raw)).unwrap());
        let got: Vec<_> = recs.iter().map(|r| (r.group, r.sources.clone())).collect();
        assert_eq!(got, vec![(G1, vec![S1]), (G2, vec![]), (G1, vec![S2])]);
    }

    #[test]
    fn unknown_record_types_are_skipped() {
        let raw = vec![
            (7, G1, vec![S1, S2], vec![0; 12]),
            (0, G1, vec![], vec![]),
            (5, G2, vec![S2], vec![0; 4]),
            (200, G2, vec![S1], vec![]),
        ];
        let recs = records(parse(&v2_report(&raw)).unwrap());
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].record_type, RecordType::AllowNewSources);
        assert_eq!(recs[0].group, G2);
    }

    #[test]
    fn oversized_counts_are_errors() {
        let mut report = vec![MLDV2_REPORT, 0, 0, 0, 0, 0, 0xff, 0xff];
        report.extend_from_slice(&[2, 0, 0, 0]);
        report.extend_from_slice(&G1.octets());
        assert!(
            parse(&report).is_err(),
            "65535 records announced, one present"
        );
        let raw = vec![(1, G1, vec![S1], vec![])];
        let mut bytes = v2_report(&raw);
        bytes[10..12].copy_from_slice(&0xffffu16.to_be_bytes()); // source count
        assert!(parse(&bytes).is_err());
        bytes[10..12].copy_from_slice(&1u16.to_be_bytes());
        bytes[9] = 0xff; // aux length
        assert!(parse(&bytes).is_err());
        let mut query = encode_query(&Query::general(Duration::ZERO, 2, Duration::ZERO));
        query[26..28].copy_from_slice(&0xffffu16.to_be_bytes());
        assert!(parse(&query).is_err());
    }

    fn valid_messages() -> Vec<Vec<u8>> {
        let mut sq = Query::address_specific(G1, Duration::from_secs(1), 2, Duration::from_secs(5));
        sq.v2.as_mut().unwrap().sources = vec![S1, S2];
        vec![
            encode_query(&Query::general(
                Duration::from_secs(1),
                2,
                Duration::from_secs(5),
            )),
            encode_query(&sq),
            v1(MLD_QUERY, Ipv6Addr::UNSPECIFIED),
            v1(MLDV1_REPORT, G1),
            v1(MLDV1_DONE, G1),
            v2_report(&[
                (4, G1, vec![], vec![0; 4]),
                (9, G2, vec![S1], vec![0; 8]),
                (5, G2, vec![S1, S2], vec![]),
            ]),
        ]
    }

    #[test]
    fn every_truncation_is_an_error() {
        for bytes in valid_messages() {
            assert!(parse(&bytes).is_ok());
            for len in 0..bytes.len() {
                match parse(&bytes[..len]) {
                    Err(_) => {}
                    // The first 24 bytes of an MLDv2 query are a valid MLDv1 query (RFC 3810 8.1).
                    Ok(MldMessage::Query(Query { v2: None, .. })) if len == MLDV1_LEN => {}
                    Ok(m) => panic!("prefix of {len} bytes parsed as {m:?}"),
                }
            }
        }
    }

    #[test]
    fn every_bit_flip_is_handled() {
        for bytes in valid_messages() {
            for bit in 0..bytes.len() * 8 {
                let mut b = bytes.clone();
                b[bit / 8] ^= 1 << (bit % 8);
                let _ = parse(&b);
            }
        }
    }

    #[test]
    fn code_encodings() {
        assert_eq!(
            encode_max_response_code(Duration::from_millis(32767)),
            32767
        );
        assert_eq!(
            encode_max_response_code(Duration::from_millis(32768)),
            0x8000
        );
        assert_eq!(
            encode_max_response_code(Duration::from_secs(100_000)),
            u16::MAX
        );
        assert_eq!(
            decode_max_response_code(u16::MAX),
            Duration::from_millis(0x1fff << 10)
        );
        assert_eq!(encode_qqic(Duration::from_millis(1)), 1);
        assert_eq!(encode_qqic(Duration::from_secs(125)), 125);
        assert_eq!(encode_qqic(Duration::from_secs(128)), 0x80);
        assert_eq!(encode_qqic(Duration::from_secs(1_000_000)), u8::MAX);
    }

    fn addr() -> impl Strategy<Value = Ipv6Addr> {
        any::<u128>().prop_map(Ipv6Addr::from)
    }

    fn record() -> impl Strategy<Value = GroupRecord> {
        (
            prop::sample::select(ALL_TYPES.to_vec()),
            addr(),
            prop::collection::vec(addr(), 0..4),
        )
            .prop_map(|(record_type, group, sources)| GroupRecord {
                record_type,
                group,
                sources,
            })
    }

    fn query() -> impl Strategy<Value = Query> {
        let v2 = (
            any::<bool>(),
            0u8..8,
            any::<u8>(),
            prop::collection::vec(addr(), 0..4),
        )
            .prop_map(|(s, qrv, qqic, sources)| QueryV2 {
                suppress_router_side: s,
                qrv,
                qqic,
                sources,
            });
        (any::<u16>(), addr(), prop::option::of(v2)).prop_map(|(code, group, v2)| Query {
            max_response_code: code,
            group,
            v2,
        })
    }

    fn message() -> impl Strategy<Value = MldMessage> {
        prop_oneof![
            query().prop_map(MldMessage::Query),
            addr().prop_map(|group| MldMessage::ReportV1 { group }),
            addr().prop_map(|group| MldMessage::DoneV1 { group }),
            prop::collection::vec(record(), 0..5)
                .prop_map(|records| MldMessage::ReportV2 { records }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn random_mld_headers_never_panic(
            t in prop::sample::select(vec![130u8, 131, 132, 143]),
            rest in prop::collection::vec(any::<u8>(), 0..200),
        ) {
            let mut bytes = vec![t];
            bytes.extend(rest);
            let _ = parse(&bytes);
        }

        #[test]
        fn round_trip(msg in message()) {
            prop_assert_eq!(parse(&encode(&msg)).unwrap(), msg);
        }

        #[test]
        fn codes_round_down_closely(ms in 0u64..10_000_000) {
            let d = Duration::from_millis(ms);
            let back = decode_max_response_code(encode_max_response_code(d));
            prop_assert!(back <= d);
            prop_assert!(ms >= (0x1fff << 10) || (d - back).as_millis() * 4096 <= u128::from(ms));
            let back = decode_qqic(encode_qqic(Duration::from_secs(ms / 1000)));
            prop_assert!(back.as_secs() <= ms / 1000);
        }
    }
}
