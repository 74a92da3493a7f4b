//! `metrics`: GetNLBMetrics (the NLB's series and every instance's),
//! `--module ID`: GetModuleMetrics, `--watch`: StreamNLBMetrics until Ctrl-C
//! (or SIGTERM) or the NLB ends the stream, both exit 0.

use std::collections::BTreeMap;
use std::time::SystemTime;

use shared_types::pb;

use super::StopSignals;
use crate::ctl::cli::MetricsArgs;
use crate::ctl::client::Ctl;
use crate::ctl::exit::{CtlError, Exit};
use crate::ctl::json;
use crate::ctl::output::{num, pairs, when, Out, Table};

/// The owner name of the NLB's own series in tables.
const NLB: &str = "nlb";

/// One row per series (owner, name, labels): how many points, and the latest.
fn series_table<'a>(
    owners: impl IntoIterator<Item = (&'a str, &'a [pb::MetricDataPoint])>,
) -> Table {
    type Key = (String, String, String);
    let mut series: BTreeMap<Key, (usize, &pb::MetricDataPoint)> = BTreeMap::new();
    for (owner, points) in owners {
        for p in points {
            let key = (owner.to_string(), p.name.clone(), pairs(&p.labels));
            let stamp = |p: &pb::MetricDataPoint| p.timestamp.map(|t| (t.seconds, t.nanos));
            series
                .entry(key)
                .and_modify(|(n, latest)| {
                    *n += 1;
                    if stamp(p) >= stamp(latest) {
                        *latest = p;
                    }
                })
                .or_insert((1, p));
        }
    }
    let mut t = Table::new(&["OWNER", "NAME", "LABELS", "POINTS", "LATEST", "AT"]);
    // The NLB's own series first, then instances by id.
    let mut rows: Vec<_> = series.into_iter().collect();
    rows.sort_by(|a, b| (a.0 .0 != NLB, &a.0).cmp(&(b.0 .0 != NLB, &b.0)));
    for ((owner, name, labels), (n, p)) in rows {
        t.row(vec![
            owner,
            name,
            labels,
            n.to_string(),
            num(p.value),
            when(p.timestamp.as_ref()),
        ]);
    }
    t
}

fn sorted_modules(
    map: &std::collections::HashMap<String, pb::ModuleMetrics>,
) -> Vec<(&str, &[pb::MetricDataPoint])> {
    let mut v: Vec<(&str, &[pb::MetricDataPoint])> = map
        .iter()
        .map(|(id, m)| (id.as_str(), m.metrics.as_slice()))
        .collect();
    v.sort_by_key(|(id, _)| *id);
    v
}

fn render_update(u: &pb::StreamNlbMetricsResponse) -> String {
    let mut t = Table::new(&["NAME", "VALUE"]);
    for p in &u.metrics {
        t.row(vec![p.name.clone(), num(p.value)]);
    }
    let mut out = format!("== {}\n{}", when(u.timestamp.as_ref()), t.render());
    if !u.module_metrics.is_empty() {
        let mut t = Table::new(&["INSTANCE", "NAME", "LABELS", "VALUE"]);
        for (id, points) in sorted_modules(&u.module_metrics) {
            for p in points {
                t.row(vec![
                    id.to_string(),
                    p.name.clone(),
                    pairs(&p.labels),
                    num(p.value),
                ]);
            }
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    out.push('\n');
    out
}

async fn watch(ctl: &Ctl, out: &mut Out, a: &MetricsArgs) -> Result<Exit, CtlError> {
    const WHAT: &str = "metrics --watch";
    // Handlers first: a Ctrl-C from here on ends the watch cleanly.
    let mut stop = StopSignals::install()?;
    let mut client = ctl.client().await?;
    let req = pb::StreamNlbMetricsRequest {
        interval_seconds: a.interval.unwrap_or(0),
        metric_names: a.names.clone(),
        include_modules: a.include_modules,
    };
    // No deadline on a stream: it lasts until the user or the NLB ends it.
    let mut stream = tokio::select! {
        r = client.stream_nlb_metrics(req) => {
            r.map_err(|s| ctl.failed(WHAT, s))?.into_inner()
        }
        () = stop.recv() => return Ok(Exit::Ok),
    };
    loop {
        tokio::select! {
            m = stream.message() => match m {
                Ok(Some(update)) => {
                    if out.json() {
                        out.line(&json::stream_update(&update))?;
                    } else {
                        out.text(&render_update(&update))?;
                    }
                }
                Ok(None) => {
                    eprintln!("nlbctl: {WHAT}: the NLB ended the stream");
                    return Ok(Exit::Ok);
                }
                Err(s) => return Err(ctl.failed(WHAT, s)),
            },
            () = stop.recv() => return Ok(Exit::Ok),
        }
    }
}

pub(super) async fn metrics(ctl: &Ctl, out: &mut Out, a: &MetricsArgs) -> Result<Exit, CtlError> {
    if a.watch {
        return watch(ctl, out, a).await;
    }
    let start_time = a.since.map(|d| {
        shared_types::time::from_system(
            SystemTime::now()
                .checked_sub(d)
                .unwrap_or(SystemTime::UNIX_EPOCH),
        )
    });
    if let Some(id) = &a.module {
        let req = pb::GetModuleMetricsRequest {
            instance_id: id.clone(),
            metric_names: a.names.clone(),
            start_time,
            end_time: None,
        };
        let resp = ctl
            .call(
                &format!("metrics --module {id}"),
                req,
                |mut c, r| async move { c.get_module_metrics(r).await },
            )
            .await?;
        if out.json() {
            out.document(&json::module_metrics_response(&resp))?;
        } else {
            let points = resp
                .metrics
                .as_ref()
                .map_or(&[][..], |m| m.metrics.as_slice());
            out.text(&series_table([(id.as_str(), points)]).render())?;
        }
        return Ok(Exit::Ok);
    }
    let req = pb::GetNlbMetricsRequest {
        metric_names: a.names.clone(),
        start_time,
        end_time: None,
        aggregate: a.aggregate,
    };
    let resp = ctl
        .call("metrics", req, |mut c, r| async move {
            c.get_nlb_metrics(r).await
        })
        .await?;
    if out.json() {
        out.document(&json::nlb_metrics(&resp))?;
    } else {
        let mut owners = vec![(NLB, resp.metrics.as_slice())];
        owners.extend(sorted_modules(&resp.module_metrics));
        out.text(&series_table(owners).render())?;
    }
    Ok(Exit::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(name: &str, value: f64, secs: i64) -> pb::MetricDataPoint {
        pb::MetricDataPoint {
            name: name.into(),
            value,
            labels: Default::default(),
            timestamp: Some(prost_types::Timestamp {
                seconds: secs,
                nanos: 0,
            }),
        }
    }

    #[test]
    fn one_row_per_series_with_the_latest_value_nlb_first() {
        let nlb = [
            point("nlb_routes", 1.0, 10),
            point("nlb_routes", 3.0, 30),
            point("nlb_routes", 2.0, 20),
        ];
        let module = [point("cpu", 0.5, 5)];
        let t = series_table([("alb-1", &module[..]), (NLB, &nlb[..])]).render();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(
            lines[1].starts_with("nlb    nlb_routes  -       3       3"),
            "{t}"
        );
        assert!(
            lines[2].starts_with("alb-1  cpu         -       1       0.5"),
            "{t}"
        );
    }
}
