//! The module's admin HTTP port: `/healthz` (the process answers),
//! `/readyz` (registered, serving, not draining), `/metrics` (Prometheus
//! text) and `/status` (JSON).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::runtime::{Phase, Shared};

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let registered = s.link.lock().registration_id.is_some();
    match s.phase() {
        Phase::Serving if registered => (StatusCode::OK, "ready\n".to_string()),
        Phase::Serving => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: not registered with the NLB\n".to_string(),
        ),
        p => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", p.name()),
        ),
    }
}

async fn metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    s.ctx.stats.refresh_process_gauges();
    let mut out = String::new();
    if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&s.ctx.registry.gather(), &mut out) {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("cannot encode metrics: {e}\n"),
        );
    }
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
}

/// The `/status` document.
pub fn status_json(s: &Shared) -> serde_json::Value {
    let link = s.link.lock().clone();
    let versions = s.versions.lock().clone();
    let stats = s.ctx.stats.snapshot(&s.ctx.instance_id);
    let millis = |t: Option<std::time::SystemTime>| t.map(shared_types::time::unix_millis);
    serde_json::json!({
        "instance_id": s.ctx.instance_id,
        "module": s.descriptor.name,
        "module_type": s.descriptor.module_type.as_str_name(),
        "version": s.ctx.version,
        "phase": s.phase().name(),
        "grpc_address": s.grpc_address,
        "data_address": s.data_address,
        "admin_address": link.admin_address,
        "uptime_seconds": s.started_at.elapsed().unwrap_or_default().as_secs(),
        "auth": if s.auth.is_open() { "off" } else { "on" },
        "nlb": {
            "address": s.config.nlb.addr,
            "tls": s.config.nlb.tls.enabled(),
            "registered": link.registration_id.is_some(),
            "registration_id": link.registration_id,
            "registrations": link.registrations,
            "registered_at_ms": millis(link.registered_at),
            "last_heartbeat_ok_ms": millis(link.last_beat_ok),
            "heartbeat_mode": link.heartbeat_mode,
            "last_error": link.last_error,
        },
        "connections": s.conns.len(),
        "versions": {
            "active": versions.active(),
            "weights": versions.weights(),
        },
        "rate_limits": s.ctx.limits.len(),
        "stats": {
            "total_requests": stats.total_requests,
            "failed_requests": stats.failed_requests,
            "total_connections": stats.total_connections,
            "active_connections": stats.active_connections,
            "bytes_received": stats.bytes_received,
            "bytes_sent": stats.bytes_sent,
            "p50_latency_ms": stats.p50_latency_ms,
            "p99_latency_ms": stats.p99_latency_ms,
            "cpu_usage_percent": stats.cpu_usage_percent,
            "memory_usage_mb": stats.memory_usage_mb,
        },
    })
}

async fn status(State(s): State<Arc<Shared>>) -> Json<serde_json::Value> {
    Json(status_json(&s))
}

/// Serves until `stop` turns true.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(shared);
    let r = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = r {
        tracing::error!(error = %e, "admin server failed");
    }
}
