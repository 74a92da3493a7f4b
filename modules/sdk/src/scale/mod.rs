//! `Scale` goes to a pluggable [`Scaler`]: whatever can add or remove
//! instances of this module where it runs. The SDK has two, chosen by the
//! `scaling:` config section ([`from_config`]): [`docker`] (containers of
//! the module's compose service, through the Docker Engine API) and
//! [`kubernetes`] (the replicas of the module's Deployment). A module's
//! `main` may give its own instead. Without one, `Scale` answers
//! FAILED_PRECONDITION.

pub mod docker;
pub mod http;
pub mod kubernetes;

use std::sync::Arc;

use shared_types::pb::{ModuleInstance, ScalingConfig};

use crate::config::ScalingSettings;
use crate::module::ModuleError;

/// What a scaling request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScaleOutcome {
    pub current_instances: i32,
    pub desired_instances: i32,
}

#[tonic::async_trait]
pub trait Scaler: Send + Sync + 'static {
    /// Applies a scaling config (validated by the SDK: 0 ≤ min ≤ max,
    /// percents within 0-100; min = max = 0 is scaling to zero). `immediate`
    /// skips any cooldown.
    async fn scale(
        &self,
        config: &ScalingConfig,
        immediate: bool,
    ) -> Result<ScaleOutcome, ModuleError>;

    /// Other instances of this module the scaler runs, for `GetInstances`.
    async fn instances(&self) -> Vec<ModuleInstance> {
        Vec::new()
    }

    /// The NLB's heartbeat says `should_scale` with this many instances
    /// desired (a `TriggerScaling` target).
    async fn desired(&self, _instances: i32) {}

    /// The name announced in the registration capabilities
    /// (`scaler=<backend>`).
    fn backend(&self) -> &str {
        "custom"
    }
}

/// How many instances a scaling config asks for, given how many there are:
/// `now` brought within `min..=max` (the NLB sends min = max = its target).
pub fn target(config: &ScalingConfig, now: i32) -> i32 {
    now.clamp(
        config.min_instances,
        config.max_instances.max(config.min_instances),
    )
}

/// The scaler the `scaling:` section chooses (`None` for `none`). `env`
/// looks up the variables a backend reads (`KUBERNETES_SERVICE_HOST`); the
/// error names the key to fix.
pub fn from_config(
    settings: &ScalingSettings,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Arc<dyn Scaler>>, String> {
    Ok(match settings.backend.as_str() {
        "docker" => Some(Arc::new(docker::DockerScaler::new(
            settings.docker.clone(),
            crate::config::host_name(),
        ))),
        "kubernetes" => Some(Arc::new(kubernetes::KubernetesScaler::from_settings(
            &settings.kubernetes,
            env,
        )?)),
        _ => None,
    })
}

/// Checks a `ScalingConfig` before any scaler sees it.
pub fn validate(c: &ScalingConfig) -> Result<(), ModuleError> {
    let bad = |m: String| Err(ModuleError::Invalid(m));
    if c.min_instances < 0 {
        return bad(format!(
            "config.min_instances {} is negative",
            c.min_instances
        ));
    }
    if c.max_instances < 0 {
        return bad(format!(
            "config.max_instances {} is negative",
            c.max_instances
        ));
    }
    if c.min_instances > c.max_instances {
        return bad(format!(
            "config.min_instances {} is above max_instances {}",
            c.min_instances, c.max_instances
        ));
    }
    for (name, v) in [
        ("target_cpu_percent", c.target_cpu_percent),
        ("target_memory_percent", c.target_memory_percent),
        ("scale_up_threshold", c.scale_up_threshold),
        ("scale_down_threshold", c.scale_down_threshold),
    ] {
        if !(0..=100).contains(&v) {
            return bad(format!("config.{name} {v} is outside 0-100"));
        }
    }
    if c.target_connections < 0 || c.cooldown_seconds < 0 {
        return bad("config.target_connections and cooldown_seconds cannot be negative".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field() {
        let ok = ScalingConfig {
            min_instances: 1,
            max_instances: 3,
            target_cpu_percent: 70,
            ..ScalingConfig::default()
        };
        assert!(validate(&ok).is_ok());
        for (c, field) in [
            (
                ScalingConfig {
                    min_instances: -1,
                    ..ok
                },
                "min_instances",
            ),
            (
                ScalingConfig {
                    max_instances: -1,
                    ..ok
                },
                "max_instances",
            ),
            (
                ScalingConfig {
                    min_instances: 5,
                    ..ok
                },
                "above max_instances",
            ),
            (
                ScalingConfig {
                    target_cpu_percent: 120,
                    ..ok
                },
                "target_cpu_percent",
            ),
            (
                ScalingConfig {
                    cooldown_seconds: -1,
                    ..ok
                },
                "cooldown_seconds",
            ),
        ] {
            let e = validate(&c).unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
    }
}
