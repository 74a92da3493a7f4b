//! The protocol detectors against bytes captured from real clients
//! (`tests/fixtures/sniff/`, made by `scripts/capture-sniff-fixtures.py`),
//! delivered whole, byte by byte and in random splits, and against
//! near-misses that must not be taken for the wrong protocol.

use shared_types::sniff::{
    self, http, mongodb, postgres, redis, rtmp, sniff, tls, Detail, Detected, Sniffed, Sniffer,
    Verdict, DEFAULT_BUDGET,
};

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/fixtures/sniff/{name}.bin",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn found(protocol: Detected, name: Option<&str>, alpn: &[&str], detail: Detail) -> Sniffed {
    Sniffed {
        protocol,
        server_name: name.map(str::to_owned),
        alpn: alpn.iter().map(|s| s.to_string()).collect(),
        detail,
    }
}

/// Every fixture and what the sniffer must find in it.
fn fixtures() -> Vec<(&'static str, Sniffed)> {
    use Detected::*;
    let pg = |m| Detail::Postgres(m);
    vec![
        (
            "curl-http1",
            found(Http1, Some("switchyard.test"), &[], Detail::None),
        ),
        (
            "curl-http1-ipv6",
            found(Http1, Some("::1"), &[], Detail::None),
        ),
        (
            "curl-h2c-prior-knowledge",
            found(Http2, None, &[], Detail::None),
        ),
        (
            "curl-https-sni",
            found(
                Tls,
                Some("switchyard.test"),
                &["h2", "http/1.1"],
                Detail::None,
            ),
        ),
        (
            "tls-hello-split-records",
            found(
                Tls,
                Some("switchyard.test"),
                &["h2", "http/1.1"],
                Detail::None,
            ),
        ),
        (
            "openssl-s_client-sni",
            found(Tls, Some("openssl.switchyard.test"), &[], Detail::None),
        ),
        (
            "psql-startup",
            found(Postgres, None, &[], pg(postgres::Message::Startup)),
        ),
        (
            "psql-sslrequest",
            found(Postgres, None, &[], pg(postgres::Message::SslRequest)),
        ),
        (
            "psql-gssenc",
            found(Postgres, None, &[], pg(postgres::Message::GssEncRequest)),
        ),
        (
            "psql-cancel",
            found(Postgres, None, &[], pg(postgres::Message::CancelRequest)),
        ),
        (
            "redis-cli-resp",
            found(Redis, None, &[], Detail::Redis(redis::Form::Resp)),
        ),
        (
            "redis-inline",
            found(Redis, None, &[], Detail::Redis(redis::Form::Inline)),
        ),
        (
            "pymongo-hello",
            found(Mongodb, None, &[], Detail::Mongodb(mongodb::OpCode::Msg)),
        ),
        ("ffmpeg-rtmp-publish", found(Rtmp, None, &[], Detail::None)),
    ]
}

/// A small deterministic generator, so failures replay.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Feeds `bytes` to one sniffer in the given chunk sizes (cycled), checking
/// it says NeedMore until it is final; returns the final verdict, or
/// NeedMore if all the bytes were not enough.
fn feed_in_chunks(bytes: &[u8], sizes: &mut impl FnMut() -> usize) -> Verdict {
    let mut sniffer = Sniffer::new();
    let mut end = 0;
    loop {
        end = (end + sizes().max(1)).min(bytes.len());
        let verdict = sniffer.feed(&bytes[..end]);
        if verdict.is_final() || end == bytes.len() {
            return verdict;
        }
    }
}

#[test]
fn every_fixture_is_recognised_whole() {
    for (name, want) in fixtures() {
        assert_eq!(sniff(&fixture(name)), Verdict::Match(want), "{name}");
    }
}

#[test]
fn every_prefix_of_a_fixture_is_need_more_until_it_matches() {
    for (name, want) in fixtures() {
        let bytes = fixture(name);
        let mut matched_at = None;
        for n in 0..=bytes.len() {
            match sniff(&bytes[..n]) {
                Verdict::NeedMore => assert!(matched_at.is_none(), "{name}: need more at {n}"),
                Verdict::Match(found) => {
                    assert_eq!(found, want, "{name}: prefix of {n}");
                    matched_at.get_or_insert(n);
                }
                Verdict::NoMatch => panic!("{name}: no match for the first {n} bytes"),
            }
        }
        assert!(matched_at.is_some(), "{name}");
    }
}

#[test]
fn where_each_fixture_is_decided() {
    // The byte count at which each opening is recognised: what a listener
    // has to wait for.
    let expect: &[(&str, usize)] = &[
        ("curl-h2c-prior-knowledge", 24),
        ("psql-sslrequest", 8),
        ("psql-gssenc", 8),
        ("psql-cancel", 16),
        ("psql-startup", 54),
        ("redis-cli-resp", 14),
        ("redis-inline", 6),
        ("pymongo-hello", 25),
        ("ffmpeg-rtmp-publish", rtmp::HANDSHAKE_LEN),
        ("curl-https-sni", 517),
        ("tls-hello-split-records", 547),
    ];
    for (name, at) in expect {
        let bytes = fixture(name);
        assert_eq!(sniff(&bytes[..at - 1]), Verdict::NeedMore, "{name}");
        assert!(sniff(&bytes[..*at]).is_final(), "{name}");
    }
    // HTTP/1: at the end of the Host line.
    let http = fixture("curl-http1");
    let host_end = find(&http, b"\r\nUser-Agent") + 2;
    assert_eq!(sniff(&http[..host_end - 1]), Verdict::NeedMore);
    assert!(sniff(&http[..host_end]).is_final());
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .expect("present")
}

#[test]
fn fixtures_fed_byte_by_byte_and_in_random_chunks() {
    let mut rng = Rng(0x5eed_1234_abcd_0042);
    for (name, want) in fixtures() {
        let bytes = fixture(name);
        let verdict = feed_in_chunks(&bytes, &mut || 1);
        assert_eq!(verdict, Verdict::Match(want.clone()), "{name} byte by byte");
        for round in 0..50 {
            let max = [2, 7, 40, 600][round % 4];
            let verdict = feed_in_chunks(&bytes, &mut || 1 + rng.below(max));
            assert_eq!(
                verdict,
                Verdict::Match(want.clone()),
                "{name} round {round}"
            );
        }
    }
}

#[test]
fn each_fixture_matches_its_own_detector_only() {
    for (name, want) in fixtures() {
        let bytes = fixture(name);
        let answers = [
            (Detected::Tls, tls::client_hello(&bytes).map(|_| ())),
            (Detected::Http1, http::request(&bytes).map(|_| ())),
            (Detected::Http2, http::h2_preface(&bytes)),
            (
                Detected::Postgres,
                postgres::first_message(&bytes).map(|_| ()),
            ),
            (Detected::Redis, redis::command(&bytes).map(|_| ())),
            (Detected::Mongodb, mongodb::message(&bytes).map(|_| ())),
            (Detected::Rtmp, rtmp::handshake(&bytes)),
        ];
        for (family, verdict) in answers {
            let expected = if family == want.protocol {
                Verdict::Match(())
            } else {
                Verdict::NoMatch
            };
            assert_eq!(verdict, expected, "{name} by the {family} detector");
        }
    }
}

#[test]
fn per_detector_functions_extract_names() {
    let hello = tls::client_hello(&fixture("tls-hello-split-records"))
        .matched()
        .expect("tls");
    assert_eq!(hello.server_name.as_deref(), Some("switchyard.test"));
    assert_eq!(hello.alpn, ["h2", "http/1.1"]);
    let req = http::request(&fixture("curl-http1-ipv6"))
        .matched()
        .expect("http");
    assert_eq!(req.host.as_deref(), Some("::1"));
}

#[test]
fn a_hello_split_into_one_byte_records_and_delivered_in_pieces() {
    // The captured hello re-framed with one handshake byte per record: the
    // worst a client can do to the reassembly.
    let single = fixture("curl-https-sni");
    let message = &single[5..];
    let mut bytes = Vec::new();
    for b in message {
        bytes.extend([0x16, 0x03, 0x01, 0x00, 0x01, *b]);
    }
    let want = found(
        Detected::Tls,
        Some("switchyard.test"),
        &["h2", "http/1.1"],
        Detail::None,
    );
    assert_eq!(sniff(&bytes), Verdict::Match(want.clone()));
    assert_eq!(sniff(&bytes[..bytes.len() - 1]), Verdict::NeedMore);
    let mut rng = Rng(99);
    for _ in 0..20 {
        assert_eq!(
            feed_in_chunks(&bytes, &mut || 1 + rng.below(300)),
            Verdict::Match(want.clone())
        );
    }
}

#[test]
fn near_misses_are_not_taken_for_the_wrong_protocol() {
    let curl_hello = fixture("curl-https-sni");
    let mongo = fixture("pymongo-hello");
    let proto = |v: Verdict| v.matched().map(|s| s.protocol);

    // HTTP/2 preface cut short: could still be it. Spoiled: nothing.
    assert_eq!(sniff(b"PRI * HTTP/2.0"), Verdict::NeedMore);
    assert_eq!(sniff(b"PRI * HTTP/2.0\r\n\r\n"), Verdict::NeedMore);
    assert_eq!(sniff(b"PRI * HTTP/2.0\r\n\r\nXM\r\n\r\n"), Verdict::NoMatch);
    assert_eq!(
        sniff(b"PRI * HTTP/1.1\r\nHost: a\r\n\r\n"),
        Verdict::NoMatch
    );

    // HTTP/1 request line against a Redis inline command.
    assert_eq!(
        proto(sniff(b"GET / HTTP/1.1\r\nHost: a\r\n")),
        Some(Detected::Http1)
    );
    assert_eq!(proto(sniff(b"GET key\r\n")), Some(Detected::Redis));
    assert_eq!(proto(sniff(b"get key\r\n")), Some(Detected::Redis));
    assert_eq!(sniff(b"GET / HTTP/1.1"), Verdict::NeedMore);
    assert_eq!(
        sniff(b"get / HTTP/1.1\r\nHost: a\r\n\r\n"),
        Verdict::NoMatch
    );
    assert_eq!(
        sniff(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n"),
        Verdict::NoMatch
    );
    assert_eq!(
        sniff(b"GET /\r\n"),
        Verdict::Match(found(
            Detected::Redis,
            None,
            &[],
            Detail::Redis(redis::Form::Inline),
        ))
    );
    assert_eq!(sniff(b"BREW / HTTP/1.1\r\n"), Verdict::NoMatch);

    // TLS: a handshake record that is not a ClientHello; SSLv2 framing; an
    // alert record; a hello cut short is still pending.
    let mut server_hello = curl_hello.clone();
    server_hello[5] = 2;
    assert_eq!(sniff(&server_hello), Verdict::NoMatch);
    assert_eq!(tls::client_hello(&server_hello[..6]), Verdict::NoMatch);
    assert_eq!(
        sniff(&[0x80, 0x2e, 0x01, 0x03, 0x01, 0x00, 0x15, 0x00, 0x00, 0x00, 0x10]),
        Verdict::NoMatch
    );
    let alert = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28];
    assert_eq!(tls::client_hello(&alert), Verdict::NoMatch);
    // Seven bytes whose fourth is 0 could still start a MongoDB message.
    assert_eq!(sniff(&alert), Verdict::NeedMore);
    assert_eq!(sniff(&[&alert[..], &[0; 9]].concat()), Verdict::NoMatch);
    assert_eq!(sniff(&curl_hello[..300]), Verdict::NeedMore);

    // PostgreSQL with absurd lengths, or the right code with the wrong one.
    assert_eq!(
        sniff(&[0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0]),
        Verdict::NoMatch
    );
    assert_eq!(sniff(&[0, 0, 0xff, 0xff, 0, 3, 0, 0]), Verdict::NoMatch);
    assert_eq!(sniff(&[0, 0, 0, 4, 4, 0xd2, 0x16, 0x2f]), Verdict::NoMatch);
    assert_eq!(
        sniff(&[0, 0, 0, 12, 4, 0xd2, 0x16, 0x2f, 0, 0, 0, 0]),
        Verdict::NoMatch
    );

    // MongoDB with a bad opCode, or a reply (responseTo set).
    let mut bad_op = mongo.clone();
    bad_op[12..16].copy_from_slice(&2005u32.to_le_bytes());
    assert_eq!(sniff(&bad_op), Verdict::NoMatch);
    let mut reply = mongo.clone();
    reply[8..12].copy_from_slice(&1u32.to_le_bytes());
    assert_eq!(sniff(&reply), Verdict::NoMatch);
    let mut too_long = mongo.clone();
    too_long[..4].copy_from_slice(&(mongodb::MAX_MESSAGE_LEN as u32 + 1).to_le_bytes());
    assert_eq!(sniff(&too_long), Verdict::NoMatch);

    // 0x03 followed by text is not RTMP (nor anything else); 0x03 alone is
    // not enough to say.
    assert_eq!(
        sniff(b"\x03GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
        Verdict::NoMatch
    );
    assert_eq!(sniff(b"\x03"), Verdict::NeedMore);
    let rtmp = fixture("ffmpeg-rtmp-publish");
    assert_eq!(sniff(&rtmp[..rtmp::HANDSHAKE_LEN - 1]), Verdict::NeedMore);

    // Redis framing errors.
    assert_eq!(sniff(b"*1\r\n+PING\r\n"), Verdict::NoMatch);
    assert_eq!(sniff(b"*1\r\n$4\r\nPINGPONG\r\n"), Verdict::NoMatch);
    assert_eq!(sniff(b"PINGPONG\r\n"), Verdict::NoMatch);

    // Other protocols: not recognised.
    assert_eq!(
        sniff(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"),
        Verdict::NoMatch
    );
    assert_eq!(sniff(b"EHLO mail.example\r\n"), Verdict::NoMatch);
}

#[test]
fn random_bytes_are_not_recognised() {
    let mut rng = Rng(0x0bad_cafe);
    for _ in 0..2000 {
        let n = 1 + rng.below(300);
        let bytes = rng.bytes(n);
        match sniff(&bytes) {
            Verdict::Match(found) => panic!("{bytes:?} taken for {found}"),
            // Only RTMP waits on arbitrary bytes: 0x03 and not yet 1,537.
            Verdict::NeedMore => {
                assert!(bytes[0] == rtmp::VERSION || bytes.len() < 16, "{bytes:?}")
            }
            Verdict::NoMatch => {}
        }
    }
}

#[test]
fn heads_longer_than_the_budget_end_in_no_match() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a long header before Host", {
            let mut b = b"GET / HTTP/1.1\r\nX-Filler: ".to_vec();
            b.resize(DEFAULT_BUDGET + 100, b'a');
            b
        }),
        ("a long request target", {
            let mut b = b"GET /".to_vec();
            b.resize(DEFAULT_BUDGET + 100, b'a');
            b
        }),
        ("many header lines", {
            let mut b = b"POST /upload HTTP/1.1\r\n".to_vec();
            while b.len() < DEFAULT_BUDGET + 100 {
                b.extend(b"Cookie: k=v\r\n");
            }
            b
        }),
        ("a long inline Redis line", {
            let mut b = b"SET key ".to_vec();
            b.resize(DEFAULT_BUDGET + 100, b'v');
            b
        }),
        ("0x03 and more bytes, not text", {
            let mut b = vec![0x03, 0, 0, 0, 0];
            b.resize(1000, 0xaa);
            b
        }),
    ];
    for (what, bytes) in cases {
        let mut s = Sniffer::new();
        let mut end = 0;
        let mut last = Verdict::NeedMore;
        while end < bytes.len() && !last.is_final() {
            end = (end + 1000).min(bytes.len());
            last = s.feed(&bytes[..end]);
            if end < DEFAULT_BUDGET {
                assert_eq!(last, Verdict::NeedMore, "{what} at {end}");
            }
        }
        if bytes.len() >= DEFAULT_BUDGET {
            assert_eq!(last, Verdict::NoMatch, "{what}");
            assert_eq!(sniff(&bytes), Verdict::NoMatch, "{what}");
            assert_eq!(sniff(&bytes[..DEFAULT_BUDGET]), Verdict::NoMatch, "{what}");
            assert_eq!(
                sniff(&bytes[..DEFAULT_BUDGET - 1]),
                Verdict::NeedMore,
                "{what}"
            );
        } else {
            // 0x03 then non-text: RTMP's need is 1,537 bytes, not reached.
            assert_eq!(last, Verdict::NeedMore, "{what}");
        }
    }
}

#[test]
fn a_hello_larger_than_the_budget_needs_a_larger_budget() {
    // The captured hello with a 20,000-byte padding extension (type 21)
    // appended, framed as 16 KiB records.
    let single = fixture("curl-https-sni");
    let mut message = single[5..].to_vec();
    let pad = 20_000usize;
    let ext_len_at = ext_block_len_offset(&message);
    let ext_len = u16::from_be_bytes([message[ext_len_at], message[ext_len_at + 1]]) as usize;
    message.extend(21u16.to_be_bytes());
    message.extend((pad as u16).to_be_bytes());
    message.resize(message.len() + pad, 0);
    let new_ext = (ext_len + 4 + pad) as u16;
    message[ext_len_at..ext_len_at + 2].copy_from_slice(&new_ext.to_be_bytes());
    let body = (message.len() - 4) as u32;
    message[1..4].copy_from_slice(&body.to_be_bytes()[1..]);
    let mut bytes = Vec::new();
    for chunk in message.chunks(tls::MAX_RECORD_LEN) {
        bytes.extend([0x16, 0x03, 0x01]);
        bytes.extend((chunk.len() as u16).to_be_bytes());
        bytes.extend(chunk);
    }
    assert!(bytes.len() > DEFAULT_BUDGET);
    assert_eq!(sniff(&bytes), Verdict::NoMatch);
    let big = Sniffer::with_budget(64 * 1024).feed(&bytes);
    assert_eq!(
        big.matched().and_then(|s| s.server_name).as_deref(),
        Some("switchyard.test")
    );
}

/// Where a ClientHello message's extensions-block length is.
fn ext_block_len_offset(message: &[u8]) -> usize {
    let mut at = 4 + 2 + 32;
    at += 1 + message[at] as usize;
    at += 2 + u16::from_be_bytes([message[at], message[at + 1]]) as usize;
    at += 1 + message[at] as usize;
    at
}

#[test]
fn never_panics_and_never_waits_at_the_budget() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let seeds: Vec<Vec<u8>> = fixtures().into_iter().map(|(n, _)| fixture(n)).collect();
    for round in 0..300 {
        // A fixture (or nothing), mutated, truncated and padded at random.
        let mut bytes = if round % 5 == 0 {
            Vec::new()
        } else {
            seeds[rng.below(seeds.len())].clone()
        };
        for _ in 0..rng.below(4) {
            if !bytes.is_empty() {
                let i = rng.below(bytes.len());
                bytes[i] = rng.next() as u8;
            }
        }
        bytes.truncate(rng.below(bytes.len() + 1));
        let fill = rng.bytes(DEFAULT_BUDGET);
        let at_budget: Vec<u8> = bytes
            .iter()
            .chain(&fill)
            .take(DEFAULT_BUDGET)
            .copied()
            .collect();

        assert!(sniff(&at_budget).is_final(), "round {round}");
        let mut longer = at_budget.clone();
        longer.extend(rng.bytes(100));
        assert_eq!(sniff(&longer), sniff(&at_budget), "round {round}");
        // Whole or in pieces, the same answer.
        let whole = sniff(&bytes);
        let pieces = feed_in_chunks(&bytes, &mut || 1 + rng.below(64));
        assert_eq!(pieces, whole, "round {round}: {bytes:?}");
        let small = Sniffer::with_budget(rng.below(64)).feed(&at_budget);
        assert!(small.is_final(), "round {round}");
    }
}

#[test]
fn defaults_are_as_documented() {
    assert_eq!(DEFAULT_BUDGET, 16 * 1024);
    assert_eq!(sniff::DEFAULT_TIMEOUT, std::time::Duration::from_secs(3));
    assert_eq!(Sniffer::new().budget(), DEFAULT_BUDGET);
}
