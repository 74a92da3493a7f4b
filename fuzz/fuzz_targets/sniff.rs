//! Arbitrary bytes into the sniffer: no panic; at most one detector ever
//! matches; whole or in pieces, the same verdict; a final verdict on a prefix
//! stands; never `NeedMore` at the budget; the match is the one its own
//! detector gives.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shared_types::sniff::{
    http, mongodb, postgres, redis, rtmp, sniff, tls, Detected, Sniffer, Verdict,
};

#[path = "common/sniff.rs"]
mod common;

fuzz_target!(|buf: &[u8]| {
    let whole = common::monotone(buf, sniff);

    let answers = [
        (Detected::Tls, tls::client_hello(buf).map(|_| ())),
        (Detected::Http1, http::request(buf).map(|_| ())),
        (Detected::Http2, http::h2_preface(buf)),
        (Detected::Postgres, postgres::first_message(buf).map(|_| ())),
        (Detected::Redis, redis::command(buf).map(|_| ())),
        (Detected::Mongodb, mongodb::message(buf).map(|_| ())),
        (Detected::Rtmp, rtmp::handshake(buf)),
    ];
    let matched: Vec<Detected> = answers
        .iter()
        .filter(|(_, v)| matches!(v, Verdict::Match(())))
        .map(|(d, _)| *d)
        .collect();
    assert!(matched.len() <= 1, "two families match: {matched:?}");
    match &whole {
        Verdict::Match(found) => {
            assert_eq!(matched, [found.protocol]);
            common::check_name(&found.server_name);
        }
        Verdict::NeedMore => assert!(answers.iter().any(|(_, v)| *v == Verdict::NeedMore)),
        Verdict::NoMatch => assert!(matched.is_empty()),
    }

    // In pieces whose sizes come from the bytes themselves.
    let mut sniffer = Sniffer::new();
    let mut end = 0;
    let mut step = 0;
    let mut pieces = Verdict::NeedMore;
    while end < buf.len() {
        end = (end + 1 + usize::from(buf[step % buf.len()]) % 97).min(buf.len());
        step += 1;
        pieces = sniffer.feed(&buf[..end]);
        if pieces.is_final() {
            break;
        }
    }
    if !buf.is_empty() {
        assert_eq!(pieces, whole, "in pieces");
    }

    // A small budget (fuzz inputs rarely reach the default): never waits at it.
    let budget = buf.first().map_or(0, |&b| usize::from(b) * 8);
    let limited = Sniffer::with_budget(budget).feed(buf);
    if buf.len() >= budget {
        assert!(limited.is_final(), "need more at the budget");
    }
    if let (Verdict::Match(a), Verdict::Match(b)) = (&limited, &whole) {
        assert_eq!(a, b);
    }
});
