//! A request head: parsed in place, framed strictly, and the answer the
//! server gives itself to one it refuses.

use super::respond::{put_date, status_line};
use super::*;
use crate::headers::items;

/// A request the server answers itself, and closes the connection after.
pub(super) struct Refusal {
    status: StatusCode,
    /// Its `alb_refused_total` reason.
    pub(super) reason: &'static str,
    message: String,
}

impl Refusal {
    fn new(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            status,
            reason,
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Refusal::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// A head that did not arrive within the limit.
    pub(super) fn late() -> Self {
        Refusal::new(
            StatusCode::REQUEST_TIMEOUT,
            "header_timeout",
            "the request headers did not arrive within the limit",
        )
    }

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        status_line(out, self.status);
        out.extend_from_slice(b"content-type: text/plain; charset=utf-8\r\ncontent-length: ");
        out.extend_from_slice(
            itoa::Buffer::new()
                .format(self.message.len() + 1)
                .as_bytes(),
        );
        out.extend_from_slice(b"\r\nconnection: close\r\n");
        put_date(out);
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(self.message.as_bytes());
        out.push(b'\n');
    }
}

pub(super) fn too_large(max: usize) -> Refusal {
    Refusal::new(
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "header_too_large",
        format!("the request's headers are larger than {max} bytes"),
    )
}

/// A request head as parsed, before its values are taken out of the bytes.
pub(super) struct Parsed {
    pub(super) len: usize,
    method: Method,
    http10: bool,
    target: Range<usize>,
    /// Each header's name, and its value's place in the head.
    headers: Vec<(HeaderName, Range<usize>)>,
}

/// Parses a request head from the start of `buf`: `None` if more is
/// needed.
pub(super) fn parse(buf: &[u8], settings: &Settings) -> Result<Option<Parsed>, Refusal> {
    let max = settings.max_headers;
    if max <= STACK_HEADERS {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; STACK_HEADERS];
        parse_with(buf, settings, &mut slots[..max])
    } else {
        let mut slots: Vec<_> = (0..max).map(|_| MaybeUninit::uninit()).collect();
        parse_with(buf, settings, &mut slots)
    }
}

fn parse_with<'b>(
    buf: &'b [u8],
    settings: &Settings,
    slots: &mut [MaybeUninit<httparse::Header<'b>>],
) -> Result<Option<Parsed>, Refusal> {
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, slots)
    {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "header_too_large",
                format!("the request has more than {} headers", settings.max_headers),
            ))
        }
        Err(e) => {
            return Err(Refusal::bad(format!(
                "the request head is not valid HTTP/1.1: {e}"
            )))
        }
    };
    if len > settings.max_head {
        return Err(too_large(settings.max_head));
    }
    let method = Method::from_bytes(req.method.unwrap_or_default().as_bytes())
        .map_err(|_| Refusal::bad("the request's method is not a token"))?;
    let target = place(buf, len, req.path.unwrap_or_default().as_bytes());
    let mut headers = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| Refusal::bad(format!("the header name {:?}", h.name)))?;
        headers.push((name, place(buf, len, h.value)));
    }
    Ok(Some(Parsed {
        len,
        method,
        http10: req.version == Some(0),
        target,
        headers,
    }))
}

impl Parsed {
    /// The request with its values taken from `bytes` (the head's own
    /// bytes, shared, not copied), and its framing.
    pub(super) fn build(self, bytes: &Bytes) -> Result<Head, Refusal> {
        let uri = Uri::from_maybe_shared(bytes.slice(self.target.clone())).map_err(|_| {
            Refusal::bad(format!(
                "the request target {:?}",
                String::from_utf8_lossy(&bytes[self.target])
            ))
        })?;
        let mut headers = HeaderMap::with_capacity(self.headers.len());
        let mut length = None;
        let mut chunked = None;
        let mut close = false;
        let mut keep_alive_asked = false;
        let mut connection_upgrade = false;
        let mut expect_continue = false;
        let mut trailers = false;
        for (name, range) in self.headers {
            let value = HeaderValue::from_maybe_shared(bytes.slice(range))
                .map_err(|_| Refusal::bad(format!("the value of header {name}")))?;
            // The headers that frame the message, read on the way.
            if name == CONTENT_LENGTH {
                length = content_length(value.as_bytes(), length).map_err(Refusal::bad)?;
            } else if name == TRANSFER_ENCODING {
                chunked = Some(transfer_coding(&value, chunked.is_some())?);
            } else if name == CONNECTION {
                for token in items(value.as_bytes()) {
                    close |= token.eq_ignore_ascii_case(b"close");
                    keep_alive_asked |= token.eq_ignore_ascii_case(b"keep-alive");
                    connection_upgrade |= token.eq_ignore_ascii_case(b"upgrade");
                }
            } else if name == EXPECT {
                expect_continue |= value.as_bytes().eq_ignore_ascii_case(b"100-continue");
            } else if name == TE {
                trailers |= items(value.as_bytes()).any(|t| t.eq_ignore_ascii_case(b"trailers"));
            }
            headers.append(name, value);
        }
        let body = match (chunked, length) {
            (Some(_), _) if self.http10 => {
                return Err(Refusal::bad("an HTTP/1.0 request with a Transfer-Encoding"))
            }
            (Some(_), Some(_)) => {
                return Err(Refusal::bad(
                    "the request has both a Transfer-Encoding and a Content-Length",
                ))
            }
            (Some(_), None) => Kind::Chunked(Chunk::Size),
            (None, Some(n)) if n > 0 => Kind::Length(n),
            (None, _) => Kind::Done,
        };
        let meta = Meta {
            http10: self.http10,
            keep_alive: !close && (!self.http10 || keep_alive_asked),
            head_only: self.method == Method::HEAD,
            expect_continue: expect_continue && !self.http10,
            upgrade: connection_upgrade && !self.http10 && headers.contains_key(UPGRADE),
            trailers,
        };
        let mut req = Request::new(http_body_util::Empty::new().map_err(|e| match e {}).boxed());
        *req.method_mut() = self.method;
        *req.uri_mut() = uri;
        *req.version_mut() = if self.http10 {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        *req.headers_mut() = headers;
        Ok(Head { req, meta, body })
    }
}

/// A `Transfer-Encoding` line: only `chunked` is taken, once, last (RFC
/// 9112 §6.3); `seen`: an earlier line named a coding.
fn transfer_coding(value: &HeaderValue, seen: bool) -> Result<bool, Refusal> {
    let mut codings = items(value.as_bytes()).filter(|t| !t.is_empty());
    match (codings.next(), codings.next()) {
        (None, _) if seen => Ok(true),
        (None, _) => Err(Refusal::bad(
            "the request's Transfer-Encoding names no coding",
        )),
        (Some(c), None) if c.eq_ignore_ascii_case(b"chunked") && !seen => Ok(true),
        (Some(c), None) if c.eq_ignore_ascii_case(b"chunked") => Err(Refusal::bad(
            "the request's Transfer-Encoding names chunked twice",
        )),
        _ => Err(Refusal::new(
            StatusCode::NOT_IMPLEMENTED,
            "bad_request",
            format!(
                "Transfer-Encoding {:?}: only chunked is accepted",
                String::from_utf8_lossy(value.as_bytes())
            ),
        )),
    }
}
