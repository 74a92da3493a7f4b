//! `--json` output: each response message as a JSON object.
//!
//! The shape follows the `.proto`: field names as there (snake_case), every
//! field present even when zero or empty, enums as their short lowercase
//! names (`alb`, `healthy`, `http2`; the contract's `StatusCode` as
//! `not_found`, ...), timestamps as RFC 3339 UTC strings with milliseconds
//! (`null` when absent), maps as objects with sorted keys, 64-bit integers as
//! numbers. A route leaves out `source_port` (ignored by the NLB), so a
//! route's JSON is also a valid entry of a routes file.

use std::collections::{BTreeMap, HashMap};

use prost_types::Timestamp;
use serde_json::{json, Map, Value};
use shared_types::pb::{
    self, HealthStatus, ModuleType, Protocol, RolloutEventKind, RolloutState, StatusCode,
};

use super::output::rfc3339;

pub fn module_type(n: i32) -> Value {
    ModuleType::from_wire(n).map_or_else(|| json!(n), |t| json!(t.short_name()))
}

pub fn protocol(n: i32) -> Value {
    Protocol::from_wire(n).map_or_else(|| json!(n), |p| json!(p.short_name()))
}

pub fn health(n: i32) -> Value {
    HealthStatus::from_wire(n).map_or_else(|| json!(n), |h| json!(h.short_name()))
}

/// The contract's `StatusCode` without its prefix (`NOT_FOUND`), or the number.
pub fn contract_code(n: i32) -> String {
    StatusCode::try_from(n).map_or_else(
        |_| n.to_string(),
        |c| {
            let name = c.as_str_name();
            name.strip_prefix("STATUS_CODE_")
                .unwrap_or(name)
                .to_string()
        },
    )
}

/// A rollout state without its prefix (`RUNNING`, `ROLLED_BACK`), or the number.
pub fn rollout_state_name(n: i32) -> String {
    RolloutState::try_from(n).map_or_else(
        |_| n.to_string(),
        |s| unprefixed(s.as_str_name(), "ROLLOUT_STATE_"),
    )
}

/// A rollout event kind without its prefix (`ANALYSIS_FAILED`), or the number.
pub fn rollout_event_kind_name(n: i32) -> String {
    RolloutEventKind::try_from(n).map_or_else(
        |_| n.to_string(),
        |k| unprefixed(k.as_str_name(), "ROLLOUT_EVENT_KIND_"),
    )
}

fn unprefixed(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix).unwrap_or(name).to_string()
}

/// A known enum value's name in lowercase (as every enum in the JSON), or
/// the number.
fn lowercase_name(known: bool, n: i32, name: String) -> Value {
    if known {
        json!(name.to_ascii_lowercase())
    } else {
        json!(n)
    }
}

pub fn rollout_state(n: i32) -> Value {
    lowercase_name(RolloutState::try_from(n).is_ok(), n, rollout_state_name(n))
}

pub fn rollout_event_kind(n: i32) -> Value {
    lowercase_name(
        RolloutEventKind::try_from(n).is_ok(),
        n,
        rollout_event_kind_name(n),
    )
}

fn status_code(n: i32) -> Value {
    match StatusCode::try_from(n) {
        Ok(_) => json!(contract_code(n).to_ascii_lowercase()),
        Err(_) => json!(n),
    }
}

pub fn timestamp(ts: Option<&Timestamp>) -> Value {
    ts.map_or(Value::Null, |t| json!(rfc3339(t, true)))
}

/// A string map as an object with sorted keys.
pub fn strings(map: &HashMap<String, String>) -> Value {
    let sorted: BTreeMap<&String, &String> = map.iter().collect();
    json!(sorted)
}

fn object<V>(map: &HashMap<String, V>, f: impl Fn(&V) -> Value) -> Value {
    let sorted: BTreeMap<&String, &V> = map.iter().collect();
    Value::Object(
        sorted
            .into_iter()
            .map(|(k, v)| (k.clone(), f(v)))
            .collect::<Map<String, Value>>(),
    )
}

pub fn instance(i: &pb::ModuleInstance) -> Value {
    json!({
        "instance_id": i.instance_id,
        "module_type": module_type(i.module_type),
        "address": i.address,
        "health_status": health(i.health_status),
        "metadata": strings(&i.metadata),
        "started_at": timestamp(i.started_at.as_ref()),
        "current_connections": i.current_connections,
        "max_connections": i.max_connections,
        "version": i.version,
        "traffic_weight": i.traffic_weight,
    })
}

pub fn route(r: &pb::Route) -> Value {
    json!({
        "route_id": r.route_id,
        "protocol": protocol(r.protocol),
        "source_pattern": r.source_pattern,
        "destination_pattern": r.destination_pattern,
        "destination_port": r.destination_port,
        "headers": strings(&r.headers),
        "path_pattern": r.path_pattern,
        "priority": r.priority,
        "metadata": strings(&r.metadata),
    })
}

pub fn stats(s: Option<&pb::ModuleStats>) -> Value {
    let Some(s) = s else { return Value::Null };
    json!({
        "instance_id": s.instance_id,
        "total_requests": s.total_requests,
        "successful_requests": s.successful_requests,
        "failed_requests": s.failed_requests,
        "active_connections": s.active_connections,
        "total_connections": s.total_connections,
        "avg_latency_ms": s.avg_latency_ms,
        "p50_latency_ms": s.p50_latency_ms,
        "p95_latency_ms": s.p95_latency_ms,
        "p99_latency_ms": s.p99_latency_ms,
        "bytes_received": s.bytes_received,
        "bytes_sent": s.bytes_sent,
        "cpu_usage_percent": s.cpu_usage_percent,
        "memory_usage_mb": s.memory_usage_mb,
        "since": timestamp(s.since.as_ref()),
        "custom_stats": strings(&s.custom_stats),
    })
}

pub fn deployment(d: Option<&pb::BlueGreenConfig>) -> Value {
    let Some(d) = d else { return Value::Null };
    json!({
        "blue_version": d.blue_version,
        "green_version": d.green_version,
        "blue_weight": d.blue_weight,
        "green_weight": d.green_weight,
        "active_version": d.active_version,
        "canary_enabled": d.canary_enabled,
        "canary_percent": d.canary_percent,
        "deployment_started": timestamp(d.deployment_started.as_ref()),
    })
}

pub fn pagination(p: Option<&pb::Pagination>) -> Value {
    let Some(p) = p else { return Value::Null };
    json!({
        "page": p.page,
        "page_size": p.page_size,
        "total_items": p.total_items,
        "total_pages": p.total_pages,
    })
}

pub fn error(e: Option<&pb::Error>) -> Value {
    let Some(e) = e else { return Value::Null };
    json!({
        "code": status_code(e.code),
        "message": e.message,
        "details": strings(&e.details),
        "occurred_at": timestamp(e.occurred_at.as_ref()),
    })
}

pub fn point(p: &pb::MetricDataPoint) -> Value {
    json!({
        "name": p.name,
        "value": p.value,
        "labels": strings(&p.labels),
        "timestamp": timestamp(p.timestamp.as_ref()),
    })
}

pub fn module_metrics(m: Option<&pb::ModuleMetrics>) -> Value {
    let Some(m) = m else { return Value::Null };
    json!({
        "instance_id": m.instance_id,
        "module_type": module_type(m.module_type),
        "metrics": m.metrics.iter().map(point).collect::<Vec<_>>(),
        "collected_at": timestamp(m.collected_at.as_ref()),
    })
}

fn module_metrics_map(map: &HashMap<String, pb::ModuleMetrics>) -> Value {
    object(map, |m| module_metrics(Some(m)))
}

pub fn list_modules(r: &pb::ListModulesResponse) -> Value {
    json!({
        "modules": r.modules.iter().map(instance).collect::<Vec<_>>(),
        "total_modules": r.total_modules,
        "pagination": pagination(r.pagination.as_ref()),
    })
}

pub fn module_info(r: &pb::GetModuleInfoResponse) -> Value {
    json!({
        "instance": r.instance.as_ref().map_or(Value::Null, instance),
        "routes": r.routes.iter().map(route).collect::<Vec<_>>(),
        "stats": stats(r.stats.as_ref()),
        "deployment_config": deployment(r.deployment_config.as_ref()),
        "details": strings(&r.details),
    })
}

pub fn routing_entry(e: &pb::RoutingEntry) -> Value {
    json!({
        "route": e.route.as_ref().map_or(Value::Null, route),
        "target_instance_id": e.target_instance_id,
        "target_module_type": module_type(e.target_module_type),
        "current_connections": e.current_connections,
        "created_at": timestamp(e.created_at.as_ref()),
        "last_used": timestamp(e.last_used.as_ref()),
    })
}

pub fn routing_table(r: &pb::GetRoutingTableResponse) -> Value {
    json!({
        "entries": r.entries.iter().map(routing_entry).collect::<Vec<_>>(),
        "total_entries": r.total_entries,
        "pagination": pagination(r.pagination.as_ref()),
    })
}

pub fn update_routing(r: &pb::UpdateRoutingResponse) -> Value {
    json!({
        "success": r.success,
        "message": r.message,
        "routes_updated": r.routes_updated,
        "validation_errors": r.validation_errors,
        "error": error(r.error.as_ref()),
    })
}

pub fn route_request(r: &pb::RouteRequestResponse) -> Value {
    json!({
        "routed": r.routed,
        "target_instance_id": r.target_instance_id,
        "target_module_type": module_type(r.target_module_type),
        "target_address": r.target_address,
        "priority": r.priority,
        "message": r.message,
        "error": error(r.error.as_ref()),
    })
}

pub fn nlb_status(r: &pb::GetNlbStatusResponse) -> Value {
    json!({
        "status": health(r.status),
        "version": r.version,
        "started_at": timestamp(r.started_at.as_ref()),
        "total_requests": r.total_requests,
        "active_connections": r.active_connections,
        "registered_modules": r.registered_modules,
        "modules_by_type": object(&r.modules_by_type, |n| json!(n)),
        "modules": r.modules.iter().map(instance).collect::<Vec<_>>(),
        "details": strings(&r.details),
    })
}

pub fn check_health(r: &pb::CheckHealthResponse) -> Value {
    json!({
        "status": health(r.status),
        "message": r.message,
        "module_health": object(&r.module_health, |h| health(*h)),
        "checks": strings(&r.checks),
        "checked_at": timestamp(r.checked_at.as_ref()),
    })
}

pub fn nlb_metrics(r: &pb::GetNlbMetricsResponse) -> Value {
    json!({
        "metrics": r.metrics.iter().map(point).collect::<Vec<_>>(),
        "module_metrics": module_metrics_map(&r.module_metrics),
        "collected_at": timestamp(r.collected_at.as_ref()),
    })
}

pub fn module_metrics_response(r: &pb::GetModuleMetricsResponse) -> Value {
    json!({
        "metrics": module_metrics(r.metrics.as_ref()),
        "collected_at": timestamp(r.collected_at.as_ref()),
    })
}

pub fn stream_update(r: &pb::StreamNlbMetricsResponse) -> Value {
    json!({
        "metrics": r.metrics.iter().map(point).collect::<Vec<_>>(),
        "module_metrics": module_metrics_map(&r.module_metrics),
        "timestamp": timestamp(r.timestamp.as_ref()),
    })
}

pub fn load_info(l: &pb::LoadInfo) -> Value {
    json!({
        "instance_id": l.instance_id,
        "active_connections": l.active_connections,
        "cpu_usage_percent": l.cpu_usage_percent,
        "memory_usage_mb": l.memory_usage_mb,
        "requests_per_second": l.requests_per_second,
        "avg_latency_ms": l.avg_latency_ms,
        "queue_depth": l.queue_depth,
        "load_score": l.load_score,
    })
}

pub fn load_distribution(r: &pb::GetLoadDistributionResponse) -> Value {
    json!({
        "distribution": object(&r.distribution, load_info),
        "balance_score": r.balance_score,
        "measured_at": timestamp(r.measured_at.as_ref()),
    })
}

pub fn rebalance(r: &pb::RebalanceLoadResponse) -> Value {
    json!({
        "success": r.success,
        "message": r.message,
        "previous_distribution": object(&r.previous_distribution, |n| json!(n)),
        "new_distribution": object(&r.new_distribution, |n| json!(n)),
        "error": error(r.error.as_ref()),
    })
}

pub fn scaling(r: &pb::TriggerScalingResponse) -> Value {
    json!({
        "success": r.success,
        "message": r.message,
        "current_instances": r.current_instances,
        "target_instances": r.target_instances,
        "scaling_action": r.scaling_action,
        "error": error(r.error.as_ref()),
    })
}

/// A config section; besides the proto's fields, `data` is `config_data`
/// parsed (YAML to JSON), `null` if it does not parse.
pub fn config_update(c: &pb::ConfigUpdate) -> Value {
    let text = String::from_utf8_lossy(&c.config_data);
    let data = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&text)
        .ok()
        .and_then(|v| serde_json::to_value(v).ok())
        .unwrap_or(Value::Null);
    json!({
        "config_id": c.config_id,
        "config_type": c.config_type,
        "config_data": text,
        "data": data,
        "checksum": c.checksum,
        "updated_at": timestamp(c.updated_at.as_ref()),
        "metadata": strings(&c.metadata),
    })
}

pub fn nlb_config(r: &pb::GetNlbConfigResponse) -> Value {
    json!({
        "configs": r.configs.iter().map(config_update).collect::<Vec<_>>(),
        "last_updated": timestamp(r.last_updated.as_ref()),
    })
}

pub fn update_config(r: &pb::UpdateNlbConfigResponse) -> Value {
    json!({
        "success": r.success,
        "message": r.message,
        "validation_passed": r.validation_passed,
        "validation_errors": r.validation_errors,
        "requires_restart": r.requires_restart,
        "error": error(r.error.as_ref()),
    })
}

pub fn rollout_step(s: &pb::RolloutStep) -> Value {
    json!({
        "canary_weight": s.canary_weight,
        "hold_seconds": s.hold_seconds,
    })
}

pub fn rollout_analysis(a: Option<&pb::RolloutAnalysis>) -> Value {
    let Some(a) = a else { return Value::Null };
    json!({
        "interval_seconds": a.interval_seconds,
        "min_requests": a.min_requests,
        "max_error_rate": a.max_error_rate,
        "max_error_rate_increase": a.max_error_rate_increase,
        "max_p99_latency_ms": a.max_p99_latency_ms,
        "max_p99_latency_ratio": a.max_p99_latency_ratio,
    })
}

pub fn rollout_sample(s: Option<&pb::RolloutSample>) -> Value {
    let Some(s) = s else { return Value::Null };
    json!({
        "version": s.version,
        "instances": s.instances,
        "requests": s.requests,
        "failures": s.failures,
        "error_rate": s.error_rate,
        "p99_latency_ms": s.p99_latency_ms,
    })
}

pub fn rollout_event(e: &pb::RolloutEvent) -> Value {
    json!({
        "sequence": e.sequence,
        "rollout_id": e.rollout_id,
        "at": timestamp(e.at.as_ref()),
        "kind": rollout_event_kind(e.kind),
        "step": e.step,
        "canary_weight": e.canary_weight,
        "message": e.message,
        "canary": rollout_sample(e.canary.as_ref()),
        "baseline": rollout_sample(e.baseline.as_ref()),
    })
}

pub fn rollout(r: &pb::Rollout) -> Value {
    json!({
        "rollout_id": r.rollout_id,
        "module_type": module_type(r.module_type),
        "baseline_version": r.baseline_version,
        "canary_version": r.canary_version,
        "steps": r.steps.iter().map(rollout_step).collect::<Vec<_>>(),
        "analysis": rollout_analysis(r.analysis.as_ref()),
        "sticky": r.sticky,
        "state": rollout_state(r.state),
        "current_step": r.current_step,
        "canary_weight": r.canary_weight,
        "started_at": timestamp(r.started_at.as_ref()),
        "step_started_at": timestamp(r.step_started_at.as_ref()),
        "finished_at": timestamp(r.finished_at.as_ref()),
        "reason": r.reason,
        "events": r.events.iter().map(rollout_event).collect::<Vec<_>>(),
        "blue_green": r.blue_green,
    })
}

/// The answer of StartRollout, GetRollout, PromoteRollout, PauseRollout,
/// ResumeRollout and RollbackRollout: `{"rollout": ...}`.
pub fn rollout_response(r: Option<&pb::Rollout>) -> Value {
    json!({ "rollout": r.map_or(Value::Null, rollout) })
}

pub fn list_rollouts(r: &pb::ListRolloutsResponse) -> Value {
    json!({
        "rollouts": r.rollouts.iter().map(rollout).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_are_short_names_and_maps_are_sorted() {
        let mut i = pb::ModuleInstance {
            instance_id: "alb-1".into(),
            module_type: ModuleType::Alb as i32,
            health_status: HealthStatus::Healthy as i32,
            ..Default::default()
        };
        i.metadata.insert("zone".into(), "b".into());
        i.metadata
            .insert("data_address".into(), "127.0.0.1:1".into());
        let v = instance(&i);
        assert_eq!(v["module_type"], "alb");
        assert_eq!(v["health_status"], "healthy");
        assert_eq!(v["started_at"], Value::Null);
        assert_eq!(
            serde_json::to_string(&v["metadata"]).unwrap(),
            r#"{"data_address":"127.0.0.1:1","zone":"b"}"#
        );
        assert_eq!(module_type(99), json!(99));
        let e = pb::Error {
            code: StatusCode::NotFound as i32,
            message: "no route".into(),
            ..Default::default()
        };
        assert_eq!(error(Some(&e))["code"], "not_found");
    }

    #[test]
    fn a_route_reads_back_as_a_routes_file_entry() {
        let mut r = pb::Route {
            route_id: "web".into(),
            protocol: Protocol::Http as i32,
            destination_port: 8080,
            priority: 5,
            ..Default::default()
        };
        r.metadata.insert("module_type".into(), "alb".into());
        let back: crate::config::RouteConfig = serde_json::from_value(route(&r)).unwrap();
        assert_eq!(back.to_proto(), r);
    }

    #[test]
    fn config_sections_carry_their_parsed_data() {
        let c = pb::ConfigUpdate {
            config_type: "routing".into(),
            config_data: b"sticky: true\nvalidate_timeout_ms: 500\n".to_vec(),
            ..Default::default()
        };
        let v = config_update(&c);
        assert_eq!(v["data"]["sticky"], true);
        assert_eq!(v["data"]["validate_timeout_ms"], 500);
    }

    #[test]
    fn rollouts_have_lowercase_enums_and_every_field() {
        let sample = pb::RolloutSample {
            version: "v2".into(),
            instances: 2,
            requests: 120,
            failures: 3,
            error_rate: 0.025,
            p99_latency_ms: 40.0,
        };
        let r = pb::Rollout {
            rollout_id: "r-1".into(),
            module_type: ModuleType::Alb as i32,
            state: RolloutState::RolledBack as i32,
            steps: vec![pb::RolloutStep {
                canary_weight: 10,
                hold_seconds: 60,
            }],
            started_at: Some(Timestamp {
                seconds: 1_700_000_000,
                nanos: 5_000_000,
            }),
            events: vec![pb::RolloutEvent {
                sequence: 2,
                kind: RolloutEventKind::AnalysisFailed as i32,
                canary: Some(sample),
                ..Default::default()
            }],
            ..Default::default()
        };
        let v = rollout(&r);
        assert_eq!(v["state"], "rolled_back");
        assert_eq!(v["module_type"], "alb");
        assert_eq!(v["started_at"], "2023-11-14T22:13:20.005Z");
        assert_eq!(v["finished_at"], Value::Null);
        assert_eq!(v["analysis"], Value::Null);
        assert_eq!(v["steps"][0]["hold_seconds"], 60);
        let e = &v["events"][0];
        assert_eq!(e["kind"], "analysis_failed");
        assert_eq!(e["sequence"], 2);
        assert_eq!(e["canary"]["requests"], 120);
        assert_eq!(e["canary"]["error_rate"], 0.025);
        assert_eq!(e["baseline"], Value::Null);
        assert_eq!(keys(&v).len(), 16, "every field of Rollout: {v}");
        assert_eq!(keys(e).len(), 9, "every field of RolloutEvent: {e}");
        assert_eq!(rollout_state(42), json!(42));
        assert_eq!(rollout_state_name(RolloutState::Running as i32), "RUNNING");
        assert_eq!(
            rollout_event_kind_name(RolloutEventKind::ResumedAfterRestart as i32),
            "RESUMED_AFTER_RESTART"
        );
        assert_eq!(rollout_event_kind_name(99), "99");
        assert_eq!(rollout_response(None), json!({"rollout": null}));
    }

    fn keys(v: &Value) -> Vec<&String> {
        v.as_object().expect("an object").keys().collect()
    }
}
