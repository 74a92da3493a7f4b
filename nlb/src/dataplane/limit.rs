//! New connections per second per source address (a token bucket each).

use std::collections::HashMap;
use std::net::IpAddr;

use parking_lot::Mutex;

use crate::routing::mono_ms;

const SHARDS: usize = 16;
/// A shard forgets addresses idle for this long once it holds this many.
const FORGET_AFTER_MS: u64 = 60_000;
const TIDY_AT: usize = 4096;

struct Bucket {
    tokens: f64,
    at_ms: u64,
}

/// Per-source connection rate limits.
pub struct SourceLimiter {
    shards: Vec<Mutex<HashMap<IpAddr, Bucket>>>,
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
        // The last byte of the address spreads sources over the shards,
        // which only split the lock.
        let shard = match ip {
            IpAddr::V4(v4) => usize::from(v4.octets()[3]) % SHARDS,
            IpAddr::V6(v6) => usize::from(v6.octets()[15]) % SHARDS,
        };
        let mut map = self.shards[shard].lock();
        if map.len() >= TIDY_AT {
            map.retain(|_, b| now.saturating_sub(b.at_ms) < FORGET_AFTER_MS);
        }
        let b = map.entry(ip).or_insert(Bucket {
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
