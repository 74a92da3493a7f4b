//! The sniffer's own mechanics: combining detectors, the budget, feeding.
//! Fixtures from real clients and near-misses are in `tests/sniff.rs`.

use super::*;

fn protocol(v: Verdict) -> Option<Detected> {
    v.matched().map(|s| s.protocol)
}

#[test]
fn each_family_from_a_minimal_opening() {
    let cases: &[(&[u8], Detected)] = &[
        (b"GET / HTTP/1.1\r\nHost: a\r\n", Detected::Http1),
        (http::H2_PREFACE, Detected::Http2),
        (b"*1\r\n$4\r\nPING\r\n", Detected::Redis),
        (b"PING\r\n", Detected::Redis),
        (&[0, 0, 0, 8, 4, 0xd2, 0x16, 0x2f], Detected::Postgres),
    ];
    for (bytes, want) in cases {
        assert_eq!(protocol(sniff(bytes)), Some(*want), "{bytes:?}");
    }
}

#[test]
fn need_more_while_any_could_match_no_match_when_none() {
    assert_eq!(sniff(b""), Verdict::NeedMore);
    assert_eq!(sniff(b"G"), Verdict::NeedMore); // HTTP/1 or inline Redis
    assert_eq!(sniff(b"GET / HTTP/1.1"), Verdict::NeedMore);
    assert_eq!(sniff(b"PRI * HTTP/2.0\r\n"), Verdict::NeedMore);
    assert_eq!(sniff(b"\x03"), Verdict::NeedMore); // RTMP or MongoDB
    assert_eq!(sniff(b"SSH-2.0-OpenSSH_9.2\r\n"), Verdict::NoMatch);
    assert_eq!(sniff(b"{\"jsonrpc\":\"2.0\"}"), Verdict::NoMatch);
    assert_eq!(sniff(&[0xff; 4]), Verdict::NoMatch);
}

#[test]
fn the_budget_turns_need_more_into_no_match() {
    let head = b"GET / HTTP/1.1\r\nCookie: aaaaaaaa\r\n";
    let mut s = Sniffer::with_budget(head.len());
    assert_eq!(s.feed(&head[..head.len() - 1]), Verdict::NeedMore);
    assert_eq!(s.feed(head), Verdict::NoMatch);
    // Bytes past the budget are not looked at.
    let mut with_host = head.to_vec();
    with_host.extend(b"Host: late.example\r\n");
    assert_eq!(
        Sniffer::with_budget(head.len()).feed(&with_host),
        Verdict::NoMatch
    );
    assert_eq!(
        Sniffer::with_budget(with_host.len())
            .feed(&with_host)
            .matched()
            .and_then(|s| s.server_name),
        Some("late.example".to_owned())
    );
    assert_eq!(Sniffer::with_budget(0).feed(b""), Verdict::NoMatch);
}

#[test]
fn a_final_verdict_stays_and_a_shorter_buffer_starts_over() {
    let mut s = Sniffer::new();
    assert_eq!(s.feed(b"FOO "), Verdict::NoMatch);
    // Whatever comes after, the answer was given.
    assert_eq!(s.feed(b"FOO / HTTP/1.1\r\n\r\n"), Verdict::NoMatch);

    let mut s = Sniffer::new();
    assert_eq!(s.feed(b"GET / HTTP/1.1\r\nAccept: x"), Verdict::NeedMore);
    // Not the contract, but it must not panic or answer from stale state.
    assert_eq!(protocol(s.feed(b"PING\r\n")), Some(Detected::Redis));
}

#[test]
fn display_says_what_was_found() {
    let found = Sniffed {
        protocol: Detected::Tls,
        server_name: Some("a.example".into()),
        alpn: vec!["h2".into(), "http/1.1".into()],
        detail: Detail::None,
    };
    assert_eq!(found.to_string(), "tls name a.example alpn h2,http/1.1");
    let pg = Sniffed::bare(
        Detected::Postgres,
        Detail::Postgres(postgres::Message::SslRequest),
    );
    assert_eq!(pg.to_string(), "postgres ssl_request");
}

#[test]
fn the_verdict_does_not_depend_on_how_the_bytes_were_split() {
    // Openings spoiled part-way, where a detector that waited for a fixed
    // length would say "need more" in pieces and "no" in one go.
    for bytes in [
        &b"PRI * HTTP/2.0\r\n\r\nXX"[..],
        b"*1\r\n$10\r\nPI G",
        b"\x16\x03\x01\x00\x30\x02",
        b"GET / HTTP/1.1\r\nHost: a",
    ] {
        let whole = sniff(bytes);
        for first in 1..bytes.len() {
            let mut s = Sniffer::new();
            let early = s.feed(&bytes[..first]);
            let later = if early.is_final() {
                early
            } else {
                s.feed(bytes)
            };
            assert_eq!(later, whole, "{bytes:?} split at {first}");
        }
    }
}
