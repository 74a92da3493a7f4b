//! `modules list` (ListModules) and `modules show ID` (GetModuleInfo).

use shared_types::pb::{self, HealthStatus, ModuleType};

use super::routes::routes_table;
use super::{more_pages_hint, query};
use crate::ctl::cli::ModulesListArgs;
use crate::ctl::client::Ctl;
use crate::ctl::exit::{CtlError, Exit};
use crate::ctl::json;
use crate::ctl::output::{key_values, num, or_dash, pairs, when, Out, Table};

/// A module type's short name; `-` for none (static backends, no server).
pub(super) fn type_name(n: i32) -> String {
    match ModuleType::from_wire(n) {
        Some(ModuleType::Unspecified) => "-".to_string(),
        Some(t) => t.short_name().to_string(),
        None => n.to_string(),
    }
}

pub(super) fn health_name(n: i32) -> String {
    HealthStatus::from_wire(n).map_or_else(|| n.to_string(), |h| h.short_name().to_string())
}

fn limit(n: i32) -> String {
    if n == 0 {
        "unlimited".into()
    } else {
        n.to_string()
    }
}

fn weight(n: i32) -> String {
    if n == 0 {
        "-".into()
    } else {
        format!("{n}%")
    }
}

/// One row per instance.
pub(super) fn instances_table(instances: &[pb::ModuleInstance]) -> Table {
    let mut t = Table::new(&[
        "ID", "TYPE", "VERSION", "STATUS", "ADDRESS", "DATA", "CONNS", "MAX", "WEIGHT",
    ]);
    for i in instances {
        t.row(vec![
            i.instance_id.clone(),
            type_name(i.module_type),
            or_dash(&i.version),
            health_name(i.health_status),
            i.address.clone(),
            or_dash(i.metadata.get("data_address").map_or("", String::as_str)),
            i.current_connections.to_string(),
            if i.max_connections == 0 {
                "-".into()
            } else {
                i.max_connections.to_string()
            },
            weight(i.traffic_weight),
        ]);
    }
    t
}

pub(super) async fn list(ctl: &Ctl, out: &mut Out, a: &ModulesListArgs) -> Result<Exit, CtlError> {
    let req = pb::ListModulesRequest {
        module_type_filter: a.module_type.unwrap_or(ModuleType::Unspecified) as i32,
        status_filter: a.status.unwrap_or(HealthStatus::Unspecified) as i32,
        query: query(&a.query),
    };
    let resp = ctl
        .call("modules list", req, |mut c, r| async move {
            c.list_modules(r).await
        })
        .await?;
    if out.json() {
        out.document(&json::list_modules(&resp))?;
    } else {
        out.text(&instances_table(&resp.modules).render())?;
        more_pages_hint("modules", resp.pagination.as_ref());
    }
    Ok(Exit::Ok)
}

fn render_info(r: &pb::GetModuleInfoResponse) -> String {
    let i = r.instance.clone().unwrap_or_default();
    let mut out = key_values(&[
        ("instance", i.instance_id.clone()),
        ("type", type_name(i.module_type)),
        ("version", or_dash(&i.version)),
        ("status", health_name(i.health_status)),
        ("address", i.address.clone()),
        ("started", when(i.started_at.as_ref())),
        (
            "connections",
            format!("{} of {}", i.current_connections, limit(i.max_connections)),
        ),
        ("traffic weight", weight(i.traffic_weight)),
        ("metadata", pairs(&i.metadata)),
    ]);
    out.push_str("\nROUTES\n");
    if r.routes.is_empty() {
        out.push_str("(none)\n");
    } else {
        out.push_str(&routes_table(&r.routes).render());
    }
    out.push_str("\nSTATS (latest heartbeat)\n");
    match &r.stats {
        None => out.push_str("(none reported)\n"),
        Some(s) => out.push_str(&key_values(&[
            (
                "requests",
                format!(
                    "{} ({} ok, {} failed)",
                    s.total_requests, s.successful_requests, s.failed_requests
                ),
            ),
            (
                "connections",
                format!(
                    "{} active, {} in all",
                    s.active_connections, s.total_connections
                ),
            ),
            (
                "latency ms",
                format!(
                    "avg {}, p50 {}, p95 {}, p99 {}",
                    num(s.avg_latency_ms),
                    num(s.p50_latency_ms),
                    num(s.p95_latency_ms),
                    num(s.p99_latency_ms)
                ),
            ),
            (
                "bytes",
                format!("{} in, {} out", s.bytes_received, s.bytes_sent),
            ),
            ("cpu", format!("{}%", num(s.cpu_usage_percent))),
            ("memory", format!("{} MB", num(s.memory_usage_mb))),
            ("since", when(s.since.as_ref())),
            ("custom", pairs(&s.custom_stats)),
        ])),
    }
    if let Some(d) = &r.deployment_config {
        out.push_str("\nDEPLOYMENT\n");
        let green = if d.green_version.is_empty() {
            "-".to_string()
        } else {
            format!("{} ({}%)", d.green_version, d.green_weight)
        };
        out.push_str(&key_values(&[
            (
                "blue",
                format!("{} ({}%)", or_dash(&d.blue_version), d.blue_weight),
            ),
            ("green", green),
            ("active", or_dash(&d.active_version)),
            ("since", when(d.deployment_started.as_ref())),
        ]));
    }
    out.push_str("\nDETAILS\n");
    let mut details: Vec<(&String, &String)> = r.details.iter().collect();
    details.sort();
    let pairs: Vec<(&str, String)> = details
        .into_iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    out.push_str(&key_values(&pairs));
    out
}

pub(super) async fn show(ctl: &Ctl, out: &mut Out, id: &str) -> Result<Exit, CtlError> {
    let req = pb::GetModuleInfoRequest {
        instance_id: id.to_string(),
    };
    let resp = ctl
        .call(&format!("modules show {id}"), req, |mut c, r| async move {
            c.get_module_info(r).await
        })
        .await?;
    if out.json() {
        out.document(&json::module_info(&resp))?;
    } else {
        out.text(&render_info(&resp))?;
    }
    Ok(Exit::Ok)
}
