//! Arbitrary bytes into the Redis command reader: no panic, a final verdict
//! on a prefix stands, and an inline match is a whole line.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shared_types::sniff::{redis, Verdict};

#[path = "common/sniff.rs"]
mod common;

fuzz_target!(|buf: &[u8]| {
    match common::monotone(buf, redis::command) {
        Verdict::Match(redis::Form::Inline) => assert!(buf.contains(&b'\n')),
        Verdict::Match(redis::Form::Resp) => assert_eq!(buf[0], b'*'),
        _ => {}
    }
});
