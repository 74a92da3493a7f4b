//! The request on its way to the origin: its head, and its body framed
//! and written while the answer may already be coming.

use super::*;
use crate::headers::{self, put_line};

/// How the request's body is framed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// Writes the request line and headers. `Content-Length` and
/// `Transfer-Encoding` are the ALB's to set: the body it sends is the
/// one it has, whatever the client's framing was.
pub(super) fn encode_head(
    out: &mut Vec<u8>,
    parts: &http::request::Parts,
    head: Option<&[u8]>,
    body: &ProxyBody,
) -> Framing {
    if let Some(head) = head {
        out.extend_from_slice(head);
    } else {
        request_line(out, &parts.method, &parts.uri);
        for (name, value) in &parts.headers {
            if name != CONTENT_LENGTH && name != TRANSFER_ENCODING {
                put_header(out, name, value);
            }
        }
    }
    let framing = if body.is_end_stream() {
        // A method that carries a body says it is empty.
        if matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
            out.extend_from_slice(b"content-length: 0\r\n");
        }
        Framing::None
    } else if let Some(n) = body.size_hint().exact() {
        out.extend_from_slice(format!("content-length: {n}\r\n").as_bytes());
        Framing::Length(n)
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Framing::Chunked
    };
    out.extend_from_slice(b"\r\n");
    framing
}

/// `METHOD /path?query HTTP/1.1`, its line end included.
pub fn request_line(out: &mut Vec<u8>, method: &Method, uri: &http::Uri) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(uri.path_and_query().map_or("/", |p| p.as_str()).as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
}

pub(super) fn put_header(out: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    put_line(out, name.as_str().as_bytes(), value.as_bytes());
}

/// A request body on its way out: what is gathered and not yet written.
pub(super) struct Sending {
    pub(super) out: Vec<u8>,
    /// How much of `out` is written.
    pub(super) at: usize,
    pub(super) body: ProxyBody,
    pub(super) framing: Framing,
    /// Bytes still due by the request's `Content-Length`.
    pub(super) left: Option<u64>,
    pub(super) trailers: Option<HeaderMap>,
    /// The body has ended (and its end is in `out`).
    pub(super) ended: bool,
}

impl Sending {
    /// Writes what is gathered and gathers more, until the body has gone
    /// (and been flushed) or nothing more can be done now.
    pub(super) fn poll_write(
        &mut self,
        io: &mut dyn Io,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), Error>> {
        loop {
            // What is written goes, so that `out` holds at most a write's
            // worth plus one frame, however the writes fall.
            if self.at > 0 {
                self.out.drain(..self.at);
                self.at = 0;
            }
            // Gather frames until there is a write's worth, or no more now.
            let mut waiting = false;
            while !self.ended && self.out.len() - self.at < WRITE_SIZE {
                match Pin::new(&mut self.body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => self.add(frame)?,
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(Error::RequestBody(e))),
                    Poll::Ready(None) => self.end()?,
                    Poll::Pending => {
                        waiting = true;
                        break;
                    }
                }
            }
            if self.at < self.out.len() {
                match Pin::new(&mut *io).poll_write(cx, &self.out[self.at..]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(Error::Io(
                            SENDING,
                            io::ErrorKind::WriteZero.into(),
                        )))
                    }
                    Poll::Ready(Ok(n)) => {
                        self.at += n;
                        if self.at == self.out.len() {
                            self.out.clear();
                            self.at = 0;
                        }
                        continue;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(Error::Io(SENDING, e))),
                    Poll::Pending => return Poll::Pending,
                }
            }
            // All gathered is written: out it goes (TLS holds records until
            // flushed), before the body is waited on or the answer read.
            match Pin::new(&mut *io).poll_flush(cx) {
                Poll::Ready(Ok(())) if self.ended => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) if waiting => return Poll::Pending,
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Error::Io(SENDING, e))),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn add(&mut self, frame: Frame<Bytes>) -> Result<(), Error> {
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                self.trailers = frame.into_trailers().ok();
                return Ok(());
            }
        };
        if data.is_empty() {
            return Ok(());
        }
        if let Some(left) = &mut self.left {
            *left = left
                .checked_sub(data.len() as u64)
                .ok_or(Error::RequestLength)?;
        }
        if self.framing == Framing::Chunked {
            self.out
                .extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
        }
        self.out.extend_from_slice(&data);
        if self.framing == Framing::Chunked {
            self.out.extend_from_slice(b"\r\n");
        }
        Ok(())
    }

    fn end(&mut self) -> Result<(), Error> {
        if self.left.is_some_and(|n| n > 0) {
            return Err(Error::RequestLength);
        }
        if self.framing == Framing::Chunked {
            self.out.extend_from_slice(b"0\r\n");
            for (name, value) in self.trailers.iter().flatten() {
                if trailer_allowed(name) {
                    put_header(&mut self.out, name, value);
                }
            }
            self.out.extend_from_slice(b"\r\n");
        }
        self.ended = true;
        Ok(())
    }
}

/// Whether a request trailer goes on: not one that frames, routes,
/// authenticates or describes the message (RFC 9110 §6.5.1), nor a
/// hop-by-hop one, nor one the ALB itself sets for the origin, which a
/// client could otherwise add after it.
fn trailer_allowed(name: &HeaderName) -> bool {
    use http::header::*;
    const NOT: &[HeaderName] = &[
        AUTHORIZATION,
        CACHE_CONTROL,
        CONTENT_ENCODING,
        CONTENT_LENGTH,
        CONTENT_RANGE,
        CONTENT_TYPE,
        COOKIE,
        EXPECT,
        HOST,
        MAX_FORWARDS,
        PRAGMA,
        RANGE,
        SET_COOKIE,
        TRAILER,
        VIA,
        WARNING,
    ];
    !NOT.contains(name) && !headers::is_hop_by_hop(name) && !headers::set_by_proxy(name)
}
