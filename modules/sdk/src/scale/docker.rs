//! The Docker scaler: instances are containers of the module's compose
//! service, made and removed through the Docker Engine API on its unix
//! socket.
//!
//! - The service's containers are those labelled
//!   `com.docker.compose.project=P` and `com.docker.compose.service=S`
//!   (by default the labels of the container this module runs in, found by
//!   its host name, which Docker sets to the container id).
//! - Scaling up copies a running container (this one when it is of the
//!   service): image, command, environment, labels (with the next free
//!   `com.docker.compose.container-number`), host config (mounts, restart
//!   policy, network mode; published host ports become ephemeral) and
//!   networks, with the service name as an alias. The copies register with
//!   the NLB by themselves, and `docker compose down` removes them with the
//!   rest of the project.
//! - Scaling down stops the newest running containers (never the one the
//!   scaler runs in) with `stop_timeout_seconds`: Docker sends SIGTERM, the
//!   SDK in them unregisters and drains, then they are removed.
//!
//! `Scale` answers once the work is done, or after [`ANSWER_WITHIN`] with
//! the work going on (a drain takes as long as it takes); what fails after
//! the answer is logged. One scaling at a time: another `Scale` meanwhile is
//! UNAVAILABLE.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use shared_types::pb::ScalingConfig;
use tokio::sync::OnceCell;

use super::http::{self, query_escape, Call, Endpoint, Reply};
use super::{ScaleOutcome, Scaler};
use crate::config::DockerScaling;
use crate::module::ModuleError;

/// The Engine API version the scaler speaks (Docker 20.10 and later).
pub const API_VERSION: &str = "v1.41";
/// How long `Scale` waits for the work before it answers with the work
/// still going on (the NLB's module calls time out after 2 s by default).
pub const ANSWER_WITHIN: Duration = Duration::from_millis(1500);
/// One API call, other than a stop (which waits for the drain).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

pub const PROJECT_LABEL: &str = "com.docker.compose.project";
pub const SERVICE_LABEL: &str = "com.docker.compose.service";
pub const NUMBER_LABEL: &str = "com.docker.compose.container-number";
const ONEOFF_LABEL: &str = "com.docker.compose.oneoff";
/// Marks the containers the scaler made.
pub const SCALED_BY_LABEL: &str = "io.switchyard.scaled-by";

pub struct DockerScaler {
    inner: Arc<Inner>,
}

struct Inner {
    settings: DockerScaling,
    endpoint: Endpoint,
    host_name: String,
    service: OnceCell<Service>,
    busy: Arc<tokio::sync::Mutex<()>>,
}

/// The compose service scaled, and the container the scaler runs in.
#[derive(Debug, Clone)]
struct Service {
    project: String,
    name: String,
    own_id: Option<String>,
}

impl std::fmt::Display for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "compose service {}/{}", self.project, self.name)
    }
}

/// A container as `GET /containers/json` lists it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
struct Summary {
    id: String,
    names: Vec<String>,
    labels: BTreeMap<String, String>,
    state: String,
    created: i64,
}

impl Summary {
    fn name(&self) -> &str {
        self.names
            .first()
            .map_or(self.id.as_str(), |n| n.trim_start_matches('/'))
    }

    fn number(&self) -> Option<u32> {
        self.labels.get(NUMBER_LABEL)?.parse().ok()
    }

    fn running(&self) -> bool {
        self.state == "running"
    }
}

/// What a scaling will do.
enum Plan {
    Nothing,
    /// Copies of `template` (its inspect JSON) named and numbered.
    Up {
        template: Value,
        new: Vec<(String, u32)>,
    },
    /// Containers to stop and remove, newest first: (id, name).
    Down {
        victims: Vec<(String, String)>,
    },
}

impl DockerScaler {
    /// `host_name` finds the container the scaler runs in (Docker sets a
    /// container's host name to its short id).
    pub fn new(settings: DockerScaling, host_name: String) -> Self {
        let endpoint = endpoint(&settings.socket);
        DockerScaler {
            inner: Arc::new(Inner {
                settings,
                endpoint,
                host_name,
                service: OnceCell::new(),
                busy: Arc::new(tokio::sync::Mutex::new(())),
            }),
        }
    }
}

#[tonic::async_trait]
impl Scaler for DockerScaler {
    async fn scale(
        &self,
        config: &ScalingConfig,
        _immediate: bool,
    ) -> Result<ScaleOutcome, ModuleError> {
        let inner = &self.inner;
        let guard = inner.busy.clone().try_lock_owned().map_err(|_| {
            ModuleError::Unavailable(
                "a scaling of this module's containers is still under way (containers \
                 draining); ask again when it is done"
                    .into(),
            )
        })?;
        let service = inner.service().await?;
        let (plan, outcome) = inner.plan(&service, config).await?;
        if matches!(plan, Plan::Nothing) {
            return Ok(outcome);
        }
        let worker = inner.clone();
        let mut task = tokio::spawn(async move {
            let _one_at_a_time = guard;
            let r = worker.execute(&service, plan).await;
            if let Err(e) = &r {
                tracing::error!(%service, error = %e, "scaling failed");
            }
            r
        });
        match tokio::time::timeout(ANSWER_WITHIN, &mut task).await {
            Ok(Ok(r)) => r.map(|()| outcome),
            Ok(Err(e)) => Err(ModuleError::Failed(format!("the scaling task failed: {e}"))),
            // Still at it (a drain): the answer says where it is going.
            Err(_) => Ok(outcome),
        }
    }

    fn backend(&self) -> &str {
        "docker"
    }
}

impl Inner {
    async fn call(&self, call: Call<'_>, timeout: Duration) -> Result<Reply, ModuleError> {
        http::send(&self.endpoint, call, timeout)
            .await
            .map_err(|e| {
                ModuleError::Unavailable(format!(
                    "the Docker Engine API did not answer ({e}); is scaling.docker.socket \
                 mounted into this container?"
                ))
            })
    }

    /// A call that must succeed with one of `ok`; the error carries
    /// Docker's message.
    async fn expect(
        &self,
        call: Call<'_>,
        ok: &[StatusCode],
        timeout: Duration,
    ) -> Result<Reply, ModuleError> {
        let what = format!("{} {}", call.method, call.path);
        let reply = self.call(call, timeout).await?;
        if ok.contains(&reply.status) {
            return Ok(reply);
        }
        let message = serde_json::from_slice::<Value>(&reply.body)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| reply.text());
        let text = format!(
            "the Docker Engine API answered {what} with {}: {message}",
            reply.status
        );
        Err(match reply.status {
            StatusCode::NOT_FOUND => ModuleError::NotFound(text),
            StatusCode::CONFLICT => ModuleError::Unsupported(text),
            s if s.is_server_error() => ModuleError::Unavailable(text),
            _ => ModuleError::Failed(text),
        })
    }

    fn path(rest: &str) -> String {
        format!("/{API_VERSION}{rest}")
    }

    /// The compose service (from the settings, else from this container's
    /// labels), found once.
    async fn service(&self) -> Result<Service, ModuleError> {
        self.service
            .get_or_try_init(|| self.find_service())
            .await
            .cloned()
    }

    async fn find_service(&self) -> Result<Service, ModuleError> {
        let s = &self.settings;
        let own = self
            .expect(
                Call::new(
                    Method::GET,
                    Self::path(&format!(
                        "/containers/{}/json",
                        query_escape(&self.host_name)
                    )),
                ),
                &[StatusCode::OK],
                CALL_TIMEOUT,
            )
            .await;
        let own = match own {
            Ok(r) => Some(serde_json::from_slice::<Value>(&r.body).map_err(|e| {
                ModuleError::Failed(format!(
                    "the Docker Engine API's container does not parse: {e}"
                ))
            })?),
            Err(ModuleError::NotFound(_)) => None,
            Err(e) => return Err(e),
        };
        let label = |key: &str| {
            own.as_ref()
                .and_then(|o| o["Config"]["Labels"][key].as_str())
                .map(str::to_string)
        };
        let pick = |configured: &str, label_key: &str, setting: &str| {
            if !configured.is_empty() {
                return Ok(configured.to_string());
            }
            label(label_key).filter(|v| !v.is_empty()).ok_or_else(|| {
                ModuleError::Unsupported(format!(
                    "{setting} is empty, and {}: set {setting}",
                    if own.is_some() {
                        format!(
                            "this container ({}) has no {label_key} label (not started by compose?)",
                            self.host_name
                        )
                    } else {
                        format!(
                            "Docker knows no container by this host name ({}), so its compose \
                             labels cannot be read",
                            self.host_name
                        )
                    }
                ))
            })
        };
        let service = Service {
            project: pick(&s.project, PROJECT_LABEL, "scaling.docker.project")?,
            name: pick(&s.service, SERVICE_LABEL, "scaling.docker.service")?,
            own_id: own
                .as_ref()
                .and_then(|o| o["Id"].as_str().map(str::to_string)),
        };
        tracing::info!(%service, own = ?service.own_id, "docker scaler: scaling this service");
        Ok(service)
    }

    /// The service's containers, in every state.
    async fn containers(&self, service: &Service) -> Result<Vec<Summary>, ModuleError> {
        let filters = json!({"label": [
            format!("{PROJECT_LABEL}={}", service.project),
            format!("{SERVICE_LABEL}={}", service.name),
        ]});
        let path = Self::path(&format!(
            "/containers/json?all=1&filters={}",
            query_escape(&filters.to_string())
        ));
        let reply = self
            .expect(
                Call::new(Method::GET, path),
                &[StatusCode::OK],
                CALL_TIMEOUT,
            )
            .await?;
        let mut list: Vec<Summary> = serde_json::from_slice(&reply.body).map_err(|e| {
            ModuleError::Failed(format!(
                "the Docker Engine API's container list does not parse: {e}"
            ))
        })?;
        // One-off containers (`docker compose run`) are not instances.
        list.retain(|c| {
            c.labels
                .get(ONEOFF_LABEL)
                .is_none_or(|v| !v.eq_ignore_ascii_case("true"))
        });
        Ok(list)
    }

    async fn inspect(&self, id: &str) -> Result<Value, ModuleError> {
        let reply = self
            .expect(
                Call::new(Method::GET, Self::path(&format!("/containers/{id}/json"))),
                &[StatusCode::OK],
                CALL_TIMEOUT,
            )
            .await?;
        serde_json::from_slice(&reply.body).map_err(|e| {
            ModuleError::Failed(format!(
                "the Docker Engine API's container does not parse: {e}"
            ))
        })
    }

    async fn plan(
        &self,
        service: &Service,
        config: &ScalingConfig,
    ) -> Result<(Plan, ScaleOutcome), ModuleError> {
        let all = self.containers(service).await?;
        let running: Vec<&Summary> = all.iter().filter(|c| c.running()).collect();
        let now = i32::try_from(running.len()).unwrap_or(i32::MAX);
        let want = super::target(config, now);
        let outcome = |desired| ScaleOutcome {
            current_instances: now,
            desired_instances: desired,
        };
        if want > now {
            let is_own = |c: &&&Summary| Some(&c.id) == service.own_id.as_ref();
            let template = running
                .iter()
                .find(is_own)
                .or_else(|| running.iter().min_by_key(|c| c.number().unwrap_or(u32::MAX)))
                .ok_or_else(|| {
                    ModuleError::Unsupported(format!(
                        "no container of {service} is running to copy: start one with docker compose up"
                    ))
                })?;
            let separator = if template
                .name()
                .starts_with(&format!("{}_{}_", service.project, service.name))
            {
                "_"
            } else {
                "-"
            };
            let used: BTreeSet<u32> = all.iter().filter_map(Summary::number).collect();
            let names: BTreeSet<&str> = all.iter().map(Summary::name).collect();
            let new: Vec<(String, u32)> = (1..)
                .filter(|n| !used.contains(n))
                .map(|n| {
                    (
                        format!(
                            "{}{separator}{}{separator}{n}",
                            service.project, service.name
                        ),
                        n,
                    )
                })
                .filter(|(name, _)| !names.contains(name.as_str()))
                .take((want - now) as usize)
                .collect();
            let template = self.inspect(&template.id).await?;
            return Ok((Plan::Up { template, new }, outcome(want)));
        }
        if want < now {
            let mut others: Vec<&Summary> = running
                .iter()
                .copied()
                .filter(|c| Some(&c.id) != service.own_id.as_ref())
                .collect();
            // Newest first: by creation, then by number.
            others.sort_by_key(|c| std::cmp::Reverse((c.created, c.number().unwrap_or(0))));
            let victims: Vec<(String, String)> = others
                .iter()
                .take((now - want) as usize)
                .map(|c| (c.id.clone(), c.name().to_string()))
                .collect();
            let left = now - victims.len() as i32;
            if left > want {
                tracing::warn!(%service, want, left, "the container the scaler runs in is not stopped: scaled down to {left}");
            }
            return Ok((Plan::Down { victims }, outcome(left)));
        }
        Ok((Plan::Nothing, outcome(want)))
    }

    async fn execute(&self, service: &Service, plan: Plan) -> Result<(), ModuleError> {
        match plan {
            Plan::Nothing => Ok(()),
            Plan::Up { template, new } => {
                for (i, (name, number)) in new.iter().enumerate() {
                    self.start_copy(service, &template, name, *number)
                        .await
                        .map_err(|e| {
                            let made = if i == 0 {
                                String::new()
                            } else {
                                format!(" ({i} of {} made before it)", new.len())
                            };
                            with_message(e, |m| format!("making container {name}{made}: {m}"))
                        })?;
                    tracing::info!(%service, container = %name, "started a new instance");
                }
                Ok(())
            }
            Plan::Down { victims } => {
                let results = futures::future::join_all(
                    victims
                        .iter()
                        .map(|(id, name)| self.stop_and_remove(id, name)),
                )
                .await;
                let errors: Vec<String> = results
                    .into_iter()
                    .filter_map(Result::err)
                    .map(|e| e.to_string())
                    .collect();
                if errors.is_empty() {
                    Ok(())
                } else {
                    Err(ModuleError::Failed(errors.join("; ")))
                }
            }
        }
    }

    /// Creates a copy of `template` numbered `number`, attaches it to the
    /// template's networks and starts it.
    async fn start_copy(
        &self,
        service: &Service,
        template: &Value,
        name: &str,
        number: u32,
    ) -> Result<(), ModuleError> {
        let (body, more_networks) = create_body(template, &service.name, number);
        let mut create = Call::new(
            Method::POST,
            Self::path(&format!("/containers/create?name={}", query_escape(name))),
        );
        create.body = Some(("application/json", body.to_string().into_bytes()));
        let reply = self
            .expect(create, &[StatusCode::CREATED], CALL_TIMEOUT)
            .await?;
        let id = serde_json::from_slice::<Value>(&reply.body)
            .ok()
            .and_then(|v| v["Id"].as_str().map(str::to_string))
            .ok_or_else(|| {
                ModuleError::Failed("the Docker Engine API's create gave no Id".into())
            })?;
        let started = async {
            for network in &more_networks {
                let mut connect = Call::new(
                    Method::POST,
                    Self::path(&format!("/networks/{}/connect", query_escape(network))),
                );
                let body = json!({"Container": id, "EndpointConfig": {"Aliases": [service.name]}});
                connect.body = Some(("application/json", body.to_string().into_bytes()));
                self.expect(connect, &[StatusCode::OK], CALL_TIMEOUT)
                    .await?;
            }
            self.expect(
                Call::new(Method::POST, Self::path(&format!("/containers/{id}/start"))),
                &[StatusCode::NO_CONTENT, StatusCode::NOT_MODIFIED],
                CALL_TIMEOUT,
            )
            .await
        }
        .await;
        if let Err(e) = started {
            // Not left behind half made.
            let _ = self
                .call(
                    Call::new(
                        Method::DELETE,
                        Self::path(&format!("/containers/{id}?force=1&v=1")),
                    ),
                    CALL_TIMEOUT,
                )
                .await;
            return Err(e);
        }
        Ok(())
    }

    /// Stops a container (SIGTERM: it unregisters and drains, for up to
    /// `stop_timeout_seconds`), then removes it with its anonymous volumes.
    async fn stop_and_remove(&self, id: &str, name: &str) -> Result<(), ModuleError> {
        let t = self.settings.stop_timeout_seconds;
        tracing::info!(container = %name, stop_timeout_seconds = t, "stopping an instance (it drains first)");
        self.expect(
            Call::new(
                Method::POST,
                Self::path(&format!("/containers/{id}/stop?t={t}")),
            ),
            &[StatusCode::NO_CONTENT, StatusCode::NOT_MODIFIED],
            Duration::from_secs(t) + CALL_TIMEOUT,
        )
        .await
        .map_err(|e| with_message(e, |m| format!("stopping container {name}: {m}")))?;
        self.expect(
            Call::new(Method::DELETE, Self::path(&format!("/containers/{id}?v=1"))),
            &[StatusCode::NO_CONTENT],
            CALL_TIMEOUT,
        )
        .await
        .map_err(|e| with_message(e, |m| format!("removing container {name}: {m}")))?;
        tracing::info!(container = %name, "removed an instance");
        Ok(())
    }
}

/// The Engine API's address: a unix socket, or `tcp://host:port` (plain
/// HTTP, as a socket proxy serves it).
fn endpoint(socket: &std::path::Path) -> Endpoint {
    let text = socket.to_string_lossy();
    match text
        .strip_prefix("tcp://")
        .and_then(|rest| http::parse_url(&format!("http://{rest}")).ok())
    {
        Some((_, host, port)) => Endpoint::Plain { host, port },
        None => Endpoint::Unix(socket.to_path_buf()),
    }
}

fn with_message(e: ModuleError, f: impl FnOnce(&str) -> String) -> ModuleError {
    match e {
        ModuleError::Invalid(m) => ModuleError::Invalid(f(&m)),
        ModuleError::NotFound(m) => ModuleError::NotFound(f(&m)),
        ModuleError::Unsupported(m) => ModuleError::Unsupported(f(&m)),
        ModuleError::Failed(m) => ModuleError::Failed(f(&m)),
        ModuleError::Unavailable(m) => ModuleError::Unavailable(f(&m)),
    }
}

/// The `POST /containers/create` body for a copy of `template` (its
/// inspect JSON) numbered `number`, and the networks to connect it to after
/// the first (API 1.41 attaches one at create).
pub fn create_body(template: &Value, service: &str, number: u32) -> (Value, Vec<String>) {
    let c = &template["Config"];
    let mut body = Map::new();
    for key in [
        "Image",
        "Env",
        "Cmd",
        "Entrypoint",
        "WorkingDir",
        "User",
        "ExposedPorts",
        "Healthcheck",
        "StopSignal",
        "StopTimeout",
        "Volumes",
        "Tty",
        "OpenStdin",
    ] {
        if !c[key].is_null() {
            body.insert(key.into(), c[key].clone());
        }
    }
    // A fixed instance id or host name would make every copy the same
    // instance: copies get their own (their container id).
    if let Some(env) = body.get_mut("Env").and_then(Value::as_array_mut) {
        env.retain(|e| {
            let name = e.as_str().and_then(|s| s.split('=').next()).unwrap_or("");
            !matches!(name, "MODULE_INSTANCE_ID" | "HOSTNAME")
        });
    }
    let mut labels = c["Labels"].as_object().cloned().unwrap_or_default();
    labels.insert(NUMBER_LABEL.into(), number.to_string().into());
    labels.insert(ONEOFF_LABEL.into(), "False".into());
    labels.insert(SCALED_BY_LABEL.into(), "switchyard-sdk".into());
    body.insert("Labels".into(), Value::Object(labels));

    let mut host = template["HostConfig"].clone();
    // A fixed published port cannot be taken twice: copies get ephemeral ones.
    if let Some(ports) = host["PortBindings"].as_object_mut() {
        for bindings in ports.values_mut() {
            for b in bindings.as_array_mut().into_iter().flatten() {
                b["HostPort"] = "".into();
            }
        }
    }
    body.insert("HostConfig".into(), host);

    let mode = template["HostConfig"]["NetworkMode"].as_str().unwrap_or("");
    let mut networks: Vec<String> = template["NetworkSettings"]["Networks"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    let shared_stack = mode == "host" || mode == "none" || mode.starts_with("container:");
    if shared_stack {
        networks.clear();
    }
    // The network mode's network first: it is the one given at create.
    if let Some(i) = networks.iter().position(|n| n == mode) {
        let first = networks.remove(i);
        networks.insert(0, first);
    }
    let mut more = Vec::new();
    if let Some((first, rest)) = networks.split_first() {
        body.insert(
            "NetworkingConfig".into(),
            json!({"EndpointsConfig": {first.clone(): {"Aliases": [service]}}}),
        );
        more = rest.to_vec();
    }
    (Value::Object(body), more)
}

#[cfg(test)]
mod tests;
