//! Arbitrary bytes into the RTMP handshake check: no panic, a final verdict
//! on a prefix stands, and a match has all of C0 and C1.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shared_types::sniff::{rtmp, Verdict};

#[path = "common/sniff.rs"]
mod common;

fuzz_target!(|buf: &[u8]| {
    if let Verdict::Match(()) = common::monotone(buf, rtmp::handshake) {
        assert!(buf.len() >= rtmp::HANDSHAKE_LEN && buf[0] == rtmp::VERSION);
    }
});
