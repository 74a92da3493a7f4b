//! Arbitrary bytes into the MongoDB message reader: no panic, a final verdict
//! on a prefix stands, and a match has a sane header.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shared_types::sniff::{mongodb, Verdict};

#[path = "common/sniff.rs"]
mod common;

fuzz_target!(|buf: &[u8]| {
    if let Verdict::Match(_) = common::monotone(buf, mongodb::message) {
        let le = |at: usize| u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
        assert!(le(0) as usize <= mongodb::MAX_MESSAGE_LEN);
        assert_eq!(le(8), 0, "responseTo");
    }
});
