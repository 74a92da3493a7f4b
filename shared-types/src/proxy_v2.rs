//! The PROXY protocol version 2 header (HAProxy's binary format): decode and
//! encode, byte-level, with no I/O.
//!
//! A header is 16 fixed bytes (the 12-byte [`SIGNATURE`], a version/command
//! byte, a family/transport byte and a big-endian length), then that many
//! bytes: the address block of the family, then TLVs.
//!
//! Reading one off a socket without eating payload bytes:
//!
//! 1. read until [`decode`] stops answering [`Decoded::Incomplete`] with
//!    `needed_total: 16` (the fixed part is checked byte by byte as it
//!    arrives, so a peer that sends no header is refused on its first byte);
//! 2. it then answers `Incomplete { needed_total: 16 + declared length }`:
//!    read exactly up to that many bytes in total;
//! 3. [`Decoded::Complete`] gives the header and `len`, the number of bytes it
//!    took; everything after `len` is payload.
//!
//! Decode only on listeners configured to expect the header, and only from
//! trusted senders: the spec (section 5) warns against sniffing for it, since
//! any client could then claim any source address.
//!
//! What the spec leaves to the receiver, and what this decoder does:
//! - `LOCAL` (health checks from the proxy itself): the spec says to discard
//!   the block *including the family*, so the family byte is not checked and
//!   the block is skipped (its declared length is still honoured). The header
//!   decodes as [`Header::local`].
//! - `AF_UNSPEC` under `PROXY`: the spec says to ignore the address
//!   information, whose length it does not define, so the whole block is
//!   skipped and no TLVs are read.
//! - TLVs are returned as they came, in order, unknown types included. Their
//!   values are not interpreted: [`PP2_TYPE_SSL`] keeps its sub-TLVs inside its
//!   value, and a [`PP2_TYPE_CRC32C`] checksum is **not** verified (the spec
//!   lets a receiver that does not support it ignore it).
//!
//! Every [`DecodeError`] means the peer sent bytes that are not an acceptable
//! PROXY v2 header: the connection should be closed; retrying the same bytes
//! gives the same answer.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// The 12 bytes every v2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The fixed part of a header: signature, version/command, family/transport
/// and the 2-byte length of the rest.
pub const FIXED_LEN: usize = 16;

/// The longest header the format can express: the fixed part plus a
/// `u16::MAX`-byte block.
pub const MAX_HEADER_LEN: usize = FIXED_LEN + u16::MAX as usize;

/// The header length (all of it, the 16 fixed bytes included) we accept unless
/// a listener is configured otherwise: 4096 bytes.
///
/// The spec's own sample receiver reads into a 232-byte buffer (16 + the
/// 216-byte UNIX address block), and 536 bytes (the smallest IPv4 MSS) is a
/// common limit, but senders that forward TLS details go past both: HAProxy's
/// SSL TLV (version, cipher, signature and key algorithms, client certificate
/// CN) plus an AUTHORITY (SNI, up to 255 bytes) and a UNIQUE_ID (up to 128)
/// after an IPv6 block comes to about 600 bytes, and cloud load balancers add
/// their own TLVs. 4096 leaves room for all of that and bounds what one
/// connection can make us buffer before it has said who it is to one page. A
/// sender with more to say needs the limit raised (up to [`MAX_HEADER_LEN`]);
/// [`DecodeError::TooLong`] says so.
pub const DEFAULT_MAX_LEN: usize = 4096;

/// The length of one AF_UNIX address in the block (`sun_path`, NUL-padded).
pub const UNIX_ADDR_LEN: usize = 108;

/// TLV type: the ALPN protocol the client negotiated (e.g. `h2`).
pub const PP2_TYPE_ALPN: u8 = 0x01;
/// TLV type: the host name the client asked for (TLS SNI), UTF-8.
pub const PP2_TYPE_AUTHORITY: u8 = 0x02;
/// TLV type: a CRC32C of the header. Not verified by [`decode`].
pub const PP2_TYPE_CRC32C: u8 = 0x03;
/// TLV type: padding, to be ignored.
pub const PP2_TYPE_NOOP: u8 = 0x04;
/// TLV type: an opaque connection id of up to 128 bytes.
pub const PP2_TYPE_UNIQUE_ID: u8 = 0x05;
/// TLV type: TLS details of the client connection (flags, verify result, then
/// sub-TLVs), kept whole in the value.
pub const PP2_TYPE_SSL: u8 = 0x20;
/// TLV type: the name of the network namespace the connection came in on.
pub const PP2_TYPE_NETNS: u8 = 0x30;

/// What a PROXY v1 (text) header starts with.
const V1_PREFIX: &[u8] = b"PROXY ";
const INET_BLOCK: usize = 4 + 4 + 2 + 2;
const INET6_BLOCK: usize = 16 + 16 + 2 + 2;
const UNIX_BLOCK: usize = 2 * UNIX_ADDR_LEN;
const TLV_HEAD: usize = 3;

/// The command in a header's 13th byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// The sender opened the connection itself (a health check): use the
    /// connection's real endpoints.
    Local,
    /// The sender relays a connection whose endpoints the header carries.
    Proxy,
}

/// The transport of the relayed connection (low nibble of the 14th byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// `SOCK_STREAM`: TCP or a UNIX stream socket.
    Stream,
    /// `SOCK_DGRAM`: UDP or a UNIX datagram socket.
    Dgram,
}

/// The endpoints of the relayed connection, by address family.
///
/// Only the combinations the spec allows can be expressed: `AF_UNSPEC` has no
/// transport, every other family has one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Addresses {
    /// No addresses (always the case for a decoded `LOCAL` header).
    Unspec,
    /// IPv4.
    Inet {
        transport: Transport,
        src: SocketAddrV4,
        dst: SocketAddrV4,
    },
    /// IPv6. Flow info and scope id are not carried: they encode as nothing
    /// and decode as 0.
    Inet6 {
        transport: Transport,
        src: SocketAddrV6,
        dst: SocketAddrV6,
    },
    /// AF_UNIX: each address as sent, 108 NUL-padded bytes (the path is what
    /// precedes the first NUL; a Linux abstract address starts with one).
    Unix {
        transport: Transport,
        src: Box<[u8; UNIX_ADDR_LEN]>,
        dst: Box<[u8; UNIX_ADDR_LEN]>,
    },
}

impl Addresses {
    /// The family/transport byte.
    fn family_byte(&self) -> u8 {
        let (family, transport) = match self {
            Addresses::Unspec => return 0x00,
            Addresses::Inet { transport, .. } => (0x10, transport),
            Addresses::Inet6 { transport, .. } => (0x20, transport),
            Addresses::Unix { transport, .. } => (0x30, transport),
        };
        family
            | match transport {
                Transport::Stream => 0x01,
                Transport::Dgram => 0x02,
            }
    }

    fn block_len(&self) -> usize {
        match self {
            Addresses::Unspec => 0,
            Addresses::Inet { .. } => INET_BLOCK,
            Addresses::Inet6 { .. } => INET6_BLOCK,
            Addresses::Unix { .. } => UNIX_BLOCK,
        }
    }
}

/// One type-length-value entry after the address block.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tlv {
    /// The type (`PP2_TYPE_*`, or anything else: unknown types are kept).
    pub kind: u8,
    /// The value, at most 65535 bytes.
    pub value: Vec<u8>,
}

/// A PROXY v2 header.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Header {
    pub command: Command,
    pub addresses: Addresses,
    /// In the order they came (or are to be sent).
    pub tlvs: Vec<Tlv>,
}

impl Header {
    /// The header the NLB sends ahead of a relayed TCP connection from `src`
    /// to `dst`, with no TLVs. When one address is IPv4 and the other IPv6,
    /// the IPv4 one is sent as its IPv4-mapped IPv6 address (`::ffff:a.b.c.d`)
    /// so both fit one family.
    pub fn proxy(src: SocketAddr, dst: SocketAddr) -> Header {
        let addresses = match (src, dst) {
            (SocketAddr::V4(src), SocketAddr::V4(dst)) => Addresses::Inet {
                transport: Transport::Stream,
                src,
                dst,
            },
            (src, dst) => Addresses::Inet6 {
                transport: Transport::Stream,
                src: as_v6(src),
                dst: as_v6(dst),
            },
        };
        Header {
            command: Command::Proxy,
            addresses,
            tlvs: Vec::new(),
        }
    }

    /// A `LOCAL` header with no addresses and no TLVs (what a sender writes
    /// on its own health-check connections).
    pub fn local() -> Header {
        Header {
            command: Command::Local,
            addresses: Addresses::Unspec,
            tlvs: Vec::new(),
        }
    }

    /// The original client address: `None` for `LOCAL` (use the connection's
    /// peer address), `AF_UNSPEC` and AF_UNIX. An IPv4 client relayed as an
    /// IPv4-mapped IPv6 address comes back as such
    /// ([`std::net::IpAddr::to_canonical`] turns it back into IPv4).
    pub fn source(&self) -> Option<SocketAddr> {
        match (self.command, &self.addresses) {
            (Command::Proxy, Addresses::Inet { src, .. }) => Some(SocketAddr::V4(*src)),
            (Command::Proxy, Addresses::Inet6 { src, .. }) => Some(SocketAddr::V6(*src)),
            _ => None,
        }
    }

    /// The address the client connected to, with the same `None` cases as
    /// [`Header::source`].
    pub fn destination(&self) -> Option<SocketAddr> {
        match (self.command, &self.addresses) {
            (Command::Proxy, Addresses::Inet { dst, .. }) => Some(SocketAddr::V4(*dst)),
            (Command::Proxy, Addresses::Inet6 { dst, .. }) => Some(SocketAddr::V6(*dst)),
            _ => None,
        }
    }

    /// The value of the first TLV of type `kind`.
    pub fn tlv(&self, kind: u8) -> Option<&[u8]> {
        self.tlvs
            .iter()
            .find(|tlv| tlv.kind == kind)
            .map(|tlv| tlv.value.as_slice())
    }
}

fn as_v6(addr: SocketAddr) -> SocketAddrV6 {
    match addr {
        SocketAddr::V4(a) => SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0),
        SocketAddr::V6(a) => SocketAddrV6::new(*a.ip(), a.port(), 0, 0),
    }
}

/// What [`decode`] found in the bytes it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A whole header; it took the first `len` bytes of the buffer, the rest
    /// is payload.
    Complete { header: Header, len: usize },
    /// The bytes so far are a valid start of a header; `needed_total` bytes
    /// in all (not more to read) are needed to go on. Reading exactly up to
    /// that never reads past the header.
    Incomplete { needed_total: usize },
}

/// Bytes that are not an acceptable PROXY v2 header. All come from the peer;
/// none is worth retrying on the same connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error(
        "PROXY v2 header: signature mismatch at byte {at} (got {found:#04x}, expected {expected:#04x}): \
         the peer sent no PROXY v2 header (is the sender configured to send one, \
         and is this listener meant to expect one?)"
    )]
    NoSignature { at: usize, found: u8, expected: u8 },

    #[error(
        "PROXY v2 header: the peer sent a PROXY v1 (text) header, which is not supported: \
         configure the sender for version 2 (HAProxy: send-proxy-v2 instead of send-proxy)"
    )]
    Version1,

    #[error(
        "PROXY v2 header: protocol version {version} (byte 12), only version 2 is supported: \
         the sender speaks a PROXY protocol version this listener does not"
    )]
    UnsupportedVersion { version: u8 },

    #[error(
        "PROXY v2 header: unknown command {command:#x} (byte 12; expected 0x0 LOCAL or 0x1 PROXY): \
         the sender is broken or is not speaking the PROXY protocol"
    )]
    UnknownCommand { command: u8 },

    #[error(
        "PROXY v2 header: unknown address family/transport {byte:#04x} (byte 13; expected one of \
         0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32): the sender is broken or is not speaking \
         the PROXY protocol"
    )]
    UnknownFamily { byte: u8 },

    #[error(
        "PROXY v2 header: declared length {declared} is shorter than the {needed}-byte {family} \
         address block: the sender wrote a truncated header"
    )]
    AddressesTruncated {
        family: &'static str,
        declared: usize,
        needed: usize,
    },

    #[error(
        "PROXY v2 header: {total} bytes declared, above this listener's limit of {max_len}: \
         raise the limit if the sender's TLVs are legitimately that large, \
         otherwise the sender is broken"
    )]
    TooLong { total: usize, max_len: usize },

    #[error(
        "PROXY v2 header: {remaining} byte(s) left at byte {offset}, too few for a TLV (3 at least): \
         the sender wrote a malformed TLV block"
    )]
    TlvTruncated { offset: usize, remaining: usize },

    #[error(
        "PROXY v2 header: TLV of type {kind:#04x} at byte {offset} declares {value_len} value bytes \
         but only {remaining} are left in the header: the sender wrote a malformed TLV block"
    )]
    TlvOverrun {
        offset: usize,
        kind: u8,
        value_len: usize,
        remaining: usize,
    },
}

/// A header that cannot be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error(
        "PROXY v2 header: addresses and TLVs come to {len} bytes, above the 65535 the length \
         field can carry: send fewer or shorter TLVs"
    )]
    TooLong { len: usize },
}

/// How the block after the fixed part is to be read.
#[derive(Clone, Copy)]
enum Block {
    /// `LOCAL` or `AF_UNSPEC`: skipped whole.
    Skip,
    Inet(Transport),
    Inet6(Transport),
    Unix(Transport),
}

impl Block {
    fn for_family(byte: u8) -> Result<Block, DecodeError> {
        Ok(match byte {
            0x00 => Block::Skip,
            0x11 => Block::Inet(Transport::Stream),
            0x12 => Block::Inet(Transport::Dgram),
            0x21 => Block::Inet6(Transport::Stream),
            0x22 => Block::Inet6(Transport::Dgram),
            0x31 => Block::Unix(Transport::Stream),
            0x32 => Block::Unix(Transport::Dgram),
            byte => return Err(DecodeError::UnknownFamily { byte }),
        })
    }

    fn addresses_len(self) -> usize {
        match self {
            Block::Skip => 0,
            Block::Inet(_) => INET_BLOCK,
            Block::Inet6(_) => INET6_BLOCK,
            Block::Unix(_) => UNIX_BLOCK,
        }
    }

    fn family_name(self) -> &'static str {
        match self {
            Block::Skip => "AF_UNSPEC",
            Block::Inet(_) => "AF_INET",
            Block::Inet6(_) => "AF_INET6",
            Block::Unix(_) => "AF_UNIX",
        }
    }
}

/// Decodes the PROXY v2 header at the start of `buf`, accepting headers of at
/// most `max_len` bytes in all ([`DEFAULT_MAX_LEN`] unless configured).
///
/// Never reads past the header, never panics, and reports an error as soon as
/// the bytes present rule a header out.
pub fn decode(buf: &[u8], max_len: usize) -> Result<Decoded, DecodeError> {
    const NEED_FIXED: Decoded = Decoded::Incomplete {
        needed_total: FIXED_LEN,
    };

    if let Some((at, (&found, &expected))) = buf
        .iter()
        .zip(SIGNATURE.iter())
        .enumerate()
        .find(|(_, (got, want))| got != want)
    {
        if buf.starts_with(V1_PREFIX) {
            return Err(DecodeError::Version1);
        }
        return Err(DecodeError::NoSignature {
            at,
            found,
            expected,
        });
    }

    let Some(&ver_cmd) = buf.get(12) else {
        return Ok(NEED_FIXED);
    };
    let version = ver_cmd >> 4;
    if version != 2 {
        return Err(DecodeError::UnsupportedVersion { version });
    }
    let command = match ver_cmd & 0x0f {
        0x0 => Command::Local,
        0x1 => Command::Proxy,
        command => return Err(DecodeError::UnknownCommand { command }),
    };

    let Some(&family) = buf.get(13) else {
        return Ok(NEED_FIXED);
    };
    let block = match command {
        // The spec: discard the block of a LOCAL header, family included.
        Command::Local => Block::Skip,
        Command::Proxy => Block::for_family(family)?,
    };

    let Some(&[hi, lo]) = buf.get(14..FIXED_LEN) else {
        return Ok(NEED_FIXED);
    };
    let declared = usize::from(u16::from_be_bytes([hi, lo]));
    let needed = block.addresses_len();
    if declared < needed {
        return Err(DecodeError::AddressesTruncated {
            family: block.family_name(),
            declared,
            needed,
        });
    }
    let total = FIXED_LEN + declared;
    if total > max_len {
        return Err(DecodeError::TooLong { total, max_len });
    }
    let Some(rest) = buf.get(FIXED_LEN..total) else {
        return Ok(Decoded::Incomplete {
            needed_total: total,
        });
    };

    let truncated = || DecodeError::AddressesTruncated {
        family: block.family_name(),
        declared,
        needed,
    };
    let mut rest = rest;
    let addresses = match block {
        Block::Skip => {
            return Ok(Decoded::Complete {
                header: Header {
                    command,
                    addresses: Addresses::Unspec,
                    tlvs: Vec::new(),
                },
                len: total,
            })
        }
        Block::Inet(transport) => {
            let [a, b, c, d] = take::<4>(&mut rest).ok_or_else(truncated)?;
            let [e, f, g, h] = take::<4>(&mut rest).ok_or_else(truncated)?;
            let sport = take::<2>(&mut rest).ok_or_else(truncated)?;
            let dport = take::<2>(&mut rest).ok_or_else(truncated)?;
            Addresses::Inet {
                transport,
                src: SocketAddrV4::new(Ipv4Addr::new(a, b, c, d), u16::from_be_bytes(sport)),
                dst: SocketAddrV4::new(Ipv4Addr::new(e, f, g, h), u16::from_be_bytes(dport)),
            }
        }
        Block::Inet6(transport) => {
            let src = take::<16>(&mut rest).ok_or_else(truncated)?;
            let dst = take::<16>(&mut rest).ok_or_else(truncated)?;
            let sport = take::<2>(&mut rest).ok_or_else(truncated)?;
            let dport = take::<2>(&mut rest).ok_or_else(truncated)?;
            Addresses::Inet6 {
                transport,
                src: SocketAddrV6::new(Ipv6Addr::from(src), u16::from_be_bytes(sport), 0, 0),
                dst: SocketAddrV6::new(Ipv6Addr::from(dst), u16::from_be_bytes(dport), 0, 0),
            }
        }
        Block::Unix(transport) => {
            let src = take::<UNIX_ADDR_LEN>(&mut rest).ok_or_else(truncated)?;
            let dst = take::<UNIX_ADDR_LEN>(&mut rest).ok_or_else(truncated)?;
            Addresses::Unix {
                transport,
                src: Box::new(src),
                dst: Box::new(dst),
            }
        }
    };
    let tlvs = decode_tlvs(rest, FIXED_LEN + needed)?;
    Ok(Decoded::Complete {
        header: Header {
            command,
            addresses,
            tlvs,
        },
        len: total,
    })
}

/// The first `N` bytes of `bytes`, advancing it past them.
fn take<const N: usize>(bytes: &mut &[u8]) -> Option<[u8; N]> {
    let (head, rest) = bytes.split_first_chunk::<N>()?;
    *bytes = rest;
    Some(*head)
}

/// The TLVs filling `bytes`, which start at byte `offset` of the header.
fn decode_tlvs(mut bytes: &[u8], mut offset: usize) -> Result<Vec<Tlv>, DecodeError> {
    let mut tlvs = Vec::new();
    while !bytes.is_empty() {
        let Some([kind, hi, lo]) = take::<TLV_HEAD>(&mut bytes) else {
            return Err(DecodeError::TlvTruncated {
                offset,
                remaining: bytes.len(),
            });
        };
        let value_len = usize::from(u16::from_be_bytes([hi, lo]));
        let Some((value, rest)) = bytes.split_at_checked(value_len) else {
            return Err(DecodeError::TlvOverrun {
                offset,
                kind,
                value_len,
                remaining: bytes.len(),
            });
        };
        tlvs.push(Tlv {
            kind,
            value: value.to_vec(),
        });
        bytes = rest;
        offset += TLV_HEAD + value_len;
    }
    Ok(tlvs)
}

/// The bytes of `header`.
pub fn encode(header: &Header) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    encode_into(header, &mut out)?;
    Ok(out)
}

/// Appends the bytes of `header` to `out`; on error `out` is left as it was.
///
/// Writes what it is given: a `LOCAL` header with addresses or TLVs is
/// written with them (though [`decode`] skips them, as the spec says).
pub fn encode_into(header: &Header, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let len = header.addresses.block_len()
        + header
            .tlvs
            .iter()
            .map(|tlv| TLV_HEAD + tlv.value.len())
            .sum::<usize>();
    let declared = u16::try_from(len).map_err(|_| EncodeError::TooLong { len })?;

    out.reserve(FIXED_LEN + len);
    out.extend_from_slice(&SIGNATURE);
    out.push(match header.command {
        Command::Local => 0x20,
        Command::Proxy => 0x21,
    });
    out.push(header.addresses.family_byte());
    out.extend_from_slice(&declared.to_be_bytes());
    match &header.addresses {
        Addresses::Unspec => {}
        Addresses::Inet { src, dst, .. } => {
            out.extend_from_slice(&src.ip().octets());
            out.extend_from_slice(&dst.ip().octets());
            out.extend_from_slice(&src.port().to_be_bytes());
            out.extend_from_slice(&dst.port().to_be_bytes());
        }
        Addresses::Inet6 { src, dst, .. } => {
            out.extend_from_slice(&src.ip().octets());
            out.extend_from_slice(&dst.ip().octets());
            out.extend_from_slice(&src.port().to_be_bytes());
            out.extend_from_slice(&dst.port().to_be_bytes());
        }
        Addresses::Unix { src, dst, .. } => {
            out.extend_from_slice(&src[..]);
            out.extend_from_slice(&dst[..]);
        }
    }
    for tlv in &header.tlvs {
        out.push(tlv.kind);
        // Fits: the whole block, this value included, is at most u16::MAX.
        out.extend_from_slice(&(tlv.value.len() as u16).to_be_bytes());
        out.extend_from_slice(&tlv.value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn complete(buf: &[u8]) -> (Header, usize) {
        match decode(buf, MAX_HEADER_LEN) {
            Ok(Decoded::Complete { header, len }) => (header, len),
            other => panic!("expected a complete header, got {other:?}"),
        }
    }

    fn decode_err(buf: &[u8]) -> DecodeError {
        match decode(buf, MAX_HEADER_LEN) {
            Err(e) => e,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    /// Fixed part with these two bytes and declared length, then `rest`.
    fn raw(ver_cmd: u8, family: u8, declared: u16, rest: &[u8]) -> Vec<u8> {
        let mut b = SIGNATURE.to_vec();
        b.extend_from_slice(&[ver_cmd, family]);
        b.extend_from_slice(&declared.to_be_bytes());
        b.extend_from_slice(rest);
        b
    }

    fn unix_addr(path: &str) -> Box<[u8; UNIX_ADDR_LEN]> {
        let mut a = [0u8; UNIX_ADDR_LEN];
        a[..path.len()].copy_from_slice(path.as_bytes());
        Box::new(a)
    }

    fn sample_tlvs() -> Vec<Tlv> {
        vec![
            Tlv {
                kind: PP2_TYPE_ALPN,
                value: b"h2".to_vec(),
            },
            Tlv {
                kind: PP2_TYPE_AUTHORITY,
                value: b"example.com".to_vec(),
            },
            Tlv {
                kind: PP2_TYPE_NOOP,
                value: Vec::new(),
            },
            Tlv {
                kind: 0xEA,
                value: vec![0x01, 0xff, 0x00],
            },
        ]
    }

    /// A header of every shape, for the round-trip and prefix tests.
    fn samples() -> Vec<Header> {
        let with_tlvs = |mut h: Header| {
            h.tlvs = sample_tlvs();
            h
        };
        vec![
            Header::proxy(addr("192.0.2.1:56324"), addr("198.51.100.7:443")),
            with_tlvs(Header::proxy(
                addr("192.0.2.1:56324"),
                addr("198.51.100.7:443"),
            )),
            Header::proxy(addr("[2001:db8::1]:40000"), addr("[2001:db8::2]:8443")),
            with_tlvs(Header::proxy(
                addr("[2001:db8::1]:40000"),
                addr("198.51.100.7:443"),
            )),
            Header {
                command: Command::Proxy,
                addresses: Addresses::Inet {
                    transport: Transport::Dgram,
                    src: "192.0.2.1:53".parse().unwrap(),
                    dst: "198.51.100.7:5353".parse().unwrap(),
                },
                tlvs: Vec::new(),
            },
            Header {
                command: Command::Proxy,
                addresses: Addresses::Unix {
                    transport: Transport::Stream,
                    src: unix_addr("/run/client.sock"),
                    dst: unix_addr("/run/switchyard.sock"),
                },
                tlvs: sample_tlvs(),
            },
            Header::local(),
            Header {
                command: Command::Proxy,
                addresses: Addresses::Unspec,
                tlvs: Vec::new(),
            },
        ]
    }

    /// What HAProxy sends for a TCP connection from 192.0.2.1:56324 to
    /// 198.51.100.7:443, written byte by byte from the spec.
    const HAPROXY_TCP4: [u8; 28] = [
        0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a, // signature
        0x21, // version 2, PROXY
        0x11, // AF_INET, STREAM
        0x00, 0x0c, // 12 bytes follow
        192, 0, 2, 1, // source address
        198, 51, 100, 7, // destination address
        0xdc, 0x04, // source port 56324
        0x01, 0xbb, // destination port 443
    ];

    #[test]
    fn decodes_a_header_written_from_the_spec() {
        let mut buf = HAPROXY_TCP4.to_vec();
        buf.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let (header, len) = complete(&buf);
        assert_eq!(len, 28);
        assert_eq!(header.command, Command::Proxy);
        assert_eq!(
            header.addresses,
            Addresses::Inet {
                transport: Transport::Stream,
                src: "192.0.2.1:56324".parse().unwrap(),
                dst: "198.51.100.7:443".parse().unwrap(),
            }
        );
        assert!(header.tlvs.is_empty());
        assert_eq!(header.source(), Some(addr("192.0.2.1:56324")));
        assert_eq!(header.destination(), Some(addr("198.51.100.7:443")));
        assert_eq!(&buf[len..], b"GET / HTTP/1.1\r\n");
    }

    #[test]
    fn encodes_the_header_haproxy_sends() {
        let header = Header::proxy(addr("192.0.2.1:56324"), addr("198.51.100.7:443"));
        assert_eq!(encode(&header).unwrap(), HAPROXY_TCP4);
    }

    #[test]
    fn decodes_tlvs_written_by_hand() {
        // TCP over IPv6 [2001:db8::1]:1234 -> [2001:db8::2]:443, then ALPN "h2"
        // and a CRC32C whose (wrong) value is not checked.
        let mut rest = Vec::new();
        rest.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        rest.extend_from_slice(&"2001:db8::2".parse::<Ipv6Addr>().unwrap().octets());
        rest.extend_from_slice(&[0x04, 0xd2, 0x01, 0xbb]);
        rest.extend_from_slice(&[0x01, 0x00, 0x02, b'h', b'2']);
        rest.extend_from_slice(&[0x03, 0x00, 0x04, 0xde, 0xad, 0xbe, 0xef]);
        let buf = raw(0x21, 0x21, 36 + 5 + 7, &rest);
        let (header, len) = complete(&buf);
        assert_eq!(len, buf.len());
        assert_eq!(header.source(), Some(addr("[2001:db8::1]:1234")));
        assert_eq!(header.destination(), Some(addr("[2001:db8::2]:443")));
        assert_eq!(header.tlv(PP2_TYPE_ALPN), Some(&b"h2"[..]));
        assert_eq!(
            header.tlv(PP2_TYPE_CRC32C),
            Some(&[0xde, 0xad, 0xbe, 0xef][..])
        );
        assert_eq!(header.tlv(PP2_TYPE_SSL), None);
    }

    #[test]
    fn every_sample_round_trips_byte_for_byte() {
        for header in samples() {
            let bytes = encode(&header).unwrap();
            let (decoded, len) = complete(&bytes);
            assert_eq!(decoded, header);
            assert_eq!(len, bytes.len());
            assert_eq!(encode(&decoded).unwrap(), bytes);
        }
    }

    #[test]
    fn a_mixed_pair_is_sent_as_ipv6_with_the_ipv4_one_mapped() {
        let header = Header::proxy(addr("192.0.2.1:56324"), addr("[2001:db8::2]:443"));
        let (decoded, _) = complete(&encode(&header).unwrap());
        assert_eq!(decoded.source(), Some(addr("[::ffff:192.0.2.1]:56324")));
        assert_eq!(decoded.destination(), Some(addr("[2001:db8::2]:443")));
        let canonical = decoded.source().unwrap().ip().to_canonical();
        assert_eq!(canonical, "192.0.2.1".parse::<std::net::IpAddr>().unwrap());

        let header = Header::proxy(addr("[2001:db8::1]:40000"), addr("198.51.100.7:443"));
        assert_eq!(
            header.destination(),
            Some(addr("[::ffff:198.51.100.7]:443"))
        );
    }

    #[test]
    fn source_is_none_where_the_connection_endpoints_apply() {
        assert_eq!(Header::local().source(), None);
        let unspec = Header {
            command: Command::Proxy,
            addresses: Addresses::Unspec,
            tlvs: Vec::new(),
        };
        assert_eq!(unspec.source(), None);
        let unix = &samples()[5];
        assert!(matches!(unix.addresses, Addresses::Unix { .. }));
        assert_eq!(unix.source(), None);
        assert_eq!(unix.destination(), None);
        // LOCAL never has one, even when built with addresses.
        let mut local = Header::proxy(addr("192.0.2.1:1"), addr("192.0.2.2:2"));
        local.command = Command::Local;
        assert_eq!(local.source(), None);
    }

    #[test]
    fn every_prefix_of_a_valid_header_is_incomplete_with_the_right_total() {
        for header in samples() {
            let bytes = encode(&header).unwrap();
            for cut in 0..bytes.len() {
                let want = if cut < FIXED_LEN {
                    FIXED_LEN
                } else {
                    bytes.len()
                };
                assert_eq!(
                    decode(&bytes[..cut], MAX_HEADER_LEN),
                    Ok(Decoded::Incomplete { needed_total: want }),
                    "prefix of {cut} bytes of {header:?}"
                );
            }
        }
    }

    #[test]
    fn bytes_after_the_header_are_not_consumed() {
        for header in samples() {
            let mut bytes = encode(&header).unwrap();
            let header_len = bytes.len();
            // Payload that itself looks like a header must not be touched.
            bytes.extend_from_slice(&HAPROXY_TCP4);
            let (decoded, len) = complete(&bytes);
            assert_eq!(len, header_len);
            assert_eq!(decoded, header);
        }
    }

    #[test]
    fn local_skips_its_block_whatever_it_holds() {
        // Addresses, a TLV and an unassigned family byte: all ignored, as the
        // spec tells a receiver, but the declared length is still consumed.
        let mut rest = HAPROXY_TCP4[16..].to_vec();
        rest.extend_from_slice(&[0x01, 0x00, 0x02, b'h', b'2']);
        for family in [0x00, 0x11, 0xff] {
            let mut buf = raw(0x20, family, 17, &rest);
            buf.extend_from_slice(b"payload");
            let (header, len) = complete(&buf);
            assert_eq!(header, Header::local());
            assert_eq!(len, 16 + 17);
        }
    }

    #[test]
    fn proxy_unspec_skips_its_block() {
        let buf = raw(0x21, 0x00, 3, &[0xaa, 0xbb, 0xcc]);
        let (header, len) = complete(&buf);
        assert_eq!(header.addresses, Addresses::Unspec);
        assert!(header.tlvs.is_empty());
        assert_eq!(len, 19);
    }

    #[test]
    fn no_signature_is_reported_on_the_first_wrong_byte() {
        let mut buf = SIGNATURE[..3].to_vec();
        buf.push(b'X');
        let err = decode_err(&buf);
        assert_eq!(
            err,
            DecodeError::NoSignature {
                at: 3,
                found: b'X',
                expected: 0x0a
            }
        );
        let msg = err.to_string();
        assert!(msg.contains("signature mismatch at byte 3"), "{msg}");
        assert!(
            msg.contains("is the sender configured to send one"),
            "{msg}"
        );

        // Plain HTTP, refused on its first byte.
        assert_eq!(
            decode_err(b"G"),
            DecodeError::NoSignature {
                at: 0,
                found: b'G',
                expected: b'\r'
            }
        );
    }

    #[test]
    fn a_v1_header_is_named_as_such() {
        let err = decode_err(b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\nGET /");
        assert_eq!(err, DecodeError::Version1);
        assert!(err.to_string().contains("PROXY v1"), "{err}");
        assert!(err.to_string().contains("send-proxy-v2"), "{err}");
        // Too short to tell: just not a v2 header.
        assert!(matches!(
            decode_err(b"PROX"),
            DecodeError::NoSignature { at: 0, .. }
        ));
    }

    #[test]
    fn other_versions_are_refused_as_soon_as_byte_12_arrives() {
        let mut buf = SIGNATURE.to_vec();
        buf.push(0x11);
        let err = decode_err(&buf);
        assert_eq!(err, DecodeError::UnsupportedVersion { version: 1 });
        assert!(err.to_string().contains("only version 2"), "{err}");
    }

    #[test]
    fn unknown_commands_are_refused() {
        let mut buf = SIGNATURE.to_vec();
        buf.push(0x22);
        let err = decode_err(&buf);
        assert_eq!(err, DecodeError::UnknownCommand { command: 2 });
        assert!(err.to_string().contains("unknown command 0x2"), "{err}");
    }

    #[test]
    fn unknown_families_are_refused_under_proxy() {
        // Unassigned family, unassigned transport, and combinations the spec
        // lists as invalid (UNSPEC transport with a family and vice versa).
        for family in [0x41, 0x13, 0x10, 0x01, 0x30, 0xff] {
            let mut buf = SIGNATURE.to_vec();
            buf.extend_from_slice(&[0x21, family]);
            let err = decode_err(&buf);
            assert_eq!(err, DecodeError::UnknownFamily { byte: family });
            assert!(err.to_string().contains("byte 13"), "{err}");
        }
    }

    #[test]
    fn a_length_too_short_for_the_addresses_is_refused() {
        let cases = [
            (0x11, 11, "AF_INET", 12),
            (0x22, 0, "AF_INET6", 36),
            (0x31, 215, "AF_UNIX", 216),
        ];
        for (family_byte, declared, family, needed) in cases {
            let err = decode_err(&raw(0x21, family_byte, declared, &[]));
            assert_eq!(
                err,
                DecodeError::AddressesTruncated {
                    family,
                    declared: usize::from(declared),
                    needed
                }
            );
            assert!(err.to_string().contains("truncated header"), "{err}");
        }
    }

    #[test]
    fn max_len_is_enforced_on_the_declared_length() {
        let header = &samples()[1];
        let bytes = encode(header).unwrap();
        assert!(matches!(
            decode(&bytes, bytes.len()),
            Ok(Decoded::Complete { .. })
        ));
        // Refused from the 16 fixed bytes alone, before reading the rest.
        let err = decode(&bytes[..FIXED_LEN], bytes.len() - 1).unwrap_err();
        assert_eq!(
            err,
            DecodeError::TooLong {
                total: bytes.len(),
                max_len: bytes.len() - 1
            }
        );
        assert!(err.to_string().contains("raise the limit"), "{err}");
        // A limit below the fixed part refuses everything without panicking.
        assert!(matches!(
            decode(&HAPROXY_TCP4, 0),
            Err(DecodeError::TooLong { .. })
        ));
    }

    #[test]
    fn default_max_len_takes_a_full_haproxy_tls_header() {
        let mut header = Header::proxy(addr("[2001:db8::1]:1"), addr("[2001:db8::2]:2"));
        header.tlvs = vec![
            Tlv {
                kind: PP2_TYPE_AUTHORITY,
                value: vec![b'a'; 255],
            },
            Tlv {
                kind: PP2_TYPE_UNIQUE_ID,
                value: vec![7; 128],
            },
            Tlv {
                kind: PP2_TYPE_SSL,
                value: vec![0; 300],
            },
        ];
        let bytes = encode(&header).unwrap();
        assert!(bytes.len() > 536);
        assert!(matches!(
            decode(&bytes, DEFAULT_MAX_LEN),
            Ok(Decoded::Complete { .. })
        ));
    }

    #[test]
    fn a_tlv_head_cut_short_is_refused() {
        let mut rest = HAPROXY_TCP4[16..].to_vec();
        rest.extend_from_slice(&[0x04, 0x00, 0x00, 0x01, 0x00]);
        let err = decode_err(&raw(0x21, 0x11, 12 + 5, &rest));
        assert_eq!(
            err,
            DecodeError::TlvTruncated {
                offset: 31,
                remaining: 2
            }
        );
        assert!(err.to_string().contains("malformed TLV block"), "{err}");
    }

    #[test]
    fn a_tlv_running_past_the_header_is_refused() {
        // The value would end in the payload: the TLV must not read it.
        let mut rest = HAPROXY_TCP4[16..].to_vec();
        rest.extend_from_slice(&[0x02, 0x00, 0x05, b'a', b'b']);
        let mut buf = raw(0x21, 0x11, 12 + 5, &rest);
        buf.extend_from_slice(b"cdefgh");
        let err = decode_err(&buf);
        assert_eq!(
            err,
            DecodeError::TlvOverrun {
                offset: 28,
                kind: 0x02,
                value_len: 5,
                remaining: 2
            }
        );
        assert!(err.to_string().contains("type 0x02 at byte 28"), "{err}");
    }

    #[test]
    fn encode_refuses_what_the_length_field_cannot_carry() {
        let mut header = Header::proxy(addr("192.0.2.1:1"), addr("192.0.2.2:2"));
        header.tlvs.push(Tlv {
            kind: PP2_TYPE_NOOP,
            value: vec![0; usize::from(u16::MAX) - 12 - 3],
        });
        let bytes = encode(&header).unwrap();
        assert_eq!(bytes.len(), MAX_HEADER_LEN);
        assert!(matches!(
            decode(&bytes, MAX_HEADER_LEN),
            Ok(Decoded::Complete {
                len: MAX_HEADER_LEN,
                ..
            })
        ));

        header.tlvs.push(Tlv {
            kind: PP2_TYPE_NOOP,
            value: Vec::new(),
        });
        let mut out = b"keep".to_vec();
        let err = encode_into(&header, &mut out).unwrap_err();
        assert_eq!(err, EncodeError::TooLong { len: 65538 });
        assert!(
            err.to_string().contains("send fewer or shorter TLVs"),
            "{err}"
        );
        assert_eq!(out, b"keep");
    }

    #[test]
    fn encode_into_appends() {
        let mut out = b"before".to_vec();
        encode_into(&Header::local(), &mut out).unwrap();
        assert_eq!(&out[..6], b"before");
        assert_eq!(&out[6..18], &SIGNATURE);
        assert_eq!(&out[18..], &[0x20, 0x00, 0x00, 0x00]);
    }
}
