//! An answer written to the client: its head (the origin's fields as they
//! came, then the ALB's, then the framing), and its body as it comes.

use super::*;

/// How an answer's body goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    /// No body (a `HEAD` request, `1xx`, `204`, `304`).
    None,
    /// This many bytes left.
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client, length unknown).
    Close,
}

/// Writes `resp` to the client: its head, and its body as it comes.
/// `meta.keep_alive` ends up saying whether the connection can go on.
pub(super) async fn respond<S: Io>(
    link: &Shared<S>,
    resp: Response<ProxyBody>,
    meta: &mut Meta,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    let (parts, mut body) = resp.into_parts();
    let status = parts.status;
    let bodiless = meta.head_only
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    // An HTTP/1.1 origin's head, passed on as it came (its hop-by-hop
    // fields gone), before the headers the ALB set.
    let raw = parts.extensions.get::<RawHead>();
    let in_headers = match parts.headers.get(CONTENT_LENGTH) {
        Some(v) => Some(
            content_length(v.as_bytes(), None)
                .ok()
                .flatten()
                .ok_or_else(|| format!("the answer's Content-Length {v:?}"))?,
        ),
        None => None,
    };
    let declared = in_headers.or(raw.and_then(|r| r.content_length));
    let mut framing = if bodiless {
        Out::None
    } else if let Some(n) = declared {
        Out::Length(n)
    } else if let Some(n) = body.size_hint().exact() {
        Out::Length(n)
    } else if meta.http10 {
        Out::Close
    } else {
        Out::Chunked
    };
    if framing == Out::Close {
        meta.keep_alive = false;
    }
    // A request body not read to its end by now is not waited for: the
    // connection closes after this answer. (One still held, which may yet
    // be sent on while the answer streams, is not skipped.)
    if meta.keep_alive && !link.lock().body.is_done() {
        let unheld = Arc::strong_count(link) == 1;
        meta.keep_alive = unheld && link.lock().skip_buffered_body();
    }
    out.clear();
    status_line(out, status);
    let mut has_date = false;
    if let Some(raw) = raw {
        for (name, value) in raw.fields() {
            // The ALB's own headers (`x-request-id`) replace the origin's.
            if parts
                .headers
                .keys()
                .any(|own| own.as_str().as_bytes().eq_ignore_ascii_case(name))
            {
                continue;
            }
            has_date |= name.eq_ignore_ascii_case(b"date");
            put_line(out, name, value);
        }
    }
    for (name, value) in &parts.headers {
        if name == TRANSFER_ENCODING
            || (name == CONTENT_LENGTH
                && (status.is_informational() || status == StatusCode::NO_CONTENT))
        {
            continue;
        }
        if name == CONNECTION && status != StatusCode::SWITCHING_PROTOCOLS {
            continue;
        }
        has_date |= name == DATE;
        put_header(out, name, value);
    }
    // A bodiless answer to `HEAD` (or a `304`) says the length the body
    // would have, when known.
    let length = match framing {
        Out::Length(n) => Some(n),
        Out::None if status.is_informational() || status == StatusCode::NO_CONTENT => None,
        // (Not a zero measured: the upstream client's `HEAD` answer has no
        // body to measure, and a length of 0 would say something false.)
        Out::None if meta.head_only => {
            declared.or_else(|| body.size_hint().exact().filter(|&n| n > 0))
        }
        Out::None => declared,
        _ => None,
    };
    match (length, framing) {
        (Some(n), _) if in_headers.is_none() => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        (_, Out::Chunked) => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    if !has_date {
        put_date(out);
    }
    if status != StatusCode::SWITCHING_PROTOCOLS {
        if !meta.keep_alive {
            out.extend_from_slice(b"connection: close\r\n");
        } else if meta.http10 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
    if framing == Out::None || body.is_end_stream() {
        if let Out::Length(n) = framing {
            if n != 0 {
                return Err(format!("the answer's body is empty, its length says {n}"));
            }
        }
        if framing == Out::Chunked {
            out.extend_from_slice(b"0\r\n\r\n");
        }
        return write_out(link, out).await.map_err(|e| e.to_string());
    }
    let mut trailers = None;
    loop {
        // What is ready goes out with what came before; the write waits
        // until the body has nothing more at once (or a lot is gathered).
        let polled =
            std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await;
        let frame = match polled {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                write_out(link, out).await.map_err(|e| e.to_string())?;
                out.clear();
                body.frame().await
            }
        };
        let frame = match frame {
            None => break,
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return Err(format!("the answer's body failed: {e}")),
        };
        let frame = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                trailers = frame.into_trailers().ok();
                continue;
            }
        };
        if frame.is_empty() {
            continue;
        }
        match &mut framing {
            Out::Length(left) => {
                let n = frame.len() as u64;
                if n > *left {
                    return Err("the answer's body is longer than its length".into());
                }
                *left -= n;
                out.extend_from_slice(&frame);
            }
            Out::Chunked => {
                chunk_line(out, frame.len());
                out.extend_from_slice(&frame);
                out.extend_from_slice(b"\r\n");
            }
            Out::Close => out.extend_from_slice(&frame),
            Out::None => {}
        }
        if out.len() >= WRITE_SIZE {
            write_out(link, out).await.map_err(|e| e.to_string())?;
            out.clear();
        }
        if body.is_end_stream() {
            break;
        }
    }
    match framing {
        Out::Length(0) | Out::None | Out::Close => {}
        Out::Length(left) => {
            return Err(format!(
                "the answer's body ended {left} bytes short of its length"
            ))
        }
        Out::Chunked => {
            out.extend_from_slice(b"0\r\n");
            if let (Some(trailers), true) = (trailers, meta.trailers) {
                for (name, value) in &trailers {
                    put_header(out, name, value);
                }
            }
            out.extend_from_slice(b"\r\n");
        }
    }
    write_out(link, out).await.map_err(|e| e.to_string())
}

/// A chunk-size line (hexadecimal, no extensions).
fn chunk_line(out: &mut Vec<u8>, len: usize) {
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    let mut n = len;
    loop {
        at -= 1;
        digits[at] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(b"\r\n");
}

pub(super) fn status_line(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// `date: ...\r\n`, the text made once a second per thread.
pub(super) fn put_date(out: &mut Vec<u8>) {
    thread_local! {
        static DATE_TEXT: std::cell::RefCell<(u64, [u8; 29])> =
            const { std::cell::RefCell::new((u64::MAX, [0; 29])) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE_TEXT.with_borrow_mut(|(at, text)| {
        if *at != secs {
            let made = httpdate::fmt_http_date(now);
            if made.len() == text.len() {
                text.copy_from_slice(made.as_bytes());
                *at = secs;
            }
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(text);
        out.extend_from_slice(b"\r\n");
    });
}
