//! `load` (GetLoadDistribution), `rebalance` (RebalanceLoad) and `scale`
//! (TriggerScaling).

use std::collections::BTreeSet;

use shared_types::pb::{self, ModuleType};

use crate::ctl::cli::{LoadArgs, RebalanceArgs, ScaleArgs};
use crate::ctl::client::Ctl;
use crate::ctl::exit::{CtlError, Exit};
use crate::ctl::json;
use crate::ctl::output::{key_values, num, Out, Table};

fn render_load(r: &pb::GetLoadDistributionResponse) -> String {
    let mut t = Table::new(&[
        "INSTANCE",
        "CONNS",
        "CPU%",
        "MEM MB",
        "RPS",
        "LATENCY MS",
        "QUEUE",
        "LOAD",
    ]);
    let mut rows: Vec<&pb::LoadInfo> = r.distribution.values().collect();
    rows.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
    for l in rows {
        t.row(vec![
            l.instance_id.clone(),
            l.active_connections.to_string(),
            num(l.cpu_usage_percent),
            num(l.memory_usage_mb),
            l.requests_per_second.to_string(),
            num(l.avg_latency_ms),
            l.queue_depth.to_string(),
            num(l.load_score),
        ]);
    }
    format!(
        "{}\nbalance score: {} (1 = even)\n",
        t.render(),
        num(r.balance_score)
    )
}

pub(super) async fn load(ctl: &Ctl, out: &mut Out, a: &LoadArgs) -> Result<Exit, CtlError> {
    let req = pb::GetLoadDistributionRequest {
        module_type_filter: a.module_type.unwrap_or(ModuleType::Unspecified) as i32,
        include_historical: a.historical,
    };
    let resp = ctl
        .call("load", req, |mut c, r| async move {
            c.get_load_distribution(r).await
        })
        .await?;
    if out.json() {
        out.document(&json::load_distribution(&resp))?;
    } else {
        out.text(&render_load(&resp))?;
    }
    Ok(Exit::Ok)
}

/// Every instance id of a module type (ListModules, page by page).
async fn instances_of(ctl: &Ctl, t: ModuleType, what: &str) -> Result<Vec<String>, CtlError> {
    let mut ids = Vec::new();
    let mut page = 1;
    loop {
        let req = pb::ListModulesRequest {
            module_type_filter: t as i32,
            status_filter: 0,
            query: Some(pb::Query {
                pagination: Some(pb::Pagination {
                    page,
                    page_size: 1000,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };
        let resp = ctl
            .call(what, req, |mut c, r| async move { c.list_modules(r).await })
            .await?;
        ids.extend(resp.modules.into_iter().map(|m| m.instance_id));
        let pages = resp.pagination.map_or(1, |p| p.total_pages);
        if page >= pages {
            return Ok(ids);
        }
        page += 1;
    }
}

fn render_rebalance(r: &pb::RebalanceLoadResponse) -> String {
    let ids: BTreeSet<&String> = r
        .previous_distribution
        .keys()
        .chain(r.new_distribution.keys())
        .collect();
    let mut t = Table::new(&["INSTANCE", "CONNS", "TARGET"]);
    let get = |m: &std::collections::HashMap<String, i32>, id: &String| {
        m.get(id).map_or("-".to_string(), ToString::to_string)
    };
    for id in ids {
        t.row(vec![
            id.clone(),
            get(&r.previous_distribution, id),
            get(&r.new_distribution, id),
        ]);
    }
    format!("{}\n{}", r.message, t.render())
}

pub(super) async fn rebalance(
    ctl: &Ctl,
    out: &mut Out,
    a: &RebalanceArgs,
) -> Result<Exit, CtlError> {
    let what = "rebalance";
    let targets = match a.module_type {
        Some(t) => {
            let ids = instances_of(ctl, t, what).await?;
            if ids.is_empty() {
                // An empty target list would mean every instance: refuse instead.
                return Err(CtlError::status(
                    what,
                    tonic::Status::not_found(format!("no {t} instance is registered")),
                ));
            }
            ids
        }
        None => a.instances.clone(),
    };
    let req = pb::RebalanceLoadRequest {
        force: a.force,
        target_instances: targets,
        strategy: a.strategy.clone().unwrap_or_default(),
    };
    let resp = ctl
        .call(
            what,
            req,
            |mut c, r| async move { c.rebalance_load(r).await },
        )
        .await?;
    if out.json() {
        out.document(&json::rebalance(&resp))?;
    } else {
        out.text(&render_rebalance(&resp))?;
    }
    Ok(if resp.success {
        Exit::Ok
    } else {
        Exit::Failure
    })
}

pub(super) async fn scale(ctl: &Ctl, out: &mut Out, a: &ScaleArgs) -> Result<Exit, CtlError> {
    let (action, target) = match (a.up, a.down, a.to) {
        (true, _, _) => ("scale_up", 0),
        (_, true, _) => ("scale_down", 0),
        (_, _, Some(n)) => ("scale_to", n),
        _ if a.autoscale || a.no_autoscale => ("autoscale", 0),
        _ => {
            return Err(CtlError::Usage(
                "scale: give --up, --down, --to N, --autoscale or --no-autoscale".into(),
            ))
        }
    };
    let policy_flags = a.min.is_some()
        || a.max.is_some()
        || a.target_connections.is_some()
        || a.target_cpu.is_some()
        || a.cooldown.is_some();
    if policy_flags && !a.autoscale {
        return Err(CtlError::Usage(
            "scale: --min, --max, --target-connections, --target-cpu and --cooldown go with --autoscale"
                .into(),
        ));
    }
    let config = if a.autoscale {
        if a.target_connections.is_none() && a.target_cpu.is_none() {
            return Err(CtlError::Usage(
                "scale --autoscale: give --target-connections N, --target-cpu PERCENT or both"
                    .into(),
            ));
        }
        if let (Some(min), Some(max)) = (a.min, a.max) {
            if min > max {
                return Err(CtlError::Usage(format!(
                    "scale --autoscale: --min {min} is over --max {max}"
                )));
            }
        }
        Some(pb::ScalingConfig {
            min_instances: a.min.unwrap_or(1),
            max_instances: a.max.unwrap_or_default(),
            target_connections: a.target_connections.unwrap_or_default(),
            target_cpu_percent: a.target_cpu.unwrap_or_default(),
            cooldown_seconds: a.cooldown.unwrap_or_default(),
            auto_scaling_enabled: true,
            ..Default::default()
        })
    } else if a.no_autoscale {
        Some(pb::ScalingConfig {
            auto_scaling_enabled: false,
            ..Default::default()
        })
    } else {
        None
    };
    let req = pb::TriggerScalingRequest {
        instance_id: a.instance.clone().unwrap_or_default(),
        module_type: a.module_type as i32,
        scaling_action: action.to_string(),
        target_instances: target,
        config,
    };
    let what = format!("scale {}", a.module_type);
    let resp = ctl
        .call(
            &what,
            req,
            |mut c, r| async move { c.trigger_scaling(r).await },
        )
        .await?;
    if out.json() {
        out.document(&json::scaling(&resp))?;
    } else {
        out.text(&key_values(&[
            ("action", resp.scaling_action.clone()),
            ("instances", resp.current_instances.to_string()),
            ("target", resp.target_instances.to_string()),
            ("message", resp.message.clone()),
        ]))?;
    }
    Ok(if resp.success {
        Exit::Ok
    } else {
        Exit::Failure
    })
}
