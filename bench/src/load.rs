//! A closed-loop load: a fixed number of calls in flight, each worker sending
//! its next call when the last one is answered. A warm-up first, then a
//! measured window; bounded by the window and by a total count.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::time::Instant;

use crate::report::{new_histogram, record, Errors};

/// How hard and how long.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Calls in flight.
    pub concurrency: usize,
    pub warmup: Duration,
    pub duration: Duration,
    /// Most calls all workers together send (warm-up included).
    pub max_calls: u64,
}

/// How long after the window workers may take to finish their last call.
pub const JOIN_GRACE: Duration = Duration::from_secs(10);

/// What the measured window saw.
#[derive(Debug)]
pub struct Outcome {
    /// Calls that completed successfully inside the window.
    pub ok: u64,
    pub errors: Errors,
    /// Latency of the calls counted in `ok`, in µs.
    pub latency: Histogram<u64>,
    pub window: Duration,
    /// True if the count bound ended the run before the window did.
    pub hit_max_calls: bool,
}

impl Outcome {
    pub fn per_second(&self) -> f64 {
        self.ok as f64 / self.window.as_secs_f64().max(1e-9)
    }
}

/// Runs `call(worker, seq)` from `plan.concurrency` workers. `call` answers
/// `Ok(())` or `Err((kind, message))`; only calls completed inside the
/// measured window are counted.
pub async fn closed_loop<F, Fut>(plan: Plan, call: F) -> Outcome
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), (String, String)>> + Send + 'static,
{
    let call = Arc::new(call);
    let begin = Instant::now();
    let start = begin + plan.warmup;
    let end = start + plan.duration;
    let per_worker = plan.max_calls / plan.concurrency.max(1) as u64;
    let mut workers = Vec::with_capacity(plan.concurrency);
    for w in 0..plan.concurrency.max(1) {
        let call = Arc::clone(&call);
        workers.push(tokio::spawn(async move {
            let mut latency = new_histogram();
            let mut errors = Errors::default();
            let mut ok = 0u64;
            let mut seq = 0u64;
            while seq < per_worker {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let result = call(w, seq).await;
                seq += 1;
                let done = Instant::now();
                if done < start || done >= end {
                    continue;
                }
                match result {
                    Ok(()) => {
                        ok += 1;
                        record(&mut latency, done - sent);
                    }
                    Err((kind, message)) => errors.add(&kind, || message),
                }
            }
            (ok, errors, latency, seq >= per_worker)
        }));
    }
    let mut out = Outcome {
        ok: 0,
        errors: Errors::default(),
        latency: new_histogram(),
        window: plan.duration,
        hit_max_calls: false,
    };
    // Calls carry no timer of their own: a worker still in a call this long
    // after the window is abandoned (its calls count as timed out).
    let join_until = end + JOIN_GRACE;
    for w in workers {
        let abort = w.abort_handle();
        match tokio::time::timeout_at(join_until, w).await {
            Err(_) => {
                abort.abort();
                out.errors.add("no answer", || {
                    format!("a call was still unanswered {JOIN_GRACE:?} after the window")
                });
            }
            Ok(Err(e)) => out.errors.add("worker panicked", || e.to_string()),
            Ok(Ok((ok, errors, latency, capped))) => {
                out.ok += ok;
                out.errors.merge(&errors);
                let _ = out.latency.add(&latency);
                out.hit_max_calls |= capped;
            }
        }
    }
    // A run cut short by the count bound measured a shorter window.
    if out.hit_max_calls {
        out.window = Instant::now()
            .saturating_duration_since(start)
            .min(plan.duration);
    }
    out
}

/// The error kind of a failed call: its gRPC code.
pub fn status_kind(s: &tonic::Status) -> (String, String) {
    (format!("{:?}", s.code()), s.message().to_string())
}
