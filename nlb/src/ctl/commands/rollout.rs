//! `rollout start` (StartRollout), `status ID` (GetRollout), `list`
//! (ListRollouts), `promote|pause|resume|rollback ID` (PromoteRollout, ...)
//! and `watch ID` (WatchRollout: the events as they happen, until the
//! rollout finishes; exit 0 when it succeeded, 7 when it was rolled back).

use shared_types::pb::{self, ModuleType, RolloutState};

use super::modules::type_name;
use super::StopSignals;
use crate::ctl::cli::{RolloutListArgs, RolloutStartArgs};
use crate::ctl::client::Ctl;
use crate::ctl::exit::{CtlError, Exit};
use crate::ctl::json::{self, rollout_event_kind_name, rollout_state_name};
use crate::ctl::output::{key_values, num, or_dash, when, Out, Table};

/// The analysis thresholds given on the command line; `None` when none is
/// (the NLB then applies its own).
fn analysis(a: &RolloutStartArgs) -> Option<pb::RolloutAnalysis> {
    let given = a.interval.is_some()
        || a.min_requests.is_some()
        || a.max_error_rate.is_some()
        || a.max_error_rate_increase.is_some()
        || a.max_p99_ms.is_some()
        || a.max_p99_ratio.is_some();
    given.then(|| pb::RolloutAnalysis {
        interval_seconds: a.interval.unwrap_or(0),
        min_requests: a.min_requests.unwrap_or(0),
        max_error_rate: a.max_error_rate.unwrap_or(0.0),
        max_error_rate_increase: a.max_error_rate_increase.unwrap_or(0.0),
        max_p99_latency_ms: a.max_p99_ms.unwrap_or(0.0),
        max_p99_latency_ratio: a.max_p99_ratio.unwrap_or(0.0),
    })
}

/// The request of `rollout start`: steps and analysis, or with
/// `--blue-green` one switch to the given weights (blue is the baseline,
/// green the canary).
pub(super) fn start_request(a: &RolloutStartArgs) -> pb::StartRolloutRequest {
    let baseline = a.baseline.clone().unwrap_or_default();
    let mut req = pb::StartRolloutRequest {
        module_type: a.module_type as i32,
        baseline_version: baseline.clone(),
        canary_version: a.canary.clone(),
        rollout_id: a.id.clone().unwrap_or_default(),
        ..Default::default()
    };
    if a.blue_green {
        req.blue_green = Some(pb::BlueGreenConfig {
            blue_version: baseline,
            green_version: a.canary.clone(),
            blue_weight: 100 - a.weight,
            green_weight: a.weight,
            ..Default::default()
        });
    } else {
        req.steps = a.steps.clone().map(|s| s.0).unwrap_or_default();
        req.analysis = analysis(a);
        req.sticky = a.sticky;
    }
    req
}

/// `v1 -> v2`.
fn versions(r: &pb::Rollout) -> String {
    format!(
        "{} -> {}",
        or_dash(&r.baseline_version),
        or_dash(&r.canary_version)
    )
}

/// The current step counted from 1, out of how many: `2/4` (`2` when the
/// steps are not known).
fn step_of(r: &pb::Rollout) -> String {
    let at = i64::from(r.current_step) + 1;
    if r.steps.is_empty() {
        at.to_string()
    } else {
        format!("{at}/{}", r.steps.len())
    }
}

fn mode(r: &pb::Rollout) -> &'static str {
    match (r.blue_green, r.sticky) {
        (true, _) => "blue/green",
        (false, true) => "canary, sticky",
        (false, false) => "canary",
    }
}

/// `r-1: alb v1 -> v2, RUNNING, step 2/4 at 25%`, and the reason if there is one.
pub(super) fn summary(r: &pb::Rollout) -> String {
    let blue_green = if r.blue_green { " (blue/green)" } else { "" };
    let mut s = format!(
        "{}: {} {}{blue_green}, {}, step {} at {}%",
        r.rollout_id,
        type_name(r.module_type),
        versions(r),
        rollout_state_name(r.state),
        step_of(r),
        r.canary_weight
    );
    if !r.reason.is_empty() {
        s.push_str(&format!(" ({})", r.reason));
    }
    s
}

/// Steps in the syntax of `--steps`: `10:60,25:60,100:0`.
fn steps_text(steps: &[pb::RolloutStep]) -> String {
    let s: Vec<String> = steps
        .iter()
        .map(|s| format!("{}:{}", s.canary_weight, s.hold_seconds))
        .collect();
    or_dash(&s.join(","))
}

fn percent(fraction: f64) -> String {
    format!("{}%", num(fraction * 100.0))
}

/// The window and the thresholds checked (0 = the NLB's default, or not checked).
fn analysis_text(a: Option<&pb::RolloutAnalysis>) -> String {
    let Some(a) = a else {
        return "-".into();
    };
    let or_default = |n: i64, unit: &str| {
        if n == 0 {
            "default".to_string()
        } else {
            format!("{n}{unit}")
        }
    };
    let mut checks = Vec::new();
    if a.max_error_rate > 0.0 {
        checks.push(format!("error rate > {}", percent(a.max_error_rate)));
    }
    if a.max_error_rate_increase > 0.0 {
        checks.push(format!(
            "error rate > baseline + {}",
            percent(a.max_error_rate_increase)
        ));
    }
    if a.max_p99_latency_ms > 0.0 {
        checks.push(format!("p99 > {}ms", num(a.max_p99_latency_ms)));
    }
    if a.max_p99_latency_ratio > 0.0 {
        checks.push(format!("p99 > {}x baseline", num(a.max_p99_latency_ratio)));
    }
    let checks = if checks.is_empty() {
        "no threshold".to_string()
    } else {
        format!("rolls back on {}", checks.join(", "))
    };
    format!(
        "window {}, min requests {}; {checks}",
        or_default(i64::from(a.interval_seconds), "s"),
        or_default(a.min_requests, "")
    )
}

/// `canary 3/120 err 2.5% p99 40ms`: failures/requests in the window.
fn sample_text(label: &str, s: &pb::RolloutSample) -> String {
    format!(
        "{label} {}/{} err {} p99 {}ms",
        s.failures,
        s.requests,
        percent(s.error_rate),
        num(s.p99_latency_ms)
    )
}

/// The event's message, then what the analysis saw of each version.
fn event_message(e: &pb::RolloutEvent) -> String {
    let samples: Vec<String> = [("canary", &e.canary), ("baseline", &e.baseline)]
        .into_iter()
        .filter_map(|(label, s)| s.as_ref().map(|s| sample_text(label, s)))
        .collect();
    match (e.message.is_empty(), samples.is_empty()) {
        (_, true) => or_dash(&e.message),
        (true, false) => samples.join(" | "),
        (false, false) => format!("{} ({})", e.message, samples.join(" | ")),
    }
}

fn events_table(events: &[pb::RolloutEvent]) -> Table {
    let mut t = Table::new(&["SEQ", "TIME", "KIND", "STEP", "WEIGHT", "MESSAGE"]);
    for e in events {
        t.row(vec![
            e.sequence.to_string(),
            when(e.at.as_ref()),
            rollout_event_kind_name(e.kind),
            (i64::from(e.step) + 1).to_string(),
            format!("{}%", e.canary_weight),
            event_message(e),
        ]);
    }
    t
}

/// One line per event, for `watch`.
fn event_line(e: &pb::RolloutEvent) -> String {
    format!(
        "{}  {}  {}  step {} at {}%  {}",
        when(e.at.as_ref()),
        e.sequence,
        rollout_event_kind_name(e.kind),
        i64::from(e.step) + 1,
        e.canary_weight,
        event_message(e)
    )
}

fn render_rollout(r: &pb::Rollout) -> String {
    let step = if r.step_started_at.is_some() {
        format!(
            "{} at {}% (since {})",
            step_of(r),
            r.canary_weight,
            when(r.step_started_at.as_ref())
        )
    } else {
        format!("{} at {}%", step_of(r), r.canary_weight)
    };
    let mut out = key_values(&[
        ("rollout", r.rollout_id.clone()),
        ("type", type_name(r.module_type)),
        ("versions", versions(r)),
        ("mode", mode(r).to_string()),
        ("state", rollout_state_name(r.state)),
        ("step", step),
        ("steps", steps_text(&r.steps)),
        (
            "analysis",
            if r.blue_green {
                "none (blue/green)".to_string()
            } else {
                analysis_text(r.analysis.as_ref())
            },
        ),
        ("started", when(r.started_at.as_ref())),
        ("finished", when(r.finished_at.as_ref())),
        ("reason", or_dash(&r.reason)),
    ]);
    out.push_str("\nEVENTS (most recent)\n");
    if r.events.is_empty() {
        out.push_str("(none)\n");
    } else {
        out.push_str(&events_table(&r.events).render());
    }
    out
}

fn rollouts_table(rollouts: &[pb::Rollout]) -> Table {
    let mut t = Table::new(&[
        "ID", "TYPE", "MODE", "BASELINE", "CANARY", "STATE", "STEP", "WEIGHT", "STARTED", "REASON",
    ]);
    let mut rows: Vec<&pb::Rollout> = rollouts.iter().collect();
    let started = |r: &pb::Rollout| r.started_at.map(|t| (t.seconds, t.nanos));
    rows.sort_by(|a, b| (started(a), &a.rollout_id).cmp(&(started(b), &b.rollout_id)));
    for r in rows {
        t.row(vec![
            r.rollout_id.clone(),
            type_name(r.module_type),
            mode(r).to_string(),
            or_dash(&r.baseline_version),
            or_dash(&r.canary_version),
            rollout_state_name(r.state),
            step_of(r),
            format!("{}%", r.canary_weight),
            when(r.started_at.as_ref()),
            or_dash(&r.reason),
        ]);
    }
    t
}

/// Prints a call's rollout: the JSON document, or `summary` (one line) or
/// the full block.
fn print_rollout(out: &mut Out, r: Option<&pb::Rollout>, full: bool) -> Result<Exit, CtlError> {
    if out.json() {
        out.document(&json::rollout_response(r))?;
    } else {
        let r = r.cloned().unwrap_or_default();
        out.text(&if full {
            render_rollout(&r)
        } else {
            summary(&r)
        })?;
    }
    Ok(Exit::Ok)
}

pub(super) async fn start(
    ctl: &Ctl,
    out: &mut Out,
    a: &RolloutStartArgs,
) -> Result<Exit, CtlError> {
    let what = format!("rollout start {}", a.module_type);
    let resp = ctl
        .call(&what, start_request(a), |mut c, r| async move {
            c.start_rollout(r).await
        })
        .await?;
    print_rollout(out, resp.rollout.as_ref(), false)
}

async fn get(ctl: &Ctl, what: &str, id: &str) -> Result<Option<pb::Rollout>, CtlError> {
    let req = pb::GetRolloutRequest {
        rollout_id: id.to_string(),
    };
    let resp = ctl
        .call(what, req, |mut c, r| async move { c.get_rollout(r).await })
        .await?;
    Ok(resp.rollout)
}

pub(super) async fn status(ctl: &Ctl, out: &mut Out, id: &str) -> Result<Exit, CtlError> {
    let r = get(ctl, &format!("rollout status {id}"), id).await?;
    print_rollout(out, r.as_ref(), true)
}

pub(super) async fn list(ctl: &Ctl, out: &mut Out, a: &RolloutListArgs) -> Result<Exit, CtlError> {
    let req = pb::ListRolloutsRequest {
        module_type: a.module_type.unwrap_or(ModuleType::Unspecified) as i32,
        active_only: a.active,
    };
    let resp = ctl
        .call("rollout list", req, |mut c, r| async move {
            c.list_rollouts(r).await
        })
        .await?;
    if out.json() {
        out.document(&json::list_rollouts(&resp))?;
    } else {
        out.text(&rollouts_table(&resp.rollouts).render())?;
    }
    Ok(Exit::Ok)
}

pub(super) async fn promote(
    ctl: &Ctl,
    out: &mut Out,
    id: &str,
    full: bool,
) -> Result<Exit, CtlError> {
    let req = pb::PromoteRolloutRequest {
        rollout_id: id.to_string(),
        full,
    };
    let resp = ctl
        .call(
            &format!("rollout promote {id}"),
            req,
            |mut c, r| async move { c.promote_rollout(r).await },
        )
        .await?;
    print_rollout(out, resp.rollout.as_ref(), false)
}

pub(super) async fn pause(
    ctl: &Ctl,
    out: &mut Out,
    id: &str,
    reason: Option<&str>,
) -> Result<Exit, CtlError> {
    let req = pb::PauseRolloutRequest {
        rollout_id: id.to_string(),
        reason: reason.unwrap_or_default().to_string(),
    };
    let resp = ctl
        .call(&format!("rollout pause {id}"), req, |mut c, r| async move {
            c.pause_rollout(r).await
        })
        .await?;
    print_rollout(out, resp.rollout.as_ref(), false)
}

pub(super) async fn resume(ctl: &Ctl, out: &mut Out, id: &str) -> Result<Exit, CtlError> {
    let req = pb::ResumeRolloutRequest {
        rollout_id: id.to_string(),
    };
    let resp = ctl
        .call(
            &format!("rollout resume {id}"),
            req,
            |mut c, r| async move { c.resume_rollout(r).await },
        )
        .await?;
    print_rollout(out, resp.rollout.as_ref(), false)
}

pub(super) async fn rollback(
    ctl: &Ctl,
    out: &mut Out,
    id: &str,
    reason: Option<&str>,
) -> Result<Exit, CtlError> {
    let req = pb::RollbackRolloutRequest {
        rollout_id: id.to_string(),
        reason: reason.unwrap_or_default().to_string(),
    };
    let resp = ctl
        .call(
            &format!("rollout rollback {id}"),
            req,
            |mut c, r| async move { c.rollback_rollout(r).await },
        )
        .await?;
    print_rollout(out, resp.rollout.as_ref(), false)
}

/// The state an event finishes a rollout in, if it does.
fn finishes_in(e: &pb::RolloutEvent) -> Option<RolloutState> {
    match pb::RolloutEventKind::try_from(e.kind) {
        Ok(pb::RolloutEventKind::Succeeded) => Some(RolloutState::Succeeded),
        Ok(pb::RolloutEventKind::RolledBack) => Some(RolloutState::RolledBack),
        _ => None,
    }
}

/// How `watch` exits once the stream has ended with the rollout in `state`.
fn watch_exit(what: &str, state: i32) -> Exit {
    let name = rollout_state_name(state);
    match RolloutState::try_from(state) {
        Ok(RolloutState::Succeeded) => {
            eprintln!("nlbctl: {what}: the rollout finished {name}");
            Exit::Ok
        }
        Ok(RolloutState::RolledBack) => {
            eprintln!("nlbctl: {what}: the rollout finished {name}");
            Exit::Negative
        }
        _ => {
            eprintln!("nlbctl: {what}: the NLB ended the stream, but the rollout is {name}");
            Exit::Failure
        }
    }
}

pub(super) async fn watch(
    ctl: &Ctl,
    out: &mut Out,
    id: &str,
    after: u64,
) -> Result<Exit, CtlError> {
    let what = format!("rollout watch {id}");
    // Handlers first: a Ctrl-C from here on ends the watch cleanly.
    let mut stop = StopSignals::install()?;
    let mut client = ctl.client().await?;
    let req = pb::WatchRolloutRequest {
        rollout_id: id.to_string(),
        after_sequence: after,
    };
    // No deadline on the stream: it lasts until the rollout finishes.
    let mut stream = tokio::select! {
        r = client.watch_rollout(req) => r.map_err(|s| ctl.failed(&what, s))?.into_inner(),
        () = stop.recv() => return Ok(Exit::Ok),
    };
    let mut finished = None;
    loop {
        tokio::select! {
            m = stream.message() => match m {
                Ok(Some(event)) => {
                    finished = finishes_in(&event).or(finished);
                    if out.json() {
                        out.line(&json::rollout_event(&event))?;
                    } else {
                        out.text(&event_line(&event))?;
                    }
                }
                Ok(None) => break,
                Err(s) => return Err(ctl.failed(&what, s)),
            },
            () = stop.recv() => return Ok(Exit::Ok),
        }
    }
    // The stream ended without saying how (no event after --after, say): ask.
    let state = match finished {
        Some(s) => s as i32,
        None => get(ctl, &what, id).await?.unwrap_or_default().state,
    };
    Ok(watch_exit(&what, state))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ctl::cli::{Cli, Command, RolloutCmd};
    use clap::Parser;

    fn request(args: &[&str]) -> pb::StartRolloutRequest {
        let mut all = vec!["nlbctl", "rollout", "start"];
        all.extend_from_slice(args);
        match Cli::try_parse_from(all).unwrap().command {
            Command::Rollout(RolloutCmd::Start(a)) => start_request(&a),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn a_canary_start_sends_steps_and_only_the_analysis_given() {
        let r = request(&["alb", "--canary", "v2"]);
        assert_eq!(
            r,
            pb::StartRolloutRequest {
                module_type: ModuleType::Alb as i32,
                canary_version: "v2".into(),
                ..Default::default()
            },
            "everything else is the NLB's default"
        );
        let r = request(&[
            "alb",
            "--canary",
            "v2",
            "--baseline",
            "v1",
            "--steps",
            "10:60,100:0",
            "--max-p99-ms",
            "300",
            "--sticky",
            "--id",
            "r-9",
        ]);
        assert_eq!(
            r.steps,
            [
                pb::RolloutStep {
                    canary_weight: 10,
                    hold_seconds: 60
                },
                pb::RolloutStep {
                    canary_weight: 100,
                    hold_seconds: 0
                },
            ]
        );
        assert_eq!(
            r.analysis,
            Some(pb::RolloutAnalysis {
                max_p99_latency_ms: 300.0,
                ..Default::default()
            })
        );
        assert_eq!(
            (r.baseline_version.as_str(), r.rollout_id.as_str()),
            ("v1", "r-9")
        );
        assert!(r.sticky && r.blue_green.is_none());
    }

    #[test]
    fn a_blue_green_start_fills_blue_green_only() {
        let r = request(&[
            "rtmp",
            "--blue-green",
            "--canary",
            "v2",
            "--baseline",
            "v1",
            "--weight",
            "30",
        ]);
        assert_eq!(
            r,
            pb::StartRolloutRequest {
                module_type: ModuleType::Rtmp as i32,
                baseline_version: "v1".into(),
                canary_version: "v2".into(),
                blue_green: Some(pb::BlueGreenConfig {
                    blue_version: "v1".into(),
                    green_version: "v2".into(),
                    blue_weight: 70,
                    green_weight: 30,
                    ..Default::default()
                }),
                ..Default::default()
            }
        );
        let bg = request(&["alb", "--blue-green", "--canary", "v2"])
            .blue_green
            .unwrap();
        assert_eq!((bg.blue_weight, bg.green_weight), (0, 100));
        assert_eq!(bg.blue_version, "", "the NLB finds the baseline");
    }

    fn rollout() -> pb::Rollout {
        pb::Rollout {
            rollout_id: "r-1".into(),
            module_type: ModuleType::Alb as i32,
            baseline_version: "v1".into(),
            canary_version: "v2".into(),
            steps: vec![
                pb::RolloutStep {
                    canary_weight: 10,
                    hold_seconds: 60,
                },
                pb::RolloutStep {
                    canary_weight: 100,
                    hold_seconds: 0,
                },
            ],
            state: RolloutState::Paused as i32,
            current_step: 0,
            canary_weight: 10,
            reason: "lunch".into(),
            analysis: Some(pb::RolloutAnalysis {
                max_error_rate: 0.05,
                max_p99_latency_ratio: 1.5,
                ..Default::default()
            }),
            events: vec![pb::RolloutEvent {
                sequence: 2,
                kind: pb::RolloutEventKind::AnalysisFailed as i32,
                step: 0,
                canary_weight: 10,
                message: "error rate above 1%".into(),
                canary: Some(pb::RolloutSample {
                    requests: 120,
                    failures: 3,
                    error_rate: 0.025,
                    p99_latency_ms: 40.0,
                    ..Default::default()
                }),
                baseline: Some(pb::RolloutSample {
                    requests: 1000,
                    failures: 1,
                    error_rate: 0.001,
                    p99_latency_ms: 35.5,
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_rollout_reads_as_one_line_and_as_a_block() {
        let r = rollout();
        assert_eq!(
            summary(&r),
            "r-1: alb v1 -> v2, PAUSED, step 1/2 at 10% (lunch)"
        );
        let block = render_rollout(&r);
        assert!(block.contains("state:     PAUSED\n"), "{block}");
        assert!(block.contains("steps:     10:60,100:0\n"), "{block}");
        assert!(
            block.contains(
                "analysis:  window default, min requests default; \
                 rolls back on error rate > 5%, p99 > 1.5x baseline\n"
            ),
            "{block}"
        );
        assert!(
            block.contains(
                "2    -     ANALYSIS_FAILED  1     10%     error rate above 1% \
                 (canary 3/120 err 2.5% p99 40ms | baseline 1/1000 err 0.1% p99 35.5ms)\n"
            ),
            "{block}"
        );
        assert_eq!(
            event_line(&r.events[0]),
            "-  2  ANALYSIS_FAILED  step 1 at 10%  error rate above 1% \
             (canary 3/120 err 2.5% p99 40ms | baseline 1/1000 err 0.1% p99 35.5ms)"
        );
    }
}
