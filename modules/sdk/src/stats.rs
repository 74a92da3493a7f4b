//! The module's live traffic statistics: one [`Stats`] shared (in an `Arc`)
//! between the data plane, which records into it, and the SDK's heartbeat,
//! `GetStats` and `/metrics`, which read it.
//!
//! Two views of the same traffic:
//!
//! - **Prometheus** (`module_*` on the registry given to [`Stats::new`]):
//!   counters that only ever grow, as Prometheus requires.
//! - **`ModuleStats`** ([`Stats::snapshot`]): counters and average latency
//!   *since `since`* (start, or the last [`reset`](Stats::reset)), while the
//!   latency percentiles cover only the *recent window*, the last 50 to 60
//!   seconds ([`WINDOW`]), so that a slow minute an hour ago does not hide in
//!   (or dominate) today's p99.
//!
//! The cumulative counters are the Prometheus counters themselves; a reset
//! only moves the baseline they are read against, so `/metrics` never goes
//! backwards and a snapshot never disagrees with it about what happened.
//!
//! Cost on the data plane: counting a connection or bytes is one relaxed
//! atomic add; recording a request is a few atomics (counter, sum,
//! Prometheus histogram) plus an hdrhistogram record under a `parking_lot`
//! mutex picked per thread from a few shards, held for a handful of
//! instructions (and, once per 10 s slot, a reset of the slot).

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use hdrhistogram::Histogram as HdrHistogram;
use parking_lot::Mutex;
use prometheus::core::Collector;
use prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};
use shared_types::pb;

use crate::procinfo::{self, CpuSampler};

/// Width of one slot of the percentile window.
pub const SLOT: Duration = Duration::from_secs(10);
/// Number of slots in the percentile window.
pub const SLOTS: usize = 6;
/// The percentile window: the current (partial) slot and the five before
/// it, so 50 to 60 seconds of history.
pub const WINDOW: Duration = Duration::from_secs(SLOT.as_secs() * SLOTS as u64);

/// Upper bounds (seconds) of `module_request_duration_seconds`.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Largest latency the percentile histogram tells apart (1 hour, in µs);
/// longer requests count as 1 hour in the percentiles.
const HDR_MAX_US: u64 = 3_600_000_000;
/// Significant digits of the percentile histogram: values are exact to
/// within 1% (a 50 ms p50 reads between 50.0 and 50.3 ms). Two digits keep
/// a slot at about 26 KiB.
const HDR_SIGFIG: u8 = 2;
/// Most shards of the percentile histogram (one per core up to this).
const MAX_SHARDS: usize = 8;

const MIB: f64 = 1024.0 * 1024.0;

/// Live traffic statistics of one module instance. Create one with
/// [`Stats::new`] and share the `Arc`.
pub struct Stats {
    metrics: Metrics,
    /// Sum of all recorded latencies in µs, never reset (for the average).
    latency_sum_us: AtomicU64,
    /// The percentile window, sharded by recording thread.
    shards: Box<[Shard]>,
    /// Origin of the window's slot numbering.
    started: Instant,
    /// Start of the span the `ModuleStats` counters cover.
    span: Mutex<Span>,
    cpu: Mutex<CpuSampler>,
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stats")
            .field("totals", &self.totals())
            .field("active_connections", &self.metrics.connections_active.get())
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

/// The Prometheus side. Labelled children are resolved once here so the
/// hot path never looks up a label.
struct Metrics {
    requests_ok: IntCounter,
    requests_failed: IntCounter,
    duration: Histogram,
    connections_active: IntGauge,
    connections_total: IntCounter,
    bytes_received: IntCounter,
    bytes_sent: IntCounter,
    cpu_percent: Gauge,
    memory_bytes: IntGauge,
}

impl Metrics {
    fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new(
                "module_requests_total",
                "Requests the module handled, by result (ok, failed)",
            ),
            &["result"],
        )?;
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "module_request_duration_seconds",
                "Time the module took to handle a request",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
        )?;
        let connections_active = IntGauge::new(
            "module_connections_active",
            "Connections the module holds open",
        )?;
        let connections_total = IntCounter::new(
            "module_connections_total",
            "Connections the module accepted",
        )?;
        let bytes = IntCounterVec::new(
            Opts::new(
                "module_bytes_total",
                "Bytes the module received and sent, by direction (received, sent)",
            ),
            &["direction"],
        )?;
        let cpu_percent = Gauge::new(
            "module_cpu_usage_percent",
            "CPU use of the module process in percent of one core, over the interval \
             since the previous reading",
        )?;
        let memory_bytes = IntGauge::new(
            "module_memory_usage_bytes",
            "Resident memory of the module process",
        )?;

        let metrics = Metrics {
            requests_ok: requests.with_label_values(&["ok"]),
            requests_failed: requests.with_label_values(&["failed"]),
            duration: duration.clone(),
            connections_active: connections_active.clone(),
            connections_total: connections_total.clone(),
            bytes_received: bytes.with_label_values(&["received"]),
            bytes_sent: bytes.with_label_values(&["sent"]),
            cpu_percent: cpu_percent.clone(),
            memory_bytes: memory_bytes.clone(),
        };
        let collectors = vec![
            pair(&requests),
            pair(&duration),
            pair(&connections_active),
            pair(&connections_total),
            pair(&bytes),
            pair(&cpu_percent),
            pair(&memory_bytes),
        ];
        register_all(registry, collectors)?;
        Ok(metrics)
    }
}

/// Two boxes over one metric (its handles are `Arc`s): `register` consumes
/// one, the other is kept to undo the registration.
type Pair = (Box<dyn Collector>, Box<dyn Collector>);

fn pair<C: Collector + Clone + 'static>(c: &C) -> Pair {
    (Box::new(c.clone()), Box::new(c.clone()))
}

/// Registers every collector, or none: on a failure (a name already taken)
/// the ones registered so far are taken out again.
fn register_all(registry: &Registry, collectors: Vec<Pair>) -> Result<(), prometheus::Error> {
    let mut done: Vec<Box<dyn Collector>> = Vec::with_capacity(collectors.len());
    for (c, keep) in collectors {
        if let Err(e) = registry.register(c) {
            for d in done {
                let _ = registry.unregister(d);
            }
            return Err(e);
        }
        done.push(keep);
    }
    Ok(())
}

/// The monotonic totals at one moment; a span's figures are the difference
/// of two of these.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Totals {
    ok: u64,
    failed: u64,
    latency_us: u64,
    connections: u64,
    received: u64,
    sent: u64,
}

impl Totals {
    fn minus(self, base: Totals) -> Totals {
        Totals {
            ok: self.ok.saturating_sub(base.ok),
            failed: self.failed.saturating_sub(base.failed),
            latency_us: self.latency_us.saturating_sub(base.latency_us),
            connections: self.connections.saturating_sub(base.connections),
            received: self.received.saturating_sub(base.received),
            sent: self.sent.saturating_sub(base.sent),
        }
    }
}

/// The current span: when it began and the totals at that moment.
#[derive(Debug, Clone, Copy)]
struct Span {
    since: SystemTime,
    base: Totals,
}

/// One shard of the percentile window, on its own cache lines so that
/// threads recording into neighbouring shards do not share one.
#[repr(align(128))]
struct Shard(Mutex<Window>);

/// [`SLOTS`] histograms, one per [`SLOT`]-wide stretch of time, reused
/// round-robin: slot number `n` (counted from `Stats::started`) lives at
/// index `n % SLOTS`, and is cleared when the first sample of a newer
/// number lands there.
struct Window {
    slots: Vec<Slot>,
}

struct Slot {
    number: u64,
    hist: HdrHistogram<u64>,
}

fn new_hdr() -> HdrHistogram<u64> {
    HdrHistogram::new_with_bounds(1, HDR_MAX_US, HDR_SIGFIG)
        .expect("constant histogram bounds are valid")
}

impl Window {
    fn new() -> Self {
        Window {
            slots: (0..SLOTS)
                .map(|_| Slot {
                    number: 0,
                    hist: new_hdr(),
                })
                .collect(),
        }
    }

    fn record(&mut self, number: u64, us: u64) {
        let slot = &mut self.slots[slot_index(number)];
        if number > slot.number {
            if !slot.hist.is_empty() {
                slot.hist.reset();
            }
            slot.number = number;
        }
        // A sample whose clock reading is older than the slot's (a thread
        // that read `Instant::now()` a whole window ago) lands in the newer
        // slot rather than erasing it.
        slot.hist.saturating_record(us);
    }

    /// Adds the slots still inside the window at slot `number` to `out`.
    fn merge_into(&self, number: u64, out: &mut HdrHistogram<u64>) {
        for slot in &self.slots {
            let live = number
                .checked_sub(slot.number)
                .is_some_and(|age| age < SLOTS as u64);
            if live {
                // Same bounds on both sides, so this cannot run out of range.
                let _ = out.add(&slot.hist);
            }
        }
    }

    fn clear(&mut self) {
        for slot in &mut self.slots {
            slot.hist.reset();
        }
    }
}

fn slot_index(number: u64) -> usize {
    // The remainder is below SLOTS, so it fits.
    (number % SLOTS as u64) as usize
}

/// Which shard the current thread records into: threads are numbered
/// round-robin on first use, so a fixed pool of runtime workers spreads
/// evenly.
fn thread_hint() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static HINT: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    HINT.with(|h| *h)
}

/// Counts one connection as active until dropped. Returned by
/// [`Stats::connection`].
#[must_use = "the connection counts as active only while the guard lives"]
pub struct ConnectionGuard {
    stats: Arc<Stats>,
}

impl std::fmt::Debug for ConnectionGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionGuard").finish_non_exhaustive()
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.stats.metrics.connections_active.dec();
    }
}

impl Stats {
    /// Creates the statistics and registers the `module_*` metrics on
    /// `registry`. Fails, registering nothing, if a name is already taken
    /// there (for instance a second `Stats` on the same registry).
    pub fn new(registry: &Registry) -> Result<Arc<Stats>, prometheus::Error> {
        let metrics = Metrics::new(registry)?;
        let shards = std::thread::available_parallelism()
            .map_or(1, NonZeroUsize::get)
            .clamp(1, MAX_SHARDS);
        Ok(Arc::new(Stats {
            metrics,
            latency_sum_us: AtomicU64::new(0),
            shards: (0..shards)
                .map(|_| Shard(Mutex::new(Window::new())))
                .collect(),
            started: Instant::now(),
            span: Mutex::new(Span {
                since: SystemTime::now(),
                base: Totals::default(),
            }),
            cpu: Mutex::new(CpuSampler::new()),
        }))
    }

    /// Counts a new connection (total and active); it stays active until
    /// the guard is dropped.
    pub fn connection(self: &Arc<Self>) -> ConnectionGuard {
        self.metrics.connections_total.inc();
        self.metrics.connections_active.inc();
        ConnectionGuard {
            stats: Arc::clone(self),
        }
    }

    /// Records one finished request: its latency and whether it succeeded.
    pub fn record_request(&self, latency: Duration, ok: bool) {
        self.record_request_at(latency, ok, Instant::now());
    }

    /// [`record_request`](Self::record_request) with the current time given
    /// (a caller that just read the clock to measure `latency` can pass that
    /// reading; tests pass a made-up one). `now` only picks the slot of the
    /// percentile window.
    pub fn record_request_at(&self, latency: Duration, ok: bool, now: Instant) {
        if ok {
            self.metrics.requests_ok.inc();
        } else {
            self.metrics.requests_failed.inc();
        }
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
        self.metrics.duration.observe(latency.as_secs_f64());
        let number = self.slot_number(now);
        let shard = &self.shards[thread_hint() % self.shards.len()];
        shard.0.lock().record(number, us);
    }

    /// Counts bytes received from clients or upstreams.
    pub fn add_received(&self, n: u64) {
        self.metrics.bytes_received.inc_by(n);
    }

    /// Counts bytes sent to clients or upstreams.
    pub fn add_sent(&self, n: u64) {
        self.metrics.bytes_sent.inc_by(n);
    }

    /// Connections open now.
    pub fn active_connections(&self) -> i64 {
        self.metrics.connections_active.get()
    }

    /// The statistics as the contract's `ModuleStats`: counters and average
    /// latency since `since`, percentiles over the last [`WINDOW`], CPU %
    /// since the previous process reading (see [`CpuSampler`]; a snapshot
    /// and [`refresh_process_gauges`](Self::refresh_process_gauges) share
    /// it) and resident memory in MiB. CPU and memory read 0 where procfs is
    /// unavailable. `custom_stats` is left empty for the caller to fill.
    pub fn snapshot(&self, instance_id: &str) -> pb::ModuleStats {
        self.snapshot_at(instance_id, Instant::now())
    }

    /// [`snapshot`](Self::snapshot) with the current time given; `now` only
    /// places the percentile window.
    pub fn snapshot_at(&self, instance_id: &str, now: Instant) -> pb::ModuleStats {
        let span = *self.span.lock();
        let window = self.window_at(now, false);
        let totals = self.totals().minus(span.base);
        self.build(instance_id, span.since, totals, &window)
    }

    /// Starts a new span: the `ModuleStats` counters and average read 0 and
    /// `since` becomes now; the percentile window is emptied. Active
    /// connections are not touched (they are still open), nor are the
    /// Prometheus counters, which must only grow (`/metrics` keeps counting
    /// across resets; rates computed from it are unaffected).
    pub fn reset(&self) {
        let mut span = self.span.lock();
        for shard in self.shards.iter() {
            shard.0.lock().clear();
        }
        *span = Span {
            since: SystemTime::now(),
            base: self.totals(),
        };
    }

    /// A snapshot of the span that ends now, and a [`reset`](Self::reset),
    /// in one step: every request is counted in exactly one of the span
    /// returned and the one that starts (`GetStats` with `reset_counters`).
    pub fn snapshot_and_reset(&self, instance_id: &str) -> pb::ModuleStats {
        self.snapshot_and_reset_at(instance_id, Instant::now())
    }

    /// [`snapshot_and_reset`](Self::snapshot_and_reset) with the current
    /// time given.
    pub fn snapshot_and_reset_at(&self, instance_id: &str, now: Instant) -> pb::ModuleStats {
        let mut span = self.span.lock();
        let window = self.window_at(now, true);
        let now_totals = self.totals();
        let ended = *span;
        *span = Span {
            since: SystemTime::now(),
            base: now_totals,
        };
        drop(span);
        self.build(
            instance_id,
            ended.since,
            now_totals.minus(ended.base),
            &window,
        )
    }

    /// Reads the process's CPU % and resident memory into
    /// `module_cpu_usage_percent` and `module_memory_usage_bytes` (for a
    /// `/metrics` handler to call before encoding). Values that cannot be
    /// read leave the gauges as they were.
    pub fn refresh_process_gauges(&self) {
        let _ = self.process_usage();
    }

    /// CPU % and resident bytes, also set on the gauges.
    fn process_usage(&self) -> (Option<f64>, Option<u64>) {
        let cpu = self.cpu.lock().sample();
        let memory = procinfo::resident_memory_bytes();
        if let Some(pct) = cpu {
            self.metrics.cpu_percent.set(pct);
        }
        if let Some(bytes) = memory {
            self.metrics
                .memory_bytes
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
        (cpu, memory)
    }

    fn build(
        &self,
        instance_id: &str,
        since: SystemTime,
        t: Totals,
        window: &HdrHistogram<u64>,
    ) -> pb::ModuleStats {
        let requests = t.ok.saturating_add(t.failed);
        let avg_latency_ms = if requests == 0 {
            0.0
        } else {
            t.latency_us as f64 / requests as f64 / 1000.0
        };
        let quantile_ms = |q: f64| {
            if window.is_empty() {
                0.0
            } else {
                window.value_at_quantile(q) as f64 / 1000.0
            }
        };
        let (cpu, memory) = self.process_usage();
        pb::ModuleStats {
            instance_id: instance_id.to_owned(),
            total_requests: to_i64(requests),
            successful_requests: to_i64(t.ok),
            failed_requests: to_i64(t.failed),
            active_connections: self.metrics.connections_active.get(),
            total_connections: to_i64(t.connections),
            avg_latency_ms,
            p50_latency_ms: quantile_ms(0.50),
            p95_latency_ms: quantile_ms(0.95),
            p99_latency_ms: quantile_ms(0.99),
            bytes_received: to_i64(t.received),
            bytes_sent: to_i64(t.sent),
            cpu_usage_percent: cpu.unwrap_or(0.0),
            memory_usage_mb: memory.map_or(0.0, |b| b as f64 / MIB),
            since: Some(shared_types::time::from_system(since)),
            custom_stats: Default::default(),
        }
    }

    /// The monotonic totals now.
    fn totals(&self) -> Totals {
        Totals {
            ok: self.metrics.requests_ok.get(),
            failed: self.metrics.requests_failed.get(),
            latency_us: self.latency_sum_us.load(Ordering::Relaxed),
            connections: self.metrics.connections_total.get(),
            received: self.metrics.bytes_received.get(),
            sent: self.metrics.bytes_sent.get(),
        }
    }

    /// The window's slot number at `now`.
    fn slot_number(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.started).as_secs() / SLOT.as_secs()
    }

    /// All shards' live slots at `now` merged into one histogram, each
    /// shard emptied under the same lock if `clear`.
    fn window_at(&self, now: Instant, clear: bool) -> HdrHistogram<u64> {
        let number = self.slot_number(now);
        let mut merged = new_hdr();
        for shard in self.shards.iter() {
            let mut w = shard.0.lock();
            w.merge_into(number, &mut merged);
            if clear {
                w.clear();
            }
        }
        merged
    }
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{Encoder, TextEncoder};

    fn stats() -> (Arc<Stats>, Registry) {
        let registry = Registry::new();
        let stats = Stats::new(&registry).expect("registers");
        (stats, registry)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    /// Within the histogram's 1% (plus the bucket's own width).
    fn assert_near(got: f64, want: f64) {
        assert!(
            (got - want).abs() <= want * 0.011,
            "got {got} ms, want about {want} ms"
        );
    }

    fn metrics_text(registry: &Registry) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut buf)
            .expect("encodes");
        String::from_utf8(buf).expect("utf-8")
    }

    #[test]
    fn counts_requests_connections_and_bytes() {
        let (stats, _reg) = stats();
        let t0 = stats.started;
        let c1 = stats.connection();
        let c2 = stats.connection();
        stats.record_request_at(ms(10), true, t0);
        stats.record_request_at(ms(20), true, t0);
        stats.record_request_at(ms(30), false, t0);
        stats.add_received(100);
        stats.add_received(23);
        stats.add_sent(7);

        let s = stats.snapshot_at("alb-1", t0 + secs(1));
        assert_eq!(s.instance_id, "alb-1");
        assert_eq!(s.total_requests, 3);
        assert_eq!(s.successful_requests, 2);
        assert_eq!(s.failed_requests, 1);
        assert_eq!(s.active_connections, 2);
        assert_eq!(s.total_connections, 2);
        assert_eq!(s.bytes_received, 123);
        assert_eq!(s.bytes_sent, 7);
        assert_eq!(s.avg_latency_ms, 20.0);
        assert!(s.p50_latency_ms <= s.p95_latency_ms && s.p95_latency_ms <= s.p99_latency_ms);
        assert_near(s.p50_latency_ms, 20.0);
        assert_near(s.p99_latency_ms, 30.0);
        assert!(s.custom_stats.is_empty());
        assert!(s.since.is_some());
        drop((c1, c2));
    }

    #[test]
    fn dropping_the_guard_ends_the_connection() {
        let (stats, _reg) = stats();
        let a = stats.connection();
        {
            let _b = stats.connection();
            assert_eq!(stats.active_connections(), 2);
        }
        assert_eq!(stats.active_connections(), 1);
        drop(a);
        let s = stats.snapshot("m");
        assert_eq!(s.active_connections, 0);
        assert_eq!(s.total_connections, 2);
    }

    #[test]
    fn percentiles_from_known_latencies() {
        let (stats, _reg) = stats();
        let t0 = stats.started;
        // Out of order on purpose: the histogram does not care.
        for i in (1..=100).rev() {
            stats.record_request_at(ms(i), true, t0 + secs(5));
        }
        let s = stats.snapshot_at("m", t0 + secs(9));
        assert_near(s.p50_latency_ms, 50.0);
        assert_near(s.p95_latency_ms, 95.0);
        assert_near(s.p99_latency_ms, 99.0);
        assert_eq!(s.avg_latency_ms, 50.5);
    }

    #[test]
    fn old_samples_leave_the_window_but_stay_in_the_counters() {
        let (stats, _reg) = stats();
        let t0 = stats.started;
        for _ in 0..100 {
            stats.record_request_at(secs(1), true, t0 + secs(1));
        }
        for _ in 0..100 {
            stats.record_request_at(ms(10), true, t0 + secs(30));
        }
        // At 55 s both batches are inside the window.
        let s = stats.snapshot_at("m", t0 + secs(55));
        assert_near(s.p99_latency_ms, 1000.0);
        assert_eq!(stats.window_at(t0 + secs(55), false).len(), 200);

        // At 65 s the first slot (0-10 s) has left the window.
        let s = stats.snapshot_at("m", t0 + secs(65));
        assert_near(s.p99_latency_ms, 10.0);
        assert_eq!(s.total_requests, 200);
        assert_near(s.avg_latency_ms, 505.0);

        // New samples reuse the expired slot without reviving it.
        stats.record_request_at(ms(2), true, t0 + secs(61));
        assert_eq!(stats.window_at(t0 + secs(65), false).len(), 101);

        // Two minutes of silence: no percentiles, counters unchanged.
        let s = stats.snapshot_at("m", t0 + secs(200));
        assert_eq!(
            (s.p50_latency_ms, s.p95_latency_ms, s.p99_latency_ms),
            (0.0, 0.0, 0.0)
        );
        assert_eq!(s.total_requests, 201);
    }

    #[test]
    fn reset_starts_a_new_span_but_keeps_prometheus_monotonic() {
        let (stats, reg) = stats();
        let open = stats.connection();
        let closed = stats.connection();
        drop(closed);
        stats.record_request(ms(5), true);
        stats.record_request(ms(7), false);
        stats.add_received(10);
        stats.add_sent(20);
        let before = stats.snapshot("m").since.expect("since");

        std::thread::sleep(ms(5));
        stats.reset();
        let s = stats.snapshot("m");
        assert_eq!(
            (
                s.total_requests,
                s.successful_requests,
                s.failed_requests,
                s.total_connections,
                s.bytes_received,
                s.bytes_sent
            ),
            (0, 0, 0, 0, 0, 0)
        );
        assert_eq!(s.active_connections, 1, "open connections survive a reset");
        assert_eq!(s.avg_latency_ms, 0.0);
        assert_eq!(s.p99_latency_ms, 0.0);
        let after = s.since.expect("since");
        assert!(
            (after.seconds, after.nanos) > (before.seconds, before.nanos),
            "since moved forward"
        );

        // The span after the reset counts only what came after it.
        stats.record_request(ms(3), true);
        stats.add_sent(1);
        let s = stats.snapshot("m");
        assert_eq!((s.total_requests, s.bytes_sent), (1, 1));
        assert_near(s.p50_latency_ms, 3.0);
        assert_eq!(s.avg_latency_ms, 3.0);

        let text = metrics_text(&reg);
        assert!(
            text.contains("module_requests_total{result=\"ok\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("module_requests_total{result=\"failed\"} 1\n"));
        assert!(text.contains("module_bytes_total{direction=\"sent\"} 21\n"));
        assert!(text.contains("module_connections_total 2\n"));
        drop(open);
    }

    #[test]
    fn snapshot_and_reset_hands_over_the_ended_span() {
        let (stats, _reg) = stats();
        let t0 = stats.started;
        stats.record_request_at(ms(40), true, t0);
        stats.add_received(5);
        let ended = stats.snapshot_and_reset_at("m", t0 + secs(1));
        assert_eq!((ended.total_requests, ended.bytes_received), (1, 5));
        assert_near(ended.p50_latency_ms, 40.0);
        let next = stats.snapshot_at("m", t0 + secs(1));
        assert_eq!((next.total_requests, next.bytes_received), (0, 0));
        assert_eq!(next.p50_latency_ms, 0.0);
    }

    #[test]
    fn prometheus_text_has_every_metric() {
        let (stats, reg) = stats();
        let _c = stats.connection();
        drop(stats.connection());
        stats.record_request(Duration::from_micros(300), true);
        stats.record_request(ms(3), true);
        stats.record_request(secs(20), false);
        stats.add_received(1500);
        stats.add_sent(900);
        let snap = stats.snapshot("m");

        let text = metrics_text(&reg);
        for line in [
            "module_requests_total{result=\"ok\"} 2",
            "module_requests_total{result=\"failed\"} 1",
            "module_request_duration_seconds_bucket{le=\"0.0005\"} 1",
            "module_request_duration_seconds_bucket{le=\"0.005\"} 2",
            "module_request_duration_seconds_bucket{le=\"10\"} 2",
            "module_request_duration_seconds_bucket{le=\"+Inf\"} 3",
            "module_request_duration_seconds_count 3",
            "module_connections_active 1",
            "module_connections_total 2",
            "module_bytes_total{direction=\"received\"} 1500",
            "module_bytes_total{direction=\"sent\"} 900",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        for name in ["module_cpu_usage_percent ", "module_memory_usage_bytes "] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        if cfg!(target_os = "linux") {
            assert!(snap.memory_usage_mb > 0.0);
            let mem = text
                .lines()
                .find_map(|l| l.strip_prefix("module_memory_usage_bytes "))
                .and_then(|v| v.parse::<f64>().ok())
                .expect("memory gauge");
            assert!(mem > 0.0, "memory gauge set by the snapshot");
        }
        // Bounded label sets only.
        assert!(!text.contains("instance"));
    }

    #[test]
    fn a_second_stats_on_one_registry_fails_cleanly() {
        let (_stats, reg) = stats();
        let before = reg.gather().len();
        assert!(Stats::new(&reg).is_err());
        assert_eq!(reg.gather().len(), before);

        // A partial registration is undone: only one name taken up front.
        let reg = Registry::new();
        let squatter = IntGauge::new("module_memory_usage_bytes", "taken").expect("valid");
        reg.register(Box::new(squatter)).expect("registers");
        assert!(Stats::new(&reg).is_err());
        assert_eq!(reg.gather().len(), 1);
    }

    #[test]
    fn concurrent_recording_sums_exactly() {
        const THREADS: u64 = 6;
        const PER_THREAD: u64 = 5_000;
        let (stats, reg) = stats();
        let t0 = stats.started;
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let stats = &stats;
                s.spawn(move || {
                    for i in 0..PER_THREAD {
                        let _conn = stats.connection();
                        stats.record_request_at(Duration::from_micros(i + 1), i % 5 != 0, t0);
                        stats.add_received(t + 1);
                        stats.add_sent(2);
                    }
                });
            }
        });
        let n = THREADS * PER_THREAD;
        let s = stats.snapshot_at("m", t0);
        assert_eq!(s.total_requests, n as i64);
        assert_eq!(s.failed_requests, (n / 5) as i64);
        assert_eq!(s.successful_requests, (n - n / 5) as i64);
        assert_eq!(s.total_connections, n as i64);
        assert_eq!(s.active_connections, 0);
        assert_eq!(
            s.bytes_received,
            (PER_THREAD * (1..=THREADS).sum::<u64>()) as i64
        );
        assert_eq!(s.bytes_sent, (2 * n) as i64);
        assert_eq!(stats.window_at(t0, false).len(), n);
        // Mean of 1..=PER_THREAD µs.
        assert_eq!(s.avg_latency_ms, (PER_THREAD + 1) as f64 / 2.0 / 1000.0);
        assert!(
            metrics_text(&reg).contains(&format!("module_request_duration_seconds_count {n}\n"))
        );
    }
}
