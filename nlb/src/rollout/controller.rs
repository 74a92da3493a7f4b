//! The rollout controller: a loop (every 500 ms, and at once after an API
//! change) that, for every rollout,
//! 1. analyses the canary against the baseline when a window ends, and
//!    rolls back on a breach, or counts a pass;
//! 2. moves to the next step once the step's hold is over and a window in
//!    it passed (the last step's end makes the canary the baseline);
//! 3. applies each module type's weights to the routing snapshot;
//! 4. tells the instances of both versions (`SetTrafficWeight`, and
//!    `PromoteVersion` / `Rollback` at the end), so their
//!    `GetActiveVersion` agrees with the NLB.
//!
//! Module calls run as tasks beside the loop (one per instance at a time),
//! so a slow module never holds back the analysis of any rollout.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use shared_types::pb::{self, ModuleType};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use super::analysis::{judge, Probe, Reported, Verdict, Window, REPORTED};
use super::model::{EventKind, Record, Sample, State};
use super::{finish, next_step};
use crate::app::Nlb;
use crate::registry::InstanceView;
use crate::routing::EndpointState;

const TICK: Duration = Duration::from_millis(500);
/// Deadline of one call to a module.
const CALL_DEADLINE: Duration = Duration::from_secs(5);
/// A failed call to an instance is tried again after this long.
const RETRY_AFTER_MS: u64 = 15_000;
/// Instances are told a finished rollout's outcome for this long after it
/// ended (new instances, an NLB restart), not forever.
const TELL_FINISHED_MS: u64 = 10 * 60 * 1000;

/// What an instance should have been told.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Told {
    Weight(u32),
    Promoted,
    RolledBack,
}

/// One life of an instance: its id and when its process started (as it
/// registered it; else when it registered). A module restarted under the
/// same id is a new incarnation and is told again.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Incarnation {
    id: String,
    started: (i64, i32),
}

impl Incarnation {
    fn of(v: &InstanceView) -> Self {
        let started = v
            .instance
            .started_at
            .as_ref()
            .map_or((0, 0), |t| (t.seconds, t.nanos));
        Incarnation {
            id: v.instance.instance_id.clone(),
            started,
        }
    }
}

/// A rollout's analysis window.
struct Open {
    window: Window,
    /// When it last closed (ms).
    closed_ms: u64,
    /// The step it belongs to: a step change (the controller's or an
    /// operator's promote) starts a new window.
    step: u32,
}

#[derive(Default)]
struct Controller {
    windows: HashMap<String, Open>,
    /// Per incarnation: (rollout id, what it was told).
    told: HashMap<Incarnation, (String, Told)>,
    /// Per incarnation: (rollout id, what failed, retry after ms).
    failed: HashMap<Incarnation, (String, Told, u64)>,
    /// Canary incarnations whose active version was set to the baseline,
    /// per rollout.
    prepared: HashSet<(String, Incarnation)>,
    /// Incarnations with a call under way.
    calling: HashSet<Incarnation>,
    /// Module types whose weights the controller set.
    weighted: HashSet<ModuleType>,
}

/// Starts the controller; it ends when `stop` turns true (calls under way
/// are dropped with it).
pub fn spawn(nlb: Arc<Nlb>, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut c = Controller::default();
        let mut calls: JoinSet<(Job, Result<(), String>)> = JoinSet::new();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = nlb.rollouts.wake.notified() => {}
                Some(done) = calls.join_next(), if !calls.is_empty() => {
                    if let Ok((job, result)) = done {
                        c.called(&nlb, job, result, now_ms());
                    }
                    continue;
                }
                _ = stop.wait_for(|s| *s) => return,
            }
            c.step(&nlb, &mut calls);
        }
    })
}

fn now_ms() -> u64 {
    shared_types::time::unix_millis(std::time::SystemTime::now())
}

impl Controller {
    fn step(&mut self, nlb: &Arc<Nlb>, calls: &mut JoinSet<(Job, Result<(), String>)>) {
        let now = now_ms();
        let records = nlb.rollouts.records();
        self.analyse_and_advance(nlb, &records, now);
        // One look at the registry for both.
        let views = nlb.registry.list();
        self.apply_weights(nlb, &views);
        self.tell_modules(nlb, &views, now, calls);
        // Forget rollouts and instances that are gone.
        let live: HashSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
        self.windows.retain(|id, _| live.contains(id.as_str()));
        let present: HashSet<Incarnation> = views.iter().map(Incarnation::of).collect();
        self.told.retain(|i, _| present.contains(i));
        self.failed.retain(|i, _| present.contains(i));
        self.prepared
            .retain(|(r, i)| live.contains(r.as_str()) && present.contains(i));
    }

    /// Closes due windows and moves rollouts on (one persisted change).
    fn analyse_and_advance(&mut self, nlb: &Nlb, records: &[Record], now: u64) {
        let mut verdicts: BTreeMap<String, (Verdict, Sample, Sample)> = BTreeMap::new();
        let mut due_steps = Vec::new();
        for r in records {
            if r.state != State::Running {
                // A paused rollout's next window starts when it resumes.
                self.windows.remove(&r.id);
                continue;
            }
            let probes = probes(nlb, r);
            let interval = u64::from(r.spec.analysis.interval_seconds) * 1000;
            match self.windows.get_mut(&r.id) {
                // A new rollout, or a new step: the window starts (unjudged)
                // from the counters now, so it sees only this step's weight.
                Some(open) if open.step != r.step => {
                    open.window = Window::default();
                    open.window.take(probes);
                    open.closed_ms = now;
                    open.step = r.step;
                }
                None => {
                    let mut window = Window::default();
                    window.take(probes);
                    self.windows.insert(
                        r.id.clone(),
                        Open {
                            window,
                            closed_ms: now,
                            step: r.step,
                        },
                    );
                }
                Some(open) if now.saturating_sub(open.closed_ms) >= interval => {
                    let samples = open.window.take(probes);
                    open.closed_ms = now;
                    let sample = |v: &str| {
                        samples.get(v).cloned().unwrap_or_else(|| Sample {
                            version: v.to_string(),
                            ..Sample::default()
                        })
                    };
                    let (canary, baseline) = (sample(&r.spec.canary), sample(&r.spec.baseline));
                    let verdict = judge(&r.spec.analysis, &canary, &baseline);
                    verdicts.insert(r.id.clone(), (verdict, canary, baseline));
                }
                Some(_) => {}
            }
            let hold = u64::from(r.current_step().hold_seconds) * 1000;
            if now.saturating_sub(r.step_started_ms) >= hold {
                due_steps.push(r.id.clone());
            }
        }
        if verdicts.is_empty() && due_steps.is_empty() {
            return;
        }
        nlb.rollouts.advance(|records, events| {
            for (id, (verdict, canary, baseline)) in verdicts {
                let Some(r) = records.get_mut(&id).filter(|r| r.state == State::Running) else {
                    continue;
                };
                match verdict {
                    Verdict::Pass => {
                        r.passes += 1;
                        let msg = format!("step {} at {}% passed", r.step + 1, r.weight);
                        let e = r.push_with(
                            now,
                            EventKind::AnalysisPassed,
                            msg,
                            Some(canary),
                            Some(baseline),
                        );
                        events.push((id.clone(), e));
                    }
                    Verdict::Inconclusive(why) => {
                        let e = r.push_with(
                            now,
                            EventKind::AnalysisInconclusive,
                            why,
                            Some(canary),
                            Some(baseline),
                        );
                        events.push((id.clone(), e));
                    }
                    Verdict::Fail(why) => {
                        let e = r.push_with(
                            now,
                            EventKind::AnalysisFailed,
                            why.clone(),
                            Some(canary),
                            Some(baseline),
                        );
                        events.push((id.clone(), e));
                        finish(
                            r,
                            now,
                            State::RolledBack,
                            format!("analysis failed: {why}"),
                            events,
                        );
                    }
                }
            }
            for id in due_steps {
                let Some(r) = records.get_mut(&id).filter(|r| r.state == State::Running) else {
                    continue;
                };
                let hold = u64::from(r.current_step().hold_seconds) * 1000;
                if r.passes > 0 && now.saturating_sub(r.step_started_ms) >= hold {
                    next_step(r, now, events);
                }
            }
            true
        });
    }

    fn apply_weights(&mut self, nlb: &Nlb, views: &[InstanceView]) {
        let live: HashSet<(ModuleType, &str)> = views
            .iter()
            .map(|v| (v.module_type, v.instance.version.as_str()))
            .collect();
        let wanted = nlb.rollouts.weights(&|t, v| live.contains(&(t, v)));
        for (t, weights) in &wanted {
            nlb.registry.set_rollout_weights(*t, Some(weights.clone()));
            self.weighted.insert(*t);
        }
        let gone: Vec<ModuleType> = self
            .weighted
            .iter()
            .filter(|t| !wanted.contains_key(t))
            .copied()
            .collect();
        for t in gone {
            nlb.registry.set_rollout_weights(t, None);
            self.weighted.remove(&t);
        }
    }

    /// Starts a call to every instance of both versions of each type's
    /// latest rollout that has not been told its current state yet (and has
    /// no call under way).
    fn tell_modules(
        &mut self,
        nlb: &Arc<Nlb>,
        views: &[InstanceView],
        now: u64,
        calls: &mut JoinSet<(Job, Result<(), String>)>,
    ) {
        // As the analysis just left them.
        let records: BTreeMap<String, Record> = nlb
            .rollouts
            .records()
            .into_iter()
            .map(|r| (r.id.clone(), r))
            .collect();
        let latest = super::latest_per_type(&records);
        for (t, r) in latest {
            let told = match r.state {
                State::Running | State::Paused => Told::Weight(r.weight),
                // A blue/green switch that keeps part of the traffic on blue
                // leaves blue active, green at its weight.
                State::Succeeded if r.weight < 100 => Told::Weight(r.weight),
                State::Succeeded => Told::Promoted,
                State::RolledBack => Told::RolledBack,
            };
            if !r.state.is_active()
                && now.saturating_sub(r.finished_ms.unwrap_or(now)) > TELL_FINISHED_MS
            {
                continue;
            }
            for v in views {
                if v.module_type != t || v.state == EndpointState::Draining {
                    continue;
                }
                let version = &v.instance.version;
                if *version != r.spec.baseline && *version != r.spec.canary {
                    continue;
                }
                let who = Incarnation::of(v);
                if self.calling.contains(&who)
                    || self.told.get(&who) == Some(&(r.id.clone(), told.clone()))
                {
                    continue;
                }
                if let Some((rid, what, retry)) = self.failed.get(&who) {
                    if *rid == r.id && *what == told && now < *retry {
                        continue;
                    }
                }
                let prepare = *version == r.spec.canary
                    && matches!(told, Told::Weight(_))
                    && !self.prepared.contains(&(r.id.clone(), who.clone()));
                let job = Job {
                    rollout: r.id.clone(),
                    who: who.clone(),
                    address: v.instance.address.clone(),
                    baseline: r.spec.baseline.clone(),
                    canary: r.spec.canary.clone(),
                    told: told.clone(),
                    prepare,
                };
                self.calling.insert(who);
                let nlb = Arc::clone(nlb);
                calls.spawn(async move {
                    let result = job.run(&nlb).await;
                    (job, result)
                });
            }
        }
    }

    /// A call ended: what the instance now knows, or when to try again.
    fn called(&mut self, nlb: &Nlb, job: Job, result: Result<(), String>, now: u64) {
        self.calling.remove(&job.who);
        match result {
            Ok(()) => {
                if job.prepare {
                    self.prepared.insert((job.rollout.clone(), job.who.clone()));
                }
                self.failed.remove(&job.who);
                self.told.insert(job.who, (job.rollout, job.told));
            }
            Err(why) => {
                let first = self
                    .failed
                    .get(&job.who)
                    .is_none_or(|(rid, what, _)| *rid != job.rollout || *what != job.told);
                if first {
                    nlb.rollouts
                        .note(&job.rollout, EventKind::ModuleCallFailed, why);
                }
                self.failed
                    .insert(job.who, (job.rollout, job.told, now + RETRY_AFTER_MS));
            }
        }
    }
}

/// One instance to tell.
struct Job {
    rollout: String,
    who: Incarnation,
    address: String,
    baseline: String,
    canary: String,
    told: Told,
    /// A canary instance hears first that the baseline is the active
    /// version, as the NLB sees it.
    prepare: bool,
}

impl Job {
    async fn run(&self, nlb: &Nlb) -> Result<(), String> {
        if self.prepare {
            self.promote(nlb, &self.baseline, "PromoteVersion (baseline active)")
                .await?;
        }
        match self.told {
            Told::Weight(w) => {
                let req = nlb.modules.changing(
                    pb::SetTrafficWeightRequest {
                        instance_id: self.who.id.clone(),
                        version: self.canary.clone(),
                        weight: w as i32,
                    },
                    CALL_DEADLINE,
                );
                let r = self
                    .call(nlb, |mut c| async move { c.set_traffic_weight(req).await })
                    .await
                    .map(|r| (r.success, r.message));
                self.outcome("SetTrafficWeight", r)
            }
            Told::Promoted => self.promote(nlb, &self.canary, "PromoteVersion").await,
            Told::RolledBack => {
                let req = nlb.modules.changing(
                    pb::RollbackRequest {
                        instance_id: self.who.id.clone(),
                        target_version: self.baseline.clone(),
                    },
                    CALL_DEADLINE,
                );
                let r = self
                    .call(nlb, |mut c| async move { c.rollback(req).await })
                    .await
                    .map(|r| (r.success, r.message));
                self.outcome("Rollback", r)
            }
        }
    }

    /// `PromoteVersion(version, immediate)` on this instance.
    async fn promote(&self, nlb: &Nlb, version: &str, what: &str) -> Result<(), String> {
        let req = nlb.modules.changing(
            pb::PromoteVersionRequest {
                instance_id: self.who.id.clone(),
                version: version.to_string(),
                immediate: true,
                promotion_rate: 0,
            },
            CALL_DEADLINE,
        );
        let r = self
            .call(nlb, |mut c| async move { c.promote_version(req).await })
            .await
            .map(|r| (r.success, r.message));
        self.outcome(what, r)
    }

    /// One call to this instance's ModuleService, under the deadline.
    async fn call<T, F, Fut>(&self, nlb: &Nlb, f: F) -> Result<T, tonic::Status>
    where
        F: FnOnce(crate::control::module_client::ModuleClient) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        nlb.modules
            .call(&self.who.id, &self.address, CALL_DEADLINE, f)
            .await
    }

    /// A call's `(success, message)`, or its failure, as the event says it.
    fn outcome(&self, what: &str, r: Result<(bool, String), tonic::Status>) -> Result<(), String> {
        match r {
            Ok((true, _)) => Ok(()),
            Ok((false, message)) => Err(format!("{what} on {}: refused: {message}", self.who.id)),
            Err(e) => Err(format!(
                "{what} on {} at {}: {}",
                self.who.id,
                self.address,
                e.message()
            )),
        }
    }
}

/// The counters of every instance of the rollout's two versions: its
/// heartbeat stats and its `ReportMetrics` points (the larger of each), and
/// the NLB's own connection counters.
fn probes(nlb: &Nlb, r: &Record) -> Vec<Probe> {
    let t = r.spec.module_type();
    let names: Vec<String> = REPORTED.iter().map(|n| n.to_string()).collect();
    let mut probes: Vec<Probe> = nlb.registry.read(|inner| {
        inner
            .instances
            .values()
            .filter(|i| i.module_type == t)
            .filter(|i| i.info.version == r.spec.baseline || i.info.version == r.spec.canary)
            .map(|i| {
                let stats = i.stats.clone().unwrap_or_default();
                Probe {
                    instance_id: i.info.instance_id.clone(),
                    version: i.info.version.clone(),
                    requests: stats.total_requests.max(0) as u64,
                    failed_requests: stats.failed_requests.max(0) as u64,
                    connections: i.counters.total(),
                    failed_connections: i.counters.failed_total(),
                    p99_latency_ms: stats.p99_latency_ms,
                }
            })
            .collect()
    });
    // Outside the registry's lock: the series store has its own.
    for p in &mut probes {
        let reported = Reported::from_points(&nlb.series.latest(&p.instance_id, &names));
        p.requests = p.requests.max(reported.requests);
        p.failed_requests = p.failed_requests.max(reported.failed_requests);
        if !(p.p99_latency_ms.is_finite() && p.p99_latency_ms > 0.0) {
            p.p99_latency_ms = reported.p99_latency_ms;
        }
    }
    probes
}
