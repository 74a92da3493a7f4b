//! UpdateRouting, GetRoutingTable, RouteRequest, ValidateRoute.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use shared_types::pb::{self, ModuleType, Protocol};
use shared_types::time::{from_unix_millis, unix_millis};
use tonic::Status;

use super::module_client::request;
use super::ControlService;
use crate::config::{ConfigError, RouteConfig, UpdateError};
use crate::routing::route::duplicate_ids;
use crate::routing::{normalize_name, ConnInfo, Detected, RouteError, RouteSpec, Snapshot, Target};
use shared_types::query::{self, Fields, Queryable, Value};

/// Fields `GetRoutingTable` queries may name.
const ENTRY_FIELDS: Fields = Fields {
    names: &[
        "route_id",
        "protocol",
        "source_pattern",
        "destination_pattern",
        "destination_port",
        "priority",
        "path_pattern",
        "target_instance_id",
        "target_module_type",
        "current_connections",
        "target",
    ],
    map_prefixes: &["metadata"],
};

struct Entry {
    entry: pb::RoutingEntry,
    target: String,
}

impl Queryable for Entry {
    fn field(&self, name: &str) -> Option<Value> {
        let e = &self.entry;
        let r = e.route.as_ref()?;
        let s = |v: &str| Some(Value::Str(v.to_string()));
        let n = |v: i32| Some(Value::Num(f64::from(v)));
        match name {
            "route_id" => s(&r.route_id),
            "protocol" => Protocol::from_wire(r.protocol).and_then(|p| s(p.short_name())),
            "source_pattern" => s(&r.source_pattern),
            "destination_pattern" => s(&r.destination_pattern),
            "destination_port" => n(r.destination_port),
            "priority" => n(r.priority),
            "path_pattern" => s(&r.path_pattern),
            "target_instance_id" => s(&e.target_instance_id),
            "target_module_type" => {
                ModuleType::from_wire(e.target_module_type).and_then(|t| s(t.short_name()))
            }
            "current_connections" => n(e.current_connections),
            "target" => s(&self.target),
            other => other
                .strip_prefix("metadata.")
                .and_then(|k| r.metadata.get(k))
                .and_then(|v| s(v)),
        }
    }
}

/// Module types that usually serve a protocol (the candidates `ValidateRoute`
/// asks when the route names none). `TCP` may be served by any.
fn affinity(p: Protocol) -> &'static [ModuleType] {
    match p {
        Protocol::Http
        | Protocol::Https
        | Protocol::Http2
        | Protocol::Grpc
        | Protocol::Websocket => &[ModuleType::Alb, ModuleType::Ailb],
        Protocol::Mysql | Protocol::Postgres | Protocol::Mongodb | Protocol::Redis => {
            &[ModuleType::Dblb]
        }
        Protocol::Rtmp | Protocol::Rtmps => &[ModuleType::Rtmp],
        _ => &[],
    }
}

fn errors_status(errors: &[String]) -> Status {
    Status::invalid_argument(errors.join("; "))
}

/// The connection a `RouteRequest` describes.
fn conn_from_request(
    route: &pb::Route,
    context: &HashMap<String, String>,
) -> Result<ConnInfo<'static>, Status> {
    let protocol = Protocol::from_wire(route.protocol)
        .filter(|p| *p != Protocol::Unspecified)
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "route.protocol: {} is not a protocol the NLB routes",
                route.protocol
            ))
        })?;
    let detected = Detected::from_protocol(protocol).ok_or_else(|| {
        Status::invalid_argument(format!(
            "route.protocol: {protocol} cannot be carried by the NLB's TCP listeners"
        ))
    })?;
    let port = u16::try_from(route.destination_port).map_err(|_| {
        Status::invalid_argument(format!(
            "route.destination_port: {} is not a port (1 to 65535, or 0 for none)",
            route.destination_port
        ))
    })?;
    let client_text = [
        Some(route.source_pattern.as_str()),
        context.get("client_address").map(String::as_str),
        context.get("client_ip").map(String::as_str),
    ]
    .into_iter()
    .flatten()
    .find(|s| !s.trim().is_empty());
    let client = match client_text {
        None => None,
        Some(t) => Some(
            t.trim()
                .parse::<IpAddr>()
                .or_else(|_| t.trim().parse::<SocketAddr>().map(|s| s.ip()))
                .map_err(|_| {
                    Status::invalid_argument(format!(
                        "route.source_pattern: {t:?} is not a client IP address"
                    ))
                })?,
        ),
    };
    let name = if route.destination_pattern.trim().is_empty() {
        None
    } else if route.destination_pattern.contains('*') {
        return Err(Status::invalid_argument(format!(
            "route.destination_pattern: {:?} is a pattern; give the name the client asked for",
            route.destination_pattern
        )));
    } else {
        Some(Cow::Owned(normalize_name(&route.destination_pattern)))
    };
    Ok(ConnInfo {
        port,
        protocol: detected,
        client,
        server_name: name,
    })
}

impl ControlService {
    pub(super) async fn update_routing(
        &self,
        req: pb::UpdateRoutingRequest,
    ) -> Result<pb::UpdateRoutingResponse, Status> {
        let n = req.routes.len() as i32;
        let respond = |errors: Vec<String>, message: String| {
            if errors.is_empty() {
                Ok(pb::UpdateRoutingResponse {
                    success: true,
                    message,
                    routes_updated: n,
                    validation_errors: Vec::new(),
                    error: None,
                })
            } else if req.validate_only {
                Ok(pb::UpdateRoutingResponse {
                    success: false,
                    message: format!("{} problems in {n} routes", errors.len()),
                    routes_updated: 0,
                    error: Some(pb::Error::new(
                        pb::StatusCode::InvalidArgument,
                        errors.join("; "),
                    )),
                    validation_errors: errors,
                })
            } else {
                Err(errors_status(&errors))
            }
        };

        if !req.source_instance_id.is_empty() {
            // Routes announced on behalf of an instance: soft state, like
            // `initial_routes`.
            let module_type = self
                .nlb
                .registry
                .module_type_of(&req.source_instance_id)
                .ok_or_else(|| {
                    Status::not_found(format!(
                        "source_instance_id: no instance {} is registered",
                        req.source_instance_id
                    ))
                })?;
            let mut specs = Vec::new();

            let mut errors: Vec<String> = duplicate_ids(&req.routes)
                .iter()
                .map(ToString::to_string)
                .collect();
            for r in &req.routes {
                match RouteSpec::announced(r, module_type) {
                    Ok(s) => specs.push(s),
                    Err(es) => errors.extend(es.iter().map(ToString::to_string)),
                }
            }
            if !errors.is_empty() || req.validate_only {
                return respond(errors, format!("{n} routes are valid"));
            }
            self.nlb.registry.set_instance_routes(
                &req.source_instance_id,
                specs,
                req.replace_all,
            )?;
            return respond(
                Vec::new(),
                format!(
                    "{n} routes announced for instance {}{}",
                    req.source_instance_id,
                    if req.replace_all {
                        " (replacing its routes)"
                    } else {
                        ""
                    }
                ),
            );
        }

        // Operator routes: the `routes` config section, persisted.
        let mut errors: Vec<String> = duplicate_ids(&req.routes)
            .iter()
            .map(ToString::to_string)
            .collect();
        for r in &req.routes {
            if let Err(es) = RouteSpec::operator(r) {
                errors.extend(es.iter().map(ToString::to_string));
            }
        }
        if !errors.is_empty() {
            return respond(errors, String::new());
        }
        // Read-modify-write of the routes in force, under the config store's
        // lock so concurrent upserts cannot lose each other; off the async
        // workers, since saving fsyncs the state file.
        let nlb = Arc::clone(&self.nlb);
        let (given, replace_all, validate_only) =
            (req.routes.clone(), req.replace_all, req.validate_only);
        let (outcome, in_force) = tokio::task::spawn_blocking(move || {
            let mut in_force = 0;
            let outcome = nlb
                .config
                .modify_section("routes", validate_only, |current| {
                    let mut routes: Vec<RouteConfig> = if replace_all {
                        Vec::new()
                    } else {
                        current.routes.clone()
                    };
                    for r in &given {
                        let rc = RouteConfig::from_proto(r);
                        match routes.iter_mut().find(|x| x.route_id == rc.route_id) {
                            Some(slot) => *slot = rc,
                            None => routes.push(rc),
                        }
                    }
                    in_force = routes.len();
                    serde_yaml_ng::to_value(&routes).map_err(|e| {
                        UpdateError::Invalid(vec![ConfigError::new("routes", e.to_string())])
                    })
                });
            (outcome, in_force)
        })
        .await
        .map_err(|e| Status::internal(format!("route update task failed: {e}")))?;
        match outcome {
            Ok(_) => {
                if !req.validate_only {
                    self.nlb.apply_config();
                    self.nlb
                        .metrics
                        .config_updates
                        .with_label_values(&["applied"])
                        .inc();
                    tracing::info!(
                        routes = n,
                        replace_all = req.replace_all,
                        "operator routes updated"
                    );
                }
                let verb = if req.validate_only {
                    "are valid"
                } else {
                    "applied"
                };
                respond(
                    Vec::new(),
                    format!("{n} routes {verb}; {in_force} operator routes in force"),
                )
            }
            Err(UpdateError::Persist(e)) => {
                self.nlb
                    .metrics
                    .config_updates
                    .with_label_values(&["refused"])
                    .inc();
                tracing::error!(error = %e, "operator routes not saved");
                Err(Status::unavailable(format!("routes: {e}")))
            }
            Err(UpdateError::Invalid(errs)) => {
                self.nlb
                    .metrics
                    .config_updates
                    .with_label_values(&["refused"])
                    .inc();
                respond(
                    errs.iter().map(ToString::to_string).collect(),
                    String::new(),
                )
            }
        }
    }

    pub(super) async fn get_routing_table(
        &self,
        req: pb::GetRoutingTableRequest,
    ) -> Result<pb::GetRoutingTableResponse, Status> {
        let protocol = Protocol::from_wire(req.protocol_filter).ok_or_else(|| {
            Status::invalid_argument(format!(
                "protocol_filter: {} is not a protocol",
                req.protocol_filter
            ))
        })?;
        let dest = normalize_name(&req.destination_filter);
        let snapshot = self.nlb.registry.router().load();
        let mut entries = Vec::new();
        for r in snapshot.routes() {
            if protocol != Protocol::Unspecified && r.spec.protocol != protocol {
                continue;
            }
            if !dest.is_empty()
                && normalize_name(&r.spec.route.destination_pattern) != dest
                && !(r.spec.destination != crate::routing::NamePattern::Any
                    && r.spec.destination.matches(Some(&dest)))
            {
                continue;
            }
            let target = match &r.spec.target {
                Target::Announced(_) => "announced".to_string(),
                Target::ModuleType(t) => format!("module_type:{t}"),
                Target::Backend(b) => format!("backend:{b}"),
            };
            let created = Some(from_unix_millis(r.stats.created_at_ms));
            let last_used = Some(r.stats.last_used_ms())
                .filter(|ms| *ms > 0)
                .map(from_unix_millis);
            let servers: Vec<Option<&std::sync::Arc<crate::routing::Endpoint>>> =
                if r.servers.is_empty() {
                    vec![None]
                } else {
                    r.servers.iter().map(Some).collect()
                };
            for server in servers {
                entries.push(Entry {
                    entry: pb::RoutingEntry {
                        route: Some(r.spec.route.clone()),
                        target_instance_id: server.map(|e| e.id.clone()).unwrap_or_default(),
                        target_module_type: server
                            .map_or(ModuleType::Unspecified, |e| e.module_type)
                            as i32,
                        current_connections: server.map_or(0, |e| {
                            i32::try_from(e.counters.active()).unwrap_or(i32::MAX)
                        }),
                        created_at: created,
                        last_used,
                    },
                    target: target.clone(),
                });
            }
        }
        let (page, pagination) = query::apply(entries, req.query.as_ref(), &ENTRY_FIELDS)?;
        Ok(pb::GetRoutingTableResponse {
            entries: page.into_iter().map(|e| e.entry).collect(),
            total_entries: pagination.total_items,
            pagination: Some(pagination),
        })
    }

    pub(super) async fn route_request(
        &self,
        req: pb::RouteRequestRequest,
    ) -> Result<pb::RouteRequestResponse, Status> {
        let route = req
            .route
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("route: is required"))?;
        let conn = conn_from_request(route, &req.context)?;
        let snapshot = self.nlb.registry.router().load();
        let outcome = snapshot.select(&conn, &[]);
        let result = match &outcome {
            Ok(_) => "routed",
            Err(RouteError::NoRoute(_)) => "no_route",
            Err(RouteError::NoServer { .. }) => "no_server",
        };
        if !req.dry_run {
            self.nlb
                .metrics
                .route_requests
                .with_label_values(&[result])
                .inc();
        }
        Ok(match outcome {
            Ok(sel) => {
                if !req.dry_run {
                    Snapshot::record_routed(&sel, unix_millis(std::time::SystemTime::now()));
                    self.nlb.total_requests.fetch_add(1, Ordering::Relaxed);
                }
                let e = sel.endpoint;
                pb::RouteRequestResponse {
                    routed: true,
                    target_instance_id: e.id.clone(),
                    target_module_type: e.module_type as i32,
                    target_address: e.address.clone().unwrap_or_default(),
                    priority: sel.route.spec.priority,
                    message: format!(
                        "{conn} matches route {:?}; sent to {}{}{}",
                        sel.route.spec.route_id(),
                        e.id,
                        if e.version.is_empty() {
                            String::new()
                        } else {
                            format!(" (version {})", e.version)
                        },
                        if req.dry_run {
                            " (dry run: nothing counted)"
                        } else {
                            ""
                        }
                    ),
                    error: None,
                }
            }
            Err(err) => {
                let code = match err {
                    RouteError::NoRoute(_) => pb::StatusCode::NotFound,
                    RouteError::NoServer { .. } => pb::StatusCode::Unavailable,
                };
                pb::RouteRequestResponse {
                    routed: false,
                    message: err.to_string(),
                    error: Some(pb::Error::new(code, err.to_string())),
                    ..Default::default()
                }
            }
        })
    }

    pub(super) async fn validate_route(
        &self,
        req: pb::ValidateRouteRequest,
    ) -> Result<pb::ValidateRouteResponse, Status> {
        let route = req
            .route
            .ok_or_else(|| Status::invalid_argument("route: is required"))?;
        let names_target = ["module_type", "backend"]
            .iter()
            .any(|k| route.metadata.get(*k).is_some_and(|v| !v.is_empty()));
        let spec = if names_target {
            RouteSpec::operator(&route)
        } else {
            RouteSpec::announced(&route, ModuleType::Unspecified)
        };
        let mut validation_errors = Vec::new();
        let mut details = HashMap::new();
        let mut capable = Vec::new();
        let spec = match spec {
            Ok(s) => Some(s),
            Err(es) => {
                validation_errors.extend(es.iter().map(ToString::to_string));
                None
            }
        };
        let config = self.nlb.config.current();
        if let Some(Target::Backend(b)) = spec.as_ref().map(|s| &s.target) {
            match config.backends.get(b) {
                Some(addrs) => {
                    capable.extend(addrs.iter().map(|a| format!("{b}/{a}")));
                    details.insert("backend".into(), format!("{b}: {}", addrs.join(", ")));
                }
                None => validation_errors.push(format!(
                    "route {:?}: metadata: no backend pool named {b:?} in the config",
                    route.route_id
                )),
            }
        } else if let Some(spec) = &spec {
            let types: Vec<ModuleType> = match &spec.target {
                Target::ModuleType(t) => vec![*t],
                _ => affinity(spec.protocol).to_vec(),
            };
            let candidates: Vec<(String, String, ModuleType)> = self
                .nlb
                .module_addresses(ModuleType::Unspecified)
                .into_iter()
                .filter(|(_, _, t)| types.is_empty() || types.contains(t))
                .collect();
            details.insert("candidates".into(), candidates.len().to_string());
            let deadline = Duration::from_millis(config.routing.validate_timeout_ms);
            let targets = candidates
                .into_iter()
                .map(|(id, addr, _)| (id, addr))
                .collect();
            let answers = self
                .nlb
                .modules
                .fan_out(targets, deadline, |_, mut c| {
                    let msg = pb::CanHandleRequest {
                        route: Some(route.clone()),
                        context: HashMap::new(),
                    };
                    async move { c.can_handle(request(msg, deadline)).await }
                })
                .await;
            for (id, answer) in answers {
                match answer {
                    Ok(a) if a.can_handle => {
                        details.insert(
                            format!("instance.{id}"),
                            format!("can handle (priority {}) {}", a.priority, a.reason)
                                .trim()
                                .to_string(),
                        );
                        capable.push(id);
                    }
                    Ok(a) => {
                        details.insert(
                            format!("instance.{id}"),
                            format!("cannot handle: {}", a.reason),
                        );
                    }
                    Err(e) => {
                        details.insert(
                            format!("instance.{id}"),
                            format!("no answer: {}", e.message()),
                        );
                    }
                }
            }
        }
        capable.sort();
        Ok(pb::ValidateRouteResponse {
            valid: validation_errors.is_empty(),
            has_handler: !capable.is_empty(),
            capable_instances: capable,
            validation_errors,
            details,
        })
    }
}
