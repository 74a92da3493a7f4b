//! HTTP/1.x requests (with the `Host`) and the HTTP/2 prior-knowledge
//! preface.
//!
//! **HTTP/1.** The request line is checked byte by byte as it arrives:
//! a method from [`METHODS`] (case-sensitive, as HTTP methods are), one
//! space, a request-target of visible bytes (no control characters or
//! spaces; bytes above `0x7f` are let through), one space, `HTTP/1.` and a
//! digit, then CRLF (a bare LF is accepted). Any other byte is `NoMatch` at
//! once, so `get / HTTP/1.1` (lowercase), `GET key` (a Redis inline command)
//! and `PRI * HTTP/2.0` are not HTTP/1. Leading empty lines are not skipped.
//!
//! Once the request line is complete the connection is certainly HTTP/1, and
//! the detector looks for the server name:
//!
//! - an absolute-form target (`http://host:port/...`) or `CONNECT`'s
//!   authority-form target names it, and the request matches at once (a
//!   server must then ignore `Host`, RFC 9112 section 3.2.2);
//! - otherwise it matches at the first `Host` header line (name
//!   case-insensitive, value trimmed), or at the end of the head if there is
//!   none (HTTP/1.0), with no name.
//!
//! The name loses its port, and an IPv6 literal its brackets
//! (`[::1]:8080` gives `::1`); a value that is neither a host name nor an IP
//! literal gives no name. A head that is longer than the caller's budget
//! before any of that is found is the caller's `NoMatch`. Header lines other
//! than `Host` are not checked: the HTTP module answers malformed ones.
//!
//! **HTTP/2.** Exactly the 24 bytes of [`H2_PREFACE`]; every shorter prefix of
//! it is `NeedMore`. The authority of an h2c request is in HPACK-coded
//! headers after the preface and is not read, so HTTP/2 matches carry no
//! name.

use super::{host_name, Detect, Step, Verdict};

/// The HTTP/2 connection preface (RFC 9113 section 3.4).
pub const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The request methods that start an HTTP/1 request: those in IANA's HTTP
/// Method Registry except `PRI` (which only starts the HTTP/2 preface), plus
/// `PURGE`, which caches accept though it is not registered.
pub const METHODS: &[&str] = &[
    "ACL",
    "BASELINE-CONTROL",
    "BIND",
    "CHECKIN",
    "CHECKOUT",
    "CONNECT",
    "COPY",
    "DELETE",
    "GET",
    "HEAD",
    "LABEL",
    "LINK",
    "LOCK",
    "MERGE",
    "MKACTIVITY",
    "MKCALENDAR",
    "MKCOL",
    "MKREDIRECTREF",
    "MKWORKSPACE",
    "MOVE",
    "OPTIONS",
    "ORDERPATCH",
    "PATCH",
    "POST",
    "PROPFIND",
    "PROPPATCH",
    "PURGE",
    "PUT",
    "QUERY",
    "REBIND",
    "REPORT",
    "SEARCH",
    "TRACE",
    "UNBIND",
    "UNCHECKOUT",
    "UNLINK",
    "UNLOCK",
    "UPDATE",
    "UPDATEREDIRECTREF",
    "VERSION-CONTROL",
];

/// What an HTTP/1 request's head says about where it is going.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// The server name from the target or `Host`, without port or brackets.
    pub host: Option<String>,
}

/// Reads the HTTP/1 request head at the start of `buf`.
pub fn request(buf: &[u8]) -> Verdict<Request> {
    Http1Detector::once(buf)
}

/// Checks `buf` against the HTTP/2 prior-knowledge preface.
pub fn h2_preface(buf: &[u8]) -> Verdict<()> {
    H2Detector::once(buf)
}

/// Where the request-line parser is.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Phase {
    #[default]
    Method,
    Target,
    /// Matched this many bytes of `HTTP/1.`.
    Version(usize),
    Minor,
    Cr,
    Lf,
    Headers,
}

const VERSION_PREFIX: &[u8] = b"HTTP/1.";

#[derive(Debug, Default)]
pub(crate) struct Http1Detector {
    phase: Phase,
    /// The next byte to look at.
    pos: usize,
    /// Where the request-target starts and ends (exclusive).
    target: (usize, usize),
    /// Where the header line being read starts.
    line_start: usize,
}

impl Detect for Http1Detector {
    type Found = Request;

    fn step(&mut self, buf: &[u8]) -> Step<Request> {
        while self.phase != Phase::Headers {
            let Some(&b) = buf.get(self.pos) else {
                return Step::NeedMore(buf.len() + 1);
            };
            let at = self.pos;
            self.pos += 1;
            self.phase = match self.phase {
                Phase::Method if b == b' ' => {
                    if !is_method(&buf[..at]) {
                        return Step::NoMatch;
                    }
                    self.target.0 = self.pos;
                    Phase::Target
                }
                Phase::Method if is_method_prefix(&buf[..=at]) => Phase::Method,
                Phase::Target if b == b' ' && at > self.target.0 => {
                    self.target.1 = at;
                    Phase::Version(0)
                }
                Phase::Target if b > b' ' && b != 0x7f => Phase::Target,
                Phase::Version(n) if b == VERSION_PREFIX[n] => match n + 1 {
                    n if n == VERSION_PREFIX.len() => Phase::Minor,
                    n => Phase::Version(n),
                },
                Phase::Minor if b.is_ascii_digit() => Phase::Cr,
                Phase::Cr if b == b'\r' => Phase::Lf,
                Phase::Cr | Phase::Lf if b == b'\n' => {
                    self.line_start = self.pos;
                    let target = &buf[self.target.0..self.target.1];
                    let method = &buf[..self.target.0 - 1];
                    if let Some(host) = target_authority(method, target) {
                        return Step::Match(Request {
                            host: parse_host(host),
                        });
                    }
                    Phase::Headers
                }
                _ => return Step::NoMatch,
            };
        }

        // Headers: one line at a time; `pos` is where the search for the
        // current line's end resumes.
        while let Some(nl) = buf[self.pos..].iter().position(|&b| b == b'\n') {
            let end = self.pos + nl;
            let line = &buf[self.line_start..end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            self.pos = end + 1;
            self.line_start = self.pos;
            if line.is_empty() {
                return Step::Match(Request::default());
            }
            if let Some(value) = header_value(line, b"host") {
                return Step::Match(Request {
                    host: parse_host(value),
                });
            }
        }
        self.pos = buf.len();
        Step::NeedMore(buf.len() + 1)
    }
}

fn is_method(token: &[u8]) -> bool {
    METHODS.iter().any(|m| m.as_bytes() == token)
}

fn is_method_prefix(token: &[u8]) -> bool {
    METHODS.iter().any(|m| m.as_bytes().starts_with(token))
}

/// The value of header line `line` if its name is `name` (ASCII
/// case-insensitive), trimmed of spaces and tabs.
fn header_value<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let colon = line.iter().position(|&b| b == b':')?;
    if !line[..colon].eq_ignore_ascii_case(name) {
        return None;
    }
    Some(trim(&line[colon + 1..]))
}

fn trim(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// The authority an absolute-form or authority-form target names, if it is
/// in one of those forms.
fn target_authority<'a>(method: &[u8], target: &'a [u8]) -> Option<&'a [u8]> {
    if method == b"CONNECT" {
        return Some(target);
    }
    let colon = target.iter().position(|&b| b == b':')?;
    let scheme = &target[..colon];
    if !(scheme.eq_ignore_ascii_case(b"http") || scheme.eq_ignore_ascii_case(b"https")) {
        return None;
    }
    let rest = target[colon + 1..].strip_prefix(b"//")?;
    let end = rest
        .iter()
        .position(|&b| matches!(b, b'/' | b'?' | b'#'))
        .unwrap_or(rest.len());
    Some(&rest[..end])
}

/// The host of a `Host` value or target authority (`host`, `host:port`,
/// `[v6]`, `[v6]:port`), without port or brackets; `None` for anything else
/// (user info, several colons without brackets, odd characters, an empty
/// host, a port that is not 0 to 5 digits).
fn parse_host(authority: &[u8]) -> Option<String> {
    let (host, port) = if let Some(rest) = authority.strip_prefix(b"[") {
        let close = rest.iter().position(|&b| b == b']')?;
        let v6 = &rest[..close];
        let ok = v6.contains(&b':')
            && v6
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'));
        if !ok {
            return None;
        }
        let after = &rest[close + 1..];
        let port = match after {
            [] => &[][..],
            [b':', port @ ..] => port,
            _ => return None,
        };
        (String::from_utf8_lossy(v6).into_owned(), port)
    } else {
        let (name, port) = match authority.iter().position(|&b| b == b':') {
            Some(c) => (&authority[..c], &authority[c + 1..]),
            None => (authority, &[][..]),
        };
        (host_name(name)?, port)
    };
    (port.len() <= 5 && port.iter().all(u8::is_ascii_digit)).then_some(host)
}

#[derive(Debug, Default)]
pub(crate) struct H2Detector;

impl Detect for H2Detector {
    type Found = ();

    fn step(&mut self, buf: &[u8]) -> Step<()> {
        let n = buf.len().min(H2_PREFACE.len());
        if buf[..n] != H2_PREFACE[..n] {
            Step::NoMatch
        } else if n < H2_PREFACE.len() {
            // The next byte can already spoil it.
            Step::NeedMore(n + 1)
        } else {
            Step::Match(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_of(req: &[u8]) -> Option<String> {
        match request(req) {
            Verdict::Match(r) => r.host,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(req)),
        }
    }

    #[test]
    fn finds_the_host_in_its_forms() {
        let cases: &[(&[u8], Option<&str>)] = &[
            (
                b"GET / HTTP/1.1\r\nHost: example.com\r\n",
                Some("example.com"),
            ),
            (
                b"GET / HTTP/1.1\r\nhOsT:   Example.COM:8080 \r\n",
                Some("Example.COM"),
            ),
            (b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n", Some("::1")),
            (
                b"GET / HTTP/1.1\r\nHost: [2001:db8::1]\r\n",
                Some("2001:db8::1"),
            ),
            (b"GET / HTTP/1.1\r\nHost: 10.0.0.1:80\r\n", Some("10.0.0.1")),
            (
                b"GET / HTTP/1.1\nAccept: */*\nHost: lf.example\n",
                Some("lf.example"),
            ),
            (b"GET / HTTP/1.0\r\nAccept: */*\r\n\r\n", None),
            (b"GET / HTTP/1.1\r\nHost:\r\n", None),
            (b"GET / HTTP/1.1\r\nHost: a b\r\n", None),
            (b"GET / HTTP/1.1\r\nHost: user@h.example\r\n", None),
            (b"GET / HTTP/1.1\r\nHost: ::1\r\n", None),
            (b"GET / HTTP/1.1\r\nHost: [::1\r\n", None),
            (b"GET / HTTP/1.1\r\nHost: h.example:http\r\n", None),
            (b"GET / HTTP/1.1\r\nHost: [v1.x]\r\n", None),
            (
                b"GET http://proxy.example:3128/x HTTP/1.1\r\n",
                Some("proxy.example"),
            ),
            (b"GET HTTPS://[fe80::1]/ HTTP/1.1\r\n", Some("fe80::1")),
            (
                b"CONNECT tunnel.example:443 HTTP/1.1\r\n",
                Some("tunnel.example"),
            ),
            (
                b"OPTIONS * HTTP/1.1\r\nHost: star.example\r\n",
                Some("star.example"),
            ),
        ];
        for (req, want) in cases {
            assert_eq!(
                host_of(req).as_deref(),
                *want,
                "{}",
                String::from_utf8_lossy(req)
            );
        }
    }

    #[test]
    fn waits_for_host_or_the_end_of_the_head() {
        assert_eq!(request(b"GET / HTTP/1.1\r\n"), Verdict::NeedMore);
        assert_eq!(
            request(b"GET / HTTP/1.1\r\nAccept: */*\r\nHost: x.example"),
            Verdict::NeedMore
        );
        assert_eq!(request(b"GET / HTTP/1.1\r"), Verdict::NeedMore);
        assert_eq!(request(b"PROP"), Verdict::NeedMore);
        assert_eq!(request(b""), Verdict::NeedMore);
    }

    #[test]
    fn refuses_near_misses() {
        for bad in [
            &b"get / HTTP/1.1\r\n"[..],
            b"GET key\r\n",
            b"GET  / HTTP/1.1\r\n",
            b"GET / HTTP/2.0\r\n",
            b"GET / HTTP/1.x\r\n",
            b"GET / HTTP/1.1 \r\n",
            b"GET / HTTP/1.1\r\r",
            b"GET /\x00 HTTP/1.1\r\n",
            b"PRI * HTTP/2.0\r\n",
            b"FOO / HTTP/1.1\r\n",
            b"GETS / HTTP/1.1\r\n",
            b" GET / HTTP/1.1\r\n",
            b"\r\nGET / HTTP/1.1\r\n",
        ] {
            assert_eq!(
                request(bad),
                Verdict::NoMatch,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // Decided on the first byte that cannot fit.
        assert_eq!(request(b"PRI"), Verdict::NoMatch);
        assert_eq!(request(b"g"), Verdict::NoMatch);
    }

    #[test]
    fn preface_exactly() {
        assert_eq!(h2_preface(H2_PREFACE), Verdict::Match(()));
        let mut more = H2_PREFACE.to_vec();
        more.extend([0, 0, 0, 4, 0, 0, 0, 0, 0]);
        assert_eq!(h2_preface(&more), Verdict::Match(()));
        for n in 0..H2_PREFACE.len() {
            assert_eq!(h2_preface(&H2_PREFACE[..n]), Verdict::NeedMore, "{n}");
        }
        assert_eq!(
            h2_preface(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\r"),
            Verdict::NoMatch
        );
        assert_eq!(h2_preface(b"PRI * HTTP/1.1\r\n"), Verdict::NoMatch);
    }
}
