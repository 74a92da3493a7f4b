//! TLS: the ClientHello, with its SNI and ALPN.
//!
//! A client's first flight is one or more handshake records (type `0x16`,
//! version `0x03 0x00..=0x04`, 1 to 16,384 bytes each) carrying the
//! ClientHello handshake message (type 1, 24-bit length). The message may be
//! split over several records (and each record over several segments), so the
//! detector reassembles it and matches only once the whole message is there:
//! that is when SNI and ALPN are known for sure. It answers `NoMatch` as soon
//! as a byte rules TLS out: another record type, a record of length 0 or above
//! 16,384, another handshake type, a hello too short or longer than
//! [`MAX_HELLO_LEN`], and a hello that does not parse (lengths that do not add
//! up, a legacy version other than 3.x, a session id over 32 bytes, no cipher
//! suite or compression method, the same SNI or ALPN extension twice, two host
//! names in SNI, an empty ALPN name).
//!
//! SSLv2-format hellos (first byte with the high bit set) are not TLS here:
//! nothing current sends them.
//!
//! A host name in SNI that is not one (characters other than letters, digits,
//! `-`, `.` and `_`) still matches TLS, with no server name.

use super::{host_name, Detect, Step, Verdict};

/// TLS record content type `handshake`.
pub const CONTENT_HANDSHAKE: u8 = 0x16;
/// Handshake message type `client_hello`.
pub const CLIENT_HELLO: u8 = 1;
/// The largest record payload a client may send (2^14).
pub const MAX_RECORD_LEN: usize = 1 << 14;
/// The longest ClientHello (4-byte handshake header included) the detector
/// accepts: 64 KiB, four times the largest record; in practice the sniffing
/// budget is lower still.
pub const MAX_HELLO_LEN: usize = 1 << 16;
/// The shortest ClientHello body: version, random, an empty session id, one
/// cipher suite and one compression method.
const MIN_HELLO_BODY: usize = 2 + 32 + 1 + 2 + 2 + 1 + 1;
const RECORD_HEADER: usize = 5;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;

/// What a ClientHello says about where the client is going.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientHello {
    /// The SNI `host_name`, as sent.
    pub server_name: Option<String>,
    /// The ALPN protocol names, in the client's order (non-UTF-8 ones left
    /// out).
    pub alpn: Vec<String>,
}

/// Reads the ClientHello at the start of `buf` (a connection's first bytes).
///
/// `NeedMore` until the whole hello has arrived, however it is split into
/// records; the caller bounds how long it keeps asking.
pub fn client_hello(buf: &[u8]) -> Verdict<ClientHello> {
    Detector::once(buf)
}

/// Walks the records as they arrive, keeping only the handshake header and
/// counts, and parses the hello once, when it is complete.
#[derive(Debug, Default)]
pub(crate) struct Detector {
    /// The next byte not yet walked.
    pos: usize,
    /// Payload bytes still to come in the current record; 0 at a header.
    rec_left: usize,
    /// Records started so far.
    records: usize,
    /// The handshake header (type, 24-bit length), as far as it has come.
    header: [u8; 4],
    /// Handshake bytes seen so far.
    gathered: usize,
}

impl Detect for Detector {
    type Found = ClientHello;

    fn step(&mut self, buf: &[u8]) -> Step<ClientHello> {
        loop {
            if self.rec_left == 0 {
                let head = &buf[self.pos.min(buf.len())..];
                if !record_header_prefix_ok(head) {
                    return Step::NoMatch;
                }
                if head.len() < RECORD_HEADER {
                    return Step::NeedMore(buf.len() + 1);
                }
                let len = usize::from(u16::from_be_bytes([head[3], head[4]]));
                if len == 0 || len > MAX_RECORD_LEN {
                    return Step::NoMatch;
                }
                self.rec_left = len;
                self.pos += RECORD_HEADER;
                self.records += 1;
            }

            let take = self.rec_left.min(buf.len() - self.pos);
            if take == 0 {
                return Step::NeedMore(self.pos + 1);
            }
            let fresh = &buf[self.pos..self.pos + take];
            if self.gathered < 4 {
                let n = (4 - self.gathered).min(take);
                self.header[self.gathered..self.gathered + n].copy_from_slice(&fresh[..n]);
            }
            self.gathered += take;
            self.pos += take;
            self.rec_left -= take;

            if self.header[0] != CLIENT_HELLO {
                return Step::NoMatch;
            }
            if self.gathered < 4 {
                continue;
            }
            let total = 4
                + (usize::from(self.header[1]) << 16
                    | usize::from(self.header[2]) << 8
                    | usize::from(self.header[3]));
            if !(4 + MIN_HELLO_BODY..=MAX_HELLO_LEN).contains(&total) {
                return Step::NoMatch;
            }
            if self.gathered >= total {
                return match self.parse(buf, total) {
                    Some(hello) => Step::Match(hello),
                    None => Step::NoMatch,
                };
            }
            if self.pos == buf.len() {
                // The hello ends no earlier than this; a new record header
                // can rule TLS out one byte after the current record.
                let missing = total - self.gathered;
                return Step::NeedMore(self.pos + missing.min(self.rec_left + 1));
            }
        }
    }
}

impl Detector {
    /// Parses the complete hello: in place when it came in one record (the
    /// usual case), else from one copy of its fragments.
    fn parse(&self, buf: &[u8], total: usize) -> Option<ClientHello> {
        if self.records == 1 {
            return parse_body(buf.get(RECORD_HEADER + 4..RECORD_HEADER + total)?);
        }
        // The records were checked on the way; `get` only guards against a
        // caller that broke the contract and changed bytes already seen.
        let mut message = Vec::with_capacity(total);
        let mut at = 0;
        while message.len() < total {
            let header = buf.get(at..at + RECORD_HEADER)?;
            let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
            // The hello may end before its last record does, and that
            // record's tail need not have arrived.
            let want = (total - message.len()).min(len);
            message.extend_from_slice(buf.get(at + RECORD_HEADER..at + RECORD_HEADER + want)?);
            at += RECORD_HEADER + len;
        }
        parse_body(message.get(4..)?)
    }
}

/// Whether `head`, the start of a record header (possibly short), can still
/// be a handshake record's.
fn record_header_prefix_ok(head: &[u8]) -> bool {
    let expect: [fn(u8) -> bool; 3] = [|b| b == CONTENT_HANDSHAKE, |b| b == 3, |b| b <= 4];
    head.iter().zip(expect).all(|(&b, ok)| ok(b))
}

/// The ClientHello body (after the 4-byte handshake header), or `None` if it
/// is malformed.
fn parse_body(body: &[u8]) -> Option<ClientHello> {
    let mut r = Reader(body);
    let (major, _minor) = (r.u8()?, r.u8()?);
    if major != 3 {
        return None;
    }
    r.take(32)?;
    let session_id = usize::from(r.u8()?);
    if session_id > 32 {
        return None;
    }
    r.take(session_id)?;
    let suites = usize::from(r.u16()?);
    if suites < 2 || suites % 2 != 0 {
        return None;
    }
    r.take(suites)?;
    let compression = usize::from(r.u8()?);
    if compression == 0 {
        return None;
    }
    r.take(compression)?;

    let mut hello = ClientHello::default();
    if r.0.is_empty() {
        return Some(hello); // no extensions at all (SSL 3.0 style)
    }
    if usize::from(r.u16()?) != r.0.len() {
        return None;
    }
    let (mut sni_seen, mut alpn_seen) = (false, false);
    while !r.0.is_empty() {
        let kind = r.u16()?;
        let len = usize::from(r.u16()?);
        let data = r.take(len)?;
        match kind {
            EXT_SERVER_NAME if sni_seen => return None,
            EXT_SERVER_NAME => {
                sni_seen = true;
                hello.server_name = parse_sni(data)?;
            }
            EXT_ALPN if alpn_seen => return None,
            EXT_ALPN => {
                alpn_seen = true;
                hello.alpn = parse_alpn(data)?;
            }
            _ => {}
        }
    }
    Some(hello)
}

/// The `server_name` extension: `Some(name)` if well formed (the name itself
/// `None` if it is not a host name), `None` if malformed.
fn parse_sni(data: &[u8]) -> Option<Option<String>> {
    let mut r = Reader(data);
    let list = usize::from(r.u16()?);
    if list == 0 || list != r.0.len() {
        return None;
    }
    let mut name = None;
    let mut seen_host = false;
    while !r.0.is_empty() {
        let kind = r.u8()?;
        let len = usize::from(r.u16()?);
        let value = r.take(len)?;
        if kind == 0 {
            if seen_host {
                return None;
            }
            seen_host = true;
            name = host_name(value);
        }
    }
    Some(name)
}

/// The ALPN extension's protocol names, or `None` if malformed.
fn parse_alpn(data: &[u8]) -> Option<Vec<String>> {
    let mut r = Reader(data);
    let list = usize::from(r.u16()?);
    if list < 2 || list != r.0.len() {
        return None;
    }
    let mut names = Vec::new();
    while !r.0.is_empty() {
        let len = usize::from(r.u8()?);
        if len == 0 {
            return None;
        }
        if let Ok(name) = std::str::from_utf8(r.take(len)?) {
            names.push(name.to_owned());
        }
    }
    Some(names)
}

/// Big-endian reads off the front of a slice; `None` past its end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u16(&mut self) -> Option<u16> {
        let b = self.take(2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello handshake message (header included) with the given
    /// extensions block contents.
    fn hello_message(extensions: &[u8]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend([0x11; 32]); // random
        body.push(0); // session id
        body.extend([0, 2, 0x13, 0x01]); // one cipher suite
        body.extend([1, 0]); // null compression
        body.extend((extensions.len() as u16).to_be_bytes());
        body.extend(extensions);
        let mut msg = vec![CLIENT_HELLO];
        msg.extend(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend(body);
        msg
    }

    fn ext(kind: u16, data: &[u8]) -> Vec<u8> {
        let mut e = kind.to_be_bytes().to_vec();
        e.extend((data.len() as u16).to_be_bytes());
        e.extend(data);
        e
    }

    fn sni(name: &[u8]) -> Vec<u8> {
        let mut entry = vec![0];
        entry.extend((name.len() as u16).to_be_bytes());
        entry.extend(name);
        let mut data = (entry.len() as u16).to_be_bytes().to_vec();
        data.extend(entry);
        ext(EXT_SERVER_NAME, &data)
    }

    fn alpn(names: &[&str]) -> Vec<u8> {
        let mut list = Vec::new();
        for n in names {
            list.push(n.len() as u8);
            list.extend(n.as_bytes());
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend(list);
        ext(EXT_ALPN, &data)
    }

    /// The message in records of at most `size` payload bytes.
    fn records(msg: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in msg.chunks(size) {
            out.extend([CONTENT_HANDSHAKE, 3, 1]);
            out.extend((chunk.len() as u16).to_be_bytes());
            out.extend(chunk);
        }
        out
    }

    #[test]
    fn reads_sni_and_alpn_from_one_record() {
        let exts = [sni(b"db.example.com"), alpn(&["h2", "http/1.1"])].concat();
        let bytes = records(&hello_message(&exts), MAX_RECORD_LEN);
        let Verdict::Match(hello) = client_hello(&bytes) else {
            panic!("no match");
        };
        assert_eq!(hello.server_name.as_deref(), Some("db.example.com"));
        assert_eq!(hello.alpn, ["h2", "http/1.1"]);
        // One byte short of the end: not yet.
        assert_eq!(client_hello(&bytes[..bytes.len() - 1]), Verdict::NeedMore);
    }

    #[test]
    fn reassembles_a_hello_split_into_one_byte_records() {
        let exts = [sni(b"split.example"), alpn(&["h2"])].concat();
        let bytes = records(&hello_message(&exts), 1);
        let hello = client_hello(&bytes).matched().expect("match");
        assert_eq!(hello.server_name.as_deref(), Some("split.example"));
        assert_eq!(hello.alpn, ["h2"]);
        // Fed byte by byte to one detector: NeedMore all the way, then Match.
        let mut d = Detector::default();
        for end in 1..bytes.len() {
            assert!(matches!(d.step(&bytes[..end]), Step::NeedMore(_)), "{end}");
        }
        assert!(matches!(d.step(&bytes), Step::Match(_)));
    }

    #[test]
    fn a_hello_that_ends_inside_a_record_needs_no_more_of_it() {
        // Found by the fuzzer: the record carrying the hello's last bytes
        // goes on past the hello, and its tail has not arrived yet.
        let msg = hello_message(&sni(b"tail.example"));
        let mut bytes = records(&msg[..msg.len() - 3], 40);
        let mut last = vec![CONTENT_HANDSHAKE, 3, 1, 0, 50];
        last.extend(&msg[msg.len() - 3..]);
        last.resize(5 + 50, 0xee);
        bytes.extend(&last);
        let cut = bytes.len() - 47;
        let whole = client_hello(&bytes);
        assert_eq!(client_hello(&bytes[..cut]), whole);
        assert_eq!(
            whole.matched().and_then(|h| h.server_name).as_deref(),
            Some("tail.example")
        );
    }

    #[test]
    fn refuses_what_is_not_a_client_hello() {
        let good = records(&hello_message(&sni(b"a.example")), 30);
        // ServerHello (type 2) in a handshake record.
        let mut server_hello = good.clone();
        server_hello[5] = 2;
        assert_eq!(client_hello(&server_hello), Verdict::NoMatch);
        assert_eq!(client_hello(&server_hello[..6]), Verdict::NoMatch);
        // An alert record, a zero-length record, an oversized one.
        assert_eq!(client_hello(&[0x15, 3, 3, 0, 2]), Verdict::NoMatch);
        assert_eq!(client_hello(&[0x16, 3, 1, 0, 0]), Verdict::NoMatch);
        assert_eq!(client_hello(&[0x16, 3, 1, 0x40, 1]), Verdict::NoMatch);
        // Record version 3.5, 2.0.
        assert_eq!(client_hello(&[0x16, 3, 5]), Verdict::NoMatch);
        assert_eq!(client_hello(&[0x16, 2]), Verdict::NoMatch);
        // An SSLv2-format hello.
        assert_eq!(
            client_hello(&[0x80, 0x2e, 0x01, 0x03, 0x01, 0x00, 0x15]),
            Verdict::NoMatch
        );
        // A change_cipher_spec record in the middle of the hello.
        let mut ccs = good[..35].to_vec();
        ccs.extend([0x14, 3, 3, 0, 1, 1]);
        assert_eq!(client_hello(&ccs), Verdict::NoMatch);
    }

    #[test]
    fn refuses_malformed_hellos() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("sni twice", [sni(b"a.example"), sni(b"b.example")].concat()),
            ("alpn twice", [alpn(&["h2"]), alpn(&["h2"])].concat()),
            ("empty alpn name", alpn(&["h2", ""])),
            ("sni list length off", {
                let mut e = sni(b"a.example");
                e[5] += 1;
                e
            }),
            ("two host names", {
                let mut entry = vec![0, 0, 1, b'a', 0, 0, 1, b'b'];
                let mut data = (entry.len() as u16).to_be_bytes().to_vec();
                data.append(&mut entry);
                ext(EXT_SERVER_NAME, &data)
            }),
            ("truncated extension", vec![0, 0, 0, 9, 0]),
        ];
        for (what, exts) in cases {
            let bytes = records(&hello_message(&exts), MAX_RECORD_LEN);
            assert_eq!(client_hello(&bytes), Verdict::NoMatch, "{what}");
        }
        // Extensions block length not matching what follows.
        let mut msg = hello_message(&sni(b"a.example"));
        let at = msg.len() - sni(b"a.example").len() - 1;
        msg[at] += 1;
        assert_eq!(client_hello(&records(&msg, 512)), Verdict::NoMatch);
    }

    #[test]
    fn a_strange_name_is_still_tls_without_a_name() {
        for name in [&b"a b.example"[..], b"*.example", b"", b"x\0y"] {
            let bytes = records(&hello_message(&sni(name)), 512);
            let hello = client_hello(&bytes).matched().expect("still TLS");
            assert_eq!(hello.server_name, None, "{name:?}");
        }
        // No extensions at all.
        let mut msg = hello_message(&[]);
        msg.truncate(msg.len() - 2);
        msg[3] -= 2;
        let hello = client_hello(&records(&msg, 512)).matched().expect("tls");
        assert_eq!(hello, ClientHello::default());
    }
}
