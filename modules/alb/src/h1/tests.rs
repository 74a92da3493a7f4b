use std::time::Duration;

use http_body_util::{BodyExt, Empty, Full, StreamBody};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

use super::*;

/// An origin that takes one connection and, for each answer in turn,
/// reads a request (its head, and `body` bytes after it) and writes
/// the answer; what it read of each request is sent back on the
/// channel. After the last answer it closes.
async fn origin(
    exchanges: Vec<(usize, &'static [u8])>,
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        for (body, answer) in exchanges {
            let head_end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                let mut chunk = [0u8; 4096];
                let n = tcp.read(&mut chunk).await.unwrap();
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
            };
            while buf.len() < head_end + body {
                let mut chunk = [0u8; 4096];
                let n = tcp.read(&mut chunk).await.unwrap();
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let end = (head_end + body).min(buf.len());
            let _ = tx.send(buf.drain(..end).collect());
            tcp.write_all(answer).await.unwrap();
        }
    });
    (addr, rx)
}

async fn conn(addr: std::net::SocketAddr) -> Conn {
    Conn::new(Box::new(TcpStream::connect(addr).await.unwrap()))
}

fn request(method: Method, body: ProxyBody) -> Outgoing {
    Request::builder()
        .method(method)
        .uri("/path?q=1")
        .header("host", "origin.test")
        .header("x-one", "1")
        .body(body)
        .unwrap()
        .into()
}

fn empty() -> ProxyBody {
    Empty::<Bytes>::new().map_err(|e| match e {}).boxed()
}

/// Reads the whole body: its data, its trailers, and the connection
/// if it can be reused.
async fn read_all(resp: Response<Answer>) -> (Vec<u8>, Option<HeaderMap>, Option<Conn>) {
    let mut body = resp.into_body();
    let mut data = Vec::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap();
        match frame.into_data() {
            Ok(d) => data.extend_from_slice(&d),
            Err(f) => trailers = f.into_trailers().ok(),
        }
    }
    assert!(body.is_end_stream());
    (data, trailers, body.finish())
}

/// The answer's head as a client would get it: the origin's fields.
fn head_of(resp: &Response<Answer>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    resp.extensions()
        .get::<RawHead>()
        .expect("the origin's head")
        .append_to(&mut headers);
    headers
}

fn fails(r: Result<Response<Answer>, Failed>) -> Failed {
    match r {
        Ok(resp) => panic!("got an answer: {}", resp.status()),
        Err(f) => f,
    }
}

/// The answer to a `method` request with `body`, on a new connection to
/// `addr`.
async fn answer_to(
    addr: std::net::SocketAddr,
    method: Method,
    body: ProxyBody,
) -> Response<Answer> {
    match conn(addr).await.send(request(method, body)).await {
        Ok(resp) => resp,
        Err(f) => panic!("no answer: {}", f.error),
    }
}

/// Reads `body` until it fails, and says how; `whole` is the panic if it
/// ends instead.
async fn body_error(body: &mut Answer, whole: &str) -> Error {
    loop {
        match body.frame().await {
            Some(Ok(_)) => continue,
            Some(Err(e)) => return e,
            None => panic!("{whole}"),
        }
    }
}

#[tokio::test]
async fn a_sized_answer_is_read_and_its_connection_reused() {
    let (addr, mut seen) = origin(vec![
        (
            0,
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: b\r\n\r\nhello",
        ),
        (0, b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"),
    ])
    .await;
    let c = conn(addr).await;
    let resp = c.send(request(Method::GET, empty())).await.ok().unwrap();
    assert_eq!(resp.status(), 200);
    let head = head_of(&resp);
    assert_eq!(head["x-a"], "b");
    assert_eq!(head[CONTENT_LENGTH], "5");
    let (data, trailers, c) = read_all(resp).await;
    assert_eq!(data, b"hello");
    assert!(trailers.is_none());
    let c = c.expect("the connection comes back");
    assert!(c.reused());
    let head = String::from_utf8(seen.recv().await.unwrap()).unwrap();
    assert_eq!(
        head,
        "GET /path?q=1 HTTP/1.1\r\nhost: origin.test\r\nx-one: 1\r\n\r\n"
    );
    let resp = c.send(request(Method::GET, empty())).await.ok().unwrap();
    assert_eq!(resp.status(), 404);
    // An empty body is over as soon as the head is in.
    assert!(resp.body().is_end_stream());
    let (data, _, c) = read_all(resp).await;
    assert!(data.is_empty());
    assert!(c.is_some());
}

#[tokio::test]
async fn a_chunked_answer_is_decoded_with_its_trailers() {
    let (addr, _seen) = origin(vec![(
        0,
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
          5;ext=1\r\nhello\r\n1\r\n!\r\n0\r\ngrpc-status: 0\r\n\r\n",
    )])
    .await;
    let resp = answer_to(addr, Method::GET, empty()).await;
    let (data, trailers, c) = read_all(resp).await;
    assert_eq!(data, b"hello!");
    assert_eq!(trailers.unwrap()["grpc-status"], "0");
    assert!(
        c.is_some(),
        "a chunked answer read to its end leaves the connection usable"
    );
}

#[tokio::test]
async fn head_204_and_304_answers_have_no_body_whatever_their_length_says() {
    let (addr, _seen) = origin(vec![
        (0, b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n"),
        (0, b"HTTP/1.1 204 No Content\r\n\r\n"),
        (0, b"HTTP/1.1 304 Not Modified\r\ncontent-length: 7\r\n\r\n"),
        (0, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
    ])
    .await;
    let mut c = conn(addr).await;
    for (method, status, body) in [
        (Method::HEAD, 200, &b""[..]),
        (Method::GET, 204, b""),
        (Method::GET, 304, b""),
        (Method::GET, 200, b"ok"),
    ] {
        let resp = c.send(request(method, empty())).await.ok().unwrap();
        assert_eq!(resp.status(), status);
        let (data, _, next) = read_all(resp).await;
        assert_eq!(data, body);
        c = next.expect("reusable");
    }
}

#[tokio::test]
async fn an_answer_with_both_a_coding_and_a_length_is_chunked_and_not_reused() {
    let (addr, _seen) = origin(vec![(
        0,
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n\
          5\r\nhello\r\n0\r\n\r\n",
    )])
    .await;
    let resp = answer_to(addr, Method::GET, empty()).await;
    assert!(
        head_of(&resp).get(CONTENT_LENGTH).is_none(),
        "the length is not passed on"
    );
    let (data, _, c) = read_all(resp).await;
    assert_eq!(data, b"hello");
    assert!(c.is_none());
}

#[tokio::test]
async fn empty_header_values_are_kept_empty() {
    let (addr, _seen) = origin(vec![(
        0,
        b"HTTP/1.1 200 OK\r\nx-empty:\r\nx-blank:   \r\ncontent-length: 0\r\n\r\n",
    )])
    .await;
    let resp = answer_to(addr, Method::GET, empty()).await;
    let head = head_of(&resp);
    assert_eq!(head["x-empty"], "");
    assert_eq!(head["x-blank"], "");
}

#[tokio::test]
async fn an_answer_without_a_length_runs_to_the_close_and_is_not_reused() {
    let (addr, _seen) = origin(vec![(0, b"HTTP/1.1 200 OK\r\n\r\nall of it")]).await;
    let resp = answer_to(addr, Method::GET, empty()).await;
    let (data, _, c) = read_all(resp).await;
    assert_eq!(data, b"all of it");
    assert!(c.is_none());
}

#[tokio::test]
async fn interim_answers_are_skipped() {
    let (addr, _seen) = origin(vec![(
        0,
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n\
          HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n",
    )])
    .await;
    let resp = answer_to(addr, Method::GET, empty()).await;
    assert_eq!(resp.status(), 201);
    assert!(head_of(&resp).get("link").is_none());
}

#[tokio::test]
async fn broken_answers_are_errors_that_say_what_is_wrong() {
    let too_many = format!(
        "HTTP/1.1 200 OK\r\n{}\r\n",
        "x-h: 1\r\n".repeat(MAX_HEADERS + 1)
    );
    let too_long = format!("HTTP/1.1 200 OK\r\nx-h: {}", "a".repeat(MAX_HEAD));
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            b"HTTP/1.1 2x0 OK\r\n\r\n".to_vec(),
            "invalid response status",
        ),
        (too_many.into_bytes(), "more than 100 headers"),
        (too_long.into_bytes(), "longer than 65536 bytes"),
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok".to_vec(),
            "two different Content-Length",
        ),
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n".to_vec(),
            "Content-Length",
        ),
        (
            b"HTTP/1.1 200 OK\r\ncontent-le".to_vec(),
            "in the middle of its head",
        ),
        (
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n".to_vec(),
            "asked for no upgrade",
        ),
    ];
    for (answer, says) in cases {
        let answer: &'static [u8] = Box::leak(answer.into_boxed_slice());
        let (addr, _seen) = origin(vec![(0, answer)]).await;
        let failed = fails(conn(addr).await.send(request(Method::GET, empty())).await);
        assert!(failed.unsent.is_none());
        let text = failed.error.to_string();
        assert!(text.contains(says), "{text:?} should say {says:?}");
    }
}

#[tokio::test]
async fn a_body_cut_short_is_an_error_and_the_connection_is_dropped() {
    for answer in [
        &b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf"[..],
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
    ] {
        let (addr, _seen) = origin(vec![(0, answer)]).await;
        let resp = answer_to(addr, Method::GET, empty()).await;
        let mut body = resp.into_body();
        let err = body_error(&mut body, "the body ended without an error").await;
        assert!(
            err.to_string().contains("body") || err.to_string().contains("chunk"),
            "{err}"
        );
        assert!(body.finish().is_none());
    }
}

#[tokio::test]
async fn a_sized_request_body_is_sent_with_its_length() {
    let (addr, mut seen) =
        origin(vec![(11, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")]).await;
    let body = Full::new(Bytes::from_static(b"hello world"))
        .map_err(|e| match e {})
        .boxed();
    let mut req = request(Method::POST, body);
    // The client's own framing is not passed on: the ALB frames what it
    // sends.
    req.req
        .headers_mut()
        .insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    let resp = conn(addr).await.send(req).await.ok().unwrap();
    assert_eq!(resp.status(), 200);
    let got = String::from_utf8(seen.recv().await.unwrap()).unwrap();
    assert_eq!(
        got,
        "POST /path?q=1 HTTP/1.1\r\nhost: origin.test\r\nx-one: 1\r\n\
         content-length: 11\r\n\r\nhello world"
    );
}

#[tokio::test]
async fn a_request_body_of_unknown_length_is_chunked_with_its_trailers() {
    let sent = b"POST /path?q=1 HTTP/1.1\r\nhost: origin.test\r\nx-one: 1\r\n\
                 transfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\nx-sum: 5\r\n\r\n";
    let body_len = sent.len() - sent.windows(4).position(|w| w == b"\r\n\r\n").unwrap() - 4;
    let (addr, mut seen) = origin(vec![(
        body_len,
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
    )])
    .await;
    let mut trailers = HeaderMap::new();
    trailers.insert("x-sum", HeaderValue::from_static("5"));
    let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
        Ok(Frame::data(Bytes::from_static(b"abc"))),
        Ok(Frame::data(Bytes::new())),
        Ok(Frame::data(Bytes::from_static(b"de"))),
        Ok(Frame::trailers(trailers)),
    ];
    let body = StreamBody::new(futures::stream::iter(frames)).boxed();
    let resp = answer_to(addr, Method::POST, body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(seen.recv().await.unwrap(), sent.to_vec());
}

#[tokio::test]
async fn an_empty_post_says_its_length_is_zero() {
    let (addr, mut seen) = origin(vec![(0, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")]).await;
    answer_to(addr, Method::POST, empty()).await;
    let got = String::from_utf8(seen.recv().await.unwrap()).unwrap();
    assert!(got.ends_with("content-length: 0\r\n\r\n"), "{got}");
}

#[tokio::test]
async fn a_failing_request_body_is_reported_as_the_request_bodys_failure() {
    let (addr, _seen) = origin(vec![(0, b"HTTP/1.1 200 OK\r\n\r\n")]).await;
    let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
        Ok(Frame::data(Bytes::from_static(b"abc"))),
        Err("the client went away".into()),
    ];
    let body = StreamBody::new(futures::stream::iter(frames)).boxed();
    let failed = fails(conn(addr).await.send(request(Method::POST, body)).await);
    assert!(matches!(failed.error, Error::RequestBody(_)));
    use std::error::Error as _;
    assert_eq!(
        failed.error.source().unwrap().to_string(),
        "the client went away"
    );
}

#[tokio::test]
async fn an_early_answer_is_returned_when_the_origin_stops_reading_the_body() {
    // Answers 413 after the head and closes without reading the body.
    // 64 MiB: more than the sockets hold, so the write fails (the
    // origin resets) before the whole body is out.
    let (addr, _seen) = origin(vec![(
        0,
        b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 3\r\nconnection: close\r\n\r\nbig",
    )])
    .await;
    let big = Bytes::from(vec![b'x'; 64 << 20]);
    let body = Full::new(big).map_err(|e| match e {}).boxed();
    let resp = conn(addr).await.send(request(Method::PUT, body)).await;
    let resp = match resp {
        Ok(resp) => resp,
        Err(f) => panic!("the early answer was lost: {}", f.error),
    };
    assert_eq!(resp.status(), 413);
    let (data, _, c) = read_all(resp).await;
    assert_eq!(data, b"big");
    assert!(
        c.is_none(),
        "an answer to a request not sent whole ends its connection"
    );
}

#[tokio::test]
async fn a_reused_connection_the_origin_closed_gives_back_a_get_not_a_post() {
    for (method, given_back) in [(Method::GET, true), (Method::POST, false)] {
        let (addr, _seen) =
            origin(vec![(0, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")]).await;
        let resp = answer_to(addr, Method::GET, empty()).await;
        let (_, _, c) = read_all(resp).await;
        let mut c = c.unwrap();
        // The origin closes after its one answer.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !c.is_usable(),
            "a connection the origin closed is not usable"
        );
        let failed = fails(c.send(request(method.clone(), empty())).await);
        assert_eq!(
            failed.unsent.is_some(),
            given_back,
            "{method}: {}",
            failed.error
        );
    }
}

#[tokio::test]
async fn bytes_beyond_the_answer_keep_the_connection_from_the_pool() {
    let (addr, _seen) = origin(vec![(
        0,
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n",
    )])
    .await;
    let mut c = conn(addr).await;
    assert!(c.is_usable());
    let resp = c.send(request(Method::GET, empty())).await.ok().unwrap();
    // Bytes beyond the answer: the connection is not given back.
    let (data, _, c) = read_all(resp).await;
    assert_eq!(data, b"ok");
    assert!(c.is_none());
}

#[tokio::test]
async fn an_idle_connection_is_not_usable_once_the_origin_sends_unasked() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (go, wait) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let _ = tcp.read(&mut buf).await.unwrap();
        tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await
            .unwrap();
        let _ = wait.await;
        tcp.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    let resp = answer_to(addr, Method::GET, empty()).await;
    let (_, _, c) = read_all(resp).await;
    let mut c = c.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(c.is_usable(), "nothing has come: usable");
    go.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!c.is_usable(), "bytes nobody asked for came");
}

/// An origin that answers at once, keeps its connection open, and
/// reads the body only if `read` (echoing it back when `echo`).
async fn streaming_origin(read: bool, echo: bool, answer: &'static [u8]) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let (mut rd, mut wr) = tcp.into_split();
        let mut buf = vec![0u8; 64 * 1024];
        let mut head = Vec::new();
        let body_start = loop {
            let n = rd.read(&mut buf).await.unwrap();
            head.extend_from_slice(&buf[..n]);
            if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                break head.split_off(i + 4);
            }
        };
        wr.write_all(answer).await.unwrap();
        if !read {
            tokio::time::sleep(Duration::from_secs(30)).await;
            return;
        }
        if echo {
            wr.write_all(&body_start).await.unwrap();
        }
        loop {
            let n = rd.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            if echo {
                wr.write_all(&buf[..n]).await.unwrap();
            }
        }
    });
    addr
}

/// A body of `n` bytes in 64 KiB frames, its length unknown.
fn streamed(n: usize) -> ProxyBody {
    let frames = (0..n.div_ceil(65536)).map(move |i| {
        let len = (n - i * 65536).min(65536);
        Ok::<_, BoxError>(Frame::data(Bytes::from(vec![b'x'; len])))
    });
    StreamBody::new(futures::stream::iter(frames)).boxed()
}

#[tokio::test]
async fn an_origin_that_echoes_as_it_reads_gets_the_whole_body_and_answers_it() {
    // Sized, so the echo is the body byte for byte: 8 MiB, more than
    // the sockets hold, so neither side can write it all before the
    // other reads.
    let n = 8 << 20;
    let answer: &'static [u8] = Box::leak(
        format!("HTTP/1.1 200 OK\r\ncontent-length: {n}\r\n\r\n")
            .into_bytes()
            .into_boxed_slice(),
    );
    let addr = streaming_origin(true, true, answer).await;
    let body = Full::new(Bytes::from(vec![b'x'; n]))
        .map_err(|e| match e {})
        .boxed();
    let exchange = async {
        let resp = answer_to(addr, Method::PUT, body).await;
        read_all(resp).await
    };
    let (data, _, c) = tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .expect("the echo finished (no side waits on the other)");
    assert_eq!(data.len(), n);
    assert!(
        c.is_none(),
        "an answer that came before the body went is not reused"
    );
}

#[tokio::test]
async fn an_early_answer_from_an_origin_that_stops_reading_but_stays_reaches_the_client() {
    let addr = streaming_origin(
        false,
        false,
        b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 3\r\n\r\nbig",
    )
    .await;
    let exchange = async {
        let resp = answer_to(addr, Method::PUT, streamed(64 << 20)).await;
        let status = resp.status();
        (status, read_all(resp).await)
    };
    let (status, (data, _, c)) = tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .expect("the answer came while the body could not go");
    assert_eq!(status, 413);
    assert_eq!(data, b"big");
    assert!(c.is_none());
}

#[tokio::test]
async fn lax_framing_from_an_origin_is_refused() {
    let cases: [(&'static [u8], &str); 7] = [
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\r\n", "chunk-size line"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n \r\n", "chunk-size line"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;a\nb\r\nhello\r\n0\r\n\r\n", "chunk-size line"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5 x\r\nhello\r\n0\r\n\r\n", "chunk-size line"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n11111111111111111\r\n", "chunk-size line"),
        (b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n", "HTTP/1.0"),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            "only chunked",
        ),
    ];
    for (answer, says) in cases {
        let (addr, _seen) = origin(vec![(0, answer)]).await;
        let text = match conn(addr).await.send(request(Method::GET, empty())).await {
            Err(f) => f.error.to_string(),
            Ok(resp) => {
                let taken = format!("{:?} was taken", String::from_utf8_lossy(answer));
                body_error(&mut resp.into_body(), &taken).await.to_string()
            }
        };
        assert!(text.contains(says), "{text:?} should say {says:?}");
    }
    // Extensions are fine within bounds, and count against them.
    let (addr, _seen) = origin(vec![(
        0,
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2 ;a=\"b\";c\r\nok\r\n0\r\n\r\n",
    )])
    .await;
    let resp = answer_to(addr, Method::GET, empty()).await;
    assert_eq!(read_all(resp).await.0, b"ok");
}

#[tokio::test]
async fn request_trailers_that_would_override_the_proxys_headers_are_dropped() {
    let sent = b"POST /path?q=1 HTTP/1.1\r\nhost: origin.test\r\nx-one: 1\r\n\
                 transfer-encoding: chunked\r\n\r\n1\r\na\r\n0\r\nx-sum: 1\r\n\r\n";
    let body_len = sent.len() - sent.windows(4).position(|w| w == b"\r\n\r\n").unwrap() - 4;
    let (addr, mut seen) = origin(vec![(
        body_len,
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
    )])
    .await;
    let mut trailers = HeaderMap::new();
    for (name, value) in [
        ("x-sum", "1"),
        ("host", "evil.test"),
        ("content-length", "5"),
        ("x-forwarded-for", "6.6.6.6"),
        ("forwarded", "for=6.6.6.6"),
        ("x-request-id", "mine"),
        ("authorization", "Bearer x"),
    ] {
        trailers.insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
        Ok(Frame::data(Bytes::from_static(b"a"))),
        Ok(Frame::trailers(trailers)),
    ];
    let body = StreamBody::new(futures::stream::iter(frames)).boxed();
    answer_to(addr, Method::POST, body).await;
    assert_eq!(seen.recv().await.unwrap(), sent.to_vec());
}

#[tokio::test]
async fn a_body_sent_with_a_204_or_to_a_head_keeps_the_connection_from_the_pool() {
    for (method, answer) in [
        (Method::GET, &b"HTTP/1.1 204 No Content\r\n\r\nstray"[..]),
        (
            Method::HEAD,
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nstray",
        ),
    ] {
        let (addr, _seen) = origin(vec![(0, answer)]).await;
        let resp = answer_to(addr, method.clone(), empty()).await;
        let (data, _, c) = read_all(resp).await;
        assert!(data.is_empty());
        assert!(c.is_none(), "{method}: bytes after a body-less answer");
    }
}

/// A TLS origin for `origin.test` and a connector that trusts it.
fn tls_pair() -> (tokio_rustls::TlsAcceptor, tokio_rustls::TlsConnector) {
    let key = rcgen::generate_simple_self_signed(vec!["origin.test".to_string()]).unwrap();
    let cert = key.cert.der().clone();
    let private = rustls::pki_types::PrivateKeyDer::Pkcs8(key.signing_key.serialize_der().into());
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], private)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (
        tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server)),
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(client)),
    )
}

/// A TLS origin that reads one request head, writes `answer` in one
/// go, and then, if `close`, closes without a close_notify.
async fn tls_origin(answer: Vec<u8>, close: bool) -> Conn {
    let (acceptor, connector) = tls_pair();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let mut buf = [0u8; 4096];
        let _ = tls.read(&mut buf).await.unwrap();
        tls.write_all(&answer).await.unwrap();
        tls.flush().await.unwrap();
        if close {
            // The TCP connection ends; TLS is never closed.
            let (tcp, _) = tls.into_inner();
            drop(tcp);
        } else {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("origin.test").unwrap();
    Conn::new(Box::new(connector.connect(name, tcp).await.unwrap()))
}

#[tokio::test]
async fn tls_bytes_beyond_an_answer_that_filled_the_read_are_seen_before_reuse() {
    // An answer of exactly one read's worth, then another unasked, in
    // one flush: rustls holds the second once the first is read.
    let head = "HTTP/1.1 200 OK\r\ncontent-length: ";
    let first = READ_SIZE - head.len() - 9;
    let mut answer = format!("{head}{first:05}\r\n\r\n").into_bytes();
    answer.resize(READ_SIZE, b'x');
    answer.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nEVIL");
    let c = tls_origin(answer, false).await;
    let resp = c.send(request(Method::GET, empty())).await.ok().unwrap();
    let (data, _, c) = read_all(resp).await;
    assert_eq!(data.len(), first);
    // Nothing extra in the ALB's own buffer: the connection comes back,
    // and the check when it is next taken finds what rustls holds.
    let mut c = c.expect("the answer was read to its end, and nothing past it");
    assert!(
        !c.is_usable(),
        "decrypted bytes nobody asked for are waiting"
    );
}

#[tokio::test]
async fn a_reused_tls_connection_closed_without_close_notify_gives_back_a_get() {
    let c = tls_origin(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
        true,
    )
    .await;
    let resp = c.send(request(Method::GET, empty())).await.ok().unwrap();
    let (_, _, c) = read_all(resp).await;
    let c = c.expect("reusable");
    // Sent at once, before the close is seen.
    let failed = fails(c.send(request(Method::GET, empty())).await);
    assert!(failed.unsent.is_some(), "{}", failed.error);
}

#[tokio::test]
async fn a_request_body_that_fails_after_an_early_answer_ends_the_exchange() {
    // The origin answers at once and echoes; the client's body sends a
    // little, then fails (cut off, or over the limit).
    let addr = streaming_origin(
        true,
        true,
        b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n",
    )
    .await;
    let first = futures::stream::iter(vec![Ok::<_, BoxError>(Frame::data(Bytes::from_static(
        b"some",
    )))]);
    let then_fail = futures::stream::once(async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        Err::<Frame<Bytes>, BoxError>("the client went away".into())
    });
    let body = StreamBody::new(futures::StreamExt::chain(first, then_fail)).boxed();
    let exchange = async {
        let resp = answer_to(addr, Method::PUT, body).await;
        let mut body = resp.into_body();
        let error = body_error(&mut body, "the answer ended as if whole").await;
        (error.to_string(), body.finish().is_none())
    };
    let (error, dropped) = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("the exchange ended (the origin is not left waiting)");
    assert!(error.contains("the client went away"), "{error}");
    assert!(dropped);
}

#[tokio::test]
async fn hop_by_hop_fields_and_those_connection_names_are_not_passed_on() {
    let (addr, _seen) = origin(vec![(
        0,
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, x-secret\r\nKeep-Alive: timeout=5\r\n\
          X-Secret: 1\r\nUpgrade: h2c\r\nX-Kept: 2\r\nProxy-Connection: x\r\nContent-Length: 0\r\n\r\n",
    )])
    .await;
    let resp = answer_to(addr, Method::GET, empty()).await;
    let raw = resp.extensions().get::<RawHead>().unwrap();
    let fields: Vec<(&[u8], &[u8])> = raw.fields().collect();
    assert_eq!(fields, [(&b"X-Kept"[..], &b"2"[..])]);
    assert_eq!(raw.content_length, Some(0));
}
