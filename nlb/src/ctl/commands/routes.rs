//! `routes show` (GetRoutingTable), `routes apply FILE` (UpdateRouting) and
//! `routes dry-run` (RouteRequest with dry_run).

use shared_types::pb::{self, Protocol};

use super::modules::type_name;
use super::{more_pages_hint, query};
use crate::ctl::cli::{DryRunArgs, RoutesApplyArgs, RoutesShowArgs};
use crate::ctl::client::Ctl;
use crate::ctl::exit::{CtlError, Exit};
use crate::ctl::input;
use crate::ctl::json;
use crate::ctl::output::{or_dash, when, Out, Table};

fn protocol_name(n: i32) -> String {
    Protocol::from_wire(n).map_or_else(|| n.to_string(), |p| p.short_name().to_string())
}

fn port(n: i32) -> String {
    if n == 0 {
        "any".into()
    } else {
        n.to_string()
    }
}

/// Who serves an operator route, from its metadata.
fn served_by(r: &pb::Route) -> String {
    if let Some(t) = r.metadata.get("module_type").filter(|s| !s.is_empty()) {
        format!("type:{t}")
    } else if let Some(b) = r.metadata.get("backend").filter(|s| !s.is_empty()) {
        format!("backend:{b}")
    } else {
        "announced".into()
    }
}

/// Routes as given (for `modules show`).
pub(super) fn routes_table(routes: &[pb::Route]) -> Table {
    let mut t = Table::new(&[
        "ROUTE",
        "PROTOCOL",
        "PORT",
        "SOURCE",
        "DESTINATION",
        "PATH",
        "PRIORITY",
    ]);
    for r in routes {
        t.row(vec![
            r.route_id.clone(),
            protocol_name(r.protocol),
            port(r.destination_port),
            or_dash(&r.source_pattern),
            or_dash(&r.destination_pattern),
            or_dash(&r.path_pattern),
            r.priority.to_string(),
        ]);
    }
    t
}

fn entries_table(entries: &[pb::RoutingEntry]) -> Table {
    let mut t = Table::new(&[
        "ROUTE",
        "PROTOCOL",
        "PORT",
        "SOURCE",
        "DESTINATION",
        "PRIORITY",
        "SERVED BY",
        "INSTANCE",
        "TYPE",
        "CONNS",
        "LAST USED",
    ]);
    for e in entries {
        let r = e.route.clone().unwrap_or_default();
        t.row(vec![
            r.route_id.clone(),
            protocol_name(r.protocol),
            port(r.destination_port),
            or_dash(&r.source_pattern),
            or_dash(&r.destination_pattern),
            r.priority.to_string(),
            served_by(&r),
            or_dash(&e.target_instance_id),
            type_name(e.target_module_type),
            e.current_connections.to_string(),
            when(e.last_used.as_ref()),
        ]);
    }
    t
}

pub(super) async fn show(ctl: &Ctl, out: &mut Out, a: &RoutesShowArgs) -> Result<Exit, CtlError> {
    let req = pb::GetRoutingTableRequest {
        protocol_filter: a.protocol.unwrap_or(Protocol::Unspecified) as i32,
        destination_filter: a.destination.clone().unwrap_or_default(),
        query: query(&a.query),
    };
    let resp = ctl
        .call("routes show", req, |mut c, r| async move {
            c.get_routing_table(r).await
        })
        .await?;
    if out.json() {
        out.document(&json::routing_table(&resp))?;
    } else {
        out.text(&entries_table(&resp.entries).render())?;
        more_pages_hint("entries", resp.pagination.as_ref());
    }
    Ok(Exit::Ok)
}

pub(super) async fn apply(ctl: &Ctl, out: &mut Out, a: &RoutesApplyArgs) -> Result<Exit, CtlError> {
    let what = format!("routes apply {}", input::display_name(&a.file));
    // Read and check the file before connecting: a bad file never reaches the NLB.
    let routes = input::routes_file(&a.file)?;
    let req = pb::UpdateRoutingRequest {
        routes,
        replace_all: a.replace_all,
        source_instance_id: String::new(),
        validate_only: a.validate_only,
    };
    let resp = ctl
        .call(
            &what,
            req,
            |mut c, r| async move { c.update_routing(r).await },
        )
        .await?;
    if out.json() {
        out.document(&json::update_routing(&resp))?;
    }
    if !resp.success {
        let mut problems = resp.validation_errors.clone();
        if problems.is_empty() {
            problems.push(
                resp.error
                    .as_ref()
                    .map_or_else(|| or_dash(&resp.message), |e| e.message.clone()),
            );
        }
        return Err(CtlError::Rejected { what, problems });
    }
    if !out.json() {
        out.text(&resp.message)?;
    }
    Ok(Exit::Ok)
}

fn render_dry_run(r: &pb::RouteRequestResponse) -> String {
    if r.routed {
        // Static backend servers have no module type.
        let kind = match type_name(r.target_module_type).as_str() {
            "-" => String::new(),
            t => format!(" ({t})"),
        };
        format!(
            "routed to {}{kind} at {}, route priority {}\n{}\n",
            r.target_instance_id,
            or_dash(&r.target_address),
            r.priority,
            r.message
        )
    } else {
        let why = r.error.as_ref().map_or_else(
            || r.message.clone(),
            |e| format!("{}: {}", json::contract_code(e.code), e.message),
        );
        format!("not routed: {why}\n")
    }
}

pub(super) async fn dry_run(ctl: &Ctl, out: &mut Out, a: &DryRunArgs) -> Result<Exit, CtlError> {
    let mut context = std::collections::HashMap::new();
    if let Some(c) = &a.client {
        context.insert("client_address".to_string(), c.clone());
    }
    let req = pb::RouteRequestRequest {
        route: Some(pb::Route {
            protocol: a.protocol as i32,
            destination_port: i32::from(a.port),
            destination_pattern: a.host.clone().unwrap_or_default(),
            ..Default::default()
        }),
        context,
        dry_run: true,
    };
    let resp = ctl
        .call("routes dry-run", req, |mut c, r| async move {
            c.route_request(r).await
        })
        .await?;
    if out.json() {
        out.document(&json::route_request(&resp))?;
    } else {
        out.text(&render_dry_run(&resp))?;
    }
    Ok(if resp.routed {
        Exit::Ok
    } else {
        Exit::Negative
    })
}
