//! W3C baggage as the proxy passes it on: parsed strictly, rebuilt by hand.
//!
//! Why not the OpenTelemetry propagator: it percent-decodes keys and properties on
//! the way in and writes them back without encoding, and it silently drops members
//! past 64. A client could then smuggle a `canarygate.pool` member past the filter
//! (`canarygate%252Epool`, a property holding `%2C`), or crowd the proxy's own
//! member out. Here nothing is decoded: a member is kept exactly as received when it
//! is well-formed, dropped otherwise; every member whose key starts with
//! `canarygate` (any case) is the proxy's and is taken out; and the proxy's members
//! go first, so a full header loses the caller's members, never the proxy's.

use crate::routing::PoolKind;

/// The baggage member naming the pool that served a request.
pub const POOL_MEMBER: &str = "canarygate.pool";
/// W3C baggage limits: members and bytes of one header.
pub const MAX_MEMBERS: usize = 180;
pub const MAX_BYTES: usize = 8192;

/// A caller's baggage: what it asked for and what goes on.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// The pool a `canarygate.pool` member asked for (its first one).
    pub asked_pool: Option<PoolKind>,
    /// The caller's other members, as received (trimmed): `key=value[;properties]`.
    pub members: Vec<String>,
}

/// Reads every `baggage` header line of a request.
pub fn parse<'a>(lines: impl IntoIterator<Item = &'a [u8]>) -> Incoming {
    let mut incoming = Incoming::default();
    let mut seen = 0;
    for member in lines
        .into_iter()
        .flat_map(|line| line.split(|&b| b == b','))
    {
        let member = trim(member);
        if member.is_empty() {
            continue;
        }
        seen += 1;
        if seen > MAX_MEMBERS {
            break;
        }
        let Some(Member {
            key,
            value,
            properties,
        }) = split_member(member)
        else {
            continue;
        };
        if starts_with_ignore_case(key, b"canarygate") {
            if key == POOL_MEMBER.as_bytes() && incoming.asked_pool.is_none() {
                incoming.asked_pool = match value {
                    b"canary" => Some(PoolKind::Canary),
                    b"production" => Some(PoolKind::Production),
                    _ => None,
                };
            }
            continue;
        }
        let mut text = Vec::with_capacity(member.len());
        text.extend_from_slice(key);
        text.push(b'=');
        text.extend_from_slice(value);
        for property in properties {
            text.push(b';');
            text.extend_from_slice(property);
        }
        // Only ASCII passed the checks.
        incoming
            .members
            .push(String::from_utf8(text).unwrap_or_default());
    }
    incoming
}

/// The baggage to send upstream: `canarygate.pool` (if given), the flags, then the
/// caller's members that fit the limits (a caller's member named like a flag is the
/// proxy's to set). `None` when there is nothing to send.
pub fn render(
    pool: Option<PoolKind>,
    flags: &[(&str, &str)],
    incoming: &Incoming,
) -> Option<String> {
    let mut out = String::with_capacity(64);
    let mut members = 0;
    if let Some(pool) = pool {
        push_member(&mut out, POOL_MEMBER, pool.as_str());
        members += 1;
    }
    for (name, value) in flags {
        push_member(&mut out, name, value);
        members += 1;
    }
    for member in &incoming.members {
        let key = member.split('=').next().unwrap_or("");
        if flags.iter().any(|(name, _)| *name == key) {
            continue;
        }
        if members == MAX_MEMBERS || out.len() + 1 + member.len() > MAX_BYTES {
            break;
        }
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(member);
        members += 1;
    }
    (!out.is_empty()).then_some(out)
}

/// Whether a request's baggage lines hold a member the proxy must take out.
pub fn mentions_canarygate<'a>(mut lines: impl Iterator<Item = &'a [u8]>) -> bool {
    lines.any(|line| {
        line.windows(b"canarygate".len())
            .any(|w| w.eq_ignore_ascii_case(b"canarygate"))
    })
}

/// A well-formed member's parts, trimmed.
struct Member<'a> {
    key: &'a [u8],
    value: &'a [u8],
    properties: Vec<&'a [u8]>,
}

/// The parts of a well-formed member (W3C baggage: a token key, a value of
/// baggage-octets, properties `key[=value]`), or `None`.
fn split_member(member: &[u8]) -> Option<Member<'_>> {
    let mut parts = member.split(|&b| b == b';');
    let pair = parts.next()?;
    let eq = pair.iter().position(|&b| b == b'=')?;
    let (key, value) = (trim(&pair[..eq]), trim(&pair[eq + 1..]));
    // No `%` in a key: SDKs downstream percent-decode keys, and `canarygate%2Epool`
    // would become the proxy's member there.
    if !is_token(key) || key.contains(&b'%') || !value.iter().all(|&b| is_baggage_octet(b)) {
        return None;
    }
    let mut properties = Vec::new();
    for property in parts {
        let property = trim(property);
        let (name, value) = match property.iter().position(|&b| b == b'=') {
            Some(eq) => (trim(&property[..eq]), Some(trim(&property[eq + 1..]))),
            None => (property, None),
        };
        if !is_token(name) || !value.is_none_or(|v| v.iter().all(|&b| is_baggage_octet(b))) {
            return None;
        }
        properties.push(property);
    }
    Some(Member {
        key,
        value,
        properties,
    })
}

/// Appends `key=value`, the value percent-encoded where baggage does not allow the
/// byte as is (the flag values the proxy sends).
fn push_member(out: &mut String, key: &str, value: &str) {
    use std::fmt::Write as _;
    if !out.is_empty() {
        out.push(',');
    }
    out.push_str(key);
    out.push('=');
    for b in value.bytes() {
        if is_baggage_octet(b) && b != b'%' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// baggage-octet: `%x21 / %x23-2B / %x2D-3A / %x3C-5B / %x5D-7E`.
fn is_baggage_octet(b: u8) -> bool {
    matches!(b, 0x21 | 0x23..=0x2B | 0x2D..=0x3A | 0x3C..=0x5B | 0x5D..=0x7E)
}

/// An RFC 9110 token.
fn is_token(bytes: &[u8]) -> bool {
    !bytes.is_empty()
        && bytes
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

fn starts_with_ignore_case(bytes: &[u8], prefix: &[u8]) -> bool {
    bytes.len() >= prefix.len() && bytes[..prefix.len()].eq_ignore_ascii_case(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(line: &str) -> Incoming {
        parse([line.as_bytes()])
    }

    #[test]
    fn well_formed_members_pass_as_received() {
        let i = of(" userId=alice , tier=gold;ttl=30 ;secure,empty=");
        assert_eq!(i.asked_pool, None);
        assert_eq!(
            i.members,
            ["userId=alice", "tier=gold;ttl=30;secure", "empty="]
        );
    }

    #[test]
    fn every_canarygate_member_is_taken_out_in_any_case_and_spelling() {
        let i =
            of("canarygate.pool=canary,Canarygate.Pool=production,CANARYGATE.x=1,canarygate=1,a=1");
        assert_eq!(i.asked_pool, Some(PoolKind::Canary));
        assert_eq!(i.members, ["a=1"]);
        // Encoded keys are not tokens: dropped, never decoded into a pool member.
        let i = of("canarygate%2Epool=canary,canarygate%252Epool=canary,b=2");
        assert_eq!(i.asked_pool, None);
        assert_eq!(i.members, ["b=2"]);
        // A property cannot carry a member: passed as received, its encoded comma
        // stays encoded (a parser splits members on the raw commas).
        let i = of("x=y;%2Ccanarygate.pool%3Dcanary,z=1;p=%2C");
        assert_eq!(i.members, ["x=y;%2Ccanarygate.pool%3Dcanary", "z=1;p=%2C"]);
    }

    #[test]
    fn malformed_members_are_dropped_alone() {
        let i = of("ok=1,no-equals,bad key=1,v=has space,q=\"x\",c=\u{1}x,fine=2");
        assert_eq!(i.members, ["ok=1", "fine=2"]);
    }

    #[test]
    fn an_unknown_pool_asks_for_nothing_and_later_lines_count() {
        assert_eq!(of("canarygate.pool=staging").asked_pool, None);
        let i = parse(["a=1".as_bytes(), "canarygate.pool=production".as_bytes()]);
        assert_eq!(i.asked_pool, Some(PoolKind::Production));
    }

    #[test]
    fn the_proxys_members_come_first_and_are_never_crowded_out() {
        let fillers: Vec<String> = (0..300).map(|i| format!("k{i}=v")).collect();
        let mut line = fillers.join(",");
        line.push_str(",theme=evil");
        let out = render(Some(PoolKind::Canary), &[("theme", "blue")], &of(&line)).unwrap();
        assert!(
            out.starts_with("canarygate.pool=canary,theme=blue,k0=v"),
            "{out}"
        );
        assert_eq!(out.split(',').count(), MAX_MEMBERS);
        assert!(!out.contains("evil"));
        let big = format!("big={}", "x".repeat(9000));
        let out = render(Some(PoolKind::Production), &[], &of(&big)).unwrap();
        assert_eq!(out, "canarygate.pool=production");
        assert!(out.len() <= MAX_BYTES);
    }

    #[test]
    fn flag_values_are_encoded() {
        let out = render(None, &[("note", "a b,c;d%")], &Incoming::default()).unwrap();
        assert_eq!(out, "note=a%20b%2Cc%3Bd%25");
        assert_eq!(render(None, &[], &Incoming::default()), None);
    }

    #[test]
    fn only_a_header_naming_canarygate_needs_rewriting() {
        assert!(mentions_canarygate(
            ["a=1,CanaryGate.pool=canary".as_bytes()].into_iter()
        ));
        assert!(!mentions_canarygate(["a=1,b=2".as_bytes()].into_iter()));
    }
}
