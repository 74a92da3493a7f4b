//! Name patterns (TLS SNI, HTTP Host) and client CIDRs, as DESIGN.md decides.
//!
//! Names compare case-insensitively; a trailing dot and a port are ignored on
//! both sides. `*.example.com` matches any name ending in `.example.com` (one or
//! more labels), never `example.com` itself.

use std::cmp::Ordering;
use std::fmt;
use std::net::IpAddr;

/// A server-name pattern from `Route.destination_pattern`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NamePattern {
    /// Empty pattern: any name, and connections that carry none.
    Any,
    /// One exact name, normalized.
    Exact(String),
    /// `*.example.com`, stored as the suffix `.example.com`.
    Wildcard(String),
}

/// Lowercases a name and drops a port and a trailing dot. `[::1]:443` gives
/// `::1`; a bare IPv6 address keeps its colons.
pub fn normalize_name(name: &str) -> String {
    let name = name.trim();
    let host = if let Some(rest) = name.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else if name.matches(':').count() == 1 {
        name.split(':').next().unwrap_or(name)
    } else {
        name
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

impl NamePattern {
    /// Parses a pattern; the error says what is wrong with it.
    pub fn parse(pattern: &str) -> Result<Self, String> {
        let norm = normalize_name(pattern);
        if norm.is_empty() {
            return Ok(NamePattern::Any);
        }
        let (wild, body) = match norm.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, norm.as_str()),
        };
        if body.is_empty() || body.contains('*') {
            return Err(format!(
                "{pattern:?} is not a name pattern (use an exact name or *.domain)"
            ));
        }
        if let Some(bad) = body
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':')))
        {
            return Err(format!(
                "{pattern:?} has the character {bad:?}, not allowed in a name"
            ));
        }
        if body.split('.').any(str::is_empty) {
            return Err(format!("{pattern:?} has an empty label"));
        }
        Ok(if wild {
            NamePattern::Wildcard(format!(".{body}"))
        } else {
            NamePattern::Exact(body.to_string())
        })
    }

    /// Whether a normalized name (see [`normalize_name`]) matches.
    pub fn matches(&self, name: Option<&str>) -> bool {
        match (self, name) {
            (NamePattern::Any, _) => true,
            (_, None) => false,
            (NamePattern::Exact(want), Some(name)) => want == name,
            (NamePattern::Wildcard(suffix), Some(name)) => {
                name.len() > suffix.len() && name.ends_with(suffix.as_str())
            }
        }
    }

    /// Specificity for precedence: exact over wildcard, longer wildcard over
    /// shorter, anything over `Any`.
    pub fn specificity(&self) -> (u8, usize) {
        match self {
            NamePattern::Any => (0, 0),
            NamePattern::Wildcard(s) => (1, s.len()),
            NamePattern::Exact(s) => (2, s.len()),
        }
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NamePattern::Any => f.write_str("*"),
            NamePattern::Exact(s) => f.write_str(s),
            NamePattern::Wildcard(s) => write!(f, "*{s}"),
        }
    }
}

/// A client address range from `Route.source_pattern`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`) as plain IPv4.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl Cidr {
    /// Parses `10.0.0.0/8`, `2001:db8::/32` or a bare address (a /32 or /128).
    /// Host bits below the prefix are cleared.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address or CIDR"))?;
        let addr = canonical_ip(addr);
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix =
            match prefix {
                None => max,
                Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| {
                    format!("{text:?} has prefix length {p:?}, expected 0 to {max}")
                })?,
            };
        Ok(Cidr {
            addr: mask(addr, prefix),
            prefix,
        })
    }

    /// Whether the address is in the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix) == self.addr
    }

    /// The prefix length (larger is narrower).
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Narrowness for precedence, comparable across families: the number of
    /// host bits left, fewer is narrower.
    pub fn host_bits(&self) -> u8 {
        (if self.addr.is_ipv4() { 32 } else { 128 }) - self.prefix
    }
}

fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix))
            };
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix))
            };
            IpAddr::V6((bits & m).into())
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Orders optional CIDRs narrowest first (a CIDR is narrower than none).
pub fn cmp_cidr_narrowest_first(a: Option<&Cidr>, b: Option<&Cidr>) -> Ordering {
    let bits = |c: Option<&Cidr>| c.map_or(u16::MAX, |c| u16::from(c.host_bits()));
    bits(a).cmp(&bits(b))
}
