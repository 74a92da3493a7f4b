//! Arbitrary bytes into the PROXY v2 decoder: it must never panic, never claim
//! more bytes than it was given, and whatever it accepts must encode back to a
//! header that decodes to the same value.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shared_types::proxy_v2::{
    decode, encode, Addresses, Command, Decoded, DEFAULT_MAX_LEN, FIXED_LEN, MAX_HEADER_LEN,
};

fuzz_target!(|buf: &[u8]| {
    // The first byte also picks a small limit, so the TooLong path and the
    // boundary at the limit get exercised as much as the large ones.
    let small = buf.first().map_or(0, |&b| usize::from(b) * 2);
    for max_len in [small, FIXED_LEN + 12, DEFAULT_MAX_LEN, MAX_HEADER_LEN] {
        check(buf, max_len);
    }
});

fn check(buf: &[u8], max_len: usize) {
    let Ok(decoded) = decode(buf, max_len) else {
        return;
    };
    let (header, len) = match decoded {
        Decoded::Complete { header, len } => (header, len),
        Decoded::Incomplete { needed_total } => {
            assert!(needed_total > buf.len(), "incomplete with enough bytes");
            assert!(needed_total <= max_len.max(FIXED_LEN));
            return;
        }
    };
    assert!(len <= buf.len(), "consumed more than given");
    assert!(len <= max_len, "accepted a header above the limit");

    let bytes = encode(&header).expect("a decoded header always fits");
    match decode(&bytes, MAX_HEADER_LEN) {
        Ok(Decoded::Complete {
            header: again,
            len: again_len,
        }) => {
            assert_eq!(again, header, "round trip changed the header");
            assert_eq!(again_len, bytes.len());
        }
        other => panic!("re-encoded header does not decode: {other:?}"),
    }
    // A PROXY header with addresses is decoded in full, so it re-encodes to
    // the very bytes it came from (LOCAL and AF_UNSPEC skip their block).
    if header.command == Command::Proxy && header.addresses != Addresses::Unspec {
        assert_eq!(bytes, &buf[..len], "re-encoding changed the bytes");
    }
}
