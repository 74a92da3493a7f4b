//! `Scale` goes to a pluggable [`Scaler`]: whatever can add or remove
//! instances of this module where it runs (an orchestrator's API, a compose
//! command). Without one, `Scale` answers FAILED_PRECONDITION.

use shared_types::pb::{ModuleInstance, ScalingConfig};

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
