//! RTMP: the client's handshake, C0 and C1.
//!
//! A publishing or playing client opens with C0, the version byte `0x03`,
//! and C1, 1,536 bytes: a 4-byte timestamp, 4 bytes that are zero in the
//! plain handshake of the spec but carry a Flash Player version in the
//! "digest" handshake that Flash, librtmp and ffmpeg use (ffmpeg sends
//! `9.0.124.2`, uptime 0, then pseudo-random bytes with an HMAC digest inside),
//! then 1,528 random bytes. It then waits for the server's S0 and S1, so
//! these 1,537 bytes are all there is to go on.
//!
//! One byte of `0x03` is no evidence (it is also, say, a MongoDB message
//! whose length ends in 3), so the detector matches only once all of C0 and
//! C1 are in ([`HANDSHAKE_LEN`]), and answers `NoMatch` early when:
//!
//! - the first byte is not `0x03` (`0x06`, the encrypted RTMPE handshake, is
//!   not recognised);
//! - the 8 bytes after it are all printable text: no real client's timestamp
//!   and version come out that way (the version's minor part, or the zero
//!   field, is a zero byte), while `0x03` followed by a text protocol does;
//! - the first 16 bytes are a plausible MongoDB header, which is MongoDB's.
//!
//! Bytes after C1 (a client that does not wait for S1) do not matter.

use super::{is_text, mongodb, Detect, Step, Verdict};

/// C0 and C1: 1 + 1,536 bytes.
pub const HANDSHAKE_LEN: usize = 1 + 1536;
/// The RTMP version byte (C0) of the plain handshake.
pub const VERSION: u8 = 3;

/// Checks `buf` for an RTMP C0+C1.
pub fn handshake(buf: &[u8]) -> Verdict<()> {
    Detector::once(buf)
}

#[derive(Debug, Default)]
pub(crate) struct Detector;

impl Detect for Detector {
    type Found = ();

    fn step(&mut self, buf: &[u8]) -> Step<()> {
        match buf.first() {
            None => return Step::NeedMore(1),
            Some(&VERSION) => {}
            Some(_) => return Step::NoMatch,
        }
        if buf.len() < 9 {
            return Step::NeedMore(9);
        }
        if buf[1..9].iter().all(|&b| is_text(b)) {
            return Step::NoMatch;
        }
        if buf.len() < 16 {
            return Step::NeedMore(16);
        }
        if mongodb::header_plausible(buf) {
            return Step::NoMatch;
        }
        if buf.len() < HANDSHAKE_LEN {
            return Step::NeedMore(HANDSHAKE_LEN);
        }
        Step::Match(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// C0+C1 the way ffmpeg starts it: uptime 0, version 9.0.124.2.
    fn c0c1() -> Vec<u8> {
        let mut b = vec![VERSION, 0, 0, 0, 0, 9, 0, 124, 2];
        b.extend((0..1528u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8));
        b
    }

    #[test]
    fn needs_all_of_c1() {
        let hs = c0c1();
        assert_eq!(hs.len(), HANDSHAKE_LEN);
        assert_eq!(handshake(&hs), Verdict::Match(()));
        for n in [0, 1, 8, 9, 16, 1000, HANDSHAKE_LEN - 1] {
            assert_eq!(handshake(&hs[..n]), Verdict::NeedMore, "{n}");
        }
        // The plain handshake: time, then four zeros.
        let mut plain = hs.clone();
        plain[1..9].copy_from_slice(&[0, 0, 0x30, 0x39, 0, 0, 0, 0]);
        assert_eq!(handshake(&plain), Verdict::Match(()));
    }

    #[test]
    fn refuses_near_misses() {
        let mut text = vec![VERSION];
        text.extend(b"GET / HTTP/1.1\r\n");
        assert_eq!(handshake(&text[..9]), Verdict::NoMatch);
        let mut rtmpe = c0c1();
        rtmpe[0] = 6;
        assert_eq!(handshake(&rtmpe), Verdict::NoMatch);
        // A MongoDB OP_MSG of 259 bytes: its length starts with 0x03.
        let mut mongo = c0c1();
        mongo[..16].copy_from_slice(&[3, 1, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0xdd, 7, 0, 0]);
        assert_eq!(handshake(&mongo[..16]), Verdict::NoMatch);
        assert_eq!(handshake(&mongo), Verdict::NoMatch);
    }
}
