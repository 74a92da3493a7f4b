//! New connections per second per source address (a token bucket each).

use std::collections::HashMap;
use std::net::IpAddr;

use parking_lot::Mutex;

use crate::routing::mono_ms;

const SHARDS: usize = 16;
/// A shard forgets sources idle for this long, tidying at most once a
/// second once it holds `TIDY_AT` of them.
const FORGET_AFTER_MS: u64 = 60_000;
const TIDY_AT: usize = 4096;
/// Sources a shard tracks at most; past it (a flood of addresses) new
/// sources are admitted untracked rather than grow memory.
const CAP: usize = 65_536;

struct Bucket {
    tokens: f64,
    at_ms: u64,
}

/// Per-source connection rate limits.
pub struct SourceLimiter {
    shards: Vec<Mutex<Shard>>,
}

#[derive(Default)]
struct Shard {
    buckets: HashMap<IpAddr, Bucket>,
    tidied_ms: u64,
}

impl Default for SourceLimiter {
    fn default() -> Self {
        SourceLimiter {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl SourceLimiter {
    /// Takes a token for `ip` at `rate` per second with `burst` above it;
    /// false when there is none (the connection is refused). A rate of 0
    /// admits everything.
    pub fn admit(&self, ip: IpAddr, rate: u32, burst: u32) -> bool {
        if rate == 0 {
            return true;
        }
        let now = mono_ms();
        let capacity = f64::from(rate) + f64::from(burst);
        // An IPv6 client owns its /64: one bucket for all of it.
        let key = match ip {
            IpAddr::V4(_) => ip,
            IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        };
        let spread = match key {
            IpAddr::V4(v4) => u64::from(u32::from(v4)),
            IpAddr::V6(v6) => (u128::from(v6) >> 64) as u64,
        };
        let shard = (spread.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60) as usize % SHARDS;
        let mut shard = self.shards[shard].lock();
        if shard.buckets.len() >= TIDY_AT && now.saturating_sub(shard.tidied_ms) >= 1000 {
            shard.tidied_ms = now;
            shard
                .buckets
                .retain(|_, b| now.saturating_sub(b.at_ms) < FORGET_AFTER_MS);
        }
        if shard.buckets.len() >= CAP && !shard.buckets.contains_key(&key) {
            return true;
        }
        let b = shard.buckets.entry(key).or_insert(Bucket {
            tokens: capacity,
            at_ms: now,
        });
        let elapsed = now.saturating_sub(b.at_ms) as f64 / 1000.0;
        b.tokens = (b.tokens + elapsed * f64::from(rate)).min(capacity);
        b.at_ms = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_gets_rate_plus_burst_then_is_refused() {
        let l = SourceLimiter::default();
        let ip: IpAddr = "127.0.0.9".parse().unwrap();
        let admitted = (0..20).filter(|_| l.admit(ip, 5, 3)).count();
        assert_eq!(admitted, 8);
        // Another address has its own bucket.
        assert!(l.admit("127.0.0.10".parse().unwrap(), 5, 3));
        // No limit: always admitted.
        assert!((0..100).all(|_| l.admit(ip, 0, 0)));
    }
}
