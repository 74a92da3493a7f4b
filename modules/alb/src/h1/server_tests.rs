//! The HTTP/1.1 server against raw clients on loopback.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, StreamBody};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

use super::server::{serve, OnUpgrade, Service, Settings};
use super::*;
use crate::conn_timer::ConnTimer;

/// What the test service does with a request.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Reads the body and answers with what it got.
    Echo,
    /// Answers 413 without reading the body.
    Early,
    /// Answers with a body of unknown length, in two parts.
    Streamed,
    /// Answers 101 and echoes on the upgraded connection.
    Upgrade,
    /// Answers 200 with an empty body.
    Empty,
    /// Never answers; counts the requests dropped unanswered.
    Never,
    /// Passes on an origin's head, with an `x-request-id` of its own.
    Raw,
}

struct Svc {
    mode: Mode,
    refused: parking_lot::Mutex<Vec<&'static str>>,
    /// Requests whose answer was dropped before it was made.
    dropped: Arc<std::sync::atomic::AtomicUsize>,
}

/// Counts one when dropped.
struct CountDrop(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for CountDrop {
    fn drop(&mut self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

fn text(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut r = Response::new(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r
}

impl Service for Svc {
    fn call(
        &self,
        mut req: Request<ProxyBody>,
    ) -> impl Future<Output = Response<ProxyBody>> + Send {
        let mode = self.mode;
        let dropped = CountDrop(self.dropped.clone());
        async move {
            match mode {
                Mode::Echo => {
                    std::mem::forget(dropped);
                    let line = format!(
                        "{} {} {:?} x={:?}",
                        req.method(),
                        req.uri(),
                        req.version(),
                        req.headers()
                            .get("x")
                            .map(|v| v.to_str().unwrap_or("?").to_string()),
                    );
                    match req.into_body().collect().await {
                        Ok(body) => {
                            let body = body.to_bytes();
                            text(
                                StatusCode::OK,
                                format!("{line} body={}", String::from_utf8_lossy(&body)),
                            )
                        }
                        Err(e) => text(StatusCode::BAD_REQUEST, format!("body failed: {e}")),
                    }
                }
                Mode::Early => text(StatusCode::PAYLOAD_TOO_LARGE, "too large".into()),
                Mode::Empty => {
                    std::mem::forget(dropped);
                    Response::new(http_body_util::Empty::new().map_err(|e| match e {}).boxed())
                }
                Mode::Raw => {
                    std::mem::forget(dropped);
                    let mut r = text(StatusCode::OK, "raw".into());
                    r.extensions_mut().insert(super::RawHead::parse(
                        b"HTTP/1.1 200 OK\r\nX-Request-Id: origin\r\nDate: then\r\n\
                          Connection: x-gone\r\nX-Gone: 1\r\nX-Kept: 1\r\nContent-Length: 3\r\n\r\n",
                    ));
                    r.headers_mut()
                        .insert("x-request-id", HeaderValue::from_static("alb"));
                    r
                }
                Mode::Never => {
                    let _dropped = dropped;
                    std::future::pending().await
                }
                Mode::Streamed => {
                    let parts = ["first,", "second"]
                        .map(|p| Ok::<_, BoxError>(Frame::data(Bytes::from_static(p.as_bytes()))));
                    Response::new(BodyExt::boxed(StreamBody::new(futures::stream::iter(
                        parts,
                    ))))
                }
                Mode::Upgrade => {
                    let on = req
                        .extensions_mut()
                        .remove::<OnUpgrade>()
                        .expect("an upgrade");
                    tokio::spawn(async move {
                        let mut io = on.await.expect("upgraded");
                        let mut buf = [0u8; 64];
                        loop {
                            let n = io.read(&mut buf).await.unwrap_or(0);
                            if n == 0 {
                                break;
                            }
                            io.write_all(&buf[..n]).await.unwrap();
                        }
                    });
                    let mut r = text(StatusCode::SWITCHING_PROTOCOLS, String::new());
                    *r.body_mut() = http_body_util::Empty::new().map_err(|e| match e {}).boxed();
                    r.headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("upgrade"));
                    r.headers_mut()
                        .insert("upgrade", HeaderValue::from_static("echo"));
                    r
                }
            }
        }
    }

    fn refused(&self, reason: &'static str) {
        self.refused.lock().push(reason);
    }
}

const SETTINGS: Settings = Settings {
    max_head: 2048,
    max_headers: 10,
    header_timeout: Duration::from_millis(300),
    close_notify: false,
};

/// A server for one connection at a time, serving with `mode`: its
/// address, the service (to read what it refused), and the signal that
/// asks its connections to finish.
async fn server(
    mode: Mode,
) -> (
    std::net::SocketAddr,
    Arc<Svc>,
    switchyard_sdk::data::Closing,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = Arc::new(Svc {
        mode,
        refused: parking_lot::Mutex::new(Vec::new()),
        dropped: Arc::default(),
    });
    let closing = switchyard_sdk::data::Closing::new();
    let (s, c) = (svc.clone(), closing.clone());
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (s, c) = (s.clone(), c.clone());
            tokio::spawn(async move {
                let timer = ConnTimer::default();
                let deadline = tokio::time::Instant::now() + SETTINGS.header_timeout;
                serve(tcp, BytesMut::new(), deadline, SETTINGS, &timer, c, &*s).await;
            });
        }
    });
    (addr, svc, closing)
}

/// Everything the server sends until it closes (60 s at most).
async fn read_to_close(tcp: &mut TcpStream) -> String {
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), tcp.read_to_end(&mut got))
        .await
        .expect("the server closes")
        .ok();
    String::from_utf8_lossy(&got).into_owned()
}

/// One answer with a `Content-Length`: its head and its body. What came
/// after it (the next answers) is kept in `carry`.
async fn next_answer(tcp: &mut TcpStream, carry: &mut Vec<u8>) -> (String, String) {
    loop {
        if let Some(end) = carry.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&carry[..end + 4]).into_owned();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |n| n.trim().parse().unwrap());
            while carry.len() < end + 4 + len {
                read_more(tcp, carry).await;
            }
            let body = String::from_utf8_lossy(&carry[end + 4..end + 4 + len]).into_owned();
            carry.drain(..end + 4 + len);
            return (head, body);
        }
        read_more(tcp, carry).await;
    }
}

/// The one answer the server has sent: nothing comes after it.
async fn read_answer(tcp: &mut TcpStream) -> (String, String) {
    let mut carry = Vec::new();
    let answer = next_answer(tcp, &mut carry).await;
    assert!(carry.is_empty(), "bytes beyond the answer: {carry:?}");
    answer
}

async fn read_more(tcp: &mut TcpStream, buf: &mut Vec<u8>) {
    let mut chunk = [0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(60), tcp.read(&mut chunk))
        .await
        .expect("an answer in time")
        .unwrap();
    assert!(
        n > 0,
        "closed mid-answer: {:?}",
        String::from_utf8_lossy(buf)
    );
    buf.extend_from_slice(&chunk[..n]);
}

async fn client(addr: std::net::SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.unwrap()
}

#[tokio::test]
async fn requests_on_one_connection_are_answered_in_order_pipelined_or_not() {
    let (addr, _, _) = server(Mode::Echo).await;
    let mut c = client(addr).await;
    c.write_all(b"GET /one HTTP/1.1\r\nHost: a\r\nX: 1\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_answer(&mut c).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("\r\ndate: "), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    assert_eq!(body, "GET /one HTTP/1.1 x=Some(\"1\") body=");
    // Three at once, with bodies sized and chunked: three answers, in order.
    let mut carry = Vec::new();
    c.write_all(
        b"POST /two HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
          POST /three HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\n\
          GET /four?q HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .await
    .unwrap();
    for want in [
        "POST /two HTTP/1.1 x=None body=hello",
        "POST /three HTTP/1.1 x=None body=abcde",
        "GET /four?q HTTP/1.1 x=None body=",
    ] {
        let (_, body) = next_answer(&mut c, &mut carry).await;
        assert_eq!(body, want);
    }
    assert!(carry.is_empty(), "bytes beyond the answers: {carry:?}");
}

#[tokio::test]
async fn a_head_request_gets_the_length_but_no_body() {
    let (addr, _, _) = server(Mode::Echo).await;
    let mut c = client(addr).await;
    c.write_all(b"HEAD /h HTTP/1.1\r\nHost: a\r\n\r\nGET /g HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    while !String::from_utf8_lossy(&buf).contains("body=") {
        read_more(&mut c, &mut buf).await;
    }
    let got = String::from_utf8_lossy(&buf);
    let answers: Vec<&str> = got.split("HTTP/1.1 200 OK").collect();
    assert_eq!(answers.len(), 3, "{got}");
    // The HEAD answer says the length of the body it would have, and has
    // none.
    assert!(answers[1].contains("content-length: 29\r\n"), "{got}");
    assert!(answers[1].ends_with("\r\n\r\n"), "{got}");
    assert!(
        answers[2].ends_with("GET /g HTTP/1.1 x=None body="),
        "{got}"
    );
}

#[tokio::test]
async fn http_1_0_closes_unless_it_asks_to_keep_alive() {
    let (addr, _, _) = server(Mode::Echo).await;
    let mut c = client(addr).await;
    c.write_all(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_answer(&mut c).await;
    assert!(head.contains("connection: keep-alive\r\n"), "{head}");
    assert_eq!(body, "GET /a HTTP/1.0 x=None body=");
    c.write_all(b"GET /b HTTP/1.0\r\n\r\n").await.unwrap();
    let rest = read_to_close(&mut c).await;
    assert!(rest.contains("connection: close\r\n"), "{rest}");
    assert!(rest.ends_with("GET /b HTTP/1.0 x=None body="), "{rest}");
}

#[tokio::test]
async fn a_body_of_unknown_length_is_chunked_for_1_1_and_runs_to_the_close_for_1_0() {
    let (addr, _, _) = server(Mode::Streamed).await;
    let mut c = client(addr).await;
    c.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let got = read_to_close(&mut c).await;
    assert!(got.contains("transfer-encoding: chunked\r\n"), "{got}");
    assert!(
        got.ends_with("\r\n\r\n6\r\nfirst,\r\n6\r\nsecond\r\n0\r\n\r\n"),
        "{got}"
    );
    let mut c = client(addr).await;
    c.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let got = read_to_close(&mut c).await;
    assert!(!got.contains("transfer-encoding"), "{got}");
    assert!(got.ends_with("\r\n\r\nfirst,second"), "{got}");
}

#[tokio::test]
async fn broken_or_smuggling_heads_are_refused_and_the_connection_closed() {
    let (addr, svc, _) = server(Mode::Echo).await;
    let cases: [(&[u8], &str, &str); 8] = [
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 400 Bad Request",
            "both a Transfer-Encoding and a Content-Length",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "HTTP/1.1 501 Not Implemented",
            "only chunked is accepted",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "HTTP/1.1 400 Bad Request",
            "two different Content-Length values",
        ),
        (
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 400 Bad Request",
            "HTTP/1.0 request with a Transfer-Encoding",
        ),
        (
            b"GET / HTTP/1.1\r\nHost a\r\n\r\n",
            "HTTP/1.1 400 Bad Request",
            "not valid HTTP/1.1",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: ,\r\n\r\n",
            "HTTP/1.1 400 Bad Request",
            "names no coding",
        ),
        (
            b"GET / HTTP/1.1\r\nA: 1\r\nB: 1\r\nC: 1\r\nD: 1\r\nE: 1\r\nF: 1\r\nG: 1\r\nH: 1\r\nI: 1\r\nJ: 1\r\nK: 1\r\n\r\n",
            "HTTP/1.1 431 Request Header Fields Too Large",
            "more than 10 headers",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n\r\n",
            "HTTP/1.1 431 Request Header Fields Too Large",
            "larger than 2048 bytes",
        ),
    ];
    for (i, (bytes, status, why)) in cases.into_iter().enumerate() {
        let mut c = client(addr).await;
        let mut bytes = bytes.to_vec();
        if i == 7 {
            // A value that takes the head over 2048 bytes.
            bytes.splice(bytes.len() - 4..bytes.len() - 4, [b'x'; 2100]);
        }
        c.write_all(&bytes).await.unwrap();
        let got = read_to_close(&mut c).await;
        assert!(got.starts_with(status), "case {i}: {got}");
        assert!(got.contains("connection: close\r\n"), "case {i}: {got}");
        assert!(got.contains(why), "case {i}: {got}");
    }
    let refused = svc.refused.lock().clone();
    assert_eq!(
        refused,
        [
            "bad_request",
            "bad_request",
            "bad_request",
            "bad_request",
            "bad_request",
            "bad_request",
            "header_too_large",
            "header_too_large"
        ]
    );
}

#[tokio::test]
async fn a_head_that_never_ends_is_refused_at_the_size_limit_not_buffered() {
    let (addr, svc, _) = server(Mode::Echo).await;
    let mut c = client(addr).await;
    c.write_all(b"GET / HTTP/1.1\r\nX: ").await.unwrap();
    c.write_all(&[b'x'; 4000]).await.unwrap();
    let got = read_to_close(&mut c).await;
    assert!(got.starts_with("HTTP/1.1 431"), "{got}");
    assert_eq!(*svc.refused.lock(), ["header_too_large"]);
}

#[tokio::test]
async fn the_client_waiting_for_100_continue_gets_it_before_the_body_is_read() {
    let (addr, _, _) = server(Mode::Echo).await;
    let mut c = client(addr).await;
    c.write_all(
        b"PUT /up HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    while !buf.ends_with(b"\r\n\r\n") {
        read_more(&mut c, &mut buf).await;
    }
    assert_eq!(buf, b"HTTP/1.1 100 Continue\r\n\r\n");
    c.write_all(b"data").await.unwrap();
    let (head, body) = read_answer(&mut c).await;
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert_eq!(body, "PUT /up HTTP/1.1 x=None body=data");
}

#[tokio::test]
async fn an_early_answer_closes_the_connection_and_reaches_a_client_still_sending() {
    let (addr, _, _) = server(Mode::Early).await;
    let mut c = client(addr).await;
    // A client that waits for 100 Continue gets the final answer instead
    // (and no 100 after it).
    c.write_all(b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 9\r\n\r\n")
        .await
        .unwrap();
    let got = read_to_close(&mut c).await;
    assert!(
        got.starts_with("HTTP/1.1 413 Payload Too Large\r\n"),
        "{got}"
    );
    assert!(got.contains("connection: close\r\n"), "{got}");
    assert!(!got.contains("100 Continue"), "{got}");
    // One that sends a large body at once still reads the whole answer.
    let mut c = client(addr).await;
    let mut req = b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 400000\r\n\r\n".to_vec();
    req.resize(req.len() + 400_000, b'b');
    let (mut r, mut w) = c.split();
    let (_, got) = tokio::join!(
        async {
            let _ = w.write_all(&req).await;
        },
        async {
            let mut got = Vec::new();
            let _ = r.read_to_end(&mut got).await;
            String::from_utf8_lossy(&got).into_owned()
        }
    );
    assert!(
        got.starts_with("HTTP/1.1 413 Payload Too Large\r\n"),
        "{got}"
    );
    assert!(got.ends_with("too large"), "{got}");
}

#[tokio::test]
async fn a_body_cut_short_is_the_requests_failure() {
    let (addr, _, _) = server(Mode::Echo).await;
    let mut c = client(addr).await;
    c.write_all(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY")
        .await
        .unwrap();
    let got = read_to_close(&mut c).await;
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    assert!(got.contains("a chunk not ended by CRLF"), "{got}");
    let mut c = client(addr).await;
    c.write_all(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
        .await
        .unwrap();
    c.shutdown().await.unwrap();
    let got = read_to_close(&mut c).await;
    assert!(got.contains("in the middle of the request body"), "{got}");
}

#[tokio::test]
async fn a_late_head_gets_408_and_an_idle_connection_closes_quietly() {
    let (addr, svc, _) = server(Mode::Echo).await;
    // The first request's head, half sent.
    let mut c = client(addr).await;
    c.write_all(b"GET / HTTP/1.1\r\nHost:").await.unwrap();
    let got = read_to_close(&mut c).await;
    assert!(got.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{got}");
    // A first request that never starts gets a 408 too.
    let mut c = client(addr).await;
    let got = read_to_close(&mut c).await;
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    // After an answer, a connection with no next request just closes.
    let mut c = client(addr).await;
    c.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    read_answer(&mut c).await;
    let got = read_to_close(&mut c).await;
    assert_eq!(got, "");
    assert_eq!(*svc.refused.lock(), ["header_timeout", "header_timeout"]);
}

#[tokio::test]
async fn closing_ends_idle_connections_and_the_request_in_flight_says_close() {
    let (addr, _, closing) = server(Mode::Echo).await;
    let mut idle = client(addr).await;
    idle.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    read_answer(&mut idle).await;
    let mut busy = client(addr).await;
    busy.write_all(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    closing.close();
    assert_eq!(read_to_close(&mut idle).await, "");
    busy.write_all(b"ok").await.unwrap();
    let got = read_to_close(&mut busy).await;
    assert!(got.contains("connection: close\r\n"), "{got}");
    assert!(got.ends_with("body=ok"), "{got}");
}

#[tokio::test]
async fn an_upgrade_hands_over_the_connection_with_the_bytes_sent_ahead() {
    let (addr, _, _) = server(Mode::Upgrade).await;
    let mut c = client(addr).await;
    c.write_all(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nearly",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    while !String::from_utf8_lossy(&buf).ends_with("early") {
        read_more(&mut c, &mut buf).await;
    }
    let got = String::from_utf8_lossy(&buf).into_owned();
    assert!(
        got.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
        "{got}"
    );
    assert!(got.contains("connection: upgrade\r\n"), "{got}");
    assert!(got.contains("\r\n\r\nearly"), "{got}");
    c.write_all(b"later").await.unwrap();
    let mut later = [0u8; 5];
    c.read_exact(&mut later).await.unwrap();
    assert_eq!(&later, b"later");
}

#[tokio::test]
async fn a_head_answer_with_nothing_to_measure_claims_no_length() {
    let (addr, _, _) = server(Mode::Empty).await;
    let mut c = client(addr).await;
    c.write_all(
        b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let got = read_to_close(&mut c).await;
    let answers: Vec<&str> = got.split("HTTP/1.1 200 OK\r\n").skip(1).collect();
    assert_eq!(answers.len(), 2, "{got}");
    assert!(!answers[0].contains("content-length"), "{got}");
    assert!(answers[1].contains("content-length: 0\r\n"), "{got}");
}

#[tokio::test]
async fn a_client_that_leaves_before_its_answer_drops_the_exchange() {
    let (addr, svc, _) = server(Mode::Never).await;
    let mut c = client(addr).await;
    c.write_all(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(c);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while svc.dropped.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the exchange was not dropped"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn requests_sent_after_a_close_are_read_and_dropped_not_reset() {
    let (addr, _, _) = server(Mode::Echo).await;
    for _ in 0..20 {
        let mut c = client(addr).await;
        let mut req = b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".to_vec();
        for _ in 0..200 {
            req.extend_from_slice(b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n");
        }
        c.write_all(&req).await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(60), c.read_to_end(&mut got))
            .await
            .expect("the server closes")
            .expect("a clean close, not a reset");
        let got = String::from_utf8_lossy(&got);
        assert_eq!(got.matches("HTTP/1.1 200 OK").count(), 1, "{got}");
        assert!(got.ends_with("GET /a HTTP/1.1 x=None body="), "{got}");
    }
}

#[tokio::test]
async fn an_origins_head_goes_as_it_came_less_what_the_alb_replaces() {
    let (addr, _, _) = server(Mode::Raw).await;
    let mut c = client(addr).await;
    c.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_answer(&mut c).await;
    assert_eq!(
        head,
        "HTTP/1.1 200 OK\r\nDate: then\r\nX-Kept: 1\r\nx-request-id: alb\r\ncontent-length: 3\r\n\r\n"
    );
    assert_eq!(body, "raw");
}
