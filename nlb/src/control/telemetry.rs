//! ReportMetrics, GetModuleMetrics, GetNLBMetrics, StreamNLBMetrics.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use shared_types::pb::{self, ModuleType};
use shared_types::time::{now, to_system, unix_millis};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::ControlService;
use crate::app::Nlb;
use crate::metrics::series::{aggregate, MAX_POINTS_PER_ANSWER, NLB_OWNER};
use crate::metrics::SeriesStore;

type MetricsStream = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<pb::StreamNlbMetricsResponse, Status>> + Send>,
>;

/// Refuses an answer too large for one response, saying how to narrow it.
fn check_answer_size(points: usize) -> Result<(), Status> {
    if points > MAX_POINTS_PER_ANSWER {
        return Err(Status::resource_exhausted(format!(
            "the answer holds {points} points, more than the {MAX_POINTS_PER_ANSWER} one response carries; \
             narrow start_time/end_time or metric_names, or ask with aggregate = true"
        )));
    }
    Ok(())
}

/// Every instance's points (the NLB's own excluded) from `points_of`,
/// leaving out instances with none.
fn module_metrics(
    nlb: &Nlb,
    mut points_of: impl FnMut(&str) -> Result<Vec<pb::MetricDataPoint>, Status>,
) -> Result<HashMap<String, pb::ModuleMetrics>, Status> {
    let mut out = HashMap::new();
    for owner in nlb.series.owners() {
        if owner == NLB_OWNER {
            continue;
        }
        let points = points_of(&owner)?;
        if points.is_empty() {
            continue;
        }
        let module_type = nlb.registry.module_type_of(&owner).unwrap_or_default();
        out.insert(
            owner.clone(),
            pb::ModuleMetrics {
                instance_id: owner,
                module_type: module_type as i32,
                metrics: points,
                collected_at: Some(now()),
            },
        );
    }
    Ok(out)
}

/// `[start, end]` in Unix milliseconds from optional timestamps.
fn window(
    start: Option<&prost_types::Timestamp>,
    end: Option<&prost_types::Timestamp>,
) -> Result<(u64, u64), Status> {
    let s = start.map_or(0, |t| unix_millis(to_system(t)));
    let e = end.map_or(u64::MAX, |t| unix_millis(to_system(t)));
    if s > e {
        return Err(Status::invalid_argument("start_time is after end_time"));
    }
    Ok((s, e))
}

impl ControlService {
    pub(super) async fn report_metrics(
        &self,
        req: pb::ReportMetricsRequest,
    ) -> Result<pb::ReportMetricsResponse, Status> {
        let refuse = |s: Status| {
            self.nlb
                .metrics
                .metric_reports
                .with_label_values(&["refused"])
                .inc();
            s
        };
        if req.instance_id.is_empty() {
            return Err(refuse(Status::invalid_argument("instance_id: is empty")));
        }
        if self.nlb.registry.module_type_of(&req.instance_id).is_none() {
            return Err(refuse(Status::not_found(format!(
                "no instance {} is registered; register before reporting metrics",
                req.instance_id
            ))));
        }
        let m = req
            .metrics
            .as_ref()
            .ok_or_else(|| refuse(Status::invalid_argument("metrics: is required")))?;
        if !m.instance_id.is_empty() && m.instance_id != req.instance_id {
            return Err(refuse(Status::invalid_argument(format!(
                "metrics.instance_id {:?} differs from instance_id {:?}",
                m.instance_id, req.instance_id
            ))));
        }
        SeriesStore::validate(&m.metrics).map_err(|e| refuse(Status::invalid_argument(e)))?;
        let stamp = m
            .collected_at
            .as_ref()
            .or(req.reported_at.as_ref())
            .map_or_else(
                || unix_millis(SystemTime::now()),
                |t| unix_millis(to_system(t)),
            );
        let rec = self.nlb.series.record(&req.instance_id, &m.metrics, stamp);
        self.nlb
            .metrics
            .metric_reports
            .with_label_values(&["accepted"])
            .inc();
        let mut message = format!("stored {} points", rec.accepted);
        if rec.refused_new_series > 0 {
            message.push_str(&format!(
                "; {} points refused: the instance holds the maximum of {} series",
                rec.refused_new_series,
                self.nlb.config.current().metrics.max_series_per_instance
            ));
        }
        Ok(pb::ReportMetricsResponse {
            acknowledged: true,
            message,
            processed_at: Some(now()),
        })
    }

    pub(super) async fn get_module_metrics(
        &self,
        req: pb::GetModuleMetricsRequest,
    ) -> Result<pb::GetModuleMetricsResponse, Status> {
        if req.instance_id.is_empty() {
            return Err(Status::invalid_argument("instance_id: is empty"));
        }
        let (s, e) = window(req.start_time.as_ref(), req.end_time.as_ref())?;
        let module_type = self.nlb.registry.module_type_of(&req.instance_id);
        let points = self
            .nlb
            .series
            .query(&req.instance_id, &req.metric_names, s, e);
        if module_type.is_none() && !self.nlb.series.owners().contains(&req.instance_id) {
            return Err(Status::not_found(format!(
                "no instance {} is registered",
                req.instance_id
            )));
        }
        check_answer_size(points.len())?;
        Ok(pb::GetModuleMetricsResponse {
            metrics: Some(pb::ModuleMetrics {
                instance_id: req.instance_id,
                module_type: module_type.unwrap_or(ModuleType::Unspecified) as i32,
                metrics: points,
                collected_at: Some(now()),
            }),
            collected_at: Some(now()),
        })
    }

    pub(super) async fn get_nlb_metrics(
        &self,
        req: pb::GetNlbMetricsRequest,
    ) -> Result<pb::GetNlbMetricsResponse, Status> {
        let (s, e) = window(req.start_time.as_ref(), req.end_time.as_ref())?;
        self.nlb.sample_own_metrics();
        let shape = |points: Vec<pb::MetricDataPoint>| {
            if req.aggregate {
                aggregate(&points)
            } else {
                points
            }
        };
        let metrics = shape(self.nlb.series.query(NLB_OWNER, &req.metric_names, s, e));
        let mut total = metrics.len();
        let module_metrics = module_metrics(&self.nlb, |owner| {
            let points = shape(self.nlb.series.query(owner, &req.metric_names, s, e));
            total += points.len();
            check_answer_size(total)?;
            Ok(points)
        })?;
        Ok(pb::GetNlbMetricsResponse {
            metrics,
            module_metrics,
            collected_at: Some(now()),
        })
    }

    pub(super) async fn stream_nlb_metrics(
        &self,
        req: pb::StreamNlbMetricsRequest,
    ) -> Result<MetricsStream, Status> {
        if !(0..=3600).contains(&req.interval_seconds) {
            return Err(Status::invalid_argument(format!(
                "interval_seconds: {} is out of range (1 to 3600, 0 = the default)",
                req.interval_seconds
            )));
        }
        let interval = if req.interval_seconds == 0 {
            Duration::from_secs(
                self.nlb
                    .config
                    .current()
                    .metrics
                    .stream_default_interval_seconds,
            )
        } else {
            Duration::from_secs(req.interval_seconds as u64)
        };
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let nlb = std::sync::Arc::clone(&self.nlb);
        let mut stopping = self.nlb.shutdown_signal.subscribe();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                // A client that leaves ends the task at once, not at the next
                // tick (which may be an hour away).
                tokio::select! {
                    _ = ticker.tick() => {}
                    () = tx.closed() => {
                        tracing::debug!("metrics stream client left");
                        break;
                    }
                    _ = stopping.wait_for(|s| *s) => break,
                }
                if nlb.shutting_down.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let names = &req.metric_names;
                let metrics: Vec<pb::MetricDataPoint> = nlb
                    .own_metric_points()
                    .into_iter()
                    .filter(|p| names.is_empty() || names.contains(&p.name))
                    .collect();
                let module_metrics = if req.include_modules {
                    module_metrics(&nlb, |owner| Ok(nlb.series.latest(owner, names)))
                        .unwrap_or_default()
                } else {
                    HashMap::new()
                };
                let msg = pb::StreamNlbMetricsResponse {
                    metrics,
                    module_metrics,
                    timestamp: Some(now()),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    tracing::debug!("metrics stream client left");
                    break;
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}
