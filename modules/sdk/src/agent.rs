//! The module's side of the control plane: registers with the NLB (retrying
//! with exponential backoff and jitter until it answers), heartbeats with
//! live stats (over `HeartbeatStream`, or unary `Heartbeat` against an NLB
//! without it), reports metrics, follows the heartbeat instructions
//! (`reregister`, `reload`, `drain`, `shed`) and unregisters on the way out.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use shared_types::pb::nlb_service_client::NlbServiceClient;
use shared_types::pb::{
    HealthStatus, HeartbeatRequest, HeartbeatResponse, RegisterModuleRequest, ReportMetricsRequest,
    UnregisterModuleRequest,
};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Status};

use crate::config::{read_secret, split_host_port, ENV_TOKEN};
use crate::runtime::{Phase, Shared, StopReason};

/// The state of the link to the NLB, for `/status`, `GetStatus` and
/// `HealthCheck`.
#[derive(Debug, Clone)]
pub struct Link {
    pub registration_id: Option<String>,
    pub registered_at: Option<SystemTime>,
    pub last_beat_ok: Option<SystemTime>,
    pub last_error: Option<String>,
    /// `HeartbeatStream` or `Heartbeat`.
    pub heartbeat_mode: &'static str,
    pub registrations: u64,
    pub admin_address: String,
}

impl Link {
    pub fn new(admin_address: String) -> Self {
        Link {
            registration_id: None,
            registered_at: None,
            last_beat_ok: None,
            last_error: None,
            heartbeat_mode: "none",
            registrations: 0,
            admin_address,
        }
    }
}

/// Adds the module token to every call to the NLB.
#[derive(Clone)]
pub struct TokenInterceptor {
    token: Arc<ArcSwapOption<MetadataValue<tonic::metadata::Ascii>>>,
}

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = self.token.load_full() {
            req.metadata_mut().insert("authorization", (*v).clone());
        }
        Ok(req)
    }
}

pub type NlbClient = NlbServiceClient<InterceptedService<Channel, TokenInterceptor>>;

/// A client of the NLB's control API, as the config says (TLS, token).
pub struct NlbConn {
    pub client: NlbClient,
    token: Arc<ArcSwapOption<MetadataValue<tonic::metadata::Ascii>>>,
}

impl NlbConn {
    pub fn new(shared: &Shared) -> Result<Self, String> {
        let link = &shared.config.nlb;
        let tls = &link.tls;
        let scheme = if tls.enabled() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{}", link.addr))
            .map_err(|e| format!("nlb.addr {:?}: {e}", link.addr))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        if let Some(ca) = &tls.ca_file {
            let read = |p: &std::path::Path| {
                std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
            };
            let host = if tls.server_name.is_empty() {
                split_host_port(&link.addr)
                    .map(|(h, _)| h.to_string())
                    .unwrap_or_default()
            } else {
                tls.server_name.clone()
            };
            let mut cfg = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(read(ca)?))
                .domain_name(host);
            if let (Some(c), Some(k)) = (&tls.cert_file, &tls.key_file) {
                cfg = cfg.identity(Identity::from_pem(read(c)?, read(k)?));
            }
            endpoint = endpoint
                .tls_config(cfg)
                .map_err(|e| format!("nlb.tls: {e}"))?;
        }
        let token = Arc::new(ArcSwapOption::empty());
        let client = NlbServiceClient::with_interceptor(
            endpoint.connect_lazy(),
            TokenInterceptor {
                token: token.clone(),
            },
        );
        let conn = NlbConn { client, token };
        conn.refresh_token(shared)?;
        Ok(conn)
    }

    /// Reads the module token again (`MODULE_TOKEN`, else `nlb.token_file`):
    /// a rotated token file is picked up at the next registration.
    pub fn refresh_token(&self, shared: &Shared) -> Result<(), String> {
        let token = match (shared.env)(ENV_TOKEN).filter(|t| !t.is_empty()) {
            Some(t) => Some(t),
            None => match &shared.config.nlb.token_file {
                Some(p) => Some(read_secret(p).map_err(|e| format!("nlb.token_file: {e}"))?),
                None => None,
            },
        };
        let value = match token {
            Some(t) => Some(Arc::new(format!("Bearer {t}").parse().map_err(|_| {
                "the module token holds characters a header cannot carry"
            })?)),
            None => None,
        };
        self.token.store(value);
        Ok(())
    }
}

/// Exponential backoff with full jitter: attempt `n` (0-based) waits a
/// random time up to `min(max, initial * 2^n)`.
pub fn backoff(initial: Duration, max: Duration, attempt: u32) -> Duration {
    let cap = initial
        .saturating_mul(1u32.checked_shl(attempt.min(30)).unwrap_or(u32::MAX))
        .min(max);
    let ms = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(fastrand::u64(ms / 2..=ms.max(1)))
}

enum BeatEnd {
    /// The NLB no longer knows this instance, or the routes changed.
    Reregister,
    Stopped,
}

/// Runs until `stop` turns true.
pub async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let conn = loop {
        match NlbConn::new(&shared) {
            Ok(c) => break c,
            Err(e) => {
                // A TLS file may appear later (a mounted secret): keep trying.
                tracing::error!(error = %e, "cannot set up the link to the NLB; retrying in 5 s");
                shared.link.lock().last_error = Some(e);
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        }
    };
    let _ = shared.nlb.set(conn);
    let conn = shared.nlb.get().expect("set just above");
    let reporter = tokio::spawn(report_loop(
        shared.clone(),
        conn.client.clone(),
        stop.clone(),
    ));
    loop {
        if !register(&shared, conn, &mut stop).await {
            break;
        }
        match beat(&shared, conn, &mut stop).await {
            BeatEnd::Reregister => continue,
            BeatEnd::Stopped => break,
        }
    }
    let _ = reporter.await;
}

fn registration(shared: &Shared) -> RegisterModuleRequest {
    let mut instance = shared.instance();
    // Listening and about to be registered: ready for traffic.
    if shared.phase() == Phase::Starting {
        instance.health_status = HealthStatus::Healthy as i32;
    }
    RegisterModuleRequest {
        instance: Some(instance),
        initial_routes: shared.module.routes(),
        health_config: Some(shared.health_config()),
        capabilities: shared.capabilities(),
    }
}

/// Registers, retrying until the NLB accepts; false if told to stop first.
async fn register(shared: &Shared, conn: &NlbConn, stop: &mut watch::Receiver<bool>) -> bool {
    let cfg = &shared.config.registration;
    let (initial, max) = (
        Duration::from_millis(cfg.initial_backoff_ms),
        Duration::from_millis(cfg.max_backoff_ms),
    );
    let mut attempt = 0u32;
    loop {
        if *stop.borrow() {
            return false;
        }
        let result = match conn.refresh_token(shared) {
            Err(e) => Err(Status::unauthenticated(e)),
            Ok(()) => {
                let mut req = Request::new(registration(shared));
                req.set_timeout(Duration::from_secs(cfg.call_timeout_seconds));
                let mut client = conn.client.clone();
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return false,
                    r = client.register_module(req) => r.map(|r| r.into_inner()),
                }
            }
        };
        let (err, refused) = match result {
            Ok(resp) if resp.success => {
                shared
                    .ctx
                    .counters
                    .registrations
                    .with_label_values(&["ok"])
                    .inc();
                shared.ctx.counters.registered.set(1);
                {
                    let mut link = shared.link.lock();
                    let again = link.registration_id.is_some();
                    link.registration_id = Some(resp.registration_id.clone());
                    link.registered_at = Some(SystemTime::now());
                    link.last_error = None;
                    link.registrations += 1;
                    tracing::info!(
                        registration = %resp.registration_id,
                        nlb = %shared.config.nlb.addr,
                        again,
                        message = %resp.message,
                        "registered with the NLB"
                    );
                }
                shared.set_phase(Phase::Serving);
                return true;
            }
            Ok(resp) => (resp.error.map_or(resp.message, |e| e.message), true),
            Err(status) => (describe(&status), refused(&status)),
        };
        shared
            .ctx
            .counters
            .registrations
            .with_label_values(&["error"])
            .inc();
        if refused && shared.link.lock().registration_id.is_some() {
            // A re-announcement the NLB refuses (a route it cannot carry):
            // it keeps the registration it has, so keep beating on it rather
            // than lose the instance's lease retrying.
            tracing::error!(error = %err, "the NLB refused the announced routes; it keeps the ones it had");
            shared.link.lock().last_error = Some(format!("announcement refused: {err}"));
            return true;
        }
        let wait = backoff(initial, max, attempt);
        // Say it loudly at first, then only now and then.
        if attempt < 3 || attempt.is_power_of_two() {
            tracing::warn!(
                nlb = %shared.config.nlb.addr,
                attempt = attempt + 1,
                retry_in_ms = wait.as_millis() as u64,
                error = %err,
                "registration with the NLB failed"
            );
        }
        shared.link.lock().last_error = Some(format!("registration: {err}"));
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return false,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// An answer about the request itself, not about reaching the NLB: trying
/// again unchanged will not help.
fn refused(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::AlreadyExists
            | Code::OutOfRange
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::NotFound
    )
}

/// What announcing the module's routes to the NLB came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Announce {
    /// The NLB routes by them now.
    Done,
    /// Not registered yet: the registration will carry them.
    NotRegistered,
    /// The NLB refused them (the code and message say why); it keeps the
    /// ones it had.
    Refused(Code, String),
    /// The module is stopping: it announces nothing more (a registration
    /// now would cancel the NLB's drain of it).
    Stopping,
    /// The NLB did not answer; the agent announces them when it does.
    Unreachable(String),
}

/// Announces the module's current routes (a `RegisterModule` of the same
/// instance, which the NLB treats as an update), now.
pub async fn announce(shared: &Shared) -> Announce {
    if shared.stopping() {
        return Announce::Stopping;
    }
    let (Some(conn), true) = (
        shared.nlb.get(),
        shared.link.lock().registration_id.is_some(),
    ) else {
        return Announce::NotRegistered;
    };
    let mut req = Request::new(registration(shared));
    req.set_timeout(Duration::from_secs(
        shared.config.registration.call_timeout_seconds,
    ));
    match conn.client.clone().register_module(req).await {
        Ok(r) if r.get_ref().success => Announce::Done,
        Ok(r) => {
            let r = r.into_inner();
            Announce::Refused(
                Code::InvalidArgument,
                r.error.map_or(r.message, |e| e.message),
            )
        }
        Err(s) if refused(&s) => Announce::Refused(s.code(), s.message().to_string()),
        Err(s) => {
            shared.reannounce.notify_one();
            Announce::Unreachable(describe(&s))
        }
    }
}

fn describe(status: &Status) -> String {
    match status.code() {
        Code::Unavailable => format!("the NLB is unreachable: {}", status.message()),
        code => format!(
            "{}: {}",
            shared_types::error::code_name(code),
            status.message()
        ),
    }
}

/// One long-lived `HeartbeatStream`.
struct BeatStream {
    tx: mpsc::Sender<HeartbeatRequest>,
    rx: tonic::Streaming<HeartbeatResponse>,
}

impl BeatStream {
    async fn open(client: &NlbClient) -> Result<Self, Status> {
        let (tx, rx) = mpsc::channel(2);
        let resp = client
            .clone()
            .heartbeat_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?;
        Ok(BeatStream {
            tx,
            rx: resp.into_inner(),
        })
    }

    async fn beat(&mut self, req: HeartbeatRequest) -> Result<HeartbeatResponse, Status> {
        self.tx
            .send(req)
            .await
            .map_err(|_| Status::unavailable("the heartbeat stream is closed"))?;
        match self.rx.message().await? {
            Some(r) => Ok(r),
            None => Err(Status::unavailable("the NLB ended the heartbeat stream")),
        }
    }
}

fn heartbeat_request(shared: &Shared, registration_id: &str) -> HeartbeatRequest {
    let mut stats = shared.ctx.stats.snapshot(&shared.ctx.instance_id);
    stats.custom_stats = shared.module.custom_stats();
    let status = match shared.phase() {
        Phase::Serving if shared.stopping() => HealthStatus::Stopping,
        p => p.health(),
    };
    HeartbeatRequest {
        instance_id: shared.ctx.instance_id.clone(),
        registration_id: registration_id.to_string(),
        status: status as i32,
        current_stats: Some(stats),
        timestamp: Some(shared_types::time::now()),
    }
}

/// Heartbeats until the NLB asks for a re-registration or `stop`.
async fn beat(shared: &Arc<Shared>, conn: &NlbConn, stop: &mut watch::Receiver<bool>) -> BeatEnd {
    let hb = &shared.config.heartbeat;
    let interval = hb.interval();
    let call_timeout = interval.max(Duration::from_secs(1));
    let mut ticker = tokio::time::interval_at(Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut unary_only = !hb.stream;
    let mut stream: Option<BeatStream> = None;
    let mut failures = 0u32;
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return BeatEnd::Stopped,
            _ = shared.reannounce.notified() => {
                if shared.stopping() {
                    continue;
                }
                tracing::info!("routes changed: announcing them to the NLB");
                return BeatEnd::Reregister;
            }
            _ = ticker.tick() => {}
        }
        let Some(registration_id) = shared.link.lock().registration_id.clone() else {
            return BeatEnd::Reregister;
        };
        let req = heartbeat_request(shared, &registration_id);
        let unary = |req: HeartbeatRequest| {
            let mut r = Request::new(req);
            r.set_timeout(call_timeout);
            let mut client = conn.client.clone();
            async move { client.heartbeat(r).await.map(|r| r.into_inner()) }
        };
        let sent = async {
            if unary_only {
                return unary(req).await;
            }
            if stream.is_none() {
                match BeatStream::open(&conn.client).await {
                    Ok(s) => stream = Some(s),
                    Err(s) if s.code() == Code::Unimplemented => {
                        tracing::info!("the NLB has no HeartbeatStream: using unary Heartbeat");
                        unary_only = true;
                        return unary(req).await;
                    }
                    Err(s) => return Err(s),
                }
            }
            let s = stream.as_mut().expect("opened above");
            let r = s.beat(req).await;
            if r.is_err() {
                stream = None;
            }
            r
        };
        let result = tokio::select! {
            _ = stop.wait_for(|s| *s) => return BeatEnd::Stopped,
            r = tokio::time::timeout(call_timeout, sent) => r.unwrap_or_else(|_| {
                Err(Status::deadline_exceeded(format!(
                    "the NLB did not answer a heartbeat within {} ms", call_timeout.as_millis()
                )))
            }),
        };
        shared.link.lock().heartbeat_mode = if unary_only {
            "Heartbeat"
        } else {
            "HeartbeatStream"
        };
        match result {
            Ok(resp) => {
                failures = 0;
                if let Some(end) = follow(shared, &resp) {
                    return end;
                }
            }
            Err(status) => {
                stream = None;
                failures += 1;
                shared
                    .ctx
                    .counters
                    .heartbeats
                    .with_label_values(&["error"])
                    .inc();
                let err = describe(&status);
                if failures < 3 || failures.is_power_of_two() {
                    tracing::warn!(failures, error = %err, "heartbeat failed");
                }
                shared.link.lock().last_error = Some(format!("heartbeat: {err}"));
            }
        }
    }
}

/// Follows a heartbeat answer's instructions.
fn follow(shared: &Arc<Shared>, resp: &HeartbeatResponse) -> Option<BeatEnd> {
    let counters = &shared.ctx.counters;
    let action = resp.instructions.get("action").map(String::as_str);
    if !resp.acknowledged {
        counters.heartbeats.with_label_values(&["rejected"]).inc();
        if action == Some("reregister") {
            counters
                .instructions
                .with_label_values(&["reregister"])
                .inc();
            counters.registered.set(0);
            tracing::info!(message = %resp.message, "the NLB asked for a re-registration");
            shared.link.lock().registration_id = None;
            return Some(BeatEnd::Reregister);
        }
        tracing::warn!(message = %resp.message, "the NLB did not acknowledge a heartbeat");
        return None;
    }
    counters.heartbeats.with_label_values(&["ok"]).inc();
    {
        let mut link = shared.link.lock();
        link.last_beat_ok = Some(SystemTime::now());
        link.last_error = None;
    }
    match action {
        Some("drain") => {
            let secs = resp
                .instructions
                .get("drain_deadline_seconds")
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(shared.config.shutdown.drain_timeout_seconds)
                .min(crate::runtime::MAX_DRAIN.as_secs());
            if !shared.stopping() {
                counters.instructions.with_label_values(&["drain"]).inc();
                tracing::info!(
                    deadline_seconds = secs,
                    "the NLB said drain: finishing open connections, then stopping"
                );
                shared.request_stop(StopReason::NlbDrain {
                    timeout: Duration::from_secs(secs),
                });
            }
        }
        Some("shed") => {
            let n = resp
                .instructions
                .get("shed_connections")
                .and_then(|s| s.parse::<usize>().ok())
                .unwrap_or(0);
            counters.instructions.with_label_values(&["shed"]).inc();
            let grace = Duration::from_secs(shared.config.shutdown.shed_grace_seconds);
            let asked = shared.conns.shed(n, grace);
            counters.shed.inc_by(asked as u64);
            tracing::info!(
                requested = n,
                asked,
                "the NLB said shed: asked connections to finish"
            );
        }
        Some("reload") => {}
        Some(other) => tracing::debug!(action = other, "unknown heartbeat instruction ignored"),
        None => {}
    }
    if action == Some("reload") || resp.should_reload {
        counters.instructions.with_label_values(&["reload"]).inc();
        spawn_reload(shared.clone());
    }
    if resp.should_scale {
        if let (Some(scaler), Some(n)) = (
            shared.scaler.clone(),
            resp.instructions
                .get("desired_instances")
                .and_then(|s| s.parse::<i32>().ok()),
        ) {
            // The NLB repeats the target on every beat until it is met: the
            // scaler hears each target once.
            if shared.last_desired.lock().replace(n) != Some(n) {
                tokio::spawn(async move { scaler.desired(n).await });
            }
        }
    }
    None
}

/// Reloads on a task of its own: the beat loop must keep beating.
fn spawn_reload(shared: Arc<Shared>) {
    tokio::spawn(async move {
        match shared.reload_detached().await {
            Ok(msg) => tracing::info!(result = %msg, "reloaded as the NLB asked"),
            Err(e) => {
                tracing::error!(error = %e, "reload asked by the NLB failed; the config in force stays")
            }
        }
    });
}

/// Sends `ReportMetrics` every `metrics.report_interval_seconds` while
/// registered.
async fn report_loop(shared: Arc<Shared>, client: NlbClient, mut stop: watch::Receiver<bool>) {
    let secs = shared.config.metrics.report_interval_seconds;
    if secs == 0 {
        return;
    }
    let every = Duration::from_secs(secs);
    let mut ticker = tokio::time::interval_at(Instant::now() + every, every);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = ticker.tick() => {}
        }
        if shared.link.lock().registration_id.is_none() {
            continue;
        }
        let metrics = crate::telemetry::module_metrics(&shared, &[]);
        let mut req = Request::new(ReportMetricsRequest {
            instance_id: shared.ctx.instance_id.clone(),
            metrics: Some(metrics),
            reported_at: Some(shared_types::time::now()),
        });
        req.set_timeout(Duration::from_secs(5));
        let result = client.clone().report_metrics(req).await;
        let label = if result.as_ref().is_ok_and(|r| r.get_ref().acknowledged) {
            "ok"
        } else {
            "error"
        };
        shared
            .ctx
            .counters
            .reports
            .with_label_values(&[label])
            .inc();
        if let Err(e) = result {
            tracing::debug!(error = %describe(&e), "ReportMetrics failed");
        }
    }
}

/// Tells the NLB this instance leaves: `graceful` with `drain` to finish,
/// or at once.
pub async fn unregister(shared: &Shared, drain: Duration, graceful: bool) {
    let Some(registration_id) = shared.link.lock().registration_id.clone() else {
        return;
    };
    let Some(conn) = shared.nlb.get() else {
        return;
    };
    let mut req = Request::new(UnregisterModuleRequest {
        instance_id: shared.ctx.instance_id.clone(),
        registration_id,
        graceful,
        drain_timeout_seconds: i32::try_from(drain.as_secs()).unwrap_or(i32::MAX),
    });
    req.set_timeout(Duration::from_secs(5));
    let mut client = conn.client.clone();
    match tokio::time::timeout(Duration::from_secs(6), client.unregister_module(req)).await {
        Ok(Ok(r)) => {
            let r = r.into_inner();
            shared.ctx.counters.registered.set(0);
            tracing::info!(success = r.success, message = %r.message, "unregistered from the NLB");
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %describe(&e), "UnregisterModule failed; the NLB will drop this instance when its lease ends")
        }
        Err(_) => tracing::warn!(
            "the NLB did not answer UnregisterModule in time; it will drop this instance when its lease ends"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(2));
        for attempt in 0..40 {
            let cap = (100u64 << attempt.min(20)).min(2000);
            let d = backoff(i, m, attempt).as_millis() as u64;
            assert!(
                d >= cap / 2 && d <= cap,
                "attempt {attempt}: {d} ms, cap {cap}"
            );
        }
    }
}
