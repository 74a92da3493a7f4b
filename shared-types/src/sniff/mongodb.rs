//! MongoDB: the wire protocol's message header and the start of the body.
//!
//! A message starts with four little-endian int32s: `messageLength` (the
//! header included), `requestID`, `responseTo` and `opCode`. A client's first
//! message (the `hello`/`isMaster` handshake) is a request, so `responseTo` is
//! 0, and its opCode is `OP_MSG` (2013), the legacy `OP_QUERY` (2004) that
//! drivers still use for the first hello, or `OP_COMPRESSED` (2012). The
//! length must fit the opCode's smallest body and be at most 48,000,000
//! bytes, the server's `maxMessageSizeBytes`.
//!
//! Sixteen mostly-zero bytes are not much to go on, so the first fields of
//! the body must make sense too:
//!
//! - `OP_MSG`: only the defined flag bits (`checksumPresent`, `moreToCome`,
//!   `exhaustAllowed`), a section of kind 0 or 1 and a section or BSON
//!   document length that fits the message (25 bytes in all);
//! - `OP_QUERY`: only defined flag bits, a collection name of printable
//!   ASCII with a `.`, at most 255 bytes and NUL-terminated, then a BSON
//!   document length that fits the message;
//! - `OP_COMPRESSED`: an original opCode of OP_MSG or OP_QUERY, an
//!   uncompressed size within the limit and a compressor id of 0 to 3.
//!
//! The 48 MB limit also keeps MongoDB apart from every other family: the
//! length's last byte is 0, 1 or 2, which no text protocol can start with.

use std::fmt;

use super::{Detect, Step, Verdict};

/// The server's `maxMessageSizeBytes`.
pub const MAX_MESSAGE_LEN: usize = 48_000_000;
pub const OP_QUERY: u32 = 2004;
pub const OP_COMPRESSED: u32 = 2012;
pub const OP_MSG: u32 = 2013;
const HEADER_LEN: usize = 16;
/// The smallest BSON document: a length and the terminating NUL.
const MIN_DOC: usize = 5;
/// The longest `OP_QUERY` collection name (`db.collection`) accepted.
const MAX_NAMESPACE: usize = 255;
/// The shortest message of any accepted opCode: an `OP_MSG` with an empty
/// document (`OP_COMPRESSED`'s fixed fields and one byte come to the same).
const MIN_MESSAGE_LEN: usize = HEADER_LEN + 4 + 1 + MIN_DOC;

/// The message's opCode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpCode {
    Query,
    Msg,
    Compressed,
}

impl fmt::Display for OpCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OpCode::Query => "op_query",
            OpCode::Msg => "op_msg",
            OpCode::Compressed => "op_compressed",
        })
    }
}

/// Reads the MongoDB message at the start of `buf`.
pub fn message(buf: &[u8]) -> Verdict<OpCode> {
    Detector::once(buf)
}

/// Whether the first 16 bytes of `buf` are a plausible client message header
/// (length, `responseTo` 0, opCode); the RTMP detector uses it to keep off
/// MongoDB messages whose length happens to start with `0x03`.
pub(crate) fn header_plausible(buf: &[u8]) -> bool {
    buf.len() >= HEADER_LEN && header(buf).is_some()
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// The opCode and length of a complete, plausible header.
fn header(buf: &[u8]) -> Option<(OpCode, usize)> {
    let len = le32(&buf[0..4]) as usize;
    if le32(&buf[8..12]) != 0 {
        return None;
    }
    let (op, min_body) = match le32(&buf[12..16]) {
        OP_MSG => (OpCode::Msg, 4 + 1 + MIN_DOC),
        OP_QUERY => (OpCode::Query, 4 + 2 + 8 + MIN_DOC),
        OP_COMPRESSED => (OpCode::Compressed, 4 + 4 + 1 + 1),
        _ => return None,
    };
    (HEADER_LEN + min_body..=MAX_MESSAGE_LEN)
        .contains(&len)
        .then_some((op, len))
}

#[derive(Debug, Default)]
pub(crate) struct Detector;

impl Detect for Detector {
    type Found = OpCode;

    fn step(&mut self, buf: &[u8]) -> Step<OpCode> {
        if buf.len() < HEADER_LEN {
            return early(buf);
        }
        let Some((op, len)) = header(buf) else {
            return Step::NoMatch;
        };
        let body = &buf[HEADER_LEN..buf.len().min(len)];
        match op {
            OpCode::Msg => op_msg(body, len),
            OpCode::Query => op_query(body, len),
            OpCode::Compressed => op_compressed(body),
        }
        .map(|()| op)
    }
}

/// Rules out what cannot become a header before all 16 bytes are there: the
/// length (at most 48 MB, so its last byte is 0 to 2), `responseTo`, the
/// opCode's bytes.
fn early(buf: &[u8]) -> Step<OpCode> {
    if buf.len() >= 4 && !(MIN_MESSAGE_LEN..=MAX_MESSAGE_LEN).contains(&(le32(buf) as usize)) {
        return Step::NoMatch;
    }
    let ok = buf.iter().enumerate().all(|(i, &b)| match i {
        3 => b <= 2,
        8..=11 => b == 0,
        12 => b == 0xd4 || b == 0xdc || b == 0xdd,
        13 => b == 0x07,
        14 | 15 => b == 0,
        _ => true,
    });
    if ok {
        Step::NeedMore(buf.len() + 1)
    } else {
        Step::NoMatch
    }
}

/// Waits for the body's first `n` bytes.
fn need(body: &[u8], n: usize) -> Option<Step<()>> {
    (body.len() < n).then_some(Step::NeedMore(HEADER_LEN + n))
}

fn verdict(ok: bool) -> Step<()> {
    if ok {
        Step::Match(())
    } else {
        Step::NoMatch
    }
}

fn op_msg(body: &[u8], len: usize) -> Step<()> {
    const KNOWN_FLAGS: u32 = 1 | 1 << 1 | 1 << 16;
    if let Some(wait) = need(body, 9) {
        return wait;
    }
    let flags = le32(&body[0..4]);
    let section = le32(&body[5..9]) as usize;
    // Kind 0: one BSON document; kind 1: a sized document sequence (its size,
    // an identifier and documents).
    let min = match body[4] {
        0 => MIN_DOC,
        1 => 4 + 1 + MIN_DOC,
        _ => return Step::NoMatch,
    };
    verdict(flags & !KNOWN_FLAGS == 0 && (min..=len - HEADER_LEN - 5).contains(&section))
}

fn op_query(body: &[u8], len: usize) -> Step<()> {
    const KNOWN_FLAGS: u32 = 0xfe; // bits 1 to 7; bit 0 is reserved
    if let Some(wait) = need(body, 4) {
        return wait;
    }
    if le32(&body[0..4]) & !KNOWN_FLAGS != 0 {
        return Step::NoMatch;
    }
    let whole_body = len - HEADER_LEN;
    let name = &body[4..];
    let printable = |name: &[u8]| name.iter().all(|b| (0x21..=0x7e).contains(b));
    let name_end = match name.iter().position(|&b| b == 0) {
        Some(end) => end,
        None if name.len() <= MAX_NAMESPACE && body.len() < whole_body && printable(name) => {
            return Step::NeedMore(HEADER_LEN + body.len() + 1);
        }
        None => return Step::NoMatch,
    };
    let name = &name[..name_end];
    if name_end > MAX_NAMESPACE || !name.contains(&b'.') || !printable(name) {
        return Step::NoMatch;
    }
    // numberToSkip, numberToReturn, then the query document's length.
    let doc_at = 4 + name_end + 1 + 8;
    if doc_at + MIN_DOC > whole_body {
        return Step::NoMatch;
    }
    if let Some(wait) = need(body, doc_at + 4) {
        return wait;
    }
    let doc = le32(&body[doc_at..doc_at + 4]) as usize;
    verdict((MIN_DOC..=whole_body - doc_at).contains(&doc))
}

fn op_compressed(body: &[u8]) -> Step<()> {
    if let Some(wait) = need(body, 9) {
        return wait;
    }
    let original = le32(&body[0..4]);
    let size = le32(&body[4..8]) as usize;
    verdict(
        matches!(original, OP_MSG | OP_QUERY)
            && (1..=MAX_MESSAGE_LEN).contains(&size)
            && body[8] <= 3,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(op: u32, response_to: u32, body: &[u8]) -> Vec<u8> {
        let mut m = ((HEADER_LEN + body.len()) as u32).to_le_bytes().to_vec();
        m.extend(7u32.to_le_bytes());
        m.extend(response_to.to_le_bytes());
        m.extend(op.to_le_bytes());
        m.extend(body);
        m
    }

    /// `{hello: 1}` as BSON.
    fn hello_doc() -> Vec<u8> {
        let mut d = vec![0; 4];
        d.extend([0x10]);
        d.extend(b"hello\0");
        d.extend(1i32.to_le_bytes());
        d.push(0);
        let n = d.len() as u32;
        d[..4].copy_from_slice(&n.to_le_bytes());
        d
    }

    fn op_msg_body(flags: u32, kind: u8) -> Vec<u8> {
        [&flags.to_le_bytes()[..], &[kind], &hello_doc()].concat()
    }

    fn op_query_body(flags: u32, name: &[u8]) -> Vec<u8> {
        [
            &flags.to_le_bytes()[..],
            name,
            b"\0",
            &[0; 4],
            &[0xff; 4],
            &hello_doc(),
        ]
        .concat()
    }

    #[test]
    fn recognises_each_opcode() {
        let m = msg(OP_MSG, 0, &op_msg_body(0, 0));
        assert_eq!(message(&m), Verdict::Match(OpCode::Msg));
        assert_eq!(message(&m[..24]), Verdict::NeedMore);
        let q = msg(OP_QUERY, 0, &op_query_body(4, b"admin.$cmd"));
        assert_eq!(message(&q), Verdict::Match(OpCode::Query));
        let c = msg(
            OP_COMPRESSED,
            0,
            &[
                &OP_MSG.to_le_bytes()[..],
                &100u32.to_le_bytes(),
                &[2],
                &[0; 20],
            ]
            .concat(),
        );
        assert_eq!(message(&c), Verdict::Match(OpCode::Compressed));
    }

    #[test]
    fn a_collection_name_of_the_longest_length_is_waited_for() {
        // Found by the fuzzer: 255 name bytes without their NUL yet were
        // refused, though the next byte could end a name of allowed length.
        let name = [b"a.".as_slice(), &[b'c'; MAX_NAMESPACE - 2]].concat();
        let q = msg(OP_QUERY, 0, &op_query_body(0, &name));
        let name_end = HEADER_LEN + 4 + MAX_NAMESPACE;
        assert_eq!(message(&q[..name_end]), Verdict::NeedMore);
        assert_eq!(message(&q), Verdict::Match(OpCode::Query));
        let longer = [b"a.".as_slice(), &[b'c'; MAX_NAMESPACE - 1]].concat();
        let q = msg(OP_QUERY, 0, &op_query_body(0, &longer));
        assert_eq!(message(&q[..name_end + 1]), Verdict::NoMatch);
        assert_eq!(message(&q), Verdict::NoMatch);
    }

    #[test]
    fn refuses_near_misses() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "a reply (responseTo set)",
                msg(OP_MSG, 7, &op_msg_body(0, 0)),
            ),
            ("OP_REPLY", msg(1, 0, &op_msg_body(0, 0))),
            ("OP_INSERT (removed)", msg(2002, 0, &op_msg_body(0, 0))),
            (
                "undefined OP_MSG flag",
                msg(OP_MSG, 0, &op_msg_body(1 << 5, 0)),
            ),
            ("section kind 2", msg(OP_MSG, 0, &op_msg_body(0, 2))),
            (
                "reserved OP_QUERY flag",
                msg(OP_QUERY, 0, &op_query_body(1, b"a.b")),
            ),
            (
                "collection without a dot",
                msg(OP_QUERY, 0, &op_query_body(0, b"admin")),
            ),
            (
                "collection with a space",
                msg(OP_QUERY, 0, &op_query_body(0, b"a .b")),
            ),
            (
                "compressed OP_REPLY",
                msg(
                    OP_COMPRESSED,
                    0,
                    &[&1u32.to_le_bytes()[..], &[1, 0, 0, 0, 9], &[0; 8]].concat(),
                ),
            ),
            ("too short for its opCode", msg(OP_MSG, 0, &[0; 4])),
        ];
        for (what, bytes) in cases {
            assert_eq!(message(&bytes), Verdict::NoMatch, "{what}");
        }
        // Absurd lengths.
        let mut huge = msg(OP_MSG, 0, &op_msg_body(0, 0));
        huge[..4].copy_from_slice(&48_000_001u32.to_le_bytes());
        assert_eq!(message(&huge), Verdict::NoMatch);
        assert_eq!(message(&huge[..4]), Verdict::NoMatch);
        // A document longer than the message.
        let mut long_doc = msg(OP_MSG, 0, &op_msg_body(0, 0));
        long_doc[21..25].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(message(&long_doc), Verdict::NoMatch);
        // Text is out by its fourth byte.
        assert_eq!(message(b"GET "), Verdict::NoMatch);
    }
}
