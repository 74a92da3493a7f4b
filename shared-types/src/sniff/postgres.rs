//! PostgreSQL: the first message a client sends.
//!
//! Every one starts with a big-endian int32 length (itself included) and an
//! int32 code, and the detector waits for the whole message:
//!
//! | message | code | length |
//! |---|---|---|
//! | SSLRequest | 80877103 | 8 |
//! | GSSENCRequest | 80877104 | 8 |
//! | CancelRequest | 80877102 | 16 to 268 (a 4-byte key, or up to 256 bytes from protocol 3.2 on), process id not 0 |
//! | StartupMessage | protocol version 3.x (`0x0003xxxx`) | 8 to 10,000 (the server's own limit), then `name\0value\0` pairs ending in one `\0`, names printable ASCII, with a `user` |
//!
//! So the first two bytes are always zero and a verdict on everything else
//! comes within 8 bytes for all but the StartupMessage. Protocol 2.0 (gone
//! since PostgreSQL 14) is not recognised. A client that opens with TLS
//! directly (`sslnegotiation=direct`, PostgreSQL 17) is TLS, with ALPN
//! `postgresql`.

use std::fmt;

use super::{Detect, Step, Verdict};

pub const SSL_REQUEST: u32 = 80_877_103;
pub const GSSENC_REQUEST: u32 = 80_877_104;
pub const CANCEL_REQUEST: u32 = 80_877_102;
/// The longest StartupMessage the server accepts (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_LEN: usize = 10_000;
/// A CancelRequest with the longest key protocol 3.2 allows (256 bytes).
pub const MAX_CANCEL_LEN: usize = 12 + 256;

/// Which opening message it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Message {
    Startup,
    SslRequest,
    GssEncRequest,
    CancelRequest,
}

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Message::Startup => "startup",
            Message::SslRequest => "ssl_request",
            Message::GssEncRequest => "gssenc_request",
            Message::CancelRequest => "cancel_request",
        })
    }
}

/// Reads the PostgreSQL message at the start of `buf`.
pub fn first_message(buf: &[u8]) -> Verdict<Message> {
    Detector::once(buf)
}

#[derive(Debug, Default)]
pub(crate) struct Detector;

impl Detect for Detector {
    type Found = Message;

    fn step(&mut self, buf: &[u8]) -> Step<Message> {
        // A length of at most 10,000: two zero bytes first.
        if buf.iter().take(2).any(|&b| b != 0) {
            return Step::NoMatch;
        }
        if buf.len() < 4 {
            return Step::NeedMore(buf.len() + 1);
        }
        let len = be32(&buf[..4]) as usize;
        if !(8..=MAX_STARTUP_LEN).contains(&len) {
            return Step::NoMatch;
        }
        // The code's first two bytes: 0x04d2 (1234, the special requests) or
        // 0x0003 (protocol 3).
        match buf.get(4..buf.len().min(6)).unwrap_or_default() {
            [] | [0] | [4] | [0, 3] | [4, 0xd2] => {}
            _ => return Step::NoMatch,
        }
        if buf.len() < 8 {
            return Step::NeedMore(buf.len() + 1);
        }
        let (message, fits) = match be32(&buf[4..8]) {
            SSL_REQUEST => (Message::SslRequest, len == 8),
            GSSENC_REQUEST => (Message::GssEncRequest, len == 8),
            CANCEL_REQUEST => (Message::CancelRequest, (16..=MAX_CANCEL_LEN).contains(&len)),
            code if code >> 16 == 3 => (Message::Startup, len > 8),
            _ => return Step::NoMatch,
        };
        if !fits {
            return Step::NoMatch;
        }
        if buf.len() < len {
            return Step::NeedMore(len);
        }
        let ok = match message {
            Message::CancelRequest => be32(&buf[8..12]) != 0,
            Message::Startup => startup_parameters_ok(&buf[8..len]),
            Message::SslRequest | Message::GssEncRequest => true,
        };
        if ok {
            Step::Match(message)
        } else {
            Step::NoMatch
        }
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// `name\0value\0 ... \0`, exactly filling `params`, names non-empty
/// printable ASCII, one of them `user`.
fn startup_parameters_ok(params: &[u8]) -> bool {
    let Some((&0, mut rest)) = params.split_last() else {
        return false;
    };
    let mut user = false;
    while !rest.is_empty() {
        let Some(name_end) = rest.iter().position(|&b| b == 0) else {
            return false;
        };
        let name = &rest[..name_end];
        if name.is_empty() || !name.iter().all(|b| (0x21..=0x7e).contains(b)) {
            return false;
        }
        user |= name == b"user";
        let value = &rest[name_end + 1..];
        let Some(value_end) = value.iter().position(|&b| b == 0) else {
            return false;
        };
        rest = &value[value_end + 1..];
    }
    user
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(params: &[(&str, &str)]) -> Vec<u8> {
        let mut body = 0x0003_0000u32.to_be_bytes().to_vec();
        for (k, v) in params {
            body.extend(k.as_bytes());
            body.push(0);
            body.extend(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut msg = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        msg.extend(body);
        msg
    }

    fn special(len: u32, code: u32, rest: &[u8]) -> Vec<u8> {
        [&len.to_be_bytes()[..], &code.to_be_bytes(), rest].concat()
    }

    #[test]
    fn recognises_each_opening_message() {
        let s = startup(&[("user", "app"), ("database", "db")]);
        assert_eq!(first_message(&s), Verdict::Match(Message::Startup));
        assert_eq!(first_message(&s[..s.len() - 1]), Verdict::NeedMore);
        assert_eq!(
            first_message(&special(8, SSL_REQUEST, &[])),
            Verdict::Match(Message::SslRequest)
        );
        assert_eq!(
            first_message(&special(8, GSSENC_REQUEST, &[])),
            Verdict::Match(Message::GssEncRequest)
        );
        let cancel = special(16, CANCEL_REQUEST, &[0, 0, 0x30, 0x39, 1, 2, 3, 4]);
        assert_eq!(
            first_message(&cancel),
            Verdict::Match(Message::CancelRequest)
        );
        let mut long_key = special(12 + 32, CANCEL_REQUEST, &[0, 0, 0, 7]);
        long_key.extend([9; 32]);
        assert_eq!(
            first_message(&long_key),
            Verdict::Match(Message::CancelRequest)
        );
        // Protocol 3.2.
        let mut s32 = s.clone();
        s32[7] = 2;
        assert_eq!(first_message(&s32), Verdict::Match(Message::Startup));
    }

    #[test]
    fn refuses_near_misses() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("absurd length", special(0x7fff_ffff, SSL_REQUEST, &[])),
            ("length over 10000", special(10_001, 0x0003_0000, &[])),
            ("length under 8", special(7, SSL_REQUEST, &[])),
            ("ssl request of 16", special(16, SSL_REQUEST, &[0; 8])),
            ("cancel of 8", special(8, CANCEL_REQUEST, &[])),
            (
                "cancel for pid 0",
                special(16, CANCEL_REQUEST, &[0, 0, 0, 0, 1, 2, 3, 4]),
            ),
            ("protocol 2", special(16, 0x0002_0000, b"user\0a\0\0\0")),
            ("unknown special code", special(8, 80_877_199, &[])),
            ("no user", startup(&[("database", "db")])),
            ("empty name", startup(&[("", "x"), ("user", "u")])),
            (
                "name with a space",
                startup(&[("us er", "x"), ("user", "u")]),
            ),
            ("startup of 8", special(8, 0x0003_0000, &[])),
            ("unterminated", {
                let mut s = startup(&[("user", "u")]);
                let n = s.len();
                s[n - 1] = b'x';
                s
            }),
        ];
        for (what, bytes) in cases {
            assert_eq!(first_message(&bytes), Verdict::NoMatch, "{what}");
        }
        // Early: the first bytes already rule it out.
        assert_eq!(first_message(&[1]), Verdict::NoMatch);
        assert_eq!(first_message(&[0, 0, 0, 8, 5]), Verdict::NoMatch);
        assert_eq!(first_message(&[0, 0, 0, 8, 4, 0xd3]), Verdict::NoMatch);
        assert_eq!(first_message(&[0, 0, 0, 8, 4]), Verdict::NeedMore);
    }
}
