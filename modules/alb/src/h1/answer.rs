//! The answer from the origin: its head parsed and framed (RFC 9112 §6.3),
//! and its body read from the connection as it is polled.

use super::*;

/// An answer's head as parsed, before its header values are copied out.
pub(super) struct Parsed {
    pub(super) status: StatusCode,
    version: Version,
    /// Each header's name, and its value's place in the head.
    headers: Vec<(HeaderName, std::ops::Range<usize>)>,
}

/// A final answer's head.
pub(super) struct Head {
    pub(super) status: StatusCode,
    pub(super) version: Version,
    pub(super) headers: HeaderMap,
    pub(super) keep_alive: bool,
    /// `Transfer-Encoding`: whether there is one, and whether it names
    /// `chunked` (the only coding taken).
    te: Option<bool>,
    /// `Content-Length`, or why it is not one.
    length: Result<Option<u64>, String>,
}

/// Parses an answer's head from the start of `buf`: its length and the
/// head, or `None` if more is needed.
pub(super) fn parse_head(buf: &[u8]) -> Result<Option<(usize, Parsed)>, Error> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Error::Answer(format!(
                "it has more than {MAX_HEADERS} headers"
            )))
        }
        Err(e) => return Err(Error::Answer(e.to_string())),
    };
    let status = StatusCode::from_u16(resp.code.unwrap_or_default())
        .map_err(|_| Error::Answer(format!("status {:?}", resp.code)))?;
    let version = match resp.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let base = buf.as_ptr() as usize;
    let mut headers = Vec::with_capacity(resp.headers.len());
    for h in resp.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| Error::Answer(format!("header name {:?}", h.name)))?;
        // The value's place in `buf` (an empty value may point anywhere).
        let start = (h.value.as_ptr() as usize)
            .checked_sub(base)
            .filter(|&start| start + h.value.len() <= len)
            .unwrap_or(0);
        let end = if h.value.is_empty() {
            start
        } else {
            start + h.value.len()
        };
        headers.push((name, start..end));
    }
    Ok(Some((
        len,
        Parsed {
            status,
            version,
            headers,
        },
    )))
}

impl Parsed {
    /// The head with its values taken from `bytes` (the head's own bytes,
    /// shared, not copied).
    pub(super) fn build(self, bytes: &Bytes) -> Result<Head, Error> {
        let mut headers = HeaderMap::with_capacity(self.headers.len());
        let mut close = false;
        let mut keep_alive_asked = false;
        let mut te = None;
        let mut length = Ok(None);
        for (name, range) in self.headers {
            let value = HeaderValue::from_maybe_shared(bytes.slice(range))
                .map_err(|_| Error::Answer(format!("the value of header {name}")))?;
            // The headers that frame the message, read on the way.
            if name == CONNECTION {
                for token in value.as_bytes().split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    close |= token.eq_ignore_ascii_case(b"close");
                    keep_alive_asked |= token.eq_ignore_ascii_case(b"keep-alive");
                }
            } else if name == TRANSFER_ENCODING {
                // Only `chunked` is spoken: another coding (gzip) would
                // reach the client undone, with nothing saying so. So the
                // body is chunked once a line names a coding; lines that
                // name none leave it to run to the close.
                let mut codings = value
                    .as_bytes()
                    .split(|&b| b == b',')
                    .map(<[u8]>::trim_ascii)
                    .filter(|t| !t.is_empty())
                    .peekable();
                let named = codings.peek().is_some();
                if codings.any(|t| !t.eq_ignore_ascii_case(b"chunked")) {
                    return Err(Error::Answer(format!(
                        "Transfer-Encoding {value:?}: only chunked is accepted"
                    )));
                }
                te = Some(te == Some(true) || named);
            } else if name == CONTENT_LENGTH {
                length = length.and_then(|known| content_length(&value, known));
            }
            headers.append(name, value);
        }
        let mut keep_alive = !close && (self.version == Version::HTTP_11 || keep_alive_asked);
        if te.is_some() && self.version == Version::HTTP_10 {
            // HTTP/1.0 has no codings: its framing cannot be trusted
            // (RFC 9112 §6.1).
            return Err(Error::Answer(
                "an HTTP/1.0 answer with a Transfer-Encoding".into(),
            ));
        }
        if te.is_some() && headers.contains_key(CONTENT_LENGTH) {
            // Both: the coding frames the body, and the length is not passed
            // on; such an answer may be an attempt to split the connection,
            // which is not used again (RFC 9112 §6.3).
            headers.remove(CONTENT_LENGTH);
            keep_alive = false;
            length = Ok(None);
        }
        Ok(Head {
            status: self.status,
            version: self.version,
            headers,
            keep_alive,
            te,
            length,
        })
    }
}

impl Head {
    /// How the body is framed (RFC 9112 §6.3).
    pub(super) fn body_kind(&self, head_only: bool) -> Result<Kind, Error> {
        if head_only
            || self.status == StatusCode::NO_CONTENT
            || self.status == StatusCode::NOT_MODIFIED
        {
            return Ok(Kind::Length(0));
        }
        match (self.te, &self.length) {
            (Some(true), _) => Ok(Kind::Chunked(Chunk::Size)),
            // A coding named nowhere: the body runs to the close.
            (Some(false), _) => Ok(Kind::Close),
            (None, Ok(length)) => Ok(length.map_or(Kind::Close, Kind::Length)),
            (None, Err(why)) => Err(Error::Answer(why.clone())),
        }
    }
}

/// The length a `Content-Length` value says (a list of equal values counts
/// as one), given the one already known.
fn content_length(value: &HeaderValue, known: Option<u64>) -> Result<Option<u64>, String> {
    let mut length = known;
    for part in value.as_bytes().split(|&b| b == b',') {
        let digits = part.trim_ascii();
        if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
            return Err(format!("Content-Length {value:?}"));
        }
        let n = digits
            .iter()
            .fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
        if length.is_some_and(|l| l != n) {
            return Err("two different Content-Length values".into());
        }
        length = Some(n);
    }
    Ok(length)
}

/// A chunk-size line at the start of `buf` (RFC 9112 §7.1): its length
/// with the CRLF, the chunk's size, and the length of its extensions; `None`
/// if the line is not all there yet. Strict: one to 16 hex digits first,
/// extensions only after a `;`, no control characters, CRLF at the end.
fn chunk_size(buf: &[u8]) -> Result<Option<(usize, u64, usize)>, Error> {
    let window = &buf[..buf.len().min(MAX_CHUNK_LINE)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= MAX_CHUNK_LINE {
            Err(Error::Answer(format!(
                "a chunk-size line longer than {MAX_CHUNK_LINE} bytes"
            )))
        } else {
            Ok(None)
        };
    };
    let bad = || {
        Error::Answer(format!(
            "the chunk-size line {:?}",
            String::from_utf8_lossy(&buf[..lf])
        ))
    };
    let line = buf[..lf].strip_suffix(b"\r").ok_or_else(bad)?;
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(bad());
    }
    let size = line[..digits].iter().fold(0u64, |n, &d| {
        n << 4 | u64::from(char::from(d).to_digit(16).unwrap_or_default())
    });
    let rest = &line[digits..];
    let ext = rest.trim_ascii_start();
    let fine = |b: &u8| *b == b'\t' || (b' '..=b'~').contains(b) || *b >= 0x80;
    if !rest.iter().all(fine) || !(ext.is_empty() || ext[0] == b';') {
        return Err(bad());
    }
    Ok(Some((lf + 1, size, rest.len())))
}

/// What has been read of a body with `left` bytes to come, up to them, as a
/// frame, and how many are left after it; `None` if nothing has been read.
fn take_up_to(buf: &mut BytesMut, left: u64) -> Option<(Frame<Bytes>, u64)> {
    if buf.is_empty() {
        return None;
    }
    let n = (buf.len() as u64).min(left) as usize;
    Some((Frame::data(buf.split_to(n).freeze()), left - n as u64))
}

/// How much of the body is left, by its framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// Bytes left of a sized body.
    Length(u64),
    Chunked(Chunk),
    /// Until the origin closes.
    Close,
    /// Read to its end.
    Done,
}

/// Where a chunked body's reading is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Chunk {
    /// At a chunk-size line.
    Size,
    /// In a chunk's data, this much left.
    Data(u64),
    /// At the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: the trailers and the final CRLF.
    Trailers,
}

/// An upstream answer's body, read from its connection as it is polled.
pub struct Answer {
    /// Until the body has been read to its end.
    pub(super) conn: Option<Conn>,
    /// The request body still going out, when the answer came first.
    pub(super) sending: Option<Box<Sending>>,
    pub(super) kind: Kind,
    pub(super) keep_alive: bool,
    /// Bytes of chunk extensions so far (a chunked body).
    pub(super) extensions: usize,
}

impl Answer {
    /// The connection, once the body has been read to its end, when it can
    /// serve another request.
    pub fn finish(&mut self) -> Option<Conn> {
        if self.kind != Kind::Done || !self.keep_alive {
            return None;
        }
        let mut conn = self.conn.take()?;
        // Bytes beyond the answer were not asked for.
        if !conn.buf.is_empty() {
            return None;
        }
        conn.reused = true;
        Some(conn)
    }

    /// Marks an empty body done at once.
    pub(super) fn settle(&mut self) {
        if self.kind == Kind::Length(0) {
            self.kind = Kind::Done;
        }
    }

    /// The next frame from what has been read, if it makes one.
    fn next_buffered(&mut self) -> Result<Option<Frame<Bytes>>, Error> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(None);
        };
        let buf = &mut conn.buf;
        loop {
            match self.kind {
                Kind::Done => return Ok(None),
                Kind::Length(left) => {
                    let Some((frame, left)) = take_up_to(buf, left) else {
                        return Ok(None);
                    };
                    self.kind = if left == 0 {
                        Kind::Done
                    } else {
                        Kind::Length(left)
                    };
                    return Ok(Some(frame));
                }
                Kind::Close => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    return Ok(Some(Frame::data(buf.split().freeze())));
                }
                Kind::Chunked(Chunk::Size) => {
                    let Some((len, size, ext)) = chunk_size(buf)? else {
                        return Ok(None);
                    };
                    self.extensions += ext;
                    if self.extensions > MAX_EXTENSIONS {
                        return Err(Error::Answer(format!(
                            "its chunk extensions add up to more than {MAX_EXTENSIONS} bytes"
                        )));
                    }
                    buf.advance(len);
                    self.kind = Kind::Chunked(if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    });
                }
                Kind::Chunked(Chunk::Data(left)) => {
                    let Some((frame, left)) = take_up_to(buf, left) else {
                        return Ok(None);
                    };
                    self.kind = Kind::Chunked(if left == 0 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left)
                    });
                    return Ok(Some(frame));
                }
                Kind::Chunked(Chunk::DataEnd) => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(Error::Answer("a chunk not ended by CRLF".into()));
                    }
                    buf.advance(2);
                    self.kind = Kind::Chunked(Chunk::Size);
                }
                Kind::Chunked(Chunk::Trailers) => {
                    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    let parsed = match httparse::parse_headers(buf, &mut slots) {
                        Ok(httparse::Status::Complete((len, fields))) => Some((len, fields)),
                        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => None,
                        _ => return Err(Error::Answer("the trailers of a chunked body".into())),
                    };
                    let Some((len, fields)) = parsed else {
                        return Ok(None);
                    };
                    let mut trailers = HeaderMap::new();
                    for field in fields {
                        if let (Ok(name), Ok(value)) = (
                            HeaderName::from_bytes(field.name.as_bytes()),
                            HeaderValue::from_bytes(field.value),
                        ) {
                            trailers.append(name, value);
                        }
                    }
                    buf.advance(len);
                    self.kind = Kind::Done;
                    if !trailers.is_empty() {
                        return Ok(Some(Frame::trailers(trailers)));
                    }
                    return Ok(None);
                }
            }
        }
    }
}

impl Body for Answer {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        // The request body still going out, as far as it can now. When
        // the origin stops taking it, the answer may still come whole:
        // sending stops. When the client's body fails (cut, too long),
        // the origin would wait for the rest: the exchange ends here.
        if let (Some(sending), Some(conn)) = (this.sending.as_mut(), this.conn.as_mut()) {
            if let Poll::Ready(r) = sending.poll_write(&mut *conn.io, cx) {
                this.sending = None;
                match r {
                    Ok(()) => {}
                    Err(e @ Error::Io(..)) => {
                        tracing::debug!(error = %e, "the rest of the request body was not sent");
                    }
                    Err(e) => {
                        this.fail();
                        return Poll::Ready(Some(Err(e)));
                    }
                }
            }
        }
        loop {
            match this.next_buffered() {
                Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                Err(e) => {
                    this.fail();
                    return Poll::Ready(Some(Err(e)));
                }
                Ok(None) if this.kind == Kind::Done => return Poll::Ready(None),
                Ok(None) => {}
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match poll_read(&mut *conn.io, &mut conn.buf, cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) if this.kind == Kind::Close => {
                    this.kind = Kind::Done;
                    this.keep_alive = false;
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(0)) => {
                    this.fail();
                    return Poll::Ready(Some(Err(Error::Answer(
                        "the connection closed in the middle of its body".into(),
                    ))));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    this.fail();
                    return Poll::Ready(Some(Err(Error::Io("reading the answer", e))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.kind == Kind::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.kind {
            Kind::Length(n) => SizeHint::with_exact(n),
            Kind::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

impl Answer {
    /// After a failure the connection cannot be reused.
    fn fail(&mut self) {
        self.conn = None;
        self.keep_alive = false;
    }
}
