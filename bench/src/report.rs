//! What a run measured, printed for people and as one `RESULT` line that
//! `scripts/bench.sh` collects into its summary.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Latencies in microseconds, 1 µs to 60 s, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

pub fn record(h: &mut Histogram<u64>, latency: Duration) {
    let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
    h.saturating_record(us.max(1));
}

/// Errors by kind (gRPC code, or a negative answer), with one example each.
#[derive(Debug, Default, Clone)]
pub struct Errors(BTreeMap<String, (u64, String)>);

impl Errors {
    pub fn add(&mut self, kind: &str, example: impl FnOnce() -> String) {
        match self.0.get_mut(kind) {
            Some((n, _)) => *n += 1,
            None => {
                self.0.insert(kind.to_string(), (1, example()));
            }
        }
    }

    pub fn merge(&mut self, other: &Errors) {
        for (k, (n, ex)) in &other.0 {
            let e = self.0.entry(k.clone()).or_insert((0, ex.clone()));
            e.0 += n;
        }
    }

    pub fn total(&self) -> u64 {
        self.0.values().map(|(n, _)| n).sum()
    }

    /// One line per kind: `N x KIND (e.g. "...")`.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        for (kind, (n, example)) in &self.0 {
            let _ = writeln!(s, "    {n} x {kind} (e.g. {example:?})");
        }
        s
    }
}

/// Milliseconds with three decimals, from microseconds.
pub fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1000.0)
}

/// The p50 and p99 of a histogram in ms (`-` when empty).
pub fn percentiles(h: &Histogram<u64>) -> (String, String) {
    if h.is_empty() {
        return ("-".into(), "-".into());
    }
    (ms(h.value_at_quantile(0.50)), ms(h.value_at_quantile(0.99)))
}

/// Prints the machine-readable line: `RESULT bench=... auth=... key=value ...`.
/// Values hold no spaces.
pub fn result_line(bench: &str, auth: &str, fields: &[(&str, String)]) {
    let mut line = format!("RESULT bench={bench} auth={auth}");
    for (k, v) in fields {
        let _ = write!(line, " {k}={}", v.replace(' ', "_"));
    }
    println!("{line}");
}
