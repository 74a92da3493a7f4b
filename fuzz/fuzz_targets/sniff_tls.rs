//! Arbitrary bytes into the TLS ClientHello reader: no panic, a final verdict
//! on a prefix stands, a name is a host name and ALPN names are not empty.
//! Seeds worth giving it: `shared-types/tests/fixtures/sniff/*https*.bin`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shared_types::sniff::{tls, Verdict};

#[path = "common/sniff.rs"]
mod common;

fuzz_target!(|buf: &[u8]| {
    if let Verdict::Match(hello) = common::monotone(buf, tls::client_hello) {
        common::check_name(&hello.server_name);
        assert!(hello.alpn.iter().all(|p| !p.is_empty()));
        assert!(buf.len() >= 5 + 4 + 41, "a hello shorter than the shortest");
    }
});
