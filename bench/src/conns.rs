//! Many TCP connections at once, for `scripts/bench.sh l4`: each one sends
//! one small HTTP/1.1 request and reads the whole answer, so every connection
//! is known to reach the origin through the proxy under test. Then either all
//! of them are held open and idle (the proxy's memory per idle connection), or
//! each is closed as soon as it is answered (instructions per connection under
//! callgrind).
//!
//! Loopback only, and bounded: a count, a per-connection timeout, a deadline
//! for opening them all and a longest hold.

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::report::Errors;

/// The most connections one run may open.
pub const MAX_COUNT: usize = 60_000;

/// The longest answer head read before giving up on it.
const MAX_HEAD: usize = 16 * 1024;
/// The longest answer body read.
const MAX_BODY: usize = 1024 * 1024;

#[derive(Debug, Clone, clap::Args)]
pub struct ConnsArgs {
    /// The proxy (or origin) to connect to; a loopback address.
    #[arg(long)]
    pub addr: SocketAddr,
    /// How many connections to open.
    #[arg(long, default_value_t = 10_000)]
    pub count: usize,
    /// Connections being opened at the same time.
    #[arg(long, default_value_t = 128)]
    pub concurrency: usize,
    /// Spread the connections over this many source addresses, 127.0.0.1,
    /// 127.0.0.2, ... (more source ports than one address has).
    #[arg(long, default_value_t = 1)]
    pub sources: u8,
    /// The path each connection asks for (`GET PATH HTTP/1.1`).
    #[arg(long, default_value = "/")]
    pub path: String,
    /// Close each connection once it is answered, instead of holding them all.
    #[arg(long)]
    pub close: bool,
    /// Hold the connections at most this long (SIGTERM or SIGINT ends it
    /// sooner).
    #[arg(long, default_value_t = 120)]
    pub hold_secs: u64,
    /// Give up on a connection not answered within this time.
    #[arg(long, default_value_t = 10)]
    pub timeout_secs: u64,
    /// Give up on opening the rest after this time.
    #[arg(long, default_value_t = 120)]
    pub deadline_secs: u64,
}

/// Opens the connections, prints `ready opened=N failed=M secs=S`, holds them
/// (unless `--close`) until the hold ends or a signal comes, and prints
/// `done still_open=K opened=N`.
pub async fn run(args: ConnsArgs) -> Result<()> {
    if !args.addr.ip().is_loopback() {
        bail!("{}: only loopback addresses are allowed", args.addr);
    }
    if args.count == 0 || args.count > MAX_COUNT {
        bail!("--count {}: between 1 and {MAX_COUNT}", args.count);
    }
    if args.sources == 0 || !args.addr.is_ipv4() && args.sources > 1 {
        bail!("--sources {}: at least 1, and 1 for IPv6", args.sources);
    }
    let request = Arc::new(
        format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\n{}\r\n",
            args.path,
            args.addr,
            if args.close {
                "Connection: close\r\n"
            } else {
                ""
            }
        )
        .into_bytes(),
    );
    let timeout = Duration::from_secs(args.timeout_secs);
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.deadline_secs);
    let permits = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let mut tasks = JoinSet::new();
    for i in 0..args.count {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p?,
            _ = tokio::time::sleep_until(deadline) => break,
        };
        let source = source_addr(&args.addr, i, args.sources);
        let (addr, request, close) = (args.addr, request.clone(), args.close);
        tasks.spawn(async move {
            let r = tokio::time::timeout(timeout, open(source, addr, &request, close)).await;
            drop(permit);
            r.unwrap_or_else(|_| {
                Err(Failure::new(
                    "timeout",
                    format!("no answer within {timeout:?}"),
                ))
            })
        });
    }
    let mut held = Vec::with_capacity(if args.close { 0 } else { args.count });
    let mut opened = 0usize;
    let mut errors = Errors::default();
    while let Some(joined) = tasks.join_next().await {
        match joined.context("connection task")? {
            Ok(stream) => {
                opened += 1;
                held.extend(stream);
            }
            Err(f) => errors.add(f.kind, || f.detail),
        }
    }
    let failed = args.count - opened;
    println!(
        "ready opened={opened} failed={failed} secs={:.2}",
        start.elapsed().as_secs_f64()
    );
    if errors.total() > 0 {
        eprint!("{}", errors.describe());
    }
    if args.close {
        return Ok(());
    }
    hold(Duration::from_secs(args.hold_secs)).await?;
    let still_open = held.iter().filter(|s| is_open(s)).count();
    println!("done still_open={still_open} opened={opened}");
    Ok(())
}

/// The i-th connection's source: 127.0.0.(1 + i mod sources), any port;
/// `None` leaves it to the kernel.
fn source_addr(dest: &SocketAddr, i: usize, sources: u8) -> Option<SocketAddr> {
    if sources <= 1 || !dest.is_ipv4() {
        return None;
    }
    let host = 1 + (i % usize::from(sources)) as u8;
    Some(SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)),
        0,
    ))
}

/// Why one connection failed: a kind to count by, and what happened.
#[derive(Debug)]
struct Failure {
    kind: &'static str,
    detail: String,
}

impl Failure {
    fn new(kind: &'static str, detail: String) -> Self {
        Failure { kind, detail }
    }
}

/// Connects, sends the request and reads the whole answer; the stream back
/// unless `close`.
async fn open(
    source: Option<SocketAddr>,
    addr: SocketAddr,
    request: &[u8],
    close: bool,
) -> Result<Option<TcpStream>, Failure> {
    let io = |kind: &'static str| move |e: std::io::Error| Failure::new(kind, e.to_string());
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(io("socket"))?;
    if let Some(source) = source {
        socket.bind(source).map_err(io("bind"))?;
    }
    let mut stream = socket.connect(addr).await.map_err(io("connect"))?;
    stream.write_all(request).await.map_err(io("write"))?;
    read_answer(&mut stream).await?;
    if close {
        return Ok(None);
    }
    Ok(Some(stream))
}

/// Reads one HTTP/1.1 answer with a `Content-Length` body; fails unless it
/// is a 200.
async fn read_answer(stream: &mut TcpStream) -> Result<(), Failure> {
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(head) = parse_head(&buf)? {
            if buf.len() >= head.len + head.body {
                return Ok(());
            }
        } else if buf.len() > MAX_HEAD {
            return Err(Failure::new(
                "answer",
                format!("no end of head in {MAX_HEAD} bytes"),
            ));
        }
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| Failure::new("read", e.to_string()))?;
        if n == 0 {
            return Err(Failure::new(
                "closed",
                format!("closed after {} bytes of answer", buf.len()),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// An answer head: its length with the blank line, and the body's length.
#[derive(Debug, PartialEq)]
struct Head {
    len: usize,
    body: usize,
}

/// The head of `buf` once it is complete (`None` before); an error for
/// anything but `200` with a `Content-Length`.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, Failure> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(&buf[..end]);
    let mut lines = text.split("\r\n");
    let status = lines.next().unwrap_or_default();
    if status.split(' ').nth(1) != Some("200") {
        return Err(Failure::new("status", status.to_string()));
    }
    let body = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .ok_or_else(|| Failure::new("answer", "no Content-Length".to_string()))?;
    if body > MAX_BODY {
        return Err(Failure::new(
            "answer",
            format!("Content-Length {body} over {MAX_BODY}"),
        ));
    }
    Ok(Some(Head { len: end + 4, body }))
}

/// Until `longest` has passed, SIGTERM or SIGINT.
async fn hold(longest: Duration) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    tokio::select! {
        _ = tokio::time::sleep(longest) => {}
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// Whether the peer has not closed (or reset) the connection; data it sent
/// unasked counts as open.
fn is_open(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    match stream.try_read(&mut byte) {
        Ok(0) => false,
        Ok(_) => true,
        Err(e) => e.kind() == ErrorKind::WouldBlock,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_is_complete_only_with_its_blank_line() {
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n").unwrap(),
            None
        );
        let head = parse_head(b"HTTP/1.1 200 OK\r\nServer: x\r\ncontent-length:  1024\r\n\r\nab")
            .unwrap()
            .unwrap();
        assert_eq!(
            head,
            Head {
                len: 53,
                body: 1024
            }
        );
    }

    #[test]
    fn anything_but_a_200_with_a_length_fails() {
        let e = parse_head(b"HTTP/1.1 503 Service Unavailable\r\n\r\n").unwrap_err();
        assert_eq!(
            (e.kind, e.detail.as_str()),
            ("status", "HTTP/1.1 503 Service Unavailable")
        );
        let e = parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap_err();
        assert_eq!(e.kind, "answer");
    }

    #[test]
    fn sources_rotate_over_loopback_addresses() {
        let dest: SocketAddr = "127.0.0.1:80".parse().unwrap();
        assert_eq!(source_addr(&dest, 5, 1), None);
        let picked: Vec<_> = (0..4)
            .map(|i| source_addr(&dest, i, 3).unwrap().ip())
            .collect();
        let want: Vec<IpAddr> = ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(picked, want);
        assert_eq!(source_addr(&"[::1]:80".parse().unwrap(), 1, 3), None);
    }
}
