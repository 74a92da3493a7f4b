//! Protocol detection from a connection's first bytes ("sniffing"): pure code,
//! no I/O, no clock.
//!
//! A listener declared `auto` peeks at what the client sends first and asks
//! [`Sniffer::feed`] (or the one-shot [`sniff`]) what it is. Each detector
//! answers *match*, *need more* or *no*; the sniffer combines them into one
//! [`Verdict`]:
//!
//! - [`Verdict::Match`] when one detector is certain. At most one can be: each
//!   family's signature is disjoint from the others' (see "Precedence" below),
//!   and if two ever matched the sniffer would answer `NoMatch` rather than
//!   guess.
//! - [`Verdict::NeedMore`] while any detector could still match and fewer than
//!   `budget` bytes have been seen.
//! - [`Verdict::NoMatch`] when every detector said no, or the budget is used
//!   up with some still undecided. The connection then goes to the listener's
//!   `TCP` route, or is closed.
//!
//! The caller reads into one buffer, calls [`Sniffer::feed`] with everything
//! read so far after each read, and stops at a final verdict, at
//! [`DEFAULT_BUDGET`] bytes or at [`DEFAULT_TIMEOUT`], whichever comes first;
//! then it replays the whole buffer to the chosen upstream. A [`Sniffer`]
//! remembers which detectors already said no and where each one stopped, so
//! feeding a growing buffer costs linear time in total, however the bytes are
//! split into reads.
//!
//! What is recognised (details in each module and in `docs/sniffing.md`):
//!
//! | family | detector | matches once it has |
//! |---|---|---|
//! | [`Detected::Tls`] | [`tls::client_hello`] | the whole ClientHello, possibly over several records (SNI, ALPN) |
//! | [`Detected::Http1`] | [`http::request`] | a request line with a known method and `HTTP/1.x`, then the `Host` header (or the end of the head, or an absolute-form target) |
//! | [`Detected::Http2`] | [`http::h2_preface`] | the 24-byte prior-knowledge preface |
//! | [`Detected::Postgres`] | [`postgres::first_message`] | a whole StartupMessage, SSLRequest, GSSENCRequest or CancelRequest |
//! | [`Detected::Redis`] | [`redis::command`] | a RESP array's first bulk string (the command name), or a whole inline command line of a known command |
//! | [`Detected::Mongodb`] | [`mongodb::message`] | a message header (`responseTo` 0, OP_MSG, OP_QUERY or OP_COMPRESSED) and the first fields of its body |
//! | [`Detected::Rtmp`] | [`rtmp::handshake`] | C0 (`0x03`) and the whole 1536-byte C1 |
//!
//! MySQL is never sniffed: its server speaks first, so a MySQL client sends
//! nothing until it is answered. Its listener must declare it.
//!
//! # Precedence
//!
//! There is no order of preference to get wrong, because no input can satisfy
//! two detectors; the fuzz target `sniff` checks that on arbitrary bytes.
//! Where two families could start alike, the rule that keeps them apart:
//!
//! - HTTP/1 and HTTP/2: `PRI` is not an HTTP/1 method, and HTTP/1 needs
//!   ` HTTP/1.` on the request line.
//! - HTTP/1 and inline Redis (`GET key`): HTTP/1 needs the request line to end
//!   in ` HTTP/1.<digit>`; a Redis inline line whose last word starts with
//!   `HTTP/` is never Redis. So `GET / HTTP/1.1` is HTTP and `GET key` Redis.
//! - MongoDB and everything else: a MongoDB message is at most 48 MB, so its
//!   little-endian length has a fourth byte of 0, 1 or 2, which no text
//!   protocol, RESP, TLS or PostgreSQL message start can have together with a
//!   zero `responseTo`; a PostgreSQL CancelRequest must name a process id
//!   other than 0 for the same reason.
//! - RTMP and MongoDB: a buffer starting `0x03` whose first 16 bytes are a
//!   plausible MongoDB header is not RTMP.

pub mod http;
pub mod mongodb;
pub mod postgres;
pub mod redis;
pub mod rtmp;
pub mod tls;

#[cfg(test)]
mod tests;

use std::fmt;
use std::time::Duration;

use crate::pb::Protocol;

/// How many bytes a sniffing listener reads at most before giving up: 16 KiB.
///
/// What the detectors need is far less for every real client: PostgreSQL
/// caps a StartupMessage at 10,000 bytes, RTMP's C0+C1 is 1,537, a MongoDB or
/// Redis verdict comes within the first hundred bytes. The two that vary are
/// the TLS ClientHello and the HTTP/1 head before `Host`. Browsers' hellos are
/// 0.5 to 2 KiB, about 1.8 KiB with a post-quantum key share
/// (X25519MLKEM768 adds 1,216 bytes), and reach 3 to 4 KiB with large session
/// tickets; 16 KiB leaves four times that. An HTTP/1 client sends `Host` in
/// its first lines, but cookies before it can run to several KiB (nginx's
/// default limit per header line is 8 KiB). And 16 KiB bounds what one
/// connection that has not yet said what it is can make the NLB hold, so the
/// cap on connections still sniffing bounds the memory they take.
pub const DEFAULT_BUDGET: usize = 16 * 1024;

/// How long a sniffing listener waits for the bytes it needs: 3 seconds.
///
/// Every recognised client sends its first flight as soon as the connection
/// is up, in one or two segments, so the verdict normally comes within one
/// round trip. Three seconds covers slow mobile links and a retransmitted
/// segment or two, and bounds what a silent or slow client (or a server-first
/// protocol such as MySQL on an `auto` listener) can hold.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

/// The protocol family found on a connection (declared by the listener or
/// sniffed from its first bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Detected {
    Tls,
    Http1,
    Http2,
    Postgres,
    /// Only ever declared: MySQL's server speaks first.
    Mysql,
    Mongodb,
    Redis,
    Rtmp,
    /// Nothing recognised: only `TCP` routes match.
    Unknown,
}

impl Detected {
    /// The family a route protocol names, for routing a described connection
    /// (`RouteRequest`): `HTTPS` and `RTMPS` are TLS, `HTTP2` and `GRPC` the
    /// HTTP/2 preface, `TCP` nothing in particular.
    pub fn from_protocol(p: Protocol) -> Option<Detected> {
        Some(match p {
            Protocol::Tcp => Detected::Unknown,
            Protocol::Http | Protocol::Websocket => Detected::Http1,
            Protocol::Https | Protocol::Rtmps => Detected::Tls,
            Protocol::Http2 | Protocol::Grpc => Detected::Http2,
            Protocol::Postgres => Detected::Postgres,
            Protocol::Mysql => Detected::Mysql,
            Protocol::Mongodb => Detected::Mongodb,
            Protocol::Redis => Detected::Redis,
            Protocol::Rtmp => Detected::Rtmp,
            _ => return None,
        })
    }
}

impl fmt::Display for Detected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Detected::Tls => "tls",
            Detected::Http1 => "http/1",
            Detected::Http2 => "http/2",
            Detected::Postgres => "postgres",
            Detected::Mysql => "mysql",
            Detected::Mongodb => "mongodb",
            Detected::Redis => "redis",
            Detected::Rtmp => "rtmp",
            Detected::Unknown => "unknown",
        })
    }
}

/// A detector's answer for the bytes seen so far.
///
/// `NeedMore` and `NoMatch` are about the bytes given: feeding a longer buffer
/// that starts with the same bytes never turns a `Match` or a `NoMatch` into
/// anything else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict<T = Sniffed> {
    /// Certainly this protocol, with what was read from it.
    Match(T),
    /// Could still be this protocol: call again with more bytes.
    NeedMore,
    /// Not this protocol (or, from the [`Sniffer`], none of them, or not
    /// within the byte budget).
    NoMatch,
}

impl<T> Verdict<T> {
    /// `Match` or `NoMatch`: more bytes will not change the answer.
    pub fn is_final(&self) -> bool {
        !matches!(self, Verdict::NeedMore)
    }

    /// The match, if there is one.
    pub fn matched(self) -> Option<T> {
        match self {
            Verdict::Match(t) => Some(t),
            _ => None,
        }
    }

    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Verdict<U> {
        match self {
            Verdict::Match(t) => Verdict::Match(f(t)),
            Verdict::NeedMore => Verdict::NeedMore,
            Verdict::NoMatch => Verdict::NoMatch,
        }
    }
}

/// What the sniffer found on a connection.
///
/// Owned rather than borrowed from the peeked bytes: it is built once per
/// connection (one or two small allocations, only on a match), and the caller
/// is free to hand the buffer on to be replayed while it routes on this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sniffed {
    pub protocol: Detected,
    /// TLS SNI, or the HTTP/1 `Host` (or absolute-form target's authority),
    /// without port, brackets or any other change: routing normalizes it.
    /// `None` when the client sent none, or one that is not a host name
    /// (only letters, digits, `-`, `.`, `_`; for an HTTP IPv6 literal, the
    /// address between the brackets).
    pub server_name: Option<String>,
    /// The TLS ClientHello's ALPN protocol names, in the client's order
    /// (names that are not UTF-8 are left out). Empty for other protocols.
    pub alpn: Vec<String>,
    /// Which variant of the protocol's opening message it was.
    pub detail: Detail,
}

impl Sniffed {
    fn bare(protocol: Detected, detail: Detail) -> Sniffed {
        Sniffed {
            protocol,
            server_name: None,
            alpn: Vec::new(),
            detail,
        }
    }
}

impl fmt::Display for Sniffed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.protocol)?;
        match self.detail {
            Detail::None => {}
            Detail::Postgres(m) => write!(f, " {m}")?,
            Detail::Redis(form) => write!(f, " {form}")?,
            Detail::Mongodb(op) => write!(f, " {op}")?,
        }
        if let Some(name) = &self.server_name {
            write!(f, " name {name}")?;
        }
        if !self.alpn.is_empty() {
            write!(f, " alpn {}", self.alpn.join(","))?;
        }
        Ok(())
    }
}

/// The variant of a protocol's opening message, where it has several.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Detail {
    None,
    Postgres(postgres::Message),
    Redis(redis::Form),
    Mongodb(mongodb::OpCode),
}

/// Detects the protocol of `buf`, the first bytes of a connection, with the
/// [`DEFAULT_BUDGET`]. One-shot: a caller that reads more and asks again
/// should keep a [`Sniffer`], which does not rescan.
pub fn sniff(buf: &[u8]) -> Verdict {
    Sniffer::new().feed(buf)
}

/// A detector's answer inside the crate: `NeedMore` carries the smallest total
/// length at which the answer can change, so the sniffer skips the detector
/// until the buffer is that long.
#[derive(Debug)]
pub(crate) enum Step<T> {
    Match(T),
    NeedMore(usize),
    NoMatch,
}

impl<T> Step<T> {
    pub(crate) fn map<U>(self, f: impl FnOnce(T) -> U) -> Step<U> {
        match self {
            Step::Match(t) => Step::Match(f(t)),
            Step::NeedMore(n) => Step::NeedMore(n),
            Step::NoMatch => Step::NoMatch,
        }
    }
}

impl<T> From<Step<T>> for Verdict<T> {
    fn from(step: Step<T>) -> Self {
        match step {
            Step::Match(t) => Verdict::Match(t),
            Step::NeedMore(_) => Verdict::NeedMore,
            Step::NoMatch => Verdict::NoMatch,
        }
    }
}

/// One detector's state machine. `step` is called with the connection's
/// bytes so far, each call with a buffer that extends the previous one; it
/// may keep where it stopped and resume there.
pub(crate) trait Detect: Default {
    type Found;
    fn step(&mut self, buf: &[u8]) -> Step<Self::Found>;

    /// The stateless form the public per-detector functions use.
    fn once(buf: &[u8]) -> Verdict<Self::Found> {
        Self::default().step(buf).into()
    }
}

/// One detector inside the [`Sniffer`]: its state, whether it is still in the
/// running, and the length before which it need not be asked again.
#[derive(Debug, Default)]
struct Slot<D> {
    detector: D,
    wait_for: usize,
    out: bool,
}

enum Poll<T> {
    Out,
    Pending,
    Found(T),
}

impl<D: Detect> Slot<D> {
    fn poll(&mut self, buf: &[u8]) -> Poll<D::Found> {
        if self.out {
            return Poll::Out;
        }
        if buf.len() < self.wait_for {
            return Poll::Pending;
        }
        match self.detector.step(buf) {
            Step::Match(found) => {
                // Not asked again: the sniffer keeps its final verdict.
                self.out = true;
                Poll::Found(found)
            }
            Step::NeedMore(at) => {
                self.wait_for = at.max(buf.len() + 1);
                Poll::Pending
            }
            Step::NoMatch => {
                self.out = true;
                Poll::Out
            }
        }
    }
}

/// Sniffs one connection as its bytes arrive.
///
/// Call [`feed`](Sniffer::feed) with *all* the bytes read so far after each
/// read (each call's buffer extending the previous one's) until the verdict
/// is final; after that, `feed` keeps answering the same. Only the first
/// `budget` bytes are looked at, so the verdict does not depend on how much a
/// read happened to return.
///
/// ```
/// use shared_types::sniff::{Detected, Sniffer, Verdict};
///
/// let mut sniffer = Sniffer::new();
/// assert_eq!(sniffer.feed(b"GET / HT"), Verdict::NeedMore);
/// let Verdict::Match(found) = sniffer.feed(b"GET / HTTP/1.1\r\nHost: example.com:8080\r\n")
/// else {
///     panic!("not matched");
/// };
/// assert_eq!(found.protocol, Detected::Http1);
/// assert_eq!(found.server_name.as_deref(), Some("example.com"));
/// ```
#[derive(Debug)]
pub struct Sniffer {
    budget: usize,
    seen: usize,
    outcome: Option<Verdict>,
    tls: Slot<tls::Detector>,
    http1: Slot<http::Http1Detector>,
    h2: Slot<http::H2Detector>,
    postgres: Slot<postgres::Detector>,
    redis: Slot<redis::Detector>,
    mongodb: Slot<mongodb::Detector>,
    rtmp: Slot<rtmp::Detector>,
}

impl Default for Sniffer {
    fn default() -> Self {
        Sniffer::new()
    }
}

impl Sniffer {
    /// A sniffer with the [`DEFAULT_BUDGET`].
    pub fn new() -> Self {
        Sniffer::with_budget(DEFAULT_BUDGET)
    }

    /// A sniffer that looks at no more than `budget` bytes and answers
    /// `NoMatch` once it has that many without a match. Below
    /// [`rtmp::HANDSHAKE_LEN`] (1,537) RTMP can never be recognised, and
    /// below a few KiB TLS hellos with large key shares will not be either.
    pub fn with_budget(budget: usize) -> Self {
        Sniffer {
            budget,
            seen: 0,
            outcome: None,
            tls: Slot::default(),
            http1: Slot::default(),
            h2: Slot::default(),
            postgres: Slot::default(),
            redis: Slot::default(),
            mongodb: Slot::default(),
            rtmp: Slot::default(),
        }
    }

    /// The byte budget this sniffer was made with.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Runs the detectors over `buf`, the connection's bytes so far.
    ///
    /// A `NoMatch` for a buffer of `budget` bytes or more means the budget ran
    /// out (the caller can count that apart from "no detector recognised
    /// it"). Before a final verdict, a buffer shorter than the previous one
    /// (which breaks the contract) starts the sniffer over rather than read
    /// stale positions.
    pub fn feed(&mut self, buf: &[u8]) -> Verdict {
        if let Some(done) = &self.outcome {
            return done.clone();
        }
        if buf.len() < self.seen {
            *self = Sniffer::with_budget(self.budget);
        }
        self.seen = buf.len();
        let view = &buf[..buf.len().min(self.budget)];

        let mut pending = false;
        let mut found: Option<Sniffed> = None;
        let mut matches = 0usize;
        let mut note = |poll: Poll<Sniffed>| match poll {
            Poll::Out => {}
            Poll::Pending => pending = true,
            Poll::Found(s) => {
                matches += 1;
                found = Some(s);
            }
        };
        note(map_poll(self.tls.poll(view), |hello| Sniffed {
            protocol: Detected::Tls,
            server_name: hello.server_name,
            alpn: hello.alpn,
            detail: Detail::None,
        }));
        note(map_poll(self.http1.poll(view), |req| Sniffed {
            server_name: req.host,
            ..Sniffed::bare(Detected::Http1, Detail::None)
        }));
        note(map_poll(self.h2.poll(view), |()| {
            Sniffed::bare(Detected::Http2, Detail::None)
        }));
        note(map_poll(self.postgres.poll(view), |m| {
            Sniffed::bare(Detected::Postgres, Detail::Postgres(m))
        }));
        note(map_poll(self.redis.poll(view), |form| {
            Sniffed::bare(Detected::Redis, Detail::Redis(form))
        }));
        note(map_poll(self.mongodb.poll(view), |op| {
            Sniffed::bare(Detected::Mongodb, Detail::Mongodb(op))
        }));
        note(map_poll(self.rtmp.poll(view), |()| {
            Sniffed::bare(Detected::Rtmp, Detail::None)
        }));

        let verdict = match (matches, found) {
            (1, Some(found)) => Verdict::Match(found),
            // Two families at once cannot happen (see the module docs); if it
            // ever did, refusing to guess is safer than misrouting.
            (2.., _) => Verdict::NoMatch,
            _ if pending && view.len() < self.budget => Verdict::NeedMore,
            _ => Verdict::NoMatch,
        };
        if verdict.is_final() {
            self.outcome = Some(verdict.clone());
        }
        verdict
    }
}

fn map_poll<T>(poll: Poll<T>, f: impl FnOnce(T) -> Sniffed) -> Poll<Sniffed> {
    match poll {
        Poll::Out => Poll::Out,
        Poll::Pending => Poll::Pending,
        Poll::Found(t) => Poll::Found(f(t)),
    }
}

/// Printable ASCII or the whitespace text protocols use.
pub(crate) fn is_text(b: u8) -> bool {
    matches!(b, 0x20..=0x7e | b'\t' | b'\r' | b'\n')
}

/// A host name as SNI and `Host` may carry it: letters, digits, `-`, `.` and
/// `_` (seen in the wild), 1 to 255 bytes.
pub(crate) fn host_name(name: &[u8]) -> Option<String> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    ok.then(|| String::from_utf8_lossy(name).into_owned())
}
