//! Arbitrary bytes into the PostgreSQL first-message reader: no panic, a
//! final verdict on a prefix stands, and a match has the length it claims.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shared_types::sniff::{postgres, Verdict};

#[path = "common/sniff.rs"]
mod common;

fuzz_target!(|buf: &[u8]| {
    if let Verdict::Match(message) = common::monotone(buf, postgres::first_message) {
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        assert!(buf.len() >= len && len <= postgres::MAX_STARTUP_LEN);
        if matches!(
            message,
            postgres::Message::SslRequest | postgres::Message::GssEncRequest
        ) {
            assert_eq!(len, 8);
        }
    }
});
