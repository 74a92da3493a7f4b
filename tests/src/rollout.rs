//! Rollouts from outside (`tests/rollouts.rs`): the rollout RPCs of the
//! real `nlb`, real module instances of two versions behind it (the SDK's
//! `echo-module`, or `alb` in front of in-test origins), clients from many
//! addresses in 127.0.0.0/8, background load bounded in count and time, and
//! what the instances' `ModuleService` says their active version is.
//!
//! Every wait is a bounded poll with generous slack; nothing here measures
//! how long something took.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shared_types::pb::{self, ModuleType, RolloutEventKind as Kind};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::l4::{connect_from, source};
use crate::module::{start_echo, ModuleLaunch, ModuleProcess};
use crate::{NlbProcess, CALL_DEADLINE};

/// How long a rollout may take to reach a state (several analysis windows
/// and holds of a few seconds; the machine may be slow and busy).
pub const ROLLOUT_DEADLINE: Duration = Duration::from_secs(180);
/// Hard bound on how long a background load runs.
pub const LOAD_LIMIT: Duration = Duration::from_secs(300);
/// Hard bound on the connections of one background load.
pub const LOAD_MAX: usize = 40_000;

const POLL: Duration = Duration::from_millis(200);

// ---------------------------------------------------------------------------
// Instances

/// Starts `echo-module` as instance `id` running `version`, announcing a
/// TCP route `web` on `port` and greeting each connection with
/// `instance <id>`; waits until it registered with `nlb`.
pub async fn start_echo_version(
    dir: &std::path::Path,
    nlb: &NlbProcess,
    id: &str,
    version: &str,
    port: u16,
) -> ModuleProcess {
    let config = format!(
        "module:\n  greeting: instance {id}\n  routes:\n    - {{route_id: web, protocol: TCP, destination_port: {port}}}\n"
    );
    let m = start_echo(
        dir,
        &nlb.grpc_addr,
        &ModuleLaunch {
            instance_id: Some(id.into()),
            config: Some(config),
            env: vec![("MODULE_VERSION".into(), version.into())],
        },
    )
    .await;
    m.wait_registered().await;
    m
}

/// `GetActiveVersion` of the instance whose `ModuleService` is at
/// `grpc_addr`: its active version and its weights per version.
pub async fn active_version(
    what: &str,
    grpc_addr: &str,
    logs: impl Fn() -> String,
) -> (String, BTreeMap<String, i32>) {
    let mut c = crate::module::module_client(what, grpc_addr, &logs).await;
    let r = c
        .get_active_version(pb::GetActiveVersionRequest::default())
        .await
        .unwrap_or_else(|s| panic!("GetActiveVersion on {what}: {s:?}; stderr:\n{}", logs()))
        .into_inner();
    (r.active_version, r.version_weights.into_iter().collect())
}

/// Polls `GetActiveVersion` until the instance says `version` is active
/// with all of the weight; returns what it said last.
pub async fn wait_active(
    what: &str,
    grpc_addr: &str,
    version: &str,
    logs: impl Fn() -> String,
) -> (String, BTreeMap<String, i32>) {
    let last = Mutex::new(None);
    let want: BTreeMap<String, i32> = [(version.to_string(), 100)].into();
    crate::poll_until(
        &format!("{what} says {version} is active at 100%"),
        || {
            format!(
                "last GetActiveVersion: {:?}; stderr:\n{}",
                last.lock().unwrap(),
                logs()
            )
        },
        || async {
            let seen = active_version(what, grpc_addr, &logs).await;
            let done = seen.0 == version && seen.1 == want;
            *last.lock().unwrap() = Some(seen.clone());
            done.then_some(seen)
        },
    )
    .await
}

/// The weight the NLB gives instance `id`'s version now (`ModuleInstance.
/// traffic_weight` in `GetModuleInfo`, from the same state the routing
/// snapshot is built from); `None` while the NLB does not know it.
pub async fn weight_at_nlb(nlb: &NlbProcess, id: &str) -> Option<i32> {
    nlb.client()
        .await
        .get_module_info(pb::GetModuleInfoRequest {
            instance_id: id.into(),
        })
        .await
        .ok()?
        .into_inner()
        .instance
        .map(|i| i.traffic_weight)
}

/// Polls until the NLB gives instance `id`'s version `weight`.
pub async fn wait_weight(nlb: &NlbProcess, id: &str, weight: i32) {
    nlb.eventually(
        &format!("the NLB gives {id}'s version weight {weight}"),
        || async { (weight_at_nlb(nlb, id).await == Some(weight)).then_some(()) },
    )
    .await;
}

// ---------------------------------------------------------------------------
// Origins for the ALB

/// An HTTP/1.1 origin that answers every request with `status` (after
/// `delay`, except `/healthz`, answered at once), one request per
/// connection; stops when dropped.
pub struct FixedOrigin {
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for FixedOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FixedOrigin {
    pub async fn start(status: u16, delay: Duration) -> FixedOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let addr = listener.local_addr().expect("origin addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    continue;
                };
                let h = h.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65_536 {
                        match tokio::time::timeout(CALL_DEADLINE, s.read(&mut buf)).await {
                            Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                            _ => return,
                        }
                    }
                    h.fetch_add(1, Ordering::SeqCst);
                    let health = head.starts_with(b"GET /healthz ");
                    if !health {
                        tokio::time::sleep(delay).await;
                    }
                    let code = if health { 200 } else { status };
                    let body = format!("fixed origin: {code}\n");
                    let reply = format!(
                        "HTTP/1.1 {code} Fixed\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(reply.as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        FixedOrigin { addr, hits, task }
    }

    /// Requests answered so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------------------
// Clients

/// The instance id in an answer's first line: an `echo-module` of
/// [`start_echo_version`] greets `instance <id> (<client>)`, a fake
/// instance of [`crate::l4`] `switchyard-fake <id>`.
fn instance_of(line: &str) -> Option<String> {
    let line = line.trim_end();
    if let Some(rest) = line.strip_prefix("instance ") {
        return Some(rest.split(" (").next().unwrap_or(rest).to_string());
    }
    line.strip_prefix(crate::l4::BANNER).map(str::to_string)
}

/// Connects to `to` from `src`, sends one line, and reads the first line
/// back (an echo-module's greeting, a fake's banner) and then the echo of
/// the line: the id of the instance reached. An echo-module counts the
/// line as a request. Errs when the connection is refused, reset, or closed
/// without an answer.
pub async fn probe(src: Ipv4Addr, to: SocketAddr) -> Result<String, String> {
    let what = format!("{src} -> {to}");
    let s = connect_from(src, to).await?;
    let (r, mut w) = s.into_split();
    w.write_all(b"ping\n")
        .await
        .map_err(|e| format!("{what}: write: {e}"))?;
    let mut lines = BufReader::new(r);
    let exchange = async {
        let mut first = String::new();
        lines.read_line(&mut first).await?;
        let mut second = String::new();
        if !first.is_empty() {
            lines.read_line(&mut second).await?;
        }
        Ok::<_, std::io::Error>((first, second))
    };
    let (first, second) = tokio::time::timeout(CALL_DEADLINE, exchange)
        .await
        .map_err(|_| format!("{what}: no answer within {CALL_DEADLINE:?}"))?
        .map_err(|e| format!("{what}: {e}"))?;
    if first.is_empty() {
        return Err(format!("{what}: closed without an answer"));
    }
    let id = instance_of(&first).ok_or_else(|| format!("{what}: {first:?} names no instance"))?;
    if second.trim_end() != "ping" {
        return Err(format!("{what}: {id} echoed {second:?}, not the line sent"));
    }
    Ok(id)
}

/// Connects to `to` from `src` and reads the first line: the id of the
/// instance reached (no request is made).
pub async fn greeting_from(src: Ipv4Addr, to: SocketAddr) -> Result<String, String> {
    let what = format!("{src} -> {to}");
    let s = connect_from(src, to).await?;
    let mut lines = BufReader::new(s);
    let mut first = String::new();
    tokio::time::timeout(CALL_DEADLINE, lines.read_line(&mut first))
        .await
        .map_err(|_| format!("{what}: no greeting within {CALL_DEADLINE:?}"))?
        .map_err(|e| format!("{what}: {e}"))?;
    instance_of(&first).ok_or_else(|| format!("{what}: {first:?} names no instance"))
}

/// `GET /` with `Host: host` from `src` through `to` (one request, then
/// the connection closes): the status.
pub async fn http_get_from(src: Ipv4Addr, to: SocketAddr, host: &str) -> Result<u16, String> {
    let what = format!("GET http://{host}/ from {src} via {to}");
    let mut s = connect_from(src, to).await?;
    let exchange = async {
        let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut got = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 || got.len() > 1 << 20 {
                return Ok::<_, std::io::Error>(got);
            }
            got.extend_from_slice(&buf[..n]);
        }
    };
    let raw = tokio::time::timeout(CALL_DEADLINE, exchange)
        .await
        .map_err(|_| format!("{what}: no answer within {CALL_DEADLINE:?}"))?
        .map_err(|e| format!("{what}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    text.strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{what}: not an HTTP answer: {text:?}"))
}

/// A background load: workers each making one connection after another
/// (each from the next address of [`source`]), until stopped, or
/// [`LOAD_MAX`] connections, or [`LOAD_LIMIT`].
pub struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    workers: Vec<JoinHandle<Vec<Result<String, String>>>>,
}

/// Starts a [`Load`] of `workers` workers calling `f` with the sources
/// `source(first)`, `source(first + 1)`, ..., pausing `pause` between
/// connections.
pub fn start_load<F, Fut>(workers: usize, first: usize, pause: Duration, f: F) -> Load
where
    F: Fn(Ipv4Addr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<String, String>> + Send,
{
    let f = Arc::new(f);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers = (0..workers.max(1))
        .map(|_| {
            let (f, stop, done, next) = (f.clone(), stop.clone(), done.clone(), next.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                while !stop.load(Ordering::SeqCst) && started.elapsed() < LOAD_LIMIT {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= LOAD_MAX {
                        break;
                    }
                    out.push(f(source(first + i)).await);
                    done.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(pause).await;
                }
                out
            })
        })
        .collect();
    Load {
        stop,
        done,
        workers,
    }
}

impl Load {
    /// Connections finished so far.
    pub fn done(&self) -> usize {
        self.done.load(Ordering::SeqCst)
    }

    /// Stops the workers and returns every outcome.
    pub async fn stop(self) -> Vec<Result<String, String>> {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Vec::new();
        for w in self.workers {
            let out = tokio::time::timeout(LOAD_LIMIT, w)
                .await
                .expect("a load worker stops within the load limit")
                .expect("a load worker panicked");
            all.extend(out);
        }
        all
    }
}

// ---------------------------------------------------------------------------
// The rollout RPCs

/// Steps `(canary_weight, hold_seconds)`.
pub fn steps(s: &[(i32, i32)]) -> Vec<pb::RolloutStep> {
    s.iter()
        .map(|&(canary_weight, hold_seconds)| pb::RolloutStep {
            canary_weight,
            hold_seconds,
        })
        .collect()
}

/// An analysis of `interval_seconds` windows judged from `min_requests`,
/// with at most `max_error_rate` failures (the other thresholds off).
pub fn analysis(
    interval_seconds: i32,
    min_requests: i64,
    max_error_rate: f64,
) -> pb::RolloutAnalysis {
    pb::RolloutAnalysis {
        interval_seconds,
        min_requests,
        max_error_rate,
        ..Default::default()
    }
}

/// A canary rollout of the `alb` type from `baseline` to `canary`.
pub fn canary(
    id: &str,
    baseline: &str,
    canary: &str,
    s: &[(i32, i32)],
    a: pb::RolloutAnalysis,
    sticky: bool,
) -> pb::StartRolloutRequest {
    pb::StartRolloutRequest {
        module_type: ModuleType::Alb as i32,
        baseline_version: baseline.into(),
        canary_version: canary.into(),
        steps: steps(s),
        analysis: Some(a),
        sticky,
        rollout_id: id.into(),
        blue_green: None,
    }
}

/// `StartRollout`; panics unless it started.
pub async fn start(nlb: &NlbProcess, req: pb::StartRolloutRequest) -> pb::Rollout {
    nlb.client()
        .await
        .start_rollout(req.clone())
        .await
        .unwrap_or_else(|s| panic!("StartRollout {req:?}: {s:?}"))
        .into_inner()
        .rollout
        .expect("StartRollout answers the rollout")
}

/// `GetRollout`; panics if it fails.
pub async fn get(nlb: &NlbProcess, id: &str) -> pb::Rollout {
    nlb.client()
        .await
        .get_rollout(pb::GetRolloutRequest {
            rollout_id: id.into(),
        })
        .await
        .unwrap_or_else(|s| panic!("GetRollout {id}: {s:?}; stderr:\n{}", nlb.stderr()))
        .into_inner()
        .rollout
        .expect("GetRollout answers the rollout")
}

/// Polls `GetRollout` until `check` holds (for up to [`ROLLOUT_DEADLINE`]);
/// at the deadline panics with `what`, the rollout and its events.
pub async fn wait_rollout(
    nlb: &NlbProcess,
    id: &str,
    what: &str,
    check: impl Fn(&pb::Rollout) -> bool,
) -> pb::Rollout {
    let until = Instant::now() + ROLLOUT_DEADLINE;
    loop {
        let r = get(nlb, id).await;
        if check(&r) {
            return r;
        }
        assert!(
            Instant::now() < until,
            "rollout {id}: {what}: not seen within {ROLLOUT_DEADLINE:?}; now {}; stderr:\n{}",
            describe(&r),
            tail(&nlb.stderr(), 60)
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Polls until the rollout is in `state`.
pub async fn wait_state(nlb: &NlbProcess, id: &str, state: pb::RolloutState) -> pb::Rollout {
    wait_rollout(nlb, id, &format!("state {state:?}"), |r| {
        r.state == state as i32
    })
    .await
}

/// The kind of an event.
pub fn kind(e: &pb::RolloutEvent) -> Kind {
    Kind::try_from(e.kind).unwrap_or(Kind::Unspecified)
}

/// The kinds of a rollout's events, in order.
pub fn kinds(r: &pb::Rollout) -> Vec<Kind> {
    r.events.iter().map(kind).collect()
}

/// The rollout's state, step and events, one per line (for messages).
pub fn describe(r: &pb::Rollout) -> String {
    let mut s = format!(
        "{} {:?} step {} at {}% ({})\n",
        r.rollout_id,
        pb::RolloutState::try_from(r.state).unwrap_or(pb::RolloutState::Unspecified),
        r.current_step,
        r.canary_weight,
        r.reason
    );
    s.push_str(&describe_events(&r.events));
    s
}

/// Events, one per line.
pub fn describe_events(events: &[pb::RolloutEvent]) -> String {
    events
        .iter()
        .map(|e| {
            format!(
                "  #{} {:?} step {} at {}%: {}\n",
                e.sequence,
                kind(e),
                e.step,
                e.canary_weight,
                e.message
            )
        })
        .collect()
}

/// Asserts that `want` occur in the rollout's events in this order (other
/// events may come between them); returns the index of each in the events.
pub fn assert_in_order(r: &pb::Rollout, want: &[Kind]) -> Vec<usize> {
    let mut at = Vec::new();
    let mut from = 0;
    for k in want {
        let i = r.events[from..]
            .iter()
            .position(|e| kind(e) == *k)
            .map(|i| i + from)
            .unwrap_or_else(|| {
                panic!(
                    "the events of {} do not have {want:?} in this order (no {k:?} after event {from}):\n{}",
                    r.rollout_id,
                    describe(r)
                )
            });
        at.push(i);
        from = i + 1;
    }
    at
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
