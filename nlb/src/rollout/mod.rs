//! Rollouts: a canary moved through weight steps with analysis at every
//! window and automatic rollback, or a blue/green switch.
//!
//! [`Rollouts`] holds every rollout (persisted beside the state file, so an
//! NLB restart resumes each at its step) and answers the control API; the
//! [`controller`] loop drives them: it applies each type's weights to the
//! routing snapshot at once, tells the instances of both versions through
//! `ModuleService` (`SetTrafficWeight`, `PromoteVersion`, `Rollback`), runs
//! the analysis and moves steps on or rolls back.

pub mod analysis;
pub mod controller;
pub mod model;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use shared_types::pb::{self, ModuleType};
use tokio::sync::{broadcast, Notify};

use model::{EventKind, Record, Spec, State};

/// Finished rollouts kept (the oldest are dropped).
pub const KEPT_FINISHED: usize = 50;

/// Why a rollout call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RolloutError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Precondition(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The change could not be persisted, so it was not made.
    #[error("{0}")]
    Storage(String),
}

/// The gRPC status of a refusal.
pub fn status_of(e: RolloutError) -> tonic::Status {
    {
        match e {
            RolloutError::Invalid(m) => tonic::Status::invalid_argument(m),
            RolloutError::NotFound(m) => tonic::Status::not_found(m),
            RolloutError::Precondition(m) => tonic::Status::failed_precondition(m),
            RolloutError::AlreadyExists(m) => tonic::Status::already_exists(m),
            RolloutError::Storage(m) => tonic::Status::unavailable(m),
        }
    }
}

/// The rollouts file: every rollout, as last changed.
#[derive(Debug, Default, Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    rollouts: Vec<Record>,
}

/// Every rollout, the events stream, and where they persist.
pub struct Rollouts {
    records: Mutex<BTreeMap<String, Record>>,
    events: broadcast::Sender<pb::RolloutEvent>,
    /// Wakes the controller after an API change.
    pub(crate) wake: Notify,
    path: PathBuf,
    /// `nlb_rollout_events_total` and `nlb_rollout_canary_weight`, once
    /// the NLB's metrics exist.
    metrics: std::sync::OnceLock<(prometheus::IntCounterVec, prometheus::IntGaugeVec)>,
}

/// Runs `f`, which blocks, without stalling the tasks of the calling
/// runtime worker (where the runtime allows it).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// The rollouts file beside a state file: `nlb.state.json` ->
/// `nlb.state.rollouts.json`.
pub fn path_beside(state_file: &Path) -> PathBuf {
    let stem = state_file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "nlb".into());
    state_file.with_file_name(format!("{stem}.rollouts.json"))
}

fn now_ms() -> u64 {
    shared_types::time::unix_millis(std::time::SystemTime::now())
}

impl Rollouts {
    /// Loads the rollouts file (a missing one is none). Running rollouts
    /// resume at their step, its hold and analysis starting over.
    pub fn load(path: PathBuf) -> Result<Self, String> {
        let mut records = BTreeMap::new();
        match std::fs::read(&path) {
            Ok(bytes) => {
                let disk: OnDisk = serde_json::from_slice(&bytes)
                    .map_err(|e| format!("rollouts file {}: {e}", path.display()))?;
                if disk.version != 1 {
                    return Err(format!(
                        "rollouts file {}: version {} is not 1",
                        path.display(),
                        disk.version
                    ));
                }
                let now = now_ms();
                for mut r in disk.rollouts {
                    if r.spec.steps.is_empty() {
                        return Err(format!(
                            "rollouts file {}: rollout {} has no steps",
                            path.display(),
                            r.id
                        ));
                    }
                    if r.state == State::Running {
                        r.step_started_ms = now;
                        r.passes = 0;
                        let step = r.step + 1;
                        r.push(
                            now,
                            EventKind::ResumedAfterRestart,
                            format!(
                                "the NLB restarted; resuming at step {step} ({}%), its hold starting over",
                                r.weight
                            ),
                        );
                    }
                    records.insert(r.id.clone(), r);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("rollouts file {}: {e}", path.display())),
        }
        let r = Rollouts::empty(path);
        *r.records.lock() = records;
        Ok(r)
    }

    /// No rollouts (kept when the file cannot be read, so the NLB can say
    /// why it does not start).
    pub fn empty(path: PathBuf) -> Self {
        let (events, _) = broadcast::channel(1024);
        Rollouts {
            records: Mutex::new(BTreeMap::new()),
            events,
            wake: Notify::new(),
            path,
            metrics: std::sync::OnceLock::new(),
        }
    }

    /// Counts events and shows weights in these metrics from now on.
    pub fn set_metrics(&self, events: prometheus::IntCounterVec, weight: prometheus::IntGaugeVec) {
        let _ = self.metrics.set((events, weight));
        for (t, (weights, _)) in self.weights(&|_, _| true) {
            let canary = weights.first().map_or(0, |(_, w)| *w);
            weight_gauge(&self.metrics, t, canary);
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn save(&self, records: &BTreeMap<String, Record>) -> Result<(), RolloutError> {
        let disk = OnDisk {
            version: 1,
            rollouts: records.values().cloned().collect(),
        };
        let text = serde_json::to_vec_pretty(&disk)
            .map_err(|e| RolloutError::Storage(format!("rollouts: {e}")))?;
        // The write waits for the disk (fsync): on a multi-threaded runtime
        // the worker hands its other tasks on while it does.
        blocking(|| crate::config::write_atomically(&self.path, &text)).map_err(|e| {
            RolloutError::Storage(format!(
                "cannot write the rollouts file {}: {e}",
                self.path.display()
            ))
        })
    }

    /// Changes the records under the lock, persists them, and publishes the
    /// events the change produced. On a failed write the change is undone.
    fn change<T>(
        &self,
        f: impl FnOnce(
            &mut BTreeMap<String, Record>,
            &mut Vec<(String, model::Event)>,
        ) -> Result<T, RolloutError>,
    ) -> Result<T, RolloutError> {
        self.change_keeping(false, f)
    }

    /// [`Rollouts::change`]; with `keep`, a change whose write fails stays
    /// in force (the controller's: a rollback must not wait for the disk)
    /// and is written with the next change.
    fn change_keeping<T>(
        &self,
        keep: bool,
        f: impl FnOnce(
            &mut BTreeMap<String, Record>,
            &mut Vec<(String, model::Event)>,
        ) -> Result<T, RolloutError>,
    ) -> Result<T, RolloutError> {
        let mut records = self.records.lock();
        let before = records.clone();
        let mut events = Vec::new();
        let out = f(&mut records, &mut events)?;
        prune(&mut records);
        if let Err(e) = self.save(&records) {
            if !keep {
                *records = before;
                return Err(e);
            }
            tracing::error!(error = %e, "rollout progress applied but not saved; it is written with the next change");
        }
        let types: BTreeMap<String, (ModuleType, u32)> = records
            .values()
            .map(|r| (r.id.clone(), (r.spec.module_type(), r.weight)))
            .collect();
        drop(records);
        for (id, e) in events {
            if let (Some((events, _)), Some((t, weight))) = (self.metrics.get(), types.get(&id)) {
                events
                    .with_label_values(&[t.short_name(), event_label(e.kind)])
                    .inc();
                weight_gauge(&self.metrics, *t, *weight);
            }
            let _ = self.events.send(e.wire(&id));
        }
        self.wake.notify_one();
        Ok(out)
    }

    /// Starts a rollout; `versions` are the versions of the type's
    /// registered instances (for a missing baseline and the checks).
    pub fn start(
        &self,
        req: &pb::StartRolloutRequest,
        versions: &[String],
    ) -> Result<pb::Rollout, RolloutError> {
        let spec = Spec::from_request(req, versions).map_err(RolloutError::Invalid)?;
        if !versions.contains(&spec.canary) {
            return Err(RolloutError::Precondition(format!(
                "canary_version: no registered {} instance runs version {:?}; start its instances first (running: {})",
                spec.module_type,
                spec.canary,
                list_or_none(versions)
            )));
        }
        if !versions.contains(&spec.baseline) {
            return Err(RolloutError::Precondition(format!(
                "baseline_version: no registered {} instance runs version {:?}; the rollout would send everything to the canary (running: {})",
                spec.module_type,
                spec.baseline,
                list_or_none(versions)
            )));
        }
        let id = if req.rollout_id.trim().is_empty() {
            format!(
                "{}-{}-{}",
                spec.module_type,
                spec.canary,
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            )
        } else {
            req.rollout_id.trim().to_string()
        };
        if id.len() > 128 || id.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(RolloutError::Invalid(format!(
                "rollout_id: {id:?} is not an id (at most 128 characters, no spaces)"
            )));
        }
        self.change(|records, events| {
            if records.contains_key(&id) {
                return Err(RolloutError::AlreadyExists(format!(
                    "rollout_id: a rollout {id} exists already"
                )));
            }
            if let Some(active) = records
                .values()
                .find(|r| r.state.is_active() && r.spec.module_type == spec.module_type)
            {
                return Err(RolloutError::Precondition(format!(
                    "rollout {} of {} ({} -> {}) is still {}; promote it, roll it back, or wait",
                    active.id,
                    active.spec.module_type,
                    active.spec.baseline,
                    active.spec.canary,
                    if active.state == State::Paused {
                        "paused"
                    } else {
                        "running"
                    }
                )));
            }
            let now = now_ms();
            let mut r = Record::new(id.clone(), spec, now);
            r.weight = r.spec.steps[0].weight;
            let started = if r.spec.blue_green {
                format!(
                    "blue/green switch of {}: {} -> {} at {}%",
                    r.spec.module_type, r.spec.baseline, r.spec.canary, r.weight
                )
            } else {
                format!(
                    "canary of {}: {} -> {} in {} steps ({})",
                    r.spec.module_type,
                    r.spec.baseline,
                    r.spec.canary,
                    r.spec.steps.len(),
                    r.spec
                        .steps
                        .iter()
                        .map(|s| format!("{}%/{}s", s.weight, s.hold_seconds))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            events.push((id.clone(), r.push(now, EventKind::Started, started)));
            if r.spec.blue_green {
                finish(&mut r, now, State::Succeeded, "switched".into(), events);
            } else {
                let msg = format!("step 1: canary {} at {}%", r.spec.canary, r.weight);
                events.push((id.clone(), r.push(now, EventKind::StepStarted, msg)));
            }
            let wire = r.wire(true);
            records.insert(id.clone(), r);
            Ok(wire)
        })
    }

    pub fn get(&self, id: &str) -> Result<pb::Rollout, RolloutError> {
        self.records
            .lock()
            .get(id)
            .map(|r| r.wire(true))
            .ok_or_else(|| not_found(id))
    }

    /// Rollouts, newest first.
    pub fn list(&self, module_type: ModuleType, active_only: bool) -> Vec<pb::Rollout> {
        let mut out: Vec<(u64, pb::Rollout)> = self
            .records
            .lock()
            .values()
            .filter(|r| {
                module_type == ModuleType::Unspecified || r.spec.module_type() == module_type
            })
            .filter(|r| !active_only || r.state.is_active())
            .map(|r| (r.started_ms, r.wire(false)))
            .collect();
        out.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.rollout_id.cmp(&b.1.rollout_id)));
        out.into_iter().map(|(_, r)| r).collect()
    }

    /// The next step (or, with `full`, the end): an operator's word over the
    /// analysis.
    pub fn promote(&self, id: &str, full: bool) -> Result<pb::Rollout, RolloutError> {
        self.on_active(id, "promote", |r, now, events| {
            if full || r.is_last_step() {
                events.push((
                    r.id.clone(),
                    r.push(
                        now,
                        EventKind::Promoted,
                        "promoted to 100% by an operator".into(),
                    ),
                ));
                finish(
                    r,
                    now,
                    State::Succeeded,
                    "promoted by an operator".into(),
                    events,
                );
            } else {
                let msg = format!("promoted to step {} by an operator", r.step + 2);
                events.push((r.id.clone(), r.push(now, EventKind::Promoted, msg)));
                next_step(r, now, events);
            }
        })
    }

    pub fn pause(&self, id: &str, reason: &str) -> Result<pb::Rollout, RolloutError> {
        self.on_active(id, "pause", |r, now, events| {
            if r.state == State::Paused {
                return;
            }
            r.state = State::Paused;
            r.reason = if reason.trim().is_empty() {
                "paused by an operator".into()
            } else {
                reason.trim().to_string()
            };
            let msg = format!("paused at {}%: {}", r.weight, r.reason);
            events.push((r.id.clone(), r.push(now, EventKind::Paused, msg)));
        })
    }

    pub fn resume(&self, id: &str) -> Result<pb::Rollout, RolloutError> {
        self.on_active(id, "resume", |r, now, events| {
            if r.state == State::Running {
                return;
            }
            r.state = State::Running;
            r.reason.clear();
            r.step_started_ms = now;
            r.passes = 0;
            let msg = format!(
                "resumed at step {} ({}%), its hold starting over",
                r.step + 1,
                r.weight
            );
            events.push((r.id.clone(), r.push(now, EventKind::Resumed, msg)));
        })
    }

    pub fn rollback(&self, id: &str, reason: &str) -> Result<pb::Rollout, RolloutError> {
        self.on_active(id, "roll back", |r, now, events| {
            let why = if reason.trim().is_empty() {
                "rolled back by an operator".to_string()
            } else {
                format!("rolled back by an operator: {}", reason.trim())
            };
            finish(r, now, State::RolledBack, why, events);
        })
    }

    fn on_active(
        &self,
        id: &str,
        what: &str,
        f: impl FnOnce(&mut Record, u64, &mut Vec<(String, model::Event)>),
    ) -> Result<pb::Rollout, RolloutError> {
        self.change(|records, events| {
            let r = records.get_mut(id).ok_or_else(|| not_found(id))?;
            if !r.state.is_active() {
                return Err(RolloutError::Precondition(format!(
                    "rollout {id} has ended ({}); nothing to {what}",
                    state_name(r.state)
                )));
            }
            f(r, now_ms(), events);
            Ok(r.wire(true))
        })
    }

    /// Events of a rollout after `after` (kept ones), whether it has ended,
    /// and a receiver for the events to come, taken first so none is missed
    /// in between.
    pub fn watch(
        &self,
        id: &str,
        after: u64,
    ) -> Result<
        (
            Vec<pb::RolloutEvent>,
            bool,
            broadcast::Receiver<pb::RolloutEvent>,
        ),
        RolloutError,
    > {
        let rx = self.events.subscribe();
        let records = self.records.lock();
        let r = records.get(id).ok_or_else(|| not_found(id))?;
        let kept = r
            .events
            .iter()
            .filter(|e| e.sequence > after)
            .map(|e| e.wire(id))
            .collect();
        Ok((kept, !r.state.is_active(), rx))
    }

    /// The weights each module type's latest rollout imposes, with its
    /// stickiness: running or paused, its step's. Ended, its outcome's only
    /// while the version it moved away from still has registered instances
    /// (`registered(type, version)`): the baseline's after a success, the
    /// canary's after a rollback. Once those are gone the type's traffic goes
    /// by `traffic_weights` again, so a later version deployed without a
    /// rollout is not shut out.
    pub fn weights(
        &self,
        registered: &dyn Fn(ModuleType, &str) -> bool,
    ) -> BTreeMap<ModuleType, (Vec<(String, u32)>, bool)> {
        let records = self.records.lock();
        latest_per_type(&records)
            .into_iter()
            .filter(|(t, r)| match r.state {
                State::Running | State::Paused => true,
                State::Succeeded if r.weight >= 100 => registered(*t, &r.spec.baseline),
                // A blue/green split keeps both versions.
                State::Succeeded => true,
                State::RolledBack => registered(*t, &r.spec.canary),
            })
            .map(|(t, r)| (t, (r.weights(), r.spec.sticky)))
            .collect()
    }

    /// Runs `f` on every rollout under the lock (the controller's step), then
    /// persists and publishes as [`Rollouts::change`] does.
    pub(crate) fn advance(
        &self,
        f: impl FnOnce(&mut BTreeMap<String, Record>, &mut Vec<(String, model::Event)>) -> bool,
    ) {
        // Only a write can fail, and the change stays in force then.
        let _ = self.change_keeping(true, |records, events| Ok(f(records, events)));
    }

    /// A snapshot of the records (for the controller's reads).
    pub(crate) fn records(&self) -> Vec<Record> {
        self.records.lock().values().cloned().collect()
    }

    /// Records events that change nothing else (module call failures).
    pub(crate) fn note(&self, id: &str, kind: EventKind, message: String) {
        self.advance(|records, events| {
            if let Some(r) = records.get_mut(id) {
                let now = now_ms();
                events.push((id.to_string(), r.push(now, kind, message)));
            }
            true
        });
    }
}

fn weight_gauge(
    metrics: &std::sync::OnceLock<(prometheus::IntCounterVec, prometheus::IntGaugeVec)>,
    t: ModuleType,
    weight: u32,
) {
    if let Some((_, gauge)) = metrics.get() {
        gauge
            .with_label_values(&[t.short_name()])
            .set(i64::from(weight));
    }
}

/// The `kind` label of an event.
pub fn event_label(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Started => "started",
        EventKind::StepStarted => "step_started",
        EventKind::AnalysisPassed => "analysis_passed",
        EventKind::AnalysisFailed => "analysis_failed",
        EventKind::AnalysisInconclusive => "analysis_inconclusive",
        EventKind::Paused => "paused",
        EventKind::Resumed => "resumed",
        EventKind::Promoted => "promoted",
        EventKind::RolledBack => "rolled_back",
        EventKind::Succeeded => "succeeded",
        EventKind::ModuleCallFailed => "module_call_failed",
        EventKind::ResumedAfterRestart => "resumed_after_restart",
    }
}

fn not_found(id: &str) -> RolloutError {
    RolloutError::NotFound(format!("rollout_id: no rollout {id:?}"))
}

fn list_or_none(versions: &[String]) -> String {
    if versions.is_empty() {
        "none".into()
    } else {
        versions.join(", ")
    }
}

pub fn state_name(s: State) -> &'static str {
    match s {
        State::Running => "running",
        State::Paused => "paused",
        State::Succeeded => "succeeded",
        State::RolledBack => "rolled back",
    }
}

/// Ends a rollout: succeeded (the canary takes everything) or rolled back
/// (the baseline does).
pub(crate) fn finish(
    r: &mut Record,
    now: u64,
    state: State,
    reason: String,
    events: &mut Vec<(String, model::Event)>,
) {
    r.state = state;
    r.finished_ms = Some(now);
    r.reason = reason;
    let (kind, msg) = if state == State::Succeeded && r.spec.blue_green && r.weight < 100 {
        // A blue/green switch keeps the weights it asked for.
        (
            EventKind::Succeeded,
            format!(
                "{} takes {}% and {} {}%: {}",
                r.spec.canary,
                r.weight,
                r.spec.baseline,
                100 - r.weight,
                r.reason
            ),
        )
    } else if state == State::Succeeded {
        r.weight = 100;
        (
            EventKind::Succeeded,
            format!("{} is the baseline now: {}", r.spec.canary, r.reason),
        )
    } else {
        r.weight = 0;
        (
            EventKind::RolledBack,
            format!("{} takes all traffic again: {}", r.spec.baseline, r.reason),
        )
    };
    events.push((r.id.clone(), r.push(now, kind, msg)));
}

/// Moves to the next step, or ends the rollout after its last.
pub(crate) fn next_step(r: &mut Record, now: u64, events: &mut Vec<(String, model::Event)>) {
    if r.is_last_step() {
        finish(r, now, State::Succeeded, "every step passed".into(), events);
        return;
    }
    r.step += 1;
    r.weight = r.current_step().weight;
    r.step_started_ms = now;
    r.passes = 0;
    let msg = format!(
        "step {}: canary {} at {}%",
        r.step + 1,
        r.spec.canary,
        r.weight
    );
    events.push((r.id.clone(), r.push(now, EventKind::StepStarted, msg)));
}

/// Each module type's latest rollout.
pub(crate) fn latest_per_type(records: &BTreeMap<String, Record>) -> BTreeMap<ModuleType, &Record> {
    let mut latest: BTreeMap<ModuleType, &Record> = BTreeMap::new();
    for r in records.values() {
        let t = r.spec.module_type();
        if latest.get(&t).is_none_or(|l| r.started_ms >= l.started_ms) {
            latest.insert(t, r);
        }
    }
    latest
}

/// Keeps every active rollout, each type's latest, and the newest finished
/// ones.
fn prune(records: &mut BTreeMap<String, Record>) {
    let keep: std::collections::HashSet<String> = latest_per_type(records)
        .values()
        .map(|r| r.id.clone())
        .collect();
    let mut finished: Vec<(u64, String)> = records
        .values()
        .filter(|r| !r.state.is_active() && !keep.contains(&r.id))
        .map(|r| (r.finished_ms.unwrap_or(r.started_ms), r.id.clone()))
        .collect();
    if finished.len() <= KEPT_FINISHED {
        return;
    }
    finished.sort();
    let drop = finished.len() - KEPT_FINISHED;
    for (_, id) in finished.into_iter().take(drop) {
        records.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> pb::StartRolloutRequest {
        pb::StartRolloutRequest {
            module_type: ModuleType::Alb as i32,
            baseline_version: "v1".into(),
            canary_version: "v2".into(),
            rollout_id: "r".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_failed_write_refuses_an_api_change_but_never_holds_back_the_controller() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nlb.state.rollouts.json");
        let rollouts = Rollouts::load(path.clone()).unwrap();
        let versions = ["v1".to_string(), "v2".to_string()];
        rollouts.start(&request(), &versions).unwrap();
        assert!(path.is_file(), "started and written");

        // The directory goes away (a full or broken disk): writes fail.
        std::fs::remove_dir_all(dir.path()).unwrap();
        std::fs::write(dir.path(), b"not a directory").unwrap();
        let err = rollouts.pause("r", "lunch").unwrap_err();
        assert!(
            matches!(err, RolloutError::Storage(ref m) if m.contains("rollouts file")),
            "{err:?}"
        );
        assert_eq!(
            rollouts.get("r").unwrap().state,
            pb::RolloutState::Running as i32
        );

        // The controller's rollback applies anyway.
        rollouts.advance(|records, events| {
            let r = records.get_mut("r").unwrap();
            finish(
                r,
                1,
                State::RolledBack,
                "analysis failed: test".into(),
                events,
            );
            true
        });
        let r = rollouts.get("r").unwrap();
        assert_eq!(r.state, pb::RolloutState::RolledBack as i32);
        assert_eq!(r.canary_weight, 0);
        let _ = std::fs::remove_file(dir.path());
    }

    #[test]
    fn a_corrupt_rollouts_file_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.rollouts.json");
        std::fs::write(&path, b"{not json").unwrap();
        let err = Rollouts::load(path.clone()).err().unwrap();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert_eq!(
            path_beside(Path::new("/var/lib/switchyard/nlb.state.json")),
            Path::new("/var/lib/switchyard/nlb.state.rollouts.json")
        );
    }
}
