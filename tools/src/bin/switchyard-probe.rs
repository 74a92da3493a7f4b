//! `switchyard-probe URL`: exits 0 when an HTTP GET of `URL` answers 2xx,
//! 1 otherwise, saying why on stderr. The health check of Switchyard's
//! images, which have no shell and no curl.
//!
//! ```text
//! switchyard-probe http://127.0.0.1:9090/readyz [--timeout-ms 2000]
//! ```
//!
//! Plain HTTP/1.0 over TCP only: the admin ports it probes listen on the
//! container's loopback.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str = "usage: switchyard-probe http://HOST:PORT/PATH [--timeout-ms N]";

fn main() -> ExitCode {
    match run(std::env::args().skip(1).collect()) {
        Ok(status) => {
            println!("{status}");
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("switchyard-probe: {why}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Vec<String>) -> Result<String, String> {
    let mut url = None;
    let mut timeout = Duration::from_millis(2000);
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--timeout-ms" => {
                let ms = args
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .filter(|ms| *ms > 0)
                    .ok_or("--timeout-ms needs a positive number of milliseconds")?;
                timeout = Duration::from_millis(ms);
            }
            "-h" | "--help" => return Err(USAGE.into()),
            _ if url.is_none() => url = Some(arg),
            _ => return Err(format!("unexpected argument {arg:?}; {USAGE}")),
        }
    }
    let url = url.ok_or(USAGE)?;
    let (authority, path) = parse_url(&url)?;
    let addr = authority
        .to_socket_addrs()
        .map_err(|e| format!("{url}: cannot resolve {authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{url}: {authority} has no address"))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("{url}: connect to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("{url}: {e}"))?;
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nUser-Agent: switchyard-probe\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("{url}: sending the request: {e}"))?;
    // The status line is all a probe needs; read at most 4 KiB.
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 512];
    while !head.contains(&b'\n') && head.len() < 4096 {
        let n = stream
            .read(&mut buf)
            .map_err(|e| format!("{url}: reading the answer: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head
        .split(|b| *b == b'\n')
        .next()
        .map(|l| String::from_utf8_lossy(l).trim_end().to_string())
        .unwrap_or_default();
    match status_code(&line) {
        Some(code) if (200..300).contains(&code) => Ok(line),
        Some(_) => Err(format!("{url}: answered {line:?}")),
        None if line.is_empty() => Err(format!("{url}: closed without an answer")),
        None => Err(format!("{url}: not an HTTP answer: {line:?}")),
    }
}

/// `http://host:port/path` into (`host:port`, `/path`).
fn parse_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs are probed"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(format!("{url}: no host"));
    }
    let authority = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !authority.ends_with(']')
    {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok((authority, path.to_string()))
}

fn status_code(line: &str) -> Option<u16> {
    let mut parts = line.split_whitespace();
    parts.next().filter(|v| v.starts_with("HTTP/"))?;
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread;

    fn serve_once(answer: &'static str) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            conn.write_all(answer.as_bytes()).unwrap();
        });
        format!("http://{addr}/readyz")
    }

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("http://127.0.0.1:9090/readyz").unwrap(),
            ("127.0.0.1:9090".into(), "/readyz".into())
        );
        assert_eq!(
            parse_url("http://nlb").unwrap(),
            ("nlb:80".into(), "/".into())
        );
        assert_eq!(
            parse_url("http://[::1]:9/x").unwrap(),
            ("[::1]:9".into(), "/x".into())
        );
        assert!(parse_url("https://x/").is_err());
        assert!(parse_url("http:///x").is_err());
    }

    #[test]
    fn two_hundred_passes_and_others_fail_with_the_status() {
        let ok = serve_once("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
        assert_eq!(run(vec![ok]).unwrap(), "HTTP/1.1 200 OK");
        let bad = serve_once("HTTP/1.1 503 Service Unavailable\r\n\r\n");
        let err = run(vec![bad]).unwrap_err();
        assert!(err.contains("503"), "{err}");
        let junk = serve_once("SSH-2.0-nope\r\n");
        let err = run(vec![junk]).unwrap_err();
        assert!(err.contains("not an HTTP answer"), "{err}");
    }

    #[test]
    fn nothing_listening_names_the_address() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}/healthz");
        let err = run(vec![url, "--timeout-ms".into(), "500".into()]).unwrap_err();
        assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    }
}
