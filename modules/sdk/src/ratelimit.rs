//! Request rate limits for a module: the limits an operator sets with
//! `ModuleService.SetRateLimit`, removes with `RemoveRateLimit` and lists
//! with `GetRateLimits`, and the check a module makes for every request.
//!
//! # What a limit means (for operators)
//!
//! A limit is a `marchproxy.RateLimit`:
//!
//! | field | meaning |
//! |---|---|
//! | `limit_id` | names the limit. Empty: the module assigns `rl-1`, `rl-2`, ... (never reusing one, skipping ids already taken) and `SetRateLimit` answers with it. Setting a limit whose id exists replaces that limit |
//! | `target` | which requests the limit counts: a key the module checks, such as `route:api` or `host:example.com` (each module documents its keys). `*` counts every request |
//! | `requests_per_second`, `requests_per_minute`, `requests_per_hour` | up to three windows; 0 = no limit on that window, at least one must be positive. A request must fit every window that is set |
//! | `burst_size` | how many requests may arrive at once within the per-second window (its bucket's capacity); 0 = `requests_per_second`. Needs `requests_per_second` |
//! | `enabled` | `false` keeps the limit (it is listed) but does not enforce it. Proto3 leaves it `false` when not sent, so send `enabled: true` |
//! | `metadata["per"]` | `"client"`: each client address gets its own buckets under this limit. Absent: all clients share one set of buckets. No other value is accepted; other metadata keys are kept and listed as given |
//!
//! Each window is a token bucket that refills continuously: a window of
//! N per minute holds at most N tokens and gains N/60 tokens per second, so a
//! client that used its whole minute gets one request back every 60/N
//! seconds rather than all N at the top of the next minute. Every request
//! takes one token from each bucket of each limit that applies to it. A
//! request is admitted only if all those buckets have a token; otherwise it
//! is refused and takes no token from any of them, so refused requests do
//! not use up another limit's allowance.
//!
//! A refused request carries the limit that refused it and how long until
//! that limit's emptiest bucket has a token again (when several buckets
//! refuse, the longest wait). The ALB answers it with `429 Too Many
//! Requests` and `Retry-After` in whole seconds, rounded up, at least 1
//! ([`Refused::retry_after_secs`]). Other clients may take that token
//! first, so the wait is a hint, not a reservation.
//!
//! Replacing a limit (`SetRateLimit` with an existing `limit_id`) applies the
//! new numbers at once with full buckets (every client starts over); its
//! admitted and refused counts carry on. Removing it forgets its buckets and
//! counts. Limits are listed in `limit_id` order (byte order, so `rl-10`
//! sorts before `rl-2`), all of them or those with one exact `target`.
//!
//! Limits are state of one module instance: each instance enforces its own
//! copy, so a limit set on each of three instances admits up to three times
//! its numbers in total. Limits are not persisted; they are gone when the
//! instance restarts.
//!
//! ## Per-client limits
//!
//! Clients are told apart by address: an IPv4 address is one client; IPv6
//! addresses are grouped by their /64 prefix, because one host or subscriber
//! usually holds a whole /64 and can pick any address in it, so per-address
//! buckets would neither stop it nor stay bounded. An IPv4-mapped IPv6
//! address (`::ffff:192.0.2.7`) is the IPv4 client. Requests whose client
//! address the module does not know share one set of buckets.
//!
//! A per-client limit tracks at most [`MAX_CLIENTS_PER_LIMIT`] clients
//! (about 11 MB at that size). When it is full and a new client arrives, it
//! first forgets every client whose buckets have refilled (idle clients:
//! forgetting them changes nothing, a client it does not know starts with
//! full buckets); if that frees less than an eighth of the table, it also
//! forgets the least recently seen clients until an eighth is free. So a
//! limit never grows without bound, but when more than that many clients are
//! busy at once, the least recently seen ones start over with full buckets.
//! The number forgotten is in [`LimitCounters::evicted_clients`]. A module
//! keeps at most [`MAX_LIMITS`] limits.
//!
//! # Using it (for module authors)
//!
//! ```
//! use std::net::IpAddr;
//!
//! use shared_types::pb;
//! use switchyard_sdk::ratelimit::RateLimiter;
//!
//! let limiter = RateLimiter::new();
//! // What the SDK does on SetRateLimit:
//! let stored = limiter.set(pb::RateLimit {
//!     target: "route:api".into(),
//!     requests_per_second: 100,
//!     burst_size: 200,
//!     enabled: true,
//!     ..Default::default()
//! })?;
//! assert_eq!(stored.limit_id, "rl-1");
//!
//! // What the module does for each request: the keys it belongs to
//! // (limits on `*` apply to every check without being named).
//! let client: IpAddr = "192.0.2.7".parse()?;
//! match limiter.check(&["route:api", "host:example.com"], Some(client)) {
//!     Ok(()) => { /* serve it */ }
//!     Err(refused) => {
//!         // 429, with Retry-After: refused.retry_after_secs()
//!         let _ = refused.retry_after_secs();
//!     }
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [`RateLimiter::set`] validates the limit and answers errors that name the
//! field and say what to send instead (map them to `INVALID_ARGUMENT`,
//! except [`LimitError::TooMany`]: `RESOURCE_EXHAUSTED`).
//! [`RateLimiter::counters`] gives admitted and refused counts per limit for
//! metrics and `GetStats` (label metrics by `limit_id`, never by client).
//!
//! # Cost
//!
//! With no enabled limit, a check is one atomic load. Otherwise it takes one
//! mutex shared by all limits of the limiter and, under it, does one hash
//! lookup per key, and for each limit that applies a few integer operations
//! on at most three buckets (plus one lookup of the client in a per-client
//! limit, two when the request is admitted). An admitted check allocates
//! nothing; a refused one clones two `Arc`s. Time comes from a monotonic
//! clock read on each check: there is no background task. The one lock
//! keeps a check across several limits all-or-nothing without lock ordering;
//! the work under it is short, and a module's requests mostly meet the same
//! `*` limit anyway, so per-limit locks would not spread the load. When a
//! per-client table is full, the insert that finds it full sweeps the table
//! (linear in its size, once per eighth of it).

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use shared_types::pb;

/// Clients a per-client limit tracks at most (see the module docs).
pub const MAX_CLIENTS_PER_LIMIT: usize = 100_000;
/// Limits a module keeps at most.
pub const MAX_LIMITS: usize = 1_000;
/// Longest `target`, in bytes.
pub const MAX_TARGET_LEN: usize = 256;
/// Longest `limit_id`, in bytes.
pub const MAX_ID_LEN: usize = 128;
/// The target that applies to every request.
pub const ALL_TARGETS: &str = "*";
/// The metadata key that makes a limit per client, and its only value.
pub const PER_KEY: &str = "per";
/// See [`PER_KEY`].
pub const PER_CLIENT: &str = "client";

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// One of a limit's windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Window {
    Second,
    Minute,
    Hour,
}

impl Window {
    /// The `RateLimit` field that sets this window.
    pub fn field(self) -> &'static str {
        match self {
            Window::Second => "requests_per_second",
            Window::Minute => "requests_per_minute",
            Window::Hour => "requests_per_hour",
        }
    }

    /// The window's length in seconds.
    pub fn seconds(self) -> u64 {
        match self {
            Window::Second => 1,
            Window::Minute => 60,
            Window::Hour => 3600,
        }
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Window::Second => "per-second",
            Window::Minute => "per-minute",
            Window::Hour => "per-hour",
        })
    }
}

/// A limit that `SetRateLimit` cannot take, with what to send instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("rate limit {limit}: {field} is {value}; {hint}")]
    Negative {
        limit: String,
        field: &'static str,
        value: i64,
        hint: &'static str,
    },
    #[error(
        "rate limit {limit}: requests_per_second, requests_per_minute and requests_per_hour \
         are all 0; set at least one to a positive number, or remove the limit"
    )]
    NoWindow { limit: String },
    #[error(
        "rate limit {limit}: burst_size is {burst_size} but requests_per_second is 0; \
         burst_size is the capacity of the per-second bucket, so set requests_per_second \
         too, or use burst_size 0"
    )]
    BurstWithoutPerSecond { limit: String, burst_size: i64 },
    #[error(
        "rate limit {limit}: target is empty; use \"*\" for every request or a key the \
         module checks, such as \"route:api\""
    )]
    EmptyTarget { limit: String },
    #[error("rate limit {limit}: target is {len} bytes long; the most is {max}")]
    TargetTooLong {
        limit: String,
        len: usize,
        max: usize,
    },
    #[error(
        "rate limit {limit}: target {target:?} contains whitespace or a control character; \
         a target is one key, such as \"route:api\" or \"host:example.com\""
    )]
    TargetInvalid { limit: String, target: String },
    #[error("rate limit id {id:?}: {reason}; leave limit_id empty to have one assigned")]
    InvalidId { id: String, reason: String },
    #[error(
        "rate limit {limit}: metadata[\"per\"] is {value:?}; the only value is \"client\" \
         (separate buckets for each client address); leave it out for buckets shared by \
         all clients"
    )]
    UnknownPer { limit: String, value: String },
    #[error(
        "rate limit {limit}: this module already has {max} rate limits, the most it keeps; \
         remove unused ones or replace one by its limit_id"
    )]
    TooMany { limit: String, max: usize },
}

/// A request refused by a limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "rate limit {limit_id} (target {target:?}) refused the request: its {window} window is \
     used up; retry after {retry_after:?}"
)]
pub struct Refused {
    /// The limit that refused (the one with the longest wait, if several did).
    pub limit_id: Arc<str>,
    /// That limit's target.
    pub target: Arc<str>,
    /// Its window that refused.
    pub window: Window,
    /// How long until every bucket that refused has a token again.
    pub retry_after: Duration,
}

impl Refused {
    /// `retry_after` in whole seconds, rounded up, at least 1: the value of
    /// an HTTP `Retry-After` header.
    pub fn retry_after_secs(&self) -> u64 {
        let d = self.retry_after;
        let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
        secs.max(1)
    }
}

/// What one limit has done since it was set (replacing it keeps counting).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitCounters {
    pub limit_id: String,
    pub target: String,
    pub enabled: bool,
    /// Requests the limit applied to and that were admitted.
    pub admitted: u64,
    /// Requests this limit refused (it had no token). A request refused by
    /// another limit while this one had tokens counts in neither.
    pub refused: u64,
    /// Clients a per-client limit tracks now (0 for a shared limit).
    pub clients: usize,
    /// Clients forgotten because the per-client table was full.
    pub evicted_clients: u64,
}

/// The rate limits of a module and their buckets. Share it (`Arc`) between
/// the `ModuleService` handlers and the data path.
pub struct RateLimiter {
    /// Enabled limits: a check with none takes no lock.
    enabled: AtomicUsize,
    max_clients: usize,
    inner: Mutex<Inner>,
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("limits", &self.len())
            .field("enabled", &self.enabled.load(Ordering::Relaxed))
            .field("max_clients", &self.max_clients)
            .finish()
    }
}

impl RateLimiter {
    /// A limiter with no limits, tracking up to [`MAX_CLIENTS_PER_LIMIT`]
    /// clients per per-client limit.
    pub fn new() -> Self {
        Self::with_max_clients(MAX_CLIENTS_PER_LIMIT)
    }

    /// A limiter tracking up to `max_clients` (at least 1) clients per
    /// per-client limit.
    pub fn with_max_clients(max_clients: usize) -> Self {
        RateLimiter {
            enabled: AtomicUsize::new(0),
            max_clients: max_clients.max(1),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Adds `limit`, or replaces the limit with its `limit_id` (buckets
    /// start full, counts carry on). An empty `limit_id` gets a fresh
    /// `rl-<n>`. Returns the limit as stored, with its id. On error nothing
    /// changes.
    pub fn set(&self, limit: pb::RateLimit) -> Result<pb::RateLimit, LimitError> {
        let parsed = Parsed::validate(&limit)?;
        let mut limit = limit;
        let mut inner = self.inner.lock();
        let found = if limit.limit_id.is_empty() {
            None
        } else {
            inner.position(&limit.limit_id).ok()
        };
        match found {
            Some(i) => inner.limits[i].replace(limit.clone(), parsed),
            None => {
                if inner.limits.len() >= MAX_LIMITS {
                    return Err(LimitError::TooMany {
                        limit: label(&limit),
                        max: MAX_LIMITS,
                    });
                }
                if limit.limit_id.is_empty() {
                    limit.limit_id = inner.fresh_id();
                }
                let at = inner.position(&limit.limit_id).unwrap_err();
                inner.limits.insert(at, Limit::new(limit.clone(), parsed));
            }
        }
        self.reindex(&mut inner);
        Ok(limit)
    }

    /// Removes the limit `limit_id`; false if there was none.
    pub fn remove(&self, limit_id: &str) -> bool {
        let mut inner = self.inner.lock();
        let Ok(i) = inner.position(limit_id) else {
            return false;
        };
        inner.limits.remove(i);
        self.reindex(&mut inner);
        true
    }

    /// The limit `limit_id`, as stored.
    pub fn get(&self, limit_id: &str) -> Option<pb::RateLimit> {
        let inner = self.inner.lock();
        let i = inner.position(limit_id).ok()?;
        Some(inner.limits[i].spec.clone())
    }

    /// The limits whose target is `target` (empty: all), enabled or not, in
    /// `limit_id` order.
    pub fn list(&self, target: &str) -> Vec<pb::RateLimit> {
        let inner = self.inner.lock();
        inner
            .limits
            .iter()
            .filter(|l| target.is_empty() || *l.target == *target)
            .map(|l| l.spec.clone())
            .collect()
    }

    /// Admitted and refused counts of every limit, in `limit_id` order.
    pub fn counters(&self) -> Vec<LimitCounters> {
        let inner = self.inner.lock();
        inner
            .limits
            .iter()
            .map(|l| LimitCounters {
                limit_id: l.spec.limit_id.clone(),
                target: l.spec.target.clone(),
                enabled: l.spec.enabled,
                admitted: l.admitted,
                refused: l.refused,
                clients: match &l.state {
                    State::Shared(_) => 0,
                    State::PerClient(map) => map.len(),
                },
                evicted_clients: l.evicted,
            })
            .collect()
    }

    /// How many limits are set, enabled or not.
    pub fn len(&self) -> usize {
        self.inner.lock().limits.len()
    }

    /// True when no limit is set.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks a request now. `keys` are the targets the request belongs to
    /// (limits on `*` apply without being named; a key given twice counts
    /// once); `client` is its client address, if known. Admitted: one
    /// token is taken from every bucket of every enabled limit that applies.
    /// Refused: none is taken.
    pub fn check(&self, keys: &[&str], client: Option<IpAddr>) -> Result<(), Refused> {
        if self.enabled.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        self.check_at(keys, client, Instant::now())
    }

    /// [`check`](Self::check) at a given time, for a caller that already
    /// read the clock, and for tests. Times earlier than one already seen
    /// add no tokens.
    pub fn check_at(
        &self,
        keys: &[&str],
        client: Option<IpAddr>,
        now: Instant,
    ) -> Result<(), Refused> {
        if self.enabled.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        let client = ClientKey::of(client);
        let mut inner = self.inner.lock();
        let Inner { limits, index, .. } = &mut *inner;

        // First every applicable limit looks (refilling its buckets);
        // only if none refuses does each take its tokens.
        let mut worst: Option<(Duration, Window, usize)> = None;
        index.for_each(keys, |i| {
            let limit = &mut limits[i];
            if let Some((wait, window)) = limit.shortfall(client, now) {
                limit.refused += 1;
                if worst.is_none_or(|(longest, _, _)| wait > longest) {
                    worst = Some((wait, window, i));
                }
            }
        });
        if let Some((retry_after, window, i)) = worst {
            let limit = &limits[i];
            return Err(Refused {
                limit_id: limit.id.clone(),
                target: limit.target.clone(),
                window,
                retry_after,
            });
        }
        let max_clients = self.max_clients;
        index.for_each(keys, |i| limits[i].take(client, now, max_clients));
        Ok(())
    }

    fn reindex(&self, inner: &mut Inner) {
        let mut index = Index::default();
        for (i, limit) in inner.limits.iter().enumerate() {
            if !limit.spec.enabled {
                continue;
            }
            if &*limit.target == ALL_TARGETS {
                index.all.push(i);
            } else {
                index
                    .by_target
                    .entry(limit.target.clone())
                    .or_default()
                    .push(i);
            }
        }
        let enabled = index.all.len() + index.by_target.values().map(Vec::len).sum::<usize>();
        inner.index = index;
        self.enabled.store(enabled, Ordering::Release);
    }
}

/// How a limit is named in errors before it has an id.
fn label(limit: &pb::RateLimit) -> String {
    if limit.limit_id.is_empty() {
        format!("for target {:?}", limit.target)
    } else {
        limit.limit_id.clone()
    }
}

fn is_key_char(c: char) -> bool {
    !c.is_whitespace() && !c.is_control()
}

#[derive(Default)]
struct Inner {
    /// Sorted by id.
    limits: Vec<Limit>,
    /// Positions in `limits` of the enabled ones, by target.
    index: Index,
    /// The last `n` of an assigned `rl-<n>`.
    next_id: u64,
}

impl Inner {
    fn position(&self, id: &str) -> Result<usize, usize> {
        self.limits.binary_search_by(|l| (*l.id).cmp(id))
    }

    fn fresh_id(&mut self) -> String {
        loop {
            self.next_id += 1;
            let id = format!("rl-{}", self.next_id);
            if self.position(&id).is_err() {
                return id;
            }
        }
    }
}

#[derive(Default)]
struct Index {
    /// Limits on `*`.
    all: Vec<usize>,
    by_target: HashMap<Arc<str>, Vec<usize>>,
}

impl Index {
    /// Calls `f` once with each enabled limit that applies to `keys`.
    fn for_each(&self, keys: &[&str], mut f: impl FnMut(usize)) {
        self.all.iter().for_each(|&i| f(i));
        if self.by_target.is_empty() {
            return;
        }
        for (n, key) in keys.iter().enumerate() {
            if *key == ALL_TARGETS || keys[..n].contains(key) {
                continue;
            }
            if let Some(limits) = self.by_target.get(*key) {
                limits.iter().for_each(|&i| f(i));
            }
        }
    }
}

/// What a valid `RateLimit` becomes.
struct Parsed {
    buckets: Vec<Bucket>,
    per_client: bool,
}

impl Parsed {
    fn validate(limit: &pb::RateLimit) -> Result<Parsed, LimitError> {
        let id = &limit.limit_id;
        if id.len() > MAX_ID_LEN {
            return Err(LimitError::InvalidId {
                id: id.clone(),
                reason: format!("{} bytes long, the most is {MAX_ID_LEN}", id.len()),
            });
        }
        if !id.chars().all(is_key_char) {
            return Err(LimitError::InvalidId {
                id: id.clone(),
                reason: "contains whitespace or a control character".into(),
            });
        }
        let name = || label(limit);
        let target = &limit.target;
        if target.is_empty() {
            return Err(LimitError::EmptyTarget { limit: name() });
        }
        if target.len() > MAX_TARGET_LEN {
            return Err(LimitError::TargetTooLong {
                limit: name(),
                len: target.len(),
                max: MAX_TARGET_LEN,
            });
        }
        if !target.chars().all(is_key_char) {
            return Err(LimitError::TargetInvalid {
                limit: name(),
                target: target.clone(),
            });
        }
        let fields = [
            (
                "requests_per_second",
                limit.requests_per_second,
                "use 0 for no per-second limit or a positive number",
            ),
            (
                "requests_per_minute",
                limit.requests_per_minute,
                "use 0 for no per-minute limit or a positive number",
            ),
            (
                "requests_per_hour",
                limit.requests_per_hour,
                "use 0 for no per-hour limit or a positive number",
            ),
            (
                "burst_size",
                limit.burst_size,
                "use 0 for a burst equal to requests_per_second or a positive number",
            ),
        ];
        for (field, value, hint) in fields {
            if value < 0 {
                return Err(LimitError::Negative {
                    limit: name(),
                    field,
                    value,
                    hint,
                });
            }
        }
        let (second, minute, hour) = (
            limit.requests_per_second,
            limit.requests_per_minute,
            limit.requests_per_hour,
        );
        if second == 0 && minute == 0 && hour == 0 {
            return Err(LimitError::NoWindow { limit: name() });
        }
        if second == 0 && limit.burst_size > 0 {
            return Err(LimitError::BurstWithoutPerSecond {
                limit: name(),
                burst_size: limit.burst_size,
            });
        }
        let per_client = match limit.metadata.get(PER_KEY).map(String::as_str) {
            None => false,
            Some(PER_CLIENT) => true,
            Some(other) => {
                return Err(LimitError::UnknownPer {
                    limit: name(),
                    value: other.to_owned(),
                })
            }
        };
        let mut buckets = Vec::with_capacity(3);
        if second > 0 {
            let burst = if limit.burst_size > 0 {
                limit.burst_size
            } else {
                second
            };
            buckets.push(Bucket::new(Window::Second, second, burst));
        }
        if minute > 0 {
            buckets.push(Bucket::new(Window::Minute, minute, minute));
        }
        if hour > 0 {
            buckets.push(Bucket::new(Window::Hour, hour, hour));
        }
        Ok(Parsed {
            buckets,
            per_client,
        })
    }
}

/// One window's bucket, in exact integer units: one token is
/// `window length in ns` units, and the bucket gains `requests per window`
/// units each nanosecond, so refill and waits need no rounding.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    window: Window,
    /// Units per token.
    token: u128,
    /// Units gained per nanosecond.
    rate: u128,
    /// Units held at most.
    capacity: u128,
}

impl Bucket {
    /// `per_window` and `capacity` are positive.
    fn new(window: Window, per_window: i64, capacity: i64) -> Self {
        let token = u128::from(window.seconds()) * NANOS_PER_SEC;
        Bucket {
            window,
            token,
            rate: u128::from(per_window.unsigned_abs()),
            capacity: u128::from(capacity.unsigned_abs()) * token,
        }
    }
}

/// The fill of a limit's buckets for one client (or all), in the order of
/// `Limit::buckets`.
#[derive(Debug, Clone, Copy)]
struct Fill {
    units: [u128; 3],
    /// When last refilled (and so, seen); `None`: never, full.
    last: Option<Instant>,
}

impl Fill {
    fn full(buckets: &[Bucket], last: Option<Instant>) -> Self {
        let mut units = [0; 3];
        for (u, b) in units.iter_mut().zip(buckets) {
            *u = b.capacity;
        }
        Fill { units, last }
    }

    fn elapsed_nanos(&self, now: Instant) -> u128 {
        self.last
            .map_or(0, |last| now.saturating_duration_since(last).as_nanos())
    }

    fn refill(&mut self, buckets: &[Bucket], now: Instant) {
        let elapsed = self.elapsed_nanos(now);
        for (u, b) in self.units.iter_mut().zip(buckets) {
            *u = u
                .saturating_add(elapsed.saturating_mul(b.rate))
                .min(b.capacity);
        }
        if self.last.is_none_or(|last| now > last) {
            self.last = Some(now);
        }
    }

    /// The longest wait among buckets without a whole token.
    fn shortfall(&self, buckets: &[Bucket]) -> Option<(Duration, Window)> {
        let mut worst: Option<(Duration, Window)> = None;
        for (&u, b) in self.units.iter().zip(buckets) {
            if u < b.token {
                let nanos = (b.token - u).div_ceil(b.rate);
                let wait = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
                if worst.is_none_or(|(longest, _)| wait > longest) {
                    worst = Some((wait, b.window));
                }
            }
        }
        worst
    }

    fn take(&mut self, buckets: &[Bucket]) {
        for (u, b) in self.units.iter_mut().zip(buckets) {
            *u = u.saturating_sub(b.token);
        }
    }

    /// Whether every bucket would be full at `now`.
    fn is_full(&self, buckets: &[Bucket], now: Instant) -> bool {
        let elapsed = self.elapsed_nanos(now);
        self.units
            .iter()
            .zip(buckets)
            .all(|(&u, b)| u.saturating_add(elapsed.saturating_mul(b.rate)) >= b.capacity)
    }
}

/// Who a per-client limit tells apart (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ClientKey {
    Unknown,
    V4(u32),
    /// The /64 prefix.
    V6(u64),
}

impl ClientKey {
    fn of(client: Option<IpAddr>) -> Self {
        match client.map(|ip| ip.to_canonical()) {
            None => ClientKey::Unknown,
            Some(IpAddr::V4(ip)) => ClientKey::V4(u32::from(ip)),
            Some(IpAddr::V6(ip)) => ClientKey::V6((u128::from(ip) >> 64) as u64),
        }
    }
}

enum State {
    Shared(Fill),
    /// A client not in the map has full buckets.
    PerClient(HashMap<ClientKey, Fill>),
}

impl State {
    fn new(parsed: &Parsed) -> Self {
        if parsed.per_client {
            State::PerClient(HashMap::new())
        } else {
            State::Shared(Fill::full(&parsed.buckets, None))
        }
    }
}

struct Limit {
    /// As set, with its id.
    spec: pb::RateLimit,
    id: Arc<str>,
    target: Arc<str>,
    buckets: Vec<Bucket>,
    state: State,
    admitted: u64,
    refused: u64,
    evicted: u64,
}

impl Limit {
    fn new(spec: pb::RateLimit, parsed: Parsed) -> Self {
        Limit {
            id: spec.limit_id.as_str().into(),
            target: spec.target.as_str().into(),
            state: State::new(&parsed),
            buckets: parsed.buckets,
            spec,
            admitted: 0,
            refused: 0,
            evicted: 0,
        }
    }

    fn replace(&mut self, spec: pb::RateLimit, parsed: Parsed) {
        let (admitted, refused, evicted) = (self.admitted, self.refused, self.evicted);
        *self = Limit {
            admitted,
            refused,
            evicted,
            ..Limit::new(spec, parsed)
        };
    }

    /// Refills `client`'s buckets; the longest wait if one lacks a token.
    fn shortfall(&mut self, client: ClientKey, now: Instant) -> Option<(Duration, Window)> {
        let fill = match &mut self.state {
            State::Shared(fill) => fill,
            State::PerClient(map) => map.get_mut(&client)?,
        };
        fill.refill(&self.buckets, now);
        fill.shortfall(&self.buckets)
    }

    /// Takes a token from each of `client`'s buckets (refilled and checked
    /// by `shortfall` just before).
    fn take(&mut self, client: ClientKey, now: Instant, max_clients: usize) {
        self.admitted += 1;
        let buckets = &self.buckets;
        let map = match &mut self.state {
            State::Shared(fill) => {
                fill.take(buckets);
                return;
            }
            State::PerClient(map) => map,
        };
        if let Some(fill) = map.get_mut(&client) {
            fill.take(buckets);
            return;
        }
        if map.len() >= max_clients {
            self.evicted += make_room(map, buckets, now, max_clients);
        }
        let mut fill = Fill::full(buckets, Some(now));
        fill.take(buckets);
        map.insert(client, fill);
    }
}

/// Frees at least an eighth (at least one) of a full per-client table:
/// first every idle client, then the least recently seen. Returns how many
/// clients it forgot.
fn make_room(
    map: &mut HashMap<ClientKey, Fill>,
    buckets: &[Bucket],
    now: Instant,
    max_clients: usize,
) -> u64 {
    let keep = max_clients - (max_clients / 8).max(1);
    let before = map.len();
    map.retain(|_, fill| !fill.is_full(buckets, now));
    if map.len() > keep {
        let excess = map.len() - keep;
        let mut by_age: Vec<(Option<Instant>, ClientKey)> =
            map.iter().map(|(key, fill)| (fill.last, *key)).collect();
        by_age.select_nth_unstable_by_key(excess - 1, |&(last, _)| last);
        for (_, key) in &by_age[..excess] {
            map.remove(key);
        }
    }
    (before - map.len()) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(target: &str, second: i64, minute: i64, hour: i64) -> pb::RateLimit {
        pb::RateLimit {
            target: target.into(),
            requests_per_second: second,
            requests_per_minute: minute,
            requests_per_hour: hour,
            enabled: true,
            ..Default::default()
        }
    }

    fn per_client(mut l: pb::RateLimit) -> pb::RateLimit {
        l.metadata.insert(PER_KEY.into(), PER_CLIENT.into());
        l
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    const MS: Duration = Duration::from_millis(1);
    const SEC: Duration = Duration::from_secs(1);

    /// Checks `n` times at `now`; how many were admitted.
    fn admit(
        rl: &RateLimiter,
        keys: &[&str],
        client: Option<IpAddr>,
        now: Instant,
        n: usize,
    ) -> usize {
        (0..n)
            .filter(|_| rl.check_at(keys, client, now).is_ok())
            .count()
    }

    fn refused(rl: &RateLimiter, keys: &[&str], client: Option<IpAddr>, now: Instant) -> Refused {
        rl.check_at(keys, client, now)
            .expect_err("expected a refusal")
    }

    #[test]
    fn no_limits_admit_everything_without_counting() {
        let rl = RateLimiter::new();
        assert!(rl.is_empty());
        for _ in 0..10_000 {
            assert_eq!(rl.check(&["*", "route:api"], ip("192.0.2.1")), Ok(()));
        }
        assert!(rl.counters().is_empty());
        assert!(rl.list("").is_empty());
    }

    #[test]
    fn per_second_window_alone() {
        let rl = RateLimiter::new();
        rl.set(limit("*", 10, 0, 0)).unwrap();
        let t0 = Instant::now();
        assert_eq!(admit(&rl, &[], None, t0, 20), 10);
        let r = refused(&rl, &[], None, t0);
        assert_eq!(r.window, Window::Second);
        assert_eq!(r.retry_after, 100 * MS);
        assert_eq!(admit(&rl, &[], None, t0 + SEC, 20), 10);
    }

    #[test]
    fn per_minute_window_alone() {
        let rl = RateLimiter::new();
        rl.set(limit("*", 0, 60, 0)).unwrap();
        let t0 = Instant::now();
        assert_eq!(admit(&rl, &[], None, t0, 100), 60);
        let r = refused(&rl, &[], None, t0);
        assert_eq!((r.window, r.retry_after), (Window::Minute, SEC));
        assert_eq!(admit(&rl, &[], None, t0 + SEC, 10), 1);
        // Taking that one left none at 1 s; 60 s later the bucket is full.
        assert_eq!(admit(&rl, &[], None, t0 + 61 * SEC, 100), 60);
    }

    #[test]
    fn per_hour_window_alone() {
        let rl = RateLimiter::new();
        rl.set(limit("*", 0, 0, 2)).unwrap();
        let t0 = Instant::now();
        assert_eq!(admit(&rl, &[], None, t0, 10), 2);
        let r = refused(&rl, &[], None, t0);
        assert_eq!((r.window, r.retry_after), (Window::Hour, 1800 * SEC));
        assert_eq!(r.retry_after_secs(), 1800);
        assert_eq!(admit(&rl, &[], None, t0 + 1799 * SEC, 10), 0);
        assert_eq!(admit(&rl, &[], None, t0 + 1800 * SEC, 10), 1);
    }

    #[test]
    fn burst_sets_the_per_second_capacity() {
        let rl = RateLimiter::new();
        let mut big = limit("route:big", 10, 0, 0);
        big.burst_size = 25;
        let mut small = limit("route:small", 10, 0, 0);
        small.burst_size = 3;
        rl.set(big).unwrap();
        rl.set(small).unwrap();
        let t0 = Instant::now();
        assert_eq!(admit(&rl, &["route:big"], None, t0, 100), 25);
        assert_eq!(admit(&rl, &["route:small"], None, t0, 100), 3);
        // Refill is still 10 per second, up to the burst.
        assert_eq!(admit(&rl, &["route:big"], None, t0 + SEC, 100), 10);
        assert_eq!(admit(&rl, &["route:big"], None, t0 + 10 * SEC, 100), 25);
        assert_eq!(admit(&rl, &["route:small"], None, t0 + 10 * SEC, 100), 3);
        assert_eq!(
            refused(&rl, &["route:small"], None, t0).retry_after,
            100 * MS
        );
    }

    #[test]
    fn combined_windows_each_hold() {
        let rl = RateLimiter::new();
        rl.set(limit("*", 10, 15, 20)).unwrap();
        let t0 = Instant::now();
        assert_eq!(admit(&rl, &[], None, t0, 100), 10);
        assert_eq!(refused(&rl, &[], None, t0).window, Window::Second);
        // A second later the second bucket is full again, the minute bucket
        // has 5 + 0.25 tokens.
        assert_eq!(admit(&rl, &[], None, t0 + SEC, 100), 5);
        let r = refused(&rl, &[], None, t0 + SEC);
        assert_eq!(r.window, Window::Minute);
        // 0.75 of a token at 15 per minute.
        assert_eq!(r.retry_after, 3 * SEC);
        // A minute later the minute bucket is full, the hour bucket has
        // 5 + 20/60 tokens left.
        assert_eq!(admit(&rl, &[], None, t0 + 61 * SEC, 100), 5);
        let r = refused(&rl, &[], None, t0 + 61 * SEC);
        assert_eq!(r.window, Window::Hour);
        // Has 61 s * 20/3600 = 0.3388... of a token; needs 0.6611... more at
        // 1 per 180 s: 119 s.
        assert_eq!(r.retry_after, 119 * SEC);
    }

    #[test]
    fn refill_is_continuous() {
        let rl = RateLimiter::new();
        rl.set(limit("*", 10, 0, 0)).unwrap();
        let t0 = Instant::now();
        assert_eq!(admit(&rl, &[], None, t0, 10), 10);
        assert_eq!(admit(&rl, &[], None, t0 + 99 * MS, 10), 0);
        assert_eq!(admit(&rl, &[], None, t0 + 100 * MS, 10), 1);
        // 1.5 tokens by 250 ms: one admitted, half a token left.
        assert_eq!(admit(&rl, &[], None, t0 + 250 * MS, 10), 1);
        assert_eq!(refused(&rl, &[], None, t0 + 250 * MS).retry_after, 50 * MS);
        assert_eq!(admit(&rl, &[], None, t0 + 300 * MS, 10), 1);
    }

    #[test]
    fn refusals_take_no_tokens_and_time_never_runs_backwards() {
        let rl = RateLimiter::new();
        rl.set(limit("*", 10, 0, 0)).unwrap();
        let t0 = Instant::now();
        assert_eq!(admit(&rl, &[], None, t0 + SEC, 10), 10);
        // An earlier time (another thread's stale clock read) adds nothing.
        assert_eq!(admit(&rl, &[], None, t0, 10), 0);
        assert_eq!(admit(&rl, &[], None, t0 + SEC + 100 * MS, 10), 1);
    }

    #[test]
    fn retry_after_is_the_longest_wait_among_refusing_limits() {
        let rl = RateLimiter::new();
        rl.set(limit("*", 4, 0, 0)).unwrap();
        let mut api = limit("route:api", 0, 2, 0);
        api.limit_id = "api".into();
        rl.set(api).unwrap();
        let t0 = Instant::now();
        assert_eq!(admit(&rl, &["route:api"], None, t0, 10), 2);
        // "*" still has 2: the api limit refuses, 30 s.
        let r = refused(&rl, &["route:api"], None, t0);
        assert_eq!((&*r.limit_id, &*r.target), ("api", "route:api"));
        assert_eq!((r.window, r.retry_after), (Window::Minute, 30 * SEC));
        // Empty "*" as well: still the longer wait wins.
        assert_eq!(admit(&rl, &[], None, t0, 10), 2);
        let r = refused(&rl, &["route:api"], None, t0);
        assert_eq!((&*r.limit_id, r.retry_after), ("api", 30 * SEC));
        // Without route:api only "*" applies.
        let r = refused(&rl, &[], None, t0);
        assert_eq!((&*r.limit_id, r.retry_after), ("rl-1", 250 * MS));
        assert_eq!(r.retry_after_secs(), 1);
        assert_eq!(
            r.to_string(),
            "rate limit rl-1 (target \"*\") refused the request: its per-second window is \
             used up; retry after 250ms"
        );
    }

    #[test]
    fn retry_after_secs_rounds_up_to_at_least_one() {
        let refused = |retry_after| Refused {
            limit_id: "rl-1".into(),
            target: "*".into(),
            window: Window::Second,
            retry_after,
        };
        assert_eq!(refused(Duration::ZERO).retry_after_secs(), 1);
        assert_eq!(refused(Duration::from_nanos(1)).retry_after_secs(), 1);
        assert_eq!(refused(SEC).retry_after_secs(), 1);
        assert_eq!(refused(SEC + Duration::from_nanos(1)).retry_after_secs(), 2);
        assert_eq!(refused(1800 * SEC).retry_after_secs(), 1800);
    }

    #[test]
    fn targets_apply_to_matching_keys_and_star_to_all() {
        let rl = RateLimiter::new();
        rl.set(limit("route:api", 2, 0, 0)).unwrap();
        rl.set(limit("host:example.com", 3, 0, 0)).unwrap();
        let t0 = Instant::now();
        // Keys no limit names are free.
        assert_eq!(admit(&rl, &["route:web", "host:other"], None, t0, 50), 50);
        // A key given twice counts once.
        assert_eq!(admit(&rl, &["route:api", "route:api"], None, t0, 10), 2);
        assert_eq!(admit(&rl, &["host:example.com", "*"], None, t0, 10), 3);

        // A "*" limit applies whether or not the module names "*".
        rl.set(limit("*", 5, 0, 0)).unwrap();
        assert_eq!(admit(&rl, &["route:web"], None, t0, 3), 3);
        assert_eq!(admit(&rl, &["*", "*"], None, t0, 10), 2);
        assert_eq!(admit(&rl, &[], None, t0, 10), 0);
    }

    #[test]
    fn a_refusal_takes_no_token_from_limits_that_had_one() {
        let rl = RateLimiter::new();
        rl.set(limit("*", 5, 0, 0)).unwrap();
        rl.set(limit("route:api", 1, 0, 0)).unwrap();
        let t0 = Instant::now();
        assert_eq!(admit(&rl, &["route:api"], None, t0, 50), 1);
        // 49 refusals by route:api left the other 4 "*" tokens.
        assert_eq!(admit(&rl, &["route:web"], None, t0, 50), 4);
        let c = rl.counters();
        assert_eq!((c[0].admitted, c[0].refused), (5, 46));
        assert_eq!((c[1].admitted, c[1].refused), (1, 49));
    }

    #[test]
    fn per_client_limits_keep_clients_apart() {
        let rl = RateLimiter::new();
        rl.set(per_client(limit("route:api", 2, 0, 0))).unwrap();
        rl.set(limit("route:shared", 2, 0, 0)).unwrap();
        let t0 = Instant::now();
        let (a, b) = (ip("192.0.2.1"), ip("192.0.2.2"));
        assert_eq!(admit(&rl, &["route:api"], a, t0, 10), 2);
        assert_eq!(admit(&rl, &["route:api"], b, t0, 10), 2);
        assert_eq!(refused(&rl, &["route:api"], a, t0).retry_after, 500 * MS);
        // The shared limit counts both together.
        assert_eq!(admit(&rl, &["route:shared"], a, t0, 10), 2);
        assert_eq!(admit(&rl, &["route:shared"], b, t0, 10), 0);
        assert_eq!(rl.counters()[0].clients, 2);
    }

    #[test]
    fn clients_are_ipv4_addresses_ipv6_slash_64s_or_unknown() {
        let rl = RateLimiter::new();
        rl.set(per_client(limit("*", 1, 0, 0))).unwrap();
        let t0 = Instant::now();
        assert_eq!(admit(&rl, &[], ip("2001:db8:1:2::1"), t0, 5), 1);
        // Same /64: same client.
        assert_eq!(admit(&rl, &[], ip("2001:db8:1:2:ffff::9"), t0, 5), 0);
        // Next /64: another client.
        assert_eq!(admit(&rl, &[], ip("2001:db8:1:3::1"), t0, 5), 1);
        // An IPv4-mapped address is the IPv4 client.
        assert_eq!(admit(&rl, &[], ip("198.51.100.7"), t0, 5), 1);
        assert_eq!(admit(&rl, &[], ip("::ffff:198.51.100.7"), t0, 5), 0);
        // Requests without an address share one set of buckets.
        assert_eq!(admit(&rl, &[], None, t0, 5), 1);
        assert_eq!(admit(&rl, &[], None, t0, 5), 0);
        assert_eq!(rl.counters()[0].clients, 4);
    }

    #[test]
    fn the_client_table_never_outgrows_its_bound() {
        let rl = RateLimiter::with_max_clients(8);
        rl.set(per_client(limit("*", 0, 0, 1))).unwrap();
        let t0 = Instant::now();
        for n in 0..100u32 {
            let client = Some(IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + n)));
            assert!(rl.check_at(&[], client, t0).is_ok());
            assert!(rl.counters()[0].clients <= 8);
        }
        let c = &rl.counters()[0];
        assert_eq!((c.admitted, c.refused), (100, 0));
        assert_eq!(c.evicted_clients, 100 - c.clients as u64);
    }

    #[test]
    fn idle_clients_are_forgotten_before_busy_ones() {
        let rl = RateLimiter::with_max_clients(3);
        let mut l = per_client(limit("*", 10, 0, 0));
        l.burst_size = 10;
        rl.set(l).unwrap();
        let t0 = Instant::now();
        let (a, b, c, d) = (
            ip("192.0.2.1"),
            ip("192.0.2.2"),
            ip("192.0.2.3"),
            ip("192.0.2.4"),
        );
        // b and c use all 10 tokens; a, seen last, only one.
        assert_eq!(admit(&rl, &[], b, t0, 10), 10);
        assert_eq!(admit(&rl, &[], c, t0 + MS, 10), 10);
        assert_eq!(admit(&rl, &[], a, t0 + 2 * MS, 1), 1);
        // At 200 ms a is full again (idle), b and c are not.
        let t = t0 + 200 * MS;
        assert!(rl.check_at(&[], d, t).is_ok());
        assert_eq!(rl.counters()[0].evicted_clients, 1);
        // b kept its state: 2 tokens, not 10.
        assert_eq!(admit(&rl, &[], b, t, 10), 2);
    }

    #[test]
    fn the_least_recently_seen_client_goes_when_none_is_idle() {
        let rl = RateLimiter::with_max_clients(3);
        rl.set(per_client(limit("*", 0, 0, 2))).unwrap();
        let t0 = Instant::now();
        let clients: Vec<_> = (1..=4).map(|n| ip(&format!("192.0.2.{n}"))).collect();
        for (n, &client) in clients[..3].iter().enumerate() {
            assert_eq!(admit(&rl, &[], client, t0 + n as u32 * SEC, 1), 1);
        }
        // The first client is seen again: it takes its second token.
        assert_eq!(admit(&rl, &[], clients[0], t0 + 3 * SEC, 1), 1);
        assert_eq!(admit(&rl, &[], clients[3], t0 + 4 * SEC, 1), 1);
        let c = &rl.counters()[0];
        assert_eq!((c.clients, c.evicted_clients), (3, 1));
        // The second (least recently seen) was forgotten: full again.
        assert_eq!(admit(&rl, &[], clients[1], t0 + 5 * SEC, 5), 2);
        // The first was kept: its two tokens are used.
        assert_eq!(admit(&rl, &[], clients[0], t0 + 5 * SEC, 5), 0);
    }

    #[test]
    fn disabled_limits_are_kept_and_listed_but_not_enforced() {
        let rl = RateLimiter::new();
        let mut l = limit("*", 1, 0, 0);
        l.enabled = false;
        let stored = rl.set(l).unwrap();
        let t0 = Instant::now();
        assert_eq!(admit(&rl, &[], None, t0, 10), 10);
        assert_eq!(rl.list(""), vec![stored.clone()]);
        assert!(!rl.is_empty());
        let c = &rl.counters()[0];
        assert_eq!((c.enabled, c.admitted, c.refused), (false, 0, 0));
        // Enabling it is setting it again.
        rl.set(pb::RateLimit {
            enabled: true,
            ..stored
        })
        .unwrap();
        assert_eq!(admit(&rl, &[], None, t0, 10), 1);
    }

    #[test]
    fn setting_an_existing_id_replaces_it_with_full_buckets() {
        let rl = RateLimiter::new();
        let stored = rl.set(limit("route:api", 2, 0, 0)).unwrap();
        let t0 = Instant::now();
        assert_eq!(admit(&rl, &["route:api"], None, t0, 10), 2);
        let replaced = rl
            .set(pb::RateLimit {
                requests_per_second: 3,
                ..stored.clone()
            })
            .unwrap();
        assert_eq!(replaced.limit_id, stored.limit_id);
        assert_eq!(rl.len(), 1);
        assert_eq!(admit(&rl, &["route:api"], None, t0, 10), 3);
        let c = &rl.counters()[0];
        assert_eq!((c.admitted, c.refused), (5, 15));
        // A new target moves it.
        rl.set(pb::RateLimit {
            target: "route:web".into(),
            ..replaced
        })
        .unwrap();
        assert_eq!(admit(&rl, &["route:api"], None, t0, 10), 10);
        assert_eq!(admit(&rl, &["route:web"], None, t0, 10), 3);
    }

    #[test]
    fn remove_says_whether_the_limit_existed() {
        let rl = RateLimiter::new();
        let id = rl.set(limit("*", 1, 0, 0)).unwrap().limit_id;
        let t0 = Instant::now();
        assert_eq!(admit(&rl, &[], None, t0, 10), 1);
        assert!(!rl.remove("rl-404"));
        assert!(rl.remove(&id));
        assert!(!rl.remove(&id));
        assert!(rl.is_empty());
        assert_eq!(rl.get(&id), None);
        assert_eq!(admit(&rl, &[], None, t0, 10), 10);
        assert!(rl.counters().is_empty());
    }

    #[test]
    fn list_filters_by_exact_target_in_id_order() {
        let rl = RateLimiter::new();
        for (id, target) in [
            ("b", "route:api"),
            ("a", "route:api"),
            ("c", "*"),
            ("", "route:api"),
            ("", "route:apix"),
        ] {
            rl.set(pb::RateLimit {
                limit_id: id.into(),
                ..limit(target, 1, 0, 0)
            })
            .unwrap();
        }
        let ids =
            |target| -> Vec<String> { rl.list(target).into_iter().map(|l| l.limit_id).collect() };
        assert_eq!(ids(""), ["a", "b", "c", "rl-1", "rl-2"]);
        assert_eq!(ids("route:api"), ["a", "b", "rl-1"]);
        assert_eq!(ids("*"), ["c"]);
        assert!(ids("route:none").is_empty());
        let ids: Vec<_> = rl.counters().into_iter().map(|c| c.limit_id).collect();
        assert_eq!(ids, ["a", "b", "c", "rl-1", "rl-2"]);
    }

    #[test]
    fn set_returns_the_limit_as_stored_and_assigned_ids_skip_taken_ones() {
        let rl = RateLimiter::new();
        let mut mine = limit("*", 1, 0, 0);
        mine.limit_id = "rl-1".into();
        mine.metadata.insert("owner".into(), "ops".into());
        assert_eq!(rl.set(mine.clone()).unwrap(), mine);
        let assigned = rl.set(limit("route:api", 1, 0, 0)).unwrap();
        assert_eq!(assigned.limit_id, "rl-2");
        assert_eq!(
            assigned,
            pb::RateLimit {
                limit_id: "rl-2".into(),
                ..limit("route:api", 1, 0, 0)
            }
        );
        assert_eq!(rl.get("rl-1"), Some(mine));
        assert_eq!(rl.set(limit("*", 1, 0, 0)).unwrap().limit_id, "rl-3");
    }

    #[test]
    fn invalid_limits_are_refused_with_the_field_and_a_fix() {
        let rl = RateLimiter::new();
        let err = |l: pb::RateLimit| rl.set(l).unwrap_err();
        let named = |id: &str, l: pb::RateLimit| pb::RateLimit {
            limit_id: id.into(),
            ..l
        };

        assert_eq!(
            err(named("rl-1", limit("*", -5, 0, 0))).to_string(),
            "rate limit rl-1: requests_per_second is -5; use 0 for no per-second limit or a \
             positive number"
        );
        assert_eq!(
            err(limit("route:api", 0, -1, 0)).to_string(),
            "rate limit for target \"route:api\": requests_per_minute is -1; use 0 for no \
             per-minute limit or a positive number"
        );
        assert!(matches!(
            err(limit("*", 0, 0, -2)),
            LimitError::Negative {
                field: "requests_per_hour",
                value: -2,
                ..
            }
        ));
        let mut l = limit("*", 5, 0, 0);
        l.burst_size = -1;
        assert!(matches!(
            err(l),
            LimitError::Negative {
                field: "burst_size",
                value: -1,
                ..
            }
        ));
        assert_eq!(
            err(named("x", limit("*", 0, 0, 0))).to_string(),
            "rate limit x: requests_per_second, requests_per_minute and requests_per_hour are \
             all 0; set at least one to a positive number, or remove the limit"
        );
        let mut l = limit("*", 0, 60, 0);
        l.burst_size = 10;
        assert!(err(l)
            .to_string()
            .contains("burst_size is 10 but requests_per_second is 0"));

        assert!(matches!(
            err(limit("", 1, 0, 0)),
            LimitError::EmptyTarget { .. }
        ));
        assert!(matches!(
            err(limit(&"x".repeat(MAX_TARGET_LEN + 1), 1, 0, 0)),
            LimitError::TargetTooLong {
                len: 257,
                max: 256,
                ..
            }
        ));
        assert!(rl.set(limit(&"x".repeat(MAX_TARGET_LEN), 1, 0, 0)).is_ok());
        for bad in ["route: api", "route:api\n", "a\tb", "a\u{0}b"] {
            assert!(
                matches!(err(limit(bad, 1, 0, 0)), LimitError::TargetInvalid { .. }),
                "{bad:?}"
            );
        }
        assert!(matches!(
            err(named("my limit", limit("*", 1, 0, 0))),
            LimitError::InvalidId { .. }
        ));
        assert!(matches!(
            err(named(&"i".repeat(MAX_ID_LEN + 1), limit("*", 1, 0, 0))),
            LimitError::InvalidId { .. }
        ));

        let mut l = limit("*", 1, 0, 0);
        l.metadata.insert(PER_KEY.into(), "ip".into());
        assert_eq!(
            err(l).to_string(),
            "rate limit for target \"*\": metadata[\"per\"] is \"ip\"; the only value is \
             \"client\" (separate buckets for each client address); leave it out for buckets \
             shared by all clients"
        );

        // Nothing but the one valid limit was stored.
        assert_eq!(rl.len(), 1);
    }

    #[test]
    fn an_invalid_replacement_keeps_the_old_limit() {
        let rl = RateLimiter::new();
        let stored = rl.set(limit("*", 1, 0, 0)).unwrap();
        assert!(rl
            .set(pb::RateLimit {
                requests_per_second: -1,
                ..stored.clone()
            })
            .is_err());
        assert_eq!(rl.list(""), vec![stored]);
        assert_eq!(admit(&rl, &[], None, Instant::now(), 5), 1);
    }

    #[test]
    fn the_number_of_limits_is_bounded() {
        let rl = RateLimiter::new();
        for _ in 0..MAX_LIMITS {
            rl.set(limit("*", 1, 0, 0)).unwrap();
        }
        assert!(matches!(
            rl.set(limit("*", 1, 0, 0)),
            Err(LimitError::TooMany {
                max: MAX_LIMITS,
                ..
            })
        ));
        // Replacing one still works.
        assert!(rl
            .set(pb::RateLimit {
                limit_id: "rl-7".into(),
                ..limit("route:api", 1, 0, 0)
            })
            .is_ok());
        assert_eq!(rl.len(), MAX_LIMITS);
    }

    #[test]
    fn concurrent_checks_take_exactly_the_available_tokens() {
        let rl = RateLimiter::new();
        rl.set(limit("*", 0, 0, 1000)).unwrap();
        rl.set(limit("route:a", 0, 0, 300)).unwrap();
        // One instant for every check: no refill during the test.
        let now = Instant::now();
        let (route_a, star_only) = std::thread::scope(|s| {
            let route_a: Vec<_> = (0..4)
                .map(|_| s.spawn(|| admit(&rl, &["route:a"], None, now, 250)))
                .collect();
            let star_only: Vec<_> = (0..4)
                .map(|_| s.spawn(|| admit(&rl, &["route:b"], None, now, 175)))
                .collect();
            let route_a: usize = route_a.into_iter().map(|h| h.join().unwrap()).sum();
            let star_only: usize = star_only.into_iter().map(|h| h.join().unwrap()).sum();
            (route_a, star_only)
        });
        // route:a refusals took none of "*", so "*" covered both in full.
        assert_eq!((route_a, star_only), (300, 700));
        assert!(rl.check_at(&["route:b"], None, now).is_err());
        let c = rl.counters();
        assert_eq!((c[0].limit_id.as_str(), c[0].admitted), ("rl-1", 1000));
        assert_eq!((c[1].admitted, c[1].refused), (300, 700));
    }
}
