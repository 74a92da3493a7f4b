//! The answer from the origin: its head parsed and framed (RFC 9112 §6.3),
//! and its body read from the connection as it is polled.

use super::framing::{content_length, Chunk, Decoder, Kind};
use super::*;
use crate::headers::{connection_names, items};

/// Where a field's name and value are in its head's bytes.
type Place = (std::ops::Range<usize>, std::ops::Range<usize>);

/// An answer's head as parsed, before its header values are copied out.
pub(super) struct Parsed {
    pub(super) status: StatusCode,
    version: Version,
    /// Each header's name and value, as places in the head.
    headers: Vec<Place>,
}

/// A final answer's head.
pub(super) struct Head {
    pub(super) status: StatusCode,
    pub(super) version: Version,
    pub(super) raw: RawHead,
    pub(super) keep_alive: bool,
    /// `Transfer-Encoding`: whether there is one, and whether it names
    /// `chunked` (the only coding taken).
    te: Option<bool>,
    /// `Content-Length`, or why it is not one.
    length: Result<Option<u64>, String>,
}

/// An answer's head as the origin sent it, to be passed on: its bytes, and
/// the end-to-end fields in them (hop-by-hop ones, those `Connection`
/// names, and the framing ones left out). No header map is made for it:
/// the ALB's HTTP/1.1 server writes the fields as they came, and only an
/// HTTP/2 client's answer needs a map ([`RawHead::append_to`]). It rides in
/// the response's extensions; the response's own headers are those the ALB
/// adds.
///
/// Field names are kept as the origin wrote them, and only the few the
/// ALB acts on are told apart, by their bytes: no `HeaderName` is made for
/// each.
#[derive(Clone, Debug)]
pub struct RawHead {
    bytes: Bytes,
    /// Each field's name and value, as places in `bytes`.
    fields: Vec<Place>,
    /// The length the origin declared (its `Content-Length`), when the
    /// body is not chunked.
    pub content_length: Option<u64>,
}

impl RawHead {
    /// The head of a whole answer head in `head` (tests).
    #[cfg(test)]
    pub(super) fn parse(head: &'static [u8]) -> Self {
        let (len, parsed) = parse_head(head).unwrap().unwrap();
        parsed.build(&Bytes::from_static(&head[..len])).unwrap().raw
    }

    /// The fields in order: each name (as the origin wrote it) and value.
    pub fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields
            .iter()
            .map(|(name, value)| (&self.bytes[name.clone()], &self.bytes[value.clone()]))
    }

    /// Adds the fields (and `Content-Length`) to `headers`, values shared
    /// with the head's bytes, not copied.
    pub fn append_to(&self, headers: &mut HeaderMap) {
        headers.reserve(self.fields.len() + 1);
        for (name, value) in &self.fields {
            // (httparse took the name as a token, which a `HeaderName` is.)
            let Ok(name) = HeaderName::from_bytes(&self.bytes[name.clone()]) else {
                continue;
            };
            if let Ok(value) = HeaderValue::from_maybe_shared(self.bytes.slice(value.clone())) {
                headers.append(name, value);
            }
        }
        if let Some(n) = self.content_length {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(n));
        }
    }
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
    let headers = resp
        .headers
        .iter()
        .map(|h| (place(buf, len, h.name.as_bytes()), place(buf, len, h.value)))
        .collect();
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
    /// The head over `bytes` (its own bytes, shared, not copied), and how
    /// its body is framed.
    pub(super) fn build(self, bytes: &Bytes) -> Result<Head, Error> {
        let mut fields = Vec::with_capacity(self.headers.len());
        let mut close = false;
        let mut keep_alive_asked = false;
        // Headers `Connection` names beyond the usual tokens: dropped too.
        let mut named: Vec<HeaderName> = Vec::new();
        let mut te = None;
        let mut length = Ok(None);
        for (name_at, value_at) in self.headers {
            let name = &bytes[name_at.clone()];
            let value = &bytes[value_at.clone()];
            // The headers that frame the message, read on the way.
            let hop = crate::headers::hop_index_of(name);
            if hop == Some(crate::headers::HOP_CONNECTION) {
                for token in items(value) {
                    close |= token.eq_ignore_ascii_case(b"close");
                    keep_alive_asked |= token.eq_ignore_ascii_case(b"keep-alive");
                }
                connection_names(value, false, &mut named);
            } else if hop == Some(crate::headers::HOP_TRANSFER_ENCODING) {
                // Only `chunked` is spoken: another coding (gzip) would
                // reach the client undone, with nothing saying so. So the
                // body is chunked once a line names a coding; lines that
                // name none leave it to run to the close.
                let mut codings = items(value).filter(|t| !t.is_empty()).peekable();
                let named_any = codings.peek().is_some();
                if codings.any(|t| !t.eq_ignore_ascii_case(b"chunked")) {
                    return Err(Error::Answer(format!(
                        "Transfer-Encoding {:?}: only chunked is accepted",
                        String::from_utf8_lossy(value)
                    )));
                }
                te = Some(te == Some(true) || named_any);
            } else if name.eq_ignore_ascii_case(b"content-length") {
                length = length.and_then(|known| content_length(value, known));
            } else if hop.is_none() {
                fields.push((name_at, value_at));
            }
        }
        if !named.is_empty() {
            fields.retain(|(name, _)| {
                let name = &bytes[name.clone()];
                !named
                    .iter()
                    .any(|n| n.as_str().as_bytes().eq_ignore_ascii_case(name))
            });
        }
        let mut keep_alive = !close && (self.version == Version::HTTP_11 || keep_alive_asked);
        if te.is_some() && self.version == Version::HTTP_10 {
            // HTTP/1.0 has no codings: its framing cannot be trusted
            // (RFC 9112 §6.1).
            return Err(Error::Answer(
                "an HTTP/1.0 answer with a Transfer-Encoding".into(),
            ));
        }
        if te.is_some() && !matches!(length, Ok(None)) {
            // Both: the coding frames the body, and the length is not passed
            // on; such an answer may be an attempt to split the connection,
            // which is not used again (RFC 9112 §6.3).
            keep_alive = false;
            length = Ok(None);
        }
        Ok(Head {
            status: self.status,
            version: self.version,
            raw: RawHead {
                bytes: bytes.clone(),
                fields,
                content_length: length.as_ref().ok().copied().flatten(),
            },
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

/// An upstream answer's body, read from its connection as it is polled.
pub struct Answer {
    /// Until the body has been read to its end.
    pub(super) conn: Option<Conn>,
    /// The request body still going out, when the answer came first.
    pub(super) sending: Option<Box<Sending>>,
    pub(super) body: Decoder,
    pub(super) keep_alive: bool,
}

impl Answer {
    /// The connection, once the body has been read to its end, when it can
    /// serve another request.
    pub fn finish(&mut self) -> Option<Conn> {
        if !self.body.is_done() || !self.keep_alive {
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
        if self.body.kind == Kind::Length(0) {
            self.body.kind = Kind::Done;
        }
    }

    /// The next frame from what has been read, if it makes one.
    fn next_buffered(&mut self) -> Result<Option<Frame<Bytes>>, Error> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(None);
        };
        self.body.next(&mut conn.buf).map_err(Error::Answer)
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
                Ok(None) if this.body.is_done() => return Poll::Ready(None),
                Ok(None) => {}
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match poll_read(&mut *conn.io, &mut conn.buf, cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) if this.body.kind == Kind::Close => {
                    this.body.kind = Kind::Done;
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
        self.body.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.body.kind {
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
