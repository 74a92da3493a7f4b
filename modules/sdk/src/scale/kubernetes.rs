//! The Kubernetes scaler: sets the replicas of the module's Deployment
//! through its Scale subresource, with the pod's service account.
//!
//! - `GET /apis/autoscaling/v2/namespaces/{ns}/horizontalpodautoscalers`:
//!   a Deployment an HPA scales is refused (the HPA would undo the NLB);
//! - `GET /apis/apps/v1/namespaces/{ns}/deployments/{name}/scale`;
//! - `PATCH` of the same with `application/merge-patch+json`
//!   `{"spec":{"replicas":N}}`, only when N differs.
//!
//! The bearer token is read from its file at every call (projected
//! service-account tokens rotate); the API server's certificate is checked
//! against the service account's CA.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper::{Method, StatusCode};
use serde::Deserialize;
use shared_types::pb::ScalingConfig;

use super::http::{self, Call, Endpoint, Reply};
use super::{ScaleOutcome, Scaler};
use crate::config::{KubernetesScaling, SERVICE_ACCOUNT_DIR};
use crate::module::ModuleError;

/// How long one API call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

pub struct KubernetesScaler {
    endpoint: Endpoint,
    namespace: String,
    deployment: String,
    token_file: PathBuf,
}

// The few fields read from the API's objects (`autoscaling/v1` Scale,
// `autoscaling/v2` HorizontalPodAutoscalerList, `meta/v1` Status); the
// tests check them against the Kubernetes API types.

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Scale {
    spec: ScaleSpec,
    status: ScaleStatus,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ScaleSpec {
    replicas: i32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ScaleStatus {
    replicas: i32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct HpaList {
    items: Vec<Hpa>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Hpa {
    metadata: Meta,
    spec: HpaSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Meta {
    name: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct HpaSpec {
    scale_target_ref: TargetRef,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct TargetRef {
    api_version: String,
    kind: String,
    name: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Status {
    message: String,
    reason: String,
}

impl KubernetesScaler {
    /// From the `scaling.kubernetes` section: the API address (default: the
    /// in-cluster one from `KUBERNETES_SERVICE_HOST`/`_PORT`), the CA for
    /// https, the namespace (default: the pod's own). The error names the
    /// key to fix.
    pub fn from_settings(
        k: &KubernetesScaling,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        let api = if k.api.is_empty() {
            let host = env("KUBERNETES_SERVICE_HOST").filter(|h| !h.is_empty());
            let port = env("KUBERNETES_SERVICE_PORT").and_then(|p| p.trim().parse::<u16>().ok());
            match (host, port) {
                (Some(h), Some(p)) => format!("https://{}", crate::config::join_host_port(&h, p)),
                _ => {
                    return Err(
                        "scaling.kubernetes.api: empty, and KUBERNETES_SERVICE_HOST and \
                         KUBERNETES_SERVICE_PORT are not set (is this module running in a pod?): \
                         set the API server's https://host:port"
                            .into(),
                    )
                }
            }
        } else {
            k.api.clone()
        };
        let endpoint = Endpoint::from_url(&api, &k.ca_file)
            .map_err(|e| format!("scaling.kubernetes (api {api}, ca_file): {e}"))?;
        let namespace = if k.namespace.is_empty() {
            let file = Path::new(SERVICE_ACCOUNT_DIR).join("namespace");
            crate::config::read_secret(&file).map_err(|e| {
                format!(
                    "scaling.kubernetes.namespace: empty, and the pod's namespace is unknown: {e}"
                )
            })?
        } else {
            k.namespace.clone()
        };
        Ok(Self::new(
            endpoint,
            namespace,
            k.deployment.clone(),
            k.token_file.clone(),
        ))
    }

    pub fn new(
        endpoint: Endpoint,
        namespace: String,
        deployment: String,
        token_file: PathBuf,
    ) -> Self {
        KubernetesScaler {
            endpoint,
            namespace,
            deployment,
            token_file,
        }
    }

    fn scale_path(&self) -> String {
        format!(
            "/apis/apps/v1/namespaces/{}/deployments/{}/scale",
            self.namespace, self.deployment
        )
    }

    fn hpa_path(&self) -> String {
        format!(
            "/apis/autoscaling/v2/namespaces/{}/horizontalpodautoscalers",
            self.namespace
        )
    }

    /// The token, read now: projected tokens are rotated by the kubelet.
    fn token(&self) -> Result<String, ModuleError> {
        crate::config::read_secret(&self.token_file).map_err(|e| {
            ModuleError::Unsupported(format!(
                "the Kubernetes scaler has no service-account token ({e}): mount one \
                 (automountServiceAccountToken) or set scaling.kubernetes.token_file"
            ))
        })
    }

    async fn call(
        &self,
        token: &str,
        method: Method,
        path: String,
        body: Option<Vec<u8>>,
    ) -> Result<Reply, ModuleError> {
        let what = format!("{method} {path}");
        let mut call = Call::new(method, path);
        call.headers
            .push(("authorization", format!("Bearer {token}")));
        call.headers.push(("accept", "application/json".into()));
        call.body = body.map(|b| ("application/merge-patch+json", b));
        let reply = http::send(&self.endpoint, call, CALL_TIMEOUT)
            .await
            .map_err(|e| {
                ModuleError::Unavailable(format!("the Kubernetes API did not answer: {e}"))
            })?;
        if reply.status.is_success() {
            Ok(reply)
        } else {
            Err(self.api_error(&what, &reply))
        }
    }

    /// An error answer as an operator reads it: the API's own message, and
    /// what to do about the usual ones.
    fn api_error(&self, what: &str, reply: &Reply) -> ModuleError {
        let status: Status = serde_json::from_slice(&reply.body).unwrap_or_default();
        let message = if status.message.is_empty() {
            let mut t = reply.text();
            t.truncate(300);
            t
        } else {
            status.message
        };
        let head = format!(
            "the Kubernetes API at {} answered {what} with {}: {message}",
            self.endpoint, reply.status
        );
        match reply.status {
            StatusCode::UNAUTHORIZED => ModuleError::Unsupported(format!(
                "{head} (the token in {} was not accepted)",
                self.token_file.display()
            )),
            StatusCode::FORBIDDEN => ModuleError::Unsupported(format!(
                "{head} (the module's service account needs get and patch on \
                 deployments/scale and list on horizontalpodautoscalers in namespace {}: \
                 see Scaling in docs/modules.md)",
                self.namespace
            )),
            StatusCode::NOT_FOUND => ModuleError::NotFound(format!(
                "{head} (is scaling.kubernetes.deployment {:?} in namespace {} right?)",
                self.deployment, self.namespace
            )),
            s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                ModuleError::Unavailable(head)
            }
            _ => ModuleError::Failed(if status.reason.is_empty() {
                head
            } else {
                format!("{head} ({})", status.reason)
            }),
        }
    }

    /// The HPA that scales this Deployment, if one does.
    async fn owning_hpa(&self, token: &str) -> Result<Option<String>, ModuleError> {
        let reply = match self.call(token, Method::GET, self.hpa_path(), None).await {
            Ok(r) => r,
            // A cluster without autoscaling/v2 has no HPA of that kind.
            Err(ModuleError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let list: HpaList = serde_json::from_slice(&reply.body).map_err(|e| {
            ModuleError::Failed(format!(
                "the Kubernetes API's HorizontalPodAutoscalerList does not parse: {e}"
            ))
        })?;
        Ok(list
            .items
            .into_iter()
            .find(|h| {
                let t = &h.spec.scale_target_ref;
                t.kind == "Deployment"
                    && t.name == self.deployment
                    && (t.api_version.is_empty() || t.api_version.starts_with("apps/"))
            })
            .map(|h| h.metadata.name))
    }

    fn parse_scale(reply: &Reply) -> Result<Scale, ModuleError> {
        serde_json::from_slice(&reply.body).map_err(|e| {
            ModuleError::Failed(format!("the Kubernetes API's Scale does not parse: {e}"))
        })
    }
}

#[tonic::async_trait]
impl Scaler for KubernetesScaler {
    async fn scale(
        &self,
        config: &ScalingConfig,
        _immediate: bool,
    ) -> Result<ScaleOutcome, ModuleError> {
        let token = self.token()?;
        let who = format!("Deployment {}/{}", self.namespace, self.deployment);
        if let Some(hpa) = self.owning_hpa(&token).await? {
            return Err(ModuleError::Unsupported(format!(
                "{who} is scaled by its HPA {hpa:?}; delete the HPA to hand it to the NLB"
            )));
        }
        let now = Self::parse_scale(
            &self
                .call(&token, Method::GET, self.scale_path(), None)
                .await?,
        )?;
        let want = super::target(config, now.spec.replicas);
        if want == now.spec.replicas {
            return Ok(ScaleOutcome {
                current_instances: now.status.replicas,
                desired_instances: want,
            });
        }
        let patch = serde_json::json!({"spec": {"replicas": want}}).to_string();
        let after = Self::parse_scale(
            &self
                .call(
                    &token,
                    Method::PATCH,
                    self.scale_path(),
                    Some(patch.into_bytes()),
                )
                .await?,
        )?;
        tracing::info!(
            deployment = %who,
            from = now.spec.replicas,
            to = after.spec.replicas,
            running = after.status.replicas,
            "scaled the Deployment"
        );
        Ok(ScaleOutcome {
            current_instances: after.status.replicas,
            desired_instances: after.spec.replicas,
        })
    }

    fn backend(&self) -> &str {
        "kubernetes"
    }
}

#[cfg(test)]
mod tests;
