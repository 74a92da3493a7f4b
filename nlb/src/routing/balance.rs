//! Version split by weight and instance choice by load score.
//!
//! Version: each module type may carry per-version percentages (summing to
//! 100). A version with weight 0 or with no instance able to take a connection
//! is left out and the rest share in proportion. With stickiness the choice is
//! a hash of the client address, so a client keeps its version (and, through
//! rendezvous hashing, its instance) with no table.
//!
//! Instance: the power of two choices on the load score (active connections
//! relative to effective capacity); unhealthy, draining, full and address-less
//! instances are skipped.

use std::net::IpAddr;
use std::sync::Arc;

use super::endpoint::{mono_ms, Endpoint};
use super::pattern::canonical_ip;

/// A stable 64-bit hash (FNV-1a, then a splitmix finalizer), the same on every
/// NLB so stickiness survives restarts and holds across replicas.
pub fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match canonical_ip(ip) {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// Picks a version from `weights` (sorted by version name) among those with
/// at least one endpoint in `usable`. `None` if no weighted version is usable.
pub fn choose_version<'w>(
    weights: &'w [(String, u32)],
    usable: &[&Arc<Endpoint>],
    sticky_client: Option<IpAddr>,
) -> Option<&'w str> {
    let live: Vec<(&str, u32)> = weights
        .iter()
        .filter(|(v, w)| *w > 0 && usable.iter().any(|e| &e.version == v))
        .map(|(v, w)| (v.as_str(), *w))
        .collect();
    let total: u32 = live.iter().map(|(_, w)| w).sum();
    if total == 0 {
        return None;
    }
    let point = match sticky_client {
        Some(ip) => (stable_hash(&[&ip_bytes(ip)]) % u64::from(total)) as u32,
        None => fastrand::u32(0..total),
    };
    let mut acc = 0;
    for (version, w) in &live {
        acc += w;
        if point < acc {
            return Some(version);
        }
    }
    live.last().map(|(v, _)| *v)
}

/// Picks an instance: rendezvous hashing on the client address when sticky,
/// else the less loaded of two random candidates (young ones counting with
/// part of their capacity for `slow_start_ms`).
pub fn choose_endpoint<'e>(
    candidates: &[&'e Arc<Endpoint>],
    sticky_client: Option<IpAddr>,
    slow_start_ms: u64,
) -> Option<&'e Arc<Endpoint>> {
    match candidates.len() {
        0 => None,
        1 => Some(candidates[0]),
        n => {
            if let Some(ip) = sticky_client {
                let ip = ip_bytes(ip);
                return candidates
                    .iter()
                    .max_by_key(|e| stable_hash(&[&ip, e.id.as_bytes()]))
                    .copied();
            }
            let a = fastrand::usize(0..n);
            let mut b = fastrand::usize(0..n - 1);
            if b >= a {
                b += 1;
            }
            let (ea, eb) = (candidates[a], candidates[b]);
            let now = if slow_start_ms > 0 { mono_ms() } else { 0 };
            let score = |e: &Endpoint| e.load_score_warming(now, slow_start_ms);
            Some(if score(eb) < score(ea) { eb } else { ea })
        }
    }
}

/// The balance score of a set of loads: 1 when every instance carries the same
/// load score, toward 0 as they spread (1 minus the coefficient of variation,
/// floored at 0). An empty or idle set scores 1.
pub fn balance_score(loads: &[f64]) -> f64 {
    if loads.is_empty() {
        return 1.0;
    }
    let n = loads.len() as f64;
    let mean = loads.iter().sum::<f64>() / n;
    if mean <= f64::EPSILON {
        return 1.0;
    }
    let var = loads.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / n;
    (1.0 - var.sqrt() / mean).max(0.0)
}
