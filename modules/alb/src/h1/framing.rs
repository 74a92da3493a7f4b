//! How an HTTP/1.1 body is framed (RFC 9112 §6, §7.1), and its decoding
//! from a connection's read buffer: the origin's answers on the client side
//! and the clients' requests on the server side read bodies the same way.

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};

use http_body::Frame;

use super::{MAX_CHUNK_LINE, MAX_EXTENSIONS, MAX_HEAD, MAX_HEADERS};

/// How much of the body is left, by its framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// Bytes left of a sized body.
    Length(u64),
    Chunked(Chunk),
    /// Until the peer closes (answers only).
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

/// A body as it is read: its framing, and the chunk extensions seen so far.
#[derive(Debug)]
pub(super) struct Decoder {
    pub(super) kind: Kind,
    /// Bytes of chunk extensions so far (a chunked body).
    extensions: usize,
}

impl Decoder {
    pub(super) fn new(kind: Kind) -> Self {
        Decoder {
            kind,
            extensions: 0,
        }
    }

    pub(super) fn is_done(&self) -> bool {
        self.kind == Kind::Done
    }

    /// The next frame from what `buf` holds, if it makes one; `Err` says
    /// how the body breaks HTTP/1.1. A body that runs to the close is not
    /// done here: the reader marks it done when the peer closes.
    pub(super) fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Frame<Bytes>>, String> {
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
                        return Err(format!(
                            "its chunk extensions add up to more than {MAX_EXTENSIONS} bytes"
                        ));
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
                        return Err("a chunk not ended by CRLF".into());
                    }
                    buf.advance(2);
                    self.kind = Kind::Chunked(Chunk::Size);
                }
                Kind::Chunked(Chunk::Trailers) => {
                    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    let parsed = match httparse::parse_headers(buf, &mut slots) {
                        Ok(httparse::Status::Complete((len, fields))) => Some((len, fields)),
                        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => None,
                        _ => return Err("the trailers of a chunked body".into()),
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

/// The length a `Content-Length` value says (a list of equal values counts
/// as one), given the one already known.
pub(super) fn content_length(value: &[u8], known: Option<u64>) -> Result<Option<u64>, String> {
    let mut length = known;
    for digits in crate::headers::items(value) {
        if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
            return Err(format!(
                "Content-Length {:?}",
                String::from_utf8_lossy(value)
            ));
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
fn chunk_size(buf: &[u8]) -> Result<Option<(usize, u64, usize)>, String> {
    let window = &buf[..buf.len().min(MAX_CHUNK_LINE)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= MAX_CHUNK_LINE {
            Err(format!(
                "a chunk-size line longer than {MAX_CHUNK_LINE} bytes"
            ))
        } else {
            Ok(None)
        };
    };
    let bad = || {
        format!(
            "the chunk-size line {:?}",
            String::from_utf8_lossy(&buf[..lf])
        )
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
