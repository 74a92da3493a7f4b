//! Arbitrary bytes into the HTTP/1 request-head reader and the HTTP/2 preface
//! check: no panic, a final verdict on a prefix stands, the name is a host
//! name, and the two never both match.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shared_types::sniff::{http, Verdict};

#[path = "common/sniff.rs"]
mod common;

fuzz_target!(|buf: &[u8]| {
    let h1 = common::monotone(buf, http::request);
    let h2 = common::monotone(buf, http::h2_preface);
    if let Verdict::Match(req) = &h1 {
        common::check_name(&req.host);
        assert!(!buf.starts_with(b"PRI "));
        assert_ne!(h2, Verdict::Match(()));
    }
    if h2 == Verdict::Match(()) {
        assert_eq!(&buf[..24], http::H2_PREFACE);
    }
});
