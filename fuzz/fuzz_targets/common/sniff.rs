//! Checks every sniffing target shares (included with `#[path]`, not a
//! target itself).

#![allow(dead_code)]

use std::fmt::Debug;

use shared_types::sniff::Verdict;

/// A few prefix lengths of `buf` to compare with the whole, picked from its
/// own bytes so the fuzzer can steer them (checking every prefix would be
/// quadratic).
pub fn cuts(buf: &[u8]) -> Vec<usize> {
    let n = buf.len();
    let mut cuts = vec![0, n / 2, n.saturating_sub(1)];
    for &b in buf.iter().take(4) {
        if n > 0 {
            cuts.push(usize::from(b) * 7 % n);
        }
    }
    cuts
}

/// A detector never changes its mind: a final verdict on a prefix is the
/// verdict on the whole. Returns the verdict on the whole.
pub fn monotone<T: PartialEq + Debug>(
    buf: &[u8],
    detect: impl Fn(&[u8]) -> Verdict<T>,
) -> Verdict<T> {
    let whole = detect(buf);
    for n in cuts(buf) {
        let part = detect(&buf[..n]);
        if part.is_final() {
            assert_eq!(part, whole, "final on {n} bytes, then changed");
        }
    }
    whole
}

/// What routing may receive as a server name: a host name, or the inside of
/// an IPv6 literal; never empty, never with a port.
pub fn check_name(name: &Option<String>) {
    if let Some(name) = name {
        assert!(!name.is_empty() && name.len() <= 255, "{name:?}");
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':')),
            "{name:?}"
        );
    }
}
