//! A rollout as the NLB keeps it: what was asked (the spec, validated from
//! `StartRolloutRequest`), where it stands, and what happened (events).
//! Serializable, so it survives a restart; converted to the wire types at
//! the API's edge.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use shared_types::pb::{self, ModuleType};

/// Events kept per rollout (older ones are dropped; sequences go on).
pub const KEPT_EVENTS: usize = 200;

/// Default steps: 10, 25, 50, 100 percent, a minute each.
pub const DEFAULT_STEPS: [(u32, u32); 4] = [(10, 60), (25, 60), (50, 60), (100, 60)];

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// The canary's percent of new connections.
    pub weight: u32,
    pub hold_seconds: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Analysis {
    pub interval_seconds: u32,
    pub min_requests: u64,
    /// 0 = not checked (all four).
    pub max_error_rate: f64,
    pub max_error_rate_increase: f64,
    pub max_p99_latency_ms: f64,
    pub max_p99_latency_ratio: f64,
}

impl Default for Analysis {
    fn default() -> Self {
        Analysis {
            interval_seconds: 10,
            min_requests: 20,
            // Without an analysis block, a canary failing more than 5% of
            // its requests is rolled back; with one, 0 means not checked.
            max_error_rate: 0.05,
            max_error_rate_increase: 0.0,
            max_p99_latency_ms: 0.0,
            max_p99_latency_ratio: 0.0,
        }
    }
}

/// What a rollout was asked to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    /// The type's short name (`alb`), as in config files.
    pub module_type: String,
    pub baseline: String,
    pub canary: String,
    pub steps: Vec<Step>,
    pub analysis: Analysis,
    pub sticky: bool,
    /// A blue/green switch: one step, applied at once, no analysis.
    pub blue_green: bool,
}

impl Spec {
    pub fn module_type(&self) -> ModuleType {
        ModuleType::parse_name(&self.module_type).unwrap_or(ModuleType::Unspecified)
    }

    /// Validates a request; `current_versions` are the versions of the
    /// type's registered instances, for a missing baseline. Errors name the
    /// field.
    pub fn from_request(
        req: &pb::StartRolloutRequest,
        current_versions: &[String],
    ) -> Result<Spec, String> {
        let module_type = ModuleType::from_wire(req.module_type)
            .filter(|t| !matches!(t, ModuleType::Unspecified | ModuleType::Nlb))
            .ok_or_else(|| {
                format!(
                    "module_type: {} is not a module type (alb, dblb, ailb, rtmp)",
                    req.module_type
                )
            })?;
        let (baseline, canary, steps, blue_green) = match &req.blue_green {
            Some(bg) => {
                if !req.steps.is_empty() {
                    return Err(
                        "steps: a blue/green switch has no steps; give blue_green or steps".into(),
                    );
                }
                let weight = if bg.green_weight == 0 && bg.blue_weight == 0 {
                    100
                } else {
                    bg.green_weight
                };
                if !(1..=100).contains(&weight) {
                    return Err(format!(
                        "blue_green.green_weight: {weight} is outside 1-100"
                    ));
                }
                if bg.blue_weight != 0 && bg.blue_weight.checked_add(weight) != Some(100) {
                    return Err(format!(
                        "blue_green: blue_weight {} and green_weight {weight} do not sum to 100",
                        bg.blue_weight
                    ));
                }
                let canary = if bg.green_version.is_empty() {
                    req.canary_version.clone()
                } else {
                    bg.green_version.clone()
                };
                let baseline = if bg.blue_version.is_empty() {
                    req.baseline_version.clone()
                } else {
                    bg.blue_version.clone()
                };
                let step = Step {
                    weight: weight as u32,
                    hold_seconds: 0,
                };
                (baseline, canary, vec![step], true)
            }
            None => {
                let steps = if req.steps.is_empty() {
                    DEFAULT_STEPS
                        .iter()
                        .map(|&(weight, hold_seconds)| Step {
                            weight,
                            hold_seconds,
                        })
                        .collect()
                } else {
                    req.steps
                        .iter()
                        .enumerate()
                        .map(|(i, s)| check_step(i, s))
                        .collect::<Result<Vec<_>, _>>()?
                };
                for (i, w) in steps.windows(2).enumerate() {
                    if w[1].weight <= w[0].weight {
                        return Err(format!(
                            "steps[{}]: canary_weight {} does not rise above steps[{i}]'s {}",
                            i + 1,
                            w[1].weight,
                            w[0].weight
                        ));
                    }
                }
                let steps_len = steps.len();
                if steps_len > 100 {
                    return Err(format!("steps: {steps_len} steps; at most 100"));
                }
                (
                    req.baseline_version.clone(),
                    req.canary_version.clone(),
                    steps,
                    false,
                )
            }
        };
        let canary = canary.trim().to_string();
        check_version("canary_version", &canary)?;
        let baseline = if baseline.trim().is_empty() {
            let others: Vec<&String> = current_versions.iter().filter(|v| **v != canary).collect();
            match others.as_slice() {
                [one] => (*one).clone(),
                [] => {
                    return Err(format!(
                        "baseline_version: no registered {} instance runs a version other than the canary {canary:?}; name the baseline",
                        module_type.short_name()
                    ))
                }
                many => {
                    return Err(format!(
                        "baseline_version: {} instances run several versions ({}); name the baseline",
                        module_type.short_name(),
                        many.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(", ")
                    ))
                }
            }
        } else {
            baseline.trim().to_string()
        };
        check_version("baseline_version", &baseline)?;
        if baseline == canary {
            return Err(format!(
                "canary_version: {canary:?} is also the baseline; a rollout needs two versions"
            ));
        }
        let analysis = check_analysis(req.analysis.as_ref())?;
        Ok(Spec {
            module_type: module_type.short_name().to_string(),
            baseline,
            canary,
            steps,
            analysis,
            sticky: req.sticky,
            blue_green,
        })
    }
}

fn check_step(i: usize, s: &pb::RolloutStep) -> Result<Step, String> {
    if !(1..=100).contains(&s.canary_weight) {
        return Err(format!(
            "steps[{i}].canary_weight: {} is outside 1-100",
            s.canary_weight
        ));
    }
    if !(0..=86_400).contains(&s.hold_seconds) {
        return Err(format!(
            "steps[{i}].hold_seconds: {} is outside 0-86400",
            s.hold_seconds
        ));
    }
    Ok(Step {
        weight: s.canary_weight as u32,
        hold_seconds: s.hold_seconds as u32,
    })
}

fn check_version(field: &str, v: &str) -> Result<(), String> {
    if v.is_empty() {
        return Err(format!("{field}: empty; name the version"));
    }
    if v.len() > 128 || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{field}: {v:?} is not a version (at most 128 characters, no spaces)"
        ));
    }
    Ok(())
}

fn check_analysis(a: Option<&pb::RolloutAnalysis>) -> Result<Analysis, String> {
    let d = Analysis::default();
    let Some(a) = a else { return Ok(d) };
    if !(0..=3600).contains(&a.interval_seconds) {
        return Err(format!(
            "analysis.interval_seconds: {} is outside 0-3600",
            a.interval_seconds
        ));
    }
    if a.min_requests < 0 {
        return Err(format!(
            "analysis.min_requests: {} is negative",
            a.min_requests
        ));
    }
    let rate = |name: &str, v: f64| -> Result<f64, String> {
        if v.is_finite() && (0.0..=1.0).contains(&v) {
            Ok(v)
        } else {
            Err(format!("analysis.{name}: {v} is outside 0-1"))
        }
    };
    let positive = |name: &str, v: f64| -> Result<f64, String> {
        if v.is_finite() && v >= 0.0 {
            Ok(v)
        } else {
            Err(format!("analysis.{name}: {v} is negative or not a number"))
        }
    };
    Ok(Analysis {
        interval_seconds: if a.interval_seconds == 0 {
            d.interval_seconds
        } else {
            a.interval_seconds as u32
        },
        min_requests: if a.min_requests == 0 {
            d.min_requests
        } else {
            a.min_requests as u64
        },
        max_error_rate: rate("max_error_rate", a.max_error_rate)?,
        max_error_rate_increase: rate("max_error_rate_increase", a.max_error_rate_increase)?,
        max_p99_latency_ms: positive("max_p99_latency_ms", a.max_p99_latency_ms)?,
        max_p99_latency_ratio: positive("max_p99_latency_ratio", a.max_p99_latency_ratio)?,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Running,
    Paused,
    Succeeded,
    RolledBack,
}

impl State {
    pub fn is_active(self) -> bool {
        matches!(self, State::Running | State::Paused)
    }

    pub fn wire(self) -> pb::RolloutState {
        match self {
            State::Running => pb::RolloutState::Running,
            State::Paused => pb::RolloutState::Paused,
            State::Succeeded => pb::RolloutState::Succeeded,
            State::RolledBack => pb::RolloutState::RolledBack,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Started,
    StepStarted,
    AnalysisPassed,
    AnalysisFailed,
    AnalysisInconclusive,
    Paused,
    Resumed,
    Promoted,
    RolledBack,
    Succeeded,
    ModuleCallFailed,
    ResumedAfterRestart,
}

impl EventKind {
    pub fn wire(self) -> pb::RolloutEventKind {
        use pb::RolloutEventKind as K;
        match self {
            EventKind::Started => K::Started,
            EventKind::StepStarted => K::StepStarted,
            EventKind::AnalysisPassed => K::AnalysisPassed,
            EventKind::AnalysisFailed => K::AnalysisFailed,
            EventKind::AnalysisInconclusive => K::AnalysisInconclusive,
            EventKind::Paused => K::Paused,
            EventKind::Resumed => K::Resumed,
            EventKind::Promoted => K::Promoted,
            EventKind::RolledBack => K::RolledBack,
            EventKind::Succeeded => K::Succeeded,
            EventKind::ModuleCallFailed => K::ModuleCallFailed,
            EventKind::ResumedAfterRestart => K::ResumedAfterRestart,
        }
    }
}

/// One version in one analysis window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub version: String,
    pub instances: u32,
    pub requests: u64,
    pub failures: u64,
    pub p99_latency_ms: f64,
}

impl Sample {
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.failures as f64 / self.requests as f64
        }
    }

    pub fn wire(&self) -> pb::RolloutSample {
        pb::RolloutSample {
            version: self.version.clone(),
            instances: self.instances as i32,
            requests: self.requests as i64,
            failures: self.failures as i64,
            error_rate: self.error_rate(),
            p99_latency_ms: self.p99_latency_ms,
        }
    }

    /// `3/120 err 2.5% p99 40ms`, for messages.
    pub fn brief(&self) -> String {
        format!(
            "{} {}/{} err {:.1}% p99 {:.0}ms",
            self.version,
            self.failures,
            self.requests,
            self.error_rate() * 100.0,
            self.p99_latency_ms
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub sequence: u64,
    pub at_ms: u64,
    pub kind: EventKind,
    pub step: u32,
    pub weight: u32,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Sample>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Sample>,
}

impl Event {
    pub fn wire(&self, rollout_id: &str) -> pb::RolloutEvent {
        pb::RolloutEvent {
            sequence: self.sequence,
            rollout_id: rollout_id.to_string(),
            at: Some(shared_types::time::from_unix_millis(self.at_ms)),
            kind: self.kind.wire() as i32,
            step: self.step as i32,
            canary_weight: self.weight as i32,
            message: self.message.clone(),
            canary: self.canary.as_ref().map(Sample::wire),
            baseline: self.baseline.as_ref().map(Sample::wire),
        }
    }
}

/// A rollout: its spec and where it stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub spec: Spec,
    pub state: State,
    /// Index into `spec.steps`.
    pub step: u32,
    /// The canary's percent now (0 before the first step applies, after a
    /// rollback; 100 after success).
    pub weight: u32,
    pub started_ms: u64,
    pub step_started_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    pub reason: String,
    /// Passing analysis windows in the current step.
    pub passes: u32,
    pub next_sequence: u64,
    pub events: VecDeque<Event>,
}

impl Record {
    pub fn new(id: String, spec: Spec, now_ms: u64) -> Self {
        Record {
            id,
            spec,
            state: State::Running,
            step: 0,
            weight: 0,
            started_ms: now_ms,
            step_started_ms: now_ms,
            finished_ms: None,
            reason: String::new(),
            passes: 0,
            next_sequence: 1,
            events: VecDeque::new(),
        }
    }

    /// Appends an event (dropping the oldest beyond [`KEPT_EVENTS`]) and
    /// hands back a copy to publish.
    pub fn push(&mut self, now_ms: u64, kind: EventKind, message: String) -> Event {
        self.push_with(now_ms, kind, message, None, None)
    }

    pub fn push_with(
        &mut self,
        now_ms: u64,
        kind: EventKind,
        message: String,
        canary: Option<Sample>,
        baseline: Option<Sample>,
    ) -> Event {
        let event = Event {
            sequence: self.next_sequence,
            at_ms: now_ms,
            kind,
            step: self.step,
            weight: self.weight,
            message,
            canary,
            baseline,
        };
        self.next_sequence += 1;
        self.events.push_back(event.clone());
        while self.events.len() > KEPT_EVENTS {
            self.events.pop_front();
        }
        event
    }

    pub fn current_step(&self) -> Step {
        self.spec.steps[(self.step as usize).min(self.spec.steps.len() - 1)]
    }

    pub fn is_last_step(&self) -> bool {
        self.step as usize + 1 >= self.spec.steps.len()
    }

    /// The version weights it imposes on its module type: the canary first,
    /// so with sticky choice a client that reached the canary keeps it as
    /// the weight rises. `None` while no step has applied yet.
    pub fn weights(&self) -> Vec<(String, u32)> {
        let w = self.weight.min(100);
        vec![
            (self.spec.canary.clone(), w),
            (self.spec.baseline.clone(), 100 - w),
        ]
    }

    pub fn wire(&self, with_events: bool) -> pb::Rollout {
        let ts = |ms: u64| Some(shared_types::time::from_unix_millis(ms));
        pb::Rollout {
            rollout_id: self.id.clone(),
            module_type: self.spec.module_type() as i32,
            baseline_version: self.spec.baseline.clone(),
            canary_version: self.spec.canary.clone(),
            steps: self
                .spec
                .steps
                .iter()
                .map(|s| pb::RolloutStep {
                    canary_weight: s.weight as i32,
                    hold_seconds: s.hold_seconds as i32,
                })
                .collect(),
            analysis: Some(pb::RolloutAnalysis {
                interval_seconds: self.spec.analysis.interval_seconds as i32,
                min_requests: self.spec.analysis.min_requests as i64,
                max_error_rate: self.spec.analysis.max_error_rate,
                max_error_rate_increase: self.spec.analysis.max_error_rate_increase,
                max_p99_latency_ms: self.spec.analysis.max_p99_latency_ms,
                max_p99_latency_ratio: self.spec.analysis.max_p99_latency_ratio,
            }),
            sticky: self.spec.sticky,
            state: self.state.wire() as i32,
            current_step: self.step as i32,
            canary_weight: self.weight as i32,
            started_at: ts(self.started_ms),
            step_started_at: ts(self.step_started_ms),
            finished_at: self.finished_ms.and_then(ts),
            reason: self.reason.clone(),
            events: if with_events {
                self.events.iter().map(|e| e.wire(&self.id)).collect()
            } else {
                Vec::new()
            },
            blue_green: self.spec.blue_green,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(steps: &[(i32, i32)]) -> pb::StartRolloutRequest {
        pb::StartRolloutRequest {
            module_type: ModuleType::Alb as i32,
            canary_version: "v2".into(),
            steps: steps
                .iter()
                .map(|&(canary_weight, hold_seconds)| pb::RolloutStep {
                    canary_weight,
                    hold_seconds,
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_and_the_baseline_found_from_the_instances() {
        let s = Spec::from_request(&req(&[]), &["v1".into(), "v2".into()]).unwrap();
        assert_eq!(s.baseline, "v1");
        assert_eq!(s.module_type, "alb");
        assert_eq!(
            s.steps.iter().map(|s| s.weight).collect::<Vec<_>>(),
            vec![10, 25, 50, 100]
        );
        assert_eq!(s.analysis, Analysis::default());
    }

    #[test]
    fn errors_name_the_field() {
        let two = ["v1".to_string(), "v0".to_string(), "v2".to_string()];
        let err = |r: pb::StartRolloutRequest, versions: &[String]| {
            Spec::from_request(&r, versions).unwrap_err()
        };
        assert!(
            err(req(&[]), &two).starts_with("baseline_version: alb instances run several versions")
        );
        assert!(err(req(&[]), &["v2".into()]).starts_with("baseline_version: no registered alb"));
        assert!(err(req(&[(10, 5), (10, 5)]), &[])
            .starts_with("steps[1]: canary_weight 10 does not rise"));
        assert!(err(req(&[(0, 5)]), &[]).starts_with("steps[0].canary_weight: 0"));
        assert!(err(req(&[(5, -1)]), &[]).starts_with("steps[0].hold_seconds"));
        let mut r = req(&[]);
        r.baseline_version = "v2".into();
        assert!(err(r, &[]).starts_with("canary_version: \"v2\" is also the baseline"));
        let mut r = req(&[]);
        r.module_type = 0;
        assert!(err(r, &[]).starts_with("module_type: 0"));
        let mut r = req(&[]);
        r.baseline_version = "v1".into();
        r.analysis = Some(pb::RolloutAnalysis {
            max_error_rate: 1.5,
            ..Default::default()
        });
        assert!(err(r, &[]).starts_with("analysis.max_error_rate: 1.5"));
    }

    #[test]
    fn blue_green_is_one_step_at_the_green_weight() {
        let r = pb::StartRolloutRequest {
            module_type: ModuleType::Alb as i32,
            blue_green: Some(pb::BlueGreenConfig {
                blue_version: "blue".into(),
                green_version: "green".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let s = Spec::from_request(&r, &[]).unwrap();
        assert!(s.blue_green);
        assert_eq!((s.baseline.as_str(), s.canary.as_str()), ("blue", "green"));
        assert_eq!(
            s.steps,
            vec![Step {
                weight: 100,
                hold_seconds: 0
            }]
        );
    }

    #[test]
    fn events_are_numbered_and_bounded() {
        let spec = Spec::from_request(&req(&[(10, 1)]), &["v1".into()]).unwrap();
        let mut r = Record::new("r".into(), spec, 1);
        for i in 0..(KEPT_EVENTS + 5) {
            r.push(i as u64, EventKind::AnalysisPassed, String::new());
        }
        assert_eq!(r.events.len(), KEPT_EVENTS);
        assert_eq!(r.events.front().unwrap().sequence, 6);
        assert_eq!(r.events.back().unwrap().sequence, (KEPT_EVENTS + 5) as u64);
        r.weight = 10;
        assert_eq!(r.weights(), vec![("v2".into(), 10), ("v1".into(), 90)]);
    }
}
