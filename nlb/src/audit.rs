//! The audit trail: one structured log line (target `audit`) and one count
//! in `nlb_audit_events_total{method,result}` for every operator change made
//! through the control API, including refused attempts. A line says who
//! (token name and role, peer address), what (method and a summary of the
//! request), when (the line's timestamp and `at_unix_ms`) and the result.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use tonic::Status;

use crate::admission::PeerInfo;
use crate::auth::Principal;
use prometheus::IntCounterVec;

/// The methods audited, the label values of the metric. Anything else is
/// counted as `other`.
pub const AUDITED: &[&str] = &[
    "UpdateRouting",
    "UpdateNLBConfig",
    "RebalanceLoad",
    "TriggerScaling",
    "UnregisterModule",
    "StartRollout",
    "PromoteRollout",
    "PauseRollout",
    "ResumeRollout",
    "RollbackRollout",
];

/// Who is calling: the token's principal, the peer and the request id.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Arc<Principal>,
    pub peer: Option<SocketAddr>,
    pub request_id: String,
}

impl Caller {
    pub fn of<T>(req: &tonic::Request<T>) -> Caller {
        Caller {
            principal: Principal::of(req),
            peer: req
                .extensions()
                .get::<PeerInfo>()
                .and_then(|p| p.remote)
                .or_else(|| req.remote_addr()),
            request_id: req
                .metadata()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string(),
        }
    }
}

/// How an audited call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// The call failed or its answer reported failure.
    Failed(String),
    /// Refused by authentication or authorization.
    Denied(String),
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed(_) => "failed",
            Outcome::Denied(_) => "denied",
        }
    }

    /// The outcome of a call: a failed status, or a response that says it
    /// did not succeed (`ok` gives its message).
    pub fn of<T>(result: &Result<T, Status>, ok: impl Fn(&T) -> Result<(), String>) -> Outcome {
        match result {
            Ok(resp) => match ok(resp) {
                Ok(()) => Outcome::Ok,
                Err(m) => Outcome::Failed(m),
            },
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
                ) =>
            {
                Outcome::Denied(format!("{:?}: {}", s.code(), s.message()))
            }
            Err(s) => Outcome::Failed(format!("{:?}: {}", s.code(), s.message())),
        }
    }
}

/// Records one audit event.
/// `events` is `nlb_audit_events_total`.
pub fn record(
    events: &IntCounterVec,
    caller: &Caller,
    method: &str,
    what: &str,
    outcome: &Outcome,
) {
    let label = if AUDITED.contains(&method) {
        method
    } else {
        "other"
    };
    events.with_label_values(&[label, outcome.label()]).inc();
    let detail = match outcome {
        Outcome::Ok => "",
        Outcome::Failed(m) | Outcome::Denied(m) => m.as_str(),
    };
    let at_unix_ms = shared_types::time::unix_millis(SystemTime::now());
    tracing::info!(
        target: "audit",
        who = %caller.principal.name,
        role = %caller.principal.role.name(),
        peer = %caller.peer.map_or_else(|| "-".to_string(), |p| p.to_string()),
        request_id = %caller.request_id,
        method = %label,
        what,
        result = %outcome.label(),
        detail,
        at_unix_ms,
        "operator change"
    );
}
