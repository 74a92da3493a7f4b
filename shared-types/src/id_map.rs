//! Maps keyed by the ids the NLB and the module SDK give their live
//! connections: one entry made and one removed per connection, so the key
//! is hashed on every connection's way in and out.
//!
//! The ids come from a counter, never from a peer, so nothing needs the
//! standard map's SipHash (made for keys an attacker chooses, and about a
//! hundred instructions a hash): two multiplications and three shifts mix
//! a counter's bits over the whole hash, the low bits that pick the
//! bucket as well as the top seven that pick the probe's control bytes.
//! (One multiplication alone leaves the low bits of the product to the
//! low bits of the id: ids that share those, as each of the NLB's 16
//! shards of its table holds, would share their buckets.)

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A map from connection ids.
pub type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// The hash of one `u64`: it times an odd constant (2^64 over the golden
/// ratio), which sends every bit of the id into the high bits, then mixes
/// those down.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

const K: u64 = 0x9E37_79B9_7F4A_7C15;

impl Hasher for IdHasher {
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(K);
    }

    /// Other keys (not used as such here) byte by byte.
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn finish(&self) -> u64 {
        // The finish of MurmurHash3's 64-bit mix: xor-shifts around a
        // second multiplication carry the high bits down.
        let mut x = self.0;
        x ^= x >> 33;
        x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
        x ^ (x >> 33)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn counter_ids_spread_over_the_bucket_and_control_bits() {
        // hashbrown takes its 7 control bits from the top of the hash:
        // consecutive ids must not all share them.
        let build = BuildHasherDefault::<IdHasher>::default();
        let tops: std::collections::HashSet<u64> =
            (0..1024u64).map(|id| build.hash_one(id) >> 57).collect();
        assert!(tops.len() >= 100, "{} of 128 top values", tops.len());
        // The low bits pick the bucket: spread for consecutive ids, and
        // for ids that share their low bits (every 16th, as one of the
        // NLB's 16 shards holds).
        for stride in [1u64, 16] {
            let lows: std::collections::HashSet<u64> = (0..1024u64)
                .map(|i| build.hash_one(3 + i * stride) & 1023)
                .collect();
            assert!(
                lows.len() >= 600,
                "stride {stride}: {} of 1024 low values",
                lows.len()
            );
        }
    }

    #[test]
    fn a_map_keeps_what_it_is_given() {
        let mut m: IdMap<u64> = IdMap::default();
        for id in 0..10_000 {
            m.insert(id, id * 2);
        }
        for id in (0..10_000).step_by(2) {
            assert_eq!(m.remove(&id), Some(id * 2));
        }
        assert_eq!(m.len(), 5_000);
        assert!((1..10_000).step_by(2).all(|id| m[&id] == id * 2));
    }
}
