//! Redis: a command in RESP or as an inline line.
//!
//! **RESP** (what every client library and `redis-cli` send): `*`, an
//! element count of 1 to 1,048,576 in decimal, CRLF, then the first element,
//! `$`, a length of 1 to 64, CRLF, that many bytes of command name (a letter,
//! then letters, digits, `.`, `_` or `-`: module commands such as
//! `JSON.SET` included), CRLF. The verdict comes on the first byte that does
//! not fit, or when the command name's CRLF arrives. The name need not be a
//! known command: the framing is distinctive enough.
//!
//! **Inline** (what `telnet` or `printf 'PING\r\n' | nc` send): plain text,
//! so it is held to more: the first word must be one of [`INLINE_COMMANDS`]
//! (case-insensitive, as Redis is), and the whole line must arrive (LF or
//! CRLF), with no control characters but tab and CR. A line whose last word
//! starts with `HTTP/` is never Redis, so an HTTP request line such as
//! `GET / HTTP/1.1` (or `get / HTTP/1.1`) is not an inline `GET`.

use std::fmt;

use super::{Detect, Step, Verdict};

/// The largest RESP element count accepted (Redis's own default limit).
pub const MAX_ARRAY_LEN: u64 = 1024 * 1024;
/// The longest command name accepted in RESP.
pub const MAX_COMMAND_LEN: u64 = 64;

/// The commands an inline line may start with: the ones people type at a
/// Redis prompt or send from a script. Upper case; compared
/// case-insensitively.
pub const INLINE_COMMANDS: &[&str] = &[
    "APPEND",
    "AUTH",
    "BGSAVE",
    "BLPOP",
    "BRPOP",
    "CLIENT",
    "CLUSTER",
    "COMMAND",
    "CONFIG",
    "COPY",
    "DBSIZE",
    "DECR",
    "DECRBY",
    "DEL",
    "DISCARD",
    "ECHO",
    "EVAL",
    "EVALSHA",
    "EXEC",
    "EXISTS",
    "EXPIRE",
    "FLUSHALL",
    "FLUSHDB",
    "GET",
    "GETDEL",
    "GETSET",
    "HDEL",
    "HELLO",
    "HEXISTS",
    "HGET",
    "HGETALL",
    "HINCRBY",
    "HKEYS",
    "HLEN",
    "HMGET",
    "HMSET",
    "HSET",
    "HVALS",
    "INCR",
    "INCRBY",
    "INFO",
    "KEYS",
    "LASTSAVE",
    "LINDEX",
    "LLEN",
    "LPOP",
    "LPUSH",
    "LRANGE",
    "LREM",
    "LSET",
    "MGET",
    "MONITOR",
    "MOVE",
    "MSET",
    "MULTI",
    "OBJECT",
    "PERSIST",
    "PEXPIRE",
    "PING",
    "PSUBSCRIBE",
    "PTTL",
    "PUBLISH",
    "QUIT",
    "RANDOMKEY",
    "READONLY",
    "RENAME",
    "RESET",
    "ROLE",
    "RPOP",
    "RPUSH",
    "SADD",
    "SAVE",
    "SCAN",
    "SCARD",
    "SCRIPT",
    "SELECT",
    "SET",
    "SETEX",
    "SETNX",
    "SISMEMBER",
    "SLOWLOG",
    "SMEMBERS",
    "SPOP",
    "SREM",
    "STRLEN",
    "SUBSCRIBE",
    "TIME",
    "TTL",
    "TYPE",
    "UNLINK",
    "WATCH",
    "XADD",
    "XLEN",
    "XRANGE",
    "XREAD",
    "ZADD",
    "ZCARD",
    "ZINCRBY",
    "ZRANGE",
    "ZRANGEBYSCORE",
    "ZREM",
    "ZREVRANGE",
    "ZSCORE",
];

/// How the command was framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Form {
    Resp,
    Inline,
}

impl fmt::Display for Form {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Form::Resp => "resp",
            Form::Inline => "inline",
        })
    }
}

/// Reads the Redis command at the start of `buf`.
pub fn command(buf: &[u8]) -> Verdict<Form> {
    Detector::once(buf)
}

#[derive(Debug, Default)]
pub(crate) struct Detector {
    /// Inline: where the search for the end of the line resumes, once the
    /// command word is known.
    scan_from: usize,
}

impl Detect for Detector {
    type Found = Form;

    fn step(&mut self, buf: &[u8]) -> Step<Form> {
        match buf.first() {
            None => Step::NeedMore(1),
            Some(b'*') => resp(buf),
            Some(b) if b.is_ascii_alphabetic() => self.inline(buf),
            Some(_) => Step::NoMatch,
        }
    }
}

/// A RESP array's header and first bulk string; short, so parsed whole each
/// time (the sniffer asks again only once the bytes it waits for are there).
fn resp(buf: &[u8]) -> Step<Form> {
    let mut at = 1;
    let count = match decimal(buf, &mut at, MAX_ARRAY_LEN) {
        Ok(n) => n,
        Err(step) => return step,
    };
    if count == 0 {
        return Step::NoMatch;
    }
    match buf.get(at) {
        None => return Step::NeedMore(at + 1),
        Some(b'$') => at += 1,
        Some(_) => return Step::NoMatch,
    }
    let len = match decimal(buf, &mut at, MAX_COMMAND_LEN) {
        Ok(n) => n as usize,
        Err(step) => return step,
    };
    if len == 0 {
        return Step::NoMatch;
    }
    let name = &buf[at..buf.len().min(at + len)];
    let name_ok = name.iter().enumerate().all(|(i, &b)| {
        if i == 0 {
            b.is_ascii_alphabetic()
        } else {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
        }
    });
    if !name_ok {
        return Step::NoMatch;
    }
    if name.len() < len {
        // Each byte of the name can still rule it out.
        return Step::NeedMore(buf.len() + 1);
    }
    at += len;
    match crlf(buf, at) {
        Ok(()) => Step::Match(Form::Resp),
        Err(step) => step,
    }
}

/// A decimal number of 1 to 7 digits, at most `max`, then CRLF, at `*at`
/// (advanced past the CRLF).
fn decimal(buf: &[u8], at: &mut usize, max: u64) -> Result<u64, Step<Form>> {
    let start = *at;
    let mut n: u64 = 0;
    loop {
        match buf.get(*at) {
            None => return Err(Step::NeedMore(*at + 1)),
            Some(&d) if d.is_ascii_digit() && *at - start < 7 => {
                n = n * 10 + u64::from(d - b'0');
                if n > max {
                    return Err(Step::NoMatch);
                }
                *at += 1;
            }
            Some(b'\r') if *at > start => break,
            Some(_) => return Err(Step::NoMatch),
        }
    }
    crlf(buf, *at)?;
    *at += 2;
    Ok(n)
}

/// Whether `buf` has CRLF at `at`.
fn crlf(buf: &[u8], at: usize) -> Result<(), Step<Form>> {
    for (i, want) in [b'\r', b'\n'].into_iter().enumerate() {
        match buf.get(at + i) {
            None => return Err(Step::NeedMore(at + i + 1)),
            Some(&b) if b == want => {}
            Some(_) => return Err(Step::NoMatch),
        }
    }
    Ok(())
}

impl Detector {
    fn inline(&mut self, buf: &[u8]) -> Step<Form> {
        if self.scan_from == 0 {
            let word_end = buf
                .iter()
                .position(|&b| !(b.is_ascii_alphabetic()))
                .unwrap_or(buf.len());
            let word = &buf[..word_end];
            let known = |exact: bool| {
                INLINE_COMMANDS.iter().any(|c| {
                    let c = c.as_bytes();
                    if exact {
                        c.eq_ignore_ascii_case(word)
                    } else {
                        c.len() >= word.len() && c[..word.len()].eq_ignore_ascii_case(word)
                    }
                })
            };
            if word_end == buf.len() {
                return if known(false) {
                    Step::NeedMore(buf.len() + 1)
                } else {
                    Step::NoMatch
                };
            }
            if !matches!(buf[word_end], b' ' | b'\t' | b'\r' | b'\n') || !known(true) {
                return Step::NoMatch;
            }
            self.scan_from = word_end;
        }

        for (i, &b) in buf.iter().enumerate().skip(self.scan_from) {
            match b {
                b'\n' => {
                    let line = &buf[..i];
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    let last = line
                        .split(|&b| b == b' ' || b == b'\t')
                        .rfind(|w| !w.is_empty())
                        .unwrap_or_default();
                    let http = last.len() >= 5 && last[..5].eq_ignore_ascii_case(b"HTTP/");
                    return if http {
                        Step::NoMatch
                    } else {
                        Step::Match(Form::Inline)
                    };
                }
                b'\r' | b'\t' => {}
                b if b < 0x20 || b == 0x7f => return Step::NoMatch,
                _ => {}
            }
        }
        self.scan_from = buf.len();
        Step::NeedMore(buf.len() + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_resp_and_inline() {
        for ok in [
            &b"*1\r\n$4\r\nPING\r\n"[..],
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n",
            b"*2\r\n$8\r\nJSON.GET\r\n",
            b"*2\r\n$5\r\nhello\r\n$1\r\n3\r\n",
        ] {
            assert_eq!(command(ok), Verdict::Match(Form::Resp), "{ok:?}");
        }
        for ok in [
            &b"PING\r\n"[..],
            b"ping\n",
            b"GET key\r\n",
            b"set k \"v w\"\r\n",
            b"AUTH\tsecret\r\n",
        ] {
            assert_eq!(command(ok), Verdict::Match(Form::Inline), "{ok:?}");
        }
    }

    #[test]
    fn waits_for_the_name_or_the_line() {
        for partial in [
            &b"*"[..],
            b"*1\r",
            b"*1\r\n$4\r\nPIN",
            b"*1\r\n$4\r\nPING\r",
            b"PI",
            b"GET key",
            b"GET key\r",
        ] {
            assert_eq!(command(partial), Verdict::NeedMore, "{partial:?}");
        }
    }

    #[test]
    fn refuses_near_misses() {
        for bad in [
            &b"*0\r\n"[..],
            b"*\r\n",
            b"*1\n$4\r\nPING\r\n",
            b"*1\r\n:4\r\n",
            b"*1\r\n$0\r\n\r\n",
            b"*1\r\n$65\r\n",
            b"*99999999\r\n",
            b"*1\r\n$4\r\n1NG\r\n",
            b"*1\r\n$4\r\nPI G\r\n",
            b"*1\r\n$4\r\nPINGX",
            b"GET / HTTP/1.1\r\n",
            b"get / http/1.0\r\n",
            b"POST / HTTP/1.1\r\n",
            b"PRI * HTTP/2.0\r\n",
            b"PINGS\r\n",
            b"FOO\r\n",
            b"GET k\x00\r\n",
            b"HELLO-",
        ] {
            assert_eq!(command(bad), Verdict::NoMatch, "{bad:?}");
        }
    }
}
