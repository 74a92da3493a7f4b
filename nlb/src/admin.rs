//! The admin HTTP port: `/healthz` (the process answers), `/readyz` (serving
//! and not shutting down), `/metrics` (Prometheus text) and `/status` (JSON).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tokio::sync::watch;

use crate::admission::AdmittedListener;
use crate::app::{Census, Nlb};

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(nlb): State<Arc<Nlb>>) -> impl IntoResponse {
    if nlb.ready.load(Ordering::Relaxed) && !nlb.shutting_down.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(nlb): State<Arc<Nlb>>) -> impl IntoResponse {
    nlb.refresh_gauges();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        nlb.metrics.render(),
    )
}

/// The `/status` document.
pub fn status_json(nlb: &Nlb) -> serde_json::Value {
    let views = nlb.registry.list();
    let (status, checks) = nlb.own_status(&Census::of(&views));
    let config = nlb.config.current();
    let modules: Vec<serde_json::Value> = views
        .into_iter()
        .map(|v| {
            serde_json::json!({
                "instance_id": v.instance.instance_id,
                "module_type": v.module_type.short_name(),
                "version": v.instance.version,
                "address": v.instance.address,
                "data_address": v.details.get("data_address"),
                "state": v.state.name(),
                "reason": v.details.get("reason"),
                "active_connections": v.instance.current_connections,
                "traffic_weight": v.instance.traffic_weight,
            })
        })
        .collect();
    let snapshot = nlb.registry.router().load();
    serde_json::json!({
        "status": status.short_name(),
        "version": env!("CARGO_PKG_VERSION"),
        "ready": nlb.ready.load(Ordering::Relaxed),
        "uptime_seconds": nlb.started_at.elapsed().unwrap_or_default().as_secs(),
        "grpc_listen": config.grpc.listen,
        "grpc_address": nlb.bound.get().map(|b| b.0.to_string()),
        "admin_address": nlb.bound.get().map(|b| b.1.to_string()),
        "admin_listen": config.admin.listen,
        "state_file": config.state_file.display().to_string(),
        "routing_generation": snapshot.generation,
        "routes": snapshot.routes().count(),
        "total_requests": nlb.total_requests.load(Ordering::Relaxed),
        "auth": if nlb.security.auth.enabled() { "on" } else { "off" },
        "tls": {
            "grpc": nlb.security.grpc_tls.get().map(|t| if t.requires_client_cert() { "mutual" } else { "on" }).unwrap_or("off"),
            "admin": nlb.security.admin_tls.get().map(|t| if t.requires_client_cert() { "mutual" } else { "on" }).unwrap_or("off"),
        },
        "checks": checks.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
        "modules": modules,
        "scaling_events": nlb.scaling.recent(),
    })
}

async fn status(State(nlb): State<Arc<Nlb>>) -> Json<serde_json::Value> {
    Json(status_json(&nlb))
}

/// Serves the admin port until `stop` turns true.
pub async fn serve(nlb: Arc<Nlb>, listener: AdmittedListener, mut stop: watch::Receiver<bool>) {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(nlb);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "admin server stopped with an error");
    }
}
