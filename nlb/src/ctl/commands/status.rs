//! `status` (GetNLBStatus) and `health` (CheckHealth).

use shared_types::pb::{self, HealthStatus};

use super::modules::{health_name, instances_table};
use crate::ctl::cli::{HealthArgs, StatusArgs};
use crate::ctl::client::Ctl;
use crate::ctl::exit::{CtlError, Exit};
use crate::ctl::json;
use crate::ctl::output::{key_values, when, Out, Table};

/// Details shown under their own names in the block above them.
const SHOWN: &[&str] = &["uptime_seconds"];

fn render_status(r: &pb::GetNlbStatusResponse) -> String {
    let mut by_type: Vec<(&String, &i32)> = r.modules_by_type.iter().collect();
    by_type.sort();
    let by_type: Vec<String> = by_type.iter().map(|(t, n)| format!("{t} {n}")).collect();
    let modules = if by_type.is_empty() {
        r.registered_modules.to_string()
    } else {
        format!("{} ({})", r.registered_modules, by_type.join(", "))
    };
    let uptime = r
        .details
        .get("uptime_seconds")
        .map_or(String::new(), |s| format!(" (up {s}s)"));
    let mut pairs = vec![
        ("status", health_name(r.status)),
        ("version", r.version.clone()),
        (
            "started",
            format!("{}{uptime}", when(r.started_at.as_ref())),
        ),
        ("routing decisions", r.total_requests.to_string()),
        ("active connections", r.active_connections.to_string()),
        ("modules", modules),
    ];
    let mut details: Vec<(&String, &String)> = r
        .details
        .iter()
        .filter(|(k, _)| !SHOWN.contains(&k.as_str()))
        .collect();
    details.sort();
    pairs.extend(details.into_iter().map(|(k, v)| (k.as_str(), v.clone())));
    let mut out = key_values(&pairs);
    if !r.modules.is_empty() {
        out.push('\n');
        out.push_str(&instances_table(&r.modules).render());
    }
    out
}

pub(super) async fn status(ctl: &Ctl, out: &mut Out, a: &StatusArgs) -> Result<Exit, CtlError> {
    let req = pb::GetNlbStatusRequest {
        include_modules: a.modules,
    };
    let resp = ctl
        .call("status", req, |mut c, r| async move {
            c.get_nlb_status(r).await
        })
        .await?;
    if out.json() {
        out.document(&json::nlb_status(&resp))?;
    } else {
        out.text(&render_status(&resp))?;
    }
    Ok(Exit::Ok)
}

fn render_health(r: &pb::CheckHealthResponse) -> String {
    let mut out = key_values(&[
        ("status", health_name(r.status)),
        ("message", r.message.clone()),
        ("checked", when(r.checked_at.as_ref())),
    ]);
    let mut checks: Vec<(&String, &String)> = r.checks.iter().collect();
    checks.sort();
    let mut t = Table::new(&["CHECK", "RESULT"]);
    for (k, v) in checks {
        t.row(vec![k.clone(), v.clone()]);
    }
    out.push('\n');
    out.push_str(&t.render());
    let mut modules: Vec<(&String, &i32)> = r.module_health.iter().collect();
    modules.sort();
    let mut t = Table::new(&["INSTANCE", "HEALTH"]);
    for (id, h) in modules {
        t.row(vec![id.clone(), health_name(*h)]);
    }
    out.push('\n');
    out.push_str(&t.render());
    out
}

pub(super) async fn health(ctl: &Ctl, out: &mut Out, a: &HealthArgs) -> Result<Exit, CtlError> {
    let req = pb::CheckHealthRequest {
        deep_check: a.deep,
        check_modules: a.modules,
    };
    let resp = ctl
        .call(
            "health",
            req,
            |mut c, r| async move { c.check_health(r).await },
        )
        .await?;
    if out.json() {
        out.document(&json::check_health(&resp))?;
    } else {
        out.text(&render_health(&resp))?;
    }
    Ok(if resp.status == HealthStatus::Healthy as i32 {
        Exit::Ok
    } else {
        Exit::Negative
    })
}
