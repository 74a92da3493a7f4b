//! `marchproxy.ModuleService`, served by every module: the SDK answers
//! lifecycle, stats, instances, rate limits, versions and weights, and
//! metrics itself, and hands routes and config to the module. Changing
//! calls need an operator or NLB token ([`crate::auth`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use shared_types::pb::module_service_server::ModuleService;
use shared_types::pb::*;
use shared_types::query::{self, Fields, Queryable, Value};
use tonic::{Code, Request, Response, Status};

use crate::agent::{self, Announce};
use crate::module::ModuleError;
use crate::runtime::{Phase, Shared, StopReason};
use crate::scale;
use crate::versions::VersionError;

/// `StreamMetrics` interval when the request gives none.
pub const DEFAULT_STREAM_INTERVAL: Duration = Duration::from_secs(5);

pub struct Service {
    shared: Arc<Shared>,
}

impl Service {
    pub fn new(shared: Arc<Shared>) -> Self {
        Service { shared }
    }

    /// A call naming an instance must name this one (empty = this one).
    fn this_instance(&self, instance_id: &str) -> Result<(), Status> {
        if instance_id.is_empty() || instance_id == self.shared.ctx.instance_id {
            Ok(())
        } else {
            Err(Status::not_found(format!(
                "this is module instance {}, not {instance_id:?}",
                self.shared.ctx.instance_id
            )))
        }
    }

    /// Announces the module's routes to the NLB after a change. If the NLB
    /// refuses them, the module gets `before` back and the caller the NLB's
    /// reason: module and NLB never disagree on the routes.
    async fn announce_or_restore(&self, before: Vec<Route>) -> Result<&'static str, Status> {
        match agent::announce(&self.shared).await {
            Announce::Done => Ok("announced to the NLB"),
            Announce::NotRegistered => Ok("announced when the module registers"),
            Announce::Unreachable(e) => {
                tracing::warn!(error = %e, "routes changed while the NLB is unreachable: announced when it answers");
                Ok("the NLB is unreachable now: announced when it answers")
            }
            Announce::Stopping => Ok("not announced: the module is stopping"),
            Announce::Refused(code, why) => {
                if let Err(e) = self.shared.module.update_routes(before, true).await {
                    tracing::error!(error = %e, "could not restore the routes the NLB refused to replace");
                }
                let message = format!(
                    "the NLB refused the routes, so the module keeps the ones it had: {why}"
                );
                Err(if code == Code::InvalidArgument {
                    Status::invalid_argument(message)
                } else {
                    // Not about the routes themselves (the module's token, say).
                    Status::failed_precondition(format!(
                        "{message} ({})",
                        shared_types::error::code_name(code)
                    ))
                })
            }
        }
    }

    fn authorize<T>(&self, req: &Request<T>, method: &str) -> Result<(), Status> {
        let caller = self.shared.auth.check_change(req.metadata(), method)?;
        tracing::info!(
            target: "audit",
            method,
            caller = %caller.name,
            role = caller.role.map_or("open", |r| r.name()),
            "ModuleService change"
        );
        Ok(())
    }

    fn status_details(&self) -> HashMap<String, String> {
        let s = &self.shared;
        let link = s.link.lock().clone();
        let versions = s.versions.lock();
        let mut d = HashMap::new();
        d.insert("phase".into(), s.phase().name().into());
        d.insert("module".into(), s.descriptor.name.into());
        d.insert("data_address".into(), s.data_address.clone());
        d.insert("nlb_address".into(), s.config.nlb.addr.clone());
        d.insert(
            "registration_id".into(),
            link.registration_id.clone().unwrap_or_default(),
        );
        d.insert(
            "registered".into(),
            link.registration_id.is_some().to_string(),
        );
        d.insert("heartbeat_mode".into(), link.heartbeat_mode.into());
        if let Some(e) = &link.last_error {
            d.insert("last_error".into(), e.clone());
        }
        d.insert("active_connections".into(), s.conns.len().to_string());
        d.insert("active_version".into(), versions.active().into());
        d.insert("own_weight".into(), versions.own_weight().to_string());
        d.insert(
            "version_weights".into(),
            versions
                .weights()
                .iter()
                .map(|(v, w)| format!("{v}={w}"))
                .collect::<Vec<_>>()
                .join(","),
        );
        d.insert("rate_limits".into(), s.ctx.limits.len().to_string());
        d.insert(
            "auth".into(),
            if s.auth.is_open() { "off" } else { "on" }.into(),
        );
        d
    }

    async fn health(&self, deep: bool) -> (HealthStatus, String, HashMap<String, String>) {
        let s = &self.shared;
        let phase = s.phase();
        let own = s.module.health(deep).await;
        let mut checks = own.checks;
        let registered = s.link.lock().registration_id.is_some();
        checks.insert("phase".into(), phase.name().into());
        checks.insert(
            "nlb".into(),
            if registered {
                "registered".into()
            } else {
                s.link
                    .lock()
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "not registered yet".into())
            },
        );
        checks.insert("connections".into(), s.conns.len().to_string());
        let (status, message) = match phase {
            Phase::Serving if !own.ok => (
                HealthStatus::Degraded,
                "serving, but a module check failed".to_string(),
            ),
            Phase::Serving if !registered => (
                HealthStatus::Degraded,
                "serving, but not registered with the NLB".to_string(),
            ),
            Phase::Serving => (HealthStatus::Healthy, "serving".to_string()),
            Phase::Starting => (
                HealthStatus::Starting,
                "listening; not registered with the NLB yet".to_string(),
            ),
            Phase::Draining { .. } => (
                HealthStatus::Stopping,
                "draining: finishing open connections".to_string(),
            ),
            Phase::Stopped => (HealthStatus::Stopped, "stopped".to_string()),
        };
        (status, message, checks)
    }
}

fn module_error(e: ModuleError) -> Status {
    Status::new(e.code(), e.to_string())
}

fn version_error(e: VersionError) -> Status {
    match e {
        VersionError::Invalid(m) => Status::invalid_argument(m),
        VersionError::NoPrevious(m) => Status::failed_precondition(m),
    }
}

fn error(code: StatusCode, message: &str) -> Option<Error> {
    Some(Error::new(code, message))
}

/// A route as a row of a `GetRoutes` query.
struct RouteRow(Route);

impl Queryable for RouteRow {
    fn field(&self, name: &str) -> Option<Value> {
        let r = &self.0;
        Some(match name {
            "route_id" => Value::Str(r.route_id.clone()),
            "protocol" => Value::Str(
                Protocol::try_from(r.protocol)
                    .map(|p| {
                        p.as_str_name()
                            .trim_start_matches("PROTOCOL_")
                            .to_ascii_lowercase()
                    })
                    .unwrap_or_default(),
            ),
            "source_pattern" => Value::Str(r.source_pattern.clone()),
            "destination_pattern" => Value::Str(r.destination_pattern.clone()),
            "path_pattern" => Value::Str(r.path_pattern.clone()),
            "destination_port" => Value::Num(f64::from(r.destination_port)),
            "priority" => Value::Num(f64::from(r.priority)),
            other => {
                let (map, key) = other.split_once('.')?;
                let v = match map {
                    "metadata" => r.metadata.get(key),
                    "headers" => r.headers.get(key),
                    _ => None,
                }?;
                Value::Str(v.clone())
            }
        })
    }
}

const ROUTE_FIELDS: Fields = Fields {
    names: &[
        "route_id",
        "protocol",
        "source_pattern",
        "destination_pattern",
        "path_pattern",
        "destination_port",
        "priority",
    ],
    map_prefixes: &["metadata", "headers"],
};

type MetricsStream = tonic::codegen::BoxStream<StreamMetricsResponse>;

#[tonic::async_trait]
impl ModuleService for Service {
    async fn get_status(
        &self,
        req: Request<GetStatusRequest>,
    ) -> Result<Response<GetStatusResponse>, Status> {
        self.this_instance(&req.get_ref().instance_id)?;
        let (status, message, _) = self.health(false).await;
        Ok(Response::new(GetStatusResponse {
            instance: Some(self.shared.instance()),
            status: status as i32,
            message,
            last_updated: Some(shared_types::time::now()),
            details: self.status_details(),
        }))
    }

    async fn reload(
        &self,
        req: Request<ReloadRequest>,
    ) -> Result<Response<ReloadResponse>, Status> {
        self.authorize(&req, "Reload")?;
        self.this_instance(&req.get_ref().instance_id)?;
        let timeout = match req.get_ref().timeout_seconds {
            t if t > 0 => Duration::from_secs(t as u64),
            _ => Duration::from_secs(30),
        };
        let reply = match tokio::time::timeout(timeout, self.shared.reload_detached()).await {
            Ok(Ok(message)) => ReloadResponse {
                success: true,
                message,
                error: None,
            },
            Ok(Err(e)) => ReloadResponse {
                success: false,
                message: format!("reload failed; the config in force stays: {e}"),
                error: error(StatusCode::InvalidArgument, &e),
            },
            Err(_) => ReloadResponse {
                success: false,
                message: format!(
                    "reload did not finish within {}s; it goes on, and its result is logged",
                    timeout.as_secs()
                ),
                error: error(StatusCode::Unavailable, "reload timed out"),
            },
        };
        Ok(Response::new(reply))
    }

    async fn shutdown(
        &self,
        req: Request<ShutdownRequest>,
    ) -> Result<Response<ShutdownResponse>, Status> {
        self.authorize(&req, "Shutdown")?;
        let r = req.into_inner();
        self.this_instance(&r.instance_id)?;
        let timeout = if r.timeout_seconds > 0 {
            Duration::from_secs(r.timeout_seconds as u64)
        } else {
            Duration::from_secs(self.shared.config.shutdown.drain_timeout_seconds)
        };
        let already = self.shared.stopping();
        self.shared.request_stop(StopReason::Shutdown {
            graceful: r.graceful,
            timeout,
        });
        let message = if already {
            "already stopping".to_string()
        } else if r.graceful {
            format!(
                "stopping: unregistering, then finishing {} open connection(s) within {}s",
                self.shared.conns.len(),
                timeout.as_secs()
            )
        } else {
            "stopping now: open connections are closed".to_string()
        };
        Ok(Response::new(ShutdownResponse {
            success: true,
            message,
            error: None,
        }))
    }

    async fn can_handle(
        &self,
        req: Request<CanHandleRequest>,
    ) -> Result<Response<CanHandleResponse>, Status> {
        let r = req.into_inner();
        let route = r
            .route
            .ok_or_else(|| Status::invalid_argument("route: is required"))?;
        let a = self.shared.module.can_handle(&route, &r.context).await;
        Ok(Response::new(CanHandleResponse {
            can_handle: a.can_handle,
            priority: a.priority,
            reason: a.reason,
            metadata: a.metadata,
        }))
    }

    async fn get_routes(
        &self,
        req: Request<GetRoutesRequest>,
    ) -> Result<Response<GetRoutesResponse>, Status> {
        let r = req.into_inner();
        self.this_instance(&r.instance_id)?;
        let routes: Vec<RouteRow> = self
            .shared
            .module
            .routes()
            .into_iter()
            .map(RouteRow)
            .collect();
        let total = routes.len();
        let (page, pagination) = query::apply(routes, r.query.as_ref(), &ROUTE_FIELDS)?;
        Ok(Response::new(GetRoutesResponse {
            routes: page.into_iter().map(|r| r.0).collect(),
            total_routes: i32::try_from(total).unwrap_or(i32::MAX),
            pagination: Some(pagination),
        }))
    }

    async fn update_routes(
        &self,
        req: Request<UpdateRoutesRequest>,
    ) -> Result<Response<UpdateRoutesResponse>, Status> {
        self.authorize(&req, "UpdateRoutes")?;
        let r = req.into_inner();
        self.this_instance(&r.instance_id)?;
        let _one_at_a_time = self.shared.routes_lock.lock().await;
        let before = self.shared.module.routes();
        let n = self
            .shared
            .module
            .update_routes(r.routes, r.replace_all)
            .await
            .map_err(module_error)?;
        let announced = self.announce_or_restore(before).await?;
        Ok(Response::new(UpdateRoutesResponse {
            success: true,
            message: format!(
                "{n} route(s) {}; {announced}",
                if r.replace_all {
                    "now in force"
                } else {
                    "written"
                }
            ),
            routes_updated: i32::try_from(n).unwrap_or(i32::MAX),
            error: None,
        }))
    }

    async fn delete_route(
        &self,
        req: Request<DeleteRouteRequest>,
    ) -> Result<Response<DeleteRouteResponse>, Status> {
        self.authorize(&req, "DeleteRoute")?;
        let r = req.into_inner();
        self.this_instance(&r.instance_id)?;
        let _one_at_a_time = self.shared.routes_lock.lock().await;
        let before = self.shared.module.routes();
        self.shared
            .module
            .delete_route(&r.route_id)
            .await
            .map_err(module_error)?;
        let announced = self.announce_or_restore(before).await?;
        Ok(Response::new(DeleteRouteResponse {
            success: true,
            message: format!("route {} deleted; {announced}", r.route_id),
            error: None,
        }))
    }

    async fn get_rate_limits(
        &self,
        req: Request<GetRateLimitsRequest>,
    ) -> Result<Response<GetRateLimitsResponse>, Status> {
        let r = req.into_inner();
        self.this_instance(&r.instance_id)?;
        let limits = self.shared.ctx.limits.list(&r.target);
        Ok(Response::new(GetRateLimitsResponse {
            total_limits: i32::try_from(limits.len()).unwrap_or(i32::MAX),
            limits,
        }))
    }

    async fn set_rate_limit(
        &self,
        req: Request<SetRateLimitRequest>,
    ) -> Result<Response<SetRateLimitResponse>, Status> {
        self.authorize(&req, "SetRateLimit")?;
        let r = req.into_inner();
        self.this_instance(&r.instance_id)?;
        let limit = r
            .limit
            .ok_or_else(|| Status::invalid_argument("limit: is required"))?;
        let stored = self.shared.ctx.limits.set(limit).map_err(|e| match e {
            crate::ratelimit::LimitError::TooMany { .. } => {
                Status::resource_exhausted(e.to_string())
            }
            e => Status::invalid_argument(e.to_string()),
        })?;
        Ok(Response::new(SetRateLimitResponse {
            success: true,
            message: format!(
                "rate limit {} on {:?} {}",
                stored.limit_id,
                stored.target,
                if stored.enabled {
                    "in force"
                } else {
                    "stored, disabled"
                }
            ),
            error: None,
        }))
    }

    async fn remove_rate_limit(
        &self,
        req: Request<RemoveRateLimitRequest>,
    ) -> Result<Response<RemoveRateLimitResponse>, Status> {
        self.authorize(&req, "RemoveRateLimit")?;
        let r = req.into_inner();
        self.this_instance(&r.instance_id)?;
        if !self.shared.ctx.limits.remove(&r.limit_id) {
            return Err(Status::not_found(format!("no rate limit {:?}", r.limit_id)));
        }
        Ok(Response::new(RemoveRateLimitResponse {
            success: true,
            message: format!("rate limit {} removed", r.limit_id),
            error: None,
        }))
    }

    async fn get_metrics(
        &self,
        req: Request<GetMetricsRequest>,
    ) -> Result<Response<GetMetricsResponse>, Status> {
        let r = req.into_inner();
        self.this_instance(&r.instance_id)?;
        let metrics = crate::telemetry::module_metrics(&self.shared, &r.metric_names);
        Ok(Response::new(GetMetricsResponse {
            collected_at: metrics.collected_at,
            metrics: Some(metrics),
        }))
    }

    async fn scale(&self, req: Request<ScaleRequest>) -> Result<Response<ScaleResponse>, Status> {
        self.authorize(&req, "Scale")?;
        let r = req.into_inner();
        self.this_instance(&r.instance_id)?;
        let config = r
            .config
            .ok_or_else(|| Status::invalid_argument("config: is required"))?;
        scale::validate(&config).map_err(module_error)?;
        let Some(scaler) = &self.shared.scaler else {
            return Err(Status::failed_precondition(format!(
                "module {} ({}) has no scaler (scaling.backend is none), so it cannot start \
                 or stop instances of itself: set scaling.backend (MODULE_SCALING_BACKEND) to \
                 docker (with the Docker socket mounted) or kubernetes (with \
                 scaling.kubernetes.deployment), or scale it with what runs it \
                 (docker compose up --scale, kubectl scale); see Scaling in docs/modules.md",
                self.shared.ctx.instance_id, self.shared.descriptor.name
            )));
        };
        let out = scaler
            .scale(&config, r.immediate)
            .await
            .map_err(module_error)?;
        Ok(Response::new(ScaleResponse {
            success: true,
            message: format!(
                "scaling from {} to {} instance(s)",
                out.current_instances, out.desired_instances
            ),
            current_instances: out.current_instances,
            desired_instances: out.desired_instances,
            error: None,
        }))
    }

    async fn get_instances(
        &self,
        req: Request<GetInstancesRequest>,
    ) -> Result<Response<GetInstancesResponse>, Status> {
        let r = req.into_inner();
        let mut all = vec![self.shared.instance()];
        if let Some(scaler) = &self.shared.scaler {
            let me = self.shared.ctx.instance_id.clone();
            all.extend(
                scaler
                    .instances()
                    .await
                    .into_iter()
                    .filter(|i| i.instance_id != me),
            );
        }
        let instances: Vec<ModuleInstance> = all
            .into_iter()
            .filter(|i| r.module_type == 0 || i.module_type == r.module_type)
            .filter(|i| r.status_filter == 0 || i.health_status == r.status_filter)
            .collect();
        Ok(Response::new(GetInstancesResponse {
            total_instances: i32::try_from(instances.len()).unwrap_or(i32::MAX),
            instances,
        }))
    }

    async fn set_traffic_weight(
        &self,
        req: Request<SetTrafficWeightRequest>,
    ) -> Result<Response<SetTrafficWeightResponse>, Status> {
        self.authorize(&req, "SetTrafficWeight")?;
        let r = req.into_inner();
        self.this_instance(&r.instance_id)?;
        let current = {
            let mut v = self.shared.versions.lock();
            v.set_weight(&r.version, r.weight).map_err(version_error)?;
            v.blue_green()
        };
        Ok(Response::new(SetTrafficWeightResponse {
            success: true,
            message: format!(
                "version {} at {}% ({} {}%, {} {}%)",
                r.version,
                r.weight,
                current.blue_version,
                current.blue_weight,
                if current.green_version.is_empty() {
                    "-"
                } else {
                    &current.green_version
                },
                current.green_weight
            ),
            current_config: Some(current),
            error: None,
        }))
    }

    async fn get_active_version(
        &self,
        req: Request<GetActiveVersionRequest>,
    ) -> Result<Response<GetActiveVersionResponse>, Status> {
        self.this_instance(&req.get_ref().instance_id)?;
        let v = self.shared.versions.lock();
        Ok(Response::new(GetActiveVersionResponse {
            active_version: v.active().to_string(),
            config: Some(v.blue_green()),
            version_weights: v.weights().iter().map(|(k, w)| (k.clone(), *w)).collect(),
        }))
    }

    async fn rollback(
        &self,
        req: Request<RollbackRequest>,
    ) -> Result<Response<RollbackResponse>, Status> {
        self.authorize(&req, "Rollback")?;
        let r = req.into_inner();
        self.this_instance(&r.instance_id)?;
        let (previous, current) = self
            .shared
            .versions
            .lock()
            .rollback(&r.target_version)
            .map_err(version_error)?;
        Ok(Response::new(RollbackResponse {
            success: true,
            message: format!("rolled back from {previous} to {current}: {current} takes 100%"),
            previous_version: previous,
            current_version: current,
            error: None,
        }))
    }

    async fn promote_version(
        &self,
        req: Request<PromoteVersionRequest>,
    ) -> Result<Response<PromoteVersionResponse>, Status> {
        self.authorize(&req, "PromoteVersion")?;
        let r = req.into_inner();
        self.this_instance(&r.instance_id)?;
        let p = self
            .shared
            .versions
            .lock()
            .promote(&r.version, r.immediate, r.promotion_rate)
            .map_err(version_error)?;
        Ok(Response::new(PromoteVersionResponse {
            success: true,
            message: if p.completed {
                format!("{} is the active version at 100%", p.version)
            } else {
                format!("{} now takes {}%", p.version, p.weight)
            },
            promoted_version: p.version,
            error: None,
        }))
    }

    async fn health_check(
        &self,
        req: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let r = req.into_inner();
        self.this_instance(&r.instance_id)?;
        let (status, message, checks) = self.health(r.deep_check).await;
        Ok(Response::new(HealthCheckResponse {
            status: status as i32,
            message,
            checks,
            checked_at: Some(shared_types::time::now()),
        }))
    }

    async fn get_stats(
        &self,
        req: Request<GetStatsRequest>,
    ) -> Result<Response<GetStatsResponse>, Status> {
        if req.get_ref().reset_counters {
            self.authorize(&req, "GetStats(reset_counters)")?;
        }
        let r = req.into_inner();
        self.this_instance(&r.instance_id)?;
        let s = &self.shared;
        let mut stats = if r.reset_counters {
            s.ctx.stats.snapshot_and_reset(&s.ctx.instance_id)
        } else {
            s.ctx.stats.snapshot(&s.ctx.instance_id)
        };
        stats.custom_stats = s.module.custom_stats();
        for c in s.ctx.limits.counters() {
            stats.custom_stats.insert(
                format!("rate_limit.{}.admitted", c.limit_id),
                c.admitted.to_string(),
            );
            stats.custom_stats.insert(
                format!("rate_limit.{}.refused", c.limit_id),
                c.refused.to_string(),
            );
        }
        Ok(Response::new(GetStatsResponse { stats: Some(stats) }))
    }

    async fn stream_metrics(
        &self,
        req: Request<StreamMetricsRequest>,
    ) -> Result<Response<MetricsStream>, Status> {
        let r = req.into_inner();
        self.this_instance(&r.instance_id)?;
        let every = if r.interval_seconds > 0 {
            Duration::from_secs(r.interval_seconds as u64)
        } else {
            DEFAULT_STREAM_INTERVAL
        };
        let shared = self.shared.clone();
        let names = r.metric_names;
        let ticker = tokio::time::interval(every);
        // The stream ends when the module starts to stop, so it never holds
        // the shutdown up.
        let mut phase = self.shared.phase_changes();
        let stopping = async move {
            let _ = phase
                .wait_for(|p| matches!(p, Phase::Draining { .. } | Phase::Stopped))
                .await;
        };
        let stream = futures::stream::unfold(
            (ticker, shared, names),
            |(mut ticker, shared, names)| async move {
                ticker.tick().await;
                let metrics = crate::telemetry::module_metrics(&shared, &names);
                let item = StreamMetricsResponse {
                    timestamp: metrics.collected_at,
                    metrics: Some(metrics),
                };
                Some((Ok(item), (ticker, shared, names)))
            },
        );
        Ok(Response::new(Box::pin(futures::StreamExt::take_until(
            stream, stopping,
        ))))
    }

    async fn get_config(
        &self,
        req: Request<GetConfigRequest>,
    ) -> Result<Response<GetConfigResponse>, Status> {
        let r = req.into_inner();
        self.this_instance(&r.instance_id)?;
        let sections = self.shared.module.config();
        let known: Vec<String> = sections.iter().map(|s| s.config_type.clone()).collect();
        let configs: Vec<ConfigUpdate> = sections
            .into_iter()
            .filter(|s| r.config_type.is_empty() || s.config_type == r.config_type)
            .map(|s| ConfigUpdate {
                config_id: format!("{}/{}", self.shared.ctx.instance_id, s.config_type),
                checksum: hex::encode(Sha256::digest(&s.data)),
                config_type: s.config_type,
                config_data: s.data,
                updated_at: None,
                metadata: HashMap::new(),
            })
            .collect();
        if configs.is_empty() && !r.config_type.is_empty() {
            return Err(Status::not_found(format!(
                "module {} has no config section {:?} (it has: {})",
                self.shared.descriptor.name,
                r.config_type,
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )));
        }
        Ok(Response::new(GetConfigResponse {
            configs,
            last_updated: Some(shared_types::time::now()),
        }))
    }

    async fn update_config(
        &self,
        req: Request<UpdateConfigRequest>,
    ) -> Result<Response<UpdateConfigResponse>, Status> {
        if !req.get_ref().validate_only {
            self.authorize(&req, "UpdateConfig")?;
        }
        let r = req.into_inner();
        self.this_instance(&r.instance_id)?;
        let c = r
            .config
            .ok_or_else(|| Status::invalid_argument("config: is required"))?;
        if c.config_type.is_empty() {
            return Err(Status::invalid_argument("config.config_type: is empty"));
        }
        if !c.checksum.is_empty() {
            let got = hex::encode(Sha256::digest(&c.config_data));
            if !got.eq_ignore_ascii_case(c.checksum.trim()) {
                return Err(Status::invalid_argument(format!(
                    "config.checksum {} does not match the SHA-256 of config_data ({got})",
                    c.checksum
                )));
            }
        }
        let result = self
            .shared
            .module
            .update_config(&c.config_type, &c.config_data, r.validate_only)
            .await;
        Ok(Response::new(match result {
            Ok(()) => UpdateConfigResponse {
                success: true,
                message: if r.validate_only {
                    format!("section {} is valid; nothing changed", c.config_type)
                } else {
                    format!("section {} applied", c.config_type)
                },
                validation_passed: true,
                validation_errors: Vec::new(),
                error: None,
            },
            Err(errors) => UpdateConfigResponse {
                success: false,
                message: format!(
                    "section {} was refused; the config in force stays: {}",
                    c.config_type,
                    errors.join("; ")
                ),
                validation_passed: false,
                error: error(StatusCode::InvalidArgument, &errors.join("; ")),
                validation_errors: errors,
            },
        }))
    }
}
