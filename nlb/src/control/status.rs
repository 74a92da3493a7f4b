//! CheckHealth, GetNLBStatus, UpdateNLBConfig, GetNLBConfig.

use std::collections::HashMap;
use std::time::Duration;

use sha2::{Digest, Sha256};
use shared_types::pb::{self, HealthStatus, ModuleType};
use shared_types::time::{from_system, from_unix_millis, now};
use tonic::Status;

use super::module_client::request;
use super::ControlService;
use crate::app::Census;
use crate::config::{requires_restart, section_value, SECTIONS};

/// Lowercase hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

impl ControlService {
    pub(super) async fn check_health(
        &self,
        req: pb::CheckHealthRequest,
    ) -> Result<pb::CheckHealthResponse, Status> {
        let views = self.nlb.registry.list();
        let (mut status, checks) = self.nlb.own_status(&Census::of(&views));
        let mut checks: HashMap<String, String> = checks.into_iter().collect();
        let mut module_health: HashMap<String, i32> = views
            .into_iter()
            .map(|v| (v.instance.instance_id, v.instance.health_status))
            .collect();
        if req.deep_check || req.check_modules {
            let deadline =
                Duration::from_millis(self.nlb.config.current().routing.module_call_timeout_ms);
            let targets = self
                .nlb
                .module_addresses(ModuleType::Unspecified)
                .into_iter()
                .map(|(id, addr, _)| (id, addr))
                .collect();
            let results = self
                .nlb
                .modules
                .fan_out(targets, deadline, |id, mut c| {
                    let msg = pb::HealthCheckRequest {
                        instance_id: id,
                        deep_check: req.deep_check,
                    };
                    async move { c.health_check(request(msg, deadline)).await }
                })
                .await;
            let mut failing = 0;
            for (id, r) in results {
                let (s, text) = match r {
                    Ok(h) => {
                        let s = HealthStatus::from_wire(h.status).unwrap_or_default();
                        (s, format!("{s}: {}", h.message))
                    }
                    // Like the active checks: a module that does not serve
                    // HealthCheck is judged by its heartbeats (the registry's view).
                    Err(e) if e.code() == tonic::Code::Unimplemented => (
                        module_health
                            .get(&id)
                            .and_then(|s| HealthStatus::from_wire(*s))
                            .unwrap_or_default(),
                        "HealthCheck not implemented; judged by heartbeats".to_string(),
                    ),
                    Err(e) => (
                        HealthStatus::Unhealthy,
                        format!("unreachable: {}", e.message()),
                    ),
                };
                if !matches!(s, HealthStatus::Healthy | HealthStatus::Degraded) {
                    failing += 1;
                }
                module_health.insert(id.clone(), s as i32);
                checks.insert(format!("module.{id}"), text);
            }
            if failing > 0 && status == HealthStatus::Healthy {
                status = HealthStatus::Degraded;
            }
        }
        let message = match status {
            HealthStatus::Healthy => "the NLB and its modules are healthy".to_string(),
            HealthStatus::Degraded => {
                "the NLB serves, but some instances are unhealthy or the state file cannot be written".to_string()
            }
            HealthStatus::Stopping => "the NLB is shutting down".to_string(),
            other => format!("the NLB is {other}"),
        };
        Ok(pb::CheckHealthResponse {
            status: status as i32,
            message,
            module_health,
            checks,
            checked_at: Some(now()),
        })
    }

    pub(super) async fn get_nlb_status(
        &self,
        req: pb::GetNlbStatusRequest,
    ) -> Result<pb::GetNlbStatusResponse, Status> {
        let views = self.nlb.registry.list();
        let census = Census::of(&views);
        let (status, checks) = self.nlb.own_status(&census);
        let config = self.nlb.config.current();
        let mut details: HashMap<String, String> = checks.into_iter().collect();
        details.insert("grpc_listen".into(), config.grpc.listen.clone());
        if let Some((grpc, admin)) = self.nlb.bound.get() {
            details.insert("grpc_address".into(), grpc.to_string());
            details.insert("admin_address".into(), admin.to_string());
        }
        details.insert("admin_listen".into(), config.admin.listen.clone());
        let security = &self.nlb.security;
        details.insert(
            "auth".into(),
            if security.auth.enabled() { "on" } else { "off" }.into(),
        );
        for (key, tls) in [
            ("grpc_tls", security.grpc_tls.get()),
            ("admin_tls", security.admin_tls.get()),
        ] {
            let v = match tls {
                Some(t) if t.requires_client_cert() => "mutual",
                Some(_) => "on",
                None => "off",
            };
            details.insert(key.into(), v.into());
        }
        details.insert(
            "config_file".into(),
            self.nlb
                .config
                .file_path()
                .map_or_else(|| "(none: defaults)".into(), |p| p.display().to_string()),
        );
        details.insert(
            "uptime_seconds".into(),
            self.nlb
                .started_at
                .elapsed()
                .unwrap_or_default()
                .as_secs()
                .to_string(),
        );
        Ok(pb::GetNlbStatusResponse {
            status: status as i32,
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: Some(from_system(self.nlb.started_at)),
            total_requests: self
                .nlb
                .total_requests
                .load(std::sync::atomic::Ordering::Relaxed) as i64,
            active_connections: census.active_connections,
            registered_modules: views.len() as i32,
            modules_by_type: census.by_type,
            modules: if req.include_modules {
                views.into_iter().map(|v| v.instance).collect()
            } else {
                Vec::new()
            },
            details,
        })
    }

    pub(super) async fn update_nlb_config(
        &self,
        req: pb::UpdateNlbConfigRequest,
    ) -> Result<pb::UpdateNlbConfigResponse, Status> {
        let c = req
            .config
            .ok_or_else(|| Status::invalid_argument("config: is required"))?;
        let section = c.config_type.trim();
        if section.is_empty() {
            return Err(Status::invalid_argument(format!(
                "config.config_type: is empty (one of: {})",
                SECTIONS.join(", ")
            )));
        }
        if !c.checksum.is_empty() {
            let got = sha256_hex(&c.config_data);
            if !got.eq_ignore_ascii_case(c.checksum.trim()) {
                return Err(Status::invalid_argument(format!(
                    "config.checksum: {} does not match the SHA-256 of config_data ({got})",
                    c.checksum
                )));
            }
        }
        let text = std::str::from_utf8(&c.config_data)
            .map_err(|_| Status::invalid_argument("config.config_data: is not UTF-8 text"))?;
        let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).map_err(|e| {
            Status::invalid_argument(format!("config.config_data: not valid YAML or JSON: {e}"))
        })?;
        // Saving fsyncs the state file: keep it off the async workers.
        let nlb = std::sync::Arc::clone(&self.nlb);
        let (owned, validate_only) = (section.to_string(), req.validate_only);
        let outcome = tokio::task::spawn_blocking(move || {
            nlb.config.update_section(&owned, value, validate_only)
        })
        .await
        .map_err(|e| Status::internal(format!("config update task failed: {e}")))?;
        match outcome {
            Ok(change) => {
                let result = if req.validate_only {
                    "validated"
                } else {
                    "applied"
                };
                self.nlb
                    .metrics
                    .config_updates
                    .with_label_values(&[result])
                    .inc();
                if !req.validate_only {
                    self.nlb.apply_config();
                    tracing::info!(
                        section,
                        changed = change.changed,
                        requires_restart = change.requires_restart,
                        "config section updated"
                    );
                }
                let message = match (req.validate_only, change.changed, change.requires_restart) {
                    (true, _, _) => format!("section {section} is valid"),
                    (false, false, _) => format!("section {section} unchanged"),
                    (false, true, true) => {
                        format!("section {section} saved; it takes effect after a restart")
                    }
                    (false, true, false) => format!("section {section} applied"),
                };
                Ok(pb::UpdateNlbConfigResponse {
                    success: true,
                    message,
                    validation_passed: true,
                    validation_errors: Vec::new(),
                    requires_restart: change.requires_restart,
                    error: None,
                })
            }
            Err(crate::config::UpdateError::Persist(e)) => {
                self.nlb
                    .metrics
                    .config_updates
                    .with_label_values(&["refused"])
                    .inc();
                tracing::error!(error = %e, section, "config change not saved");
                Err(Status::unavailable(format!("section {section}: {e}")))
            }
            Err(crate::config::UpdateError::Invalid(errors)) => {
                self.nlb
                    .metrics
                    .config_updates
                    .with_label_values(&["refused"])
                    .inc();
                let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
                if req.validate_only {
                    Ok(pb::UpdateNlbConfigResponse {
                        success: false,
                        message: format!("section {section} is not valid"),
                        validation_passed: false,
                        error: Some(pb::Error::new(
                            pb::StatusCode::InvalidArgument,
                            errors.join("; "),
                        )),
                        validation_errors: errors,
                        requires_restart: false,
                    })
                } else {
                    Err(Status::invalid_argument(errors.join("; ")))
                }
            }
        }
    }

    pub(super) async fn get_nlb_config(
        &self,
        req: pb::GetNlbConfigRequest,
    ) -> Result<pb::GetNlbConfigResponse, Status> {
        let wanted: Vec<&str> = if req.config_type.trim().is_empty() {
            SECTIONS.to_vec()
        } else if let Some(s) = SECTIONS.iter().find(|s| **s == req.config_type.trim()) {
            vec![*s]
        } else {
            return Err(Status::invalid_argument(format!(
                "config_type: unknown section {:?} (known: {})",
                req.config_type,
                SECTIONS.join(", ")
            )));
        };
        let config = self.nlb.config.current();
        let api = self.nlb.config.api_sections();
        let updated_ms = self.nlb.config.updated_at_ms();
        let updated = if updated_ms > 0 {
            from_unix_millis(updated_ms)
        } else {
            from_system(self.nlb.started_at)
        };
        let mut configs = Vec::new();
        for s in wanted {
            let value = section_value(&config, s).unwrap_or(serde_yaml_ng::Value::Null);
            let data = serde_yaml_ng::to_string(&value)
                .map_err(|e| Status::internal(format!("section {s} does not serialize: {e}")))?
                .into_bytes();
            let source = if api.iter().any(|a| a == s) {
                "api"
            } else {
                "file"
            };
            configs.push(pb::ConfigUpdate {
                config_id: s.to_string(),
                config_type: s.to_string(),
                checksum: sha256_hex(&data),
                config_data: data,
                updated_at: Some(from_unix_millis(self.nlb.config.section_updated_ms(s))),
                metadata: [
                    ("source".to_string(), source.to_string()),
                    ("format".to_string(), "yaml".to_string()),
                    (
                        "requires_restart".to_string(),
                        requires_restart(s).to_string(),
                    ),
                ]
                .into(),
            });
        }
        Ok(pb::GetNlbConfigResponse {
            configs,
            last_updated: Some(updated),
        })
    }
}
